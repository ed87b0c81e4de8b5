/*
 * metrics.c: Prometheus counters and histograms, lock-free on the hot path.
 *
 * The list of models only grows (a model name is created once and kept, so a reload does not
 * reset its counters); `lock` guards appending to it, and readers walk it without the lock
 * because an entry is fully built before it is published with a release store.
 */
#include "metrics/metrics.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static const int statuses[] = {200, 400, 404, 409, 413, 422, 429, 499, 500, 502, 503, 504};
#define N_STATUS (sizeof(statuses) / sizeof(statuses[0]))

static const double latency_bounds[] = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                                        0.01,   0.025,   0.05,   0.1,   0.25,   0.5,
                                        1,      2.5,     5,      10,    30};
#define N_LATENCY (sizeof(latency_bounds) / sizeof(latency_bounds[0]))

static const double job_bounds[] = {0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1,
                                    5,     10,    30,   60,   300, 900, 3600};
#define N_JOB (sizeof(job_bounds) / sizeof(job_bounds[0]))

static const double batch_bounds[] = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384};
#define N_BATCH (sizeof(batch_bounds) / sizeof(batch_bounds[0]))

struct histogram {
    const double *bounds;
    size_t n_bounds;
    _Atomic uint64_t counts[20]; /* per bucket, not cumulative; last is +Inf */
    _Atomic uint64_t sum_micro;  /* sum of observations, in millionths */
    _Atomic uint64_t count;
};

struct metrics_model {
    char *name;
    _Atomic uint64_t by_status[N_STATUS + 1]; /* last: any other status */
    struct histogram latency, queue_wait, batch, job_wait, job_run;
    _Atomic uint64_t job_outcomes[METRICS_N_JOB_OUTCOMES];
    _Atomic int64_t inflight;
    struct metrics_model *_Atomic next;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct metrics_model *_Atomic models; /* appended under lock, read without */

static void histogram_init(struct histogram *h, const double *bounds, size_t n)
{
    h->bounds = bounds;
    h->n_bounds = n;
}

static void observe(struct histogram *h, double v)
{
    size_t i = 0;

    while (i < h->n_bounds && v > h->bounds[i])
        i++;
    atomic_fetch_add_explicit(&h->counts[i], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&h->sum_micro, (uint64_t)(v * 1e6), memory_order_relaxed);
    atomic_fetch_add_explicit(&h->count, 1, memory_order_relaxed);
}

struct metrics_model *metrics_model_get(const char *name)
{
    struct metrics_model *m;

    pthread_mutex_lock(&lock);
    for (m = atomic_load(&models); m; m = atomic_load(&m->next))
        if (strcmp(m->name, name) == 0)
            break;
    if (!m && (m = calloc(1, sizeof(*m)))) {
        m->name = strdup(name);
        if (!m->name) {
            free(m);
            m = NULL;
        } else {
            histogram_init(&m->latency, latency_bounds, N_LATENCY);
            histogram_init(&m->queue_wait, latency_bounds, N_LATENCY);
            histogram_init(&m->batch, batch_bounds, N_BATCH);
            histogram_init(&m->job_wait, job_bounds, N_JOB);
            histogram_init(&m->job_run, job_bounds, N_JOB);
            atomic_store(&m->next, atomic_load(&models));
            atomic_store_explicit(&models, m, memory_order_release);
        }
    }
    pthread_mutex_unlock(&lock);
    return m;
}

void metrics_request(struct metrics_model *m, int status, double seconds)
{
    size_t i;

    if (!m)
        return;
    for (i = 0; i < N_STATUS; i++)
        if (statuses[i] == status)
            break;
    atomic_fetch_add_explicit(&m->by_status[i], 1, memory_order_relaxed);
    observe(&m->latency, seconds);
}

void metrics_queue_wait(struct metrics_model *m, double seconds)
{
    if (m)
        observe(&m->queue_wait, seconds);
}

void metrics_batch(struct metrics_model *m, size_t rows)
{
    if (m)
        observe(&m->batch, (double)rows);
}

void metrics_job_wait(struct metrics_model *m, double seconds)
{
    if (m)
        observe(&m->job_wait, seconds);
}

void metrics_job_run(struct metrics_model *m, double seconds)
{
    if (m)
        observe(&m->job_run, seconds);
}

void metrics_job_outcome(struct metrics_model *m, enum metrics_job_outcome outcome)
{
    if (m && (unsigned)outcome < METRICS_N_JOB_OUTCOMES)
        atomic_fetch_add_explicit(&m->job_outcomes[outcome], 1, memory_order_relaxed);
}

void metrics_inflight_add(struct metrics_model *m, int delta)
{
    if (m)
        atomic_fetch_add_explicit(&m->inflight, delta, memory_order_relaxed);
}

static int render_histogram(struct buf *out, const char *name, const char *model,
                            struct histogram *h)
{
    uint64_t cumulative = 0;
    int rc = 0;

    for (size_t i = 0; rc == 0 && i <= h->n_bounds; i++) {
        cumulative += atomic_load_explicit(&h->counts[i], memory_order_relaxed);
        if (i < h->n_bounds)
            rc = buf_printf(out, "%s_bucket{model=\"%s\",le=\"%g\"} %llu\n", name, model,
                            h->bounds[i], (unsigned long long)cumulative);
        else
            rc = buf_printf(out, "%s_bucket{model=\"%s\",le=\"+Inf\"} %llu\n", name, model,
                            (unsigned long long)cumulative);
    }
    if (rc == 0)
        rc = buf_printf(out, "%s_sum{model=\"%s\"} %.6f\n%s_count{model=\"%s\"} %llu\n", name,
                        model, (double)atomic_load(&h->sum_micro) / 1e6, name, model,
                        (unsigned long long)cumulative);
    return rc;
}

int metrics_render(struct buf *out)
{
    struct metrics_model *head = atomic_load_explicit(&models, memory_order_acquire), *m;
    int rc;

    rc = buf_puts(out, "# HELP inferd_requests_total Inference requests answered, by model and "
                       "HTTP status.\n# TYPE inferd_requests_total counter\n");
    for (m = head; rc == 0 && m; m = atomic_load(&m->next)) {
        for (size_t i = 0; rc == 0 && i <= N_STATUS; i++) {
            uint64_t n = atomic_load_explicit(&m->by_status[i], memory_order_relaxed);
            if (i == N_STATUS)
                rc = buf_printf(out, "inferd_requests_total{model=\"%s\",status=\"other\"} %llu\n",
                                m->name, (unsigned long long)n);
            else
                rc = buf_printf(out, "inferd_requests_total{model=\"%s\",status=\"%d\"} %llu\n",
                                m->name, statuses[i], (unsigned long long)n);
        }
    }
    if (rc == 0)
        rc = buf_puts(out, "# HELP inferd_request_duration_seconds Time from a request's arrival "
                           "to its answer.\n# TYPE inferd_request_duration_seconds histogram\n");
    for (m = head; rc == 0 && m; m = atomic_load(&m->next))
        rc = render_histogram(out, "inferd_request_duration_seconds", m->name, &m->latency);
    if (rc == 0)
        rc = buf_puts(out, "# HELP inferd_batcher_queue_seconds Time a request waited in the "
                           "batcher before its backend call.\n"
                           "# TYPE inferd_batcher_queue_seconds histogram\n");
    for (m = head; rc == 0 && m; m = atomic_load(&m->next))
        rc = render_histogram(out, "inferd_batcher_queue_seconds", m->name, &m->queue_wait);
    if (rc == 0)
        rc = buf_puts(out, "# HELP inferd_batch_size Rows per backend execute call.\n"
                           "# TYPE inferd_batch_size histogram\n");
    for (m = head; rc == 0 && m; m = atomic_load(&m->next))
        rc = render_histogram(out, "inferd_batch_size", m->name, &m->batch);
    if (rc == 0)
        rc = buf_puts(out, "# HELP inferd_job_queue_wait_seconds Async jobs: time from submission "
                           "to the start of their last attempt.\n"
                           "# TYPE inferd_job_queue_wait_seconds histogram\n");
    for (m = head; rc == 0 && m; m = atomic_load(&m->next))
        rc = render_histogram(out, "inferd_job_queue_wait_seconds", m->name, &m->job_wait);
    if (rc == 0)
        rc = buf_puts(out, "# HELP inferd_job_run_seconds Async jobs: run time of an attempt.\n"
                           "# TYPE inferd_job_run_seconds histogram\n");
    for (m = head; rc == 0 && m; m = atomic_load(&m->next))
        rc = render_histogram(out, "inferd_job_run_seconds", m->name, &m->job_run);
    if (rc == 0)
        rc = buf_puts(out, "# HELP inferd_job_attempts_total Async job attempts this process "
                           "recorded, by model and outcome.\n"
                           "# TYPE inferd_job_attempts_total counter\n");
    for (m = head; rc == 0 && m; m = atomic_load(&m->next)) {
        static const char *const names[METRICS_N_JOB_OUTCOMES] = {"succeeded", "retried", "failed"};
        for (int i = 0; rc == 0 && i < METRICS_N_JOB_OUTCOMES; i++)
            rc = buf_printf(out, "inferd_job_attempts_total{model=\"%s\",outcome=\"%s\"} %llu\n",
                            m->name, names[i],
                            (unsigned long long)atomic_load_explicit(&m->job_outcomes[i],
                                                                     memory_order_relaxed));
    }
    if (rc == 0)
        rc = buf_puts(out, "# HELP inferd_inflight_requests Requests admitted and not yet "
                           "answered.\n# TYPE inferd_inflight_requests gauge\n");
    for (m = head; rc == 0 && m; m = atomic_load(&m->next))
        rc = buf_printf(out, "inferd_inflight_requests{model=\"%s\"} %lld\n", m->name,
                        (long long)atomic_load(&m->inflight));
    return rc;
}
