/*
 * fuzz_s3_creds.c: libFuzzer target for what the S3 credentials chain reads from outside: the
 * shared credentials and config files (INI, a profile's section) and the JSON answers of the
 * container-credentials and instance-metadata endpoints. The first byte picks the parser. An
 * INI text either holds the profile's keys (0) or not (1); an answer is valid or refused with
 * a reason that never quotes the secret key it held.
 */
#include "storage/storage_internal.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct err e = {0};
    char *text;
    int rc, has = 0;

    if (size < 1 || size > 65536)
        return 0;
    text = malloc(size);
    if (!text)
        return 0;
    memcpy(text, data + 1, size - 1);
    text[size - 1] = '\0';
    switch (data[0] % 3) {
    case 0:
    case 1:
        rc = storage_s3_creds_parse_ini(text, data[0] & 4 ? "default" : "dev", data[0] % 3,
                                        &has, &e);
        if (rc != 0 && rc != 1 && !e.msg[0])
            abort();
        break;
    default: {
        int64_t exp = 0;
        rc = storage_s3_creds_parse_answer((const char *)data + 1, size - 1, &exp, &e);
        if (rc != 0 && !e.msg[0])
            abort();
        if (rc == 0 && exp < 0)
            abort();
        /* a refusal names the source, never the document's secret */
        const char *sk = strstr(text, "\"SecretAccessKey\":\"");
        if (rc != 0 && sk) {
            char secret[64] = {0};
            sk += 19;
            size_t n = strcspn(sk, "\"");
            if (n >= 8 && n < sizeof(secret)) {
                memcpy(secret, sk, n);
                if (strstr(e.msg, secret))
                    abort();
            }
        }
        break;
    }
    }
    free(text);
    return 0;
}
