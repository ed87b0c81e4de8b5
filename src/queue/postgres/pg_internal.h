/*
 * pg_internal.h: what the PostgreSQL queue's files share (pg.c: connections, schema, threads,
 * the ops table; writer.c: group commit; jobs.c: the jobs' changes; sweep.c: lost attempts,
 * workers, expiry and retention; reads.c: reads; outbox.c: webhooks; batch.c: batch jobs and
 * schedules). Included by those files only.
 *
 * Threads and their connections (a PGconn is used by one thread at a time):
 *   writer    every change (enqueue, lease, outcomes, cancel, ...), grouped into one
 *             transaction per round (group commit); its own connection `wconn`
 *   sweeper   expired ttls and leases, dead workers, retention, the cached queued count; its
 *             own connection
 *   listener  LISTEN inferd_jobs (wake idle leases), inferd_cancel (queue_note_cancel) and
 *             inferd_final (long-polls of this process for jobs other processes ended)
 *   callers   reads (get, list, counts, outbox, batch reads) on connections of the pool
 *
 * Locks: `w.lock` (writer.h) guards the operation list, `stopping`, `generation` and the
 * wake-ups; `pool_lock` guards the idle connections; `final_lock` is held by the listener
 * around an on_final call (queue_on_final(NULL) waits it out). Never two at once.
 */
#ifndef INFERD_PG_INTERNAL_H
#define INFERD_PG_INTERNAL_H

#include "queue/queue_internal.h"
#include "queue/writer.h"

#include <libpq-fe.h>
#include <pthread.h>
#include <stdatomic.h>

#define PG_SCHEMA_VERSION 2     /* the newest schema this binary knows (pg.c: migrations) */
#define PG_POOL_SIZE 16         /* idle read connections kept */
#define PG_MAX_GROUP 256        /* operations per transaction */
#define PG_SWEEP_MS 1000        /* how often ttls, leases and dead workers are looked at */
#define PG_RETAIN_MS 1000       /* how often finished jobs past --result-ttl-s are removed */
#define PG_RETAIN_MAX 1000      /* at most this many per pass */
#define PG_RETAIN_RUNS_MAX 16   /* batch runs per pass: each takes its tasks with it */
#define PG_IDLE_POLL_MS 1000    /* an idle lease looks again this often without a NOTIFY */
#define PG_OUTBOX_HOLD_MS 60000 /* a webhook handed to a sender is its own for this long */
#define PG_RECONNECT_MIN_MS 100
#define PG_RECONNECT_MAX_MS 2000
#define PG_MAX_PARAMS 24

/* Bind parameters of one statement: text, or binary for bytea (`fmt` 1); NULL is SQL NULL. */
struct pg_params {
    int n;
    const char *v[PG_MAX_PARAMS];
    int len[PG_MAX_PARAMS];
    int fmt[PG_MAX_PARAMS];
    char num[PG_MAX_PARAMS][24];
};

void pg_p_str(struct pg_params *p, const char *s);
void pg_p_int(struct pg_params *p, int64_t v);
void pg_p_bin(struct pg_params *p, const void *data, size_t len);

struct pg_queue;

/* One transaction's context: the connection and what happened in it. */
struct pg_final {
    char id[40];
    enum job_state state;
    struct pg_final *next;
};
struct pg_txn {
    struct pg_queue *q;
    PGconn *c;
    struct pg_final *finals; /* jobs that became final: NOTIFY inferd_final, on_final after */
    int runnable;            /* jobs became runnable: NOTIFY inferd_jobs */
    int cancels;             /* running jobs asked to cancel: notified as they happen */
    int64_t queued;          /* jobs in state queued as this transaction sees them; -1 unknown */
    int64_t queued_delta;    /* how this transaction changed that count */
    int savepoint;           /* writer: an operation's savepoint is taken */
    int commit_begun;        /* its COMMIT was sent: counted in q->commits_begun */
};

/* This transaction queued `n` more jobs (or fewer: n < 0). At its commit queue_queued() takes
 * the count it read, or, when it read none, moves by the change. */
static inline void pg_txn_queued_add(struct pg_txn *t, int64_t n)
{
    t->queued_delta += n;
    if (t->queued >= 0)
        t->queued += n;
}

/*
 * Reads, once per transaction, how many jobs wait (t->queued), for admission. It first takes
 * the admission lock (an advisory lock held until the transaction ends), so the processes
 * sharing the database admit in turn, each counting what the others committed: --max-queue
 * holds exactly however many API processes there are. 0 or the error.
 */
int pg_txn_count_queued(struct pg_txn *t, struct err *e);

struct pg_queue {
    struct queue base;
    struct queue_config cfg;
    char *conninfo; /* the URL as given (password included): for libpq only, never shown */
    char *shown;    /* the URL with its password masked: for logs and errors */

    pthread_mutex_t pool_lock;
    PGconn *pool[PG_POOL_SIZE]; /* guarded by pool_lock: idle connections */
    int n_idle;                 /* guarded by pool_lock */

    /* the operations for the writer thread, its lock, `stopping` and the idle leases'
     * wake-up (jobs may have become runnable here or, by NOTIFY, elsewhere) */
    struct queue_writer w;
    pthread_cond_t stop;        /* with w.lock: stopping; the sweeper and listener wait on it */
    pthread_mutex_t final_lock; /* held by the listener while it calls on_final */
    pthread_t writer, sweeper, listener;
    int threads;                /* how many of them started (writer, sweeper, listener in order) */
    PGconn *wconn;              /* writer thread only */
    int64_t next_connect_ms;    /* writer thread only: no reconnect before (backoff) */
    int64_t connect_backoff_ms; /* writer thread only */
    /* writer thread only: attempts a lease handed out in a group whose COMMIT got no answer
     * (the connection broke): committed or not, nobody runs them; released at the next group */
    struct pg_lost_lease {
        char id[40];
        uint64_t token;
    } * lost;
    size_t n_lost;

    _Atomic int64_t n_queued;      /* jobs queued, as last counted (queue_queued) */
    /* A count taken on the side (count_queued) is stored only if no transaction of this
     * process committed while it was taken: commits_begun moves before a COMMIT is sent,
     * commits_ended after its effect on n_queued is published, both under count_lock for the
     * publishing, so a late count never overwrites a newer one. */
    _Atomic uint64_t commits_begun, commits_ended;
    pthread_mutex_t count_lock;
    _Atomic int64_t down_since_ms; /* 0 while PostgreSQL answers */
    _Atomic int64_t up_since_ms;   /* when it last became reachable (or the queue opened) */
    _Atomic int own_pid[2];        /* backend pids of the writer's and sweeper's connections:
                                    * their NOTIFYs are this process's own */
};

static inline struct pg_queue *pgq(struct queue *q)
{
    return (struct pg_queue *)q;
}

/* ---- pg.c: connections and statements ---- */

/* A new connection (or NULL with `e` set: ERR_UNAVAILABLE). */
PGconn *pg_connect(struct pg_queue *q, struct err *e);
/* 1 while `c` is usable as far as a read without waiting can tell (a server that closed it
 * has said so by now). */
int pg_alive(PGconn *c);
/* A connection from the pool, or a new one; give it back with pg_give(). NULL: `e` set. */
PGconn *pg_take(struct pg_queue *q, struct err *e);
/* Back to the pool; a broken one is closed (and the idle ones with it). */
void pg_give(struct pg_queue *q, PGconn *c);
void pg_note_down(struct pg_queue *q, const char *why);
void pg_note_up(struct pg_queue *q);

/* Runs `sql`; returns its result (PGRES_TUPLES_OK or PGRES_COMMAND_OK) or NULL with `e` set:
 * ERR_UNAVAILABLE when the connection is lost, ERR_CONFLICT for a deadlock or serialization
 * failure (to be retried), ERR_IO otherwise. `what` names the step in the message. */
PGresult *pg_exec(struct pg_queue *q, PGconn *c, const char *sql, const struct pg_params *p,
                  const char *what, struct err *e);
/* pg_exec for a statement whose result is not needed. */
int pg_run(struct pg_queue *q, PGconn *c, const char *sql, const struct pg_params *p,
           const char *what, struct err *e);
/* A deadlock (40P01) or serialization failure (40001): the last pg_exec's error to retry. */
int pg_retryable(const struct err *e);
int64_t pg_int(const PGresult *r, int row, int col);
/* A new copy of a text value; NULL for SQL NULL (or out of memory). */
char *pg_strdup(const PGresult *r, int row, int col);
/* Appends a bytea value (text form) to `out`. 0 or ERR_NOMEM. */
int pg_bytea(const PGresult *r, int row, int col, struct buf *out);
/* Appends one element to an array literal being built in `b` (started with "{"; "}" ends
 * it): a text (NULL: SQL NULL), or a bytea. 0 or ERR_NOMEM. */
int pg_array_add(struct buf *b, const char *s);
int pg_array_add_bytea(struct buf *b, const void *data, size_t len);

/* ---- writer.c ---- */

void *pg_writer_main(void *arg);
/* Commits the transaction of `t` after its NOTIFYs; then wakes local waiters. */
int pg_txn_commit(struct pg_txn *t, struct err *e);
/* After a commit: on_final for each final, and frees the notes. */
void pg_txn_done(struct pg_txn *t, int committed);
int pg_extend(struct queue *qb, const char *id, uint64_t token, int64_t lease_ms, struct err *e);

/* ---- jobs.c: operations (inside a transaction of `t`) ---- */

#define JOB_COLUMNS                                                                                \
    "id, model, state, priority, attempts, max_attempts, created_ms, "                             \
    "COALESCE(started_ms, 0), COALESCE(finished_ms, 0), lease_timeout_ms, ttl_s, error, "          \
    "input_location, output_location, callback_url, cancel_requested, kind, batch_id, worker, "    \
    "extra_attempts, tenant"
#define N_JOB_COLUMNS 21
/* The job in row `row` of `r`, its columns JOB_COLUMNS from column `c0`. NULL: no memory. */
struct job *pg_job_from_row(const PGresult *r, int row, int c0);
/* Rows changed by the command of `r`. */
long pg_changed(const PGresult *r);
/* Notes that job `id` became `state` (NOTIFY inferd_final, on_final after the commit). */
void pg_note_final(struct pg_txn *t, const char *id, enum job_state state);
/* Ends attempt `attempt` of job `id` in its history, with `error` (NULL: the job's own). */
int pg_attempt_ended(struct pg_txn *t, const char *id, uint64_t attempt, const char *error,
                     struct err *e);

int pg_op_enqueue(struct pg_txn *t, struct queue_op *o);
/* Enqueues `n` operations without idempotency keys in one statement; as pg_op_enqueue each. */
int pg_ops_enqueue(struct pg_txn *t, struct queue_op **ops, size_t n, struct err *e);
int pg_op_lease(struct pg_txn *t, struct queue_op *o);
int pg_op_extend(struct pg_txn *t, struct queue_op *o);
int pg_op_complete(struct pg_txn *t, struct queue_op *o);
/* Completes `n` operations (distinct jobs) in one statement; as pg_op_complete each. */
int pg_ops_complete(struct pg_txn *t, struct queue_op **ops, size_t n, struct err *e);
int pg_op_fail(struct pg_txn *t, struct queue_op *o);
int pg_op_cancel(struct pg_txn *t, struct queue_op *o);
int pg_op_retry(struct pg_txn *t, struct queue_op *o);
int pg_op_worker_beat(struct pg_txn *t, struct queue_op *o);
int pg_op_worker_leave(struct pg_txn *t, struct queue_op *o);
/* Inserts a queued job (batch tasks too). */
int pg_insert_job(struct pg_txn *t, const struct job_spec *s, const char *id, struct err *e);
/* Loads one job; `lock` takes its row lock (FOR UPDATE). ERR_NOT_FOUND when absent. */
int pg_load_job(struct pg_queue *q, PGconn *c, const char *id, int lock, struct job **out,
                struct err *e);
int pg_load_history(struct pg_queue *q, PGconn *c, struct job *j);
/* A job just became final: its note, its webhook, its batch job; in the transaction. */
int pg_job_became_final(struct pg_txn *t, const char *id, struct err *e);

/* ---- sweep.c ---- */

/* The sweeper's round: ttls, leases, dead workers, retention. In the transaction of `t`. */
int pg_sweep(struct pg_txn *t, int64_t now, int retain, struct err *e);
int pg_workers_list(struct queue *qb, struct queue_worker **out, size_t *n, struct err *e);

/* ---- reads.c ---- */

int pg_get(struct queue *qb, const char *id, int want_result, struct job **out, struct err *e);
int pg_list(struct queue *qb, const struct queue_list_filter *f, struct job **out, size_t *n,
            struct err *e);
int pg_counts(struct queue *qb, int64_t counts[JOB_N_STATES], struct err *e);
int64_t pg_queued(struct queue *qb);

/* ---- outbox.c ---- */

/* Stores the webhook of job `j` (final, with a callback) in the transaction. */
int pg_outbox_add(struct pg_txn *t, const char *job_id, const char *event_id, const char *url,
                  const char *body, size_t body_len, struct err *e);
int pg_op_outbox_record(struct pg_txn *t, struct queue_op *o);
int pg_outbox_due(struct queue *qb, int64_t now_ms, size_t max, struct queue_outbox_item **out,
                  size_t *n, struct err *e);
int64_t pg_outbox_next_due(struct queue *qb);
/* The job's webhook attempts, into j->notifications. */
int pg_load_notifications(struct pg_queue *q, PGconn *c, struct job *j);

/* ---- batch.c ---- */

int pg_op_batch_create(struct pg_txn *t, struct queue_op *o);
int pg_op_batch_cancel(struct pg_txn *t, struct queue_op *o);
int pg_op_batch_pause(struct pg_txn *t, struct queue_op *o);
int pg_op_batch_progress(struct pg_txn *t, struct queue_op *o);
/* A batch task or finishing job became final (from pg_job_became_final). */
int pg_batch_task_final(struct pg_txn *t, const struct job *j, struct err *e);
/* A task was leased: its run is running. */
int pg_batch_task_started(struct pg_txn *t, const char *batch_id, int64_t now, struct err *e);
int pg_batch_get(struct queue *qb, const char *id, struct batch_job **out, struct err *e);
int pg_batch_list(struct queue *qb, const struct queue_batch_filter *f, struct batch_job **out,
                  size_t *n, struct err *e);
int pg_batch_results(struct queue *qb, const char *id, char **model, char ***results, size_t *n,
                     struct err *e);
int pg_schedules_due(struct queue *qb, int64_t now_ms, struct queue_schedule **out, size_t *n,
                     struct err *e);
int pg_batch_definition(struct queue *qb, const char *id, struct queue_schedule **out,
                        struct err *e);

#endif
