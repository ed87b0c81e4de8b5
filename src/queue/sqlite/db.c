/*
 * db.c: the SQLite queue's database: small helpers (statements, errors, rows), the schema and
 * its migrations, opening (with recovery of what a dead owner held) and closing.
 *
 * The store as a whole: one SQLite database in WAL mode. A job moves queued -> running ->
 * final; a lease that is not extended expires and the job becomes eligible again. Committing
 * the INSERT before the 202, and counting the attempt when it is leased, is crash safety here;
 * the fencing token (the attempt number) keeps a stalled attempt from overwriting the one that
 * replaced it. Every write goes through the writer thread (writer.c); reads use their own
 * connection (WAL readers never wait for the writer). Locks: see internal.h.
 */
#define _GNU_SOURCE
#include "queue/sqlite/internal.h"
#include "core/clock.h"
#include "core/log.h"

#include <errno.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>

/* ---- small helpers ---- */

/* ERR_FULL when the last failure on `db` was a full disk (or quota), ERR_IO otherwise. */
static int db_err_code(sqlite3 *db)
{
    int code = sqlite3_extended_errcode(db) & 0xff, sys = sqlite3_system_errno(db);

    if (code == SQLITE_FULL || (code == SQLITE_IOERR && (sys == ENOSPC || sys == EDQUOT)))
        return ERR_FULL;
    return ERR_IO;
}

int sq_db_err(sqlite3 *db, struct err *e, const char *what)
{
    return err_set(e, db_err_code(db), "job store: %s: %s", what, sqlite3_errmsg(db));
}

int sq_exec(sqlite3 *db, const char *sql, struct err *e)
{
    char *msg = NULL;
    int rc = 0;

    if (sqlite3_exec(db, sql, NULL, NULL, &msg) != SQLITE_OK) {
        rc = err_set(e, db_err_code(db), "job store: %s", msg ? msg : sqlite3_errmsg(db));
        sqlite3_free(msg);
    }
    return rc;
}

struct sqlite_queue *cache_owner; /* set at open: there is one queue per process */

/* A ready statement for `sql` on `db`, from the cache. Give it back with sq_finish(). */
sqlite3_stmt *sq_prepare(sqlite3 *db, const char *sql)
{
    struct sqlite_queue *q = cache_owner;
    sqlite3_stmt *st = NULL;
    int i;

    if (q) {
        pthread_mutex_lock(&q->cache_lock);
        for (i = 0; i < STMT_CACHE && q->cache[i].st; i++) {
            if (q->cache[i].db == db && q->cache[i].sql == sql) {
                st = q->cache[i].st;
                pthread_mutex_unlock(&q->cache_lock);
                return st;
            }
        }
        pthread_mutex_unlock(&q->cache_lock);
    }
    if (sqlite3_prepare_v3(db, sql, -1, SQLITE_PREPARE_PERSISTENT, &st, NULL) != SQLITE_OK)
        return NULL;
    if (q) {
        pthread_mutex_lock(&q->cache_lock);
        for (i = 0; i < STMT_CACHE && q->cache[i].st; i++)
            ;
        if (i < STMT_CACHE) {
            q->cache[i] = (struct stmt_cache_entry){.db = db, .sql = sql, .st = st};
            pthread_mutex_unlock(&q->cache_lock);
            return st;
        }
        pthread_mutex_unlock(&q->cache_lock);
    }
    return st; /* not cached: sq_finish() cannot tell, so it must not be used twice */
}

/* Gives a statement back to the cache (or finalizes one the cache could not hold). */
void sq_finish(sqlite3_stmt *st)
{
    struct sqlite_queue *q = cache_owner;

    if (!st)
        return;
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    if (q) {
        pthread_mutex_lock(&q->cache_lock);
        for (int i = 0; i < STMT_CACHE && q->cache[i].st; i++) {
            if (q->cache[i].st == st) {
                pthread_mutex_unlock(&q->cache_lock);
                return;
            }
        }
        pthread_mutex_unlock(&q->cache_lock);
    }
    sqlite3_finalize(st);
}

char *sq_col_strdup(sqlite3_stmt *st, int i)
{
    const unsigned char *s = sqlite3_column_text(st, i);

    return s ? strdup((const char *)s) : NULL;
}

struct job *sq_job_from_row(sqlite3_stmt *st)
{
    struct job *j = calloc(1, sizeof(*j));

    if (!j)
        return NULL;
    snprintf(j->id, sizeof(j->id), "%s", (const char *)sqlite3_column_text(st, 0));
    j->model = sq_col_strdup(st, 1);
    j->state = (enum job_state)sqlite3_column_int(st, 2);
    j->priority = sqlite3_column_int(st, 3);
    j->attempts = sqlite3_column_int(st, 4);
    j->max_attempts = sqlite3_column_int(st, 5);
    j->created_ms = sqlite3_column_int64(st, 6);
    j->started_ms = sqlite3_column_int64(st, 7);
    j->finished_ms = sqlite3_column_int64(st, 8);
    j->lease_timeout_ms = sqlite3_column_int64(st, 9);
    j->ttl_s = sqlite3_column_int64(st, 10);
    j->error = sq_col_strdup(st, 11);
    j->input_location = sq_col_strdup(st, 12);
    j->output_location = sq_col_strdup(st, 13);
    j->callback_url = sq_col_strdup(st, 14);
    j->cancel_requested = sqlite3_column_int(st, 15);
    j->kind = (enum job_kind)sqlite3_column_int(st, 16);
    if (sqlite3_column_text(st, 17))
        snprintf(j->batch_id, sizeof(j->batch_id), "%s", sqlite3_column_text(st, 17));
    j->worker = sq_col_strdup(st, 18);
    j->attempts_uncounted = sqlite3_column_int(st, 19);
    if (queue_tenant_set(&j->tenant, (const char *)sqlite3_column_text(st, 20)) != 0) {
        job_free(j);
        return NULL;
    }
    j->token = (uint64_t)j->attempts;
    j->input_json_len = -1;
    j->result_json_len = -1;
    return j;
}

/* Loads one job with `db`. ERR_NOT_FOUND when absent. */
int sq_load_job(sqlite3 *db, const char *id, struct job **out, struct err *e)
{
    sqlite3_stmt *st = sq_prepare(db, "SELECT " JOB_COLUMNS " FROM jobs WHERE id = ?");
    int rc;

    *out = NULL;
    if (!st)
        return sq_db_err(db, e, "prepare");
    sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        *out = sq_job_from_row(st);
        rc = *out ? 0 : err_set(e, ERR_NOMEM, "out of memory");
    } else if (rc == SQLITE_DONE) {
        rc = err_set(e, ERR_NOT_FOUND, "no job '%.40s'", id);
    } else {
        rc = sq_db_err(db, e, "read job");
    }
    sq_finish(st);
    return rc;
}

/* ---- schema ---- */

/* The jobs table, by name: migrate_tenants() rebuilds an older one as this very table. */
#define JOBS_TABLE(name)                                                                           \
    "CREATE TABLE IF NOT EXISTS " name " ("                                                        \
    " seq INTEGER PRIMARY KEY,"                                                                    \
    " id TEXT NOT NULL UNIQUE,"                                                                    \
    " model TEXT NOT NULL,"                                                                        \
    " state INTEGER NOT NULL,"                                                                     \
    " priority INTEGER NOT NULL,"                                                                  \
    " attempts INTEGER NOT NULL DEFAULT 0,"                                                        \
    " max_attempts INTEGER NOT NULL,"                                                              \
    " created_ms INTEGER NOT NULL,"                                                                \
    " started_ms INTEGER, finished_ms INTEGER,"                                                    \
    " expires_ms INTEGER NOT NULL DEFAULT 0,"                                                      \
    " available_ms INTEGER NOT NULL DEFAULT 0,"                                                    \
    " lease_until_ms INTEGER NOT NULL DEFAULT 0,"                                                  \
    " lease_timeout_ms INTEGER NOT NULL,"                                                          \
    " ttl_s INTEGER NOT NULL DEFAULT 0,"                                                           \
    " worker TEXT,"                                                                                \
    " cancel_requested INTEGER NOT NULL DEFAULT 0,"                                                \
    " input BLOB, input_json_len INTEGER NOT NULL DEFAULT -1,"                                     \
    " input_location TEXT, output_location TEXT, callback_url TEXT,"                               \
    " result BLOB, result_json_len INTEGER NOT NULL DEFAULT -1,"                                   \
    " error TEXT,"                                                                                 \
    " idem_key TEXT, request_hash TEXT," /* unique per tenant: jobs_idem */                        \
    " kind INTEGER NOT NULL DEFAULT 0, batch_id TEXT, object TEXT,"                                \
    " extra_attempts INTEGER NOT NULL DEFAULT 0,"                                                  \
    " tenant TEXT NOT NULL DEFAULT '');" /* "": the anonymous tenant */

static const char schema[] = JOBS_TABLE(
    "jobs") "CREATE INDEX IF NOT EXISTS jobs_ready ON jobs(priority DESC, seq) WHERE state = 0;"
            "CREATE INDEX IF NOT EXISTS jobs_expiring ON jobs(expires_ms) WHERE state = 0 AND "
            " expires_ms > 0;"
            "CREATE INDEX IF NOT EXISTS jobs_leased ON jobs(lease_until_ms) WHERE state = 1;"
            "CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, seq);"
            "CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(finished_ms) WHERE state >= 2;"
            "CREATE TABLE IF NOT EXISTS outbox ("
            " id INTEGER PRIMARY KEY,"
            " event_id TEXT NOT NULL UNIQUE,"
            " job_id TEXT NOT NULL,"
            " url TEXT NOT NULL,"
            " body BLOB NOT NULL,"
            " attempts INTEGER NOT NULL DEFAULT 0,"
            " next_ms INTEGER NOT NULL,"
            " done INTEGER NOT NULL DEFAULT 0,"
            " delivered INTEGER NOT NULL DEFAULT 0);"
            "CREATE INDEX IF NOT EXISTS outbox_due ON outbox(next_ms) WHERE done = 0;"
            "CREATE INDEX IF NOT EXISTS outbox_job ON outbox(job_id);"
            "CREATE TABLE IF NOT EXISTS deliveries ("
            " outbox_id INTEGER NOT NULL, job_id TEXT NOT NULL, event_id TEXT NOT NULL,"
            " at_ms INTEGER NOT NULL, http_status INTEGER NOT NULL, error TEXT);"
            "CREATE INDEX IF NOT EXISTS deliveries_job ON deliveries(job_id);"
            /* every attempt of a job, kept across attempts and redrives (attempts_history) */
            "CREATE TABLE IF NOT EXISTS attempts ("
            " job_id TEXT NOT NULL, attempt INTEGER NOT NULL, started_ms INTEGER NOT NULL,"
            " ended_ms INTEGER, worker TEXT, error TEXT, PRIMARY KEY (job_id, attempt));"
            "CREATE TRIGGER IF NOT EXISTS attempts_go_with_job AFTER DELETE ON jobs BEGIN"
            " DELETE FROM attempts WHERE job_id = old.id; END;"
            /* the worker processes and their heartbeats (queue_worker_beat) */
            "CREATE TABLE IF NOT EXISTS workers ("
            " id TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL,"
            " started_ms INTEGER NOT NULL, heartbeat_ms INTEGER NOT NULL, timeout_ms INTEGER NOT "
            "NULL,"
            " jobs_running INTEGER NOT NULL DEFAULT 0);";

/* Indexes on the tenant column, made after migrate_tenants() (an older table lacks it):
 * idempotency keys are unique per tenant, and a tenant's listing walks its own jobs and batch
 * jobs newest first, never the whole table. */
static const char tenant_indexes[] =
    "CREATE UNIQUE INDEX IF NOT EXISTS jobs_idem ON jobs(tenant, idem_key) "
    " WHERE idem_key IS NOT NULL;"
    "CREATE INDEX IF NOT EXISTS jobs_tenant ON jobs(tenant, seq);"
    "CREATE INDEX IF NOT EXISTS batch_tenant ON batch_jobs(tenant, seq);";

/* 1 when `table` has `column`; -1 on error. Not cached: it runs at open only. */
static int has_column(sqlite3 *db, const char *table, const char *column)
{
    sqlite3_stmt *st = NULL;
    int has;

    if (sqlite3_prepare_v2(db, "SELECT 1 FROM pragma_table_info(?) WHERE name = ?", -1, &st,
                           NULL) != SQLITE_OK)
        return -1;
    sqlite3_bind_text(st, 1, table, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, column, -1, SQLITE_STATIC);
    has = sqlite3_step(st) == SQLITE_ROW;
    sqlite3_finalize(st);
    return has;
}

/*
 * Gives a store made before tenants its tenant columns: everything in it belongs to the
 * anonymous tenant. The jobs table is rebuilt, in one transaction, because its idempotency
 * keys were unique across the whole table (a column constraint SQLite cannot drop) and are
 * now unique per tenant; batch_jobs only gains the column.
 */
static int migrate_tenants(sqlite3 *db, struct err *e)
{
    sqlite3_stmt *st = NULL;
    char *cols = NULL, *sql = NULL;
    int jobs_has = has_column(db, "jobs", "tenant"),
        batch_has = has_column(db, "batch_jobs", "tenant");
    int rc = 0;

    if (jobs_has < 0 || batch_has < 0)
        return sq_db_err(db, e, "read schema");
    if (!batch_has)
        rc = sq_exec(db, "ALTER TABLE batch_jobs ADD COLUMN tenant TEXT NOT NULL DEFAULT '';", e);
    if (rc != 0 || jobs_has)
        return rc;
    log_info("queue",
             "adding tenants to an older job store: its jobs belong to the anonymous "
             "tenant",
             "table=%s", "jobs");
    if (sqlite3_prepare_v2(db, "SELECT group_concat(name, ', ') FROM pragma_table_info('jobs')", -1,
                           &st, NULL) != SQLITE_OK)
        return sq_db_err(db, e, "read schema");
    if (sqlite3_step(st) == SQLITE_ROW)
        cols = sq_col_strdup(st, 0);
    sqlite3_finalize(st);
    if (!cols)
        return err_set(e, ERR_NOMEM, "out of memory");
    if (asprintf(&sql,
                 "BEGIN IMMEDIATE;"
                 "DROP TABLE IF EXISTS jobs_tenants;" JOBS_TABLE(
                     "jobs_tenants") "INSERT INTO jobs_tenants (%s) SELECT %s FROM jobs;"
                                     "DROP TABLE jobs;"
                                     "ALTER TABLE jobs_tenants RENAME TO jobs;"
                                     "COMMIT;",
                 cols, cols) < 0) {
        free(cols);
        return err_set(e, ERR_NOMEM, "out of memory");
    }
    rc = sq_exec(db, sql, e);
    if (rc != 0)
        sq_exec(db, "ROLLBACK", &(struct err){0});
    free(sql);
    free(cols);
    /* the indexes and the trigger went with the old table */
    if (rc == 0)
        rc = sq_exec(db, schema, e);
    return rc ? rc : sq_exec(db, sq_batch_schema, e);
}

/* Adds the job columns that databases made by earlier versions lack. */
static int migrate_jobs(sqlite3 *db, struct err *e)
{
    sqlite3_stmt *st = NULL;
    int has = 0;

    /* not cached: it runs once */
    if (sqlite3_prepare_v2(db,
                           "SELECT 1 FROM pragma_table_info('jobs') WHERE name = "
                           "'extra_attempts'",
                           -1, &st, NULL) != SQLITE_OK)
        return sq_db_err(db, e, "read schema");
    has = sqlite3_step(st) == SQLITE_ROW;
    sqlite3_finalize(st);
    if (has)
        return 0;
    log_info("queue", "adding attempt-budget columns to an older job store", "table=%s", "jobs");
    return sq_exec(db, "ALTER TABLE jobs ADD COLUMN extra_attempts INTEGER NOT NULL DEFAULT 0;", e);
}

static int open_db(const char *path, sqlite3 **out, struct err *e)
{
    sqlite3 *db = NULL;
    int rc;

    *out = NULL;
    if (sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX,
                        NULL) != SQLITE_OK) {
        rc = err_set(e, ERR_IO, "job store %s: %s", path, db ? sqlite3_errmsg(db) : "cannot open");
        sqlite3_close(db);
        return rc;
    }
    sqlite3_busy_timeout(db, 5000);
    rc = sq_exec(db, "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA cache_size=-65536;",
                 e);
    if (rc != 0) {
        sqlite3_close(db);
        return rc;
    }
    *out = db;
    return 0;
}

/* ---- open and close ---- */

static void sq_close(struct queue *qb)
{
    struct sqlite_queue *q = sq_of(qb);

    queue_writer_stop(&q->w);
    pthread_join(q->writer, NULL);
    cache_owner = NULL;
    for (int i = 0; i < STMT_CACHE && q->cache[i].st; i++)
        sqlite3_finalize(q->cache[i].st);
    pthread_mutex_destroy(&q->cache_lock);
    sqlite3_close(q->wdb);
    sqlite3_close(q->rdb);
    queue_writer_release(&q->w);
    pthread_mutex_destroy(&q->read_lock);
    free(q);
}

static const struct queue_ops sqlite_ops = {
    .jobs = &sqlite_job_ops,
    .batch = &sqlite_batch_ops,
    .outbox = &sqlite_outbox_ops,
    .close = sq_close,
};

/* The previous owner died holding these: run them again now (single owner: nobody else can). */
static int recover(struct sqlite_queue *q, struct err *e)
{
    sqlite3_stmt *st;
    int rc;

    /* its workers are gone with it; their attempts ended with it */
    rc = sq_exec(q->wdb,
                 "DELETE FROM workers;"
                 "UPDATE attempts SET ended_ms = CAST(strftime('%s', 'now') AS INTEGER) * 1000, "
                 "error = 'the process running it died' WHERE ended_ms IS NULL AND job_id IN "
                 "(SELECT id FROM jobs WHERE state = 1)",
                 e);
    if (rc == 0)
        rc = sq_exec(q->wdb,
                     "UPDATE jobs SET state = 0, available_ms = 0 WHERE state = 1 AND "
                     "attempts - extra_attempts < max_attempts",
                     e);
    if (rc == 0 && sqlite3_changes(q->wdb) > 0)
        log_warn("queue", "requeued jobs a previous process left running", "jobs=%d",
                 sqlite3_changes(q->wdb));
    /* the rest ran their last attempt: failed, through the final-state hook (webhooks,
     * batch jobs) */
    while (rc == 0) {
        char id[40] = "";
        st = sq_prepare(q->wdb, "SELECT id FROM jobs WHERE state = 1 LIMIT 1");
        if (!st)
            return sq_db_err(q->wdb, e, "recover");
        if (sqlite3_step(st) == SQLITE_ROW)
            snprintf(id, sizeof(id), "%s", sqlite3_column_text(st, 0));
        sq_finish(st);
        if (!id[0])
            break;
        st = sq_prepare(q->wdb, "UPDATE jobs SET state = 3, finished_ms = ?, error = 'the process "
                                "running its last attempt died' WHERE id = ?");
        if (!st)
            return sq_db_err(q->wdb, e, "recover");
        sqlite3_bind_int64(st, 1, clock_now_ms());
        sqlite3_bind_text(st, 2, id, -1, SQLITE_STATIC);
        rc = sqlite3_step(st) == SQLITE_DONE ? 0 : sq_db_err(q->wdb, e, "recover");
        sq_finish(st);
        if (rc == 0)
            rc = sq_job_became_final(q, id, e);
    }
    if (rc != 0)
        return rc;
    st = sq_prepare(q->wdb, "SELECT COUNT(*) FROM jobs WHERE state = 0");
    if (!st)
        return sq_db_err(q->wdb, e, "count");
    if (sqlite3_step(st) == SQLITE_ROW)
        q->n_queued = sqlite3_column_int64(st, 0);
    atomic_store(&q->n_queued_committed, q->n_queued);
    sq_finish(st);
    return 0;
}

int queue_sqlite_open(const struct queue_config *cfg, struct queue **out, struct err *e)
{
    struct sqlite_queue *q;
    char path[4096];
    int rc;

    *out = NULL;
    if (mkdir(cfg->data_dir, 0755) != 0 && errno != EEXIST)
        return err_set(e, ERR_IO, "--data-dir %s: %s", cfg->data_dir, strerror(errno));
    snprintf(path, sizeof(path), "%s/inferd.db", cfg->data_dir);
    q = calloc(1, sizeof(*q));
    if (!q)
        return err_set(e, ERR_NOMEM, "out of memory");
    q->base.ops = &sqlite_ops;
    q->cfg = *cfg;
    queue_writer_init(&q->w, MAX_GROUP, SWEEP_INTERVAL_MS);
    q->base.writer = &q->w;
    pthread_mutex_init(&q->read_lock, NULL);
    pthread_mutex_init(&q->cache_lock, NULL);
    cache_owner = q;
    rc = open_db(path, &q->wdb, e);
    if (rc == 0)
        rc = sq_exec(q->wdb, schema, e);
    if (rc == 0)
        rc = migrate_jobs(q->wdb, e);
    if (rc == 0)
        rc = sq_batch_migrate(q->wdb, e);
    if (rc == 0)
        rc = migrate_tenants(q->wdb, e);
    if (rc == 0)
        rc = sq_exec(q->wdb, tenant_indexes, e);
    if (rc == 0) /* the writer's scratch list of jobs past their retention (retain()) */
        rc = sq_exec(q->wdb, "CREATE TEMP TABLE IF NOT EXISTS retired(id TEXT PRIMARY KEY)", e);
    if (rc == 0)
        rc = sq_exec(q->wdb, "BEGIN IMMEDIATE", e);
    if (rc == 0) {
        rc = recover(q, e);
        if (sq_exec(q->wdb, rc == 0 ? "COMMIT" : "ROLLBACK", e) != 0 && rc == 0)
            rc = e->code;
    }
    if (rc == 0)
        rc = open_db(path, &q->rdb, e);
    if (rc == 0 && pthread_create(&q->writer, NULL, sq_writer_main, q) != 0)
        rc = err_set(e, ERR_NOMEM, "cannot start the job store's writer thread");
    if (rc != 0) {
        cache_owner = NULL;
        for (int i = 0; i < STMT_CACHE && q->cache[i].st; i++)
            sqlite3_finalize(q->cache[i].st);
        sqlite3_close(q->wdb);
        sqlite3_close(q->rdb);
        free(q);
        return rc;
    }
    *out = &q->base;
    return 0;
}
