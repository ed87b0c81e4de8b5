/*
 * test_queue_faults.c: the queue contract when things go wrong, and the recoveries that differ
 * by store. Fault injection (queue_fault_hook) fails one element of each array a store hands
 * out, first and mid-array, so ASan sees the error paths: nothing leaked, freed twice or from
 * the middle of an array, nothing lost. A store with a single owner (SQLite) requeues at once
 * the jobs its previous owner held; a shared one (Redis, PostgreSQL) waits for their leases or
 * their worker's heartbeat instead (test_queue_jobs.c, test_queue_workers.c).
 */
#include "queue_contract.h"

#include <stdlib.h>
#include <string.h>

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
        struct job *j;
        qc_enqueue_spec(q, &spec, id);
        j = qc_lease(q);
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

    qc_inject("outbox_due", at);
    assert_int_equal(queue_outbox_due(q, clock_now_ms() + 1000, max, &items, &n, &e), 0);
    qc_inject(NULL, 0);
    assert_int_equal(qc_n_faults, at < 0 ? (int)max : 1);
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
    struct queue *q = *state;
    struct queue_outbox_item *items = NULL;
    struct err e = {0};
    size_t n = 0;

    finish_with_webhooks(q, 15);
    take_webhooks_failing_at(q, 5, 0);
    take_webhooks_failing_at(q, 5, 2);
    take_webhooks_failing_at(q, 5, -1);
    if (!queue_outbox_exclusive(q)) { /* nothing was lost: every one is still due */
        assert_int_equal(queue_outbox_due(q, clock_now_ms() + 1000, 100, &items, &n, &e), 0);
        assert_int_equal(n, 15);
        queue_outbox_items_free(items, n);
    }
}

/* A leased job that cannot be read: a store either undoes the whole lease (every job stays
 * queued, and the count of queued jobs with them: SQLite) or hands out the others (that one
 * waits out its lease, as after a crash: Redis). Either way nothing is half-handed out. */
static void test_lease_element_fails(void **state)
{
    struct queue *q = *state;
    struct job *jobs[4] = {0};
    struct err e = {0};
    size_t n = 0;
    char id[40];
    long at[] = {0, 2};
    int undone = 0;

    for (int i = 0; i < 8; i++)
        qc_enqueue(q, 0, "{}", id);
    for (size_t t = 0; t < 2; t++) {
        int64_t queued = queue_queued(q);
        qc_inject("lease", at[t]);
        int rc = queue_lease_many(q, "w", 4, 0, 0, jobs, &n, &e);
        qc_inject(NULL, 0);
        assert_true(qc_n_faults >= 1); /* a store that runs a failed group again asks again */
        if (rc != 0) { /* undone whole */
            undone++;
            assert_int_equal(n, 0);
            assert_int_equal(queue_queued(q), queued);
        } else { /* the others handed out */
            assert_int_equal(n, 3);
        }
        for (size_t i = 0; i < n; i++) {
            assert_non_null(jobs[i]->model);
            assert_int_equal(jobs[i]->attempts, 1);
            assert_int_equal(queue_complete(q, jobs[i]->id, jobs[i]->token, "{}", 2, -1, &e), 0);
            job_free(jobs[i]);
            jobs[i] = NULL;
        }
    }
    if (undone == 2) { /* all there, none started */
        assert_int_equal(queue_lease_many(q, "w", 4, 0, 0, jobs, &n, &e), 0);
        assert_int_equal(n, 4);
        for (size_t i = 0; i < n; i++) {
            assert_int_equal(jobs[i]->attempts, 1);
            job_free(jobs[i]);
        }
        assert_int_equal(queue_queued(q), 4);
    } else {
        assert_int_equal(undone, 0); /* one way or the other, not both */
    }
}

static void test_schedules_due_element_fails(void **state)
{
    struct queue *q = *state;
    struct batch_job_spec spec = {.definition = "{\"model\":\"m\"}",
                                  .model = "m",
                                  .max_attempts = 1,
                                  .lease_timeout_ms = 1000,
                                  .schedule = "* * * * *",
                                  .next_run_ms = clock_now_ms() - 60000};
    struct queue_schedule *due = NULL;
    struct err e = {0};
    size_t n = 0;
    char id[40];
    long at[] = {0, 1, -1};

    for (int i = 0; i < 3; i++)
        assert_int_equal(queue_batch_create(q, &spec, id, &e), 0);
    for (size_t t = 0; t < 3; t++) {
        qc_inject("schedules_due", at[t]);
        assert_int_equal(queue_schedules_due(q, clock_now_ms(), &due, &n, &e), 0);
        qc_inject(NULL, 0);
        assert_int_equal(n, at[t] < 0 ? 0 : 2);
        for (size_t i = 0; i < n; i++) {
            assert_non_null(due[i].definition);
            assert_string_equal(due[i].schedule, "* * * * *");
        }
        queue_schedules_free(due, n);
    }
    assert_int_equal(queue_schedules_due(q, clock_now_ms(), &due, &n, &e), 0);
    assert_int_equal(n, 3);
    queue_schedules_free(due, n);
}

/* A single-owner store: jobs running when the previous owner died run again at once. */
static void test_reopen_requeues_running_jobs(void **state)
{
    struct queue *q = *state;
    struct job *j;
    struct err e = {0};
    char id[40];

    if (qc_store->shared)
        skip(); /* shared by many processes: a reopen is no sign that a worker died */
    qc_enqueue(q, 0, "{\"x\":1}", id);
    j = qc_lease(q);
    assert_non_null(j);
    job_free(j);
    q = qc_reopen(state, QC_CONFIG_DEFAULT); /* as if the process died holding the job */
    j = qc_lease(q);
    assert_non_null(j);
    assert_string_equal(j->id, id);
    assert_int_equal(j->attempts, 2);
    assert_int_equal(queue_complete(q, id, j->token, "{}", 2, -1, &e), 0);
    job_free(j);
}

/* A shared store: everything acknowledged is still there after a reopen. */
static void test_reopen_keeps_everything(void **state)
{
    struct queue *q = *state;
    struct job *j;
    struct err e = {0};
    char done[40], waiting[40];

    qc_enqueue(q, 5, "{}", done);
    qc_enqueue(q, 0, "{}", waiting);
    j = qc_lease(q);
    assert_int_equal(queue_complete(q, done, j->token, "{\"r\":2}", 7, -1, &e), 0);
    job_free(j);
    q = qc_reopen(state, QC_CONFIG_DEFAULT);
    assert_int_equal(queue_get(q, done, NULL, 1, &j, &e), 0);
    assert_int_equal(j->state, JOB_SUCCEEDED);
    assert_memory_equal(j->result.data, "{\"r\":2}", 7);
    job_free(j);
    assert_int_equal(queue_queued(q), 1);
    j = qc_lease(q);
    assert_non_null(j);
    assert_string_equal(j->id, waiting);
    job_free(j);
}

/* Redis: a lease whose answer was lost (Redis died after leasing): the worker's next lease
 * hands those jobs back and gets them again at once, not after their 60 s lease. */
static void test_lost_lease_answer_is_handed_back(void **state)
{
    struct queue *q = *state;
    struct job *jobs[4] = {0};
    struct err e = {0};
    size_t n = 0;
    char a[40], b[40];

    if (strcmp(qc_store->name, "redis") != 0)
        skip(); /* "lease_answer" is Redis's: a lease either commits and answers or does neither */
    qc_enqueue(q, 0, "{}", a);
    qc_enqueue(q, 0, "{}", b);
    qc_inject("lease_answer", 0);
    assert_int_equal(queue_lease_many(q, "w", 4, 0, 0, jobs, &n, &e), ERR_UNAVAILABLE);
    qc_inject(NULL, 0);
    assert_int_equal(qc_n_faults, 1);
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
    qc_enqueue(q, 0, "{}", a);
    assert_int_equal(queue_lease_many(q, "w", 4, 0, 0, jobs, &n, &e), 0);
    assert_int_equal(n, 1);
    assert_int_equal(jobs[0]->attempts, 1);
    job_free(jobs[0]);
    assert_int_equal(queue_lease_many(q, "w", 4, 0, 0, jobs, &n, &e), 0);
    assert_int_equal(n, 0);
}

/* clang-format off */
const struct CMUnitTest qc_faults_tests[] = {
    QC_TEST(test_outbox_due_element_fails),
    QC_TEST(test_lease_element_fails),
    QC_TEST(test_schedules_due_element_fails),
    QC_TEST(test_reopen_requeues_running_jobs),
    QC_TEST(test_reopen_keeps_everything),
    QC_TEST(test_lost_lease_answer_is_handed_back),
};
/* clang-format on */
const size_t qc_faults_n = sizeof(qc_faults_tests) / sizeof(qc_faults_tests[0]);
