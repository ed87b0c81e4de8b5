/*
 * store_jobs.h: what a store implements for jobs and the workers that run them. Included by
 * src/queue/ only. The meaning of each call is that of its queue_* function in queue.h, which
 * the core (queue.c) implements on top of these; policy and JSON stay in the core.
 *
 * Threads: every callback may be called from any thread at once (HTTP I/O pool threads, the
 * worker pool's threads, the scheduler, a long-poll's waker) and must be thread-safe; the core
 * holds no lock while it calls one. enqueue_async's `fn` runs on the store's own thread (its
 * writer or connection thread) and must not block. Every call that changes state returns
 * after the change is durable.
 */
#ifndef INFERD_QUEUE_STORE_JOBS_H
#define INFERD_QUEUE_STORE_JOBS_H

#include "queue/queue.h"

struct queue_job_ops {
    int (*enqueue)(struct queue *q, const struct job_spec *spec, char id_out[40], int *existed,
                   struct err *e);
    int (*enqueue_async)(struct queue *q, const struct job_spec *spec, queue_enqueue_fn fn,
                         void *ctx, struct err *e);
    /* queue_lease() is lease_many for one job */
    int (*lease_many)(struct queue *q, const char *worker, size_t max, int max_tasks,
                      int64_t wait_ms, struct job **out, size_t *n, struct err *e);
    /* queue_complete() and queue_fail() are finish_many for one outcome */
    int (*finish_many)(struct queue *q, struct queue_outcome *outs, size_t n, struct err *e);
    int (*extend)(struct queue *q, const char *id, uint64_t token, int64_t lease_ms, struct err *e);
    int (*cancel)(struct queue *q, const char *id, struct job **out, struct err *e);
    int (*retry)(struct queue *q, const char *id, struct job **out, struct err *e);
    int (*get)(struct queue *q, const char *id, int want_result, struct job **out, struct err *e);
    /* up to f->limit jobs matching `f`, newest first, with their notifications and history, into
     * the caller's array of f->limit; `*n` (0 on entry) counts them */
    int (*list)(struct queue *q, const struct queue_list_filter *f, struct job **out, size_t *n,
                struct err *e);
    int (*counts)(struct queue *q, int64_t counts[JOB_N_STATES], struct err *e);
    int64_t (*queued)(struct queue *q); /* from memory: no I/O */
    int (*worker_beat)(struct queue *q, const struct queue_worker *w, struct err *e);
    int (*worker_leave)(struct queue *q, const char *id, struct err *e);
    int (*workers_list)(struct queue *q, struct queue_worker **out, size_t *n, struct err *e);
};

#endif
