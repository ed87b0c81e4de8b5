/*
 * storage_file.c: file:// and plain-path objects (the backend behind storage.c).
 *
 * Writes go to "<path>.tmp-<pid>" and are renamed over the final name after fflush and fsync,
 * so a crash leaves either the old object, the new one, or a stray temporary file, never a
 * partial object under the final name. Missing parent folders are created.
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
#include <sys/stat.h>
#include <unistd.h>

struct file_reader {
    int fd;
    char uri[PATH_MAX];
};

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

static int file_open_read(const char *uri, void **impl, struct err *e)
{
    const char *path = path_of(uri, e);
    struct file_reader *r;

    *impl = NULL;
    if (!path)
        return e->code;
    r = calloc(1, sizeof(*r));
    if (!r)
        return err_set(e, ERR_NOMEM, "out of memory");
    /* blocks on a FIFO until a writer opens it, as fopen() did */
    r->fd = open(path, O_RDONLY | O_CLOEXEC);
    if (r->fd < 0) {
        int saved = errno;
        free(r);
        return err_set(e, saved == ENOENT ? ERR_NOT_FOUND : ERR_IO, "%s: %s", uri, strerror(saved));
    }
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
    const char *path = path_of(uri, e);
    struct file_writer *w;

    *impl = NULL;
    if (!path)
        return e->code;
    w = calloc(1, sizeof(*w));
    if (!w)
        return err_set(e, ERR_NOMEM, "out of memory");
    snprintf(w->path, sizeof(w->path), "%s", path);
    snprintf(w->tmp, sizeof(w->tmp), "%s.tmp-%d", path, (int)getpid());
    if (make_parents(w->path) != 0 || !(w->f = fopen(w->tmp, "wb"))) {
        int saved = errno;
        free(w);
        return err_set(e, ERR_IO, "%s: %s", uri, strerror(saved));
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

static int walk(const char *root, const char *rel, struct storage_names *ns, struct err *e)
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
        if (S_ISDIR(st.st_mode))
            rc = walk(root, sub, ns, e);
        else if (S_ISREG(st.st_mode) && storage_names_add(ns, sub, strlen(sub)) != 0)
            rc = err_set(e, ERR_NOMEM, "out of memory");
    }
    closedir(d);
    return rc;
}

static int file_list(const char *uri, struct storage_names *ns, int *is_object, struct err *e)
{
    const char *path = path_of(uri, e);
    struct stat st;
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
    snprintf(root, sizeof(root), "%s", path);
    while (strlen(root) > 1 && root[strlen(root) - 1] == '/')
        root[strlen(root) - 1] = '\0';
    return walk(root, "", ns, e);
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
