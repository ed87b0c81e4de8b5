/*
 * buf.h: a growable byte buffer (git's strbuf, smaller). Always NUL-terminated when non-empty.
 */
#ifndef INFERD_BUF_H
#define INFERD_BUF_H

#include <stddef.h>

struct buf {
    char *data; /* NULL until the first append */
    size_t len;
    size_t cap;
};

/* Each returns 0 or ERR_NOMEM. */
int buf_reserve(struct buf *b, size_t extra);
int buf_append(struct buf *b, const void *data, size_t len);
int buf_puts(struct buf *b, const char *s);
int buf_printf(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Appends `s` as a JSON string literal, quotes included. */
int buf_json_string(struct buf *b, const char *s);
/* The same for `len` bytes that may hold NULs or invalid UTF-8: NUL and other control bytes
 * are escaped, and each byte of an invalid UTF-8 sequence becomes U+FFFD, so the result is
 * always valid JSON. */
int buf_json_stringn(struct buf *b, const char *s, size_t len);
/* Frees the memory; the buffer may be reused. buf_release on a zeroed buf does nothing. */
void buf_release(struct buf *b);
/* Hands the memory to the caller (free() it); the buffer is left empty. */
char *buf_take(struct buf *b);

#endif
