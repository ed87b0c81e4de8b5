/*
 * fuzz_batch_job.c: libFuzzer target for batch-job definitions (the JSON body of
 * POST /v1/batch-jobs), batch_job_check_def() in src/batch/batch_def.c. The first byte says
 * what the made-up model is (bit 0: it takes rows of numbers, bit 1: JSON documents, bit 2:
 * not found); the rest is the body. No registry, no storage, no connection: a postgresql://
 * input is only recognised by the check, opened when a run starts (batch_jobs.c), which this
 * target does not link.
 *
 * A rejection carries a message that does not show the userinfo password of "input" or
 * "output" (a postgresql:// URL often has one): where the password's text (4+ bytes, found as
 * url_redacted() finds userinfo) is in the message, the definition with the password's
 * letters and digits changed must give the same message. An accepted definition's normalized
 * form is a JSON object, and passes the same check again unchanged (normalizing is
 * idempotent), with the same answer to "is it a schedule".
 */
#define _GNU_SOURCE /* memmem */
#include "batch/batch_jobs.h"
#include "fuzz_secret.h"

#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int fake_model(void *ctx, const char *name, struct batch_job_model *out, struct err *e)
{
    uint8_t flags = *(const uint8_t *)ctx;

    if (!name || !name[0])
        abort(); /* the check asks only for a named model */
    if (flags & 4)
        return err_set(e, ERR_NOT_FOUND, "unknown model '%.64s'", name);
    out->is_ok = !(flags & 1);
    out->documents = !!(flags & 2);
    return 0;
}

/* The password's span in `url` (after the userinfo's first ':', before the last '@' of the
 * authority, which ends at the first '/', '?' or '#' after "scheme://"); 0 if none. Only a
 * URL that starts with a scheme (RFC 3986: a letter, then letters, digits, '+', '-', '.') has
 * userinfo: "@x://u:p@h" or "dir/x://u:p@h" is a path, as url_redacted() sees it too. */
static int password_span(const char *url, size_t *from, size_t *to)
{
    size_t n = strspn(url, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-.");

    if (n == 0 || !((url[0] | 0x20) >= 'a' && (url[0] | 0x20) <= 'z') ||
        strncmp(url + n, "://", 3) != 0)
        return 0;
    return fuzz_password_span(url, url + n + 3, "/?#", from, to);
}

/* The password of definition field `key` must not be in `msg` (see the top). */
static void check_hidden(const char *body, size_t len, uint8_t flags, const char *key,
                         const char *msg)
{
    json_t *def = json_loadb(body, len, JSON_REJECT_DUPLICATES, NULL);
    const char *url = json_string_value(json_object_get(def, key));
    char *copy = NULL, *body2 = NULL, *normalized = NULL;
    size_t from, to;
    int changed = 0, is_schedule;
    struct err e2 = {0};

    if (!url || !password_span(url, &from, &to) || to - from < 4 ||
        !memmem(msg, strlen(msg), url + from, to - from))
        goto cleanup;
    copy = strdup(url);
    changed = copy && fuzz_mutate_secret(copy, from, to);
    if (!changed || json_object_set_new(def, key, json_string(copy)) != 0 ||
        !(body2 = json_dumps(def, JSON_COMPACT | JSON_PRESERVE_ORDER)))
        goto cleanup;
    if (batch_job_check_def(body2, strlen(body2), fake_model, &flags, &normalized, &is_schedule,
                            &e2) == 0 ||
        strcmp(msg, e2.msg) != 0) {
        fprintf(stderr, "%s's password shown: '%s'\n", key, msg);
        abort();
    }
cleanup:
    free(normalized);
    free(body2);
    free(copy);
    json_decref(def);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *normalized = NULL, *again = NULL;
    int is_schedule = 0, is_schedule_again = 0;
    struct err e = {0};
    uint8_t flags;

    if (size < 1 || size > 65536)
        return 0;
    flags = data[0];
    if (batch_job_check_def((const char *)data + 1, size - 1, fake_model, &flags, &normalized,
                            &is_schedule, &e) != 0) {
        if (!e.msg[0] || normalized)
            abort();
        check_hidden((const char *)data + 1, size - 1, flags, "input", e.msg);
        check_hidden((const char *)data + 1, size - 1, flags, "output", e.msg);
        return 0;
    }
    json_t *root = json_loads(normalized, JSON_REJECT_DUPLICATES, NULL);
    if (!root || !json_is_object(root))
        abort();
    json_decref(root);
    memset(&e, 0, sizeof(e));
    if (batch_job_check_def(normalized, strlen(normalized), fake_model, &flags, &again,
                            &is_schedule_again, &e) != 0 ||
        strcmp(normalized, again) != 0 || is_schedule != is_schedule_again)
        abort();
    free(again);
    free(normalized);
    return 0;
}
