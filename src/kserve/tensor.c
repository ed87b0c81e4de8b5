/*
 * tensor.c: datatypes, request life cycle, and the check of a request against a model's inputs.
 *
 * The check converts numeric inputs to the model's datatype here, once, so that every backend
 * sees exactly the datatype its metadata declares.
 */
#include "kserve/tensor.h"

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const struct {
    const char *name;
    enum inferd_datatype type;
} type_names[] = {
    {"BOOL", INFERD_TYPE_BOOL}, {"INT32", INFERD_TYPE_INT32}, {"INT64", INFERD_TYPE_INT64},
    {"FP32", INFERD_TYPE_FP32}, {"FP64", INFERD_TYPE_FP64},   {"BYTES", INFERD_TYPE_BYTES},
};

enum inferd_datatype tensor_datatype_parse(const char *name)
{
    for (size_t i = 0; i < sizeof(type_names) / sizeof(type_names[0]); i++)
        if (strcmp(type_names[i].name, name) == 0)
            return type_names[i].type;
    return INFERD_TYPE_INVALID;
}

const char *tensor_datatype_name(enum inferd_datatype t)
{
    for (size_t i = 0; i < sizeof(type_names) / sizeof(type_names[0]); i++)
        if (type_names[i].type == t)
            return type_names[i].name;
    return "INVALID";
}

int64_t tensor_element_count(const int64_t *shape, int n_dims)
{
    int64_t n = 1;

    for (int i = 0; i < n_dims; i++) {
        if (shape[i] < 0)
            return -1;
        if (shape[i] != 0 && n > INT64_MAX / shape[i])
            return -1;
        n *= shape[i];
    }
    return n;
}

void infer_request_reset_outputs(struct infer_request *r)
{
    for (size_t i = 0; i < r->n_outputs; i++) {
        free((char *)r->outputs[i].name);
        free(r->outputs[i].data);
    }
    memset(r->outputs, 0, sizeof(r->outputs));
    r->n_outputs = 0;
    r->abi.failed = 0;
    r->abi.error[0] = '\0';
    r->abi.status = 0;
    r->abi.retryable = 1;
    r->abi.retry_after_ms = 0;
}

struct infer_request *infer_request_of(const struct inferd_request *abi)
{
    return (struct infer_request *)((const char *)abi - offsetof(struct infer_request, abi));
}

const char *infer_request_document(const struct infer_request *r, size_t *len)
{
    for (size_t i = 0; i < r->n_outputs; i++) {
        const struct inferd_tensor *t = &r->outputs[i];
        uint32_t n;
        if (strcmp(t->name, INFERD_JSON_NAME) != 0 || t->datatype != INFERD_TYPE_BYTES ||
            t->data_bytes < 4)
            continue;
        memcpy(&n, t->data, 4);
        if (n > t->data_bytes - 4)
            return NULL;
        *len = n;
        return (const char *)t->data + 4;
    }
    return NULL;
}

void infer_request_destroy(struct infer_request *r)
{
    if (!r)
        return;
    free(r->id);
    for (size_t i = 0; i < r->n_binary_outputs; i++)
        free(r->binary_outputs[i]);
    for (size_t i = 0; i < r->n_requested_outputs; i++)
        free(r->requested_outputs[i]);
    for (size_t i = 0; i < r->n_inputs; i++) {
        free((char *)r->inputs[i].name);
        free(r->inputs[i].data);
    }
    infer_request_reset_outputs(r);
    free(r);
}

int64_t infer_request_rows(const struct infer_request *r)
{
    if (r->n_inputs == 0 || r->inputs[0].n_dims == 0)
        return 0;
    return r->inputs[0].shape[0];
}

static double load_value(const void *data, enum inferd_datatype t, size_t i)
{
    switch (t) {
    case INFERD_TYPE_BOOL:
        return ((const uint8_t *)data)[i] ? 1.0 : 0.0;
    case INFERD_TYPE_INT32:
        return (double)((const int32_t *)data)[i];
    case INFERD_TYPE_INT64:
        return (double)((const int64_t *)data)[i];
    case INFERD_TYPE_FP32:
        return (double)((const float *)data)[i];
    case INFERD_TYPE_FP64:
        return ((const double *)data)[i];
    default:
        return 0.0;
    }
}

static void store_value(void *data, enum inferd_datatype t, size_t i, double v)
{
    switch (t) {
    case INFERD_TYPE_BOOL:
        ((uint8_t *)data)[i] = v != 0.0;
        break;
    case INFERD_TYPE_INT32:
        ((int32_t *)data)[i] = (int32_t)v;
        break;
    case INFERD_TYPE_INT64:
        ((int64_t *)data)[i] = (int64_t)v;
        break;
    case INFERD_TYPE_FP32:
        ((float *)data)[i] = (float)v;
        break;
    case INFERD_TYPE_FP64:
        ((double *)data)[i] = v;
        break;
    default:
        break;
    }
}

/* `quote`: an error may show a value (the client sent it) */
static int convert(struct inferd_tensor *t, enum inferd_datatype to, int quote, struct err *e)
{
    size_t from_size = inferd_datatype_size(t->datatype), to_size = inferd_datatype_size(to);
    size_t n;
    void *out;

    if (t->datatype == to)
        return 0;
    if (from_size == 0 || to_size == 0)
        return err_set(e, ERR_SHAPE, "input '%s': datatype %s cannot be used as %s", t->name,
                       tensor_datatype_name(t->datatype), tensor_datatype_name(to));
    if (to == INFERD_TYPE_BOOL || to == INFERD_TYPE_INT32 || to == INFERD_TYPE_INT64) {
        /* integers lose fractions silently; we only widen towards floating point */
        if (t->datatype == INFERD_TYPE_FP32 || t->datatype == INFERD_TYPE_FP64)
            return err_set(e, ERR_SHAPE, "input '%s': datatype %s, model expects %s", t->name,
                           tensor_datatype_name(t->datatype), tensor_datatype_name(to));
    }
    n = t->data_bytes / from_size;
    if (to == INFERD_TYPE_INT32 && t->datatype == INFERD_TYPE_INT64) {
        for (size_t i = 0; i < n; i++) {
            int64_t v = ((const int64_t *)t->data)[i];
            if ((v < INT32_MIN || v > INT32_MAX) && !quote)
                return err_set(e, ERR_SHAPE, "input '%s': value %zu does not fit in INT32", t->name,
                               i);
            if (v < INT32_MIN || v > INT32_MAX)
                return err_set(e, ERR_SHAPE, "input '%s': value %zu (%lld) does not fit in INT32",
                               t->name, i, (long long)v);
        }
    }
    if (to == INFERD_TYPE_BOOL && t->datatype != INFERD_TYPE_BOOL) {
        for (size_t i = 0; i < n; i++) {
            double v = load_value(t->data, t->datatype, i);
            if (v != 0.0 && v != 1.0 && !quote)
                return err_set(e, ERR_SHAPE, "input '%s': value %zu is not 0 or 1 (BOOL)", t->name,
                               i);
            if (v != 0.0 && v != 1.0)
                return err_set(e, ERR_SHAPE, "input '%s': value %zu is %g; BOOL values are 0 or 1",
                               t->name, i, v);
        }
    }
    out = malloc(n * to_size + 1);
    if (!out)
        return err_set(e, ERR_NOMEM, "out of memory converting input '%s'", t->name);
    for (size_t i = 0; i < n; i++)
        store_value(out, to, i, load_value(t->data, t->datatype, i));
    free(t->data);
    t->data = out;
    t->data_bytes = n * to_size;
    t->datatype = to;
    return 0;
}

static int check_shape(const struct inferd_tensor *got, const struct inferd_tensor *want,
                       struct err *e)
{
    char expect[128] = "[";
    size_t off = 1;

    for (int i = 0; i < want->n_dims && off < sizeof(expect); i++)
        off += (size_t)snprintf(expect + off, sizeof(expect) - off, "%s%lld", i ? ", " : "",
                                (long long)want->shape[i]);
    if (off < sizeof(expect))
        snprintf(expect + off, sizeof(expect) - off, "]");
    if (got->n_dims != want->n_dims)
        return err_set(e, ERR_SHAPE, "input '%s': shape has %d dimensions, model expects %s",
                       got->name, got->n_dims, expect);
    for (int i = 0; i < want->n_dims; i++) {
        if (want->shape[i] >= 0 && got->shape[i] != want->shape[i]) {
            if (i == want->n_dims - 1 && want->n_dims == 2)
                return err_set(e, ERR_SHAPE, "input '%s': expected %lld features per row, got %lld",
                               got->name, (long long)want->shape[i], (long long)got->shape[i]);
            return err_set(e, ERR_SHAPE, "input '%s': shape[%d] is %lld, model expects %s",
                           got->name, i, (long long)got->shape[i], expect);
        }
    }
    return 0;
}

int tensor_check_inputs(struct infer_request *r, const struct inferd_model_info *info,
                        struct err *e)
{
    int rc;

    if (r->is_document) {
        if (info->json_io == INFERD_JSON_IO_NONE)
            return err_set(e, ERR_INVALID, "this model takes KServe v2 tensors, not a JSON document");
        return 0;
    }
    if (info->json_io == INFERD_JSON_IO_ONLY)
        return err_set(e, ERR_INVALID, "this model takes JSON documents only");
    if (info->inputs_optional && r->n_inputs == 0)
        return err_set(e, ERR_INVALID, "no inputs: give at least one of the model's inputs");
    for (size_t i = 0; i < r->n_inputs; i++) {
        size_t j;
        for (j = 0; j < info->n_inputs; j++)
            if (strcmp(r->inputs[i].name, info->inputs[j].name) == 0)
                break;
        if (j == info->n_inputs && r->is_stored) /* its name is the stored text's: not shown */
            return err_set(e, ERR_SHAPE,
                           "inputs[%zu]: unknown input name: the model's first input is '%s'", i,
                           info->n_inputs ? info->inputs[0].name : "");
        if (j == info->n_inputs)
            return err_set(e, ERR_SHAPE, "unknown input '%s': the model's first input is '%s'",
                           r->inputs[i].name, info->n_inputs ? info->inputs[0].name : "");
        for (size_t k = 0; k < i; k++)
            if (strcmp(r->inputs[i].name, r->inputs[k].name) == 0)
                return err_set(e, ERR_INVALID, "input '%s' appears twice", r->inputs[i].name);
        rc = check_shape(&r->inputs[i], &info->inputs[j], e);
        if (rc == 0)
            rc = convert(&r->inputs[i], info->inputs[j].datatype, !r->is_stored, e);
        if (rc != 0)
            return rc;
    }
    for (size_t j = 0; j < info->n_inputs && !info->inputs_optional; j++) {
        size_t i;
        for (i = 0; i < r->n_inputs; i++)
            if (strcmp(r->inputs[i].name, info->inputs[j].name) == 0)
                break;
        if (i == r->n_inputs)
            return err_set(e, ERR_INVALID, "missing input '%s'", info->inputs[j].name);
    }
    if (info->is_batched && r->n_inputs > 1) {
        for (size_t i = 1; i < r->n_inputs; i++)
            if (r->inputs[i].shape[0] != r->inputs[0].shape[0])
                return err_set(e, ERR_SHAPE, "inputs '%s' and '%s' have different batch sizes",
                               r->inputs[0].name, r->inputs[i].name);
    }
    for (size_t i = 0; i < r->n_requested_outputs; i++) {
        size_t j;
        for (j = 0; j < info->n_outputs; j++)
            if (strcmp(r->requested_outputs[i], info->outputs[j].name) == 0)
                break;
        if (j == info->n_outputs && r->is_stored)
            return err_set(e, ERR_SHAPE, "outputs[%zu]: unknown output name", i);
        if (j == info->n_outputs)
            return err_set(e, ERR_SHAPE, "unknown output '%s'", r->requested_outputs[i]);
    }
    return 0;
}

void infer_request_bind(struct infer_request *r)
{
    r->abi.inputs = r->inputs;
    r->abi.n_inputs = r->n_inputs;
    r->abi.host_ctx = r;
}

void *tensor_output_alloc(struct inferd_request *request, const char *name,
                          enum inferd_datatype datatype, const int64_t *shape, int n_dims,
                          size_t data_bytes)
{
    struct infer_request *r = request->host_ctx;
    struct inferd_tensor *t;

    if (!r || r->n_outputs >= TENSOR_MAX_IO || n_dims < 0 || n_dims > INFERD_MAX_DIMS)
        return NULL;
    t = &r->outputs[r->n_outputs];
    memset(t, 0, sizeof(*t));
    t->name = strdup(name);
    t->data = malloc(data_bytes ? data_bytes : 1);
    if (!t->name || !t->data) {
        free((char *)t->name);
        free(t->data);
        memset(t, 0, sizeof(*t));
        return NULL;
    }
    t->datatype = datatype;
    t->n_dims = n_dims;
    memcpy(t->shape, shape, sizeof(int64_t) * (size_t)n_dims);
    t->data_bytes = data_bytes;
    r->n_outputs++;
    return t->data;
}
