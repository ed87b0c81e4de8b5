/*
 * xgboost.c: the built-in XGBoost backend, on libxgboost's C API.
 *
 * One booster per model, shared by its instances: gbtree prediction is thread-safe since
 * XGBoost 1.4, and the prediction buffer XGBoost returns is thread-local to the booster, so
 * each instance copies it out before its next call. Each instance keeps one proxy DMatrix for
 * its whole life: with a NULL proxy XGBoost rebuilds a context (and reads cgroup CPU-quota
 * files) on every call, which costs about 1.4x at batch 1.
 *
 * Input width and output shape come from the model itself: the width from
 * XGBoosterGetNumFeature, the output shape from a warm-up prediction at load time, and the
 * feature names and types (a DataFrame's columns at training) from XGBoosterGetStrFeatureInfo.
 */
#include "backend/backend.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <xgboost/c_api.h>

/* "missing": NaN is what XGBoost's own bindings send; "cache_id" is required by 1.7 */
static const char predict_config[] = "{\"type\": 0, \"training\": false, \"iteration_begin\": 0, "
                                     "\"iteration_end\": 0, \"strict_shape\": false, "
                                     "\"missing\": NaN, \"cache_id\": 0}";

struct xgb_model {
    BoosterHandle booster;
    int64_t n_features;
    int64_t n_outputs; /* values per row: 1, or the number of classes */
    struct inferd_tensor input;
    struct inferd_tensor output;
    struct inferd_model_info info;
    char **feature_names; /* n_features strings, or NULL: the model has none */
    char **feature_types; /* n_features strings, or NULL */
};

struct xgb_instance {
    struct xgb_model *model;
    DMatrixHandle proxy;
    float *rows; /* the batch, concatenated; grown as needed */
    size_t rows_cap;
};

static const struct inferd_host *host;

/*
 * XGBoost's message without its "[16:43:00] ./src/common/json.cc:407: " prefix and first line
 * only: what follows is a C++ stack trace, of no use to a user.
 */
static int fail(char *err, size_t err_len, const char *what)
{
    const char *msg = XGBGetLastError(), *p, *q;

    if (msg[0] == '[' && (p = strstr(msg, "] ")) && (q = strstr(p + 2, ": ")) &&
        memchr(p + 2, ':', (size_t)(q - p - 2)) && !memchr(msg, '\n', (size_t)(q - msg)))
        msg = q + 2;
    snprintf(err, err_len, "%s: %.*s", what, (int)strcspn(msg, "\n"), msg);
    return -1;
}

static int xgb_init(const struct inferd_host *h, void **state, char *err, size_t err_len)
{
    (void)err;
    (void)err_len;
    host = h;
    *state = NULL;
    return 0;
}

/*
 * The file names a model may have, in the order they are looked for. libxgboost picks the
 * parser from the extension: ".json" is JSON text, ".ubj" is UBJSON, any other name is read as
 * either, or as the old binary format (booster.save_model("x.model") before 2.0). The last
 * three are Triton FIL's names for the same three formats.
 */
static const char *const model_names[] = {"model.json",  "model.ubj",    "model.bst",
                                          "model.bin",   "model.model",  "xgboost.json",
                                          "xgboost.ubj", "xgboost.model"};

/*
 * Checks that a ".json" or ".ubj" file holds what its name says, so that a file saved in another
 * format gets one line saying so instead of a parser's error from deep inside libxgboost.
 * JSON text starts with '{' (after blanks); UBJSON with '{' and then a length or type marker,
 * never a quote or a blank; the old binary format with neither.
 */
static int check_format(const char *path, const char *name, char *err, size_t err_len)
{
    const char *ext = strrchr(name, '.');
    int is_json = strcmp(ext, ".json") == 0, is_ubj = strcmp(ext, ".ubj") == 0;
    unsigned char head[64];
    size_t n, i = 0;
    FILE *f;

    if (!is_json && !is_ubj)
        return 0;
    f = fopen(path, "rb");
    if (!f) {
        snprintf(err, err_len, "%s: %s", name, strerror(errno));
        return -1;
    }
    n = fread(head, 1, sizeof(head), f);
    fclose(f);
    if (n == 0) {
        snprintf(err, err_len, "%s is empty", name);
        return -1;
    }
    if (is_json) {
        while (i < n && strchr(" \t\r\n", head[i]) && head[i])
            i++;
        if (i < n && head[i] == '{')
            return 0;
        snprintf(err, err_len, "%s is not JSON: was it saved in the binary format? name it %s",
                 name, strncmp(name, "xgboost.", 8) == 0 ? "xgboost.model" : "model.bin");
        return -1;
    }
    if (n >= 2 && head[0] == '{' && !(head[1] && strchr("\" \t\r\n", head[1])))
        return 0;
    if (n >= 2 && head[0] == '{')
        snprintf(err, err_len, "%s is JSON text, not UBJSON: name it %s", name,
                 strncmp(name, "xgboost.", 8) == 0 ? "xgboost.json" : "model.json");
    else
        snprintf(err, err_len, "%s is not UBJSON: was it saved in the binary format? name it %s",
                 name, strncmp(name, "xgboost.", 8) == 0 ? "xgboost.model" : "model.bin");
    return -1;
}

static int find_model_file(const char *dir, char *path, size_t path_len, char *err, size_t err_len)
{
    size_t n_names = sizeof(model_names) / sizeof(model_names[0]), off;

    for (size_t i = 0; i < n_names; i++) {
        snprintf(path, path_len, "%s/%s", dir, model_names[i]);
        if (access(path, R_OK) == 0)
            return check_format(path, model_names[i], err, err_len);
    }
    off = (size_t)snprintf(err, err_len, "no model file in the version folder (looked for");
    for (size_t i = 0; i < n_names && off < err_len; i++)
        off += (size_t)snprintf(err + off, err_len - off, "%s%s", i ? ", " : " ", model_names[i]);
    if (off < err_len)
        snprintf(err + off, err_len - off, ")");
    return -1;
}

/* Predicts one row of missing values: proves the model works and tells the output shape. */
static int warm_up(struct xgb_model *m, char *err, size_t err_len)
{
    DMatrixHandle proxy = NULL;
    float *row = malloc(sizeof(float) * (size_t)m->n_features);
    char iface[256];
    const bst_ulong *shape;
    bst_ulong dim;
    const float *result;
    int rc = -1;

    if (!row) {
        snprintf(err, err_len, "out of memory");
        return -1;
    }
    for (int64_t i = 0; i < m->n_features; i++)
        row[i] = NAN;
    snprintf(iface, sizeof(iface),
             "{\"data\": [%zu, true], \"shape\": [1, %lld], \"typestr\": \"<f4\", "
             "\"version\": 3}",
             (size_t)row, (long long)m->n_features);
    if (XGProxyDMatrixCreate(&proxy) != 0) {
        fail(err, err_len, "cannot create a proxy DMatrix");
        goto cleanup;
    }
    if (XGBoosterPredictFromDense(m->booster, iface, predict_config, proxy, &shape, &dim,
                                  &result) != 0) {
        fail(err, err_len, "warm-up prediction failed");
        goto cleanup;
    }
    if (dim == 1) {
        m->n_outputs = 1;
    } else if (dim == 2) {
        m->n_outputs = (int64_t)shape[1];
    } else {
        snprintf(err, err_len, "predictions have %llu dimensions; inferd serves 1 or 2",
                 (unsigned long long)dim);
        goto cleanup;
    }
    rc = 0;
cleanup:
    if (proxy)
        XGDMatrixFree(proxy);
    free(row);
    return rc;
}

static void free_strings(char **v, int64_t n)
{
    for (int64_t i = 0; v && i < n; i++)
        free(v[i]);
    free(v);
}

/*
 * Copies the booster's "feature_name" or "feature_type" strings (set from a pandas
 * DataFrame's columns when it was trained); `*out` stays NULL when the model has none. The
 * booster's array is thread-local and lives only until the next XGBoost call: copy at once.
 */
static int feature_info(struct xgb_model *m, const char *field, char ***out, char *err,
                        size_t err_len)
{
    const char **v = NULL;
    bst_ulong n = 0;
    char **copy;

    *out = NULL;
    if (XGBoosterGetStrFeatureInfo(m->booster, field, &n, &v) != 0)
        return fail(err, err_len, field);
    if (n == 0)
        return 0;
    if ((int64_t)n != m->n_features) {
        snprintf(err, err_len, "the model has %llu %ss for %lld features", (unsigned long long)n,
                 field, (long long)m->n_features);
        return -1;
    }
    copy = calloc((size_t)n, sizeof(*copy));
    for (bst_ulong i = 0; copy && i < n; i++) {
        if (!(copy[i] = strdup(v[i] ? v[i] : ""))) {
            free_strings(copy, (int64_t)n);
            copy = NULL;
        }
    }
    if (!copy) {
        snprintf(err, err_len, "out of memory");
        return -1;
    }
    *out = copy;
    return 0;
}

static void xgb_model_destroy(void *state)
{
    struct xgb_model *m = state;

    if (!m)
        return;
    free_strings(m->feature_names, m->n_features);
    free_strings(m->feature_types, m->n_features);
    if (m->booster)
        XGBoosterFree(m->booster);
    free(m);
}

static int read_nthread(const char *config_json, int *nthread, char *err, size_t err_len)
{
    json_error_t jerr;
    json_t *root = json_loads(config_json ? config_json : "{}", 0, &jerr);
    json_t *v;
    int rc = 0;

    *nthread = 1;
    if (!root)
        return 0; /* the registry already validated the file */
    v = json_object_get(root, "nthread");
    if (v) {
        if (!json_is_integer(v) || json_integer_value(v) < 1 || json_integer_value(v) > 256) {
            snprintf(err, err_len, "nthread: expected an integer from 1 to 256");
            rc = -1;
        } else {
            *nthread = (int)json_integer_value(v);
        }
    }
    json_decref(root);
    return rc;
}

static int xgb_model_create(void *backend_state, const char *dir, const char *config_json,
                            void **model_state, struct inferd_model_info *info, char *err,
                            size_t err_len)
{
    struct xgb_model *m = calloc(1, sizeof(*m));
    char path[4096], nthread_s[16];
    bst_ulong n_features;
    int nthread;

    (void)backend_state;
    *model_state = NULL;
    if (!m) {
        snprintf(err, err_len, "out of memory");
        return -1;
    }
    if (read_nthread(config_json, &nthread, err, err_len) != 0 ||
        find_model_file(dir, path, sizeof(path), err, err_len) != 0)
        goto fail;
    if (XGBoosterCreate(NULL, 0, &m->booster) != 0) {
        fail(err, err_len, "cannot create a booster");
        goto fail;
    }
    if (XGBoosterLoadModel(m->booster, path) != 0) {
        fail(err, err_len, strrchr(path, '/') + 1);
        goto fail;
    }
    snprintf(nthread_s, sizeof(nthread_s), "%d", nthread);
    if (XGBoosterSetParam(m->booster, "nthread", nthread_s) != 0 ||
        XGBoosterGetNumFeature(m->booster, &n_features) != 0) {
        fail(err, err_len, strrchr(path, '/') + 1);
        goto fail;
    }
    if (n_features == 0) {
        snprintf(err, err_len, "%s: the model declares 0 features", path);
        goto fail;
    }
    m->n_features = (int64_t)n_features;
    if (warm_up(m, err, err_len) != 0 ||
        feature_info(m, "feature_name", &m->feature_names, err, err_len) != 0 ||
        feature_info(m, "feature_type", &m->feature_types, err, err_len) != 0)
        goto fail;
    m->input = (struct inferd_tensor){.name = "input__0",
                                      .datatype = INFERD_TYPE_FP32,
                                      .n_dims = 2,
                                      .shape = {-1, m->n_features}};
    m->output = (struct inferd_tensor){.name = "output__0",
                                       .datatype = INFERD_TYPE_FP32,
                                       .n_dims = m->n_outputs > 1 ? 2 : 1,
                                       .shape = {-1, m->n_outputs}};
    m->info = (struct inferd_model_info){.inputs = &m->input,
                                         .n_inputs = 1,
                                         .outputs = &m->output,
                                         .n_outputs = 1,
                                         .platform = "xgboost",
                                         .is_batched = 1,
                                         .feature_names = (const char *const *)m->feature_names,
                                         .feature_types = (const char *const *)m->feature_types};
    *info = m->info;
    *model_state = m;
    return 0;
fail:
    xgb_model_destroy(m);
    return -1;
}

static int xgb_instance_create(void *model_state, int index, void **instance_state, char *err,
                               size_t err_len)
{
    struct xgb_instance *in = calloc(1, sizeof(*in));

    (void)index;
    if (!in) {
        snprintf(err, err_len, "out of memory");
        return -1;
    }
    in->model = model_state;
    if (XGProxyDMatrixCreate(&in->proxy) != 0) {
        free(in);
        return fail(err, err_len, "cannot create a proxy DMatrix");
    }
    *instance_state = in;
    return 0;
}

static void xgb_instance_destroy(void *state)
{
    struct xgb_instance *in = state;

    if (!in)
        return;
    XGDMatrixFree(in->proxy);
    free(in->rows);
    free(in);
}

/* Concatenates the batch's rows unless there is only one request (no copy then). */
static const float *gather_rows(struct xgb_instance *in, struct inferd_request *const *reqs,
                                size_t n, int64_t total_rows)
{
    size_t need = (size_t)total_rows * (size_t)in->model->n_features, off = 0;

    if (n == 1)
        return reqs[0]->inputs[0].data;
    if (need > in->rows_cap) {
        float *p = realloc(in->rows, need * sizeof(float));
        if (!p)
            return NULL;
        in->rows = p;
        in->rows_cap = need;
    }
    for (size_t i = 0; i < n; i++) {
        memcpy(in->rows + off, reqs[i]->inputs[0].data, reqs[i]->inputs[0].data_bytes);
        off += reqs[i]->inputs[0].data_bytes / sizeof(float);
    }
    return in->rows;
}

static int xgb_execute(void *instance_state, struct inferd_request *const *reqs, size_t n,
                       char *err, size_t err_len)
{
    struct xgb_instance *in = instance_state;
    struct xgb_model *m = in->model;
    int64_t total = 0, row = 0;
    const float *rows, *result;
    const bst_ulong *shape;
    bst_ulong dim;
    char iface[256];

    for (size_t i = 0; i < n; i++)
        total += reqs[i]->inputs[0].shape[0];
    if (total == 0) {
        for (size_t i = 0; i < n; i++) {
            int64_t oshape[2] = {0, m->n_outputs};
            if (!host->output_alloc(reqs[i], "output__0", INFERD_TYPE_FP32, oshape,
                                    m->output.n_dims, 0)) {
                snprintf(reqs[i]->error, sizeof(reqs[i]->error), "out of memory");
                reqs[i]->failed = 1;
            }
        }
        return 0;
    }
    rows = gather_rows(in, reqs, n, total);
    if (!rows) {
        snprintf(err, err_len, "out of memory for a batch of %lld rows", (long long)total);
        return -1;
    }
    snprintf(iface, sizeof(iface),
             "{\"data\": [%zu, true], \"shape\": [%lld, %lld], \"typestr\": \"<f4\", "
             "\"version\": 3}",
             (size_t)rows, (long long)total, (long long)m->n_features);
    if (XGBoosterPredictFromDense(m->booster, iface, predict_config, in->proxy, &shape, &dim,
                                  &result) != 0)
        return fail(err, err_len, "prediction failed");
    (void)shape;
    (void)dim;
    /* copy out now: the buffer belongs to the booster and the next call reuses it */
    for (size_t i = 0; i < n; i++) {
        int64_t r = reqs[i]->inputs[0].shape[0];
        int64_t oshape[2] = {r, m->n_outputs};
        size_t bytes = (size_t)(r * m->n_outputs) * sizeof(float);
        float *out = host->output_alloc(reqs[i], "output__0", INFERD_TYPE_FP32, oshape,
                                        m->output.n_dims, bytes);
        if (!out) {
            snprintf(reqs[i]->error, sizeof(reqs[i]->error), "out of memory for the output");
            reqs[i]->failed = 1;
        } else {
            memcpy(out, result + row * m->n_outputs, bytes);
        }
        row += r;
    }
    return 0;
}

static const struct inferd_backend_api xgboost_api = {
    .api_version = INFERD_BACKEND_API_VERSION,
    .name = "xgboost",
    .init = xgb_init,
    .model_create = xgb_model_create,
    .model_destroy = xgb_model_destroy,
    .instance_create = xgb_instance_create,
    .instance_destroy = xgb_instance_destroy,
    .execute = xgb_execute,
};

const struct inferd_backend_api *backend_xgboost(void)
{
    return &xgboost_api;
}
