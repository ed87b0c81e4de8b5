/*
 * test_warehouse.c: the warehouse's rows as text: a COPY row's keys rendered as CSV for a
 * table sink (an empty string apart from NULL), and a sink's chunk (scored rows, arrays,
 * missing values, bad rows with their reasons) as the CSV lines its COPY reads, with the
 * resume point and counts committed with it, and a resume point split back into key values.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "warehouse/warehouse_internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void test_csv_keys_empty_string_is_not_null(void **state)
{
    char *names[] = {"region", "n"};
    unsigned char is_number[] = {0, 1};
    struct warehouse_row_layout l = {.n_columns = 3,
                                     .n_keys = 2,
                                     .key_names = names,
                                     .key_is_number = is_number,
                                     .keys_json = 0};
    struct buf features = {0}, keys = {0};
    const char row1[] = "\t7\t1.5", row2[] = "\\N\t8\t2", row3[] = "a,\"b\"\t9\t3";

    (void)state;
    assert_null(warehouse_copy_row(&l, row1, strlen(row1), &features, &keys));
    assert_null(warehouse_copy_row(&l, row2, strlen(row2), &features, &keys));
    assert_null(warehouse_copy_row(&l, row3, strlen(row3), &features, &keys));
    /* "" is an empty string to COPY's CSV, an empty field NULL */
    assert_string_equal(keys.data, "\"\",7,,8,\"a,\"\"b\"\"\",9,");
    buf_release(&features);
    buf_release(&keys);
}

/* The resume point is the keys as rendered, split back into their values exactly. */
static void test_resume_point_splits_into_the_key_values(void **state)
{
    char **v = NULL;
    size_t n = 0;
    const char *bad[] = {",8,", "\"a,", "7", "\"a\"b,", "", "1,,"};

    (void)state;
    assert_int_equal(warehouse_csv_keys("\"\",7,", 5, &v, &n), 0);
    assert_int_equal(n, 2);
    assert_string_equal(v[0], "");
    assert_string_equal(v[1], "7");
    free(v[0]), free(v[1]), free(v);
    const char two[] = "\"a,\"\"b\"\"\",\"x\ty\",-9,";
    assert_int_equal(warehouse_csv_keys(two, strlen(two), &v, &n), 0);
    assert_int_equal(n, 3);
    assert_string_equal(v[0], "a,\"b\"");
    assert_string_equal(v[1], "x\ty");
    assert_string_equal(v[2], "-9");
    for (size_t i = 0; i < n; i++)
        free(v[i]);
    free(v);
    /* NULL (an empty field), an open quote, no closing comma, text after a quote, nothing */
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        assert_int_equal(warehouse_csv_keys(bad[i], strlen(bad[i]), &v, &n), -1);
        assert_null(v);
        assert_int_equal(n, 0);
    }
}

static struct buf written;
static char last_keys[64];
static int64_t seen_records, seen_errors;
static int fail_write;

/* What a warehouse's write sees: the chunk, its resume point and the run's counts. */
static int fake_write(struct warehouse_sink *k, struct err *e)
{
    if (fail_write)
        return err_set(e, ERR_IO, "the server went away");
    snprintf(last_keys, sizeof(last_keys), "%.*s", (int)k->last_keys.len, k->last_keys.data);
    seen_records = k->records;
    seen_errors = k->errors;
    return buf_append(&written, k->rows.data, k->rows.len) ? -1 : 0;
}

static int fake_commit(struct warehouse_sink *k, struct err *e)
{
    (void)k, (void)e;
    return 0;
}

static const struct warehouse_sink_ops fake_ops = {.write = fake_write, .commit = fake_commit};

static void test_sink_chunk_lines(void **state)
{
    struct warehouse_sink k = {.ops = &fake_ops, .name = "public.s", .per_row = 3};
    struct err e = {0};
    float y[3] = {0.25f, NAN, 1e-7f};

    (void)state;
    written.len = 0;
    assert_int_equal(warehouse_sink_put(&k, "5,", 2, y, 3, &e), 0);
    assert_int_equal(warehouse_sink_put_bad(&k, "6,", 2, "value 2 is \"x\"", &e), 0);
    assert_int_equal(warehouse_sink_write(&k, &e), 0);
    assert_int_equal(warehouse_sink_write(&k, &e), 0); /* nothing put: nothing written */
    assert_non_null(written.data);
    assert_string_equal(written.data,
                        "5,\"{0.25,NULL,1.00000001e-07}\",\n6,,\"value 2 is \"\"x\"\"\"\n");
    /* committed with the chunk: the last row's keys (a bad one too) and the counts */
    assert_string_equal(last_keys, "6,");
    assert_int_equal(seen_records, 2);
    assert_int_equal(seen_errors, 1);
    /* a key twice in a row (rows come in key order): an error naming it */
    assert_int_equal(warehouse_sink_put_bad(&k, "6,", 2, "again", &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "public.s: two rows have the keys (6)"));
    /* within a second of the last send and under a mebibyte: kept for the next send */
    assert_int_equal(warehouse_sink_put(&k, "8,", 2, y, 3, &e), 0);
    assert_int_equal(warehouse_sink_write(&k, &e), 0);
    assert_int_equal(k.n_rows, 1);
    assert_int_equal(seen_records, 2);
    /* a second later it goes; a send that fails does not count */
    k.last_send_ns -= 1000000001LL;
    fail_write = 1;
    assert_int_equal(warehouse_sink_write(&k, &e), ERR_IO);
    fail_write = 0;
    assert_int_equal(k.records, 2);
    assert_int_equal(k.errors, 1);
    /* a model giving another width than the table holds: an error naming both */
    assert_int_equal(warehouse_sink_put(&k, "7,", 2, y, 1, &e), ERR_BACKEND);
    assert_non_null(strstr(e.msg, "gave 1 values for a row; the table holds 3"));
    k.per_row = 1;
    written.len = 0;
    y[0] = INFINITY;
    assert_int_equal(warehouse_sink_put(&k, "\"a\",1,", 6, y, 1, &e), 0);
    assert_int_equal(warehouse_sink_commit(&k, &e), 0); /* the end sends what is left */
    assert_string_equal(written.data, "\"a\",1,,\n"); /* no value: NULL */
    assert_string_equal(last_keys, "\"a\",1,");
    assert_int_equal(seen_records, 3);
    buf_release(&k.rows);
    buf_release(&k.last_keys);
    buf_release(&written);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_csv_keys_empty_string_is_not_null),
        cmocka_unit_test(test_sink_chunk_lines),
        cmocka_unit_test(test_resume_point_splits_into_the_key_values),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
