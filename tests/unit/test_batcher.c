/*
 * test_batcher.c: dynamic batching with a fake backend that sums rows: every producer gets
 * exactly its own rows back, batches never exceed max_batch_size, a full queue says ERR_BUSY,
 * a deadline that passes while the backend is busy is answered at once, and destroy drains.
 *
 * The execute_async half uses a second fake that only records the requests it is given; the
 * test, or a completer thread playing the backend's own thread, ends them later with
 * batcher_request_done. It checks that every item is answered once with its own rows, that
 * max_in_flight holds, that failure statuses map to err codes, that cancellation reaches queued
 * and started requests, and that destroy waits for requests in flight.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "core/clock.h"
#include "model/batcher.h"
#include "kserve/codec.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* every wait in this file gives up after this long, so a lost wake-up fails instead of hanging */
#define WAIT_S 30
#define WAIT_TIMED_OUT 1 /* waiter_wait's answer when nothing came; real rcs are 0 or negative */

/* ---- a fake backend: output = row sum; can be held to simulate a long batch ---- */

static _Atomic int n_execs;
static _Atomic int max_rows_seen;
static pthread_mutex_t gate_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t gate_cond = PTHREAD_COND_INITIALIZER;
static int gate_closed; /* guarded by gate_lock: execute waits while set */
static int in_execute;  /* guarded by gate_lock */

static int fake_execute(void *inst, struct inferd_request *const *reqs, size_t n, char *err,
                        size_t err_len)
{
    int rows = 0;

    (void)inst;
    (void)err;
    (void)err_len;
    pthread_mutex_lock(&gate_lock);
    in_execute++;
    pthread_cond_broadcast(&gate_cond);
    while (gate_closed)
        pthread_cond_wait(&gate_cond, &gate_lock);
    in_execute--;
    pthread_mutex_unlock(&gate_lock);
    atomic_fetch_add(&n_execs, 1);
    for (size_t i = 0; i < n; i++) {
        const struct inferd_tensor *in = &reqs[i]->inputs[0];
        int64_t r = in->shape[0], w = in->shape[1];
        float *y = tensor_output_alloc((struct inferd_request *)reqs[i], "y", INFERD_TYPE_FP32, &r,
                                       1, (size_t)r * 4);
        rows += (int)r;
        for (int64_t k = 0; k < r; k++) {
            y[k] = 0;
            for (int64_t c = 0; c < w; c++)
                y[k] += ((float *)in->data)[k * w + c];
        }
    }
    int seen = atomic_load(&max_rows_seen);
    while (rows > seen && !atomic_compare_exchange_weak(&max_rows_seen, &seen, rows))
        ;
    return 0;
}

static const struct inferd_backend_api fake_api = {
    .api_version = INFERD_BACKEND_API_VERSION,
    .name = "fake",
    .execute = fake_execute,
};

/* ---- helpers ---- */

struct waiter {
    struct batch_item item;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int finished; /* times done() was called: must end up 1 */
    int rc;
    char msg[256]; /* e->msg when rc != 0 */
};

static _Atomic int n_done_calls; /* every done() call, for "exactly once" */

static void on_done(struct batch_item *item, int rc, const struct err *e)
{
    struct waiter *w = item->ctx;

    atomic_fetch_add(&n_done_calls, 1);
    pthread_mutex_lock(&w->lock);
    w->finished++;
    w->rc = rc;
    snprintf(w->msg, sizeof(w->msg), "%s", e ? e->msg : "");
    pthread_cond_signal(&w->cond);
    pthread_mutex_unlock(&w->lock);
}

static void deadline_in(struct timespec *ts, int seconds)
{
    clock_gettime(CLOCK_REALTIME, ts);
    ts->tv_sec += seconds;
}

static struct infer_request *make_request(int rows, float base)
{
    char json[4096];
    size_t off;
    struct infer_request *r = NULL;
    struct err e;

    off = (size_t)snprintf(json, sizeof(json),
                           "{\"inputs\":[{\"name\":\"x\",\"datatype\":\"FP32\",\"shape\":[%d,2],"
                           "\"data\":[",
                           rows);
    for (int i = 0; i < rows; i++)
        off += (size_t)snprintf(json + off, sizeof(json) - off, "%s%g,%g", i ? "," : "",
                                (double)(base + (float)i), 1.0);
    snprintf(json + off, sizeof(json) - off, "]}]}");
    assert_int_equal(codec_decode_v2(json, strlen(json), -1, &r, &e), 0);
    return r;
}

static void waiter_init(struct waiter *w, struct infer_request *r, uint64_t deadline_ns)
{
    memset(w, 0, sizeof(*w));
    pthread_mutex_init(&w->lock, NULL);
    pthread_cond_init(&w->cond, NULL);
    w->item.req = r;
    w->item.deadline_ns = deadline_ns;
    w->item.client_fd = -1;
    w->item.done = on_done;
    w->item.ctx = w;
}

/* The item's rc, or WAIT_TIMED_OUT when done() was not called within WAIT_S. */
static int waiter_wait(struct waiter *w)
{
    struct timespec ts;
    int rc;

    deadline_in(&ts, WAIT_S);
    pthread_mutex_lock(&w->lock);
    while (!w->finished)
        if (pthread_cond_timedwait(&w->cond, &w->lock, &ts) != 0)
            break;
    rc = w->finished ? w->rc : WAIT_TIMED_OUT;
    pthread_mutex_unlock(&w->lock);
    return rc;
}

static void set_gate(int closed)
{
    pthread_mutex_lock(&gate_lock);
    gate_closed = closed;
    pthread_cond_broadcast(&gate_cond);
    pthread_mutex_unlock(&gate_lock);
}

static void wait_in_execute(void)
{
    pthread_mutex_lock(&gate_lock);
    while (in_execute == 0)
        pthread_cond_wait(&gate_cond, &gate_lock);
    pthread_mutex_unlock(&gate_lock);
}

/* ---- tests ---- */

#define N_PRODUCERS 16
#define PER_PRODUCER 50

struct producer {
    struct batcher *b;
    int id, errors;
};

static void *producer_main(void *arg)
{
    struct producer *p = arg;

    for (int k = 0; k < PER_PRODUCER; k++) {
        int rows = 1 + (p->id + k) % 3;
        float base = (float)(p->id * 1000 + k);
        struct infer_request *r = make_request(rows, base);
        struct waiter w;
        struct err e;
        waiter_init(&w, r, 0);
        if (batcher_submit(p->b, &w.item, &e) != 0 || waiter_wait(&w) != 0 || w.finished != 1) {
            p->errors++;
        } else {
            for (int i = 0; i < rows; i++)
                if (((float *)r->outputs[0].data)[i] != base + (float)i + 1.0f)
                    p->errors++;
        }
        infer_request_destroy(r);
    }
    return NULL;
}

static void test_every_producer_gets_its_own_rows(void **state)
{
    struct batcher_config cfg = {
        .max_batch_size = 8, .max_queue_delay_us = 200, .max_queue_size = 1000, .instances = 2};
    struct producer p[N_PRODUCERS];
    pthread_t t[N_PRODUCERS];
    struct batcher *b;
    struct err e;

    (void)state;
    atomic_store(&n_execs, 0);
    atomic_store(&max_rows_seen, 0);
    assert_int_equal(batcher_create(&cfg, &fake_api, NULL, "fake", &b, &e), 0);
    for (int i = 0; i < N_PRODUCERS; i++) {
        p[i] = (struct producer){.b = b, .id = i};
        pthread_create(&t[i], NULL, producer_main, &p[i]);
    }
    for (int i = 0; i < N_PRODUCERS; i++) {
        pthread_join(t[i], NULL);
        assert_int_equal(p[i].errors, 0);
    }
    assert_true(atomic_load(&max_rows_seen) <= 8);
    /* 16 concurrent producers must have shared at least some backend calls */
    assert_true(atomic_load(&n_execs) < N_PRODUCERS * PER_PRODUCER);
    batcher_destroy(b);
}

static void test_full_queue_is_busy_and_deadline_is_answered(void **state)
{
    struct batcher_config cfg = {
        .max_batch_size = 1, .max_queue_delay_us = 0, .max_queue_size = 2, .instances = 1};
    struct waiter running, queued, late, extra;
    struct infer_request *r1 = make_request(1, 1), *r2 = make_request(1, 2),
                         *r3 = make_request(1, 3), *r4 = make_request(1, 4);
    struct batcher *b;
    struct err e;

    (void)state;
    assert_int_equal(batcher_create(&cfg, &fake_api, NULL, "fake", &b, &e), 0);
    set_gate(1);
    waiter_init(&running, r1, 0);
    assert_int_equal(batcher_submit(b, &running.item, &e), 0);
    wait_in_execute(); /* the only instance is now busy */
    waiter_init(&queued, r2, 0);
    waiter_init(&late, r3, clock_mono_ns() + 1000000); /* 1 ms */
    waiter_init(&extra, r4, 0);
    assert_int_equal(batcher_submit(b, &queued.item, &e), 0);
    assert_int_equal(batcher_submit(b, &late.item, &e), 0);
    assert_int_equal(batcher_submit(b, &extra.item, &e), ERR_BUSY);
    assert_non_null(strstr(e.msg, "max_queue_size 2"));
    /* the backend is still held: the deadline must be answered without it */
    assert_int_equal(waiter_wait(&late), ERR_TIMEOUT);
    set_gate(0);
    assert_int_equal(waiter_wait(&running), 0);
    assert_int_equal(waiter_wait(&queued), 0);
    batcher_destroy(b);
    infer_request_destroy(r1);
    infer_request_destroy(r2);
    infer_request_destroy(r3);
    infer_request_destroy(r4);
}

static void test_destroy_drains_queued_work(void **state)
{
    struct batcher_config cfg = {
        .max_batch_size = 4, .max_queue_delay_us = 0, .max_queue_size = 100, .instances = 1};
    struct waiter w[10];
    struct infer_request *r[10];
    struct batcher *b;
    struct err e;

    (void)state;
    assert_int_equal(batcher_create(&cfg, &fake_api, NULL, "fake", &b, &e), 0);
    set_gate(1);
    for (int i = 0; i < 10; i++) {
        r[i] = make_request(1, (float)i);
        waiter_init(&w[i], r[i], 0);
        assert_int_equal(batcher_submit(b, &w[i].item, &e), 0);
    }
    wait_in_execute();
    set_gate(0);
    batcher_destroy(b); /* returns only after all ten ran */
    for (int i = 0; i < 10; i++) {
        assert_int_equal(waiter_wait(&w[i]), 0);
        assert_true(((float *)r[i]->outputs[0].data)[0] == (float)i + 1.0f);
        infer_request_destroy(r[i]);
    }
}

/* ---- execute_async: a fake upstream that records requests; they end later ---- */

/*
 * A request's first value (x[0], the `base` of make_request) says how it ends: at -1000 or
 * below it fails with HTTP status -x[0] - 1000 (so -1000 is status 0, -1502 is 502);
 * otherwise it gets the row sums, as fake_execute gives. Used by both fakes below.
 */
static void end_like_upstream(struct inferd_request *req)
{
    const struct inferd_tensor *in = &req->inputs[0];
    const float *x = in->data;
    int64_t r = in->shape[0], w = in->shape[1];
    float *y;

    if (x[0] <= -1000.0f) {
        req->failed = 1;
        req->status = (int)-x[0] - 1000;
        snprintf(req->error, sizeof(req->error), "upstream said %d", req->status);
        return;
    }
    y = tensor_output_alloc(req, "y", INFERD_TYPE_FP32, &r, 1, (size_t)r * 4);
    for (int64_t k = 0; y && k < r; k++) {
        y[k] = 0;
        for (int64_t c = 0; c < w; c++)
            y[k] += x[k * w + c];
    }
}

/* the synchronous twin: the same outcomes from execute, for the status mapping of that path */
static int status_execute(void *inst, struct inferd_request *const *reqs, size_t n, char *err,
                          size_t err_len)
{
    (void)inst;
    (void)err;
    (void)err_len;
    for (size_t i = 0; i < n; i++)
        end_like_upstream(reqs[i]);
    return 0;
}

static const struct inferd_backend_api status_api = {
    .api_version = INFERD_BACKEND_API_VERSION,
    .name = "status",
    .execute = status_execute,
};

#define AFAKE_MAX 256

struct afake {
    pthread_mutex_t lock;
    pthread_cond_t cond;                    /* broadcast on every change below */
    struct inferd_request *open[AFAKE_MAX]; /* started and not yet ended, oldest first */
    int n_open;
    int max_open;               /* most open at once: the batcher's max_in_flight must hold it */
    int n_started;              /* requests execute_async accepted */
    float started_x[AFAKE_MAX]; /* x[0] of the first AFAKE_MAX started, in order */
    int n_calls;                /* execute_async calls, refused ones included */
    int refuse;                 /* refuse this many more calls (none started, non-zero rc) */
    int end_inline;             /* 1: end each request before execute_async returns */
    int overflow;               /* more than AFAKE_MAX open: must stay 0 */
    int instances_alive;        /* instance_create minus instance_destroy */
    int ended_dead;             /* requests ended with no live instance: must stay 0 */
};

static void afake_init(struct afake *f)
{
    memset(f, 0, sizeof(*f));
    pthread_mutex_init(&f->lock, NULL);
    pthread_cond_init(&f->cond, NULL);
}

static void afake_release(struct afake *f)
{
    pthread_cond_destroy(&f->cond);
    pthread_mutex_destroy(&f->lock);
}

static int afake_instance_create(void *model_state, int index, void **instance_state, char *err,
                                 size_t err_len)
{
    struct afake *f = model_state;

    (void)index;
    (void)err;
    (void)err_len;
    pthread_mutex_lock(&f->lock);
    f->instances_alive++;
    pthread_mutex_unlock(&f->lock);
    *instance_state = f;
    return 0;
}

static void afake_instance_destroy(void *instance_state)
{
    struct afake *f = instance_state;

    pthread_mutex_lock(&f->lock);
    f->instances_alive--;
    pthread_cond_broadcast(&f->cond);
    pthread_mutex_unlock(&f->lock);
}

/* Ends `req` as the upstream would, from whichever thread calls it. */
static void afake_end(struct afake *f, struct inferd_request *req)
{
    pthread_mutex_lock(&f->lock);
    if (f->instances_alive == 0)
        f->ended_dead++;
    pthread_mutex_unlock(&f->lock);
    end_like_upstream(req);
    batcher_request_done(req);
}

static int afake_execute_async(void *inst, struct inferd_request *const *reqs, size_t n, char *err,
                               size_t err_len)
{
    struct afake *f = inst;
    int rc = 0, end_inline;

    pthread_mutex_lock(&f->lock);
    f->n_calls++;
    end_inline = f->end_inline;
    if (f->refuse > 0 || f->n_open + (int)n > AFAKE_MAX) {
        if (f->refuse > 0)
            f->refuse--;
        else
            f->overflow++;
        snprintf(err, err_len, "upstream refused the batch");
        rc = 1;
    } else {
        for (size_t i = 0; i < n; i++) {
            if (f->n_started < AFAKE_MAX)
                f->started_x[f->n_started] = ((const float *)reqs[i]->inputs[0].data)[0];
            f->n_started++;
            if (!end_inline)
                f->open[f->n_open++] = reqs[i];
        }
        if (f->n_open > f->max_open)
            f->max_open = f->n_open;
    }
    pthread_cond_broadcast(&f->cond);
    pthread_mutex_unlock(&f->lock);
    /* "possibly before this call returns": each request ends, and its item may be freed, here */
    for (size_t i = 0; rc == 0 && end_inline && i < n; i++)
        afake_end(f, reqs[i]);
    return rc;
}

static const struct inferd_backend_api async_api = {
    .api_version = INFERD_BACKEND_API_VERSION,
    .name = "async",
    .instance_create = afake_instance_create,
    .instance_destroy = afake_instance_destroy,
    .execute_async = afake_execute_async,
};

/* Waits until `n_open` requests are open at once, or `total` were started and at least one is
 * open. Holds f->lock. Returns 0, or -1 after WAIT_S. */
static int afake_wait_locked(struct afake *f, int n_open, int total)
{
    struct timespec ts;

    deadline_in(&ts, WAIT_S);
    while (f->n_open == 0 || (f->n_open < n_open && f->n_started < total))
        if (pthread_cond_timedwait(&f->cond, &f->lock, &ts) != 0)
            return -1;
    return 0;
}

static int afake_wait_open(struct afake *f, int n_open)
{
    int rc;

    pthread_mutex_lock(&f->lock);
    rc = afake_wait_locked(f, n_open, INT32_MAX);
    pthread_mutex_unlock(&f->lock);
    return rc;
}

/* Removes an open request, the newest when `newest`, else the oldest. Holds f->lock. */
static struct inferd_request *take_locked(struct afake *f, int newest)
{
    struct inferd_request *req;

    if (newest)
        return f->open[--f->n_open];
    req = f->open[0];
    memmove(&f->open[0], &f->open[1], (size_t)--f->n_open * sizeof(f->open[0]));
    return req;
}

/* Waits for an open request and removes it (see take_locked); NULL after WAIT_S. */
static struct inferd_request *afake_take(struct afake *f, int newest)
{
    struct inferd_request *req = NULL;

    pthread_mutex_lock(&f->lock);
    if (afake_wait_locked(f, 1, INT32_MAX) == 0)
        req = take_locked(f, newest);
    pthread_mutex_unlock(&f->lock);
    return req;
}

static int afake_get(struct afake *f, const int *field)
{
    int v;

    pthread_mutex_lock(&f->lock);
    v = *field;
    pthread_mutex_unlock(&f->lock);
    return v;
}

/* The backend's own thread: ends `total` requests as they come. */
struct completer {
    struct afake *f;
    int total;
    int when_open;         /* end one only once this many are open (or `total` started) */
    int alternate;         /* take from both ends of the open list, so ends are out of order */
    struct batcher *probe; /* set: end nothing until batcher_destroy has begun */
    int linger_ms;         /* before each end, give a wrong destroy this long to show itself */
    uint64_t after_ns;     /* end nothing before this clock_mono_ns() */
    pthread_t thread;
    int ended, timed_out; /* read after join */
};

/* batcher_submit says ERR_UNAVAILABLE once destroy has begun; before that the test keeps the
 * queue full, so the probe is refused with ERR_BUSY and never queued. */
static int wait_stopping(struct batcher *b)
{
    struct timespec pause = {.tv_nsec = 1000000};
    uint64_t until = clock_mono_ns() + (uint64_t)WAIT_S * 1000000000ull;
    struct waiter probe;
    struct err e;
    int rc;

    waiter_init(&probe, NULL, 0);
    while ((rc = batcher_submit(b, &probe.item, &e)) == ERR_BUSY && clock_mono_ns() < until)
        nanosleep(&pause, NULL);
    return rc == ERR_UNAVAILABLE ? 0 : -1;
}

/* Waits `ms` or until the instance is destroyed, whichever comes first. A correct batcher
 * never destroys it while requests are open, so this only costs time; a wrong one gets the
 * chance to destroy it (and free itself) before the request ends, which ASan and ended_dead
 * then report. */
static void linger(struct afake *f, int ms)
{
    uint64_t until_ns = clock_mono_ns() + (uint64_t)ms * 1000000ull;
    struct timespec pause = {.tv_nsec = 1000000};

    while (afake_get(f, &f->instances_alive) > 0 && clock_mono_ns() < until_ns)
        nanosleep(&pause, NULL);
}

static void *completer_main(void *arg)
{
    struct completer *c = arg;

    struct timespec pause = {.tv_nsec = 1000000};

    if (c->probe && wait_stopping(c->probe) != 0) {
        c->timed_out = 1;
        return NULL;
    }
    while (clock_mono_ns() < c->after_ns)
        nanosleep(&pause, NULL);
    while (c->ended < c->total) {
        struct inferd_request *req = NULL;
        pthread_mutex_lock(&c->f->lock);
        if (afake_wait_locked(c->f, c->when_open, c->total) == 0)
            req = take_locked(c->f, c->alternate && c->ended % 2);
        pthread_mutex_unlock(&c->f->lock);
        if (!req) {
            c->timed_out = 1;
            return NULL;
        }
        if (c->linger_ms)
            linger(c->f, c->linger_ms);
        afake_end(c->f, req);
        c->ended++;
    }
    return NULL;
}

static void completer_start(struct completer *c)
{
    assert_int_equal(pthread_create(&c->thread, NULL, completer_main, c), 0);
}

static void completer_join(struct completer *c)
{
    pthread_join(c->thread, NULL);
    assert_int_equal(c->timed_out, 0);
    assert_int_equal(c->ended, c->total);
}

/* ---- execute_async tests ---- */

static void test_async_every_item_done_once_with_its_rows(void **state)
{
    struct batcher_config cfg = {.max_batch_size = 4,
                                 .max_queue_delay_us = 200,
                                 .max_queue_size = 1000,
                                 .instances = 3, /* ignored: one dispatcher */
                                 .max_in_flight = 8};
    struct completer c = {.total = N_PRODUCERS * PER_PRODUCER, .alternate = 1};
    struct producer p[N_PRODUCERS];
    pthread_t t[N_PRODUCERS];
    struct afake f;
    struct batcher *b;
    struct err e;

    (void)state;
    afake_init(&f);
    c.f = &f;
    atomic_store(&n_done_calls, 0);
    assert_int_equal(batcher_create(&cfg, &async_api, &f, "fake", &b, &e), 0);
    assert_int_equal(afake_get(&f, &f.instances_alive), 1);
    completer_start(&c);
    for (int i = 0; i < N_PRODUCERS; i++) {
        p[i] = (struct producer){.b = b, .id = i};
        pthread_create(&t[i], NULL, producer_main, &p[i]);
    }
    for (int i = 0; i < N_PRODUCERS; i++) {
        pthread_join(t[i], NULL);
        assert_int_equal(p[i].errors, 0);
    }
    completer_join(&c);
    batcher_destroy(b);
    assert_int_equal(atomic_load(&n_done_calls), N_PRODUCERS * PER_PRODUCER);
    assert_int_equal(f.n_started, N_PRODUCERS * PER_PRODUCER);
    assert_true(f.max_open <= 8);
    assert_int_equal(f.overflow, 0);
    assert_int_equal(f.instances_alive, 0);
    assert_int_equal(f.ended_dead, 0);
    afake_release(&f);
}

#define N_LIMITED 20

static void test_async_max_in_flight_holds(void **state)
{
    struct batcher_config cfg = {
        .max_batch_size = 2, .max_queue_size = 100, .instances = 1, .max_in_flight = 3};
    /* the completer ends one only when three are open: the dispatcher refills each place */
    struct completer c = {.total = N_LIMITED, .when_open = 3};
    struct infer_request *r[N_LIMITED];
    struct waiter w[N_LIMITED];
    struct afake f;
    struct batcher *b;
    struct err e;

    (void)state;
    afake_init(&f);
    c.f = &f;
    atomic_store(&n_done_calls, 0);
    assert_int_equal(batcher_create(&cfg, &async_api, &f, "fake", &b, &e), 0);
    for (int i = 0; i < N_LIMITED; i++) {
        r[i] = make_request(1 + i % 2, (float)(i * 10));
        waiter_init(&w[i], r[i], 0);
        assert_int_equal(batcher_submit(b, &w[i].item, &e), 0);
    }
    /* with nothing ended, three start and seventeen wait */
    assert_int_equal(afake_wait_open(&f, 3), 0);
    assert_int_equal(batcher_pending(b), N_LIMITED - 3);
    assert_int_equal(afake_get(&f, &f.n_started), 3);
    completer_start(&c);
    for (int i = 0; i < N_LIMITED; i++) {
        assert_int_equal(waiter_wait(&w[i]), 0);
        assert_int_equal(w[i].finished, 1);
        assert_true(((float *)r[i]->outputs[0].data)[0] == (float)(i * 10) + 1.0f);
    }
    completer_join(&c);
    batcher_destroy(b);
    assert_int_equal(f.max_open, 3);
    assert_int_equal(f.n_started, N_LIMITED);
    assert_int_equal(atomic_load(&n_done_calls), N_LIMITED);
    for (int i = 0; i < N_LIMITED; i++)
        infer_request_destroy(r[i]);
    afake_release(&f);
}

#define N_DEFAULT 70

static void test_async_max_in_flight_defaults_to_64(void **state)
{
    struct batcher_config cfg = {.max_batch_size = 8, .max_queue_size = 100, .instances = 1};
    struct infer_request *r[N_DEFAULT];
    struct waiter w[N_DEFAULT];
    struct afake f;
    struct batcher *b;
    struct err e;

    (void)state;
    afake_init(&f);
    assert_int_equal(batcher_create(&cfg, &async_api, &f, "fake", &b, &e), 0);
    for (int i = 0; i < N_DEFAULT; i++) {
        r[i] = make_request(1, (float)i);
        waiter_init(&w[i], r[i], 0);
        assert_int_equal(batcher_submit(b, &w[i].item, &e), 0);
    }
    assert_int_equal(afake_wait_open(&f, 64), 0);
    assert_int_equal(batcher_pending(b), N_DEFAULT - 64);
    for (int i = 0; i < N_DEFAULT; i++) {
        struct inferd_request *req = afake_take(&f, 0);
        assert_non_null(req);
        afake_end(&f, req);
    }
    for (int i = 0; i < N_DEFAULT; i++) {
        assert_int_equal(waiter_wait(&w[i]), 0);
        assert_true(((float *)r[i]->outputs[0].data)[0] == (float)i + 1.0f);
        infer_request_destroy(r[i]);
    }
    batcher_destroy(b);
    assert_int_equal(f.max_open, 64);
    afake_release(&f);
}

/* bases for end_like_upstream: -1000 - status fails with that status */
static const struct {
    float base;
    int rc;
} outcomes[] = {
    {-1400, ERR_INVALID},   {-1413, ERR_TOO_LARGE}, {-1422, ERR_SHAPE},       {-1429, ERR_BUSY},
    {-1499, ERR_CANCELLED}, {-1502, ERR_UPSTREAM},  {-1503, ERR_UNAVAILABLE}, {-1504, ERR_TIMEOUT},
    {-1000, ERR_BACKEND},   {-1500, ERR_BACKEND},   {-1404, ERR_BACKEND},     {7, 0},
};
#define N_OUTCOMES (sizeof(outcomes) / sizeof(outcomes[0]))

/* Runs every outcome through `api`; with `f`, the test ends the requests itself. */
static void check_outcomes(const struct inferd_backend_api *api, struct afake *f)
{
    struct batcher_config cfg = {
        .max_batch_size = 4, .max_queue_size = 100, .instances = 1, .max_in_flight = 4};
    struct infer_request *r[N_OUTCOMES];
    struct waiter w[N_OUTCOMES];
    struct batcher *b;
    struct err e;
    char want[64];

    assert_int_equal(batcher_create(&cfg, api, f, "fake", &b, &e), 0);
    for (size_t i = 0; i < N_OUTCOMES; i++) {
        r[i] = make_request(1, outcomes[i].base);
        waiter_init(&w[i], r[i], 0);
        assert_int_equal(batcher_submit(b, &w[i].item, &e), 0);
    }
    for (size_t i = 0; f && i < N_OUTCOMES; i++) {
        struct inferd_request *req = afake_take(f, i % 2);
        assert_non_null(req);
        afake_end(f, req);
    }
    for (size_t i = 0; i < N_OUTCOMES; i++) {
        int status = (int)-outcomes[i].base - 1000;
        assert_int_equal(waiter_wait(&w[i]), outcomes[i].rc);
        assert_int_equal(w[i].finished, 1);
        if (outcomes[i].rc == ERR_CANCELLED) {
            assert_string_equal(w[i].msg, "model 'fake': cancelled");
        } else if (outcomes[i].rc != 0) {
            /* the message names the model and keeps the backend's words */
            snprintf(want, sizeof(want), "model 'fake': upstream said %d", status);
            assert_string_equal(w[i].msg, want);
        } else {
            assert_true(((float *)r[i]->outputs[0].data)[0] == outcomes[i].base + 1.0f);
        }
    }
    batcher_destroy(b);
    for (size_t i = 0; i < N_OUTCOMES; i++)
        infer_request_destroy(r[i]);
}

static void test_async_failure_status_maps_to_err(void **state)
{
    struct afake f;

    (void)state;
    afake_init(&f);
    check_outcomes(&async_api, &f);
    assert_int_equal(f.n_started, (int)N_OUTCOMES);
    afake_release(&f);
}

static void test_sync_failure_status_maps_to_err(void **state)
{
    (void)state;
    check_outcomes(&status_api, NULL);
}

static void test_async_cancel_queued_and_started(void **state)
{
    struct batcher_config cfg = {
        .max_batch_size = 1, .max_queue_size = 100, .instances = 1, .max_in_flight = 1};
    struct infer_request *ra = make_request(1, 1), *rb = make_request(1, 2),
                         *rc = make_request(1, 3), *rd = make_request(1, 4),
                         *re = make_request(1, 5);
    struct waiter a, qb, c, qd, last;
    struct inferd_request *req;
    int sa[2], sd[2];
    struct afake f;
    struct batcher *b;
    struct err e;

    (void)state;
    afake_init(&f);
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sa), 0);
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sd), 0);
    assert_int_equal(batcher_create(&cfg, &async_api, &f, "fake", &b, &e), 0);

    /* a started request: cancelling its item is what request_cancelled reports */
    waiter_init(&a, ra, 0);
    assert_int_equal(batcher_submit(b, &a.item, &e), 0);
    assert_int_equal(afake_wait_open(&f, 1), 0);
    assert_int_equal(batcher_request_cancelled(&ra->abi), 0);
    /* a queued one (the only place is taken) is answered by the sweeper, never started */
    waiter_init(&qb, rb, 0);
    assert_int_equal(batcher_submit(b, &qb.item, &e), 0);
    batch_item_cancel(&qb.item);
    assert_int_equal(waiter_wait(&qb), ERR_CANCELLED);
    assert_non_null(strstr(qb.msg, "cancelled"));
    batch_item_cancel(&a.item);
    assert_int_equal(batcher_request_cancelled(&ra->abi), 1);
    /* the backend stops and says so */
    req = afake_take(&f, 0);
    assert_ptr_equal(req, &ra->abi);
    req->failed = 1;
    req->status = 499;
    batcher_request_done(req);
    assert_int_equal(waiter_wait(&a), ERR_CANCELLED);

    /* the same through the client's socket: started, then queued */
    waiter_init(&c, rc, 0);
    c.item.client_fd = sa[0];
    assert_int_equal(batcher_submit(b, &c.item, &e), 0);
    assert_int_equal(afake_wait_open(&f, 1), 0);
    assert_int_equal(batcher_request_cancelled(&rc->abi), 0);
    close(sa[1]);
    assert_int_equal(batcher_request_cancelled(&rc->abi), 1);
    waiter_init(&qd, rd, 0);
    qd.item.client_fd = sd[0];
    assert_int_equal(batcher_submit(b, &qd.item, &e), 0);
    close(sd[1]);
    assert_int_equal(waiter_wait(&qd), ERR_CANCELLED);
    assert_non_null(strstr(qd.msg, "closed the connection"));
    req = afake_take(&f, 0);
    assert_ptr_equal(req, &rc->abi);
    afake_end(&f, req); /* a backend may still finish it: the answer is then the result */
    assert_int_equal(waiter_wait(&c), 0);

    /* the place is free again and a good request still runs */
    waiter_init(&last, re, 0);
    assert_int_equal(batcher_submit(b, &last.item, &e), 0);
    req = afake_take(&f, 0);
    assert_ptr_equal(req, &re->abi);
    afake_end(&f, req);
    assert_int_equal(waiter_wait(&last), 0);
    assert_true(((float *)re->outputs[0].data)[0] == 6.0f);
    batcher_destroy(b);

    /* the backend saw 1, 3 and 5; never the cancelled 2 and 4 */
    assert_int_equal(f.n_started, 3);
    assert_true(f.started_x[0] == 1.0f && f.started_x[1] == 3.0f && f.started_x[2] == 5.0f);
    close(sa[0]);
    close(sd[0]);
    infer_request_destroy(ra);
    infer_request_destroy(rb);
    infer_request_destroy(rc);
    infer_request_destroy(rd);
    infer_request_destroy(re);
    afake_release(&f);
}

static void test_async_refused_batch_fails_and_frees_places(void **state)
{
    struct batcher_config cfg = {
        .max_batch_size = 1, .max_queue_size = 100, .instances = 1, .max_in_flight = 2};
    struct infer_request *r[4];
    struct waiter w[4];
    struct afake f;
    struct batcher *b;
    struct err e;

    (void)state;
    afake_init(&f);
    f.refuse = 2; /* both places' first batches: leaked places would stall the last two */
    assert_int_equal(batcher_create(&cfg, &async_api, &f, "fake", &b, &e), 0);
    for (int i = 0; i < 4; i++) {
        r[i] = make_request(1, (float)i);
        waiter_init(&w[i], r[i], 0);
        assert_int_equal(batcher_submit(b, &w[i].item, &e), 0);
    }
    for (int i = 0; i < 2; i++) {
        assert_int_equal(waiter_wait(&w[i]), ERR_BACKEND);
        assert_string_equal(w[i].msg, "model 'fake': upstream refused the batch");
    }
    assert_int_equal(afake_wait_open(&f, 2), 0);
    for (int i = 0; i < 2; i++) {
        struct inferd_request *req = afake_take(&f, 0);
        assert_non_null(req);
        afake_end(&f, req);
    }
    for (int i = 2; i < 4; i++) {
        assert_int_equal(waiter_wait(&w[i]), 0);
        assert_true(((float *)r[i]->outputs[0].data)[0] == (float)i + 1.0f);
    }
    batcher_destroy(b);
    assert_int_equal(f.n_calls, 4);
    assert_int_equal(f.n_started, 2);
    for (int i = 0; i < 4; i++) {
        assert_int_equal(w[i].finished, 1);
        infer_request_destroy(r[i]);
    }
    afake_release(&f);
}

static void test_async_ended_inside_execute_async(void **state)
{
    struct batcher_config cfg = {
        .max_batch_size = 3, .max_queue_size = 100, .instances = 1, .max_in_flight = 2};
    struct infer_request *r[10];
    struct waiter w[10];
    struct afake f;
    struct batcher *b;
    struct err e;

    (void)state;
    afake_init(&f);
    f.end_inline = 1;
    assert_int_equal(batcher_create(&cfg, &async_api, &f, "fake", &b, &e), 0);
    for (int i = 0; i < 10; i++) {
        r[i] = make_request(1 + i % 3, (float)i);
        waiter_init(&w[i], r[i], 0);
        assert_int_equal(batcher_submit(b, &w[i].item, &e), 0);
    }
    for (int i = 0; i < 10; i++) {
        assert_int_equal(waiter_wait(&w[i]), 0);
        assert_true(((float *)r[i]->outputs[0].data)[0] == (float)i + 1.0f);
        infer_request_destroy(r[i]);
    }
    batcher_destroy(b);
    assert_int_equal(f.n_started, 10);
    afake_release(&f);
}

static void test_async_destroy_waits_for_requests_in_flight(void **state)
{
    /* two started, two queued, and the queue full so the completer's probe is refused */
    struct batcher_config cfg = {
        .max_batch_size = 1, .max_queue_size = 2, .instances = 1, .max_in_flight = 2};
    struct completer c = {.total = 4, .linger_ms = 50};
    struct infer_request *r[4];
    struct waiter w[4];
    struct afake f;
    struct batcher *b;
    struct err e;

    (void)state;
    afake_init(&f);
    c.f = &f;
    assert_int_equal(batcher_create(&cfg, &async_api, &f, "fake", &b, &e), 0);
    for (int i = 0; i < 2; i++) {
        r[i] = make_request(1, (float)i);
        waiter_init(&w[i], r[i], 0);
        assert_int_equal(batcher_submit(b, &w[i].item, &e), 0);
    }
    assert_int_equal(afake_wait_open(&f, 2), 0);
    for (int i = 2; i < 4; i++) {
        r[i] = make_request(1, (float)i);
        waiter_init(&w[i], r[i], 0);
        assert_int_equal(batcher_submit(b, &w[i].item, &e), 0);
    }
    assert_int_equal(batcher_pending(b), 2);
    /* the completer ends nothing until destroy has begun, so destroy must wait for it */
    c.probe = b;
    completer_start(&c);
    batcher_destroy(b);
    completer_join(&c);
    for (int i = 0; i < 4; i++) {
        assert_int_equal(waiter_wait(&w[i]), 0);
        assert_int_equal(w[i].finished, 1);
        assert_true(((float *)r[i]->outputs[0].data)[0] == (float)i + 1.0f);
        infer_request_destroy(r[i]);
    }
    assert_int_equal(f.ended_dead, 0);
    assert_int_equal(f.instances_alive, 0);
    assert_int_equal(f.n_started, 4);
    afake_release(&f);
}

static void test_async_expired_while_draining_frees_its_place(void **state)
{
    /* one place, held by `a`; `late` and `c` queued (full, for the probe) */
    struct batcher_config cfg = {
        .max_batch_size = 1, .max_queue_size = 2, .instances = 1, .max_in_flight = 1};
    struct infer_request *ra = make_request(1, 1), *rl = make_request(1, 2),
                         *rc = make_request(1, 3);
    struct completer c = {.total = 2};
    struct waiter a, late, wc;
    struct afake f;
    struct batcher *b;
    struct err e;

    (void)state;
    afake_init(&f);
    c.f = &f;
    assert_int_equal(batcher_create(&cfg, &async_api, &f, "fake", &b, &e), 0);
    waiter_init(&a, ra, 0);
    assert_int_equal(batcher_submit(b, &a.item, &e), 0);
    assert_int_equal(afake_wait_open(&f, 1), 0);
    /* the sweeper stops with destroy; `late` expires after that, while it waits for the place,
     * so the dispatcher must answer it and give the place to `c` */
    waiter_init(&late, rl, clock_mono_ns() + 200000000ull);
    waiter_init(&wc, rc, 0);
    assert_int_equal(batcher_submit(b, &late.item, &e), 0);
    assert_int_equal(batcher_submit(b, &wc.item, &e), 0);
    c.probe = b;
    c.after_ns = late.item.deadline_ns + 1000000;
    completer_start(&c);
    batcher_destroy(b);
    completer_join(&c);
    assert_int_equal(waiter_wait(&a), 0);
    assert_int_equal(waiter_wait(&late), ERR_TIMEOUT);
    assert_int_equal(waiter_wait(&wc), 0);
    assert_true(((float *)rc->outputs[0].data)[0] == 4.0f);
    assert_int_equal(f.n_started, 2);
    infer_request_destroy(ra);
    infer_request_destroy(rl);
    infer_request_destroy(rc);
    afake_release(&f);
}

static void test_api_1_ignores_execute_async(void **state)
{
    /* a plugin built for API 1 has no execute_async field: whatever lies there is not called */
    static const struct inferd_backend_api v1_api = {
        .api_version = 1,
        .name = "v1",
        .instance_create = afake_instance_create,
        .instance_destroy = afake_instance_destroy,
        .execute = fake_execute,
        .execute_async = afake_execute_async,
    };
    struct batcher_config cfg = {
        .max_batch_size = 4, .max_queue_size = 10, .instances = 2, .max_in_flight = 1};
    struct infer_request *r[4];
    struct waiter w[4];
    struct afake f;
    struct batcher *b;
    struct err e;

    (void)state;
    afake_init(&f);
    assert_int_equal(batcher_create(&cfg, &v1_api, &f, "fake", &b, &e), 0);
    for (int i = 0; i < 4; i++) {
        r[i] = make_request(1, (float)i);
        waiter_init(&w[i], r[i], 0);
        assert_int_equal(batcher_submit(b, &w[i].item, &e), 0);
    }
    for (int i = 0; i < 4; i++) {
        assert_int_equal(waiter_wait(&w[i]), 0);
        assert_true(((float *)r[i]->outputs[0].data)[0] == (float)i + 1.0f);
        infer_request_destroy(r[i]);
    }
    batcher_destroy(b);
    assert_int_equal(f.n_calls, 0);
    afake_release(&f);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_every_producer_gets_its_own_rows),
        cmocka_unit_test(test_full_queue_is_busy_and_deadline_is_answered),
        cmocka_unit_test(test_destroy_drains_queued_work),
        cmocka_unit_test(test_async_every_item_done_once_with_its_rows),
        cmocka_unit_test(test_async_max_in_flight_holds),
        cmocka_unit_test(test_async_max_in_flight_defaults_to_64),
        cmocka_unit_test(test_async_failure_status_maps_to_err),
        cmocka_unit_test(test_sync_failure_status_maps_to_err),
        cmocka_unit_test(test_async_cancel_queued_and_started),
        cmocka_unit_test(test_async_refused_batch_fails_and_frees_places),
        cmocka_unit_test(test_async_ended_inside_execute_async),
        cmocka_unit_test(test_async_destroy_waits_for_requests_in_flight),
        cmocka_unit_test(test_async_expired_while_draining_frees_its_place),
        cmocka_unit_test(test_api_1_ignores_execute_async),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
