/*
 * queue_sqlite.c: the embedded job queue, one SQLite database in WAL mode.
 *
 * A job moves queued -> running -> final; a lease that is not extended expires and the job
 * becomes eligible again. Committing the INSERT before the 202, and counting the attempt when
 * it is leased, is crash safety here; the fencing token (the attempt number) keeps a stalled
 * attempt from overwriting the one that replaced it.
 *
 * Group commit: every write goes through one writer thread. Callers queue an operation and
 * wait; the writer takes everything queued, runs it in one transaction (one SAVEPOINT per
 * operation, so one failing operation does not undo the others), commits with one fsync
 * (synchronous=FULL) and wakes the callers. Under load, hundreds of operations share one fsync.
 * Reads use their own connection: WAL readers never wait for the writer.
 *
 * Locks: `lock` guards the operation list and the wake-ups; `read_lock` guards the read
 * connection. Never both.
 */
#define _GNU_SOURCE
#include "queue/sqlite_internal.h"
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

int64_t queue_now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Time-ordered ids: 12 hex digits of milliseconds, then 12 random hex digits. */
void sq_new_id(char out[40])
{
    unsigned char rnd[6] = {0};
    int64_t now = queue_now_ms();

    if (getrandom(rnd, sizeof(rnd), 0) != (ssize_t)sizeof(rnd)) {
        for (size_t i = 0; i < sizeof(rnd); i++)
            rnd[i] = (unsigned char)rand();
    }
    snprintf(out, 40, "%012llx%02x%02x%02x%02x%02x%02x", (unsigned long long)now, rnd[0], rnd[1],
             rnd[2], rnd[3], rnd[4], rnd[5]);
}

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

#define JOB_COLUMNS                                                                                \
    "id, model, state, priority, attempts, max_attempts, created_ms, "                             \
    "COALESCE(started_ms, 0), COALESCE(finished_ms, 0), lease_timeout_ms, ttl_s, error, "          \
    "input_location, output_location, callback_url, cancel_requested, kind, batch_id, worker, "    \
    "extra_attempts"

static struct job *job_from_row(sqlite3_stmt *st)
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
        *out = job_from_row(st);
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

static const char schema[] =
    "CREATE TABLE IF NOT EXISTS jobs ("
    " seq INTEGER PRIMARY KEY,"
    " id TEXT NOT NULL UNIQUE,"
    " model TEXT NOT NULL,"
    " state INTEGER NOT NULL,"
    " priority INTEGER NOT NULL,"
    " attempts INTEGER NOT NULL DEFAULT 0,"
    " max_attempts INTEGER NOT NULL,"
    " created_ms INTEGER NOT NULL,"
    " started_ms INTEGER, finished_ms INTEGER,"
    " expires_ms INTEGER NOT NULL DEFAULT 0,"
    " available_ms INTEGER NOT NULL DEFAULT 0,"
    " lease_until_ms INTEGER NOT NULL DEFAULT 0,"
    " lease_timeout_ms INTEGER NOT NULL,"
    " ttl_s INTEGER NOT NULL DEFAULT 0,"
    " worker TEXT,"
    " cancel_requested INTEGER NOT NULL DEFAULT 0,"
    " input BLOB, input_json_len INTEGER NOT NULL DEFAULT -1,"
    " input_location TEXT, output_location TEXT, callback_url TEXT,"
    " result BLOB, result_json_len INTEGER NOT NULL DEFAULT -1,"
    " error TEXT,"
    " idem_key TEXT UNIQUE, request_hash TEXT,"
    " kind INTEGER NOT NULL DEFAULT 0, batch_id TEXT, object TEXT,"
    " extra_attempts INTEGER NOT NULL DEFAULT 0);"
    "CREATE INDEX IF NOT EXISTS jobs_ready ON jobs(priority DESC, seq) WHERE state = 0;"
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
    " started_ms INTEGER NOT NULL, heartbeat_ms INTEGER NOT NULL, timeout_ms INTEGER NOT NULL,"
    " jobs_running INTEGER NOT NULL DEFAULT 0);";

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
    rc = sq_exec(db, "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA cache_size=-65536;", e);
    if (rc != 0) {
        sqlite3_close(db);
        return rc;
    }
    *out = db;
    return 0;
}

/* ---- finals and the outbox (writer thread) ---- */

static void sq_note_final(struct sqlite_queue *q, const char *id, enum job_state state)
{
    struct final_note *n = calloc(1, sizeof(*n));

    if (!n)
        return; /* long-polls then wait for their deadline: no correctness depends on this */
    snprintf(n->id, sizeof(n->id), "%s", id);
    n->state = state;
    n->next = q->finals;
    q->finals = n;
}

static int load_history(sqlite3 *db, struct job *j);

/* A job just became final: note it, and store its webhook in the same transaction. */
int sq_job_became_final(struct sqlite_queue *q, const char *id, struct err *e)
{
    struct job *j = NULL;
    struct buf body = {0};
    sqlite3_stmt *st = NULL;
    char event_id[48];
    int rc;

    rc = sq_load_job(q->wdb, id, &j, e);
    if (rc != 0)
        goto cleanup;
    sq_note_final(q, id, j->state);
    if (j->kind != JOB_KIND_INFER) {
        rc = sq_batch_task_final(q, j, e); /* the batch job, not the task, has a webhook */
        goto cleanup;
    }
    if (!j->callback_url || !j->callback_url[0])
        goto cleanup;
    /* the event id is fixed here, so every repeat of this webhook carries the same one; a
     * job sent back to the queue ends again with more attempts, and that is a new event */
    snprintf(event_id, sizeof(event_id), "evt_%s_%d", j->id, j->attempts);
    if (j->state == JOB_SUCCEEDED && !j->output_location) {
        sqlite3_stmt *rs = sq_prepare(q->wdb, "SELECT result, result_json_len FROM jobs WHERE id = ?");
        if (rs) {
            sqlite3_bind_text(rs, 1, id, -1, SQLITE_STATIC);
            if (sqlite3_step(rs) == SQLITE_ROW) {
                buf_append(&j->result, sqlite3_column_blob(rs, 0),
                           (size_t)sqlite3_column_bytes(rs, 0));
                j->result_json_len = sqlite3_column_int64(rs, 1);
            }
            sq_finish(rs);
        }
    }
    if (load_history(q->wdb, j) != 0) /* the event's job shows its attempts too */
        log_warn("queue", "a webhook's job lacks its attempts", "job=%s", id);
    rc = queue_event_json(j, event_id, q->cfg.result_inline_max_bytes, &body);
    if (rc != 0) {
        rc = err_set(e, ERR_NOMEM, "out of memory building a webhook");
        goto cleanup;
    }
    st = sq_prepare(q->wdb, "INSERT OR IGNORE INTO outbox (event_id, job_id, url, body, next_ms) "
                         "VALUES (?, ?, ?, ?, ?)");
    if (!st) {
        rc = sq_db_err(q->wdb, e, "prepare outbox");
        goto cleanup;
    }
    sqlite3_bind_text(st, 1, event_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, j->callback_url, -1, SQLITE_STATIC);
    sqlite3_bind_blob(st, 4, body.data, (int)body.len, SQLITE_STATIC);
    sqlite3_bind_int64(st, 5, queue_now_ms());
    if (sqlite3_step(st) != SQLITE_DONE)
        rc = sq_db_err(q->wdb, e, "store webhook");
cleanup:
    sq_finish(st);
    buf_release(&body);
    job_free(j);
    return rc;
}

/* ---- operations (writer thread, inside the group's transaction) ---- */

/* Ends attempt `attempt` of job `id` in its history, with `error` (NULL: it succeeded). */
static int attempt_ended(struct sqlite_queue *q, const char *id, uint64_t attempt,
                         const char *error, struct err *e)
{
    /* no error given: the job's own (set when a cancel ended it; NULL when it succeeded) */
    sqlite3_stmt *st = sq_prepare(q->wdb, "UPDATE attempts SET ended_ms = ?1, error = COALESCE("
                                          "?2, (SELECT error FROM jobs WHERE id = ?3)) WHERE "
                                          "job_id = ?3 AND attempt = ?4 AND ended_ms IS NULL");
    int rc = 0;

    if (!st)
        return sq_db_err(q->wdb, e, "prepare");
    sqlite3_bind_int64(st, 1, queue_now_ms());
    sqlite3_bind_text(st, 2, error, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 4, (int64_t)attempt);
    if (sqlite3_step(st) != SQLITE_DONE)
        rc = sq_db_err(q->wdb, e, "record attempt");
    sq_finish(st);
    return rc;
}

static int op_enqueue(struct sqlite_queue *q, struct op *o)
{
    const struct job_spec *s = o->spec;
    sqlite3_stmt *st = NULL;
    int rc = 0;

    if (s->idempotency_key) {
        st = sq_prepare(q->wdb, "SELECT id, request_hash FROM jobs WHERE idem_key = ?");
        if (!st)
            return sq_db_err(q->wdb, &o->err, "prepare");
        sqlite3_bind_text(st, 1, s->idempotency_key, -1, SQLITE_STATIC);
        if (sqlite3_step(st) == SQLITE_ROW) {
            const char *hash = (const char *)sqlite3_column_text(st, 1);
            snprintf(o->id_out, sizeof(o->id_out), "%s", sqlite3_column_text(st, 0));
            if (!hash || !s->request_hash || strcmp(hash, s->request_hash) != 0)
                rc = err_set(&o->err, ERR_CONFLICT,
                             "Idempotency-Key '%.64s' was used for another request (job %s)",
                             s->idempotency_key, o->id_out);
            o->existed = 1;
        }
        sq_finish(st);
        st = NULL;
        if (o->existed)
            return rc;
    }
    if (q->n_queued >= q->cfg.max_queued)
        return err_set(&o->err, ERR_BUSY, "the queue holds %lld jobs, the limit (--max-queue)",
                       (long long)q->n_queued);
    sq_new_id(o->id_out);
    return sq_insert_job(q, s, o->id_out, &o->err);
}

int sq_insert_job(struct sqlite_queue *q, const struct job_spec *s, const char *id, struct err *e)
{
    int64_t now = queue_now_ms();
    sqlite3_stmt *st;
    int rc = 0;

    st = sq_prepare(q->wdb,
                 "INSERT INTO jobs (id, model, state, priority, max_attempts, created_ms, "
                 "expires_ms, lease_timeout_ms, ttl_s, input, input_json_len, input_location, "
                 "output_location, callback_url, idem_key, request_hash, kind, batch_id) "
                 "VALUES (?, ?, 0, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)");
    if (!st)
        return sq_db_err(q->wdb, e, "prepare");
    sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, s->model, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 3, s->priority);
    sqlite3_bind_int(st, 4, s->max_attempts);
    sqlite3_bind_int64(st, 5, now);
    sqlite3_bind_int64(st, 6, s->ttl_s > 0 ? now + s->ttl_s * 1000 : 0);
    sqlite3_bind_int64(st, 7, s->lease_timeout_ms);
    sqlite3_bind_int64(st, 8, s->ttl_s);
    if (s->input)
        sqlite3_bind_blob(st, 9, s->input, (int)s->input_len, SQLITE_STATIC);
    sqlite3_bind_int64(st, 10, s->input_json_len);
    sqlite3_bind_text(st, 11, s->input_location, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 12, s->output_location, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 13, s->callback_url, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 14, s->idempotency_key, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 15, s->request_hash, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 16, (int)s->kind);
    sqlite3_bind_text(st, 17, s->batch_id, -1, SQLITE_STATIC);
    if (sqlite3_step(st) != SQLITE_DONE)
        rc = sq_db_err(q->wdb, e, "insert job");
    sq_finish(st);
    if (rc == 0)
        q->n_queued++;
    return rc;
}

/* Leases job `id`, the `index`-th of this lease, into `*out` (NULL on failure). */
static int lease_one(struct sqlite_queue *q, struct op *o, const char *id, size_t index,
                     int64_t now, struct job **out)
{
    sqlite3_stmt *st;
    char wid[96];
    int rc = 0;

    *out = NULL;
    queue_worker_id_of(o->worker, wid);
    st = sq_prepare(q->wdb, "UPDATE jobs SET state = 1, attempts = attempts + 1, "
                         "started_ms = COALESCE(started_ms, ?), lease_until_ms = ? + "
                         "lease_timeout_ms, worker = ? WHERE id = ?");
    if (!st)
        return sq_db_err(q->wdb, &o->err, "prepare");
    sqlite3_bind_int64(st, 1, now);
    sqlite3_bind_int64(st, 2, now);
    sqlite3_bind_text(st, 3, wid, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 4, id, -1, SQLITE_STATIC);
    if (sqlite3_step(st) != SQLITE_DONE)
        rc = sq_db_err(q->wdb, &o->err, "lease");
    sq_finish(st);
    if (rc == 0) {
        st = sq_prepare(q->wdb, "INSERT OR REPLACE INTO attempts (job_id, attempt, started_ms, "
                                "worker) SELECT id, attempts, ?, worker FROM jobs WHERE id = ?");
        if (!st)
            return sq_db_err(q->wdb, &o->err, "prepare");
        sqlite3_bind_int64(st, 1, now);
        sqlite3_bind_text(st, 2, id, -1, SQLITE_STATIC);
        if (sqlite3_step(st) != SQLITE_DONE)
            rc = sq_db_err(q->wdb, &o->err, "record attempt");
        sq_finish(st);
    }
    if (rc != 0)
        return rc;
    q->n_queued--;
    rc = sq_load_job(q->wdb, id, out, &o->err);
    if (rc == 0 && (*out)->batch_id[0])
        rc = sq_batch_task_started(q, (*out)->batch_id, now, &o->err);
    if (rc == 0 &&
        !(st = sq_prepare(q->wdb, "SELECT input, input_json_len FROM jobs WHERE id = ?")))
        rc = sq_db_err(q->wdb, &o->err, "prepare");
    if (rc == 0) {
        sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
        if (sqlite3_step(st) == SQLITE_ROW) {
            if (buf_append(&(*out)->input, sqlite3_column_blob(st, 0),
                           (size_t)sqlite3_column_bytes(st, 0)) != 0)
                rc = err_set(&o->err, ERR_NOMEM, "out of memory");
            (*out)->input_json_len = sqlite3_column_int64(st, 1);
        }
        sq_finish(st);
    }
    if (rc == 0 && queue_fault("lease", index))
        rc = err_set(&o->err, ERR_IO, "job store: lease of job %s: injected fault", id);
    if (rc != 0) { /* the op is rolled back: this job was not leased */
        job_free(*out);
        *out = NULL;
    }
    return rc;
}

/* Leases up to o->max runnable jobs, highest priority first, FIFO within a priority. */
static int op_lease(struct sqlite_queue *q, struct op *o)
{
    int64_t now = queue_now_ms();
    sqlite3_stmt *st;
    char(*ids)[40] = calloc(o->max, 40);
    size_t n = 0;
    int rc = 0;

    if (!ids)
        return err_set(&o->err, ERR_NOMEM, "out of memory");
    st = sq_prepare(
        q->wdb,
        "SELECT id, kind FROM jobs INDEXED BY jobs_ready WHERE state = 0 AND available_ms <= ? AND "
        "(expires_ms = 0 OR expires_ms > ?) ORDER BY priority DESC, seq LIMIT ?");
    if (!st) {
        free(ids);
        return sq_db_err(q->wdb, &o->err, "prepare");
    }
    sqlite3_bind_int64(st, 1, now);
    sqlite3_bind_int64(st, 2, now);
    sqlite3_bind_int64(st, 3, (int64_t)o->max);
    /* a batch task runs for long: at most one per lease (none when the worker runs one), so
     * the others wait for a free worker */
    int tasks = 0;
    while (n < o->max && sqlite3_step(st) == SQLITE_ROW) {
        if (sqlite3_column_int(st, 1) != JOB_KIND_INFER && tasks++ >= o->max_tasks)
            continue;
        snprintf(ids[n++], 40, "%s", sqlite3_column_text(st, 0));
    }
    sq_finish(st);
    for (size_t i = 0; rc == 0 && i < n; i++) {
        rc = lease_one(q, o, ids[i], i, now, &o->jobs[o->n_jobs]);
        if (rc == 0)
            o->n_jobs++;
    }
    free(ids);
    return rc;
}

/* Runs `sql` (binding id, then token) and says whether the attempt still held its lease. */
static int fenced_update(struct sqlite_queue *q, struct op *o, sqlite3_stmt *st)
{
    int rc = 0;

    if (!st)
        return sq_db_err(q->wdb, &o->err, "prepare");
    if (sqlite3_step(st) != SQLITE_DONE)
        rc = sq_db_err(q->wdb, &o->err, "update job");
    else if (sqlite3_changes(q->wdb) == 0)
        rc = err_set(&o->err, ERR_CONFLICT,
                     "job %s: attempt %llu no longer holds the lease; its result is discarded",
                     o->id, (unsigned long long)o->token);
    sq_finish(st);
    return rc;
}

static int op_extend(struct sqlite_queue *q, struct op *o)
{
    sqlite3_stmt *st = sq_prepare(q->wdb, "UPDATE jobs SET lease_until_ms = ? WHERE id = ? AND "
                                       "state = 1 AND attempts = ?");

    if (st) {
        sqlite3_bind_int64(st, 1, queue_now_ms() + o->lease_ms);
        sqlite3_bind_text(st, 2, o->id, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 3, (int64_t)o->token);
    }
    return fenced_update(q, o, st);
}

static int op_complete(struct sqlite_queue *q, struct op *o)
{
    /* a job cancelled while it ran ends cancelled and its result is discarded */
    sqlite3_stmt *st = sq_prepare(
        q->wdb, "UPDATE jobs SET state = CASE WHEN cancel_requested THEN 4 ELSE 2 END, "
                "result = CASE WHEN cancel_requested THEN NULL ELSE ? END, result_json_len = ?, "
                "finished_ms = ?, error = CASE WHEN cancel_requested THEN 'cancelled while "
                "running; result discarded' ELSE NULL END, input = NULL "
                "WHERE id = ? AND state = 1 AND attempts = ?");
    int rc;

    if (st) {
        if (o->data)
            sqlite3_bind_blob(st, 1, o->data, (int)o->data_len, SQLITE_STATIC);
        sqlite3_bind_int64(st, 2, o->json_len);
        sqlite3_bind_int64(st, 3, queue_now_ms());
        sqlite3_bind_text(st, 4, o->id, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 5, (int64_t)o->token);
    }
    rc = fenced_update(q, o, st);
    if (rc == 0)
        rc = attempt_ended(q, o->id, o->token, NULL, &o->err);
    return rc ? rc : sq_job_became_final(q, o->id, &o->err);
}

static int op_fail(struct sqlite_queue *q, struct op *o)
{
    int64_t now = queue_now_ms(), backoff = q->cfg.retry_backoff_ms;
    struct job *j = NULL;
    sqlite3_stmt *st;
    int final, rc;

    rc = sq_load_job(q->wdb, o->id, &j, &o->err);
    if (rc != 0)
        return rc;
    if (j->state != JOB_RUNNING || (uint64_t)j->attempts != o->token) {
        job_free(j);
        return err_set(&o->err, ERR_CONFLICT, "job %s: attempt %llu no longer holds the lease",
                       o->id, (unsigned long long)o->token);
    }
    /* released by a worker's shutdown: again at once, with one more attempt to make up */
    final =
        j->cancel_requested ||
        (!o->released && (!o->retryable || j->attempts - j->attempts_uncounted >= j->max_attempts));
    int end_state = j->cancel_requested ? JOB_CANCELLED : final ? JOB_FAILED : JOB_QUEUED;
    for (int i = 1; i < j->attempts - j->attempts_uncounted && backoff < MAX_BACKOFF_MS; i++)
        backoff *= 2;
    if (backoff > MAX_BACKOFF_MS)
        backoff = MAX_BACKOFF_MS;
    if (o->retry_after_ms > backoff) /* the model said when (an upstream's Retry-After) */
        backoff = o->retry_after_ms;
    if (o->released)
        backoff = 0;
    job_free(j);
    /* a failed job keeps its input: POST /v1/jobs/{id}/retry sends it back */
    st = sq_prepare(q->wdb, "UPDATE jobs SET state = ?1, error = ?2, finished_ms = ?3, "
                            "available_ms = ?4, extra_attempts = extra_attempts + ?8 WHERE id = ?6 "
                            "AND state = 1 AND attempts = ?7 AND ?5 IS NOT NULL");
    if (st) {
        sqlite3_bind_int(st, 1, end_state);
        sqlite3_bind_text(st, 2, o->data, -1, SQLITE_STATIC);
        if (final)
            sqlite3_bind_int64(st, 3, now);
        else
            sqlite3_bind_null(st, 3);
        sqlite3_bind_int64(st, 4, now + backoff);
        sqlite3_bind_int(st, 5, final);
        sqlite3_bind_text(st, 6, o->id, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 7, (int64_t)o->token);
        sqlite3_bind_int(st, 8, o->released && !final ? 1 : 0);
    }
    rc = fenced_update(q, o, st);
    if (rc == 0)
        rc = attempt_ended(q, o->id, o->token, o->data ? o->data : "failed", &o->err);
    if (rc != 0)
        return rc;
    o->failed_final = end_state == JOB_FAILED;
    if (!final) {
        q->n_queued++;
        return 0;
    }
    return sq_job_became_final(q, o->id, &o->err);
}

static int op_cancel(struct sqlite_queue *q, struct op *o)
{
    struct job *j = NULL;
    sqlite3_stmt *st;
    int rc;

    rc = sq_load_job(q->wdb, o->id, &j, &o->err);
    if (rc != 0)
        return rc;
    if (job_state_is_final(j->state)) {
        rc =
            err_set(&o->err, ERR_CONFLICT, "job %s is already %s", o->id, job_state_name(j->state));
        job_free(j);
        return rc;
    }
    if (j->state == JOB_QUEUED) {
        st = sq_prepare(q->wdb, "UPDATE jobs SET state = 4, finished_ms = ?1, input = NULL, "
                             "error = 'cancelled' WHERE id = ?2 AND state = 0");
        q->n_queued--;
    } else {
        st = sq_prepare(q->wdb, "UPDATE jobs SET cancel_requested = 1 WHERE id = ?2 AND state = 1 "
                             "AND ?1 IS NOT NULL");
    }
    job_free(j);
    if (!st)
        return sq_db_err(q->wdb, &o->err, "prepare");
    sqlite3_bind_int64(st, 1, queue_now_ms());
    sqlite3_bind_text(st, 2, o->id, -1, SQLITE_STATIC);
    if (sqlite3_step(st) != SQLITE_DONE)
        rc = sq_db_err(q->wdb, &o->err, "cancel");
    sq_finish(st);
    if (rc == 0)
        rc = sq_load_job(q->wdb, o->id, &o->job, &o->err);
    if (rc == 0 && o->job->state == JOB_CANCELLED)
        rc = sq_job_became_final(q, o->id, &o->err);
    return rc;
}

static int op_retry(struct sqlite_queue *q, struct op *o)
{
    sqlite3_stmt *st = sq_prepare(
        q->wdb, "UPDATE jobs SET state = 0, extra_attempts = attempts, "
                "available_ms = 0, finished_ms = NULL, expires_ms = 0, error = NULL "
                "WHERE id = ? AND state IN (3, 5) AND (input IS NOT NULL OR input_location IS "
                "NOT NULL)");
    int rc = 0;

    if (!st)
        return sq_db_err(q->wdb, &o->err, "prepare");
    sqlite3_bind_text(st, 1, o->id, -1, SQLITE_STATIC);
    if (sqlite3_step(st) != SQLITE_DONE)
        rc = sq_db_err(q->wdb, &o->err, "retry");
    else if (sqlite3_changes(q->wdb) == 0)
        rc = ERR_CONFLICT;
    sq_finish(st);
    if (rc == ERR_CONFLICT) {
        struct job *j = NULL;
        rc = sq_load_job(q->wdb, o->id, &j, &o->err);
        if (rc == 0)
            rc = err_set(&o->err, ERR_CONFLICT,
                         "job %s is %s; only failed or expired jobs are "
                         "sent back to the queue",
                         o->id, job_state_name(j->state));
        job_free(j);
        return rc;
    }
    if (rc == 0) {
        q->n_queued++;
        rc = sq_load_job(q->wdb, o->id, &o->job, &o->err);
    }
    return rc;
}

static int op_outbox_record(struct sqlite_queue *q, struct op *o)
{
    const struct queue_outbox_attempt *a = o->attempt;
    sqlite3_stmt *st = sq_prepare(q->wdb, "INSERT INTO deliveries (outbox_id, job_id, event_id, "
                                       "at_ms, http_status, error) SELECT id, job_id, event_id, "
                                       "?, ?, ? FROM outbox WHERE id = ?");
    int rc = 0;

    if (!st)
        return sq_db_err(q->wdb, &o->err, "prepare");
    sqlite3_bind_int64(st, 1, a->at_ms);
    sqlite3_bind_int(st, 2, a->http_status);
    sqlite3_bind_text(st, 3, a->error, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 4, a->outbox_id);
    if (sqlite3_step(st) != SQLITE_DONE)
        rc = sq_db_err(q->wdb, &o->err, "record delivery");
    sq_finish(st);
    if (rc != 0)
        return rc;
    st = sq_prepare(q->wdb, "UPDATE outbox SET attempts = attempts + 1, done = ?, delivered = ?, "
                         "next_ms = ? WHERE id = ?");
    if (!st)
        return sq_db_err(q->wdb, &o->err, "prepare");
    sqlite3_bind_int(st, 1, a->done);
    sqlite3_bind_int(st, 2, a->delivered);
    sqlite3_bind_int64(st, 3, a->next_attempt_ms);
    sqlite3_bind_int64(st, 4, a->outbox_id);
    if (sqlite3_step(st) != SQLITE_DONE)
        rc = sq_db_err(q->wdb, &o->err, "record delivery");
    sq_finish(st);
    return rc;
}

/*
 * A running attempt is lost (its lease ran out, or its worker is presumed dead): it counts,
 * and the job runs again at once, or fails when that was its last attempt. The attempt's late
 * outcome is fenced out: the next lease makes another attempt number. Writer thread.
 */
static int attempt_lost(struct sqlite_queue *q, const char *id, const char *why, int64_t now)
{
    struct job *j = NULL;
    struct err e;
    sqlite3_stmt *st;
    int exhausted, rc;

    if (sq_load_job(q->wdb, id, &j, &e) != 0)
        return -1;
    if (j->state != JOB_RUNNING) {
        job_free(j);
        return -1;
    }
    exhausted = j->attempts - j->attempts_uncounted >= j->max_attempts;
    st = sq_prepare(q->wdb, exhausted ? "UPDATE jobs SET state = 3, finished_ms = ?1, error = ?3 "
                                        "|| ' on the last attempt' WHERE id = ?2 AND state = 1"
                                      : "UPDATE jobs SET state = 0, available_ms = ?1, error = "
                                        "?3 WHERE id = ?2 AND state = 1");
    rc = st ? 0 : -1;
    if (st) {
        sqlite3_bind_int64(st, 1, now);
        sqlite3_bind_text(st, 2, id, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 3, why, -1, SQLITE_STATIC);
        rc = sqlite3_step(st) == SQLITE_DONE ? 0 : -1;
        sq_finish(st);
    }
    if (rc == 0)
        attempt_ended(q, id, (uint64_t)j->attempts, why, &e);
    if (rc == 0 && exhausted) {
        log_warn("queue", "job failed",
                 "job=%s model=%s attempts=%d error=\"%s on the last "
                 "attempt\"",
                 id, j->model, j->attempts, why);
        sq_job_became_final(q, id, &e);
    } else if (rc == 0)
        q->n_queued++;
    job_free(j);
    return rc;
}

/* The running jobs of worker `wid` are lost (`why`), and it leaves the workers table. */
static void reap_worker(struct sqlite_queue *q, const char *wid, const char *why, int64_t now)
{
    sqlite3_stmt *st;
    char ids[64][40];
    int n = 0;

    st = sq_prepare(q->wdb, "SELECT id FROM jobs WHERE state = 1 AND worker = ? LIMIT 64");
    if (st) {
        sqlite3_bind_text(st, 1, wid, -1, SQLITE_STATIC);
        while (n < 64 && sqlite3_step(st) == SQLITE_ROW)
            snprintf(ids[n++], 40, "%s", sqlite3_column_text(st, 0));
        sq_finish(st);
    }
    for (int i = 0; i < n && !sqlite3_get_autocommit(q->wdb); i++)
        attempt_lost(q, ids[i], why, now);
    if (n == 64)
        return; /* more: the next sweep goes on before the worker leaves */
    st = sq_prepare(q->wdb, "DELETE FROM workers WHERE id = ?");
    if (st) {
        sqlite3_bind_text(st, 1, wid, -1, SQLITE_STATIC);
        sqlite3_step(st);
        sq_finish(st);
    }
    if (n > 0)
        log_warn("queue", "worker gone; its running jobs are queued again",
                 "worker=%s jobs=%d "
                 "reason=\"%s\"",
                 wid, n, why);
}

/* Workers silent past their timeout are presumed dead: their running jobs run again now. Not
 * while the store could not take their beats: each gets a whole timeout of commits that work
 * (a full disk stops every beat, and their kept outcomes must not be fenced out for it). */
static void reap_dead_workers(struct sqlite_queue *q, int64_t now)
{
    sqlite3_stmt *st = sq_prepare(q->wdb, "SELECT id, (?1 - heartbeat_ms) / 1000 FROM workers "
                                          "WHERE heartbeat_ms + timeout_ms <= ?1 AND "
                                          "?2 + timeout_ms <= ?1 LIMIT 8");
    char wids[8][96], why[8][128];
    int n = 0;

    if (!st || sqlite3_get_autocommit(q->wdb)) {
        sq_finish(st);
        return;
    }
    sqlite3_bind_int64(st, 1, now);
    sqlite3_bind_int64(st, 2, q->last_failed_ms);
    while (n < 8 && sqlite3_step(st) == SQLITE_ROW) {
        snprintf(wids[n], sizeof(wids[n]), "%s", sqlite3_column_text(st, 0));
        snprintf(why[n], sizeof(why[n]), "its worker %.95s sent no heartbeat for %lld s", wids[n],
                 (long long)sqlite3_column_int64(st, 1));
        n++;
    }
    sq_finish(st);
    for (int i = 0; i < n && !sqlite3_get_autocommit(q->wdb); i++)
        reap_worker(q, wids[i], why[i], now);
}

/* Expires queued jobs past their ttl and requeues (or fails) running jobs past their lease. */
static void sweep(struct sqlite_queue *q, int64_t now)
{
    sqlite3_stmt *st;
    struct err e;
    char ids[64][40];
    int n = 0;

    st = sq_prepare(
        q->wdb,
        "SELECT id FROM jobs INDEXED BY jobs_expiring WHERE state = 0 AND expires_ms > 0 AND "
        "expires_ms <= ? LIMIT 64");
    if (st) {
        sqlite3_bind_int64(st, 1, now);
        while (n < 64 && sqlite3_step(st) == SQLITE_ROW)
            snprintf(ids[n++], 40, "%s", sqlite3_column_text(st, 0));
        sq_finish(st);
    }
    /* each step checks the transaction still stands: after SQLite rolled it back (a full
     * disk), a statement would commit on its own, without the rest of its change */
    for (int i = 0; i < n && !sqlite3_get_autocommit(q->wdb); i++) {
        st = sq_prepare(q->wdb, "UPDATE jobs SET state = 5, finished_ms = ?, error = "
                             "'its ttl passed before a worker started it' WHERE id = ?");
        if (!st)
            break;
        sqlite3_bind_int64(st, 1, now);
        sqlite3_bind_text(st, 2, ids[i], -1, SQLITE_STATIC);
        if (sqlite3_step(st) == SQLITE_DONE) {
            q->n_queued--;
            sq_job_became_final(q, ids[i], &e);
        }
        sq_finish(st);
    }
    /* a lease that ran out: the attempt is lost; count it and go again (or give up) */
    n = 0;
    st = sq_prepare(q->wdb, "SELECT id FROM jobs INDEXED BY jobs_leased WHERE state = 1 AND "
                            "lease_until_ms <= ? LIMIT 64");
    if (st && !sqlite3_get_autocommit(q->wdb)) {
        sqlite3_bind_int64(st, 1, now);
        while (n < 64 && sqlite3_step(st) == SQLITE_ROW)
            snprintf(ids[n++], 40, "%s", sqlite3_column_text(st, 0));
        sq_finish(st);
    }
    for (int i = 0; i < n && !sqlite3_get_autocommit(q->wdb); i++)
        if (attempt_lost(q, ids[i], "its lease expired", now) == 0)
            log_warn("queue", "lease expired", "job=%s", ids[i]);
    reap_dead_workers(q, now);
}

/* Removes inference jobs that finished more than --result-ttl-s ago, with their webhook
 * records, at most RETAIN_MAX per call; a job whose webhook is still being delivered stays.
 * Returns how many went. (Batch jobs' tasks stay with their batch job.) */
static int retain(struct sqlite_queue *q, int64_t now)
{
    static const char *const steps[] = {
        "DELETE FROM temp.retired",
        "INSERT INTO temp.retired SELECT id FROM jobs INDEXED BY jobs_finished WHERE state >= 2 "
        "AND finished_ms <= ?1 AND kind = 0 AND batch_id IS NULL AND NOT EXISTS (SELECT 1 FROM "
        "outbox WHERE outbox.job_id = jobs.id AND done = 0) ORDER BY finished_ms LIMIT ?2",
        "DELETE FROM deliveries WHERE job_id IN temp.retired",
        "DELETE FROM outbox WHERE job_id IN temp.retired",
        "DELETE FROM jobs WHERE id IN temp.retired",
    };
    int n = 0;

    for (size_t i = 0; i < sizeof(steps) / sizeof(steps[0]); i++) {
        sqlite3_stmt *st = sq_prepare(q->wdb, steps[i]);
        if (!st)
            return 0;
        if (i == 1) {
            sqlite3_bind_int64(st, 1, now - q->cfg.result_ttl_s * 1000);
            sqlite3_bind_int(st, 2, RETAIN_MAX);
        }
        int rc = sqlite3_step(st);
        if (i == 1)
            n = sqlite3_changes(q->wdb);
        sq_finish(st);
        if (rc != SQLITE_DONE || (i == 1 && n == 0))
            break;
    }
    if (n > 0)
        log_debug("queue", "finished jobs past their retention removed", "jobs=%d", n);
    return n;
}

static int op_worker_beat(struct sqlite_queue *q, struct op *o)
{
    const struct queue_worker *w = o->wk;
    sqlite3_stmt *st = sq_prepare(q->wdb, "INSERT INTO workers (id, host, pid, started_ms, "
                                          "heartbeat_ms, timeout_ms, jobs_running) VALUES (?1, ?2, "
                                          "?3, ?4, ?5, ?6, ?7) ON CONFLICT(id) DO UPDATE SET "
                                          "heartbeat_ms = ?5, timeout_ms = ?6, jobs_running = ?7");
    int rc = 0;

    if (!st)
        return sq_db_err(q->wdb, &o->err, "prepare");
    sqlite3_bind_text(st, 1, w->id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, w->host, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 3, w->pid);
    sqlite3_bind_int64(st, 4, w->started_ms);
    sqlite3_bind_int64(st, 5, queue_now_ms());
    sqlite3_bind_int64(st, 6, w->timeout_ms);
    sqlite3_bind_int(st, 7, w->jobs_running);
    if (sqlite3_step(st) != SQLITE_DONE)
        rc = sq_db_err(q->wdb, &o->err, "worker heartbeat");
    sq_finish(st);
    return rc;
}

static int run_op(struct sqlite_queue *q, struct op *o)
{
    switch (o->kind) {
    case OP_WORKER_BEAT:
        return op_worker_beat(q, o);
    case OP_WORKER_LEAVE:
        reap_worker(q, o->id, "its worker stopped", queue_now_ms());
        return 0;
    case OP_ENQUEUE:
        return op_enqueue(q, o);
    case OP_LEASE:
        return op_lease(q, o);
    case OP_EXTEND:
        return op_extend(q, o);
    case OP_COMPLETE:
        return op_complete(q, o);
    case OP_FAIL:
        return op_fail(q, o);
    case OP_CANCEL:
        return op_cancel(q, o);
    case OP_RETRY:
        return op_retry(q, o);
    case OP_OUTBOX_RECORD:
        return op_outbox_record(q, o);
    case OP_BATCH_CREATE:
        return sq_op_batch_create(q, o);
    case OP_BATCH_CANCEL:
        return sq_op_batch_cancel(q, o);
    case OP_BATCH_PAUSE:
        return sq_op_batch_pause(q, o);
    case OP_BATCH_PROGRESS:
        return sq_op_batch_progress(q, o);
    }
    return ERR_INVALID;
}

/* ---- the writer thread ---- */

/*
 * A group could not be made durable: log SQLite's own reason once per run of failures (a full
 * disk fails every commit until space is freed, and each would otherwise log a line), then a
 * reminder every STORE_FAILING_LOG_MS while it lasts.
 */
static void note_group_failed(struct sqlite_queue *q, const struct err *why, int64_t now)
{
    q->n_failed_groups++;
    q->last_failed_ms = now;
    if (q->failing_since_ms == 0) {
        q->failing_since_ms = now;
        q->next_failing_log_ms = now + STORE_FAILING_LOG_MS;
        log_error("queue", "job store cannot commit; writes fail until it can",
                  "data_dir=%s full=%s reason=\"%s\"", q->cfg.data_dir,
                  why->code == ERR_FULL ? "yes" : "no", why->msg);
    } else if (now >= q->next_failing_log_ms) {
        q->next_failing_log_ms = now + STORE_FAILING_LOG_MS;
        log_error("queue", "job store still cannot commit",
                  "data_dir=%s failed_commits=%lld for_s=%lld reason=\"%s\"", q->cfg.data_dir,
                  (long long)q->n_failed_groups, (long long)(now - q->failing_since_ms) / 1000,
                  why->msg);
    }
}

static void note_group_committed(struct sqlite_queue *q, int64_t now)
{
    if (q->failing_since_ms == 0)
        return;
    log_info("queue", "job store commits again", "failed_commits=%lld after_s=%lld",
             (long long)q->n_failed_groups, (long long)(now - q->failing_since_ms) / 1000);
    q->failing_since_ms = 0;
    q->n_failed_groups = 0;
}

/* SQLite ended the transaction itself (it may, on a full disk, an I/O error or out of
 * memory): nothing of the group stands, and nothing more may run, for it would commit on its
 * own. `e` gets the reason unless `why` (the failed operation's error) gives it. */
static int txn_lost(struct sqlite_queue *q, const struct op *why, struct err *e)
{
    if (!sqlite3_get_autocommit(q->wdb))
        return 0;
    if (why && why->rc != 0)
        *e = why->err;
    else
        sq_db_err(q->wdb, e, "transaction rolled back");
    return 1;
}

static void run_group(struct sqlite_queue *q, struct op *ops)
{
    struct err e = {0};
    int64_t queued_before = q->n_queued, now = queue_now_ms();
    int64_t changes_before = sqlite3_total_changes64(q->wdb);
    int ok;

    int n_ops = 0;
    for (struct op *o = ops; o; o = o->next)
        n_ops++;
    ok = sq_exec(q->wdb, "BEGIN IMMEDIATE", &e) == 0;
    for (struct op *o = ops; ok && o; o = o->next) {
        int64_t op_queued = q->n_queued;
        if (sq_exec(q->wdb, "SAVEPOINT op", &e) != 0) {
            ok = 0;
            break;
        }
        o->rc = run_op(q, o);
        if (txn_lost(q, o, &e)) {
            ok = 0;
            break;
        }
        if (o->rc != 0 && o->rc != ERR_CONFLICT) {
            if (sq_exec(q->wdb, "ROLLBACK TO op", &e) != 0) {
                ok = 0;
                break;
            }
            q->n_queued = op_queued; /* what the op counted was undone with it */
            if (o->kind == OP_ENQUEUE && o->rc != ERR_BUSY)
                o->existed = 0;
        }
        if (sq_exec(q->wdb, "RELEASE op", &e) != 0) {
            ok = 0;
            break;
        }
    }
    if (ok && now - q->last_sweep_ms >= SWEEP_INTERVAL_MS) {
        q->last_sweep_ms = now;
        sweep(q, now);
        if (q->cfg.result_ttl_s > 0 && now >= q->next_retain_ms && !txn_lost(q, NULL, &e))
            q->next_retain_ms = now + (retain(q, now) == RETAIN_MAX ? 0 : RETAIN_INTERVAL_MS);
        ok = !txn_lost(q, NULL, &e);
    }
    int64_t commit_start = queue_now_ms();
    if (ok)
        ok = sq_exec(q->wdb, "COMMIT", &e) == 0;
    int64_t commit_ms = queue_now_ms() - commit_start;
    if (commit_ms >= SLOW_COMMIT_MS)
        /* every submission waits on this: a slow disk shows here first */
        log_warn("queue", "slow commit", "ms=%lld operations=%d", (long long)commit_ms, n_ops);
    if (ok) {
        /* (a group that changed nothing writes nothing: it proves no disk has room again) */
        if (sqlite3_total_changes64(q->wdb) != changes_before)
            note_group_committed(q, commit_start);
        return;
    }
    /* nothing of this group is durable: every caller hears so, with SQLite's reason */
    if (!sqlite3_get_autocommit(q->wdb)) {
        struct err rb;
        sq_exec(q->wdb, "ROLLBACK", &rb);
    }
    note_group_failed(q, &e, commit_start);
    for (struct op *o = ops; o; o = o->next) {
        o->rc = e.code == ERR_FULL
                    ? err_set(&o->err, ERR_FULL,
                              "job store: the disk under --data-dir is full (%s); nothing was "
                              "stored, try again later",
                              sqlite3_errstr(SQLITE_FULL))
                    : err_set(&o->err, ERR_IO, "%s; nothing was stored", e.msg);
        job_free(o->job);
        o->job = NULL;
    }
    q->n_queued = queued_before;
    /* no job became final: nobody is to be woken */
    for (struct final_note *f = q->finals, *next; f; f = next) {
        next = f->next;
        free(f);
    }
    q->finals = NULL;
}

static void *writer_main(void *arg)
{
    struct sqlite_queue *q = arg;

    pthread_mutex_lock(&q->lock);
    for (;;) {
        struct op *ops, *last = NULL;
        struct final_note *finals, *next;
        int n = 0;
        int64_t queued_before;
        if (!q->head && !q->stopping) {
            struct timespec ts = clock_realtime_after_ms(SWEEP_INTERVAL_MS);
            pthread_cond_timedwait(&q->work, &q->lock, &ts);
        }
        if (!q->head && q->stopping)
            break;
        ops = q->head;
        for (struct op *o = ops; o && n < MAX_GROUP; o = o->next, n++)
            last = o;
        if (last) {
            q->head = last->next;
            if (!q->head)
                q->tail = NULL;
            last->next = NULL;
        }
        queued_before = q->n_queued;
        pthread_mutex_unlock(&q->lock);

        /* n_queued is only written by this thread; the lock orders it for readers */
        run_group(q, ops);
        finals = q->finals;
        q->finals = NULL;

        struct op *async_ops = NULL, **async_tail = &async_ops;
        pthread_mutex_lock(&q->lock);
        if (q->n_queued > queued_before || ops == NULL)
            q->generation++;
        for (struct op *o = ops, *o_next; o; o = o_next) {
            o_next = o->next;
            if (o->kind == OP_FAIL || o->kind == OP_RETRY || o->kind == OP_ENQUEUE)
                q->generation++;
            if (o->callback) {
                *async_tail = o;
                async_tail = &o->next;
                o->next = NULL;
            } else {
                o->done = 1; /* its caller may free it as soon as the lock is released */
            }
        }
        pthread_cond_broadcast(&q->finished);
        pthread_cond_broadcast(&q->runnable);
        pthread_mutex_unlock(&q->lock);
        for (struct op *o = async_ops, *o_next; o; o = o_next) {
            o_next = o->next;
            o->callback(o->callback_ctx, o->rc, &o->err, o->id_out, o->existed);
            free(o);
        }
        for (struct final_note *f = finals; f; f = next) {
            next = f->next;
            if (q->base.on_final)
                q->base.on_final(q->base.on_final_ctx, f->id, f->state);
            free(f);
        }
        pthread_mutex_lock(&q->lock);
    }
    pthread_mutex_unlock(&q->lock);
    return NULL;
}

/* Queues `o` for the writer and waits for its group to commit. */
int sq_submit(struct sqlite_queue *q, struct op *o)
{
    pthread_mutex_lock(&q->lock);
    if (q->stopping) {
        pthread_mutex_unlock(&q->lock);
        return err_set(&o->err, ERR_UNAVAILABLE, "the job store is closing");
    }
    o->next = NULL;
    if (q->tail)
        q->tail->next = o;
    else
        q->head = o;
    q->tail = o;
    pthread_cond_signal(&q->work);
    while (!o->done)
        pthread_cond_wait(&q->finished, &q->lock);
    pthread_mutex_unlock(&q->lock);
    return o->rc;
}

/* Queues every op of `ops` at once, so they share one commit, and waits for all of them. */
static void submit_many(struct sqlite_queue *q, struct op *ops, size_t n)
{
    pthread_mutex_lock(&q->lock);
    if (q->stopping) {
        pthread_mutex_unlock(&q->lock);
        for (size_t i = 0; i < n; i++)
            ops[i].rc = err_set(&ops[i].err, ERR_UNAVAILABLE, "the job store is closing");
        return;
    }
    for (size_t i = 0; i < n; i++) {
        ops[i].next = NULL;
        if (q->tail)
            q->tail->next = &ops[i];
        else
            q->head = &ops[i];
        q->tail = &ops[i];
    }
    pthread_cond_signal(&q->work);
    for (size_t i = 0; i < n; i++)
        while (!ops[i].done)
            pthread_cond_wait(&q->finished, &q->lock);
    pthread_mutex_unlock(&q->lock);
}

static struct sqlite_queue *sq(struct queue *q)
{
    return (struct sqlite_queue *)q;
}

static void copy_err(struct err *dst, const struct op *o)
{
    if (dst && o->rc != 0)
        *dst = o->err;
}

/* ---- the ops table ---- */

static int s_enqueue(struct queue *qb, const struct job_spec *spec, char id_out[40], int *existed,
                     struct err *e)
{
    struct op o = {.kind = OP_ENQUEUE, .spec = spec};
    int rc = sq_submit(sq(qb), &o);

    copy_err(e, &o);
    snprintf(id_out, 40, "%s", o.id_out);
    *existed = o.existed;
    return rc;
}

static int s_enqueue_async(struct queue *qb, const struct job_spec *spec, queue_enqueue_fn fn,
                           void *ctx, struct err *e)
{
    struct sqlite_queue *q = sq(qb);
    struct op *o = calloc(1, sizeof(*o));

    if (!o)
        return err_set(e, ERR_NOMEM, "out of memory");
    o->kind = OP_ENQUEUE;
    o->spec = spec;
    o->callback = fn;
    o->callback_ctx = ctx;
    pthread_mutex_lock(&q->lock);
    if (q->stopping) {
        pthread_mutex_unlock(&q->lock);
        free(o);
        return err_set(e, ERR_UNAVAILABLE, "the job store is closing");
    }
    if (q->tail)
        q->tail->next = o;
    else
        q->head = o;
    q->tail = o;
    pthread_cond_signal(&q->work);
    pthread_mutex_unlock(&q->lock);
    return 0;
}

static int s_lease_many(struct queue *qb, const char *worker, size_t max, int max_tasks,
                        int64_t wait_ms, struct job **out, size_t *n, struct err *e)
{
    struct sqlite_queue *q = sq(qb);
    int64_t until = queue_now_ms() + wait_ms;
    int rc;

    *n = 0;
    for (;;) {
        struct op o = {
            .kind = OP_LEASE, .worker = worker, .max = max, .max_tasks = max_tasks, .jobs = out};
        uint64_t gen;
        pthread_mutex_lock(&q->lock);
        gen = q->generation;
        pthread_mutex_unlock(&q->lock);
        rc = sq_submit(q, &o);
        if (rc != 0 || o.n_jobs) {
            if (rc != 0) {
                /* nothing of the group is durable: the leases did not happen */
                for (size_t i = 0; i < o.n_jobs; i++) {
                    job_free(out[i]);
                    out[i] = NULL;
                }
                o.n_jobs = 0;
            }
            copy_err(e, &o);
            *n = o.n_jobs;
            return rc;
        }
        int64_t now = queue_now_ms();
        if (now >= until)
            return 0;
        /* nothing runnable: sleep until something is enqueued or requeued, or a backoff or
         * sweep may have made a job runnable */
        int64_t nap = until - now < SWEEP_INTERVAL_MS ? until - now : SWEEP_INTERVAL_MS;
        struct timespec ts = clock_realtime_after_ms(nap);
        pthread_mutex_lock(&q->lock);
        while (q->generation == gen && !q->stopping &&
               pthread_cond_timedwait(&q->runnable, &q->lock, &ts) == 0)
            ;
        int stopping = q->stopping;
        pthread_mutex_unlock(&q->lock);
        if (stopping)
            return 0;
    }
}

static int s_lease(struct queue *qb, const char *worker, int64_t wait_ms, struct job **out,
                   struct err *e)
{
    size_t n = 0;

    *out = NULL;
    return s_lease_many(qb, worker, 1, 1, wait_ms, out, &n, e);
}

static int s_finish_many(struct queue *qb, struct queue_outcome *outs, size_t n, struct err *e)
{
    struct op *ops = calloc(n ? n : 1, sizeof(*ops));
    int rc = 0;

    if (!ops) {
        for (size_t i = 0; i < n; i++)
            outs[i].rc = ERR_NOMEM; /* none recorded */
        return err_set(e, ERR_NOMEM, "out of memory");
    }
    for (size_t i = 0; i < n; i++) {
        struct queue_outcome *oc = &outs[i];
        ops[i] = (struct op){.kind = oc->ok ? OP_COMPLETE : OP_FAIL,
                             .id = oc->id,
                             .token = oc->token,
                             .data = oc->ok ? oc->result : oc->error,
                             .data_len = oc->result_len,
                             .json_len = oc->result_json_len,
                             .retryable = oc->retryable || oc->released,
                             .retry_after_ms = oc->retry_after_ms,
                             .released = oc->released};
    }
    submit_many(sq(qb), ops, n);
    for (size_t i = 0; i < n; i++) {
        outs[i].rc = ops[i].rc;
        outs[i].failed_final = ops[i].rc == 0 && ops[i].failed_final;
        if (ops[i].rc != 0 && ops[i].rc != ERR_CONFLICT && rc == 0) {
            rc = ops[i].rc;
            copy_err(e, &ops[i]);
        }
    }
    free(ops);
    return rc;
}

static int s_extend(struct queue *qb, const char *id, uint64_t token, int64_t lease_ms,
                    struct err *e)
{
    struct op o = {.kind = OP_EXTEND, .id = id, .token = token, .lease_ms = lease_ms};
    int rc = sq_submit(sq(qb), &o);

    copy_err(e, &o);
    return rc;
}

static int s_complete(struct queue *qb, const char *id, uint64_t token, const char *result,
                      size_t len, int64_t json_len, struct err *e)
{
    struct op o = {.kind = OP_COMPLETE,
                   .id = id,
                   .token = token,
                   .data = result,
                   .data_len = len,
                   .json_len = json_len};
    int rc = sq_submit(sq(qb), &o);

    copy_err(e, &o);
    return rc;
}

static int s_fail(struct queue *qb, const char *id, uint64_t token, const char *error,
                  int retryable, struct err *e)
{
    struct op o = {
        .kind = OP_FAIL, .id = id, .token = token, .data = error, .retryable = retryable};
    int rc = sq_submit(sq(qb), &o);

    copy_err(e, &o);
    return rc;
}

static int s_cancel(struct queue *qb, const char *id, struct job **out, struct err *e)
{
    struct op o = {.kind = OP_CANCEL, .id = id};
    int rc = sq_submit(sq(qb), &o);

    copy_err(e, &o);
    *out = o.job;
    return rc;
}

static int s_retry(struct queue *qb, const char *id, struct job **out, struct err *e)
{
    struct op o = {.kind = OP_RETRY, .id = id};
    int rc = sq_submit(sq(qb), &o);

    copy_err(e, &o);
    *out = o.job;
    return rc;
}

static int s_outbox_record(struct queue *qb, const struct queue_outbox_attempt *a, struct err *e)
{
    struct op o = {.kind = OP_OUTBOX_RECORD, .attempt = a};
    int rc = sq_submit(sq(qb), &o);

    copy_err(e, &o);
    return rc;
}

/* ---- reads (their own connection) ---- */

static int load_notifications(sqlite3 *db, struct job *j)
{
    sqlite3_stmt *st = sq_prepare(db, "SELECT event_id, at_ms, http_status, error FROM deliveries "
                                   "WHERE job_id = ? ORDER BY at_ms");
    struct buf b = {0};
    int n = 0, rc = 0;

    if (!st)
        return ERR_IO;
    sqlite3_bind_text(st, 1, j->id, -1, SQLITE_STATIC);
    rc = buf_puts(&b, "[");
    while (rc == 0 && sqlite3_step(st) == SQLITE_ROW) {
        const char *err_text = (const char *)sqlite3_column_text(st, 3);
        rc = buf_printf(&b, "%s{\"event_id\":", n++ ? "," : "");
        if (rc == 0)
            rc = buf_json_string(&b, (const char *)sqlite3_column_text(st, 0));
        if (rc == 0)
            rc = buf_puts(&b, ",\"at\":");
        if (rc == 0)
            rc = queue_json_time(&b, sqlite3_column_int64(st, 1));
        if (rc == 0)
            rc = buf_printf(&b, ",\"status_code\":%d,\"error\":", sqlite3_column_int(st, 2));
        if (rc == 0)
            rc = err_text ? buf_json_string(&b, err_text) : buf_puts(&b, "null");
        if (rc == 0)
            rc = buf_puts(&b, "}");
    }
    sq_finish(st);
    if (rc == 0)
        rc = buf_puts(&b, "]");
    if (rc != 0) {
        buf_release(&b);
        return rc;
    }
    j->notifications_json = buf_take(&b);
    return 0;
}

/* Fills j->history from the attempts table. */
static int load_history(sqlite3 *db, struct job *j)
{
    sqlite3_stmt *st = sq_prepare(db, "SELECT attempt, started_ms, COALESCE(ended_ms, 0), worker, "
                                      "error FROM attempts WHERE job_id = ? ORDER BY attempt");
    int rc = 0;

    if (!st)
        return ERR_IO;
    sqlite3_bind_text(st, 1, j->id, -1, SQLITE_STATIC);
    while (rc == 0 && sqlite3_step(st) == SQLITE_ROW)
        rc = queue_job_add_attempt(
            j, sqlite3_column_int(st, 0), sqlite3_column_int64(st, 1), sqlite3_column_int64(st, 2),
            (const char *)sqlite3_column_text(st, 3), (const char *)sqlite3_column_text(st, 4));
    sq_finish(st);
    return rc;
}

static int s_get(struct queue *qb, const char *id, int want_result, struct job **out, struct err *e)
{
    struct sqlite_queue *q = sq(qb);
    int rc;

    pthread_mutex_lock(&q->read_lock);
    rc = sq_load_job(q->rdb, id, out, e);
    if (rc == 0 && want_result && (*out)->state == JOB_SUCCEEDED) {
        sqlite3_stmt *st = sq_prepare(q->rdb, "SELECT result, result_json_len FROM jobs WHERE id = ?");
        if (!st) {
            rc = sq_db_err(q->rdb, e, "prepare");
        } else {
            sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
            if (sqlite3_step(st) == SQLITE_ROW) {
                if (buf_append(&(*out)->result, sqlite3_column_blob(st, 0),
                               (size_t)sqlite3_column_bytes(st, 0)) != 0)
                    rc = err_set(e, ERR_NOMEM, "out of memory");
                (*out)->result_json_len = sqlite3_column_int64(st, 1);
            }
            sq_finish(st);
        }
    }
    if (rc == 0 && load_notifications(q->rdb, *out) != 0)
        rc = sq_db_err(q->rdb, e, "read notifications");
    if (rc == 0 && load_history(q->rdb, *out) != 0)
        rc = sq_db_err(q->rdb, e, "read attempts");
    pthread_mutex_unlock(&q->read_lock);
    if (rc != 0) {
        job_free(*out);
        *out = NULL;
    }
    return rc;
}

static int s_list(struct queue *qb, const struct queue_list_filter *f, struct job **out,
                  size_t *n, struct err *e)
{
    struct sqlite_queue *q = sq(qb);
    sqlite3_stmt *st;
    int rc = 0;

    pthread_mutex_lock(&q->read_lock);
    st = sq_prepare(q->rdb, "SELECT " JOB_COLUMNS
                            " FROM jobs WHERE kind = 0 AND (?1 < 0 OR state = ?1) AND "
                            "(?2 IS NULL OR model = ?2) AND (?3 IS NULL OR seq < (SELECT seq FROM "
                            "jobs WHERE id = ?3)) AND (?5 < 0 OR cancel_requested = ?5) "
                            "ORDER BY seq DESC LIMIT ?4");
    if (!st) {
        rc = sq_db_err(q->rdb, e, "prepare");
        goto cleanup;
    }
    sqlite3_bind_int(st, 1, f->state);
    sqlite3_bind_text(st, 2, f->model, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, f->cursor, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 4, f->limit);
    sqlite3_bind_int(st, 5, f->state == JOB_RUNNING ? f->cancelling : -1);
    while (rc == 0 && (int)*n < f->limit && sqlite3_step(st) == SQLITE_ROW) {
        struct job *j = job_from_row(st);
        if (!j) {
            rc = err_set(e, ERR_NOMEM, "out of memory");
            break;
        }
        out[(*n)++] = j;
        if (load_notifications(q->rdb, j) != 0 || load_history(q->rdb, j) != 0)
            rc = sq_db_err(q->rdb, e, "read notifications and attempts");
    }
cleanup:
    sq_finish(st);
    pthread_mutex_unlock(&q->read_lock);
    if (rc != 0) {
        for (size_t i = 0; i < *n; i++)
            job_free(out[i]);
        *n = 0;
    }
    return rc;
}

static int s_counts(struct queue *qb, int64_t counts[JOB_N_STATES], struct err *e)
{
    struct sqlite_queue *q = sq(qb);
    sqlite3_stmt *st;
    int rc = 0;

    memset(counts, 0, sizeof(int64_t) * JOB_N_STATES);
    pthread_mutex_lock(&q->read_lock);
    st = sq_prepare(q->rdb, "SELECT state, COUNT(*) FROM jobs GROUP BY state");
    if (!st)
        rc = sq_db_err(q->rdb, e, "prepare");
    while (st && sqlite3_step(st) == SQLITE_ROW) {
        int s = sqlite3_column_int(st, 0);
        if (s >= 0 && s < JOB_N_STATES)
            counts[s] = sqlite3_column_int64(st, 1);
    }
    sq_finish(st);
    pthread_mutex_unlock(&q->read_lock);
    return rc;
}

static int s_outbox_due(struct queue *qb, int64_t now_ms, size_t max,
                        struct queue_outbox_item **out, size_t *n, struct err *e)
{
    struct sqlite_queue *q = sq(qb);
    sqlite3_stmt *st;
    size_t cap = max, count = 0;
    struct queue_outbox_item *items = calloc(cap ? cap : 1, sizeof(*items));
    int rc = 0;

    *out = NULL;
    *n = 0;
    if (!items)
        return err_set(e, ERR_NOMEM, "out of memory");
    pthread_mutex_lock(&q->read_lock);
    st = sq_prepare(q->rdb, "SELECT id, event_id, url, body, attempts FROM outbox WHERE done = 0 "
                         "AND next_ms <= ? ORDER BY next_ms LIMIT ?");
    if (!st)
        rc = sq_db_err(q->rdb, e, "prepare");
    if (st) {
        sqlite3_bind_int64(st, 1, now_ms);
        sqlite3_bind_int64(st, 2, (int64_t)max);
    }
    /* a row that cannot be copied is left out (`count` counts the others): it stays due and
     * is taken at the next look, never handed out without its url or body */
    for (size_t row = 0; st && count < cap && sqlite3_step(st) == SQLITE_ROW; row++) {
        struct queue_outbox_item *it = &items[count];
        it->id = sqlite3_column_int64(st, 0);
        it->event_id = sq_col_strdup(st, 1);
        it->url = sq_col_strdup(st, 2);
        it->body_len = (size_t)sqlite3_column_bytes(st, 3);
        it->body = malloc(it->body_len + 1);
        if (it->body) {
            if (it->body_len)
                memcpy(it->body, sqlite3_column_blob(st, 3), it->body_len);
            it->body[it->body_len] = '\0';
        }
        it->attempts = sqlite3_column_int(st, 4);
        if (it->event_id && it->url && it->body && !queue_fault("outbox_due", row))
            count++;
        else
            queue_outbox_item_release(it);
    }
    sq_finish(st);
    pthread_mutex_unlock(&q->read_lock);
    *out = items;
    *n = count;
    return rc;
}

static int64_t s_outbox_next_due(struct queue *qb)
{
    struct sqlite_queue *q = sq(qb);
    sqlite3_stmt *st;
    int64_t next = -1;

    pthread_mutex_lock(&q->read_lock);
    st = sq_prepare(q->rdb, "SELECT MIN(next_ms) FROM outbox WHERE done = 0");
    if (st && sqlite3_step(st) == SQLITE_ROW && sqlite3_column_type(st, 0) != SQLITE_NULL)
        next = sqlite3_column_int64(st, 0);
    sq_finish(st);
    pthread_mutex_unlock(&q->read_lock);
    return next;
}

static int64_t s_queued(struct queue *qb)
{
    struct sqlite_queue *q = sq(qb);
    int64_t n;

    pthread_mutex_lock(&q->lock);
    n = q->n_queued;
    pthread_mutex_unlock(&q->lock);
    return n;
}

/* ---- workers ---- */

static int s_worker_beat(struct queue *qb, const struct queue_worker *w, struct err *e)
{
    struct op o = {.kind = OP_WORKER_BEAT, .wk = w};
    int rc = sq_submit(sq(qb), &o);

    copy_err(e, &o);
    return rc;
}

static int s_worker_leave(struct queue *qb, const char *id, struct err *e)
{
    struct op o = {.kind = OP_WORKER_LEAVE, .id = id};
    int rc = sq_submit(sq(qb), &o);

    copy_err(e, &o);
    return rc;
}

static int s_workers_list(struct queue *qb, struct queue_worker **out, size_t *n, struct err *e)
{
    struct sqlite_queue *q = sq(qb);
    struct queue_worker *v = NULL;
    size_t cap = 0;
    sqlite3_stmt *st;
    int rc = 0;

    *out = NULL;
    *n = 0;
    pthread_mutex_lock(&q->read_lock);
    st = sq_prepare(q->rdb, "SELECT id, host, pid, started_ms, heartbeat_ms, timeout_ms, "
                            "jobs_running FROM workers WHERE heartbeat_ms + timeout_ms > ? "
                            "ORDER BY started_ms, id");
    if (!st)
        rc = sq_db_err(q->rdb, e, "prepare");
    if (st)
        sqlite3_bind_int64(st, 1, queue_now_ms());
    while (rc == 0 && st && sqlite3_step(st) == SQLITE_ROW) {
        if (*n == cap) {
            struct queue_worker *bigger = realloc(v, (cap ? cap * 2 : 8) * sizeof(*v));
            if (!bigger) {
                rc = err_set(e, ERR_NOMEM, "out of memory");
                break;
            }
            v = bigger;
            cap = cap ? cap * 2 : 8;
        }
        struct queue_worker *w = &v[(*n)++];
        memset(w, 0, sizeof(*w));
        snprintf(w->id, sizeof(w->id), "%s", sqlite3_column_text(st, 0));
        snprintf(w->host, sizeof(w->host), "%s", sqlite3_column_text(st, 1));
        w->pid = sqlite3_column_int(st, 2);
        w->started_ms = sqlite3_column_int64(st, 3);
        w->heartbeat_ms = sqlite3_column_int64(st, 4);
        w->timeout_ms = sqlite3_column_int64(st, 5);
        w->jobs_running = sqlite3_column_int(st, 6);
    }
    sq_finish(st);
    pthread_mutex_unlock(&q->read_lock);
    if (rc != 0) {
        free(v);
        *n = 0;
        return rc;
    }
    *out = v;
    return 0;
}

/* ---- open and close ---- */

static void s_close(struct queue *qb)
{
    struct sqlite_queue *q = sq(qb);

    pthread_mutex_lock(&q->lock);
    q->stopping = 1;
    pthread_cond_broadcast(&q->work);
    pthread_cond_broadcast(&q->runnable);
    pthread_mutex_unlock(&q->lock);
    pthread_join(q->writer, NULL);
    cache_owner = NULL;
    for (int i = 0; i < STMT_CACHE && q->cache[i].st; i++)
        sqlite3_finalize(q->cache[i].st);
    pthread_mutex_destroy(&q->cache_lock);
    sqlite3_close(q->wdb);
    sqlite3_close(q->rdb);
    pthread_mutex_destroy(&q->lock);
    pthread_mutex_destroy(&q->read_lock);
    pthread_cond_destroy(&q->work);
    pthread_cond_destroy(&q->finished);
    pthread_cond_destroy(&q->runnable);
    free(q);
}

static const struct queue_ops sqlite_ops = {
    .enqueue = s_enqueue,
    .lease = s_lease,
    .lease_many = s_lease_many,
    .enqueue_async = s_enqueue_async,
    .finish_many = s_finish_many,
    .extend = s_extend,
    .complete = s_complete,
    .fail = s_fail,
    .cancel = s_cancel,
    .retry = s_retry,
    .get = s_get,
    .list = s_list,
    .counts = s_counts,
    .queued = s_queued,
    .outbox_due = s_outbox_due,
    .outbox_next_due = s_outbox_next_due,
    .outbox_record = s_outbox_record,
    .batch_create = sq_batch_create,
    .batch_get = sq_batch_get,
    .batch_list = sq_batch_list,
    .batch_cancel = sq_batch_cancel,
    .batch_results = sq_batch_results,
    .schedules_due = sq_schedules_due,
    .batch_definition = sq_batch_definition,
    .batch_pause = sq_batch_pause,
    .batch_progress = sq_batch_progress,
    .worker_beat = s_worker_beat,
    .worker_leave = s_worker_leave,
    .workers_list = s_workers_list,
    .close = s_close,
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
        sqlite3_bind_int64(st, 1, queue_now_ms());
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
    pthread_mutex_init(&q->lock, NULL);
    pthread_mutex_init(&q->read_lock, NULL);
    pthread_mutex_init(&q->cache_lock, NULL);
    cache_owner = q;
    pthread_cond_init(&q->work, NULL);
    pthread_cond_init(&q->finished, NULL);
    pthread_cond_init(&q->runnable, NULL);
    rc = open_db(path, &q->wdb, e);
    if (rc == 0)
        rc = sq_exec(q->wdb, schema, e);
    if (rc == 0)
        rc = migrate_jobs(q->wdb, e);
    if (rc == 0)
        rc = sq_batch_migrate(q->wdb, e);
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
    if (rc == 0 && pthread_create(&q->writer, NULL, writer_main, q) != 0)
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
