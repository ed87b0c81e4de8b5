/*
 * batch.c: batch jobs and schedules in the PostgreSQL queue (not written yet: every call
 * answers that batch jobs need the SQLite or Redis queue).
 */
#include "queue/postgres/pg_internal.h"

#define NOT_YET(e) err_set((e), ERR_INVALID, "batch jobs are not available on the PostgreSQL queue yet")

int pg_op_batch_create(struct pg_txn *t, struct pg_op *o)
{
    (void)t;
    return NOT_YET(&o->err);
}
int pg_op_batch_cancel(struct pg_txn *t, struct pg_op *o)
{
    (void)t;
    return NOT_YET(&o->err);
}
int pg_op_batch_pause(struct pg_txn *t, struct pg_op *o)
{
    (void)t;
    return NOT_YET(&o->err);
}
int pg_op_batch_progress(struct pg_txn *t, struct pg_op *o)
{
    (void)t;
    return NOT_YET(&o->err);
}
int pg_batch_task_final(struct pg_txn *t, const struct job *j, struct err *e)
{
    (void)t;
    (void)j;
    (void)e;
    return 0;
}
int pg_batch_task_started(struct pg_txn *t, const char *batch_id, int64_t now, struct err *e)
{
    (void)t;
    (void)batch_id;
    (void)now;
    (void)e;
    return 0;
}
int pg_batch_create(struct queue *qb, const struct batch_job_spec *spec, char id_out[40],
                    struct err *e)
{
    (void)qb;
    (void)spec;
    id_out[0] = '\0';
    return NOT_YET(e);
}
int pg_batch_get(struct queue *qb, const char *id, struct buf *out, struct err *e)
{
    (void)qb;
    (void)id;
    (void)out;
    return NOT_YET(e);
}
int pg_batch_list(struct queue *qb, int limit, const char *status, struct buf *out, struct err *e)
{
    (void)qb;
    (void)limit;
    (void)status;
    (void)out;
    return NOT_YET(e);
}
int pg_batch_cancel(struct queue *qb, const char *id, struct buf *out, struct err *e)
{
    (void)qb;
    (void)id;
    (void)out;
    return NOT_YET(e);
}
int pg_batch_manifest(struct queue *qb, const char *id, struct buf *out, struct err *e)
{
    (void)qb;
    (void)id;
    (void)out;
    return NOT_YET(e);
}
int pg_schedules_due(struct queue *qb, int64_t now_ms, struct queue_schedule **out, size_t *n,
                     struct err *e)
{
    (void)qb;
    (void)now_ms;
    (void)e;
    *out = NULL;
    *n = 0;
    return 0;
}
int pg_batch_definition(struct queue *qb, const char *id, struct queue_schedule **out,
                        struct err *e)
{
    (void)qb;
    (void)id;
    *out = NULL;
    return NOT_YET(e);
}
int pg_batch_pause(struct queue *qb, const char *id, int paused, int64_t next_run_ms,
                   struct buf *out, struct err *e)
{
    (void)qb;
    (void)id;
    (void)paused;
    (void)next_run_ms;
    (void)out;
    return NOT_YET(e);
}
int pg_batch_progress(struct queue *qb, const char *batch_id, const char *task_id, uint64_t token,
                      int64_t records, struct err *e)
{
    (void)qb;
    (void)batch_id;
    (void)task_id;
    (void)token;
    (void)records;
    (void)e;
    return 0;
}
