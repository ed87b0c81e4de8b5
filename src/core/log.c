/*
 * log.c: the single writer of log lines (stderr, line-buffered by one fprintf per event).
 */
#include "core/log.h"
#include "core/clock.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

enum log_level log_threshold = LOG_LEVEL_INFO;

int log_set_level(const char *name)
{
    static const char *names[] = {"error", "warn", "info", "debug"};

    for (int i = 0; i < 4; i++) {
        if (strcmp(name, names[i]) == 0) {
            log_threshold = (enum log_level)i;
            return 0;
        }
    }
    return -1;
}

void log_write(enum log_level level, const char *module, const char *msg, const char *fmt, ...)
{
    static const char *names[] = {"error", "warn", "info", "debug"};
    char ts[32], tail[768];
    int64_t now_ms = clock_now_ms();
    time_t now_s = (time_t)(now_ms / 1000);
    struct tm tm;
    va_list ap;

    gmtime_r(&now_s, &tm);
    strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%S", &tm);
    va_start(ap, fmt);
    vsnprintf(tail, sizeof(tail), fmt, ap);
    va_end(ap);
    fprintf(stderr, "ts=%s.%03ldZ level=%s module=%s msg=\"%s\"%s%s\n", ts, (long)(now_ms % 1000),
            names[level], module, msg, tail[0] ? " " : "", tail);
}
