/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/* Discard and write-zeroes flags through the C API: qed_discard gives whole clusters' blocks
 * back to the file system (st_blocks shrinks) and the range reads as zeros; an unknown
 * QED_ZERO_ bit is refused with -ENOTSUP naming it; QED_ZERO_NO_FALLBACK refuses a partial
 * cluster or allocated clusters without QED_ZERO_MAY_UNMAP, changing nothing, and does the
 * rest; the async forms complete through the callback (a refusal as -ENOTSUP) and are counted;
 * on custom storage (which cannot punch holes) NO_FALLBACK with MAY_UNMAP refuses, changing
 * nothing, and discard writes zeros. */
#include "util.h"

#include <pthread.h>
#include <sys/stat.h>

#define CS 65536u

static long long blocks(const char *path)
{
    struct stat st;
    CHECK(stat(path, &st) == 0);
    return (long long)st.st_blocks;
}

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int done, ret;
} waiter;

static void aio_cb(void *opaque, int ret)
{
    waiter *w = opaque;
    pthread_mutex_lock(&w->mu);
    w->ret = ret;
    w->done++;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

/* Waits for the next completion and returns its result. */
static int wait_one(waiter *w, int n)
{
    pthread_mutex_lock(&w->mu);
    while (w->done < n) {
        pthread_cond_wait(&w->cv, &w->mu);
    }
    int r = w->ret;
    pthread_mutex_unlock(&w->mu);
    return r;
}

/* Caller storage in memory. */
typedef struct {
    pthread_mutex_t mu;
    uint8_t *data;
    size_t len, cap;
} mem;

static int m_pread(void *opaque, void *buf, size_t len, uint64_t offset)
{
    mem *m = opaque;
    pthread_mutex_lock(&m->mu);
    size_t n = offset < m->len ? m->len - (size_t)offset : 0;
    n = n < len ? n : len;
    if (n) {
        memcpy(buf, m->data + offset, n);
    }
    memset((uint8_t *)buf + n, 0, len - n);
    pthread_mutex_unlock(&m->mu);
    return 0;
}

static int m_pwrite(void *opaque, const void *buf, size_t len, uint64_t offset)
{
    mem *m = opaque;
    pthread_mutex_lock(&m->mu);
    test_grow(&m->data, &m->len, &m->cap, (size_t)offset + len);
    memcpy(m->data + offset, buf, len);
    pthread_mutex_unlock(&m->mu);
    return 0;
}

static int m_flush(void *opaque)
{
    (void)opaque;
    return 0;
}

static int m_get_length(void *opaque, uint64_t *len)
{
    mem *m = opaque;
    pthread_mutex_lock(&m->mu);
    *len = m->len;
    pthread_mutex_unlock(&m->mu);
    return 0;
}

static int m_set_length(void *opaque, uint64_t len)
{
    mem *m = opaque;
    pthread_mutex_lock(&m->mu);
    if (len > m->len) {
        test_grow(&m->data, &m->len, &m->cap, (size_t)len);
    } else {
        m->len = (size_t)len;
    }
    pthread_mutex_unlock(&m->mu);
    return 0;
}

static void custom_storage(void)
{
    static mem m;
    memset(&m, 0, sizeof m);
    CHECK(pthread_mutex_init(&m.mu, NULL) == 0);
    qed_io_ops ops = {sizeof(qed_io_ops), m_pread, m_pwrite, m_flush, m_get_length,
                      m_set_length, NULL};
    qed_create_options o = QED_INIT(qed_create_options);
    o.size = 16 * CS;
    o.cluster_size = CS;
    CHECK_RET(qed_create_with_io(&ops, &m, &o), 0);
    qed_image *img;
    CHECK_RET(qed_open_with_io(&ops, &m, OPEN_OPTS(QED_OPEN_RDWR), &img), 0);
    static uint8_t buf[4 * CS], orig[4 * CS];
    test_fill(orig, sizeof orig, 3);
    CHECK_RET(qed_write(img, 0, orig, sizeof orig), 0);
    int r = qed_write_zeroes_flags(img, 0, 2 * CS, QED_ZERO_MAY_UNMAP | QED_ZERO_NO_FALLBACK);
    CHECK(r == -ENOTSUP);
    CHECK_RET(qed_discard(img, 2 * CS, 2 * CS), 0);
    CHECK_RET(qed_read(img, 0, buf, sizeof buf), 0);
    /* Refused: the first two clusters keep their data; the discarded ones read zeros. */
    CHECK(memcmp(buf, orig, 2 * CS) == 0);
    CHECK(test_all(buf + 2 * CS, 2 * CS, 0));
    qed_stats st = QED_INIT(qed_stats);
    CHECK_RET(qed_get_stats(img, &st), 0);
    CHECK(st.clusters_punched == 0 && st.discard_requests == 1);
    CHECK_RET(qed_close(img), 0);
    free(m.data);
}

int main(void)
{
    const char *path = test_path("d.qed");
    qed_create_options o = QED_INIT(qed_create_options);
    o.size = 64 * CS;
    o.cluster_size = CS;
    CHECK_RET(qed_create(path, &o), 0);
    qed_image *img;
    CHECK_RET(qed_open(path, QED_OPEN_RDWR, &img), 0);
    static uint8_t data[32 * CS], back[32 * CS];
    test_fill(data, sizeof data, 17);
    CHECK_RET(qed_write(img, 0, data, sizeof data), 0);
    CHECK_RET(qed_flush(img), 0);

    /* Discard: a partial head and tail around 16 whole clusters; their blocks are given back
     * (all but 64 KiB, which the file system's own bookkeeping may take). */
    long long b0 = blocks(path);
    CHECK_RET(qed_discard(img, CS + 100, 17 * CS - 100 + 5), 0);
    CHECK_RET(qed_flush(img), 0);
    long long b1 = blocks(path);
    CHECK(b1 + 16 * (long long)CS / 512 <= b0 + 128);
    CHECK_RET(qed_read(img, 0, back, sizeof back), 0);
    memset(data + CS + 100, 0, 17 * CS - 100 + 5);
    CHECK(memcmp(back, data, sizeof back) == 0);

    /* Flags: unknown bits refused and named; NO_FALLBACK refuses what needs written zeros and
     * changes nothing. */
    CHECK_ERR(qed_write_zeroes_flags(img, 20 * CS, CS, 0x40), -ENOTSUP, "0x40");
    CHECK_ERR(qed_write_zeroes_flags(img, 20 * CS, CS, QED_ZERO_MAY_UNMAP | 0x40), -ENOTSUP,
              "0x40");
    CHECK_ERR(qed_write_zeroes_flags(img, 20 * CS + 1, 512, QED_ZERO_NO_FALLBACK | QED_ZERO_MAY_UNMAP),
              -ENOTSUP, "part of a cluster");
    CHECK_ERR(qed_write_zeroes_flags(img, 20 * CS, 2 * CS, QED_ZERO_NO_FALLBACK), -ENOTSUP,
              "MAY_UNMAP");
    CHECK_RET(qed_read(img, 0, back, sizeof back), 0);
    CHECK(memcmp(back, data, sizeof back) == 0);
    CHECK_RET(qed_write_zeroes_flags(img, 20 * CS, 2 * CS, QED_ZERO_NO_FALLBACK | QED_ZERO_MAY_UNMAP),
              0);
    CHECK_RET(qed_write_zeroes_flags(img, 22 * CS, CS, 0), 0);
    /* Unallocated clusters (no backing file) need nothing. */
    CHECK_RET(qed_write_zeroes_flags(img, 40 * CS, 4 * CS, QED_ZERO_NO_FALLBACK), 0);
    memset(data + 20 * CS, 0, 3 * CS);

    /* Async: discard, flagged zeroes, a refusal through the callback, unknown bits at submit. */
    static waiter w = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0};
    CHECK_RET(qed_aio_discard(img, 24 * CS, 2 * CS, aio_cb, &w), 0);
    CHECK(wait_one(&w, 1) == 0);
    CHECK_RET(qed_aio_write_zeroes_flags(img, 26 * CS, CS, QED_ZERO_MAY_UNMAP, aio_cb, &w), 0);
    CHECK(wait_one(&w, 2) == 0);
    CHECK_RET(qed_aio_write_zeroes_flags(img, 28 * CS + 7, 9, QED_ZERO_NO_FALLBACK, aio_cb, &w),
              0);
    CHECK(wait_one(&w, 3) == -ENOTSUP);
    CHECK_ERR(qed_aio_write_zeroes_flags(img, 0, CS, 0x100, aio_cb, &w), -ENOTSUP, "0x100");
    CHECK_RET(qed_aio_flush(img, aio_cb, &w), 0);
    CHECK(wait_one(&w, 4) == 0);
    CHECK_RET(qed_aio_drain(img), 0);
    CHECK(w.done == 4);
    memset(data + 24 * CS, 0, 3 * CS);
    CHECK_RET(qed_read(img, 0, back, sizeof back), 0);
    CHECK(memcmp(back, data, sizeof back) == 0);

    qed_stats st = QED_INIT(qed_stats);
    CHECK_RET(qed_get_stats(img, &st), 0);
    CHECK(st.discard_requests == 2);
    CHECK(st.discard_bytes == 17 * CS - 100 + 5 + 2 * CS);
    /* 16 + 2 (flags) + 2 (aio discard) + 1 (aio MAY_UNMAP) clusters punched. */
    CHECK(st.clusters_punched == 21);
    CHECK_RET(qed_close(img), 0);

    /* The image stays consistent for QEMU (entries kept: no leak) and reads as we do. */
    CHECK(test_sh("qemu-img check -f qed '%s' >/dev/null", path) == 0);
    const char *raw = test_path("expect.raw");
    test_write_file(raw, data, sizeof data);
    CHECK(test_sh("truncate -s %u '%s'", 64 * CS, raw) == 0);
    CHECK(test_sh("qemu-img compare -q -f qed -F raw '%s' '%s'", path, raw) == 0);

    custom_storage();
    test_cleanup();
    return 0;
}
