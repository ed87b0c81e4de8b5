/*
 * test_queue.c: the job queue through its public interface: lifecycle, priority and FIFO
 * order, fencing tokens, retries up to max_attempts, cancel, ttl expiry, idempotency,
 * admission, and recovery of running jobs when the store is reopened (SQLite) or their lease
 * runs out (Redis). With $INFERD_TEST_REDIS set (tests/unit/with_redis runs a redis-server),
 * the same tests run against the Redis queue. Fault injection (queue_fault_hook) fails one
 * element of each array a store hands out, first and mid-array, so ASan sees the error paths.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "queue/queue.h"
#include "queue/queue_internal.h" /* queue_fault_hook */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static char dir[256];

static const char *redis_url(void)
{
    const char *u = getenv("INFERD_TEST_REDIS");
    return u && u[0] ? u : NULL;
}

static struct queue *open_queue_kept(int64_t max_queued, int64_t result_ttl_s)
{
    struct queue_config cfg = {.url = redis_url(),
                               .data_dir = dir,
                               .max_queued = max_queued,
                               .retry_backoff_ms = 0,
                               .result_ttl_s = result_ttl_s,
                               .result_inline_max_bytes = 1024};
    struct queue *q = NULL;
    struct err e = {0};

    assert_int_equal(queue_open(&cfg, &q, &e), 0);
    return q;
}

static struct queue *open_queue(int64_t max_queued)
{
    return open_queue_kept(max_queued, 0);
}

static int setup(void **state)
{
    (void)state;
    snprintf(dir, sizeof(dir), "/tmp/inferd-test-queue-XXXXXX");
    assert_non_null(mkdtemp(dir));
    if (redis_url()) {
        char cmd[512];
        snprintf(cmd, sizeof(cmd), "redis-cli -u '%s' FLUSHALL >/dev/null", redis_url());
        assert_int_equal(system(cmd), 0);
    }
    return 0;
}

static int teardown(void **state)
{
    char cmd[300];

    (void)state;
    queue_fault_hook = NULL;
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
    return 0;
}

static void enqueue(struct queue *q, int priority, const char *input, char id[40])
{
    struct job_spec spec = {.model = "m",
                            .input = input,
                            .input_len = strlen(input),
                            .input_json_len = -1,
                            .priority = priority,
                            .max_attempts = 2,
                            .lease_timeout_ms = 60000};
    struct err e = {0};
    int existed = 0;

    assert_int_equal(queue_enqueue(q, &spec, id, &existed, &e), 0);
    assert_int_equal(existed, 0);
}

static struct job *lease(struct queue *q)
{
    struct job *j = NULL;
    struct err e = {0};

    assert_int_equal(queue_lease(q, "w", 0, &j, &e), 0);
    return j;
}

static void test_lifecycle_and_order(void **state)
{
    struct queue *q = open_queue(100);
    char a[40], b[40], c[40], d[40];
    struct job *j;
    struct err e = {0};

    (void)state;
    enqueue(q, 0, "{\"a\":1}", a);
    enqueue(q, 9, "{\"b\":1}", b);
    enqueue(q, 5, "{\"c\":1}", c);
    enqueue(q, 9, "{\"d\":1}", d);
    assert_int_equal(queue_queued(q), 4);
    /* priority first, FIFO within a priority */
    const char *order[] = {b, d, c, a};
    for (int i = 0; i < 4; i++) {
        j = lease(q);
        assert_non_null(j);
        assert_string_equal(j->id, order[i]);
        assert_int_equal(j->state, JOB_RUNNING);
        assert_int_equal(j->attempts, 1);
        assert_true(j->input.len > 0);
        assert_int_equal(queue_complete(q, j->id, j->token, "{\"r\":1}", 7, -1, &e), 0);
        job_free(j);
    }
    assert_null(lease(q));
    assert_int_equal(queue_get(q, a, 1, &j, &e), 0);
    assert_int_equal(j->state, JOB_SUCCEEDED);
    assert_memory_equal(j->result.data, "{\"r\":1}", 7);
    job_free(j);
    queue_close(q);
}

static void test_fencing_retry_and_dead_letter(void **state)
{
    struct queue *q = open_queue(100);
    struct job *j1, *j2, *j;
    struct err e = {0};
    char id[40];

    (void)state;
    enqueue(q, 0, "{}", id);
    j1 = lease(q);
    /* the first attempt fails and is retried (backoff 0); the stale token is then fenced */
    assert_int_equal(queue_fail(q, id, j1->token, "boom 1", 1, &e), 0);
    j2 = lease(q);
    assert_non_null(j2);
    assert_int_equal(j2->attempts, 2);
    assert_int_equal(queue_complete(q, id, j1->token, "{}", 2, -1, &e), ERR_CONFLICT);
    assert_int_equal(queue_extend(q, id, j1->token, 1000, &e), ERR_CONFLICT);
    assert_int_equal(queue_extend(q, id, j2->token, 1000, &e), 0);
    /* last attempt fails: dead letter with the last error */
    assert_int_equal(queue_fail(q, id, j2->token, "boom 2", 1, &e), 0);
    assert_int_equal(queue_get(q, id, 0, &j, &e), 0);
    assert_int_equal(j->state, JOB_FAILED);
    assert_string_equal(j->error, "boom 2");
    job_free(j);
    /* redrive */
    assert_int_equal(queue_retry(q, id, &j, &e), 0);
    assert_int_equal(j->state, JOB_QUEUED);
    job_free(j);
    job_free(j1);
    job_free(j2);
    j = lease(q);
    assert_non_null(j);
    assert_int_equal(queue_fail(q, id, j->token, "not retryable", 0, &e), 0);
    job_free(j);
    assert_int_equal(queue_get(q, id, 0, &j, &e), 0);
    assert_int_equal(j->state, JOB_FAILED);
    job_free(j);
    queue_close(q);
}

static void test_cancel(void **state)
{
    struct queue *q = open_queue(100);
    struct job *j, *running;
    struct err e = {0};
    char queued[40], run[40];

    (void)state;
    enqueue(q, 9, "{}", run);
    enqueue(q, 0, "{}", queued);
    running = lease(q);
    assert_string_equal(running->id, run);
    assert_int_equal(queue_cancel(q, queued, &j, &e), 0);
    assert_int_equal(j->state, JOB_CANCELLED);
    job_free(j);
    assert_int_equal(queue_cancel(q, queued, &j, &e), ERR_CONFLICT);
    /* running: marked now, cancelled when it reports, result discarded */
    assert_int_equal(queue_cancel(q, run, &j, &e), 0);
    assert_int_equal(j->state, JOB_RUNNING);
    assert_int_equal(j->cancel_requested, 1);
    job_free(j);
    assert_int_equal(queue_complete(q, run, running->token, "{}", 2, -1, &e), 0);
    assert_int_equal(queue_get(q, run, 1, &j, &e), 0);
    assert_int_equal(j->state, JOB_CANCELLED);
    assert_int_equal(j->result.len, 0);
    job_free(j);
    job_free(running);
    assert_null(lease(q));
    queue_close(q);
}

static void test_idempotency_and_admission(void **state)
{
    struct queue *q = open_queue(2);
    struct job_spec spec = {.model = "m",
                            .input = "{}",
                            .input_len = 2,
                            .input_json_len = -1,
                            .max_attempts = 1,
                            .lease_timeout_ms = 1000,
                            .idempotency_key = "k1",
                            .request_hash = "h1"};
    char id1[40], id2[40], id3[40];
    struct err e = {0};
    int existed = 0;

    (void)state;
    assert_int_equal(queue_enqueue(q, &spec, id1, &existed, &e), 0);
    assert_int_equal(queue_enqueue(q, &spec, id2, &existed, &e), 0);
    assert_int_equal(existed, 1);
    assert_string_equal(id1, id2);
    spec.request_hash = "h2";
    assert_int_equal(queue_enqueue(q, &spec, id2, &existed, &e), ERR_CONFLICT);
    assert_non_null(strstr(e.msg, "Idempotency-Key 'k1'"));
    spec.idempotency_key = NULL;
    assert_int_equal(queue_enqueue(q, &spec, id3, &existed, &e), 0);
    assert_int_equal(queue_enqueue(q, &spec, id3, &existed, &e), ERR_BUSY);
    queue_close(q);
}

static void test_ttl_expiry(void **state)
{
    struct queue *q = open_queue(100);
    struct job_spec spec = {.model = "m",
                            .input = "{}",
                            .input_len = 2,
                            .input_json_len = -1,
                            .max_attempts = 1,
                            .lease_timeout_ms = 1000,
                            .ttl_s = 1};
    struct err e = {0};
    struct job *j = NULL;
    char id[40];
    int existed;

    (void)state;
    assert_int_equal(queue_enqueue(q, &spec, id, &existed, &e), 0);
    /* poll until the sweep expires it (it runs with the store's writes) */
    for (int i = 0; i < 100; i++) {
        struct timespec ts = {0, 50000000};
        nanosleep(&ts, NULL);
        assert_null(i > 30 ? lease(q) : NULL); /* a lease after the ttl never gets it */
        job_free(j);
        assert_int_equal(queue_get(q, id, 0, &j, &e), 0);
        if (j->state == JOB_EXPIRED)
            break;
    }
    assert_int_equal(j->state, JOB_EXPIRED);
    job_free(j);
    queue_close(q);
}

/* A finished job goes --result-ttl-s after it finished; queued and running ones stay. */
static void test_retention(void **state)
{
    struct queue *q = open_queue_kept(100, 1);
    char done[40], waiting[40], running[40];
    struct job *j = NULL;
    struct err e = {0};
    int rc = 0;

    (void)state;
    enqueue(q, 9, "{\"a\":1}", done);
    enqueue(q, 5, "{\"b\":1}", running);
    j = lease(q);
    assert_string_equal(j->id, done);
    assert_int_equal(queue_complete(q, j->id, j->token, "{\"r\":1}", 7, -1, &e), 0);
    job_free(j);
    j = lease(q);
    assert_string_equal(j->id, running);
    job_free(j);
    enqueue(q, 0, "{\"c\":1}", waiting);
    for (int i = 0; i < 100; i++) { /* up to 5 s: 1 s of retention, then the next pass */
        struct timespec ts = {0, 50000000};
        nanosleep(&ts, NULL);
        rc = queue_get(q, done, 1, &j, &e);
        if (rc != 0)
            break;
        job_free(j);
    }
    assert_int_equal(rc, ERR_NOT_FOUND);
    assert_int_equal(queue_get(q, running, 0, &j, &e), 0);
    assert_int_equal(j->state, JOB_RUNNING);
    job_free(j);
    assert_int_equal(queue_get(q, waiting, 0, &j, &e), 0);
    assert_int_equal(j->state, JOB_QUEUED);
    job_free(j);
    /* the counts forget it too (on Redis once housekeeping, which leases run, has seen it) */
    int64_t counts[JOB_N_STATES] = {0};
    for (int i = 0; i < 100; i++) {
        assert_int_equal(queue_counts(q, counts, &e), 0);
        if (counts[JOB_SUCCEEDED] == 0)
            break;
        job_free(lease(q));
        struct timespec ts = {0, 50000000};
        nanosleep(&ts, NULL);
    }
    assert_int_equal(counts[JOB_SUCCEEDED], 0);
    queue_close(q);
}

/* A worker shutting down releases its job: queued again at once, the attempt not counted. */
static void test_release_on_shutdown(void **state)
{
    struct queue *q = open_queue(100);
    struct job_spec spec = {.model = "m", .input = "{}", .input_len = 2, .input_json_len = -1,
                            .max_attempts = 1, .lease_timeout_ms = 600000};
    struct job *j = NULL, *again = NULL;
    struct err e = {0};
    char id[40];
    int existed = 0;

    (void)state;
    assert_int_equal(queue_enqueue(q, &spec, id, &existed, &e), 0);
    j = lease(q);
    assert_non_null(j);
    struct queue_outcome o = {.id = j->id, .token = j->token, .error = "stopped", .released = 1};
    assert_int_equal(queue_finish_many(q, &o, 1, &e), 0);
    assert_int_equal(o.rc, 0);
    /* a stale second release of the same attempt is fenced out */
    assert_int_equal(queue_finish_many(q, &o, 1, &e), 0);
    assert_int_equal(o.rc, ERR_CONFLICT);
    again = lease(q); /* at once: no lease to wait out, no backoff */
    assert_non_null(again);
    assert_string_equal(again->id, id);
    assert_int_equal(again->attempts, 2);
    assert_int_equal(again->max_attempts, 1); /* its own; the released attempt is not counted */
    assert_int_equal(again->attempts_uncounted, 1);
    assert_int_equal(queue_complete(q, id, again->token, "{}", 2, -1, &e), 0);
    job_free(j);
    job_free(again);
    assert_int_equal(queue_get(q, id, 0, &j, &e), 0);
    assert_int_equal(j->state, JOB_SUCCEEDED);
    job_free(j);
    queue_close(q);
}

/* Redis: an attempt whose lease runs out (its worker died) is reclaimed and runs again. */
static void test_expired_lease_is_reclaimed(void **state)
{
    struct queue *q;
    struct job_spec spec = {.model = "m", .input = "{}", .input_len = 2, .input_json_len = -1,
                            .max_attempts = 3, .lease_timeout_ms = 1200};
    struct job *j = NULL;
    struct err e = {0};
    char id[40];
    int existed = 0;

    (void)state;
    if (!redis_url())
        skip();
    q = open_queue(100);
    assert_int_equal(queue_enqueue(q, &spec, id, &existed, &e), 0);
    j = lease(q);
    assert_non_null(j);
    uint64_t stale = j->token;
    job_free(j);
    for (int i = 0; i < 100; i++) { /* the sweeper looks every second */
        j = lease(q);
        if (j)
            break;
        struct timespec ts = {0, 100000000};
        nanosleep(&ts, NULL);
    }
    assert_non_null(j);
    assert_string_equal(j->id, id);
    assert_int_equal(j->attempts, 2);
    assert_int_equal(queue_complete(q, id, stale, "{}", 2, -1, &e), ERR_CONFLICT);
    assert_int_equal(queue_complete(q, id, j->token, "{}", 2, -1, &e), 0);
    job_free(j);
    queue_close(q);
}

/* Leases with worker name `name` ("<worker id>/<thread>"); NULL when nothing is runnable. */
static struct job *lease_as(struct queue *q, const char *name)
{
    struct job *j = NULL;
    struct err e = {0};

    assert_int_equal(queue_lease(q, name, 0, &j, &e), 0);
    return j;
}

static int worker_listed(struct queue *q, const char *id)
{
    struct queue_worker *w = NULL;
    struct err e = {0};
    size_t n = 0;
    int found = 0;

    assert_int_equal(queue_workers_list(q, &w, &n, &e), 0);
    for (size_t i = 0; i < n; i++)
        found |= strcmp(w[i].id, id) == 0;
    free(w);
    return found;
}

/* A worker silent past its timeout is presumed dead: its running job is queued again at once
 * (its lease is 10 minutes), its late outcome fenced out, its attempt's history says why, and
 * it leaves the list. A worker that leaves cleanly hands back what it still holds. */
static void test_dead_worker_jobs_are_requeued(void **state)
{
    struct queue *q = open_queue(100);
    struct job_spec spec = {.model = "m",
                            .input = "{}",
                            .input_len = 2,
                            .input_json_len = -1,
                            .max_attempts = 3,
                            .lease_timeout_ms = 600000};
    struct queue_worker dead = {.id = "h/1/aaaa", .host = "h", .pid = 1, .timeout_ms = 300};
    struct queue_worker live = {.id = "h/2/bbbb", .host = "h", .pid = 2, .timeout_ms = 60000};
    struct job *j = NULL, *again = NULL;
    struct err e = {0};
    char id[40];
    int existed = 0;

    (void)state;
    dead.started_ms = live.started_ms = queue_now_ms();
    assert_int_equal(queue_worker_beat(q, &dead, &e), 0);
    assert_int_equal(queue_worker_beat(q, &live, &e), 0);
    assert_true(worker_listed(q, "h/1/aaaa"));
    assert_int_equal(queue_enqueue(q, &spec, id, &existed, &e), 0);
    j = lease_as(q, "h/1/aaaa/0");
    assert_non_null(j);
    assert_int_equal(queue_get(q, id, 0, &again, &e), 0);
    assert_string_equal(again->worker, "h/1/aaaa");
    assert_int_equal(again->n_history, 1);
    assert_string_equal(again->history[0].worker, "h/1/aaaa");
    assert_int_equal(again->history[0].ended_ms, 0);
    job_free(again);
    again = NULL;
    for (int i = 0; i < 100 && !again; i++) { /* sweeps: every 0.1 s (SQLite), 1 s (Redis) */
        struct timespec ts = {0, 100000000};
        nanosleep(&ts, NULL);
        assert_int_equal(queue_worker_beat(q, &live, &e), 0);
        again = lease_as(q, "h/2/bbbb/0");
    }
    assert_non_null(again);
    assert_string_equal(again->id, id);
    assert_int_equal(again->attempts, 2);
    assert_false(worker_listed(q, "h/1/aaaa"));
    assert_true(worker_listed(q, "h/2/bbbb"));
    assert_int_equal(queue_complete(q, id, j->token, "{}", 2, -1, &e), ERR_CONFLICT);
    job_free(j);
    /* the live worker leaves with the job: it is queued again at once */
    assert_int_equal(queue_worker_leave(q, "h/2/bbbb", &e), 0);
    assert_false(worker_listed(q, "h/2/bbbb"));
    job_free(again);
    again = lease_as(q, "w");
    assert_non_null(again);
    assert_int_equal(again->attempts, 3);
    assert_int_equal(queue_complete(q, id, again->token, "{}", 2, -1, &e), 0);
    job_free(again);
    assert_int_equal(queue_get(q, id, 0, &j, &e), 0);
    assert_int_equal(j->state, JOB_SUCCEEDED);
    assert_int_equal(j->n_history, 3);
    assert_non_null(strstr(j->history[0].error, "heartbeat"));
    assert_non_null(strstr(j->history[1].error, "stopped"));
    assert_string_equal(j->history[1].worker, "h/2/bbbb");
    assert_null(j->history[2].error);
    assert_true(j->history[2].ended_ms > 0);
    job_free(j);
    queue_close(q);
}

static void test_reopen_requeues_running_jobs(void **state)
{
    struct queue *q;
    struct job *j;
    struct err e = {0};
    char id[40];

    (void)state;
    if (redis_url())
        skip(); /* shared by many processes: a reopen is no sign that a worker died */
    q = open_queue(100);
    enqueue(q, 0, "{\"x\":1}", id);
    j = lease(q);
    assert_non_null(j);
    job_free(j);
    queue_close(q); /* as if the process died holding the job */
    q = open_queue(100);
    j = lease(q);
    assert_non_null(j);
    assert_string_equal(j->id, id);
    assert_int_equal(j->attempts, 2);
    assert_int_equal(queue_complete(q, id, j->token, "{}", 2, -1, &e), 0);
    job_free(j);
    queue_close(q);
}

/* ---- fault injection: an element of an array handed out fails to be built ---- */

static const char *fault_where; /* which array; NULL: none */
static long fault_at;           /* which element; -1: every one */
static int n_faults;

static int fault_hook(const char *where, size_t index)
{
    if (!fault_where || strcmp(where, fault_where) != 0 ||
        (fault_at >= 0 && index != (size_t)fault_at))
        return 0;
    n_faults++;
    return 1;
}

/* Fails element `at` (-1: every one) of `where` from now on; NULL stops. n_faults counts. */
static void inject(const char *where, long at)
{
    fault_where = where;
    fault_at = at;
    if (where)
        n_faults = 0;
    queue_fault_hook = where ? fault_hook : NULL;
}

/* Jobs that end succeeded with a callback_url: one pending webhook each. */
static void finish_with_webhooks(struct queue *q, int n)
{
    struct job_spec spec = {.model = "m",
                            .input = "{}",
                            .input_len = 2,
                            .input_json_len = -1,
                            .max_attempts = 1,
                            .lease_timeout_ms = 60000,
                            .callback_url = "http://127.0.0.1:9/hook"};
    struct err e = {0};

    for (int i = 0; i < n; i++) {
        char id[40];
        int existed = 0;
        struct job *j;
        assert_int_equal(queue_enqueue(q, &spec, id, &existed, &e), 0);
        j = lease(q);
        assert_non_null(j);
        assert_string_equal(j->id, id);
        assert_int_equal(queue_complete(q, j->id, j->token, "{\"r\":1}", 7, -1, &e), 0);
        job_free(j);
    }
}

/* Takes up to `max` due webhooks with element `at` failing: all but that one come back, each
 * whole (ASan: nothing freed twice or from the middle of the array, nothing leaked). */
static void take_webhooks_failing_at(struct queue *q, size_t max, long at)
{
    struct queue_outbox_item *items = NULL;
    struct err e = {0};
    size_t n = 99;

    inject("outbox_due", at);
    assert_int_equal(queue_outbox_due(q, queue_now_ms() + 1000, max, &items, &n, &e), 0);
    inject(NULL, 0);
    assert_int_equal(n_faults, at < 0 ? (int)max : 1);
    assert_int_equal(n, at < 0 ? 0 : max - 1);
    for (size_t i = 0; i < n; i++) {
        assert_non_null(items[i].event_id);
        assert_non_null(items[i].url);
        assert_non_null(items[i].body);
        assert_true(items[i].body_len > 0);
        assert_non_null(strstr(items[i].body, "job.succeeded"));
        for (size_t k = 0; k < i; k++)
            assert_true(items[k].id != items[i].id);
    }
    queue_outbox_items_free(items, n);
}

/* Issue 13 item 1: a webhook whose body could not be built freed &items[n] (Redis): an
 * interior pointer mid-array, a use-after-free and double free at index 0. */
static void test_outbox_due_element_fails(void **state)
{
    struct queue *q = open_queue(100);
    struct queue_outbox_item *items = NULL;
    struct err e = {0};
    size_t n = 0;

    (void)state;
    finish_with_webhooks(q, 15);
    /* Redis hands each out once (held for its sender), SQLite whatever is due */
    take_webhooks_failing_at(q, 5, 0);
    take_webhooks_failing_at(q, 5, 2);
    take_webhooks_failing_at(q, 5, -1);
    if (!redis_url()) { /* nothing was lost: every one is still due */
        assert_int_equal(queue_outbox_due(q, queue_now_ms() + 1000, 100, &items, &n, &e), 0);
        assert_int_equal(n, 15);
        queue_outbox_items_free(items, n);
    }
    queue_close(q);
}

/* A leased job that cannot be read: SQLite undoes the whole lease (every job stays queued, and
 * the count of queued jobs with them); Redis hands out the others (that one waits out its
 * lease, as after a crash). */
static void test_lease_element_fails(void **state)
{
    struct queue *q = open_queue(100);
    struct job *jobs[4] = {0};
    struct err e = {0};
    size_t n = 0;
    char id[40];
    long at[] = {0, 2};

    (void)state;
    for (int i = 0; i < 8; i++)
        enqueue(q, 0, "{}", id);
    for (size_t t = 0; t < 2; t++) {
        inject("lease", at[t]);
        int rc = queue_lease_many(q, "w", 4, 0, 0, jobs, &n, &e);
        inject(NULL, 0);
        assert_int_equal(n_faults, 1);
        if (redis_url()) {
            assert_int_equal(rc, 0);
            assert_int_equal(n, 3);
        } else {
            assert_int_not_equal(rc, 0);
            assert_int_equal(n, 0);
            assert_int_equal(queue_queued(q), 8);
        }
        for (size_t i = 0; i < n; i++) {
            assert_non_null(jobs[i]->model);
            assert_int_equal(jobs[i]->attempts, 1);
            assert_int_equal(queue_complete(q, jobs[i]->id, jobs[i]->token, "{}", 2, -1, &e), 0);
            job_free(jobs[i]);
            jobs[i] = NULL;
        }
    }
    if (!redis_url()) { /* all there, none started */
        assert_int_equal(queue_lease_many(q, "w", 4, 0, 0, jobs, &n, &e), 0);
        assert_int_equal(n, 4);
        for (size_t i = 0; i < n; i++) {
            assert_int_equal(jobs[i]->attempts, 1);
            job_free(jobs[i]);
        }
        assert_int_equal(queue_queued(q), 4);
    }
    queue_close(q);
}

/* Redis: a lease whose answer was lost (Redis died after leasing): the worker's next lease
 * hands those jobs back and gets them again at once, not after their 60 s lease. */
static void test_lost_lease_answer_is_handed_back(void **state)
{
    struct queue *q;
    struct job *jobs[4] = {0};
    struct err e = {0};
    size_t n = 0;
    char a[40], b[40];

    (void)state;
    if (!redis_url())
        skip(); /* one process: a lease either commits and returns or does neither */
    q = open_queue(100);
    enqueue(q, 0, "{}", a);
    enqueue(q, 0, "{}", b);
    inject("lease_answer", 0);
    assert_int_equal(queue_lease_many(q, "w", 4, 0, 0, jobs, &n, &e), ERR_UNAVAILABLE);
    inject(NULL, 0);
    assert_int_equal(n_faults, 1);
    assert_int_equal(n, 0);
    /* another worker does not get them (they are leased) ... */
    assert_int_equal(queue_lease_many(q, "other", 4, 0, 0, jobs, &n, &e), 0);
    assert_int_equal(n, 0);
    /* ... but the same worker's next lease hands them back and leases them again */
    assert_int_equal(queue_lease_many(q, "w", 4, 0, 0, jobs, &n, &e), 0);
    assert_int_equal(n, 2);
    for (size_t i = 0; i < n; i++) {
        assert_true(strcmp(jobs[i]->id, a) == 0 || strcmp(jobs[i]->id, b) == 0);
        assert_int_equal(jobs[i]->attempts, 2);
        assert_int_equal(jobs[i]->max_attempts, 2);       /* its own: the lost attempt ... */
        assert_int_equal(jobs[i]->attempts_uncounted, 1); /* ... is not counted */
        assert_int_equal(queue_complete(q, jobs[i]->id, jobs[i]->token, "{}", 2, -1, &e), 0);
        assert_int_equal(queue_complete(q, jobs[i]->id, 1, "{}", 2, -1, &e), ERR_CONFLICT);
        job_free(jobs[i]);
    }
    /* a later lease answered normally hands nothing back */
    enqueue(q, 0, "{}", a);
    assert_int_equal(queue_lease_many(q, "w", 4, 0, 0, jobs, &n, &e), 0);
    assert_int_equal(n, 1);
    assert_int_equal(jobs[0]->attempts, 1);
    job_free(jobs[0]);
    assert_int_equal(queue_lease_many(q, "w", 4, 0, 0, jobs, &n, &e), 0);
    assert_int_equal(n, 0);
    queue_close(q);
}

static void test_schedules_due_element_fails(void **state)
{
    struct queue *q = open_queue(100);
    struct batch_job_spec spec = {.definition = "{\"model\":\"m\"}",
                                  .model = "m",
                                  .max_attempts = 1,
                                  .lease_timeout_ms = 1000,
                                  .schedule = "* * * * *",
                                  .next_run_ms = queue_now_ms() - 60000};
    struct queue_schedule *due = NULL;
    struct err e = {0};
    size_t n = 0;
    char id[40];
    long at[] = {0, 1, -1};

    (void)state;
    for (int i = 0; i < 3; i++)
        assert_int_equal(queue_batch_create(q, &spec, id, &e), 0);
    for (size_t t = 0; t < 3; t++) {
        inject("schedules_due", at[t]);
        assert_int_equal(queue_schedules_due(q, queue_now_ms(), &due, &n, &e), 0);
        inject(NULL, 0);
        assert_int_equal(n, at[t] < 0 ? 0 : 2);
        for (size_t i = 0; i < n; i++) {
            assert_non_null(due[i].definition);
            assert_string_equal(due[i].schedule, "* * * * *");
        }
        queue_schedules_free(due, n);
    }
    assert_int_equal(queue_schedules_due(q, queue_now_ms(), &due, &n, &e), 0);
    assert_int_equal(n, 3);
    queue_schedules_free(due, n);
    queue_close(q);
}

/* The JSON of batch job `id`, parsed. */
static json_t *batch_json(struct queue *q, const char *id)
{
    struct buf b = {0};
    struct err e = {0};
    json_t *o;

    assert_int_equal(queue_batch_get(q, id, &b, &e), 0);
    o = json_loadb(b.data, b.len, 0, NULL);
    buf_release(&b);
    assert_non_null(o);
    return o;
}

static int64_t records_done(struct queue *q, const char *id)
{
    json_t *o = batch_json(q, id);
    int64_t v = json_integer_value(json_object_get(json_object_get(o, "progress"), "records_done"));
    json_decref(o);
    return v;
}

static size_t n_due(struct queue *q)
{
    struct queue_schedule *due = NULL;
    struct err e = {0};
    size_t n = 0;

    assert_int_equal(queue_schedules_due(q, queue_now_ms(), &due, &n, &e), 0);
    queue_schedules_free(due, n);
    return n;
}

static size_t n_listed(struct queue *q, const char *status)
{
    struct buf b = {0};
    struct err e = {0};
    json_t *o;
    size_t n;

    assert_int_equal(queue_batch_list(q, 10, status, &b, &e), 0);
    o = json_loadb(b.data, b.len, 0, NULL);
    n = json_array_size(json_object_get(o, "batch_jobs"));
    json_decref(o);
    buf_release(&b);
    return n;
}

/* Pause and resume, a run started by hand, progress inside a running task, the status filter:
 * the same on every store. */
static void test_schedule_pause_and_progress(void **state)
{
    struct queue *q = open_queue(100);
    int64_t now = queue_now_ms();
    struct batch_job_spec sched = {.definition = "{\"model\":\"m\",\"schedule\":\"@daily\"}",
                                   .model = "m",
                                   .max_attempts = 1,
                                   .lease_timeout_ms = 60000,
                                   .schedule = "@daily",
                                   .next_run_ms = now - 60000};
    const char *inputs[] = {"{\"object\":\"a\"}"}, *objects[] = {"a"};
    struct batch_job_spec run = {.definition = "{\"model\":\"m\"}",
                                 .model = "m",
                                 .max_attempts = 1,
                                 .lease_timeout_ms = 60000,
                                 .output = "/tmp/out",
                                 .task_inputs = inputs,
                                 .task_objects = objects,
                                 .n_tasks = 1,
                                 .finish_input = "{\"output\":\"/tmp/out\"}"};
    struct queue_schedule *def = NULL;
    struct buf b = {0};
    struct err e = {0};
    struct job *jobs[2];
    char sid[40], rid[40], hand[40];
    size_t n = 0;
    json_t *o;

    (void)state;
    assert_int_equal(queue_batch_create(q, &sched, sid, &e), 0);
    assert_int_equal(n_due(q), 1);
    assert_int_equal(queue_batch_pause(q, sid, 1, 0, &b, &e), 0);
    assert_non_null(strstr(b.data, "\"paused\""));
    buf_release(&b);
    assert_int_equal(queue_batch_pause(q, sid, 1, 0, &b, &e), 0); /* already: no change */
    buf_release(&b);
    assert_int_equal(n_due(q), 0);
    assert_int_equal(queue_batch_definition(q, sid, &def, &e), 0);
    assert_int_equal(def->state, QUEUE_SCHEDULE_PAUSED);
    assert_string_equal(def->schedule, "@daily");
    assert_string_equal(def->definition, sched.definition);
    queue_schedules_free(def, 1);
    assert_int_equal(n_listed(q, "paused"), 1);
    assert_int_equal(n_listed(q, "scheduled"), 0);

    /* a run by hand while paused: stored though the schedule is not due, nothing claimed */
    run.parent = sid;
    run.run_at_ms = now;
    run.by_hand = 1;
    assert_int_equal(queue_batch_create(q, &run, hand, &e), 0);
    o = batch_json(q, sid);
    assert_int_equal(json_array_size(json_object_get(o, "runs")), 1);
    json_decref(o);
    run.parent = NULL;
    run.by_hand = 0;
    assert_int_equal(queue_batch_cancel(q, hand, &b, &e), 0);
    buf_release(&b);

    assert_int_equal(queue_batch_pause(q, sid, 0, now - 1000, &b, &e), 0);
    assert_non_null(strstr(b.data, "\"scheduled\""));
    buf_release(&b);
    assert_int_equal(n_due(q), 1);
    assert_int_equal(n_listed(q, "scheduled"), 1);

    /* a run: it does not pause; its running task's progress counts until it is done */
    assert_int_equal(queue_batch_create(q, &run, rid, &e), 0);
    assert_int_equal(queue_batch_pause(q, rid, 1, 0, &b, &e), ERR_CONFLICT);
    assert_int_equal(queue_batch_pause(q, "batch-nope", 1, 0, &b, &e), ERR_NOT_FOUND);
    assert_int_equal(queue_batch_definition(q, "batch-nope", &def, &e), ERR_NOT_FOUND);
    assert_int_equal(queue_lease_many(q, "w", 2, 1, 0, jobs, &n, &e), 0);
    assert_int_equal(n, 1);
    assert_int_equal(queue_batch_progress(q, rid, jobs[0]->id, jobs[0]->token, 5, &e), 0);
    assert_int_equal(records_done(q, rid), 5);
    /* an attempt that no longer holds the task changes nothing */
    assert_int_equal(queue_batch_progress(q, rid, jobs[0]->id, jobs[0]->token + 1, 900, &e), 0);
    assert_int_equal(records_done(q, rid), 5);
    assert_int_equal(n_listed(q, "running"), 1);
    const char *result = "{\"object\":\"a\",\"records\":7,\"errors\":0}";
    assert_int_equal(queue_complete(q, jobs[0]->id, jobs[0]->token, result, strlen(result), -1, &e),
                     0);
    assert_int_equal(records_done(q, rid), 7); /* the object's records, counted once */
    job_free(jobs[0]);
    assert_int_equal(n_listed(q, NULL), 2); /* runs of a schedule are listed with it */
    assert_int_equal(n_listed(q, "cancelled"), 0);
    assert_int_equal(queue_batch_cancel(q, sid, &b, &e), 0);
    buf_release(&b);
    assert_int_equal(n_listed(q, "cancelled"), 1);
    assert_int_equal(queue_batch_pause(q, sid, 0, now, &b, &e), ERR_CONFLICT);
    assert_non_null(strstr(e.msg, "cancelled"));
    queue_close(q);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_lifecycle_and_order, setup, teardown),
        cmocka_unit_test_setup_teardown(test_fencing_retry_and_dead_letter, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cancel, setup, teardown),
        cmocka_unit_test_setup_teardown(test_idempotency_and_admission, setup, teardown),
        cmocka_unit_test_setup_teardown(test_ttl_expiry, setup, teardown),
        cmocka_unit_test_setup_teardown(test_retention, setup, teardown),
        cmocka_unit_test_setup_teardown(test_release_on_shutdown, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reopen_requeues_running_jobs, setup, teardown),
        cmocka_unit_test_setup_teardown(test_expired_lease_is_reclaimed, setup, teardown),
        cmocka_unit_test_setup_teardown(test_dead_worker_jobs_are_requeued, setup, teardown),
        cmocka_unit_test_setup_teardown(test_outbox_due_element_fails, setup, teardown),
        cmocka_unit_test_setup_teardown(test_lease_element_fails, setup, teardown),
        cmocka_unit_test_setup_teardown(test_schedules_due_element_fails, setup, teardown),
        cmocka_unit_test_setup_teardown(test_schedule_pause_and_progress, setup, teardown),
        cmocka_unit_test_setup_teardown(test_lost_lease_answer_is_handed_back, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
