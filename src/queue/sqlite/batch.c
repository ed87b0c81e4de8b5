/*
 * batch.c: batch runs in the SQLite queue (schedules and reads: schedules.c).
 *
 * A run is a row of batch_jobs plus one job (kind JOB_KIND_BATCH_TASK) per input object,
 * stored in one commit. Workers lease tasks like any job; the final-state hook of a task
 * (sq_batch_task_final, called inside the transaction that made the task final) counts it in
 * its run, so a run's progress never disagrees with its tasks: when the last task succeeds the
 * finishing job is queued in that same commit, and when a task fails for good the run fails
 * and its other tasks are cancelled in that commit too. A schedule is a row with a cron
 * expression and the time of its next run; creating a run moves that time in the same commit,
 * and (parent, run_at_ms) is unique, so each scheduled minute runs once. A schedule's state is
 * 0 (active), 1 (paused: never due) or 4 (cancelled). batch_progress holds, per running task,
 * the records its object has written so far; the task's row goes in the commit that counts
 * its object's records in records_done, so the sum of both never counts a record twice.
 */
#define _GNU_SOURCE
#include "core/clock.h"
#include "core/id.h"
#include "core/log.h"
#include "queue/sqlite/internal.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define RUNS_LISTED_TEXT "50" /* a schedule's latest runs shown with it */

const char sq_batch_schema[] =
    "CREATE TABLE IF NOT EXISTS batch_jobs ("
    " seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, parent TEXT,"
    " definition TEXT NOT NULL, model TEXT NOT NULL, schedule TEXT,"
    " state INTEGER NOT NULL, output TEXT, callback_url TEXT,"
    " max_errors INTEGER NOT NULL DEFAULT 0, max_attempts INTEGER NOT NULL DEFAULT 3,"
    " lease_timeout_ms INTEGER NOT NULL DEFAULT 300000,"
    " created_ms INTEGER NOT NULL, started_ms INTEGER, finished_ms INTEGER,"
    " run_at_ms INTEGER, next_run_ms INTEGER,"
    " objects_total INTEGER NOT NULL DEFAULT 0, objects_done INTEGER NOT NULL DEFAULT 0,"
    " records_done INTEGER NOT NULL DEFAULT 0, records_failed INTEGER NOT NULL DEFAULT 0,"
    " error TEXT, finish_input BLOB,"
    " tenant TEXT NOT NULL DEFAULT '');" /* "": the anonymous tenant */
    "CREATE UNIQUE INDEX IF NOT EXISTS batch_runs ON batch_jobs(parent, run_at_ms) "
    " WHERE parent IS NOT NULL;"
    "CREATE INDEX IF NOT EXISTS batch_due ON batch_jobs(next_run_ms) "
    " WHERE schedule IS NOT NULL AND state = 0;"
    "CREATE INDEX IF NOT EXISTS jobs_batch ON jobs(batch_id, state) WHERE batch_id IS NOT NULL;"
    "CREATE TABLE IF NOT EXISTS batch_progress (task_id TEXT PRIMARY KEY,"
    " batch_id TEXT NOT NULL, records INTEGER NOT NULL);"
    "CREATE INDEX IF NOT EXISTS batch_progress_run ON batch_progress(batch_id);";

int sq_batch_migrate(sqlite3 *db, struct err *e)
{
    sqlite3_stmt *st = NULL;
    int has_kind = 0, rc = 0;

    /* not cached: it runs once */
    if (sqlite3_prepare_v2(db, "SELECT name FROM pragma_table_info('jobs')", -1, &st, NULL) !=
        SQLITE_OK)
        return sq_db_err(db, e, "read schema");
    while (sqlite3_step(st) == SQLITE_ROW)
        if (strcmp((const char *)sqlite3_column_text(st, 0), "kind") == 0)
            has_kind = 1;
    sqlite3_finalize(st);
    if (!has_kind) {
        log_info("queue", "adding batch-job columns to an older job store", "table=%s", "jobs");
        rc = sq_exec(db,
                     "ALTER TABLE jobs ADD COLUMN kind INTEGER NOT NULL DEFAULT 0;"
                     "ALTER TABLE jobs ADD COLUMN batch_id TEXT;",
                     e);
    }
    return rc ? rc : sq_exec(db, sq_batch_schema, e);
}

/* ---- a batch job as a struct (the core writes its JSON) ---- */

static const char *status_name(int is_schedule, int state)
{
    struct batch_job b = {.state = state, .schedule = is_schedule ? (char[]){""} : NULL};

    return batch_job_status(&b);
}

#define BATCH_COLUMNS                                                                              \
    "id, parent, definition, schedule, state, output, created_ms, COALESCE(started_ms, 0), "       \
    "COALESCE(finished_ms, 0), COALESCE(run_at_ms, 0), COALESCE(next_run_ms, 0), "                 \
    "objects_total, objects_done, records_done + (SELECT COALESCE(SUM(records), 0) FROM "          \
    "batch_progress p WHERE p.batch_id = batch_jobs.id), records_failed, error, tenant"

/* Fills `b` from one row of BATCH_COLUMNS. 0 or ERR_NOMEM (`b` then holds what it got). */
static int row_batch_job(sqlite3_stmt *st, struct batch_job *b)
{
    snprintf(b->id, sizeof(b->id), "%s", (const char *)sqlite3_column_text(st, 0));
    if (sqlite3_column_type(st, 1) != SQLITE_NULL)
        snprintf(b->parent, sizeof(b->parent), "%s", (const char *)sqlite3_column_text(st, 1));
    b->definition = sq_col_strdup(st, 2);
    b->schedule = sqlite3_column_type(st, 3) != SQLITE_NULL ? sq_col_strdup(st, 3) : NULL;
    b->state = sqlite3_column_int(st, 4);
    b->output = sqlite3_column_type(st, 5) != SQLITE_NULL ? sq_col_strdup(st, 5) : NULL;
    b->created_ms = sqlite3_column_int64(st, 6);
    b->started_ms = sqlite3_column_int64(st, 7);
    b->finished_ms = sqlite3_column_int64(st, 8);
    b->run_at_ms = sqlite3_column_int64(st, 9);
    b->next_run_ms = sqlite3_column_int64(st, 10);
    b->objects_total = sqlite3_column_int64(st, 11);
    b->objects_done = sqlite3_column_int64(st, 12);
    b->records_done = sqlite3_column_int64(st, 13);
    b->records_failed = sqlite3_column_int64(st, 14);
    b->error = sqlite3_column_type(st, 15) != SQLITE_NULL ? sq_col_strdup(st, 15) : NULL;
    if (queue_tenant_set(&b->tenant, (const char *)sqlite3_column_text(st, 16)) != 0)
        return ERR_NOMEM;
    if (!b->definition || (sqlite3_column_type(st, 3) != SQLITE_NULL && !b->schedule) ||
        (sqlite3_column_type(st, 5) != SQLITE_NULL && !b->output) ||
        (sqlite3_column_type(st, 15) != SQLITE_NULL && !b->error))
        return ERR_NOMEM;
    return 0;
}

/* A batch job, with a schedule's latest runs, read with `db`: a new array of one. */
int sq_load_batch(sqlite3 *db, const char *id, struct batch_job **out, struct err *e)
{
    sqlite3_stmt *st = sq_prepare(db, "SELECT " BATCH_COLUMNS " FROM batch_jobs WHERE id = ?");
    struct batch_job *b = calloc(1, sizeof(*b));
    size_t cap = 0;
    int rc = 0;

    *out = NULL;
    if (!st || !b) {
        sq_finish(st);
        free(b);
        return !b ? err_set(e, ERR_NOMEM, "out of memory") : sq_db_err(db, e, "prepare");
    }
    sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
    if (sqlite3_step(st) == SQLITE_ROW) {
        if (row_batch_job(st, b) != 0)
            rc = err_set(e, ERR_NOMEM, "out of memory");
    } else {
        rc = err_set(e, ERR_NOT_FOUND, "no batch job '%.40s'", id);
    }
    sq_finish(st);
    if (rc == 0 && b->schedule) {
        st = sq_prepare(db, "SELECT " BATCH_COLUMNS " FROM batch_jobs WHERE parent = ? "
                            "ORDER BY seq DESC LIMIT " RUNS_LISTED_TEXT);
        if (!st)
            rc = sq_db_err(db, e, "prepare");
        else
            sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
        while (rc == 0 && sqlite3_step(st) == SQLITE_ROW) {
            if (b->n_runs == cap) {
                size_t ncap = cap ? cap * 2 : 8;
                struct batch_job *runs = realloc(b->runs, ncap * sizeof(*runs));
                if (!runs) {
                    rc = err_set(e, ERR_NOMEM, "out of memory");
                    break;
                }
                memset(runs + cap, 0, (ncap - cap) * sizeof(*runs));
                b->runs = runs;
                cap = ncap;
            }
            if (row_batch_job(st, &b->runs[b->n_runs++]) != 0)
                rc = err_set(e, ERR_NOMEM, "out of memory");
        }
        sq_finish(st);
    }
    if (rc != 0) {
        batch_jobs_free(b, 1);
        return rc;
    }
    *out = b;
    return 0;
}

/* ---- the end of a run (writer thread) ---- */

/* Ends a run: its other tasks stop, and its webhook is stored, in the current transaction. */
static int end_run(struct sqlite_queue *q, const char *id, enum job_state state, const char *error,
                   struct err *e)
{
    int64_t now = clock_now_ms();
    sqlite3_stmt *st;
    struct batch_job *b = NULL;
    struct buf body = {0};
    char event_id[64];
    int rc = 0;

    st = sq_prepare(q->wdb, "UPDATE batch_jobs SET state = ?, finished_ms = ?, error = ? "
                            "WHERE id = ? AND state < 2");
    if (!st)
        return sq_db_err(q->wdb, e, "prepare");
    sqlite3_bind_int(st, 1, state);
    sqlite3_bind_int64(st, 2, now);
    sqlite3_bind_text(st, 3, error, -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(st, 4, id, -1, SQLITE_STATIC);
    if (sqlite3_step(st) != SQLITE_DONE)
        rc = sq_db_err(q->wdb, e, "end batch job");
    sq_finish(st);
    if (rc != 0)
        return rc;
    st = sq_prepare(q->wdb, "UPDATE jobs SET state = 4, finished_ms = ?, input = NULL, "
                            "error = 'its batch job ended' WHERE batch_id = ? AND state = 0");
    if (!st)
        return sq_db_err(q->wdb, e, "prepare");
    sqlite3_bind_int64(st, 1, now);
    sqlite3_bind_text(st, 2, id, -1, SQLITE_STATIC);
    if (sqlite3_step(st) != SQLITE_DONE)
        rc = sq_db_err(q->wdb, e, "cancel tasks");
    else
        q->n_queued -= sqlite3_changes(q->wdb);
    sq_finish(st);
    if (rc != 0)
        return rc;
    st = sq_prepare(q->wdb, "DELETE FROM batch_progress WHERE batch_id = ?");
    if (!st)
        return sq_db_err(q->wdb, e, "prepare");
    sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
    if (sqlite3_step(st) != SQLITE_DONE)
        rc = sq_db_err(q->wdb, e, "forget progress");
    sq_finish(st);
    if (rc != 0)
        return rc;
    /* running tasks see it at their next check and stop */
    st = sq_prepare(q->wdb, "UPDATE jobs SET cancel_requested = 1 WHERE batch_id = ? AND "
                            "state = 1");
    if (!st)
        return sq_db_err(q->wdb, e, "prepare");
    sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
    if (sqlite3_step(st) != SQLITE_DONE)
        rc = sq_db_err(q->wdb, e, "cancel tasks");
    sq_finish(st);
    if (rc != 0)
        return rc;
    log_info("batch", "batch job ended", "batch_job=%s status=%s%s%s%s", id, job_state_name(state),
             error ? " reason=\"" : "", error ? error : "", error ? "\"" : "");
    rc = sq_load_batch(q->wdb, id, &b, e);
    if (rc != 0)
        return rc;
    snprintf(event_id, sizeof(event_id), "evt_%s", id);
    if (queue_batch_event_json(b, event_id, &body) != 0)
        rc = err_set(e, ERR_NOMEM, "out of memory");
    batch_jobs_free(b, 1);
    /* when it has a callback; the URL to send to is the stored one, credentials and all */
    st = rc == 0 ? sq_prepare(q->wdb, "INSERT OR IGNORE INTO outbox (event_id, job_id, url, "
                                      "body, next_ms) SELECT ?, ?, callback_url, ?, ? FROM "
                                      "batch_jobs WHERE id = ? AND callback_url != ''")
                 : NULL;
    if (rc == 0 && !st) {
        rc = sq_db_err(q->wdb, e, "prepare");
    } else if (rc == 0) {
        sqlite3_bind_text(st, 1, event_id, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, id, -1, SQLITE_STATIC);
        sqlite3_bind_blob(st, 3, body.data, (int)body.len, SQLITE_STATIC);
        sqlite3_bind_int64(st, 4, now);
        sqlite3_bind_text(st, 5, id, -1, SQLITE_STATIC);
        if (sqlite3_step(st) != SQLITE_DONE)
            rc = sq_db_err(q->wdb, e, "store webhook");
    }
    sq_finish(st);
    buf_release(&body);
    return rc;
}

static int queue_finish_job(struct sqlite_queue *q, const char *batch_id, struct err *e)
{
    sqlite3_stmt *st = sq_prepare(q->wdb, "SELECT model, finish_input, max_attempts, "
                                          "lease_timeout_ms, tenant FROM batch_jobs WHERE id = ?");
    struct job_spec spec = {
        .kind = JOB_KIND_BATCH_FINISH, .batch_id = batch_id, .input_json_len = -1};
    char *model = NULL, *input = NULL, *tenant = NULL, id[40];
    int rc = 0;

    if (!st)
        return sq_db_err(q->wdb, e, "prepare");
    sqlite3_bind_text(st, 1, batch_id, -1, SQLITE_STATIC);
    if (sqlite3_step(st) == SQLITE_ROW) {
        model = sq_col_strdup(st, 0);
        input = sq_col_strdup(st, 1);
        spec.max_attempts = sqlite3_column_int(st, 2);
        spec.lease_timeout_ms = sqlite3_column_int64(st, 3);
        tenant = sq_col_strdup(st, 4); /* the run's: its finishing job is the tenant's too */
    }
    sq_finish(st);
    if (!model || !input || !tenant) {
        rc = err_set(e, ERR_IO, "batch job %s: cannot read its definition", batch_id);
    } else {
        spec.model = model;
        spec.input = input;
        spec.input_len = strlen(input);
        spec.tenant = tenant;
        id_new(id);
        rc = sq_insert_job(q, &spec, id, e); /* counts it in n_queued */
    }
    free(model);
    free(input);
    free(tenant);
    return rc;
}

int sq_batch_task_started(struct sqlite_queue *q, const char *batch_id, int64_t now, struct err *e)
{
    sqlite3_stmt *st = sq_prepare(q->wdb, "UPDATE batch_jobs SET state = 1, started_ms = "
                                          "COALESCE(started_ms, ?) WHERE id = ? AND state = 0");
    int rc = 0;

    if (!st)
        return sq_db_err(q->wdb, e, "prepare");
    sqlite3_bind_int64(st, 1, now);
    sqlite3_bind_text(st, 2, batch_id, -1, SQLITE_STATIC);
    if (sqlite3_step(st) != SQLITE_DONE)
        rc = sq_db_err(q->wdb, e, "start batch job");
    sq_finish(st);
    return rc;
}

/* A succeeded task: counts its records; queues the finishing job after the last one. */
static int count_task(struct sqlite_queue *q, const struct job *j, struct err *e)
{
    struct batch_task_counts c = {0};
    enum batch_run_step step = BATCH_RUN_WAIT;
    char why[QUEUE_WHY_MAX];
    sqlite3_stmt *st;
    int rc = 0;

    st = sq_prepare(q->wdb, "SELECT result FROM jobs WHERE id = ?");
    if (!st)
        return sq_db_err(q->wdb, e, "prepare");
    sqlite3_bind_text(st, 1, j->id, -1, SQLITE_STATIC);
    if (sqlite3_step(st) == SQLITE_ROW)
        queue_batch_task_counts(sqlite3_column_blob(st, 0), (size_t)sqlite3_column_bytes(st, 0),
                                &c);
    else
        queue_batch_task_counts(NULL, 0, &c);
    sq_finish(st);
    /* its object's records move from batch_progress to records_done in this commit */
    st = sq_prepare(q->wdb, "DELETE FROM batch_progress WHERE task_id = ?");
    if (!st)
        return sq_db_err(q->wdb, e, "prepare");
    sqlite3_bind_text(st, 1, j->id, -1, SQLITE_STATIC);
    if (sqlite3_step(st) != SQLITE_DONE)
        rc = sq_db_err(q->wdb, e, "forget progress");
    sq_finish(st);
    if (rc != 0)
        return rc;
    st = sq_prepare(q->wdb, "UPDATE batch_jobs SET objects_done = objects_done + 1, "
                            "records_done = records_done + ?, records_failed = records_failed + ? "
                            "WHERE id = ? RETURNING objects_total, objects_done, records_failed, "
                            "max_errors");
    if (!st)
        return sq_db_err(q->wdb, e, "prepare");
    sqlite3_bind_int64(st, 1, c.records);
    sqlite3_bind_int64(st, 2, c.bad);
    sqlite3_bind_text(st, 3, j->batch_id, -1, SQLITE_STATIC);
    if (sqlite3_step(st) == SQLITE_ROW) {
        step = queue_batch_after_count(sqlite3_column_int64(st, 0), sqlite3_column_int64(st, 1),
                                       sqlite3_column_int64(st, 2), sqlite3_column_int64(st, 3),
                                       c.object, why);
        while (sqlite3_step(st) == SQLITE_ROW)
            ;
    } else {
        rc = sq_db_err(q->wdb, e, "count task");
    }
    sq_finish(st);
    if (rc == 0 && step == BATCH_RUN_FAIL)
        rc = end_run(q, j->batch_id, JOB_FAILED, why, e);
    else if (rc == 0 && step == BATCH_RUN_FINISH)
        rc = queue_finish_job(q, j->batch_id, e);
    return rc;
}

int sq_batch_task_final(struct sqlite_queue *q, const struct job *j, struct err *e)
{
    sqlite3_stmt *st = sq_prepare(q->wdb, "SELECT state FROM batch_jobs WHERE id = ?");
    int state = -1;
    char why[QUEUE_WHY_MAX];

    if (!st)
        return sq_db_err(q->wdb, e, "prepare");
    sqlite3_bind_text(st, 1, j->batch_id, -1, SQLITE_STATIC);
    if (sqlite3_step(st) == SQLITE_ROW)
        state = sqlite3_column_int(st, 0);
    sq_finish(st);
    if (state < 0 || job_state_is_final((enum job_state)state))
        return 0; /* it ended already: this task was cancelled with it */
    switch (queue_batch_task_ended(j, why)) {
    case BATCH_RUN_COUNT:
        return count_task(q, j, e);
    case BATCH_RUN_SUCCEED:
        return end_run(q, j->batch_id, JOB_SUCCEEDED, NULL, e);
    default:
        return end_run(q, j->batch_id, JOB_FAILED, why, e);
    }
}

/* ---- creating and cancelling (writer thread) ---- */

/* A scheduled run: only while its schedule is active and due at run_at_ms; moves it on. */
static int claim_schedule(struct sqlite_queue *q, const struct batch_job_spec *s, struct err *e)
{
    sqlite3_stmt *st = sq_prepare(q->wdb, "UPDATE batch_jobs SET next_run_ms = ? WHERE id = ? "
                                          "AND schedule IS NOT NULL AND state = 0 AND "
                                          "next_run_ms = ?");
    int rc = 0;

    if (!st)
        return sq_db_err(q->wdb, e, "prepare");
    if (s->parent_next_run_ms > 0)
        sqlite3_bind_int64(st, 1, s->parent_next_run_ms);
    else
        sqlite3_bind_null(st, 1);
    sqlite3_bind_text(st, 2, s->parent, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 3, s->run_at_ms);
    if (sqlite3_step(st) != SQLITE_DONE)
        rc = sq_db_err(q->wdb, e, "advance schedule");
    else if (sqlite3_changes(q->wdb) == 0)
        rc = err_set(e, ERR_CONFLICT, "schedule %s is no longer due at that time", s->parent);
    sq_finish(st);
    return rc;
}

int sq_op_batch_create(struct sqlite_queue *q, struct queue_op *o)
{
    const struct batch_job_spec *s = o->batch;
    int64_t now = clock_now_ms();
    sqlite3_stmt *st;
    int rc = 0;

    if (s->parent && !s->by_hand && (rc = claim_schedule(q, s, &o->err)) != 0)
        return rc;
    if (!s->schedule && !s->error &&
        (rc = queue_admit(&q->cfg, q->n_queued, (int64_t)s->n_tasks, &o->err)) != 0)
        return rc;
    char raw[40];
    id_new(raw);
    snprintf(o->id_out, sizeof(o->id_out), "batch-%s", raw);
    st = sq_prepare(q->wdb,
                    "INSERT INTO batch_jobs (id, parent, definition, model, schedule, state, "
                    "output, callback_url, max_errors, max_attempts, lease_timeout_ms, created_ms, "
                    "run_at_ms, next_run_ms, objects_total, finish_input, tenant) "
                    "VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)");
    if (!st)
        return sq_db_err(q->wdb, &o->err, "prepare");
    sqlite3_bind_text(st, 1, o->id_out, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, s->parent, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, s->definition, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 4, s->model, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 5, s->schedule, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 6, s->output, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 7, s->callback_url, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 8, s->max_errors);
    sqlite3_bind_int(st, 9, s->max_attempts);
    sqlite3_bind_int64(st, 10, s->lease_timeout_ms);
    sqlite3_bind_int64(st, 11, now);
    if (s->parent)
        sqlite3_bind_int64(st, 12, s->run_at_ms);
    if (s->schedule)
        sqlite3_bind_int64(st, 13, s->next_run_ms);
    sqlite3_bind_int64(st, 14, (int64_t)s->n_tasks);
    sqlite3_bind_text(st, 15, s->finish_input, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 16, queue_tenant_stored(s->tenant), -1, SQLITE_STATIC);
    if (sqlite3_step(st) != SQLITE_DONE)
        rc = sq_db_err(q->wdb, &o->err, "insert batch job");
    sq_finish(st);
    if (rc != 0 || s->schedule)
        return rc;
    if (s->error)
        return end_run(q, o->id_out, JOB_FAILED, s->error, &o->err);
    for (size_t i = 0; rc == 0 && i < s->n_tasks; i++) {
        struct job_spec task = {
            .model = s->model,
            .kind = JOB_KIND_BATCH_TASK,
            .batch_id = o->id_out,
            .input = s->task_inputs[i],
            .input_len = strlen(s->task_inputs[i]),
            .input_json_len = -1,
            .max_attempts = s->max_attempts,
            .lease_timeout_ms = s->lease_timeout_ms,
            .tenant = s->tenant, /* the run's */
        };
        char id[40];
        id_new(id);
        rc = sq_insert_job(q, &task, id, &o->err); /* counts it in n_queued */
    }
    if (rc == 0 && s->n_tasks == 0)
        rc = queue_finish_job(q, o->id_out, &o->err);
    return rc;
}

/* A batch job's state and whether it is a schedule (writer thread); ERR_NOT_FOUND names it. */
int sq_batch_state(struct sqlite_queue *q, struct queue_op *o, int *state, int *is_schedule)
{
    sqlite3_stmt *st = sq_prepare(q->wdb, "SELECT state, schedule IS NOT NULL FROM batch_jobs "
                                          "WHERE id = ?");

    *state = -1;
    *is_schedule = 0;
    if (!st)
        return sq_db_err(q->wdb, &o->err, "prepare");
    sqlite3_bind_text(st, 1, o->id, -1, SQLITE_STATIC);
    if (sqlite3_step(st) == SQLITE_ROW) {
        *state = sqlite3_column_int(st, 0);
        *is_schedule = sqlite3_column_int(st, 1);
    }
    sq_finish(st);
    return *state < 0 ? err_set(&o->err, ERR_NOT_FOUND, "no batch job '%.40s'", o->id) : 0;
}

int sq_op_batch_cancel(struct sqlite_queue *q, struct queue_op *o)
{
    sqlite3_stmt *st;
    int state, is_schedule, rc;

    if ((rc = sq_batch_state(q, o, &state, &is_schedule)) != 0)
        return rc;
    if (is_schedule ? state == JOB_CANCELLED : job_state_is_final((enum job_state)state))
        return err_set(&o->err, ERR_CONFLICT, "batch job %s is already %s", o->id,
                       status_name(is_schedule, state));
    if (is_schedule) {
        st = sq_prepare(q->wdb, "UPDATE batch_jobs SET state = 4, finished_ms = ? WHERE id = ?");
        if (!st)
            return sq_db_err(q->wdb, &o->err, "prepare");
        sqlite3_bind_int64(st, 1, clock_now_ms());
        sqlite3_bind_text(st, 2, o->id, -1, SQLITE_STATIC);
        if (sqlite3_step(st) != SQLITE_DONE)
            rc = sq_db_err(q->wdb, &o->err, "cancel schedule");
        sq_finish(st);
    } else {
        rc = end_run(q, o->id, JOB_CANCELLED, "cancelled", &o->err);
    }
    if (rc == 0)
        rc = sq_load_batch(q->wdb, o->id, o->batch_out, &o->err);
    return rc;
}
