/*
 * queue.c: the queue's public functions, dispatching to the implementation, and the JSON
 * shapes of a job and of a webhook event, shared by every implementation.
 */
#include "queue/queue_internal.h"
#include "core/url.h"
#include "core/clock.h"
#include "queue/redis/redis.h"
#include "notify/notify.h"

#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char *state_names[JOB_N_STATES] = {"queued", "running",   "succeeded",
                                                "failed", "cancelled", "expired"};

const char *job_state_name(enum job_state s)
{
    return (unsigned)s < JOB_N_STATES ? state_names[s] : "unknown";
}

int job_state_parse(const char *name)
{
    for (int i = 0; i < JOB_N_STATES; i++)
        if (strcmp(state_names[i], name) == 0)
            return i;
    return -1;
}

void job_free(struct job *j)
{
    if (!j)
        return;
    free(j->model);
    free(j->error);
    free(j->input_location);
    free(j->output_location);
    free(j->callback_url);
    for (size_t i = 0; i < j->n_notifications; i++) {
        free(j->notifications[i].event_id);
        free(j->notifications[i].error);
    }
    free(j->notifications);
    free(j->worker);
    for (size_t i = 0; i < j->n_history; i++) {
        free(j->history[i].worker);
        free(j->history[i].error);
    }
    free(j->history);
    free(j->tenant);
    buf_release(&j->input);
    buf_release(&j->result);
    free(j);
}

int (*queue_fault_hook)(const char *where, size_t index);

/* ---- tenants ---- */

int queue_tenant_set(char **dst, const char *stored)
{
    *dst = NULL;
    if (!stored || !stored[0])
        return 0;
    *dst = strdup(stored);
    return *dst ? 0 : ERR_NOMEM;
}

/* 1 when `asker` (NULL: every tenant) may see what `owner` (NULL or "": anonymous) owns. */
static int tenant_may_see(const char *asker, const char *owner)
{
    return !asker || strcmp(asker, queue_tenant_stored(owner)) == 0;
}

/* The one answer for a job that does not exist or that the asker may not see: the same code
 * and text for both, so an answer never tells another tenant's job from a missing id. */
static int job_not_found(struct err *e, const char *id)
{
    return err_set(e, ERR_NOT_FOUND, "no job '%.40s'", id);
}

static int batch_not_found(struct err *e, const char *id)
{
    return err_set(e, ERR_NOT_FOUND, "no batch job '%.40s'", id);
}

/* 0 when job `id` exists and `tenant` may see it; ERR_NOT_FOUND otherwise (or a read error).
 * Nothing to read when `tenant` is NULL. A job's tenant never changes, so what this read says
 * still holds for the change that follows it. */
static int job_check_tenant(struct queue *q, const char *id, const char *tenant, struct err *e)
{
    struct job *j = NULL;
    int rc;

    if (!tenant)
        return 0;
    rc = q->ops->jobs->get(q, id, 0, &j, e);
    if (rc == ERR_NOT_FOUND || (rc == 0 && !tenant_may_see(tenant, j->tenant)))
        rc = job_not_found(e, id);
    job_free(j);
    return rc;
}

/* As job_check_tenant, for a batch job or schedule. */
static int batch_check_tenant(struct queue *q, const char *id, const char *tenant, struct err *e)
{
    struct queue_schedule *s = NULL;
    int rc;

    if (!tenant)
        return 0;
    rc = q->ops->batch->definition(q, id, &s, e);
    if (rc == ERR_NOT_FOUND || (rc == 0 && !tenant_may_see(tenant, s->tenant)))
        rc = batch_not_found(e, id);
    queue_schedules_free(s, s ? 1 : 0);
    return rc;
}

int queue_job_add_attempt(struct job *j, int attempt, int64_t started_ms, int64_t ended_ms,
                          const char *worker, const char *error)
{
    struct job_attempt *h = realloc(j->history, (j->n_history + 1) * sizeof(*h));
    struct job_attempt *a;

    if (!h)
        return ERR_NOMEM;
    j->history = h;
    a = &h[j->n_history];
    *a = (struct job_attempt){.attempt = attempt, .started_ms = started_ms, .ended_ms = ended_ms};
    a->worker = worker && worker[0] ? strdup(worker) : NULL;
    a->error = error && error[0] ? strdup(error) : NULL;
    if ((worker && worker[0] && !a->worker) || (error && error[0] && !a->error)) {
        free(a->worker);
        free(a->error);
        return ERR_NOMEM;
    }
    j->n_history++;
    return 0;
}

int queue_job_add_notification(struct job *j, const char *event_id, int64_t at_ms, int status_code,
                               const char *error)
{
    struct job_notification *v = realloc(j->notifications, (j->n_notifications + 1) * sizeof(*v));
    struct job_notification *n;

    if (!v)
        return ERR_NOMEM;
    j->notifications = v;
    n = &v[j->n_notifications];
    *n = (struct job_notification){.at_ms = at_ms, .status_code = status_code};
    n->event_id = strdup(event_id ? event_id : "");
    n->error = error ? strdup(error) : NULL;
    if (!n->event_id || (error && !n->error)) {
        free(n->event_id);
        free(n->error);
        return ERR_NOMEM;
    }
    j->n_notifications++;
    return 0;
}

void queue_outbox_item_release(struct queue_outbox_item *it)
{
    free(it->event_id);
    free(it->url);
    free(it->body);
    memset(it, 0, sizeof(*it));
}

void queue_outbox_items_free(struct queue_outbox_item *items, size_t n)
{
    for (size_t i = 0; items && i < n; i++)
        queue_outbox_item_release(&items[i]);
    free(items);
}

int queue_open(const struct queue_config *cfg, struct queue **out, struct err *e)
{
    if (cfg->url &&
        (strncmp(cfg->url, "redis://", 8) == 0 || strncmp(cfg->url, "rediss://", 9) == 0))
        return queue_redis_open(cfg, out, e);
    if (cfg->url && queue_url_is_postgres(cfg->url))
        return queue_postgres_open(cfg, out, e);
    if (cfg->url && cfg->url[0] && strcmp(cfg->url, "sqlite") != 0) {
        char *shown = url_redacted(cfg->url); /* a password stays out of the message */
        int rc = err_set(e, ERR_INVALID,
                         "--queue %s: expected sqlite, redis://host:port/db, rediss://... or "
                         "postgresql://...",
                         shown ? shown : "(the URL given)");
        free(shown);
        return rc;
    }
    return queue_sqlite_open(cfg, out, e);
}

int queue_url_is_postgres(const char *url)
{
    return strncmp(url, "postgresql://", 13) == 0 || strncmp(url, "postgres://", 11) == 0;
}

void queue_close(struct queue *q)
{
    if (q)
        q->ops->close(q);
}

void queue_on_final(struct queue *q, queue_final_fn fn, void *ctx)
{
    q->on_final_ctx = ctx;
    q->on_final = fn;
    if (!fn) {
        /* one more write through the store: when it returns, no earlier group is still
         * calling the previous listener */
        q->ops->jobs->extend(q, "", 0, 0, NULL);
    }
}

int queue_enqueue(struct queue *q, const struct job_spec *spec, char id_out[40], int *existed,
                  struct err *e)
{
    return q->ops->jobs->enqueue(q, spec, id_out, existed, e);
}

int queue_lease(struct queue *q, const char *worker, int64_t wait_ms, struct job **out,
                struct err *e)
{
    size_t n = 0;
    int rc;

    *out = NULL;
    rc = q->ops->jobs->lease_many(q, worker, 1, 1, wait_ms, out, &n, e);
    if (n == 0)
        *out = NULL;
    return rc;
}

int queue_enqueue_async(struct queue *q, const struct job_spec *spec, queue_enqueue_fn fn,
                        void *ctx, struct err *e)
{
    return q->ops->jobs->enqueue_async(q, spec, fn, ctx, e);
}

int queue_lease_many(struct queue *q, const char *worker, size_t max, int max_tasks,
                     int64_t wait_ms, struct job **out, size_t *n, struct err *e)
{
    return q->ops->jobs->lease_many(q, worker, max, max_tasks, wait_ms, out, n, e);
}

int queue_finish_many(struct queue *q, struct queue_outcome *outs, size_t n, struct err *e)
{
    return q->ops->jobs->finish_many(q, outs, n, e);
}

int queue_extend(struct queue *q, const char *id, uint64_t token, int64_t lease_ms, struct err *e)
{
    return q->ops->jobs->extend(q, id, token, lease_ms, e);
}

/* Records one outcome; a fencing conflict is this call's error. */
static int finish_one(struct queue *q, struct queue_outcome *o, struct err *e)
{
    int rc = q->ops->jobs->finish_many(q, o, 1, e);

    if (rc == 0 && o->rc == ERR_CONFLICT)
        rc = err_set(e, ERR_CONFLICT, "job %s: attempt %llu no longer holds the lease", o->id,
                     (unsigned long long)o->token);
    return rc;
}

int queue_complete(struct queue *q, const char *id, uint64_t token, const char *result,
                   size_t result_len, int64_t result_json_len, struct err *e)
{
    struct queue_outcome o = {.id = id,
                              .token = token,
                              .ok = 1,
                              .result = result,
                              .result_len = result_len,
                              .result_json_len = result_json_len};

    return finish_one(q, &o, e);
}

int queue_fail(struct queue *q, const char *id, uint64_t token, const char *error, int retryable,
               struct err *e)
{
    struct queue_outcome o = {
        .id = id, .token = token, .ok = 0, .error = error, .retryable = retryable};

    return finish_one(q, &o, e);
}

int queue_cancel(struct queue *q, const char *id, const char *tenant, struct job **out,
                 struct err *e)
{
    int rc = job_check_tenant(q, id, tenant, e);

    *out = NULL;
    if (rc == 0)
        rc = q->ops->jobs->cancel(q, id, out, e);

    if (rc == 0 && *out && (*out)->state == JOB_RUNNING)
        queue_note_cancel(q, id);
    return rc;
}

static pthread_mutex_t cancel_lock = PTHREAD_MUTEX_INITIALIZER;

void queue_note_cancel(struct queue *q, const char *id)
{
    pthread_mutex_lock(&cancel_lock);
    snprintf(q->cancelled[q->n_cancelled % QUEUE_CANCEL_RING], sizeof(q->cancelled[0]), "%s", id);
    q->n_cancelled++;
    atomic_fetch_add(&q->cancel_gen, 1);
    pthread_mutex_unlock(&cancel_lock);
}

uint64_t queue_cancel_generation(struct queue *q)
{
    return atomic_load(&q->cancel_gen);
}

int queue_cancel_noted(struct queue *q, const char *id)
{
    int found = 0;

    pthread_mutex_lock(&cancel_lock);
    for (unsigned i = 0; i < QUEUE_CANCEL_RING && i < q->n_cancelled && !found; i++)
        found = strcmp(q->cancelled[i], id) == 0;
    pthread_mutex_unlock(&cancel_lock);
    return found;
}

int queue_retry(struct queue *q, const char *id, const char *tenant, struct job **out,
                struct err *e)
{
    int rc = job_check_tenant(q, id, tenant, e);

    *out = NULL;
    return rc ? rc : q->ops->jobs->retry(q, id, out, e);
}

/* A page of up to f->limit jobs matching `f`, newest first, into the caller's array `jobs` of
 * f->limit (job_free each of the `*n`). */
static int list_page(struct queue *q, const struct queue_list_filter *f, struct job **jobs,
                     size_t *n, struct err *e)
{
    *n = 0;
    return q->ops->jobs->list(q, f, jobs, n, e);
}

static void jobs_free(struct job **jobs, size_t n)
{
    for (size_t i = 0; i < n; i++)
        job_free(jobs[i]);
}

/* Appends to `ids` (a JSON array) the ids of up to `max` jobs in state `state` matching `f`. */
static int matching_ids(struct queue *q, const struct queue_list_filter *f, int state, size_t max,
                        json_t *ids, struct err *e)
{
    enum { PAGE = 1000 };
    struct job **jobs = calloc(PAGE, sizeof(*jobs));
    char cursor[40] = "";
    int rc = jobs ? 0 : err_set(e, ERR_NOMEM, "out of memory");

    while (rc == 0 && json_array_size(ids) < max) {
        struct queue_list_filter page = {.state = state,
                                         .cancelling = -1,
                                         .model = f->model,
                                         .cursor = cursor[0] ? cursor : NULL,
                                         .limit = PAGE,
                                         .tenant = f->tenant};
        size_t n = 0;
        rc = list_page(q, &page, jobs, &n, e);
        for (size_t i = 0; rc == 0 && i < n && json_array_size(ids) < max; i++)
            if (json_array_append_new(ids, json_string(jobs[i]->id)) != 0)
                rc = err_set(e, ERR_NOMEM, "out of memory");
        if (n > 0)
            snprintf(cursor, sizeof(cursor), "%s", jobs[n - 1]->id);
        jobs_free(jobs, n);
        if (n < PAGE)
            break;
    }
    free(jobs);
    return rc;
}

int queue_retry_matching(struct queue *q, const struct queue_list_filter *f, int64_t *n_retried,
                         struct err *e)
{
    json_t *ids = json_array(), *id;
    size_t max = f->limit > 0 ? (size_t)f->limit : 1, i;
    int rc = ids ? 0 : err_set(e, ERR_NOMEM, "out of memory");

    *n_retried = 0;
    /* the ids first: a job sent back leaves the listing under the cursor */
    if (rc == 0 && (f->state < 0 || f->state == JOB_FAILED))
        rc = matching_ids(q, f, JOB_FAILED, max, ids, e);
    if (rc == 0 && (f->state < 0 || f->state == JOB_EXPIRED))
        rc = matching_ids(q, f, JOB_EXPIRED, max, ids, e);
    json_array_foreach (ids, i, id) {
        struct job *j = NULL;
        int one;
        if (rc != 0)
            break;
        /* the listing took only f->tenant's, and a job's tenant never changes: no second look */
        one = q->ops->jobs->retry(q, json_string_value(id), &j, e);
        job_free(j);
        if (one == 0)
            (*n_retried)++;
        else if (one != ERR_CONFLICT && one != ERR_NOT_FOUND)
            rc = one; /* the store failed: those before are back in the queue, say how many */
    }
    json_decref(ids);
    return rc;
}

int queue_get(struct queue *q, const char *id, const char *tenant, int want_result,
              struct job **out, struct err *e)
{
    int rc = q->ops->jobs->get(q, id, want_result, out, e);

    if (rc == 0 && !tenant_may_see(tenant, (*out)->tenant)) {
        job_free(*out);
        *out = NULL;
        rc = job_not_found(e, id);
    }
    return rc;
}

int queue_batch_create(struct queue *q, const struct batch_job_spec *spec, char id_out[40],
                       struct err *e)
{
    struct batch_job_spec own = *spec;
    struct queue_schedule *parent = NULL;
    int rc = 0;

    /* a run of a schedule belongs to the schedule's tenant, whoever starts it (the scheduler
     * does not know it; run now by an admin must not move it to another tenant) */
    if (spec->parent) {
        rc = q->ops->batch->definition(q, spec->parent, &parent, e);
        if (rc == 0)
            own.tenant = parent->tenant;
        else if (rc == ERR_NOT_FOUND) /* the store says why it cannot run, as it always has */
            rc = 0;
    }
    if (rc == 0)
        rc = q->ops->batch->create(q, &own, id_out, e);
    queue_schedules_free(parent, parent ? 1 : 0);
    return rc;
}

/* Appends `b`'s JSON (when `rc` is 0) and frees it (an array of one). */
static int answer_batch_job(int rc, struct batch_job *b, struct buf *out, struct err *e)
{
    if (rc == 0 && queue_batch_job_json(b, out) != 0)
        rc = err_set(e, ERR_NOMEM, "out of memory");
    batch_jobs_free(b, b ? 1 : 0);
    return rc;
}

int queue_batch_get(struct queue *q, const char *id, const char *tenant, struct buf *out,
                    struct err *e)
{
    struct batch_job *b = NULL;

    int rc = q->ops->batch->get(q, id, &b, e);

    if (rc == 0 && !tenant_may_see(tenant, b->tenant)) {
        batch_jobs_free(b, 1);
        b = NULL;
        rc = batch_not_found(e, id);
    }
    return answer_batch_job(rc, b, out, e);
}

int queue_batch_list(struct queue *q, const char *tenant, int limit, const char *status,
                     struct buf *out, struct err *e)
{
    struct queue_batch_filter f = {.limit = limit, .tenant = tenant};
    struct batch_job *b = NULL;
    size_t n = 0;
    int rc = 0;

    if (queue_batch_filter_parse(status, &f))
        rc = q->ops->batch->list(q, &f, &b, &n, e);
    if (rc == 0 && queue_batch_list_json(b, n, out) != 0)
        rc = err_set(e, ERR_NOMEM, "out of memory");
    batch_jobs_free(b, n);
    return rc;
}

int queue_batch_definition(struct queue *q, const char *id, const char *tenant,
                           struct queue_schedule **out, struct err *e)
{
    int rc = q->ops->batch->definition(q, id, out, e);

    if (rc == 0 && !tenant_may_see(tenant, (*out)->tenant)) {
        queue_schedules_free(*out, 1);
        *out = NULL;
        rc = batch_not_found(e, id);
    }
    return rc;
}

int queue_batch_pause(struct queue *q, const char *id, const char *tenant, int paused,
                      int64_t next_run_ms, struct buf *out, struct err *e)
{
    struct batch_job *b = NULL;
    int rc = batch_check_tenant(q, id, tenant, e);

    if (rc == 0)
        rc = q->ops->batch->pause(q, id, paused, next_run_ms, &b, e);
    return answer_batch_job(rc, b, out, e);
}

int queue_batch_progress(struct queue *q, const char *batch_id, const char *task_id, uint64_t token,
                         int64_t records, struct err *e)
{
    return q->ops->batch->progress(q, batch_id, task_id, token, records, e);
}

int queue_batch_cancel(struct queue *q, const char *id, const char *tenant, struct buf *out,
                       struct err *e)
{
    struct batch_job *b = NULL;
    int rc = batch_check_tenant(q, id, tenant, e);

    if (rc == 0)
        rc = q->ops->batch->cancel(q, id, &b, e);
    return answer_batch_job(rc, b, out, e);
}

int queue_batch_manifest(struct queue *q, const char *id, const char *tenant, struct buf *out,
                         struct err *e)
{
    char *model = NULL, **results = NULL;
    size_t n = 0;
    int rc = batch_check_tenant(q, id, tenant, e);

    if (rc == 0)
        rc = q->ops->batch->results(q, id, &model, &results, &n, e);

    if (rc == 0 && queue_batch_manifest_json(model, results, n, out) != 0)
        rc = err_set(e, ERR_NOMEM, "out of memory");
    for (size_t i = 0; i < n; i++)
        free(results[i]);
    free(results);
    free(model);
    return rc;
}

int queue_schedules_due(struct queue *q, int64_t now_ms, struct queue_schedule **out, size_t *n,
                        struct err *e)
{
    return q->ops->batch->schedules_due(q, now_ms, out, n, e);
}

/* ---- workers ---- */

int queue_worker_beat(struct queue *q, const struct queue_worker *w, struct err *e)
{
    return q->ops->jobs->worker_beat(q, w, e);
}

int queue_worker_leave(struct queue *q, const char *id, struct err *e)
{
    return q->ops->jobs->worker_leave(q, id, e);
}

int queue_workers_list(struct queue *q, struct queue_worker **out, size_t *n, struct err *e)
{
    return q->ops->jobs->workers_list(q, out, n, e);
}

void queue_worker_id_of(const char *name, char out[96])
{
    const char *slash = strrchr(name, '/');
    size_t len = slash ? (size_t)(slash - name) : strlen(name);

    if (len > 95)
        len = 95;
    memcpy(out, name, len);
    out[len] = '\0';
}

int queue_workers_json(const struct queue_worker *w, size_t n, struct buf *out)
{
    int rc = buf_puts(out, "{\"workers\":[");

    for (size_t i = 0; rc == 0 && i < n; i++) {
        rc = buf_puts(out, i ? ",{\"id\":" : "{\"id\":");
        if (rc == 0)
            rc = buf_json_string(out, w[i].id);
        if (rc == 0)
            rc = buf_puts(out, ",\"host\":");
        if (rc == 0)
            rc = buf_json_string(out, w[i].host);
        if (rc == 0)
            rc = buf_printf(out, ",\"pid\":%d,\"started_at\":", w[i].pid);
        if (rc == 0)
            rc = queue_json_time(out, w[i].started_ms);
        if (rc == 0)
            rc = buf_puts(out, ",\"last_heartbeat\":");
        if (rc == 0)
            rc = queue_json_time(out, w[i].heartbeat_ms);
        if (rc == 0)
            rc = buf_printf(out, ",\"timeout_s\":%.3f,\"jobs_running\":%d}",
                            (double)w[i].timeout_ms / 1e3, w[i].jobs_running);
    }
    return rc ? rc : buf_puts(out, "]}");
}

int queue_outbox_exclusive(struct queue *q)
{
    return q->ops->outbox->exclusive;
}

void queue_schedules_free(struct queue_schedule *s, size_t n)
{
    for (size_t i = 0; s && i < n; i++) {
        free(s[i].definition);
        free(s[i].schedule);
        free(s[i].tenant);
    }
    free(s);
}

int queue_list(struct queue *q, const struct queue_list_filter *f, struct buf *out, struct err *e)
{
    struct job **jobs = calloc((size_t)(f->limit > 0 ? f->limit : 1), sizeof(*jobs));
    size_t n = 0;
    int rc = jobs ? list_page(q, f, jobs, &n, e) : err_set(e, ERR_NOMEM, "out of memory");
    int w = 0;

    if (rc == 0) {
        w = buf_puts(out, "{\"jobs\":[");
        for (size_t i = 0; w == 0 && i < n; i++) { /* each job as GET /v1/jobs/{id} shows it */
            if (i > 0)
                w = buf_puts(out, ",");
            if (w == 0)
                w = queue_job_json(jobs[i], out);
        }
        if (w == 0)
            w = buf_puts(out, "],\"next_cursor\":");
        if (w == 0) /* a full page may have more after it */
            w = (int)n == f->limit ? buf_json_string(out, jobs[n - 1]->id) : buf_puts(out, "null");
        if (w == 0)
            w = buf_puts(out, "}");
        if (w != 0)
            rc = err_set(e, ERR_NOMEM, "out of memory");
    }
    if (jobs)
        jobs_free(jobs, n);
    free(jobs);
    return rc;
}

int queue_counts(struct queue *q, int64_t counts[JOB_N_STATES], struct err *e)
{
    return q->ops->jobs->counts(q, counts, e);
}

int64_t queue_queued(struct queue *q)
{
    return q->ops->jobs->queued(q);
}

int queue_outbox_due(struct queue *q, int64_t now_ms, size_t max, struct queue_outbox_item **out,
                     size_t *n, struct err *e)
{
    return q->ops->outbox->due(q, now_ms, max, out, n, e);
}

int64_t queue_outbox_next_due(struct queue *q)
{
    return q->ops->outbox->next_due(q);
}

int queue_outbox_record(struct queue *q, const struct queue_outbox_attempt *a, struct err *e)
{
    return q->ops->outbox->record(q, a, e);
}

/* ---- JSON ---- */

int queue_json_time(struct buf *out, int64_t ms)
{
    char ts[40];
    struct tm tm;
    time_t secs = (time_t)(ms / 1000);

    if (ms <= 0)
        return buf_puts(out, "null");
    gmtime_r(&secs, &tm);
    strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%S", &tm);
    return buf_printf(out, "\"%s.%03dZ\"", ts, (int)(ms % 1000));
}

static int json_str_or_null(struct buf *out, const char *s)
{
    return s ? buf_json_string(out, s) : buf_puts(out, "null");
}

/* A callback URL as it may be shown back: its credentials masked (notify_url_redacted()). */
static int json_url_or_null(struct buf *out, const char *url)
{
    char *shown;
    int rc;

    if (!url)
        return buf_puts(out, "null");
    shown = notify_url_redacted(url);
    rc = shown ? buf_json_string(out, shown) : ERR_NOMEM;
    free(shown);
    return rc;
}

int queue_json_redact_url(json_t *o, const char *key)
{
    const char *url = json_string_value(json_object_get(o, key));
    char *shown;
    int rc;

    if (!url)
        return 0;
    shown = notify_url_redacted(url);
    rc = shown && json_object_set_new(o, key, json_string(shown)) == 0 ? 0 : ERR_NOMEM;
    free(shown);
    return rc;
}

/* ,"attempts_history":[{"attempt","started_at","ended_at","worker","error"}...] */
static int attempts_json(const struct job *j, struct buf *out)
{
    int rc = buf_puts(out, ",\"attempts_history\":[");

    for (size_t i = 0; rc == 0 && i < j->n_history; i++) {
        const struct job_attempt *a = &j->history[i];
        rc = buf_printf(out, "%s{\"attempt\":%d,\"started_at\":", i ? "," : "", a->attempt);
        if (rc == 0)
            rc = queue_json_time(out, a->started_ms);
        if (rc == 0)
            rc = buf_puts(out, ",\"ended_at\":");
        if (rc == 0)
            rc = queue_json_time(out, a->ended_ms);
        if (rc == 0)
            rc = buf_puts(out, ",\"worker\":");
        if (rc == 0)
            rc = json_str_or_null(out, a->worker);
        if (rc == 0)
            rc = buf_puts(out, ",\"error\":");
        if (rc == 0)
            rc = json_str_or_null(out, a->error);
        if (rc == 0)
            rc = buf_puts(out, "}");
    }
    return rc ? rc : buf_puts(out, "]");
}

/* [{"event_id","at","status_code","error"}...]: the job's webhook attempts */
static int notifications_json(const struct job *j, struct buf *out)
{
    int rc = buf_puts(out, "[");

    for (size_t i = 0; rc == 0 && i < j->n_notifications; i++) {
        const struct job_notification *n = &j->notifications[i];
        rc = buf_puts(out, i ? ",{\"event_id\":" : "{\"event_id\":");
        if (rc == 0)
            rc = buf_json_string(out, n->event_id);
        if (rc == 0)
            rc = buf_puts(out, ",\"at\":");
        if (rc == 0)
            rc = queue_json_time(out, n->at_ms);
        if (rc == 0)
            rc = buf_printf(out, ",\"status_code\":%d,\"error\":", n->status_code);
        if (rc == 0)
            rc = json_str_or_null(out, n->error);
        if (rc == 0)
            rc = buf_puts(out, "}");
    }
    return rc ? rc : buf_puts(out, "]");
}

int queue_job_json(const struct job *j, struct buf *out)
{
    int rc = buf_puts(out, "{\"id\":");

    if (rc == 0)
        rc = buf_json_string(out, j->id);
    if (rc == 0)
        rc = buf_puts(out, ",\"model\":");
    if (rc == 0)
        rc = json_str_or_null(out, j->model);
    if (rc == 0 && j->tenant && j->tenant[0]) { /* the anonymous tenant's JSON is as it was */
        rc = buf_puts(out, ",\"tenant\":");
        if (rc == 0)
            rc = buf_json_string(out, j->tenant);
    }
    if (rc == 0)
        rc = buf_printf(out,
                        ",\"status\":\"%s\",\"priority\":%d,\"attempts\":%d,"
                        "\"max_attempts\":%d,\"created_at\":",
                        j->state == JOB_RUNNING && j->cancel_requested ? "cancelling"
                                                                       : job_state_name(j->state),
                        j->priority, j->attempts, j->max_attempts);
    if (rc == 0)
        rc = queue_json_time(out, j->created_ms);
    if (rc == 0)
        rc = buf_puts(out, ",\"started_at\":");
    if (rc == 0)
        rc = queue_json_time(out, j->started_ms);
    if (rc == 0)
        rc = buf_puts(out, ",\"finished_at\":");
    if (rc == 0)
        rc = queue_json_time(out, j->finished_ms);
    if (rc == 0) { /* since it first started, until it finished */
        int64_t end = j->state == JOB_RUNNING ? clock_now_ms() : j->finished_ms;
        if (j->started_ms > 0 && end >= j->started_ms)
            rc = buf_printf(out, ",\"elapsed_s\":%.3f", (double)(end - j->started_ms) / 1e3);
        else
            rc = buf_puts(out, ",\"elapsed_s\":null");
    }
    if (rc == 0) /* DELETE while it ran: it ends cancelled once its worker stops it */
        rc = buf_printf(out, ",\"cancel_requested\":%s", j->cancel_requested ? "true" : "false");
    if (rc == 0)
        rc = buf_puts(out, ",\"error\":");
    if (rc == 0)
        rc = json_str_or_null(out, j->error);
    if (rc == 0)
        rc = buf_puts(out, ",\"output_location\":");
    if (rc == 0)
        rc = json_str_or_null(out, j->output_location);
    if (rc == 0)
        rc = buf_puts(out, ",\"callback_url\":");
    if (rc == 0)
        rc = json_url_or_null(out, j->callback_url);
    if (rc == 0) /* who holds it: only while it runs */
        rc = buf_puts(out, ",\"worker\":");
    if (rc == 0)
        rc = json_str_or_null(out, j->state == JOB_RUNNING ? j->worker : NULL);
    if (rc == 0)
        rc = attempts_json(j, out);
    if (rc == 0)
        rc = buf_puts(out, ",\"notifications\":");
    if (rc == 0)
        rc = notifications_json(j, out);
    return rc ? rc : buf_puts(out, "}");
}

int queue_event_json(const struct job *j, const char *event_id, int64_t inline_max_bytes,
                     struct buf *out)
{
    const char *type = j->state == JOB_SUCCEEDED   ? "job.succeeded"
                       : j->state == JOB_EXPIRED   ? "job.expired"
                       : j->state == JOB_CANCELLED ? "job.cancelled"
                                                   : "job.failed";
    int rc = buf_puts(out, "{\"id\":");

    if (rc == 0)
        rc = buf_json_string(out, event_id);
    if (rc == 0)
        rc = buf_printf(out, ",\"type\":\"%s\",\"job\":", type);
    if (rc == 0)
        rc = queue_job_json(j, out);
    if (rc == 0 && j->state == JOB_SUCCEEDED) {
        /* inline only a JSON result small enough; otherwise a link to it */
        if (j->result.len > 0 && j->result_json_len < 0 &&
            (int64_t)j->result.len <= inline_max_bytes) {
            rc = buf_puts(out, ",\"result\":");
            if (rc == 0)
                rc = buf_append(out, j->result.data, j->result.len);
        } else {
            rc = buf_printf(out, ",\"result_url\":\"/v1/jobs/%s/result\"", j->id);
        }
    }
    return rc ? rc : buf_puts(out, "}");
}
