/*
 * url.h: a URL fit to show back (errors, logs, job JSON): its credentials masked.
 */
#ifndef INFERD_URL_H
#define INFERD_URL_H

/*
 * A copy of `url` with its userinfo ("user:password@") replaced by "***@", and the value of
 * any `password=` query parameter (libpq's URIs take one) by "***". The rest is kept. New
 * string, freed with free(); NULL if `url` is NULL or out of memory.
 */
char *url_redacted(const char *url);

#endif
