/*
 * batch.h: batch transform: every record under an input location, through a model in big
 * batches, to one output object per input object, resumable.
 */
#ifndef INFERD_BATCH_H
#define INFERD_BATCH_H

#include "core/err.h"

#include <stdint.h>

enum batch_format { BATCH_FORMAT_AUTO = 0, BATCH_FORMAT_JSONL, BATCH_FORMAT_CSV };

struct batch_config {
    const char *models_dir;
    const char *model;
    const char *input;  /* an object or a prefix */
    const char *output; /* a prefix */
    enum batch_format format;
    int64_t records_per_batch;
    int concurrency; /* batches in flight per object */
    int instances;   /* model instances (threads); 0 means one per CPU */
    int join_input;
    int csv_header;
    int64_t max_errors; /* bad records tolerated in the whole job */
    int progress_tty;   /* a live progress line instead of log lines */
};

/* Summary of a finished (or failed) run. */
struct batch_stats {
    int64_t objects_total, objects_done, objects_skipped;
    int64_t records, errors;
    double seconds;
};

/* Runs the job. Returns 0, or an error whose message names the object and line. */
int batch_run(const struct batch_config *cfg, struct batch_stats *stats, struct err *e);

#endif
