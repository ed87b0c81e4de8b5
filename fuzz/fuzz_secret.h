/*
 * fuzz_secret.h: what the fuzz targets share to check that a URL's password never reaches an
 * error message: where its userinfo password is, and a copy of it that no parser rule could
 * tell apart. A target calls its parser again with the password changed: a message that then
 * differs showed the password (or depended on it).
 */
#ifndef INFERD_FUZZ_SECRET_H
#define INFERD_FUZZ_SECRET_H

#include <stddef.h>
#include <string.h>

/* The password's span in an authority that starts at `auth` and ends at the first of `stops`
 * (url_redacted()'s rule is "/?#"): after the userinfo's first ':', before the authority's
 * last '@'. 1 and [*from, *to) as offsets from `url`; 0 if there is no password. */
static inline int fuzz_password_span(const char *url, const char *auth, const char *stops,
                                     size_t *from, size_t *to)
{
    const char *end = auth + strcspn(auth, stops), *at = NULL, *colon;

    for (const char *p = auth; p < end; p++)
        if (*p == '@')
            at = p;
    if (!at || !(colon = memchr(auth, ':', (size_t)(at - auth))))
        return 0;
    *from = (size_t)(colon + 1 - url);
    *to = (size_t)(at - url);
    return 1;
}

/* Changes each letter and digit in s[from, to) to another of its kind (g-z and G-Z stay
 * letters that are not hex digits; a %XX escape is left as it is). 1 if anything changed. */
static inline int fuzz_mutate_secret(char *s, size_t from, size_t to)
{
    int changed = 0;

    for (size_t i = from; i < to; i++) {
        char c = s[i];
        if (c == '%')
            i += 2;
        else if ((c >= 'g' && c <= 'y') || (c >= 'G' && c <= 'Y') || (c >= '0' && c <= '8'))
            s[i] = (char)(c + 1), changed = 1;
        else if (c == 'z' || c == 'Z')
            s[i] = (char)(c - 19), changed = 1; /* to 'g' / 'G' */
        else if (c == '9')
            s[i] = '0', changed = 1;
    }
    return changed;
}

#endif
