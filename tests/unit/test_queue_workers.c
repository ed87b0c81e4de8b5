/*
 * test_queue_workers.c: the queue contract for worker processes: heartbeats, the list and its
 * JSON, a clean leave, and the requeue of a dead worker's jobs.
 */
#include "queue_contract.h"

#include <stdlib.h>
#include <string.h>

/* The worker `id` as queue_workers_list has it; 0 when it is not listed. */
static int worker_listed(struct queue *q, const char *id, struct queue_worker *out)
{
    struct queue_worker *w = NULL;
    struct err e = {0};
    size_t n = 0;
    int found = 0;

    assert_int_equal(queue_workers_list(q, &w, &n, &e), 0);
    for (size_t i = 0; i < n; i++) {
        if (strcmp(w[i].id, id) == 0) {
            found = 1;
            if (out)
                *out = w[i];
        }
    }
    free(w);
    return found;
}

static void test_worker_id_of(void **state)
{
    char id[96];

    (void)state;
    queue_worker_id_of("host/12/abcd/3", id);
    assert_string_equal(id, "host/12/abcd");
    queue_worker_id_of("w", id);
    assert_string_equal(id, "w");
}

static void test_beat_list_and_json(void **state)
{
    struct queue *q = *state;
    int64_t started = clock_now_ms() - 5000;
    struct queue_worker a = {.id = "h1/10/aaaa",
                             .host = "h1",
                             .pid = 10,
                             .started_ms = started,
                             .timeout_ms = 60000,
                             .jobs_running = 2};
    struct queue_worker b = {.id = "h2/20/bbbb",
                             .host = "h2",
                             .pid = 20,
                             .started_ms = started + 1000,
                             .timeout_ms = 30000};
    struct queue_worker got, *all = NULL;
    struct buf out = {0};
    struct err e = {0};
    size_t n = 0;

    assert_int_equal(queue_workers_list(q, &all, &n, &e), 0);
    assert_int_equal(n, 0);
    free(all);
    assert_int_equal(queue_worker_beat(q, &a, &e), 0);
    assert_int_equal(queue_worker_beat(q, &b, &e), 0);
    assert_true(worker_listed(q, a.id, &got));
    assert_string_equal(got.host, "h1");
    assert_int_equal(got.pid, 10);
    assert_int_equal(got.started_ms, started);
    assert_int_equal(got.timeout_ms, 60000);
    assert_int_equal(got.jobs_running, 2);
    assert_true(got.heartbeat_ms >= started && got.heartbeat_ms <= clock_now_ms() + 1000);
    /* a beat refreshes what changed */
    a.jobs_running = 5;
    assert_int_equal(queue_worker_beat(q, &a, &e), 0);
    assert_true(worker_listed(q, a.id, &got));
    assert_int_equal(got.jobs_running, 5);
    /* oldest first */
    assert_int_equal(queue_workers_list(q, &all, &n, &e), 0);
    assert_int_equal(n, 2);
    assert_string_equal(all[0].id, a.id);
    assert_string_equal(all[1].id, b.id);
    assert_int_equal(queue_workers_json(all, n, &out), 0);
    free(all);
    json_t *o = qc_parse(&out), *list = json_object_get(o, "workers"), *w;
    const char *keys[] = {"id",        "host",         "pid", "started_at", "last_heartbeat",
                          "timeout_s", "jobs_running", NULL};
    size_t i;
    assert_int_equal(json_array_size(list), 2);
    json_array_foreach (list, i, w)
        qc_assert_keys(w, keys, "a worker's JSON");
    w = json_array_get(list, 0);
    assert_string_equal(qc_str(w, "id"), a.id);
    assert_string_equal(qc_str(w, "host"), "h1");
    assert_int_equal(json_integer_value(json_object_get(w, "pid")), 10);
    assert_true(json_number_value(json_object_get(w, "timeout_s")) == 60.0);
    assert_int_equal(json_integer_value(json_object_get(w, "jobs_running")), 5);
    assert_non_null(qc_str(w, "started_at"));
    assert_non_null(qc_str(w, "last_heartbeat"));
    json_decref(o);
    /* a clean leave */
    assert_int_equal(queue_worker_leave(q, b.id, &e), 0);
    assert_false(worker_listed(q, b.id, NULL));
    assert_true(worker_listed(q, a.id, NULL));
}

/* A worker silent past its timeout is presumed dead: its running job is queued again at once
 * (its lease is 10 minutes), its late outcome fenced out, its attempt's history says why, and
 * it leaves the list. A worker that leaves cleanly hands back what it still holds. */
static void test_dead_worker_jobs_are_requeued(void **state)
{
    struct queue *q = *state;
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

    dead.started_ms = live.started_ms = clock_now_ms();
    assert_int_equal(queue_worker_beat(q, &dead, &e), 0);
    assert_int_equal(queue_worker_beat(q, &live, &e), 0);
    assert_true(worker_listed(q, "h/1/aaaa", NULL));
    qc_enqueue_spec(q, &spec, id);
    j = qc_lease_as(q, "h/1/aaaa/0");
    assert_non_null(j);
    again = qc_get(q, id);
    assert_string_equal(again->worker, "h/1/aaaa");
    assert_int_equal(again->n_history, 1);
    assert_string_equal(again->history[0].worker, "h/1/aaaa");
    assert_int_equal(again->history[0].ended_ms, 0);
    job_free(again);
    again = NULL;
    /* sweeps: every 0.1 s (SQLite), 1 s (Redis); the live worker keeps beating meanwhile */
    qc_poll(queue_worker_beat(q, &live, &e) == 0 && (again = qc_lease_as(q, "h/2/bbbb/0")), 10,
            "the dead worker's job to be queued again");
    assert_string_equal(again->id, id);
    assert_int_equal(again->attempts, 2);
    assert_false(worker_listed(q, "h/1/aaaa", NULL));
    assert_true(worker_listed(q, "h/2/bbbb", NULL));
    assert_int_equal(queue_complete(q, id, j->token, "{}", 2, -1, &e), ERR_CONFLICT);
    job_free(j);
    /* the live worker leaves with the job: it is queued again at once */
    assert_int_equal(queue_worker_leave(q, "h/2/bbbb", &e), 0);
    assert_false(worker_listed(q, "h/2/bbbb", NULL));
    job_free(again);
    again = qc_lease(q);
    assert_non_null(again);
    assert_int_equal(again->attempts, 3);
    assert_int_equal(queue_complete(q, id, again->token, "{}", 2, -1, &e), 0);
    job_free(again);
    j = qc_get(q, id);
    assert_int_equal(j->state, JOB_SUCCEEDED);
    assert_int_equal(j->n_history, 3);
    assert_non_null(strstr(j->history[0].error, "heartbeat"));
    assert_non_null(strstr(j->history[1].error, "stopped"));
    assert_string_equal(j->history[1].worker, "h/2/bbbb");
    assert_null(j->history[2].error);
    assert_true(j->history[2].ended_ms > 0);
    job_free(j);
}

/* A dead worker's job on its last attempt fails rather than running again. */
static void test_dead_worker_last_attempt_fails(void **state)
{
    struct queue *q = *state;
    struct job_spec spec = {.model = "m",
                            .input = "{}",
                            .input_len = 2,
                            .input_json_len = -1,
                            .max_attempts = 1,
                            .lease_timeout_ms = 600000};
    struct queue_worker dead = {.id = "h/3/cccc", .host = "h", .pid = 3, .timeout_ms = 300};
    struct job *j;
    struct err e = {0};
    char id[40];

    dead.started_ms = clock_now_ms();
    assert_int_equal(queue_worker_beat(q, &dead, &e), 0);
    qc_enqueue_spec(q, &spec, id);
    j = qc_lease_as(q, "h/3/cccc/1");
    assert_non_null(j);
    job_free(j);
    qc_poll((job_free(qc_lease(q)), qc_state(q, id) == JOB_FAILED), 10,
            "the dead worker's job on its last attempt to fail");
    j = qc_get(q, id);
    assert_non_null(j->error);
    job_free(j);
    assert_false(worker_listed(q, "h/3/cccc", NULL));
}

const struct CMUnitTest qc_workers_tests[] = {
    QC_TEST(test_worker_id_of),
    QC_TEST(test_beat_list_and_json),
    QC_TEST(test_dead_worker_jobs_are_requeued),
    QC_TEST(test_dead_worker_last_attempt_fails),
};
const size_t qc_workers_n = sizeof(qc_workers_tests) / sizeof(qc_workers_tests[0]);
