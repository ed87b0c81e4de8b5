/*
 * fuzz_batch_record.c: libFuzzer target for the batch transform's record parsers (JSON Lines
 * and CSV). Byte 0 picks the parser, byte 1 the width (1..64); the rest is one record. Every
 * rejection must carry a reason; whatever the JSON Lines fast path accepts, jansson must
 * accept with the same values; every CSV value must be strtof's; a record holding a NUL byte
 * is refused (no text record has one) and the reason says so; no reason quotes the record.
 * Byte 0's bit 1 sends the record through a columns layout (columns.h) instead: a CSV header
 * (the first line) bound by name with a key column, then the rest as CSV or JSON Lines.
 */
#include "batch/batch_internal.h"
#include "batch/columns.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int same(float a, float b)
{
    return (isnan(a) && isnan(b)) || memcmp(&a, &b, sizeof(a)) == 0;
}

/* Each field of a CSV record the parser accepted, through strtof. */
static void check_csv(const char *line, size_t len, int64_t width, const float *row)
{
    char *copy = strndup(line, len), *tok;
    int64_t i = 0;

    if (!copy)
        return;
    /* strtok would merge empty fields: split by hand */
    for (char *p = copy;; i++) {
        char *comma = strchr(p, ',');
        if (comma)
            *comma = '\0';
        tok = p;
        while (*tok == ' ' || *tok == '\t')
            tok++;
        char *end = tok + strlen(tok);
        while (end > tok && (end[-1] == ' ' || end[-1] == '\t'))
            *--end = '\0';
        if (i < width && *tok && !same(strtof(tok, NULL), row[i]))
            abort(); /* the fast path read a value differently from strtof */
        if (!comma)
            break;
        p = comma + 1;
    }
    free(copy);
}

/* Header and record through the columns of a model with features a, b, c and key "id". */
static void fuzz_columns(int csv, const char *text, size_t len)
{
    static const char *const names[] = {"a", "b", "c"};
    static struct feature_entry sorted[] = {{"a", 0}, {"b", 1}, {"c", 2}};
    static const struct features f = {.names = names, .n = 3, .sorted = sorted};
    static char *const id[] = {"id"};
    const struct batch_keys k = {.names = (char **)id, .n = 1};
    const char *nl = memchr(text, '\n', len);
    struct batch_columns c;
    struct buf keys = {0};
    struct err e = {0};
    char **cols = NULL, *why = NULL;
    size_t n = 0;
    float row[3];

    batch_columns_init(&c, &k, &f, 3);
    if (!nl || batch_columns_split_header(text, (size_t)(nl - text), &cols, &n, &e) != 0)
        return;
    if (batch_columns_named(&c, cols, n, &e) != 0) {
        if (!e.msg[0])
            abort(); /* a refused header without a reason */
    } else if (csv) {
        why = batch_columns_parse_csv(&c, nl + 1, len - (size_t)(nl + 1 - text), row, &keys);
    } else {
        why = batch_columns_parse_json(&c, nl + 1, len - (size_t)(nl + 1 - text), row, &keys);
    }
    if (why && !why[0])
        abort();
    free(why);
    buf_release(&keys);
    batch_columns_release(&c);
    for (size_t i = 0; i < n; i++)
        free(cols[i]);
    free(cols);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    float row[64], ref[64];
    const char *line = (const char *)data + 2;
    int64_t width;
    char *why;

    if (size < 2)
        return 0;
    width = 1 + data[1] % 64;
    if (data[0] & 2) {
        fuzz_columns(data[0] & 1, line, size - 2);
        return 0;
    }
    if (data[0] & 1) {
        why = batch_parse_csv(line, size - 2, width, row);
        if (!why)
            check_csv(line, size - 2, width, row);
    } else {
        why = batch_parse_jsonl(line, size - 2, width, row);
        if (batch_parse_jsonl_fast(line, size - 2, width, row)) {
            char *ref_why = batch_parse_jsonl_json(line, size - 2, width, ref);
            if (ref_why)
                abort(); /* the fast path accepted what jansson refuses */
            for (int64_t i = 0; i < width; i++)
                if (!same(row[i], ref[i]))
                    abort(); /* ... or read a value differently */
        }
    }
    if (why && !why[0])
        abort();
    if (memchr(line, '\0', size - 2) && (!why || !strstr(why, "NUL byte")))
        abort(); /* a NUL byte read as the end of the record, or a worse reason given */
    if (why && strchr(why, '\'') && !strstr(why, "expected"))
        abort(); /* a reason quoting the record (only jansson's "']' expected" has quotes) */
    free(why);
    return 0;
}
