/*
 * inferd/backend.h: the contract between inferd and model code.
 *
 * This is the only header a backend author includes. The built-in backends (xgboost, plugin)
 * use exactly this ABI, so a user's shared object is a first-class citizen.
 *
 * Life cycle (Triton's shape):
 *
 *   init            once per process, before anything else
 *   model_create    once per loaded model version: folder + config.json text
 *   instance_create N times per model (config "instances"); each instance is driven by one
 *                   inferd thread at a time, so instance state needs no lock
 *   execute         one call per dynamic batch: an array of requests, each with its own inputs;
 *                   the backend writes each request's outputs (or an error) and returns
 *   execute_async   (API 2, optional, instead of execute) starts the requests and returns at
 *                   once; the backend finishes each one later, from any thread, with
 *                   host->request_done(). For backends that wait on something else (an
 *                   upstream server): inferd holds no thread per request in flight
 *   instance_destroy, model_destroy, fini   in reverse order
 *
 * A plugin exports one symbol, `inferd_backend_get`, returning a pointer to a static
 * `struct inferd_backend_api` whose `api_version` is INFERD_BACKEND_API_VERSION.
 *
 * Errors: functions return 0 on success and non-zero on failure, after writing one line for a
 * person into the `err` buffer they were given (at most `err_len` bytes, NUL-terminated). A
 * backend never aborts or exits on bad input: inferd maps its message to an HTTP error.
 *
 * Ownership: whoever allocates frees, because a plugin may use another allocator.
 *   - Input tensors (names, shapes, data) belong to inferd and are borrowed for the execute call.
 *   - Output buffers are allocated by inferd through `host->output_alloc` and belong to inferd;
 *     the backend fills them before execute returns and never frees them.
 *   - `struct inferd_model_info` and the strings it points to belong to the backend and stay
 *     valid until model_destroy.
 *   - State pointers (backend, model, instance) belong to the backend and are freed by its own
 *     destroy functions; inferd only hands them back.
 */
#ifndef INFERD_BACKEND_H
#define INFERD_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped on any incompatible change; inferd refuses a plugin built for another version. */
#define INFERD_BACKEND_API_VERSION 2

/* inferd also loads plugins built for API 1: every field added by API 2 is at the end of a
 * struct that inferd allocates, or read only when a plugin says api_version >= 2. */
#define INFERD_BACKEND_API_VERSION_MIN 1

/* Tensors have at most this many dimensions. */
#define INFERD_MAX_DIMS 8

/* Element types, named as in the KServe v2 protocol. */
enum inferd_datatype {
    INFERD_TYPE_INVALID = 0,
    INFERD_TYPE_BOOL,  /* 1 byte, 0 or 1 */
    INFERD_TYPE_INT32, /* little-endian */
    INFERD_TYPE_INT64,
    INFERD_TYPE_FP32,
    INFERD_TYPE_FP64,
    INFERD_TYPE_BYTES /* each element: 4-byte little-endian length, then that many bytes */
};

/* A tensor: a name, a datatype, a shape and a contiguous row-major buffer. */
struct inferd_tensor {
    const char *name;
    enum inferd_datatype datatype;
    int n_dims;
    int64_t shape[INFERD_MAX_DIMS]; /* -1 in metadata means "any size" */
    void *data;                     /* NULL when data_bytes is 0 */
    size_t data_bytes;
};

/* What a model consumes and produces, for GET /v2/models/{name} and request validation. */
struct inferd_model_info {
    const struct inferd_tensor *inputs; /* data unused: shapes and datatypes only */
    size_t n_inputs;
    const struct inferd_tensor *outputs;
    size_t n_outputs;
    const char *platform; /* e.g. "xgboost"; shown in model metadata */
    int is_batched;       /* 1: the first dimension is the batch (rows) dimension */
    /* API 2 (inferd zeroes the struct before model_create, so API 1 backends leave these 0) */
    int inputs_optional; /* 1: a request carries any non-empty subset of the inputs */
    int json_io;         /* INFERD_JSON_IO_*: whether requests may be whole JSON documents */
    int max_in_flight;   /* execute_async: requests started and not done, at most (0: 64) */
    /* API 2, optional: the names of the first input's columns as the model was trained with
     * them (inputs[0].shape[1] strings, unique, each non-empty), and their types ("float",
     * "int", "i", "q", "c": XGBoost's words); NULL when the model has none. inferd then maps
     * named records (CSV headers, JSON objects) to columns by name and lists both in the
     * model's metadata. */
    const char *const *feature_names;
    const char *const *feature_types;
};

/*
 * JSON documents. A model with json_io set also takes a request whose only input is named
 * "json" (BYTES, shape [1]) holding one JSON value of any kind, and answers it with one output
 * named "json" (BYTES, shape [1]) holding the JSON answer. inferd uses this form for what is
 * not a tensor request: such a model's request body, an async job's "input", a JSON Lines
 * batch record.
 */
#define INFERD_JSON_IO_NONE 0
#define INFERD_JSON_IO_ALSO 1 /* documents, and KServe v2 requests (a body with "inputs") */
#define INFERD_JSON_IO_ONLY 2 /* every request body is a document, forwarded as it is */
#define INFERD_JSON_NAME "json"

/* One client request inside a batch. */
struct inferd_request {
    const struct inferd_tensor *inputs; /* borrowed for the execute call */
    size_t n_inputs;
    void *host_ctx;  /* inferd's; passed back to host->output_alloc */
    int failed;      /* set to 1 by the backend when this request alone failed */
    char error[256]; /* the reason, when failed */
    /* API 2: more about a failure (inferd sets 0, 1, 0 before execute) */
    int status;             /* the HTTP status that describes it: 400, 413 and 422 say the
                             * input was refused, 502 an upstream failed, 504 it timed out;
                             * 0 means 500 */
    int retryable;          /* 0: trying again cannot help (async jobs fail at once) */
    int64_t retry_after_ms; /* > 0: do not try again sooner than this */
};

/* Services inferd offers to a backend. Valid from init until fini. */
struct inferd_host {
    uint32_t api_version;
    /*
     * Allocates output `name` of `request`, `data_bytes` long, with the given datatype and
     * shape (copied). Returns the buffer to fill, owned by inferd, or NULL when out of memory.
     * Safe to call from execute on any instance thread.
     */
    void *(*output_alloc)(struct inferd_request *request, const char *name,
                          enum inferd_datatype datatype, const int64_t *shape, int n_dims,
                          size_t data_bytes);
    /* Writes one log line under the backend's name; level 0 error, 1 warn, 2 info, 3 debug. */
    void (*log)(int level, const char *backend, const char *msg);
    /* API 2, for execute_async: */
    /* Ends one started request (outputs filled, or failed set). Exactly once per request, from
     * any thread; the request and its inputs must not be touched afterwards. */
    void (*request_done)(struct inferd_request *request);
    /* 1 once nobody waits for the request any more (its job was cancelled, its client hung
     * up): the backend should stop its work and end it with request_done. Any thread. */
    int (*request_cancelled)(const struct inferd_request *request);
};

struct inferd_backend_api {
    uint32_t api_version; /* INFERD_BACKEND_API_VERSION */
    const char *name;

    /* Once per process. `host` is borrowed until fini. NULL means nothing to do. */
    int (*init)(const struct inferd_host *host, void **backend_state, char *err, size_t err_len);
    void (*fini)(void *backend_state);

    /*
     * Creates a model from its version folder and the text of its config.json (both borrowed
     * for the call). On success fills `*info` (the backend's memory, valid until model_destroy).
     */
    int (*model_create)(void *backend_state, const char *version_dir, const char *config_json,
                        void **model_state, struct inferd_model_info *info, char *err,
                        size_t err_len);
    void (*model_destroy)(void *model_state);

    /* Instance `index` (0-based) of a model. Each instance runs on one thread at a time. */
    int (*instance_create)(void *model_state, int index, void **instance_state, char *err,
                           size_t err_len);
    void (*instance_destroy)(void *instance_state);

    /*
     * Runs `n_requests` requests (the dynamic batch) whose inputs inferd already checked
     * against the model info (names, datatypes, widths). For each request the backend either
     * allocates and fills every output through host->output_alloc, or sets `failed` and
     * `error`. Returning non-zero fails every request of the batch with `err`.
     */
    int (*execute)(void *instance_state, struct inferd_request *const *requests, size_t n_requests,
                   char *err, size_t err_len);

    /*
     * API 2, optional; when set, inferd calls it instead of execute. Starts the requests and
     * returns without waiting for them; each one is then ended by host->request_done(), once,
     * possibly before this call returns. Returning non-zero means none was started: inferd
     * fails them all with `err` and request_done must not be called for them. inferd keeps
     * at most info->max_in_flight requests started and not done per model.
     */
    int (*execute_async)(void *instance_state, struct inferd_request *const *requests,
                         size_t n_requests, char *err, size_t err_len);
};

/* The symbol a plugin exports. */
typedef const struct inferd_backend_api *(*inferd_backend_get_fn)(void);
const struct inferd_backend_api *inferd_backend_get(void);

/* Bytes per element, or 0 for BYTES and INVALID. */
static inline size_t inferd_datatype_size(enum inferd_datatype t)
{
    switch (t) {
    case INFERD_TYPE_BOOL:
        return 1;
    case INFERD_TYPE_INT32:
    case INFERD_TYPE_FP32:
        return 4;
    case INFERD_TYPE_INT64:
    case INFERD_TYPE_FP64:
        return 8;
    default:
        return 0;
    }
}

#ifdef __cplusplus
}
#endif
#endif
