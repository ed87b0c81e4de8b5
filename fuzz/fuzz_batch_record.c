/*
 * fuzz_batch_record.c: libFuzzer target for the batch transform's record parsers (JSON Lines
 * and CSV). Byte 0 picks the parser, byte 1 the width (1..64); the rest is one record. Every
 * rejection must carry a reason.
 */
#include "batch/batch_internal.h"

#include <stdint.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    float row[64];
    int64_t width;
    char *why;

    if (size < 2)
        return 0;
    width = 1 + data[1] % 64;
    if (data[0] & 1)
        why = batch_parse_csv((const char *)data + 2, size - 2, width, row);
    else
        why = batch_parse_jsonl((const char *)data + 2, size - 2, width, row);
    if (why && !why[0])
        abort();
    free(why);
    return 0;
}
