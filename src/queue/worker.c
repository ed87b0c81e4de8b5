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
#include "core/log.h"
#include "metrics/metrics.h"
#include "model/codec.h"
#include "model/registry.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

struct worker {
    struct worker_pool *pool;
    pthread_t thread;
    int index;
    char name[64];
    /* the running batch item's completion */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int done;    /* guarded by lock */
    int done_rc; /* guarded by lock */
    struct err done_err;
};

struct worker_pool {
    struct worker_pool_config cfg;
    struct queue *q;
    struct registry *reg;
    struct worker *workers;
    int n_started;
    _Atomic int stopping;
    _Atomic int busy;
    pthread_mutex_t rate_lock;
    int64_t rate_window_start_ms; /* guarded by rate_lock */
    int64_t rate_count;           /* guarded by rate_lock */
    double rate;                  /* guarded by rate_lock: jobs/s of the last full window */
};

/* ---- reading inputs and writing outputs (file:// and plain paths) ---- */

static const char *file_path(const char *uri)
{
    if (strncmp(uri, "file://", 7) == 0)
        return uri + 7;
    return strstr(uri, "://") ? NULL : uri;
}

static int read_location(const char *uri, struct buf *out, struct err *e)
{
    const char *path = file_path(uri);
    char chunk[65536];
    FILE *f;
    size_t n;

    if (!path)
        return err_set(e, ERR_INVALID, "input_location '%s': only file:// is supported", uri);
    f = fopen(path, "rb");
    if (!f)
        return err_set(e, ERR_NOT_FOUND, "input_location '%s': %s", uri, strerror(errno));
    while ((n = fread(chunk, 1, sizeof(chunk), f)) > 0) {
        if (buf_append(out, chunk, n) != 0) {
            fclose(f);
            return err_set(e, ERR_NOMEM, "out of memory reading '%s'", uri);
        }
    }
    fclose(f);
    return 0;
}

/* Writes to a temporary name, syncs, then renames: no reader ever sees a partial object. */
static int write_location(const char *uri, const char *data, size_t len, struct err *e)
{
    const char *path = file_path(uri);
    char tmp[4200];
    FILE *f;
    int ok;

    if (!path)
        return err_set(e, ERR_INVALID, "output_location '%s': only file:// is supported", uri);
    snprintf(tmp, sizeof(tmp), "%s.tmp-%d", path, (int)getpid());
    f = fopen(tmp, "wb");
    if (!f)
        return err_set(e, ERR_IO, "output_location '%s': %s", uri, strerror(errno));
    ok = fwrite(data, 1, len, f) == len && fflush(f) == 0 && fsync(fileno(f)) == 0;
    ok = fclose(f) == 0 && ok;
    if (!ok || rename(tmp, path) != 0) {
        int saved = errno;
        unlink(tmp);
        return err_set(e, ERR_IO, "output_location '%s': %s", uri, strerror(saved));
    }
    return 0;
}

/* ---- running one job ---- */

static void item_done(struct batch_item *item, int rc, const struct err *e)
{
    struct worker *w = item->ctx;

    pthread_mutex_lock(&w->lock);
    w->done = 1;
    w->done_rc = rc;
    if (e)
        w->done_err = *e;
    pthread_cond_signal(&w->cond);
    pthread_mutex_unlock(&w->lock);
}

static void count_completion(struct worker_pool *p)
{
    int64_t now = queue_now_ms();

    pthread_mutex_lock(&p->rate_lock);
    if (now - p->rate_window_start_ms >= 2000) {
        p->rate = (double)p->rate_count * 1000.0 / (double)(now - p->rate_window_start_ms);
        p->rate_window_start_ms = now;
        p->rate_count = 0;
    }
    p->rate_count++;
    pthread_mutex_unlock(&p->rate_lock);
}

/* Submits and waits, extending the lease meanwhile. Returns the batch's rc. */
static int run_batch(struct worker *w, struct model *m, struct job *job, struct batch_item *item,
                     struct err *e)
{
    struct worker_pool *p = w->pool;
    int64_t extend_every = job->lease_timeout_ms / 3 > 100 ? job->lease_timeout_ms / 3 : 100;
    int rc;

    w->done = 0;
    for (;;) {
        rc = batcher_submit(m->batcher, item, e);
        if (rc != ERR_BUSY)
            break;
        /* the model's queue is full of online traffic: wait a little, it is not the job's fault */
        struct timespec ts = {0, 5 * 1000000};
        nanosleep(&ts, NULL);
        if (atomic_load(&p->stopping) && rc == ERR_BUSY)
            continue;
    }
    if (rc != 0)
        return rc;
    pthread_mutex_lock(&w->lock);
    while (!w->done) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += extend_every / 1000;
        ts.tv_nsec += (extend_every % 1000) * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        if (pthread_cond_timedwait(&w->cond, &w->lock, &ts) == ETIMEDOUT && !w->done) {
            struct err xe;
            pthread_mutex_unlock(&w->lock);
            if (queue_extend(p->q, job->id, job->token, job->lease_timeout_ms, &xe) != 0)
                log_warn("worker", "could not extend a lease", "job=%s reason=\"%s\"", job->id,
                         xe.msg);
            pthread_mutex_lock(&w->lock);
        }
    }
    rc = w->done_rc;
    if (rc != 0)
        *e = w->done_err;
    pthread_mutex_unlock(&w->lock);
    return rc;
}

/* Records the outcome; `retryable` failures go back to the queue until max_attempts. */
static void finish(struct worker *w, struct job *job, int rc, int retryable, const struct err *e,
                   const struct buf *result, int64_t json_len)
{
    struct err qe;
    int qrc;

    if (rc == 0)
        qrc = queue_complete(w->pool->q, job->id, job->token, result ? result->data : NULL,
                             result ? result->len : 0, json_len, &qe);
    else
        qrc = queue_fail(w->pool->q, job->id, job->token, e->msg, retryable, &qe);
    if (qrc == ERR_CONFLICT)
        log_warn("worker", "attempt fenced out; its outcome is discarded", "job=%s attempt=%llu",
                 job->id, (unsigned long long)job->token);
    else if (qrc != 0)
        log_error("worker", "could not record a job's outcome", "job=%s reason=\"%s\"", job->id,
                  qe.msg);
    count_completion(w->pool);
}

static void run_job(struct worker *w, struct job *job)
{
    struct worker_pool *p = w->pool;
    struct infer_request *req = NULL;
    struct model *m = NULL;
    struct buf body = {0}, out = {0};
    struct batch_item item;
    struct err e = {0};
    int64_t json_len = job->input_json_len, out_json_len = -1;
    const struct buf *input = &job->input;
    int rc, retryable = 0;

    if (job->input_location) {
        rc = read_location(job->input_location, &body, &e);
        if (rc != 0) {
            retryable = rc == ERR_IO;
            goto done;
        }
        input = &body;
        json_len = -1;
    }
    rc = registry_acquire(p->reg, job->model, 0, &m, &e);
    if (rc != 0) {
        retryable = 1; /* the model may be reloading */
        goto done;
    }
    rc = codec_decode_v2(input->data ? input->data : "", input->len, json_len, &req, &e);
    if (rc == 0)
        rc = tensor_check_inputs(req, &m->info, &e);
    if (rc != 0) {
        char msg[sizeof(e.msg)];
        snprintf(msg, sizeof(msg), "%s", e.msg);
        err_set(&e, rc, "model '%s': %s", job->model, msg);
        goto done;
    }
    item = (struct batch_item){.req = req, .client_fd = -1, .done = item_done, .ctx = w};
    metrics_job_wait(m->metrics, (double)(queue_now_ms() - job->created_ms) / 1e3);
    int64_t started = queue_now_ms();
    rc = run_batch(w, m, job, &item, &e);
    metrics_job_run(m->metrics, (double)(queue_now_ms() - started) / 1e3);
    if (rc != 0) {
        retryable = 1; /* a backend failure may be transient; max_attempts bounds a poison job */
        goto done;
    }
    rc = codec_encode_v2(req, m->name, m->version_str, &out, &out_json_len);
    if (rc != 0) {
        err_set(&e, ERR_NOMEM, "out of memory encoding the result");
        retryable = 1;
        goto done;
    }
    if (job->output_location) {
        rc = write_location(job->output_location, out.data, out.len, &e);
        retryable = 1;
        if (rc == 0)
            buf_release(&out);
    }
done:
    finish(w, job, rc, retryable, &e, rc == 0 && out.data ? &out : NULL, out_json_len);
    infer_request_destroy(req);
    model_release(m);
    buf_release(&body);
    buf_release(&out);
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    struct worker_pool *p = w->pool;

    while (!atomic_load(&p->stopping)) {
        struct job *job = NULL;
        struct err e;
        if (queue_lease(p->q, w->name, p->cfg.lease_poll_ms, &job, &e) != 0) {
            log_error("worker", "lease failed", "worker=%s reason=\"%s\"", w->name, e.msg);
            struct timespec ts = {0, 200 * 1000000};
            nanosleep(&ts, NULL);
            continue;
        }
        if (!job)
            continue;
        atomic_fetch_add(&p->busy, 1);
        run_job(w, job);
        atomic_fetch_sub(&p->busy, 1);
        job_free(job);
    }
    return NULL;
}

/* ---- the pool ---- */

int worker_pool_start(const struct worker_pool_config *cfg, struct queue *q, struct registry *reg,
                      struct worker_pool **out, struct err *e)
{
    struct worker_pool *p = calloc(1, sizeof(*p));
    char host[64] = "host";

    *out = NULL;
    if (!p)
        return err_set(e, ERR_NOMEM, "out of memory");
    p->cfg = *cfg;
    p->q = q;
    p->reg = reg;
    pthread_mutex_init(&p->rate_lock, NULL);
    p->rate_window_start_ms = queue_now_ms();
    p->workers = calloc((size_t)cfg->workers, sizeof(*p->workers));
    if (!p->workers) {
        free(p);
        return err_set(e, ERR_NOMEM, "out of memory");
    }
    gethostname(host, sizeof(host) - 1);
    for (int i = 0; i < cfg->workers; i++) {
        struct worker *w = &p->workers[i];
        w->pool = p;
        w->index = i;
        snprintf(w->name, sizeof(w->name), "%.40s/%d/%d", host, (int)getpid(), i);
        pthread_mutex_init(&w->lock, NULL);
        pthread_cond_init(&w->cond, NULL);
        if (pthread_create(&w->thread, NULL, worker_main, w) != 0) {
            worker_pool_stop(p);
            return err_set(e, ERR_NOMEM, "cannot start worker %d", i);
        }
        p->n_started++;
    }
    *out = p;
    return 0;
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
    for (int i = 0; i < p->n_started; i++)
        pthread_join(p->workers[i].thread, NULL);
    for (int i = 0; i < p->cfg.workers; i++) {
        pthread_mutex_destroy(&p->workers[i].lock);
        pthread_cond_destroy(&p->workers[i].cond);
    }
    pthread_mutex_destroy(&p->rate_lock);
    free(p->workers);
    free(p);
}
