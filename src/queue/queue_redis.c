/*
 * queue_redis.c: the job queue on Redis Streams, shared by any number of processes.
 *
 * Every change is one call of queue_redis.lua (atomic: Redis runs a script alone), so the
 * guarantees are the SQLite queue's: a job is stored (and on its priority's stream) before
 * enqueue returns, a lease counts the attempt first, complete/fail/extend are fenced by the
 * attempt number, and a final state, its webhook and its wake-up are one step. Workers read
 * the streams through the consumer group "workers"; a sweeper in every process reclaims the
 * entries of attempts whose lease ran out (XAUTOCLAIM), so a crashed worker's jobs run again.
 *
 * Connections: a small pool of blocking hiredis contexts, each used by one thread at a time;
 * one more connection subscribes to the final-state channel (long-polls) and one pipelines
 * the asynchronous enqueues of HTTP threads. A lost connection is reconnected on next use;
 * meanwhile calls fail with ERR_UNAVAILABLE (the API answers 503 with Retry-After).
 *
 * Redis dying mid-call: a call's change may have happened though its answer never came. The
 * jobs of a lease whose answer was lost go back to the queue on the worker's next lease
 * (lease tickets, below); an outcome or webhook attempt that was not answered is sent again
 * by its caller, and fencing makes the repeat harmless.
 */
#define _GNU_SOURCE
#include "queue/queue_redis.h"
#include "core/clock.h"
#include "core/log.h"

#include <errno.h>
#include <hiredis/hiredis.h>
#include <jansson.h>
#include <openssl/sha.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#define POOL_SIZE 32
#define SWEEP_MS 1000
#define RECLAIM_MIN_IDLE_MS 1000
#define MAX_BACKOFF_MS 60000
#define OUTBOX_HOLD_MS 60000 /* a taken webhook is someone's for this long */
#define CONNECT_TIMEOUT_MS 3000
#define COMMAND_TIMEOUT_MS 10000
#define LOST_LEASES 64        /* workers whose last lease answer was lost, remembered */
#define LEASE_NOTE_MS 3600000 /* how long Redis keeps what a worker's last lease handed out */
#define WORKER_NAME_MAX 95

extern const char queue_redis_lua[];

struct async_op {
    struct job_spec spec;
    char id[40];
    struct buf fields; /* unused: spec is borrowed until the callback */
    queue_enqueue_fn fn;
    void *ctx;
    struct async_op *next;
};

/* A worker's lease call whose answer never came: its ticket goes with the worker's next call. */
struct lost_lease {
    char worker[WORKER_NAME_MAX + 1]; /* "": a free entry */
    char ticket[40];
};

struct redis_queue {
    struct queue base;
    struct queue_config cfg;
    char host[256];
    int port, db;
    char prefix[64];
    char sha[41];  /* of the script */
    char name[96]; /* this process: host/pid */

    pthread_mutex_t pool_lock;
    redisContext *pool[POOL_SIZE]; /* guarded by pool_lock: idle connections */
    int n_idle;                    /* guarded by pool_lock */

    pthread_mutex_t lock;
    pthread_cond_t cond;       /* stopping (the sweeper and subscriber wait on it) */
    pthread_cond_t async_cond; /* enqueues arrived, or stopping */
    int stopping;              /* guarded by lock */
    struct async_op *async_head, *async_tail; /* guarded by lock */
    pthread_t async_thread, sweeper, subscriber;
    int threads_started;
    /* guarded by lock: workers whose lease call was sent and never answered */
    struct lost_lease lost[LOST_LEASES];
    _Atomic int64_t down_since_ms; /* 0 while Redis answers */
    _Atomic int64_t up_since_ms;   /* when Redis last became reachable (or the queue opened) */
};

static struct redis_queue *rq(struct queue *q)
{
    return (struct redis_queue *)q;
}

/* ---- connections ---- */

static int load_script(redisContext *c, struct err *e)
{
    redisReply *r = redisCommand(c, "SCRIPT LOAD %s", queue_redis_lua);
    int rc = 0;

    if (!r || r->type != REDIS_REPLY_STRING)
        rc = err_set(e, ERR_UNAVAILABLE, "Redis: cannot load the queue script: %s",
                     r && r->type == REDIS_REPLY_ERROR ? r->str : c->errstr);
    freeReplyObject(r);
    return rc;
}

static redisContext *connect_redis(struct redis_queue *q, struct err *e)
{
    struct timeval tv = {CONNECT_TIMEOUT_MS / 1000, (CONNECT_TIMEOUT_MS % 1000) * 1000};
    struct timeval cmd = {COMMAND_TIMEOUT_MS / 1000, 0};
    redisContext *c = redisConnectWithTimeout(q->host, q->port, tv);
    redisReply *r;

    if (!c || c->err) {
        err_set(e, ERR_UNAVAILABLE, "Redis at %s:%d: %s", q->host, q->port,
                c ? c->errstr : "cannot connect");
        redisFree(c);
        return NULL;
    }
    redisSetTimeout(c, cmd);
    if (q->db != 0) {
        r = redisCommand(c, "SELECT %d", q->db);
        if (!r || r->type == REDIS_REPLY_ERROR) {
            err_set(e, ERR_UNAVAILABLE, "Redis at %s:%d: SELECT %d failed", q->host, q->port,
                    q->db);
            freeReplyObject(r);
            redisFree(c);
            return NULL;
        }
        freeReplyObject(r);
    }
    if (load_script(c, e) != 0) {
        redisFree(c);
        return NULL;
    }
    return c;
}

static void note_down(struct redis_queue *q, const char *why)
{
    int64_t expected = 0;

    if (atomic_compare_exchange_strong(&q->down_since_ms, &expected, queue_now_ms()))
        log_error("queue", "Redis unreachable", "redis=%s:%d reason=\"%s\"", q->host, q->port, why);
}

static void note_up(struct redis_queue *q)
{
    if (atomic_exchange(&q->down_since_ms, 0) != 0) {
        atomic_store(&q->up_since_ms, queue_now_ms());
        log_info("queue", "Redis reachable again", "redis=%s:%d", q->host, q->port);
    }
}

static redisContext *take_conn(struct redis_queue *q, struct err *e)
{
    redisContext *c = NULL;

    pthread_mutex_lock(&q->pool_lock);
    if (q->n_idle > 0)
        c = q->pool[--q->n_idle];
    pthread_mutex_unlock(&q->pool_lock);
    if (!c) {
        c = connect_redis(q, e);
        if (!c)
            note_down(q, e->msg);
    }
    return c;
}

/* Gives a connection back; a broken one is closed instead. */
static void give_conn(struct redis_queue *q, redisContext *c)
{
    if (!c)
        return;
    if (c->err) {
        note_down(q, c->errstr);
        redisFree(c);
        /* the idle ones most likely broke with it (Redis restarted): reconnect afresh */
        pthread_mutex_lock(&q->pool_lock);
        while (q->n_idle > 0)
            redisFree(q->pool[--q->n_idle]);
        pthread_mutex_unlock(&q->pool_lock);
        return;
    }
    note_up(q);
    pthread_mutex_lock(&q->pool_lock);
    if (q->n_idle < POOL_SIZE) {
        q->pool[q->n_idle++] = c;
        c = NULL;
    }
    pthread_mutex_unlock(&q->pool_lock);
    redisFree(c);
}

/* ---- calling the script ---- */

struct args {
    const char *v[64];
    size_t len[64];
    char store[64][32]; /* numbers formatted here */
    int n;
};

static void arg(struct args *a, const char *s)
{
    a->v[a->n] = s ? s : "";
    a->len[a->n] = strlen(a->v[a->n]);
    a->n++;
}

static void arg_bin(struct args *a, const char *s, size_t len)
{
    a->v[a->n] = s ? s : "";
    a->len[a->n] = s ? len : 0;
    a->n++;
}

static void arg_int(struct args *a, int64_t v)
{
    snprintf(a->store[a->n], sizeof(a->store[a->n]), "%lld", (long long)v);
    arg(a, a->store[a->n]);
}

/* EVALSHA <sha> 0 <op> <prefix> <now> ...: the head of every script call. */
static void script_args(struct redis_queue *q, struct args *a, const char *op)
{
    a->n = 0;
    arg(a, "EVALSHA");
    arg(a, q->sha);
    arg(a, "0");
    arg(a, op);
    arg(a, q->prefix);
    arg_int(a, queue_now_ms());
}

static redisReply *call(struct redis_queue *q, redisContext *c, struct args *a, struct err *e)
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
static redisReply *run(struct redis_queue *q, struct args *a, struct err *e)
{
    redisContext *c = take_conn(q, e);
    redisReply *r;

    if (!c)
        return NULL;
    r = call(q, c, a, e);
    give_conn(q, c);
    return r;
}

/* ---- jobs from hashes ---- */

static const char *hget(const redisReply *h, const char *name, size_t *len)
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

static int64_t hget_int(const redisReply *h, const char *name)
{
    const char *s = hget(h, name, NULL);
    return s ? strtoll(s, NULL, 10) : 0;
}

static char *hget_dup(const redisReply *h, const char *name)
{
    const char *s = hget(h, name, NULL);
    return s && s[0] ? strdup(s) : NULL;
}

/* hget_dup() that clears `*ok` when a field present could not be copied. */
static char *hget_dup_ok(const redisReply *h, const char *name, int *ok)
{
    char *s = hget_dup(h, name);

    if (!s && hget(h, name, NULL) && hget(h, name, NULL)[0])
        *ok = 0;
    return s;
}

/* A job from its HGETALL reply; `with_input` / `with_result` also copy those. NULL when out of
 * memory: never a job missing a field it has (no output_location would store the result
 * inline; no input would fail the job for good). */
static struct job *job_from_hash(const char *id, const redisReply *h, int with_input,
                                 int with_result)
{
    struct job *j = calloc(1, sizeof(*j));
    const char *s;
    size_t len = 0;
    int ok = 1;

    if (!j)
        return NULL;
    snprintf(j->id, sizeof(j->id), "%s", id);
    j->model = hget_dup_ok(h, "model", &ok);
    j->state = (enum job_state)hget_int(h, "state");
    j->priority = (int)hget_int(h, "priority");
    j->attempts = (int)hget_int(h, "attempts");
    j->max_attempts = (int)hget_int(h, "max_attempts");
    j->created_ms = hget_int(h, "created_ms");
    j->started_ms = hget_int(h, "started_ms");
    j->finished_ms = hget_int(h, "finished_ms");
    j->lease_timeout_ms = hget_int(h, "lease_timeout_ms");
    j->ttl_s = hget_int(h, "ttl_s");
    j->error = hget_dup_ok(h, "error", &ok);
    j->input_location = hget_dup_ok(h, "input_location", &ok);
    j->output_location = hget_dup_ok(h, "output_location", &ok);
    j->callback_url = hget_dup_ok(h, "callback_url", &ok);
    j->cancel_requested = (int)hget_int(h, "cancel_requested");
    j->worker = hget_dup_ok(h, "wid", &ok);
    j->attempts_uncounted = (int)hget_int(h, "extra_attempts");
    j->kind = (enum job_kind)hget_int(h, "kind");
    if ((s = hget(h, "batch_id", NULL)))
        snprintf(j->batch_id, sizeof(j->batch_id), "%s", s);
    j->token = (uint64_t)j->attempts;
    j->input_json_len = -1;
    j->result_json_len = -1;
    if (with_input && (s = hget(h, "input", &len))) {
        if (buf_append(&j->input, s, len) != 0)
            ok = 0;
        j->input_json_len = hget_int(h, "input_json_len");
    }
    if (with_result && (s = hget(h, "result", &len))) {
        if (buf_append(&j->result, s, len) != 0)
            ok = 0;
        j->result_json_len = hget(h, "result_json_len", NULL) ? hget_int(h, "result_json_len") : -1;
    }
    if (!ok) {
        job_free(j);
        return NULL;
    }
    return j;
}

static int load_job(struct redis_queue *q, redisContext *c, const char *id, int with_input,
                    int with_result, struct job **out, struct err *e)
{
    char key[128];
    redisReply *r;

    *out = NULL;
    snprintf(key, sizeof(key), "%sjob:%s", q->prefix, id);
    r = redisCommand(c, "HGETALL %s", key);
    if (!r)
        return err_set(e, ERR_UNAVAILABLE, "Redis at %s:%d: %s", q->host, q->port, c->errstr);
    if (r->type != REDIS_REPLY_ARRAY || r->elements == 0) {
        freeReplyObject(r);
        return err_set(e, ERR_NOT_FOUND, "no job '%.40s'", id);
    }
    *out = job_from_hash(id, r, with_input, with_result);
    freeReplyObject(r);
    return *out ? 0 : err_set(e, ERR_NOMEM, "out of memory");
}

/* ---- operations ---- */

static void new_id(char out[40])
{
    unsigned char rnd[6] = {0};

    if (getrandom(rnd, sizeof(rnd), 0) != (ssize_t)sizeof(rnd))
        for (size_t i = 0; i < sizeof(rnd); i++)
            rnd[i] = (unsigned char)rand();
    snprintf(out, 40, "%012llx%02x%02x%02x%02x%02x%02x", (unsigned long long)queue_now_ms(), rnd[0],
             rnd[1], rnd[2], rnd[3], rnd[4], rnd[5]);
}

static void enqueue_args(struct redis_queue *q, struct args *a, const struct job_spec *s,
                         const char *id)
{
    script_args(q, a, "enqueue");
    arg(a, id);
    arg(a, s->idempotency_key);
    arg(a, s->request_hash);
    arg_int(a, q->cfg.max_queued);
    arg(a, "model"), arg(a, s->model);
    arg(a, "priority"), arg_int(a, s->priority);
    arg(a, "max_attempts"), arg_int(a, s->max_attempts);
    arg(a, "lease_timeout_ms"), arg_int(a, s->lease_timeout_ms);
    arg(a, "ttl_s"), arg_int(a, s->ttl_s);
    arg(a, "kind"), arg_int(a, s->kind);
    arg(a, "batch_id"), arg(a, s->batch_id);
    arg(a, "input_location"), arg(a, s->input_location);
    arg(a, "output_location"), arg(a, s->output_location);
    arg(a, "callback_url"), arg(a, s->callback_url);
    arg(a, "input_json_len"), arg_int(a, s->input_json_len);
    if (s->input)
        arg(a, "input"), arg_bin(a, s->input, s->input_len);
}

/* The enqueue script's answer: {"ok"|"existed"|"conflict"|"busy", id}. */
static int enqueue_reply(const struct job_spec *s, redisReply *r, char id_out[40], int *existed,
                         struct err *e)
{
    const char *status;

    if (r->type != REDIS_REPLY_ARRAY || r->elements != 2)
        return err_set(e, ERR_IO, "Redis: unexpected answer to enqueue");
    status = r->element[0]->str;
    snprintf(id_out, 40, "%s", r->element[1]->str ? r->element[1]->str : "");
    *existed = strcmp(status, "existed") == 0 || strcmp(status, "conflict") == 0;
    if (strcmp(status, "conflict") == 0)
        return err_set(e, ERR_CONFLICT,
                       "Idempotency-Key '%.64s' was used for another request (job %s)",
                       s->idempotency_key, id_out);
    if (strcmp(status, "busy") == 0)
        return err_set(e, ERR_BUSY, "the queue holds %s jobs, the limit (--max-queue)", id_out);
    return 0;
}

static int r_enqueue(struct queue *qb, const struct job_spec *spec, char id_out[40], int *existed,
                     struct err *e)
{
    struct redis_queue *q = rq(qb);
    struct args a;
    char id[40];
    redisReply *r;
    int rc;

    new_id(id);
    enqueue_args(q, &a, spec, id);
    r = run(q, &a, e);
    if (!r)
        return e->code;
    rc = enqueue_reply(spec, r, id_out, existed, e);
    freeReplyObject(r);
    return rc;
}

/* The asynchronous enqueues of HTTP threads, pipelined on one connection. */
static void *async_main(void *self)
{
    struct redis_queue *q = self;
    redisContext *c = NULL;

    pthread_mutex_lock(&q->lock);
    for (;;) {
        struct async_op *ops;
        while (!q->async_head && !q->stopping)
            pthread_cond_wait(&q->async_cond, &q->lock);
        if (!q->async_head)
            break;
        ops = q->async_head;
        q->async_head = q->async_tail = NULL;
        pthread_mutex_unlock(&q->lock);

        struct err e = {0};
        if (!c || c->err) {
            redisFree(c);
            c = connect_redis(q, &e);
            if (!c)
                note_down(q, e.msg);
        }
        for (struct async_op *o = ops; c && o; o = o->next) {
            struct args a;
            new_id(o->id);
            enqueue_args(q, &a, &o->spec, o->id);
            redisAppendCommandArgv(c, a.n, a.v, a.len);
        }
        for (struct async_op *o = ops, *next; o; o = next) {
            redisReply *r = NULL;
            char id[40] = "";
            int existed = 0, rc;
            next = o->next;
            if (c && redisGetReply(c, (void **)&r) == REDIS_OK && r) {
                rc = r->type == REDIS_REPLY_ERROR ? err_set(&e, ERR_IO, "Redis: %.200s", r->str)
                                                  : enqueue_reply(&o->spec, r, id, &existed, &e);
            } else {
                rc = err_set(&e, ERR_UNAVAILABLE, "Redis at %s:%d: %s", q->host, q->port,
                             c ? c->errstr : e.msg);
            }
            freeReplyObject(r);
            o->fn(o->ctx, rc, &e, id, existed);
            free(o);
        }
        if (c && !c->err)
            note_up(q);
        pthread_mutex_lock(&q->lock);
    }
    pthread_mutex_unlock(&q->lock);
    redisFree(c);
    return NULL;
}

static int r_enqueue_async(struct queue *qb, const struct job_spec *spec, queue_enqueue_fn fn,
                           void *ctx, struct err *e)
{
    struct redis_queue *q = rq(qb);
    struct async_op *o;

    if (atomic_load(&q->down_since_ms) != 0)
        return err_set(e, ERR_UNAVAILABLE, "the job queue (Redis at %s:%d) is unreachable", q->host,
                       q->port);
    o = calloc(1, sizeof(*o));
    if (!o)
        return err_set(e, ERR_NOMEM, "out of memory");
    o->spec = *spec;
    o->fn = fn;
    o->ctx = ctx;
    pthread_mutex_lock(&q->lock);
    if (q->stopping) {
        pthread_mutex_unlock(&q->lock);
        free(o);
        return err_set(e, ERR_UNAVAILABLE, "the job store is closing");
    }
    if (q->async_tail)
        q->async_tail->next = o;
    else
        q->async_head = o;
    q->async_tail = o;
    pthread_cond_signal(&q->async_cond);
    pthread_mutex_unlock(&q->lock);
    return 0;
}

/* Waits up to `ms` for a new entry on any priority stream. */
static void wait_for_work(struct redis_queue *q, redisContext *c, int64_t ms)
{
    const char *argv[26];
    char keys[10][96];
    char block[24];
    int n = 0;

    snprintf(block, sizeof(block), "%lld", (long long)ms);
    argv[n++] = "XREAD";
    argv[n++] = "BLOCK";
    argv[n++] = block;
    argv[n++] = "STREAMS";
    for (int p = 9; p >= 0; p--) {
        snprintf(keys[p], sizeof(keys[p]), "%sq:%d", q->prefix, p);
        argv[n++] = keys[p];
    }
    for (int p = 0; p < 10; p++)
        argv[n++] = "$";
    freeReplyObject(redisCommandArgv(c, n, argv, NULL));
}

/* The ticket of `worker`'s next lease call: the one whose answer it lost, if any (`*lost` 1:
 * the call hands those jobs back to the queue; see lease() in the script), else a new one. */
static void lease_ticket(struct redis_queue *q, const char *worker, char ticket[40], int *lost)
{
    *lost = 0;
    pthread_mutex_lock(&q->lock);
    for (int i = 0; i < LOST_LEASES && !*lost; i++) {
        if (q->lost[i].worker[0] && strncmp(q->lost[i].worker, worker, WORKER_NAME_MAX) == 0) {
            snprintf(ticket, 40, "%s", q->lost[i].ticket);
            *lost = 1;
        }
    }
    pthread_mutex_unlock(&q->lock);
    if (!*lost)
        new_id(ticket);
}

/* After a lease call: an answer that arrived settles the worker's lost ticket; one that did
 * not (the call was sent, then the connection failed) keeps its ticket for the next call.
 * Past LOST_LEASES workers at once, the jobs of a lost answer wait out their lease. */
static void lease_answered(struct redis_queue *q, const char *worker, const char *ticket,
                           int answered)
{
    int slot = -1;

    pthread_mutex_lock(&q->lock);
    for (int i = 0; i < LOST_LEASES; i++) {
        if (q->lost[i].worker[0] && strncmp(q->lost[i].worker, worker, WORKER_NAME_MAX) == 0)
            slot = i;
        else if (!q->lost[i].worker[0] && slot < 0 && !answered)
            slot = i;
    }
    if (slot >= 0 && answered) {
        q->lost[slot].worker[0] = '\0';
    } else if (slot >= 0) {
        snprintf(q->lost[slot].worker, sizeof(q->lost[slot].worker), "%s", worker);
        snprintf(q->lost[slot].ticket, sizeof(q->lost[slot].ticket), "%s", ticket);
    }
    pthread_mutex_unlock(&q->lock);
}

static int r_lease_many(struct queue *qb, const char *worker, size_t max, int max_tasks,
                        int64_t wait_ms, struct job **out, size_t *n, struct err *e)
{
    struct redis_queue *q = rq(qb);
    redisContext *c = take_conn(q, e);
    redisReply *r = NULL;
    struct args a;
    char ticket[40];
    int rc = 0, lost;

    *n = 0;
    if (!c)
        return e->code;
    for (int round = 0; round < 2; round++) {
        lease_ticket(q, worker, ticket, &lost);
        script_args(q, &a, "lease");
        arg(&a, worker);
        arg_int(&a, (int64_t)max);
        arg_int(&a, q->cfg.result_ttl_s);
        arg_int(&a, max_tasks);
        arg(&a, ticket);
        arg(&a, lost ? ticket : "");
        arg_int(&a, LEASE_NOTE_MS);
        r = call(q, c, &a, e);
        if (r && queue_fault("lease_answer", (size_t)round)) { /* as if Redis died here */
            freeReplyObject(r);
            r = NULL;
            err_set(e, ERR_UNAVAILABLE, "Redis: injected fault: the lease's answer was lost");
            lease_answered(q, worker, ticket, 0);
        } else {
            lease_answered(q, worker, ticket, r != NULL || !c->err);
            if (lost && (r != NULL || !c->err))
                log_info("queue", "a lease answer was lost; its jobs, if any, are queued again",
                         "worker=%s", worker);
        }
        if (!r) {
            rc = e->code;
            break;
        }
        if (r->type == REDIS_REPLY_ARRAY && r->elements > 0)
            break;
        freeReplyObject(r);
        r = NULL;
        if (round == 0 && wait_ms > 0)
            wait_for_work(q, c, wait_ms < 250 ? wait_ms : 250); /* delayed retries come by time */
        else
            break;
        if (c->err)
            break;
    }
    /* {id, job hash} pairs, read by the script with the lease (a job that cannot be copied
     * here stays leased and runs again when its lease ends, as after a crash) */
    size_t n_leased = r ? (r->elements < max ? r->elements : max) : 0;
    for (size_t i = 0; i < n_leased; i++) {
        const redisReply *pair = r->element[i];
        if (pair->type != REDIS_REPLY_ARRAY || pair->elements != 2 || !pair->element[0]->str ||
            pair->element[1]->type != REDIS_REPLY_ARRAY)
            continue;
        out[*n] = job_from_hash(pair->element[0]->str, pair->element[1], 1, 0);
        if (out[*n] && queue_fault("lease", i)) {
            job_free(out[*n]);
            out[*n] = NULL;
        }
        if (out[*n])
            (*n)++;
    }
    freeReplyObject(r);
    give_conn(q, c);
    return rc;
}


static int int_reply(redisReply *r, int64_t *v)
{
    if (!r || r->type != REDIS_REPLY_INTEGER)
        return -1;
    *v = r->integer;
    return 0;
}

static int r_extend(struct queue *qb, const char *id, uint64_t token, int64_t lease_ms,
                    struct err *e)
{
    struct redis_queue *q = rq(qb);
    struct args a;
    redisReply *r;
    int64_t v = 0;

    if (!id[0])
        return 0; /* queue_on_final's flush: nothing to wait for here */
    script_args(q, &a, "extend");
    arg(&a, id);
    arg_int(&a, (int64_t)token);
    arg_int(&a, lease_ms);
    r = run(q, &a, e);
    if (!r)
        return e->code;
    int_reply(r, &v);
    freeReplyObject(r);
    return v == 1 ? 0
                  : err_set(e, ERR_CONFLICT, "job %s: attempt %llu no longer holds the lease", id,
                            (unsigned long long)token);
}

static void outcome_args(struct redis_queue *q, struct args *a, const struct queue_outcome *o)
{
    if (o->ok) {
        script_args(q, a, "complete");
        arg(a, o->id);
        arg_int(a, (int64_t)o->token);
        arg_bin(a, o->result, o->result_len);
        arg_int(a, o->result_json_len);
        arg_int(a, q->cfg.result_ttl_s);
    } else {
        script_args(q, a, "fail");
        arg(a, o->id);
        arg_int(a, (int64_t)o->token);
        arg(a, o->error ? o->error : "failed");
        arg(a, o->retryable || o->released ? "1" : "0");
        arg_int(a, q->cfg.retry_backoff_ms);
        arg_int(a, MAX_BACKOFF_MS);
        arg_int(a, q->cfg.result_ttl_s);
        arg_int(a, o->retry_after_ms);
        arg(a, o->released ? "1" : "0");
    }
}

static int r_finish_many(struct queue *qb, struct queue_outcome *outs, size_t n, struct err *e)
{
    struct redis_queue *q = rq(qb);
    redisContext *c = take_conn(q, e);
    int rc = 0;

    if (!c) {
        for (size_t i = 0; i < n; i++)
            outs[i].rc = e->code; /* none recorded */
        return e->code;
    }
    for (size_t i = 0; i < n; i++) {
        struct args a;
        outcome_args(q, &a, &outs[i]);
        redisAppendCommandArgv(c, a.n, a.v, a.len);
    }
    for (size_t i = 0; i < n; i++) {
        redisReply *r = NULL;
        int64_t v = 0;
        if (redisGetReply(c, (void **)&r) != REDIS_OK || !r) {
            outs[i].rc =
                err_set(e, ERR_UNAVAILABLE, "Redis at %s:%d: %s", q->host, q->port, c->errstr);
            if (rc == 0)
                rc = outs[i].rc;
            continue;
        }
        if (r->type == REDIS_REPLY_ERROR) {
            outs[i].rc = err_set(e, ERR_IO, "Redis: %.200s", r->str);
            if (rc == 0)
                rc = outs[i].rc;
        } else {
            int_reply(r, &v);
            outs[i].rc = v == 1 || v == 2 ? 0 : ERR_CONFLICT;
            outs[i].failed_final = v == 2;
        }
        freeReplyObject(r);
    }
    give_conn(q, c);
    return rc;
}



/* cancel and retry: a script answering a state (or -1 / -2), then the job. */
static int change_then_load(struct redis_queue *q, const char *op, const char *id, struct job **out,
                            struct err *e)
{
    redisContext *c = take_conn(q, e);
    struct args a;
    redisReply *r;
    int64_t v = -1;
    int rc = 0;

    *out = NULL;
    if (!c)
        return e->code;
    script_args(q, &a, op);
    arg(&a, id);
    arg_int(&a, q->cfg.result_ttl_s);
    r = call(q, c, &a, e);
    if (!r) {
        give_conn(q, c);
        return e->code;
    }
    int_reply(r, &v);
    freeReplyObject(r);
    if (v == -1) {
        rc = err_set(e, ERR_NOT_FOUND, "no job '%.40s'", id);
    } else {
        rc = load_job(q, c, id, 0, 0, out, e);
        if (rc == 0 && v == -2) {
            rc = strcmp(op, "cancel") == 0
                     ? err_set(e, ERR_CONFLICT, "job %s is already %s", id,
                               job_state_name((*out)->state))
                     : err_set(e, ERR_CONFLICT,
                               "job %s is %s; only failed or expired jobs are sent back to the "
                               "queue",
                               id, job_state_name((*out)->state));
            job_free(*out);
            *out = NULL;
        }
    }
    give_conn(q, c);
    return rc;
}

static int r_cancel(struct queue *qb, const char *id, struct job **out, struct err *e)
{
    return change_then_load(rq(qb), "cancel", id, out, e);
}

static int r_retry(struct queue *qb, const char *id, struct job **out, struct err *e)
{
    return change_then_load(rq(qb), "retry", id, out, e);
}

/* The webhook attempts of a job, as the job JSON shows them. */
static int load_notifications(struct redis_queue *q, redisContext *c, struct job *j)
{
    redisReply *r = redisCommand(c, "LRANGE %sdeliv:%s 0 -1", q->prefix, j->id);
    struct buf b = {0};
    int rc = 0;

    if (!r)
        return ERR_UNAVAILABLE;
    rc = buf_puts(&b, "[");
    for (size_t i = 0; rc == 0 && r->type == REDIS_REPLY_ARRAY && i < r->elements; i++)
        rc = buf_printf(&b, "%s%s", i ? "," : "", r->element[i]->str);
    if (rc == 0)
        rc = buf_puts(&b, "]");
    freeReplyObject(r);
    if (rc != 0) {
        buf_release(&b);
        return rc;
    }
    j->notifications_json = buf_take(&b);
    return 0;
}

/* A job's attempts (attempts_history), from its list of JSON objects. */
static int load_history(struct redis_queue *q, redisContext *c, struct job *j)
{
    redisReply *r = redisCommand(c, "LRANGE %satt:%s 0 -1", q->prefix, j->id);
    int rc = 0;

    if (!r)
        return ERR_UNAVAILABLE;
    for (size_t i = 0; rc == 0 && r->type == REDIS_REPLY_ARRAY && i < r->elements; i++) {
        json_t *a = json_loadb(r->element[i]->str, r->element[i]->len, 0, NULL);
        if (json_is_object(a))
            rc = queue_job_add_attempt(j, (int)json_integer_value(json_object_get(a, "a")),
                                       json_integer_value(json_object_get(a, "s")),
                                       json_integer_value(json_object_get(a, "e")),
                                       json_string_value(json_object_get(a, "w")),
                                       json_string_value(json_object_get(a, "err")));
        json_decref(a);
    }
    freeReplyObject(r);
    return rc;
}

static int r_get(struct queue *qb, const char *id, int want_result, struct job **out, struct err *e)
{
    struct redis_queue *q = rq(qb);
    redisContext *c = take_conn(q, e);
    int rc;

    *out = NULL;
    if (!c)
        return e->code;
    rc = load_job(q, c, id, 0, want_result, out, e);
    if (rc == 0 && (load_notifications(q, c, *out) != 0 || load_history(q, c, *out) != 0))
        rc = err_set(e, ERR_UNAVAILABLE, "Redis at %s:%d: %s", q->host, q->port, c->errstr);
    if (rc != 0) {
        job_free(*out);
        *out = NULL;
    }
    give_conn(q, c);
    return rc;
}

/* Newest first, from the index; jobs past their retention leave the index here. */
static int r_list(struct queue *qb, const struct queue_list_filter *f, struct job **out,
                  size_t *n, struct err *e)
{
    struct redis_queue *q = rq(qb);
    redisContext *c = take_conn(q, e);
    long long start = 0;
    int rc = 0, scanned = 0;

    if (!c)
        return e->code;
    if (f->cursor) {
        redisReply *r = redisCommand(c, "ZREVRANK %sjobs %s", q->prefix, f->cursor);
        if (r && r->type == REDIS_REPLY_INTEGER)
            start = r->integer + 1;
        freeReplyObject(r);
    }
    while (rc == 0 && (int)*n < f->limit && scanned < 100000) {
        redisReply *ids =
            redisCommand(c, "ZREVRANGE %sjobs %lld %lld", q->prefix, start, start + 199);
        if (!ids || ids->type != REDIS_REPLY_ARRAY) {
            freeReplyObject(ids);
            rc = err_set(e, ERR_UNAVAILABLE, "Redis at %s:%d: %s", q->host, q->port, c->errstr);
            break;
        }
        if (ids->elements == 0) {
            freeReplyObject(ids);
            break;
        }
        for (size_t i = 0; rc == 0 && i < ids->elements && (int)*n < f->limit; i++) {
            struct job *j = NULL;
            const char *id = ids->element[i]->str;
            scanned++;
            start++;
            if (load_job(q, c, id, 0, 0, &j, e) != 0) {
                freeReplyObject(redisCommand(c, "ZREM %sjobs %s", q->prefix, id));
                start--;
                continue;
            }
            if (j->kind == JOB_KIND_INFER && (f->state < 0 || (int)j->state == f->state) &&
                (f->state != JOB_RUNNING || f->cancelling < 0 ||
                 j->cancel_requested == f->cancelling) &&
                (!f->model || (j->model && strcmp(j->model, f->model) == 0))) {
                if (load_notifications(q, c, j) != 0 || load_history(q, c, j) != 0)
                    rc = err_set(e, ERR_UNAVAILABLE, "Redis at %s:%d: %s", q->host, q->port,
                                 c->errstr);
                out[(*n)++] = j;
            } else {
                job_free(j);
            }
        }
        freeReplyObject(ids);
    }
    give_conn(q, c);
    if (rc != 0) {
        for (size_t i = 0; i < *n; i++)
            job_free(out[i]);
        *n = 0;
    }
    return rc;
}

static int r_counts(struct queue *qb, int64_t counts[JOB_N_STATES], struct err *e)
{
    struct redis_queue *q = rq(qb);
    redisContext *c = take_conn(q, e);
    redisReply *r;

    memset(counts, 0, sizeof(int64_t) * JOB_N_STATES);
    if (!c)
        return e->code;
    r = redisCommand(c, "HGETALL %scounts", q->prefix);
    for (size_t i = 0; r && r->type == REDIS_REPLY_ARRAY && i + 1 < r->elements; i += 2) {
        int s = job_state_parse(r->element[i]->str);
        if (s >= 0)
            counts[s] = strtoll(r->element[i + 1]->str, NULL, 10);
    }
    if (!r)
        err_set(e, ERR_UNAVAILABLE, "Redis at %s:%d: %s", q->host, q->port, c->errstr);
    freeReplyObject(r);
    give_conn(q, c);
    return r ? 0 : ERR_UNAVAILABLE;
}

static int64_t r_queued(struct queue *qb)
{
    int64_t counts[JOB_N_STATES];
    struct err e;

    return r_counts(qb, counts, &e) == 0 ? counts[JOB_QUEUED] : 0;
}

/* ---- webhooks ---- */

static int load_history(struct redis_queue *q, redisContext *c, struct job *j);

/* Fixes an outbox item's body the first time it is sent; gives back the stored one. */
static int batch_event_json(struct redis_queue *q, redisContext *c, const char *id,
                            const char *event_id, struct buf *out, struct err *e);

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
        rc = batch_event_json(q, c, job_id, it->event_id, &body, e);
    } else {
        rc = load_job(q, c, job_id, 0, 1, &j, e);
        if (rc == 0 && load_history(q, c, j) != 0) /* the event's job shows its attempts too */
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
    script_args(q, &a, "outbox_body");
    arg(&a, oid);
    arg_bin(&a, body.data, body.len);
    r = call(q, c, &a, e);
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
    job = hget(h, "job_id", NULL);
    body = hget(h, "body", &len);
    it->id = strtoll(pair->element[0]->str, NULL, 10);
    it->event_id = hget_dup(h, "event_id");
    it->url = hget_dup(h, "url");
    it->attempts = (int)hget_int(h, "attempts");
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
        rc = outbox_body(q, c, it, job, hget_int(h, "batch") == 1, e);
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
    redisContext *c = take_conn(q, e);
    struct queue_outbox_item *items = NULL;
    struct args a;
    redisReply *r;
    int rc = 0;

    (void)now_ms;
    *out = NULL;
    *n = 0;
    if (!c)
        return e->code;
    script_args(q, &a, "outbox_take");
    arg_int(&a, (int64_t)max);
    arg_int(&a, OUTBOX_HOLD_MS);
    r = call(q, c, &a, e);
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
    give_conn(q, c);
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
    redisContext *c = take_conn(q, &e);
    redisReply *r;
    int64_t next = -1;

    if (!c)
        return queue_now_ms() + 1000;
    r = redisCommand(c, "ZRANGE %soutbox 0 0 WITHSCORES", q->prefix);
    if (r && r->type == REDIS_REPLY_ARRAY && r->elements == 2)
        next = strtoll(r->element[1]->str, NULL, 10);
    freeReplyObject(r);
    give_conn(q, c);
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

    /* the script puts the outbox item's event id first, so the record reads as SQLite's */
    rc = buf_puts(&rec, ",\"at\":");
    if (rc == 0)
        rc = queue_json_time(&rec, at->at_ms);
    if (rc == 0)
        rc = buf_printf(&rec, ",\"status_code\":%d,\"error\":", at->http_status);
    if (rc == 0)
        rc = at->error ? buf_json_string(&rec, at->error) : buf_puts(&rec, "null");
    if (rc == 0)
        rc = buf_puts(&rec, "}");
    if (rc != 0) {
        buf_release(&rec);
        return err_set(e, ERR_NOMEM, "out of memory");
    }
    snprintf(oid, sizeof(oid), "%lld", (long long)at->outbox_id);
    script_args(q, &a, "outbox_record");
    arg(&a, oid);
    arg_bin(&a, rec.data, rec.len);
    arg(&a, at->done ? "1" : "0");
    arg_int(&a, at->next_attempt_ms);
    r = run(q, &a, e);
    buf_release(&rec);
    freeReplyObject(r);
    return r ? 0 : e->code;
}

/* ---- batch jobs: a run is a hash plus one task job per input object (see the script) ---- */

static char *hget_dup_or_null(const redisReply *h, const char *name, int *ok)
{
    const char *s = hget(h, name, NULL);
    char *d;

    if (!s || !s[0])
        return NULL;
    d = strdup(s);
    if (!d)
        *ok = 0;
    return d;
}

/* Fills `b` from a batch job's hash; `running_records`: what its running tasks have written so
 * far. 0 or ERR_NOMEM. */
static int batch_from_hash(const char *id, const redisReply *h, int64_t running_records,
                           struct batch_job *b)
{
    const char *parent = hget(h, "parent", NULL);
    int ok = 1;

    snprintf(b->id, sizeof(b->id), "%s", id);
    if (parent)
        snprintf(b->parent, sizeof(b->parent), "%s", parent);
    b->definition = hget_dup_or_null(h, "definition", &ok);
    b->schedule = hget_dup_or_null(h, "schedule", &ok);
    b->state = (int)hget_int(h, "state");
    b->output = hget_dup_or_null(h, "output", &ok);
    b->error = hget_dup_or_null(h, "error", &ok);
    b->created_ms = hget_int(h, "created_ms");
    b->started_ms = hget_int(h, "started_ms");
    b->finished_ms = hget_int(h, "finished_ms");
    b->run_at_ms = hget_int(h, "run_at_ms");
    b->next_run_ms = hget_int(h, "next_run_ms");
    b->objects_total = hget_int(h, "objects_total");
    b->objects_done = hget_int(h, "objects_done");
    b->records_done = hget_int(h, "records_done") + running_records;
    b->records_failed = hget_int(h, "records_failed");
    return ok ? 0 : ERR_NOMEM;
}

/* Reads batch job `id` into `b` (zeroed by the caller), with a schedule's latest runs. */
static int read_batch(struct redis_queue *q, redisContext *c, const char *id, int with_runs,
                      struct batch_job *b, struct err *e)
{
    redisReply *h = redisCommand(c, "HGETALL %sbatch:%s", q->prefix, id);
    const char *sched;
    int64_t running = 0;
    int rc = 0;

    if (!h)
        return err_set(e, ERR_UNAVAILABLE, "Redis at %s:%d: %s", q->host, q->port, c->errstr);
    if (h->type != REDIS_REPLY_ARRAY || h->elements == 0) {
        freeReplyObject(h);
        return err_set(e, ERR_NOT_FOUND, "no batch job '%.40s'", id);
    }
    sched = hget(h, "schedule", NULL);
    if (!sched || !sched[0]) {
        redisReply *p = redisCommand(c, "HVALS %sbprog:%s", q->prefix, id);
        for (size_t i = 0; p && p->type == REDIS_REPLY_ARRAY && i < p->elements; i++)
            if (p->element[i]->type == REDIS_REPLY_STRING)
                running += strtoll(p->element[i]->str, NULL, 10);
        freeReplyObject(p);
    }
    if (batch_from_hash(id, h, running, b) != 0) {
        batch_job_release(b);
        rc = err_set(e, ERR_NOMEM, "out of memory");
    }
    freeReplyObject(h);
    if (rc == 0 && with_runs && b->schedule) {
        redisReply *ids = redisCommand(c, "ZREVRANGE %sruns:%s 0 49", q->prefix, id);
        size_t n = ids && ids->type == REDIS_REPLY_ARRAY ? ids->elements : 0;
        b->runs = n ? calloc(n, sizeof(*b->runs)) : NULL;
        for (size_t i = 0; b->runs && i < n; i++) {
            struct err re;
            if (read_batch(q, c, ids->element[i]->str, 0, &b->runs[b->n_runs], &re) == 0)
                b->n_runs++;
        }
        freeReplyObject(ids);
        if (n && !b->runs)
            rc = err_set(e, ERR_NOMEM, "out of memory");
    }
    return rc;
}

/* Batch job `id` as a new array of one. */
static int load_batch(struct redis_queue *q, redisContext *c, const char *id, int with_runs,
                      struct batch_job **out, struct err *e)
{
    struct batch_job *b = calloc(1, sizeof(*b));
    int rc = b ? read_batch(q, c, id, with_runs, b, e) : err_set(e, ERR_NOMEM, "out of memory");

    if (rc != 0) {
        batch_jobs_free(b, b ? 1 : 0);
        b = NULL;
    }
    *out = b;
    return rc;
}

static int batch_event_json(struct redis_queue *q, redisContext *c, const char *id,
                            const char *event_id, struct buf *out, struct err *e)
{
    struct batch_job *b = NULL;
    int rc = load_batch(q, c, id, 0, &b, e);

    if (rc == 0 && queue_batch_event_json(b, event_id, out) != 0)
        rc = err_set(e, ERR_NOMEM, "out of memory");
    batch_jobs_free(b, b ? 1 : 0);
    return rc;
}

static void add_arg(const char **v, size_t *len, int *argc, const char *s)
{
    v[*argc] = s ? s : "";
    len[*argc] = strlen(v[*argc]);
    (*argc)++;
}

static int r_batch_create(struct queue *qb, const struct batch_job_spec *s, char id_out[40],
                          struct err *e)
{
    struct redis_queue *q = rq(qb);
    size_t n = 32 + 2 * s->n_tasks; /* 23 fixed arguments, then id and input per task */
    const char **v = calloc(n, sizeof(*v));
    size_t *len = calloc(n, sizeof(*len));
    char(*ids)[40] = calloc(s->n_tasks ? s->n_tasks : 1, 40);
    char nums[8][32], raw[40];
    redisReply *r = NULL;
    redisContext *c = NULL;
    int argc = 0, rc = 0;

    if (!v || !len || !ids) {
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    new_id(raw);
    snprintf(id_out, 40, "batch-%s", raw);
#define ADD(str) add_arg(v, len, &argc, (str))
#define ADD_INT(i, val) (snprintf(nums[i], sizeof(nums[i]), "%lld", (long long)(val)), ADD(nums[i]))
    ADD("EVALSHA");
    ADD(q->sha);
    ADD("0");
    ADD("batch_create");
    ADD(q->prefix);
    ADD_INT(0, queue_now_ms());
    ADD(id_out);
    ADD(s->parent);
    ADD_INT(1, s->run_at_ms);
    ADD_INT(2, s->by_hand ? -1 : s->parent_next_run_ms);
    ADD_INT(3, q->cfg.max_queued);
    ADD_INT(4, q->cfg.result_ttl_s);
    ADD(s->definition);
    ADD(s->model);
    ADD(s->schedule);
    ADD(s->output);
    ADD(s->callback_url);
    ADD_INT(5, s->max_errors);
    ADD_INT(6, s->max_attempts);
    ADD_INT(7, s->lease_timeout_ms);
    char next[32];
    snprintf(next, sizeof(next), "%lld", (long long)s->next_run_ms);
    ADD(next);
    ADD(s->finish_input);
    ADD(s->error);
    for (size_t i = 0; !s->schedule && !s->error && i < s->n_tasks; i++) {
        new_id(ids[i]);
        ADD(ids[i]);
        ADD(s->task_inputs[i]);
    }
#undef ADD
#undef ADD_INT
    c = take_conn(q, e);
    if (!c) {
        rc = e->code;
        goto cleanup;
    }
    r = redisCommandArgv(c, argc, v, len);
    if (!r) {
        rc = err_set(e, ERR_UNAVAILABLE, "Redis at %s:%d: %s", q->host, q->port, c->errstr);
    } else if (r->type == REDIS_REPLY_ERROR) {
        rc = err_set(e, ERR_IO, "Redis: %.200s", r->str);
    } else if (r->type != REDIS_REPLY_ARRAY || r->elements != 2) {
        rc = err_set(e, ERR_IO, "Redis: unexpected answer to batch_create");
    } else if (strcmp(r->element[0]->str, "conflict") == 0) {
        rc = err_set(e, ERR_CONFLICT, "schedule %s is no longer due at that time", s->parent);
    } else if (strcmp(r->element[0]->str, "busy") == 0) {
        rc = err_set(e, ERR_BUSY,
                     "%zu tasks would pass the queue's limit of %lld jobs (--max-queue); %s are "
                     "waiting",
                     s->n_tasks, (long long)q->cfg.max_queued, r->element[1]->str);
    }
cleanup:
    freeReplyObject(r);
    give_conn(q, c);
    free(v);
    free(len);
    free(ids);
    return rc;
}

static int r_batch_get(struct queue *qb, const char *id, struct batch_job **out, struct err *e)
{
    struct redis_queue *q = rq(qb);
    redisContext *c = take_conn(q, e);
    int rc;

    *out = NULL;
    if (!c)
        return e->code;
    rc = load_batch(q, c, id, 1, out, e);
    give_conn(q, c);
    return rc;
}

#define LIST_PAGE 200        /* batch jobs read per round trip when filtering by status */
#define LIST_SCAN_MAX 100000 /* a status filter looks this far back at most */

/* Whether `b` passes the listing's filter. */
static int batch_matches(const struct batch_job *b, const struct queue_batch_filter *f)
{
    return (f->schedules < 0 || f->schedules == (b->schedule != NULL)) &&
           (f->state < 0 || f->state == b->state);
}

static int r_batch_list(struct queue *qb, const struct queue_batch_filter *f,
                        struct batch_job **out, size_t *n, struct err *e)
{
    struct redis_queue *q = rq(qb);
    redisContext *c = take_conn(q, e);
    int filtered = f->schedules >= 0 || f->state >= 0;
    struct batch_job *v = calloc((size_t)(f->limit > 0 ? f->limit : 1), sizeof(*v));
    redisReply *ids = NULL;
    int rc = 0;
    long start = 0, page = filtered ? LIST_PAGE : f->limit;

    *out = NULL;
    *n = 0;
    if (!c || !v) {
        free(v);
        give_conn(q, c);
        return c ? err_set(e, ERR_NOMEM, "out of memory") : e->code;
    }
    /* the filter is on each one's state, so it reads each */
    while ((int)*n < f->limit && start < LIST_SCAN_MAX) {
        ids = redisCommand(c, "ZREVRANGE %sbatches %ld %ld", q->prefix, start, start + page - 1);
        if (!ids) {
            rc = err_set(e, ERR_UNAVAILABLE, "Redis at %s:%d: %s", q->host, q->port, c->errstr);
            break;
        }
        if (ids->type != REDIS_REPLY_ARRAY)
            break;
        for (size_t i = 0; (int)*n < f->limit && i < ids->elements; i++) {
            struct err be;
            if (read_batch(q, c, ids->element[i]->str, 1, &v[*n], &be) != 0)
                continue;
            if (batch_matches(&v[*n], f))
                (*n)++;
            else
                batch_job_release(&v[*n]);
        }
        if (ids->elements < (size_t)page || !filtered)
            break;
        start += page;
        freeReplyObject(ids);
        ids = NULL;
    }
    freeReplyObject(ids);
    give_conn(q, c);
    if (rc != 0) {
        batch_jobs_free(v, *n);
        *n = 0;
        return rc;
    }
    *out = v;
    return 0;
}

static int r_batch_cancel(struct queue *qb, const char *id, struct batch_job **out, struct err *e)
{
    struct redis_queue *q = rq(qb);
    struct args a;
    redisReply *r;
    int64_t v = -1;

    *out = NULL;
    script_args(q, &a, "batch_cancel");
    arg(&a, id);
    arg_int(&a, q->cfg.result_ttl_s);
    r = run(q, &a, e);
    if (!r)
        return e->code;
    int_reply(r, &v);
    freeReplyObject(r);
    if (v == -1)
        return err_set(e, ERR_NOT_FOUND, "no batch job '%.40s'", id);
    if (v == -2) {
        struct batch_job *b = NULL;
        int rc = r_batch_get(qb, id, &b, e);
        rc = err_set(e, ERR_CONFLICT, "batch job %s is already %s", id,
                     rc == 0 ? batch_job_status(b) : "over");
        batch_jobs_free(b, b ? 1 : 0);
        return rc;
    }
    return r_batch_get(qb, id, out, e);
}

static int r_batch_results(struct queue *qb, const char *id, char **model, char ***results,
                           size_t *n, struct err *e)
{
    struct redis_queue *q = rq(qb);
    redisContext *c = take_conn(q, e);
    redisReply *m = NULL, *tasks = NULL;
    char **v = NULL;
    int rc = 0;

    *model = NULL;
    *results = NULL;
    *n = 0;
    if (!c)
        return e->code;
    m = redisCommand(c, "HGET %sbatch:%s model", q->prefix, id);
    tasks = redisCommand(c, "SMEMBERS %sbtasks:%s", q->prefix, id);
    if (!m || !tasks) {
        rc = err_set(e, ERR_UNAVAILABLE, "Redis at %s:%d: %s", q->host, q->port, c->errstr);
        goto cleanup;
    }
    if (m->type != REDIS_REPLY_STRING) {
        rc = err_set(e, ERR_NOT_FOUND, "no batch job '%.40s'", id);
        goto cleanup;
    }
    *model = strdup(m->str);
    if (tasks->type == REDIS_REPLY_ARRAY && tasks->elements > 0)
        v = calloc(tasks->elements, sizeof(*v));
    if (!*model || (tasks->type == REDIS_REPLY_ARRAY && tasks->elements > 0 && !v)) {
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    for (size_t i = 0; v && i < tasks->elements; i++) {
        redisReply *t = redisCommand(c, "HMGET %sjob:%s kind state result", q->prefix,
                                     tasks->element[i]->str);
        if (t && t->type == REDIS_REPLY_ARRAY && t->elements == 3 && t->element[0]->str &&
            strcmp(t->element[0]->str, "1") == 0 && t->element[1]->str &&
            strcmp(t->element[1]->str, "2") == 0 && t->element[2]->str) {
            v[*n] = strndup(t->element[2]->str, t->element[2]->len);
            if (!v[(*n)++])
                rc = err_set(e, ERR_NOMEM, "out of memory");
        }
        freeReplyObject(t);
    }
cleanup:
    freeReplyObject(m);
    freeReplyObject(tasks);
    give_conn(q, c);
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

static int r_batch_definition(struct queue *qb, const char *id, struct queue_schedule **out,
                              struct err *e)
{
    struct redis_queue *q = rq(qb);
    redisContext *c = take_conn(q, e);
    struct queue_schedule *s = calloc(1, sizeof(*s));
    redisReply *h = NULL;
    int rc = 0;

    *out = NULL;
    if (!c || !s) {
        rc = c ? err_set(e, ERR_NOMEM, "out of memory") : e->code;
        goto cleanup;
    }
    h = redisCommand(c, "HMGET %sbatch:%s definition schedule next_run_ms state", q->prefix, id);
    if (!h) {
        rc = err_set(e, ERR_UNAVAILABLE, "Redis at %s:%d: %s", q->host, q->port, c->errstr);
    } else if (h->type != REDIS_REPLY_ARRAY || h->elements != 4 || !h->element[0]->str) {
        rc = err_set(e, ERR_NOT_FOUND, "no batch job '%.40s'", id);
    } else {
        snprintf(s->id, sizeof(s->id), "%s", id);
        s->definition = strdup(h->element[0]->str);
        if (h->element[1]->str && h->element[1]->str[0])
            s->schedule = strdup(h->element[1]->str);
        s->next_run_ms = h->element[2]->str ? strtoll(h->element[2]->str, NULL, 10) : 0;
        s->state = h->element[3]->str ? (int)strtol(h->element[3]->str, NULL, 10) : 0;
        if (!s->definition || (h->element[1]->str && h->element[1]->str[0] && !s->schedule))
            rc = err_set(e, ERR_NOMEM, "out of memory");
    }
cleanup:
    freeReplyObject(h);
    give_conn(q, c);
    if (rc != 0)
        queue_schedules_free(s, 1);
    else
        *out = s;
    return rc;
}

static int r_batch_pause(struct queue *qb, const char *id, int paused, int64_t next_run_ms,
                         struct batch_job **out, struct err *e)
{
    struct redis_queue *q = rq(qb);
    struct args a;
    redisReply *r;
    int64_t v = -1;

    script_args(q, &a, "batch_pause");
    arg(&a, id);
    arg_int(&a, paused);
    arg_int(&a, next_run_ms);
    r = run(q, &a, e);
    if (!r)
        return e->code;
    int_reply(r, &v);
    freeReplyObject(r);
    if (v == -1)
        return err_set(e, ERR_NOT_FOUND, "no batch job '%.40s'", id);
    if (v == -2)
        return err_set(e, ERR_CONFLICT,
                       "batch job %s is a run, not a schedule: only schedules pause and resume",
                       id);
    if (v == -3)
        return err_set(e, ERR_CONFLICT, "schedule %s is cancelled", id);
    return r_batch_get(qb, id, out, e);
}

static int r_batch_progress(struct queue *qb, const char *batch_id, const char *task_id,
                            uint64_t token, int64_t records, struct err *e)
{
    struct redis_queue *q = rq(qb);
    struct args a;
    redisReply *r;

    script_args(q, &a, "batch_progress");
    arg(&a, task_id);
    arg_int(&a, (int64_t)token);
    arg(&a, batch_id);
    arg_int(&a, records);
    r = run(q, &a, e);
    if (!r)
        return e->code;
    freeReplyObject(r);
    return 0;
}

static int r_schedules_due(struct queue *qb, int64_t now_ms, struct queue_schedule **out,
                           size_t *n, struct err *e)
{
    struct redis_queue *q = rq(qb);
    redisContext *c = take_conn(q, e);
    redisReply *ids;
    struct queue_schedule *v = NULL;
    int rc = 0;

    *out = NULL;
    *n = 0;
    if (!c)
        return e->code;
    ids = redisCommand(c, "ZRANGEBYSCORE %sschedules -inf %lld LIMIT 0 100", q->prefix,
                       (long long)now_ms);
    if (!ids)
        rc = err_set(e, ERR_UNAVAILABLE, "Redis at %s:%d: %s", q->host, q->port, c->errstr);
    else if (ids->type == REDIS_REPLY_ARRAY && ids->elements > 0 &&
             !(v = calloc(ids->elements, sizeof(*v))))
        rc = err_set(e, ERR_NOMEM, "out of memory");
    /* a schedule that cannot be read is left out (`*n` counts the others): it is due again at
     * the next look */
    for (size_t i = 0; v && i < ids->elements; i++) {
        redisReply *h = redisCommand(c, "HMGET %sbatch:%s definition schedule next_run_ms",
                                     q->prefix, ids->element[i]->str);
        struct queue_schedule *s = &v[*n];
        if (h && h->type == REDIS_REPLY_ARRAY && h->elements == 3 && h->element[0]->str &&
            h->element[1]->str && h->element[2]->str) {
            snprintf(s->id, sizeof(s->id), "%s", ids->element[i]->str);
            s->definition = strdup(h->element[0]->str);
            s->schedule = strdup(h->element[1]->str);
            s->next_run_ms = strtoll(h->element[2]->str, NULL, 10);
            if (s->definition && s->schedule && !queue_fault("schedules_due", i)) {
                (*n)++;
            } else {
                free(s->definition);
                free(s->schedule);
                memset(s, 0, sizeof(*s));
            }
        }
        freeReplyObject(h);
    }
    freeReplyObject(ids);
    give_conn(q, c);
    if (*n == 0) {
        free(v);
        v = NULL;
    }
    *out = v;
    return rc;
}

/* ---- workers and their heartbeats ---- */

static int r_worker_beat(struct queue *qb, const struct queue_worker *w, struct err *e)
{
    struct redis_queue *q = rq(qb);
    struct args a;
    redisReply *r;

    script_args(q, &a, "worker_beat");
    arg(&a, w->id);
    arg(&a, w->host);
    arg_int(&a, w->pid);
    arg_int(&a, w->started_ms);
    arg_int(&a, w->timeout_ms);
    arg_int(&a, w->jobs_running);
    r = run(q, &a, e);
    freeReplyObject(r);
    return r ? 0 : e->code;
}

static int r_worker_leave(struct queue *qb, const char *id, struct err *e)
{
    struct redis_queue *q = rq(qb);
    struct args a;
    redisReply *r;

    script_args(q, &a, "worker_leave");
    arg(&a, id);
    arg_int(&a, q->cfg.result_ttl_s);
    r = run(q, &a, e);
    freeReplyObject(r);
    return r ? 0 : e->code;
}

/* The live workers: those whose time to be presumed dead is still ahead. */
static int r_workers_list(struct queue *qb, struct queue_worker **out, size_t *n, struct err *e)
{
    struct redis_queue *q = rq(qb);
    redisContext *c = take_conn(q, e);
    redisReply *ids;
    struct queue_worker *v = NULL;
    int rc = 0;

    *out = NULL;
    *n = 0;
    if (!c)
        return e->code;
    ids = redisCommand(c, "ZRANGEBYSCORE %sworkers (%lld +inf LIMIT 0 10000", q->prefix,
                       (long long)queue_now_ms());
    if (!ids || ids->type != REDIS_REPLY_ARRAY)
        rc = err_set(e, ERR_UNAVAILABLE, "Redis at %s:%d: %s", q->host, q->port, c->errstr);
    else if (ids->elements > 0 && !(v = calloc(ids->elements, sizeof(*v))))
        rc = err_set(e, ERR_NOMEM, "out of memory");
    for (size_t i = 0; rc == 0 && v && i < ids->elements; i++) {
        redisReply *h = redisCommand(c, "HGETALL %sworker:%s", q->prefix, ids->element[i]->str);
        struct queue_worker *w = &v[*n];
        const char *host;
        if (h && h->type == REDIS_REPLY_ARRAY && h->elements > 0 &&
            (host = hget(h, "host", NULL))) {
            snprintf(w->id, sizeof(w->id), "%s", ids->element[i]->str);
            snprintf(w->host, sizeof(w->host), "%s", host);
            w->pid = (int)hget_int(h, "pid");
            w->started_ms = hget_int(h, "started_ms");
            w->heartbeat_ms = hget_int(h, "heartbeat_ms");
            w->timeout_ms = hget_int(h, "timeout_ms");
            w->jobs_running = (int)hget_int(h, "jobs_running");
            (*n)++;
        }
        freeReplyObject(h);
    }
    freeReplyObject(ids);
    give_conn(q, c);
    if (rc != 0 || *n == 0) {
        free(v);
        v = NULL;
        if (rc != 0)
            *n = 0;
    }
    *out = v;
    return rc;
}

/* ---- background threads: the sweeper and the final-state subscriber ---- */

static int wait_stop(struct redis_queue *q, int64_t ms)
{
    struct timespec ts = clock_realtime_after_ms(ms);
    int stop;

    pthread_mutex_lock(&q->lock);
    if (!q->stopping)
        pthread_cond_timedwait(&q->cond, &q->lock, &ts);
    stop = q->stopping;
    pthread_mutex_unlock(&q->lock);
    return stop;
}

static void *sweeper_main(void *self)
{
    struct redis_queue *q = self;
    char sweeper[128];

    snprintf(sweeper, sizeof(sweeper), "%s/sweeper", q->name);
    while (!wait_stop(q, SWEEP_MS)) {
        struct args a;
        struct err e;
        redisReply *r;
        script_args(q, &a, "reclaim");
        arg(&a, sweeper);
        arg_int(&a, RECLAIM_MIN_IDLE_MS);
        arg_int(&a, q->cfg.result_ttl_s);
        /* workers are presumed dead only after a whole timeout of Redis answering: one cut off
         * with us had no way to beat */
        arg_int(&a, atomic_load(&q->down_since_ms) ? queue_now_ms() : atomic_load(&q->up_since_ms));
        r = run(q, &a, &e);
        /* {jobs of workers presumed dead, jobs whose lease expired, jobs failed for good} */
        if (r && r->type == REDIS_REPLY_ARRAY && r->elements == 3 &&
            r->element[0]->type == REDIS_REPLY_INTEGER && r->element[0]->integer > 0)
            log_warn("queue", "workers presumed dead (no heartbeat); their jobs reclaimed",
                     "jobs=%lld", (long long)r->element[0]->integer);
        if (r && r->type == REDIS_REPLY_ARRAY && r->elements == 3 &&
            r->element[1]->type == REDIS_REPLY_INTEGER && r->element[1]->integer > 0)
            log_warn("queue", "leases expired; jobs reclaimed", "jobs=%lld",
                     (long long)r->element[1]->integer);
        for (size_t i = 0; r && r->type == REDIS_REPLY_ARRAY && r->elements == 3 &&
                           r->element[2]->type == REDIS_REPLY_ARRAY && i < r->element[2]->elements;
             i++) {
            const redisReply *f = r->element[2]->element[i];
            if (f->type == REDIS_REPLY_ARRAY && f->elements == 4 && f->element[0]->str &&
                f->element[1]->str && f->element[3]->str)
                log_warn("queue", "job failed", "job=%s model=%s attempts=%lld error=\"%s\"",
                         f->element[0]->str, f->element[1]->str, (long long)f->element[2]->integer,
                         f->element[3]->str);
        }
        freeReplyObject(r);
    }
    return NULL;
}

static void *subscriber_main(void *self)
{
    struct redis_queue *q = self;
    int64_t backoff = 100;

    while (!wait_stop(q, 0)) {
        struct err e;
        redisContext *c = connect_redis(q, &e);
        redisReply *r;
        if (!c) {
            if (wait_stop(q, backoff))
                break;
            backoff = backoff < 5000 ? backoff * 2 : 5000;
            continue;
        }
        backoff = 100;
        /* a short read timeout, so stopping is noticed */
        struct timeval tv = {0, 500 * 1000};
        redisSetTimeout(c, tv);
        r = redisCommand(c, "SUBSCRIBE %sfinal %scancel", q->prefix, q->prefix);
        freeReplyObject(r);
        r = NULL;
        redisGetReply(c, (void **)&r); /* the second channel's confirmation */
        freeReplyObject(r);
        while (!c->err) {
            r = NULL;
            if (redisGetReply(c, (void **)&r) != REDIS_OK) {
                if (c->err == REDIS_ERR_IO && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                    c->err = 0; /* a read timeout: look at `stopping`, then read on */
                    if (wait_stop(q, 0))
                        break;
                    continue;
                }
                break;
            }
            if (r && r->type == REDIS_REPLY_ARRAY && r->elements == 3 &&
                strcmp(r->element[0]->str, "message") == 0 && r->element[1]->str &&
                r->element[2]->str && strlen(r->element[1]->str) > 6 &&
                strcmp(r->element[1]->str + strlen(r->element[1]->str) - 6, "cancel") == 0) {
                queue_note_cancel(&q->base, r->element[2]->str);
            } else if (r && r->type == REDIS_REPLY_ARRAY && r->elements == 3 &&
                       strcmp(r->element[0]->str, "message") == 0 && q->base.on_final) {
                char id[48] = "";
                const char *msg = r->element[2]->str, *sp = strchr(msg, ' ');
                if (sp && (size_t)(sp - msg) < sizeof(id)) {
                    memcpy(id, msg, (size_t)(sp - msg));
                    int st = job_state_parse(sp + 1);
                    q->base.on_final(q->base.on_final_ctx, id, (enum job_state)(st < 0 ? 0 : st));
                }
            }
            freeReplyObject(r);
        }
        redisFree(c);
    }
    return NULL;
}

/* ---- opening and closing ---- */

static void r_close(struct queue *qb)
{
    struct redis_queue *q = rq(qb);

    pthread_mutex_lock(&q->lock);
    q->stopping = 1;
    pthread_cond_broadcast(&q->cond);
    pthread_cond_broadcast(&q->async_cond);
    pthread_mutex_unlock(&q->lock);
    if (q->threads_started) {
        pthread_join(q->async_thread, NULL);
        pthread_join(q->sweeper, NULL);
        pthread_join(q->subscriber, NULL);
    }
    for (int i = 0; i < q->n_idle; i++)
        redisFree(q->pool[i]);
    pthread_mutex_destroy(&q->pool_lock);
    pthread_mutex_destroy(&q->lock);
    pthread_cond_destroy(&q->cond);
    pthread_cond_destroy(&q->async_cond);
    free(q);
}

static const struct queue_job_ops redis_job_ops = {
    .enqueue = r_enqueue,
    .enqueue_async = r_enqueue_async,
    .lease_many = r_lease_many,
    .finish_many = r_finish_many,
    .extend = r_extend,
    .cancel = r_cancel,
    .retry = r_retry,
    .get = r_get,
    .list = r_list,
    .counts = r_counts,
    .queued = r_queued,
    .worker_beat = r_worker_beat,
    .worker_leave = r_worker_leave,
    .workers_list = r_workers_list,
};

static const struct queue_batch_ops redis_batch_ops = {
    .create = r_batch_create,
    .get = r_batch_get,
    .list = r_batch_list,
    .cancel = r_batch_cancel,
    .pause = r_batch_pause,
    .results = r_batch_results,
    .definition = r_batch_definition,
    .progress = r_batch_progress,
    .schedules_due = r_schedules_due,
};

static const struct queue_outbox_ops redis_outbox_ops = {
    .due = r_outbox_due,
    .next_due = r_outbox_next_due,
    .record = r_outbox_record,
    .exclusive = 1,
};

static const struct queue_ops redis_ops = {
    .jobs = &redis_job_ops,
    .batch = &redis_batch_ops,
    .outbox = &redis_outbox_ops,
    .close = r_close,
};

/* redis://[host][:port][/db] */
static int parse_url(struct redis_queue *q, const char *url, struct err *e)
{
    const char *p = url + strlen("redis://"), *colon, *slash;
    size_t hlen;

    q->port = 6379;
    q->db = 0;
    slash = strchr(p, '/');
    colon = strchr(p, ':');
    if (colon && slash && colon > slash)
        colon = NULL;
    hlen = (size_t)((colon ? colon : slash ? slash : p + strlen(p)) - p);
    if (strchr(p, '@'))
        return err_set(e, ERR_INVALID, "--queue %s: passwords are not supported yet", url);
    if (hlen >= sizeof(q->host))
        return err_set(e, ERR_INVALID, "--queue %s: host name too long", url);
    memcpy(q->host, p, hlen);
    q->host[hlen] = '\0';
    if (!q->host[0])
        snprintf(q->host, sizeof(q->host), "127.0.0.1");
    if (colon) {
        char *end;
        long v = strtol(colon + 1, &end, 10);
        if (end == colon + 1 || v < 1 || v > 65535 || (*end && *end != '/'))
            return err_set(e, ERR_INVALID, "--queue %s: bad port", url);
        q->port = (int)v;
    }
    if (slash && slash[1]) {
        char *end;
        long v = strtol(slash + 1, &end, 10);
        if (*end || v < 0 || v > 1000)
            return err_set(e, ERR_INVALID, "--queue %s: bad database number", url);
        q->db = (int)v;
    }
    return 0;
}

static void script_sha(char out[41])
{
    unsigned char md[SHA_DIGEST_LENGTH];

    SHA1((const unsigned char *)queue_redis_lua, strlen(queue_redis_lua), md);
    for (int i = 0; i < SHA_DIGEST_LENGTH; i++)
        snprintf(out + 2 * i, 3, "%02x", md[i]);
}

/* The consumer group on every priority stream (created with the streams). */
static int create_groups(struct redis_queue *q, redisContext *c, struct err *e)
{
    for (int p = 0; p < 10; p++) {
        redisReply *r = redisCommand(c, "XGROUP CREATE %sq:%d workers 0 MKSTREAM", q->prefix, p);
        int bad = !r || (r->type == REDIS_REPLY_ERROR && !strstr(r->str, "BUSYGROUP"));
        if (bad)
            err_set(e, ERR_UNAVAILABLE, "Redis at %s:%d: cannot create the consumer group: %s",
                    q->host, q->port, r ? r->str : c->errstr);
        freeReplyObject(r);
        if (bad)
            return ERR_UNAVAILABLE;
    }
    return 0;
}

int queue_redis_open(const struct queue_config *cfg, struct queue **out, struct err *e)
{
    struct redis_queue *q = calloc(1, sizeof(*q));
    redisContext *c;
    char host[64] = "host";
    int rc;

    *out = NULL;
    if (!q)
        return err_set(e, ERR_NOMEM, "out of memory");
    q->base.ops = &redis_ops;
    q->cfg = *cfg;
    snprintf(q->prefix, sizeof(q->prefix), "inferd:");
    gethostname(host, sizeof(host) - 1);
    snprintf(q->name, sizeof(q->name), "%.60s/%d", host, (int)getpid());
    script_sha(q->sha);
    atomic_store(&q->up_since_ms, queue_now_ms());
    pthread_mutex_init(&q->pool_lock, NULL);
    pthread_mutex_init(&q->lock, NULL);
    pthread_cond_init(&q->cond, NULL);
    pthread_cond_init(&q->async_cond, NULL);
    rc = parse_url(q, cfg->url, e);
    if (rc != 0) {
        r_close(&q->base);
        return rc;
    }
    c = connect_redis(q, e);
    if (!c) {
        r_close(&q->base);
        return ERR_UNAVAILABLE;
    }
    rc = create_groups(q, c, e);
    give_conn(q, c);
    if (rc != 0) {
        r_close(&q->base);
        return rc;
    }
    if (pthread_create(&q->async_thread, NULL, async_main, q) != 0 ||
        pthread_create(&q->sweeper, NULL, sweeper_main, q) != 0 ||
        pthread_create(&q->subscriber, NULL, subscriber_main, q) != 0) {
        /* a half-started set of threads cannot be joined safely: give up now */
        log_error("queue", "cannot start the Redis queue's threads", "%s", "");
        abort();
    }
    q->threads_started = 1;
    log_info("queue", "job queue on Redis", "redis=%s:%d db=%d result_ttl_s=%lld", q->host, q->port,
             q->db, (long long)cfg->result_ttl_s);
    *out = &q->base;
    return 0;
}
