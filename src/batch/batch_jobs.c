/*
 * batch_jobs.c: server-side batch jobs: definitions, runs split into one queue task per input
 * object, the cron scheduler, and running tasks on workers.
 *
 * A run's tasks are ordinary queue jobs, so --workers bounds them, a crash re-runs a task
 * (its output is written atomically, so a re-run replaces it whole), and several workers
 * share one run. The queue counts finished tasks in the run and queues a finishing job after
 * the last one; that job writes _manifest.json (the same format `inferd batch` writes) and
 * _SUCCESS.
 *
 * A schedule's times are wall-clock times in its "timezone" (cron.h gives the rule where
 * daylight saving time skips or repeats one). Each run expands the fields of its input and
 * output templates ({date}, {hour}, ...) with its scheduled time in that zone, a run started
 * by hand with the time it was asked for, and stores the locations it used.
 */
#define _GNU_SOURCE
#include "batch/batch_jobs.h"
#include "batch/batch.h"
#include "batch/cron.h"
#include "core/clock.h"
#include "core/jdoc.h"
#include "core/jfield.h"
#include "core/url.h"
#include "core/log.h"
#include "notify/notify.h"
#include "model/registry.h"
#include "storage/storage.h"
#include "warehouse/warehouse.h"

#include <errno.h>
#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define SCHEDULER_TICK_MS 1000
#define CANCEL_CHECK_MS 1000 /* how often a running task looks for a cancellation */
#define PROGRESS_MS 1000     /* how often a running task reports the records it wrote */

/* a run's tasks at most, for a table input: each is a queue job stored in one commit */
#define MAX_TABLE_TASKS 100000

/* ---- definitions (the checks are in batch_def.c) ---- */

/* The model of a definition, from the registry: what batch_job_check_def() needs of it. */
static int registry_model(void *ctx, const char *name, struct batch_job_model *out, struct err *e)
{
    struct model *m = NULL;
    int rc = registry_acquire((struct registry *)ctx, name, 0, &m, e);

    if (rc != 0)
        return rc;
    out->is_ok = batch_model_ok(m);
    out->documents = m->info.json_io != INFERD_JSON_IO_NONE;
    model_release(m);
    return 0;
}

int batch_job_check(const char *body, size_t len, struct registry *reg, char **normalized,
                    int *is_schedule, struct err *e)
{
    return batch_job_check_def(body, len, registry_model, reg, normalized, is_schedule, e);
}

/* ---- starting runs ---- */

struct run_plan {
    char **names;
    size_t n_names;
    char **outs; /* what the output holds already */
    size_t n_outs;
    char **inputs; /* per task: its input JSON */
    char **objects;
    size_t n_tasks;
    char *output;
    char *finish_input;
};

static void plan_free(struct run_plan *p)
{
    storage_names_free(p->names, p->n_names);
    storage_names_free(p->outs, p->n_outs);
    for (size_t i = 0; i < p->n_tasks; i++) {
        free(p->inputs[i]);
        free(p->objects[i]);
    }
    free(p->inputs);
    free(p->objects);
    free(p->output);
    free(p->finish_input);
}

/* `stale_errors`: the output holds an earlier run's `<name>.errors` */
static char *task_input(json_t *def, const char *name, const char *in_uri, const char *out_uri,
                        const char *err_uri, int csv, int stale_errors)
{
    json_t *t = json_pack(
        "{s:s, s:s, s:s, s:s, s:s, s:O, s:O, s:O, s:O, s:O, s:b}", "object", name, "in", in_uri,
        "out", out_uri, "errors", err_uri, "format", csv ? "csv" : "jsonl", "records_per_batch",
        json_object_get(def, "records_per_batch"), "concurrency",
        json_object_get(def, "concurrency"), "join_input", json_object_get(def, "join_input"),
        "csv_header", json_object_get(def, "csv_header"), "max_errors",
        json_object_get(def, "max_errors"), "stale_errors", stale_errors);
    json_t *keys = json_object_get(def, "key_columns");
    char *s;

    if (t && json_is_string(keys) && json_object_set(t, "key_columns", keys) != 0) {
        json_decref(t);
        t = NULL;
    }
    s = t ? json_dumps(t, JSON_COMPACT) : NULL;

    json_decref(t);
    return s;
}

/*
 * The finishing job's input: the output; into a table (warehouse_sink_finish), also what the
 * run's inferd_batch_runs row says. A new string, NULL without memory.
 */
static char *finish_input(json_t *def, const char *output, const char *version)
{
    json_t *fin = json_pack("{s:s}", "output", output);
    json_t *query = json_object_get(def, "input_query");
    char *source = url_redacted(json_string_value(json_object_get(def, "input")));
    char *text = NULL;

    if (fin && (!warehouse_supports(output) ||
                (source && !json_object_set_new(fin, "table", json_true()) &&
                 !json_object_set_new(fin, "source", json_string(source)) &&
                 !json_object_set(fin, "input_query", query ? query : json_null()) &&
                 !json_object_set_new(fin, "model_version", json_string(version)) &&
                 !json_object_set_new(fin, "started_ms", json_integer(clock_now_ms())))))
        text = json_dumps(fin, JSON_COMPACT);
    json_decref(fin);
    free(source);
    return text;
}

/* The version of the model `def` names, into `out`; "" if it is not loaded. */
static void model_version(struct registry *reg, json_t *def, char *out, size_t size)
{
    struct err e = {0};
    struct model *m = NULL;

    out[0] = '\0';
    if (registry_acquire(reg, json_string_value(json_object_get(def, "model")), 0, &m, &e) == 0) {
        snprintf(out, size, "%s", m->version_str);
        model_release(m);
    }
}

/* An object's task into a table: its rows are the part keyed (name, 1..) in the run's
 * staging table, which a retried task first empties. */
static char *object_part_input(json_t *def, const char *name, const char *in_uri,
                               const char *out_uri, int csv)
{
    char *base = task_input(def, name, in_uri, out_uri, out_uri, csv, 0), *text = NULL;
    json_t *t = base ? json_loads(base, 0, NULL) : NULL;

    if (t && json_object_set_new(t, "after", json_pack("[s,s]", name, "0")) == 0 &&
        json_object_set_new(t, "upto", json_pack("[s,s]", name, "9223372036854775807")) == 0)
        text = json_dumps(t, JSON_COMPACT);
    json_decref(t);
    free(base);
    return text;
}

/* Lists the input and prepares one task per object: into a table, each writes its rows into
 * the run's staging table, keyed by source_object and line. */
static int plan_run(struct registry *reg, json_t *def, struct run_plan *p, struct err *e)
{
    const char *input = json_string_value(json_object_get(def, "input"));
    const char *output = json_string_value(json_object_get(def, "output"));
    const char *format = json_string_value(json_object_get(def, "format"));
    const char *suffix = json_string_value(json_object_get(def, "output_suffix"));
    struct batch_config bc = {
        .format = !format                      ? BATCH_FORMAT_AUTO
                  : strcmp(format, "csv") == 0 ? BATCH_FORMAT_CSV
                                               : BATCH_FORMAT_JSONL,
    };
    int is_object = 0, to_table = warehouse_supports(output), rc;
    char version[64];

    p->output = strdup(output);
    if (!p->output)
        return err_set(e, ERR_NOMEM, "out of memory");
    model_version(reg, def, version, sizeof(version));
    rc = storage_list(input, &p->names, &p->n_names, &is_object, e);
    if (rc != 0) {
        char msg[sizeof(e->msg)];
        snprintf(msg, sizeof(msg), "%s", e->msg);
        return err_set(e, rc, "input: %s", msg);
    }
    rc = to_table ? 0 : batch_list_output(p->output, &p->outs, &p->n_outs, e);
    if (rc != 0) {
        char msg[sizeof(e->msg)];
        snprintf(msg, sizeof(msg), "%s", e->msg);
        return err_set(e, rc, "output: %s", msg);
    }
    p->inputs = calloc(p->n_names ? p->n_names : 1, sizeof(*p->inputs));
    p->objects = calloc(p->n_names ? p->n_names : 1, sizeof(*p->objects));
    if (!p->inputs || !p->objects)
        return err_set(e, ERR_NOMEM, "out of memory");
    for (size_t i = 0; i < p->n_names; i++) {
        const char *name = p->names[i];
        char out_name[4200], err_name[4200], *in_uri, *out_uri, *err_uri;
        int csv = 0;
        if (batch_is_reserved(name))
            continue;
        if ((rc = batch_format_of(&bc, name, &csv, e)) != 0) {
            char msg[sizeof(e->msg)];
            snprintf(msg, sizeof(msg), "%s", e->msg);
            return err_set(e, rc, "input: %s (or give \"format\")", msg);
        }
        snprintf(out_name, sizeof(out_name), "%s%s", name, suffix ? suffix : ".out");
        snprintf(err_name, sizeof(err_name), "%s.errors", name);
        in_uri = is_object ? strdup(input) : storage_join(input, name);
        out_uri = to_table ? strdup(p->output) : storage_join(p->output, out_name);
        err_uri = to_table ? strdup(p->output) : storage_join(p->output, err_name);
        if (in_uri && out_uri && err_uri) {
            p->inputs[p->n_tasks] =
                to_table ? object_part_input(def, name, in_uri, out_uri, csv)
                         : task_input(def, name, in_uri, out_uri, err_uri, csv,
                                      batch_has_name(p->outs, p->n_outs, err_name));
            p->objects[p->n_tasks] = strdup(name);
        }
        free(in_uri);
        free(out_uri);
        free(err_uri);
        if (!p->inputs[p->n_tasks] || !p->objects[p->n_tasks]) {
            free(p->inputs[p->n_tasks]);
            free(p->objects[p->n_tasks]);
            p->inputs[p->n_tasks] = p->objects[p->n_tasks] = NULL;
            return err_set(e, ERR_NOMEM, "out of memory");
        }
        p->n_tasks++;
    }
    if (p->n_tasks == 0)
        return err_set(e, ERR_NOT_FOUND, "input: no input objects under %.200s", input);
    p->finish_input = finish_input(def, p->output, version);
    return p->finish_input ? 0 : err_set(e, ERR_NOMEM, "out of memory");
}

/* ---- a table or query input: one task per key range ---- */

/* The source `def` names, read for model `m` (borrowed from both). */
static void table_spec(json_t *def, const struct model *m, struct warehouse_spec *spec)
{
    const char *format = json_string_value(json_object_get(def, "format"));

    memset(spec, 0, sizeof(*spec));
    spec->uri = json_string_value(json_object_get(def, "input"));
    spec->query = json_string_value(json_object_get(def, "input_query"));
    spec->key_columns = json_string_value(json_object_get(def, "key_columns"));
    spec->feature_names = m->features.names;
    spec->n_features = m->features.names ? m->features.n : 0;
    spec->width = m->info.inputs[0].shape[1];
    spec->keys_json = !format || strcmp(format, "csv") != 0;
}

static json_t *bound_json(const char *const *values, size_t n)
{
    json_t *a;

    if (!values)
        return json_null();
    a = json_array();
    for (size_t k = 0; a && k < n; k++)
        json_array_append_new(a, json_string(values[k]));
    return a;
}

/* Part i's task: the common options, and what the part reads (its key range). */
static char *part_input(json_t *def, const struct warehouse_split *split, size_t i,
                        const char *name, const char *out_uri, const char *err_uri, int csv,
                        int stale_errors)
{
    const char *input = json_string_value(json_object_get(def, "input"));
    char *base = task_input(def, name, input, out_uri, err_uri, csv, stale_errors), *text = NULL;
    json_t *t = base ? json_loads(base, 0, NULL) : NULL;
    json_t *query = json_object_get(def, "input_query");

    if (t && json_object_set_new(t, "after",
                                 bound_json(warehouse_split_after(split, i), split->n_keys)) == 0 &&
        json_object_set_new(t, "upto",
                            bound_json(warehouse_split_upto(split, i), split->n_keys)) == 0 &&
        (!json_is_string(query) || json_object_set(t, "input_query", query) == 0))
        text = json_dumps(t, JSON_COMPACT);
    json_decref(t);
    free(base);
    return text;
}

/*
 * Opens the table or query the run reads (every check `inferd batch` makes against the model),
 * cuts it into parts of about records_per_task rows by its keys, and prepares one task per
 * part: "<SCHEMA.TABLE>-00000.jsonl" (or "query-...", ".csv"), keys first as inferd batch
 * writes them.
 */
static int plan_table(struct registry *reg, json_t *def, struct run_plan *p, struct err *e)
{
    const char *output = json_string_value(json_object_get(def, "output"));
    const char *format = json_string_value(json_object_get(def, "format"));
    int csv = format && strcmp(format, "csv") == 0, to_table = warehouse_supports(output), rc;
    struct warehouse_spec spec;
    struct warehouse_split split = {0};
    struct model *m = NULL;
    char version[64];

    p->output = strdup(output);
    if (!p->output)
        return err_set(e, ERR_NOMEM, "out of memory");
    rc = registry_acquire(reg, json_string_value(json_object_get(def, "model")), 0, &m, e);
    if (rc != 0)
        return rc;
    table_spec(def, m, &spec);
    rc = warehouse_split(&spec, json_integer_value(json_object_get(def, "records_per_task")),
                         &split, e);
    snprintf(version, sizeof(version), "%s", m->version_str);
    model_release(m);
    if (rc != 0) {
        char msg[sizeof(e->msg)];
        snprintf(msg, sizeof(msg), "%s", e->msg);
        warehouse_split_release(&split);
        /* a server that cannot be reached or refuses the login: the definition's to fix */
        return err_set(e, rc == ERR_IO ? ERR_INVALID : rc, "input: %s", msg);
    }
    if (split.n_parts > MAX_TABLE_TASKS) {
        rc = err_set(e, ERR_INVALID,
                     "records_per_task: %lld rows per task make %zu tasks, more than %d: "
                     "give more rows per task",
                     (long long)json_integer_value(json_object_get(def, "records_per_task")),
                     split.n_parts, MAX_TABLE_TASKS);
        warehouse_split_release(&split);
        return rc;
    }
    rc = to_table ? 0 : batch_list_output(p->output, &p->outs, &p->n_outs, e);
    if (rc != 0) {
        char msg[sizeof(e->msg)];
        snprintf(msg, sizeof(msg), "%s", e->msg);
        warehouse_split_release(&split);
        return err_set(e, rc, "output: %s", msg);
    }
    p->inputs = calloc(split.n_parts, sizeof(*p->inputs));
    p->objects = calloc(split.n_parts, sizeof(*p->objects));
    if (!p->inputs || !p->objects)
        rc = err_set(e, ERR_NOMEM, "out of memory");
    for (size_t i = 0; rc == 0 && i < split.n_parts; i++) {
        char name[300], err_name[320], *out_uri, *err_uri;
        snprintf(name, sizeof(name), "%.200s-%05zu%s", split.name, i,
                 to_table ? "" : csv ? ".csv" : ".jsonl");
        snprintf(err_name, sizeof(err_name), "%s.errors", name);
        /* into a table, every part writes the run's staging table (the finish merges) */
        out_uri = to_table ? strdup(p->output) : storage_join(p->output, name);
        err_uri = to_table ? strdup(p->output) : storage_join(p->output, err_name);
        if (out_uri && err_uri) {
            p->inputs[i] = part_input(def, &split, i, name, out_uri, err_uri, csv,
                                      batch_has_name(p->outs, p->n_outs, err_name));
            p->objects[i] = strdup(name);
        }
        p->n_tasks++; /* so plan_free frees what was made */
        if (!p->inputs[i] || !p->objects[i])
            rc = err_set(e, ERR_NOMEM, "out of memory");
        free(out_uri);
        free(err_uri);
    }
    if (rc == 0 && !(p->finish_input = finish_input(def, p->output, version)))
        rc = err_set(e, ERR_NOMEM, "out of memory");
    if (rc == 0)
        log_info("batch", "table split", "source=%s parts=%zu records_per_task=%lld", split.name,
                 split.n_parts,
                 (long long)json_integer_value(json_object_get(def, "records_per_task")));
    warehouse_split_release(&split);
    return rc;
}

/* A schedule over a table: its source checked now, as a run's would be at its start. */
static int check_table_source(struct registry *reg, json_t *def, struct err *e)
{
    const char *input = json_string_value(json_object_get(def, "input"));
    struct warehouse_source *src = NULL;
    struct warehouse_spec spec;
    struct model *m = NULL;
    int rc;

    if (!warehouse_supports(input) || strchr(input, '{'))
        return 0; /* a templated location is checked by each run */
    rc = registry_acquire(reg, json_string_value(json_object_get(def, "model")), 0, &m, e);
    if (rc != 0)
        return rc;
    table_spec(def, m, &spec);
    rc = warehouse_open(&spec, &src, e);
    warehouse_close(src);
    model_release(m);
    if (rc != 0) {
        char msg[sizeof(e->msg)];
        snprintf(msg, sizeof(msg), "%s", e->msg);
        return err_set(e, rc == ERR_IO ? ERR_INVALID : rc, "input: %s", msg);
    }
    return 0;
}

static int64_t lease_of(struct registry *reg, const char *model)
{
    struct model *m = NULL;
    struct err e;
    int64_t ms = 300000;

    if (registry_acquire(reg, model, 0, &m, &e) == 0) {
        ms = m->job_lease_timeout_ms;
        model_release(m);
    }
    return ms;
}

/* Opens the definition's "timezone" (UTC when it has none). */
static int zone_of(json_t *def, struct cron_zone **z, struct err *e)
{
    const char *name = json_string_value(json_object_get(def, "timezone"));

    return cron_zone_open(name ? name : "UTC", z, e);
}

/* Expands def[key]'s template fields with `at`, in place. */
static int expand_location(json_t *def, const char *key, const struct tm *at, struct err *e)
{
    const char *s = json_string_value(json_object_get(def, key));
    char *expanded = NULL;
    int rc;

    if (!s || !strchr(s, '{'))
        return 0;
    rc = cron_template_expand(s, at, &expanded, e);
    if (rc == 0 && json_object_set_new(def, key, json_string(expanded)) != 0)
        rc = err_set(e, ERR_NOMEM, "out of memory");
    free(expanded);
    return rc;
}

/*
 * A run's locations: the templates expanded with the time it runs for (`at_ms`) in its zone;
 * a run of a schedule whose output has no template writes under <output>/<YYYYmmddTHHMMZ>/
 * (to the second, <YYYYmmddTHHMMSSZ>, for a run started by hand).
 */
static int resolve_locations(json_t *def, int64_t at_ms, int stamp, struct err *e)
{
    const char *output = json_string_value(json_object_get(def, "output"));
    int templated = output && strchr(output, '{');
    struct cron_zone *z = NULL;
    struct tm at;
    int rc = zone_of(def, &z, e);

    if (rc != 0)
        return rc;
    cron_zone_time(z, at_ms, &at);
    cron_zone_close(z);
    if ((rc = expand_location(def, "input", &at, e)) ||
        (rc = expand_location(def, "output", &at, e)))
        return rc;
    output = json_string_value(json_object_get(def, "output")); /* replaced if templated */
    /* a table is one place: every run upserts into it, each with its inferd_batch_runs row */
    if (stamp && !templated && output && !warehouse_supports(output)) {
        char text[32];
        time_t t = (time_t)(at_ms / 1000);
        struct tm tm;
        gmtime_r(&t, &tm);
        strftime(text, sizeof(text), at_ms % 60000 == 0 ? "%Y%m%dT%H%MZ" : "%Y%m%dT%H%M%SZ", &tm);
        char *stamped = storage_join(output, text);
        rc = stamped && json_object_set_new(def, "output", json_string(stamped)) == 0
                 ? 0
                 : err_set(e, ERR_NOMEM, "out of memory");
        free(stamped);
    }
    return rc;
}

static int start_run(const struct batch_jobs_config *cfg, const char *definition,
                     const char *parent, int64_t run_at_ms, int64_t parent_next_ms, int by_hand,
                     char id_out[40], struct err *e)
{
    json_t *def = json_loads(definition, 0, NULL);
    struct run_plan p = {0};
    struct batch_job_spec spec = {0};
    struct err plan_err = {0};
    char *run_def = NULL;
    int rc;

    if (!json_is_object(def)) {
        json_decref(def);
        return err_set(e, ERR_INVALID, "batch job definition is not a JSON object");
    }
    json_object_del(def, "schedule"); /* a run's definition: what it ran with */
    rc = resolve_locations(def, parent ? run_at_ms : clock_sched_now_ms(), parent != NULL,
                           &plan_err);
    run_def = json_dumps(def, JSON_COMPACT | JSON_SORT_KEYS);
    if (rc == 0 && warehouse_supports(json_string_value(json_object_get(def, "input"))))
        rc = plan_table(cfg->reg, def, &p, &plan_err);
    else if (rc == 0)
        rc = plan_run(cfg->reg, def, &p, &plan_err);
    if (rc != 0 && !parent) {
        *e = plan_err;
        goto cleanup;
    }
    spec.definition = run_def ? run_def : definition;
    spec.model = json_string_value(json_object_get(def, "model"));
    spec.callback_url = json_string_value(json_object_get(def, "callback_url"));
    spec.max_errors = json_integer_value(json_object_get(def, "max_errors"));
    spec.max_attempts = cfg->max_attempts > 0 ? cfg->max_attempts : 3;
    spec.lease_timeout_ms = lease_of(cfg->reg, spec.model);
    spec.output = p.output;
    spec.task_inputs = (const char *const *)p.inputs;
    spec.task_objects = (const char *const *)p.objects;
    spec.n_tasks = rc == 0 ? p.n_tasks : 0;
    spec.finish_input = p.finish_input;
    spec.error = rc != 0 ? plan_err.msg : NULL; /* a scheduled run that cannot start: failed */
    spec.parent = parent;
    spec.run_at_ms = run_at_ms;
    spec.parent_next_run_ms = parent_next_ms;
    spec.by_hand = by_hand;
    spec.tenant = cfg->tenant; /* a schedule's run is the schedule's tenant's, whatever this */
    rc = queue_batch_create(cfg->q, &spec, id_out, e);
    if (rc == 0) {
        char *shown = url_redacted(p.output ? p.output : "-");
        log_info("batch", "batch job started", "batch_job=%s objects=%zu output=%s", id_out,
                 spec.n_tasks, shown ? shown : "-");
        free(shown);
    }
cleanup:
    plan_free(&p);
    free(run_def);
    json_decref(def);
    return rc;
}

int batch_job_start(const struct batch_jobs_config *cfg, const char *definition, const char *parent,
                    int64_t run_at_ms, int64_t parent_next_ms, char id_out[40], struct err *e)
{
    return start_run(cfg, definition, parent, run_at_ms, parent_next_ms, 0, id_out, e);
}

/* The first run of `def`'s schedule, in its time zone, after `after_ms`; -1 if none. */
static int next_run(json_t *def, int64_t after_ms, int64_t *next, struct err *e)
{
    const char *schedule = json_string_value(json_object_get(def, "schedule"));
    struct cron_zone *z = NULL;
    struct cron c;
    int rc;

    *next = -1;
    if (!schedule)
        return err_set(e, ERR_INVALID, "batch job definition has no schedule");
    if ((rc = cron_parse(schedule, &c, e)) != 0 || (rc = zone_of(def, &z, e)) != 0)
        return rc;
    *next = cron_next_in(&c, z, after_ms);
    cron_zone_close(z);
    return 0;
}

int batch_job_schedule(const struct batch_jobs_config *cfg, const char *definition, char id_out[40],
                       struct err *e)
{
    json_t *def = json_loads(definition, 0, NULL);
    struct batch_job_spec spec = {0};
    int rc;

    if (!json_is_object(def)) {
        json_decref(def);
        return err_set(e, ERR_INVALID, "batch job definition is not a JSON object");
    }
    rc = next_run(def, clock_sched_now_ms(), &spec.next_run_ms, e);
    if (rc == 0)
        rc = check_table_source(cfg->reg, def, e);
    if (rc == 0) {
        spec.definition = definition;
        spec.model = json_string_value(json_object_get(def, "model"));
        spec.callback_url = json_string_value(json_object_get(def, "callback_url"));
        spec.max_errors = json_integer_value(json_object_get(def, "max_errors"));
        spec.max_attempts = cfg->max_attempts > 0 ? cfg->max_attempts : 3;
        spec.lease_timeout_ms = lease_of(cfg->reg, spec.model);
        spec.schedule = json_string_value(json_object_get(def, "schedule"));
        spec.tenant = cfg->tenant;
        rc = queue_batch_create(cfg->q, &spec, id_out, e);
    }
    json_decref(def);
    return rc;
}

/* The time a run started by hand runs for: now, but never on a whole minute, the times the
 * scheduler's runs take, so it never takes a scheduled run's place ((schedule, time) is
 * unique in the store). */
static int64_t by_hand_time(void)
{
    int64_t now = clock_sched_now_ms();

    return now % 60000 == 0 ? now + 1 : now;
}

int batch_job_run_now(const struct batch_jobs_config *cfg, const char *id, char id_out[40],
                      struct err *e)
{
    struct queue_schedule *s = NULL;
    int rc = queue_batch_definition(cfg->q, id, cfg->viewer, &s, e);

    if (rc != 0)
        return rc;
    if (s->schedule && s->state == JOB_CANCELLED)
        rc = err_set(e, ERR_CONFLICT, "schedule %s is cancelled", id);
    else if (s->schedule) /* a run of the schedule, for now; its next run stays */
        rc = start_run(cfg, s->definition, id, by_hand_time(), 0, 1, id_out, e);
    else /* a run again: the same definition and locations */
        rc = start_run(cfg, s->definition, NULL, 0, 0, 0, id_out, e);
    if (rc == 0)
        log_info("batch", "batch job run by hand", "batch_job=%s run=%s", id, id_out);
    queue_schedules_free(s, 1);
    return rc;
}

int batch_job_pause(const struct batch_jobs_config *cfg, const char *id, int paused,
                    struct buf *out, struct err *e)
{
    struct queue_schedule *s = NULL;
    int64_t next = 0;
    int rc = 0;

    if (!paused) { /* resumed: the next time after now; what it missed does not run */
        json_t *def = NULL;
        rc = queue_batch_definition(cfg->q, id, cfg->viewer, &s, e);
        if (rc == 0 && s->schedule && (def = json_loads(s->definition, 0, NULL)) != NULL)
            rc = next_run(def, clock_sched_now_ms(), &next, e);
        json_decref(def);
        queue_schedules_free(s, 1);
        if (rc != 0)
            return rc;
    }
    return queue_batch_pause(cfg->q, id, cfg->viewer, paused, next, out, e);
}

/* ---- the scheduler ---- */

struct batch_scheduler {
    struct batch_jobs_config cfg;
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int stopping; /* guarded by lock */
};

static void run_due(struct batch_scheduler *s)
{
    struct queue_schedule *due = NULL;
    size_t n = 0;
    int64_t now = clock_sched_now_ms();
    struct err e;

    if (queue_schedules_due(s->cfg.q, now, &due, &n, &e) != 0) {
        log_error("batch", "cannot read schedules", "reason=\"%s\"", e.msg);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        json_t *def = json_loads(due[i].definition, 0, NULL);
        char id[40];
        int64_t next = -1;
        if (def && next_run(def, now, &next, &e) != 0) /* missed minutes do not run twice */
            next = -1;
        json_decref(def);
        int rc = batch_job_start(&s->cfg, due[i].definition, due[i].id, due[i].next_run_ms, next,
                                 id, &e);
        if (rc == 0)
            log_info("batch", "scheduled run started", "schedule=%s batch_job=%s", due[i].id, id);
        else if (rc != ERR_CONFLICT)
            log_error("batch", "scheduled run not started", "schedule=%s reason=\"%s\"", due[i].id,
                      e.msg);
    }
    queue_schedules_free(due, n);
}

static void *scheduler_main(void *arg)
{
    struct batch_scheduler *s = arg;

    pthread_mutex_lock(&s->lock);
    while (!s->stopping) {
        pthread_mutex_unlock(&s->lock);
        run_due(s);
        pthread_mutex_lock(&s->lock);
        struct timespec ts = clock_realtime_after_ms(SCHEDULER_TICK_MS);
        if (!s->stopping)
            pthread_cond_timedwait(&s->cond, &s->lock, &ts);
    }
    pthread_mutex_unlock(&s->lock);
    return NULL;
}

int batch_scheduler_start(const struct batch_jobs_config *cfg, struct batch_scheduler **out,
                          struct err *e)
{
    struct batch_scheduler *s = calloc(1, sizeof(*s));

    *out = NULL;
    if (!s)
        return err_set(e, ERR_NOMEM, "out of memory");
    s->cfg = *cfg;
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->cond, NULL);
    if (pthread_create(&s->thread, NULL, scheduler_main, s) != 0) {
        free(s);
        return err_set(e, ERR_NOMEM, "cannot start the batch scheduler");
    }
    *out = s;
    return 0;
}

void batch_scheduler_stop(struct batch_scheduler *s)
{
    if (!s)
        return;
    pthread_mutex_lock(&s->lock);
    s->stopping = 1;
    pthread_cond_signal(&s->cond);
    pthread_mutex_unlock(&s->lock);
    pthread_join(s->thread, NULL);
    pthread_mutex_destroy(&s->lock);
    pthread_cond_destroy(&s->cond);
    free(s);
}

/* ---- running tasks (worker threads) ---- */

struct task_tick {
    struct queue *q;
    const _Atomic int *stop;
    const struct job *job;
    int64_t last_extend_ms, last_check_ms;
    int64_t records;  /* written so far (batch_run_object updates it before each tick) */
    int64_t reported; /* the last count sent to the queue */
    int64_t last_progress_ms;
};

/* Between chunks: keep the lease, and stop if the task was cancelled or lost its lease. */
static int task_tick(void *ctx, struct err *e)
{
    struct task_tick *t = ctx;
    int64_t now = clock_now_ms();
    struct job *j = NULL;
    int rc = 0;

    if (t->stop && atomic_load(t->stop))
        return err_set(e, ERR_UNAVAILABLE, "inferd is shutting down; the task runs again");
    if (now - t->last_extend_ms >= t->job->lease_timeout_ms / 3) {
        t->last_extend_ms = now;
        if (queue_extend(t->q, t->job->id, t->job->token, t->job->lease_timeout_ms, e) != 0)
            return err_set(e, ERR_CONFLICT, "task %s lost its lease", t->job->id);
    }
    if (t->records != t->reported && now - t->last_progress_ms >= PROGRESS_MS) {
        struct err pe;
        t->last_progress_ms = now;
        t->reported = t->records;
        /* progress is for people watching: a failure to store it stops nothing */
        if (queue_batch_progress(t->q, t->job->batch_id, t->job->id, t->job->token, t->records,
                                 &pe) != 0)
            log_debug("batch", "progress not recorded", "task=%s reason=\"%s\"", t->job->id,
                      pe.msg);
    }
    if (now - t->last_check_ms >= CANCEL_CHECK_MS) {
        t->last_check_ms = now;
        if (queue_get(t->q, t->job->id, NULL, 0, &j, e) == 0 && j->cancel_requested)
            rc = err_set(e, ERR_CANCELLED, "cancelled");
        job_free(j);
    }
    return rc;
}

/* A task's key bound (an array of texts, or null) as warehouse_spec takes it: into `values`
 * (at most `max`); NULL for null. */
static const char *const *bound_of(json_t *v, const char **values, size_t max)
{
    size_t i;
    json_t *item;

    if (!json_is_array(v) || json_array_size(v) == 0 || json_array_size(v) > max)
        return NULL;
    json_array_foreach (v, i, item)
        values[i] = json_string_value(item) ? json_string_value(item) : "";
    return values;
}

/* What the result says the task read: for a table part, the source (shown masked) and its
 * key range; for an object, its identity. */
static json_t *result_input(json_t *in, const struct batch_object_result *res)
{
    const char *uri = json_string_value(json_object_get(in, "in"));
    char *shown;
    json_t *o;

    if (!warehouse_supports(uri))
        return batch_input_json(&res->input);
    shown = url_redacted(uri);
    o = shown ? json_pack("{s:s, s:O*, s:O*}", "source", shown, "after",
                          json_object_get(in, "after"), "upto", json_object_get(in, "upto"))
              : NULL;
    free(shown);
    return o;
}

static int run_object(struct queue *q, struct registry *reg, const struct job *job,
                      const _Atomic int *stop, json_t *in, struct buf *result, int *retryable,
                      struct err *e)
{
    const char *after[64], *upto[64];
    const char *object = json_string_value(json_object_get(in, "object"));
    const char *format = json_string_value(json_object_get(in, "format"));
    struct task_tick tick = {.q = q, .stop = stop, .job = job};
    struct batch_config bc = {
        .format = format && strcmp(format, "csv") == 0 ? BATCH_FORMAT_CSV : BATCH_FORMAT_JSONL,
        .records_per_batch = json_integer_value(json_object_get(in, "records_per_batch")),
        .concurrency = (int)json_integer_value(json_object_get(in, "concurrency")),
        .join_input = json_is_true(json_object_get(in, "join_input")),
        .csv_header = json_is_true(json_object_get(in, "csv_header")),
        .key_columns = json_string_value(json_object_get(in, "key_columns")),
        .max_errors = json_integer_value(json_object_get(in, "max_errors")),
        .quiet = 1,
        .stale_errors = json_is_true(json_object_get(in, "stale_errors")),
        .tick = task_tick,
        .tick_ctx = &tick,
        .records_written = &tick.records,
        .input_query = json_string_value(json_object_get(in, "input_query")),
        .after = bound_of(json_object_get(in, "after"), after, 64),
        .upto = bound_of(json_object_get(in, "upto"), upto, 64),
        .run_id = job->batch_id,
    };
    struct batch_object_result res;
    struct model *m = NULL;
    json_t *out;
    char *text;
    int rc;

    tick.last_extend_ms = tick.last_check_ms = clock_now_ms();
    if (!object || bc.records_per_batch < 1)
        return err_set(e, ERR_INVALID, "batch task %s: malformed task input", job->id);
    rc = registry_acquire(reg, job->model, 0, &m, e);
    if (rc != 0) {
        *retryable = 1; /* the model may be reloading */
        return rc;
    }
    rc = batch_run_object(&bc, m, json_string_value(json_object_get(in, "in")), object,
                          json_string_value(json_object_get(in, "out")),
                          json_string_value(json_object_get(in, "errors")), &res, e);
    model_release(m);
    if (rc != 0) {
        /* storage and the model may recover; a bad record or a missing object will not */
        *retryable = rc == ERR_IO || rc == ERR_BACKEND || rc == ERR_NOMEM || rc == ERR_TIMEOUT ||
                     rc == ERR_UNAVAILABLE;
        return rc;
    }
    out = json_pack("{s:s, s:I, s:I, s:s, s:o}", "object", object, "records",
                    (json_int_t)res.records, "errors", (json_int_t)res.errors, "sha256", res.sha256,
                    "input", result_input(in, &res));
    text = out ? json_dumps(out, JSON_COMPACT) : NULL;
    rc = text ? buf_puts(result, text) : err_set(e, ERR_NOMEM, "out of memory");
    free(text);
    json_decref(out);
    return rc;
}

/* The end of a run: the manifest, then _SUCCESS (the same files `inferd batch` writes). */
static int finish_run(struct queue *q, const struct job *job, json_t *in, struct buf *result,
                      int *retryable, struct err *e)
{
    const char *output = json_string_value(json_object_get(in, "output"));
    struct buf manifest = {0};
    char *manifest_uri, *success_uri;
    int rc;

    if (!output)
        return err_set(e, ERR_INVALID, "batch job %s: malformed finishing input", job->batch_id);
    if (json_is_true(json_object_get(in, "table"))) {
        /* every part's rows into the table at once, and the run's row in inferd_batch_runs */
        struct warehouse_sink_spec spec = {
            .uri = output,
            .run = job->batch_id,
            .source = json_string_value(json_object_get(in, "source")),
            .query = json_string_value(json_object_get(in, "input_query")),
            .model = job->model,
            .model_version = json_string_value(json_object_get(in, "model_version")),
            .started_ms = json_integer_value(json_object_get(in, "started_ms")),
        };
        rc = warehouse_sink_finish(&spec, e);
        /* a server or a lock that comes back; a target made incompatible meanwhile will not */
        *retryable = rc != ERR_INVALID;
        return rc == 0 ? buf_puts(result, "{}") : rc;
    }
    manifest_uri = storage_join(output, "_manifest.json");
    success_uri = storage_join(output, "_SUCCESS");
    *retryable = 1;
    rc = manifest_uri && success_uri ? 0 : err_set(e, ERR_NOMEM, "out of memory");
    if (rc == 0)
        rc = queue_batch_manifest(q, job->batch_id, NULL, &manifest, e);
    if (rc == 0) {
        json_t *m = json_loadb(manifest.data, manifest.len, 0, NULL);
        char *pretty = m ? json_dumps(m, JSON_INDENT(2) | JSON_SORT_KEYS) : NULL;
        rc = pretty ? storage_put(manifest_uri, pretty, strlen(pretty), e)
                    : err_set(e, ERR_NOMEM, "out of memory");
        free(pretty);
        json_decref(m);
    }
    if (rc == 0)
        rc = batch_remove_leftovers(output, e);
    if (rc == 0)
        rc = storage_put(success_uri, "", 0, e);
    if (rc == 0)
        rc = buf_puts(result, "{}");
    buf_release(&manifest);
    free(manifest_uri);
    free(success_uri);
    return rc;
}

int batch_task_run(struct queue *q, struct registry *reg, const struct job *job,
                   const _Atomic int *stop, struct buf *result, int *retryable, struct err *e)
{
    json_t *in = json_loadb(job->input.data ? job->input.data : "", job->input.len, 0, NULL);
    int rc;

    *retryable = 0;
    if (!json_is_object(in)) {
        json_decref(in);
        return err_set(e, ERR_INVALID, "batch task %s: malformed task input", job->id);
    }
    if (job->kind == JOB_KIND_BATCH_FINISH)
        rc = finish_run(q, job, in, result, retryable, e);
    else
        rc = run_object(q, reg, job, stop, in, result, retryable, e);
    json_decref(in);
    return rc;
}
