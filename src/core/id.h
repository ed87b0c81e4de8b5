/*
 * id.h: the ids inferd hands out (jobs, batch jobs, schedules, webhook deliveries) and the
 * random bytes behind them.
 *
 * An id is 12 hex digits of the wall clock's milliseconds (clock_now_ms) then 12 random hex
 * digits: ids sort by creation time, and two processes sharing a store do not collide.
 */
#ifndef INFERD_CORE_ID_H
#define INFERD_CORE_ID_H

#include <stddef.h>

#define ID_SIZE 40 /* bytes of the buffer an id is written to (24 digits and the NUL fit) */

/* Writes a new id to `out`. Thread-safe. */
void id_new(char out[ID_SIZE]);

/* Fills `buf` with `n` random bytes: getrandom(), or rand() when the kernel gives none. */
void id_random(void *buf, size_t n);

#endif
