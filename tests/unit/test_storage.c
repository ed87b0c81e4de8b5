/*
 * test_storage.c: the storage layer without a network: the generic line reader over the file
 * backend (buffer boundaries, long lines, CRLF, no final newline), whole-object calls, dispatch
 * by scheme, configuration bounds, and the S3 pieces that are pure functions (URI encoding,
 * canonical query strings, ListObjectsV2 and error XML). Only regular files are objects: a FIFO,
 * a device or a folder is refused without blocking, whole reads stop at their limit, and a
 * listing names what it cannot read and stops at a link loop.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "storage/storage_internal.h"

#include <dirent.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

static char dir[64];

static int make_dir(void **state)
{
    (void)state;
    snprintf(dir, sizeof(dir), "/tmp/inferd-test-storage-XXXXXX");
    return mkdtemp(dir) ? 0 : -1;
}

static int remove_dir(void **state)
{
    char cmd[128];

    (void)state;
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    return system(cmd) == 0 ? 0 : -1;
}

static char *path_in_dir(const char *name)
{
    char *p = storage_join(dir, name);

    assert_non_null(p);
    return p;
}

/* Writes `len` bytes through storage_put and reads them back line by line. */
static void check_lines(const char *data, size_t len, const char **want, size_t n_want)
{
    char *uri = path_in_dir("lines.txt");
    struct storage_reader *r = NULL;
    struct err e = {0};
    const char *line;
    size_t got_len, i = 0;
    int rc;

    assert_int_equal(storage_put(uri, data, len, &e), 0);
    assert_int_equal(storage_open_read(uri, &r, &e), 0);
    while ((rc = storage_read_line(r, &line, &got_len, &e)) == 1) {
        assert_true(i < n_want);
        assert_int_equal(got_len, strlen(want[i]));
        assert_memory_equal(line, want[i], got_len);
        assert_int_equal(line[got_len], '\0');
        i++;
    }
    assert_int_equal(rc, 0);
    assert_int_equal(i, n_want);
    assert_int_equal(storage_read_line(r, &line, &got_len, &e), 0); /* stays at the end */
    storage_close_read(r);
    free(uri);
}

static void test_line_endings(void **state)
{
    (void)state;
    check_lines("", 0, NULL, 0);
    check_lines("a\nbb\r\n\nccc", 10, (const char *[]){"a", "bb", "", "ccc"}, 4);
    check_lines("x\r\n", 3, (const char *[]){"x"}, 1);
    check_lines("\n\n", 2, (const char *[]){"", ""}, 2);
    check_lines("only\r", 5, (const char *[]){"only"}, 1);
}

static void test_long_lines_cross_the_buffer(void **state)
{
    /* 3 MiB lines outgrow the 1 MiB read buffer; short ones straddle its boundaries */
    size_t big = (size_t)3 << 20, n_small = 200000, len = 0;
    char *data = malloc(2 * big + n_small * 8 + 16);
    char *uri = path_in_dir("long.txt");
    struct storage_reader *r = NULL;
    struct err e = {0};
    const char *line;
    size_t got, count = 0;

    (void)state;
    assert_non_null(data);
    memset(data, 'a', big);
    len = big;
    data[len++] = '\n';
    for (size_t i = 0; i < n_small; i++)
        len += (size_t)snprintf(data + len, 9, "%06zu\r\n", i);
    memset(data + len, 'b', big);
    len += big; /* no final newline */
    assert_int_equal(storage_put(uri, data, len, &e), 0);
    assert_int_equal(storage_open_read(uri, &r, &e), 0);
    assert_int_equal(storage_read_line(r, &line, &got, &e), 1);
    assert_int_equal(got, big);
    assert_true(line[0] == 'a' && line[big - 1] == 'a');
    for (size_t i = 0; i < n_small; i++) {
        char want[8];
        snprintf(want, sizeof(want), "%06zu", i);
        assert_int_equal(storage_read_line(r, &line, &got, &e), 1);
        assert_int_equal(got, 6);
        assert_memory_equal(line, want, 6);
        count++;
    }
    assert_int_equal(storage_read_line(r, &line, &got, &e), 1);
    assert_int_equal(got, big);
    assert_true(line[0] == 'b' && line[big - 1] == 'b');
    assert_int_equal(storage_read_line(r, &line, &got, &e), 0);
    assert_int_equal(count, n_small);
    storage_close_read(r);
    free(uri);
    free(data);
}

static void test_whole_objects_and_listing(void **state)
{
    char *a = path_in_dir("tree/a.txt"), *b = path_in_dir("tree/sub/b.txt");
    char *tree = path_in_dir("tree"), file_uri[128];
    struct buf got = {0};
    struct err e = {0};
    char **names = NULL;
    size_t n = 0;
    int is_object = -1;

    (void)state;
    assert_int_equal(storage_put(a, "hello", 5, &e), 0);
    assert_int_equal(storage_put(b, "", 0, &e), 0);
    snprintf(file_uri, sizeof(file_uri), "file://%s", a);
    assert_int_equal(storage_get(file_uri, 1 << 20, &got, &e), 0);
    assert_int_equal(got.len, 5);
    assert_string_equal(got.data, "hello");
    buf_release(&got);
    assert_true(storage_exists(a));
    assert_int_equal(storage_list(tree, &names, &n, &is_object, &e), 0);
    assert_int_equal(is_object, 0);
    assert_int_equal(n, 2);
    assert_string_equal(names[0], "a.txt");
    assert_string_equal(names[1], "sub/b.txt");
    storage_names_free(names, n);
    assert_int_equal(storage_list(a, &names, &n, &is_object, &e), 0);
    assert_int_equal(is_object, 1);
    assert_int_equal(n, 1);
    assert_string_equal(names[0], "a.txt");
    storage_names_free(names, n);
    assert_int_equal(storage_delete(a, &e), 0);
    assert_int_equal(storage_delete(a, &e), 0); /* missing: fine */
    assert_false(storage_exists(a));
    assert_int_equal(storage_get(a, 1 << 20, &got, &e), ERR_NOT_FOUND);
    assert_non_null(strstr(e.msg, "a.txt"));
    buf_release(&got);
    free(a);
    free(b);
    free(tree);
}

static void test_abort_leaves_nothing(void **state)
{
    char *uri = path_in_dir("aborted.txt");
    struct storage_writer *w = NULL;
    struct err e = {0};

    (void)state;
    assert_int_equal(storage_open_write(uri, &w, &e), 0);
    assert_int_equal(storage_write(w, "partial", 7, &e), 0);
    storage_abort(w);
    storage_abort(NULL);
    assert_false(storage_exists(uri));
    free(uri);
}

/* Every call on a FIFO, a device, a socket or a folder returns at once with ERR_INVALID naming
 * what it is (a FIFO without a writer would block open() for ever on an unguarded path). */
static void test_only_regular_files(void **state)
{
    struct {
        const char *name, *kind;
    } odd[] = {
        {"fifo", "is a FIFO, not a regular file"},
        {"folder", "is a folder, not a regular file"},
        {"socket", "is a socket, not a regular file"},
        {"zero", "is a character device, not a regular file"},
    };
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    struct storage_reader *r = NULL;
    struct storage_writer *w = NULL;
    struct err e = {0};
    struct buf b = {0};
    char **names = NULL;
    size_t n = 0;
    int is_object = 0, fd = socket(AF_UNIX, SOCK_STREAM, 0);
    char *p = path_in_dir("odd");

    (void)state;
    assert_int_equal(mkdir(p, 0755), 0);
    free(p);
    p = path_in_dir("odd/fifo");
    assert_int_equal(mkfifo(p, 0600), 0);
    free(p);
    p = path_in_dir("odd/folder");
    assert_int_equal(mkdir(p, 0755), 0);
    free(p);
    p = path_in_dir("odd/socket");
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", p);
    assert_true(fd >= 0);
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    free(p);
    p = path_in_dir("odd/zero");
    assert_int_equal(symlink("/dev/zero", p), 0);
    free(p);
    for (size_t i = 0; i < sizeof(odd) / sizeof(odd[0]); i++) {
        char name[64];
        snprintf(name, sizeof(name), "odd/%s", odd[i].name);
        p = path_in_dir(name);
        assert_int_equal(storage_get(p, 1 << 20, &b, &e), ERR_INVALID);
        assert_non_null(strstr(e.msg, odd[i].kind));
        assert_int_equal(storage_open_read(p, &r, &e), ERR_INVALID);
        assert_null(r);
        assert_int_equal(storage_check_object(p, 0, &e), ERR_INVALID);
        assert_non_null(strstr(e.msg, odd[i].kind));
        /* never written through, never replaced by the rename */
        assert_int_equal(storage_open_write(p, &w, &e), ERR_INVALID);
        assert_non_null(strstr(e.msg, odd[i].kind));
        assert_null(w);
        assert_int_equal(storage_put(p, "x", 1, &e), ERR_INVALID);
        free(p);
    }
    /* a listing names the entry it cannot read, rather than skipping it */
    p = path_in_dir("odd");
    assert_int_equal(storage_list(p, &names, &n, &is_object, &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "not a regular file"));
    assert_null(names);
    free(p);
    p = path_in_dir("odd/fifo");
    assert_int_equal(storage_list(p, &names, &n, &is_object, &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "is a FIFO, not a regular file or a folder"));
    free(p);
    /* a missing file passes the check: it is checked when it is read */
    p = path_in_dir("odd/missing");
    assert_int_equal(storage_check_object(p, 10, &e), 0);
    free(p);
    close(fd);
    buf_release(&b);
}

/* storage_get() stops at its limit: refused from the size when it is known, and after one byte
 * more than the limit when it is not (a device, a file that grows). */
static void test_bounded_get(void **state)
{
    char *p = path_in_dir("ten.txt");
    struct err e = {0};
    struct buf b = {0};

    (void)state;
    assert_int_equal(storage_put(p, "0123456789", 10, &e), 0);
    assert_int_equal(storage_get(p, 10, &b, &e), 0);
    assert_int_equal(b.len, 10);
    buf_release(&b);
    assert_int_equal(storage_get(p, 9, &b, &e), ERR_TOO_LARGE);
    assert_non_null(strstr(e.msg, "10 bytes, over the limit of 9"));
    assert_int_equal(b.len, 0); /* not read */
    assert_int_equal(storage_check_object(p, 9, &e), ERR_TOO_LARGE);
    assert_non_null(strstr(e.msg, "is 10 bytes, over the limit of 9"));
    assert_int_equal(storage_check_object(p, 10, &e), 0);
    assert_int_equal(storage_check_object(p, 0, &e), 0);
    buf_release(&b);
    free(p);
}

/* storage_read() hands over raw bytes, after what storage_read_line() buffered. */
static void test_raw_read(void **state)
{
    char *p = path_in_dir("raw.txt");
    struct storage_reader *r = NULL;
    struct err e = {0};
    const char *line;
    char got[64];
    size_t len, n, total = 0;

    (void)state;
    assert_int_equal(storage_put(p, "one\r\ntwo\nthree", 14, &e), 0);
    assert_int_equal(storage_open_read(p, &r, &e), 0);
    assert_int_equal(storage_read_line(r, &line, &len, &e), 1);
    assert_int_equal(len, 3);
    do {
        assert_int_equal(storage_read(r, got + total, 4, &n, &e), 0);
        total += n;
    } while (n > 0);
    assert_int_equal(total, 9);
    assert_memory_equal(got, "two\nthree", 9);
    storage_close_read(r);
    free(p);
}

/* A listing that meets a link back to a folder it is inside stops with an error. */
static void test_list_loop(void **state)
{
    char *top = path_in_dir("loop"), *sub = path_in_dir("loop/a"), *link = path_in_dir("loop/a/up");
    char **names = NULL;
    size_t n = 0;
    int is_object = 0;
    struct err e = {0};

    (void)state;
    assert_int_equal(mkdir(top, 0755), 0);
    assert_int_equal(mkdir(sub, 0755), 0);
    assert_int_equal(symlink(top, link), 0);
    assert_int_equal(storage_list(top, &names, &n, &is_object, &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "a link loop"));
    free(top);
    free(sub);
    free(link);
}

static void test_schemes_and_configuration(void **state)
{
    struct err e = {0};
    struct buf b = {0};
    struct storage_reader *r = NULL;

    (void)state;
    assert_true(storage_supports("/a/b"));
    assert_true(storage_supports("file:///a"));
    assert_true(storage_supports("s3://bucket/key"));
    assert_false(storage_supports("gs://bucket/key"));
    assert_int_equal(storage_get("gs://bucket/key", 1 << 20, &b, &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "gs://bucket/key"));
    assert_int_equal(storage_open_read("s3:///key", &r, &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "no bucket name"));
    assert_null(r);
    assert_int_equal(storage_configure(&(struct storage_config){.s3_endpoint = "ftp://x"}, &e),
                     ERR_INVALID);
    assert_non_null(strstr(e.msg, "ftp://x"));
    assert_int_equal(storage_configure(&(struct storage_config){.s3_part_size_bytes = 4 << 20}, &e),
                     ERR_INVALID);
    assert_non_null(strstr(e.msg, "5 MiB"));
    assert_int_equal(storage_configure(&(struct storage_config){.s3_endpoint = "http://h:1/",
                                                                .s3_part_size_bytes = 5 << 20},
                                       &e),
                     0);
    assert_string_equal(storage_s3_endpoint_option(), "http://h:1/");
    assert_int_equal(storage_s3_part_size(), 5 << 20);
    assert_int_equal(storage_configure(&(struct storage_config){0}, &e), 0);
    assert_int_equal(storage_s3_part_size(), 8 << 20);
    buf_release(&b);
}

/* --file-roots: every file location must resolve inside a root, symlinks and all. */
static void test_file_roots(void **state)
{
    char root[128], other[128], roots[300], p[512], cwd[1024];
    struct err e = {0};
    struct buf b = {0};

    (void)state;
    snprintf(root, sizeof(root), "%s/root", dir);
    snprintf(other, sizeof(other), "%s/other", dir);
    assert_int_equal(mkdir(root, 0755), 0);
    assert_int_equal(mkdir(other, 0755), 0);
    snprintf(p, sizeof(p), "%s/secret", other);
    assert_int_equal(storage_put(p, "s\n", 2, &e), 0);
    snprintf(p, sizeof(p), "%s/escape", root); /* a link inside that points outside */
    assert_int_equal(symlink(other, p), 0);

    snprintf(roots, sizeof(roots), "%s/missing", dir);
    assert_int_equal(storage_configure(&(struct storage_config){.file_roots = roots}, &e),
                     ERR_INVALID);
    assert_non_null(strstr(e.msg, "missing"));
    snprintf(roots, sizeof(roots), "%s::%s//./", root, other); /* two roots, any spelling */
    assert_int_equal(storage_configure(&(struct storage_config){.file_roots = roots}, &e), 0);
    snprintf(p, sizeof(p), "%s/secret", other);
    assert_int_equal(storage_check_allowed(p, &e), 0);
    snprintf(roots, sizeof(roots), "%s/", root);
    assert_int_equal(storage_configure(&(struct storage_config){.file_roots = roots}, &e), 0);

    /* inside: existing or not yet, plain path or file:// */
    snprintf(p, sizeof(p), "%s/a/b/new.jsonl", root);
    assert_int_equal(storage_check_allowed(p, &e), 0);
    assert_int_equal(storage_put(p, "x\n", 2, &e), 0);
    snprintf(p, sizeof(p), "file://%s/a/b/new.jsonl", root);
    assert_int_equal(storage_get(p, 1 << 20, &b, &e), 0);
    assert_int_equal(storage_check_allowed(root, &e), 0);
    assert_int_equal(storage_check_allowed("s3://bucket/anything", &e), 0);

    /* outside: another folder, a prefix look-alike, "..", a symlink out, a relative path */
    snprintf(p, sizeof(p), "%s/secret", other);
    assert_int_equal(storage_check_allowed(p, &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, "outside --file-roots"));
    assert_int_equal(storage_get(p, 1 << 20, &b, &e), ERR_INVALID);
    assert_int_equal(storage_put(p, "y\n", 2, &e), ERR_INVALID);
    snprintf(p, sizeof(p), "%s2/x", root);
    assert_int_equal(storage_check_allowed(p, &e), ERR_INVALID);
    snprintf(p, sizeof(p), "%s/../other/secret", root);
    assert_int_equal(storage_check_allowed(p, &e), ERR_INVALID);
    assert_non_null(strstr(e.msg, ".."));
    snprintf(p, sizeof(p), "file://%s/escape/secret", root);
    assert_int_equal(storage_get(p, 1 << 20, &b, &e), ERR_INVALID);
    snprintf(p, sizeof(p), "%s/escape/new-file", root);
    assert_int_equal(storage_put(p, "z\n", 2, &e), ERR_INVALID);
    assert_int_equal(storage_check_allowed("/etc/passwd", &e), ERR_INVALID);
    assert_non_null(getcwd(cwd, sizeof(cwd)));
    assert_int_equal(chdir(root), 0);
    assert_int_equal(storage_check_allowed("a/b/new.jsonl", &e), 0);
    assert_int_equal(chdir(other), 0);
    assert_int_equal(storage_check_allowed("secret", &e), ERR_INVALID);
    assert_int_equal(chdir(cwd), 0);

    /* no roots: anywhere again */
    assert_int_equal(storage_configure(&(struct storage_config){0}, &e), 0);
    snprintf(p, sizeof(p), "%s/secret", other);
    assert_int_equal(storage_check_allowed(p, &e), 0);
    buf_release(&b);
}

/* ---- --file-roots against a racing swap ---- */

#define RACE_ROUNDS 3000 /* storage calls of each kind; the swapper runs until they end */

struct swapper {
    char inside[256], parked[256], outside[256];
    _Atomic int stop;
    _Atomic long swaps;
};

/* Swaps root/d for a symlink to the outside folder and back, as fast as it can. */
static void *swap_main(void *arg)
{
    struct swapper *sw = arg;

    while (!atomic_load(&sw->stop)) {
        if (rename(sw->inside, sw->parked) != 0)
            continue;
        if (symlink(sw->outside, sw->inside) == 0) {
            atomic_fetch_add(&sw->swaps, 1);
            unlink(sw->inside);
        }
        rename(sw->parked, sw->inside);
    }
    return NULL;
}

/* 1 if the outside folder holds only its one file, as made. */
static int outside_untouched(const char *outside)
{
    DIR *d = opendir(outside);
    struct dirent *de;
    int n = 0, ok = 1;

    assert_non_null(d);
    while ((de = readdir(d)))
        if (strcmp(de->d_name, ".") != 0 && strcmp(de->d_name, "..") != 0)
            ok = ok && strcmp(de->d_name, "f") == 0 && ++n == 1;
    closedir(d);
    return ok && n == 1;
}

/*
 * A thread swaps a folder under the root for a symlink to a folder outside it, in a loop,
 * while reads, writes, stats and listings go on under the root: none ever reads, lists or
 * writes anything outside (each call either works inside or fails).
 */
static void test_file_roots_against_a_racing_symlink(void **state)
{
    char root[128], p[512], out_p[512];
    struct swapper sw = {0};
    struct err e = {0};
    struct buf b = {0};
    pthread_t th;
    int n_read = 0, n_written = 0;

    (void)state;
    snprintf(root, sizeof(root), "%s/race-root", dir);
    snprintf(sw.inside, sizeof(sw.inside), "%s/d", root);
    snprintf(sw.parked, sizeof(sw.parked), "%s/d.parked", root);
    snprintf(sw.outside, sizeof(sw.outside), "%s/race-outside", dir);
    assert_int_equal(mkdir(root, 0755), 0);
    assert_int_equal(mkdir(sw.inside, 0755), 0);
    assert_int_equal(mkdir(sw.outside, 0755), 0);
    snprintf(p, sizeof(p), "%s/f", sw.inside);
    assert_int_equal(storage_put(p, "inside\n", 7, &e), 0);
    snprintf(p, sizeof(p), "%s/f", sw.outside);
    assert_int_equal(storage_put(p, "SECRET\n", 7, &e), 0);
    assert_int_equal(storage_configure(&(struct storage_config){.file_roots = root}, &e), 0);

    assert_int_equal(pthread_create(&th, NULL, swap_main, &sw), 0);
    snprintf(p, sizeof(p), "%s/f", sw.inside);
    for (int i = 0; i < RACE_ROUNDS; i++) {
        struct storage_identity id;
        char **names = NULL;
        size_t n = 0;
        int is_object = 0;

        b.len = 0;
        if (storage_get(p, 1 << 20, &b, &e) == 0) {
            assert_string_equal(b.data, "inside\n");
            n_read++;
        }
        if (storage_identify(p, &id, &e) == 0)
            assert_int_equal(id.size_bytes, 7);
        snprintf(out_p, sizeof(out_p), "%s/w-%d", sw.inside, i % 8);
        if (storage_put(out_p, "written\n", 8, &e) == 0)
            n_written++;
        if (storage_list(sw.inside, &names, &n, &is_object, &e) == 0) {
            for (size_t k = 0; k < n; k++)
                assert_true(strcmp(names[k], "f") == 0 || strncmp(names[k], "w-", 2) == 0);
            storage_names_free(names, n);
        }
        storage_delete(out_p, &e);
    }
    atomic_store(&sw.stop, 1);
    pthread_join(th, NULL);

    /* the outside folder was never written (no output, no temporary file) nor read */
    assert_true(outside_untouched(sw.outside));
    snprintf(out_p, sizeof(out_p), "%s/f", sw.outside);
    assert_int_equal(storage_configure(&(struct storage_config){0}, &e), 0);
    b.len = 0;
    assert_int_equal(storage_get(out_p, 1 << 20, &b, &e), 0);
    assert_string_equal(b.data, "SECRET\n");
    /* the race really ran both ways */
    assert_true(atomic_load(&sw.swaps) > 0);
    assert_true(n_read > 0 && n_written > 0);
    buf_release(&b);
}

static void test_join(void **state)
{
    char *s;

    (void)state;
    s = storage_join("s3://b/p/", "x.out");
    assert_string_equal(s, "s3://b/p/x.out");
    free(s);
    s = storage_join("s3://b", "_SUCCESS");
    assert_string_equal(s, "s3://b/_SUCCESS");
    free(s);
}

static void test_s3_encoding(void **state)
{
    struct buf b = {0};

    (void)state;
    assert_int_equal(storage_s3_uri_encode(&b, "a b/c~d_e.f-g+h%é", 1), 0);
    assert_string_equal(b.data, "a%20b/c~d_e.f-g%2Bh%25%C3%A9");
    b.len = 0;
    assert_int_equal(storage_s3_uri_encode(&b, "in/x=1&y", 0), 0);
    assert_string_equal(b.data, "in%2Fx%3D1%26y");
    b.len = 0;
    /* names sorted by the caller; valueless parameters keep their '=' */
    assert_int_equal(storage_s3_query_add(&b, "continuation-token", "1/a+b=="), 0);
    assert_int_equal(storage_s3_query_add(&b, "list-type", "2"), 0);
    assert_int_equal(storage_s3_query_add(&b, "prefix", "dir/"), 0);
    assert_string_equal(b.data, "continuation-token=1%2Fa%2Bb%3D%3D&list-type=2&prefix=dir%2F");
    b.len = 0;
    assert_int_equal(storage_s3_query_add(&b, "uploads", NULL), 0);
    assert_string_equal(b.data, "uploads=");
    buf_release(&b);
}

static void test_s3_xml(void **state)
{
    const char *page =
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
        "<ListBucketResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Name>b</Name>"
        "<Prefix>in/</Prefix><IsTruncated>true</IsTruncated>"
        "<Contents><Key>in/b.jsonl</Key><Size>3</Size></Contents>"
        "<Contents><Key>in/sub/</Key><Size>0</Size></Contents>"
        "<Contents><Key>in/a &amp; c.csv</Key></Contents>"
        "<NextContinuationToken>tok+1/=</NextContinuationToken></ListBucketResult>";
    const char *last = "<ListBucketResult><IsTruncated>false</IsTruncated>"
                       "<Contents><Key>in/z</Key></Contents></ListBucketResult>";
    const char *error = "<?xml version=\"1.0\"?><Error><Code>NoSuchKey</Code>"
                        "<Message>The specified key does not exist.</Message></Error>";
    struct storage_names ns = {0};
    char *next = NULL, *s;

    (void)state;
    assert_int_equal(storage_s3_parse_list(page, strlen(page), "in/", &ns, &next), 0);
    assert_int_equal(ns.n, 2);
    assert_string_equal(ns.v[0], "b.jsonl");
    assert_string_equal(ns.v[1], "a & c.csv");
    assert_string_equal(next, "tok+1/=");
    free(next);
    assert_int_equal(storage_s3_parse_list(last, strlen(last), "in/", &ns, &next), 0);
    assert_null(next);
    assert_int_equal(ns.n, 3);
    assert_string_equal(ns.v[2], "z");
    assert_int_equal(storage_s3_parse_list(error, strlen(error), "in/", &ns, &next), ERR_IO);
    assert_int_equal(storage_s3_parse_list("not xml", 7, "", &ns, &next), ERR_IO);
    assert_int_equal(storage_s3_parse_list("", 0, "", &ns, &next), ERR_IO);
    storage_names_free(ns.v, ns.n);
    s = storage_s3_xml_text(error, strlen(error), "Code");
    assert_string_equal(s, "NoSuchKey");
    free(s);
    assert_null(storage_s3_xml_text(error, strlen(error), "UploadId"));
    assert_null(storage_s3_xml_text("<a", 2, "a"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_line_endings),
        cmocka_unit_test(test_long_lines_cross_the_buffer),
        cmocka_unit_test(test_whole_objects_and_listing),
        cmocka_unit_test(test_abort_leaves_nothing),
        cmocka_unit_test(test_only_regular_files),
        cmocka_unit_test(test_bounded_get),
        cmocka_unit_test(test_raw_read),
        cmocka_unit_test(test_list_loop),
        cmocka_unit_test(test_schemes_and_configuration),
        cmocka_unit_test(test_file_roots),
        cmocka_unit_test(test_file_roots_against_a_racing_symlink),
        cmocka_unit_test(test_join),
        cmocka_unit_test(test_s3_encoding),
        cmocka_unit_test(test_s3_xml),
    };
    return cmocka_run_group_tests(tests, make_dir, remove_dir);
}
