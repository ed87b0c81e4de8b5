/*
 * test_queue_redis_url.c: the Redis queue's URL (--queue redis[s]://...), rq_url_parse(): its
 * parts, percent-decoding, and errors that name the wrong part and never show the password.
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "queue/redis/internal.h"

#include <string.h>

/* Parses `url`, expecting ERR_INVALID with a message holding `want` and not `secret`. */
static void rejected(const char *url, const char *want, const char *secret)
{
    struct rq_url u;
    struct err e = {0};

    assert_int_equal(rq_url_parse(url, &u, &e), ERR_INVALID);
    if (!strstr(e.msg, want))
        fail_msg("%s: '%s' is not in '%s'", url, want, e.msg);
    if (secret && strstr(e.msg, secret))
        fail_msg("%s: the password is in '%s'", url, e.msg);
    assert_string_equal(u.password, "");
}

static void test_parts(void **state)
{
    struct rq_url u;
    struct err e = {0};

    (void)state;
    assert_int_equal(rq_url_parse("redis://alice:p%40ss%3Aw%2Frd-7Q%25x@10.0.0.7:6380/3", &u, &e),
                     0);
    assert_string_equal(u.host, "10.0.0.7");
    assert_int_equal(u.port, 6380);
    assert_int_equal(u.db, 3);
    assert_string_equal(u.user, "alice");
    assert_string_equal(u.password, "p@ss:w/rd-7Q%x");
    assert_int_equal(u.tls, 0);
    rq_url_release(&u);
    assert_int_equal(rq_url_parse("rediss://?ca=/etc/my%20ca.pem&cert=/c.pem&key=/k.pem", &u, &e),
                     0);
    assert_string_equal(u.host, "127.0.0.1");
    assert_int_equal(u.port, 6379);
    assert_string_equal(u.ca, "/etc/my ca.pem");
    assert_string_equal(u.key, "/k.pem");
    assert_int_equal(u.tls, 1);
    rq_url_release(&u);
}

/* "%00" decoded a NUL into the password or a file name, which silently cut it short; a '%'
 * without two hex digits after it was taken as whatever sscanf made of it */
static void test_bad_escapes(void **state)
{
    (void)state;
    rejected("redis://:s3cr%00etpw@host", "the password: %00 (a NUL byte) is not allowed", "s3cr");
    rejected("redis://bob%00x:s3cretpw@host", "the user: %00", "s3cretpw");
    rejected("rediss://host/0?ca=/etc/ca.pem%00.evil", "'ca': %00 (a NUL byte) is not allowed",
             NULL);
    rejected("rediss://host/0?key=/k%00", "'key': %00", NULL);
    rejected("redis://:s3cr%4getpw@host", "the password: a '%' must start an escape", "s3cr");
    rejected("redis://:s3cr%+1etpw@host", "the password: a '%' must start an escape", "s3cr");
    rejected("redis://:s3cr% 1etpw@host", "the password: a '%' must start an escape", "s3cr");
    rejected("redis://:s3cretpw%4@host", "the password: a '%' must start an escape", "s3cr");
    rejected("redis://:@host", "the password: may not be empty", NULL);
}

/* the errors show the URL with url_redacted(), which ends the userinfo at a '#': a password
 * holding one was shown whole by any later error (here, the port's) */
static void test_fragment(void **state)
{
    (void)state;
    rejected("redis://:s3cr#etpw@host:0", "'#' in a Redis URL must be percent-encoded", "s3cr");
    rejected("redis://:s3cretpw@host/0#x", "(%23)", "s3cr");
    rejected("redis://:s3cr#etpw@host:6379/0", "'#'", "s3cr");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parts),
        cmocka_unit_test(test_bad_escapes),
        cmocka_unit_test(test_fragment),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
