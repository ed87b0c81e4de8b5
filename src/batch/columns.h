/*
 * columns.h: which columns of a batch record are the model's features and which are key
 * columns (--key-columns: ids copied to the output unchanged, never given to the model).
 *
 * One place for that decision, whatever the source: a CSV header (by name), a header-less
 * CSV line or a JSON array (by 0-based position), a JSON object (by field name), and any
 * other source of named columns (a warehouse table) through batch_columns_named(). Names are
 * matched to the model's feature names (kserve/features.h), so a file whose columns are in
 * another order than the training frame's still gets each value into its feature.
 *
 * Reasons for bad records follow batch_parse.c: they name the line, column or field and the
 * problem, and quote no value. A column or field name read from the file is quoted only when
 * it looks like one (at most 64 bytes of letters, digits, '_', '-', '.' and spaces), else it
 * is named by its position: a text file given as a CSV with a header is not copied into an
 * error. Names the user or the model gave (key columns, features) are always quoted.
 */
#ifndef INFERD_BATCH_COLUMNS_H
#define INFERD_BATCH_COLUMNS_H

#include "core/buf.h"
#include "core/err.h"
#include "kserve/features.h"

#include <stddef.h>
#include <stdint.h>

#define BATCH_MAX_KEYS 64

/* --key-columns as given: names, or 0-based positions for records without names. */
struct batch_keys {
    char **names; /* n strings; NULL when there are none */
    size_t n;
};

/* Parses "id,region" (no empty, repeated or over-long name; at most BATCH_MAX_KEYS). NULL or
 * "" gives no keys. ERR_INVALID names the problem. */
int batch_keys_parse(const char *spec, struct batch_keys *k, struct err *e);
void batch_keys_release(struct batch_keys *k);

/* How the columns of one object's records map. */
struct batch_columns {
    const struct batch_keys *keys;   /* borrowed */
    const struct features *features; /* borrowed; n 0: the model has no feature names */
    int64_t width;                   /* the model's features */
    size_t n_columns;                /* a positional record's columns; 0: none bound */
    int64_t *role;                   /* per column: the feature (>= 0), or -1 - key index */
    char **key_names;                /* per key: its name in outputs (a header's name, the
                                      * field's, or "column_N" for position N) */
    int identity;                    /* columns are the features in order, no keys: the plain
                                      * parsers apply */
    int by_position;                 /* named layout of a model without feature names: the
                                      * non-key columns were taken in order */
};

/* No layout bound yet: only JSON objects map (by field name). */
void batch_columns_init(struct batch_columns *c, const struct batch_keys *k,
                        const struct features *f, int64_t width);
void batch_columns_release(struct batch_columns *c);

/*
 * Binds a positional layout (header-less CSV, JSON arrays): the keys must be positions, the
 * other columns are the features in order. ERR_INVALID names the key that is no position.
 */
int batch_columns_positional(struct batch_columns *c, struct err *e);

/*
 * Binds named columns (`names`: a CSV header's, a table's; borrowed for the call): each key
 * must be one of them; every other column is a feature by name (by position, setting
 * by_position, when the model has no names). ERR_INVALID names a missing key or feature, a
 * column that is neither, or a repeated one.
 */
int batch_columns_named(struct batch_columns *c, char *const *names, size_t n, struct err *e);

/* Splits a CSV header line into names (blanks, double quotes and a UTF-8 BOM removed).
 * New array: free each and the array. */
int batch_columns_split_header(const char *line, size_t len, char ***names, size_t *n,
                               struct err *e);

/*
 * Parses one CSV record with the bound layout into `row` (width floats) and appends its key
 * fields, as they are and each followed by ',', to `keys`. NULL, or a reason (a new string).
 */
char *batch_columns_parse_csv(const struct batch_columns *c, const char *line, size_t len,
                              float *row, struct buf *keys);

/*
 * Parses one JSON Lines record: an array (the positional layout, which must be bound) or an
 * object (by field name). Appends its keys as `"name":value,` to `keys`. NULL, or a reason.
 */
char *batch_columns_parse_json(const struct batch_columns *c, const char *line, size_t len,
                               float *row, struct buf *keys);

#endif
