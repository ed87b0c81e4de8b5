/*
 * jdoc.h: read-only JSON documents for the request hot path.
 *
 * Inference requests are parsed with simdjson (jdoc.cc, the only C++ in inferd): on a
 * single-row KServe v2 request it takes about 0.6 us where jansson takes 10 us, a fifth of
 * what a served request costs. Everything that builds, keeps or re-serialises JSON uses
 * jansson.
 *
 * Each thread has its own parser. Values lent by jdoc_parse() (and everything reached from
 * them) stay valid until the same thread's next jdoc_parse() or jdoc_done(); they must not
 * cross threads. Strings are NUL-terminated and may hold NUL bytes: use the length.
 *
 * A document is valid JSON (RFC 8259, UTF-8 checked) with no object holding the same key
 * twice and at most JDOC_MAX_DEPTH arrays and objects around any value. Integers above
 * INT64_MAX up to UINT64_MAX read as reals; larger ones are refused, as jansson refuses them.
 */
#ifndef INFERD_CORE_JDOC_H
#define INFERD_CORE_JDOC_H

#include <stddef.h>
#include <stdint.h>

#include "core/err.h"

#define JDOC_MAX_DEPTH 1023 /* simdjson's 1024 levels count the value inside */

enum jdoc_type {
    JDOC_NULL,
    JDOC_BOOL,
    JDOC_INT, /* fits in int64 */
    JDOC_REAL,
    JDOC_STRING,
    JDOC_ARRAY,
    JDOC_OBJECT,
};

/* A value in the thread's current document (a copy is just as good as the original). */
struct jdoc_val {
    uint64_t opaque[2];
};

/* A position in an array. */
struct jdoc_iter {
    uint64_t opaque[4];
};

/* jdoc_parse() flag: the text was read from a location (a file, an object), not sent by the
 * client, so its errors name the place and the problem but quote none of it. */
#define JDOC_STORED 0x1u

/* Parses `len` bytes of `text` (which need not be NUL-terminated) into the thread's document
 * and sets *root. Fails with ERR_INVALID, "malformed JSON at line L column C: why" (or
 * "duplicate key 'k'"), or ERR_NOMEM. Without JDOC_STORED `why` may quote a little of the
 * text (jansson's "invalid token near 'x'"); with it, `why` is a fixed phrase and a
 * duplicate key is not named. */
int jdoc_parse(const char *text, size_t len, unsigned flags, struct jdoc_val *root, struct err *e);

struct json_error_t; /* jansson's */
/* What jansson found wrong in a text, as a fixed phrase ("invalid token", "premature end of
 * input") that quotes none of it, unlike jerr->text ("invalid token near 'root'"): for
 * messages about text read from a location. Never NULL; borrowed for ever. */
const char *jdoc_jansson_reason(const struct json_error_t *jerr);

/* Why jansson refused `len` bytes of `text` (jerr from parsing them), as jdoc_parse() words
 * it: "JSON has no NaN: send null for a missing value" (or Infinity) where the text has
 * Python's NaN, Infinity or -Infinity; else jerr->text, or with JDOC_STORED the fixed phrase
 * of jdoc_jansson_reason(). Never NULL; borrowed until `jerr` changes. */
const char *jdoc_jansson_why(const char *text, size_t len, const struct json_error_t *jerr,
                             unsigned flags);

/* The caller is done with the thread's document: a large one's memory is given back. */
void jdoc_done(void);

enum jdoc_type jdoc_type(const struct jdoc_val *v);

/* 1 for true, 0 for anything else. */
int jdoc_is_true(const struct jdoc_val *v);

/* JDOC_INT: the value; anything else: 0. */
int64_t jdoc_int(const struct jdoc_val *v);

/* JDOC_INT or JDOC_REAL: the value as a double; anything else: 0. */
double jdoc_number(const struct jdoc_val *v);

/* JDOC_STRING: its bytes (NUL-terminated) and, when `len` is not NULL, their count;
 * anything else: NULL. */
const char *jdoc_string(const struct jdoc_val *v, size_t *len);

/* An object's member `key`: 1 and *out, or 0 when `v` is not an object or has no such key. */
int jdoc_get(const struct jdoc_val *v, const char *key, struct jdoc_val *out);

/* Elements of an array, members of an object, 0 for anything else. */
size_t jdoc_size(const struct jdoc_val *v);

/* Iterates the array `v` (an empty iteration when `v` is not an array):
 *     for (jdoc_iter_init(&data, &it); jdoc_iter_next(&it, &item);) ... */
void jdoc_iter_init(const struct jdoc_val *v, struct jdoc_iter *it);
int jdoc_iter_next(struct jdoc_iter *it, struct jdoc_val *out);

/* Iterates the members of the object `v` in document order (an empty iteration when `v` is
 * not an object); `*key` is the member's name, NUL-terminated, `*key_len` bytes long:
 *     for (jdoc_members_init(&obj, &it); jdoc_members_next(&it, &k, &k_len, &val);) ... */
void jdoc_members_init(const struct jdoc_val *v, struct jdoc_iter *it);
int jdoc_members_next(struct jdoc_iter *it, const char **key, size_t *key_len,
                      struct jdoc_val *out);

#endif
