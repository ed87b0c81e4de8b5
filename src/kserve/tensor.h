/*
 * tensor.h: inferd's in-memory inference request and the tensor helpers every front door uses.
 *
 * A struct infer_request owns everything it points to: the decoded input tensors (names, data)
 * and the output tensors a backend allocated through the host's output_alloc. It is created by
 * the decoder (codec.h), checked against a model (tensor_check_inputs), run by the batcher and
 * encoded back by the codec.
 */
#ifndef INFERD_TENSOR_H
#define INFERD_TENSOR_H

#include "core/err.h"
#include "inferd/backend.h"

#include <stdint.h>

#define TENSOR_MAX_IO 16 /* inputs or outputs per request */

struct infer_request {
    char *id;                            /* the client's "id", echoed back; NULL when absent */
    size_t id_len;                       /* its bytes: a JSON string may hold \u0000 */
    uint64_t timeout_us;                 /* the "timeout" parameter; 0 means the model's default */
    int binary_output_all;               /* "binary_data_output": true */
    char *binary_outputs[TENSOR_MAX_IO]; /* outputs asked for as binary; owned */
    size_t n_binary_outputs;
    char *requested_outputs[TENSOR_MAX_IO]; /* the request's "outputs" names; none = all */
    size_t n_requested_outputs;
    struct inferd_tensor inputs[TENSOR_MAX_IO]; /* names and data owned */
    size_t n_inputs;
    struct inferd_tensor outputs[TENSOR_MAX_IO]; /* filled by the backend; owned */
    size_t n_outputs;
    int is_document;  /* one JSON document (input "json"), for models with json_io */
    int is_stored;    /* decoded from a location's text (CODEC_FROM_STORE): errors about it
                       * name inputs by position and quote none of its names or values */
    void *batch_item; /* the batcher's, while the request runs */
    struct inferd_request abi; /* what the backend sees; points into inputs */
};

/* "FP32" -> INFERD_TYPE_FP32; INVALID when unknown. */
enum inferd_datatype tensor_datatype_parse(const char *name);
const char *tensor_datatype_name(enum inferd_datatype t);

/* Number of elements of a shape, or -1 when negative or overflowing. */
int64_t tensor_element_count(const int64_t *shape, int n_dims);

/* Frees a request and everything it owns. NULL does nothing. */
void infer_request_destroy(struct infer_request *r);

/*
 * Checks the request against the model's inputs (every model input present once, known names,
 * compatible datatypes, shapes matching the metadata where it is not -1) and converts numeric
 * inputs to the model's datatype in place. Returns 0, ERR_INVALID or ERR_SHAPE.
 */
int tensor_check_inputs(struct infer_request *r, const struct inferd_model_info *info,
                        struct err *e);

/* Rows in the request (first dimension of the first input), or 0. */
int64_t infer_request_rows(const struct infer_request *r);

/* The host->output_alloc inferd gives backends: allocates into r->outputs. */
void *tensor_output_alloc(struct inferd_request *request, const char *name,
                          enum inferd_datatype datatype, const int64_t *shape, int n_dims,
                          size_t data_bytes);

/* Prepares r->abi before execute. */
void infer_request_bind(struct infer_request *r);

/* The request that embeds `abi`. */
struct infer_request *infer_request_of(const struct inferd_request *abi);

/* A document request's output "json" (NULL when it has none), with its length. */
const char *infer_request_document(const struct infer_request *r, size_t *len);

/* Frees the outputs (for a retry) and clears the failure. */
void infer_request_reset_outputs(struct infer_request *r);

#endif
