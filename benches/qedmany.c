/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * qedmany: what one process pays for many open images with asynchronous I/O.
 *
 *   qedmany [-n IMAGES] [-s SIZE] [-t writeback|none] [-i threads|io_uring|native] DIR
 *
 * Creates DIR/many-NNN.qed (qed_create, SIZE bytes, default 64 MiB) where missing, else reuses
 * them; opens all IMAGES (default 200) read-write (QED_OPEN_DIRECT with -t none); submits one
 * asynchronous 4 KiB read and one asynchronous 4 KiB write on each (the first submit starts the
 * image's queue with the library's defaults), waits for all with qed_aio_drain, and then,
 * with every image still open, prints the process's thread count and resident memory from
 * /proc/self/status:
 *
 *   Run completed in X seconds.     (open + submit + drain of all images)
 *   threads: N
 *   rss_kib: N
 *   hwm_kib: N                      (peak RSS so far)
 *
 * then closes all. -i threads|io_uring sets QED_IO_ENGINE before the first open, as qedbench
 * does.
 */
#define _GNU_SOURCE
#include <qed.h>

#include "benchutil.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

const char *bench_name = "qedmany";

static int failures;

static void done_cb(void *opaque, int ret)
{
    (void)opaque;
    if (ret < 0) {
        __atomic_add_fetch(&failures, 1, __ATOMIC_RELAXED);
        fprintf(stderr, "qedmany: request failed: %s\n", strerror(-ret));
    }
}

static long status_field(const char *name)
{
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) {
        return -1;
    }
    char line[256];
    size_t n = strlen(name);
    long v = -1;
    while (fgets(line, sizeof line, f)) {
        if (!strncmp(line, name, n) && line[n] == ':') {
            v = strtol(line + n + 1, NULL, 10);
            break;
        }
    }
    fclose(f);
    return v;
}

int main(int argc, char **argv)
{
    long n = 200;
    uint64_t size = 64u << 20;
    bool direct = false;
    const char *io_engine = NULL;
    int c;
    while ((c = getopt(argc, argv, "hn:s:t:i:")) != -1) {
        switch (c) {
        case 'n':
            n = parse_num(optarg, 1, 100000, "image count");
            break;
        case 's':
            size = (uint64_t)parse_num(optarg, 1, LONG_MAX, "size");
            break;
        case 't':
            if (!strcmp(optarg, "none")) {
                direct = true;
            } else if (strcmp(optarg, "writeback")) {
                die("Invalid cache mode (writeback or none)");
            }
            break;
        case 'i':
            if (!strcmp(optarg, "threads") || !strcmp(optarg, "io_uring")) {
                io_engine = optarg;
            } else if (strcmp(optarg, "native")) {
                die("Invalid aio option: %s", optarg);
            }
            break;
        case 'h':
            printf("usage: qedmany [-n IMAGES] [-s SIZE] [-t writeback|none] [-i AIO] DIR\n"
                   "Opens IMAGES (200) images with async I/O and prints threads and RSS; see\n"
                   "the comment at the top of benches/qedmany.c.\n");
            return EXIT_SUCCESS;
        default:
            return EXIT_FAILURE;
        }
    }
    if (optind != argc - 1) {
        die("Expecting one directory");
    }
    if (size < 2 * 65536 || size % 512) {
        die("size must be a multiple of 512 and at least 128 KiB");
    }
    const char *dir = argv[optind];
    select_io_engine(io_engine);
    /* a descriptor or more per image: raise the soft limit to the hard one */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }

    qed_image **imgs = calloc((size_t)n, sizeof *imgs);
    char *path = malloc(strlen(dir) + 32);
    void *buf;
    if (!imgs || !path || posix_memalign(&buf, 4096, 2 * 4096)) {
        die("out of memory");
    }
    memset(buf, 0x5a, 2 * 4096);
    for (long i = 0; i < n; i++) {
        sprintf(path, "%s/many-%03ld.qed", dir, i);
        if (access(path, F_OK) == 0) {
            continue;
        }
        struct qed_create_options co = QED_INIT(qed_create_options);
        co.size = size;
        if (qed_create(path, &co) < 0) {
            die("qed_create %s: %s", path, qed_last_error());
        }
    }

    double t1 = now_s();
    for (long i = 0; i < n; i++) {
        sprintf(path, "%s/many-%03ld.qed", dir, i);
        if (qed_open(path, QED_OPEN_RDWR | (direct ? QED_OPEN_DIRECT : 0), &imgs[i]) < 0) {
            die("Could not open '%s': %s (image %ld of %ld)", path, qed_last_error(), i + 1, n);
        }
    }
    for (long i = 0; i < n; i++) {
        /* two slots of one buffer: the read fills the first, the write sends the second */
        int r = qed_aio_read(imgs[i], 0, buf, 4096, done_cb, NULL);
        if (r < 0) {
            die("qed_aio_read on image %ld: %s", i, qed_last_error());
        }
        r = qed_aio_write(imgs[i], 65536, (char *)buf + 4096, 4096, done_cb, NULL);
        if (r < 0) {
            die("qed_aio_write on image %ld: %s", i, qed_last_error());
        }
    }
    for (long i = 0; i < n; i++) {
        if (qed_aio_drain(imgs[i]) < 0) {
            die("qed_aio_drain on image %ld: %s", i, qed_last_error());
        }
    }
    double t2 = now_s();
    long threads = status_field("Threads"), rss = status_field("VmRSS"), hwm = status_field("VmHWM");
    printf("Run completed in %3.3f seconds.\n", t2 - t1);
    printf("images: %ld\nthreads: %ld\nrss_kib: %ld\nhwm_kib: %ld\n", n, threads, rss, hwm);
    fflush(stdout);

    int ret = failures ? EXIT_FAILURE : EXIT_SUCCESS;
    for (long i = 0; i < n; i++) {
        if (qed_close(imgs[i]) < 0) {
            fprintf(stderr, "qedmany: qed_close image %ld: %s\n", i, qed_last_error());
            ret = EXIT_FAILURE;
        }
    }
    free(buf);
    free(path);
    free(imgs);
    return ret;
}
