/*
 * copy_text.c: a row of PostgreSQL's COPY text format into the batch runner's two pieces of
 * text (warehouse_internal.h). Untrusted input as far as this code knows: every row is read
 * within its length, a malformed one is a reason, never a crash (fuzz/fuzz_copy_row.c).
 *
 * The text format is chosen over CSV because it splits without quotes: a tab inside a value is
 * written \t, so every tab ends a column, and values are unescaped only when a backslash
 * shows one is there (numbers never have one).
 */
#define _GNU_SOURCE
#include "warehouse/warehouse_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

char warehouse_row_nomem[] = "out of memory";

/* Why a row does not fit the layout: a new string; `got` 0 means more columns than expected. */
static char *width_reason(size_t want, size_t got)
{
    char *s = NULL;
    int n = got ? asprintf(&s, "expected %zu columns, got %zu", want, got)
                : asprintf(&s, "expected %zu columns, got more", want);

    return n < 0 ? warehouse_row_nomem : s;
}

static int is_null(const char *p, size_t n)
{
    return n == 2 && p[0] == '\\' && p[1] == 'N';
}

static int hex_digit(char c)
{
    return c >= '0' && c <= '9'   ? c - '0'
           : c >= 'a' && c <= 'f' ? c - 'a' + 10
           : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                  : -1;
}

/* The value of a column, its backslash escapes undone, into `out` (reset first). */
static int unescape(const char *p, size_t n, struct buf *out)
{
    const char *end = p + n;

    out->len = 0;
    if (buf_reserve(out, n + 1) != 0)
        return -1;
    while (p < end) {
        char c = *p++;
        if (c == '\\' && p < end) {
            char d = *p++;
            switch (d) {
            case 'b':
                c = '\b';
                break;
            case 'f':
                c = '\f';
                break;
            case 'n':
                c = '\n';
                break;
            case 'r':
                c = '\r';
                break;
            case 't':
                c = '\t';
                break;
            case 'v':
                c = '\v';
                break;
            case 'x':
                if (p < end && hex_digit(*p) >= 0) {
                    int v = hex_digit(*p++);
                    if (p < end && hex_digit(*p) >= 0)
                        v = v * 16 + hex_digit(*p++);
                    c = (char)v;
                } else {
                    c = 'x';
                }
                break;
            default:
                if (d >= '0' && d <= '7') {
                    int v = d - '0';
                    for (int k = 0; k < 2 && p < end && *p >= '0' && *p <= '7'; k++)
                        v = v * 8 + (*p++ - '0');
                    c = (char)v;
                } else {
                    c = d;
                }
            }
        }
        out->data[out->len++] = c;
    }
    out->data[out->len] = '\0';
    return 0;
}

/* A key's value as a CSV field: quoted when it holds a comma, a quote or a line break. */
static int csv_field(struct buf *keys, const char *v, size_t n)
{
    int rc = 0;

    /* an empty string is quoted: an empty field is NULL (to a table sink's COPY too) */
    if (n > 0 && strcspn(v, ",\"\r\n") >= n && memchr(v, '\0', n) == NULL)
        return buf_append(keys, v, n);
    rc = buf_puts(keys, "\"");
    for (size_t i = 0; rc == 0 && i < n; i++)
        rc = v[i] == '"' ? buf_puts(keys, "\"\"") : buf_append(keys, &v[i], 1);
    return rc ? rc : buf_puts(keys, "\"");
}

/* 1 when `v` is a plain number JSON takes as it is: -?digits[.digits][e[+-]digits] */
static int json_number_text(const char *v, size_t n)
{
    size_t i = 0, d;

    if (i < n && v[i] == '-')
        i++;
    for (d = i; i < n && v[i] >= '0' && v[i] <= '9'; i++)
        ;
    if (i == d || (v[d] == '0' && i - d > 1))
        return 0;
    if (i < n && v[i] == '.') {
        for (d = ++i; i < n && v[i] >= '0' && v[i] <= '9'; i++)
            ;
        if (i == d)
            return 0;
    }
    if (i < n && (v[i] == 'e' || v[i] == 'E')) {
        i++;
        if (i < n && (v[i] == '+' || v[i] == '-'))
            i++;
        for (d = i; i < n && v[i] >= '0' && v[i] <= '9'; i++)
            ;
        if (i == d)
            return 0;
    }
    return i == n;
}

static int put_key(const struct warehouse_row_layout *l, size_t k, const char *p, size_t n,
                   struct buf *tmp, struct buf *keys)
{
    int null = is_null(p, n), rc = 0;

    if (!null && unescape(p, n, tmp) != 0)
        return -1;
    if (l->keys_json) {
        rc = buf_json_string(keys, l->key_names[k]);
        if (rc == 0)
            rc = buf_puts(keys, ":");
        if (rc == 0 && null)
            rc = buf_puts(keys, "null");
        else if (rc == 0 && l->key_is_number[k] && json_number_text(tmp->data, tmp->len))
            rc = buf_append(keys, tmp->data, tmp->len);
        else if (rc == 0)
            rc = buf_json_stringn(keys, tmp->data, tmp->len);
    } else if (!null) {
        rc = csv_field(keys, tmp->data, tmp->len);
    }
    return rc ? rc : buf_puts(keys, ",");
}

/* A feature column: a number as it is, NULL as an empty field, an array as its values. */
static int put_feature(const char *p, size_t n, struct buf *features)
{
    const char *end = p + n;

    if (is_null(p, n))
        return 0;
    if (n == 0 || *p != '{')
        return buf_append(features, p, n);
    /* {1.5,NULL,{2,3}}: the values in order, NULL an empty field, braces dropped */
    while (p < end) {
        const char *q = p;
        while (q < end && *q != ',' && *q != '{' && *q != '}')
            q++;
        if (q - p == 4 && memcmp(p, "NULL", 4) == 0)
            p = q; /* an empty field */
        if (buf_append(features, p, (size_t)(q - p)) != 0)
            return -1;
        if (q < end && *q == ',' && buf_puts(features, ",") != 0)
            return -1;
        p = q < end ? q + 1 : q;
    }
    return 0;
}

char *warehouse_copy_row(const struct warehouse_row_layout *l, const char *row, size_t len,
                         struct buf *features, struct buf *keys)
{
    const char *p = row, *end = row + len;
    struct buf tmp = {0};
    size_t col = 0, features_start = features->len, keys_start = keys->len;
    char *why = NULL;

    for (;;) {
        const char *q = memchr(p, '\t', (size_t)(end - p)), *fend = q ? q : end;
        int rc = 0;
        if (col == l->n_columns) {
            why = width_reason(l->n_columns, 0);
            break;
        }
        if (col < l->n_keys) {
            rc = put_key(l, col, p, (size_t)(fend - p), &tmp, keys);
        } else {
            if (col > l->n_keys)
                rc = buf_puts(features, ",");
            if (rc == 0)
                rc = put_feature(p, (size_t)(fend - p), features);
        }
        if (rc != 0) {
            why = warehouse_row_nomem;
            break;
        }
        col++;
        if (!q)
            break;
        p = q + 1;
    }
    if (!why && col < l->n_columns)
        why = width_reason(l->n_columns, col);
    if (why) {
        features->len = features_start;
        keys->len = keys_start;
    }
    buf_release(&tmp);
    return why;
}

/* A resume point: keys as csv_field() rendered them, each then ',', back into values. */
int warehouse_csv_keys(const char *keys, size_t len, char ***out, size_t *n)
{
    const char *p = keys, *end = keys + len;
    struct buf v = {0};
    char **a = NULL;
    size_t cap = 0;
    int rc = 0;

    *out = NULL;
    *n = 0;
    while (rc == 0 && p < end) {
        v.len = 0;
        if (*p == '"') {
            for (p++;; p++) {
                if (p >= end) {
                    rc = -1;
                    break;
                }
                if (*p == '"' && p + 1 < end && p[1] == '"')
                    p++;
                else if (*p == '"')
                    break;
                if (buf_append(&v, p, 1) != 0)
                    rc = -1;
            }
            if (rc == 0)
                p++; /* the closing quote */
        } else {
            const char *comma = memchr(p, ',', (size_t)(end - p));
            if (!comma || comma == p)
                rc = -1; /* unterminated, or empty: NULL */
            else if (buf_append(&v, p, (size_t)(comma - p)) != 0)
                rc = -1;
            else
                p = comma;
        }
        if (rc == 0 && (p >= end || *p != ','))
            rc = -1;
        p++;
        if (rc == 0 && *n == cap) {
            char **bigger = realloc(a, (cap = cap ? 2 * cap : 4) * sizeof(*a));
            if (!bigger)
                rc = -1;
            else
                a = bigger;
        }
        if (rc == 0 && !(a[(*n)++] = strndup(v.data ? v.data : "", v.len)))
            rc = -1, (*n)--;
    }
    buf_release(&v);
    if (rc != 0 || *n == 0) {
        for (size_t i = 0; i < *n; i++)
            free(a[i]);
        free(a);
        *n = 0;
        return -1;
    }
    *out = a;
    return 0;
}
