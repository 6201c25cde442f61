#include "util.h"

#include <stdarg.h>
#include <sys/wait.h>

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
