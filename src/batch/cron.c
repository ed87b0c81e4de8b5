/*
 * cron.c: parsing 5-field cron expressions and finding their next matching minute, in UTC or
 * in a time zone; the location templates that carry a run's scheduled time.
 *
 * Time zones come from GLib's GTimeZone, which reads the system's tzdata files (transitions
 * and their POSIX TZ rule for later years) and is thread-safe, unlike glibc's localtime(),
 * which reads one process-wide TZ.
 */
#include "batch/cron.h"

#include <glib.h>

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

static const struct {
    const char *name, *expr;
} macros[] = {
    {"@hourly", "0 * * * *"},   {"@daily", "0 0 * * *"},   {"@midnight", "0 0 * * *"},
    {"@weekly", "0 0 * * 0"},   {"@monthly", "0 0 1 * *"}, {"@yearly", "0 0 1 1 *"},
    {"@annually", "0 0 1 1 *"},
};

/* `expr` without surrounding blanks is the macro `name` */
static int is_macro(const char *expr, const char *name)
{
    size_t len = strlen(name);

    while (*expr == ' ' || *expr == '\t')
        expr++;
    if (strncasecmp(expr, name, len) != 0)
        return 0;
    for (expr += len; *expr == ' ' || *expr == '\t';)
        expr++;
    return *expr == '\0';
}

int cron_parse(const char *expr, struct cron *out, struct err *e)
{
    uint64_t bits[5];
    int any[5], n = 0, rc;
    const char *p = expr;

    memset(out, 0, sizeof(*out));
    for (size_t i = 0; i < sizeof(macros) / sizeof(*macros); i++)
        if (is_macro(expr, macros[i].name))
            return cron_parse(macros[i].expr, out, e);
    while (*p == ' ' || *p == '\t')
        p++;
    if (*p == '@')
        return err_set(e, ERR_INVALID,
                       "unknown cron macro '%.32s': expected @hourly, @daily, @weekly, "
                       "@monthly or @yearly",
                       p);
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

/* The first matching minute at or after `t` (a whole minute, seconds since the epoch of a
 * clock without time zones), no later than `limit`; -1 if none. */
static int64_t match_from(const struct cron *c, time_t t, time_t limit)
{
    struct tm tm;

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
            return (int64_t)t;
        t += 60;
    }
    return -1;
}

int64_t cron_next(const struct cron *c, int64_t after_ms)
{
    time_t t = (time_t)(after_ms / 1000);
    int64_t next;

    t = t - t % 60 + 60; /* the next whole minute */
    next = match_from(c, t, t + (time_t)5 * 366 * 86400);
    return next < 0 ? -1 : next * 1000;
}

/* ---- time zones ---- */

struct cron_zone {
    GTimeZone *tz;
};

/* An IANA name: letters, digits, '_', '+', '-' and '/' between parts, no "..": what GLib
 * would otherwise read as a POSIX TZ rule or a file path never reaches it. */
static int zone_name_ok(const char *name)
{
    size_t len = strlen(name);

    if (len == 0 || len > 64 || name[0] == '/' || name[len - 1] == '/' || strstr(name, "..") ||
        strstr(name, "//"))
        return 0;
    for (const char *p = name; *p; p++)
        if (!isalnum((unsigned char)*p) && !strchr("_+-/", *p))
            return 0;
    return 1;
}

int cron_zone_open(const char *name, struct cron_zone **out, struct err *e)
{
    const char *dir = getenv("TZDIR");
    char path[512];
    FILE *f;
    char magic[4] = {0};
    int is_tzif = 0;

    *out = NULL;
    if (!zone_name_ok(name))
        return err_set(e, ERR_INVALID,
                       "unknown time zone '%.64s': expected an IANA name such as "
                       "Europe/Paris",
                       name);
    snprintf(path, sizeof(path), "%s/%s", dir && dir[0] ? dir : "/usr/share/zoneinfo", name);
    if ((f = fopen(path, "rb")) != NULL) {
        is_tzif = fread(magic, 1, 4, f) == 4 && memcmp(magic, "TZif", 4) == 0;
        fclose(f);
    }
    if (!is_tzif)
        return err_set(e, ERR_INVALID,
                       "unknown time zone '%.64s': not in the system's tzdata "
                       "(%.200s)",
                       name, dir && dir[0] ? dir : "/usr/share/zoneinfo");
    struct cron_zone *z = calloc(1, sizeof(*z));
    if (!z)
        return err_set(e, ERR_NOMEM, "out of memory");
    z->tz = g_time_zone_new_identifier(name);
    if (!z->tz) {
        free(z);
        return err_set(e, ERR_INVALID, "unknown time zone '%.64s'", name);
    }
    *out = z;
    return 0;
}

void cron_zone_close(struct cron_zone *z)
{
    if (!z)
        return;
    g_time_zone_unref(z->tz);
    free(z);
}

/* The zone's offset from UTC (seconds) at `utc_s`. */
static int64_t offset_at(const struct cron_zone *z, int64_t utc_s)
{
    int interval;

    if (!z)
        return 0;
    interval = g_time_zone_find_interval(z->tz, G_TIME_TYPE_UNIVERSAL, (gint64)utc_s);
    return interval < 0 ? 0 : (int64_t)g_time_zone_get_offset(z->tz, interval);
}

void cron_zone_time(const struct cron_zone *z, int64_t ms, struct tm *out)
{
    time_t t = (time_t)((ms - ((ms % 1000) + 1000) % 1000) / 1000 + offset_at(z, ms / 1000));

    gmtime_r(&t, out);
}

/*
 * The instant the wall-clock time `wall` (seconds, read as if UTC) happens: its first
 * occurrence when the clock repeats it, and for a time skipped by a jump forward, the
 * instant it has with the offset in force before the jump (so as much later as the jump).
 * Assumes at most one change of offset within a day of it, as every zone has.
 */
static int64_t instant_of(const struct cron_zone *z, int64_t wall)
{
    int64_t before = offset_at(z, wall - 86400), after = offset_at(z, wall + 86400);
    int64_t u1 = wall - before, u2 = wall - after, best = -1;

    if (offset_at(z, u1) == before)
        best = u1;
    if (offset_at(z, u2) == after && (best < 0 || u2 < best))
        best = u2;
    return best >= 0 ? best : wall - before;
}

int64_t cron_next_in(const struct cron *c, const struct cron_zone *z, int64_t after_ms)
{
    int64_t after_s = after_ms >= 0 ? after_ms / 1000 : -((-after_ms + 999) / 1000);
    /* start three hours of wall clock early: a time skipped by a jump forward runs later
     * than the wall-clock times after it */
    int64_t wall = after_s + offset_at(z, after_s) - 3 * 3600;
    int64_t limit = wall + (int64_t)5 * 366 * 86400, best = -1, stop = limit;

    if (!z)
        return cron_next(c, after_ms);
    wall -= ((wall % 60) + 60) % 60;
    for (;;) {
        int64_t m = match_from(c, (time_t)wall, (time_t)(stop < limit ? stop : limit));
        if (m < 0)
            break;
        int64_t u = instant_of(z, m);
        if (u > after_s && (best < 0 || u < best)) {
            if (best < 0)
                stop = m + 4 * 3600; /* a later wall-clock time may still happen earlier */
            best = u;
        }
        wall = m + 60;
    }
    return best < 0 ? -1 : best * 1000;
}

/* ---- location templates ---- */

static const struct {
    const char *name, *format;
} named_fields[] = {
    {"date", "%Y-%m-%d"}, {"year", "%Y"}, {"month", "%m"},
    {"day", "%d"},        {"hour", "%H"}, {"minute", "%M"},
};

/* Appends `format` (checked) expanded with `at` to out[*len] (capacity cap). */
static int put_time(char *out, size_t cap, size_t *len, const char *format, const struct tm *at,
                    struct err *e)
{
    for (const char *p = format; *p; p++) {
        if (*p == '%' && (!p[1] || !strchr("YymdHMjuVGF%", p[1])))
            return err_set(e, ERR_INVALID,
                           "template field '{%.40s}': unknown conversion '%%%c' (known: %%Y %%y "
                           "%%m %%d %%H %%M %%j %%u %%V %%G %%F %%%%)",
                           format, p[1] ? p[1] : ' ');
        if (*p == '%')
            p++;
    }
    /* the format holds only the conversions checked above */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wformat-nonliteral"
    size_t n = strftime(out + *len, cap - *len, format, at);
#pragma GCC diagnostic pop
    if (n == 0 && format[0])
        return err_set(e, ERR_TOO_LARGE, "template: the location is too long");
    *len += n;
    return 0;
}

int cron_template_expand(const char *tmpl, const struct tm *at, char **out, struct err *e)
{
    size_t cap = strlen(tmpl) * 6 + 64, len = 0; /* a field grows at most 5 times */
    char *s = malloc(cap), field[64];
    int rc = 0;

    *out = NULL;
    if (!s)
        return err_set(e, ERR_NOMEM, "out of memory");
    for (const char *p = tmpl; *p && rc == 0;) {
        const char *close;
        if (*p != '{') {
            s[len++] = *p++;
            continue;
        }
        close = strchr(p, '}');
        if (!close || (size_t)(close - p - 1) >= sizeof(field)) {
            rc = err_set(e, ERR_INVALID, "template: '{' at offset %zu is not closed by '}'",
                         (size_t)(p - tmpl));
            break;
        }
        memcpy(field, p + 1, (size_t)(close - p - 1));
        field[close - p - 1] = '\0';
        const char *format = field[0] == '%' ? field : NULL;
        for (size_t i = 0; !format && i < sizeof(named_fields) / sizeof(*named_fields); i++)
            if (strcmp(field, named_fields[i].name) == 0)
                format = named_fields[i].format;
        if (!format || strchr(field, '{'))
            rc = err_set(e, ERR_INVALID,
                         "unknown template field '{%s}' (known: {date} {year} {month} {day} "
                         "{hour} {minute} and {%%...} with strftime conversions)",
                         field);
        else
            rc = put_time(s, cap, &len, format, at, e);
        p = close + 1;
    }
    if (rc != 0) {
        free(s);
        return rc;
    }
    s[len] = '\0';
    *out = s;
    return 0;
}
