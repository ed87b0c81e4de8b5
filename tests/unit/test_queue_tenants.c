/*
 * test_queue_tenants.c: the queue contract for tenants: a job, a batch job and a schedule
 * belong to the tenant that made them; another tenant cannot get, list, cancel, retry, pause,
 * run or read them, and is told exactly what an id that does not exist is told; NULL (an admin,
 * or a server without keys) sees everything; idempotency keys are per tenant; the public JSON
 * (and so every webhook) names a tenant other than the anonymous one; a store made before
 * tenants opens with everything in it anonymous.
 */
#include "queue_contract.h"

#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define HOOK "http://127.0.0.1:9/hook"

/* A job of model "m" for `tenant`: input {}, one attempt, a 60 s lease. */
static struct job_spec spec_for(const char *tenant)
{
    return (struct job_spec){.model = "m",
                             .input = "{}",
                             .input_len = 2,
                             .input_json_len = -1,
                             .max_attempts = 1,
                             .lease_timeout_ms = 60000,
                             .tenant = tenant};
}

/* The same request (idempotency key "k"), for `tenant`. */
static struct job_spec keyed_spec_for(const char *tenant)
{
    struct job_spec spec = spec_for(tenant);

    spec.idempotency_key = "k";
    spec.request_hash = "h1";
    return spec;
}

/* A job for `tenant`, with a webhook. */
static void enqueue_for(struct queue *q, const char *tenant, char id[40])
{
    struct job_spec spec = spec_for(tenant);

    spec.callback_url = HOOK;
    qc_enqueue_spec(q, &spec, id);
}

/* The message a missing id gets from `what` ("job" or "batch job"), for id `id`: built from
 * what the store says about an id that surely does not exist. */
static void missing_msg(const char *said_for_nope, const char *id, char out[256])
{
    const char *at = strstr(said_for_nope, "nope-0000");

    assert_non_null(at);
    snprintf(out, 256, "%.*s%s%s", (int)(at - said_for_nope), said_for_nope, id,
             at + strlen("nope-0000"));
}

/* Asserts `rc`/`e` are exactly what a job id that does not exist gets. */
static void assert_job_hidden(struct queue *q, int rc, const struct err *e, const char *id)
{
    struct job *j = NULL;
    struct err none = {0};
    char want[256];

    assert_int_equal(queue_get(q, "nope-0000", NULL, 0, &j, &none), ERR_NOT_FOUND);
    missing_msg(none.msg, id, want);
    assert_int_equal(rc, ERR_NOT_FOUND);
    assert_string_equal(e->msg, want);
}

static void assert_batch_hidden(struct queue *q, int rc, const struct err *e, const char *id)
{
    struct buf b = {0};
    struct err none = {0};
    char want[256];

    assert_int_equal(queue_batch_get(q, "nope-0000", NULL, &b, &none), ERR_NOT_FOUND);
    buf_release(&b);
    missing_msg(none.msg, id, want);
    assert_int_equal(rc, ERR_NOT_FOUND);
    assert_string_equal(e->msg, want);
}

/* The ids a listing for `tenant` shows, newest first, as one space-separated string. */
static void listed(struct queue *q, const char *tenant, int state, char *out, size_t cap)
{
    struct queue_list_filter f = {.state = state, .cancelling = -1, .limit = 100, .tenant = tenant};
    json_t *o = qc_list(q, &f), *j;
    size_t i;

    out[0] = '\0';
    json_array_foreach (json_object_get(o, "jobs"), i, j) {
        size_t len = strlen(out);
        snprintf(out + len, cap - len, "%s%s", len ? " " : "", qc_str(j, "id"));
    }
    json_decref(o);
}

static void test_tenant_jobs_are_private(void **state)
{
    struct queue *q = *state;
    char a[40], b[40], anon[40], a2[40], got[512], want[512];
    struct job *j = NULL, *l;
    struct err e = {0};
    int rc;

    enqueue_for(q, "A", a);
    enqueue_for(q, "B", b);
    enqueue_for(q, NULL, anon);

    /* get: the owner and NULL see it; another tenant (the anonymous one too) does not */
    assert_int_equal(queue_get(q, b, "B", 0, &j, &e), 0);
    assert_string_equal(j->tenant, "B");
    job_free(j);
    assert_int_equal(queue_get(q, b, NULL, 0, &j, &e), 0);
    job_free(j);
    rc = queue_get(q, b, "A", 0, &j, &e);
    assert_null(j);
    assert_job_hidden(q, rc, &e, b);
    assert_job_hidden(q, queue_get(q, b, "", 0, &j, &e), &e, b);
    assert_job_hidden(q, queue_get(q, anon, "A", 0, &j, &e), &e, anon);
    assert_int_equal(queue_get(q, anon, "", 0, &j, &e), 0);
    assert_null(j->tenant);
    job_free(j);

    /* listings: each tenant its own, NULL every one */
    listed(q, "A", -1, got, sizeof(got));
    assert_string_equal(got, a);
    listed(q, "", -1, got, sizeof(got));
    assert_string_equal(got, anon);
    listed(q, "C", -1, got, sizeof(got));
    assert_string_equal(got, "");
    listed(q, NULL, -1, got, sizeof(got));
    snprintf(want, sizeof(want), "%s %s %s", anon, b, a);
    assert_string_equal(got, want);

    /* cancel: A cannot, and B's job stays queued; B can */
    assert_job_hidden(q, queue_cancel(q, b, "A", &j, &e), &e, b);
    assert_null(j);
    assert_int_equal(qc_state(q, b), JOB_QUEUED);

    /* results and retry: b runs and fails, a runs and succeeds */
    for (int i = 0; i < 3; i++) {
        l = qc_lease(q);
        assert_non_null(l);
        if (strcmp(l->id, a) == 0)
            assert_int_equal(queue_complete(q, l->id, l->token, "{\"r\":1}", 7, -1, &e), 0);
        else
            assert_int_equal(queue_fail(q, l->id, l->token, "boom", 0, &e), 0);
        job_free(l);
    }
    assert_job_hidden(q, queue_get(q, a, "B", 1, &j, &e), &e, a); /* its result too */
    assert_null(j);
    assert_int_equal(queue_get(q, a, "A", 1, &j, &e), 0);
    assert_memory_equal(j->result.data, "{\"r\":1}", 7);
    job_free(j);
    assert_job_hidden(q, queue_retry(q, b, "A", &j, &e), &e, b);
    assert_int_equal(qc_state(q, b), JOB_FAILED);

    /* retry-matching never touches another tenant's jobs */
    struct queue_list_filter f = {.state = -1, .cancelling = -1, .limit = 100, .tenant = "A"};
    int64_t n = -1;
    enqueue_for(q, "A", a2);
    l = qc_lease(q);
    assert_int_equal(queue_fail(q, l->id, l->token, "boom", 0, &e), 0);
    job_free(l);
    assert_int_equal(queue_retry_matching(q, &f, &n, &e), 0);
    assert_int_equal(n, 1); /* a2; b and anon are not A's */
    assert_int_equal(qc_state(q, a2), JOB_QUEUED);
    assert_int_equal(qc_state(q, b), JOB_FAILED);
    assert_int_equal(qc_state(q, anon), JOB_FAILED);
    listed(q, "A", JOB_FAILED, got, sizeof(got));
    assert_string_equal(got, "");
    listed(q, NULL, JOB_FAILED, got, sizeof(got));
    snprintf(want, sizeof(want), "%s %s", anon, b);
    assert_string_equal(got, want);

    /* the owner can, and NULL can */
    assert_int_equal(queue_retry(q, b, "B", &j, &e), 0);
    job_free(j);
    assert_int_equal(queue_cancel(q, b, NULL, &j, &e), 0);
    assert_int_equal(j->state, JOB_CANCELLED);
    job_free(j);
    assert_int_equal(queue_retry(q, anon, NULL, &j, &e), 0);
    job_free(j);
}

static void test_tenant_idempotency_keys(void **state)
{
    struct queue *q = *state;
    struct job_spec spec = keyed_spec_for(NULL);
    char a[40], b[40], anon[40], again[40];
    struct err e = {0};
    int existed = -1;

    spec.tenant = "A";
    assert_int_equal(queue_enqueue(q, &spec, a, &existed, &e), 0);
    assert_int_equal(existed, 0);
    spec.tenant = "B"; /* the same key from another tenant: another job */
    assert_int_equal(queue_enqueue(q, &spec, b, &existed, &e), 0);
    assert_int_equal(existed, 0);
    assert_string_not_equal(a, b);
    spec.tenant = NULL;
    assert_int_equal(queue_enqueue(q, &spec, anon, &existed, &e), 0);
    assert_int_equal(existed, 0);
    assert_string_not_equal(anon, a);
    assert_string_not_equal(anon, b);
    /* within one tenant, today's rules: the same request is the same job, another conflicts */
    spec.tenant = "B";
    assert_int_equal(queue_enqueue(q, &spec, again, &existed, &e), 0);
    assert_int_equal(existed, 1);
    assert_string_equal(again, b);
    spec.tenant = "";
    assert_int_equal(queue_enqueue(q, &spec, again, &existed, &e), 0);
    assert_int_equal(existed, 1);
    assert_string_equal(again, anon);
    spec.tenant = "A";
    spec.request_hash = "h2";
    assert_int_equal(queue_enqueue(q, &spec, again, &existed, &e), ERR_CONFLICT);
}

static void test_tenant_in_json_and_webhooks(void **state)
{
    struct queue *q = *state;
    struct queue_outbox_item *items = NULL;
    char a[40], anon[40];
    struct err e = {0};
    size_t n = 0, found = 0;
    json_t *o;

    enqueue_for(q, "A", a);
    enqueue_for(q, NULL, anon);
    o = qc_job_json(q, a);
    assert_string_equal(qc_str(o, "tenant"), "A");
    json_decref(o);
    o = qc_job_json(q, anon);
    assert_null(json_object_get(o, "tenant")); /* the anonymous JSON is as it always was */
    json_decref(o);

    for (int i = 0; i < 2; i++) {
        struct job *l = qc_lease(q);
        assert_int_equal(queue_complete(q, l->id, l->token, "{}", 2, -1, &e), 0);
        job_free(l);
    }
    assert_int_equal(queue_outbox_due(q, clock_now_ms() + 1000, 10, &items, &n, &e), 0);
    for (size_t i = 0; i < n; i++) {
        json_t *body = json_loadb(items[i].body, items[i].body_len, 0, NULL);
        json_t *job = json_object_get(body, "job");
        if (strcmp(qc_str(job, "id"), a) == 0) {
            assert_string_equal(qc_str(job, "tenant"), "A");
            found++;
        } else if (strcmp(qc_str(job, "id"), anon) == 0) {
            assert_null(json_object_get(job, "tenant"));
            found++;
        }
        json_decref(body);
    }
    assert_int_equal(found, 2);
    queue_outbox_items_free(items, n);
}

static const char *const inputs[] = {"{\"object\":\"a.jsonl\"}"};
static const char *const objects[] = {"a.jsonl"};

static struct batch_job_spec batch_spec(const char *tenant, const char *schedule)
{
    struct batch_job_spec s = {
        .definition = "{\"model\":\"m\",\"input\":\"file:///in/\",\"callback_url\":\"" HOOK "\"}",
        .model = "m",
        .callback_url = HOOK,
        .max_attempts = 1,
        .lease_timeout_ms = 60000,
        .output = "file:///out/",
        .task_inputs = inputs,
        .task_objects = objects,
        .n_tasks = 1,
        .finish_input = "{\"finish\":true}",
        .tenant = tenant};

    if (schedule) {
        s.schedule = schedule;
        s.next_run_ms = clock_now_ms() + 3600 * 1000;
        s.n_tasks = 0;
    }
    return s;
}

static void test_tenant_batch_jobs_are_private(void **state)
{
    struct queue *q = *state;
    struct batch_job_spec run = batch_spec("A", NULL), sched = batch_spec("A", "0 * * * *");
    struct queue_schedule *def = NULL;
    char rid[40], sid[40], aid[40];
    struct buf b = {0};
    struct err e = {0};
    struct job *t, *j = NULL;
    json_t *o;

    assert_int_equal(queue_batch_create(q, &run, rid, &e), 0);
    assert_int_equal(queue_batch_create(q, &sched, sid, &e), 0);
    run.tenant = NULL;
    assert_int_equal(queue_batch_create(q, &run, aid, &e), 0);

    const char *ids[] = {rid, sid};
    for (int i = 0; i < 2; i++) {
        const char *id = ids[i];
        assert_batch_hidden(q, queue_batch_get(q, id, "B", &b, &e), &e, id);
        assert_batch_hidden(q, queue_batch_get(q, id, "", &b, &e), &e, id);
        assert_batch_hidden(q, queue_batch_cancel(q, id, "B", &b, &e), &e, id);
        assert_batch_hidden(q, queue_batch_pause(q, id, "B", 1, 0, &b, &e), &e, id);
        assert_batch_hidden(q, queue_batch_manifest(q, id, "B", &b, &e), &e, id);
        /* "run now" reads the definition first: B cannot run A's schedule */
        assert_batch_hidden(q, queue_batch_definition(q, id, "B", &def, &e), &e, id);
        assert_null(def);
        assert_int_equal(b.len, 0); /* nothing of it was written */
        assert_int_equal(queue_batch_definition(q, id, "A", &def, &e), 0);
        assert_string_equal(def->tenant, "A");
        queue_schedules_free(def, 1);
        assert_int_equal(queue_batch_get(q, id, "A", &b, &e), 0);
        o = qc_parse(&b);
        assert_string_equal(qc_str(o, "tenant"), "A");
        json_decref(o);
    }
    o = qc_batch_json(q, aid); /* the anonymous JSON is as it always was */
    assert_null(json_object_get(o, "tenant"));
    json_decref(o);
    assert_batch_hidden(q, queue_batch_get(q, aid, "A", &b, &e), &e, aid);
    o = qc_batch_json(q, sid); /* B's attempts changed nothing */
    assert_string_equal(qc_str(o, "status"), "scheduled");
    json_decref(o);
    o = qc_batch_json(q, rid);
    assert_string_equal(qc_str(o, "status"), "queued");
    json_decref(o);
    assert_int_equal(qc_n_batches_listed(q, "B", NULL), 0);
    assert_int_equal(qc_n_batches_listed(q, "A", NULL), 2);
    assert_int_equal(qc_n_batches_listed(q, "", NULL), 1);
    assert_int_equal(qc_n_batches_listed(q, NULL, NULL), 3);

    /* the run's task and finishing job are A's: B cannot see or cancel them */
    assert_int_equal(queue_batch_cancel(q, aid, NULL, &b, &e), 0);
    buf_release(&b);
    t = qc_lease(q);
    assert_non_null(t);
    assert_string_equal(t->batch_id, rid);
    assert_string_equal(t->tenant, "A");
    assert_job_hidden(q, queue_get(q, t->id, "B", 0, &j, &e), &e, t->id);
    assert_job_hidden(q, queue_cancel(q, t->id, "B", &j, &e), &e, t->id);
    const char *r = "{\"object\":\"a.jsonl\",\"records\":1,\"errors\":0,\"sha256\":\"aa\"}";
    assert_int_equal(queue_complete(q, t->id, t->token, r, strlen(r), -1, &e), 0);
    job_free(t);
    t = qc_lease(q);
    assert_non_null(t);
    assert_int_equal(t->kind, JOB_KIND_BATCH_FINISH);
    assert_string_equal(t->tenant, "A");
    assert_batch_hidden(q, queue_batch_manifest(q, rid, "B", &b, &e), &e, rid);
    assert_int_equal(queue_batch_manifest(q, rid, "A", &b, &e), 0);
    buf_release(&b);
    job_free(t);

    /* the owner and NULL can cancel and pause */
    assert_int_equal(queue_batch_pause(q, sid, "A", 1, 0, &b, &e), 0);
    buf_release(&b);
    assert_int_equal(queue_batch_cancel(q, sid, NULL, &b, &e), 0);
    buf_release(&b);
}

static void test_tenant_schedule_runs_are_the_schedules(void **state)
{
    struct queue *q = *state;
    struct batch_job_spec sched = batch_spec("A", "0 * * * *"), run = batch_spec(NULL, NULL);
    struct queue_outbox_item *items = NULL;
    char sid[40], hand[40], due[40];
    struct err e = {0};
    size_t n = 0, found = 0;
    struct job *t;
    json_t *o;

    assert_int_equal(queue_batch_create(q, &sched, sid, &e), 0);
    /* run now, started by someone who does not say whose it is (an admin) */
    run.parent = sid;
    run.by_hand = 1;
    run.run_at_ms = clock_now_ms();
    assert_int_equal(queue_batch_create(q, &run, hand, &e), 0);
    /* the scheduler's run at its due time */
    run.by_hand = 0;
    run.run_at_ms = sched.next_run_ms;
    run.parent_next_run_ms = sched.next_run_ms + 3600 * 1000;
    assert_int_equal(queue_batch_create(q, &run, due, &e), 0);
    const char *runs[] = {hand, due};
    for (int i = 0; i < 2; i++) {
        struct buf b = {0};
        assert_int_equal(queue_batch_get(q, runs[i], "A", &b, &e), 0);
        o = qc_parse(&b);
        assert_string_equal(qc_str(o, "tenant"), "A");
        assert_string_equal(qc_str(o, "schedule_id"), sid);
        json_decref(o);
        assert_batch_hidden(q, queue_batch_get(q, runs[i], "", &b, &e), &e, runs[i]);
        t = qc_lease(q);
        assert_non_null(t);
        assert_string_equal(t->tenant, "A");
        assert_int_equal(queue_fail(q, t->id, t->token, "boom", 0, &e), 0);
        job_free(t);
    }
    /* the runs' webhooks name the tenant */
    assert_int_equal(queue_outbox_due(q, clock_now_ms() + 1000, 10, &items, &n, &e), 0);
    for (size_t i = 0; i < n; i++) {
        json_t *body = json_loadb(items[i].body, items[i].body_len, 0, NULL);
        json_t *bj = json_object_get(body, "batch_job");
        if (bj) {
            assert_string_equal(qc_str(bj, "tenant"), "A");
            found++;
        }
        json_decref(body);
    }
    assert_int_equal(found, 2);
    queue_outbox_items_free(items, n);
}

/* ---- a store made before tenants ---- */

/* The SQLite tables of a job and a batch job as the inferd before tenants made them, with one
 * job and one batch run in them. */
static const char old_sqlite[] =
    "CREATE TABLE jobs (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, model TEXT NOT NULL,"
    " state INTEGER NOT NULL, priority INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,"
    " max_attempts INTEGER NOT NULL, created_ms INTEGER NOT NULL,"
    " started_ms INTEGER, finished_ms INTEGER, expires_ms INTEGER NOT NULL DEFAULT 0,"
    " available_ms INTEGER NOT NULL DEFAULT 0, lease_until_ms INTEGER NOT NULL DEFAULT 0,"
    " lease_timeout_ms INTEGER NOT NULL, ttl_s INTEGER NOT NULL DEFAULT 0, worker TEXT,"
    " cancel_requested INTEGER NOT NULL DEFAULT 0,"
    " input BLOB, input_json_len INTEGER NOT NULL DEFAULT -1,"
    " input_location TEXT, output_location TEXT, callback_url TEXT,"
    " result BLOB, result_json_len INTEGER NOT NULL DEFAULT -1, error TEXT,"
    " idem_key TEXT UNIQUE, request_hash TEXT,"
    " kind INTEGER NOT NULL DEFAULT 0, batch_id TEXT, object TEXT,"
    " extra_attempts INTEGER NOT NULL DEFAULT 0);"
    "CREATE TABLE batch_jobs (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, parent TEXT,"
    " definition TEXT NOT NULL, model TEXT NOT NULL, schedule TEXT,"
    " state INTEGER NOT NULL, output TEXT, callback_url TEXT,"
    " max_errors INTEGER NOT NULL DEFAULT 0, max_attempts INTEGER NOT NULL DEFAULT 3,"
    " lease_timeout_ms INTEGER NOT NULL DEFAULT 300000,"
    " created_ms INTEGER NOT NULL, started_ms INTEGER, finished_ms INTEGER,"
    " run_at_ms INTEGER, next_run_ms INTEGER,"
    " objects_total INTEGER NOT NULL DEFAULT 0, objects_done INTEGER NOT NULL DEFAULT 0,"
    " records_done INTEGER NOT NULL DEFAULT 0, records_failed INTEGER NOT NULL DEFAULT 0,"
    " error TEXT, finish_input BLOB);"
    "INSERT INTO jobs (id, model, state, priority, max_attempts, created_ms, lease_timeout_ms,"
    " input, idem_key, request_hash) VALUES ('old-job', 'm', 0, 0, 1, 1700000000000, 60000,"
    " '{}', 'k', 'h1');"
    "INSERT INTO batch_jobs (id, definition, model, state, created_ms) VALUES"
    " ('batch-old', '{\"model\":\"m\"}', 'm', 0, 1700000000000);";

/* Replaces the SQLite store of this test with one made before tenants. */
static void make_old_sqlite(void)
{
    char path[512];
    sqlite3 *db = NULL;
    const char *suffix[] = {"", "-wal", "-shm"};

    for (int i = 0; i < 3; i++) {
        snprintf(path, sizeof(path), "%s/inferd.db%s", qc_data_dir(), suffix[i]);
        unlink(path);
    }
    snprintf(path, sizeof(path), "%s/inferd.db", qc_data_dir());
    assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
    assert_int_equal(sqlite3_exec(db, old_sqlite, NULL, NULL, NULL), SQLITE_OK);
    sqlite3_close(db);
}

/* Takes the PostgreSQL store of this test (just made, closed) back to schema version 1, as
 * the inferd before tenants left it, with one job and one batch run in it. */
static const char old_postgres[] =
    "\\set ON_ERROR_STOP 1\n"
    "SET client_min_messages = warning;\n"
    "ALTER TABLE inferd_jobs DROP COLUMN tenant;\n" /* its indexes go with it */
    "ALTER TABLE inferd_batch_jobs DROP COLUMN tenant;\n"
    "CREATE UNIQUE INDEX inferd_jobs_idem ON inferd_jobs (md5(idem_key)) WHERE idem_key IS NOT "
    "NULL;\n"
    "DELETE FROM inferd_schema_version WHERE version > 1;\n"
    "INSERT INTO inferd_jobs (id, model, state, priority, max_attempts, created_ms, "
    "lease_timeout_ms, input, idem_key, request_hash) VALUES ('old-job', 'm', 0, 0, 1, "
    "1700000000000, 60000, '\\x7b7d', 'k', 'h1');\n"
    "INSERT INTO inferd_batch_jobs (id, definition, model, state, created_ms) VALUES "
    "('batch-old', '{\"model\":\"m\"}', 'm', 0, 1700000000000);\n";

/* Writes, on the Redis store of this test, a job and a batch run as the inferd before tenants
 * wrote them (no tenant field, the idempotency key under idem:). */
static const char old_redis[] =
    "HSET inferd:job:old-job state 0 attempts 0 created_ms 1700000000000 started_ms 0 "
    "finished_ms 0 cancel_requested 0 request_hash h1 idem_key k model m priority 0 "
    "max_attempts 1 lease_timeout_ms 60000 ttl_s 0 kind 0 input {} input_json_len -1\n"
    "ZADD inferd:jobs 1700000000000 old-job\n"
    "SET inferd:idem:k old-job\n"
    "HSET inferd:batch:batch-old state 0 created_ms 1700000000000 started_ms 0 finished_ms 0 "
    "objects_total 0 objects_done 0 records_done 0 records_failed 0 parent \"\" run_at_ms 0 "
    "definition \"{\\\"model\\\":\\\"m\\\"}\" model m schedule \"\" output \"\" callback_url \"\" "
    "max_errors 0 max_attempts 1 lease_timeout_ms 60000 next_run_ms 0 finish_input \"\" "
    "error \"\"\n"
    "ZADD inferd:batches 1700000000000 batch-old\n";

/* Feeds `script` to `client` (psql or redis-cli, with its URL option) on this test's store. */
static void feed_store(const char *client, const char *script)
{
    char cmd[1024];
    FILE *p;

    snprintf(cmd, sizeof(cmd), "%s '%s' >/dev/null", client, qc_store->url);
    p = popen(cmd, "w");
    assert_non_null(p);
    assert_true(fputs(script, p) >= 0);
    assert_int_equal(pclose(p), 0);
}

static void test_tenant_old_store_is_anonymous(void **state)
{
    struct job_spec spec = keyed_spec_for(NULL);
    struct queue *q;
    struct job *j = NULL;
    struct buf b = {0};
    struct err e = {0};
    char got[512], id[40];
    int existed = -1;

    queue_close(*state);
    *state = NULL;
    if (strcmp(qc_store->name, "sqlite") == 0)
        make_old_sqlite();
    else if (strcmp(qc_store->name, "postgres") == 0)
        feed_store("psql -X -q", old_postgres);
    else
        feed_store("redis-cli -u", old_redis);

    q = qc_reopen(state, QC_CONFIG_DEFAULT);
    assert_int_equal(queue_get(q, "old-job", "", 0, &j, &e), 0);
    assert_null(j->tenant);
    job_free(j);
    assert_job_hidden(q, queue_get(q, "old-job", "A", 0, &j, &e), &e, "old-job");
    listed(q, "", -1, got, sizeof(got));
    assert_string_equal(got, "old-job");
    listed(q, "A", -1, got, sizeof(got));
    assert_string_equal(got, "");
    assert_int_equal(queue_batch_get(q, "batch-old", "", &b, &e), 0);
    buf_release(&b);
    assert_int_equal(qc_n_batches_listed(q, "", NULL), 1);
    assert_int_equal(qc_n_batches_listed(q, "A", NULL), 0);
    /* its idempotency key is the anonymous tenant's: the same request is the old job, the
     * same key from A is A's own */
    assert_int_equal(queue_enqueue(q, &spec, id, &existed, &e), 0);
    assert_int_equal(existed, 1);
    assert_string_equal(id, "old-job");
    spec.tenant = "A";
    assert_int_equal(queue_enqueue(q, &spec, id, &existed, &e), 0);
    assert_int_equal(existed, 0);
    /* and it opens again as it is now */
    q = qc_reopen(state, QC_CONFIG_DEFAULT);
    listed(q, NULL, -1, got, sizeof(got));
    assert_non_null(strstr(got, "old-job"));
}

const struct CMUnitTest qc_tenants_tests[] = {
    QC_TEST(test_tenant_jobs_are_private),
    QC_TEST(test_tenant_idempotency_keys),
    QC_TEST(test_tenant_in_json_and_webhooks),
    QC_TEST(test_tenant_batch_jobs_are_private),
    QC_TEST(test_tenant_schedule_runs_are_the_schedules),
    QC_TEST(test_tenant_old_store_is_anonymous),
};
const size_t qc_tenants_n = sizeof(qc_tenants_tests) / sizeof(qc_tenants_tests[0]);
