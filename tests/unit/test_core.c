/*
 * test_core.c: core's clock (the scheduler's injectable time), ids, bounded integer JSON
 * fields and URLs shown with their credentials masked (core/clock.h, core/id.h, core/jfield.h,
 * core/url.h), and extra trusted CAs for libcurl (core/ca_file.h).
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "core/clock.h"
#include "core/id.h"
#include "core/jfield.h"
#include "core/url.h"
#include "core/ca_file.h"

#include <curl/curl.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void test_clock_kinds(void **state)
{
    int64_t wall = clock_now_ms(), mono = clock_mono_ms();
    uint64_t ns = clock_mono_ns();

    (void)state;
    /* the wall clock is epoch milliseconds: after 2020, and agrees with time() */
    assert_true(wall > 1577836800000LL);
    assert_true(llabs(wall / 1000 - (long long)time(NULL)) <= 2);
    assert_true(clock_mono_ms() >= mono);
    assert_true(clock_mono_ns() >= ns);
}

static void test_sched_clock_file(void **state)
{
    char path[] = "/tmp/inferd_test_clock_XXXXXX";
    int fd = mkstemp(path);
    FILE *f;

    (void)state;
    assert_true(fd >= 0);
    close(fd);
    assert_int_equal(setenv("INFERD_CLOCK_FILE", path, 1), 0);
    /* an empty file is the real time */
    assert_true(llabs(clock_sched_now_ms() - clock_now_ms()) < 5000);
    f = fopen(path, "w");
    assert_non_null(f);
    fprintf(f, "1700000000123\n");
    fclose(f);
    assert_int_equal(clock_sched_now_ms(), 1700000000123LL);
    /* re-read on every call: a test moves time forward by rewriting the file */
    f = fopen(path, "w");
    assert_non_null(f);
    fprintf(f, "1700000060123");
    fclose(f);
    assert_int_equal(clock_sched_now_ms(), 1700000060123LL);
    unlink(path);
    /* a missing file is the real time */
    assert_true(llabs(clock_sched_now_ms() - clock_now_ms()) < 5000);
    unsetenv("INFERD_CLOCK_FILE");
    assert_true(llabs(clock_sched_now_ms() - clock_now_ms()) < 5000);
}

static void test_ids(void **state)
{
    char a[ID_SIZE], b[ID_SIZE], ms_hex[16];
    int64_t before = clock_now_ms();

    (void)state;
    id_new(a);
    id_new(b);
    assert_int_equal(strlen(a), 24);
    assert_int_equal(strspn(a, "0123456789abcdef"), 24);
    assert_string_not_equal(a, b);
    /* time-ordered: the first 12 digits are the creation millisecond */
    snprintf(ms_hex, sizeof(ms_hex), "%012llx", (unsigned long long)before);
    assert_true(strncmp(a, ms_hex, 12) >= 0);
    assert_true(strncmp(a, b, 12) <= 0);
}

static int read_int(const char *json, unsigned flags, int64_t *out, int *present, struct err *e)
{
    json_t *root = json_loads(json, 0, NULL);
    int rc;

    assert_non_null(root);
    rc = jfield_int(root, "n", 1, 9, flags, out, present, e);
    json_decref(root);
    return rc;
}

static void test_jfield_int(void **state)
{
    struct err e = {0};
    int64_t v = -7;
    int present = -1;

    (void)state;
    assert_int_equal(read_int("{}", 0, &v, &present, &e), 0);
    assert_int_equal(v, -7);
    assert_int_equal(present, 0);
    assert_int_equal(read_int("{\"n\": 4}", 0, &v, &present, &e), 0);
    assert_int_equal(v, 4);
    assert_int_equal(present, 1);
    assert_int_equal(read_int("{\"n\": 1}", 0, &v, NULL, &e), 0);
    assert_int_equal(read_int("{\"n\": 9}", 0, &v, NULL, &e), 0);
    assert_int_equal(v, 9);

    assert_int_equal(read_int("{\"n\": null}", 0, &v, &present, &e), ERR_INVALID);
    assert_string_equal(e.msg, "n: expected an integer");
    assert_int_equal(present, 1);
    assert_int_equal(read_int("{\"n\": null}", JFIELD_NULL_ABSENT, &v, &present, &e), 0);
    assert_int_equal(present, 0);
    assert_int_equal(read_int("{\"n\": 2.5}", 0, &v, NULL, &e), ERR_INVALID);
    assert_string_equal(e.msg, "n: expected an integer");
    assert_int_equal(read_int("{\"n\": \"3\"}", 0, &v, NULL, &e), ERR_INVALID);
    assert_string_equal(e.msg, "n: expected an integer");

    assert_int_equal(read_int("{\"n\": 10}", 0, &v, NULL, &e), ERR_INVALID);
    assert_string_equal(e.msg, "n: 10 is outside 1..9");
    assert_int_equal(read_int("{\"n\": 0}", 0, &v, NULL, &e), ERR_INVALID);
    assert_string_equal(e.msg, "n: 0 is outside 1..9");
    assert_int_equal(read_int("{\"n\": 0}", JFIELD_MIN_MAX_MSG, &v, NULL, &e), ERR_INVALID);
    assert_string_equal(e.msg, "n: 0 is below the minimum 1");
    assert_int_equal(read_int("{\"n\": 10}", JFIELD_MIN_MAX_MSG, &v, NULL, &e), ERR_INVALID);
    assert_string_equal(e.msg, "n: 10 is above the maximum 9");
    assert_int_equal(v, 9); /* untouched by every refusal */

    /* not an object: the field is absent */
    assert_int_equal(jfield_int(NULL, "n", 1, 9, 0, &v, &present, &e), 0);
    assert_int_equal(present, 0);
}

static void expect_shown(const char *url, const char *shown)
{
    char *got = url_redacted(url);

    assert_non_null(got);
    assert_string_equal(got, shown);
    free(got);
}

/* A password is masked wherever a URL carries one: userinfo, or libpq's password= parameter. */
static void test_url_redacted(void **state)
{
    (void)state;
    expect_shown("postgresql://u:pw@h:5432/db?table=s.t", "postgresql://***@h:5432/db?table=s.t");
    expect_shown("postgresql://u@h/db?password=pw&table=t",
                 "postgresql://***@h/db?password=***&table=t");
    expect_shown("postgresql://h/db?table=t&password=pw", "postgresql://h/db?table=t&password=***");
    expect_shown("postgresql://h/db?sslmode=require", "postgresql://h/db?sslmode=require");
    expect_shown("http://user:pw@h/x", "http://***@h/x");
    expect_shown("http://h/x@y", "http://h/x@y");
    expect_shown("", "");
    assert_null(url_redacted(NULL));
}

/* A self-signed CA certificate (openssl req -x509), as --s3-ca-file and --webhook-ca-file take. */
static const char unit_ca_pem[] =
    "-----BEGIN CERTIFICATE-----\n"
    "MIIDHzCCAgegAwIBAgIUJY2+TbyF2IghHazd17DiHBC7l9IwDQYJKoZIhvcNAQEL\n"
    "BQAwHjEcMBoGA1UEAwwTaW5mZXJkIHVuaXQgdGVzdCBDQTAgFw0yNjEyMDUwMzQ0\n"
    "NDdaGA8yMTI2MTExMTAzNDQ0N1owHjEcMBoGA1UEAwwTaW5mZXJkIHVuaXQgdGVz\n"
    "dCBDQTCCASIwDQYJKoZIhvcNAQEBBQADggEPADCCAQoCggEBAOJz3eMBjEj+AF9W\n"
    "hj9pX4HO3ZZfyv08JYPhyvmyfByLoLD12HOElNIxHv6lbBI/uZOKuuwLYWVw46+T\n"
    "h3SDVGy8saDIL9VJDj0XHUwxotCua2lFBsdr7C9x1WLVrIJi6qmFFTy3SJkqVFxn\n"
    "keObIQ51AuD6YDUuMOpEbTCpDY4kQ9+zGWsjWbUOFFewknoXCvDfBYLe++zFv7Pl\n"
    "KIg7Wo7eODhs1kpX92AqoN5/o6USneBePNaNS9xogaBLGbrnOC5Ly7+eVCHJcc4K\n"
    "ygApOmiwPqXJH2LPaIrohr/Lrcwhr7k6R+GgmRL48EvjmOTm3KvucQiffjFlx2EV\n"
    "uxIWqicCAwEAAaNTMFEwHQYDVR0OBBYEFKtV72OhG+Rq6xiaJIu1DK7nhQziMB8G\n"
    "A1UdIwQYMBaAFKtV72OhG+Rq6xiaJIu1DK7nhQziMA8GA1UdEwEB/wQFMAMBAf8w\n"
    "DQYJKoZIhvcNAQELBQADggEBAJIWqOYawuX81ozFMT8AGrBZuEHB3FQpNvYpwaEq\n"
    "J8zufVDXe81GsZh+ZOJ+a/0Ocbv5SUHjFftr2BeMr4J+Aobn8+bOQMXwWdaa3dll\n"
    "krGfLvqPFGWPTfhfMmaokv8hhilIgruSo9Z8PgbAqWthcDdvdqE+AnbI6icdf7OQ\n"
    "hvJZQPpnYee4bfxpYmHnIzgpGeB1Ypu1C1yJ4aX0WWlxLFAQFWPF2pcKukB8CpNO\n"
    "q8UMMY9P2/eb9OPrPr2XjuF9bFg0s+kco48eh4X+t3xsJ0YWtda+1ZSabDuF9pk2\n"
    "YkQmGnJqWzMNNZAw6HtNYOipO96fEqxI99lh2IPKMlN15wg=\n"
    "-----END CERTIFICATE-----\n";

static char *write_temp(const char *text)
{
    char *path = strdup("/tmp/inferd-ca-XXXXXX");
    int fd = mkstemp(path);

    assert_true(fd >= 0);
    assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
    return path;
}

static void test_ca_file(void **state)
{
    struct ca_file *ca = NULL;
    struct err e = {0};
    char *good, *two, *junk;
    char both[4096];
    CURL *h;

    (void)state;
    snprintf(both, sizeof(both), "# two CAs, text around them\n%sjunk\n%s", unit_ca_pem,
             unit_ca_pem);
    good = write_temp(unit_ca_pem);
    two = write_temp(both);
    junk = write_temp("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n");

    assert_int_equal(ca_file_load(good, "--x-ca-file", &ca, &e), 0);
    assert_string_equal(ca_file_path(ca), good);
    h = curl_easy_init();
    assert_non_null(h);
    assert_int_equal(ca_file_apply(ca, h), 0);
    curl_easy_cleanup(h);
    ca_file_destroy(ca);
    assert_int_equal(ca_file_load(two, "--x-ca-file", &ca, &e), 0);
    ca_file_destroy(ca);

    ca = NULL;
    assert_int_equal(ca_file_load(junk, "--x-ca-file", &ca, &e), ERR_INVALID);
    assert_null(ca);
    assert_non_null(strstr(e.msg, "--x-ca-file: "));
    assert_non_null(strstr(e.msg, "holds no PEM certificate"));
    assert_int_equal(ca_file_load("/nonexistent/ca.pem", "--x-ca-file", &ca, &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "--x-ca-file: cannot read '/nonexistent/ca.pem'"));
    ca_file_destroy(NULL);
    unlink(good), unlink(two), unlink(junk);
    free(good), free(two), free(junk);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_clock_kinds),  cmocka_unit_test(test_sched_clock_file),
        cmocka_unit_test(test_ids),          cmocka_unit_test(test_jfield_int),
        cmocka_unit_test(test_url_redacted), cmocka_unit_test(test_ca_file),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
