/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/* The size-prefix rule ("Structs that grow" in qed.h), from both sides: a program built against
 * an older header (smaller structs, declared here as prefixes of today's) keeps working, and a
 * program built against a newer header (today's structs plus fields) works while it leaves the
 * new fields zero and gets -ENOTSUP when it sets one. Then qed_open_ext's options. */
#include "util.h"

#include <stddef.h>

/* "Release 0.0" layouts: prefixes of today's structs, as an older header declared them. */
typedef struct {
    uint32_t struct_size;
    uint32_t cluster_size;
    uint64_t size;
} old_create_options;
typedef struct {
    uint32_t struct_size;
    uint32_t flags;
} old_open_options;
typedef struct {
    uint32_t struct_size;
    uint32_t cluster_size;
    uint64_t virtual_size;
    uint32_t table_size;
    uint32_t header_size;
    uint64_t canary; /* where the old program's memory goes on: must stay untouched */
} old_info;
typedef struct {
    uint32_t struct_size;
    uint32_t status;
    uint64_t offset;
    uint64_t length;
    uint64_t canary;
} old_extent;
typedef struct {
    uint32_t struct_size;
    uint32_t pad;
    uint64_t corruptions;
    uint64_t leaks;
    uint64_t canary;
} old_check_result;

/* "Release 9.9" layouts: today's structs plus fields this library does not know. */
typedef struct {
    qed_open_options today;
    uint64_t future_field;
} new_open_options;
typedef struct {
    qed_info today;
    uint64_t future_field;
} new_info;
typedef struct {
    qed_create_options today;
    uint32_t future_field;
    uint32_t future_pad;
} new_create_options;

#define CANARY 0x5a5a5a5a5a5a5a5aull

static unsigned approved[8];
static unsigned approve_calls;
static int approve_ret;
static char last_path[4096];

static int approve(void *opaque, const char *path, const char *name, unsigned depth)
{
    CHECK(opaque == (void *)&approved);
    CHECK(path[0] == '/');
    CHECK(strlen(name) > 0);
    if (approve_calls < 8) {
        approved[approve_calls] = depth;
    }
    approve_calls++;
    snprintf(last_path, sizeof last_path, "%s", path);
    return approve_ret;
}

static void older_header(void)
{
    const char *p = test_path("old.qed");
    old_create_options co = {sizeof co, 4096, 1 << 24};
    CHECK_RET(qed_create(p, (const qed_create_options *)&co), 0);

    old_open_options oo = {sizeof oo, QED_OPEN_RDWR};
    qed_image *img = NULL;
    CHECK_RET(qed_open_ext(p, (const qed_open_options *)&oo, &img), 0);

    old_info info;
    memset(&info, 0, sizeof info);
    info.struct_size = offsetof(old_info, canary);
    info.canary = CANARY;
    CHECK_RET(qed_get_info(img, (qed_info *)&info), 0);
    CHECK(info.struct_size == offsetof(old_info, canary));
    CHECK(info.cluster_size == 4096);
    CHECK(info.virtual_size == 1 << 24);
    CHECK(info.table_size == 4); /* the default, since the old layout had no table_size */
    CHECK(info.header_size == 1);
    CHECK(info.canary == CANARY);

    char buf[4096];
    memset(buf, 0xc3, sizeof buf);
    CHECK_RET(qed_write(img, 8192, buf, sizeof buf), 0);
    old_extent e = {offsetof(old_extent, canary), 77, 0, 0, CANARY};
    CHECK_RET(qed_block_status(img, 8192, 4096, (qed_extent *)&e), 0);
    CHECK(e.status == QED_BLOCK_DATA && e.offset == 8192 && e.length == 4096);
    CHECK(e.canary == CANARY);

    old_check_result cr = {offsetof(old_check_result, canary), 0, 99, 99, CANARY};
    CHECK_RET(qed_check(img, 0, (qed_check_result *)&cr), 0);
    CHECK(cr.corruptions == 0 && cr.leaks == 0 && cr.canary == CANARY);
    CHECK_RET(qed_close(img), 0);
    CHECK(test_sh("qemu-img check -q %s", p) == 0);
}

static void newer_header(void)
{
    const char *p = test_path("new.qed");
    new_create_options co;
    memset(&co, 0, sizeof co);
    co.today.struct_size = sizeof co;
    co.today.size = 1 << 20;
    CHECK_RET(qed_create(p, (const qed_create_options *)&co), 0);
    co.future_field = 1;
    CHECK_ERR(qed_create(test_path("never.qed"), (const qed_create_options *)&co), -ENOTSUP,
              "newer libqed");
    CHECK(test_sh("test -e %s", test_path("never.qed")) != 0);

    new_open_options oo;
    memset(&oo, 0, sizeof oo);
    oo.today.struct_size = sizeof oo;
    oo.today.flags = QED_OPEN_RDWR;
    oo.future_field = 3;
    qed_image *img = NULL;
    CHECK_ERR(qed_open_ext(p, (const qed_open_options *)&oo, &img), -ENOTSUP, "qed_open_options");
    CHECK(img == NULL);
    oo.future_field = 0;
    CHECK_RET(qed_open_ext(p, (const qed_open_options *)&oo, &img), 0);

    new_info info;
    memset(&info, 0, sizeof info);
    info.today.struct_size = sizeof info;
    info.future_field = CANARY;
    CHECK_RET(qed_get_info(img, (qed_info *)&info), 0);
    CHECK(info.today.struct_size == sizeof info);
    CHECK(info.today.virtual_size == 1 << 20 && info.today.writable == 1);
    CHECK(info.future_field == CANARY);

    /* Sizes no release ever had. */
    qed_info bad = QED_INIT(qed_info);
    const uint32_t sizes[] = {0, 4, 10, 4100, 0xffffffffu};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        bad.struct_size = sizes[i];
        bad.virtual_size = 42;
        CHECK_ERR(qed_get_info(img, &bad), -EINVAL, "struct_size");
        CHECK(bad.virtual_size == 42);
    }
    qed_aio_options ao = {0};
    CHECK_ERR(qed_aio_setup(img, &ao), -EINVAL, "sizeof(struct qed_aio_options)");
    CHECK_RET(qed_close(img), 0);
}

static void open_options(void)
{
    /* base.qed <- mid.qed <- top.qed, with distinct data in each. */
    const char *base = test_path("base.qed");
    char mid[4096], top[4096];
    snprintf(mid, sizeof mid, "%s", test_path("mid.qed"));
    snprintf(top, sizeof top, "%s", test_path("top.qed"));
    test_create_qed(base, 1 << 20, NULL);
    test_create_qed(mid, 1 << 20, "base.qed");
    test_create_qed(top, 1 << 20, "mid.qed");
    qed_image *img = NULL;
    char buf[512];
    memset(buf, 0xb1, sizeof buf);
    CHECK_RET(qed_open(base, QED_OPEN_RDWR, &img), 0);
    CHECK_RET(qed_write(img, 0, buf, sizeof buf), 0);
    CHECK_RET(qed_close(img), 0);

    /* NULL options: the defaults, read-only. */
    CHECK_RET(qed_open_ext(top, NULL, &img), 0);
    CHECK_RET(qed_write(img, 0, buf, sizeof buf), -EROFS);
    CHECK_RET(qed_close(img), 0);

    /* The approver sees each backing file with its depth; refusing fails the open. */
    qed_open_options o = QED_INIT(qed_open_options);
    o.backing_approve = approve;
    o.backing_approve_opaque = &approved;
    approve_ret = 0;
    CHECK_RET(qed_open_ext(top, &o, &img), 0);
    CHECK(approve_calls == 2 && approved[0] == 1 && approved[1] == 2);
    CHECK(strstr(last_path, "/base.qed") != NULL);
    char r[512];
    CHECK_RET(qed_read(img, 0, r, sizeof r), 0);
    CHECK(memcmp(r, buf, sizeof r) == 0);
    CHECK_RET(qed_close(img), 0);

    approve_calls = 0;
    approve_ret = -EPERM;
    o.flags = QED_OPEN_RDWR;
    CHECK_ERR(qed_open_ext(top, &o, &img), -EACCES, "mid.qed");
    CHECK(approve_calls == 1);
    CHECK(strstr(qed_last_error(), "backing_approve") != NULL);
    o.backing_approve = NULL;

    /* The depth limit. */
    o.max_backing_depth = 1;
    CHECK_ERR(qed_open_ext(top, &o, &img), -ENOTSUP, "deeper than 1");
    o.max_backing_depth = 2;
    CHECK_RET(qed_open_ext(top, &o, &img), 0);
    CHECK_RET(qed_close(img), 0);
    o.max_backing_depth = 0;

    /* A small L2 cache still reads and writes everything. */
    o.l2_cache_size = 4096;
    o.writeback_delay_ms = QED_WRITEBACK_AT_FLUSH;
    CHECK_RET(qed_open_ext(top, &o, &img), 0);
    for (uint64_t off = 0; off < (1 << 20); off += 65536) {
        memset(buf, (int)(off >> 16), sizeof buf);
        CHECK_RET(qed_write(img, off + 512, buf, sizeof buf), 0);
    }
    for (uint64_t off = 0; off < (1 << 20); off += 65536) {
        memset(buf, (int)(off >> 16), sizeof buf);
        CHECK_RET(qed_read(img, off + 512, r, sizeof r), 0);
        CHECK(memcmp(r, buf, sizeof r) == 0);
    }
    CHECK_RET(qed_close(img), 0);
    CHECK(test_sh("qemu-img check -q %s", top) == 0);

    /* The asynchronous queue, set up at open: event-loop mode has a descriptor. */
    qed_aio_options ao = QED_INIT(qed_aio_options);
    ao.flags = QED_AIO_EVENT_LOOP;
    o.l2_cache_size = 0;
    o.aio = &ao;
    CHECK_RET(qed_open_ext(top, &o, &img), 0);
    CHECK(qed_aio_get_fd(img) >= 0);
    CHECK_RET(qed_close(img), 0);
    ao.flags = 1u << 30;
    CHECK_ERR(qed_open_ext(top, &o, &img), -EINVAL, "aio flags");
    ao.struct_size = 2;
    CHECK_ERR(qed_open_ext(top, &o, &img), -EINVAL, "opts->aio->struct_size");

    /* Unknown flag bits are refused, as by qed_open. */
    qed_open_options f = QED_INIT(qed_open_options);
    f.flags = 1u << 25;
    CHECK_ERR(qed_open_ext(top, &f, &img), -EINVAL, "flags");
    CHECK_ERR(qed_open_ext(top, &f, NULL), -EINVAL, "out");
}

int main(void)
{
    older_header();
    newer_header();
    open_options();
    test_cleanup();
    return 0;
}
