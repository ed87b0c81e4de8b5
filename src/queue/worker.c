/*
 * worker.c: async workers: lease a job, run it through the model's batcher, record the result.
 *
 * A worker is a thread that owns at most one job. While the batch runs, the worker waits on
 * its own condition variable and wakes every third of the lease to extend it, with the
 * attempt's fencing token: if that fails, another attempt owns the job now and this result
 * will be discarded by queue_complete().
 */
#define _GNU_SOURCE
#include "queue/worker.h"
#include "batch/batch_jobs.h"
#include "core/clock.h"
#include "core/log.h"
#include "metrics/metrics.h"
#include "model/codec.h"
#include "model/registry.h"
#include "storage/storage.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

enum worker_state { WORKER_OFF = 0, WORKER_RUNNING, WORKER_RETIRING };

struct worker {
    struct worker_pool *pool;
    pthread_t thread;
    enum worker_state state; /* the controller's (and start/stop's) only */
    _Atomic int retire;      /* finish the current jobs, then exit */
    int index;
    char name[64];
    /* completions of the running jobs' batch items */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int pending; /* guarded by lock: items submitted and not yet done */
};

struct worker_pool {
    struct worker_pool_config cfg;
    struct queue *q;
    struct registry *reg;
    struct worker *workers;
    int n_slots;          /* workers allocated: max_workers */
    _Atomic int n_active; /* running and not retiring */
    _Atomic int stopping;
    pthread_t controller;
    int controller_started;
    int64_t idle_since_ms; /* controller's: when the queue was last seen empty and idle */
    _Atomic int busy;
    pthread_mutex_t rate_lock;
    int64_t rate_window_start_ms; /* guarded by rate_lock */
    int64_t rate_count;           /* guarded by rate_lock */
    double rate;                  /* guarded by rate_lock: jobs/s of the last full window */
};

/* ---- reading inputs and writing outputs (file:// and plain paths) ---- */

/* The job's input and output go through storage, so they are atomic and name the location. */
static int read_location(const char *uri, struct buf *out, struct err *e)
{
    int rc = storage_get(uri, out, e);

    if (rc != 0) {
        char msg[sizeof(e->msg)];
        snprintf(msg, sizeof(msg), "%s", e->msg);
        err_set(e, rc, "input_location: %s", msg);
    }
    return rc;
}

static int write_location(const char *uri, const char *data, size_t len, struct err *e)
{
    int rc = storage_put(uri, data, len, e);

    if (rc != 0) {
        char msg[sizeof(e->msg)];
        snprintf(msg, sizeof(msg), "%s", e->msg);
        err_set(e, rc, "output_location: %s", msg);
    }
    return rc;
}

/* ---- running a batch of jobs ---- */

/* One leased job on its way through the model. */
struct slot {
    struct worker *w;
    struct job *job;
    struct model *model;
    struct infer_request *req;
    struct batch_item item;
    struct buf body; /* the input, when read from input_location */
    struct buf out;  /* the encoded result */
    int64_t out_json_len;
    int rc;
    int retryable;
    struct err err;
    int submitted;
};

static void item_done(struct batch_item *item, int rc, const struct err *e)
{
    struct slot *sl = item->ctx;
    struct worker *w = sl->w;

    pthread_mutex_lock(&w->lock);
    sl->rc = rc;
    if (e)
        sl->err = *e;
    sl->retryable = rc != 0; /* a backend failure may be transient; max_attempts bounds it */
    w->pending--;
    if (w->pending == 0)
        pthread_cond_signal(&w->cond);
    pthread_mutex_unlock(&w->lock);
}

static void count_completions(struct worker_pool *p, size_t n)
{
    int64_t now = queue_now_ms();

    pthread_mutex_lock(&p->rate_lock);
    if (now - p->rate_window_start_ms >= 2000) {
        p->rate = (double)p->rate_count * 1000.0 / (double)(now - p->rate_window_start_ms);
        p->rate_window_start_ms = now;
        p->rate_count = 0;
    }
    p->rate_count += (int64_t)n;
    pthread_mutex_unlock(&p->rate_lock);
}

/* Reads, decodes and checks a job's input; on failure the slot says why. */
static int prepare_slot(struct worker_pool *p, struct slot *sl)
{
    struct job *job = sl->job;
    const struct buf *input = &job->input;
    int64_t json_len = job->input_json_len;
    struct err *e = &sl->err;
    int rc;

    if (job->input_location) {
        rc = read_location(job->input_location, &sl->body, e);
        if (rc != 0) {
            sl->retryable = rc == ERR_IO;
            return rc;
        }
        input = &sl->body;
        json_len = -1;
    }
    rc = registry_acquire(p->reg, job->model, 0, &sl->model, e);
    if (rc != 0) {
        sl->retryable = 1; /* the model may be reloading */
        return rc;
    }
    rc = codec_decode_v2(input->data ? input->data : "", input->len, json_len, &sl->req, e);
    if (rc == 0)
        rc = tensor_check_inputs(sl->req, &sl->model->info, e);
    if (rc != 0) {
        char msg[sizeof(e->msg)];
        snprintf(msg, sizeof(msg), "%s", e->msg);
        err_set(e, rc, "model '%s': %s", job->model, msg);
    }
    return rc;
}

/* Waits until every submitted item is done, extending the jobs' leases meanwhile. */
static void wait_batch(struct worker *w, struct slot *slots, size_t n)
{
    struct worker_pool *p = w->pool;
    int64_t extend_every = INT64_MAX;

    for (size_t i = 0; i < n; i++)
        if (slots[i].job->lease_timeout_ms / 3 < extend_every)
            extend_every = slots[i].job->lease_timeout_ms / 3;
    if (extend_every < 100)
        extend_every = 100;
    pthread_mutex_lock(&w->lock);
    while (w->pending > 0) {
        struct timespec ts = clock_realtime_after_ms(extend_every);
        if (pthread_cond_timedwait(&w->cond, &w->lock, &ts) == ETIMEDOUT && w->pending > 0) {
            pthread_mutex_unlock(&w->lock);
            for (size_t i = 0; i < n; i++) {
                struct err xe;
                if (slots[i].submitted && queue_extend(p->q, slots[i].job->id, slots[i].job->token,
                                                       slots[i].job->lease_timeout_ms, &xe) != 0)
                    log_warn("worker", "could not extend a lease", "job=%s reason=\"%s\"",
                             slots[i].job->id, xe.msg);
            }
            pthread_mutex_lock(&w->lock);
        }
    }
    pthread_mutex_unlock(&w->lock);
}

static void submit_slot(struct worker *w, struct slot *sl)
{
    int rc;

    sl->item = (struct batch_item){.req = sl->req, .client_fd = -1, .done = item_done, .ctx = sl};
    metrics_job_wait(sl->model->metrics, (double)(queue_now_ms() - sl->job->created_ms) / 1e3);
    pthread_mutex_lock(&w->lock);
    w->pending++;
    pthread_mutex_unlock(&w->lock);
    sl->submitted = 1;
    for (;;) {
        rc = batcher_submit(sl->model->batcher, &sl->item, &sl->err);
        if (rc != ERR_BUSY)
            break;
        /* the model's queue is full of online traffic: wait a little, it is not the job's fault */
        struct timespec ts = {0, 5 * 1000000};
        nanosleep(&ts, NULL);
    }
    if (rc != 0) {
        pthread_mutex_lock(&w->lock);
        w->pending--;
        pthread_mutex_unlock(&w->lock);
        sl->rc = rc;
        sl->retryable = 1;
    }
}

/* Encodes a finished slot's result (or writes it to its output_location). */
static void encode_slot(struct slot *sl)
{
    if (sl->rc != 0)
        return;
    if (codec_encode_v2(sl->req, sl->model->name, sl->model->version_str, &sl->out,
                        &sl->out_json_len) != 0) {
        sl->rc = err_set(&sl->err, ERR_NOMEM, "out of memory encoding the result");
        sl->retryable = 1;
        return;
    }
    if (sl->job->output_location) {
        sl->rc = write_location(sl->job->output_location, sl->out.data, sl->out.len, &sl->err);
        sl->retryable = 1;
        if (sl->rc == 0)
            buf_release(&sl->out); /* stored there, not inline */
    }
}

static void run_jobs(struct worker *w, struct job **jobs, size_t n)
{
    struct worker_pool *p = w->pool;
    struct slot *slots = calloc(n, sizeof(*slots));
    struct queue_outcome *outs = calloc(n, sizeof(*outs));
    int64_t started = queue_now_ms();
    struct err e;

    if (!slots || !outs) {
        /* out of memory: leave the leases to expire; the jobs run again */
        free(slots);
        free(outs);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        slots[i].w = w;
        slots[i].job = jobs[i];
        slots[i].rc = prepare_slot(p, &slots[i]);
    }
    /* all of them into the batchers at once: queued jobs are dynamically batched too */
    for (size_t i = 0; i < n; i++)
        if (slots[i].rc == 0)
            submit_slot(w, &slots[i]);
    wait_batch(w, slots, n);
    for (size_t i = 0; i < n; i++) {
        struct slot *sl = &slots[i];
        if (sl->submitted)
            metrics_job_run(sl->model->metrics, (double)(queue_now_ms() - started) / 1e3);
        encode_slot(sl);
        outs[i] = (struct queue_outcome){
            .id = sl->job->id,
            .token = sl->job->token,
            .ok = sl->rc == 0,
            .result = sl->rc == 0 ? sl->out.data : NULL,
            .result_len = sl->rc == 0 ? sl->out.len : 0,
            .result_json_len = sl->out_json_len,
            .error = sl->rc == 0 ? NULL : sl->err.msg,
            .retryable = sl->retryable,
        };
    }
    if (queue_finish_many(p->q, outs, n, &e) != 0)
        log_error("worker", "could not record jobs' outcomes", "jobs=%zu reason=\"%s\"", n, e.msg);
    for (size_t i = 0; i < n; i++) {
        if (outs[i].rc == ERR_CONFLICT)
            log_warn("worker", "attempt fenced out; its outcome is discarded",
                     "job=%s attempt=%llu", slots[i].job->id,
                     (unsigned long long)slots[i].job->token);
        infer_request_destroy(slots[i].req);
        model_release(slots[i].model);
        buf_release(&slots[i].body);
        buf_release(&slots[i].out);
    }
    count_completions(p, n);
    free(slots);
    free(outs);
}

/* A batch task (one input object) or a run's finishing job: long, so it runs alone. */
static void run_task(struct worker *w, struct job *job)
{
    struct worker_pool *p = w->pool;
    struct buf result = {0};
    struct err e = {0}, fe;
    int retryable = 0;
    int rc = batch_task_run(p->q, p->reg, job, &p->stopping, &result, &retryable, &e);
    struct queue_outcome out = {
        .id = job->id,
        .token = job->token,
        .ok = rc == 0,
        .result = rc == 0 ? result.data : NULL,
        .result_len = rc == 0 ? result.len : 0,
        .result_json_len = -1,
        .error = rc == 0 ? NULL : e.msg,
        .retryable = retryable,
    };

    if (rc == 0 && job->kind == JOB_KIND_BATCH_TASK)
        log_info("worker", "batch task done", "job=%s batch_job=%s worker=%s", job->id,
                 job->batch_id, w->name);
    if (rc != 0 && rc != ERR_CANCELLED)
        log_warn("worker", "batch task failed", "job=%s batch_job=%s retryable=%d reason=\"%s\"",
                 job->id, job->batch_id, retryable, e.msg);
    if (queue_finish_many(p->q, &out, 1, &fe) != 0)
        log_error("worker", "could not record a batch task's outcome", "job=%s reason=\"%s\"",
                  job->id, fe.msg);
    buf_release(&result);
    count_completions(p, 1);
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    struct worker_pool *p = w->pool;
    struct job **jobs = calloc((size_t)p->cfg.batch, sizeof(*jobs));

    while (jobs && !atomic_load(&p->stopping) && !atomic_load(&w->retire)) {
        struct err e;
        size_t n = 0;
        if (queue_lease_many(p->q, w->name, (size_t)p->cfg.batch, p->cfg.lease_poll_ms, jobs, &n,
                             &e) != 0) {
            log_error("worker", "lease failed", "worker=%s reason=\"%s\"", w->name, e.msg);
            struct timespec ts = {0, 200 * 1000000};
            nanosleep(&ts, NULL);
            continue;
        }
        if (n == 0)
            continue;
        atomic_fetch_add(&p->busy, (int)n);
        /* inferences first, as one batch; then the batch task (at most one per lease) */
        size_t n_infer = 0;
        for (size_t i = 0; i < n; i++) {
            if (jobs[i]->kind == JOB_KIND_INFER) {
                struct job *t = jobs[n_infer];
                jobs[n_infer++] = jobs[i];
                jobs[i] = t;
            }
        }
        if (n_infer > 0)
            run_jobs(w, jobs, n_infer);
        for (size_t i = n_infer; i < n; i++)
            run_task(w, jobs[i]);
        atomic_fetch_sub(&p->busy, (int)n);
        for (size_t i = 0; i < n; i++) {
            job_free(jobs[i]);
            jobs[i] = NULL;
        }
    }
    free(jobs);
    return NULL;
}

/* ---- the pool ---- */

static int start_worker(struct worker_pool *p, struct worker *w)
{
    atomic_store(&w->retire, 0);
    if (pthread_create(&w->thread, NULL, worker_main, w) != 0)
        return -1;
    w->state = WORKER_RUNNING;
    atomic_fetch_add(&p->n_active, 1);
    return 0;
}

/* Reaps retired workers whose threads have ended. */
static void reap(struct worker_pool *p)
{
    for (int i = 0; i < p->n_slots; i++) {
        struct worker *w = &p->workers[i];
        if (w->state == WORKER_RETIRING && pthread_tryjoin_np(w->thread, NULL) == 0)
            w->state = WORKER_OFF;
    }
}

/*
 * Autoscaling, twice a second: more workers (up to max) while the backlog per worker is
 * above the target and would take more than a second to drain at the observed rate; one
 * fewer (down to min, which may be 0) per tick once nothing has been queued or running for
 * scale_down_delay_ms.
 */
static void scale(struct worker_pool *p)
{
    const struct worker_pool_config *c = &p->cfg;
    int64_t now = queue_now_ms(), queued = queue_queued(p->q);
    int n = atomic_load(&p->n_active), busy = atomic_load(&p->busy);
    double rate = worker_pool_drain_rate(p);
    double per_worker = n > 0 ? (double)queued / n : (double)queued;
    double drain_s = rate > 0 ? (double)queued / rate : 1e9;

    reap(p);
    if (queued > 0 || busy > 0)
        p->idle_since_ms = now;
    if (queued > 0 && n < c->max_workers &&
        (n == 0 || (per_worker > (double)c->target_backlog && drain_s > 1.0))) {
        int want = (int)((queued + c->target_backlog - 1) / c->target_backlog);
        if (want > c->max_workers)
            want = c->max_workers;
        if (want <= n)
            want = n + 1;
        for (int i = 0; i < p->n_slots && atomic_load(&p->n_active) < want; i++)
            if (p->workers[i].state == WORKER_OFF && start_worker(p, &p->workers[i]) != 0)
                break;
        log_info("worker", "scaled up", "workers=%d queued=%lld jobs_per_s=%.1f",
                 atomic_load(&p->n_active), (long long)queued, rate);
    } else if (n > c->min_workers && now - p->idle_since_ms >= c->scale_down_delay_ms) {
        for (int i = p->n_slots - 1; i >= 0; i--) {
            struct worker *w = &p->workers[i];
            if (w->state == WORKER_RUNNING) {
                atomic_store(&w->retire, 1);
                w->state = WORKER_RETIRING;
                atomic_fetch_sub(&p->n_active, 1);
                break;
            }
        }
        p->idle_since_ms = now; /* one per delay: a quiet spell shrinks the pool step by step */
        log_info("worker", "scaled down", "workers=%d", atomic_load(&p->n_active));
    }
}

static void *controller_main(void *arg)
{
    struct worker_pool *p = arg;

    while (!atomic_load(&p->stopping)) {
        struct timespec ts = {0, 100 * 1000000};
        for (int i = 0; i < 5 && !atomic_load(&p->stopping); i++)
            nanosleep(&ts, NULL);
        if (!atomic_load(&p->stopping))
            scale(p);
    }
    return NULL;
}

int worker_pool_start(const struct worker_pool_config *cfg, struct queue *q, struct registry *reg,
                      struct worker_pool **out, struct err *e)
{
    struct worker_pool *p = calloc(1, sizeof(*p));
    char host[64] = "host";
    int start;

    *out = NULL;
    if (!p)
        return err_set(e, ERR_NOMEM, "out of memory");
    p->cfg = *cfg;
    if (p->cfg.max_workers <= 0) /* a fixed pool */
        p->cfg.min_workers = p->cfg.max_workers = cfg->workers;
    if (p->cfg.target_backlog <= 0)
        p->cfg.target_backlog = 10;
    p->q = q;
    p->reg = reg;
    pthread_mutex_init(&p->rate_lock, NULL);
    p->rate_window_start_ms = queue_now_ms();
    p->idle_since_ms = queue_now_ms();
    p->n_slots = p->cfg.max_workers > 0 ? p->cfg.max_workers : 1;
    p->workers = calloc((size_t)p->n_slots, sizeof(*p->workers));
    if (!p->workers) {
        free(p);
        return err_set(e, ERR_NOMEM, "out of memory");
    }
    gethostname(host, sizeof(host) - 1);
    for (int i = 0; i < p->n_slots; i++) {
        struct worker *w = &p->workers[i];
        w->pool = p;
        w->index = i;
        snprintf(w->name, sizeof(w->name), "%.40s/%d/%d", host, (int)getpid(), i);
        pthread_mutex_init(&w->lock, NULL);
        pthread_cond_init(&w->cond, NULL);
    }
    start = p->cfg.min_workers == p->cfg.max_workers ? p->cfg.max_workers : p->cfg.min_workers;
    for (int i = 0; i < start; i++) {
        if (start_worker(p, &p->workers[i]) != 0) {
            worker_pool_stop(p);
            return err_set(e, ERR_NOMEM, "cannot start worker %d", i);
        }
    }
    if (p->cfg.max_workers > p->cfg.min_workers) {
        if (pthread_create(&p->controller, NULL, controller_main, p) != 0) {
            worker_pool_stop(p);
            return err_set(e, ERR_NOMEM, "cannot start the autoscaler");
        }
        p->controller_started = 1;
    }
    *out = p;
    return 0;
}

int worker_pool_size(struct worker_pool *p)
{
    return p ? atomic_load(&p->n_active) : 0;
}

int worker_pool_busy(struct worker_pool *p)
{
    return p ? atomic_load(&p->busy) : 0;
}

double worker_pool_drain_rate(struct worker_pool *p)
{
    double r;

    if (!p)
        return 0;
    pthread_mutex_lock(&p->rate_lock);
    r = p->rate;
    pthread_mutex_unlock(&p->rate_lock);
    return r;
}

void worker_pool_stop(struct worker_pool *p)
{
    if (!p)
        return;
    atomic_store(&p->stopping, 1);
    if (p->controller_started)
        pthread_join(p->controller, NULL);
    for (int i = 0; i < p->n_slots; i++)
        if (p->workers[i].state != WORKER_OFF)
            pthread_join(p->workers[i].thread, NULL);
    for (int i = 0; i < p->n_slots; i++) {
        pthread_mutex_destroy(&p->workers[i].lock);
        pthread_cond_destroy(&p->workers[i].cond);
    }
    pthread_mutex_destroy(&p->rate_lock);
    free(p->workers);
    free(p);
}
