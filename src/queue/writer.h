/*
 * writer.h: group commit, shared by the stores that run every change on one writer thread
 * (queue/sqlite/, queue/postgres/). Included by src/queue/ only.
 *
 * A caller builds a `struct queue_op`, submits it and waits; the store's writer thread takes
 * the queued operations a group at a time (queue_writer_take), runs the group in one
 * transaction its own way, and hands it back (queue_writer_done), which wakes the callers, or,
 * for an asynchronous enqueue, calls its callback and frees it. The ops-table entries that
 * only build an operation and submit it are here too, written once for both stores; each
 * store keeps what truly differs: how a group runs (sqlite/writer.c, postgres/writer.c).
 *
 * Threads and locks: callers (any thread) submit and wait; the writer thread takes, runs and
 * hands back. `lock` guards the operation list, `stopping`, `generation` and each queued
 * operation's `next` and `done`; a store may guard fields of its own with it too (its comment
 * says so). It is never held across I/O or a callback.
 */
#ifndef INFERD_QUEUE_WRITER_H
#define INFERD_QUEUE_WRITER_H

#include "queue/queue_internal.h"

#include <pthread.h>

enum queue_op_kind {
    QUEUE_OP_ENQUEUE,
    QUEUE_OP_LEASE,
    QUEUE_OP_EXTEND,
    QUEUE_OP_COMPLETE,
    QUEUE_OP_FAIL,
    QUEUE_OP_CANCEL,
    QUEUE_OP_RETRY,
    QUEUE_OP_OUTBOX_RECORD,
    QUEUE_OP_BATCH_CREATE,
    QUEUE_OP_BATCH_CANCEL,
    QUEUE_OP_BATCH_PAUSE,
    QUEUE_OP_BATCH_PROGRESS,
    QUEUE_OP_WORKER_BEAT,
    QUEUE_OP_WORKER_LEAVE,
};

/*
 * One change for the writer. The caller fills the arguments and submits; from then until
 * `done` (or, asynchronous, until its callback) only the writer thread touches the results,
 * and the arguments, borrowed from the caller, stay valid.
 */
struct queue_op {
    enum queue_op_kind kind; /* caller, before submit */
    /* arguments: set by the caller before submit; read by the writer thread */
    const struct job_spec *spec; /* enqueue */
    const char *id;
    const char *worker;
    uint64_t token;
    int64_t lease_ms;
    const char *data;
    size_t data_len;
    int64_t json_len;
    int retryable;
    int64_t retry_after_ms; /* fail: no sooner than this */
    int released;           /* fail: see queue_outcome.released */
    const struct queue_outbox_attempt *attempt;
    const struct batch_job_spec *batch; /* batch create */
    struct batch_job **batch_out;       /* batch cancel and pause: the batch job after it */
    int paused;                         /* batch pause: 1 pause, 0 resume */
    int64_t next_run_ms;                /* batch pause: a resumed schedule's next run */
    const char *batch_id;               /* batch progress: the task's run */
    int64_t records;                    /* batch progress: written so far */
    const struct queue_worker *wk;      /* worker beat */
    size_t max;                         /* lease: jobs wanted */
    int max_tasks;                      /* lease: batch tasks wanted, at most */
    struct job **jobs;                  /* lease: the caller's array of `max` */
    /* results: written by the writer thread; read by the caller once `done` */
    size_t n_jobs; /* lease: how many of `jobs` it filled */
    int rc;
    struct err err;
    char id_out[40];
    int existed;
    int failed_final;          /* fail: it ended the job failed */
    int64_t next_available_ms; /* lease found nothing: when a delayed job becomes runnable; 0
                                  unknown (the store does not say) */
    struct job *job;
    int done;                  /* guarded by the writer's lock: the caller may read and free */
    queue_enqueue_fn callback; /* async enqueue: called after the commit, then the op is freed */
    void *callback_ctx;
    struct queue_op *next; /* guarded by the writer's lock while queued; the writer thread's
                              while in its group */
};

struct queue_writer {
    size_t max_group;     /* immutable after init: operations per group, at most */
    int64_t idle_poll_ms; /* immutable after init: an idle lease looks again this often */
    pthread_mutex_t lock;
    pthread_cond_t work;          /* operations arrived, or stopping */
    pthread_cond_t finished;      /* a group was handed back (committed or failed) */
    pthread_cond_t runnable;      /* jobs may have become runnable */
    struct queue_op *head, *tail; /* guarded by lock: queued, not yet taken */
    int stopping;                 /* guarded by lock: no more submissions */
    uint64_t generation;          /* guarded by lock: bumped when jobs may have become
                                     runnable; an idle lease waits for it to move */
};

/* Sets up `w` (memory the store owns): groups of at most `max_group` operations; an idle
 * lease looks again at least every `idle_poll_ms`. */
void queue_writer_init(struct queue_writer *w, size_t max_group, int64_t idle_poll_ms);
/* Frees what init made; the writer thread has ended and nothing is queued. */
void queue_writer_release(struct queue_writer *w);
/* Refuses new submissions (ERR_UNAVAILABLE) and wakes the writer thread, which ends once the
 * queued operations have run, and every idle lease. */
void queue_writer_stop(struct queue_writer *w);

/* Queues `o` and waits until its group was handed back; returns o->rc. `o` is the caller's. */
int queue_writer_submit(struct queue_writer *w, struct queue_op *o);
/* Queues the `n` operations of `ops` at once, so they share a group, and waits for all. */
void queue_writer_submit_many(struct queue_writer *w, struct queue_op *ops, size_t n);
/* Queues `o`, a calloc()ed operation with a callback, and returns at once; the writer thread
 * calls the callback after the group and frees `o`. 0, or ERR_UNAVAILABLE (stopping: `o` was
 * freed, no callback comes). */
int queue_writer_submit_async(struct queue_writer *w, struct queue_op *o, struct err *e);

/* Jobs may have become runnable: wakes the idle leases. */
void queue_writer_runnable(struct queue_writer *w);

/*
 * The writer thread's next group: waits for work (`idle_ms` < 0: as long as it takes; else at
 * most `idle_ms`, once), then takes up to max_group queued operations into `*group` (NULL
 * when the wait ended with none). Returns 0 when the writer is stopping and nothing is left:
 * the thread ends; 1 otherwise.
 */
int queue_writer_take(struct queue_writer *w, int64_t idle_ms, struct queue_op **group);
/* Hands `group` back after it ran: wakes its waiting callers (with the idle leases, in the
 * same breath, when `runnable`), then calls the asynchronous ones' callbacks and frees them. */
void queue_writer_done(struct queue_writer *w, struct queue_op *group, int runnable);

/* ---- ops-table entries of a store with a writer (its struct queue's `writer`) ---- */

int queue_writer_enqueue(struct queue *q, const struct job_spec *spec, char id_out[40],
                         int *existed, struct err *e);
int queue_writer_enqueue_async(struct queue *q, const struct job_spec *spec, queue_enqueue_fn fn,
                               void *ctx, struct err *e);
/* Leases as the store's lease operation does; finding nothing, waits for the writer's
 * generation to move, for a delayed job's time (o->next_available_ms) or idle_poll_ms. */
int queue_writer_lease_many(struct queue *q, const char *worker, size_t max, int max_tasks,
                            int64_t wait_ms, struct job **out, size_t *n, struct err *e);
int queue_writer_finish_many(struct queue *q, struct queue_outcome *outs, size_t n, struct err *e);
int queue_writer_extend(struct queue *q, const char *id, uint64_t token, int64_t lease_ms,
                        struct err *e);
int queue_writer_cancel(struct queue *q, const char *id, struct job **out, struct err *e);
int queue_writer_retry(struct queue *q, const char *id, struct job **out, struct err *e);
int queue_writer_outbox_record(struct queue *q, const struct queue_outbox_attempt *a,
                               struct err *e);
int queue_writer_worker_beat(struct queue *q, const struct queue_worker *w, struct err *e);
int queue_writer_worker_leave(struct queue *q, const char *id, struct err *e);
int queue_writer_batch_create(struct queue *q, const struct batch_job_spec *spec, char id_out[40],
                              struct err *e);
int queue_writer_batch_cancel(struct queue *q, const char *id, struct batch_job **out,
                              struct err *e);
int queue_writer_batch_pause(struct queue *q, const char *id, int paused, int64_t next_run_ms,
                             struct batch_job **out, struct err *e);
int queue_writer_batch_progress(struct queue *q, const char *batch_id, const char *task_id,
                                uint64_t token, int64_t records, struct err *e);

#endif
