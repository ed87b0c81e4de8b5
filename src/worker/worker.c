/*
 * worker.c: async workers: lease jobs, run them through the models' batchers, record results.
 *
 * A worker is a thread that owns up to cfg.batch jobs at once (its slots) and refills each
 * slot as soon as its job's outcome is recorded. While jobs run, it wakes when all have
 * answered or every CANCEL_CHECK_MS, extends their leases every third of the lease with each
 * attempt's fencing token (if that fails, another attempt owns the job now and this result
 * will be discarded by queue_complete()), and stops the ones that were cancelled.
 *
 * Stopping never waits on what a worker is blocked in (a stalled S3 read, a model that ignores
 * cancellation): worker_pool_stop() waits out the drain timeout and a short grace, then hands
 * back the jobs of every worker still busy (released, as for jobs cut short) from the list
 * each worker keeps of what it holds, and leaves that worker's thread behind.
 */
#define _GNU_SOURCE
#include "worker/worker.h"
#include "batch/batch_jobs.h"
#include "core/clock.h"
#include "core/id.h"
#include "core/log.h"
#include "metrics/metrics.h"
#include "kserve/codec.h"
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

#define CANCEL_CHECK_MS 100 /* how soon a running job notices DELETE /v1/jobs/{id} */
#define STOP_GRACE_MS 2000  /* after the drain timeout, for stopped jobs to be handed back */

/* A job a worker holds the lease of, as the pool would hand it back. */
struct held {
    char id[40]; /* "" when the entry is free */
    uint64_t token;
};

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
    /* the worker thread's own */
    struct slot *slots;                 /* cfg.batch of them */
    size_t n_used;                      /* slots holding a job */
    struct slot **scratch_slots;        /* cfg.batch: record_done's */
    struct queue_outcome *scratch_outs; /* cfg.batch: record_done's */
    /* record_done's: outcomes the store refused wait until record_retry_ms */
    int64_t record_retry_ms, record_backoff_ms; /* backoff 0: the store takes them */
    int64_t record_failing_since_ms;
    /* leases the store refused in a row (it is away), and when that was last logged */
    int64_t lease_failures, lease_logged_ms;
    /* what the pool hands back if the worker is still blocked when the drain ends: one entry
     * per slot (the slot's job), and the last one for the batch task */
    struct held *held; /* cfg.batch + 1, guarded by lock */
    int given_up;      /* guarded by lock: the pool stopped waiting; record nothing more */
    /* the batch task, on its own thread */
    struct job *task_job;
    pthread_t task_thread;
    int task_started; /* the worker thread's: task_thread is to be joined */
    int task_running; /* guarded by lock */
};

struct worker_pool {
    struct worker_pool_config cfg;
    struct queue *q;
    struct registry *reg;
    struct worker *workers;
    int n_slots;          /* workers allocated: max_workers */
    _Atomic int n_active; /* running and not retiring */
    _Atomic int stopping;
    int64_t stop_ms; /* when stopping was set; written before it */
    pthread_t controller;
    int controller_started;
    int64_t idle_since_ms; /* controller's: when the queue was last seen empty and idle */
    _Atomic int busy;
    pthread_mutex_t rate_lock;
    int64_t rate_window_start_ms; /* guarded by rate_lock */
    int64_t rate_count;           /* guarded by rate_lock */
    double rate;                  /* guarded by rate_lock: jobs/s of the last full window */
    /* the heartbeat: this process as a worker of the queue */
    struct queue_worker self; /* immutable after start, but jobs_running: heartbeat thread's */
    pthread_t heartbeat;
    int heartbeat_started;
    pthread_mutex_t beat_lock;
    pthread_cond_t beat_cond;
    int beat_stop;         /* guarded by beat_lock */
    int64_t beat_failures; /* heartbeat thread's: beats the store refused in a row */
};

/* ---- reading inputs and writing outputs ---- */

/* The job's input and output go through storage, so they are atomic and name the location; an
 * input is read whole, so it is bounded (a device or a growing file stops at the limit). */
static int read_location(const struct worker_pool *p, const char *uri, struct buf *out,
                         struct err *e)
{
    int rc = storage_get(uri, p->cfg.max_input_bytes, out, e);

    if (rc != 0) {
        char msg[sizeof(e->msg)];
        snprintf(msg, sizeof(msg), "%s", e->msg);
        err_set(e, rc, "input_location: %s%s", msg,
                rc == ERR_TOO_LARGE ? " (--max-input-bytes)" : "");
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

/* ---- running jobs ---- */

/* One leased job on its way through the model. A worker has cfg.batch of them. */
struct slot {
    struct worker *w;
    struct job *job; /* NULL: the slot is free */
    struct model *model;
    struct infer_request *req;
    struct batch_item item;
    struct buf body; /* the input, when read from input_location */
    struct buf out;  /* the encoded result */
    int64_t out_json_len;
    int64_t started_ms;
    int rc;
    int retryable;
    int64_t retry_after_ms;
    struct err err;
    int fresh; /* placed by start_jobs(), its input not read yet */
    int submitted;
    int done;      /* guarded by w->lock: the model answered, or the job never reached it */
    int abandoned; /* stopped at shutdown: released, so it runs again at once elsewhere */
    int kept;      /* record_done's: its outcome is built, and the store refused it so far */
};

static void item_done(struct batch_item *item, int rc, const struct err *e)
{
    struct slot *sl = item->ctx;
    struct worker *w = sl->w;

    pthread_mutex_lock(&w->lock);
    sl->rc = rc;
    if (e)
        sl->err = *e;
    /* a backend failure may be transient (max_attempts bounds it), unless the backend says
     * trying again cannot help, or it refused the input itself */
    sl->retryable = rc != 0 && sl->req->abi.retryable && rc != ERR_INVALID && rc != ERR_SHAPE &&
                    rc != ERR_TOO_LARGE;
    sl->retry_after_ms = rc != 0 ? sl->req->abi.retry_after_ms : 0;
    sl->done = 1;
    w->pending--;
    /* all answered: record them now, in one commit; otherwise the next tick collects them */
    if (w->pending == 0)
        pthread_cond_signal(&w->cond);
    pthread_mutex_unlock(&w->lock);
}

static void count_completions(struct worker_pool *p, size_t n)
{
    int64_t now = clock_now_ms();

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
        rc = read_location(p, job->input_location, &sl->body, e);
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
    rc = codec_decode_for_model(
        &sl->model->info, input->data ? input->data : "", input->len, json_len,
        job->input_location ? CODEC_FROM_STORE : CODEC_FROM_CLIENT, &sl->req, e);
    if (rc == 0)
        rc = tensor_check_inputs(sl->req, &sl->model->info, e);
    if (rc != 0) {
        char msg[sizeof(e->msg)];
        snprintf(msg, sizeof(msg), "%s", e->msg);
        err_set(e, rc, "model '%s': %s", job->model, msg);
    }
    return rc;
}

static void submit_slot(struct worker *w, struct slot *sl)
{
    int rc;

    sl->item = (struct batch_item){.req = sl->req, .client_fd = -1, .done = item_done, .ctx = sl};
    metrics_job_wait(sl->model->metrics, (double)(clock_now_ms() - sl->job->created_ms) / 1e3);
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
        sl->rc = rc;
        sl->retryable = 1;
        sl->done = 1;
        pthread_mutex_unlock(&w->lock);
    }
}

/* Encodes a finished slot's result (or writes it to its output_location). */
static void encode_slot(struct slot *sl)
{
    if (sl->rc != 0)
        return;
    if (codec_encode_result(sl->req, sl->model->name, sl->model->version_str, &sl->out,
                            &sl->out_json_len) != 0) {
        sl->rc = err_set(&sl->err, ERR_NOMEM, "out of memory encoding the result");
        sl->retryable = 1;
        return;
    }
    if (sl->job->output_location) {
        sl->rc = write_location(sl->job->output_location, sl->out.data, sl->out.len, &sl->err);
        sl->retryable = sl->rc != ERR_INVALID; /* not a regular file, or outside the roots */
        if (sl->rc == 0)
            buf_release(&sl->out); /* stored there, not inline */
    }
}

/* Notes (under the lock) that the worker holds `job`'s lease in entry `k`, or no longer (NULL). */
static void set_held(struct worker *w, size_t k, const struct job *job)
{
    if (job) {
        snprintf(w->held[k].id, sizeof(w->held[k].id), "%s", job->id);
        w->held[k].token = job->token;
    } else {
        w->held[k].id[0] = '\0';
    }
}

/* Forgets the held jobs whose slots record_done() freed. */
static void forget_freed(struct worker *w)
{
    pthread_mutex_lock(&w->lock);
    for (size_t i = 0; i < (size_t)w->pool->cfg.batch; i++)
        if (!w->slots[i].job && w->held[i].id[0])
            set_held(w, i, NULL);
    pthread_mutex_unlock(&w->lock);
}

/* 1 once worker_pool_stop() gave up waiting for this worker: its jobs were handed back. */
static int given_up(struct worker *w)
{
    int gone;

    pthread_mutex_lock(&w->lock);
    gone = w->given_up;
    pthread_mutex_unlock(&w->lock);
    return gone;
}

/*
 * Puts freshly leased inference jobs into free slots and hands them to their models. Every job
 * is placed (and noted as held) before the first input is read, since a read may block: what
 * this worker holds must be known to worker_pool_stop() whatever it is blocked in.
 */
static void start_jobs(struct worker *w, struct job **jobs, size_t n)
{
    struct worker_pool *p = w->pool;
    size_t k = 0;

    pthread_mutex_lock(&w->lock);
    for (size_t i = 0; i < n; i++) {
        while (w->slots[k].job)
            k++;
        w->slots[k].job = jobs[i];
        w->slots[k].started_ms = clock_now_ms();
        w->slots[k].fresh = 1;
        set_held(w, k, jobs[i]);
        w->n_used++;
    }
    pthread_mutex_unlock(&w->lock);
    for (size_t i = 0; n > 0 && i < (size_t)p->cfg.batch; i++) {
        struct slot *sl = &w->slots[i];
        int rc;
        if (!sl->fresh || given_up(w))
            continue;
        sl->fresh = 0;
        n--;
        rc = prepare_slot(p, sl);
        if (rc == 0 && queue_cancel_noted(p->q, sl->job->id)) /* while its input was read */
            rc = err_set(&sl->err, ERR_CANCELLED, "cancelled before it reached the model");
        if (rc == 0) {
            submit_slot(w, sl);
            continue;
        }
        sl->rc = rc;
        pthread_mutex_lock(&w->lock);
        sl->done = 1;
        pthread_mutex_unlock(&w->lock);
    }
}

#define RECORD_RETRY_MIN_MS 100  /* first wait after the store refused outcomes */
#define RECORD_RETRY_MAX_MS 1000 /* the longest: how soon outcomes go in once it takes them */

/* Builds a finished slot's outcome. The first time only, it encodes (or writes) the result
 * and counts the run: an outcome the store refused is sent again as it was. */
static void slot_outcome(struct slot *sl, struct queue_outcome *out)
{
    if (sl->abandoned && !sl->kept) { /* (a result already made is kept) */
        *out = (struct queue_outcome){
            .id = sl->job->id,
            .token = sl->job->token,
            .error = "stopped by a worker's shutdown; it runs again",
            .released = 1,
        };
        return;
    }
    if (!sl->kept) {
        if (sl->submitted)
            metrics_job_run(sl->model->metrics, (double)(clock_now_ms() - sl->started_ms) / 1e3);
        encode_slot(sl);
    }
    *out = (struct queue_outcome){
        .id = sl->job->id,
        .token = sl->job->token,
        .ok = sl->rc == 0,
        .result = sl->rc == 0 ? sl->out.data : NULL,
        .result_len = sl->rc == 0 ? sl->out.len : 0,
        .result_json_len = sl->out_json_len,
        .error = sl->rc == 0 ? NULL : sl->err.msg,
        .retryable = sl->retryable,
        .retry_after_ms = sl->retry_after_ms,
    };
}

/*
 * Outcomes the store did not take (a full disk, Redis away) stay in their slots and go in
 * again, with the same fencing token, after a backoff of up to RECORD_RETRY_MAX_MS: recorded
 * as soon as the store takes them, instead of each job waiting out its lease to run again (a
 * lease that ran out meanwhile fences the old outcome out, and the job's next attempt
 * stands). While stopping, ones refused for longer than the drain timeout are given up to
 * their lease, as before. Returns 1 if `sl` is to be kept.
 */
static int keep_unrecorded(struct worker *w, struct slot *sl, int rc, int64_t now)
{
    const struct worker_pool_config *c = &w->pool->cfg;

    if (rc == 0 || rc == ERR_CONFLICT)
        return 0;
    if (atomic_load(&w->pool->stopping) && c->drain_timeout_ms > 0 &&
        now - w->record_failing_since_ms >= c->drain_timeout_ms) {
        log_warn("worker", "outcome not recorded at shutdown; the job runs again after its lease",
                 "job=%s attempt=%llu", sl->job->id, (unsigned long long)sl->job->token);
        return 0;
    }
    sl->kept = 1;
    return 1;
}

/* A recorded outcome: counted per model, and a job that failed for good logged (one line). */
static void note_outcome(struct slot *sl, const struct queue_outcome *o)
{
    struct metrics_model *m = sl->model ? sl->model->metrics : metrics_model_get(sl->job->model);

    if (o->ok) {
        metrics_job_outcome(m, METRICS_JOB_SUCCEEDED);
        return;
    }
    metrics_job_outcome(m, o->failed_final ? METRICS_JOB_FAILED : METRICS_JOB_RETRIED);
    if (o->failed_final)
        log_warn("worker", "job failed", "job=%s model=%s attempts=%d error=\"%s\"", sl->job->id,
                 sl->job->model, sl->job->attempts, o->error ? o->error : "");
}

/* Records the outcomes of every answered slot in one commit and frees those slots. */
static void record_done(struct worker *w)
{
    struct worker_pool *p = w->pool;
    size_t cap = (size_t)p->cfg.batch, n = 0, n_freed = 0, n_kept = 0;
    struct slot **done = w->scratch_slots;
    struct queue_outcome *outs = w->scratch_outs;
    int64_t now = clock_now_ms();
    struct err e;

    if (w->record_retry_ms > now) {
        /* the store refused outcomes: wait a little here (unless a job answers), not spin */
        int64_t wait_ms = w->record_retry_ms - now;
        struct timespec ts =
            clock_realtime_after_ms(wait_ms < CANCEL_CHECK_MS ? wait_ms : CANCEL_CHECK_MS);
        pthread_mutex_lock(&w->lock);
        if (w->pending == 0)
            pthread_cond_timedwait(&w->cond, &w->lock, &ts);
        pthread_mutex_unlock(&w->lock);
        return;
    }
    pthread_mutex_lock(&w->lock);
    for (size_t i = 0; i < cap; i++)
        if (w->slots[i].job && w->slots[i].done)
            done[n++] = &w->slots[i];
    pthread_mutex_unlock(&w->lock);
    if (n == 0)
        return;
    size_t n_ran = 0; /* outcomes of the jobs themselves; the rest were released */
    for (size_t i = 0; i < n; i++) {
        slot_outcome(done[i], &outs[i]);
        outs[i].rc = ERR_IO; /* not recorded, unless the store says otherwise */
    }
    if (queue_finish_many(p->q, outs, n, &e) != 0 && w->record_backoff_ms == 0) {
        w->record_failing_since_ms = now;
        log_error("worker", "could not record jobs' outcomes; kept until the store takes them",
                  "jobs=%zu reason=\"%s\"", n, e.msg);
    }
    for (size_t i = 0; i < n; i++) {
        struct slot *sl = done[i];
        int rc = outs[i].rc;
        if (keep_unrecorded(w, sl, rc, now)) {
            n_kept++;
            continue;
        }
        if (!outs[i].released && rc == ERR_CONFLICT)
            log_warn("worker", "attempt fenced out; its outcome is discarded",
                     "job=%s attempt=%llu", sl->job->id, (unsigned long long)sl->job->token);
        if (outs[i].released)
            log_warn("worker", "stopped by shutdown; queued again", "job=%s released=%s",
                     sl->job->id, rc == 0 ? "yes" : "no (after its lease)");
        else
            n_ran++;
        if (rc == 0 && !outs[i].released)
            note_outcome(sl, &outs[i]);
        infer_request_destroy(sl->req);
        model_release(sl->model);
        buf_release(&sl->body);
        buf_release(&sl->out);
        job_free(sl->job);
        *sl = (struct slot){.w = w};
        n_freed++;
    }
    if (n_kept > 0) {
        w->record_backoff_ms = w->record_backoff_ms == 0 ? RECORD_RETRY_MIN_MS
                               : w->record_backoff_ms * 2 < RECORD_RETRY_MAX_MS
                                   ? w->record_backoff_ms * 2
                                   : RECORD_RETRY_MAX_MS;
        w->record_retry_ms = now + w->record_backoff_ms;
    } else if (w->record_backoff_ms != 0) {
        log_info("worker", "jobs' outcomes recorded after the store came back", "after_ms=%lld",
                 (long long)(now - w->record_failing_since_ms));
        w->record_backoff_ms = 0;
        w->record_retry_ms = 0;
    }
    w->n_used -= n_freed;
    atomic_fetch_sub(&p->busy, (int)n_freed);
    count_completions(p, n_ran);
}

/* Asks the model to stop the running jobs that were cancelled since `*gen`. */
static void stop_cancelled(struct worker *w, uint64_t *gen)
{
    struct worker_pool *p = w->pool;
    uint64_t now_gen = queue_cancel_generation(p->q);

    if (now_gen == *gen)
        return;
    *gen = now_gen;
    for (int i = 0; i < p->cfg.batch; i++) {
        struct slot *sl = &w->slots[i];
        if (sl->job && sl->submitted && queue_cancel_noted(p->q, sl->job->id))
            batch_item_cancel(&sl->item);
    }
}

/* Keeps the leases of the jobs still running, every third of their lease. */
static void extend_leases(struct worker *w, int64_t *last_ms)
{
    struct worker_pool *p = w->pool;
    int64_t every = INT64_MAX, now = clock_now_ms();

    for (int i = 0; i < p->cfg.batch; i++)
        if (w->slots[i].job && w->slots[i].job->lease_timeout_ms / 3 < every)
            every = w->slots[i].job->lease_timeout_ms / 3;
    if (every < 100)
        every = 100;
    if (now - *last_ms < every)
        return;
    *last_ms = now;
    for (int i = 0; i < p->cfg.batch; i++) {
        struct slot *sl = &w->slots[i];
        struct err xe;
        int done;
        if (!sl->job || !sl->submitted)
            continue;
        pthread_mutex_lock(&w->lock);
        done = sl->done;
        pthread_mutex_unlock(&w->lock);
        if (!done && queue_extend(p->q, sl->job->id, sl->job->token, sl->job->lease_timeout_ms,
                                  &xe) != 0)
            log_warn("worker", "could not extend a lease", "job=%s reason=\"%s\"", sl->job->id,
                     xe.msg);
    }
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
        /* cut short by the worker's shutdown: queued again at once, the attempt not counted */
        .released = rc != 0 && atomic_load(&p->stopping),
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
    count_completions(p, out.released ? 0 : 1);
}

/* The worker's task thread: one batch task, beside the worker's inference jobs. */
static void *task_main(void *arg)
{
    struct worker *w = arg;

    run_task(w, w->task_job);
    job_free(w->task_job);
    w->task_job = NULL;
    atomic_fetch_sub(&w->pool->busy, 1);
    pthread_mutex_lock(&w->lock);
    set_held(w, (size_t)w->pool->cfg.batch, NULL);
    w->task_running = 0;
    pthread_cond_signal(&w->cond);
    pthread_mutex_unlock(&w->lock);
    return NULL;
}

static void start_task(struct worker *w, struct job *job)
{
    w->task_job = job;
    pthread_mutex_lock(&w->lock);
    set_held(w, (size_t)w->pool->cfg.batch, job);
    w->task_running = 1;
    pthread_mutex_unlock(&w->lock);
    if (pthread_create(&w->task_thread, NULL, task_main, w) == 0) {
        w->task_started = 1;
        return;
    }
    task_main(w); /* no thread to be had: run it here */
}

/* Joins the task thread once its task is over. */
static void reap_task(struct worker *w)
{
    int running;

    if (!w->task_started)
        return;
    pthread_mutex_lock(&w->lock);
    running = w->task_running;
    pthread_mutex_unlock(&w->lock);
    if (!running) {
        pthread_join(w->task_thread, NULL);
        w->task_started = 0;
    }
}

/* A lease the store refused (it is away, or its disk is full): logged when the failures
 * start and once a minute while they last, not every 200 ms per worker. */
static void lease_failed(struct worker *w, const struct err *e)
{
    int64_t now = clock_now_ms();

    if (w->lease_failures++ == 0 || now - w->lease_logged_ms >= 60000) {
        log_error("worker", "lease failed; retrying every 200 ms",
                  "worker=%s failed_leases=%lld reason=\"%s\"", w->name,
                  (long long)w->lease_failures, e->msg);
        w->lease_logged_ms = now;
    }
}

/*
 * The worker's loop. Jobs run side by side, up to cfg.batch of them: a job's slot is refilled
 * as soon as its outcome is recorded, so one job of ten minutes does not hold back the others.
 * The loop waits in the lease call while nothing runs, and otherwise wakes when every running
 * job has answered or every CANCEL_CHECK_MS, to record what finished, keep leases, notice
 * cancellations and lease more. A batch task runs on its own thread, one at a time.
 */
static void *worker_main(void *arg)
{
    struct worker *w = arg;
    struct worker_pool *p = w->pool;
    size_t cap = (size_t)p->cfg.batch;
    struct job **jobs = calloc(cap, sizeof(*jobs));
    int64_t last_extend = clock_now_ms(), stop_seen_ms = 0;
    uint64_t gen = 0;

    while (jobs && !given_up(w)) {
        int leaving = atomic_load(&p->stopping) || atomic_load(&w->retire);
        reap_task(w);
        if (leaving && w->n_used == 0 && !w->task_started)
            break;
        if (!leaving && w->n_used < cap) {
            int idle = w->n_used == 0 && !w->task_started;
            size_t n = 0;
            struct err e;
            if (queue_lease_many(p->q, w->name, cap - w->n_used, w->task_started ? 0 : 1,
                                 idle ? p->cfg.lease_poll_ms : 0, jobs, &n, &e) != 0) {
                lease_failed(w, &e);
                struct timespec ts = {0, 200 * 1000000};
                nanosleep(&ts, NULL);
            } else if (w->lease_failures > 0) {
                log_info("worker", "leasing works again", "worker=%s failed_leases=%lld",
                         w->name, (long long)w->lease_failures);
                w->lease_failures = 0;
            }
            atomic_fetch_add(&p->busy, (int)n);
            size_t n_infer = 0;
            for (size_t i = 0; i < n; i++) {
                if (jobs[i]->kind == JOB_KIND_INFER)
                    jobs[n_infer++] = jobs[i];
                else
                    start_task(w, jobs[i]); /* at most one, and only when none runs */
            }
            start_jobs(w, jobs, n_infer);
        }
        if (w->n_used == 0 && !w->task_started)
            continue;
        pthread_mutex_lock(&w->lock);
        if (w->pending > 0 || (w->task_started && w->task_running && w->n_used == 0)) {
            struct timespec ts = clock_realtime_after_ms(CANCEL_CHECK_MS);
            pthread_cond_timedwait(&w->cond, &w->lock, &ts);
        }
        pthread_mutex_unlock(&w->lock);
        stop_cancelled(w, &gen);
        if (leaving && !stop_seen_ms) /* the pool's drain started when it was told to */
            stop_seen_ms = atomic_load(&p->stopping) ? p->stop_ms : clock_now_ms();
        if (leaving && p->cfg.drain_timeout_ms > 0 &&
            clock_now_ms() - stop_seen_ms >= p->cfg.drain_timeout_ms) {
            /* shutting down and out of patience: stop what still runs; not recorded, so each
             * runs again once its lease lapses (at once, on a restarted SQLite queue) */
            for (size_t i = 0; i < cap; i++) {
                struct slot *sl = &w->slots[i];
                if (sl->job && sl->submitted && !sl->abandoned) {
                    sl->abandoned = 1;
                    batch_item_cancel(&sl->item);
                }
            }
        }
        extend_leases(w, &last_extend);
        if (given_up(w))
            break; /* its jobs were handed back: record nothing */
        record_done(w);
        forget_freed(w);
    }
    free(jobs);
    return NULL;
}

/* ---- the heartbeat ---- */

/* One heartbeat; failures are logged when they start and when they end, not every beat. */
static void beat(struct worker_pool *p)
{
    struct err e;

    p->self.jobs_running = atomic_load(&p->busy);
    if (queue_worker_beat(p->q, &p->self, &e) != 0) {
        if (p->beat_failures++ == 0)
            log_warn("worker",
                     "heartbeat failed; other processes may presume this worker dead "
                     "after --worker-timeout-s",
                     "worker=%s reason=\"%s\"", p->self.id, e.msg);
    } else if (p->beat_failures > 0) {
        log_info("worker", "heartbeat works again", "worker=%s failed_beats=%lld", p->self.id,
                 (long long)p->beat_failures);
        p->beat_failures = 0;
    }
}

/* Beats every third of the worker timeout until worker_pool_stop() has handed back every job. */
static void *heartbeat_main(void *arg)
{
    struct worker_pool *p = arg;
    int64_t every = p->self.timeout_ms / 3;

    if (every < 100)
        every = 100;
    pthread_mutex_lock(&p->beat_lock);
    while (!p->beat_stop) {
        struct timespec ts = clock_realtime_after_ms(every);
        pthread_cond_timedwait(&p->beat_cond, &p->beat_lock, &ts);
        if (p->beat_stop)
            break;
        pthread_mutex_unlock(&p->beat_lock);
        beat(p);
        pthread_mutex_lock(&p->beat_lock);
    }
    pthread_mutex_unlock(&p->beat_lock);
    return NULL;
}

/* The pool's identity in the workers list, and its heartbeat's lock (no thread yet). */
static void heartbeat_init(struct worker_pool *p, const char *host)
{
    unsigned char rnd[2] = {0};

    id_random(rnd, sizeof(rnd));
    /* the random part tells a restarted process from the dead one (a container's pid 1) */
    snprintf(p->self.id, sizeof(p->self.id), "%.40s/%d/%02x%02x", host, (int)getpid(), rnd[0],
             rnd[1]);
    snprintf(p->self.host, sizeof(p->self.host), "%s", host);
    p->self.pid = (int)getpid();
    p->self.started_ms = clock_now_ms();
    p->self.timeout_ms = p->cfg.worker_timeout_ms > 0 ? p->cfg.worker_timeout_ms : 30000;
    pthread_mutex_init(&p->beat_lock, NULL);
    pthread_cond_init(&p->beat_cond, NULL);
}

/* Registers the pool (a first beat before any lease, so no job is held by an unknown worker)
 * and starts beating. */
static int heartbeat_start(struct worker_pool *p)
{
    beat(p);
    if (pthread_create(&p->heartbeat, NULL, heartbeat_main, p) != 0) {
        struct err e;
        queue_worker_leave(p->q, p->self.id, &e); /* beat() joined the list */
        return -1;
    }
    p->heartbeat_started = 1;
    return 0;
}

/* After every job was recorded or handed back: stop beating, and leave the list. */
static void heartbeat_stop(struct worker_pool *p)
{
    struct err e;

    if (!p->heartbeat_started)
        return;
    pthread_mutex_lock(&p->beat_lock);
    p->beat_stop = 1;
    pthread_cond_signal(&p->beat_cond);
    pthread_mutex_unlock(&p->beat_lock);
    pthread_join(p->heartbeat, NULL);
    p->heartbeat_started = 0;
    if (queue_worker_leave(p->q, p->self.id, &e) != 0)
        log_warn("worker",
                 "could not leave the workers list; it drops out after "
                 "--worker-timeout-s",
                 "worker=%s reason=\"%s\"", p->self.id, e.msg);
}

const char *worker_pool_id(const struct worker_pool *p)
{
    return p ? p->self.id : "";
}

/* ---- the pool ---- */

static int start_worker(struct worker_pool *p, struct worker *w)
{
    size_t cap = (size_t)p->cfg.batch;

    if (!w->slots) {
        w->slots = calloc(cap, sizeof(*w->slots));
        if (!w->slots)
            return -1;
        for (size_t i = 0; i < cap; i++)
            w->slots[i].w = w;
    }
    if (!w->scratch_slots)
        w->scratch_slots = calloc(cap, sizeof(*w->scratch_slots));
    if (!w->scratch_outs)
        w->scratch_outs = calloc(cap, sizeof(*w->scratch_outs));
    if (!w->held)
        w->held = calloc(cap + 1, sizeof(*w->held));
    if (!w->scratch_slots || !w->scratch_outs || !w->held)
        return -1;
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
    int64_t now = clock_now_ms(), queued = queue_queued(p->q);
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

int worker_pool_create(const struct worker_pool_config *cfg, struct queue *q, struct registry *reg,
                       struct worker_pool **out, struct err *e)
{
    struct worker_pool *p = calloc(1, sizeof(*p));
    char host[64] = "host";

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
    p->rate_window_start_ms = clock_now_ms();
    p->idle_since_ms = clock_now_ms();
    p->n_slots = p->cfg.max_workers > 0 ? p->cfg.max_workers : 1;
    p->workers = calloc((size_t)p->n_slots, sizeof(*p->workers));
    if (!p->workers) {
        pthread_mutex_destroy(&p->rate_lock);
        free(p);
        return err_set(e, ERR_NOMEM, "out of memory");
    }
    gethostname(host, sizeof(host) - 1);
    heartbeat_init(p, host);
    for (int i = 0; i < p->n_slots; i++) {
        struct worker *w = &p->workers[i];
        w->pool = p;
        w->index = i;
        /* "<worker id>/<thread>": the queue records the worker id with each job it leases */
        snprintf(w->name, sizeof(w->name), "%s/%d", p->self.id, i);
        pthread_mutex_init(&w->lock, NULL);
        pthread_cond_init(&w->cond, NULL);
    }
    *out = p;
    return 0;
}

int worker_pool_run(struct worker_pool *p, struct err *e)
{
    int start = p->cfg.min_workers == p->cfg.max_workers ? p->cfg.max_workers : p->cfg.min_workers;

    if (heartbeat_start(p) != 0)
        return err_set(e, ERR_NOMEM, "cannot start the workers' heartbeat");
    for (int i = 0; i < start; i++)
        if (start_worker(p, &p->workers[i]) != 0)
            return err_set(e, ERR_NOMEM, "cannot start worker %d", i);
    if (p->cfg.max_workers > p->cfg.min_workers) {
        if (pthread_create(&p->controller, NULL, controller_main, p) != 0)
            return err_set(e, ERR_NOMEM, "cannot start the autoscaler");
        p->controller_started = 1;
    }
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

void worker_pool_drain(struct worker_pool *p)
{
    if (!p || atomic_load(&p->stopping))
        return;
    p->stop_ms = clock_now_ms();
    atomic_store(&p->stopping, 1);
}

/* Hands back the jobs of a worker the pool stops waiting for: released, so they are queued
 * again at once (the attempt not counted) rather than after their leases. From then on the
 * worker records nothing (given_up); an outcome it had in flight is fenced out anyway. */
static void hand_back(struct worker_pool *p, struct worker *w)
{
    size_t cap = (size_t)p->cfg.batch + 1, n = 0;
    struct held *jobs = calloc(cap, sizeof(*jobs));
    struct queue_outcome *outs = calloc(cap, sizeof(*outs));
    struct err e;

    pthread_mutex_lock(&w->lock);
    w->given_up = 1;
    for (size_t i = 0; jobs && outs && i < cap; i++)
        if (w->held[i].id[0])
            jobs[n++] = w->held[i];
    pthread_mutex_unlock(&w->lock);
    if (!jobs || !outs)
        log_error("worker", "out of memory: a blocked worker's jobs wait out their leases",
                  "worker=%s", w->name);
    for (size_t i = 0; i < n; i++)
        outs[i] = (struct queue_outcome){
            .id = jobs[i].id,
            .token = jobs[i].token,
            .error = "stopped by a worker's shutdown while it was blocked; it runs again",
            .released = 1,
        };
    if (n > 0 && queue_finish_many(p->q, outs, n, &e) != 0) {
        log_error("worker", "could not hand back a blocked worker's jobs",
                  "worker=%s jobs=%zu reason=\"%s\"", w->name, n, e.msg);
        n = 0;
    }
    for (size_t i = 0; i < n; i++)
        log_warn("worker", "still blocked when the drain ended; its job is queued again",
                 "job=%s worker=%s released=%s", jobs[i].id, w->name,
                 outs[i].rc == 0 ? "yes" : "no (it had ended)");
    free(jobs);
    free(outs);
}

int worker_pool_stop(struct worker_pool *p)
{
    struct timespec until = {0};
    int left = 0;

    if (!p)
        return 0;
    worker_pool_drain(p);
    if (p->controller_started)
        pthread_join(p->controller, NULL);
    if (p->cfg.drain_timeout_ms > 0) {
        int64_t left_ms = p->stop_ms + p->cfg.drain_timeout_ms + STOP_GRACE_MS - clock_now_ms();
        until = clock_realtime_after_ms(left_ms > 0 ? left_ms : 0);
    }
    for (int i = 0; i < p->n_slots; i++) {
        struct worker *w = &p->workers[i];
        if (w->state == WORKER_OFF)
            continue;
        if (p->cfg.drain_timeout_ms <= 0) {
            pthread_join(w->thread, NULL); /* told to wait however long */
            continue;
        }
        if (pthread_timedjoin_np(w->thread, NULL, &until) == 0)
            continue;
        hand_back(p, w);
        pthread_detach(w->thread);
        left++;
    }
    heartbeat_stop(p); /* every job was recorded or handed back */
    if (left > 0) {
        /* the blocked threads still use the pool (and the queue and models): all stay */
        log_warn("worker", "stopped with workers still blocked; their jobs were handed back",
                 "blocked=%d", left);
        return left;
    }
    for (int i = 0; i < p->n_slots; i++) {
        pthread_mutex_destroy(&p->workers[i].lock);
        pthread_cond_destroy(&p->workers[i].cond);
        free(p->workers[i].slots);
        free(p->workers[i].scratch_slots);
        free(p->workers[i].scratch_outs);
        free(p->workers[i].held);
    }
    pthread_mutex_destroy(&p->rate_lock);
    pthread_mutex_destroy(&p->beat_lock);
    pthread_cond_destroy(&p->beat_cond);
    free(p->workers);
    free(p);
    return 0;
}
