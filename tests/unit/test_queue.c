/*
 * test_queue.c: the queue contract suite's runner and fixtures.
 *
 * Every store of src/queue must pass the same tables of tests, one file per concern
 * (test_queue_jobs.c, _lifetimes.c, _workers.c, _outbox.c, _batch.c, _concurrency.c,
 * _faults.c, _tenants.c). This file runs them all once per store it can reach, each test on an
 * empty store:
 *   - SQLite, always: a fresh temporary --data-dir per test;
 *   - Redis, with $INFERD_TEST_REDIS (tests/unit/with_redis starts a private redis-server):
 *     FLUSHDB before each test;
 *   - PostgreSQL, with $INFERD_TEST_POSTGRES (a postgresql:// URL of an empty database):
 *     every schema the URL's user owns is dropped before each test. A build whose queue_open
 *     does not know postgresql:// URLs yet skips this group, saying so, rather than failing.
 * $INFERD_TEST_FILTER (a cmocka pattern, e.g. "*batch*") runs only the tests it matches.
 */
#include "queue_contract.h"
#include "queue/queue_internal.h" /* queue_fault_hook */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

const struct qc_store *qc_store;
static char dir[256]; /* SQLite's --data-dir for the current test */

static struct queue *open_store(struct qc_config c, struct err *e)
{
    struct queue_config cfg = {.url = qc_store->url,
                               .data_dir = dir,
                               .max_queued = c.max_queued,
                               .result_ttl_s = c.result_ttl_s,
                               .retry_backoff_ms = c.retry_backoff_ms,
                               .result_inline_max_bytes = c.result_inline_max_bytes};
    struct queue *q = NULL;

    return queue_open(&cfg, &q, e) == 0 ? q : NULL;
}

/* Drops every schema the URL's user owns (the store's tables with them), so the store starts
 * empty however it lays out its schema. */
static const char pg_wipe_sql[] =
    "SET client_min_messages = warning;\n"
    "SET lock_timeout = '10s';\n" /* a queue left open by a failed test fails this, not hangs */
    "DO $$DECLARE s name; BEGIN\n"
    "  FOR s IN SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%'\n"
    "      AND nspname <> 'information_schema' AND pg_get_userbyid(nspowner) IN\n"
    "      (current_user, 'pg_database_owner') LOOP\n"
    "    EXECUTE format('DROP SCHEMA %I CASCADE', s);\n"
    "  END LOOP;\n"
    "END$$;\n"
    "CREATE SCHEMA IF NOT EXISTS public;\n";

/* Empties the current store. 0 or -1 (with a message). */
static int wipe_store(void)
{
    char cmd[1024];

    if (strcmp(qc_store->name, "redis") == 0) {
        snprintf(cmd, sizeof(cmd), "redis-cli -u '%s' FLUSHDB >/dev/null", qc_store->url);
        if (system(cmd) != 0) {
            print_error("redis: FLUSHDB failed\n");
            return -1;
        }
    } else if (strcmp(qc_store->name, "postgres") == 0) {
        snprintf(cmd, sizeof(cmd), "psql -X -q -v ON_ERROR_STOP=1 '%s' >/dev/null", qc_store->url);
        FILE *p = popen(cmd, "w");
        if (!p || fputs(pg_wipe_sql, p) < 0 || pclose(p) != 0) {
            print_error("postgres: dropping the test database's schemas failed\n");
            return -1;
        }
    }
    return 0;
}

int qc_setup(void **state)
{
    struct err e = {0};
    struct queue *q;

    snprintf(dir, sizeof(dir), "/tmp/inferd-test-queue-XXXXXX");
    if (!mkdtemp(dir) || wipe_store() != 0)
        return -1;
    q = open_store(QC_CONFIG_DEFAULT, &e);
    if (!q) {
        print_error("%s: queue_open: %s\n", qc_store->name, e.msg);
        return -1;
    }
    *state = q;
    return 0;
}

int qc_teardown(void **state)
{
    char cmd[300];

    queue_fault_hook = NULL;
    queue_close(*state);
    *state = NULL;
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    return system(cmd) == 0 ? 0 : -1;
}

struct queue *qc_reopen(void **state, struct qc_config cfg)
{
    struct err e = {0};
    struct queue *q;

    queue_close(*state);
    *state = NULL;
    q = open_store(cfg, &e);
    if (!q)
        fail_msg("%s: queue_open: %s", qc_store->name, e.msg);
    *state = q;
    return q;
}

const char *qc_data_dir(void)
{
    return dir;
}

struct queue *qc_open_another(void)
{
    struct err e = {0};
    struct queue *q;

    if (!qc_store->shared)
        return NULL;
    q = open_store(QC_CONFIG_DEFAULT, &e);
    if (!q)
        fail_msg("%s: a second queue_open: %s", qc_store->name, e.msg);
    return q;
}

void qc_skip_on(const char *store, const char *bug)
{
    if (strcmp(qc_store->name, store) == 0) {
        print_message("[  SKIP    ] on %s: %s\n", store, bug);
        skip();
    }
}

/* ---- helpers ---- */

void qc_sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

void qc_enqueue_spec(struct queue *q, const struct job_spec *spec, char id[40])
{
    struct err e = {0};
    int existed = -1;
    int rc = queue_enqueue(q, spec, id, &existed, &e);

    if (rc != 0)
        fail_msg("%s: queue_enqueue: %d %s", qc_store->name, rc, e.msg);
    assert_int_equal(existed, 0);
    assert_true(id[0] != '\0');
}

void qc_enqueue(struct queue *q, int priority, const char *input, char id[40])
{
    struct job_spec spec = {.model = "m",
                            .input = input,
                            .input_len = strlen(input),
                            .input_json_len = -1,
                            .priority = priority,
                            .max_attempts = 2,
                            .lease_timeout_ms = 60000};

    qc_enqueue_spec(q, &spec, id);
}

struct job *qc_lease_as(struct queue *q, const char *name)
{
    struct job *j = NULL;
    struct err e = {0};
    int rc = queue_lease(q, name, 0, &j, &e);

    if (rc != 0)
        fail_msg("%s: queue_lease: %d %s", qc_store->name, rc, e.msg);
    return j;
}

struct job *qc_lease(struct queue *q)
{
    return qc_lease_as(q, "w");
}

struct job *qc_get(struct queue *q, const char *id)
{
    struct job *j = NULL;
    struct err e = {0};
    int rc = queue_get(q, id, NULL, 0, &j, &e);

    if (rc != 0)
        fail_msg("%s: queue_get %s: %d %s", qc_store->name, id, rc, e.msg);
    return j;
}

enum job_state qc_state(struct queue *q, const char *id)
{
    struct job *j = qc_get(q, id);
    enum job_state s = j->state;

    job_free(j);
    return s;
}

int qc_job_gone(struct queue *q, const char *id)
{
    struct job *j = NULL;
    struct err e = {0};
    int rc = queue_get(q, id, NULL, 0, &j, &e);

    job_free(j);
    return rc == ERR_NOT_FOUND;
}

json_t *qc_parse(struct buf *b)
{
    json_error_t je;
    json_t *o = json_loadb(b->data ? b->data : "", b->len, 0, &je);

    if (!json_is_object(o))
        fail_msg("%s: not a JSON object (%s): %.*s", qc_store->name, je.text, (int)b->len,
                 b->data ? b->data : "");
    buf_release(b);
    return o;
}

json_t *qc_job_json(struct queue *q, const char *id)
{
    struct job *j = qc_get(q, id);
    struct buf b = {0};

    assert_int_equal(queue_job_json(j, &b), 0);
    job_free(j);
    return qc_parse(&b);
}

json_t *qc_list(struct queue *q, const struct queue_list_filter *f)
{
    struct buf b = {0};
    struct err e = {0};
    int rc = queue_list(q, f, &b, &e);

    if (rc != 0)
        fail_msg("%s: queue_list: %d %s", qc_store->name, rc, e.msg);
    return qc_parse(&b);
}

json_t *qc_batch_json(struct queue *q, const char *id)
{
    struct buf b = {0};
    struct err e = {0};
    int rc = queue_batch_get(q, id, NULL, &b, &e);

    if (rc != 0)
        fail_msg("%s: queue_batch_get %s: %d %s", qc_store->name, id, rc, e.msg);
    return qc_parse(&b);
}

size_t qc_n_batches_listed(struct queue *q, const char *tenant, const char *status)
{
    struct buf b = {0};
    struct err e = {0};
    json_t *o;
    size_t n;

    if (queue_batch_list(q, tenant, 10, status, &b, &e) != 0)
        fail_msg("%s: queue_batch_list: %s", qc_store->name, e.msg);
    o = qc_parse(&b);
    n = json_array_size(json_object_get(o, "batch_jobs"));
    json_decref(o);
    return n;
}

void qc_assert_keys(const json_t *o, const char *const *keys, const char *what)
{
    const char *key;
    json_t *v;
    size_t n = 0;

    for (; keys[n]; n++)
        if (!json_object_get(o, keys[n]))
            fail_msg("%s: %s has no \"%s\"", qc_store->name, what, keys[n]);
    json_object_foreach ((json_t *)o, key, v) {
        size_t i = 0;
        while (keys[i] && strcmp(keys[i], key) != 0)
            i++;
        if (!keys[i])
            fail_msg("%s: %s has an unexpected \"%s\"", qc_store->name, what, key);
    }
}

const char *qc_str(const json_t *o, const char *key)
{
    return json_string_value(json_object_get(o, key));
}

/* ---- fault injection ---- */

static const char *fault_where; /* which array; NULL: none */
static long fault_at;           /* which element; -1: every one */
int qc_n_faults;

static int fault_hook(const char *where, size_t index)
{
    if (!fault_where || strcmp(where, fault_where) != 0 ||
        (fault_at >= 0 && index != (size_t)fault_at))
        return 0;
    qc_n_faults++;
    return 1;
}

void qc_inject(const char *where, long at)
{
    fault_where = where;
    fault_at = at;
    if (where)
        qc_n_faults = 0;
    queue_fault_hook = where ? fault_hook : NULL;
}

/* ---- the runner ---- */

/* Whether `s` can be opened: 1 yes, 0 skip it (said why), -1 it should work and does not. */
static int store_available(const struct qc_store *s)
{
    struct err e = {0};
    struct queue *q;
    int rc = 0;

    qc_store = s;
    snprintf(dir, sizeof(dir), "/tmp/inferd-test-queue-XXXXXX");
    if (!mkdtemp(dir))
        return -1;
    q = open_store(QC_CONFIG_DEFAULT, &e);
    if (q) {
        queue_close(q);
        rc = 1;
    } else if (strcmp(s->name, "postgres") == 0 && e.code == ERR_INVALID) {
        /* this build has no PostgreSQL store yet (e.msg is not shown: it may hold the URL) */
        printf("[  SKIP    ] queue contract (postgres): this build's queue_open refuses "
               "postgresql:// URLs (ERR_INVALID): no PostgreSQL store yet\n");
        rc = 0;
    } else {
        printf("[  FAILED  ] queue contract (%s): queue_open: %s\n", s->name, e.msg);
        rc = -1;
    }
    char cmd[300];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    if (system(cmd) != 0)
        rc = -1;
    return rc;
}

int main(void)
{
    static const struct {
        const char *concern;
        const struct CMUnitTest *tests;
        const size_t *n;
    } tables[] = {
        {"jobs", qc_jobs_tests, &qc_jobs_n},
        {"lifetimes", qc_lifetimes_tests, &qc_lifetimes_n},
        {"workers", qc_workers_tests, &qc_workers_n},
        {"outbox", qc_outbox_tests, &qc_outbox_n},
        {"batch", qc_batch_tests, &qc_batch_n},
        {"concurrency", qc_concurrency_tests, &qc_concurrency_n},
        {"faults", qc_faults_tests, &qc_faults_n},
        {"tenants", qc_tenants_tests, &qc_tenants_n},
    };
    const char *redis = getenv("INFERD_TEST_REDIS"), *pg = getenv("INFERD_TEST_POSTGRES");
    struct qc_store stores[3];
    size_t n_stores = 0;
    int failed = 0;

    stores[n_stores++] = (struct qc_store){"sqlite", NULL, 0};
    if (redis && redis[0])
        stores[n_stores++] = (struct qc_store){"redis", redis, 1};
    if (pg && pg[0])
        stores[n_stores++] = (struct qc_store){"postgres", pg, 1};
    if (getenv("INFERD_TEST_FILTER"))
        cmocka_set_test_filter(getenv("INFERD_TEST_FILTER"));
    for (size_t s = 0; s < n_stores; s++) {
        int ok = store_available(&stores[s]);
        if (ok < 0)
            failed++;
        if (ok <= 0)
            continue;
        for (size_t t = 0; t < sizeof(tables) / sizeof(tables[0]); t++) {
            char name[80];
            snprintf(name, sizeof(name), "queue contract (%s): %s", stores[s].name,
                     tables[t].concern);
            qc_store = &stores[s];
            printf("[----------] %s\n", name);
            fflush(stdout);
            failed += _cmocka_run_group_tests(name, tables[t].tests, *tables[t].n, NULL, NULL);
        }
    }
    return failed;
}
