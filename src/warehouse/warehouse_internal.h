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
    char **key_types; /* n_keys: warehouse_key_type() */
    size_t n_keys;
    struct buf features; /* warehouse_feature_header() */
};

struct warehouse_ops {
    /* 1 if the URI is this warehouse's */
    int (*supports)(const char *uri);
    /* Fills s->impl, name, key_names, n_keys and features (s->shown is set); see
     * warehouse_open(). */
    int (*open)(struct warehouse_source *s, const struct warehouse_spec *spec, struct err *e);
    /* see warehouse_continue_after() */
    int (*continue_after)(struct warehouse_source *s, const char *const *after, struct err *e);
    int (*read_row)(struct warehouse_source *s, struct buf *features, struct buf *keys,
                    struct err *e);
    /* frees s->impl */
    void (*close)(struct warehouse_source *s);
};

extern const struct warehouse_ops warehouse_postgres_ops;

/*
 * A sink's chunk (`rows`) is CSV lines: the key columns, the prediction (a number, an empty
 * field for none, or "{v1,v2,...}" for several values, NULL for a missing one) and the reason
 * (empty for a scored row, quoted text for a bad one). Filled by warehouse.c.
 */
struct warehouse_sink {
    const struct warehouse_sink_ops *ops;
    void *impl;
    char *name;  /* warehouse_sink_name() */
    char *shown; /* warehouse_sink_shown() */
    size_t per_row;
    struct buf rows; /* the chunk not yet written */
    size_t n_rows;   /* its lines */
    size_t n_bad;    /* of which bad rows */
    int64_t last_send_ns; /* clock_mono_ns() of the last send (0: none yet) */
    struct buf last_keys; /* the chunk's last row's keys as put: its resume point */
    /* the run's rows written so far, bad ones included (with the run continued, if any) */
    int64_t records, errors;
    /* filled by open when it continues a run: the resume point's key values */
    char **after;
    size_t n_after;
    int resumed;
    char *failure; /* warehouse_sink_fail() */
};

struct warehouse_sink_ops {
    int (*supports)(const char *uri);
    /* Fills k->impl and k->name (k->shown and per_row are set); see warehouse_sink_open(). */
    int (*open)(struct warehouse_sink *k, const struct warehouse_sink_spec *spec, struct err *e);
    /* writes k->rows (n_rows lines, not empty) with, in the same transaction, the resume
     * point k->last_keys and the counts k->records and k->errors (already counting them) */
    int (*write)(struct warehouse_sink *k, struct err *e);
    int (*commit)(struct warehouse_sink *k, struct err *e);
    /* see warehouse_sink_finish(): fills k->impl and k->name, merges, records the run */
    int (*finish)(struct warehouse_sink *k, const struct warehouse_sink_spec *spec, struct err *e);
    /* frees k->impl; without a commit, discards the staging table where it can */
    void (*close)(struct warehouse_sink *k);
};

extern const struct warehouse_sink_ops warehouse_postgres_sink_ops;

/* How a warehouse splits its sources (warehouse_split()), beside its source and sink. */
struct warehouse_split_ops {
    int (*supports)(const char *uri);
    /* Fills out->bounds and n_parts for the source `s` opened from `spec` (its name, keys and
     * types are set; its reading has been stopped: s->impl is gone). */
    int (*split)(const struct warehouse_source *s, const struct warehouse_spec *spec,
                 int64_t rows_per_part, struct warehouse_split *out, struct err *e);
};

extern const struct warehouse_split_ops warehouse_postgres_split_ops;

/* Appends a split point (n_keys values) to `s`, unless it equals the last one (many rows with
 * one key: the part between them would be empty). 0 or ERR_NOMEM. */
int warehouse_split_add(struct warehouse_split *s, const char *const *values);

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
 * reason (a new string) that quotes nothing of the row, or warehouse_row_nomem (not to be
 * freed) when memory ran out.
 */
extern char warehouse_row_nomem[];
/*
 * Splits keys rendered as CSV fields, each followed by ',' (warehouse_sink_put's `keys`), into
 * their text values: a new array of n new strings (free each, then it). -1 for a field that
 * is not well formed or NULL (an empty unquoted field), or without memory.
 */
int warehouse_csv_keys(const char *keys, size_t len, char ***out, size_t *n);

char *warehouse_copy_row(const struct warehouse_row_layout *l, const char *row, size_t len,
                         struct buf *features, struct buf *keys);

#endif
