/*
 * storage_file.c: file:// and plain-path objects.
 *
 * Writes go to "<path>.tmp-<pid>" and are renamed over the final name after fflush and fsync,
 * so a crash leaves either the old object, the new one, or a stray temporary file, never a
 * partial object under the final name. Missing parent folders are created.
 */
#define _GNU_SOURCE
#include "storage/storage.h"

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

struct storage_reader {
    FILE *f;
    char *line;
    size_t cap;
    char uri[PATH_MAX];
};

struct storage_writer {
    FILE *f;
    char path[PATH_MAX];
    char tmp[PATH_MAX + 32];
};

static const char *path_of(const char *uri, struct err *e)
{
    if (strncmp(uri, "file://", 7) == 0)
        return uri + 7;
    if (strstr(uri, "://")) {
        err_set(e, ERR_INVALID, "'%.200s': only file:// and plain paths are supported yet", uri);
        return NULL;
    }
    return uri;
}

int storage_open_read(const char *uri, struct storage_reader **out, struct err *e)
{
    const char *path = path_of(uri, e);
    struct storage_reader *r;

    *out = NULL;
    if (!path)
        return e->code;
    r = calloc(1, sizeof(*r));
    if (!r)
        return err_set(e, ERR_NOMEM, "out of memory");
    r->f = fopen(path, "rb");
    if (!r->f) {
        int saved = errno;
        free(r);
        return err_set(e, saved == ENOENT ? ERR_NOT_FOUND : ERR_IO, "%s: %s", uri, strerror(saved));
    }
    snprintf(r->uri, sizeof(r->uri), "%s", uri);
    *out = r;
    return 0;
}

int storage_read_line(struct storage_reader *r, const char **line, size_t *len, struct err *e)
{
    ssize_t n;

    errno = 0;
    n = getline(&r->line, &r->cap, r->f);
    if (n < 0) {
        if (ferror(r->f))
            return err_set(e, ERR_IO, "%s: %s", r->uri, strerror(errno));
        return 0;
    }
    while (n > 0 && (r->line[n - 1] == '\n' || r->line[n - 1] == '\r'))
        r->line[--n] = '\0';
    *line = r->line;
    *len = (size_t)n;
    return 1;
}

void storage_close_read(struct storage_reader *r)
{
    if (!r)
        return;
    if (r->f)
        fclose(r->f);
    free(r->line);
    free(r);
}

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

int storage_open_write(const char *uri, struct storage_writer **out, struct err *e)
{
    const char *path = path_of(uri, e);
    struct storage_writer *w;

    *out = NULL;
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
    *out = w;
    return 0;
}

int storage_write(struct storage_writer *w, const void *data, size_t len, struct err *e)
{
    if (len && fwrite(data, 1, len, w->f) != len)
        return err_set(e, ERR_IO, "%s: %s", w->path, strerror(errno));
    return 0;
}

int storage_commit(struct storage_writer *w, struct err *e)
{
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

void storage_abort(struct storage_writer *w)
{
    if (!w)
        return;
    fclose(w->f);
    unlink(w->tmp);
    free(w);
}

int storage_get(const char *uri, struct buf *out, struct err *e)
{
    struct storage_reader *r;
    char chunk[65536];
    size_t n;
    int rc = storage_open_read(uri, &r, e);

    if (rc != 0)
        return rc;
    while ((n = fread(chunk, 1, sizeof(chunk), r->f)) > 0) {
        if (buf_append(out, chunk, n) != 0) {
            rc = err_set(e, ERR_NOMEM, "out of memory reading %s", uri);
            break;
        }
    }
    if (rc == 0 && ferror(r->f))
        rc = err_set(e, ERR_IO, "%s: read error", uri);
    storage_close_read(r);
    return rc;
}

int storage_put(const char *uri, const void *data, size_t len, struct err *e)
{
    struct storage_writer *w;
    int rc = storage_open_write(uri, &w, e);

    if (rc == 0)
        rc = storage_write(w, data, len, e);
    if (rc != 0) {
        storage_abort(w);
        return rc;
    }
    return storage_commit(w, e);
}

int storage_delete(const char *uri, struct err *e)
{
    const char *path = path_of(uri, e);

    if (!path)
        return e->code;
    if (unlink(path) != 0 && errno != ENOENT)
        return err_set(e, ERR_IO, "%s: %s", uri, strerror(errno));
    return 0;
}

int storage_exists(const char *uri)
{
    struct err e;
    const char *path = path_of(uri, &e);

    return path && access(path, F_OK) == 0;
}

struct names {
    char **v;
    size_t n, cap;
};

static int add_name(struct names *ns, const char *name)
{
    if (ns->n == ns->cap) {
        size_t cap = ns->cap ? ns->cap * 2 : 64;
        char **p = realloc(ns->v, cap * sizeof(*p));
        if (!p)
            return -1;
        ns->v = p;
        ns->cap = cap;
    }
    if (!(ns->v[ns->n] = strdup(name)))
        return -1;
    ns->n++;
    return 0;
}

static int walk(const char *root, const char *rel, struct names *ns, struct err *e)
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
        else if (S_ISREG(st.st_mode) && add_name(ns, sub) != 0)
            rc = err_set(e, ERR_NOMEM, "out of memory");
    }
    closedir(d);
    return rc;
}

static int cmp_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int storage_list(const char *uri, char ***names, size_t *n, int *is_object, struct err *e)
{
    const char *path = path_of(uri, e);
    struct names ns = {0};
    struct stat st;
    int rc = 0;

    *names = NULL;
    *n = 0;
    *is_object = 0;
    if (!path)
        return e->code;
    if (stat(path, &st) != 0)
        return err_set(e, ERR_NOT_FOUND, "%s: %s", uri, strerror(errno));
    if (S_ISREG(st.st_mode)) {
        const char *base = strrchr(path, '/');
        *is_object = 1;
        if (add_name(&ns, base ? base + 1 : path) != 0)
            rc = err_set(e, ERR_NOMEM, "out of memory");
    } else {
        char root[PATH_MAX];
        snprintf(root, sizeof(root), "%s", path);
        while (strlen(root) > 1 && root[strlen(root) - 1] == '/')
            root[strlen(root) - 1] = '\0';
        rc = walk(root, "", &ns, e);
    }
    if (rc != 0) {
        storage_names_free(ns.v, ns.n);
        return rc;
    }
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
