/*
 * writer.c: group commit for the PostgreSQL queue.
 *
 * Every change goes through one writer thread per process, as in the SQLite queue: callers
 * queue an operation and wait (an asynchronous enqueue is called back instead; the queue and
 * the ops-table entries that submit are the core's, queue/writer.c); the writer takes a group,
 * runs it in one transaction, sends the transaction's NOTIFYs and commits once. Operations run
 * without savepoints first; when one fails in a way that may have left changes (a statement
 * failed, a deadlock with another process), the group runs again with a SAVEPOINT per
 * operation, so the failing one undoes only itself (a deadlocked one is retried alone). Under
 * load, hundreds of enqueues and outcomes share one commit (one WAL flush with
 * synchronous_commit on).
 *
 * A lost connection fails the whole group with ERR_UNAVAILABLE ("nothing was stored"); the
 * writer reconnects at the next group, no sooner than a backoff (100 ms doubling to 2 s), so
 * while PostgreSQL is away every call answers at once instead of waiting on a connect.
 */
#define _GNU_SOURCE
#include "queue/postgres/pg_internal.h"
#include "core/clock.h"
#include "core/log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define OP_RETRIES 3 /* a deadlocked operation runs again this many times */

/* ---- one transaction ---- */

int pg_txn_commit(struct pg_txn *t, struct err *e)
{
    struct buf arr = {0};
    int rc = 0;

    /* NOTIFYs are delivered at COMMIT, and only if it happens */
    if (t->finals) {
        rc = buf_puts(&arr, "{");
        for (struct pg_final *f = t->finals; rc == 0 && f; f = f->next)
            rc = buf_printf(&arr, "%s\"%s %s\"", f == t->finals ? "" : ",", f->id,
                            job_state_name(f->state));
        if (rc == 0)
            rc = buf_puts(&arr, "}");
        if (rc != 0) {
            rc = err_set(e, ERR_NOMEM, "out of memory");
        } else {
            struct pg_params p = {0};
            pg_p_str(&p, arr.data);
            rc = pg_run(t->q, t->c, "SELECT pg_notify('inferd_final', x) FROM unnest($1::text[]) x",
                        &p, "notify", e);
        }
        buf_release(&arr);
    }
    if (rc == 0 && t->runnable)
        rc = pg_run(t->q, t->c, "SELECT pg_notify('inferd_jobs', '')", NULL, "notify", e);
    if (rc != 0)
        return rc;
    t->commit_begun = 1;
    atomic_fetch_add(&t->q->commits_begun, 1);
    return pg_run(t->q, t->c, "COMMIT", NULL, "commit", e);
}

void pg_txn_done(struct pg_txn *t, int committed)
{
    struct pg_queue *q = t->q;

    if (committed && t->runnable)
        queue_writer_runnable(&q->w);
    for (struct pg_final *f = t->finals, *next; f; f = next) {
        next = f->next;
        if (committed && q->base.on_final)
            q->base.on_final(q->base.on_final_ctx, f->id, f->state);
        free(f);
    }
    t->finals = NULL;
    pthread_mutex_lock(&q->count_lock);
    if (committed && t->queued >= 0)
        atomic_store(&q->n_queued, t->queued);
    else if (committed && t->queued_delta != 0)
        atomic_fetch_add(&q->n_queued, t->queued_delta);
    if (t->commit_begun)
        atomic_fetch_add(&q->commits_ended, 1);
    pthread_mutex_unlock(&q->count_lock);
    t->commit_begun = 0;
    t->queued_delta = 0;
}

static int run_op(struct pg_txn *t, struct queue_op *o)
{
    switch (o->kind) {
    case QUEUE_OP_ENQUEUE:
        return pg_op_enqueue(t, o);
    case QUEUE_OP_LEASE:
        return pg_op_lease(t, o);
    case QUEUE_OP_EXTEND:
        return pg_op_extend(t, o);
    case QUEUE_OP_COMPLETE:
        return pg_op_complete(t, o);
    case QUEUE_OP_FAIL:
        return pg_op_fail(t, o);
    case QUEUE_OP_CANCEL:
        return pg_op_cancel(t, o);
    case QUEUE_OP_RETRY:
        return pg_op_retry(t, o);
    case QUEUE_OP_OUTBOX_RECORD:
        return pg_op_outbox_record(t, o);
    case QUEUE_OP_BATCH_CREATE:
        return pg_op_batch_create(t, o);
    case QUEUE_OP_BATCH_CANCEL:
        return pg_op_batch_cancel(t, o);
    case QUEUE_OP_BATCH_PAUSE:
        return pg_op_batch_pause(t, o);
    case QUEUE_OP_BATCH_PROGRESS:
        return pg_op_batch_progress(t, o);
    case QUEUE_OP_WORKER_BEAT:
        return pg_op_worker_beat(t, o);
    case QUEUE_OP_WORKER_LEAVE:
        return pg_op_worker_leave(t, o);
    }
    return err_set(&o->err, ERR_INVALID, "unknown queue operation");
}

/* Forgets what an operation produced before it was undone. */
static void op_undone(struct queue_op *o)
{
    for (size_t i = 0; o->jobs && i < o->n_jobs; i++) {
        job_free(o->jobs[i]);
        o->jobs[i] = NULL;
    }
    o->n_jobs = 0;
    job_free(o->job);
    o->job = NULL;
    if (o->batch_out) {
        batch_jobs_free(*o->batch_out, *o->batch_out ? 1 : 0);
        *o->batch_out = NULL;
    }
}

/* Runs `o` inside its savepoint; returns 0 when the transaction still stands. */
static int run_in_savepoint(struct pg_txn *t, struct queue_op *o, struct err *e)
{
    struct pg_queue *q = t->q;
    int64_t queued = t->queued, queued_delta = t->queued_delta;

    /* one round trip: the previous operation's savepoint released, this one's taken (COMMIT
     * releases the last) */
    if (pg_run(q, t->c, t->savepoint ? "RELEASE SAVEPOINT op; SAVEPOINT op" : "SAVEPOINT op", NULL,
               "savepoint", e) != 0)
        return e->code;
    t->savepoint = 1;
    for (int tries = 0;; tries++) {
        o->rc = run_op(t, o);
        if (PQstatus(t->c) != CONNECTION_OK) {
            *e = o->err;
            return ERR_UNAVAILABLE;
        }
        int in_error = PQtransactionStatus(t->c) == PQTRANS_INERROR;
        if (o->rc == 0 || (o->rc == ERR_CONFLICT && !in_error))
            return 0;
        /* undone: what it counted, what it made (the savepoint stays, for a retry) */
        if (pg_run(q, t->c, "ROLLBACK TO SAVEPOINT op", NULL, "rollback", e) != 0)
            return e->code;
        t->queued = queued;
        t->queued_delta = queued_delta;
        op_undone(o);
        if (o->kind == QUEUE_OP_ENQUEUE && o->rc != ERR_BUSY && o->rc != ERR_CONFLICT)
            o->existed = 0;
        if (!pg_retryable(&o->err) || tries >= OP_RETRIES)
            return 0;
        o->err = (struct err){0};
    }
}

/* A group could not be made durable: every caller hears why, and nothing of it stands. */
/* `in_doubt`: the connection went while the group was committing, so PostgreSQL may have
 * committed it; callers are told so, not "nothing was stored" (a client resubmits with its
 * Idempotency-Key; a lease whose answer was lost is released by the next group). */
static void group_failed(struct pg_queue *q, struct queue_op *ops, const struct err *why,
                         int in_doubt)
{
    for (struct queue_op *o = ops; o; o = o->next) {
        if (why->code == ERR_UNAVAILABLE && in_doubt)
            o->rc = err_set(&o->err, ERR_UNAVAILABLE,
                            "%s while committing: whether it was stored is unknown; resubmit "
                            "with the same Idempotency-Key to be safe",
                            why->msg);
        else if (why->code == ERR_UNAVAILABLE)
            o->rc = err_set(&o->err, ERR_UNAVAILABLE, "%s; nothing was stored", why->msg);
        else if (why->code == ERR_FULL)
            o->rc = err_set(&o->err, ERR_FULL, "%s; nothing was stored", why->msg);
        else
            o->rc = err_set(&o->err, ERR_IO, "%s; nothing was stored", why->msg);
        op_undone(o);
    }
    (void)q;
}

static int writer_connection(struct pg_queue *q, struct err *e)
{
    int64_t now = clock_now_ms();

    if (q->wconn && pg_alive(q->wconn))
        return 0;
    PQfinish(q->wconn);
    q->wconn = NULL;
    if (now < q->next_connect_ms)
        return err_set(e, ERR_UNAVAILABLE, "PostgreSQL at %s is unreachable (retrying)", q->shown);
    q->wconn = pg_connect(q, e);
    if (!q->wconn) {
        pg_note_down(q, e->msg);
        q->connect_backoff_ms =
            q->connect_backoff_ms
                ? (q->connect_backoff_ms * 2 < PG_RECONNECT_MAX_MS ? q->connect_backoff_ms * 2
                                                                   : PG_RECONNECT_MAX_MS)
                : PG_RECONNECT_MIN_MS;
        q->next_connect_ms = now + q->connect_backoff_ms;
        return e->code;
    }
    q->connect_backoff_ms = 0;
    atomic_store(&q->own_pid[0], PQbackendPID(q->wconn));
    return 0;
}

#define REDO 1 /* run_ops: an operation failed after it may have changed rows */

/* Runs the group's operations. Without savepoints first (a round trip less per operation):
 * an operation that fails cleanly (fenced out, busy, not found) changed nothing; any other
 * failure answers REDO, and the group runs again from its start, each operation in a
 * savepoint of its own, so that one failing undoes only itself. */
static int run_ops(struct pg_txn *t, struct queue_op *ops, int savepoints, struct err *e)
{
    int rc = 0;

    for (struct queue_op *o = ops; rc == 0 && o; o = o->next) {
        if (savepoints) {
            rc = run_in_savepoint(t, o, e);
            continue;
        }
        if (o->kind == QUEUE_OP_COMPLETE && o->next && o->next->kind == QUEUE_OP_COMPLETE) {
            /* outcomes of distinct jobs in a row: one statement for all */
            struct queue_op *run[PG_MAX_GROUP];
            size_t n = 0;
            for (struct queue_op *c = o; c && c->kind == QUEUE_OP_COMPLETE && n < PG_MAX_GROUP;
                 c = c->next) {
                int twice = 0;
                for (size_t k = 0; k < n && !twice; k++)
                    twice = strcmp(run[k]->id, c->id) == 0;
                if (twice)
                    break;
                run[n++] = c;
            }
            if (n > 1) {
                if (pg_ops_complete(t, run, n, e) != 0)
                    return PQstatus(t->c) == CONNECTION_OK ? REDO : ERR_UNAVAILABLE;
                o = run[n - 1];
                continue;
            }
        }
        if (o->kind == QUEUE_OP_ENQUEUE && !o->spec->idempotency_key && o->next &&
            o->next->kind == QUEUE_OP_ENQUEUE && !o->next->spec->idempotency_key) {
            /* new jobs in a row: one statement for all */
            struct queue_op *run[PG_MAX_GROUP];
            size_t n = 0;
            for (struct queue_op *c = o;
                 c && c->kind == QUEUE_OP_ENQUEUE && !c->spec->idempotency_key && n < PG_MAX_GROUP;
                 c = c->next)
                run[n++] = c;
            if (pg_ops_enqueue(t, run, n, e) != 0)
                return PQstatus(t->c) == CONNECTION_OK ? REDO : ERR_UNAVAILABLE;
            o = run[n - 1];
            continue;
        }
        o->rc = run_op(t, o);
        if (PQstatus(t->c) != CONNECTION_OK) {
            *e = o->err;
            return ERR_UNAVAILABLE;
        }
        if (o->rc != 0 && (PQtransactionStatus(t->c) == PQTRANS_INERROR ||
                           (o->rc != ERR_CONFLICT && o->rc != ERR_BUSY && o->rc != ERR_NOT_FOUND)))
            return REDO;
    }
    return rc;
}

/* Forgets everything a first run of the group did, before it runs again. */
static void group_reset(struct pg_txn *t, struct queue_op *ops)
{
    pg_txn_done(t, 0);
    t->runnable = 0;
    t->queued = -1;
    t->savepoint = 0;
    for (struct queue_op *o = ops; o; o = o->next) {
        op_undone(o);
        o->rc = 0;
        o->err = (struct err){0};
        o->existed = 0;
        o->failed_final = 0;
        o->next_available_ms = 0;
        o->id_out[0] = '\0';
    }
}

/* The group's leases when its COMMIT got no answer: they may have happened, and their jobs
 * reached nobody. Kept for release_lost(). */
static void note_lost_leases(struct pg_queue *q, const struct queue_op *ops)
{
    for (const struct queue_op *o = ops; o; o = o->next) {
        for (size_t i = 0; o->kind == QUEUE_OP_LEASE && i < o->n_jobs; i++) {
            struct pg_lost_lease *more = realloc(q->lost, (q->n_lost + 1) * sizeof(*more));
            if (!more)
                return; /* those jobs run again after their lease, as a crashed worker's do */
            q->lost = more;
            snprintf(q->lost[q->n_lost].id, sizeof(q->lost[0].id), "%s", o->jobs[i]->id);
            q->lost[q->n_lost++].token = o->jobs[i]->token;
        }
    }
}

/* Queues again, at once and without counting the attempt, the jobs of leases whose answer was
 * lost, if those leases happened (the fence: still that attempt, still running). */
static int release_lost(struct pg_txn *t, struct err *e)
{
    struct pg_queue *q = t->q;
    int rc = 0;

    for (size_t i = 0; rc == 0 && i < q->n_lost; i++) {
        struct pg_params p = {0};
        PGresult *r;
        pg_p_str(&p, q->lost[i].id);
        pg_p_int(&p, (int64_t)q->lost[i].token);
        r = pg_exec(q, t->c,
                    "UPDATE inferd_jobs SET state = 0, available_ms = 0, extra_attempts = "
                    "extra_attempts + 1 WHERE id = $1 AND state = 1 AND attempts = $2",
                    &p, "release a lost lease", e);
        if (!r)
            return e->code;
        if (pg_changed(r) > 0) {
            rc = pg_attempt_ended(t, q->lost[i].id, q->lost[i].token,
                                  "the answer of its lease was lost; queued again", e);
            t->runnable = 1;
            log_warn("queue", "a lease's answer was lost; its job is queued again", "job=%s",
                     q->lost[i].id);
        }
        PQclear(r);
    }
    return rc;
}

static void run_group(struct pg_queue *q, struct queue_op *ops)
{
    struct pg_txn t = {.q = q, .queued = -1};
    size_t n_lost = q->n_lost;
    int committing = 0;
    struct err e = {0};
    int rc;

    rc = writer_connection(q, &e);
    if (rc == 0) {
        t.c = q->wconn;
        rc = pg_run(q, t.c, "BEGIN", NULL, "begin", &e);
    }
    if (rc == 0 && n_lost > 0)
        rc = release_lost(&t, &e);
    if (rc == 0)
        rc = run_ops(&t, ops, 0, &e);
    if (rc == REDO) {
        rc = pg_run(q, t.c, "ROLLBACK", NULL, "rollback", &e);
        group_reset(&t, ops);
        if (rc == 0)
            rc = pg_run(q, t.c, "BEGIN", NULL, "begin", &e);
        if (rc == 0 && n_lost > 0)
            rc = release_lost(&t, &e);
        if (rc == 0)
            rc = run_ops(&t, ops, 1, &e);
    }
    committing = rc == 0;
    if (rc == 0)
        rc = pg_txn_commit(&t, &e);
    if (rc == 0) {
        pg_note_up(q);
        if (n_lost > 0) { /* released (those noted since stay for the next group) */
            memmove(q->lost, q->lost + n_lost, (q->n_lost - n_lost) * sizeof(*q->lost));
            q->n_lost -= n_lost;
        }
    } else {
        if (committing && rc == ERR_UNAVAILABLE)
            note_lost_leases(q, ops);
        if (t.c && PQstatus(t.c) == CONNECTION_OK) {
            struct err ignored;
            pg_run(q, t.c, "ROLLBACK", NULL, "rollback", &ignored);
        } else if (t.c) {
            char why[200];
            snprintf(why, sizeof(why), "%s", e.msg);
            pg_note_down(q, why);
        }
        group_failed(q, ops, &e, committing && rc == ERR_UNAVAILABLE);
    }
    pg_txn_done(&t, rc == 0);
}

void *pg_writer_main(void *arg)
{
    struct pg_queue *q = arg;
    struct queue_op *ops;

    /* (the idle leases were woken by pg_txn_done() as the group committed) */
    while (queue_writer_take(&q->w, -1, &ops)) {
        run_group(q, ops);
        queue_writer_done(&q->w, ops, 0);
    }
    return NULL;
}

/* ---- the ops table's changes (the rest are the core's: writer.h) ---- */

/* queue_writer_extend(); for the id "" (queue_on_final(NULL)'s barrier) it also waits out the
 * listener's on_final call, if one runs. */
int pg_extend(struct queue *qb, const char *id, uint64_t token, int64_t lease_ms, struct err *e)
{
    int rc = queue_writer_extend(qb, id, token, lease_ms, e);

    if (!id[0]) {
        /* queue_on_final(NULL)'s barrier: the writer's groups are past; so is any on_final
         * call of the listener (a NOTIFY of another process) */
        pthread_mutex_lock(&pgq(qb)->final_lock);
        pthread_mutex_unlock(&pgq(qb)->final_lock);
    }
    return rc;
}
