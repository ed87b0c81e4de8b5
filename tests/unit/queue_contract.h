/*
 * queue_contract.h: what the queue contract suite's files share (tests/unit/test_queue*.c).
 *
 * The suite is one test binary, test_queue, that runs every table of tests once per store it
 * can reach: SQLite always (a temporary --data-dir), Redis with $INFERD_TEST_REDIS
 * (tests/unit/with_redis), PostgreSQL with $INFERD_TEST_POSTGRES (a postgresql:// URL of an
 * empty database). Each test starts from an empty store with a queue opened on it (`*state`),
 * and asserts only on the public interface of src/queue/queue.h and the public JSON it writes,
 * so any store that passes behaves the same for inferd's users.
 */
#ifndef INFERD_TEST_QUEUE_CONTRACT_H
#define INFERD_TEST_QUEUE_CONTRACT_H

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "core/clock.h"
#include "queue/queue.h"

#include <jansson.h>

/* A store the suite runs on. */
struct qc_store {
    const char *name; /* "sqlite", "redis", "postgres" */
    const char *url;  /* --queue; NULL for SQLite */
    int shared;       /* many processes share it: reopening is no sign that a worker died */
};

extern const struct qc_store *qc_store; /* the store the current test runs on */

/* The options a test's queue is opened with; qc_setup uses QC_CONFIG_DEFAULT. */
struct qc_config {
    int64_t max_queued;
    int64_t result_ttl_s;
    int64_t retry_backoff_ms;
    int64_t result_inline_max_bytes;
};
#define QC_CONFIG_DEFAULT ((struct qc_config){1000, 0, 0, 1024})

/* cmocka fixtures: an empty store and a queue on it in *state; teardown closes it. */
int qc_setup(void **state);
int qc_teardown(void **state);
#define QC_TEST(fn) cmocka_unit_test_setup_teardown(fn, qc_setup, qc_teardown)

/* Closes the test's queue and opens the same store again with `cfg` (nothing is wiped). */
struct queue *qc_reopen(void **state, struct qc_config cfg);

/* A second queue on the same store, as another process would open it (default options);
 * NULL for a single-owner store (SQLite). Close it with queue_close() before the test ends. */
struct queue *qc_open_another(void);

/* SQLite's --data-dir of the current test (its database is DIR/inferd.db). */
const char *qc_data_dir(void);

/* Skips the current test on store `store` because of `bug`, saying so. */
void qc_skip_on(const char *store, const char *bug);

/* An inference job of model "m", max_attempts 2, a 60 s lease. */
void qc_enqueue(struct queue *q, int priority, const char *input, char id[40]);
/* queue_enqueue that must succeed as a new job. */
void qc_enqueue_spec(struct queue *q, const struct job_spec *spec, char id[40]);
/* A lease without waiting as worker name `name`; NULL when nothing is runnable. */
struct job *qc_lease_as(struct queue *q, const char *name);
struct job *qc_lease(struct queue *q); /* as "w" */
/* queue_get that must succeed. */
struct job *qc_get(struct queue *q, const char *id);
enum job_state qc_state(struct queue *q, const char *id);
/* 1 when job `id` is no longer stored (queue_get says ERR_NOT_FOUND). */
int qc_job_gone(struct queue *q, const char *id);

/* Parses `b` (and releases it) as a JSON object; fails the test if it is not one. */
json_t *qc_parse(struct buf *b);
/* The public JSON of job `id` (queue_job_json of queue_get), parsed. */
json_t *qc_job_json(struct queue *q, const char *id);
/* queue_list with `f`, parsed. */
json_t *qc_list(struct queue *q, const struct queue_list_filter *f);
/* queue_batch_get, parsed. */
json_t *qc_batch_json(struct queue *q, const char *id);
/* How many batch jobs queue_batch_list shows to `tenant` (NULL: all) with `status` (NULL: any),
 * at most 10. */
size_t qc_n_batches_listed(struct queue *q, const char *tenant, const char *status);
/* Fails unless `o` has exactly the keys `keys` (NULL-terminated), naming what differs. */
void qc_assert_keys(const json_t *o, const char *const *keys, const char *what);
const char *qc_str(const json_t *o, const char *key); /* NULL when missing or not a string */

void qc_sleep_ms(int ms);

/* Polls `cond` every 20 ms until it holds; fails after `seconds` naming what it waited for. */
#define qc_poll(cond, seconds, what)                                                               \
    do {                                                                                           \
        int64_t qc_deadline_ = clock_now_ms() + (int64_t)(seconds)*1000;                           \
        while (!(cond)) {                                                                          \
            if (clock_now_ms() > qc_deadline_)                                                     \
                fail_msg("%s: waited %d s for %s", qc_store->name, (int)(seconds), what);          \
            qc_sleep_ms(20);                                                                       \
        }                                                                                          \
    } while (0)

/* ---- fault injection (queue_fault_hook) ---- */

/* Fails element `at` (-1: every one) of array `where` a store hands out, from now on; NULL
 * stops. qc_n_faults counts the failures injected since. */
void qc_inject(const char *where, long at);
extern int qc_n_faults;

/* The tables of the suite, one per concern, each run on every store. */
extern const struct CMUnitTest qc_jobs_tests[];
extern const size_t qc_jobs_n;
extern const struct CMUnitTest qc_lifetimes_tests[];
extern const size_t qc_lifetimes_n;
extern const struct CMUnitTest qc_workers_tests[];
extern const size_t qc_workers_n;
extern const struct CMUnitTest qc_outbox_tests[];
extern const size_t qc_outbox_n;
extern const struct CMUnitTest qc_batch_tests[];
extern const size_t qc_batch_n;
extern const struct CMUnitTest qc_concurrency_tests[];
extern const size_t qc_concurrency_n;
extern const struct CMUnitTest qc_faults_tests[];
extern const size_t qc_faults_n;
extern const struct CMUnitTest qc_tenants_tests[];
extern const size_t qc_tenants_n;

#endif
