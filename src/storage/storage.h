/*
 * storage.h: objects by URI, read as line streams and written atomically.
 *
 * `file://PATH` and plain paths (storage_file.c), and `s3://bucket/key` on any S3-compatible
 * endpoint (storage_s3.c: libcurl, AWS SigV4, path-style). A written object appears under its
 * name only when storage_commit() succeeds (files: temporary name, fsync, rename; S3: one PUT
 * or a completed multipart upload): no reader ever sees it partial.
 *
 * Every call is thread-safe; readers and writers belong to one thread at a time.
 */
#ifndef INFERD_STORAGE_H
#define INFERD_STORAGE_H

#include "core/buf.h"
#include "core/err.h"

#include <stddef.h>

#include <stdint.h>

struct storage_reader;
struct storage_writer;

struct storage_config {
    /* "" or NULL: $AWS_ENDPOINT_URL_S3, then $AWS_ENDPOINT_URL, else
     * https://s3.<region>.amazonaws.com (region: $AWS_REGION, $AWS_DEFAULT_REGION, us-east-1) */
    const char *s3_endpoint;
    /* multipart uploads start past this many bytes, in parts this big; 0: 8 MiB, minimum 5 MiB */
    int64_t s3_part_size_bytes;
    /* "" or NULL: file:// and plain paths may name any file; else a ':'-separated list of
     * existing folders, and every file location must resolve (symlinks included) inside one */
    const char *file_roots;
};

/*
 * Sets the S3 options (the strings are copied). Call before the first storage call, from one
 * thread; without it the defaults hold. ERR_INVALID names the bad option.
 */
int storage_configure(const struct storage_config *cfg, struct err *e);

/* Opens an object for reading. ERR_NOT_FOUND names the object. */
int storage_open_read(const char *uri, struct storage_reader **out, struct err *e);
/*
 * The next line, without its end of line ("\n" or "\r\n"). `*line` is borrowed until the next
 * call. Returns 1 for a line, 0 at the end, or a negative error.
 */
int storage_read_line(struct storage_reader *r, const char **line, size_t *len, struct err *e);
void storage_close_read(struct storage_reader *r);

/* Starts writing `uri` (under a temporary name until committed). */
int storage_open_write(const char *uri, struct storage_writer **out, struct err *e);
int storage_write(struct storage_writer *w, const void *data, size_t len, struct err *e);
/* Makes the object durable and visible under its name; frees `w` either way. */
int storage_commit(struct storage_writer *w, struct err *e);
/* Drops what was written; frees `w`. NULL does nothing. */
void storage_abort(struct storage_writer *w);

/* Whole objects. */
int storage_get(const char *uri, struct buf *out, struct err *e);
int storage_put(const char *uri, const void *data, size_t len, struct err *e);
/* Deletes an object; a missing one is not an error. */
int storage_delete(const char *uri, struct err *e);
/* 1 if the object exists, 0 if not. */
int storage_exists(const char *uri);
/*
 * What tells one version of an object from another without reading it (a batch re-run
 * compares it with the one its manifest recorded): files by size and modification time, as
 * make and rsync do; S3 objects by size and ETag.
 */
struct storage_identity {
    int64_t size_bytes;
    int64_t mtime_ns; /* files: modification time, ns since the epoch; 0 for S3 */
    char etag[160];   /* S3: the ETag, quotes included; "" for files */
};
/* Fills `*out` for the object `uri` (a stat, or a HEAD): 0, ERR_NOT_FOUND naming it, or
 * ERR_IO. */
int storage_identify(const char *uri, struct storage_identity *out, struct err *e);

/* 1 if `uri` has a backend: a plain path, file:// or s3://. */
int storage_supports(const char *uri);

/* 0 if `uri` may be read or written here: s3://, or a file inside the configured file roots
 * (ERR_INVALID names the location and the roots). Every file operation checks this too. */
int storage_check_allowed(const char *uri, struct err *e);

/*
 * The objects under `uri`: every file below it (recursive), as names relative to it, sorted;
 * when `uri` is itself an object, one name: its basename, and `*is_object` is set.
 *   names  new array of new strings; free with storage_names_free()
 */
int storage_list(const char *uri, char ***names, size_t *n, int *is_object, struct err *e);
void storage_names_free(char **names, size_t n);

/* `base` + "/" + `name` (for a single object, its folder + name): a new string. */
char *storage_join(const char *base, const char *name);

#endif
