/*
 * http.c: the `http` backend: a model that lives in another server.
 *
 * Each request becomes one call to the upstream: a KServe v2 server (another inferd, Triton,
 * KServe), an OpenAI-compatible completions server, or any JSON-over-HTTP endpoint. inferd's
 * queue, workers, webhooks and batch transform then work in front of a model inferd does not
 * run itself.
 *
 * Threads: execute_async (on the batcher's dispatcher) builds each call and hands it to the
 * model's one event-loop thread, which drives every call through libcurl's multi interface and
 * ends each request with host->request_done. 500 slow calls in flight are 500 sockets and no
 * extra thread; the batcher keeps at most max_concurrency of them started.
 *
 * Failures say what the upstream did, with its URL: no connection, no answer in time and 5xx
 * or 429 answers may pass (retryable, 502/504, honouring Retry-After); other 4xx answers are
 * about the request (not retried; 400, 413 and 422 pass through, the rest become 502).
 */
#define _GNU_SOURCE
#include "backend/backend.h"
#include "core/buf.h"
#include "core/clock.h"
#include "kserve/codec.h"
#include "kserve/tensor.h"

#include <curl/curl.h>
#include <jansson.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#define MAX_RESPONSE_BYTES ((size_t)256 << 20)
#define CANCEL_CHECK_MS 100
#define METADATA_TIMEOUT_MS 10000

enum protocol { PROTO_V2, PROTO_OPENAI, PROTO_JSON };

struct http_model;

/* One upstream call: one request. Owned by the loop thread once handed over. */
struct call {
    struct http_model *m;
    struct inferd_request *req;
    CURL *easy;
    struct buf body;
    struct buf resp;
    json_t *custom_id; /* openai: the document's "custom_id", written with its answer */
    int64_t retry_after_ms;
    int too_large;
    char curl_err[CURL_ERROR_SIZE];
    struct call *next, *prev;
};

struct http_model {
    enum protocol protocol;
    char *url;
    char *upstream_model; /* openai: the "model" field, when the request has none */
    int chat;             /* openai: the url is a chat completions endpoint */
    json_t *forward_keys; /* openai: keys sent although OpenAI's schema lacks them (a set) */
    int forward_all;      /* openai: forward_keys is ["*"] */
    long timeout_ms;
    struct curl_slist *headers;
    struct inferd_tensor inputs[TENSOR_MAX_IO], outputs[TENSOR_MAX_IO]; /* names owned */
    size_t n_inputs, n_outputs;
    /* the event loop */
    CURLM *multi;
    pthread_t thread;
    int thread_started;
    pthread_mutex_t lock;
    struct call *incoming; /* guarded by lock: handed over, not yet added */
    int stopping;          /* guarded by lock */
    struct call *active;   /* loop thread only */
};

static const struct inferd_host *host;

static int fail(char *err, size_t err_len, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int fail(char *err, size_t err_len, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(err, err_len, fmt, ap);
    va_end(ap);
    return -1;
}

static int http_init(const struct inferd_host *h, void **state, char *err, size_t err_len)
{
    host = h;
    *state = NULL;
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
        return fail(err, err_len, "libcurl failed to initialise");
    return 0;
}

/* ---- configuration ---- */

/* Copies `in` with each ${NAME} replaced by the environment's NAME. */
static int expand_env(const char *field, const char *in, char **out, char *err, size_t err_len)
{
    struct buf b = {0};
    const char *p = in;

    *out = NULL;
    while (*p) {
        const char *start = strstr(p, "${"), *end;
        char name[128];
        if (!start) {
            if (buf_puts(&b, p) != 0)
                goto nomem;
            break;
        }
        if (buf_append(&b, p, (size_t)(start - p)) != 0)
            goto nomem;
        end = strchr(start + 2, '}');
        if (!end || end == start + 2 || (size_t)(end - start - 2) >= sizeof(name)) {
            buf_release(&b);
            return fail(err, err_len, "%s: '${' without a variable name and '}'", field);
        }
        memcpy(name, start + 2, (size_t)(end - start - 2));
        name[end - start - 2] = '\0';
        const char *v = getenv(name);
        if (!v) {
            buf_release(&b);
            return fail(err, err_len, "%s: environment variable %s is not set", field, name);
        }
        if (buf_puts(&b, v) != 0)
            goto nomem;
        p = end + 1;
    }
    if (buf_append(&b, "", 0) != 0)
        goto nomem;
    *out = buf_take(&b);
    return 0;
nomem:
    buf_release(&b);
    return fail(err, err_len, "out of memory");
}

static int add_header(struct http_model *m, const char *line, char *err, size_t err_len)
{
    struct curl_slist *l = curl_slist_append(m->headers, line);

    if (!l)
        return fail(err, err_len, "out of memory");
    m->headers = l;
    return 0;
}

static int read_headers(struct http_model *m, json_t *headers, char *err, size_t err_len)
{
    const char *name;
    json_t *v;
    int rc = 0;

    if (add_header(m, "Content-Type: application/json", err, err_len) ||
        add_header(m, "Accept: application/json", err, err_len) ||
        add_header(m, "Expect:", err, err_len)) /* no 100-continue round trip */
        return -1;
    if (!headers)
        return 0;
    if (!json_is_object(headers))
        return fail(err, err_len, "headers: expected an object of strings");
    json_object_foreach (headers, name, v) {
        char field[160], *value = NULL, *line = NULL;
        if (!json_is_string(v))
            return fail(err, err_len, "headers.%.64s: expected a string", name);
        if (!*name || strpbrk(name, ":\r\n "))
            return fail(err, err_len, "headers: '%.64s' is not a header name", name);
        snprintf(field, sizeof(field), "headers.%.64s", name);
        if (expand_env(field, json_string_value(v), &value, err, err_len) != 0)
            return -1;
        if (strpbrk(value, "\r\n")) {
            free(value);
            return fail(err, err_len, "%s: a line break in the value", field);
        }
        if (asprintf(&line, "%s: %s", name, value) < 0)
            line = NULL;
        free(value);
        rc = line ? add_header(m, line, err, err_len) : fail(err, err_len, "out of memory");
        free(line);
        if (rc != 0)
            return rc;
    }
    return 0;
}

/* Reads a list of {name, datatype, shape} (config.json or an upstream's metadata). */
static int read_tensors(const char *field, json_t *list, struct inferd_tensor *out, size_t *n,
                        char *err, size_t err_len)
{
    size_t i;
    json_t *t;

    if (!json_is_array(list) || json_array_size(list) == 0 ||
        json_array_size(list) > TENSOR_MAX_IO)
        return fail(err, err_len, "%s: expected a list of 1 to %d tensors", field, TENSOR_MAX_IO);
    json_array_foreach (list, i, t) {
        json_t *name = json_object_get(t, "name"), *dt = json_object_get(t, "datatype");
        json_t *shape = json_object_get(t, "shape"), *d;
        size_t k;
        if (!json_is_string(name) || !json_is_string(dt) || !json_is_array(shape) ||
            json_array_size(shape) > INFERD_MAX_DIMS)
            return fail(err, err_len, "%s[%zu]: needs a name, a datatype and a shape", field, i);
        out[i].datatype = tensor_datatype_parse(json_string_value(dt));
        if (out[i].datatype == INFERD_TYPE_INVALID)
            return fail(err, err_len, "%s[%zu].datatype: unknown datatype '%.32s'", field, i,
                        json_string_value(dt));
        json_array_foreach (shape, k, d) {
            if (!json_is_integer(d) || json_integer_value(d) < -1)
                return fail(err, err_len, "%s[%zu].shape[%zu]: expected a size or -1", field, i,
                            k);
            out[i].shape[k] = json_integer_value(d);
        }
        out[i].n_dims = (int)json_array_size(shape);
        if (!(out[i].name = strdup(json_string_value(name))))
            return fail(err, err_len, "out of memory");
        *n = i + 1;
    }
    return 0;
}

static size_t collect(char *data, size_t size, size_t n, void *ctx)
{
    struct call *c = ctx;

    if (c->resp.len + size * n > MAX_RESPONSE_BYTES) {
        c->too_large = 1;
        return 0; /* aborts the transfer */
    }
    return buf_append(&c->resp, data, size * n) == 0 ? size * n : 0;
}

static size_t header_line(char *data, size_t size, size_t n, void *ctx)
{
    struct call *c = ctx;
    size_t len = size * n;

    if (len > 12 && strncasecmp(data, "Retry-After:", 12) == 0) {
        char v[64];
        size_t vl = len - 12 < sizeof(v) - 1 ? len - 12 : sizeof(v) - 1;
        char *end;
        memcpy(v, data + 12, vl);
        v[vl] = '\0';
        long long s = strtoll(v, &end, 10);
        if (end != v && s >= 0) {
            c->retry_after_ms = s * 1000;
        } else {
            time_t at = curl_getdate(v, NULL), now = (time_t)(clock_now_ms() / 1000);
            if (at > 0 && at > now)
                c->retry_after_ms = (int64_t)(at - now) * 1000;
        }
    }
    return len;
}

/* A v2 model's inputs and outputs, from GET on its url without the trailing /infer. */
static int fetch_metadata(struct http_model *m, char *err, size_t err_len)
{
    struct call c = {0};
    size_t len = strlen(m->url);
    char *meta = NULL;
    json_t *root = NULL;
    long status = 0;
    CURLcode res;
    int rc = -1;

    if (len < 6 || strcmp(m->url + len - 6, "/infer") != 0)
        return fail(err, err_len,
                    "url '%s' does not end in /infer: give \"inputs\" and \"outputs\" in "
                    "config.json",
                    m->url);
    meta = strndup(m->url, len - 6);
    c.easy = curl_easy_init();
    if (!meta || !c.easy) {
        rc = fail(err, err_len, "out of memory");
        goto cleanup;
    }
    curl_easy_setopt(c.easy, CURLOPT_URL, meta);
    curl_easy_setopt(c.easy, CURLOPT_HTTPHEADER, m->headers);
    curl_easy_setopt(c.easy, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c.easy, CURLOPT_TIMEOUT_MS, (long)METADATA_TIMEOUT_MS);
    curl_easy_setopt(c.easy, CURLOPT_WRITEFUNCTION, collect);
    curl_easy_setopt(c.easy, CURLOPT_WRITEDATA, &c);
    curl_easy_setopt(c.easy, CURLOPT_ERRORBUFFER, c.curl_err);
    res = curl_easy_perform(c.easy);
    if (res != CURLE_OK) {
        rc = fail(err, err_len, "upstream metadata %s: %s", meta,
                  c.curl_err[0] ? c.curl_err : curl_easy_strerror(res));
        goto cleanup;
    }
    curl_easy_getinfo(c.easy, CURLINFO_RESPONSE_CODE, &status);
    if (status != 200) {
        rc = fail(err, err_len, "upstream metadata %s: HTTP %ld", meta, status);
        goto cleanup;
    }
    root = json_loadb(c.resp.data ? c.resp.data : "", c.resp.len, 0, NULL);
    if (!json_is_object(root)) {
        rc = fail(err, err_len, "upstream metadata %s: not a JSON object", meta);
        goto cleanup;
    }
    if (read_tensors("upstream metadata inputs", json_object_get(root, "inputs"), m->inputs,
                     &m->n_inputs, err, err_len) != 0 ||
        read_tensors("upstream metadata outputs", json_object_get(root, "outputs"), m->outputs,
                     &m->n_outputs, err, err_len) != 0)
        goto cleanup;
    rc = 0;
cleanup:
    json_decref(root);
    buf_release(&c.resp);
    if (c.easy)
        curl_easy_cleanup(c.easy);
    free(meta);
    return rc;
}

static int set_tensor(struct inferd_tensor *t, const char *name, int64_t dim)
{
    t->name = strdup(name);
    t->datatype = INFERD_TYPE_BYTES;
    t->n_dims = 1;
    t->shape[0] = dim;
    return t->name ? 0 : -1;
}

/* The fixed inputs and outputs of the openai and json protocols. */
static int fixed_tensors(struct http_model *m)
{
    int rc = 0;

    if (m->protocol == PROTO_JSON) {
        rc |= set_tensor(&m->inputs[m->n_inputs++], INFERD_JSON_NAME, 1);
        rc |= set_tensor(&m->outputs[m->n_outputs++], INFERD_JSON_NAME, 1);
    } else {
        rc |= set_tensor(&m->inputs[m->n_inputs++], "prompt", 1);
        rc |= set_tensor(&m->inputs[m->n_inputs++], "messages", 1);
        rc |= set_tensor(&m->outputs[m->n_outputs++], "text", 1);
        rc |= set_tensor(&m->outputs[m->n_outputs++], "response", 1);
    }
    return rc;
}

static void *loop_main(void *arg);

static void http_model_destroy(void *state)
{
    struct http_model *m = state;

    if (!m)
        return;
    if (m->thread_started) {
        pthread_mutex_lock(&m->lock);
        m->stopping = 1;
        pthread_mutex_unlock(&m->lock);
        curl_multi_wakeup(m->multi);
        pthread_join(m->thread, NULL);
    }
    if (m->multi)
        curl_multi_cleanup(m->multi);
    pthread_mutex_destroy(&m->lock);
    for (size_t i = 0; i < m->n_inputs; i++)
        free((char *)m->inputs[i].name);
    for (size_t i = 0; i < m->n_outputs; i++)
        free((char *)m->outputs[i].name);
    curl_slist_free_all(m->headers);
    json_decref(m->forward_keys);
    free(m->url);
    free(m->upstream_model);
    free(m);
}

/* "forward_keys": ["top_k", ...] or ["*"], for the extras of vLLM, llama.cpp and the like. */
static int read_forward_keys(struct http_model *m, json_t *list, char *err, size_t err_len)
{
    size_t i;
    json_t *k;

    if (!list)
        return 0;
    if (m->protocol != PROTO_OPENAI)
        return fail(err, err_len, "forward_keys: only for protocol \"openai\"");
    if (!json_is_array(list))
        return fail(err, err_len, "forward_keys: expected a list of key names");
    if (!(m->forward_keys = json_object()))
        return fail(err, err_len, "out of memory");
    json_array_foreach (list, i, k) {
        if (!json_is_string(k) || json_string_length(k) == 0)
            return fail(err, err_len, "forward_keys[%zu]: expected a key name", i);
        if (strcmp(json_string_value(k), "*") == 0)
            m->forward_all = 1;
        else if (json_object_set(m->forward_keys, json_string_value(k), json_true()) != 0)
            return fail(err, err_len, "out of memory");
    }
    return 0;
}

static int int_field(json_t *root, const char *key, long long def, long long min, long long max,
                     long long *out, char *err, size_t err_len)
{
    json_t *v = json_object_get(root, key);

    *out = def;
    if (!v)
        return 0;
    if (!json_is_integer(v) || json_integer_value(v) < min || json_integer_value(v) > max)
        return fail(err, err_len, "%s: expected an integer from %lld to %lld", key, min, max);
    *out = json_integer_value(v);
    return 0;
}

static int http_model_create(void *backend_state, const char *dir, const char *config_json,
                             void **model_state, struct inferd_model_info *info, char *err,
                             size_t err_len)
{
    struct http_model *m = calloc(1, sizeof(*m));
    json_t *root = json_loads(config_json, 0, NULL), *v;
    const char *proto;
    long long timeout_s, max_conc;
    int rc = -1;

    (void)backend_state;
    (void)dir;
    *model_state = NULL;
    if (!m || !root) {
        rc = fail(err, err_len, m ? "config.json is not JSON" : "out of memory");
        free(m);
        json_decref(root);
        return rc;
    }
    pthread_mutex_init(&m->lock, NULL);
    v = json_object_get(root, "url");
    if (!json_is_string(v)) {
        fail(err, err_len, "url: missing (the upstream endpoint, e.g. "
                           "\"http://127.0.0.1:9000/v2/models/m/infer\")");
        goto cleanup;
    }
    if (expand_env("url", json_string_value(v), &m->url, err, err_len) != 0)
        goto cleanup;
    if (strncmp(m->url, "http://", 7) != 0 && strncmp(m->url, "https://", 8) != 0) {
        fail(err, err_len, "url: '%.100s' is not an http:// or https:// URL", m->url);
        goto cleanup;
    }
    v = json_object_get(root, "protocol");
    proto = v ? json_string_value(v) : "v2";
    if (!proto || (strcmp(proto, "v2") && strcmp(proto, "openai") && strcmp(proto, "json"))) {
        fail(err, err_len, "protocol: expected \"v2\", \"openai\" or \"json\"");
        goto cleanup;
    }
    m->protocol = !strcmp(proto, "v2") ? PROTO_V2 : !strcmp(proto, "openai") ? PROTO_OPENAI
                                                                            : PROTO_JSON;
    m->chat = strstr(m->url, "/chat/completions") != NULL;
    if (int_field(root, "timeout_s", 300, 1, 7 * 86400, &timeout_s, err, err_len) != 0 ||
        int_field(root, "max_concurrency", 16, 1, 100000, &max_conc, err, err_len) != 0)
        goto cleanup;
    m->timeout_ms = (long)timeout_s * 1000;
    v = json_object_get(root, "upstream_model");
    if (v && (!json_is_string(v) || !(m->upstream_model = strdup(json_string_value(v))))) {
        fail(err, err_len, "upstream_model: expected a string");
        goto cleanup;
    }
    if (read_headers(m, json_object_get(root, "headers"), err, err_len) != 0 ||
        read_forward_keys(m, json_object_get(root, "forward_keys"), err, err_len) != 0)
        goto cleanup;
    if (m->protocol == PROTO_V2) {
        json_t *ins = json_object_get(root, "inputs"), *outs = json_object_get(root, "outputs");
        if (!ins != !outs) {
            fail(err, err_len, "give both \"inputs\" and \"outputs\", or neither");
            goto cleanup;
        }
        if (ins ? read_tensors("inputs", ins, m->inputs, &m->n_inputs, err, err_len) ||
                      read_tensors("outputs", outs, m->outputs, &m->n_outputs, err, err_len)
                : fetch_metadata(m, err, err_len))
            goto cleanup;
    } else if (fixed_tensors(m) != 0) {
        fail(err, err_len, "out of memory");
        goto cleanup;
    }
    m->multi = curl_multi_init();
    if (!m->multi) {
        fail(err, err_len, "out of memory");
        goto cleanup;
    }
    if (pthread_create(&m->thread, NULL, loop_main, m) != 0) {
        fail(err, err_len, "cannot start the upstream thread");
        goto cleanup;
    }
    m->thread_started = 1;
    *info = (struct inferd_model_info){
        .inputs = m->inputs,
        .n_inputs = m->n_inputs,
        .outputs = m->outputs,
        .n_outputs = m->n_outputs,
        .platform = m->protocol == PROTO_V2       ? "http/v2"
                    : m->protocol == PROTO_OPENAI ? "http/openai"
                                                  : "http/json",
        .is_batched = 0,
        .inputs_optional = m->protocol == PROTO_OPENAI,
        .json_io = m->protocol == PROTO_V2       ? INFERD_JSON_IO_NONE
                   : m->protocol == PROTO_OPENAI ? INFERD_JSON_IO_ALSO
                                                 : INFERD_JSON_IO_ONLY,
        .max_in_flight = (int)max_conc,
    };
    *model_state = m;
    m = NULL;
    rc = 0;
cleanup:
    http_model_destroy(m);
    json_decref(root);
    return rc;
}

static int http_instance_create(void *model_state, int index, void **instance_state, char *err,
                                size_t err_len)
{
    (void)index;
    (void)err;
    (void)err_len;
    *instance_state = model_state;
    return 0;
}

/* ---- requests to the upstream ---- */

static void set_failed(struct inferd_request *req, int status, int retryable, const char *fmt,
                       ...) __attribute__((format(printf, 4, 5)));
static void set_failed(struct inferd_request *req, int status, int retryable, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(req->error, sizeof(req->error), fmt, ap);
    va_end(ap);
    req->failed = 1;
    req->status = status;
    req->retryable = retryable;
}

static const struct inferd_tensor *find_input(const struct inferd_request *req, const char *name)
{
    for (size_t i = 0; i < req->n_inputs; i++)
        if (strcmp(req->inputs[i].name, name) == 0)
            return &req->inputs[i];
    return NULL;
}

/* The first element of a BYTES tensor. */
static const char *first_bytes(const struct inferd_tensor *t, size_t *len)
{
    uint32_t n;

    if (!t || t->datatype != INFERD_TYPE_BYTES || t->data_bytes < 4)
        return NULL;
    memcpy(&n, t->data, 4);
    if (n > t->data_bytes - 4)
        return NULL;
    *len = n;
    return (const char *)t->data + 4;
}

/* The request keys of OpenAI's completions and chat completions APIs: OpenAI refuses any
 * other ("Unrecognized request argument supplied"). */
static const char *const completions_keys[] = {"model",
                                               "prompt",
                                               "best_of",
                                               "echo",
                                               "frequency_penalty",
                                               "logit_bias",
                                               "logprobs",
                                               "max_tokens",
                                               "n",
                                               "presence_penalty",
                                               "seed",
                                               "stop",
                                               "stream",
                                               "stream_options",
                                               "suffix",
                                               "temperature",
                                               "top_p",
                                               "user"};
static const char *const chat_keys[] = {"model",
                                        "messages",
                                        "audio",
                                        "frequency_penalty",
                                        "function_call",
                                        "functions",
                                        "logit_bias",
                                        "logprobs",
                                        "max_completion_tokens",
                                        "max_tokens",
                                        "metadata",
                                        "modalities",
                                        "n",
                                        "parallel_tool_calls",
                                        "prediction",
                                        "presence_penalty",
                                        "prompt_cache_key",
                                        "reasoning_effort",
                                        "response_format",
                                        "safety_identifier",
                                        "seed",
                                        "service_tier",
                                        "stop",
                                        "store",
                                        "stream",
                                        "stream_options",
                                        "temperature",
                                        "tool_choice",
                                        "tools",
                                        "top_logprobs",
                                        "top_p",
                                        "user",
                                        "verbosity",
                                        "web_search_options"};

static int openai_key_forwarded(const struct http_model *m, const char *key)
{
    const char *const *keys = m->chat ? chat_keys : completions_keys;
    size_t n = m->chat ? sizeof(chat_keys) / sizeof(chat_keys[0])
                       : sizeof(completions_keys) / sizeof(completions_keys[0]);

    if (strcmp(key, "custom_id") == 0 || strcmp(key, "stream_options") == 0)
        return 0; /* inferd's bookkeeping; and only valid with "stream": true, refused here */
    for (size_t i = 0; i < n; i++)
        if (strcmp(keys[i], key) == 0)
            return 1;
    return m->forward_all || (m->forward_keys && json_object_get(m->forward_keys, key));
}

/* An OpenAI Batch API line, {"custom_id", "method", "url", "body"}: its body, once its method
 * and url fit this model. NULL (and `req` failed) when they do not. */
static json_t *batch_line_body(struct http_model *m, struct inferd_request *req, json_t *line)
{
    json_t *method = json_object_get(line, "method"), *url = json_object_get(line, "url");
    const char *want = m->chat ? "/chat/completions" : "/completions";
    const char *u = json_string_value(url);
    size_t ul = u ? strlen(u) : 0, wl = strlen(want);

    if (method && (!json_is_string(method) || strcasecmp(json_string_value(method), "POST"))) {
        set_failed(req, 400, 0, "method: an OpenAI batch line for this model is a POST");
        return NULL;
    }
    if (url && (!u || ul < wl || strcmp(u + ul - wl, want) != 0 ||
                (!m->chat && ul >= 17 && strcmp(u + ul - 17, "/chat/completions") == 0))) {
        /* the line may come from a stored object: its own text stays out of the message */
        set_failed(req, 400, 0, "url: this model's upstream takes %s requests, no other",
                   m->chat ? "/v1/chat/completions" : "/v1/completions");
        return NULL;
    }
    return json_incref(json_object_get(line, "body"));
}

/* The body of an OpenAI-style request, from a document or from prompt/messages tensors.
 * *custom_id receives the document's "custom_id" (a new reference), if it has one. */
static int openai_body(struct http_model *m, struct inferd_request *req, struct buf *out,
                       json_t **custom_id)
{
    const struct inferd_tensor *doc = find_input(req, INFERD_JSON_NAME);
    const struct inferd_tensor *prompt = find_input(req, "prompt");
    const struct inferd_tensor *messages = find_input(req, "messages");
    json_t *body = NULL, *v = NULL;
    const char *s;
    size_t len;
    char *text = NULL;
    int rc = -1;

    if (doc && (s = first_bytes(doc, &len))) {
        v = json_loadb(s, len, JSON_DECODE_ANY | JSON_ALLOW_NUL, NULL);
        if (json_is_string(v)) {
            body = json_pack("{s:O}", "prompt", v);
        } else if (json_is_array(v)) {
            body = json_pack("{s:O}", "messages", v);
        } else if (json_is_object(v) &&
                   (json_object_get(v, "prompt") || json_object_get(v, "messages"))) {
            body = json_incref(v);
            *custom_id = json_incref(json_object_get(v, "custom_id"));
        } else if (json_is_object(v) && json_is_object(json_object_get(v, "body"))) {
            if (!(body = batch_line_body(m, req, v)))
                goto cleanup;
            *custom_id = json_incref(json_object_get(v, "custom_id"));
            if (!json_object_get(body, "prompt") && !json_object_get(body, "messages")) {
                set_failed(req, 400, 0, "body: an OpenAI request with \"prompt\" or \"messages\"");
                goto cleanup;
            }
        } else {
            set_failed(req, 400, 0,
                       "a document for an openai model is a prompt string, a messages list, an "
                       "object with \"prompt\" or \"messages\", or an OpenAI batch line "
                       "({\"custom_id\", \"method\", \"url\", \"body\"})");
            goto cleanup;
        }
    } else if (prompt && (s = first_bytes(prompt, &len))) {
        json_t *p = json_stringn(s, len);
        if (!p) {
            set_failed(req, 400, 0, "input 'prompt': not valid UTF-8 text");
            goto cleanup;
        }
        body = json_pack("{s:o}", "prompt", p);
    } else if (messages && (s = first_bytes(messages, &len))) {
        v = json_loadb(s, len, 0, NULL);
        if (!json_is_array(v)) {
            set_failed(req, 400, 0, "input 'messages': expected the JSON text of a list");
            goto cleanup;
        }
        body = json_pack("{s:O}", "messages", v);
    } else {
        set_failed(req, 400, 0, "give input 'prompt' or 'messages' (BYTES, shape [1])");
        goto cleanup;
    }
    if (!body)
        goto nomem;
    if (m->chat && !json_object_get(body, "messages")) {
        json_t *msgs = json_pack("[{s:s,s:O}]", "role", "user", "content",
                                 json_object_get(body, "prompt"));
        if (!msgs || json_object_set_new(body, "messages", msgs) != 0)
            goto nomem;
        json_object_del(body, "prompt");
    } else if (!m->chat && !json_object_get(body, "prompt")) {
        set_failed(req, 400, 0,
                   "messages need a chat completions url (…/v1/chat/completions); this model's "
                   "url takes a prompt");
        goto cleanup;
    }
    if (m->upstream_model && !json_object_get(body, "model") &&
        json_object_set_new(body, "model", json_string(m->upstream_model)) != 0)
        goto nomem;
    if (json_is_true(json_object_get(body, "stream"))) {
        set_failed(req, 400, 0,
                   "stream: streaming is not supported: inferd answers with the whole "
                   "completion (leave \"stream\" out, or send false)");
        goto cleanup;
    }
    for (void *it = json_object_iter(body), *next; it; it = next) {
        const char *key = json_object_iter_key(it);
        next = json_object_iter_next(body, it); /* before the key may go */
        if (!openai_key_forwarded(m, key))
            json_object_del(body, key);
    }
    text = json_dumps(body, JSON_COMPACT);
    if (!text || buf_puts(out, text) != 0)
        goto nomem;
    rc = 0;
    goto cleanup;
nomem:
    set_failed(req, 500, 1, "out of memory building the upstream request");
cleanup:
    free(text);
    json_decref(v);
    json_decref(body);
    return rc;
}

static int build_body(struct http_model *m, struct inferd_request *req, struct buf *out,
                      json_t **custom_id)
{
    const char *s;
    size_t len;

    switch (m->protocol) {
    case PROTO_V2:
        if (codec_encode_request_v2(infer_request_of(req), out) != 0) {
            set_failed(req, 500, 1, "out of memory building the upstream request");
            return -1;
        }
        return 0;
    case PROTO_OPENAI:
        return openai_body(m, req, out, custom_id);
    case PROTO_JSON:
        s = first_bytes(find_input(req, INFERD_JSON_NAME), &len);
        if (!s) {
            set_failed(req, 400, 0, "expected one JSON document");
            return -1;
        }
        if (buf_append(out, s, len) != 0) {
            set_failed(req, 500, 1, "out of memory building the upstream request");
            return -1;
        }
        return 0;
    }
    return -1;
}

/* Allocates a BYTES output of one element holding `s`. */
static int output_bytes(struct inferd_request *req, const char *name, const char *s, size_t len)
{
    int64_t shape[1] = {1};
    uint32_t n = (uint32_t)len;
    char *p = host->output_alloc(req, name, INFERD_TYPE_BYTES, shape, 1, len + 4);

    if (!p)
        return -1;
    memcpy(p, &n, 4);
    memcpy(p + 4, s, len);
    return 0;
}

/* A short message from an upstream's error body: its "error" (or error.message), or text. */
static void upstream_message(const struct buf *resp, char *out, size_t out_len)
{
    json_t *root = json_loadb(resp->data ? resp->data : "", resp->len, JSON_DECODE_ANY, NULL);
    json_t *e = json_object_get(root, "error");
    const char *msg = NULL;

    if (json_is_string(e))
        msg = json_string_value(e);
    else if (json_is_string(json_object_get(e, "message")))
        msg = json_string_value(json_object_get(e, "message"));
    else if (json_is_string(json_object_get(root, "detail")))
        msg = json_string_value(json_object_get(root, "detail"));
    if (msg) {
        snprintf(out, out_len, "%s", msg);
    } else {
        size_t n = resp->len < out_len - 1 ? resp->len : out_len - 1;
        memcpy(out, resp->data ? resp->data : "", n);
        out[n] = '\0';
        for (char *p = out; *p; p++)
            if (*p == '\n' || *p == '\r')
                *p = ' ';
    }
    json_decref(root);
}

/* A 2xx answer becomes the request's outputs. */
static void take_answer(struct http_model *m, struct inferd_request *req, const struct buf *resp,
                        json_t *custom_id)
{
    const char *body = resp->data ? resp->data : "";
    struct infer_request *got = NULL;
    struct err e = {0};
    json_t *root = NULL;
    char *doc = NULL;

    if (m->protocol == PROTO_V2) {
        if (codec_decode_response_v2(body, resp->len, &got, &e) != 0) {
            set_failed(req, 502, 1, "upstream %s: its answer: %s", m->url, e.msg);
            goto cleanup;
        }
        for (size_t i = 0; i < got->n_inputs; i++) {
            const struct inferd_tensor *t = &got->inputs[i];
            void *p = host->output_alloc(req, t->name, t->datatype, t->shape, t->n_dims,
                                         t->data_bytes);
            if (!p) {
                set_failed(req, 500, 1, "out of memory");
                goto cleanup;
            }
            if (t->data_bytes)
                memcpy(p, t->data, t->data_bytes);
        }
        goto cleanup;
    }
    root = json_loadb(body, resp->len, JSON_DECODE_ANY | JSON_ALLOW_NUL, NULL);
    if (!root) {
        set_failed(req, 502, 1, "upstream %s: its answer is not JSON", m->url);
        goto cleanup;
    }
    if (m->protocol == PROTO_JSON) {
        if (output_bytes(req, INFERD_JSON_NAME, body, resp->len) != 0)
            set_failed(req, 500, 1, "out of memory");
        goto cleanup;
    }
    /* openai: choices[0].message.content (chat) or choices[0].text */
    json_t *choice = json_array_get(json_object_get(root, "choices"), 0);
    json_t *text = json_object_get(json_object_get(choice, "message"), "content");
    if (!json_is_string(text))
        text = json_object_get(choice, "text");
    if (!json_is_string(text)) {
        set_failed(req, 502, 1,
                   "upstream %s: no choices[0].message.content or choices[0].text in its answer",
                   m->url);
        goto cleanup;
    }
    if (find_input(req, INFERD_JSON_NAME)) {
        json_t *d = custom_id ? json_pack("{s:O,s:O,s:O}", "custom_id", custom_id, "text", text,
                                          "response", root)
                              : json_pack("{s:O,s:O}", "text", text, "response", root);
        doc = d ? json_dumps(d, JSON_COMPACT) : NULL;
        json_decref(d);
        if (!doc || output_bytes(req, INFERD_JSON_NAME, doc, strlen(doc)) != 0)
            set_failed(req, 500, 1, "out of memory");
    } else if (output_bytes(req, "text", json_string_value(text), json_string_length(text)) != 0 ||
               output_bytes(req, "response", body, resp->len) != 0) {
        set_failed(req, 500, 1, "out of memory");
    }
cleanup:
    free(doc);
    json_decref(root);
    infer_request_destroy(got);
}

/* Ends a call: its outcome into the request, then the request back to inferd. */
static void finish_call(struct call *c, CURLcode res)
{
    struct http_model *m = c->m;
    struct inferd_request *req = c->req;
    long status = 0;

    if (res == CURLE_OPERATION_TIMEDOUT) {
        set_failed(req, 504, 1, "upstream %s: no answer within %ld s", m->url,
                   m->timeout_ms / 1000);
    } else if (c->too_large) {
        set_failed(req, 502, 0, "upstream %s: its answer is larger than %zu MiB", m->url,
                   MAX_RESPONSE_BYTES >> 20);
    } else if (res != CURLE_OK) {
        set_failed(req, 502, 1, "upstream %s: %s", m->url,
                   c->curl_err[0] ? c->curl_err : curl_easy_strerror(res));
    } else {
        char msg[160];
        curl_easy_getinfo(c->easy, CURLINFO_RESPONSE_CODE, &status);
        if (status >= 200 && status < 300) {
            take_answer(m, req, &c->resp, c->custom_id);
        } else {
            upstream_message(&c->resp, msg, sizeof(msg));
            if (status == 429 || status >= 500) {
                set_failed(req, 502, 1, "upstream %s answered HTTP %ld: %s", m->url, status, msg);
                req->retry_after_ms = c->retry_after_ms;
            } else {
                set_failed(req, status == 400 || status == 413 || status == 422 ? (int)status : 502,
                           0, "upstream %s answered HTTP %ld: %s", m->url, status, msg);
            }
        }
    }
    if (c->easy)
        curl_easy_cleanup(c->easy);
    buf_release(&c->body);
    buf_release(&c->resp);
    json_decref(c->custom_id);
    free(c);
    host->request_done(req);
}

static void ended_before_start(struct call *c)
{
    struct inferd_request *req = c->req;

    if (c->easy)
        curl_easy_cleanup(c->easy);
    buf_release(&c->body);
    json_decref(c->custom_id);
    free(c);
    host->request_done(req);
}

static void unlink_active(struct http_model *m, struct call *c)
{
    if (c->prev)
        c->prev->next = c->next;
    else
        m->active = c->next;
    if (c->next)
        c->next->prev = c->prev;
    c->next = c->prev = NULL;
}

static void *loop_main(void *arg)
{
    struct http_model *m = arg;
    int64_t last_check = clock_mono_ms();

    for (;;) {
        struct call *in, *next;
        CURLMsg *msg;
        int running, left, stopping;

        pthread_mutex_lock(&m->lock);
        in = m->incoming;
        m->incoming = NULL;
        stopping = m->stopping;
        pthread_mutex_unlock(&m->lock);
        for (; in; in = next) {
            next = in->next;
            in->next = in->prev = NULL;
            if (curl_multi_add_handle(m->multi, in->easy) != CURLM_OK) {
                set_failed(in->req, 500, 1, "cannot start the upstream call");
                ended_before_start(in);
                continue;
            }
            in->next = m->active;
            if (m->active)
                m->active->prev = in;
            m->active = in;
        }
        if (stopping && !m->active)
            break; /* the batcher waits for every request before the model goes */
        curl_multi_perform(m->multi, &running);
        while ((msg = curl_multi_info_read(m->multi, &left))) {
            struct call *c = NULL;
            if (msg->msg != CURLMSG_DONE)
                continue;
            curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&c);
            CURLcode res = msg->data.result;
            curl_multi_remove_handle(m->multi, c->easy);
            unlink_active(m, c);
            finish_call(c, res);
        }
        if (clock_mono_ms() - last_check >= CANCEL_CHECK_MS) {
            last_check = clock_mono_ms();
            for (struct call *c = m->active, *cn; c; c = cn) {
                cn = c->next;
                if (!host->request_cancelled(c->req))
                    continue;
                curl_multi_remove_handle(m->multi, c->easy);
                unlink_active(m, c);
                set_failed(c->req, 499, 0, "cancelled; the upstream call was aborted");
                ended_before_start(c);
            }
        }
        curl_multi_poll(m->multi, NULL, 0, CANCEL_CHECK_MS, NULL);
    }
    return NULL;
}

static int http_execute_async(void *instance_state, struct inferd_request *const *reqs, size_t n,
                              char *err, size_t err_len)
{
    struct http_model *m = instance_state;
    struct call *head = NULL, **tail = &head;

    (void)err;
    (void)err_len;
    for (size_t i = 0; i < n; i++) {
        struct call *c = calloc(1, sizeof(*c));
        if (!c) {
            set_failed(reqs[i], 500, 1, "out of memory");
            host->request_done(reqs[i]);
            continue;
        }
        c->m = m;
        c->req = reqs[i];
        if (build_body(m, reqs[i], &c->body, &c->custom_id) != 0) {
            ended_before_start(c);
            continue;
        }
        c->easy = curl_easy_init();
        if (!c->easy) {
            set_failed(reqs[i], 500, 1, "out of memory");
            ended_before_start(c);
            continue;
        }
        curl_easy_setopt(c->easy, CURLOPT_URL, m->url);
        curl_easy_setopt(c->easy, CURLOPT_POST, 1L);
        curl_easy_setopt(c->easy, CURLOPT_POSTFIELDS, c->body.data ? c->body.data : "");
        curl_easy_setopt(c->easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)c->body.len);
        curl_easy_setopt(c->easy, CURLOPT_HTTPHEADER, m->headers);
        curl_easy_setopt(c->easy, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(c->easy, CURLOPT_TIMEOUT_MS, m->timeout_ms);
        curl_easy_setopt(c->easy, CURLOPT_CONNECTTIMEOUT_MS,
                         m->timeout_ms < 10000 ? m->timeout_ms : 10000L);
        curl_easy_setopt(c->easy, CURLOPT_WRITEFUNCTION, collect);
        curl_easy_setopt(c->easy, CURLOPT_WRITEDATA, c);
        curl_easy_setopt(c->easy, CURLOPT_HEADERFUNCTION, header_line);
        curl_easy_setopt(c->easy, CURLOPT_HEADERDATA, c);
        curl_easy_setopt(c->easy, CURLOPT_ERRORBUFFER, c->curl_err);
        curl_easy_setopt(c->easy, CURLOPT_PRIVATE, (char *)c);
        *tail = c;
        tail = &c->next;
    }
    if (head) {
        pthread_mutex_lock(&m->lock);
        *tail = m->incoming;
        m->incoming = head;
        pthread_mutex_unlock(&m->lock);
        curl_multi_wakeup(m->multi);
    }
    return 0;
}

static const struct inferd_backend_api http_api = {
    .api_version = INFERD_BACKEND_API_VERSION,
    .name = "http",
    .init = http_init,
    .model_create = http_model_create,
    .model_destroy = http_model_destroy,
    .instance_create = http_instance_create,
    .execute_async = http_execute_async,
};

const struct inferd_backend_api *backend_http(void)
{
    return &http_api;
}
