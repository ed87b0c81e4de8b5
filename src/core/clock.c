/*
 * clock.c: the wall, monotonic and scheduler clocks (see clock.h).
 */
#include "core/clock.h"

#include <stdio.h>
#include <stdlib.h>

int64_t clock_now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

uint64_t clock_mono_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int64_t clock_mono_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* read on every call, so a test may write the file at any time; a missing, empty or
 * unreadable file means the real time */
int64_t clock_sched_now_ms(void)
{
    const char *path = getenv("INFERD_CLOCK_FILE");
    FILE *f;
    long long ms = 0;

    if (!path || !path[0] || !(f = fopen(path, "r")))
        return clock_now_ms();
    if (fscanf(f, "%lld", &ms) != 1)
        ms = 0;
    fclose(f);
    return ms > 0 ? (int64_t)ms : clock_now_ms();
}
