/*
 * outbox.c: the Redis queue's webhooks: taking due ones (each held by one sender for
 * OUTBOX_HOLD_MS; a body is built once, on its first sending, and stored) and recording attempts.
 */
#define _GNU_SOURCE
#include "core/clock.h"
#include "queue/redis/internal.h"
#include "core/log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- webhooks ---- */

/* Fixes an outbox item's body the first time it is sent; gives back the stored one. */
static int outbox_body(struct redis_queue *q, redisContext *c, struct queue_outbox_item *it,
                       const char *job_id, int is_batch, struct err *e)
{
    struct job *j = NULL;
    struct buf body = {0};
    struct args a;
    redisReply *r;
    char oid[24];
    int rc;

    if (is_batch) {
        rc = rq_batch_event_json(q, c, job_id, it->event_id, &body, e);
    } else {
        rc = rq_load_job(q, c, job_id, 0, 1, &j, e);
        if (rc == 0 && rq_load_history(q, c, j) != 0) /* the event's job shows its attempts too */
            rc = err_set(e, ERR_UNAVAILABLE, "Redis at %s:%d: %s", q->host, q->port, c->errstr);
        if (rc == 0 && queue_event_json(j, it->event_id, q->cfg.result_inline_max_bytes, &body))
            rc = err_set(e, ERR_NOMEM, "out of memory");
        job_free(j);
    }
    if (rc != 0) {
        buf_release(&body);
        return rc;
    }
    snprintf(oid, sizeof(oid), "%lld", (long long)it->id);
    rq_script_args(q, &a, "outbox_body");
    rq_arg(&a, oid);
    rq_arg_bin(&a, body.data, body.len);
    r = rq_call(q, c, &a, e);
    freeReplyObject(r);
    buf_release(&body);
    if (!r)
        return e->code;
    r = redisCommand(c, "HGET %sout:%s body", q->prefix, oid);
    if (r && r->type == REDIS_REPLY_STRING) {
        it->body = malloc(r->len + 1);
        if (it->body) {
            memcpy(it->body, r->str, r->len);
            it->body[r->len] = '\0';
            it->body_len = r->len;
        }
    }
    freeReplyObject(r);
    return it->body ? 0 : err_set(e, ERR_IO, "webhook %s: no body", oid);
}

/* One taken webhook from its {id, hash} pair, its body built if it has none yet. On failure
 * `it` is left empty (it waits out its hold in the outbox and is taken again). */
static int outbox_item(struct redis_queue *q, redisContext *c, const redisReply *pair, size_t index,
                       struct queue_outbox_item *it, struct err *e)
{
    const redisReply *h;
    const char *job, *body;
    size_t len = 0;
    int rc = 0;

    memset(it, 0, sizeof(*it));
    if (pair->type != REDIS_REPLY_ARRAY || pair->elements != 2 || !pair->element[0]->str)
        return err_set(e, ERR_IO, "Redis: unexpected answer to outbox_take");
    h = pair->element[1];
    job = rq_hget(h, "job_id", NULL);
    body = rq_hget(h, "body", &len);
    it->id = strtoll(pair->element[0]->str, NULL, 10);
    it->event_id = rq_hget_dup(h, "event_id");
    it->url = rq_hget_dup(h, "url");
    it->attempts = (int)rq_hget_int(h, "attempts");
    if (!it->event_id || !it->url) {
        rc = err_set(e, ERR_NOMEM, "webhook %lld: no event id or url (or out of memory)",
                     (long long)it->id);
    } else if (queue_fault("outbox_due", index)) {
        rc = err_set(e, ERR_IO, "webhook %lld: injected fault", (long long)it->id);
    } else if (body) {
        it->body = malloc(len + 1);
        if (!it->body) {
            rc = err_set(e, ERR_NOMEM, "out of memory");
        } else {
            memcpy(it->body, body, len);
            it->body[len] = '\0';
            it->body_len = len;
        }
    } else if (job) {
        rc = outbox_body(q, c, it, job, rq_hget_int(h, "batch") == 1, e);
    } else {
        rc = err_set(e, ERR_IO, "webhook %lld: neither a body nor a job", (long long)it->id);
    }
    if (rc != 0)
        queue_outbox_item_release(it);
    return rc;
}

static int r_outbox_due(struct queue *qb, int64_t now_ms, size_t max,
                        struct queue_outbox_item **out, size_t *n, struct err *e)
{
    struct redis_queue *q = rq(qb);
    redisContext *c = rq_take_conn(q, e);
    struct queue_outbox_item *items = NULL;
    struct args a;
    redisReply *r;
    int rc = 0;

    (void)now_ms;
    *out = NULL;
    *n = 0;
    if (!c)
        return e->code;
    rq_script_args(q, &a, "outbox_take");
    rq_arg_int(&a, (int64_t)max);
    rq_arg_int(&a, OUTBOX_HOLD_MS);
    r = rq_call(q, c, &a, e);
    if (!r) {
        rc = e->code;
    } else if (r->type == REDIS_REPLY_ARRAY && r->elements > 0) {
        items = calloc(r->elements, sizeof(*items));
        if (!items)
            rc = err_set(e, ERR_NOMEM, "out of memory");
    }
    /* an item that cannot be built is left out; `*n` counts the ones that were */
    for (size_t i = 0; items && i < r->elements; i++) {
        struct err be;
        if (outbox_item(q, c, r->element[i], i, &items[*n], &be) == 0)
            (*n)++;
        else
            log_warn("queue", "webhook not taken; it is tried again after its hold",
                     "hold_ms=%d reason=\"%s\"", OUTBOX_HOLD_MS, be.msg);
    }
    freeReplyObject(r);
    rq_give_conn(q, c);
    if (*n == 0) {
        free(items);
        items = NULL;
    }
    *out = items;
    return rc;
}

static int64_t r_outbox_next_due(struct queue *qb)
{
    struct redis_queue *q = rq(qb);
    struct err e;
    redisContext *c = rq_take_conn(q, &e);
    redisReply *r;
    int64_t next = -1;

    if (!c)
        return clock_now_ms() + 1000;
    r = redisCommand(c, "ZRANGE %soutbox 0 0 WITHSCORES", q->prefix);
    if (r && r->type == REDIS_REPLY_ARRAY && r->elements == 2)
        next = strtoll(r->element[1]->str, NULL, 10);
    freeReplyObject(r);
    rq_give_conn(q, c);
    return next;
}

static int r_outbox_record(struct queue *qb, const struct queue_outbox_attempt *at, struct err *e)
{
    struct redis_queue *q = rq(qb);
    struct buf rec = {0};
    struct args a;
    redisReply *r;
    char oid[24];
    int rc;

    /* a record of the delivery (load_notifications reads it); the script puts the outbox
     * item's event id first */
    rc = buf_printf(&rec, ",\"at_ms\":%lld,\"status_code\":%d,\"error\":", (long long)at->at_ms,
                    at->http_status);
    if (rc == 0)
        rc = at->error ? buf_json_string(&rec, at->error) : buf_puts(&rec, "null");
    if (rc == 0)
        rc = buf_puts(&rec, "}");
    if (rc != 0) {
        buf_release(&rec);
        return err_set(e, ERR_NOMEM, "out of memory");
    }
    snprintf(oid, sizeof(oid), "%lld", (long long)at->outbox_id);
    rq_script_args(q, &a, "outbox_record");
    rq_arg(&a, oid);
    rq_arg_bin(&a, rec.data, rec.len);
    rq_arg(&a, at->done ? "1" : "0");
    rq_arg_int(&a, at->next_attempt_ms);
    r = rq_run(q, &a, e);
    buf_release(&rec);
    freeReplyObject(r);
    return r ? 0 : e->code;
}

const struct queue_outbox_ops rq_outbox_ops = {
    .due = r_outbox_due,
    .next_due = r_outbox_next_due,
    .record = r_outbox_record,
    .exclusive = 1,
};
