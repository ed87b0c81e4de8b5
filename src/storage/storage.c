/*
 * storage.c: the storage calls, dispatched by scheme to a backend (storage_internal.h).
 *
 * `s3://` goes to storage_s3.c, everything else (file:// and plain paths) to storage_file.c.
 * What does not depend on the backend lives here: splitting a byte stream into lines, reading
 * and writing whole objects, sorting listings and joining names, and the --file-roots policy.
 */
#define _GNU_SOURCE
#include "storage/storage_internal.h"
#include "core/ca_file.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/openat2.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#define READ_BUF_BYTES (1u << 20) /* grows for longer lines */
#define MIB (1024 * 1024)

struct storage_reader {
    const struct storage_ops *ops;
    void *impl;
    char *buf;
    size_t cap;
    size_t start, end; /* unread bytes are buf[start, end); buf[end] is free for a NUL */
    int at_end;        /* the backend said there is no more */
};

struct storage_writer {
    const struct storage_ops *ops;
    void *impl;
};

/* ---- settings ---- */

static char s3_endpoint[512];
static struct ca_file *s3_ca; /* NULL: the system's CAs only; kept until exit (handles use it) */
static int64_t s3_part_size = 8 * MIB;
#define MAX_FILE_ROOTS 16
static char file_roots[MAX_FILE_ROOTS][PATH_MAX]; /* resolved, no trailing '/' ("" for /) */
static int file_root_fds[MAX_FILE_ROOTS];         /* each root opened O_PATH, for openat2 */
static int n_file_roots;
/* set once openat2(2) answered ENOSYS (a kernel before 5.6): then the check alone guards */
static _Atomic int no_openat2;
static char file_roots_option[1024];

/* Sets the file roots from "DIR[:DIR...]": each must exist and be a folder. */
static int set_file_roots(const char *list, struct err *e)
{
    char one[PATH_MAX];
    const char *p = list, *end;

    for (int i = 0; i < n_file_roots; i++)
        close(file_root_fds[i]);
    n_file_roots = 0;
    file_roots_option[0] = '\0';
    if (!list || !list[0])
        return 0;
    if (strlen(list) >= sizeof(file_roots_option))
        return err_set(e, ERR_INVALID, "--file-roots: longer than %zu bytes",
                       sizeof(file_roots_option) - 1);
    snprintf(file_roots_option, sizeof(file_roots_option), "%s", list);
    for (; *p; p = *end ? end + 1 : end) {
        struct stat st;
        end = strchr(p, ':');
        if (!end)
            end = p + strlen(p);
        if (end == p)
            continue;
        if (n_file_roots == MAX_FILE_ROOTS)
            return err_set(e, ERR_INVALID, "--file-roots: more than %d folders", MAX_FILE_ROOTS);
        snprintf(one, sizeof(one), "%.*s", (int)(end - p), p);
        if (!realpath(one, file_roots[n_file_roots]) || stat(file_roots[n_file_roots], &st) != 0 ||
            !S_ISDIR(st.st_mode))
            return err_set(e, ERR_INVALID, "--file-roots: '%.200s' is not an existing folder", one);
        file_root_fds[n_file_roots] =
            open(file_roots[n_file_roots], O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (file_root_fds[n_file_roots] < 0)
            return err_set(e, ERR_INVALID, "--file-roots: '%.200s': %s", one, strerror(errno));
        if (strcmp(file_roots[n_file_roots], "/") == 0)
            file_roots[n_file_roots][0] = '\0';
        n_file_roots++;
    }
    return 0;
}

/* Resolves `path` as the kernel would when it is opened or created: relative to the working
 * folder, symlinks followed, for the longest part of it that exists. ".." is refused, so the
 * part that does not exist yet cannot climb out of the part that does. */
static int resolve_path(const char *path, char out[PATH_MAX])
{
    char abs[PATH_MAX], head[PATH_MAX], cwd[PATH_MAX];
    size_t cut;

    for (const char *c = path; (c = strstr(c, "..")) != NULL; c += 2)
        if ((c == path || c[-1] == '/') && (c[2] == '/' || c[2] == '\0'))
            return -1;
    if (path[0] == '/')
        snprintf(abs, sizeof(abs), "%s", path);
    else if (getcwd(cwd, sizeof(cwd)) && strlen(cwd) + 1 + strlen(path) < sizeof(abs))
        snprintf(abs, sizeof(abs), "%s/%s", cwd, path);
    else
        return -1;
    snprintf(head, sizeof(head), "%s", abs);
    cut = strlen(head);
    for (;;) {
        if (realpath(head[0] ? head : "/", out)) {
            size_t n = strlen(out);
            if (n + strlen(abs + cut) >= PATH_MAX)
                return -1;
            if (n == 1) /* "/" */
                n = 0;
            snprintf(out + n, PATH_MAX - n, "%s", abs + cut);
            return 0;
        }
        if (errno != ENOENT && errno != ENOTDIR)
            return -1;
        char *slash = strrchr(head, '/');
        if (!slash)
            return -1;
        *slash = '\0';
        cut = (size_t)(slash - head);
    }
}

/* The root `resolved` lies in (-1: none) and where, relative to it. */
static int root_of(const char *resolved, const char **rel)
{
    for (int i = 0; i < n_file_roots; i++) {
        size_t n = strlen(file_roots[i]);
        if (strncmp(resolved, file_roots[i], n) == 0 &&
            (resolved[n] == '/' || resolved[n] == '\0')) {
            *rel = resolved + n + (resolved[n] == '/');
            return i;
        }
    }
    return -1;
}

/* Resolves `uri`'s path and finds its root: the root's index, or a negative error in `e`. */
static int place(const char *uri, char resolved[PATH_MAX], const char **rel, struct err *e)
{
    const char *path = strncmp(uri, "file://", 7) == 0 ? uri + 7 : uri;
    int i;

    if (!path[0] || resolve_path(path, resolved) != 0)
        return err_set(e, ERR_INVALID,
                       "'%.200s': cannot be resolved inside --file-roots (no '..' allowed)", uri);
    i = root_of(resolved, rel);
    if (i < 0)
        return err_set(e, ERR_INVALID, "'%.200s' is outside --file-roots (%.200s)", uri,
                       file_roots_option);
    return i;
}

int storage_check_allowed(const char *uri, struct err *e)
{
    char resolved[PATH_MAX];
    const char *rel;
    int i;

    if (n_file_roots == 0 || strncmp(uri, "s3://", 5) == 0)
        return 0;
    i = place(uri, resolved, &rel, e);
    return i < 0 ? i : 0;
}

int storage_file_place(const char *uri, int *dirfd, char rel[PATH_MAX], struct err *e)
{
    char resolved[PATH_MAX];
    const char *in_root;
    int i;

    *dirfd = AT_FDCWD;
    if (n_file_roots == 0) {
        const char *path = strncmp(uri, "file://", 7) == 0 ? uri + 7 : uri;
        if (strlen(path) >= PATH_MAX)
            return err_set(e, ERR_INVALID, "'%.200s...': path too long", uri);
        snprintf(rel, PATH_MAX, "%s", path);
        return 0;
    }
    i = place(uri, resolved, &in_root, e);
    if (i < 0)
        return i;
    snprintf(rel, PATH_MAX, "%s", in_root[0] ? in_root : ".");
    *dirfd = file_root_fds[i];
    return 0;
}

int storage_open_beneath(int dirfd, const char *rel, int flags, mode_t mode)
{
    if (dirfd != AT_FDCWD && !atomic_load(&no_openat2)) {
        struct open_how how = {
            .flags = (uint64_t)(unsigned)flags,
            .mode = (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE ? mode : 0,
            .resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS,
        };
        long fd = syscall(SYS_openat2, dirfd, rel, &how, sizeof(how));
        if (fd >= 0 || errno != ENOSYS)
            return (int)fd;
        atomic_store(&no_openat2, 1); /* a kernel before 5.6: the path check alone guards */
    }
    return openat(dirfd, rel, flags, mode);
}

int storage_configure(const struct storage_config *cfg, struct err *e)
{
    const char *ep = cfg->s3_endpoint ? cfg->s3_endpoint : "";
    int64_t part = cfg->s3_part_size_bytes ? cfg->s3_part_size_bytes : 8 * MIB;

    if (ep[0] && strncmp(ep, "http://", 7) != 0 && strncmp(ep, "https://", 8) != 0)
        return err_set(e, ERR_INVALID, "--s3-endpoint: '%.200s' is not an http:// or https:// URL",
                       ep);
    if (strlen(ep) >= sizeof(s3_endpoint))
        return err_set(e, ERR_INVALID, "--s3-endpoint: longer than %zu bytes",
                       sizeof(s3_endpoint) - 1);
    if (part < 5 * MIB)
        return err_set(e, ERR_INVALID,
                       "--s3-part-size-mb: %lld bytes is below S3's minimum part size, 5 MiB",
                       (long long)part);
    if (part > (int64_t)5 * 1024 * MIB)
        return err_set(e, ERR_INVALID, "--s3-part-size-mb: %lld bytes is above S3's maximum, 5 GiB",
                       (long long)part);
    if (cfg->s3_ca_file && cfg->s3_ca_file[0]) {
        struct ca_file *ca;
        int rc = ca_file_load(cfg->s3_ca_file, "--s3-ca-file", &ca, e);
        if (rc != 0)
            return rc;
        ca_file_destroy(s3_ca);
        s3_ca = ca;
    }
    snprintf(s3_endpoint, sizeof(s3_endpoint), "%s", ep);
    s3_part_size = part;
    return set_file_roots(cfg->file_roots, e);
}

const char *storage_s3_endpoint_option(void)
{
    return s3_endpoint;
}

const struct ca_file *storage_s3_ca(void)
{
    return s3_ca;
}

int64_t storage_s3_part_size(void)
{
    return s3_part_size;
}

static const struct storage_ops *ops_for(const char *uri)
{
    return strncmp(uri, "s3://", 5) == 0 ? &storage_s3_ops : &storage_file_ops;
}

/* ---- reading ---- */

int storage_open_read(const char *uri, struct storage_reader **out, struct err *e)
{
    struct storage_reader *r = calloc(1, sizeof(*r));
    int64_t size;
    int rc;

    *out = NULL;
    if (!r || !(r->buf = malloc(READ_BUF_BYTES))) {
        free(r);
        return err_set(e, ERR_NOMEM, "out of memory");
    }
    r->cap = READ_BUF_BYTES;
    r->ops = ops_for(uri);
    rc = r->ops->open_read(uri, &r->impl, &size, e);
    if (rc != 0) {
        free(r->buf);
        free(r);
        return rc;
    }
    *out = r;
    return 0;
}

/* Moves the unread bytes to the front, grows the buffer when they fill it, and reads more. */
static int fill(struct storage_reader *r, struct err *e)
{
    size_t n = 0;
    int rc;

    if (r->start > 0) {
        memmove(r->buf, r->buf + r->start, r->end - r->start);
        r->end -= r->start;
        r->start = 0;
    }
    if (r->end + 1 >= r->cap) {
        char *p = realloc(r->buf, r->cap * 2);
        if (!p)
            return err_set(e, ERR_NOMEM, "out of memory: a line longer than %zu bytes", r->cap);
        r->buf = p;
        r->cap *= 2;
    }
    rc = r->ops->read(r->impl, r->buf + r->end, r->cap - 1 - r->end, &n, e);
    if (rc != 0)
        return rc;
    if (n == 0)
        r->at_end = 1;
    r->end += n;
    return 0;
}

int storage_read_line(struct storage_reader *r, const char **line, size_t *len, struct err *e)
{
    size_t scanned = 0; /* bytes after start known to hold no '\n' */

    for (;;) {
        char *s = r->buf + r->start;
        char *nl = memchr(s + scanned, '\n', r->end - r->start - scanned);
        size_t n;
        int rc;
        if (nl || (r->at_end && r->end > r->start)) {
            n = nl ? (size_t)(nl - s) : r->end - r->start;
            r->start += nl ? n + 1 : n;
            while (n > 0 && s[n - 1] == '\r')
                n--;
            s[n] = '\0';
            *line = s;
            *len = n;
            return 1;
        }
        if (r->at_end)
            return 0;
        scanned = r->end - r->start;
        rc = fill(r, e);
        if (rc != 0)
            return rc;
    }
}

int storage_read(struct storage_reader *r, void *dst, size_t cap, size_t *n, struct err *e)
{
    size_t k = r->end - r->start;

    if (k == 0) {
        if (r->at_end) {
            *n = 0;
            return 0;
        }
        return r->ops->read(r->impl, dst, cap, n, e);
    }
    /* bytes storage_read_line() buffered come first */
    if (k > cap)
        k = cap;
    memcpy(dst, r->buf + r->start, k);
    r->start += k;
    *n = k;
    return 0;
}

void storage_close_read(struct storage_reader *r)
{
    if (!r)
        return;
    r->ops->close_read(r->impl);
    free(r->buf);
    free(r);
}

/* ---- writing ---- */

int storage_open_write(const char *uri, struct storage_writer **out, struct err *e)
{
    struct storage_writer *w = calloc(1, sizeof(*w));
    int rc;

    *out = NULL;
    if (!w)
        return err_set(e, ERR_NOMEM, "out of memory");
    w->ops = ops_for(uri);
    rc = w->ops->open_write(uri, &w->impl, e);
    if (rc != 0) {
        free(w);
        return rc;
    }
    *out = w;
    return 0;
}

int storage_write(struct storage_writer *w, const void *data, size_t len, struct err *e)
{
    return w->ops->write(w->impl, data, len, e);
}

int storage_commit(struct storage_writer *w, struct err *e)
{
    int rc = w->ops->commit(w->impl, e);

    free(w);
    return rc;
}

void storage_abort(struct storage_writer *w)
{
    if (!w)
        return;
    w->ops->abort(w->impl);
    free(w);
}

/* ---- whole objects ---- */

int storage_get(const char *uri, int64_t max_bytes, struct buf *out, struct err *e)
{
    const struct storage_ops *ops = ops_for(uri);
    void *impl = NULL;
    int64_t size = -1;
    size_t n = 1;
    int rc = ops->open_read(uri, &impl, &size, e);

    /* refused from its size, unread; a size that grows while it is read is caught below */
    if (rc == 0 && size > max_bytes)
        rc = err_set(e, ERR_TOO_LARGE, "%.200s: %lld bytes, over the limit of %lld", uri,
                     (long long)size, (long long)max_bytes);
    while (rc == 0 && n > 0) {
        size_t room;
        if (buf_reserve(out, 1u << 16) != 0) {
            rc = err_set(e, ERR_NOMEM, "out of memory reading %.200s", uri);
            break;
        }
        /* never more than one byte past the limit: enough to tell that it is over */
        room = out->cap - out->len - 1;
        if ((int64_t)(out->len + room) > max_bytes + 1)
            room = (size_t)(max_bytes + 1 - (int64_t)out->len);
        rc = ops->read(impl, out->data + out->len, room, &n, e);
        if (rc == 0) {
            out->len += n;
            out->data[out->len] = '\0';
        }
        if (rc == 0 && (int64_t)out->len > max_bytes)
            rc = err_set(e, ERR_TOO_LARGE, "%.200s: over the limit of %lld bytes", uri,
                         (long long)max_bytes);
    }
    if (impl)
        ops->close_read(impl);
    return rc;
}

int storage_check_object(const char *uri, int64_t max_bytes, struct err *e)
{
    const struct storage_ops *ops = ops_for(uri);

    return ops->check ? ops->check(uri, max_bytes, e) : 0;
}

int storage_put(const char *uri, const void *data, size_t len, struct err *e)
{
    struct storage_writer *w;
    int rc = storage_open_write(uri, &w, e);

    if (rc != 0)
        return rc;
    rc = storage_write(w, data, len, e);
    if (rc != 0) {
        storage_abort(w);
        return rc;
    }
    return storage_commit(w, e);
}

int storage_delete(const char *uri, struct err *e)
{
    return ops_for(uri)->remove(uri, e);
}

int storage_exists(const char *uri)
{
    return ops_for(uri)->exists(uri);
}

int storage_supports(const char *uri)
{
    return !strstr(uri, "://") || strncmp(uri, "file://", 7) == 0 || strncmp(uri, "s3://", 5) == 0;
}

/* ---- listing ---- */

int storage_names_add(struct storage_names *ns, const char *name, size_t len)
{
    char *s;

    if (ns->n == ns->cap) {
        size_t cap = ns->cap ? ns->cap * 2 : 64;
        char **p = realloc(ns->v, cap * sizeof(*p));
        if (!p)
            return ERR_NOMEM;
        ns->v = p;
        ns->cap = cap;
    }
    if (!(s = malloc(len + 1)))
        return ERR_NOMEM;
    memcpy(s, name, len);
    s[len] = '\0';
    ns->v[ns->n++] = s;
    return 0;
}

static int cmp_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int storage_list(const char *uri, char ***names, size_t *n, int *is_object, struct err *e)
{
    struct storage_names ns = {0};
    int rc;

    *names = NULL;
    *n = 0;
    *is_object = 0;
    rc = ops_for(uri)->list(uri, &ns, is_object, e);
    if (rc != 0) {
        storage_names_free(ns.v, ns.n);
        *is_object = 0;
        return rc;
    }
    if (ns.n > 1)
        qsort(ns.v, ns.n, sizeof(*ns.v), cmp_names);
    *names = ns.v;
    *n = ns.n;
    return 0;
}

void storage_names_free(char **names, size_t n)
{
    for (size_t i = 0; names && i < n; i++)
        free(names[i]);
    free(names);
}

char *storage_join(const char *base, const char *name)
{
    size_t bl = strlen(base), len = bl + strlen(name) + 2;
    char *s = malloc(len);

    if (!s)
        return NULL;
    while (bl > 0 && base[bl - 1] == '/')
        bl--;
    snprintf(s, len, "%.*s/%s", (int)bl, base, name);
    return s;
}

int storage_identify(const char *uri, struct storage_identity *out, struct err *e)
{
    memset(out, 0, sizeof(*out));
    if (ops_for(uri) == &storage_s3_ops)
        return storage_s3_identify(uri, out, e);
    return storage_file_identify(uri, out, e);
}
