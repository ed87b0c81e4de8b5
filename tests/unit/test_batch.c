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
    assert_string_equal(why, "column 2: not a number");
    free(why);
    /* not NUL-terminated: only `len` bytes count */
    assert_null(batch_parse_csv("1,2,3,garbage", 5, 3, row));
    assert_true(row[2] == 3.0f);
}

/* A NUL byte does not end a record: the record is bad, whatever follows the NUL (issue 13:
 * "35 columns count as 30" came from reading records as C strings). */
static void test_nul_records(void **state)
{
    static const struct {
        int csv;
        const char *text;
        size_t len;
        const char *why;
    } bad[] = {
        {1, "1,2\0,3", 6, "NUL byte at position 4"},
        {1, "1,2,3\0,4,5", 10, "NUL byte at position 6"}, /* more columns hide behind it */
        {1, "1,2,3\0", 6, "NUL byte at position 6"},      /* strtof stops at it */
        {1, "\0,2,3", 5, "NUL byte at position 1"},
        {0, "[1,2,3]\0", 8, "NUL byte at position 8"},
        {0, "[1,\0 2,3]", 9, "NUL byte at position 4"},
        {0, "[1,2,3\0,4]", 10, "NUL byte at position 7"},
    };
    float row[3];

    (void)state;
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char *why = bad[i].csv ? batch_parse_csv(bad[i].text, bad[i].len, 3, row)
                               : batch_parse_jsonl(bad[i].text, bad[i].len, 3, row);
        assert_non_null(why);
        assert_string_equal(why, bad[i].why);
        free(why);
    }
    /* the same records without the NUL are good */
    assert_null(batch_parse_csv("1,2,3", 5, 3, row));
    assert_null(batch_parse_jsonl("[1,2,3]", 7, 3, row));
}

/* Records come from storage: a reason names the column or position and the problem, and quotes
 * nothing of the record (a job over /etc/passwd must not copy it into .errors). */
static void test_reasons_quote_nothing(void **state)
{
    static const char *const lines[] = {
        "root:x:0:0:root:/root:/bin/bash",
        "secretword",
        "secretword,2,3",
        "[secretword, 2, 3]",
        "[\"secretword\", 2, 3]",
        "{\"secretword\": 1}",
        "[1, 2, \"\\uD8secretword\"]",
        "[1, 2, \"\\u12\"]",
        "[1, 2, 3] secretword",
        "[1, 2, 1e999999]",
        "[1, 2, \"a\tsecretword\"]",
    };
    float row[3];

    (void)state;
    for (size_t i = 0; i < sizeof(lines) / sizeof(lines[0]); i++) {
        for (int csv = 0; csv < 2; csv++) {
            size_t len = strlen(lines[i]);
            char *why = csv ? batch_parse_csv(lines[i], len, 3, row)
                            : batch_parse_jsonl(lines[i], len, 3, row);
            assert_non_null(why);
            if (strstr(why, "root") || strstr(why, "secret") || strstr(why, "D8") ||
                strstr(why, "u12") || strstr(why, "999"))
                fail_msg("reason '%s' for record '%s' quotes it", why, lines[i]);
            free(why);
        }
    }
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
        cmocka_unit_test(test_jsonl_records), cmocka_unit_test(test_csv_records),
        cmocka_unit_test(test_nul_records),   cmocka_unit_test(test_reasons_quote_nothing),
        cmocka_unit_test(test_file_storage),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
