/*
 * test_tensor.c: datatypes, element counts, and the check (and conversion) of a request
 * against a model's declared inputs.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "model/codec.h"
#include "model/tensor.h"

#include <math.h>
#include <string.h>

static const struct inferd_tensor in4 = {
    .name = "input__0", .datatype = INFERD_TYPE_FP32, .n_dims = 2, .shape = {-1, 4}};
static const struct inferd_tensor out1 = {
    .name = "output__0", .datatype = INFERD_TYPE_FP32, .n_dims = 1, .shape = {-1}};
static const struct inferd_model_info info = {
    .inputs = &in4, .n_inputs = 1, .outputs = &out1, .n_outputs = 1, .is_batched = 1};

static struct infer_request *decode(const char *json, struct err *e)
{
    struct infer_request *r = NULL;

    assert_int_equal(codec_decode_v2(json, strlen(json), -1, &r, e), 0);
    return r;
}

static void test_datatype_names(void **state)
{
    (void)state;
    assert_int_equal(tensor_datatype_parse("FP32"), INFERD_TYPE_FP32);
    assert_int_equal(tensor_datatype_parse("BYTES"), INFERD_TYPE_BYTES);
    assert_int_equal(tensor_datatype_parse("fp32"), INFERD_TYPE_INVALID);
    assert_string_equal(tensor_datatype_name(INFERD_TYPE_INT64), "INT64");
    assert_int_equal(inferd_datatype_size(INFERD_TYPE_FP64), 8);
    assert_int_equal(inferd_datatype_size(INFERD_TYPE_BYTES), 0);
}

static void test_element_count(void **state)
{
    int64_t s1[] = {3, 4}, s2[] = {-1, 4}, s3[] = {INT64_MAX, 2}, s4[] = {0, 9};

    (void)state;
    assert_int_equal(tensor_element_count(s1, 2), 12);
    assert_int_equal(tensor_element_count(s2, 2), -1);
    assert_int_equal(tensor_element_count(s3, 2), -1);
    assert_int_equal(tensor_element_count(s4, 2), 0);
    assert_int_equal(tensor_element_count(NULL, 0), 1);
}

static void test_check_converts_to_model_type(void **state)
{
    struct err e = {0};
    struct infer_request *r =
        decode("{\"inputs\":[{\"name\":\"input__0\",\"datatype\":\"INT64\",\"shape\":[1,4],"
               "\"data\":[1,2,3,4]}]}",
               &e);
    (void)state;
    assert_int_equal(tensor_check_inputs(r, &info, &e), 0);
    assert_int_equal(r->inputs[0].datatype, INFERD_TYPE_FP32);
    assert_int_equal(r->inputs[0].data_bytes, 16);
    assert_true(((float *)r->inputs[0].data)[3] == 4.0f);
    infer_request_destroy(r);
}

static void test_check_rejects_wrong_width(void **state)
{
    struct err e = {0};
    struct infer_request *r =
        decode("{\"inputs\":[{\"name\":\"input__0\",\"datatype\":\"FP32\",\"shape\":[1,3],"
               "\"data\":[1,2,3]}]}",
               &e);
    (void)state;
    assert_int_equal(tensor_check_inputs(r, &info, &e), ERR_SHAPE);
    assert_non_null(strstr(e.msg, "expected 4 features per row, got 3"));
    infer_request_destroy(r);
}

static void test_check_rejects_unknown_and_missing(void **state)
{
    struct err e = {0};
    struct infer_request *r =
        decode("{\"inputs\":[{\"name\":\"x\",\"datatype\":\"FP32\",\"shape\":[1,4],"
               "\"data\":[1,2,3,4]}]}",
               &e);
    (void)state;
    assert_int_equal(tensor_check_inputs(r, &info, &e), ERR_SHAPE);
    assert_non_null(strstr(e.msg, "unknown input 'x'"));
    infer_request_destroy(r);
}

static void test_check_rejects_bytes_for_numbers(void **state)
{
    struct err e = {0};
    struct infer_request *r =
        decode("{\"inputs\":[{\"name\":\"input__0\",\"datatype\":\"BYTES\",\"shape\":[1,4],"
               "\"data\":[\"a\",\"b\",\"c\",\"d\"]}]}",
               &e);
    (void)state;
    assert_int_equal(tensor_check_inputs(r, &info, &e), ERR_SHAPE);
    assert_non_null(strstr(e.msg, "BYTES"));
    infer_request_destroy(r);
}

static void test_output_alloc_and_reset(void **state)
{
    struct err e = {0};
    struct infer_request *r =
        decode("{\"inputs\":[{\"name\":\"input__0\",\"datatype\":\"FP32\",\"shape\":[2,4],"
               "\"data\":[1,2,3,4,5,6,7,8]}]}",
               &e);
    int64_t shape[] = {2};
    float *y;

    (void)state;
    y = tensor_output_alloc(&r->abi, "output__0", INFERD_TYPE_FP32, shape, 1, 8);
    assert_non_null(y);
    assert_int_equal(r->n_outputs, 1);
    assert_int_equal(r->outputs[0].shape[0], 2);
    infer_request_reset_outputs(r);
    assert_int_equal(r->n_outputs, 0);
    assert_null(tensor_output_alloc(&r->abi, "o", INFERD_TYPE_FP32, shape, INFERD_MAX_DIMS + 1, 4));
    infer_request_destroy(r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_datatype_names),
        cmocka_unit_test(test_element_count),
        cmocka_unit_test(test_check_converts_to_model_type),
        cmocka_unit_test(test_check_rejects_wrong_width),
        cmocka_unit_test(test_check_rejects_unknown_and_missing),
        cmocka_unit_test(test_check_rejects_bytes_for_numbers),
        cmocka_unit_test(test_output_alloc_and_reset),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
