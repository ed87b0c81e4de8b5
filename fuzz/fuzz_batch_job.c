/*
 * fuzz_batch_job.c: libFuzzer target for batch-job definitions (the JSON body of
 * POST /v1/batch-jobs), batch_job_check_def() in src/batch/batch_def.c. The first byte says
 * what the made-up model is (bit 0: it takes rows of numbers, bit 1: JSON documents, bit 2:
 * not found); the rest is the body. No registry, no storage, no connection: a postgresql://
 * input is only recognised by the check, opened when a run starts (batch_jobs.c), which this
 * target does not link.
 *
 * A rejection carries a message. An accepted definition's normalized form is a JSON object,
 * and passes the same check again unchanged (normalizing is idempotent), with the same answer
 * to "is it a schedule".
 */
#include "batch/batch_jobs.h"

#include <jansson.h>
#include <stdint.h>
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
