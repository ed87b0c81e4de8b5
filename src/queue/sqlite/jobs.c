/*
 * jobs.c: jobs in the SQLite queue: the operations the writer thread runs (enqueue, lease,
 * finish, cancel, retry), the calls that submit them, and the reads (get, list, counts).
 */
#define _GNU_SOURCE
#include "queue/sqlite/internal.h"
#include "core/clock.h"
#include "core/id.h"
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

/* ---- operations (writer thread, inside the group's transaction) ---- */

/* Ends attempt `attempt` of job `id` in its history, with `error` (NULL: it succeeded). */
int sq_attempt_ended(struct sqlite_queue *q, const char *id, uint64_t attempt, const char *error,
                     struct err *e)
{
    /* no error given: the job's own (set when a cancel ended it; NULL when it succeeded) */
    sqlite3_stmt *st = sq_prepare(q->wdb, "UPDATE attempts SET ended_ms = ?1, error = COALESCE("
                                          "?2, (SELECT error FROM jobs WHERE id = ?3)) WHERE "
                                          "job_id = ?3 AND attempt = ?4 AND ended_ms IS NULL");
    int rc = 0;

    if (!st)
        return sq_db_err(q->wdb, e, "prepare");
    sqlite3_bind_int64(st, 1, clock_now_ms());
    sqlite3_bind_text(st, 2, error, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 4, (int64_t)attempt);
    if (sqlite3_step(st) != SQLITE_DONE)
        rc = sq_db_err(q->wdb, e, "record attempt");
    sq_finish(st);
    return rc;
}

int sq_op_enqueue(struct sqlite_queue *q, struct queue_op *o)
{
    const struct job_spec *s = o->spec;
    sqlite3_stmt *st = NULL;
    int rc = 0;

    if (s->idempotency_key) {
        /* a key is the tenant's own: another tenant's same key is another job */
        st = sq_prepare(q->wdb, "SELECT id, request_hash FROM jobs WHERE tenant = ? AND "
                                "idem_key = ?");
        if (!st)
            return sq_db_err(q->wdb, &o->err, "prepare");
        sqlite3_bind_text(st, 1, queue_tenant_stored(s->tenant), -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, s->idempotency_key, -1, SQLITE_STATIC);
        if (sqlite3_step(st) == SQLITE_ROW) {
            snprintf(o->id_out, sizeof(o->id_out), "%s", sqlite3_column_text(st, 0));
            rc = queue_idem_match(s, o->id_out, (const char *)sqlite3_column_text(st, 1), &o->err);
            o->existed = 1;
        }
        sq_finish(st);
        st = NULL;
        if (o->existed)
            return rc;
    }
    if ((rc = queue_admit(&q->cfg, q->n_queued, 1, &o->err)) != 0)
        return rc;
    id_new(o->id_out);
    return sq_insert_job(q, s, o->id_out, &o->err);
}

int sq_insert_job(struct sqlite_queue *q, const struct job_spec *s, const char *id, struct err *e)
{
    int64_t now = clock_now_ms();
    sqlite3_stmt *st;
    int rc = 0;

    st = sq_prepare(q->wdb,
                    "INSERT INTO jobs (id, model, state, priority, max_attempts, created_ms, "
                    "expires_ms, lease_timeout_ms, ttl_s, input, input_json_len, input_location, "
                    "output_location, callback_url, idem_key, request_hash, kind, batch_id, "
                    "tenant) VALUES (?, ?, 0, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)");
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
    sqlite3_bind_text(st, 18, queue_tenant_stored(s->tenant), -1, SQLITE_STATIC);
    if (sqlite3_step(st) != SQLITE_DONE)
        rc = sq_db_err(q->wdb, e, "insert job");
    sq_finish(st);
    if (rc == 0)
        q->n_queued++;
    return rc;
}

/* Leases job `id`, the `index`-th of this lease, into `*out` (NULL on failure). */
static int lease_one(struct sqlite_queue *q, struct queue_op *o, const char *id, size_t index,
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
int sq_op_lease(struct sqlite_queue *q, struct queue_op *o)
{
    int64_t now = clock_now_ms();
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
static int fenced_update(struct sqlite_queue *q, struct queue_op *o, sqlite3_stmt *st)
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

int sq_op_extend(struct sqlite_queue *q, struct queue_op *o)
{
    sqlite3_stmt *st = sq_prepare(q->wdb, "UPDATE jobs SET lease_until_ms = ? WHERE id = ? AND "
                                          "state = 1 AND attempts = ?");

    if (st) {
        sqlite3_bind_int64(st, 1, clock_now_ms() + o->lease_ms);
        sqlite3_bind_text(st, 2, o->id, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 3, (int64_t)o->token);
    }
    return fenced_update(q, o, st);
}

int sq_op_complete(struct sqlite_queue *q, struct queue_op *o)
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
        sqlite3_bind_int64(st, 3, clock_now_ms());
        sqlite3_bind_text(st, 4, o->id, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 5, (int64_t)o->token);
    }
    rc = fenced_update(q, o, st);
    if (rc == 0)
        rc = sq_attempt_ended(q, o->id, o->token, NULL, &o->err);
    return rc ? rc : sq_job_became_final(q, o->id, &o->err);
}

int sq_op_fail(struct sqlite_queue *q, struct queue_op *o)
{
    int64_t now = clock_now_ms(), backoff;
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
    int end_state = (int)queue_after_failure(&q->cfg, j, o->released, o->retryable,
                                             o->retry_after_ms, &backoff);
    final = end_state != JOB_QUEUED;
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
        rc = sq_attempt_ended(q, o->id, o->token, o->data ? o->data : "failed", &o->err);
    if (rc != 0)
        return rc;
    o->failed_final = end_state == JOB_FAILED;
    if (!final) {
        q->n_queued++;
        return 0;
    }
    return sq_job_became_final(q, o->id, &o->err);
}

int sq_op_cancel(struct sqlite_queue *q, struct queue_op *o)
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
    sqlite3_bind_int64(st, 1, clock_now_ms());
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

int sq_op_retry(struct sqlite_queue *q, struct queue_op *o)
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

/* ---- reads (their own connection) ---- */

static int load_notifications(sqlite3 *db, struct job *j)
{
    sqlite3_stmt *st = sq_prepare(db, "SELECT event_id, at_ms, http_status, error FROM deliveries "
                                      "WHERE job_id = ? ORDER BY at_ms");
    int rc = 0;

    if (!st)
        return ERR_IO;
    sqlite3_bind_text(st, 1, j->id, -1, SQLITE_STATIC);
    while (rc == 0 && sqlite3_step(st) == SQLITE_ROW)
        rc = queue_job_add_notification(j, (const char *)sqlite3_column_text(st, 0),
                                        sqlite3_column_int64(st, 1), sqlite3_column_int(st, 2),
                                        (const char *)sqlite3_column_text(st, 3));
    sq_finish(st);
    return rc;
}

/* Fills j->history from the attempts table. */
int sq_load_history(sqlite3 *db, struct job *j)
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

static int sq_get(struct queue *qb, const char *id, int want_result, struct job **out,
                  struct err *e)
{
    struct sqlite_queue *q = sq_of(qb);
    int rc;

    pthread_mutex_lock(&q->read_lock);
    rc = sq_load_job(q->rdb, id, out, e);
    if (rc == 0 && want_result && (*out)->state == JOB_SUCCEEDED) {
        sqlite3_stmt *st =
            sq_prepare(q->rdb, "SELECT result, result_json_len FROM jobs WHERE id = ?");
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
    if (rc == 0 && sq_load_history(q->rdb, *out) != 0)
        rc = sq_db_err(q->rdb, e, "read attempts");
    pthread_mutex_unlock(&q->read_lock);
    if (rc != 0) {
        job_free(*out);
        *out = NULL;
    }
    return rc;
}

static int sq_list(struct queue *qb, const struct queue_list_filter *f, struct job **out, size_t *n,
                   struct err *e)
{
    struct sqlite_queue *q = sq_of(qb);
    sqlite3_stmt *st;
    int rc = 0;

    pthread_mutex_lock(&q->read_lock);
    if (!f->tenant)
        st = sq_prepare(q->rdb, "SELECT " JOB_COLUMNS
                                " FROM jobs WHERE kind = 0 AND (?1 < 0 OR state = ?1) AND "
                                "(?2 IS NULL OR model = ?2) AND (?3 IS NULL OR seq < (SELECT seq "
                                "FROM jobs WHERE id = ?3)) AND (?5 < 0 OR cancel_requested = ?5) "
                                "ORDER BY seq DESC LIMIT ?4");
    else /* one tenant's: its own jobs, newest first, from the index, never the whole table */
        st = sq_prepare(q->rdb, "SELECT " JOB_COLUMNS
                                " FROM jobs INDEXED BY jobs_tenant WHERE tenant = ?6 AND kind = 0 "
                                "AND (?1 < 0 OR state = ?1) AND (?2 IS NULL OR model = ?2) AND "
                                "(?3 IS NULL OR seq < (SELECT seq FROM jobs WHERE id = ?3)) AND "
                                "(?5 < 0 OR cancel_requested = ?5) ORDER BY seq DESC LIMIT ?4");
    if (!st) {
        rc = sq_db_err(q->rdb, e, "prepare");
        goto cleanup;
    }
    sqlite3_bind_int(st, 1, f->state);
    sqlite3_bind_text(st, 2, f->model, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, f->cursor, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 4, f->limit);
    sqlite3_bind_int(st, 5, f->state == JOB_RUNNING ? f->cancelling : -1);
    if (f->tenant)
        sqlite3_bind_text(st, 6, f->tenant, -1, SQLITE_STATIC);
    while (rc == 0 && (int)*n < f->limit && sqlite3_step(st) == SQLITE_ROW) {
        struct job *j = sq_job_from_row(st);
        if (!j) {
            rc = err_set(e, ERR_NOMEM, "out of memory");
            break;
        }
        out[(*n)++] = j;
        if (load_notifications(q->rdb, j) != 0 || sq_load_history(q->rdb, j) != 0)
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

static int sq_counts(struct queue *qb, int64_t counts[JOB_N_STATES], struct err *e)
{
    struct sqlite_queue *q = sq_of(qb);
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

static int64_t sq_queued(struct queue *qb)
{
    return atomic_load(&sq_of(qb)->n_queued_committed);
}

const struct queue_job_ops sqlite_job_ops = {
    .enqueue = queue_writer_enqueue,
    .enqueue_async = queue_writer_enqueue_async,
    .lease_many = queue_writer_lease_many,
    .finish_many = queue_writer_finish_many,
    .extend = queue_writer_extend,
    .cancel = queue_writer_cancel,
    .retry = queue_writer_retry,
    .get = sq_get,
    .list = sq_list,
    .counts = sq_counts,
    .queued = sq_queued,
    .worker_beat = queue_writer_worker_beat,
    .worker_leave = queue_writer_worker_leave,
    .workers_list = sq_workers_list,
};
