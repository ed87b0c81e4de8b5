/*
 * http_internal.h: what server.c (connections, routing, online inference) and jobs.c (the
 * async API) share. Included by src/http/ only.
 */
#ifndef INFERD_HTTP_INTERNAL_H
#define INFERD_HTTP_INTERNAL_H

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

/* Requests waiting for jobs to end (long-polls and `Prefer: wait`), by job id. */
#define WAITER_BUCKETS 1024
struct waiters {
    pthread_mutex_t lock;
    struct req *buckets[WAITER_BUCKETS]; /* guarded by lock */
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

enum req_kind { KIND_V2, KIND_V1, KIND_JOB };

/* what a waiter answers: the job (200), its result, or DELETE's answer (200 once the job is
 * final, 202 while its cancellation is still pending) */
enum wait_mode { WAIT_STATUS, WAIT_INFER, WAIT_CANCEL };

/* One HTTP request. Lives from the first access-handler call to MHD's completion callback. */
struct req {
    struct http_server *srv;
    struct MHD_Connection *conn;
    struct conn *track; /* the connection guard's entry; NULL: untracked */
    int close_after;    /* answer with Connection: close (the framing was refused) */
    int http11;         /* an HTTP/1.1 request (it may be sent a 1xx before its answer) */
    int settled;        /* the request is whole and libmicrohttpd no longer reads the socket */
    _Atomic int state;
    int too_large;
    struct buf body;
    uint64_t start_ns;
    /* set while an inference is in flight */
    enum req_kind kind;
    struct model *model;
    struct infer_request *infer;
    struct batch_item item;
    /* async: the job this request is about */
    char job_id[40];
    struct job_spec spec; /* enqueue: strings point into `json` or `body` */
    void *json;           /* the parsed body (json_t *), kept while `spec` points into it */
    char request_hash[65];
    int prefer_async;
    int64_t wait_ms; /* long-poll or Prefer: wait */
    enum wait_mode wait_mode;
    int64_t wait_deadline_ms;
    struct req *wait_next; /* in the waiters' bucket; guarded by waiters.lock */
    int list_state;        /* GET /v1/jobs filters (and POST /v1/jobs/retry's) */
    int list_cancelling;   /* -1, 0, 1: see queue_list_filter.cancelling */
    char list_model[128];
    char list_cursor[40];
    int list_limit;
    char repo_model[256]; /* POST /v2/repository/models/{m}/load|unload */
    int repo_load;
    int batch_schedule; /* POST /v1/batch-jobs: the definition has a schedule */
    /* the answer, built by whichever thread finishes the request */
    int status;
    struct buf out;
    int64_t json_len; /* Inference-Header-Content-Length, or -1 */
    int retry_after_s;
    int counted;                       /* already in the request metrics */
    char location[80];                 /* Location header; "" means none */
    const char *content_type;          /* static string; NULL means application/json */
    void (*deferred)(struct req *r);   /* what the I/O pool runs for this request */
    uint64_t ready_ns;                 /* when the answer was made ready; 0 before */
    struct req *live_prev, *live_next; /* guarded by srv->live_lock */
};

/* ---- server.c ---- */
void http_set_error(struct req *r, int code, const char *msg);
enum MHD_Result http_reply_error(struct req *r, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Marks the answer ready and resumes the suspended connection (any thread). */
void http_finish_async(struct req *r);
/* Resumes again a connection whose answer has been ready for long but which libmicrohttpd
 * still holds suspended (a lost wake-up), and logs it. Called by the waiters' timer. */
void http_watchdog(struct http_server *s);
/* Suspends the connection and runs fn(r) on the I/O pool. */
enum MHD_Result http_defer(struct req *r, void (*fn)(struct req *r));

/* ---- jobs.c ---- */
/* 1 if `id` can be a job or batch-job id (1-39 letters, digits, '-', '_'). */
int http_valid_id(const char *id);
enum MHD_Result jobs_route(struct req *r, int is_get, int is_post, int is_delete, char **seg,
                           int n);
/* POST /v2/models/{m}/infer with Prefer: respond-async (after the request checked out). */
enum MHD_Result jobs_submit_infer(struct req *r);
/* Parses a Prefer header: respond-async and wait=N. */
void jobs_parse_prefer(const char *prefer, int *respond_async, int64_t *wait_ms);
int jobs_waiters_start(struct http_server *s);
void jobs_waiters_stop(struct http_server *s);
/* The queue's final-state hook: wakes the waiters of `id`. */
void jobs_on_final(void *ctx, const char *id, enum job_state state);
/* Appends the async metrics (jobs by state, backlog per worker, webhooks). */
int jobs_metrics(struct http_server *s, struct buf *out);

/* ---- batch_api.c ---- */
enum MHD_Result batch_api_route(struct req *r, int is_get, int is_post, int is_delete,
                                char **seg, int n);

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
