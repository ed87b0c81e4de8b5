/*
 * batch_api.c: /v1/batch-jobs: start a batch transform through the queue, schedule one, follow
 * its progress, cancel it; run one now (POST .../run), pause and resume a schedule (POST
 * .../pause, .../resume); list them, by status (?status=).
 *
 * The definition is checked on the HTTP thread (no I/O but its time zone's tzdata file, a
 * small local file); listing the input, which may take long on S3, and storing the run run on
 * the I/O pool.
 */
#define _GNU_SOURCE
#include "batch/batch_jobs.h"
#include "http/http_internal.h"
#include "notify/notify.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void reply_batch(struct req *r, int status, const char *id)
{
    struct err e;

    buf_release(&r->out);
    if (queue_batch_get(r->srv->queue, id, NULL, &r->out, &e) != 0) {
        http_set_error(r, e.code, e.msg);
        return;
    }
    r->status = status;
    r->json_len = -1;
    snprintf(r->location, sizeof(r->location), "/v1/batch-jobs/%s", id);
}

static struct batch_jobs_config jobs_config(struct req *r)
{
    return (struct batch_jobs_config){
        .q = r->srv->queue,
        .reg = r->srv->reg,
        .max_attempts = (int)r->srv->cfg.default_max_attempts,
    };
}

/* On the I/O pool: list the input and store the run (or the schedule). */
static void do_create(struct req *r)
{
    struct batch_jobs_config cfg = jobs_config(r);
    char id[40];
    struct err e = {0};
    int rc = r->batch_schedule ? batch_job_schedule(&cfg, r->body.data, id, &e)
                               : batch_job_start(&cfg, r->body.data, NULL, 0, 0, id, &e);

    if (rc == ERR_BUSY)
        r->retry_after_s = 5;
    if (rc != 0)
        http_set_error(r, rc, e.msg);
    else
        reply_batch(r, r->batch_schedule ? 201 : 202, id);
    http_finish_async(r);
}

static void do_get(struct req *r)
{
    reply_batch(r, 200, r->job_id);
    r->location[0] = '\0';
    http_finish_async(r);
}

static void do_cancel(struct req *r)
{
    struct err e;

    buf_release(&r->out);
    if (queue_batch_cancel(r->srv->queue, r->job_id, NULL, &r->out, &e) != 0) {
        http_set_error(r, e.code, e.msg);
    } else {
        r->status = 200;
        r->json_len = -1;
        if (r->srv->notifier)
            notify_kick(r->srv->notifier); /* its batch.cancelled webhook, if any */
    }
    http_finish_async(r);
}

/* every status a batch job shows: a run's, then a schedule's */
static const char *const statuses[] = {"queued",    "running",   "succeeded", "failed",
                                       "cancelled", "scheduled", "paused",    NULL};

static void do_list(struct req *r)
{
    struct err e;

    buf_release(&r->out);
    if (queue_batch_list(r->srv->queue, NULL, r->list_limit,
                         r->list_state >= 0 ? statuses[r->list_state] : NULL, &r->out, &e) != 0) {
        http_set_error(r, e.code, e.msg);
    } else {
        r->status = 200;
        r->json_len = -1;
    }
    http_finish_async(r);
}

static void do_run(struct req *r)
{
    struct batch_jobs_config cfg = jobs_config(r);
    char id[40];
    struct err e = {0};
    int rc = batch_job_run_now(&cfg, r->job_id, id, &e);

    if (rc == ERR_BUSY)
        r->retry_after_s = 5;
    if (rc != 0)
        http_set_error(r, rc, e.msg);
    else
        reply_batch(r, 202, id);
    http_finish_async(r);
}

static void pause_or_resume(struct req *r, int paused)
{
    struct batch_jobs_config cfg = jobs_config(r);
    struct err e = {0};

    buf_release(&r->out);
    if (batch_job_pause(&cfg, r->job_id, paused, &r->out, &e) != 0) {
        http_set_error(r, e.code, e.msg);
    } else {
        r->status = 200;
        r->json_len = -1;
    }
    http_finish_async(r);
}

static void do_pause(struct req *r)
{
    pause_or_resume(r, 1);
}

static void do_resume(struct req *r)
{
    pause_or_resume(r, 0);
}

/* ?status=: an index into statuses, -1 without one; 400 names the values */
static int list_status(struct req *r)
{
    const char *v = MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, "status");

    r->list_state = -1;
    if (!v)
        return 0;
    for (int i = 0; statuses[i]; i++)
        if (strcmp(statuses[i], v) == 0)
            r->list_state = i;
    return r->list_state >= 0 ? 0 : -1;
}

static enum MHD_Result create(struct req *r)
{
    char *normalized = NULL;
    int is_schedule = 0;
    struct err e = {0};
    int rc;

    if (atomic_load(&r->srv->draining)) {
        r->retry_after_s = 5;
        return http_reply_error(r, ERR_UNAVAILABLE, "inferd is shutting down");
    }
    rc = batch_job_check(r->body.data ? r->body.data : "", r->body.len, r->srv->reg, &normalized,
                         &is_schedule, &e);
    if (rc != 0)
        return http_reply_error(r, rc, "%s", e.msg);
    /* the definition lives in the body buffer as long as the request does */
    buf_release(&r->body);
    rc = buf_puts(&r->body, normalized);
    free(normalized);
    if (rc != 0)
        return http_reply_error(r, ERR_NOMEM, "out of memory");
    r->batch_schedule = is_schedule;
    return http_defer(r, do_create);
}

/* seg: v1 batch-jobs [id] */
enum MHD_Result batch_api_route(struct req *r, int is_get, int is_post, int is_delete, char **seg,
                                int n)
{
    if (!r->srv->queue)
        return http_reply_error(r, ERR_UNAVAILABLE, "the queue is not enabled");
    if (n == 2 && is_post)
        return create(r);
    if (n == 2 && is_get) {
        const char *limit = MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, "limit");
        char *end = NULL;
        long v = limit ? strtol(limit, &end, 10) : 100;
        if (limit && (!*limit || *end || v < 1 || v > 1000))
            return http_reply_error(r, ERR_INVALID, "limit: expected 1..1000, got '%.32s'", limit);
        r->list_limit = (int)v;
        if (list_status(r) != 0)
            return http_reply_error(
                r, ERR_INVALID,
                "status: unknown value '%.32s' (one of queued, running, "
                "succeeded, failed, cancelled, scheduled, paused)",
                MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, "status"));
        return http_defer(r, do_list);
    }
    if (n == 4 && is_post && http_valid_id(seg[2])) {
        void (*fn)(struct req *) = strcmp(seg[3], "run") == 0      ? do_run
                                   : strcmp(seg[3], "pause") == 0  ? do_pause
                                   : strcmp(seg[3], "resume") == 0 ? do_resume
                                                                   : NULL;
        if (!fn)
            return http_reply_error(r, ERR_NOT_FOUND, "no route for this path");
        if (fn == do_run && atomic_load(&r->srv->draining)) {
            r->retry_after_s = 5;
            return http_reply_error(r, ERR_UNAVAILABLE, "inferd is shutting down");
        }
        snprintf(r->job_id, sizeof(r->job_id), "%s", seg[2]);
        return http_defer(r, fn);
    }
    if (n != 3)
        return http_reply_error(r, ERR_NOT_FOUND, "no route for this path");
    if (!http_valid_id(seg[2]))
        return http_reply_error(r, ERR_NOT_FOUND, "no batch job '%.40s'", seg[2]);
    snprintf(r->job_id, sizeof(r->job_id), "%s", seg[2]);
    if (is_get)
        return http_defer(r, do_get);
    if (is_delete)
        return http_defer(r, do_cancel);
    return http_reply_error(r, ERR_NOT_FOUND, "no route for this method and path");
}
