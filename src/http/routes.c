/*
 * routes.c: every HTTP route inferd serves, one row each: method, path pattern, the scope a key
 * needs, the thread its handler runs on, the handler, and whether `inferd worker` serves it.
 *
 * The frame (server.c) matches a request here once its headers are in, checks its key against
 * the row's scope before reading a byte of the body, and runs the handler on the row's thread.
 * A route added without a scope is PUBLIC by accident only if written so: the integration
 * suite walks this table (`inferd routes`) and checks every row against every kind of key.
 */
#define _GNU_SOURCE
#include "http/http_internal.h"

#include <stdio.h>
#include <string.h>

const struct route http_routes[] = {
    /* health: for load balancers and orchestrators, never behind a key */
    {"GET", "/v2/health/live", SCOPE_PUBLIC, ON_EVENT, online_live, ROUTE_WORKER},
    {"GET", "/v2/health/ready", SCOPE_PUBLIC, ON_EVENT, online_ready, ROUTE_WORKER},
    {"GET", "/metrics", SCOPE_METRICS, ON_POOL, online_metrics, ROUTE_WORKER},
    /* online inference and model metadata */
    {"GET", "/v2", SCOPE_INFER, ON_EVENT, online_server_meta, 0},
    {"GET", "/v2/models/stats", SCOPE_INFER, ON_EVENT, online_stats, 0},
    {"GET", "/v2/models/{m}", SCOPE_INFER, ON_EVENT, online_model_meta, 0},
    {"GET", "/v2/models/{m}/versions/{v}", SCOPE_INFER, ON_EVENT, online_model_meta, 0},
    {"GET", "/v2/models/{m}/ready", SCOPE_INFER, ON_EVENT, online_model_ready, 0},
    {"GET", "/v2/models/{m}/versions/{v}/ready", SCOPE_INFER, ON_EVENT, online_model_ready, 0},
    {"GET", "/v2/models/{m}/stats", SCOPE_INFER, ON_EVENT, online_stats, 0},
    {"GET", "/v2/models/{m}/versions/{v}/stats", SCOPE_INFER, ON_EVENT, online_stats, 0},
    {"POST", "/v2/models/{m}/infer", SCOPE_INFER, ON_EVENT, online_infer, 0},
    {"POST", "/v2/models/{m}/versions/{v}/infer", SCOPE_INFER, ON_EVENT, online_infer, 0},
    {"POST", "/v1/models/{m}:predict", SCOPE_INFER, ON_EVENT, online_predict, 0},
    /* the model repository: changes what every tenant is served */
    {"POST", "/v2/repository/index", SCOPE_ADMIN, ON_EVENT, online_repo_index, 0},
    {"POST", "/v2/repository/models/{m}/load", SCOPE_ADMIN, ON_POOL, online_repo_load, 0},
    {"POST", "/v2/repository/models/{m}/unload", SCOPE_ADMIN, ON_POOL, online_repo_unload, 0},
    /* async jobs; the redrive sends back every tenant's failed jobs */
    {"POST", "/v1/jobs", SCOPE_JOBS, ON_EVENT, jobs_submit, 0},
    {"GET", "/v1/jobs", SCOPE_JOBS, ON_POOL, jobs_list, 0},
    {"POST", "/v1/jobs/retry", SCOPE_ADMIN, ON_POOL, jobs_redrive, 0},
    {"GET", "/v1/jobs/{id}", SCOPE_JOBS, ON_POOL, jobs_get, 0},
    {"DELETE", "/v1/jobs/{id}", SCOPE_JOBS, ON_POOL, jobs_cancel, 0},
    {"GET", "/v1/jobs/{id}/result", SCOPE_JOBS, ON_POOL, jobs_result, 0},
    {"POST", "/v1/jobs/{id}/retry", SCOPE_JOBS, ON_POOL, jobs_retry, 0},
    {"GET", "/v1/workers", SCOPE_ADMIN, ON_POOL, jobs_workers, 0},
    /* batch jobs and schedules */
    {"POST", "/v1/batch-jobs", SCOPE_BATCH, ON_POOL, batch_api_create, 0},
    {"GET", "/v1/batch-jobs", SCOPE_BATCH, ON_POOL, batch_api_list, 0},
    {"GET", "/v1/batch-jobs/{id}", SCOPE_BATCH, ON_POOL, batch_api_get, 0},
    {"DELETE", "/v1/batch-jobs/{id}", SCOPE_BATCH, ON_POOL, batch_api_cancel, 0},
    {"POST", "/v1/batch-jobs/{id}/run", SCOPE_BATCH, ON_POOL, batch_api_run, 0},
    {"POST", "/v1/batch-jobs/{id}/pause", SCOPE_BATCH, ON_POOL, batch_api_pause, 0},
    {"POST", "/v1/batch-jobs/{id}/resume", SCOPE_BATCH, ON_POOL, batch_api_resume, 0},
};
const size_t http_n_routes = sizeof(http_routes) / sizeof(http_routes[0]);

const char *http_scope_name(enum route_scope s)
{
    switch (s) {
    case SCOPE_PUBLIC:
        return "public";
    case SCOPE_METRICS:
        return "metrics";
    case SCOPE_INFER:
        return "infer";
    case SCOPE_JOBS:
        return "jobs";
    case SCOPE_BATCH:
        return "batch";
    case SCOPE_ADMIN:
        return "admin";
    }
    return "?";
}

#define MAX_SEGMENTS 8

/* Cuts `path` at its slashes in place; returns the number of segments (MAX_SEGMENTS + 1 when
 * there are more). Empty segments (a//b, a trailing /) are skipped, as before the table. */
static int split(char *path, char *seg[MAX_SEGMENTS])
{
    int n = 0;

    for (char *p = path; *p;) {
        while (*p == '/')
            *p++ = '\0';
        if (!*p)
            break;
        if (n == MAX_SEGMENTS)
            return MAX_SEGMENTS + 1;
        seg[n++] = p;
        while (*p && *p != '/')
            p++;
    }
    return n;
}

/* Does segment `s` match the pattern segment [pat, pat + len)? A {param} takes it whole, or
 * with a :suffix the part before it (non-empty). */
static int segment_matches(const char *pat, size_t len, const char *s, size_t *param_len)
{
    const char *close;

    *param_len = 0;
    if (len == 0 || pat[0] != '{')
        return strlen(s) == len && strncmp(pat, s, len) == 0;
    close = memchr(pat, '}', len);
    if (!close)
        return 0;
    size_t suffix = len - (size_t)(close + 1 - pat), n = strlen(s);
    if (n <= suffix || strncmp(s + n - suffix, close + 1, suffix) != 0)
        return 0;
    *param_len = n - suffix;
    return 1;
}

/* 1 if the segments match `pattern`; then params[k] is the k-th {param}'s segment and
 * lens[k] how much of it the param takes (less than the segment before a :suffix). */
static int path_matches(const char *pattern, char *const *seg, int n,
                        const char *params[ROUTE_MAX_PARAMS], size_t lens[ROUTE_MAX_PARAMS])
{
    const char *p = pattern;
    int i = 0, k = 0;

    while (*p == '/')
        p++;
    for (; *p; i++) {
        const char *end = strchr(p, '/');
        size_t len = end ? (size_t)(end - p) : strlen(p), param_len;
        if (i >= n || !segment_matches(p, len, seg[i], &param_len))
            return 0;
        if (p[0] == '{' && k < ROUTE_MAX_PARAMS) {
            params[k] = seg[i];
            lens[k++] = param_len;
        }
        p += len;
        while (*p == '/')
            p++;
    }
    return i == n;
}

const struct route *http_route_match(const char *method, char *path,
                                     const char *params[ROUTE_MAX_PARAMS], int *path_known)
{
    char *seg[MAX_SEGMENTS];
    int n = split(path, seg);

    *path_known = 0;
    for (int k = 0; k < ROUTE_MAX_PARAMS; k++)
        params[k] = NULL;
    if (n > MAX_SEGMENTS)
        return NULL;
    for (size_t i = 0; i < http_n_routes; i++) {
        const char *got[ROUTE_MAX_PARAMS] = {0};
        size_t lens[ROUTE_MAX_PARAMS] = {0};
        if (!path_matches(http_routes[i].pattern, seg, n, got, lens))
            continue;
        if (strcmp(http_routes[i].method, method) != 0) {
            *path_known = 1; /* another method's row */
            continue;
        }
        for (int k = 0; k < ROUTE_MAX_PARAMS; k++) {
            params[k] = got[k];
            if (got[k])
                ((char *)got[k])[lens[k]] = '\0'; /* cut a :suffix off */
        }
        return &http_routes[i];
    }
    return NULL;
}

int http_routes_print(FILE *out)
{
    for (size_t i = 0; i < http_n_routes; i++) {
        const struct route *r = &http_routes[i];
        if (fprintf(out,
                    "{\"method\":\"%s\",\"path\":\"%s\",\"scope\":\"%s\",\"thread\":\"%s\","
                    "\"worker\":%s}\n",
                    r->method, r->pattern, http_scope_name(r->scope),
                    r->thread == ON_POOL ? "pool" : "event",
                    r->flags & ROUTE_WORKER ? "true" : "false") < 0)
            return -1;
    }
    return fflush(out) == 0 ? 0 : -1;
}
