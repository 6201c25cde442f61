/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/* What a running hypervisor needs from an open image, read from the file: the need-check bit
 * is cleared by the idle timer (need_check_delay_ms), at once by qed_aio_drain and qed_settle,
 * and only at close with QED_NEED_CHECK_AT_CLOSE; qed_reopen switches read-only <-> read-write
 * with QEMU's locks following (qemu-io in another process sees each mode), refuses flags it
 * cannot change with -ENOTSUP; a second conflicting open in this process is -EBUSY. */
#include "util.h"

#include <time.h>

#define NEED_CHECK 2u

static void sleep_ms(long ms)
{
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&t, NULL);
}

static uint64_t features(const char *p)
{
    size_t n;
    uint8_t *b = test_read_file(p, &n);
    CHECK(b != NULL && n >= 24);
    uint64_t f = 0;
    for (int i = 7; i >= 0; i--)
        f = f << 8 | b[16 + i];
    free(b);
    return f;
}

/* Waits up to 20 s for the bit to read `want`. */
static int wait_bit(const char *p, int want)
{
    for (int i = 0; i < 1000; i++) {
        if (!!(features(p) & NEED_CHECK) == want)
            return 1;
        sleep_ms(20);
    }
    return !!(features(p) & NEED_CHECK) == want;
}

static qed_image *open_rw(const char *p, uint32_t delay_ms)
{
    qed_open_options o = QED_INIT(qed_open_options);
    o.flags = QED_OPEN_RDWR;
    o.need_check_delay_ms = delay_ms;
    qed_image *img;
    CHECK_RET(qed_open_ext(p, &o, &img), 0);
    return img;
}

static void done_cb(void *opaque, int ret)
{
    *(int *)opaque = ret;
}

static void idle(const char *p)
{
    static uint8_t buf[4096];
    memset(buf, 0x42, sizeof buf);
    qed_image *img = open_rw(p, 100);
    CHECK_RET(qed_write(img, 0, buf, sizeof buf), 0);
    EXPECT(features(p) & NEED_CHECK);
    EXPECT(wait_bit(p, 0));
    CHECK_RET(qed_close(img), 0);

    /* No timer: the bit stays until qed_settle. */
    img = open_rw(p, QED_NEED_CHECK_AT_CLOSE);
    CHECK_RET(qed_write(img, 1 << 20, buf, sizeof buf), 0);
    sleep_ms(500);
    EXPECT(features(p) & NEED_CHECK);
    CHECK_RET(qed_settle(img), 0);
    EXPECT(!(features(p) & NEED_CHECK));
    CHECK_RET(qed_close(img), 0);

    /* A pending timer fires at once on drain. */
    img = open_rw(p, 3600000);
    int ret = 1;
    CHECK_RET(qed_aio_write(img, 2 << 20, buf, sizeof buf, done_cb, &ret), 0);
    CHECK_RET(qed_aio_drain(img), 0);
    EXPECT(ret == 0);
    EXPECT(!(features(p) & NEED_CHECK));
    CHECK_RET(qed_close(img), 0);
    EXPECT(test_sh("qemu-img check -f qed '%s' >/dev/null", p) == 0);
}

static void reopen(const char *p)
{
    static uint8_t buf[512];
    qed_image *img, *other = NULL;
    CHECK_RET(qed_open(p, 0, &img), 0);
    EXPECT(test_sh("qemu-io -f qed -r -c 'read 0 512' '%s' >/dev/null 2>&1", p) == 0);
    EXPECT(test_sh("qemu-io -f qed -c 'read 0 512' '%s' >/dev/null 2>&1", p) != 0);
    EXPECT_ERR(qed_write(img, 0, buf, sizeof buf), -EROFS, NULL);
    EXPECT_ERR(qed_reopen(img, QED_OPEN_RDWR | QED_OPEN_DIRECT), -ENOTSUP, "flags");

    CHECK_RET(qed_reopen(img, QED_OPEN_RDWR), 0);
    EXPECT(test_sh("qemu-io -f qed -r -c 'read 0 512' '%s' >/dev/null 2>&1", p) != 0);
    memset(buf, 0x5c, sizeof buf);
    CHECK_RET(qed_write(img, 3 << 20, buf, sizeof buf), 0);
    EXPECT_ERR(qed_open(p, QED_OPEN_RDWR, &other), -EBUSY, "in this process");
    EXPECT(other == NULL);

    CHECK_RET(qed_reopen(img, 0), 0);
    EXPECT(!(features(p) & NEED_CHECK));
    EXPECT_ERR(qed_write(img, 0, buf, sizeof buf), -EROFS, NULL);
    EXPECT(test_sh("qemu-io -f qed -r -c 'read -P 0x5c %d 512' '%s' | grep -q '^read 512/512'",
                   3 << 20, p) == 0);
    /* Two readers in one process are fine; read-write beside a reader is not. */
    CHECK_RET(qed_open(p, 0, &other), 0);
    EXPECT_ERR(qed_reopen(img, QED_OPEN_RDWR), -EBUSY, "read-only in this process");
    CHECK_RET(qed_close(other), 0);
    CHECK_RET(qed_reopen(img, QED_OPEN_RDWR), 0);
    CHECK_RET(qed_close(img), 0);
}

int main(void)
{
    const char *p = test_path("runtime.qed");
    test_create_qed(p, 16 << 20, NULL);
    idle(p);
    reopen(p);
    test_cleanup();
    return 0;
}
