/*
 * test_columns.c: key columns and feature names of batch records (batch/columns.h): headers
 * mapped by name in any order, positions, JSON objects and arrays, and the errors that name
 * the column.
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "batch/columns.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static const char *const names[] = {"f_age", "f_income", "f_score"};

static void header(struct batch_columns *c, const char *line, int want_rc, const char *words)
{
    char **cols = NULL;
    size_t n = 0;
    struct err e = {0};

    assert_int_equal(batch_columns_split_header(line, strlen(line), &cols, &n, &e), 0);
    assert_int_equal(batch_columns_named(c, cols, n, &e), want_rc);
    if (words)
        assert_non_null(strstr(e.msg, words));
    for (size_t i = 0; i < n; i++)
        free(cols[i]);
    free(cols);
}

static void test_keys_parse(void **state)
{
    struct batch_keys k;
    struct err e = {0};

    (void)state;
    assert_int_equal(batch_keys_parse(" id , region", &k, &e), 0);
    assert_int_equal(k.n, 2);
    assert_string_equal(k.names[0], "id");
    assert_string_equal(k.names[1], "region");
    batch_keys_release(&k);
    assert_int_equal(batch_keys_parse("id,,x", &k, &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "empty name"));
    assert_int_equal(batch_keys_parse("id,id", &k, &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "'id' is named twice"));
    assert_int_equal(batch_keys_parse("", &k, &e), 0);
    assert_int_equal(k.n, 0);
}

static void test_header_by_name(void **state)
{
    struct features f;
    struct batch_keys k;
    struct batch_columns c;
    struct buf keys = {0};
    struct err e = {0};
    float row[3];
    char *why;

    (void)state;
    assert_int_equal(features_init(&f, names, NULL, 3, &e), 0);
    assert_int_equal(batch_keys_parse("id", &k, &e), 0);
    batch_columns_init(&c, &k, &f, 3);
    header(&c, "\xEF\xBB\xBF\"f_score\",id, f_age ,f_income", 0, NULL);
    assert_false(c.identity);
    assert_string_equal(c.key_names[0], "id");
    why = batch_columns_parse_csv(&c, "3.5,cust-1,41,,", 15, row, &keys);
    assert_non_null(why); /* five columns for four */
    free(why);
    why = batch_columns_parse_csv(&c, "3.5,cust-1,41,", 14, row, &keys);
    assert_null(why);
    assert_true(row[0] == 41 && isnan(row[1]) && row[2] == 3.5f);
    assert_int_equal(keys.len, 7);
    assert_memory_equal(keys.data, "cust-1,", 7);
    why = batch_columns_parse_csv(&c, "x,cust-1,41,1", 13, row, &keys);
    assert_non_null(strstr(why, "column 1: not a number"));
    free(why);
    header(&c, "f_score,id,f_age", ERR_INVALID, "feature 'f_income'");
    header(&c, "f_score,id,f_age,f_income,zip", ERR_INVALID, "column 'zip' is neither");
    header(&c, "f_score,f_age,f_income", ERR_INVALID, "no key column 'id'");
    header(&c, "f_score,id,f_age,f_income,f_age", ERR_INVALID, "'f_age' appears twice");
    batch_columns_release(&c);
    batch_keys_release(&k);
    /* no keys, names in order: the plain parser applies */
    batch_columns_init(&c, NULL, &f, 3);
    header(&c, "f_age,f_income,f_score", 0, NULL);
    assert_true(c.identity);
    batch_columns_release(&c);
    features_release(&f);
    buf_release(&keys);
}

static void test_header_without_names(void **state)
{
    struct features none = {0};
    struct batch_columns c;

    (void)state;
    batch_columns_init(&c, NULL, &none, 3);
    header(&c, "a,b,c", 0, NULL);
    assert_true(c.by_position && c.identity);
    header(&c, "a,b", ERR_INVALID, "model takes 3 features");
    header(&c, "a,b,c,d", ERR_INVALID, "model takes 3 features");
    batch_columns_release(&c);
}

static void test_positions_and_json(void **state)
{
    struct features f;
    struct batch_keys k;
    struct batch_columns c;
    struct buf keys = {0};
    struct err e = {0};
    float row[3];
    char *why;
    const char *arr = "[1, \"k\", 2, null]";
    const char *obj = "{\"f_income\": 2, \"f_score\": null, \"id\": {\"a\": 1}, \"f_age\": 1}";

    (void)state;
    assert_int_equal(features_init(&f, names, NULL, 3, &e), 0);
    assert_int_equal(batch_keys_parse("1", &k, &e), 0);
    batch_columns_init(&c, &k, &f, 3);
    assert_int_equal(batch_columns_positional(&c, &e), 0);
    assert_string_equal(c.key_names[0], "column_1");
    assert_null(batch_columns_parse_json(&c, arr, strlen(arr), row, &keys));
    assert_true(row[0] == 1 && row[1] == 2 && isnan(row[2]));
    assert_string_equal(keys.data, "\"column_1\":\"k\",");
    keys.len = 0;
    why = batch_columns_parse_csv(&c, "1,2,3", 5, row, &keys);
    assert_non_null(strstr(why, "expected 4 columns, got 3"));
    free(why);
    batch_columns_release(&c);
    batch_keys_release(&k);

    assert_int_equal(batch_keys_parse("id", &k, &e), 0);
    batch_columns_init(&c, &k, &f, 3);
    assert_int_equal(batch_columns_positional(&c, &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "'id'"));
    assert_null(batch_columns_parse_json(&c, obj, strlen(obj), row, &keys));
    assert_true(row[0] == 1 && row[1] == 2 && isnan(row[2]));
    keys.data[keys.len] = '\0';
    assert_string_equal(keys.data, "\"id\":{\"a\":1},");
    why = batch_columns_parse_json(&c, arr, strlen(arr), row, &keys);
    assert_non_null(strstr(why, "give JSON objects"));
    free(why);
    const char *no_key = "{\"f_age\":1,\"f_income\":1,\"f_score\":1}";
    const char *no_score = "{\"f_age\":1,\"f_income\":1,\"id\":1}";
    const char *odd = "{\"f_age\":1,\"f_income\":1,\"id\":1,\"a\\u0001\":1}";
    why = batch_columns_parse_json(&c, no_key, strlen(no_key), row, &keys);
    assert_non_null(strstr(why, "missing key column 'id'"));
    free(why);
    why = batch_columns_parse_json(&c, no_score, strlen(no_score), row, &keys);
    assert_non_null(strstr(why, "missing feature 'f_score'"));
    free(why);
    why = batch_columns_parse_json(&c, odd, strlen(odd), row, &keys);
    assert_non_null(strstr(why, "field 4 is neither"));
    free(why);
    batch_columns_release(&c);
    batch_keys_release(&k);
    features_release(&f);
    buf_release(&keys);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_keys_parse),
        cmocka_unit_test(test_header_by_name),
        cmocka_unit_test(test_header_without_names),
        cmocka_unit_test(test_positions_and_json),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
