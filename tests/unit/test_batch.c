/*
 * test_batch.c: the batch transform's record parsers and the file storage they read from and
 * write to (atomic puts, recursive sorted listing, line reading).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "batch/batch_internal.h"
#include "storage/storage.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void test_jsonl_records(void **state)
{
    float row[3];
    char *why;

    (void)state;
    assert_null(batch_parse_jsonl("[1.5, null, -3]", 15, 3, row));
    assert_true(row[0] == 1.5f && isnan(row[1]) && row[2] == -3.0f);
    why = batch_parse_jsonl("[1, 2]", 6, 3, row);
    assert_string_equal(why, "expected 3 values, got 2");
    free(why);
    why = batch_parse_jsonl("[1, \"a\", 3]", 11, 3, row);
    assert_string_equal(why, "value 2 is not a number");
    free(why);
    why = batch_parse_jsonl("{\"a\": 1}", 8, 3, row);
    assert_non_null(strstr(why, "expected a JSON array of 3 numbers"));
    free(why);
    why = batch_parse_jsonl("[1, 2", 5, 3, row);
    assert_non_null(strstr(why, "malformed JSON"));
    free(why);
}

static void test_csv_records(void **state)
{
    float row[3];
    char *why;

    (void)state;
    assert_null(batch_parse_csv(" 1.5, ,3e2", 10, 3, row));
    assert_true(row[0] == 1.5f && isnan(row[1]) && row[2] == 300.0f);
    why = batch_parse_csv("1,2", 3, 3, row);
    assert_string_equal(why, "expected 3 columns, got 2");
    free(why);
    why = batch_parse_csv("1,2,3,4", 7, 3, row);
    assert_string_equal(why, "expected 3 columns, got more");
    free(why);
    why = batch_parse_csv("1,x2,3", 6, 3, row);
    assert_string_equal(why, "column 2: 'x2' is not a number");
    free(why);
    /* not NUL-terminated: only `len` bytes count */
    assert_null(batch_parse_csv("1,2,3,garbage", 5, 3, row));
    assert_true(row[2] == 3.0f);
}

static void test_file_storage(void **state)
{
    char dir[] = "/tmp/inferd-test-storage-XXXXXX", *uri, **names = NULL, cmd[128];
    struct storage_writer *w = NULL;
    struct storage_reader *r = NULL;
    struct buf b = {0};
    struct err e = {0};
    const char *line;
    size_t len, n = 0;
    int is_object = 0;

    (void)state;
    assert_non_null(mkdtemp(dir));
    uri = storage_join(dir, "sub/a.jsonl");
    /* nothing is visible under the name before the commit */
    assert_int_equal(storage_open_write(uri, &w, &e), 0);
    assert_int_equal(storage_write(w, "one\r\ntwo\n", 9, &e), 0);
    assert_false(storage_exists(uri));
    assert_int_equal(storage_commit(w, &e), 0);
    assert_true(storage_exists(uri));
    assert_int_equal(storage_open_read(uri, &r, &e), 0);
    assert_int_equal(storage_read_line(r, &line, &len, &e), 1);
    assert_int_equal(len, 3);
    assert_memory_equal(line, "one", 3);
    assert_int_equal(storage_read_line(r, &line, &len, &e), 1);
    assert_memory_equal(line, "two", 3);
    assert_int_equal(storage_read_line(r, &line, &len, &e), 0);
    storage_close_read(r);
    /* an aborted write leaves nothing */
    free(uri);
    uri = storage_join(dir, "b.csv");
    assert_int_equal(storage_open_write(uri, &w, &e), 0);
    storage_abort(w);
    assert_false(storage_exists(uri));
    assert_int_equal(storage_put(uri, "x", 1, &e), 0);
    assert_int_equal(storage_get(uri, 1 << 20, &b, &e), 0);
    assert_int_equal(b.len, 1);
    buf_release(&b);
    assert_int_equal(storage_list(dir, &names, &n, &is_object, &e), 0);
    assert_int_equal(n, 2);
    assert_false(is_object);
    assert_string_equal(names[0], "b.csv");
    assert_string_equal(names[1], "sub/a.jsonl");
    storage_names_free(names, n);
    assert_int_equal(storage_list(uri, &names, &n, &is_object, &e), 0);
    assert_true(is_object);
    assert_string_equal(names[0], "b.csv");
    storage_names_free(names, n);
    assert_int_equal(storage_open_read("/nonexistent/x.csv", &r, &e), ERR_NOT_FOUND);
    assert_non_null(strstr(e.msg, "/nonexistent/x.csv"));
    assert_int_equal(storage_open_read("gs://b/k", &r, &e), ERR_INVALID); /* no such backend */
    free(uri);
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_jsonl_records),
        cmocka_unit_test(test_csv_records),
        cmocka_unit_test(test_file_storage),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
