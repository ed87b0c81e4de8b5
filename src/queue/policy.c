/*
 * policy.c: the queue's rules, written once. Every store applies them inside its own
 * transaction (a SQL transaction, or a Redis script), so the store decides atomically and the
 * rule itself lives here: admission (--max-queue), the idempotency-key comparison, the retry
 * backoff, retention (--result-ttl-s) and what a lost worker's log line says.
 */
#include "queue/queue_internal.h"
#include "core/log.h"

#include <string.h>

int queue_admit(const struct queue_config *cfg, int64_t queued, int64_t n, struct err *e)
{
    if (queued + n <= cfg->max_queued)
        return 0;
    if (n == 1)
        return err_set(e, ERR_BUSY, "the queue holds %lld jobs, the limit (--max-queue)",
                       (long long)queued);
    return err_set(e, ERR_BUSY,
                   "%lld tasks would pass the queue's limit of %lld jobs (--max-queue); %lld are "
                   "waiting",
                   (long long)n, (long long)cfg->max_queued, (long long)queued);
}

int queue_idem_match(const struct job_spec *s, const char *old_id, const char *old_hash,
                     struct err *e)
{
    /* a request without a hash matches nothing: the key alone proves no sameness */
    if (old_hash && s->request_hash && strcmp(old_hash, s->request_hash) == 0)
        return 0;
    return err_set(e, ERR_CONFLICT, "Idempotency-Key '%.64s' was used for another request (job %s)",
                   s->idempotency_key, old_id);
}

int64_t queue_retry_backoff_ms(int64_t first_ms, int counted, int64_t retry_after_ms)
{
    int64_t backoff = first_ms;

    for (int i = 1; i < counted && backoff < QUEUE_MAX_BACKOFF_MS; i++)
        backoff *= 2;
    if (backoff > QUEUE_MAX_BACKOFF_MS)
        backoff = QUEUE_MAX_BACKOFF_MS;
    return retry_after_ms > backoff ? retry_after_ms : backoff;
}

int64_t queue_retain_before_ms(const struct queue_config *cfg, int64_t now_ms)
{
    return cfg->result_ttl_s > 0 ? now_ms - cfg->result_ttl_s * 1000 : INT64_MIN;
}

void queue_log_worker_lost(const char *worker, int64_t jobs, const char *why)
{
    log_warn("queue", "worker lost; its running jobs are queued again",
             "worker=%s jobs=%lld reason=\"%s\"", worker, (long long)jobs, why);
}
