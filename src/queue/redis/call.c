/*
 * call.c: calling the Redis queue's script (EVALSHA with the operation, the key prefix and the
 * time first), on a given connection or a pooled one, and reading the fields of its replies.
 */
#define _GNU_SOURCE
#include "core/clock.h"
#include "queue/redis/internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- calling the script ---- */

void rq_arg(struct args *a, const char *s)
{
    a->v[a->n] = s ? s : "";
    a->len[a->n] = strlen(a->v[a->n]);
    a->n++;
}

void rq_arg_bin(struct args *a, const char *s, size_t len)
{
    a->v[a->n] = s ? s : "";
    a->len[a->n] = s ? len : 0;
    a->n++;
}

void rq_arg_int(struct args *a, int64_t v)
{
    snprintf(a->store[a->n], sizeof(a->store[a->n]), "%lld", (long long)v);
    rq_arg(a, a->store[a->n]);
}

/* EVALSHA <sha> 0 <op> <prefix> <now> ...: the head of every script call. */
void rq_script_args(struct redis_queue *q, struct args *a, const char *op)
{
    a->n = 0;
    rq_arg(a, "EVALSHA");
    rq_arg(a, q->sha);
    rq_arg(a, "0");
    rq_arg(a, op);
    rq_arg(a, q->prefix);
    rq_arg_int(a, clock_now_ms());
}

redisReply *rq_call(struct redis_queue *q, redisContext *c, struct args *a, struct err *e)
{
    redisReply *r = redisCommandArgv(c, a->n, a->v, a->len);

    if (!r) {
        err_set(e, ERR_UNAVAILABLE, "Redis at %s:%d: %s", q->host, q->port, c->errstr);
        return NULL;
    }
    if (r->type == REDIS_REPLY_ERROR) {
        err_set(e, ERR_IO, "Redis: %.200s", r->str);
        freeReplyObject(r);
        return NULL;
    }
    return r;
}

/* One script call on a pooled connection. */
redisReply *rq_run(struct redis_queue *q, struct args *a, struct err *e)
{
    redisContext *c = rq_take_conn(q, e);
    redisReply *r;

    if (!c)
        return NULL;
    r = rq_call(q, c, a, e);
    rq_give_conn(q, c);
    return r;
}

int rq_int_reply(redisReply *r, int64_t *v)
{
    if (!r || r->type != REDIS_REPLY_INTEGER)
        return -1;
    *v = r->integer;
    return 0;
}

/* ---- fields of hashes ---- */

const char *rq_hget(const redisReply *h, const char *name, size_t *len)
{
    for (size_t i = 0; h && i + 1 < h->elements; i += 2) {
        if (strcmp(h->element[i]->str, name) == 0) {
            if (len)
                *len = h->element[i + 1]->len;
            return h->element[i + 1]->str;
        }
    }
    return NULL;
}

int64_t rq_hget_int(const redisReply *h, const char *name)
{
    const char *s = rq_hget(h, name, NULL);
    return s ? strtoll(s, NULL, 10) : 0;
}

char *rq_hget_dup(const redisReply *h, const char *name)
{
    const char *s = rq_hget(h, name, NULL);
    return s && s[0] ? strdup(s) : NULL;
}
