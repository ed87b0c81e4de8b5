/*
 * conn.c: the Redis queue's connections and life: connecting (the database selected, the script
 * loaded), the pool of idle connections, noting Redis down and up, opening and closing (the URL
 * read by url.c), and the two threads every process runs: the sweeper (reclaims expired
 * leases, presumes silent workers dead) and the subscriber (final states and cancels published
 * by any process).
 */
#define _GNU_SOURCE
#include "queue/redis/internal.h"
#include "core/clock.h"
#include "core/log.h"

#include <errno.h>
#include <openssl/sha.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

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

/* AUTH with the URL's user (an ACL user) or password alone. */
static int authenticate(struct redis_queue *q, redisContext *c, struct err *e)
{
    redisReply *r = q->user[0] ? redisCommand(c, "AUTH %s %s", q->user, q->password)
                               : redisCommand(c, "AUTH %s", q->password);
    int rc = 0;

    if (!r || r->type == REDIS_REPLY_ERROR) {
        const char *why = r ? r->str : c->errstr;
        /* Redis's replies do not echo the password; make sure of it */
        if (!why || (q->password[0] && strstr(why, q->password)))
            why = "refused";
        rc = err_set(e, ERR_UNAVAILABLE, "Redis at %s:%d: authentication as %s failed: %s", q->host,
                     q->port, q->user[0] ? q->user : "the default user", why);
    }
    freeReplyObject(r);
    return rc;
}

/* Without credentials: a PING says at once whether Redis wants them (before the script, whose
 * size an unauthenticated connection may not even send). */
static int check_no_auth(struct redis_queue *q, redisContext *c, struct err *e)
{
    redisReply *r = redisCommand(c, "PING");
    int rc = 0;

    if (r && r->type == REDIS_REPLY_ERROR && strncmp(r->str, "NOAUTH", 6) == 0)
        rc = err_set(e, ERR_UNAVAILABLE,
                     "Redis at %s:%d wants a password (%s): give it in the URL, "
                     "redis://:PASSWORD@HOST... or redis://USER:PASSWORD@HOST...",
                     q->host, q->port, r->str);
    else if (!r)
        rc = err_set(e, ERR_UNAVAILABLE, "Redis at %s:%d: %s", q->host, q->port, c->errstr);
    freeReplyObject(r);
    return rc;
}

redisContext *rq_connect_redis(struct redis_queue *q, struct err *e)
{
    struct timeval tv = {CONNECT_TIMEOUT_MS / 1000, (CONNECT_TIMEOUT_MS % 1000) * 1000};
    struct timeval cmd = {COMMAND_TIMEOUT_MS / 1000, 0};
    redisContext *c = NULL;
    redisReply *r;
    int fd;

    if (q->tls) {
        if (rq_tls_connect(q->tls, q->host, q->port, CONNECT_TIMEOUT_MS, &fd, e) != 0)
            return NULL;
        c = redisConnectFd(fd);
        if (!c || c->err) {
            err_set(e, ERR_UNAVAILABLE, "Redis at %s:%d: %s", q->host, q->port,
                    c ? c->errstr : "out of memory");
            if (!c)
                close(fd);
            redisFree(c);
            return NULL;
        }
    } else {
        c = redisConnectWithTimeout(q->host, q->port, tv);
        if (!c || c->err) {
            err_set(e, ERR_UNAVAILABLE, "Redis at %s:%d: %s", q->host, q->port,
                    c ? c->errstr : "cannot connect");
            redisFree(c);
            return NULL;
        }
    }
    redisSetTimeout(c, cmd);
    if (q->password[0] ? authenticate(q, c, e) != 0 : check_no_auth(q, c, e) != 0) {
        redisFree(c);
        return NULL;
    }
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

void rq_note_down(struct redis_queue *q, const char *why)
{
    int64_t expected = 0;

    if (atomic_compare_exchange_strong(&q->down_since_ms, &expected, clock_now_ms()))
        log_error("queue", "Redis unreachable", "redis=%s:%d reason=\"%s\"", q->host, q->port, why);
}

void rq_note_up(struct redis_queue *q)
{
    if (atomic_exchange(&q->down_since_ms, 0) != 0) {
        atomic_store(&q->up_since_ms, clock_now_ms());
        log_info("queue", "Redis reachable again", "redis=%s:%d", q->host, q->port);
    }
}

redisContext *rq_take_conn(struct redis_queue *q, struct err *e)
{
    redisContext *c = NULL;

    pthread_mutex_lock(&q->pool_lock);
    if (q->n_idle > 0)
        c = q->pool[--q->n_idle];
    pthread_mutex_unlock(&q->pool_lock);
    if (!c) {
        c = rq_connect_redis(q, e);
        if (!c)
            rq_note_down(q, e->msg);
    }
    return c;
}

/* Gives a connection back; a broken one is closed instead. */
void rq_give_conn(struct redis_queue *q, redisContext *c)
{
    if (!c)
        return;
    if (c->err) {
        rq_note_down(q, c->errstr);
        redisFree(c);
        /* the idle ones most likely broke with it (Redis restarted): reconnect afresh */
        pthread_mutex_lock(&q->pool_lock);
        while (q->n_idle > 0)
            redisFree(q->pool[--q->n_idle]);
        pthread_mutex_unlock(&q->pool_lock);
        return;
    }
    rq_note_up(q);
    pthread_mutex_lock(&q->pool_lock);
    if (q->n_idle < POOL_SIZE) {
        q->pool[q->n_idle++] = c;
        c = NULL;
    }
    pthread_mutex_unlock(&q->pool_lock);
    redisFree(c);
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
        rq_script_args(q, &a, "reclaim");
        rq_arg(&a, sweeper);
        rq_arg_int(&a, RECLAIM_MIN_IDLE_MS);
        rq_arg_int(&a, q->cfg.result_ttl_s);
        /* workers are presumed dead only after a whole timeout of Redis answering: one cut off
         * with us had no way to beat */
        rq_arg_int(&a,
                   atomic_load(&q->down_since_ms) ? clock_now_ms() : atomic_load(&q->up_since_ms));
        r = rq_run(q, &a, &e);
        /* {workers presumed dead, jobs whose lease expired, jobs failed for good} */
        for (size_t i = 0; r && r->type == REDIS_REPLY_ARRAY && r->elements == 3 &&
                           r->element[0]->type == REDIS_REPLY_ARRAY && i < r->element[0]->elements;
             i++) {
            const redisReply *w = r->element[0]->element[i];
            if (w->type == REDIS_REPLY_ARRAY && w->elements == 3 && w->element[0]->str &&
                w->element[1]->type == REDIS_REPLY_INTEGER && w->element[2]->str)
                queue_log_worker_lost(w->element[0]->str, w->element[1]->integer,
                                      w->element[2]->str);
        }
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
        redisContext *c = rq_connect_redis(q, &e);
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
        pthread_mutex_lock(&q->lock);
        q->subscribed = 1;
        pthread_cond_broadcast(&q->cond);
        pthread_mutex_unlock(&q->lock);
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
    /* each thread sees `stopping` at its next wait; join those that started */
    if (q->threads_started > 0)
        pthread_join(q->async_thread, NULL);
    if (q->threads_started > 1)
        pthread_join(q->sweeper, NULL);
    if (q->threads_started > 2)
        pthread_join(q->subscriber, NULL);
    for (int i = 0; i < q->n_idle; i++)
        redisFree(q->pool[i]);
    SSL_CTX_free(q->tls);
    explicit_bzero(q->password, sizeof(q->password));
    pthread_mutex_destroy(&q->pool_lock);
    pthread_mutex_destroy(&q->lock);
    pthread_cond_destroy(&q->cond);
    pthread_cond_destroy(&q->async_cond);
    free(q);
}

static const struct queue_ops redis_ops = {
    .jobs = &rq_job_ops,
    .batch = &rq_batch_ops,
    .outbox = &rq_outbox_ops,
    .close = r_close,
};

/* The URL's parts, copied; the TLS context of rediss:// created from its files. */
static int apply_url(struct redis_queue *q, const char *url, struct err *e)
{
    struct rq_url u;
    int rc = rq_url_parse(url, &u, e);

    if (rc == 0) {
        snprintf(q->host, sizeof(q->host), "%s", u.host);
        q->port = u.port;
        q->db = u.db;
        snprintf(q->user, sizeof(q->user), "%s", u.user);
        snprintf(q->password, sizeof(q->password), "%s", u.password);
        if (u.tls)
            rc = rq_tls_create(u.ca, u.cert, u.key, &q->tls, e);
    }
    rq_url_release(&u);
    return rc;
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
    atomic_store(&q->up_since_ms, clock_now_ms());
    pthread_mutex_init(&q->pool_lock, NULL);
    pthread_mutex_init(&q->lock, NULL);
    pthread_cond_init(&q->cond, NULL);
    pthread_cond_init(&q->async_cond, NULL);
    rc = apply_url(q, cfg->url, e);
    if (rc != 0) {
        r_close(&q->base);
        return rc;
    }
    c = rq_connect_redis(q, e);
    if (!c) {
        r_close(&q->base);
        return ERR_UNAVAILABLE;
    }
    rc = create_groups(q, c, e);
    rq_give_conn(q, c);
    if (rc != 0) {
        r_close(&q->base);
        return rc;
    }
    void *(*const mains[3])(void *) = {rq_async_main, sweeper_main, subscriber_main};
    pthread_t *const threads[3] = {&q->async_thread, &q->sweeper, &q->subscriber};
    for (int i = 0; i < 3; i++) {
        int perr = pthread_create(threads[i], NULL, mains[i], q);
        if (perr != 0) {
            rc =
                err_set(e, ERR_NOMEM, "cannot start the Redis queue's threads: %s", strerror(perr));
            r_close(&q->base); /* stops and joins those that started */
            return rc;
        }
        q->threads_started++;
    }
    /* final states from now on reach on_final: wait (2 s at most) for the subscription */
    struct timespec until = clock_realtime_after_ms(2000);
    pthread_mutex_lock(&q->lock);
    while (!q->subscribed && pthread_cond_timedwait(&q->cond, &q->lock, &until) == 0)
        ;
    pthread_mutex_unlock(&q->lock);
    log_info("queue", "job queue on Redis", "redis=%s:%d db=%d tls=%s auth=%s result_ttl_s=%lld",
             q->host, q->port, q->db, q->tls ? "on" : "off",
             q->password[0] ? (q->user[0] ? q->user : "password") : "none",
             (long long)cfg->result_ttl_s);
    *out = &q->base;
    return 0;
}
