/*
 * ca_file.h: certificate authorities a libcurl client trusts besides the system's
 * (--s3-ca-file, --webhook-ca-file): an operator's private CA, for an S3 store or a webhook
 * receiver whose certificate it signed.
 *
 * The file is read and checked once, at start (a bad file stops inferd there, naming the
 * option), and its certificates are added to each TLS connection's trust store through
 * CURLOPT_SSL_CTX_FUNCTION, after libcurl has loaded the system's bundle: public endpoints still
 * verify, and verification is never turned off.
 */
#ifndef INFERD_CA_FILE_H
#define INFERD_CA_FILE_H

#include "core/err.h"

struct ca_file;

/*
 * Reads every PEM certificate of `path`.
 *   option  names the option in errors ("--s3-ca-file"); borrowed for the call
 *   out     receives a new ca_file; free it with ca_file_destroy()
 * Returns 0, ERR_INVALID (unreadable, or no certificate in it) or ERR_NOMEM.
 */
int ca_file_load(const char *path, const char *option, struct ca_file **out, struct err *e);

/* NULL does nothing. Not while a handle it was applied to is transferring. */
void ca_file_destroy(struct ca_file *c);

/*
 * Makes the libcurl easy handle `curl` (a CURL *) trust c's certificates too, from its next
 * transfer on. `c` is borrowed: it must outlive the handle's transfers. 0, or -1 when libcurl's
 * TLS backend cannot take extra certificates (not OpenSSL). Thread-safe: `c` is read only.
 */
int ca_file_apply(const struct ca_file *c, void *curl);

/* The file's path, as given. */
const char *ca_file_path(const struct ca_file *c);

#endif
