/*
 * fuzz_s3_xml.c: libFuzzer target for S3's XML answers, which come from the network:
 * storage_s3_parse_list() (ListObjectsV2 pages) and storage_s3_xml_text() (UploadId, Code).
 * Byte 0 picks the prefix the listing is relative to and the element storage_s3_xml_text()
 * looks for; the rest is the document. Checked: the documented return codes, a token only on
 * success and never empty, every name non-empty and not a "folder" key ending in '/'.
 */
#include "storage/storage_internal.h"

#include <libxml/parser.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    xmlInitParser(); /* as storage_s3_http.c's first request does */
    return 0;
}

static void check_list(const char *xml, size_t len, const char *prefix)
{
    struct storage_names ns = {0};
    char *next = (char *)"not reset";
    int rc = storage_s3_parse_list(xml, len, prefix, &ns, &next);

    if (rc != 0 && rc != ERR_NOMEM && rc != ERR_IO)
        abort(); /* not a documented result */
    if (rc != 0 && next)
        abort(); /* a failed page must not hand out a token */
    if (next && !next[0])
        abort(); /* an empty token would ask for the first page again, forever */
    for (size_t i = 0; i < ns.n; i++) {
        size_t n = strlen(ns.v[i]);
        if (n == 0 || ns.v[i][n - 1] == '/')
            abort(); /* an empty name or a folder key got through */
    }
    free(next);
    for (size_t i = 0; i < ns.n; i++)
        free(ns.v[i]);
    free(ns.v);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const char *const prefixes[] = {"", "in/", "a", "in/sub/"};
    static const char *const names[] = {
        "UploadId", "Code", "Message", "Key", "ETag", "NextContinuationToken", "Error", "x"};
    const char *xml = (const char *)data + 1;
    size_t len;
    char *s;

    if (size < 1)
        return 0;
    len = size - 1;
    check_list(xml, len, prefixes[data[0] & 3]);
    s = storage_s3_xml_text(xml, len, names[(data[0] >> 2) & 7]);
    free(s);
    return 0;
}
