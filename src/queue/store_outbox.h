/*
 * store_outbox.h: what a store implements for the webhook outbox (rows written in the same
 * commit as the final state they announce). Included by src/queue/ only. The meaning of each
 * call is that of its queue_outbox_* function in queue.h.
 *
 * Threads: called by src/notify's sender threads (due, record) and its waker (next_due), at
 * once; the core holds no lock while it calls one.
 */
#ifndef INFERD_QUEUE_STORE_OUTBOX_H
#define INFERD_QUEUE_STORE_OUTBOX_H

#include "queue/queue.h"

struct queue_outbox_ops {
    int (*due)(struct queue *q, int64_t now_ms, size_t max, struct queue_outbox_item **out,
               size_t *n, struct err *e);
    int64_t (*next_due)(struct queue *q);
    int (*record)(struct queue *q, const struct queue_outbox_attempt *a, struct err *e);
    int exclusive; /* due() hides what it handed out (held for one sender): many processes */
};

#endif
