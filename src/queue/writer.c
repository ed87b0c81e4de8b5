/*
 * writer.c: group commit's queue, shared by the SQLite and PostgreSQL stores (writer.h).
 *
 * Callers queue an operation and wait on `finished` until it is `done`; the store's writer
 * thread takes up to max_group of them, runs them in one transaction, and hands them back
 * under the lock, so a caller never sees half a group. An asynchronous enqueue is called back
 * by the writer thread after the lock is released, and freed. How a group runs (savepoints,
 * retries, sweeps, NOTIFY, reconnects) is the store's own.
 */
#include "queue/writer.h"
#include "core/clock.h"

#include <stdio.h>
#include <stdlib.h>

/* ---- the queue of operations ---- */

void queue_writer_init(struct queue_writer *w, size_t max_group, int64_t idle_poll_ms)
{
    *w = (struct queue_writer){.max_group = max_group, .idle_poll_ms = idle_poll_ms};
    pthread_mutex_init(&w->lock, NULL);
    pthread_cond_init(&w->work, NULL);
    pthread_cond_init(&w->finished, NULL);
    pthread_cond_init(&w->runnable, NULL);
}

void queue_writer_release(struct queue_writer *w)
{
    pthread_mutex_destroy(&w->lock);
    pthread_cond_destroy(&w->work);
    pthread_cond_destroy(&w->finished);
    pthread_cond_destroy(&w->runnable);
}

void queue_writer_stop(struct queue_writer *w)
{
    pthread_mutex_lock(&w->lock);
    w->stopping = 1;
    pthread_cond_broadcast(&w->work);
    pthread_cond_broadcast(&w->runnable);
    pthread_mutex_unlock(&w->lock);
}

/* Appends `o` to the queue (lock held). */
static void append(struct queue_writer *w, struct queue_op *o)
{
    o->next = NULL;
    if (w->tail)
        w->tail->next = o;
    else
        w->head = o;
    w->tail = o;
}

void queue_writer_submit_many(struct queue_writer *w, struct queue_op *ops, size_t n)
{
    pthread_mutex_lock(&w->lock);
    if (w->stopping) {
        pthread_mutex_unlock(&w->lock);
        for (size_t i = 0; i < n; i++)
            ops[i].rc = err_set(&ops[i].err, ERR_UNAVAILABLE, "the job store is closing");
        return;
    }
    for (size_t i = 0; i < n; i++)
        append(w, &ops[i]);
    pthread_cond_signal(&w->work);
    for (size_t i = 0; i < n; i++)
        while (!ops[i].done)
            pthread_cond_wait(&w->finished, &w->lock);
    pthread_mutex_unlock(&w->lock);
}

int queue_writer_submit(struct queue_writer *w, struct queue_op *o)
{
    queue_writer_submit_many(w, o, 1);
    return o->rc;
}

int queue_writer_submit_async(struct queue_writer *w, struct queue_op *o, struct err *e)
{
    pthread_mutex_lock(&w->lock);
    if (w->stopping) {
        pthread_mutex_unlock(&w->lock);
        free(o);
        return err_set(e, ERR_UNAVAILABLE, "the job store is closing");
    }
    append(w, o);
    pthread_cond_signal(&w->work);
    pthread_mutex_unlock(&w->lock);
    return 0;
}

void queue_writer_runnable(struct queue_writer *w)
{
    pthread_mutex_lock(&w->lock);
    w->generation++;
    pthread_cond_broadcast(&w->runnable);
    pthread_mutex_unlock(&w->lock);
}

/* ---- the writer thread's side ---- */

int queue_writer_take(struct queue_writer *w, int64_t idle_ms, struct queue_op **group)
{
    struct queue_op *last = NULL;
    size_t n = 0;
    int running;

    *group = NULL;
    pthread_mutex_lock(&w->lock);
    if (idle_ms < 0) {
        while (!w->head && !w->stopping)
            pthread_cond_wait(&w->work, &w->lock);
    } else if (!w->head && !w->stopping) {
        struct timespec ts = clock_realtime_after_ms(idle_ms);
        pthread_cond_timedwait(&w->work, &w->lock, &ts);
    }
    running = w->head || !w->stopping;
    for (struct queue_op *o = w->head; o && n < w->max_group; o = o->next, n++)
        last = o;
    if (last) {
        *group = w->head;
        w->head = last->next;
        if (!w->head)
            w->tail = NULL;
        last->next = NULL;
    }
    pthread_mutex_unlock(&w->lock);
    return running;
}

void queue_writer_done(struct queue_writer *w, struct queue_op *group, int runnable)
{
    struct queue_op *async_ops = NULL, **async_tail = &async_ops;

    pthread_mutex_lock(&w->lock);
    if (runnable) {
        w->generation++;
        pthread_cond_broadcast(&w->runnable);
    }
    for (struct queue_op *o = group, *o_next; o; o = o_next) {
        o_next = o->next;
        if (o->callback) {
            *async_tail = o;
            async_tail = &o->next;
            o->next = NULL;
        } else {
            o->done = 1; /* its caller may free it as soon as the lock is released */
        }
    }
    pthread_cond_broadcast(&w->finished);
    pthread_mutex_unlock(&w->lock);
    for (struct queue_op *o = async_ops, *o_next; o; o = o_next) {
        o_next = o->next;
        o->callback(o->callback_ctx, o->rc, &o->err, o->id_out, o->existed);
        free(o);
    }
}

/* ---- the ops-table entries: build an operation, submit it, hand back what it made ---- */

static void copy_err(struct err *dst, const struct queue_op *o)
{
    if (dst && o->rc != 0)
        *dst = o->err;
}

int queue_writer_enqueue(struct queue *q, const struct job_spec *spec, char id_out[40],
                         int *existed, struct err *e)
{
    struct queue_op o = {.kind = QUEUE_OP_ENQUEUE, .spec = spec};
    int rc = queue_writer_submit(q->writer, &o);

    copy_err(e, &o);
    snprintf(id_out, 40, "%s", o.id_out);
    *existed = o.existed;
    return rc;
}

int queue_writer_enqueue_async(struct queue *q, const struct job_spec *spec, queue_enqueue_fn fn,
                               void *ctx, struct err *e)
{
    struct queue_op *o = calloc(1, sizeof(*o));

    if (!o)
        return err_set(e, ERR_NOMEM, "out of memory");
    o->kind = QUEUE_OP_ENQUEUE;
    o->spec = spec;
    o->callback = fn;
    o->callback_ctx = ctx;
    return queue_writer_submit_async(q->writer, o, e);
}

int queue_writer_lease_many(struct queue *q, const char *worker, size_t max, int max_tasks,
                            int64_t wait_ms, struct job **out, size_t *n, struct err *e)
{
    struct queue_writer *w = q->writer;
    int64_t until = clock_now_ms() + wait_ms;

    *n = 0;
    for (;;) {
        struct queue_op o = {.kind = QUEUE_OP_LEASE,
                             .worker = worker,
                             .max = max,
                             .max_tasks = max_tasks,
                             .jobs = out};
        uint64_t gen;
        int rc;
        pthread_mutex_lock(&w->lock);
        gen = w->generation;
        pthread_mutex_unlock(&w->lock);
        rc = queue_writer_submit(w, &o);
        if (rc != 0 || o.n_jobs) {
            if (rc != 0) {
                /* nothing of the group is durable: the leases did not happen */
                for (size_t i = 0; i < o.n_jobs; i++) {
                    job_free(out[i]);
                    out[i] = NULL;
                }
                o.n_jobs = 0;
            }
            copy_err(e, &o);
            *n = o.n_jobs;
            return rc;
        }
        int64_t now = clock_now_ms();
        if (now >= until)
            return 0;
        /* nothing runnable: wait until jobs may have become runnable (enqueued or requeued
         * here, or, told by the store, elsewhere), a delayed job's time comes, or a look now
         * and then (a sweep or a backoff that ended) */
        int64_t nap = until - now < w->idle_poll_ms ? until - now : w->idle_poll_ms;
        if (o.next_available_ms > now && o.next_available_ms - now < nap)
            nap = o.next_available_ms - now;
        struct timespec ts = clock_realtime_after_ms(nap);
        pthread_mutex_lock(&w->lock);
        while (w->generation == gen && !w->stopping &&
               pthread_cond_timedwait(&w->runnable, &w->lock, &ts) == 0)
            ;
        int stopping = w->stopping;
        pthread_mutex_unlock(&w->lock);
        if (stopping)
            return 0;
    }
}

int queue_writer_finish_many(struct queue *q, struct queue_outcome *outs, size_t n, struct err *e)
{
    struct queue_op *ops = calloc(n ? n : 1, sizeof(*ops));
    int rc = 0;

    if (!ops) {
        for (size_t i = 0; i < n; i++)
            outs[i].rc = ERR_NOMEM; /* none recorded */
        return err_set(e, ERR_NOMEM, "out of memory");
    }
    for (size_t i = 0; i < n; i++) {
        struct queue_outcome *oc = &outs[i];
        ops[i] = (struct queue_op){.kind = oc->ok ? QUEUE_OP_COMPLETE : QUEUE_OP_FAIL,
                                   .id = oc->id,
                                   .token = oc->token,
                                   .data = oc->ok ? oc->result : oc->error,
                                   .data_len = oc->result_len,
                                   .json_len = oc->result_json_len,
                                   .retryable = oc->retryable || oc->released,
                                   .retry_after_ms = oc->retry_after_ms,
                                   .released = oc->released};
    }
    queue_writer_submit_many(q->writer, ops, n);
    for (size_t i = 0; i < n; i++) {
        outs[i].rc = ops[i].rc;
        outs[i].failed_final = ops[i].rc == 0 && ops[i].failed_final;
        if (ops[i].rc != 0 && ops[i].rc != ERR_CONFLICT && rc == 0) {
            rc = ops[i].rc;
            copy_err(e, &ops[i]);
        }
    }
    free(ops);
    return rc;
}

/* Submits `o` and copies its error to `e`. */
static int submit(struct queue *q, struct queue_op *o, struct err *e)
{
    int rc = queue_writer_submit(q->writer, o);

    copy_err(e, o);
    return rc;
}

int queue_writer_extend(struct queue *q, const char *id, uint64_t token, int64_t lease_ms,
                        struct err *e)
{
    struct queue_op o = {.kind = QUEUE_OP_EXTEND, .id = id, .token = token, .lease_ms = lease_ms};

    return submit(q, &o, e);
}

int queue_writer_cancel(struct queue *q, const char *id, struct job **out, struct err *e)
{
    struct queue_op o = {.kind = QUEUE_OP_CANCEL, .id = id};
    int rc = submit(q, &o, e);

    *out = o.job;
    return rc;
}

int queue_writer_retry(struct queue *q, const char *id, struct job **out, struct err *e)
{
    struct queue_op o = {.kind = QUEUE_OP_RETRY, .id = id};
    int rc = submit(q, &o, e);

    *out = o.job;
    return rc;
}

int queue_writer_outbox_record(struct queue *q, const struct queue_outbox_attempt *a, struct err *e)
{
    struct queue_op o = {.kind = QUEUE_OP_OUTBOX_RECORD, .attempt = a};

    return submit(q, &o, e);
}

int queue_writer_worker_beat(struct queue *q, const struct queue_worker *w, struct err *e)
{
    struct queue_op o = {.kind = QUEUE_OP_WORKER_BEAT, .wk = w};

    return submit(q, &o, e);
}

int queue_writer_worker_leave(struct queue *q, const char *id, struct err *e)
{
    struct queue_op o = {.kind = QUEUE_OP_WORKER_LEAVE, .id = id};

    return submit(q, &o, e);
}

int queue_writer_batch_create(struct queue *q, const struct batch_job_spec *spec, char id_out[40],
                              struct err *e)
{
    struct queue_op o = {.kind = QUEUE_OP_BATCH_CREATE, .batch = spec};
    int rc = submit(q, &o, e);

    if (rc == 0)
        snprintf(id_out, 40, "%s", o.id_out);
    return rc;
}

int queue_writer_batch_cancel(struct queue *q, const char *id, struct batch_job **out,
                              struct err *e)
{
    struct queue_op o = {.kind = QUEUE_OP_BATCH_CANCEL, .id = id, .batch_out = out};

    *out = NULL;
    return submit(q, &o, e);
}

int queue_writer_batch_pause(struct queue *q, const char *id, int paused, int64_t next_run_ms,
                             struct batch_job **out, struct err *e)
{
    struct queue_op o = {.kind = QUEUE_OP_BATCH_PAUSE,
                         .id = id,
                         .paused = paused,
                         .next_run_ms = next_run_ms,
                         .batch_out = out};

    *out = NULL;
    return submit(q, &o, e);
}

int queue_writer_batch_progress(struct queue *q, const char *batch_id, const char *task_id,
                                uint64_t token, int64_t records, struct err *e)
{
    struct queue_op o = {.kind = QUEUE_OP_BATCH_PROGRESS,
                         .id = task_id,
                         .batch_id = batch_id,
                         .token = token,
                         .records = records};

    return submit(q, &o, e);
}
