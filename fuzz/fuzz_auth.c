/*
 * fuzz_auth.c: libFuzzer target for what a client or an operator hands the key checks: the
 * Authorization header (auth_parse_bearer) and the keys file (keyring_parse). The first byte
 * picks the parser. A header that parses must give a token inside it of 1..AUTH_TOKEN_MAX
 * bytes; a keys file that parses must hold only valid names and scopes, and a lookup of any
 * token in it must return one of its active keys or nothing; a rejection must name a line.
 */
#include "auth/auth.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct keyring ring;
    struct err e = {0};
    char *text;

    if (size < 1 || size > 65536)
        return 0;
    text = malloc(size);
    if (!text)
        return 0;
    memcpy(text, data + 1, size - 1);
    text[size - 1] = '\0';
    if (data[0] & 1) {
        const char *tok;
        size_t len;
        if (auth_parse_bearer(text, &tok, &len) == 0 &&
            (len == 0 || len > AUTH_TOKEN_MAX || tok < text || tok + len > text + strlen(text)))
            abort();
    } else if (keyring_parse(text, size - 1, "fuzz.keys", &ring, &e) == 0) {
        for (size_t i = 0; i < ring.n; i++)
            if (!auth_valid_name(ring.keys[i].name) || !auth_valid_name(ring.keys[i].tenant) ||
                !ring.keys[i].scopes || (ring.keys[i].scopes & ~AUTH_ALL_SCOPES))
                abort();
        const struct auth_key *k = keyring_find(&ring, text, size - 1);
        if (k && (k < ring.keys || k >= ring.keys + ring.n || k->revoked_s))
            abort();
        keyring_free(&ring);
    } else if (!strstr(e.msg, "line ") && e.code != ERR_NOMEM) {
        abort();
    }
    free(text);
    return 0;
}
