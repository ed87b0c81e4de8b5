/*
 * test_tensor.c: datatypes, element counts, and the check (and conversion) of a request
 * against a model's declared inputs, including JSON documents (json_io) and models whose
 * inputs are optional.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "kserve/codec.h"
#include "kserve/tensor.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
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

/* ---- JSON documents and optional inputs ---- */

static void test_check_document_needs_json_io(void **state)
{
    struct inferd_model_info m = info;
    struct infer_request *doc = NULL;
    struct err e = {0};

    (void)state;
    assert_int_equal(codec_decode_document("{\"q\":1}", 7, CODEC_FROM_CLIENT, &doc, &e), 0);
    m.json_io = INFERD_JSON_IO_NONE;
    assert_int_equal(tensor_check_inputs(doc, &m, &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "not a JSON document"));
    /* with json_io the document goes as it is, whatever the model's tensor inputs say */
    m.json_io = INFERD_JSON_IO_ALSO;
    assert_int_equal(tensor_check_inputs(doc, &m, &e), 0);
    m.json_io = INFERD_JSON_IO_ONLY;
    assert_int_equal(tensor_check_inputs(doc, &m, &e), 0);
    assert_int_equal(doc->n_inputs, 1);
    assert_int_equal(doc->inputs[0].datatype, INFERD_TYPE_BYTES);
    assert_int_equal(doc->inputs[0].data_bytes, 11);
    infer_request_destroy(doc);
}

static void test_check_json_io_only_refuses_tensors(void **state)
{
    const char *j = "{\"inputs\":[{\"name\":\"input__0\",\"datatype\":\"INT64\",\"shape\":[1,4],"
                    "\"data\":[1,2,3,4]}]}";
    struct inferd_model_info m = info;
    struct err e = {0};
    struct infer_request *r = decode(j, &e);

    (void)state;
    m.json_io = INFERD_JSON_IO_ONLY;
    assert_int_equal(tensor_check_inputs(r, &m, &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "JSON documents only"));
    assert_int_equal(r->inputs[0].datatype, INFERD_TYPE_INT64); /* untouched */
    /* ALSO checks and converts tensors as usual */
    m.json_io = INFERD_JSON_IO_ALSO;
    assert_int_equal(tensor_check_inputs(r, &m, &e), 0);
    assert_int_equal(r->inputs[0].datatype, INFERD_TYPE_FP32);
    infer_request_destroy(r);
}

static const struct inferd_tensor abc[] = {
    {.name = "a", .datatype = INFERD_TYPE_FP32, .n_dims = 2, .shape = {-1, 2}},
    {.name = "b", .datatype = INFERD_TYPE_INT64, .n_dims = 1, .shape = {-1}},
    {.name = "c", .datatype = INFERD_TYPE_BYTES, .n_dims = 1, .shape = {-1}},
};

#define IN_A "{\"name\":\"a\",\"datatype\":\"FP32\",\"shape\":[1,2],\"data\":[1,2]}"
#define IN_B "{\"name\":\"b\",\"datatype\":\"INT32\",\"shape\":[1],\"data\":[5]}"
#define IN_C "{\"name\":\"c\",\"datatype\":\"BYTES\",\"shape\":[1],\"data\":[\"t\"]}"

static void test_check_optional_inputs(void **state)
{
    static const struct {
        const char *inputs;
        int optional_rc, required_rc;
        const char *says; /* in the message when optional_rc != 0 */
    } cases[] = {
        {IN_B, 0, ERR_INVALID, NULL},
        {IN_A "," IN_C, 0, ERR_INVALID, NULL},
        {IN_C "," IN_B "," IN_A, 0, 0, NULL},
        {IN_A "," IN_A, ERR_INVALID, ERR_INVALID, "appears twice"},
        {"{\"name\":\"d\",\"datatype\":\"FP32\",\"shape\":[1],\"data\":[1]}", ERR_SHAPE, ERR_SHAPE,
         "unknown input 'd'"},
        {IN_A ",{\"name\":\"b\",\"datatype\":\"INT32\",\"shape\":[2],\"data\":[5,6]}", ERR_SHAPE,
         ERR_INVALID, "different batch sizes"},
        {"{\"name\":\"a\",\"datatype\":\"FP32\",\"shape\":[1,3],\"data\":[1,2,3]}", ERR_SHAPE,
         ERR_SHAPE, "expected 2 features per row, got 3"},
    };
    struct inferd_model_info m = {
        .inputs = abc, .n_inputs = 3, .outputs = &out1, .n_outputs = 1, .is_batched = 1};
    char json[1024];
    struct err e = {0};

    (void)state;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct infer_request *r;
        snprintf(json, sizeof(json), "{\"inputs\":[%s]}", cases[i].inputs);
        r = decode(json, &e);
        m.inputs_optional = 1;
        assert_int_equal(tensor_check_inputs(r, &m, &e), cases[i].optional_rc);
        if (cases[i].says)
            assert_non_null(strstr(e.msg, cases[i].says));
        infer_request_destroy(r);
        r = decode(json, &e);
        m.inputs_optional = 0;
        assert_int_equal(tensor_check_inputs(r, &m, &e), cases[i].required_rc);
        if (cases[i].required_rc == ERR_INVALID && !cases[i].says)
            assert_non_null(strstr(e.msg, "missing input"));
        infer_request_destroy(r);
    }
    /* a subset is still converted to the model's datatypes */
    struct infer_request *r = decode("{\"inputs\":[" IN_B "]}", &e);
    m.inputs_optional = 1;
    assert_int_equal(tensor_check_inputs(r, &m, &e), 0);
    assert_int_equal(r->inputs[0].datatype, INFERD_TYPE_INT64);
    assert_int_equal(((int64_t *)r->inputs[0].data)[0], 5);
    infer_request_destroy(r);
}

static void test_check_optional_inputs_not_none(void **state)
{
    struct inferd_model_info m = {.inputs = abc, .n_inputs = 3, .inputs_optional = 1};
    struct infer_request *r = calloc(1, sizeof(*r)); /* the decoder never makes one this empty */
    struct err e = {0};

    (void)state;
    assert_non_null(r);
    assert_int_equal(tensor_check_inputs(r, &m, &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "no inputs"));
    m.inputs_optional = 0;
    assert_int_equal(tensor_check_inputs(r, &m, &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "missing input 'a'"));
    infer_request_destroy(r);
}

static void test_request_document_output(void **state)
{
    int64_t one[] = {1};
    struct infer_request *r = NULL;
    struct err e = {0};
    unsigned char *p;
    size_t len = 99;

    (void)state;
    assert_int_equal(codec_decode_document("[]", 2, CODEC_FROM_CLIENT, &r, &e), 0);
    assert_null(infer_request_document(r, &len)); /* no outputs */
    /* near misses: another name, another datatype, shorter than a length, a length too long */
    p = tensor_output_alloc(&r->abi, "text", INFERD_TYPE_BYTES, one, 1, 6);
    memcpy(p, "\x02\0\0\0hi", 6);
    p = tensor_output_alloc(&r->abi, "json", INFERD_TYPE_INT32, one, 1, 4);
    memset(p, 0, 4);
    p = tensor_output_alloc(&r->abi, "json", INFERD_TYPE_BYTES, one, 1, 3);
    memset(p, 0, 3);
    assert_null(infer_request_document(r, &len));
    p = tensor_output_alloc(&r->abi, "json", INFERD_TYPE_BYTES, one, 1, 8);
    memcpy(p, "\x05\0\0\0{}{}", 8);
    assert_null(infer_request_document(r, &len));
    assert_int_equal(len, 99);
    infer_request_reset_outputs(r);
    /* the one that counts; bytes after the length are ignored */
    p = tensor_output_alloc(&r->abi, "json", INFERD_TYPE_BYTES, one, 1, 9);
    memcpy(p, "\x04\0\0\0true!", 9);
    const char *doc = infer_request_document(r, &len);
    assert_non_null(doc);
    assert_int_equal(len, 4);
    assert_memory_equal(doc, "true", 4);
    infer_request_reset_outputs(r);
    p = tensor_output_alloc(&r->abi, "json", INFERD_TYPE_BYTES, one, 1, 4);
    memset(p, 0, 4);
    assert_non_null(infer_request_document(r, &len));
    assert_int_equal(len, 0);
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
        cmocka_unit_test(test_check_document_needs_json_io),
        cmocka_unit_test(test_check_json_io_only_refuses_tensors),
        cmocka_unit_test(test_check_optional_inputs),
        cmocka_unit_test(test_check_optional_inputs_not_none),
        cmocka_unit_test(test_request_document_output),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
