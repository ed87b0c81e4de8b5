/*
 * queue_notify.c: the queue's webhook outbox seen as a notify_store, so the notifier
 * (src/notify) delivers what the queue committed with each final state.
 */
#include "queue/queue.h"
#include "notify/notify.h"

#include <stdlib.h>
#include <string.h>

static int in_list(int64_t id, const int64_t *ids, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (ids[i] == id)
            return 1;
    return 0;
}

static int take_due(void *ctx, int64_t now_ms, const int64_t *in_flight, size_t n_in_flight,
                    size_t max, struct notify_delivery ***out, size_t *n, struct err *e)
{
    struct queue_outbox_item *items = NULL;
    struct notify_delivery **ds = NULL;
    size_t got = 0, k = 0;
    int rc;

    *out = NULL;
    *n = 0;
    /* a store that returns in-flight webhooks too is asked for that many more */
    rc = queue_outbox_due(ctx, now_ms, queue_outbox_exclusive(ctx) ? max : max + n_in_flight,
                          &items, &got, e);
    if (rc != 0 || got == 0)
        goto cleanup;
    ds = calloc(got, sizeof(*ds));
    if (!ds) {
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    for (size_t i = 0; i < got && k < max; i++) {
        struct notify_delivery *d;
        if (in_list(items[i].id, in_flight, n_in_flight) || !items[i].body)
            continue;
        d = calloc(1, sizeof(*d));
        if (!d)
            break;
        /* hand the strings over instead of copying them */
        d->id = items[i].id;
        d->event_id = items[i].event_id;
        d->url = items[i].url;
        d->body = items[i].body;
        d->body_len = items[i].body_len;
        d->attempts = items[i].attempts;
        items[i].event_id = items[i].url = items[i].body = NULL;
        ds[k++] = d;
    }
    if (k == 0) {
        free(ds);
        ds = NULL;
    }
    *out = ds;
    *n = k;
cleanup:
    queue_outbox_items_free(items, got);
    return rc;
}

static int record(void *ctx, int64_t delivery_id, int64_t at_ms, int http_status, const char *error,
                  int done, int delivered, int64_t next_attempt_ms, struct err *e)
{
    struct queue_outbox_attempt a = {
        .outbox_id = delivery_id,
        .at_ms = at_ms,
        .http_status = http_status,
        .error = error,
        .done = done,
        .delivered = delivered,
        .next_attempt_ms = next_attempt_ms,
    };

    return queue_outbox_record(ctx, &a, e);
}

void queue_notify_store(struct queue *q, struct notify_store *out)
{
    memset(out, 0, sizeof(*out));
    out->ctx = q;
    out->take_due = take_due;
    out->record = record;
}
