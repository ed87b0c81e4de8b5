/*
 * test_auth.c: API keys (auth/auth.h): the Authorization header, scopes, the keys file's
 * parser (errors name the line and never quote a hash), the lookup (revoked keys are not
 * found; any key of many is), and `inferd keys`' writer (0600, only hashes, revoke, reload).
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "auth/auth.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static void expect_bearer(const char *h, const char *want)
{
    const char *tok;
    size_t len;
    int rc = auth_parse_bearer(h, &tok, &len);

    if (!want) {
        assert_int_not_equal(rc, 0);
        return;
    }
    assert_int_equal(rc, 0);
    assert_int_equal(len, strlen(want));
    assert_memory_equal(tok, want, len);
}

static void test_bearer(void **state)
{
    char big[700];

    (void)state;
    expect_bearer("Bearer abc", "abc");
    expect_bearer("bearer  abc-._~+/==  ", "abc-._~+/==");
    expect_bearer("  BEARER\tx", "x");
    expect_bearer("Bearer", NULL);
    expect_bearer("Bearer ", NULL);
    expect_bearer("Bearerabc", NULL);
    expect_bearer("Basic dXNlcjpwYXNz", NULL);
    expect_bearer("Bearer a b", NULL);
    expect_bearer("Bearer a=b", NULL);
    expect_bearer("Bearer \xc3\xa9", NULL);
    memset(big, 'a', sizeof(big) - 1);
    memcpy(big, "Bearer ", 7);
    big[sizeof(big) - 1] = '\0';
    const char *tok;
    size_t len;
    assert_int_equal(auth_parse_bearer(big, &tok, &len), ERR_TOO_LARGE);
}

static void test_scopes(void **state)
{
    unsigned s;
    struct err e = {0};
    char text[64];

    (void)state;
    assert_int_equal(auth_parse_scopes("infer,jobs", &s, &e), 0);
    assert_int_equal(s, AUTH_INFER | AUTH_JOBS);
    auth_scopes_text(AUTH_BATCH | AUTH_ADMIN | AUTH_INFER, text);
    assert_string_equal(text, "infer,batch,admin");
    assert_int_equal(auth_parse_scopes("infer,root", &s, &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "'root'"));
    assert_int_equal(auth_parse_scopes("", &s, &e), ERR_INVALID);
    assert_int_equal(auth_parse_scopes("jobs,,batch", &s, &e), ERR_INVALID);
    assert_true(auth_valid_name("svc-a.1_b"));
    assert_false(auth_valid_name(""));
    assert_false(auth_valid_name("a b"));
    assert_false(auth_valid_name("a\xc3\xa9"));
}

#define HASH_A "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"

static void expect_bad_file(const char *text, const char *words)
{
    struct keyring k;
    struct err e = {0};

    assert_int_equal(keyring_parse(text, strlen(text), "f.keys", &k, &e), ERR_INVALID);
    if (!strstr(e.msg, words))
        fail_msg("'%s' lacks '%s'", e.msg, words);
    assert_null(strstr(e.msg, HASH_A));
}

static void test_keys_file_errors(void **state)
{
    (void)state;
    expect_bad_file("a infer a abc 1\n", "line 1: hash");
    expect_bad_file("# c\n\na nope a " HASH_A " 1\n", "line 3: scopes");
    expect_bad_file("a infer a " HASH_A " x\n", "created");
    expect_bad_file("a infer a " HASH_A " 1 revoked\n", "revoked=");
    expect_bad_file("a infer a " HASH_A " 1\na jobs a " HASH_A " 2\n", "line 2: a second");
    expect_bad_file("a infer a " HASH_A "\n", "found 4 fields");
    expect_bad_file("a infer a " HASH_A " 1 2 3 4\n", "fields");
    {
        struct keyring k;
        struct err e = {0};
        const char t[] = "a infer a " HASH_A " 1\n\0b";
        assert_int_equal(keyring_parse(t, sizeof(t) - 1, "f.keys", &k, &e), ERR_INVALID);
        assert_non_null(strstr(e.msg, "NUL"));
    }
}

static void test_add_find_revoke(void **state)
{
    char dir[] = "/tmp/inferd-auth-XXXXXX", path[128], tok[3][64], text[8192];
    struct err e = {0};
    struct keyring k;
    struct stat st;
    FILE *f;
    size_t n;
    struct auth *a;
    struct auth_principal who;

    (void)state;
    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof(path), "%s/inferd.keys", dir);
    assert_int_equal(auth_keys_add(path, "one", "one", AUTH_INFER, tok[0], &e), 0);
    assert_int_equal(auth_keys_add(path, "two", "team", AUTH_JOBS | AUTH_BATCH, tok[1], &e), 0);
    assert_int_equal(auth_keys_add(path, "one", "one", AUTH_INFER, tok[2], &e), ERR_CONFLICT);
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);
    f = fopen(path, "r");
    n = fread(text, 1, sizeof(text) - 1, f);
    fclose(f);
    text[n] = '\0';
    assert_null(strstr(text, tok[0]));
    assert_null(strstr(text, tok[1]));
    assert_int_equal(keyring_parse(text, n, path, &k, &e), 0);
    assert_int_equal(k.n, 2);
    assert_ptr_equal(keyring_find(&k, tok[1], strlen(tok[1])), &k.keys[1]);
    assert_ptr_equal(keyring_find(&k, tok[0], strlen(tok[0])), &k.keys[0]);
    assert_null(keyring_find(&k, tok[0], strlen(tok[0]) - 1));
    assert_null(keyring_find(&k, "inferd_x", 8));
    keyring_free(&k);

    assert_int_equal(auth_open(path, &a, &e), 0);
    assert_int_equal(auth_check(a, NULL, &who), AUTH_MISSING);
    assert_int_equal(auth_check(a, "Basic x", &who), AUTH_MALFORMED);
    snprintf(text, sizeof(text), "Bearer %s", tok[1]);
    assert_int_equal(auth_check(a, text, &who), AUTH_OK);
    assert_string_equal(who.name, "two");
    assert_string_equal(who.tenant, "team");
    assert_int_equal(who.scopes, AUTH_JOBS | AUTH_BATCH);
    assert_int_equal(auth_keys_revoke(path, "two", &e), 0);
    assert_int_equal(auth_keys_revoke(path, "two", &e), ERR_NOT_FOUND);
    assert_int_equal(auth_check(a, text, &who), AUTH_OK); /* until the reload */
    assert_int_equal(auth_reload(a, &e), 0);
    assert_int_equal(auth_check(a, text, &who), AUTH_UNKNOWN);
    assert_int_equal(auth_n_active(a), 1);
    /* a broken file on reload keeps the keys in use */
    f = fopen(path, "w");
    fputs("garbage\n", f);
    fclose(f);
    assert_int_not_equal(auth_reload(a, &e), 0);
    snprintf(text, sizeof(text), "Bearer %s", tok[0]);
    assert_int_equal(auth_check(a, text, &who), AUTH_OK);
    auth_close(a);
    unlink(path);
    snprintf(text, sizeof(text), "%s.lock", path);
    unlink(text);
    rmdir(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bearer),
        cmocka_unit_test(test_scopes),
        cmocka_unit_test(test_keys_file_errors),
        cmocka_unit_test(test_add_find_revoke),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
