/*
 * test_queue_pg.c: what only the PostgreSQL queue has to prove (the store contract is
 * test_queue.c's): the versioned schema refuses a database a newer inferd made; leases of two
 * queue handles (two processes, as far as PostgreSQL can tell) never take the same job (FOR
 * UPDATE SKIP LOCKED); a cancel in one handle reaches the other (NOTIFY); an expired lease is
 * reclaimed by another handle's sweeper and the stale attempt is fenced out; lost connections
 * come back; an unreachable server is ERR_UNAVAILABLE and its password is never shown; a
 * scheduled run fires once however many handles try; and tasks of one run ending in two
 * handles at once queue its finishing job once.
 *
 * Needs $INFERD_TEST_POSTGRES (tests/unit/with_postgres runs a private cluster); without it
 * every test is skipped (exit 77).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "queue/queue.h"
#include "core/url.h"

#include <libpq-fe.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char *pg_url(void)
{
    return getenv("INFERD_TEST_POSTGRES");
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void quiet(void *arg, const char *message)
{
    (void)arg;
    (void)message;
}

/* Runs SQL on a connection of its own; returns the first value of the first row, or "". */
static void sql(const char *text, char *out, size_t size)
{
    PGconn *c = PQconnectdb(pg_url());
    PGresult *r;

    assert_int_equal(PQstatus(c), CONNECTION_OK);
    PQsetNoticeProcessor(c, quiet, NULL); /* "table ... does not exist, skipping" */
    r = PQexec(c, text);
    if (PQresultStatus(r) != PGRES_TUPLES_OK && PQresultStatus(r) != PGRES_COMMAND_OK)
        fail_msg("%s: %s", text, PQresultErrorMessage(r));
    if (out)
        snprintf(out, size, "%s",
                 PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) > 0 ? PQgetvalue(r, 0, 0)
                                                                           : "");
    PQclear(r);
    PQfinish(c);
}

static int setup(void **state)
{
    (void)state;
    sql("DROP TABLE IF EXISTS inferd_jobs, inferd_attempts, inferd_outbox, inferd_deliveries, "
        "inferd_workers, inferd_batch_jobs, inferd_batch_progress, inferd_schema_version",
        NULL, 0);
    return 0;
}

static struct queue *open_pg(void)
{
    struct queue_config cfg = {.url = pg_url(),
                               .max_queued = 100000,
                               .retry_backoff_ms = 0,
                               .result_inline_max_bytes = 1024};
    struct queue *q = NULL;
    struct err e = {0};

    if (queue_open(&cfg, &q, &e) != 0)
        fail_msg("queue_open: %s", e.msg);
    return q;
}

static void enqueue(struct queue *q, int64_t lease_ms, char id[40])
{
    struct job_spec spec = {.model = "m",
                            .input = "{}",
                            .input_len = 2,
                            .input_json_len = -1,
                            .max_attempts = 3,
                            .lease_timeout_ms = lease_ms};
    struct err e = {0};
    int existed = 0;

    if (queue_enqueue(q, &spec, id, &existed, &e) != 0)
        fail_msg("enqueue: %s", e.msg);
}

/* ---- the schema ---- */

static void test_newer_schema_is_refused(void **state)
{
    struct queue_config cfg = {.url = pg_url(), .max_queued = 10};
    struct queue *q = open_pg();
    struct err e = {0};
    char v[32];

    (void)state;
    queue_close(q);
    sql("SELECT MAX(version) FROM inferd_schema_version", v, sizeof(v));
    assert_true(atoi(v) >= 1);
    /* a newer inferd migrated the database: this one must not touch it */
    sql("INSERT INTO inferd_schema_version VALUES (9999, 0)", NULL, 0);
    q = NULL;
    assert_int_equal(queue_open(&cfg, &q, &e), ERR_INVALID);
    assert_null(q);
    assert_non_null(strstr(e.msg, "schema is version 9999, newer than this inferd knows"));
    sql("DELETE FROM inferd_schema_version WHERE version = 9999", NULL, 0);
    /* reopening an up-to-date database migrates nothing and keeps the jobs */
    q = open_pg();
    char id[40];
    enqueue(q, 60000, id);
    queue_close(q);
    q = open_pg();
    struct job *j = NULL;
    assert_int_equal(queue_get(q, id, NULL, 0, &j, &e), 0);
    assert_int_equal(j->state, JOB_QUEUED);
    job_free(j);
    sql("SELECT COUNT(*) FROM inferd_schema_version", v, sizeof(v));
    assert_string_equal(v, "2"); /* one row per migration: version 1, and 2 (tenants) */
    queue_close(q);
}

/* An idempotency key longer than a btree entry may be (about 2.7 kB): stored by its hash. */
static void test_a_long_idempotency_key_works(void **state)
{
    struct queue *q = open_pg();
    size_t len = 10000;
    char *key = malloc(len + 1), a[40], b[40];
    struct job_spec spec = {.model = "m",
                            .input = "{}",
                            .input_len = 2,
                            .input_json_len = -1,
                            .max_attempts = 3,
                            .lease_timeout_ms = 60000,
                            .request_hash = "h1"};
    struct err e = {0};
    int existed = 0;

    (void)state;
    assert_non_null(key);
    /* letters in no order a compressor could shorten (the index would take a short one) */
    for (size_t i = 0, x = 12345; i < len; i++) {
        x = x * 1103515245 + 12345;
        key[i] = (char)('a' + (x >> 16) % 26);
    }
    key[len] = '\0';
    spec.idempotency_key = key;
    assert_int_equal(queue_enqueue(q, &spec, a, &existed, &e), 0);
    assert_int_equal(existed, 0);
    /* the same request again: the same job */
    assert_int_equal(queue_enqueue(q, &spec, b, &existed, &e), 0);
    assert_int_equal(existed, 1);
    assert_string_equal(a, b);
    /* another request with the key: refused, naming the job */
    spec.request_hash = "h2";
    assert_int_equal(queue_enqueue(q, &spec, b, &existed, &e), ERR_CONFLICT);
    assert_non_null(strstr(e.msg, a));
    free(key);
    queue_close(q);
}

/* ---- leases across handles ---- */

#define N_JOBS 60

struct leaser {
    struct queue *q;
    char name[16];
    char ids[N_JOBS][40];
    int n;
};

static void *lease_all(void *arg)
{
    struct leaser *l = arg;
    struct job *jobs[4];
    struct err e = {0};

    for (;;) {
        size_t n = 0;
        if (queue_lease_many(l->q, l->name, 4, 0, 0, jobs, &n, &e) != 0)
            fail_msg("lease: %s", e.msg);
        if (n == 0)
            break;
        for (size_t i = 0; i < n; i++) {
            snprintf(l->ids[l->n++], 40, "%s", jobs[i]->id);
            job_free(jobs[i]);
        }
    }
    return NULL;
}

static void test_two_handles_never_lease_the_same_job(void **state)
{
    struct queue *a = open_pg(), *b = open_pg();
    struct leaser la = {.q = a, .name = "a/1"}, lb = {.q = b, .name = "b/1"};
    pthread_t ta, tb;
    char ids[N_JOBS][40];

    (void)state;
    for (int i = 0; i < N_JOBS; i++)
        enqueue(i % 2 ? a : b, 60000, ids[i]);
    pthread_create(&ta, NULL, lease_all, &la);
    pthread_create(&tb, NULL, lease_all, &lb);
    pthread_join(ta, NULL);
    pthread_join(tb, NULL);
    /* every job leased once, by one of them */
    assert_int_equal(la.n + lb.n, N_JOBS);
    for (int i = 0; i < N_JOBS; i++) {
        int seen = 0;
        for (int k = 0; k < la.n; k++)
            seen += strcmp(la.ids[k], ids[i]) == 0;
        for (int k = 0; k < lb.n; k++)
            seen += strcmp(lb.ids[k], ids[i]) == 0;
        assert_int_equal(seen, 1);
    }
    queue_close(a);
    queue_close(b);
}

static void test_cancel_reaches_the_other_handle(void **state)
{
    struct queue *a = open_pg(), *b = open_pg();
    struct job *j = NULL, *c = NULL;
    struct err e = {0};
    int64_t deadline;
    char id[40];

    (void)state;
    enqueue(a, 60000, id);
    assert_int_equal(queue_lease(b, "b/1", 0, &j, &e), 0);
    assert_non_null(j);
    assert_false(queue_cancel_noted(b, id));
    assert_int_equal(queue_cancel(a, id, NULL, &c, &e), 0);
    assert_int_equal(c->state, JOB_RUNNING);
    assert_true(c->cancel_requested);
    job_free(c);
    /* b's worker learns by NOTIFY, without asking */
    deadline = now_ms() + 10000;
    while (!queue_cancel_noted(b, id) && now_ms() < deadline)
        sleep_ms(10);
    assert_true(queue_cancel_noted(b, id)); /* waited up to 10 s for the cancel NOTIFY */
    assert_int_equal(queue_complete(b, id, j->token, "{}", 2, -1, &e), 0);
    job_free(j);
    j = NULL;
    assert_int_equal(queue_get(a, id, NULL, 0, &j, &e), 0);
    assert_int_equal(j->state, JOB_CANCELLED);
    job_free(j);
    queue_close(a);
    queue_close(b);
}

static void test_expired_lease_is_reclaimed_by_another_handle(void **state)
{
    struct queue *a = open_pg(), *b = open_pg();
    struct job *j1 = NULL, *j2 = NULL;
    struct err e = {0};
    char id[40];

    (void)state;
    enqueue(a, 300, id);
    assert_int_equal(queue_lease(a, "a/1", 0, &j1, &e), 0);
    assert_non_null(j1);
    queue_close(a); /* the process holding it is gone; its sweeper too */
    /* b's sweeper requeues it once the lease ran out; b's lease waits for that */
    assert_int_equal(queue_lease(b, "b/1", 15000, &j2, &e), 0);
    assert_non_null(j2); /* waited up to 15 s for b's sweeper to reclaim the lease */
    assert_string_equal(j2->id, id);
    assert_int_equal(j2->attempts, 2);
    /* the first attempt's late result is fenced out */
    assert_int_equal(queue_complete(b, id, j1->token, "{\"stale\":1}", 11, -1, &e), ERR_CONFLICT);
    assert_int_equal(queue_complete(b, id, j2->token, "{}", 2, -1, &e), 0);
    job_free(j1);
    job_free(j2);
    j1 = NULL;
    assert_int_equal(queue_get(b, id, NULL, 1, &j1, &e), 0);
    assert_int_equal(j1->state, JOB_SUCCEEDED);
    assert_int_equal(j1->result.len, 2);
    job_free(j1);
    queue_close(b);
}

/* ---- connections ---- */

static void test_lost_connections_come_back(void **state)
{
    struct queue *q = open_pg();
    struct job *j = NULL;
    struct err e = {0};
    int64_t deadline;
    char id[40], n[32];
    int rc = -1, existed = 0;
    struct job_spec spec = {.model = "m",
                            .input = "{}",
                            .input_len = 2,
                            .input_json_len = -1,
                            .max_attempts = 3,
                            .lease_timeout_ms = 60000};

    (void)state;
    enqueue(q, 60000, id);
    /* as a server restart does: every connection of the queue is cut */
    sql("SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = "
        "current_database() AND pid <> pg_backend_pid() AND application_name = 'inferd'",
        n, sizeof(n));
    assert_true(atoi(n) >= 1);
    deadline = now_ms() + 15000;
    while (now_ms() < deadline) {
        e = (struct err){0};
        rc = queue_enqueue(q, &spec, id, &existed, &e);
        if (rc == 0)
            break;
        /* meanwhile: unavailable (503), never another error */
        assert_int_equal(rc, ERR_UNAVAILABLE);
        sleep_ms(50);
    }
    assert_int_equal(rc, 0); /* waited up to 15 s for the writer to reconnect */
    /* reads reconnect too; both jobs are there */
    deadline = now_ms() + 15000;
    while ((rc = queue_get(q, id, NULL, 0, &j, &e)) == ERR_UNAVAILABLE && now_ms() < deadline)
        sleep_ms(50);
    assert_int_equal(rc, 0);
    job_free(j);
    int64_t counts[JOB_N_STATES];
    assert_int_equal(queue_counts(q, counts, &e), 0);
    assert_int_equal(counts[JOB_QUEUED], 2);
    queue_close(q);
}

static void test_unreachable_server_is_unavailable_and_its_password_hidden(void **state)
{
    struct queue_config cfg = {
        .url = "postgresql://inferd:s3cr3t-pw@127.0.0.1:1/nodb?connect_timeout=2&password=s3cr3t2",
        .max_queued = 10};
    struct queue *q = NULL;
    struct err e = {0};
    char *shown;

    (void)state;
    assert_int_equal(queue_open(&cfg, &q, &e), ERR_UNAVAILABLE);
    assert_null(q);
    assert_non_null(strstr(e.msg, "127.0.0.1"));
    assert_null(strstr(e.msg, "s3cr3t"));
    shown = url_redacted(cfg.url);
    assert_string_equal(shown, "postgresql://***@127.0.0.1:1/nodb?connect_timeout=2&password=***");
    free(shown);
}

/* ---- batch jobs across handles ---- */

struct firing {
    struct queue *q;
    const char *parent;
    int64_t run_at_ms;
    int rc;
    char id[40];
};

static void *fire(void *arg)
{
    struct firing *f = arg;
    const char *inputs[] = {"{}"}, *objects[] = {"o"};
    struct batch_job_spec run = {.definition = "{\"model\":\"m\"}",
                                 .model = "m",
                                 .max_attempts = 1,
                                 .lease_timeout_ms = 60000,
                                 .output = "file:///tmp/out",
                                 .task_inputs = inputs,
                                 .task_objects = objects,
                                 .n_tasks = 1,
                                 .finish_input = "{}",
                                 .parent = f->parent,
                                 .run_at_ms = f->run_at_ms,
                                 .parent_next_run_ms = f->run_at_ms + 60000};
    struct err e = {0};

    f->rc = queue_batch_create(f->q, &run, f->id, &e);
    return NULL;
}

static void test_a_scheduled_run_fires_once_across_handles(void **state)
{
    struct queue *a = open_pg(), *b = open_pg();
    int64_t t0 = 1700000040000; /* a whole minute */
    struct batch_job_spec sched = {.definition = "{\"model\":\"m\"}",
                                   .model = "m",
                                   .max_attempts = 1,
                                   .lease_timeout_ms = 60000,
                                   .schedule = "* * * * *",
                                   .next_run_ms = t0};
    struct err e = {0};
    char sid[40], n[32];

    (void)state;
    assert_int_equal(queue_batch_create(a, &sched, sid, &e), 0);
    for (int minute = 0; minute < 5; minute++) {
        struct firing fa = {.q = a, .parent = sid, .run_at_ms = t0 + minute * 60000};
        struct firing fb = fa;
        pthread_t ta, tb;
        fb.q = b;
        /* both schedulers find the minute due and try to start its run at once */
        pthread_create(&ta, NULL, fire, &fa);
        pthread_create(&tb, NULL, fire, &fb);
        pthread_join(ta, NULL);
        pthread_join(tb, NULL);
        assert_true((fa.rc == 0 && fb.rc == ERR_CONFLICT) || (fa.rc == ERR_CONFLICT && fb.rc == 0));
    }
    sql("SELECT COUNT(*) FROM inferd_batch_jobs WHERE parent IS NOT NULL", n, sizeof(n));
    assert_string_equal(n, "5");
    sql("SELECT COUNT(*) FROM inferd_jobs WHERE kind = 1", n, sizeof(n));
    assert_string_equal(n, "5"); /* one task per run, none twice */
    queue_close(a);
    queue_close(b);
}

#define N_TASKS 12

struct task_runner {
    struct queue *q;
    const char *name;
};

/* Leases and completes tasks (and the finishing job) until none is left. */
static void *run_tasks(void *arg)
{
    struct task_runner *r = arg;
    struct err e = {0};

    for (;;) {
        struct job *j = NULL;
        char result[128];
        if (queue_lease(r->q, r->name, 500, &j, &e) != 0)
            fail_msg("lease: %s", e.msg);
        if (!j)
            break;
        snprintf(result, sizeof(result), "{\"object\":\"%s\",\"records\":3,\"sha256\":\"x\"}",
                 j->id);
        if (queue_complete(r->q, j->id, j->token, result, strlen(result), -1, &e) != 0)
            fail_msg("complete: %s", e.msg);
        job_free(j);
    }
    return NULL;
}

static void test_tasks_ending_in_two_handles_finish_the_run_once(void **state)
{
    struct queue *a = open_pg(), *b = open_pg();
    const char *inputs[N_TASKS], *objects[N_TASKS];
    struct task_runner ra = {.q = a, .name = "a/1"}, rb = {.q = b, .name = "b/1"};
    struct err e = {0};
    struct buf out = {0};
    pthread_t ta, tb;
    char id[40], n[32];

    (void)state;
    for (int i = 0; i < N_TASKS; i++) {
        inputs[i] = "{}";
        objects[i] = "o";
    }
    struct batch_job_spec run = {.definition = "{\"model\":\"m\"}",
                                 .model = "m",
                                 .max_attempts = 1,
                                 .lease_timeout_ms = 60000,
                                 .output = "file:///tmp/out",
                                 .task_inputs = inputs,
                                 .task_objects = objects,
                                 .n_tasks = N_TASKS,
                                 .finish_input = "{}"};
    assert_int_equal(queue_batch_create(a, &run, id, &e), 0);
    pthread_create(&ta, NULL, run_tasks, &ra);
    pthread_create(&tb, NULL, run_tasks, &rb);
    pthread_join(ta, NULL);
    pthread_join(tb, NULL);
    sql("SELECT COUNT(*) FROM inferd_jobs WHERE kind = 2", n, sizeof(n));
    assert_string_equal(n, "1"); /* one finishing job, however the last tasks raced */
    assert_int_equal(queue_batch_get(b, id, NULL, &out, &e), 0);
    assert_non_null(strstr(out.data, "\"status\":\"succeeded\""));
    assert_non_null(strstr(out.data, "\"objects_done\":12"));
    assert_non_null(strstr(out.data, "\"records_done\":36"));
    buf_release(&out);
    assert_int_equal(queue_batch_manifest(a, id, NULL, &out, &e), 0);
    assert_non_null(strstr(out.data, "\"model\":\"m\""));
    buf_release(&out);
    queue_close(a);
    queue_close(b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_newer_schema_is_refused, setup),
        cmocka_unit_test_setup(test_a_long_idempotency_key_works, setup),
        cmocka_unit_test_setup(test_two_handles_never_lease_the_same_job, setup),
        cmocka_unit_test_setup(test_cancel_reaches_the_other_handle, setup),
        cmocka_unit_test_setup(test_expired_lease_is_reclaimed_by_another_handle, setup),
        cmocka_unit_test_setup(test_lost_connections_come_back, setup),
        cmocka_unit_test_setup(test_unreachable_server_is_unavailable_and_its_password_hidden,
                               setup),
        cmocka_unit_test_setup(test_a_scheduled_run_fires_once_across_handles, setup),
        cmocka_unit_test_setup(test_tasks_ending_in_two_handles_finish_the_run_once, setup),
    };

    if (!pg_url() || !pg_url()[0]) {
        fprintf(stderr, "test_queue_pg: skipped: $INFERD_TEST_POSTGRES is not set "
                        "(tests/unit/with_postgres sets it)\n");
        return 77;
    }
    return cmocka_run_group_tests(tests, NULL, NULL);
}
