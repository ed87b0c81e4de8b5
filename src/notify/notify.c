/*
 * notify.c: the webhook notifier: one thread driving every POST through a libcurl multi handle.
 *
 * Thread map:
 *   any thread   notify_kick() sets `kicked` and calls curl_multi_wakeup(); notify_get_stats()
 *                reads the atomic counters
 *   notifier     loop: "look" (take due deliveries from the store and start their POSTs) when
 *                kicked, after a POST finished, or at the scheduled time; curl_multi_poll() until
 *                a socket is ready, a curl timer fires, a kick or the next look; perform; record
 *                each finished POST in the store
 * There is no lock: the fields shared with other threads are atomics, and other threads touch
 * the multi handle only through curl_multi_wakeup(), which libcurl makes thread-safe. The
 * wakeup is remembered until the next curl_multi_poll(), so a kick is never lost.
 *
 * An attempt's slot holds its delivery, easy handle and headers until it finishes and its
 * outcome is recorded (while the store refuses the record, the slot keeps the outcome and
 * record_kept() tries again after each pause); its id is what take_due() is told to leave
 * out, so a delivery is never in flight twice, nor sent again before its last attempt counts.
 *
 * Where a POST may connect is checked twice (notify_addr.c): the URL's text before the attempt
 * starts, and each address libcurl resolved, in open_socket(), before the socket exists.
 */
#include "notify/notify.h"
#include "notify/notify_internal.h"
#include "core/ca_file.h"
#include "core/log.h"
#include "core/clock.h"

#include <curl/curl.h>
#include <openssl/evp.h>
#include <openssl/crypto.h>
#include <openssl/hmac.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>

#define POLL_MS 200         /* how often to look when the store has no next_due */
#define MAX_SLEEP_MS 30000  /* longest sleep: bounds what a wall clock jump can delay */
#define BUSY_SLEEP_MS 1000  /* at max_in_flight; a finishing POST wakes the poll sooner */
#define STORE_PAUSE_MS 1000 /* after a store callback fails, so a broken store is not hammered */
#define EMPTY_LOOK_MS 10    /* least wait after a look found nothing though next_due said due */
#define MAX_IN_FLIGHT 4096
#define MAX_BACKOFF_MS (7 * 24 * 3600 * 1000LL) /* also keeps the doubling from overflowing */

/* One POST in flight, or one made whose outcome the store has not taken yet. */
struct attempt {
    struct notify_delivery *d; /* owned */
    CURL *easy;                /* owned; CURLOPT_PRIVATE points back here */
    struct curl_slist *headers;
    size_t slot; /* index in notifier.slots */
    int64_t started_ms;
    char errbuf[CURL_ERROR_SIZE];
    char *host;        /* the URL's host, for the connect-time check; curl_free(); may be NULL */
    char refused[256]; /* why an address was refused at connect time; "" if none was */
    /* after the POST, while the store refuses its record (a full disk, Redis away): kept,
     * with its id still in flight, so it is recorded later and never sent again meanwhile */
    int unrecorded;
    int status, done, delivered;
    int64_t next_ms;
    char error[CURL_ERROR_SIZE + 64]; /* "" when delivered */
};

struct notifier {
    struct notify_config cfg;  /* defaults applied; immutable after create: no lock */
    char *secret;              /* immutable; NULL means unsigned */
    struct ca_file *ca;        /* immutable; NULL: the system's CAs only */
    struct notify_store store; /* immutable */
    CURLM *multi;              /* the thread's; other threads only call curl_multi_wakeup() */
    int curl_ready;            /* curl_global_init() succeeded; only create and destroy */
    pthread_t thread;
    int thread_started; /* only create and destroy */

    /* the notifier thread's own (and destroy's, after the join): no lock */
    struct attempt **slots; /* cfg.max_in_flight entries; NULL is a free slot */
    int64_t *ids;           /* scratch: the ids in flight, for the store */
    size_t n_in_flight;
    int look_now;           /* a POST finished or the last look filled every slot: look again */
    int64_t next_look_ms;   /* the scheduled look */
    int64_t pause_until_ms; /* no look before this, after a store failure */

    _Atomic int stopping;
    _Atomic int kicked;
    _Atomic uint64_t delivered, attempts_failed, given_up; /* for /metrics */
};

static int64_t clamp_ms(int64_t ms, int64_t lo, int64_t hi)
{
    return ms < lo ? lo : ms > hi ? hi : ms;
}

void notify_delivery_free(struct notify_delivery *d)
{
    if (!d)
        return;
    free(d->event_id);
    free(d->url);
    free(d->body);
    free(d);
}

int notify_sign(const char *secret, const char *body, size_t len, char out[NOTIFY_SIGNATURE_SIZE],
                struct err *e)
{
    static const char hex[] = "0123456789abcdef";
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int md_len = 0;

    out[0] = '\0';
    if (!secret || !secret[0])
        return err_set(e, ERR_INVALID, "webhook signature: the secret is empty");
    if (!HMAC(EVP_sha256(), secret, (int)strlen(secret), (const unsigned char *)(body ? body : ""),
              body ? len : 0, md, &md_len) ||
        md_len != 32)
        return err_set(e, ERR_NOMEM, "webhook signature: HMAC-SHA256 failed");
    memcpy(out, "sha256=", 7);
    for (unsigned int i = 0; i < md_len; i++) {
        out[7 + 2 * i] = hex[md[i] >> 4];
        out[7 + 2 * i + 1] = hex[md[i] & 15];
    }
    out[7 + 2 * md_len] = '\0';
    return 0;
}

/* ---- one attempt ---- */

/* "scheme://host:port" of `url` for logs: a callback URL's path, query or userinfo may hold a
 * token, and those are never logged. */
static void url_origin(const char *url, char *out, size_t size)
{
    const char *sep = url ? strstr(url, "://") : NULL;
    const char *host, *end, *p;

    if (!sep) {
        snprintf(out, size, "-");
        return;
    }
    host = sep + 3;
    end = host + strcspn(host, "/?#");
    for (p = host; p < end; p++)
        if (*p == '@')
            host = p + 1;
    snprintf(out, size, "%.*s://%.*s", (int)(sep - url), url, (int)(end - host), host);
}

/* The wait after `made` failed attempts: initial, doubling each time, capped. */
static int64_t backoff_ms(const struct notify_config *c, int made)
{
    int64_t wait = c->initial_backoff_ms;

    for (int i = 1; i < made && wait < c->max_backoff_ms; i++)
        wait *= 2;
    return wait < c->max_backoff_ms ? wait : c->max_backoff_ms;
}

static size_t discard_body(char *data, size_t size, size_t nmemb, void *ctx)
{
    (void)data;
    (void)ctx;
    return size * nmemb;
}

static void attempt_free(struct attempt *a)
{
    if (!a)
        return;
    if (a->easy)
        curl_easy_cleanup(a->easy);
    curl_slist_free_all(a->headers);
    curl_free(a->host);
    notify_delivery_free(a->d);
    free(a);
}

/* Appends "name: value" to *list. Returns 0 or -1 (out of memory). */
static int add_header(struct curl_slist **list, const char *name, const char *value)
{
    char line[512];
    struct curl_slist *next;

    if ((size_t)snprintf(line, sizeof(line), "%s: %s", name, value) >= sizeof(line))
        return -1;
    next = curl_slist_append(*list, line);
    if (!next)
        return -1;
    *list = next;
    return 0;
}

static int build_headers(struct notifier *n, struct attempt *a)
{
    char sig[NOTIFY_SIGNATURE_SIZE];

    if (add_header(&a->headers, "Content-Type", "application/json") != 0 ||
        add_header(&a->headers, "X-Inferd-Event-Id", a->d->event_id) != 0)
        return -1;
    if (n->secret) {
        if (notify_sign(n->secret, a->d->body, a->d->body_len, sig, NULL) != 0 ||
            add_header(&a->headers, "X-Inferd-Signature", sig) != 0)
            return -1;
    }
    /* curl would send "Expect: 100-continue" for larger bodies and wait for the receiver */
    a->headers = curl_slist_append(a->headers, "Expect:");
    return a->headers ? 0 : -1;
}

/* The host of `url` as libcurl reads it (new string: curl_free()), or NULL. */
static char *url_host(const char *url)
{
    CURLU *u = url ? curl_url() : NULL;
    char *host = NULL;

    if (u && curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK &&
        curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK)
        host = NULL;
    curl_url_cleanup(u);
    return host;
}

/*
 * libcurl calls this for every address it is about to connect to, after resolving the name and
 * before any byte is sent: where the address rules are applied, since a name can resolve (or
 * rebind, between a check and the connect) anywhere. A refused address makes libcurl try the
 * name's next one, if any; the attempt fails only when none was allowed.
 */
static curl_socket_t open_socket(void *ctx, curlsocktype purpose, struct curl_sockaddr *addr)
{
    struct attempt *a = ctx;
    struct sockaddr_storage ss;
    struct err why = {0};
    size_t len = addr->addrlen < sizeof(ss) ? addr->addrlen : sizeof(ss);

    memset(&ss, 0, sizeof(ss));
    memcpy(&ss, &addr->addr, len);
    if (purpose != CURLSOCKTYPE_IPCXN)
        err_set(&why, ERR_INVALID, "refused: not an outgoing TCP connection");
    else
        notify_check_connect((const struct sockaddr *)&ss, a->host, &why);
    if (why.code != 0) {
        snprintf(a->refused, sizeof(a->refused), "%s", why.msg);
        return CURL_SOCKET_BAD;
    }
    return socket(addr->family, addr->socktype | SOCK_CLOEXEC, addr->protocol);
}

/* Sets up `a->easy` for one POST of a->d. Returns 0 or -1 (out of memory). */
static int setup_easy(struct notifier *n, struct attempt *a)
{
    const struct notify_delivery *d = a->d;
    CURL *h = a->easy;
    CURLcode cc = CURLE_OK;

#define SETOPT(opt, val)                                                                           \
    do {                                                                                           \
        if (cc == CURLE_OK)                                                                        \
            cc = curl_easy_setopt(h, opt, val);                                                    \
    } while (0)
    SETOPT(CURLOPT_URL, d->url);
    SETOPT(CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)(d->body ? d->body_len : 0));
    SETOPT(CURLOPT_POSTFIELDS, d->body ? d->body : ""); /* not copied: a->d outlives the POST */
    SETOPT(CURLOPT_HTTPHEADER, a->headers);
    SETOPT(CURLOPT_USERAGENT, "inferd-webhook/1");
    SETOPT(CURLOPT_NOSIGNAL, 1L);
    SETOPT(CURLOPT_FOLLOWLOCATION, 0L); /* a redirect is a failed attempt, never followed */
#if LIBCURL_VERSION_NUM >= 0x075500
    SETOPT(CURLOPT_PROTOCOLS_STR, "http,https");
#else
    SETOPT(CURLOPT_PROTOCOLS, (long)(CURLPROTO_HTTP | CURLPROTO_HTTPS));
#endif
    /* every address is checked where libcurl connects (after DNS: no rebinding around it), so
     * the connection must go to the receiver itself, never through a proxy from the env */
    SETOPT(CURLOPT_PROXY, "");
    SETOPT(CURLOPT_OPENSOCKETFUNCTION, open_socket);
    SETOPT(CURLOPT_OPENSOCKETDATA, (void *)a);
    SETOPT(CURLOPT_TIMEOUT_MS, (long)n->cfg.timeout_ms);
    SETOPT(CURLOPT_WRITEFUNCTION, discard_body);
    SETOPT(CURLOPT_ERRORBUFFER, a->errbuf);
    SETOPT(CURLOPT_PRIVATE, (void *)a);
#undef SETOPT
    if (cc == CURLE_OK && n->ca && ca_file_apply(n->ca, h) != 0)
        return -1;
    return cc == CURLE_OK ? 0 : -1;
}

/* Starts the POST of `d` (owned from here on) in a free slot. Returns 0 or -1 (out of memory:
 * `d` is freed unrecorded and stays due in the store). */
static int attempt_start(struct notifier *n, struct notify_delivery *d, size_t slot)
{
    struct attempt *a = calloc(1, sizeof(*a));

    if (!a) {
        notify_delivery_free(d);
        return -1;
    }
    a->d = d;
    a->slot = slot;
    a->started_ms = clock_now_ms();
    a->host = url_host(d->url);
    a->easy = curl_easy_init();
    if (!a->easy || build_headers(n, a) != 0 || setup_easy(n, a) != 0 ||
        curl_multi_add_handle(n->multi, a->easy) != CURLM_OK) {
        attempt_free(a);
        return -1;
    }
    n->slots[slot] = a;
    n->n_in_flight++;
    return 0;
}

/* Records an attempt's outcome (kept in `a`). 0, or -1 when the store refused it: then the
 * store is paused for, and `a` stays to be recorded again (record_kept()). */
static int attempt_record(struct notifier *n, struct attempt *a)
{
    const struct notify_delivery *d = a->d;
    struct err e = {0};

    if (n->store.record(n->store.ctx, d->id, a->started_ms, a->status,
                        a->delivered ? NULL : a->error, a->done, a->delivered, a->next_ms,
                        &e) == 0) {
        if (a->unrecorded)
            log_info("notify", "webhook attempt recorded after the store came back",
                     "delivery=%lld", (long long)d->id);
        a->unrecorded = 0;
        return 0;
    }
    /* kept, not sent again: a receiver sees at most max_attempts POSTs of a delivery (only a
     * process that stops before the store comes back leaves it to be sent again) */
    if (!a->unrecorded)
        log_error("notify", "cannot record a webhook attempt; kept until the store takes it",
                  "delivery=%lld error=\"%s\"", (long long)d->id, e.msg);
    a->unrecorded = 1;
    n->pause_until_ms = clock_now_ms() + STORE_PAUSE_MS;
    return -1;
}

/*
 * Counts, logs and keeps in `a` the outcome of its attempt, then records it.
 *   error      NULL if delivered; otherwise what went wrong
 *   permanent  retrying cannot help: give up now
 * Returns attempt_record()'s answer.
 */
static int attempt_finish(struct notifier *n, struct attempt *a, int status, const char *error,
                          int permanent)
{
    const struct notify_delivery *d = a->d;
    int made = d->attempts + 1, delivered = error == NULL;
    int done = delivered || permanent || made >= n->cfg.max_attempts;
    int64_t now = clock_now_ms(), next = done ? 0 : now + backoff_ms(&n->cfg, made);
    const char *outcome = delivered ? "delivered" : done ? "given_up" : "retry";
    const char *event = d->event_id ? d->event_id : "-"; /* NULL when refused for it */
    char origin[256];

    url_origin(d->url, origin, sizeof(origin));
    if (delivered) {
        atomic_fetch_add(&n->delivered, 1);
    } else {
        atomic_fetch_add(&n->attempts_failed, 1);
        if (done)
            atomic_fetch_add(&n->given_up, 1);
    }
    log_debug("notify", "webhook attempt",
              "delivery=%lld event=%s origin=%s attempt=%d status=%d "
              "outcome=%s error=\"%s\"",
              (long long)d->id, event, origin, made, status, outcome, error ? error : "");
    if (!delivered && done)
        log_warn("notify", "webhook given up",
                 "delivery=%lld event=%s origin=%s attempts=%d "
                 "status=%d error=\"%s\"",
                 (long long)d->id, event, origin, made, status, error);
    a->status = status;
    a->done = done;
    a->delivered = delivered;
    a->next_ms = next;
    snprintf(a->error, sizeof(a->error), "%s", error ? error : "");
    return attempt_record(n, a);
}

/* A delivery that cannot be sent (a URL that is not http or https, an unusable event id):
 * recorded as a failed attempt and given up at once. Takes `d`. (Nothing was sent: if the
 * store refuses the record, the delivery stays due and is refused again later.) */
static void attempt_refuse(struct notifier *n, struct notify_delivery *d, const char *why)
{
    struct attempt a = {.d = d, .started_ms = clock_now_ms()};

    attempt_finish(n, &a, 0, why, 1);
    notify_delivery_free(d);
}

/* Why `d` cannot be sent at all, or NULL (`why` holds the text). */
static const char *unsendable(const struct notify_delivery *d, struct err *why)
{
    if (notify_check_url(d->url, why) != 0) /* the scheme, --webhook-hosts, the address rules */
        return why->msg;
    if (!d->event_id || !d->event_id[0] || strpbrk(d->event_id, "\r\n"))
        return "event id is empty or holds a line break";
    return NULL;
}

static void slot_free(struct notifier *n, struct attempt *a)
{
    n->slots[a->slot] = NULL;
    n->n_in_flight--;
    attempt_free(a);
    n->look_now = 1; /* a slot is free, and next_due may have changed */
}

/* Records every POST that finished and frees its slot (keeps it while unrecorded). */
static void reap(struct notifier *n)
{
    CURLMsg *msg;
    int left;

    while ((msg = curl_multi_info_read(n->multi, &left))) {
        CURL *easy = msg->easy_handle;
        CURLcode res = msg->data.result;
        char text[CURL_ERROR_SIZE + 64];
        const char *error = NULL;
        struct attempt *a;
        char *priv = NULL;
        long status = 0;

        if (msg->msg != CURLMSG_DONE)
            continue;
        curl_easy_getinfo(easy, CURLINFO_PRIVATE, &priv);
        curl_easy_getinfo(easy, CURLINFO_RESPONSE_CODE, &status);
        a = (struct attempt *)(void *)priv;
        curl_multi_remove_handle(n->multi, easy); /* msg is invalid from here */
        if (res == CURLE_PEER_FAILED_VERIFICATION || res == CURLE_SSL_CACERT_BADFILE) {
            /* retried like any failure: the receiver may fix its certificate */
            snprintf(text, sizeof(text),
                     "certificate verification failed: %.200s (a private CA: "
                     "--webhook-ca-file)",
                     a->errbuf[0] ? a->errbuf : curl_easy_strerror(res));
            error = text;
        } else if (res != CURLE_OK) {
            snprintf(text, sizeof(text), "%s",
                     a->refused[0]  ? a->refused
                     : a->errbuf[0] ? a->errbuf
                                    : curl_easy_strerror(res));
            error = text;
        } else if (status < 200 || status > 299) {
            snprintf(text, sizeof(text), "receiver answered HTTP %ld%s", status,
                     status >= 300 && status <= 399 ? " (redirects are not followed)" : "");
            error = text;
        }
        curl_easy_cleanup(easy); /* the POST is over; the slot may stay, holding its outcome */
        a->easy = NULL;
        if (attempt_finish(n, a, (int)status, error,
                           res == CURLE_UNSUPPORTED_PROTOCOL || res == CURLE_URL_MALFORMAT ||
                               (res != CURLE_OK && a->refused[0])) == 0)
            slot_free(n, a);
    }
}

/* Records the outcomes the store refused before, once its pause is over. */
static void record_kept(struct notifier *n, int64_t now)
{
    for (size_t i = 0; i < (size_t)n->cfg.max_in_flight && now >= n->pause_until_ms; i++) {
        struct attempt *a = n->slots[i];
        if (a && a->unrecorded && attempt_record(n, a) == 0)
            slot_free(n, a);
    }
}

/* ---- the loop ---- */

static size_t collect_ids(struct notifier *n)
{
    size_t k = 0;

    for (size_t i = 0; i < (size_t)n->cfg.max_in_flight; i++)
        if (n->slots[i])
            n->ids[k++] = n->slots[i]->d->id;
    return k;
}

static int in_flight(const struct notifier *n, int64_t id)
{
    for (size_t i = 0; i < (size_t)n->cfg.max_in_flight; i++)
        if (n->slots[i] && n->slots[i]->d->id == id)
            return 1;
    return 0;
}

/* Starts what take_due() handed out. Takes the array and every delivery in it. */
static void start_all(struct notifier *n, struct notify_delivery **got, size_t n_got)
{
    size_t slot = 0;

    for (size_t i = 0; i < n_got; i++) {
        struct notify_delivery *d = got[i];
        struct err refused = {0};
        const char *why = unsendable(d, &refused);

        while (slot < (size_t)n->cfg.max_in_flight && n->slots[slot])
            slot++;
        if (slot == (size_t)n->cfg.max_in_flight || in_flight(n, d->id)) {
            log_error("notify", "store handed out a delivery it should not have",
                      "delivery=%lld reason=%s", (long long)d->id,
                      slot == (size_t)n->cfg.max_in_flight ? "over_max" : "in_flight");
            notify_delivery_free(d);
        } else if (why) {
            attempt_refuse(n, d, why);
        } else if (attempt_start(n, d, slot) != 0) {
            log_error("notify", "out of memory starting a webhook attempt", "delivery=%lld",
                      (long long)d->id);
            n->pause_until_ms = clock_now_ms() + STORE_PAUSE_MS;
        }
    }
    free(got);
}

/* Takes due deliveries into the free slots, starts them, and schedules the next look. */
static void look(struct notifier *n, int64_t now)
{
    size_t room = (size_t)n->cfg.max_in_flight - n->n_in_flight, n_got = 0, k;
    struct notify_delivery **got = NULL;
    int64_t next = -1;
    struct err e = {0};

    n->look_now = 0;
    k = collect_ids(n);
    if (n->store.take_due(n->store.ctx, now, n->ids, k, room, &got, &n_got, &e) != 0 ||
        (n_got > 0 && !got)) {
        log_warn("notify", "cannot take due webhooks", "error=\"%s\"",
                 e.msg[0] ? e.msg : "take_due returned no array");
        n->pause_until_ms = clock_now_ms() + STORE_PAUSE_MS;
        return;
    }
    start_all(n, got, n_got);
    if (n_got >= room) {
        n->look_now = 1; /* more may be due: look again once a slot is free */
        return;
    }
    if (!n->store.next_due) {
        n->next_look_ms = now + POLL_MS;
        return;
    }
    k = collect_ids(n);
    if (n->store.next_due(n->store.ctx, n->ids, k, &next, &e) != 0) {
        log_warn("notify", "cannot read the next webhook due time", "error=\"%s\"", e.msg);
        n->pause_until_ms = clock_now_ms() + STORE_PAUSE_MS;
        next = now + POLL_MS;
    }
    if (next < 0)
        next = now + MAX_SLEEP_MS; /* nothing pending: a kick brings the next one */
    if (n_got == 0 && next < now + EMPTY_LOOK_MS)
        next = now + EMPTY_LOOK_MS; /* the store says due but gave nothing: do not spin */
    n->next_look_ms = next;
}

static int should_look(struct notifier *n, int64_t now)
{
    if (notify_listen_pending())
        return 0; /* inferd's own port is not known yet: notify_set_listen() */
    if (n->n_in_flight >= (size_t)n->cfg.max_in_flight || now < n->pause_until_ms)
        return 0; /* a kick stays pending until we can act on it */
    return atomic_exchange(&n->kicked, 0) || n->look_now || now >= n->next_look_ms;
}

/* How long curl_multi_poll() may wait; curl shortens it for its own timers. */
static int poll_timeout_ms(struct notifier *n, int64_t now)
{
    if (notify_listen_pending())
        return BUSY_SLEEP_MS; /* notify_kick() wakes it once the port is known */
    if (n->n_in_flight >= (size_t)n->cfg.max_in_flight)
        return BUSY_SLEEP_MS;
    if (now < n->pause_until_ms)
        return (int)clamp_ms(n->pause_until_ms - now, 0, MAX_SLEEP_MS);
    if (n->look_now || atomic_load(&n->kicked))
        return 0;
    return (int)clamp_ms(n->next_look_ms - now, 0, MAX_SLEEP_MS);
}

static void *notify_main(void *arg)
{
    struct notifier *n = arg;
    int running;

    while (!atomic_load(&n->stopping)) {
        CURLMcode mc;

        record_kept(n, clock_now_ms());
        if (should_look(n, clock_now_ms()))
            look(n, clock_now_ms());
        mc = curl_multi_poll(n->multi, NULL, 0, poll_timeout_ms(n, clock_now_ms()), NULL);
        if (mc == CURLM_OK)
            mc = curl_multi_perform(n->multi, &running);
        if (mc != CURLM_OK) {
            struct timespec pause = {.tv_nsec = 100 * 1000000L};
            log_error("notify", "libcurl multi failed", "error=\"%s\"", curl_multi_strerror(mc));
            nanosleep(&pause, NULL); /* do not spin on a persistent failure */
        }
        reap(n);
    }
    return NULL;
}

/* ---- life cycle ---- */

/* Applies defaults to *c and checks the bounds. */
static int check_config(struct notify_config *c, struct err *e)
{
    if (c->max_attempts == 0)
        c->max_attempts = 8;
    if (c->initial_backoff_ms == 0)
        c->initial_backoff_ms = 1000;
    if (c->max_backoff_ms == 0)
        c->max_backoff_ms = 300000;
    if (c->timeout_ms == 0)
        c->timeout_ms = 10000;
    if (c->max_in_flight == 0)
        c->max_in_flight = 64;
    if (c->max_attempts < 1)
        return err_set(e, ERR_INVALID, "notify.max_attempts: %d is below the minimum 1",
                       c->max_attempts);
    if (c->initial_backoff_ms < 1 || c->max_backoff_ms < 1 || c->max_backoff_ms > MAX_BACKOFF_MS)
        return err_set(e, ERR_INVALID,
                       "notify.initial_backoff_ms and notify.max_backoff_ms must "
                       "be between 1 and %lld",
                       (long long)MAX_BACKOFF_MS);
    if (c->initial_backoff_ms > c->max_backoff_ms)
        return err_set(e, ERR_INVALID,
                       "notify.initial_backoff_ms: %lld is above notify.max_backoff_ms %lld",
                       (long long)c->initial_backoff_ms, (long long)c->max_backoff_ms);
    if (c->timeout_ms < 1 || c->timeout_ms > 24 * 3600 * 1000LL)
        return err_set(e, ERR_INVALID, "notify.timeout_ms: %lld is not between 1 and 86400000",
                       (long long)c->timeout_ms);
    if (c->max_in_flight < 1 || c->max_in_flight > MAX_IN_FLIGHT)
        return err_set(e, ERR_INVALID, "notify.max_in_flight: %d is not between 1 and %d",
                       c->max_in_flight, MAX_IN_FLIGHT);
    return 0;
}

int notify_create(const struct notify_config *cfg, const struct notify_store *store,
                  struct notifier **out, struct err *e)
{
    struct notifier *n = NULL;
    struct notify_config c;
    int rc;

    *out = NULL;
    if (!cfg)
        return err_set(e, ERR_INVALID, "notify: no configuration");
    if (!store || !store->take_due || !store->record)
        return err_set(e, ERR_INVALID, "notify: the store must provide take_due and record");
    c = *cfg;
    rc = check_config(&c, e);
    if (rc != 0)
        return rc;
    n = calloc(1, sizeof(*n));
    if (!n)
        return err_set(e, ERR_NOMEM, "out of memory");
    n->cfg = c;
    n->cfg.secret = NULL;  /* borrowed: the copy below is the one used */
    n->cfg.ca_file = NULL; /* read into n->ca below */
    n->store = *store;
    if (c.secret && c.secret[0] && !(n->secret = strdup(c.secret))) {
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto fail;
    }
    if (c.ca_file && c.ca_file[0] &&
        (rc = ca_file_load(c.ca_file, "--webhook-ca-file", &n->ca, e)) != 0)
        goto fail;
    n->slots = calloc((size_t)c.max_in_flight, sizeof(*n->slots));
    n->ids = calloc((size_t)c.max_in_flight, sizeof(*n->ids));
    if (!n->slots || !n->ids) {
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto fail;
    }
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        rc = err_set(e, ERR_NOMEM, "notify: libcurl failed to initialise");
        goto fail;
    }
    n->curl_ready = 1;
    n->multi = curl_multi_init();
    if (!n->multi) {
        rc = err_set(e, ERR_NOMEM, "notify: cannot create a libcurl multi handle");
        goto fail;
    }
    n->look_now = 1; /* deliveries left pending by the last run are due now */
    if (pthread_create(&n->thread, NULL, notify_main, n) != 0) {
        rc = err_set(e, ERR_NOMEM, "notify: cannot start the notifier thread");
        goto fail;
    }
    n->thread_started = 1;
    *out = n;
    return 0;
fail:
    notify_destroy(n);
    return rc;
}

void notify_kick(struct notifier *n)
{
    atomic_store(&n->kicked, 1);
    curl_multi_wakeup(n->multi);
}

void notify_destroy(struct notifier *n)
{
    if (!n)
        return;
    if (n->thread_started) {
        atomic_store(&n->stopping, 1);
        curl_multi_wakeup(n->multi);
        pthread_join(n->thread, NULL);
    }
    /* abandoned attempts stay pending in the store: nothing is recorded for them */
    for (size_t i = 0; n->slots && i < (size_t)n->cfg.max_in_flight; i++) {
        if (n->slots[i]) {
            if (n->slots[i]->easy)
                curl_multi_remove_handle(n->multi, n->slots[i]->easy);
            attempt_free(n->slots[i]);
        }
    }
    if (n->multi)
        curl_multi_cleanup(n->multi);
    if (n->curl_ready)
        curl_global_cleanup();
    free(n->slots);
    free(n->ids);
    ca_file_destroy(n->ca); /* every handle that used it is gone */
    if (n->secret)
        OPENSSL_cleanse(n->secret, strlen(n->secret));
    free(n->secret);
    free(n);
}

void notify_get_stats(struct notifier *n, struct notify_stats *out)
{
    out->delivered = atomic_load(&n->delivered);
    out->attempts_failed = atomic_load(&n->attempts_failed);
    out->given_up = atomic_load(&n->given_up);
}
