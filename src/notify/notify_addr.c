/*
 * notify_addr.c: where callbacks may go, and what of a callback URL is shown back.
 *
 * Two checks, one set of rules (notify.h, notify_set_listen()): notify_check_url() reads a URL's
 * text when a job, batch job or model config names it, with no DNS (HTTP threads never wait on
 * it), so an address the text shows is refused with a 400 at once; notify_check_connect() sees
 * every address libcurl is about to connect to, after DNS, so a name that resolves (or rebinds)
 * to a refused address is refused too, before any byte is sent. The first is for the user's
 * sake, the second is the guarantee.
 *
 * The state here is one per process, set by main() before the notifier starts: --webhook-hosts
 * (written once, from one thread, before any reader) and the listener (atomics: the port may
 * be learnt after the notifier started, with --port 0).
 */
#define _GNU_SOURCE /* getifaddrs() */
#include "notify/notify.h"
#include "notify/notify_internal.h"
#include "core/url.h"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>

static int scheme_ok(const char *url)
{
    return strncasecmp(url, "http://", 7) == 0 || strncasecmp(url, "https://", 8) == 0;
}

/* ---- which hosts callbacks may reach ---- */

#define MAX_ALLOWED_HOSTS 32
static char allowed_hosts[MAX_ALLOWED_HOSTS][256];
static int n_allowed_hosts;
static char allowed_hosts_option[1024];

int notify_set_allowed_hosts(const char *list, struct err *e)
{
    const char *p = list, *end;

    n_allowed_hosts = 0;
    allowed_hosts_option[0] = '\0';
    if (!list || !list[0])
        return 0;
    if (strlen(list) >= sizeof(allowed_hosts_option))
        return err_set(e, ERR_INVALID, "--webhook-hosts: longer than %zu bytes",
                       sizeof(allowed_hosts_option) - 1);
    snprintf(allowed_hosts_option, sizeof(allowed_hosts_option), "%s", list);
    for (; *p; p = *end ? end + 1 : end) {
        end = strchr(p, ',');
        if (!end)
            end = p + strlen(p);
        while (p < end && *p == ' ')
            p++;
        size_t len = (size_t)(end - p);
        while (len > 0 && p[len - 1] == ' ')
            len--;
        if (len == 0)
            continue;
        if (n_allowed_hosts == MAX_ALLOWED_HOSTS)
            return err_set(e, ERR_INVALID, "--webhook-hosts: more than %d hosts",
                           MAX_ALLOWED_HOSTS);
        if (len >= sizeof(allowed_hosts[0]) || memchr(p, '/', len) || memchr(p, ':', len) ||
            (len == 1 && p[0] == '.'))
            return err_set(e, ERR_INVALID,
                           "--webhook-hosts: '%.*s' is not a host name, IPv4 address or "
                           ".domain",
                           (int)(len < 100 ? len : 100), p);
        snprintf(allowed_hosts[n_allowed_hosts++], sizeof(allowed_hosts[0]), "%.*s", (int)len, p);
    }
    return 0;
}

static int host_allowed(const char *host)
{
    size_t hl = strlen(host);

    if (n_allowed_hosts == 0)
        return 1;
    for (int i = 0; i < n_allowed_hosts; i++) {
        const char *a = allowed_hosts[i];
        size_t al = strlen(a);
        if (strcasecmp(host, a) == 0)
            return 1;
        if (a[0] == '.' && hl > al && strcasecmp(host + hl - al, a) == 0)
            return 1;
    }
    return 0;
}

/* 1 if --webhook-hosts names `host` (not merely: allows any host). */
static int host_named(const char *host)
{
    return n_allowed_hosts > 0 && host && host_allowed(host);
}

/* ---- which addresses callbacks may reach ---- */

/* This process's listener (notify_set_listen()). Written by the main thread, read by HTTP
 * threads and the notifier: atomics. The pair only ever changes from "port not bound yet" to
 * the bound port, with the same host, so reading them one after the other is consistent. */
static _Atomic uint32_t listen_host; /* IPv4, network byte order */
static _Atomic int listen_port = -1; /* -1: no listener; 0: not bound yet */

int notify_set_listen(const char *host, int port, struct err *e)
{
    struct in_addr a;

    if (!host) {
        atomic_store(&listen_port, -1);
        return 0;
    }
    if (inet_pton(AF_INET, host, &a) != 1)
        return err_set(e, ERR_INVALID, "--host: '%.100s' is not an IPv4 address", host);
    if (port < 0 || port > 65535)
        return err_set(e, ERR_INVALID, "--port: %d is not between 0 and 65535", port);
    atomic_store(&listen_host, a.s_addr);
    atomic_store(&listen_port, port);
    return 0;
}

int notify_listen_pending(void)
{
    return atomic_load(&listen_port) == 0;
}

/* An address as the rules see it: IPv4 (also when written ::ffff:a.b.c.d, which reaches the
 * same IPv4 socket) or IPv6, and a port. */
struct ip {
    int v6;              /* 0: IPv4 in b[0..3] */
    unsigned char b[16]; /* network byte order */
    int port;
};

static void ip_set6(struct ip *ip, const unsigned char b[16])
{
    static const unsigned char mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

    ip->v6 = memcmp(b, mapped, sizeof(mapped)) != 0;
    memcpy(ip->b, ip->v6 ? b : b + 12, ip->v6 ? 16 : 4);
}

/* 0, or -1 if `sa` is neither AF_INET nor AF_INET6. */
static int ip_from_sockaddr(const struct sockaddr *sa, struct ip *out)
{
    memset(out, 0, sizeof(*out));
    if (sa->sa_family == AF_INET) {
        struct sockaddr_in in;
        memcpy(&in, sa, sizeof(in));
        memcpy(out->b, &in.sin_addr, 4);
        out->port = ntohs(in.sin_port);
        return 0;
    }
    if (sa->sa_family == AF_INET6) {
        struct sockaddr_in6 in6;
        memcpy(&in6, sa, sizeof(in6));
        ip_set6(out, in6.sin6_addr.s6_addr);
        out->port = ntohs(in6.sin6_port);
        return 0;
    }
    return -1;
}

/* The address a URL's host shows in its text, as libcurl reads it (it has already turned
 * 127.1, 2130706433 and 0x7f.0.0.1 into 127.0.0.1), or -1 for a name that only DNS can tell.
 * "localhost" and "*.localhost" never reach DNS in libcurl: they are loopback. */
static int ip_from_host_text(const char *host, int port, struct ip *out)
{
    char h[256];
    size_t len = strlen(host);
    struct in6_addr a6;
    struct in_addr a4;

    memset(out, 0, sizeof(*out));
    out->port = port;
    if (len >= sizeof(h))
        return -1;
    memcpy(h, host, len + 1);
    if (len > 1 && h[len - 1] == '.')
        h[--len] = '\0';
    if (h[0] == '[') {
        h[strcspn(h, "]%")] = '\0'; /* without the brackets and a zone id */
        if (inet_pton(AF_INET6, h + 1, &a6) != 1)
            return -1;
        ip_set6(out, a6.s6_addr);
        return 0;
    }
    if (inet_pton(AF_INET, h, &a4) == 1) {
        memcpy(out->b, &a4, 4);
        return 0;
    }
    if (strcasecmp(h, "localhost") == 0 ||
        (len > 10 && strcasecmp(h + len - 10, ".localhost") == 0)) {
        out->b[0] = 127;
        out->b[3] = 1;
        return 0;
    }
    return -1;
}

/* Which kind of local address `ip` is, with its article ("a loopback", ...), or NULL. */
static const char *ip_local_kind(const struct ip *ip)
{
    static const unsigned char zero[15];
    const unsigned char *b = ip->b;

    if (!ip->v6) {
        if (b[0] == 127)
            return "a loopback";
        if (b[0] == 0)
            return "an unspecified";
        if (b[0] == 10 || (b[0] == 172 && (b[1] & 0xf0) == 16) || (b[0] == 192 && b[1] == 168))
            return "a private";
        if (b[0] == 100 && (b[1] & 0xc0) == 64)
            return "a private (shared, RFC 6598)";
        if (b[0] == 169 && b[1] == 254)
            return "a link-local";
        return NULL;
    }
    if (memcmp(b, zero, sizeof(zero)) == 0 && b[15] <= 1)
        return b[15] ? "a loopback" : "an unspecified";
    if (b[0] == 0xfe && (b[1] & 0xc0) == 0x80)
        return "a link-local";
    if ((b[0] & 0xfe) == 0xfc || (b[0] == 0xfe && (b[1] & 0xc0) == 0xc0))
        return "a private";
    return NULL;
}

/* 1 if `ip` reaches this machine: loopback, unspecified (connect() takes it for loopback), the
 * address inferd listens on, or an address of one of its interfaces. */
static int ip_is_this_host(const struct ip *ip, uint32_t host)
{
    const char *kind = ip_local_kind(ip);
    struct ifaddrs *all = NULL;
    int found = 0;

    if (kind && (strcmp(kind, "a loopback") == 0 || strcmp(kind, "an unspecified") == 0))
        return 1;
    if (!ip->v6 && memcmp(ip->b, &host, 4) == 0)
        return 1;
    if (getifaddrs(&all) != 0)
        return 0;
    for (const struct ifaddrs *i = all; i && !found; i = i->ifa_next) {
        struct ip mine;
        if (i->ifa_addr && ip_from_sockaddr(i->ifa_addr, &mine) == 0)
            found = mine.v6 == ip->v6 && memcmp(mine.b, ip->b, ip->v6 ? 16 : 4) == 0;
    }
    freeifaddrs(all);
    return found;
}

/* The rules of notify_set_listen() for a connection to `ip`. */
static int ip_check(const struct ip *ip, int named, struct err *e)
{
    int port = atomic_load(&listen_port);
    uint32_t host = atomic_load(&listen_host);
    const char *kind;
    char text[INET6_ADDRSTRLEN], listen_text[INET_ADDRSTRLEN];

    if (port < 0)
        return 0;
    if (!inet_ntop(ip->v6 ? AF_INET6 : AF_INET, ip->b, text, sizeof(text)))
        snprintf(text, sizeof(text), "?");
    if (port > 0 && ip->port == port && ip_is_this_host(ip, host))
        return err_set(e, ERR_INVALID,
                       "refused: %s port %d is where this inferd listens (its own API is never "
                       "a webhook receiver)",
                       text, port);
    if (((const unsigned char *)&host)[0] == 127 || named)
        return 0;
    kind = ip_local_kind(ip);
    if (!kind && ip_is_this_host(ip, host))
        kind = "this machine's own";
    if (!kind)
        return 0;
    if (!inet_ntop(AF_INET, &host, listen_text, sizeof(listen_text)))
        snprintf(listen_text, sizeof(listen_text), "?");
    return err_set(e, ERR_INVALID,
                   "refused: %s is %s address and inferd listens beyond loopback (--host %s); "
                   "name the host in --webhook-hosts to allow it",
                   text, kind, listen_text);
}

int notify_check_connect(const struct sockaddr *addr, const char *url_host, struct err *e)
{
    struct ip ip;

    if (!addr || ip_from_sockaddr(addr, &ip) != 0)
        return err_set(e, ERR_INVALID, "refused: not an IPv4 or IPv6 address");
    return ip_check(&ip, host_named(url_host), e);
}

/* ---- checking a URL's text ---- */

char *notify_url_redacted(const char *url)
{
    return url_redacted(url);
}

/*
 * A callback URL for an error message: masked by url_redacted(), and only where that is sure
 * to have masked its password. url_redacted() finds userinfo after "scheme://"; libcurl also
 * reads "http:/u:pw@h" and "http:///u:pw@h" as userinfo, and a user may mean userinfo where
 * an '@' follows an unencoded '#' or '?'. So a URL not of the form scheme://host, or with an
 * '@' left unmasked, is not shown. New string (free()); NULL if out of memory.
 */
static char *shown_in_error(const char *url)
{
    size_t n = strspn(url, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+.-");
    char *shown;
    const char *rest;

    if (n == 0 || strncmp(url + n, "://", 3) != 0 || url[n + 3] == '/')
        return strdup("(a URL not of the form scheme://host, not shown)");
    shown = url_redacted(url);
    rest = shown ? strstr(shown, "***@") : NULL;
    if (shown && strchr(rest ? rest + 4 : shown, '@')) {
        free(shown);
        return strdup("(a URL with an unencoded '@', not shown)");
    }
    return shown;
}

int notify_check_url(const char *url, struct err *e)
{
    CURLU *u = NULL;
    char *host = NULL, *port = NULL, *shown = NULL, *end = NULL;
    struct ip ip;
    long port_n;
    int rc = 0;

    if (!url || !scheme_ok(url)) {
        shown = shown_in_error(url ? url : "");
        rc = err_set(e, ERR_INVALID, "'%.100s' is not an http:// or https:// URL",
                     shown ? shown : "");
        goto cleanup;
    }
    /* "http:///u:pw@h": libcurl takes it (the host after the slashes), url_redacted() would
     * show the password in the job's JSON */
    if (url[url[4] == ':' ? 7 : 8] == '/') {
        rc = err_set(e, ERR_INVALID, "expected a host right after http:// or https://");
        goto cleanup;
    }
    u = curl_url();
    if (!u) {
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    if (curl_url_set(u, CURLUPART_URL, url, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK || !host || !host[0] ||
        curl_url_get(u, CURLUPART_PORT, &port, CURLU_DEFAULT_PORT) != CURLUE_OK || !port) {
        shown = shown_in_error(url);
        rc = err_set(e, ERR_INVALID, "'%.100s' is not a URL with a host", shown ? shown : "");
        goto cleanup;
    }
    if (!host_allowed(host)) {
        rc = err_set(e, ERR_INVALID, "host '%.100s' is not in --webhook-hosts (%.200s)", host,
                     allowed_hosts_option);
        goto cleanup;
    }
    port_n = strtol(port, &end, 10);
    if (*end == '\0' && ip_from_host_text(host, (int)port_n, &ip) == 0)
        rc = ip_check(&ip, host_named(host), e);
cleanup:
    free(shown);
    curl_free(port);
    curl_free(host);
    curl_url_cleanup(u);
    return rc;
}
