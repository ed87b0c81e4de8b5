/*
 * writer.c: the SQLite queue's writer thread, group commit, and its periodic sweeps.
 *
 * Group commit: every write goes through one writer thread. Callers queue an operation and
 * wait; the writer takes everything queued, runs it in one transaction (one SAVEPOINT per
 * operation, so one failing operation does not undo the others), commits with one fsync
 * (synchronous=FULL) and wakes the callers. Under load, hundreds of operations share one fsync.
 * The queue of operations and the ops-table entries that submit them are the core's
 * (queue/writer.c); how a group runs is this file's.
 * The sweep (expired leases, ttl, dead workers) and retention run on this thread too.
 */
#define _GNU_SOURCE
#include "queue/sqlite/internal.h"
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
        if (sq_attempt_lost(q, ids[i], "its lease expired", now) == 0)
            log_warn("queue", "lease expired", "job=%s", ids[i]);
    sq_reap_dead_workers(q, now);
}

/* Finished jobs past their retention (queue_retain_before_ms): inference jobs, with their
 * webhook records; a job whose webhook is still being delivered stays. (Batch tasks go with
 * their run.) ?1 is the cutoff, ?2 the most per pass. */
static const char *const retire_jobs[] = {
    "DELETE FROM temp.retired",
    "INSERT INTO temp.retired SELECT id FROM jobs INDEXED BY jobs_finished WHERE state >= 2 "
    "AND finished_ms <= ?1 AND kind = 0 AND batch_id IS NULL AND NOT EXISTS (SELECT 1 FROM "
    "outbox WHERE outbox.job_id = jobs.id AND done = 0) ORDER BY finished_ms LIMIT ?2",
    "DELETE FROM deliveries WHERE job_id IN temp.retired",
    "DELETE FROM outbox WHERE job_id IN temp.retired",
    "DELETE FROM jobs WHERE id IN temp.retired",
};

/* Finished batch runs past their retention, with their tasks, progress and webhook records;
 * a run with a task still running (a cancelled run's) or a webhook still being delivered
 * stays, and so does every schedule. */
static const char *const retire_runs[] = {
    "DELETE FROM temp.retired",
    "INSERT INTO temp.retired SELECT id FROM batch_jobs b WHERE state >= 2 AND schedule IS NULL "
    "AND finished_ms <= ?1 AND NOT EXISTS (SELECT 1 FROM outbox WHERE outbox.job_id = b.id AND "
    "done = 0) AND NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.batch_id = b.id AND state < 2) "
    "ORDER BY finished_ms LIMIT ?2",
    "DELETE FROM deliveries WHERE job_id IN temp.retired OR job_id IN (SELECT id FROM jobs "
    "WHERE batch_id IN temp.retired)",
    "DELETE FROM outbox WHERE job_id IN temp.retired OR job_id IN (SELECT id FROM jobs WHERE "
    "batch_id IN temp.retired)",
    "DELETE FROM batch_progress WHERE batch_id IN temp.retired",
    "DELETE FROM jobs WHERE batch_id IN temp.retired",
    "DELETE FROM batch_jobs WHERE id IN temp.retired",
};

/* Runs one of the tables above; returns how many it chose (0 on an error). */
static int retire(struct sqlite_queue *q, const char *const *steps, size_t n_steps,
                  int64_t before_ms, int max)
{
    int n = 0;

    for (size_t i = 0; i < n_steps; i++) {
        sqlite3_stmt *st = sq_prepare(q->wdb, steps[i]);
        if (!st)
            return 0;
        if (i == 1) {
            sqlite3_bind_int64(st, 1, before_ms);
            sqlite3_bind_int(st, 2, max);
        }
        int rc = sqlite3_step(st);
        if (i == 1)
            n = sqlite3_changes(q->wdb);
        sq_finish(st);
        if (rc != SQLITE_DONE || (i == 1 && n == 0))
            break;
    }
    return n;
}

/* Removes what finished past --result-ttl-s, a bounded amount per call. Returns 1 when more
 * is left for the next call. */
static int retain(struct sqlite_queue *q, int64_t now)
{
    int64_t before = queue_retain_before_ms(&q->cfg, now);
    int jobs =
        retire(q, retire_jobs, sizeof(retire_jobs) / sizeof(retire_jobs[0]), before, RETAIN_MAX);
    int runs = sqlite3_get_autocommit(q->wdb)
                   ? 0
                   : retire(q, retire_runs, sizeof(retire_runs) / sizeof(retire_runs[0]), before,
                            RETAIN_RUNS_MAX);

    if (jobs > 0 || runs > 0)
        log_debug("queue", "finished work past its retention removed", "jobs=%d batch_runs=%d",
                  jobs, runs);
    return jobs == RETAIN_MAX || runs == RETAIN_RUNS_MAX;
}

static int run_op(struct sqlite_queue *q, struct queue_op *o)
{
    switch (o->kind) {
    case QUEUE_OP_WORKER_BEAT:
        return sq_op_worker_beat(q, o);
    case QUEUE_OP_WORKER_LEAVE:
        sq_reap_worker(q, o->id, "its worker stopped", clock_now_ms());
        return 0;
    case QUEUE_OP_ENQUEUE:
        return sq_op_enqueue(q, o);
    case QUEUE_OP_LEASE:
        return sq_op_lease(q, o);
    case QUEUE_OP_EXTEND:
        return sq_op_extend(q, o);
    case QUEUE_OP_COMPLETE:
        return sq_op_complete(q, o);
    case QUEUE_OP_FAIL:
        return sq_op_fail(q, o);
    case QUEUE_OP_CANCEL:
        return sq_op_cancel(q, o);
    case QUEUE_OP_RETRY:
        return sq_op_retry(q, o);
    case QUEUE_OP_OUTBOX_RECORD:
        return sq_op_outbox_record(q, o);
    case QUEUE_OP_BATCH_CREATE:
        return sq_op_batch_create(q, o);
    case QUEUE_OP_BATCH_CANCEL:
        return sq_op_batch_cancel(q, o);
    case QUEUE_OP_BATCH_PAUSE:
        return sq_op_batch_pause(q, o);
    case QUEUE_OP_BATCH_PROGRESS:
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
static int txn_lost(struct sqlite_queue *q, const struct queue_op *why, struct err *e)
{
    if (!sqlite3_get_autocommit(q->wdb))
        return 0;
    if (why && why->rc != 0)
        *e = why->err;
    else
        sq_db_err(q->wdb, e, "transaction rolled back");
    return 1;
}

static void run_group(struct sqlite_queue *q, struct queue_op *ops)
{
    struct err e = {0};
    int64_t queued_before = q->n_queued, now = clock_now_ms();
    int64_t changes_before = sqlite3_total_changes64(q->wdb);
    int ok;

    int n_ops = 0;
    for (struct queue_op *o = ops; o; o = o->next)
        n_ops++;
    ok = sq_exec(q->wdb, "BEGIN IMMEDIATE", &e) == 0;
    for (struct queue_op *o = ops; ok && o; o = o->next) {
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
            if (o->kind == QUEUE_OP_ENQUEUE && o->rc != ERR_BUSY)
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
            q->next_retain_ms = now + (retain(q, now) ? 0 : RETAIN_INTERVAL_MS);
        ok = !txn_lost(q, NULL, &e);
    }
    int64_t commit_start = clock_now_ms();
    if (ok)
        ok = sq_exec(q->wdb, "COMMIT", &e) == 0;
    int64_t commit_ms = clock_now_ms() - commit_start;
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
    for (struct queue_op *o = ops; o; o = o->next) {
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

void *sq_writer_main(void *arg)
{
    struct sqlite_queue *q = arg;
    struct queue_op *ops;

    while (queue_writer_take(&q->w, SWEEP_INTERVAL_MS, &ops)) {
        struct final_note *finals, *next;
        /* n_queued is only written by this thread */
        int64_t queued_before = q->n_queued;

        run_group(q, ops);
        atomic_store(&q->n_queued_committed, q->n_queued);
        finals = q->finals;
        q->finals = NULL;

        /* jobs may have become runnable: some were queued, failed or retried, or a sweep
         * (an empty group) requeued some */
        int runnable = q->n_queued > queued_before || ops == NULL;
        for (const struct queue_op *o = ops; o && !runnable; o = o->next)
            runnable = o->kind == QUEUE_OP_FAIL || o->kind == QUEUE_OP_RETRY ||
                       o->kind == QUEUE_OP_ENQUEUE;
        queue_writer_done(&q->w, ops, runnable);
        for (struct final_note *f = finals; f; f = next) {
            next = f->next;
            if (q->base.on_final)
                q->base.on_final(q->base.on_final_ctx, f->id, f->state);
            free(f);
        }
    }
    return NULL;
}
