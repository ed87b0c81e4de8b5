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

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_every_minute),
        cmocka_unit_test(test_fields),
        cmocka_unit_test(test_never),
        cmocka_unit_test(test_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
