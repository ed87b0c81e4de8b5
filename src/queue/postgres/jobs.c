/*
 * jobs.c: the jobs of the PostgreSQL queue: their SQL, the sweeps, the workers' heartbeats.
 *
 * A job moves queued -> running -> final as in the SQLite queue (same columns, same
 * meanings). Leases take rows with SELECT ... FOR UPDATE SKIP LOCKED, highest priority first,
 * FIFO within a priority (seq), so leases in many processes never wait on each other or take
 * the same job. An outcome changes a row only while state = running and attempts = its
 * token (the fence), and PostgreSQL re-checks that condition after any row lock it waited
 * for, so a sweep and a late outcome cannot both win. Sweeps take their rows with SKIP
 * LOCKED too: sweepers of several processes share the work and never block a writer.
 *
 * The op_* functions run inside a transaction of the writer (writer.c); lost attempts, dead
 * workers and the sweeps are in sweep.c, reads in reads.c.
 */
#define _GNU_SOURCE
#include "queue/postgres/pg_internal.h"
#include "core/clock.h"
#include "core/id.h"
#include "core/log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct job *pg_job_from_row(const PGresult *r, int row, int c0)
{
    struct job *j = calloc(1, sizeof(*j));

    if (!j)
        return NULL;
    snprintf(j->id, sizeof(j->id), "%s", PQgetvalue(r, row, c0));
    j->model = pg_strdup(r, row, c0 + 1);
    j->state = (enum job_state)pg_int(r, row, c0 + 2);
    j->priority = (int)pg_int(r, row, c0 + 3);
    j->attempts = (int)pg_int(r, row, c0 + 4);
    j->max_attempts = (int)pg_int(r, row, c0 + 5);
    j->created_ms = pg_int(r, row, c0 + 6);
    j->started_ms = pg_int(r, row, c0 + 7);
    j->finished_ms = pg_int(r, row, c0 + 8);
    j->lease_timeout_ms = pg_int(r, row, c0 + 9);
    j->ttl_s = pg_int(r, row, c0 + 10);
    j->error = pg_strdup(r, row, c0 + 11);
    j->input_location = pg_strdup(r, row, c0 + 12);
    j->output_location = pg_strdup(r, row, c0 + 13);
    j->callback_url = pg_strdup(r, row, c0 + 14);
    j->cancel_requested = (int)pg_int(r, row, c0 + 15);
    j->kind = (enum job_kind)pg_int(r, row, c0 + 16);
    if (!PQgetisnull(r, row, c0 + 17))
        snprintf(j->batch_id, sizeof(j->batch_id), "%s", PQgetvalue(r, row, c0 + 17));
    j->worker = pg_strdup(r, row, c0 + 18);
    j->attempts_uncounted = (int)pg_int(r, row, c0 + 19);
    if (queue_tenant_set(&j->tenant, PQgetvalue(r, row, c0 + 20)) != 0) {
        job_free(j);
        return NULL;
    }
    j->token = (uint64_t)j->attempts;
    j->input_json_len = -1;
    j->result_json_len = -1;
    return j;
}

int pg_load_job(struct pg_queue *q, PGconn *c, const char *id, int lock, struct job **out,
                struct err *e)
{
    struct pg_params p = {0};
    PGresult *r;
    int rc = 0;

    *out = NULL;
    pg_p_str(&p, id);
    r = pg_exec(q, c,
                lock ? "SELECT " JOB_COLUMNS " FROM inferd_jobs WHERE id = $1 FOR UPDATE"
                     : "SELECT " JOB_COLUMNS " FROM inferd_jobs WHERE id = $1",
                &p, "read job", e);
    if (!r)
        return e->code;
    if (PQntuples(r) == 0)
        rc = err_set(e, ERR_NOT_FOUND, "no job '%.40s'", id);
    else if (!(*out = pg_job_from_row(r, 0, 0)))
        rc = err_set(e, ERR_NOMEM, "out of memory");
    PQclear(r);
    return rc;
}

int pg_load_history(struct pg_queue *q, PGconn *c, struct job *j)
{
    struct pg_params p = {0};
    struct err e;
    PGresult *r;
    int rc = 0;

    pg_p_str(&p, j->id);
    r = pg_exec(q, c,
                "SELECT attempt, started_ms, COALESCE(ended_ms, 0), worker, error FROM "
                "inferd_attempts WHERE job_id = $1 ORDER BY attempt",
                &p, "read attempts", &e);
    if (!r)
        return e.code;
    for (int i = 0; rc == 0 && i < PQntuples(r); i++)
        rc = queue_job_add_attempt(j, (int)pg_int(r, i, 0), pg_int(r, i, 1), pg_int(r, i, 2),
                                   PQgetisnull(r, i, 3) ? NULL : PQgetvalue(r, i, 3),
                                   PQgetisnull(r, i, 4) ? NULL : PQgetvalue(r, i, 4));
    PQclear(r);
    return rc;
}

void pg_note_final(struct pg_txn *t, const char *id, enum job_state state)
{
    struct pg_final *f = calloc(1, sizeof(*f));

    if (!f)
        return; /* long-polls then wait for their deadline: no correctness depends on this */
    snprintf(f->id, sizeof(f->id), "%s", id);
    f->state = state;
    f->next = t->finals;
    t->finals = f;
}

int pg_job_became_final(struct pg_txn *t, const char *id, struct err *e)
{
    struct pg_queue *q = t->q;
    struct job *j = NULL;
    struct buf body = {0};
    char event_id[48];
    int rc;

    rc = pg_load_job(q, t->c, id, 0, &j, e);
    if (rc != 0)
        goto cleanup;
    pg_note_final(t, id, j->state);
    if (j->kind != JOB_KIND_INFER) {
        rc = pg_batch_task_final(t, j, e); /* the batch job, not the task, has a webhook */
        goto cleanup;
    }
    if (!j->callback_url || !j->callback_url[0])
        goto cleanup;
    /* fixed here, so every repeat of this webhook carries the same event id; a job sent back
     * to the queue ends again with more attempts, and that is a new event */
    snprintf(event_id, sizeof(event_id), "evt_%s_%d", j->id, j->attempts);
    if (j->state == JOB_SUCCEEDED && !j->output_location) {
        struct pg_params p = {0};
        PGresult *r;
        pg_p_str(&p, id);
        r = pg_exec(q, t->c, "SELECT result, result_json_len FROM inferd_jobs WHERE id = $1", &p,
                    "read result", e);
        if (!r) {
            rc = e->code;
            goto cleanup;
        }
        if (PQntuples(r) == 1) {
            rc = pg_bytea(r, 0, 0, &j->result);
            j->result_json_len = pg_int(r, 0, 1);
        }
        PQclear(r);
        if (rc != 0) {
            rc = err_set(e, ERR_NOMEM, "out of memory");
            goto cleanup;
        }
    }
    if (pg_load_history(q, t->c, j) != 0) /* the event's job shows its attempts too */
        log_warn("queue", "a webhook's job lacks its attempts", "job=%s", id);
    if (queue_event_json(j, event_id, q->cfg.result_inline_max_bytes, &body) != 0) {
        rc = err_set(e, ERR_NOMEM, "out of memory building a webhook");
        goto cleanup;
    }
    rc = pg_outbox_add(t, id, event_id, j->callback_url, body.data, body.len, e);
cleanup:
    buf_release(&body);
    job_free(j);
    return rc;
}

/* Ends attempt `attempt` of job `id` in its history, with `error` (NULL: the job's own). */
int pg_attempt_ended(struct pg_txn *t, const char *id, uint64_t attempt, const char *error,
                     struct err *e)
{
    struct pg_params p = {0};

    pg_p_int(&p, clock_now_ms());
    pg_p_str(&p, error);
    pg_p_str(&p, id);
    pg_p_int(&p, (int64_t)attempt);
    return pg_run(t->q, t->c,
                  "UPDATE inferd_attempts SET ended_ms = $1, error = COALESCE($2::text, (SELECT "
                  "error FROM inferd_jobs WHERE id = $3)) WHERE job_id = $3 AND attempt = $4 AND "
                  "ended_ms IS NULL",
                  &p, "record attempt", e);
}

/* Rows changed by the command of `r`. */
long pg_changed(const PGresult *r)
{
    return strtol(PQcmdTuples((PGresult *)r), NULL, 10);
}

/* Runs a fenced update: ERR_CONFLICT when the attempt no longer holds the lease. */
static int fenced(struct pg_txn *t, struct queue_op *o, const char *sql, const struct pg_params *p)
{
    PGresult *r = pg_exec(t->q, t->c, sql, p, "update job", &o->err);
    int rc = 0;

    if (!r)
        return o->err.code;
    if (pg_changed(r) == 0)
        rc = err_set(&o->err, ERR_CONFLICT,
                     "job %s: attempt %llu no longer holds the lease; its result is discarded",
                     o->id, (unsigned long long)o->token);
    PQclear(r);
    return rc;
}

/* ---- operations (inside the writer's transaction) ---- */

/* Any number for the advisory lock that makes admissions take turns: "adm" in ASCII. */
#define ADMISSION_LOCK "6382957"

int pg_txn_count_queued(struct pg_txn *t, struct err *e)
{
    PGresult *r;

    if (t->queued >= 0)
        return 0;
    /* two statements: the count's snapshot must come after the lock is ours */
    if (pg_run(t->q, t->c, "SELECT pg_advisory_xact_lock(" ADMISSION_LOCK ")", NULL,
               "take the admission lock", e) != 0)
        return e->code;
    r = pg_exec(t->q, t->c, "SELECT COUNT(*) FROM inferd_jobs WHERE state = 0", NULL,
                "count queued jobs", e);
    if (!r)
        return e->code;
    t->queued = pg_int(r, 0, 0);
    PQclear(r);
    return 0;
}

/* The job that holds idempotency key `key`: *found 1 and its id in o->id_out; ERR_CONFLICT
 * when its request differs. */
static int idem_lookup(struct pg_txn *t, struct queue_op *o, int *found)
{
    const struct job_spec *s = o->spec;
    struct pg_params p = {0};
    PGresult *r;
    int rc = 0;

    *found = 0;
    pg_p_str(&p, s->idempotency_key);
    pg_p_str(&p, queue_tenant_stored(s->tenant)); /* a key is the tenant's own */
    r = pg_exec(t->q, t->c,
                "SELECT id, request_hash FROM inferd_jobs WHERE tenant = $2 AND md5(idem_key) = "
                "md5($1::text) AND idem_key = $1",
                &p, "read idempotency key", &o->err);
    if (!r)
        return o->err.code;
    if (PQntuples(r) == 1) {
        snprintf(o->id_out, sizeof(o->id_out), "%s", PQgetvalue(r, 0, 0));
        rc = queue_idem_match(s, o->id_out, PQgetisnull(r, 0, 1) ? NULL : PQgetvalue(r, 0, 1),
                              &o->err);
        o->existed = 1;
        *found = 1;
    }
    PQclear(r);
    return rc;
}

int pg_op_enqueue(struct pg_txn *t, struct queue_op *o)
{
    const struct job_spec *s = o->spec;
    int found = 0, rc;

    if (s->idempotency_key) {
        rc = idem_lookup(t, o, &found);
        if (rc != 0 || found)
            return rc;
    }
    /* once per group: the group's own enqueues are counted as they go */
    if ((rc = pg_txn_count_queued(t, &o->err)) != 0)
        return rc;
    if ((rc = queue_admit(&t->q->cfg, t->queued, 1, &o->err)) != 0)
        return rc;
    id_new(o->id_out);
    rc = pg_insert_job(t, s, o->id_out, &o->err);
    if (rc == 1) {
        /* another process stored the key meanwhile (the unique index waited for it) */
        rc = idem_lookup(t, o, &found);
        if (rc == 0 && !found)
            rc = err_set(&o->err, ERR_CONFLICT, "Idempotency-Key '%.64s' is being used",
                         s->idempotency_key);
    }
    return rc;
}

int pg_insert_job(struct pg_txn *t, const struct job_spec *s, const char *id, struct err *e)
{
    int64_t now = clock_now_ms();
    struct pg_params p = {0};
    PGresult *r;
    int rc = 0;

    pg_p_str(&p, id);
    pg_p_str(&p, s->model);
    pg_p_int(&p, s->priority);
    pg_p_int(&p, s->max_attempts);
    pg_p_int(&p, now);
    pg_p_int(&p, s->ttl_s > 0 ? now + s->ttl_s * 1000 : 0);
    pg_p_int(&p, s->lease_timeout_ms);
    pg_p_int(&p, s->ttl_s);
    pg_p_bin(&p, s->input, s->input ? s->input_len : 0);
    pg_p_int(&p, s->input_json_len);
    pg_p_str(&p, s->input_location);
    pg_p_str(&p, s->output_location);
    pg_p_str(&p, s->callback_url);
    pg_p_str(&p, s->idempotency_key);
    pg_p_str(&p, s->request_hash);
    pg_p_int(&p, (int)s->kind);
    pg_p_str(&p, s->batch_id);
    pg_p_str(&p, queue_tenant_stored(s->tenant));
    r = pg_exec(t->q, t->c,
                "INSERT INTO inferd_jobs (id, model, state, priority, max_attempts, created_ms, "
                "expires_ms, lease_timeout_ms, ttl_s, input, input_json_len, input_location, "
                "output_location, callback_url, idem_key, request_hash, kind, batch_id, tenant) "
                "VALUES ($1, $2, 0, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, "
                "$17, $18) ON CONFLICT (tenant, (md5(idem_key))) WHERE idem_key IS NOT NULL DO "
                "NOTHING",
                &p, "insert job", e);
    if (!r)
        return e->code;
    if (pg_changed(r) == 0)
        rc = 1;
    PQclear(r);
    if (rc == 0) {
        pg_txn_queued_add(t, 1);
        t->runnable = 1;
    }
    return rc;
}

/* Enqueues `n` operations without idempotency keys in one statement (admission as
 * pg_op_enqueue: the ones past --max-queue answer ERR_BUSY, the others are stored in order). */
int pg_ops_enqueue(struct pg_txn *t, struct queue_op **ops, size_t n, struct err *e)
{
    enum {
        ID,
        MODEL,
        PRIO,
        MAXATT,
        EXPIRES,
        LEASE,
        TTL,
        INPUT,
        JSONLEN,
        INLOC,
        OUTLOC,
        URL,
        HASH,
        KIND,
        BATCH,
        TENANT,
        N_COLS
    };
    int64_t now = clock_now_ms();
    struct buf cols[N_COLS] = {{0}};
    struct pg_params p = {0};
    size_t admitted = 0;
    int rc = 0;

    if ((rc = pg_txn_count_queued(t, e)) != 0)
        return rc;
    for (int c = 0; rc == 0 && c < N_COLS; c++)
        rc = buf_puts(&cols[c], "{");
    for (size_t i = 0; rc == 0 && i < n; i++) {
        const struct job_spec *sp = ops[i]->spec;
        char num[N_COLS][24];
        if ((ops[i]->rc =
                 queue_admit(&t->q->cfg, t->queued + (int64_t)admitted, 1, &ops[i]->err)) != 0)
            continue;
        admitted++;
        id_new(ops[i]->id_out);
        snprintf(num[PRIO], 24, "%d", sp->priority);
        snprintf(num[MAXATT], 24, "%d", sp->max_attempts);
        snprintf(num[EXPIRES], 24, "%lld", (long long)(sp->ttl_s > 0 ? now + sp->ttl_s * 1000 : 0));
        snprintf(num[LEASE], 24, "%lld", (long long)sp->lease_timeout_ms);
        snprintf(num[TTL], 24, "%lld", (long long)sp->ttl_s);
        snprintf(num[JSONLEN], 24, "%lld", (long long)sp->input_json_len);
        snprintf(num[KIND], 24, "%d", (int)sp->kind);
        rc = pg_array_add(&cols[ID], ops[i]->id_out) | pg_array_add(&cols[MODEL], sp->model) |
             pg_array_add(&cols[PRIO], num[PRIO]) | pg_array_add(&cols[MAXATT], num[MAXATT]) |
             pg_array_add(&cols[EXPIRES], num[EXPIRES]) | pg_array_add(&cols[LEASE], num[LEASE]) |
             pg_array_add(&cols[TTL], num[TTL]) |
             pg_array_add_bytea(&cols[INPUT], sp->input, sp->input ? sp->input_len : 0) |
             pg_array_add(&cols[JSONLEN], num[JSONLEN]) |
             pg_array_add(&cols[INLOC], sp->input_location) |
             pg_array_add(&cols[OUTLOC], sp->output_location) |
             pg_array_add(&cols[URL], sp->callback_url) |
             pg_array_add(&cols[HASH], sp->request_hash) | pg_array_add(&cols[KIND], num[KIND]) |
             pg_array_add(&cols[BATCH], sp->batch_id) |
             pg_array_add(&cols[TENANT], queue_tenant_stored(sp->tenant));
    }
    for (int c = 0; rc == 0 && c < N_COLS; c++)
        rc = buf_puts(&cols[c], "}");
    if (rc != 0) {
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    if (admitted == 0)
        goto cleanup;
    for (int c = 0; c < N_COLS; c++)
        pg_p_str(&p, cols[c].data);
    pg_p_int(&p, now);
    rc = pg_run(t->q, t->c,
                "INSERT INTO inferd_jobs (id, model, state, priority, max_attempts, created_ms, "
                "expires_ms, lease_timeout_ms, ttl_s, input, input_json_len, input_location, "
                "output_location, callback_url, request_hash, kind, batch_id, tenant) SELECT id, "
                "model, 0, priority, max_attempts, $17, expires_ms, lease_timeout_ms, ttl_s, "
                "input, input_json_len, input_location, output_location, callback_url, "
                "request_hash, kind, batch_id, tenant FROM unnest($1::text[], $2::text[], "
                "$3::int[], $4::int[], $5::bigint[], $6::bigint[], $7::bigint[], $8::bytea[], "
                "$9::bigint[], $10::text[], $11::text[], $12::text[], $13::text[], $14::int[], "
                "$15::text[], $16::text[]) AS v(id, model, priority, max_attempts, expires_ms, "
                "lease_timeout_ms, ttl_s, input, input_json_len, input_location, output_location, "
                "callback_url, request_hash, kind, batch_id, tenant)",
                &p, "insert jobs", e);
    if (rc == 0) {
        pg_txn_queued_add(t, (int64_t)admitted);
        t->runnable = 1;
    }
cleanup:
    for (int c = 0; c < N_COLS; c++)
        buf_release(&cols[c]);
    return rc;
}

/* Appends "{a,b,c}" of the seqs to `out`, a bigint[] literal. */
static int seq_array(const int64_t *seqs, size_t n, struct buf *out)
{
    int rc = buf_puts(out, "{");

    for (size_t i = 0; rc == 0 && i < n; i++)
        rc = buf_printf(out, "%s%lld", i ? "," : "", (long long)seqs[i]);
    return rc ? rc : buf_puts(out, "}");
}

/* Fills the leased jobs of `r` (seq, JOB_COLUMNS, input, input_json_len) into o->jobs in the
 * order of `seqs`. */
static int leased_jobs(struct pg_txn *t, struct queue_op *o, const PGresult *r, const int64_t *seqs,
                       size_t n, int64_t now)
{
    int rc = 0;

    for (size_t k = 0; rc == 0 && k < n; k++) {
        for (int i = 0; rc == 0 && i < PQntuples(r); i++) {
            struct job *j;
            if (pg_int(r, i, 0) != seqs[k])
                continue;
            j = pg_job_from_row(r, i, 1);
            if (!j)
                return err_set(&o->err, ERR_NOMEM, "out of memory");
            o->jobs[o->n_jobs++] = j;
            if (pg_bytea(r, i, 1 + N_JOB_COLUMNS, &j->input) != 0)
                rc = err_set(&o->err, ERR_NOMEM, "out of memory");
            j->input_json_len = pg_int(r, i, 2 + N_JOB_COLUMNS);
            if (rc == 0 && j->batch_id[0])
                rc = pg_batch_task_started(t, j->batch_id, now, &o->err);
            if (rc == 0 && queue_fault("lease", k))
                rc = err_set(&o->err, ERR_IO, "job store: lease of job %s: injected fault", j->id);
        }
    }
    return rc;
}

int pg_op_lease(struct pg_txn *t, struct queue_op *o)
{
    int64_t now = clock_now_ms(), *seqs = calloc(o->max ? o->max : 1, sizeof(int64_t));
    struct pg_params p = {0};
    struct buf arr = {0};
    char wid[96];
    PGresult *r = NULL;
    size_t n = 0;
    int rc = 0;

    if (!seqs)
        return err_set(&o->err, ERR_NOMEM, "out of memory");
    pg_p_int(&p, now);
    pg_p_int(&p, (int64_t)o->max);
    pg_p_int(&p, o->max_tasks);
    /* only the rows it takes are locked (SKIP LOCKED): a row locked and passed over would
     * hide from other workers' leases until this commit. A batch task runs for long: at
     * most max_tasks per lease, so the others wait for a free worker. */
    r = pg_exec(t->q, t->c,
                "WITH i AS (SELECT seq, priority FROM inferd_jobs WHERE state = 0 AND kind = 0 "
                "AND available_ms <= $1 AND (expires_ms = 0 OR expires_ms > $1) ORDER BY "
                "priority DESC, seq LIMIT $2 FOR UPDATE SKIP LOCKED), "
                "k AS (SELECT seq, priority FROM inferd_jobs WHERE state = 0 AND kind <> 0 AND "
                "available_ms <= $1 AND (expires_ms = 0 OR expires_ms > $1) ORDER BY priority "
                "DESC, seq LIMIT $3 FOR UPDATE SKIP LOCKED) "
                "SELECT seq, priority FROM i UNION ALL SELECT seq, priority FROM k ORDER BY "
                "priority DESC, seq",
                &p, "lease", &o->err);
    if (!r) {
        rc = o->err.code;
        goto cleanup;
    }
    for (int i = 0; i < PQntuples(r) && n < o->max; i++)
        seqs[n++] = pg_int(r, i, 0);
    PQclear(r);
    r = NULL;
    if (n == 0) {
        /* when a job waiting out a retry's backoff becomes runnable: the lease waits that long */
        p = (struct pg_params){0};
        pg_p_int(&p, now);
        r = pg_exec(t->q, t->c,
                    "SELECT COALESCE(MIN(available_ms), 0) FROM inferd_jobs WHERE state = 0 AND "
                    "available_ms > $1",
                    &p, "lease", &o->err);
        if (!r)
            rc = o->err.code;
        else
            o->next_available_ms = pg_int(r, 0, 0);
        goto cleanup;
    }
    if (seq_array(seqs, n, &arr) != 0) {
        rc = err_set(&o->err, ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    queue_worker_id_of(o->worker, wid);
    p = (struct pg_params){0};
    pg_p_int(&p, now);
    pg_p_str(&p, wid);
    pg_p_str(&p, arr.data);
    r = pg_exec(t->q, t->c,
                "UPDATE inferd_jobs SET state = 1, attempts = attempts + 1, started_ms = "
                "COALESCE(started_ms, $1), lease_until_ms = $1 + lease_timeout_ms, worker = $2 "
                "WHERE seq = ANY($3::bigint[]) RETURNING seq, " JOB_COLUMNS
                ", input, input_json_len",
                &p, "lease", &o->err);
    if (!r) {
        rc = o->err.code;
        goto cleanup;
    }
    p = (struct pg_params){0};
    pg_p_int(&p, now);
    pg_p_str(&p, arr.data);
    rc = pg_run(t->q, t->c,
                "INSERT INTO inferd_attempts (job_id, attempt, started_ms, worker) SELECT id, "
                "attempts, $1, worker FROM inferd_jobs WHERE seq = ANY($2::bigint[]) ON CONFLICT "
                "(job_id, attempt) DO UPDATE SET started_ms = EXCLUDED.started_ms, ended_ms = "
                "NULL, worker = EXCLUDED.worker, error = NULL",
                &p, "record attempt", &o->err);
    if (rc == 0)
        rc = leased_jobs(t, o, r, seqs, n, now);
    if (rc == 0)
        pg_txn_queued_add(t, -(int64_t)o->n_jobs);
cleanup:
    PQclear(r);
    buf_release(&arr);
    free(seqs);
    return rc;
}

int pg_op_extend(struct pg_txn *t, struct queue_op *o)
{
    struct pg_params p = {0};

    pg_p_int(&p, clock_now_ms() + o->lease_ms);
    pg_p_str(&p, o->id);
    pg_p_int(&p, (int64_t)o->token);
    return fenced(t, o,
                  "UPDATE inferd_jobs SET lease_until_ms = $1 WHERE id = $2 AND state = 1 AND "
                  "attempts = $3",
                  &p);
}

int pg_op_complete(struct pg_txn *t, struct queue_op *o)
{
    struct pg_params p = {0};
    PGresult *r;
    int rc = 0;

    pg_p_bin(&p, o->data, o->data ? o->data_len : 0);
    pg_p_int(&p, o->json_len);
    pg_p_int(&p, clock_now_ms());
    pg_p_str(&p, o->id);
    pg_p_int(&p, (int64_t)o->token);
    /* one statement (one round trip): the fenced outcome and the end of its attempt. A job
     * cancelled while it ran ends cancelled and its result is discarded. */
    r = pg_exec(t->q, t->c,
                "WITH j AS (UPDATE inferd_jobs SET state = CASE WHEN cancel_requested = 1 THEN 4 "
                "ELSE 2 END, result = CASE WHEN cancel_requested = 1 THEN NULL ELSE $1::bytea "
                "END, result_json_len = $2, finished_ms = $3, error = CASE WHEN cancel_requested "
                "= 1 THEN 'cancelled while running; result discarded' ELSE NULL END, input = NULL "
                "WHERE id = $4 AND state = 1 AND attempts = $5 RETURNING state, kind, error, "
                "callback_url), "
                "a AS (UPDATE inferd_attempts SET ended_ms = $3, error = (SELECT error FROM j) "
                "WHERE job_id = $4 AND attempt = $5 AND ended_ms IS NULL AND EXISTS (SELECT 1 "
                "FROM j)) "
                "SELECT state, kind, COALESCE(callback_url, '') <> '' FROM j",
                &p, "complete job", &o->err);
    if (!r)
        return o->err.code;
    if (PQntuples(r) == 0) {
        rc = err_set(&o->err, ERR_CONFLICT,
                     "job %s: attempt %llu no longer holds the lease; its result is discarded",
                     o->id, (unsigned long long)o->token);
    } else if (pg_int(r, 0, 1) == JOB_KIND_INFER && strcmp(PQgetvalue(r, 0, 2), "t") != 0) {
        pg_note_final(t, o->id, (enum job_state)pg_int(r, 0, 0)); /* no webhook, no batch job */
    } else {
        rc = pg_job_became_final(t, o->id, &o->err);
    }
    PQclear(r);
    return rc;
}

int pg_ops_complete(struct pg_txn *t, struct queue_op **ops, size_t n, struct err *e)
{
    struct buf ids = {0}, tokens = {0}, results = {0}, lens = {0};
    struct pg_params p = {0};
    PGresult *r = NULL;
    int rc = 0;

    rc = buf_puts(&ids, "{") | buf_puts(&tokens, "{") | buf_puts(&results, "{") |
         buf_puts(&lens, "{");
    for (size_t i = 0; rc == 0 && i < n; i++) {
        char num[24];
        rc = pg_array_add(&ids, ops[i]->id);
        snprintf(num, sizeof(num), "%llu", (unsigned long long)ops[i]->token);
        rc = rc ? rc : pg_array_add(&tokens, num);
        rc = rc ? rc
                : pg_array_add_bytea(&results, ops[i]->data, ops[i]->data ? ops[i]->data_len : 0);
        snprintf(num, sizeof(num), "%lld", (long long)ops[i]->json_len);
        rc = rc ? rc : pg_array_add(&lens, num);
    }
    rc = rc ? rc
            : buf_puts(&ids, "}") | buf_puts(&tokens, "}") | buf_puts(&results, "}") |
                  buf_puts(&lens, "}");
    if (rc != 0) {
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    pg_p_str(&p, ids.data);
    pg_p_str(&p, tokens.data);
    pg_p_str(&p, results.data);
    pg_p_str(&p, lens.data);
    pg_p_int(&p, clock_now_ms());
    /* as pg_op_complete, for every outcome of the group in one round trip */
    r = pg_exec(t->q, t->c,
                "WITH v AS (SELECT * FROM unnest($1::text[], $2::int[], $3::bytea[], "
                "$4::bigint[]) AS v(id, token, result, json_len)), "
                "j AS (UPDATE inferd_jobs SET state = CASE WHEN cancel_requested = 1 THEN 4 ELSE "
                "2 END, result = CASE WHEN cancel_requested = 1 THEN NULL ELSE v.result END, "
                "result_json_len = v.json_len, finished_ms = $5, error = CASE WHEN "
                "cancel_requested = 1 THEN 'cancelled while running; result discarded' ELSE "
                "NULL END, input = NULL FROM v WHERE inferd_jobs.id = v.id AND "
                "inferd_jobs.state = 1 AND inferd_jobs.attempts = v.token RETURNING "
                "inferd_jobs.id, inferd_jobs.attempts, inferd_jobs.state, inferd_jobs.kind, "
                "inferd_jobs.error, inferd_jobs.callback_url), "
                "a AS (UPDATE inferd_attempts SET ended_ms = $5, error = j.error FROM j WHERE "
                "inferd_attempts.job_id = j.id AND inferd_attempts.attempt = j.attempts AND "
                "inferd_attempts.ended_ms IS NULL) "
                "SELECT id, state, kind, COALESCE(callback_url, '') <> '' FROM j",
                &p, "complete jobs", e);
    if (!r) {
        rc = e->code;
        goto cleanup;
    }
    for (size_t i = 0; rc == 0 && i < n; i++) {
        struct queue_op *o = ops[i];
        int row = -1;
        for (int k = 0; row < 0 && k < PQntuples(r); k++)
            if (strcmp(PQgetvalue(r, k, 0), o->id) == 0)
                row = k;
        if (row < 0) {
            o->rc = err_set(&o->err, ERR_CONFLICT,
                            "job %s: attempt %llu no longer holds the lease; its result is "
                            "discarded",
                            o->id, (unsigned long long)o->token);
        } else if (pg_int(r, row, 2) == JOB_KIND_INFER && strcmp(PQgetvalue(r, row, 3), "t")) {
            pg_note_final(t, o->id, (enum job_state)pg_int(r, row, 1));
            o->rc = 0;
        } else {
            o->rc = pg_job_became_final(t, o->id, &o->err);
            if (o->rc != 0) { /* the statement's changes stand: the group runs again */
                *e = o->err;
                rc = o->rc;
            }
        }
    }
cleanup:
    PQclear(r);
    buf_release(&ids);
    buf_release(&tokens);
    buf_release(&results);
    buf_release(&lens);
    return rc;
}

int pg_op_fail(struct pg_txn *t, struct queue_op *o)
{
    int64_t now = clock_now_ms(), backoff;
    struct pg_params p = {0};
    struct job *j = NULL;
    int final, end_state, rc;

    rc = pg_load_job(t->q, t->c, o->id, 1, &j, &o->err);
    if (rc != 0)
        return rc;
    if (j->state != JOB_RUNNING || (uint64_t)j->attempts != o->token) {
        job_free(j);
        return err_set(&o->err, ERR_CONFLICT, "job %s: attempt %llu no longer holds the lease",
                       o->id, (unsigned long long)o->token);
    }
    end_state = (int)queue_after_failure(&t->q->cfg, j, o->released, o->retryable,
                                         o->retry_after_ms, &backoff);
    final = end_state != JOB_QUEUED;
    job_free(j);
    /* a failed job keeps its input: POST /v1/jobs/{id}/retry sends it back */
    pg_p_int(&p, end_state);
    pg_p_str(&p, o->data);
    if (final)
        pg_p_int(&p, now);
    else
        pg_p_str(&p, NULL);
    pg_p_int(&p, now + backoff);
    pg_p_int(&p, o->released && !final ? 1 : 0);
    pg_p_str(&p, o->id);
    pg_p_int(&p, (int64_t)o->token);
    rc = fenced(t, o,
                "UPDATE inferd_jobs SET state = $1, error = $2, finished_ms = $3, available_ms = "
                "$4, extra_attempts = extra_attempts + $5 WHERE id = $6 AND state = 1 AND "
                "attempts = $7",
                &p);
    if (rc == 0)
        rc = pg_attempt_ended(t, o->id, o->token, o->data ? o->data : "failed", &o->err);
    if (rc != 0)
        return rc;
    o->failed_final = end_state == JOB_FAILED;
    if (!final) {
        pg_txn_queued_add(t, 1);
        t->runnable = 1;
        return 0;
    }
    return pg_job_became_final(t, o->id, &o->err);
}

int pg_op_cancel(struct pg_txn *t, struct queue_op *o)
{
    struct pg_params p = {0};
    struct job *j = NULL;
    int rc;

    rc = pg_load_job(t->q, t->c, o->id, 1, &j, &o->err);
    if (rc != 0)
        return rc;
    if (job_state_is_final(j->state)) {
        rc =
            err_set(&o->err, ERR_CONFLICT, "job %s is already %s", o->id, job_state_name(j->state));
        job_free(j);
        return rc;
    }
    pg_p_int(&p, clock_now_ms());
    pg_p_str(&p, o->id);
    if (j->state == JOB_QUEUED) {
        rc = pg_run(t->q, t->c,
                    "UPDATE inferd_jobs SET state = 4, finished_ms = $1, input = NULL, error = "
                    "'cancelled' WHERE id = $2 AND state = 0",
                    &p, "cancel", &o->err);
        if (rc == 0)
            pg_txn_queued_add(t, -1);
    } else {
        rc = pg_run(t->q, t->c,
                    "UPDATE inferd_jobs SET cancel_requested = 1 WHERE id = $2 AND state = 1 AND "
                    "$1::bigint IS NOT NULL",
                    &p, "cancel", &o->err);
        /* its worker, in whichever process, hears of it at the commit */
        p = (struct pg_params){0};
        pg_p_str(&p, o->id);
        if (rc == 0)
            rc = pg_run(t->q, t->c, "SELECT pg_notify('inferd_cancel', $1)", &p, "cancel", &o->err);
    }
    job_free(j);
    if (rc == 0)
        rc = pg_load_job(t->q, t->c, o->id, 0, &o->job, &o->err);
    if (rc == 0 && o->job->state == JOB_CANCELLED)
        rc = pg_job_became_final(t, o->id, &o->err);
    return rc;
}

int pg_op_retry(struct pg_txn *t, struct queue_op *o)
{
    struct pg_params p = {0};
    PGresult *r;
    int rc = 0;

    pg_p_str(&p, o->id);
    r = pg_exec(t->q, t->c,
                "UPDATE inferd_jobs SET state = 0, extra_attempts = attempts, available_ms = 0, "
                "finished_ms = NULL, expires_ms = 0, error = NULL WHERE id = $1 AND state IN "
                "(3, 5) AND (input IS NOT NULL OR input_location IS NOT NULL)",
                &p, "retry", &o->err);
    if (!r)
        return o->err.code;
    if (pg_changed(r) == 0) {
        struct job *j = NULL;
        rc = pg_load_job(t->q, t->c, o->id, 0, &j, &o->err);
        if (rc == 0)
            rc = err_set(&o->err, ERR_CONFLICT,
                         "job %s is %s; only failed or expired jobs are sent back to the queue",
                         o->id, job_state_name(j->state));
        job_free(j);
        PQclear(r);
        return rc;
    }
    PQclear(r);
    pg_txn_queued_add(t, 1);
    t->runnable = 1;
    return pg_load_job(t->q, t->c, o->id, 0, &o->job, &o->err);
}
