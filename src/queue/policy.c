/*
 * policy.c: the queue's rules, written once. Every store applies them inside its own
 * transaction (a SQL transaction, or a Redis script), so the store decides atomically and the
 * rule itself lives here: admission (--max-queue), the idempotency-key comparison, the retry
 * backoff, retention (--result-ttl-s) and what a lost worker's log line says.
 */
#include "queue/queue_internal.h"
#include "core/log.h"

#include <stdio.h>
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

enum job_state queue_after_failure(const struct queue_config *cfg, const struct job *j,
                                   int released, int retryable, int64_t retry_after_ms,
                                   int64_t *backoff_ms)
{
    int counted = j->attempts - j->attempts_uncounted;

    /* released by a worker's shutdown: again at once, with one more attempt to make up */
    *backoff_ms =
        released ? 0 : queue_retry_backoff_ms(cfg->retry_backoff_ms, counted, retry_after_ms);
    if (j->cancel_requested)
        return JOB_CANCELLED;
    if (!released && (!retryable || counted >= j->max_attempts))
        return JOB_FAILED;
    return JOB_QUEUED;
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

/* ---- batch runs: what a task's end does to its run ---- */

enum batch_run_step queue_batch_task_ended(const struct job *task, char why[QUEUE_WHY_MAX])
{
    why[0] = '\0';
    if (task->state == JOB_SUCCEEDED)
        return task->kind == JOB_KIND_BATCH_TASK ? BATCH_RUN_COUNT : BATCH_RUN_SUCCEED;
    if (task->state == JOB_CANCELLED)
        snprintf(why, QUEUE_WHY_MAX, "its task %s was cancelled", task->id);
    else
        snprintf(why, QUEUE_WHY_MAX, "%s", task->error ? task->error : "a task failed");
    return BATCH_RUN_FAIL;
}

void queue_batch_task_counts(const char *result, size_t len, struct batch_task_counts *out)
{
    json_t *res = result && len ? json_loadb(result, len, 0, NULL) : NULL;
    json_t *object = json_object_get(res, "object");

    out->records = json_integer_value(json_object_get(res, "records"));
    out->bad = json_integer_value(json_object_get(res, "errors"));
    snprintf(out->object, sizeof(out->object), "%s",
             json_is_string(object) ? json_string_value(object) : "?");
    json_decref(res);
}

enum batch_run_step queue_batch_after_count(int64_t objects_total, int64_t objects_done,
                                            int64_t records_failed, int64_t max_errors,
                                            const char *object, char why[QUEUE_WHY_MAX])
{
    why[0] = '\0';
    if (records_failed > max_errors) {
        snprintf(why, QUEUE_WHY_MAX,
                 "%lld bad records in all, more than max_errors (%lld); the last from %s",
                 (long long)records_failed, (long long)max_errors, object);
        return BATCH_RUN_FAIL;
    }
    return objects_done == objects_total ? BATCH_RUN_FINISH : BATCH_RUN_WAIT;
}
