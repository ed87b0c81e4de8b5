/*
 * outbox.c: the SQLite queue's webhook outbox: a job's final state and its webhook row are
 * written in one transaction (writer thread); senders read what is due on the read connection.
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

/* ---- finals and the outbox (writer thread) ---- */

static void sq_note_final(struct sqlite_queue *q, const char *id, enum job_state state)
{
    struct final_note *n = calloc(1, sizeof(*n));

    if (!n)
        return; /* long-polls then wait for their deadline: no correctness depends on this */
    snprintf(n->id, sizeof(n->id), "%s", id);
    n->state = state;
    n->next = q->finals;
    q->finals = n;
}

/* A job just became final: note it, and store its webhook in the same transaction. */
int sq_job_became_final(struct sqlite_queue *q, const char *id, struct err *e)
{
    struct job *j = NULL;
    struct buf body = {0};
    sqlite3_stmt *st = NULL;
    char event_id[48];
    int rc;

    rc = sq_load_job(q->wdb, id, &j, e);
    if (rc != 0)
        goto cleanup;
    sq_note_final(q, id, j->state);
    if (j->kind != JOB_KIND_INFER) {
        rc = sq_batch_task_final(q, j, e); /* the batch job, not the task, has a webhook */
        goto cleanup;
    }
    if (!j->callback_url || !j->callback_url[0])
        goto cleanup;
    /* the event id is fixed here, so every repeat of this webhook carries the same one; a
     * job sent back to the queue ends again with more attempts, and that is a new event */
    snprintf(event_id, sizeof(event_id), "evt_%s_%d", j->id, j->attempts);
    if (j->state == JOB_SUCCEEDED && !j->output_location) {
        sqlite3_stmt *rs =
            sq_prepare(q->wdb, "SELECT result, result_json_len FROM jobs WHERE id = ?");
        if (rs) {
            sqlite3_bind_text(rs, 1, id, -1, SQLITE_STATIC);
            if (sqlite3_step(rs) == SQLITE_ROW) {
                buf_append(&j->result, sqlite3_column_blob(rs, 0),
                           (size_t)sqlite3_column_bytes(rs, 0));
                j->result_json_len = sqlite3_column_int64(rs, 1);
            }
            sq_finish(rs);
        }
    }
    if (sq_load_history(q->wdb, j) != 0) /* the event's job shows its attempts too */
        log_warn("queue", "a webhook's job lacks its attempts", "job=%s", id);
    rc = queue_event_json(j, event_id, q->cfg.result_inline_max_bytes, &body);
    if (rc != 0) {
        rc = err_set(e, ERR_NOMEM, "out of memory building a webhook");
        goto cleanup;
    }
    st = sq_prepare(q->wdb, "INSERT OR IGNORE INTO outbox (event_id, job_id, url, body, next_ms) "
                            "VALUES (?, ?, ?, ?, ?)");
    if (!st) {
        rc = sq_db_err(q->wdb, e, "prepare outbox");
        goto cleanup;
    }
    sqlite3_bind_text(st, 1, event_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, j->callback_url, -1, SQLITE_STATIC);
    sqlite3_bind_blob(st, 4, body.data, (int)body.len, SQLITE_STATIC);
    sqlite3_bind_int64(st, 5, clock_now_ms());
    if (sqlite3_step(st) != SQLITE_DONE)
        rc = sq_db_err(q->wdb, e, "store webhook");
cleanup:
    sq_finish(st);
    buf_release(&body);
    job_free(j);
    return rc;
}

int sq_op_outbox_record(struct sqlite_queue *q, struct queue_op *o)
{
    const struct queue_outbox_attempt *a = o->attempt;
    sqlite3_stmt *st = sq_prepare(q->wdb, "INSERT INTO deliveries (outbox_id, job_id, event_id, "
                                          "at_ms, http_status, error) SELECT id, job_id, event_id, "
                                          "?, ?, ? FROM outbox WHERE id = ?");
    int rc = 0;

    if (!st)
        return sq_db_err(q->wdb, &o->err, "prepare");
    sqlite3_bind_int64(st, 1, a->at_ms);
    sqlite3_bind_int(st, 2, a->http_status);
    sqlite3_bind_text(st, 3, a->error, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 4, a->outbox_id);
    if (sqlite3_step(st) != SQLITE_DONE)
        rc = sq_db_err(q->wdb, &o->err, "record delivery");
    sq_finish(st);
    if (rc != 0)
        return rc;
    st = sq_prepare(q->wdb, "UPDATE outbox SET attempts = attempts + 1, done = ?, delivered = ?, "
                            "next_ms = ? WHERE id = ?");
    if (!st)
        return sq_db_err(q->wdb, &o->err, "prepare");
    sqlite3_bind_int(st, 1, a->done);
    sqlite3_bind_int(st, 2, a->delivered);
    sqlite3_bind_int64(st, 3, a->next_attempt_ms);
    sqlite3_bind_int64(st, 4, a->outbox_id);
    if (sqlite3_step(st) != SQLITE_DONE)
        rc = sq_db_err(q->wdb, &o->err, "record delivery");
    sq_finish(st);
    return rc;
}

static int sq_outbox_due(struct queue *qb, int64_t now_ms, size_t max,
                         struct queue_outbox_item **out, size_t *n, struct err *e)
{
    struct sqlite_queue *q = sq_of(qb);
    sqlite3_stmt *st;
    size_t cap = max, count = 0;
    struct queue_outbox_item *items = calloc(cap ? cap : 1, sizeof(*items));
    int rc = 0;

    *out = NULL;
    *n = 0;
    if (!items)
        return err_set(e, ERR_NOMEM, "out of memory");
    pthread_mutex_lock(&q->read_lock);
    st = sq_prepare(q->rdb, "SELECT id, event_id, url, body, attempts FROM outbox WHERE done = 0 "
                            "AND next_ms <= ? ORDER BY next_ms LIMIT ?");
    if (!st)
        rc = sq_db_err(q->rdb, e, "prepare");
    if (st) {
        sqlite3_bind_int64(st, 1, now_ms);
        sqlite3_bind_int64(st, 2, (int64_t)max);
    }
    /* a row that cannot be copied is left out (`count` counts the others): it stays due and
     * is taken at the next look, never handed out without its url or body */
    for (size_t row = 0; st && count < cap && sqlite3_step(st) == SQLITE_ROW; row++) {
        struct queue_outbox_item *it = &items[count];
        it->id = sqlite3_column_int64(st, 0);
        it->event_id = sq_col_strdup(st, 1);
        it->url = sq_col_strdup(st, 2);
        it->body_len = (size_t)sqlite3_column_bytes(st, 3);
        it->body = malloc(it->body_len + 1);
        if (it->body) {
            if (it->body_len)
                memcpy(it->body, sqlite3_column_blob(st, 3), it->body_len);
            it->body[it->body_len] = '\0';
        }
        it->attempts = sqlite3_column_int(st, 4);
        if (it->event_id && it->url && it->body && !queue_fault("outbox_due", row))
            count++;
        else
            queue_outbox_item_release(it);
    }
    sq_finish(st);
    pthread_mutex_unlock(&q->read_lock);
    *out = items;
    *n = count;
    return rc;
}

static int64_t sq_outbox_next_due(struct queue *qb)
{
    struct sqlite_queue *q = sq_of(qb);
    sqlite3_stmt *st;
    int64_t next = -1;

    pthread_mutex_lock(&q->read_lock);
    st = sq_prepare(q->rdb, "SELECT MIN(next_ms) FROM outbox WHERE done = 0");
    if (st && sqlite3_step(st) == SQLITE_ROW && sqlite3_column_type(st, 0) != SQLITE_NULL)
        next = sqlite3_column_int64(st, 0);
    sq_finish(st);
    pthread_mutex_unlock(&q->read_lock);
    return next;
}

const struct queue_outbox_ops sqlite_outbox_ops = {
    .due = sq_outbox_due,
    .next_due = sq_outbox_next_due,
    .record = queue_writer_outbox_record,
    .exclusive = 0,
};
