/*
 * sweep.c: what the PostgreSQL queue's sweeper does in every process, and the workers'
 * heartbeats: queued jobs past their ttl expire, attempts whose lease ran out or whose worker
 * went silent are lost (the job runs again, or fails on its last attempt), finished jobs past
 * --result-ttl-s go. Rows are taken with FOR UPDATE SKIP LOCKED, so the sweepers of several
 * processes share the work and never wait on a writer; each step re-checks the row's state
 * under its lock. Runs inside a transaction of the sweeper (pg.c) or, for a worker's clean
 * stop, of the writer.
 */
#define _GNU_SOURCE
#include "queue/postgres/pg_internal.h"
#include "core/clock.h"
#include "core/log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/*
 * A running attempt is lost (its lease ran out, or its worker is presumed dead): it counts,
 * and the job runs again at once, or fails when that was its last attempt. Its late outcome is
 * fenced out: the next lease makes another attempt number. The row is locked by the caller.
 */
static int attempt_lost(struct pg_txn *t, const char *id, const char *why, int64_t now,
                        struct err *e)
{
    struct pg_params p = {0};
    struct job *j = NULL;
    int exhausted, rc;

    rc = pg_load_job(t->q, t->c, id, 1, &j, e);
    if (rc != 0)
        return rc == ERR_NOT_FOUND ? 0 : rc;
    if (j->state != JOB_RUNNING) {
        job_free(j);
        return 0;
    }
    exhausted = j->attempts - j->attempts_uncounted >= j->max_attempts;
    pg_p_int(&p, now);
    pg_p_str(&p, id);
    pg_p_str(&p, why);
    rc = pg_run(t->q, t->c,
                exhausted ? "UPDATE inferd_jobs SET state = 3, finished_ms = $1, error = $3 || ' "
                            "on the last attempt' WHERE id = $2 AND state = 1"
                          : "UPDATE inferd_jobs SET state = 0, available_ms = $1, error = $3 "
                            "WHERE id = $2 AND state = 1",
                &p, "requeue job", e);
    if (rc == 0)
        rc = pg_attempt_ended(t, id, (uint64_t)j->attempts, why, e);
    if (rc == 0 && exhausted) {
        log_warn("queue", "job failed",
                 "job=%s model=%s attempts=%d error=\"%s on the last attempt\"", id, j->model,
                 j->attempts, why);
        rc = pg_job_became_final(t, id, e);
    } else if (rc == 0) {
        pg_txn_queued_add(t, 1);
        t->runnable = 1;
    }
    job_free(j);
    return rc;
}

/* The running jobs of worker `wid` are lost (`why`); when none is left, it leaves the list.
 * Sets *n to how many were lost. */
static int reap_worker(struct pg_txn *t, const char *wid, const char *why, int64_t now, int *n,
                       struct err *e)
{
    struct pg_params p = {0};
    PGresult *r;
    int rows, rc = 0;

    *n = 0;
    pg_p_str(&p, wid);
    r = pg_exec(t->q, t->c,
                "SELECT id FROM inferd_jobs WHERE state = 1 AND worker = $1 LIMIT 64 FOR UPDATE "
                "SKIP LOCKED",
                &p, "read a worker's jobs", e);
    if (!r)
        return e->code;
    rows = PQntuples(r);
    for (int i = 0; rc == 0 && i < rows; i++)
        rc = attempt_lost(t, PQgetvalue(r, i, 0), why, now, e);
    PQclear(r);
    if (rc != 0)
        return rc;
    *n = rows;
    if (rows == 64)
        return 0; /* more: the next sweep goes on before the worker leaves */
    if (rows > 0)
        queue_log_worker_lost(wid, rows, why);
    return pg_run(t->q, t->c, "DELETE FROM inferd_workers WHERE id = $1", &p, "worker leaves", e);
}

int pg_op_worker_leave(struct pg_txn *t, struct queue_op *o)
{
    int n;

    return reap_worker(t, o->id, "its worker stopped", clock_now_ms(), &n, &o->err);
}

int pg_op_worker_beat(struct pg_txn *t, struct queue_op *o)
{
    const struct queue_worker *w = o->wk;
    struct pg_params p = {0};

    pg_p_str(&p, w->id);
    pg_p_str(&p, w->host);
    pg_p_int(&p, w->pid);
    pg_p_int(&p, w->started_ms);
    pg_p_int(&p, clock_now_ms());
    pg_p_int(&p, w->timeout_ms);
    pg_p_int(&p, w->jobs_running);
    return pg_run(t->q, t->c,
                  "INSERT INTO inferd_workers (id, host, pid, started_ms, heartbeat_ms, "
                  "timeout_ms, jobs_running) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) "
                  "DO UPDATE SET heartbeat_ms = $5, timeout_ms = $6, jobs_running = $7",
                  &p, "worker heartbeat", &o->err);
}

/* Workers silent past their timeout are presumed dead: their running jobs run again now. Only
 * after a whole timeout of this process reaching PostgreSQL: a worker cut off with us had no
 * way to beat. */
static int reap_dead_workers(struct pg_txn *t, int64_t now, struct err *e)
{
    struct pg_params p = {0};
    PGresult *r;
    int rc = 0;

    pg_p_int(&p, now);
    pg_p_int(&p, atomic_load(&t->q->up_since_ms));
    r = pg_exec(t->q, t->c,
                "SELECT id, ($1::bigint - heartbeat_ms) / 1000 FROM inferd_workers WHERE "
                "heartbeat_ms + timeout_ms <= $1::bigint AND $2::bigint + timeout_ms <= "
                "$1::bigint LIMIT 8 FOR UPDATE SKIP LOCKED",
                &p, "read workers", e);
    if (!r)
        return e->code;
    for (int i = 0; rc == 0 && i < PQntuples(r); i++) {
        char why[160];
        int n;
        snprintf(why, sizeof(why), "its worker %.95s sent no heartbeat for %lld s",
                 PQgetvalue(r, i, 0), (long long)pg_int(r, i, 1));
        rc = reap_worker(t, PQgetvalue(r, i, 0), why, now, &n, e);
    }
    PQclear(r);
    return rc;
}

/* Removes what finished past its retention (queue_retain_before_ms), a bounded amount per
 * pass: inference jobs with their webhook records and attempts (a job whose webhook is still
 * pending stays), then batch runs with their tasks and progress (a run with a task still
 * running, or its webhook pending, stays; schedules always do). */
static int retain(struct pg_txn *t, int64_t now, struct err *e)
{
    int64_t before = queue_retain_before_ms(&t->q->cfg, now);
    struct pg_params p = {0}, pr = {0};
    PGresult *r;
    long jobs, runs;

    pg_p_int(&p, before);
    pg_p_int(&p, PG_RETAIN_MAX);
    r = pg_exec(t->q, t->c,
                "WITH gone AS (SELECT id FROM inferd_jobs j WHERE state >= 2 AND finished_ms <= "
                "$1 AND kind = 0 AND batch_id IS NULL AND NOT EXISTS (SELECT 1 FROM "
                "inferd_outbox o WHERE o.job_id = j.id AND o.done = 0) ORDER BY finished_ms "
                "LIMIT $2 FOR UPDATE SKIP LOCKED), "
                "d1 AS (DELETE FROM inferd_deliveries WHERE job_id IN (SELECT id FROM gone)), "
                "d2 AS (DELETE FROM inferd_outbox WHERE job_id IN (SELECT id FROM gone)), "
                "d3 AS (DELETE FROM inferd_attempts WHERE job_id IN (SELECT id FROM gone)) "
                "DELETE FROM inferd_jobs WHERE id IN (SELECT id FROM gone)",
                &p, "retention", e);
    if (!r)
        return e->code;
    jobs = pg_changed(r);
    PQclear(r);
    pg_p_int(&pr, before);
    pg_p_int(&pr, PG_RETAIN_RUNS_MAX);
    r = pg_exec(t->q, t->c,
                "WITH gone AS (SELECT id FROM inferd_batch_jobs b WHERE state >= 2 AND schedule "
                "IS NULL AND finished_ms <= $1 AND NOT EXISTS (SELECT 1 FROM inferd_outbox o "
                "WHERE o.job_id = b.id AND o.done = 0) AND NOT EXISTS (SELECT 1 FROM inferd_jobs "
                "j WHERE j.batch_id = b.id AND j.state < 2) ORDER BY finished_ms LIMIT $2 FOR "
                "UPDATE SKIP LOCKED), "
                "tasks AS (SELECT id FROM inferd_jobs WHERE batch_id IN (SELECT id FROM gone)), "
                "d1 AS (DELETE FROM inferd_deliveries WHERE job_id IN (SELECT id FROM gone) OR "
                "job_id IN (SELECT id FROM tasks)), "
                "d2 AS (DELETE FROM inferd_outbox WHERE job_id IN (SELECT id FROM gone) OR "
                "job_id IN (SELECT id FROM tasks)), "
                "d3 AS (DELETE FROM inferd_attempts WHERE job_id IN (SELECT id FROM tasks)), "
                "d4 AS (DELETE FROM inferd_batch_progress WHERE batch_id IN (SELECT id FROM "
                "gone)), "
                "d5 AS (DELETE FROM inferd_jobs WHERE id IN (SELECT id FROM tasks)) "
                "DELETE FROM inferd_batch_jobs WHERE id IN (SELECT id FROM gone)",
                &pr, "retention of batch runs", e);
    if (!r)
        return e->code;
    runs = pg_changed(r);
    PQclear(r);
    if (jobs > 0 || runs > 0)
        log_debug("queue", "finished work past its retention removed", "jobs=%ld batch_runs=%ld",
                  jobs, runs);
    return 0;
}

int pg_sweep(struct pg_txn *t, int64_t now, int retain_now, struct err *e)
{
    struct pg_params p = {0};
    PGresult *r;
    int rc = 0;

    /* queued jobs past their ttl: expired */
    pg_p_int(&p, now);
    r = pg_exec(t->q, t->c,
                "UPDATE inferd_jobs SET state = 5, finished_ms = $1, error = 'its "
                "ttl passed before a worker started it' WHERE seq IN (SELECT seq FROM inferd_jobs "
                "WHERE state = 0 AND expires_ms > 0 AND expires_ms <= $1 LIMIT 64 FOR UPDATE SKIP "
                "LOCKED) RETURNING id",
                &p, "expire jobs", e);
    if (!r)
        return e->code;
    for (int i = 0; rc == 0 && i < PQntuples(r); i++)
        rc = pg_job_became_final(t, PQgetvalue(r, i, 0), e);
    PQclear(r);
    if (rc != 0)
        return rc;
    /* a lease that ran out: the attempt is lost; count it and go again (or give up) */
    r = pg_exec(t->q, t->c,
                "SELECT id FROM inferd_jobs WHERE state = 1 AND lease_until_ms <= $1 LIMIT 64 "
                "FOR UPDATE SKIP LOCKED",
                &p, "read expired leases", e);
    if (!r)
        return e->code;
    for (int i = 0; rc == 0 && i < PQntuples(r); i++) {
        rc = attempt_lost(t, PQgetvalue(r, i, 0), "its lease expired", now, e);
        if (rc == 0)
            log_warn("queue", "lease expired", "job=%s", PQgetvalue(r, i, 0));
    }
    PQclear(r);
    if (rc == 0)
        rc = reap_dead_workers(t, now, e);
    if (rc == 0 && retain_now)
        rc = retain(t, now, e);
    return rc;
}

int pg_workers_list(struct queue *qb, struct queue_worker **out, size_t *n, struct err *e)
{
    struct pg_queue *q = pgq(qb);
    struct pg_params p = {0};
    struct queue_worker *v = NULL;
    PGconn *c = pg_take(q, e);
    PGresult *r;
    int rows;

    *out = NULL;
    *n = 0;
    if (!c)
        return e->code;
    pg_p_int(&p, clock_now_ms());
    r = pg_exec(q, c,
                "SELECT id, host, pid, started_ms, heartbeat_ms, timeout_ms, jobs_running FROM "
                "inferd_workers WHERE heartbeat_ms + timeout_ms > $1 ORDER BY started_ms, id",
                &p, "list workers", e);
    pg_give(q, c);
    if (!r)
        return e->code;
    rows = PQntuples(r);
    if (rows > 0 && !(v = calloc((size_t)rows, sizeof(*v)))) {
        PQclear(r);
        return err_set(e, ERR_NOMEM, "out of memory");
    }
    for (int i = 0; i < rows; i++) {
        struct queue_worker *w = &v[i];
        snprintf(w->id, sizeof(w->id), "%s", PQgetvalue(r, i, 0));
        snprintf(w->host, sizeof(w->host), "%s", PQgetvalue(r, i, 1));
        w->pid = (int)pg_int(r, i, 2);
        w->started_ms = pg_int(r, i, 3);
        w->heartbeat_ms = pg_int(r, i, 4);
        w->timeout_ms = pg_int(r, i, 5);
        w->jobs_running = (int)pg_int(r, i, 6);
    }
    PQclear(r);
    *out = v;
    *n = (size_t)rows;
    return 0;
}
