/*
 * codec.c: KServe v2 / v1 JSON (and the v2 binary tensor extension) to struct infer_request and
 * back.
 *
 * Requests are parsed with jansson; responses are written by hand into a struct buf because
 * they are flat and large arrays of numbers are the hot path. Every error names the field.
 */
#include "model/codec.h"

#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Nesting deeper than this in "data" cannot match any shape we accept. */
#define DATA_MAX_DEPTH (INFERD_MAX_DIMS + 1)

/* ---- decoding "data" ---- */

struct data_walk {
    struct inferd_tensor *t;
    size_t idx;       /* elements written so far */
    size_t n_expect;  /* elements the shape declares */
    size_t bytes_len; /* BYTES: bytes used in t->data */
    size_t bytes_cap;
    int field_index; /* inputs[i] */
};

static int store_number(struct data_walk *w, json_t *v, struct err *e)
{
    struct inferd_tensor *t = w->t;
    double d;
    json_int_t n;

    if (json_is_null(v)) {
        if (t->datatype != INFERD_TYPE_FP32 && t->datatype != INFERD_TYPE_FP64)
            return err_set(e, ERR_SHAPE,
                           "inputs[%d].data[%zu]: null (missing) is only allowed for FP32 and "
                           "FP64",
                           w->field_index, w->idx);
        d = NAN;
    } else if (json_is_boolean(v)) {
        if (t->datatype != INFERD_TYPE_BOOL)
            return err_set(e, ERR_SHAPE, "inputs[%d].data[%zu]: expected a number, got a boolean",
                           w->field_index, w->idx);
        d = json_is_true(v) ? 1.0 : 0.0;
    } else if (json_is_integer(v)) {
        n = json_integer_value(v);
        if (t->datatype == INFERD_TYPE_INT64) {
            ((int64_t *)t->data)[w->idx] = (int64_t)n;
            return 0;
        }
        if (t->datatype == INFERD_TYPE_INT32 && (n < INT32_MIN || n > INT32_MAX))
            return err_set(e, ERR_SHAPE, "inputs[%d].data[%zu]: %lld does not fit in INT32",
                           w->field_index, w->idx, (long long)n);
        if (t->datatype == INFERD_TYPE_BOOL && n != 0 && n != 1)
            return err_set(e, ERR_SHAPE,
                           "inputs[%d].data[%zu]: BOOL values are 0, 1, true or false",
                           w->field_index, w->idx);
        d = (double)n;
    } else if (json_is_real(v)) {
        d = json_real_value(v);
        if (t->datatype != INFERD_TYPE_FP32 && t->datatype != INFERD_TYPE_FP64)
            return err_set(e, ERR_SHAPE, "inputs[%d].data[%zu]: %g is not an integer (%s)",
                           w->field_index, w->idx, d,
                           t->datatype == INFERD_TYPE_BOOL    ? "BOOL"
                           : t->datatype == INFERD_TYPE_INT32 ? "INT32"
                                                              : "INT64");
    } else {
        return err_set(e, ERR_SHAPE, "inputs[%d].data[%zu]: expected a number, got %s",
                       w->field_index, w->idx, json_is_string(v) ? "a string" : "an object");
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
            return err_set(e, ERR_SHAPE, "inputs[%d].data[%zu]: %g does not fit in FP32",
                           w->field_index, w->idx, d);
        ((float *)t->data)[w->idx] = (float)d;
        break;
    default:
        ((double *)t->data)[w->idx] = d;
        break;
    }
    return 0;
}

static int store_bytes(struct data_walk *w, json_t *v, struct err *e)
{
    const char *s;
    size_t len, need;

    if (!json_is_string(v))
        return err_set(e, ERR_SHAPE, "inputs[%d].data[%zu]: BYTES elements are strings",
                       w->field_index, w->idx);
    s = json_string_value(v);
    len = json_string_length(v);
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

static int walk_data(struct data_walk *w, json_t *v, int depth, struct err *e)
{
    size_t i;
    json_t *item;
    int rc;

    if (json_is_array(v)) {
        if (depth >= DATA_MAX_DEPTH)
            return err_set(e, ERR_SHAPE, "inputs[%d].data: nested deeper than %d levels",
                           w->field_index, DATA_MAX_DEPTH);
        json_array_foreach (v, i, item) {
            rc = walk_data(w, item, depth + 1, e);
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
static size_t count_leaves(json_t *v, int depth)
{
    size_t i, n = 0, sub;
    json_t *item;

    if (!json_is_array(v))
        return 1;
    if (depth >= DATA_MAX_DEPTH)
        return SIZE_MAX;
    json_array_foreach (v, i, item) {
        sub = count_leaves(item, depth + 1);
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

static int decode_shape(json_t *shape, struct inferd_tensor *t, int idx, struct err *e)
{
    size_t i;
    json_t *dim;

    if (!json_is_array(shape))
        return err_set(e, ERR_INVALID, "inputs[%d].shape: expected a list of integers", idx);
    if (json_array_size(shape) > INFERD_MAX_DIMS)
        return err_set(e, ERR_SHAPE, "inputs[%d].shape: %zu dimensions, limit is %d", idx,
                       json_array_size(shape), INFERD_MAX_DIMS);
    json_array_foreach (shape, i, dim) {
        if (!json_is_integer(dim) || json_integer_value(dim) < 0)
            return err_set(e, ERR_INVALID, "inputs[%d].shape[%zu]: expected an integer >= 0", idx,
                           i);
        t->shape[i] = json_integer_value(dim);
    }
    t->n_dims = (int)json_array_size(shape);
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

static int decode_input(json_t *in, int idx, struct binary_section *bin, struct inferd_tensor *t,
                        struct err *e)
{
    json_t *name, *dt, *shape, *data, *params, *bsize;
    int64_t count;
    size_t elem, nbytes;
    int rc;

    if (!json_is_object(in))
        return err_set(e, ERR_INVALID, "inputs[%d]: expected an object", idx);
    name = json_object_get(in, "name");
    dt = json_object_get(in, "datatype");
    shape = json_object_get(in, "shape");
    data = json_object_get(in, "data");
    params = json_object_get(in, "parameters");
    if (!json_is_string(name) || json_string_length(name) == 0)
        return err_set(e, ERR_INVALID, "inputs[%d].name: missing or not a string", idx);
    if (!json_is_string(dt))
        return err_set(e, ERR_INVALID, "inputs[%d].datatype: missing or not a string", idx);
    if (!shape)
        return err_set(e, ERR_INVALID, "inputs[%d].shape: missing", idx);
    t->name = strdup(json_string_value(name));
    if (!t->name)
        return err_set(e, ERR_NOMEM, "out of memory");
    t->datatype = tensor_datatype_parse(json_string_value(dt));
    if (t->datatype == INFERD_TYPE_INVALID)
        return err_set(e, ERR_SHAPE,
                       "inputs[%d].datatype: unknown datatype '%.32s' (BOOL, INT32, INT64, FP32, "
                       "FP64 or BYTES)",
                       idx, json_string_value(dt));
    rc = decode_shape(shape, t, idx, e);
    if (rc != 0)
        return rc;
    count = tensor_element_count(t->shape, t->n_dims);
    elem = inferd_datatype_size(t->datatype);
    if (count < 0 || (elem && (uint64_t)count > SIZE_MAX / 2 / elem))
        return err_set(e, ERR_SHAPE, "inputs[%d].shape: too many elements", idx);
    bsize = params && json_is_object(params) ? json_object_get(params, "binary_data_size") : NULL;
    if (bsize) {
        if (!json_is_integer(bsize) || json_integer_value(bsize) < 0)
            return err_set(e, ERR_INVALID,
                           "inputs[%d].parameters.binary_data_size: expected an integer >= 0", idx);
        nbytes = (size_t)json_integer_value(bsize);
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
    if (!data)
        return err_set(e, ERR_INVALID, "inputs[%d].data: missing", idx);
    if (!json_is_array(data))
        return err_set(e, ERR_INVALID, "inputs[%d].data: expected a list", idx);
    /* count first: the shape is only a claim, the JSON text bounds what we allocate */
    size_t n_leaves = count_leaves(data, 0);
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
    struct data_walk w = {.t = t, .n_expect = (size_t)count, .field_index = idx};
    rc = walk_data(&w, data, 0, e);
    if (rc != 0)
        return rc;
    if (w.idx != (size_t)count)
        return err_set(e, ERR_SHAPE, "inputs[%d].data: %zu elements, shape declares %lld", idx,
                       w.idx, (long long)count);
    t->data_bytes = elem ? (size_t)count * elem : w.bytes_len;
    return 0;
}

static int decode_outputs(json_t *outputs, struct infer_request *r, struct err *e)
{
    size_t i;
    json_t *o;

    if (!outputs)
        return 0;
    if (!json_is_array(outputs))
        return err_set(e, ERR_INVALID, "outputs: expected a list");
    if (json_array_size(outputs) > TENSOR_MAX_IO)
        return err_set(e, ERR_INVALID, "outputs: more than %d entries", TENSOR_MAX_IO);
    json_array_foreach (outputs, i, o) {
        json_t *name = json_object_get(o, "name");
        json_t *params = json_object_get(o, "parameters");
        json_t *binary = json_is_object(params) ? json_object_get(params, "binary_data") : NULL;
        if (!json_is_string(name))
            return err_set(e, ERR_INVALID, "outputs[%zu].name: missing or not a string", i);
        r->requested_outputs[r->n_requested_outputs] = strdup(json_string_value(name));
        if (!r->requested_outputs[r->n_requested_outputs])
            return err_set(e, ERR_NOMEM, "out of memory");
        r->n_requested_outputs++;
        if (json_is_true(binary)) {
            r->binary_outputs[r->n_binary_outputs] = strdup(json_string_value(name));
            if (!r->binary_outputs[r->n_binary_outputs])
                return err_set(e, ERR_NOMEM, "out of memory");
            r->n_binary_outputs++;
        }
    }
    return 0;
}

static int decode_parameters(json_t *params, struct infer_request *r, struct err *e)
{
    json_t *timeout, *bin;

    if (!params)
        return 0;
    if (!json_is_object(params))
        return err_set(e, ERR_INVALID, "parameters: expected an object");
    timeout = json_object_get(params, "timeout");
    if (timeout) {
        if (!json_is_integer(timeout) || json_integer_value(timeout) < 0)
            return err_set(e, ERR_INVALID,
                           "parameters.timeout: expected microseconds as an integer >= 0");
        r->timeout_us = (uint64_t)json_integer_value(timeout);
    }
    bin = json_object_get(params, "binary_data_output");
    if (bin && !json_is_boolean(bin))
        return err_set(e, ERR_INVALID, "parameters.binary_data_output: expected true or false");
    r->binary_output_all = json_is_true(bin);
    return 0;
}

static json_t *load_json(const char *body, size_t len, struct err *e)
{
    json_error_t jerr;
    json_t *root = json_loadb(body, len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &jerr);

    if (!root)
        err_set(e, ERR_INVALID, "malformed JSON at line %d column %d: %s", jerr.line, jerr.column,
                jerr.text);
    else if (!json_is_object(root)) {
        err_set(e, ERR_INVALID, "the request body must be a JSON object");
        json_decref(root);
        root = NULL;
    }
    return root;
}

int codec_decode_v2(const char *body, size_t body_len, int64_t json_len, struct infer_request **out,
                    struct err *e)
{
    struct infer_request *r = NULL;
    struct binary_section bin = {0};
    json_t *root = NULL, *inputs, *id, *item;
    size_t i;
    int rc;

    *out = NULL;
    if (json_len >= 0) {
        if ((uint64_t)json_len > body_len) {
            rc = err_set(e, ERR_INVALID,
                         "Inference-Header-Content-Length is %lld, the body has only %zu bytes",
                         (long long)json_len, body_len);
            goto cleanup;
        }
        bin.data = (const unsigned char *)body + json_len;
        bin.len = body_len - (size_t)json_len;
        body_len = (size_t)json_len;
    }
    root = load_json(body, body_len, e);
    if (!root) {
        rc = e ? e->code : ERR_INVALID;
        goto cleanup;
    }
    r = calloc(1, sizeof(*r));
    if (!r) {
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    id = json_object_get(root, "id");
    if (id && !json_is_string(id)) {
        rc = err_set(e, ERR_INVALID, "id: expected a string");
        goto cleanup;
    }
    if (id && !(r->id = strdup(json_string_value(id)))) {
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    rc = decode_parameters(json_object_get(root, "parameters"), r, e);
    if (rc == 0)
        rc = decode_outputs(json_object_get(root, "outputs"), r, e);
    if (rc != 0)
        goto cleanup;
    inputs = json_object_get(root, "inputs");
    if (!json_is_array(inputs) || json_array_size(inputs) == 0) {
        rc = err_set(e, ERR_INVALID, "inputs: missing, empty or not a list");
        goto cleanup;
    }
    if (json_array_size(inputs) > TENSOR_MAX_IO) {
        rc = err_set(e, ERR_INVALID, "inputs: %zu tensors, limit is %d", json_array_size(inputs),
                     TENSOR_MAX_IO);
        goto cleanup;
    }
    json_array_foreach (inputs, i, item) {
        r->n_inputs = i + 1; /* so that cleanup frees a half-decoded tensor */
        rc = decode_input(item, (int)i, &bin, &r->inputs[i], e);
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
    json_decref(root);
    return rc;
}

int codec_decode_v1(const char *body, size_t body_len, const char *input_name,
                    struct infer_request **out, struct err *e)
{
    struct infer_request *r = NULL;
    json_t *root = NULL, *instances, *row, *v;
    size_t n_rows, width = 0, i, j;
    double *data;
    int rc;

    *out = NULL;
    root = load_json(body, body_len, e);
    if (!root) {
        rc = e ? e->code : ERR_INVALID;
        goto cleanup;
    }
    instances = json_object_get(root, "instances");
    if (!json_is_array(instances) || json_array_size(instances) == 0) {
        rc = err_set(e, ERR_INVALID, "instances: missing, empty or not a list");
        goto cleanup;
    }
    n_rows = json_array_size(instances);
    row = json_array_get(instances, 0);
    if (!json_is_array(row)) {
        rc = err_set(e, ERR_INVALID, "instances[0]: expected a list of numbers");
        goto cleanup;
    }
    width = json_array_size(row);
    r = calloc(1, sizeof(*r));
    if (!r || !(r->inputs[0].name = strdup(input_name))) {
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
    json_array_foreach (instances, i, row) {
        if (!json_is_array(row) || json_array_size(row) != width) {
            rc = err_set(e, ERR_SHAPE,
                         "instances[%zu]: expected a list of %zu numbers like "
                         "instances[0]",
                         i, width);
            goto cleanup;
        }
        json_array_foreach (row, j, v) {
            if (json_is_number(v))
                data[i * width + j] = json_number_value(v);
            else if (json_is_null(v))
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
    json_decref(root);
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
            rc = buf_json_string(out, r->id);
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

int codec_decode_document(const char *body, size_t body_len, struct infer_request **out,
                          struct err *e)
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
        return err_set(e, ERR_INVALID, "malformed JSON at line %d column %d: %s", jerr.line,
                       jerr.column, jerr.text);
    json_decref(root);
    r = calloc(1, sizeof(*r));
    if (!r || !(r->inputs[0].name = strdup(INFERD_JSON_NAME)) ||
        !(r->inputs[0].data = malloc(body_len + 4))) {
        infer_request_destroy(r);
        return err_set(e, ERR_NOMEM, "out of memory");
    }
    r->n_inputs = 1;
    r->is_document = 1;
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
    json_t *root = json_loadb(body, body_len, JSON_DECODE_ANY, NULL);
    int yes = json_is_object(root) && json_is_array(json_object_get(root, "inputs"));

    json_decref(root);
    return yes;
}

int codec_decode_for_model(const struct inferd_model_info *info, const char *body,
                           size_t body_len, int64_t json_len, struct infer_request **out,
                           struct err *e)
{
    if (info->json_io == INFERD_JSON_IO_ONLY ||
        (info->json_io == INFERD_JSON_IO_ALSO && json_len < 0 && !looks_like_v2(body, body_len)))
        return codec_decode_document(body, body_len, out, e);
    return codec_decode_v2(body, body_len, json_len, out, e);
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
    json_t *root = NULL, *outputs, *item;
    size_t i;
    int rc = 0;

    *out = NULL;
    root = load_json(body, body_len, e);
    if (!root)
        return e ? e->code : ERR_INVALID;
    outputs = json_object_get(root, "outputs");
    if (!json_is_array(outputs) || json_array_size(outputs) > TENSOR_MAX_IO) {
        rc = err_set(e, ERR_INVALID, "outputs: missing, not a list or more than %d",
                     TENSOR_MAX_IO);
        goto cleanup;
    }
    r = calloc(1, sizeof(*r));
    if (!r) {
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    json_array_foreach (outputs, i, item) {
        r->n_inputs = i + 1;
        rc = decode_input(item, (int)i, &bin, &r->inputs[i], e);
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
    json_decref(root);
    return rc;
}
