/*
 * internal.h: what the SQLite queue's files share (db.c, writer.c, jobs.c, outbox.c,
 * workers.c, batch.c, schedules.c). Included by src/queue/sqlite/ only.
 */
#ifndef INFERD_SQLITE_INTERNAL_H
#define INFERD_SQLITE_INTERNAL_H

#include "queue/queue_internal.h"
#include "queue/writer.h"

#include <pthread.h>
#include <sqlite3.h>

#define MAX_GROUP 512              /* operations per transaction */
#define SWEEP_INTERVAL_MS 100      /* how often expired ttls and leases are looked for */
#define RETAIN_INTERVAL_MS 1000    /* how often finished jobs past --result-ttl-s are removed */
#define RETAIN_MAX 1000            /* at most this many per pass (more come at the next sweep) */
#define RETAIN_RUNS_MAX 16         /* batch runs per pass: each takes its tasks with it */
#define SLOW_COMMIT_MS 500         /* commits slower than this are logged */
#define STORE_FAILING_LOG_MS 60000 /* while commits keep failing, a reminder this often */

struct final_note {
    char id[40];
    enum job_state state;
    struct final_note *next;
};

/* Prepared statements, kept for the connection's life: preparing costs more than running. */
#define STMT_CACHE 128
struct stmt_cache_entry {
    sqlite3 *db;
    const char *sql; /* a string literal: compared by address */
    sqlite3_stmt *st;
};

struct sqlite_queue {
    struct queue base;
    struct stmt_cache_entry cache[STMT_CACHE]; /* writer's entries: writer thread; reader's:
                                                  under read_lock */
    pthread_mutex_t cache_lock;                /* guards adding entries */
    struct queue_config cfg;
    sqlite3 *wdb; /* writer thread only */
    sqlite3 *rdb; /* guarded by read_lock */
    pthread_mutex_t read_lock;

    struct queue_writer w; /* the operations for the writer thread, its lock and wake-ups */
    int64_t n_queued;      /* writer thread only: jobs in state queued, as its transaction
                              sees them (an operation undone takes its count back) */
    _Atomic int64_t n_queued_committed; /* n_queued after the last commit: what
                                           queue_queued() shows, read by any thread */
    pthread_t writer;
    int64_t last_sweep_ms;       /* writer thread only */
    int64_t next_retain_ms;      /* writer thread only */
    struct final_note *finals;   /* writer thread only: notes of this group, sent after commit */
    int64_t failing_since_ms;    /* writer thread only: commits fail since; 0 while they work */
    int64_t last_failed_ms;      /* writer thread only: when a commit last failed; 0: never */
    int64_t next_failing_log_ms; /* writer thread only */
    int64_t n_failed_groups;     /* writer thread only: in this run of failures */
};

static inline struct sqlite_queue *sq_of(struct queue *q)
{
    return (struct sqlite_queue *)q;
}

/* ---- helpers (db.c) ---- */

extern struct sqlite_queue *cache_owner; /* the one queue of this process */

/* A ready statement for `sql` (a string literal) on `db`, from the cache; give it back with
 * sq_finish(). NULL on error. */
sqlite3_stmt *sq_prepare(sqlite3 *db, const char *sql);
void sq_finish(sqlite3_stmt *st);
int sq_exec(sqlite3 *db, const char *sql, struct err *e);
int sq_db_err(sqlite3 *db, struct err *e, const char *what);
char *sq_col_strdup(sqlite3_stmt *st, int i);
int sq_load_job(sqlite3 *db, const char *id, struct job **out, struct err *e);
/* Inserts a queued job (writer thread); counts it in n_queued. */
int sq_insert_job(struct sqlite_queue *q, const struct job_spec *s, const char *id, struct err *e);
/* A job just became final: wakes its waiters, stores its webhook, and for a batch task
 * updates its batch job, all in the current transaction. */
int sq_job_became_final(struct sqlite_queue *q, const char *id, struct err *e);

/* ---- the store's tables (jobs.c, schedules.c, outbox.c) and threads (writer.c) ---- */

extern const struct queue_job_ops sqlite_job_ops;
extern const struct queue_batch_ops sqlite_batch_ops;
extern const struct queue_outbox_ops sqlite_outbox_ops;
/* The writer thread (`q`): runs every write, in groups, until q->w stops. */
void *sq_writer_main(void *q);

/* The columns sq_job_from_row() reads, in order. */
#define JOB_COLUMNS                                                                                \
    "id, model, state, priority, attempts, max_attempts, created_ms, "                             \
    "COALESCE(started_ms, 0), COALESCE(finished_ms, 0), lease_timeout_ms, ttl_s, error, "          \
    "input_location, output_location, callback_url, cancel_requested, kind, batch_id, worker, "    \
    "extra_attempts, tenant"

/* ---- operations and calls the files share ---- */

/* Ends attempt `attempt` of job `id` in the attempts table (writer thread). */
int sq_attempt_ended(struct sqlite_queue *q, const char *id, uint64_t attempt, const char *error,
                     struct err *e);
/* Fills j->history from the attempts table. */
int sq_load_history(sqlite3 *db, struct job *j);

int sq_attempt_lost(struct sqlite_queue *q, const char *id, const char *why, int64_t now);
int sq_op_cancel(struct sqlite_queue *q, struct queue_op *o);
int sq_op_complete(struct sqlite_queue *q, struct queue_op *o);
int sq_op_enqueue(struct sqlite_queue *q, struct queue_op *o);
int sq_op_extend(struct sqlite_queue *q, struct queue_op *o);
int sq_op_fail(struct sqlite_queue *q, struct queue_op *o);
int sq_op_lease(struct sqlite_queue *q, struct queue_op *o);
int sq_op_outbox_record(struct sqlite_queue *q, struct queue_op *o);
int sq_op_retry(struct sqlite_queue *q, struct queue_op *o);
int sq_op_worker_beat(struct sqlite_queue *q, struct queue_op *o);
int sq_workers_list(struct queue *qb, struct queue_worker **out, size_t *n, struct err *e);
struct job *sq_job_from_row(sqlite3_stmt *st);
void sq_reap_dead_workers(struct sqlite_queue *q, int64_t now);
void sq_reap_worker(struct sqlite_queue *q, const char *wid, const char *why, int64_t now);

/* ---- batch jobs (batch.c, schedules.c) ---- */

extern const char sq_batch_schema[];
/* Adds columns that databases made by earlier versions lack. */
int sq_batch_migrate(sqlite3 *db, struct err *e);
/* A batch job's state and whether it is a schedule (writer thread); ERR_NOT_FOUND names it. */
int sq_batch_state(struct sqlite_queue *q, struct queue_op *o, int *state, int *is_schedule);
/* A batch job, with a schedule's latest runs, read with `db`: a new array of one. */
int sq_load_batch(sqlite3 *db, const char *id, struct batch_job **out, struct err *e);
int sq_op_batch_create(struct sqlite_queue *q, struct queue_op *o);
int sq_op_batch_cancel(struct sqlite_queue *q, struct queue_op *o);
/* Called by sq_job_became_final for batch tasks and finishing jobs. */
int sq_batch_task_final(struct sqlite_queue *q, const struct job *j, struct err *e);
/* A task was leased: its run is running. */
int sq_batch_task_started(struct sqlite_queue *q, const char *batch_id, int64_t now, struct err *e);
int sq_batch_get(struct queue *qb, const char *id, struct batch_job **out, struct err *e);
int sq_batch_list(struct queue *qb, const struct queue_batch_filter *f, struct batch_job **out,
                  size_t *n, struct err *e);
int sq_batch_results(struct queue *qb, const char *id, char **model, char ***results, size_t *n,
                     struct err *e);
int sq_schedules_due(struct queue *qb, int64_t now_ms, struct queue_schedule **out, size_t *n,
                     struct err *e);
int sq_op_batch_pause(struct sqlite_queue *q, struct queue_op *o);
int sq_op_batch_progress(struct sqlite_queue *q, struct queue_op *o);
int sq_batch_definition(struct queue *qb, const char *id, struct queue_schedule **out,
                        struct err *e);

#endif
