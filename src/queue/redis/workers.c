/*
 * workers.c: the Redis queue's workers: each one's heartbeat, its leaving, and the live ones
 * (a sorted set by when each is presumed dead, and a hash per worker).
 */
#define _GNU_SOURCE
#include "core/clock.h"
#include "queue/redis/internal.h"

#include <stdio.h>
#include <stdlib.h>

/* ---- workers and their heartbeats ---- */

int rq_worker_beat(struct queue *qb, const struct queue_worker *w, struct err *e)
{
    struct redis_queue *q = rq(qb);
    struct args a;
    redisReply *r;

    rq_script_args(q, &a, "worker_beat");
    rq_arg(&a, w->id);
    rq_arg(&a, w->host);
    rq_arg_int(&a, w->pid);
    rq_arg_int(&a, w->started_ms);
    rq_arg_int(&a, w->timeout_ms);
    rq_arg_int(&a, w->jobs_running);
    r = rq_run(q, &a, e);
    freeReplyObject(r);
    return r ? 0 : e->code;
}

int rq_worker_leave(struct queue *qb, const char *id, struct err *e)
{
    struct redis_queue *q = rq(qb);
    struct args a;
    redisReply *r;

    rq_script_args(q, &a, "worker_leave");
    rq_arg(&a, id);
    rq_arg_int(&a, q->cfg.result_ttl_s);
    r = rq_run(q, &a, e);
    freeReplyObject(r);
    return r ? 0 : e->code;
}

static int by_start(const void *a, const void *b)
{
    const struct queue_worker *x = a, *y = b;

    return x->started_ms < y->started_ms ? -1 : x->started_ms > y->started_ms;
}

/* The live workers, oldest first: those whose time to be presumed dead is still ahead. */
int rq_workers_list(struct queue *qb, struct queue_worker **out, size_t *n, struct err *e)
{
    struct redis_queue *q = rq(qb);
    redisContext *c = rq_take_conn(q, e);
    redisReply *ids;
    struct queue_worker *v = NULL;
    int rc = 0;

    *out = NULL;
    *n = 0;
    if (!c)
        return e->code;
    ids = redisCommand(c, "ZRANGEBYSCORE %sworkers (%lld +inf LIMIT 0 10000", q->prefix,
                       (long long)clock_now_ms());
    if (!ids || ids->type != REDIS_REPLY_ARRAY)
        rc = err_set(e, ERR_UNAVAILABLE, "Redis at %s:%d: %s", q->host, q->port, c->errstr);
    else if (ids->elements > 0 && !(v = calloc(ids->elements, sizeof(*v))))
        rc = err_set(e, ERR_NOMEM, "out of memory");
    for (size_t i = 0; rc == 0 && v && i < ids->elements; i++) {
        redisReply *h = redisCommand(c, "HGETALL %sworker:%s", q->prefix, ids->element[i]->str);
        struct queue_worker *w = &v[*n];
        const char *host;
        if (h && h->type == REDIS_REPLY_ARRAY && h->elements > 0 &&
            (host = rq_hget(h, "host", NULL))) {
            snprintf(w->id, sizeof(w->id), "%s", ids->element[i]->str);
            snprintf(w->host, sizeof(w->host), "%s", host);
            w->pid = (int)rq_hget_int(h, "pid");
            w->started_ms = rq_hget_int(h, "started_ms");
            w->heartbeat_ms = rq_hget_int(h, "heartbeat_ms");
            w->timeout_ms = rq_hget_int(h, "timeout_ms");
            w->jobs_running = (int)rq_hget_int(h, "jobs_running");
            (*n)++;
        }
        freeReplyObject(h);
    }
    freeReplyObject(ids);
    rq_give_conn(q, c);
    if (rc == 0 && *n > 1)
        qsort(v, *n, sizeof(*v), by_start); /* the set is ordered by presumed-dead time */
    if (rc != 0 || *n == 0) {
        free(v);
        v = NULL;
        if (rc != 0)
            *n = 0;
    }
    *out = v;
    return rc;
}
