/*
 * reads.c: reading jobs from the PostgreSQL queue (get, a page of the listing, counts), each
 * on a connection of the pool, never the writer's: reads do not wait on group commits.
 */
#define _GNU_SOURCE
#include "queue/postgres/pg_internal.h"
#include "core/log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int pg_get(struct queue *qb, const char *id, int want_result, struct job **out, struct err *e)
{
    struct pg_queue *q = pgq(qb);
    PGconn *c = pg_take(q, e);
    int rc;

    *out = NULL;
    if (!c)
        return e->code;
    rc = pg_load_job(q, c, id, 0, out, e);
    if (rc == 0 && want_result && (*out)->state == JOB_SUCCEEDED) {
        struct pg_params p = {0};
        PGresult *r;
        pg_p_str(&p, id);
        r = pg_exec(q, c, "SELECT result, result_json_len FROM inferd_jobs WHERE id = $1", &p,
                    "read result", e);
        if (!r) {
            rc = e->code;
        } else if (PQntuples(r) == 1) {
            if (pg_bytea(r, 0, 0, &(*out)->result) != 0)
                rc = err_set(e, ERR_NOMEM, "out of memory");
            (*out)->result_json_len = pg_int(r, 0, 1);
        }
        PQclear(r);
    }
    if (rc == 0 && (pg_load_notifications(q, c, *out) != 0 || pg_load_history(q, c, *out) != 0))
        rc = err_set(e, PQstatus(c) == CONNECTION_OK ? ERR_IO : ERR_UNAVAILABLE,
                     "job store: cannot read job %s's webhooks and attempts", id);
    pg_give(q, c);
    if (rc != 0) {
        job_free(*out);
        *out = NULL;
    }
    return rc;
}

int pg_list(struct queue *qb, const struct queue_list_filter *f, struct job **out, size_t *n,
            struct err *e)
{
    struct pg_queue *q = pgq(qb);
    struct pg_params p = {0};
    PGconn *c = pg_take(q, e);
    PGresult *r = NULL;
    int rc = 0;

    if (!c)
        return e->code;
    pg_p_int(&p, f->state);
    pg_p_str(&p, f->model);
    pg_p_str(&p, f->cursor);
    pg_p_int(&p, f->limit);
    pg_p_int(&p, f->state == JOB_RUNNING ? f->cancelling : -1);
    if (!f->tenant) {
        r = pg_exec(q, c,
                    "SELECT " JOB_COLUMNS " FROM inferd_jobs WHERE kind = 0 AND ($1::int < 0 OR "
                    "state = $1::int) AND ($2::text IS NULL OR model = $2::text) AND ($3::text IS "
                    "NULL OR seq < (SELECT seq FROM inferd_jobs WHERE id = $3::text)) AND "
                    "($5::int < 0 OR cancel_requested = $5::int) ORDER BY seq DESC LIMIT $4",
                    &p, "list jobs", e);
    } else { /* one tenant's: its own jobs, newest first, from inferd_jobs_tenant */
        pg_p_str(&p, f->tenant);
        r = pg_exec(q, c,
                    "SELECT " JOB_COLUMNS " FROM inferd_jobs WHERE tenant = $6 AND kind = 0 AND "
                    "($1::int < 0 OR state = $1::int) AND ($2::text IS NULL OR model = $2::text) "
                    "AND ($3::text IS NULL OR seq < (SELECT seq FROM inferd_jobs WHERE id = "
                    "$3::text)) AND ($5::int < 0 OR cancel_requested = $5::int) ORDER BY tenant "
                    "DESC, seq DESC LIMIT $4",
                    &p, "list jobs", e);
    }
    if (!r)
        rc = e->code;
    for (int i = 0; rc == 0 && i < PQntuples(r) && i < f->limit; i++) {
        struct job *j = pg_job_from_row(r, i, 0);
        if (!j) {
            rc = err_set(e, ERR_NOMEM, "out of memory");
            break;
        }
        out[(*n)++] = j;
        /* each job as GET /v1/jobs/{id} shows it */
        if (pg_load_notifications(q, c, j) != 0 || pg_load_history(q, c, j) != 0)
            rc = err_set(e, PQstatus(c) == CONNECTION_OK ? ERR_IO : ERR_UNAVAILABLE,
                         "job store: cannot read webhooks and attempts");
    }
    PQclear(r);
    pg_give(q, c);
    if (rc != 0) {
        for (size_t i = 0; i < *n; i++) {
            job_free(out[i]);
            out[i] = NULL;
        }
        *n = 0;
    }
    return rc;
}

int pg_counts(struct queue *qb, int64_t counts[JOB_N_STATES], struct err *e)
{
    struct pg_queue *q = pgq(qb);
    PGconn *c = pg_take(q, e);
    PGresult *r;

    memset(counts, 0, sizeof(int64_t) * JOB_N_STATES);
    if (!c)
        return e->code;
    r = pg_exec(q, c, "SELECT state, COUNT(*) FROM inferd_jobs GROUP BY state", NULL, "count jobs",
                e);
    for (int i = 0; r && i < PQntuples(r); i++) {
        int64_t s = pg_int(r, i, 0);
        if (s >= 0 && s < JOB_N_STATES)
            counts[s] = pg_int(r, i, 1);
    }
    if (r)
        atomic_store(&q->n_queued, counts[JOB_QUEUED]);
    PQclear(r);
    pg_give(q, c);
    return r ? 0 : e->code;
}

int64_t pg_queued(struct queue *qb)
{
    return atomic_load(&pgq(qb)->n_queued);
}
