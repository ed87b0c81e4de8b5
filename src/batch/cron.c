/*
 * cron.c: parsing 5-field cron expressions and finding their next matching minute (UTC).
 */
#include "batch/cron.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

struct field {
    const char *name;
    int lo, hi;
    const char *const *names; /* names[i] is value lo + i; NULL if none */
};

static const char *const month_names[] = {"JAN", "FEB", "MAR", "APR", "MAY", "JUN",
                                          "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"};
static const char *const day_names[] = {"SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN"};

static const struct field fields[5] = {
    {"minute", 0, 59, NULL},          {"hour", 0, 23, NULL},
    {"day of month", 1, 31, NULL},    {"month", 1, 12, month_names},
    {"day of week", 0, 7, day_names},
};

/* A number or a name at *p; advances *p. -1 if neither. */
static int value(const struct field *f, const char **p)
{
    const char *s = *p;

    if (isdigit((unsigned char)*s)) {
        long v = 0;
        while (isdigit((unsigned char)*s) && v < 1000)
            v = v * 10 + (*s++ - '0');
        *p = s;
        return (int)v;
    }
    if (f->names && isalpha((unsigned char)s[0]) && isalpha((unsigned char)s[1]) &&
        isalpha((unsigned char)s[2])) {
        for (int i = 0; i <= f->hi - f->lo; i++) {
            if (strncasecmp(s, f->names[i], 3) == 0) {
                *p = s + 3;
                return f->lo + i;
            }
        }
    }
    return -1;
}

/* Parses one field (`len` bytes at `s`) into a bit set. */
static int parse_field(const struct field *f, const char *s, size_t len, uint64_t *bits, int *any,
                       struct err *e)
{
    char text[64];
    const char *p;

    if (len >= sizeof(text))
        return err_set(e, ERR_INVALID, "cron %s field is too long", f->name);
    memcpy(text, s, len);
    text[len] = '\0';
    *bits = 0;
    *any = strcmp(text, "*") == 0 || strcmp(text, "?") == 0;
    p = text;
    for (;;) {
        int lo, hi, step = 1;
        if (*p == '*' || *p == '?') {
            lo = f->lo;
            hi = f->hi;
            p++;
        } else {
            lo = value(f, &p);
            if (lo < 0)
                return err_set(e, ERR_INVALID, "cron %s field '%s': expected a number%s", f->name,
                               text, f->names ? " or a name" : "");
            hi = lo;
            if (*p == '-') {
                p++;
                hi = value(f, &p);
                if (hi < 0)
                    return err_set(e, ERR_INVALID, "cron %s field '%s': bad range end", f->name,
                                   text);
            }
        }
        if (*p == '/') {
            const char *q = ++p;
            long v = 0;
            while (isdigit((unsigned char)*p) && v < 1000)
                v = v * 10 + (*p++ - '0');
            if (p == q || v < 1)
                return err_set(e, ERR_INVALID, "cron %s field '%s': bad step", f->name, text);
            step = (int)v;
            if (lo == hi && text[0] != '*')
                hi = f->hi; /* "5/15" means 5-max/15 */
        }
        if (lo < f->lo || hi > f->hi || lo > hi)
            return err_set(e, ERR_INVALID, "cron %s field '%s': values must be %d-%d", f->name,
                           text, f->lo, f->hi);
        for (int v = lo; v <= hi; v += step)
            *bits |= 1ULL << v;
        if (*p == '\0')
            break;
        if (*p != ',')
            return err_set(e, ERR_INVALID, "cron %s field '%s': unexpected '%c'", f->name, text,
                           *p);
        p++;
    }
    return 0;
}

int cron_parse(const char *expr, struct cron *out, struct err *e)
{
    uint64_t bits[5];
    int any[5], n = 0, rc;
    const char *p = expr;

    memset(out, 0, sizeof(*out));
    while (n < 5) {
        const char *start;
        while (*p == ' ' || *p == '\t')
            p++;
        if (!*p)
            break;
        start = p;
        while (*p && *p != ' ' && *p != '\t')
            p++;
        rc = parse_field(&fields[n], start, (size_t)(p - start), &bits[n], &any[n], e);
        if (rc != 0)
            return rc;
        n++;
    }
    while (*p == ' ' || *p == '\t')
        p++;
    if (n != 5 || *p)
        return err_set(e, ERR_INVALID,
                       "cron expression '%.64s' must have 5 fields: minute hour day-of-month "
                       "month day-of-week",
                       expr);
    out->minutes = bits[0];
    out->hours = (uint32_t)bits[1];
    out->days = (uint32_t)bits[2];
    out->months = (uint16_t)bits[3];
    out->weekdays = (uint8_t)((bits[4] | (bits[4] >> 7)) & 0x7f); /* 7 is Sunday */
    out->days_any = any[2];
    out->weekdays_any = any[4];
    return 0;
}

static int day_matches(const struct cron *c, const struct tm *t)
{
    int dom = (c->days >> t->tm_mday) & 1, dow = (c->weekdays >> t->tm_wday) & 1;

    if (c->days_any && c->weekdays_any)
        return 1;
    if (c->days_any)
        return dow;
    if (c->weekdays_any)
        return dom;
    return dom || dow;
}

int64_t cron_next(const struct cron *c, int64_t after_ms)
{
    time_t t = (time_t)(after_ms / 1000);
    time_t limit = t + (time_t)5 * 366 * 86400;
    struct tm tm;

    t = t - t % 60 + 60; /* the next whole minute */
    while (t <= limit) {
        gmtime_r(&t, &tm);
        if (!((c->months >> (tm.tm_mon + 1)) & 1) || !day_matches(c, &tm)) {
            t += 86400 - (tm.tm_hour * 3600 + tm.tm_min * 60); /* next day, 00:00 */
            continue;
        }
        if (!((c->hours >> tm.tm_hour) & 1)) {
            t += 3600 - tm.tm_min * 60; /* next hour */
            continue;
        }
        if ((c->minutes >> tm.tm_min) & 1)
            return (int64_t)t * 1000;
        t += 60;
    }
    return -1;
}
