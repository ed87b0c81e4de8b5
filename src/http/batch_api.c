/*
 * batch_api.c: /v1/batch-jobs: start a batch transform through the queue, schedule one, follow
 * its progress, cancel it; run one now (POST .../run), pause and resume a schedule (POST
 * .../pause, .../resume); list them, by status (?status=).
 *
 * Every handler runs on the I/O pool (routes.c): checking a definition may read a table's
 * columns, listing the input may take long on S3, and storing the run waits on the queue.
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
    if (queue_batch_get(r->srv->queue, id, http_viewer(r), &r->out, &e) != 0) {
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
        .tenant = http_owner(r),
        .viewer = http_viewer(r),
    };
}

/* Checks the route's {id}, if it has one (it stays in r->params[0]); 0, or an answer set (no
 * queue: 503; not an id: 404). */
static int take_id(struct req *r)
{
    if (!r->srv->queue) {
        http_fail(r, ERR_UNAVAILABLE, "the queue is not enabled");
        return -1;
    }
    if (r->params[0] && !http_valid_id(r->params[0])) {
        http_fail(r, ERR_NOT_FOUND, "no batch job '%.40s'", r->params[0]);
        return -1;
    }
    return 0;
}

/* POST /v1/batch-jobs: checks the definition, lists the input (which may take long on S3) and
 * stores the run, or the schedule. */
enum handled batch_api_create(struct req *r)
{
    struct batch_jobs_config cfg = jobs_config(r);
    char *normalized = NULL, id[40];
    int is_schedule = 0;
    struct err e = {0};
    int rc;

    if (take_id(r) != 0)
        return HANDLED_ANSWER;
    if (http_refuse_draining(r))
        return HANDLED_ANSWER;
    rc = batch_job_check(r->body.data ? r->body.data : "", r->body.len, r->srv->reg, &normalized,
                         &is_schedule, &e);
    if (rc != 0)
        return http_fail(r, rc, "%s", e.msg);
    rc = is_schedule ? batch_job_schedule(&cfg, normalized, id, &e)
                     : batch_job_start(&cfg, normalized, NULL, 0, 0, id, &e);
    free(normalized);
    if (rc == ERR_BUSY)
        r->retry_after_s = 5;
    if (rc != 0)
        return http_fail(r, rc, "%s", e.msg);
    reply_batch(r, is_schedule ? 201 : 202, id);
    return HANDLED_ANSWER;
}

/* GET /v1/batch-jobs/{id} */
enum handled batch_api_get(struct req *r)
{
    if (take_id(r) != 0)
        return HANDLED_ANSWER;
    reply_batch(r, 200, r->params[0]);
    r->location[0] = '\0';
    return HANDLED_ANSWER;
}

/* DELETE /v1/batch-jobs/{id} */
enum handled batch_api_cancel(struct req *r)
{
    struct err e;

    if (take_id(r) != 0)
        return HANDLED_ANSWER;
    buf_release(&r->out);
    if (queue_batch_cancel(r->srv->queue, r->params[0], http_viewer(r), &r->out, &e) != 0)
        return http_fail(r, e.code, "%s", e.msg);
    r->status = 200;
    r->json_len = -1;
    if (r->srv->notifier)
        notify_kick(r->srv->notifier); /* its batch.cancelled webhook, if any */
    return HANDLED_ANSWER;
}

/* every status a batch job shows: a run's, then a schedule's */
static const char *const statuses[] = {"queued",    "running",   "succeeded", "failed",
                                       "cancelled", "scheduled", "paused",    NULL};

/* GET /v1/batch-jobs?status=&limit= */
enum handled batch_api_list(struct req *r)
{
    const char *limit = http_value(r, MHD_GET_ARGUMENT_KIND, "limit");
    const char *status = http_value(r, MHD_GET_ARGUMENT_KIND, "status");
    char *end = NULL;
    long v = limit ? strtol(limit, &end, 10) : 100;
    int known = !status;
    struct err e;

    if (take_id(r) != 0)
        return HANDLED_ANSWER;
    if (limit && (!*limit || *end || v < 1 || v > 1000))
        return http_fail(r, ERR_INVALID, "limit: expected 1..1000, got '%.32s'", limit);
    for (int i = 0; status && statuses[i]; i++)
        known |= strcmp(statuses[i], status) == 0;
    if (!known)
        return http_fail(r, ERR_INVALID,
                         "status: unknown value '%.32s' (one of queued, running, succeeded, "
                         "failed, cancelled, scheduled, paused)",
                         status);
    buf_release(&r->out);
    if (queue_batch_list(r->srv->queue, http_viewer(r), (int)v, status, &r->out, &e) != 0)
        return http_fail(r, e.code, "%s", e.msg);
    r->status = 200;
    r->json_len = -1;
    return HANDLED_ANSWER;
}

/* POST /v1/batch-jobs/{id}/run: a run of a schedule now */
enum handled batch_api_run(struct req *r)
{
    struct batch_jobs_config cfg = jobs_config(r);
    char id[40];
    struct err e = {0};
    int rc;

    if (take_id(r) != 0)
        return HANDLED_ANSWER;
    if (http_refuse_draining(r))
        return HANDLED_ANSWER;
    rc = batch_job_run_now(&cfg, r->params[0], id, &e);
    if (rc == ERR_BUSY)
        r->retry_after_s = 5;
    if (rc != 0)
        return http_fail(r, rc, "%s", e.msg);
    reply_batch(r, 202, id);
    return HANDLED_ANSWER;
}

static enum handled pause_or_resume(struct req *r, int paused)
{
    struct batch_jobs_config cfg = jobs_config(r);
    struct err e = {0};

    if (take_id(r) != 0)
        return HANDLED_ANSWER;
    buf_release(&r->out);
    if (batch_job_pause(&cfg, r->params[0], paused, &r->out, &e) != 0)
        return http_fail(r, e.code, "%s", e.msg);
    r->status = 200;
    r->json_len = -1;
    return HANDLED_ANSWER;
}

/* POST /v1/batch-jobs/{id}/pause */
enum handled batch_api_pause(struct req *r)
{
    return pause_or_resume(r, 1);
}

/* POST /v1/batch-jobs/{id}/resume */
enum handled batch_api_resume(struct req *r)
{
    return pause_or_resume(r, 0);
}
