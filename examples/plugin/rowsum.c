/*
 * rowsum.c: a complete inferd backend plugin, as small as one can be.
 *
 * The model sums each row of its FP32 input: input "input__0" of shape [-1, width], output
 * "output__0" of shape [-1]. `width` comes from config.json's "parameters" (default 4). It
 * shows every part of the ABI: init, model and instance life cycle, a batched execute that
 * writes each request's outputs through the host's allocator, and errors as messages: a
 * request whose first value is -999 fails alone ("poison value"), the rest of its batch
 * succeeds; one whose first value is -998 makes the instance sleep for its second value in
 * milliseconds first (a slow model, for tests); one whose first value is -997 holds the
 * instance until the file "<hold_dir>/release-<second value>" exists or the request is
 * cancelled (a model held by a test until it lets it go; "hold_dir" is a parameter too), and
 * -996 does the same but ignores cancellation (a model that cannot be stopped).
 *
 * Build: cc -shared -fPIC -I include examples/plugin/rowsum.c -o librowsum.so
 * Use:   {"backend": "plugin", "path": "/abs/path/librowsum.so", "parameters": {"width": 4}}
 */
#include "inferd/backend.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define HOLD_MAX_MS (600 * 1000) /* a forgotten hold ends anyway */

struct rowsum_model {
    struct inferd_tensor input, output;
    int64_t width;
    char hold_dir[PATH_MAX]; /* "" when the parameter is absent: -997 holds nothing */
};

static const struct inferd_host *host;

static int rs_init(const struct inferd_host *h, void **state, char *err, size_t err_len)
{
    (void)err;
    (void)err_len;
    host = h;
    *state = NULL;
    return 0;
}

/* Finds "width": N in the config text; a real plugin would use a JSON library. */
static int64_t read_width(const char *config)
{
    const char *p = config ? strstr(config, "\"width\"") : NULL;

    if (!p || !(p = strchr(p, ':')))
        return 4;
    return strtoll(p + 1, NULL, 10);
}

/* Finds "hold_dir": "PATH" (no escapes) in the config text; "" when absent. */
static void read_hold_dir(const char *config, char *out, size_t len)
{
    const char *p = config ? strstr(config, "\"hold_dir\"") : NULL, *end;

    out[0] = '\0';
    if (!p || !(p = strchr(p + 10, '"')) || !(end = strchr(p + 1, '"')))
        return;
    snprintf(out, len, "%.*s", (int)(end - p - 1), p + 1);
}

/* Holds until the release file appears; 0 then, -1 if the request was cancelled first (when
 * `req` is not NULL). */
static int hold(const struct rowsum_model *m, long n, const struct inferd_request *req)
{
    char path[PATH_MAX + 32];
    struct timespec tick = {0, 10 * 1000000L};

    snprintf(path, sizeof(path), "%s/release-%ld", m->hold_dir, n);
    for (int waited = 0; m->hold_dir[0] && waited < HOLD_MAX_MS; waited += 10) {
        if (access(path, F_OK) == 0)
            return 0;
        if (req && host->api_version >= 2 && host->request_cancelled &&
            host->request_cancelled(req))
            return -1;
        nanosleep(&tick, NULL);
    }
    return 0;
}

static int rs_model_create(void *backend_state, const char *dir, const char *config,
                           void **model_state, struct inferd_model_info *info, char *err,
                           size_t err_len)
{
    struct rowsum_model *m;
    int64_t width = read_width(config);

    (void)backend_state;
    (void)dir;
    if (width < 1 || width > 1 << 20) {
        snprintf(err, err_len, "parameters.width: %lld is out of range 1..1048576",
                 (long long)width);
        return -1;
    }
    m = calloc(1, sizeof(*m));
    if (!m) {
        snprintf(err, err_len, "out of memory");
        return -1;
    }
    m->width = width;
    read_hold_dir(config, m->hold_dir, sizeof(m->hold_dir));
    m->input = (struct inferd_tensor){
        .name = "input__0", .datatype = INFERD_TYPE_FP32, .n_dims = 2, .shape = {-1, width}};
    m->output = (struct inferd_tensor){
        .name = "output__0", .datatype = INFERD_TYPE_FP32, .n_dims = 1, .shape = {-1}};
    *info = (struct inferd_model_info){.inputs = &m->input,
                                       .n_inputs = 1,
                                       .outputs = &m->output,
                                       .n_outputs = 1,
                                       .platform = "rowsum",
                                       .is_batched = 1};
    *model_state = m;
    return 0;
}

static void rs_model_destroy(void *state)
{
    free(state);
}

static int rs_instance_create(void *model_state, int index, void **instance_state, char *err,
                              size_t err_len)
{
    (void)index;
    (void)err;
    (void)err_len;
    *instance_state = model_state; /* stateless: instances share the model */
    return 0;
}

static int rs_execute(void *instance_state, struct inferd_request *const *reqs, size_t n, char *err,
                      size_t err_len)
{
    struct rowsum_model *m = instance_state;

    (void)err;
    (void)err_len;
    for (size_t i = 0; i < n; i++) {
        const struct inferd_tensor *in = &reqs[i]->inputs[0];
        int64_t rows = in->shape[0];
        const float *x = in->data;
        float *y;
        if (rows > 0 && m->width >= 2 && x[0] == -998.0f) {
            /* a slow model, for tests: sleep x[1] milliseconds, then answer as usual */
            struct timespec ts = {(time_t)(x[1] / 1000), (long)((long)x[1] % 1000) * 1000000L};
            nanosleep(&ts, NULL);
        }
        if (rows > 0 && m->width >= 2 && x[0] == -996.0f)
            hold(m, (long)x[1], NULL);
        if (rows > 0 && m->width >= 2 && x[0] == -997.0f && hold(m, (long)x[1], reqs[i]) != 0) {
            snprintf(reqs[i]->error, sizeof(reqs[i]->error), "cancelled while held");
            reqs[i]->status = 499;
            reqs[i]->failed = 1;
            continue;
        }
        if (rows > 0 && x[0] == -999.0f) {
            /* a way for tests to make one request of a batch fail: the poison value */
            snprintf(reqs[i]->error, sizeof(reqs[i]->error), "poison value -999 in row 0");
            reqs[i]->failed = 1;
            continue;
        }
        y = host->output_alloc(reqs[i], "output__0", INFERD_TYPE_FP32, &rows, 1,
                               (size_t)rows * sizeof(float));
        if (!y) {
            snprintf(reqs[i]->error, sizeof(reqs[i]->error), "out of memory");
            reqs[i]->failed = 1;
            continue;
        }
        for (int64_t r = 0; r < rows; r++) {
            float s = 0;
            for (int64_t c = 0; c < m->width; c++)
                s += x[r * m->width + c];
            y[r] = s;
        }
    }
    return 0;
}

static const struct inferd_backend_api api = {
    .api_version = INFERD_BACKEND_API_VERSION,
    .name = "rowsum",
    .init = rs_init,
    .model_create = rs_model_create,
    .model_destroy = rs_model_destroy,
    .instance_create = rs_instance_create,
    .execute = rs_execute,
};

const struct inferd_backend_api *inferd_backend_get(void)
{
    return &api;
}
