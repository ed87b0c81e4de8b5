/*
 * batch.c: the batch transform runner behind `inferd batch`.
 *
 * For each input object, records are read and parsed in chunks of records_per_batch; up to
 * `concurrency` chunks are in the model's batcher at once while the next one is parsed, so
 * parsing and writing overlap the model instead of adding to it. Results are written in input
 * order, one line per record (an empty line for a tolerated bad record), to a temporary object
 * that becomes `<name>.out` only when complete. After each object the manifest is rewritten
 * (atomically) with its record count, output checksum and the input's identity (size and
 * modification time, or S3's ETag, taken before reading it); a re-run skips an object only
 * when its input still has that identity and its output still has that checksum, and
 * `_SUCCESS` marks the end. An entry without an input identity (an older inferd wrote it)
 * counts as changed: the object is run again once.
 *
 * Records are read with their length: a NUL byte inside one makes it a bad record (no text
 * format has one) instead of ending it. Bad records' reasons quote nothing of them.
 *
 * A model that takes JSON documents (json_io: an upstream LLM or JSON service behind the http
 * backend) gets each JSON Lines record as its own request: any JSON value, answered by one
 * JSON value per output line. Records the model refuses (a 4xx) are bad records like
 * unparsable ones; other failures fail the object, to be run again.
 *
 * A warehouse table or query (warehouse.h) is one input object named after it: its rows are
 * read in key order, each as a CSV line of its features (parsed here as any CSV record) and
 * its keys already written for the output, which --format picks (JSON Lines by default). A bad
 * row is named by its keys, not by a line number. It is run again whole on every run: a table
 * has no version to compare with the manifest's.
 */
#define _GNU_SOURCE
#include "batch/batch.h"
#include "batch/batch_internal.h"
#include "batch/columns.h"
#include "core/buf.h"
#include "core/clock.h"
#include "core/log.h"
#include "core/url.h"
#include "kserve/codec.h"
#include "model/registry.h"
#include "storage/storage.h"
#include "warehouse/warehouse.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* ---- one chunk of records ---- */

#define MANIFEST_MAX_BYTES ((int64_t)256 << 20) /* read whole; ~200 bytes per object */
#define DOC_ATTEMPTS 3    /* a document record that fails for a passing reason: tries in all */
#define DOC_RETRY_MS 1000 /* its first backoff; doubles per attempt */

struct chunk {
    struct runner *run;
    size_t n; /* records, good and bad */
    size_t n_good;
    int64_t *line_no; /* per record */
    size_t *off;      /* per record: where its text starts in `raw` (NUL-terminated) */
    size_t *len;      /* per record: its length (a NUL byte inside makes it a bad record) */
    struct buf raw;   /* the records' text, as read */
    struct buf keys;  /* the records' key columns, ready to write (columns.h) */
    size_t *key_off;  /* per record: where its keys start in `keys` */
    size_t *key_len;  /* per record: their length (0 for a bad record or no keys) */
    char **bad;       /* per record: why it is bad, or NULL */
    float *data;      /* n_good x width; owned by `req` once submitted */
    struct infer_request *req;
    struct batch_item item;
    /* document models: one request per record (NULL for a bad one) */
    struct infer_request **docs;
    struct batch_item *doc_items;
    unsigned char *tries;  /* per record: attempts that failed for a passing reason */
    unsigned char *retry;  /* per record: to be sent again (guarded by run->lock) */
    size_t n_retry;        /* guarded by run->lock */
    int64_t retry_after_ms; /* guarded by run->lock: the longest an upstream asked for */
    size_t pending; /* guarded by run->lock: document requests not yet done */
    int in_flight;            /* guarded by run->lock: being parsed or in the model */
    struct chunk *next_parse; /* guarded by run->lock: the parse queue */
    int rc;
    struct err err;
};

struct runner {
    const struct batch_config *cfg;
    int csv;                  /* the current object's format */
    struct chunk *parse_head; /* guarded by lock */
    struct chunk *parse_tail; /* guarded by lock */
    int parse_stopping;       /* guarded by lock */
    pthread_t *parsers;
    int n_parsers;
    struct model *model;
    int documents; /* the model takes JSON documents: one request per record */
    _Atomic int stopping; /* a tick failed: submit nothing more, cancel what runs */
    struct chunk *ring; /* process_object's chunks, for cancelling */
    int n_ring;
    int64_t width;
    struct batch_keys keys;    /* cfg->key_columns, parsed */
    struct batch_columns cols; /* the current object's layout: bound before its records are
                                * parsed, read-only while they are */
    int said_positional;       /* the "no feature names" line was logged */
    int n_instances;
    struct warehouse_source *table; /* the input is a table: read from it, not from storage */
    struct warehouse_sink *sink;    /* the output is a table: rows go there, not to storage */
    /* objects into a table, continuing a run: the object it stopped in, and its last line
     * written (rows up to it are read again and not written); NULL: none */
    char *resume_object;
    int64_t resume_line;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    struct batch_stats *stats;
    double started;
    double last_progress;
};

static double now_s(void)
{
    return (double)clock_mono_ns() / 1e9;
}

static void chunk_reset(struct chunk *c)
{
    for (size_t i = 0; i < c->n; i++) {
        free(c->bad[i]);
        c->bad[i] = NULL;
        if (c->docs) {
            infer_request_destroy(c->docs[i]);
            c->docs[i] = NULL;
            c->tries[i] = c->retry[i] = 0;
        }
    }
    if (c->req)
        infer_request_destroy(c->req); /* it owns the data */
    else
        free(c->data);
    c->req = NULL;
    c->data = NULL;
    c->raw.len = 0;
    c->keys.len = 0;
    c->n = c->n_good = 0;
    c->n_retry = 0;
    c->retry_after_ms = 0;
    c->rc = 0;
}

static int chunk_init(struct chunk *c, struct runner *run, size_t cap)
{
    memset(c, 0, sizeof(*c));
    c->run = run;
    c->line_no = calloc(cap, sizeof(*c->line_no));
    c->off = calloc(cap, sizeof(*c->off));
    c->len = calloc(cap, sizeof(*c->len));
    c->bad = calloc(cap, sizeof(*c->bad));
    c->key_off = calloc(cap, sizeof(*c->key_off));
    c->key_len = calloc(cap, sizeof(*c->key_len));
    if (!c->key_off || !c->key_len)
        return -1;
    if (run->documents) {
        c->docs = calloc(cap, sizeof(*c->docs));
        c->doc_items = calloc(cap, sizeof(*c->doc_items));
        c->tries = calloc(cap, 1);
        c->retry = calloc(cap, 1);
        if (!c->docs || !c->doc_items || !c->tries || !c->retry)
            return -1;
    }
    return c->line_no && c->off && c->len && c->bad ? 0 : -1;
}

static void chunk_release(struct chunk *c)
{
    chunk_reset(c);
    buf_release(&c->raw);
    buf_release(&c->keys);
    free(c->key_off);
    free(c->key_len);
    free(c->line_no);
    free(c->off);
    free(c->len);
    free(c->bad);
    free(c->docs);
    free(c->doc_items);
    free(c->tries);
    free(c->retry);
}

/* ---- submitting and writing ---- */

static void chunk_done(struct batch_item *item, int rc, const struct err *e)
{
    struct chunk *c = item->ctx;
    struct runner *run = c->run;

    pthread_mutex_lock(&run->lock);
    c->rc = rc;
    if (e)
        c->err = *e;
    c->in_flight = 0;
    pthread_cond_broadcast(&run->cond);
    pthread_mutex_unlock(&run->lock);
}

static int chunk_submit(struct runner *run, struct chunk *c, struct err *e)
{
    struct infer_request *r;
    int rc;

    if (c->n_good == 0)
        return 0;
    r = calloc(1, sizeof(*r));
    if (!r || !(r->inputs[0].name = strdup(run->model->info.inputs[0].name))) {
        free(r);
        return err_set(e, ERR_NOMEM, "out of memory");
    }
    r->n_inputs = 1;
    r->inputs[0].datatype = INFERD_TYPE_FP32;
    r->inputs[0].n_dims = 2;
    r->inputs[0].shape[0] = (int64_t)c->n_good;
    r->inputs[0].shape[1] = run->width;
    r->inputs[0].data = c->data;
    r->inputs[0].data_bytes = c->n_good * (size_t)run->width * sizeof(float);
    infer_request_bind(r);
    c->req = r;
    c->item = (struct batch_item){.req = r, .client_fd = -1, .done = chunk_done, .ctx = c};
    for (;;) {
        rc = batcher_submit(run->model->batcher, &c->item, e);
        if (rc != ERR_BUSY)
            break;
        struct timespec ts = {0, 2 * 1000000};
        nanosleep(&ts, NULL);
    }
    return rc;
}

static void pending_done(struct runner *run, struct chunk *c)
{
    pthread_mutex_lock(&run->lock);
    if (--c->pending == 0) {
        c->in_flight = 0;
        pthread_cond_broadcast(&run->cond);
    }
    pthread_mutex_unlock(&run->lock);
}

/* A document request ended: a refused record is a bad record, any other failure the chunk's. */
static void doc_done(struct batch_item *item, int rc, const struct err *e)
{
    struct chunk *c = item->ctx;
    struct runner *run = c->run;
    size_t i = (size_t)(item - c->doc_items);

    pthread_mutex_lock(&run->lock);
    if (rc == ERR_INVALID || rc == ERR_SHAPE || rc == ERR_TOO_LARGE) {
        c->bad[i] = batch_reason("%s", e ? e->msg : "refused by the model");
        infer_request_destroy(c->docs[i]);
        c->docs[i] = NULL;
        c->n_good--;
    } else if (rc != 0 && rc != ERR_CANCELLED && c->docs[i]->abi.retryable &&
               c->tries[i] + 1 < DOC_ATTEMPTS && !atomic_load(&run->stopping)) {
        /* an upstream hiccup: this record alone goes again after a backoff (chunk_wait) */
        c->tries[i]++;
        c->retry[i] = 1;
        c->n_retry++;
        if (c->docs[i]->abi.retry_after_ms > c->retry_after_ms)
            c->retry_after_ms = c->docs[i]->abi.retry_after_ms;
        if (e)
            c->err = *e;
    } else if (rc != 0 && c->rc == 0) {
        c->rc = rc;
        if (e)
            c->err = *e;
    }
    pthread_mutex_unlock(&run->lock);
    pending_done(run, c);
}

/* Document models: each good record is a request of its own (`again`: only the records
 * marked to be sent again). */
static void chunk_submit_docs(struct runner *run, struct chunk *c, int again)
{
    size_t n_submit = 0;

    pthread_mutex_lock(&run->lock);
    for (size_t i = 0; i < c->n; i++)
        if (c->docs[i] && (!again || c->retry[i]))
            n_submit++;
    c->pending = n_submit + 1; /* +1 until every one is submitted */
    pthread_mutex_unlock(&run->lock);
    for (size_t i = 0; i < c->n; i++) {
        struct batch_item *it = &c->doc_items[i];
        struct err e = {0};
        int rc;
        if (!c->docs[i] || (again && !c->retry[i]))
            continue;
        c->retry[i] = 0;
        *it = (struct batch_item){.req = c->docs[i], .client_fd = -1, .done = doc_done, .ctx = c};
        if (atomic_load(&run->stopping)) {
            err_set(&e, ERR_CANCELLED, "stopped");
            doc_done(it, ERR_CANCELLED, &e);
            continue;
        }
        for (;;) {
            rc = batcher_submit(run->model->batcher, it, &e);
            if (rc != ERR_BUSY)
                break;
            struct timespec ts = {0, 2 * 1000000};
            nanosleep(&ts, NULL);
        }
        if (rc != 0)
            doc_done(it, rc, &e);
    }
    pending_done(run, c); /* the +1 */
}

/* ---- parsing, on the parser threads ---- */

/* 1 when a JSON Lines record is an object (the plain parser takes arrays only) */
static int is_object(const char *line, size_t len)
{
    while (len > 0 && (*line == ' ' || *line == '\t'))
        line++, len--;
    return len > 0 && *line == '{';
}

/* Record `i` of `c` into `row` and its keys into c->keys: the plain parsers when the columns
 * are the features in order, the layout (columns.h) otherwise. NULL, or why it is bad. */
static char *parse_record(struct runner *run, struct chunk *c, size_t i, float *row)
{
    const char *line = c->raw.data + c->off[i];
    size_t len = c->len[i];
    char *why;

    if (run->table)
        return len == 0 && run->width > 0
                   ? batch_reason("expected %lld values, got none", (long long)run->width)
                   : batch_parse_csv(line, len, run->width, row);
    if (len == 0)
        return batch_reason("empty line");
    if (!run->csv)
        return run->cols.identity && !is_object(line, len)
                   ? batch_parse_jsonl(line, len, run->width, row)
                   : batch_columns_parse_json(&run->cols, line, len, row, &c->keys);
    why = run->cols.identity ? batch_parse_csv(line, len, run->width, row)
                             : batch_columns_parse_csv(&run->cols, line, len, row, &c->keys);
    if (why && c->line_no[i] == 1 && !run->cfg->csv_header && strstr(why, "not a number")) {
        char *hinted = batch_reason("%s (a header line? did you mean --csv-header?)", why);
        free(why);
        why = hinted;
    }
    return why;
}

/* Parses every record of `c`, then hands the good ones to the model. */
static void chunk_parse(struct runner *run, struct chunk *c)
{
    int submitted = 0, rc = 0;
    struct err e = {0};

    if (run->documents) {
        for (size_t i = 0; i < c->n; i++) {
            const char *line = c->raw.data + c->off[i];
            size_t len = c->len[i];
            if (len == 0) {
                c->bad[i] = batch_reason("empty line");
            } else if ((c->bad[i] = batch_parse_nul(line, len)) != NULL) {
                continue;
            } else if (codec_decode_document(line, len, CODEC_FROM_STORE, &c->docs[i], &e) != 0) {
                c->bad[i] = batch_reason("%s", e.msg);
            } else {
                c->n_good++;
            }
        }
        chunk_submit_docs(run, c, 0);
        return;
    }
    c->data = malloc((c->n ? c->n : 1) * (size_t)run->width * sizeof(float));
    if (!c->data) {
        rc = err_set(&e, ERR_NOMEM, "out of memory");
    } else {
        for (size_t i = 0; i < c->n; i++) {
            float *row = c->data + c->n_good * (size_t)run->width;
            size_t key_start = c->keys.len;
            char *why = parse_record(run, c, i, row);
            if (run->table) { /* the keys came with the row, bad or not */
                if (why)
                    c->bad[i] = why;
                else
                    c->n_good++;
                continue;
            }
            c->key_off[i] = key_start;
            if (why) {
                c->bad[i] = why;
                c->keys.len = key_start;
            } else {
                c->n_good++;
            }
            c->key_len[i] = c->keys.len - key_start;
        }
        /* decide before submitting: once in the model, the chunk may be written and reused
         * by the reader before chunk_submit() even returns */
        int has_good = c->n_good > 0;
        rc = chunk_submit(run, c, &e);
        submitted = rc == 0 && has_good;
    }
    if (!submitted) {
        /* nothing for the model (or it failed): the chunk is ready to write now */
        pthread_mutex_lock(&run->lock);
        c->rc = rc;
        if (rc != 0)
            c->err = e;
        c->in_flight = 0;
        pthread_cond_broadcast(&run->cond);
        pthread_mutex_unlock(&run->lock);
    }
}

static void *parser_main(void *arg)
{
    struct runner *run = arg;

    pthread_mutex_lock(&run->lock);
    for (;;) {
        struct chunk *c;
        while (!run->parse_head && !run->parse_stopping)
            pthread_cond_wait(&run->cond, &run->lock);
        if (!run->parse_head)
            break;
        c = run->parse_head;
        run->parse_head = c->next_parse;
        if (!run->parse_head)
            run->parse_tail = NULL;
        pthread_mutex_unlock(&run->lock);
        chunk_parse(run, c);
        pthread_mutex_lock(&run->lock);
    }
    pthread_mutex_unlock(&run->lock);
    return NULL;
}

/* Queues a read chunk for the parsers; it is in flight until its results are back. */
static void chunk_dispatch(struct runner *run, struct chunk *c)
{
    pthread_mutex_lock(&run->lock);
    c->in_flight = 1;
    c->next_parse = NULL;
    if (run->parse_tail)
        run->parse_tail->next_parse = c;
    else
        run->parse_head = c;
    run->parse_tail = c;
    pthread_cond_broadcast(&run->cond);
    pthread_mutex_unlock(&run->lock);
}

static int parsers_start(struct runner *run, int n, struct err *e)
{
    run->parsers = calloc((size_t)n, sizeof(*run->parsers));
    if (!run->parsers)
        return err_set(e, ERR_NOMEM, "out of memory");
    for (int i = 0; i < n; i++) {
        if (pthread_create(&run->parsers[i], NULL, parser_main, run) != 0)
            return err_set(e, ERR_NOMEM, "cannot start parser threads");
        run->n_parsers++;
    }
    return 0;
}

static void parsers_stop(struct runner *run)
{
    pthread_mutex_lock(&run->lock);
    run->parse_stopping = 1;
    pthread_cond_broadcast(&run->cond);
    pthread_mutex_unlock(&run->lock);
    for (int i = 0; i < run->n_parsers; i++)
        pthread_join(run->parsers[i], NULL);
    free(run->parsers);
    run->parsers = NULL;
    run->n_parsers = 0;
}

/* Asks the model to drop every request of the object still queued or running. */
static void cancel_ring(struct runner *run)
{
    atomic_store(&run->stopping, 1);
    for (int k = 0; k < run->n_ring; k++) {
        struct chunk *c = &run->ring[k];
        if (c->req)
            batch_item_cancel(&c->item);
        for (size_t i = 0; c->docs && i < c->n; i++)
            if (c->docs[i])
                batch_item_cancel(&c->doc_items[i]);
    }
}

/* Waits for a chunk's results. Slow models (an upstream taking minutes) still get their
 * ticks: the lease is kept and a cancel is noticed, which stops what runs. */
static int chunk_wait(struct runner *run, struct chunk *c, struct err *e)
{
    int rc = 0;

    pthread_mutex_lock(&run->lock);
    for (;;) {
        while (c->in_flight) {
            struct timespec ts = clock_realtime_after_ms(1000);
            if (pthread_cond_timedwait(&run->cond, &run->lock, &ts) != ETIMEDOUT ||
                !c->in_flight || !run->cfg->tick || rc != 0)
                continue;
            pthread_mutex_unlock(&run->lock);
            rc = run->cfg->tick(run->cfg->tick_ctx, e);
            if (rc != 0)
                cancel_ring(run);
            pthread_mutex_lock(&run->lock);
        }
        if (c->n_retry == 0 || rc != 0 || c->rc != 0 || atomic_load(&run->stopping)) {
            if (c->n_retry != 0 && c->rc == 0) /* records left unanswered: not a result */
                c->rc = rc ? rc : ERR_CANCELLED;
            break;
        }
        /* records that failed for a passing reason go again, after a backoff (or the
         * upstream's Retry-After), each at most DOC_ATTEMPTS times in all */
        int tries = 0;
        for (size_t i = 0; i < c->n; i++)
            if (c->retry[i] && c->tries[i] > tries)
                tries = c->tries[i];
        int64_t delay_ms = (int64_t)DOC_RETRY_MS << (tries - 1);
        if (c->retry_after_ms > delay_ms)
            delay_ms = c->retry_after_ms;
        log_warn("batch", "records failed for a passing reason; sending them again",
                 "records=%zu attempt=%d delay_ms=%lld reason=\"%s\"", c->n_retry, tries + 1,
                 (long long)delay_ms, c->err.msg);
        c->n_retry = 0;
        c->retry_after_ms = 0;
        c->in_flight = 1;
        pthread_mutex_unlock(&run->lock);
        for (int64_t slept = 0; slept < delay_ms && rc == 0; slept += 250) {
            struct timespec ts = {0, 250 * 1000000};
            nanosleep(&ts, NULL);
            if (run->cfg->tick && slept % 1000 == 0)
                rc = run->cfg->tick(run->cfg->tick_ctx, e);
        }
        if (rc == 0 && !atomic_load(&run->stopping)) {
            chunk_submit_docs(run, c, 1);
        } else {
            pthread_mutex_lock(&run->lock);
            if (c->rc == 0)
                c->rc = rc ? rc : ERR_CANCELLED;
            c->in_flight = 0;
            pthread_mutex_unlock(&run->lock);
        }
        pthread_mutex_lock(&run->lock);
    }
    pthread_mutex_unlock(&run->lock);
    return rc;
}

static int append_value(struct buf *b, float v, int csv)
{
    if (!isfinite(v))
        return buf_puts(b, csv ? "" : "null");
    return buf_printf(b, "%.9g", (double)v);
}

struct object_out {
    const char *name; /* the input object, for error messages */
    struct storage_writer *out;
    struct storage_writer *errors; /* opened at the first bad record */
    const char *errors_uri;
    EVP_MD_CTX *sha;
    struct buf line;
    int csv;
    const char *header; /* the input's header line (--csv-header): the output gets one too,
                         * written before the first record; NULL: none, or written */
    size_t header_len;
};

static int emit(struct object_out *o, struct err *e)
{
    int rc = storage_write(o->out, o->line.data, o->line.len, e);

    if (rc == 0 && EVP_DigestUpdate(o->sha, o->line.data, o->line.len) != 1)
        rc = err_set(e, ERR_IO, "checksum failed");
    o->line.len = 0;
    return rc;
}

/* A document record's answer, as one line of compact JSON. */
static int write_document(struct runner *run, struct chunk *c, size_t i, struct object_out *o,
                          struct err *e)
{
    size_t len = 0;
    const char *doc = infer_request_document(c->docs[i], &len);
    json_t *v = doc ? json_loadb(doc, len, JSON_DECODE_ANY | JSON_ALLOW_NUL, NULL) : NULL;
    char *text = v ? json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY) : NULL;
    int rc;

    json_decref(v);
    if (!text)
        return err_set(e, ERR_BACKEND, "%s: line %lld: model '%s' returned no JSON answer",
                       o->name, (long long)c->line_no[i], run->model->name);
    if (run->cfg->join_input)
        rc = buf_printf(&o->line, "{\"input\":%s,\"prediction\":%s}\n", c->raw.data + c->off[i],
                        text);
    else
        rc = buf_printf(&o->line, "%s\n", text);
    free(text);
    return rc ? rc : emit(o, e);
}

/* Key `k`'s name in outputs: the table's column, or the layout's (columns.h). */
static const char *key_name(const struct runner *run, size_t k)
{
    return run->table ? warehouse_key_name(run->table, k) : run->cols.key_names[k];
}

/*
 * The output's header line, for a CSV input with one: the key columns (or, with --join-input,
 * the input's header) then `prediction`, or `p0,p1,...` for several values per record.
 */
static int write_header(struct runner *run, struct object_out *o, size_t per_row, struct err *e)
{
    size_t n_keys = run->keys.n;
    int rc = 0;

    o->line.len = 0;
    if (run->cfg->join_input) {
        rc = buf_append(&o->line, o->header, o->header_len);
        if (rc == 0)
            rc = buf_puts(&o->line, ",");
    }
    for (size_t k = 0; rc == 0 && !run->cfg->join_input && k < n_keys; k++)
        rc = buf_printf(&o->line, "%s,", key_name(run, k));
    if (rc == 0 && per_row == 1)
        rc = buf_puts(&o->line, "prediction");
    for (size_t k = 0; rc == 0 && per_row > 1 && k < per_row; k++)
        rc = buf_printf(&o->line, "%sp%zu", k ? "," : "", k);
    if (rc == 0)
        rc = buf_puts(&o->line, "\n");
    o->header = NULL;
    return rc ? err_set(e, ERR_NOMEM, "out of memory") : emit(o, e);
}

/* Values per record the model answers, before any answer: from its output's declared shape. */
static size_t declared_per_row(const struct model *m)
{
    const struct inferd_tensor *t = m->info.n_outputs ? &m->info.outputs[0] : NULL;
    size_t n = 1;

    for (int d = 1; t && d < t->n_dims; d++)
        n *= t->shape[d] > 0 ? (size_t)t->shape[d] : 1;
    return n;
}

/* A table row's input as the model got it (--join-input): a JSON array, or CSV fields. */
static int append_input(struct buf *b, const float *x, int64_t width, int csv)
{
    int rc = csv ? 0 : buf_puts(b, "\"input\":[");

    for (int64_t j = 0; rc == 0 && j < width; j++) {
        if (j && !csv)
            rc = buf_puts(b, ",");
        if (rc == 0)
            rc = append_value(b, x[j], csv);
        if (rc == 0 && csv)
            rc = buf_puts(b, ",");
    }
    return rc ? rc : csv ? 0 : buf_puts(b, "],");
}

/* A numeric record's output line: keys (or the input, --join-input), then its prediction.
 * `x`: a table row's input (its keys then come first in CSV too); NULL for a file's record. */
static int write_row(struct runner *run, struct chunk *c, size_t i, const float *x, const float *y,
                     size_t per_row, struct object_out *o)
{
    const char *keys = c->keys.data ? c->keys.data + c->key_off[i] : "";
    size_t keys_len = c->key_len[i];
    int wrap = !o->csv && (run->cfg->join_input || run->keys.n > 0); /* a JSON object */
    int rc = 0;

    if (wrap)
        rc = buf_puts(&o->line, "{");
    if (rc == 0 && (o->csv ? !run->cfg->join_input || x : wrap))
        rc = buf_append(&o->line, keys, keys_len); /* each ends in ',' */
    if (rc == 0 && run->cfg->join_input && x)
        rc = append_input(&o->line, x, run->width, o->csv);
    else if (rc == 0 && run->cfg->join_input && !o->csv)
        rc = buf_printf(&o->line, "\"input\":%s,", c->raw.data + c->off[i]);
    else if (rc == 0 && run->cfg->join_input)
        rc = buf_printf(&o->line, "%s,", c->raw.data + c->off[i]);
    if (rc == 0 && wrap)
        rc = buf_puts(&o->line, "\"prediction\":");
    if (rc == 0 && per_row > 1 && !o->csv)
        rc = buf_puts(&o->line, "[");
    for (size_t k = 0; rc == 0 && k < per_row; k++) {
        if (k)
            rc = buf_puts(&o->line, ",");
        if (rc == 0)
            rc = append_value(&o->line, y[k], o->csv);
    }
    if (rc == 0 && per_row > 1 && !o->csv)
        rc = buf_puts(&o->line, "]");
    if (rc == 0 && wrap)
        rc = buf_puts(&o->line, "}");
    if (rc == 0)
        rc = buf_puts(&o->line, "\n");
    return rc;
}

/* A table row named by its keys, for a bad-record message: `row {"id":5}` (JSON Lines output)
 * or `row (id)=(5)` (CSV), cut at `size`. */
static void row_label(const struct runner *run, const struct chunk *c, size_t i, int csv, char *out,
                      size_t size)
{
    const char *keys = c->keys.data ? c->keys.data + c->key_off[i] : "";
    int len = c->key_len[i] > 0 ? (int)c->key_len[i] - 1 : 0; /* without the last ',' */
    size_t n = 0;

    if (!csv) {
        snprintf(out, size, "row {%.*s}", len, keys);
        return;
    }
    n = (size_t)snprintf(out, size, "row (");
    for (size_t k = 0; k < run->keys.n && n < size; k++)
        n += (size_t)snprintf(out + n, size - n, "%s%s", k ? "," : "", key_name(run, k));
    if (n < size)
        snprintf(out + n, size - n, ")=(%.*s)", len, keys);
}

/*
 * A record's keys for a table sink, as CSV fields each followed by ',': a table's row's own,
 * or for a file's record its object's name and line number (into `o->line`).
 */
static int sink_keys(const struct chunk *c, size_t i, struct object_out *o, const char **keys,
                     size_t *len)
{
    int rc;

    if (c->run->table) {
        *keys = c->keys.data + c->key_off[i];
        *len = c->key_len[i];
        return 0;
    }
    o->line.len = 0;
    rc = buf_puts(&o->line, "\"");
    for (const char *p = o->name; rc == 0 && *p; p++)
        rc = *p == '"' ? buf_puts(&o->line, "\"\"") : buf_append(&o->line, p, 1);
    if (rc == 0)
        rc = buf_printf(&o->line, "\",%lld,", (long long)c->line_no[i]);
    *keys = o->line.data;
    *len = o->line.len;
    return rc;
}

static int chunk_write(struct runner *run, struct chunk *c, struct object_out *o, struct err *e)
{
    const char *sk = NULL;
    size_t sk_len = 0;

    const struct inferd_tensor *t = c->n_good && c->req ? &c->req->outputs[0] : NULL;
    size_t per_row = 1, g = 0, skipped = 0;
    int rc = 0;

    if (c->rc != 0)
        return err_set(e, c->rc, "%s", c->err.msg);
    if (t && (c->req->n_outputs == 0 || t->n_dims < 1))
        return err_set(e, ERR_BACKEND, "model '%s' returned no output", run->model->name);
    if (t) {
        for (int d = 1; d < t->n_dims; d++)
            per_row *= (size_t)t->shape[d];
        if (t->datatype != INFERD_TYPE_FP32 || t->data_bytes < c->n_good * per_row * 4)
            return err_set(e, ERR_BACKEND, "model '%s' returned an unexpected output",
                           run->model->name);
    }
    if (o->header && !run->sink) {
        rc = write_header(run, o, t ? per_row : declared_per_row(run->model), e);
        if (rc != 0)
            return rc;
    }
    for (size_t i = 0; rc == 0 && i < c->n; i++) {
        o->line.len = 0;
        if (run->resume_object && c->line_no[i] <= run->resume_line &&
            strcmp(o->name, run->resume_object) == 0) {
            skipped++; /* written by the run this one continues */
            if (!c->bad[i])
                g++;
            continue;
        }
        if (c->bad[i]) {
            char msg[600];
            /* bad records are counted in input order, so the limit stops at the same one
             * whatever the parsing order */
            char where[300];
            if (run->table)
                row_label(run, c, i, o->csv, where, sizeof(where));
            else
                snprintf(where, sizeof(where), "line %lld", (long long)c->line_no[i]);
            if (++run->stats->errors > run->cfg->max_errors)
                return err_set(e, ERR_INVALID, "%s: %s: %s%s", o->name, where, c->bad[i],
                               run->cfg->max_errors ? " (more bad records than --max-errors)" : "");
            if (run->sink) { /* to the table's errors table, by its keys */
                rc = sink_keys(c, i, o, &sk, &sk_len)
                         ? err_set(e, ERR_NOMEM, "out of memory")
                         : warehouse_sink_put_bad(run->sink, sk, sk_len, c->bad[i], e);
                continue;
            }
            int n = snprintf(msg, sizeof(msg), "%s: %s\n", where, c->bad[i]);
            if (!o->errors)
                rc = storage_open_write(o->errors_uri, &o->errors, e);
            if (rc == 0)
                rc = storage_write(o->errors, msg, (size_t)n, e);
            if (rc == 0)
                rc = buf_puts(&o->line, "\n");
            if (rc == 0)
                rc = emit(o, e);
            continue;
        }
        if (run->documents) {
            rc = write_document(run, c, i, o, e);
            continue;
        }
        const float *y = (const float *)t->data + g * per_row;
        const float *x =
            run->table ? (const float *)c->req->inputs[0].data + g * (size_t)run->width : NULL;
        g++;
        if (run->sink) {
            rc = sink_keys(c, i, o, &sk, &sk_len) ? err_set(e, ERR_NOMEM, "out of memory")
                                                  : warehouse_sink_put(run->sink, sk, sk_len, y,
                                                                       per_row, e);
            continue;
        }
        rc = write_row(run, c, i, x, y, per_row, o);
        if (rc == 0)
            rc = emit(o, e);
    }
    if (rc == 0 && run->sink) /* the chunk, into the staging table */
        rc = warehouse_sink_write(run->sink, e);
    run->stats->records += (int64_t)(c->n - skipped);
    return rc;
}

/* ---- progress ---- */

static void progress(struct runner *run, int final)
{
    struct batch_stats *s = run->stats;
    double now = now_s(), secs = now - run->started;
    double rate = secs > 0 ? (double)s->records / secs : 0;

    if (run->cfg->quiet ||
        (!final && now - run->last_progress < (run->cfg->progress_tty ? 0.25 : 5.0)))
        return;
    run->last_progress = now;
    if (run->cfg->progress_tty && !final) {
        fprintf(stderr, "\r  objects %lld/%lld  records %lld  %.0f records/s   ",
                (long long)(s->objects_done + s->objects_skipped), (long long)s->objects_total,
                (long long)s->records, rate);
        fflush(stderr);
    } else if (!final) {
        log_info("batch", "progress", "objects=%lld/%lld records=%lld records_per_s=%.0f",
                 (long long)(s->objects_done + s->objects_skipped), (long long)s->objects_total,
                 (long long)s->records, rate);
    }
}

/* ---- one object ---- */

/*
 * 1 when a CSV line is a header of the model's: every field non-empty, none a number, and one
 * of them a feature name. Read in order, its columns would go to the wrong features without a
 * word, so that fails the object whatever --max-errors allows; any other line 1 that is not
 * numbers is a bad record whose reason asks the same question.
 */
static int looks_like_header(const struct features *f, const char *line, size_t len)
{
    const char *p = line, *end = line + len;
    int named = 0;

    if (f->n == 0)
        return 0;

    for (;;) {
        const char *q = memchr(p, ',', (size_t)(end - p)), *fend = q ? q : end;
        float v;
        const char *a = p, *b = fend;
        while (a < b && (*a == ' ' || *a == '\t'))
            a++;
        if (a == b || batch_parse_field(p, (size_t)(fend - p), &v) == 0)
            return 0;
        while (b > a && (b[-1] == ' ' || b[-1] == '\t'))
            b--;
        if (b - a >= 2 && *a == '"' && b[-1] == '"')
            a++, b--;
        named |= features_find(f, a, (size_t)(b - a)) >= 0;
        if (!q)
            return named;
        p = q + 1;
    }
}

/* Binds the object's layout to its CSV header (line 1), keeping the line for the output's. */
static int bind_header(struct runner *run, const char *name, const char *line, size_t len,
                       struct buf *header, struct err *e)
{
    char **names = NULL;
    size_t n = 0;
    int rc = batch_columns_split_header(line, len, &names, &n, e);

    if (rc == 0 && (rc = batch_columns_named(&run->cols, names, n, e)) != 0) {
        char msg[sizeof(e->msg)];
        snprintf(msg, sizeof(msg), "%s", e->msg);
        rc = err_set(e, rc, "%s: line 1 (header): %s (model '%s')", name, msg, run->model->name);
    }
    if (rc == 0 && run->cols.by_position && !run->said_positional) {
        run->said_positional = 1;
        log_warn("batch", "the model has no feature names: CSV header columns are taken in order",
                 "model=%s object=%s", run->model->name, name);
    }
    if (rc == 0 && (buf_append(header, line, len) != 0 || buf_append(header, "", 1) != 0))
        rc = err_set(e, ERR_NOMEM, "out of memory");
    for (size_t i = 0; i < n; i++)
        free(names[i]);
    free(names);
    return rc;
}

/* Binds the positional layout of an object without a header (CSV lines, JSON arrays). JSON
 * Lines with named key columns stay unbound: their records must be objects. */
static int bind_object(struct runner *run, const char *name, int csv, struct err *e)
{
    struct err why = {0};
    int rc;

    batch_columns_init(&run->cols, &run->keys, &run->model->features, run->width);
    if (run->documents || (csv && run->cfg->csv_header))
        return 0;
    rc = batch_columns_positional(&run->cols, &why);
    if (rc == ERR_INVALID && !csv)
        return 0;
    return rc ? err_set(e, rc, "%s: %s", name, why.msg) : 0;
}

/* `stale_errors`: an earlier run left `errors_uri`; it goes if this run finds no bad record */
static int process_object(struct runner *run, const char *in_uri, const char *name,
                          const char *out_uri, const char *errors_uri, int csv, int stale_errors,
                          int64_t *records, char sha_hex[65], struct err *e)
{
    const struct batch_config *cfg = run->cfg;
    /* enough chunks in flight to keep every instance busy while the next one is parsed */
    int n_chunks = cfg->concurrency > 0 ? cfg->concurrency : 2 * run->n_instances + 1;
    struct chunk *chunks = calloc((size_t)n_chunks, sizeof(*chunks));
    struct storage_reader *in = NULL;
    struct object_out o = {.name = name, .errors_uri = errors_uri, .csv = csv};
    struct buf header = {0};
    int64_t line_no = 0, start_records = run->stats->records;
    size_t cap = (size_t)cfg->records_per_batch;
    int next = 0, rc = 0, eof = 0;
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned md_len = 0;

    if (!chunks)
        return err_set(e, ERR_NOMEM, "out of memory");
    if (run->documents && csv) {
        free(chunks);
        return err_set(e, ERR_INVALID,
                       "%s: model '%s' takes JSON documents: give JSON Lines, not CSV", name,
                       run->model->name);
    }
    run->csv = csv || run->table; /* a table's rows are CSV lines of features */
    if (run->table) {
        /* keys come with each row; the CSV output's header names them and the features */
        batch_columns_init(&run->cols, &run->keys, &run->model->features, run->width);
        for (size_t k = 0; rc == 0 && k < run->keys.n; k++)
            rc = buf_printf(&header, "%s,", key_name(run, k));
        if (rc == 0)
            rc = buf_puts(&header, warehouse_feature_header(run->table));
        if (rc != 0)
            rc = err_set(e, ERR_NOMEM, "out of memory");
        o.header = csv && !run->sink ? header.data : NULL;
        o.header_len = header.len;
    } else {
        rc = bind_object(run, name, csv, e);
    }
    run->ring = chunks;
    run->n_ring = n_chunks;
    atomic_store(&run->stopping, 0);
    for (int i = 0; i < n_chunks; i++)
        if (chunk_init(&chunks[i], run, cap) != 0 && rc == 0)
            rc = err_set(e, ERR_NOMEM, "out of memory");
    o.sha = EVP_MD_CTX_new();
    if (rc == 0 && (!o.sha || EVP_DigestInit_ex(o.sha, EVP_sha256(), NULL) != 1))
        rc = err_set(e, ERR_NOMEM, "out of memory");
    if (rc == 0 && !run->table)
        rc = storage_open_read(in_uri, &in, e);
    if (rc == 0 && !run->sink)
        rc = storage_open_write(out_uri, &o.out, e);
    while (rc == 0 && !eof) {
        struct chunk *c = &chunks[next];
        /* the ring is full: write the oldest chunk before reusing its slot */
        if (c->n > 0) {
            rc = chunk_wait(run, c, e);
            if (rc == 0)
                rc = chunk_write(run, c, &o, e);
            chunk_reset(c);
            progress(run, 0);
            if (cfg->records_written)
                *cfg->records_written = run->stats->records - start_records;
            if (rc == 0 && cfg->tick)
                rc = cfg->tick(cfg->tick_ctx, e);
            if (rc != 0)
                break;
        }
        /* read: the parsers and the model work on earlier chunks meanwhile */
        while (run->table && c->n < cap) {
            size_t off = c->raw.len, key_off = c->keys.len;
            int got = warehouse_read_row(run->table, &c->raw, &c->keys, e);
            if (got <= 0) {
                rc = got;
                eof = got == 0;
                break;
            }
            c->line_no[c->n] = ++line_no;
            c->off[c->n] = off;
            c->len[c->n] = c->raw.len - off;
            c->key_off[c->n] = key_off;
            c->key_len[c->n] = c->keys.len - key_off;
            if (buf_append(&c->raw, "", 1) != 0) {
                rc = err_set(e, ERR_NOMEM, "out of memory");
                break;
            }
            c->n++;
        }
        while (!run->table && c->n < cap) {
            const char *line;
            size_t len;
            int got = storage_read_line(in, &line, &len, e);
            if (got < 0) {
                rc = got;
                break;
            }
            if (got == 0) {
                eof = 1;
                break;
            }
            line_no++;
            if (line_no == 1 && csv && cfg->csv_header) {
                rc = bind_header(run, name, line, len, &header, e);
                o.header = header.data;
                o.header_len = header.len ? header.len - 1 : 0;
                if (rc != 0)
                    break;
                continue;
            }
            if (line_no == 1 && csv && !cfg->csv_header &&
                looks_like_header(&run->model->features, line, len)) {
                rc = err_set(e, ERR_INVALID,
                             "%s: line 1 names the model's features: did you mean --csv-header?",
                             name);
                break;
            }
            c->line_no[c->n] = line_no;
            c->off[c->n] = c->raw.len;
            c->len[c->n] = len;
            if (buf_append(&c->raw, line, len) != 0 || buf_append(&c->raw, "", 1) != 0) {
                rc = err_set(e, ERR_NOMEM, "out of memory");
                break;
            }
            c->n++;
        }
        if (rc == 0 && c->n > 0)
            chunk_dispatch(run, c);
        next = (next + 1) % n_chunks;
    }
    /* drain the ring in order */
    for (int k = 0; k < n_chunks; k++) {
        struct chunk *c = &chunks[(next + k) % n_chunks];
        if (c->n > 0 || c->in_flight) {
            struct err we;
            int wrc = chunk_wait(run, c, rc == 0 ? e : &we);
            if (rc == 0)
                rc = wrc;
            if (rc == 0)
                rc = chunk_write(run, c, &o, e);
        }
        chunk_release(c);
    }
    free(chunks);
    run->ring = NULL;
    run->n_ring = 0;
    if (rc == 0 && o.header && !run->sink) /* a header and no record: the header alone */
        rc = write_header(run, &o, declared_per_row(run->model), e);
    batch_columns_release(&run->cols);
    buf_release(&header);
    storage_close_read(in);
    if (rc == 0 && EVP_DigestFinal_ex(o.sha, md, &md_len) != 1)
        rc = err_set(e, ERR_IO, "checksum failed");
    if (rc == 0 && o.errors)
        rc = storage_commit(o.errors, e), o.errors = NULL;
    else if (rc == 0 && stale_errors) /* none now: an earlier run's would mislead */
        rc = storage_delete(errors_uri, e);
    if (rc == 0 && !run->sink) /* a sink commits once, after every object (run_to_table) */
        rc = storage_commit(o.out, e), o.out = NULL;
    storage_abort(o.out);
    storage_abort(o.errors);
    EVP_MD_CTX_free(o.sha);
    buf_release(&o.line);
    for (unsigned i = 0; rc == 0 && i < md_len && i < 32; i++)
        snprintf(sha_hex + 2 * i, 3, "%02x", md[i]);
    *records = run->stats->records - start_records;
    return rc;
}

/* ---- the manifest ---- */

/* Hashes an output as a stream: it may be far larger than memory. */
static int sha256_of(const char *uri, char hex[65])
{
    struct storage_reader *r = NULL;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned md_len = 0;
    struct err e;
    char *chunk = malloc(1u << 16);
    size_t n = 1;
    int rc = ctx && chunk && EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) == 1 ? 0 : -1;

    if (rc == 0)
        rc = storage_open_read(uri, &r, &e);
    while (rc == 0 && n > 0) {
        rc = storage_read(r, chunk, 1u << 16, &n, &e);
        if (rc == 0 && n > 0 && EVP_DigestUpdate(ctx, chunk, n) != 1)
            rc = -1;
    }
    if (rc == 0 && EVP_DigestFinal_ex(ctx, md, &md_len) != 1)
        rc = -1;
    for (unsigned i = 0; rc == 0 && i < md_len && i < 32; i++)
        snprintf(hex + 2 * i, 3, "%02x", md[i]);
    storage_close_read(r);
    EVP_MD_CTX_free(ctx);
    free(chunk);
    return rc;
}

json_t *batch_input_json(const struct storage_identity *id)
{
    if (id->etag[0])
        return json_pack("{s:I, s:s}", "size", (json_int_t)id->size_bytes, "etag", id->etag);
    return json_pack("{s:I, s:I}", "size", (json_int_t)id->size_bytes, "mtime_ns",
                     (json_int_t)id->mtime_ns);
}

/* 1 if the manifest lists `name` with the input identity it has now, and its output still has
 * the recorded checksum. An entry without "input" (an older manifest) is not done: the input
 * may have changed since, and running the object again is always right. */
static int already_done(json_t *objects, const char *name, const struct storage_identity *input,
                        const char *out_uri)
{
    json_t *entry = json_object_get(objects, name);
    const char *want = json_string_value(json_object_get(entry, "sha256"));
    json_t *now = batch_input_json(input);
    char got[65] = "";
    int same_input = now && json_equal(json_object_get(entry, "input"), now);

    json_decref(now);
    if (entry && !same_input)
        log_info("batch", "input changed since the last run: running it again", "object=%s%s", name,
                 json_object_get(entry, "input") ? "" : " recorded=none");
    return want && same_input && sha256_of(out_uri, got) == 0 && strcmp(want, got) == 0;
}

static int save_manifest(const char *uri, json_t *manifest, struct err *e)
{
    char *text = json_dumps(manifest, JSON_INDENT(2) | JSON_SORT_KEYS);
    int rc;

    if (!text)
        return err_set(e, ERR_NOMEM, "out of memory");
    rc = storage_put(uri, text, strlen(text), e);
    free(text);
    return rc;
}

int batch_list_output(const char *output, char ***names, size_t *n, struct err *e)
{
    int is_object = 0, rc = storage_list(output, names, n, &is_object, e);

    if (rc == ERR_NOT_FOUND) { /* a first run: nothing there yet */
        *names = NULL;
        *n = 0;
        rc = 0;
    }
    return rc;
}

static int compare_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int batch_has_name(char *const *names, size_t n, const char *name)
{
    return n > 0 && bsearch(&name, names, n, sizeof(*names), compare_names) != NULL;
}

int batch_is_reserved(const char *name)
{
    const char *base = strrchr(name, '/');
    size_t n = strlen(name);

    base = base ? base + 1 : name;
    return strcmp(base, "_manifest.json") == 0 || strcmp(base, "_SUCCESS") == 0 ||
           (n > 4 && strcmp(name + n - 4, ".out") == 0) ||
           (n > 7 && strcmp(name + n - 7, ".errors") == 0) || strstr(base, ".tmp-") != NULL;
}

int batch_format_of(const struct batch_config *cfg, const char *name, int *csv, struct err *e)
{
    const char *dot = strrchr(name, '.');

    if (cfg->format != BATCH_FORMAT_AUTO) {
        *csv = cfg->format == BATCH_FORMAT_CSV;
        return 0;
    }
    if (dot && (strcmp(dot, ".jsonl") == 0 || strcmp(dot, ".json") == 0)) {
        *csv = 0;
        return 0;
    }
    if (dot && strcmp(dot, ".csv") == 0) {
        *csv = 1;
        return 0;
    }
    return err_set(e, ERR_INVALID, "%s: cannot tell the format from its name; pass --format", name);
}

/* Deletes the temporary objects a killed run left behind, once every output is complete. */
int batch_remove_leftovers(const char *output, struct err *e)
{
    char **names = NULL;
    size_t n = 0;
    int is_object = 0, rc;

    rc = storage_list(output, &names, &n, &is_object, e);
    for (size_t i = 0; rc == 0 && !is_object && i < n; i++) {
        const char *base = strrchr(names[i], '/');
        char *uri;
        if (!strstr(base ? base : names[i], ".tmp-"))
            continue;
        uri = storage_join(output, names[i]);
        rc = uri ? storage_delete(uri, e) : err_set(e, ERR_NOMEM, "out of memory");
        free(uri);
    }
    storage_names_free(names, n);
    return rc;
}

/* ---- checks ---- */

/* batch_check_suffix, batch_check_locations and batch_check_keys: in batch_def.c */

/* Parses cfg->key_columns for a run of run->model. */
static int start_keys(struct runner *run, struct err *e)
{
    int rc = batch_keys_parse(run->cfg->key_columns, &run->keys, e);

    if (rc == 0 && run->keys.n > 0 && run->documents)
        rc = err_set(e, ERR_INVALID,
                     "key columns: model '%s' takes JSON documents, not rows of numbers: it gets "
                     "each record whole",
                     run->model->name);
    return rc;
}

/* ---- one object, for a worker ---- */

static int open_table(struct runner *run, char ***names, size_t *n, struct err *e);

static int open_sink(struct runner *run, struct err *e);

int batch_run_object(const struct batch_config *cfg, struct model *m, const char *in_uri,
                     const char *name, const char *out_uri, const char *errors_uri,
                     struct batch_object_result *res, struct err *e)
{
    struct batch_stats stats = {0};
    struct batch_config table_cfg = *cfg;
    struct runner run = {.cfg = cfg, .stats = &stats, .model = m};
    long n_cpu = sysconf(_SC_NPROCESSORS_ONLN);
    char **names = NULL;
    size_t n_names = 0;
    int csv = 0, rc;

    memset(res, 0, sizeof(*res));
    run.documents = m->info.json_io != INFERD_JSON_IO_NONE;
    if (!batch_model_ok(m))
        return err_set(e, ERR_INVALID, "model '%s' does not take rows of numbers", m->name);
    rc = batch_format_of(cfg, name, &csv, e);
    if (rc != 0)
        return rc;
    run.started = now_s();
    run.width = run.documents ? 0 : m->info.inputs[0].shape[1];
    run.n_instances = cfg->instances > 0 ? cfg->instances : 2;
    rc = start_keys(&run, e);
    table_cfg.input = in_uri;
    table_cfg.output = out_uri; /* a table output takes the keys as CSV fields */
    run.cfg = &table_cfg;
    if (rc == 0 && warehouse_supports(in_uri)) {
        /* a part of a table (a server job's task): it has no identity to keep, and is read
         * again whole by every run */
        rc = open_table(&run, &names, &n_names, e);
    } else if (rc == 0) {
        /* before reading: a change after this is seen by the next run */
        rc = storage_identify(in_uri, &res->input, e);
    }
    /* into a table: the part's rows go to its run's staging table */
    if (rc == 0 && warehouse_supports(out_uri))
        rc = cfg->run_id ? open_sink(&run, e)
                         : err_set(e, ERR_INVALID, "a table output needs its batch run");
    if (rc != 0) {
        warehouse_sink_close(run.sink);
        warehouse_close(run.table);
        batch_keys_release(&run.keys);
        storage_names_free(names, n_names);
        return rc;
    }
    pthread_mutex_init(&run.lock, NULL);
    pthread_cond_init(&run.cond, NULL);
    rc = parsers_start(&run, (int)(n_cpu > 0 ? n_cpu : 1), e);
    if (rc == 0)
        rc = process_object(&run, in_uri, name, run.sink ? NULL : out_uri,
                            run.sink ? NULL : errors_uri, csv, cfg->stale_errors, &res->records,
                            res->sha256, e);
    if (rc == 0 && run.sink) /* the part's last rows; the run's finish merges every part */
        rc = warehouse_sink_commit(run.sink, e);
    res->errors = stats.errors;
    if (run.parsers)
        parsers_stop(&run);
    warehouse_sink_close(run.sink);
    warehouse_close(run.table);
    batch_keys_release(&run.keys);
    storage_names_free(names, n_names);
    pthread_mutex_destroy(&run.lock);
    pthread_cond_destroy(&run.cond);
    return rc;
}

/* ---- the job ---- */

int batch_model_ok(const struct model *m)
{
    if (m->info.json_io != INFERD_JSON_IO_NONE)
        return 1;
    return m->info.n_inputs == 1 && m->info.inputs[0].n_dims == 2 &&
           m->info.inputs[0].shape[1] >= 1;
}

static int load_model(const struct batch_config *cfg, struct registry **reg, struct model **m,
                      struct err *e)
{
    long n_cpu = sysconf(_SC_NPROCESSORS_ONLN);
    int rc = registry_create(cfg->models_dir, reg, e);

    if (rc == 0) {
        /* nothing else needs the CPUs here: one instance each, unless told otherwise */
        registry_set_instances(*reg,
                               cfg->instances > 0 ? cfg->instances : (int)(n_cpu > 0 ? n_cpu : 1));
        rc = registry_load(*reg, cfg->model, e);
    }
    if (rc == 0)
        rc = registry_acquire(*reg, cfg->model, 0, m, e);
    if (rc == 0 && !batch_model_ok(*m))
        rc = err_set(e, ERR_INVALID, "model '%s' does not take rows of numbers", cfg->model);
    return rc;
}

/*
 * Opens the table (or query) cfg->input names, checked against run->model, and lists it as the
 * one object `names[0]`: "SCHEMA.TABLE.jsonl" (or ".csv", or "query.jsonl"). Its key columns
 * (the primary key's unless named) replace run->keys.
 */
static int open_table(struct runner *run, char ***names, size_t *n, struct err *e)
{
    const struct batch_config *cfg = run->cfg;
    const struct features *f = &run->model->features;
    /* a table output takes the keys as CSV fields */
    int csv = cfg->format == BATCH_FORMAT_CSV || warehouse_supports(cfg->output), rc;
    struct warehouse_spec spec = {
        .uri = cfg->input,
        .query = cfg->input_query,
        .key_columns = cfg->key_columns,
        .feature_names = f->names,
        .n_features = f->names ? f->n : 0,
        .width = run->width,
        .keys_json = !csv,
        .after = cfg->after,
        .upto = cfg->upto,
    };

    if (run->documents)
        return err_set(e, ERR_INVALID,
                       "model '%s' takes JSON documents: a table gives rows of numbers",
                       run->model->name);
    rc = warehouse_open(&spec, &run->table, e);
    if (rc != 0)
        return rc;
    batch_keys_release(&run->keys);
    run->keys.n = warehouse_n_keys(run->table);
    run->keys.names = calloc(run->keys.n + 1, sizeof(*run->keys.names));
    *names = calloc(1, sizeof(**names));
    if (!run->keys.names || !*names ||
        asprintf(&(*names)[0], "%s.%s", warehouse_name(run->table), csv ? "csv" : "jsonl") < 0) {
        free(*names);
        *names = NULL;
        run->keys.n = 0;
        return err_set(e, ERR_NOMEM, "out of memory");
    }
    *n = 1;
    for (size_t k = 0; k < run->keys.n; k++)
        if (!(run->keys.names[k] = strdup(warehouse_key_name(run->table, k)))) {
            run->keys.n = k;
            return err_set(e, ERR_NOMEM, "out of memory");
        }
    log_info("batch", "reading a table", "source=%s name=%s keys=%zu", warehouse_shown(run->table),
             warehouse_name(run->table), run->keys.n);
    return 0;
}

/*
 * Opens the table cfg->output names as the run's sink: keyed by the keys of run->table (their
 * types too), or for objects by `source_object` and `line`; the model's declared values per
 * row.
 */
static int open_sink(struct runner *run, struct err *e)
{
    static const char *const object_keys[] = {"source_object", "line"};
    static const char *const object_types[] = {"text", "bigint"};
    size_t n = run->table ? warehouse_n_keys(run->table) : 2;
    const char **types = calloc(n + 1, sizeof(*types));
    struct warehouse_sink_spec spec = {
        .uri = run->cfg->output,
        .n_keys = n,
        .key_names = run->table ? (const char *const *)run->keys.names : object_keys,
        .key_types = run->table ? types : object_types,
        .per_row = declared_per_row(run->model),
        .model_version = run->model->version_str,
        .source = url_redacted(run->cfg->input),
        .query = run->cfg->input_query,
        .model = run->model->name,
        .restart = run->cfg->restart,
        .run = run->cfg->run_id,
        .after = run->cfg->after,
        .upto = run->cfg->upto,
    };
    int rc;

    if (!types || !spec.source) {
        free(types);
        free((char *)spec.source);
        return err_set(e, ERR_NOMEM, "out of memory");
    }
    for (size_t k = 0; run->table && k < n; k++)
        types[k] = warehouse_key_type(run->table, k);
    rc = warehouse_sink_open(&spec, &run->sink, e);
    free(types);
    free((char *)spec.source);
    if (rc == 0 && !run->cfg->run_id)
        log_info("batch", "writing a table", "target=%s name=%s staging=%s__inferd_staging",
                 warehouse_sink_shown(run->sink), warehouse_sink_name(run->sink),
                 warehouse_sink_name(run->sink));
    return rc;
}

/*
 * When the sink continues a run a failed or killed one left: the run's counts so far, and a
 * table read again from after its last row written, or objects from the one it stopped in
 * (its rows up to the last line written are read and not written).
 */
static int resume(struct runner *run, char **names, size_t n, struct err *e)
{
    const char *const *after = NULL;
    int rc, found = 0;

    if (!warehouse_sink_resumed(run->sink, &after, &run->stats->records, &run->stats->errors))
        return 0;
    if (run->table) {
        rc = warehouse_continue_after(run->table, after, e);
        if (rc == 0)
            log_info("batch", "continuing after the last row written", "records=%lld errors=%lld",
                     (long long)run->stats->records, (long long)run->stats->errors);
        return rc;
    }
    for (size_t i = 0; i < n && !found; i++)
        found = strcmp(names[i], after[0]) == 0;
    if (!found) /* its input changed: the rows kept may not be what this input gives */
        return err_set(e, ERR_INVALID,
                       "%s: the run this one continues stopped in '%.200s', which is no longer "
                       "there: add --restart to discard its rows",
                       warehouse_sink_name(run->sink), after[0]);
    if (!(run->resume_object = strdup(after[0])))
        return err_set(e, ERR_NOMEM, "out of memory");
    run->resume_line = strtoll(after[1], NULL, 10);
    log_info("batch", "continuing after the last row written", "object=%s line=%lld records=%lld",
             run->resume_object, (long long)run->resume_line, (long long)run->stats->records);
    return 0;
}

/* A failed run: recorded with its reason, and the error says what became of its rows. */
static void kept_rows(struct runner *run, struct err *e)
{
    int64_t kept;

    warehouse_sink_fail(run->sink, e->msg);
    kept = warehouse_sink_kept(run->sink);
    if (kept > 0) {
        size_t len = strlen(e->msg);
        log_warn("batch",
                 "the target is unchanged; the rows written are kept: the same command continues "
                 "after them, the same with --restart discards them",
                 "name=%s staging=%s__inferd_staging rows=%lld", warehouse_sink_name(run->sink),
                 warehouse_sink_name(run->sink), (long long)kept);
        snprintf(e->msg + len, sizeof(e->msg) - len,
                 " (%lld rows kept: run again to continue, --restart to discard)", (long long)kept);
    }
}

/*
 * A table or query, or the objects under cfg->input, into a table: no manifest (every run
 * reads all again; the upsert makes that harmless); the sink's one commit is the end.
 */
static int run_to_table(struct runner *run, struct err *e)
{
    const struct batch_config *cfg = run->cfg;
    char **names = NULL, sha[65] = "";
    size_t n = 0;
    int64_t records = 0;
    int is_object = 0, from_table = warehouse_supports(cfg->input), rc = 0;

    if (cfg->join_input)
        return err_set(e, ERR_INVALID,
                       "--join-input: a table output holds the keys and the prediction only");
    if (!from_table && run->documents)
        return err_set(e, ERR_INVALID,
                       "model '%s' takes JSON documents: a table output holds numbers",
                       run->model->name);
    if (!from_table && run->keys.n > 0)
        return err_set(e, ERR_INVALID,
                       "--key-columns: objects go into a table keyed by source_object and line");
    if (!from_table && cfg->input_query && cfg->input_query[0])
        return err_set(e, ERR_INVALID, "--input-query needs a postgresql:// input");
    rc = from_table ? open_table(run, &names, &n, e)
                    : storage_list(cfg->input, &names, &n, &is_object, e);
    if (rc == 0)
        rc = open_sink(run, e);
    if (rc == 0)
        rc = resume(run, names, n, e);
    for (size_t i = 0; i < n; i++)
        if (!batch_is_reserved(names[i]))
            run->stats->objects_total++;
    for (size_t i = 0; rc == 0 && i < n; i++) {
        char *in_uri = NULL;
        int csv = 1;
        if (batch_is_reserved(names[i]))
            continue;
        if (run->resume_object && strcmp(names[i], run->resume_object) != 0) {
            run->stats->objects_skipped++; /* written whole by the run this one continues */
            continue;
        }
        in_uri = from_table || is_object ? strdup(cfg->input) : storage_join(cfg->input, names[i]);
        if (!in_uri)
            rc = err_set(e, ERR_NOMEM, "out of memory");
        else if (from_table || (rc = batch_format_of(cfg, names[i], &csv, e)) == 0)
            rc = process_object(run, in_uri, names[i], NULL, NULL, csv, 0, &records, sha, e);
        if (rc == 0)
            run->stats->objects_done++;
        if (run->resume_object && strcmp(names[i], run->resume_object) == 0) {
            free(run->resume_object); /* the objects after it are new */
            run->resume_object = NULL;
        }
        free(in_uri);
    }
    if (rc == 0) /* all of the run's rows at once, for readers */
        rc = warehouse_sink_commit(run->sink, e);
    if (rc != 0 && run->sink)
        kept_rows(run, e);
    if (rc == 0)
        log_info("batch", "merged into the table", "name=%s records=%lld errors=%lld",
                 warehouse_sink_name(run->sink), (long long)run->stats->records,
                 (long long)run->stats->errors);
    storage_names_free(names, n);
    return rc;
}

int batch_run(const struct batch_config *cfg, struct batch_stats *stats, struct err *e)
{
    struct registry *reg = NULL;
    struct runner run = {.cfg = cfg, .stats = stats};
    char **names = NULL, *manifest_uri = NULL, *success_uri = NULL, **outs = NULL;
    json_t *manifest = NULL, *objects;
    size_t n_names = 0, n_outs = 0;
    int is_object = 0, unsaved = 0, rc;
    double last_save = 0;
    struct err save_err;
    const char *suffix = cfg->output_suffix ? cfg->output_suffix : ".out";

    memset(stats, 0, sizeof(*stats));
    run.started = now_s();
    pthread_mutex_init(&run.lock, NULL);
    pthread_cond_init(&run.cond, NULL);
    rc = load_model(cfg, &reg, &run.model, e);
    if (rc != 0)
        goto cleanup;
    run.documents = run.model->info.json_io != INFERD_JSON_IO_NONE;
    run.width = run.documents ? 0 : run.model->info.inputs[0].shape[1];
    rc = start_keys(&run, e);
    if (rc == 0)
        rc = batch_check_suffix(suffix, e);
    if (rc == 0 && !warehouse_supports(cfg->output))
        rc = batch_check_locations(cfg->input, cfg->output, suffix, e);
    if (rc != 0)
        goto cleanup;
    rc = parsers_start(
        &run, (int)(sysconf(_SC_NPROCESSORS_ONLN) > 0 ? sysconf(_SC_NPROCESSORS_ONLN) : 1), e);
    if (rc != 0)
        goto cleanup;
    {
        long n_cpu = sysconf(_SC_NPROCESSORS_ONLN);
        run.n_instances = cfg->instances > 0 ? cfg->instances : (int)(n_cpu > 0 ? n_cpu : 1);
    }
    if (warehouse_supports(cfg->output)) {
        rc = run_to_table(&run, e);
        goto cleanup;
    }
    if (warehouse_supports(cfg->input)) {
        rc = open_table(&run, &names, &n_names, e);
        is_object = 1;
    } else if (cfg->input_query && cfg->input_query[0]) {
        rc = err_set(e, ERR_INVALID, "--input-query needs a postgresql:// input");
    } else {
        rc = storage_list(cfg->input, &names, &n_names, &is_object, e);
    }
    if (rc == 0)
        rc = batch_list_output(cfg->output, &outs, &n_outs, e);
    if (rc != 0)
        goto cleanup;
    manifest_uri = storage_join(cfg->output, "_manifest.json");
    success_uri = storage_join(cfg->output, "_SUCCESS");
    if (!manifest_uri || !success_uri) {
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    if (storage_exists(manifest_uri)) {
        json_error_t jerr;
        struct buf text = {0};
        if (storage_get(manifest_uri, MANIFEST_MAX_BYTES, &text, e) == 0)
            manifest = json_loadb(text.data ? text.data : "", text.len, 0, &jerr);
        buf_release(&text);
    }
    if (!manifest || !json_is_object(json_object_get(manifest, "objects"))) {
        json_decref(manifest);
        manifest = json_pack("{s:s, s:{}}", "model", cfg->model, "objects");
    }
    objects = json_object_get(manifest, "objects");
    for (size_t i = 0; i < n_names; i++)
        if (!batch_is_reserved(names[i]))
            stats->objects_total++;
    for (size_t i = 0; rc == 0 && i < n_names; i++) {
        const char *name = names[i];
        char *in_uri, *out_uri, *err_uri, out_name[4200], err_name[4200], sha[65] = "";
        struct storage_identity input = {0};
        int64_t records = 0;
        int csv = 0;
        if (batch_is_reserved(name))
            continue;
        snprintf(out_name, sizeof(out_name), "%s%s", name, run.table ? "" : suffix);
        snprintf(err_name, sizeof(err_name), "%s.errors", name);
        in_uri = is_object ? strdup(cfg->input) : storage_join(cfg->input, name);
        out_uri = storage_join(cfg->output, out_name);
        err_uri = storage_join(cfg->output, err_name);
        if (!in_uri || !out_uri || !err_uri) {
            rc = err_set(e, ERR_NOMEM, "out of memory");
        } else if (!run.table && (rc = storage_identify(in_uri, &input, e)) != 0) {
            /* before reading: a change after this is seen by the next run */
        } else if (!run.table && already_done(objects, name, &input, out_uri)) {
            stats->objects_skipped++;
            log_info("batch", "skipped: already done", "object=%s", name);
        } else if ((rc = batch_format_of(cfg, name, &csv, e)) == 0) {
            rc = process_object(&run, in_uri, name, out_uri, err_uri, csv,
                                batch_has_name(outs, n_outs, err_name), &records, sha, e);
            if (rc == 0) {
                json_object_set_new(
                    objects, name,
                    json_pack("{s:I, s:s, s:o}", "records", (json_int_t)records, "sha256", sha,
                              "input",
                              run.table ? json_pack("{s:s}", "source", warehouse_shown(run.table))
                                        : batch_input_json(&input)));
                /* at most once a second (and at the end): with thousands of small objects,
                 * rewriting it after each would cost more than the objects; a crash then
                 * re-runs at most a second's worth of finished objects */
                if (now_s() - last_save >= 1.0) {
                    rc = save_manifest(manifest_uri, manifest, e);
                    last_save = now_s();
                    unsaved = 0;
                } else {
                    unsaved = 1;
                }
                stats->objects_done++;
            }
        }
        free(in_uri);
        free(out_uri);
        free(err_uri);
    }
    if (unsaved) {
        /* after a failure too: what finished is not run again */
        int saved = save_manifest(manifest_uri, manifest, rc == 0 ? e : &save_err);
        if (rc == 0)
            rc = saved;
    }
    if (rc == 0)
        rc = batch_remove_leftovers(cfg->output, e);
    if (rc == 0)
        rc = storage_put(success_uri, "", 0, e);
cleanup:
    if (run.parsers)
        parsers_stop(&run);
    stats->seconds = now_s() - run.started;
    if (cfg->progress_tty)
        fprintf(stderr, "\n");
    batch_keys_release(&run.keys);
    warehouse_sink_close(run.sink); /* without a commit: its rows stay for the next run */
    free(run.resume_object);
    warehouse_close(run.table);
    model_release(run.model);
    registry_destroy(reg);
    json_decref(manifest);
    storage_names_free(names, n_names);
    storage_names_free(outs, n_outs);
    free(manifest_uri);
    free(success_uri);
    pthread_mutex_destroy(&run.lock);
    pthread_cond_destroy(&run.cond);
    return rc;
}
