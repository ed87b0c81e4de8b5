/*
 * fuzz_copy_row.c: libFuzzer target for warehouse_copy_row(), a row of PostgreSQL's COPY text
 * format into a batch record's features and keys. Byte 0 gives the key columns (0..3), byte 1
 * the columns (1..64), byte 2 the output (bit 0: keys as JSON; bits 1..3: which keys are
 * numbers); the rest is one row. A rejection must carry a reason and leave both buffers as they
 * were; an accepted row's JSON keys must be valid JSON, its CSV keys exactly n_keys CSV fields,
 * and its features exactly as many CSV fields as the columns hold values. CSV keys, as a
 * table sink's resume point, split back into n_keys values (warehouse_csv_keys()) unless one is
 * NULL; any bytes given to that split give values or -1, never a crash.
 */
#define _GNU_SOURCE
#include "warehouse/warehouse_internal.h"

#include <jansson.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* CSV fields in `s` (RFC 4180 quotes), each followed by ','; -1 if malformed */
static long csv_fields(const char *s, size_t n)
{
    long fields = 0;
    size_t i = 0;

    while (i < n) {
        if (s[i] == '"') {
            for (i++;; i++) {
                if (i >= n)
                    return -1;
                if (s[i] == '"' && i + 1 < n && s[i + 1] == '"')
                    i++;
                else if (s[i] == '"')
                    break;
            }
            i++;
            if (i >= n || s[i] != ',')
                return -1;
        } else {
            while (i < n && s[i] != ',') {
                if (s[i] == '"' || s[i] == '\n' || s[i] == '\r')
                    return -1;
                i++;
            }
            if (i >= n)
                return -1;
        }
        i++;
        fields++;
    }
    return fields;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *names[3] = {"id", "region \"x\"", "n"};
    unsigned char numbers[3];
    struct warehouse_row_layout l;
    struct buf features = {0}, keys = {0}, json = {0};
    char *why;

    if (size < 3)
        return 0;
    l.n_keys = data[0] % 4;
    l.n_columns = l.n_keys + 1 + data[1] % 64;
    l.keys_json = data[2] & 1;
    for (int k = 0; k < 3; k++)
        numbers[k] = (data[2] >> (1 + k)) & 1;
    l.key_names = names;
    l.key_is_number = numbers;
    buf_puts(&features, "x");
    buf_puts(&keys, "y");
    why = warehouse_copy_row(&l, (const char *)data + 3, size - 3, &features, &keys);
    if (why) {
        if (!why[0] || features.len != 1 || keys.len != 1)
            abort();
        if (why != warehouse_row_nomem)
            free(why);
    } else if (l.keys_json && l.n_keys > 0) {
        json_error_t jerr;
        json_t *v;
        buf_puts(&json, "{");
        buf_append(&json, keys.data + 1, keys.len - 2); /* without "y" and the last ',' */
        buf_puts(&json, "}");
        /* numbers as JSON writes them; jansson alone refuses those past a double's range */
        v = json_loadb(json.data, json.len, JSON_ALLOW_NUL | JSON_DECODE_INT_AS_REAL, &jerr);
        if (v ? json_object_size(v) != l.n_keys : !strstr(jerr.text, "overflow"))
            abort();
        json_decref(v);
    } else if (!l.keys_json && csv_fields(keys.data + 1, keys.len - 1) != (long)l.n_keys) {
        abort();
    } else if (!l.keys_json && l.n_keys > 0) {
        /* as a resume point: the key values back, or -1 for a NULL (an empty field) */
        char **v = NULL;
        size_t n = 0;
        int rc = warehouse_csv_keys(keys.data + 1, keys.len - 1, &v, &n);
        if (rc == 0 ? n != l.n_keys : !memmem(keys.data, keys.len, ",,", 2) && keys.data[1] != ',')
            abort();
        for (size_t i = 0; i < n; i++)
            free(v[i]);
        free(v);
    }
    {
        /* any bytes as a resume point: values, or -1 with nothing */
        char **v = NULL;
        size_t n = 0;
        if (warehouse_csv_keys((const char *)data + 3, size - 3, &v, &n) != 0 && (v || n))
            abort();
        for (size_t i = 0; i < n; i++)
            free(v[i]);
        free(v);
    }
    buf_release(&features);
    buf_release(&keys);
    buf_release(&json);
    return 0;
}
