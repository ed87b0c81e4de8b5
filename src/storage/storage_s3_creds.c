/*
 * storage_s3_creds.c: the credentials S3 requests are signed with, found in the AWS SDKs' order
 * and refreshed before they expire.
 *
 * The chain, first hit wins:
 *   1. environment     AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY (+ AWS_SESSION_TOKEN)
 *   2. shared files    the profile ($AWS_PROFILE, else "default") of $AWS_SHARED_CREDENTIALS_FILE
 *                      (~/.aws/credentials: [name]), then of $AWS_CONFIG_FILE (~/.aws/config:
 *                      [profile name], [default]): aws_access_key_id, aws_secret_access_key,
 *                      aws_session_token
 *   3. container       GET http://169.254.170.2$AWS_CONTAINER_CREDENTIALS_RELATIVE_URI (ECS), or
 *                      $AWS_CONTAINER_CREDENTIALS_FULL_URI (EKS Pod Identity; https, or http to a
 *                      loopback or container-agent address), with Authorization from
 *                      $AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE, else ..._TOKEN
 *   4. instance        IMDSv2 at $AWS_EC2_METADATA_SERVICE_ENDPOINT (http://169.254.169.254):
 *      metadata        PUT /latest/api/token, GET .../iam/security-credentials/ for the role,
 *                      GET .../iam/security-credentials/ROLE (off: AWS_EC2_METADATA_DISABLED=true)
 * Nothing found: requests go unsigned (public buckets), and a refused one says what was tried.
 * A source that is configured but fails (a container endpoint that answers 500) is an error
 * naming it, never a silent fall to the next source.
 *
 * Temporary credentials (container, instance metadata) carry an Expiration. The chain runs
 * again REFRESH_BEFORE_MS before it (at once when it is nearer, but never twice within
 * MIN_RETRY_MS). A failed refresh keeps the current credentials until they expire, and logs why;
 * after that, requests fail with the reason. Found nothing: the chain runs again after
 * NONE_RETRY_MS, so an instance role attached later is picked up.
 *
 * There is one set of credentials per process, as there is one S3 endpoint (storage_configure):
 * serve's I/O threads, the workers and batch's threads all sign with it. `cr.lock` guards every
 * field; it is never held across a metadata call: the one thread that refreshes sets
 * `refreshing` and calls without the lock, while the others go on with the current credentials,
 * or wait on `changed` when there are none that still hold. Secrets (secret key, session token,
 * the container's authorization token, the IMDS token) are never logged or put in an error, and
 * are wiped from memory when replaced.
 */
#define _GNU_SOURCE
#include "storage/storage_internal.h"
#include "core/clock.h"
#include "core/log.h"
#include "core/url.h"

#include <curl/curl.h>
#include <jansson.h>
#include <openssl/crypto.h>

#include <ctype.h>
#include <errno.h>
#include <pthread.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#define REFRESH_BEFORE_MS (5 * 60 * 1000LL)
#define MIN_RETRY_MS 1000LL
#define NONE_RETRY_MS (60 * 1000LL)
#define MAX_FILE_BYTES (1 << 20)
#define MAX_ANSWER_BYTES (64 * 1024)
#define ECS_HOST "http://169.254.170.2"
#define IMDS_DEFAULT "http://169.254.169.254"
#define IMDS_TOKEN_TTL_S "21600"

/* What one run of the chain found. Strings are new (wiped and freed by fetched_release). */
struct fetched {
    char *key_id, *secret, *token;
    int64_t expires_ms; /* 0: they do not expire */
    char source[160];
};

static struct {
    pthread_mutex_t lock;
    pthread_cond_t changed;                /* a refresh ended */
    int resolved;                          /* the chain ran at least once */
    int refreshing;                        /* one thread is running the chain without the lock */
    struct fetched cur;                    /* key_id NULL: none */
    int64_t next_try_ms;                   /* run the chain again at or after this (0: never) */
    int failing;                           /* the last refresh failed (logged once per streak) */
    char last_error[STORAGE_S3_CREDS_ERR]; /* why the chain failed and nothing holds, or "" */
    char tried[STORAGE_S3_CREDS_ERR];      /* "environment, shared files (...), ..." */
} cr = {.lock = PTHREAD_MUTEX_INITIALIZER, .changed = PTHREAD_COND_INITIALIZER};

static void wipe_free(char *s)
{
    if (s) {
        OPENSSL_cleanse(s, strlen(s));
        free(s);
    }
}

static void fetched_release(struct fetched *f)
{
    wipe_free(f->key_id);
    wipe_free(f->secret);
    wipe_free(f->token);
    memset(f, 0, sizeof(*f));
}

/* Takes copies of the three strings (token may be NULL or ""). 0 or ERR_NOMEM. */
static int fetched_set(struct fetched *f, const char *key_id, const char *secret, const char *token,
                       struct err *e)
{
    f->key_id = strdup(key_id);
    f->secret = strdup(secret);
    f->token = token && token[0] ? strdup(token) : NULL;
    if (!f->key_id || !f->secret || (token && token[0] && !f->token)) {
        fetched_release(f);
        return err_set(e, ERR_NOMEM, "out of memory");
    }
    return 0;
}

static const char *env(const char *name)
{
    const char *v = getenv(name);

    return v && v[0] ? v : NULL;
}

/* A value fit for an HTTP header or a signature: no control characters. */
static int printable(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || *s == 0x7f)
            return 0;
    return 1;
}

/* ---- 1. environment ---- */

static int from_env(struct fetched *f, struct err *e)
{
    const char *id = env("AWS_ACCESS_KEY_ID"), *secret = env("AWS_SECRET_ACCESS_KEY");
    int rc;

    if (!id || !secret)
        return 1;
    rc = fetched_set(f, id, secret, env("AWS_SESSION_TOKEN"), e);
    if (rc == 0)
        snprintf(f->source, sizeof(f->source), "environment");
    return rc;
}

/* ---- 2. shared credentials and config files ---- */

static char *trim(char *s)
{
    char *end;

    while (isspace((unsigned char)*s))
        s++;
    end = s + strlen(s);
    while (end > s && isspace((unsigned char)end[-1]))
        *--end = '\0';
    return s;
}

/* Reads a whole file (at most MAX_FILE_BYTES) into `out`, NUL-terminated. 1 if it does not
 * exist; ERR_IO names it otherwise. */
static int read_file(const char *path, const char *what, struct buf *out, struct err *e)
{
    FILE *fp = fopen(path, "rb");
    char chunk[4096];
    size_t n;
    int rc = 0;

    if (!fp)
        return errno == ENOENT ? 1
                               : err_set(e, ERR_IO, "%s: cannot read '%.200s': %s", what, path,
                                         strerror(errno));
    while (rc == 0 && (n = fread(chunk, 1, sizeof(chunk), fp)) > 0) {
        if (out->len + n > MAX_FILE_BYTES)
            rc = err_set(e, ERR_TOO_LARGE, "%s: '%.200s' is larger than %d bytes", what, path,
                         MAX_FILE_BYTES);
        else if (buf_append(out, chunk, n) != 0)
            rc = err_set(e, ERR_NOMEM, "out of memory");
    }
    if (rc == 0 && ferror(fp))
        rc = err_set(e, ERR_IO, "%s: cannot read '%.200s'", what, path);
    if (rc == 0 && buf_append(out, "", 1) == 0)
        out->len--;
    else if (rc == 0)
        rc = err_set(e, ERR_NOMEM, "out of memory");
    fclose(fp);
    return rc;
}

/* Is `header` (a section name, trimmed, without brackets) the profile's section? Credentials
 * files name it as is; config files "profile NAME", or "default". */
static int section_matches(const char *header, const char *profile, int is_config)
{
    if (!is_config || strcmp(header, "default") == 0)
        return strcmp(header, profile) == 0;
    if (strncmp(header, "profile", 7) != 0 || !isspace((unsigned char)header[7]))
        return 0;
    header += 7;
    while (isspace((unsigned char)*header))
        header++;
    return strcmp(header, profile) == 0;
}

/*
 * Looks for the profile's keys in an INI text (cut in place). 0: found both keys (f filled;
 * `what` and `path` name the source); 1: the keys are not there (`*has_profile` says whether
 * the section was); < 0: out of memory.
 */
static int parse_ini(char *text, const char *what, const char *path, const char *profile,
                     int is_config, struct fetched *f, int *has_profile, struct err *e)
{
    char *line, *next, *id = NULL, *secret = NULL, *token = NULL;
    int in = 0, rc;

    for (line = text; line; line = next) {
        char *eq, *key;
        if ((next = strchr(line, '\n')))
            *next++ = '\0';
        if (isspace((unsigned char)line[0])) /* a nested value (s3 =\n  ...): not ours */
            continue;
        line = trim(line);
        if (line[0] == '#' || line[0] == ';' || !line[0])
            continue;
        if (line[0] == '[') {
            char *close = strchr(line, ']');
            if (close)
                *close = '\0';
            in = close && section_matches(trim(line + 1), profile, is_config);
            *has_profile |= in;
            continue;
        }
        if (!in || !(eq = strchr(line, '=')))
            continue;
        *eq = '\0';
        key = trim(line);
        if (strcasecmp(key, "aws_access_key_id") == 0)
            id = trim(eq + 1);
        else if (strcasecmp(key, "aws_secret_access_key") == 0)
            secret = trim(eq + 1);
        else if (strcasecmp(key, "aws_session_token") == 0)
            token = trim(eq + 1);
    }
    if (!id || !secret || !id[0] || !secret[0])
        return 1;
    rc = fetched_set(f, id, secret, token, e);
    if (rc == 0)
        snprintf(f->source, sizeof(f->source), "%s '%.80s' (profile %.40s)", what, path, profile);
    return rc;
}

/* parse_ini() on one file. 1 also when the file does not exist; < 0: unreadable. */
static int from_ini(const char *path, const char *what, const char *profile, int is_config,
                    struct fetched *f, int *has_profile, struct err *e)
{
    struct buf text = {0};
    int rc = read_file(path, what, &text, e);

    if (rc == 0)
        rc = parse_ini(text.data, what, path, profile, is_config, f, has_profile, e);
    if (text.data)
        OPENSSL_cleanse(text.data, text.len);
    buf_release(&text);
    return rc;
}

static const char *profile_name(void)
{
    return env("AWS_PROFILE") ? env("AWS_PROFILE") : "default";
}

/* `$name`, else ~/.aws/`file`; "" if there is no home folder. */
static void shared_path(const char *name, const char *file, char *out, size_t cap)
{
    const char *home = env("HOME");
    struct passwd *pw;

    out[0] = '\0';
    if (env(name)) {
        snprintf(out, cap, "%s", env(name));
        return;
    }
    if (!home && (pw = getpwuid(getuid())))
        home = pw->pw_dir;
    if (home)
        snprintf(out, cap, "%s/.aws/%s", home, file);
}

static int from_files(struct fetched *f, struct err *e)
{
    char path[1024];
    int has_profile = 0, rc;

    shared_path("AWS_SHARED_CREDENTIALS_FILE", "credentials", path, sizeof(path));
    rc = path[0] ? from_ini(path, "credentials file", profile_name(), 0, f, &has_profile, e) : 1;
    if (rc != 1)
        return rc;
    shared_path("AWS_CONFIG_FILE", "config", path, sizeof(path));
    rc = path[0] ? from_ini(path, "config file", profile_name(), 1, f, &has_profile, e) : 1;
    if (rc == 1 && has_profile)
        log_debug("storage",
                  "the AWS profile has no access keys (role_arn, sso and "
                  "credential_process are not read)",
                  "profile=%s", profile_name());
    return rc;
}

/* ---- 3 and 4: HTTP metadata endpoints ---- */

struct answer {
    struct buf body;
    int too_big;
};

static size_t on_answer(char *p, size_t size, size_t n, void *ctx)
{
    struct answer *a = ctx;

    if (a->body.len + size * n > MAX_ANSWER_BYTES) {
        a->too_big = 1;
        return 0;
    }
    return buf_append(&a->body, p, size * n) == 0 ? size * n : 0;
}

/*
 * One request to a metadata endpoint: `method` GET or PUT (empty body), `headers` borrowed.
 * Returns 0 with *status set when an answer came (the body in `out`, NUL-terminated); 1 when
 * nothing answered (no connection, timeout: `why` says so); ERR_NOMEM.
 */
static int meta_call(const char *method, const char *url, struct curl_slist *headers,
                     long timeout_ms, struct buf *out, long *status, char *why, size_t why_cap)
{
    CURL *h = curl_easy_init();
    struct answer a = {0};
    char errbuf[CURL_ERROR_SIZE] = "";
    CURLcode cc;

    *status = 0;
    if (!h)
        return ERR_NOMEM;
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_NOPROXY, "*"); /* link-local agents: never through a proxy */
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, timeout_ms < 1000 ? timeout_ms : 1000L);
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, timeout_ms);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, headers);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_answer);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &a);
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, errbuf);
    if (strcmp(method, "PUT") == 0) {
        curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, "PUT");
        curl_easy_setopt(h, CURLOPT_POSTFIELDS, "");
        curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE, 0L);
    }
    cc = curl_easy_perform(h);
    if (cc == CURLE_OK)
        curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, status);
    curl_easy_cleanup(h);
    if (cc != CURLE_OK || buf_append(&a.body, "", 1) != 0) {
        snprintf(why, why_cap, "%s",
                 a.too_big   ? "the answer is too long"
                 : errbuf[0] ? errbuf
                             : curl_easy_strerror(cc));
        if (a.body.data)
            OPENSSL_cleanse(a.body.data, a.body.len);
        buf_release(&a.body);
        return cc == CURLE_OK ? ERR_NOMEM : 1;
    }
    a.body.len--;
    *out = a.body;
    return 0;
}

/* "2026-12-05T04:00:00Z" (fractions and +HH:MM offsets allowed) to epoch ms; -1 if not that. */
static int64_t parse_time(const char *s)
{
    struct tm tm = {0};
    int n = 0, off_h = 0, off_m = 0;
    char sign;

    if (sscanf(s, "%4d-%2d-%2dT%2d:%2d:%2d%n", &tm.tm_year, &tm.tm_mon, &tm.tm_mday, &tm.tm_hour,
               &tm.tm_min, &tm.tm_sec, &n) != 6)
        return -1;
    s += n;
    if (*s == '.')
        for (s++; isdigit((unsigned char)*s); s++)
            ;
    if ((*s == '+' || *s == '-') && sscanf(s, "%c%2d:%2d", &sign, &off_h, &off_m) == 3)
        off_m = (sign == '-' ? -1 : 1) * (off_h * 60 + off_m);
    else if (strcmp(s, "Z") != 0 && *s)
        return -1;
    else
        off_m = 0;
    tm.tm_year -= 1900;
    tm.tm_mon -= 1;
    return ((int64_t)timegm(&tm) - (int64_t)off_m * 60) * 1000;
}

/* Fills `f` from a credentials document (ECS, EKS Pod Identity and IMDS share the shape). */
static int parse_answer(const struct buf *body, const char *source, struct fetched *f,
                        struct err *e)
{
    json_error_t jerr;
    json_t *root = json_loadb(body->data, body->len, 0, &jerr);
    const char *id = NULL, *secret = NULL, *token = NULL, *exp = NULL, *code = NULL;
    int rc = 0;

    /* jerr.text may quote the document, secrets included: only its line is shown */
    if (!json_is_object(root)) {
        rc = err_set(e, ERR_IO, "%s: the answer is not a JSON object (line %d)", source, jerr.line);
        goto cleanup;
    }
    if (json_unpack(root, "{s?s, s?s, s?s, s?s, s?s}", "AccessKeyId", &id, "SecretAccessKey",
                    &secret, "Token", &token, "Expiration", &exp, "Code", &code) != 0 ||
        !id || !secret || !id[0] || !secret[0]) {
        rc = err_set(e, ERR_IO, "%s: the answer has no AccessKeyId and SecretAccessKey strings",
                     source);
        goto cleanup;
    }
    if (code && strcmp(code, "Success") != 0) {
        rc = err_set(e, ERR_IO, "%s: the answer's Code is '%.60s', not Success", source, code);
        goto cleanup;
    }
    if (!printable(id) || !printable(secret) || (token && !printable(token))) {
        rc = err_set(e, ERR_IO, "%s: the credentials hold control characters", source);
        goto cleanup;
    }
    f->expires_ms = exp ? parse_time(exp) : 0;
    if (f->expires_ms < 0) {
        /* not quoted: an answer's fields are not shown (a broken one may hold the secret) */
        rc = err_set(e, ERR_IO, "%s: Expiration is not an ISO-8601 UTC time", source);
        goto cleanup;
    }
    rc = fetched_set(f, id, secret, token, e);
    if (rc == 0)
        snprintf(f->source, sizeof(f->source), "%s", source);
cleanup:
    json_decref(root);
    return rc;
}

/* May an http:// FULL_URI go to `host`? Loopback and the ECS / EKS agents only (as the SDKs). */
static int container_host_ok(const char *host)
{
    return strncmp(host, "127.", 4) == 0 || strcmp(host, "localhost") == 0 ||
           strcmp(host, "[::1]") == 0 || strcmp(host, "::1") == 0 ||
           strcmp(host, "169.254.170.2") == 0 || strcmp(host, "169.254.170.23") == 0 ||
           strcasecmp(host, "[fd00:ec2::23]") == 0 || strcasecmp(host, "fd00:ec2::23") == 0;
}

static int check_full_uri(const char *uri, struct err *e)
{
    CURLU *u = curl_url();
    char *scheme = NULL, *host = NULL;
    int rc = 0;

    if (!u || curl_url_set(u, CURLUPART_URL, uri, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK)
        rc = err_set(e, ERR_INVALID, "AWS_CONTAINER_CREDENTIALS_FULL_URI: not a URL");
    else if (strcmp(scheme, "https") != 0 &&
             (strcmp(scheme, "http") != 0 || !container_host_ok(host)))
        rc = err_set(e, ERR_INVALID,
                     "AWS_CONTAINER_CREDENTIALS_FULL_URI: must be https, or http to a loopback "
                     "address, 169.254.170.2 or 169.254.170.23 (host '%.100s')",
                     host);
    curl_free(scheme);
    curl_free(host);
    curl_url_cleanup(u);
    return rc;
}

/* The container's authorization token: the file's content first (EKS rotates it), then the
 * variable; `*out` is a new string or NULL for none. */
static int container_token(char **out, struct err *e)
{
    const char *file = env("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE");
    struct buf text = {0};
    int rc;

    *out = NULL;
    if (!file) {
        if (env("AWS_CONTAINER_AUTHORIZATION_TOKEN") &&
            !(*out = strdup(env("AWS_CONTAINER_AUTHORIZATION_TOKEN"))))
            return err_set(e, ERR_NOMEM, "out of memory");
        return 0;
    }
    rc = read_file(file, "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", &text, e);
    if (rc == 1)
        rc = err_set(e, ERR_IO, "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE: '%.200s' does not exist",
                     file);
    if (rc == 0 && !(*out = strdup(trim(text.data ? text.data : ""))))
        rc = err_set(e, ERR_NOMEM, "out of memory");
    if (text.data)
        OPENSSL_cleanse(text.data, text.len);
    buf_release(&text);
    return rc;
}

static int from_container(struct fetched *f, struct err *e)
{
    const char *rel = env("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI");
    const char *full = env("AWS_CONTAINER_CREDENTIALS_FULL_URI");
    const char *source = rel ? "container (AWS_CONTAINER_CREDENTIALS_RELATIVE_URI)"
                             : "container (AWS_CONTAINER_CREDENTIALS_FULL_URI)";
    struct curl_slist *headers = NULL;
    struct buf url = {0}, body = {0};
    char *token = NULL, *shown = NULL, why[CURL_ERROR_SIZE] = "";
    long status = 0;
    int rc;

    if (!rel && !full)
        return 1;
    rc = rel ? 0 : check_full_uri(full, e);
    if (rc == 0)
        rc = container_token(&token, e);
    if (rc == 0 && token && (!token[0] || !printable(token)))
        rc = err_set(e, ERR_INVALID, "%s: the authorization token is empty or holds a line break",
                     source);
    if (rc == 0 && buf_printf(&url, "%s%s", rel ? ECS_HOST : "", rel ? rel : full) != 0)
        rc = err_set(e, ERR_NOMEM, "out of memory");
    if (rc == 0 && token) {
        struct buf line = {0};
        if (buf_printf(&line, "Authorization: %s", token) != 0 ||
            !(headers = curl_slist_append(NULL, line.data)))
            rc = err_set(e, ERR_NOMEM, "out of memory");
        if (line.data)
            OPENSSL_cleanse(line.data, line.len);
        buf_release(&line);
    }
    if (rc == 0) {
        shown = url_redacted(url.data);
        rc = meta_call("GET", url.data, headers, 5000, &body, &status, why, sizeof(why));
        if (rc == 1)
            rc = err_set(e, ERR_IO, "%s: cannot reach %.200s: %s", source,
                         shown ? shown : "the endpoint", why);
        else if (rc == 0 && status != 200)
            rc = err_set(e, ERR_IO, "%s: %.200s answered HTTP %ld", source,
                         shown ? shown : "the endpoint", status);
        else if (rc == 0)
            rc = parse_answer(&body, source, f, e);
        else
            rc = err_set(e, ERR_NOMEM, "out of memory");
    }
    if (headers) /* the slist holds the token: wipe before freeing */
        OPENSSL_cleanse(headers->data, strlen(headers->data));
    curl_slist_free_all(headers);
    wipe_free(token);
    free(shown);
    buf_release(&url);
    if (body.data)
        OPENSSL_cleanse(body.data, body.len);
    buf_release(&body);
    return rc;
}

/* ---- 4. instance metadata (IMDSv2) ---- */

static int imds_disabled(void)
{
    const char *v = env("AWS_EC2_METADATA_DISABLED");

    return v && strcasecmp(v, "true") == 0;
}

/* GET endpoint + path with the session token; 0 (200, body in `out`), 1 (no answer or 404:
 * `why`), ERR_IO for another status. */
static int imds_get(const char *endpoint, const char *path, const char *session, struct buf *out,
                    char *why, size_t why_cap, struct err *e)
{
    struct curl_slist *headers = NULL;
    struct buf url = {0}, line = {0};
    long status;
    int rc = ERR_NOMEM;

    if (buf_printf(&url, "%s%s", endpoint, path) == 0 &&
        buf_printf(&line, "X-aws-ec2-metadata-token: %s", session) == 0 &&
        (headers = curl_slist_append(NULL, line.data)))
        rc = meta_call("GET", url.data, headers, 3000, out, &status, why, why_cap);
    if (rc == ERR_NOMEM)
        rc = err_set(e, ERR_NOMEM, "out of memory");
    else if (rc == 0 && status == 404)
        rc = 1, snprintf(why, why_cap, "no instance role");
    else if (rc == 0 && status != 200)
        rc = err_set(e, ERR_IO, "instance metadata: %s answered HTTP %ld", path, status);
    if (headers)
        OPENSSL_cleanse(headers->data, strlen(headers->data));
    curl_slist_free_all(headers);
    if (line.data)
        OPENSSL_cleanse(line.data, line.len);
    buf_release(&line);
    buf_release(&url);
    return rc;
}

static int from_imds(struct fetched *f, char *why, size_t why_cap, struct err *e)
{
    const char *ep = env("AWS_EC2_METADATA_SERVICE_ENDPOINT");
    struct curl_slist *headers = NULL;
    struct buf url = {0}, session = {0}, roles = {0}, doc = {0}, path = {0};
    char endpoint[512], *role;
    long status = 0;
    size_t n;
    int rc;

    if (imds_disabled()) {
        snprintf(why, why_cap, "disabled by AWS_EC2_METADATA_DISABLED");
        return 1;
    }
    snprintf(endpoint, sizeof(endpoint), "%s", ep ? ep : IMDS_DEFAULT);
    n = strlen(endpoint);
    while (n > 0 && endpoint[n - 1] == '/')
        endpoint[--n] = '\0';
    rc = buf_printf(&url, "%s/latest/api/token", endpoint) != 0 ||
                 !(headers = curl_slist_append(
                       NULL, "X-aws-ec2-metadata-token-ttl-seconds: " IMDS_TOKEN_TTL_S))
             ? ERR_NOMEM
             : meta_call("PUT", url.data, headers, 3000, &session, &status, why, why_cap);
    if (rc == ERR_NOMEM) {
        rc = err_set(e, ERR_NOMEM, "out of memory");
    } else if (rc == 0 && (status == 403 || status == 404 || status == 405)) {
        /* what the SDKs take for "no IMDSv2 here" (disabled, or not EC2's service) */
        snprintf(why, why_cap, "the token request was answered HTTP %ld", status);
        rc = 1;
    } else if (rc == 0 && status != 200) {
        rc = err_set(e, ERR_IO, "instance metadata: PUT /latest/api/token answered HTTP %ld",
                     status);
    } else if (rc == 0 && (!session.len || !printable(session.data))) {
        rc = err_set(e, ERR_IO, "instance metadata: the session token is empty or not text");
    }
    if (rc == 0)
        rc = imds_get(endpoint, "/latest/meta-data/iam/security-credentials/", session.data, &roles,
                      why, why_cap, e);
    if (rc == 0) {
        role = trim(roles.data);
        role[strcspn(role, "\r\n")] = '\0'; /* one role per instance profile: the first line */
        if (!role[0] || strchr(role, '/') || !printable(role))
            rc = err_set(e, ERR_IO, "instance metadata: no usable role name");
        else if (buf_printf(&path, "/latest/meta-data/iam/security-credentials/%s", role) != 0)
            rc = err_set(e, ERR_NOMEM, "out of memory");
    }
    if (rc == 0)
        rc = imds_get(endpoint, path.data, session.data, &doc, why, why_cap, e);
    if (rc == 0)
        rc = parse_answer(&doc, "instance metadata", f, e);
    curl_slist_free_all(headers);
    if (session.data)
        OPENSSL_cleanse(session.data, session.len);
    if (doc.data)
        OPENSSL_cleanse(doc.data, doc.len);
    buf_release(&url);
    buf_release(&session);
    buf_release(&roles);
    buf_release(&doc);
    buf_release(&path);
    return rc;
}

/* ---- the chain ---- */

/* Runs the chain: 0 found (f filled), 1 nothing found (`tried` lists the sources), < 0 a
 * configured source failed (e names it). */
static int run_chain(struct fetched *f, char *tried, size_t tried_cap, struct err *e)
{
    char why[CURL_ERROR_SIZE] = "";
    int rc;

    snprintf(tried, tried_cap,
             "environment, shared files (profile %.60s), container, instance "
             "metadata",
             profile_name());
    if ((rc = from_env(f, e)) != 1 || (rc = from_files(f, e)) != 1 ||
        (rc = from_container(f, e)) != 1 || (rc = from_imds(f, why, sizeof(why), e)) != 1)
        return rc;
    if (why[0]) {
        size_t n = strlen(tried);
        snprintf(tried + n, tried_cap - n, " (%.120s)", why);
    }
    return 1;
}

/* Puts what one run of the chain gave into `cr`; under cr.lock. Takes `f`. */
static void install(int rc, struct fetched *f, const char *tried, const struct err *e)
{
    int64_t now = clock_now_ms();
    int holds = cr.cur.key_id && (cr.cur.expires_ms == 0 || now < cr.cur.expires_ms);

    snprintf(cr.tried, sizeof(cr.tried), "%s", tried);
    if (rc == 0) {
        if (cr.failing)
            log_info("storage", "S3 credentials refreshed after failures", "source=\"%s\"",
                     f->source);
        else
            log_info("storage", "S3 credentials", "source=\"%s\" expires_in_s=%lld", f->source,
                     f->expires_ms ? (long long)(f->expires_ms - now) / 1000 : -1LL);
        fetched_release(&cr.cur);
        cr.cur = *f;
        memset(f, 0, sizeof(*f));
        cr.failing = 0;
        cr.last_error[0] = '\0';
        cr.next_try_ms = 0;
        if (cr.cur.expires_ms)
            cr.next_try_ms = cr.cur.expires_ms - REFRESH_BEFORE_MS > now + MIN_RETRY_MS
                                 ? cr.cur.expires_ms - REFRESH_BEFORE_MS
                                 : now + MIN_RETRY_MS;
        return;
    }
    fetched_release(f);
    if (holds) { /* keep the current ones while they last */
        if (!cr.failing)
            log_warn("storage",
                     "cannot refresh S3 credentials; the current ones hold until they "
                     "expire",
                     "source=\"%s\" expires_in_s=%lld reason=\"%s\"", cr.cur.source,
                     (long long)(cr.cur.expires_ms - now) / 1000,
                     rc == 1 ? "no source has credentials any more" : e->msg);
        snprintf(cr.last_error, sizeof(cr.last_error), "%s",
                 rc == 1 ? "no source has credentials any more" : e->msg);
        cr.failing = 1;
        cr.next_try_ms = now + MIN_RETRY_MS;
        return;
    }
    if (cr.cur.key_id) { /* expired: requests fail (never unsigned) until a refresh works */
        snprintf(cr.last_error, sizeof(cr.last_error),
                 "the credentials from %.100s expired and cannot be refreshed: %.200s",
                 cr.cur.source, rc == 1 ? "no source has credentials any more" : e->msg);
        log_warn("storage", "S3 credentials expired and cannot be refreshed", "reason=\"%s\"",
                 cr.last_error);
        fetched_release(&cr.cur);
        cr.failing = 1;
        cr.next_try_ms = now + MIN_RETRY_MS;
        return;
    }
    if (rc == 1 && (!cr.resolved || cr.failing))
        log_info("storage", "no S3 credentials; requests go unsigned", "tried=\"%s\"", tried);
    else if (rc < 0 && !cr.failing)
        log_warn("storage", "cannot get S3 credentials", "reason=\"%s\"", e->msg);
    snprintf(cr.last_error, sizeof(cr.last_error), "%s", rc < 0 ? e->msg : "");
    cr.failing = rc < 0;
    cr.next_try_ms = now + (rc == 1 ? NONE_RETRY_MS : MIN_RETRY_MS);
}

static int copy_out(struct storage_s3_creds *out, struct err *e)
{
    out->key_id = strdup(cr.cur.key_id);
    out->secret = strdup(cr.cur.secret);
    out->token = cr.cur.token ? strdup(cr.cur.token) : NULL;
    snprintf(out->source, sizeof(out->source), "%s", cr.cur.source);
    if (!out->key_id || !out->secret || (cr.cur.token && !out->token)) {
        storage_s3_creds_release(out);
        return err_set(e, ERR_NOMEM, "out of memory");
    }
    return 0;
}

int storage_s3_creds_get(struct storage_s3_creds *out, struct err *e)
{
    int rc = 0;

    memset(out, 0, sizeof(*out));
    pthread_mutex_lock(&cr.lock);
    for (;;) {
        int64_t now = clock_now_ms();
        int holds = cr.cur.key_id && (cr.cur.expires_ms == 0 || now < cr.cur.expires_ms);
        int due = !cr.resolved || (cr.next_try_ms && now >= cr.next_try_ms);
        struct fetched f = {0};
        struct err ce = {0};
        char tried[STORAGE_S3_CREDS_ERR];
        int got;

        if (cr.refreshing && !holds) { /* nothing to sign with until it ends */
            pthread_cond_wait(&cr.changed, &cr.lock);
            continue;
        }
        if (!due || cr.refreshing)
            break;
        cr.refreshing = 1;
        pthread_mutex_unlock(&cr.lock);
        got = run_chain(&f, tried, sizeof(tried), &ce);
        pthread_mutex_lock(&cr.lock);
        install(got, &f, tried, &ce);
        cr.resolved = 1;
        cr.refreshing = 0;
        pthread_cond_broadcast(&cr.changed);
        break;
    }
    if (cr.cur.key_id && (cr.cur.expires_ms == 0 || clock_now_ms() < cr.cur.expires_ms))
        rc = copy_out(out, e);
    else if (cr.cur.key_id) /* expired before the next refresh is due: never unsigned */
        rc = err_set(e, ERR_IO,
                     "S3 credentials: the credentials from %.100s expired and cannot be "
                     "refreshed: %.200s",
                     cr.cur.source, cr.last_error[0] ? cr.last_error : "the refresh is pending");
    else if (cr.last_error[0])
        rc = err_set(e, ERR_IO, "S3 credentials: %s", cr.last_error);
    pthread_mutex_unlock(&cr.lock);
    return rc;
}

void storage_s3_creds_tried(char *out, size_t cap)
{
    pthread_mutex_lock(&cr.lock);
    snprintf(out, cap, "%s", cr.tried);
    pthread_mutex_unlock(&cr.lock);
}

void storage_s3_creds_release(struct storage_s3_creds *c)
{
    wipe_free(c->key_id);
    wipe_free(c->secret);
    wipe_free(c->token);
    c->key_id = c->secret = c->token = NULL;
}

/* ---- the parsers alone, for fuzz/fuzz_s3_creds.c ---- */

int storage_s3_creds_parse_ini(char *text, const char *profile, int is_config, int *has_profile,
                               struct err *e)
{
    struct fetched f = {0};
    int rc = parse_ini(text, "credentials file", "fuzz", profile, is_config, &f, has_profile, e);

    fetched_release(&f);
    return rc;
}

int storage_s3_creds_parse_answer(const char *body, size_t len, int64_t *expires_ms,
                                  struct err *e)
{
    struct fetched f = {0};
    struct buf b = {.data = (char *)body, .len = len};
    int rc = parse_answer(&b, "instance metadata", &f, e);

    *expires_ms = f.expires_ms;
    fetched_release(&f);
    return rc;
}
