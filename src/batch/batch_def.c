/*
 * batch_def.c: checking a batch-job definition (the JSON body of POST /v1/batch-jobs): its
 * fields, types, templates, cron schedule, time zone, locations, formats and limits, and the
 * definition normalized with its defaults.
 *
 * What it needs of the model comes from a batch_job_model_fn (batch_jobs.c asks the registry;
 * fuzz/fuzz_batch_job.c makes one up), and it reads no storage and opens no connection: a
 * table input (postgresql://) is recognised by its scheme here, and opened only when a run
 * starts or a schedule is stored (batch_jobs.c). That is the seam the fuzz target uses.
 */
#define _GNU_SOURCE
#include "batch/batch_jobs.h"
#include "batch/batch.h"
#include "batch/columns.h"
#include "batch/cron.h"
#include "core/clock.h"
#include "core/jdoc.h"
#include "core/jfield.h"
#include "core/url.h"
#include "notify/notify.h"
#include "storage/storage.h"
#include "warehouse/warehouse.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char *const known_fields[] = {
    "model",       "input",       "output",        "format",      "records_per_batch",
    "concurrency", "join_input",  "csv_header",    "max_errors",  "callback_url",
    "schedule",    "key_columns", "output_suffix", "input_query", "records_per_task",
    NULL};

/* a table input's rows per task when "records_per_task" is not given */
#define DEFAULT_RECORDS_PER_TASK 100000

/* fields that shape when a job runs and where it reads and writes, beside known_fields */
static const char *const schedule_fields[] = {"timezone", NULL};

static int check_location(const char *key, const char *s, struct err *e);

/* `at`: a time to expand a template with, so that what is checked is a real location */
static int check_uri(json_t *def, const char *key, const struct tm *at, struct err *e)
{
    json_t *v = json_object_get(def, key);
    const char *s = json_string_value(v);
    char *expanded = NULL;
    int rc;

    if (s && strchr(s, '{')) {
        if ((rc = cron_template_expand(s, at, &expanded, e)) != 0) {
            char msg[sizeof(e->msg)];
            snprintf(msg, sizeof(msg), "%s", e->msg);
            return err_set(e, rc, "%s: %s", key, msg);
        }
        rc = check_location(key, expanded, e);
        free(expanded);
        return rc;
    }
    if (!v)
        return err_set(e, ERR_INVALID, "%s: missing", key);
    return check_location(key, s, e);
}

static int check_location(const char *key, const char *s, struct err *e)
{
    if (!s || !s[0])
        return err_set(e, ERR_INVALID,
                       "%s: expected a non-empty string (a path, file:// or s3:// "
                       "URI)",
                       key);
    if (strstr(s, "://") && strncmp(s, "file://", 7) != 0 && strncmp(s, "s3://", 5) != 0) {
        /* shown without its credentials: a postgresql:// URI often carries a password */
        char *shown = url_redacted(s);
        int rc = warehouse_supports(s)
                     ? 0 /* opened, checked and split when the run starts (plan_table) */
                     : err_set(e, ERR_INVALID,
                               "%s: '%.100s': only paths, file:// and s3:// are supported", key,
                               shown ? shown : "");
        free(shown);
        return rc;
    }
    struct err why = {0};
    if (storage_check_allowed(s, &why) != 0)
        return err_set(e, ERR_INVALID, "%s: %s", key, why.msg);
    return 0;
}

static int check_int(json_t *def, const char *key, int64_t min, int64_t max, int64_t dflt,
                     struct err *e)
{
    int64_t v;
    int present, rc = jfield_int(def, key, min, max, JFIELD_NULL_ABSENT, &v, &present, e);

    if (rc != 0 || present)
        return rc;
    return json_object_set_new(def, key, json_integer(dflt)) == 0
               ? 0
               : err_set(e, ERR_NOMEM, "out of memory");
}

/* "key_columns" ("id,region" or ["id", "region"]: kept as the string) and "output_suffix"
 * (".out" unless given), checked as inferd batch checks --key-columns and --output-suffix */
static int check_names(json_t *def, struct err *e)
{
    json_t *v = json_object_get(def, "key_columns"), *item;
    struct buf spec = {0};
    size_t i;
    int rc = 0;

    if (json_is_array(v)) {
        json_array_foreach (v, i, item) {
            if (!json_is_string(item) || strchr(json_string_value(item), ','))
                rc = err_set(e, ERR_INVALID,
                             "key_columns[%zu]: expected a name or position "
                             "without ','",
                             i);
            else if ((i && buf_puts(&spec, ",") != 0) ||
                     buf_puts(&spec, json_string_value(item)) != 0)
                rc = err_set(e, ERR_NOMEM, "out of memory");
            if (rc != 0)
                break;
        }
        if (rc == 0 &&
            json_object_set_new(def, "key_columns", json_string(spec.data ? spec.data : "")) != 0)
            rc = err_set(e, ERR_NOMEM, "out of memory");
        buf_release(&spec);
        v = json_object_get(def, "key_columns");
    }
    if (rc == 0 && v && !json_is_null(v) && !json_is_string(v))
        rc = err_set(e, ERR_INVALID, "key_columns: expected \"id,region\" or [\"id\", \"region\"]");
    if (rc == 0 && json_is_string(v))
        rc = batch_check_keys(json_string_value(v), e);
    if (rc != 0)
        return rc;
    v = json_object_get(def, "output_suffix");
    if (!v || json_is_null(v))
        return json_object_set_new(def, "output_suffix", json_string(".out")) == 0
                   ? 0
                   : err_set(e, ERR_NOMEM, "out of memory");
    if (!json_is_string(v))
        return err_set(e, ERR_INVALID, "output_suffix: expected a string (\"\" allowed)");
    rc = batch_check_suffix(json_string_value(v), e);
    if (rc == 0 && !warehouse_supports(json_string_value(json_object_get(def, "input"))))
        rc = batch_check_locations(json_string_value(json_object_get(def, "input")),
                                   json_string_value(json_object_get(def, "output")),
                                   json_string_value(v), e);
    return rc;
}

static int check_bool(json_t *def, const char *key, struct err *e)
{
    json_t *v = json_object_get(def, key);

    if (!v || json_is_null(v))
        return json_object_set_new(def, key, json_false()) == 0
                   ? 0
                   : err_set(e, ERR_NOMEM, "out of memory");
    return json_is_boolean(v) ? 0 : err_set(e, ERR_INVALID, "%s: expected true or false", key);
}

/* "timezone": an IANA name, "UTC" when not given; `now_there` is the time there now */
static int check_timezone(json_t *def, struct tm *now_there, struct err *e)
{
    json_t *v = json_object_get(def, "timezone");
    struct cron_zone *z = NULL;
    int rc;

    if (!v || json_is_null(v)) {
        if (json_object_set_new(def, "timezone", json_string("UTC")) != 0)
            return err_set(e, ERR_NOMEM, "out of memory");
        v = json_object_get(def, "timezone");
    }
    if (!json_is_string(v))
        return err_set(e, ERR_INVALID,
                       "timezone: expected an IANA time zone name such as "
                       "\"Europe/Paris\"");
    rc = cron_zone_open(json_string_value(v), &z, e);
    if (rc != 0) {
        char msg[sizeof(e->msg)];
        snprintf(msg, sizeof(msg), "%s", e->msg);
        return err_set(e, rc, "timezone: %s", msg);
    }
    cron_zone_time(z, clock_sched_now_ms(), now_there);
    cron_zone_close(z);
    return 0;
}

/* "input_query" and "records_per_task": a table input's, checked against the input */
static int check_table_fields(json_t *def, int documents, struct err *e)
{
    const char *input = json_string_value(json_object_get(def, "input"));
    json_t *v = json_object_get(def, "input_query");
    int table = warehouse_supports(input);

    if (v && !json_is_null(v) &&
        (!json_is_string(v) || !json_string_value(v)[0] || strlen(json_string_value(v)) > 65536))
        return err_set(e, ERR_INVALID,
                       "input_query: expected a SELECT statement (a string of "
                       "at most 65536 bytes)");
    if (v && json_is_string(v) && !table)
        return err_set(e, ERR_INVALID, "input_query: needs a postgresql:// input");
    v = json_object_get(def, "records_per_task");
    if (v && !json_is_null(v) && !table)
        return err_set(e, ERR_INVALID,
                       "records_per_task: only for a table or query input (a job over objects "
                       "has one task per object)");
    if (warehouse_supports(json_string_value(json_object_get(def, "output")))) {
        if (documents)
            return err_set(e, ERR_INVALID,
                           "output: model '%s' takes JSON documents: a table output holds numbers",
                           json_string_value(json_object_get(def, "model")));
        if (!table && json_is_string(json_object_get(def, "key_columns")) &&
            json_string_value(json_object_get(def, "key_columns"))[0])
            return err_set(e, ERR_INVALID,
                           "key_columns: objects go into a table keyed by source_object and line");
        if (json_is_true(json_object_get(def, "join_input")))
            return err_set(e, ERR_INVALID,
                           "join_input: a table output holds the keys and the prediction only");
    }
    if (!table)
        return 0;
    if (documents)
        return err_set(e, ERR_INVALID,
                       "input: model '%s' takes JSON documents: a table gives rows of numbers",
                       json_string_value(json_object_get(def, "model")));
    return check_int(def, "records_per_task", 1, 1000000000, DEFAULT_RECORDS_PER_TASK, e);
}

static int check_fields(json_t *def, batch_job_model_fn model_fn, void *ctx, struct err *e)
{
    const char *key, *s;
    json_t *v;
    struct batch_job_model m = {0};
    struct cron c;
    struct tm now_there;
    int rc;

    json_object_foreach (def, key, v) {
        int known = 0;
        for (int i = 0; known_fields[i]; i++)
            known |= strcmp(known_fields[i], key) == 0;
        for (int i = 0; schedule_fields[i]; i++)
            known |= strcmp(schedule_fields[i], key) == 0;
        if (!known)
            return err_set(e, ERR_INVALID, "unknown field '%.64s'", key);
    }
    s = json_string_value(json_object_get(def, "model"));
    if (!s || !s[0])
        return err_set(e, ERR_INVALID, "model: missing");
    rc = model_fn(ctx, s, &m, e);
    if (rc != 0)
        return rc;
    int documents = m.documents;
    if (!m.is_ok)
        rc = err_set(e, ERR_INVALID, "model: '%s' does not take rows of numbers", s);
    if (rc != 0 || (rc = check_timezone(def, &now_there, e)) != 0 ||
        (rc = check_uri(def, "input", &now_there, e)) ||
        (rc = check_uri(def, "output", &now_there, e)))
        return rc;
    v = json_object_get(def, "format");
    if (v && !json_is_null(v) &&
        (!json_is_string(v) ||
         (strcmp(json_string_value(v), "jsonl") != 0 && strcmp(json_string_value(v), "csv") != 0)))
        return err_set(e, ERR_INVALID, "format: expected \"jsonl\" or \"csv\"");
    if (documents && v && json_is_string(v) && strcmp(json_string_value(v), "csv") == 0)
        return err_set(e, ERR_INVALID,
                       "format: model '%s' takes JSON documents: give JSON Lines, not CSV", s);
    if ((rc = check_int(def, "records_per_batch", 1, 1000000, 1024, e)) ||
        (rc = check_int(def, "concurrency", 0, 1024, 0, e)) ||
        (rc = check_int(def, "max_errors", 0, INT64_MAX / 2, 0, e)) ||
        (rc = check_bool(def, "join_input", e)) || (rc = check_bool(def, "csv_header", e)))
        return rc;
    if ((rc = check_names(def, e)) != 0 || (rc = check_table_fields(def, documents, e)) != 0)
        return rc;
    v = json_object_get(def, "callback_url");
    if (v && !json_is_null(v)) {
        struct err why = {0};
        if (!json_is_string(v))
            return err_set(e, ERR_INVALID, "callback_url: expected an http:// or https:// URL");
        if (notify_check_url(json_string_value(v), &why) != 0)
            return err_set(e, ERR_INVALID, "callback_url: %s", why.msg);
    }
    v = json_object_get(def, "schedule");
    if (v && !json_is_null(v)) {
        if (!json_is_string(v))
            return err_set(e, ERR_INVALID,
                           "schedule: expected a 5-field cron expression or @hourly, @daily, "
                           "@weekly, @monthly, @yearly");
        if ((rc = cron_parse(json_string_value(v), &c, e)) != 0) {
            char msg[sizeof(e->msg)];
            snprintf(msg, sizeof(msg), "%s", e->msg);
            return err_set(e, rc, "schedule: %s", msg);
        }
        if (cron_next(&c, clock_sched_now_ms()) < 0)
            return err_set(e, ERR_INVALID, "schedule: '%.64s' never matches", json_string_value(v));
    }
    return 0;
}

int batch_job_check_def(const char *body, size_t len, batch_job_model_fn model_fn, void *ctx,
                        char **normalized, int *is_schedule, struct err *e)
{
    json_error_t jerr;
    json_t *def = json_loadb(body, len, JSON_REJECT_DUPLICATES, &jerr);
    int rc;

    *normalized = NULL;
    *is_schedule = 0;
    if (!def)
        return err_set(e, ERR_INVALID, "malformed JSON at line %d column %d: %s", jerr.line,
                       jerr.column, jdoc_jansson_why(body, len, &jerr, 0));
    if (!json_is_object(def)) {
        json_decref(def);
        return err_set(e, ERR_INVALID, "the request body must be a JSON object");
    }
    rc = check_fields(def, model_fn, ctx, e);
    if (rc == 0) {
        json_t *sched = json_object_get(def, "schedule");
        *is_schedule = sched && !json_is_null(sched);
        if (json_is_null(sched))
            json_object_del(def, "schedule");
        *normalized = json_dumps(def, JSON_COMPACT | JSON_SORT_KEYS);
        if (!*normalized)
            rc = err_set(e, ERR_NOMEM, "out of memory");
    }
    json_decref(def);
    return rc;
}

/* ---- checks shared with inferd batch (batch.h) ---- */

int batch_check_suffix(const char *suffix, struct err *e)
{
    if (strlen(suffix) > 32)
        return err_set(e, ERR_INVALID, "output suffix: longer than 32 bytes");
    for (const char *p = suffix; *p; p++)
        if (*p == '/' || (unsigned char)*p < 0x20 || *p == 0x7f)
            return err_set(e, ERR_INVALID,
                           "output suffix: '/' and control characters are not "
                           "allowed");
    return 0;
}

/* `uri` without a file:// scheme and trailing slashes, into `out` */
static void plain_location(const char *uri, char *out, size_t size)
{
    size_t n;

    snprintf(out, size, "%s", strncmp(uri, "file://", 7) == 0 ? uri + 7 : uri);
    n = strlen(out);
    while (n > 1 && out[n - 1] == '/')
        out[--n] = '\0';
}

int batch_check_locations(const char *input, const char *output, const char *suffix, struct err *e)
{
    char in[4096], out[4096];
    size_t n;

    if (!suffix || strcmp(suffix, ".out") == 0)
        return 0; /* inputs named *.out are never read (batch_is_reserved) */
    plain_location(input, in, sizeof(in));
    plain_location(output, out, sizeof(out));
    n = strlen(in);
    if ((strncmp(out, in, n) == 0 && (out[n] == '\0' || out[n] == '/')) ||
        (strncmp(in, out, strlen(out)) == 0 && in[strlen(out)] == '/'))
        return err_set(e, ERR_INVALID,
                       "output suffix '%s': input and output must not be inside one another, or "
                       "outputs could replace inputs or be read as inputs by the next run",
                       suffix);
    return 0;
}

int batch_check_keys(const char *spec, struct err *e)
{
    struct batch_keys k;
    int rc = batch_keys_parse(spec, &k, e);

    batch_keys_release(&k);
    return rc;
}
