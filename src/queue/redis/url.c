/*
 * url.c: the Redis queue's URL (--queue redis[s]://...) read into a plain struct rq_url, with
 * no I/O and no queue state, so that conn.c, the unit tests and fuzz/fuzz_redis_url.c share
 * one parser. conn.c copies what it keeps and creates the TLS context from ca, cert and key.
 *
 * Errors show the URL with its userinfo masked (url_redacted()), never the password.
 */
#define _GNU_SOURCE
#include "queue/redis/internal.h"
#include "core/url.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int hex_value(char c)
{
    return c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10;
}

/* Why percent_decode() refused a part of the URL, for its error message. */
static const char *const decode_errors[] = {
    [1] = "a '%' must start an escape of two hex digits (%XX)",
    [2] = "%00 (a NUL byte) is not allowed",
    [3] = "too long",
};

/* Decodes %XX in [p, p+n) into out (size `cap`): 0, or an index of decode_errors. A NUL
 * would silently cut the value short (a password or a file name), so %00 is refused. */
static int percent_decode(const char *p, size_t n, char *out, size_t cap)
{
    size_t j = 0;

    for (size_t i = 0; i < n; i++) {
        if (j + 1 >= cap)
            return 3;
        if (p[i] != '%') {
            out[j++] = p[i];
            continue;
        }
        if (i + 2 >= n || !isxdigit((unsigned char)p[i + 1]) || !isxdigit((unsigned char)p[i + 2]))
            return 1;
        out[j] = (char)(hex_value(p[i + 1]) * 16 + hex_value(p[i + 2]));
        if (out[j++] == '\0')
            return 2;
        i += 2;
    }
    out[j] = '\0';
    return 0;
}

/* The query's parameters: ca, cert and key (files, rediss:// only). */
static int parse_query(const char *query, struct rq_url *out, const char *shown, struct err *e)
{
    for (const char *p = query; p && *p;) {
        size_t n = strcspn(p, "&"), cap = 0;
        const char *eq = memchr(p, '=', n);
        char *dst = NULL;
        if (eq && eq - p == 2 && strncmp(p, "ca", 2) == 0)
            dst = out->ca, cap = sizeof(out->ca);
        else if (eq && eq - p == 4 && strncmp(p, "cert", 4) == 0)
            dst = out->cert, cap = sizeof(out->cert);
        else if (eq && eq - p == 3 && strncmp(p, "key", 3) == 0)
            dst = out->key, cap = sizeof(out->key);
        if (!dst)
            return err_set(e, ERR_INVALID,
                           "--queue %s: unknown parameter '%.*s' (ca, cert and key are known)",
                           shown, (int)(eq ? (size_t)(eq - p) : n), p);
        if (!out->tls)
            return err_set(e, ERR_INVALID, "--queue %s: '%.*s' needs rediss:// (TLS)", shown,
                           (int)(eq - p), p);
        int why = percent_decode(eq + 1, n - (size_t)(eq + 1 - p), dst, cap);
        if (why != 0)
            return err_set(e, ERR_INVALID, "--queue %s: '%.*s': %s", shown, (int)(eq - p), p,
                           decode_errors[why]);
        p += n + (p[n] == '&');
    }
    return 0;
}

int rq_url_parse(const char *url, struct rq_url *out, struct err *e)
{
    int tls = strncmp(url, "rediss://", 9) == 0;
    const char *p = url + (tls ? 9 : 8), *colon, *slash, *at, *end, *query;
    char *shown = url_redacted(url);
    const char *sh = shown ? shown : "(the URL given)";
    size_t hlen;
    int rc = 0;

    memset(out, 0, sizeof(*out));
    if (!tls && strncmp(url, "redis://", 8) != 0) {
        rc = err_set(e, ERR_INVALID, "--queue: expected redis:// or rediss://");
        goto cleanup;
    }
    /* url_redacted() ends the userinfo at a '#' (a fragment), so a password holding one would
     * be shown in the errors below: refuse it first, without showing the URL */
    if (strchr(url, '#')) {
        rc =
            err_set(e, ERR_INVALID, "--queue: a '#' in a Redis URL must be percent-encoded (%%23)");
        goto cleanup;
    }
    out->tls = tls;
    out->port = 6379;
    out->db = 0;
    query = strchr(p, '?');
    end = query ? query : p + strlen(p);
    /* userinfo: up to the last '@' before the path */
    slash = memchr(p, '/', (size_t)(end - p));
    at = NULL;
    for (const char *s2 = p; s2 < (slash ? slash : end); s2++)
        if (*s2 == '@')
            at = s2;
    if (at) {
        const char *uc = memchr(p, ':', (size_t)(at - p));
        if (!uc) {
            rc = err_set(e, ERR_INVALID,
                         "--queue %s: the userinfo must be USER:PASSWORD@ or :PASSWORD@", sh);
            goto cleanup;
        }
        int why = percent_decode(p, (size_t)(uc - p), out->user, sizeof(out->user));
        if (why != 0) {
            rc = err_set(e, ERR_INVALID, "--queue %s: the user: %s", sh, decode_errors[why]);
            goto cleanup;
        }
        /* the message says why, never the password's text */
        why = percent_decode(uc + 1, (size_t)(at - uc - 1), out->password, sizeof(out->password));
        if (why != 0 || !out->password[0]) {
            rc = err_set(e, ERR_INVALID,
                         "--queue %s: the password: %s (percent-encode reserved characters)", sh,
                         why ? decode_errors[why] : "may not be empty");
            goto cleanup;
        }
        p = at + 1;
    }
    slash = memchr(p, '/', (size_t)(end - p));
    colon = memchr(p, ':', (size_t)((slash ? slash : end) - p));
    hlen = (size_t)((colon ? colon : slash ? slash : end) - p);
    if (hlen >= sizeof(out->host)) {
        rc = err_set(e, ERR_INVALID, "--queue %s: host name too long", sh);
        goto cleanup;
    }
    memcpy(out->host, p, hlen);
    out->host[hlen] = '\0';
    if (!out->host[0])
        snprintf(out->host, sizeof(out->host), "127.0.0.1");
    if (colon) {
        char *pend;
        long v = strtol(colon + 1, &pend, 10);
        if (pend == colon + 1 || v < 1 || v > 65535 || pend != (slash ? slash : end)) {
            rc = err_set(e, ERR_INVALID, "--queue %s: bad port", sh);
            goto cleanup;
        }
        out->port = (int)v;
    }
    if (slash && slash + 1 < end) {
        char *pend;
        long v = strtol(slash + 1, &pend, 10);
        if (pend != end || v < 0 || v > 1000) {
            rc = err_set(e, ERR_INVALID, "--queue %s: bad database number", sh);
            goto cleanup;
        }
        out->db = (int)v;
    }
    rc = parse_query(query ? query + 1 : NULL, out, sh, e);
cleanup:
    if (rc != 0)
        rq_url_release(out);
    free(shown);
    return rc;
}

void rq_url_release(struct rq_url *u)
{
    explicit_bzero(u->password, sizeof(u->password));
}
