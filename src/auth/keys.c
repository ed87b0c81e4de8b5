/*
 * keys.c: API keys: the keys file's parser and writer, the Bearer header, the lookup.
 *
 * The server holds one parsed keyring behind a read-write lock: every request takes the read
 * side for the lookup (a few constant-time compares), SIGHUP's reload parses the file outside
 * the lock and takes the write side only to swap the pointer, so a revoked key stops working
 * with the next request and no connection is dropped.
 */
#define _GNU_SOURCE
#include "auth/auth.h"
#include "core/log.h"

#include <errno.h>
#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/sha.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/file.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define KEYS_FILE_MAX (16 * 1024 * 1024) /* a keys file larger than this is refused */
#define TOKEN_PREFIX "inferd_"

static const char *const scope_names[] = {"infer", "jobs", "batch", "admin"};

int auth_valid_name(const char *s)
{
    size_t n = strlen(s);

    if (n == 0 || n > AUTH_NAME_MAX)
        return 0;
    for (const char *p = s; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
              *p == '.' || *p == '_' || *p == '-'))
            return 0;
    return 1;
}

int auth_parse_scopes(const char *s, unsigned *out, struct err *e)
{
    const char *p = s;

    *out = 0;
    while (*p) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        unsigned found = 0;
        for (unsigned i = 0; i < 4; i++)
            if (strlen(scope_names[i]) == len && strncmp(scope_names[i], p, len) == 0)
                found = 1u << i;
        if (!found)
            return err_set(e, ERR_INVALID,
                           "unknown scope '%.*s' (scopes: infer, jobs, batch, admin)",
                           (int)(len > 32 ? 32 : len), p);
        *out |= found;
        p += len;
        if (*p == ',')
            p++;
    }
    if (!*out)
        return err_set(e, ERR_INVALID, "no scope given (scopes: infer, jobs, batch, admin)");
    return 0;
}

void auth_scopes_text(unsigned scopes, char out[64])
{
    size_t n = 0;

    out[0] = '\0';
    for (unsigned i = 0; i < 4; i++)
        if (scopes & (1u << i))
            n += (size_t)snprintf(out + n, 64 - n, "%s%s", n ? "," : "", scope_names[i]);
}

/* ---- the keys file ---- */

static int hex_value(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

static int parse_int64(const char *s, int64_t *out)
{
    char *end;
    long long v;

    errno = 0;
    v = strtoll(s, &end, 10);
    if (errno || *end || end == s || v < 0)
        return -1;
    *out = v;
    return 0;
}

/* One line, cut into `f` (at most 7 fields): returns the count. */
static int split_fields(char *line, char *f[7])
{
    int n = 0;

    for (char *p = line; *p;) {
        while (*p == ' ' || *p == '\t')
            *p++ = '\0';
        if (!*p)
            break;
        if (n == 7)
            return 8;
        f[n++] = p;
        while (*p && *p != ' ' && *p != '\t')
            p++;
    }
    return n;
}

static int parse_line(char *line, const char *path, int lineno, struct auth_key *k, struct err *e)
{
    char *f[7];
    struct err why = {0};
    int n = split_fields(line, f);

    memset(k, 0, sizeof(*k));
    if (n < 5 || n > 6)
        return err_set(e, ERR_INVALID,
                       "keys file %s line %d: expected NAME SCOPES TENANT SHA256 CREATED "
                       "[revoked=TIME], found %d fields",
                       path, lineno, n > 7 ? 7 : n);
    if (!auth_valid_name(f[0]))
        return err_set(e, ERR_INVALID,
                       "keys file %s line %d: name: expected 1-%d of A-Z a-z 0-9 . _ -", path,
                       lineno, AUTH_NAME_MAX);
    if (auth_parse_scopes(f[1], &k->scopes, &why) != 0)
        return err_set(e, ERR_INVALID, "keys file %s line %d: scopes: %s", path, lineno, why.msg);
    if (!auth_valid_name(f[2]))
        return err_set(e, ERR_INVALID,
                       "keys file %s line %d: tenant: expected 1-%d of A-Z a-z 0-9 . _ -", path,
                       lineno, AUTH_NAME_MAX);
    if (strlen(f[3]) != 64)
        return err_set(e, ERR_INVALID, "keys file %s line %d: hash: expected 64 hex digits", path,
                       lineno);
    for (int i = 0; i < 32; i++) {
        int hi = hex_value(f[3][2 * i]), lo = hex_value(f[3][2 * i + 1]);
        if (hi < 0 || lo < 0)
            return err_set(e, ERR_INVALID,
                           "keys file %s line %d: hash: expected 64 lowercase hex digits", path,
                           lineno);
        k->hash[i] = (unsigned char)(hi << 4 | lo);
    }
    if (parse_int64(f[4], &k->created_s) != 0)
        return err_set(e, ERR_INVALID, "keys file %s line %d: created: expected Unix seconds",
                       path, lineno);
    if (n == 6 && (strncmp(f[5], "revoked=", 8) != 0 ||
                   parse_int64(f[5] + 8, &k->revoked_s) != 0 || k->revoked_s == 0))
        return err_set(e, ERR_INVALID,
                       "keys file %s line %d: expected revoked=UNIX-SECONDS as the 6th field",
                       path, lineno);
    snprintf(k->name, sizeof(k->name), "%s", f[0]);
    snprintf(k->tenant, sizeof(k->tenant), "%s", f[2]);
    return 0;
}

int keyring_parse(const char *text, size_t len, const char *path, struct keyring *out,
                  struct err *e)
{
    struct keyring k = {0};
    size_t cap = 0;
    int lineno = 0, rc = 0;

    *out = (struct keyring){0};
    for (size_t pos = 0; pos < len && rc == 0;) {
        const char *nl = memchr(text + pos, '\n', len - pos);
        size_t n = nl ? (size_t)(nl - (text + pos)) : len - pos;
        char line[1024];
        lineno++;
        if (n >= sizeof(line)) {
            rc = err_set(e, ERR_INVALID, "keys file %s line %d: longer than %zu bytes", path,
                         lineno, sizeof(line) - 1);
            break;
        }
        if (memchr(text + pos, '\0', n)) {
            rc = err_set(e, ERR_INVALID, "keys file %s line %d: holds a NUL byte", path, lineno);
            break;
        }
        memcpy(line, text + pos, n);
        line[n] = '\0';
        if (n && line[n - 1] == '\r')
            line[n - 1] = '\0';
        pos += n + 1;
        const char *p = line;
        while (*p == ' ' || *p == '\t')
            p++;
        if (!*p || *p == '#')
            continue;
        if (k.n == cap) {
            size_t ncap = cap ? cap * 2 : 16;
            struct auth_key *nk = realloc(k.keys, ncap * sizeof(*nk));
            if (!nk) {
                rc = err_set(e, ERR_NOMEM, "out of memory");
                break;
            }
            k.keys = nk;
            cap = ncap;
        }
        rc = parse_line(line, path, lineno, &k.keys[k.n], e);
        if (rc != 0)
            break;
        for (size_t i = 0; i < k.n && rc == 0; i++)
            if (!k.keys[i].revoked_s && !k.keys[k.n].revoked_s &&
                strcmp(k.keys[i].name, k.keys[k.n].name) == 0)
                rc = err_set(e, ERR_INVALID, "keys file %s line %d: a second active key named '%s'",
                             path, lineno, k.keys[k.n].name);
        k.n++;
    }
    if (rc != 0) {
        keyring_free(&k);
        return rc;
    }
    *out = k;
    return 0;
}

void keyring_free(struct keyring *k)
{
    if (!k)
        return;
    OPENSSL_cleanse(k->keys, k->n * sizeof(*k->keys));
    free(k->keys);
    *k = (struct keyring){0};
}

const struct auth_key *keyring_find(const struct keyring *k, const char *token, size_t len)
{
    unsigned char h[32];
    const struct auth_key *found = NULL;

    SHA256((const unsigned char *)token, len, h);
    /* every key is compared, whatever matched before: the time says nothing of where */
    for (size_t i = 0; i < k->n; i++) {
        int same = CRYPTO_memcmp(h, k->keys[i].hash, sizeof(h)) == 0;
        uintptr_t mask = (uintptr_t)0 - (uintptr_t)(same & !k->keys[i].revoked_s);
        found = (const struct auth_key *)(((uintptr_t)&k->keys[i] & mask) |
                                          ((uintptr_t)found & ~mask));
    }
    OPENSSL_cleanse(h, sizeof(h));
    return found;
}

/* ---- the Authorization header (RFC 6750 section 2.1) ---- */

static int token68_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '-' || c == '.' || c == '_' || c == '~' || c == '+' || c == '/';
}

int auth_parse_bearer(const char *header, const char **token, size_t *len)
{
    const char *p = header, *t;
    size_t n = 0;

    *token = NULL;
    *len = 0;
    while (*p == ' ' || *p == '\t')
        p++;
    if (strncasecmp(p, "Bearer", 6) != 0 || (p[6] != ' ' && p[6] != '\t'))
        return ERR_INVALID;
    p += 6;
    while (*p == ' ' || *p == '\t')
        p++;
    t = p;
    while (token68_char(*p))
        p++;
    while (*p == '=')
        p++;
    n = (size_t)(p - t);
    while (*p == ' ' || *p == '\t')
        p++;
    if (*p || n == 0)
        return ERR_INVALID;
    if (n > AUTH_TOKEN_MAX)
        return ERR_TOO_LARGE;
    *token = t;
    *len = n;
    return 0;
}

/* ---- the server's keys ---- */

struct auth {
    char *path;
    pthread_rwlock_t lock; /* read: a lookup; write: the reload's swap only */
    struct keyring ring;   /* guarded by lock */
};

static int read_file(const char *path, char **out, size_t *len, int warn_mode, struct err *e)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    char *buf;
    size_t got = 0;

    *out = NULL;
    *len = 0;
    if (fd < 0)
        return err_set(e, ERR_IO, "keys file %s: %s", path, strerror(errno));
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size > KEYS_FILE_MAX) {
        close(fd);
        return err_set(e, ERR_INVALID, "keys file %s: not a regular file of at most %d bytes",
                       path, KEYS_FILE_MAX);
    }
    if (warn_mode && (st.st_mode & 077))
        log_warn("auth", "the keys file may be read by others than its owner: chmod 600 it",
                 "path=%s mode=%03o", path, (unsigned)(st.st_mode & 0777));
    buf = malloc((size_t)st.st_size + 1);
    if (!buf) {
        close(fd);
        return err_set(e, ERR_NOMEM, "out of memory");
    }
    while (got < (size_t)st.st_size) {
        ssize_t n = read(fd, buf + got, (size_t)st.st_size - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    close(fd);
    buf[got] = '\0';
    *out = buf;
    *len = got;
    return 0;
}

static int load(const char *path, struct keyring *ring, int warn_mode, struct err *e)
{
    char *text;
    size_t len;
    int rc = read_file(path, &text, &len, warn_mode, e);

    if (rc != 0)
        return rc;
    rc = keyring_parse(text, len, path, ring, e);
    OPENSSL_cleanse(text, len);
    free(text);
    return rc;
}

int auth_open(const char *path, struct auth **out, struct err *e)
{
    struct auth *a = calloc(1, sizeof(*a));
    int rc;

    *out = NULL;
    if (!a || !(a->path = strdup(path))) {
        free(a);
        return err_set(e, ERR_NOMEM, "out of memory");
    }
    rc = load(path, &a->ring, 1, e);
    if (rc != 0) {
        free(a->path);
        free(a);
        return rc;
    }
    pthread_rwlock_init(&a->lock, NULL);
    *out = a;
    return 0;
}

int auth_reload(struct auth *a, struct err *e)
{
    struct keyring fresh, old;
    int rc = load(a->path, &fresh, 1, e);

    if (rc != 0)
        return rc;
    pthread_rwlock_wrlock(&a->lock);
    old = a->ring;
    a->ring = fresh;
    pthread_rwlock_unlock(&a->lock);
    keyring_free(&old);
    return 0;
}

void auth_close(struct auth *a)
{
    if (!a)
        return;
    keyring_free(&a->ring);
    pthread_rwlock_destroy(&a->lock);
    free(a->path);
    free(a);
}

size_t auth_n_active(struct auth *a)
{
    size_t n = 0;

    pthread_rwlock_rdlock(&a->lock);
    for (size_t i = 0; i < a->ring.n; i++)
        n += !a->ring.keys[i].revoked_s;
    pthread_rwlock_unlock(&a->lock);
    return n;
}

enum auth_result auth_check(struct auth *a, const char *header, struct auth_principal *who)
{
    const struct auth_key *k;
    const char *token;
    size_t len;

    memset(who, 0, sizeof(*who));
    if (!header)
        return AUTH_MISSING;
    if (auth_parse_bearer(header, &token, &len) != 0)
        return AUTH_MALFORMED;
    pthread_rwlock_rdlock(&a->lock);
    k = keyring_find(&a->ring, token, len);
    if (k) {
        memcpy(who->name, k->name, sizeof(who->name));
        memcpy(who->tenant, k->tenant, sizeof(who->tenant));
        who->scopes = k->scopes;
    }
    pthread_rwlock_unlock(&a->lock);
    return k ? AUTH_OK : AUTH_UNKNOWN;
}

/* ---- `inferd keys`: changing the file ---- */

/* Takes the lock file beside `path` (PATH.lock); returns its fd, or -1 with `e` set. */
static int lock_keys(const char *path, struct err *e)
{
    char lp[4096];
    int fd;

    if (snprintf(lp, sizeof(lp), "%s.lock", path) >= (int)sizeof(lp)) {
        err_set(e, ERR_INVALID, "keys file path too long");
        return -1;
    }
    fd = open(lp, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0 || flock(fd, LOCK_EX) != 0) {
        err_set(e, ERR_IO, "cannot lock %s: %s", lp, strerror(errno));
        if (fd >= 0)
            close(fd);
        return -1;
    }
    return fd;
}

static int write_key_line(FILE *f, const struct auth_key *k)
{
    char scopes[64], hex[65];

    auth_scopes_text(k->scopes, scopes);
    for (int i = 0; i < 32; i++)
        snprintf(hex + 2 * i, 3, "%02x", k->hash[i]);
    if (k->revoked_s)
        return fprintf(f, "%s %s %s %s %lld revoked=%lld\n", k->name, scopes, k->tenant, hex,
                       (long long)k->created_s, (long long)k->revoked_s) < 0;
    return fprintf(f, "%s %s %s %s %lld\n", k->name, scopes, k->tenant, hex,
                   (long long)k->created_s) < 0;
}

/* Writes `ring` to `path` through PATH.tmp (0600), fsync and rename. */
static int save(const char *path, const struct keyring *ring, struct err *e)
{
    char tmp[4096];
    FILE *f;
    int fd, bad = 0;

    if (snprintf(tmp, sizeof(tmp), "%s.tmp", path) >= (int)sizeof(tmp))
        return err_set(e, ERR_INVALID, "keys file path too long");
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        return err_set(e, ERR_IO, "cannot write %s: %s", tmp, strerror(errno));
    fchmod(fd, 0600); /* an old temporary file may have had another mode */
    f = fdopen(fd, "w");
    if (!f) {
        close(fd);
        return err_set(e, ERR_IO, "cannot write %s: %s", tmp, strerror(errno));
    }
    bad |= fprintf(f, "# inferd API keys: written by `inferd keys`, read by `inferd serve "
                      "--keys-file` (SIGHUP re-reads it).\n"
                      "# NAME SCOPES TENANT SHA256-OF-KEY CREATED-UNIX-S [revoked=UNIX-S]\n") < 0;
    for (size_t i = 0; i < ring->n && !bad; i++)
        bad |= write_key_line(f, &ring->keys[i]);
    bad |= fflush(f) != 0 || fsync(fileno(f)) != 0;
    bad |= fclose(f) != 0;
    if (bad || rename(tmp, path) != 0) {
        int saved = errno;
        unlink(tmp);
        return err_set(e, ERR_IO, "cannot write %s: %s", path, strerror(saved));
    }
    return 0;
}

/* Reads the file, or an empty ring when it does not exist yet. */
static int load_or_empty(const char *path, struct keyring *ring, struct err *e)
{
    if (access(path, F_OK) != 0 && errno == ENOENT) {
        *ring = (struct keyring){0};
        return 0;
    }
    return load(path, ring, 0, e);
}

static void base64url(const unsigned char *in, size_t n, char *out)
{
    static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    size_t o = 0;
    uint32_t acc = 0;
    int bits = 0;

    for (size_t i = 0; i < n; i++) {
        acc = (acc << 8) | in[i];
        bits += 8;
        while (bits >= 6) {
            out[o++] = tab[(acc >> (bits - 6)) & 63];
            bits -= 6;
        }
    }
    if (bits > 0)
        out[o++] = tab[(acc << (6 - bits)) & 63];
    out[o] = '\0';
}

int auth_keys_add(const char *path, const char *name, const char *tenant, unsigned scopes,
                  char token[64], struct err *e)
{
    struct keyring ring;
    struct auth_key *nk, k = {0};
    unsigned char raw[32];
    int lock, rc;

    token[0] = '\0';
    if (!auth_valid_name(name))
        return err_set(e, ERR_INVALID, "NAME: expected 1-%d of A-Z a-z 0-9 . _ -", AUTH_NAME_MAX);
    if (!auth_valid_name(tenant))
        return err_set(e, ERR_INVALID, "--tenant: expected 1-%d of A-Z a-z 0-9 . _ -",
                       AUTH_NAME_MAX);
    if (!scopes || (scopes & ~AUTH_ALL_SCOPES))
        return err_set(e, ERR_INVALID, "--scopes: expected some of infer, jobs, batch, admin");
    if (getrandom(raw, sizeof(raw), 0) != (ssize_t)sizeof(raw))
        return err_set(e, ERR_IO, "cannot read random bytes: %s", strerror(errno));
    if ((lock = lock_keys(path, e)) < 0)
        return e->code;
    rc = load_or_empty(path, &ring, e);
    for (size_t i = 0; rc == 0 && i < ring.n; i++)
        if (!ring.keys[i].revoked_s && strcmp(ring.keys[i].name, name) == 0)
            rc = err_set(e, ERR_CONFLICT,
                         "a key named '%s' exists: revoke it first, or add the new key under "
                         "another name with --tenant %s to keep its jobs",
                         name, ring.keys[i].tenant);
    if (rc == 0 && !(nk = realloc(ring.keys, (ring.n + 1) * sizeof(*nk))))
        rc = err_set(e, ERR_NOMEM, "out of memory");
    if (rc == 0) {
        ring.keys = nk;
        memcpy(token, TOKEN_PREFIX, sizeof(TOKEN_PREFIX) - 1);
        base64url(raw, sizeof(raw), token + sizeof(TOKEN_PREFIX) - 1);
        snprintf(k.name, sizeof(k.name), "%s", name);
        snprintf(k.tenant, sizeof(k.tenant), "%s", tenant);
        k.scopes = scopes;
        k.created_s = (int64_t)time(NULL);
        SHA256((const unsigned char *)token, strlen(token), k.hash);
        ring.keys[ring.n++] = k;
        rc = save(path, &ring, e);
    }
    OPENSSL_cleanse(raw, sizeof(raw));
    if (rc != 0)
        OPENSSL_cleanse(token, 64);
    keyring_free(&ring);
    close(lock);
    return rc;
}

int auth_keys_revoke(const char *path, const char *name, struct err *e)
{
    struct keyring ring;
    int lock, rc, found = 0;

    if ((lock = lock_keys(path, e)) < 0)
        return e->code;
    rc = load(path, &ring, 0, e);
    for (size_t i = 0; rc == 0 && i < ring.n; i++)
        if (!ring.keys[i].revoked_s && strcmp(ring.keys[i].name, name) == 0) {
            ring.keys[i].revoked_s = (int64_t)time(NULL);
            found = 1;
        }
    if (rc == 0 && !found)
        rc = err_set(e, ERR_NOT_FOUND, "no active key named '%.64s' in %s", name, path);
    if (rc == 0)
        rc = save(path, &ring, e);
    keyring_free(&ring);
    close(lock);
    return rc;
}

int auth_keys_list(const char *path, FILE *out, struct err *e)
{
    struct keyring ring;
    int rc = load(path, &ring, 0, e);

    if (rc != 0)
        return rc;
    fprintf(out, "%-24s %-24s %-24s %-20s %s\n", "NAME", "SCOPES", "TENANT", "CREATED", "STATUS");
    for (size_t i = 0; i < ring.n; i++) {
        const struct auth_key *k = &ring.keys[i];
        char scopes[64], created[32], revoked[32];
        time_t c = (time_t)k->created_s, r = (time_t)k->revoked_s;
        struct tm tm;
        auth_scopes_text(k->scopes, scopes);
        strftime(created, sizeof(created), "%Y-%m-%dT%H:%M:%SZ", gmtime_r(&c, &tm));
        strftime(revoked, sizeof(revoked), "%Y-%m-%dT%H:%M:%SZ", gmtime_r(&r, &tm));
        fprintf(out, "%-24s %-24s %-24s %-20s %s%s\n", k->name, scopes, k->tenant, created,
                k->revoked_s ? "revoked " : "active", k->revoked_s ? revoked : "");
    }
    keyring_free(&ring);
    return 0;
}
