/*
 * codec.h: the KServe v2 (and v1) request decoder and response encoder.
 *
 * Decoding turns untrusted bytes into a struct infer_request; every failure is an error naming
 * the field (`inputs[0].shape`, `inputs[1].data[7]`), never a crash: fuzz/fuzz_infer_request.c
 * drives these functions. Decoding does not know the model; tensor_check_inputs() does that.
 */
#ifndef INFERD_CODEC_H
#define INFERD_CODEC_H

#include "core/buf.h"
#include "core/err.h"
#include "kserve/features.h"
#include "kserve/tensor.h"

#include <stddef.h>
#include <stdint.h>

/*
 * Where a request's text came from, which decides what its errors may show of it.
 */
enum codec_origin {
    CODEC_FROM_CLIENT, /* the request body: an error may quote it back to whoever sent it */
    CODEC_FROM_STORE,  /* read from a location (a job's input_location, batch records): errors
                        * name the field, line or column and the problem, never the text */
};

/*
 * Decodes a v2 infer request sent by a client (CODEC_FROM_CLIENT). `json_len` is the value of
 * Inference-Header-Content-Length (the JSON part; the binary tensor data follows it) or -1 when
 * the body is JSON only.
 *   body  borrowed for the call
 *   out   new request; the caller frees it with infer_request_destroy()
 * Returns 0, ERR_INVALID (malformed), ERR_SHAPE (data does not fit its declaration) or
 * ERR_NOMEM.
 */
int codec_decode_v2(const char *body, size_t body_len, int64_t json_len, struct infer_request **out,
                    struct err *e);

/*
 * Decodes a v1 predict request (sent by a client) `{"instances": [[...], ...]}` into one input
 * named `input_name` of shape [n, width], as FP64 (tensor_check_inputs converts it). Instances
 * that are objects (`[{"f_age": 41, ...}, ...]`, pandas' to_dict('records')) are mapped to
 * columns by the model's feature names `f` (borrowed; NULL or none: objects are refused); a
 * missing feature or a key that is none is an error naming it.
 */
int codec_decode_v1(const char *body, size_t body_len, const char *input_name,
                    const struct features *f, struct infer_request **out, struct err *e);

/*
 * Encodes the v2 response of a finished request into `out` (appended). When any output goes
 * as binary, the raw bytes follow the JSON and `*json_len` is set to the JSON's length;
 * otherwise `*json_len` is -1.
 */
int codec_encode_v2(const struct infer_request *r, const char *model_name, const char *version,
                    struct buf *out, int64_t *json_len);

/* Encodes `{"predictions": [...]}` from the request's first output. */
int codec_encode_v1(const struct infer_request *r, struct buf *out);

/*
 * JSON documents (models with json_io, see inferd/backend.h). codec_decode_document checks
 * that `body` is one JSON value of any kind and makes it a request whose only input is
 * "json"; codec_decode_for_model picks the document or the v2 form by the model's json_io;
 * codec_encode_result writes a document request's "json" output as it is, and a v2 request's
 * outputs as codec_encode_v2 does.
 */
int codec_decode_document(const char *body, size_t body_len, enum codec_origin origin,
                          struct infer_request **out, struct err *e);
int codec_decode_for_model(const struct inferd_model_info *info, const char *body, size_t body_len,
                           int64_t json_len, enum codec_origin origin, struct infer_request **out,
                           struct err *e);
int codec_encode_result(const struct infer_request *r, const char *model_name,
                        const char *version, struct buf *out, int64_t *json_len);

/* For the http backend: a v2 request `{"inputs": [...]}` of r's inputs, as JSON; and an
 * upstream's v2 response, whose "outputs" are decoded into the new request's inputs. */
int codec_encode_request_v2(const struct infer_request *r, struct buf *out);
int codec_decode_response_v2(const char *body, size_t body_len, struct infer_request **out,
                             struct err *e);

/* Encodes `{"error": msg}`. */
int codec_encode_error(const char *msg, struct buf *out);

#endif
