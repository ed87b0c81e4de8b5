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
    /* A range of the rows by their keys, each bound the n key values as text (NULL: open):
     * the rows after `after` (a resume point; a part's start) up to and including `upto`. */
    const char *const *after;
    const char *const *upto;
};

/* 1 when `uri` names a warehouse location (postgresql:// or postgres://). */
int warehouse_supports(const char *uri);

/*
 * Connects and checks the source against the model. ERR_INVALID names what is wrong (no such
 * table, a key column missing, a column's type, a failing query: the server's message),
 * ERR_IO an unreachable server; no message holds a password.
 *   out  new; warehouse_close() it
 */
int warehouse_open(const struct warehouse_spec *spec, struct warehouse_source **out, struct err *e);
/*
 * Before the first row is read: only the rows after `after` (the key values as text) are,
 * as if spec.after had said so. A resumed run learns its resume point after the open.
 */
int warehouse_continue_after(struct warehouse_source *s, const char *const *after, struct err *e);
/*
 * The next row (the first call starts reading): its features appended to `features` (one CSV line, no end of line) and its
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
/* key column i's type in the warehouse's own words ("integer", "character varying(20)"): a
 * sink of the same warehouse creates its key columns with it */
const char *warehouse_key_type(const struct warehouse_source *s, size_t i);

/*
 * ---- a source split into key ranges (server batch jobs: one task per range) ----
 *
 * Server batch jobs share one table among several workers: the source is cut, by its keys,
 * into parts of about `rows_per_part` rows, and each part is read with its own after/upto
 * (warehouse_spec). The parts together hold every row once, whatever the rows are when each
 * part is read: the first part has no lower bound, the last no upper one.
 *
 * What a next warehouse implements (struct warehouse_split_ops): one statement over the
 * source's keys, in key order, that returns the key values of every rows_per_part-th row
 * (not the last row) as text, which its source's after/upto take back.
 */
struct warehouse_split {
    char *name;     /* warehouse_name() of the source: "SCHEMA.TABLE" or "query" */
    size_t n_keys;  /* the key columns (the primary key's when none were named) */
    size_t n_parts; /* >= 1 */
    /* (n_parts - 1) x n_keys key values as text, row after row: part i reads the rows after
     * bound i-1 (part 0: from the first) up to and including bound i (the last: to the end) */
    char **bounds;
};

/*
 * Opens the source as warehouse_open() does (the same checks, so the same errors), then
 * computes its split points. ERR_INVALID names what is wrong, as warehouse_open's do; a key
 * column holding NULL (no range would hold the row) is an error naming the column.
 *   out  filled; warehouse_split_release() it (also after a failure)
 */
int warehouse_split(const struct warehouse_spec *spec, int64_t rows_per_part,
                    struct warehouse_split *out, struct err *e);
void warehouse_split_release(struct warehouse_split *s);
/* Part i's bounds for warehouse_spec's after and upto: borrowed from `s`; NULL: open. */
const char *const *warehouse_split_after(const struct warehouse_split *s, size_t i);
const char *const *warehouse_split_upto(const struct warehouse_split *s, size_t i);

/*
 * ---- a warehouse table as the batch runner's output (a sink) ----
 *
 * All or nothing for readers: rows are written into a staging table of the sink's own, a
 * chunk at a time, and warehouse_sink_commit() merges them into the target in one transaction
 * (an upsert by the keys: scoring a key again replaces its score) and drops the staging table.
 * Bad rows go with the same commit to the target's errors table (keys and reason), replacing
 * the reason for a key refused again and removing a key scored this time.
 *
 * Resumable for the writer: each chunk is committed together with its resume point (the keys
 * of its last row, rows are written in key order) and the run's counts, in a run record
 * (PostgreSQL: the row of SCHEMA.inferd_batch_runs). A run that fails or is killed leaves the
 * target as it was and its rows in the staging table; the next open for the same job (same
 * source, query, keys, model and model version) continues after the resume point, and any
 * other job, or spec.restart, discards them. Rows are read in key order, so the rows after the
 * resume point are exactly the ones not written.
 *
 * What a next warehouse implements (struct warehouse_sink_ops): open (connect, check or plan
 * the target and its errors table against the keys' types and the prediction's width, one
 * writer at a time, find a run left behind and continue it or discard it, record the run),
 * write a chunk of rows (CSV lines, see warehouse_sink_put) with its resume point and counts
 * in one transaction, commit (merge, and record the run's end), close (a close without
 * commit records the failure and keeps the rows written for the next run).
 */
struct warehouse_sink;

struct warehouse_sink_spec {
    const char *uri; /* postgresql://USER[:PW]@HOST:PORT/DB?table=[SCHEMA.]TABLE */
    size_t n_keys;
    const char *const *key_names;
    const char *const *key_types; /* warehouse_key_type() of the source */
    size_t per_row;               /* values per prediction: 1 a number, more an array */
    const char *model_version;
    /* what the job is, recorded with the run: a run left behind continues only for the same */
    const char *source; /* the input, its password masked */
    const char *query;  /* NULL or "" */
    const char *model;
    int restart; /* discard the rows a failed or killed run left, even for the same job */
    /*
     * A server batch run, whose tasks run in several processes: its id. Each task's sink
     * writes one part (the key range after..upto, as warehouse_spec's; a part retried
     * replaces what its earlier attempt wrote) into the run's staging table, without a lock,
     * a resume point or a merge; warehouse_sink_finish() merges them all once every part is
     * in. NULL: the whole run is this sink's.
     */
    const char *run;
    const char *const *after;
    const char *const *upto;
    int64_t started_ms; /* warehouse_sink_finish: when the run started (0: unknown) */
};

/*
 * Connects and checks or plans the target. ERR_INVALID names what is wrong (a missing column,
 * a column of another type, no unique constraint on the keys, another run writing to it),
 * ERR_IO an unreachable server; no message holds a password.
 *   out  new; warehouse_sink_close() it
 */
int warehouse_sink_open(const struct warehouse_sink_spec *spec, struct warehouse_sink **out,
                        struct err *e);
/* Adds one scored row to the chunk: `keys` as the source rendered them for CSV (each field
 * followed by ','), `n` values (NaN: none). n must be the spec's per_row. */
int warehouse_sink_put(struct warehouse_sink *k, const char *keys, size_t keys_len, const float *y,
                       size_t n, struct err *e);
/* Adds one bad row to the chunk: its keys, and why (one line, no feature value). */
int warehouse_sink_put_bad(struct warehouse_sink *k, const char *keys, size_t keys_len,
                           const char *reason, struct err *e);
/* The end of a chunk: what was put is sent into the staging table, with its resume point,
 * once it is a mebibyte or a second has passed since the last send (the first call sends). */
int warehouse_sink_write(struct warehouse_sink *k, struct err *e);
/* Sends what is left, then merges it into the target in one transaction. */
int warehouse_sink_commit(struct warehouse_sink *k, struct err *e);
/*
 * The end of a server batch run (spec.run): the rows every part wrote merged into the target
 * in one transaction, as warehouse_sink_commit() does, and the run recorded (PostgreSQL: its
 * inferd_batch_runs row, with batch_job = spec.run). Only uri, run, source, query, model,
 * model_version and started_ms are used: the keys and the prediction's width are the staging
 * table's. Run again after it succeeded, it finds the run recorded and does nothing.
 */
int warehouse_sink_finish(const struct warehouse_sink_spec *spec, struct err *e);
/* Records why the run failed (one line, no secret), before the close. */
void warehouse_sink_fail(struct warehouse_sink *k, const char *why);
/* Without a commit: the rows written stay for the next run of the same job. */
void warehouse_sink_close(struct warehouse_sink *k);
/*
 * 1 when the open continues a run left behind: `after` (borrowed until the close) holds the
 * text values of the keys of the last row it wrote, and records/errors its counts so far.
 */
int warehouse_sink_resumed(const struct warehouse_sink *k, const char *const **after,
                           int64_t *records, int64_t *errors);
/* Rows in the staging table (written by this run and the ones it continues). */
int64_t warehouse_sink_kept(const struct warehouse_sink *k);
/* "SCHEMA.TABLE", and the URI with any password masked: borrowed until the close */
const char *warehouse_sink_name(const struct warehouse_sink *k);
const char *warehouse_sink_shown(const struct warehouse_sink *k);

#endif
