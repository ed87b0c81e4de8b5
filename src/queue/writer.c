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
