/*
 * stats.c: per model version statistics, served as Triton's statistics extension at
 * GET /v2/models[/{m}[/versions/{v}]]/stats.
 *
 * One entry per (model, version), created when that version loads and kept for the life of the
 * process, so the counts cover everything since start, as Triton's do. The list of entries
 * only grows: `lock` guards appending, readers walk it without the lock because an entry is
 * fully built before it is published with a release store (as metrics.c does). Counters are
 * relaxed atomics; each entry's batch sizes are a short list under the entry's own lock, taken
 * once per backend call.
 */
#define _GNU_SOURCE
#include "metrics/metrics.h"
#include "core/err.h"
#include "core/clock.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* distinct batch sizes kept per version; past it a new size is counted in execution_count
 * but gets no batch_stats entry (bounded memory whatever max_batch_size is) */
#define MAX_BATCH_SIZES 1024

struct duration {
    _Atomic uint64_t count;
    _Atomic uint64_t ns;
};

struct batch_stat {
    int64_t rows;
    uint64_t count, ns; /* guarded by the entry's batch_lock */
};

struct metrics_version {
    char *name;
    int64_t version;
    struct duration stats[METRICS_N_STATS];
    _Atomic uint64_t inference_count, execution_count;
    _Atomic uint64_t last_inference_ms; /* 0: none yet */
    pthread_mutex_t batch_lock;         /* never held across anything but the list */
    struct batch_stat *batches;         /* guarded by batch_lock; sorted by rows */
    size_t n_batches;                   /* guarded by batch_lock */
    struct metrics_version *_Atomic next;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct metrics_version *_Atomic versions; /* appended under lock, read without */

static const char *const stat_names[METRICS_N_STATS] = {
    "success", "fail", "queue", "compute_input", "compute_infer", "compute_output",
};

struct metrics_version *metrics_version_get(const char *name, int64_t version)
{
    struct metrics_version *v;

    pthread_mutex_lock(&lock);
    for (v = atomic_load(&versions); v; v = atomic_load(&v->next))
        if (v->version == version && strcmp(v->name, name) == 0)
            break;
    if (!v && (v = calloc(1, sizeof(*v)))) {
        if (!(v->name = strdup(name))) {
            free(v);
            v = NULL;
        } else {
            v->version = version;
            pthread_mutex_init(&v->batch_lock, NULL);
            atomic_store(&v->next, atomic_load(&versions));
            atomic_store_explicit(&versions, v, memory_order_release);
        }
    }
    pthread_mutex_unlock(&lock);
    return v;
}

void metrics_stat(struct metrics_version *v, enum metrics_stat s, uint64_t ns)
{
    if (!v)
        return;
    atomic_fetch_add_explicit(&v->stats[s].count, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&v->stats[s].ns, ns, memory_order_relaxed);
}

void metrics_execution(struct metrics_version *v, int64_t rows, uint64_t ns)
{
    size_t i;

    if (!v)
        return;
    atomic_fetch_add_explicit(&v->execution_count, 1, memory_order_relaxed);
    pthread_mutex_lock(&v->batch_lock);
    for (i = 0; i < v->n_batches && v->batches[i].rows < rows; i++)
        ;
    if (i == v->n_batches || v->batches[i].rows != rows) {
        struct batch_stat *p = NULL;
        if (v->n_batches < MAX_BATCH_SIZES)
            p = realloc(v->batches, (v->n_batches + 1) * sizeof(*p));
        if (p) {
            memmove(p + i + 1, p + i, (v->n_batches - i) * sizeof(*p));
            p[i] = (struct batch_stat){.rows = rows};
            v->batches = p;
            v->n_batches++;
        }
        if (!p)
            i = SIZE_MAX;
    }
    if (i != SIZE_MAX) {
        v->batches[i].count++;
        v->batches[i].ns += ns;
    }
    pthread_mutex_unlock(&v->batch_lock);
}

void metrics_inferences(struct metrics_version *v, int64_t rows)
{
    if (!v)
        return;
    atomic_fetch_add_explicit(&v->inference_count, (uint64_t)(rows > 0 ? rows : 0),
                              memory_order_relaxed);
    atomic_store_explicit(&v->last_inference_ms, (uint64_t)clock_now_ms(), memory_order_relaxed);
}

static int duration_json(struct buf *out, const char *key, uint64_t count, uint64_t ns, int first)
{
    return buf_printf(out, "%s\"%s\":{\"count\":%llu,\"ns\":%llu}", first ? "" : ",", key,
                      (unsigned long long)count, (unsigned long long)ns);
}

static int render_one(struct metrics_version *v, struct buf *out)
{
    int rc = buf_puts(out, "{\"name\":");

    if (rc == 0)
        rc = buf_json_string(out, v->name);
    if (rc == 0)
        rc = buf_printf(out,
                        ",\"version\":\"%lld\",\"last_inference\":%llu,\"inference_count\":%llu,"
                        "\"execution_count\":%llu,\"inference_stats\":{",
                        (long long)v->version,
                        (unsigned long long)atomic_load(&v->last_inference_ms),
                        (unsigned long long)atomic_load(&v->inference_count),
                        (unsigned long long)atomic_load(&v->execution_count));
    for (int s = 0; rc == 0 && s < METRICS_N_STATS; s++)
        rc = duration_json(out, stat_names[s], atomic_load(&v->stats[s].count),
                           atomic_load(&v->stats[s].ns), s == 0);
    if (rc == 0)
        rc = buf_puts(out, "},\"batch_stats\":[");
    pthread_mutex_lock(&v->batch_lock);
    for (size_t i = 0; rc == 0 && i < v->n_batches; i++) {
        rc =
            buf_printf(out, "%s{\"batch_size\":%lld,", i ? "," : "", (long long)v->batches[i].rows);
        if (rc == 0)
            rc = duration_json(out, "compute_infer", v->batches[i].count, v->batches[i].ns, 1);
        if (rc == 0)
            rc = buf_puts(out, "}");
    }
    pthread_mutex_unlock(&v->batch_lock);
    return rc ? rc : buf_puts(out, "]}");
}

static int by_name_then_version(const void *a, const void *b)
{
    const struct metrics_version *x = *(struct metrics_version *const *)a;
    const struct metrics_version *y = *(struct metrics_version *const *)b;
    int c = strcmp(x->name, y->name);

    return c ? c : (x->version > y->version) - (x->version < y->version);
}

int metrics_stats_render(const char *name, int64_t version, struct buf *out)
{
    struct metrics_version **all = NULL, *v;
    size_t n = 0, cap = 0;
    int rc = 0;

    for (v = atomic_load_explicit(&versions, memory_order_acquire); v; v = atomic_load(&v->next)) {
        if ((name && strcmp(v->name, name) != 0) || (version && v->version != version))
            continue;
        if (n == cap) {
            struct metrics_version **p = realloc(all, (cap ? cap * 2 : 16) * sizeof(*p));
            if (!p) {
                free(all);
                return ERR_NOMEM;
            }
            all = p;
            cap = cap ? cap * 2 : 16;
        }
        all[n++] = v;
    }
    if (n == 0 && name) {
        free(all);
        return ERR_NOT_FOUND;
    }
    if (n > 1)
        qsort(all, n, sizeof(*all), by_name_then_version);
    rc = buf_puts(out, "{\"model_stats\":[");
    for (size_t i = 0; rc == 0 && i < n; i++) {
        if (i)
            rc = buf_puts(out, ",");
        if (rc == 0)
            rc = render_one(all[i], out);
    }
    free(all);
    return rc ? ERR_NOMEM : buf_puts(out, "]}");
}
