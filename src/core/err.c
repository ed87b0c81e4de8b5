/*
 * err.c: error reporting shared by every module, and the one table mapping codes to HTTP.
 */
#include "core/err.h"

#include <stdarg.h>
#include <stdio.h>

int err_set(struct err *e, enum err_code code, const char *fmt, ...)
{
    va_list ap;

    if (e) {
        e->code = code;
        va_start(ap, fmt);
        vsnprintf(e->msg, sizeof(e->msg), fmt, ap);
        va_end(ap);
    }
    return code;
}

int err_http_status(enum err_code code)
{
    switch (code) {
    case ERR_OK:
        return 200;
    case ERR_INVALID:
        return 400;
    case ERR_NOT_FOUND:
        return 404;
    case ERR_CONFLICT:
        return 409;
    case ERR_UNAUTHORIZED:
        return 401;
    case ERR_FORBIDDEN:
        return 403;
    case ERR_TOO_LARGE:
        return 413;
    case ERR_SHAPE:
        return 422;
    case ERR_BUSY:
        return 429;
    case ERR_CANCELLED:
        return 499;
    case ERR_UPSTREAM:
        return 502;
    case ERR_UNAVAILABLE:
        return 503;
    case ERR_TIMEOUT:
        return 504;
    case ERR_FULL:
        return 507;
    case ERR_BACKEND:
    case ERR_NOMEM:
    case ERR_IO:
        return 500;
    }
    return 500;
}
