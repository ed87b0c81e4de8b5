/*
 * metrics.h: counters and histograms, rendered in the Prometheus text format at /metrics.
 *
 * One struct metrics_model per model name, created on first use and kept for the life of the
 * process, so counters survive a model reload. Every update is a relaxed atomic: callers on
 * any thread, no lock on the hot path.
 */
#ifndef INFERD_METRICS_H
#define INFERD_METRICS_H

#include "core/buf.h"

#include <stddef.h>
#include <stdint.h>

struct metrics_model;

/* The entry for `name` (borrowed), created if needed; NULL only when out of memory. */
struct metrics_model *metrics_model_get(const char *name);

/* A finished request: its HTTP status and how long it took end to end. NULL m does nothing. */
void metrics_request(struct metrics_model *m, int status, double seconds);
/* Time a request waited in the batcher before its backend call began. */
void metrics_queue_wait(struct metrics_model *m, double seconds);
/* Rows in one backend execute call. */
void metrics_batch(struct metrics_model *m, size_t rows);
/* An async job: time from submission to its start, and its run time. */
void metrics_job_wait(struct metrics_model *m, double seconds);
void metrics_job_run(struct metrics_model *m, double seconds);
/* An async job's attempt recorded by this process: how it went. */
enum metrics_job_outcome {
    METRICS_JOB_SUCCEEDED = 0, /* the job succeeded */
    METRICS_JOB_RETRIED,       /* the attempt failed; the job runs again */
    METRICS_JOB_FAILED,        /* the job failed for good */
};
#define METRICS_N_JOB_OUTCOMES 3
void metrics_job_outcome(struct metrics_model *m, enum metrics_job_outcome outcome);
/* Requests admitted and not yet answered. */
void metrics_inflight_add(struct metrics_model *m, int delta);

/* Appends the exposition text. Returns 0 or ERR_NOMEM. */
int metrics_render(struct buf *out);

/* ---- statistics per model version: Triton's statistics extension (stats.c) ---- */

/* Each is a count and a cumulative duration in nanoseconds. */
enum metrics_stat {
    METRICS_STAT_SUCCESS,        /* requests the model answered: arrival to answer */
    METRICS_STAT_FAIL,           /* requests refused or failed once their model was known */
    METRICS_STAT_QUEUE,          /* time waiting in the batcher */
    METRICS_STAT_COMPUTE_INPUT,  /* decoding an online request into tensors */
    METRICS_STAT_COMPUTE_INFER,  /* the backend call a request ran in */
    METRICS_STAT_COMPUTE_OUTPUT, /* encoding an online response */
    METRICS_N_STATS
};

struct metrics_version;

/* The entry for version `version` of `name` (borrowed), created if needed and kept for the
 * life of the process; NULL only when out of memory. */
struct metrics_version *metrics_version_get(const char *name, int64_t version);

/* One more `s` that took `ns`. NULL v does nothing; any thread. */
void metrics_stat(struct metrics_version *v, enum metrics_stat s, uint64_t ns);

/* One successful backend call of `rows` rows that took `ns` (execution_count, batch_stats). */
void metrics_execution(struct metrics_version *v, int64_t rows, uint64_t ns);

/* `rows` inferences answered successfully, now (inference_count, last_inference). */
void metrics_inferences(struct metrics_version *v, int64_t rows);

/* Appends {"model_stats":[...]} for model `name` (NULL: every model) and `version` (0: every
 * version seen since start). Returns 0, ERR_NOT_FOUND when no entry matches, or ERR_NOMEM. */
int metrics_stats_render(const char *name, int64_t version, struct buf *out);

#endif
