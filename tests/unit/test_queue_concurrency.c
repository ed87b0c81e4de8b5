/*
 * test_queue_concurrency.c: the queue contract under concurrent callers: producers and workers
 * at once hand out each job to one attempt only; many schedulers racing for one due run make it
 * once. On a shared store (Redis, PostgreSQL) the callers use two queues opened on it, as two
 * processes would, and a cancel or a final state reached through one is learnt by the other.
 * Load is bounded: 200 jobs, 6 threads, 30 s at most.
 */
#include "queue_contract.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#define N_JOBS 200
#define N_PRODUCERS 2
#define N_WORKERS 4

struct run {
    struct queue *q[2]; /* q[1]: another process's queue, or q[0] again */
    pthread_mutex_t lock;
    char ids[N_JOBS][40]; /* enqueued, guarded by lock */
    int n_ids;
    char leased[N_JOBS * 2][40]; /* every lease handed out, guarded by lock */
    int n_leased;
    _Atomic int done;      /* jobs completed */
    _Atomic int conflicts; /* completions fenced out: a job handed out twice */
    _Atomic int errors;
    int64_t deadline_ms;
};

static void *produce(void *arg)
{
    struct run *r = arg;
    static _Atomic int next;
    int k = atomic_fetch_add(&next, 1);
    struct queue *q = r->q[k % 2];

    for (int i = 0; i < N_JOBS / N_PRODUCERS; i++) {
        struct job_spec spec = {.model = "m",
                                .input = "{}",
                                .input_len = 2,
                                .input_json_len = -1,
                                .priority = i % 3,
                                .max_attempts = 1,
                                .lease_timeout_ms = 60000};
        struct err e = {0};
        char id[40];
        int existed = 0;
        if (queue_enqueue(q, &spec, id, &existed, &e) != 0) {
            atomic_fetch_add(&r->errors, 1);
            continue;
        }
        pthread_mutex_lock(&r->lock);
        snprintf(r->ids[r->n_ids++], 40, "%s", id);
        pthread_mutex_unlock(&r->lock);
    }
    return NULL;
}

static void *work(void *arg)
{
    struct run *r = arg;
    static _Atomic int next;
    int k = atomic_fetch_add(&next, 1);
    struct queue *q = r->q[k % 2];
    char name[32];

    snprintf(name, sizeof(name), "h/%d/w/0", k);
    while (atomic_load(&r->done) + atomic_load(&r->conflicts) < N_JOBS &&
           clock_now_ms() < r->deadline_ms) {
        struct job *jobs[8] = {0};
        struct err e = {0};
        size_t n = 0;
        if (queue_lease_many(q, name, 8, 0, 50, jobs, &n, &e) != 0) {
            atomic_fetch_add(&r->errors, 1);
            continue;
        }
        pthread_mutex_lock(&r->lock);
        for (size_t i = 0; i < n && r->n_leased < N_JOBS * 2; i++)
            snprintf(r->leased[r->n_leased++], 40, "%s", jobs[i]->id);
        pthread_mutex_unlock(&r->lock);
        for (size_t i = 0; i < n; i++) {
            int rc = queue_complete(q, jobs[i]->id, jobs[i]->token, "{}", 2, -1, &e);
            atomic_fetch_add(rc == 0              ? &r->done
                             : rc == ERR_CONFLICT ? &r->conflicts
                                                  : &r->errors,
                             1);
            job_free(jobs[i]);
        }
    }
    return NULL;
}

static int by_id(const void *a, const void *b)
{
    return strcmp(a, b);
}

/* Producers and workers at once: every job is handed out once and succeeds. */
static void test_each_job_is_leased_once(void **state)
{
    struct run *r = calloc(1, sizeof(*r));
    pthread_t producers[N_PRODUCERS], workers[N_WORKERS];
    int64_t counts[JOB_N_STATES];
    struct err e = {0};

    assert_non_null(r);
    r->q[0] = *state;
    r->q[1] = qc_open_another();
    if (!r->q[1])
        r->q[1] = r->q[0];
    pthread_mutex_init(&r->lock, NULL);
    r->deadline_ms = clock_now_ms() + 30000;
    for (int i = 0; i < N_WORKERS; i++)
        assert_int_equal(pthread_create(&workers[i], NULL, work, r), 0);
    for (int i = 0; i < N_PRODUCERS; i++)
        assert_int_equal(pthread_create(&producers[i], NULL, produce, r), 0);
    for (int i = 0; i < N_PRODUCERS; i++)
        pthread_join(producers[i], NULL);
    for (int i = 0; i < N_WORKERS; i++)
        pthread_join(workers[i], NULL);
    if (r->q[1] != r->q[0])
        queue_close(r->q[1]);
    pthread_mutex_destroy(&r->lock);
    assert_int_equal(atomic_load(&r->errors), 0);
    assert_int_equal(r->n_ids, N_JOBS);
    assert_int_equal(atomic_load(&r->conflicts), 0);
    assert_int_equal(atomic_load(&r->done), N_JOBS);
    /* each id leased once: the sorted leases are the sorted ids */
    assert_int_equal(r->n_leased, N_JOBS);
    qsort(r->ids, N_JOBS, 40, by_id);
    qsort(r->leased, (size_t)r->n_leased, 40, by_id);
    for (int i = 0; i < N_JOBS; i++)
        assert_string_equal(r->ids[i], r->leased[i]);
    assert_int_equal(queue_counts(r->q[0], counts, &e), 0);
    assert_int_equal(counts[JOB_SUCCEEDED], N_JOBS);
    assert_int_equal(counts[JOB_QUEUED] + counts[JOB_RUNNING], 0);
    assert_int_equal(queue_queued(r->q[0]), 0);
    free(r);
}

#define N_SCHEDULERS 6

struct race {
    struct queue *q[2];
    const struct batch_job_spec *run;
    pthread_barrier_t start;
    _Atomic int made, conflicts, errors;
};

static void *schedule_run(void *arg)
{
    struct race *r = arg;
    static _Atomic int next;
    int k = atomic_fetch_add(&next, 1);
    struct err e = {0};
    char id[40];

    pthread_barrier_wait(&r->start);
    int rc = queue_batch_create(r->q[k % 2], r->run, id, &e);
    atomic_fetch_add(rc == 0 ? &r->made : rc == ERR_CONFLICT ? &r->conflicts : &r->errors, 1);
    return NULL;
}

/* Many schedulers (threads, and on a shared store two processes) race for one due run. */
static void test_scheduled_run_is_made_once(void **state)
{
    struct queue *q = *state;
    int64_t due_at = clock_now_ms() - 1000;
    struct batch_job_spec sched = {.definition = "{\"model\":\"m\",\"schedule\":\"@hourly\"}",
                                   .model = "m",
                                   .max_attempts = 1,
                                   .lease_timeout_ms = 60000,
                                   .schedule = "@hourly",
                                   .next_run_ms = due_at};
    const char *inputs[] = {"{\"object\":\"a\"}"}, *objects[] = {"a"};
    struct batch_job_spec run = {.definition = "{\"model\":\"m\"}",
                                 .model = "m",
                                 .max_attempts = 1,
                                 .lease_timeout_ms = 60000,
                                 .output = "file:///out/",
                                 .task_inputs = inputs,
                                 .task_objects = objects,
                                 .n_tasks = 1,
                                 .finish_input = "{}",
                                 .run_at_ms = due_at,
                                 .parent_next_run_ms = due_at + 3600000};
    struct race r = {.q = {q, NULL}, .run = &run};
    pthread_t t[N_SCHEDULERS];
    struct err e = {0};
    char sid[40];

    assert_int_equal(queue_batch_create(q, &sched, sid, &e), 0);
    run.parent = sid;
    r.q[1] = qc_open_another();
    if (!r.q[1])
        r.q[1] = q;
    pthread_barrier_init(&r.start, NULL, N_SCHEDULERS);
    for (int i = 0; i < N_SCHEDULERS; i++)
        assert_int_equal(pthread_create(&t[i], NULL, schedule_run, &r), 0);
    for (int i = 0; i < N_SCHEDULERS; i++)
        pthread_join(t[i], NULL);
    pthread_barrier_destroy(&r.start);
    if (r.q[1] != q)
        queue_close(r.q[1]);
    assert_int_equal(atomic_load(&r.errors), 0);
    assert_int_equal(atomic_load(&r.made), 1);
    assert_int_equal(atomic_load(&r.conflicts), N_SCHEDULERS - 1);
    json_t *o = qc_batch_json(q, sid);
    assert_int_equal(json_array_size(json_object_get(o, "runs")), 1);
    json_decref(o);
    assert_int_equal(queue_queued(q), 1);
}

/* On a shared store, a running job cancelled through another process's queue is noted here
 * (its worker stops it), and final states reached there reach this one's on_final. */
struct final_seen {
    pthread_mutex_t lock;
    char id[40];
    int state;
};

static void seen(void *ctx, const char *job_id, enum job_state s)
{
    struct final_seen *f = ctx;

    pthread_mutex_lock(&f->lock);
    if (strcmp(job_id, f->id) == 0)
        f->state = (int)s;
    pthread_mutex_unlock(&f->lock);
}

static int seen_state(struct final_seen *f)
{
    pthread_mutex_lock(&f->lock);
    int s = f->state;
    pthread_mutex_unlock(&f->lock);
    return s;
}

static void test_other_process_cancel_and_final(void **state)
{
    struct queue *q = *state, *other = qc_open_another();
    struct final_seen f = {.lock = PTHREAD_MUTEX_INITIALIZER, .state = -1};
    struct job *j, *c;
    struct err e = {0};
    char id[40], done[40];

    if (!other)
        skip(); /* a single-owner store has no other process */
    qc_enqueue(q, 5, "{}", id);
    j = qc_lease(q);
    assert_string_equal(j->id, id);
    assert_int_equal(queue_cancel(other, id, NULL, &c, &e), 0);
    assert_int_equal(c->cancel_requested, 1);
    job_free(c);
    qc_poll(queue_cancel_noted(q, id), 10, "the other process's cancel to be noted here");
    assert_int_equal(queue_complete(q, id, j->token, "{}", 2, -1, &e), 0);
    job_free(j);
    assert_int_equal(qc_state(other, id), JOB_CANCELLED);

    qc_enqueue(q, 0, "{}", done);
    snprintf(f.id, sizeof(f.id), "%s", done);
    queue_on_final(q, seen, &f);
    j = qc_lease(other);
    assert_non_null(j);
    assert_string_equal(j->id, done);
    assert_int_equal(queue_complete(other, done, j->token, "{}", 2, -1, &e), 0);
    job_free(j);
    qc_poll(seen_state(&f) >= 0, 10, "on_final for a job finished by another process");
    assert_int_equal(seen_state(&f), JOB_SUCCEEDED);
    queue_on_final(q, NULL, NULL);
    queue_close(other);
    pthread_mutex_destroy(&f.lock);
}

const struct CMUnitTest qc_concurrency_tests[] = {
    QC_TEST(test_each_job_is_leased_once),
    QC_TEST(test_scheduled_run_is_made_once),
    QC_TEST(test_other_process_cancel_and_final),
};
const size_t qc_concurrency_n = sizeof(qc_concurrency_tests) / sizeof(qc_concurrency_tests[0]);
