/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/* Long operations with a progress callback: qed_check_ext, qed_commit, qed_copy. The callback
 * contract (first report 0, done never decreasing, one total, last report done == total, on the
 * calling thread), a nonzero return stops the operation with -ECANCELED at every report, the
 * images stay valid (qemu-img check) and what the overlay reads is unchanged (qemu-img compare);
 * argument checks (NULL, struct_size, flags). */
#include "util.h"

#include <pthread.h>

#define MiB (1024ull * 1024ull)

typedef struct {
    int calls;
    int stop_at; /* 1-based report that returns nonzero; 0: never */
    uint64_t first_done, last_done, total;
    int bad; /* contract broken */
    pthread_t thread;
} rec;

static int on_progress(void *opaque, uint64_t done, uint64_t total)
{
    rec *r = opaque;
    if (!pthread_equal(r->thread, pthread_self()))
        r->bad = 1;
    if (r->calls == 0) {
        r->first_done = done;
        r->total = total;
    } else if (done < r->last_done || total != r->total) {
        r->bad = 1;
    }
    if (done > total)
        r->bad = 1;
    r->last_done = done;
    r->calls++;
    return r->calls == r->stop_at;
}

static qed_progress progress_of(rec *r, int stop_at)
{
    memset(r, 0, sizeof *r);
    r->stop_at = stop_at;
    r->thread = pthread_self();
    return (qed_progress){.struct_size = sizeof(qed_progress), .progress = on_progress, .opaque = r};
}

/* Checks a complete run's reports. */
static void check_complete(const rec *r)
{
    CHECK(r->bad == 0);
    CHECK(r->calls >= 2);
    CHECK(r->first_done == 0);
    CHECK(r->last_done == r->total);
}

/* base.qed with data; ov.qed over it with data in several runs (over 2 MiB steps). */
static void make_chain(void)
{
    CHECK(test_sh("cd %s && qemu-img create -q -f qed base.qed 16M && "
                  "qemu-io -f qed -c 'write -P 1 0 12M' base.qed >/dev/null && "
                  "qemu-img create -q -f qed -b base.qed -F qed ov.qed 20M && "
                  "qemu-io -f qed -c 'write -P 2 1M 5M' -c 'write -z 8M 1M' "
                  "-c 'write -P 3 18M 1M' ov.qed >/dev/null && "
                  "qemu-img convert -O raw ov.qed view.raw && "
                  "cp base.qed base.orig && cp ov.qed ov.orig",
                  test_tmpdir()) == 0);
}

static void restore_chain(void)
{
    CHECK(test_sh("cd %s && cp base.orig base.qed && cp ov.orig ov.qed", test_tmpdir()) == 0);
}

static void test_check(void)
{
    qed_image *img;
    CHECK_RET(qed_open(test_path("base.qed"), QED_OPEN_RDWR, &img), 0);
    qed_check_result res = {.struct_size = sizeof res};
    rec r;
    qed_progress p = progress_of(&r, 0);
    CHECK_RET(qed_check_ext(img, 0, &res, &p), 0);
    check_complete(&r);
    CHECK(r.total == res.total_clusters);
    CHECK(res.corruptions == 0 && res.leaks == 0);
    int calls = r.calls;
    for (int stop = 1; stop <= calls; stop++) {
        qed_check_result res2 = {.struct_size = sizeof res2, .total_clusters = 12345};
        p = progress_of(&r, stop);
        CHECK_RET(qed_check_ext(img, 0, &res2, &p), -ECANCELED);
        CHECK(r.calls == stop && r.bad == 0);
        CHECK(res2.total_clusters == 12345); /* not written */
        /* A repair stopped anywhere: the handle stays usable. */
        p = progress_of(&r, stop);
        int rc = qed_check_ext(img, QED_FIX_LEAKS | QED_FIX_ERRORS, &res2, &p);
        CHECK(rc == -ECANCELED);
        uint8_t b[512];
        CHECK_RET(qed_read(img, 0, b, sizeof b), 0);
        CHECK(b[0] == 1 && b[511] == 1);
    }
    /* NULL progress: no reports. A progress with no callback: the same. */
    CHECK_RET(qed_check_ext(img, 0, &res, NULL), 0);
    qed_progress none = {.struct_size = sizeof none};
    CHECK_RET(qed_check_ext(img, 0, &res, &none), 0);
    /* struct_size 0 is refused before anything runs. */
    qed_progress zero = {0};
    CHECK_ERR(qed_check_ext(img, 0, &res, &zero), -EINVAL, "qed_progress");
    CHECK_RET(qed_close(img), 0);
    CHECK(test_sh("qemu-img check -q %s", test_path("base.qed")) == 0);
}

static void test_commit(void)
{
    qed_image *ov;
    /* With its backing file open, the overlay holds it read-only: -EBUSY. */
    CHECK_RET(qed_open(test_path("ov.qed"), 0, &ov), 0);
    CHECK_ERR(qed_commit(ov, 0, NULL), -EBUSY, "no_backing");
    CHECK_RET(qed_close(ov), 0);

    CHECK_RET(qed_open(test_path("ov.qed"), QED_OPEN_NO_BACKING, &ov), 0);
    CHECK_ERR(qed_commit(ov, QED_OPEN_RDWR, NULL), -ENOTSUP, "0x1");
    CHECK_RET(qed_commit(NULL, 0, NULL), -EINVAL);
    rec r;
    qed_progress p = progress_of(&r, 0);
    CHECK_RET(qed_commit(ov, 0, &p), 0);
    check_complete(&r);
    CHECK(r.total == 7 * MiB); /* 5 MiB + 1 MiB of zeros + 1 MiB */
    CHECK_RET(qed_close(ov), 0);
    CHECK(test_sh("cd %s && qemu-img check -q base.qed && qemu-img compare -q view.raw base.qed",
                  test_tmpdir()) == 0);
    int calls = r.calls;
    for (int stop = 1; stop <= calls; stop++) {
        restore_chain();
        CHECK_RET(qed_open(test_path("ov.qed"), QED_OPEN_NO_BACKING | QED_OPEN_RDWR, &ov), 0);
        p = progress_of(&r, stop);
        CHECK_RET(qed_commit(ov, 0, &p), -ECANCELED);
        CHECK(r.calls == stop && r.bad == 0);
        CHECK_RET(qed_close(ov), 0);
        CHECK(test_sh("cd %s && qemu-img check -q base.qed && qemu-img check -q ov.qed && "
                      "qemu-img compare -q view.raw ov.qed",
                      test_tmpdir()) == 0);
    }
}

static void test_copy(void)
{
    restore_chain();
    qed_image *src, *dst;
    CHECK_RET(qed_open(test_path("ov.qed"), 0, &src), 0);
    qed_create_options co = {.struct_size = sizeof co, .size = 20 * MiB};
    CHECK_RET(qed_create(test_path("copy.qed"), &co), 0);
    CHECK_RET(qed_open(test_path("copy.qed"), QED_OPEN_RDWR, &dst), 0);
    CHECK_ERR(qed_copy(src, src, NULL), -EINVAL, "same image");
    CHECK_RET(qed_copy(src, NULL, NULL), -EINVAL);
    rec r;
    qed_progress p = progress_of(&r, 0);
    CHECK_RET(qed_copy(src, dst, &p), 0);
    check_complete(&r);
    CHECK(r.total == 20 * MiB);
    CHECK_RET(qed_close(dst), 0);
    /* The same file qemu-img convert makes. */
    CHECK(test_sh("cd %s && qemu-img check -q copy.qed && qemu-img compare -q ov.qed copy.qed && "
                  "qemu-img convert -O qed ov.qed theirs.qed && cmp -s theirs.qed copy.qed",
                  test_tmpdir()) == 0);
    int calls = r.calls;
    for (int stop = 1; stop <= calls; stop += 2) {
        CHECK_RET(qed_create(test_path("c.qed"), &co), 0);
        CHECK_RET(qed_open(test_path("c.qed"), QED_OPEN_RDWR, &dst), 0);
        p = progress_of(&r, stop);
        CHECK_RET(qed_copy(src, dst, &p), -ECANCELED);
        CHECK(r.calls == stop && r.bad == 0);
        CHECK_RET(qed_close(dst), 0);
        CHECK(test_sh("qemu-img check -q %s", test_path("c.qed")) == 0);
    }
    /* A read-only target. */
    CHECK_RET(qed_open(test_path("copy.qed"), 0, &dst), 0);
    CHECK_RET(qed_copy(src, dst, NULL), -EROFS);
    CHECK_RET(qed_close(dst), 0);
    CHECK_RET(qed_close(src), 0);
}

int main(void)
{
    make_chain();
    test_check();
    test_commit();
    test_copy();
    test_cleanup();
    return 0;
}
