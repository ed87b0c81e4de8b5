/*
 * test_codec.c: the v2/v1 decoder (JSON and binary tensor data) and the response encoder.
 * Every rejection must name the field at fault.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "model/codec.h"

#include <math.h>
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
    assert_int_equal(codec_decode_v1(ok, strlen(ok), "in", &r, &e), 0);
    assert_int_equal(r->inputs[0].shape[0], 2);
    assert_int_equal(r->inputs[0].shape[1], 2);
    assert_true(isnan(((double *)r->inputs[0].data)[3]));
    infer_request_destroy(r);
    assert_int_equal(codec_decode_v1(ragged, strlen(ragged), "in", &r, &e), ERR_SHAPE);
    assert_non_null(strstr(e.msg, "instances[1]"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_flat_and_nested_agree),     cmocka_unit_test(test_null_is_missing),
        cmocka_unit_test(test_rejections_name_the_field), cmocka_unit_test(test_binary_extension),
        cmocka_unit_test(test_encode_json_and_v1),        cmocka_unit_test(test_v1_decode),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
