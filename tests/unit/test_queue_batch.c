/*
 * test_queue_batch.c: the queue contract for batch jobs: a run's tasks and finishing job, its
 * public JSON, progress and manifest, failure and cancellation, admission, listing by status,
 * schedules (due, pause and resume, a scheduled run made exactly once), and definitions.
 */
#include "queue_contract.h"

#include <stdlib.h>
#include <string.h>

#define HOOK "http://user:s3cret@127.0.0.1:9/batch-hook"

static const char *const task_inputs[] = {"{\"object\":\"a.jsonl\"}", "{\"object\":\"b.jsonl\"}",
                                          "{\"object\":\"c.jsonl\"}"};
static const char *const task_objects[] = {"a.jsonl", "b.jsonl", "c.jsonl"};

/* A run of `n` tasks (at most 3) of model "m", one attempt each. */
static struct batch_job_spec run_spec(size_t n)
{
    return (struct batch_job_spec){
        .definition = "{\"model\":\"m\",\"input\":\"file:///in/\",\"output\":\"file:///out/\"}",
        .model = "m",
        .max_errors = 0,
        .max_attempts = 1,
        .lease_timeout_ms = 60000,
        .output = "file:///out/",
        .task_inputs = task_inputs,
        .task_objects = task_objects,
        .n_tasks = n,
        .finish_input = "{\"finish\":true}"};
}

static void create(struct queue *q, const struct batch_job_spec *spec, char id[40])
{
    struct err e = {0};
    int rc = queue_batch_create(q, spec, id, &e);

    if (rc != 0)
        fail_msg("%s: queue_batch_create: %d %s", qc_store->name, rc, e.msg);
}

/* Leases the next batch task (or finishing job); NULL when none. */
static struct job *lease_task(struct queue *q)
{
    struct job *jobs[1] = {0};
    struct err e = {0};
    size_t n = 0;

    assert_int_equal(queue_lease_many(q, "w", 1, 1, 0, jobs, &n, &e), 0);
    return n ? jobs[0] : NULL;
}

static const char *status_of(struct queue *q, const char *id, json_t **keep)
{
    *keep = qc_batch_json(q, id);
    return qc_str(*keep, "status");
}

static int64_t progress(const json_t *o, const char *key)
{
    return json_integer_value(json_object_get(json_object_get(o, "progress"), key));
}

static size_t n_due(struct queue *q, int64_t now_ms)
{
    struct queue_schedule *due = NULL;
    struct err e = {0};
    size_t n = 0;

    assert_int_equal(queue_schedules_due(q, now_ms, &due, &n, &e), 0);
    queue_schedules_free(due, n);
    return n;
}

static const char *const run_keys[] = {"model",    "input",      "output",     "id",
                                       "status",   "created_at", "started_at", "finished_at",
                                       "progress", "error",      NULL};

static void test_run_lifecycle(void **state)
{
    struct queue *q = *state;
    struct batch_job_spec spec = run_spec(2);
    struct queue_outbox_item *items = NULL;
    struct queue_schedule *def = NULL;
    struct job *t1, *t2, *fin;
    struct buf b = {0};
    struct err e = {0};
    char id[40];
    json_t *o;
    size_t n = 0;

    spec.definition = "{\"model\":\"m\",\"input\":\"file:///in/\",\"callback_url\":\"" HOOK "\"}";
    spec.callback_url = HOOK;
    create(q, &spec, id);
    assert_int_equal(queue_queued(q), 2);
    o = qc_batch_json(q, id);
    const char *keys_cb[] = {"model",    "input",      "callback_url", "id",
                             "status",   "created_at", "started_at",   "finished_at",
                             "progress", "error",      "output",       NULL};
    qc_assert_keys(o, keys_cb, "a run's JSON");
    assert_string_equal(qc_str(o, "id"), id);
    assert_string_equal(qc_str(o, "status"), "queued");
    assert_string_equal(qc_str(o, "model"), "m"); /* the definition's options */
    assert_string_equal(qc_str(o, "output"), "file:///out/");
    assert_non_null(qc_str(o, "created_at"));
    assert_true(json_is_null(json_object_get(o, "started_at")));
    assert_true(json_is_null(json_object_get(o, "error")));
    assert_null(strstr(qc_str(o, "callback_url"), "s3cret"));
    assert_int_equal(progress(o, "objects_total"), 2);
    assert_int_equal(progress(o, "objects_done"), 0);
    assert_int_equal(progress(o, "records_done"), 0);
    assert_int_equal(progress(o, "records_failed"), 0);
    json_decref(o);
    assert_int_equal(queue_batch_get(q, "batch-nope", NULL, &b, &e), ERR_NOT_FOUND);
    assert_int_equal(queue_batch_definition(q, id, NULL, &def, &e), 0);
    assert_string_equal(def->id, id);
    assert_string_equal(def->definition, spec.definition);
    assert_null(def->schedule);
    assert_int_equal(def->state, JOB_QUEUED);
    queue_schedules_free(def, 1);

    /* its tasks run; the run is running from its first */
    t1 = lease_task(q);
    assert_non_null(t1);
    assert_int_equal(t1->kind, JOB_KIND_BATCH_TASK);
    assert_string_equal(t1->batch_id, id);
    assert_string_equal(t1->model, "m");
    assert_int_equal(t1->max_attempts, 1);
    assert_int_equal(t1->lease_timeout_ms, 60000);
    t2 = lease_task(q);
    assert_non_null(t2);
    assert_null(lease_task(q)); /* the finishing job comes after the last task */
    assert_string_equal(status_of(q, id, &o), "running");
    assert_non_null(qc_str(o, "started_at"));
    json_decref(o);
    assert_int_equal(qc_n_batches_listed(q, NULL, "running"), 1);
    /* tasks are not inference jobs: the job listing does not show them */
    struct queue_list_filter f = {.state = -1, .cancelling = -1, .limit = 10};
    o = qc_list(q, &f);
    assert_int_equal(json_array_size(json_object_get(o, "jobs")), 0);
    json_decref(o);

    const char *r1 = "{\"object\":\"a.jsonl\",\"records\":3,\"errors\":0,\"sha256\":\"aa\","
                     "\"input\":{\"etag\":\"e1\"}}";
    const char *r2 = "{\"object\":\"b.jsonl\",\"records\":4,\"errors\":0,\"sha256\":\"bb\"}";
    assert_int_equal(queue_batch_progress(q, id, t1->id, t1->token, 2, &e), 0);
    o = qc_batch_json(q, id);
    assert_int_equal(progress(o, "records_done"), 2);
    json_decref(o);
    assert_int_equal(queue_complete(q, t1->id, t1->token, r1, strlen(r1), -1, &e), 0);
    o = qc_batch_json(q, id);
    assert_int_equal(progress(o, "objects_done"), 1);
    assert_int_equal(progress(o, "records_done"), 3); /* the object's records, counted once */
    json_decref(o);
    assert_int_equal(queue_complete(q, t2->id, t2->token, r2, strlen(r2), -1, &e), 0);
    /* the finishing job, queued with the last success */
    fin = lease_task(q);
    assert_non_null(fin);
    assert_int_equal(fin->kind, JOB_KIND_BATCH_FINISH);
    assert_string_equal(fin->batch_id, id);
    assert_memory_equal(fin->input.data, "{\"finish\":true}", fin->input.len);
    assert_string_equal(status_of(q, id, &o), "running");
    json_decref(o);
    assert_int_equal(queue_batch_manifest(q, id, NULL, &b, &e), 0);
    o = qc_parse(&b);
    assert_string_equal(qc_str(o, "model"), "m");
    json_t *objs = json_object_get(o, "objects");
    assert_int_equal(json_object_size(objs), 2);
    json_t *a = json_object_get(objs, "a.jsonl"), *bo = json_object_get(objs, "b.jsonl");
    assert_int_equal(json_integer_value(json_object_get(a, "records")), 3);
    assert_string_equal(qc_str(a, "sha256"), "aa");
    assert_string_equal(qc_str(json_object_get(a, "input"), "etag"), "e1");
    assert_int_equal(json_integer_value(json_object_get(bo, "records")), 4);
    assert_null(json_object_get(bo, "input"));
    json_decref(o);
    assert_int_equal(queue_complete(q, fin->id, fin->token, "{}", 2, -1, &e), 0);
    o = qc_batch_json(q, id);
    assert_string_equal(qc_str(o, "status"), "succeeded");
    assert_non_null(qc_str(o, "finished_at"));
    assert_int_equal(progress(o, "objects_done"), 2);
    assert_int_equal(progress(o, "records_done"), 7);
    json_decref(o);
    assert_int_equal(qc_n_batches_listed(q, NULL, "succeeded"), 1);
    assert_int_equal(queue_queued(q), 0); /* nothing left waiting: admission is whole again */
    assert_int_equal(queue_batch_cancel(q, id, NULL, &b, &e), ERR_CONFLICT);
    buf_release(&b);
    assert_int_equal(queue_batch_manifest(q, "batch-nope", NULL, &b, &e), ERR_NOT_FOUND);
    buf_release(&b);
    job_free(t1);
    job_free(t2);
    job_free(fin);

    /* its webhook: batch.succeeded, stored with the end of the run */
    assert_int_equal(queue_outbox_due(q, clock_now_ms() + 1000, 10, &items, &n, &e), 0);
    assert_int_equal(n, 1);
    assert_string_equal(items[0].url, HOOK);
    o = json_loadb(items[0].body, items[0].body_len, 0, NULL);
    const char *keys[] = {"id", "type", "batch_job", NULL};
    qc_assert_keys(o, keys, "a batch event");
    assert_string_equal(qc_str(o, "id"), items[0].event_id);
    assert_string_equal(qc_str(o, "type"), "batch.succeeded");
    assert_string_equal(qc_str(json_object_get(o, "batch_job"), "id"), id);
    assert_string_equal(qc_str(json_object_get(o, "batch_job"), "status"), "succeeded");
    assert_null(strstr(items[0].body, "s3cret"));
    json_decref(o);
    queue_outbox_items_free(items, n);
}

/* A task that fails for good fails the run and cancels its other tasks. */
static void test_failed_task_fails_run(void **state)
{
    struct queue *q = *state;
    struct batch_job_spec spec = run_spec(3);
    struct job *t;
    struct err e = {0};
    char id[40];
    json_t *o;

    create(q, &spec, id);
    t = lease_task(q);
    assert_non_null(t);
    assert_int_equal(queue_fail(q, t->id, t->token, "a.jsonl: not found", 0, &e), 0);
    job_free(t);
    o = qc_batch_json(q, id);
    assert_string_equal(qc_str(o, "status"), "failed");
    assert_non_null(strstr(qc_str(o, "error"), "not found"));
    assert_non_null(qc_str(o, "finished_at"));
    json_decref(o);
    assert_int_equal(queue_queued(q), 0); /* the other tasks were cancelled */
    assert_null(lease_task(q));
    assert_int_equal(qc_n_batches_listed(q, NULL, "failed"), 1);
    assert_int_equal(qc_n_batches_listed(q, NULL, "queued"), 0);
}

/* A task cancelled on its own fails its run: the run cannot be whole without it. */
static void test_cancelled_task_fails_run(void **state)
{
    struct queue *q = *state;
    struct batch_job_spec spec = run_spec(2);
    struct job *t, *c;
    struct err e = {0};
    char id[40];
    json_t *o;

    create(q, &spec, id);
    t = lease_task(q);
    assert_non_null(t);
    assert_int_equal(queue_cancel(q, t->id, NULL, &c, &e), 0);
    job_free(c);
    assert_int_equal(queue_complete(q, t->id, t->token, "{}", 2, -1, &e), 0);
    assert_int_equal(qc_state(q, t->id), JOB_CANCELLED);
    o = qc_batch_json(q, id);
    assert_string_equal(qc_str(o, "status"), "failed");
    assert_non_null(strstr(qc_str(o, "error"), t->id));
    json_decref(o);
    job_free(t);
    assert_int_equal(queue_queued(q), 0);
    assert_null(lease_task(q));
}

/* Bad records past max_errors fail the run. */
static void test_max_errors_fails_run(void **state)
{
    struct queue *q = *state;
    struct batch_job_spec spec = run_spec(2);
    struct job *t;
    struct err e = {0};
    char id[40];
    json_t *o;

    spec.max_errors = 1;
    create(q, &spec, id);
    t = lease_task(q);
    const char *r = "{\"object\":\"a.jsonl\",\"records\":5,\"errors\":2}";
    assert_int_equal(queue_complete(q, t->id, t->token, r, strlen(r), -1, &e), 0);
    job_free(t);
    o = qc_batch_json(q, id);
    assert_string_equal(qc_str(o, "status"), "failed");
    assert_non_null(strstr(qc_str(o, "error"), "max_errors"));
    assert_int_equal(progress(o, "records_failed"), 2);
    json_decref(o);
    assert_int_equal(queue_queued(q), 0);
}

/* A run with no input objects goes straight to its finishing job. */
static void test_empty_run_finishes(void **state)
{
    struct queue *q = *state;
    struct batch_job_spec spec = run_spec(0);
    struct err e = {0};
    struct job *fin;
    char id[40];
    json_t *o;

    create(q, &spec, id);
    assert_int_equal(queue_queued(q), 1);
    fin = lease_task(q);
    assert_non_null(fin);
    assert_int_equal(fin->kind, JOB_KIND_BATCH_FINISH);
    assert_string_equal(fin->batch_id, id);
    assert_int_equal(queue_complete(q, fin->id, fin->token, "{}", 2, -1, &e), 0);
    job_free(fin);
    o = qc_batch_json(q, id);
    assert_string_equal(qc_str(o, "status"), "succeeded");
    assert_int_equal(progress(o, "objects_total"), 0);
    json_decref(o);
}

/* A run that failed before it started is stored failed, with no tasks. */
static void test_run_failed_before_start(void **state)
{
    struct queue *q = *state;
    struct batch_job_spec spec = run_spec(0);
    char id[40];
    json_t *o;

    spec.error = "input: no objects under file:///in/";
    create(q, &spec, id);
    o = qc_batch_json(q, id);
    assert_string_equal(qc_str(o, "status"), "failed");
    assert_string_equal(qc_str(o, "error"), spec.error);
    json_decref(o);
    assert_int_equal(queue_queued(q), 0);
}

static void test_cancel_run(void **state)
{
    struct queue *q = *state;
    struct batch_job_spec spec = run_spec(3);
    struct job *t, *j;
    struct buf b = {0};
    struct err e = {0};
    char id[40];

    create(q, &spec, id);
    t = lease_task(q);
    assert_non_null(t);
    assert_int_equal(queue_batch_cancel(q, id, NULL, &b, &e), 0);
    json_t *o = qc_parse(&b);
    assert_string_equal(qc_str(o, "id"), id);
    assert_string_equal(qc_str(o, "status"), "cancelled");
    json_decref(o);
    assert_int_equal(queue_queued(q), 0); /* queued tasks cancelled */
    j = qc_get(q, t->id);                 /* the running one is asked to stop */
    assert_int_equal(j->state, JOB_RUNNING);
    assert_int_equal(j->cancel_requested, 1);
    job_free(j);
    assert_int_equal(queue_complete(q, t->id, t->token, "{}", 2, -1, &e), 0);
    assert_int_equal(qc_state(q, t->id), JOB_CANCELLED);
    job_free(t);
    assert_string_equal(status_of(q, id, &o), "cancelled");
    json_decref(o);
    assert_int_equal(queue_batch_cancel(q, id, NULL, &b, &e), ERR_CONFLICT);
    buf_release(&b);
    assert_int_equal(queue_batch_cancel(q, "batch-nope", NULL, &b, &e), ERR_NOT_FOUND);
    buf_release(&b);
    assert_int_equal(qc_n_batches_listed(q, NULL, "cancelled"), 1);
    assert_null(lease_task(q));
}

/* A run whose tasks would pass --max-queue is refused whole. */
static void test_run_admission(void **state)
{
    struct queue *q = qc_reopen(state, (struct qc_config){2, 0, 0, 1024});
    struct batch_job_spec spec = run_spec(3);
    struct err e = {0};
    char id[40];

    assert_int_equal(queue_batch_create(q, &spec, id, &e), ERR_BUSY);
    assert_int_equal(queue_queued(q), 0);
    assert_int_equal(qc_n_batches_listed(q, NULL, NULL), 0);
    spec.n_tasks = 2;
    create(q, &spec, id);
    assert_int_equal(queue_queued(q), 2);
}

/* Listed newest first; runs of a schedule are listed with it, not on their own. */
static void test_list(void **state)
{
    struct queue *q = *state;
    struct batch_job_spec spec = run_spec(1);
    struct buf b = {0};
    struct err e = {0};
    char ids[3][40];

    for (int i = 0; i < 3; i++)
        create(q, &spec, ids[i]);
    assert_int_equal(queue_batch_list(q, NULL, 10, NULL, &b, &e), 0);
    json_t *o = qc_parse(&b), *list = json_object_get(o, "batch_jobs");
    const char *keys[] = {"batch_jobs", NULL};
    qc_assert_keys(o, keys, "a batch job listing");
    assert_int_equal(json_array_size(list), 3);
    assert_string_equal(qc_str(json_array_get(list, 0), "id"), ids[2]);
    assert_string_equal(qc_str(json_array_get(list, 2), "id"), ids[0]);
    qc_assert_keys(json_array_get(list, 0), run_keys, "a listed run");
    json_decref(o);
    assert_int_equal(queue_batch_list(q, NULL, 2, NULL, &b, &e), 0);
    o = qc_parse(&b);
    assert_int_equal(json_array_size(json_object_get(o, "batch_jobs")), 2);
    json_decref(o);
    assert_int_equal(qc_n_batches_listed(q, NULL, "queued"), 3);
    assert_int_equal(qc_n_batches_listed(q, NULL, "running"), 0);
    assert_int_equal(qc_n_batches_listed(q, NULL, "scheduled"), 0);
}

/* A scheduled run is made once however many schedulers try: the second is ERR_CONFLICT. */
static void test_scheduled_run_fires_once(void **state)
{
    struct queue *q = *state;
    int64_t now = clock_now_ms(), due_at = now - 1000, next = now + 86400000;
    struct batch_job_spec sched = {.definition = "{\"model\":\"m\",\"schedule\":\"@daily\"}",
                                   .model = "m",
                                   .max_attempts = 1,
                                   .lease_timeout_ms = 60000,
                                   .schedule = "@daily",
                                   .next_run_ms = due_at};
    struct batch_job_spec run = run_spec(1);
    struct queue_schedule *due = NULL;
    struct err e = {0};
    char sid[40], rid[40], again[40];
    size_t n = 0;

    create(q, &sched, sid);
    assert_int_equal(queue_queued(q), 0); /* a schedule runs nothing by itself */
    json_t *o = qc_batch_json(q, sid);
    const char *keys[] = {"model",      "schedule",    "id",   "status",
                          "created_at", "next_run_at", "runs", NULL};
    qc_assert_keys(o, keys, "a schedule's JSON");
    assert_string_equal(qc_str(o, "status"), "scheduled");
    assert_non_null(qc_str(o, "next_run_at"));
    assert_int_equal(json_array_size(json_object_get(o, "runs")), 0);
    json_decref(o);
    assert_int_equal(n_due(q, due_at - 1), 0);
    assert_int_equal(queue_schedules_due(q, now, &due, &n, &e), 0);
    assert_int_equal(n, 1);
    assert_string_equal(due[0].id, sid);
    assert_string_equal(due[0].schedule, "@daily");
    assert_string_equal(due[0].definition, sched.definition);
    assert_int_equal(due[0].next_run_ms, due_at);
    queue_schedules_free(due, n);

    run.parent = sid;
    run.run_at_ms = due_at;
    run.parent_next_run_ms = next;
    create(q, &run, rid);
    assert_int_equal(queue_batch_create(q, &run, again, &e), ERR_CONFLICT);
    assert_int_equal(queue_queued(q), 1); /* one run's one task */
    assert_int_equal(n_due(q, now), 0);   /* moved on to its next run */
    assert_int_equal(n_due(q, next), 1);
    o = qc_batch_json(q, sid);
    json_t *runs = json_object_get(o, "runs");
    assert_int_equal(json_array_size(runs), 1);
    assert_string_equal(qc_str(json_array_get(runs, 0), "id"), rid);
    json_decref(o);
    o = qc_batch_json(q, rid);
    assert_string_equal(qc_str(o, "schedule_id"), sid);
    assert_non_null(qc_str(o, "run_at"));
    assert_null(json_object_get(o, "schedule"));
    json_decref(o);
    assert_int_equal(qc_n_batches_listed(q, NULL, NULL), 1); /* the schedule, its run with it */
    assert_int_equal(qc_n_batches_listed(q, NULL, "scheduled"), 1);
}

/* Pause and resume, a run started by hand, progress inside a running task, the status filter. */
static void test_schedule_pause_and_progress(void **state)
{
    struct queue *q = *state;
    int64_t now = clock_now_ms();
    struct batch_job_spec sched = {.definition = "{\"model\":\"m\",\"schedule\":\"@daily\"}",
                                   .model = "m",
                                   .max_attempts = 1,
                                   .lease_timeout_ms = 60000,
                                   .schedule = "@daily",
                                   .next_run_ms = now - 60000};
    struct batch_job_spec run = run_spec(1);
    struct queue_schedule *def = NULL;
    struct buf b = {0};
    struct err e = {0};
    struct job *jobs[2];
    char sid[40], rid[40], hand[40];
    size_t n = 0;
    json_t *o;

    create(q, &sched, sid);
    assert_int_equal(n_due(q, clock_now_ms()), 1);
    assert_int_equal(queue_batch_pause(q, sid, NULL, 1, 0, &b, &e), 0);
    o = qc_parse(&b);
    assert_string_equal(qc_str(o, "status"), "paused");
    assert_true(json_is_null(json_object_get(o, "next_run_at")));
    json_decref(o);
    assert_int_equal(queue_batch_pause(q, sid, NULL, 1, 0, &b, &e), 0); /* already: no change */
    buf_release(&b);
    assert_int_equal(n_due(q, clock_now_ms()), 0);
    assert_int_equal(queue_batch_definition(q, sid, NULL, &def, &e), 0);
    assert_int_equal(def->state, QUEUE_SCHEDULE_PAUSED);
    assert_string_equal(def->schedule, "@daily");
    assert_string_equal(def->definition, sched.definition);
    queue_schedules_free(def, 1);
    assert_int_equal(qc_n_batches_listed(q, NULL, "paused"), 1);
    assert_int_equal(qc_n_batches_listed(q, NULL, "scheduled"), 0);

    /* a run by hand while paused: stored though the schedule is not due, nothing claimed */
    run.parent = sid;
    run.run_at_ms = now;
    run.by_hand = 1;
    create(q, &run, hand);
    o = qc_batch_json(q, sid);
    assert_int_equal(json_array_size(json_object_get(o, "runs")), 1);
    json_decref(o);
    run.parent = NULL;
    run.by_hand = 0;
    assert_int_equal(queue_batch_cancel(q, hand, NULL, &b, &e), 0);
    buf_release(&b);

    assert_int_equal(queue_batch_pause(q, sid, NULL, 0, now - 1000, &b, &e), 0);
    o = qc_parse(&b);
    assert_string_equal(qc_str(o, "status"), "scheduled");
    json_decref(o);
    assert_int_equal(n_due(q, clock_now_ms()), 1);
    assert_int_equal(qc_n_batches_listed(q, NULL, "scheduled"), 1);
    assert_int_equal(queue_batch_definition(q, sid, NULL, &def, &e), 0);
    assert_int_equal(def->state, QUEUE_SCHEDULE_ACTIVE);
    assert_int_equal(def->next_run_ms, now - 1000);
    queue_schedules_free(def, 1);

    /* a run: it does not pause; its running task's progress counts until it is done */
    create(q, &run, rid);
    assert_int_equal(queue_batch_pause(q, rid, NULL, 1, 0, &b, &e), ERR_CONFLICT);
    assert_int_equal(queue_batch_pause(q, "batch-nope", NULL, 1, 0, &b, &e), ERR_NOT_FOUND);
    assert_int_equal(queue_batch_definition(q, "batch-nope", NULL, &def, &e), ERR_NOT_FOUND);
    assert_int_equal(queue_lease_many(q, "w", 2, 1, 0, jobs, &n, &e), 0);
    assert_int_equal(n, 1);
    assert_int_equal(queue_batch_progress(q, rid, jobs[0]->id, jobs[0]->token, 5, &e), 0);
    o = qc_batch_json(q, rid);
    assert_int_equal(progress(o, "records_done"), 5);
    json_decref(o);
    /* an attempt that no longer holds the task changes nothing */
    assert_int_equal(queue_batch_progress(q, rid, jobs[0]->id, jobs[0]->token + 1, 900, &e), 0);
    o = qc_batch_json(q, rid);
    assert_int_equal(progress(o, "records_done"), 5);
    json_decref(o);
    assert_int_equal(qc_n_batches_listed(q, NULL, "running"), 1);
    const char *result = "{\"object\":\"a.jsonl\",\"records\":7,\"errors\":0}";
    assert_int_equal(queue_complete(q, jobs[0]->id, jobs[0]->token, result, strlen(result), -1, &e),
                     0);
    o = qc_batch_json(q, rid);
    assert_int_equal(progress(o, "records_done"), 7); /* the object's records, counted once */
    json_decref(o);
    job_free(jobs[0]);
    assert_int_equal(qc_n_batches_listed(q, NULL, NULL),
                     2); /* runs of a schedule are listed with it */
    assert_int_equal(qc_n_batches_listed(q, NULL, "cancelled"), 0);
    assert_int_equal(queue_batch_cancel(q, sid, NULL, &b, &e), 0);
    buf_release(&b);
    assert_int_equal(qc_n_batches_listed(q, NULL, "cancelled"), 1);
    assert_int_equal(n_due(q, clock_now_ms()), 0);
    assert_int_equal(queue_batch_pause(q, sid, NULL, 0, now, &b, &e), ERR_CONFLICT);
    assert_non_null(strstr(e.msg, "cancelled"));
    assert_int_equal(queue_batch_definition(q, sid, NULL, &def, &e), 0);
    assert_int_equal(def->state, JOB_CANCELLED);
    queue_schedules_free(def, 1);
}

static int batch_gone(struct queue *q, const char *id)
{
    struct buf b = {0};
    struct err e = {0};
    int rc = queue_batch_get(q, id, NULL, &b, &e);

    buf_release(&b);
    return rc == ERR_NOT_FOUND;
}

/* A finished run goes --result-ttl-s after it ended, with its tasks, as a finished job does;
 * a run still going and a schedule stay. */
static void test_run_retention(void **state)
{
    struct queue *q = qc_reopen(state, (struct qc_config){1000, 1, 0, 1024});
    int64_t now = clock_now_ms();
    struct batch_job_spec spec = run_spec(2);
    struct batch_job_spec sched = {.definition = "{\"model\":\"m\",\"schedule\":\"@daily\"}",
                                   .model = "m",
                                   .max_attempts = 1,
                                   .lease_timeout_ms = 60000,
                                   .schedule = "@daily",
                                   .next_run_ms = now - 1000};
    struct buf b = {0};
    struct err e = {0};
    char done[40], going[40], sid[40], rid[40], task[40], queued_task[40];
    struct job *t;

    create(q, &spec, done);
    t = lease_task(q);
    assert_non_null(t);
    snprintf(task, sizeof(task), "%s", t->id);
    assert_int_equal(queue_complete(q, t->id, t->token, "{\"records\":1}", 13, -1, &e), 0);
    job_free(t);
    t = lease_task(q); /* the other task: cancelled with its run */
    assert_non_null(t);
    snprintf(queued_task, sizeof(queued_task), "%s", t->id);
    assert_int_equal(queue_batch_cancel(q, done, NULL, &b, &e), 0);
    buf_release(&b);
    assert_int_equal(queue_complete(q, t->id, t->token, "{}", 2, -1, &e), 0);
    job_free(t);
    create(q, &sched, sid);
    spec.parent = sid;
    spec.run_at_ms = now - 1000;
    spec.parent_next_run_ms = now + 86400000;
    create(q, &spec, rid);
    assert_int_equal(queue_batch_cancel(q, rid, NULL, &b, &e), 0);
    buf_release(&b);
    spec = run_spec(1);
    create(q, &spec, going);

    qc_poll(batch_gone(q, done), 10, "the cancelled run to go after its 1 s of retention");
    qc_poll(qc_job_gone(q, task), 10, "the finished run's succeeded task to go with it");
    qc_poll(qc_job_gone(q, queued_task), 10, "the finished run's cancelled task to go with it");
    qc_poll(batch_gone(q, rid), 10, "the schedule's cancelled run to go");
    json_t *o = qc_batch_json(q, sid); /* the schedule stays, without its retired run */
    assert_string_equal(qc_str(o, "status"), "scheduled");
    assert_int_equal(json_array_size(json_object_get(o, "runs")), 0);
    json_decref(o);
    assert_string_equal(status_of(q, going, &o), "queued");
    json_decref(o);
    assert_int_equal(qc_n_batches_listed(q, NULL, NULL),
                     2); /* the schedule and the run still waiting */
    assert_int_equal(queue_queued(q), 1);
}

const struct CMUnitTest qc_batch_tests[] = {
    QC_TEST(test_run_lifecycle),
    QC_TEST(test_failed_task_fails_run),
    QC_TEST(test_cancelled_task_fails_run),
    QC_TEST(test_max_errors_fails_run),
    QC_TEST(test_empty_run_finishes),
    QC_TEST(test_run_failed_before_start),
    QC_TEST(test_cancel_run),
    QC_TEST(test_run_admission),
    QC_TEST(test_list),
    QC_TEST(test_scheduled_run_fires_once),
    QC_TEST(test_schedule_pause_and_progress),
    QC_TEST(test_run_retention),
};
const size_t qc_batch_n = sizeof(qc_batch_tests) / sizeof(qc_batch_tests[0]);
