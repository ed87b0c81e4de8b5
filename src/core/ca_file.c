/*
 * ca_file.c: extra trusted certificate authorities for libcurl clients (see ca_file.h).
 *
 * The certificates are parsed once into an X509 stack that never changes afterwards, so any
 * number of threads may apply it at once. libcurl calls add_to_store() for every new TLS
 * connection, after it loaded the system's CA bundle into the SSL_CTX's store; adding a
 * certificate the store already has is harmless (OpenSSL 3 ignores the duplicate).
 */
#include "core/ca_file.h"

#include <curl/curl.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct ca_file {
    STACK_OF(X509) * certs; /* immutable after load: no lock */
    char *path;
};

void ca_file_destroy(struct ca_file *c)
{
    if (!c)
        return;
    sk_X509_pop_free(c->certs, X509_free);
    free(c->path);
    free(c);
}

int ca_file_load(const char *path, const char *option, struct ca_file **out, struct err *e)
{
    struct ca_file *c = calloc(1, sizeof(*c));
    FILE *fp = NULL;
    X509 *x;
    int rc = 0;

    *out = NULL;
    if (!c || !(c->certs = sk_X509_new_null()) || !(c->path = strdup(path))) {
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    if (!(fp = fopen(path, "r"))) {
        rc = err_set(e, ERR_INVALID, "%s: cannot read '%.200s': %s", option, path, strerror(errno));
        goto cleanup;
    }
    while ((x = PEM_read_X509(fp, NULL, NULL, NULL))) {
        if (!sk_X509_push(c->certs, x)) {
            X509_free(x);
            rc = err_set(e, ERR_NOMEM, "out of memory");
            goto cleanup;
        }
    }
    ERR_clear_error(); /* the read that ended the loop leaves "no start line" */
    if (sk_X509_num(c->certs) == 0)
        rc = err_set(e, ERR_INVALID, "%s: '%.200s' holds no PEM certificate", option, path);
cleanup:
    if (fp)
        fclose(fp);
    if (rc != 0)
        ca_file_destroy(c);
    else
        *out = c;
    return rc;
}

static CURLcode add_to_store(CURL *curl, void *ssl_ctx, void *arg)
{
    const struct ca_file *c = arg;
    X509_STORE *store = SSL_CTX_get_cert_store(ssl_ctx);

    (void)curl;
    if (!store)
        return CURLE_SSL_CACERT_BADFILE;
    for (int i = 0; i < sk_X509_num(c->certs); i++)
        X509_STORE_add_cert(store, sk_X509_value(c->certs, i));
    ERR_clear_error();
    return CURLE_OK;
}

int ca_file_apply(const struct ca_file *c, void *curl)
{
    if (curl_easy_setopt(curl, CURLOPT_SSL_CTX_FUNCTION, add_to_store) != CURLE_OK ||
        curl_easy_setopt(curl, CURLOPT_SSL_CTX_DATA, (void *)c) != CURLE_OK)
        return -1;
    return 0;
}

const char *ca_file_path(const struct ca_file *c)
{
    return c->path;
}
