/*
 * auth.h: API keys, their scopes and tenants.
 *
 * A key is "inferd_" and 43 base64url characters (32 random bytes); inferd keeps only its
 * SHA-256, in a keys file of one line per key (mode 0600):
 *
 *   NAME SCOPES TENANT SHA256-HEX CREATED-UNIX-S [revoked=UNIX-S]
 *
 * NAME names the key; TENANT (by default NAME) owns the jobs the key creates; SCOPES is a
 * comma list of infer, jobs, batch, admin. A key is looked up by comparing its hash with every
 * stored hash in constant time, so neither the time taken nor the order of the file says how
 * close a guess came.
 */
#ifndef INFERD_AUTH_H
#define INFERD_AUTH_H

#include "core/err.h"

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

enum auth_scope {
    AUTH_INFER = 1u << 0, /* online inference and model metadata */
    AUTH_JOBS = 1u << 1,  /* async jobs */
    AUTH_BATCH = 1u << 2, /* batch jobs and schedules */
    AUTH_ADMIN = 1u << 3, /* the repository, every tenant's work, the redrive: implies all */
};
#define AUTH_ALL_SCOPES (AUTH_INFER | AUTH_JOBS | AUTH_BATCH | AUTH_ADMIN)

#define AUTH_NAME_MAX 64   /* a key's and a tenant's name: [A-Za-z0-9._-], 1..64 bytes */
#define AUTH_TOKEN_MAX 512 /* a presented key longer than this is refused unread */

/* who a request's key belongs to */
struct auth_principal {
    char name[AUTH_NAME_MAX + 1];
    char tenant[AUTH_NAME_MAX + 1];
    unsigned scopes;
};

/* One stored key, as `inferd keys list` shows it. */
struct auth_key {
    char name[AUTH_NAME_MAX + 1];
    char tenant[AUTH_NAME_MAX + 1];
    unsigned scopes;
    unsigned char hash[32];
    int64_t created_s;
    int64_t revoked_s; /* 0: active */
};

/* An immutable set of keys, parsed from a keys file's text. */
struct keyring {
    struct auth_key *keys;
    size_t n;
};

/* Parses a keys file's text (`path` only names it in errors). 0, or ERR_INVALID naming the line
 * and field; never quotes a hash. */
int keyring_parse(const char *text, size_t len, const char *path, struct keyring *out,
                  struct err *e);
void keyring_free(struct keyring *k);
/* The active key whose hash matches `token`, or NULL; constant time in the number of keys. */
const struct auth_key *keyring_find(const struct keyring *k, const char *token, size_t len);

/* An Authorization header's Bearer credentials: 0 with [*token, *token + *len), or ERR_INVALID
 * (not Bearer, or not a token68) or ERR_TOO_LARGE (longer than AUTH_TOKEN_MAX). */
int auth_parse_bearer(const char *header, const char **token, size_t *len);

/* "infer,jobs" -> AUTH_INFER | AUTH_JOBS. 0, or ERR_INVALID naming the unknown scope. */
int auth_parse_scopes(const char *s, unsigned *out, struct err *e);
/* The comma list of `scopes`, into out[64]. */
void auth_scopes_text(unsigned scopes, char out[64]);
/* 1 if `s` can name a key or a tenant. */
int auth_valid_name(const char *s);

/* ---- the keys a server checks against, reloadable ---- */

struct auth;

/* Loads `path`. 0, or ERR_IO / ERR_INVALID naming the file (and line). Warns when others than
 * its owner may read it. */
int auth_open(const char *path, struct auth **out, struct err *e);
/* Reads the file again; on an error the keys in use stay. Thread-safe. */
int auth_reload(struct auth *a, struct err *e);
void auth_close(struct auth *a);
/* How many active keys the server knows. */
size_t auth_n_active(struct auth *a);

enum auth_result {
    AUTH_OK = 0,
    AUTH_MISSING,   /* no Authorization header */
    AUTH_MALFORMED, /* not "Bearer TOKEN" */
    AUTH_UNKNOWN,   /* no active key has this hash (unknown or revoked) */
};
/* Checks an Authorization header (NULL: none). Thread-safe; takes no lock held elsewhere. */
enum auth_result auth_check(struct auth *a, const char *header, struct auth_principal *who);

/* ---- the keys file, for `inferd keys` ---- */

/* Adds a key: writes the file (created 0600) through a temporary file and a rename, under a
 * lock file beside it. Writes the new key, shown once, to token[64]. */
int auth_keys_add(const char *path, const char *name, const char *tenant, unsigned scopes,
                  char token[64], struct err *e);
/* Marks NAME revoked. ERR_NOT_FOUND when no active key has that name. */
int auth_keys_revoke(const char *path, const char *name, struct err *e);
/* Prints NAME SCOPES TENANT CREATED STATUS, one key per line. */
int auth_keys_list(const char *path, FILE *out, struct err *e);

#endif
