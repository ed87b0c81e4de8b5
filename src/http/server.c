/*
 * server.c: the HTTP server's frame: connections, the route table's dispatch, answers, stop.
 * The handlers live in online.c, jobs.c and batch_api.c; their routes in routes.c.
 *
 * A request's life: libmicrohttpd calls on_request() once its headers are in; the frame checks
 * the framing, the declared length and the route (routes.c: method, path, scope, thread) before
 * a byte of the body is read, then reads the body, then runs the route's handler on the
 * route's thread. A handler answers (status and body in the request: the frame sends them) or
 * takes the request on (it suspended the connection; whoever finishes calls
 * http_finish_async(), and libmicrohttpd's next call sends the answer). What a route keeps
 * beyond the frame's fields (an inference in flight, a job and its wait) is its route state
 * (http_set_route_state), which the frame frees when the request completes.
 *
 * Thread map of the whole program (what each kind of thread owns; locks in the order taken):
 *   main thread (main.c)  parses options, starts everything, then waits in sigwait(): SIGHUP
 *       reloads the repository, the API keys (auth/keys.c: its rwlock's write side, for a
 *       pointer swap) and the TLS certificates (tls.c: its leaf lock), SIGTERM/SIGINT call
 *       http_server_stop() and the pools' stops.
 *   HTTP threads (libmicrohttpd's pool, one epoll loop each)  own their connections: read,
 *       match the route, decode and validate, hand off and suspend. They never run a model nor
 *       wait on SQLite, Redis, PostgreSQL, S3 or a webhook. They run the TLS handshakes (tls.c:
 *       lock-free reads of the current certificates) and the key check (the keys' rwlock, read
 *       side, alone). Locks: live_lock (the live list), then the guard's lock (conns.c), each
 *       alone; registry `lock` to take a model reference.
 *   the guard's sweeper (conns.c)  closes connections past their deadlines (shutdown(2) only);
 *       guard lock.
 *   I/O pool (iopool.c, --io-threads)  runs ON_POOL handlers and what follows a commit: job
 *       store calls, storage reads, model loads (registry load_lock then lock), /metrics.
 *   the waiters' timer (jobs.c)  answers long-polls whose deadline passed and runs the
 *       lost-wake-up watchdog; waiters.lock, then (separately) live_lock.
 *   batcher threads (model/batcher.c: one sweeper and `instances` runners per model)  run the
 *       backend, encode the answer into the request and resume the connection; batcher lock,
 *       never held across a backend call. The http backend has one event loop thread per model
 *       (backend/http.c).
 *   queue threads (queue/: sqlite and postgres writer with group commit, postgres sweeper and
 *       listener, redis async/sweeper/subscriber; with rediss://, one TLS pump thread per Redis
 *       connection, queue/redis/tls.c)  own their store connections; they call the
 *       final-state hook (jobs_on_final: waiters.lock only) and the enqueue callbacks, which
 *       never block.
 *   worker threads (worker/worker.c: workers, batch-task thread, heartbeat, autoscaler)  lease
 *       jobs, run them through the batchers, record outcomes; worker pool lock, never held
 *       across a queue call.
 *   the notifier (notify/notify.c)  delivers webhooks from the outbox; the batch scheduler
 *       (batch/batch_jobs.c) starts scheduled runs.
 * Shared across them: the registry (refcounted model snapshots), metrics (their own lock),
 * the queue (thread-safe calls).
 *
 * A suspended connection never times out in libmicrohttpd, so deadlines belong to the batcher
 * (its sweeper answers 504 on time and notices clients that hang up). The client's own pace
 * (idle, headers, body) is bounded by the connection guard, which no trickle can extend.
 *
 * Framing: libmicrohttpd 0.9.75 tolerates messages that a proxy in front may read another way
 * (two Content-Lengths, Content-Length with chunked, whitespace before a colon, folded lines,
 * bare CRs). Such a request is answered 400 and its connection closed (RFC 9112 section 6.3),
 * so no second request can hide in a body (framing.c).
 */
#define _GNU_SOURCE
#include "http/http_internal.h"
#include "core/buf.h"
#include "core/clock.h"
#include "core/log.h"
#include "metrics/metrics.h"
#include "model/batcher.h"
#include "kserve/codec.h"
#include "model/registry.h"

#include <arpa/inet.h>
#include <assert.h>
#include <errno.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* requests slower than this from first byte to completion are logged */
#define SLOW_REQUEST_NS (5ull * 1000000000ull)
/* on stop, after the drain timeout: for the inferences then cancelled to be answered */
#define STOP_GRACE_NS (2ull * 1000000000ull)

#ifndef INFERD_VERSION
#define INFERD_VERSION "0.0.0"
#endif

/* ---- responses ---- */

/* Counts an inference request once, when its answer is decided (even if the client is gone
 * and MHD never sends it). */
void http_count_request(struct req *r)
{
    if (r->model && !r->counted) {
        r->counted = 1;
        metrics_request(r->model->metrics, r->status,
                        (double)(clock_mono_ns() - r->start_ns) / 1e9);
    }
}

void http_set_error(struct req *r, int code, const char *msg)
{
    r->status = err_http_status((enum err_code)code);
    buf_release(&r->out);
    if (codec_encode_error(msg, &r->out) != 0)
        r->status = 500;
    r->json_len = -1;
    if (r->retry_after_s > 0)
        return; /* the caller knows better than the default below */
    if (code == ERR_BUSY || code == ERR_UNAVAILABLE)
        r->retry_after_s = 1;
    if (code == ERR_FULL) /* space comes back when someone frees it: not within a second */
        r->retry_after_s = 10;
}

static enum MHD_Result send_reply(struct req *r)
{
    struct MHD_Response *resp;
    enum MHD_Result ret;
    char num[32];
    size_t len = r->out.len;
    char *data = buf_take(&r->out);

    resp = MHD_create_response_from_buffer(len, data ? data : (char *)"",
                                           data ? MHD_RESPMEM_MUST_FREE : MHD_RESPMEM_PERSISTENT);
    if (!resp) {
        free(data);
        return MHD_NO;
    }
    if (r->json_len >= 0) {
        snprintf(num, sizeof(num), "%lld", (long long)r->json_len);
        MHD_add_response_header(resp, "Inference-Header-Content-Length", num);
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/octet-stream");
    } else {
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE,
                                r->content_type ? r->content_type : "application/json");
    }
    if (r->location[0])
        MHD_add_response_header(resp, MHD_HTTP_HEADER_LOCATION, r->location);
    if (r->retry_after_s > 0) {
        snprintf(num, sizeof(num), "%d", r->retry_after_s);
        MHD_add_response_header(resp, MHD_HTTP_HEADER_RETRY_AFTER, num);
    }
    if (r->close_after)
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CONNECTION, "close");
    if (r->www_authenticate)
        MHD_add_response_header(resp, MHD_HTTP_HEADER_WWW_AUTHENTICATE, r->www_authenticate);
    ret = MHD_queue_response(r->conn, (unsigned)r->status, resp);
    MHD_destroy_response(resp);
    http_count_request(r);
    return ret;
}

enum handled http_fail(struct req *r, int code, const char *fmt, ...)
{
    char msg[512];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    http_set_error(r, code, msg);
    return HANDLED_ANSWER;
}

int http_refuse_draining(struct req *r)
{
    if (!atomic_load(&r->srv->draining))
        return 0;
    r->retry_after_s = 5;
    http_fail(r, ERR_UNAVAILABLE, "inferd is shutting down");
    return 1;
}

enum handled http_answer_json(struct req *r, int status, struct buf *json)
{
    buf_release(&r->out);
    r->out = *json;
    *json = (struct buf){0};
    r->status = status;
    r->json_len = -1;
    return HANDLED_ANSWER;
}

enum handled http_answer_text(struct req *r, int status, const char *json)
{
    struct buf b = {0};

    if (buf_puts(&b, json) != 0)
        return http_fail(r, ERR_NOMEM, "out of memory");
    return http_answer_json(r, status, &b);
}

void http_set_route_state(struct req *r, void *state, const struct route_state_ops *ops)
{
    assert(!atomic_load(&r->route_ops));
    r->route_state = state;
    atomic_store(&r->route_ops, ops);
}

void http_finish_async(struct req *r)
{
    r->ready_ns = clock_mono_ns();
    atomic_store(&r->state, REQ_READY);
    MHD_resume_connection(r->conn);
}

int64_t http_header_int(struct MHD_Connection *conn, const char *name, int *bad)
{
    const char *v = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, name);
    char *end;
    long long n;

    *bad = 0;
    if (!v)
        return -1;
    errno = 0;
    n = strtoll(v, &end, 10);
    if (errno || *end || end == v || n < 0) {
        *bad = 1;
        return -1;
    }
    return n;
}

/* ---- the frame: every route's handler runs in it ---- */

static void run_deferred(void *arg)
{
    struct req *r = arg;

    if (r->deferred(r) == HANDLED_ANSWER)
        http_finish_async(r);
}

enum handled http_defer(struct req *r, http_handler fn)
{
    atomic_store(&r->state, REQ_WAITING);
    MHD_suspend_connection(r->conn);
    r->deferred = fn;
    iopool_run(r->srv->io, run_deferred, r);
    return HANDLED_PENDING;
}

static enum MHD_Result keep_value(void *cls, enum MHD_ValueKind kind, const char *key,
                                  const char *value)
{
    struct req *r = cls;
    struct req_value *v = realloc(r->values, (r->n_values + 1) * sizeof(*v));

    if (!v)
        return MHD_NO;
    r->values = v;
    v[r->n_values++] = (struct req_value){kind, key, value};
    return MHD_YES;
}

const char *http_value(struct req *r, enum MHD_ValueKind kind, const char *key)
{
    if (atomic_load(&r->state) != REQ_WAITING)
        return MHD_lookup_connection_value(r->conn, kind, key);
    /* on the pool the connection belongs to its HTTP thread: read the copies */
    for (size_t i = 0; i < r->n_values; i++)
        if (r->values[i].kind == kind && r->values[i].key &&
            (kind == MHD_HEADER_KIND ? strcasecmp(r->values[i].key, key)
                                     : strcmp(r->values[i].key, key)) == 0)
            return r->values[i].value;
    return NULL;
}

/* Runs the matched route's handler on its thread; the request is whole. */
static enum MHD_Result dispatch(struct req *r)
{
    const struct route *rt = r->route;

    if (rt->thread == ON_POOL) {
        MHD_get_connection_values(r->conn, MHD_HEADER_KIND | MHD_GET_ARGUMENT_KIND, keep_value, r);
        http_defer(r, rt->fn);
        return MHD_YES;
    }
    if (rt->fn(r) == HANDLED_ANSWER)
        return send_reply(r);
    return MHD_YES;
}

static unsigned scope_bit(enum route_scope s)
{
    switch (s) {
    case SCOPE_INFER:
        return AUTH_INFER;
    case SCOPE_JOBS:
        return AUTH_JOBS;
    case SCOPE_BATCH:
        return AUTH_BATCH;
    case SCOPE_ADMIN:
        return AUTH_ADMIN;
    case SCOPE_PUBLIC:
    case SCOPE_METRICS:
        break;
    }
    return 0;
}

const char *http_owner(const struct req *r)
{
    return r->srv->cfg.auth && r->authenticated ? r->who.tenant : NULL;
}

const char *http_viewer(const struct req *r)
{
    if (!r->srv->cfg.auth || (r->authenticated && (r->who.scopes & AUTH_ADMIN)))
        return NULL;
    return r->who.tenant; /* "" when unauthenticated: the anonymous tenant's only */
}

int http_has_scope(const struct req *r, unsigned scope)
{
    return !r->srv->cfg.auth || (r->who.scopes & (scope | AUTH_ADMIN)) != 0;
}

/* With keys on: the request's key, against its route's scope (no route: any valid key, so
 * the API's paths are not told to a caller without one). 0, or 401 / 403 in `e`. */
static int check_key(struct req *r, struct err *e)
{
    const struct route *rt = r->route;
    struct auth *a = r->srv->cfg.auth;
    enum auth_result got;
    unsigned need;

    if (!a || (rt && rt->scope == SCOPE_PUBLIC) ||
        (rt && rt->scope == SCOPE_METRICS && !r->srv->cfg.metrics_auth))
        return 0;
    got = auth_check(
        a, MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION),
        &r->who);
    if (got == AUTH_MISSING) {
        r->www_authenticate = "Bearer realm=\"inferd\"";
        return err_set(e, ERR_UNAUTHORIZED,
                       "an API key is required: send Authorization: Bearer KEY (inferd keys add "
                       "makes one)");
    }
    if (got != AUTH_OK) {
        r->www_authenticate = "Bearer realm=\"inferd\", error=\"invalid_token\"";
        return err_set(e, ERR_UNAUTHORIZED,
                       got == AUTH_MALFORMED
                           ? "Authorization: expected Bearer followed by an API key"
                           : "the API key is not valid (unknown or revoked)");
    }
    r->authenticated = 1;
    need = rt ? scope_bit(rt->scope) : 0;
    if (need && !http_has_scope(r, need)) {
        log_info("http", "key without the route's scope", "key=%s scope=%s", r->who.name,
                 http_scope_name(rt->scope));
        return err_set(e, ERR_FORBIDDEN, "this API key (%s) lacks the '%s' scope that %s %s needs",
                       r->who.name, http_scope_name(rt->scope), rt->method, rt->pattern);
    }
    return 0;
}

/* Matches the request to its route once its headers are in: 0, or an error to answer before
 * the body is read. */
static int match_route(struct req *r, const char *method, const char *url, struct err *e)
{
    int path_known;

    /* a callback_url pointed at an inferd API (this one from another inferd process on this
     * host, or any other): inferd never acts on a webhook delivery, whatever its path */
    if (MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, "X-Inferd-Event-Id"))
        return err_set(e, ERR_INVALID,
                       "this is an inferd webhook delivery (X-Inferd-Event-Id); the inferd API "
                       "does not act on webhooks");
    if (strlen(url) >= 1024)
        return err_set(e, ERR_NOT_FOUND, "path too long");
    r->path = strdup(url);
    if (!r->path)
        return err_set(e, ERR_NOMEM, "out of memory");
    r->route = http_route_match(method, r->path, r->params, &path_known);
    if (r->srv->cfg.worker_only && !(r->route && (r->route->flags & ROUTE_WORKER)))
        return err_set(e, ERR_NOT_FOUND,
                       "inferd worker serves only /metrics and /v2/health/*; the API is on inferd "
                       "serve");
    if (check_key(r, e) != 0)
        return e->code;
    if (!r->route && path_known)
        return err_set(e, ERR_NOT_FOUND, "no route for this method and path");
    if (!r->route)
        return err_set(e, ERR_NOT_FOUND, "no route for %.16s %.200s", method, url);
    return 0;
}

/* ---- libmicrohttpd callbacks ---- */

/* Called once a request line is in, before its headers: starts the header deadline and notes
 * a %00 (libmicrohttpd decodes it to a NUL, which would cut the path short). */
static void *on_request_line(void *cls, const char *uri, struct MHD_Connection *conn)
{
    struct http_server *srv = cls;
    struct conn *c = conns_of(conn);

    conns_phase(srv->guard, c, CONN_HEADERS);
    if (uri && strstr(uri, "%00"))
        conns_mark_bad_uri(c);
    return NULL;
}

/* Answers at the first call, before any body is read; the phase turns busy. */
static enum MHD_Result reply_early(struct req *r, int code, const char *msg)
{
    conns_phase(r->srv->guard, r->track, CONN_BUSY);
    http_fail(r, code, "%s", msg);
    return send_reply(r);
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_data_size, void **con_cls)
{
    struct http_server *srv = cls;
    struct req *r = *con_cls;
    struct err e = {0};
    int bad, status;

    if (!r) {
        r = calloc(1, sizeof(*r));
        if (!r)
            return MHD_NO;
        r->srv = srv;
        r->conn = conn;
        r->track = conns_of(conn);
        r->http11 = strcmp(version, MHD_HTTP_VERSION_1_1) == 0;
        r->start_ns = clock_mono_ns();
        r->json_len = -1;
        atomic_fetch_add(&srv->in_flight, 1);
        pthread_mutex_lock(&srv->live_lock);
        r->live_next = srv->live;
        if (srv->live)
            srv->live->live_prev = r;
        srv->live = r;
        pthread_mutex_unlock(&srv->live_lock);
        *con_cls = r;
        conns_phase(srv->guard, r->track, CONN_BODY);
        if (http_check_framing(conn, version, &status, &e) != 0) {
            r->close_after = 1;
            conns_phase(srv->guard, r->track, CONN_BUSY);
            http_set_error(r, e.code, e.msg);
            r->status = status;
            return send_reply(r);
        }
        if (conns_bad_uri(r->track))
            return reply_early(r, ERR_INVALID, "the path holds a NUL byte (%00)");
        int64_t declared = http_header_int(conn, MHD_HTTP_HEADER_CONTENT_LENGTH, &bad);
        if (declared > srv->cfg.max_body_bytes) {
            char msg[128];
            snprintf(msg, sizeof(msg), "request body of %lld bytes, limit is %lld",
                     (long long)declared, (long long)srv->cfg.max_body_bytes);
            return reply_early(r, ERR_TOO_LARGE, msg);
        }
        if (match_route(r, method, url, &e) != 0)
            return reply_early(r, e.code, e.msg);
        return MHD_YES;
    }
    if (atomic_load(&r->state) == REQ_READY)
        return send_reply(r);
    if (atomic_load(&r->state) == REQ_WAITING)
        return MHD_YES; /* spurious call while suspended */
    if (*upload_data_size > 0) {
        if (!r->too_large && r->body.len + *upload_data_size > (size_t)srv->cfg.max_body_bytes)
            r->too_large = 1;
        if (!r->too_large && buf_append(&r->body, upload_data, *upload_data_size) != 0)
            r->too_large = 1;
        conns_body_bytes(r->track, *upload_data_size);
        *upload_data_size = 0;
        return MHD_YES;
    }
    conns_phase(srv->guard, r->track, CONN_BUSY);
    if (!r->settled) {
        /* The request is whole. libmicrohttpd 0.9.75 still watches the socket for reading until
         * this call returns without a response; had the connection been suspended now, its
         * resume would read first, and a client that half-closed its side after its request
         * (shutdown(SHUT_WR), as nc -N does) would lose its answer to that end of stream. So
         * the request is routed on the next call, which libmicrohttpd makes at once. */
        r->settled = 1;
        return MHD_YES;
    }
    if (r->too_large) {
        buf_release(&r->body);
        http_fail(r, ERR_TOO_LARGE, "request body larger than the limit of %lld bytes",
                  (long long)srv->cfg.max_body_bytes);
        return send_reply(r);
    }
    return dispatch(r);
}

/* the request's route pattern, for log lines ("-": none matched) */
static const char *route_of(const struct req *r)
{
    return r->route ? r->route->pattern : "-";
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    struct http_server *srv = cls;
    struct req *r = *con_cls;

    /* the next request on a kept-alive connection begins with an idle deadline; a request
     * libmicrohttpd refused itself (r NULL) ends here too */
    conns_phase(srv->guard, r ? r->track : conns_of(conn), CONN_WAITING);
    if (!r)
        return;
    if (atomic_load(&r->state) == REQ_WAITING)
        log_warn("http", "connection closed while its request was queued", "%s", "");
    else if (clock_mono_ns() - r->start_ns > SLOW_REQUEST_NS)
        log_warn("http", "slow request", "ms=%llu status=%d route=%s id=%s termination=%d",
                 (unsigned long long)((clock_mono_ns() - r->start_ns) / 1000000), r->status,
                 route_of(r), r->params[0] ? r->params[0] : "-", (int)toe);
    pthread_mutex_lock(&srv->live_lock);
    if (r->live_prev)
        r->live_prev->live_next = r->live_next;
    else
        srv->live = r->live_next;
    if (r->live_next)
        r->live_next->live_prev = r->live_prev;
    pthread_mutex_unlock(&srv->live_lock);
    const struct route_state_ops *ops = atomic_load(&r->route_ops);
    if (ops)
        ops->release(r->route_state);
    model_release(r->model);
    buf_release(&r->body);
    buf_release(&r->out);
    free(r->path);
    free(r->values);
    free(r);
    *con_cls = NULL;
    atomic_fetch_sub(&srv->in_flight, 1);
}

/* ---- the lost-wake-up watchdog ---- */

/*
 * Under heavy load, libmicrohttpd 0.9.75 (epoll, thread pool) was seen to leave a connection
 * suspended after MHD_resume_connection(): the answer stayed unsent until the client gave up
 * (30 s). Resuming a connection that is still suspended is harmless, so the waiters' timer
 * resumes again any whose answer has waited this long.
 */
#define WATCHDOG_NS (1000ull * 1000000ull)

void http_watchdog(struct http_server *s)
{
    uint64_t now = clock_mono_ns();

    pthread_mutex_lock(&s->live_lock);
    for (struct req *r = s->live; r; r = r->live_next) {
        const union MHD_ConnectionInfo *ci;
        if (atomic_load(&r->state) != REQ_READY || r->ready_ns > now ||
            now - r->ready_ns < WATCHDOG_NS)
            continue;
        ci = MHD_get_connection_info(r->conn, MHD_CONNECTION_INFO_CONNECTION_SUSPENDED);
        if (ci && ci->suspended == MHD_YES) {
            log_warn("http", "answer ready but connection still suspended: resuming again",
                     "ms=%llu status=%d route=%s id=%s",
                     (unsigned long long)((now - r->ready_ns) / 1000000), r->status, route_of(r),
                     r->params[0] ? r->params[0] : "-");
            r->ready_ns = now;
            MHD_resume_connection(r->conn);
        }
    }
    pthread_mutex_unlock(&s->live_lock);
}

/* ---- life cycle ---- */

/* Warns when the file-descriptor limit cannot hold --max-connections (each takes one). */
static void check_fd_limit(const struct http_config *cfg)
{
    struct rlimit rl;

    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
        rl.rlim_cur < (rlim_t)cfg->max_connections + 64)
        log_warn("http",
                 "--max-connections is above what the file descriptor limit allows: connections "
                 "past it are refused by the kernel",
                 "max_connections=%d file_descriptor_limit=%llu", cfg->max_connections,
                 (unsigned long long)rl.rlim_cur);
}

static void free_server(struct http_server *s)
{
    jobs_waiters_stop(s);
    iopool_destroy(s->io);
    conns_destroy(s->guard);
    tls_destroy(s->tls);
    free(s);
}

int http_listen(const char *host, int port, int reuse_port, int *out, int *bound_port,
                struct err *e)
{
    struct sockaddr_in addr = {0};
    socklen_t len = sizeof(addr);
    int fd, on = 1, saved;

    *out = -1;
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1)
        return err_set(e, ERR_INVALID, "--host: '%s' is not an IPv4 address", host);
    fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return err_set(e, ERR_IO, "cannot create a socket: %s", strerror(errno));
    /* SO_REUSEADDR only lets a restart bind past connections in TIME_WAIT; on Linux it never
     * lets two processes listen on one port. SO_REUSEPORT does, so only when asked. */
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on)) != 0 ||
        (reuse_port && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &on, sizeof(on)) != 0) ||
        bind(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0 || listen(fd, 1024) != 0) {
        saved = errno;
        close(fd);
        if (saved == EADDRINUSE)
            return err_set(e, ERR_IO,
                           "cannot listen on %s:%d: address already in use (another process "
                           "listens on port %d: give this one its own --port, or pass "
                           "--reuse-port to both to share it on purpose)",
                           host, port, port);
        return err_set(e, ERR_IO, "cannot listen on %s:%d: %s", host, port, strerror(saved));
    }
    *bound_port =
        getsockname(fd, (struct sockaddr *)&addr, &len) == 0 ? ntohs(addr.sin_port) : port;
    *out = fd;
    return 0;
}

int http_server_start(const struct http_config *cfg, struct registry *reg, struct queue *q,
                      const struct http_pool *pool, struct notifier *notifier,
                      struct http_server **out, struct err *e)
{
    struct http_server *s = calloc(1, sizeof(*s));
    const union MHD_DaemonInfo *di;
    long n_cpu = sysconf(_SC_NPROCESSORS_ONLN);
    unsigned threads, mhd_limit, tls_flags;
    struct MHD_OptionItem tls_opts[3];
    int rc;

    *out = NULL;
    if (!s) {
        close(cfg->listen_fd);
        return err_set(e, ERR_NOMEM, "out of memory");
    }
    s->cfg = *cfg;
    s->reg = reg;
    pthread_mutex_init(&s->live_lock, NULL);
    s->queue = q;
    if (pool)
        s->pool = *pool;
    s->notifier = notifier;
    if (iopool_create(cfg->io_threads > 0 ? cfg->io_threads : 8, &s->io) != 0 ||
        jobs_waiters_start(s) != 0 || conns_create(cfg, &s->guard) != 0) {
        close(cfg->listen_fd);
        free_server(s);
        return err_set(e, ERR_NOMEM, "cannot start the I/O threads");
    }
    if (cfg->tls_cert && cfg->tls_cert[0] && (rc = tls_create(cfg, &s->tls, e)) != 0) {
        close(cfg->listen_fd);
        free_server(s);
        return rc;
    }
    tls_flags = tls_daemon_options(s->tls, tls_opts);
    if (q)
        queue_on_final(q, jobs_on_final, s);
    check_fd_limit(cfg);
    threads = cfg->threads > 0 ? (unsigned)cfg->threads : (unsigned)(n_cpu > 0 ? n_cpu : 1);
    /* the guard enforces max_connections; libmicrohttpd's own limit (split between its
     * threads) leaves room for connections being closed to make room */
    mhd_limit = (unsigned)cfg->max_connections + (unsigned)cfg->max_connections / 2 + 64 * threads;
    s->daemon = MHD_start_daemon(
        MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_TURBO |
            tls_flags,
        0, conns_accept, s->guard, on_request, s, MHD_OPTION_LISTEN_SOCKET, cfg->listen_fd,
        MHD_OPTION_THREAD_POOL_SIZE, threads, MHD_OPTION_CONNECTION_LIMIT, mhd_limit,
        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)cfg->idle_timeout_s, MHD_OPTION_NOTIFY_COMPLETED,
        on_completed, s, MHD_OPTION_NOTIFY_CONNECTION, conns_notify, s->guard,
        MHD_OPTION_URI_LOG_CALLBACK, on_request_line, s, MHD_OPTION_ARRAY, tls_opts,
        MHD_OPTION_END);
    if (!s->daemon) {
        close(cfg->listen_fd);
        free_server(s);
        return err_set(e, ERR_IO, "cannot start the HTTP server on %s", cfg->host);
    }
    di = MHD_get_daemon_info(s->daemon, MHD_DAEMON_INFO_BIND_PORT);
    s->port = di ? di->port : 0;
    *out = s;
    return 0;
}

int http_server_port(const struct http_server *s)
{
    return s->port;
}

/* Requests still suspended: in a batcher, on the I/O pool or waiting for a commit. */
static int64_t n_waiting(struct http_server *s)
{
    int64_t n = 0;

    pthread_mutex_lock(&s->live_lock);
    for (struct req *r = s->live; r; r = r->live_next)
        n += atomic_load(&r->state) == REQ_WAITING;
    pthread_mutex_unlock(&s->live_lock);
    return n;
}

/* Asks the models to stop every inference still in flight (a request to a stuck upstream ends
 * as soon as its call is aborted); each is answered and resumed as usual. */
static void cancel_inferences(struct http_server *s)
{
    pthread_mutex_lock(&s->live_lock);
    for (struct req *r = s->live; r; r = r->live_next) {
        const struct route_state_ops *ops = atomic_load(&r->route_ops);
        if (atomic_load(&r->state) == REQ_WAITING && ops && ops->cancel)
            ops->cancel(r->route_state);
    }
    pthread_mutex_unlock(&s->live_lock);
}

/* Waits until `until` (clock_mono_ns) for `left(s)` to be 0. */
static void wait_until(struct http_server *s, int64_t (*left)(struct http_server *), uint64_t until)
{
    while (left(s) > 0 && clock_mono_ns() < until) {
        struct timespec ts = {0, 10 * 1000000};
        nanosleep(&ts, NULL);
    }
}

static int64_t n_in_flight(struct http_server *s)
{
    return atomic_load(&s->in_flight);
}

int http_server_stop(struct http_server *s)
{
    uint64_t until;
    MHD_socket fd;
    int64_t stuck;

    if (!s)
        return 0;
    atomic_store(&s->draining, 1);
    jobs_waiters_stop(s); /* long-polls answer now with the job's current state */
    fd = MHD_quiesce_daemon(s->daemon);
    if (fd != MHD_INVALID_SOCKET)
        close(fd);
    until = clock_mono_ns() + (uint64_t)s->cfg.drain_timeout_s * 1000000000ull;
    wait_until(s, n_in_flight, until);
    if (atomic_load(&s->in_flight) > 0)
        log_warn("http", "drain timeout passed with requests still open", "open=%lld",
                 (long long)atomic_load(&s->in_flight));
    /* libmicrohttpd cannot stop with a connection suspended, and would free a request that a
     * model still answers later: stop them, and give them a moment to be answered */
    cancel_inferences(s);
    /* until they are sent, not only answered: a connection resumed with its answer is written
     * on libmicrohttpd's next pass, and stopping the daemon before that closed it unanswered */
    wait_until(s, n_in_flight, clock_mono_ns() + STOP_GRACE_NS);
    stuck = n_waiting(s);
    if (stuck > 0) {
        /* a model that ignores cancellation: leave the server (and what it uses) allocated */
        log_warn("http", "requests still waiting on a model that does not stop; leaving them",
                 "open=%lld", (long long)stuck);
        return (int)stuck;
    }
    MHD_stop_daemon(s->daemon);
    iopool_destroy(s->io);
    conns_destroy(s->guard);
    tls_destroy(s->tls);
    if (s->queue)
        queue_on_final(s->queue, NULL, NULL);
    free(s);
    return 0;
}
