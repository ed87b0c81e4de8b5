/*
 * codec.c: KServe v2 / v1 JSON (and the v2 binary tensor extension) to struct infer_request and
 * back.
 *
 * Requests are parsed with simdjson (core/jdoc.h: a single-row request in well under a
 * microsecond); responses are written by hand into a struct buf because they are flat and large
 * arrays of numbers are the hot path. Every error names the field; an error about text read
 * from a location (CODEC_FROM_STORE: a job's input_location) quotes none of it, neither a value
 * nor a name, so a job cannot be used to read a file it has no business reading.
 */
#include "kserve/codec.h"

#include "core/jdoc.h"

#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Nesting deeper than this in "data" cannot match any shape we accept. */
#define DATA_MAX_DEPTH (INFERD_MAX_DIMS + 1)

/* A string member with no NUL byte in it (names, ids, datatypes), or NULL. */
static const char *plain_string(const struct jdoc_val *v)
{
    size_t len;
    const char *s = jdoc_string(v, &len);

    return s && strlen(s) == len ? s : NULL;
}

/* ---- decoding "data" ---- */

struct data_walk {
    struct inferd_tensor *t;
    size_t idx;       /* elements written so far */
    size_t n_expect;  /* elements the shape declares */
    size_t bytes_len; /* BYTES: bytes used in t->data */
    size_t bytes_cap;
    int field_index; /* inputs[i] */
    int quote;       /* an error may show the value (the client sent it) */
};

/* `d` as an error message shows it: its value if the client sent it, else "the value" */
static const char *shown(const struct data_walk *w, double d, char *buf, size_t size)
{
    if (!w->quote)
        return "the value";
    snprintf(buf, size, "%g", d);
    return buf;
}

static int store_number(struct data_walk *w, const struct jdoc_val *v, struct err *e)
{
    struct inferd_tensor *t = w->t;
    char num[32];
    double d;
    int64_t n;

    switch (jdoc_type(v)) {
    case JDOC_NULL:
        if (t->datatype != INFERD_TYPE_FP32 && t->datatype != INFERD_TYPE_FP64)
            return err_set(e, ERR_SHAPE,
                           "inputs[%d].data[%zu]: null (missing) is only allowed for FP32 and "
                           "FP64",
                           w->field_index, w->idx);
        d = NAN;
        break;
    case JDOC_BOOL:
        if (t->datatype != INFERD_TYPE_BOOL)
            return err_set(e, ERR_SHAPE, "inputs[%d].data[%zu]: expected a number, got a boolean",
                           w->field_index, w->idx);
        d = jdoc_is_true(v) ? 1.0 : 0.0;
        break;
    case JDOC_INT:
        n = jdoc_int(v);
        if (t->datatype == INFERD_TYPE_INT64) {
            ((int64_t *)t->data)[w->idx] = n;
            return 0;
        }
        if (t->datatype == INFERD_TYPE_INT32 && (n < INT32_MIN || n > INT32_MAX)) {
            snprintf(num, sizeof(num), "%lld", (long long)n);
            return err_set(e, ERR_SHAPE, "inputs[%d].data[%zu]: %s does not fit in INT32",
                           w->field_index, w->idx, w->quote ? num : "the value");
        }
        if (t->datatype == INFERD_TYPE_BOOL && n != 0 && n != 1)
            return err_set(e, ERR_SHAPE,
                           "inputs[%d].data[%zu]: BOOL values are 0, 1, true or false",
                           w->field_index, w->idx);
        d = (double)n;
        break;
    case JDOC_REAL:
        d = jdoc_number(v);
        if (t->datatype != INFERD_TYPE_FP32 && t->datatype != INFERD_TYPE_FP64)
            return err_set(e, ERR_SHAPE, "inputs[%d].data[%zu]: %s is not an integer (%s)",
                           w->field_index, w->idx, shown(w, d, num, sizeof(num)),
                           t->datatype == INFERD_TYPE_BOOL    ? "BOOL"
                           : t->datatype == INFERD_TYPE_INT32 ? "INT32"
                                                              : "INT64 or out of its range");
        break;
    default:
        return err_set(e, ERR_SHAPE, "inputs[%d].data[%zu]: expected a number, got %s",
                       w->field_index, w->idx,
                       jdoc_type(v) == JDOC_STRING ? "a string" : "an object");
    }
    switch (t->datatype) {
    case INFERD_TYPE_BOOL:
        ((uint8_t *)t->data)[w->idx] = d != 0.0;
        break;
    case INFERD_TYPE_INT32:
        ((int32_t *)t->data)[w->idx] = (int32_t)d;
        break;
    case INFERD_TYPE_INT64:
        ((int64_t *)t->data)[w->idx] = (int64_t)d;
        break;
    case INFERD_TYPE_FP32:
        if (isfinite(d) && isinf((float)d))
            return err_set(e, ERR_SHAPE, "inputs[%d].data[%zu]: %s does not fit in FP32",
                           w->field_index, w->idx, shown(w, d, num, sizeof(num)));
        ((float *)t->data)[w->idx] = (float)d;
        break;
    default:
        ((double *)t->data)[w->idx] = d;
        break;
    }
    return 0;
}

static int store_bytes(struct data_walk *w, const struct jdoc_val *v, struct err *e)
{
    const char *s;
    size_t len = 0, need;

    s = jdoc_string(v, &len);
    if (!s)
        return err_set(e, ERR_SHAPE, "inputs[%d].data[%zu]: BYTES elements are strings",
                       w->field_index, w->idx);
    if (len > UINT32_MAX)
        return err_set(e, ERR_TOO_LARGE, "inputs[%d].data[%zu]: string too long", w->field_index,
                       w->idx);
    need = w->bytes_len + 4 + len;
    if (need > w->bytes_cap) {
        size_t cap = w->bytes_cap ? w->bytes_cap * 2 : 256;
        void *p;
        while (cap < need)
            cap *= 2;
        p = realloc(w->t->data, cap);
        if (!p)
            return err_set(e, ERR_NOMEM, "out of memory");
        w->t->data = p;
        w->bytes_cap = cap;
    }
    uint32_t len32 = (uint32_t)len;
    unsigned char *dst = (unsigned char *)w->t->data + w->bytes_len;
    dst[0] = (unsigned char)(len32 & 0xff);
    dst[1] = (unsigned char)((len32 >> 8) & 0xff);
    dst[2] = (unsigned char)((len32 >> 16) & 0xff);
    dst[3] = (unsigned char)((len32 >> 24) & 0xff);
    memcpy(dst + 4, s, len);
    w->bytes_len = need;
    return 0;
}

static int walk_data(struct data_walk *w, const struct jdoc_val *v, int depth, struct err *e)
{
    struct jdoc_iter it;
    struct jdoc_val item;
    int rc;

    if (jdoc_type(v) == JDOC_ARRAY) {
        if (depth >= DATA_MAX_DEPTH)
            return err_set(e, ERR_SHAPE, "inputs[%d].data: nested deeper than %d levels",
                           w->field_index, DATA_MAX_DEPTH);
        for (jdoc_iter_init(v, &it); jdoc_iter_next(&it, &item);) {
            rc = walk_data(w, &item, depth + 1, e);
            if (rc != 0)
                return rc;
        }
        return 0;
    }
    if (depth == 0)
        return err_set(e, ERR_INVALID, "inputs[%d].data: expected a list", w->field_index);
    if (w->idx >= w->n_expect)
        return err_set(e, ERR_SHAPE,
                       "inputs[%d].data: more than the %zu elements its shape declares",
                       w->field_index, w->n_expect);
    rc = w->t->datatype == INFERD_TYPE_BYTES ? store_bytes(w, v, e) : store_number(w, v, e);
    if (rc == 0)
        w->idx++;
    return rc;
}

/* Elements in a (nested) list, or SIZE_MAX when nested too deep. */
static size_t count_leaves(const struct jdoc_val *v, int depth)
{
    struct jdoc_iter it;
    struct jdoc_val item;
    size_t n = 0, sub;

    if (jdoc_type(v) != JDOC_ARRAY)
        return 1;
    if (depth >= DATA_MAX_DEPTH)
        return SIZE_MAX;
    for (jdoc_iter_init(v, &it); jdoc_iter_next(&it, &item);) {
        if (jdoc_type(&item) != JDOC_ARRAY) { /* a flat list: the rest are counted at once */
            n++;
            continue;
        }
        sub = count_leaves(&item, depth + 1);
        if (sub == SIZE_MAX)
            return SIZE_MAX;
        n += sub;
    }
    return n;
}

/* ---- decoding a request ---- */

struct binary_section {
    const unsigned char *data;
    size_t len;
    size_t used;
};

static int decode_shape(const struct jdoc_val *shape, struct inferd_tensor *t, int idx,
                        struct err *e)
{
    struct jdoc_iter it;
    struct jdoc_val dim;
    size_t i = 0, n = jdoc_size(shape);

    if (jdoc_type(shape) != JDOC_ARRAY)
        return err_set(e, ERR_INVALID, "inputs[%d].shape: expected a list of integers", idx);
    if (n > INFERD_MAX_DIMS)
        return err_set(e, ERR_SHAPE, "inputs[%d].shape: %zu dimensions, limit is %d", idx, n,
                       INFERD_MAX_DIMS);
    for (jdoc_iter_init(shape, &it); jdoc_iter_next(&it, &dim); i++) {
        if (jdoc_type(&dim) != JDOC_INT || jdoc_int(&dim) < 0)
            return err_set(e, ERR_INVALID, "inputs[%d].shape[%zu]: expected an integer >= 0", idx,
                           i);
        t->shape[i] = jdoc_int(&dim);
    }
    t->n_dims = (int)n;
    return 0;
}

/* Binary tensor data holds what its shape says: BOOL bytes are 0 or 1, and BYTES is exactly
 * `count` elements of a 4-byte length and that many bytes. */
static int check_binary(const struct inferd_tensor *t, int idx, size_t count, struct err *e)
{
    const unsigned char *p = t->data, *end = p + t->data_bytes;
    size_t n = 0;

    if (t->datatype == INFERD_TYPE_BOOL) {
        for (size_t i = 0; i < t->data_bytes; i++)
            if (p[i] > 1)
                return err_set(e, ERR_SHAPE, "inputs[%d]: BOOL byte %zu is %u, not 0 or 1", idx,
                               i, p[i]);
        return 0;
    }
    if (t->datatype != INFERD_TYPE_BYTES)
        return 0;
    while (end - p >= 4) {
        uint32_t len =
            (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
        if (len > (size_t)(end - p - 4))
            break;
        p += 4 + len;
        n++;
    }
    if (p != end || n != count)
        return err_set(e, ERR_SHAPE,
                       "inputs[%d]: binary BYTES data holds %zu whole elements%s, shape "
                       "declares %zu",
                       idx, n, p != end ? " and a cut-off one" : "", count);
    return 0;
}

static int decode_input(const struct jdoc_val *in, int idx, struct binary_section *bin, int quote,
                        struct inferd_tensor *t, struct err *e)
{
    struct jdoc_val name, dt, shape, data, params, bsize;
    const char *name_s, *dt_s;
    int64_t count;
    size_t elem, nbytes;
    int rc, has_bsize;

    if (jdoc_type(in) != JDOC_OBJECT)
        return err_set(e, ERR_INVALID, "inputs[%d]: expected an object", idx);
    name_s = jdoc_get(in, "name", &name) ? plain_string(&name) : NULL;
    dt_s = jdoc_get(in, "datatype", &dt) ? plain_string(&dt) : NULL;
    if (!name_s || !*name_s)
        return err_set(e, ERR_INVALID, "inputs[%d].name: missing or not a string", idx);
    if (!dt_s)
        return err_set(e, ERR_INVALID, "inputs[%d].datatype: missing or not a string", idx);
    if (!jdoc_get(in, "shape", &shape))
        return err_set(e, ERR_INVALID, "inputs[%d].shape: missing", idx);
    t->name = strdup(name_s);
    if (!t->name)
        return err_set(e, ERR_NOMEM, "out of memory");
    t->datatype = tensor_datatype_parse(dt_s);
    if (t->datatype == INFERD_TYPE_INVALID && !quote)
        return err_set(e, ERR_SHAPE,
                       "inputs[%d].datatype: unknown datatype (BOOL, INT32, INT64, FP32, FP64 or "
                       "BYTES)",
                       idx);
    if (t->datatype == INFERD_TYPE_INVALID)
        return err_set(e, ERR_SHAPE,
                       "inputs[%d].datatype: unknown datatype '%.32s' (BOOL, INT32, INT64, FP32, "
                       "FP64 or BYTES)",
                       idx, dt_s);
    rc = decode_shape(&shape, t, idx, e);
    if (rc != 0)
        return rc;
    count = tensor_element_count(t->shape, t->n_dims);
    elem = inferd_datatype_size(t->datatype);
    if (count < 0 || (elem && (uint64_t)count > SIZE_MAX / 2 / elem))
        return err_set(e, ERR_SHAPE, "inputs[%d].shape: too many elements", idx);
    has_bsize = jdoc_get(in, "parameters", &params) && jdoc_get(&params, "binary_data_size", &bsize);
    if (has_bsize) {
        if (jdoc_type(&bsize) != JDOC_INT || jdoc_int(&bsize) < 0)
            return err_set(e, ERR_INVALID,
                           "inputs[%d].parameters.binary_data_size: expected an integer >= 0", idx);
        if ((uint64_t)jdoc_int(&bsize) > SIZE_MAX)
            return err_set(e, ERR_INVALID,
                           "inputs[%d].parameters.binary_data_size: larger than the body", idx);
        nbytes = (size_t)jdoc_int(&bsize);
        if (!bin->data)
            return err_set(e, ERR_INVALID,
                           "inputs[%d]: binary_data_size given but the request has no "
                           "Inference-Header-Content-Length header",
                           idx);
        if (nbytes > bin->len - bin->used)
            return err_set(e, ERR_INVALID,
                           "inputs[%d].parameters.binary_data_size: %zu bytes, only %zu left in "
                           "the body",
                           idx, nbytes, bin->len - bin->used);
        if (elem && nbytes != (size_t)count * elem)
            return err_set(e, ERR_SHAPE,
                           "inputs[%d]: binary_data_size is %zu bytes, shape and datatype need %zu",
                           idx, nbytes, (size_t)count * elem);
        t->data = malloc(nbytes ? nbytes : 1);
        if (!t->data)
            return err_set(e, ERR_NOMEM, "out of memory");
        memcpy(t->data, bin->data + bin->used, nbytes);
        t->data_bytes = nbytes;
        bin->used += nbytes;
        return check_binary(t, idx, (size_t)count, e);
    }
    if (!jdoc_get(in, "data", &data))
        return err_set(e, ERR_INVALID, "inputs[%d].data: missing", idx);
    if (jdoc_type(&data) != JDOC_ARRAY)
        return err_set(e, ERR_INVALID, "inputs[%d].data: expected a list", idx);
    /* count first: the shape is only a claim, the JSON text bounds what we allocate */
    size_t n_leaves = count_leaves(&data, 0);
    if (n_leaves == SIZE_MAX)
        return err_set(e, ERR_SHAPE, "inputs[%d].data: nested deeper than %d levels", idx,
                       DATA_MAX_DEPTH);
    if (n_leaves != (size_t)count)
        return err_set(e, ERR_SHAPE, "inputs[%d].data: %zu elements, shape declares %lld", idx,
                       n_leaves, (long long)count);
    if (elem) {
        t->data = calloc((size_t)count ? (size_t)count : 1, elem);
        if (!t->data)
            return err_set(e, ERR_TOO_LARGE, "inputs[%d].shape: too many elements", idx);
    }
    struct data_walk w = {.t = t, .n_expect = (size_t)count, .field_index = idx, .quote = quote};
    rc = walk_data(&w, &data, 0, e);
    if (rc != 0)
        return rc;
    if (w.idx != (size_t)count)
        return err_set(e, ERR_SHAPE, "inputs[%d].data: %zu elements, shape declares %lld", idx,
                       w.idx, (long long)count);
    t->data_bytes = elem ? (size_t)count * elem : w.bytes_len;
    return 0;
}

static int decode_outputs(const struct jdoc_val *root, struct infer_request *r, struct err *e)
{
    struct jdoc_val outputs, o, name, params, binary;
    struct jdoc_iter it;
    const char *name_s;
    size_t i = 0;

    if (!jdoc_get(root, "outputs", &outputs))
        return 0;
    if (jdoc_type(&outputs) != JDOC_ARRAY)
        return err_set(e, ERR_INVALID, "outputs: expected a list");
    if (jdoc_size(&outputs) > TENSOR_MAX_IO)
        return err_set(e, ERR_INVALID, "outputs: more than %d entries", TENSOR_MAX_IO);
    for (jdoc_iter_init(&outputs, &it); jdoc_iter_next(&it, &o); i++) {
        name_s = jdoc_get(&o, "name", &name) ? plain_string(&name) : NULL;
        if (!name_s)
            return err_set(e, ERR_INVALID, "outputs[%zu].name: missing or not a string", i);
        r->requested_outputs[r->n_requested_outputs] = strdup(name_s);
        if (!r->requested_outputs[r->n_requested_outputs])
            return err_set(e, ERR_NOMEM, "out of memory");
        r->n_requested_outputs++;
        if (jdoc_get(&o, "parameters", &params) && jdoc_get(&params, "binary_data", &binary) &&
            jdoc_is_true(&binary)) {
            r->binary_outputs[r->n_binary_outputs] = strdup(name_s);
            if (!r->binary_outputs[r->n_binary_outputs])
                return err_set(e, ERR_NOMEM, "out of memory");
            r->n_binary_outputs++;
        }
    }
    return 0;
}

static int decode_parameters(const struct jdoc_val *root, struct infer_request *r,
                             struct err *e)
{
    struct jdoc_val params, timeout, bin;

    if (!jdoc_get(root, "parameters", &params))
        return 0;
    if (jdoc_type(&params) != JDOC_OBJECT)
        return err_set(e, ERR_INVALID, "parameters: expected an object");
    if (jdoc_get(&params, "timeout", &timeout)) {
        if (jdoc_type(&timeout) != JDOC_INT || jdoc_int(&timeout) < 0)
            return err_set(e, ERR_INVALID,
                           "parameters.timeout: expected microseconds as an integer >= 0");
        r->timeout_us = (uint64_t)jdoc_int(&timeout);
    }
    if (jdoc_get(&params, "binary_data_output", &bin)) {
        if (jdoc_type(&bin) != JDOC_BOOL)
            return err_set(e, ERR_INVALID,
                           "parameters.binary_data_output: expected true or false");
        r->binary_output_all = jdoc_is_true(&bin);
    }
    return 0;
}

/* Parses a request body that must be a JSON object (jdoc_done() when finished with it). */
static int load_json(const char *body, size_t len, enum codec_origin origin, struct jdoc_val *root,
                     struct err *e)
{
    int rc = jdoc_parse(body, len, origin == CODEC_FROM_STORE ? JDOC_STORED : 0, root, e);

    if (rc == 0 && jdoc_type(root) != JDOC_OBJECT)
        rc = err_set(e, ERR_INVALID, "the request %smust be a JSON object",
                     origin == CODEC_FROM_CLIENT ? "body " : "");
    return rc;
}

/* The request's "id": any JSON string, \u0000 included (it is echoed back escaped). */
static int decode_id(const struct jdoc_val *root, struct infer_request *r, struct err *e)
{
    struct jdoc_val id;
    const char *s;
    size_t len = 0;

    if (!jdoc_get(root, "id", &id))
        return 0;
    s = jdoc_string(&id, &len);
    if (!s)
        return err_set(e, ERR_INVALID, "id: expected a string");
    r->id = malloc(len + 1);
    if (!r->id)
        return err_set(e, ERR_NOMEM, "out of memory");
    memcpy(r->id, s, len + 1);
    r->id_len = len;
    return 0;
}

static int decode_v2(const char *body, size_t body_len, int64_t json_len, enum codec_origin origin,
                     struct infer_request **out, struct err *e)
{
    struct infer_request *r = NULL;
    struct binary_section bin = {0};
    struct jdoc_val root, inputs, item;
    struct jdoc_iter it;
    size_t i = 0, n_inputs;
    int rc;

    *out = NULL;
    if (json_len >= 0) {
        if ((uint64_t)json_len > body_len)
            return err_set(e, ERR_INVALID,
                           "Inference-Header-Content-Length is %lld, the body has only %zu bytes",
                           (long long)json_len, body_len);
        bin.data = (const unsigned char *)body + json_len;
        bin.len = body_len - (size_t)json_len;
        body_len = (size_t)json_len;
    }
    rc = load_json(body, body_len, origin, &root, e);
    if (rc != 0)
        goto cleanup;
    r = calloc(1, sizeof(*r));
    if (!r) {
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    r->is_stored = origin == CODEC_FROM_STORE;
    rc = decode_id(&root, r, e);
    if (rc == 0)
        rc = decode_parameters(&root, r, e);
    if (rc == 0)
        rc = decode_outputs(&root, r, e);
    if (rc != 0)
        goto cleanup;
    if (!jdoc_get(&root, "inputs", &inputs) || jdoc_type(&inputs) != JDOC_ARRAY ||
        (n_inputs = jdoc_size(&inputs)) == 0) {
        rc = err_set(e, ERR_INVALID, "inputs: missing, empty or not a list");
        goto cleanup;
    }
    if (n_inputs > TENSOR_MAX_IO) {
        rc = err_set(e, ERR_INVALID, "inputs: %zu tensors, limit is %d", n_inputs, TENSOR_MAX_IO);
        goto cleanup;
    }
    for (jdoc_iter_init(&inputs, &it); jdoc_iter_next(&it, &item); i++) {
        r->n_inputs = i + 1; /* so that cleanup frees a half-decoded tensor */
        rc = decode_input(&item, (int)i, &bin, !r->is_stored, &r->inputs[i], e);
        if (rc != 0)
            goto cleanup;
    }
    if (bin.data && bin.used != bin.len) {
        rc = err_set(e, ERR_INVALID,
                     "the body has %zu bytes of binary data that no input's binary_data_size "
                     "claims",
                     bin.len - bin.used);
        goto cleanup;
    }
    infer_request_bind(r);
    *out = r;
    r = NULL;
    rc = 0;
cleanup:
    infer_request_destroy(r);
    jdoc_done();
    return rc;
}

int codec_decode_v2(const char *body, size_t body_len, int64_t json_len, struct infer_request **out,
                    struct err *e)
{
    return decode_v2(body, body_len, json_len, CODEC_FROM_CLIENT, out, e);
}

/* One v1 instance that is a JSON object: its members mapped to columns by feature name. */
static int v1_object_row(const struct jdoc_val *row, size_t i, const struct features *f,
                         double *out, unsigned char *seen, struct err *e)
{
    struct jdoc_iter it;
    struct jdoc_val v;
    const char *key;
    size_t key_len;

    memset(seen, 0, f->n);
    for (jdoc_members_init(row, &it); jdoc_members_next(&it, &key, &key_len, &v);) {
        int64_t col = features_find(f, key, key_len);
        enum jdoc_type type = jdoc_type(&v);
        if (col < 0)
            return err_set(e, ERR_SHAPE,
                           "instances[%zu]: '%.64s' is not one of the model's %zu "
                           "feature names",
                           i, key, f->n);
        if (type == JDOC_INT || type == JDOC_REAL)
            out[col] = jdoc_number(&v);
        else if (type == JDOC_NULL)
            out[col] = NAN;
        else
            return err_set(e, ERR_SHAPE, "instances[%zu].%.64s: expected a number", i, key);
        seen[col] = 1;
    }
    for (size_t j = 0; j < f->n; j++)
        if (!seen[j])
            return err_set(e, ERR_SHAPE, "instances[%zu]: missing feature '%.64s'", i, f->names[j]);
    return 0;
}

int codec_decode_v1(const char *body, size_t body_len, const char *input_name,
                    const struct features *f, struct infer_request **out, struct err *e)
{
    struct infer_request *r = NULL;
    struct jdoc_val root, instances, row, v;
    struct jdoc_iter rows, cols;
    size_t n_rows, width = 0, i = 0, j;
    unsigned char *seen = NULL;
    int objects;
    double *data;
    int rc;

    *out = NULL;
    rc = load_json(body, body_len, CODEC_FROM_CLIENT, &root, e);
    if (rc != 0)
        goto cleanup;
    if (!jdoc_get(&root, "instances", &instances) || jdoc_type(&instances) != JDOC_ARRAY ||
        (n_rows = jdoc_size(&instances)) == 0) {
        rc = err_set(e, ERR_INVALID, "instances: missing, empty or not a list");
        goto cleanup;
    }
    jdoc_iter_init(&instances, &rows);
    jdoc_iter_next(&rows, &row);
    objects = jdoc_type(&row) == JDOC_OBJECT;
    if (!objects && jdoc_type(&row) != JDOC_ARRAY) {
        rc = err_set(e, ERR_INVALID,
                     "instances[0]: expected a list of numbers or an object of features");
        goto cleanup;
    }
    if (objects && (!f || f->n == 0)) {
        rc = err_set(e, ERR_INVALID,
                     "instances[0]: an object, but the model has no feature "
                     "names: send each instance as a list of numbers");
        goto cleanup;
    }
    width = objects ? f->n : jdoc_size(&row);
    if (width && n_rows > SIZE_MAX / sizeof(double) / width) {
        rc = err_set(e, ERR_TOO_LARGE, "instances: too many values");
        goto cleanup;
    }
    r = calloc(1, sizeof(*r));
    if (!r || !(r->inputs[0].name = strdup(input_name)) || (objects && !(seen = malloc(width)))) {
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    r->n_inputs = 1;
    r->inputs[0].datatype = INFERD_TYPE_FP64;
    r->inputs[0].n_dims = 2;
    r->inputs[0].shape[0] = (int64_t)n_rows;
    r->inputs[0].shape[1] = (int64_t)width;
    data = calloc(n_rows * width > 0 ? n_rows * width : 1, sizeof(double));
    if (!data) {
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    r->inputs[0].data = data;
    r->inputs[0].data_bytes = n_rows * width * sizeof(double);
    for (jdoc_iter_init(&instances, &rows); jdoc_iter_next(&rows, &row); i++) {
        if (objects) {
            if (jdoc_type(&row) != JDOC_OBJECT) {
                rc = err_set(e, ERR_SHAPE, "instances[%zu]: expected an object like instances[0]",
                             i);
                goto cleanup;
            }
            rc = v1_object_row(&row, i, f, data + i * width, seen, e);
            if (rc != 0)
                goto cleanup;
            continue;
        }
        if (jdoc_type(&row) != JDOC_ARRAY || jdoc_size(&row) != width) {
            rc = err_set(e, ERR_SHAPE,
                         "instances[%zu]: expected a list of %zu numbers like "
                         "instances[0]",
                         i, width);
            goto cleanup;
        }
        j = 0;
        for (jdoc_iter_init(&row, &cols); jdoc_iter_next(&cols, &v); j++) {
            enum jdoc_type type = jdoc_type(&v);
            if (type == JDOC_INT || type == JDOC_REAL)
                data[i * width + j] = jdoc_number(&v);
            else if (type == JDOC_NULL)
                data[i * width + j] = NAN;
            else {
                rc = err_set(e, ERR_SHAPE, "instances[%zu][%zu]: expected a number", i, j);
                goto cleanup;
            }
        }
    }
    infer_request_bind(r);
    *out = r;
    r = NULL;
    rc = 0;
cleanup:
    infer_request_destroy(r);
    free(seen);
    jdoc_done();
    return rc;
}

/* ---- encoding ---- */

static int append_element(struct buf *b, const struct inferd_tensor *t, size_t i)
{
    char tmp[40];
    int n;

    switch (t->datatype) {
    case INFERD_TYPE_FP32: {
        float f = ((const float *)t->data)[i];
        if (!isfinite(f))
            return buf_append(b, "null", 4);
        n = snprintf(tmp, sizeof(tmp), "%.9g", (double)f);
        break;
    }
    case INFERD_TYPE_FP64: {
        double d = ((const double *)t->data)[i];
        if (!isfinite(d))
            return buf_append(b, "null", 4);
        n = snprintf(tmp, sizeof(tmp), "%.17g", d);
        break;
    }
    case INFERD_TYPE_INT32:
        n = snprintf(tmp, sizeof(tmp), "%d", (int)((const int32_t *)t->data)[i]);
        break;
    case INFERD_TYPE_INT64:
        n = snprintf(tmp, sizeof(tmp), "%lld", (long long)((const int64_t *)t->data)[i]);
        break;
    case INFERD_TYPE_BOOL:
        return buf_puts(b, ((const uint8_t *)t->data)[i] ? "true" : "false");
    default:
        return buf_append(b, "null", 4);
    }
    return buf_append(b, tmp, (size_t)n);
}

static int append_bytes_elements(struct buf *b, const struct inferd_tensor *t)
{
    const unsigned char *p = t->data, *end = p ? p + t->data_bytes : p;
    int first = 1, rc = 0;

    while (rc == 0 && p && end - p >= 4) {
        uint32_t len =
            (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
        p += 4;
        if (len > (size_t)(end - p))
            break;
        rc = buf_puts(b, first ? "" : ",");
        if (rc == 0) /* NULs and invalid UTF-8 kept valid JSON, never cut short */
            rc = buf_json_stringn(b, (const char *)p, len);
        p += len;
        first = 0;
    }
    return rc;
}

static int wants_binary(const struct infer_request *r, const char *name)
{
    if (r->binary_output_all)
        return 1;
    for (size_t i = 0; i < r->n_binary_outputs; i++)
        if (strcmp(r->binary_outputs[i], name) == 0)
            return 1;
    return 0;
}

static int is_requested(const struct infer_request *r, const char *name)
{
    if (r->n_requested_outputs == 0)
        return 1;
    for (size_t i = 0; i < r->n_requested_outputs; i++)
        if (strcmp(r->requested_outputs[i], name) == 0)
            return 1;
    return 0;
}

static int append_output(struct buf *b, const struct inferd_tensor *t, int binary)
{
    size_t elem = inferd_datatype_size(t->datatype);
    size_t n = elem ? t->data_bytes / elem : 0;
    int rc;

    rc = buf_puts(b, "{\"name\":");
    if (rc == 0)
        rc = buf_json_string(b, t->name);
    if (rc == 0)
        rc = buf_printf(b, ",\"datatype\":\"%s\",\"shape\":[", tensor_datatype_name(t->datatype));
    for (int d = 0; rc == 0 && d < t->n_dims; d++)
        rc = buf_printf(b, "%s%lld", d ? "," : "", (long long)t->shape[d]);
    if (rc != 0)
        return rc;
    if (binary)
        return buf_printf(b, "],\"parameters\":{\"binary_data_size\":%zu}}", t->data_bytes);
    rc = buf_puts(b, "],\"data\":[");
    if (t->datatype == INFERD_TYPE_BYTES)
        rc = append_bytes_elements(b, t);
    for (size_t i = 0; rc == 0 && i < n; i++) {
        if (i)
            rc = buf_append(b, ",", 1);
        if (rc == 0)
            rc = append_element(b, t, i);
    }
    return rc ? rc : buf_puts(b, "]}");
}

int codec_encode_v2(const struct infer_request *r, const char *model_name, const char *version,
                    struct buf *out, int64_t *json_len)
{
    size_t start = out->len;
    int rc, first = 1, any_binary = 0;

    *json_len = -1;
    rc = buf_puts(out, "{\"model_name\":");
    if (rc == 0)
        rc = buf_json_string(out, model_name);
    if (rc == 0)
        rc = buf_puts(out, ",\"model_version\":");
    if (rc == 0)
        rc = buf_json_string(out, version);
    if (rc == 0 && r->id) {
        rc = buf_puts(out, ",\"id\":");
        if (rc == 0)
            rc = buf_json_stringn(out, r->id, r->id_len);
    }
    if (rc == 0)
        rc = buf_puts(out, ",\"outputs\":[");
    for (size_t i = 0; rc == 0 && i < r->n_outputs; i++) {
        const struct inferd_tensor *t = &r->outputs[i];
        int binary;
        if (!is_requested(r, t->name))
            continue;
        binary = wants_binary(r, t->name);
        any_binary |= binary;
        if (!first)
            rc = buf_append(out, ",", 1);
        first = 0;
        if (rc == 0)
            rc = append_output(out, t, binary);
    }
    if (rc == 0)
        rc = buf_puts(out, "]}");
    if (rc != 0 || !any_binary)
        return rc;
    *json_len = (int64_t)(out->len - start);
    for (size_t i = 0; rc == 0 && i < r->n_outputs; i++) {
        const struct inferd_tensor *t = &r->outputs[i];
        if (is_requested(r, t->name) && wants_binary(r, t->name))
            rc = buf_append(out, t->data, t->data_bytes);
    }
    return rc;
}

int codec_encode_v1(const struct infer_request *r, struct buf *out)
{
    const struct inferd_tensor *t;
    size_t elem, n, per_row = 1;
    int rc;

    rc = buf_puts(out, "{\"predictions\":[");
    if (r->n_outputs == 0)
        return rc ? rc : buf_puts(out, "]}");
    t = &r->outputs[0];
    elem = inferd_datatype_size(t->datatype);
    n = elem ? t->data_bytes / elem : 0;
    for (int d = 1; d < t->n_dims; d++)
        per_row *= (size_t)t->shape[d];
    for (size_t i = 0; rc == 0 && i < n; i++) {
        if (i)
            rc = buf_append(out, ",", 1);
        if (rc == 0 && per_row > 1 && i % per_row == 0)
            rc = buf_append(out, "[", 1);
        if (rc == 0)
            rc = append_element(out, t, i);
        if (rc == 0 && per_row > 1 && i % per_row == per_row - 1)
            rc = buf_append(out, "]", 1);
    }
    return rc ? rc : buf_puts(out, "]}");
}

int codec_encode_error(const char *msg, struct buf *out)
{
    int rc = buf_puts(out, "{\"error\":");

    if (rc == 0)
        rc = buf_json_string(out, msg);
    return rc ? rc : buf_puts(out, "}");
}

/* ---- JSON documents and upstream servers ---- */

int codec_decode_document(const char *body, size_t body_len, enum codec_origin origin,
                          struct infer_request **out, struct err *e)
{
    struct infer_request *r = NULL;
    json_error_t jerr;
    json_t *root;
    uint32_t n;

    *out = NULL;
    if (body_len > UINT32_MAX)
        return err_set(e, ERR_TOO_LARGE, "a JSON document of %zu bytes, limit is 4 GiB", body_len);
    root = json_loadb(body, body_len, JSON_DECODE_ANY | JSON_ALLOW_NUL, &jerr);
    if (!root)
        return err_set(
            e, ERR_INVALID, "malformed JSON at line %d column %d: %s", jerr.line, jerr.column,
            jdoc_jansson_why(body, body_len, &jerr, origin == CODEC_FROM_STORE ? JDOC_STORED : 0));
    json_decref(root);
    r = calloc(1, sizeof(*r));
    if (!r || !(r->inputs[0].name = strdup(INFERD_JSON_NAME)) ||
        !(r->inputs[0].data = malloc(body_len + 4))) {
        infer_request_destroy(r);
        return err_set(e, ERR_NOMEM, "out of memory");
    }
    r->n_inputs = 1;
    r->is_document = 1;
    r->is_stored = origin == CODEC_FROM_STORE;
    r->inputs[0].datatype = INFERD_TYPE_BYTES;
    r->inputs[0].n_dims = 1;
    r->inputs[0].shape[0] = 1;
    n = (uint32_t)body_len;
    memcpy(r->inputs[0].data, &n, 4);
    if (body_len)
        memcpy((char *)r->inputs[0].data + 4, body, body_len);
    r->inputs[0].data_bytes = body_len + 4;
    infer_request_bind(r);
    *out = r;
    return 0;
}

/* 1 when `body` is a JSON object with an "inputs" list: a KServe v2 request. */
static int looks_like_v2(const char *body, size_t body_len)
{
    struct jdoc_val root, inputs;
    int yes = jdoc_parse(body, body_len, 0, &root, NULL) == 0 &&
              jdoc_get(&root, "inputs", &inputs) && jdoc_type(&inputs) == JDOC_ARRAY;

    jdoc_done();
    return yes;
}

int codec_decode_for_model(const struct inferd_model_info *info, const char *body, size_t body_len,
                           int64_t json_len, enum codec_origin origin, struct infer_request **out,
                           struct err *e)
{
    if (info->json_io == INFERD_JSON_IO_ONLY ||
        (info->json_io == INFERD_JSON_IO_ALSO && json_len < 0 && !looks_like_v2(body, body_len)))
        return codec_decode_document(body, body_len, origin, out, e);
    return decode_v2(body, body_len, json_len, origin, out, e);
}

int codec_encode_result(const struct infer_request *r, const char *model_name,
                        const char *version, struct buf *out, int64_t *json_len)
{
    const char *doc;
    size_t len;

    if (!r->is_document)
        return codec_encode_v2(r, model_name, version, out, json_len);
    *json_len = -1;
    doc = infer_request_document(r, &len);
    if (!doc)
        return buf_puts(out, "null");
    return buf_append(out, doc, len);
}

int codec_encode_request_v2(const struct infer_request *r, struct buf *out)
{
    int rc = buf_puts(out, "{\"inputs\":[");

    for (size_t i = 0; rc == 0 && i < r->n_inputs; i++) {
        if (i)
            rc = buf_append(out, ",", 1);
        if (rc == 0)
            rc = append_output(out, &r->inputs[i], 0);
    }
    return rc ? rc : buf_puts(out, "]}");
}

int codec_decode_response_v2(const char *body, size_t body_len, struct infer_request **out,
                             struct err *e)
{
    struct infer_request *r = NULL;
    struct binary_section bin = {0};
    struct jdoc_val root, outputs, item;
    struct jdoc_iter it;
    size_t i = 0;
    int rc;

    *out = NULL;
    /* an upstream's answer: its errors may quote it, as a client's may */
    rc = load_json(body, body_len, CODEC_FROM_CLIENT, &root, e);
    if (rc != 0)
        goto cleanup;
    if (!jdoc_get(&root, "outputs", &outputs) || jdoc_type(&outputs) != JDOC_ARRAY ||
        jdoc_size(&outputs) > TENSOR_MAX_IO) {
        rc = err_set(e, ERR_INVALID, "outputs: missing, not a list or more than %d",
                     TENSOR_MAX_IO);
        goto cleanup;
    }
    r = calloc(1, sizeof(*r));
    if (!r) {
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    for (jdoc_iter_init(&outputs, &it); jdoc_iter_next(&it, &item); i++) {
        r->n_inputs = i + 1;
        rc = decode_input(&item, (int)i, &bin, 1, &r->inputs[i], e);
        if (rc != 0) {
            /* the decoder names request fields; these are the response's outputs */
            char msg[sizeof(e->msg)] = "";
            if (e)
                snprintf(msg, sizeof(msg), "%s", e->msg);
            if (e && strncmp(msg, "inputs[", 7) == 0)
                err_set(e, rc, "outputs[%s", msg + 7);
            goto cleanup;
        }
    }
    infer_request_bind(r);
    *out = r;
    r = NULL;
cleanup:
    infer_request_destroy(r);
    jdoc_done();
    return rc;
}
