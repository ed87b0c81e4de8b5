/*
 * workers.c: worker processes in the SQLite queue: heartbeats, and what happens to the jobs of
 * a worker presumed dead or of an attempt whose lease ran out.
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

/*
 * A running attempt is lost (its lease ran out, or its worker is presumed dead): it counts,
 * and the job runs again at once, or fails when that was its last attempt. The attempt's late
 * outcome is fenced out: the next lease makes another attempt number. Writer thread.
 */
int sq_attempt_lost(struct sqlite_queue *q, const char *id, const char *why, int64_t now)
{
    struct job *j = NULL;
    struct err e;
    sqlite3_stmt *st;
    int exhausted, rc;

    if (sq_load_job(q->wdb, id, &j, &e) != 0)
        return -1;
    if (j->state != JOB_RUNNING) {
        job_free(j);
        return -1;
    }
    exhausted = j->attempts - j->attempts_uncounted >= j->max_attempts;
    st = sq_prepare(q->wdb, exhausted ? "UPDATE jobs SET state = 3, finished_ms = ?1, error = ?3 "
                                        "|| ' on the last attempt' WHERE id = ?2 AND state = 1"
                                      : "UPDATE jobs SET state = 0, available_ms = ?1, error = "
                                        "?3 WHERE id = ?2 AND state = 1");
    rc = st ? 0 : -1;
    if (st) {
        sqlite3_bind_int64(st, 1, now);
        sqlite3_bind_text(st, 2, id, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 3, why, -1, SQLITE_STATIC);
        rc = sqlite3_step(st) == SQLITE_DONE ? 0 : -1;
        sq_finish(st);
    }
    if (rc == 0)
        sq_attempt_ended(q, id, (uint64_t)j->attempts, why, &e);
    if (rc == 0 && exhausted) {
        log_warn("queue", "job failed",
                 "job=%s model=%s attempts=%d error=\"%s on the last "
                 "attempt\"",
                 id, j->model, j->attempts, why);
        sq_job_became_final(q, id, &e);
    } else if (rc == 0)
        q->n_queued++;
    job_free(j);
    return rc;
}

/* The running jobs of worker `wid` are lost (`why`), and it leaves the workers table. */
void sq_reap_worker(struct sqlite_queue *q, const char *wid, const char *why, int64_t now)
{
    sqlite3_stmt *st;
    char ids[64][40];
    int n = 0;

    st = sq_prepare(q->wdb, "SELECT id FROM jobs WHERE state = 1 AND worker = ? LIMIT 64");
    if (st) {
        sqlite3_bind_text(st, 1, wid, -1, SQLITE_STATIC);
        while (n < 64 && sqlite3_step(st) == SQLITE_ROW)
            snprintf(ids[n++], 40, "%s", sqlite3_column_text(st, 0));
        sq_finish(st);
    }
    for (int i = 0; i < n && !sqlite3_get_autocommit(q->wdb); i++)
        sq_attempt_lost(q, ids[i], why, now);
    if (n == 64)
        return; /* more: the next sweep goes on before the worker leaves */
    st = sq_prepare(q->wdb, "DELETE FROM workers WHERE id = ?");
    if (st) {
        sqlite3_bind_text(st, 1, wid, -1, SQLITE_STATIC);
        sqlite3_step(st);
        sq_finish(st);
    }
    if (n > 0)
        queue_log_worker_lost(wid, n, why);
}

/* Workers silent past their timeout are presumed dead: their running jobs run again now. Not
 * while the store could not take their beats: each gets a whole timeout of commits that work
 * (a full disk stops every beat, and their kept outcomes must not be fenced out for it). */
void sq_reap_dead_workers(struct sqlite_queue *q, int64_t now)
{
    sqlite3_stmt *st = sq_prepare(q->wdb, "SELECT id, (?1 - heartbeat_ms) / 1000 FROM workers "
                                          "WHERE heartbeat_ms + timeout_ms <= ?1 AND "
                                          "?2 + timeout_ms <= ?1 LIMIT 8");
    char wids[8][96], why[8][128];
    int n = 0;

    if (!st || sqlite3_get_autocommit(q->wdb)) {
        sq_finish(st);
        return;
    }
    sqlite3_bind_int64(st, 1, now);
    sqlite3_bind_int64(st, 2, q->last_failed_ms);
    while (n < 8 && sqlite3_step(st) == SQLITE_ROW) {
        snprintf(wids[n], sizeof(wids[n]), "%s", sqlite3_column_text(st, 0));
        snprintf(why[n], sizeof(why[n]), "its worker %.95s sent no heartbeat for %lld s", wids[n],
                 (long long)sqlite3_column_int64(st, 1));
        n++;
    }
    sq_finish(st);
    for (int i = 0; i < n && !sqlite3_get_autocommit(q->wdb); i++)
        sq_reap_worker(q, wids[i], why[i], now);
}

int sq_op_worker_beat(struct sqlite_queue *q, struct queue_op *o)
{
    const struct queue_worker *w = o->wk;
    sqlite3_stmt *st = sq_prepare(q->wdb, "INSERT INTO workers (id, host, pid, started_ms, "
                                          "heartbeat_ms, timeout_ms, jobs_running) VALUES (?1, ?2, "
                                          "?3, ?4, ?5, ?6, ?7) ON CONFLICT(id) DO UPDATE SET "
                                          "heartbeat_ms = ?5, timeout_ms = ?6, jobs_running = ?7");
    int rc = 0;

    if (!st)
        return sq_db_err(q->wdb, &o->err, "prepare");
    sqlite3_bind_text(st, 1, w->id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, w->host, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 3, w->pid);
    sqlite3_bind_int64(st, 4, w->started_ms);
    sqlite3_bind_int64(st, 5, clock_now_ms());
    sqlite3_bind_int64(st, 6, w->timeout_ms);
    sqlite3_bind_int(st, 7, w->jobs_running);
    if (sqlite3_step(st) != SQLITE_DONE)
        rc = sq_db_err(q->wdb, &o->err, "worker heartbeat");
    sq_finish(st);
    return rc;
}

/* ---- workers ---- */

int sq_workers_list(struct queue *qb, struct queue_worker **out, size_t *n, struct err *e)
{
    struct sqlite_queue *q = sq_of(qb);
    struct queue_worker *v = NULL;
    size_t cap = 0;
    sqlite3_stmt *st;
    int rc = 0;

    *out = NULL;
    *n = 0;
    pthread_mutex_lock(&q->read_lock);
    st = sq_prepare(q->rdb, "SELECT id, host, pid, started_ms, heartbeat_ms, timeout_ms, "
                            "jobs_running FROM workers WHERE heartbeat_ms + timeout_ms > ? "
                            "ORDER BY started_ms, id");
    if (!st)
        rc = sq_db_err(q->rdb, e, "prepare");
    if (st)
        sqlite3_bind_int64(st, 1, clock_now_ms());
    while (rc == 0 && st && sqlite3_step(st) == SQLITE_ROW) {
        if (*n == cap) {
            struct queue_worker *bigger = realloc(v, (cap ? cap * 2 : 8) * sizeof(*v));
            if (!bigger) {
                rc = err_set(e, ERR_NOMEM, "out of memory");
                break;
            }
            v = bigger;
            cap = cap ? cap * 2 : 8;
        }
        struct queue_worker *w = &v[(*n)++];
        memset(w, 0, sizeof(*w));
        snprintf(w->id, sizeof(w->id), "%s", sqlite3_column_text(st, 0));
        snprintf(w->host, sizeof(w->host), "%s", sqlite3_column_text(st, 1));
        w->pid = sqlite3_column_int(st, 2);
        w->started_ms = sqlite3_column_int64(st, 3);
        w->heartbeat_ms = sqlite3_column_int64(st, 4);
        w->timeout_ms = sqlite3_column_int64(st, 5);
        w->jobs_running = sqlite3_column_int(st, 6);
    }
    sq_finish(st);
    pthread_mutex_unlock(&q->read_lock);
    if (rc != 0) {
        free(v);
        *n = 0;
        return rc;
    }
    *out = v;
    return 0;
}
