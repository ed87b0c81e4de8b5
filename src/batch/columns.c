/*
 * columns.c: features and key columns of batch records, by name or by position (columns.h).
 *
 * A layout is bound once per object (its header, or positions) and then read by every parser
 * thread without a lock: nothing in it changes until batch_columns_release().
 */
#define _GNU_SOURCE
#include "batch/columns.h"
#include "batch/batch_internal.h"
#include "core/jdoc.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define KEY_NAME_MAX 256

/* A column or field name for a message: at most 64 bytes, unprintable ones as '?'. */
static void shown(char out[65], const char *s, size_t len)
{
    size_t n = len < 64 ? len : 64;

    for (size_t i = 0; i < n; i++)
        out[i] = (unsigned char)s[i] < 0x20 || s[i] == 0x7f ? '?' : s[i];
    out[n] = '\0';
}

/*
 * A name read from a file, for a message: `what 'name'` when it looks like a column name
 * (at most 64 bytes of letters, digits, '_', '-', '.' and spaces), else `what N` by its
 * 1-based position. A first line that is no header (a text file given with --csv-header)
 * is then not copied into an error: issue 13's rule that errors quote nothing of a file.
 */
static void from_file(char out[96], const char *what, const char *s, size_t pos)
{
    size_t n = strlen(s);
    int plain = n > 0 && n <= 64 && s[0] != ' ' &&
                strspn(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-. ") == n;

    if (plain)
        snprintf(out, 96, "%s '%s'", what, s);
    else
        snprintf(out, 96, "%s %zu", what, pos);
}

/* ---- --key-columns ---- */

void batch_keys_release(struct batch_keys *k)
{
    for (size_t i = 0; i < k->n; i++)
        free(k->names[i]);
    free(k->names);
    k->names = NULL;
    k->n = 0;
}

int batch_keys_parse(const char *spec, struct batch_keys *k, struct err *e)
{
    const char *p = spec;
    int rc = 0;

    memset(k, 0, sizeof(*k));
    if (!spec || !spec[0])
        return 0;
    k->names = calloc(BATCH_MAX_KEYS, sizeof(*k->names));
    if (!k->names)
        return err_set(e, ERR_NOMEM, "out of memory");
    for (;;) {
        const char *q = strchr(p, ','), *end = q ? q : p + strlen(p);
        char name[65];
        while (p < end && (*p == ' ' || *p == '\t'))
            p++;
        while (end > p && (end[-1] == ' ' || end[-1] == '\t'))
            end--;
        shown(name, p, (size_t)(end - p));
        if (end == p) {
            rc = err_set(e, ERR_INVALID, "key columns: an empty name in '%.100s'", spec);
            break;
        }
        if (end - p > KEY_NAME_MAX) {
            rc = err_set(e, ERR_INVALID, "key columns: '%s...' is longer than %d bytes", name,
                         KEY_NAME_MAX);
            break;
        }
        if (k->n == BATCH_MAX_KEYS) {
            rc = err_set(e, ERR_INVALID, "key columns: more than %d", BATCH_MAX_KEYS);
            break;
        }
        for (size_t i = 0; i < k->n && rc == 0; i++)
            if (strlen(k->names[i]) == (size_t)(end - p) &&
                memcmp(k->names[i], p, (size_t)(end - p)) == 0)
                rc = err_set(e, ERR_INVALID, "key columns: '%s' is named twice", name);
        if (rc != 0)
            break;
        if (!(k->names[k->n] = strndup(p, (size_t)(end - p)))) {
            rc = err_set(e, ERR_NOMEM, "out of memory");
            break;
        }
        k->n++;
        if (!q)
            break;
        p = q + 1;
    }
    if (rc != 0)
        batch_keys_release(k);
    return rc;
}

/* 1 and *pos when `s` is a 0-based position (digits only, below a billion) */
static int key_position(const char *s, int64_t *pos)
{
    int64_t v = 0;
    size_t n = strlen(s);

    if (n == 0 || n > 9 || strspn(s, "0123456789") != n)
        return 0;
    for (size_t i = 0; i < n; i++)
        v = v * 10 + (s[i] - '0');
    *pos = v;
    return 1;
}

/* The key `name` (`len` bytes) is, or -1. */
static int64_t key_index(const struct batch_keys *k, const char *name, size_t len)
{
    for (size_t i = 0; k && i < k->n; i++)
        if (strlen(k->names[i]) == len && memcmp(k->names[i], name, len) == 0)
            return (int64_t)i;
    return -1;
}

/* ---- layouts ---- */

void batch_columns_init(struct batch_columns *c, const struct batch_keys *k,
                        const struct features *f, int64_t width)
{
    memset(c, 0, sizeof(*c));
    c->keys = k;
    c->features = f;
    c->width = width;
}

static void unbind(struct batch_columns *c)
{
    for (size_t i = 0; c->key_names && c->keys && i < c->keys->n; i++)
        free(c->key_names[i]);
    free(c->key_names);
    free(c->role);
    c->key_names = NULL;
    c->role = NULL;
    c->n_columns = 0;
    c->identity = c->by_position = 0;
}

void batch_columns_release(struct batch_columns *c)
{
    unbind(c);
}

static int bind_alloc(struct batch_columns *c, size_t n_columns, struct err *e)
{
    size_t n_keys = c->keys ? c->keys->n : 0;

    unbind(c);
    c->role = malloc((n_columns ? n_columns : 1) * sizeof(*c->role));
    c->key_names = calloc(n_keys ? n_keys : 1, sizeof(*c->key_names));
    if (!c->role || !c->key_names) {
        unbind(c);
        return err_set(e, ERR_NOMEM, "out of memory");
    }
    c->n_columns = n_columns;
    return 0;
}

int batch_columns_positional(struct batch_columns *c, struct err *e)
{
    size_t n_keys = c->keys ? c->keys->n : 0;
    size_t n_columns = (size_t)c->width + n_keys;
    int64_t next_feature = 0;
    int rc;

    for (size_t i = 0; i < n_keys; i++) {
        int64_t pos;
        char name[65];
        shown(name, c->keys->names[i], strlen(c->keys->names[i]));
        if (!key_position(c->keys->names[i], &pos))
            return err_set(e, ERR_INVALID,
                           "key column '%s': records without names (a CSV without --csv-header, "
                           "JSON arrays) take positions (0-based) as key columns",
                           name);
        if ((size_t)pos >= n_columns)
            return err_set(e, ERR_INVALID,
                           "key column %lld: records have %zu columns (%lld features and %zu "
                           "key columns)",
                           (long long)pos, n_columns, (long long)c->width, n_keys);
    }
    rc = bind_alloc(c, n_columns, e);
    if (rc != 0)
        return rc;
    for (size_t col = 0; col < n_columns; col++)
        c->role[col] = INT64_MIN;
    for (size_t i = 0; i < n_keys; i++) {
        int64_t pos = 0;
        key_position(c->keys->names[i], &pos);
        c->role[pos] = -1 - (int64_t)i;
        if (asprintf(&c->key_names[i], "column_%lld", (long long)pos) < 0) {
            c->key_names[i] = NULL;
            unbind(c);
            return err_set(e, ERR_NOMEM, "out of memory");
        }
    }
    for (size_t col = 0; col < n_columns; col++)
        if (c->role[col] == INT64_MIN)
            c->role[col] = next_feature++;
    c->identity = n_keys == 0;
    return 0;
}

int batch_columns_named(struct batch_columns *c, char *const *names, size_t n, struct err *e)
{
    const struct features *f = c->features;
    size_t n_keys = c->keys ? c->keys->n : 0;
    unsigned char *seen = NULL;
    int64_t next_feature = 0;
    char name[96];
    int rc;

    rc = bind_alloc(c, n, e);
    if (rc == 0 && !(seen = calloc((size_t)c->width + n_keys + 1, 1)))
        rc = err_set(e, ERR_NOMEM, "out of memory");
    c->by_position = !f || f->n == 0;
    for (size_t col = 0; rc == 0 && col < n; col++) {
        int64_t k = key_index(c->keys, names[col], strlen(names[col]));
        int64_t feature = k >= 0           ? -1
                          : c->by_position ? next_feature++
                                           : features_find(f, names[col], strlen(names[col]));
        from_file(name, "column", names[col], col + 1);
        if (k >= 0) {
            if (seen[c->width + k]++)
                rc = err_set(e, ERR_INVALID, "%s appears twice", name);
            else if (!(c->key_names[k] = strdup(names[col])))
                rc = err_set(e, ERR_NOMEM, "out of memory");
            c->role[col] = -1 - k;
        } else if (c->by_position && feature >= c->width) {
            rc = err_set(e, ERR_INVALID,
                         "%zu columns besides the key columns; the model takes %lld features "
                         "(it has no feature names, so columns are taken in order)",
                         n - n_keys, (long long)c->width);
        } else if (feature < 0) {
            rc = err_set(e, ERR_INVALID, "%s is neither a feature of the model nor a key column",
                         name);
        } else if (seen[feature]++) {
            rc = err_set(e, ERR_INVALID, "%s appears twice", name);
        } else {
            c->role[col] = feature;
        }
    }
    for (size_t i = 0; rc == 0 && i < n_keys; i++) {
        if (!seen[c->width + i]) {
            shown(name, c->keys->names[i], strlen(c->keys->names[i]));
            rc = err_set(e, ERR_INVALID, "no key column '%s' among the columns", name);
        }
    }
    for (int64_t j = 0; rc == 0 && j < c->width; j++) {
        if (seen[j])
            continue;
        if (c->by_position)
            rc = err_set(e, ERR_INVALID,
                         "%zu columns besides the key columns; the model takes %lld features "
                         "(it has no feature names, so columns are taken in order)",
                         n - n_keys, (long long)c->width);
        else
            rc = err_set(e, ERR_INVALID, "no column for feature '%.64s' of the model", f->names[j]);
    }
    if (rc == 0) {
        c->identity = n_keys == 0 && n == (size_t)c->width;
        for (size_t col = 0; c->identity && col < n; col++)
            c->identity = c->role[col] == (int64_t)col;
    } else {
        unbind(c);
    }
    free(seen);
    return rc;
}

int batch_columns_split_header(const char *line, size_t len, char ***names, size_t *n,
                               struct err *e)
{
    const char *p = line, *end = line + len;
    size_t cap = 1;

    *names = NULL;
    *n = 0;
    if (len >= 3 && memcmp(p, "\xEF\xBB\xBF", 3) == 0) /* the BOM Excel writes */
        p += 3;
    for (const char *s = p; s < end; s++)
        cap += *s == ',';
    *names = calloc(cap, sizeof(**names));
    if (!*names)
        return err_set(e, ERR_NOMEM, "out of memory");
    for (;;) {
        const char *q = memchr(p, ',', (size_t)(end - p)), *fend = q ? q : end;
        while (p < fend && (*p == ' ' || *p == '\t'))
            p++;
        while (fend > p && (fend[-1] == ' ' || fend[-1] == '\t'))
            fend--;
        if (fend - p >= 2 && *p == '"' && fend[-1] == '"')
            p++, fend--;
        if (!((*names)[*n] = strndup(p, (size_t)(fend - p)))) {
            for (size_t i = 0; i < *n; i++)
                free((*names)[i]);
            free(*names);
            *names = NULL;
            *n = 0;
            return err_set(e, ERR_NOMEM, "out of memory");
        }
        (*n)++;
        if (!q)
            break;
        p = q + 1;
    }
    return 0;
}

/* ---- records ---- */

struct span {
    const char *p;
    size_t len;
};

char *batch_columns_parse_csv(const struct batch_columns *c, const char *line, size_t len,
                              float *row, struct buf *keys)
{
    const char *p = line, *end = line + len;
    struct span key[BATCH_MAX_KEYS];
    size_t col = 0, n_keys = c->keys ? c->keys->n : 0;

    for (;;) {
        const char *q = memchr(p, ',', (size_t)(end - p)), *fend = q ? q : end;
        if (col == c->n_columns)
            return batch_reason("expected %zu columns, got more", c->n_columns);
        if (c->role[col] < 0) {
            key[-1 - c->role[col]] = (struct span){p, (size_t)(fend - p)};
        } else {
            int rc = batch_parse_field(p, (size_t)(fend - p), &row[c->role[col]]);
            if (rc == -2)
                return batch_reason("column %zu: value too long", col + 1);
            if (rc != 0)
                return batch_reason("column %zu: not a number", col + 1);
        }
        col++;
        if (!q)
            break;
        p = q + 1;
    }
    if (col < c->n_columns)
        return batch_reason("expected %zu columns, got %zu", c->n_columns, col);
    for (size_t i = 0; i < n_keys; i++)
        if (buf_append(keys, key[i].p, key[i].len) != 0 || buf_puts(keys, ",") != 0)
            return batch_reason("out of memory");
    return NULL;
}

/* Appends `"name":value,` */
static int append_key(struct buf *keys, const char *name, json_t *v)
{
    char *text = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
    int rc = text ? 0 : -1;

    if (rc == 0)
        rc = buf_json_string(keys, name);
    if (rc == 0)
        rc = buf_printf(keys, ":%s,", text);
    free(text);
    return rc;
}

static char *number_into(json_t *v, float *out, const char *what, size_t i, const char *name)
{
    if (json_is_number(v))
        *out = (float)json_number_value(v);
    else if (json_is_null(v))
        *out = NAN;
    else if (name)
        return batch_reason("%s is not a number", name);
    else
        return batch_reason("%s %zu is not a number", what, i + 1);
    return NULL;
}

static char *parse_array(const struct batch_columns *c, json_t *a, float *row, struct buf *keys)
{
    json_t *key[BATCH_MAX_KEYS], *v;
    size_t i, n_keys = c->keys ? c->keys->n : 0;
    char *why;

    if (c->n_columns == 0)
        return batch_reason("a JSON array, but the key columns are names: give JSON objects, "
                            "or positions (0-based) as key columns");
    if (json_array_size(a) != c->n_columns)
        return batch_reason("expected %zu values, got %zu", c->n_columns, json_array_size(a));
    json_array_foreach (a, i, v) {
        if (c->role[i] < 0)
            key[-1 - c->role[i]] = v;
        else if ((why = number_into(v, &row[c->role[i]], "value", i, NULL)) != NULL)
            return why;
    }
    for (i = 0; i < n_keys; i++)
        if (append_key(keys, c->key_names[i], key[i]) != 0)
            return batch_reason("out of memory");
    return NULL;
}

static char *parse_object(const struct batch_columns *c, json_t *o, float *row, struct buf *keys)
{
    const struct features *f = c->features;
    json_t *key[BATCH_MAX_KEYS] = {0}, *v;
    size_t n_keys = c->keys ? c->keys->n : 0;
    unsigned char *seen = NULL;
    const char *name;
    char shown_name[96], *why = NULL;
    size_t pos = 0;

    if (!f || f->n == 0)
        return batch_reason("a JSON object, but the model has no feature names: give JSON "
                            "arrays of %lld numbers",
                            (long long)c->width);
    if (!(seen = calloc((size_t)c->width, 1)))
        return batch_reason("out of memory");
    json_object_foreach (o, name, v) {
        int64_t k = key_index(c->keys, name, strlen(name)), col;
        from_file(shown_name, "field", name, ++pos);
        if (k >= 0) {
            key[k] = v;
            continue;
        }
        col = features_find(f, name, strlen(name));
        if (col < 0) {
            why = batch_reason("%s is neither a feature of the model nor a key column",
                               shown_name);
            break;
        }
        if ((why = number_into(v, &row[col], "field", 0, shown_name)) != NULL)
            break;
        seen[col] = 1;
    }
    for (int64_t j = 0; !why && j < c->width; j++)
        if (!seen[j])
            why = batch_reason("missing feature '%.64s'", f->names[j]);
    for (size_t i = 0; !why && i < n_keys; i++) {
        shown(shown_name, c->keys->names[i], strlen(c->keys->names[i]));
        if (!key[i])
            why = batch_reason("missing key column '%s'", shown_name);
        else if (append_key(keys, c->keys->names[i], key[i]) != 0)
            why = batch_reason("out of memory");
    }
    free(seen);
    return why;
}

char *batch_columns_parse_json(const struct batch_columns *c, const char *line, size_t len,
                               float *row, struct buf *keys)
{
    json_error_t jerr;
    json_t *v;
    char *why;

    if ((why = batch_parse_nul(line, len)) != NULL)
        return why;
    v = json_loadb(line, len, JSON_DECODE_ANY | JSON_REJECT_DUPLICATES, &jerr);
    if (!v)
        return batch_reason("malformed JSON at column %d: %s", jerr.column,
                            jdoc_jansson_reason(&jerr));
    if (json_is_array(v))
        why = parse_array(c, v, row, keys);
    else if (json_is_object(v))
        why = parse_object(c, v, row, keys);
    else
        why = batch_reason("expected a JSON array of %lld numbers or an object of features",
                           (long long)c->width);
    json_decref(v);
    return why;
}
