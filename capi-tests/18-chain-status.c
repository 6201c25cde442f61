/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/* Block status through the backing chain (qed_block_status_ext with QED_BLOCK_STATUS_CHAIN) on
 * top.qed -> mid.qed -> base.raw (sparse, ending in data mid-sector), opened with
 * QED_OPEN_CONFINE_BACKING: every extent's kind, depth and host offset; flags 0 answers as
 * qed_block_status; a caller with the 0.1 struct (no depth and flags) gets its fields and
 * nothing past them; unknown flag bits are refused with -ENOTSUP naming them, the extent left
 * as it was; bad arguments give -EINVAL; a QED_OPEN_NO_BACKING open answers for itself. */
#include "util.h"

#include <stddef.h>

#define KiB 1024ull
#define MiB (1024ull * 1024ull)

/* qed_extent as the 0.1 header declared it, followed by a canary. */
typedef struct {
    uint32_t struct_size;
    uint32_t status;
    uint64_t offset;
    uint64_t length;
    uint64_t host_offset;
    uint64_t canary;
} v01_extent;

#define CANARY 0x5a5a5a5a5a5a5a5aull

typedef struct {
    uint64_t offset, length;
    unsigned status;
    uint32_t depth;
    int valid;          /* QED_EXTENT_OFFSET_VALID expected */
    uint64_t host;      /* expected host offset when valid (data of a QED image: looked up) */
} want;

/* The file offset of guest `off` in the QED image at `path`, asked of that image alone. */
static uint64_t host_of(const char *path, uint64_t off)
{
    qed_image *img;
    CHECK_RET(qed_open_ext(path, OPEN_OPTS(QED_OPEN_NO_BACKING), &img), 0);
    qed_extent e = QED_INIT(qed_extent);
    CHECK_RET(qed_block_status(img, off, 1, &e), 0);
    CHECK(e.status == QED_BLOCK_DATA && e.flags == QED_EXTENT_OFFSET_VALID && e.depth == 0);
    CHECK_RET(qed_close(img), 0);
    return e.host_offset;
}

static void make_chain(void)
{
    const char *base = test_path("base.raw");
    CHECK(test_sh("truncate -s %llu '%s'", (unsigned long long)(MiB + 700), base) == 0);
    uint8_t buf[64 * 1024];
    memset(buf, 0x55, sizeof buf);
    test_pwrite_file(base, buf, sizeof buf, 0);
    test_pwrite_file(base, buf, 700, MiB);

    qed_create_options o = QED_INIT(qed_create_options);
    o.size = 2 * MiB;
    o.cluster_size = 4096;
    o.backing_file = "base.raw";
    o.backing_format = "raw";
    CHECK_RET(qed_create(test_path("mid.qed"), &o), 0);
    qed_image *img;
    CHECK_RET(qed_open_ext(test_path("mid.qed"), OPEN_OPTS(QED_OPEN_RDWR), &img), 0);
    memset(buf, 1, sizeof buf);
    CHECK_RET(qed_write(img, 128 * KiB, buf, sizeof buf), 0);
    CHECK_RET(qed_write_zeroes(img, 192 * KiB, 64 * KiB), 0);
    CHECK_RET(qed_close(img), 0);

    test_create_qed(test_path("top.qed"), 2 * MiB, "mid.qed");
    CHECK_RET(qed_open_ext(test_path("top.qed"), OPEN_OPTS(QED_OPEN_RDWR), &img), 0);
    memset(buf, 2, sizeof buf);
    CHECK_RET(qed_write(img, 0, buf, sizeof buf), 0);
    CHECK_RET(qed_close(img), 0);
}

static void walk_chain(qed_image *img)
{
    want w[] = {
        {0, 64 * KiB, QED_BLOCK_DATA, 0, 1, host_of(test_path("top.qed"), 0)},
        {64 * KiB, 64 * KiB, QED_BLOCK_ZERO, 2, 1, 64 * KiB},       /* a hole of base.raw */
        {128 * KiB, 64 * KiB, QED_BLOCK_DATA, 1, 1, host_of(test_path("mid.qed"), 128 * KiB)},
        {192 * KiB, 64 * KiB, QED_BLOCK_ZERO, 1, 0, 0},             /* a zero cluster */
        {256 * KiB, 768 * KiB, QED_BLOCK_ZERO, 2, 1, 256 * KiB},
        {MiB, 700, QED_BLOCK_DATA, 2, 1, MiB},                      /* data to the raw file's end */
        {MiB + 700, 324, QED_BLOCK_ZERO, 2, 1, MiB + 700},          /* the rest of its sector */
        {MiB + 1024, MiB - 1024, QED_BLOCK_UNALLOCATED, 1, 0, 0},   /* past it: mid decides */
    };
    uint64_t pos = 0;
    for (size_t i = 0; i < sizeof w / sizeof w[0]; i++) {
        qed_extent e = QED_INIT(qed_extent);
        CHECK_RET(qed_block_status_ext(img, pos, 2 * MiB - pos, QED_BLOCK_STATUS_CHAIN, &e), 0);
        if (e.offset != w[i].offset || e.length != w[i].length || e.status != w[i].status ||
            e.depth != w[i].depth || e.flags != (w[i].valid ? QED_EXTENT_OFFSET_VALID : 0u) ||
            e.host_offset != w[i].host) {
            fprintf(stderr,
                    "extent %zu: got offset %llu length %llu status %u depth %u flags %u host %llu\n",
                    i, (unsigned long long)e.offset, (unsigned long long)e.length, e.status,
                    e.depth, e.flags, (unsigned long long)e.host_offset);
            exit(1);
        }
        pos += e.length;
    }
    CHECK(pos == 2 * MiB);
}

int main(void)
{
    make_chain();
    qed_image *img;
    CHECK_RET(qed_open_ext(test_path("top.qed"), OPEN_OPTS(QED_OPEN_CONFINE_BACKING), &img), 0);
    walk_chain(img);

    /* flags 0: this image alone, as qed_block_status (which now also fills depth and flags). */
    qed_extent a = QED_INIT(qed_extent), b = QED_INIT(qed_extent);
    CHECK_RET(qed_block_status_ext(img, 64 * KiB, MiB, 0, &a), 0);
    CHECK_RET(qed_block_status(img, 64 * KiB, MiB, &b), 0);
    CHECK(a.status == QED_BLOCK_UNALLOCATED && a.length == MiB && a.depth == 0 && a.flags == 0);
    CHECK(memcmp(&a, &b, sizeof a) == 0);
    CHECK_RET(qed_block_status(img, 0, MiB, &b), 0);
    CHECK(b.status == QED_BLOCK_DATA && b.flags == QED_EXTENT_OFFSET_VALID && b.depth == 0);

    /* A 0.1 caller: the fields it has, nothing past them. */
    v01_extent old = {offsetof(v01_extent, canary), 99, 0, 0, 0, CANARY};
    CHECK(offsetof(v01_extent, canary) == offsetof(qed_extent, depth));
    CHECK_RET(qed_block_status_ext(img, 300 * KiB, MiB, QED_BLOCK_STATUS_CHAIN,
                                   (qed_extent *)&old), 0);
    CHECK(old.status == QED_BLOCK_ZERO && old.offset == 300 * KiB &&
          old.length == MiB - 300 * KiB && old.host_offset == 300 * KiB);
    CHECK(old.canary == CANARY);
    old = (v01_extent){offsetof(v01_extent, canary), 99, 0, 0, 0, CANARY};
    CHECK_RET(qed_block_status(img, 0, 4096, (qed_extent *)&old), 0);
    CHECK(old.status == QED_BLOCK_DATA && old.length == 4096 && old.canary == CANARY);

    /* Refusals change nothing. */
    qed_extent e, before;
    memset(&e, 0xab, sizeof e);
    e.struct_size = sizeof e;
    before = e;
    CHECK_ERR(qed_block_status_ext(img, 0, 4096, 2, &e), -ENOTSUP, "unknown bits 0x2");
    CHECK_ERR(qed_block_status_ext(img, 0, 4096, QED_BLOCK_STATUS_CHAIN | 0x80000000u, &e),
              -ENOTSUP, "unknown bits 0x80000000");
    CHECK_ERR(qed_block_status_ext(img, 0, 0, QED_BLOCK_STATUS_CHAIN, &e), -EINVAL, "len");
    CHECK_RET(qed_block_status_ext(img, 2 * MiB, 1, QED_BLOCK_STATUS_CHAIN, &e), -EINVAL);
    CHECK(memcmp(&e, &before, sizeof e) == 0);
    CHECK_ERR(qed_block_status_ext(img, 0, 4096, QED_BLOCK_STATUS_CHAIN, NULL), -EINVAL,
              "extent is NULL");
    e.struct_size = 0;
    CHECK_ERR(qed_block_status_ext(img, 0, 4096, QED_BLOCK_STATUS_CHAIN, &e), -EINVAL,
              "struct_size");
    CHECK_ERR(qed_block_status_ext(NULL, 0, 4096, QED_BLOCK_STATUS_CHAIN, &b), -EINVAL,
              "qed_block_status_ext");
    CHECK_RET(qed_close(img), 0);

    /* Without its backing file the image answers for itself. */
    CHECK_RET(qed_open_ext(test_path("top.qed"), OPEN_OPTS(QED_OPEN_NO_BACKING), &img), 0);
    b = QED_INIT(qed_extent);
    CHECK_RET(qed_block_status_ext(img, 64 * KiB, 2 * MiB - 64 * KiB, QED_BLOCK_STATUS_CHAIN, &b),
              0);
    CHECK(b.status == QED_BLOCK_UNALLOCATED && b.depth == 0 && b.length == 2 * MiB - 64 * KiB);
    CHECK_RET(qed_close(img), 0);
    test_cleanup();
    return 0;
}
