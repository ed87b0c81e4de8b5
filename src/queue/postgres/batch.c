/*
 * batch.c: batch jobs and schedules in the PostgreSQL queue (the SQL shapes of the SQLite
 * queue's, made safe for many processes).
 *
 * A run is a row of inferd_batch_jobs plus one job (kind JOB_KIND_BATCH_TASK) per input
 * object, stored in one transaction. The final-state hook of a task (pg_batch_task_final, in
 * the transaction that made the task final) first locks its run's row, so tasks finishing at
 * once in several processes count in turn: exactly one of them sees the last object done and
 * queues the finishing job, and a run that ended is never counted into again.
 *
 * Exactly one process fires each scheduled run: creating it moves the schedule's next_run_ms
 * with a conditional UPDATE (... AND next_run_ms = run_at) in the same transaction, which a
 * second scheduler, waiting on the row lock, finds no longer true (ERR_CONFLICT); and
 * (parent, run_at_ms) is unique besides. inferd_batch_progress holds, per running task, the
 * records its object has written so far; its row goes in the commit that counts the object's
 * records in records_done, so their sum never counts a record twice.
 */
#define _GNU_SOURCE
#include "queue/postgres/pg_internal.h"
#include "core/clock.h"
#include "core/id.h"
#include "core/log.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define RUNS_LISTED "50" /* a schedule's latest runs shown with it */
/* A schedule and its runs are read in one snapshot, so a run just fired is never shown with
 * the schedule's next_run_at from before it fired. */
#define READ_SNAPSHOT "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"

#define BATCH_COLUMNS                                                                              \
    "id, parent, definition, schedule, state, output, created_ms, COALESCE(started_ms, 0), "       \
    "COALESCE(finished_ms, 0), COALESCE(run_at_ms, 0), COALESCE(next_run_ms, 0), "                 \
    "objects_total, objects_done, records_done + (SELECT COALESCE(SUM(records), 0) FROM "          \
    "inferd_batch_progress p WHERE p.batch_id = b.id), records_failed, error, tenant"

/* Fills `b` from row `i` of BATCH_COLUMNS. 0 or ERR_NOMEM. */
static int row_batch_job(const PGresult *r, int i, struct batch_job *b)
{
    snprintf(b->id, sizeof(b->id), "%s", PQgetvalue(r, i, 0));
    if (!PQgetisnull(r, i, 1))
        snprintf(b->parent, sizeof(b->parent), "%s", PQgetvalue(r, i, 1));
    b->definition = pg_strdup(r, i, 2);
    b->schedule = pg_strdup(r, i, 3);
    b->state = (int)pg_int(r, i, 4);
    b->output = pg_strdup(r, i, 5);
    b->created_ms = pg_int(r, i, 6);
    b->started_ms = pg_int(r, i, 7);
    b->finished_ms = pg_int(r, i, 8);
    b->run_at_ms = pg_int(r, i, 9);
    b->next_run_ms = pg_int(r, i, 10);
    b->objects_total = pg_int(r, i, 11);
    b->objects_done = pg_int(r, i, 12);
    b->records_done = pg_int(r, i, 13);
    b->records_failed = pg_int(r, i, 14);
    b->error = pg_strdup(r, i, 15);
    if (queue_tenant_set(&b->tenant, PQgetvalue(r, i, 16)) != 0)
        return ERR_NOMEM;
    if (!b->definition || (!PQgetisnull(r, i, 3) && !b->schedule) ||
        (!PQgetisnull(r, i, 5) && !b->output) || (!PQgetisnull(r, i, 15) && !b->error))
        return ERR_NOMEM;
    return 0;
}

/* A batch job, with a schedule's latest runs: a new array of one. */
static int load_batch(struct pg_queue *q, PGconn *c, const char *id, struct batch_job **out,
                      struct err *e)
{
    struct batch_job *b = calloc(1, sizeof(*b));
    struct pg_params p = {0};
    PGresult *r;
    int rc = 0;

    *out = NULL;
    if (!b)
        return err_set(e, ERR_NOMEM, "out of memory");
    pg_p_str(&p, id);
    r = pg_exec(q, c, "SELECT " BATCH_COLUMNS " FROM inferd_batch_jobs b WHERE id = $1", &p,
                "read batch job", e);
    if (!r)
        rc = e->code;
    else if (PQntuples(r) == 0)
        rc = err_set(e, ERR_NOT_FOUND, "no batch job '%.40s'", id);
    else if (row_batch_job(r, 0, b) != 0)
        rc = err_set(e, ERR_NOMEM, "out of memory");
    PQclear(r);
    r = NULL;
    if (rc == 0 && b->schedule) {
        r = pg_exec(q, c,
                    "SELECT " BATCH_COLUMNS " FROM inferd_batch_jobs b WHERE parent = $1 ORDER "
                    "BY seq DESC LIMIT " RUNS_LISTED,
                    &p, "read a schedule's runs", e);
        if (!r)
            rc = e->code;
        else if (PQntuples(r) > 0 && !(b->runs = calloc((size_t)PQntuples(r), sizeof(*b->runs))))
            rc = err_set(e, ERR_NOMEM, "out of memory");
        for (int i = 0; rc == 0 && i < PQntuples(r); i++)
            if (row_batch_job(r, i, &b->runs[b->n_runs++]) != 0)
                rc = err_set(e, ERR_NOMEM, "out of memory");
        PQclear(r);
    }
    if (rc != 0) {
        batch_jobs_free(b, 1);
        return rc;
    }
    *out = b;
    return 0;
}

/* ---- the end of a run (in the transaction of `t`) ---- */

/* Ends a run: its other tasks stop, and its webhook is stored. */
static int end_run(struct pg_txn *t, const char *id, enum job_state state, const char *error,
                   struct err *e)
{
    struct pg_queue *q = t->q;
    int64_t now = clock_now_ms();
    struct batch_job *b = NULL;
    struct pg_params p = {0};
    struct buf body = {0};
    char event_id[64];
    PGresult *r;
    int rc;

    pg_p_int(&p, state);
    pg_p_int(&p, now);
    pg_p_str(&p, error);
    pg_p_str(&p, id);
    rc = pg_run(q, t->c,
                "UPDATE inferd_batch_jobs SET state = $1, finished_ms = $2, error = $3 WHERE id "
                "= $4 AND state < 2",
                &p, "end batch job", e);
    if (rc != 0)
        return rc;
    p = (struct pg_params){0};
    pg_p_int(&p, now);
    pg_p_str(&p, id);
    r = pg_exec(q, t->c,
                "UPDATE inferd_jobs SET state = 4, finished_ms = $1, input = NULL, error = 'its "
                "batch job ended' WHERE batch_id = $2 AND state = 0",
                &p, "cancel tasks", e);
    if (!r)
        return e->code;
    pg_txn_queued_add(t, -(strtoll(PQcmdTuples(r), NULL, 10)));
    PQclear(r);
    p = (struct pg_params){0};
    pg_p_str(&p, id);
    rc = pg_run(q, t->c, "DELETE FROM inferd_batch_progress WHERE batch_id = $1", &p,
                "forget progress", e);
    /* running tasks see it at their next check and stop */
    if (rc == 0)
        rc = pg_run(q, t->c,
                    "UPDATE inferd_jobs SET cancel_requested = 1 WHERE batch_id = $1 AND state = 1",
                    &p, "cancel tasks", e);
    if (rc != 0)
        return rc;
    log_info("batch", "batch job ended", "batch_job=%s status=%s%s%s%s", id, job_state_name(state),
             error ? " reason=\"" : "", error ? error : "", error ? "\"" : "");
    rc = load_batch(q, t->c, id, &b, e);
    if (rc != 0)
        return rc;
    snprintf(event_id, sizeof(event_id), "evt_%s", id);
    if (queue_batch_event_json(b, event_id, &body) != 0)
        rc = err_set(e, ERR_NOMEM, "out of memory");
    batch_jobs_free(b, 1);
    /* when it has a callback; the URL to send to is the stored one, credentials and all */
    p = (struct pg_params){0};
    pg_p_str(&p, event_id);
    pg_p_str(&p, id);
    pg_p_bin(&p, body.data ? body.data : "", body.len);
    pg_p_int(&p, now);
    if (rc == 0)
        rc = pg_run(q, t->c,
                    "INSERT INTO inferd_outbox (event_id, job_id, url, body, next_ms) SELECT $1, "
                    "$2, callback_url, $3, $4 FROM inferd_batch_jobs WHERE id = $2 AND "
                    "callback_url != '' ON CONFLICT (event_id) DO NOTHING",
                    &p, "store webhook", e);
    buf_release(&body);
    return rc;
}

/* Queues the run's finishing job (after its last task succeeded). */
static int queue_finish_job(struct pg_txn *t, const char *batch_id, struct err *e)
{
    struct job_spec spec = {
        .kind = JOB_KIND_BATCH_FINISH, .batch_id = batch_id, .input_json_len = -1};
    struct pg_params p = {0};
    PGresult *r;
    char id[40];
    int rc = 0;

    pg_p_str(&p, batch_id);
    r = pg_exec(t->q, t->c,
                "SELECT model, finish_input, max_attempts, lease_timeout_ms, tenant FROM "
                "inferd_batch_jobs WHERE id = $1",
                &p, "read batch job", e);
    if (!r)
        return e->code;
    if (PQntuples(r) != 1 || PQgetisnull(r, 0, 1)) {
        rc = err_set(e, ERR_IO, "batch job %s: cannot read its definition", batch_id);
    } else {
        spec.model = PQgetvalue(r, 0, 0);
        spec.input = PQgetvalue(r, 0, 1);
        spec.input_len = strlen(spec.input);
        spec.max_attempts = (int)pg_int(r, 0, 2);
        spec.lease_timeout_ms = pg_int(r, 0, 3);
        spec.tenant = PQgetvalue(r, 0, 4); /* the run's: its finishing job is the tenant's too */
        id_new(id);
        rc = pg_insert_job(t, &spec, id, e);
    }
    PQclear(r);
    return rc;
}

int pg_batch_task_started(struct pg_txn *t, const char *batch_id, int64_t now, struct err *e)
{
    struct pg_params p = {0};

    pg_p_int(&p, now);
    pg_p_str(&p, batch_id);
    return pg_run(t->q, t->c,
                  "UPDATE inferd_batch_jobs SET state = 1, started_ms = COALESCE(started_ms, $1) "
                  "WHERE id = $2 AND state = 0",
                  &p, "start batch job", e);
}

/* A succeeded task: counts its records; queues the finishing job after the last one. */
static int count_task(struct pg_txn *t, const struct job *j, struct err *e)
{
    struct batch_task_counts c = {0};
    enum batch_run_step step = BATCH_RUN_WAIT;
    char why[QUEUE_WHY_MAX];
    struct pg_params p = {0};
    struct buf raw = {0};
    PGresult *r;
    int rc = 0;

    pg_p_str(&p, j->id);
    r = pg_exec(t->q, t->c, "SELECT result FROM inferd_jobs WHERE id = $1", &p, "read result", e);
    if (!r)
        return e->code;
    if (PQntuples(r) != 1 || pg_bytea(r, 0, 0, &raw) != 0)
        buf_release(&raw);
    queue_batch_task_counts(raw.data, raw.len, &c);
    PQclear(r);
    buf_release(&raw);
    /* its object's records move from the progress table to records_done in this commit */
    rc = pg_run(t->q, t->c, "DELETE FROM inferd_batch_progress WHERE task_id = $1", &p,
                "forget progress", e);
    p = (struct pg_params){0};
    pg_p_int(&p, c.records);
    pg_p_int(&p, c.bad);
    pg_p_str(&p, j->batch_id);
    r = rc == 0 ? pg_exec(t->q, t->c,
                          "UPDATE inferd_batch_jobs SET objects_done = objects_done + 1, "
                          "records_done = records_done + $1, records_failed = records_failed + "
                          "$2 WHERE id = $3 RETURNING objects_total, objects_done, "
                          "records_failed, max_errors",
                          &p, "count task", e)
                : NULL;
    if (rc == 0 && !r)
        rc = e->code;
    if (rc == 0 && PQntuples(r) != 1)
        rc = err_set(e, ERR_IO, "batch job %s: gone while its task %s ended", j->batch_id, j->id);
    if (rc == 0)
        step = queue_batch_after_count(pg_int(r, 0, 0), pg_int(r, 0, 1), pg_int(r, 0, 2),
                                       pg_int(r, 0, 3), c.object, why);
    PQclear(r);
    if (step == BATCH_RUN_FAIL)
        rc = end_run(t, j->batch_id, JOB_FAILED, why, e);
    else if (step == BATCH_RUN_FINISH)
        rc = queue_finish_job(t, j->batch_id, e);
    return rc;
}

int pg_batch_task_final(struct pg_txn *t, const struct job *j, struct err *e)
{
    struct pg_params p = {0};
    PGresult *r;
    int state = -1;
    char why[QUEUE_WHY_MAX];

    /* the run's row lock: its tasks, ending at once in several processes, count in turn */
    pg_p_str(&p, j->batch_id);
    r = pg_exec(t->q, t->c, "SELECT state FROM inferd_batch_jobs WHERE id = $1 FOR UPDATE", &p,
                "read batch job", e);
    if (!r)
        return e->code;
    if (PQntuples(r) == 1)
        state = (int)pg_int(r, 0, 0);
    PQclear(r);
    if (state < 0 || job_state_is_final((enum job_state)state))
        return 0; /* it ended already: this task was cancelled with it */
    switch (queue_batch_task_ended(j, why)) {
    case BATCH_RUN_COUNT:
        return count_task(t, j, e);
    case BATCH_RUN_SUCCEED:
        return end_run(t, j->batch_id, JOB_SUCCEEDED, NULL, e);
    default:
        return end_run(t, j->batch_id, JOB_FAILED, why, e);
    }
}

/* ---- creating, cancelling, pausing (in the writer's transaction) ---- */

/* A scheduled run: only while its schedule is active and due at run_at_ms; moves it on. A
 * second scheduler waits on the row lock, then finds the condition false. */
static int claim_schedule(struct pg_txn *t, const struct batch_job_spec *s, struct err *e)
{
    struct pg_params p = {0};
    PGresult *r;
    int rc = 0;

    if (s->parent_next_run_ms > 0)
        pg_p_int(&p, s->parent_next_run_ms);
    else
        pg_p_str(&p, NULL);
    pg_p_str(&p, s->parent);
    pg_p_int(&p, s->run_at_ms);
    r = pg_exec(t->q, t->c,
                "UPDATE inferd_batch_jobs SET next_run_ms = $1::bigint WHERE id = $2 AND "
                "schedule IS NOT NULL AND state = 0 AND next_run_ms = $3",
                &p, "advance schedule", e);
    if (!r)
        return e->code;
    if (strtoll(PQcmdTuples(r), NULL, 10) == 0)
        rc = err_set(e, ERR_CONFLICT, "schedule %s is no longer due at that time", s->parent);
    PQclear(r);
    return rc;
}

int pg_op_batch_create(struct pg_txn *t, struct queue_op *o)
{
    const struct batch_job_spec *s = o->batch;
    struct pg_params p = {0};
    char raw[40];
    int rc = 0;

    if (!s->schedule && !s->error && (rc = pg_txn_count_queued(t, &o->err)) != 0)
        return rc;
    if (!s->schedule && !s->error &&
        (rc = queue_admit(&t->q->cfg, t->queued, (int64_t)s->n_tasks, &o->err)) != 0)
        return rc;
    /* after the admission: an operation that fails cleanly has changed nothing (writer.c) */
    if (s->parent && !s->by_hand && (rc = claim_schedule(t, s, &o->err)) != 0)
        return rc;
    id_new(raw);
    snprintf(o->id_out, sizeof(o->id_out), "batch-%s", raw);
    pg_p_str(&p, o->id_out);
    pg_p_str(&p, s->parent);
    pg_p_str(&p, s->definition);
    pg_p_str(&p, s->model);
    pg_p_str(&p, s->schedule);
    pg_p_str(&p, s->output);
    pg_p_str(&p, s->callback_url);
    pg_p_int(&p, s->max_errors);
    pg_p_int(&p, s->max_attempts);
    pg_p_int(&p, s->lease_timeout_ms);
    pg_p_int(&p, clock_now_ms());
    if (s->parent)
        pg_p_int(&p, s->run_at_ms);
    else
        pg_p_str(&p, NULL);
    if (s->schedule)
        pg_p_int(&p, s->next_run_ms);
    else
        pg_p_str(&p, NULL);
    pg_p_int(&p, (int64_t)s->n_tasks);
    pg_p_str(&p, s->finish_input);
    pg_p_str(&p, queue_tenant_stored(s->tenant));
    rc = pg_run(t->q, t->c,
                "INSERT INTO inferd_batch_jobs (id, parent, definition, model, schedule, state, "
                "output, callback_url, max_errors, max_attempts, lease_timeout_ms, created_ms, "
                "run_at_ms, next_run_ms, objects_total, finish_input, tenant) VALUES ($1, $2, $3, "
                "$4, $5, 0, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
                &p, "insert batch job", &o->err);
    if (rc == ERR_CONFLICT && s->parent) /* (parent, run_at) taken: another scheduler's */
        rc = err_set(&o->err, ERR_CONFLICT, "schedule %s: its run at that time exists", s->parent);
    if (rc != 0 || s->schedule)
        return rc;
    if (s->error)
        return end_run(t, o->id_out, JOB_FAILED, s->error, &o->err);
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
        rc = pg_insert_job(t, &task, id, &o->err);
    }
    if (rc == 0 && s->n_tasks == 0)
        rc = queue_finish_job(t, o->id_out, &o->err);
    return rc;
}

/* A batch job's state and whether it is a schedule, its row locked; ERR_NOT_FOUND names it. */
static int batch_state(struct pg_txn *t, struct queue_op *o, int *state, int *is_schedule)
{
    struct pg_params p = {0};
    PGresult *r;

    *state = -1;
    *is_schedule = 0;
    pg_p_str(&p, o->id);
    r = pg_exec(t->q, t->c,
                "SELECT state, schedule IS NOT NULL FROM inferd_batch_jobs WHERE id = $1 FOR "
                "UPDATE",
                &p, "read batch job", &o->err);
    if (!r)
        return o->err.code;
    if (PQntuples(r) == 1) {
        *state = (int)pg_int(r, 0, 0);
        *is_schedule = strcmp(PQgetvalue(r, 0, 1), "t") == 0;
    }
    PQclear(r);
    return *state < 0 ? err_set(&o->err, ERR_NOT_FOUND, "no batch job '%.40s'", o->id) : 0;
}

int pg_op_batch_cancel(struct pg_txn *t, struct queue_op *o)
{
    int state, is_schedule, rc;

    if ((rc = batch_state(t, o, &state, &is_schedule)) != 0)
        return rc;
    if (is_schedule ? state == JOB_CANCELLED : job_state_is_final((enum job_state)state)) {
        struct batch_job b = {.state = state, .schedule = is_schedule ? (char[]){""} : NULL};
        return err_set(&o->err, ERR_CONFLICT, "batch job %s is already %s", o->id,
                       batch_job_status(&b));
    }
    if (is_schedule) {
        struct pg_params p = {0};
        pg_p_int(&p, clock_now_ms());
        pg_p_str(&p, o->id);
        rc = pg_run(t->q, t->c,
                    "UPDATE inferd_batch_jobs SET state = 4, finished_ms = $1 WHERE id = $2", &p,
                    "cancel schedule", &o->err);
    } else {
        rc = end_run(t, o->id, JOB_CANCELLED, "cancelled", &o->err);
    }
    return rc ? rc : load_batch(t->q, t->c, o->id, o->batch_out, &o->err);
}

int pg_op_batch_pause(struct pg_txn *t, struct queue_op *o)
{
    int state, is_schedule, rc;

    if ((rc = batch_state(t, o, &state, &is_schedule)) != 0)
        return rc;
    if (!is_schedule)
        return err_set(&o->err, ERR_CONFLICT,
                       "batch job %s is a run, not a schedule: only schedules pause and resume",
                       o->id);
    if (state == JOB_CANCELLED)
        return err_set(&o->err, ERR_CONFLICT, "schedule %s is cancelled", o->id);
    if (state != (o->paused ? QUEUE_SCHEDULE_PAUSED : QUEUE_SCHEDULE_ACTIVE)) {
        struct pg_params p = {0};
        pg_p_int(&p, o->paused ? QUEUE_SCHEDULE_PAUSED : QUEUE_SCHEDULE_ACTIVE);
        pg_p_int(&p, o->paused ? 0 : o->next_run_ms);
        pg_p_str(&p, o->id);
        rc = pg_run(t->q, t->c,
                    "UPDATE inferd_batch_jobs SET state = $1, next_run_ms = CASE WHEN $2::bigint "
                    "> 0 THEN $2::bigint ELSE next_run_ms END WHERE id = $3",
                    &p, "pause schedule", &o->err);
        if (rc == 0)
            log_info("batch", o->paused ? "schedule paused" : "schedule resumed", "schedule=%s",
                     o->id);
    }
    return rc ? rc : load_batch(t->q, t->c, o->id, o->batch_out, &o->err);
}

int pg_op_batch_progress(struct pg_txn *t, struct queue_op *o)
{
    struct pg_params p = {0};

    pg_p_str(&p, o->id);
    pg_p_str(&p, o->batch_id);
    pg_p_int(&p, o->records);
    pg_p_int(&p, (int64_t)o->token);
    /* only while this attempt holds the task: a stale attempt cannot add to a finished run */
    return pg_run(t->q, t->c,
                  "INSERT INTO inferd_batch_progress (task_id, batch_id, records) SELECT $1, $2, "
                  "$3 WHERE EXISTS (SELECT 1 FROM inferd_jobs WHERE id = $1 AND state = 1 AND "
                  "attempts = $4) ON CONFLICT (task_id) DO UPDATE SET records = $3",
                  &p, "record progress", &o->err);
}

/* ---- reading (a pooled connection) ---- */

/* Ends a read snapshot left open by an error (a batch job not found), so the connection goes
 * back to the pool; pg_give closes it if even that fails. */
static void end_snapshot(struct pg_queue *q, PGconn *c)
{
    struct err e = {0};

    if (PQstatus(c) == CONNECTION_OK && PQtransactionStatus(c) != PQTRANS_IDLE)
        (void)pg_run(q, c, "ROLLBACK", NULL, "end a read", &e);
}

int pg_batch_get(struct queue *qb, const char *id, struct batch_job **out, struct err *e)
{
    struct pg_queue *q = pgq(qb);
    PGconn *c = pg_take(q, e);
    int rc;

    *out = NULL;
    if (!c)
        return e->code;
    rc = pg_run(q, c, READ_SNAPSHOT, NULL, "read batch job", e);
    if (rc == 0)
        rc = load_batch(q, c, id, out, e);
    if (rc == 0 && pg_run(q, c, "COMMIT", NULL, "read batch job", e) != 0) {
        batch_jobs_free(*out, 1);
        *out = NULL;
        rc = e->code;
    }
    end_snapshot(q, c);
    pg_give(q, c);
    return rc;
}

int pg_batch_list(struct queue *qb, const struct queue_batch_filter *f, struct batch_job **out,
                  size_t *n, struct err *e)
{
    struct pg_queue *q = pgq(qb);
    struct batch_job *v = calloc((size_t)(f->limit > 0 ? f->limit : 1), sizeof(*v));
    struct pg_params p = {0};
    PGconn *c = NULL;
    PGresult *r = NULL;
    int rc = 0;

    *out = NULL;
    *n = 0;
    if (!v)
        return err_set(e, ERR_NOMEM, "out of memory");
    c = pg_take(q, e);
    if (!c) {
        free(v);
        return e->code;
    }
    pg_p_int(&p, f->state);
    pg_p_int(&p, f->schedules);
    pg_p_int(&p, f->limit);
    if (pg_run(q, c, READ_SNAPSHOT, NULL, "list batch jobs", e) != 0) {
        pg_give(q, c);
        free(v);
        return e->code;
    }
    if (!f->tenant) {
        r = pg_exec(q, c,
                    "SELECT id FROM inferd_batch_jobs WHERE parent IS NULL AND ($1::int = -1 OR "
                    "state = $1::int) AND ($2::int = -1 OR (schedule IS NOT NULL) = ($2::int = "
                    "1)) ORDER BY seq DESC LIMIT $3",
                    &p, "list batch jobs", e);
    } else { /* one tenant's, from inferd_batch_tenant */
        pg_p_str(&p, f->tenant);
        r = pg_exec(q, c,
                    "SELECT id FROM inferd_batch_jobs WHERE tenant = $4 AND parent IS NULL AND "
                    "($1::int = -1 OR state = $1::int) AND ($2::int = -1 OR (schedule IS NOT "
                    "NULL) = ($2::int = 1)) ORDER BY tenant DESC, seq DESC LIMIT $3",
                    &p, "list batch jobs", e);
    }
    if (!r)
        rc = e->code;
    for (int i = 0; rc == 0 && i < PQntuples(r) && i < f->limit; i++) {
        struct batch_job *b = NULL;
        rc = load_batch(q, c, PQgetvalue(r, i, 0), &b, e);
        if (rc == 0) {
            v[(*n)++] = *b; /* its strings move into the array */
            free(b);
        }
    }
    PQclear(r);
    if (rc == 0)
        rc = pg_run(q, c, "COMMIT", NULL, "list batch jobs", e);
    end_snapshot(q, c);
    pg_give(q, c);
    if (rc != 0) {
        batch_jobs_free(v, *n);
        *n = 0;
        return rc;
    }
    *out = v;
    return 0;
}

int pg_batch_results(struct queue *qb, const char *id, char **model, char ***results, size_t *n,
                     struct err *e)
{
    struct pg_queue *q = pgq(qb);
    struct pg_params p = {0};
    PGconn *c = pg_take(q, e);
    PGresult *r = NULL;
    char **v = NULL;
    int rc = 0;

    *model = NULL;
    *results = NULL;
    *n = 0;
    if (!c)
        return e->code;
    pg_p_str(&p, id);
    r = pg_exec(q, c, "SELECT model FROM inferd_batch_jobs WHERE id = $1", &p, "read batch job", e);
    if (!r)
        rc = e->code;
    else if (PQntuples(r) == 0)
        rc = err_set(e, ERR_NOT_FOUND, "no batch job '%.40s'", id);
    else if (!(*model = pg_strdup(r, 0, 0)))
        rc = err_set(e, ERR_NOMEM, "out of memory");
    PQclear(r);
    r = NULL;
    if (rc == 0 && !(r = pg_exec(q, c,
                                 "SELECT result FROM inferd_jobs WHERE batch_id = $1 AND kind = 1 "
                                 "AND state = 2",
                                 &p, "read task results", e)))
        rc = e->code;
    if (rc == 0 && PQntuples(r) > 0 && !(v = calloc((size_t)PQntuples(r), sizeof(*v))))
        rc = err_set(e, ERR_NOMEM, "out of memory");
    for (int i = 0; rc == 0 && i < PQntuples(r); i++) {
        struct buf raw = {0};
        if (pg_bytea(r, i, 0, &raw) != 0 || !(v[(*n)++] = raw.data ? buf_take(&raw) : strdup("")))
            rc = err_set(e, ERR_NOMEM, "out of memory");
        buf_release(&raw);
    }
    PQclear(r);
    pg_give(q, c);
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

int pg_schedules_due(struct queue *qb, int64_t now_ms, struct queue_schedule **out, size_t *n,
                     struct err *e)
{
    struct pg_queue *q = pgq(qb);
    struct queue_schedule *v = NULL;
    struct pg_params p = {0};
    PGconn *c = pg_take(q, e);
    PGresult *r;

    *out = NULL;
    *n = 0;
    if (!c)
        return e->code;
    pg_p_int(&p, now_ms);
    r = pg_exec(q, c,
                "SELECT id, definition, schedule, next_run_ms FROM inferd_batch_jobs WHERE "
                "schedule IS NOT NULL AND state = 0 AND next_run_ms <= $1 ORDER BY next_run_ms "
                "LIMIT 100",
                &p, "read due schedules", e);
    pg_give(q, c);
    if (!r)
        return e->code;
    if (PQntuples(r) > 0 && !(v = calloc((size_t)PQntuples(r), sizeof(*v)))) {
        PQclear(r);
        return err_set(e, ERR_NOMEM, "out of memory");
    }
    for (int i = 0; i < PQntuples(r); i++) {
        /* a schedule that cannot be copied is left out: it is due again at the next look */
        struct queue_schedule *s = &v[*n];
        memset(s, 0, sizeof(*s));
        snprintf(s->id, sizeof(s->id), "%s", PQgetvalue(r, i, 0));
        s->definition = pg_strdup(r, i, 1);
        s->schedule = pg_strdup(r, i, 2);
        s->next_run_ms = pg_int(r, i, 3);
        if (s->definition && s->schedule && !queue_fault("schedules_due", (size_t)i)) {
            (*n)++;
        } else {
            free(s->definition);
            free(s->schedule);
            memset(s, 0, sizeof(*s));
        }
    }
    PQclear(r);
    if (*n == 0) {
        free(v);
        v = NULL;
    }
    *out = v;
    return 0;
}

int pg_batch_definition(struct queue *qb, const char *id, struct queue_schedule **out,
                        struct err *e)
{
    struct pg_queue *q = pgq(qb);
    struct queue_schedule *s = calloc(1, sizeof(*s));
    struct pg_params p = {0};
    PGconn *c;
    PGresult *r;
    int rc = 0;

    *out = NULL;
    if (!s)
        return err_set(e, ERR_NOMEM, "out of memory");
    c = pg_take(q, e);
    if (!c) {
        free(s);
        return e->code;
    }
    pg_p_str(&p, id);
    r = pg_exec(q, c,
                "SELECT definition, schedule, COALESCE(next_run_ms, 0), state, tenant FROM "
                "inferd_batch_jobs WHERE id = $1",
                &p, "read batch job", e);
    pg_give(q, c);
    if (!r) {
        rc = e->code;
    } else if (PQntuples(r) == 0) {
        rc = err_set(e, ERR_NOT_FOUND, "no batch job '%.40s'", id);
    } else {
        snprintf(s->id, sizeof(s->id), "%s", id);
        s->definition = pg_strdup(r, 0, 0);
        s->schedule = pg_strdup(r, 0, 1);
        s->next_run_ms = pg_int(r, 0, 2);
        s->state = (int)pg_int(r, 0, 3);
        if (!s->definition || (!PQgetisnull(r, 0, 1) && !s->schedule) ||
            queue_tenant_set(&s->tenant, PQgetvalue(r, 0, 4)) != 0)
            rc = err_set(e, ERR_NOMEM, "out of memory");
    }
    PQclear(r);
    if (rc != 0) {
        queue_schedules_free(s, 1);
        return rc;
    }
    *out = s;
    return 0;
}
