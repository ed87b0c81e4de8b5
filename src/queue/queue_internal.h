/*
 * queue_internal.h: what the queue implementations share; included by src/queue/ only.
 */
#ifndef INFERD_QUEUE_INTERNAL_H
#define INFERD_QUEUE_INTERNAL_H

#include "queue/queue.h"

#include <jansson.h>
#include <stdatomic.h>

/* Which batch jobs a listing wants (from its ?status=). */
struct queue_batch_filter {
    int schedules; /* 1: schedules only; 0: runs only; -1: both */
    int state;     /* a schedule's QUEUE_SCHEDULE_* or a run's job_state; -1 any */
    int limit;     /* at most this many */
};

struct queue_ops {
    int (*enqueue)(struct queue *q, const struct job_spec *spec, char id_out[40], int *existed,
                   struct err *e);
    int (*lease)(struct queue *q, const char *worker, int64_t wait_ms, struct job **out,
                 struct err *e);
    int (*enqueue_async)(struct queue *q, const struct job_spec *spec, queue_enqueue_fn fn,
                         void *ctx, struct err *e);
    int (*lease_many)(struct queue *q, const char *worker, size_t max, int max_tasks,
                      int64_t wait_ms, struct job **out, size_t *n, struct err *e);
    int (*finish_many)(struct queue *q, struct queue_outcome *outs, size_t n, struct err *e);
    int (*extend)(struct queue *q, const char *id, uint64_t token, int64_t lease_ms, struct err *e);
    int (*complete)(struct queue *q, const char *id, uint64_t token, const char *result, size_t len,
                    int64_t json_len, struct err *e);
    int (*fail)(struct queue *q, const char *id, uint64_t token, const char *error, int retryable,
                struct err *e);
    int (*cancel)(struct queue *q, const char *id, struct job **out, struct err *e);
    int (*retry)(struct queue *q, const char *id, struct job **out, struct err *e);
    int (*get)(struct queue *q, const char *id, int want_result, struct job **out, struct err *e);
    /* up to f->limit jobs matching `f`, newest first, with their notifications and history, into
     * the caller's array of f->limit; `*n` (0 on entry) counts them */
    int (*list)(struct queue *q, const struct queue_list_filter *f, struct job **out, size_t *n,
                struct err *e);
    int (*counts)(struct queue *q, int64_t counts[JOB_N_STATES], struct err *e);
    int64_t (*queued)(struct queue *q);
    int (*outbox_due)(struct queue *q, int64_t now_ms, size_t max, struct queue_outbox_item **out,
                      size_t *n, struct err *e);
    int64_t (*outbox_next_due)(struct queue *q);
    int (*outbox_record)(struct queue *q, const struct queue_outbox_attempt *a, struct err *e);
    int (*batch_create)(struct queue *q, const struct batch_job_spec *spec, char id_out[40],
                        struct err *e);
    /* a batch job, with a schedule's latest runs: a new array of one */
    int (*batch_get)(struct queue *q, const char *id, struct batch_job **out, struct err *e);
    /* runs started by hand and schedules matching `f`, newest first: a new array */
    int (*batch_list)(struct queue *q, const struct queue_batch_filter *f,
                      struct batch_job **out, size_t *n, struct err *e);
    int (*batch_cancel)(struct queue *q, const char *id, struct batch_job **out, struct err *e);
    /* the run's model, and the stored result (JSON text) of each of its succeeded tasks;
     * `*model` and `*results` (and each result) are the caller's to free() */
    int (*batch_results)(struct queue *q, const char *id, char **model, char ***results,
                         size_t *n, struct err *e);
    int (*schedules_due)(struct queue *q, int64_t now_ms, struct queue_schedule **out, size_t *n,
                         struct err *e);
    int (*batch_definition)(struct queue *q, const char *id, struct queue_schedule **out,
                            struct err *e);
    int (*batch_pause)(struct queue *q, const char *id, int paused, int64_t next_run_ms,
                       struct batch_job **out, struct err *e);
    int (*batch_progress)(struct queue *q, const char *batch_id, const char *task_id,
                          uint64_t token, int64_t records, struct err *e);
    int (*worker_beat)(struct queue *q, const struct queue_worker *w, struct err *e);
    int (*worker_leave)(struct queue *q, const char *id, struct err *e);
    int (*workers_list)(struct queue *q, struct queue_worker **out, size_t *n, struct err *e);
    void (*close)(struct queue *q);
    int outbox_exclusive; /* outbox_due hides what it handed out (held for one sender) */
};

/* Frees what `b` holds (its runs too) and zeroes it; `b` itself is the caller's. */
void batch_job_release(struct batch_job *b);

/* The filter for a listing's status (NULL: any). 0 when `status` is no batch job status. */
int queue_batch_filter_parse(const char *status, struct queue_batch_filter *f);
/* {"batch_jobs": [...]} */
int queue_batch_list_json(const struct batch_job *b, size_t n, struct buf *out);
/* A run's manifest from its tasks' results (see queue_batch_manifest). */
int queue_batch_manifest_json(const char *model, char *const *results, size_t n,
                              struct buf *out);

#define QUEUE_CANCEL_RING 256

/* The first member of every implementation's struct. */
struct queue {
    const struct queue_ops *ops;
    queue_final_fn on_final; /* set before use; NULL means nobody listens */
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

/* Frees an outbox item's strings and empties it; the item itself is the caller's. */
void queue_outbox_item_release(struct queue_outbox_item *it);

/* Records that running job `id` was asked to cancel (here, or in another process). */
void queue_note_cancel(struct queue *q, const char *id);

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
