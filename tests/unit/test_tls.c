/*
 * test_tls.c: HTTPS certificates (src/http/tls.c) under ASan: loading, refusing bad files with
 * their names, reloading (the old generation keeps serving when a file is bad) and freeing
 * every generation. The certificates are made with the openssl CLI in a temporary folder.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "http/http_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char dir[64];

static int run(const char *cmd)
{
    char full[2048];

    snprintf(full, sizeof(full), "cd '%s' && %s >/dev/null 2>&1", dir, cmd);
    return system(full);
}

static int setup(void **state)
{
    (void)state;
    snprintf(dir, sizeof(dir), "/tmp/inferd-test-tls-XXXXXX");
    if (!mkdtemp(dir))
        return -1;
    /* two self-signed pairs: a.pem/a.key and b.pem/b.key */
    return run("openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=a -keyout a.key "
               "-out a.pem && openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=b "
               "-keyout b.key -out b.pem && printf 'not a certificate\\n' > bad.pem");
}

static int teardown(void **state)
{
    char cmd[128];

    (void)state;
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    return system(cmd) == 0 ? 0 : -1;
}

static void path(char *out, size_t n, const char *name)
{
    snprintf(out, n, "%s/%s", dir, name);
}

static void test_load_reload_and_free(void **state)
{
    char cert[128], key[128], ca[128];
    struct http_config cfg = {.idle_timeout_s = 1};
    struct http_tls *t = NULL;
    struct MHD_OptionItem opts[3];
    struct err e = {0};

    (void)state;
    path(cert, sizeof(cert), "serving.pem");
    path(key, sizeof(key), "serving.key");
    path(ca, sizeof(ca), "a.pem");
    assert_int_equal(run("cp a.pem serving.pem && cp a.key serving.key"), 0);
    cfg.tls_cert = cert;
    cfg.tls_key = key;
    cfg.tls_client_ca = ca;
    assert_int_equal(tls_create(&cfg, &t, &e), 0);
    assert_int_equal(tls_daemon_options(t, opts), MHD_USE_TLS);
    assert_int_equal(opts[2].option, MHD_OPTION_END);
    /* one process, one TLS context */
    {
        struct http_tls *t2 = NULL;
        assert_int_equal(tls_create(&cfg, &t2, &e), ERR_INVALID);
        assert_null(t2);
    }
    /* reloads: each generation is retired, and all are freed by tls_destroy (LeakSanitizer) */
    assert_int_equal(run("cp b.pem serving.pem && cp b.key serving.key"), 0);
    assert_int_equal(tls_reload(t, &e), 0);
    assert_int_equal(tls_reload(t, &e), 0);
    /* a bad file, or a key that is not the certificate's: refused, naming it */
    assert_int_equal(run("cp bad.pem serving.pem"), 0);
    assert_int_equal(tls_reload(t, &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "--tls-cert"));
    assert_non_null(strstr(e.msg, cert));
    assert_int_equal(run("cp b.pem serving.pem && cp a.key serving.key"), 0);
    assert_int_equal(tls_reload(t, &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "is not the key of"));
    assert_null(strstr(e.msg, "PRIVATE"));
    assert_int_equal(run("rm serving.key"), 0);
    assert_int_equal(tls_reload(t, &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "cannot open"));
    tls_destroy(t);
    tls_destroy(NULL);
    assert_int_equal(tls_daemon_options(NULL, opts), 0);
    assert_int_equal(opts[0].option, MHD_OPTION_END);
}

static void test_bad_files_at_start(void **state)
{
    char good_cert[128], good_key[128], bad[128], missing[128];
    struct http_tls *t = NULL;
    struct err e = {0};

    (void)state;
    path(good_cert, sizeof(good_cert), "a.pem");
    path(good_key, sizeof(good_key), "a.key");
    path(bad, sizeof(bad), "bad.pem");
    path(missing, sizeof(missing), "missing.pem");
    struct {
        const char *cert, *key, *ca, *want;
    } cases[] = {
        {bad, good_key, NULL, "--tls-cert"},           {good_cert, bad, NULL, "--tls-key"},
        {good_cert, good_key, bad, "--tls-client-ca"}, {missing, good_key, NULL, "cannot open"},
        {good_cert, "", NULL, "go together"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct http_config cfg = {
            .tls_cert = cases[i].cert, .tls_key = cases[i].key, .tls_client_ca = cases[i].ca};
        assert_int_equal(tls_create(&cfg, &t, &e), ERR_INVALID);
        assert_null(t);
        assert_non_null(strstr(e.msg, cases[i].want));
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_load_reload_and_free),
        cmocka_unit_test(test_bad_files_at_start),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
