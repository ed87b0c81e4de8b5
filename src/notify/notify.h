/*
 * notify.h: the webhook notifier. When an async job ends, inferd POSTs a JSON event to the job's
 * callback_url; this module does the HTTP side.
 *
 * Durability belongs to the store: the job queue writes each pending delivery into its outbox
 * in the same transaction as the job's final state, so a crash never loses one. The notifier
 * takes due deliveries from the store, POSTs them, and records every attempt back. Delivery is
 * at least once: a crash or notify_destroy() between a receiver's 2xx and record() means the
 * event is sent again after restart, with the same X-Inferd-Event-Id, so receivers dedupe on it.
 * An attempt the store cannot record now (a full disk, Redis away) is kept and recorded once
 * the store takes it, and its delivery is not sent again meanwhile: while the process lives, a
 * receiver sees at most max_attempts POSTs of one delivery.
 *
 * Each POST carries
 *   Content-Type: application/json
 *   User-Agent: inferd-webhook/1
 *   X-Inferd-Event-Id: <event_id>
 *   X-Inferd-Signature: sha256=<hex HMAC-SHA256 of the raw body keyed by the secret>
 *                        (only when a secret is configured)
 * A 2xx answer means delivered. Anything else (no connection, timeout, an https receiver whose
 * certificate does not verify, any other status, a redirect: redirects are never followed) is
 * a failed attempt, retried after initial_backoff_ms,
 * doubling each time up to max_backoff_ms, until max_attempts attempts; then the delivery is
 * given up. A URL that is not http:// or https:// is given up after its first attempt, since
 * retrying cannot help.
 *
 * Threads: the notifier runs one thread of its own, driving every POST with libcurl's multi
 * interface, so slow receivers hold no threads and no caller ever waits on a receiver. The
 * store's callbacks run only on that thread. notify_kick() and notify_get_stats() may be called
 * from any thread.
 *
 * Times (now_ms, at_ms, next_attempt_ms) are Unix epoch milliseconds (CLOCK_REALTIME), because
 * the store keeps them across restarts.
 */
#ifndef INFERD_NOTIFY_H
#define INFERD_NOTIFY_H

#include "core/err.h"

#include <stddef.h>
#include <stdint.h>

struct notifier;

/* One pending delivery, as the store hands it out. Every string is owned by the struct and
 * allocated with malloc(); notify_delivery_free() frees them and the struct. */
struct notify_delivery {
    int64_t id;     /* the store's row id */
    char *event_id; /* stable across retries and restarts: sent as X-Inferd-Event-Id */
    char *url;      /* the job's callback_url */
    char *body;     /* the exact bytes to POST (JSON), built once by the store; may hold NULs */
    size_t body_len;
    int attempts; /* attempts already made (recorded) before this one */
};

/* Frees `d`, its strings and itself. NULL does nothing. */
void notify_delivery_free(struct notify_delivery *d);

/*
 * Which hosts callback URLs may name (--webhook-hosts), for the whole process: a ','-separated
 * list of host names or IP addresses, matched without case; ".example.com" also matches every
 * name under example.com. NULL or "": any host. Call before the first notify_check_url() or
 * delivery, from one thread. ERR_INVALID names a bad entry.
 */
int notify_set_allowed_hosts(const char *list, struct err *e);

/*
 * Where this process's own HTTP server listens (--host, --port), for the whole process. The rules
 * for the addresses a callback may reach follow from it:
 *   - a callback to this machine at `port` (a loopback, unspecified or local interface address,
 *     in any spelling) is refused, always: it would reach inferd's own API;
 *   - when `host` is not a loopback address (inferd listens beyond loopback), a callback to a
 *     loopback, private (RFC 1918, RFC 6598, fc00::/7), link-local or unspecified address, or
 *     to any address of this machine, is refused unless --webhook-hosts names the URL's host.
 * notify_check_url() applies them to what a URL's text shows; the notifier applies them again
 * to every address libcurl is about to connect to (after DNS resolution, so a name that
 * resolves, or rebinds, to a refused address is refused too) before any byte is sent.
 *   host  the IPv4 address --host takes; NULL forgets the listener (the default: then no
 *         address is refused for being local, as for a process that serves nothing)
 *   port  the listening port; 0 while it is not bound yet (--port 0): the notifier then starts
 *         no delivery until this is called again with the bound port (then notify_kick())
 * Any thread. ERR_INVALID names a bad host or port.
 */
int notify_set_listen(const char *host, int port, struct err *e);

/* 0 if `url` is an http:// or https:// URL whose host is allowed and whose text does not show a
 * refused address (notify_set_listen()); else ERR_INVALID saying why (the URL's credentials
 * masked). Submissions and model configs check this; the notifier checks it again before every
 * POST. Never resolves a name: that happens, and is checked, when the notifier connects. */
int notify_check_url(const char *url, struct err *e);

/* The connect-time rule on its own: 0 if a callback to a URL whose host is `url_host` (as the
 * URL spells it; borrowed) may connect to `addr` (IPv4 or IPv6, borrowed); else ERR_INVALID
 * with a message that starts "refused: ". */
struct sockaddr;
int notify_check_connect(const struct sockaddr *addr, const char *url_host, struct err *e);

/* A copy of `url` fit to show back (job and batch-job JSON, webhook events, errors): its
 * userinfo ("user:password@") replaced by "***@", since it may hold credentials, as is a
 * `password=` query parameter. The rest is kept: url_redacted() (core/url.h). New string, freed
 * with free(); NULL if `url` is NULL or out of memory. */
char *notify_url_redacted(const char *url);

/*
 * Where deliveries come from and where outcomes go: implemented by the job queue. Every callback
 * is called only from the notifier's thread, never concurrently with another, and returns 0 or a
 * negative err_code (then the notifier logs `e`, pauses a second and carries on).
 *
 * In-flight deliveries are not marked anywhere: the notifier passes the ids it has in flight,
 * and the store leaves them out. So the store keeps no state for the notifier, and nothing is
 * left "taken" after a crash or a destroy.
 */
struct notify_store {
    void *ctx; /* passed to every callback; borrowed, must outlive notify_destroy() */

    /* Up to `max` deliveries that are pending (not done), due at or before now_ms, and whose
     * ids are not among in_flight[0 .. n_in_flight-1].
     *   in_flight  borrowed for the call
     *   out        receives a new array of `*n` new deliveries (NULL when *n is 0); the notifier
     *              frees the array with free() and each delivery with notify_delivery_free() */
    int (*take_due)(void *ctx, int64_t now_ms, const int64_t *in_flight, size_t n_in_flight,
                    size_t max, struct notify_delivery ***out, size_t *n, struct err *e);

    /* Records one attempt of delivery `delivery_id` and counts it in the delivery's attempts.
     *   at_ms            when the attempt started
     *   http_status      the receiver's status, 0 if there was none (no connection, timeout)
     *   error            borrowed for the call; what went wrong for a person, NULL if delivered
     *   done             1: no more attempts (delivered, or given up); 0: retry at
     *                    next_attempt_ms (which is 0 when done) */
    int (*record)(void *ctx, int64_t delivery_id, int64_t at_ms, int http_status, const char *error,
                  int done, int delivered, int64_t next_attempt_ms, struct err *e);

    /* Optional (NULL: the notifier looks for due deliveries every 200 ms). Writes to *next_ms
     * the earliest next attempt time of any pending delivery not in in_flight, or -1 if there
     * is none, so the thread can sleep until then. notify_kick() covers deliveries stored
     * later. in_flight is borrowed for the call. */
    int (*next_due)(void *ctx, const int64_t *in_flight, size_t n_in_flight, int64_t *next_ms,
                    struct err *e);
};

/* Zero in a field means its default. */
struct notify_config {
    const char *secret;         /* HMAC key, copied; NULL or "" means unsigned (no
                                   X-Inferd-Signature header) */
    int max_attempts;           /* attempts before giving up; default 8 */
    int64_t initial_backoff_ms; /* wait after the first failure; default 1000; doubles each
                                   attempt */
    int64_t max_backoff_ms;     /* cap on the wait; default 300000 */
    int64_t timeout_ms;         /* whole attempt (connect, send, answer); default 10000 */
    int max_in_flight;          /* concurrent POSTs; default 64 */
    const char *ca_file;        /* NULL or "": https receivers are verified against the system's
                                   CAs; else a PEM file of CAs trusted too (--webhook-ca-file),
                                   read by notify_create(). Certificates are always verified. */
};

/* Counters for /metrics, each since notify_create(). */
struct notify_stats {
    uint64_t delivered;       /* deliveries answered with a 2xx */
    uint64_t attempts_failed; /* attempts that were not a 2xx, given-up ones included */
    uint64_t given_up;        /* deliveries that ran out of attempts or had a bad URL */
};

/*
 * Validates `cfg` and starts the notifier's thread, which looks for due deliveries at once.
 *   cfg    borrowed for the call; the secret is copied
 *   store  copied; store->ctx must outlive notify_destroy()
 *   out    receives a new notifier; the caller frees it with notify_destroy()
 * Returns 0, ERR_INVALID (a negative field, initial_backoff_ms above max_backoff_ms, a missing
 * take_due or record, an unreadable ca_file or one without a certificate) or ERR_NOMEM (also
 * when libcurl or the thread cannot start).
 */
int notify_create(const struct notify_config *cfg, const struct notify_store *store,
                  struct notifier **out, struct err *e);

/* A new delivery was stored: look for due deliveries now instead of at the next scheduled look.
 * Cheap and thread-safe; never blocks. Must not be called after notify_destroy(). */
void notify_kick(struct notifier *n);

/* Stops and joins the thread and frees. In-flight attempts are abandoned without a record: they
 * stay pending in the store and are retried after restart. Not from a store callback. NULL does
 * nothing. */
void notify_destroy(struct notifier *n);

/* Writes "sha256=<64 lower-case hex>", the HMAC-SHA256 of body[0 .. len-1] keyed by `secret`,
 * and a NUL to `out`: exactly what X-Inferd-Signature carries, for tests and receivers' docs.
 * Returns 0, or ERR_INVALID if the secret is NULL or "". */
#define NOTIFY_SIGNATURE_SIZE 72
int notify_sign(const char *secret, const char *body, size_t len, char out[NOTIFY_SIGNATURE_SIZE],
                struct err *e);

/* A snapshot of the counters. Thread-safe. */
void notify_get_stats(struct notifier *n, struct notify_stats *out);

#endif
