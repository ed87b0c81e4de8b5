/*
 * test_jdoc.c: the read-only JSON documents of core/jdoc.h: every type and accessor, lookups,
 * sizes and array iteration, every way a document is refused (syntax, encoding, depth,
 * duplicate keys), input that is not NUL-terminated, a document past the size whose parser
 * memory jdoc_done() gives back, and a parser per thread.
 *
 * Documents are parsed from a heap copy of exactly their length, with no NUL after them; one
 * test puts documents right before an unmapped page, where any read past the end faults (even
 * one by simdjson itself, which ASan does not see).
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "core/jdoc.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* The heap copy of the last document parsed by parse_len(), kept while its values are used. */
static char *held;

static int parse_len(const char *text, size_t len, struct jdoc_val *root, struct err *e)
{
    free(held);
    held = malloc(len ? len : 1);
    assert_non_null(held);
    memcpy(held, text, len);
    return jdoc_parse(held, len, 0, root, e);
}

static void parse_ok(const char *text, struct jdoc_val *root)
{
    struct err e = {0};
    int rc = parse_len(text, strlen(text), root, &e);

    if (rc != 0)
        print_error("parsing %s: %s\n", text, e.msg);
    assert_int_equal(rc, 0);
}

/* `len` bytes of `text` must be refused as malformed, with `needle` (if any) in the message. */
static void expect_malformed_len(const char *text, size_t len, const char *needle)
{
    struct jdoc_val root;
    struct err e = {0};
    int rc = parse_len(text, len, &root, &e);

    assert_int_equal(rc, ERR_INVALID);
    assert_int_equal(e.code, ERR_INVALID);
    if (strncmp(e.msg, "malformed JSON", strlen("malformed JSON")) != 0)
        print_error("message: %s\n", e.msg);
    assert_int_equal(strncmp(e.msg, "malformed JSON", strlen("malformed JSON")), 0);
    if (needle && !strstr(e.msg, needle))
        print_error("message '%s' lacks '%s'\n", e.msg, needle);
    if (needle)
        assert_non_null(strstr(e.msg, needle));
}

static void expect_malformed(const char *text, const char *needle)
{
    expect_malformed_len(text, strlen(text), needle);
}

static void assert_near(double got, double want)
{
    double tol = fabs(want) * 1e-12;

    if (!(fabs(got - want) <= tol))
        print_error("got %.17g, want %.17g\n", got, want);
    assert_true(fabs(got - want) <= tol);
}

/* A member that must be there. */
static struct jdoc_val member(const struct jdoc_val *obj, const char *key)
{
    struct jdoc_val out;

    assert_int_equal(jdoc_get(obj, key, &out), 1);
    return out;
}

static int teardown_group(void **state)
{
    (void)state;
    free(held);
    held = NULL;
    jdoc_done();
    return 0;
}

static void test_null_and_bools(void **state)
{
    struct jdoc_val v;
    size_t len = 99;

    (void)state;
    parse_ok("null", &v);
    assert_int_equal(jdoc_type(&v), JDOC_NULL);
    assert_int_equal(jdoc_is_true(&v), 0);
    assert_int_equal(jdoc_int(&v), 0);
    assert_true(jdoc_number(&v) == 0.0);
    assert_null(jdoc_string(&v, &len));
    assert_int_equal(len, 99); /* left alone */
    assert_int_equal(jdoc_size(&v), 0);

    parse_ok("true", &v);
    assert_int_equal(jdoc_type(&v), JDOC_BOOL);
    assert_int_equal(jdoc_is_true(&v), 1);
    assert_int_equal(jdoc_int(&v), 0);
    assert_true(jdoc_number(&v) == 0.0);

    parse_ok(" \t\r\nfalse\n ", &v);
    assert_int_equal(jdoc_type(&v), JDOC_BOOL);
    assert_int_equal(jdoc_is_true(&v), 0);

    /* only true is true */
    parse_ok("1", &v);
    assert_int_equal(jdoc_is_true(&v), 0);
    parse_ok("\"true\"", &v);
    assert_int_equal(jdoc_is_true(&v), 0);
}

static void test_integers(void **state)
{
    struct jdoc_val v;

    (void)state;
    parse_ok("0", &v);
    assert_int_equal(jdoc_type(&v), JDOC_INT);
    assert_true(jdoc_int(&v) == 0);

    parse_ok("42", &v);
    assert_int_equal(jdoc_type(&v), JDOC_INT);
    assert_true(jdoc_int(&v) == 42);
    assert_true(jdoc_number(&v) == 42.0);
    assert_null(jdoc_string(&v, NULL));
    assert_int_equal(jdoc_is_true(&v), 0);

    parse_ok("-17", &v);
    assert_int_equal(jdoc_type(&v), JDOC_INT);
    assert_true(jdoc_int(&v) == -17);
    assert_true(jdoc_number(&v) == -17.0);

    parse_ok("9223372036854775807", &v);
    assert_int_equal(jdoc_type(&v), JDOC_INT);
    assert_true(jdoc_int(&v) == INT64_MAX);
    assert_true(jdoc_number(&v) == (double)INT64_MAX);

    parse_ok("-9223372036854775808", &v);
    assert_int_equal(jdoc_type(&v), JDOC_INT);
    assert_true(jdoc_int(&v) == INT64_MIN);
    assert_true(jdoc_number(&v) == (double)INT64_MIN);

    /* 2^53 + 1 is exact as an int, not as a double */
    parse_ok("9007199254740993", &v);
    assert_int_equal(jdoc_type(&v), JDOC_INT);
    assert_true(jdoc_int(&v) == 9007199254740993LL);
}

static void test_integer_past_int64_is_real(void **state)
{
    struct jdoc_val v;

    (void)state;
    parse_ok("9223372036854775808", &v); /* INT64_MAX + 1 */
    assert_int_equal(jdoc_type(&v), JDOC_REAL);
    assert_true(jdoc_int(&v) == 0);
    assert_near(jdoc_number(&v), 9223372036854775808.0);

    parse_ok("18446744073709551615", &v); /* UINT64_MAX */
    assert_int_equal(jdoc_type(&v), JDOC_REAL);
    assert_true(jdoc_int(&v) == 0);
    assert_near(jdoc_number(&v), 1.8446744073709552e19);

    parse_ok("[12345678901234567890]", &v);
    assert_int_equal(jdoc_size(&v), 1);
    {
        struct jdoc_iter it;
        struct jdoc_val item;

        jdoc_iter_init(&v, &it);
        assert_int_equal(jdoc_iter_next(&it, &item), 1);
        assert_int_equal(jdoc_type(&item), JDOC_REAL);
        assert_near(jdoc_number(&item), 12345678901234567890.0);
    }
}

static void test_reals(void **state)
{
    struct jdoc_val v;

    (void)state;
    parse_ok("1.5", &v);
    assert_int_equal(jdoc_type(&v), JDOC_REAL);
    assert_true(jdoc_number(&v) == 1.5);
    assert_true(jdoc_int(&v) == 0); /* not an int, even when whole */

    parse_ok("1.0", &v);
    assert_int_equal(jdoc_type(&v), JDOC_REAL);
    assert_true(jdoc_number(&v) == 1.0);
    assert_true(jdoc_int(&v) == 0);

    parse_ok("1e-7", &v);
    assert_int_equal(jdoc_type(&v), JDOC_REAL);
    assert_near(jdoc_number(&v), 1e-7);

    parse_ok("-2.5E+3", &v);
    assert_int_equal(jdoc_type(&v), JDOC_REAL);
    assert_true(jdoc_number(&v) == -2500.0);

    parse_ok("1E2", &v);
    assert_int_equal(jdoc_type(&v), JDOC_REAL);
    assert_true(jdoc_number(&v) == 100.0);

    parse_ok("-0.000123e-2", &v);
    assert_int_equal(jdoc_type(&v), JDOC_REAL);
    assert_near(jdoc_number(&v), -1.23e-6);

    parse_ok("1.7976931348623157e308", &v);
    assert_int_equal(jdoc_type(&v), JDOC_REAL);
    assert_true(jdoc_number(&v) == 1.7976931348623157e308);

    parse_ok("3.141592653589793", &v);
    assert_true(jdoc_number(&v) == 3.141592653589793);
}

static void test_strings(void **state)
{
    struct jdoc_val v;
    const char *s;
    size_t len = 0;

    (void)state;
    parse_ok("\"hello\"", &v);
    assert_int_equal(jdoc_type(&v), JDOC_STRING);
    s = jdoc_string(&v, &len);
    assert_non_null(s);
    assert_int_equal(len, 5);
    assert_memory_equal(s, "hello", 5);
    assert_int_equal(s[len], '\0');
    assert_string_equal(jdoc_string(&v, NULL), "hello");
    assert_int_equal(jdoc_int(&v), 0);
    assert_true(jdoc_number(&v) == 0.0);
    assert_int_equal(jdoc_size(&v), 0);

    parse_ok("\"\"", &v);
    assert_int_equal(jdoc_type(&v), JDOC_STRING);
    s = jdoc_string(&v, &len);
    assert_non_null(s);
    assert_int_equal(len, 0);
    assert_int_equal(s[0], '\0');

    /* the escapes, decoded */
    parse_ok("\"a\\nb\\tc\\\"d\\\\e\\/f\\r\\b\\f\"", &v);
    s = jdoc_string(&v, &len);
    assert_int_equal(len, 14);
    assert_memory_equal(s, "a\nb\tc\"d\\e/f\r\b\f", 14);
    assert_int_equal(s[len], '\0');

    /* \u00e9 is é, two bytes of UTF-8; a surrogate pair is one four-byte character */
    parse_ok("\"caf\\u00e9\"", &v);
    s = jdoc_string(&v, &len);
    assert_int_equal(len, 5);
    assert_memory_equal(s, "caf\xc3\xa9", 5);
    parse_ok("\"\\u20AC\\ud83d\\ude00\"", &v);
    s = jdoc_string(&v, &len);
    assert_int_equal(len, 7);
    assert_memory_equal(s, "\xe2\x82\xac\xf0\x9f\x98\x80", 7);

    /* raw UTF-8 passes through */
    parse_ok("\"na\xc3\xafve \xe6\x97\xa5\"", &v);
    s = jdoc_string(&v, &len);
    assert_int_equal(len, 10);
    assert_memory_equal(s, "na\xc3\xafve \xe6\x97\xa5", 10);
}

static void test_string_holding_nul(void **state)
{
    struct jdoc_val v, item;
    struct jdoc_iter it;
    const char *s;
    size_t len = 0;

    (void)state;
    parse_ok("\"ab\\u0000cd\"", &v);
    s = jdoc_string(&v, &len);
    assert_non_null(s);
    assert_int_equal(len, 5);
    assert_memory_equal(s, "ab\0cd", 5);
    assert_int_equal(s[len], '\0');

    /* and inside an array next to another string */
    parse_ok("[\"\\u0000\",\"x\\u0000\\u0000y\"]", &v);
    jdoc_iter_init(&v, &it);
    assert_int_equal(jdoc_iter_next(&it, &item), 1);
    s = jdoc_string(&item, &len);
    assert_int_equal(len, 1);
    assert_memory_equal(s, "\0", 1);
    assert_int_equal(jdoc_iter_next(&it, &item), 1);
    s = jdoc_string(&item, &len);
    assert_int_equal(len, 4);
    assert_memory_equal(s, "x\0\0y", 4);
    assert_int_equal(jdoc_iter_next(&it, &item), 0);
}

static void test_arrays(void **state)
{
    struct jdoc_val v, item;
    struct jdoc_iter it;
    size_t len;

    (void)state;
    parse_ok("[1, -2.5, \"three\", true, null, [4], {\"five\": 5}]", &v);
    assert_int_equal(jdoc_type(&v), JDOC_ARRAY);
    assert_int_equal(jdoc_size(&v), 7);
    assert_int_equal(jdoc_int(&v), 0);
    assert_true(jdoc_number(&v) == 0.0);
    assert_null(jdoc_string(&v, NULL));
    assert_int_equal(jdoc_is_true(&v), 0);
    assert_int_equal(jdoc_get(&v, "0", &item), 0);

    jdoc_iter_init(&v, &it);
    assert_int_equal(jdoc_iter_next(&it, &item), 1);
    assert_int_equal(jdoc_type(&item), JDOC_INT);
    assert_true(jdoc_int(&item) == 1);
    assert_int_equal(jdoc_iter_next(&it, &item), 1);
    assert_int_equal(jdoc_type(&item), JDOC_REAL);
    assert_true(jdoc_number(&item) == -2.5);
    assert_int_equal(jdoc_iter_next(&it, &item), 1);
    assert_int_equal(jdoc_type(&item), JDOC_STRING);
    assert_string_equal(jdoc_string(&item, &len), "three");
    assert_int_equal(len, 5);
    assert_int_equal(jdoc_iter_next(&it, &item), 1);
    assert_int_equal(jdoc_type(&item), JDOC_BOOL);
    assert_int_equal(jdoc_is_true(&item), 1);
    assert_int_equal(jdoc_iter_next(&it, &item), 1);
    assert_int_equal(jdoc_type(&item), JDOC_NULL);
    assert_int_equal(jdoc_iter_next(&it, &item), 1);
    assert_int_equal(jdoc_type(&item), JDOC_ARRAY);
    assert_int_equal(jdoc_size(&item), 1);
    assert_int_equal(jdoc_iter_next(&it, &item), 1);
    assert_int_equal(jdoc_type(&item), JDOC_OBJECT);
    {
        struct jdoc_val five = member(&item, "five");

        assert_true(jdoc_int(&five) == 5);
    }
    assert_int_equal(jdoc_iter_next(&it, &item), 0);
    assert_int_equal(jdoc_iter_next(&it, &item), 0); /* stays at the end */

    parse_ok("[]", &v);
    assert_int_equal(jdoc_type(&v), JDOC_ARRAY);
    assert_int_equal(jdoc_size(&v), 0);
}

static void test_objects(void **state)
{
    struct jdoc_val root, v, w;
    size_t len;

    (void)state;
    parse_ok("{\"name\":\"m\",\"n\":3,\"none\":null,\"off\":false,"
             "\"inner\":{\"deep\":{\"x\":[7,8]},\"s\":\"t\"},\"\":\"empty key\"}",
             &root);
    assert_int_equal(jdoc_type(&root), JDOC_OBJECT);
    assert_int_equal(jdoc_size(&root), 6);
    assert_int_equal(jdoc_int(&root), 0);
    assert_null(jdoc_string(&root, NULL));

    v = member(&root, "name");
    assert_int_equal(jdoc_type(&v), JDOC_STRING);
    assert_string_equal(jdoc_string(&v, &len), "m");
    assert_int_equal(len, 1);
    v = member(&root, "n");
    assert_true(jdoc_int(&v) == 3);
    v = member(&root, "none"); /* present, and null */
    assert_int_equal(jdoc_type(&v), JDOC_NULL);
    v = member(&root, "off");
    assert_int_equal(jdoc_type(&v), JDOC_BOOL);
    assert_int_equal(jdoc_is_true(&v), 0);
    v = member(&root, "");
    assert_string_equal(jdoc_string(&v, NULL), "empty key");

    /* missing keys leave *out alone */
    memset(&w, 0xab, sizeof(w));
    assert_int_equal(jdoc_get(&root, "missing", &w), 0);
    assert_int_equal(jdoc_get(&root, "Name", &w), 0); /* case matters */
    assert_int_equal(jdoc_get(&root, "nam", &w), 0);  /* a prefix is not the key */
    assert_int_equal(jdoc_get(&root, "names", &w), 0);
    assert_int_equal(jdoc_get(&root, "deep", &w), 0); /* only direct members */
    {
        struct jdoc_val poison;

        memset(&poison, 0xab, sizeof(poison));
        assert_memory_equal(&w, &poison, sizeof(w));
    }

    /* nested lookups */
    v = member(&root, "inner");
    assert_int_equal(jdoc_type(&v), JDOC_OBJECT);
    assert_int_equal(jdoc_size(&v), 2);
    w = member(&v, "s");
    assert_string_equal(jdoc_string(&w, NULL), "t");
    v = member(&v, "deep");
    v = member(&v, "x");
    assert_int_equal(jdoc_type(&v), JDOC_ARRAY);
    assert_int_equal(jdoc_size(&v), 2);

    /* the output may be the input: a copy is as good as the original */
    v = root;
    assert_int_equal(jdoc_get(&v, "inner", &v), 1);
    assert_int_equal(jdoc_get(&v, "deep", &v), 1);
    assert_int_equal(jdoc_get(&v, "x", &v), 1);
    assert_int_equal(jdoc_size(&v), 2);
    assert_int_equal(jdoc_get(&v, "x", &w), 0); /* an array is not an object */

    /* on anything but an object: 0 */
    v = member(&root, "name");
    assert_int_equal(jdoc_get(&v, "name", &w), 0);
    v = member(&root, "n");
    assert_int_equal(jdoc_get(&v, "n", &w), 0);
    v = member(&root, "none");
    assert_int_equal(jdoc_get(&v, "none", &w), 0);

    /* keys with escapes are matched decoded */
    parse_ok("{\"caf\\u00e9\":1,\"a\\\"b\":2}", &root);
    v = member(&root, "caf\xc3\xa9");
    assert_true(jdoc_int(&v) == 1);
    v = member(&root, "a\"b");
    assert_true(jdoc_int(&v) == 2);

    parse_ok("{}", &root);
    assert_int_equal(jdoc_type(&root), JDOC_OBJECT);
    assert_int_equal(jdoc_size(&root), 0);
    assert_int_equal(jdoc_get(&root, "", &w), 0);
}

static void test_size_of_scalars(void **state)
{
    static const char *const scalars[] = {
        "null", "true", "false", "0", "123", "-1.5e3", "\"\"", "\"abc\"", "18446744073709551615"};
    struct jdoc_val v;

    (void)state;
    for (size_t i = 0; i < sizeof(scalars) / sizeof(scalars[0]); i++) {
        parse_ok(scalars[i], &v);
        assert_int_equal(jdoc_size(&v), 0);
    }
    parse_ok("[[],[[]],{}]", &v);
    assert_int_equal(jdoc_size(&v), 3);
    parse_ok("{\"a\":[1,2,3],\"b\":{}}", &v);
    assert_int_equal(jdoc_size(&v), 2);
}

static void test_iterate(void **state)
{
    struct jdoc_val v, item;
    struct jdoc_iter it, copy;
    int64_t want = 10;
    int n = 0;

    (void)state;
    parse_ok("[10,20,30,40,50]", &v);
    for (jdoc_iter_init(&v, &it); jdoc_iter_next(&it, &item); want += 10, n++) {
        assert_int_equal(jdoc_type(&item), JDOC_INT);
        assert_true(jdoc_int(&item) == want);
    }
    assert_int_equal(n, 5);

    /* an iterator is a value: a copy carries on from where the original was */
    jdoc_iter_init(&v, &it);
    assert_int_equal(jdoc_iter_next(&it, &item), 1);
    copy = it;
    assert_int_equal(jdoc_iter_next(&it, &item), 1);
    assert_true(jdoc_int(&item) == 20);
    assert_int_equal(jdoc_iter_next(&copy, &item), 1);
    assert_true(jdoc_int(&item) == 20);

    /* an empty array: no iterations */
    parse_ok("[ ]", &v);
    n = 0;
    for (jdoc_iter_init(&v, &it); jdoc_iter_next(&it, &item);)
        n++;
    assert_int_equal(n, 0);
}

static void test_iterate_non_array(void **state)
{
    static const char *const docs[] = {"{\"a\":1,\"b\":2}", "{}", "null", "true", "7", "2.5",
                                       "\"[1,2]\""};
    struct jdoc_val v, item;
    struct jdoc_iter it;

    (void)state;
    for (size_t i = 0; i < sizeof(docs) / sizeof(docs[0]); i++) {
        int n = 0;

        parse_ok(docs[i], &v);
        memset(&it, 0x5a, sizeof(it)); /* init must not depend on what was there */
        for (jdoc_iter_init(&v, &it); jdoc_iter_next(&it, &item);)
            n++;
        assert_int_equal(n, 0);
    }
}

/* The sum of every integer in `v`, walking arrays (and object members named "v") depth first,
 * with an iterator per level alive at once. */
static int64_t walk_sum(const struct jdoc_val *v, int *count)
{
    struct jdoc_iter it;
    struct jdoc_val item;
    int64_t sum = 0;

    switch (jdoc_type(v)) {
    case JDOC_INT:
        (*count)++;
        return jdoc_int(v);
    case JDOC_ARRAY:
        for (jdoc_iter_init(v, &it); jdoc_iter_next(&it, &item);)
            sum += walk_sum(&item, count);
        return sum;
    case JDOC_OBJECT:
        return jdoc_get(v, "v", &item) ? walk_sum(&item, count) : 0;
    default:
        return 0;
    }
}

static void test_nested_iteration(void **state)
{
    struct jdoc_val v, item, first = {{0}};
    struct jdoc_iter it;
    int count = 0;

    (void)state;
    parse_ok("[[1,2],[3,[4,5]]]", &v);
    assert_true(walk_sum(&v, &count) == 15);
    assert_int_equal(count, 5);

    count = 0;
    parse_ok("[[],[[[]]],[1,[2,[3,[4,[5,[6]]]]]],{\"v\":[7,{\"v\":8}]},[[9],[],[10]]]", &v);
    assert_true(walk_sum(&v, &count) == 55);
    assert_int_equal(count, 10);

    /* a value taken early is still good after the iteration walked past it */
    parse_ok("[[1,2],[3,4]]", &v);
    jdoc_iter_init(&v, &it);
    assert_int_equal(jdoc_iter_next(&it, &first), 1);
    while (jdoc_iter_next(&it, &item)) {
        count = 0;
        assert_true(walk_sum(&item, &count) == 7);
    }
    count = 0;
    assert_true(walk_sum(&first, &count) == 3);
    assert_int_equal(jdoc_size(&first), 2);
}

static void test_syntax_errors(void **state)
{
    (void)state;
    expect_malformed_len("", 0, "empty");
    expect_malformed("   ", NULL);
    expect_malformed("{\"a\":", NULL);
    expect_malformed("{\"a\":1", NULL);
    expect_malformed("[1,2", NULL);
    expect_malformed("\"abc", NULL);
    expect_malformed("{} x", NULL);
    expect_malformed("[1] [2]", NULL);
    expect_malformed("1 2", NULL);
    expect_malformed("[1,]", NULL);
    expect_malformed("{\"a\":1,}", NULL);
    expect_malformed("{a:1}", NULL);
    expect_malformed("{\"a\" 1}", NULL);
    expect_malformed("['a']", NULL);
    expect_malformed("nul", NULL);
    expect_malformed("True", NULL);
    expect_malformed("01", NULL);
    expect_malformed("1.", NULL);
    expect_malformed(".5", NULL);
    expect_malformed("+1", NULL);
    expect_malformed("NaN", NULL);
    expect_malformed("\"\\x\"", NULL);
    expect_malformed("\"\\u12\"", NULL);
    expect_malformed("\"\\ud800\"", NULL); /* a lone surrogate */
    expect_malformed("/* c */ 1", NULL);
    /* the reason carries a position when one is to be had */
    expect_malformed("{\"a\":", "line 1");
    expect_malformed("{\n\"a\": 1,\n\"b\" }", "line 3");
}

static void test_encoding_errors(void **state)
{
    (void)state;
    expect_malformed("\"\xff\"", NULL);             /* never in UTF-8 */
    expect_malformed("\"\xc3\"", NULL);             /* a sequence cut short */
    expect_malformed("\"a\xc3(b\"", NULL);          /* a bad continuation */
    expect_malformed("\"\xc0\xaf\"", NULL);         /* overlong */
    expect_malformed("\"\xed\xa0\x80\"", NULL);     /* a surrogate */
    expect_malformed("\"\xf4\x90\x80\x80\"", NULL); /* past U+10FFFF */
    expect_malformed("{\"k\xfe\":1}", NULL);        /* in a key */
    expect_malformed("[\"ok\",\"caf\xe9\"]", NULL); /* Latin-1 */
    /* a control character must be escaped */
    expect_malformed("\"a\x01z\"", NULL);
    expect_malformed("\"a\nb\"", NULL);
    expect_malformed("\"a\tb\"", NULL);
    expect_malformed("{\"k\x1f\":1}", NULL);
    expect_malformed_len("\"a\0b\"", 5, NULL); /* a raw NUL byte */
    expect_malformed_len("[1]\0", 4, NULL);    /* and one after the document */
}

static void test_too_deep(void **state)
{
    size_t n = 2000, i;
    char *text = malloc(2 * n + 1);
    struct jdoc_val v;
    int count = 0;

    (void)state;
    assert_non_null(text);
    memset(text, '[', n);
    memset(text + n, ']', n);
    expect_malformed_len(text, 2 * n, NULL);

    /* one past the limit around a value (an empty innermost list is one more level) */
    n = JDOC_MAX_DEPTH + 1;
    memset(text, '[', n);
    text[n] = '1';
    memset(text + n + 1, ']', n);
    expect_malformed_len(text, 2 * n + 1, NULL);
    n = JDOC_MAX_DEPTH + 2;
    memset(text, '[', n);
    memset(text + n, ']', n);
    expect_malformed_len(text, 2 * n, NULL);

    /* exactly the limit around a value parses */
    n = JDOC_MAX_DEPTH;
    memset(text, '[', n);
    text[n] = '1';
    memset(text + n + 1, ']', n);
    text[2 * n + 1] = '\0';
    parse_ok(text, &v);
    assert_true(walk_sum(&v, &count) == 1);
    count = 0;

    /* well inside it, a deep document parses (and walks) */
    n = JDOC_MAX_DEPTH - 24;
    memset(text, '[', n);
    text[n] = '1';
    memset(text + n + 1, ']', n);
    text[2 * n + 1] = '\0';
    parse_ok(text, &v);
    assert_true(walk_sum(&v, &count) == 1);
    assert_int_equal(count, 1);

    /* objects count as well: {"a":{"a":...}} */
    n = 2000;
    free(text);
    text = malloc(n * 5 + n + 2);
    assert_non_null(text);
    for (i = 0; i < n; i++)
        memcpy(text + 5 * i, "{\"a\":", 5);
    text[5 * n] = '1';
    memset(text + 5 * n + 1, '}', n);
    expect_malformed_len(text, 6 * n + 1, NULL);
    free(text);
}

static void test_duplicate_keys(void **state)
{
    (void)state;
    expect_malformed("{\"a\":1,\"a\":2}", "duplicate key 'a'");
    expect_malformed("{\"a\":1,\"b\":2,\"a\":1}", "duplicate key 'a'");
    expect_malformed("{\"a\":1,\"\\u0061\":2}", "duplicate key 'a'"); /* equal once decoded */
    expect_malformed("{\"x\":{\"id\":1,\"id\":2}}", "duplicate key 'id'");
    expect_malformed("[{\"a\":1},{\"b\":1,\"c\":2,\"b\":3}]", "duplicate key 'b'");
    expect_malformed("{\"inputs\":[{\"name\":\"x\",\"data\":[1],\"name\":\"y\"}]}",
                     "duplicate key 'name'");
    expect_malformed("[[[{\"deep\":[{\"q\":null,\"q\":null}]}]]]", "duplicate key 'q'");

    /* the same key in different objects is fine */
    {
        struct jdoc_val v;

        parse_ok("[{\"a\":1},{\"a\":2},{\"b\":{\"a\":3}}]", &v);
        assert_int_equal(jdoc_size(&v), 3);
        parse_ok("{\"a\":{\"a\":{\"a\":1}}}", &v);
        parse_ok("{\"a\":1,\"A\":2,\"a \":3,\" a\":4}", &v);
        assert_int_equal(jdoc_size(&v), 4);
    }
}

/* {"k0":0,"k1":1,...} with `n` members, then `extra` verbatim, closed. */
static char *many_members(int n, const char *extra)
{
    size_t cap = (size_t)n * 24 + strlen(extra) + 8;
    char *text = malloc(cap);
    size_t off = 0;

    assert_non_null(text);
    text[off++] = '{';
    for (int i = 0; i < n; i++)
        off += (size_t)snprintf(text + off, cap - off, "%s\"k%d\":%d", i ? "," : "", i, i);
    off += (size_t)snprintf(text + off, cap - off, "%s}", extra);
    assert_true(off < cap);
    return text;
}

/* Text read from a location (JDOC_STORED): the error names the line, column and problem and
 * quotes none of the text; the same text from a client may still be quoted back to it. */
static void test_stored_text_is_not_quoted(void **state)
{
    static const struct {
        const char *text;
        const char *msg; /* with JDOC_STORED, exactly */
    } cases[] = {
        {"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1", "malformed JSON at line 1 column 4: "
                                                          "invalid token"},
        {"{\"secretword\": 1, \"secretword\": 2}",
         "malformed JSON: an object has the same key twice"},
        {"[\"\\uD8secretword\"]", "malformed JSON at line 1 column 7: invalid escape"},
        {"[\"\\uDC00\"]", "malformed JSON at line 1 column 9: invalid Unicode escape"},
        {"{\"secretword\" 1}", "malformed JSON at line 1 column 15: ':' expected"},
        {"[1] secretword", "malformed JSON at line 1 column 14: text after the JSON value"},
        {"[\"secret\tword\"]", "malformed JSON at line 1 column 8: control character in a string"},
        {"[1, 2", "malformed JSON at line 1 column 5: ']' expected"},
        {"", "malformed JSON: no text"},
    };
    struct jdoc_val root;

    (void)state;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct err e = {0};
        size_t len = strlen(cases[i].text);
        assert_int_equal(jdoc_parse(cases[i].text, len, JDOC_STORED, &root, &e), ERR_INVALID);
        if (strcmp(e.msg, cases[i].msg) != 0)
            fail_msg("%s: got '%s', expected '%s'", cases[i].text, e.msg, cases[i].msg);
    }
    /* a client's own body may be quoted back to it, as before */
    struct err e = {0};
    assert_int_equal(jdoc_parse("root:x:0", 8, 0, &root, &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "near 'root'"));
    assert_int_equal(jdoc_parse("{\"k\":1,\"k\":2}", 13, 0, &root, &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "duplicate key 'k'"));
    jdoc_done();
}

/* Python's json.dumps writes NaN, Infinity and -Infinity: say what to send instead, for a
 * client's body and for stored text alike; other words stay "invalid token". */
static void test_nan_and_infinity_named(void **state)
{
    static const struct {
        const char *text;
        const char *msg; /* exactly, with and without JDOC_STORED */
    } cases[] = {
        {"[NaN]", "malformed JSON at line 1 column 4: JSON has no NaN: send null for a missing "
                  "value"},
        {"{\"data\": [1.5, nan, 2]}", "malformed JSON at line 1 column 18: JSON has no NaN: "
                                      "send null for a missing value"},
        {"[1, Infinity]", "malformed JSON at line 1 column 12: JSON has no Infinity: send a "
                          "finite number, or null for a missing value"},
        {"[-Infinity, 1]", "malformed JSON at line 1 column 2: JSON has no Infinity: send a "
                           "finite number, or null for a missing value"},
        {"NaN", "malformed JSON at line 1 column 3: JSON has no NaN: send null for a missing "
                "value"},
    };
    struct jdoc_val root;
    struct err e = {0};

    (void)state;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        for (unsigned flags = 0; flags <= JDOC_STORED; flags += JDOC_STORED) {
            size_t len = strlen(cases[i].text);
            assert_int_equal(jdoc_parse(cases[i].text, len, flags, &root, &e), ERR_INVALID);
            if (strcmp(e.msg, cases[i].msg) != 0)
                fail_msg("%s: got '%s', expected '%s'", cases[i].text, e.msg, cases[i].msg);
        }
    }
    assert_int_equal(jdoc_parse("[NaNa]", 6, 0, &root, &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "invalid token near 'NaNa'"));
    assert_int_equal(jdoc_parse("[-Inf1]", 7, JDOC_STORED, &root, &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "JSON has no Infinity"));
    assert_int_equal(jdoc_parse("[-x]", 4, JDOC_STORED, &root, &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, ": invalid token"));
    jdoc_done();
}

static void test_duplicate_keys_many_members(void **state)
{
    struct jdoc_val v, m;
    char *text;
    char key[16];

    (void)state;
    /* 17 and more members take the sorted path */
    text = many_members(16, ",\"k3\":99");
    expect_malformed(text, "duplicate key 'k3'");
    free(text);
    text = many_members(20, ",\"k19\":0");
    expect_malformed(text, "duplicate key 'k19'");
    free(text);
    text = many_members(40, ",\"k0\":0");
    expect_malformed(text, "duplicate key 'k0'");
    free(text);
    text = many_members(40, ",\"z\":[{\"a\":1,\"a\":1}]"); /* one nested in a big object */
    expect_malformed(text, "duplicate key 'a'");
    free(text);

    /* 15 + 1: the pairwise path, duplicate last */
    text = many_members(15, ",\"k14\":0");
    expect_malformed(text, "duplicate key 'k14'");
    free(text);

    /* exactly 16 and 17 distinct members parse */
    text = many_members(16, "");
    parse_ok(text, &v);
    assert_int_equal(jdoc_size(&v), 16);
    free(text);
    text = many_members(17, "");
    parse_ok(text, &v);
    assert_int_equal(jdoc_size(&v), 17);
    free(text);

    text = many_members(40, "");
    parse_ok(text, &v);
    free(text);
    assert_int_equal(jdoc_type(&v), JDOC_OBJECT);
    assert_int_equal(jdoc_size(&v), 40);
    for (int i = 0; i < 40; i++) {
        snprintf(key, sizeof(key), "k%d", i);
        m = member(&v, key);
        assert_true(jdoc_int(&m) == i);
    }
    assert_int_equal(jdoc_get(&v, "k40", &m), 0);
}

static void test_not_nul_terminated(void **state)
{
    static const char text[] = "[1,2,3]xxxx";
    struct jdoc_val v, item;
    struct jdoc_iter it;
    struct err e = {0};
    int64_t want = 1;

    (void)state;
    /* straight from the caller's buffer, which goes on past `len` */
    assert_int_equal(jdoc_parse(text, 7, 0, &v, &e), 0);
    assert_int_equal(jdoc_type(&v), JDOC_ARRAY);
    assert_int_equal(jdoc_size(&v), 3);
    for (jdoc_iter_init(&v, &it); jdoc_iter_next(&it, &item); want++)
        assert_true(jdoc_int(&item) == want);
    assert_true(want == 4);

    /* a heap buffer of exactly 7 bytes (ASan: nothing read past it) */
    parse_ok("[1,2,3]", &v);
    assert_int_equal(jdoc_size(&v), 3);

    /* a number, a literal and a string that run up to the very end */
    parse_ok("12345", &v);
    assert_true(jdoc_int(&v) == 12345);
    parse_ok("-1.25e2", &v);
    assert_true(jdoc_number(&v) == -125.0);
    parse_ok("true", &v);
    assert_int_equal(jdoc_is_true(&v), 1);
    parse_ok("\"end\"", &v);
    assert_string_equal(jdoc_string(&v, NULL), "end");

    /* the same bytes cut shorter are another document */
    assert_int_equal(jdoc_parse("12345", 3, 0, &v, &e), 0);
    assert_true(jdoc_int(&v) == 123);
    assert_int_equal(jdoc_parse("truex", 4, 0, &v, &e), 0);
    assert_int_equal(jdoc_is_true(&v), 1);
    assert_int_equal(jdoc_parse("\"ab\"cd", 4, 0, &v, &e), 0);
    assert_string_equal(jdoc_string(&v, NULL), "ab");
    assert_int_equal(jdoc_parse("[1,2,3]", 5, 0, &v, &e), ERR_INVALID);
    assert_int_equal(strncmp(e.msg, "malformed JSON", 14), 0);
}

/* Parses `text` (without its NUL) from the very end of a page followed by an unmapped one. */
static int parse_at_page_end(char *page, size_t page_size, const char *text, struct jdoc_val *v,
                             struct err *e)
{
    size_t len = strlen(text);
    char *at = page + page_size - len;

    memcpy(at, text, len);
    return jdoc_parse(at, len, 0, v, e);
}

static void test_document_before_unmapped_page(void **state)
{
    long page_size = sysconf(_SC_PAGESIZE);
    size_t ps = page_size > 0 ? (size_t)page_size : 4096;
    char *map = mmap(NULL, 2 * ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    struct jdoc_val v, item;
    struct jdoc_iter it;
    struct err e = {0};
    size_t len = 0;
    int count = 0;

    (void)state;
    assert_true(map != MAP_FAILED);
    assert_int_equal(mprotect(map + ps, ps, PROT_NONE), 0);

    assert_int_equal(parse_at_page_end(map, ps, "[1,2,3]", &v, &e), 0);
    assert_int_equal(jdoc_size(&v), 3);
    for (jdoc_iter_init(&v, &it); jdoc_iter_next(&it, &item);)
        count++;
    assert_int_equal(count, 3);
    assert_int_equal(parse_at_page_end(map, ps, "-9876543210", &v, &e), 0);
    assert_true(jdoc_int(&v) == -9876543210LL);
    assert_int_equal(parse_at_page_end(map, ps, "6.25e-1", &v, &e), 0);
    assert_true(jdoc_number(&v) == 0.625);
    assert_int_equal(parse_at_page_end(map, ps, "null", &v, &e), 0);
    assert_int_equal(jdoc_type(&v), JDOC_NULL);
    assert_int_equal(parse_at_page_end(map, ps, "{\"k\":\"tail\\u00e9\"}", &v, &e), 0);
    v = member(&v, "k");
    assert_memory_equal(jdoc_string(&v, &len), "tail\xc3\xa9", 6);
    assert_int_equal(len, 6);
    /* refusals read no further either (the reason is worked out again from the text) */
    assert_int_equal(parse_at_page_end(map, ps, "{\"a\":[1,2", &v, &e), ERR_INVALID);
    assert_int_equal(strncmp(e.msg, "malformed JSON", 14), 0);
    assert_int_equal(parse_at_page_end(map, ps, "\"abc", &v, &e), ERR_INVALID);
    assert_int_equal(parse_at_page_end(map, ps, "{\"a\":1,\"a\":2}", &v, &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "duplicate key 'a'"));
    assert_int_equal(munmap(map, 2 * ps), 0);
}

static void test_large_document(void **state)
{
    const int n = 300000;
    size_t cap = (size_t)n * 8 + 2, off = 0;
    char *text = malloc(cap);
    struct jdoc_val v, item;
    struct jdoc_iter it;
    struct err e = {0};
    int64_t sum = 0, want = 0;
    int count = 0;

    (void)state;
    assert_non_null(text);
    text[off++] = '[';
    for (int i = 0; i < n; i++) {
        off += (size_t)snprintf(text + off, cap - off, "%s%d", i ? "," : "", i);
        want += i;
    }
    text[off++] = ']';
    assert_true(off > (1u << 20)); /* past the size whose parser memory is kept */
    assert_true(off <= cap);

    assert_int_equal(jdoc_parse(text, off, 0, &v, &e), 0);
    assert_int_equal(jdoc_size(&v), (size_t)n);
    for (jdoc_iter_init(&v, &it); jdoc_iter_next(&it, &item); count++) {
        assert_int_equal(jdoc_type(&item), JDOC_INT);
        sum += jdoc_int(&item);
    }
    assert_int_equal(count, n);
    assert_true(sum == want);
    jdoc_done();

    /* the parser memory is gone; the next document gets a new one */
    parse_ok("{\"after\":[1,2,3]}", &v);
    v = member(&v, "after");
    assert_int_equal(jdoc_size(&v), 3);
    jdoc_done(); /* a small document's memory is kept: harmless */
    parse_ok("[4,5]", &v);
    count = 0;
    assert_true(walk_sum(&v, &count) == 9);

    /* and a large one again, twice in a row without jdoc_done() between */
    assert_int_equal(jdoc_parse(text, off, 0, &v, &e), 0);
    assert_int_equal(jdoc_size(&v), (size_t)n);
    assert_int_equal(jdoc_parse(text, off, 0, &v, &e), 0);
    count = 0;
    assert_true(walk_sum(&v, &count) == want);
    assert_int_equal(count, n);
    jdoc_done();
    jdoc_done(); /* twice is fine */
    parse_ok("7", &v);
    assert_true(jdoc_int(&v) == 7);
    free(text);
}

/* A thread parsing its own document over and over, checking every value each time. Cmocka's
 * assertions belong to the main thread: this one counts its failures. */
struct worker {
    const char *doc;
    int64_t id, sum;
    const char *name;
    int rounds, failures;
};

static int check_doc(const struct worker *w, const struct jdoc_val *root)
{
    struct jdoc_val id, name, data, item;
    struct jdoc_iter it;
    const char *s;
    size_t len = 0;
    int64_t sum = 0;

    if (!jdoc_get(root, "id", &id) || jdoc_int(&id) != w->id)
        return 1;
    if (!jdoc_get(root, "name", &name) || !(s = jdoc_string(&name, &len)) ||
        len != strlen(w->name) || memcmp(s, w->name, len) != 0)
        return 1;
    if (!jdoc_get(root, "data", &data) || jdoc_type(&data) != JDOC_ARRAY)
        return 1;
    for (jdoc_iter_init(&data, &it); jdoc_iter_next(&it, &item);)
        sum += jdoc_int(&item);
    return sum != w->sum;
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    struct jdoc_val root;
    struct err e;

    for (int i = 0; i < w->rounds; i++) {
        if (jdoc_parse(w->doc, strlen(w->doc), 0, &root, &e) != 0) {
            w->failures++;
            continue;
        }
        for (int k = 0; k < 3; k++) /* look again: another thread has parsed meanwhile */
            w->failures += check_doc(w, &root);
    }
    jdoc_done();
    return NULL;
}

static void test_threads_have_own_parsers(void **state)
{
    struct worker w[2] = {
        {.doc = "{\"id\":1,\"name\":\"alpha\",\"data\":[1,2,3,4]}",
         .id = 1,
         .sum = 10,
         .name = "alpha",
         .rounds = 2000},
        {.doc = "{\"data\":[100,200,300,400,500,600,700],\"pad\":{\"x\":[[],[[]]]},"
                "\"name\":\"the second thread\",\"id\":-2}",
         .id = -2,
         .sum = 2800,
         .name = "the second thread",
         .rounds = 2000},
    };
    struct worker mine = {.id = 3, .sum = 6, .name = "main"};
    pthread_t t[2];
    struct jdoc_val root;

    (void)state;
    /* this thread's document must outlive the others' parsing */
    parse_ok("{\"id\":3,\"name\":\"main\",\"data\":[6]}", &root);
    for (int i = 0; i < 2; i++)
        assert_int_equal(pthread_create(&t[i], NULL, worker_main, &w[i]), 0);
    for (int i = 0; i < 2; i++)
        assert_int_equal(pthread_join(t[i], NULL), 0);
    assert_int_equal(w[0].failures, 0);
    assert_int_equal(w[1].failures, 0);
    assert_int_equal(check_doc(&mine, &root), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_null_and_bools),
        cmocka_unit_test(test_integers),
        cmocka_unit_test(test_integer_past_int64_is_real),
        cmocka_unit_test(test_reals),
        cmocka_unit_test(test_strings),
        cmocka_unit_test(test_string_holding_nul),
        cmocka_unit_test(test_arrays),
        cmocka_unit_test(test_objects),
        cmocka_unit_test(test_size_of_scalars),
        cmocka_unit_test(test_iterate),
        cmocka_unit_test(test_iterate_non_array),
        cmocka_unit_test(test_nested_iteration),
        cmocka_unit_test(test_syntax_errors),
        cmocka_unit_test(test_encoding_errors),
        cmocka_unit_test(test_too_deep),
        cmocka_unit_test(test_duplicate_keys),
        cmocka_unit_test(test_duplicate_keys_many_members),
        cmocka_unit_test(test_stored_text_is_not_quoted),
        cmocka_unit_test(test_nan_and_infinity_named),
        cmocka_unit_test(test_not_nul_terminated),
        cmocka_unit_test(test_document_before_unmapped_page),
        cmocka_unit_test(test_large_document),
        cmocka_unit_test(test_threads_have_own_parsers),
    };
    return cmocka_run_group_tests(tests, NULL, teardown_group);
}
