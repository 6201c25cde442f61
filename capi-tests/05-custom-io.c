/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/* qed_create_with_io / qed_open_with_io on an in-memory storage written in C (a growable buffer
 * behind a mutex): the release callback runs exactly once per create and per handle; data
 * written through it is a valid image for qemu-img and qemu-io once dumped to a file (and the
 * other way round); callback errors propagate; NULL callbacks are refused. */
#include "util.h"

#include <pthread.h>
#include <unistd.h>

#define MiB (1024ull * 1024ull)

typedef struct {
    pthread_mutex_t mu;
    uint8_t *data;
    size_t len, cap;
    int released;
    /* Fault injection: the errno (negative) or bogus value a callback returns instead of
     * working; 0 works. */
    int fail_pread, fail_pwrite, fail_flush, fail_get_length, fail_set_length;
    unsigned long calls;
} mem;

static void mem_init(mem *m)
{
    memset(m, 0, sizeof *m);
    CHECK(pthread_mutex_init(&m->mu, NULL) == 0);
}

static void mem_free(mem *m)
{
    free(m->data);
    pthread_mutex_destroy(&m->mu);
}

static void grow(mem *m, size_t len)
{
    test_grow(&m->data, &m->len, &m->cap, len);
}

static int m_pread(void *opaque, void *buf, size_t len, uint64_t offset)
{
    mem *m = opaque;
    pthread_mutex_lock(&m->mu);
    m->calls++;
    int r = m->fail_pread;
    if (r == 0) {
        size_t n = offset < m->len ? m->len - (size_t)offset : 0;
        n = n < len ? n : len;
        if (n) {
            memcpy(buf, m->data + offset, n);
        }
        memset((uint8_t *)buf + n, 0, len - n);
    }
    pthread_mutex_unlock(&m->mu);
    return r;
}

static int m_pwrite(void *opaque, const void *buf, size_t len, uint64_t offset)
{
    mem *m = opaque;
    pthread_mutex_lock(&m->mu);
    m->calls++;
    int r = m->fail_pwrite;
    if (r == 0 && len) {
        grow(m, (size_t)offset + len);
        memcpy(m->data + offset, buf, len);
    }
    pthread_mutex_unlock(&m->mu);
    return r;
}

static int m_flush(void *opaque)
{
    mem *m = opaque;
    pthread_mutex_lock(&m->mu);
    m->calls++;
    int r = m->fail_flush;
    pthread_mutex_unlock(&m->mu);
    return r;
}

static int m_get_length(void *opaque, uint64_t *len)
{
    mem *m = opaque;
    pthread_mutex_lock(&m->mu);
    m->calls++;
    int r = m->fail_get_length;
    if (r == 0) {
        *len = m->len;
    }
    pthread_mutex_unlock(&m->mu);
    return r;
}

static int m_set_length(void *opaque, uint64_t len)
{
    mem *m = opaque;
    pthread_mutex_lock(&m->mu);
    m->calls++;
    int r = m->fail_set_length;
    if (r == 0) {
        if (len > m->len) {
            grow(m, (size_t)len);
        } else {
            m->len = (size_t)len;
        }
    }
    pthread_mutex_unlock(&m->mu);
    return r;
}

static void m_release(void *opaque)
{
    mem *m = opaque;
    pthread_mutex_lock(&m->mu);
    m->released++;
    pthread_mutex_unlock(&m->mu);
}

static const qed_io_ops OPS = {sizeof(qed_io_ops), m_pread, m_pwrite, m_flush, m_get_length, m_set_length, m_release};

static void write_pattern(qed_image *img, uint8_t *shadow, uint64_t off, size_t len, uint8_t v)
{
    uint8_t *b = malloc(len);
    CHECK(b != NULL);
    memset(b, v, len);
    CHECK_RET(qed_write(img, off, b, len), 0);
    memcpy(shadow + off, b, len);
    free(b);
}

static void verify(qed_image *img, const uint8_t *shadow, uint64_t off, size_t len)
{
    uint8_t *b = malloc(len);
    CHECK(b != NULL);
    CHECK_RET(qed_read(img, off, b, len), 0);
    long d = test_first_diff(b, shadow + off, len);
    if (d >= 0) {
        fprintf(stderr, "mismatch at %llu\n", (unsigned long long)(off + (uint64_t)d));
        exit(1);
    }
    free(b);
}

int main(void)
{
    const uint64_t size = 8 * MiB;
    uint8_t *shadow = calloc(size, 1);
    CHECK(shadow != NULL);
    mem m;
    mem_init(&m);

    /* Create: release runs once, before qed_create_with_io returns. */
    qed_create_options o = QED_INIT(qed_create_options);
    o.size = size;
    o.cluster_size = 4096;
    o.table_size = 2;
    grow(&m, 20000); /* old content is discarded */
    memset(m.data, 0xcc, m.len);
    CHECK_RET(qed_create_with_io(&OPS, &m, &o), 0);
    CHECK(m.released == 1);
    CHECK(m.len == 3 * 4096);
    CHECK(memcmp(m.data, "QED", 4) == 0);

    /* Open, write, read, check. */
    qed_image *img;
    CHECK_RET(qed_open_with_io(&OPS, &m, OPEN_OPTS(QED_OPEN_RDWR), &img), 0);
    CHECK(m.released == 1);
    qed_info info = QED_INIT(qed_info);
    CHECK_RET(qed_get_info(img, &info), 0);
    CHECK(info.virtual_size == size && info.cluster_size == 4096 && info.table_size == 2);
    CHECK(info.file_size == m.len);
    write_pattern(img, shadow, 0, 5000, 0x11);
    write_pattern(img, shadow, 3 * MiB - 7, 20000, 0x22);
    write_pattern(img, shadow, 4 * MiB - 1, 2, 0x33); /* across an L2 table */
    {
        uint8_t *r = malloc(300000);
        CHECK(r != NULL);
        test_fill(r, 300000, 5);
        CHECK_RET(qed_write(img, 5 * MiB + 123, r, 300000), 0);
        memcpy(shadow + 5 * MiB + 123, r, 300000);
        free(r);
    }
    CHECK_RET(qed_write_zeroes(img, 3 * MiB, 4096), 0); /* over the 0x22 data */
    memset(shadow + 3 * MiB, 0, 4096);
    CHECK_RET(qed_write_zeroes(img, 6 * MiB, 8 * 4096), 0); /* zero clusters */
    CHECK_RET(qed_flush(img), 0);
    verify(img, shadow, 0, size);
    qed_check_result cr = QED_INIT(qed_check_result);
    CHECK_RET(qed_check(img, 0, &cr), 0);
    CHECK(cr.corruptions == 0 && cr.leaks == 0 && cr.check_errors == 0);
    CHECK(cr.image_end_offset == m.len);
    CHECK_RET(qed_close(img), 0);
    CHECK(m.released == 2);

    /* The buffer is an image QEMU reads the same way. */
    const char *file = test_path("dump.qed");
    test_write_file(file, m.data, m.len);
    CHECK(test_sh("qemu-img check -q -f qed '%s'", file) == 0);
    CHECK(test_sh("qemu-io -r -f qed -c 'read -P 0x11 0 5000' -c 'read -P 0x22 %llu 7' "
                  "-c 'read -P 0 %llu 4096' -c 'read -P 0x22 %llu %llu' -c 'read -P 0x33 %llu 2' "
                  "-c 'read -P 0 %llu 32768' '%s' >/dev/null",
                  3 * MiB - 7, 3 * MiB, 3 * MiB + 4096, 20000 - 7 - 4096ull, 4 * MiB - 1, 6 * MiB,
                  file) == 0);
    {
        const char *raw = test_path("dump.raw");
        CHECK(test_sh("qemu-img convert -f qed -O raw '%s' '%s'", file, raw) == 0);
        size_t n;
        uint8_t *conv = test_read_file(raw, &n);
        CHECK(conv != NULL && n == size && memcmp(conv, shadow, size) == 0);
        free(conv);
    }

    /* And the other way round: an image QEMU wrote, loaded into memory. */
    {
        const char *q = test_path("qemu.qed");
        CHECK(test_sh("qemu-img create -q -f qed -o cluster_size=4096 '%s' 4M && "
                      "qemu-io -f qed -c 'write -P 0x5a 1000 10000' '%s' >/dev/null", q, q) == 0);
        size_t n;
        uint8_t *bytes = test_read_file(q, &n);
        CHECK(bytes != NULL);
        mem q_mem;
        mem_init(&q_mem);
        grow(&q_mem, n);
        memcpy(q_mem.data, bytes, n);
        free(bytes);
        qed_image *qi;
        CHECK_RET(qed_open_with_io(&OPS, &q_mem, OPEN_OPTS(0), &qi), 0);
        uint8_t b[12000];
        CHECK_RET(qed_read(qi, 0, b, sizeof b), 0);
        CHECK(test_all(b, 1000, 0) && test_all(b + 1000, 10000, 0x5a) && test_all(b + 11000, 1000, 0));
        CHECK_RET(qed_write(qi, 0, b, 1), -EROFS);
        CHECK_RET(qed_close(qi), 0);
        CHECK(q_mem.released == 1);
        mem_free(&q_mem);
    }

    /* Callback errors propagate. */
    CHECK_RET(qed_open_with_io(&OPS, &m, OPEN_OPTS(QED_OPEN_RDWR), &img), 0);
    {
        uint8_t b[4096];
        memset(b, 0x44, sizeof b);
        m.fail_pread = -EIO;
        CHECK_RET(qed_read(img, 0, b, sizeof b), -EIO); /* allocated: reaches pread */
        m.fail_pread = -ENOSPC;
        CHECK_RET(qed_read(img, 0, b, sizeof b), -ENOSPC);
        m.fail_pread = 0;
        verify(img, shadow, 0, 8192);

        memset(b, 0x44, sizeof b);
        m.fail_pwrite = -EIO;
        CHECK_RET(qed_write(img, 0, b, sizeof b), -EIO);         /* in place */
        CHECK_RET(qed_write(img, 7 * MiB, b, sizeof b), -EIO);   /* allocating */
        struct iovec iov[2] = {{b, 100}, {b, 200}};
        CHECK_RET(qed_writev(img, 100, iov, 2), -EIO);
        CHECK_RET(qed_write_zeroes(img, 0, 512), -EIO);
        m.fail_pwrite = 7; /* neither 0 nor -errno */
        CHECK_ERR(qed_write(img, 0, b, sizeof b), -EIO, "pwrite");
        m.fail_pwrite = 0;
        m.fail_get_length = -EIO;
        CHECK_RET(qed_get_info(img, &info), -EIO); /* file_size comes from get_length */
        m.fail_get_length = 0;

        /* Nothing half-done shows: the failed writes left the guest data as it was. */
        verify(img, shadow, 0, size);
        CHECK_RET(qed_flush(img), 0);
        /* The failed allocation may have left a leaked cluster; repairing reclaims it. */
        CHECK_RET(qed_check(img, QED_FIX_LEAKS | QED_FIX_ERRORS, &cr), 0);
        CHECK(cr.corruptions == 0 && cr.check_errors == 0);
        CHECK_RET(qed_check(img, 0, &cr), 0);
        CHECK(cr.corruptions == 0 && cr.leaks == 0);
        /* Still usable. */
        write_pattern(img, shadow, 7 * MiB, 4096, 0x55);
        verify(img, shadow, 0, size);
        CHECK_RET(qed_flush(img), 0);
        /* A failed flush is fatal for the handle (after a failed fsync a later one proves
         * nothing): every later call says so, close writes nothing and keeps the need-check
         * bit, and the next read-write open repairs. */
        uint8_t z[4096] = {0};
        CHECK_RET(qed_write(img, 6 * MiB, z, sizeof z), 0);
        memset(shadow + 6 * MiB, 0, sizeof z); /* no backing file: survives as written */
        m.fail_flush = -EIO;
        CHECK_RET(qed_flush(img), -EIO);
        m.fail_flush = 0;
        CHECK_ERR(qed_read(img, 0, b, sizeof b), -EIO, "flushing image");
        CHECK_ERR(qed_flush(img), -EIO, "flushing image");
        CHECK_RET(qed_close(img), -EIO);
        CHECK(m.released == 3);
        CHECK_RET(qed_open_with_io(&OPS, &m, OPEN_OPTS(QED_OPEN_RDWR), &img), 0);
        CHECK_RET(qed_check(img, 0, &cr), 0);
        CHECK(cr.corruptions == 0 && cr.leaks == 0);
        verify(img, shadow, 0, size); /* everything flushed before the failure is there */
    }
    CHECK_RET(qed_close(img), 0);
    CHECK(m.released == 4);
    test_write_file(file, m.data, m.len);
    CHECK(test_sh("qemu-img check -q -f qed '%s'", file) == 0);
    CHECK(test_sh("qemu-io -r -f qed -c 'read -P 0x55 %llu 4096' '%s' >/dev/null", 7 * MiB, file) == 0);

    /* A failing open releases the storage once (it fails after the table was checked). */
    m.fail_get_length = -EIO;
    CHECK_RET(qed_open_with_io(&OPS, &m, OPEN_OPTS(QED_OPEN_RDWR), &img), -EIO);
    CHECK(m.released == 5);
    m.fail_get_length = 0;
    m.fail_pread = -EIO;
    CHECK_RET(qed_open_with_io(&OPS, &m, OPEN_OPTS(0), &img), -EIO);
    CHECK(m.released == 6);
    m.fail_pread = 0;
    {
        mem junk;
        mem_init(&junk);
        grow(&junk, 65536);
        memcpy(junk.data, "QCOW", 4);
        CHECK_ERR(qed_open_with_io(&OPS, &junk, OPEN_OPTS(0), &img), -EINVAL, "magic");
        CHECK(junk.released == 1);
        m.fail_set_length = -EIO;
        CHECK_RET(qed_create_with_io(&OPS, &m, &o), -EIO);
        CHECK(m.released == 7);
        m.fail_set_length = 0;
        mem_free(&junk);
    }

    /* A backing file name is stored but cannot be opened on caller storage: the open needs
     * QED_OPEN_NO_BACKING. */
    {
        mem b;
        mem_init(&b);
        qed_create_options bo = o;
        bo.backing_file = "base.raw";
        bo.backing_format = "raw";
        CHECK_RET(qed_create_with_io(&OPS, &b, &bo), 0);
        CHECK(b.released == 1);
        CHECK_RET(qed_open_with_io(&OPS, &b, OPEN_OPTS(0), &img), -EINVAL);
        CHECK(b.released == 2);
        CHECK_RET(qed_open_with_io(&OPS, &b, OPEN_OPTS(QED_OPEN_NO_BACKING), &img), 0);
        char name[32], fmt[8];
        CHECK_RET(qed_get_backing_file(img, name, sizeof name, fmt, sizeof fmt), 8);
        CHECK(strcmp(name, "base.raw") == 0 && strcmp(fmt, "raw") == 0);
        CHECK_RET(qed_close(img), 0);
        CHECK(b.released == 3);
        mem_free(&b);
    }

    /* Required callbacks may not be NULL (release may); the refusal does not release. */
    static const char *names[] = {"pread", "pwrite", "flush", "get_length", "set_length"};
    for (int i = 0; i < 5; i++) {
        qed_io_ops ops = OPS;
        switch (i) {
        case 0: ops.pread = NULL; break;
        case 1: ops.pwrite = NULL; break;
        case 2: ops.flush = NULL; break;
        case 3: ops.get_length = NULL; break;
        case 4: ops.set_length = NULL; break;
        }
        char want[32];
        snprintf(want, sizeof want, "ops->%s", names[i]);
        int before = m.released;
        img = NULL;
        CHECK_ERR(qed_open_with_io(&ops, &m, OPEN_OPTS(0), &img), -EINVAL, want);
        CHECK(img == NULL);
        CHECK_ERR(qed_create_with_io(&ops, &m, &o), -EINVAL, want);
        CHECK(m.released == before);
    }
    {
        qed_io_ops ops = OPS;
        ops.release = NULL;
        int before = m.released;
        CHECK_RET(qed_open_with_io(&ops, &m, OPEN_OPTS(0), &img), 0);
        verify(img, shadow, 0, 65536);
        CHECK_RET(qed_close(img), 0);
        CHECK(m.released == before);
    }

    /* Option errors: release still runs exactly once, whichever option is wrong, so the caller
     * always knows who frees the storage. */
    {
        mem b;
        mem_init(&b);
        qed_create_options bad = o;
        bad.cluster_size = 1000;
        CHECK_ERR(qed_create_with_io(&OPS, &b, &bad), -EINVAL, "cluster_size");
        int after_cluster = b.released;
        bad = o;
        bad.backing_file = "base.img";
        bad.backing_format = "qcow2";
        CHECK_ERR(qed_create_with_io(&OPS, &b, &bad), -ENOTSUP, "qcow2");
        int after_format = b.released - after_cluster;
        if (after_cluster != 1 || after_format != 1) {
            fprintf(stderr, "qed_create_with_io option errors: release called %d time(s) for cluster_size 1000, "
                            "%d time(s) for backing_format \"qcow2\"; the header says once\n",
                    after_cluster, after_format);
            test_failures++;
        }
        CHECK(b.len == 0); /* nothing was written either way */
        mem_free(&b);
    }

    mem_free(&m);
    free(shadow);
    test_cleanup();
    return test_failures != 0;
}
