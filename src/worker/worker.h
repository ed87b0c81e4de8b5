/*
 * worker.h: the pool of async workers inside `inferd serve`.
 *
 * Each worker leases up to `batch` jobs at once (one commit), runs them through the same
 * model batchers as online requests (so queued jobs are dynamically batched too), and records
 * their outcomes in one commit. At most workers x batch jobs run at once, however many are
 * queued. A running job's lease is extended while it runs, so a long job is never run twice
 * while its worker lives. The pool registers with the queue as one worker process and
 * heartbeats while it runs (queue_worker_beat); it leaves the list when it stops.
 */
#ifndef INFERD_WORKER_H
#define INFERD_WORKER_H

#include "core/err.h"
#include "queue/queue.h"

struct registry;
struct worker_pool;

struct worker_pool_config {
    int workers;           /* >= 1: a fixed pool of this many (when max_workers is 0) */
    int min_workers;       /* autoscaling: between min (0 allowed) and max workers */
    int max_workers;       /* 0: no autoscaling */
    int target_backlog;    /* queued jobs per worker above which the pool grows (0: 10) */
    int64_t scale_down_delay_ms; /* idle this long before each step down */
    int batch;             /* jobs one worker leases and runs at once, >= 1 */
    int64_t lease_poll_ms; /* how long a lease call waits for a job before looking again */
    int64_t drain_timeout_ms; /* on stop, running jobs get this long; then they are stopped
                               * and run again later (0: wait for them however long) */
    int64_t max_input_bytes;  /* largest input_location a job may read (whole), > 0 */
    int64_t worker_timeout_ms; /* heartbeat every third of this; silent this long, the pool is
                                * presumed dead and its jobs run again (0: 30 s) */
};

/* A pool that leases nothing yet: its figures (busy, size, drain rate) read as idle until
 * worker_pool_run(). `q` and `reg` are borrowed and must outlive the pool. Free it with
 * worker_pool_stop(), run or not. */
int worker_pool_create(const struct worker_pool_config *cfg, struct queue *q, struct registry *reg,
                       struct worker_pool **out, struct err *e);

/* Joins the workers list and starts the workers (and the autoscaler): from now on jobs are
 * leased. On failure, what started is stopped by worker_pool_stop(). */
int worker_pool_run(struct worker_pool *p, struct err *e);

/* Jobs running now. */
int worker_pool_busy(struct worker_pool *p);

/* Workers running now (autoscaling changes it). 0 for NULL. */
int worker_pool_size(struct worker_pool *p);

/* Stops leasing; running jobs get drain_timeout_ms from now (worker_pool_stop() waits for
 * them). For a drain that overlaps the HTTP server's. NULL is fine. */
void worker_pool_drain(struct worker_pool *p);

/*
 * Stops leasing and lets running jobs finish and record their results, for up to
 * drain_timeout_ms from the drain's start; then the ones still running are stopped and handed
 * back (queued again at once). A worker still blocked a short grace after that (in a read, a
 * model that ignores cancellation) has its jobs handed back too and is left behind: returns
 * how many were, and then the pool, the queue and the registry must stay allocated (the
 * process is on its way out). 0: everything was joined and freed. NULL is fine.
 */
int worker_pool_stop(struct worker_pool *p);

/* This process's worker id ("host/pid/random"), as GET /v1/workers and jobs show it. */
const char *worker_pool_id(const struct worker_pool *p);

/* Completed jobs per second over the last few seconds (for Retry-After). */
double worker_pool_drain_rate(struct worker_pool *p);

#endif
