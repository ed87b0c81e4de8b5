/*
 * test_queue_writer.c: the group-commit writer the SQLite and PostgreSQL stores share
 * (queue/writer.h), on its own: a fake store whose writer thread answers each operation
 * without a database. What the stores do with a group is the contract suite's (test_queue.c).
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "core/clock.h"
#include "queue/writer.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct fake {
    struct queue base;
    struct queue_writer w;
    pthread_t thread;
    /* written by the fake's writer thread; read after it ended, or under w.lock */
    size_t n_groups, max_group_seen, n_ops, n_leases;
};

/* Answers one operation as a store would. */
static void answer(struct fake *f, struct queue_op *o)
{
    f->n_ops++;
    switch (o->kind) {
    case QUEUE_OP_ENQUEUE:
        snprintf(o->id_out, sizeof(o->id_out), "job-%zu", f->n_ops);
        o->existed = o->spec && o->spec->idempotency_key;
        break;
    case QUEUE_OP_COMPLETE:
        if (strcmp(o->id, "fenced") == 0)
            o->rc = err_set(&o->err, ERR_CONFLICT, "job 'fenced': not this attempt's");
        break;
    case QUEUE_OP_FAIL:
        if (strcmp(o->id, "gone") == 0)
            o->rc = err_set(&o->err, ERR_NOT_FOUND, "job 'gone' not found");
        else
            o->failed_final = !o->retryable;
        break;
    case QUEUE_OP_LEASE:
        f->n_leases++;
        break;
    default:
        break;
    }
}

static void *fake_writer_main(void *arg)
{
    struct fake *f = arg;
    struct queue_op *ops;

    while (queue_writer_take(&f->w, -1, &ops)) {
        size_t n = 0;
        for (struct queue_op *o = ops; o; o = o->next, n++)
            answer(f, o);
        pthread_mutex_lock(&f->w.lock);
        f->n_groups++;
        if (n > f->max_group_seen)
            f->max_group_seen = n;
        pthread_mutex_unlock(&f->w.lock);
        queue_writer_done(&f->w, ops, 0);
    }
    return NULL;
}

static struct fake *fake_open(size_t max_group, int start)
{
    struct fake *f = calloc(1, sizeof(*f));

    assert_non_null(f);
    queue_writer_init(&f->w, max_group, 60000);
    f->base.writer = &f->w;
    if (start)
        assert_int_equal(pthread_create(&f->thread, NULL, fake_writer_main, f), 0);
    return f;
}

static void fake_close(struct fake *f)
{
    queue_writer_stop(&f->w);
    pthread_join(f->thread, NULL);
    queue_writer_release(&f->w);
    free(f);
}

struct answers {
    int n;
    int rc[16];
    char id[16][40];
};

static void on_enqueued(void *ctx, int rc, const struct err *e, const char *id, int existed)
{
    struct answers *a = ctx;

    (void)e;
    (void)existed;
    a->rc[a->n] = rc;
    snprintf(a->id[a->n], sizeof(a->id[0]), "%s", id);
    a->n++;
}

/* Operations queued while the writer is busy run in groups of at most max_group, in order;
 * each asynchronous one is called back once, after its group, and freed (ASan: no leak). */
static void test_groups_and_async(void **state)
{
    struct fake *f = fake_open(4, 0);
    struct job_spec spec = {0};
    struct answers a = {0};
    struct err e = {0};

    (void)state;
    for (int i = 0; i < 10; i++)
        assert_int_equal(queue_writer_enqueue_async(&f->base, &spec, on_enqueued, &a, &e), 0);
    assert_int_equal(pthread_create(&f->thread, NULL, fake_writer_main, f), 0);
    /* a synchronous one after them: when it returns, the groups before it were handed back */
    char id[40];
    int existed = -1;
    assert_int_equal(queue_writer_enqueue(&f->base, &spec, id, &existed, &e), 0);
    assert_string_equal(id, "job-11");
    assert_int_equal(existed, 0);
    pthread_mutex_lock(&f->w.lock);
    assert_int_equal(f->max_group_seen, 4);
    /* 4, 4, then 2 with or without the synchronous one (it may come after they were taken) */
    assert_true(f->n_groups == 3 || f->n_groups == 4);
    pthread_mutex_unlock(&f->w.lock);
    /* the callbacks of a group run after it was handed back, on the writer thread: the
     * last group's may still run; closing joins the thread */
    fake_close(f);
    assert_int_equal(a.n, 10);
    for (int i = 0; i < 10; i++) {
        char want[40];
        snprintf(want, sizeof(want), "job-%d", i + 1);
        assert_int_equal(a.rc[i], 0);
        assert_string_equal(a.id[i], want);
    }
}

/* finish_many maps each outcome to its operation and back; a fenced-out one (ERR_CONFLICT)
 * is that outcome's answer only, the first other failure is the call's. */
static void test_finish_many(void **state)
{
    struct fake *f = fake_open(512, 1);
    struct queue_outcome outs[4] = {
        {.id = "a", .token = 1, .ok = 1, .result = "{}", .result_len = 2},
        {.id = "fenced", .token = 1, .ok = 1, .result = "{}", .result_len = 2},
        {.id = "b", .token = 1, .ok = 0, .error = "boom", .retryable = 0},
        {.id = "gone", .token = 1, .ok = 0, .error = "boom", .retryable = 1},
    };
    struct err e = {0};

    (void)state;
    assert_int_equal(queue_writer_finish_many(&f->base, outs, 4, &e), ERR_NOT_FOUND);
    assert_string_equal(e.msg, "job 'gone' not found");
    assert_int_equal(outs[0].rc, 0);
    assert_int_equal(outs[1].rc, ERR_CONFLICT);
    assert_int_equal(outs[2].rc, 0);
    assert_int_equal(outs[2].failed_final, 1);
    assert_int_equal(outs[3].rc, ERR_NOT_FOUND);
    assert_int_equal(outs[3].failed_final, 0);
    pthread_mutex_lock(&f->w.lock);
    assert_int_equal(f->n_groups, 1); /* one commit for all four */
    pthread_mutex_unlock(&f->w.lock);
    fake_close(f);
}

struct lease_call {
    struct fake *f;
    struct job *jobs[2];
    size_t n;
    int rc;
    struct err e;
};

static void *lease_thread(void *arg)
{
    struct lease_call *c = arg;

    c->rc = queue_writer_lease_many(&c->f->base, "w1", 2, 0, 60000, c->jobs, &c->n, &c->e);
    return NULL;
}

/* Stopping: an idle lease returns at once with nothing (not an error), later calls are
 * refused with the reason, an asynchronous one is freed without a callback, and the writer
 * thread ends. */
static void test_stop(void **state)
{
    struct fake *f = fake_open(512, 1);
    struct lease_call c = {.f = f};
    struct answers a = {0};
    struct job_spec spec = {0};
    struct job *out = NULL;
    pthread_t t;

    (void)state;
    assert_int_equal(pthread_create(&t, NULL, lease_thread, &c), 0);
    /* wait until the lease found nothing and sleeps */
    int64_t deadline = clock_mono_ms() + 10000;
    for (;;) {
        pthread_mutex_lock(&f->w.lock);
        size_t n = f->n_leases;
        pthread_mutex_unlock(&f->w.lock);
        if (n > 0)
            break;
        assert_true(clock_mono_ms() < deadline); /* the lease never reached the writer */
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    queue_writer_stop(&f->w);
    pthread_join(t, NULL);
    /* it saw `stopping` while it waited: had it looked again, the store would have refused */
    assert_int_equal(c.rc, 0);
    assert_int_equal(c.n, 0);

    struct err e = {0};
    assert_int_equal(queue_writer_cancel(&f->base, "x", &out, &e), ERR_UNAVAILABLE);
    assert_string_equal(e.msg, "the job store is closing");
    assert_null(out);
    e = (struct err){0};
    assert_int_equal(queue_writer_enqueue_async(&f->base, &spec, on_enqueued, &a, &e),
                     ERR_UNAVAILABLE);
    assert_string_equal(e.msg, "the job store is closing");
    pthread_join(f->thread, NULL);
    assert_int_equal(a.n, 0);
    queue_writer_release(&f->w);
    free(f);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_groups_and_async),
        cmocka_unit_test(test_finish_many),
        cmocka_unit_test(test_stop),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
