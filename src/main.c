/*
 * main.c: the inferd command line. Parses arguments into a configuration and calls one module.
 *
 *   inferd serve [options]     the online server (KServe v2 REST)
 *   inferd --version | --help | COMMAND --help
 *
 * Every option of a command is one row of its table below: name, default (parsed by the same
 * code as user input), bounds and one line of help. The README's configuration reference
 * mirrors these tables (tests/integration/test_docs.py checks that).
 */
#define _GNU_SOURCE
#include "auth/auth.h"
#include "core/err.h"
#include "core/url.h"
#include "core/log.h"
#include "http/server.h"
#include "model/registry.h"
#include "queue/queue.h"
#include "worker/worker.h"
#include "notify/notify.h"
#include "batch/batch.h"
#include "storage/storage.h"
#include "batch/batch_jobs.h"

#include <arpa/inet.h>
#include <errno.h>
#include <execinfo.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#ifndef INFERD_VERSION
#define INFERD_VERSION "0.0.0"
#endif

enum opt_kind { OPT_STR, OPT_INT, OPT_FLAG };

/* which commands take an option of the serve/worker table (0: every command of its table) */
#define SERVE 1u
#define WORKER 2u
#define BOTH (SERVE | WORKER)

struct option_def {
    const char *name; /* without the leading "--" */
    enum opt_kind kind;
    const char *def;
    long long min, max;
    const char *help;
    unsigned cmds;
};

/* `inferd serve` */
static const struct option_def serve_options[] = {
    {"models", OPT_STR, "./models", 0, 0, "model repository: DIR/<name>/config.json + versions",
     BOTH},
    {"host", OPT_STR, "127.0.0.1", 0, 0, "IPv4 address to listen on (0.0.0.0 for all)", BOTH},
    {"port", OPT_INT, "8000", 0, 65535, "TCP port (0 picks a free one and logs it)", BOTH},
    {"reuse-port", OPT_FLAG, "0", 0, 1,
     "share --port with other processes that pass it too (SO_REUSEPORT); without it a port in "
     "use is an error at start",
     BOTH},
    {"threads", OPT_INT, "0", 0, 256, "HTTP threads; 0 means one per CPU", BOTH},
    {"max-body-bytes", OPT_INT, "67108864", 1024, 4294967296LL,
     "largest request body; past it, 413", SERVE},
    {"max-connections", OPT_INT, "10000", 16, 1000000,
     "concurrent client connections; past it, the oldest idle one is closed to make room", BOTH},
    {"idle-timeout-s", OPT_INT, "60", 1, 86400,
     "close a connection that has not begun a request this long (new or kept alive)", BOTH},
    {"header-timeout-s", OPT_INT, "10", 1, 3600,
     "a request's headers must be whole this long after its request line", BOTH},
    {"body-min-bytes-per-s", OPT_INT, "1024", 1, 1073741824LL,
     "a request body must arrive this fast, after --header-timeout-s of grace", BOTH},
    {"max-connections-per-client", OPT_INT, "1000", 0, 1000000,
     "connections from one client address; past it, refused (0: no cap)", BOTH},
    {"drain-timeout-s", OPT_INT, "30", 0, 3600,
     "on SIGTERM, how long in-flight requests and running jobs get (then jobs are handed back)",
     BOTH},
    {"log-level", OPT_STR, "info", 0, 0, "error, warn, info or debug", BOTH},
    {"data-dir", OPT_STR, "./data", 0, 0, "where the async job queue keeps its database", SERVE},
    {"queue", OPT_STR, "sqlite", 0, 0,
     "the job queue: sqlite (under --data-dir), redis[s]://[[USER]:PASSWORD@]HOST:PORT/DB[?ca=FILE] or "
     "postgresql://USER[:PASSWORD]@HOST[:PORT]/DB (shared with inferd worker processes)",
     BOTH},
    {"workers", OPT_INT, "2", 0, 4096,
     "async workers (each runs up to --worker-batch jobs); 0: accept and answer only", BOTH},
    {"min-workers", OPT_INT, "0", 0, 4096,
     "autoscaling: the fewest workers (0: none while idle); needs --max-workers", BOTH},
    {"max-workers", OPT_INT, "0", 0, 4096,
     "autoscaling: the most workers; 0 keeps a fixed pool of --workers", BOTH},
    {"target-backlog", OPT_INT, "10", 1, 1000000,
     "autoscaling: queued jobs per worker above which the pool grows", BOTH},
    {"scale-down-delay-s", OPT_INT, "30", 0, 86400,
     "autoscaling: idle this long before each worker is retired", BOTH},
    {"worker-batch", OPT_INT, "64", 1, 4096,
     "jobs a worker leases and runs at once, batched together through the model", BOTH},
    {"max-queue", OPT_INT, "100000", 1, 1000000000LL,
     "async jobs waiting; past it, 429 with Retry-After", SERVE},
    {"max-attempts", OPT_INT, "3", 1, 100, "attempts of a job that does not say", SERVE},
    {"retry-backoff-ms", OPT_INT, "1000", 0, 3600000,
     "delay before a job's second attempt; doubles per attempt up to 60 s", BOTH},
    {"job-ttl-s", OPT_INT, "0", 0, 31536000,
     "a job not started this long after submission expires (0: never)", SERVE},
    {"webhook-secret", OPT_STR, "", 0, 0,
     "HMAC-SHA256 key for X-Inferd-Signature (default: $INFERD_WEBHOOK_SECRET)", BOTH},
    {"webhook-attempts", OPT_INT, "8", 1, 100, "delivery attempts of one webhook", BOTH},
    {"webhook-backoff-ms", OPT_INT, "1000", 1, 3600000,
     "wait after a failed webhook attempt; doubles per attempt up to 5 minutes", BOTH},
    {"webhook-timeout-ms", OPT_INT, "10000", 100, 600000, "one webhook attempt's time limit", BOTH},
    {"io-threads", OPT_INT, "8", 1, 256, "threads for job-store calls made by HTTP requests", BOTH},
    {"s3-endpoint", OPT_STR, "", 0, 0,
     "S3 endpoint URL for s3:// locations (default: $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, "
     "else AWS)",
     BOTH},
    {"result-ttl-s", OPT_INT, "604800", 0, 315360000,
     "how long a finished job and its result are kept (0: forever)", BOTH},
    {"s3-part-size-mb", OPT_INT, "8", 5, 5120,
     "S3 writes past this size become multipart uploads in parts this big", BOTH},
    {"webhook-hosts", OPT_STR, "", 0, 0,
     "hosts (HOST[,.DOMAIN...]) that callback URLs may name; empty: any. Beyond loopback, the "
     "only ones that may reach loopback or private addresses",
     BOTH},
    {"file-roots", OPT_STR, "", 0, 0,
     "folders (DIR[:DIR...]) that jobs' file:// and path locations must stay inside; empty: any "
     "file this process can reach",
     BOTH},
    {"max-input-bytes", OPT_INT, "0", 0, 4294967296LL,
     "largest input_location a job may read (a larger one is refused unread); 0: "
     "--max-body-bytes",
     BOTH},
    {"worker-timeout-s", OPT_INT, "30", 1, 3600,
     "the workers heartbeat to the queue; silent this long, they are presumed dead and their "
     "jobs run again at once",
     BOTH},
    {"keys-file", OPT_STR, "", 0, 0,
     "API keys (inferd keys add): every route but /v2/health/* then needs Authorization: "
     "Bearer KEY with the route's scope; SIGHUP re-reads it; empty: no keys",
     BOTH},
    {"metrics-auth", OPT_FLAG, "0", 0, 1, "with --keys-file: /metrics needs a key too", BOTH},
    {"allow-unauthenticated", OPT_FLAG, "0", 0, 1,
     "listen beyond loopback (--host) without --keys-file: anyone who reaches the port may use "
     "every route",
     SERVE},
    {"tls-cert", OPT_STR, "", 0, 0,
     "PEM certificate chain: serve HTTPS instead of HTTP (with --tls-key); re-read on SIGHUP",
     BOTH},
    {"tls-key", OPT_STR, "", 0, 0,
     "PEM private key (unencrypted) of --tls-cert's first certificate; re-read on SIGHUP", BOTH},
    {"tls-client-ca", OPT_STR, "", 0, 0,
     "PEM CA certificates: require each client to show a certificate they signed (mutual TLS); "
     "re-read on SIGHUP",
     BOTH},
    {"s3-ca-file", OPT_STR, "", 0, 0,
     "PEM file of CAs that S3 over https trusts besides the system's (a private CA)", BOTH},
    {"webhook-ca-file", OPT_STR, "", 0, 0,
     "PEM file of CAs that https webhook receivers are verified against besides the system's",
     BOTH},
};
#define N_SERVE (sizeof(serve_options) / sizeof(serve_options[0]))

/* `inferd worker`'s defaults where they differ from serve's ("": required, no default) */
static const struct {
    const char *name, *def;
} worker_defaults[] = {
    {"port", "8001"},
    {"queue", ""},
};

/* The default of option `o` for command `cmd` (WORKER may differ from the table's). */
static const char *option_default(const struct option_def *o, unsigned cmd)
{
    for (size_t i = 0; cmd == WORKER && i < sizeof(worker_defaults) / sizeof(worker_defaults[0]);
         i++)
        if (strcmp(worker_defaults[i].name, o->name) == 0)
            return worker_defaults[i].def;
    return o->def;
}

/* `inferd batch` */
static const struct option_def batch_options[] = {
    {"models", OPT_STR, "./models", 0, 0, "model repository", 0},
    {"model", OPT_STR, "", 0, 0, "the model to run (required)", 0},
    {"input", OPT_STR, "", 0, 0,
     "an object or a prefix: file:///path, s3://bucket/key, or a path; or a table: "
     "postgresql://USER@HOST:PORT/DB?table=SCHEMA.TABLE (required)",
     0},
    {"output", OPT_STR, "", 0, 0,
     "where <name>.out, _manifest.json and _SUCCESS go (required); or a PostgreSQL table "
     "(postgresql://...?table=T): upserted by key, all or nothing",
     0},
    {"format", OPT_STR, "", 0, 0, "jsonl or csv (default: from each object's extension)", 0},
    {"records-per-batch", OPT_INT, "1024", 1, 1048576, "records per model call", 0},
    {"concurrency", OPT_INT, "0", 0, 64,
     "batches in flight while the next one is parsed (0: instances + 1)", 0},
    {"instances", OPT_INT, "0", 0, 256, "model instances, each a thread (0: one per CPU)", 0},
    {"join-input", OPT_FLAG, "0", 0, 1, "write each input beside its prediction", 0},
    {"csv-header", OPT_FLAG, "0", 0, 1,
     "each CSV object's first line names its columns: mapped to the model's features by name", 0},
    {"max-errors", OPT_INT, "0", 0, INT64_MAX, "bad records tolerated (each: an empty line)", 0},
    {"log-level", OPT_STR, "info", 0, 0, "error, warn, info or debug", 0},
    {"s3-endpoint", OPT_STR, "", 0, 0,
     "S3 endpoint URL for s3:// URIs (default: $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, else "
     "AWS)",
     0},
    {"s3-part-size-mb", OPT_INT, "8", 5, 5120,
     "S3 outputs past this size become multipart uploads in parts this big", 0},
    {"key-columns", OPT_STR, "", 0, 0,
     "COL[,COL...]: columns copied to the output before the prediction, not features (names, "
     "or 0-based positions without a header)",
     0},
    {"output-suffix", OPT_STR, ".out", 0, 0,
     "appended to an input's name for its output ('' keeps the name; output outside the input)", 0},
    {"input-query", OPT_STR, "", 0, 0,
     "with --input postgresql://USER@HOST:PORT/DB: the SELECT whose rows are read (needs "
     "--key-columns)",
     0},
    {"restart", OPT_FLAG, "0", 0, 1,
     "with --output postgresql://...: discard the rows a failed or killed run left for the table "
     "instead of continuing after them",
     0},
    {"s3-ca-file", OPT_STR, "", 0, 0,
     "PEM file of CAs that S3 over https trusts besides the system's (a private CA)", 0},
};
#define N_BATCH (sizeof(batch_options) / sizeof(batch_options[0]))

#define MAX_OPTIONS 64
struct parsed {
    const struct option_def *defs;
    size_t n;
    const char *str[MAX_OPTIONS];
    long long num[MAX_OPTIONS];
    int given[MAX_OPTIONS]; /* on the command line, not defaulted */
};

static void usage(FILE *f)
{
    fprintf(f,
            "inferd %s: serves machine-learning models (KServe v2 REST)\n\n"
            "usage: inferd COMMAND [options]\n\n"
            "commands:\n"
            "  serve    serve a model repository: online (KServe v2), async and batch jobs\n"
            "  worker   run async jobs from a shared queue (--queue redis://... or postgresql://...),\n"
            "           no API\n"
            "  batch    run a batch transform over files or S3 and exit\n"
            "  keys     add, list and revoke the API keys inferd serve --keys-file checks\n"
            "  routes   print every HTTP route with the scope a key needs\n\n"
            "  inferd --version        print the version\n"
            "  inferd COMMAND --help   options of a command\n",
            INFERD_VERSION);
}

static void usage_options(FILE *f, const struct option_def *defs, size_t n, unsigned cmd)
{
    for (size_t i = 0; i < n; i++) {
        const char *def = option_default(&defs[i], cmd);
        int shown = defs[i].kind != OPT_FLAG && def[0];
        if (!defs[i].cmds || (defs[i].cmds & cmd))
            fprintf(f, "  --%-18s %s%s%s%s\n", defs[i].name, defs[i].help,
                    shown                       ? " (default "
                    : !def[0] && defs[i].def[0] ? " (required)"
                                                : "",
                    shown ? def : "", shown ? ")" : "");
    }
}

static void usage_serve(FILE *f)
{
    fprintf(f, "usage: inferd serve [options]\n\n"
               "Serves every model under --models over HTTP (KServe v2 REST, v1 predict) and\n"
               "runs async jobs. SIGHUP reloads the repository; SIGTERM/SIGINT drain and exit 0.\n"
               "\noptions:\n");
    usage_options(f, serve_options, N_SERVE, SERVE);
}

static void usage_worker(FILE *f)
{
    fprintf(f,
            "usage: inferd worker --queue redis://HOST:PORT/DB|postgresql://... [options]\n\n"
            "Runs async jobs from the shared queue that inferd serve --queue URL fills,\n"
            "with --workers threads; serves only /metrics and /v2/health/* on --port.\n"
            "SIGTERM finishes the running jobs and exits 0.\n"
            "\noptions:\n");
    usage_options(f, serve_options, N_SERVE, WORKER);
}

static void usage_batch(FILE *f)
{
    fprintf(f, "usage: inferd batch --model NAME --input URI --output URI [options]\n\n"
               "Runs every record under --input through the model in big batches and writes\n"
               "<output>/<name>.out per input object, one line per record, in order (after a\n"
               "header line when the input has one). Re-running skips objects already done\n"
               "(see _manifest.json); _SUCCESS marks the end. A PostgreSQL table or query\n"
               "(--input postgresql://...?table=T, or with --input-query) is one input: its\n"
               "rows in key order to <output>/SCHEMA.TABLE.jsonl (or .csv, or query.jsonl).\n"
               "Any input can go into a table (--output postgresql://...?table=T): upserted\n"
               "by key (objects: source_object, line) at the end in one transaction, bad\n"
               "rows to T_errors.\n"
               "\noptions:\n");
    usage_options(f, batch_options, N_BATCH, 0);
}

static int parse_value(const struct option_def *o, const char *v, struct parsed *p, size_t i,
                       struct err *e)
{
    char *end;
    long long n;

    p->str[i] = v;
    if (o->kind == OPT_STR)
        return 0;
    if (o->kind == OPT_FLAG) {
        p->num[i] = strcmp(v, "0") != 0;
        return 0;
    }
    errno = 0;
    n = strtoll(v, &end, 10);
    if (errno || *end || end == v)
        return err_set(e, ERR_INVALID, "--%s: '%s' is not an integer", o->name, v);
    if (n < o->min)
        return err_set(e, ERR_INVALID, "--%s: %lld is below the minimum %lld", o->name, n, o->min);
    if (n > o->max)
        return err_set(e, ERR_INVALID, "--%s: %lld is above the maximum %lld", o->name, n, o->max);
    p->num[i] = n;
    return 0;
}

static int parse_options(const struct option_def *defs, size_t n_defs, const char *command,
                         unsigned cmd, int argc, char **argv, struct parsed *p, struct err *e)
{
    int rc;

    p->defs = defs;
    p->n = n_defs;
    for (size_t i = 0; i < n_defs; i++)
        if ((rc = parse_value(&defs[i], option_default(&defs[i], cmd), p, i, e)) != 0)
            return rc;
    for (int a = 0; a < argc; a++) {
        const char *arg = argv[a], *val = NULL, *eq;
        size_t len, i;
        if (strncmp(arg, "--", 2) != 0)
            return err_set(e, ERR_INVALID, "unexpected argument '%s'", arg);
        arg += 2;
        eq = strchr(arg, '=');
        len = eq ? (size_t)(eq - arg) : strlen(arg);
        for (i = 0; i < n_defs; i++)
            if (strlen(defs[i].name) == len && strncmp(defs[i].name, arg, len) == 0)
                break;
        if (i == n_defs || (defs[i].cmds && !(defs[i].cmds & cmd)))
            return err_set(e, ERR_INVALID, "unknown option '%s' (see inferd %s --help)", argv[a],
                           command);
        p->given[i] = 1;
        if (defs[i].kind == OPT_FLAG && !eq)
            val = "1";
        else if (eq)
            val = eq + 1;
        else if (a + 1 < argc)
            val = argv[++a];
        else
            return err_set(e, ERR_INVALID, "--%s needs a value", defs[i].name);
        if ((rc = parse_value(&defs[i], val, p, i, e)) != 0)
            return rc;
    }
    return 0;
}

static size_t opt_index(const struct parsed *p, const char *name)
{
    for (size_t i = 0; i < p->n; i++)
        if (strcmp(p->defs[i].name, name) == 0)
            return i;
    return 0; /* our own tables: every name used below exists */
}

#define OPT_S(p, name) ((p)->str[opt_index((p), name)])
#define OPT_N(p, name) ((p)->num[opt_index((p), name)])

/* The storage options both commands share (`file_roots`: serve and worker only); prints the
 * error itself. */
static int configure_storage(const struct parsed *p, const char *command, const char *file_roots)
{
    struct storage_config sc = {
        .s3_endpoint = OPT_S(p, "s3-endpoint"),
        .s3_ca_file = OPT_S(p, "s3-ca-file"),
        .s3_part_size_bytes = OPT_N(p, "s3-part-size-mb") * 1024 * 1024,
        .file_roots = file_roots,
    };
    struct err e = {0};

    if (storage_configure(&sc, &e) != 0) {
        fprintf(stderr, "inferd %s: %s\n", command, e.msg);
        return -1;
    }
    return 0;
}

static void raise_fd_limit(void)
{
    struct rlimit rl;

    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

/* The worker pool as the HTTP server reads it (struct http_pool): http/ and worker/ are front
 * doors side by side and include neither the other, so main.c joins them. */
static int pool_busy(void *pool)
{
    return worker_pool_busy(pool);
}

static int pool_size(void *pool)
{
    return worker_pool_size(pool);
}

static double pool_drain_rate(void *pool)
{
    return worker_pool_drain_rate(pool);
}

/* 1 if `host` is an IPv4 loopback address (127.0.0.0/8). */
static int is_loopback(const char *host)
{
    struct in_addr a;

    return inet_pton(AF_INET, host, &a) == 1 && (ntohl(a.s_addr) >> 24) == 127;
}

static int cmd_serve(int argc, char **argv, int worker)
{
    struct parsed p = {0};
    struct registry *reg = NULL;
    struct http_server *srv = NULL;
    struct queue *queue = NULL;
    char *queue_shown = NULL;
    struct worker_pool *pool = NULL;
    struct http_pool hp;
    struct queue_config qc;
    struct worker_pool_config wc;
    struct notifier *notifier = NULL;
    struct batch_scheduler *scheduler = NULL;
    struct batch_jobs_config bjc;
    struct notify_config nc;
    struct notify_store store;
    const char *secret;
    struct http_config hc;
    struct auth *auth = NULL;
    struct err e = {0};
    sigset_t sigs;
    int sig, failed, blocked = 0, rc = 1, listen_fd = -1, port;

    const char *cmd = worker ? "worker" : "serve";

    if (parse_options(serve_options, N_SERVE, cmd, worker ? WORKER : SERVE, argc, argv, &p, &e) !=
        0) {
        fprintf(stderr, "inferd %s: %s\n", cmd, e.msg);
        return 2;
    }
    if (log_set_level(OPT_S(&p, "log-level")) != 0) {
        fprintf(stderr, "inferd %s: --log-level: '%s' is not error, warn, info or debug\n", cmd,
                OPT_S(&p, "log-level"));
        return 2;
    }
    if (worker && strncmp(OPT_S(&p, "queue"), "redis://", 8) != 0 &&
        strncmp(OPT_S(&p, "queue"), "rediss://", 9) != 0 &&
        !queue_url_is_postgres(OPT_S(&p, "queue"))) {
        fprintf(stderr, "inferd worker: --queue redis://HOST:PORT/DB or postgresql://... is "
                        "required (the SQLite queue belongs to one inferd serve, which runs its "
                        "own workers)\n");
        return 2;
    }
    if (configure_storage(&p, cmd, OPT_S(&p, "file-roots")) != 0)
        return 2;
    /* Redis's protected mode: reachable from the network means keys, or the operator's word */
    if (!worker && !OPT_S(&p, "keys-file")[0] && !is_loopback(OPT_S(&p, "host")) &&
        !OPT_N(&p, "allow-unauthenticated")) {
        fprintf(stderr,
                "inferd serve: --host %s is reachable beyond this machine, and without API keys "
                "anyone who reaches it may load and unload models and read every job. Add "
                "keys (inferd keys add NAME --scopes infer,jobs,batch; then --keys-file "
                "inferd.keys), or pass --allow-unauthenticated if a gateway in front checks "
                "every request.\n",
                OPT_S(&p, "host"));
        return 2;
    }
    if (OPT_N(&p, "metrics-auth") && !OPT_S(&p, "keys-file")[0]) {
        fprintf(stderr, "inferd %s: --metrics-auth needs --keys-file\n", cmd);
        return 2;
    }
    if (OPT_S(&p, "keys-file")[0]) {
        if (auth_open(OPT_S(&p, "keys-file"), &auth, &e) != 0) {
            fprintf(stderr, "inferd %s: %s\n", cmd, e.msg);
            return 2;
        }
        if (auth_n_active(auth) == 0)
            log_warn("main", "the keys file holds no active key: every request but health is "
                     "refused", "path=%s", OPT_S(&p, "keys-file"));
    } else if (!worker && !is_loopback(OPT_S(&p, "host"))) {
        log_warn("main", "listening beyond loopback without API keys (--allow-unauthenticated)",
                 "host=%s", OPT_S(&p, "host"));
    }
    if (notify_set_allowed_hosts(OPT_S(&p, "webhook-hosts"), &e) != 0) {
        fprintf(stderr, "inferd %s: %s\n", cmd, e.msg);
        return 2;
    }
    if (!OPT_S(&p, "tls-cert")[0] != !OPT_S(&p, "tls-key")[0] ||
        (OPT_S(&p, "tls-client-ca")[0] && !OPT_S(&p, "tls-cert")[0])) {
        fprintf(stderr, "inferd %s: --tls-cert and --tls-key go together, and --tls-client-ca "
                        "needs them\n", cmd);
        return 2;
    }
    /* the port first: a process that cannot have it stops before it touches the queue */
    if (http_listen(OPT_S(&p, "host"), (int)OPT_N(&p, "port"), (int)OPT_N(&p, "reuse-port"),
                    &listen_fd, &port, &e) != 0) {
        fprintf(stderr, "inferd %s: %s\n", cmd, e.msg);
        return 1;
    }
    if (notify_set_listen(OPT_S(&p, "host"), port, &e) != 0) {
        fprintf(stderr, "inferd %s: %s\n", cmd, e.msg);
        close(listen_fd);
        return 2;
    }
    if (!OPT_S(&p, "file-roots")[0] && strncmp(OPT_S(&p, "host"), "127.", 4) != 0)
        log_warn("main", "jobs may read and write any file this process can; --file-roots limits "
                 "them", "host=%s", OPT_S(&p, "host"));
    raise_fd_limit();
    /* every thread inherits this mask, so only sigwait() below sees these signals */
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);

    if (registry_create(OPT_S(&p, "models"), &reg, &e) != 0) {
        fprintf(stderr, "inferd %s: %s\n", cmd, e.msg);
        return 1;
    }
    failed = registry_load_all(reg);
    if (failed)
        log_warn("main", "some models failed to load; the others serve", "failed=%d", failed);
    qc = (struct queue_config){
        .url = OPT_S(&p, "queue"),
        .result_ttl_s = OPT_N(&p, "result-ttl-s"),
        .data_dir = OPT_S(&p, "data-dir"),
        .max_queued = OPT_N(&p, "max-queue"),
        .retry_backoff_ms = OPT_N(&p, "retry-backoff-ms"),
        .result_inline_max_bytes = 128 * 1024,
    };
    if (queue_open(&qc, &queue, &e) != 0) {
        log_error("main", "cannot open the job queue", "reason=\"%s\"", e.msg);
        goto cleanup;
    }
    wc = (struct worker_pool_config){
        .workers = (int)OPT_N(&p, "workers"),
        .min_workers = (int)OPT_N(&p, "min-workers"),
        .max_workers = (int)OPT_N(&p, "max-workers"),
        .target_backlog = (int)OPT_N(&p, "target-backlog"),
        .scale_down_delay_ms = OPT_N(&p, "scale-down-delay-s") * 1000,
        .batch = (int)OPT_N(&p, "worker-batch"),
        .lease_poll_ms = 500,
        /* running jobs get the drain timeout too; past it they run again later */
        .drain_timeout_ms =
            OPT_N(&p, "drain-timeout-s") > 0 ? OPT_N(&p, "drain-timeout-s") * 1000 : 1,
        /* inferd worker has no --max-body-bytes: its default holds */
        .max_input_bytes = OPT_N(&p, "max-input-bytes") > 0 ? OPT_N(&p, "max-input-bytes")
                                                            : OPT_N(&p, "max-body-bytes"),
        .worker_timeout_ms = OPT_N(&p, "worker-timeout-s") * 1000,
    };
    if (wc.max_workers > 0 && wc.min_workers > wc.max_workers) {
        fprintf(stderr, "inferd %s: --min-workers %d is above --max-workers %d\n", cmd,
                wc.min_workers, wc.max_workers);
        return 2;
    }
    secret = OPT_S(&p, "webhook-secret")[0] ? OPT_S(&p, "webhook-secret")
                                            : getenv("INFERD_WEBHOOK_SECRET");
    if (!secret || !secret[0])
        log_warn("main", "webhooks go unsigned: no --webhook-secret or INFERD_WEBHOOK_SECRET", "%s",
                 "");
    nc = (struct notify_config){
        .secret = secret,
        .max_attempts = (int)OPT_N(&p, "webhook-attempts"),
        .initial_backoff_ms = OPT_N(&p, "webhook-backoff-ms"),
        .timeout_ms = OPT_N(&p, "webhook-timeout-ms"),
        .ca_file = OPT_S(&p, "webhook-ca-file"),
    };
    queue_notify_store(queue, &store);
    if (notify_create(&nc, &store, &notifier, &e) != 0) {
        log_error("main", "cannot start webhook delivery", "reason=\"%s\"", e.msg);
        goto cleanup;
    }
    if ((wc.workers > 0 || wc.max_workers > 0) &&
        worker_pool_create(&wc, queue, reg, &pool, &e) != 0) {
        log_error("main", "cannot start the workers", "reason=\"%s\"", e.msg);
        goto cleanup;
    }
    hc = (struct http_config){
        .host = OPT_S(&p, "host"),
        .listen_fd = listen_fd,
        .threads = (int)OPT_N(&p, "threads"),
        .max_body_bytes = OPT_N(&p, "max-body-bytes"),
        .max_connections = (int)OPT_N(&p, "max-connections"),
        .max_connections_per_client = (int)OPT_N(&p, "max-connections-per-client"),
        .idle_timeout_s = (int)OPT_N(&p, "idle-timeout-s"),
        .header_timeout_s = (int)OPT_N(&p, "header-timeout-s"),
        .body_min_bytes_per_s = OPT_N(&p, "body-min-bytes-per-s"),
        .drain_timeout_s = (int)OPT_N(&p, "drain-timeout-s"),
        .io_threads = (int)OPT_N(&p, "io-threads"),
        .default_max_attempts = OPT_N(&p, "max-attempts"),
        .default_ttl_s = OPT_N(&p, "job-ttl-s"),
        .workers = (int)OPT_N(&p, "workers"),
        .worker_only = worker,
        .max_input_bytes = wc.max_input_bytes,
        .auth = auth,
        .metrics_auth = (int)OPT_N(&p, "metrics-auth"),
        .tls_cert = OPT_S(&p, "tls-cert"),
        .tls_key = OPT_S(&p, "tls-key"),
        .tls_client_ca = OPT_S(&p, "tls-client-ca"),
    };
    listen_fd = -1; /* the server's now, started or not */
    hp = (struct http_pool){
        .pool = pool, .busy = pool_busy, .size = pool_size, .drain_rate = pool_drain_rate};
    if (http_server_start(&hc, reg, queue, &hp, notifier, &srv, &e) != 0) {
        log_error("main", "cannot start the HTTP server", "reason=\"%s\"", e.msg);
        goto cleanup;
    }
    bjc = (struct batch_jobs_config){
        .q = queue, .reg = reg, .max_attempts = (int)OPT_N(&p, "max-attempts")};
    if (!worker && batch_scheduler_start(&bjc, &scheduler, &e) != 0) {
        log_error("main", "cannot start the batch scheduler", "reason=\"%s\"", e.msg);
        goto cleanup;
    }
    /* last: every check of the start (TLS files, the port) passed before a job is leased */
    if (pool && worker_pool_run(pool, &e) != 0) {
        log_error("main", "cannot start the workers", "reason=\"%s\"", e.msg);
        goto cleanup;
    }
    queue_shown = url_redacted(OPT_S(&p, "queue")); /* a URL may hold a password */
    log_info("main", worker ? "worker running" : "listening",
             "url=%s://%s:%d models=%s queue=%s workers=%d version=%s",
             http_server_is_tls(srv) ? "https" : "http", hc.host,
             http_server_port(srv), OPT_S(&p, "models"), queue_shown ? queue_shown : "(hidden)",
             wc.workers, INFERD_VERSION);
    free(queue_shown);
    for (;;) {
        if (sigwait(&sigs, &sig) != 0)
            continue;
        if (sig == SIGHUP) {
            log_info("main", "SIGHUP: reloading the model repository", "%s", "");
            registry_load_all(reg);
            if (auth && auth_reload(auth, &e) != 0)
                log_error("main", "SIGHUP: the keys file cannot be read; the keys in use stay",
                          "reason=\"%s\"", e.msg);
            else if (auth)
                log_info("main", "SIGHUP: keys re-read", "active=%zu", auth_n_active(auth));
            if (http_server_reload_tls(srv, &e) != 0)
                log_error("main", "SIGHUP: TLS certificates not reloaded; the old ones serve",
                          "reason=\"%s\"", e.msg);
            continue;
        }
        log_info("main", "draining", "signal=%s", sig == SIGTERM ? "SIGTERM" : "SIGINT");
        break;
    }
    worker_pool_drain(pool); /* the workers' drain runs alongside the HTTP server's */
    blocked = http_server_stop(srv);
    srv = NULL;
    rc = 0;
cleanup:
    if (listen_fd >= 0)
        close(listen_fd);
    blocked += http_server_stop(srv);
    batch_scheduler_stop(scheduler);
    /* running jobs finish and record their results; blocked ones are handed back */
    blocked += worker_pool_stop(pool);
    notify_destroy(notifier); /* undelivered webhooks stay stored for the next start */
    if (blocked > 0) {
        /* threads blocked in a read or in a model that does not stop still use the queue and
         * the models (their jobs were handed back): exit without freeing them under those
         * threads, and without the exit handlers */
        log_warn("main", "stopped; some threads were still blocked", "blocked=%d", blocked);
        _exit(rc == 0 ? 0 : 1);
    }
    queue_close(queue);
    registry_destroy(reg);
    auth_close(auth);
    if (rc == 0)
        log_info("main", "stopped", "%s", "");
    return rc;
}

static int cmd_batch(int argc, char **argv)
{
    struct parsed p = {0};
    struct batch_config bc;
    struct batch_stats st;
    struct err e = {0};
    const char *fmt;
    int rc;

    if (parse_options(batch_options, N_BATCH, "batch", 0, argc, argv, &p, &e) != 0) {
        fprintf(stderr, "inferd batch: %s\n", e.msg);
        return 2;
    }
    if (log_set_level(OPT_S(&p, "log-level")) != 0) {
        fprintf(stderr, "inferd batch: --log-level: '%s' is not error, warn, info or debug\n",
                OPT_S(&p, "log-level"));
        return 2;
    }
    for (const char **req = (const char *[]){"model", "input", "output", NULL}; *req; req++) {
        if (!OPT_S(&p, *req)[0]) {
            fprintf(stderr, "inferd batch: --%s is required (see inferd batch --help)\n", *req);
            return 2;
        }
    }
    if (configure_storage(&p, "batch", NULL) != 0)
        return 2;
    fmt = OPT_S(&p, "format");
    if (fmt[0] && strcmp(fmt, "jsonl") != 0 && strcmp(fmt, "csv") != 0) {
        fprintf(stderr, "inferd batch: --format: '%s' is not jsonl or csv\n", fmt);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    bc = (struct batch_config){
        .models_dir = OPT_S(&p, "models"),
        .model = OPT_S(&p, "model"),
        .input = OPT_S(&p, "input"),
        .input_query = OPT_S(&p, "input-query"),
        .output = OPT_S(&p, "output"),
        .format = !fmt[0]                   ? BATCH_FORMAT_AUTO
                  : strcmp(fmt, "csv") == 0 ? BATCH_FORMAT_CSV
                                            : BATCH_FORMAT_JSONL,
        .records_per_batch = OPT_N(&p, "records-per-batch"),
        .concurrency = (int)OPT_N(&p, "concurrency"),
        .instances = (int)OPT_N(&p, "instances"),
        .join_input = (int)OPT_N(&p, "join-input"),
        .csv_header = (int)OPT_N(&p, "csv-header"),
        .key_columns = OPT_S(&p, "key-columns"),
        .restart = (int)OPT_N(&p, "restart"),
        .output_suffix = OPT_S(&p, "output-suffix"),
        .max_errors = OPT_N(&p, "max-errors"),
        .progress_tty = isatty(STDERR_FILENO),
    };
    rc = batch_run(&bc, &st, &e);
    if (rc != 0)
        fprintf(stderr, "inferd batch: %s\n", e.msg);
    /* the summary is always the last line */
    fprintf(stderr,
            "inferd batch: %s objects=%lld skipped=%lld records=%lld errors=%lld seconds=%.2f "
            "records_per_s=%.0f\n",
            rc == 0 ? "done" : "failed", (long long)st.objects_done, (long long)st.objects_skipped,
            (long long)st.records, (long long)st.errors, st.seconds,
            st.seconds > 0 ? (double)st.records / st.seconds : 0.0);
    return rc != 0 ? 1 : 0;
}

static int cmd_serve_api(int argc, char **argv)
{
    return cmd_serve(argc, argv, 0);
}

static int cmd_worker(int argc, char **argv)
{
    return cmd_serve(argc, argv, 1);
}

/* `inferd keys` */
static const struct option_def keys_options[] = {
    {"keys-file", OPT_STR, "inferd.keys", 0, 0,
     "the keys file (created mode 0600); inferd serve --keys-file reads it", 0},
    {"scopes", OPT_STR, "", 0, 0,
     "add: what the key may do, a comma list of infer, jobs, batch, admin (required)", 0},
    {"tenant", OPT_STR, "", 0, 0,
     "add: who owns the jobs the key makes (default: NAME; name another key's tenant to "
     "rotate it)",
     0},
};
#define N_KEYS (sizeof(keys_options) / sizeof(keys_options[0]))

static void usage_keys(FILE *f)
{
    fprintf(f, "usage: inferd keys add NAME --scopes infer,jobs,batch,admin [options]\n"
               "       inferd keys list [--keys-file FILE]\n"
               "       inferd keys revoke NAME [--keys-file FILE]\n\n"
               "Manages the API keys inferd serve --keys-file checks. add prints the new key\n"
               "once; only its SHA-256 is stored. A running server re-reads the file on SIGHUP.\n"
               "\noptions:\n");
    usage_options(f, keys_options, N_KEYS, 0);
}

static int cmd_keys(int argc, char **argv)
{
    struct parsed p = {0};
    struct err e = {0};
    const char *verb = argc > 0 ? argv[0] : "", *name = NULL;
    int first = 1;
    unsigned scopes = 0;
    char token[64];

    if (strcmp(verb, "add") != 0 && strcmp(verb, "list") != 0 && strcmp(verb, "revoke") != 0) {
        usage_keys(stderr);
        return 2;
    }
    if (strcmp(verb, "list") != 0) {
        if (argc < 2 || strncmp(argv[1], "--", 2) == 0) {
            fprintf(stderr, "inferd keys %s: NAME is required\n", verb);
            return 2;
        }
        name = argv[1];
        first = 2;
    }
    if (parse_options(keys_options, N_KEYS, "keys", 0, argc - first, argv + first, &p, &e) != 0) {
        fprintf(stderr, "inferd keys: %s\n", e.msg);
        return 2;
    }
    if (strcmp(verb, "list") == 0) {
        if (auth_keys_list(OPT_S(&p, "keys-file"), stdout, &e) != 0) {
            fprintf(stderr, "inferd keys list: %s\n", e.msg);
            return 1;
        }
        return 0;
    }
    if (strcmp(verb, "revoke") == 0) {
        if (auth_keys_revoke(OPT_S(&p, "keys-file"), name, &e) != 0) {
            fprintf(stderr, "inferd keys revoke: %s\n", e.msg);
            return 1;
        }
        fprintf(stderr, "revoked '%s': a server running with --keys-file %s refuses it after "
                        "SIGHUP (kill -HUP PID)\n",
                name, OPT_S(&p, "keys-file"));
        return 0;
    }
    if (!OPT_S(&p, "scopes")[0]) {
        fprintf(stderr, "inferd keys add: --scopes is required (a comma list of infer, jobs, "
                        "batch, admin)\n");
        return 2;
    }
    if (auth_parse_scopes(OPT_S(&p, "scopes"), &scopes, &e) != 0) {
        fprintf(stderr, "inferd keys add: --scopes: %s\n", e.msg);
        return 2;
    }
    if (auth_keys_add(OPT_S(&p, "keys-file"), name,
                      OPT_S(&p, "tenant")[0] ? OPT_S(&p, "tenant") : name, scopes, token,
                      &e) != 0) {
        fprintf(stderr, "inferd keys add: %s\n", e.msg);
        return e.code == ERR_CONFLICT ? 1 : 2;
    }
    /* the key on stdout alone, for KEY=$(inferd keys add ...); the rest on stderr */
    printf("%s\n", token);
    fprintf(stderr, "added '%s' to %s: the key above is shown once; only its hash is stored. "
                    "A running server takes it after SIGHUP.\n",
            name, OPT_S(&p, "keys-file"));
    memset(token, 0, sizeof(token));
    return 0;
}

static void usage_routes(FILE *f)
{
    fprintf(f, "usage: inferd routes\n\n"
               "Prints every HTTP route, one JSON object per line: method, path, the scope a\n"
               "key needs (public: none; metrics: none unless --metrics-auth), the thread its\n"
               "handler runs on, and whether inferd worker serves it.\n");
}

static int cmd_routes(int argc, char **argv)
{
    (void)argv;
    if (argc > 0) {
        usage_routes(stderr);
        return 2;
    }
    return http_routes_print(stdout) == 0 ? 0 : 1;
}

static const struct {
    const char *name;
    void (*usage)(FILE *f);
    int (*run)(int argc, char **argv);
} commands[] = {
    {"serve", usage_serve, cmd_serve_api},
    {"worker", usage_worker, cmd_worker},
    {"batch", usage_batch, cmd_batch},
    {"keys", usage_keys, cmd_keys},
    {"routes", usage_routes, cmd_routes},
};

/* A crash says where, on stderr (where the logs go): the signal and the stack as
 * "inferd(+0xOFFSET)" frames that `addr2line -f -e inferd 0xOFFSET` names. Then the default
 * action runs (a core dump where enabled). */
static void on_fatal_signal(int sig)
{
    static const char head[] = "inferd: fatal signal ";
    static const char tail[] = "; stack (addr2line -f -e inferd OFFSET):\n";
    void *frames[64];
    char num[4] = {(char)('0' + sig / 10 % 10), (char)('0' + sig % 10), 0, 0};
    int n = backtrace(frames, 64);

    (void)!write(2, head, sizeof(head) - 1);
    (void)!write(2, num, 2);
    (void)!write(2, tail, sizeof(tail) - 1);
    backtrace_symbols_fd(frames, n, 2);
    signal(sig, SIG_DFL);
    raise(sig);
}

static void report_crashes(void)
{
    static const int sigs[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT};
    struct sigaction sa = {0};
    void *warm[1];

    backtrace(warm, 1); /* loads libgcc's unwinder now, never inside the handler */
    sa.sa_handler = on_fatal_signal;
    sa.sa_flags = SA_RESETHAND;
    sigemptyset(&sa.sa_mask);
    for (size_t i = 0; i < sizeof(sigs) / sizeof(sigs[0]); i++)
        sigaction(sigs[i], &sa, NULL);
}

int main(int argc, char **argv)
{
    report_crashes();
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (strcmp(argv[1], "--version") == 0 || strcmp(argv[1], "version") == 0) {
        printf("inferd %s\n", INFERD_VERSION);
        return 0;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
        strcmp(argv[1], "help") == 0) {
        usage(stdout);
        return 0;
    }
    for (size_t c = 0; c < sizeof(commands) / sizeof(commands[0]); c++) {
        if (strcmp(argv[1], commands[c].name) != 0)
            continue;
        for (int i = 2; i < argc; i++)
            if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
                commands[c].usage(stdout);
                return 0;
            }
        return commands[c].run(argc - 2, argv + 2);
    }
    fprintf(stderr, "inferd: unknown command '%s'\n\n", argv[1]);
    usage(stderr);
    return 2;
}
