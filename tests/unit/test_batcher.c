/*
 * test_batcher.c: dynamic batching with a fake backend that sums rows: every producer gets
 * exactly its own rows back, batches never exceed max_batch_size, a full queue says ERR_BUSY,
 * a deadline that passes while the backend is busy is answered at once, and destroy drains.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "model/batcher.h"
#include "model/codec.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

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
    int finished, rc;
};

static void on_done(struct batch_item *item, int rc, const struct err *e)
{
    struct waiter *w = item->ctx;

    (void)e;
    pthread_mutex_lock(&w->lock);
    w->finished = 1;
    w->rc = rc;
    pthread_cond_signal(&w->cond);
    pthread_mutex_unlock(&w->lock);
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

static int waiter_wait(struct waiter *w)
{
    pthread_mutex_lock(&w->lock);
    while (!w->finished)
        pthread_cond_wait(&w->cond, &w->lock);
    pthread_mutex_unlock(&w->lock);
    return w->rc;
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
        if (batcher_submit(p->b, &w.item, &e) != 0 || waiter_wait(&w) != 0) {
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
    waiter_init(&late, r3, batcher_now_ns() + 1000000); /* 1 ms */
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

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_every_producer_gets_its_own_rows),
        cmocka_unit_test(test_full_queue_is_busy_and_deadline_is_answered),
        cmocka_unit_test(test_destroy_drains_queued_work),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
