/*
 * online.c: the online front door's handlers: health, server and model metadata, statistics,
 * inference (KServe v2 and the v1 predict shape), the model repository and /metrics.
 *
 * Inference decodes and validates on the HTTP thread, then suspends the connection and hands
 * the request to the model's batcher; a batcher thread encodes the answer and resumes it
 * (infer_done). Loading a model and rendering /metrics run on the I/O pool (routes.c).
 */
#define _GNU_SOURCE
#include "http/http_internal.h"
#include "core/buf.h"
#include "core/clock.h"
#include "metrics/metrics.h"
#include "model/batcher.h"
#include "kserve/codec.h"
#include "model/registry.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef INFERD_VERSION
#define INFERD_VERSION "0.0.0"
#endif

/* ---- inference ---- */

enum infer_api { API_V2, API_V1 };

/* An inference in flight, from its decode to its answer: the request's state
 * (http_set_route_state). */
struct infer_call {
    enum infer_api api;
    struct infer_request *infer;
    struct batch_item item; /* in the model's batcher; its ctx is the request */
};

static void infer_call_release(void *state)
{
    struct infer_call *c = state;

    infer_request_destroy(c->infer);
    free(c);
}

/* on stop: asks the model to stop it; it is answered and resumed as usual */
static void infer_call_cancel(void *state)
{
    struct infer_call *c = state;

    batch_item_cancel(&c->item);
}

static const struct route_state_ops infer_call_ops = {infer_call_release, infer_call_cancel};

/* Runs on a batcher thread (or the sweeper): encode, then wake the HTTP thread. */
static void infer_done(struct batch_item *item, int rc, const struct err *e)
{
    struct req *r = item->ctx;
    struct infer_call *c = r->route_state;

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
        if (c->api == API_V1)
            enc = codec_encode_v1(c->infer, &r->out);
        else
            enc = codec_encode_result(c->infer, r->model->name, r->model->version_str, &r->out,
                                      &r->json_len);
        metrics_stat(r->model->stats, METRICS_STAT_COMPUTE_OUTPUT, clock_mono_ns() - t0);
        if (enc != 0)
            http_set_error(r, ERR_NOMEM, "out of memory encoding the response");
        else
            r->status = 200;
    }
    metrics_inflight_add(r->model->metrics, -1);
    http_count_request(r);
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

/* Decodes the body for r->model and checks it against the model's inputs: 0 and *out, or the
 * error set on the request. */
static int decode(struct req *r, const char *name, enum infer_api api, struct infer_request **out)
{
    struct model *m = r->model;
    struct err e = {0};
    int64_t json_len;
    uint64_t decode_ns = clock_mono_ns();
    int bad, rc;

    *out = NULL;
    if (api == API_V1) {
        rc = codec_decode_v1(r->body.data ? r->body.data : "", r->body.len,
                             m->info.n_inputs ? m->info.inputs[0].name : "input__0", &m->features,
                             out, &e);
    } else {
        json_len = http_header_int(r->conn, "Inference-Header-Content-Length", &bad);
        if (bad) {
            http_fail(r, ERR_INVALID, "Inference-Header-Content-Length: expected a byte count");
            return -1;
        }
        rc = codec_decode_for_model(&m->info, r->body.data ? r->body.data : "", r->body.len,
                                    json_len, CODEC_FROM_CLIENT, out, &e);
    }
    if (rc == 0)
        rc = tensor_check_inputs(*out, &m->info, &e);
    if (rc != 0) {
        infer_request_destroy(*out);
        *out = NULL;
        metrics_stat(m->stats, METRICS_STAT_FAIL, clock_mono_ns() - decode_ns);
        http_fail(r, rc, "model '%s': %s", name, e.msg);
        return -1;
    }
    return 0;
}

static enum handled infer(struct req *r, const char *name, const char *version, enum infer_api api)
{
    struct http_server *srv = r->srv;
    const union MHD_ConnectionInfo *ci;
    struct infer_request *decoded = NULL;
    struct infer_call *c;
    struct err e = {0};
    int64_t v = 0;
    uint64_t timeout_us, decode_ns;
    int rc;

    if (atomic_load(&srv->draining))
        return http_fail(r, ERR_UNAVAILABLE, "inferd is shutting down");
    if (version && parse_version(version, &v) != 0)
        return http_fail(r, ERR_NOT_FOUND, "model '%s' has no version '%s'", name, version);
    rc = registry_acquire(srv->reg, name, v, &r->model, &e);
    if (rc != 0)
        return http_fail(r, rc, "%s", e.msg);
    decode_ns = clock_mono_ns();
    if (decode(r, name, api, &decoded) != 0)
        return HANDLED_ANSWER;
    if (api == API_V2) {
        int prefer_async;
        int64_t wait_ms;
        jobs_parse_prefer(MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, "Prefer"),
                          &prefer_async, &wait_ms);
        if (prefer_async) {
            infer_request_destroy(decoded); /* checked: now it becomes a job */
            if (!http_has_scope(r, AUTH_JOBS))
                return http_fail(r, ERR_FORBIDDEN,
                                 "this API key (%s) lacks the 'jobs' scope that Prefer: "
                                 "respond-async needs (it makes a job)",
                                 r->who.name);
            return jobs_submit_infer(r, wait_ms);
        }
    }
    c = calloc(1, sizeof(*c));
    if (!c) {
        infer_request_destroy(decoded);
        return http_fail(r, ERR_NOMEM, "out of memory");
    }
    c->api = api;
    c->infer = decoded;
    buf_release(&r->body); /* decoded: the raw bytes are no longer needed */
    metrics_stat(r->model->stats, METRICS_STAT_COMPUTE_INPUT, clock_mono_ns() - decode_ns);

    timeout_us =
        c->infer->timeout_us ? c->infer->timeout_us : (uint64_t)r->model->default_timeout_us;
    c->item = (struct batch_item){
        .req = c->infer,
        .deadline_ns = timeout_us ? r->start_ns + timeout_us * 1000 : 0,
        .received_ns = decode_ns, /* the body is in: from here on the time is inferd's */
        .client_fd = -1,
        .done = infer_done,
        .ctx = r,
    };
    ci = MHD_get_connection_info(r->conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (ci)
        c->item.client_fd = ci->connect_fd;
    /* an HTTP/1.1 client must read a 1xx before its answer (RFC 9110 section 15.2), so one
     * tells a half-closed client (which reads it) from one that closed (which resets). Not over
     * TLS: raw bytes on the socket would corrupt the TLS stream, and a TLS client does not
     * half-close (it ends with close_notify), so there the end of its side is a hang-up. */
    if (r->http11 && !r->srv->tls) {
        static const char probe[] = "HTTP/1.1 100 Continue\r\n\r\n";
        c->item.eof_probe = probe;
        c->item.eof_probe_len = sizeof(probe) - 1;
    }
    http_set_route_state(r, c, &infer_call_ops);
    /* suspend before handing over: the batch may finish before this function returns */
    atomic_store(&r->state, REQ_WAITING);
    metrics_inflight_add(r->model->metrics, 1);
    MHD_suspend_connection(r->conn);
    rc = batcher_submit(r->model->batcher, &c->item, &e);
    if (rc != 0) {
        metrics_stat(r->model->stats, METRICS_STAT_FAIL, clock_mono_ns() - decode_ns);
        infer_done(&c->item, rc, &e);
    }
    return HANDLED_PENDING;
}

enum handled online_infer(struct req *r)
{
    return infer(r, r->params[0], r->params[1], API_V2);
}

enum handled online_predict(struct req *r)
{
    return infer(r, r->params[0], NULL, API_V1);
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

static enum handled model_meta(struct req *r, const char *name, const char *version, int ready_only)
{
    struct buf b = {0};
    struct model *m = NULL;
    struct err e = {0};
    int64_t v = 0;
    int rc;

    if (version && parse_version(version, &v) != 0)
        return http_fail(r, ERR_NOT_FOUND, "model '%s' has no version '%s'", name, version);
    rc = registry_acquire(r->srv->reg, name, v, &m, &e);
    if (rc != 0)
        return http_fail(r, rc, "%s", e.msg);
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
        return http_fail(r, ERR_NOMEM, "out of memory");
    }
    return http_answer_json(r, 200, &b);
}

enum handled online_model_meta(struct req *r)
{
    return model_meta(r, r->params[0], r->params[1], 0);
}

enum handled online_model_ready(struct req *r)
{
    return model_meta(r, r->params[0], r->params[1], 1);
}

enum handled online_live(struct req *r)
{
    return http_answer_text(r, 200, "{\"live\":true}");
}

enum handled online_ready(struct req *r)
{
    if (atomic_load(&r->srv->draining))
        return http_fail(r, ERR_UNAVAILABLE, "inferd is shutting down");
    return http_answer_text(r, 200, "{\"ready\":true}");
}

enum handled online_server_meta(struct req *r)
{
    return http_answer_text(r, 200,
                            "{\"name\":\"inferd\",\"version\":\"" INFERD_VERSION "\","
                            "\"extensions\":[\"binary_tensor_data\",\"model_repository\","
                            "\"statistics\"]}");
}

enum handled online_repo_index(struct req *r)
{
    struct buf b = {0};

    if (registry_index(r->srv->reg, &b) != 0) {
        buf_release(&b);
        return http_fail(r, ERR_NOMEM, "out of memory");
    }
    return http_answer_json(r, 200, &b);
}

/* On the I/O pool: loading a model reads files and may take seconds. */
static enum handled repository(struct req *r, int load)
{
    const char *name = r->params[0];
    struct err e = {0};
    int rc;

    if (strlen(name) >= 256)
        return http_fail(r, ERR_NOT_FOUND, "no model folder '%.64s...'", name);
    rc = load ? registry_load(r->srv->reg, name, &e) : registry_unload(r->srv->reg, name, &e);

    if (rc != 0)
        return http_fail(r, rc, "%s", e.msg);
    return http_answer_text(r, 200, "{}");
}

enum handled online_repo_load(struct req *r)
{
    return repository(r, 1);
}

enum handled online_repo_unload(struct req *r)
{
    return repository(r, 0);
}

/* On the I/O pool: the async part reads the job store, which HTTP threads never wait on. */
enum handled online_metrics(struct req *r)
{
    buf_release(&r->out);
    if (metrics_render(&r->out) != 0 || jobs_metrics(r->srv, &r->out) != 0 ||
        conns_metrics(r->srv->guard, &r->out) != 0)
        return http_fail(r, ERR_NOMEM, "out of memory");
    r->status = 200;
    r->json_len = -1;
    r->content_type = "text/plain; version=0.0.4; charset=utf-8";
    return HANDLED_ANSWER;
}

/* Triton's statistics extension: every version loaded since start (no {m}: every model). */
enum handled online_stats(struct req *r)
{
    const char *name = r->params[0], *version = r->params[1];
    struct buf b = {0};
    int64_t v = 0;
    int rc;

    if (version && parse_version(version, &v) != 0)
        return http_fail(r, ERR_NOT_FOUND, "model '%s' has no version '%s'", name, version);
    rc = metrics_stats_render(name, v, &b);
    if (rc == 0)
        return http_answer_json(r, 200, &b);
    buf_release(&b);
    if (rc == ERR_NOT_FOUND && v)
        return http_fail(r, rc, "model '%s' has no version %lld loaded since start", name,
                         (long long)v);
    if (rc == ERR_NOT_FOUND)
        return http_fail(r, rc, "unknown model '%s': no version loaded since start", name);
    return http_fail(r, ERR_NOMEM, "out of memory");
}
