/*
 * warehouse.c: the warehouse front (warehouse.h): picks the implementation by the URI and
 * keeps what every source has (its name, masked location, keys and feature columns).
 */
#define _GNU_SOURCE
#include "warehouse/warehouse_internal.h"
#include "core/clock.h"
#include "core/url.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static const struct warehouse_ops *const warehouses[] = {&warehouse_postgres_ops};
#define N_WAREHOUSES (sizeof(warehouses) / sizeof(warehouses[0]))

static const struct warehouse_ops *ops_for(const char *uri)
{
    for (size_t i = 0; uri && i < N_WAREHOUSES; i++)
        if (warehouses[i]->supports(uri))
            return warehouses[i];
    return NULL;
}

int warehouse_supports(const char *uri)
{
    return ops_for(uri) != NULL;
}

int warehouse_open(const struct warehouse_spec *spec, struct warehouse_source **out, struct err *e)
{
    const struct warehouse_ops *ops = ops_for(spec->uri);
    struct warehouse_source *s;
    int rc;

    *out = NULL;
    if (!ops)
        return err_set(e, ERR_INVALID, "not a warehouse location");
    s = calloc(1, sizeof(*s));
    if (!s || !(s->shown = url_redacted(spec->uri))) {
        free(s);
        return err_set(e, ERR_NOMEM, "out of memory");
    }
    s->ops = ops;
    rc = ops->open(s, spec, e);
    if (rc != 0) {
        warehouse_close(s);
        return rc;
    }
    *out = s;
    return 0;
}

int warehouse_continue_after(struct warehouse_source *s, const char *const *after, struct err *e)
{
    return s->ops->continue_after(s, after, e);
}

int warehouse_read_row(struct warehouse_source *s, struct buf *features, struct buf *keys,
                       struct err *e)
{
    return s->ops->read_row(s, features, keys, e);
}

void warehouse_close(struct warehouse_source *s)
{
    if (!s)
        return;
    if (s->ops)
        s->ops->close(s);
    for (size_t i = 0; i < s->n_keys; i++) {
        free(s->key_names[i]);
        if (s->key_types)
            free(s->key_types[i]);
    }
    free(s->key_names);
    free(s->key_types);
    free(s->name);
    free(s->shown);
    buf_release(&s->features);
    free(s);
}

const char *warehouse_name(const struct warehouse_source *s)
{
    return s->name;
}

const char *warehouse_shown(const struct warehouse_source *s)
{
    return s->shown;
}

size_t warehouse_n_keys(const struct warehouse_source *s)
{
    return s->n_keys;
}

const char *warehouse_key_name(const struct warehouse_source *s, size_t i)
{
    return s->key_names[i];
}

const char *warehouse_feature_header(const struct warehouse_source *s)
{
    return s->features.data ? s->features.data : "";
}

const char *warehouse_key_type(const struct warehouse_source *s, size_t i)
{
    return s->key_types && s->key_types[i] ? s->key_types[i] : "text";
}

/* ---- sinks ---- */

static const struct warehouse_sink_ops *const sinks[] = {&warehouse_postgres_sink_ops};
#define N_SINKS (sizeof(sinks) / sizeof(sinks[0]))

static const struct warehouse_sink_ops *sink_ops(const char *uri)
{
    for (size_t i = 0; uri && i < N_SINKS; i++)
        if (sinks[i]->supports(uri))
            return sinks[i];
    return NULL;
}

int warehouse_sink_finish(const struct warehouse_sink_spec *spec, struct err *e)
{
    const struct warehouse_sink_ops *ops = sink_ops(spec->uri);
    struct warehouse_sink *k;
    int rc;

    if (!ops)
        return err_set(e, ERR_INVALID, "not a warehouse location");
    if (!spec->run || !spec->model_version)
        return err_set(e, ERR_INVALID, "a batch run's finish needs its id and model version");
    k = calloc(1, sizeof(*k));
    if (!k || !(k->shown = url_redacted(spec->uri))) {
        free(k);
        return err_set(e, ERR_NOMEM, "out of memory");
    }
    k->ops = ops;
    rc = ops->finish(k, spec, e);
    warehouse_sink_close(k); /* a finish records no failure: the task that ran it is retried */
    return rc;
}

int warehouse_sink_open(const struct warehouse_sink_spec *spec, struct warehouse_sink **out,
                        struct err *e)
{
    const struct warehouse_sink_ops *ops = NULL;
    struct warehouse_sink *k;
    int rc;

    *out = NULL;
    for (size_t i = 0; spec->uri && i < N_SINKS && !ops; i++)
        if (sinks[i]->supports(spec->uri))
            ops = sinks[i];
    if (!ops)
        return err_set(e, ERR_INVALID, "not a warehouse location");
    if (spec->n_keys == 0 || spec->per_row == 0)
        return err_set(e, ERR_INVALID, "a table output needs key columns and a prediction");
    k = calloc(1, sizeof(*k));
    if (!k || !(k->shown = url_redacted(spec->uri))) {
        free(k);
        return err_set(e, ERR_NOMEM, "out of memory");
    }
    k->ops = ops;
    k->per_row = spec->per_row;
    rc = ops->open(k, spec, e);
    if (rc != 0) {
        warehouse_sink_close(k);
        return rc;
    }
    *out = k;
    return 0;
}

static int put_value(struct buf *b, float v, const char *none)
{
    return isfinite(v) ? buf_printf(b, "%.9g", (double)v) : buf_puts(b, none);
}

/* Rows come in key order: a key given twice comes twice in a row. */
static int same_keys(const struct warehouse_sink *k, const char *keys, size_t len)
{
    return k->last_keys.data && k->last_keys.len == len && memcmp(k->last_keys.data, keys, len) == 0;
}

/* The upsert would refuse the whole run at its end; say it now, naming the key. */
static int duplicate(const struct warehouse_sink *k, const char *keys, size_t len, struct err *e)
{
    int shown = len > 0 && len - 1 <= 120 ? (int)len - 1 : 120; /* without the last ',' */

    return err_set(e, ERR_INVALID,
                   "%s: two rows have the keys (%.*s): the key columns must name one row each "
                   "(give --key-columns that do)",
                   k->name, shown, keys);
}

int warehouse_sink_put(struct warehouse_sink *k, const char *keys, size_t keys_len, const float *y,
                       size_t n, struct err *e)
{
    int rc;

    if (n != k->per_row)
        return err_set(e, ERR_BACKEND,
                       "%s: the model gave %zu values for a row; the table holds %zu (%s)", k->name,
                       n, k->per_row, k->per_row > 1 ? "an array" : "one double precision value");
    if (same_keys(k, keys, keys_len))
        return duplicate(k, keys, keys_len, e);
    rc = buf_append(&k->rows, keys, keys_len);
    if (rc == 0) {
        k->last_keys.len = 0;
        rc = buf_append(&k->last_keys, keys, keys_len);
    }
    if (rc == 0 && n == 1)
        rc = put_value(&k->rows, y[0], "");
    for (size_t i = 0; rc == 0 && n > 1 && i < n; i++)
        rc = buf_puts(&k->rows, i ? "," : "\"{") || put_value(&k->rows, y[i], "NULL");
    if (rc == 0 && n > 1)
        rc = buf_puts(&k->rows, "}\"");
    if (rc == 0)
        rc = buf_puts(&k->rows, ",\n");
    if (rc != 0)
        return err_set(e, ERR_NOMEM, "out of memory");
    k->n_rows++;
    return 0;
}

int warehouse_sink_put_bad(struct warehouse_sink *k, const char *keys, size_t keys_len,
                           const char *reason, struct err *e)
{
    int rc;

    if (same_keys(k, keys, keys_len))
        return duplicate(k, keys, keys_len, e);
    rc = buf_append(&k->rows, keys, keys_len) || buf_puts(&k->rows, ",\"");

    k->last_keys.len = 0;
    rc = rc || buf_append(&k->last_keys, keys, keys_len);

    for (const char *p = reason; rc == 0 && *p; p++)
        rc = *p == '"' ? buf_puts(&k->rows, "\"\"") : buf_append(&k->rows, p, 1);
    if (rc == 0)
        rc = buf_puts(&k->rows, "\"\n");
    if (rc != 0)
        return err_set(e, ERR_NOMEM, "out of memory");
    k->n_rows++;
    k->n_bad++;
    return 0;
}

/* Sends the rows put so far, with their resume point, in one transaction. */
static int send_rows(struct warehouse_sink *k, struct err *e)
{
    int rc = 0;

    k->last_send_ns = (int64_t)clock_mono_ns();
    if (k->n_rows > 0) {
        k->records += (int64_t)k->n_rows;
        k->errors += (int64_t)k->n_bad;
        rc = k->ops->write(k, e);
        if (rc != 0) { /* not written: the counts stay those of the last resume point */
            k->records -= (int64_t)k->n_rows;
            k->errors -= (int64_t)k->n_bad;
        }
    }
    k->rows.len = 0;
    k->n_rows = 0;
    k->n_bad = 0;
    return rc;
}

/*
 * A chunk of the batch runner is about a thousand rows: a transaction each (with the commit's
 * WAL flush) cost 2.1 of 7.5 s over 1,000,000 rows. Rows are sent once a mebibyte has
 * gathered or a second has passed since the last send, so a kill loses about a second of work.
 */
#define SEND_BYTES (1u << 20)
#define SEND_NS 1000000000LL

int warehouse_sink_write(struct warehouse_sink *k, struct err *e)
{
    if (k->rows.len < SEND_BYTES && (int64_t)clock_mono_ns() - k->last_send_ns < SEND_NS)
        return 0;
    return send_rows(k, e);
}

int warehouse_sink_commit(struct warehouse_sink *k, struct err *e)
{
    int rc = send_rows(k, e);

    return rc ? rc : k->ops->commit(k, e);
}

void warehouse_sink_fail(struct warehouse_sink *k, const char *why)
{
    if (!k)
        return;
    free(k->failure);
    k->failure = strdup(why ? why : "failed");
}

void warehouse_sink_close(struct warehouse_sink *k)
{
    if (!k)
        return;
    if (k->ops)
        k->ops->close(k);
    free(k->name);
    free(k->shown);
    buf_release(&k->rows);
    buf_release(&k->last_keys);
    for (size_t i = 0; i < k->n_after; i++)
        free(k->after[i]);
    free(k->after);
    free(k->failure);
    free(k);
}

int warehouse_sink_resumed(const struct warehouse_sink *k, const char *const **after,
                           int64_t *records, int64_t *errors)
{
    *after = (const char *const *)k->after;
    *records = k->records;
    *errors = k->errors;
    return k->resumed;
}

int64_t warehouse_sink_kept(const struct warehouse_sink *k)
{
    return k->records;
}


const char *warehouse_sink_name(const struct warehouse_sink *k)
{
    return k->name;
}

const char *warehouse_sink_shown(const struct warehouse_sink *k)
{
    return k->shown;
}

/* ---- splitting a source into key ranges ---- */

static const struct warehouse_split_ops *const splitters[] = {&warehouse_postgres_split_ops};
#define N_SPLITTERS (sizeof(splitters) / sizeof(splitters[0]))

int warehouse_split(const struct warehouse_spec *spec, int64_t rows_per_part,
                    struct warehouse_split *out, struct err *e)
{
    const struct warehouse_split_ops *ops = NULL;
    struct warehouse_source *s = NULL;
    int rc;

    memset(out, 0, sizeof(*out));
    for (size_t i = 0; spec->uri && i < N_SPLITTERS; i++)
        if (splitters[i]->supports(spec->uri))
            ops = splitters[i];
    if (!ops)
        return err_set(e, ERR_INVALID, "not a warehouse location");
    if (rows_per_part < 1)
        return err_set(e, ERR_INVALID, "rows per part: %lld is below the minimum 1",
                       (long long)rows_per_part);
    rc = warehouse_open(spec, &s, e); /* every check the reading run makes */
    if (rc != 0)
        return rc;
    /* the split is one statement on a connection of its own: the source's (and any reading
     * it started) ends now */
    s->ops->close(s);
    out->n_keys = s->n_keys;
    out->n_parts = 1;
    if (!(out->name = strdup(s->name)))
        rc = err_set(e, ERR_NOMEM, "out of memory");
    if (rc == 0)
        rc = ops->split(s, spec, rows_per_part, out, e);
    warehouse_close(s);
    return rc;
}

int warehouse_split_add(struct warehouse_split *s, const char *const *values)
{
    size_t n = s->n_parts - 1, k;
    char **grown;

    if (n > 0) {
        for (k = 0; k < s->n_keys; k++)
            if (strcmp(s->bounds[(n - 1) * s->n_keys + k], values[k]) != 0)
                break;
        if (k == s->n_keys)
            return 0;
    }
    grown = realloc(s->bounds, (n + 1) * s->n_keys * sizeof(*grown));
    if (!grown)
        return ERR_NOMEM;
    s->bounds = grown;
    for (k = 0; k < s->n_keys; k++) {
        if (!(grown[n * s->n_keys + k] = strdup(values[k]))) {
            while (k-- > 0)
                free(grown[n * s->n_keys + k]);
            return ERR_NOMEM;
        }
    }
    s->n_parts++;
    return 0;
}

void warehouse_split_release(struct warehouse_split *s)
{
    if (!s)
        return;
    for (size_t i = 0; s->n_parts > 0 && i < (s->n_parts - 1) * s->n_keys; i++)
        free(s->bounds[i]);
    free(s->bounds);
    free(s->name);
    memset(s, 0, sizeof(*s));
}

const char *const *warehouse_split_after(const struct warehouse_split *s, size_t i)
{
    return i == 0 || i >= s->n_parts ? NULL : (const char *const *)&s->bounds[(i - 1) * s->n_keys];
}

const char *const *warehouse_split_upto(const struct warehouse_split *s, size_t i)
{
    return i + 1 >= s->n_parts ? NULL : (const char *const *)&s->bounds[i * s->n_keys];
}
