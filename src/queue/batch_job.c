/*
 * batch_job.c: a batch job as users see it, whichever store keeps it: its public JSON, its
 * webhook event, its manifest, and the status names a listing filters by. Stores fill a
 * struct batch_job (or hand over their tasks' results) and never write this JSON themselves.
 */
#include "queue/queue_internal.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

void batch_job_release(struct batch_job *b)
{
    free(b->definition);
    free(b->schedule);
    free(b->output);
    free(b->error);
    free(b->tenant);
    batch_jobs_free(b->runs, b->n_runs);
    memset(b, 0, sizeof(*b));
}

void batch_jobs_free(struct batch_job *b, size_t n)
{
    if (!b)
        return;
    for (size_t i = 0; i < n; i++)
        batch_job_release(&b[i]);
    free(b);
}

const char *batch_job_status(const struct batch_job *b)
{
    if (!b->schedule)
        return job_state_name((enum job_state)b->state);
    return b->state == JOB_CANCELLED           ? "cancelled"
           : b->state == QUEUE_SCHEDULE_PAUSED ? "paused"
                                               : "scheduled";
}

int queue_batch_filter_parse(const char *status, struct queue_batch_filter *f)
{
    static const struct {
        const char *name;
        int schedules, state;
    } map[] = {
        {"queued", 0, JOB_QUEUED},
        {"running", 0, JOB_RUNNING},
        {"succeeded", 0, JOB_SUCCEEDED},
        {"failed", 0, JOB_FAILED},
        {"cancelled", -1, JOB_CANCELLED},
        {"scheduled", 1, QUEUE_SCHEDULE_ACTIVE},
        {"paused", 1, QUEUE_SCHEDULE_PAUSED},
    };

    f->schedules = -1;
    f->state = -1;
    if (!status)
        return 1;
    for (size_t i = 0; i < sizeof(map) / sizeof(*map); i++) {
        if (strcmp(map[i].name, status) == 0) {
            f->schedules = map[i].schedules;
            f->state = map[i].state;
            return 1;
        }
    }
    return 0;
}

static json_t *json_time(int64_t ms)
{
    struct buf b = {0};
    json_t *v;

    if (ms <= 0 || queue_json_time(&b, ms) != 0 || b.len < 2) {
        buf_release(&b);
        return json_null();
    }
    v = json_stringn(b.data + 1, b.len - 2); /* without the quotes */
    buf_release(&b);
    return v;
}

static json_t *json_str_or_null(const char *s)
{
    return s && s[0] ? json_string(s) : json_null();
}

/* The public JSON object of `b`: its definition's options, then its state. NULL: no memory. */
static json_t *batch_object(const struct batch_job *b)
{
    json_t *o = b->definition ? json_loads(b->definition, 0, NULL) : NULL;
    const char *input, *output;

    if (!json_is_object(o)) {
        json_decref(o);
        o = json_object();
    }
    input = json_string_value(json_object_get(o, "input"));
    output = json_string_value(json_object_get(o, "output"));

    /* a table input or output (postgresql://) may carry a password: the worker needs it, no
     * one else; a path is shown as it is ('@' in a file name is no userinfo) */
    if (!o || queue_json_redact_url(o, "callback_url") != 0 ||
        (input && strstr(input, "://") && queue_json_redact_url(o, "input") != 0) ||
        (output && strstr(output, "://") && queue_json_redact_url(o, "output") != 0)) {
        json_decref(o);
        return NULL;
    }
    json_object_set_new(o, "id", json_string(b->id));
    if (b->tenant && b->tenant[0]) /* the anonymous tenant's JSON is as it was */
        json_object_set_new(o, "tenant", json_string(b->tenant));
    else
        json_object_del(o, "tenant"); /* whatever the definition says, it is not an owner */
    json_object_set_new(o, "status", json_string(batch_job_status(b)));
    json_object_set_new(o, "created_at", json_time(b->created_ms));
    if (b->schedule) {
        json_object_set_new(o, "next_run_at",
                            json_time(b->state != QUEUE_SCHEDULE_ACTIVE ? 0 : b->next_run_ms));
        json_t *runs = json_array();
        for (size_t i = 0; runs && i < b->n_runs; i++)
            json_array_append_new(runs, batch_object(&b->runs[i]));
        json_object_set_new(o, "runs", runs ? runs : json_array());
        return o;
    }
    if (b->parent[0]) {
        json_object_set_new(o, "schedule_id", json_string(b->parent));
        json_object_set_new(o, "run_at", json_time(b->run_at_ms));
        json_object_del(o, "schedule");
    }
    json_object_set_new(o, "output", json_str_or_null(b->output));
    if (b->output && strstr(b->output, "://") && queue_json_redact_url(o, "output") != 0) {
        json_decref(o);
        return NULL;
    }
    json_object_set_new(o, "started_at", json_time(b->started_ms));
    json_object_set_new(o, "finished_at", json_time(b->finished_ms));
    json_object_set_new(
        o, "progress",
        json_pack("{s:I, s:I, s:I, s:I}", "objects_total", (json_int_t)b->objects_total,
                  "objects_done", (json_int_t)b->objects_done, "records_done",
                  (json_int_t)b->records_done, "records_failed", (json_int_t)b->records_failed));
    json_object_set_new(o, "error", json_str_or_null(b->error));
    return o;
}

static int append_json(struct buf *out, json_t *o)
{
    char *text = o ? json_dumps(o, JSON_COMPACT) : NULL;
    int rc = text ? buf_puts(out, text) : ERR_NOMEM;

    free(text);
    return rc == 0 ? 0 : ERR_NOMEM;
}

int queue_batch_job_json(const struct batch_job *b, struct buf *out)
{
    json_t *o = batch_object(b);
    int rc = append_json(out, o);

    json_decref(o);
    return rc;
}

int queue_batch_list_json(const struct batch_job *b, size_t n, struct buf *out)
{
    int rc = buf_puts(out, "{\"batch_jobs\":[");

    for (size_t i = 0; rc == 0 && i < n; i++) {
        if (i > 0)
            rc = buf_puts(out, ",");
        if (rc == 0)
            rc = queue_batch_job_json(&b[i], out);
    }
    return rc ? ERR_NOMEM : buf_puts(out, "]}") == 0 ? 0 : ERR_NOMEM;
}

int queue_batch_event_json(const struct batch_job *b, const char *event_id, struct buf *out)
{
    json_t *bj = batch_object(b);
    json_t *event = bj ? json_pack("{s:s, s:s, s:o}", "id", event_id, "type",
                                   b->state == JOB_SUCCEEDED   ? "batch.succeeded"
                                   : b->state == JOB_CANCELLED ? "batch.cancelled"
                                                               : "batch.failed",
                                   "batch_job", bj)
                       : NULL;
    int rc = append_json(out, event);

    json_decref(event);
    return rc;
}

int queue_batch_manifest_json(const char *model, char *const *results, size_t n, struct buf *out)
{
    json_t *objects = json_object(), *root;
    int rc;

    for (size_t i = 0; objects && i < n; i++) {
        json_t *r = results[i] ? json_loads(results[i], 0, NULL) : NULL;
        const char *name = json_string_value(json_object_get(r, "object"));
        if (name)
            json_object_set_new(
                objects, name,
                json_pack("{s:O, s:O, s:O*}", "records", json_object_get(r, "records"), "sha256",
                          json_object_get(r, "sha256"), "input", json_object_get(r, "input")));
        json_decref(r);
    }
    root = objects ? json_pack("{s:s, s:o}", "model", model, "objects", objects) : NULL;
    rc = append_json(out, root);
    json_decref(root);
    return rc;
}
