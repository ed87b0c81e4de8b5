/*
 * queue.h: the durable job queue and job store behind one interface.
 *
 * Implementations: src/queue/sqlite/ (embedded default, one SQLite database in WAL mode under
 * --data-dir). The operations are the ones a Redis Streams queue (consumer groups, XAUTOCLAIM)
 * or a PostgreSQL `FOR UPDATE SKIP LOCKED` queue also offers, so callers never change.
 *
 * Every call is blocking and thread-safe, and returns only after its change is durable
 * (committed and fsync'd). Callers are worker threads and the server's I/O pool, never an HTTP
 * event thread. Implementations batch concurrent calls into one commit (group commit).
 *
 * A job moves queued -> running -> succeeded | failed | cancelled, or queued -> expired (its
 * ttl passed before it started), or queued -> cancelled. A running job asked to cancel shows
 * as "cancelling" (still JOB_RUNNING, cancel_requested) until its worker stops it. Each lease hands
 * out a fencing token (the attempt number): complete, fail and extend succeed only while that
 * attempt still holds the lease, so a worker that stalled past its lease cannot overwrite the
 * attempt that replaced it.
 */
#ifndef INFERD_QUEUE_H
#define INFERD_QUEUE_H

#include "core/buf.h"
#include "core/err.h"

#include <stddef.h>
#include <stdint.h>

enum job_state {
    JOB_QUEUED = 0,
    JOB_RUNNING,
    JOB_SUCCEEDED,
    JOB_FAILED,
    JOB_CANCELLED,
    JOB_EXPIRED,
};
#define JOB_N_STATES 6

/* "queued" ... "expired"; job_state_parse returns -1 for an unknown name. */
const char *job_state_name(enum job_state s);
int job_state_parse(const char *name);
static inline int job_state_is_final(enum job_state s)
{
    return s >= JOB_SUCCEEDED;
}

/* What a job does: run an inference, or a part of a batch job (src/batch runs those). */
enum job_kind {
    JOB_KIND_INFER = 0,
    JOB_KIND_BATCH_TASK,   /* one input object of a batch job; result {"object","records",...} */
    JOB_KIND_BATCH_FINISH, /* after every task succeeded: the manifest and _SUCCESS */
};

/* What a client asks for. Every pointer is borrowed for the call. */
struct job_spec {
    const char *model;
    enum job_kind kind;
    const char *batch_id; /* batch tasks: their batch job; NULL otherwise */
    const char *input;    /* a v2 infer request body (JSON); NULL with input_location */
    size_t input_len;
    int64_t input_json_len;      /* Inference-Header-Content-Length of `input`, or -1 */
    const char *input_location;  /* URI of a file holding that body; NULL means inline */
    const char *output_location; /* where to write the result; NULL means store it */
    const char *callback_url;    /* webhook; NULL means none */
    int priority;                /* 0-9, higher first; FIFO within a priority */
    int64_t ttl_s;               /* 0: never expires while queued */
    int max_attempts;            /* >= 1 */
    int64_t lease_timeout_ms;    /* visibility timeout of each attempt */
    const char *idempotency_key; /* NULL means none */
    const char *request_hash;    /* hash of the request, compared for the idempotency key */
    const char *tenant; /* who owns it (an API key's name); NULL or "" the anonymous tenant.
                         * Idempotency keys are per tenant. */
};

/* One attempt of a job, as its record keeps it (attempts_history). Strings owned by the job. */
struct job_attempt {
    int attempt;        /* 1, 2, ...: the attempt's fencing token */
    int64_t started_ms; /* when it was leased */
    int64_t ended_ms;   /* 0 while it runs */
    char *worker;       /* the worker id that ran it (queue_worker_beat); NULL if unknown */
    char *error;        /* why it did not succeed; NULL when it did, or while it runs */
};

/* One delivery attempt of a job's webhook, as its record lists it. Strings owned by the job. */
struct job_notification {
    char *event_id;
    int64_t at_ms;
    int status_code; /* the receiver's HTTP status; 0 when there was no response */
    char *error;     /* NULL when none */
};

/* A snapshot of a job. Owned by whoever received it; free with job_free(). */
struct job {
    char id[40];
    char *model;
    enum job_state state;
    int priority;
    int attempts; /* attempts started, the running one included */
    int max_attempts;
    int attempts_uncounted; /* of `attempts`, those not counted against max_attempts: handed
                             * back by a worker's shutdown, or made before a redrive */
    int64_t created_ms, started_ms, finished_ms; /* 0 when not yet */
    int64_t lease_timeout_ms;
    int64_t ttl_s;
    char *error;           /* last error; NULL if none */
    char *input_location;  /* NULL if inline */
    char *output_location; /* NULL if stored inline */
    char *callback_url;
    int cancel_requested; /* DELETE while running: discard the result when the batch returns */
    /* filled by queue_lease() only */
    struct buf input;       /* the inline request body */
    int64_t input_json_len; /* -1 when JSON only */
    uint64_t token;         /* fencing token of this attempt */
    /* filled by queue_get() with want_result, for succeeded jobs stored inline */
    struct buf result;
    int64_t result_json_len;
    struct job_notification *notifications; /* webhook attempts, oldest first */
    size_t n_notifications;
    enum job_kind kind;
    char batch_id[40]; /* batch tasks: the batch job they belong to; "" otherwise */
    char *worker;      /* the worker id that holds it (or last held it); NULL if none */
    /* filled by queue_get() and queue_list(): every attempt, oldest first, across redrives */
    struct job_attempt *history;
    size_t n_history;
    char *tenant; /* its owner; NULL for the anonymous tenant */
};

void job_free(struct job *j);

struct queue_list_filter {
    int state;          /* -1 means any */
    int cancelling;     /* with state JOB_RUNNING: 1 only those asked to cancel ("cancelling"),
                         * 0 only the others; -1 both */
    const char *model;  /* NULL means any */
    const char *cursor; /* the last id of the previous page; NULL starts at the newest */
    int limit;          /* 1..1000 */
    const char *tenant; /* only this tenant's jobs ("": the anonymous tenant's); NULL: every
                         * tenant's (an admin key, or a server without keys) */
};

struct queue;

struct queue_config {
    const char *url;                 /* NULL or "sqlite": SQLite; "redis://host:port/db": Redis;
                                      * "postgresql://[user[:password]@]host[:port]/db[?...]": PostgreSQL */
    const char *data_dir;            /* SQLite: the database lives at DIR/inferd.db */
    int64_t result_ttl_s;            /* how long a finished job is kept; 0 forever */
    int64_t max_queued;              /* past it, enqueue says ERR_BUSY */
    int64_t retry_backoff_ms;        /* first retry delay; doubles per attempt (capped at 60 s) */
    int64_t result_inline_max_bytes; /* results above this in webhooks become a link */
};

/* Opens (creating if needed). Jobs that were running when the previous owner died are
 * requeued at once: the embedded queue has a single owner. */
int queue_open(const struct queue_config *cfg, struct queue **out, struct err *e);
void queue_close(struct queue *q);

/* 1 when `url` names a PostgreSQL queue (postgresql://... or postgres://...). */
int queue_url_is_postgres(const char *url);

/*
 * Tenants. Every job, batch job and schedule belongs to a tenant (job_spec.tenant,
 * batch_job_spec.tenant; NULL or "" is the anonymous tenant, which owns everything a server
 * without API keys makes). Every call below that reads or changes one of them by id takes
 * `tenant`, who asks: NULL asks for every tenant (an admin, or a server without keys); any other
 * value (including "", the anonymous tenant) sees only its own, and another tenant's job is
 * ERR_NOT_FOUND with the very message an id that does not exist gets, so its existence is not
 * revealed. Listings and retry_matching take the tenant in their filter, with the same rule.
 */
/*
 * Stores a new job, durably. With an idempotency key already used: the same request hash
 * gives back that job (`*existed` = 1), another hash is ERR_CONFLICT.
 *   id_out  receives the job id (NUL-terminated, < 40 bytes)
 * Returns 0, ERR_BUSY (max_queued jobs waiting), ERR_CONFLICT or ERR_IO.
 */
int queue_enqueue(struct queue *q, const struct job_spec *spec, char id_out[40], int *existed,
                  struct err *e);

/*
 * queue_enqueue without waiting: `fn` is called once the job is durable (or refused), on the
 * store's writer thread, so it must not block; `spec` and everything it points to stay
 * borrowed until then. This is how an HTTP thread hands a job over without a thread waiting
 * for the commit. Returns 0 (fn will be called) or an error (fn will not).
 */
typedef void (*queue_enqueue_fn)(void *ctx, int rc, const struct err *e, const char *id,
                                 int existed);
int queue_enqueue_async(struct queue *q, const struct job_spec *spec, queue_enqueue_fn fn,
                        void *ctx, struct err *e);

/*
 * Leases the next runnable job (highest priority, oldest first) for `lease_ms`, counting the
 * attempt before it runs (so a crash mid-run still moves the job towards max_attempts).
 * Waits up to `wait_ms` for one to become runnable. `*out` is NULL when none did.
 * Jobs whose ttl passed are expired on the way.
 *   worker  "<worker id>/<thread>": the job records the worker id (everything before the
 *           last '/'; the whole name when there is none), which queue_worker_beat() keeps
 *           alive; a worker presumed dead has its running jobs queued again.
 */
int queue_lease(struct queue *q, const char *worker, int64_t wait_ms, struct job **out,
                struct err *e);

/* Like queue_lease, for up to `max` jobs in one commit, of which at most `max_tasks` (0 or 1)
 * batch tasks, which run for long. `out` is the caller's array of `max` pointers; `*n` of
 * them receive new jobs (job_free each). */
int queue_lease_many(struct queue *q, const char *worker, size_t max, int max_tasks,
                     int64_t wait_ms, struct job **out, size_t *n, struct err *e);

/* One attempt's outcome, for queue_finish_many(). Strings borrowed for the call. */
struct queue_outcome {
    const char *id;
    uint64_t token;
    int ok;             /* 1: succeeded with `result`; 0: failed with `error` */
    const char *result; /* NULL when written to output_location */
    size_t result_len;
    int64_t result_json_len;
    const char *error;
    int retryable;
    int64_t retry_after_ms; /* > 0: the next attempt no sooner than this (after a backoff) */
    int released; /* with ok 0: stopped by the worker's shutdown, not by the job: queued again
                   * at once, and this attempt does not count against max_attempts */
    int rc;       /* filled: 0 (recorded), ERR_CONFLICT when fenced out (the outcome is discarded),
                   * or another error: not recorded (the store failed; the same outcome may be sent
                   * again, its token still fencing it) */
    int failed_final; /* filled with rc 0: this failure ended the job failed (no attempt left,
                       * or not retryable); 0: it runs again, or it was not a failure */
};

/* Records many outcomes (as queue_complete / queue_fail) in one commit. Returns the first
 * error other than a fencing conflict; ERR_FULL when the store is out of space. */
int queue_finish_many(struct queue *q, struct queue_outcome *outs, size_t n, struct err *e);

/* Keeps a running attempt's lease. ERR_CONFLICT when the token no longer holds it. */
int queue_extend(struct queue *q, const char *id, uint64_t token, int64_t lease_ms, struct err *e);

/* Records the result of the attempt holding `token`. ERR_CONFLICT when fenced out (the
 * result is discarded). A cancelled-while-running job ends cancelled, its result discarded. */
int queue_complete(struct queue *q, const char *id, uint64_t token, const char *result,
                   size_t result_len, int64_t result_json_len, struct err *e);

/* Records a failed attempt: retried after a backoff while attempts < max_attempts and
 * `retryable`, otherwise the job ends failed with `error`. */
int queue_fail(struct queue *q, const char *id, uint64_t token, const char *error, int retryable,
               struct err *e);

/* Cancels: a queued job ends cancelled at once; a running one is marked and ends cancelled
 * when its attempt reports. ERR_CONFLICT if already final; ERR_NOT_FOUND. */
int queue_cancel(struct queue *q, const char *id, const char *tenant, struct job **out,
                 struct err *e);

/*
 * Running jobs asked to cancel, as this process learnt (its own queue_cancel calls; on Redis,
 * any process's, by pub/sub): a worker compares the generation, which changes with each new
 * one, and then asks about its running jobs. Both are cheap and make no I/O.
 */
uint64_t queue_cancel_generation(struct queue *q);
int queue_cancel_noted(struct queue *q, const char *id);

/* Sends a failed (or expired) job back to the queue with a fresh attempt budget. */
int queue_retry(struct queue *q, const char *id, const char *tenant, struct job **out,
                struct err *e);

/*
 * Bulk redrive: sends back to the queue, as queue_retry() does one, every job that matches `f`
 * (state JOB_FAILED, JOB_EXPIRED, or -1 for both; model or NULL; at most f->limit jobs, newest
 * first; cursor unused; only f->tenant's jobs unless it is NULL). `*n_retried` counts them; a job
 * that changed meanwhile, or has no input to run again, is passed over. Works on every store
 * (through queue_list/queue_retry).
 */
int queue_retry_matching(struct queue *q, const struct queue_list_filter *f, int64_t *n_retried,
                         struct err *e);

/* A snapshot of one job; `want_result` also loads the stored result. ERR_NOT_FOUND (also for
 * another tenant's job, see "Tenants" above). */
int queue_get(struct queue *q, const char *id, const char *tenant, int want_result,
              struct job **out, struct err *e);

/* Appends a JSON page {"jobs": [...], "next_cursor": ...} (newest first). */
int queue_list(struct queue *q, const struct queue_list_filter *f, struct buf *out, struct err *e);

/* Jobs per state, for metrics. */
int queue_counts(struct queue *q, int64_t counts[JOB_N_STATES], struct err *e);

/*
 * Called (outside any queue lock, on the thread that made the change durable) whenever a job
 * reaches a final state; used to wake long-polls. Set once before use.
 */
typedef void (*queue_final_fn)(void *ctx, const char *job_id, enum job_state state);
void queue_on_final(struct queue *q, queue_final_fn fn, void *ctx);

/* Jobs waiting now (cheap: kept in memory). */
int64_t queue_queued(struct queue *q);

/* Appends a job's public JSON: id, model, (tenant, when not the anonymous one,) status,
 * priority, attempts, created_at, ... */
int queue_job_json(const struct job *j, struct buf *out);
/* Appends an ISO-8601 UTC time for milliseconds since the epoch, or null for 0. */
int queue_json_time(struct buf *out, int64_t ms);

/* ---- workers: the processes that run jobs, and their heartbeats ---- */

/* A worker process (the pool of `inferd serve` or an `inferd worker`) as the queue knows it. */
struct queue_worker {
    char id[96]; /* "host/pid/random": what its jobs' `worker` shows */
    char host[64];
    int pid;
    int64_t started_ms;
    int64_t heartbeat_ms; /* the last beat (queue_workers_list fills it; beat uses now) */
    int64_t timeout_ms;   /* silent this long after a beat: presumed dead */
    int jobs_running;
};

/*
 * Registers `w` or refreshes its heartbeat. A worker silent for its timeout_ms is presumed
 * dead by any process's sweep: its running jobs are queued again at once (the attempt counts;
 * a late outcome of it is fenced out) or fail on their last attempt, and it leaves the list.
 * Returns 0 or ERR_UNAVAILABLE / ERR_IO.
 */
int queue_worker_beat(struct queue *q, const struct queue_worker *w, struct err *e);
/* A clean stop: the worker leaves the list; jobs it still held are queued again at once. */
int queue_worker_leave(struct queue *q, const char *id, struct err *e);
/* The live workers, oldest first; `*out` is a new array (free()). */
int queue_workers_list(struct queue *q, struct queue_worker **out, size_t *n, struct err *e);
/* Appends {"workers": [...]}: id, host, pid, started_at, last_heartbeat, jobs_running. */
int queue_workers_json(const struct queue_worker *w, size_t n, struct buf *out);
/* The worker id inside a lease's worker name (see queue_lease): `name` up to its last '/'. */
void queue_worker_id_of(const char *name, char out[96]);

/* ---- batch jobs: a run of batch transform, one task (a job) per input object ---- */

/*
 * A batch job is either a run or a schedule. A run is stored with one JOB_KIND_BATCH_TASK job
 * per input object, in one commit; when the last task succeeds, a JOB_KIND_BATCH_FINISH job is
 * queued in the same commit as that success; when it succeeds the run has succeeded. A task
 * that fails for good, or bad records past max_errors, fails the run and cancels its other
 * tasks. Every end of a run stores its webhook (batch.succeeded, batch.failed,
 * batch.cancelled) with the state change. A schedule holds a definition and the time of its
 * next run; the scheduler creates its runs.
 */
struct batch_job_spec {
    const char *definition; /* JSON object: the options as accepted */
    const char *model;
    const char *callback_url; /* NULL: none */
    int64_t max_errors;       /* bad records tolerated over the whole run */
    int max_attempts;         /* per task */
    int64_t lease_timeout_ms; /* per task attempt */
    /* a schedule: no run now */
    const char *schedule; /* the cron expression; NULL for a run */
    int64_t next_run_ms;  /* its first run */
    /* a run */
    const char *output;              /* where this run writes */
    const char *const *task_inputs;  /* per input object: the task's input (JSON) */
    const char *const *task_objects; /* per input object: its name */
    size_t n_tasks;
    const char *finish_input; /* the finishing job's input (JSON) */
    const char *error;        /* non-NULL: the run failed before it started (stored failed) */
    /* a run of a schedule: stored only if the schedule is active and due at run_at_ms, and its
     * next run moves to parent_next_run_ms in the same commit (so a run happens once) */
    const char *parent;
    int64_t run_at_ms;
    int64_t parent_next_run_ms;
    int by_hand; /* a run of `parent` started by hand (run now): the schedule is not claimed
                  * and its next run stays where it is */
    /* its owner; NULL or "" the anonymous tenant. A run of a schedule belongs to the schedule's
     * tenant whatever this says; a run's tasks and finishing job belong to the run's. */
    const char *tenant;
};

/*
 * A snapshot of a batch job, a run or a schedule, as a store keeps it; the public JSON is
 * written from it once (queue_batch_job_json), whichever store filled it. Owned by whoever
 * received it; free with batch_jobs_free().
 */
struct batch_job {
    char id[40];
    char parent[40];  /* a run of a schedule: the schedule's id; "" otherwise */
    char *definition; /* the options as accepted (a JSON object), callback credentials included */
    char *schedule;   /* a schedule's cron expression; NULL for a run */
    int state;        /* a run: its job_state; a schedule: QUEUE_SCHEDULE_* or JOB_CANCELLED */
    char *output;     /* where the run writes; NULL if not known */
    char *error;      /* why it failed or was cancelled; NULL if none */
    int64_t created_ms, started_ms, finished_ms; /* 0 when not yet */
    int64_t run_at_ms;                           /* a run of a schedule: when it was due */
    int64_t next_run_ms;                         /* a schedule: its next run */
    int64_t objects_total, objects_done;
    int64_t records_done; /* of finished objects, plus what running tasks reported so far */
    int64_t records_failed;
    struct batch_job *runs; /* a schedule's latest runs (at most 50), newest first */
    size_t n_runs;
    char *tenant; /* its owner; NULL for the anonymous tenant */
};

/* Frees `n` batch jobs of an array (their runs too) and the array. */
void batch_jobs_free(struct batch_job *b, size_t n);
/* "queued" ... "cancelled" for a run; "scheduled", "paused", "cancelled" for a schedule. */
const char *batch_job_status(const struct batch_job *b);
/* Appends a batch job's public JSON: its definition's options (the credentials of its
 * callback URL and of its input, a postgresql:// URI's password, masked),
 * then id, tenant (when not the anonymous one), status, created_at, and a run's output, times,
 * progress and error, or a schedule's next_run_at and latest runs. */
int queue_batch_job_json(const struct batch_job *b, struct buf *out);
/* The webhook body for a run that ended: {"id": event_id, "type": "batch.<status>",
 * "batch_job": {...}}. */
int queue_batch_event_json(const struct batch_job *b, const char *event_id, struct buf *out);

/* Stores a batch job. ERR_BUSY when its tasks would pass max_queued; ERR_CONFLICT when a
 * scheduled run is no longer due (another scheduler made it). */
int queue_batch_create(struct queue *q, const struct batch_job_spec *spec, char id_out[40],
                       struct err *e);
/* Appends a batch job's public JSON (a schedule's lists its latest runs). ERR_NOT_FOUND.
 * `tenant` here and below: who asks (see "Tenants" above). */
int queue_batch_get(struct queue *q, const char *id, const char *tenant, struct buf *out,
                    struct err *e);
/* Appends {"batch_jobs": [...]}: runs started by hand and schedules, newest first, of `tenant`
 * (NULL: every tenant's); with `status` (NULL: any) only those whose status is that (queued ...
 * cancelled, scheduled, paused). */
int queue_batch_list(struct queue *q, const char *tenant, int limit, const char *status,
                     struct buf *out, struct err *e);
/* Cancels a run (its tasks stop) or a schedule (no more runs). Appends its JSON to `out`.
 * ERR_CONFLICT if it already ended. */
int queue_batch_cancel(struct queue *q, const char *id, const char *tenant, struct buf *out,
                       struct err *e);
/* Appends the run's manifest: {"model", "objects": {name: {"records", "sha256", "input"}}}
 * ("input" when the task's result has it: the input object's identity). */
int queue_batch_manifest(struct queue *q, const char *id, const char *tenant, struct buf *out,
                         struct err *e);

/* A schedule's state in the store: active (due at next_run_ms), paused (never due), or
 * cancelled (JOB_CANCELLED). */
#define QUEUE_SCHEDULE_ACTIVE 0
#define QUEUE_SCHEDULE_PAUSED 1

/* A schedule that is due (or, from queue_batch_definition, any batch job). Strings owned by
 * the array. */
struct queue_schedule {
    char id[40];
    char *definition; /* as stored: callback credentials included */
    char *schedule;   /* NULL for a run (queue_batch_definition) */
    int64_t next_run_ms;
    int state; /* queue_batch_definition: a schedule's QUEUE_SCHEDULE_* or a run's job_state */
    /* its owner; NULL for the anonymous tenant (runs of it belong to it too) */
    char *tenant;
};

/* One batch job's stored definition; `*out` is a new array of one: queue_schedules_free().
 * This is what "run now" of a schedule reads: a tenant that may not see it cannot run it. */
int queue_batch_definition(struct queue *q, const char *id, const char *tenant,
                           struct queue_schedule **out, struct err *e);

/* Pauses (`paused` 1) or resumes a schedule; a resumed one runs next at `next_run_ms`.
 * Appends its JSON to `out`. ERR_NOT_FOUND; ERR_CONFLICT for a run or a cancelled schedule.
 * Pausing a paused schedule (or resuming an active one) changes nothing. */
int queue_batch_pause(struct queue *q, const char *id, const char *tenant, int paused,
                      int64_t next_run_ms, struct buf *out, struct err *e);

/* Records that the attempt `token` of batch task `task_id` has written `records` records of
 * its object so far: the run's records_done counts them while the object runs. Ignored once
 * the attempt no longer holds the task. */
int queue_batch_progress(struct queue *q, const char *batch_id, const char *task_id, uint64_t token,
                         int64_t records, struct err *e);
/* Schedules due by `now_ms`; free with queue_schedules_free(). */
int queue_schedules_due(struct queue *q, int64_t now_ms, struct queue_schedule **out, size_t *n,
                        struct err *e);
void queue_schedules_free(struct queue_schedule *s, size_t n);

/* ---- the webhook outbox: written with each final state, drained by src/notify ---- */

/* One pending webhook. Strings owned by the item. */
struct queue_outbox_item {
    int64_t id;
    char *event_id; /* the same for every attempt and across restarts */
    char *url;
    char *body; /* the exact bytes to POST, built when the job ended */
    size_t body_len;
    int attempts; /* attempts already made */
};

/* What one delivery attempt did. */
struct queue_outbox_attempt {
    int64_t outbox_id;
    int64_t at_ms;
    int http_status;   /* 0 when no response */
    const char *error; /* NULL when none */
    int done;          /* no more attempts */
    int delivered;
    int64_t next_attempt_ms;
};

/* Up to `max` webhooks due by `now_ms`; `*out` is a new array: queue_outbox_items_free(). */
int queue_outbox_due(struct queue *q, int64_t now_ms, size_t max, struct queue_outbox_item **out,
                     size_t *n, struct err *e);
void queue_outbox_items_free(struct queue_outbox_item *items, size_t n);
/* 1 when queue_outbox_due() never hands out again what a sender holds (Redis, shared by
 * many senders); 0 when it returns due webhooks whoever sends them (SQLite, one owner). */
int queue_outbox_exclusive(struct queue *q);
/* The earliest due time of a pending webhook, or -1. */
int64_t queue_outbox_next_due(struct queue *q);
/* Fills a notify_store (src/notify) that delivers this queue's outbox. `q` must outlive it. */
struct notify_store;
void queue_notify_store(struct queue *q, struct notify_store *out);

/* Records an attempt (listed on the job) and the delivery's next state, durably. */
int queue_outbox_record(struct queue *q, const struct queue_outbox_attempt *a, struct err *e);

#endif
