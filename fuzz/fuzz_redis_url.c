/*
 * fuzz_redis_url.c: libFuzzer target for the Redis queue's URL (--queue redis[s]://...),
 * rq_url_parse() in src/queue/redis/url.c. Inputs that do not start with redis:// or
 * rediss:// are skipped (queue_open() only hands those to the Redis queue).
 *
 * An accepted URL gives a non-empty host NUL-terminated within its array, 1 <= port <= 65535,
 * 0 <= db <= 1000, files (ca, cert, key) only with rediss://, and a password that is exactly
 * its percent-decoded text (nothing silently cut, e.g. by "%00"). A rejection carries a
 * message, and the message never depends on the password: the same URL with the password's
 * letters and digits changed must give the same message, and the raw password (4+ bytes) is
 * never in it. The userinfo is found as url_redacted() finds it: the last '@' before the
 * first '/', '?' or '#' after the scheme.
 */
#include "queue/redis/internal.h"
#include "fuzz_secret.h"

#include <ctype.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define URL_MAX 4096

/* The reference decoder: %XX with two hex digits only, no %00; -1 otherwise. */
static int ref_decode(const char *p, size_t n, char *out, size_t *out_len)
{
    size_t j = 0;

    for (size_t i = 0; i < n; i++) {
        if (p[i] != '%') {
            out[j++] = p[i];
            continue;
        }
        if (i + 2 >= n)
            return -1;
        if (!isxdigit((unsigned char)p[i + 1]) || !isxdigit((unsigned char)p[i + 2]))
            return -1;
        char hex[3] = {p[i + 1], p[i + 2], 0};
        out[j] = (char)strtol(hex, NULL, 16);
        if (out[j++] == '\0')
            return -1;
        i += 2;
    }
    *out_len = j;
    return 0;
}

/* The password's span in `url` (after the userinfo's first ':', before its last '@'); 0 if
 * the URL has no userinfo with a password. The authority ends at the first of `stops` (by
 * url_redacted()'s rule "/?#"; a parser that let '#' into the password would see "/?"). */
static int password_span(const char *url, const char *stops, size_t *from, size_t *to)
{
    return fuzz_password_span(url, strstr(url, "://") + 3, stops, from, to);
}

/* Each of the query's values is well formed, and ca, cert and key are each the last value
 * given for their name, decoded, all of it ("" when not given). */
static void check_query(const char *url, const struct rq_url *u)
{
    static char decoded[URL_MAX];
    static const char *const names[3] = {"ca", "cert", "key"};
    const char *fields[3] = {u->ca, u->cert, u->key}, *last[3] = {NULL, NULL, NULL};
    const char *q = strchr(url + 8, '?');
    size_t last_len[3] = {0, 0, 0}, n;

    for (const char *p = q ? q + 1 : NULL; p && *p;) {
        size_t len = strcspn(p, "&");
        const char *eq = memchr(p, '=', len);
        int k = -1;
        for (int i = 0; eq && i < 3; i++)
            if ((size_t)(eq - p) == strlen(names[i]) && !strncmp(p, names[i], strlen(names[i])))
                k = i;
        if (k < 0 || ref_decode(eq + 1, len - (size_t)(eq + 1 - p), decoded, &n) != 0)
            abort(); /* accepted an unknown parameter or a bad value */
        last[k] = eq + 1;
        last_len[k] = len - (size_t)(eq + 1 - p);
        p += len + (p[len] == '&');
    }
    for (int i = 0; i < 3; i++) {
        n = 0;
        if (last[i] && ref_decode(last[i], last_len[i], decoded, &n) != 0)
            abort();
        if (n != strlen(fields[i]) || memcmp(decoded, fields[i], n) != 0)
            abort();
    }
}

static void check_accepted(const char *url, const struct rq_url *u)
{
    size_t from, to, n;
    static char decoded[URL_MAX];

    if (!memchr(u->host, '\0', sizeof(u->host)) || !u->host[0])
        abort();
    if (u->port < 1 || u->port > 65535 || u->db < 0 || u->db > 1000)
        abort();
    if (!memchr(u->user, '\0', sizeof(u->user)) || !memchr(u->password, '\0', sizeof(u->password)))
        abort();
    if (!memchr(u->ca, '\0', sizeof(u->ca)) || !memchr(u->cert, '\0', sizeof(u->cert)) ||
        !memchr(u->key, '\0', sizeof(u->key)))
        abort();
    if (!u->tls && (u->ca[0] || u->cert[0] || u->key[0]))
        abort();
    if (u->tls != (strncmp(url, "rediss://", 9) == 0))
        abort();
    if (password_span(url, "/?#", &from, &to)) {
        /* the password is its text decoded, all of it */
        if (ref_decode(url + from, to - from, decoded, &n) != 0)
            abort();
        if (n != strlen(u->password) || memcmp(decoded, u->password, n) != 0)
            abort();
    }
    check_query(url, u);
}

static void check_no_password(char *url, const char *stops, const struct err *e)
{
    static char raw[URL_MAX], copy[URL_MAX + 1];
    struct rq_url u2;
    struct err e2 = {0};
    size_t from, to;

    if (!password_span(url, stops, &from, &to) || to - from < 4)
        return;
    snprintf(copy, sizeof(copy), "%s", url);
    url = copy;
    memcpy(raw, url + from, to - from);
    raw[to - from] = '\0';
    if (!fuzz_mutate_secret(url, from, to))
        return;
    if (rq_url_parse(url, &u2, &e2) == 0)
        abort(); /* the password's letters decided whether the URL is good */
    rq_url_release(&u2);
    /* the password's text in the message, where it is not in the other's: a leak */
    if (strcmp(e->msg, e2.msg) != 0 || (strstr(e->msg, raw) && !strstr(e2.msg, raw)))
        abort();
}

static void check_rejected(char *url, const struct err *e)
{
    if (!e->msg[0] || !memchr(e->msg, '\0', sizeof(e->msg)))
        abort();
    check_no_password(url, "/?#", e);
    check_no_password(url, "/?", e);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static char url[URL_MAX + 1];
    struct rq_url u;
    struct err e = {0};

    if (size > URL_MAX)
        return 0;
    memcpy(url, data, size);
    url[size] = '\0';
    if (strncmp(url, "redis://", 8) != 0 && strncmp(url, "rediss://", 9) != 0)
        return 0;
    if (rq_url_parse(url, &u, &e) == 0)
        check_accepted(url, &u);
    else
        check_rejected(url, &e);
    rq_url_release(&u);
    return 0;
}
