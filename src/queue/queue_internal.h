/*
 * queue_internal.h: what the queue implementations share; included by src/queue/ only.
 */
#ifndef INFERD_QUEUE_INTERNAL_H
#define INFERD_QUEUE_INTERNAL_H

#include "queue/queue.h"
#include "queue/store_batch.h"
#include "queue/store_jobs.h"
#include "queue/store_outbox.h"

#include <jansson.h>
#include <stdatomic.h>

/* A store: three tables of durable primitives, by concern, and its close. */
struct queue_ops {
    const struct queue_job_ops *jobs;
    const struct queue_batch_ops *batch;
    const struct queue_outbox_ops *outbox;
    void (*close)(struct queue *q); /* once, when no other call runs */
};

/* The longest wait before a retry, however many attempts failed. */
#define QUEUE_MAX_BACKOFF_MS 60000

/*
 * How long a job waits before its next attempt after its `counted`-th counted attempt failed:
 * `first_ms` doubled per attempt after the first, at most QUEUE_MAX_BACKOFF_MS, and never
 * sooner than `retry_after_ms` (what the model or its upstream asked for). Every store uses
 * this rule (the Redis script gets the same two numbers and applies it in Lua).
 */
int64_t queue_retry_backoff_ms(int64_t first_ms, int counted, int64_t retry_after_ms);

/*
 * Admission (--max-queue): `n` more jobs may wait when `queued` already do, unless that makes
 * more than cfg->max_queued. 0, or ERR_BUSY saying how full the queue is. Stores call it in
 * the transaction that stores the jobs (the Redis scripts make the same comparison in Lua and
 * hand the count back for the message).
 */
int queue_admit(const struct queue_config *cfg, int64_t queued, int64_t n, struct err *e);

/*
 * Idempotency: the key of `s` already names job `old_id`, stored for a request whose hash is
 * `old_hash` (NULL: unknown). 0 when `s` is that same request (the caller answers with the
 * old job, existed = 1); ERR_CONFLICT naming the job otherwise.
 */
int queue_idem_match(const struct job_spec *s, const char *old_id, const char *old_hash,
                     struct err *e);

/*
 * A running attempt of `j` failed (`retryable`: the model says another attempt may work;
 * `released`: a worker's shutdown handed it back, which counts nothing): the job's next
 * state. JOB_QUEUED runs it again after *backoff_ms; JOB_FAILED when it was not retryable or
 * its counted attempts reached max_attempts; JOB_CANCELLED when it was asked to cancel.
 */
enum job_state queue_after_failure(const struct queue_config *cfg, const struct job *j,
                                   int released, int retryable, int64_t retry_after_ms,
                                   int64_t *backoff_ms);

/*
 * Retention (--result-ttl-s): a finished job, or a finished batch run with its tasks, that
 * ended at or before this time goes, unless a webhook about it is still being delivered.
 * Schedules, queued and running work stay. INT64_MIN when nothing goes (--result-ttl-s 0).
 * (Redis sets the same ttl on the keys when the job or run ends.)
 */
int64_t queue_retain_before_ms(const struct queue_config *cfg, int64_t now_ms);

/* The one log line for a worker whose running attempts were lost (`why`: it stopped, or it
 * went silent), whichever store noticed. */
void queue_log_worker_lost(const char *worker, int64_t jobs, const char *why);

/*
 * Batch runs: what the end of one of a run's tasks does to the run. Stores call these in the
 * transaction that made the task final, after checking the run has not ended already (the
 * Redis script applies the same rules in Lua). `why` gets the run's error for BATCH_RUN_FAIL.
 */
#define QUEUE_WHY_MAX 512
enum batch_run_step {
    BATCH_RUN_WAIT,    /* nothing yet: other tasks are still to end */
    BATCH_RUN_COUNT,   /* a task succeeded: add its counts, then ask queue_batch_after_count */
    BATCH_RUN_FINISH,  /* every task counted: queue the run's finishing job */
    BATCH_RUN_SUCCEED, /* the finishing job succeeded: the run succeeded */
    BATCH_RUN_FAIL,    /* a task failed or was cancelled, or too many bad records: it failed */
};
enum batch_run_step queue_batch_task_ended(const struct job *task, char why[QUEUE_WHY_MAX]);

/* A succeeded task's counts, from its result {"object", "records", "errors", ...} (zeros and
 * object "?" where it says nothing). */
struct batch_task_counts {
    int64_t records, bad;
    char object[1024];
};
void queue_batch_task_counts(const char *result, size_t len, struct batch_task_counts *out);

/* After a task's counts were added to its run: the run's totals decide (FAIL, FINISH or
 * WAIT). */
enum batch_run_step queue_batch_after_count(int64_t objects_total, int64_t objects_done,
                                            int64_t records_failed, int64_t max_errors,
                                            const char *object, char why[QUEUE_WHY_MAX]);

/* Frees what `b` holds (its runs too) and zeroes it; `b` itself is the caller's. */
void batch_job_release(struct batch_job *b);

/* The filter for a listing's status (NULL: any). 0 when `status` is no batch job status. */
int queue_batch_filter_parse(const char *status, struct queue_batch_filter *f);
/* {"batch_jobs": [...]} */
int queue_batch_list_json(const struct batch_job *b, size_t n, struct buf *out);
/* A run's manifest from its tasks' results (see queue_batch_manifest). */
int queue_batch_manifest_json(const char *model, char *const *results, size_t n, struct buf *out);

#define QUEUE_CANCEL_RING 256

/* The first member of every implementation's struct. */
struct queue {
    const struct queue_ops *ops;
    queue_final_fn on_final; /* set before use; NULL means nobody listens */
    /* the store's group-commit writer (writer.h), which the shared ops-table entries submit
     * to; set at open, NULL for a store without one (Redis) */
    struct queue_writer *writer;
    void *on_final_ctx;
    /* running jobs asked to cancel, newest last (queue.c, under its lock) */
    char cancelled[QUEUE_CANCEL_RING][40];
    unsigned n_cancelled;
    _Atomic uint64_t cancel_gen;
};

/*
 * Test-only fault injection (tests/unit/test_queue.c): when set, a store asks it before
 * finishing element `index` of an array it hands out (`where`: "outbox_due", "lease",
 * "schedules_due"), and a nonzero answer makes that element fail as a failed allocation or
 * read would; on Redis, "lease_answer" drops a lease's answer as if Redis had died before
 * sending it. NULL in production, where it costs one pointer test per element.
 */
extern int (*queue_fault_hook)(const char *where, size_t index);
static inline int queue_fault(const char *where, size_t index)
{
    return queue_fault_hook && queue_fault_hook(where, index);
}

/*
 * Tenants in a store. Every store keeps the anonymous tenant as "" (so one index on (tenant,
 * ...) serves every listing, and data written before tenants existed reads as anonymous) and
 * hands it back as NULL.
 */
static inline const char *queue_tenant_stored(const char *tenant)
{
    return tenant ? tenant : "";
}
/* Sets `*dst` to a copy of a stored tenant (NULL for ""/NULL). 0 or ERR_NOMEM. */
int queue_tenant_set(char **dst, const char *stored);

/* Frees an outbox item's strings and empties it; the item itself is the caller's. */
void queue_outbox_item_release(struct queue_outbox_item *it);

/* Records that running job `id` was asked to cancel (here, or in another process). */
void queue_note_cancel(struct queue *q, const char *id);

/* Appends a job_notification to j->notifications (strings copied). 0 or ERR_NOMEM. */
int queue_job_add_notification(struct job *j, const char *event_id, int64_t at_ms, int status_code,
                               const char *error);

/* Appends a job_attempt to j->history (strings copied). 0 or ERR_NOMEM. */
int queue_job_add_attempt(struct job *j, int attempt, int64_t started_ms, int64_t ended_ms,
                          const char *worker, const char *error);

int queue_sqlite_open(const struct queue_config *cfg, struct queue **out, struct err *e);
int queue_postgres_open(const struct queue_config *cfg, struct queue **out, struct err *e);

/* The webhook body for a finished job: {"id": event_id, "type", "job", "result" | "result_url"}.
 * `j->result` holds the inline result when there is one. */
int queue_event_json(const struct job *j, const char *event_id, int64_t inline_max_bytes,
                     struct buf *out);

/* Replaces the string at o[key], a callback URL, with what may be shown back: its credentials
 * masked (notify_url_redacted()). Every batch job's public JSON, and so its webhook event, goes
 * through this; the store keeps the URL itself for delivery. 0 or ERR_NOMEM. */
int queue_json_redact_url(json_t *o, const char *key);

#endif
