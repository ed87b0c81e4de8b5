/*
 * internal.h: what the files of the Redis queue share; included by src/queue/redis/ only.
 *
 * The files, by what they hold:
 *   conn.c     connecting, the connection pool, Redis's up/down notes, loading the script,
 *              opening and closing, the sweeper and subscriber threads
 *   call.c     calling the script (its arguments, one call, one pooled call) and reading replies
 *   jobs.c     jobs: enqueue (and the asynchronous enqueue thread), lease, extend, finish,
 *              cancel, retry, get, list, counts
 *   workers.c  workers and their heartbeats
 *   outbox.c   webhooks: taking due ones (their bodies built once), recording attempts
 *   batch.c    batch jobs and schedules
 *   tls.c      rediss://: TLS connections bridged to hiredis (a pump thread each)
 *   url.c      the URL, read into a struct rq_url (no I/O: the fuzz target calls it)
 *   queue.lua  the script: every change, atomic (embedded by CMakeLists.txt as queue_redis_lua)
 *
 * Threads and locks: any thread may call the store (the ops tables); each call takes a pooled
 * connection (pool_lock, held only to take or give one) and uses it alone. `lock` guards the
 * asynchronous enqueues, the lost lease tickets and `stopping`; it is never held across a
 * Redis call, and the two locks are never held together.
 *
 * The job queue on Redis Streams, shared by any number of processes.
 *
 * Every change is one call of queue.lua (atomic: Redis runs a script alone), so the
 * guarantees are the SQLite queue's: a job is stored (and on its priority's stream) before
 * enqueue returns, a lease counts the attempt first, complete/fail/extend are fenced by the
 * attempt number, and a final state, its webhook and its wake-up are one step. Workers read
 * the streams through the consumer group "workers"; a sweeper in every process reclaims the
 * entries of attempts whose lease ran out (XAUTOCLAIM), so a crashed worker's jobs run again.
 *
 * Connections: a small pool of blocking hiredis contexts, each used by one thread at a time;
 * one more connection subscribes to the final-state channel (long-polls) and one pipelines
 * the asynchronous enqueues of HTTP threads. A lost connection is reconnected on next use;
 * meanwhile calls fail with ERR_UNAVAILABLE (the API answers 503 with Retry-After).
 *
 * Redis dying mid-call: a call's change may have happened though its answer never came. The
 * jobs of a lease whose answer was lost go back to the queue on the worker's next lease
 * (lease tickets, in jobs.c); an outcome or webhook attempt that was not answered is sent again
 * by its caller, and fencing makes the repeat harmless.
 */
#ifndef INFERD_QUEUE_REDIS_INTERNAL_H
#define INFERD_QUEUE_REDIS_INTERNAL_H

#include "queue/redis/redis.h"

#include <hiredis/hiredis.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#define POOL_SIZE 32
#define SWEEP_MS 1000
#define RECLAIM_MIN_IDLE_MS 1000
#define OUTBOX_HOLD_MS 60000 /* a taken webhook is someone's for this long */
#define CONNECT_TIMEOUT_MS 3000
#define COMMAND_TIMEOUT_MS 10000
#define LOST_LEASES 64        /* workers whose last lease answer was lost, remembered */
#define LEASE_NOTE_MS 3600000 /* how long Redis keeps what a worker's last lease handed out */
#define WORKER_NAME_MAX 95

extern const char queue_redis_lua[]; /* queue.lua, embedded by CMakeLists.txt */

struct async_op {
    struct job_spec spec;
    char id[40];
    struct buf fields; /* unused: spec is borrowed until the callback */
    queue_enqueue_fn fn;
    void *ctx;
    struct async_op *next;
};

/* A worker's lease call whose answer never came: its ticket goes with the worker's next call. */
struct lost_lease {
    char worker[WORKER_NAME_MAX + 1]; /* "": a free entry */
    char ticket[40];
};

struct redis_queue {
    struct queue base;
    struct queue_config cfg; /* immutable after open: no lock */
    char host[256];          /* immutable after open (the URL): no lock */
    int port, db;            /* immutable after open (the URL): no lock */
    char prefix[64];         /* immutable after open: no lock */
    char sha[41];            /* of the script; immutable after open: no lock */
    char name[96];           /* this process: host/pid; immutable after open: no lock */
    /* immutable after open (the URL): the URL's user and password ("": none; AUTH after
     * connecting), and the TLS context of rediss:// (NULL: plain TCP). Never logged. */
    char user[128], password[512];
    SSL_CTX *tls;

    pthread_mutex_t pool_lock;     /* held only to take or give a connection, never across a call */
    redisContext *pool[POOL_SIZE]; /* guarded by pool_lock: idle connections */
    int n_idle;                    /* guarded by pool_lock */

    pthread_mutex_t lock;      /* never held across a Redis call, nor with pool_lock */
    pthread_cond_t cond;       /* stopping (the sweeper and subscriber wait on it) */
    pthread_cond_t async_cond; /* enqueues arrived, or stopping */
    int stopping;              /* guarded by lock; set once, by r_close() */
    int subscribed;            /* guarded by lock: the subscriber listens (signalled on cond) */
    /* guarded by lock: pushed by HTTP threads (r_enqueue_async), taken by rq_async_main */
    struct async_op *async_head, *async_tail;
    /* started by queue_redis_open(), joined by r_close(): those two only, no lock */
    pthread_t async_thread, sweeper, subscriber;
    int threads_started; /* how many of async_thread, sweeper, subscriber (in order) started;
                            open and close only: no lock */
    /* guarded by lock: workers whose lease call was sent and never answered (worker threads,
     * in r_lease_many) */
    struct lost_lease lost[LOST_LEASES];
    /* atomic: set by any thread whose call found Redis down or up (rq_note_down/rq_note_up),
     * read by r_enqueue_async and the sweeper */
    _Atomic int64_t down_since_ms; /* 0 while Redis answers */
    _Atomic int64_t up_since_ms;   /* when Redis last became reachable (or the queue opened) */
};

/* The store behind the queue's ops: `q` is always a struct redis_queue. */
static inline struct redis_queue *rq(struct queue *q)
{
    return (struct redis_queue *)q;
}

/* ---- the URL (url.c) ---- */

/* What --queue redis[s]://[[USER]:PASSWORD@][host][:port][/db][?ca=&cert=&key=] says. */
struct rq_url {
    char host[256];     /* never "": 127.0.0.1 when the URL has none */
    int port;           /* 1..65535; 6379 when the URL has none */
    int db;             /* 0..1000; 0 when the URL has none */
    char user[128];     /* "": none (AUTH with the password alone) */
    char password[512]; /* "": none (no AUTH); a secret, never shown */
    char ca[1024];      /* rediss:// only: PEM files; "": none (the system's CAs) */
    char cert[1024], key[1024];
    int tls; /* 1 for rediss:// */
};

/*
 * Reads `url` (borrowed; it starts with redis:// or rediss://) into `*out`, which the caller
 * owns and clears with rq_url_release() (it wipes the password). No I/O. Returns 0 or
 * ERR_INVALID with `e` naming the part of the URL that is wrong (the URL shown with its
 * userinfo masked); on failure `*out` holds no password.
 */
int rq_url_parse(const char *url, struct rq_url *out, struct err *e);
void rq_url_release(struct rq_url *u);

/* ---- TLS (tls.c) ---- */

/* A client TLS context verifying the server against `ca` (a PEM file; NULL or "": the system's
 * CAs), with a client certificate when `cert` and `key` are given. Errors name the file. */
int rq_tls_create(const char *ca, const char *cert, const char *key, SSL_CTX **out, struct err *e);
/* Connects to host:port over TLS and returns, in *fd_out, a socket for hiredis
 * (redisConnectFd) bridged to it; the bridge ends when either side closes. */
int rq_tls_connect(SSL_CTX *ctx, const char *host, int port, int timeout_ms, int *fd_out,
                   struct err *e);

/* ---- connections (conn.c) ---- */

/* A new connection, the database selected and the script loaded; NULL (and `e`) if not. */
redisContext *rq_connect_redis(struct redis_queue *q, struct err *e);
/* Redis stopped answering (`why`), or answers again: logged once per change. */
void rq_note_down(struct redis_queue *q, const char *why);
void rq_note_up(struct redis_queue *q);
/* A connection of the pool (or a new one) for this thread alone; NULL (and `e`) if Redis is
 * unreachable. Give it back with rq_give_conn(). */
redisContext *rq_take_conn(struct redis_queue *q, struct err *e);
void rq_give_conn(struct redis_queue *q, redisContext *c);

/* ---- calling the script and reading replies (call.c) ---- */

struct args {
    const char *v[64];
    size_t len[64];
    char store[64][32]; /* numbers formatted here */
    int n;
};

/* Appends a string (NULL: ""), `len` bytes, or a number to a script call's arguments;
 * `s` is borrowed until the call. */
void rq_arg(struct args *a, const char *s);
void rq_arg_bin(struct args *a, const char *s, size_t len);
void rq_arg_int(struct args *a, int64_t v);
void rq_script_args(struct redis_queue *q, struct args *a, const char *op);
/* The reply (freed with freeReplyObject), or NULL and `e` (ERR_UNAVAILABLE, ERR_IO). */
redisReply *rq_call(struct redis_queue *q, redisContext *c, struct args *a, struct err *e);
redisReply *rq_run(struct redis_queue *q, struct args *a, struct err *e);
/* 0 and `*v` if `r` is an integer, else -1. */
int rq_int_reply(redisReply *r, int64_t *v);
/* A field of an HGETALL reply: borrowed from `h`, NULL if absent; as a number (0 if absent);
 * as a new string (NULL if absent or empty). */
const char *rq_hget(const redisReply *h, const char *name, size_t *len);
int64_t rq_hget_int(const redisReply *h, const char *name);
char *rq_hget_dup(const redisReply *h, const char *name);

/* ---- jobs (jobs.c, workers.c) ---- */

extern const struct queue_job_ops rq_job_ops;
/* A new id: the time in ms, then random bits. */
/* Job `id` into `*out` (freed with job_free), with its input / result if asked. */
int rq_load_job(struct redis_queue *q, redisContext *c, const char *id, int with_input,
                int with_result, struct job **out, struct err *e);
int rq_load_history(struct redis_queue *q, redisContext *c, struct job *j);
/* The thread that pipelines the asynchronous enqueues; `self` is the struct redis_queue. */
void *rq_async_main(void *self);
int rq_worker_beat(struct queue *qb, const struct queue_worker *w, struct err *e);
int rq_worker_leave(struct queue *qb, const char *id, struct err *e);
int rq_workers_list(struct queue *qb, struct queue_worker **out, size_t *n, struct err *e);

/* ---- webhooks (outbox.c) and batch jobs (batch.c) ---- */

extern const struct queue_outbox_ops rq_outbox_ops;
extern const struct queue_batch_ops rq_batch_ops;
/* A batch job's webhook event, as queue_batch_event_json writes it, into `out`. */
int rq_batch_event_json(struct redis_queue *q, redisContext *c, const char *id,
                        const char *event_id, struct buf *out, struct err *e);

#endif
