/*
 * storage_internal.h: what the storage implementations share; included by src/storage/ and
 * tests/unit/test_storage.c only.
 *
 * storage.c owns the public calls: it picks a backend by the URI's scheme, splits lines and
 * buffers writes generically, and sorts listings. A backend moves bytes: read a stream, write
 * a stream and make it visible on commit, delete, test and list.
 */
#ifndef INFERD_STORAGE_INTERNAL_H
#define INFERD_STORAGE_INTERNAL_H

#include "storage/storage.h"

#include <limits.h>
#include <stdint.h>
#include <sys/types.h>

/* A growable array of new strings (the listing under construction). */
struct storage_names {
    char **v;
    size_t n, cap;
};

/* Appends a copy of the first `len` bytes of `name`. Returns 0 or ERR_NOMEM. */
int storage_names_add(struct storage_names *ns, const char *name, size_t len);

struct storage_ops {
    /* `*impl` receives the backend's reader and `*size` the object's size in bytes (-1 if it
     * cannot be known before reading); ERR_NOT_FOUND names the object. Never waits for a
     * writer or a device: what is not a regular file (or an object) is ERR_INVALID. */
    int (*open_read)(const char *uri, void **impl, int64_t *size, struct err *e);
    /* Up to `cap` bytes into `dst`; `*n` is 0 at the end. */
    int (*read)(void *impl, char *dst, size_t cap, size_t *n, struct err *e);
    void (*close_read)(void *impl);
    /* ERR_INVALID when the name holds something other than a regular file (or an object). */
    int (*open_write)(const char *uri, void **impl, struct err *e);
    int (*write)(void *impl, const void *data, size_t len, struct err *e);
    /* Makes the object visible under its name; frees `impl` either way. */
    int (*commit)(void *impl, struct err *e);
    /* Drops what was written; frees `impl`. */
    void (*abort)(void *impl);
    int (*remove)(const char *uri, struct err *e);
    int (*exists)(const char *uri);
    /* What a stat can tell without waiting (storage_check_object); NULL: nothing, the object
     * is checked when it is read or written. */
    int (*check)(const char *uri, int64_t max_bytes, struct err *e);
    /* Names in any order (storage.c sorts them); `out` is empty on entry. */
    int (*list)(const char *uri, struct storage_names *out, int *is_object, struct err *e);
};

extern const struct storage_ops storage_file_ops;
extern const struct storage_ops storage_s3_ops;

/* storage_identify() for each backend (kept out of the ops table: one call, two backends) */
int storage_file_identify(const char *uri, struct storage_identity *out, struct err *e);
int storage_s3_identify(const char *uri, struct storage_identity *out, struct err *e);

/* ---- files under --file-roots (storage.c) ---- */

/*
 * Where the file location `uri` is, for the *at() calls of storage_file.c: with --file-roots,
 * `*dirfd` is its root's folder (an O_PATH descriptor owned by storage.c) and `rel` the path
 * below it ("." for the root itself), found by storage_check_allowed()'s resolution; without
 * roots, AT_FDCWD and the path as given. ERR_INVALID for a location outside the roots.
 */
int storage_file_place(const char *uri, int *dirfd, char rel[PATH_MAX], struct err *e);
/*
 * Opens `rel` below `dirfd` as open(2) would with `flags` and `mode`. Below a root it is
 * openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS): the kernel walks the path again and fails
 * (EXDEV, ELOOP) where a symlink or ".." would leave the root, so a folder swapped for a link
 * after the check cannot lead outside. A kernel without openat2 (ENOSYS) gets openat(2) and
 * the check alone. Returns the descriptor, or -1 with errno.
 */
int storage_open_beneath(int dirfd, const char *rel, int flags, mode_t mode);

/* ---- S3: settings (storage.c) ---- */

/* What storage_configure() set: "" means "from the environment"; the part size in bytes. */
const char *storage_s3_endpoint_option(void);
int64_t storage_s3_part_size(void);
/* --s3-ca-file's certificates (core/ca_file.h), or NULL; lives until the process exits. */
struct ca_file;
const struct ca_file *storage_s3_ca(void);

/* ---- S3: credentials (storage_s3_creds.c) ---- */

#define STORAGE_S3_CREDS_ERR 256

/* What one request is signed with: copies, so a refresh never changes them under a request. */
struct storage_s3_creds {
    char *key_id; /* NULL: no source has credentials; the request goes unsigned */
    char *secret;
    char *token;      /* NULL: none (long-term keys) */
    char source[160]; /* where they came from, for errors: "environment", "instance metadata" */
};

/*
 * The current credentials, found (the first time) and refreshed (before they expire) in the
 * AWS SDKs' order: environment, shared files, container, instance metadata. Returns 0 with
 * `out` filled (key_id NULL when nothing was found: unsigned requests), or ERR_IO naming the
 * source that failed, or whose credentials expired and cannot be refreshed; never a secret.
 * Free `out` with storage_s3_creds_release(). Thread-safe; one set per process.
 */
int storage_s3_creds_get(struct storage_s3_creds *out, struct err *e);
void storage_s3_creds_release(struct storage_s3_creds *c);
/* "environment, shared files (profile P), container, instance metadata": the sources the last
 * run of the chain tried, for the error of a request refused while unsigned. */
void storage_s3_creds_tried(char *out, size_t cap);
/* The chain's parsers alone (fuzz/fuzz_s3_creds.c): a shared credentials or config file's text
 * (cut in place; 0: the profile's keys are there, 1: not) and a container or instance-metadata
 * answer (0: valid credentials; else an error that quotes none of it). */
int storage_s3_creds_parse_ini(char *text, const char *profile, int is_config, int *has_profile,
                               struct err *e);
int storage_s3_creds_parse_answer(const char *body, size_t len, int64_t *expires_ms,
                                  struct err *e);

/* ---- S3: one request (storage_s3_http.c) ---- */

struct storage_s3_request {
    /* in */
    const char *method; /* GET, HEAD, PUT, POST or DELETE */
    const char *bucket;
    const char *key;   /* NULL or "" for the bucket itself */
    const char *query; /* canonical (storage_s3_query_add), without '?'; NULL for none */
    const void *body;  /* PUT/POST body, held by the caller for every attempt */
    size_t body_len;
    const char *content_type; /* NULL: none sent */
    const char *range;        /* "bytes=A-B" or NULL */
    const char *if_match;     /* an ETag, quotes included, or NULL */
    const char *uri;          /* names the request in errors; NULL: s3://bucket/key */
    struct buf *out;          /* the response body (reset per attempt); NULL: kept internally */
    size_t max_out;           /* a longer body is an error; 0: no limit */
    /* out: after any answer from the server */
    long status;          /* the last HTTP status; 0 if none came */
    char code[64];        /* S3's <Code> of an error body, "" if none */
    char etag[160];       /* the ETag header, quotes included */
    int64_t length;       /* the Content-Length header, -1 if absent */
    int64_t total_length; /* the size after '/' in Content-Range, -1 if absent */
};

/*
 * Sends the request, retrying transport errors, 429, 5xx and RequestTimeout with backoff.
 * Returns 0 for a 2xx answer. Otherwise a negative code with a message naming s3://bucket/key
 * (403: ERR_INVALID "access denied (...)", 404: ERR_NOT_FOUND, unreachable or 5xx: ERR_IO),
 * and `status` and `code` say what came back. A 200 whose body is an <Error> is an error.
 */
int storage_s3_do(struct storage_s3_request *rq, struct err *e);

/* Appends `s` URI-encoded as S3 signs it: unreserved bytes kept, '/' too if `keep_slash`. */
int storage_s3_uri_encode(struct buf *b, const char *s, int keep_slash);

/* Adds "name=value" to a query string being built; call in sorted order of names. */
int storage_s3_query_add(struct buf *q, const char *name, const char *value);

/* The text of the first element named `name` (any depth, any namespace) of an XML document:
 * a new string (free()), or NULL if absent or not XML. */
char *storage_s3_xml_text(const char *xml, size_t len, const char *name);

/* Parses a ListObjectsV2 answer: appends each <Key> that starts with `prefix` and does not end
 * in '/' to `out` (without the prefix); `*next` gets the continuation token, a new string, or
 * NULL when the listing is complete. Returns 0, ERR_NOMEM or ERR_IO (not a listing). */
int storage_s3_parse_list(const char *xml, size_t len, const char *prefix,
                          struct storage_names *out, char **next);

#endif
