/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/* Error paths: NULL arguments of every entry point, bad flags and ranges, read-only handles,
 * bad create options, locks, qed_last_error() contents and per-thread scope, and ~20 hostile
 * headers patched into a qemu-img-made image, each refused with the header field named and the
 * file left untouched. Soft checks: every case runs, the exit status counts failures. */
#include "util.h"

#include <limits.h>
#include <pthread.h>
#include <sys/uio.h>
#include <unistd.h>

#define MiB (1024ull * 1024ull)

/* A handle value no call may write: out-parameters are written only on success. */
static char sentinel_obj;
#define SENTINEL ((qed_image *)(void *)&sentinel_obj)

static int last_error_is_empty(void)
{
    return qed_last_error() != NULL && qed_last_error()[0] == 0;
}

/* ---- NULL arguments, (NULL, 0) buffers, flags, ranges ---- */

static int dummy_pread(void *o, void *b, size_t l, uint64_t off)
{
    (void)o, (void)b, (void)l, (void)off;
    return -EIO;
}
static int dummy_pwrite(void *o, const void *b, size_t l, uint64_t off)
{
    (void)o, (void)b, (void)l, (void)off;
    return -EIO;
}
static int dummy_flush(void *o)
{
    (void)o;
    return -EIO;
}
static int dummy_get_length(void *o, uint64_t *l)
{
    (void)o, (void)l;
    return -EIO;
}
static int dummy_set_length(void *o, uint64_t l)
{
    (void)o, (void)l;
    return -EIO;
}
static int released;
static void dummy_release(void *o)
{
    (void)o;
    released++;
}

static void null_arguments(const char *p, qed_image *img)
{
    uint8_t b[512];
    struct iovec iov[3] = {{b, 10}, {NULL, 5}, {b, 1}};
    qed_create_options o = QED_INIT(qed_create_options);
    o.size = MiB;
    qed_info info = QED_INIT(qed_info);
    qed_extent ext = QED_INIT(qed_extent);
    qed_check_result cr = QED_INIT(qed_check_result);
    char name[64], fmt[16];
    qed_image *out = SENTINEL;

    EXPECT_ERR(qed_create(NULL, &o), -EINVAL, "path");
    EXPECT_ERR(qed_create(p, NULL), -EINVAL, "opts");
    EXPECT_ERR(qed_create(NULL, &o), -EINVAL, "qed_create");
    EXPECT_ERR(qed_open(NULL, 0, &out), -EINVAL, "path");
    EXPECT_ERR(qed_open(p, 0, NULL), -EINVAL, "out");
    EXPECT_ERR(qed_open(NULL, 0, &out), -EINVAL, "qed_open");
    EXPECT(out == SENTINEL);

    EXPECT_ERR(qed_read(NULL, 0, b, 1), -EINVAL, "img");
    EXPECT_ERR(qed_read(img, 0, NULL, 1), -EINVAL, "buf");
    EXPECT_ERR(qed_read(img, 0, NULL, 1), -EINVAL, "qed_read");
    EXPECT_ERR(qed_write(NULL, 0, b, 1), -EINVAL, "img");
    EXPECT_ERR(qed_write(img, 0, NULL, 1), -EINVAL, "buf");
    EXPECT_ERR(qed_write(img, 0, NULL, 1), -EINVAL, "qed_write");
    EXPECT_ERR(qed_readv(NULL, 0, iov, 1), -EINVAL, "img");
    EXPECT_ERR(qed_readv(img, 0, NULL, 1), -EINVAL, "iov");
    EXPECT_ERR(qed_readv(img, 0, iov, 3), -EINVAL, "iov[1].iov_base");
    EXPECT_ERR(qed_readv(img, 0, iov, -1), -EINVAL, "iovcnt");
    EXPECT_ERR(qed_readv(img, 0, NULL, -1), -EINVAL, "iovcnt");
    EXPECT_ERR(qed_readv(img, 0, iov, INT_MIN), -EINVAL, "iovcnt");
    EXPECT_ERR(qed_writev(NULL, 0, iov, 1), -EINVAL, "img");
    EXPECT_ERR(qed_writev(img, 0, NULL, 1), -EINVAL, "iov");
    EXPECT_ERR(qed_writev(img, 0, iov, 3), -EINVAL, "iov[1].iov_base");
    EXPECT_ERR(qed_writev(img, 0, iov, -1), -EINVAL, "iovcnt");
    EXPECT_ERR(qed_writev(img, 0, iov, -1), -EINVAL, "qed_writev");
    EXPECT_ERR(qed_flush(NULL), -EINVAL, "img");
    EXPECT_ERR(qed_write_zeroes(NULL, 0, 512), -EINVAL, "img");
    EXPECT_ERR(qed_truncate(NULL, 2 * MiB), -EINVAL, "img");
    EXPECT_ERR(qed_get_info(NULL, &info), -EINVAL, "img");
    EXPECT_ERR(qed_get_info(img, NULL), -EINVAL, "info");
    EXPECT_ERR(qed_get_backing_file(NULL, name, sizeof name, fmt, sizeof fmt), -EINVAL, "img");
    EXPECT_ERR(qed_get_backing_file(img, NULL, 5, fmt, sizeof fmt), -EINVAL, "buf");
    EXPECT_ERR(qed_get_backing_file(img, name, sizeof name, NULL, 5), -EINVAL, "fmt_buf");
    EXPECT_ERR(qed_block_status(NULL, 0, 512, &ext), -EINVAL, "img");
    EXPECT_ERR(qed_block_status(img, 0, 512, NULL), -EINVAL, "extent");
    EXPECT_ERR(qed_change_backing_file(NULL, "x.raw", "raw"), -EINVAL, "img");
    EXPECT_ERR(qed_check(NULL, 0, &cr), -EINVAL, "img");
    EXPECT_ERR(qed_check(img, 0, NULL), -EINVAL, "result");

    qed_io_ops ops = {sizeof(qed_io_ops), dummy_pread, dummy_pwrite, dummy_flush, dummy_get_length, dummy_set_length,
                      dummy_release};
    EXPECT_ERR(qed_open_with_io(NULL, NULL, OPEN_OPTS(0), &out), -EINVAL, "ops");
    EXPECT_ERR(qed_open_with_io(&ops, NULL, OPEN_OPTS(0), NULL), -EINVAL, "out");
    EXPECT_ERR(qed_create_with_io(NULL, NULL, &o), -EINVAL, "ops");
    EXPECT_ERR(qed_create_with_io(&ops, NULL, NULL), -EINVAL, "opts");
    EXPECT_ERR(qed_open_with_io(&ops, NULL, OPEN_OPTS(1u << 20), &out), -EINVAL, "flags");
    EXPECT(out == SENTINEL);
    /* Once ops is accepted, release runs on every failure: NULL opts, unknown flags. */
    EXPECT(released == 2);

    /* qed_close(NULL) is a no-op; the constant strings are never NULL. */
    EXPECT_ERR(qed_close(NULL), 0, NULL);
    EXPECT(last_error_is_empty());
    EXPECT(qed_version() != NULL && qed_version()[0] != 0);
    EXPECT(strcmp(qed_strerror(-EROFS), qed_strerror(EROFS)) == 0);
    EXPECT(strcmp(qed_strerror(-ERANGE), "buffer too small") == 0);
    EXPECT(strcmp(qed_strerror(123456), "unknown error") == 0);
    EXPECT(strcmp(qed_strerror(-123456), "unknown error") == 0);
    EXPECT(strcmp(qed_strerror(INT_MAX), "unknown error") == 0);
    /* INT_MIN has no positive counterpart; it is no errno value, so "unknown error". */
    EXPECT(strcmp(qed_strerror(INT_MIN), "unknown error") == 0);
}

static void empty_buffers(qed_image *img, uint64_t size)
{
    struct iovec iov[3] = {{NULL, 0}, {NULL, 0}, {NULL, 0}};
    char name[4] = "zzz";
    EXPECT_ERR(qed_read(img, 0, NULL, 0), 0, NULL);
    EXPECT(last_error_is_empty());
    EXPECT_ERR(qed_write(img, 0, NULL, 0), 0, NULL);
    EXPECT_ERR(qed_read(img, size, NULL, 0), 0, NULL);
    EXPECT_ERR(qed_write(img, size, NULL, 0), 0, NULL);
    EXPECT_ERR(qed_readv(img, 0, NULL, 0), 0, NULL);
    EXPECT_ERR(qed_writev(img, 0, NULL, 0), 0, NULL);
    EXPECT_ERR(qed_readv(img, 512, iov, 3), 0, NULL);
    EXPECT_ERR(qed_writev(img, 512, iov, 3), 0, NULL);
    EXPECT_ERR(qed_write_zeroes(img, 0, 0), 0, NULL);
    /* No backing file: the name is empty and fits anywhere, even nowhere. */
    EXPECT_ERR(qed_get_backing_file(img, NULL, 0, NULL, 0), 0, NULL);
    EXPECT_ERR(qed_get_backing_file(img, name, sizeof name, NULL, 0), 0, NULL);
    EXPECT(name[0] == 0);
}

static void flags_and_ranges(const char *p, qed_image *img, uint64_t size)
{
    qed_image *out = SENTINEL;
    uint8_t b[1024] = {0};
    struct iovec iov[2] = {{b, 512}, {b + 512, 512}};
    qed_extent ext = QED_INIT(qed_extent);
    qed_check_result cr = QED_INIT(qed_check_result);

    EXPECT_ERR(qed_open(p, 1u << 20, &out), -EINVAL, "flags");
    EXPECT_ERR(qed_open(p, 0x80000000u, &out), -EINVAL, "flags");
    EXPECT_ERR(qed_open(p, QED_OPEN_RDWR | (1u << 20), &out), -EINVAL, "flags");
    EXPECT(out == SENTINEL);
    EXPECT_ERR(qed_check(img, 4, &cr), -EINVAL, "fix");
    EXPECT_ERR(qed_check(img, ~0u, &cr), -EINVAL, "fix");

    EXPECT_ERR(qed_read(img, size - 512, b, 1024), -EINVAL, "out of range");
    EXPECT_ERR(qed_read(img, size, b, 1), -EINVAL, "qed_read");
    EXPECT_ERR(qed_read(img, size + 512, NULL, 0), -EINVAL, NULL);
    EXPECT_ERR(qed_read(img, UINT64_MAX, b, 2), -EINVAL, NULL);
    EXPECT_ERR(qed_write(img, size - 1, b, 2), -EINVAL, "out of range");
    EXPECT_ERR(qed_write(img, UINT64_MAX - 1, b, 4), -EINVAL, NULL);
    EXPECT_ERR(qed_readv(img, size - 1000, iov, 2), -EINVAL, "out of range");
    EXPECT_ERR(qed_writev(img, size - 1000, iov, 2), -EINVAL, "out of range");
    EXPECT_ERR(qed_write_zeroes(img, size - 512, 1024), -EINVAL, "out of range");
    EXPECT_ERR(qed_write_zeroes(img, 512, UINT64_MAX), -EINVAL, NULL);
    EXPECT_ERR(qed_block_status(img, size, 512, &ext), -EINVAL, NULL);
    EXPECT_ERR(qed_block_status(img, 0, size + 1, &ext), -EINVAL, NULL);
    EXPECT_ERR(qed_block_status(img, 0, 0, &ext), -EINVAL, "len");
    /* Nothing was written by the refused writes. */
    uint8_t z[1024];
    memset(z, 0xff, sizeof z);
    EXPECT_ERR(qed_read(img, size - 1024, z, 1024), 0, NULL);
    EXPECT(test_all(z, sizeof z, 0));

    /* Resizing: no shrink, sector multiples only, and the new part reads as zeros. */
    EXPECT_ERR(qed_truncate(img, size - 512), -ENOTSUP, "shrink");
    EXPECT_ERR(qed_truncate(img, size + 100), -EINVAL, "size");
    EXPECT_ERR(qed_truncate(img, UINT64_MAX - 511), -EINVAL, "size");
    EXPECT_ERR(qed_truncate(img, size), 0, NULL);
    EXPECT_ERR(qed_truncate(img, size + MiB), 0, NULL);
    qed_info info = QED_INIT(qed_info);
    EXPECT_ERR(qed_get_info(img, &info), 0, NULL);
    EXPECT(info.virtual_size == size + MiB);
    memset(z, 0xff, sizeof z);
    EXPECT_ERR(qed_read(img, size + MiB - 1024, z, 1024), 0, NULL);
    EXPECT(test_all(z, sizeof z, 0));
    EXPECT_ERR(qed_truncate(img, size), -ENOTSUP, NULL);
}

static void read_only(const char *p)
{
    qed_image *img;
    uint8_t b[512] = {0};
    struct iovec iov = {b, sizeof b};
    qed_check_result cr = QED_INIT(qed_check_result);
    CHECK_RET(qed_open(p, 0, &img), 0);
    EXPECT_ERR(qed_write(img, 0, b, sizeof b), -EROFS, "read-only");
    EXPECT_ERR(qed_writev(img, 0, &iov, 1), -EROFS, "qed_writev");
    EXPECT_ERR(qed_write_zeroes(img, 0, 512), -EROFS, "qed_write_zeroes");
    EXPECT_ERR(qed_truncate(img, 64 * MiB), -EROFS, "qed_truncate");
    EXPECT_ERR(qed_change_backing_file(img, NULL, NULL), -EROFS, "qed_change_backing_file");
    EXPECT_ERR(qed_check(img, QED_FIX_LEAKS, &cr), -EROFS, "qed_check");
    EXPECT_ERR(qed_check(img, QED_FIX_ERRORS, &cr), -EROFS, NULL);
    /* Reads, a plain check, flush and info are fine. */
    EXPECT_ERR(qed_read(img, 0, b, sizeof b), 0, NULL);
    EXPECT_ERR(qed_check(img, 0, &cr), 0, NULL);
    EXPECT_ERR(qed_flush(img), 0, NULL);
    qed_info info = QED_INIT(qed_info);
    EXPECT_ERR(qed_get_info(img, &info), 0, NULL);
    EXPECT(info.writable == 0);
    CHECK_RET(qed_close(img), 0);
}

static void locks(const char *p)
{
    qed_image *rw, *out = SENTINEL, *ro;
    CHECK_RET(qed_open(p, QED_OPEN_RDWR, &rw), 0);
    /* Within one process the conflict is named as such (another process gets -EAGAIN). */
    EXPECT_ERR(qed_open(p, QED_OPEN_RDWR, &out), -EBUSY, "in this process");
    EXPECT_ERR(qed_open(p, 0, &out), -EBUSY, "in this process");
    EXPECT(out == SENTINEL);
    EXPECT_ERR(qed_open(p, QED_OPEN_RDWR | QED_OPEN_FORCE_SHARE, &out), -EINVAL, "force");
    EXPECT_ERR(qed_open(p, QED_OPEN_FORCE_SHARE, &ro), 0, NULL);
    EXPECT_ERR(qed_close(ro), 0, NULL);
    /* QEMU sees our lock too. */
    EXPECT(test_sh("qemu-img info '%s' >/dev/null 2>&1", p) != 0);
    EXPECT(test_sh("qemu-img info -U '%s' >/dev/null 2>&1", p) == 0);
    CHECK_RET(qed_close(rw), 0);
    EXPECT(test_sh("qemu-img info '%s' >/dev/null 2>&1", p) == 0);
    /* Two readers share. */
    CHECK_RET(qed_open(p, 0, &rw), 0);
    EXPECT_ERR(qed_open(p, 0, &ro), 0, NULL);
    EXPECT_ERR(qed_open(p, QED_OPEN_RDWR, &out), -EBUSY, "read-only in this process");
    EXPECT_ERR(qed_close(ro), 0, NULL);
    CHECK_RET(qed_close(rw), 0);
    EXPECT_ERR(qed_open("/nonexistent-dir/x.qed", 0, &out), -ENOENT, "x.qed");
    EXPECT(out == SENTINEL);
}

/* ---- create options ---- */

static void create_options(const char *dir_file)
{
    /* An existing image at the path survives a refused create untouched. */
    size_t n0, n1;
    uint8_t *before = test_read_file(dir_file, &n0);
    CHECK(before != NULL);
    const char *fresh = test_path("never-created.qed");
    struct {
        uint64_t size;
        uint32_t cluster_size, table_size;
        const char *backing_file, *backing_format;
        int want;
        const char *needle;
    } cases[] = {
        {MiB, 1000, 0, NULL, NULL, -EINVAL, "cluster_size"},
        {MiB, 2048, 0, NULL, NULL, -EINVAL, "cluster_size"},
        {MiB, 128u << 20, 0, NULL, NULL, -EINVAL, "cluster_size"},
        {MiB, 0x80000000u, 0, NULL, NULL, -EINVAL, "cluster_size"},
        {MiB, 0, 3, NULL, NULL, -EINVAL, "table_size"},
        {MiB, 0, 32, NULL, NULL, -EINVAL, "table_size"},
        {1000, 0, 0, NULL, NULL, -EINVAL, "size"},
        {MiB + 1, 0, 0, NULL, NULL, -EINVAL, "size"},
        {2048ull << 20, 4096, 1, NULL, NULL, -EINVAL, "size"}, /* max is 1 GiB for 4K/1 */
        {UINT64_MAX - 511, 0, 0, NULL, NULL, -EINVAL, "size"},
        {MiB, 0, 0, "base.img", "qcow2", -ENOTSUP, "qcow2"},
        {MiB, 0, 0, "base.img", "qcow2", -ENOTSUP, "backing_format"},
        {MiB, 0, 0, "base.img", "", -ENOTSUP, "backing_format"},
        {MiB, 0, 0, NULL, "raw", -EINVAL, "backing_format"},
        {MiB, 0, 0, "", "raw", -EINVAL, "backing_file"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        qed_create_options o = QED_INIT(qed_create_options);
        o.size = cases[i].size;
        o.cluster_size = cases[i].cluster_size;
        o.table_size = cases[i].table_size;
        o.backing_file = cases[i].backing_file;
        o.backing_format = cases[i].backing_format;
        EXPECT_ERR(qed_create(dir_file, &o), cases[i].want, cases[i].needle);
        EXPECT_ERR(qed_create(fresh, &o), cases[i].want, "qed_create");
        EXPECT(access(fresh, F_OK) != 0);
    }
    uint8_t *after = test_read_file(dir_file, &n1);
    EXPECT(after != NULL && n1 == n0 && memcmp(before, after, n0) == 0);
    free(before);
    free(after);
    /* The boundaries themselves are fine. */
    qed_create_options o = QED_INIT(qed_create_options);
    o.size = 1ull << 30;
    o.cluster_size = 4096;
    o.table_size = 1;
    EXPECT_ERR(qed_create(fresh, &o), 0, NULL);
    EXPECT(last_error_is_empty());
    o.size = 512;
    o.cluster_size = 64u << 20;
    o.table_size = 16;
    EXPECT_ERR(qed_create(fresh, &o), 0, NULL); /* 64 MiB clusters: header + 16-cluster L1 */
    CHECK(test_sh("rm -f '%s'", fresh) == 0);
}

/* ---- last_error is per thread ---- */

static pthread_barrier_t barrier;
static char *thread_path;

typedef struct {
    int id;
    int ok;
} thread_state;

/* Two threads fail differently at the same time, then one succeeds while the other keeps its
 * message. */
static void *error_thread(void *arg)
{
    thread_state *t = arg;
    int ok = last_error_is_empty(); /* a new thread starts clean */
    char mine[512];
    if (t->id == 0) {
        ok &= qed_flush(NULL) == -EINVAL;
        ok &= strstr(qed_last_error(), "qed_flush") != NULL;
    } else {
        qed_create_options o = QED_INIT(qed_create_options);
        o.size = 1000;
        ok &= qed_create(thread_path, &o) == -EINVAL;
        ok &= strstr(qed_last_error(), "qed_create") != NULL && strstr(qed_last_error(), "size") != NULL;
    }
    snprintf(mine, sizeof mine, "%s", qed_last_error());
    pthread_barrier_wait(&barrier); /* both have failed */
    ok &= strcmp(qed_last_error(), mine) == 0;
    pthread_barrier_wait(&barrier);
    if (t->id == 1) {
        ok &= qed_close(NULL) == 0 && last_error_is_empty();
    }
    pthread_barrier_wait(&barrier); /* thread 1 has succeeded */
    if (t->id == 0) {
        ok &= strcmp(qed_last_error(), mine) == 0;
    }
    t->ok = ok;
    return NULL;
}

static void per_thread(void)
{
    qed_close(NULL);
    EXPECT(last_error_is_empty());
    EXPECT_ERR(qed_get_info(NULL, NULL), -EINVAL, "qed_get_info");
    char mine[512];
    snprintf(mine, sizeof mine, "%s", qed_last_error());
    EXPECT(mine[0] != 0);
    thread_path = strdup(test_path("t.qed"));
    CHECK(thread_path != NULL);
    CHECK(pthread_barrier_init(&barrier, NULL, 2) == 0);
    pthread_t th[2];
    thread_state ts[2] = {{0, 0}, {1, 0}};
    for (int i = 0; i < 2; i++) {
        CHECK(pthread_create(&th[i], NULL, error_thread, &ts[i]) == 0);
    }
    for (int i = 0; i < 2; i++) {
        CHECK(pthread_join(th[i], NULL) == 0);
        EXPECT(ts[i].ok);
    }
    pthread_barrier_destroy(&barrier);
    free(thread_path);
    /* The main thread's message survived both; a success here clears it. */
    EXPECT(strcmp(qed_last_error(), mine) == 0);
    EXPECT_ERR(qed_close(NULL), 0, NULL);
    EXPECT(last_error_is_empty());
}

/* ---- hostile headers ---- */

static void put32(uint8_t *b, size_t at, uint32_t v)
{
    for (int i = 0; i < 4; i++) {
        b[at + (size_t)i] = (uint8_t)(v >> (8 * i));
    }
}
static void put64(uint8_t *b, size_t at, uint64_t v)
{
    for (int i = 0; i < 8; i++) {
        b[at + (size_t)i] = (uint8_t)(v >> (8 * i));
    }
}

enum { F_MAGIC = 0, F_CLUSTER = 4, F_TABLE = 8, F_HEADER = 12, F_FEATURES = 16, F_L1 = 40,
       F_SIZE = 48, F_BOFF = 56, F_BSIZE = 60 };

typedef struct {
    const char *what;
    int want;
    const char *field; /* must appear in qed_last_error() */
} hostile;

/* Applies case i to a copy of the valid image (65536-byte clusters, 4-cluster tables, 320 KiB);
 * returns the case's expectations, or NULL past the last case. */
static const hostile *patch(int i, uint8_t *b, size_t *len)
{
    static const hostile H[] = {
        {"bad magic", -EINVAL, "magic"},
        {"cluster_size 0", -EINVAL, "cluster_size"},
        {"cluster_size 69632", -EINVAL, "cluster_size"},
        {"cluster_size 2^31", -EINVAL, "cluster_size"},
        {"table_size 0", -EINVAL, "table_size"},
        {"table_size 32", -EINVAL, "table_size"},
        {"table_size 3", -EINVAL, "table_size"},
        {"header_size 0", -EINVAL, "header_size"},
        {"header_size 0xffffffff", -EINVAL, "header_size"},
        {"unknown feature bit 40", -ENOTSUP, "features"},
        {"l1_table_offset 0", -EINVAL, "l1_table_offset"},
        {"l1_table_offset unaligned", -EINVAL, "l1_table_offset"},
        {"l1_table_offset past EOF", -EINVAL, "l1_table_offset"},
        {"l1_table_offset near 2^64", -EINVAL, "l1_table_offset"},
        {"image_size not a multiple of 512", -EINVAL, "image_size"},
        {"image_size 2^62", -EINVAL, "image_size"},
        {"backing name outside the header", -EINVAL, "backing_filename_offset"},
        {"backing name size 0xffffffff", -EINVAL, "backing_filename"},
        {"backing name with a NUL byte", -EINVAL, "backing_filename"},
        {"empty backing name", -EINVAL, "backing_filename_size"},
        {"truncated to 40 bytes", -EINVAL, "header"},
        {"empty file", -EINVAL, "header"},
        {"file shorter than its L1 table", -EINVAL, "l1_table_offset"},
    };
    if (i >= (int)(sizeof H / sizeof H[0])) {
        return NULL;
    }
    switch (i) {
    case 0: b[0] = 'X'; break;
    case 1: put32(b, F_CLUSTER, 0); break;
    case 2: put32(b, F_CLUSTER, 69632); break;
    case 3: put32(b, F_CLUSTER, 0x80000000u); break;
    case 4: put32(b, F_TABLE, 0); break;
    case 5: put32(b, F_TABLE, 32); break;
    case 6: put32(b, F_TABLE, 3); break;
    case 7: put32(b, F_HEADER, 0); break;
    case 8: put32(b, F_HEADER, 0xffffffffu); break;
    case 9: put64(b, F_FEATURES, 1ull << 40); break;
    case 10: put64(b, F_L1, 0); break;
    case 11: put64(b, F_L1, 65537); break;
    case 12: put64(b, F_L1, 5 * 65536); break;
    case 13: put64(b, F_L1, 0xffffffffffff0000ull); break;
    case 14: put64(b, F_SIZE, 64 * MiB + 1000); break;
    case 15: put64(b, F_SIZE, 1ull << 62); break;
    case 16:
        put64(b, F_FEATURES, 1);
        put32(b, F_BOFF, 65530);
        put32(b, F_BSIZE, 10);
        break;
    case 17:
        put64(b, F_FEATURES, 1);
        put32(b, F_BOFF, 64);
        put32(b, F_BSIZE, 0xffffffffu);
        break;
    case 18:
        put64(b, F_FEATURES, 1 | 4);
        put32(b, F_BOFF, 64);
        put32(b, F_BSIZE, 8);
        memcpy(b + 64, "ba\0e.raw", 8);
        break;
    case 19:
        put64(b, F_FEATURES, 1);
        put32(b, F_BOFF, 64);
        put32(b, F_BSIZE, 0);
        break;
    case 20: *len = 40; break;
    case 21: *len = 0; break;
    case 22: *len = 65536 + 100000; break;
    }
    return &H[i];
}

static void hostile_headers(void)
{
    const char *good = test_path("good.qed");
    CHECK(test_sh("qemu-img create -q -f qed '%s' 64M", good) == 0);
    size_t glen;
    uint8_t *orig = test_read_file(good, &glen);
    CHECK(orig != NULL && glen == 5 * 65536);
    /* The unpatched image opens, so every refusal below is the patch's doing. */
    qed_image *img;
    CHECK_RET(qed_open(good, QED_OPEN_RDWR, &img), 0);
    CHECK_RET(qed_close(img), 0);

    const char *p = test_path("hostile.qed");
    uint8_t *b = malloc(glen);
    CHECK(b != NULL);
    const hostile *h;
    int count = 0;
    for (int i = 0;; i++) {
        size_t len = glen;
        memcpy(b, orig, glen);
        if ((h = patch(i, b, &len)) == NULL) {
            break;
        }
        test_write_file(p, b, len);
        static const unsigned modes[] = {0, QED_OPEN_RDWR, QED_OPEN_NO_BACKING,
                                         QED_OPEN_RDWR | QED_OPEN_CHECK};
        for (int m = 0; m < 4; m++) {
            qed_image *out = SENTINEL;
            int r = qed_open(p, modes[m], &out);
            if (r != h->want) {
                fprintf(stderr, "hostile header \"%s\", flags %u: qed_open returned %d (%s), expected %d; last error: %s\n",
                        h->what, modes[m], r, qed_strerror(r), h->want, qed_last_error());
                test_failures++;
            } else if (strstr(qed_last_error(), h->field) == NULL) {
                fprintf(stderr, "hostile header \"%s\": last error \"%s\" does not name %s\n",
                        h->what, qed_last_error(), h->field);
                test_failures++;
            }
            if (r == 0) {
                qed_close(out);
            } else {
                EXPECT(out == SENTINEL);
            }
        }
        size_t n;
        uint8_t *after = test_read_file(p, &n);
        if (!after || n != len || (len && memcmp(after, b, len) != 0)) {
            fprintf(stderr, "hostile header \"%s\": the refused open changed the file\n", h->what);
            test_failures++;
        }
        free(after);
        count++;
    }
    CHECK(count >= 20);
    free(b);
    free(orig);
}

int main(void)
{
    char *p = strdup(test_path("err.qed")); /* test_path's buffers rotate */
    CHECK(p != NULL);
    const uint64_t size = 16 * MiB;
    qed_create_options o = QED_INIT(qed_create_options);
    o.size = size;
    CHECK_RET(qed_create(p, &o), 0);
    qed_image *img;
    CHECK_RET(qed_open(p, QED_OPEN_RDWR, &img), 0);

    null_arguments(p, img);
    empty_buffers(img, size);
    flags_and_ranges(p, img, size);
    CHECK_RET(qed_close(img), 0);
    read_only(p);
    locks(p);
    create_options(p);
    per_thread();
    hostile_headers();

    EXPECT(test_sh("qemu-img check -q '%s'", p) == 0);
    free(p);
    test_cleanup();
    if (test_failures) {
        fprintf(stderr, "%d check(s) failed\n", test_failures);
    }
    return test_failures != 0;
}
