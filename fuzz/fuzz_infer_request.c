/*
 * fuzz_infer_request.c: libFuzzer target for the request decoder (v2 JSON, v2 with the binary
 * tensor extension, v1 instances), followed by the model check and the response encoder, as
 * the server runs them.
 *
 * Input layout: byte 0 picks the decoder (0: v2 JSON, 1: v2 binary, 2: v1); for binary, bytes
 * 1-2 are the JSON header length (little-endian); the rest is the body.
 */
#include "model/codec.h"
#include "model/tensor.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const struct inferd_tensor model_in = {
    .name = "input__0", .datatype = INFERD_TYPE_FP32, .n_dims = 2, .shape = {-1, 4}};
static const struct inferd_tensor model_out = {
    .name = "output__0", .datatype = INFERD_TYPE_FP32, .n_dims = 1, .shape = {-1}};
static const struct inferd_model_info info = {
    .inputs = &model_in, .n_inputs = 1, .outputs = &model_out, .n_outputs = 1, .is_batched = 1};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct infer_request *r = NULL;
    struct err e = {0};
    struct buf out = {0};
    int64_t json_len = -1;
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
        rc = codec_decode_v1(body, body_len, "input__0", &r, &e);
    else
        rc = codec_decode_v2(body, body_len, json_len, &r, &e);
    if (rc != 0) {
        /* every failure must carry a message for the client */
        if (e.msg[0] == '\0')
            abort();
        return 0;
    }
    if (tensor_check_inputs(r, &info, &e) == 0) {
        /* play the backend: one output row per input row */
        int64_t rows = infer_request_rows(r);
        float *y = tensor_output_alloc(&r->abi, "output__0", INFERD_TYPE_FP32, &rows, 1,
                                       (size_t)rows * sizeof(float));
        if (y)
            memset(y, 0, (size_t)rows * sizeof(float));
        codec_encode_v2(r, "m", "1", &out, &json_len);
        buf_release(&out);
        codec_encode_v1(r, &out);
        buf_release(&out);
    } else if (e.msg[0] == '\0') {
        abort();
    }
    infer_request_destroy(r);
    return 0;
}
