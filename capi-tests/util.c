/* SPDX-License-Identifier: MIT OR Apache-2.0 */
#include "util.h"

#include <stdarg.h>
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>
#ifdef HAVE_VALGRIND_H
#include <valgrind/valgrind.h>
#endif

int test_failures;

static char tmpdir[256];

const char *test_tmpdir(void)
{
    if (!tmpdir[0]) {
        const char *base = getenv("TMPDIR");
        snprintf(tmpdir, sizeof tmpdir, "%s/qedtest.XXXXXX", base ? base : "/tmp");
        CHECK(mkdtemp(tmpdir) != NULL);
    }
    return tmpdir;
}

const char *test_path(const char *name)
{
    static char bufs[4][512];
    static int next;
    char *b = bufs[next++ % 4];
    snprintf(b, 512, "%s/%s", test_tmpdir(), name);
    return b;
}

int test_sh(const char *fmt, ...)
{
    char cmd[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    int st = system(cmd);
    if (st == -1 || !WIFEXITED(st)) {
        return -1;
    }
    return WEXITSTATUS(st);
}

void test_cleanup(void)
{
    if (tmpdir[0]) {
        test_sh("rm -rf '%s'", tmpdir);
        tmpdir[0] = 0;
    }
}

void test_fill(uint8_t *buf, size_t len, uint32_t seed)
{
    uint32_t x = seed * 2654435761u + 1;
    for (size_t i = 0; i < len; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        buf[i] = (uint8_t)x;
    }
}

int test_sh_out(char *out, size_t outsz, const char *fmt, ...)
{
    char cmd[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    FILE *f = popen(cmd, "r");
    if (!f) {
        return -1;
    }
    size_t n = 0;
    if (outsz > 0) {
        n = fread(out, 1, outsz - 1, f);
        out[n] = 0;
    }
    /* Drain what did not fit so the command does not die of SIGPIPE. */
    char sink[4096];
    while (fread(sink, 1, sizeof sink, f) > 0) {
    }
    int st = pclose(f);
    if (st == -1 || !WIFEXITED(st)) {
        return -1;
    }
    return WEXITSTATUS(st);
}

uint8_t *test_read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        return NULL;
    }
    size_t cap = 4096, n = 0;
    uint8_t *buf = malloc(cap + 1);
    CHECK(buf != NULL);
    for (;;) {
        size_t r = fread(buf + n, 1, cap - n, f);
        n += r;
        if (n < cap) {
            break;
        }
        cap *= 2;
        buf = realloc(buf, cap + 1);
        CHECK(buf != NULL);
    }
    CHECK(!ferror(f));
    fclose(f);
    buf[n] = 0;
    *len = n;
    return buf;
}

void test_create_qed(const char *path, uint64_t size, const char *backing)
{
    qed_create_options o = QED_INIT(qed_create_options);
    o.size = size;
    o.backing_file = backing;
    o.backing_format = backing != NULL ? "qed" : NULL;
    CHECK_RET(qed_create(path, &o), 0);
}

void test_write_file(const char *path, const void *buf, size_t len)
{
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL);
    CHECK(len == 0 || fwrite(buf, 1, len, f) == len);
    CHECK(fclose(f) == 0);
}

void test_pwrite_file(const char *path, const void *buf, size_t len, uint64_t offset)
{
    int fd = open(path, O_WRONLY | O_CREAT, 0644);
    CHECK(fd >= 0);
    size_t done = 0;
    while (done < len) {
        ssize_t r = pwrite(fd, (const uint8_t *)buf + done, len - done, (off_t)(offset + done));
        CHECK(r > 0);
        done += (size_t)r;
    }
    CHECK(close(fd) == 0);
}

long test_first_diff(const uint8_t *a, const uint8_t *b, size_t len)
{
    if (len == 0 || memcmp(a, b, len) == 0) {
        return -1;
    }
    for (size_t i = 0; i < len; i++) {
        if (a[i] != b[i]) {
            return (long)i;
        }
    }
    return -1;
}

int test_all(const uint8_t *buf, size_t len, uint8_t v)
{
    for (size_t i = 0; i < len; i++) {
        if (buf[i] != v) {
            return 0;
        }
    }
    return 1;
}

int test_under_valgrind(void)
{
    const char *e = getenv("QED_TEST_VALGRIND");
    if (e && *e && strcmp(e, "0") != 0) {
        return 1;
    }
#ifdef RUNNING_ON_VALGRIND
    return RUNNING_ON_VALGRIND != 0;
#else
    return 0;
#endif
}

void test_grow(uint8_t **data, size_t *len, size_t *cap, size_t want)
{
    if (want > *cap) {
        size_t c = *cap ? *cap : 65536;
        while (c < want) {
            c *= 2;
        }
        uint8_t *d = realloc(*data, c);
        CHECK(d != NULL);
        *data = d;
        *cap = c;
    }
    if (want > *len) {
        memset(*data + *len, 0, want - *len);
        *len = want;
    }
}
