/*
 * url.c: URLs shown back with their credentials masked (url.h). One place for the rule, used
 * by webhook callbacks (notify), queue and warehouse URLs alike.
 */
#define _GNU_SOURCE
#include "core/url.h"
#include "core/buf.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The userinfo masked: everything before the last '@' of the authority. */
static char *userinfo_masked(const char *url)
{
    const char *sep, *auth, *end, *at = NULL;
    size_t size;
    char *out;

    sep = strstr(url, "://");
    if (sep && strcspn(url, "/?#@") < (size_t)(sep - url))
        sep = NULL; /* "://" inside a path or query is not a scheme's */
    auth = sep ? sep + 3 : url;
    end = auth + strcspn(auth, "/?#");
    for (const char *p = auth; p < end; p++)
        if (*p == '@')
            at = p; /* the last one: whatever a client would take for userinfo is masked */
    if (!at)
        return strdup(url);
    size = (size_t)(auth - url) + 3 + strlen(at) + 1;
    out = malloc(size);
    if (out)
        snprintf(out, size, "%.*s***%s", (int)(auth - url), url, at);
    return out;
}

char *url_redacted(const char *url)
{
    char *shown, *out;
    const char *query, *p;
    struct buf b = {0};
    int rc = 0;

    if (!url)
        return NULL;
    shown = userinfo_masked(url);
    query = shown ? strchr(shown, '?') : NULL;
    if (!query || !strstr(query, "password="))
        return shown;
    rc = buf_append(&b, shown, (size_t)(query - shown));
    for (p = query; rc == 0 && *p;) {
        size_t n = strcspn(p + 1, "&#") + 1; /* one parameter with its leading ? or & */
        if (strncmp(p + 1, "password=", 9) == 0)
            rc = buf_printf(&b, "%cpassword=***", *p);
        else
            rc = buf_append(&b, p, n);
        p += n;
    }
    out = rc == 0 && b.data ? buf_take(&b) : NULL;
    buf_release(&b);
    free(shown);
    return out;
}
