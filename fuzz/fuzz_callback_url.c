/*
 * fuzz_callback_url.c: libFuzzer target for webhook callback URLs, notify_check_url() in
 * src/notify/notify_addr.c, which every job's and batch job's callback_url goes through. The
 * first byte's bit 0 sets --webhook-hosts (a name, a .domain and an address); the rest is the
 * URL. No DNS: the check reads the URL's text only.
 *
 * An accepted URL starts with http:// or https:// (the scheme in any case). A rejection
 * carries a message that never shows a userinfo password: neither the one url_redacted()
 * would mask (before the last '@' of the authority) nor the one libcurl reads (its
 * CURLUPART_PASSWORD). Where the password's text is in the message, the same URL with the
 * password's letters and digits changed must give the same message: otherwise it was shown.
 */
#include "notify/notify.h"
#include "fuzz_secret.h"

#include <curl/curl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define URL_MAX 4096

/* `pw` (raw text, at [from, to) of `url`) must not be shown by the message `msg`. */
static void check_hidden(const char *url, size_t from, size_t to, const char *msg)
{
    static char copy[URL_MAX + 1], pw[URL_MAX + 1];
    struct err e2 = {0};

    if (to - from < 4)
        return;
    memcpy(pw, url + from, to - from);
    pw[to - from] = '\0';
    if (!strstr(msg, pw))
        return;
    snprintf(copy, sizeof(copy), "%s", url);
    if (!fuzz_mutate_secret(copy, from, to))
        return;
    if (notify_check_url(copy, &e2) == 0 || strcmp(msg, e2.msg) != 0) {
        fprintf(stderr, "password '%s' shown: '%s'\n", pw, msg);
        abort();
    }
}

/* The password as url_redacted() finds userinfo: after "://", before the last '@' of the
 * authority (which ends at the first '/', '?' or '#'), after the userinfo's first ':'. */
static void check_redacted_rule(const char *url, const char *msg)
{
    const char *sep = strstr(url, "://");
    size_t from, to;

    if (sep && fuzz_password_span(url, sep + 3, "/?#", &from, &to))
        check_hidden(url, from, to, msg);
}

/* The password as libcurl reads it (it takes "http:/h" and "http:///h" too), wherever its
 * raw text follows a ':' and precedes an '@' in the URL. */
static void check_curl_rule(const char *url, const char *msg)
{
    CURLU *u = curl_url();
    char *pw = NULL;

    if (u && curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK &&
        curl_url_get(u, CURLUPART_PASSWORD, &pw, 0) == CURLUE_OK && pw) {
        size_t n = strlen(pw);
        for (const char *p = strstr(url, pw); p; p = strstr(p + 1, pw))
            if (p > url && p[-1] == ':' && p[n] == '@') {
                check_hidden(url, (size_t)(p - url), (size_t)(p - url) + n, msg);
                break;
            }
    }
    curl_free(pw);
    curl_url_cleanup(u);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static char url[URL_MAX + 1];
    static int hosts = -1;
    struct err e = {0};

    if (size < 1 || size > URL_MAX)
        return 0;
    if (hosts != (data[0] & 1)) {
        hosts = data[0] & 1;
        if (notify_set_allowed_hosts(hosts ? "example.com, .internal.example, 10.1.2.3" : "", &e) !=
            0)
            abort();
    }
    memcpy(url, data + 1, size - 1);
    url[size - 1] = '\0';
    if (notify_check_url(url, &e) == 0) {
        if (strncasecmp(url, "http://", 7) != 0 && strncasecmp(url, "https://", 8) != 0)
            abort();
        return 0;
    }
    if (!e.msg[0] || !memchr(e.msg, '\0', sizeof(e.msg)))
        abort();
    check_redacted_rule(url, e.msg);
    check_curl_rule(url, e.msg);
    return 0;
}
