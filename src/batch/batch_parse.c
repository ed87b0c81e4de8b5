/*
 * batch_parse.c: one batch-transform record (a JSON Lines array or a CSV line) into a row of
 * floats. Untrusted input: every failure is a reason naming the column or position and the
 * problem, never a crash (fuzz/fuzz_batch_record.c drives these). Records are read from
 * storage, so a reason quotes none of the record: it goes into `.errors` objects and job
 * errors that people other than the file's owner may read.
 */
#define _GNU_SOURCE
#include "batch/batch_internal.h"
#include "core/jdoc.h"

#include <errno.h>
#include <float.h>
#include <stdint.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

char *batch_reason(const char *fmt, ...)
{
    char *s = NULL;
    va_list ap;

    va_start(ap, fmt);
    if (vasprintf(&s, fmt, ap) < 0)
        s = NULL;
    va_end(ap);
    return s ? s : strdup("bad record");
}

/* exact powers of ten as doubles (10^22 is the largest) */
static const double pow10_exact[23] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                                       1e8,  1e9,  1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
                                       1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

/*
 * A plain decimal (-?digits[.digits][e[+-]digits]) whose digits fit in 53 bits and whose
 * power of ten is exact: then one IEEE multiplication or division of two exact doubles is the
 * correctly rounded value, the same double strtod gives (Clinger's fast path). 0 when the
 * text is not that simple; the caller then uses strtod/strtof.
 */
static int fast_decimal(const char *p, const char *end, double *out)
{
    uint64_t m = 0;
    int neg = 0, digits = 0, exp10 = 0;

    if (p < end && (*p == '-' || *p == '+'))
        neg = *p++ == '-';
    for (; p < end && *p >= '0' && *p <= '9'; p++, digits++)
        if (digits < 19)
            m = m * 10 + (uint64_t)(*p - '0');
        else
            return 0;
    if (p < end && *p == '.') {
        for (p++; p < end && *p >= '0' && *p <= '9'; p++, digits++, exp10--)
            if (digits < 19)
                m = m * 10 + (uint64_t)(*p - '0');
            else
                return 0;
    }
    if (digits == 0)
        return 0;
    if (p < end && (*p == 'e' || *p == 'E')) {
        int eneg = 0, e = 0, edigits = 0;
        p++;
        if (p < end && (*p == '-' || *p == '+'))
            eneg = *p++ == '-';
        for (; p < end && *p >= '0' && *p <= '9'; p++, edigits++)
            if (e < 1000)
                e = e * 10 + (*p - '0');
        if (edigits == 0)
            return 0;
        exp10 += eneg ? -e : e;
    }
    if (p != end || m > (1ULL << 53) || exp10 < -22 || exp10 > 22)
        return 0;
    *out = exp10 < 0 ? (double)m / pow10_exact[-exp10] : (double)m * pow10_exact[exp10];
    if (neg)
        *out = -*out;
    return 1;
}

/*
 * strtof's value for a plain decimal, fast: the exact double rounded to float gives the same
 * float unless that double is exactly halfway between two floats (then strtof is asked), or
 * outside the normal float range.
 */
static int fast_float(const char *p, const char *end, float *out)
{
    double d;
    uint64_t bits;

    if (!fast_decimal(p, end, &d))
        return 0;
    if (d != 0 && (fabs(d) < FLT_MIN || fabs(d) > FLT_MAX))
        return 0;
    memcpy(&bits, &d, sizeof(bits));
    if ((bits & 0x1fffffffULL) == 0x10000000ULL)
        return 0; /* a tie for the float rounding: only the full text decides */
    *out = (float)d;
    return 1;
}

static const char *skip_ws(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    return p;
}

/*
 * One JSON number (RFC 8259 grammar) at `p`, converted as jansson converts it: integers
 * through long long (so "-0" is 0), other numbers through strtod (here Clinger's fast path
 * when it is exact). Returns 1 with `*stop` after the number, or 0 when the text is no JSON
 * number or one jansson might refuse (huge integers, overflows): the caller then leaves the
 * record to jansson.
 */
static int json_number(const char *p, const char *end, const char **stop, double *out)
{
    const char *start = p, *digits;
    uint64_t m = 0;
    int neg = 0, n_digits = 0, exp10 = 0, is_int = 1;

    if (p < end && *p == '-')
        neg = 1, p++;
    digits = p;
    if (p < end && *p == '0') {
        p++;
        n_digits = 1;
    } else {
        for (; p < end && *p >= '0' && *p <= '9'; p++, n_digits++)
            if (n_digits < 19)
                m = m * 10 + (uint64_t)(*p - '0');
    }
    if (p == digits)
        return 0;
    if (p < end && *p == '.') {
        const char *frac = ++p;
        is_int = 0;
        for (; p < end && *p >= '0' && *p <= '9'; p++, n_digits++)
            if (n_digits < 19)
                m = m * 10 + (uint64_t)(*p - '0'), exp10--;
        if (p == frac)
            return 0;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        int eneg = 0, e = 0;
        const char *exp_digits;
        is_int = 0;
        p++;
        if (p < end && (*p == '+' || *p == '-'))
            eneg = *p++ == '-';
        exp_digits = p;
        for (; p < end && *p >= '0' && *p <= '9'; p++)
            if (e < 10000)
                e = e * 10 + (*p - '0');
        if (p == exp_digits)
            return 0;
        exp10 += eneg ? -e : e;
    }
    *stop = p;
    if (is_int) {
        if (n_digits > 18)
            return 0;
        *out = (double)(neg ? -(int64_t)m : (int64_t)m);
        return 1;
    }
    if (n_digits <= 19 && m <= (1ULL << 53) && exp10 >= -22 && exp10 <= 22) {
        *out = exp10 < 0 ? (double)m / pow10_exact[-exp10] : (double)m * pow10_exact[exp10];
        if (neg)
            *out = -*out;
        return 1;
    }
    char num[64];
    if (p - start >= (ptrdiff_t)sizeof(num))
        return 0;
    memcpy(num, start, (size_t)(p - start));
    num[p - start] = '\0';
    *out = strtod(num, NULL);
    return !isinf(*out); /* jansson refuses an overflow */
}

/*
 * The common case, fast: a flat array of exactly `width` numbers and nulls. Anything else
 * (other values, other widths, odd numbers) returns 0 and the record goes through jansson,
 * which gives the reason. Numbers convert as jansson converts them, then to float.
 */
int batch_parse_jsonl_fast(const char *line, size_t len, int64_t width, float *row)
{
    const char *p = line, *end = line + len;
    int64_t i = 0;

    p = skip_ws(p, end);
    if (p == end || *p != '[')
        return 0;
    p = skip_ws(p + 1, end);
    for (;;) {
        if (i == width)
            return 0;
        if (end - p >= 4 && memcmp(p, "null", 4) == 0) {
            row[i++] = NAN;
            p += 4;
        } else {
            double d;
            if (!json_number(p, end, &p, &d))
                return 0;
            row[i++] = (float)d;
        }
        p = skip_ws(p, end);
        if (p == end)
            return 0;
        if (*p == ']')
            break;
        if (*p != ',')
            return 0;
        p = skip_ws(p + 1, end);
    }
    return i == width && skip_ws(p + 1, end) == end;
}

char *batch_parse_nul(const char *line, size_t len)
{
    const char *nul = memchr(line, '\0', len);

    return nul ? batch_reason("NUL byte at position %zu", (size_t)(nul - line) + 1) : NULL;
}

char *batch_parse_jsonl(const char *line, size_t len, int64_t width, float *row)
{
    char *why;

    if (batch_parse_jsonl_fast(line, len, width, row)) /* it takes no NUL byte */
        return NULL;
    why = batch_parse_nul(line, len);
    return why ? why : batch_parse_jsonl_json(line, len, width, row);
}

char *batch_parse_jsonl_json(const char *line, size_t len, int64_t width, float *row)
{
    json_error_t jerr;
    json_t *a, *v;
    char *why = NULL;
    size_t i;

    a = json_loadb(line, len, JSON_DECODE_ANY, &jerr);
    if (!a)
        return batch_reason("malformed JSON at column %d: %s", jerr.column,
                            jdoc_jansson_why(line, len, &jerr, JDOC_STORED));
    if (!json_is_array(a)) {
        why = batch_reason("expected a JSON array of %lld numbers", (long long)width);
    } else if ((int64_t)json_array_size(a) != width) {
        why = batch_reason("expected %lld values, got %zu", (long long)width, json_array_size(a));
    } else {
        json_array_foreach (a, i, v) {
            if (json_is_number(v)) {
                row[i] = (float)json_number_value(v);
            } else if (json_is_null(v)) {
                row[i] = NAN;
            } else {
                why = batch_reason("value %zu is not a number", i + 1);
                break;
            }
        }
    }
    json_decref(a);
    return why;
}

int batch_parse_field(const char *p, size_t flen, float *out)
{
    char field[64], *stop;

    while (flen > 0 && (*p == ' ' || *p == '\t'))
        p++, flen--;
    while (flen > 0 && (p[flen - 1] == ' ' || p[flen - 1] == '\t'))
        flen--;
    if (flen == 0) {
        *out = NAN; /* an empty field is a missing value */
        return 0;
    }
    if (fast_float(p, p + flen, out))
        return 0;
    if (flen >= sizeof(field))
        return -2;
    memcpy(field, p, flen);
    field[flen] = '\0';
    errno = 0;
    *out = strtof(field, &stop);
    return stop == field + flen ? 0 : -1; /* a NUL byte stops strtof too */
}

static char *csv_fields(const char *line, size_t len, int64_t width, float *row)
{
    const char *p = line, *end = line + len;
    int64_t col = 0;

    while (col < width) {
        const char *q = memchr(p, ',', (size_t)(end - p));
        const char *fend = q ? q : end;
        int rc = batch_parse_field(p, (size_t)(fend - p), &row[col]);
        if (rc == -2)
            return batch_reason("column %lld: value too long", (long long)col + 1);
        if (rc != 0)
            return batch_reason("column %lld: not a number", (long long)col + 1);
        col++;
        if (!q)
            break;
        p = q + 1;
        if (col == width)
            return batch_reason("expected %lld columns, got more", (long long)width);
    }
    if (col < width)
        return batch_reason("expected %lld columns, got %lld", (long long)width, (long long)col);
    return NULL;
}

char *batch_parse_csv(const char *line, size_t len, int64_t width, float *row)
{
    char *why = csv_fields(line, len, width, row), *nul;

    /* no number takes a NUL byte, so a good record has none: look for one only in a bad
     * record, where it is the reason to give */
    if (why && (nul = batch_parse_nul(line, len)) != NULL) {
        free(why);
        why = nul;
    }
    return why;
}
