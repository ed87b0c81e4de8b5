/*
 * batch.c: the Redis queue's batch jobs and schedules: creating a run (its hash and one task
 * job per input object, in one call), reading, listing, cancelling, pausing, its progress and
 * results, and the schedules due.
 */
#define _GNU_SOURCE
#include "core/clock.h"
#include "core/id.h"
#include "queue/redis/internal.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- batch jobs: a run is a hash plus one task job per input object (see the script) ---- */

static char *hget_dup_or_null(const redisReply *h, const char *name, int *ok)
{
    const char *s = rq_hget(h, name, NULL);
    char *d;

    if (!s || !s[0])
        return NULL;
    d = strdup(s);
    if (!d)
        *ok = 0;
    return d;
}

/* Fills `b` from a batch job's hash; `running_records`: what its running tasks have written so
 * far. 0 or ERR_NOMEM. */
static int batch_from_hash(const char *id, const redisReply *h, int64_t running_records,
                           struct batch_job *b)
{
    const char *parent = rq_hget(h, "parent", NULL);
    int ok = 1;

    snprintf(b->id, sizeof(b->id), "%s", id);
    if (parent)
        snprintf(b->parent, sizeof(b->parent), "%s", parent);
    b->definition = hget_dup_or_null(h, "definition", &ok);
    b->schedule = hget_dup_or_null(h, "schedule", &ok);
    b->state = (int)rq_hget_int(h, "state");
    b->output = hget_dup_or_null(h, "output", &ok);
    b->error = hget_dup_or_null(h, "error", &ok);
    b->created_ms = rq_hget_int(h, "created_ms");
    b->started_ms = rq_hget_int(h, "started_ms");
    b->finished_ms = rq_hget_int(h, "finished_ms");
    b->run_at_ms = rq_hget_int(h, "run_at_ms");
    b->next_run_ms = rq_hget_int(h, "next_run_ms");
    b->objects_total = rq_hget_int(h, "objects_total");
    b->objects_done = rq_hget_int(h, "objects_done");
    b->records_done = rq_hget_int(h, "records_done") + running_records;
    b->records_failed = rq_hget_int(h, "records_failed");
    b->tenant = hget_dup_or_null(h, "tenant", &ok); /* missing: anonymous, as before tenants */
    return ok ? 0 : ERR_NOMEM;
}

/* Reads batch job `id` into `b` (zeroed by the caller), with a schedule's latest runs. */
static int read_batch(struct redis_queue *q, redisContext *c, const char *id, int with_runs,
                      struct batch_job *b, struct err *e)
{
    redisReply *h = redisCommand(c, "HGETALL %sbatch:%s", q->prefix, id);
    const char *sched;
    int64_t running = 0;
    int rc = 0;

    if (!h)
        return err_set(e, ERR_UNAVAILABLE, "Redis at %s:%d: %s", q->host, q->port, c->errstr);
    if (h->type != REDIS_REPLY_ARRAY || h->elements == 0) {
        freeReplyObject(h);
        return err_set(e, ERR_NOT_FOUND, "no batch job '%.40s'", id);
    }
    sched = rq_hget(h, "schedule", NULL);
    if (!sched || !sched[0]) {
        redisReply *p = redisCommand(c, "HVALS %sbprog:%s", q->prefix, id);
        for (size_t i = 0; p && p->type == REDIS_REPLY_ARRAY && i < p->elements; i++)
            if (p->element[i]->type == REDIS_REPLY_STRING)
                running += strtoll(p->element[i]->str, NULL, 10);
        freeReplyObject(p);
    }
    if (batch_from_hash(id, h, running, b) != 0) {
        batch_job_release(b);
        rc = err_set(e, ERR_NOMEM, "out of memory");
    }
    freeReplyObject(h);
    if (rc == 0 && with_runs && b->schedule) {
        redisReply *ids = redisCommand(c, "ZREVRANGE %sruns:%s 0 49", q->prefix, id);
        size_t n = ids && ids->type == REDIS_REPLY_ARRAY ? ids->elements : 0;
        b->runs = n ? calloc(n, sizeof(*b->runs)) : NULL;
        for (size_t i = 0; b->runs && i < n; i++) {
            struct err re;
            if (read_batch(q, c, ids->element[i]->str, 0, &b->runs[b->n_runs], &re) == 0)
                b->n_runs++;
        }
        freeReplyObject(ids);
        if (n && !b->runs)
            rc = err_set(e, ERR_NOMEM, "out of memory");
    }
    return rc;
}

/* Batch job `id` as a new array of one. */
static int load_batch(struct redis_queue *q, redisContext *c, const char *id, int with_runs,
                      struct batch_job **out, struct err *e)
{
    struct batch_job *b = calloc(1, sizeof(*b));
    int rc = b ? read_batch(q, c, id, with_runs, b, e) : err_set(e, ERR_NOMEM, "out of memory");

    if (rc != 0) {
        batch_jobs_free(b, b ? 1 : 0);
        b = NULL;
    }
    *out = b;
    return rc;
}

int rq_batch_event_json(struct redis_queue *q, redisContext *c, const char *id,
                        const char *event_id, struct buf *out, struct err *e)
{
    struct batch_job *b = NULL;
    int rc = load_batch(q, c, id, 0, &b, e);

    if (rc == 0 && queue_batch_event_json(b, event_id, out) != 0)
        rc = err_set(e, ERR_NOMEM, "out of memory");
    batch_jobs_free(b, b ? 1 : 0);
    return rc;
}

static void add_arg(const char **v, size_t *len, int *argc, const char *s)
{
    v[*argc] = s ? s : "";
    len[*argc] = strlen(v[*argc]);
    (*argc)++;
}

static int r_batch_create(struct queue *qb, const struct batch_job_spec *s, char id_out[40],
                          struct err *e)
{
    struct redis_queue *q = rq(qb);
    size_t n = 32 + 2 * s->n_tasks; /* 24 fixed arguments, then id and input per task */
    const char **v = calloc(n, sizeof(*v));
    size_t *len = calloc(n, sizeof(*len));
    char(*ids)[40] = calloc(s->n_tasks ? s->n_tasks : 1, 40);
    char nums[8][32], raw[40];
    redisReply *r = NULL;
    redisContext *c = NULL;
    int argc = 0, rc = 0;

    if (!v || !len || !ids) {
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    id_new(raw);
    snprintf(id_out, 40, "batch-%s", raw);
#define ADD(str) add_arg(v, len, &argc, (str))
#define ADD_INT(i, val) (snprintf(nums[i], sizeof(nums[i]), "%lld", (long long)(val)), ADD(nums[i]))
    ADD("EVALSHA");
    ADD(q->sha);
    ADD("0");
    ADD("batch_create");
    ADD(q->prefix);
    ADD_INT(0, clock_now_ms());
    ADD(id_out);
    ADD(s->parent);
    ADD_INT(1, s->run_at_ms);
    ADD_INT(2, s->by_hand ? -1 : s->parent_next_run_ms);
    ADD_INT(3, q->cfg.max_queued);
    ADD_INT(4, q->cfg.result_ttl_s);
    ADD(s->definition);
    ADD(s->model);
    ADD(s->schedule);
    ADD(s->output);
    ADD(s->callback_url);
    ADD_INT(5, s->max_errors);
    ADD_INT(6, s->max_attempts);
    ADD_INT(7, s->lease_timeout_ms);
    char next[32];
    snprintf(next, sizeof(next), "%lld", (long long)s->next_run_ms);
    ADD(next);
    ADD(s->finish_input);
    ADD(s->error);
    ADD(queue_tenant_stored(s->tenant));
    for (size_t i = 0; !s->schedule && !s->error && i < s->n_tasks; i++) {
        id_new(ids[i]);
        ADD(ids[i]);
        ADD(s->task_inputs[i]);
    }
#undef ADD
#undef ADD_INT
    c = rq_take_conn(q, e);
    if (!c) {
        rc = e->code;
        goto cleanup;
    }
    r = redisCommandArgv(c, argc, v, len);
    if (!r) {
        rc = err_set(e, ERR_UNAVAILABLE, "Redis at %s:%d: %s", q->host, q->port, c->errstr);
    } else if (r->type == REDIS_REPLY_ERROR) {
        rc = err_set(e, ERR_IO, "Redis: %.200s", r->str);
    } else if (r->type != REDIS_REPLY_ARRAY || r->elements != 2) {
        rc = err_set(e, ERR_IO, "Redis: unexpected answer to batch_create");
    } else if (strcmp(r->element[0]->str, "conflict") == 0) {
        rc = err_set(e, ERR_CONFLICT, "schedule %s is no longer due at that time", s->parent);
    } else if (strcmp(r->element[0]->str, "busy") == 0) {
        rc = queue_admit(&q->cfg, strtoll(r->element[1]->str, NULL, 10), (int64_t)s->n_tasks, e);
        if (rc == 0) /* the script saw more waiting than its answer says */
            rc = err_set(e, ERR_BUSY, "the queue is full (--max-queue)");
    }
cleanup:
    freeReplyObject(r);
    rq_give_conn(q, c);
    free(v);
    free(len);
    free(ids);
    return rc;
}

static int r_batch_get(struct queue *qb, const char *id, struct batch_job **out, struct err *e)
{
    struct redis_queue *q = rq(qb);
    redisContext *c = rq_take_conn(q, e);
    int rc;

    *out = NULL;
    if (!c)
        return e->code;
    rc = load_batch(q, c, id, 1, out, e);
    rq_give_conn(q, c);
    return rc;
}

#define LIST_PAGE 200        /* batch jobs read per round trip when filtering by status */
#define LIST_SCAN_MAX 100000 /* a status filter looks this far back at most */

/* Whether `b` passes the listing's filter. */
static int batch_matches(const struct batch_job *b, const struct queue_batch_filter *f)
{
    return (f->schedules < 0 || f->schedules == (b->schedule != NULL)) &&
           (f->state < 0 || f->state == b->state) &&
           (!f->tenant || strcmp(f->tenant, b->tenant ? b->tenant : "") == 0);
}

static int r_batch_list(struct queue *qb, const struct queue_batch_filter *f,
                        struct batch_job **out, size_t *n, struct err *e)
{
    struct redis_queue *q = rq(qb);
    redisContext *c = rq_take_conn(q, e);
    int filtered = f->schedules >= 0 || f->state >= 0 || (f->tenant && !f->tenant[0]);
    struct batch_job *v = calloc((size_t)(f->limit > 0 ? f->limit : 1), sizeof(*v));
    redisReply *ids = NULL;
    int rc = 0;
    long start = 0, page = filtered ? LIST_PAGE : f->limit;

    *out = NULL;
    *n = 0;
    if (!c || !v) {
        free(v);
        rq_give_conn(q, c);
        return c ? err_set(e, ERR_NOMEM, "out of memory") : e->code;
    }
    /* the filter is on each one's state, so it reads each */
    while ((int)*n < f->limit && start < LIST_SCAN_MAX) {
        /* another tenant's from its own index; the anonymous tenant's (which data written
         * before tenants holds, unindexed) from all, filtered */
        ids = f->tenant && f->tenant[0]
                  ? redisCommand(c, "ZREVRANGE %stbatches:%s %ld %ld", q->prefix, f->tenant,
                                 start, start + page - 1)
                  : redisCommand(c, "ZREVRANGE %sbatches %ld %ld", q->prefix, start,
                                 start + page - 1);
        if (!ids) {
            rc = err_set(e, ERR_UNAVAILABLE, "Redis at %s:%d: %s", q->host, q->port, c->errstr);
            break;
        }
        if (ids->type != REDIS_REPLY_ARRAY)
            break;
        for (size_t i = 0; (int)*n < f->limit && i < ids->elements; i++) {
            struct err be;
            if (read_batch(q, c, ids->element[i]->str, 1, &v[*n], &be) != 0)
                continue;
            if (batch_matches(&v[*n], f))
                (*n)++;
            else
                batch_job_release(&v[*n]);
        }
        if (ids->elements < (size_t)page || !filtered)
            break;
        start += page;
        freeReplyObject(ids);
        ids = NULL;
    }
    freeReplyObject(ids);
    rq_give_conn(q, c);
    if (rc != 0) {
        batch_jobs_free(v, *n);
        *n = 0;
        return rc;
    }
    *out = v;
    return 0;
}

static int r_batch_cancel(struct queue *qb, const char *id, struct batch_job **out, struct err *e)
{
    struct redis_queue *q = rq(qb);
    struct args a;
    redisReply *r;
    int64_t v = -1;

    *out = NULL;
    rq_script_args(q, &a, "batch_cancel");
    rq_arg(&a, id);
    rq_arg_int(&a, q->cfg.result_ttl_s);
    r = rq_run(q, &a, e);
    if (!r)
        return e->code;
    rq_int_reply(r, &v);
    freeReplyObject(r);
    if (v == -1)
        return err_set(e, ERR_NOT_FOUND, "no batch job '%.40s'", id);
    if (v == -2) {
        struct batch_job *b = NULL;
        int rc = r_batch_get(qb, id, &b, e);
        rc = err_set(e, ERR_CONFLICT, "batch job %s is already %s", id,
                     rc == 0 ? batch_job_status(b) : "over");
        batch_jobs_free(b, b ? 1 : 0);
        return rc;
    }
    return r_batch_get(qb, id, out, e);
}

static int r_batch_results(struct queue *qb, const char *id, char **model, char ***results,
                           size_t *n, struct err *e)
{
    struct redis_queue *q = rq(qb);
    redisContext *c = rq_take_conn(q, e);
    redisReply *m = NULL, *tasks = NULL;
    char **v = NULL;
    int rc = 0;

    *model = NULL;
    *results = NULL;
    *n = 0;
    if (!c)
        return e->code;
    m = redisCommand(c, "HGET %sbatch:%s model", q->prefix, id);
    tasks = redisCommand(c, "SMEMBERS %sbtasks:%s", q->prefix, id);
    if (!m || !tasks) {
        rc = err_set(e, ERR_UNAVAILABLE, "Redis at %s:%d: %s", q->host, q->port, c->errstr);
        goto cleanup;
    }
    if (m->type != REDIS_REPLY_STRING) {
        rc = err_set(e, ERR_NOT_FOUND, "no batch job '%.40s'", id);
        goto cleanup;
    }
    *model = strdup(m->str);
    if (tasks->type == REDIS_REPLY_ARRAY && tasks->elements > 0)
        v = calloc(tasks->elements, sizeof(*v));
    if (!*model || (tasks->type == REDIS_REPLY_ARRAY && tasks->elements > 0 && !v)) {
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    for (size_t i = 0; v && i < tasks->elements; i++) {
        redisReply *t =
            redisCommand(c, "HMGET %sjob:%s kind state result", q->prefix, tasks->element[i]->str);
        if (t && t->type == REDIS_REPLY_ARRAY && t->elements == 3 && t->element[0]->str &&
            strcmp(t->element[0]->str, "1") == 0 && t->element[1]->str &&
            strcmp(t->element[1]->str, "2") == 0 && t->element[2]->str) {
            v[*n] = strndup(t->element[2]->str, t->element[2]->len);
            if (!v[(*n)++])
                rc = err_set(e, ERR_NOMEM, "out of memory");
        }
        freeReplyObject(t);
    }
cleanup:
    freeReplyObject(m);
    freeReplyObject(tasks);
    rq_give_conn(q, c);
    if (rc != 0) {
        for (size_t i = 0; i < *n; i++)
            free(v[i]);
        free(v);
        free(*model);
        *model = NULL;
        *n = 0;
        return rc;
    }
    *results = v;
    return 0;
}

static int r_batch_definition(struct queue *qb, const char *id, struct queue_schedule **out,
                              struct err *e)
{
    struct redis_queue *q = rq(qb);
    redisContext *c = rq_take_conn(q, e);
    struct queue_schedule *s = calloc(1, sizeof(*s));
    redisReply *h = NULL;
    int rc = 0;

    *out = NULL;
    if (!c || !s) {
        rc = c ? err_set(e, ERR_NOMEM, "out of memory") : e->code;
        goto cleanup;
    }
    h = redisCommand(c, "HMGET %sbatch:%s definition schedule next_run_ms state tenant", q->prefix,
                     id);
    if (!h) {
        rc = err_set(e, ERR_UNAVAILABLE, "Redis at %s:%d: %s", q->host, q->port, c->errstr);
    } else if (h->type != REDIS_REPLY_ARRAY || h->elements != 5 || !h->element[0]->str) {
        rc = err_set(e, ERR_NOT_FOUND, "no batch job '%.40s'", id);
    } else {
        snprintf(s->id, sizeof(s->id), "%s", id);
        s->definition = strdup(h->element[0]->str);
        if (h->element[1]->str && h->element[1]->str[0])
            s->schedule = strdup(h->element[1]->str);
        s->next_run_ms = h->element[2]->str ? strtoll(h->element[2]->str, NULL, 10) : 0;
        s->state = h->element[3]->str ? (int)strtol(h->element[3]->str, NULL, 10) : 0;
        if (!s->definition || (h->element[1]->str && h->element[1]->str[0] && !s->schedule) ||
            queue_tenant_set(&s->tenant, h->element[4]->str) != 0)
            rc = err_set(e, ERR_NOMEM, "out of memory");
    }
cleanup:
    freeReplyObject(h);
    rq_give_conn(q, c);
    if (rc != 0)
        queue_schedules_free(s, 1);
    else
        *out = s;
    return rc;
}

static int r_batch_pause(struct queue *qb, const char *id, int paused, int64_t next_run_ms,
                         struct batch_job **out, struct err *e)
{
    struct redis_queue *q = rq(qb);
    struct args a;
    redisReply *r;
    int64_t v = -1;

    rq_script_args(q, &a, "batch_pause");
    rq_arg(&a, id);
    rq_arg_int(&a, paused);
    rq_arg_int(&a, next_run_ms);
    r = rq_run(q, &a, e);
    if (!r)
        return e->code;
    rq_int_reply(r, &v);
    freeReplyObject(r);
    if (v == -1)
        return err_set(e, ERR_NOT_FOUND, "no batch job '%.40s'", id);
    if (v == -2)
        return err_set(e, ERR_CONFLICT,
                       "batch job %s is a run, not a schedule: only schedules pause and resume",
                       id);
    if (v == -3)
        return err_set(e, ERR_CONFLICT, "schedule %s is cancelled", id);
    return r_batch_get(qb, id, out, e);
}

static int r_batch_progress(struct queue *qb, const char *batch_id, const char *task_id,
                            uint64_t token, int64_t records, struct err *e)
{
    struct redis_queue *q = rq(qb);
    struct args a;
    redisReply *r;

    rq_script_args(q, &a, "batch_progress");
    rq_arg(&a, task_id);
    rq_arg_int(&a, (int64_t)token);
    rq_arg(&a, batch_id);
    rq_arg_int(&a, records);
    r = rq_run(q, &a, e);
    if (!r)
        return e->code;
    freeReplyObject(r);
    return 0;
}

static int r_schedules_due(struct queue *qb, int64_t now_ms, struct queue_schedule **out, size_t *n,
                           struct err *e)
{
    struct redis_queue *q = rq(qb);
    redisContext *c = rq_take_conn(q, e);
    redisReply *ids;
    struct queue_schedule *v = NULL;
    int rc = 0;

    *out = NULL;
    *n = 0;
    if (!c)
        return e->code;
    ids = redisCommand(c, "ZRANGEBYSCORE %sschedules -inf %lld LIMIT 0 100", q->prefix,
                       (long long)now_ms);
    if (!ids)
        rc = err_set(e, ERR_UNAVAILABLE, "Redis at %s:%d: %s", q->host, q->port, c->errstr);
    else if (ids->type == REDIS_REPLY_ARRAY && ids->elements > 0 &&
             !(v = calloc(ids->elements, sizeof(*v))))
        rc = err_set(e, ERR_NOMEM, "out of memory");
    /* a schedule that cannot be read is left out (`*n` counts the others): it is due again at
     * the next look */
    for (size_t i = 0; v && i < ids->elements; i++) {
        redisReply *h = redisCommand(c, "HMGET %sbatch:%s definition schedule next_run_ms",
                                     q->prefix, ids->element[i]->str);
        struct queue_schedule *s = &v[*n];
        memset(s, 0, sizeof(*s));
        if (h && h->type == REDIS_REPLY_ARRAY && h->elements == 3 && h->element[0]->str &&
            h->element[1]->str && h->element[2]->str) {
            snprintf(s->id, sizeof(s->id), "%s", ids->element[i]->str);
            s->definition = strdup(h->element[0]->str);
            s->schedule = strdup(h->element[1]->str);
            s->next_run_ms = strtoll(h->element[2]->str, NULL, 10);
            if (s->definition && s->schedule && !queue_fault("schedules_due", i)) {
                (*n)++;
            } else {
                free(s->definition);
                free(s->schedule);
                memset(s, 0, sizeof(*s));
            }
        }
        freeReplyObject(h);
    }
    freeReplyObject(ids);
    rq_give_conn(q, c);
    if (*n == 0) {
        free(v);
        v = NULL;
    }
    *out = v;
    return rc;
}

const struct queue_batch_ops rq_batch_ops = {
    .create = r_batch_create,
    .get = r_batch_get,
    .list = r_batch_list,
    .cancel = r_batch_cancel,
    .pause = r_batch_pause,
    .results = r_batch_results,
    .definition = r_batch_definition,
    .progress = r_batch_progress,
    .schedules_due = r_schedules_due,
};
