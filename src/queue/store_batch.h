/*
 * store_batch.h: what a store implements for batch jobs (runs, their tasks, schedules).
 * Included by src/queue/ only. The meaning of each call is that of its queue_batch_* function
 * in queue.h; the core (queue.c, batch_job.c) writes every JSON shape from what these fill.
 *
 * Threads: called from HTTP I/O pool threads (create, get, list, cancel, pause, manifest), the
 * scheduler thread (schedules_due, create of a scheduled run, definition) and the worker
 * pool's threads (progress, definition), at once; the core holds no lock while it calls one.
 */
#ifndef INFERD_QUEUE_STORE_BATCH_H
#define INFERD_QUEUE_STORE_BATCH_H

#include "queue/queue.h"

/* Which batch jobs a listing wants (from its ?status=). */
struct queue_batch_filter {
    int schedules; /* 1: schedules only; 0: runs only; -1: both */
    int state;     /* a schedule's QUEUE_SCHEDULE_* or a run's job_state; -1 any */
    int limit;     /* at most this many */
    /* only this tenant's ("": the anonymous one); NULL: every tenant's */
    const char *tenant;
};

struct queue_batch_ops {
    int (*create)(struct queue *q, const struct batch_job_spec *spec, char id_out[40],
                  struct err *e);
    /* a batch job, with a schedule's latest runs: a new array of one */
    int (*get)(struct queue *q, const char *id, struct batch_job **out, struct err *e);
    /* runs started by hand and schedules matching `f`, newest first, each as get() fills it: a
     * new array */
    int (*list)(struct queue *q, const struct queue_batch_filter *f, struct batch_job **out,
                size_t *n, struct err *e);
    /* cancels, then fills `*out` as get() does (a new array of one) */
    int (*cancel)(struct queue *q, const char *id, struct batch_job **out, struct err *e);
    int (*pause)(struct queue *q, const char *id, int paused, int64_t next_run_ms,
                 struct batch_job **out, struct err *e);
    /* the run's model, and the stored result (JSON text) of each of its succeeded tasks;
     * `*model` and `*results` (and each result) are the caller's to free() */
    int (*results)(struct queue *q, const char *id, char **model, char ***results, size_t *n,
                   struct err *e);
    int (*definition)(struct queue *q, const char *id, struct queue_schedule **out, struct err *e);
    int (*progress)(struct queue *q, const char *batch_id, const char *task_id, uint64_t token,
                    int64_t records, struct err *e);
    int (*schedules_due)(struct queue *q, int64_t now_ms, struct queue_schedule **out, size_t *n,
                         struct err *e);
};

#endif
