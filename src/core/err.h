/*
 * err.h: how every inferd function reports failure.
 *
 * A function that can fail returns 0 or a negative enum err_code, and fills a struct err with
 * one line for a person that names the field, line or limit.
 */
#ifndef INFERD_ERR_H
#define INFERD_ERR_H

enum err_code {
    ERR_OK = 0,
    ERR_INVALID = -1,     /* malformed request or config: 400 */
    ERR_SHAPE = -2,       /* well-formed but wrong shape, width or datatype: 422 */
    ERR_NOT_FOUND = -3,   /* unknown model, version or route: 404 */
    ERR_TOO_LARGE = -4,   /* past a configured limit: 413 */
    ERR_BUSY = -5,        /* a bounded queue is full: 429 */
    ERR_UNAVAILABLE = -6, /* not ready or draining: 503 */
    ERR_TIMEOUT = -7,     /* deadline passed: 504 */
    ERR_NOMEM = -8,       /* 500 */
    ERR_IO = -9,          /* 500 */
    ERR_BACKEND = -10,    /* the model failed: 500 */
    ERR_CONFLICT = -11,   /* 409 */
    ERR_CANCELLED = -12,  /* the client went away: 499 */
    ERR_UPSTREAM = -13,   /* an upstream model server failed or cannot be reached: 502 */
    ERR_FULL = -14,       /* a store is out of space (disk full): 507, nothing was stored */
    ERR_UNAUTHORIZED = -15, /* no valid API key: 401 */
    ERR_FORBIDDEN = -16,    /* the key lacks the route's scope: 403 */
};

struct err {
    enum err_code code;
    char msg[256];
};

/* Fills `e` (which may be NULL) and returns `code`. */
int err_set(struct err *e, enum err_code code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* The HTTP status for a code. */
int err_http_status(enum err_code code);

#endif
