/*
 * storage_s3.c: s3://bucket/key objects (the backend behind storage.c; requests go through
 * storage_s3_http.c).
 *
 * Reading: a HEAD gives the size and ETag, then ranged GETs of READ_CHUNK bytes, each with
 * If-Match on that ETag, so an object replaced mid-read fails the read instead of mixing two
 * versions. Writing is atomic by nature in S3: bytes are buffered up to the part size; a commit
 * before that is one PUT, otherwise a multipart upload (create, a PUT per part, complete) that
 * appears only when completed. An abort deletes the upload; one abandoned by a crash stays
 * until a bucket lifecycle rule (AbortIncompleteMultipartUpload) removes it.
 *
 * Listing `s3://b/p`: if the key `p` is an object it is the one name; otherwise every key under
 * "p/" (ListObjectsV2, following continuation tokens), relative to it, without "folder" keys
 * ending in '/'.
 */
#define _GNU_SOURCE
#include "storage/storage_internal.h"
#include "core/log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define READ_CHUNK ((size_t)8 << 20)
#define MAX_PARTS 10000 /* S3's limit */

/* ---- s3://bucket/key ---- */

struct s3_loc {
    const char *uri;
    char *copy; /* "bucket\0key" */
    const char *bucket;
    const char *key; /* "" for the bucket itself */
};

static int loc_parse(const char *uri, struct s3_loc *loc, struct err *e)
{
    char *slash;

    memset(loc, 0, sizeof(*loc));
    loc->uri = uri;
    if (!(loc->copy = strdup(uri + 5)))
        return err_set(e, ERR_NOMEM, "out of memory");
    slash = strchr(loc->copy, '/');
    if (slash)
        *slash = '\0';
    loc->bucket = loc->copy;
    loc->key = slash ? slash + 1 : "";
    if (!loc->bucket[0]) {
        free(loc->copy);
        loc->copy = NULL;
        return err_set(e, ERR_INVALID, "'%.200s': no bucket name (s3://BUCKET/KEY)", uri);
    }
    return 0;
}

static void loc_release(struct s3_loc *loc)
{
    free(loc->copy);
    loc->copy = NULL;
}

static struct storage_s3_request request(const char *method, const struct s3_loc *loc)
{
    return (struct storage_s3_request){.method = method, .bucket = loc->bucket, .key = loc->key};
}

/* After a 404 on an object: tells a missing bucket from a missing key. */
static int not_found(const struct s3_loc *loc, struct err *e)
{
    struct storage_s3_request rq = request("HEAD", loc);
    struct err ignored;

    rq.key = NULL;
    if (storage_s3_do(&rq, &ignored) != 0 && rq.status == 404)
        return err_set(e, ERR_NOT_FOUND, "%.200s: bucket '%.100s' does not exist", loc->uri,
                       loc->bucket);
    return err_set(e, ERR_NOT_FOUND, "%.200s: no such key '%.200s' in bucket '%.100s'", loc->uri,
                   loc->key, loc->bucket);
}

/* HEADs the object; 404 becomes the message of not_found(). */
static int head_object(const struct s3_loc *loc, struct storage_s3_request *rq, struct err *e)
{
    int rc;

    *rq = request("HEAD", loc);
    if (!loc->key[0])
        return err_set(e, ERR_INVALID, "'%.200s' names a bucket, not an object", loc->uri);
    rc = storage_s3_do(rq, e);
    if (rc != 0 && rq->status == 404)
        rc = not_found(loc, e);
    return rc;
}

/* ---- reading ---- */

struct s3_reader {
    struct s3_loc loc;
    char etag[160];
    int64_t size;
    int64_t offset;   /* of the next byte to fetch */
    struct buf chunk; /* fetched bytes; chunk.data[pos, len) are unread */
    size_t pos;
};

static void s3_close_read(void *impl)
{
    struct s3_reader *r = impl;

    if (!r)
        return;
    loc_release(&r->loc);
    buf_release(&r->chunk);
    free(r);
}

static int s3_open_read(const char *uri, void **impl, int64_t *size, struct err *e)
{
    struct s3_reader *r = calloc(1, sizeof(*r));
    struct storage_s3_request rq;
    int rc;

    *impl = NULL;
    *size = -1;
    if (!r)
        return err_set(e, ERR_NOMEM, "out of memory");
    rc = loc_parse(uri, &r->loc, e);
    if (rc == 0)
        rc = head_object(&r->loc, &rq, e);
    if (rc == 0 && rq.length < 0)
        rc = err_set(e, ERR_IO, "%.200s: the endpoint gave no Content-Length", uri);
    if (rc != 0) {
        s3_close_read(r);
        return rc;
    }
    r->size = rq.length;
    *size = r->size;
    snprintf(r->etag, sizeof(r->etag), "%s", rq.etag);
    *impl = r;
    return 0;
}

/* Fetches the next range into r->chunk. */
static int fetch(struct s3_reader *r, struct err *e)
{
    size_t want =
        r->size - r->offset < (int64_t)READ_CHUNK ? (size_t)(r->size - r->offset) : READ_CHUNK;
    struct storage_s3_request rq = request("GET", &r->loc);
    char range[64];
    int rc;

    snprintf(range, sizeof(range), "bytes=%lld-%lld", (long long)r->offset,
             (long long)r->offset + (long long)want - 1);
    rq.range = range;
    rq.if_match = r->etag[0] ? r->etag : NULL;
    rq.out = &r->chunk;
    rq.max_out = want;
    r->pos = 0;
    rc = storage_s3_do(&rq, e);
    if (rc != 0)
        return rc;
    /* a server that ignores Range answers 200 with the whole (small) object */
    if ((rq.status == 200 && (r->offset != 0 || (int64_t)r->chunk.len != r->size)) ||
        (rq.status != 200 && rq.status != 206) || r->chunk.len != want)
        return err_set(e, ERR_IO, "%.200s: asked for bytes %lld-%lld, got %zu bytes (HTTP %ld)",
                       r->loc.uri, (long long)r->offset, (long long)r->offset + (long long)want - 1,
                       r->chunk.len, rq.status);
    /* If-Match covers S3; the size and ETag cover servers that ignore it */
    if ((rq.total_length >= 0 && rq.total_length != r->size) ||
        (rq.etag[0] && r->etag[0] && strcmp(rq.etag, r->etag) != 0))
        return err_set(e, ERR_IO, "%.200s: changed while it was being read", r->loc.uri);
    r->offset += (int64_t)want;
    return 0;
}

static int s3_read(void *impl, char *dst, size_t cap, size_t *n, struct err *e)
{
    struct s3_reader *r = impl;
    size_t k;

    *n = 0;
    if (r->pos == r->chunk.len) {
        int rc;
        if (r->offset >= r->size)
            return 0;
        if ((rc = fetch(r, e)) != 0)
            return rc;
    }
    k = r->chunk.len - r->pos < cap ? r->chunk.len - r->pos : cap;
    memcpy(dst, r->chunk.data + r->pos, k);
    r->pos += k;
    *n = k;
    return 0;
}

/* ---- writing ---- */

struct s3_writer {
    struct s3_loc loc;
    struct buf pending; /* bytes not sent yet */
    size_t part_size;
    char *upload_id;  /* NULL until a multipart upload starts */
    int n_parts;      /* uploaded so far */
    struct buf parts; /* <Part> elements for CompleteMultipartUpload */
};

static void writer_free(struct s3_writer *w)
{
    loc_release(&w->loc);
    buf_release(&w->pending);
    buf_release(&w->parts);
    free(w->upload_id);
    free(w);
}

static int s3_open_write(const char *uri, void **impl, struct err *e)
{
    struct s3_writer *w = calloc(1, sizeof(*w));
    int rc;

    *impl = NULL;
    if (!w)
        return err_set(e, ERR_NOMEM, "out of memory");
    rc = loc_parse(uri, &w->loc, e);
    if (rc == 0 && !w->loc.key[0])
        rc = err_set(e, ERR_INVALID, "'%.200s' names a bucket, not an object", uri);
    if (rc != 0) {
        writer_free(w);
        return rc;
    }
    w->part_size = (size_t)storage_s3_part_size();
    *impl = w;
    return 0;
}

static int start_upload(struct s3_writer *w, struct err *e)
{
    struct storage_s3_request rq = request("POST", &w->loc);
    struct buf answer = {0};
    int rc;

    rq.query = "uploads=";
    rq.content_type = "application/octet-stream";
    rq.out = &answer;
    rc = storage_s3_do(&rq, e);
    if (rc == 0) {
        w->upload_id = storage_s3_xml_text(answer.data, answer.len, "UploadId");
        if (!w->upload_id || !w->upload_id[0])
            rc = err_set(e, ERR_IO, "%.200s: CreateMultipartUpload gave no UploadId", w->loc.uri);
    }
    buf_release(&answer);
    return rc;
}

static int upload_part(struct s3_writer *w, const char *data, size_t len, struct err *e)
{
    struct storage_s3_request rq = request("PUT", &w->loc);
    struct buf query = {0};
    char number[16];
    int rc = 0;

    if (!w->upload_id)
        rc = start_upload(w, e);
    if (rc != 0)
        return rc;
    if (w->n_parts == MAX_PARTS)
        return err_set(e, ERR_TOO_LARGE, "%.200s: more than %d parts; raise the S3 part size",
                       w->loc.uri, MAX_PARTS);
    snprintf(number, sizeof(number), "%d", w->n_parts + 1);
    if (storage_s3_query_add(&query, "partNumber", number) != 0 ||
        storage_s3_query_add(&query, "uploadId", w->upload_id) != 0) {
        buf_release(&query);
        return err_set(e, ERR_NOMEM, "out of memory");
    }
    rq.query = query.data;
    rq.body = data;
    rq.body_len = len;
    rc = storage_s3_do(&rq, e);
    if (rc == 0 && !rq.etag[0])
        rc = err_set(e, ERR_IO, "%.200s: part %s was stored without an ETag", w->loc.uri, number);
    if (rc == 0 && buf_printf(&w->parts, "<Part><PartNumber>%s</PartNumber><ETag>", number) != 0)
        rc = err_set(e, ERR_NOMEM, "out of memory");
    for (const char *p = rq.etag; rc == 0 && *p; p++) {
        const char *esc = *p == '&' ? "&amp;" : *p == '<' ? "&lt;" : *p == '>' ? "&gt;" : NULL;
        if ((esc ? buf_puts(&w->parts, esc) : buf_append(&w->parts, p, 1)) != 0)
            rc = err_set(e, ERR_NOMEM, "out of memory");
    }
    if (rc == 0 && buf_puts(&w->parts, "</ETag></Part>") != 0)
        rc = err_set(e, ERR_NOMEM, "out of memory");
    if (rc == 0)
        w->n_parts++;
    buf_release(&query);
    return rc;
}

static int s3_write(void *impl, const void *data, size_t len, struct err *e)
{
    struct s3_writer *w = impl;
    size_t off = 0;
    int rc = 0;

    if (buf_append(&w->pending, data, len) != 0)
        return err_set(e, ERR_NOMEM, "out of memory");
    while (rc == 0 && w->pending.len - off >= w->part_size) {
        rc = upload_part(w, w->pending.data + off, w->part_size, e);
        off += w->part_size;
    }
    if (off > 0) {
        memmove(w->pending.data, w->pending.data + off, w->pending.len - off);
        w->pending.len -= off;
    }
    return rc;
}

static void abort_upload(struct s3_writer *w)
{
    struct storage_s3_request rq = request("DELETE", &w->loc);
    struct buf query = {0};
    struct err e;

    if (!w->upload_id)
        return;
    if (storage_s3_query_add(&query, "uploadId", w->upload_id) == 0) {
        rq.query = query.data;
        if (storage_s3_do(&rq, &e) != 0 && rq.status != 404)
            log_warn("storage", "cannot abort a multipart upload; a lifecycle rule will",
                     "uri=%s reason=\"%s\"", w->loc.uri, e.msg);
    }
    buf_release(&query);
}

static int complete_upload(struct s3_writer *w, struct err *e)
{
    struct storage_s3_request rq = request("POST", &w->loc);
    struct buf query = {0}, body = {0};
    int rc = 0;

    if (storage_s3_query_add(&query, "uploadId", w->upload_id) != 0 ||
        buf_puts(&body, "<CompleteMultipartUpload>") != 0 ||
        buf_append(&body, w->parts.data, w->parts.len) != 0 ||
        buf_puts(&body, "</CompleteMultipartUpload>") != 0)
        rc = err_set(e, ERR_NOMEM, "out of memory");
    if (rc == 0) {
        rq.query = query.data;
        rq.body = body.data;
        rq.body_len = body.len;
        rq.content_type = "application/xml";
        rc = storage_s3_do(&rq, e);
    }
    buf_release(&query);
    buf_release(&body);
    return rc;
}

static int s3_commit(void *impl, struct err *e)
{
    struct s3_writer *w = impl;
    int rc;

    if (!w->upload_id) {
        struct storage_s3_request rq = request("PUT", &w->loc);
        rq.body = w->pending.data;
        rq.body_len = w->pending.len;
        rq.content_type = "application/octet-stream";
        rc = storage_s3_do(&rq, e);
    } else {
        rc = w->pending.len > 0 ? upload_part(w, w->pending.data, w->pending.len, e) : 0;
        if (rc == 0)
            rc = complete_upload(w, e);
        if (rc != 0)
            abort_upload(w);
    }
    writer_free(w);
    return rc;
}

static void s3_abort(void *impl)
{
    struct s3_writer *w = impl;

    if (!w)
        return;
    abort_upload(w);
    writer_free(w);
}

/* ---- the rest ---- */

static int s3_remove(const char *uri, struct err *e)
{
    struct s3_loc loc;
    struct storage_s3_request rq;
    int rc = loc_parse(uri, &loc, e);

    if (rc != 0)
        return rc;
    if (!loc.key[0]) {
        loc_release(&loc);
        return err_set(e, ERR_INVALID, "'%.200s' names a bucket, not an object", uri);
    }
    rq = request("DELETE", &loc);
    rc = storage_s3_do(&rq, e);
    if (rc != 0 && rq.status == 404)
        rc = 0;
    loc_release(&loc);
    return rc;
}

static int s3_exists(const char *uri)
{
    struct s3_loc loc;
    struct storage_s3_request rq;
    struct err e;
    int found = 0;

    if (loc_parse(uri, &loc, &e) != 0)
        return 0;
    rq = request("HEAD", &loc);
    found = storage_s3_do(&rq, &e) == 0;
    loc_release(&loc);
    return found;
}

/* Every key under `prefix`, page by page. */
static int list_prefix(const struct s3_loc *loc, const char *prefix, struct storage_names *ns,
                       struct err *e)
{
    char *token = NULL;
    struct buf query = {0}, page = {0};
    int rc = 0;

    do {
        struct storage_s3_request rq = request("GET", loc);
        char *next = NULL;
        rq.key = NULL;
        rq.uri = loc->uri;
        query.len = 0;
        if ((token && storage_s3_query_add(&query, "continuation-token", token) != 0) ||
            storage_s3_query_add(&query, "list-type", "2") != 0 ||
            storage_s3_query_add(&query, "prefix", prefix) != 0) {
            rc = err_set(e, ERR_NOMEM, "out of memory");
            break;
        }
        rq.query = query.data;
        rq.out = &page;
        rc = storage_s3_do(&rq, e);
        if (rc != 0 && strcmp(rq.code, "NoSuchBucket") == 0) {
            rc = err_set(e, ERR_NOT_FOUND, "%.200s: bucket '%.100s' does not exist", loc->uri,
                         loc->bucket);
        } else if (rc == 0) {
            rc = storage_s3_parse_list(page.data, page.len, prefix, ns, &next);
            if (rc == ERR_NOMEM)
                rc = err_set(e, ERR_NOMEM, "out of memory");
            else if (rc != 0)
                rc = err_set(e, ERR_IO, "%.200s: the answer is not a ListObjectsV2 page", loc->uri);
        }
        free(token);
        token = next;
    } while (rc == 0 && token);
    free(token);
    buf_release(&query);
    buf_release(&page);
    return rc;
}

static int s3_list(const char *uri, struct storage_names *ns, int *is_object, struct err *e)
{
    struct s3_loc loc;
    struct err denied = {0};
    char *prefix = NULL;
    size_t kl;
    int rc = loc_parse(uri, &loc, e);

    if (rc != 0)
        return rc;
    kl = strlen(loc.key);
    if (kl > 0 && loc.key[kl - 1] != '/') {
        struct storage_s3_request rq = request("HEAD", &loc);
        rc = storage_s3_do(&rq, &denied);
        if (rc == 0) {
            const char *base = strrchr(loc.key, '/');
            base = base ? base + 1 : loc.key;
            *is_object = 1;
            rc = storage_names_add(ns, base, strlen(base));
            if (rc != 0)
                rc = err_set(e, ERR_NOMEM, "out of memory");
            goto cleanup;
        }
        /* not an object: maybe a prefix (a 403 may hide either; the listing decides) */
        if (rq.status != 404 && rq.status != 403) {
            *e = denied;
            goto cleanup;
        }
        if (rq.status == 404)
            denied.code = ERR_OK;
    }
    if (!(prefix = malloc(kl + 2))) {
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    snprintf(prefix, kl + 2, "%s%s", loc.key, kl > 0 && loc.key[kl - 1] != '/' ? "/" : "");
    rc = list_prefix(&loc, prefix, ns, e);
    if (rc == 0 && ns->n == 0) {
        if (denied.code != ERR_OK)
            rc = err_set(e, denied.code, "%s", denied.msg);
        else if (kl > 0 && loc.key[kl - 1] != '/')
            rc = err_set(e, ERR_NOT_FOUND,
                         "%.200s: no such key '%.150s' in bucket '%.100s', nor keys under it", uri,
                         loc.key, loc.bucket);
        else
            rc = err_set(e, ERR_NOT_FOUND, "%.200s: no objects under it in bucket '%.100s'", uri,
                         loc.bucket);
    }
cleanup:
    free(prefix);
    loc_release(&loc);
    return rc;
}

const struct storage_ops storage_s3_ops = {
    .open_read = s3_open_read,
    .read = s3_read,
    .close_read = s3_close_read,
    .open_write = s3_open_write,
    .write = s3_write,
    .commit = s3_commit,
    .abort = s3_abort,
    .remove = s3_remove,
    .exists = s3_exists,
    .list = s3_list,
};

/* ---- identity ---- */

int storage_s3_identify(const char *uri, struct storage_identity *out, struct err *e)
{
    struct s3_loc loc;
    struct storage_s3_request rq;
    int rc = loc_parse(uri, &loc, e);

    if (rc != 0)
        return rc;
    rc = head_object(&loc, &rq, e);
    if (rc == 0 && !rq.etag[0])
        rc = err_set(e, ERR_IO, "%.200s: the server sent no ETag", uri);
    if (rc == 0) {
        out->size_bytes = rq.length;
        snprintf(out->etag, sizeof(out->etag), "%s", rq.etag);
    }
    loc_release(&loc);
    return rc;
}
