/*
 * jobs.c: the Redis queue's jobs: enqueue (one call, or pipelined by the asynchronous enqueue
 * thread), lease (lease tickets for answers lost with the connection), extend, finish, cancel,
 * retry, and reading them back (get, list, counts). Each change is one call of queue.lua.
 */
#define _GNU_SOURCE
#include "core/clock.h"
#include "core/id.h"
#include "queue/redis/internal.h"
#include "core/log.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/random.h>

/* ---- jobs from hashes ---- */

/* rq_hget_dup() that clears `*ok` when a field present could not be copied. */
static char *hget_dup_ok(const redisReply *h, const char *name, int *ok)
{
    char *s = rq_hget_dup(h, name);

    if (!s && rq_hget(h, name, NULL) && rq_hget(h, name, NULL)[0])
        *ok = 0;
    return s;
}

/* A job from its HGETALL reply; `with_input` / `with_result` also copy those. NULL when out of
 * memory: never a job missing a field it has (no output_location would store the result
 * inline; no input would fail the job for good). */
static struct job *job_from_hash(const char *id, const redisReply *h, int with_input,
                                 int with_result)
{
    struct job *j = calloc(1, sizeof(*j));
    const char *s;
    size_t len = 0;
    int ok = 1;

    if (!j)
        return NULL;
    snprintf(j->id, sizeof(j->id), "%s", id);
    j->model = hget_dup_ok(h, "model", &ok);
    j->state = (enum job_state)rq_hget_int(h, "state");
    j->priority = (int)rq_hget_int(h, "priority");
    j->attempts = (int)rq_hget_int(h, "attempts");
    j->max_attempts = (int)rq_hget_int(h, "max_attempts");
    j->created_ms = rq_hget_int(h, "created_ms");
    j->started_ms = rq_hget_int(h, "started_ms");
    j->finished_ms = rq_hget_int(h, "finished_ms");
    j->lease_timeout_ms = rq_hget_int(h, "lease_timeout_ms");
    j->ttl_s = rq_hget_int(h, "ttl_s");
    j->error = hget_dup_ok(h, "error", &ok);
    j->input_location = hget_dup_ok(h, "input_location", &ok);
    j->output_location = hget_dup_ok(h, "output_location", &ok);
    j->callback_url = hget_dup_ok(h, "callback_url", &ok);
    j->cancel_requested = (int)rq_hget_int(h, "cancel_requested");
    j->worker = hget_dup_ok(h, "wid", &ok);
    j->attempts_uncounted = (int)rq_hget_int(h, "extra_attempts");
    j->kind = (enum job_kind)rq_hget_int(h, "kind");
    if (queue_tenant_set(&j->tenant, rq_hget(h, "tenant", NULL)) != 0) /* missing: anonymous */
        ok = 0;
    if ((s = rq_hget(h, "batch_id", NULL)))
        snprintf(j->batch_id, sizeof(j->batch_id), "%s", s);
    j->token = (uint64_t)j->attempts;
    j->input_json_len = -1;
    j->result_json_len = -1;
    if (with_input && (s = rq_hget(h, "input", &len))) {
        if (buf_append(&j->input, s, len) != 0)
            ok = 0;
        j->input_json_len = rq_hget_int(h, "input_json_len");
    }
    if (with_result && (s = rq_hget(h, "result", &len))) {
        if (buf_append(&j->result, s, len) != 0)
            ok = 0;
        j->result_json_len =
            rq_hget(h, "result_json_len", NULL) ? rq_hget_int(h, "result_json_len") : -1;
    }
    if (!ok) {
        job_free(j);
        return NULL;
    }
    return j;
}

int rq_load_job(struct redis_queue *q, redisContext *c, const char *id, int with_input,
                int with_result, struct job **out, struct err *e)
{
    char key[128];
    redisReply *r;

    *out = NULL;
    snprintf(key, sizeof(key), "%sjob:%s", q->prefix, id);
    r = redisCommand(c, "HGETALL %s", key);
    if (!r)
        return err_set(e, ERR_UNAVAILABLE, "Redis at %s:%d: %s", q->host, q->port, c->errstr);
    if (r->type != REDIS_REPLY_ARRAY || r->elements == 0) {
        freeReplyObject(r);
        return err_set(e, ERR_NOT_FOUND, "no job '%.40s'", id);
    }
    *out = job_from_hash(id, r, with_input, with_result);
    freeReplyObject(r);
    return *out ? 0 : err_set(e, ERR_NOMEM, "out of memory");
}

/* ---- operations ---- */

static void enqueue_args(struct redis_queue *q, struct args *a, const struct job_spec *s,
                         const char *id)
{
    rq_script_args(q, a, "enqueue");
    rq_arg(a, id);
    rq_arg(a, s->idempotency_key);
    rq_arg(a, s->request_hash);
    rq_arg_int(a, q->cfg.max_queued);
    rq_arg(a, "model"), rq_arg(a, s->model);
    rq_arg(a, "priority"), rq_arg_int(a, s->priority);
    rq_arg(a, "max_attempts"), rq_arg_int(a, s->max_attempts);
    rq_arg(a, "lease_timeout_ms"), rq_arg_int(a, s->lease_timeout_ms);
    rq_arg(a, "ttl_s"), rq_arg_int(a, s->ttl_s);
    rq_arg(a, "kind"), rq_arg_int(a, s->kind);
    rq_arg(a, "batch_id"), rq_arg(a, s->batch_id);
    rq_arg(a, "input_location"), rq_arg(a, s->input_location);
    rq_arg(a, "output_location"), rq_arg(a, s->output_location);
    rq_arg(a, "callback_url"), rq_arg(a, s->callback_url);
    rq_arg(a, "input_json_len"), rq_arg_int(a, s->input_json_len);
    if (s->tenant && s->tenant[0]) /* the anonymous tenant's job is stored as before tenants */
        rq_arg(a, "tenant"), rq_arg(a, s->tenant);
    if (s->input)
        rq_arg(a, "input"), rq_arg_bin(a, s->input, s->input_len);
}

/* The enqueue script's answer: {"ok", id}, {"existed", id, its request hash} or {"busy",
 * how many wait}; the core's rules decide what the last two mean. */
static int enqueue_reply(struct redis_queue *q, const struct job_spec *s, redisReply *r,
                         char id_out[40], int *existed, struct err *e)
{
    const char *status;

    if (r->type != REDIS_REPLY_ARRAY || r->elements < 2 || !r->element[0]->str ||
        !r->element[1]->str)
        return err_set(e, ERR_IO, "Redis: unexpected answer to enqueue");
    status = r->element[0]->str;
    snprintf(id_out, 40, "%s", r->element[1]->str);
    *existed = strcmp(status, "existed") == 0;
    if (*existed)
        return queue_idem_match(s, id_out, r->elements > 2 ? r->element[2]->str : NULL, e);
    if (strcmp(status, "busy") == 0) {
        int rc = queue_admit(&q->cfg, strtoll(r->element[1]->str, NULL, 10), 1, e);
        id_out[0] = '\0';
        /* the script saw more waiting than its answer says */
        return rc ? rc : err_set(e, ERR_BUSY, "the queue is full (--max-queue)");
    }
    return 0;
}

static int r_enqueue(struct queue *qb, const struct job_spec *spec, char id_out[40], int *existed,
                     struct err *e)
{
    struct redis_queue *q = rq(qb);
    struct args a;
    char id[40];
    redisReply *r;
    int rc;

    id_new(id);
    enqueue_args(q, &a, spec, id);
    r = rq_run(q, &a, e);
    if (!r)
        return e->code;
    rc = enqueue_reply(q, spec, r, id_out, existed, e);
    freeReplyObject(r);
    return rc;
}

/* The asynchronous enqueues of HTTP threads, pipelined on one connection. */
void *rq_async_main(void *self)
{
    struct redis_queue *q = self;
    redisContext *c = NULL;

    pthread_mutex_lock(&q->lock);
    for (;;) {
        struct async_op *ops;
        while (!q->async_head && !q->stopping)
            pthread_cond_wait(&q->async_cond, &q->lock);
        if (!q->async_head)
            break;
        ops = q->async_head;
        q->async_head = q->async_tail = NULL;
        pthread_mutex_unlock(&q->lock);

        struct err e = {0};
        if (!c || c->err) {
            redisFree(c);
            c = rq_connect_redis(q, &e);
            if (!c)
                rq_note_down(q, e.msg);
        }
        for (struct async_op *o = ops; c && o; o = o->next) {
            struct args a;
            id_new(o->id);
            enqueue_args(q, &a, &o->spec, o->id);
            redisAppendCommandArgv(c, a.n, a.v, a.len);
        }
        for (struct async_op *o = ops, *next; o; o = next) {
            redisReply *r = NULL;
            char id[40] = "";
            int existed = 0, rc;
            next = o->next;
            if (c && redisGetReply(c, (void **)&r) == REDIS_OK && r) {
                rc = r->type == REDIS_REPLY_ERROR ? err_set(&e, ERR_IO, "Redis: %.200s", r->str)
                                                  : enqueue_reply(q, &o->spec, r, id, &existed, &e);
            } else {
                rc = err_set(&e, ERR_UNAVAILABLE, "Redis at %s:%d: %s", q->host, q->port,
                             c ? c->errstr : e.msg);
            }
            freeReplyObject(r);
            o->fn(o->ctx, rc, &e, id, existed);
            free(o);
        }
        if (c && !c->err)
            rq_note_up(q);
        pthread_mutex_lock(&q->lock);
    }
    pthread_mutex_unlock(&q->lock);
    redisFree(c);
    return NULL;
}

static int r_enqueue_async(struct queue *qb, const struct job_spec *spec, queue_enqueue_fn fn,
                           void *ctx, struct err *e)
{
    struct redis_queue *q = rq(qb);
    struct async_op *o;

    if (atomic_load(&q->down_since_ms) != 0)
        return err_set(e, ERR_UNAVAILABLE, "the job queue (Redis at %s:%d) is unreachable", q->host,
                       q->port);
    o = calloc(1, sizeof(*o));
    if (!o)
        return err_set(e, ERR_NOMEM, "out of memory");
    o->spec = *spec;
    o->fn = fn;
    o->ctx = ctx;
    pthread_mutex_lock(&q->lock);
    if (q->stopping) {
        pthread_mutex_unlock(&q->lock);
        free(o);
        return err_set(e, ERR_UNAVAILABLE, "the job store is closing");
    }
    if (q->async_tail)
        q->async_tail->next = o;
    else
        q->async_head = o;
    q->async_tail = o;
    pthread_cond_signal(&q->async_cond);
    pthread_mutex_unlock(&q->lock);
    return 0;
}

/* Waits up to `ms` for a new entry on any priority stream. */
static void wait_for_work(struct redis_queue *q, redisContext *c, int64_t ms)
{
    const char *argv[26];
    char keys[10][96];
    char block[24];
    int n = 0;

    snprintf(block, sizeof(block), "%lld", (long long)ms);
    argv[n++] = "XREAD";
    argv[n++] = "BLOCK";
    argv[n++] = block;
    argv[n++] = "STREAMS";
    for (int p = 9; p >= 0; p--) {
        snprintf(keys[p], sizeof(keys[p]), "%sq:%d", q->prefix, p);
        argv[n++] = keys[p];
    }
    for (int p = 0; p < 10; p++)
        argv[n++] = "$";
    freeReplyObject(redisCommandArgv(c, n, argv, NULL));
}

/* The ticket of `worker`'s next lease call: the one whose answer it lost, if any (`*lost` 1:
 * the call hands those jobs back to the queue; see lease() in the script), else a new one. */
static void lease_ticket(struct redis_queue *q, const char *worker, char ticket[40], int *lost)
{
    *lost = 0;
    pthread_mutex_lock(&q->lock);
    for (int i = 0; i < LOST_LEASES && !*lost; i++) {
        if (q->lost[i].worker[0] && strncmp(q->lost[i].worker, worker, WORKER_NAME_MAX) == 0) {
            snprintf(ticket, 40, "%s", q->lost[i].ticket);
            *lost = 1;
        }
    }
    pthread_mutex_unlock(&q->lock);
    if (!*lost)
        id_new(ticket);
}

/* After a lease call: an answer that arrived settles the worker's lost ticket; one that did
 * not (the call was sent, then the connection failed) keeps its ticket for the next call.
 * Past LOST_LEASES workers at once, the jobs of a lost answer wait out their lease. */
static void lease_answered(struct redis_queue *q, const char *worker, const char *ticket,
                           int answered)
{
    int slot = -1;

    pthread_mutex_lock(&q->lock);
    for (int i = 0; i < LOST_LEASES; i++) {
        if (q->lost[i].worker[0] && strncmp(q->lost[i].worker, worker, WORKER_NAME_MAX) == 0)
            slot = i;
        else if (!q->lost[i].worker[0] && slot < 0 && !answered)
            slot = i;
    }
    if (slot >= 0 && answered) {
        q->lost[slot].worker[0] = '\0';
    } else if (slot >= 0) {
        snprintf(q->lost[slot].worker, sizeof(q->lost[slot].worker), "%s", worker);
        snprintf(q->lost[slot].ticket, sizeof(q->lost[slot].ticket), "%s", ticket);
    }
    pthread_mutex_unlock(&q->lock);
}

static int r_lease_many(struct queue *qb, const char *worker, size_t max, int max_tasks,
                        int64_t wait_ms, struct job **out, size_t *n, struct err *e)
{
    struct redis_queue *q = rq(qb);
    redisContext *c = rq_take_conn(q, e);
    redisReply *r = NULL;
    struct args a;
    char ticket[40];
    int rc = 0, lost;

    *n = 0;
    if (!c)
        return e->code;
    int64_t deadline = clock_now_ms() + (wait_ms > 0 ? wait_ms : 0);
    for (int round = 0;; round++) {
        lease_ticket(q, worker, ticket, &lost);
        rq_script_args(q, &a, "lease");
        rq_arg(&a, worker);
        rq_arg_int(&a, (int64_t)max);
        rq_arg_int(&a, q->cfg.result_ttl_s);
        rq_arg_int(&a, max_tasks);
        rq_arg(&a, ticket);
        rq_arg(&a, lost ? ticket : "");
        rq_arg_int(&a, LEASE_NOTE_MS);
        r = rq_call(q, c, &a, e);
        if (r && queue_fault("lease_answer", (size_t)round)) { /* as if Redis died here */
            freeReplyObject(r);
            r = NULL;
            err_set(e, ERR_UNAVAILABLE, "Redis: injected fault: the lease's answer was lost");
            lease_answered(q, worker, ticket, 0);
        } else {
            lease_answered(q, worker, ticket, r != NULL || !c->err);
            if (lost && (r != NULL || !c->err))
                log_info("queue", "a lease answer was lost; its jobs, if any, are queued again",
                         "worker=%s", worker);
        }
        if (!r) {
            rc = e->code;
            break;
        }
        if (r->type == REDIS_REPLY_ARRAY && r->elements > 0)
            break;
        freeReplyObject(r);
        r = NULL;
        int64_t left = deadline - clock_now_ms();
        if (left > 0) /* up to wait_ms, looking again every 250 ms: delayed retries come by time */
            wait_for_work(q, c, left < 250 ? left : 250);
        else
            break;
        if (c->err)
            break;
    }
    /* {id, job hash} pairs, read by the script with the lease (a job that cannot be copied
     * here stays leased and runs again when its lease ends, as after a crash) */
    size_t n_leased = r ? (r->elements < max ? r->elements : max) : 0;
    for (size_t i = 0; i < n_leased; i++) {
        const redisReply *pair = r->element[i];
        if (pair->type != REDIS_REPLY_ARRAY || pair->elements != 2 || !pair->element[0]->str ||
            pair->element[1]->type != REDIS_REPLY_ARRAY)
            continue;
        out[*n] = job_from_hash(pair->element[0]->str, pair->element[1], 1, 0);
        if (out[*n] && queue_fault("lease", i)) {
            job_free(out[*n]);
            out[*n] = NULL;
        }
        if (out[*n])
            (*n)++;
    }
    freeReplyObject(r);
    rq_give_conn(q, c);
    return rc;
}

static int r_extend(struct queue *qb, const char *id, uint64_t token, int64_t lease_ms,
                    struct err *e)
{
    struct redis_queue *q = rq(qb);
    struct args a;
    redisReply *r;
    int64_t v = 0;

    if (!id[0])
        return 0; /* queue_on_final's flush: nothing to wait for here */
    rq_script_args(q, &a, "extend");
    rq_arg(&a, id);
    rq_arg_int(&a, (int64_t)token);
    rq_arg_int(&a, lease_ms);
    r = rq_run(q, &a, e);
    if (!r)
        return e->code;
    rq_int_reply(r, &v);
    freeReplyObject(r);
    return v == 1 ? 0
                  : err_set(e, ERR_CONFLICT, "job %s: attempt %llu no longer holds the lease", id,
                            (unsigned long long)token);
}

static void outcome_args(struct redis_queue *q, struct args *a, const struct queue_outcome *o)
{
    if (o->ok) {
        rq_script_args(q, a, "complete");
        rq_arg(a, o->id);
        rq_arg_int(a, (int64_t)o->token);
        rq_arg_bin(a, o->result, o->result_len);
        rq_arg_int(a, o->result_json_len);
        rq_arg_int(a, q->cfg.result_ttl_s);
    } else {
        rq_script_args(q, a, "fail");
        rq_arg(a, o->id);
        rq_arg_int(a, (int64_t)o->token);
        rq_arg(a, o->error ? o->error : "failed");
        rq_arg(a, o->retryable || o->released ? "1" : "0");
        rq_arg_int(a, q->cfg.retry_backoff_ms);
        rq_arg_int(a, QUEUE_MAX_BACKOFF_MS);
        rq_arg_int(a, q->cfg.result_ttl_s);
        rq_arg_int(a, o->retry_after_ms);
        rq_arg(a, o->released ? "1" : "0");
    }
}

static int r_finish_many(struct queue *qb, struct queue_outcome *outs, size_t n, struct err *e)
{
    struct redis_queue *q = rq(qb);
    redisContext *c = rq_take_conn(q, e);
    int rc = 0;

    if (!c) {
        for (size_t i = 0; i < n; i++)
            outs[i].rc = e->code; /* none recorded */
        return e->code;
    }
    for (size_t i = 0; i < n; i++) {
        struct args a;
        outcome_args(q, &a, &outs[i]);
        redisAppendCommandArgv(c, a.n, a.v, a.len);
    }
    for (size_t i = 0; i < n; i++) {
        redisReply *r = NULL;
        int64_t v = 0;
        if (redisGetReply(c, (void **)&r) != REDIS_OK || !r) {
            outs[i].rc =
                err_set(e, ERR_UNAVAILABLE, "Redis at %s:%d: %s", q->host, q->port, c->errstr);
            if (rc == 0)
                rc = outs[i].rc;
            continue;
        }
        if (r->type == REDIS_REPLY_ERROR) {
            outs[i].rc = err_set(e, ERR_IO, "Redis: %.200s", r->str);
            if (rc == 0)
                rc = outs[i].rc;
        } else {
            rq_int_reply(r, &v);
            outs[i].rc = v == 1 || v == 2 ? 0 : ERR_CONFLICT;
            outs[i].failed_final = v == 2;
        }
        freeReplyObject(r);
    }
    rq_give_conn(q, c);
    return rc;
}

/* cancel and retry: a script answering a state (or -1 / -2), then the job. */
static int change_then_load(struct redis_queue *q, const char *op, const char *id, struct job **out,
                            struct err *e)
{
    redisContext *c = rq_take_conn(q, e);
    struct args a;
    redisReply *r;
    int64_t v = -1;
    int rc = 0;

    *out = NULL;
    if (!c)
        return e->code;
    rq_script_args(q, &a, op);
    rq_arg(&a, id);
    rq_arg_int(&a, q->cfg.result_ttl_s);
    r = rq_call(q, c, &a, e);
    if (!r) {
        rq_give_conn(q, c);
        return e->code;
    }
    rq_int_reply(r, &v);
    freeReplyObject(r);
    if (v == -1) {
        rc = err_set(e, ERR_NOT_FOUND, "no job '%.40s'", id);
    } else {
        rc = rq_load_job(q, c, id, 0, 0, out, e);
        if (rc == 0 && v == -2) {
            rc = strcmp(op, "cancel") == 0
                     ? err_set(e, ERR_CONFLICT, "job %s is already %s", id,
                               job_state_name((*out)->state))
                     : err_set(e, ERR_CONFLICT,
                               "job %s is %s; only failed or expired jobs are sent back to the "
                               "queue",
                               id, job_state_name((*out)->state));
            job_free(*out);
            *out = NULL;
        }
    }
    rq_give_conn(q, c);
    return rc;
}

static int r_cancel(struct queue *qb, const char *id, struct job **out, struct err *e)
{
    return change_then_load(rq(qb), "cancel", id, out, e);
}

static int r_retry(struct queue *qb, const char *id, struct job **out, struct err *e)
{
    return change_then_load(rq(qb), "retry", id, out, e);
}

/* Milliseconds since the epoch of "YYYY-MM-DDTHH:MM:SS.mmmZ" (how records written by inferd
 * before 2026-12 kept their time); 0 if it is not that. */
static int64_t parse_time(const char *s)
{
    struct tm tm = {0};
    int ms = 0;

    if (!s || sscanf(s, "%4d-%2d-%2dT%2d:%2d:%2d.%3dZ", &tm.tm_year, &tm.tm_mon, &tm.tm_mday,
                     &tm.tm_hour, &tm.tm_min, &tm.tm_sec, &ms) != 7)
        return 0;
    tm.tm_year -= 1900;
    tm.tm_mon -= 1;
    return (int64_t)timegm(&tm) * 1000 + ms;
}

/* The webhook attempts of a job, from its list of delivery records (JSON objects: event_id,
 * at_ms, status_code, error). */
static int load_notifications(struct redis_queue *q, redisContext *c, struct job *j)
{
    redisReply *r = redisCommand(c, "LRANGE %sdeliv:%s 0 -1", q->prefix, j->id);
    int rc = 0;

    if (!r)
        return ERR_UNAVAILABLE;
    for (size_t i = 0; rc == 0 && r->type == REDIS_REPLY_ARRAY && i < r->elements; i++) {
        json_t *o = json_loadb(r->element[i]->str, r->element[i]->len, 0, NULL);
        json_t *at = json_object_get(o, "at_ms");
        if (!json_is_object(o)) { /* not a record: skipped, as a listing skips a lost job */
            json_decref(o);
            continue;
        }
        rc =
            queue_job_add_notification(j, json_string_value(json_object_get(o, "event_id")),
                                       at ? (int64_t)json_integer_value(at)
                                          : parse_time(json_string_value(json_object_get(o, "at"))),
                                       (int)json_integer_value(json_object_get(o, "status_code")),
                                       json_string_value(json_object_get(o, "error")));
        json_decref(o);
    }
    freeReplyObject(r);
    return rc;
}

/* A job's attempts (attempts_history), from its list of JSON objects. */
int rq_load_history(struct redis_queue *q, redisContext *c, struct job *j)
{
    redisReply *r = redisCommand(c, "LRANGE %satt:%s 0 -1", q->prefix, j->id);
    int rc = 0;

    if (!r)
        return ERR_UNAVAILABLE;
    for (size_t i = 0; rc == 0 && r->type == REDIS_REPLY_ARRAY && i < r->elements; i++) {
        json_t *a = json_loadb(r->element[i]->str, r->element[i]->len, 0, NULL);
        if (json_is_object(a))
            rc = queue_job_add_attempt(j, (int)json_integer_value(json_object_get(a, "a")),
                                       json_integer_value(json_object_get(a, "s")),
                                       json_integer_value(json_object_get(a, "e")),
                                       json_string_value(json_object_get(a, "w")),
                                       json_string_value(json_object_get(a, "err")));
        json_decref(a);
    }
    freeReplyObject(r);
    return rc;
}

static int r_get(struct queue *qb, const char *id, int want_result, struct job **out, struct err *e)
{
    struct redis_queue *q = rq(qb);
    redisContext *c = rq_take_conn(q, e);
    int rc;

    *out = NULL;
    if (!c)
        return e->code;
    rc = rq_load_job(q, c, id, 0, want_result, out, e);
    if (rc == 0 && (load_notifications(q, c, *out) != 0 || rq_load_history(q, c, *out) != 0))
        rc = err_set(e, ERR_UNAVAILABLE, "Redis at %s:%d: %s", q->host, q->port, c->errstr);
    if (rc != 0) {
        job_free(*out);
        *out = NULL;
    }
    rq_give_conn(q, c);
    return rc;
}

/* Newest first, from the index; jobs past their retention leave the index here. */
static int r_list(struct queue *qb, const struct queue_list_filter *f, struct job **out, size_t *n,
                  struct err *e)
{
    struct redis_queue *q = rq(qb);
    redisContext *c = rq_take_conn(q, e);
    long long start = 0;
    int rc = 0, scanned = 0;
    char index[512];

    if (!c)
        return e->code;
    /* another tenant's jobs from its own index; the anonymous tenant's (which data written
     * before tenants holds, unindexed) from all of them, filtered */
    if (f->tenant && f->tenant[0])
        snprintf(index, sizeof(index), "%stjobs:%s", q->prefix, f->tenant);
    else
        snprintf(index, sizeof(index), "%sjobs", q->prefix);
    if (f->cursor) {
        redisReply *r = redisCommand(c, "ZREVRANK %s %s", index, f->cursor);
        if (r && r->type == REDIS_REPLY_INTEGER)
            start = r->integer + 1;
        freeReplyObject(r);
    }
    while (rc == 0 && (int)*n < f->limit && scanned < 100000) {
        redisReply *ids = redisCommand(c, "ZREVRANGE %s %lld %lld", index, start, start + 199);
        if (!ids || ids->type != REDIS_REPLY_ARRAY) {
            freeReplyObject(ids);
            rc = err_set(e, ERR_UNAVAILABLE, "Redis at %s:%d: %s", q->host, q->port, c->errstr);
            break;
        }
        if (ids->elements == 0) {
            freeReplyObject(ids);
            break;
        }
        for (size_t i = 0; rc == 0 && i < ids->elements && (int)*n < f->limit; i++) {
            struct job *j = NULL;
            const char *id = ids->element[i]->str;
            scanned++;
            start++;
            if (rq_load_job(q, c, id, 0, 0, &j, e) != 0) {
                freeReplyObject(redisCommand(c, "ZREM %s %s", index, id));
                start--;
                continue;
            }
            if (j->kind == JOB_KIND_INFER && (f->state < 0 || (int)j->state == f->state) &&
                (!f->tenant || strcmp(f->tenant, j->tenant ? j->tenant : "") == 0) &&
                (f->state != JOB_RUNNING || f->cancelling < 0 ||
                 j->cancel_requested == f->cancelling) &&
                (!f->model || (j->model && strcmp(j->model, f->model) == 0))) {
                if (load_notifications(q, c, j) != 0 || rq_load_history(q, c, j) != 0)
                    rc = err_set(e, ERR_UNAVAILABLE, "Redis at %s:%d: %s", q->host, q->port,
                                 c->errstr);
                out[(*n)++] = j;
            } else {
                job_free(j);
            }
        }
        freeReplyObject(ids);
    }
    rq_give_conn(q, c);
    if (rc != 0) {
        for (size_t i = 0; i < *n; i++)
            job_free(out[i]);
        *n = 0;
    }
    return rc;
}

static int r_counts(struct queue *qb, int64_t counts[JOB_N_STATES], struct err *e)
{
    struct redis_queue *q = rq(qb);
    redisContext *c = rq_take_conn(q, e);
    redisReply *r;

    memset(counts, 0, sizeof(int64_t) * JOB_N_STATES);
    if (!c)
        return e->code;
    r = redisCommand(c, "HGETALL %scounts", q->prefix);
    for (size_t i = 0; r && r->type == REDIS_REPLY_ARRAY && i + 1 < r->elements; i += 2) {
        int s = job_state_parse(r->element[i]->str);
        if (s >= 0)
            counts[s] = strtoll(r->element[i + 1]->str, NULL, 10);
    }
    if (!r)
        err_set(e, ERR_UNAVAILABLE, "Redis at %s:%d: %s", q->host, q->port, c->errstr);
    freeReplyObject(r);
    rq_give_conn(q, c);
    return r ? 0 : ERR_UNAVAILABLE;
}

static int64_t r_queued(struct queue *qb)
{
    int64_t counts[JOB_N_STATES];
    struct err e;

    return r_counts(qb, counts, &e) == 0 ? counts[JOB_QUEUED] : 0;
}

const struct queue_job_ops rq_job_ops = {
    .enqueue = r_enqueue,
    .enqueue_async = r_enqueue_async,
    .lease_many = r_lease_many,
    .finish_many = r_finish_many,
    .extend = r_extend,
    .cancel = r_cancel,
    .retry = r_retry,
    .get = r_get,
    .list = r_list,
    .counts = r_counts,
    .queued = r_queued,
    .worker_beat = rq_worker_beat,
    .worker_leave = rq_worker_leave,
    .workers_list = rq_workers_list,
};
