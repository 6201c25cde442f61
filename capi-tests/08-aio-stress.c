/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/* Async stress: 64 requests in flight, random mixed reads, writes, write-zeroes and flushes of
 * random sizes over one image for a bounded time, checked against a shadow copy; then checked
 * with qemu-img check and qemu-img compare. Runs once with callbacks on library threads and
 * once in event-loop mode (eventfd + qed_aio_poll on this thread). Every callback must run
 * exactly once, and none after qed_aio_drain returns. */
#include "util.h"

#include <poll.h>
#include <pthread.h>
#include <time.h>

#define DEPTH 64
#define MAXLEN (256 * 1024)

enum kind { K_READ, K_WRITE, K_ZERO, K_FLUSH };

struct req {
    enum kind kind;
    uint64_t off, len;
    uint8_t *buf;
    int busy;            /* submitted and not completed */
    int completions;     /* times its callback ran for the current submission */
    int ret;
};

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct req reqs[DEPTH];
    uint8_t *shadow;
    uint64_t size;
    int inflight;
    int drained;         /* set after qed_aio_drain returned: no callback may run after */
    long done, failures, bytes;
} S;

static uint64_t rng_state = 88172645463325252ull;
static uint64_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Whether [off, off+len) overlaps a busy request that conflicts with `kind`. Called locked. */
static int conflicts(enum kind kind, uint64_t off, uint64_t len)
{
    for (int i = 0; i < DEPTH; i++) {
        struct req *r = &S.reqs[i];
        if (!r->busy || r->kind == K_FLUSH) continue;
        if (kind == K_READ && r->kind == K_READ) continue;
        if (off < r->off + r->len && r->off < off + len) return 1;
    }
    return 0;
}

static void on_done(void *opaque, int ret)
{
    struct req *r = opaque;
    pthread_mutex_lock(&S.mu);
    if (S.drained) {
        fprintf(stderr, "callback after drain returned\n");
        S.failures++;
    }
    r->completions++;
    if (r->completions != 1) {
        fprintf(stderr, "request completed %d times\n", r->completions);
        S.failures++;
    }
    if (ret != 0) {
        fprintf(stderr, "request kind %d off %llu len %llu failed: %d\n", r->kind,
                (unsigned long long)r->off, (unsigned long long)r->len, ret);
        S.failures++;
    } else if (r->kind == K_READ && memcmp(r->buf, S.shadow + r->off, r->len) != 0) {
        fprintf(stderr, "read at %llu len %llu differs from the shadow\n",
                (unsigned long long)r->off, (unsigned long long)r->len);
        S.failures++;
    }
    r->busy = 0;
    S.inflight--;
    S.done++;
    pthread_cond_broadcast(&S.cv);
    pthread_mutex_unlock(&S.mu);
}

/* Fills a free slot with a random request and submits it. Called locked; unlocks around the
 * submit so callbacks can run. Returns 0 or the submit's error. */
static int submit_one(qed_image *img, int slot)
{
    struct req *r = &S.reqs[slot];
    uint64_t sectors = S.size / 512;
    enum kind kind;
    uint64_t off, len;
    int tries = 0;
    do {
        uint64_t k = rnd() % 20;
        kind = k < 8 ? K_READ : k < 16 ? K_WRITE : k < 19 ? K_ZERO : K_FLUSH;
        /* Mostly sector-aligned, sometimes byte-unaligned; sizes from 1 byte to 256 KiB. */
        off = (rnd() % sectors) * 512 + (rnd() % 4 == 0 ? rnd() % 512 : 0);
        len = 1 + rnd() % (rnd() % 2 ? 4096 : MAXLEN);
        if (off >= S.size) off = S.size - 1;
        if (off + len > S.size) len = S.size - off;
        if (kind == K_FLUSH) { off = 0; len = 0; break; }
    } while (conflicts(kind, off, len) && ++tries < 100);
    if (tries >= 100) return 1; /* nothing free now; caller waits */
    r->kind = kind;
    r->off = off;
    r->len = len;
    r->busy = 1;
    r->completions = 0;
    if (kind == K_WRITE) {
        test_fill(r->buf, len, (uint32_t)rnd());
        memcpy(S.shadow + off, r->buf, len);
    } else if (kind == K_ZERO) {
        memset(S.shadow + off, 0, len);
    }
    S.inflight++;
    S.bytes += len;
    pthread_mutex_unlock(&S.mu);
    int ret;
    switch (kind) {
    case K_READ: {
        if (rnd() % 3 == 0 && len >= 3) { /* split into an iovec */
            struct iovec iov[3] = {{r->buf, 1}, {r->buf + 1, len / 2}, {r->buf + 1 + len / 2, len - 1 - len / 2}};
            ret = qed_aio_readv(img, off, iov, 3, on_done, r);
        } else {
            ret = qed_aio_read(img, off, r->buf, len, on_done, r);
        }
        break;
    }
    case K_WRITE:
        if (rnd() % 3 == 0 && len >= 2) {
            struct iovec iov[2] = {{r->buf, len / 2}, {r->buf + len / 2, len - len / 2}};
            ret = qed_aio_writev(img, off, iov, 2, on_done, r);
        } else {
            ret = qed_aio_write(img, off, r->buf, len, on_done, r);
        }
        break;
    case K_ZERO:
        ret = qed_aio_write_zeroes(img, off, len, on_done, r);
        break;
    default:
        ret = qed_aio_flush(img, on_done, r);
    }
    pthread_mutex_lock(&S.mu);
    if (ret != 0) { /* refused: the callback never runs */
        r->busy = 0;
        S.inflight--;
        fprintf(stderr, "submit refused: %d (%s)\n", ret, qed_last_error());
        S.failures++;
    }
    return ret;
}

static void run(const char *name, uint32_t cluster_size, uint32_t table_size, uint64_t size, int event_loop, double seconds)
{
    const char *p = test_path(name);
    qed_create_options o = QED_INIT(qed_create_options);
    o.size = size;
    o.cluster_size = cluster_size;
    o.table_size = table_size;
    CHECK_RET(qed_create(p, &o), 0);
    qed_image *img;
    CHECK_RET(qed_open(p, QED_OPEN_RDWR, &img), 0);
    qed_aio_options ao = QED_INIT(qed_aio_options);
    ao.flags = event_loop ? QED_AIO_EVENT_LOOP : 0;
    CHECK_RET(qed_aio_setup(img, &ao), 0);
    int fd = qed_aio_get_fd(img);
    CHECK(event_loop ? fd >= 0 : fd == -EINVAL);

    memset(&S.reqs, 0, sizeof S.reqs);
    S.size = size;
    S.shadow = calloc(1, size);
    CHECK(S.shadow != NULL);
    for (int i = 0; i < DEPTH; i++) CHECK((S.reqs[i].buf = malloc(MAXLEN)) != NULL);
    S.inflight = 0;
    S.drained = 0;
    S.done = S.failures = S.bytes = 0;

    double end = now() + seconds;
    long submitted = 0;
    pthread_mutex_lock(&S.mu);
    while (now() < end && S.failures == 0) {
        int slot = -1;
        for (int i = 0; i < DEPTH; i++) if (!S.reqs[i].busy) { slot = i; break; }
        if (slot >= 0 && submit_one(img, slot) == 0) {
            submitted++;
            continue;
        }
        /* Full (or no conflict-free range): wait for completions. */
        if (event_loop) {
            pthread_mutex_unlock(&S.mu);
            struct pollfd pfd = {fd, POLLIN, 0};
            poll(&pfd, 1, 100);
            CHECK(qed_aio_poll(img) >= 0);
            pthread_mutex_lock(&S.mu);
        } else {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_nsec += 50 * 1000 * 1000;
            if (ts.tv_nsec >= 1000000000) { ts.tv_sec++; ts.tv_nsec -= 1000000000; }
            pthread_cond_timedwait(&S.cv, &S.mu, &ts);
        }
    }
    pthread_mutex_unlock(&S.mu);
    CHECK_RET(qed_aio_drain(img), 0);
    pthread_mutex_lock(&S.mu);
    S.drained = 1;
    CHECK(S.inflight == 0);
    CHECK(S.done == submitted);
    for (int i = 0; i < DEPTH; i++) CHECK(!S.reqs[i].busy);
    long failures = S.failures;
    pthread_mutex_unlock(&S.mu);
    CHECK(failures == 0);
    printf("%s: %s mode, %ld requests (%.1f MiB) in %.1f s, 0 mismatches\n", name,
           event_loop ? "event-loop" : "callback", submitted, S.bytes / 1048576.0, seconds);

    /* A flush after everything, a full read-back, and QEMU's verdict. */
    CHECK_RET(qed_flush(img), 0);
    uint8_t *back = malloc(size);
    CHECK(back != NULL);
    CHECK_RET(qed_read(img, 0, back, size), 0);
    CHECK(memcmp(back, S.shadow, size) == 0);
    qed_check_result cr = QED_INIT(qed_check_result);
    CHECK_RET(qed_check(img, 0, &cr), 0);
    CHECK(cr.corruptions == 0 && cr.leaks == 0);
    CHECK_RET(qed_close(img), 0);
    const char *raw = test_path("shadow.raw");
    test_write_file(raw, S.shadow, size);
    CHECK(test_sh("qemu-img check -q '%s'", p) == 0);
    CHECK(test_sh("qemu-img compare -q -f raw -F qed '%s' '%s'", raw, p) == 0);
    free(back);
    free(S.shadow);
    for (int i = 0; i < DEPTH; i++) free(S.reqs[i].buf);
}

int main(void)
{
    pthread_mutex_init(&S.mu, NULL);
    pthread_cond_init(&S.cv, NULL);
    const char *env = getenv("QED_STRESS_SECONDS");
    double seconds = env ? atof(env) : 2.0;
    /* 4 KiB clusters, two-cluster tables (an L2 table maps 4 MiB): much metadata. The file stays
     * under 16 MiB, below QEMU's phantom-leak bug. */
    run("aio4k.qed", 4096, 2, 8 << 20, 0, seconds);
    run("aio4k-ev.qed", 4096, 2, 8 << 20, 1, seconds);
    run("aio64k.qed", 65536, 4, 64 << 20, 0, seconds);
    run("aio64k-ev.qed", 65536, 4, 64 << 20, 1, seconds);
    test_cleanup();
    return 0;
}
