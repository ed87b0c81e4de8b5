/*
 * fuzz_infer_request.c: libFuzzer target for the request decoder (v2 JSON, v2 with the binary
 * tensor extension, v1 instances), followed by the model check and the response encoder, as
 * the server runs them.
 *
 * Input layout: byte 0 picks the decoder (0: v2 JSON, 1: v2 binary, 2: v1); for binary, bytes
 * 1-2 are the JSON header length (little-endian); the rest is the body.
 *
 * The same body then goes through the other front doors too: codec_decode_document,
 * codec_decode_for_model with each json_io (then checked, answered and encoded as the server
 * would), and codec_decode_response_v2 (the http backend reading an upstream). Whenever a v2
 * decode succeeds, codec_encode_request_v2 must give JSON that codec_decode_v2 turns back into
 * the same tensors. Any broken promise aborts, so libFuzzer reports it.
 *
 * The document and for_model doors also take the body as text read from a location
 * (CODEC_FROM_STORE): then no error may quote it, so anything an error puts in quotes must be
 * one of our own words (a model's input name, JSON's punctuation). A decoded "id" (any JSON
 * string, \u0000 included) must come back byte for byte from the encoded response.
 */
#include "kserve/codec.h"
#include "kserve/tensor.h"

#include <ctype.h>
#include <jansson.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const struct inferd_tensor model_in = {
    .name = "input__0", .datatype = INFERD_TYPE_FP32, .n_dims = 2, .shape = {-1, 4}};
static const struct inferd_tensor model_out = {
    .name = "output__0", .datatype = INFERD_TYPE_FP32, .n_dims = 1, .shape = {-1}};
static const struct inferd_model_info info = {
    .inputs = &model_in, .n_inputs = 1, .outputs = &model_out, .n_outputs = 1, .is_batched = 1};

/* v1 instances that are objects map by these names (already in strcmp order) */
static const char *const feature_names[] = {"a", "b", "c", "d"};
static struct feature_entry feature_sorted[] = {{"a", 0}, {"b", 1}, {"c", 2}, {"d", 3}};
static const struct features names = {.names = feature_names, .n = 4, .sorted = feature_sorted};

/* for the json_io models: two inputs, either of which may come alone */
static const struct inferd_tensor two_in[] = {
    {.name = "input__0", .datatype = INFERD_TYPE_FP32, .n_dims = 2, .shape = {-1, 4}},
    {.name = "input__1", .datatype = INFERD_TYPE_INT64, .n_dims = 1, .shape = {-1}},
};
static const struct inferd_model_info json_io_info[] = {
    [INFERD_JSON_IO_NONE] = {.inputs = &model_in,
                             .n_inputs = 1,
                             .outputs = &model_out,
                             .n_outputs = 1,
                             .is_batched = 1},
    [INFERD_JSON_IO_ALSO] = {.inputs = two_in,
                             .n_inputs = 2,
                             .outputs = &model_out,
                             .n_outputs = 1,
                             .is_batched = 1,
                             .inputs_optional = 1,
                             .json_io = INFERD_JSON_IO_ALSO},
    [INFERD_JSON_IO_ONLY] = {.inputs = two_in,
                             .n_inputs = 2,
                             .outputs = &model_out,
                             .n_outputs = 1,
                             .is_batched = 1,
                             .json_io = INFERD_JSON_IO_ONLY},
};

static void broken(const char *what, const char *detail)
{
    fprintf(stderr, "fuzz_infer_request: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
    abort();
}

/* every failure must carry a message for the client, and a code the http table knows */
static void check_failure(int rc, const struct err *e)
{
    if (rc >= 0 || rc < ERR_UPSTREAM || e->msg[0] == '\0')
        broken("a failure without a code or a message", e->msg);
}

/* An error about stored text quotes none of it: every '...' in it is one of these (JSON's
 * punctuation, the model's input names, and the letters of simdjson's fixed "an atom starting
 * with the letter 't'"). An apostrophe inside a word ("model's") opens no quote. */
static void check_stored_failure(int rc, const struct err *e)
{
    static const char *const ours[] = {"[", "{", "}",        "]",        ":", "t",
                                       "f", "n", "input__0", "input__1", NULL};
    const char *p = e->msg;

    check_failure(rc, e);
    while ((p = strchr(p, '\'')) != NULL) {
        const char *close;
        size_t n, k;
        if (p > e->msg && (isalnum((unsigned char)p[-1]) || p[-1] == '_')) {
            p++;
            continue;
        }
        close = strchr(p + 1, '\'');
        if (!close)
            broken("an error about stored text opens a quote", e->msg);
        n = (size_t)(close - p - 1);
        for (k = 0; ours[k]; k++)
            if (strlen(ours[k]) == n && memcmp(ours[k], p + 1, n) == 0)
                break;
        if (!ours[k])
            broken("an error about stored text quotes it", e->msg);
        p = close + 1;
    }
}

/* The response's "id" is the request's, byte for byte (\u0000 included). */
static void check_id_echo(const struct infer_request *r, const struct buf *response)
{
    json_t *root, *id;

    if (!r->id)
        return;
    root = json_loadb(response->data, response->len, JSON_ALLOW_NUL, NULL);
    id = json_object_get(root, "id");
    if (!json_is_string(id) || json_string_length(id) != r->id_len ||
        memcmp(json_string_value(id), r->id, r->id_len) != 0)
        broken("the response's id is not the request's", NULL);
    json_decref(root);
}

/* ---- the round trip through codec_encode_request_v2 ---- */

/* 1 when `s` is UTF-8 that JSON parsers accept: no overlong forms, surrogates or values past
 * U+10FFFF. */
static int utf8_ok(const unsigned char *s, size_t len)
{
    size_t i = 0;

    while (i < len) {
        unsigned char c = s[i];
        uint32_t cp;
        size_t n;
        if (c < 0x80) {
            i++;
            continue;
        }
        if (c >= 0xc2 && c <= 0xdf)
            n = 1, cp = c & 0x1f;
        else if (c >= 0xe0 && c <= 0xef)
            n = 2, cp = c & 0x0f;
        else if (c >= 0xf0 && c <= 0xf4)
            n = 3, cp = c & 0x07;
        else
            return 0;
        if (len - i <= n)
            return 0;
        for (size_t k = 1; k <= n; k++) {
            if ((s[i + k] & 0xc0) != 0x80)
                return 0;
            cp = cp << 6 | (s[i + k] & 0x3f);
        }
        if ((n == 2 && cp < 0x800) || (n == 3 && (cp < 0x10000 || cp > 0x10ffff)) ||
            (cp >= 0xd800 && cp <= 0xdfff))
            return 0;
        i += n + 1;
    }
    return 1;
}

/*
 * 1 when every value of `t` has a JSON form that decodes back to it. Not so, and not checked
 * (see the report that came with this file): infinities (written as null, read as NaN), BOOL
 * bytes other than 0 and 1 (written as true), and BYTES elements that hold a NUL (cut there),
 * that are not UTF-8, or whose length prefixes do not add up to data_bytes and the shape
 * (binary data is not checked on the way in).
 */
static int has_json_form(const struct inferd_tensor *t)
{
    const unsigned char *p = t->data;
    size_t n_elems = 0, off = 0;

    switch (t->datatype) {
    case INFERD_TYPE_FP32:
        for (size_t i = 0; i < t->data_bytes / 4; i++)
            if (isinf(((const float *)t->data)[i]))
                return 0;
        return 1;
    case INFERD_TYPE_FP64:
        for (size_t i = 0; i < t->data_bytes / 8; i++)
            if (isinf(((const double *)t->data)[i]))
                return 0;
        return 1;
    case INFERD_TYPE_BOOL:
        for (size_t i = 0; i < t->data_bytes; i++)
            if (p[i] > 1)
                return 0;
        return 1;
    case INFERD_TYPE_BYTES:
        while (t->data_bytes - off >= 4) {
            uint32_t len = (uint32_t)p[off] | (uint32_t)p[off + 1] << 8 |
                           (uint32_t)p[off + 2] << 16 | (uint32_t)p[off + 3] << 24;
            off += 4;
            if (len > t->data_bytes - off || memchr(p + off, 0, len) || !utf8_ok(p + off, len))
                return 0;
            off += len;
            n_elems++;
        }
        return off == t->data_bytes &&
               (int64_t)n_elems == tensor_element_count(t->shape, t->n_dims);
    default:
        return 1;
    }
}

/* Same names, datatypes, shapes and bytes; floats compare as values (NaN matches NaN, -0
 * matches 0: JSON has one null and prints -0 as an integer). */
static int same_tensor(const struct inferd_tensor *a, const struct inferd_tensor *b)
{
    if (strcmp(a->name, b->name) != 0 || a->datatype != b->datatype || a->n_dims != b->n_dims ||
        memcmp(a->shape, b->shape, sizeof(int64_t) * (size_t)a->n_dims) != 0 ||
        a->data_bytes != b->data_bytes)
        return 0;
    if (a->datatype == INFERD_TYPE_FP32) {
        for (size_t i = 0; i < a->data_bytes / 4; i++) {
            float x = ((const float *)a->data)[i], y = ((const float *)b->data)[i];
            if (!(x == y || (isnan(x) && isnan(y))))
                return 0;
        }
        return 1;
    }
    if (a->datatype == INFERD_TYPE_FP64) {
        for (size_t i = 0; i < a->data_bytes / 8; i++) {
            double x = ((const double *)a->data)[i], y = ((const double *)b->data)[i];
            if (!(x == y || (isnan(x) && isnan(y))))
                return 0;
        }
        return 1;
    }
    return a->data_bytes == 0 || memcmp(a->data, b->data, a->data_bytes) == 0;
}

static void round_trip(const struct infer_request *r)
{
    struct infer_request *back = NULL;
    struct buf out = {0};
    struct err e = {0};

    if (r->n_inputs == 0)
        return; /* a v2 request needs an input: codec_decode_v2 says so */
    for (size_t i = 0; i < r->n_inputs; i++)
        if (!has_json_form(&r->inputs[i]))
            return;
    if (codec_encode_request_v2(r, &out) != 0)
        return; /* out of memory */
    if (codec_decode_v2(out.data, out.len, -1, &back, &e) != 0) {
        fprintf(stderr, "encoded: %.*s\n", (int)(out.len < 2000 ? out.len : 2000), out.data);
        broken("codec_encode_request_v2 wrote what codec_decode_v2 refuses", e.msg);
    }
    if (back->n_inputs != r->n_inputs)
        broken("the round trip changed the number of tensors", NULL);
    for (size_t i = 0; i < r->n_inputs; i++)
        if (!same_tensor(&r->inputs[i], &back->inputs[i]))
            broken("the round trip changed a tensor", r->inputs[i].name);
    infer_request_destroy(back);
    buf_release(&out);
}

/* ---- each front door ---- */

/* Plays the backend, then encodes the answer as the server would. */
static void answer(struct infer_request *r, const struct inferd_model_info *m)
{
    struct buf out = {0};
    int64_t json_len = -1;

    if (tensor_check_inputs(r, m, &(struct err){0}) != 0)
        return;
    if (r->is_document) {
        /* echo the document: the answer must be exactly the bytes sent */
        const struct inferd_tensor *in = &r->inputs[0];
        int64_t one = 1;
        void *p = tensor_output_alloc(&r->abi, INFERD_JSON_NAME, INFERD_TYPE_BYTES, &one, 1,
                                      in->data_bytes);
        if (!p)
            return;
        memcpy(p, in->data, in->data_bytes);
        if (codec_encode_result(r, "m", "1", &out, &json_len) == 0 &&
            (json_len != -1 || out.len != in->data_bytes - 4 ||
             (out.len && memcmp(out.data, (const char *)in->data + 4, out.len) != 0)))
            broken("codec_encode_result changed a document", NULL);
    } else {
        int64_t rows = infer_request_rows(r);
        float *y = tensor_output_alloc(&r->abi, "output__0", INFERD_TYPE_FP32, &rows, 1,
                                       (size_t)rows * sizeof(float));
        if (y)
            memset(y, 0, (size_t)rows * sizeof(float));
        codec_encode_result(r, "m", "1", &out, &json_len);
    }
    buf_release(&out);
}

static void fuzz_document(const char *body, size_t body_len, enum codec_origin origin)
{
    struct infer_request *r = NULL;
    struct err e = {0};
    int rc = codec_decode_document(body, body_len, origin, &r, &e);
    uint32_t n;

    if (rc != 0) {
        if (origin == CODEC_FROM_STORE)
            check_stored_failure(rc, &e);
        else
            check_failure(rc, &e);
        return;
    }
    memcpy(&n, r->inputs[0].data, 4);
    if (!r->is_document || r->n_inputs != 1 || n != body_len ||
        r->inputs[0].data_bytes != body_len + 4 ||
        (body_len && memcmp((const char *)r->inputs[0].data + 4, body, body_len) != 0))
        broken("codec_decode_document did not keep the body as it is", NULL);
    infer_request_destroy(r);
}

static void fuzz_for_model(int json_io, const char *body, size_t body_len, int64_t json_len,
                           enum codec_origin origin)
{
    const struct inferd_model_info *m = &json_io_info[json_io];
    struct infer_request *r = NULL;
    struct err e = {0};
    int rc = codec_decode_for_model(m, body, body_len, json_len, origin, &r, &e);

    if (rc != 0) {
        if (origin == CODEC_FROM_STORE)
            check_stored_failure(rc, &e);
        else
            check_failure(rc, &e);
        return;
    }
    if (origin == CODEC_FROM_STORE) {
        /* what the worker does next: the model check must not quote the text either */
        struct err ce = {0};
        int crc = tensor_check_inputs(r, m, &ce);
        if (crc != 0)
            check_stored_failure(crc, &ce);
        infer_request_destroy(r);
        return;
    }
    if ((json_io == INFERD_JSON_IO_NONE && r->is_document) ||
        (json_io == INFERD_JSON_IO_ONLY && !r->is_document))
        broken("codec_decode_for_model picked the wrong form for json_io", NULL);
    if (!r->is_document)
        round_trip(r);
    answer(r, m);
    infer_request_destroy(r);
}

static void fuzz_response(const char *body, size_t body_len)
{
    struct infer_request *r = NULL;
    struct err e = {0};
    int rc = codec_decode_response_v2(body, body_len, &r, &e);

    if (rc != 0) {
        check_failure(rc, &e);
        return;
    }
    for (size_t i = 0; i < r->n_inputs; i++) {
        const struct inferd_tensor *t = &r->inputs[i];
        size_t elem = inferd_datatype_size(t->datatype);
        if (elem && (int64_t)(t->data_bytes / elem) != tensor_element_count(t->shape, t->n_dims))
            broken("codec_decode_response_v2: data does not fit its shape", t->name);
    }
    round_trip(r);
    infer_request_destroy(r);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct infer_request *r = NULL;
    struct err e = {0};
    struct buf out = {0};
    int64_t json_len = -1, out_json_len;
    const char *body;
    size_t body_len;
    int mode, rc;

    if (size < 1)
        return 0;
    mode = data[0] % 3;
    body = (const char *)data + 1;
    body_len = size - 1;
    if (mode == 1) {
        if (body_len < 2)
            return 0;
        json_len = data[1] | (data[2] << 8);
        body += 2;
        body_len -= 2;
    }
    if (mode == 2)
        rc = codec_decode_v1(body, body_len, "input__0", &names, &r, &e);
    else
        rc = codec_decode_v2(body, body_len, json_len, &r, &e);
    if (rc != 0) {
        check_failure(rc, &e);
    } else {
        if (mode != 2)
            round_trip(r); /* before the check converts the datatypes */
        if (tensor_check_inputs(r, &info, &e) == 0) {
            /* play the backend: one output row per input row */
            int64_t rows = infer_request_rows(r);
            float *y = tensor_output_alloc(&r->abi, "output__0", INFERD_TYPE_FP32, &rows, 1,
                                           (size_t)rows * sizeof(float));
            if (y)
                memset(y, 0, (size_t)rows * sizeof(float));
            if (codec_encode_v2(r, "m", "1", &out, &out_json_len) == 0)
                check_id_echo(r, &out);
            buf_release(&out);
            codec_encode_v1(r, &out);
            buf_release(&out);
        } else if (e.msg[0] == '\0') {
            abort();
        }
        infer_request_destroy(r);
    }

    fuzz_document(body, body_len, CODEC_FROM_CLIENT);
    fuzz_document(body, body_len, CODEC_FROM_STORE);
    for (int io = INFERD_JSON_IO_NONE; io <= INFERD_JSON_IO_ONLY; io++) {
        fuzz_for_model(io, body, body_len, json_len, CODEC_FROM_CLIENT);
        fuzz_for_model(io, body, body_len, -1, CODEC_FROM_STORE); /* stored text is JSON only */
    }
    fuzz_response(body, body_len);
    return 0;
}
