/*
 * cron.h: 5-field cron expressions (minute hour day-of-month month day-of-week), in UTC.
 *
 * Each field takes `*`, numbers, ranges `a-b`, lists `a,b`, steps `*\/n` and `a-b/n`; months
 * and days of the week also by name (JAN..DEC, SUN..SAT; 7 is Sunday too). As in Vixie cron,
 * when both day fields are restricted a day matches if either does.
 */
#ifndef INFERD_CRON_H
#define INFERD_CRON_H

#include "core/err.h"

#include <stdint.h>

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

#endif
