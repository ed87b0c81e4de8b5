/*
 * batcher.h: the per-model dynamic batcher.
 *
 * Producers (HTTP handlers today; the async worker and the batch runner later) submit items;
 * `instances` threads each take up to `max_batch_size` rows of whole requests, waiting at most
 * `max_queue_delay_us` after the oldest item for the batch to fill, and run them in one backend
 * execute call. A sweeper thread answers items whose deadline passes while they wait (504 at
 * that moment, even while every instance is busy) and drops items whose client hung up.
 *
 * A backend with execute_async (an upstream server behind it) gets one dispatching thread
 * instead of `instances`: it starts batches without waiting for them, keeping at most
 * `max_in_flight` requests started and not done; the rest wait here, where deadlines and
 * cancellation still apply. The backend ends each request from its own thread.
 *
 * Threads: submit() runs on the producer's thread and never blocks on the backend. Every
 * item's `done` callback runs exactly once, on an instance thread, the sweeper thread or (for
 * execute_async) the backend's thread, never with the batcher lock held.
 */
#ifndef INFERD_BATCHER_H
#define INFERD_BATCHER_H

#include "core/err.h"
#include "inferd/backend.h"
#include "kserve/tensor.h"

#include <stdatomic.h>
#include <stdint.h>

struct batcher;
struct batch_item;
struct metrics_model;
struct metrics_version;

/* rc is 0 or a negative err_code; `e` is borrowed for the call. */
typedef void (*batcher_done_fn)(struct batch_item *item, int rc, const struct err *e);

/* Owned by the producer; must stay valid until `done` is called. */
struct batch_item {
    struct infer_request *req; /* borrowed; outputs are filled in place */
    uint64_t deadline_ns;      /* clock_mono_ns(); 0 means none */
    int client_fd;             /* checked for hang-up while queued; -1 means don't */
    /* Written once to client_fd when the client's side of the connection ends while the item
     * is pending: that may be a half-close (shutdown(SHUT_WR) after a whole request, as nc -N
     * does), which is not a hang-up. A peer that closed answers the write with a reset, seen
     * at the next check. NULL: the end of the client's side counts as a hang-up. */
    const char *eof_probe;
    size_t eof_probe_len;
    batcher_done_fn done;
    void *ctx; /* the producer's */
    /* when the producer got the request, for statistics; 0: when it was submitted */
    uint64_t received_ns;
    /* filled by the batcher */
    uint64_t enqueued_ns;
    uint64_t started_ns; /* when the backend call began; 0 if it never did */
    size_t batch_rows;   /* rows in the batch this item ran in */
    struct batcher *batcher;
    _Atomic int cancelled; /* set by batch_item_cancel() */
    _Atomic int probed;    /* eof_probe was written */
    struct batch_item *next;
};

/* Nobody waits for `item` any more (its job was cancelled): a queued item is answered
 * ERR_CANCELLED within a sweep, a running execute_async request is asked to stop. Any thread,
 * until `done` runs. */
void batch_item_cancel(struct batch_item *item);

struct batcher_config {
    int64_t max_batch_size;     /* rows; 1 disables batching */
    int64_t max_queue_delay_us; /* how long the oldest item may wait for the batch to fill */
    int64_t max_queue_size;     /* items waiting; past it submit() returns ERR_BUSY */
    int instances;
    int64_t max_in_flight;         /* execute_async: requests started and not done (0: 64) */
    struct metrics_model *metrics; /* batch sizes and queue waits go here; NULL means none */
    struct metrics_version *stats; /* the statistics extension's counts; NULL means none */
};

/*
 * Creates the batcher and starts its threads, creating one backend instance per thread.
 *   api, model_state  borrowed; must outlive batcher_destroy()
 */
int batcher_create(const struct batcher_config *cfg, const struct inferd_backend_api *api,
                   void *model_state, const char *model_name, struct batcher **out, struct err *e);

/* Queues `item`. Returns 0, ERR_BUSY (queue full) or ERR_UNAVAILABLE (stopping). */
int batcher_submit(struct batcher *b, struct batch_item *item, struct err *e);

/* Items waiting now (for metrics and Retry-After). */
size_t batcher_pending(struct batcher *b);

/* Stops accepting, runs every queued item to completion, joins the threads, destroys the
 * instances and frees. NULL does nothing. Must not be called from a done callback. */
void batcher_destroy(struct batcher *b);

/* The host->request_done and host->request_cancelled given to backends. */
void batcher_request_done(struct inferd_request *request);
int batcher_request_cancelled(const struct inferd_request *request);

/* The host services given to every backend (backend_open() passes them to its init): outputs
 * allocated into the request (tensor_output_alloc), log lines, and the two above. Static:
 * valid for the whole process. */
const struct inferd_host *batcher_host(void);

#endif
