/*
 * registry.c: loading models from the repository folder, and swapping them safely.
 *
 * Locks, in order: `load_lock` (serialises loads, unloads and reloads, which may take seconds)
 * then `lock` (guards the entries; held only for lookups and pointer swaps).
 */
#define _GNU_SOURCE
#include "model/registry.h"
#include "backend/backend.h"
#include "core/jfield.h"
#include "core/log.h"
#include "metrics/metrics.h"
#include "notify/notify.h"

#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

struct entry {
    char *name;
    struct model *current; /* NULL when not loaded */
    char reason[256];      /* why the last load failed; "" when it did not */
    struct entry *next;
};

struct registry {
    char *dir;
    int instances; /* set before loading; 0 means as configured */
    pthread_mutex_t load_lock;
    pthread_mutex_t lock;
    struct entry *entries; /* guarded by lock */
};

/* ---- config.json ---- */

struct model_config {
    const char *backend; /* borrowed from the json */
    char plugin_path[PATH_MAX];
    int64_t version; /* pinned version; 0 means the highest */
    struct batcher_config batch;
    int64_t default_timeout_us;
    int64_t lease_timeout_s;
    const char *callback_url; /* borrowed from the json */
};

static const struct {
    const char *key;
    int64_t min, max;
} int_options[] = {
    {"version", 1, INT64_MAX},
    {"max_batch_size", 1, 1 << 20},
    {"max_queue_delay_us", 0, 10000000},
    {"max_queue_size", 1, 1 << 24},
    {"instances", 1, 256},
    {"default_timeout_us", 0, INT64_MAX / 1000},
    {"nthread", 1, 256},
    {"lease_timeout_s", 1, 7 * 86400},
};

static int int_option(json_t *root, const char *key, int64_t def, int64_t *out, const char *path,
                      struct err *e)
{
    struct err why = {0};
    size_t i;
    int rc;

    *out = def;
    for (i = 0; i < sizeof(int_options) / sizeof(int_options[0]); i++)
        if (strcmp(int_options[i].key, key) == 0)
            break;
    rc = jfield_int(root, key, int_options[i].min, int_options[i].max, JFIELD_MIN_MAX_MSG, out,
                    NULL, &why);
    return rc == 0 ? 0 : err_set(e, rc, "%s: %s", path, why.msg);
}

static int parse_config(json_t *root, const char *model_dir, const char *path,
                        struct model_config *c, struct err *e)
{
    static const char *known[] = {"backend",
                                  "version",
                                  "max_batch_size",
                                  "max_queue_delay_us",
                                  "max_queue_size",
                                  "instances",
                                  "default_timeout_us",
                                  "nthread",
                                  "path",
                                  "parameters",
                                  "name",
                                  "platform",
                                  "lease_timeout_s",
                                  "callback_url",
                                  /* the http backend's */
                                  "url",
                                  "protocol",
                                  "timeout_s",
                                  "max_concurrency",
                                  "headers",
                                  "inputs",
                                  "outputs",
                                  "upstream_model",
                                  "forward_keys"};
    long n_cpu = sysconf(_SC_NPROCESSORS_ONLN);
    int64_t instances;
    const char *key;
    json_t *v, *p;
    struct err why = {0};
    int rc;

    json_object_foreach (root, key, v) {
        size_t i;
        for (i = 0; i < sizeof(known) / sizeof(known[0]); i++)
            if (strcmp(known[i], key) == 0)
                break;
        if (i == sizeof(known) / sizeof(known[0]))
            return err_set(e, ERR_INVALID, "%s: unknown option '%.64s'", path, key);
    }
    v = json_object_get(root, "backend");
    if (!json_is_string(v))
        return err_set(e, ERR_INVALID, "%s: backend: missing (\"xgboost\", \"http\" or \"plugin\")",
                       path);
    c->backend = json_string_value(v);
    p = json_object_get(root, "path");
    if (p && !json_is_string(p))
        return err_set(e, ERR_INVALID, "%s: path: expected a string", path);
    if (p) {
        const char *s = json_string_value(p);
        if (s[0] == '/')
            snprintf(c->plugin_path, sizeof(c->plugin_path), "%s", s);
        else
            snprintf(c->plugin_path, sizeof(c->plugin_path), "%s/%s", model_dir, s);
    }
    if ((rc = int_option(root, "version", 0, &c->version, path, e)) ||
        (rc = int_option(root, "max_batch_size", 64, &c->batch.max_batch_size, path, e)) ||
        (rc = int_option(root, "max_queue_delay_us", 0, &c->batch.max_queue_delay_us, path, e)) ||
        (rc = int_option(root, "max_queue_size", 1024, &c->batch.max_queue_size, path, e)) ||
        (rc = int_option(root, "instances", n_cpu > 1 ? n_cpu / 2 : 1, &instances, path, e)) ||
        (rc = int_option(root, "default_timeout_us", 0, &c->default_timeout_us, path, e)) ||
        (rc = int_option(root, "lease_timeout_s", 300, &c->lease_timeout_s, path, e)))
        return rc;
    v = json_object_get(root, "callback_url");
    if (v && !json_is_string(v))
        return err_set(e, ERR_INVALID, "%s: callback_url: expected a string", path);
    if (v && notify_check_url(json_string_value(v), &why) != 0) /* the rules of submissions */
        return err_set(e, ERR_INVALID, "%s: callback_url: %s", path, why.msg);
    c->callback_url = v ? json_string_value(v) : NULL;
    c->batch.instances = (int)instances;
    return 0;
}

/* ---- versions ---- */

/* `no_folder_ok`: a model that needs no files (the http backend) is version 1 without one. */
static int pick_version(const char *model_dir, int64_t pinned, int no_folder_ok, int64_t *out,
                        struct err *e)
{
    DIR *d = opendir(model_dir);
    struct dirent *de;
    int64_t best = 0;
    int found_pinned = 0;

    if (!d)
        return err_set(e, ERR_NOT_FOUND, "%s: %s", model_dir, strerror(errno));
    while ((de = readdir(d))) {
        char *end;
        long long v;
        char sub[PATH_MAX];
        struct stat st;
        errno = 0;
        v = strtoll(de->d_name, &end, 10);
        if (errno || *end || end == de->d_name || v < 1)
            continue;
        snprintf(sub, sizeof(sub), "%s/%s", model_dir, de->d_name);
        if (stat(sub, &st) != 0 || !S_ISDIR(st.st_mode))
            continue;
        if (v > best)
            best = v;
        if (v == pinned)
            found_pinned = 1;
    }
    closedir(d);
    if (pinned) {
        if (!found_pinned)
            return err_set(e, ERR_NOT_FOUND, "%s: pinned version %lld has no folder %s/%lld",
                           model_dir, (long long)pinned, model_dir, (long long)pinned);
        *out = pinned;
        return 0;
    }
    if (!best && no_folder_ok) {
        *out = 0;
        return 0;
    }
    if (!best)
        return err_set(e, ERR_NOT_FOUND, "%s: no version folder (e.g. %s/1/)", model_dir,
                       model_dir);
    *out = best;
    return 0;
}

/* ---- model snapshots ---- */

static void model_destroy(struct model *m)
{
    if (!m)
        return;
    batcher_destroy(m->batcher);
    features_release(&m->features);
    if (m->model_state && m->api->model_destroy)
        m->api->model_destroy(m->model_state);
    free(m->name);
    free(m->callback_url);
    free(m);
}

void model_release(struct model *m)
{
    if (m && atomic_fetch_sub(&m->refs, 1) == 1) {
        log_info("model", "unloaded", "model=%s version=%lld", m->name, (long long)m->version);
        model_destroy(m);
    }
}

static int read_file(const char *path, char **out, struct err *e)
{
    FILE *f = fopen(path, "rb");
    struct buf b = {0};
    char chunk[8192];
    size_t n;

    *out = NULL;
    if (!f)
        return err_set(e, ERR_NOT_FOUND, "%s: %s", path, strerror(errno));
    while ((n = fread(chunk, 1, sizeof(chunk), f)) > 0) {
        if (buf_append(&b, chunk, n) != 0) {
            fclose(f);
            buf_release(&b);
            return err_set(e, ERR_NOMEM, "out of memory reading %s", path);
        }
    }
    fclose(f);
    if (buf_append(&b, "", 0) != 0)
        return err_set(e, ERR_NOMEM, "out of memory reading %s", path);
    *out = buf_take(&b);
    return 0;
}

static int has_file(const char *dir, const char *name)
{
    char path[PATH_MAX];

    snprintf(path, sizeof(path), "%s/%s", dir, name);
    return access(path, F_OK) == 0;
}

static int model_build(const char *repo, const char *name, int instances, struct model **out,
                       struct err *e)
{
    char model_dir[PATH_MAX], path[PATH_MAX + 16], version_dir[PATH_MAX + 32], errbuf[256] = "";
    struct model_config cfg = {0};
    struct model *m = NULL;
    json_error_t jerr;
    json_t *root = NULL;
    char *text = NULL;
    void *backend_state;
    int rc;

    *out = NULL;
    snprintf(model_dir, sizeof(model_dir), "%s/%s", repo, name);
    snprintf(path, sizeof(path), "%s/config.json", model_dir);
    rc = read_file(path, &text, e);
    if (rc == ERR_NOT_FOUND && has_file(model_dir, "config.pbtxt"))
        err_set(e, rc,
                "%s: no config.json (inferd reads config.json, not Triton's config.pbtxt: "
                "e.g. {\"backend\": \"xgboost\"})",
                model_dir);
    if (rc != 0)
        goto cleanup;
    root = json_loads(text, JSON_REJECT_DUPLICATES, &jerr);
    if (!root || !json_is_object(root)) {
        rc = err_set(e, ERR_INVALID, "%s: line %d: %s", path, root ? 1 : jerr.line,
                     root ? "expected a JSON object" : jerr.text);
        goto cleanup;
    }
    rc = parse_config(root, model_dir, path, &cfg, e);
    if (rc == 0)
        rc = pick_version(model_dir, cfg.version, strcmp(cfg.backend, "http") == 0, &cfg.version,
                          e);
    if (rc != 0)
        goto cleanup;
    if (cfg.version == 0) { /* no version folder: the model folder itself, as version 1 */
        cfg.version = 1;
        snprintf(version_dir, sizeof(version_dir), "%s", model_dir);
    } else {
        snprintf(version_dir, sizeof(version_dir), "%s/%lld", model_dir, (long long)cfg.version);
    }
    m = calloc(1, sizeof(*m));
    if (!m || !(m->name = strdup(name))) {
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    m->version = cfg.version;
    snprintf(m->version_str, sizeof(m->version_str), "%lld", (long long)cfg.version);
    m->default_timeout_us = cfg.default_timeout_us;
    m->job_lease_timeout_ms = cfg.lease_timeout_s * 1000;
    if (cfg.callback_url && !(m->callback_url = strdup(cfg.callback_url))) {
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    m->metrics = metrics_model_get(name);
    atomic_init(&m->refs, 1);
    rc = backend_open(cfg.backend, cfg.plugin_path[0] ? cfg.plugin_path : NULL, batcher_host(),
                      &m->api, &backend_state, e);
    if (rc != 0) {
        char reason[sizeof(e->msg)];
        snprintf(reason, sizeof(reason), "%s", e->msg);
        err_set(e, e->code, "%s: %s", path, reason);
        goto cleanup;
    }
    if (m->api->model_create(backend_state, version_dir, text, &m->model_state, &m->info, errbuf,
                             sizeof(errbuf)) != 0) {
        rc = err_set(e, ERR_INVALID, "%s: %s", version_dir, errbuf[0] ? errbuf : "load failed");
        m->model_state = NULL;
        goto cleanup;
    }
    if (m->info.feature_names && m->info.n_inputs >= 1 && m->info.inputs[0].n_dims == 2 &&
        m->info.inputs[0].shape[1] > 0) {
        rc = features_init(&m->features, m->info.feature_names, m->info.feature_types,
                           (size_t)m->info.inputs[0].shape[1], e);
        if (rc != 0) {
            char reason[sizeof(e->msg)];
            snprintf(reason, sizeof(reason), "%s", e->msg);
            err_set(e, rc, "%s: %s", version_dir, reason);
            goto cleanup;
        }
    }
    cfg.batch.metrics = m->metrics;
    /* only a version that loaded has statistics */
    m->stats = metrics_version_get(name, m->version);
    cfg.batch.stats = m->stats;
    cfg.batch.max_in_flight = m->info.max_in_flight;
    if (instances > 0)
        cfg.batch.instances = instances;
    if (!m->info.is_batched)
        cfg.batch.max_batch_size = 1; /* rows cannot be split or joined */
    rc = batcher_create(&cfg.batch, m->api, m->model_state, name, &m->batcher, e);
    if (rc != 0)
        goto cleanup;
    *out = m;
    m = NULL;
cleanup:
    model_destroy(m);
    json_decref(root);
    free(text);
    return rc;
}

/* ---- the registry ---- */

static struct entry *find_entry(struct registry *r, const char *name)
{
    for (struct entry *en = r->entries; en; en = en->next)
        if (strcmp(en->name, name) == 0)
            return en;
    return NULL;
}

static int valid_name(const char *name)
{
    if (!name[0] || name[0] == '.' || strlen(name) > 200)
        return 0;
    for (const char *p = name; *p; p++)
        if (*p == '/' || (unsigned char)*p < 0x21)
            return 0;
    return 1;
}

/* Swaps in `m` (NULL: unloads) and records `reason`. Caller holds load_lock. */
static int install(struct registry *r, const char *name, struct model *m, const char *reason)
{
    struct model *old = NULL;
    struct entry *en;

    pthread_mutex_lock(&r->lock);
    en = find_entry(r, name);
    if (!en) {
        en = calloc(1, sizeof(*en));
        if (en && !(en->name = strdup(name))) {
            free(en);
            en = NULL;
        }
        if (!en) {
            pthread_mutex_unlock(&r->lock);
            model_release(m);
            return ERR_NOMEM;
        }
        en->next = r->entries;
        r->entries = en;
    }
    if (m || !reason) {
        old = en->current;
        en->current = m;
    }
    snprintf(en->reason, sizeof(en->reason), "%s", reason ? reason : "");
    pthread_mutex_unlock(&r->lock);
    model_release(old); /* in-flight requests keep it alive until they finish */
    return 0;
}

static int load_locked(struct registry *r, const char *name, struct err *e)
{
    struct model *m;
    int rc;

    char dir[PATH_MAX];
    struct stat st;

    snprintf(dir, sizeof(dir), "%s/%s", r->dir, name);
    if (!valid_name(name) || stat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
        return err_set(e, ERR_NOT_FOUND, "no model folder '%s' in %s", name, r->dir);
    rc = model_build(r->dir, name, r->instances, &m, e);
    if (rc != 0) {
        log_error("model", "load failed", "model=%s reason=\"%s\"", name, e->msg);
        install(r, name, NULL, e->msg);
        return rc == ERR_NOMEM ? ERR_NOMEM : ERR_INVALID;
    }
    install(r, name, m, NULL);
    log_info("model", "loaded", "model=%s version=%lld backend=%s", name, (long long)m->version,
             m->api->name);
    return 0;
}

int registry_load(struct registry *r, const char *name, struct err *e)
{
    int rc;

    pthread_mutex_lock(&r->load_lock);
    rc = load_locked(r, name, e);
    pthread_mutex_unlock(&r->load_lock);
    return rc;
}

int registry_unload(struct registry *r, const char *name, struct err *e)
{
    struct model *old = NULL;
    struct entry *en;

    pthread_mutex_lock(&r->load_lock);
    pthread_mutex_lock(&r->lock);
    en = find_entry(r, name);
    if (en) {
        old = en->current;
        en->current = NULL;
        snprintf(en->reason, sizeof(en->reason), "unloaded");
    }
    pthread_mutex_unlock(&r->lock);
    pthread_mutex_unlock(&r->load_lock);
    if (!old)
        return err_set(e, ERR_NOT_FOUND, "model '%s' is not loaded", name);
    model_release(old);
    return 0;
}

int registry_load_all(struct registry *r)
{
    DIR *d;
    struct dirent *de;
    struct err e;
    int failed = 0;

    pthread_mutex_lock(&r->load_lock);
    d = opendir(r->dir);
    if (!d) {
        log_error("model", "cannot open the model repository", "path=%s reason=\"%s\"", r->dir,
                  strerror(errno));
        pthread_mutex_unlock(&r->load_lock);
        return 1;
    }
    while ((de = readdir(d))) {
        char cfg[PATH_MAX];
        struct stat st;
        if (de->d_name[0] == '.')
            continue;
        snprintf(cfg, sizeof(cfg), "%s/%s", r->dir, de->d_name);
        if (stat(cfg, &st) != 0 || !S_ISDIR(st.st_mode))
            continue;
        if (load_locked(r, de->d_name, &e) != 0)
            failed++;
    }
    closedir(d);
    /* folders that disappeared: stop serving them */
    for (;;) {
        struct entry *gone = NULL;
        pthread_mutex_lock(&r->lock);
        for (struct entry *en = r->entries; en && !gone; en = en->next) {
            char cfg[PATH_MAX];
            snprintf(cfg, sizeof(cfg), "%s/%s", r->dir, en->name);
            if (en->current && access(cfg, F_OK) != 0)
                gone = en;
        }
        struct model *old = gone ? gone->current : NULL;
        if (gone) {
            gone->current = NULL;
            snprintf(gone->reason, sizeof(gone->reason), "folder removed");
        }
        pthread_mutex_unlock(&r->lock);
        if (!gone)
            break;
        model_release(old);
    }
    pthread_mutex_unlock(&r->load_lock);
    return failed;
}

int registry_acquire(struct registry *r, const char *name, int64_t version, struct model **out,
                     struct err *e)
{
    struct entry *en;
    struct model *m = NULL;
    int rc = 0;

    pthread_mutex_lock(&r->lock);
    en = find_entry(r, name);
    if (!en || !en->current)
        rc = err_set(e, ERR_NOT_FOUND, "unknown model '%.200s'%s%s", name,
                     en && en->reason[0] ? ": " : "", en ? en->reason : "");
    else if (version && en->current->version != version)
        rc = err_set(e, ERR_NOT_FOUND, "model '%.200s' has no version %lld loaded (serving %lld)",
                     name, (long long)version, (long long)en->current->version);
    else {
        m = en->current;
        atomic_fetch_add(&m->refs, 1);
    }
    pthread_mutex_unlock(&r->lock);
    *out = m;
    return rc;
}

int registry_index(struct registry *r, struct buf *out)
{
    int rc, first = 1;

    pthread_mutex_lock(&r->lock);
    rc = buf_puts(out, "[");
    for (struct entry *en = r->entries; rc == 0 && en; en = en->next) {
        rc = buf_puts(out, first ? "{\"name\":" : ",{\"name\":");
        first = 0;
        if (rc == 0)
            rc = buf_json_string(out, en->name);
        if (rc == 0 && en->current)
            rc = buf_printf(out, ",\"version\":\"%lld\",\"state\":\"READY\"}",
                            (long long)en->current->version);
        else if (rc == 0) {
            rc = buf_puts(out, ",\"state\":\"UNAVAILABLE\",\"reason\":");
            if (rc == 0)
                rc = buf_json_string(out, en->reason);
            if (rc == 0)
                rc = buf_puts(out, "}");
        }
    }
    pthread_mutex_unlock(&r->lock);
    return rc ? rc : buf_puts(out, "]");
}

int registry_create(const char *dir, struct registry **out, struct err *e)
{
    struct registry *r = calloc(1, sizeof(*r));

    *out = NULL;
    if (!r || !(r->dir = strdup(dir))) {
        free(r);
        return err_set(e, ERR_NOMEM, "out of memory");
    }
    pthread_mutex_init(&r->lock, NULL);
    pthread_mutex_init(&r->load_lock, NULL);
    *out = r;
    return 0;
}

void registry_set_instances(struct registry *r, int n)
{
    r->instances = n;
}

void registry_destroy(struct registry *r)
{
    struct entry *en, *next;

    if (!r)
        return;
    for (en = r->entries; en; en = next) {
        next = en->next;
        model_release(en->current);
        free(en->name);
        free(en);
    }
    pthread_mutex_destroy(&r->lock);
    pthread_mutex_destroy(&r->load_lock);
    free(r->dir);
    free(r);
}
