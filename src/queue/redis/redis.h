/*
 * redis.h: the job queue on Redis Streams (src/queue/redis/), opened by queue_open() for a
 * `redis://host:port/db` URL. Shared by every process pointed at the same Redis.
 */
#ifndef INFERD_QUEUE_REDIS_H
#define INFERD_QUEUE_REDIS_H

#include "queue/queue_internal.h"

int queue_redis_open(const struct queue_config *cfg, struct queue **out, struct err *e);

#endif
