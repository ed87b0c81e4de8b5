/*
 * outbox.c: the webhook outbox of the PostgreSQL queue.
 *
 * A webhook is a row of inferd_outbox, stored in the transaction that ended its job (or batch
 * job), its body built then, so every attempt sends the same bytes. Many processes send
 * (outbox_exclusive = 1, as on Redis): queue_outbox_due() takes due rows with FOR UPDATE SKIP
 * LOCKED and moves their next attempt PG_OUTBOX_HOLD_MS ahead in the same statement, so a row
 * handed to one sender is not handed out again until its attempt is recorded (which sets the
 * real next attempt) or the hold runs out (its sender died).
 */
#define _GNU_SOURCE
#include "queue/postgres/pg_internal.h"
#include "core/clock.h"
#include "core/log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int pg_outbox_add(struct pg_txn *t, const char *job_id, const char *event_id, const char *url,
                  const char *body, size_t body_len, struct err *e)
{
    struct pg_params p = {0};

    pg_p_str(&p, event_id);
    pg_p_str(&p, job_id);
    pg_p_str(&p, url);
    pg_p_bin(&p, body ? body : "", body_len);
    pg_p_int(&p, clock_now_ms());
    return pg_run(t->q, t->c,
                  "INSERT INTO inferd_outbox (event_id, job_id, url, body, next_ms) VALUES ($1, "
                  "$2, $3, $4, $5) ON CONFLICT (event_id) DO NOTHING",
                  &p, "store webhook", e);
}

int pg_op_outbox_record(struct pg_txn *t, struct queue_op *o)
{
    const struct queue_outbox_attempt *a = o->attempt;
    struct pg_params p = {0};
    int rc;

    pg_p_int(&p, a->at_ms);
    pg_p_int(&p, a->http_status);
    pg_p_str(&p, a->error);
    pg_p_int(&p, a->outbox_id);
    rc = pg_run(t->q, t->c,
                "INSERT INTO inferd_deliveries (outbox_id, job_id, event_id, at_ms, http_status, "
                "error) SELECT id, job_id, event_id, $1, $2, $3 FROM inferd_outbox WHERE id = $4",
                &p, "record delivery", &o->err);
    if (rc != 0)
        return rc;
    p = (struct pg_params){0};
    pg_p_int(&p, a->done);
    pg_p_int(&p, a->delivered);
    pg_p_int(&p, a->next_attempt_ms);
    pg_p_int(&p, a->outbox_id);
    return pg_run(t->q, t->c,
                  "UPDATE inferd_outbox SET attempts = attempts + 1, done = $1, delivered = $2, "
                  "next_ms = $3 WHERE id = $4",
                  &p, "record delivery", &o->err);
}

int pg_outbox_due(struct queue *qb, int64_t now_ms, size_t max, struct queue_outbox_item **out,
                  size_t *n, struct err *e)
{
    struct pg_queue *q = pgq(qb);
    struct queue_outbox_item *items = NULL;
    struct pg_params p = {0};
    PGconn *c;
    PGresult *r;
    size_t count = 0;

    *out = NULL;
    *n = 0;
    if (max == 0)
        return 0;
    c = pg_take(q, e);
    if (!c)
        return e->code;
    pg_p_int(&p, now_ms);
    pg_p_int(&p, (int64_t)max);
    pg_p_int(&p, now_ms + PG_OUTBOX_HOLD_MS);
    /* taken and held in one statement (one transaction): no other sender gets these now */
    r = pg_exec(q, c,
                "UPDATE inferd_outbox o SET next_ms = $3 FROM (SELECT id FROM inferd_outbox "
                "WHERE done = 0 AND next_ms <= $1 ORDER BY next_ms LIMIT $2 FOR UPDATE SKIP "
                "LOCKED) due WHERE o.id = due.id RETURNING o.id, o.event_id, o.url, o.body, "
                "o.attempts",
                &p, "take webhooks", e);
    pg_give(q, c);
    if (!r)
        return e->code;
    if (PQntuples(r) > 0 && !(items = calloc((size_t)PQntuples(r), sizeof(*items)))) {
        PQclear(r);
        return err_set(e, ERR_NOMEM, "out of memory");
    }
    /* an item that cannot be built is left out: it waits out its hold and is taken again */
    for (int i = 0; i < PQntuples(r); i++) {
        struct queue_outbox_item *it = &items[count];
        struct buf body = {0};
        it->id = pg_int(r, i, 0);
        it->event_id = pg_strdup(r, i, 1);
        it->url = pg_strdup(r, i, 2);
        if (pg_bytea(r, i, 3, &body) == 0) {
            it->body_len = body.len;
            it->body = body.data ? buf_take(&body) : strdup("");
        }
        it->attempts = (int)pg_int(r, i, 4);
        if (it->event_id && it->url && it->body && !queue_fault("outbox_due", (size_t)i)) {
            count++;
        } else {
            log_warn("queue", "webhook not taken; it is tried again after its hold",
                     "outbox_id=%lld hold_ms=%d", (long long)it->id, PG_OUTBOX_HOLD_MS);
            queue_outbox_item_release(it);
        }
        buf_release(&body);
    }
    PQclear(r);
    if (count == 0) {
        free(items);
        items = NULL;
    }
    *out = items;
    *n = count;
    return 0;
}

int64_t pg_outbox_next_due(struct queue *qb)
{
    struct pg_queue *q = pgq(qb);
    struct err e;
    PGconn *c = pg_take(q, &e);
    PGresult *r;
    int64_t next = -1;

    if (!c)
        return clock_now_ms() + 1000; /* away: look again soon */
    r = pg_exec(q, c, "SELECT MIN(next_ms) FROM inferd_outbox WHERE done = 0", NULL,
                "read the outbox", &e);
    if (!r)
        next = clock_now_ms() + 1000;
    else if (!PQgetisnull(r, 0, 0))
        next = pg_int(r, 0, 0);
    PQclear(r);
    pg_give(q, c);
    return next;
}

int pg_load_notifications(struct pg_queue *q, PGconn *c, struct job *j)
{
    struct pg_params p = {0};
    struct err e;
    PGresult *r;
    int rc;

    pg_p_str(&p, j->id);
    r = pg_exec(q, c,
                "SELECT event_id, at_ms, http_status, error FROM inferd_deliveries WHERE job_id "
                "= $1 ORDER BY at_ms",
                &p, "read webhooks", &e);
    if (!r)
        return e.code;
    rc = 0;
    for (int i = 0; rc == 0 && i < PQntuples(r); i++)
        rc = queue_job_add_notification(j, PQgetvalue(r, i, 0), pg_int(r, i, 1),
                                        (int)pg_int(r, i, 2),
                                        PQgetisnull(r, i, 3) ? NULL : PQgetvalue(r, i, 3));
    PQclear(r);
    return rc;
}
