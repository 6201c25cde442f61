/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * qedflush: small writes, each followed by a flush, from several threads at once.
 *
 *   qedflush [-f qed|raw] [-t writeback|none] [-i threads|io_uring|native] [-j THREADS]
 *            [-c COUNT] [-s BUFSIZE] [-o OFFSET] [--pattern=BYTE] FILE
 *
 * THREADS threads (default 8) share one handle; each loops { write BUFSIZE (default 4 KiB)
 * bytes; flush } until COUNT (default 8192) writes have been made in total. Thread t's k-th
 * write goes to OFFSET + (k * THREADS + t) * BUFSIZE, wrapping at the end of the image: the
 * threads never write the same block at the same time, and together they write sequentially.
 *
 * Format qed goes through libqed's synchronous API: qed_write + qed_flush on one handle opened
 * with QED_OPEN_RDWR (plus QED_OPEN_DIRECT with -t none). Format raw does pwrite + fdatasync on
 * one descriptor (O_DIRECT with -t none): what the file system alone costs. -i threads|io_uring
 * sets QED_IO_ENGINE before the open, as qedbench does.
 *
 * Prints "Run completed in X seconds." like qemu-img bench (the timer covers the writes and
 * flushes: threads start together at a barrier, the open and close are outside it) and the
 * write+flush rate on stderr ("N flushes/s").
 */
#define _GNU_SOURCE
#include <qed.h>

#include "benchutil.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

const char *bench_name = "qedflush";

struct shared {
    bool raw;
    qed_image *img;
    int fd;
    uint64_t size;
    uint64_t offset;
    size_t bufsize;
    int nthreads;
    long count;
    int pattern;
    pthread_barrier_t start;
};

struct worker {
    struct shared *s;
    int index;
    pthread_t thread;
};

static void *run(void *arg)
{
    struct worker *w = arg;
    struct shared *s = w->s;
    void *buf;
    if (posix_memalign(&buf, 4096, s->bufsize)) {
        die("out of memory");
    }
    memset(buf, s->pattern, s->bufsize);
    uint64_t blocks = s->size / s->bufsize;
    pthread_barrier_wait(&s->start);
    /* thread t makes writes t, t + N, t + 2N, ... of the COUNT */
    for (long k = w->index; k < s->count; k += s->nthreads) {
        uint64_t off = (s->offset + (uint64_t)k * s->bufsize) % (blocks * s->bufsize);
        if (s->raw) {
            size_t done = 0;
            while (done < s->bufsize) {
                ssize_t r = pwrite(s->fd, (char *)buf + done, s->bufsize - done, (off_t)(off + done));
                if (r < 0 && errno == EINTR) {
                    continue;
                }
                if (r <= 0) {
                    die("pwrite at %" PRIu64 ": %s", off, r < 0 ? strerror(errno) : "short write");
                }
                done += (size_t)r;
            }
            if (fdatasync(s->fd) < 0) {
                die("fdatasync: %s", strerror(errno));
            }
        } else {
            int r = qed_write(s->img, off, buf, s->bufsize);
            if (r < 0) {
                die("qed_write at %" PRIu64 ": %s", off, qed_last_error());
            }
            r = qed_flush(s->img);
            if (r < 0) {
                die("qed_flush: %s", qed_last_error());
            }
        }
    }
    free(buf);
    return NULL;
}

static void usage(void)
{
    printf("usage: qedflush [-f qed|raw] [-t writeback|none] [-i threads|io_uring|native]\n"
           "                [-j THREADS] [-c COUNT] [-s BUFSIZE] [-o OFFSET] [--pattern=BYTE] FILE\n"
           "THREADS threads (8) each loop { write; flush } on one shared handle until COUNT\n"
           "(8192) writes are done; see the comment at the top of benches/qedflush.c.\n");
    exit(EXIT_SUCCESS);
}

enum { OPT_PATTERN = 256 };

int main(int argc, char **argv)
{
    struct shared s = {.fd = -1, .bufsize = 4096, .nthreads = 8, .count = 8192};
    bool direct = false;
    int fmt = 'q';
    const char *io_engine = NULL;
    static const struct option long_options[] = {
        {"help", no_argument, 0, 'h'},
        {"pattern", required_argument, 0, OPT_PATTERN},
        {0, 0, 0, 0},
    };
    int c;
    while ((c = getopt_long(argc, argv, "hc:f:i:j:o:s:t:", long_options, NULL)) != -1) {
        switch (c) {
        case 'h':
            usage();
            break;
        case 'c':
            s.count = parse_num(optarg, 0, INT_MAX, "count");
            break;
        case 'f':
            if (!strcmp(optarg, "qed")) {
                fmt = 'q';
            } else if (!strcmp(optarg, "raw")) {
                fmt = 'r';
            } else {
                die("Unknown file format '%s' (qed or raw)", optarg);
            }
            break;
        case 'i':
            if (!strcmp(optarg, "threads") || !strcmp(optarg, "io_uring")) {
                io_engine = optarg;
            } else if (strcmp(optarg, "native")) {
                die("Invalid aio option: %s", optarg);
            }
            break;
        case 'j':
            s.nthreads = (int)parse_num(optarg, 0, 4096, "thread count");
            break;
        case 'o':
            s.offset = (uint64_t)parse_num(optarg, 0, LONG_MAX, "offset");
            break;
        case 's':
            s.bufsize = (size_t)parse_num(optarg, 0, 64L << 20, "buffer size");
            break;
        case 't':
            if (!strcmp(optarg, "none")) {
                direct = true;
            } else if (strcmp(optarg, "writeback")) {
                die("Invalid cache mode (writeback or none)");
            }
            break;
        case OPT_PATTERN:
            s.pattern = (int)parse_num(optarg, 0, 0xff, "pattern byte");
            break;
        default:
            fprintf(stderr, "Try 'qedflush --help' for more information.\n");
            return EXIT_FAILURE;
        }
    }
    if (optind != argc - 1) {
        die("Expecting one image file name");
    }
    if (s.nthreads < 1 || s.count < 1 || s.bufsize < 1) {
        die("threads, count and buffer size must be at least 1");
    }
    const char *filename = argv[optind];
    select_io_engine(io_engine);

    s.raw = fmt == 'r';
    if (s.raw) {
        s.fd = open(filename, O_RDWR | (direct ? O_DIRECT : 0));
        if (s.fd < 0) {
            die("Could not open '%s': %s", filename, strerror(errno));
        }
        off_t end = lseek(s.fd, 0, SEEK_END);
        if (end < 0) {
            die("Could not get the size of '%s': %s", filename, strerror(errno));
        }
        s.size = (uint64_t)end;
    } else {
        int r = qed_open(filename, QED_OPEN_RDWR | (direct ? QED_OPEN_DIRECT : 0), &s.img);
        if (r < 0) {
            die("Could not open '%s': %s", filename, qed_last_error());
        }
        struct qed_info info = QED_INIT(qed_info);
        if (qed_get_info(s.img, &info) < 0) {
            die("qed_get_info: %s", qed_last_error());
        }
        s.size = info.virtual_size;
    }
    if (s.size < s.bufsize) {
        die("'%s' is smaller than one write (%zu bytes)", filename, s.bufsize);
    }

    printf("Sending %ld write+flush pairs, %zu bytes each, from %d threads (starting at offset %" PRIu64
           ")\n",
           s.count, s.bufsize, s.nthreads, s.offset);
    fflush(stdout);

    struct worker *w = calloc((size_t)s.nthreads, sizeof *w);
    if (!w) {
        die("out of memory");
    }
    pthread_barrier_init(&s.start, NULL, (unsigned)s.nthreads + 1);
    for (int i = 0; i < s.nthreads; i++) {
        w[i] = (struct worker){&s, i, 0};
        if (pthread_create(&w[i].thread, NULL, run, &w[i])) {
            die("could not start thread %d", i);
        }
    }
    pthread_barrier_wait(&s.start);
    double t1 = now_s();
    for (int i = 0; i < s.nthreads; i++) {
        pthread_join(w[i].thread, NULL);
    }
    double t2 = now_s();
    printf("Run completed in %3.3f seconds.\n", t2 - t1);
    fflush(stdout);
    fprintf(stderr, "%.0f flushes/s (%ld write+flush pairs, %d threads)\n",
            (double)s.count / (t2 - t1 > 0 ? t2 - t1 : 1e-9), s.count, s.nthreads);

    int ret = EXIT_SUCCESS;
    if (s.raw) {
        close(s.fd);
    } else if (qed_close(s.img) < 0) {
        fprintf(stderr, "qedflush: qed_close: %s\n", qed_last_error());
        ret = EXIT_FAILURE;
    }
    pthread_barrier_destroy(&s.start);
    free(w);
    return ret;
}
