/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/* Eight threads share one qed_image: each writes its own region (whose ends share clusters with
 * its neighbours', so allocations race) in shuffled pieces with qed_write, qed_writev and
 * qed_write_zeroes, all write self-describing sectors into one shared region, and all read a
 * pre-written region and their own, with block status, info and flush calls mixed in. Then the
 * content is checked through the library, with qed_check, qemu-img check and qemu-img compare. */
#include "util.h"

#include <pthread.h>
#include <sys/uio.h>
#include <unistd.h>

#define KiB 1024ull
#define MiB (1024ull * 1024ull)
#define NTHREADS 8
#define SIZE (12 * MiB)
#define REGION MiB
#define REGION0 1000ull              /* regions start mid-cluster */
#define SHARED (9 * MiB)             /* overlapping writes: [9 MiB, 11 MiB) */
#define SHARED_LEN (2 * MiB)
#define STATIC (11 * MiB)            /* written before the threads start: [11 MiB, 12 MiB) */
#define STATIC_LEN MiB
#define SECTOR 512u
#define MAGIC 0x54444551u            /* "QEDT" */

static qed_image *img;
static uint8_t *static_want; /* the static region's content, set before the threads start */

static uint32_t rnd(uint32_t *s)
{
    uint32_t x = *s;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return *s = x;
}

/* A shared-region sector: header (magic, thread, sequence, its own guest offset) then a fill
 * derived from the header, so any sector can be checked on its own. */
static void make_sector(uint8_t *s, uint32_t tid, uint32_t seq, uint64_t off)
{
    uint32_t h[5] = {MAGIC, tid, seq, (uint32_t)off, (uint32_t)(off >> 32)};
    memcpy(s, h, sizeof h);
    test_fill(s + sizeof h, SECTOR - sizeof h, tid * 1000003u + seq * 7919u + (uint32_t)(off / SECTOR));
}

/* Empty string if the sector is all zeros or a whole sector made for `off`. */
static const char *bad_sector(const uint8_t *s, uint64_t off)
{
    if (test_all(s, SECTOR, 0)) {
        return "";
    }
    uint32_t h[5];
    memcpy(h, s, sizeof h);
    if (h[0] != MAGIC) {
        return "bad magic";
    }
    if (h[3] != (uint32_t)off || h[4] != (uint32_t)(off >> 32)) {
        return "sector landed at the wrong offset";
    }
    uint8_t want[SECTOR];
    make_sector(want, h[1], h[2], off);
    return memcmp(want, s, SECTOR) == 0 ? "" : "torn sector";
}

static void check_static(uint64_t off, size_t len, uint8_t *buf)
{
    CHECK_RET(qed_read(img, off, buf, len), 0);
    long d = test_first_diff(buf, static_want + (off - STATIC), len);
    if (d >= 0) {
        fprintf(stderr, "static region changed at %llu\n", (unsigned long long)(off + (uint64_t)d));
        exit(1);
    }
}

typedef struct {
    uint32_t tid;
    uint64_t base;
    uint8_t *shadow; /* this thread's region */
} worker;

static void own_verify(worker *w, uint64_t off, size_t len, uint8_t *buf)
{
    CHECK_RET(qed_read(img, off, buf, len), 0);
    long d = test_first_diff(buf, w->shadow + (off - w->base), len);
    if (d >= 0) {
        fprintf(stderr, "thread %u: own region differs at %llu\n", w->tid,
                (unsigned long long)(off + (uint64_t)d));
        exit(1);
    }
}

static void *run(void *arg)
{
    worker *w = arg;
    uint32_t s = 0x9e3779b9u * (w->tid + 1);
    uint8_t *buf = malloc(64 * KiB), *rbuf = malloc(64 * KiB);
    CHECK(buf && rbuf);

    /* Cut the region into pieces of 1 B .. 20 KiB and visit them in a shuffled order. */
    enum { MAXP = 4096 };
    uint64_t *starts = malloc(MAXP * sizeof *starts);
    uint32_t *lens = malloc(MAXP * sizeof *lens), *order = malloc(MAXP * sizeof *order);
    CHECK(starts && lens && order);
    int np = 0;
    for (uint64_t pos = 0; pos < REGION; np++) {
        CHECK(np < MAXP);
        uint32_t l = 1 + rnd(&s) % (20 * 1024);
        if (rnd(&s) % 4 == 0) {
            l = 1 + rnd(&s) % 700;
        }
        if (pos + l > REGION) {
            l = (uint32_t)(REGION - pos);
        }
        starts[np] = w->base + pos;
        lens[np] = l;
        order[np] = (uint32_t)np;
        pos += l;
    }
    for (int i = np - 1; i > 0; i--) {
        uint32_t j = rnd(&s) % (uint32_t)(i + 1), t = order[i];
        order[i] = order[j];
        order[j] = t;
    }

    uint32_t seq = 0;
    for (int k = 0; k < np; k++) {
        uint64_t off = starts[order[k]];
        uint32_t len = lens[order[k]];
        uint8_t *sh = w->shadow + (off - w->base);
        uint32_t what = rnd(&s) % 8;
        if (what == 0) {
            CHECK_RET(qed_write_zeroes(img, off, len), 0);
            memset(sh, 0, len);
        } else if (what <= 2) {
            test_fill(buf, len, rnd(&s));
            uint32_t a = len / 3, b = len / 2;
            struct iovec iov[4] = {{buf, a}, {NULL, 0}, {buf + a, b - a}, {buf + b, len - b}};
            CHECK_RET(qed_writev(img, off, iov, 4), 0);
            memcpy(sh, buf, len);
        } else {
            test_fill(buf, len, rnd(&s));
            CHECK_RET(qed_write(img, off, buf, len), 0);
            memcpy(sh, buf, len);
        }
        own_verify(w, off, len, rbuf);

        /* A write of whole sectors into the shared region, or zeroes there. */
        uint32_t nsec = 1 + rnd(&s) % 24;
        uint64_t so = SHARED + (uint64_t)(rnd(&s) % (SHARED_LEN / SECTOR - nsec)) * SECTOR;
        if (rnd(&s) % 10 == 0) {
            CHECK_RET(qed_write_zeroes(img, so, (uint64_t)nsec * SECTOR), 0);
        } else {
            for (uint32_t i = 0; i < nsec; i++) {
                make_sector(buf + i * SECTOR, w->tid, seq, so + i * SECTOR);
            }
            seq++;
            CHECK_RET(qed_write(img, so, buf, (size_t)nsec * SECTOR), 0);
        }

        /* Reads of data nobody changes, and of our own region. */
        uint32_t rl = 1 + rnd(&s) % (32 * 1024);
        check_static(STATIC + rnd(&s) % (STATIC_LEN - rl), rl, rbuf);
        uint32_t ol = 1 + rnd(&s) % (32 * 1024);
        own_verify(w, w->base + rnd(&s) % (REGION - ol), ol, rbuf);

        if (k % 16 == 0) {
            qed_extent e = QED_INIT(qed_extent);
            uint64_t bl = 1 + rnd(&s) % MiB, bo = rnd(&s) % (SIZE - bl);
            CHECK_RET(qed_block_status(img, bo, bl, &e), 0);
            CHECK(e.offset == bo && e.length > 0 && e.length <= bl);
            qed_info info = QED_INIT(qed_info);
            CHECK_RET(qed_get_info(img, &info), 0);
            CHECK(info.virtual_size == SIZE && info.writable == 1);
        }
        if (k % 64 == 0) {
            CHECK_RET(qed_flush(img), 0);
        }
    }
    for (uint64_t off = 0; off < REGION; off += 64 * KiB) {
        own_verify(w, w->base + off, 64 * KiB, rbuf);
    }
    free(starts);
    free(lens);
    free(order);
    free(buf);
    free(rbuf);
    return NULL;
}

/* Everything the threads left: own regions as their shadows, the shared region whole sectors,
 * the static region untouched, the rest zeros. */
static void verify_final(worker *ws, uint8_t *all)
{
    CHECK_RET(qed_read(img, 0, all, SIZE), 0);
    CHECK(test_all(all, REGION0, 0));
    for (int t = 0; t < NTHREADS; t++) {
        long d = test_first_diff(all + ws[t].base, ws[t].shadow, REGION);
        if (d >= 0) {
            fprintf(stderr, "region of thread %d differs at %llu\n", t,
                    (unsigned long long)(ws[t].base + (uint64_t)d));
            exit(1);
        }
    }
    uint64_t end = REGION0 + NTHREADS * REGION;
    CHECK(test_all(all + end, SHARED - end, 0));
    int written = 0;
    for (uint64_t off = SHARED; off < SHARED + SHARED_LEN; off += SECTOR) {
        const char *why = bad_sector(all + off, off);
        if (why[0]) {
            fprintf(stderr, "shared sector at %llu: %s\n", (unsigned long long)off, why);
            exit(1);
        }
        written += !test_all(all + off, SECTOR, 0);
    }
    CHECK(written > 100);
    CHECK(memcmp(all + STATIC, static_want, STATIC_LEN) == 0);
}

int main(void)
{
    char *p = strdup(test_path("threads.qed"));
    CHECK(p != NULL);
    qed_create_options o = QED_INIT(qed_create_options);
    o.size = SIZE;
    o.cluster_size = 4096;
    o.table_size = 2; /* an L2 table maps 4 MiB: the regions span three tables */
    CHECK_RET(qed_create(p, &o), 0);
    CHECK_RET(qed_open(p, QED_OPEN_RDWR, &img), 0);

    static_want = malloc(STATIC_LEN);
    CHECK(static_want != NULL);
    test_fill(static_want, STATIC_LEN, 4242);
    CHECK_RET(qed_write(img, STATIC, static_want, STATIC_LEN), 0);

    worker ws[NTHREADS];
    pthread_t th[NTHREADS];
    for (int t = 0; t < NTHREADS; t++) {
        ws[t].tid = (uint32_t)t;
        ws[t].base = REGION0 + (uint64_t)t * REGION;
        ws[t].shadow = calloc(REGION, 1);
        CHECK(ws[t].shadow != NULL);
    }
    for (int t = 0; t < NTHREADS; t++) {
        CHECK(pthread_create(&th[t], NULL, run, &ws[t]) == 0);
    }
    for (int t = 0; t < NTHREADS; t++) {
        CHECK(pthread_join(th[t], NULL) == 0);
    }

    uint8_t *all = malloc(SIZE), *again = malloc(SIZE);
    CHECK(all && again);
    verify_final(ws, all);
    qed_check_result cr = QED_INIT(qed_check_result);
    CHECK_RET(qed_check(img, 0, &cr), 0);
    if (cr.corruptions || cr.leaks || cr.check_errors) {
        fprintf(stderr, "06-threads: check: %llu corruptions, %llu leaks, %llu check errors, image end %llu\n",
                (unsigned long long)cr.corruptions, (unsigned long long)cr.leaks,
                (unsigned long long)cr.check_errors, (unsigned long long)cr.image_end_offset);
    }
    CHECK(cr.corruptions == 0 && cr.leaks == 0 && cr.check_errors == 0);
    CHECK_RET(qed_close(img), 0);

    /* Reopened, the same bytes; QEMU finds the image consistent and reads the same bytes. */
    CHECK_RET(qed_open(p, 0, &img), 0);
    CHECK_RET(qed_read(img, 0, again, SIZE), 0);
    CHECK(memcmp(all, again, SIZE) == 0);
    CHECK_RET(qed_close(img), 0);
    CHECK(test_sh("qemu-img check -q -f qed '%s'", p) == 0);
    const char *raw = test_path("threads.raw");
    test_write_file(raw, all, SIZE);
    CHECK(test_sh("qemu-img compare -q -f raw -F qed '%s' '%s'", raw, p) == 0);

    for (int t = 0; t < NTHREADS; t++) {
        free(ws[t].shadow);
    }
    free(all);
    free(again);
    free(static_want);
    free(p);
    test_cleanup();
    return 0;
}
