/*
 * test_queue_jobs.c: the queue contract for inference jobs: enqueue (idempotency, admission,
 * async), lease (priority then FIFO, many, waiting), extend, complete, fail and finish_many
 * (fencing, retries with backoff, max_attempts, released attempts), cancel, retry and bulk
 * redrive, get, list, counts, on_final, and the job's public JSON.
 */
#include "queue_contract.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* The keys of a job's public JSON (GET /v1/jobs/{id}), every store alike. */
/* clang-format off */
static const char *const job_keys[] = {
    "id", "model", "status", "priority", "attempts", "max_attempts", "created_at", "started_at",
    "finished_at", "elapsed_s", "cancel_requested", "error", "output_location", "callback_url",
    "worker", "attempts_history", "notifications", NULL};
/* clang-format on */
static const char *const attempt_keys[] = {"attempt", "started_at", "ended_at",
                                           "worker",  "error",      NULL};

static void test_enqueue_get_and_job_json(void **state)
{
    struct queue *q = *state;
    struct job_spec spec = {.model = "iris",
                            .input = "{\"inputs\":[]}",
                            .input_len = 13,
                            .input_json_len = -1,
                            .output_location = "file:///tmp/out.json",
                            .callback_url = "http://user:s3cret@127.0.0.1:9/hook",
                            .priority = 3,
                            .max_attempts = 4,
                            .lease_timeout_ms = 30000};
    struct job *j = NULL;
    struct err e = {0};
    int64_t before = clock_now_ms();
    char id[40];
    json_t *o;

    qc_enqueue_spec(q, &spec, id);
    assert_true(strlen(id) < 40);
    j = qc_get(q, id);
    assert_string_equal(j->id, id);
    assert_string_equal(j->model, "iris");
    assert_int_equal(j->state, JOB_QUEUED);
    assert_int_equal(j->kind, JOB_KIND_INFER);
    assert_string_equal(j->batch_id, "");
    assert_int_equal(j->priority, 3);
    assert_int_equal(j->attempts, 0);
    assert_int_equal(j->max_attempts, 4);
    assert_int_equal(j->lease_timeout_ms, 30000);
    assert_true(j->created_ms >= before - 1000 && j->created_ms <= clock_now_ms() + 1000);
    assert_int_equal(j->started_ms, 0);
    assert_int_equal(j->finished_ms, 0);
    assert_string_equal(j->output_location, "file:///tmp/out.json");
    assert_int_equal(j->n_history, 0);
    job_free(j);
    assert_int_equal(queue_get(q, "no-such-job", NULL, 0, &j, &e), ERR_NOT_FOUND);

    o = qc_job_json(q, id);
    qc_assert_keys(o, job_keys, "a queued job's JSON");
    assert_string_equal(qc_str(o, "id"), id);
    assert_string_equal(qc_str(o, "status"), "queued");
    assert_int_equal(json_integer_value(json_object_get(o, "priority")), 3);
    assert_int_equal(json_integer_value(json_object_get(o, "max_attempts")), 4);
    assert_non_null(qc_str(o, "created_at"));
    assert_true(json_is_null(json_object_get(o, "started_at")));
    assert_true(json_is_null(json_object_get(o, "elapsed_s")));
    assert_true(json_is_false(json_object_get(o, "cancel_requested")));
    assert_true(json_is_null(json_object_get(o, "worker")));
    assert_string_equal(qc_str(o, "output_location"), "file:///tmp/out.json");
    /* the callback's credentials are never shown back */
    assert_non_null(qc_str(o, "callback_url"));
    assert_null(strstr(qc_str(o, "callback_url"), "s3cret"));
    assert_int_equal(json_array_size(json_object_get(o, "attempts_history")), 0);
    assert_int_equal(json_array_size(json_object_get(o, "notifications")), 0);
    json_decref(o);

    /* running: the worker that holds it, one attempt open */
    j = qc_lease_as(q, "host/42/abcd/3");
    assert_non_null(j);
    assert_memory_equal(j->input.data, spec.input, spec.input_len);
    assert_int_equal(j->input_json_len, -1);
    job_free(j);
    o = qc_job_json(q, id);
    qc_assert_keys(o, job_keys, "a running job's JSON");
    assert_string_equal(qc_str(o, "status"), "running");
    assert_string_equal(qc_str(o, "worker"), "host/42/abcd");
    assert_int_equal(json_integer_value(json_object_get(o, "attempts")), 1);
    assert_non_null(qc_str(o, "started_at"));
    assert_true(json_is_number(json_object_get(o, "elapsed_s")));
    json_t *h = json_object_get(o, "attempts_history");
    assert_int_equal(json_array_size(h), 1);
    qc_assert_keys(json_array_get(h, 0), attempt_keys, "an attempt");
    assert_int_equal(json_integer_value(json_object_get(json_array_get(h, 0), "attempt")), 1);
    assert_string_equal(qc_str(json_array_get(h, 0), "worker"), "host/42/abcd");
    assert_true(json_is_null(json_object_get(json_array_get(h, 0), "ended_at")));
    json_decref(o);
}

static void test_idempotency_and_admission(void **state)
{
    struct queue *q = qc_reopen(state, (struct qc_config){2, 0, 0, 1024});
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

    assert_int_equal(queue_enqueue(q, &spec, id1, &existed, &e), 0);
    assert_int_equal(existed, 0);
    assert_int_equal(queue_enqueue(q, &spec, id2, &existed, &e), 0);
    assert_int_equal(existed, 1);
    assert_string_equal(id1, id2);
    assert_int_equal(queue_queued(q), 1);
    spec.request_hash = "h2";
    assert_int_equal(queue_enqueue(q, &spec, id2, &existed, &e), ERR_CONFLICT);
    assert_non_null(strstr(e.msg, "Idempotency-Key 'k1'"));
    spec.idempotency_key = NULL;
    assert_int_equal(queue_enqueue(q, &spec, id3, &existed, &e), 0);
    assert_int_equal(queue_queued(q), 2);
    assert_int_equal(queue_enqueue(q, &spec, id3, &existed, &e), ERR_BUSY);
    assert_int_equal(queue_queued(q), 2);
    /* the key still answers with its job while the queue is full */
    spec.idempotency_key = "k1";
    spec.request_hash = "h1";
    assert_int_equal(queue_enqueue(q, &spec, id2, &existed, &e), 0);
    assert_int_equal(existed, 1);
    assert_string_equal(id1, id2);
    /* a leased job no longer waits: there is room again */
    job_free(qc_lease(q));
    spec.idempotency_key = NULL;
    assert_int_equal(queue_enqueue(q, &spec, id3, &existed, &e), 0);
}

/* What an async enqueue's callback reported. */
struct async_result {
    pthread_mutex_t lock;
    int done, rc, existed;
    char id[40];
    char msg[256];
};

static void async_done(void *ctx, int rc, const struct err *e, const char *id, int existed)
{
    struct async_result *r = ctx;

    pthread_mutex_lock(&r->lock);
    r->rc = rc;
    r->existed = existed;
    snprintf(r->id, sizeof(r->id), "%s", id && rc == 0 ? id : "");
    snprintf(r->msg, sizeof(r->msg), "%s", e && rc != 0 ? e->msg : "");
    r->done = 1;
    pthread_mutex_unlock(&r->lock);
}

static int async_is_done(struct async_result *r)
{
    pthread_mutex_lock(&r->lock);
    int done = r->done;
    pthread_mutex_unlock(&r->lock);
    return done;
}

/* Enqueues `spec` asynchronously; the result, whether the call or its callback refused it. */
static int enqueue_async(struct queue *q, const struct job_spec *spec, struct async_result *r)
{
    struct err e = {0};
    int rc;

    pthread_mutex_destroy(&r->lock);
    *r = (struct async_result){.done = 0};
    pthread_mutex_init(&r->lock, NULL);
    rc = queue_enqueue_async(q, spec, async_done, r, &e);
    if (rc != 0)
        return rc; /* refused at once: the callback is never called */
    qc_poll(async_is_done(r), 10, "the async enqueue's callback");
    return r->rc;
}

static void test_enqueue_async(void **state)
{
    struct queue *q = qc_reopen(state, (struct qc_config){2, 0, 0, 1024});
    struct job_spec spec = {.model = "m",
                            .input = "{\"x\":1}",
                            .input_len = 7,
                            .input_json_len = -1,
                            .max_attempts = 1,
                            .lease_timeout_ms = 1000,
                            .idempotency_key = "k",
                            .request_hash = "h"};
    struct async_result r = {.lock = PTHREAD_MUTEX_INITIALIZER};
    char first[40];
    struct job *j;

    assert_int_equal(enqueue_async(q, &spec, &r), 0);
    assert_int_equal(r.existed, 0);
    snprintf(first, sizeof(first), "%s", r.id);
    assert_true(first[0] != '\0');
    /* durable when the callback says so */
    assert_int_equal(qc_state(q, first), JOB_QUEUED);
    assert_int_equal(queue_queued(q), 1);
    /* the same key and request: that job */
    assert_int_equal(enqueue_async(q, &spec, &r), 0);
    assert_int_equal(r.existed, 1);
    assert_string_equal(r.id, first);
    /* the same key, another request */
    spec.request_hash = "other";
    assert_int_equal(enqueue_async(q, &spec, &r), ERR_CONFLICT);
    spec.idempotency_key = NULL;
    assert_int_equal(enqueue_async(q, &spec, &r), 0);
    assert_int_equal(enqueue_async(q, &spec, &r), ERR_BUSY);
    pthread_mutex_destroy(&r.lock);
    j = qc_lease(q);
    assert_non_null(j);
    assert_string_equal(j->id, first);
    assert_memory_equal(j->input.data, "{\"x\":1}", 7);
    job_free(j);
}

static void test_lifecycle_and_order(void **state)
{
    struct queue *q = *state;
    char a[40], b[40], c[40], d[40];
    struct job *j;
    struct err e = {0};

    qc_enqueue(q, 0, "{\"a\":1}", a);
    qc_enqueue(q, 9, "{\"b\":1}", b);
    qc_enqueue(q, 5, "{\"c\":1}", c);
    qc_enqueue(q, 9, "{\"d\":1}", d);
    assert_int_equal(queue_queued(q), 4);
    /* priority first, FIFO within a priority */
    const char *order[] = {b, d, c, a};
    for (int i = 0; i < 4; i++) {
        j = qc_lease(q);
        assert_non_null(j);
        assert_string_equal(j->id, order[i]);
        assert_int_equal(j->state, JOB_RUNNING);
        assert_int_equal(j->attempts, 1);
        assert_true(j->token > 0);
        assert_true(j->input.len > 0);
        assert_int_equal(queue_queued(q), 3 - i);
        assert_int_equal(queue_complete(q, j->id, j->token, "{\"r\":1}", 7, -1, &e), 0);
        job_free(j);
    }
    assert_null(qc_lease(q));
    j = qc_get(q, a);
    assert_int_equal(j->state, JOB_SUCCEEDED);
    assert_int_equal(j->result.len, 0); /* only with want_result */
    assert_true(j->started_ms > 0 && j->finished_ms >= j->started_ms);
    assert_null(j->error);
    assert_int_equal(j->n_history, 1);
    assert_string_equal(j->history[0].worker, "w");
    assert_true(j->history[0].ended_ms > 0);
    assert_null(j->history[0].error);
    job_free(j);
    assert_int_equal(queue_get(q, a, NULL, 1, &j, &e), 0);
    assert_int_equal(j->result.len, 7);
    assert_memory_equal(j->result.data, "{\"r\":1}", 7);
    assert_int_equal(j->result_json_len, -1);
    job_free(j);
    json_t *o = qc_job_json(q, a);
    qc_assert_keys(o, job_keys, "a succeeded job's JSON");
    assert_string_equal(qc_str(o, "status"), "succeeded");
    assert_non_null(qc_str(o, "finished_at"));
    assert_true(json_is_number(json_object_get(o, "elapsed_s")));
    assert_true(json_is_null(json_object_get(o, "worker"))); /* only while it runs */
    json_decref(o);
}

/* A result that is a JSON header plus binary data keeps both and its header's length. */
static void test_get_want_result(void **state)
{
    struct queue *q = *state;
    static const char result[] = "{\"outputs\":[]}\x00\x01\x02\xff";
    size_t len = sizeof(result) - 1;
    struct err e = {0};
    struct job *j;
    char id[40], failed[40];

    qc_enqueue(q, 0, "{}", id);
    j = qc_lease(q);
    assert_int_equal(queue_complete(q, id, j->token, result, len, 14, &e), 0);
    job_free(j);
    assert_int_equal(queue_get(q, id, NULL, 1, &j, &e), 0);
    assert_int_equal(j->result.len, len);
    assert_memory_equal(j->result.data, result, len);
    assert_int_equal(j->result_json_len, 14);
    job_free(j);
    /* a job that did not succeed has no result */
    qc_enqueue(q, 0, "{}", failed);
    j = qc_lease(q);
    assert_int_equal(queue_fail(q, failed, j->token, "bad input", 0, &e), 0);
    job_free(j);
    assert_int_equal(queue_get(q, failed, NULL, 1, &j, &e), 0);
    assert_int_equal(j->state, JOB_FAILED);
    assert_int_equal(j->result.len, 0);
    assert_string_equal(j->error, "bad input");
    job_free(j);
    /* a result written to output_location is not stored: the job shows where it is */
    struct job_spec spec = {.model = "m",
                            .input = "{}",
                            .input_len = 2,
                            .input_json_len = -1,
                            .output_location = "file:///tmp/result.json",
                            .max_attempts = 1,
                            .lease_timeout_ms = 60000};
    char out[40];
    qc_enqueue_spec(q, &spec, out);
    j = qc_lease(q);
    assert_int_equal(queue_complete(q, out, j->token, NULL, 0, -1, &e), 0);
    job_free(j);
    assert_int_equal(queue_get(q, out, NULL, 1, &j, &e), 0);
    assert_int_equal(j->state, JOB_SUCCEEDED);
    assert_int_equal(j->result.len, 0);
    assert_string_equal(j->output_location, "file:///tmp/result.json");
    job_free(j);
}

/* What a waiting lease got, from its own thread. */
struct waiter {
    struct queue *q;
    int64_t wait_ms;
    struct job *job;
    int rc;
    int64_t took_ms;
};

static void *lease_waiting(void *arg)
{
    struct waiter *w = arg;
    struct err e = {0};
    int64_t t0 = clock_now_ms();

    w->rc = queue_lease(w->q, "w", w->wait_ms, &w->job, &e);
    w->took_ms = clock_now_ms() - t0;
    return NULL;
}

/* An idle worker waiting in queue_lease gets a job enqueued meanwhile, not at its timeout. */
static void test_lease_wait_wakes_on_new_job(void **state)
{
    struct queue *q = *state;
    struct waiter w = {.q = q, .wait_ms = 30000};
    struct job *j = NULL;
    struct err e = {0};
    pthread_t t;
    char id[40];

    /* nothing comes: NULL once the wait is over */
    assert_int_equal(queue_lease(q, "w", 200, &j, &e), 0);
    assert_null(j);
    assert_int_equal(pthread_create(&t, NULL, lease_waiting, &w), 0);
    qc_sleep_ms(300); /* lets the lease start waiting; the test holds either way */
    qc_enqueue(q, 0, "{}", id);
    assert_int_equal(pthread_join(t, NULL), 0);
    assert_int_equal(w.rc, 0);
    assert_non_null(w.job);
    assert_string_equal(w.job->id, id);
    /* woken by the enqueue: well before the 30 s wait ran out */
    assert_true(w.took_ms < 15000);
    job_free(w.job);
}

static void test_lease_many_and_max_tasks(void **state)
{
    struct queue *q = *state;
    const char *inputs[] = {"{\"object\":\"t1\"}", "{\"object\":\"t2\"}"};
    const char *objects[] = {"t1", "t2"};
    struct batch_job_spec run = {.definition = "{\"model\":\"m\"}",
                                 .model = "m",
                                 .max_attempts = 1,
                                 .lease_timeout_ms = 60000,
                                 .output = "/tmp/out",
                                 .task_inputs = inputs,
                                 .task_objects = objects,
                                 .n_tasks = 2,
                                 .finish_input = "{}"};
    struct job *jobs[4] = {0};
    struct err e = {0};
    char a[40], b[40], c[40], bid[40];
    size_t n = 0;

    qc_enqueue(q, 1, "{}", a);
    qc_enqueue(q, 5, "{}", b);
    qc_enqueue(q, 1, "{}", c);
    /* up to max, in priority then FIFO order */
    assert_int_equal(queue_lease_many(q, "w", 2, 0, 0, jobs, &n, &e), 0);
    assert_int_equal(n, 2);
    assert_string_equal(jobs[0]->id, b);
    assert_string_equal(jobs[1]->id, a);
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(jobs[i]->state, JOB_RUNNING);
        assert_int_not_equal(jobs[i]->token, 0);
        job_free(jobs[i]);
    }
    /* at most max_tasks batch tasks per lease; the others wait for a free worker */
    assert_int_equal(queue_batch_create(q, &run, bid, &e), 0);
    char d[40];
    qc_enqueue(q, 0, "{}", d);
    assert_int_equal(queue_lease_many(q, "w", 4, 1, 0, jobs, &n, &e), 0);
    assert_int_equal(n, 3);
    int tasks = 0;
    for (size_t i = 0; i < n; i++) {
        if (jobs[i]->kind == JOB_KIND_BATCH_TASK) {
            tasks++;
            assert_string_equal(jobs[i]->batch_id, bid);
        } else {
            assert_true(strcmp(jobs[i]->id, c) == 0 || strcmp(jobs[i]->id, d) == 0);
        }
        job_free(jobs[i]);
    }
    assert_int_equal(tasks, 1);
    assert_int_equal(queue_queued(q), 1);
    assert_int_equal(queue_lease_many(q, "w", 4, 0, 0, jobs, &n, &e), 0);
    assert_int_equal(n, 0);
    assert_int_equal(queue_lease_many(q, "w", 4, 1, 0, jobs, &n, &e), 0);
    assert_int_equal(n, 1);
    assert_int_equal(jobs[0]->kind, JOB_KIND_BATCH_TASK);
    job_free(jobs[0]);
    assert_int_equal(queue_queued(q), 0);
}

static void test_fencing_retry_and_dead_letter(void **state)
{
    struct queue *q = *state;
    struct job *j1, *j2, *j;
    struct err e = {0};
    char id[40];

    qc_enqueue(q, 0, "{}", id);
    j1 = qc_lease(q);
    assert_int_equal(queue_extend(q, id, j1->token, 120000, &e), 0);
    /* the first attempt fails and is retried (backoff 0); the stale token is then fenced */
    assert_int_equal(queue_fail(q, id, j1->token, "boom 1", 1, &e), 0);
    j = qc_get(q, id);
    assert_int_equal(j->state, JOB_QUEUED);
    assert_int_equal(j->attempts, 1);
    job_free(j);
    j2 = qc_lease(q);
    assert_non_null(j2);
    assert_int_equal(j2->attempts, 2);
    assert_true(j2->token != j1->token);
    assert_int_equal(queue_complete(q, id, j1->token, "{}", 2, -1, &e), ERR_CONFLICT);
    assert_int_equal(queue_fail(q, id, j1->token, "late", 1, &e), ERR_CONFLICT);
    assert_int_equal(queue_extend(q, id, j1->token, 1000, &e), ERR_CONFLICT);
    assert_int_equal(queue_extend(q, id, j2->token, 1000, &e), 0);
    /* last attempt fails: dead letter with the last error */
    assert_int_equal(queue_fail(q, id, j2->token, "boom 2", 1, &e), 0);
    j = qc_get(q, id);
    assert_int_equal(j->state, JOB_FAILED);
    assert_string_equal(j->error, "boom 2");
    assert_true(j->finished_ms > 0);
    assert_int_equal(j->n_history, 2);
    assert_string_equal(j->history[0].error, "boom 1");
    assert_string_equal(j->history[1].error, "boom 2");
    job_free(j);
    /* a final job's attempt can neither report nor extend */
    assert_int_equal(queue_complete(q, id, j2->token, "{}", 2, -1, &e), ERR_CONFLICT);
    assert_int_equal(queue_extend(q, id, j2->token, 1000, &e), ERR_CONFLICT);
    job_free(j1);
    job_free(j2);
    assert_null(qc_lease(q));
    /* not retryable: failed at once, attempts left or not */
    qc_enqueue(q, 0, "{}", id);
    j = qc_lease(q);
    assert_int_equal(queue_fail(q, id, j->token, "not retryable", 0, &e), 0);
    job_free(j);
    assert_int_equal(qc_state(q, id), JOB_FAILED);
    assert_int_not_equal(queue_extend(q, "no-such-job", 1, 1000, &e), 0);
}

/* A retry waits out its backoff (--retry-backoff-ms, or the outcome's retry_after_ms). */
static void test_retry_backoff(void **state)
{
    struct queue *q = qc_reopen(state, (struct qc_config){1000, 0, 60000, 1024});
    struct job *j;
    struct err e = {0};
    char id[40], other[40];

    qc_enqueue(q, 0, "{}", id);
    j = qc_lease(q);
    assert_int_equal(queue_fail(q, id, j->token, "overloaded", 1, &e), 0);
    job_free(j);
    j = qc_get(q, id);
    assert_int_equal(j->state, JOB_QUEUED);
    assert_string_equal(j->error, "overloaded");
    job_free(j);
    assert_null(qc_lease(q)); /* not before a minute */
    /* with no backoff configured, the outcome's own delay */
    q = qc_reopen(state, QC_CONFIG_DEFAULT);
    qc_enqueue(q, 0, "{}", other);
    j = qc_lease(q);
    assert_non_null(j);
    assert_string_equal(j->id, other);
    struct queue_outcome o = {.id = other,
                              .token = j->token,
                              .error = "rate limited",
                              .retryable = 1,
                              .retry_after_ms = 60000};
    assert_int_equal(queue_finish_many(q, &o, 1, &e), 0);
    assert_int_equal(o.rc, 0);
    assert_int_equal(o.failed_final, 0);
    job_free(j);
    assert_int_equal(qc_state(q, other), JOB_QUEUED);
    assert_null(qc_lease(q));
}

static void test_finish_many(void **state)
{
    struct queue *q = *state;
    struct job_spec once = {.model = "m",
                            .input = "{}",
                            .input_len = 2,
                            .input_json_len = -1,
                            .max_attempts = 1,
                            .lease_timeout_ms = 60000};
    struct job *jobs[5] = {0};
    struct err e = {0};
    char ids[5][40];
    size_t n = 0;

    for (int i = 0; i < 4; i++)
        qc_enqueue(q, 0, "{}", ids[i]);
    qc_enqueue_spec(q, &once, ids[4]);
    assert_int_equal(queue_lease_many(q, "w", 5, 0, 0, jobs, &n, &e), 0);
    assert_int_equal(n, 5);
    struct queue_outcome outs[6] = {
        {.id = ids[0],
         .token = jobs[0]->token,
         .ok = 1,
         .result = "{\"r\":0}",
         .result_len = 7,
         .result_json_len = -1},
        {.id = ids[1], .token = jobs[1]->token, .error = "bad input", .retryable = 0},
        {.id = ids[2],
         .token = jobs[2]->token + 7,
         .ok = 1,
         .result = "{}",
         .result_len = 2,
         .result_json_len = -1}, /* a stale attempt: fenced out */
        {.id = ids[3], .token = jobs[3]->token, .error = "flaky", .retryable = 1},
        {.id = ids[4], .token = jobs[4]->token, .error = "flaky", .retryable = 1},
        {.id = "no-such-job",
         .token = 1,
         .ok = 1,
         .result = "{}",
         .result_len = 2,
         .result_json_len = -1},
    };
    for (int i = 0; i < 6; i++)
        outs[i].rc = 12345;
    assert_int_equal(queue_finish_many(q, outs, 6, &e), 0); /* fencing is no failure */
    assert_int_equal(outs[0].rc, 0);
    assert_int_equal(outs[0].failed_final, 0);
    assert_int_equal(outs[1].rc, 0);
    assert_int_equal(outs[1].failed_final, 1); /* not retryable */
    assert_int_equal(outs[2].rc, ERR_CONFLICT);
    assert_int_equal(outs[3].rc, 0);
    assert_int_equal(outs[3].failed_final, 0); /* runs again */
    assert_int_equal(outs[4].rc, 0);
    assert_int_equal(outs[4].failed_final, 1); /* its one attempt is spent */
    assert_true(outs[5].rc == ERR_CONFLICT || outs[5].rc == ERR_NOT_FOUND);
    assert_int_equal(qc_state(q, ids[0]), JOB_SUCCEEDED);
    assert_int_equal(qc_state(q, ids[1]), JOB_FAILED);
    assert_int_equal(qc_state(q, ids[2]), JOB_RUNNING);
    assert_int_equal(qc_state(q, ids[3]), JOB_QUEUED);
    assert_int_equal(qc_state(q, ids[4]), JOB_FAILED);
    struct job *j = NULL;
    assert_int_equal(queue_get(q, ids[0], NULL, 1, &j, &e), 0);
    assert_memory_equal(j->result.data, "{\"r\":0}", 7);
    job_free(j);
    /* the same outcome sent again is fenced: its attempt is over */
    assert_int_equal(queue_finish_many(q, outs, 1, &e), 0);
    assert_int_equal(outs[0].rc, ERR_CONFLICT);
    for (size_t i = 0; i < n; i++)
        job_free(jobs[i]);
}

/* A worker shutting down releases its job: queued again at once, the attempt not counted. */
static void test_released_attempt_is_not_counted(void **state)
{
    struct queue *q = *state;
    struct job_spec spec = {.model = "m",
                            .input = "{}",
                            .input_len = 2,
                            .input_json_len = -1,
                            .max_attempts = 1,
                            .lease_timeout_ms = 600000};
    struct job *j = NULL, *again = NULL;
    struct err e = {0};
    char id[40];

    qc_enqueue_spec(q, &spec, id);
    j = qc_lease(q);
    assert_non_null(j);
    struct queue_outcome o = {.id = j->id, .token = j->token, .error = "stopped", .released = 1};
    assert_int_equal(queue_finish_many(q, &o, 1, &e), 0);
    assert_int_equal(o.rc, 0);
    assert_int_equal(o.failed_final, 0);
    assert_int_equal(queue_queued(q), 1);
    /* a stale second release of the same attempt is fenced out */
    assert_int_equal(queue_finish_many(q, &o, 1, &e), 0);
    assert_int_equal(o.rc, ERR_CONFLICT);
    again = qc_lease(q); /* at once: no lease to wait out, no backoff */
    assert_non_null(again);
    assert_string_equal(again->id, id);
    assert_int_equal(again->attempts, 2);
    assert_int_equal(again->max_attempts, 1); /* its own; the released attempt is not counted */
    assert_int_equal(again->attempts_uncounted, 1);
    assert_int_equal(queue_complete(q, id, again->token, "{}", 2, -1, &e), 0);
    job_free(j);
    job_free(again);
    j = qc_get(q, id);
    assert_int_equal(j->state, JOB_SUCCEEDED);
    assert_int_equal(j->n_history, 2);
    job_free(j);
}

static int running_listed(struct queue *q, int cancelling)
{
    struct queue_list_filter f = {.state = JOB_RUNNING, .cancelling = cancelling, .limit = 100};
    json_t *o = qc_list(q, &f);
    int n = (int)json_array_size(json_object_get(o, "jobs"));

    json_decref(o);
    return n;
}

static void test_cancel(void **state)
{
    struct queue *q = *state;
    struct job *j, *running, *other;
    struct err e = {0};
    char queued[40], run[40], run2[40];
    uint64_t gen = queue_cancel_generation(q);

    qc_enqueue(q, 9, "{}", run);
    qc_enqueue(q, 8, "{}", run2);
    qc_enqueue(q, 0, "{}", queued);
    running = qc_lease(q);
    assert_string_equal(running->id, run);
    other = qc_lease(q);
    assert_string_equal(other->id, run2);
    /* queued: cancelled at once, never leased */
    assert_int_equal(queue_cancel(q, queued, NULL, &j, &e), 0);
    assert_int_equal(j->state, JOB_CANCELLED);
    job_free(j);
    assert_int_equal(queue_queued(q), 0);
    assert_int_equal(queue_cancel_generation(q), gen); /* nothing running was asked */
    assert_int_equal(queue_cancel(q, queued, NULL, &j, &e), ERR_CONFLICT);
    assert_int_equal(queue_cancel(q, "no-such-job", NULL, &j, &e), ERR_NOT_FOUND);
    assert_int_equal(running_listed(q, 1), 0);
    assert_int_equal(running_listed(q, 0), 2);
    /* running: marked now ("cancelling"), cancelled when it reports, result discarded */
    assert_int_equal(queue_cancel(q, run, NULL, &j, &e), 0);
    assert_int_equal(j->state, JOB_RUNNING);
    assert_int_equal(j->cancel_requested, 1);
    job_free(j);
    assert_true(queue_cancel_generation(q) != gen);
    assert_true(queue_cancel_noted(q, run));
    assert_false(queue_cancel_noted(q, run2));
    json_t *o = qc_job_json(q, run);
    assert_string_equal(qc_str(o, "status"), "cancelling");
    assert_true(json_is_true(json_object_get(o, "cancel_requested")));
    json_decref(o);
    assert_int_equal(running_listed(q, 1), 1);
    assert_int_equal(running_listed(q, 0), 1);
    assert_int_equal(running_listed(q, -1), 2);
    assert_int_equal(queue_complete(q, run, running->token, "{}", 2, -1, &e), 0);
    assert_int_equal(queue_get(q, run, NULL, 1, &j, &e), 0);
    assert_int_equal(j->state, JOB_CANCELLED);
    assert_int_equal(j->result.len, 0);
    job_free(j);
    /* a failure of an attempt asked to cancel ends it cancelled too, not retried */
    gen = queue_cancel_generation(q);
    assert_int_equal(queue_cancel(q, run2, NULL, &j, &e), 0);
    job_free(j);
    assert_true(queue_cancel_generation(q) != gen);
    assert_int_equal(queue_fail(q, run2, other->token, "interrupted", 1, &e), 0);
    assert_int_equal(qc_state(q, run2), JOB_CANCELLED);
    assert_int_equal(queue_cancel(q, run2, NULL, &j, &e), ERR_CONFLICT);
    job_free(running);
    job_free(other);
    assert_null(qc_lease(q));
}

/* Fails job `id`'s current attempt(s) until it is failed for good. */
static void fail_for_good(struct queue *q, const char *id)
{
    struct err e = {0};

    while (qc_state(q, id) != JOB_FAILED) {
        struct job *j = qc_lease(q);
        assert_non_null(j);
        assert_string_equal(j->id, id);
        assert_int_equal(queue_fail(q, id, j->token, "boom", 1, &e), 0);
        job_free(j);
    }
}

static void test_retry_and_redrive(void **state)
{
    struct queue *q = *state;
    struct job_spec spec_b = {.model = "b",
                              .input = "{}",
                              .input_len = 2,
                              .input_json_len = -1,
                              .max_attempts = 2,
                              .lease_timeout_ms = 60000};
    struct queue_list_filter f = {.state = JOB_FAILED, .cancelling = -1, .model = "m", .limit = 2};
    struct job *j;
    struct err e = {0};
    char a[3][40], b[40], queued[40];
    int64_t n = -1;

    for (int i = 0; i < 3; i++) {
        qc_enqueue(q, 0, "{}", a[i]);
        fail_for_good(q, a[i]);
    }
    qc_enqueue_spec(q, &spec_b, b);
    fail_for_good(q, b);
    qc_enqueue(q, 0, "{}", queued);
    /* one: back in the queue with a fresh attempt budget, its history kept */
    assert_int_equal(queue_retry(q, queued, NULL, &j, &e), ERR_CONFLICT);
    assert_int_equal(queue_retry(q, "no-such-job", NULL, &j, &e), ERR_NOT_FOUND);
    assert_int_equal(queue_cancel(q, queued, NULL, &j, &e), 0);
    job_free(j);
    assert_int_equal(queue_retry(q, a[0], NULL, &j, &e), 0);
    assert_int_equal(j->state, JOB_QUEUED);
    assert_int_equal(j->max_attempts, 2);
    assert_int_equal(j->attempts_uncounted, 2);
    job_free(j);
    assert_int_equal(queue_retry(q, a[0], NULL, &j, &e), ERR_CONFLICT); /* queued now */
    j = qc_lease(q);
    assert_string_equal(j->id, a[0]);
    assert_int_equal(j->attempts, 3);
    assert_int_equal(queue_fail(q, a[0], j->token, "boom again", 1, &e), 0);
    job_free(j);
    assert_int_equal(qc_state(q, a[0]), JOB_QUEUED); /* a second attempt is left */
    j = qc_lease(q);
    assert_int_equal(queue_complete(q, a[0], j->token, "{}", 2, -1, &e), 0);
    job_free(j);
    j = qc_get(q, a[0]);
    assert_int_equal(j->state, JOB_SUCCEEDED);
    assert_int_equal(j->n_history, 4);
    assert_string_equal(j->history[0].error, "boom");
    assert_null(j->error);
    job_free(j);

    /* bulk: of model m's failed jobs at most `limit`, then the rest; model b's stay */
    assert_int_equal(queue_retry_matching(q, &f, &n, &e), 0);
    assert_int_equal(n, 2);
    assert_int_equal(queue_retry_matching(q, &f, &n, &e), 0);
    assert_int_equal(n, 0);
    assert_int_equal(qc_state(q, a[1]), JOB_QUEUED);
    assert_int_equal(qc_state(q, a[2]), JOB_QUEUED);
    assert_int_equal(qc_state(q, b), JOB_FAILED);
    assert_int_equal(qc_state(q, queued), JOB_CANCELLED); /* only failed or expired ones */
    f.model = NULL;
    f.state = -1;
    f.limit = 100;
    assert_int_equal(queue_retry_matching(q, &f, &n, &e), 0);
    assert_int_equal(n, 1);
    assert_int_equal(qc_state(q, b), JOB_QUEUED);
    assert_int_equal(queue_queued(q), 3);
}

/* Ids of every job `f` lists, page by page (limit 3), newest first; returns how many. */
static size_t list_all(struct queue *q, struct queue_list_filter f, char ids[][40], size_t max)
{
    char cursor[40] = "";
    size_t n = 0;

    f.limit = 3;
    for (int page = 0; page < 100; page++) {
        f.cursor = cursor[0] ? cursor : NULL;
        json_t *o = qc_list(q, &f), *jobs = json_object_get(o, "jobs"), *job;
        const char *keys[] = {"jobs", "next_cursor", NULL};
        size_t i;
        qc_assert_keys(o, keys, "a page of jobs");
        assert_true(json_array_size(jobs) <= 3);
        json_array_foreach (jobs, i, job) {
            qc_assert_keys(job, job_keys, "a listed job");
            assert_true(n < max);
            snprintf(ids[n++], 40, "%s", qc_str(job, "id"));
        }
        const char *next = qc_str(o, "next_cursor");
        if (!next) {
            assert_true(json_is_null(json_object_get(o, "next_cursor")));
            json_decref(o);
            return n;
        }
        assert_int_equal(json_array_size(jobs), 3); /* a cursor only after a full page */
        snprintf(cursor, sizeof(cursor), "%s", next);
        json_decref(o);
    }
    fail_msg("%s: queue_list pages never end", qc_store->name);
    return n;
}

static int has_id(char ids[][40], size_t n, const char *id)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(ids[i], id) == 0)
            return 1;
    return 0;
}

static void test_list_filters_and_paging(void **state)
{
    struct queue *q = *state;
    struct job_spec other = {.model = "other",
                             .input = "{}",
                             .input_len = 2,
                             .input_json_len = -1,
                             .max_attempts = 1,
                             .lease_timeout_ms = 60000};
    const char *inputs[] = {"{}"}, *objects[] = {"o"};
    struct batch_job_spec run = {.definition = "{\"model\":\"m\"}",
                                 .model = "m",
                                 .max_attempts = 1,
                                 .lease_timeout_ms = 60000,
                                 .output = "/tmp/o",
                                 .task_inputs = inputs,
                                 .task_objects = objects,
                                 .n_tasks = 1,
                                 .finish_input = "{}"};
    struct queue_list_filter any = {.state = -1, .cancelling = -1, .limit = 3};
    char m[7][40], o1[40], o2[40], got[20][40], bid[40];
    struct err e = {0};
    struct job *j;
    size_t n;

    for (int i = 0; i < 7; i++)
        qc_enqueue(q, 0, "{}", m[i]);
    qc_enqueue_spec(q, &other, o1);
    qc_enqueue_spec(q, &other, o2);
    assert_int_equal(queue_batch_create(q, &run, bid, &e), 0); /* its task is not listed */
    n = list_all(q, any, got, 20);
    assert_int_equal(n, 9);
    for (int i = 0; i < 7; i++)
        assert_true(has_id(got, n, m[i]));
    assert_true(has_id(got, n, o1) && has_id(got, n, o2));
    /* newest first */
    assert_string_equal(got[0], o2);
    assert_string_equal(got[n - 1], m[0]);
    for (size_t i = 0; i < n; i++)
        for (size_t k = i + 1; k < n; k++)
            assert_string_not_equal(got[i], got[k]);

    struct queue_list_filter by_model = any;
    by_model.model = "other";
    n = list_all(q, by_model, got, 20);
    assert_int_equal(n, 2);
    /* states: one succeeded, one failed, the others queued */
    j = qc_lease(q); /* m[0]: the oldest of the highest priority */
    assert_string_equal(j->id, m[0]);
    assert_int_equal(queue_complete(q, j->id, j->token, "{}", 2, -1, &e), 0);
    job_free(j);
    j = qc_lease(q);
    assert_string_equal(j->id, m[1]);
    assert_int_equal(queue_fail(q, j->id, j->token, "bad", 0, &e), 0);
    job_free(j);
    struct queue_list_filter by_state = any;
    by_state.state = JOB_SUCCEEDED;
    n = list_all(q, by_state, got, 20);
    assert_int_equal(n, 1);
    assert_string_equal(got[0], m[0]);
    by_state.state = JOB_FAILED;
    n = list_all(q, by_state, got, 20);
    assert_int_equal(n, 1);
    assert_string_equal(got[0], m[1]);
    by_state.state = JOB_QUEUED;
    n = list_all(q, by_state, got, 20);
    assert_int_equal(n, 7);
    by_state.model = "other";
    n = list_all(q, by_state, got, 20);
    assert_int_equal(n, 2);
    /* a limit of 1 */
    any.limit = 1;
    json_t *o = qc_list(q, &any);
    assert_int_equal(json_array_size(json_object_get(o, "jobs")), 1);
    assert_non_null(qc_str(o, "next_cursor"));
    json_decref(o);
}

static void test_counts(void **state)
{
    struct queue *q = *state;
    int64_t counts[JOB_N_STATES];
    struct err e = {0};
    struct job *j;
    char ids[5][40];

    memset(counts, 0xff, sizeof(counts));
    assert_int_equal(queue_counts(q, counts, &e), 0);
    for (int s = 0; s < JOB_N_STATES; s++)
        assert_int_equal(counts[s], 0);
    assert_int_equal(queue_queued(q), 0);
    for (int i = 0; i < 5; i++)
        qc_enqueue(q, 9 - i, "{}", ids[i]);
    j = qc_lease(q);
    assert_int_equal(queue_complete(q, ids[0], j->token, "{}", 2, -1, &e), 0);
    job_free(j);
    j = qc_lease(q);
    assert_int_equal(queue_fail(q, ids[1], j->token, "bad", 0, &e), 0);
    job_free(j);
    j = qc_lease(q); /* ids[2] stays running */
    job_free(j);
    assert_int_equal(queue_cancel(q, ids[3], NULL, &j, &e), 0);
    job_free(j);
    assert_int_equal(queue_counts(q, counts, &e), 0);
    assert_int_equal(counts[JOB_QUEUED], 1);
    assert_int_equal(counts[JOB_RUNNING], 1);
    assert_int_equal(counts[JOB_SUCCEEDED], 1);
    assert_int_equal(counts[JOB_FAILED], 1);
    assert_int_equal(counts[JOB_CANCELLED], 1);
    assert_int_equal(counts[JOB_EXPIRED], 0);
    assert_int_equal(queue_queued(q), 1);
}

/* What on_final reported, from the store's thread. */
struct finals {
    pthread_mutex_t lock;
    int n;
    char id[16][40];
    enum job_state state[16];
};

static void on_final(void *ctx, const char *job_id, enum job_state s)
{
    struct finals *f = ctx;

    pthread_mutex_lock(&f->lock);
    if (f->n < 16) {
        snprintf(f->id[f->n], 40, "%s", job_id);
        f->state[f->n++] = s;
    }
    pthread_mutex_unlock(&f->lock);
}

/* The final state on_final reported for `id`, or -1. */
static int final_of(struct finals *f, const char *id)
{
    int s = -1;

    pthread_mutex_lock(&f->lock);
    for (int i = 0; i < f->n; i++)
        if (strcmp(f->id[i], id) == 0)
            s = (int)f->state[i];
    pthread_mutex_unlock(&f->lock);
    return s;
}

static void test_on_final(void **state)
{
    struct queue *q = *state;
    struct finals f = {.lock = PTHREAD_MUTEX_INITIALIZER};
    struct err e = {0};
    struct job *j;
    char ok[40], bad[40], gone[40], retried[40];

    queue_on_final(q, on_final, &f);
    for (int i = 0; i < 4; i++)
        qc_enqueue(q, 9 - i, "{}", i == 0 ? ok : i == 1 ? bad : i == 2 ? retried : gone);
    j = qc_lease(q);
    assert_int_equal(queue_complete(q, ok, j->token, "{}", 2, -1, &e), 0);
    job_free(j);
    j = qc_lease(q);
    assert_int_equal(queue_fail(q, bad, j->token, "bad", 0, &e), 0);
    job_free(j);
    j = qc_lease(q);
    assert_int_equal(queue_fail(q, retried, j->token, "flaky", 1, &e), 0); /* not final */
    job_free(j);
    assert_int_equal(queue_cancel(q, gone, NULL, &j, &e), 0);
    job_free(j);
    qc_poll(final_of(&f, ok) >= 0 && final_of(&f, bad) >= 0 && final_of(&f, gone) >= 0, 10,
            "on_final for the succeeded, failed and cancelled jobs");
    assert_int_equal(final_of(&f, ok), JOB_SUCCEEDED);
    assert_int_equal(final_of(&f, bad), JOB_FAILED);
    assert_int_equal(final_of(&f, gone), JOB_CANCELLED);
    assert_int_equal(final_of(&f, retried), -1);
    queue_on_final(q, NULL, NULL);
    /* once it returns, the listener is no longer called */
    pthread_mutex_lock(&f.lock);
    int before = f.n;
    pthread_mutex_unlock(&f.lock);
    j = qc_lease(q);
    assert_string_equal(j->id, retried);
    assert_int_equal(queue_complete(q, retried, j->token, "{}", 2, -1, &e), 0);
    job_free(j);
    assert_int_equal(qc_state(q, retried), JOB_SUCCEEDED);
    pthread_mutex_lock(&f.lock);
    assert_int_equal(f.n, before);
    pthread_mutex_unlock(&f.lock);
    pthread_mutex_destroy(&f.lock);
}

/* A job whose input is a file: the store keeps the location, not a body. */
static void test_input_location(void **state)
{
    struct queue *q = *state;
    struct job_spec spec = {.model = "m",
                            .input_json_len = -1,
                            .input_location = "s3://bucket/in/req.json",
                            .max_attempts = 1,
                            .lease_timeout_ms = 60000};
    struct job *j;
    struct err e = {0};
    char id[40];

    qc_enqueue_spec(q, &spec, id);
    j = qc_lease(q);
    assert_non_null(j);
    assert_string_equal(j->input_location, "s3://bucket/in/req.json");
    assert_int_equal(j->input.len, 0);
    assert_int_equal(queue_fail(q, id, j->token, "no such key", 0, &e), 0);
    job_free(j);
    /* it can run again: its input is still where it was */
    assert_int_equal(queue_retry(q, id, NULL, &j, &e), 0);
    job_free(j);
    j = qc_lease(q);
    assert_non_null(j);
    assert_string_equal(j->input_location, "s3://bucket/in/req.json");
    job_free(j);
}

/* The names users see, and the time format of every JSON shape. */
static void test_state_names_and_time(void **state)
{
    static const char *names[] = {"queued", "running",   "succeeded",
                                  "failed", "cancelled", "expired"};
    struct buf b = {0};

    (void)state;
    for (int s = 0; s < JOB_N_STATES; s++) {
        assert_string_equal(job_state_name((enum job_state)s), names[s]);
        assert_int_equal(job_state_parse(names[s]), s);
    }
    assert_int_equal(job_state_parse("cancelling"), -1); /* shown, never stored */
    assert_false(job_state_is_final(JOB_QUEUED) || job_state_is_final(JOB_RUNNING));
    assert_true(job_state_is_final(JOB_SUCCEEDED) && job_state_is_final(JOB_FAILED) &&
                job_state_is_final(JOB_CANCELLED) && job_state_is_final(JOB_EXPIRED));
    assert_int_equal(queue_json_time(&b, 0), 0);
    assert_int_equal(queue_json_time(&b, 1700000000123), 0);
    assert_int_equal(b.len, strlen("null\"2023-11-14T22:13:20.123Z\""));
    assert_memory_equal(b.data, "null\"2023-11-14T22:13:20.123Z\"", b.len);
    buf_release(&b);
    assert_true(clock_now_ms() > 1700000000000);
}

const struct CMUnitTest qc_jobs_tests[] = {
    QC_TEST(test_state_names_and_time),
    QC_TEST(test_enqueue_get_and_job_json),
    QC_TEST(test_idempotency_and_admission),
    QC_TEST(test_enqueue_async),
    QC_TEST(test_lifecycle_and_order),
    QC_TEST(test_get_want_result),
    QC_TEST(test_lease_wait_wakes_on_new_job),
    QC_TEST(test_lease_many_and_max_tasks),
    QC_TEST(test_fencing_retry_and_dead_letter),
    QC_TEST(test_retry_backoff),
    QC_TEST(test_finish_many),
    QC_TEST(test_released_attempt_is_not_counted),
    QC_TEST(test_cancel),
    QC_TEST(test_retry_and_redrive),
    QC_TEST(test_list_filters_and_paging),
    QC_TEST(test_counts),
    QC_TEST(test_on_final),
    QC_TEST(test_input_location),
};
const size_t qc_jobs_n = sizeof(qc_jobs_tests) / sizeof(qc_jobs_tests[0]);
