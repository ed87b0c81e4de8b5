/*
 * pg.c: the job queue on PostgreSQL, shared by any number of processes: connections, the
 * versioned schema, the sweeper and listener threads, opening and closing.
 *
 * The guarantees are the SQLite and Redis queues': a job is committed before enqueue answers
 * (group commit, writer.c; synchronous_commit stays the server's, on by default), a lease
 * counts the attempt first and takes rows with SELECT ... FOR UPDATE SKIP LOCKED (so leases of
 * many processes never wait on each other nor take the same job), outcomes are fenced by the
 * attempt number, and a final state, its webhook and its batch bookkeeping are one
 * transaction. Every process runs a sweeper (expired ttls and leases, dead workers,
 * retention: rows taken with SKIP LOCKED, so sweepers of several processes share the work)
 * and a listener (LISTEN/NOTIFY: idle leases wake when a job is queued anywhere; a cancel in
 * one process reaches the worker in another; long-polls hear of jobs others ended).
 *
 * The schema is versioned: inferd_schema_version holds the version; migrations run in order,
 * in one transaction under an advisory lock (two processes starting at once do not race), and
 * a database newer than this binary is refused with a clear error.
 *
 * A lost connection is reconnected with backoff; while PostgreSQL is away calls fail with
 * ERR_UNAVAILABLE (the API answers 503 with Retry-After). The URL may carry a password: it
 * goes to libpq only; logs and errors show `shown`, the URL with its credentials masked.
 */
#define _GNU_SOURCE
#include "queue/postgres/pg_internal.h"
#include "core/url.h"
#include "core/clock.h"
#include "core/log.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- statements ---- */

void pg_p_str(struct pg_params *p, const char *s)
{
    p->v[p->n] = s;
    p->len[p->n] = 0;
    p->fmt[p->n] = 0;
    p->n++;
}

void pg_p_int(struct pg_params *p, int64_t v)
{
    snprintf(p->num[p->n], sizeof(p->num[0]), "%lld", (long long)v);
    pg_p_str(p, p->num[p->n]);
}

void pg_p_bin(struct pg_params *p, const void *data, size_t len)
{
    p->v[p->n] = data ? (data && len ? data : "") : NULL;
    p->len[p->n] = (int)len;
    p->fmt[p->n] = 1;
    p->n++;
}

/* The first line of libpq's message, without its trailing newline, its double quotes single. */
static void first_line(const char *msg, char *out, size_t size)
{
    size_t n = msg ? strcspn(msg, "\n") : 0;

    if (n >= size)
        n = size - 1;
    memcpy(out, msg ? msg : "", n);
    out[n] = '\0';
    for (size_t i = 0; i < n; i++) /* libpq quotes names with '"'; our log values are "..." */
        if (out[i] == '"')
            out[i] = '\'';
}

PGresult *pg_exec(struct pg_queue *q, PGconn *c, const char *sql, const struct pg_params *p,
                  const char *what, struct err *e)
{
    /* without parameters: the simple protocol, which also runs several statements */
    PGresult *r = p ? PQexecParams(c, sql, p->n, NULL, p->v, p->len, p->fmt, 0) : PQexec(c, sql);
    ExecStatusType st = r ? PQresultStatus(r) : PGRES_FATAL_ERROR;
    const char *state;
    char msg[200];

    if (st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK)
        return r;
    state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
    first_line(r ? PQresultErrorMessage(r) : PQerrorMessage(c), msg, sizeof(msg));
    if (!msg[0])
        first_line(PQerrorMessage(c), msg, sizeof(msg));
    if (PQstatus(c) != CONNECTION_OK || !state || strncmp(state, "08", 2) == 0 ||
        strncmp(state, "57P", 3) == 0)
        err_set(e, ERR_UNAVAILABLE, "PostgreSQL at %s: %s: %s", q->shown, what, msg);
    else if (strcmp(state, "53100") == 0)
        err_set(e, ERR_FULL, "PostgreSQL at %s: %s: %s (the database's disk is full)", q->shown,
                what, msg);
    else if (strcmp(state, "23505") == 0)
        err_set(e, ERR_CONFLICT, "job store: %s: %s", what, msg);
    else
        err_set(e, ERR_IO, "job store: %s: %s (SQLSTATE %s)", what, msg, state);
    PQclear(r);
    return NULL;
}

int pg_run(struct pg_queue *q, PGconn *c, const char *sql, const struct pg_params *p,
           const char *what, struct err *e)
{
    PGresult *r = pg_exec(q, c, sql, p, what, e);

    PQclear(r);
    return r ? 0 : e->code;
}

int pg_retryable(const struct err *e)
{
    return e->code == ERR_IO &&
           (strstr(e->msg, "(SQLSTATE 40P01)") || strstr(e->msg, "(SQLSTATE 40001)"));
}

int64_t pg_int(const PGresult *r, int row, int col)
{
    return PQgetisnull(r, row, col) ? 0 : strtoll(PQgetvalue(r, row, col), NULL, 10);
}

char *pg_strdup(const PGresult *r, int row, int col)
{
    return PQgetisnull(r, row, col) ? NULL : strdup(PQgetvalue(r, row, col));
}

int pg_bytea(const PGresult *r, int row, int col, struct buf *out)
{
    unsigned char *raw;
    size_t len = 0;
    int rc;

    if (PQgetisnull(r, row, col))
        return 0;
    raw = PQunescapeBytea((const unsigned char *)PQgetvalue(r, row, col), &len);
    if (!raw)
        return ERR_NOMEM;
    rc = len ? buf_append(out, raw, len) : 0;
    PQfreemem(raw);
    return rc;
}

int pg_array_add(struct buf *b, const char *s)
{
    int rc = buf_puts(b, b->len > 1 ? "," : "");

    if (rc == 0 && !s)
        return buf_puts(b, "NULL");
    rc = rc ? rc : buf_puts(b, "\"");
    for (const char *c = s; rc == 0 && *c; c++)
        rc = (*c == '"' || *c == '\\') ? buf_printf(b, "\\%c", *c) : buf_append(b, c, 1);
    return rc ? rc : buf_puts(b, "\"");
}

int pg_array_add_bytea(struct buf *b, const void *data, size_t len)
{
    static const char hex[] = "0123456789abcdef";
    const unsigned char *d = data;
    int rc = buf_puts(b, b->len > 1 ? "," : "");

    if (rc == 0 && !data)
        return buf_puts(b, "NULL");
    rc = rc ? rc : buf_reserve(b, 2 * len + 8);
    rc = rc ? rc : buf_puts(b, "\"\\\\x"); /* "\\x: a backslash, escaped in the array */
    for (size_t i = 0; rc == 0 && i < len; i++) {
        char two[2] = {hex[d[i] >> 4], hex[d[i] & 15]};
        rc = buf_append(b, two, 2);
    }
    return rc ? rc : buf_puts(b, "\"");
}

/* ---- connections ---- */

void pg_note_down(struct pg_queue *q, const char *why)
{
    int64_t expected = 0;

    if (atomic_compare_exchange_strong(&q->down_since_ms, &expected, clock_now_ms()))
        log_error("queue", "PostgreSQL unreachable", "postgres=%s reason=\"%s\"", q->shown, why);
}

void pg_note_up(struct pg_queue *q)
{
    if (atomic_exchange(&q->down_since_ms, 0) != 0) {
        atomic_store(&q->up_since_ms, clock_now_ms());
        log_info("queue", "PostgreSQL reachable again", "postgres=%s", q->shown);
    }
}

/* The server's notices ("relation already exists, skipping") are not inferd's log lines. */
static void ignore_notice(void *arg, const char *message)
{
    (void)arg;
    (void)message;
}

PGconn *pg_connect(struct pg_queue *q, struct err *e)
{
    /* defaults first: what the URL says wins (expand_dbname reads it in place of dbname) */
    const char *keys[] = {"connect_timeout", "application_name", "dbname", NULL};
    const char *vals[] = {"3", "inferd", q->conninfo, NULL};
    PGconn *c = PQconnectdbParams(keys, vals, 1);
    char msg[200];

    if (!c) {
        err_set(e, ERR_UNAVAILABLE, "PostgreSQL at %s: out of memory", q->shown);
        return NULL;
    }
    if (PQstatus(c) != CONNECTION_OK) {
        first_line(PQerrorMessage(c), msg, sizeof(msg));
        err_set(e, ERR_UNAVAILABLE, "PostgreSQL at %s: %s", q->shown, msg);
        PQfinish(c);
        return NULL;
    }
    PQsetNoticeProcessor(c, ignore_notice, NULL);
    return c;
}

int pg_alive(PGconn *c)
{
    return PQstatus(c) == CONNECTION_OK && PQconsumeInput(c) && PQstatus(c) == CONNECTION_OK;
}

PGconn *pg_take(struct pg_queue *q, struct err *e)
{
    PGconn *c = NULL;

    for (;;) {
        pthread_mutex_lock(&q->pool_lock);
        c = q->n_idle > 0 ? q->pool[--q->n_idle] : NULL;
        pthread_mutex_unlock(&q->pool_lock);
        /* an idle connection the server closed (a restart) shows it on a read: skip it */
        if (!c || pg_alive(c))
            break;
        PQfinish(c);
    }
    if (!c) {
        c = pg_connect(q, e);
        if (!c)
            pg_note_down(q, e->msg);
    }
    return c;
}

void pg_give(struct pg_queue *q, PGconn *c)
{
    if (!c)
        return;
    if (PQstatus(c) != CONNECTION_OK || PQtransactionStatus(c) != PQTRANS_IDLE) {
        char msg[200];
        first_line(PQerrorMessage(c), msg, sizeof(msg));
        if (PQstatus(c) != CONNECTION_OK) {
            pg_note_down(q, msg);
            /* the idle ones most likely broke with it (the server restarted) */
            pthread_mutex_lock(&q->pool_lock);
            while (q->n_idle > 0)
                PQfinish(q->pool[--q->n_idle]);
            pthread_mutex_unlock(&q->pool_lock);
        }
        PQfinish(c);
        return;
    }
    pg_note_up(q);
    pthread_mutex_lock(&q->pool_lock);
    if (q->n_idle < PG_POOL_SIZE) {
        q->pool[q->n_idle++] = c;
        c = NULL;
    }
    pthread_mutex_unlock(&q->pool_lock);
    PQfinish(c);
}

/* ---- the schema ---- */

/* Version 1: jobs, their attempts, webhooks, workers, batch jobs. */
static const char migration_1[] =
    "CREATE TABLE inferd_jobs ("
    " seq bigserial PRIMARY KEY,"
    " id text NOT NULL UNIQUE,"
    " model text NOT NULL,"
    " state smallint NOT NULL,"
    " priority smallint NOT NULL,"
    " attempts integer NOT NULL DEFAULT 0,"
    " max_attempts integer NOT NULL,"
    " extra_attempts integer NOT NULL DEFAULT 0,"
    " created_ms bigint NOT NULL, started_ms bigint, finished_ms bigint,"
    " expires_ms bigint NOT NULL DEFAULT 0,"
    " available_ms bigint NOT NULL DEFAULT 0,"
    " lease_until_ms bigint NOT NULL DEFAULT 0,"
    " lease_timeout_ms bigint NOT NULL,"
    " ttl_s bigint NOT NULL DEFAULT 0,"
    " worker text,"
    " cancel_requested smallint NOT NULL DEFAULT 0,"
    " input bytea, input_json_len bigint NOT NULL DEFAULT -1,"
    " input_location text, output_location text, callback_url text,"
    " result bytea, result_json_len bigint NOT NULL DEFAULT -1,"
    " error text,"
    " idem_key text, request_hash text,"
    " kind smallint NOT NULL DEFAULT 0, batch_id text, object text);"
    "CREATE INDEX inferd_jobs_ready ON inferd_jobs (priority DESC, seq) WHERE state = 0 AND "
    " kind = 0;"
    "CREATE INDEX inferd_jobs_ready_tasks ON inferd_jobs (priority DESC, seq) WHERE state = 0 "
    " AND kind <> 0;"
    "CREATE INDEX inferd_jobs_queued ON inferd_jobs (available_ms) WHERE state = 0;"
    /* an idempotency key is unique; indexed by its hash, so a key of any length fits */
    "CREATE UNIQUE INDEX inferd_jobs_idem ON inferd_jobs (md5(idem_key)) WHERE idem_key IS "
    " NOT NULL;"
    "CREATE INDEX inferd_jobs_expiring ON inferd_jobs (expires_ms) WHERE state = 0 AND "
    " expires_ms > 0;"
    "CREATE INDEX inferd_jobs_leased ON inferd_jobs (lease_until_ms) WHERE state = 1;"
    "CREATE INDEX inferd_jobs_state ON inferd_jobs (state, seq);"
    "CREATE INDEX inferd_jobs_finished ON inferd_jobs (finished_ms) WHERE state >= 2;"
    "CREATE INDEX inferd_jobs_batch ON inferd_jobs (batch_id, state) WHERE batch_id IS NOT NULL;"
    "CREATE TABLE inferd_attempts ("
    " job_id text NOT NULL, attempt integer NOT NULL, started_ms bigint NOT NULL,"
    " ended_ms bigint, worker text, error text, PRIMARY KEY (job_id, attempt));"
    "CREATE TABLE inferd_outbox ("
    " id bigserial PRIMARY KEY,"
    " event_id text NOT NULL UNIQUE,"
    " job_id text NOT NULL,"
    " url text NOT NULL,"
    " body bytea NOT NULL,"
    " attempts integer NOT NULL DEFAULT 0,"
    " next_ms bigint NOT NULL,"
    " done smallint NOT NULL DEFAULT 0,"
    " delivered smallint NOT NULL DEFAULT 0);"
    "CREATE INDEX inferd_outbox_due ON inferd_outbox (next_ms) WHERE done = 0;"
    "CREATE INDEX inferd_outbox_job ON inferd_outbox (job_id);"
    "CREATE TABLE inferd_deliveries ("
    " outbox_id bigint NOT NULL, job_id text NOT NULL, event_id text NOT NULL,"
    " at_ms bigint NOT NULL, http_status integer NOT NULL, error text);"
    "CREATE INDEX inferd_deliveries_job ON inferd_deliveries (job_id);"
    "CREATE TABLE inferd_workers ("
    " id text PRIMARY KEY, host text NOT NULL, pid integer NOT NULL,"
    " started_ms bigint NOT NULL, heartbeat_ms bigint NOT NULL, timeout_ms bigint NOT NULL,"
    " jobs_running integer NOT NULL DEFAULT 0);"
    "CREATE TABLE inferd_batch_jobs ("
    " seq bigserial PRIMARY KEY, id text NOT NULL UNIQUE, parent text,"
    " definition text NOT NULL, model text NOT NULL, schedule text,"
    " state smallint NOT NULL, output text, callback_url text,"
    " max_errors bigint NOT NULL DEFAULT 0, max_attempts integer NOT NULL DEFAULT 3,"
    " lease_timeout_ms bigint NOT NULL DEFAULT 300000,"
    " created_ms bigint NOT NULL, started_ms bigint, finished_ms bigint,"
    " run_at_ms bigint, next_run_ms bigint,"
    " objects_total bigint NOT NULL DEFAULT 0, objects_done bigint NOT NULL DEFAULT 0,"
    " records_done bigint NOT NULL DEFAULT 0, records_failed bigint NOT NULL DEFAULT 0,"
    " error text, finish_input text);"
    /* a scheduled run exists once, however many schedulers made it (runs by hand are never
     * on a whole minute: src/batch) */
    "CREATE UNIQUE INDEX inferd_batch_runs ON inferd_batch_jobs (parent, run_at_ms)"
    " WHERE parent IS NOT NULL;"
    "CREATE INDEX inferd_batch_due ON inferd_batch_jobs (next_run_ms)"
    " WHERE schedule IS NOT NULL AND state = 0;"
    "CREATE TABLE inferd_batch_progress (task_id text PRIMARY KEY,"
    " batch_id text NOT NULL, records bigint NOT NULL);"
    "CREATE INDEX inferd_batch_progress_run ON inferd_batch_progress (batch_id);";

/* Version 2: tenants. Every job and batch job belongs to one ("" is the anonymous tenant, so
 * what version 1 stored is the anonymous tenant's); an idempotency key is unique per tenant; a
 * tenant's listings walk its own rows newest first from an index. */
static const char migration_2[] =
    "ALTER TABLE inferd_jobs ADD COLUMN IF NOT EXISTS tenant text NOT NULL DEFAULT '';"
    "ALTER TABLE inferd_batch_jobs ADD COLUMN IF NOT EXISTS tenant text NOT NULL DEFAULT '';"
    "DROP INDEX IF EXISTS inferd_jobs_idem;"
    "CREATE UNIQUE INDEX inferd_jobs_idem ON inferd_jobs (tenant, md5(idem_key)) WHERE "
    " idem_key IS NOT NULL;"
    "CREATE INDEX inferd_jobs_tenant ON inferd_jobs (tenant, seq) WHERE kind = 0;"
    "CREATE INDEX inferd_batch_tenant ON inferd_batch_jobs (tenant, seq) WHERE parent IS NULL;";

/* Migrations in order: migrations[i] takes a database from version i to i + 1. */
static const char *const migrations[PG_SCHEMA_VERSION] = {migration_1, migration_2};

/* Any number for the advisory lock that serializes migrations: "infe" in ASCII. */
#define MIGRATION_LOCK "1768842853"

/* Brings the schema to PG_SCHEMA_VERSION; refuses a database a newer inferd made. */
static int migrate(struct pg_queue *q, PGconn *c, struct err *e)
{
    PGresult *r = NULL;
    int64_t version;
    int rc;

    rc = pg_run(q, c, "BEGIN", NULL, "migrate", e);
    if (rc == 0)
        rc = pg_run(q, c, "SELECT pg_advisory_xact_lock(" MIGRATION_LOCK ")", NULL, "migrate", e);
    if (rc == 0)
        rc = pg_run(q, c,
                    "CREATE TABLE IF NOT EXISTS inferd_schema_version (version integer NOT NULL,"
                    " applied_ms bigint NOT NULL)",
                    NULL, "create inferd_schema_version", e);
    if (rc == 0 && !(r = pg_exec(q, c,
                                 "SELECT COALESCE(MAX(version), 0) FROM "
                                 "inferd_schema_version",
                                 NULL, "read the schema version", e)))
        rc = e->code;
    if (rc != 0)
        goto cleanup;
    version = pg_int(r, 0, 0);
    if (version > PG_SCHEMA_VERSION) {
        rc = err_set(e, ERR_INVALID,
                     "PostgreSQL at %s: the queue's schema is version %lld, newer than this "
                     "inferd knows (%d): run the inferd that made it, or a newer one",
                     q->shown, (long long)version, PG_SCHEMA_VERSION);
        goto cleanup;
    }
    for (int64_t v = version; rc == 0 && v < PG_SCHEMA_VERSION; v++) {
        struct pg_params p = {0};
        char what[64];
        snprintf(what, sizeof(what), "schema migration to version %lld", (long long)v + 1);
        rc = pg_run(q, c, migrations[v], NULL, what, e);
        pg_p_int(&p, v + 1);
        pg_p_int(&p, clock_now_ms());
        if (rc == 0)
            rc = pg_run(q, c, "INSERT INTO inferd_schema_version VALUES ($1, $2)", &p, what, e);
        if (rc == 0)
            log_info("queue", "PostgreSQL schema migrated", "postgres=%s version=%lld", q->shown,
                     (long long)v + 1);
    }
    if (rc == 0)
        rc = pg_run(q, c, "COMMIT", NULL, "migrate", e);
cleanup:
    PQclear(r);
    if (rc != 0 && PQstatus(c) == CONNECTION_OK) {
        struct err ignored;
        pg_run(q, c, "ROLLBACK", NULL, "migrate", &ignored);
    }
    return rc;
}

/* ---- the sweeper and the listener ---- */

/* Waits up to `ms` for the queue to stop; returns 1 when it is stopping. */
static int wait_stop(struct pg_queue *q, int64_t ms)
{
    struct timespec ts = clock_realtime_after_ms(ms);
    int stop;

    pthread_mutex_lock(&q->w.lock);
    if (!q->w.stopping && ms > 0)
        pthread_cond_timedwait(&q->stop, &q->w.lock, &ts);
    stop = q->w.stopping;
    pthread_mutex_unlock(&q->w.lock);
    return stop;
}

/* The queued jobs counted anew (other processes' changes too), unless this process committed
 * a change meanwhile: its count is newer than this one (see commits_begun). */
static void count_queued(struct pg_queue *q, PGconn *c)
{
    struct err e;
    uint64_t begun = atomic_load(&q->commits_begun), ended = atomic_load(&q->commits_ended);
    PGresult *r;

    if (begun != ended)
        return; /* a commit in flight: the next sweep counts */
    r = pg_exec(q, c, "SELECT COUNT(*) FROM inferd_jobs WHERE state = 0", NULL,
                "count queued jobs", &e);
    pthread_mutex_lock(&q->count_lock);
    if (r && atomic_load(&q->commits_begun) == begun)
        atomic_store(&q->n_queued, pg_int(r, 0, 0));
    pthread_mutex_unlock(&q->count_lock);
    PQclear(r);
}

static void *sweeper_main(void *self)
{
    struct pg_queue *q = self;
    PGconn *c = NULL;
    int64_t backoff = PG_RECONNECT_MIN_MS, next_retain = 0;

    while (!wait_stop(q, c ? PG_SWEEP_MS : backoff)) {
        struct pg_txn t = {.q = q, .queued = -1};
        int64_t now = clock_now_ms();
        int retain = q->cfg.result_ttl_s > 0 && now >= next_retain;
        struct err e = {0};
        int rc;
        if (!c) {
            c = pg_connect(q, &e);
            if (!c) {
                backoff = backoff * 2 < PG_RECONNECT_MAX_MS ? backoff * 2 : PG_RECONNECT_MAX_MS;
                continue;
            }
            backoff = PG_RECONNECT_MIN_MS;
            atomic_store(&q->own_pid[1], PQbackendPID(c));
        }
        t.c = c;
        rc = pg_run(q, c, "BEGIN", NULL, "sweep", &e);
        if (rc == 0)
            rc = pg_sweep(&t, now, retain, &e);
        if (rc == 0)
            rc = pg_txn_commit(&t, &e);
        pg_txn_done(&t, rc == 0);
        if (rc == 0 && retain)
            next_retain = now + PG_RETAIN_MS;
        if (rc != 0 && PQstatus(c) == CONNECTION_OK) {
            struct err ignored;
            pg_run(q, c, "ROLLBACK", NULL, "sweep", &ignored);
            if (!pg_retryable(&e))
                log_warn("queue", "sweep failed", "reason=\"%s\"", e.msg);
        }
        if (PQstatus(c) == CONNECTION_OK) {
            count_queued(q, c);
        } else {
            PQfinish(c);
            c = NULL;
        }
    }
    PQfinish(c);
    return NULL;
}

static int own_pid(struct pg_queue *q, int pid)
{
    return pid == atomic_load(&q->own_pid[0]) || pid == atomic_load(&q->own_pid[1]);
}

static void wake_leases(struct pg_queue *q)
{
    queue_writer_runnable(&q->w);
}

static void on_notify(struct pg_queue *q, const PGnotify *n)
{
    if (strcmp(n->relname, "inferd_jobs") == 0) {
        wake_leases(q);
    } else if (strcmp(n->relname, "inferd_cancel") == 0) {
        if (!own_pid(q, n->be_pid) && n->extra && n->extra[0])
            queue_note_cancel(&q->base, n->extra);
    } else if (strcmp(n->relname, "inferd_final") == 0 && !own_pid(q, n->be_pid)) {
        const char *sp = n->extra ? strchr(n->extra, ' ') : NULL;
        char id[40];
        pthread_mutex_lock(&q->final_lock);
        if (q->base.on_final && sp && (size_t)(sp - n->extra) < sizeof(id)) {
            int st = job_state_parse(sp + 1);
            memcpy(id, n->extra, (size_t)(sp - n->extra));
            id[sp - n->extra] = '\0';
            q->base.on_final(q->base.on_final_ctx, id, (enum job_state)(st < 0 ? 0 : st));
        }
        pthread_mutex_unlock(&q->final_lock);
    }
}

static void *listener_main(void *self)
{
    struct pg_queue *q = self;
    int64_t backoff = PG_RECONNECT_MIN_MS;

    while (!wait_stop(q, 0)) {
        struct err e;
        PGconn *c = pg_connect(q, &e);
        if (!c || pg_run(q, c, "LISTEN inferd_jobs; LISTEN inferd_cancel; LISTEN inferd_final",
                         NULL, "listen", &e) != 0) {
            PQfinish(c);
            if (wait_stop(q, backoff))
                break;
            backoff = backoff * 2 < PG_RECONNECT_MAX_MS ? backoff * 2 : PG_RECONNECT_MAX_MS;
            continue;
        }
        backoff = PG_RECONNECT_MIN_MS;
        wake_leases(q); /* what was queued while nobody listened */
        while (PQstatus(c) == CONNECTION_OK && !wait_stop(q, 0)) {
            struct pollfd pfd = {.fd = PQsocket(c), .events = POLLIN};
            PGnotify *n;
            /* a short wait, so stopping is noticed */
            if (poll(&pfd, 1, 500) < 0 && errno != EINTR)
                break;
            if (!PQconsumeInput(c))
                break;
            while ((n = PQnotifies(c))) {
                on_notify(q, n);
                PQfreemem(n);
            }
        }
        PQfinish(c);
    }
    return NULL;
}

/* ---- opening and closing ---- */

static void pg_close(struct queue *qb)
{
    struct pg_queue *q = pgq(qb);

    queue_writer_stop(&q->w);
    pthread_mutex_lock(&q->w.lock); /* the sweeper and listener, waiting in wait_stop() */
    pthread_cond_broadcast(&q->stop);
    pthread_mutex_unlock(&q->w.lock);
    if (q->threads > 0)
        pthread_join(q->writer, NULL);
    if (q->threads > 1)
        pthread_join(q->sweeper, NULL);
    if (q->threads > 2)
        pthread_join(q->listener, NULL);
    PQfinish(q->wconn);
    for (int i = 0; i < q->n_idle; i++)
        PQfinish(q->pool[i]);
    pthread_mutex_destroy(&q->pool_lock);
    pthread_mutex_destroy(&q->final_lock);
    pthread_mutex_destroy(&q->count_lock);
    pthread_cond_destroy(&q->stop);
    queue_writer_release(&q->w);
    free(q->lost);
    free(q->conninfo);
    free(q->shown);
    free(q);
}

static const struct queue_job_ops postgres_job_ops = {
    .enqueue = queue_writer_enqueue,
    .enqueue_async = queue_writer_enqueue_async,
    .lease_many = queue_writer_lease_many,
    .finish_many = queue_writer_finish_many,
    .extend = pg_extend,
    .cancel = queue_writer_cancel,
    .retry = queue_writer_retry,
    .get = pg_get,
    .list = pg_list,
    .counts = pg_counts,
    .queued = pg_queued,
    .worker_beat = queue_writer_worker_beat,
    .worker_leave = queue_writer_worker_leave,
    .workers_list = pg_workers_list,
};

static const struct queue_batch_ops postgres_batch_ops = {
    .create = queue_writer_batch_create,
    .get = pg_batch_get,
    .list = pg_batch_list,
    .cancel = queue_writer_batch_cancel,
    .pause = queue_writer_batch_pause,
    .results = pg_batch_results,
    .definition = pg_batch_definition,
    .progress = queue_writer_batch_progress,
    .schedules_due = pg_schedules_due,
};

static const struct queue_outbox_ops postgres_outbox_ops = {
    .due = pg_outbox_due,
    .next_due = pg_outbox_next_due,
    .record = queue_writer_outbox_record,
    .exclusive = 1, /* many processes send: a taken webhook is held for its sender */
};

static const struct queue_ops postgres_ops = {
    .jobs = &postgres_job_ops,
    .batch = &postgres_batch_ops,
    .outbox = &postgres_outbox_ops,
    .close = pg_close,
};

int queue_postgres_open(const struct queue_config *cfg, struct queue **out, struct err *e)
{
    struct pg_queue *q = calloc(1, sizeof(*q));
    PGconn *c = NULL;
    int rc = 0;

    *out = NULL;
    if (!q)
        return err_set(e, ERR_NOMEM, "out of memory");
    q->base.ops = &postgres_ops;
    q->cfg = *cfg;
    q->conninfo = strdup(cfg->url);
    q->shown = url_redacted(cfg->url);
    atomic_store(&q->up_since_ms, clock_now_ms());
    pthread_mutex_init(&q->pool_lock, NULL);
    queue_writer_init(&q->w, PG_MAX_GROUP, PG_IDLE_POLL_MS);
    q->base.writer = &q->w;
    pthread_mutex_init(&q->final_lock, NULL);
    pthread_mutex_init(&q->count_lock, NULL);
    pthread_cond_init(&q->stop, NULL);
    if (!q->conninfo || !q->shown)
        rc = err_set(e, ERR_NOMEM, "out of memory");
    if (rc == 0 && !(c = pg_connect(q, e)))
        rc = e->code;
    if (rc == 0)
        rc = migrate(q, c, e);
    if (rc == 0) {
        count_queued(q, c);
        pg_give(q, c);
        c = NULL;
    }
    if (rc == 0 && pthread_create(&q->writer, NULL, pg_writer_main, q) == 0)
        q->threads++;
    if (rc == 0 && q->threads == 1 && pthread_create(&q->sweeper, NULL, sweeper_main, q) == 0)
        q->threads++;
    if (rc == 0 && q->threads == 2 && pthread_create(&q->listener, NULL, listener_main, q) == 0)
        q->threads++;
    if (rc == 0 && q->threads != 3)
        rc = err_set(e, ERR_NOMEM, "cannot start the PostgreSQL queue's threads");
    if (rc != 0) {
        PQfinish(c);
        pg_close(&q->base);
        return rc;
    }
    log_info("queue", "job queue on PostgreSQL", "postgres=%s schema_version=%d result_ttl_s=%lld",
             q->shown, PG_SCHEMA_VERSION, (long long)cfg->result_ttl_s);
    *out = &q->base;
    return 0;
}
