/*
 * batch_jobs.h: batch transform as a server-side job: checking a definition, starting a run
 * (one queue task per input object, so workers share it), the scheduler that starts runs of
 * cron schedules, and running a task on a worker.
 */
#ifndef INFERD_BATCH_JOBS_H
#define INFERD_BATCH_JOBS_H

#include "core/buf.h"
#include "core/err.h"
#include "queue/queue.h"

#include <stddef.h>
#include <stdint.h>

struct registry;

struct batch_jobs_config {
    struct queue *q;
    struct registry *reg;
    int max_attempts;   /* per task */
    const char *tenant; /* who owns what is created (NULL: the anonymous tenant) */
    const char *viewer; /* who asks, for a schedule by id: NULL every tenant (queue.h) */
};

/*
 * Checks a batch-job definition (a JSON object: model, input, output, format,
 * records_per_batch, concurrency, join_input, csv_header, max_errors, callback_url, schedule,
 * timezone) without touching storage; input and output may be templates (cron.h).
 * ERR_INVALID / ERR_NOT_FOUND name the field.
 *   normalized  a new string (free()): the definition with its defaults filled in
 */
int batch_job_check(const char *body, size_t len, struct registry *reg, char **normalized,
                    int *is_schedule, struct err *e);

/* What a definition's check needs to know of its model. */
struct batch_job_model {
    int is_ok;     /* it takes rows of numbers (batch_model_ok()); 0: the definition fails */
    int documents; /* it takes JSON documents (no CSV, no table input or output) */
};
/* Fills `*out` for model `name` (borrowed): 0, or ERR_NOT_FOUND etc. with `e` naming it. */
typedef int (*batch_job_model_fn)(void *ctx, const char *name, struct batch_job_model *out,
                                  struct err *e);
/*
 * batch_job_check, with the model told by `model_fn` (called once, with `ctx`, for the
 * definition's "model") instead of the registry. Pure apart from the clock and the time zone
 * files: no storage is read and no connection opened, a postgresql:// input included.
 */
int batch_job_check_def(const char *body, size_t len, batch_job_model_fn model_fn, void *ctx,
                        char **normalized, int *is_schedule, struct err *e);

/*
 * Starts a run of a checked definition now: lists its input and stores the run with one task
 * per input object. For a run of a schedule, `parent` is the schedule, `run_at_ms` the minute
 * it runs for (its output goes under <output>/<YYYYmmddTHHMMZ>/) and `parent_next_ms` the
 * schedule's next run; a scheduled run whose input cannot be listed is stored as failed.
 * ERR_INVALID / ERR_NOT_FOUND for a manual run whose input has no usable objects.
 */
int batch_job_start(const struct batch_jobs_config *cfg, const char *definition, const char *parent,
                    int64_t run_at_ms, int64_t parent_next_ms, char id_out[40], struct err *e);

/* Stores a checked definition that has a schedule; its first run is the next matching
 * minute in its time zone. */
int batch_job_schedule(const struct batch_jobs_config *cfg, const char *definition, char id_out[40],
                       struct err *e);

/*
 * Runs batch job `id` now. A schedule (active or paused) gets a run of its own for the time
 * now (its templates expanded with it), listed with its runs; its next run does not move. A
 * run is started again as a new run with the same definition and locations. ERR_NOT_FOUND;
 * ERR_CONFLICT for a cancelled schedule; else as batch_job_start.
 */
int batch_job_run_now(const struct batch_jobs_config *cfg, const char *id, char id_out[40],
                      struct err *e);

/* Pauses (`paused` 1) or resumes schedule `id`; a resumed schedule runs next at its first
 * time after now (the times it missed do not run). Appends its JSON to `out`. */
int batch_job_pause(const struct batch_jobs_config *cfg, const char *id, int paused,
                    struct buf *out, struct err *e);

/* A thread that starts the runs of due schedules, checking every second. */
struct batch_scheduler;
int batch_scheduler_start(const struct batch_jobs_config *cfg, struct batch_scheduler **out,
                          struct err *e);
void batch_scheduler_stop(struct batch_scheduler *s);

/*
 * Runs a leased JOB_KIND_BATCH_TASK (one object) or JOB_KIND_BATCH_FINISH (the manifest and
 * _SUCCESS) job, extending its lease while it runs and stopping when it is cancelled or
 * `*stop` is set (shutdown: the task fails retryably and goes back to the queue).
 *   result     receives the job's result (JSON) on success
 *   retryable  set on failure: whether another attempt may succeed
 */
int batch_task_run(struct queue *q, struct registry *reg, const struct job *job,
                   const _Atomic int *stop, struct buf *result, int *retryable, struct err *e);

#endif
