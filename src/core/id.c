/*
 * id.c: time-ordered ids and random bytes (see id.h).
 */
#include "core/id.h"
#include "core/clock.h"

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/random.h>
#include <sys/types.h>

void id_random(void *buf, size_t n)
{
    unsigned char *p = buf;

    if (getrandom(buf, n, 0) != (ssize_t)n)
        for (size_t i = 0; i < n; i++)
            p[i] = (unsigned char)rand();
}

/* Within a millisecond (or when the clock steps back) the random part counts up from the last
 * id's, so this process's ids sort in the order they were made. */
void id_new(char out[ID_SIZE])
{
    static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
    static uint64_t last_ms, last_rnd;
    unsigned char rnd[6] = {0};
    uint64_t ms = (uint64_t)clock_now_ms(), r = 0;

    id_random(rnd, sizeof(rnd));
    for (size_t i = 0; i < sizeof(rnd); i++)
        r = r << 8 | rnd[i];
    pthread_mutex_lock(&lock);
    if (ms <= last_ms && last_rnd + 0x10000 <= 0xffffffffffffULL) {
        ms = last_ms;
        r = last_rnd + 1 + (r & 0xffff);
    } else if (ms <= last_ms) {
        ms = last_ms + 1; /* counted out: the next millisecond */
    }
    last_ms = ms;
    last_rnd = r & 0xffffffffffffULL;
    r = last_rnd;
    pthread_mutex_unlock(&lock);
    snprintf(out, ID_SIZE, "%012llx%012llx", (unsigned long long)ms, (unsigned long long)r);
}
