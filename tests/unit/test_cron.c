/*
 * test_cron.c: cron expressions: parsing (fields, ranges, lists, steps, names, errors) and
 * the next matching minute, in UTC.
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "batch/cron.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ms since the epoch for a UTC date and time */
static int64_t utc(int y, int mon, int d, int h, int min)
{
    struct tm tm = {.tm_year = y - 1900, .tm_mon = mon - 1, .tm_mday = d, .tm_hour = h,
                    .tm_min = min};
    return (int64_t)timegm(&tm) * 1000;
}

static int64_t next(const char *expr, int64_t after)
{
    struct cron c;
    struct err e;

    assert_int_equal(cron_parse(expr, &c, &e), 0);
    return cron_next(&c, after);
}

static void test_every_minute(void **state)
{
    (void)state;
    assert_int_equal(next("* * * * *", utc(2030, 1, 1, 0, 0) + 30000), utc(2030, 1, 1, 0, 1));
    /* strictly after: a time on the minute gives the next one */
    assert_int_equal(next("* * * * *", utc(2030, 1, 1, 0, 1)), utc(2030, 1, 1, 0, 2));
}

static void test_fields(void **state)
{
    int64_t t = utc(2030, 1, 1, 10, 7); /* a Tuesday */

    (void)state;
    assert_int_equal(next("*/15 * * * *", t), utc(2030, 1, 1, 10, 15));
    assert_int_equal(next("5,50 * * * *", t), utc(2030, 1, 1, 10, 50));
    assert_int_equal(next("0 9-17/4 * * *", t), utc(2030, 1, 1, 13, 0));
    assert_int_equal(next("30 2 * * *", t), utc(2030, 1, 2, 2, 30));
    assert_int_equal(next("0 0 1 * *", t), utc(2030, 2, 1, 0, 0));
    assert_int_equal(next("0 0 * * SUN", t), utc(2030, 1, 6, 0, 0));
    assert_int_equal(next("0 0 * * 7", t), utc(2030, 1, 6, 0, 0));
    assert_int_equal(next("0 12 * JUN mon-fri", t), utc(2030, 6, 3, 12, 0));
    assert_int_equal(next("0 0 29 2 *", t), utc(2032, 2, 29, 0, 0));
    /* both day fields restricted: either matches (the 15th, or a Friday) */
    assert_int_equal(next("0 0 15 * 5", t), utc(2030, 1, 4, 0, 0));
}

static void test_never(void **state)
{
    (void)state;
    assert_int_equal(next("0 0 31 2 *", utc(2030, 1, 1, 0, 0)), -1);
}

static void test_errors(void **state)
{
    const char *bad[] = {"",          "* * * *",    "* * * * * *", "60 * * * *", "* 24 * * *",
                         "* * 0 * *", "* * * 13 *", "* * * * 8",   "*/0 * * * *", "5-1 * * * *",
                         "a * * * *", "1,,2 * * * *", "* * * FOO *", "1- * * * *",
                         "99999999999999 * * * *"};
    struct cron c;
    struct err e;

    (void)state;
    for (size_t i = 0; i < sizeof(bad) / sizeof(*bad); i++) {
        assert_int_equal(cron_parse(bad[i], &c, &e), ERR_INVALID);
        assert_true(strlen(e.msg) > 0);
    }
    assert_int_equal(cron_parse("61 * * * *", &c, &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "minute"));
    assert_int_equal(cron_parse("* * * * * *", &c, &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "5 fields"));
}

static void test_macros(void **state)
{
    int64_t t = utc(2030, 1, 1, 10, 7); /* a Tuesday */
    struct cron c;
    struct err e;

    (void)state;
    assert_int_equal(next("@hourly", t), utc(2030, 1, 1, 11, 0));
    assert_int_equal(next("@daily", t), utc(2030, 1, 2, 0, 0));
    assert_int_equal(next(" @midnight ", t), utc(2030, 1, 2, 0, 0));
    assert_int_equal(next("@weekly", t), utc(2030, 1, 6, 0, 0));
    assert_int_equal(next("@monthly", t), utc(2030, 2, 1, 0, 0));
    assert_int_equal(next("@yearly", t), utc(2031, 1, 1, 0, 0));
    assert_int_equal(next("@annually", t), utc(2031, 1, 1, 0, 0));
    assert_int_equal(cron_parse("@fortnightly", &c, &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "@fortnightly"));
    assert_int_equal(cron_parse("@hourly 5", &c, &e), ERR_INVALID);
}

static int64_t next_in(const char *expr, const char *zone, int64_t after)
{
    struct cron c;
    struct cron_zone *z = NULL;
    struct err e;
    int64_t v;

    assert_int_equal(cron_parse(expr, &c, &e), 0);
    assert_int_equal(cron_zone_open(zone, &z, &e), 0);
    v = cron_next_in(&c, z, after);
    cron_zone_close(z);
    return v;
}

static void test_zones(void **state)
{
    struct cron_zone *z = NULL;
    struct err e;
    struct tm tm;

    (void)state;
    /* winter in Paris is UTC+1, summer UTC+2; New York UTC-5 */
    assert_int_equal(next_in("@daily", "Europe/Paris", utc(2030, 1, 1, 10, 0)),
                     utc(2030, 1, 1, 23, 0));
    assert_int_equal(next_in("0 9 * * *", "Europe/Paris", utc(2030, 7, 1, 10, 0)),
                     utc(2030, 7, 2, 7, 0));
    assert_int_equal(next_in("0 9 * * *", "America/New_York", utc(2030, 1, 1, 10, 0)),
                     utc(2030, 1, 1, 14, 0));
    assert_int_equal(next_in("@hourly", "UTC", utc(2030, 1, 1, 10, 7)), utc(2030, 1, 1, 11, 0));
    /* far past the tzdata's last listed transition: the zone's rule still applies */
    assert_int_equal(next_in("0 9 * * *", "Europe/Paris", utc(2090, 7, 1, 10, 0)),
                     utc(2090, 7, 2, 7, 0));
    assert_int_equal(cron_zone_open("Europe/Paris", &z, &e), 0);
    cron_zone_time(z, utc(2030, 7, 1, 22, 30), &tm);
    assert_int_equal(tm.tm_mday, 2);
    assert_int_equal(tm.tm_hour, 0);
    cron_zone_close(z);
    const char *bad[] = {"Mars/Olympus",     "",        "/etc/passwd",
                         "../../etc/passwd", "Europe/", "CET-1CEST,M3.5.0,M10.5.0/3",
                         "zone.tab"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(*bad); i++) {
        assert_int_equal(cron_zone_open(bad[i], &z, &e), ERR_INVALID);
        assert_null(z);
        assert_non_null(strstr(e.msg, "time zone"));
    }
}

static void test_dst(void **state)
{
    (void)state;
    /* Paris, 2030-03-31: 02:00 CET jumps to 03:00 CEST (01:00 UTC). 02:30 does not exist:
     * it runs an hour later on the new clock, 03:30 CEST (01:30 UTC); 03:15 stays 01:15 UTC */
    assert_int_equal(next_in("30 2 * * *", "Europe/Paris", utc(2030, 3, 30, 12, 0)),
                     utc(2030, 3, 31, 1, 30));
    assert_int_equal(next_in("15 3 * * *", "Europe/Paris", utc(2030, 3, 30, 12, 0)),
                     utc(2030, 3, 31, 1, 15));
    /* hourly across the jump: 01:00 CET (00:00 UTC), then 03:00 CEST (01:00 UTC) once */
    assert_int_equal(next_in("@hourly", "Europe/Paris", utc(2030, 3, 31, 0, 0)),
                     utc(2030, 3, 31, 1, 0));
    assert_int_equal(next_in("@hourly", "Europe/Paris", utc(2030, 3, 31, 1, 0)),
                     utc(2030, 3, 31, 2, 0));
    /* 2030-10-27: 03:00 CEST goes back to 02:00 CET (01:00 UTC). 02:30 happens twice
     * (00:30 and 01:30 UTC): it runs once, at the first */
    assert_int_equal(next_in("30 2 * * *", "Europe/Paris", utc(2030, 10, 26, 12, 0)),
                     utc(2030, 10, 27, 0, 30));
    assert_int_equal(next_in("30 2 * * *", "Europe/Paris", utc(2030, 10, 27, 0, 30)),
                     utc(2030, 10, 28, 1, 30));
    /* hourly: 02:00 CEST (00:00 UTC), then 03:00 CET (02:00 UTC): 02:00 CET is a repeat */
    assert_int_equal(next_in("@hourly", "Europe/Paris", utc(2030, 10, 27, 0, 0)),
                     utc(2030, 10, 27, 2, 0));
}

static char *expand(const char *tmpl, int64_t ms)
{
    struct tm tm;
    struct err e;
    char *out = NULL;

    cron_zone_time(NULL, ms, &tm);
    assert_int_equal(cron_template_expand(tmpl, &tm, &out, &e), 0);
    return out;
}

static void test_templates(void **state)
{
    int64_t t = utc(2030, 1, 6, 7, 5); /* a Sunday */
    const char *bad[] = {"s3://b/{dat}/", "s3://b/{date", "{%Q}", "{%}", "{hour}{}", "{{date}}"};
    struct tm tm;
    struct err e;
    char *s;

    (void)state;
    s = expand("s3://b/events/{date}/{hour}/", t);
    assert_string_equal(s, "s3://b/events/2030-01-06/07/");
    free(s);
    s = expand("/d/{year}/{month}/{day}/{hour}{minute}", t);
    assert_string_equal(s, "/d/2030/01/06/0705");
    free(s);
    s = expand("/d/{%Y/%m/%d}/{%G-W%V}/{%j}-{%u}-{%F}-{%y}-{%%}", t);
    assert_string_equal(s, "/d/2030/01/06/2030-W01/006-7-2030-01-06-30-%");
    free(s);
    s = expand("/plain/path", t);
    assert_string_equal(s, "/plain/path");
    free(s);
    cron_zone_time(NULL, t, &tm);
    for (size_t i = 0; i < sizeof(bad) / sizeof(*bad); i++) {
        s = NULL;
        assert_int_equal(cron_template_expand(bad[i], &tm, &s, &e), ERR_INVALID);
        assert_null(s);
        assert_true(strlen(e.msg) > 0);
    }
    assert_int_equal(cron_template_expand("s3://b/{dat}/", &tm, &s, &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "{dat}"));
    assert_int_equal(cron_template_expand("{%Q}", &tm, &s, &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "%Q"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_every_minute), cmocka_unit_test(test_fields),
        cmocka_unit_test(test_never),        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_macros),       cmocka_unit_test(test_zones),
        cmocka_unit_test(test_dst),          cmocka_unit_test(test_templates),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
