/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/* The I/O engine: many images share a bounded number of threads, an engine may be freed
 * while its images are open, io_uring (where the kernel allows it) and the thread pool give
 * the same bytes, and absurd settings are refused with nothing started. */
#include "util.h"

#include <dirent.h>
#include <pthread.h>
#include <stdbool.h>
#include <unistd.h>

enum { IMAGES = 40, PER_IMAGE = 8 };

static int threads_now(void)
{
    DIR *d = opendir("/proc/self/task");
    if (d == NULL) {
        return -1; /* not Linux: the count is not checked */
    }
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        n += e->d_name[0] != '.';
    }
    closedir(d);
    return n;
}

struct counter {
    pthread_mutex_t lock;
    int done, failed;
};

static void count_cb(void *opaque, int ret)
{
    struct counter *c = opaque;
    pthread_mutex_lock(&c->lock);
    c->done++;
    c->failed += ret != 0;
    pthread_mutex_unlock(&c->lock);
}

/* Opens IMAGES images on `eng`, writes and reads them asynchronously, checks the bytes and
 * that the process never held more than `max_threads` extra threads. */
static void run(qed_engine *eng, unsigned max_threads, bool direct, const char *tag)
{
    static qed_image *imgs[IMAGES];
    int base = threads_now();
    qed_open_options o = QED_INIT(qed_open_options);
    o.flags = QED_OPEN_RDWR | (direct ? QED_OPEN_DIRECT : 0);
    o.engine = eng;
    for (int i = 0; i < IMAGES; i++) {
        char name[64];
        snprintf(name, sizeof name, "%s-%d.qed", tag, i);
        const char *p = test_path(name);
        qed_create_options c = QED_INIT(qed_create_options);
        c.size = 16 << 20;
        CHECK_RET(qed_create(p, &c), 0);
        int r = qed_open_ext(p, &o, &imgs[i]);
        if (r == -EINVAL && direct) {
            /* A file system without O_DIRECT (tmpfs): the buffered run covers the engine. */
            fprintf(stderr, "%s: no O_DIRECT here (%s)\n", tag, qed_last_error());
            for (int j = 0; j < i; j++) {
                CHECK_RET(qed_close(imgs[j]), 0);
            }
            return;
        }
        CHECK_RET(r, 0);
    }
    /* Idle open images cost no thread. */
    if (base > 0) {
        CHECK(threads_now() - base <= 1);
    }
    static unsigned char wbuf[IMAGES][PER_IMAGE][4096] __attribute__((aligned(4096)));
    static unsigned char rbuf[IMAGES][PER_IMAGE][4096] __attribute__((aligned(4096)));
    struct counter c = {PTHREAD_MUTEX_INITIALIZER, 0, 0};
    for (int i = 0; i < IMAGES; i++) {
        for (int k = 0; k < PER_IMAGE; k++) {
            memset(wbuf[i][k], (i * PER_IMAGE + k) & 0xff, 4096);
            CHECK_RET(qed_aio_write(imgs[i], (uint64_t)k * 65536, wbuf[i][k], 4096, count_cb, &c),
                      0);
        }
    }
    int peak = 0;
    for (int i = 0; i < IMAGES; i++) {
        int t = threads_now();
        peak = t > peak ? t : peak;
        CHECK_RET(qed_aio_drain(imgs[i]), 0);
    }
    /* Reads of what was written: with io_uring, the ring does these itself. */
    for (int i = 0; i < IMAGES; i++) {
        for (int k = 0; k < PER_IMAGE; k++) {
            CHECK_RET(qed_aio_read(imgs[i], (uint64_t)k * 65536, rbuf[i][k], 4096, count_cb, &c),
                      0);
        }
    }
    for (int i = 0; i < IMAGES; i++) {
        int t = threads_now();
        peak = t > peak ? t : peak;
        CHECK_RET(qed_aio_drain(imgs[i]), 0);
    }
    CHECK(c.done == 2 * IMAGES * PER_IMAGE);
    CHECK(c.failed == 0);
    CHECK(memcmp(wbuf, rbuf, sizeof wbuf) == 0);
    if (base > 0) {
        int t = threads_now();
        peak = t > peak ? t : peak;
        /* The pool, the ring's thread and the write-back timer, whatever the image count. */
        if (peak - base > (int)max_threads + 2) {
            fprintf(stderr, "%s: %d threads for %d images (bound %u + 2)\n", tag, peak - base,
                    IMAGES, max_threads);
            exit(1);
        }
    }
    for (int i = 0; i < IMAGES; i++) {
        CHECK_RET(qed_close(imgs[i]), 0);
    }
}

int main(void)
{
    /* Bad settings: refused, nothing started. */
    qed_engine *eng = NULL;
    qed_engine_options eo = QED_INIT(qed_engine_options);
    eo.threads = 1000000;
    CHECK_ERR(qed_engine_new(&eo, &eng), -EINVAL, "threads");
    eo.threads = 0;
    eo.backend = 77;
    CHECK_ERR(qed_engine_new(&eo, &eng), -EINVAL, "backend");
    CHECK(eng == NULL);
    CHECK_RET(qed_engine_new(NULL, NULL), -EINVAL);

    /* A thread-pool engine of 3 threads for 40 images; freed while they are open. */
    eo.backend = QED_IO_BACKEND_THREADS;
    eo.threads = 3;
    CHECK_RET(qed_engine_new(&eo, &eng), 0);
    qed_engine_stats st = QED_INIT(qed_engine_stats);
    CHECK_RET(qed_engine_get_stats(eng, &st), 0);
    CHECK(st.backend == QED_IO_BACKEND_THREADS);
    CHECK(st.max_threads == 3);
    CHECK(st.threads == 0);
    run(eng, 3, false, "pool");
    CHECK_RET(qed_engine_get_stats(eng, &st), 0);
    CHECK(st.pool_requests >= 2 * IMAGES * PER_IMAGE);
    CHECK(st.ring_requests == 0);
    CHECK(st.threads >= 1 && st.threads <= 3);

    /* Absurd per-image settings are refused before a queue exists. */
    const char *p = test_path("aio.qed");
    qed_create_options c = QED_INIT(qed_create_options);
    c.size = 1 << 20;
    CHECK_RET(qed_create(p, &c), 0);
    qed_image *img = NULL;
    qed_open_options o = QED_INIT(qed_open_options);
    o.flags = QED_OPEN_RDWR;
    o.engine = eng;
    CHECK_RET(qed_open_ext(p, &o, &img), 0);
    qed_aio_options ao = QED_INIT(qed_aio_options);
    ao.workers = 1000000;
    CHECK_ERR(qed_aio_setup(img, &ao), -EINVAL, "workers");
    /* The engine is freed while the image uses it: the image keeps its reference. */
    qed_engine_free(eng);
    char buf[512] = {1};
    struct counter cnt = {PTHREAD_MUTEX_INITIALIZER, 0, 0};
    CHECK_RET(qed_aio_write(img, 0, buf, sizeof buf, count_cb, &cnt), 0);
    CHECK_RET(qed_aio_drain(img), 0);
    CHECK(cnt.done == 1 && cnt.failed == 0);
    CHECK_RET(qed_close(img), 0);

    /* io_uring, where the kernel allows it; the same bytes, with the ring doing the reads. */
    eo.backend = QED_IO_BACKEND_IO_URING;
    eo.threads = 2;
    const char *want = getenv("QED_IO_ENGINE");
    /* Valgrind cannot follow io_uring (a thread in io_uring_enter stops the others). */
    int r = getenv("QED_TEST_VALGRIND") ? -ENOSYS : qed_engine_new(&eo, &eng);
    if (r == -ENOSYS && getenv("QED_TEST_VALGRIND")) {
        fprintf(stderr, "under valgrind: the io_uring engine is not tried\n");
    } else if (r != 0) {
        fprintf(stderr, "io_uring unavailable here: %s\n", qed_last_error());
        CHECK(want == NULL || strcmp(want, "io_uring") != 0);
    } else {
        run(eng, 2 + 1, false, "ring");
        run(eng, 2 + 1, true, "ring-direct");
        CHECK_RET(qed_engine_get_stats(eng, &st), 0);
        CHECK(st.backend == QED_IO_BACKEND_IO_URING);
        CHECK(st.ring_requests >= IMAGES * PER_IMAGE);
        qed_engine_free(eng);
    }

    /* The process's engine is the one QED_IO_ENGINE names. */
    CHECK_RET(qed_engine_global(&eng), 0);
    CHECK_RET(qed_engine_get_stats(eng, &st), 0);
    if (want != NULL && strcmp(want, "threads") == 0) {
        CHECK(st.backend == QED_IO_BACKEND_THREADS);
    } else if (want != NULL && strcmp(want, "io_uring") == 0) {
        CHECK(st.backend == QED_IO_BACKEND_IO_URING);
    }
    qed_engine_free(eng);
    qed_engine_free(NULL);
    test_cleanup();
    return 0;
}
