/*
 * jfield.h: reading a bounded integer field of a JSON object (jansson), the way every request,
 * batch-job definition and model config does, so they all refuse a bad value in the same
 * words: what the field is, what it holds, and its bounds.
 */
#ifndef INFERD_CORE_JFIELD_H
#define INFERD_CORE_JFIELD_H

#include "core/err.h"

#include <jansson.h>
#include <stdint.h>

/* Flags for jfield_int(). */
#define JFIELD_NULL_ABSENT 1u /* a null value counts as absent (else: "expected an integer") */
#define JFIELD_MIN_MAX_MSG                                                                         \
    2u /* out of bounds reads "is below the minimum MIN" / "is above the                           \
        * maximum MAX" instead of "is outside MIN..MAX" */

/*
 * Reads integer field `key` of `obj` (borrowed; NULL or not an object: the field is absent),
 * which must lie in min..max.
 *   out      set when the field is present and good; untouched otherwise
 *   present  (may be NULL) 1 when the field is there (good or bad), 0 when absent
 * Returns 0 (read, or absent) or ERR_INVALID, with a message naming the field:
 * "KEY: expected an integer", "KEY: N is outside MIN..MAX" (or, with JFIELD_MIN_MAX_MSG,
 * "KEY: N is below the minimum MIN" / "KEY: N is above the maximum MAX").
 */
int jfield_int(const json_t *obj, const char *key, int64_t min, int64_t max, unsigned flags,
               int64_t *out, int *present, struct err *e);

#endif
