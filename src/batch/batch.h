/*
 * batch.h: batch transform: every record under an input location, through a model in big
 * batches, to one output object per input object, resumable.
 */
#ifndef INFERD_BATCH_H
#define INFERD_BATCH_H

#include "core/err.h"
#include "storage/storage.h"

#include <stdint.h>

enum batch_format { BATCH_FORMAT_AUTO = 0, BATCH_FORMAT_JSONL, BATCH_FORMAT_CSV };

struct batch_config {
    const char *models_dir;
    const char *model;
    const char *input;  /* an object or a prefix; or a table: postgresql://...?table=T */
    const char *input_query; /* with a postgresql:// input: the SELECT to read; NULL or "" */
    const char *output; /* a prefix */
    enum batch_format format;
    int64_t records_per_batch;
    int concurrency; /* batches in flight per object */
    int instances;   /* model instances (threads); 0 means one per CPU */
    int join_input;
    int csv_header;
    const char *key_columns;   /* "id,region": copied to the output, not features (columns.h);
                                * NULL or "": none */
    const char *output_suffix; /* appended to an input's name for its output; NULL: ".out" */
    int64_t max_errors; /* bad records tolerated in the whole job */
    int restart; /* a table output: discard the rows a failed or killed run left */
    int progress_tty;   /* a live progress line instead of log lines */
    int quiet;          /* no progress lines at all (a worker's task) */
    int stale_errors;   /* batch_run_object: an earlier run left errors_uri; it is deleted if
                         * this run has no bad record (batch_run finds out for itself) */
    /* called between chunks; a non-zero return (with `e` filled) stops the object */
    int (*tick)(void *ctx, struct err *e);
    void *tick_ctx;
    int64_t *records_written; /* batch_run_object: when set, the object's records written so
                               * far, updated (on the calling thread) before each tick */
    /* a table input: the range of its rows to read, by their keys' values as text (struct
     * warehouse_spec's after and upto; warehouse_split() makes them); NULL: from the first row,
     * to the last */
    const char *const *after;
    const char *const *upto;
    /* batch_run_object into a table: the server batch run the part belongs to (its id) */
    const char *run_id;
};

/* Summary of a finished (or failed) run. */
struct batch_stats {
    int64_t objects_total, objects_done, objects_skipped;
    int64_t records, errors;
    double seconds;
};

/* Runs the job. Returns 0, or an error whose message names the object and line. */
int batch_run(const struct batch_config *cfg, struct batch_stats *stats, struct err *e);

/* What one object gave. */
struct batch_object_result {
    int64_t records, errors;
    char sha256[65];               /* of the output written */
    struct storage_identity input; /* the input's, taken before it was read */
};

struct json_t;
/* The "input" member of a manifest entry for `id`: {"size": N, "mtime_ns": N} for a file,
 * {"size": N, "etag": "..."} for S3. A new JSON object (json_decref), NULL without memory. */
struct json_t *batch_input_json(const struct storage_identity *id);

struct model;
/*
 * Runs one input object through `m` (acquired by the caller): `in_uri` to `out_uri`, bad
 * records (up to cfg->max_errors) to `errors_uri`; res->input is the input's identity.
 * Workers run batch tasks with it; only cfg's format, records_per_batch, concurrency,
 * instances, join_input, csv_header, key_columns, max_errors, quiet, stale_errors and tick are
 * used. A warehouse `in_uri` (postgresql://) is read as `inferd batch` reads a table, with
 * cfg's input_query, key_columns, after and upto; res->input is then empty.
 *   name  the object's name relative to the job's input, for messages and the format
 */
int batch_run_object(const struct batch_config *cfg, struct model *m, const char *in_uri,
                     const char *name, const char *out_uri, const char *errors_uri,
                     struct batch_object_result *res, struct err *e);

/* 1 when `m` can run a batch transform: rows of numbers (one input [-1, width]) or JSON
 * documents (json_io). */
int batch_model_ok(const struct model *m);

/* Checks an output suffix (--output-suffix, "output_suffix"): at most 32 bytes, no '/' and
 * no control character; "" is allowed. */
int batch_check_suffix(const char *suffix, struct err *e);
/* Checks that outputs named with `suffix` can never be read back as inputs or replace one:
 * any suffix but ".out" needs an output location outside the input's. */
int batch_check_locations(const char *input, const char *output, const char *suffix, struct err *e);
/* Checks --key-columns / "key_columns" (columns.h's rules); "" and NULL are fine. */
int batch_check_keys(const char *spec, struct err *e);

/* 1 for the names a batch job writes itself (outputs, errors, manifest, markers): never
 * inputs. */
int batch_is_reserved(const char *name);
/* What is under `output` now, sorted (none for an output not written yet): where an earlier
 * run may have left `<name>.errors`. New array: storage_names_free(). */
int batch_list_output(const char *output, char ***names, size_t *n, struct err *e);
/* 1 if the sorted `names` hold `name`. */
int batch_has_name(char *const *names, size_t n, const char *name);
/* Deletes the temporary objects killed runs left under `output`. */
int batch_remove_leftovers(const char *output, struct err *e);
/* The format of object `name`: cfg->format, else from its extension. */
int batch_format_of(const struct batch_config *cfg, const char *name, int *csv, struct err *e);

#endif
