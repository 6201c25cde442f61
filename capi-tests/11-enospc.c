/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/* A full file system: on a 2 MiB tmpfs mounted for the test (as root; a failed mount fails the
 * test with the reason), a filler file takes space first, then an image is written until a write
 * fails. The failure must be -ENOSPC with a message naming the call, the file, what it was
 * writing and the system's reason; every flush before it must have succeeded. After the filler
 * is deleted, the image must reopen read-write (repair), check clean (0 corruptions, 0 leaks)
 * and hold every write acknowledged before a successful flush (elsewhere the old or the new
 * bytes); QEMU must find it clean. Done with qed_write and with qed_aio_write, for eight filler
 * sizes. The tmpfs is unmounted on every exit path. */
#include "util.h"

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#define KiB 1024ull
#define MiB (1024ull * 1024ull)
#define CS 4096u
#define DISK (16 * MiB)            /* more than the file system holds */
#define WLEN (16 * KiB)            /* each write: four fresh clusters */
#define NW (DISK / WLEN)
#define FLUSH_EVERY 4

static char mnt[512];
static int verbose; /* print the details of the first round only */
static volatile sig_atomic_t mounted;

/* umount2 is a plain system call: safe in a signal handler and at exit. */
static void unmount(void)
{
    if (mounted) {
        umount2(mnt, MNT_DETACH);
        mounted = 0;
    }
}

static void on_signal(int sig)
{
    unmount();
    signal(sig, SIG_DFL);
    raise(sig);
}

typedef struct {
    int ret;       /* 0 acknowledged, <0 failed, 1 not yet completed (aio) */
    int sure;      /* a flush that returned 0 followed its acknowledgement */
} wstate;

/* Write i goes to slot place(i): scattered over the disk, so that L2 tables are created and
 * filled at several places as the space runs out. */
static uint64_t place(uint64_t i)
{
    return i * 37 % NW;
}

/* The content of slot k: guest range [k * WLEN, (k + 1) * WLEN). */
static void content(uint8_t *buf, uint64_t k)
{
    test_fill(buf, WLEN, 0xe05c0000u + (uint32_t)k);
}

/* The flush returned 0: everything acknowledged before it is promised. */
static void promise(wstate *w, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++) {
        if (w[i].ret == 0) {
            w[i].sure = 1;
        }
    }
}

/* Frees the space, reopens, repairs, checks and reads everything back. */
static void verify(const char *path, const wstate *w, uint64_t nw, const char *api)
{
    qed_image *img;
    CHECK_RET(qed_open(path, QED_OPEN_RDWR, &img), 0);
    qed_check_result cr = QED_INIT(qed_check_result);
    CHECK_RET(qed_check(img, QED_FIX_LEAKS | QED_FIX_ERRORS, &cr), 0);
    if (cr.corruptions || cr.leaks || cr.check_errors) {
        fprintf(stderr, "%s: after repair: %llu corruptions, %llu leaks, %llu check errors\n", api,
                (unsigned long long)cr.corruptions, (unsigned long long)cr.leaks,
                (unsigned long long)cr.check_errors);
        exit(1);
    }
    uint8_t *got = malloc(WLEN), *want = malloc(WLEN), *zero = calloc(1, WLEN);
    CHECK(got && want && zero);
    uint64_t sure = 0, kept = 0;
    uint64_t *writer = malloc(NW * sizeof *writer); /* slot -> write index, NW: none */
    CHECK(writer != NULL);
    for (uint64_t k = 0; k < NW; k++) {
        writer[k] = NW;
    }
    for (uint64_t i = 0; i < nw; i++) {
        writer[place(i)] = i;
    }
    for (uint64_t k = 0; k < NW; k++) {
        CHECK_RET(qed_read(img, k * WLEN, got, WLEN), 0);
        content(want, k);
        uint64_t i = writer[k];
        int tried = i < nw;
        int bad = 0;
        for (uint64_t off = 0; off < WLEN; off += 512) {
            int is_new = memcmp(got + off, want + off, 512) == 0;
            int is_old = memcmp(got + off, zero, 512) == 0;
            if (tried && w[i].sure ? !is_new : !(is_old || (tried && is_new))) {
                fprintf(stderr, "%s: write %llu (%s): guest offset %llu holds %s\n", api, (unsigned long long)i,
                        !tried ? "never tried" : w[i].sure ? "acknowledged before a successful flush"
                                                         : w[i].ret == 0 ? "acknowledged, not flushed" : "failed",
                        (unsigned long long)(k * WLEN + off), is_new ? "the new data" : is_old ? "zeros" : "other bytes");
                bad = 1;
                break;
            }
        }
        CHECK(!bad);
        sure += tried && w[i].sure;
        kept += tried && !w[i].sure && memcmp(got, want, WLEN) == 0;
    }
    CHECK_RET(qed_check(img, 0, &cr), 0);
    CHECK(cr.corruptions == 0 && cr.leaks == 0 && cr.check_errors == 0);
    CHECK_RET(qed_close(img), 0);
    CHECK(test_sh("qemu-img check -q -f qed '%s'", path) == 0);
    if (verbose) {
        printf("%s: %llu flushed writes read back, %llu unflushed writes kept; repair left 0 corruptions, 0 leaks\n",
               api, (unsigned long long)sure, (unsigned long long)kept);
    }
    free(writer);
    free(got);
    free(want);
    free(zero);
}

static void make_filler(const char *path, size_t len)
{
    /* Real pages, not a hole: tmpfs charges written data only. */
    uint8_t *b = malloc(len);
    CHECK(b != NULL);
    test_fill(b, len, 1);
    test_write_file(path, b, len);
    free(b);
}

static void make_image(const char *path)
{
    qed_create_options o = QED_INIT(qed_create_options);
    o.size = DISK;
    o.cluster_size = CS;
    o.table_size = 2;
    CHECK_RET(qed_create(path, &o), 0);
}

/* The message must say which call failed, on which file, what it was writing and why. */
static void check_message(const char *msg, const char *fn, const char *path)
{
    if (strstr(msg, fn) == NULL || strstr(msg, path) == NULL || strstr(msg, "writing") == NULL ||
        strstr(msg, "No space left on device") == NULL) {
        fprintf(stderr, "the ENOSPC message does not name %s, the file %s, what was being written and the reason: "
                        "\"%s\"\n", fn, path, msg);
        exit(1);
    }
}

/* The end of a round: close (a clean close also makes the writes durable), free the room,
 * then check the reopened image. */
static void close_free_verify(qed_image *img, const char *path, const char *filler, wstate *w,
                              uint64_t n, const char *api)
{
    int ret = qed_close(img);
    if (verbose) {
        printf("%s: close: %d %s\n", api, ret, ret ? qed_last_error() : "");
    }
    if (ret == 0) {
        promise(w, n);
    }
    CHECK(unlink(filler) == 0);
    verify(path, w, n, api);
    CHECK(unlink(path) == 0);
}

static void sync_api(const char *path, const char *filler, size_t filler_len)
{
    make_filler(filler, filler_len);
    make_image(path);
    qed_image *img;
    CHECK_RET(qed_open(path, QED_OPEN_RDWR, &img), 0);
    wstate *w = calloc(NW, sizeof *w);
    uint8_t *buf = malloc(WLEN);
    CHECK(w && buf);
    uint64_t n = 0;
    int ret = 0;
    char msg[1024] = "";
    while (n < NW) {
        content(buf, place(n));
        ret = qed_write(img, place(n) * WLEN, buf, WLEN);
        w[n++].ret = ret;
        if (ret != 0) {
            snprintf(msg, sizeof msg, "%s", qed_last_error());
            break;
        }
        if (n % FLUSH_EVERY == 0) {
            /* Flushes before the file system is full succeed. */
            CHECK_RET(qed_flush(img), 0);
            promise(w, n);
        }
    }
    if (ret != -ENOSPC) {
        fprintf(stderr, "qed_write: %llu writes of %llu KiB on a 2 MiB file system, the last returned %d (%s)\n",
                (unsigned long long)n, WLEN / KiB, ret, msg);
        exit(1);
    }
    if (verbose) {
        printf("qed_write: write %llu failed with -ENOSPC: %s\n", (unsigned long long)(n - 1), msg);
    }
    check_message(msg, "qed_write", path);
    /* The client goes on: a flush and close may fail too (their errors are noted, not fatal). */
    ret = qed_flush(img);
    if (verbose) {
        printf("qed_write: flush after the failure: %d %s\n", ret, ret ? qed_last_error() : "");
    }
    if (ret == 0) {
        promise(w, n);
    }
    close_free_verify(img, path, filler, w, n, "qed_write");
    free(w);
    free(buf);
}

/* ---- The same with qed_aio_write: one write in flight after another, as the sync loop, so
 * that the failing one is the first to reach the end of the space. */

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int done;
    int ret;
    char msg[1024];
} A = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, ""};

static void aio_done(void *opaque, int ret)
{
    (void)opaque;
    pthread_mutex_lock(&A.mu);
    A.ret = ret;
    A.done = 1;
    pthread_cond_signal(&A.cv);
    pthread_mutex_unlock(&A.mu);
}

static int aio_wait(void)
{
    pthread_mutex_lock(&A.mu);
    while (!A.done) {
        pthread_cond_wait(&A.cv, &A.mu);
    }
    A.done = 0;
    int r = A.ret;
    pthread_mutex_unlock(&A.mu);
    return r;
}

static void async_api(const char *path, const char *filler, size_t filler_len)
{
    make_filler(filler, filler_len);
    make_image(path);
    qed_image *img;
    CHECK_RET(qed_open(path, QED_OPEN_RDWR, &img), 0);
    wstate *w = calloc(NW, sizeof *w);
    uint8_t *buf = malloc(WLEN);
    CHECK(w && buf);
    uint64_t n = 0;
    int ret = 0;
    while (n < NW) {
        content(buf, place(n));
        CHECK_RET(qed_aio_write(img, place(n) * WLEN, buf, WLEN, aio_done, NULL), 0);
        ret = aio_wait();
        w[n++].ret = ret;
        if (ret != 0) {
            break;
        }
        if (n % FLUSH_EVERY == 0) {
            CHECK_RET(qed_aio_flush(img, aio_done, NULL), 0);
            CHECK_RET(aio_wait(), 0);
            promise(w, n);
        }
    }
    if (ret != -ENOSPC) {
        fprintf(stderr, "qed_aio_write: %llu writes on a 2 MiB file system, the last completed with %d\n",
                (unsigned long long)n, ret);
        exit(1);
    }
    if (verbose) {
        printf("qed_aio_write: write %llu completed with -ENOSPC\n", (unsigned long long)(n - 1));
    }
    CHECK_RET(qed_aio_flush(img, aio_done, NULL), 0);
    ret = aio_wait();
    if (verbose) {
        printf("qed_aio_write: flush after the failure: %d\n", ret);
    }
    if (ret == 0) {
        promise(w, n);
    }
    close_free_verify(img, path, filler, w, n, "qed_aio_write");
    free(w);
    free(buf);
}

int main(void)
{
    snprintf(mnt, sizeof mnt, "%s", test_path("fs"));
    CHECK(mkdir(mnt, 0755) == 0);
    if (mount("tmpfs", mnt, "tmpfs", 0, "size=2m") != 0) {
        fprintf(stderr, "11-enospc: cannot mount a 2 MiB tmpfs on %s: %s. This test needs root (CAP_SYS_ADMIN) "
                        "to make a full file system; it does not skip.\n", mnt, strerror(errno));
        test_cleanup();
        return 1;
    }
    mounted = 1;
    atexit(unmount); /* CHECK failures exit(1): the mount goes with them */
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    signal(SIGABRT, on_signal);

    char path[600], filler[600];
    snprintf(path, sizeof path, "%s/full.qed", mnt);
    snprintf(filler, sizeof filler, "%s/filler", mnt);
    /* Fillers of different sizes move the failure between data and table writes. */
    for (int k = 0; k < 8; k++) {
        verbose = k == 0;
        size_t filler_len = 512 * KiB + (size_t)k * 20 * KiB;
        sync_api(path, filler, filler_len);
        async_api(path, filler, filler_len);
    }
    printf("8 fillers x 2 APIs: every write that hit the full file system failed with -ENOSPC; all verified\n");

    unmount();
    CHECK(!mounted);
    test_cleanup();
    return 0;
}
