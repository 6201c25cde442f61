/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * qedbench: `qemu-img bench` for libqed.
 *
 * Mirrors qemu-img bench (QEMU 10.0.2) flag for flag and request for request, so that the two
 * tools can be run on the same image file and their "Run completed in X seconds." lines
 * compared:
 *
 *   qedbench [-f qed|raw] [-t CACHE] [-i AIO] [-n] [-c COUNT] [-d DEPTH] [-s BUFSIZE]
 *            [-S STEP] [-o OFFSET] [-w [--pattern=BYTE] [--flush-interval=N [--no-drain]]]
 *            [--fua] [-q] [-U] [--workers=N] [--event-loop] FILE
 *
 * Defaults as qemu-img: count 75000, depth 64, buffer 4 KiB, step = buffer size, offset 0,
 * cache writeback. The request sequence is qemu-img's bench_cb() state machine: DEPTH
 * requests are started, every completion starts the next one, and the offset advances by STEP
 * after each submission, wrapping modulo the image size (10.0.2 rule: `offset %= image_size`;
 * the first request uses OFFSET as given). With --flush-interval=N a flush is issued every N
 * requests, after draining the queue unless --no-drain. The timer covers the requests only:
 * not the open, not the final close (which flushes and clears the need-check bit).
 *
 * Format qed (the default; also chosen when the file starts with the QED magic) goes through
 * the library's asynchronous API (qed_aio_read / qed_aio_write / qed_aio_flush), with
 * completions on library threads (default) or, with --event-loop, on this thread through
 * qed_aio_get_fd / qed_aio_poll. --workers=N sets the library's worker threads (0: its default).
 *
 * Format raw does plain pread/pwrite/fdatasync on the file from a pool of DEPTH(+1) threads,
 * driven by the same state machine: the file-system cost of the same I/O pattern.
 *
 * Cache modes: writeback (page cache), none (O_DIRECT: QED_OPEN_DIRECT), writethrough (a flush
 * after every write, before it counts as complete), directsync (both). -n also selects
 * O_DIRECT. -i threads|io_uring sets the environment variable QED_IO_ENGINE to that value before
 * the image is opened (the library's process-wide I/O engine reads it; -i native leaves it
 * alone), so that scripts/bench runs libqed and qemu-img with the same kind of engine. -U opens
 * read-only images with QED_OPEN_FORCE_SHARE.
 *
 * --fua (with -w; not in qemu-img bench): every write is a FUA write, complete once durable:
 * qed_aio_write_flags(..., QED_REQ_FUA, ...) for qed, pwritev2(RWF_DSYNC) for raw (pwrite +
 * fdatasync where the kernel lacks it). QEMU's counterpart on a QED image is `-t writethrough`
 * (`-t directsync` with O_DIRECT): its block layer emulates FUA with a write and a flush.
 *
 * Differences from qemu-img that do not change the request stream: every in-flight slot has
 * its own buffer (qemu-img 10.0 passes the first slot's buffer to every request), and requests
 * past the end of the image fail with EINVAL rather than EIO.
 */
#define _GNU_SOURCE
#include <qed.h>

#include "benchutil.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <unistd.h>

const char *bench_name = "qedbench";

enum { FMT_AUTO, FMT_QED, FMT_RAW };

/* ------------------------------------------------------------------ backends */

typedef void (*done_fn)(void *opaque, int ret);

/* raw: a tiny thread pool doing synchronous pread/pwrite/fdatasync */
enum { JOB_READ, JOB_WRITE, JOB_FLUSH };
struct job {
    int kind;
    uint64_t offset;
    void *buf;
    size_t len;
    done_fn cb;
    void *opaque;
};
struct raw_pool {
    int fd;
    bool fua; /* writes with RWF_DSYNC */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    struct job *ring;
    size_t cap, head, count;
    bool stop;
    pthread_t *threads;
    int nthreads;
};

/* A FUA write on the raw file: pwritev2(RWF_DSYNC), or pwrite + fdatasync when the kernel or
 * the file system refuses the flag (remembered for the rest of the run). */
static ssize_t raw_pwrite_fua(int fd, const void *buf, size_t len, off_t off)
{
    static int no_dsync; /* set once, read racily: both paths are correct */
#ifdef RWF_DSYNC
    if (!__atomic_load_n(&no_dsync, __ATOMIC_RELAXED)) {
        struct iovec iov = {(void *)buf, len};
        ssize_t r = pwritev2(fd, &iov, 1, off, RWF_DSYNC);
        if (r >= 0 || (errno != ENOSYS && errno != EOPNOTSUPP && errno != EINVAL)) {
            return r;
        }
        __atomic_store_n(&no_dsync, 1, __ATOMIC_RELAXED);
    }
#endif
    ssize_t r = pwrite(fd, buf, len, off);
    if (r >= 0 && fdatasync(fd) < 0) {
        return -1;
    }
    return r;
}

static void *raw_worker(void *arg)
{
    struct raw_pool *p = arg;
    for (;;) {
        pthread_mutex_lock(&p->lock);
        while (!p->count && !p->stop) {
            pthread_cond_wait(&p->cond, &p->lock);
        }
        if (!p->count) {
            pthread_mutex_unlock(&p->lock);
            return NULL;
        }
        struct job j = p->ring[p->head];
        p->head = (p->head + 1) % p->cap;
        p->count--;
        pthread_mutex_unlock(&p->lock);

        int ret = 0;
        if (j.kind == JOB_FLUSH) {
            if (fdatasync(p->fd) < 0) {
                ret = -errno;
            }
        } else {
            size_t done = 0;
            while (done < j.len) {
                ssize_t r = j.kind == JOB_READ
                    ? pread(p->fd, (char *)j.buf + done, j.len - done, (off_t)(j.offset + done))
                    : p->fua ? raw_pwrite_fua(p->fd, (char *)j.buf + done, j.len - done,
                                              (off_t)(j.offset + done))
                    : pwrite(p->fd, (char *)j.buf + done, j.len - done, (off_t)(j.offset + done));
                if (r < 0) {
                    if (errno == EINTR) {
                        continue;
                    }
                    ret = -errno;
                    break;
                }
                if (r == 0) {
                    if (j.kind == JOB_READ) { /* past EOF reads as zeros */
                        memset((char *)j.buf + done, 0, j.len - done);
                        break;
                    }
                    ret = -EIO;
                    break;
                }
                done += (size_t)r;
            }
        }
        j.cb(j.opaque, ret);
    }
}

static int raw_submit(struct raw_pool *p, int kind, uint64_t off, void *buf, size_t len, done_fn cb,
                      void *opaque)
{
    pthread_mutex_lock(&p->lock);
    if (p->count == p->cap) {
        pthread_mutex_unlock(&p->lock);
        return -EAGAIN;
    }
    p->ring[(p->head + p->count) % p->cap] = (struct job){kind, off, buf, len, cb, opaque};
    p->count++;
    pthread_cond_signal(&p->cond);
    pthread_mutex_unlock(&p->lock);
    return 0;
}

/* ------------------------------------------------------------------ bench state (qemu-img's BenchData) */

struct slot {
    struct bench *b;
    int index;
    bool flushing; /* writethrough: the write is done, its flush is in flight */
};

struct bench {
    int fmt;
    qed_image *img;
    struct raw_pool raw;

    uint64_t image_size;
    bool write;
    bool writethrough;
    bool fua;
    int bufsize;
    uint64_t step;
    int nrreq;
    int n;
    int flush_interval;
    bool drain_on_flush;
    uint8_t *buf;

    int in_flight;
    bool in_flush;
    uint64_t offset;

    struct slot *slots;
    int *free_slots;
    int nfree;
    struct slot flush_token;

    pthread_mutex_t lock;
    pthread_cond_t done_cond;
};

static void bench_cb(void *opaque, int ret);

static int submit_rw(struct bench *b, uint64_t offset, struct slot *s)
{
    void *buf = b->buf + (size_t)s->index * (size_t)b->bufsize;
    if (b->fmt == FMT_RAW) {
        return raw_submit(&b->raw, b->write ? JOB_WRITE : JOB_READ, offset, buf, (size_t)b->bufsize,
                          bench_cb, s);
    }
    if (b->write && b->fua) {
        return qed_aio_write_flags(b->img, offset, buf, (size_t)b->bufsize, QED_REQ_FUA, bench_cb, s);
    }
    if (b->write) {
        return qed_aio_write(b->img, offset, buf, (size_t)b->bufsize, bench_cb, s);
    }
    return qed_aio_read(b->img, offset, buf, (size_t)b->bufsize, bench_cb, s);
}

static int submit_flush(struct bench *b, done_fn cb, void *opaque)
{
    if (b->fmt == FMT_RAW) {
        return raw_submit(&b->raw, JOB_FLUSH, 0, NULL, 0, cb, opaque);
    }
    return qed_aio_flush(b->img, cb, opaque);
}

static void bench_undrained_flush_cb(void *opaque, int ret)
{
    (void)opaque;
    if (ret < 0) {
        die("Failed flush request: %s", strerror(-ret));
    }
}

/* qemu-img.c bench_cb(), with the state under a mutex because completions may arrive on
 * several threads at once. `opaque` is a request slot, or the flush token for a drained flush
 * (NULL for the initial kick). */
static void bench_cb(void *opaque, int ret)
{
    struct slot *s = opaque;
    struct bench *b = s->b;
    int r;

    if (ret < 0) {
        die("Failed request: %s", strerror(-ret));
    }
    pthread_mutex_lock(&b->lock);

    /* writethrough: a write counts as complete once the flush after it is done */
    if (b->writethrough && s != &b->flush_token && s->index >= 0 && !s->flushing) {
        s->flushing = true;
        r = submit_flush(b, bench_cb, s);
        if (r < 0) {
            die("Failed to issue flush request: %s", strerror(-r));
        }
        pthread_mutex_unlock(&b->lock);
        return;
    }

    if (b->in_flush) {
        /* Just finished a flush with drained queue: start the next requests */
        b->in_flush = false;
    } else if (b->in_flight > 0) {
        int remaining = b->n - b->in_flight;
        b->n--;
        b->in_flight--;
        s->flushing = false;
        b->free_slots[b->nfree++] = s->index;

        /* Time for flush? Drain queue if requested, then flush */
        if (b->flush_interval && remaining % b->flush_interval == 0) {
            if (!b->in_flight || !b->drain_on_flush) {
                if (b->drain_on_flush) {
                    b->in_flush = true;
                    r = submit_flush(b, bench_cb, &b->flush_token);
                } else {
                    r = submit_flush(b, bench_undrained_flush_cb, NULL);
                }
                if (r < 0) {
                    die("Failed to issue flush request: %s", strerror(-r));
                }
            }
            if (b->drain_on_flush) {
                goto out;
            }
        }
    }

    while (b->n > b->in_flight && b->in_flight < b->nrreq) {
        uint64_t offset = b->offset;
        struct slot *ns = &b->slots[b->free_slots[--b->nfree]];
        b->in_flight++;
        b->offset += b->step;
        if (b->image_size == 0) {
            b->offset = 0;
        } else {
            b->offset %= b->image_size;
        }
        r = submit_rw(b, offset, ns);
        if (r < 0) {
            die("Failed to issue request: %s", strerror(-r));
        }
    }
out:
    if (b->n == 0) {
        pthread_cond_broadcast(&b->done_cond);
    }
    pthread_mutex_unlock(&b->lock);
}

/* ------------------------------------------------------------------ option parsing */

/* qemu's cvtnum: a number with an optional B/K/M/G/T/P/E suffix (powers of 1024) */
static int64_t cvtnum(const char *s)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || end == s || *s == '-') {
        return -1;
    }
    unsigned shift = 0;
    switch (*end) {
    case '\0': case 'b': case 'B': break;
    case 'k': case 'K': shift = 10; break;
    case 'm': case 'M': shift = 20; break;
    case 'g': case 'G': shift = 30; break;
    case 't': case 'T': shift = 40; break;
    case 'p': case 'P': shift = 50; break;
    case 'e': case 'E': shift = 60; break;
    default: return -1;
    }
    if (*end && end[1]) {
        return -1;
    }
    if (shift && v > (unsigned long long)INT64_MAX >> shift) {
        return -1;
    }
    return (int64_t)(v << shift);
}

static long parse_ulong(const char *s, unsigned long max, const char *what)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 0);
    if (errno || end == s || *end || *s == '-' || v > max) {
        die("Invalid %s specified", what);
    }
    return (long)v;
}

static void usage(void)
{
    printf("usage: qedbench [-f qed|raw] [-t writeback|none|writethrough|directsync] [-i AIO] [-n]\n"
           "                [-c COUNT] [-d DEPTH] [-s BUFSIZE] [-S STEP] [-o OFFSET]\n"
           "                [-w [--pattern=BYTE] [--flush-interval=N [--no-drain]] [--fua]] [-q]\n"
           "                [-U] [--workers=N] [--event-loop] FILE\n"
           "Same requests and output as qemu-img bench; see the comment at the top of\n"
           "benches/qedbench.c.\n");
    exit(EXIT_SUCCESS);
}

enum { OPT_FLUSH_INTERVAL = 256, OPT_PATTERN, OPT_NO_DRAIN, OPT_WORKERS, OPT_EVENT_LOOP, OPT_FUA };

int main(int argc, char **argv)
{
    int count = 75000, depth = 64, pattern = 0, flush_interval = 0, fmt = FMT_AUTO;
    int64_t offset = 0;
    int64_t bufsize = 4096, step = 0;
    bool is_write = false, drain_on_flush = true, direct = false, writethrough = false;
    bool force_share = false, event_loop = false, fua = false;
    const char *io_engine = NULL;
    unsigned workers = 0;
    int c;

    static const struct option long_options[] = {
        {"help", no_argument, 0, 'h'},
        {"flush-interval", required_argument, 0, OPT_FLUSH_INTERVAL},
        {"pattern", required_argument, 0, OPT_PATTERN},
        {"no-drain", no_argument, 0, OPT_NO_DRAIN},
        {"workers", required_argument, 0, OPT_WORKERS},
        {"event-loop", no_argument, 0, OPT_EVENT_LOOP},
        {"fua", no_argument, 0, OPT_FUA},
        {0, 0, 0, 0},
    };
    while ((c = getopt_long(argc, argv, "hc:d:f:i:no:qs:S:t:wU", long_options, NULL)) != -1) {
        switch (c) {
        case 'h':
            usage();
            break;
        case 'c':
            count = (int)parse_ulong(optarg, INT_MAX, "request count");
            break;
        case 'd':
            depth = (int)parse_ulong(optarg, INT_MAX, "queue depth");
            break;
        case 'f':
            if (!strcmp(optarg, "qed")) {
                fmt = FMT_QED;
            } else if (!strcmp(optarg, "raw")) {
                fmt = FMT_RAW;
            } else {
                die("Unknown file format '%s' (qed or raw)", optarg);
            }
            break;
        case 'i':
            if (strcmp(optarg, "threads") && strcmp(optarg, "native") && strcmp(optarg, "io_uring")) {
                die("Invalid aio option: %s", optarg);
            }
            if (strcmp(optarg, "native")) {
                io_engine = optarg; /* QED_IO_ENGINE, set before the open */
            }
            break;
        case 'n':
            direct = true;
            break;
        case 'o':
            offset = cvtnum(optarg);
            if (offset < 0) {
                die("Invalid offset specified");
            }
            break;
        case 'q':
            break; /* qemu-img bench ignores -q too */
        case 's':
            bufsize = cvtnum(optarg);
            if (bufsize <= 0 || bufsize > INT_MAX) {
                die("Invalid buffer size specified");
            }
            break;
        case 'S':
            step = cvtnum(optarg);
            if (step < 0 || step > INT_MAX) {
                die("Invalid step size specified");
            }
            break;
        case 't':
            if (!strcmp(optarg, "writeback")) {
                /* page cache */
            } else if (!strcmp(optarg, "none")) {
                direct = true;
            } else if (!strcmp(optarg, "writethrough")) {
                writethrough = true;
            } else if (!strcmp(optarg, "directsync")) {
                direct = writethrough = true;
            } else {
                die("Invalid cache mode (writeback, none, writethrough, directsync)");
            }
            break;
        case 'w':
            is_write = true;
            break;
        case 'U':
            force_share = true;
            break;
        case OPT_PATTERN:
            pattern = (int)parse_ulong(optarg, 0xff, "pattern byte");
            break;
        case OPT_FLUSH_INTERVAL:
            flush_interval = (int)parse_ulong(optarg, INT_MAX, "flush interval");
            break;
        case OPT_NO_DRAIN:
            drain_on_flush = false;
            break;
        case OPT_WORKERS:
            workers = (unsigned)parse_ulong(optarg, 1024, "worker count");
            break;
        case OPT_EVENT_LOOP:
            event_loop = true;
            break;
        case OPT_FUA:
            fua = true;
            break;
        default:
            fprintf(stderr, "Try 'qedbench --help' for more information.\n");
            return EXIT_FAILURE;
        }
    }
    if (optind != argc - 1) {
        die("Expecting one image file name");
    }
    const char *filename = argv[argc - 1];
    if (count < 1 || depth < 1) {
        die("Request count and queue depth must be at least 1");
    }
    if (!is_write && flush_interval) {
        die("--flush-interval is only available in write tests");
    }
    if (fua && !is_write) {
        die("--fua is only available in write tests");
    }
    select_io_engine(io_engine);
    if (flush_interval && flush_interval < depth) {
        die("Flush interval can't be smaller than depth");
    }

    if (fmt == FMT_AUTO) { /* probe like qemu-img: the QED magic, else raw */
        char magic[4] = {0};
        int fd = open(filename, O_RDONLY);
        if (fd < 0) {
            die("Could not open '%s': %s", filename, strerror(errno));
        }
        fmt = pread(fd, magic, 4, 0) == 4 && !memcmp(magic, "QED\0", 4) ? FMT_QED : FMT_RAW;
        close(fd);
    }

    struct bench *b = calloc(1, sizeof *b);
    if (!b) {
        die("out of memory");
    }
    b->fmt = fmt;
    if (fmt == FMT_QED) {
        unsigned flags = (is_write ? QED_OPEN_RDWR : 0) | (direct ? QED_OPEN_DIRECT : 0) |
                         (force_share && !is_write ? QED_OPEN_FORCE_SHARE : 0);
        int r = qed_open(filename, flags, &b->img);
        if (r < 0) {
            die("Could not open '%s': %s", filename, qed_last_error());
        }
        struct qed_info info = QED_INIT(qed_info);
        r = qed_get_info(b->img, &info);
        if (r < 0) {
            die("qed_get_info: %s", qed_last_error());
        }
        b->image_size = info.virtual_size;
        struct qed_aio_options ao = {
            .struct_size = sizeof(struct qed_aio_options),
            .workers = workers,
            /* DEPTH requests, plus the one whose callback is refilling, plus undrained flushes
             * (--no-drain lets them pile up behind the writes) */
            .queue_depth = (uint32_t)depth * 2u + 1024u,
            .flags = event_loop ? QED_AIO_EVENT_LOOP : 0,
        };
        r = qed_aio_setup(b->img, &ao);
        if (r < 0) {
            die("qed_aio_setup: %s", qed_last_error());
        }
    } else {
        if (event_loop || workers) {
            die("--event-loop and --workers apply to format qed only");
        }
        int fd = open(filename, (is_write ? O_RDWR : O_RDONLY) | (direct ? O_DIRECT : 0));
        if (fd < 0) {
            die("Could not open '%s': %s", filename, strerror(errno));
        }
        off_t end = lseek(fd, 0, SEEK_END);
        if (end < 0) {
            die("Could not get the size of '%s': %s", filename, strerror(errno));
        }
        b->image_size = (uint64_t)end;
        struct raw_pool *p = &b->raw;
        p->fd = fd;
        p->fua = fua;
        p->cap = (size_t)depth + 2;
        p->ring = calloc(p->cap, sizeof *p->ring);
        p->nthreads = depth + 1; /* one per request, one more for an undrained flush */
        p->threads = calloc((size_t)p->nthreads, sizeof *p->threads);
        if (!p->ring || !p->threads) {
            die("out of memory");
        }
        pthread_mutex_init(&p->lock, NULL);
        pthread_cond_init(&p->cond, NULL);
        for (int i = 0; i < p->nthreads; i++) {
            pthread_attr_t attr;
            pthread_attr_init(&attr);
            pthread_attr_setstacksize(&attr, 64 * 1024);
            if (pthread_create(&p->threads[i], &attr, raw_worker, p)) {
                die("could not start thread %d", i);
            }
            pthread_attr_destroy(&attr);
        }
    }

    b->write = is_write;
    b->writethrough = writethrough && is_write;
    b->fua = fua;
    b->bufsize = (int)bufsize;
    b->step = step ? (uint64_t)step : (uint64_t)bufsize;
    b->nrreq = depth;
    b->n = count;
    b->offset = (uint64_t)offset;
    b->flush_interval = flush_interval;
    b->drain_on_flush = drain_on_flush;

    printf("Sending %d %s requests, %d bytes each, %d in parallel (starting at offset %" PRId64
           ", step size %d)\n",
           b->n, b->write ? "write" : "read", b->bufsize, b->nrreq, offset, (int)b->step);
    if (flush_interval) {
        printf("Sending flush every %d requests\n", flush_interval);
    }
    fflush(stdout);

    size_t buflen = (size_t)depth * (size_t)bufsize;
    void *mem;
    if (posix_memalign(&mem, 4096, buflen)) {
        die("out of memory (%zu bytes of buffers)", buflen);
    }
    b->buf = mem;
    memset(b->buf, pattern, buflen);
    b->slots = calloc((size_t)depth, sizeof *b->slots);
    b->free_slots = calloc((size_t)depth, sizeof *b->free_slots);
    if (!b->slots || !b->free_slots) {
        die("out of memory");
    }
    for (int i = 0; i < depth; i++) {
        b->slots[i] = (struct slot){b, i, false};
        b->free_slots[i] = depth - 1 - i;
    }
    b->nfree = depth;
    b->flush_token = (struct slot){b, -1, false};
    pthread_mutex_init(&b->lock, NULL);
    pthread_cond_init(&b->done_cond, NULL);

    struct slot kick = {b, -1, false};
    double t1 = now_s();
    bench_cb(&kick, 0);
    if (fmt == FMT_QED && event_loop) {
        int efd = qed_aio_get_fd(b->img);
        if (efd < 0) {
            die("qed_aio_get_fd: %s", qed_last_error());
        }
        for (;;) {
            pthread_mutex_lock(&b->lock);
            int left = b->n;
            pthread_mutex_unlock(&b->lock);
            if (left <= 0) {
                break;
            }
            struct pollfd pfd = {efd, POLLIN, 0};
            if (poll(&pfd, 1, -1) < 0 && errno != EINTR) {
                die("poll: %s", strerror(errno));
            }
            int r = qed_aio_poll(b->img);
            if (r < 0) {
                die("qed_aio_poll: %s", qed_last_error());
            }
        }
    } else {
        pthread_mutex_lock(&b->lock);
        while (b->n > 0) {
            pthread_cond_wait(&b->done_cond, &b->lock);
        }
        pthread_mutex_unlock(&b->lock);
    }
    double t2 = now_s();
    printf("Run completed in %3.3f seconds.\n", t2 - t1);
    fflush(stdout);

    int ret = EXIT_SUCCESS;
    if (fmt == FMT_QED) {
        if (qed_close(b->img) < 0) { /* drains an undrained flush, flushes, clears need-check */
            fprintf(stderr, "qedbench: qed_close: %s\n", qed_last_error());
            ret = EXIT_FAILURE;
        }
    } else {
        struct raw_pool *p = &b->raw;
        pthread_mutex_lock(&p->lock);
        p->stop = true;
        pthread_cond_broadcast(&p->cond);
        pthread_mutex_unlock(&p->lock);
        for (int i = 0; i < p->nthreads; i++) {
            pthread_join(p->threads[i], NULL);
        }
        close(p->fd);
        free(p->ring);
        free(p->threads);
    }
    free(b->buf);
    free(b->slots);
    free(b->free_slots);
    free(b);
    return ret;
}
