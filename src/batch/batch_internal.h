/*
 * batch_internal.h: the record parsers, shared with their unit tests and fuzz target.
 */
#ifndef INFERD_BATCH_INTERNAL_H
#define INFERD_BATCH_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

/*
 * Parse one record of `width` values into `row` (missing values become NaN). Return NULL for
 * a good record, or a new string (free() it) saying what is wrong with it and where, quoting
 * none of the record.
 *   line  borrowed; not NUL-terminated necessarily: `len` bytes
 */
char *batch_parse_jsonl(const char *line, size_t len, int64_t width, float *row);
char *batch_parse_csv(const char *line, size_t len, int64_t width, float *row);

/* One CSV field (`flen` bytes, blanks around it ignored) as a number: 0 and *out (NaN for an
 * empty field), -1 when it is not a number, -2 when it is too long to be one. */
int batch_parse_field(const char *p, size_t flen, float *out);

/* A reason (a new string) when the record holds a NUL byte, which no text record may (the
 * file is binary or broken); else NULL. Both parsers refuse such a record with it. */
char *batch_parse_nul(const char *line, size_t len);

/* batch_parse_jsonl is these two: a fast path for flat arrays of exactly `width` numbers and
 * nulls (1 if it parsed the record; 0 leaves it to jansson), then jansson, which also gives
 * the reasons. Both convert numbers alike; the fuzz target checks that they agree. */
int batch_parse_jsonl_fast(const char *line, size_t len, int64_t width, float *row);
char *batch_parse_jsonl_json(const char *line, size_t len, int64_t width, float *row);

/* A new string (free() it) formatted like printf: why a record is bad. Never NULL. */
char *batch_reason(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
