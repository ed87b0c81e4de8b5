/*
 * test_policy.c: the queue's rules as the core states them (queue/policy.c): admission at
 * --max-queue, the Idempotency-Key comparison, retention's cutoff, and what the end of a batch
 * task does to its run. Every store applies these; the contract suite (test_queue*.c) checks
 * that each store does.
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "queue/queue_internal.h"

#include <string.h>

static void test_admission_boundary(void **state)
{
    struct queue_config cfg = {.max_queued = 10};
    struct err e = {0};

    (void)state;
    assert_int_equal(queue_admit(&cfg, 9, 1, &e), 0); /* the tenth fits */
    assert_int_equal(queue_admit(&cfg, 10, 1, &e), ERR_BUSY);
    assert_non_null(strstr(e.msg, "10 jobs"));
    assert_non_null(strstr(e.msg, "--max-queue"));
    assert_int_equal(queue_admit(&cfg, 7, 3, &e), 0); /* a run whose tasks just fit */
    assert_int_equal(queue_admit(&cfg, 7, 4, &e), ERR_BUSY);
    assert_non_null(strstr(e.msg, "4 tasks"));
    assert_non_null(strstr(e.msg, "limit of 10"));
    assert_non_null(strstr(e.msg, "7 are waiting"));
    assert_int_equal(queue_admit(&cfg, 12, 0, &e), ERR_BUSY); /* already past: nothing fits */
}

static void test_idempotency_comparison(void **state)
{
    struct job_spec s = {.idempotency_key = "order-42", .request_hash = "abc"};
    struct err e = {0};

    (void)state;
    assert_int_equal(queue_idem_match(&s, "job1", "abc", &e), 0);
    assert_int_equal(queue_idem_match(&s, "job1", "abd", &e), ERR_CONFLICT);
    assert_non_null(strstr(e.msg, "order-42"));
    assert_non_null(strstr(e.msg, "job1"));
    /* a hash missing on either side proves nothing: a conflict, never a silent match */
    assert_int_equal(queue_idem_match(&s, "job1", NULL, &e), ERR_CONFLICT);
    s.request_hash = NULL;
    assert_int_equal(queue_idem_match(&s, "job1", "abc", &e), ERR_CONFLICT);
    /* a key longer than a message should hold is cut, not echoed whole */
    char key[300];
    memset(key, 'k', sizeof(key) - 1);
    key[sizeof(key) - 1] = '\0';
    s.idempotency_key = key;
    s.request_hash = "abc";
    assert_int_equal(queue_idem_match(&s, "job1", "x", &e), ERR_CONFLICT);
    assert_true(strlen(e.msg) < 200);
}

static void test_retention_cutoff(void **state)
{
    struct queue_config cfg = {.result_ttl_s = 60};

    (void)state;
    assert_int_equal(queue_retain_before_ms(&cfg, 1000000), 1000000 - 60000);
    cfg.result_ttl_s = 0; /* forever: nothing is ever old enough */
    assert_true(queue_retain_before_ms(&cfg, 1000000) == INT64_MIN);
}

static void test_backoff(void **state)
{
    (void)state;
    assert_int_equal(queue_retry_backoff_ms(100, 1, 0), 100);
    assert_int_equal(queue_retry_backoff_ms(100, 3, 0), 400);
    assert_int_equal(queue_retry_backoff_ms(100, 40, 0), QUEUE_MAX_BACKOFF_MS);
    assert_int_equal(queue_retry_backoff_ms(100, 1, 5000), 5000); /* Retry-After wins */
}

static void test_after_failure(void **state)
{
    struct queue_config cfg = {.retry_backoff_ms = 100};
    struct job j = {.attempts = 2, .max_attempts = 3};
    int64_t backoff = -1;

    (void)state;
    assert_int_equal(queue_after_failure(&cfg, &j, 0, 1, 0, &backoff), JOB_QUEUED);
    assert_int_equal(backoff, 200); /* the second counted attempt failed: 100 doubled once */
    assert_int_equal(queue_after_failure(&cfg, &j, 0, 0, 0, &backoff), JOB_FAILED);
    j.attempts = 3; /* the last counted attempt */
    assert_int_equal(queue_after_failure(&cfg, &j, 0, 1, 0, &backoff), JOB_FAILED);
    j.attempts_uncounted = 1; /* one was handed back: it did not count */
    assert_int_equal(queue_after_failure(&cfg, &j, 0, 1, 9000, &backoff), JOB_QUEUED);
    assert_int_equal(backoff, 9000); /* the model's Retry-After wins over the backoff */
    j.attempts_uncounted = 0;
    /* a worker's shutdown hands it back: at once, however many attempts it made */
    assert_int_equal(queue_after_failure(&cfg, &j, 1, 0, 0, &backoff), JOB_QUEUED);
    assert_int_equal(backoff, 0);
    j.cancel_requested = 1;
    assert_int_equal(queue_after_failure(&cfg, &j, 1, 1, 0, &backoff), JOB_CANCELLED);
}

static void test_batch_run_steps(void **state)
{
    struct job task = {.id = "t1", .kind = JOB_KIND_BATCH_TASK, .state = JOB_SUCCEEDED};
    struct batch_task_counts c;
    char why[QUEUE_WHY_MAX];

    (void)state;
    assert_int_equal(queue_batch_task_ended(&task, why), BATCH_RUN_COUNT);
    task.kind = JOB_KIND_BATCH_FINISH;
    assert_int_equal(queue_batch_task_ended(&task, why), BATCH_RUN_SUCCEED);
    task.kind = JOB_KIND_BATCH_TASK;
    task.state = JOB_CANCELLED;
    assert_int_equal(queue_batch_task_ended(&task, why), BATCH_RUN_FAIL);
    assert_string_equal(why, "its task t1 was cancelled");
    task.state = JOB_FAILED;
    task.error = "s3: access denied";
    assert_int_equal(queue_batch_task_ended(&task, why), BATCH_RUN_FAIL);
    assert_string_equal(why, "s3: access denied");
    task.error = NULL;
    assert_int_equal(queue_batch_task_ended(&task, why), BATCH_RUN_FAIL);
    assert_string_equal(why, "a task failed");

    const char *res = "{\"object\":\"in/a.csv\",\"records\":70,\"errors\":2}";
    queue_batch_task_counts(res, strlen(res), &c);
    assert_int_equal(c.records, 70);
    assert_int_equal(c.bad, 2);
    assert_string_equal(c.object, "in/a.csv");
    queue_batch_task_counts("not json", 8, &c); /* a result that says nothing counts nothing */
    assert_int_equal(c.records, 0);
    assert_string_equal(c.object, "?");
    queue_batch_task_counts(NULL, 0, &c);
    assert_int_equal(c.bad, 0);

    assert_int_equal(queue_batch_after_count(3, 2, 1, 1, "b", why), BATCH_RUN_WAIT);
    assert_int_equal(queue_batch_after_count(3, 3, 1, 1, "c", why), BATCH_RUN_FINISH);
    assert_int_equal(queue_batch_after_count(3, 2, 2, 1, "b", why), BATCH_RUN_FAIL);
    assert_string_equal(why, "2 bad records in all, more than max_errors (1); the last from b");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_admission_boundary), cmocka_unit_test(test_idempotency_comparison),
        cmocka_unit_test(test_retention_cutoff),   cmocka_unit_test(test_backoff),
        cmocka_unit_test(test_after_failure),      cmocka_unit_test(test_batch_run_steps),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
