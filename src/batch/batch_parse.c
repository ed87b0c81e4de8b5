/*
 * batch_parse.c: one batch-transform record (a JSON Lines array or a CSV line) into a row of
 * floats. Untrusted input: every failure is a reason naming the value or column, never a
 * crash (fuzz/fuzz_batch_record.c drives these).
 */
#define _GNU_SOURCE
#include "batch/batch_internal.h"

#include <errno.h>
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

char *batch_parse_jsonl(const char *line, size_t len, int64_t width, float *row)
{
    json_error_t jerr;
    json_t *a = json_loadb(line, len, JSON_DECODE_ANY, &jerr), *v;
    char *why = NULL;
    size_t i;

    if (!a)
        return batch_reason("malformed JSON at column %d: %s", jerr.column, jerr.text);
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

char *batch_parse_csv(const char *line, size_t len, int64_t width, float *row)
{
    const char *p = line, *end = line + len;
    int64_t col = 0;

    while (col < width) {
        const char *q = memchr(p, ',', (size_t)(end - p));
        const char *fend = q ? q : end;
        char field[64];
        size_t flen;
        while (p < fend && (*p == ' ' || *p == '\t'))
            p++;
        flen = (size_t)(fend - p);
        while (flen > 0 && (p[flen - 1] == ' ' || p[flen - 1] == '\t'))
            flen--;
        if (flen == 0) {
            row[col] = NAN; /* an empty field is a missing value */
        } else {
            char *stop;
            if (flen >= sizeof(field))
                return batch_reason("column %lld: value too long", (long long)col + 1);
            memcpy(field, p, flen);
            field[flen] = '\0';
            errno = 0;
            row[col] = strtof(field, &stop);
            if (*stop || stop == field)
                return batch_reason("column %lld: '%s' is not a number", (long long)col + 1, field);
        }
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
