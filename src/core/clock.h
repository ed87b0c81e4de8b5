/*
 * clock.h: time helpers for condition-variable waits.
 */
#ifndef INFERD_CLOCK_H
#define INFERD_CLOCK_H

#include <stdint.h>
#include <time.h>

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
