/*
 * server.h: `inferd serve`'s HTTP front door (KServe v2 REST, v1 predict, repository control,
 * health and metrics) on libmicrohttpd.
 */
#ifndef INFERD_SERVER_H
#define INFERD_SERVER_H

#include "core/err.h"

#include <stdint.h>
#include <stdio.h>

struct registry;
struct queue;
struct notifier;
struct auth;

struct http_config {
    const char *host;               /* the address listened on, for logs and metrics */
    int listen_fd;                  /* from http_listen(); the server owns it once started */
    int threads;                    /* HTTP threads (epoll each); 0 means one per CPU */
    int64_t max_body_bytes;         /* larger bodies get 413 */
    int max_connections;            /* past it, the oldest idle connection is closed for room */
    int max_connections_per_client; /* connections from one address; 0: no cap */
    int idle_timeout_s;             /* a connection with no request begun this long is closed */
    int header_timeout_s;           /* a request's headers must be whole this long after its line */
    int64_t body_min_bytes_per_s;   /* after header_timeout_s of grace, the body's slowest rate */
    int drain_timeout_s;            /* how long shutdown waits for in-flight requests */
    int io_threads;                 /* threads for blocking job-store calls; 0 means 8 */
    int64_t default_max_attempts;   /* async jobs that do not say */
    int64_t default_ttl_s;          /* 0: jobs never expire while queued */
    int workers;                    /* the async worker pool's size, for metrics */
    int worker_only;                /* inferd worker: only metrics and health */
    int64_t max_input_bytes;        /* a job's input_location (and a result read back from its
                                     * output_location) past this is refused, > 0 */
    struct auth *auth;              /* API keys (borrowed, outlives the server); NULL: none */
    int metrics_auth;               /* /metrics wants a key too */
    const char *tls_cert;           /* PEM chain: HTTPS on the port; NULL or "": plain HTTP */
    const char *tls_key;            /* PEM private key of tls_cert's first certificate */
    const char *tls_client_ca;      /* PEM CAs that must sign client certificates; NULL: none */
};

/*
 * What the server reads of this process's async worker pool, for Retry-After and /metrics.
 * The pool lives in src/worker/, a front door beside this one that http/ does not include:
 * main.c fills this with worker_pool_busy(), worker_pool_size() and
 * worker_pool_drain_rate(). `pool` NULL (or a NULL function): no pool, each reads as 0.
 * The functions are called from any HTTP or I/O thread.
 */
struct http_pool {
    void *pool;
    int (*busy)(void *pool);          /* jobs running now */
    int (*size)(void *pool);          /* workers running now */
    double (*drain_rate)(void *pool); /* completed jobs per second lately */
};

struct http_server;

/* Binds and listens on host:port (IPv4; port 0 picks a free port), so the port is known to be
 * this process's before anything else starts. A port in use is an error naming it unless
 * `reuse_port` asks to share it with other processes (SO_REUSEPORT: the kernel spreads new
 * connections between them). *bound_port is the port bound. */
int http_listen(const char *host, int port, int reuse_port, int *fd, int *bound_port,
                struct err *e);

/* Starts serving on cfg->listen_fd (closed here on failure). `reg`, `q` and `pool->pool` are
 * borrowed and must outlive the server (`pool` itself is copied); `q` NULL disables the async
 * API (503), `pool` may be NULL. */
int http_server_start(const struct http_config *cfg, struct registry *reg, struct queue *q,
                      const struct http_pool *pool, struct notifier *notifier,
                      struct http_server **out, struct err *e);

/* Prints the route table, one JSON object per line ({"method", "path", "scope", "thread",
 * "worker"}). 0, or -1 on a write error. */
int http_routes_print(FILE *out);

/* The port actually bound (useful with port 0). */
int http_server_port(const struct http_server *s);

/* Re-reads --tls-cert, --tls-key and --tls-client-ca (SIGHUP): new handshakes use them, open
 * connections stay. 0 (also without TLS), or the error naming the bad file: then the old
 * certificates keep serving. Main thread. */
int http_server_reload_tls(struct http_server *s, struct err *e);
/* 1 if the server speaks HTTPS. */
int http_server_is_tls(const struct http_server *s);

/*
 * Graceful stop: readiness turns 503, new work gets 503 with Retry-After, the listening socket
 * closes, in-flight requests finish (up to drain_timeout_s); inferences still running then are
 * cancelled (a stuck upstream call is aborted) and answered, then the server is freed.
 * Returns 0, or how many requests were still waiting a short grace later (on a model that
 * ignores cancellation): then the server, and the registry and queue it uses, stay allocated
 * (the process is on its way out). NULL is fine.
 */
int http_server_stop(struct http_server *s);

#endif
