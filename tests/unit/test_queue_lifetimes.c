/*
 * test_queue_lifetimes.c: the queue contract for how long things last: a queued job past its
 * ttl expires, a finished one goes --result-ttl-s after it finished (its Idempotency-Key free
 * again), and an attempt whose lease runs out is reclaimed while an extended one holds.
 */
#include "queue_contract.h"

#include <string.h>

static int is_expired(struct queue *q, const char *id)
{
    return qc_state(q, id) == JOB_EXPIRED;
}

static void test_ttl_expiry(void **state)
{
    struct queue *q = *state;
    struct job_spec spec = {.model = "m",
                            .input = "{}",
                            .input_len = 2,
                            .input_json_len = -1,
                            .max_attempts = 1,
                            .lease_timeout_ms = 60000,
                            .ttl_s = 1};
    struct job *j, *started;
    struct err e = {0};
    char id[40], kept[40], early[40];

    spec.priority = 9; /* started before its ttl: it runs to the end */
    qc_enqueue_spec(q, &spec, early);
    started = qc_lease(q);
    assert_string_equal(started->id, early);
    spec.priority = 0;
    spec.callback_url = "http://127.0.0.1:9/expired";
    qc_enqueue_spec(q, &spec, id);
    spec.callback_url = NULL;
    spec.ttl_s = 0;
    qc_enqueue_spec(q, &spec, kept);
    qc_sleep_ms(1100); /* the ttl itself: nothing to poll for before it ends */
    /* a lease after the ttl never gets it (the other job, yes) */
    j = qc_lease(q);
    assert_non_null(j);
    assert_string_equal(j->id, kept);
    job_free(j);
    assert_null(qc_lease(q));
    qc_poll(is_expired(q, id), 5, "the job past its ttl to expire");
    j = qc_get(q, id);
    assert_int_equal(j->attempts, 0);
    assert_true(j->finished_ms > 0);
    job_free(j);
    /* its webhook says so */
    struct queue_outbox_item *items = NULL;
    size_t n_items = 0;
    assert_int_equal(queue_outbox_due(q, clock_now_ms() + 1000, 10, &items, &n_items, &e), 0);
    assert_int_equal(n_items, 1);
    json_t *event = json_loadb(items[0].body, items[0].body_len, 0, NULL);
    assert_string_equal(qc_str(event, "type"), "job.expired");
    assert_string_equal(qc_str(json_object_get(event, "job"), "id"), id);
    assert_string_equal(qc_str(json_object_get(event, "job"), "status"), "expired");
    json_decref(event);
    queue_outbox_items_free(items, n_items);
    int64_t counts[JOB_N_STATES];
    assert_int_equal(queue_counts(q, counts, &e), 0);
    assert_int_equal(counts[JOB_EXPIRED], 1);
    assert_int_equal(counts[JOB_QUEUED], 0);
    assert_int_equal(queue_complete(q, early, started->token, "{}", 2, -1, &e), 0);
    job_free(started);
    assert_int_equal(qc_state(q, early), JOB_SUCCEEDED);
    /* expired jobs can be sent back (here in bulk), and no longer expire */
    struct queue_list_filter f = {.state = JOB_EXPIRED, .cancelling = -1, .limit = 10};
    int64_t n = 0;
    assert_int_equal(queue_retry_matching(q, &f, &n, &e), 0);
    assert_int_equal(n, 1);
    assert_int_equal(qc_state(q, id), JOB_QUEUED);
    j = qc_lease(q);
    assert_non_null(j);
    assert_string_equal(j->id, id);
    job_free(j);
}

static int succeeded_counted(struct queue *q)
{
    int64_t counts[JOB_N_STATES] = {0};
    struct err e = {0};

    assert_int_equal(queue_counts(q, counts, &e), 0);
    job_free(qc_lease(q)); /* on Redis, housekeeping runs with leases */
    return (int)counts[JOB_SUCCEEDED];
}

/* A finished job goes --result-ttl-s after it finished, and its Idempotency-Key is free again;
 * queued and running ones stay. */
static void test_retention(void **state)
{
    struct queue *q = qc_reopen(state, (struct qc_config){1000, 1, 0, 1024});
    char done[40], waiting[40], running[40];
    struct job *j = NULL;
    struct err e = {0};

    qc_enqueue(q, 9, "{\"a\":1}", done);
    qc_enqueue(q, 5, "{\"b\":1}", running);
    j = qc_lease(q);
    assert_string_equal(j->id, done);
    assert_int_equal(queue_complete(q, j->id, j->token, "{\"r\":1}", 7, -1, &e), 0);
    job_free(j);
    j = qc_lease(q);
    assert_string_equal(j->id, running);
    job_free(j);
    qc_enqueue(q, 0, "{\"c\":1}", waiting);
    struct job_spec keyed = {.model = "m",
                             .input = "{}",
                             .input_len = 2,
                             .input_json_len = -1,
                             .max_attempts = 1,
                             .lease_timeout_ms = 60000,
                             .idempotency_key = "retained-key",
                             .request_hash = "h1"};
    char keyed_id[40], again[40];
    int existed = 0;
    qc_enqueue_spec(q, &keyed, keyed_id);
    assert_int_equal(queue_cancel(q, keyed_id, NULL, &j, &e), 0);
    job_free(j);
    qc_poll(qc_job_gone(q, done), 10, "the finished job to go after its 1 s of retention");
    qc_poll(qc_job_gone(q, keyed_id), 10, "the cancelled job to go after its 1 s of retention");
    /* its Idempotency-Key may be used again, for another request */
    keyed.request_hash = "h2";
    assert_int_equal(queue_enqueue(q, &keyed, again, &existed, &e), 0);
    assert_int_equal(existed, 0);
    assert_string_not_equal(again, keyed_id);
    assert_int_equal(queue_cancel(q, again, NULL, &j, &e), 0);
    job_free(j);
    assert_int_equal(qc_state(q, running), JOB_RUNNING);
    assert_int_equal(qc_state(q, waiting), JOB_QUEUED);
    qc_poll(succeeded_counted(q) == 0, 10, "the counts to forget the retired job");
    /* and the listing: the running and the waiting job stay, the retired ones are gone */
    struct queue_list_filter f = {.state = -1, .cancelling = -1, .limit = 100};
    json_t *o = qc_list(q, &f), *job;
    int found = 0;
    size_t i;
    json_array_foreach (json_object_get(o, "jobs"), i, job) {
        assert_string_not_equal(qc_str(job, "id"), done);
        assert_string_not_equal(qc_str(job, "id"), keyed_id);
        found += strcmp(qc_str(job, "id"), running) == 0 || strcmp(qc_str(job, "id"), waiting) == 0;
    }
    assert_int_equal(found, 2);
    json_decref(o);
}

/* An attempt whose lease runs out (its worker died silently) is reclaimed and runs again. */
static void test_expired_lease_is_reclaimed(void **state)
{
    struct queue *q = *state;
    struct job_spec spec = {.model = "m",
                            .input = "{}",
                            .input_len = 2,
                            .input_json_len = -1,
                            .max_attempts = 3,
                            .lease_timeout_ms = 1200};
    struct job *j = NULL;
    struct err e = {0};
    char id[40];

    char kept[40];
    struct job *k;

    spec.priority = 5;
    qc_enqueue_spec(q, &spec, kept);
    spec.priority = 0;
    qc_enqueue_spec(q, &spec, id);
    k = qc_lease(q); /* extended past the test: never reclaimed */
    assert_string_equal(k->id, kept);
    assert_int_equal(queue_extend(q, kept, k->token, 120000, &e), 0);
    j = qc_lease(q);
    assert_non_null(j);
    assert_string_equal(j->id, id);
    uint64_t stale = j->token;
    job_free(j);
    j = NULL;
    qc_poll((j = qc_lease(q)) != NULL, 10, "the job whose lease ran out to run again");
    assert_string_equal(j->id, id);
    assert_int_equal(j->attempts, 2);
    assert_int_equal(queue_complete(q, id, stale, "{}", 2, -1, &e), ERR_CONFLICT);
    assert_int_equal(queue_complete(q, id, j->token, "{}", 2, -1, &e), 0);
    job_free(j);
    j = qc_get(q, id);
    assert_int_equal(j->n_history, 2);
    assert_non_null(j->history[0].error); /* says why the attempt ended */
    assert_true(j->history[0].ended_ms > 0);
    job_free(j);
    /* the extended lease still holds, its attempt unchanged */
    j = qc_get(q, kept);
    assert_int_equal(j->state, JOB_RUNNING);
    assert_int_equal(j->attempts, 1);
    job_free(j);
    assert_int_equal(queue_complete(q, kept, k->token, "{}", 2, -1, &e), 0);
    job_free(k);
}

const struct CMUnitTest qc_lifetimes_tests[] = {
    QC_TEST(test_ttl_expiry),
    QC_TEST(test_retention),
    QC_TEST(test_expired_lease_is_reclaimed),
};
const size_t qc_lifetimes_n = sizeof(qc_lifetimes_tests) / sizeof(qc_lifetimes_tests[0]);
