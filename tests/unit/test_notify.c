/*
 * test_notify.c: the webhook notifier against a real receiver (libmicrohttpd on 127.0.0.1, port
 * 0) and an in-memory store. A delivery arrives with its exact body, event id and signature; the
 * signature matches RFC 4231; 500s are retried in order until a 200, or until max_attempts and
 * then given up; a refused connection is a failed attempt with an error text; a non-http URL is
 * given up at once; 50 deliveries arrive exactly once each; store failures only delay; destroy
 * abandons an attempt in flight without recording it.
 *
 * Every wait polls a condition with a deadline; nothing asserts on elapsed time.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "core/log.h"
#include "notify/notify.h"

#include <arpa/inet.h>
#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define WAIT_MS 8000
#define MAX_SEEN 256
#define MAX_ROWS 64
#define MAX_RECS 512

/* ---- the receiver: records each request, answers from a script of statuses ---- */

struct seen {
    char event_id[64];
    char signature[96]; /* "" when the header was absent */
    char content_type[64];
    char user_agent[64];
    char *body;
    size_t body_len;
};

struct upload {
    char *data;
    size_t len;
};

static struct receiver {
    struct MHD_Daemon *daemon;
    int port;
    pthread_mutex_t lock;
    int script[8]; /* guarded by lock: statuses answered in turn, then `then` */
    size_t n_script, next;
    int then;
    struct seen seen[MAX_SEEN]; /* guarded by lock */
    size_t n_seen;
} rx = {.lock = PTHREAD_MUTEX_INITIALIZER};

static void copy_header(struct MHD_Connection *c, const char *name, char *out, size_t size)
{
    const char *v = MHD_lookup_connection_value(c, MHD_HEADER_KIND, name);

    snprintf(out, size, "%s", v ? v : "");
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_size, void **con_cls)
{
    struct upload *u = *con_cls;
    struct MHD_Response *resp;
    enum MHD_Result ret;
    int status;

    (void)cls;
    (void)url;
    (void)method;
    (void)version;
    if (!u) {
        *con_cls = calloc(1, sizeof(*u));
        return *con_cls ? MHD_YES : MHD_NO;
    }
    if (*upload_size) {
        char *grown = realloc(u->data, u->len + *upload_size + 1);
        if (!grown)
            return MHD_NO;
        memcpy(grown + u->len, upload_data, *upload_size);
        u->data = grown;
        u->len += *upload_size;
        u->data[u->len] = '\0';
        *upload_size = 0;
        return MHD_YES;
    }
    pthread_mutex_lock(&rx.lock);
    status = rx.next < rx.n_script ? rx.script[rx.next++] : rx.then;
    if (rx.n_seen < MAX_SEEN) {
        struct seen *s = &rx.seen[rx.n_seen++];
        copy_header(c, "X-Inferd-Event-Id", s->event_id, sizeof(s->event_id));
        copy_header(c, "X-Inferd-Signature", s->signature, sizeof(s->signature));
        copy_header(c, "Content-Type", s->content_type, sizeof(s->content_type));
        copy_header(c, "User-Agent", s->user_agent, sizeof(s->user_agent));
        s->body = u->data;
        s->body_len = u->len;
        u->data = NULL;
    }
    pthread_mutex_unlock(&rx.lock);
    resp = MHD_create_response_from_buffer(2, (void *)"ok", MHD_RESPMEM_PERSISTENT);
    ret = MHD_queue_response(c, (unsigned int)status, resp);
    MHD_destroy_response(resp);
    return ret;
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    struct upload *u = *con_cls;

    (void)cls;
    (void)c;
    (void)toe;
    if (u) {
        free(u->data);
        free(u);
        *con_cls = NULL;
    }
}

/* Clears what the receiver saw; it answers script[0..n-1] in turn, then `then`. */
static void receiver_reset(const int *script, size_t n, int then)
{
    pthread_mutex_lock(&rx.lock);
    for (size_t i = 0; i < rx.n_seen; i++)
        free(rx.seen[i].body);
    memset(rx.seen, 0, sizeof(rx.seen));
    rx.n_seen = 0;
    if (n)
        memcpy(rx.script, script, n * sizeof(*script));
    rx.n_script = n;
    rx.next = 0;
    rx.then = then;
    pthread_mutex_unlock(&rx.lock);
}

static size_t receiver_count(void)
{
    size_t n;

    pthread_mutex_lock(&rx.lock);
    n = rx.n_seen;
    pthread_mutex_unlock(&rx.lock);
    return n;
}

/* ---- the store: rows and the records of every attempt, under one mutex ---- */

struct row {
    int64_t id;
    char event_id[32];
    char url[128];
    char *body;
    size_t body_len;
    int attempts, done, delivered;
    int64_t next_ms;
};

struct rec {
    int64_t id, at_ms, next_ms;
    int status, done, delivered;
    char error[256]; /* "" when NULL was passed */
    int has_error;
};

static struct store {
    pthread_mutex_t lock;
    struct row rows[MAX_ROWS]; /* guarded by lock */
    size_t n_rows;
    struct rec recs[MAX_RECS]; /* guarded by lock */
    size_t n_recs;
    int n_takes, n_next_dues;
    int fail_takes, fail_records; /* fail this many calls first */
    int bad_calls;                /* records of unknown or finished rows, handouts over max */
    int use_next_due;
} st = {.lock = PTHREAD_MUTEX_INITIALIZER};

static int64_t wall_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void store_reset(int use_next_due)
{
    pthread_mutex_lock(&st.lock);
    for (size_t i = 0; i < st.n_rows; i++)
        free(st.rows[i].body);
    st.n_rows = st.n_recs = 0;
    st.n_takes = st.n_next_dues = st.fail_takes = st.fail_records = st.bad_calls = 0;
    st.use_next_due = use_next_due;
    pthread_mutex_unlock(&st.lock);
}

static int64_t store_add(const char *url, const char *body, size_t body_len)
{
    struct row *r;

    pthread_mutex_lock(&st.lock);
    assert_true(st.n_rows < MAX_ROWS);
    r = &st.rows[st.n_rows];
    memset(r, 0, sizeof(*r));
    r->id = (int64_t)st.n_rows + 100;
    snprintf(r->event_id, sizeof(r->event_id), "evt_%lld", (long long)r->id);
    snprintf(r->url, sizeof(r->url), "%s", url);
    r->body = malloc(body_len + 1);
    assert_non_null(r->body);
    memcpy(r->body, body, body_len);
    r->body_len = body_len;
    r->next_ms = wall_ms();
    st.n_rows++;
    pthread_mutex_unlock(&st.lock);
    return r->id;
}

static int excluded(int64_t id, const int64_t *ids, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (ids[i] == id)
            return 1;
    return 0;
}

static struct notify_delivery *copy_row(const struct row *r)
{
    struct notify_delivery *d = calloc(1, sizeof(*d));

    /* runs on the notifier's thread, where a cmocka assert cannot jump back to the test */
    if (!d)
        abort();
    d->id = r->id;
    d->event_id = strdup(r->event_id);
    d->url = strdup(r->url);
    d->body = malloc(r->body_len + 1);
    if (!d->event_id || !d->url || !d->body)
        abort();
    memcpy(d->body, r->body, r->body_len);
    d->body_len = r->body_len;
    d->attempts = r->attempts;
    return d;
}

static int fake_take_due(void *ctx, int64_t now_ms, const int64_t *in_flight, size_t n_in_flight,
                         size_t max, struct notify_delivery ***out, size_t *n, struct err *e)
{
    struct notify_delivery **arr = NULL;
    size_t k = 0;
    int rc = 0;

    (void)ctx;
    *out = NULL;
    *n = 0;
    pthread_mutex_lock(&st.lock);
    st.n_takes++;
    if (st.fail_takes > 0) {
        st.fail_takes--;
        rc = err_set(e, ERR_IO, "fake store: take failed");
        goto cleanup;
    }
    if (max == 0)
        st.bad_calls++;
    arr = calloc(MAX_ROWS, sizeof(*arr));
    if (!arr)
        abort();
    for (size_t i = 0; i < st.n_rows && k < max; i++) {
        const struct row *r = &st.rows[i];
        if (!r->done && r->next_ms <= now_ms && !excluded(r->id, in_flight, n_in_flight))
            arr[k++] = copy_row(r);
    }
    *out = arr;
    *n = k;
cleanup:
    pthread_mutex_unlock(&st.lock);
    return rc;
}

static int fake_record(void *ctx, int64_t delivery_id, int64_t at_ms, int http_status,
                       const char *error, int done, int delivered, int64_t next_attempt_ms,
                       struct err *e)
{
    struct row *r = NULL;
    struct rec *c;
    int rc = 0;

    (void)ctx;
    pthread_mutex_lock(&st.lock);
    if (st.fail_records > 0) {
        st.fail_records--;
        rc = err_set(e, ERR_IO, "fake store: record failed");
        goto cleanup;
    }
    for (size_t i = 0; i < st.n_rows; i++)
        if (st.rows[i].id == delivery_id)
            r = &st.rows[i];
    if (!r || r->done || st.n_recs == MAX_RECS) {
        st.bad_calls++;
        goto cleanup;
    }
    c = &st.recs[st.n_recs++];
    memset(c, 0, sizeof(*c));
    *c = (struct rec){.id = delivery_id,
                      .at_ms = at_ms,
                      .next_ms = next_attempt_ms,
                      .status = http_status,
                      .done = done,
                      .delivered = delivered,
                      .has_error = error != NULL};
    snprintf(c->error, sizeof(c->error), "%s", error ? error : "");
    r->attempts++;
    r->done = done;
    r->delivered = delivered;
    if (!done)
        r->next_ms = next_attempt_ms;
cleanup:
    pthread_mutex_unlock(&st.lock);
    return rc;
}

static int fake_next_due(void *ctx, const int64_t *in_flight, size_t n_in_flight, int64_t *next_ms,
                         struct err *e)
{
    (void)ctx;
    (void)e;
    *next_ms = -1;
    pthread_mutex_lock(&st.lock);
    st.n_next_dues++;
    for (size_t i = 0; i < st.n_rows; i++) {
        const struct row *r = &st.rows[i];
        if (!r->done && !excluded(r->id, in_flight, n_in_flight) &&
            (*next_ms < 0 || r->next_ms < *next_ms))
            *next_ms = r->next_ms;
    }
    pthread_mutex_unlock(&st.lock);
    return 0;
}

static struct notifier *start(const struct notify_config *cfg)
{
    struct notify_store store = {.take_due = fake_take_due, .record = fake_record};
    struct notifier *n = NULL;
    struct err e = {0};

    if (st.use_next_due)
        store.next_due = fake_next_due;
    if (notify_create(cfg, &store, &n, &e) != 0)
        fail_msg("notify_create: %s", e.msg);
    return n;
}

/* ---- waiting ---- */

static int all_done(void)
{
    int done = 1;

    pthread_mutex_lock(&st.lock);
    for (size_t i = 0; i < st.n_rows; i++)
        done = done && st.rows[i].done;
    pthread_mutex_unlock(&st.lock);
    return done;
}

static int asked_next_due(void)
{
    int asked;

    pthread_mutex_lock(&st.lock);
    asked = st.n_next_dues > 0;
    pthread_mutex_unlock(&st.lock);
    return asked;
}

static int took_something(void)
{
    int took;

    pthread_mutex_lock(&st.lock);
    took = st.n_takes > 0;
    pthread_mutex_unlock(&st.lock);
    return took;
}

/* Polls `cond` until it holds or WAIT_MS pass; says what it waited for if it never held. */
static void wait_for(int (*cond)(void), const char *what)
{
    struct timespec step = {.tv_nsec = 2 * 1000000L};
    int64_t deadline = wall_ms() + WAIT_MS;

    while (!cond()) {
        if (wall_ms() > deadline)
            fail_msg("timed out waiting for %s", what);
        nanosleep(&step, NULL);
    }
}

static void url_for(char *out, size_t size, int port, const char *path)
{
    snprintf(out, size, "http://127.0.0.1:%d%s", port, path);
}

/* A TCP socket on 127.0.0.1 bound to a fresh port; listening or not. Writes the port. */
static int bound_socket(int listening, int *port)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(a);
    int fd = socket(AF_INET, SOCK_STREAM, 0);

    assert_true(fd >= 0);
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    if (listening)
        assert_int_equal(listen(fd, 16), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    *port = ntohs(a.sin_port);
    return fd;
}

/* ---- tests ---- */

static void test_sign_rfc4231_case2(void **state)
{
    const char *data = "what do ya want for nothing?";
    char sig[NOTIFY_SIGNATURE_SIZE];
    struct err e = {0};

    (void)state;
    assert_int_equal(notify_sign("Jefe", data, strlen(data), sig, &e), 0);
    assert_string_equal(sig,
                        "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    assert_int_equal(notify_sign(NULL, data, strlen(data), sig, &e), ERR_INVALID);
    assert_int_equal(notify_sign("", data, strlen(data), sig, &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "secret"));
}

static void test_delivers_exact_body_signed(void **state)
{
    struct notify_config cfg = {.secret = "s3cret", .initial_backoff_ms = 10};
    char url[128], body[3000], want_sig[NOTIFY_SIGNATURE_SIZE];
    struct notify_stats stats;
    struct notifier *n;
    size_t len;

    (void)state;
    /* over 1 KiB, UTF-8 and escapes: the receiver must see these bytes and no others */
    len = (size_t)snprintf(body, sizeof(body),
                           "{\"job_id\":\"j1\",\"status\":\"succeeded\",\"note\":\"caf\xc3\xa9 "
                           "\\\"q\\\"\",\"pad\":\"%02000d\"}",
                           7);
    store_reset(1);
    receiver_reset(NULL, 0, 200);
    url_for(url, sizeof(url), rx.port, "/hook?token=t");
    store_add(url, body, len);
    n = start(&cfg);
    wait_for(all_done, "the delivery to be recorded done");
    notify_get_stats(n, &stats);
    notify_destroy(n);

    assert_int_equal(notify_sign("s3cret", body, len, want_sig, NULL), 0);
    assert_int_equal(receiver_count(), 1);
    assert_int_equal(rx.seen[0].body_len, len);
    assert_memory_equal(rx.seen[0].body, body, len);
    assert_string_equal(rx.seen[0].event_id, "evt_100");
    assert_string_equal(rx.seen[0].signature, want_sig);
    assert_string_equal(rx.seen[0].content_type, "application/json");
    assert_string_equal(rx.seen[0].user_agent, "inferd-webhook/1");
    assert_int_equal(st.n_recs, 1);
    assert_int_equal(st.recs[0].status, 200);
    assert_false(st.recs[0].has_error);
    assert_true(st.recs[0].done && st.recs[0].delivered);
    assert_int_equal(stats.delivered, 1);
    assert_int_equal(stats.attempts_failed, 0);
    assert_int_equal(st.bad_calls, 0);
}

/* The store is empty when the notifier starts, and next_due says nothing is pending, so only
 * the kick makes it look before its 30 s sleep ends. */
static void test_kick_delivers_unsigned(void **state)
{
    struct notify_config cfg = {.secret = ""};
    const char *body = "{\"job_id\":\"j2\"}";
    struct notifier *n;
    char url[128];

    (void)state;
    store_reset(1);
    receiver_reset(NULL, 0, 204);
    n = start(&cfg);
    wait_for(asked_next_due, "the first look at the store to end");
    url_for(url, sizeof(url), rx.port, "/hook");
    store_add(url, body, strlen(body));
    notify_kick(n);
    wait_for(all_done, "the kicked delivery to be recorded done");
    notify_destroy(n);

    assert_int_equal(receiver_count(), 1);
    assert_string_equal(rx.seen[0].signature, ""); /* no secret: no header */
    assert_string_equal(rx.seen[0].body, body);
    assert_int_equal(st.recs[0].status, 204);
    assert_true(st.recs[0].delivered);
}

static void test_500_twice_then_200(void **state)
{
    static const int script[] = {500, 500};
    struct notify_config cfg = {.initial_backoff_ms = 10, .max_backoff_ms = 40};
    struct notify_stats stats;
    struct notifier *n;
    char url[128];

    (void)state;
    store_reset(1);
    receiver_reset(script, 2, 200);
    url_for(url, sizeof(url), rx.port, "/hook");
    store_add(url, "{}", 2);
    log_threshold = LOG_LEVEL_DEBUG; /* formats the per-attempt lines under the sanitizers */
    n = start(&cfg);
    wait_for(all_done, "the delivery to be recorded done");
    notify_get_stats(n, &stats);
    notify_destroy(n);
    log_threshold = LOG_LEVEL_INFO;

    assert_int_equal(receiver_count(), 3);
    for (size_t i = 0; i < 3; i++)
        assert_string_equal(rx.seen[i].event_id, "evt_100"); /* stable across retries */
    assert_int_equal(st.n_recs, 3);
    for (size_t i = 0; i < 3; i++) {
        const struct rec *c = &st.recs[i];
        assert_int_equal(c->id, 100);
        assert_int_equal(c->status, i < 2 ? 500 : 200);
        assert_int_equal(c->done, i == 2);
        assert_int_equal(c->delivered, i == 2);
        assert_int_equal(c->has_error, i < 2);
        if (i < 2) {
            assert_non_null(strstr(c->error, "500"));
            assert_true(c->next_ms > c->at_ms);
        }
        if (i > 0)
            assert_true(c->at_ms >= st.recs[i - 1].at_ms);
    }
    assert_int_equal(st.rows[0].attempts, 3);
    assert_int_equal(stats.delivered, 1);
    assert_int_equal(stats.attempts_failed, 2);
    assert_int_equal(stats.given_up, 0);
    assert_int_equal(st.bad_calls, 0);
}

static void test_always_failing_is_given_up(void **state)
{
    struct notify_config cfg = {.max_attempts = 4, .initial_backoff_ms = 10};
    struct notify_stats stats;
    struct notifier *n;
    char url[128];

    (void)state;
    store_reset(1);
    receiver_reset(NULL, 0, 503);
    url_for(url, sizeof(url), rx.port, "/hook");
    store_add(url, "{}", 2);
    n = start(&cfg);
    wait_for(all_done, "the delivery to be given up");
    notify_get_stats(n, &stats);
    notify_destroy(n);

    assert_int_equal(receiver_count(), 4);
    assert_int_equal(st.n_recs, 4);
    for (size_t i = 0; i < 4; i++) {
        assert_int_equal(st.recs[i].status, 503);
        assert_int_equal(st.recs[i].done, i == 3);
        assert_false(st.recs[i].delivered);
    }
    assert_int_equal(st.recs[3].next_ms, 0);
    assert_int_equal(stats.delivered, 0);
    assert_int_equal(stats.attempts_failed, 4);
    assert_int_equal(stats.given_up, 1);
    assert_int_equal(st.bad_calls, 0);
}

static void test_redirect_is_not_followed(void **state)
{
    struct notify_config cfg = {.max_attempts = 1};
    struct notifier *n;
    char url[128];

    (void)state;
    store_reset(1);
    receiver_reset(NULL, 0, 302);
    url_for(url, sizeof(url), rx.port, "/hook");
    store_add(url, "{}", 2);
    n = start(&cfg);
    wait_for(all_done, "the delivery to be given up");
    notify_destroy(n);

    assert_int_equal(receiver_count(), 1);
    assert_int_equal(st.n_recs, 1);
    assert_int_equal(st.recs[0].status, 302);
    assert_true(st.recs[0].done && !st.recs[0].delivered);
    assert_non_null(strstr(st.recs[0].error, "redirect"));
}

static void test_refused_connection_fails_with_error(void **state)
{
    struct notify_config cfg = {.max_attempts = 2, .initial_backoff_ms = 10};
    struct notify_stats stats;
    struct notifier *n;
    char url[128];
    int port, fd;

    (void)state;
    fd = bound_socket(0, &port); /* bound, never listening: connections are refused */
    store_reset(1);
    url_for(url, sizeof(url), port, "/hook");
    store_add(url, "{}", 2);
    n = start(&cfg);
    wait_for(all_done, "the refused delivery to be given up");
    notify_get_stats(n, &stats);
    notify_destroy(n);
    close(fd);

    assert_int_equal(st.n_recs, 2);
    for (size_t i = 0; i < 2; i++) {
        assert_int_equal(st.recs[i].status, 0);
        assert_true(st.recs[i].has_error);
        assert_true(strlen(st.recs[i].error) > 0);
    }
    assert_true(st.recs[1].done && !st.recs[1].delivered);
    assert_int_equal(stats.attempts_failed, 2);
    assert_int_equal(stats.given_up, 1);
}

static void test_bad_scheme_given_up_at_once(void **state)
{
    struct notify_config cfg = {.initial_backoff_ms = 10};
    struct notify_stats stats;
    struct notifier *n;
    char url[128];

    (void)state;
    store_reset(1);
    receiver_reset(NULL, 0, 200);
    snprintf(url, sizeof(url), "ftp://127.0.0.1:%d/hook", rx.port);
    store_add(url, "{}", 2);
    store_add("file:///etc/passwd", "{}", 2);
    store_add("127.0.0.1/no-scheme", "{}", 2);
    n = start(&cfg);
    wait_for(all_done, "the bad urls to be given up");
    /* and a good one still goes through afterwards */
    url_for(url, sizeof(url), rx.port, "/hook");
    store_add(url, "{\"ok\":1}", 8);
    notify_kick(n);
    wait_for(all_done, "the good delivery after the bad ones");
    notify_get_stats(n, &stats);
    notify_destroy(n);

    assert_int_equal(st.n_recs, 4);
    for (size_t i = 0; i < 3; i++) {
        assert_int_equal(st.rows[i].attempts, 1);
        assert_true(st.rows[i].done && !st.rows[i].delivered);
    }
    for (size_t i = 0; i < st.n_recs; i++) {
        if (st.recs[i].id == 103) {
            assert_true(st.recs[i].delivered);
        } else {
            assert_int_equal(st.recs[i].status, 0);
            assert_true(st.recs[i].done);
            assert_non_null(strstr(st.recs[i].error, "http://"));
        }
    }
    assert_int_equal(receiver_count(), 1);
    assert_string_equal(rx.seen[0].event_id, "evt_103");
    assert_int_equal(stats.given_up, 3);
    assert_int_equal(stats.delivered, 1);
}

/* --webhook-hosts: what a URL may name, and a delivery to another host given up unsent. */
static void test_allowed_hosts(void **state)
{
    struct notify_config cfg = {.initial_backoff_ms = 10};
    struct notifier *n;
    struct err e = {0};
    char url[128];

    (void)state;
    assert_int_equal(notify_set_allowed_hosts("hooks.example.com, .corp.example ,127.0.0.1", &e),
                     0);
    assert_int_equal(notify_check_url("https://hooks.example.com/x", &e), 0);
    assert_int_equal(notify_check_url("https://HOOKS.Example.com:8443/x?y=1", &e), 0);
    assert_int_equal(notify_check_url("http://a.b.corp.example/x", &e), 0);
    assert_int_equal(notify_check_url("http://127.0.0.1:9/x", &e), 0);
    assert_int_equal(notify_check_url("http://169.254.169.254/latest/meta-data", &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "169.254.169.254"));
    assert_non_null(strstr(e.msg, "--webhook-hosts"));
    assert_int_equal(notify_check_url("http://corp.example.evil.com/", &e), ERR_INVALID);
    assert_int_equal(notify_check_url("http://evilhooks.example.com/", &e), ERR_INVALID);
    assert_int_equal(notify_check_url("http://hooks.example.com@10.0.0.1/", &e), ERR_INVALID);
    assert_int_equal(notify_check_url("ftp://hooks.example.com/", &e), ERR_INVALID);
    assert_int_equal(notify_set_allowed_hosts("http://x/", &e), ERR_INVALID);
    assert_int_equal(notify_set_allowed_hosts("localhost", &e), 0);

    store_reset(1);
    receiver_reset(NULL, 0, 200);
    url_for(url, sizeof(url), rx.port, "/hook"); /* 127.0.0.1: not "localhost" */
    store_add(url, "{}", 2);
    n = start(&cfg);
    wait_for(all_done, "the delivery to a host not allowed to be given up");
    notify_destroy(n);
    assert_int_equal(st.n_recs, 1);
    assert_true(st.recs[0].done && !st.recs[0].delivered);
    assert_non_null(strstr(st.recs[0].error, "--webhook-hosts"));
    assert_int_equal(receiver_count(), 0);

    assert_int_equal(notify_set_allowed_hosts(NULL, &e), 0); /* any host again */
    assert_int_equal(notify_check_url("http://169.254.169.254/", &e), 0);
}

/* ---- where callbacks may go (notify_set_listen()) ---- */

static void expect_refused(const char *url, const char *words)
{
    struct err e = {0};

    if (notify_check_url(url, &e) != ERR_INVALID)
        fail_msg("%s: accepted, expected refused (%s)", url, words);
    if (!strstr(e.msg, "refused") || !strstr(e.msg, words))
        fail_msg("%s: '%s' does not say 'refused' and '%s'", url, e.msg, words);
}

static void expect_accepted(const char *url)
{
    struct err e = {0};

    if (notify_check_url(url, &e) != 0)
        fail_msg("%s: refused: %s", url, e.msg);
}

/* inferd's own address:port in every spelling the text shows, on loopback and beyond it. */
static void test_own_port_refused_by_text(void **state)
{
    static const char *const own[] = {
        "http://127.0.0.1:8000/v2/repository/models/m/unload",
        "http://localhost:8000/",
        "http://LocalHost.:8000/",
        "http://a.b.localhost:8000/",
        "http://0.0.0.0:8000/",
        "http://0:8000/",
        "http://127.1:8000/",
        "http://2130706433:8000/",
        "http://0x7f.0.0.1:8000/",
        "http://017700000001:8000/",
        "http://[::ffff:127.0.0.1]:8000/",
        "http://[::ffff:7f00:1]:8000/",
        "http://[::1]:8000/",
        "http://[::]:8000/",
        "https://user:pw@127.0.0.1:8000/",
        "http://127.0.0.2:8000/",
    };
    struct err e = {0};

    (void)state;
    assert_int_equal(notify_set_listen("127.0.0.1", 8000, &e), 0);
    for (size_t i = 0; i < sizeof(own) / sizeof(own[0]); i++)
        expect_refused(own[i], "where this inferd listens");
    /* on loopback, other loopback ports and private receivers are fine */
    expect_accepted("http://127.0.0.1:8001/hook");
    expect_accepted("http://localhost/hook");
    expect_accepted("http://10.0.0.1:8000/hook");
    expect_accepted("http://hooks.example.com:8000/hook"); /* a name: checked when connecting */
    /* beyond loopback, and --webhook-hosts naming the address: still refused */
    assert_int_equal(notify_set_listen("0.0.0.0", 8000, &e), 0);
    assert_int_equal(notify_set_allowed_hosts("127.0.0.1,localhost", &e), 0);
    expect_refused("http://127.0.0.1:8000/", "where this inferd listens");
    expect_refused("http://localhost:8000/", "where this inferd listens");
    expect_accepted("http://127.0.0.1:8001/");
    assert_int_equal(notify_set_allowed_hosts(NULL, &e), 0);
    assert_int_equal(notify_set_listen("not-an-ip", 8000, &e), ERR_INVALID);
    assert_int_equal(notify_set_listen(NULL, 0, &e), 0);
    expect_accepted("http://127.0.0.1:8000/"); /* no listener known: nothing is its own */
}

/* Beyond loopback: loopback, private, link-local and unspecified addresses need
 * --webhook-hosts; public ones do not. */
static void test_beyond_loopback_by_text(void **state)
{
    static const char *const local[] = {
        "http://127.0.0.1:9/", "http://127.255.0.1/",       "http://localhost:9/",
        "http://10.1.2.3/",    "http://172.16.0.1/",        "http://172.31.255.255/",
        "http://192.168.0.1/", "http://169.254.169.254/",   "http://100.64.0.1/",
        "http://100.127.0.1/", "http://0.0.0.0:9/",         "http://[::1]:9/",
        "http://[fe80::1]/",   "http://[fe80::1%25eth0]/",  "http://[fd00::1]/",
        "http://[fc00::1]/",   "http://[::ffff:10.0.0.1]/", "http://[::]/",
    };
    static const char *const public[] = {
        "http://8.8.8.8/",       "http://172.32.0.1/",         "http://172.15.255.255/",
        "http://100.128.0.1/",   "http://192.169.0.1/",        "http://169.255.0.1/",
        "http://[2001:db8::1]/", "https://hooks.example.com/",
    };
    struct err e = {0};

    (void)state;
    assert_int_equal(notify_set_listen("0.0.0.0", 8000, &e), 0);
    for (size_t i = 0; i < sizeof(local) / sizeof(local[0]); i++)
        expect_refused(local[i], "--webhook-hosts");
    for (size_t i = 0; i < sizeof(public) / sizeof(public[0]); i++)
        expect_accepted(public[i]);
    expect_refused("http://10.1.2.3/", "a private address");
    expect_refused("http://169.254.169.254/", "a link-local address");
    expect_refused("http://127.0.0.1:9/", "a loopback address");
    /* named by --webhook-hosts: allowed */
    assert_int_equal(notify_set_allowed_hosts("127.0.0.1,10.1.2.3,localhost", &e), 0);
    expect_accepted("http://127.0.0.1:9/");
    expect_accepted("http://10.1.2.3/");
    expect_accepted("http://localhost:9/");
    assert_int_equal(notify_check_url("http://192.168.0.1/", &e), ERR_INVALID); /* not named */
    assert_int_equal(notify_set_allowed_hosts(NULL, &e), 0);
    /* a specific non-loopback address is beyond loopback too */
    assert_int_equal(notify_set_listen("192.0.2.10", 8000, &e), 0);
    expect_refused("http://10.1.2.3/", "--host 192.0.2.10");
    expect_refused("http://192.0.2.10:8000/", "where this inferd listens");
    assert_int_equal(notify_set_listen(NULL, 0, &e), 0);
}

/* The connect-time rule, on the address libcurl resolved. */
static void test_connect_rule_on_resolved_addresses(void **state)
{
    struct sockaddr_in in4 = {.sin_family = AF_INET, .sin_port = htons(8000)};
    struct sockaddr_in6 in6 = {.sin6_family = AF_INET6, .sin6_port = htons(8000)};
    struct err e = {0};

    (void)state;
    assert_int_equal(notify_set_listen("127.0.0.1", 8000, &e), 0);
    inet_pton(AF_INET, "127.0.0.1", &in4.sin_addr);
    assert_int_equal(notify_check_connect((struct sockaddr *)&in4, "hooks.example.com", &e),
                     ERR_INVALID);
    assert_non_null(strstr(e.msg, "refused: 127.0.0.1 port 8000"));
    inet_pton(AF_INET6, "::ffff:127.0.0.1", &in6.sin6_addr);
    assert_int_equal(notify_check_connect((struct sockaddr *)&in6, "x", &e), ERR_INVALID);
    inet_pton(AF_INET6, "::1", &in6.sin6_addr);
    assert_int_equal(notify_check_connect((struct sockaddr *)&in6, "x", &e), ERR_INVALID);
    in4.sin_port = htons(8001);
    assert_int_equal(notify_check_connect((struct sockaddr *)&in4, "x", &e), 0);

    assert_int_equal(notify_set_listen("0.0.0.0", 8000, &e), 0);
    assert_int_equal(notify_check_connect((struct sockaddr *)&in4, "rebound.example.com", &e),
                     ERR_INVALID);
    assert_non_null(strstr(e.msg, "loopback"));
    inet_pton(AF_INET, "10.0.0.7", &in4.sin_addr);
    assert_int_equal(notify_check_connect((struct sockaddr *)&in4, "x", &e), ERR_INVALID);
    assert_int_equal(notify_set_allowed_hosts("hooks.corp", &e), 0);
    assert_int_equal(notify_check_connect((struct sockaddr *)&in4, "hooks.corp", &e), 0);
    assert_int_equal(notify_check_connect((struct sockaddr *)&in4, "other.corp", &e), ERR_INVALID);
    inet_pton(AF_INET, "93.184.216.34", &in4.sin_addr);
    assert_int_equal(notify_check_connect((struct sockaddr *)&in4, "x", &e), 0);
    assert_int_equal(notify_set_allowed_hosts(NULL, &e), 0);
    assert_int_equal(notify_set_listen(NULL, 0, &e), 0);
}

/* This machine's name, if it resolves to loopback only (as Debian's /etc/hosts makes it). */
static int loopback_hostname(char *name, size_t size)
{
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *res = NULL;
    int ok = 1;

    if (gethostname(name, size) != 0 || !name[0] || strcasecmp(name, "localhost") == 0 ||
        getaddrinfo(name, NULL, &hints, &res) != 0)
        return 0;
    for (struct addrinfo *a = res; a; a = a->ai_next)
        ok = ok &&
             ((const unsigned char *)&((struct sockaddr_in *)(void *)a->ai_addr)->sin_addr)[0] ==
                 127;
    freeaddrinfo(res);
    return ok;
}

/* A name the text cannot judge resolves to inferd's own port: refused where libcurl connects,
 * before anything reaches the receiver, recorded once and given up. */
static void test_own_port_refused_at_connect(void **state)
{
    struct notify_config cfg = {.initial_backoff_ms = 10};
    struct notifier *n;
    struct err e = {0};
    char name[200], url[300];

    (void)state;
    if (!loopback_hostname(name, sizeof(name)))
        skip();
    store_reset(1);
    receiver_reset(NULL, 0, 200);
    /* the receiver's port plays inferd's own; not known yet when the notifier starts */
    assert_int_equal(notify_set_listen("127.0.0.1", 0, &e), 0);
    snprintf(url, sizeof(url), "http://%s:%d/v2/repository/models/m/unload", name, rx.port);
    store_add(url, "{}", 2);
    n = start(&cfg);
    assert_int_equal(notify_set_listen("127.0.0.1", rx.port, &e), 0);
    notify_kick(n);
    wait_for(all_done, "the delivery to inferd's own port to be refused");
    notify_destroy(n);
    assert_int_equal(st.n_recs, 1);
    assert_true(st.recs[0].done && !st.recs[0].delivered);
    assert_int_equal(st.recs[0].status, 0);
    assert_non_null(strstr(st.recs[0].error, "refused"));
    assert_non_null(strstr(st.recs[0].error, "where this inferd listens"));
    assert_int_equal(receiver_count(), 0);

    /* beyond loopback, the same name to another port: loopback, not named: refused */
    store_reset(1);
    assert_int_equal(notify_set_listen("0.0.0.0", rx.port + 1, &e), 0);
    store_add(url, "{}", 2);
    n = start(&cfg);
    wait_for(all_done, "the delivery to loopback to be refused");
    notify_destroy(n);
    assert_non_null(strstr(st.recs[0].error, "loopback"));
    assert_int_equal(receiver_count(), 0);
    /* and delivered once --webhook-hosts names it */
    store_reset(1);
    assert_int_equal(notify_set_allowed_hosts(name, &e), 0);
    store_add(url, "{}", 2);
    n = start(&cfg);
    wait_for(all_done, "the delivery to a named host");
    notify_destroy(n);
    assert_true(st.recs[0].delivered);
    assert_int_equal(receiver_count(), 1);
    assert_int_equal(notify_set_allowed_hosts(NULL, &e), 0);
    assert_int_equal(notify_set_listen(NULL, 0, &e), 0);
}

static void expect_redacted(const char *url, const char *shown)
{
    char *got = notify_url_redacted(url);

    assert_non_null(got);
    assert_string_equal(got, shown);
    free(got);
}

/* Credentials in a callback URL are shown as ***, in what it returns and in errors. */
static void test_url_redacted(void **state)
{
    struct err e = {0};

    (void)state;
    expect_redacted("http://user:pw@h/x", "http://***@h/x");
    expect_redacted("https://token@h:8443/p?q=a@b#c@d", "https://***@h:8443/p?q=a@b#c@d");
    expect_redacted("http://a@b@h/", "http://***@h/");
    expect_redacted("http://u:p@", "http://***@");
    expect_redacted("u:p@h/x", "***@h/x");
    expect_redacted("http://h/x@y", "http://h/x@y");
    expect_redacted("http://h", "http://h");
    expect_redacted("", "");
    assert_null(notify_url_redacted(NULL));
    assert_int_equal(notify_check_url("ftp://user:s3cret@h/", &e), ERR_INVALID);
    assert_null(strstr(e.msg, "s3cret"));
    assert_non_null(strstr(e.msg, "***@h"));
    assert_int_equal(notify_check_url("http://user:s3cret@", &e), ERR_INVALID);
    assert_null(strstr(e.msg, "s3cret"));
}

/* libcurl reads "http:/u:pw@h" and "http:///u:pw@h" as userinfo where url_redacted() sees
 * none: the first was refused with the URL shown whole, the second accepted (and shown whole in
 * the job's JSON); an '@' after an unencoded '#' was shown too */
static void test_url_userinfo_never_shown(void **state)
{
    static const char *const bad[] = {
        "http:/alice:s3cretpw@example.com/x",    "http:///alice:s3cretpw@example.com/x",
        "HTTPS:///alice:s3cretpw@example.com/x", "http://alice:s3cr#etpw@example.com/",
        "http://alice:s3cr?etpw@example.com/",   "h:/alice:s3cretpw@example.com/",
    };
    struct err e = {0};

    (void)state;
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        assert_int_equal(notify_check_url(bad[i], &e), ERR_INVALID);
        if (strstr(e.msg, "s3cr"))
            fail_msg("%s: the password is in '%s'", bad[i], e.msg);
    }
    assert_int_equal(notify_check_url("http:///alice:s3cretpw@example.com/x", &e), ERR_INVALID);
    assert_string_equal(e.msg, "expected a host right after http:// or https://");
    /* what url_redacted() surely masks is still shown */
    assert_int_equal(notify_check_url("ftp://user:s3cret@h/", &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "ftp://***@h/"));
}

#define N_MANY 50

/* 50 at once through 8 slots, without next_due (the 200 ms look): each arrives exactly once. */
static void test_fifty_arrive_exactly_once(void **state)
{
    struct notify_config cfg = {.secret = "k", .max_in_flight = 8, .initial_backoff_ms = 10};
    int hits[N_MANY] = {0};
    struct notify_stats stats;
    struct notifier *n;
    char url[128], body[64];

    (void)state;
    store_reset(0);
    receiver_reset(NULL, 0, 200);
    url_for(url, sizeof(url), rx.port, "/hook");
    for (int i = 0; i < N_MANY; i++) {
        int len = snprintf(body, sizeof(body), "{\"job\":%d}", i);
        store_add(url, body, (size_t)len);
    }
    n = start(&cfg);
    wait_for(all_done, "all 50 deliveries to be recorded done");
    notify_get_stats(n, &stats);
    notify_destroy(n);

    assert_int_equal(receiver_count(), N_MANY);
    for (size_t i = 0; i < N_MANY; i++) {
        long long id;
        char want[64];
        assert_int_equal(sscanf(rx.seen[i].event_id, "evt_%lld", &id), 1);
        assert_true(id >= 100 && id < 100 + N_MANY);
        hits[id - 100]++;
        snprintf(want, sizeof(want), "{\"job\":%lld}", id - 100);
        assert_string_equal(rx.seen[i].body, want);
    }
    for (int i = 0; i < N_MANY; i++) {
        assert_int_equal(hits[i], 1);
        assert_int_equal(st.rows[i].attempts, 1);
        assert_true(st.rows[i].delivered);
    }
    assert_int_equal(stats.delivered, N_MANY);
    assert_int_equal(st.bad_calls, 0);
}

/* A failed take only delays; a failed record keeps the attempt's outcome until the store takes
 * it, and the delivery is not sent again meanwhile (issue 13: a full disk made each webhook
 * be sent once a second). */
static void test_store_failures_delay_only(void **state)
{
    struct notify_config cfg = {.initial_backoff_ms = 10};
    struct notifier *n;
    char url[128];

    (void)state;
    store_reset(1);
    receiver_reset(NULL, 0, 200);
    st.fail_takes = 1;
    st.fail_records = 2;
    url_for(url, sizeof(url), rx.port, "/hook");
    store_add(url, "{}", 2);
    n = start(&cfg);
    wait_for(all_done, "the delivery after the store recovered");
    notify_destroy(n);

    assert_int_equal(receiver_count(), 1);
    assert_int_equal(st.n_recs, 1);
    assert_true(st.recs[0].delivered);
    assert_int_equal(st.recs[0].status, 200);
    assert_int_equal(st.bad_calls, 0);
}

/* Attempts that fail and cannot be recorded either: the receiver still sees max_attempts POSTs,
 * each recorded once, in order, the last one giving up. */
static void test_unrecorded_attempts_keep_the_budget(void **state)
{
    struct notify_config cfg = {.initial_backoff_ms = 10, .max_attempts = 3};
    struct notifier *n;
    char url[128];

    (void)state;
    store_reset(1);
    receiver_reset(NULL, 0, 500);
    st.fail_records = 2; /* the first attempt's record fails twice (a second apart) */
    url_for(url, sizeof(url), rx.port, "/hook");
    store_add(url, "{}", 2);
    n = start(&cfg);
    wait_for(all_done, "the delivery to be given up");
    notify_destroy(n);

    assert_int_equal(receiver_count(), 3);
    assert_int_equal(st.n_recs, 3);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(st.recs[i].status, 500);
        assert_false(st.recs[i].delivered);
        assert_int_equal(st.recs[i].done, i == 2);
    }
    assert_int_equal(st.rows[0].attempts, 3);
    assert_int_equal(st.bad_calls, 0);
}

/* A receiver that accepts the connection but never answers: destroy returns without waiting for
 * the 10 s timeout, and records nothing, so the delivery stays pending for the next run. */
static void test_destroy_abandons_in_flight(void **state)
{
    struct notify_config cfg = {0};
    struct notifier *n;
    char url[128];
    int port, fd;

    (void)state;
    fd = bound_socket(1, &port);
    store_reset(1);
    url_for(url, sizeof(url), port, "/hook");
    store_add(url, "{}", 2);
    n = start(&cfg);
    wait_for(took_something, "the delivery to be taken");
    notify_destroy(n);
    close(fd);

    assert_int_equal(st.n_recs, 0);
    assert_false(st.rows[0].done);
    assert_int_equal(st.rows[0].attempts, 0);
}

static void test_bad_config_is_rejected(void **state)
{
    struct notify_store store = {.take_due = fake_take_due, .record = fake_record};
    struct notify_config cfg = {.max_attempts = -1};
    struct notifier *n = (struct notifier *)&cfg;
    struct err e = {0};

    (void)state;
    assert_int_equal(notify_create(&cfg, &store, &n, &e), ERR_INVALID);
    assert_null(n);
    assert_non_null(strstr(e.msg, "notify.max_attempts"));
    cfg = (struct notify_config){.initial_backoff_ms = 5000, .max_backoff_ms = 1000};
    assert_int_equal(notify_create(&cfg, &store, &n, &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "notify.initial_backoff_ms"));
    cfg = (struct notify_config){.max_in_flight = 100000};
    assert_int_equal(notify_create(&cfg, &store, &n, &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "notify.max_in_flight"));
    cfg = (struct notify_config){0};
    store.record = NULL;
    assert_int_equal(notify_create(&cfg, &store, &n, &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "record"));
    /* a good config still works afterwards */
    store.record = fake_record;
    store_reset(1);
    assert_int_equal(notify_create(&cfg, &store, &n, &e), 0);
    notify_destroy(n);
    notify_destroy(NULL);
}

/* ---- setup ---- */

static int receiver_start(void **state)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    const union MHD_DaemonInfo *info;

    (void)state;
    rx.daemon = MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_POLL, 0, NULL, NULL,
                                 on_request, NULL, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&a,
                                 MHD_OPTION_NOTIFY_COMPLETED, on_completed, NULL, MHD_OPTION_END);
    if (!rx.daemon)
        return -1;
    info = MHD_get_daemon_info(rx.daemon, MHD_DAEMON_INFO_BIND_PORT);
    if (!info || info->port == 0)
        return -1;
    rx.port = info->port;
    return 0;
}

static int receiver_stop(void **state)
{
    (void)state;
    MHD_stop_daemon(rx.daemon);
    receiver_reset(NULL, 0, 200);
    store_reset(0);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sign_rfc4231_case2),
        cmocka_unit_test(test_delivers_exact_body_signed),
        cmocka_unit_test(test_kick_delivers_unsigned),
        cmocka_unit_test(test_500_twice_then_200),
        cmocka_unit_test(test_always_failing_is_given_up),
        cmocka_unit_test(test_redirect_is_not_followed),
        cmocka_unit_test(test_refused_connection_fails_with_error),
        cmocka_unit_test(test_bad_scheme_given_up_at_once),
        cmocka_unit_test(test_allowed_hosts),
        cmocka_unit_test(test_own_port_refused_by_text),
        cmocka_unit_test(test_beyond_loopback_by_text),
        cmocka_unit_test(test_connect_rule_on_resolved_addresses),
        cmocka_unit_test(test_own_port_refused_at_connect),
        cmocka_unit_test(test_url_redacted),
        cmocka_unit_test(test_url_userinfo_never_shown),
        cmocka_unit_test(test_fifty_arrive_exactly_once),
        cmocka_unit_test(test_store_failures_delay_only),
        cmocka_unit_test(test_unrecorded_attempts_keep_the_budget),
        cmocka_unit_test(test_destroy_abandons_in_flight),
        cmocka_unit_test(test_bad_config_is_rejected),
    };

    /* libcurl honours these even for 127.0.0.1; the receiver must be reached directly */
    unsetenv("http_proxy");
    unsetenv("all_proxy");
    unsetenv("ALL_PROXY");
    return cmocka_run_group_tests(tests, receiver_start, receiver_stop);
}
