/*
 * schedules.c: batch jobs in the SQLite queue, read (get, list, a run's results, due
 * schedules, definitions) and changed outside a run's life (pausing schedules, a running task's
 * progress).
 */
#define _GNU_SOURCE
#include "core/log.h"
#include "queue/sqlite/internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- reading (the read connection) ---- */

int sq_batch_get(struct queue *qb, const char *id, struct batch_job **out, struct err *e)
{
    struct sqlite_queue *q = sq_of(qb);
    int rc;

    pthread_mutex_lock(&q->read_lock);
    rc = sq_load_batch(q->rdb, id, out, e);
    pthread_mutex_unlock(&q->read_lock);
    return rc;
}

int sq_batch_list(struct queue *qb, const struct queue_batch_filter *f, struct batch_job **out,
                  size_t *n, struct err *e)
{
    struct sqlite_queue *q = sq_of(qb);
    struct batch_job *v = calloc((size_t)(f->limit > 0 ? f->limit : 1), sizeof(*v));
    char(*ids)[40] = calloc((size_t)(f->limit > 0 ? f->limit : 1), 40);
    sqlite3_stmt *st;
    int rc = 0, n_ids = 0;

    *out = NULL;
    *n = 0;
    if (!v || !ids) {
        free(v);
        free(ids);
        return err_set(e, ERR_NOMEM, "out of memory");
    }
    pthread_mutex_lock(&q->read_lock);
    if (!f->tenant)
        st = sq_prepare(q->rdb, "SELECT id FROM batch_jobs WHERE parent IS NULL AND (?1 = -1 OR "
                                "state = ?1) AND (?2 = -1 OR (schedule IS NOT NULL) = ?2) "
                                "ORDER BY seq DESC LIMIT ?3");
    else /* one tenant's, from its index */
        st = sq_prepare(q->rdb, "SELECT id FROM batch_jobs INDEXED BY batch_tenant WHERE tenant = "
                                "?4 AND parent IS NULL AND (?1 = -1 OR state = ?1) AND (?2 = -1 "
                                "OR (schedule IS NOT NULL) = ?2) ORDER BY seq DESC LIMIT ?3");
    if (!st) {
        rc = sq_db_err(q->rdb, e, "prepare");
    } else {
        sqlite3_bind_int(st, 1, f->state);
        sqlite3_bind_int(st, 2, f->schedules);
        sqlite3_bind_int(st, 3, f->limit);
        if (f->tenant)
            sqlite3_bind_text(st, 4, f->tenant, -1, SQLITE_STATIC);
    }
    /* ids first: sq_load_batch() uses other statements on the same connection */
    while (rc == 0 && n_ids < f->limit && sqlite3_step(st) == SQLITE_ROW)
        snprintf(ids[n_ids++], 40, "%s", sqlite3_column_text(st, 0));
    sq_finish(st);
    for (int i = 0; rc == 0 && i < n_ids; i++) {
        struct batch_job *b = NULL;
        rc = sq_load_batch(q->rdb, ids[i], &b, e);
        if (rc == 0) {
            v[(*n)++] = *b; /* its strings move into the array */
            free(b);
        }
    }
    pthread_mutex_unlock(&q->read_lock);
    free(ids);
    if (rc != 0) {
        batch_jobs_free(v, *n);
        *n = 0;
        return rc;
    }
    *out = v;
    return 0;
}

int sq_batch_results(struct queue *qb, const char *id, char **model, char ***results, size_t *n,
                     struct err *e)
{
    struct sqlite_queue *q = sq_of(qb);
    sqlite3_stmt *st;
    char **v = NULL;
    size_t cap = 0;
    int rc = 0;

    *model = NULL;
    *results = NULL;
    *n = 0;
    pthread_mutex_lock(&q->read_lock);
    st = sq_prepare(q->rdb, "SELECT model FROM batch_jobs WHERE id = ?");
    if (st) {
        sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
        if (sqlite3_step(st) == SQLITE_ROW)
            *model = sq_col_strdup(st, 0);
        sq_finish(st);
    }
    st = sq_prepare(q->rdb, "SELECT result FROM jobs WHERE batch_id = ? AND kind = 1 AND "
                            "state = 2");
    if (!st || !*model) {
        rc = !*model ? err_set(e, ERR_NOT_FOUND, "no batch job '%.40s'", id)
                     : sq_db_err(q->rdb, e, "prepare");
    } else {
        sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
        while (rc == 0 && sqlite3_step(st) == SQLITE_ROW) {
            if (*n == cap) {
                char **nv = realloc(v, (cap ? cap * 2 : 16) * sizeof(*v));
                if (!nv) {
                    rc = err_set(e, ERR_NOMEM, "out of memory");
                    break;
                }
                v = nv;
                cap = cap ? cap * 2 : 16;
            }
            v[*n] = strndup(sqlite3_column_blob(st, 0), (size_t)sqlite3_column_bytes(st, 0));
            if (!v[(*n)++])
                rc = err_set(e, ERR_NOMEM, "out of memory");
        }
    }
    sq_finish(st);
    pthread_mutex_unlock(&q->read_lock);
    if (rc != 0) {
        for (size_t i = 0; i < *n; i++)
            free(v[i]);
        free(v);
        free(*model);
        *model = NULL;
        *n = 0;
        return rc;
    }
    *results = v;
    return 0;
}

int sq_schedules_due(struct queue *qb, int64_t now_ms, struct queue_schedule **out, size_t *n,
                     struct err *e)
{
    struct sqlite_queue *q = sq_of(qb);
    struct queue_schedule *v = NULL;
    size_t cap = 0, row = 0;
    sqlite3_stmt *st;
    int rc = 0;

    *out = NULL;
    *n = 0;
    pthread_mutex_lock(&q->read_lock);
    st = sq_prepare(q->rdb, "SELECT id, definition, schedule, next_run_ms FROM batch_jobs "
                            "INDEXED BY batch_due WHERE schedule IS NOT NULL AND state = 0 AND "
                            "next_run_ms <= ? ORDER BY next_run_ms LIMIT 100");
    if (!st) {
        rc = sq_db_err(q->rdb, e, "prepare");
    } else {
        sqlite3_bind_int64(st, 1, now_ms);
        while (rc == 0 && sqlite3_step(st) == SQLITE_ROW) {
            if (*n == cap) {
                size_t ncap = cap ? cap * 2 : 8;
                struct queue_schedule *p = realloc(v, ncap * sizeof(*p));
                if (!p) {
                    rc = err_set(e, ERR_NOMEM, "out of memory");
                    break;
                }
                v = p;
                cap = ncap;
            }
            /* a schedule that cannot be copied is left out: it is due again at the next look */
            struct queue_schedule *s = &v[*n];
            memset(s, 0, sizeof(*s));
            snprintf(s->id, sizeof(s->id), "%s", sqlite3_column_text(st, 0));
            s->definition = sq_col_strdup(st, 1);
            s->schedule = sq_col_strdup(st, 2);
            s->next_run_ms = sqlite3_column_int64(st, 3);
            if (s->definition && s->schedule && !queue_fault("schedules_due", row++)) {
                (*n)++;
            } else {
                free(s->definition);
                free(s->schedule);
                memset(s, 0, sizeof(*s));
            }
        }
    }
    sq_finish(st);
    pthread_mutex_unlock(&q->read_lock);
    if (rc != 0) {
        queue_schedules_free(v, *n);
        *n = 0;
        return rc;
    }
    *out = v;
    return 0;
}

/* ---- pausing schedules, progress of running tasks, definitions ---- */

int sq_op_batch_pause(struct sqlite_queue *q, struct queue_op *o)
{
    sqlite3_stmt *st;
    int state, is_schedule, rc;

    if ((rc = sq_batch_state(q, o, &state, &is_schedule)) != 0)
        return rc;
    if (!is_schedule)
        return err_set(&o->err, ERR_CONFLICT,
                       "batch job %s is a run, not a schedule: only schedules pause and resume",
                       o->id);
    if (state == JOB_CANCELLED)
        return err_set(&o->err, ERR_CONFLICT, "schedule %s is cancelled", o->id);
    if (state != (o->paused ? QUEUE_SCHEDULE_PAUSED : QUEUE_SCHEDULE_ACTIVE)) {
        st = sq_prepare(q->wdb, "UPDATE batch_jobs SET state = ?, next_run_ms = CASE WHEN ? > 0 "
                                "THEN ? ELSE next_run_ms END WHERE id = ?");
        if (!st)
            return sq_db_err(q->wdb, &o->err, "prepare");
        sqlite3_bind_int(st, 1, o->paused ? QUEUE_SCHEDULE_PAUSED : QUEUE_SCHEDULE_ACTIVE);
        sqlite3_bind_int64(st, 2, o->paused ? 0 : o->next_run_ms);
        sqlite3_bind_int64(st, 3, o->next_run_ms);
        sqlite3_bind_text(st, 4, o->id, -1, SQLITE_STATIC);
        if (sqlite3_step(st) != SQLITE_DONE)
            rc = sq_db_err(q->wdb, &o->err, "pause schedule");
        sq_finish(st);
        if (rc == 0)
            log_info("batch", o->paused ? "schedule paused" : "schedule resumed", "schedule=%s",
                     o->id);
    }
    if (rc == 0)
        rc = sq_load_batch(q->wdb, o->id, o->batch_out, &o->err);
    return rc;
}

int sq_op_batch_progress(struct sqlite_queue *q, struct queue_op *o)
{
    /* only while this attempt holds the task: a stale attempt cannot add to a finished run */
    sqlite3_stmt *st =
        sq_prepare(q->wdb, "INSERT INTO batch_progress (task_id, batch_id, records) "
                           "SELECT ?1, ?2, ?3 WHERE EXISTS (SELECT 1 FROM jobs WHERE "
                           "id = ?1 AND state = 1 AND attempts = ?4) "
                           "ON CONFLICT(task_id) DO UPDATE SET records = ?3");
    int rc = 0;

    if (!st)
        return sq_db_err(q->wdb, &o->err, "prepare");
    sqlite3_bind_text(st, 1, o->id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, o->batch_id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 3, o->records);
    sqlite3_bind_int64(st, 4, (int64_t)o->token);
    if (sqlite3_step(st) != SQLITE_DONE)
        rc = sq_db_err(q->wdb, &o->err, "record progress");
    sq_finish(st);
    return rc;
}

int sq_batch_definition(struct queue *qb, const char *id, struct queue_schedule **out,
                        struct err *e)
{
    struct sqlite_queue *q = sq_of(qb);
    struct queue_schedule *s = calloc(1, sizeof(*s));
    sqlite3_stmt *st;
    int rc = 0;

    *out = NULL;
    if (!s)
        return err_set(e, ERR_NOMEM, "out of memory");
    pthread_mutex_lock(&q->read_lock);
    st = sq_prepare(q->rdb, "SELECT definition, schedule, COALESCE(next_run_ms, 0), state, "
                            "tenant FROM batch_jobs WHERE id = ?");
    if (!st) {
        rc = sq_db_err(q->rdb, e, "prepare");
    } else {
        sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
        if (sqlite3_step(st) == SQLITE_ROW) {
            snprintf(s->id, sizeof(s->id), "%s", id);
            s->definition = sq_col_strdup(st, 0);
            s->schedule = sqlite3_column_type(st, 1) == SQLITE_NULL ? NULL : sq_col_strdup(st, 1);
            s->next_run_ms = sqlite3_column_int64(st, 2);
            s->state = sqlite3_column_int(st, 3);
            if (!s->definition || (sqlite3_column_type(st, 1) != SQLITE_NULL && !s->schedule) ||
                queue_tenant_set(&s->tenant, (const char *)sqlite3_column_text(st, 4)) != 0)
                rc = err_set(e, ERR_NOMEM, "out of memory");
        } else {
            rc = err_set(e, ERR_NOT_FOUND, "no batch job '%.40s'", id);
        }
    }
    sq_finish(st);
    pthread_mutex_unlock(&q->read_lock);
    if (rc != 0) {
        queue_schedules_free(s, 1);
        return rc;
    }
    *out = s;
    return 0;
}

const struct queue_batch_ops sqlite_batch_ops = {
    .create = queue_writer_batch_create,
    .get = sq_batch_get,
    .list = sq_batch_list,
    .cancel = queue_writer_batch_cancel,
    .pause = queue_writer_batch_pause,
    .results = sq_batch_results,
    .definition = sq_batch_definition,
    .progress = queue_writer_batch_progress,
    .schedules_due = sq_schedules_due,
};
