/*
 * clock.h: inferd's one clock. Every module reads time here, so there is one meaning of "now"
 * per kind, and tests move the scheduler's time in one place.
 *
 *   clock_now_ms        wall clock (CLOCK_REALTIME), Unix epoch milliseconds: what is stored
 *                       (created_ms, next_attempt_ms) and shown (ISO-8601 times, logs)
 *   clock_mono_ms/_ns   CLOCK_MONOTONIC: durations, deadlines and timeouts inside one process,
 *                       which a wall-clock step must not stretch or cut short
 *   clock_sched_now_ms  the batch scheduler's "now" (cron schedules): clock_now_ms, unless
 *                       $INFERD_CLOCK_FILE names a file holding epoch milliseconds (how tests
 *                       move time forward without waiting minutes)
 *
 * All are thread-safe.
 */
#ifndef INFERD_CLOCK_H
#define INFERD_CLOCK_H

#include <stdint.h>
#include <time.h>

int64_t clock_now_ms(void);
int64_t clock_mono_ms(void);
uint64_t clock_mono_ns(void);
int64_t clock_sched_now_ms(void);

/* The CLOCK_REALTIME instant `ms` milliseconds from now, for pthread_cond_timedwait() on a
 * condition variable with the default clock. */
static inline struct timespec clock_realtime_after_ms(int64_t ms)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += (time_t)(ms / 1000);
    ts.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    return ts;
}

#endif
