/*
 * id.c: time-ordered ids and random bytes (see id.h).
 */
#include "core/id.h"
#include "core/clock.h"

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

void id_new(char out[ID_SIZE])
{
    unsigned char rnd[6] = {0};

    id_random(rnd, sizeof(rnd));
    snprintf(out, ID_SIZE, "%012llx%02x%02x%02x%02x%02x%02x", (unsigned long long)clock_now_ms(),
             rnd[0], rnd[1], rnd[2], rnd[3], rnd[4], rnd[5]);
}
