/*
 * fuzz_cron.c: libFuzzer target for batch-job schedules: cron_parse() on any text, and for
 * each expression it accepts, cron_next() from a time taken from the input, in UTC and in
 * Europe/Paris (daylight saving time); cron_template_expand() on the same text. A rejection
 * must carry a reason; an accepted expression's next run must lie after the start.
 */
#include "batch/cron.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char text[256];
    struct cron c;
    struct err e;
    uint32_t t = 0;

    if (size < 4 || size - 4 >= sizeof(text))
        return 0;
    memcpy(&t, data, 4);
    memcpy(text, data + 4, size - 4);
    text[size - 4] = '\0';
    char *expanded = NULL;
    time_t at_s = (time_t)t;
    struct tm at;
    gmtime_r(&at_s, &at);
    if (cron_template_expand(text, &at, &expanded, &e) != 0 ? !e.msg[0] : !expanded)
        abort();
    free(expanded);
    if (cron_parse(text, &c, &e) != 0) {
        if (!e.msg[0])
            abort();
        return 0;
    }
    int64_t start = (int64_t)t * 1000, next = cron_next(&c, start);
    if (next != -1 && (next <= start || next % 60000 != 0))
        abort();
    static struct cron_zone *paris;
    if (!paris && cron_zone_open("Europe/Paris", &paris, &e) != 0)
        abort();
    next = cron_next_in(&c, paris, start);
    if (next != -1 && (next <= start || next % 60000 != 0))
        abort();
    return 0;
}
