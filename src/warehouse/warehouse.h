/*
 * warehouse.h: a warehouse table or query as a batch record source (PostgreSQL today).
 *
 * The batch runner reads a table as one input object whose records are its rows, in key
 * order. Each row comes as two pieces of text: its features as one CSV line of numbers (a
 * missing value is an empty field; an array column spread into its values), which the batch
 * parsers read on their threads, and its key columns already written for the output (JSON
 * Lines `"name":value,` or CSV fields each followed by ','). So parsing, batching, bad
 * records, outputs, S3 and progress are the runner's own, unchanged.
 *
 * What a next warehouse (BigQuery, Snowflake, ClickHouse) implements: one struct
 * warehouse_ops in its own file, listed in warehouse.c, that
 *   - opens a source from its URI (credentials from the URI or the client's usual environment;
 *     never shown: warehouse_shown() masks them), checks at start what can be checked (the
 *     table, the key columns, each column's type, the columns against the model's features)
 *     and fails with an error naming what is wrong;
 *   - streams the rows ordered by the keys, never holding the whole result in memory;
 *   - renders each row as above (warehouse_row_* helpers in warehouse_internal.h do the
 *     rendering of keys and features for text values).
 * Every call is for one thread at a time.
 */
#ifndef INFERD_WAREHOUSE_H
#define INFERD_WAREHOUSE_H

#include "core/buf.h"
#include "core/err.h"

#include <stddef.h>
#include <stdint.h>

struct warehouse_source;

struct warehouse_spec {
    const char *uri;         /* postgresql://USER[:PW]@HOST:PORT/DB[?table=[SCHEMA.]TABLE] */
    const char *query;       /* NULL or "": read the URI's table; else this SELECT */
    const char *key_columns; /* "a,b" (core of --key-columns); NULL or "": the primary key */
    const char *const *feature_names; /* the model's, in its order; n_features 0: it has none, and
                                       * the non-key columns are its features in select order */
    size_t n_features;
    int64_t width; /* the model's features */
    int keys_json; /* keys written as `"name":value,` (JSON Lines), else as CSV fields */
};

/* 1 when `uri` names a warehouse location (postgresql:// or postgres://). */
int warehouse_supports(const char *uri);

/*
 * Connects, checks the source against the model and starts reading. ERR_INVALID names what is
 * wrong (no such table, a key column missing, a column's type, a failing query: the server's
 * message), ERR_IO an unreachable server; no message holds a password.
 *   out  new; warehouse_close() it
 */
int warehouse_open(const struct warehouse_spec *spec, struct warehouse_source **out, struct err *e);
/*
 * The next row: its features appended to `features` (one CSV line, no end of line) and its
 * keys to `keys`. Returns 1 for a row, 0 at the end, or a negative error (the server's,
 * masked).
 */
int warehouse_read_row(struct warehouse_source *s, struct buf *features, struct buf *keys,
                       struct err *e);
void warehouse_close(struct warehouse_source *s);

/* Borrowed until warehouse_close(): */
/* "SCHEMA.TABLE" for a table, "query" for a query: the output object's name */
const char *warehouse_name(const struct warehouse_source *s);
/* the URI with any password masked, for messages */
const char *warehouse_shown(const struct warehouse_source *s);
/* the key columns, in order (the primary key's when none were named) */
size_t warehouse_n_keys(const struct warehouse_source *s);
const char *warehouse_key_name(const struct warehouse_source *s, size_t i);
/* the feature columns as the CSV line holds them: "f1,f2", or the array column's name */
const char *warehouse_feature_header(const struct warehouse_source *s);

#endif
