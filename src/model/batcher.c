/*
 * batcher.c: dynamic batching in front of one model's backend instances.
 *
 * Thread map:
 *   producers      batcher_submit(): append under `lock`, signal `work`
 *   instance i     wait for work; gather whole requests up to max_batch_size rows, waiting up
 *                  to max_queue_delay_us after the oldest; unlock; execute; call done()
 *   sweeper        wakes at the nearest deadline or every SWEEP_MS: answers expired items with
 *                  ERR_TIMEOUT and drops items whose client closed its socket or that were
 *                  cancelled (ERR_CANCELLED)
 *   execute_async  one instance thread dispatches without waiting, while fewer than
 *                  max_in_flight requests are started; the backend's thread ends each one in
 *                  batcher_request_done(), which frees a place and wakes the dispatcher
 * One lock; it is never held across a backend call or a done() callback.
 */
#define _GNU_SOURCE
#include "model/batcher.h"
#include "core/log.h"
#include "core/clock.h"
#include "metrics/metrics.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define SWEEP_MS 20

struct instance {
    struct batcher *b;
    void *state; /* the backend's instance */
    pthread_t thread;
    int index;
};

struct batcher {
    struct batcher_config cfg; /* immutable after create: no lock */
    const struct inferd_backend_api *api;
    void *model_state;
    char name[128];

    pthread_mutex_t lock;    /* never held across a backend call or done() */
    pthread_cond_t work;     /* items arrived, or stopping */
    pthread_cond_t sweep;    /* an item with a nearer deadline arrived, or stopping */
    struct batch_item *head; /* guarded by lock; FIFO */
    struct batch_item *tail; /* guarded by lock */
    size_t n_pending;        /* guarded by lock; <= cfg.max_queue_size */
    int64_t pending_rows;    /* guarded by lock */
    int stopping;            /* guarded by lock */
    int sweeper_stopping;    /* guarded by lock: set once the instances have drained */
    int is_async;            /* the backend has execute_async; immutable */
    int64_t in_flight;       /* guarded by lock: execute_async requests started, not done */

    struct instance *instances;
    int n_started; /* threads running; only touched by create and destroy */
    pthread_t sweeper;
    int sweeper_started;
};

static void deadline_to_timespec(uint64_t ns, struct timespec *ts)
{
    ts->tv_sec = (time_t)(ns / 1000000000ull);
    ts->tv_nsec = (long)(ns % 1000000000ull);
}

static int64_t item_rows(const struct batch_item *it)
{
    int64_t rows = infer_request_rows(it->req);

    return rows > 0 ? rows : 1;
}

/* Removes `it` (whose predecessor is `prev`, NULL for the head). Caller holds the lock. */
static void unlink_item(struct batcher *b, struct batch_item *prev, struct batch_item *it)
{
    if (prev)
        prev->next = it->next;
    else
        b->head = it->next;
    if (b->tail == it)
        b->tail = prev;
    it->next = NULL;
    b->n_pending--;
    b->pending_rows -= item_rows(it);
}

/* ---- instances ---- */

/* Takes whole requests from the head up to max_batch_size rows and `max_items` items (at
 * least one). Holds the lock. */
static struct batch_item *take_batch(struct batcher *b, int64_t max_items, size_t *n_items,
                                     int64_t *n_rows)
{
    struct batch_item *first = b->head, *last = NULL, *it = b->head;
    int64_t rows = 0;
    size_t n = 0;

    while (it) {
        int64_t r = item_rows(it);
        if (n > 0 && (rows + r > b->cfg.max_batch_size || (int64_t)n >= max_items))
            break;
        rows += r;
        n++;
        last = it;
        it = it->next;
    }
    b->head = it;
    if (!it)
        b->tail = NULL;
    last->next = NULL;
    b->n_pending -= n;
    b->pending_rows -= rows;
    *n_items = n;
    *n_rows = rows;
    return first;
}

/* Every item ends here: counts it for the statistics extension, then calls its done(). */
static void finish(struct batcher *b, struct batch_item *it, int rc, const struct err *e)
{
    uint64_t since = it->received_ns ? it->received_ns : it->enqueued_ns;

    metrics_stat(b->cfg.stats, rc == 0 ? METRICS_STAT_SUCCESS : METRICS_STAT_FAIL,
                 clock_mono_ns() - since);
    if (rc == 0)
        metrics_inferences(b->cfg.stats, item_rows(it));
    it->done(it, rc, e);
}

static void answer_timeout(struct batcher *b, struct batch_item *it)
{
    struct err e;

    it->next = NULL;
    err_set(&e, ERR_TIMEOUT,
            "model '%s': the request's timeout passed while it waited in the queue", b->name);
    finish(b, it, ERR_TIMEOUT, &e);
}

/* Answers the items whose deadline has passed (they never reach the backend); returns the
 * rest, with their count and rows. */
static struct batch_item *drop_expired(struct batcher *b, struct batch_item *items, size_t *n,
                                       int64_t *rows)
{
    uint64_t now = clock_mono_ns();
    struct batch_item *keep = NULL, **tail = &keep, *it, *next;

    for (it = items; it; it = next) {
        next = it->next;
        if (it->deadline_ns && it->deadline_ns <= now) {
            (*n)--;
            *rows -= item_rows(it);
            answer_timeout(b, it);
        } else {
            *tail = it;
            tail = &it->next;
        }
    }
    *tail = NULL;
    return keep;
}

/* The err_code for a request the backend failed, from the HTTP status it gave. */
static enum err_code failure_code(const struct inferd_request *r)
{
    switch (r->status) {
    case 400:
        return ERR_INVALID;
    case 413:
        return ERR_TOO_LARGE;
    case 422:
        return ERR_SHAPE;
    case 429:
        return ERR_BUSY;
    case 499:
        return ERR_CANCELLED;
    case 502:
        return ERR_UPSTREAM;
    case 503:
        return ERR_UNAVAILABLE;
    case 504:
        return ERR_TIMEOUT;
    default:
        return ERR_BACKEND;
    }
}

/* Calls done() for an item the backend has finished with. */
static void answer_item(struct batcher *b, struct batch_item *it)
{
    struct inferd_request *abi = &it->req->abi;

    it->next = NULL;
    if (abi->failed) {
        struct err e;
        enum err_code code = failure_code(abi);
        if (code == ERR_CANCELLED)
            err_set(&e, code, "model '%s': cancelled", b->name);
        else
            err_set(&e, code, "model '%s': %s", b->name, abi->error[0] ? abi->error : "failed");
        finish(b, it, code, &e);
    } else {
        finish(b, it, 0, NULL);
    }
}

void batch_item_cancel(struct batch_item *item)
{
    atomic_store(&item->cancelled, 1);
}

static int client_gone(struct batch_item *it);

int batcher_request_cancelled(const struct inferd_request *request)
{
    struct batch_item *it = infer_request_of(request)->batch_item;

    return !it || atomic_load(&it->cancelled) || client_gone(it);
}

void batcher_request_done(struct inferd_request *request)
{
    struct infer_request *r = infer_request_of(request);
    struct batch_item *it = r->batch_item;
    struct batcher *b = it->batcher;

    r->batch_item = NULL;
    /* an upstream call per request: each is one execution */
    metrics_stat(b->cfg.stats, METRICS_STAT_COMPUTE_INFER, clock_mono_ns() - it->started_ns);
    if (!request->failed)
        metrics_execution(b->cfg.stats, item_rows(it), clock_mono_ns() - it->started_ns);
    answer_item(b, it);
    /* `b` lives until in_flight is 0: batcher_destroy waits for that */
    pthread_mutex_lock(&b->lock);
    b->in_flight--;
    pthread_cond_broadcast(&b->work);
    pthread_mutex_unlock(&b->lock);
}

static void host_log(int level, const char *backend, const char *msg)
{
    if (level < 0)
        level = 0;
    if (level > 3)
        level = 3;
    LOG_AT((enum log_level)level, "backend", msg, "backend=%s", backend);
}

static const struct inferd_host host = {
    .api_version = INFERD_BACKEND_API_VERSION,
    .output_alloc = tensor_output_alloc,
    .log = host_log,
    .request_done = batcher_request_done,
    .request_cancelled = batcher_request_cancelled,
};

const struct inferd_host *batcher_host(void)
{
    return &host;
}

/* Gives back the places of execute_async requests that never started. */
static void release_in_flight(struct batcher *b, int64_t n)
{
    if (!b->is_async || n == 0)
        return;
    pthread_mutex_lock(&b->lock);
    b->in_flight -= n;
    pthread_cond_broadcast(&b->work);
    pthread_mutex_unlock(&b->lock);
}

static void run_batch(struct instance *in, struct batch_item *items, size_t n, int64_t rows)
{
    struct batcher *b = in->b;
    struct inferd_request *stack_reqs[64];
    struct inferd_request **reqs = n <= 64 ? stack_reqs : malloc(n * sizeof(*reqs));
    struct batch_item *it, *next;
    char errbuf[256] = "";
    uint64_t now = clock_mono_ns();
    struct err e = {0};
    size_t i = 0;
    int rc;

    for (it = items; it; it = it->next) {
        it->started_ns = now;
        it->batch_rows = (size_t)rows;
        metrics_queue_wait(b->cfg.metrics, (double)(now - it->enqueued_ns) / 1e9);
        metrics_stat(b->cfg.stats, METRICS_STAT_QUEUE, now - it->enqueued_ns);
        if (reqs) {
            infer_request_reset_outputs(it->req);
            infer_request_bind(it->req);
            it->req->batch_item = it;
            reqs[i++] = &it->req->abi;
        }
    }
    metrics_batch(b->cfg.metrics, (size_t)rows);
    if (!reqs) {
        rc = err_set(&e, ERR_NOMEM, "out of memory building a batch of %zu requests", n);
    } else if (b->is_async) {
        /* once started, a request may end (and its item be freed) at any moment */
        rc = b->api->execute_async(in->state, reqs, n, errbuf, sizeof(errbuf));
        if (rc == 0) {
            if (reqs != stack_reqs)
                free(reqs);
            return;
        }
    } else {
        rc = b->api->execute(in->state, reqs, n, errbuf, sizeof(errbuf));
        uint64_t infer_ns = clock_mono_ns() - now;
        for (it = items; it; it = it->next)
            metrics_stat(b->cfg.stats, METRICS_STAT_COMPUTE_INFER, infer_ns);
        if (rc == 0)
            metrics_execution(b->cfg.stats, rows, infer_ns);
    }
    if (rc != 0 && reqs)
        rc = err_set(&e, ERR_BACKEND, "model '%s': %s", b->name,
                     errbuf[0] ? errbuf : "the backend failed");
    if (reqs != stack_reqs)
        free(reqs);
    for (it = items; it; it = next) {
        next = it->next;
        it->req->batch_item = NULL;
        if (rc != 0) {
            it->next = NULL;
            finish(b, it, rc, &e);
        } else {
            answer_item(b, it);
        }
    }
    release_in_flight(b, (int64_t)n);
}

static void *instance_main(void *arg)
{
    struct instance *in = arg;
    struct batcher *b = in->b;
    struct batch_item *items;
    size_t n;
    int64_t rows;

    pthread_mutex_lock(&b->lock);
    for (;;) {
        /* execute_async: wait for a free place too, even while stopping (we drain) */
        while ((!b->head && !b->stopping) || (b->head && b->is_async && b->in_flight >= b->cfg.max_in_flight))
            pthread_cond_wait(&b->work, &b->lock);
        if (!b->head)
            break; /* stopping and drained */
        if (b->cfg.max_queue_delay_us > 0 && b->pending_rows < b->cfg.max_batch_size &&
            !b->stopping) {
            /* let the batch fill, but never keep the oldest item past its delay */
            uint64_t until = b->head->enqueued_ns + (uint64_t)b->cfg.max_queue_delay_us * 1000;
            struct timespec ts;
            deadline_to_timespec(until, &ts);
            while (b->head && b->pending_rows < b->cfg.max_batch_size && !b->stopping &&
                   clock_mono_ns() < until) {
                if (pthread_cond_timedwait(&b->work, &b->lock, &ts) != 0)
                    break;
            }
            if (!b->head)
                continue; /* another instance or the sweeper took them */
        }
        if (b->is_async && b->in_flight >= b->cfg.max_in_flight)
            continue; /* the places went while the batch filled */
        items = take_batch(b, b->is_async ? b->cfg.max_in_flight - b->in_flight : INT64_MAX, &n,
                           &rows);
        if (b->is_async)
            b->in_flight += (int64_t)n;
        if (b->head && !b->is_async)
            pthread_cond_signal(&b->work); /* more left: wake another instance */
        pthread_mutex_unlock(&b->lock);
        size_t n_taken = n;
        items = drop_expired(b, items, &n, &rows);
        release_in_flight(b, (int64_t)(n_taken - n));
        if (items)
            run_batch(in, items, n, rows);
        pthread_mutex_lock(&b->lock);
    }
    /* execute_async: the backend's requests end before its instance is destroyed */
    while (b->is_async && b->in_flight > 0)
        pthread_cond_wait(&b->work, &b->lock);
    pthread_mutex_unlock(&b->lock);
    return NULL;
}

/* ---- sweeper ---- */

/* 1 once the item's client is gone. An end of its side of the connection alone (POLLRDHUP)
 * may be a half-close: the item's eof_probe is written once to tell (a peer that closed its
 * socket answers it with a reset, so the next check sees POLLERR or POLLHUP). */
static int client_gone(struct batch_item *it)
{
    struct pollfd p = {.fd = it->client_fd, .events = POLLRDHUP};

    if (it->client_fd < 0 || poll(&p, 1, 0) <= 0)
        return 0;
    if (p.revents & (POLLHUP | POLLERR | POLLNVAL))
        return 1;
    if (!(p.revents & POLLRDHUP))
        return 0;
    if (!it->eof_probe)
        return 1;
    if (!atomic_exchange(&it->probed, 1) &&
        send(it->client_fd, it->eof_probe, it->eof_probe_len, MSG_DONTWAIT | MSG_NOSIGNAL) < 0 &&
        errno != EAGAIN && errno != EWOULDBLOCK)
        return 1;
    return 0;
}

static void *sweeper_main(void *arg)
{
    struct batcher *b = arg;

    pthread_mutex_lock(&b->lock);
    while (!b->sweeper_stopping) { /* deadlines and cancels still apply while draining */
        uint64_t now = clock_mono_ns(), wake = now + SWEEP_MS * 1000000ull;
        struct batch_item *prev = NULL, *it = b->head, *next, *expired = NULL, *gone = NULL;
        struct timespec ts;

        while (it) {
            next = it->next;
            if (it->deadline_ns && it->deadline_ns <= now) {
                unlink_item(b, prev, it);
                it->next = expired;
                expired = it;
            } else if (atomic_load(&it->cancelled) || client_gone(it)) {
                unlink_item(b, prev, it);
                it->next = gone;
                gone = it;
            } else {
                if (it->deadline_ns && it->deadline_ns < wake)
                    wake = it->deadline_ns;
                prev = it;
            }
            it = next;
        }
        if (expired || gone) {
            pthread_mutex_unlock(&b->lock);
            for (it = expired; it; it = next) {
                next = it->next;
                answer_timeout(b, it);
            }
            for (it = gone; it; it = next) {
                struct err e;
                next = it->next;
                it->next = NULL;
                err_set(&e, ERR_CANCELLED, atomic_load(&it->cancelled) ? "cancelled"
                                                                       : "the client closed the connection");
                finish(b, it, ERR_CANCELLED, &e);
            }
            pthread_mutex_lock(&b->lock);
            continue;
        }
        deadline_to_timespec(wake, &ts);
        pthread_cond_timedwait(&b->sweep, &b->lock, &ts);
    }
    pthread_mutex_unlock(&b->lock);
    return NULL;
}

/* ---- life cycle ---- */

int batcher_submit(struct batcher *b, struct batch_item *item, struct err *e)
{
    int rc = 0;

    item->next = NULL;
    item->started_ns = 0;
    item->enqueued_ns = clock_mono_ns();
    item->batcher = b;
    pthread_mutex_lock(&b->lock);
    if (b->stopping) {
        rc = err_set(e, ERR_UNAVAILABLE, "model '%s' is being unloaded", b->name);
    } else if ((int64_t)b->n_pending >= b->cfg.max_queue_size) {
        rc = err_set(e, ERR_BUSY, "model '%s': queue is full (max_queue_size %lld)", b->name,
                     (long long)b->cfg.max_queue_size);
    } else {
        int was_empty = b->head == NULL;
        if (b->tail)
            b->tail->next = item;
        else
            b->head = item;
        b->tail = item;
        b->n_pending++;
        b->pending_rows += item_rows(item);
        /* wake an instance only when there is news for it: work after none, or a full batch.
         * Otherwise an instance is already awake for this queue (running, or letting the
         * batch fill), and waking it per request would cost a context switch per request. */
        if (was_empty || b->pending_rows >= b->cfg.max_batch_size)
            pthread_cond_signal(&b->work);
        if (item->deadline_ns)
            pthread_cond_signal(&b->sweep);
    }
    pthread_mutex_unlock(&b->lock);
    return rc;
}

size_t batcher_pending(struct batcher *b)
{
    size_t n;

    pthread_mutex_lock(&b->lock);
    n = b->n_pending;
    pthread_mutex_unlock(&b->lock);
    return n;
}

static int init_sync(struct batcher *b)
{
    pthread_condattr_t attr;
    int rc = 0;

    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    if (pthread_mutex_init(&b->lock, NULL) != 0 || pthread_cond_init(&b->work, &attr) != 0 ||
        pthread_cond_init(&b->sweep, &attr) != 0)
        rc = -1;
    pthread_condattr_destroy(&attr);
    return rc;
}

int batcher_create(const struct batcher_config *cfg, const struct inferd_backend_api *api,
                   void *model_state, const char *model_name, struct batcher **out, struct err *e)
{
    struct batcher *b = NULL;
    char errbuf[256];
    int rc = 0;

    *out = NULL;
    if (cfg->instances < 1 || cfg->max_batch_size < 1 || cfg->max_queue_size < 1)
        return err_set(e, ERR_INVALID,
                       "model '%s': instances, max_batch_size and "
                       "max_queue_size must be at least 1",
                       model_name);
    b = calloc(1, sizeof(*b));
    if (!b || init_sync(b) != 0) {
        free(b);
        return err_set(e, ERR_NOMEM, "out of memory");
    }
    b->cfg = *cfg;
    b->is_async = api->api_version >= 2 && api->execute_async != NULL;
    if (b->is_async) {
        b->cfg.instances = 1; /* one dispatcher; the backend's own thread does the waiting */
        if (b->cfg.max_in_flight <= 0)
            b->cfg.max_in_flight = 64;
    }
    cfg = &b->cfg;
    b->api = api;
    b->model_state = model_state;
    snprintf(b->name, sizeof(b->name), "%s", model_name);
    b->instances = calloc((size_t)cfg->instances, sizeof(*b->instances));
    if (!b->instances) {
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto fail;
    }
    for (int i = 0; i < cfg->instances; i++) {
        struct instance *in = &b->instances[i];
        in->b = b;
        in->index = i;
        errbuf[0] = '\0';
        if (api->instance_create &&
            api->instance_create(model_state, i, &in->state, errbuf, sizeof(errbuf)) != 0) {
            rc = err_set(e, ERR_BACKEND, "instance %d: %s", i, errbuf);
            goto fail;
        }
        if (pthread_create(&in->thread, NULL, instance_main, in) != 0) {
            if (api->instance_destroy)
                api->instance_destroy(in->state);
            rc = err_set(e, ERR_NOMEM, "cannot start instance thread %d", i);
            goto fail;
        }
        b->n_started++;
    }
    if (pthread_create(&b->sweeper, NULL, sweeper_main, b) != 0) {
        rc = err_set(e, ERR_NOMEM, "cannot start the sweeper thread");
        goto fail;
    }
    b->sweeper_started = 1;
    *out = b;
    return 0;
fail:
    batcher_destroy(b);
    return rc;
}

void batcher_destroy(struct batcher *b)
{
    if (!b)
        return;
    pthread_mutex_lock(&b->lock);
    b->stopping = 1;
    pthread_cond_broadcast(&b->work);
    pthread_cond_broadcast(&b->sweep);
    pthread_mutex_unlock(&b->lock);
    /* instances drain the queue before they exit (execute_async: until every request ended) */
    for (int i = 0; i < b->n_started; i++) {
        pthread_join(b->instances[i].thread, NULL);
        if (b->api->instance_destroy)
            b->api->instance_destroy(b->instances[i].state);
    }
    pthread_mutex_lock(&b->lock);
    b->sweeper_stopping = 1;
    pthread_cond_broadcast(&b->sweep);
    pthread_mutex_unlock(&b->lock);
    if (b->sweeper_started)
        pthread_join(b->sweeper, NULL);
    pthread_cond_destroy(&b->work);
    pthread_cond_destroy(&b->sweep);
    pthread_mutex_destroy(&b->lock);
    free(b->instances);
    free(b);
}
