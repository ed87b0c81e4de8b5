/*
 * test_split.c: splitting a warehouse source into key ranges (server batch jobs): the
 * PostgreSQL statement that finds the split points, and the parts' bounds made from them
 * (a repeated key adds no empty part; the first part starts open, the last ends open).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "warehouse/postgres_internal.h"

#include <stdlib.h>
#include <string.h>

static void test_split_sql_one_key(void **state)
{
    const char *keys[] = {"\"id\""};
    struct buf sql = {0};

    (void)state;
    assert_int_equal(warehouse_pg_split_sql("\"public\".\"feat\"", keys, 1, 250, &sql), 0);
    assert_string_equal(sql.data,
                        "SELECT \"id\"::text FROM (SELECT \"id\", row_number() OVER w AS "
                        "inferd_rn, lead(true, 1, false) OVER w AS inferd_more FROM "
                        "\"public\".\"feat\" WINDOW w AS (ORDER BY \"id\")) AS inferd_keys "
                        "WHERE inferd_rn % 250 = 0 AND inferd_more ORDER BY inferd_rn");
    buf_release(&sql);
}

static void test_split_sql_composite_key_over_a_query(void **state)
{
    const char *keys[] = {"\"Region\"", "n"};
    struct buf sql = {0};

    (void)state;
    assert_int_equal(
        warehouse_pg_split_sql("(SELECT * FROM t) AS inferd_source", keys, 2, 1000000, &sql), 0);
    assert_non_null(
        strstr(sql.data, "SELECT \"Region\"::text, n::text FROM (SELECT \"Region\", n, "));
    assert_non_null(strstr(sql.data, "FROM (SELECT * FROM t) AS inferd_source WINDOW w AS "
                                     "(ORDER BY \"Region\", n))"));
    assert_non_null(strstr(sql.data, "inferd_rn % 1000000 = 0"));
    buf_release(&sql);
}

static void test_parts_from_split_points(void **state)
{
    struct warehouse_split s = {.n_keys = 2, .n_parts = 1};
    const char *a[] = {"eu", "7"}, *b[] = {"eu", "9"}, *c[] = {"us", "1"};

    (void)state;
    /* no split point: one part, open at both ends */
    assert_null(warehouse_split_after(&s, 0));
    assert_null(warehouse_split_upto(&s, 0));
    assert_int_equal(warehouse_split_add(&s, a), 0);
    assert_int_equal(warehouse_split_add(&s, a), 0); /* the same key again: no empty part */
    assert_int_equal(warehouse_split_add(&s, b), 0);
    assert_int_equal(warehouse_split_add(&s, c), 0);
    assert_int_equal(s.n_parts, 4);
    assert_null(warehouse_split_after(&s, 0));
    assert_string_equal(warehouse_split_upto(&s, 0)[0], "eu");
    assert_string_equal(warehouse_split_upto(&s, 0)[1], "7");
    assert_string_equal(warehouse_split_after(&s, 1)[1], "7"); /* after the previous upto */
    assert_string_equal(warehouse_split_upto(&s, 1)[1], "9");
    assert_string_equal(warehouse_split_after(&s, 3)[0], "us");
    assert_null(warehouse_split_upto(&s, 3));
    assert_null(warehouse_split_after(&s, 4)); /* past the last part */
    warehouse_split_release(&s);
    assert_int_equal(s.n_parts, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_split_sql_one_key),
        cmocka_unit_test(test_split_sql_composite_key_over_a_query),
        cmocka_unit_test(test_parts_from_split_points),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
