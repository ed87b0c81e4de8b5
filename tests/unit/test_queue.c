/*
 * test_queue.c: the job queue through its public interface: lifecycle, priority and FIFO
 * order, fencing tokens, retries up to max_attempts, cancel, ttl expiry, idempotency,
 * admission, and recovery of running jobs when the store is reopened (SQLite) or their lease
 * runs out (Redis). With $INFERD_TEST_REDIS set (tests/unit/with_redis runs a redis-server),
 * the same tests run against the Redis queue.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "queue/queue.h"

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
    assert_int_equal(again->max_attempts, 2);
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
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
