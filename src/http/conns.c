/*
 * conns.c: the connection guard: deadlines that no trickle of bytes can extend, room made for
 * newcomers at the connection limit, and a cap per client address.
 *
 * libmicrohttpd's own timeout counts from the last byte, so a client sending one byte a second
 * held a connection for ever, and at --max-connections it refused newcomers while idle
 * keep-alive connections sat on every slot. Here each connection is in one phase:
 *
 *   WAITING  no request begun: new, or kept alive between requests. Closed --idle-timeout-s
 *            after the phase began, however many bytes of a request line trickle in.
 *   HEADERS  its request line is in; the headers must be whole --header-timeout-s after it.
 *   BODY     its headers are in; the body gets --header-timeout-s plus one second per
 *            --body-min-bytes-per-s bytes received (a minimum rate after a grace period).
 *   BUSY     the request is complete: in a model, the queue or sending. No deadline here (a
 *            suspended connection is waiting for inferd, not for the client).
 *
 * WAITING, HEADERS and BODY connections are kept on one list each, in the order they entered
 * it, so the sweeper (one thread, every SWEEP_MS) stops at the first connection still within
 * its deadline, and at the limit the accept callback closes the oldest WAITING connection (then
 * the oldest HEADERS one) to make room. Closing is shutdown(SHUT_RDWR) on the socket:
 * libmicrohttpd sees the end of the stream and frees the connection on its own thread.
 * libmicrohttpd reports MHD_CONNECTION_NOTIFY_CLOSED before it closes the descriptor, and the
 * entry leaves the lists under `lock` there, so a shutdown() never reaches a reused descriptor.
 *
 * A client's connections are counted when libmicrohttpd reports them started, after the accept
 * callback passed them, so two accepted at the same instant on two HTTP threads may both pass:
 * --max-connections-per-client holds to within one per HTTP thread, which is all a cap against
 * one client holding thousands needs (libmicrohttpd's own exact per-address limit refuses
 * without a word, and a refusal here is logged and counted).
 *
 * Threads: libmicrohttpd's threads call the accept, notify and phase functions; the sweeper
 * thread walks the lists. Everything below is guarded by `guard->lock` unless it says
 * otherwise; the lock is a leaf (nothing else is taken while it is held) and is never held
 * across anything but shutdown() and a log line.
 */
#define _GNU_SOURCE
#include "http/http_internal.h"
#include "core/clock.h"
#include "core/log.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define SWEEP_MS 100
#define CLIENT_BUCKETS 4096
#define LOG_EVERY_NS (10ull * 1000000000ull) /* a refusal or a cut-off is logged once a burst */

enum { N_LISTS = CONN_BUSY }; /* WAITING, HEADERS and BODY have lists */

/* Connections from one address. */
struct conn_client {
    uint32_t addr; /* IPv4, network byte order */
    int n;         /* open connections from it */
    struct conn_client *next;
};

struct conn {
    int fd;
    uint32_t addr;
    char addr_text[INET_ADDRSTRLEN];
    enum conn_phase phase;
    uint64_t since_ns;           /* when the phase began */
    _Atomic uint64_t body_bytes; /* BODY: bytes received; written by the MHD thread */
    int closing;                 /* shut down by the guard; leaves when MHD closes it */
    int bad_uri;                 /* the MHD thread's own: the request line had a %00 */
    struct conn *prev, *next;    /* in lists[phase] unless BUSY or closing */
};

enum log_kind { LOG_LIMIT, LOG_CLIENT_LIMIT, LOG_HEADER, LOG_BODY, N_LOG_KINDS };

struct conn_guard {
    /* immutable after start: no lock */
    int max_connections;
    int max_per_client; /* 0: no cap */
    uint64_t idle_ns, header_ns;
    int64_t body_min_rate; /* bytes/s */
    pthread_mutex_t lock;
    pthread_cond_t wake;
    int stopping;
    pthread_t thread;
    int thread_started;
    struct conn *head[N_LISTS], *tail[N_LISTS];
    size_t n_open;    /* tracked connections */
    size_t n_closing; /* shut down by the guard and not yet freed by MHD */
    struct conn_client *clients[CLIENT_BUCKETS];
    uint64_t last_log_ns[N_LOG_KINDS];
    uint64_t quiet[N_LOG_KINDS]; /* events since the last line of that kind */
    /* for /metrics: read without the lock */
    _Atomic uint64_t closed[CONN_N_CLOSE_REASONS];
    _Atomic uint64_t refused[CONN_N_REFUSE_REASONS];
};

static const char *close_reason_name[CONN_N_CLOSE_REASONS] = {
    [CONN_CLOSE_IDLE] = "idle_timeout",
    [CONN_CLOSE_HEADERS] = "header_timeout",
    [CONN_CLOSE_BODY] = "body_too_slow",
    [CONN_CLOSE_EVICTED] = "evicted_idle",
};

static const char *refuse_reason_name[CONN_N_REFUSE_REASONS] = {
    [CONN_REFUSE_LIMIT] = "limit",
    [CONN_REFUSE_CLIENT_LIMIT] = "client_limit",
};

/* ---- lists and clients (lock held) ---- */

static void list_unlink(struct conn_guard *g, struct conn *c)
{
    int l = (int)c->phase;

    if (c->closing || l >= N_LISTS)
        return;
    if (c->prev)
        c->prev->next = c->next;
    else
        g->head[l] = c->next;
    if (c->next)
        c->next->prev = c->prev;
    else
        g->tail[l] = c->prev;
    c->prev = c->next = NULL;
}

static void list_append(struct conn_guard *g, struct conn *c)
{
    int l = (int)c->phase;

    if (c->closing || l >= N_LISTS)
        return;
    c->next = NULL;
    c->prev = g->tail[l];
    if (g->tail[l])
        g->tail[l]->next = c;
    else
        g->head[l] = c;
    g->tail[l] = c;
}

static struct conn_client **client_slot(struct conn_guard *g, uint32_t addr)
{
    struct conn_client **pp = &g->clients[(addr * 2654435761u) % CLIENT_BUCKETS];

    while (*pp && (*pp)->addr != addr)
        pp = &(*pp)->next;
    return pp;
}

static int client_count(struct conn_guard *g, uint32_t addr)
{
    struct conn_client *cl = *client_slot(g, addr);

    return cl ? cl->n : 0;
}

static void client_add(struct conn_guard *g, uint32_t addr, int delta)
{
    struct conn_client **pp = client_slot(g, addr), *cl = *pp;

    if (!cl) {
        if (delta < 0 || !(cl = calloc(1, sizeof(*cl))))
            return; /* out of memory: the address goes uncounted, which only loosens its cap */
        cl->addr = addr;
        *pp = cl;
    }
    cl->n += delta;
    if (cl->n <= 0) {
        *pp = cl->next;
        free(cl);
    }
}

/* 1 when a line of this kind may be written now; counts the ones kept quiet. */
static int may_log(struct conn_guard *g, enum log_kind k, uint64_t now, uint64_t *quiet)
{
    if (g->last_log_ns[k] && now - g->last_log_ns[k] < LOG_EVERY_NS) {
        g->quiet[k]++;
        return 0;
    }
    *quiet = g->quiet[k];
    g->quiet[k] = 0;
    g->last_log_ns[k] = now;
    return 1;
}

/* Shuts the connection down; libmicrohttpd closes and frees it on its own thread. */
static void close_conn(struct conn_guard *g, struct conn *c, enum conn_close_reason why)
{
    list_unlink(g, c);
    c->closing = 1;
    g->n_closing++;
    atomic_fetch_add(&g->closed[why], 1);
    shutdown(c->fd, SHUT_RDWR);
}

/* ---- libmicrohttpd callbacks ---- */

enum MHD_Result conns_accept(void *cls, const struct sockaddr *addr, socklen_t len)
{
    struct conn_guard *g = cls;
    uint32_t ip = 0;
    enum MHD_Result ok = MHD_YES;
    uint64_t now = clock_mono_ns(), quiet;
    char text[INET_ADDRSTRLEN] = "?";

    if (addr && addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in))
        ip = ((const struct sockaddr_in *)(const void *)addr)->sin_addr.s_addr;
    pthread_mutex_lock(&g->lock);
    if (g->max_per_client > 0 && client_count(g, ip) >= g->max_per_client) {
        atomic_fetch_add(&g->refused[CONN_REFUSE_CLIENT_LIMIT], 1);
        if (may_log(g, LOG_CLIENT_LIMIT, now, &quiet)) {
            inet_ntop(AF_INET, &ip, text, sizeof(text));
            log_warn("http", "per-client connection limit reached: connection refused",
                     "client=%s limit=%d refused_since_last_line=%llu", text, g->max_per_client,
                     (unsigned long long)quiet);
        }
        ok = MHD_NO;
    } else if (g->n_open - g->n_closing >= (size_t)g->max_connections) {
        /* make room: the connection idle longest, else the slowest to send its headers */
        struct conn *victim = g->head[CONN_WAITING] ? g->head[CONN_WAITING] : g->head[CONN_HEADERS];
        if (victim) {
            close_conn(g, victim, CONN_CLOSE_EVICTED);
        } else {
            atomic_fetch_add(&g->refused[CONN_REFUSE_LIMIT], 1);
            ok = MHD_NO;
        }
        if (may_log(g, LOG_LIMIT, now, &quiet))
            log_warn("http",
                     victim ? "connection limit reached: closing the oldest idle connections "
                              "to make room"
                            : "connection limit reached with every connection busy: "
                              "connection refused",
                     "limit=%d open=%zu evicted=%llu refused=%llu events_since_last_line=%llu",
                     g->max_connections, g->n_open,
                     (unsigned long long)atomic_load(&g->closed[CONN_CLOSE_EVICTED]),
                     (unsigned long long)atomic_load(&g->refused[CONN_REFUSE_LIMIT]),
                     (unsigned long long)quiet);
    }
    pthread_mutex_unlock(&g->lock);
    return ok;
}

void conns_notify(void *cls, struct MHD_Connection *connection, void **socket_context,
                  enum MHD_ConnectionNotificationCode toe)
{
    struct conn_guard *g = cls;
    struct conn *c;

    if (toe == MHD_CONNECTION_NOTIFY_STARTED) {
        const union MHD_ConnectionInfo *fd =
            MHD_get_connection_info(connection, MHD_CONNECTION_INFO_CONNECTION_FD);
        const union MHD_ConnectionInfo *ad =
            MHD_get_connection_info(connection, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
        *socket_context = NULL;
        if (!fd || !(c = calloc(1, sizeof(*c))))
            return; /* untracked: only libmicrohttpd's own timeout applies to it */
        c->fd = fd->connect_fd;
        if (ad && ad->client_addr && ad->client_addr->sa_family == AF_INET)
            c->addr = ((const struct sockaddr_in *)(const void *)ad->client_addr)->sin_addr.s_addr;
        inet_ntop(AF_INET, &c->addr, c->addr_text, sizeof(c->addr_text));
        pthread_mutex_lock(&g->lock);
        c->phase = CONN_WAITING;
        c->since_ns = clock_mono_ns();
        list_append(g, c);
        g->n_open++;
        client_add(g, c->addr, 1);
        pthread_mutex_unlock(&g->lock);
        *socket_context = c;
        return;
    }
    c = *socket_context;
    if (!c)
        return;
    pthread_mutex_lock(&g->lock);
    list_unlink(g, c);
    if (c->closing)
        g->n_closing--;
    g->n_open--;
    client_add(g, c->addr, -1);
    pthread_mutex_unlock(&g->lock);
    free(c);
    *socket_context = NULL;
}

/* ---- phases (libmicrohttpd's thread of the connection) ---- */

struct conn *conns_of(struct MHD_Connection *connection)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(connection, MHD_CONNECTION_INFO_SOCKET_CONTEXT);

    return ci ? (struct conn *)ci->socket_context : NULL;
}

void conns_phase(struct conn_guard *g, struct conn *c, enum conn_phase phase)
{
    if (!c || c->phase == phase)
        return;
    pthread_mutex_lock(&g->lock);
    list_unlink(g, c);
    c->phase = phase;
    c->since_ns = clock_mono_ns();
    if (phase == CONN_WAITING) {
        atomic_store(&c->body_bytes, 0);
        c->bad_uri = 0;
    }
    list_append(g, c);
    pthread_mutex_unlock(&g->lock);
}

void conns_body_bytes(struct conn *c, size_t n)
{
    if (c)
        atomic_fetch_add_explicit(&c->body_bytes, n, memory_order_relaxed);
}

void conns_mark_bad_uri(struct conn *c)
{
    if (c)
        c->bad_uri = 1;
}

int conns_bad_uri(const struct conn *c)
{
    return c && c->bad_uri;
}

/* ---- the sweeper ---- */

static void sweep(struct conn_guard *g, uint64_t now)
{
    struct conn *c, *next;
    uint64_t quiet;

    while ((c = g->head[CONN_WAITING]) && now - c->since_ns > g->idle_ns)
        close_conn(g, c, CONN_CLOSE_IDLE);
    while ((c = g->head[CONN_HEADERS]) && now - c->since_ns > g->header_ns) {
        if (may_log(g, LOG_HEADER, now, &quiet))
            log_info("http", "header deadline passed: connection closed",
                     "client=%s header_timeout_s=%llu closed_since_last_line=%llu", c->addr_text,
                     (unsigned long long)(g->header_ns / 1000000000ull), (unsigned long long)quiet);
        close_conn(g, c, CONN_CLOSE_HEADERS);
    }
    for (c = g->head[CONN_BODY]; c; c = next) {
        uint64_t got = atomic_load_explicit(&c->body_bytes, memory_order_relaxed);
        uint64_t allowed = g->header_ns + got * 1000000000ull / (uint64_t)g->body_min_rate;
        next = c->next;
        if (now - c->since_ns <= allowed)
            continue;
        if (may_log(g, LOG_BODY, now, &quiet))
            log_info("http", "request body too slow: connection closed",
                     "client=%s bytes=%llu seconds=%.1f min_bytes_per_s=%lld "
                     "closed_since_last_line=%llu",
                     c->addr_text, (unsigned long long)got, (double)(now - c->since_ns) / 1e9,
                     (long long)g->body_min_rate, (unsigned long long)quiet);
        close_conn(g, c, CONN_CLOSE_BODY);
    }
}

static void *sweeper_main(void *arg)
{
    struct conn_guard *g = arg;

    pthread_mutex_lock(&g->lock);
    while (!g->stopping) {
        struct timespec ts = clock_realtime_after_ms(SWEEP_MS);
        pthread_cond_timedwait(&g->wake, &g->lock, &ts);
        if (!g->stopping)
            sweep(g, clock_mono_ns());
    }
    pthread_mutex_unlock(&g->lock);
    return NULL;
}

/* ---- life cycle and metrics ---- */

int conns_create(const struct http_config *cfg, struct conn_guard **out)
{
    struct conn_guard *g = calloc(1, sizeof(*g));

    *out = NULL;
    if (!g)
        return -1;
    g->max_connections = cfg->max_connections;
    g->max_per_client = cfg->max_connections_per_client;
    g->idle_ns = (uint64_t)cfg->idle_timeout_s * 1000000000ull;
    g->header_ns =
        (uint64_t)(cfg->header_timeout_s > 0 ? cfg->header_timeout_s : 10) * 1000000000ull;
    g->body_min_rate = cfg->body_min_bytes_per_s > 0 ? cfg->body_min_bytes_per_s : 1024;
    pthread_mutex_init(&g->lock, NULL);
    pthread_cond_init(&g->wake, NULL);
    if (pthread_create(&g->thread, NULL, sweeper_main, g) != 0) {
        pthread_cond_destroy(&g->wake);
        pthread_mutex_destroy(&g->lock);
        free(g);
        return -1;
    }
    g->thread_started = 1;
    *out = g;
    return 0;
}

void conns_destroy(struct conn_guard *g)
{
    if (!g)
        return;
    pthread_mutex_lock(&g->lock);
    g->stopping = 1;
    pthread_cond_signal(&g->wake);
    pthread_mutex_unlock(&g->lock);
    if (g->thread_started)
        pthread_join(g->thread, NULL);
    for (int b = 0; b < CLIENT_BUCKETS; b++) {
        while (g->clients[b]) {
            struct conn_client *next = g->clients[b]->next;
            free(g->clients[b]);
            g->clients[b] = next;
        }
    }
    pthread_cond_destroy(&g->wake);
    pthread_mutex_destroy(&g->lock);
    free(g);
}

int conns_metrics(struct conn_guard *g, struct buf *out)
{
    size_t open;
    int rc;

    pthread_mutex_lock(&g->lock);
    open = g->n_open;
    pthread_mutex_unlock(&g->lock);
    rc = buf_printf(out,
                    "# HELP inferd_connections_open Client connections open now.\n"
                    "# TYPE inferd_connections_open gauge\ninferd_connections_open %zu\n"
                    "# HELP inferd_connections_closed_total Connections inferd closed, by "
                    "reason.\n# TYPE inferd_connections_closed_total counter\n",
                    open);
    for (int i = 0; rc == 0 && i < CONN_N_CLOSE_REASONS; i++)
        rc = buf_printf(out, "inferd_connections_closed_total{reason=\"%s\"} %llu\n",
                        close_reason_name[i], (unsigned long long)atomic_load(&g->closed[i]));
    if (rc == 0)
        rc = buf_puts(out, "# HELP inferd_connections_refused_total Connections refused when "
                           "accepted, by reason.\n"
                           "# TYPE inferd_connections_refused_total counter\n");
    for (int i = 0; rc == 0 && i < CONN_N_REFUSE_REASONS; i++)
        rc = buf_printf(out, "inferd_connections_refused_total{reason=\"%s\"} %llu\n",
                        refuse_reason_name[i], (unsigned long long)atomic_load(&g->refused[i]));
    return rc;
}
