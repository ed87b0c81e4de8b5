/*
 * tls.c: HTTPS for inferd serve and inferd worker (--tls-cert, --tls-key, --tls-client-ca),
 * through libmicrohttpd's GnuTLS support, with certificates re-read on SIGHUP.
 *
 * libmicrohttpd owns the GnuTLS credentials, but asks a retrieve function (its
 * MHD_OPTION_HTTPS_CERT_CALLBACK) for the server's certificate chain and key at every handshake.
 * That function answers from the current snapshot (struct tls_creds: the chain, the key and the
 * client CAs, loaded together), so a reload swaps one pointer and the next handshake uses the
 * new files; connections already open keep their session and are not dropped.
 *
 * Lifetime of a snapshot (RCU-like): GnuTLS uses the chain and key handed out by the retrieve
 * function until that handshake ends, and nothing tells us when that is. A handshake happens
 * before a connection's first request, which the connection guard bounds to --idle-timeout-s
 * (conns.c), so a replaced snapshot is retired, and freed on a later reload once it has been
 * retired longer than that plus a margin, or when the server stops.
 *
 * Mutual TLS: with a client CA the retrieve function also requires a client certificate of the
 * session (GnuTLS then fails a handshake without one) and installs a verify function on it,
 * which checks the client's chain against the snapshot's CAs (and the clientAuth purpose)
 * during the handshake: a client without a certificate, or with one from another CA, is
 * refused by a TLS alert and never reaches a route.
 *
 * There is one TLS context per process (`current_tls`): libmicrohttpd's retrieve function and
 * GnuTLS's verify function carry no user pointer. inferd runs one HTTP server per process.
 *
 * Threads: HTTP threads run the retrieve and verify functions (they read `cur` atomically and
 * take no lock); the main thread reloads under `lock`, which is a leaf.
 */
#define _GNU_SOURCE
#include "http/http_internal.h"
#include "core/clock.h"
#include "core/log.h"

#include <errno.h>
#include <fcntl.h>
#include <gnutls/abstract.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define TLS_MAX_CHAIN 16                 /* certificates in --tls-cert */
#define TLS_MAX_FILE_BYTES (1024 * 1024) /* a PEM file larger than this is not a certificate */
#define TLS_RETIRE_MARGIN_NS (60ull * 1000000000ull)
/* TLS 1.2 and 1.3 only, GnuTLS's usual ciphers */
#define TLS_PRIORITIES "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2"

/* One generation of certificates: immutable once published. */
struct tls_creds {
    gnutls_pcert_st chain[TLS_MAX_CHAIN];
    unsigned n_chain;
    gnutls_privkey_t key;
    gnutls_x509_trust_list_t client_ca; /* NULL: no client certificate is asked for */
    uint64_t retired_ns;                /* clock_mono_ns() when replaced; 0 while current */
    struct tls_creds *retired_next;     /* guarded by http_tls.lock */
};

struct http_tls {
    char *cert_path, *key_path, *client_ca_path; /* immutable; client_ca_path NULL: none */
    uint64_t retire_after_ns;                    /* immutable: see the file's comment */
    _Atomic(struct tls_creds *) cur;             /* written under lock, read without */
    pthread_mutex_t lock;
    struct tls_creds *retired; /* guarded by lock */
};

static _Atomic(struct http_tls *) current_tls;

/* ---- loading ---- */

static void creds_destroy(struct tls_creds *c)
{
    if (!c)
        return;
    for (unsigned i = 0; i < c->n_chain; i++)
        gnutls_pcert_deinit(&c->chain[i]);
    if (c->key)
        gnutls_privkey_deinit(c->key);
    if (c->client_ca)
        gnutls_x509_trust_list_deinit(c->client_ca, 1);
    free(c);
}

/* Reads a whole (small) file into `d` (freed with gnutls_free()). */
static int read_file(const char *opt, const char *path, gnutls_datum_t *d, struct err *e)
{
    struct stat st;
    ssize_t got = 0, n;
    int fd = open(path, O_RDONLY | O_CLOEXEC), rc = 0;

    d->data = NULL;
    d->size = 0;
    if (fd < 0)
        return err_set(e, ERR_INVALID, "%s '%s': cannot open: %s", opt, path, strerror(errno));
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size > TLS_MAX_FILE_BYTES) {
        rc = err_set(e, ERR_INVALID, "%s '%s': not a regular file of at most %d bytes", opt, path,
                     TLS_MAX_FILE_BYTES);
        goto cleanup;
    }
    d->data = gnutls_malloc((size_t)st.st_size + 1);
    if (!d->data) {
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    while (got < st.st_size && (n = read(fd, d->data + got, (size_t)(st.st_size - got))) != 0) {
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            rc = err_set(e, ERR_IO, "%s '%s': cannot read: %s", opt, path, strerror(errno));
            goto cleanup;
        }
        got += n;
    }
    d->data[got] = '\0';
    d->size = (unsigned)got;
cleanup:
    close(fd);
    if (rc != 0) {
        gnutls_free(d->data);
        d->data = NULL;
    }
    return rc;
}

/* 0 if `key` is the private half of the certificate `crt`. */
static int key_matches(gnutls_privkey_t key, gnutls_pcert_st *crt)
{
    gnutls_pubkey_t pk = NULL;
    gnutls_datum_t a = {0}, b = {0};
    int rc = -1;

    if (gnutls_pubkey_init(&pk) == 0 && gnutls_pubkey_import_privkey(pk, key, 0, 0) == 0 &&
        gnutls_pubkey_export2(pk, GNUTLS_X509_FMT_DER, &a) == 0 &&
        gnutls_pubkey_export2(crt->pubkey, GNUTLS_X509_FMT_DER, &b) == 0 && a.size == b.size &&
        memcmp(a.data, b.data, a.size) == 0)
        rc = 0;
    gnutls_free(a.data);
    gnutls_free(b.data);
    if (pk)
        gnutls_pubkey_deinit(pk);
    return rc;
}

static int load_chain(struct tls_creds *c, const char *path, struct err *e)
{
    gnutls_datum_t d = {0};
    int rc = read_file("--tls-cert", path, &d, e), grc;

    if (rc != 0)
        return rc;
    c->n_chain = TLS_MAX_CHAIN;
    grc = gnutls_pcert_list_import_x509_raw(c->chain, &c->n_chain, &d, GNUTLS_X509_FMT_PEM, 0);
    if (grc < 0 || c->n_chain == 0) {
        c->n_chain = 0;
        rc = err_set(e, ERR_INVALID,
                     "--tls-cert '%s': not a PEM certificate chain of at most %d: %s", path,
                     TLS_MAX_CHAIN, grc < 0 ? gnutls_strerror(grc) : "no certificate");
    }
    gnutls_free(d.data);
    return rc;
}

static int load_key(struct tls_creds *c, const char *path, struct err *e)
{
    gnutls_datum_t d = {0};
    int rc = read_file("--tls-key", path, &d, e), grc;

    if (rc != 0)
        return rc;
    grc = gnutls_privkey_init(&c->key);
    if (grc == 0)
        grc = gnutls_privkey_import_x509_raw(c->key, &d, GNUTLS_X509_FMT_PEM, NULL, 0);
    if (grc < 0)
        rc = err_set(e, ERR_INVALID, "--tls-key '%s': not an unencrypted PEM private key: %s", path,
                     gnutls_strerror(grc));
    /* the key's bytes leave memory as soon as GnuTLS holds them */
    if (d.data)
        explicit_bzero(d.data, d.size);
    gnutls_free(d.data);
    return rc;
}

static int load_client_ca(struct tls_creds *c, const char *path, struct err *e)
{
    gnutls_datum_t d = {0};
    int rc = read_file("--tls-client-ca", path, &d, e), grc;

    if (rc != 0)
        return rc;
    grc = gnutls_x509_trust_list_init(&c->client_ca, 0);
    if (grc == 0)
        grc =
            gnutls_x509_trust_list_add_trust_mem(c->client_ca, &d, NULL, GNUTLS_X509_FMT_PEM, 0, 0);
    if (grc <= 0)
        rc = err_set(e, ERR_INVALID, "--tls-client-ca '%s': no PEM CA certificate in it%s%s", path,
                     grc < 0 ? ": " : "", grc < 0 ? gnutls_strerror(grc) : "");
    gnutls_free(d.data);
    return rc;
}

/* Loads the files named in `t` into a new snapshot. */
static int creds_load(const struct http_tls *t, struct tls_creds **out, struct err *e)
{
    struct tls_creds *c = calloc(1, sizeof(*c));
    int rc;

    *out = NULL;
    if (!c)
        return err_set(e, ERR_NOMEM, "out of memory");
    rc = load_chain(c, t->cert_path, e);
    if (rc == 0)
        rc = load_key(c, t->key_path, e);
    if (rc == 0 && key_matches(c->key, &c->chain[0]) != 0)
        rc = err_set(e, ERR_INVALID,
                     "--tls-key '%s' is not the key of the first certificate in --tls-cert '%s'",
                     t->key_path, t->cert_path);
    if (rc == 0 && t->client_ca_path)
        rc = load_client_ca(c, t->client_ca_path, e);
    if (rc != 0) {
        creds_destroy(c);
        return rc;
    }
    *out = c;
    return 0;
}

/* Logs the serving certificate's subject and expiry (public facts). */
static void log_loaded(const struct http_tls *t, const struct tls_creds *c, const char *what)
{
    gnutls_x509_crt_t crt = NULL;
    gnutls_datum_t dn = {0};
    time_t until = 0;
    char when[32] = "?";
    struct tm tm;

    if (gnutls_x509_crt_init(&crt) == 0 &&
        gnutls_x509_crt_import(crt, &c->chain[0].cert, GNUTLS_X509_FMT_DER) == 0) {
        gnutls_x509_crt_get_dn3(crt, &dn, 0);
        until = gnutls_x509_crt_get_expiration_time(crt);
        if (until != (time_t)-1 && gmtime_r(&until, &tm))
            strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", &tm);
    }
    log_info("http", what, "cert=\"%s\" subject=\"%s\" not_after=%s client_ca=%s", t->cert_path,
             dn.data ? (const char *)dn.data : "?", when,
             t->client_ca_path ? t->client_ca_path : "-");
    gnutls_free(dn.data);
    if (crt)
        gnutls_x509_crt_deinit(crt);
}

/* ---- the handshake's callbacks (HTTP threads) ---- */

/* GnuTLS's verify function for a session that requires a client certificate: 0 accepts,
 * anything else fails the handshake with an alert. */
static int verify_client(gnutls_session_t session)
{
    struct http_tls *t = atomic_load(&current_tls);
    struct tls_creds *c = t ? atomic_load(&t->cur) : NULL;
    const gnutls_datum_t *peers;
    gnutls_x509_crt_t crts[TLS_MAX_CHAIN];
    gnutls_typed_vdata_st purpose = {.type = GNUTLS_DT_KEY_PURPOSE_OID,
                                     .data = (void *)GNUTLS_KP_TLS_WWW_CLIENT};
    gnutls_datum_t why = {0};
    unsigned n = 0, n_crt = 0, status = 0;
    int rc = -1;

    if (!c || !c->client_ca)
        return -1;
    peers = gnutls_certificate_get_peers(session, &n);
    if (!peers || n == 0) {
        log_info("http", "TLS client refused", "reason=\"no client certificate\"");
        return -1;
    }
    for (; n_crt < n && n_crt < TLS_MAX_CHAIN; n_crt++) {
        if (gnutls_x509_crt_init(&crts[n_crt]) != 0)
            goto cleanup;
        if (gnutls_x509_crt_import(crts[n_crt], &peers[n_crt], GNUTLS_X509_FMT_DER) != 0) {
            gnutls_x509_crt_deinit(crts[n_crt]);
            goto cleanup;
        }
    }
    if (gnutls_x509_trust_list_verify_crt2(c->client_ca, crts, n_crt, &purpose, 1, 0, &status,
                                           NULL) == 0 &&
        status == 0)
        rc = 0;
    else {
        gnutls_certificate_verification_status_print(status, GNUTLS_CRT_X509, &why, 0);
        while (why.data && why.size > 0 &&
               (why.data[why.size - 1] == ' ' || !why.data[why.size - 1]))
            why.data[--why.size] = '\0';
        log_info("http", "TLS client refused", "reason=\"%s\"",
                 why.data ? (const char *)why.data : "its certificate did not verify");
        gnutls_free(why.data);
    }
cleanup:
    for (unsigned i = 0; i < n_crt; i++)
        gnutls_x509_crt_deinit(crts[i]);
    return rc;
}

/* libmicrohttpd's certificate callback: the current chain and key for this handshake. */
static int retrieve_cert(gnutls_session_t session, const gnutls_datum_t *req_ca_dn, int n_req,
                         const gnutls_pk_algorithm_t *pk_algos, int n_algos,
                         gnutls_pcert_st **pcert, unsigned int *pcert_length,
                         gnutls_privkey_t *pkey)
{
    struct http_tls *t = atomic_load(&current_tls);
    struct tls_creds *c = t ? atomic_load(&t->cur) : NULL;

    (void)req_ca_dn;
    (void)n_req;
    (void)pk_algos;
    (void)n_algos;
    if (!c)
        return -1;
    if (c->client_ca) {
        gnutls_certificate_server_set_request(session, GNUTLS_CERT_REQUIRE);
        gnutls_session_set_verify_function(session, verify_client);
    }
    *pcert = c->chain;
    *pcert_length = c->n_chain;
    *pkey = c->key;
    return 0;
}

/* ---- life cycle ---- */

void tls_destroy(struct http_tls *t)
{
    struct http_tls *expected = t;
    struct tls_creds *c;

    if (!t)
        return;
    atomic_compare_exchange_strong(&current_tls, &expected, NULL);
    creds_destroy(atomic_load(&t->cur));
    while ((c = t->retired)) {
        t->retired = c->retired_next;
        creds_destroy(c);
    }
    pthread_mutex_destroy(&t->lock);
    free(t->cert_path);
    free(t->key_path);
    free(t->client_ca_path);
    free(t);
}

int tls_create(const struct http_config *cfg, struct http_tls **out, struct err *e)
{
    struct http_tls *t = NULL;
    struct tls_creds *c = NULL;
    struct http_tls *none = NULL;
    int rc;

    *out = NULL;
    if (!cfg->tls_cert || !cfg->tls_cert[0] || !cfg->tls_key || !cfg->tls_key[0])
        return err_set(e, ERR_INVALID, "--tls-cert and --tls-key go together");
    if (MHD_is_feature_supported(MHD_FEATURE_TLS) != MHD_YES ||
        MHD_is_feature_supported(MHD_FEATURE_HTTPS_CERT_CALLBACK) != MHD_YES)
        return err_set(e, ERR_INVALID,
                       "--tls-cert: this libmicrohttpd was built without HTTPS (GnuTLS)");
    t = calloc(1, sizeof(*t));
    if (!t)
        return err_set(e, ERR_NOMEM, "out of memory");
    pthread_mutex_init(&t->lock, NULL);
    t->cert_path = strdup(cfg->tls_cert);
    t->key_path = strdup(cfg->tls_key);
    t->client_ca_path =
        cfg->tls_client_ca && cfg->tls_client_ca[0] ? strdup(cfg->tls_client_ca) : NULL;
    t->retire_after_ns = (uint64_t)cfg->idle_timeout_s * 1000000000ull + TLS_RETIRE_MARGIN_NS;
    if (!t->cert_path || !t->key_path ||
        (cfg->tls_client_ca && cfg->tls_client_ca[0] && !t->client_ca_path)) {
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto fail;
    }
    rc = creds_load(t, &c, e);
    if (rc != 0)
        goto fail;
    atomic_store(&t->cur, c);
    if (!atomic_compare_exchange_strong(&current_tls, &none, t)) {
        rc = err_set(e, ERR_INVALID, "HTTPS is already served by this process");
        goto fail;
    }
    log_loaded(t, c, "TLS certificate loaded");
    *out = t;
    return 0;
fail:
    tls_destroy(t);
    return rc;
}

int tls_reload(struct http_tls *t, struct err *e)
{
    struct tls_creds *c = NULL, *old, **pp;
    uint64_t now = clock_mono_ns();
    int rc;

    if (!t)
        return 0;
    rc = creds_load(t, &c, e); /* a bad file leaves the current snapshot serving */
    if (rc != 0)
        return rc;
    pthread_mutex_lock(&t->lock);
    old = atomic_exchange(&t->cur, c);
    old->retired_ns = now;
    old->retired_next = t->retired;
    t->retired = old;
    /* free the generations that no handshake can still be using */
    for (pp = &t->retired; *pp;) {
        struct tls_creds *r = *pp;
        if (now - r->retired_ns > t->retire_after_ns) {
            *pp = r->retired_next;
            creds_destroy(r);
        } else {
            pp = &r->retired_next;
        }
    }
    pthread_mutex_unlock(&t->lock);
    log_loaded(t, c, "TLS certificate reloaded");
    return 0;
}

unsigned tls_daemon_options(struct http_tls *t, struct MHD_OptionItem opts[3])
{
    if (!t) {
        opts[0] = (struct MHD_OptionItem){MHD_OPTION_END, 0, NULL};
        return 0;
    }
    opts[0] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_CERT_CALLBACK, 0, (void *)retrieve_cert};
    opts[1] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_PRIORITIES, 0, (void *)TLS_PRIORITIES};
    opts[2] = (struct MHD_OptionItem){MHD_OPTION_END, 0, NULL};
    return MHD_USE_TLS;
}

int http_server_reload_tls(struct http_server *s, struct err *e)
{
    return s ? tls_reload(s->tls, e) : 0;
}

int http_server_is_tls(const struct http_server *s)
{
    return s && s->tls;
}
