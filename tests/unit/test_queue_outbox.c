/*
 * test_queue_outbox.c: the queue contract for the webhook outbox: one webhook per final state
 * of a job with a callback, stored with that state; due, next_due, record (and the job's
 * notifications), the exclusive hand-out of shared stores, and the event body users receive.
 */
#include "queue_contract.h"
#include "notify/notify.h"

#include <stdlib.h>
#include <string.h>

#define HOOK "http://user:s3cret@127.0.0.1:9/hook"

/* A job with the callback HOOK, leased; its id in `id`. */
static struct job *leased_with_hook(struct queue *q, char id[40])
{
    struct job_spec spec = {.model = "m",
                            .input = "{}",
                            .input_len = 2,
                            .input_json_len = -1,
                            .max_attempts = 1,
                            .lease_timeout_ms = 60000,
                            .callback_url = HOOK};
    struct job *j;

    qc_enqueue_spec(q, &spec, id);
    j = qc_lease(q);
    assert_non_null(j);
    assert_string_equal(j->id, id);
    return j;
}

/* The due webhooks (now), at most `max`. */
static size_t take_due(struct queue *q, size_t max, struct queue_outbox_item **items)
{
    struct err e = {0};
    size_t n = 99;
    int rc = queue_outbox_due(q, clock_now_ms() + 1000, max, items, &n, &e);

    if (rc != 0)
        fail_msg("%s: queue_outbox_due: %d %s", qc_store->name, rc, e.msg);
    return n;
}

/* The due item whose event is about job `id`, its body parsed into `*body`; NULL if none. */
static struct queue_outbox_item *item_of(struct queue_outbox_item *items, size_t n, const char *id,
                                         json_t **body)
{
    for (size_t i = 0; i < n; i++) {
        json_t *o = json_loadb(items[i].body, items[i].body_len, 0, NULL);
        const char *job = qc_str(json_object_get(o, "job"), "id");
        if (job && strcmp(job, id) == 0) {
            *body = o;
            return &items[i];
        }
        json_decref(o);
    }
    *body = NULL;
    return NULL;
}

static void test_outbox_events(void **state)
{
    struct queue *q = *state;
    char ok[40], bad[40], gone[40], big[40], plain[40];
    struct queue_outbox_item *items = NULL, *it;
    struct job *j;
    struct err e = {0};
    json_t *body;
    size_t n;
    char large[2048];

    assert_int_equal(queue_outbox_next_due(q), -1);
    j = leased_with_hook(q, ok);
    assert_int_equal(queue_complete(q, ok, j->token, "{\"r\":1}", 7, -1, &e), 0);
    job_free(j);
    j = leased_with_hook(q, bad);
    assert_int_equal(queue_fail(q, bad, j->token, "bad input", 0, &e), 0);
    job_free(j);
    j = leased_with_hook(q, big); /* past result_inline_max_bytes (1024): a link */
    memset(large, ' ', sizeof(large));
    large[0] = '[';
    large[sizeof(large) - 1] = ']';
    assert_int_equal(queue_complete(q, big, j->token, large, sizeof(large), -1, &e), 0);
    job_free(j);
    j = leased_with_hook(q, gone); /* running, asked to cancel: no event until it reports */
    struct job *c = NULL;
    assert_int_equal(queue_cancel(q, gone, NULL, &c, &e), 0);
    job_free(c);
    job_free(j);
    /* a job without a callback has no webhook */
    qc_enqueue(q, 0, "{}", plain);
    j = qc_lease(q);
    assert_int_equal(queue_complete(q, plain, j->token, "{}", 2, -1, &e), 0);
    job_free(j);
    assert_true(queue_outbox_next_due(q) >= 0);
    assert_true(queue_outbox_next_due(q) <= clock_now_ms() + 1000);

    n = take_due(q, 10, &items);
    assert_int_equal(n, 3); /* the cancelled one's comes when its attempt reports */
    for (size_t i = 0; i < n; i++) {
        assert_non_null(items[i].event_id);
        assert_string_equal(items[i].url, HOOK); /* the URL to send to, credentials and all */
        assert_int_equal(items[i].attempts, 0);
        assert_int_equal(strlen(items[i].body), items[i].body_len);
        for (size_t k = 0; k < i; k++) {
            assert_true(items[k].id != items[i].id);
            assert_string_not_equal(items[k].event_id, items[i].event_id);
        }
    }
    it = item_of(items, n, ok, &body);
    assert_non_null(it);
    const char *keys[] = {"id", "type", "job", "result", NULL};
    qc_assert_keys(body, keys, "a job.succeeded event");
    assert_string_equal(qc_str(body, "id"), it->event_id);
    assert_string_equal(qc_str(body, "type"), "job.succeeded");
    assert_string_equal(qc_str(json_object_get(body, "job"), "status"), "succeeded");
    assert_null(strstr(it->body, "s3cret")); /* shown masked in the event */
    assert_int_equal(json_integer_value(json_object_get(json_object_get(body, "result"), "r")), 1);
    json_decref(body);
    it = item_of(items, n, bad, &body);
    assert_non_null(it);
    const char *failed_keys[] = {"id", "type", "job", NULL};
    qc_assert_keys(body, failed_keys, "a job.failed event");
    assert_string_equal(qc_str(body, "type"), "job.failed");
    assert_string_equal(qc_str(json_object_get(body, "job"), "error"), "bad input");
    json_decref(body);
    it = item_of(items, n, big, &body);
    assert_non_null(it);
    const char *link_keys[] = {"id", "type", "job", "result_url", NULL};
    qc_assert_keys(body, link_keys, "a job.succeeded event with a large result");
    assert_non_null(strstr(qc_str(body, "result_url"), big));
    json_decref(body);
    assert_null(item_of(items, n, gone, &body));
    queue_outbox_items_free(items, n);
}

/* A running job cancelled ends cancelled when its attempt reports: job.cancelled. */
static void test_outbox_cancelled_event(void **state)
{
    struct queue *q = *state;
    struct queue_outbox_item *items = NULL;
    struct job *j, *c;
    struct err e = {0};
    json_t *body;
    char id[40], queued[40];

    j = leased_with_hook(q, id);
    assert_int_equal(queue_cancel(q, id, NULL, &c, &e), 0);
    job_free(c);
    assert_int_equal(queue_complete(q, id, j->token, "{}", 2, -1, &e), 0);
    job_free(j);
    /* a queued job cancelled: job.cancelled at once */
    struct job_spec spec = {.model = "m",
                            .input = "{}",
                            .input_len = 2,
                            .input_json_len = -1,
                            .max_attempts = 1,
                            .lease_timeout_ms = 60000,
                            .callback_url = HOOK};
    qc_enqueue_spec(q, &spec, queued);
    assert_int_equal(queue_cancel(q, queued, NULL, &c, &e), 0);
    job_free(c);
    size_t n = take_due(q, 10, &items);
    assert_int_equal(n, 2);
    assert_non_null(item_of(items, n, id, &body));
    assert_string_equal(qc_str(body, "type"), "job.cancelled");
    assert_null(json_object_get(body, "result"));
    json_decref(body);
    assert_non_null(item_of(items, n, queued, &body));
    assert_string_equal(qc_str(body, "type"), "job.cancelled");
    json_decref(body);
    queue_outbox_items_free(items, n);
}

static void test_outbox_record_and_exclusive(void **state)
{
    struct queue *q = *state;
    struct queue_outbox_item *items = NULL, *again = NULL;
    char ids[3][40];
    struct err e = {0};
    struct job *j;
    size_t n, m;

    for (int i = 0; i < 3; i++) {
        j = leased_with_hook(q, ids[i]);
        assert_int_equal(queue_complete(q, ids[i], j->token, "{}", 2, -1, &e), 0);
        job_free(j);
    }
    n = take_due(q, 2, &items); /* at most max */
    assert_int_equal(n, 2);
    m = take_due(q, 10, &again);
    /* exclusive stores (shared by many senders) never hand out again what a sender holds;
     * the others hand out whatever is due */
    assert_int_equal(m, queue_outbox_exclusive(q) ? 1 : 3);
    struct queue_outbox_item *third = NULL;
    for (size_t i = 0; i < m; i++)
        if (again[i].id != items[0].id && again[i].id != items[1].id)
            third = &again[i];
    assert_non_null(third);
    int64_t now = clock_now_ms();
    /* delivered: done */
    struct queue_outbox_attempt a0 = {
        .outbox_id = items[0].id, .at_ms = now, .http_status = 200, .done = 1, .delivered = 1};
    assert_int_equal(queue_outbox_record(q, &a0, &e), 0);
    /* a failed attempt: due again later */
    struct queue_outbox_attempt a1 = {.outbox_id = items[1].id,
                                      .at_ms = now,
                                      .http_status = 500,
                                      .error = "HTTP 500",
                                      .next_attempt_ms = now + 600000};
    assert_int_equal(queue_outbox_record(q, &a1, &e), 0);
    /* given up */
    struct queue_outbox_attempt a2 = {
        .outbox_id = third->id, .at_ms = now, .error = "connection refused", .done = 1};
    assert_int_equal(queue_outbox_record(q, &a2, &e), 0);
    queue_outbox_items_free(again, m);
    assert_int_equal(take_due(q, 10, &again), 0);
    free(again);
    assert_int_equal(queue_outbox_next_due(q), now + 600000);
    /* the job lists each attempt */
    json_t *body = json_loadb(items[1].body, items[1].body_len, 0, NULL);
    const char *job_id = qc_str(json_object_get(body, "job"), "id");
    json_t *o = qc_job_json(q, job_id), *list = json_object_get(o, "notifications");
    assert_int_equal(json_array_size(list), 1);
    json_t *rec = json_array_get(list, 0);
    const char *keys[] = {"event_id", "at", "status_code", "error", NULL};
    qc_assert_keys(rec, keys, "a notification");
    assert_string_equal(qc_str(rec, "event_id"), items[1].event_id);
    assert_int_equal(json_integer_value(json_object_get(rec, "status_code")), 500);
    assert_string_equal(qc_str(rec, "error"), "HTTP 500");
    json_decref(o);
    json_decref(body);
    /* the last one done: nothing pending */
    a1.done = 1;
    a1.delivered = 1;
    a1.http_status = 204;
    a1.error = NULL;
    assert_int_equal(queue_outbox_record(q, &a1, &e), 0);
    assert_int_equal(queue_outbox_next_due(q), -1);
    queue_outbox_items_free(items, n);
}

/* The outbox as the notifier sees it (queue_notify_store): in-flight webhooks are not handed
 * out again, and attempts are recorded through it. */
static void test_notify_store_view(void **state)
{
    struct queue *q = *state;
    struct notify_store store;
    struct notify_delivery **ds = NULL, **more = NULL;
    struct err e = {0};
    size_t n = 0, m = 0;
    char id[40];

    for (int i = 0; i < 3; i++) {
        struct job *j = leased_with_hook(q, id);
        assert_int_equal(queue_complete(q, id, j->token, "{}", 2, -1, &e), 0);
        job_free(j);
    }
    queue_notify_store(q, &store);
    assert_ptr_equal(store.ctx, q);
    assert_int_equal(store.take_due(store.ctx, clock_now_ms() + 1000, NULL, 0, 10, &ds, &n, &e), 0);
    assert_int_equal(n, 3);
    int64_t in_flight[1] = {ds[0]->id};
    assert_int_equal(
        store.take_due(store.ctx, clock_now_ms() + 1000, in_flight, 1, 10, &more, &m, &e), 0);
    /* never the one in flight; an exclusive store holds the others too */
    assert_int_equal(m, queue_outbox_exclusive(q) ? 0 : 2);
    for (size_t i = 0; i < m; i++) {
        assert_true(more[i]->id != ds[0]->id);
        notify_delivery_free(more[i]);
    }
    free(more);
    for (size_t i = 0; i < n; i++) {
        assert_string_equal(ds[i]->url, HOOK);
        assert_true(ds[i]->body_len > 0);
        assert_int_equal(ds[i]->attempts, 0);
        assert_int_equal(store.record(store.ctx, ds[i]->id, clock_now_ms(), 200, NULL, 1, 1, 0, &e),
                         0);
        notify_delivery_free(ds[i]);
    }
    free(ds);
    assert_int_equal(queue_outbox_next_due(q), -1);
}

const struct CMUnitTest qc_outbox_tests[] = {
    QC_TEST(test_outbox_events),
    QC_TEST(test_outbox_cancelled_event),
    QC_TEST(test_outbox_record_and_exclusive),
    QC_TEST(test_notify_store_view),
};
const size_t qc_outbox_n = sizeof(qc_outbox_tests) / sizeof(qc_outbox_tests[0]);
