/*
 * storage_file.c: file:// and plain-path objects (the backend behind storage.c).
 *
 * Writes go to "<path>.tmp-<pid>-<n>" and are renamed over the final name after fflush and
 * fsync, so a crash leaves either the old object, the new one, or a stray temporary file, never
 * a partial object under the final name. Missing parent folders are created.
 *
 * Only regular files are objects. A FIFO, socket, device or folder is refused by its stat,
 * before it is opened (opening a device may do something; opening a FIFO waits for a writer),
 * and every open is O_NONBLOCK and checked again with fstat, so nothing swapped in meanwhile
 * can make a read or an open wait for ever. The temporary file is created new (O_EXCL,
 * O_NOFOLLOW), so a FIFO or link planted under its name is never written through.
 */
#define _GNU_SOURCE
#include "storage/storage_internal.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdatomic.h>
#include <sys/stat.h>
#include <unistd.h>

struct file_reader {
    int fd;
    char uri[PATH_MAX];
};

/* Names a non-regular file for a person. */
static const char *kind_of(mode_t mode)
{
    return S_ISDIR(mode)    ? "a folder"
           : S_ISFIFO(mode) ? "a FIFO"
           : S_ISSOCK(mode) ? "a socket"
           : S_ISCHR(mode)  ? "a character device"
           : S_ISBLK(mode)  ? "a block device"
                            : "not a regular file";
}

static int not_regular(const char *uri, mode_t mode, struct err *e)
{
    return err_set(e, ERR_INVALID, "'%.200s' is %s, not a regular file", uri, kind_of(mode));
}

/* Opens `path` for reading or writing without waiting and without side effects on anything but
 * a regular file: the stat refuses the others before any open, the fstat after it refuses what
 * was swapped in meanwhile. Returns the fd (blocking again), or -1 with `e` set. */
static int open_regular(const char *uri, const char *path, int flags, mode_t mode, struct err *e)
{
    struct stat st;
    int fd, saved;

    if (!(flags & O_EXCL) && stat(path, &st) == 0 && !S_ISREG(st.st_mode)) {
        not_regular(uri, st.st_mode, e);
        return -1;
    }
    fd = open(path, flags | O_NONBLOCK | O_NOCTTY | O_CLOEXEC, mode);
    if (fd < 0) {
        saved = errno;
        err_set(e, saved == ENOENT ? ERR_NOT_FOUND : ERR_IO, "%.200s: %s", uri, strerror(saved));
        return -1;
    }
    if (fstat(fd, &st) == 0 && !S_ISREG(st.st_mode)) {
        close(fd);
        not_regular(uri, st.st_mode, e);
        return -1;
    }
    if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK) != 0) {
        saved = errno;
        close(fd);
        err_set(e, ERR_IO, "%.200s: %s", uri, strerror(saved));
        return -1;
    }
    return fd;
}

struct file_writer {
    FILE *f;
    char path[PATH_MAX];
    char tmp[PATH_MAX + 32];
};

/* The path a location names, once it is known to be allowed (--file-roots). */
static const char *path_of(const char *uri, struct err *e)
{
    if (strstr(uri, "://") && strncmp(uri, "file://", 7) != 0) {
        err_set(e, ERR_INVALID, "'%.200s': only file://, s3:// and plain paths are supported", uri);
        return NULL;
    }
    if (storage_check_allowed(uri, e) != 0)
        return NULL;
    return strncmp(uri, "file://", 7) == 0 ? uri + 7 : uri;
}

/* ---- reading ---- */

static int file_open_read(const char *uri, void **impl, int64_t *size, struct err *e)
{
    const char *path = path_of(uri, e);
    struct file_reader *r;
    struct stat st;

    *impl = NULL;
    *size = -1;
    if (!path)
        return e->code;
    r = calloc(1, sizeof(*r));
    if (!r)
        return err_set(e, ERR_NOMEM, "out of memory");
    r->fd = open_regular(uri, path, O_RDONLY, 0, e);
    if (r->fd < 0) {
        free(r);
        return e->code;
    }
    if (fstat(r->fd, &st) == 0)
        *size = (int64_t)st.st_size;
    snprintf(r->uri, sizeof(r->uri), "%s", uri);
    *impl = r;
    return 0;
}

static int file_read(void *impl, char *dst, size_t cap, size_t *n, struct err *e)
{
    struct file_reader *r = impl;
    ssize_t got;

    do
        got = read(r->fd, dst, cap);
    while (got < 0 && errno == EINTR);
    if (got < 0) {
        *n = 0;
        return err_set(e, ERR_IO, "%s: %s", r->uri, strerror(errno));
    }
    *n = (size_t)got;
    return 0;
}

static void file_close_read(void *impl)
{
    struct file_reader *r = impl;

    if (!r)
        return;
    close(r->fd);
    free(r);
}

/* ---- writing ---- */

static int make_parents(const char *path)
{
    char tmp[PATH_MAX];

    snprintf(tmp, sizeof(tmp), "%s", path);
    for (char *p = tmp + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(tmp, 0755) != 0 && errno != EEXIST)
            return -1;
        *p = '/';
    }
    return 0;
}

static int file_open_write(const char *uri, void **impl, struct err *e)
{
    static _Atomic unsigned n_writers;
    const char *path = path_of(uri, e);
    struct file_writer *w;
    struct stat st;
    int fd;

    *impl = NULL;
    if (!path)
        return e->code;
    /* a folder, FIFO or device under the name is refused, not replaced by the rename */
    if (stat(path, &st) == 0 && !S_ISREG(st.st_mode))
        return not_regular(uri, st.st_mode, e);
    w = calloc(1, sizeof(*w));
    if (!w)
        return err_set(e, ERR_NOMEM, "out of memory");
    snprintf(w->path, sizeof(w->path), "%s", path);
    /* unique per writer: two jobs writing one location never share a temporary file */
    snprintf(w->tmp, sizeof(w->tmp), "%s.tmp-%d-%u", path, (int)getpid(),
             atomic_fetch_add(&n_writers, 1));
    if (make_parents(w->path) != 0) {
        int saved = errno;
        free(w);
        return err_set(e, ERR_IO, "%.200s: %s", uri, strerror(saved));
    }
    fd = open_regular(uri, w->tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0666, e);
    if (fd < 0 || !(w->f = fdopen(fd, "wb"))) {
        if (fd >= 0) {
            err_set(e, ERR_NOMEM, "out of memory");
            close(fd);
            unlink(w->tmp);
        }
        free(w);
        return e->code;
    }
    *impl = w;
    return 0;
}

static int file_write(void *impl, const void *data, size_t len, struct err *e)
{
    struct file_writer *w = impl;

    if (len && fwrite(data, 1, len, w->f) != len)
        return err_set(e, ERR_IO, "%s: %s", w->path, strerror(errno));
    return 0;
}

static int file_commit(void *impl, struct err *e)
{
    struct file_writer *w = impl;
    int ok, rc = 0;

    ok = fflush(w->f) == 0 && fsync(fileno(w->f)) == 0;
    ok = fclose(w->f) == 0 && ok;
    if (!ok || rename(w->tmp, w->path) != 0) {
        rc = err_set(e, ERR_IO, "%s: %s", w->path, strerror(errno));
        unlink(w->tmp);
    }
    free(w);
    return rc;
}

static void file_abort(void *impl)
{
    struct file_writer *w = impl;

    if (!w)
        return;
    fclose(w->f);
    unlink(w->tmp);
    free(w);
}

/* ---- the rest ---- */

static int file_remove(const char *uri, struct err *e)
{
    const char *path = path_of(uri, e);

    if (!path)
        return e->code;
    if (unlink(path) != 0 && errno != ENOENT)
        return err_set(e, ERR_IO, "%s: %s", uri, strerror(errno));
    return 0;
}

static int file_exists(const char *uri)
{
    struct err e;
    const char *path = path_of(uri, &e);

    return path && access(path, F_OK) == 0;
}

static int file_check(const char *uri, int64_t max_bytes, struct err *e)
{
    const char *path = path_of(uri, e);
    struct stat st;

    if (!path)
        return e->code;
    if (stat(path, &st) != 0)
        return 0; /* missing now: whoever reads or writes it says so then */
    if (!S_ISREG(st.st_mode))
        return not_regular(uri, st.st_mode, e);
    if (max_bytes > 0 && (int64_t)st.st_size > max_bytes)
        return err_set(e, ERR_TOO_LARGE, "'%.200s' is %lld bytes, over the limit of %lld", uri,
                       (long long)st.st_size, (long long)max_bytes);
    return 0;
}

/* A folder being walked, and the ones it is inside: a link back to one of them is a loop. */
struct walk_dir {
    dev_t dev;
    ino_t ino;
    const struct walk_dir *up;
};

/* Adds every regular file below `root`/`rel`. Anything else that is not a folder (a FIFO,
 * socket or device) is an error naming it: an object must be read to its end, and those never
 * end or never start. */
static int walk(const char *uri, const char *root, const char *rel, const struct walk_dir *here,
                struct storage_names *ns, struct err *e)
{
    char dir[PATH_MAX];
    DIR *d;
    struct dirent *de;
    int rc = 0;

    snprintf(dir, sizeof(dir), "%s%s%s", root, rel[0] ? "/" : "", rel);
    d = opendir(dir);
    if (!d)
        return err_set(e, ERR_IO, "%s: %s", dir, strerror(errno));
    while (rc == 0 && (de = readdir(d))) {
        char sub[PATH_MAX], full[PATH_MAX * 2];
        struct stat st;
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
            continue;
        snprintf(sub, sizeof(sub), "%s%s%s", rel, rel[0] ? "/" : "", de->d_name);
        snprintf(full, sizeof(full), "%s/%s", root, sub);
        if (stat(full, &st) != 0)
            continue;
        if (S_ISDIR(st.st_mode)) {
            struct walk_dir below = {.dev = st.st_dev, .ino = st.st_ino, .up = here};
            for (const struct walk_dir *a = here; a && rc == 0; a = a->up)
                if (a->dev == st.st_dev && a->ino == st.st_ino)
                    rc = err_set(e, ERR_INVALID,
                                 "'%.150s/%.150s' leads back to a folder it is inside (a link "
                                 "loop)",
                                 uri, sub);
            if (rc == 0)
                rc = walk(uri, root, sub, &below, ns, e);
        } else if (!S_ISREG(st.st_mode)) {
            rc = err_set(e, ERR_INVALID, "'%.150s/%.150s' is %s, not a regular file", uri, sub,
                         kind_of(st.st_mode));
        } else if (storage_names_add(ns, sub, strlen(sub)) != 0) {
            rc = err_set(e, ERR_NOMEM, "out of memory");
        }
    }
    closedir(d);
    return rc;
}

static int file_list(const char *uri, struct storage_names *ns, int *is_object, struct err *e)
{
    const char *path = path_of(uri, e);
    struct stat st;
    struct walk_dir top;
    char root[PATH_MAX];

    if (!path)
        return e->code;
    if (stat(path, &st) != 0)
        return err_set(e, ERR_NOT_FOUND, "%s: %s", uri, strerror(errno));
    if (S_ISREG(st.st_mode)) {
        const char *base = strrchr(path, '/');
        base = base ? base + 1 : path;
        *is_object = 1;
        if (storage_names_add(ns, base, strlen(base)) != 0)
            return err_set(e, ERR_NOMEM, "out of memory");
        return 0;
    }
    if (!S_ISDIR(st.st_mode))
        return err_set(e, ERR_INVALID, "'%.200s' is %s, not a regular file or a folder", uri,
                       kind_of(st.st_mode));
    snprintf(root, sizeof(root), "%s", path);
    while (strlen(root) > 1 && root[strlen(root) - 1] == '/')
        root[strlen(root) - 1] = '\0';
    top = (struct walk_dir){.dev = st.st_dev, .ino = st.st_ino};
    return walk(uri, root, "", &top, ns, e);
}

const struct storage_ops storage_file_ops = {
    .open_read = file_open_read,
    .read = file_read,
    .close_read = file_close_read,
    .open_write = file_open_write,
    .write = file_write,
    .commit = file_commit,
    .abort = file_abort,
    .remove = file_remove,
    .exists = file_exists,
    .check = file_check,
    .list = file_list,
};

/* ---- identity ---- */

int storage_file_identify(const char *uri, struct storage_identity *out, struct err *e)
{
    const char *path = path_of(uri, e);
    struct stat st;

    if (!path)
        return e->code;
    if (stat(path, &st) != 0)
        return err_set(e, errno == ENOENT ? ERR_NOT_FOUND : ERR_IO, "%s: %s", uri, strerror(errno));
    out->size_bytes = (int64_t)st.st_size;
    out->mtime_ns = (int64_t)st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec;
    return 0;
}
