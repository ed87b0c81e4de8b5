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
 *
 * With --file-roots every path is opened below its root's folder by storage_open_beneath()
 * (openat2 with RESOLVE_BENEATH): stats are fstat()s of O_PATH descriptors opened that way,
 * folders are created one level at a time in folders opened that way, and a write's temporary
 * file, rename and unlink happen by name in its folder's descriptor. So a folder swapped for a
 * symlink to elsewhere between storage_check_allowed() and the open cannot lead a read, a
 * write or a rename outside the root.
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

/* Where a location is (storage_file_place), once it is known to be a file location. */
struct place {
    int dirfd;          /* its --file-root's folder, or AT_FDCWD */
    char rel[PATH_MAX]; /* below dirfd */
};

static int place_of(const char *uri, struct place *pl, struct err *e)
{
    if (strstr(uri, "://") && strncmp(uri, "file://", 7) != 0)
        return err_set(e, ERR_INVALID,
                       "'%.200s': only file://, s3:// and plain paths are supported", uri);
    return storage_file_place(uri, &pl->dirfd, pl->rel, e);
}

/* An open(2) failure of `uri` for a person: a link out of the roots says so. */
static int open_failed(const char *uri, const struct place *pl, int saved, struct err *e)
{
    if (pl->dirfd != AT_FDCWD && (saved == EXDEV || saved == ELOOP))
        return err_set(e, ERR_INVALID, "'%.200s' is outside --file-roots (a link leads out)", uri);
    return err_set(e, saved == ENOENT ? ERR_NOT_FOUND : ERR_IO, "%.200s: %s", uri, strerror(saved));
}

/* stat(2) of `rel` below the place's folder, the way an open would find it. */
static int stat_at(const struct place *pl, const char *rel, struct stat *st)
{
    int fd = storage_open_beneath(pl->dirfd, rel, O_PATH | O_CLOEXEC, 0), rc, saved;

    if (fd < 0)
        return -1;
    rc = fstat(fd, st);
    saved = errno;
    close(fd);
    errno = saved;
    return rc;
}

/* Opens the place for reading without waiting and without side effects on anything but a
 * regular file: the stat refuses the others before any open, the fstat after it refuses what
 * was swapped in meanwhile. Returns the fd (blocking again), or -1 with `e` set. */
static int open_regular(const char *uri, const struct place *pl, int flags, struct err *e)
{
    struct stat st;
    int fd, saved;

    if (stat_at(pl, pl->rel, &st) == 0 && !S_ISREG(st.st_mode)) {
        not_regular(uri, st.st_mode, e);
        return -1;
    }
    fd = storage_open_beneath(pl->dirfd, pl->rel, flags | O_NONBLOCK | O_NOCTTY | O_CLOEXEC, 0);
    if (fd < 0) {
        open_failed(uri, pl, errno, e);
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
    int dirfd;               /* the folder the object goes in (O_PATH), opened below its root */
    char name[NAME_MAX + 1]; /* in dirfd */
    char tmp[NAME_MAX + 1];  /* the temporary file, in dirfd */
    char path[PATH_MAX];     /* for messages */
};

/* ---- reading ---- */

static int file_open_read(const char *uri, void **impl, int64_t *size, struct err *e)
{
    struct place pl;
    struct file_reader *r;
    struct stat st;
    int rc;

    *impl = NULL;
    *size = -1;
    if ((rc = place_of(uri, &pl, e)) != 0)
        return rc;
    r = calloc(1, sizeof(*r));
    if (!r)
        return err_set(e, ERR_NOMEM, "out of memory");
    r->fd = open_regular(uri, &pl, O_RDONLY, e);
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

/* Splits `rel` into its folder (".", "/" or a path) and its last name. */
static int split_rel(const char *rel, char dir[PATH_MAX], char name[NAME_MAX + 1])
{
    const char *slash = strrchr(rel, '/');
    const char *base = slash ? slash + 1 : rel;

    if (!base[0] || strlen(base) > NAME_MAX || strcmp(base, ".") == 0 || strcmp(base, "..") == 0)
        return -1;
    snprintf(name, NAME_MAX + 1, "%s", base);
    if (!slash)
        snprintf(dir, PATH_MAX, ".");
    else if (slash == rel)
        snprintf(dir, PATH_MAX, "/");
    else
        snprintf(dir, PATH_MAX, "%.*s", (int)(slash - rel), rel);
    return 0;
}

/* Opens the folder `dir` below the place's root (O_PATH), creating the folders missing on the
 * way one at a time, each inside a folder itself opened below the root. -1 with errno. */
static int open_folder(const struct place *pl, const char *dir)
{
    char prefix[PATH_MAX], parent[PATH_MAX], name[NAME_MAX + 1];
    int fd = storage_open_beneath(pl->dirfd, dir, O_PATH | O_DIRECTORY | O_CLOEXEC, 0);

    if (fd >= 0 || errno != ENOENT)
        return fd;
    for (const char *p = dir + (dir[0] == '/');; p++) {
        if (*p != '/' && *p != '\0')
            continue;
        snprintf(prefix, sizeof(prefix), "%.*s", (int)(p - dir), dir);
        if (prefix[0] && split_rel(prefix, parent, name) == 0) {
            int pfd = storage_open_beneath(pl->dirfd, parent, O_PATH | O_DIRECTORY | O_CLOEXEC, 0);
            if (pfd < 0)
                return -1;
            if (mkdirat(pfd, name, 0755) != 0 && errno != EEXIST) {
                int saved = errno;
                close(pfd);
                errno = saved;
                return -1;
            }
            close(pfd);
        }
        if (*p == '\0')
            break;
    }
    return storage_open_beneath(pl->dirfd, dir, O_PATH | O_DIRECTORY | O_CLOEXEC, 0);
}

static int file_open_write(const char *uri, void **impl, struct err *e)
{
    static _Atomic unsigned n_writers;
    struct place pl;
    struct file_writer *w;
    struct stat st;
    char dir[PATH_MAX];
    int fd, rc;

    *impl = NULL;
    if ((rc = place_of(uri, &pl, e)) != 0)
        return rc;
    /* a folder, FIFO or device under the name is refused, not replaced by the rename */
    if (stat_at(&pl, pl.rel, &st) == 0 && !S_ISREG(st.st_mode))
        return not_regular(uri, st.st_mode, e);
    w = calloc(1, sizeof(*w));
    if (!w)
        return err_set(e, ERR_NOMEM, "out of memory");
    w->dirfd = -1;
    snprintf(w->path, sizeof(w->path), "%s", strncmp(uri, "file://", 7) == 0 ? uri + 7 : uri);
    if (split_rel(pl.rel, dir, w->name) != 0) {
        free(w);
        return err_set(e, ERR_INVALID, "'%.200s' does not name a file", uri);
    }
    /* unique per writer: two jobs writing one location never share a temporary file */
    if (snprintf(w->tmp, sizeof(w->tmp), "%s.tmp-%d-%u", w->name, (int)getpid(),
                 atomic_fetch_add(&n_writers, 1)) >= (int)sizeof(w->tmp))
        snprintf(w->tmp, sizeof(w->tmp), ".inferd.tmp-%d-%u", (int)getpid(),
                 atomic_fetch_add(&n_writers, 1));
    w->dirfd = open_folder(&pl, dir);
    if (w->dirfd < 0) {
        rc = open_failed(uri, &pl, errno, e);
        free(w);
        return rc;
    }
    /* created new, by name in its folder: nothing planted under the name is written through */
    fd = openat(w->dirfd, w->tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0666);
    if (fd < 0 || !(w->f = fdopen(fd, "wb"))) {
        rc = fd < 0 ? open_failed(uri, &pl, errno, e) : err_set(e, ERR_NOMEM, "out of memory");
        if (fd >= 0) {
            close(fd);
            unlinkat(w->dirfd, w->tmp, 0);
        }
        close(w->dirfd);
        free(w);
        return rc;
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
    if (!ok || renameat(w->dirfd, w->tmp, w->dirfd, w->name) != 0) {
        rc = err_set(e, ERR_IO, "%s: %s", w->path, strerror(errno));
        unlinkat(w->dirfd, w->tmp, 0);
    }
    close(w->dirfd);
    free(w);
    return rc;
}

static void file_abort(void *impl)
{
    struct file_writer *w = impl;

    if (!w)
        return;
    fclose(w->f);
    unlinkat(w->dirfd, w->tmp, 0);
    close(w->dirfd);
    free(w);
}

/* ---- the rest ---- */

static int file_remove(const char *uri, struct err *e)
{
    struct place pl;
    char dir[PATH_MAX], name[NAME_MAX + 1];
    int dfd, rc;

    if ((rc = place_of(uri, &pl, e)) != 0)
        return rc;
    if (split_rel(pl.rel, dir, name) != 0)
        return err_set(e, ERR_INVALID, "'%.200s' does not name a file", uri);
    dfd = storage_open_beneath(pl.dirfd, dir, O_PATH | O_DIRECTORY | O_CLOEXEC, 0);
    if (dfd < 0)
        return errno == ENOENT ? 0 : open_failed(uri, &pl, errno, e);
    if (unlinkat(dfd, name, 0) != 0 && errno != ENOENT)
        rc = err_set(e, ERR_IO, "%s: %s", uri, strerror(errno));
    close(dfd);
    return rc;
}

static int file_exists(const char *uri)
{
    struct err e;
    struct place pl;
    struct stat st;

    return place_of(uri, &pl, &e) == 0 && stat_at(&pl, pl.rel, &st) == 0;
}

static int file_check(const char *uri, int64_t max_bytes, struct err *e)
{
    struct place pl;
    struct stat st;
    int rc;

    if ((rc = place_of(uri, &pl, e)) != 0)
        return rc;
    if (stat_at(&pl, pl.rel, &st) != 0)
        return pl.dirfd != AT_FDCWD && (errno == EXDEV || errno == ELOOP)
                   ? open_failed(uri, &pl, errno, e)
                   : 0; /* missing now: whoever reads or writes it says so then */
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
static int walk(const char *uri, const struct place *pl, const char *root, const char *rel,
                const struct walk_dir *here, struct storage_names *ns, struct err *e)
{
    char dir[PATH_MAX];
    DIR *d;
    struct dirent *de;
    int rc = 0, fd;

    snprintf(dir, sizeof(dir), "%s%s%s", root, rel[0] ? "/" : "", rel);
    fd = storage_open_beneath(pl->dirfd, dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC, 0);
    d = fd >= 0 ? fdopendir(fd) : NULL;
    if (!d) {
        rc = fd >= 0 ? err_set(e, ERR_IO, "%s: %s", dir, strerror(errno))
                     : open_failed(uri, pl, errno, e);
        if (fd >= 0)
            close(fd);
        return rc;
    }
    while (rc == 0 && (de = readdir(d))) {
        char sub[PATH_MAX], full[PATH_MAX * 2];
        struct stat st;
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
            continue;
        snprintf(sub, sizeof(sub), "%s%s%s", rel, rel[0] ? "/" : "", de->d_name);
        snprintf(full, sizeof(full), "%s/%s", root, sub);
        if (stat_at(pl, full, &st) != 0) {
            if (pl->dirfd != AT_FDCWD && (errno == EXDEV || errno == ELOOP))
                rc = open_failed(full, pl, errno, e);
            continue;
        }
        if (S_ISDIR(st.st_mode)) {
            struct walk_dir below = {.dev = st.st_dev, .ino = st.st_ino, .up = here};
            for (const struct walk_dir *a = here; a && rc == 0; a = a->up)
                if (a->dev == st.st_dev && a->ino == st.st_ino)
                    rc = err_set(e, ERR_INVALID,
                                 "'%.150s/%.150s' leads back to a folder it is inside (a link "
                                 "loop)",
                                 uri, sub);
            if (rc == 0)
                rc = walk(uri, pl, root, sub, &below, ns, e);
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
    struct place pl;
    struct stat st;
    struct walk_dir top;
    char root[PATH_MAX];
    int rc;

    if ((rc = place_of(uri, &pl, e)) != 0)
        return rc;
    if (stat_at(&pl, pl.rel, &st) != 0)
        return errno == ENOENT ? err_set(e, ERR_NOT_FOUND, "%s: %s", uri, strerror(errno))
                               : open_failed(uri, &pl, errno, e);
    if (S_ISREG(st.st_mode)) {
        const char *path = strncmp(uri, "file://", 7) == 0 ? uri + 7 : uri;
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
    snprintf(root, sizeof(root), "%s", pl.rel);
    while (strlen(root) > 1 && root[strlen(root) - 1] == '/')
        root[strlen(root) - 1] = '\0';
    top = (struct walk_dir){.dev = st.st_dev, .ino = st.st_ino};
    return walk(uri, &pl, root, "", &top, ns, e);
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
    struct place pl;
    struct stat st;
    int rc;

    if ((rc = place_of(uri, &pl, e)) != 0)
        return rc;
    if (stat_at(&pl, pl.rel, &st) != 0)
        return open_failed(uri, &pl, errno, e);
    out->size_bytes = (int64_t)st.st_size;
    out->mtime_ns = (int64_t)st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec;
    return 0;
}
