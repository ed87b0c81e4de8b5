/*
 * tls.c: the Redis queue over TLS (rediss://), for a hiredis that has no TLS of its own.
 *
 * Debian 12's hiredis is 0.14, before hiredis_ssl: its contexts read and write a plain file
 * descriptor. So each TLS connection is a bridge: OpenSSL connects to Redis (the server's
 * certificate verified against ?ca=FILE or the system's CAs, and its name or IP checked), and
 * hiredis gets one end of a socketpair whose other end a pump thread copies to and from the
 * TLS session. Everything above (timeouts, pipelining, the pool, reconnecting) is unchanged:
 * hiredis closing its end ends the pump, and the pump ending (Redis gone, a TLS error) closes
 * that end, which hiredis sees as a lost connection.
 *
 * Threads: one pump per TLS connection (at most the pool, the subscriber and the enqueue
 * thread's), detached; it alone uses its SSL object after the handshake. The SSL_CTX is built
 * at open and only read afterwards (OpenSSL allows SSL_new() from any thread on it).
 */
#define _GNU_SOURCE
#include "queue/redis/internal.h"
#include "core/log.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define PUMP_STALL_S 30 /* a TLS record begun but not finished within this: the link is dead */
#define PUMP_STACK_BYTES (128 * 1024)

/* ---- the context ---- */

/* The newest OpenSSL error, for a message (no secret is ever in one). */
static const char *ssl_reason(char *buf, size_t len)
{
    unsigned long code = ERR_peek_last_error();

    if (!code)
        return "unknown error";
    ERR_error_string_n(code, buf, len);
    ERR_clear_error();
    return buf;
}

int rq_tls_create(const char *ca, const char *cert, const char *key, SSL_CTX **out, struct err *e)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    char why[256];
    int rc = 0;

    *out = NULL;
    if (!ctx)
        return err_set(e, ERR_NOMEM, "--queue: cannot create a TLS context: %s",
                       ssl_reason(why, sizeof(why)));
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    /* the pump polls before reading: SSL_read must come back after a non-data record (a TLS
     * 1.3 session ticket) instead of blocking for data that may not come */
    SSL_CTX_clear_mode(ctx, SSL_MODE_AUTO_RETRY);
    if (ca && ca[0] ? SSL_CTX_load_verify_locations(ctx, ca, NULL) != 1
                    : SSL_CTX_set_default_verify_paths(ctx) != 1) {
        rc = err_set(e, ERR_INVALID, "--queue: ?ca=%s: cannot load CA certificates: %s",
                     ca && ca[0] ? ca : "(system)", ssl_reason(why, sizeof(why)));
        goto cleanup;
    }
    if ((cert && cert[0]) != (key && key[0])) {
        rc = err_set(e, ERR_INVALID, "--queue: ?cert= and ?key= go together");
        goto cleanup;
    }
    if (cert && cert[0] && SSL_CTX_use_certificate_chain_file(ctx, cert) != 1) {
        rc = err_set(e, ERR_INVALID, "--queue: ?cert=%s: cannot load the client certificate: %s",
                     cert, ssl_reason(why, sizeof(why)));
        goto cleanup;
    }
    if (key && key[0] &&
        (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1 ||
         SSL_CTX_check_private_key(ctx) != 1)) {
        rc = err_set(e, ERR_INVALID,
                     "--queue: ?key=%s: cannot load it, or it is not ?cert='s key: %s", key,
                     ssl_reason(why, sizeof(why)));
        goto cleanup;
    }
cleanup:
    if (rc != 0)
        SSL_CTX_free(ctx);
    else
        *out = ctx;
    return rc;
}

/* ---- the pump ---- */

struct pump {
    SSL *ssl;
    int tcp;   /* the TLS connection's socket */
    int local; /* our end of the socketpair; hiredis has the other */
};

/*
 * Copies both ways until either side ends. Redis's replies wait in `in` while hiredis is not
 * reading them (it may be writing a long pipeline first): meanwhile the pump reads no more
 * from Redis, which buffers its own output, but goes on passing hiredis's commands to Redis,
 * so a pipeline larger than the socket buffers cannot deadlock the two.
 */
static void *pump_main(void *arg)
{
    struct pump *p = arg;
    char in[16384], out[16384];
    size_t in_len = 0, in_off = 0;

    for (;;) {
        struct pollfd fds[2] = {
            {.fd = p->local, .events = (short)(POLLIN | (in_len ? POLLOUT : 0))},
            {.fd = p->tcp, .events = (short)(in_len ? 0 : POLLIN)}};
        int pending = !in_len && SSL_pending(p->ssl) > 0;
        if (!pending && poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (!in_len && (pending || (fds[1].revents & (POLLIN | POLLHUP | POLLERR)))) {
            int n = SSL_read(p->ssl, in, (int)sizeof(in));
            int err = n > 0 ? SSL_ERROR_NONE : SSL_get_error(p->ssl, n);
            if (n > 0) {
                in_len = (size_t)n;
                in_off = 0;
            } else if (err != SSL_ERROR_WANT_READ && err != SSL_ERROR_WANT_WRITE) {
                break; /* Redis closed, or the TLS session failed */
            }
        }
        if (in_len) {
            ssize_t w = send(p->local, in + in_off, in_len - in_off, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (w > 0) {
                in_off += (size_t)w;
                if (in_off == in_len)
                    in_len = 0;
            } else if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                break;
            }
        }
        if (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t n = recv(p->local, out, sizeof(out), MSG_DONTWAIT);
            if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
                break; /* hiredis closed its end */
            if (n > 0 && SSL_write(p->ssl, out, (int)n) <= 0)
                break; /* Redis is gone */
        }
    }
    close(p->local); /* hiredis sees the end of the stream */
    SSL_free(p->ssl);
    close(p->tcp);
    free(p);
    return NULL;
}

/* ---- connecting ---- */

static int connect_tcp(const char *host, int port, int timeout_ms, int *out, struct err *e)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res = NULL;
    char service[16];
    int fd = -1, gai, saved = ECONNREFUSED;

    *out = -1;
    snprintf(service, sizeof(service), "%d", port);
    gai = getaddrinfo(host, service, &hints, &res);
    if (gai != 0)
        return err_set(e, ERR_UNAVAILABLE, "Redis at %s:%d: %s", host, port, gai_strerror(gai));
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        struct pollfd pfd;
        int soerr = 0;
        socklen_t sl = sizeof(soerr);
        fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0) {
            saved = errno;
            continue;
        }
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) != 0 && errno != EINPROGRESS) {
            saved = errno;
        } else {
            pfd = (struct pollfd){.fd = fd, .events = POLLOUT};
            if (poll(&pfd, 1, timeout_ms) == 1 &&
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) == 0 && soerr == 0)
                break;
            saved = soerr ? soerr : ETIMEDOUT;
        }
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0)
        return err_set(e, ERR_UNAVAILABLE, "Redis at %s:%d: %s", host, port, strerror(saved));
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    *out = fd;
    return 0;
}

static void set_timeouts(int fd, int seconds)
{
    struct timeval tv = {seconds, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
}

int rq_tls_connect(SSL_CTX *ctx, const char *host, int port, int timeout_ms, int *fd_out,
                   struct err *e)
{
    struct pump *p = NULL;
    struct in6_addr ip;
    pthread_attr_t attr;
    pthread_t th;
    int tcp = -1, pair[2] = {-1, -1}, rc, one = 1, perr;
    char why[256];
    long verify;

    *fd_out = -1;
    rc = connect_tcp(host, port, timeout_ms, &tcp, e);
    if (rc != 0)
        return rc;
    setsockopt(tcp, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    set_timeouts(tcp, timeout_ms / 1000 > 0 ? timeout_ms / 1000 : 1);
    p = calloc(1, sizeof(*p));
    if (!p || !(p->ssl = SSL_new(ctx))) {
        rc = err_set(e, ERR_NOMEM, "Redis at %s:%d: cannot start TLS", host, port);
        goto fail;
    }
    /* the certificate must name the host the URL names (an IP address: its IP SAN) */
    if (inet_pton(AF_INET, host, &ip) == 1 || inet_pton(AF_INET6, host, &ip) == 1) {
        X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(p->ssl), host);
    } else {
        SSL_set_tlsext_host_name(p->ssl, host);
        SSL_set1_host(p->ssl, host);
    }
    SSL_set_fd(p->ssl, tcp);
    if (SSL_connect(p->ssl) != 1) {
        verify = SSL_get_verify_result(p->ssl);
        rc = err_set(e, ERR_UNAVAILABLE, "Redis at %s:%d: TLS handshake failed: %s", host, port,
                     verify != X509_V_OK ? X509_verify_cert_error_string(verify)
                                         : ssl_reason(why, sizeof(why)));
        ERR_clear_error();
        goto fail;
    }
    set_timeouts(tcp, PUMP_STALL_S);
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0) {
        rc = err_set(e, ERR_UNAVAILABLE, "Redis at %s:%d: socketpair: %s", host, port,
                     strerror(errno));
        goto fail;
    }
    p->tcp = tcp;
    p->local = pair[0];
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, PUMP_STACK_BYTES);
    perr = pthread_create(&th, &attr, pump_main, p);
    pthread_attr_destroy(&attr);
    if (perr != 0) {
        rc = err_set(e, ERR_UNAVAILABLE, "Redis at %s:%d: cannot start the TLS thread: %s", host,
                     port, strerror(perr));
        goto fail;
    }
    *fd_out = pair[1];
    return 0;
fail:
    if (p && p->ssl)
        SSL_free(p->ssl);
    free(p);
    if (tcp >= 0)
        close(tcp);
    if (pair[0] >= 0)
        close(pair[0]);
    if (pair[1] >= 0)
        close(pair[1]);
    return rc;
}
