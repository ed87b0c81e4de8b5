/*
 * storage_s3_http.c: one S3 request: URL, SigV4 signing, retries, and S3's XML answers.
 *
 * libcurl signs (CURLOPT_AWS_SIGV4, "aws:amz:<region>:s3"). libcurl 7.88 neither adds
 * x-amz-content-sha256 nor canonicalises the query string, so we send the body's SHA-256 as
 * that header (curl then signs it with every header we add) and callers build each query
 * string already in AWS canonical form (storage_s3_query_add). Addressing is path-style:
 * <endpoint>/<bucket>/<key>.
 *
 * Each thread keeps one CURL easy handle (a pthread key; its destructor frees it at thread
 * exit), so connections stay alive from one request to the next. Request bodies are held in
 * memory by the caller, so every attempt can send them again. Redirects are never followed:
 * a 301 from S3 means the wrong region, and is reported as such.
 *
 * Settings come once, at the first request: the endpoint from storage_configure() or the
 * AWS_* variables. Credentials come per request from storage_s3_creds.c (the AWS SDKs' chain,
 * refreshed before they expire; none: anonymous, unsigned requests), and are never logged.
 */
#define _GNU_SOURCE
#include "storage/storage_internal.h"
#include "core/ca_file.h"
#include "core/clock.h"
#include "core/log.h"

#include <curl/curl.h>
#include <libxml/parser.h>
#include <libxml/tree.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>

#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#define MAX_ATTEMPTS 6
#define FIRST_BACKOFF_MS 100
#define CONNECT_TIMEOUT_S 10L
#define STALL_TIMEOUT_S 60L /* a transfer moving under 1 byte/s this long is abandoned */

/* ---- settings, resolved once ---- */

static struct {
    pthread_once_t once;
    pthread_key_t handle_key;
    int ready; /* curl, libxml2 and the key are set up */
    char endpoint[512];
    char sigv4[128];
} s3 = {.once = PTHREAD_ONCE_INIT};

static void free_handle(void *h)
{
    curl_easy_cleanup(h);
}

static void s3_init(void)
{
    const char *opt = storage_s3_endpoint_option();
    const char *region = getenv("AWS_REGION");
    size_t n;

    if (!region || !region[0])
        region = getenv("AWS_DEFAULT_REGION");
    if (!region || !region[0])
        region = "us-east-1";
    if (opt[0])
        snprintf(s3.endpoint, sizeof(s3.endpoint), "%s", opt);
    else if (getenv("AWS_ENDPOINT_URL_S3") && getenv("AWS_ENDPOINT_URL_S3")[0])
        snprintf(s3.endpoint, sizeof(s3.endpoint), "%s", getenv("AWS_ENDPOINT_URL_S3"));
    else if (getenv("AWS_ENDPOINT_URL") && getenv("AWS_ENDPOINT_URL")[0])
        snprintf(s3.endpoint, sizeof(s3.endpoint), "%s", getenv("AWS_ENDPOINT_URL"));
    else
        snprintf(s3.endpoint, sizeof(s3.endpoint), "https://s3.%s.amazonaws.com", region);
    n = strlen(s3.endpoint);
    while (n > 0 && s3.endpoint[n - 1] == '/')
        s3.endpoint[--n] = '\0';
    snprintf(s3.sigv4, sizeof(s3.sigv4), "aws:amz:%s:s3", region);
    xmlInitParser();
    s3.ready = curl_global_init(CURL_GLOBAL_DEFAULT) == CURLE_OK &&
               pthread_key_create(&s3.handle_key, free_handle) == 0;
    log_debug("storage", "s3 settings", "endpoint=%s region=%s", s3.endpoint, region);
}

static CURL *thread_handle(void)
{
    CURL *h;

    if (!s3.ready)
        return NULL;
    h = pthread_getspecific(s3.handle_key);
    if (!h && (h = curl_easy_init()) && pthread_setspecific(s3.handle_key, h) != 0) {
        curl_easy_cleanup(h);
        h = NULL;
    }
    return h;
}

/* ---- encoding ---- */

static int unreserved(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '.' || c == '_' || c == '~';
}

int storage_s3_uri_encode(struct buf *b, const char *s, int keep_slash)
{
    static const char hex[] = "0123456789ABCDEF";

    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        char esc[3] = {'%', hex[*p >> 4], hex[*p & 15]};
        int rc = unreserved(*p) || (keep_slash && *p == '/') ? buf_append(b, p, 1)
                                                             : buf_append(b, esc, 3);
        if (rc != 0)
            return rc;
    }
    return 0;
}

int storage_s3_query_add(struct buf *q, const char *name, const char *value)
{
    int rc = q->len ? buf_append(q, "&", 1) : 0;

    if (rc == 0)
        rc = storage_s3_uri_encode(q, name, 0);
    if (rc == 0)
        rc = buf_append(q, "=", 1);
    if (rc == 0 && value)
        rc = storage_s3_uri_encode(q, value, 0);
    return rc;
}

static void sha256_hex(const void *data, size_t len, char hex[65])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned md_len = 0;

    hex[0] = '\0';
    if (EVP_Digest(data ? data : "", len, md, &md_len, EVP_sha256(), NULL) != 1)
        return;
    for (unsigned i = 0; i < md_len && i < 32; i++)
        snprintf(hex + 2 * i, 3, "%02x", md[i]);
}

/* ---- XML ---- */

/* libxml2 prints parse errors to stderr by default; a bad S3 answer is reported by us, once,
 * in the log's format, not by the parser. */
static void xml_quiet(void *ctx, const char *fmt, ...)
{
    (void)ctx, (void)fmt;
}

static xmlDocPtr parse_xml(const char *xml, size_t len)
{
    if (!xml || len == 0 || len > INT_MAX)
        return NULL;
    xmlSetGenericErrorFunc(NULL, xml_quiet); /* per thread in libxml2 */
    return xmlReadMemory(xml, (int)len, NULL, NULL,
                         XML_PARSE_NONET | XML_PARSE_NOERROR | XML_PARSE_NOWARNING);
}

static xmlNode *find_element(xmlNode *n, const char *name)
{
    for (; n; n = n->next) {
        xmlNode *hit;
        if (n->type != XML_ELEMENT_NODE)
            continue;
        if (strcmp((const char *)n->name, name) == 0)
            return n;
        if ((hit = find_element(n->children, name)))
            return hit;
    }
    return NULL;
}

/* The text of `n` as a new string (free()), "" for an empty element, NULL on no memory. */
static char *element_text(xmlNode *n)
{
    xmlChar *t = xmlNodeGetContent(n);
    char *s = strdup(t ? (const char *)t : "");

    xmlFree(t);
    return s;
}

char *storage_s3_xml_text(const char *xml, size_t len, const char *name)
{
    xmlDocPtr doc = parse_xml(xml, len);
    xmlNode *n = doc ? find_element(xmlDocGetRootElement(doc), name) : NULL;
    char *s = n ? element_text(n) : NULL;

    xmlFreeDoc(doc);
    return s;
}

static int add_listed_key(xmlNode *contents, const char *prefix, struct storage_names *out)
{
    xmlNode *k = find_element(contents->children, "Key");
    char *key = k ? element_text(k) : NULL;
    size_t pl = strlen(prefix), kl;
    int rc = 0;

    if (!k)
        return 0;
    if (!key)
        return ERR_NOMEM;
    kl = strlen(key);
    if (kl > pl && strncmp(key, prefix, pl) == 0 && key[kl - 1] != '/')
        rc = storage_names_add(out, key + pl, kl - pl);
    free(key);
    return rc;
}

int storage_s3_parse_list(const char *xml, size_t len, const char *prefix,
                          struct storage_names *out, char **next)
{
    xmlDocPtr doc = parse_xml(xml, len);
    xmlNode *root = doc ? xmlDocGetRootElement(doc) : NULL;
    int truncated = 0, rc = 0;

    *next = NULL;
    if (!root || strcmp((const char *)root->name, "ListBucketResult") != 0) {
        xmlFreeDoc(doc);
        return ERR_IO;
    }
    for (xmlNode *n = root->children; rc == 0 && n; n = n->next) {
        if (n->type != XML_ELEMENT_NODE)
            continue;
        if (strcmp((const char *)n->name, "Contents") == 0) {
            rc = add_listed_key(n, prefix, out);
        } else if (strcmp((const char *)n->name, "IsTruncated") == 0) {
            xmlChar *t = xmlNodeGetContent(n);
            truncated = t && strcmp((const char *)t, "true") == 0;
            xmlFree(t);
        } else if (strcmp((const char *)n->name, "NextContinuationToken") == 0 && !*next) {
            if (!(*next = element_text(n)))
                rc = ERR_NOMEM;
        }
    }
    /* a truncated page without a token could never finish */
    if (rc == 0 && truncated && (!*next || !(*next)[0]))
        rc = ERR_IO;
    if (rc != 0 || !truncated) {
        free(*next);
        *next = NULL;
    }
    xmlFreeDoc(doc);
    return rc;
}

/* ---- one attempt ---- */

struct attempt {
    struct storage_s3_request *rq;
    const struct storage_s3_creds *creds; /* key_id NULL: unsigned */
    struct buf *out;
    size_t sent; /* of rq->body, for PUT */
    int nomem;
    int too_big;     /* the body passed rq->max_out */
    char region[64]; /* x-amz-bucket-region of a redirect */
    char message[160];
};

static size_t on_body(char *p, size_t size, size_t n, void *ctx)
{
    struct attempt *a = ctx;

    if (a->rq->max_out && a->out->len + size * n > a->rq->max_out) {
        a->too_big = 1;
        return 0;
    }
    if (buf_append(a->out, p, size * n) != 0) {
        a->nomem = 1;
        return 0;
    }
    return size * n;
}

static size_t on_upload(char *dst, size_t size, size_t n, void *ctx)
{
    struct attempt *a = ctx;
    size_t left = a->rq->body_len - a->sent, k = size * n < left ? size * n : left;

    memcpy(dst, (const char *)a->rq->body + a->sent, k);
    a->sent += k;
    return k;
}

static int on_seek(void *ctx, curl_off_t offset, int origin)
{
    struct attempt *a = ctx;

    if (origin != SEEK_SET || offset < 0 || (size_t)offset > a->rq->body_len)
        return CURL_SEEKFUNC_CANTSEEK;
    a->sent = (size_t)offset;
    return CURL_SEEKFUNC_OK;
}

/* Copies a header's value, trimmed, if the line is `name: value`. */
static int header_value(const char *line, size_t len, const char *name, char *dst, size_t cap)
{
    size_t nl = strlen(name);

    if (len <= nl + 1 || strncasecmp(line, name, nl) != 0 || line[nl] != ':')
        return 0;
    line += nl + 1;
    len -= nl + 1;
    while (len > 0 && (*line == ' ' || *line == '\t'))
        line++, len--;
    while (len > 0 && (line[len - 1] == '\r' || line[len - 1] == '\n' || line[len - 1] == ' '))
        len--;
    snprintf(dst, cap, "%.*s", (int)len, line);
    return 1;
}

static size_t on_header(char *p, size_t size, size_t n, void *ctx)
{
    struct attempt *a = ctx;
    struct storage_s3_request *rq = a->rq;
    size_t len = size * n;
    char v[64];

    if (len >= 5 && strncmp(p, "HTTP/", 5) == 0) { /* a new response (after 100 Continue) */
        rq->etag[0] = a->region[0] = '\0';
        rq->length = rq->total_length = -1;
    } else if (header_value(p, len, "content-length", v, sizeof(v))) {
        rq->length = strtoll(v, NULL, 10);
    } else if (header_value(p, len, "content-range", v, sizeof(v))) {
        const char *slash = strchr(v, '/');
        rq->total_length = slash && slash[1] != '*' ? strtoll(slash + 1, NULL, 10) : -1;
    } else if (!header_value(p, len, "etag", rq->etag, sizeof(rq->etag))) {
        header_value(p, len, "x-amz-bucket-region", a->region, sizeof(a->region));
    }
    return len;
}

/* Appends "name: value" unless `value` is NULL; clears `*ok` when out of memory. Any length: a
 * session token from STS is often over a kilobyte. */
static struct curl_slist *add_header(struct curl_slist *list, int *ok, const char *name,
                                     const char *value)
{
    struct buf line = {0};
    struct curl_slist *l = NULL;

    if (!*ok || !value)
        return list;
    if (buf_printf(&line, "%s: %s", name, value) == 0)
        l = curl_slist_append(list, line.data);
    if (line.data)
        OPENSSL_cleanse(line.data, line.len);
    buf_release(&line);
    if (!l)
        *ok = 0;
    return l ? l : list;
}

/* Frees a header list, wiping it first (it may hold the session token). */
static void free_headers(struct curl_slist *h)
{
    for (struct curl_slist *l = h; l; l = l->next)
        OPENSSL_cleanse(l->data, strlen(l->data));
    curl_slist_free_all(h);
}

static struct curl_slist *request_headers(const struct storage_s3_request *rq, const char *sha,
                                          const struct storage_s3_creds *creds)
{
    struct curl_slist *h = NULL;
    int ok = 1;

    h = add_header(h, &ok, "x-amz-content-sha256", sha);
    h = add_header(h, &ok, "x-amz-security-token", creds->key_id ? creds->token : NULL);
    h = add_header(h, &ok, "Content-Type", rq->content_type);
    h = add_header(h, &ok, "Range", rq->range);
    h = add_header(h, &ok, "If-Match", rq->if_match);
    if (!ok) {
        free_headers(h);
        return NULL;
    }
    return h;
}

static void set_method(CURL *h, struct attempt *a)
{
    const struct storage_s3_request *rq = a->rq;

    if (strcmp(rq->method, "HEAD") == 0) {
        curl_easy_setopt(h, CURLOPT_NOBODY, 1L);
    } else if (strcmp(rq->method, "PUT") == 0) {
        curl_easy_setopt(h, CURLOPT_UPLOAD, 1L);
        curl_easy_setopt(h, CURLOPT_READFUNCTION, on_upload);
        curl_easy_setopt(h, CURLOPT_READDATA, a);
        curl_easy_setopt(h, CURLOPT_SEEKFUNCTION, on_seek);
        curl_easy_setopt(h, CURLOPT_SEEKDATA, a);
        curl_easy_setopt(h, CURLOPT_INFILESIZE_LARGE, (curl_off_t)rq->body_len);
    } else if (strcmp(rq->method, "POST") == 0) {
        curl_easy_setopt(h, CURLOPT_POST, 1L);
        curl_easy_setopt(h, CURLOPT_POSTFIELDS, rq->body ? (const char *)rq->body : "");
        curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)rq->body_len);
    } else if (strcmp(rq->method, "GET") != 0) {
        curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, rq->method);
    }
}

/* Runs one attempt; returns the CURLcode, with rq->status set when an answer came. */
static CURLcode perform(CURL *h, struct attempt *a, const char *url, struct curl_slist *headers,
                        char errbuf[CURL_ERROR_SIZE])
{
    CURLcode cc;

    curl_easy_reset(h); /* keeps the connection cache */
    errbuf[0] = '\0';
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_PATH_AS_IS, 1L); /* keys may hold "./" or "../" */
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT, CONNECT_TIMEOUT_S);
    curl_easy_setopt(h, CURLOPT_LOW_SPEED_LIMIT, 1L);
    curl_easy_setopt(h, CURLOPT_LOW_SPEED_TIME, STALL_TIMEOUT_S);
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, errbuf);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, headers);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, a);
    curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(h, CURLOPT_HEADERDATA, a);
    if (storage_s3_ca())
        ca_file_apply(storage_s3_ca(), h);
    if (a->creds->key_id) {
        curl_easy_setopt(h, CURLOPT_AWS_SIGV4, s3.sigv4);
        curl_easy_setopt(h, CURLOPT_USERNAME, a->creds->key_id);
        curl_easy_setopt(h, CURLOPT_PASSWORD, a->creds->secret);
    }
    set_method(h, a);
    a->sent = 0;
    a->nomem = a->too_big = 0;
    a->out->len = 0;
    a->rq->status = 0;
    a->rq->code[0] = a->message[0] = '\0';
    cc = curl_easy_perform(h);
    if (cc == CURLE_OK)
        curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &a->rq->status);
    return cc;
}

/* Reads <Code> and <Message> of an error body into the request and the attempt. */
static void read_error_body(struct attempt *a)
{
    xmlDocPtr doc = parse_xml(a->out->data, a->out->len);
    xmlNode *root = doc ? xmlDocGetRootElement(doc) : NULL;
    xmlNode *code = NULL, *msg = NULL;

    if (root && strcmp((const char *)root->name, "Error") == 0) {
        code = find_element(root->children, "Code");
        msg = find_element(root->children, "Message");
    }
    if (code) {
        xmlChar *t = xmlNodeGetContent(code);
        snprintf(a->rq->code, sizeof(a->rq->code), "%s", t ? (const char *)t : "");
        xmlFree(t);
    }
    if (msg) {
        xmlChar *t = xmlNodeGetContent(msg);
        snprintf(a->message, sizeof(a->message), "%s", t ? (const char *)t : "");
        xmlFree(t);
    }
    xmlFreeDoc(doc);
}

static int retryable_status(const struct storage_s3_request *rq)
{
    long s = rq->status;

    return s == 429 || s == 500 || s == 502 || s == 503 || s == 504 ||
           (s == 400 && strcmp(rq->code, "RequestTimeout") == 0) ||
           (s == 200 && (strcmp(rq->code, "InternalError") == 0 ||
                         strcmp(rq->code, "SlowDown") == 0)); /* an <Error> inside a 200 */
}

/* Transport failures that another attempt may not meet (not a bad URL or certificate). */
static int transient(CURLcode cc)
{
    switch (cc) {
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY:
    case CURLE_COULDNT_CONNECT:
    case CURLE_OPERATION_TIMEDOUT:
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_PARTIAL_FILE:
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM:
        return 1;
    default:
        return 0;
    }
}

/* Exponential backoff with jitter: the n-th retry waits between half and all of 100 ms * 2^n. */
static void backoff(int attempt)
{
    static _Thread_local unsigned long long state;
    long long full = (long long)FIRST_BACKOFF_MS << (attempt - 1), ms;
    struct timespec ts;

    if (!state) {
        state = (clock_mono_ns() % 1000000000ull << 20) ^ (unsigned long long)(uintptr_t)&ts;
        state |= 1;
    }
    state ^= state << 13, state ^= state >> 7, state ^= state << 17; /* xorshift64 */
    ms = full / 2 + (long long)(state % (unsigned long long)(full / 2 + 1));
    ts.tv_sec = ms / 1000;
    ts.tv_nsec = (ms % 1000) * 1000000L;
    while (nanosleep(&ts, &ts) != 0)
        ;
}

/* The one-line error for a final answer that is not a success. */
static int answer_error(const struct attempt *a, const char *target, int attempts, struct err *e)
{
    const struct storage_s3_request *rq = a->rq;
    char detail[240], tries[32] = "";

    if (attempts > 1)
        snprintf(tries, sizeof(tries), ", %d attempts", attempts);
    if (rq->code[0])
        snprintf(detail, sizeof(detail), "%s%s%.120s", rq->code, a->message[0] ? ": " : "",
                 a->message);
    else
        snprintf(detail, sizeof(detail), "HTTP %ld", rq->status);
    if (rq->status == 403 && a->creds->key_id)
        return err_set(e, ERR_INVALID, "%s: access denied (%s) for the credentials from %s", target,
                       detail, a->creds->source);
    if (rq->status == 403) {
        char tried[STORAGE_S3_CREDS_ERR];
        storage_s3_creds_tried(tried, sizeof(tried));
        return err_set(e, ERR_INVALID,
                       "%s: access denied (%s) to an unsigned request; no S3 "
                       "credentials: tried %.150s",
                       target, detail, tried);
    }
    if (rq->status == 404 && strcmp(rq->code, "NoSuchBucket") == 0)
        return err_set(e, ERR_NOT_FOUND, "%s: bucket '%.100s' does not exist", target, rq->bucket);
    if (rq->status == 404 && strcmp(rq->code, "NoSuchKey") == 0)
        return err_set(e, ERR_NOT_FOUND, "%s: no such key '%.100s' in bucket '%.100s'", target,
                       rq->key ? rq->key : "", rq->bucket);
    if (rq->status == 404)
        return err_set(e, ERR_NOT_FOUND, "%s: not found (%s)", target, detail);
    if (rq->status == 412)
        return err_set(e, ERR_IO, "%s: changed while it was being read (%s)", target, detail);
    if (rq->status >= 300 && rq->status < 400 && a->region[0])
        return err_set(e, ERR_INVALID, "%s: %s: the bucket is in region '%s' (set AWS_REGION)",
                       target, detail, a->region);
    return err_set(e, ERR_IO, "%s: %s (%s%s)", target, detail, rq->method, tries);
}

/* ---- the request ---- */

static int build_url(const struct storage_s3_request *rq, struct buf *url)
{
    int rc = buf_puts(url, s3.endpoint);

    if (rc == 0)
        rc = buf_append(url, "/", 1);
    if (rc == 0)
        rc = storage_s3_uri_encode(url, rq->bucket, 0);
    if (rc == 0 && rq->key && rq->key[0]) {
        rc = buf_append(url, "/", 1);
        if (rc == 0)
            rc = storage_s3_uri_encode(url, rq->key, 1);
    }
    if (rc == 0 && rq->query && rq->query[0]) {
        rc = buf_append(url, "?", 1);
        if (rc == 0)
            rc = buf_puts(url, rq->query);
    }
    return rc;
}

int storage_s3_do(struct storage_s3_request *rq, struct err *e)
{
    struct buf url = {0}, scratch = {0};
    struct storage_s3_creds creds = {0};
    struct err ce = {0};
    struct attempt a = {.rq = rq, .out = rq->out ? rq->out : &scratch, .creds = &creds};
    struct curl_slist *headers = NULL;
    char target[300], sha[65], errbuf[CURL_ERROR_SIZE];
    CURL *h;
    int rc = 0, attempt = 0;

    if (rq->uri)
        snprintf(target, sizeof(target), "%.280s", rq->uri);
    else
        snprintf(target, sizeof(target), "s3://%.100s%s%.180s", rq->bucket,
                 rq->key && rq->key[0] ? "/" : "", rq->key ? rq->key : "");
    rq->status = 0;
    rq->code[0] = rq->etag[0] = '\0';
    rq->length = rq->total_length = -1;
    pthread_once(&s3.once, s3_init);
    if (!(h = thread_handle()))
        return err_set(e, ERR_IO, "%s: cannot start libcurl", target);
    if ((rc = storage_s3_creds_get(&creds, &ce)) != 0) {
        rc = err_set(e, rc, "%s: %s", target, ce.msg);
        goto cleanup;
    }
    sha256_hex(rq->body, rq->body_len, sha);
    if (build_url(rq, &url) != 0 || !(headers = request_headers(rq, sha, &creds))) {
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    for (attempt = 1;; attempt++) {
        CURLcode cc = perform(h, &a, url.data, headers, errbuf);
        int again;
        if (a.nomem) {
            rc = err_set(e, ERR_NOMEM, "%s: out of memory reading the answer", target);
            break;
        }
        if (cc == CURLE_OK &&
            (rq->status < 200 || rq->status >= 300 || strcmp(rq->method, "POST") == 0))
            read_error_body(&a);
        /* CompleteMultipartUpload may answer 200 with an <Error> document */
        if (cc == CURLE_OK && rq->status >= 200 && rq->status < 300 && !rq->code[0])
            break;
        again = a.too_big ? 0 : cc != CURLE_OK ? transient(cc) : retryable_status(rq);
        if (!again || attempt == MAX_ATTEMPTS) {
            if (a.too_big)
                rc = err_set(e, ERR_IO, "%s: the answer is longer than the %zu bytes asked for",
                             target, rq->max_out);
            else if (cc == CURLE_PEER_FAILED_VERIFICATION || cc == CURLE_SSL_CACERT_BADFILE)
                rc = err_set(e, ERR_IO,
                             "%s: %s: certificate verification failed: %.200s (a private CA: "
                             "--s3-ca-file%s%.150s)",
                             target, s3.endpoint, errbuf[0] ? errbuf : curl_easy_strerror(cc),
                             storage_s3_ca() ? ", now " : "",
                             storage_s3_ca() ? ca_file_path(storage_s3_ca()) : "");
            else if (cc != CURLE_OK)
                rc = err_set(e, ERR_IO, "%s: cannot reach %s: %s (%s, %d attempt%s)", target,
                             s3.endpoint, errbuf[0] ? errbuf : curl_easy_strerror(cc), rq->method,
                             attempt, attempt > 1 ? "s" : "");
            else
                rc = answer_error(&a, target, attempt, e);
            break;
        }
        log_warn("storage", "s3 request failed; retrying",
                 "method=%s uri=%s status=%ld code=%s error=\"%s\" attempt=%d", rq->method, target,
                 rq->status, rq->code[0] ? rq->code : "-",
                 cc != CURLE_OK ? (errbuf[0] ? errbuf : curl_easy_strerror(cc)) : "", attempt);
        backoff(attempt);
    }
    log_debug("storage", "s3 request", "method=%s uri=%s%s%s status=%ld attempts=%d", rq->method,
              target, rq->query ? "?" : "", rq->query ? rq->query : "", rq->status, attempt);
cleanup:
    /* the handle points at this call's buffers and headers: forget them, keep the connection */
    curl_easy_reset(h);
    free_headers(headers);
    storage_s3_creds_release(&creds);
    buf_release(&url);
    buf_release(&scratch);
    return rc;
}
