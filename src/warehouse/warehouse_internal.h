/*
 * warehouse_internal.h: what the warehouse implementations share; included by src/warehouse/,
 * its unit test and fuzz target only.
 */
#ifndef INFERD_WAREHOUSE_INTERNAL_H
#define INFERD_WAREHOUSE_INTERNAL_H

#include "warehouse/warehouse.h"

struct warehouse_source {
    const struct warehouse_ops *ops;
    void *impl;       /* the implementation's */
    char *name;       /* warehouse_name() */
    char *shown;      /* warehouse_shown() */
    char **key_names; /* n_keys */
    size_t n_keys;
    struct buf features; /* warehouse_feature_header() */
};

struct warehouse_ops {
    /* 1 if the URI is this warehouse's */
    int (*supports)(const char *uri);
    /* Fills s->impl, name, key_names, n_keys and features (s->shown is set); see
     * warehouse_open(). */
    int (*open)(struct warehouse_source *s, const struct warehouse_spec *spec, struct err *e);
    int (*read_row)(struct warehouse_source *s, struct buf *features, struct buf *keys,
                    struct err *e);
    /* frees s->impl */
    void (*close)(struct warehouse_source *s);
};

extern const struct warehouse_ops warehouse_postgres_ops;

/* ---- rows as text (copy_text.c) ---- */

/* How a row of text values maps: the first n_keys columns are keys, the rest features. */
struct warehouse_row_layout {
    size_t n_columns;
    size_t n_keys;
    char *const *key_names;             /* n_keys */
    const unsigned char *key_is_number; /* n_keys: written bare, not as a string */
    int keys_json;                      /* `"name":value,`; else CSV fields each then ',' */
};

/*
 * One row of PostgreSQL's COPY text format (`len` bytes without the end of line: columns
 * split by tabs, \N for NULL, backslash escapes) into its features, appended to `features` as
 * one CSV line (NULL: an empty field; an array {1,2,NULL} spread into 1,2,), and its keys,
 * appended to `keys` as the layout says (NULL: null, or an empty field). Returns NULL, or a
 * reason (a new string) that quotes nothing of the row.
 */
char *warehouse_copy_row(const struct warehouse_row_layout *l, const char *row, size_t len,
                         struct buf *features, struct buf *keys);

#endif
