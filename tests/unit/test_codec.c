/*
 * test_codec.c: the v2/v1 decoder (JSON and binary tensor data) and the response encoder.
 * Every rejection must name the field at fault.
 *
 * Also the JSON-document forms (codec_decode_document, codec_decode_for_model by json_io,
 * codec_encode_result) and the upstream side of the http backend (codec_encode_request_v2,
 * which must round-trip through codec_decode_v2 bit for bit, and codec_decode_response_v2).
 */
#define _GNU_SOURCE /* memmem */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "kserve/codec.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

static int decode_err(const char *json, struct err *e)
{
    struct infer_request *r = NULL;
    int rc = codec_decode_v2(json, strlen(json), -1, &r, e);

    assert_null(r);
    return rc;
}

static void test_flat_and_nested_agree(void **state)
{
    const char *flat = "{\"id\":\"q1\",\"inputs\":[{\"name\":\"input__0\",\"datatype\":\"FP32\","
                       "\"shape\":[2,3],\"data\":[1,2,3,4,5,6]}]}";
    const char *nested = "{\"inputs\":[{\"name\":\"input__0\",\"datatype\":\"FP32\","
                         "\"shape\":[2,3],\"data\":[[1,2,3],[4,5,6]]}]}";
    struct infer_request *a = NULL, *b = NULL;
    struct err e = {0};

    (void)state;
    assert_int_equal(codec_decode_v2(flat, strlen(flat), -1, &a, &e), 0);
    assert_int_equal(codec_decode_v2(nested, strlen(nested), -1, &b, &e), 0);
    assert_string_equal(a->id, "q1");
    assert_int_equal(a->inputs[0].data_bytes, 24);
    assert_memory_equal(a->inputs[0].data, b->inputs[0].data, 24);
    assert_int_equal(infer_request_rows(a), 2);
    infer_request_destroy(a);
    infer_request_destroy(b);
}

static void test_null_is_missing(void **state)
{
    const char *j = "{\"inputs\":[{\"name\":\"x\",\"datatype\":\"FP32\",\"shape\":[1,2],"
                    "\"data\":[null,2.5]}]}";
    struct infer_request *r = NULL;
    struct err e = {0};

    (void)state;
    assert_int_equal(codec_decode_v2(j, strlen(j), -1, &r, &e), 0);
    assert_true(isnan(((float *)r->inputs[0].data)[0]));
    infer_request_destroy(r);
    j = "{\"inputs\":[{\"name\":\"x\",\"datatype\":\"INT32\",\"shape\":[1],\"data\":[null]}]}";
    assert_int_equal(decode_err(j, &e), ERR_SHAPE);
    assert_non_null(strstr(e.msg, "inputs[0].data[0]"));
}

static void test_rejections_name_the_field(void **state)
{
    struct err e = {0};

    (void)state;
    assert_int_equal(decode_err("{\"inputs\": [", &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "malformed JSON"));
    assert_int_equal(decode_err("[1,2]", &e), ERR_INVALID);
    assert_int_equal(decode_err("{}", &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "inputs"));
    assert_int_equal(
        decode_err("{\"inputs\":[{\"datatype\":\"FP32\",\"shape\":[1],\"data\":[1]}]}", &e),
        ERR_INVALID);
    assert_non_null(strstr(e.msg, "inputs[0].name"));
    assert_int_equal(
        decode_err(
            "{\"inputs\":[{\"name\":\"x\",\"datatype\":\"FP99\",\"shape\":[1],\"data\":[1]}]}", &e),
        ERR_SHAPE);
    assert_non_null(strstr(e.msg, "FP99"));
    assert_int_equal(
        decode_err(
            "{\"inputs\":[{\"name\":\"x\",\"datatype\":\"FP32\",\"shape\":[3],\"data\":[1,2]}]}",
            &e),
        ERR_SHAPE);
    assert_non_null(strstr(e.msg, "2 elements, shape declares 3"));
    assert_int_equal(decode_err("{\"inputs\":[{\"name\":\"x\",\"datatype\":\"FP32\",\"shape\":[2],"
                                "\"data\":[1,\"a\"]}]}",
                                &e),
                     ERR_SHAPE);
    assert_non_null(strstr(e.msg, "inputs[0].data[1]: expected a number"));
    assert_int_equal(decode_err("{\"inputs\":[{\"name\":\"x\",\"datatype\":\"FP32\","
                                "\"shape\":[1000000000000,1000000],\"data\":[1]}]}",
                                &e),
                     ERR_SHAPE);
    assert_int_equal(decode_err("{\"inputs\":[{\"name\":\"x\",\"datatype\":\"FP32\","
                                "\"shape\":[1,1,1,1,1,1,1,1,1],\"data\":[1]}]}",
                                &e),
                     ERR_SHAPE);
    assert_non_null(strstr(e.msg, "limit is 8"));
    assert_int_equal(decode_err("{\"inputs\":[{\"name\":\"x\",\"datatype\":\"INT32\",\"shape\":[1],"
                                "\"data\":[1e12]}]}",
                                &e),
                     ERR_SHAPE);
}

static void test_binary_extension(void **state)
{
    const char *hdr = "{\"inputs\":[{\"name\":\"x\",\"datatype\":\"FP32\",\"shape\":[1,2],"
                      "\"parameters\":{\"binary_data_size\":8}}],"
                      "\"parameters\":{\"binary_data_output\":true}}";
    float vals[2] = {1.5f, -2.0f};
    char body[512];
    size_t hl = strlen(hdr);
    struct infer_request *r = NULL;
    struct buf out = {0};
    struct err e = {0};
    int64_t json_len, shape[] = {1};
    float *y;

    (void)state;
    memcpy(body, hdr, hl);
    memcpy(body + hl, vals, 8);
    assert_int_equal(codec_decode_v2(body, hl + 8, (int64_t)hl, &r, &e), 0);
    assert_memory_equal(r->inputs[0].data, vals, 8);
    y = tensor_output_alloc(&r->abi, "y", INFERD_TYPE_FP32, shape, 1, 4);
    *y = 0.25f;
    assert_int_equal(codec_encode_v2(r, "m", "1", &out, &json_len), 0);
    assert_true(json_len > 0 && (size_t)json_len + 4 == out.len);
    assert_non_null(strstr(out.data, "\"binary_data_size\":4"));
    assert_memory_equal(out.data + json_len, y, 4);
    buf_release(&out);
    infer_request_destroy(r);
    /* a size that runs past the body, and bytes nobody claims */
    assert_int_not_equal(codec_decode_v2(body, hl + 4, (int64_t)hl, &r, &e), 0);
    assert_non_null(strstr(e.msg, "binary_data_size"));
    assert_int_equal(codec_decode_v2(body, hl + 8, (int64_t)hl + 100, &r, &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "Inference-Header-Content-Length"));
}

static void test_encode_json_and_v1(void **state)
{
    const char *j = "{\"id\":\"a\\\"b\",\"inputs\":[{\"name\":\"x\",\"datatype\":\"FP32\","
                    "\"shape\":[2,2],\"data\":[1,2,3,4]}]}";
    struct infer_request *r = NULL;
    struct buf out = {0};
    struct err e = {0};
    int64_t json_len, shape[] = {2, 2};
    float *y;

    (void)state;
    assert_int_equal(codec_decode_v2(j, strlen(j), -1, &r, &e), 0);
    y = tensor_output_alloc(&r->abi, "output__0", INFERD_TYPE_FP32, shape, 2, 16);
    y[0] = 0.5f, y[1] = 0.25f, y[2] = NAN, y[3] = 1;
    assert_int_equal(codec_encode_v2(r, "m", "3", &out, &json_len), 0);
    assert_int_equal(json_len, -1);
    assert_string_equal(out.data, "{\"model_name\":\"m\",\"model_version\":\"3\",\"id\":\"a\\\"b\","
                                  "\"outputs\":[{\"name\":\"output__0\",\"datatype\":\"FP32\","
                                  "\"shape\":[2,2],\"data\":[0.5,0.25,null,1]}]}");
    buf_release(&out);
    assert_int_equal(codec_encode_v1(r, &out), 0);
    assert_string_equal(out.data, "{\"predictions\":[[0.5,0.25],[null,1]]}");
    buf_release(&out);
    infer_request_destroy(r);
}

static void test_v1_decode(void **state)
{
    const char *ok = "{\"instances\":[[1,2],[3,null]]}";
    const char *ragged = "{\"instances\":[[1,2],[3]]}";
    struct infer_request *r = NULL;
    struct err e = {0};

    (void)state;
    assert_int_equal(codec_decode_v1(ok, strlen(ok), "in", NULL, &r, &e), 0);
    assert_int_equal(r->inputs[0].shape[0], 2);
    assert_int_equal(r->inputs[0].shape[1], 2);
    assert_true(isnan(((double *)r->inputs[0].data)[3]));
    infer_request_destroy(r);
    assert_int_equal(codec_decode_v1(ragged, strlen(ragged), "in", NULL, &r, &e), ERR_SHAPE);
    assert_non_null(strstr(e.msg, "instances[1]"));
}

/* Instances that are objects map by feature name, in any order; unknown and missing names
 * are errors naming them; a model without names refuses objects. */
static void test_v1_objects_by_name(void **state)
{
    static const char *const names[] = {"f_age", "f_income", "b"};
    const char *ok = "{\"instances\":[{\"f_income\":5.2e4,\"b\":null,\"f_age\":41},"
                     "{\"b\":1,\"f_age\":2,\"f_income\":3}]}";
    const char *unknown = "{\"instances\":[{\"f_income\":1,\"b\":1,\"f_age\":1,\"zip\":1}]}";
    const char *missing = "{\"instances\":[{\"f_income\":1,\"b\":1}]}";
    const char *mixed = "{\"instances\":[{\"f_income\":1,\"b\":1,\"f_age\":1},[1,2,3]]}";
    struct features f;
    struct infer_request *r = NULL;
    struct err e = {0};
    const double *d;

    (void)state;
    assert_int_equal(features_init(&f, names, NULL, 3, &e), 0);
    assert_int_equal(features_find(&f, "f_income", 8), 1);
    assert_int_equal(features_find(&f, "f_inc", 5), -1);
    assert_int_equal(codec_decode_v1(ok, strlen(ok), "in", &f, &r, &e), 0);
    assert_int_equal(r->inputs[0].shape[0], 2);
    assert_int_equal(r->inputs[0].shape[1], 3);
    d = r->inputs[0].data;
    assert_true(d[0] == 41 && d[1] == 5.2e4 && isnan(d[2]));
    assert_true(d[3] == 2 && d[4] == 3 && d[5] == 1);
    infer_request_destroy(r);
    assert_int_equal(codec_decode_v1(unknown, strlen(unknown), "in", &f, &r, &e), ERR_SHAPE);
    assert_non_null(strstr(e.msg, "'zip'"));
    assert_int_equal(codec_decode_v1(missing, strlen(missing), "in", &f, &r, &e), ERR_SHAPE);
    assert_non_null(strstr(e.msg, "missing feature 'f_age'"));
    assert_int_equal(codec_decode_v1(mixed, strlen(mixed), "in", &f, &r, &e), ERR_SHAPE);
    assert_non_null(strstr(e.msg, "instances[1]"));
    assert_int_equal(codec_decode_v1(ok, strlen(ok), "in", NULL, &r, &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "no feature names"));
    features_release(&f);
    static const char *const twice[] = {"a", "b", "a"};
    assert_int_equal(features_init(&f, twice, NULL, 3, &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "'a' appears twice"));
}

/* ---- JSON documents ---- */

/* Checks that `r` is the document request for `body`: one BYTES input "json" of shape [1]
 * holding the 4-byte little-endian length and then the bytes, untouched. */
static void assert_document(const struct infer_request *r, const char *body, size_t len)
{
    const unsigned char *p;

    assert_non_null(r);
    assert_int_equal(r->is_document, 1);
    assert_int_equal(r->n_inputs, 1);
    assert_string_equal(r->inputs[0].name, "json");
    assert_int_equal(r->inputs[0].datatype, INFERD_TYPE_BYTES);
    assert_int_equal(r->inputs[0].n_dims, 1);
    assert_int_equal(r->inputs[0].shape[0], 1);
    assert_int_equal(r->inputs[0].data_bytes, len + 4);
    p = r->inputs[0].data;
    assert_int_equal(
        (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24, len);
    assert_memory_equal(p + 4, body, len);
    /* bound for the backend, and one row for the batcher */
    assert_ptr_equal(r->abi.inputs, r->inputs);
    assert_int_equal(r->abi.n_inputs, 1);
    assert_int_equal(infer_request_rows(r), 1);
}

static void test_document_takes_any_json_value(void **state)
{
    static const char *const docs[] = {
        "{\"a\":[1,2,{\"b\":null}],\"a\":3}", /* duplicate keys are the upstream's business */
        "[1,\"x\",[]]",
        "\"just a string\"",
        "42",
        "-1.5e3",
        "true",
        "null",
        " \n {\"kept\" :  \"as sent\"}\t\n",
        "{\"inputs\":[{\"name\":\"x\"}]}", /* looks like v2: a document all the same */
    };
    struct infer_request *r = NULL;
    struct err e = {0};

    (void)state;
    for (size_t i = 0; i < sizeof(docs) / sizeof(docs[0]); i++) {
        assert_int_equal(codec_decode_document(docs[i], strlen(docs[i]), CODEC_FROM_CLIENT, &r, &e),
                         0);
        assert_document(r, docs[i], strlen(docs[i]));
        infer_request_destroy(r);
    }
    /* only body_len bytes count: the body need not end in a NUL */
    assert_int_equal(codec_decode_document("[1]garbage", 3, CODEC_FROM_CLIENT, &r, &e), 0);
    assert_document(r, "[1]", 3);
    infer_request_destroy(r);
}

static void test_document_rejects_malformed_json(void **state)
{
    static const struct {
        const char *body, *where;
    } bad[] = {
        {"{\"a\":", "line 1 column"}, {"{\n  \"a\": 1,\n  oops\n}", "line 3 column"},
        {"", "line 1 column"},        {"{} {}", "line 1 column"},
        {"[1,2", "line 1 column"},    {"\"\\ud800\"", "line 1 column"}, /* a lone surrogate */
        {"nul", "line 1 column"},
    };
    struct infer_request *r = NULL;
    struct err e = {0};

    (void)state;
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        r = (struct infer_request *)&e; /* must be reset to NULL */
        assert_int_equal(
            codec_decode_document(bad[i].body, strlen(bad[i].body), CODEC_FROM_CLIENT, &r, &e),
            ERR_INVALID);
        assert_null(r);
        assert_non_null(strstr(e.msg, "malformed JSON"));
        assert_non_null(strstr(e.msg, bad[i].where));
    }
    /* a NUL inside the body is not JSON either */
    assert_int_equal(codec_decode_document("[1]\0", 4, CODEC_FROM_CLIENT, &r, &e), ERR_INVALID);
    /* and a good document still works afterwards */
    assert_int_equal(codec_decode_document("{}", 2, CODEC_FROM_CLIENT, &r, &e), 0);
    assert_document(r, "{}", 2);
    infer_request_destroy(r);
}

/* ---- text read from a location (CODEC_FROM_STORE) ---- */

#define V2_ONE(datatype, shape, data)                                                              \
    "{\"inputs\":[{\"name\":\"input__0\",\"datatype\":\"" datatype "\",\"shape\":" shape           \
    ",\"data\":" data "}]}"

/* Decodes `text` as read from a location and checks it against a one-input model of
 * `datatype` [-1, 2] (json_io as given); returns the message of whichever step refused it. */
static int stored_error(const char *text, enum inferd_datatype datatype, int json_io, struct err *e)
{
    struct inferd_tensor in = {
        .name = "input__0", .datatype = datatype, .n_dims = 2, .shape = {-1, 2}};
    struct inferd_tensor out = {
        .name = "output__0", .datatype = INFERD_TYPE_FP32, .n_dims = 1, .shape = {-1}};
    struct inferd_model_info info = {.inputs = &in,
                                     .n_inputs = 1,
                                     .outputs = &out,
                                     .n_outputs = 1,
                                     .is_batched = 1,
                                     .json_io = json_io};
    struct infer_request *r = NULL;
    int rc = codec_decode_for_model(&info, text, strlen(text), -1, CODEC_FROM_STORE, &r, e);

    if (rc == 0)
        rc = tensor_check_inputs(r, &info, e);
    infer_request_destroy(r);
    return rc;
}

/* A job's input_location may name any file the server can read: whatever is wrong with it, the
 * job's error names the field or position and the problem, and quotes nothing of the file
 * (issue 13: "near 'root'" for /etc/passwd). */
static void test_stored_errors_quote_nothing(void **state)
{
    static const struct {
        const char *text;
        enum inferd_datatype model_type;
        int json_io;
        const char *msg; /* exactly */
    } cases[] = {
        {"root:x:0:0:root:/root:/bin/bash\n", INFERD_TYPE_FP32, INFERD_JSON_IO_NONE,
         "malformed JSON at line 1 column 4: invalid token"},
        {"root:x:0:0:root:/root:/bin/bash\n", INFERD_TYPE_FP32, INFERD_JSON_IO_ONLY,
         "malformed JSON at line 1 column 4: invalid token"},
        {"{\"secret\":1,\"secret\":2}", INFERD_TYPE_FP32, INFERD_JSON_IO_NONE,
         "malformed JSON: an object has the same key twice"},
        {V2_ONE("SECRET", "[1,2]", "[1,2]"), INFERD_TYPE_FP32, INFERD_JSON_IO_NONE,
         "inputs[0].datatype: unknown datatype (BOOL, INT32, INT64, FP32, FP64 or BYTES)"},
        {V2_ONE("INT32", "[1,2]", "[1,31415926535]"), INFERD_TYPE_INT32, INFERD_JSON_IO_NONE,
         "inputs[0].data[1]: the value does not fit in INT32"},
        {V2_ONE("INT64", "[1,2]", "[1,3.14159]"), INFERD_TYPE_INT64, INFERD_JSON_IO_NONE,
         "inputs[0].data[1]: the value is not an integer (INT64 or out of its range)"},
        {V2_ONE("FP32", "[1,2]", "[1,3.14159e300]"), INFERD_TYPE_FP32, INFERD_JSON_IO_NONE,
         "inputs[0].data[1]: the value does not fit in FP32"},
        {V2_ONE("INT64", "[1,2]", "[1,31415926535]"), INFERD_TYPE_INT32, INFERD_JSON_IO_NONE,
         "input 'input__0': value 1 does not fit in INT32"},
        {V2_ONE("FP32", "[1,2]", "[1,314159]"), INFERD_TYPE_BOOL, INFERD_JSON_IO_NONE,
         "input 'input__0': datatype FP32, model expects BOOL"},
        {V2_ONE("INT64", "[1,2]", "[1,314159]"), INFERD_TYPE_BOOL, INFERD_JSON_IO_NONE,
         "input 'input__0': value 1 is not 0 or 1 (BOOL)"},
        {"{\"inputs\":[{\"name\":\"secret\",\"datatype\":\"FP32\",\"shape\":[1,2],"
         "\"data\":[1,2]}]}",
         INFERD_TYPE_FP32, INFERD_JSON_IO_NONE,
         "inputs[0]: unknown input name: the model's first input is 'input__0'"},
        {"{\"inputs\":[{\"name\":\"input__0\",\"datatype\":\"FP32\",\"shape\":[1,2],"
         "\"data\":[1,2]}],\"outputs\":[{\"name\":\"secret\"}]}",
         INFERD_TYPE_FP32, INFERD_JSON_IO_NONE, "outputs[0]: unknown output name"},
    };

    (void)state;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct err e = {0};
        assert_int_not_equal(stored_error(cases[i].text, cases[i].model_type, cases[i].json_io, &e),
                             0);
        if (strcmp(e.msg, cases[i].msg) != 0)
            fail_msg("case %zu: got '%s', expected '%s'", i, e.msg, cases[i].msg);
    }
}

/* The same texts sent by a client are still quoted back to it: it knows what it sent. */
static void test_client_errors_still_quote(void **state)
{
    struct err e = {0};
    struct infer_request *r = NULL;
    const char *passwd = "root:x:0:0";
    const char *dt = V2_ONE("SECRET", "[1,2]", "[1,2]");
    const char *i32 = V2_ONE("INT32", "[1,2]", "[1,31415926535]");

    (void)state;
    assert_int_equal(codec_decode_v2(passwd, strlen(passwd), -1, &r, &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "near 'root'"));
    assert_int_equal(codec_decode_v2(dt, strlen(dt), -1, &r, &e), ERR_SHAPE);
    assert_non_null(strstr(e.msg, "unknown datatype 'SECRET'"));
    assert_int_equal(codec_decode_v2(i32, strlen(i32), -1, &r, &e), ERR_SHAPE);
    assert_non_null(strstr(e.msg, "31415926535 does not fit in INT32"));
    assert_null(r);
}

/* An "id" is any JSON string: \u0000 in it is kept and echoed back escaped (issue 13). */
static void test_id_may_hold_nul(void **state)
{
    static const char body[] = "{\"id\":\"a\\u0000b\",\"inputs\":[{\"name\":\"x\","
                               "\"datatype\":\"FP32\",\"shape\":[1,1],\"data\":[1]}]}";
    struct infer_request *r = NULL;
    struct err e = {0};
    struct buf out = {0};
    int64_t json_len;

    (void)state;
    assert_int_equal(codec_decode_v2(body, strlen(body), -1, &r, &e), 0);
    assert_int_equal(r->id_len, 3);
    assert_memory_equal(r->id, "a\0b", 4);
    assert_int_equal(codec_encode_v2(r, "m", "1", &out, &json_len), 0);
    assert_non_null(memmem(out.data, out.len, "\"id\":\"a\\u0000b\"", 14));
    buf_release(&out);
    infer_request_destroy(r);
}

static const char v2_body[] = "{\"inputs\":[{\"name\":\"x\",\"datatype\":\"FP32\",\"shape\":[1,2],"
                              "\"data\":[1,2]}]}";

static void test_decode_for_model_by_json_io(void **state)
{
    static const struct {
        int json_io;
        const char *body;
        int rc;          /* 0, or the error */
        int is_document; /* when rc is 0 */
    } cases[] = {
        /* NONE: always a v2 request */
        {INFERD_JSON_IO_NONE, v2_body, 0, 0},
        {INFERD_JSON_IO_NONE, "[1,2]", ERR_INVALID, 0},
        {INFERD_JSON_IO_NONE, "{\"text\":\"hi\"}", ERR_INVALID, 0},
        /* ONLY: always a document, even one that looks like v2 */
        {INFERD_JSON_IO_ONLY, v2_body, 0, 1},
        {INFERD_JSON_IO_ONLY, "[1,2]", 0, 1},
        {INFERD_JSON_IO_ONLY, "\"hi\"", 0, 1},
        {INFERD_JSON_IO_ONLY, "{\"inputs\":", ERR_INVALID, 0},
        /* ALSO: v2 when an object has an "inputs" list, else a document */
        {INFERD_JSON_IO_ALSO, v2_body, 0, 0},
        {INFERD_JSON_IO_ALSO, "{\"text\":\"hi\"}", 0, 1},
        {INFERD_JSON_IO_ALSO, "{\"inputs\":\"not a list\"}", 0, 1},
        {INFERD_JSON_IO_ALSO, "{\"inputs\":{\"x\":1}}", 0, 1},
        {INFERD_JSON_IO_ALSO, "[{\"inputs\":[]}]", 0, 1},
        {INFERD_JSON_IO_ALSO, "3", 0, 1},
        {INFERD_JSON_IO_ALSO, "{\"inputs\":[]}", ERR_INVALID, 0}, /* v2, and an empty one */
        {INFERD_JSON_IO_ALSO,
         "{\"inputs\":[{\"name\":\"x\",\"datatype\":\"FP32\",\"shape\":[2],\"data\":[1]}]}",
         ERR_SHAPE, 0},
        {INFERD_JSON_IO_ALSO, "{\"inputs\":[", ERR_INVALID, 0},
    };
    struct inferd_model_info info = {0};
    struct infer_request *r = NULL;
    struct err e = {0};

    (void)state;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        size_t len = strlen(cases[i].body);
        info.json_io = cases[i].json_io;
        e.msg[0] = '\0';
        assert_int_equal(
            codec_decode_for_model(&info, cases[i].body, len, -1, CODEC_FROM_CLIENT, &r, &e),
            cases[i].rc);
        if (cases[i].rc != 0) {
            assert_null(r);
            assert_true(e.msg[0] != '\0');
            continue;
        }
        if (cases[i].is_document) {
            assert_document(r, cases[i].body, len);
        } else {
            assert_int_equal(r->is_document, 0);
            assert_string_equal(r->inputs[0].name, "x");
            assert_int_equal(r->inputs[0].data_bytes, 8);
        }
        infer_request_destroy(r);
    }
}

static void test_decode_for_model_binary_is_v2(void **state)
{
    const char *hdr = "{\"inputs\":[{\"name\":\"x\",\"datatype\":\"FP32\",\"shape\":[2],"
                      "\"parameters\":{\"binary_data_size\":8}}]}";
    struct inferd_model_info info = {.json_io = INFERD_JSON_IO_ALSO};
    float vals[2] = {0.5f, -4.0f};
    char body[256];
    size_t hl = strlen(hdr);
    struct infer_request *r = NULL;
    struct err e = {0};

    (void)state;
    memcpy(body, hdr, hl);
    memcpy(body + hl, vals, 8);
    /* a binary body (Inference-Header-Content-Length) can only be a v2 request */
    assert_int_equal(
        codec_decode_for_model(&info, body, hl + 8, (int64_t)hl, CODEC_FROM_CLIENT, &r, &e), 0);
    assert_int_equal(r->is_document, 0);
    assert_memory_equal(r->inputs[0].data, vals, 8);
    infer_request_destroy(r);
    info.json_io = INFERD_JSON_IO_NONE;
    assert_int_equal(
        codec_decode_for_model(&info, body, hl + 8, (int64_t)hl, CODEC_FROM_CLIENT, &r, &e), 0);
    assert_int_equal(r->is_document, 0);
    infer_request_destroy(r);
}

/* Plays a json_io backend: answers with one "json" output holding `answer`. */
static void answer_document(struct infer_request *r, const char *answer)
{
    uint32_t n = (uint32_t)strlen(answer);
    int64_t shape[] = {1};
    unsigned char *p =
        tensor_output_alloc(&r->abi, "json", INFERD_TYPE_BYTES, shape, 1, (size_t)n + 4);

    assert_non_null(p);
    p[0] = (unsigned char)n, p[1] = (unsigned char)(n >> 8), p[2] = (unsigned char)(n >> 16),
    p[3] = (unsigned char)(n >> 24);
    memcpy(p + 4, answer, n);
}

static void test_encode_result(void **state)
{
    const char *answer = "{\"choices\":[{\"text\":\"caf\xc3\xa9\"}], \"n\" : 1 }";
    struct infer_request *doc = NULL, *v2 = NULL;
    struct buf out = {0}, want = {0};
    struct err e = {0};
    int64_t json_len = 0, want_len = 0, shape[] = {1};
    float *y;

    (void)state;
    /* a document request with no "json" output (yet) answers null */
    assert_int_equal(codec_decode_document("{\"prompt\":\"hi\"}", 15, CODEC_FROM_CLIENT, &doc, &e),
                     0);
    assert_int_equal(codec_encode_result(doc, "m", "1", &out, &json_len), 0);
    assert_int_equal(json_len, -1);
    assert_string_equal(out.data, "null");
    buf_release(&out);
    /* with one, the backend's bytes exactly, appended to what `out` held */
    answer_document(doc, answer);
    assert_int_equal(buf_puts(&out, "<"), 0);
    assert_int_equal(codec_encode_result(doc, "m", "1", &out, &json_len), 0);
    assert_int_equal(json_len, -1);
    assert_int_equal(out.len, 1 + strlen(answer));
    assert_memory_equal(out.data + 1, answer, strlen(answer));
    buf_release(&out);
    infer_request_destroy(doc);

    /* a v2 request: what codec_encode_v2 writes, binary outputs included */
    assert_int_equal(codec_decode_v2(v2_body, strlen(v2_body), -1, &v2, &e), 0);
    y = tensor_output_alloc(&v2->abi, "y", INFERD_TYPE_FP32, shape, 1, 4);
    *y = 2.5f;
    assert_int_equal(codec_encode_result(v2, "m", "1", &out, &json_len), 0);
    assert_int_equal(codec_encode_v2(v2, "m", "1", &want, &want_len), 0);
    assert_int_equal(json_len, want_len);
    assert_int_equal(out.len, want.len);
    assert_memory_equal(out.data, want.data, want.len);
    assert_non_null(strstr(out.data, "\"data\":[2.5]"));
    buf_release(&out);
    buf_release(&want);
    v2->binary_output_all = 1;
    assert_int_equal(codec_encode_result(v2, "m", "1", &out, &json_len), 0);
    assert_int_equal(codec_encode_v2(v2, "m", "1", &want, &want_len), 0);
    assert_true(json_len > 0);
    assert_int_equal(json_len, want_len);
    assert_int_equal(out.len, want.len);
    assert_memory_equal(out.data, want.data, want.len);
    buf_release(&out);
    buf_release(&want);
    infer_request_destroy(v2);
}

/* ---- v2 requests to an upstream, and its responses ---- */

static void assert_same_tensors(const struct infer_request *a, const struct infer_request *b)
{
    assert_int_equal(a->n_inputs, b->n_inputs);
    for (size_t i = 0; i < a->n_inputs; i++) {
        const struct inferd_tensor *x = &a->inputs[i], *y = &b->inputs[i];
        assert_string_equal(x->name, y->name);
        assert_int_equal(x->datatype, y->datatype);
        assert_int_equal(x->n_dims, y->n_dims);
        assert_memory_equal(x->shape, y->shape, sizeof(int64_t) * (size_t)x->n_dims);
        assert_int_equal(x->data_bytes, y->data_bytes);
        if (x->data_bytes)
            assert_memory_equal(x->data, y->data, x->data_bytes);
    }
}

/* Encodes r's inputs as a v2 request, decodes that, and checks the tensors are identical. */
static void assert_round_trip(const struct infer_request *r)
{
    struct infer_request *back = NULL;
    struct buf out = {0};
    struct err e = {0};

    assert_int_equal(codec_encode_request_v2(r, &out), 0);
    assert_int_equal(strncmp(out.data, "{\"inputs\":[", 11), 0);
    assert_int_equal(codec_decode_v2(out.data, out.len, -1, &back, &e), 0);
    assert_same_tensors(r, back);
    infer_request_destroy(back);
    buf_release(&out);
}

static void test_encode_request_v2_text(void **state)
{
    const char *j = "{\"id\":\"not sent\",\"inputs\":[{\"name\":\"a\",\"datatype\":\"INT32\","
                    "\"shape\":[2],\"data\":[1,-2]},{\"name\":\"s\",\"datatype\":\"BYTES\","
                    "\"shape\":[1],\"data\":[\"q\\\"\"]}],\"outputs\":[{\"name\":\"y\"}]}";
    struct infer_request *r = NULL;
    struct buf out = {0};
    struct err e = {0};

    (void)state;
    assert_int_equal(codec_decode_v2(j, strlen(j), -1, &r, &e), 0);
    assert_int_equal(codec_encode_request_v2(r, &out), 0);
    assert_string_equal(out.data,
                        "{\"inputs\":[{\"name\":\"a\",\"datatype\":\"INT32\",\"shape\":[2],"
                        "\"data\":[1,-2]},{\"name\":\"s\",\"datatype\":\"BYTES\",\"shape\":[1],"
                        "\"data\":[\"q\\\"\"]}]}");
    buf_release(&out);
    infer_request_destroy(r);
}

static void test_encode_request_v2_round_trips(void **state)
{
    /* every numeric input comes as binary data, so its bits are exactly these */
    static const float f32[8] = {0.1f,
                                 1.0f / 3.0f,
                                 1.17549435e-38f /* FLT_MIN */,
                                 3.40282347e38f /* FLT_MAX */,
                                 1.40129846e-45f /* denormal */,
                                 -2.5f,
                                 16777217.0f,
                                 123456.789f};
    static const double f64[4] = {0.1, 1.7976931348623157e308, 4.9406564584124654e-324, -1.0 / 3.0};
    static const int32_t i32[3] = {INT32_MIN, -1, INT32_MAX};
    static const int64_t i64[3] = {INT64_MIN, 0, INT64_MAX};
    static const uint8_t b8[2] = {0, 1};
    const char *hdr =
        "{\"inputs\":["
        "{\"name\":\"f32\",\"datatype\":\"FP32\",\"shape\":[2,4],"
        "\"parameters\":{\"binary_data_size\":32}},"
        "{\"name\":\"f64\",\"datatype\":\"FP64\",\"shape\":[4],"
        "\"parameters\":{\"binary_data_size\":32}},"
        "{\"name\":\"i32\",\"datatype\":\"INT32\",\"shape\":[3],"
        "\"parameters\":{\"binary_data_size\":12}},"
        "{\"name\":\"i64\",\"datatype\":\"INT64\",\"shape\":[3,1],"
        "\"parameters\":{\"binary_data_size\":24}},"
        "{\"name\":\"b\",\"datatype\":\"BOOL\",\"shape\":[2],"
        "\"parameters\":{\"binary_data_size\":2}},"
        "{\"name\":\"s\",\"datatype\":\"BYTES\",\"shape\":[2,2],\"data\":[\"\",\"plain\","
        "\"quote\\\" back\\\\ tab\\t nl\\n ctl\\u0001 del\\u007f\",\"caf\\u00e9 \\u2713 "
        "\\ud83d\\ude00\"]},"
        "{\"name\":\"none\",\"datatype\":\"FP32\",\"shape\":[2,0],\"data\":[]},"
        "{\"name\":\"scalar\",\"datatype\":\"INT64\",\"shape\":[],\"data\":[7]}]}";
    char body[2048];
    size_t off = strlen(hdr);
    struct infer_request *r = NULL;
    struct err e = {0};

    (void)state;
    memcpy(body, hdr, off);
    memcpy(body + off, f32, sizeof(f32)), off += sizeof(f32);
    memcpy(body + off, f64, sizeof(f64)), off += sizeof(f64);
    memcpy(body + off, i32, sizeof(i32)), off += sizeof(i32);
    memcpy(body + off, i64, sizeof(i64)), off += sizeof(i64);
    memcpy(body + off, b8, sizeof(b8)), off += sizeof(b8);
    assert_int_equal(codec_decode_v2(body, off, (int64_t)strlen(hdr), &r, &e), 0);
    assert_int_equal(r->n_inputs, 8);
    assert_round_trip(r);
    infer_request_destroy(r);
}

#define N_RANDOM_FLOATS 4096

static void test_encode_request_v2_fp32_is_exact(void **state)
{
    const char *hdr = "{\"inputs\":[{\"name\":\"x\",\"datatype\":\"FP32\",\"shape\":[4096],"
                      "\"parameters\":{\"binary_data_size\":16384}}]}";
    static char body[256 + N_RANDOM_FLOATS * 4];
    size_t hl = strlen(hdr);
    uint32_t seed = 12345;
    struct infer_request *r = NULL;
    struct err e = {0};

    (void)state;
    memcpy(body, hdr, hl);
    /* finite bit patterns of every exponent; -0, infinities and NaN have no exact JSON form */
    for (int i = 0; i < N_RANDOM_FLOATS; i++) {
        uint32_t bits;
        do {
            seed = seed * 1664525u + 1013904223u;
            bits = seed;
        } while ((bits & 0x7f800000u) == 0x7f800000u || bits == 0x80000000u);
        memcpy(body + hl + (size_t)i * 4, &bits, 4);
    }
    assert_int_equal(codec_decode_v2(body, hl + N_RANDOM_FLOATS * 4, (int64_t)hl, &r, &e), 0);
    assert_round_trip(r);
    infer_request_destroy(r);
}

static void test_decode_response_v2(void **state)
{
    const char *ok = "{\"model_name\":\"up\",\"model_version\":\"2\",\"id\":\"7\",\"outputs\":["
                     "{\"name\":\"y\",\"datatype\":\"FP32\",\"shape\":[2],\"data\":[0.5,-1]},"
                     "{\"name\":\"label\",\"datatype\":\"BYTES\",\"shape\":[1],\"data\":[\"hi\"]}"
                     "]}";
    struct infer_request *r = NULL;
    struct err e = {0};

    (void)state;
    assert_int_equal(codec_decode_response_v2(ok, strlen(ok), &r, &e), 0);
    assert_int_equal(r->n_inputs, 2);
    assert_string_equal(r->inputs[0].name, "y");
    assert_int_equal(r->inputs[0].datatype, INFERD_TYPE_FP32);
    assert_int_equal(r->inputs[0].data_bytes, 8);
    assert_true(((float *)r->inputs[0].data)[0] == 0.5f && ((float *)r->inputs[0].data)[1] == -1);
    assert_string_equal(r->inputs[1].name, "label");
    assert_int_equal(r->inputs[1].data_bytes, 6);
    assert_memory_equal(r->inputs[1].data, "\x02\0\0\0hi", 6);
    infer_request_destroy(r);
}

static void test_decode_response_v2_rejections(void **state)
{
    static const struct {
        const char *body;
        int rc;
        const char *says;
    } bad[] = {
        {"{\"model_name\":\"up\"}", ERR_INVALID, "outputs"},
        {"{\"error\":\"model is loading\"}", ERR_INVALID, "outputs"},
        {"{\"outputs\":{\"name\":\"y\"}}", ERR_INVALID, "outputs"},
        {"{\"outputs\":\"y\"}", ERR_INVALID, "outputs"},
        {"{\"outputs\":null}", ERR_INVALID, "outputs"},
        {"[{\"outputs\":[]}]", ERR_INVALID, "JSON object"},
        {"{\"outputs\":[", ERR_INVALID, "malformed JSON"},
        {"{\"outputs\":[1]}", ERR_INVALID, "[0]"},
        {"{\"outputs\":[{\"name\":\"y\",\"datatype\":\"FP32\",\"shape\":[2],\"data\":[1]}]}",
         ERR_SHAPE, "[0].data"},
        {"{\"outputs\":[{\"name\":\"y\",\"datatype\":\"FP32\",\"shape\":[1],\"data\":[1]},"
         "{\"name\":\"z\",\"datatype\":\"FP32\",\"shape\":[1]}]}",
         ERR_INVALID, "[1].data"},
    };
    char many[2048];
    size_t off;
    struct infer_request *r = NULL;
    struct err e = {0};

    (void)state;
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        r = (struct infer_request *)&e; /* must be reset to NULL */
        e.msg[0] = '\0';
        assert_int_equal(codec_decode_response_v2(bad[i].body, strlen(bad[i].body), &r, &e),
                         bad[i].rc);
        assert_null(r);
        assert_non_null(strstr(e.msg, bad[i].says));
    }
    /* more outputs than a request holds */
    off = (size_t)snprintf(many, sizeof(many), "{\"outputs\":[");
    for (int i = 0; i <= TENSOR_MAX_IO; i++)
        off += (size_t)snprintf(many + off, sizeof(many) - off,
                                "%s{\"name\":\"o%d\",\"datatype\":\"INT32\",\"shape\":[1],"
                                "\"data\":[1]}",
                                i ? "," : "", i);
    snprintf(many + off, sizeof(many) - off, "]}");
    assert_int_equal(codec_decode_response_v2(many, strlen(many), &r, &e), ERR_INVALID);
    assert_null(r);
    assert_non_null(strstr(e.msg, "outputs"));
    /* and a good response still decodes */
    const char *ok = "{\"outputs\":[{\"name\":\"y\",\"datatype\":\"INT64\",\"shape\":[1],"
                     "\"data\":[9]}]}";
    assert_int_equal(codec_decode_response_v2(ok, strlen(ok), &r, &e), 0);
    assert_int_equal(((int64_t *)r->inputs[0].data)[0], 9);
    infer_request_destroy(r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_flat_and_nested_agree),
        cmocka_unit_test(test_null_is_missing),
        cmocka_unit_test(test_rejections_name_the_field),
        cmocka_unit_test(test_binary_extension),
        cmocka_unit_test(test_encode_json_and_v1),
        cmocka_unit_test(test_v1_objects_by_name),
        cmocka_unit_test(test_v1_decode),
        cmocka_unit_test(test_document_takes_any_json_value),
        cmocka_unit_test(test_document_rejects_malformed_json),
        cmocka_unit_test(test_decode_for_model_by_json_io),
        cmocka_unit_test(test_decode_for_model_binary_is_v2),
        cmocka_unit_test(test_encode_result),
        cmocka_unit_test(test_encode_request_v2_text),
        cmocka_unit_test(test_encode_request_v2_round_trips),
        cmocka_unit_test(test_encode_request_v2_fp32_is_exact),
        cmocka_unit_test(test_decode_response_v2),
        cmocka_unit_test(test_decode_response_v2_rejections),
        cmocka_unit_test(test_stored_errors_quote_nothing),
        cmocka_unit_test(test_client_errors_still_quote),
        cmocka_unit_test(test_id_may_hold_nul),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
