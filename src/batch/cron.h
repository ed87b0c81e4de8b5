/*
 * cron.h: 5-field cron expressions (minute hour day-of-month month day-of-week), in UTC or in
 * an IANA time zone, and the templates that put a run's scheduled time into its locations.
 *
 * Each field takes `*`, numbers, ranges `a-b`, lists `a,b`, steps `*\/n` and `a-b/n`; months
 * and days of the week also by name (JAN..DEC, SUN..SAT; 7 is Sunday too). As in Vixie cron,
 * when both day fields are restricted a day matches if either does. The macros @hourly,
 * @daily (@midnight), @weekly, @monthly and @yearly (@annually) stand for "0 * * * *",
 * "0 0 * * *", "0 0 * * 0", "0 0 1 * *" and "0 0 1 1 *".
 *
 * In a time zone the fields are wall-clock time there. Where daylight saving time moves the
 * clock, a time that does not exist (the hour skipped in spring) runs as if the clock had not
 * moved yet, so that much later on the new clock (02:30 becomes 03:30), and a time that exists
 * twice (the hour repeated in autumn) runs once, at its first occurrence.
 */
#ifndef INFERD_CRON_H
#define INFERD_CRON_H

#include "core/err.h"

#include <stdint.h>
#include <time.h>

struct cron {
    uint64_t minutes; /* bit m: minute m (0-59) */
    uint32_t hours;   /* 0-23 */
    uint32_t days;    /* 1-31 */
    uint16_t months;  /* 1-12 */
    uint8_t weekdays; /* 0-6, Sunday 0 */
    int days_any, weekdays_any;
};

/* Parses `expr`; ERR_INVALID names the field and what is wrong with it. */
int cron_parse(const char *expr, struct cron *out, struct err *e);

/* The first matching minute strictly after `after_ms` (ms since the epoch, UTC), in ms; -1 if
 * none within the next 5 years (e.g. "0 0 31 2 *"). */
int64_t cron_next(const struct cron *c, int64_t after_ms);

/* An IANA time zone read from the system's tzdata (/usr/share/zoneinfo, or $TZDIR). */
struct cron_zone;

/* Opens zone `name` ("Europe/Paris", "UTC"); ERR_INVALID for a name that is not a zone file
 * of the system's tzdata. `*out` is new: cron_zone_close(). Thread-safe. */
int cron_zone_open(const char *name, struct cron_zone **out, struct err *e);
void cron_zone_close(struct cron_zone *z);

/* The wall-clock time in `z` (NULL: UTC) at `ms` since the epoch. */
void cron_zone_time(const struct cron_zone *z, int64_t ms, struct tm *out);

/* cron_next() with the fields read as wall-clock time in `z` (NULL: UTC), by the rule above
 * for the times daylight saving time skips or repeats. */
int64_t cron_next_in(const struct cron *c, const struct cron_zone *z, int64_t after_ms);

/*
 * Expands the fields of a location template with the time `at` (a wall-clock time):
 *   {date} YYYY-MM-DD   {year} YYYY   {month} MM   {day} DD   {hour} HH   {minute} MM
 *   {%...} strftime conversions %Y %y %m %d %H %M %j (day of the year) %u (weekday 1-7,
 *          Monday 1) %V (ISO week) %G (ISO year) %F (%Y-%m-%d) and %% (a per cent sign),
 *          with any other characters copied, e.g. {%Y/%m/%d} or {%G-W%V}
 * Text outside braces is copied. ERR_INVALID names an unknown field or conversion and an
 * unclosed brace. `*out` is new: free().
 */
int cron_template_expand(const char *tmpl, const struct tm *at, char **out, struct err *e);

#endif
