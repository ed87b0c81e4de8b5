/*
 * jobs.c: the asynchronous API: /v1/jobs, `Prefer: respond-async` on infer, long-polls.
 *
 * Every job-store call is blocking (it returns once the change is durable), so handlers parse
 * and validate on the HTTP thread, then suspend the connection and run the call on the I/O
 * pool (http_defer). A long-poll holds no thread at all: the request sits in the waiters
 * table, keyed by job id, until the queue reports the job final (jobs_on_final) or the timer
 * thread sees its deadline pass; either one claims it under the table lock, so it is answered
 * exactly once, and the answer is built on the I/O pool.
 */
#define _GNU_SOURCE
#include "core/jdoc.h"
#include "core/clock.h"
#include "core/jfield.h"
#include "core/log.h"
#include "http/http_internal.h"
#include "kserve/codec.h"
#include "notify/notify.h"
#include "storage/storage.h"

#include <ctype.h>
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* the longest long-poll (?wait=, Prefer: wait): a request held longer holds its connection
 * for nothing a poll loop cannot do */
#define WAIT_MAX_S 300
#define WAIT_MAX_MS (WAIT_MAX_S * 1000)
#define TIMER_MS 50
/* DELETE of a running job waits this long for its worker to stop it before answering 202:
 * a worker notices within 100 ms, a model that honours cancellation stops as fast */
#define CANCEL_WAIT_MS 3000

/* what a waiter answers: the job (200), its result, or DELETE's answer (200 once the job is
 * final, 202 while its cancellation is still pending) */
enum wait_mode { WAIT_STATUS, WAIT_INFER, WAIT_CANCEL };

/* A request about one job, as long as it lives (the request's route state): the job, what it
 * enqueues, and its wait. */
struct job_call {
    struct req *r;
    char job_id[40];
    struct job_spec spec; /* enqueue: strings point into `json` or the request's body */
    json_t *json;         /* the parsed body, kept while `spec` points into it */
    char request_hash[65];
    int64_t wait_ms; /* long-poll, Prefer: wait, or DELETE's wait; 0: answer now */
    enum wait_mode wait_mode;
    int64_t wait_deadline_ms;
    struct job_call *wait_next; /* in the waiters' bucket; guarded by waiters.lock */
};

static void job_call_release(void *state)
{
    struct job_call *c = state;

    json_decref(c->json);
    free(c);
}

static const struct route_state_ops job_call_ops = {job_call_release, NULL};

/* The request's job call, made now; NULL with 500 set when memory is out. */
static struct job_call *job_call_create(struct req *r)
{
    struct job_call *c = calloc(1, sizeof(*c));

    if (!c) {
        http_fail(r, ERR_NOMEM, "out of memory");
        return NULL;
    }
    c->r = r;
    http_set_route_state(r, c, &job_call_ops);
    return c;
}

/* ---- small helpers ---- */

static void set_location(struct req *r, const char *id)
{
    snprintf(r->location, sizeof(r->location), "/v1/jobs/%s", id);
}

static int reply_job(struct req *r, int status, const struct job *j);

/* DELETE's answer: 200 once the job is final (cancelled, or it ended first); 202 while it still
 * runs, its JSON saying "cancel_requested": it ends cancelled when its worker can stop it. */
static int reply_cancel(struct req *r, const struct job *j)
{
    return reply_job(r, job_state_is_final(j->state) ? 200 : 202, j);
}

static int reply_job(struct req *r, int status, const struct job *j)
{
    buf_release(&r->out);
    r->json_len = -1;
    if (queue_job_json(j, &r->out) != 0) {
        http_set_error(r, ERR_NOMEM, "out of memory");
        return -1;
    }
    r->status = status;
    return 0;
}

/* The worker pool's figures (server.h, struct http_pool); 0 without a pool. */
static int pool_busy(const struct http_server *s)
{
    return s->pool.pool && s->pool.busy ? s->pool.busy(s->pool.pool) : 0;
}

static int pool_size(const struct http_server *s)
{
    return s->pool.pool && s->pool.size ? s->pool.size(s->pool.pool) : 0;
}

static double pool_drain_rate(const struct http_server *s)
{
    return s->pool.pool && s->pool.drain_rate ? s->pool.drain_rate(s->pool.pool) : 0;
}

static void set_busy(struct req *r, const char *msg)
{
    struct http_server *s = r->srv;
    double rate = pool_drain_rate(s);
    int64_t queued = s->queue ? queue_queued(s->queue) : 0;
    double secs = rate > 0 ? ceil((double)queued * 0.01 / rate) : 5;

    http_set_error(r, ERR_BUSY, msg);
    /* when 1% of the queue will have drained at the measured rate */
    r->retry_after_s = secs < 1 ? 1 : secs > 600 ? 600 : (int)secs;
}

static void hash_request(struct job_call *c, const void *a, size_t a_len, const void *b,
                         size_t b_len)
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int md_len = 0;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();

    c->request_hash[0] = '\0';
    if (!ctx)
        return;
    if (EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) == 1 && EVP_DigestUpdate(ctx, a, a_len) == 1 &&
        EVP_DigestUpdate(ctx, b, b_len) == 1 && EVP_DigestFinal_ex(ctx, md, &md_len) == 1) {
        for (unsigned i = 0; i < md_len && i < 32; i++)
            snprintf(c->request_hash + 2 * i, 3, "%02x", md[i]);
    }
    EVP_MD_CTX_free(ctx);
}

void jobs_parse_prefer(const char *prefer, int *respond_async, int64_t *wait_ms)
{
    const char *p = prefer;

    *respond_async = 0;
    *wait_ms = 0;
    if (!p)
        return;
    while (*p) {
        while (*p == ' ' || *p == ',' || *p == '\t' || *p == ';')
            p++;
        if (strncasecmp(p, "respond-async", 13) == 0) {
            *respond_async = 1;
            p += 13;
        } else if (strncasecmp(p, "wait=", 5) == 0) {
            char *end;
            long long secs;
            errno = 0;
            secs = strtoll(p + 5, &end, 10);
            if (!errno && end != p + 5 && secs > 0)
                *wait_ms = secs > WAIT_MAX_MS / 1000 ? WAIT_MAX_MS : secs * 1000;
            p = end;
        }
        while (*p && *p != ',')
            p++;
    }
}

/* ---- the waiters table ---- */

static unsigned bucket_of(const char *id)
{
    unsigned h = 2166136261u;

    for (const unsigned char *p = (const unsigned char *)id; *p; p++)
        h = (h ^ *p) * 16777619u;
    return h % WAITER_BUCKETS;
}

/* Adds `c`; returns 0, or -1 when the table is stopping (answer now). */
static int waiter_add(struct http_server *s, struct job_call *c)
{
    unsigned b = bucket_of(c->job_id);
    int rc = 0;

    pthread_mutex_lock(&s->waiters.lock);
    if (s->waiters.stopping) {
        rc = -1;
    } else {
        c->wait_next = s->waiters.buckets[b];
        s->waiters.buckets[b] = c;
    }
    pthread_mutex_unlock(&s->waiters.lock);
    return rc;
}

/* Removes `c` if it is still there: 1 means the caller now owns answering it. */
static int waiter_claim(struct http_server *s, struct job_call *c)
{
    unsigned b = bucket_of(c->job_id);
    int found = 0;

    pthread_mutex_lock(&s->waiters.lock);
    for (struct job_call **pp = &s->waiters.buckets[b]; *pp; pp = &(*pp)->wait_next) {
        if (*pp == c) {
            *pp = c->wait_next;
            c->wait_next = NULL;
            found = 1;
            break;
        }
    }
    pthread_mutex_unlock(&s->waiters.lock);
    return found;
}

static void answer_waiter(struct job_call *c);

static void run_answer(void *arg)
{
    answer_waiter(arg);
}

/* Answers every claimed waiter, on the I/O pool. */
static void answer_claimed(struct http_server *s, struct job_call *claimed)
{
    while (claimed) {
        struct job_call *next = claimed->wait_next;
        claimed->wait_next = NULL;
        iopool_run(s->io, run_answer, claimed);
        claimed = next;
    }
}

void jobs_on_final(void *ctx, const char *id, enum job_state state)
{
    struct http_server *s = ctx;
    unsigned b = bucket_of(id);
    struct job_call *claimed = NULL;

    (void)state;
    if (s->notifier)
        notify_kick(s->notifier); /* its webhook, if any, was stored with the final state */
    pthread_mutex_lock(&s->waiters.lock);
    for (struct job_call **pp = &s->waiters.buckets[b]; *pp;) {
        struct job_call *c = *pp;
        if (strcmp(c->job_id, id) == 0) {
            *pp = c->wait_next;
            c->wait_next = claimed;
            claimed = c;
        } else {
            pp = &c->wait_next;
        }
    }
    pthread_mutex_unlock(&s->waiters.lock);
    answer_claimed(s, claimed);
}

/* Claims every waiter whose deadline passed (all of them when `all`). */
static struct job_call *claim_expired(struct http_server *s, int64_t now, int all)
{
    struct job_call *claimed = NULL;

    pthread_mutex_lock(&s->waiters.lock);
    for (int b = 0; b < WAITER_BUCKETS; b++) {
        for (struct job_call **pp = &s->waiters.buckets[b]; *pp;) {
            struct job_call *c = *pp;
            if (all || c->wait_deadline_ms <= now) {
                *pp = c->wait_next;
                c->wait_next = claimed;
                claimed = c;
            } else {
                pp = &c->wait_next;
            }
        }
    }
    pthread_mutex_unlock(&s->waiters.lock);
    return claimed;
}

static void *timer_main(void *arg)
{
    struct http_server *s = arg;

    for (;;) {
        struct timespec ts = {0, TIMER_MS * 1000000L};
        int stopping;
        nanosleep(&ts, NULL);
        pthread_mutex_lock(&s->waiters.lock);
        stopping = s->waiters.stopping;
        pthread_mutex_unlock(&s->waiters.lock);
        if (stopping)
            break;
        answer_claimed(s, claim_expired(s, clock_now_ms(), 0));
        http_watchdog(s);
    }
    return NULL;
}

int jobs_waiters_start(struct http_server *s)
{
    pthread_mutex_init(&s->waiters.lock, NULL);
    if (pthread_create(&s->waiters.timer, NULL, timer_main, s) != 0)
        return -1;
    s->waiters.timer_started = 1;
    return 0;
}

void jobs_waiters_stop(struct http_server *s)
{
    pthread_mutex_lock(&s->waiters.lock);
    if (s->waiters.stopping) {
        pthread_mutex_unlock(&s->waiters.lock);
        return;
    }
    s->waiters.stopping = 1;
    pthread_mutex_unlock(&s->waiters.lock);
    if (s->waiters.timer_started)
        pthread_join(s->waiters.timer, NULL);
    answer_claimed(s, claim_expired(s, 0, 1));
}

/* ---- answers ---- */

/* Builds the infer-style answer for a finished job: its v2 response, or its error. */
static void answer_with_result(struct req *r, struct job *j)
{
    if (j->state == JOB_SUCCEEDED) {
        buf_release(&r->out);
        r->out = j->result;
        j->result = (struct buf){0};
        r->json_len = j->result_json_len;
        r->status = 200;
        if (r->out.len == 0 && j->output_location)
            reply_job(r, 200, j); /* the result is in storage: say where */
        return;
    }
    if (j->state == JOB_FAILED) {
        char msg[512];
        snprintf(msg, sizeof(msg), "job %s failed: %s", j->id, j->error ? j->error : "");
        http_set_error(r, ERR_BACKEND, msg);
        return;
    }
    if (job_state_is_final(j->state)) {
        char msg[128];
        snprintf(msg, sizeof(msg), "job %s is %s", j->id, job_state_name(j->state));
        http_set_error(r, ERR_CONFLICT, msg);
        return;
    }
    /* not done within the wait: the client polls from here */
    r->status = 202;
    buf_release(&r->out);
    buf_printf(&r->out, "{\"id\":\"%s\",\"status\":\"%s\"}", j->id, job_state_name(j->state));
}

static void answer_waiter(struct job_call *c)
{
    struct req *r = c->r;
    struct job *j = NULL;
    struct err e;
    int rc =
        queue_get(r->srv->queue, c->job_id, http_viewer(r), c->wait_mode == WAIT_INFER, &j, &e);

    if (rc != 0)
        http_set_error(r, rc, e.msg);
    else if (c->wait_mode == WAIT_INFER)
        answer_with_result(r, j);
    else if (c->wait_mode == WAIT_CANCEL)
        reply_cancel(r, j);
    else
        reply_job(r, 200, j);
    job_free(j);
    http_finish_async(r);
}

/* Waits for the job to end (or the deadline), without a thread. Called on the I/O pool:
 * answers, or leaves the request with the waiters (HANDLED_PENDING). */
static enum handled wait_or_answer(struct job_call *c, struct job *j)
{
    struct req *r = c->r;

    if (j && !job_state_is_final(j->state) && c->wait_ms > 0) {
        c->wait_deadline_ms = clock_now_ms() + c->wait_ms;
        if (waiter_add(r->srv, c) == 0) {
            /* it may have ended between the read and the registration: look once more */
            struct job *again = NULL;
            struct err e;
            if (queue_get(r->srv->queue, c->job_id, http_viewer(r), 0, &again, &e) == 0 &&
                job_state_is_final(again->state) && waiter_claim(r->srv, c))
                answer_waiter(c);
            job_free(again);
            return HANDLED_PENDING;
        }
    }
    if (j && c->wait_mode == WAIT_INFER)
        answer_with_result(r, j);
    else if (j && c->wait_mode == WAIT_CANCEL)
        reply_cancel(r, j);
    else if (j)
        reply_job(r, 200, j);
    return HANDLED_ANSWER;
}

/* ---- enqueue ---- */

/* What follows a commit when it needs the job store again (on the I/O pool). */
static void after_enqueue(struct job_call *c)
{
    struct req *r = c->r;
    struct err e = {0};
    struct job *j = NULL;

    if (c->wait_ms > 0 && r->status == 0) {
        if (queue_get(r->srv->queue, c->job_id, http_viewer(r), 1, &j, &e) == 0) {
            c->wait_mode = WAIT_INFER;
            if (wait_or_answer(c, j) == HANDLED_ANSWER)
                http_finish_async(r);
            job_free(j);
            return;
        }
    }
    /* the same request again: the same job back */
    if (queue_get(r->srv->queue, c->job_id, http_viewer(r), 0, &j, &e) == 0)
        reply_job(r, 200, j);
    else
        http_set_error(r, e.code, e.msg);
    job_free(j);
    http_finish_async(r);
}

static void run_after_enqueue(void *arg)
{
    after_enqueue(arg);
}

/* Called on the store's writer thread once the job is durable (or refused): never blocks. */
static void enqueued(void *ctx, int rc, const struct err *e, const char *id, int existed)
{
    struct job_call *c = ctx;
    struct req *r = c->r;

    snprintf(c->job_id, sizeof(c->job_id), "%s", id ? id : "");
    if (rc == ERR_BUSY) {
        set_busy(r, e->msg);
    } else if (rc != 0) {
        http_set_error(r, rc, e->msg);
        if (rc == ERR_CONFLICT)
            set_location(r, c->job_id);
        if (rc == ERR_UNAVAILABLE)
            r->retry_after_s = 5; /* the job store is unreachable: nothing was stored */
    } else {
        set_location(r, c->job_id);
        if (existed || c->wait_ms > 0) {
            iopool_run(r->srv->io, run_after_enqueue, c);
            return;
        }
        r->status = 202;
        buf_release(&r->out);
        buf_printf(&r->out, "{\"id\":\"%s\",\"status\":\"queued\"}", c->job_id);
    }
    http_finish_async(r);
}

/* Suspends the connection and hands the job to the store; the commit's callback answers. */
static enum handled enqueue(struct job_call *c)
{
    struct req *r = c->r;
    struct err e = {0};

    atomic_store(&r->state, REQ_WAITING);
    MHD_suspend_connection(r->conn);
    r->status = 0;
    if (queue_enqueue_async(r->srv->queue, &c->spec, enqueued, c, &e) != 0) {
        http_set_error(r, e.code, e.msg);
        if (e.code == ERR_UNAVAILABLE)
            r->retry_after_s = 5;
        http_finish_async(r);
    }
    return HANDLED_PENDING;
}

/* Sets a 503 answer and returns 1 when no job can be accepted now. */
static int async_unavailable(struct req *r)
{
    if (!r->srv->queue) {
        http_fail(r, ERR_UNAVAILABLE, "the async queue is not enabled");
        return 1;
    }
    if (http_refuse_draining(r))
        return 1;
    return 0;
}

#define IDEMPOTENCY_KEY_MAX 255 /* bytes: a key is an id, not a payload */

/* Sets spec->idempotency_key from the request's Idempotency-Key (NULL: none sent). 0, or
 * ERR_INVALID when it is too long or holds other than printable ASCII. */
static int idempotency_key(struct req *r, struct job_spec *spec, struct err *e)
{
    const char *k = http_value(r, MHD_HEADER_KIND, "Idempotency-Key");
    size_t n = k ? strlen(k) : 0;

    spec->idempotency_key = NULL;
    if (n == 0)
        return 0;
    if (n > IDEMPOTENCY_KEY_MAX)
        return err_set(e, ERR_INVALID, "Idempotency-Key: %zu bytes, more than the limit of %d", n,
                       IDEMPOTENCY_KEY_MAX);
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)k[i] < 0x20 || (unsigned char)k[i] > 0x7e)
            return err_set(e, ERR_INVALID,
                           "Idempotency-Key: byte %zu is not printable ASCII (0x%02x)", i + 1,
                           (unsigned char)k[i]);
    spec->idempotency_key = k;
    return 0;
}

static void fill_defaults(struct job_call *c, struct model *m)
{
    c->spec.lease_timeout_ms = m->job_lease_timeout_ms;
    if (!c->spec.callback_url)
        c->spec.callback_url = m->callback_url;
    if (c->spec.max_attempts <= 0)
        c->spec.max_attempts = (int)c->r->srv->cfg.default_max_attempts;
    if (c->spec.ttl_s <= 0)
        c->spec.ttl_s = c->r->srv->cfg.default_ttl_s;
}

enum handled jobs_submit_infer(struct req *r, int64_t wait_ms)
{
    const char *hdr = http_value(r, MHD_HEADER_KIND, "Inference-Header-Content-Length");
    struct job_call *c;
    struct err e = {0};

    if (async_unavailable(r))
        return HANDLED_ANSWER;
    if (!(c = job_call_create(r)))
        return HANDLED_ANSWER;
    c->wait_ms = wait_ms;
    c->spec.model = r->model->name;
    c->spec.input = r->body.data ? r->body.data : "";
    c->spec.input_len = r->body.len;
    /* already validated by the decoder, which accepted this header */
    c->spec.input_json_len = hdr ? strtoll(hdr, NULL, 10) : -1;
    if (idempotency_key(r, &c->spec, &e) != 0)
        return http_fail(r, e.code, "%s", e.msg);
    fill_defaults(c, r->model);
    hash_request(c, c->spec.model, strlen(c->spec.model), c->spec.input, c->spec.input_len);
    c->spec.request_hash = c->request_hash;
    c->spec.tenant = http_owner(r);
    return enqueue(c);
}

/* An absent field leaves *out alone; null is "expected an integer", as any other non-integer. */
static int get_int(json_t *root, const char *key, int64_t min, int64_t max, int64_t *out,
                   struct err *e)
{
    return jfield_int(root, key, min, max, 0, out, NULL, e);
}

static int get_str(json_t *root, const char *key, const char **out, struct err *e)
{
    json_t *v = json_object_get(root, key);

    if (!v || json_is_null(v))
        return 0;
    if (!json_is_string(v) || json_string_length(v) == 0)
        return err_set(e, ERR_INVALID, "%s: expected a non-empty string", key);
    if (strlen(json_string_value(v)) != json_string_length(v)) /* the body may hold \u0000 */
        return err_set(e, ERR_INVALID, "%s: holds a NUL character (\\u0000)", key);
    *out = json_string_value(v);
    return 0;
}

static int check_url(const char *key, const char *url, struct err *e)
{
    struct err why = {0};

    if (url && notify_check_url(url, &why) != 0)
        return err_set(e, ERR_INVALID, "%s: %s", key, why.msg);
    return 0;
}

/* A location's scheme and --file-roots, and what a stat can tell now: a file location that
 * exists must be a regular file and, for an input, at most `max_bytes` (0: any size). S3 objects
 * and files that appear later are checked when the job runs. */
static int check_location(const char *key, const char *uri, int64_t max_bytes, struct err *e)
{
    struct err why = {0};
    int rc;

    if (!uri)
        return 0;
    if (strstr(uri, "://") && strncmp(uri, "file://", 7) != 0 && strncmp(uri, "s3://", 5) != 0)
        return err_set(e, ERR_INVALID, "%s: '%.100s': only paths, file:// and s3:// are supported",
                       key, uri);
    if (storage_check_allowed(uri, &why) != 0)
        return err_set(e, ERR_INVALID, "%s: %s", key, why.msg);
    rc = storage_check_object(uri, max_bytes, &why);
    if (rc == ERR_TOO_LARGE)
        return err_set(e, ERR_INVALID, "%s: %s (--max-input-bytes)", key, why.msg);
    if (rc != 0)
        return err_set(e, ERR_INVALID, "%s: %s", key, why.msg);
    return 0;
}

/* POST /v1/jobs: {"model", "input" | "input_location", ...} */
enum handled jobs_submit(struct req *r)
{
    struct model *m = NULL;
    struct infer_request *req = NULL;
    struct job_call *c;
    json_error_t jerr;
    json_t *root, *input;
    struct err e = {0};
    int64_t priority = 0, ttl = 0, attempts = 0;
    char *input_text = NULL;
    int rc;

    if (async_unavailable(r))
        return HANDLED_ANSWER;
    if (!(c = job_call_create(r)))
        return HANDLED_ANSWER;
    /* \u0000 is valid JSON: an inline input's "id" may hold it; get_str refuses it elsewhere */
    root = json_loadb(r->body.data ? r->body.data : "", r->body.len,
                      JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, &jerr);
    if (!root)
        return http_fail(r, ERR_INVALID, "malformed JSON at line %d column %d: %s", jerr.line,
                         jerr.column, jdoc_jansson_why(r->body.data, r->body.len, &jerr, 0));
    c->json = root;
    if (!json_is_object(root))
        return http_fail(r, ERR_INVALID, "the request body must be a JSON object");
    c->spec.input_json_len = -1;
    if ((rc = get_str(root, "model", &c->spec.model, &e)) ||
        (rc = get_str(root, "input_location", &c->spec.input_location, &e)) ||
        (rc = get_str(root, "output_location", &c->spec.output_location, &e)) ||
        (rc = get_str(root, "callback_url", &c->spec.callback_url, &e)) ||
        (rc = check_url("callback_url", c->spec.callback_url, &e)) ||
        (rc = check_location("input_location", c->spec.input_location, r->srv->cfg.max_input_bytes,
                             &e)) ||
        (rc = check_location("output_location", c->spec.output_location, 0, &e)) ||
        (rc = get_int(root, "priority", 0, 9, &priority, &e)) ||
        (rc = get_int(root, "ttl_s", 1, 365LL * 86400, &ttl, &e)) ||
        (rc = get_int(root, "max_attempts", 1, 100, &attempts, &e)))
        return http_fail(r, rc, "%s", e.msg);
    if (!c->spec.model)
        return http_fail(r, ERR_INVALID, "model: missing");
    input = json_object_get(root, "input");
    if (!input == !c->spec.input_location)
        return http_fail(r, ERR_INVALID, "give exactly one of input and input_location");
    rc = registry_acquire(r->srv->reg, c->spec.model, 0, &m, &e);
    if (rc != 0)
        return http_fail(r, rc, "%s", e.msg);
    r->model = m; /* released when the request completes */
    if (input) {
        if (!json_is_object(input) && m->info.json_io == INFERD_JSON_IO_NONE) {
            return http_fail(r, ERR_INVALID, "input: expected a v2 infer request object");
        }
        input_text = json_dumps(input, JSON_COMPACT | JSON_ENCODE_ANY);
        if (!input_text)
            return http_fail(r, ERR_NOMEM, "out of memory");
        /* check it now: a bad input is the client's 4xx, not a failed job later */
        rc = codec_decode_for_model(&m->info, input_text, strlen(input_text), -1, CODEC_FROM_CLIENT,
                                    &req, &e);
        if (rc == 0)
            rc = tensor_check_inputs(req, &m->info, &e);
        infer_request_destroy(req);
        if (rc != 0) {
            free(input_text);
            return http_fail(r, rc, "input: model '%s': %s", m->name, e.msg);
        }
        /* keep the text in the body buffer, which lives as long as the request */
        buf_release(&r->body);
        buf_puts(&r->body, input_text);
        free(input_text);
        c->spec.input = r->body.data;
        c->spec.input_len = r->body.len;
    }
    c->spec.priority = (int)priority;
    c->spec.ttl_s = ttl;
    c->spec.max_attempts = (int)attempts;
    if (idempotency_key(r, &c->spec, &e) != 0)
        return http_fail(r, e.code, "%s", e.msg);
    fill_defaults(c, m);
    {
        char *canon = json_dumps(root, JSON_COMPACT | JSON_SORT_KEYS);
        hash_request(c, canon ? canon : "", canon ? strlen(canon) : 0, "", 0);
        free(canon);
    }
    c->spec.request_hash = c->request_hash;
    c->spec.tenant = http_owner(r);
    return enqueue(c);
}

/* ---- reading, cancelling, listing (on the I/O pool: routes.c) ---- */

int http_valid_id(const char *id)
{
    size_t n = strlen(id);

    if (n == 0 || n >= 40)
        return 0;
    for (const char *p = id; *p; p++)
        if (!isalnum((unsigned char)*p) && *p != '-' && *p != '_')
            return 0;
    return 1;
}

/* Checks the route's {id} (it stays in r->params[0]): 0, or the answer set (no queue: 503;
 * not an id: 404). */
static int take_job_id(struct req *r)
{
    if (!r->srv->queue) {
        http_fail(r, ERR_UNAVAILABLE, "the async queue is not enabled");
        return -1;
    }
    if (!http_valid_id(r->params[0])) {
        http_fail(r, ERR_NOT_FOUND, "no job '%.40s'", r->params[0]);
        return -1;
    }
    return 0;
}

/* The call of a request that may wait for the job of its route's {id}; NULL with the answer
 * set. */
static struct job_call *take_job_call(struct req *r)
{
    struct job_call *c;

    if (take_job_id(r) != 0 || !(c = job_call_create(r)))
        return NULL;
    snprintf(c->job_id, sizeof(c->job_id), "%s", r->params[0]);
    return c;
}

/* ?wait=S: the seconds to wait for the job to end, in *wait_ms (0: none asked). */
static int parse_wait(struct req *r, int64_t *wait_ms, struct err *e)
{
    const char *w = http_value(r, MHD_GET_ARGUMENT_KIND, "wait");
    char *end;
    double secs;

    *wait_ms = 0;
    if (!w)
        return 0;
    errno = 0;
    secs = strtod(w, &end);
    if (errno || *end || end == w || secs < 0 || isnan(secs))
        return err_set(e, ERR_INVALID, "wait: expected seconds >= 0, got '%.32s'", w);
    if (secs > WAIT_MAX_S)
        return err_set(e, ERR_INVALID, "wait: %.32s seconds is above the limit of %d", w,
                       WAIT_MAX_S);
    *wait_ms = (int64_t)(secs * 1000);
    return 0;
}

/* GET /v1/jobs/{id}[?wait=S] */
enum handled jobs_get(struct req *r)
{
    struct job *j = NULL;
    struct job_call *c;
    struct err e;
    enum handled h;
    int rc;

    if (!(c = take_job_call(r)))
        return HANDLED_ANSWER;
    if (parse_wait(r, &c->wait_ms, &e) != 0)
        return http_fail(r, e.code, "%s", e.msg);
    rc = queue_get(r->srv->queue, c->job_id, http_viewer(r), 0, &j, &e);
    if (rc != 0)
        return http_fail(r, rc, "%s", e.msg);
    c->wait_mode = WAIT_STATUS;
    h = wait_or_answer(c, j);
    job_free(j);
    return h;
}

/* GET /v1/jobs/{id}/result */
enum handled jobs_result(struct req *r)
{
    struct job *j = NULL;
    struct err e;
    int rc;

    if (take_job_id(r) != 0)
        return HANDLED_ANSWER;
    rc = queue_get(r->srv->queue, r->params[0], http_viewer(r), 1, &j, &e);
    if (rc != 0) {
        http_set_error(r, rc, e.msg);
    } else if (j->state != JOB_SUCCEEDED) {
        char msg[160];
        snprintf(msg, sizeof(msg), "job %s is %s; its result exists once it has succeeded", j->id,
                 job_state_name(j->state));
        http_set_error(r, ERR_CONFLICT, msg);
    } else if (j->output_location) {
        /* written to storage: hand it back from there */
        buf_release(&r->out);
        int rc_get = storage_get(j->output_location, r->srv->cfg.max_input_bytes, &r->out, &e);
        if (rc_get != 0) {
            char msg[512];
            snprintf(msg, sizeof(msg), "the result at %s cannot be read: %s%s", j->output_location,
                     e.msg, rc_get == ERR_TOO_LARGE ? " (--max-input-bytes); read it there" : "");
            buf_release(&r->out);
            http_set_error(r, rc_get == ERR_TOO_LARGE ? ERR_TOO_LARGE : ERR_NOT_FOUND, msg);
        } else {
            r->status = 200;
            r->json_len = -1;
        }
    } else {
        answer_with_result(r, j);
    }
    job_free(j);
    return HANDLED_ANSWER;
}

/* DELETE /v1/jobs/{id}. A queued job ends cancelled at once. A running one is marked, and ends
 * cancelled when its worker stops it: wait a little for that, and answer 202 if it is still
 * running (blocked before it reached its model, or in a model that cannot stop). Never 200 for
 * a job that runs. */
enum handled jobs_cancel(struct req *r)
{
    struct job *j = NULL;
    struct job_call *c;
    struct err e;
    enum handled h;
    int rc;

    if (!(c = take_job_call(r)))
        return HANDLED_ANSWER;
    rc = queue_cancel(r->srv->queue, c->job_id, http_viewer(r), &j, &e);
    if (rc != 0)
        return http_fail(r, rc, "%s", e.msg);
    c->wait_mode = WAIT_CANCEL;
    c->wait_ms = CANCEL_WAIT_MS;
    h = wait_or_answer(c, j);
    job_free(j);
    return h;
}

/* POST /v1/jobs/{id}/retry */
enum handled jobs_retry(struct req *r)
{
    struct job *j = NULL;
    struct err e;
    int rc;

    if (take_job_id(r) != 0)
        return HANDLED_ANSWER;
    rc = queue_retry(r->srv->queue, r->params[0], http_viewer(r), &j, &e);
    if (rc != 0) {
        http_set_error(r, rc, e.msg);
    } else {
        reply_job(r, 202, j);
        set_location(r, r->params[0]);
    }
    job_free(j);
    return HANDLED_ANSWER;
}

/* GET /v1/jobs?status=&model=&cursor=&limit= */
enum handled jobs_list(struct req *r)
{
    const char *status = http_value(r, MHD_GET_ARGUMENT_KIND, "status");
    const char *model = http_value(r, MHD_GET_ARGUMENT_KIND, "model");
    const char *cursor = http_value(r, MHD_GET_ARGUMENT_KIND, "cursor");
    const char *limit = http_value(r, MHD_GET_ARGUMENT_KIND, "limit");
    struct queue_list_filter f = {.state = -1, .cancelling = -1, .limit = 100};
    struct err e;
    int rc;

    if (!r->srv->queue)
        return http_fail(r, ERR_UNAVAILABLE, "the async queue is not enabled");
    if (status && strcmp(status, "cancelling") == 0) { /* running, asked to cancel */
        f.state = JOB_RUNNING;
        f.cancelling = 1;
    } else if (status && *status && (f.state = job_state_parse(status)) < 0) {
        return http_fail(r, ERR_INVALID,
                         "status: '%.32s' is not queued, running, cancelling, succeeded, failed, "
                         "cancelled or expired",
                         status);
    } else if (f.state == JOB_RUNNING) {
        f.cancelling = 0;
    }
    if (limit) {
        char *end;
        long long n = strtoll(limit, &end, 10);
        if (*end || end == limit || n < 1 || n > 1000)
            return http_fail(r, ERR_INVALID, "limit: expected 1..1000, got '%.32s'", limit);
        f.limit = (int)n;
    }
    f.model = model && *model ? model : NULL;
    f.cursor = cursor && *cursor ? cursor : NULL;
    f.tenant = http_viewer(r);
    buf_release(&r->out);
    rc = queue_list(r->srv->queue, &f, &r->out, &e);
    if (rc != 0)
        return http_fail(r, rc, "%s", e.msg);
    r->status = 200;
    r->json_len = -1;
    return HANDLED_ANSWER;
}

#define RETRY_MAX 100000 /* jobs one bulk redrive sends back at most */

/* Sends back the jobs that match the filter `root` (a JSON object). */
static enum handled redrive(struct req *r, json_t *root)
{
    json_t *v;
    const char *key, *status = NULL, *model = NULL;
    int64_t limit = 10000, n = 0;
    struct queue_list_filter f = {.state = -1, .cancelling = -1};
    struct err e;
    int rc;

    json_object_foreach (root, key, v) {
        if (strcmp(key, "status") != 0 && strcmp(key, "model") != 0 && strcmp(key, "limit") != 0)
            return http_fail(r, ERR_INVALID,
                             "unknown field '%.64s' (a filter has status, model, limit)", key);
    }
    if ((rc = get_str(root, "status", &status, &e)) || (rc = get_str(root, "model", &model, &e)) ||
        (rc = get_int(root, "limit", 1, RETRY_MAX, &limit, &e)))
        return http_fail(r, rc, "%s", e.msg);
    if (status && (f.state = job_state_parse(status)) != JOB_FAILED && f.state != JOB_EXPIRED)
        return http_fail(r, ERR_INVALID,
                         "status: '%.32s': only failed or expired jobs are sent back", status);
    if (model && strlen(model) >= 128)
        return http_fail(r, ERR_INVALID, "model: longer than %d bytes", 127);
    f.model = model;
    f.limit = (int)limit;
    f.tenant = http_viewer(r); /* an admin route: every tenant's */
    rc = queue_retry_matching(r->srv->queue, &f, &n, &e);
    buf_release(&r->out);
    if (rc != 0)
        return http_fail(r, rc, "%s (%lld jobs were sent back before it)", e.msg, (long long)n);
    buf_printf(&r->out, "{\"retried\":%lld}", (long long)n);
    r->status = 200;
    r->json_len = -1;
    return HANDLED_ANSWER;
}

/* POST /v1/jobs/retry, the bulk redrive: {"status": "failed"|"expired" (default both),
 * "model": M, "limit": N} */
enum handled jobs_redrive(struct req *r)
{
    json_error_t jerr;
    json_t *root;
    enum handled h;

    if (!r->srv->queue)
        return http_fail(r, ERR_UNAVAILABLE, "the async queue is not enabled");
    if (http_refuse_draining(r))
        return HANDLED_ANSWER;
    root = json_loadb(r->body.data ? r->body.data : "{}", r->body.data ? r->body.len : 2,
                      JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return http_fail(r, ERR_INVALID, "malformed JSON at line %d column %d: %s", jerr.line,
                         jerr.column, jerr.text);
    h = json_is_object(root) ? redrive(r, root)
                             : http_fail(r, ERR_INVALID, "the request body must be a JSON object");
    json_decref(root);
    return h;
}

/* GET /v1/workers: the worker processes whose heartbeat is current, from the queue. */
enum handled jobs_workers(struct req *r)
{
    struct queue_worker *w = NULL;
    size_t n = 0;
    struct err e;
    int rc;

    if (!r->srv->queue)
        return http_fail(r, ERR_UNAVAILABLE, "the async queue is not enabled");
    rc = queue_workers_list(r->srv->queue, &w, &n, &e);
    buf_release(&r->out);
    if (rc != 0)
        http_set_error(r, rc, e.msg);
    else if (queue_workers_json(w, n, &r->out) != 0)
        http_set_error(r, ERR_NOMEM, "out of memory");
    else {
        r->status = 200;
        r->json_len = -1;
    }
    free(w);
    return HANDLED_ANSWER;
}

/* ---- metrics ---- */

int jobs_metrics(struct http_server *s, struct buf *out)
{
    int64_t counts[JOB_N_STATES];
    struct err e;
    int rc, workers = pool_size(s);
    int64_t queued;

    if (!s->queue)
        return 0;
    if (queue_counts(s->queue, counts, &e) != 0)
        return 0; /* metrics never fail the scrape over the job store */
    queued = counts[JOB_QUEUED];
    rc = buf_puts(out, "# HELP inferd_jobs Async jobs by state.\n# TYPE inferd_jobs gauge\n");
    for (int i = 0; rc == 0 && i < JOB_N_STATES; i++)
        rc = buf_printf(out, "inferd_jobs{state=\"%s\"} %lld\n", job_state_name(i),
                        (long long)counts[i]);
    if (rc == 0)
        rc = buf_printf(out,
                        "# HELP inferd_queue_depth Async jobs waiting for a worker.\n"
                        "# TYPE inferd_queue_depth gauge\ninferd_queue_depth %lld\n"
                        "# HELP inferd_queue_backlog_per_worker Jobs waiting per worker: the "
                        "autoscaling signal.\n# TYPE inferd_queue_backlog_per_worker gauge\n"
                        "inferd_queue_backlog_per_worker %g\n"
                        "# HELP inferd_workers_busy Workers running a job now.\n"
                        "# TYPE inferd_workers_busy gauge\ninferd_workers_busy %d\n"
                        "# HELP inferd_workers Workers in this process's pool (autoscaling "
                        "changes it).\n# TYPE inferd_workers gauge\ninferd_workers %d\n",
                        (long long)queued, workers > 0 ? (double)queued / workers : (double)queued,
                        pool_busy(s), workers);
    if (rc == 0 && s->notifier) {
        struct notify_stats ns;
        notify_get_stats(s->notifier, &ns);
        rc = buf_printf(out,
                        "# HELP inferd_webhook_deliveries_total Webhook attempts by outcome.\n"
                        "# TYPE inferd_webhook_deliveries_total counter\n"
                        "inferd_webhook_deliveries_total{outcome=\"delivered\"} %llu\n"
                        "inferd_webhook_deliveries_total{outcome=\"failed_attempt\"} %llu\n"
                        "inferd_webhook_deliveries_total{outcome=\"given_up\"} %llu\n",
                        (unsigned long long)ns.delivered, (unsigned long long)ns.attempts_failed,
                        (unsigned long long)ns.given_up);
    }
    return rc;
}
