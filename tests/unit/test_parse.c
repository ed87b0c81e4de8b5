/*
 * test_parse.c: the batch record parsers' fast number paths against the C library: every CSV
 * value must be exactly strtof's, and every JSON Lines value exactly what jansson gives
 * (strtod, then float), over millions of numbers printed every way a writer prints them.
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "batch/batch_internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t rng = 88172645463325252ULL;

static uint64_t next_rand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static int same(float a, float b)
{
    return (isnan(a) && isnan(b)) || memcmp(&a, &b, sizeof(a)) == 0;
}

/* A number as text, in one of the ways writers print them. */
static void random_number(char *out, size_t cap)
{
    uint64_t r = next_rand();
    double v;

    switch (r % 4) {
    case 0: /* a float's shortest-ish text */
        v = (double)(float)((double)(int64_t)next_rand() / 9.3e18 * 3.0);
        break;
    case 1: /* wide range */
        v = ldexp((double)(next_rand() >> 11) / 9007199254740992.0, (int)(next_rand() % 200) - 100);
        break;
    case 2: /* decimal digits near float ties: many digits */
        v = (double)(next_rand() % 100000000000ULL) / 1e9;
        break;
    default: /* integers */
        v = (double)(int64_t)(next_rand() % 2000001) - 1000000.0;
        break;
    }
    if (r & 16)
        v = -v;
    switch ((r >> 8) % 7) {
    case 0:
        snprintf(out, cap, "%.9g", v);
        break;
    case 1:
        snprintf(out, cap, "%.7g", v);
        break;
    case 2:
        snprintf(out, cap, "%.17g", v);
        break;
    case 3:
        snprintf(out, cap, "%.3f", v);
        break;
    case 4:
        snprintf(out, cap, "%.12e", v);
        break;
    case 5:
        snprintf(out, cap, "%g", v);
        break;
    default:
        snprintf(out, cap, "%.8f", v);
        break;
    }
}

static void test_csv_matches_strtof(void **state)
{
    char line[4096], nums[8][64];
    float row[8];

    (void)state;
    for (int iter = 0; iter < 250000; iter++) {
        size_t len = 0;
        for (int i = 0; i < 8; i++) {
            random_number(nums[i], sizeof(nums[i]));
            len += (size_t)snprintf(line + len, sizeof(line) - len, "%s%s", i ? "," : "",
                                    nums[i]);
        }
        char *why = batch_parse_csv(line, len, 8, row);
        if (why)
            fail_msg("'%s': %s", line, why);
        for (int i = 0; i < 8; i++)
            if (!same(row[i], strtof(nums[i], NULL)))
                fail_msg("'%s' read as %.9g, strtof says %.9g", nums[i], (double)row[i],
                         (double)strtof(nums[i], NULL));
    }
}

/* Texts that round (as doubles) exactly onto a midpoint between two floats: only the full
 * text can say which way strtof rounds, so the fast path must step aside. */
static void test_csv_float_ties(void **state)
{
    char line[64];
    float row[1];

    (void)state;
    for (int iter = 0; iter < 200000; iter++) {
        float f = (float)ldexp((double)(next_rand() >> 40) / 16777216.0 + 0.5,
                               (int)(next_rand() % 60) - 30);
        double mid = ((double)f + (double)nextafterf(f, INFINITY)) / 2;
        int len = snprintf(line, sizeof(line), (iter & 1) ? "%.17g" : "%.16g", mid);
        char *why = batch_parse_csv(line, (size_t)len, 1, row);
        if (why)
            fail_msg("'%s': %s", line, why);
        if (!same(row[0], strtof(line, NULL)))
            fail_msg("'%s' read as %.9g, strtof says %.9g", line, (double)row[0],
                     (double)strtof(line, NULL));
    }
}

static void test_jsonl_matches_jansson(void **state)
{
    char line[4096];
    float row[8], ref[8];

    (void)state;
    for (int iter = 0; iter < 100000; iter++) {
        size_t len = 0;
        len += (size_t)snprintf(line, sizeof(line), "[");
        for (int i = 0; i < 8; i++) {
            char num[64];
            random_number(num, sizeof(num));
            if (next_rand() % 50 == 0)
                snprintf(num, sizeof(num), "null");
            len += (size_t)snprintf(line + len, sizeof(line) - len, "%s%s", i ? ", " : "", num);
        }
        len += (size_t)snprintf(line + len, sizeof(line) - len, "]");
        assert_true(batch_parse_jsonl_fast(line, len, 8, row));
        char *why = batch_parse_jsonl_json(line, len, 8, ref);
        if (why)
            fail_msg("'%s': %s", line, why);
        for (int i = 0; i < 8; i++)
            if (!same(row[i], ref[i]))
                fail_msg("'%s': value %d is %.9g, jansson says %.9g", line, i, (double)row[i],
                         (double)ref[i]);
    }
}

static void test_fast_path_declines(void **state)
{
    const char *odd[] = {"[1,2", "[1,2,3]", "[1,\"2\"]", "[1e999,2]", "[01,2]", "[1.,2]",
                         "[.5,2]", "[+1,2]", "[1,2] x", "{\"a\":1}", "[12345678901234567890,2]"};
    float row[2];

    (void)state;
    for (size_t i = 0; i < sizeof(odd) / sizeof(*odd); i++)
        assert_false(batch_parse_jsonl_fast(odd[i], strlen(odd[i]), 2, row));
    assert_true(batch_parse_jsonl_fast(" [ -0 , null ] ", 15, 2, row));
    assert_true(row[0] == 0.0f && !signbit(row[0]) && isnan(row[1]));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_csv_matches_strtof),
        cmocka_unit_test(test_csv_float_ties),
        cmocka_unit_test(test_jsonl_matches_jansson),
        cmocka_unit_test(test_fast_path_declines),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
