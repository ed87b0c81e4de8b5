/*
 * framing.c: refuses a request whose length two HTTP parsers could read differently.
 *
 * libmicrohttpd 0.9.75 tolerates messages that a proxy in front may read another way: two
 * Content-Lengths (the first wins), Content-Length with chunked (chunked wins), whitespace
 * before a colon (the name keeps it, so the length is not seen), an obsolete folded line (glued
 * onto the previous header's name) and a bare CR (kept inside a value, where a proxy may end the
 * line). Any of these let a second request hide in a body (request smuggling), so each is a
 * 400 that closes the connection (RFC 9112 section 6.3). A bare LF ending a line is read as a
 * line end by libmicrohttpd and by common proxies alike (RFC 9112 section 2.2), so it stays.
 */
#define _GNU_SOURCE
#include "http/http_internal.h"

#include <string.h>
#include <strings.h>

/* RFC 9110 section 5.6.2: the characters of a token (a header name). */
static int is_tchar(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
           (c && strchr("!#$%&'*+-.^_`|~", c));
}

/* Copies at most 40 bytes of a client's header name for a message, '?' for anything not
 * printable, so an error never carries control bytes back. */
static void printable(char *dst, size_t cap, const char *src, size_t len)
{
    size_t n = len < 40 ? len : 40;

    if (n >= cap)
        n = cap - 1;
    for (size_t i = 0; i < n; i++)
        dst[i] = src[i] > 0x20 && src[i] < 0x7f ? src[i] : '?';
    dst[n] = '\0';
}

struct framing {
    int n_length, n_coding;
    const char *coding; /* the Transfer-Encoding value */
    size_t coding_len;
    struct err *e;
    int rc;
};

static int has_prefix_ci(const char *key, size_t len, const char *prefix)
{
    size_t n = strlen(prefix);

    return len >= n && strncasecmp(key, prefix, n) == 0;
}

static enum MHD_Result framing_header(void *cls, enum MHD_ValueKind kind, const char *key,
                                      size_t key_len, const char *value, size_t value_len)
{
    struct framing *f = cls;
    char name[48];

    (void)kind;
    printable(name, sizeof(name), key, key_len);
    for (size_t i = 0; i < key_len; i++) {
        if (!is_tchar((unsigned char)key[i])) {
            f->rc = err_set(f->e, ERR_INVALID,
                            "header name '%s' is not a token (whitespace before the colon, or a "
                            "folded line?)",
                            name);
            return MHD_NO;
        }
    }
    if (key_len == 0) {
        f->rc = err_set(f->e, ERR_INVALID, "a header line has an empty name");
        return MHD_NO;
    }
    for (size_t i = 0; value && i < value_len; i++) {
        if (value[i] == '\r' || value[i] == '\n' || value[i] == '\0') {
            f->rc =
                err_set(f->e, ERR_INVALID, "header '%s': a bare CR, LF or NUL in its value", name);
            return MHD_NO;
        }
    }
    if (has_prefix_ci(key, key_len, "content-length")) {
        if (key_len != 14) {
            f->rc = err_set(f->e, ERR_INVALID,
                            "header '%s': a folded or malformed Content-Length line", name);
            return MHD_NO;
        }
        f->n_length++;
    } else if (has_prefix_ci(key, key_len, "transfer-encoding")) {
        if (key_len != 17) {
            f->rc = err_set(f->e, ERR_INVALID,
                            "header '%s': a folded or malformed Transfer-Encoding line", name);
            return MHD_NO;
        }
        f->n_coding++;
        f->coding = value ? value : "";
        f->coding_len = value ? value_len : 0;
    }
    return MHD_YES;
}

/*
 * Refuses a request whose body's length two parsers could read differently (RFC 9112 section
 * 6.3): ERR_INVALID, with `*status` 400, or 501 for a transfer coding inferd does not decode.
 * Either way the connection is closed after the answer.
 */
int http_check_framing(struct MHD_Connection *conn, const char *version, int *status, struct err *e)
{
    struct framing f = {.e = e};
    const char *v;
    size_t n;

    *status = 400;
    MHD_get_connection_values_n(conn, MHD_HEADER_KIND, framing_header, &f);
    if (f.rc != 0)
        return f.rc;
    if (f.n_length > 1)
        return err_set(e, ERR_INVALID, "Content-Length: sent more than once");
    if (f.n_coding == 0)
        return 0;
    if (f.n_coding > 1)
        return err_set(e, ERR_INVALID, "Transfer-Encoding: sent more than once");
    if (f.n_length)
        return err_set(e, ERR_INVALID,
                       "Content-Length and Transfer-Encoding together: the body's "
                       "length is ambiguous");
    if (strcmp(version, MHD_HTTP_VERSION_1_1) != 0)
        return err_set(e, ERR_INVALID, "Transfer-Encoding in an %s request", version);
    /* the last coding must be chunked, and inferd decodes no other */
    v = f.coding;
    n = f.coding_len;
    while (n && (v[n - 1] == ' ' || v[n - 1] == '\t'))
        n--;
    while (n && (*v == ' ' || *v == '\t')) {
        v++;
        n--;
    }
    if (n == 7 && strncasecmp(v, "chunked", 7) == 0)
        return 0;
    if (n >= 7 && strncasecmp(v + n - 7, "chunked", 7) == 0 &&
        (n == 7 || v[n - 8] == ',' || v[n - 8] == ' ' || v[n - 8] == '\t')) {
        *status = 501;
        return err_set(e, ERR_INVALID, "Transfer-Encoding: only chunked is supported");
    }
    return err_set(e, ERR_INVALID, "Transfer-Encoding: chunked must be the last coding");
}
