/*
 * raw_predict: in-process XGBoost prediction throughput, the ceiling a
 * model server can approach.
 *
 *   build/bench_raw_predict MODEL_JSON BATCH THREADS SECONDS
 *
 * Loads MODEL_JSON with the XGBoost C API (booster nthread=1, shared by all
 * threads: gbtree inplace prediction is thread-safe), then runs THREADS
 * threads for SECONDS, each calling XGBoosterPredictFromDense on BATCH random
 * rows at a time through its own reused proxy DMatrix. Prints one
 * machine-readable line:
 *
 *   rows_per_s=N batch=B threads=T seconds=S predicts=P
 *
 * Build: cc -O2 -std=c11 bench/raw_predict.c -o build/bench_raw_predict -lxgboost -lpthread
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <xgboost/c_api.h>

#define N_POOL_ROWS 4096 /* random rows each thread cycles through */

static const char *PREDICT_CONFIG =
    "{\"type\": 0, \"training\": false, \"iteration_begin\": 0, "
    "\"iteration_end\": 0, \"strict_shape\": false, \"missing\": NaN, "
    "\"cache_id\": 0}";

static BoosterHandle g_booster;
static bst_ulong g_features;
static long g_batch;
static double g_seconds;

struct worker {
    pthread_t tid;
    unsigned seed;
    uint64_t rows;
    uint64_t predicts;
    double checksum; /* keeps the results observably used */
    int failed;
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void die_xgb(const char *what)
{
    fprintf(stderr, "raw_predict: %s failed: %s\n", what, XGBGetLastError());
    exit(1);
}

/* xorshift32, per thread */
static uint32_t next_rand(uint32_t *s)
{
    uint32_t x = *s;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return *s = x;
}

static int predict_once(DMatrixHandle proxy, const float *rows, long n, double *sum)
{
    char iface[256];
    snprintf(iface, sizeof iface,
             "{\"data\": [%" PRIuPTR ", false], \"shape\": [%ld, %" PRIu64 "], "
             "\"typestr\": \"<f4\", \"version\": 3}",
             (uintptr_t)rows, n, (uint64_t)g_features);
    const bst_ulong *shape = NULL;
    bst_ulong dim = 0;
    const float *out = NULL;
    if (XGBoosterPredictFromDense(g_booster, iface, PREDICT_CONFIG, proxy, &shape, &dim, &out) != 0)
        return -1;
    if (dim != 1 || shape[0] != (bst_ulong)n) {
        fprintf(stderr, "raw_predict: unexpected output shape (dim %" PRIu64 ")\n", (uint64_t)dim);
        return -1;
    }
    for (long i = 0; i < n; i++)
        *sum += out[i];
    return 0;
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    uint32_t rs = w->seed ? w->seed : 1;
    size_t pool_n = (size_t)N_POOL_ROWS * g_features;
    float *pool = malloc(pool_n * sizeof(float));
    if (!pool) {
        w->failed = 1;
        return NULL;
    }
    for (size_t i = 0; i < pool_n; i++) /* roughly N(0,1)-ranged values */
        pool[i] = ((float)(next_rand(&rs) % 20001) - 10000.0f) / 3333.0f;

    DMatrixHandle proxy;
    if (XGProxyDMatrixCreate(&proxy) != 0) {
        fprintf(stderr, "raw_predict: XGProxyDMatrixCreate: %s\n", XGBGetLastError());
        w->failed = 1;
        free(pool);
        return NULL;
    }
    long max_start = N_POOL_ROWS - g_batch;
    double deadline = now_s() + g_seconds;
    do {
        /* check the clock every few predicts only for tiny batches */
        for (int k = 0; k < 8; k++) {
            long start = (long)(next_rand(&rs) % (uint32_t)(max_start + 1));
            if (predict_once(proxy, pool + (size_t)start * g_features, g_batch, &w->checksum) !=
                0) {
                fprintf(stderr, "raw_predict: predict: %s\n", XGBGetLastError());
                w->failed = 1;
                goto out;
            }
            w->rows += (uint64_t)g_batch;
            w->predicts++;
        }
    } while (now_s() < deadline);
out:
    XGDMatrixFree(proxy);
    free(pool);
    return NULL;
}

static long parse_long(const char *s, const char *what, long lo, long hi)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || v < lo || v > hi) {
        fprintf(stderr, "raw_predict: bad %s '%s' (want %ld..%ld)\n", what, s, lo, hi);
        exit(2);
    }
    return v;
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: %s MODEL_JSON BATCH THREADS SECONDS\n", argv[0]);
        return 2;
    }
    const char *model = argv[1];
    g_batch = parse_long(argv[2], "batch", 1, N_POOL_ROWS);
    long threads = parse_long(argv[3], "threads", 1, 256);
    char *end;
    g_seconds = strtod(argv[4], &end);
    if (*end || !(g_seconds > 0 && g_seconds <= 3600)) {
        fprintf(stderr, "raw_predict: bad seconds '%s'\n", argv[4]);
        return 2;
    }

    if (XGBoosterCreate(NULL, 0, &g_booster) != 0)
        die_xgb("XGBoosterCreate");
    if (XGBoosterLoadModel(g_booster, model) != 0)
        die_xgb("XGBoosterLoadModel");
    if (XGBoosterSetParam(g_booster, "nthread", "1") != 0)
        die_xgb("XGBoosterSetParam(nthread)");
    if (XGBoosterGetNumFeature(g_booster, &g_features) != 0)
        die_xgb("XGBoosterGetNumFeature");
    if (g_features == 0) {
        fprintf(stderr, "raw_predict: model reports 0 features\n");
        return 1;
    }

    /* Warm-up: first predict does one-time setup (model config, predictor). */
    {
        float *row = calloc(g_features * (size_t)g_batch, sizeof(float));
        DMatrixHandle proxy;
        double sum = 0;
        if (!row || XGProxyDMatrixCreate(&proxy) != 0)
            die_xgb("warm-up setup");
        if (predict_once(proxy, row, g_batch, &sum) != 0)
            die_xgb("warm-up XGBoosterPredictFromDense");
        XGDMatrixFree(proxy);
        free(row);
    }

    struct worker *ws = calloc((size_t)threads, sizeof *ws);
    if (!ws)
        return 1;
    double t0 = now_s();
    for (long i = 0; i < threads; i++) {
        ws[i].seed = 0x9e3779b9u * (unsigned)(i + 1);
        if (pthread_create(&ws[i].tid, NULL, worker_main, &ws[i]) != 0) {
            fprintf(stderr, "raw_predict: pthread_create failed\n");
            return 1;
        }
    }
    uint64_t rows = 0, predicts = 0;
    double checksum = 0;
    int failed = 0;
    for (long i = 0; i < threads; i++) {
        pthread_join(ws[i].tid, NULL);
        rows += ws[i].rows;
        predicts += ws[i].predicts;
        checksum += ws[i].checksum;
        failed |= ws[i].failed;
    }
    double elapsed = now_s() - t0;
    if (failed)
        return 1;
    double mean = rows ? checksum / (double)rows : 0;
    printf("rows_per_s=%.0f batch=%ld threads=%ld seconds=%.2f predicts=%" PRIu64
           " mean_pred=%.4f\n",
           (double)rows / elapsed, g_batch, threads, elapsed, predicts, mean);
    XGBoosterFree(g_booster);
    free(ws);
    return 0;
}
