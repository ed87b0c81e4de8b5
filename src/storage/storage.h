/*
 * storage.h: objects by URI, read as line streams and written atomically.
 *
 * `file://PATH` and plain paths (storage_file.c), and `s3://bucket/key` on any S3-compatible
 * endpoint (storage_s3.c: libcurl, AWS SigV4, path-style). A written object appears under its
 * name only when storage_commit() succeeds (files: temporary name, fsync, rename; S3: one PUT
 * or a completed multipart upload): no reader ever sees it partial.
 *
 * Only regular files are objects: a location that names a folder (where one object is
 * expected), a FIFO, a socket or a device is ERR_INVALID, found by a stat before anything is
 * opened, so no call waits for a writer that never comes or reads a device that never ends.
 * Whole objects are read only up to a limit the caller gives (storage_get); anything longer is
 * read as a stream (storage_open_read).
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
    /* "" or NULL: S3 over https trusts the system's CAs; else a PEM file of CAs trusted too
     * (a private CA's certificate). Certificates are always verified. */
    const char *s3_ca_file;
    /* multipart uploads start past this many bytes, in parts this big; 0: 8 MiB, minimum 5 MiB */
    int64_t s3_part_size_bytes;
    /* "" or NULL: file:// and plain paths may name any file; else a ':'-separated list of
     * existing folders, and every file location must resolve (symlinks included) inside one */
    const char *file_roots;
};

/*
 * Sets the S3 options (the strings are copied; the CA file is read now). Call before the first
 * storage call, from one thread; without it the defaults hold. ERR_INVALID names the bad option.
 */
int storage_configure(const struct storage_config *cfg, struct err *e);

/* Opens an object for reading. ERR_NOT_FOUND names the object; ERR_INVALID one that is not a
 * regular file. */
int storage_open_read(const char *uri, struct storage_reader **out, struct err *e);
/*
 * The next line, without its end of line ("\n" or "\r\n"). `*line` is borrowed until the next
 * call. Returns 1 for a line, 0 at the end, or a negative error.
 */
int storage_read_line(struct storage_reader *r, const char **line, size_t *len, struct err *e);
/* Up to `cap` bytes as they are (after any that storage_read_line() buffered); `*n` is 0 at
 * the end. Do not mix with storage_read_line() after this. */
int storage_read(struct storage_reader *r, void *dst, size_t cap, size_t *n, struct err *e);
void storage_close_read(struct storage_reader *r);

/* Starts writing `uri` (under a temporary name until committed). ERR_INVALID when `uri` names
 * something other than a regular file now (it is never replaced). */
int storage_open_write(const char *uri, struct storage_writer **out, struct err *e);
int storage_write(struct storage_writer *w, const void *data, size_t len, struct err *e);
/* Makes the object durable and visible under its name; frees `w` either way. */
int storage_commit(struct storage_writer *w, struct err *e);
/* Drops what was written; frees `w`. NULL does nothing. */
void storage_abort(struct storage_writer *w);

/*
 * Reads a whole object into `out` (appended, NUL-terminated). One over `max_bytes` (> 0) is
 * ERR_TOO_LARGE naming the size and the limit, unread when its size is known up front (a
 * file's, an S3 object's), otherwise as soon as byte max_bytes + 1 arrives.
 */
int storage_get(const char *uri, int64_t max_bytes, struct buf *out, struct err *e);
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

/*
 * What can be checked about `uri` now without waiting on anything (a stat, no I/O to S3): a
 * file location that exists must be a regular file (ERR_INVALID names what it is) of at most
 * `max_bytes` bytes (ERR_TOO_LARGE; 0: any size). A missing file and s3:// pass: they are
 * checked when read or written. For requests, before they are accepted.
 */
int storage_check_object(const char *uri, int64_t max_bytes, struct err *e);

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
