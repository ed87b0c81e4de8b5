/*
 * http_internal.h: what server.c (connections, routing, online inference) and jobs.c (the
 * async API) share. Included by src/http/ only.
 */
#ifndef INFERD_HTTP_INTERNAL_H
#define INFERD_HTTP_INTERNAL_H

#include "auth/auth.h"
#include "core/buf.h"
#include "http/server.h"
#include "model/batcher.h"
#include "model/registry.h"
#include "queue/queue.h"

#include <microhttpd.h>
#include <pthread.h>
#include <stdatomic.h>

struct iopool;
struct notifier;
struct req;
struct conn;
struct conn_guard;
struct http_tls;

/* Requests waiting for jobs to end (long-polls and `Prefer: wait`), by job id (jobs.c). */
#define WAITER_BUCKETS 1024
struct job_call;
struct waiters {
    pthread_mutex_t lock;
    struct job_call *buckets[WAITER_BUCKETS]; /* guarded by lock */
    pthread_t timer;
    int timer_started;
    int stopping; /* guarded by lock */
};

struct http_server {
    struct http_config cfg; /* immutable after start */
    struct registry *reg;
    struct queue *queue;       /* NULL: the async API answers 503 */
    struct http_pool pool;     /* for Retry-After and metrics; immutable after start */
    struct notifier *notifier; /* kicked when a job ends; may be NULL */
    struct iopool *io;         /* runs blocking queue calls off the HTTP threads */
    struct waiters waiters;
    struct conn_guard *guard; /* deadlines and limits per connection (conns.c) */
    struct MHD_Daemon *daemon;
    struct http_tls *tls; /* NULL: plain HTTP (tls.c) */
    int port;
    _Atomic int draining;
    _Atomic int64_t in_flight; /* contexts between arrival and completion */
    pthread_mutex_t live_lock; /* guards the list of live requests */
    struct req *live;          /* guarded by live_lock: every request not yet completed */
};

enum req_state {
    REQ_RECEIVING = 0, /* reading the body */
    REQ_WAITING,       /* suspended: in a batcher, the I/O pool or the waiters */
    REQ_READY,         /* response encoded, connection resumed */
};

/* ---- the route table (routes.c) ---- */

/* What a handler did with its request: answered it (status, body and headers are in the
 * request, and the frame sends them) or took it on (the connection is suspended, and whoever
 * finishes it calls http_finish_async). */
enum handled { HANDLED_ANSWER = 0, HANDLED_PENDING };
typedef enum handled (*http_handler)(struct req *r);

/* the thread a handler runs on: an HTTP event thread (never blocks) or the I/O pool (may wait
 * on the job store, storage or a model load) */
enum route_thread { ON_EVENT = 0, ON_POOL };

/* what a key needs for a route; PUBLIC and METRICS need none (METRICS: unless
 * --metrics-auth, then any valid key) */
enum route_scope {
    SCOPE_PUBLIC = 0,
    SCOPE_METRICS,
    SCOPE_INFER,
    SCOPE_JOBS,
    SCOPE_BATCH,
    SCOPE_ADMIN
};

#define ROUTE_WORKER 1u /* inferd worker serves it too */
#define ROUTE_MAX_PARAMS 3

/* One row: METHOD /path/{param}/literal ({p}:suffix matches a segment ending in :suffix). */
struct route {
    const char *method;
    const char *pattern;
    enum route_scope scope;
    enum route_thread thread;
    http_handler fn;
    unsigned flags;
};

extern const struct route http_routes[];
extern const size_t http_n_routes;

/* The row for `method` and `path`, its parameters pointing into `path` (which it cuts); NULL
 * when none matches, with *path_known 1 when another method has the path. */
const struct route *http_route_match(const char *method, char *path,
                                     const char *params[ROUTE_MAX_PARAMS], int *path_known);
const char *http_scope_name(enum route_scope s);

/* a query argument or header, as the frame copies them for a route that runs on the pool */
struct req_value {
    enum MHD_ValueKind kind;
    const char *key, *value; /* libmicrohttpd's, valid until the request completes */
};

/* How the frame handles what a route keeps for the life of its request beyond the frame's own
 * fields (online.c's inference in flight, jobs.c's job and its wait). */
struct route_state_ops {
    void (*release)(void *state); /* frees it, once the request has completed */
    void (*cancel)(void *state);  /* asks its work in flight to stop (server stop); NULL: none */
};

/* One HTTP request. Lives from the first access-handler call to MHD's completion callback. */
struct req {
    struct http_server *srv;
    struct MHD_Connection *conn;
    struct conn *track;                   /* the connection guard's entry; NULL: untracked */
    const struct route *route;            /* its row of the route table; NULL: none matched */
    char *path;                           /* a copy of the path, cut into `params` */
    const char *params[ROUTE_MAX_PARAMS]; /* the pattern's {names} in order; NULL: absent */
    struct req_value *values; /* query arguments and headers, copied for a route on the pool */
    size_t n_values;
    struct auth_principal who; /* the key's; all zero without keys (the anonymous tenant) */
    int authenticated;         /* a key was checked (keys are on) */
    int close_after;           /* answer with Connection: close (the framing was refused) */
    int http11;                /* an HTTP/1.1 request (it may be sent a 1xx before its answer) */
    int settled; /* the request is whole and libmicrohttpd no longer reads the socket */
    _Atomic int state;
    int too_large;
    struct buf body;
    uint64_t start_ns;
    struct model *model; /* the model the request counts against in /metrics; NULL: none */
    /* the route's own state (http_set_route_state); its ops are published after it, so a thread
     * that walks the live requests (on stop) reads them without the handler's thread */
    void *route_state;
    _Atomic(const struct route_state_ops *) route_ops;
    /* the answer, built by whichever thread finishes the request */
    int status;
    struct buf out;
    int64_t json_len; /* Inference-Header-Content-Length, or -1 */
    int retry_after_s;
    int counted;                       /* already in the request metrics */
    char location[80];                 /* Location header; "" means none */
    const char *content_type;          /* static string; NULL means application/json */
    const char *www_authenticate;      /* static string: the 401's challenge; NULL: none */
    http_handler deferred;             /* what the I/O pool runs for this request */
    uint64_t ready_ns;                 /* when the answer was made ready; 0 before */
    struct req *live_prev, *live_next; /* guarded by srv->live_lock */
};

/* ---- server.c: the frame every handler runs in ---- */
void http_set_error(struct req *r, int code, const char *msg);
/* Counts an inference request in its model's metrics, once. */
void http_count_request(struct req *r);
/* A header's non-negative integer value; -1 when absent, with *bad 1 when not an integer. */
int64_t http_header_int(struct MHD_Connection *conn, const char *name, int *bad);
/* The tenant that owns what the request creates: its key's; NULL (anonymous) without keys. */
const char *http_owner(const struct req *r);
/* Who asks, for what it reads or changes by id or lists: NULL sees every tenant (an admin key,
 * or a server without keys); otherwise the key's tenant (queue.h, "Tenants"). */
const char *http_viewer(const struct req *r);
/* 1 if the request's key has `scope` (AUTH_*), or keys are off. */
int http_has_scope(const struct req *r, unsigned scope);
/* Sets the error answer; returns HANDLED_ANSWER, for `return http_fail(r, ...)`. */
enum handled http_fail(struct req *r, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* While the server drains: sets 503 with Retry-After 5 and returns 1 (no new work). */
int http_refuse_draining(struct req *r);
/* Sets a 200-style answer from `json` (taken); returns HANDLED_ANSWER. */
enum handled http_answer_json(struct req *r, int status, struct buf *json);
enum handled http_answer_text(struct req *r, int status, const char *json);
/* A query argument (MHD_GET_ARGUMENT_KIND) or header (MHD_HEADER_KIND) of the request, on any
 * thread the request's handler runs on; NULL when absent. */
const char *http_value(struct req *r, enum MHD_ValueKind kind, const char *key);
/* Gives the request the route's `state`, which ops->release frees at completion. A request has
 * one: a handler sets it at most once. */
void http_set_route_state(struct req *r, void *state, const struct route_state_ops *ops);
/* Marks the answer ready and resumes the suspended connection (any thread). */
void http_finish_async(struct req *r);
/* Resumes again a connection whose answer has been ready for long but which libmicrohttpd
 * still holds suspended (a lost wake-up), and logs it. Called by the waiters' timer. */
void http_watchdog(struct http_server *s);
/* Suspends the connection and runs fn(r) on the I/O pool, which sends what it answers. */
enum handled http_defer(struct req *r, http_handler fn);

/* ---- online.c: health, metadata, inference, the repository, /metrics ---- */
enum handled online_live(struct req *r);
enum handled online_ready(struct req *r);
enum handled online_server_meta(struct req *r);
enum handled online_metrics(struct req *r);
enum handled online_stats(struct req *r);
enum handled online_model_meta(struct req *r);
enum handled online_model_ready(struct req *r);
enum handled online_infer(struct req *r);
enum handled online_predict(struct req *r);
enum handled online_repo_index(struct req *r);
enum handled online_repo_load(struct req *r);
enum handled online_repo_unload(struct req *r);

/* ---- jobs.c ---- */
/* 1 if `id` can be a job or batch-job id (1-39 letters, digits, '-', '_'). */
int http_valid_id(const char *id);
enum handled jobs_submit(struct req *r);
enum handled jobs_list(struct req *r);
enum handled jobs_redrive(struct req *r);
enum handled jobs_get(struct req *r);
enum handled jobs_cancel(struct req *r);
enum handled jobs_result(struct req *r);
enum handled jobs_retry(struct req *r);
enum handled jobs_workers(struct req *r);
/* POST /v2/models/{m}/infer with Prefer: respond-async, after the request checked out against
 * r->model: it becomes a job; `wait_ms` > 0 (Prefer: wait) answers with its result if it ends
 * within that time. */
enum handled jobs_submit_infer(struct req *r, int64_t wait_ms);
/* Parses a Prefer header: respond-async and wait=N. */
void jobs_parse_prefer(const char *prefer, int *respond_async, int64_t *wait_ms);
int jobs_waiters_start(struct http_server *s);
void jobs_waiters_stop(struct http_server *s);
/* The queue's final-state hook: wakes the waiters of `id`. */
void jobs_on_final(void *ctx, const char *id, enum job_state state);
/* Appends the async metrics (jobs by state, backlog per worker, webhooks). */
int jobs_metrics(struct http_server *s, struct buf *out);

/* ---- batch_api.c ---- */
enum handled batch_api_create(struct req *r);
enum handled batch_api_list(struct req *r);
enum handled batch_api_get(struct req *r);
enum handled batch_api_cancel(struct req *r);
enum handled batch_api_run(struct req *r);
enum handled batch_api_pause(struct req *r);
enum handled batch_api_resume(struct req *r);

/* ---- framing.c ---- */
/* 0, or ERR_INVALID when the request's framing is ambiguous, with `*status` 400 (or 501 for a
 * transfer coding inferd does not decode); the connection is to be closed after the answer. */
int http_check_framing(struct MHD_Connection *conn, const char *version, int *status,
                       struct err *e);

/* ---- conns.c ---- */
enum conn_phase { CONN_WAITING = 0, CONN_HEADERS, CONN_BODY, CONN_BUSY };
enum conn_close_reason {
    CONN_CLOSE_IDLE = 0, /* no request begun within --idle-timeout-s */
    CONN_CLOSE_HEADERS,  /* headers not whole within --header-timeout-s */
    CONN_CLOSE_BODY,     /* body slower than --body-min-bytes-per-s */
    CONN_CLOSE_EVICTED,  /* closed to make room at --max-connections */
    CONN_N_CLOSE_REASONS
};
enum conn_refuse_reason { CONN_REFUSE_LIMIT = 0, CONN_REFUSE_CLIENT_LIMIT, CONN_N_REFUSE_REASONS };

/* Starts the guard's sweeper thread; -1 if it cannot. */
int conns_create(const struct http_config *cfg, struct conn_guard **out);
/* Stops the sweeper and frees; call after the daemon has stopped. NULL does nothing. */
void conns_destroy(struct conn_guard *g);
/* libmicrohttpd's accept policy (cls: the guard): refuses a client at its cap, and at the
 * connection limit closes the oldest idle connection to make room (refuses if none is idle). */
enum MHD_Result conns_accept(void *cls, const struct sockaddr *addr, socklen_t len);
/* libmicrohttpd's connection start/close notification (cls: the guard). */
void conns_notify(void *cls, struct MHD_Connection *connection, void **socket_context,
                  enum MHD_ConnectionNotificationCode toe);
/* The guard's entry of a connection (borrowed until the connection closes), or NULL. */
struct conn *conns_of(struct MHD_Connection *connection);
/* Moves a connection to `phase`, which starts that phase's deadline (connection's thread). */
void conns_phase(struct conn_guard *g, struct conn *c, enum conn_phase phase);
/* Counts body bytes received, which extend the body's deadline (connection's thread). */
void conns_body_bytes(struct conn *c, size_t n);
/* The current request's line held a %00 (a NUL once decoded); reset when the next begins. */
void conns_mark_bad_uri(struct conn *c);
int conns_bad_uri(const struct conn *c);
/* Appends the connection metrics. Returns 0 or ERR_NOMEM. */
int conns_metrics(struct conn_guard *g, struct buf *out);

/* ---- tls.c ---- */
/* Loads cfg->tls_cert, tls_key and tls_client_ca (if set): 0, or an error naming the option and
 * the file. One per process (see tls.c). */
int tls_create(const struct http_config *cfg, struct http_tls **out, struct err *e);
/* Re-reads the files; the next handshake uses them. On error the old ones keep serving. */
int tls_reload(struct http_tls *t, struct err *e);
/* Call after the daemon has stopped. NULL does nothing. */
void tls_destroy(struct http_tls *t);
/* Fills libmicrohttpd's options for `t` (an empty list when NULL) and returns the daemon flags
 * to add (MHD_USE_TLS or 0). `opts` must outlive MHD_start_daemon(). */
unsigned tls_daemon_options(struct http_tls *t, struct MHD_OptionItem opts[3]);

/* ---- iopool.c ---- */
int iopool_create(int threads, struct iopool **out);
void iopool_run(struct iopool *p, void (*fn)(void *arg), void *arg);
void iopool_destroy(struct iopool *p);

#endif
