/*
 * jfield.c: bounded integer fields of JSON objects (see jfield.h).
 */
#include "core/jfield.h"

int jfield_int(const json_t *obj, const char *key, int64_t min, int64_t max, unsigned flags,
               int64_t *out, int *present, struct err *e)
{
    json_t *v = json_is_object(obj) ? json_object_get(obj, key) : NULL;
    long long n;

    if (v && json_is_null(v) && (flags & JFIELD_NULL_ABSENT))
        v = NULL;
    if (present)
        *present = v != NULL;
    if (!v)
        return 0;
    if (!json_is_integer(v))
        return err_set(e, ERR_INVALID, "%s: expected an integer", key);
    n = json_integer_value(v);
    if ((flags & JFIELD_MIN_MAX_MSG) && n < min)
        return err_set(e, ERR_INVALID, "%s: %lld is below the minimum %lld", key, n,
                       (long long)min);
    if ((flags & JFIELD_MIN_MAX_MSG) && n > max)
        return err_set(e, ERR_INVALID, "%s: %lld is above the maximum %lld", key, n,
                       (long long)max);
    if (n < min || n > max)
        return err_set(e, ERR_INVALID, "%s: %lld is outside %lld..%lld", key, n, (long long)min,
                       (long long)max);
    *out = (int64_t)n;
    return 0;
}
