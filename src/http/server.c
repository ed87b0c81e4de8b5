/*
 * server.c: the HTTP server: connection life cycle, routing and the handlers.
 *
 * Thread map:
 *   HTTP threads (libmicrohttpd's pool, epoll each)  read the body, route, decode and validate,
 *       suspend the connection and hand the request to the model's batcher. They never run a
 *       model, so no thread is held per in-flight request. They also run the connection
 *       guard's accept and notify callbacks (conns.c).
 *   batcher threads (model/batcher.c)  run the backend, encode the response into the request's
 *       context and resume the connection; the HTTP thread then sends it.
 *   the guard's sweeper (conns.c)  closes connections past their deadlines (shutdown(2) only).
 *   main thread  waits for signals (main.c) and calls http_server_stop().
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
#include <jansson.h>
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
static void count_request(struct req *r)
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
    ret = MHD_queue_response(r->conn, (unsigned)r->status, resp);
    MHD_destroy_response(resp);
    count_request(r);
    return ret;
}

enum MHD_Result http_reply_error(struct req *r, int code, const char *fmt, ...)
{
    char msg[512];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    http_set_error(r, code, msg);
    return send_reply(r);
}

static enum MHD_Result reply_json(struct req *r, int status, struct buf *json)
{
    buf_release(&r->out);
    r->out = *json;
    *json = (struct buf){0};
    r->status = status;
    r->json_len = -1;
    return send_reply(r);
}

void http_finish_async(struct req *r)
{
    r->ready_ns = clock_mono_ns();
    atomic_store(&r->state, REQ_READY);
    MHD_resume_connection(r->conn);
}

static void run_deferred(void *arg)
{
    struct req *r = arg;
    r->deferred(r);
}

enum MHD_Result http_defer(struct req *r, void (*fn)(struct req *r))
{
    atomic_store(&r->state, REQ_WAITING);
    MHD_suspend_connection(r->conn);
    r->deferred = fn;
    iopool_run(r->srv->io, run_deferred, r);
    return MHD_YES;
}

/* ---- inference ---- */

/* Runs on a batcher thread (or the sweeper): encode, then wake the HTTP thread. */
static void infer_done(struct batch_item *item, int rc, const struct err *e)
{
    struct req *r = item->ctx;

    if (rc == ERR_CANCELLED && atomic_load(&r->srv->draining)) {
        /* stopped by http_server_stop(), not by the client */
        http_set_error(r, ERR_UNAVAILABLE, "inferd is shutting down: the request was stopped");
        r->retry_after_s = 5;
    } else if (rc != 0) {
        http_set_error(r, rc, e->msg);
    } else {
        uint64_t t0 = clock_mono_ns();
        int enc;
        buf_release(&r->out);
        r->json_len = -1;
        if (r->kind == KIND_V1)
            enc = codec_encode_v1(r->infer, &r->out);
        else
            enc = codec_encode_result(r->infer, r->model->name, r->model->version_str, &r->out,
                                      &r->json_len);
        metrics_stat(r->model->stats, METRICS_STAT_COMPUTE_OUTPUT, clock_mono_ns() - t0);
        if (enc != 0)
            http_set_error(r, ERR_NOMEM, "out of memory encoding the response");
        else
            r->status = 200;
    }
    metrics_inflight_add(r->model->metrics, -1);
    count_request(r);
    /* the watchdog measures from here: without it, every answer looked overdue and got a
     * second resume, which under load made MHD answer a kept-alive request twice */
    r->ready_ns = clock_mono_ns();
    atomic_store(&r->state, REQ_READY);
    MHD_resume_connection(r->conn);
}

static int parse_version(const char *s, int64_t *out)
{
    char *end;
    long long v;

    errno = 0;
    v = strtoll(s, &end, 10);
    if (errno || *end || end == s || v < 1)
        return -1;
    *out = v;
    return 0;
}

static int64_t header_int(struct MHD_Connection *conn, const char *name, int *bad)
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

static enum MHD_Result handle_infer(struct req *r, const char *name, const char *version,
                                    enum req_kind kind)
{
    struct http_server *srv = r->srv;
    const union MHD_ConnectionInfo *ci;
    struct err e = {0};
    int64_t v = 0, json_len;
    uint64_t timeout_us, decode_ns;
    int bad, rc;

    r->kind = kind;
    if (atomic_load(&srv->draining))
        return http_reply_error(r, ERR_UNAVAILABLE, "inferd is shutting down");
    if (version && parse_version(version, &v) != 0)
        return http_reply_error(r, ERR_NOT_FOUND, "model '%s' has no version '%s'", name, version);
    rc = registry_acquire(srv->reg, name, v, &r->model, &e);
    if (rc != 0)
        return http_reply_error(r, rc, "%s", e.msg);
    decode_ns = clock_mono_ns();
    if (kind == KIND_V1) {
        rc = codec_decode_v1(r->body.data ? r->body.data : "", r->body.len,
                             r->model->info.n_inputs ? r->model->info.inputs[0].name : "input__0",
                             &r->model->features, &r->infer, &e);
    } else {
        json_len = header_int(r->conn, "Inference-Header-Content-Length", &bad);
        if (bad)
            return http_reply_error(r, ERR_INVALID,
                                    "Inference-Header-Content-Length: expected a byte count");
        rc = codec_decode_for_model(&r->model->info, r->body.data ? r->body.data : "", r->body.len,
                                    json_len, CODEC_FROM_CLIENT, &r->infer, &e);
    }
    if (rc == 0)
        rc = tensor_check_inputs(r->infer, &r->model->info, &e);
    if (rc != 0) {
        metrics_stat(r->model->stats, METRICS_STAT_FAIL, clock_mono_ns() - decode_ns);
        return http_reply_error(r, rc, "model '%s': %s", name, e.msg);
    }
    if (kind == KIND_V2) {
        jobs_parse_prefer(MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, "Prefer"),
                          &r->prefer_async, &r->wait_ms);
        if (r->prefer_async)
            return jobs_submit_infer(r); /* checked: now it becomes a job */
    }
    buf_release(&r->body); /* decoded: the raw bytes are no longer needed */
    metrics_stat(r->model->stats, METRICS_STAT_COMPUTE_INPUT, clock_mono_ns() - decode_ns);

    timeout_us =
        r->infer->timeout_us ? r->infer->timeout_us : (uint64_t)r->model->default_timeout_us;
    r->item = (struct batch_item){
        .req = r->infer,
        .deadline_ns = timeout_us ? r->start_ns + timeout_us * 1000 : 0,
        .received_ns = decode_ns, /* the body is in: from here on the time is inferd's */
        .client_fd = -1,
        .done = infer_done,
        .ctx = r,
    };
    ci = MHD_get_connection_info(r->conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (ci)
        r->item.client_fd = ci->connect_fd;
    /* an HTTP/1.1 client must read a 1xx before its answer (RFC 9110 section 15.2), so one
     * tells a half-closed client (which reads it) from one that closed (which resets). Not over
     * TLS: raw bytes on the socket would corrupt the TLS stream, and a TLS client does not
     * half-close (it ends with close_notify), so there the end of its side is a hang-up. */
    if (r->http11 && !r->srv->tls) {
        static const char probe[] = "HTTP/1.1 100 Continue\r\n\r\n";
        r->item.eof_probe = probe;
        r->item.eof_probe_len = sizeof(probe) - 1;
    }
    /* suspend before handing over: the batch may finish before this function returns */
    atomic_store(&r->state, REQ_WAITING);
    metrics_inflight_add(r->model->metrics, 1);
    MHD_suspend_connection(r->conn);
    rc = batcher_submit(r->model->batcher, &r->item, &e);
    if (rc != 0) {
        metrics_stat(r->model->stats, METRICS_STAT_FAIL, clock_mono_ns() - decode_ns);
        infer_done(&r->item, rc, &e);
    }
    return MHD_YES;
}

/* ---- metadata, health, repository ---- */

/* ,"parameters":{"feature_names":[...],"feature_types":[...]} of a model's first input */
static int append_features(struct buf *b, const struct features *f)
{
    int rc = buf_puts(b, ",\"parameters\":{\"feature_names\":[");

    for (size_t i = 0; rc == 0 && i < f->n; i++)
        if ((rc = i ? buf_puts(b, ",") : 0) == 0)
            rc = buf_json_string(b, f->names[i]);
    if (rc == 0 && f->types)
        rc = buf_puts(b, "],\"feature_types\":[");
    for (size_t i = 0; rc == 0 && f->types && i < f->n; i++)
        if ((rc = i ? buf_puts(b, ",") : 0) == 0)
            rc = buf_json_string(b, f->types[i]);
    return rc ? rc : buf_puts(b, "]}");
}

/* `f`: the model's feature names, shown with the first tensor (NULL for outputs) */
static int append_io(struct buf *b, const struct inferd_tensor *t, size_t n,
                     const struct features *f)
{
    int rc = buf_puts(b, "[");

    for (size_t i = 0; rc == 0 && i < n; i++) {
        rc = buf_puts(b, i ? ",{\"name\":" : "{\"name\":");
        if (rc == 0)
            rc = buf_json_string(b, t[i].name);
        if (rc == 0)
            rc = buf_printf(b, ",\"datatype\":\"%s\",\"shape\":[",
                            tensor_datatype_name(t[i].datatype));
        for (int d = 0; rc == 0 && d < t[i].n_dims; d++)
            rc = buf_printf(b, "%s%lld", d ? "," : "", (long long)t[i].shape[d]);
        if (rc == 0)
            rc = buf_puts(b, "]");
        if (rc == 0 && i == 0 && f && f->n > 0)
            rc = append_features(b, f);
        if (rc == 0)
            rc = buf_puts(b, "}");
    }
    return rc ? rc : buf_puts(b, "]");
}

static enum MHD_Result handle_model_meta(struct req *r, const char *name, const char *version,
                                         int ready_only)
{
    struct buf b = {0};
    struct model *m = NULL;
    struct err e = {0};
    int64_t v = 0;
    int rc;

    if (version && parse_version(version, &v) != 0)
        return http_reply_error(r, ERR_NOT_FOUND, "model '%s' has no version '%s'", name, version);
    rc = registry_acquire(r->srv->reg, name, v, &m, &e);
    if (rc != 0)
        return http_reply_error(r, rc, "%s", e.msg);
    rc = buf_puts(&b, "{\"name\":");
    if (rc == 0)
        rc = buf_json_string(&b, m->name);
    if (rc == 0 && ready_only)
        rc = buf_puts(&b, ",\"ready\":true}");
    else if (rc == 0) {
        rc = buf_printf(&b, ",\"versions\":[\"%s\"],\"platform\":", m->version_str);
        if (rc == 0)
            rc = buf_json_string(&b, m->info.platform ? m->info.platform : m->api->name);
        if (rc == 0)
            rc = buf_puts(&b, ",\"inputs\":");
        if (rc == 0)
            rc = append_io(&b, m->info.inputs, m->info.n_inputs, &m->features);
        if (rc == 0)
            rc = buf_puts(&b, ",\"outputs\":");
        if (rc == 0)
            rc = append_io(&b, m->info.outputs, m->info.n_outputs, NULL);
        if (rc == 0)
            rc = buf_puts(&b, "}");
    }
    model_release(m);
    if (rc != 0) {
        buf_release(&b);
        return http_reply_error(r, ERR_NOMEM, "out of memory");
    }
    return reply_json(r, 200, &b);
}

static enum MHD_Result reply_text(struct req *r, int status, const char *json)
{
    struct buf b = {0};

    if (buf_puts(&b, json) != 0)
        return http_reply_error(r, ERR_NOMEM, "out of memory");
    return reply_json(r, status, &b);
}

/* On the I/O pool: loading a model reads files and may take seconds. */
static void do_repository(struct req *r)
{
    struct err e = {0};
    int rc = r->repo_load ? registry_load(r->srv->reg, r->repo_model, &e)
                          : registry_unload(r->srv->reg, r->repo_model, &e);

    buf_release(&r->out);
    r->json_len = -1;
    if (rc != 0) {
        http_set_error(r, rc, e.msg);
    } else if (buf_puts(&r->out, "{}") != 0) {
        http_set_error(r, ERR_NOMEM, "out of memory");
    } else {
        r->status = 200;
    }
    http_finish_async(r);
}

static enum MHD_Result handle_repository(struct req *r, const char *name, const char *action)
{
    if (strcmp(action, "load") != 0 && strcmp(action, "unload") != 0)
        return http_reply_error(r, ERR_NOT_FOUND, "no repository action '%s' (load or unload)",
                                action);
    if (strlen(name) >= sizeof(r->repo_model))
        return http_reply_error(r, ERR_NOT_FOUND, "no model folder '%.64s...'", name);
    snprintf(r->repo_model, sizeof(r->repo_model), "%s", name);
    r->repo_load = strcmp(action, "load") == 0;
    return http_defer(r, do_repository);
}

/* On the I/O pool: the async part reads the job store, which HTTP threads never wait on. */
static void render_metrics(struct req *r)
{
    buf_release(&r->out);
    if (metrics_render(&r->out) != 0 || jobs_metrics(r->srv, &r->out) != 0 ||
        conns_metrics(r->srv->guard, &r->out) != 0) {
        http_set_error(r, ERR_NOMEM, "out of memory");
    } else {
        r->status = 200;
        r->json_len = -1;
        r->content_type = "text/plain; version=0.0.4; charset=utf-8";
    }
    http_finish_async(r);
}

static enum MHD_Result handle_metrics(struct req *r)
{
    return http_defer(r, render_metrics);
}

/* Triton's statistics extension: every version loaded since start (name NULL: every model). */
static enum MHD_Result handle_stats(struct req *r, const char *name, const char *version)
{
    struct buf b = {0};
    int64_t v = 0;
    int rc;

    if (version && parse_version(version, &v) != 0)
        return http_reply_error(r, ERR_NOT_FOUND, "model '%s' has no version '%s'", name, version);
    rc = metrics_stats_render(name, v, &b);
    if (rc == 0)
        return reply_json(r, 200, &b);
    buf_release(&b);
    if (rc == ERR_NOT_FOUND && v)
        return http_reply_error(r, rc, "model '%s' has no version %lld loaded since start", name,
                                (long long)v);
    if (rc == ERR_NOT_FOUND)
        return http_reply_error(r, rc, "unknown model '%s': no version loaded since start", name);
    return http_reply_error(r, ERR_NOMEM, "out of memory");
}

/* ---- routing ---- */

/* Splits "/a/b/c" into at most `max` segments (copied into `store`). Returns the count. */
static int split_path(const char *url, char *store, size_t store_len, char **seg, int max)
{
    int n = 0;

    snprintf(store, store_len, "%s", url);
    for (char *p = store; *p && n < max + 1;) {
        while (*p == '/')
            *p++ = '\0';
        if (!*p)
            break;
        seg[n++] = p;
        while (*p && *p != '/')
            p++;
    }
    return n;
}

static enum MHD_Result route_models(struct req *r, int is_get, char **seg, int n)
{
    /* seg: v2 models {name} [versions {v}] [infer|ready] */
    const char *name = seg[2], *version = NULL, *tail = NULL;
    int i = 3;

    if (n >= 5 && strcmp(seg[3], "versions") == 0) {
        version = seg[4];
        i = 5;
    }
    if (n == i + 1)
        tail = seg[i];
    else if (n != i)
        return http_reply_error(r, ERR_NOT_FOUND, "no route for this path");
    if (!tail && is_get)
        return handle_model_meta(r, name, version, 0);
    if (tail && strcmp(tail, "ready") == 0 && is_get)
        return handle_model_meta(r, name, version, 1);
    if (tail && strcmp(tail, "stats") == 0 && is_get)
        return handle_stats(r, name, version);
    if (tail && strcmp(tail, "infer") == 0 && !is_get)
        return handle_infer(r, name, version, KIND_V2);
    return http_reply_error(r, ERR_NOT_FOUND, "no route for this method and path");
}

static enum MHD_Result route(struct req *r, const char *method, const char *url)
{
    char store[1024], *seg[8];
    int is_get = strcmp(method, "GET") == 0, is_post = strcmp(method, "POST") == 0;
    int is_delete = strcmp(method, "DELETE") == 0;
    int n;

    /* a callback_url pointed at an inferd API (this one from another inferd process on this
     * host, or any other): inferd never acts on a webhook delivery, whatever its path */
    if (MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, "X-Inferd-Event-Id"))
        return http_reply_error(r, ERR_INVALID,
                                "this is an inferd webhook delivery (X-Inferd-Event-Id); the "
                                "inferd API does not act on webhooks");
    if (strlen(url) >= sizeof(store))
        return http_reply_error(r, ERR_NOT_FOUND, "path too long");
    n = split_path(url, store, sizeof(store), seg, 7);
    if (r->srv->cfg.worker_only && !(n == 1 && is_get && strcmp(seg[0], "metrics") == 0) &&
        !(n == 3 && is_get && strcmp(seg[0], "v2") == 0 && strcmp(seg[1], "health") == 0))
        return http_reply_error(r, ERR_NOT_FOUND,
                                "inferd worker serves only /metrics and /v2/health/*; the API "
                                "is on inferd serve");
    if (n >= 2 && strcmp(seg[0], "v1") == 0 &&
        (strcmp(seg[1], "jobs") == 0 || strcmp(seg[1], "batch-jobs") == 0 ||
         strcmp(seg[1], "workers") == 0))
        return jobs_route(r, is_get, is_post, is_delete, seg, n);
    if (!is_get && !is_post)
        return http_reply_error(r, ERR_NOT_FOUND, "no route for %s %s", method, url);
    if (n == 3 && is_get && strcmp(seg[0], "v2") == 0 && strcmp(seg[1], "health") == 0) {
        if (strcmp(seg[2], "live") == 0)
            return reply_text(r, 200, "{\"live\":true}");
        if (strcmp(seg[2], "ready") == 0) {
            if (atomic_load(&r->srv->draining))
                return http_reply_error(r, ERR_UNAVAILABLE, "inferd is shutting down");
            return reply_text(r, 200, "{\"ready\":true}");
        }
    }
    if (n == 1 && is_get && strcmp(seg[0], "v2") == 0)
        return reply_text(r, 200,
                          "{\"name\":\"inferd\",\"version\":\"" INFERD_VERSION "\","
                          "\"extensions\":[\"binary_tensor_data\",\"model_repository\","
                          "\"statistics\"]}");
    if (n == 1 && is_get && strcmp(seg[0], "metrics") == 0)
        return handle_metrics(r);
    if (n == 3 && is_get && strcmp(seg[0], "v2") == 0 && strcmp(seg[1], "models") == 0 &&
        strcmp(seg[2], "stats") == 0)
        return handle_stats(r, NULL, NULL);
    if (n >= 3 && strcmp(seg[0], "v2") == 0 && strcmp(seg[1], "models") == 0 && n <= 6)
        return route_models(r, is_get, seg, n);
    if (n == 3 && is_post && strcmp(seg[0], "v2") == 0 && strcmp(seg[1], "repository") == 0 &&
        strcmp(seg[2], "index") == 0) {
        struct buf b = {0};
        if (registry_index(r->srv->reg, &b) != 0) {
            buf_release(&b);
            return http_reply_error(r, ERR_NOMEM, "out of memory");
        }
        return reply_json(r, 200, &b);
    }
    if (n == 5 && is_post && strcmp(seg[0], "v2") == 0 && strcmp(seg[1], "repository") == 0 &&
        strcmp(seg[2], "models") == 0)
        return handle_repository(r, seg[3], seg[4]);
    if (n == 3 && is_post && strcmp(seg[0], "v1") == 0 && strcmp(seg[1], "models") == 0) {
        char *colon = strrchr(seg[2], ':');
        if (colon && strcmp(colon, ":predict") == 0) {
            *colon = '\0';
            return handle_infer(r, seg[2], NULL, KIND_V1);
        }
    }
    return http_reply_error(r, ERR_NOT_FOUND, "no route for %s %s", method, url);
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
    return http_reply_error(r, code, "%s", msg);
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
        int64_t declared = header_int(conn, MHD_HTTP_HEADER_CONTENT_LENGTH, &bad);
        if (declared > srv->cfg.max_body_bytes) {
            char msg[128];
            snprintf(msg, sizeof(msg), "request body of %lld bytes, limit is %lld",
                     (long long)declared, (long long)srv->cfg.max_body_bytes);
            return reply_early(r, ERR_TOO_LARGE, msg);
        }
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
        return http_reply_error(r, ERR_TOO_LARGE,
                                "request body larger than the limit of %lld bytes",
                                (long long)srv->cfg.max_body_bytes);
    }
    return route(r, method, url);
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
        log_warn("http", "slow request", "ms=%llu status=%d job=%s termination=%d",
                 (unsigned long long)((clock_mono_ns() - r->start_ns) / 1000000), r->status,
                 r->job_id[0] ? r->job_id : "-", (int)toe);
    pthread_mutex_lock(&srv->live_lock);
    if (r->live_prev)
        r->live_prev->live_next = r->live_next;
    else
        srv->live = r->live_next;
    if (r->live_next)
        r->live_next->live_prev = r->live_prev;
    pthread_mutex_unlock(&srv->live_lock);
    infer_request_destroy(r->infer);
    if (r->json)
        json_decref((json_t *)r->json);
    model_release(r->model);
    buf_release(&r->body);
    buf_release(&r->out);
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
                     "ms=%llu status=%d job=%s",
                     (unsigned long long)((now - r->ready_ns) / 1000000), r->status,
                     r->job_id[0] ? r->job_id : "-");
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
    *bound_port = getsockname(fd, (struct sockaddr *)&addr, &len) == 0 ? ntohs(addr.sin_port)
                                                                       : port;
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
    for (struct req *r = s->live; r; r = r->live_next)
        if (atomic_load(&r->state) == REQ_WAITING && r->kind != KIND_JOB && r->infer)
            batch_item_cancel(&r->item);
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
