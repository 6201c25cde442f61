/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/* Process death: a child process (this program re-executed, so that under valgrind it runs
 * natively) opens a real image file read-write and runs asynchronous writes (qed_aio_write,
 * many in flight, allocating and overwriting, random sector ranges; each 512-byte sector is
 * stamped with its write's id and sector number) and periodic qed_aio_flush, reporting over a
 * pipe each write before it is submitted, each completion and each flush (with the last write
 * id it covers). The parent SIGKILLs it at a random time, early or late, then checks the image
 * with qemu-img (no corruption), reopens it read-write (repair runs), requires qed_check to find
 * 0 corruptions and 0 leaks, and reads every sector: each holds its old value or a stamp of a
 * write that covered it and was submitted; every write covered by a completed flush is there;
 * without a backing file, so is every write whose completion the child reported (the kernel
 * keeps completed writes when a process dies, as QEMU relies on). With a raw backing file only
 * flushed writes are promised; the test prints how many completed, unflushed writes survived.
 *
 * QED_KILL_TRIALS=N sets the trials per setup (default 150, 30 under valgrind);
 * QED_KILL_SEED=S changes the random choices (kill delays, child's ranges). */
#define _XOPEN_SOURCE 700 /* realpath */
#include "util.h"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define SECTOR 512u
#define DISK (8u << 20)            /* virtual size */
#define NSECT (DISK / SECTOR)
#define DEPTH 48                   /* writes in flight */
#define MAX_SECT_PER_WRITE 32      /* up to 16 KiB */
#define FLUSH_EVERY 24             /* writes between flushes */
#define TAG 0x51454444454154ull    /* "QEDDEAT": marks a stamped sector */

/* A record on the pipe; writes of 16 bytes to a pipe are atomic. */
enum { R_SUBMIT = 1, R_DONE, R_FLUSHED, R_ERROR };
typedef struct {
    uint32_t type;
    uint32_t id;       /* write id; for R_FLUSHED the last id covered (+1, 0: none) */
    uint32_t sector;   /* R_SUBMIT: first sector; R_ERROR: -ret */
    uint32_t nsect;
} record;

static uint64_t rng_state;
static uint64_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

/* The content write `id` puts in guest sector `s` during trial `trial`. */
static void stamp(uint8_t *out, uint32_t trial, uint32_t id, uint32_t s)
{
    uint64_t h[3] = {TAG ^ ((uint64_t)trial << 8), id, s};
    memcpy(out, h, sizeof h);
    test_fill(out + sizeof h, SECTOR - sizeof h, id * 2654435761u ^ s ^ trial << 20);
}

/* The old content of sector `s`: zeros, or the backing file's stamp. */
static void old_value(uint8_t *out, int backing, uint32_t s)
{
    memset(out, 0, SECTOR);
    if (backing) {
        memcpy(out, "BASE", 4);
        memcpy(out + 8, &s, sizeof s);
        test_fill(out + 16, SECTOR - 16, 0xba5e0000u + s);
    }
}

/* ---- The child -------------------------------------------------------------------------- */

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int fd;
    int inflight;
    uint8_t busy[NSECT]; /* sectors of writes in flight: overlapping writes are never in flight
                            together, so the writes covering a sector complete in id order */
} C;

typedef struct {
    uint32_t id, sector, nsect;
    uint8_t *buf;
    int flush;
} creq;

static void send_rec(uint32_t type, uint32_t id, uint32_t sector, uint32_t nsect)
{
    record r = {type, id, sector, nsect};
    if (write(C.fd, &r, sizeof r) != (ssize_t)sizeof r) {
        _exit(3);
    }
}

static void child_done(void *opaque, int ret)
{
    creq *q = opaque;
    if (ret != 0) {
        send_rec(R_ERROR, q->id, (uint32_t)-ret, q->flush);
    } else if (q->flush) {
        send_rec(R_FLUSHED, q->id, 0, 0);
    } else {
        send_rec(R_DONE, q->id, 0, 0);
    }
    pthread_mutex_lock(&C.mu);
    if (!q->flush) {
        memset(C.busy + q->sector, 0, q->nsect);
    }
    C.inflight--;
    pthread_cond_broadcast(&C.cv);
    pthread_mutex_unlock(&C.mu);
    free(q->buf);
    free(q);
}

static int child_main(const char *path, int fd, uint32_t trial, uint64_t seed)
{
    C.fd = fd;
    pthread_mutex_init(&C.mu, NULL);
    pthread_cond_init(&C.cv, NULL);
    rng_state = seed | 1;
    qed_image *img;
    int ret = qed_open(path, QED_OPEN_RDWR, &img);
    if (ret != 0) {
        fprintf(stderr, "child: qed_open: %s\n", qed_last_error());
        send_rec(R_ERROR, 0, (uint32_t)-ret, 2);
        return 2;
    }
    time_t give_up = time(NULL) + 60; /* the parent kills us long before */
    uint32_t id = 0;
    while (time(NULL) < give_up) {
        if (id % FLUSH_EVERY == FLUSH_EVERY - 1) {
            /* A flush covers every write submitted before it: ids below `id`. */
            creq *f = calloc(1, sizeof *f);
            if (!f) {
                return 2;
            }
            f->flush = 1;
            f->id = id;
            pthread_mutex_lock(&C.mu);
            C.inflight++;
            pthread_mutex_unlock(&C.mu);
            ret = qed_aio_flush(img, child_done, f);
            if (ret != 0) {
                send_rec(R_ERROR, id, (uint32_t)-ret, 1);
                return 2;
            }
        }
        creq *q = calloc(1, sizeof *q);
        if (!q) {
            return 2;
        }
        pthread_mutex_lock(&C.mu);
        while (C.inflight >= DEPTH) {
            pthread_cond_wait(&C.cv, &C.mu);
        }
        /* A range clear of the writes in flight; half of them near the start of the disk, so
         * that many overwrite allocated clusters. */
        uint32_t s, n;
        for (;;) {
            n = 1 + (uint32_t)(rnd() % MAX_SECT_PER_WRITE);
            uint32_t span = rnd() % 2 ? NSECT : NSECT / 8;
            s = (uint32_t)(rnd() % (span - n));
            uint32_t k = 0;
            while (k < n && !C.busy[s + k]) {
                k++;
            }
            if (k == n) {
                break;
            }
        }
        memset(C.busy + s, 1, n);
        C.inflight++;
        pthread_mutex_unlock(&C.mu);
        q->id = id;
        q->sector = s;
        q->nsect = n;
        q->buf = malloc((size_t)n * SECTOR);
        if (!q->buf) {
            return 2;
        }
        for (uint32_t k = 0; k < n; k++) {
            stamp(q->buf + (size_t)k * SECTOR, trial, id, s + k);
        }
        /* Announced before the submit: the parent knows every write that may have landed. */
        send_rec(R_SUBMIT, id, s, n);
        ret = qed_aio_write(img, (uint64_t)s * SECTOR, q->buf, (size_t)n * SECTOR, child_done, q);
        if (ret != 0) {
            send_rec(R_ERROR, id, (uint32_t)-ret, 0);
            return 2;
        }
        id++;
    }
    return 2;
}

/* ---- The parent ------------------------------------------------------------------------- */

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

typedef struct {
    record *r;
    size_t n, cap;
} records;

static void rec_add(records *rs, const record *r)
{
    if (rs->n == rs->cap) {
        rs->cap = rs->cap ? rs->cap * 2 : 4096;
        rs->r = realloc(rs->r, rs->cap * sizeof *rs->r);
        CHECK(rs->r != NULL);
    }
    rs->r[rs->n++] = *r;
}

typedef struct {
    long trials, early, writes_submitted, writes_done, flushes, unflushed_done, unflushed_survived;
    long failures;
} stats;

static const char *self_exe;

/* Runs one child and kills it after `delay` seconds; returns its records. */
static void run_child(const char *path, uint32_t trial, uint64_t seed, double delay, records *rs)
{
    int p[2];
    CHECK(pipe(p) == 0);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        close(p[0]);
        char fdarg[16], trialarg[16], seedarg[32];
        snprintf(fdarg, sizeof fdarg, "%d", p[1]);
        snprintf(trialarg, sizeof trialarg, "%u", trial);
        snprintf(seedarg, sizeof seedarg, "%llu", (unsigned long long)seed);
        execl(self_exe, self_exe, "--child", path, fdarg, trialarg, seedarg, (char *)NULL);
        _exit(127);
    }
    close(p[1]);
    double deadline = now() + delay;
    uint8_t buf[16 * sizeof(record)];
    size_t have = 0;
    int killed = 0;
    for (;;) {
        double left = deadline - now();
        if (!killed && left <= 0) {
            CHECK(kill(pid, SIGKILL) == 0);
            killed = 1;
        }
        struct pollfd pfd = {p[0], POLLIN, 0};
        int pr = poll(&pfd, 1, killed ? -1 : (int)(left * 1000) + 1);
        if (pr < 0 && errno == EINTR) {
            continue;
        }
        CHECK(pr >= 0);
        if (pr == 0) {
            continue;
        }
        ssize_t r = read(p[0], buf + have, sizeof buf - have);
        if (r < 0 && errno == EINTR) {
            continue;
        }
        CHECK(r >= 0);
        if (r == 0) {
            break; /* the child is gone and the pipe drained */
        }
        have += (size_t)r;
        size_t k = 0;
        for (; k + sizeof(record) <= have; k += sizeof(record)) {
            record rec;
            memcpy(&rec, buf + k, sizeof rec);
            rec_add(rs, &rec);
        }
        memmove(buf, buf + k, have - k);
        have -= k;
    }
    close(p[0]);
    int st;
    CHECK(waitpid(pid, &st, 0) == pid);
    if (!(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL)) {
        fprintf(stderr, "trial %u: the child ended by itself (status %#x) before the kill\n", trial, st);
        exit(1);
    }
    CHECK(have == 0);
}

static void fail_trial(stats *s, uint32_t trial, const char *backing, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 4, 5)))
#endif
    ;

static void fail_trial(stats *s, uint32_t trial, const char *backing, const char *fmt, ...)
{
    if (s->failures++ < 20) {
        va_list ap;
        va_start(ap, fmt);
        fprintf(stderr, "FAIL (%s, trial %u): ", backing, trial);
        vfprintf(stderr, fmt, ap);
        fprintf(stderr, "\n");
        va_end(ap);
    }
}

static void trial_once(int backing, uint32_t trial, double delay, stats *st, uint8_t *disk)
{
    const char *setup = backing ? "raw backing file" : "no backing file";
    const char *path = test_path(backing ? "kill-b.qed" : "kill.qed");
    qed_create_options o = QED_INIT(qed_create_options);
    if (backing) {
        o.backing_file = "base.raw"; /* 64 KiB clusters: copy-on-write around partial writes */
        o.backing_format = "raw";
    } else {
        o.size = DISK;           /* 4 KiB clusters, two-cluster tables (QEMU refuses one-cluster
                                  * tables): two L2 tables */
        o.cluster_size = 4096;
        o.table_size = 2;
    }
    CHECK_RET(qed_create(path, &o), 0);

    records rs = {NULL, 0, 0};
    run_child(path, trial, 0x9e3779b97f4a7c15ull * (trial + 1) ^ (uint64_t)backing, delay, &rs);
    st->trials++;

    /* What the child said: the range of every write it may have submitted, which completed, and
     * the last write covered by a completed flush. */
    uint32_t nw = 0;
    for (size_t i = 0; i < rs.n; i++) {
        if (rs.r[i].type == R_SUBMIT) {
            CHECK(rs.r[i].id == nw);
            nw++;
        }
    }
    uint32_t *first = calloc(nw + 1, sizeof *first), *count = calloc(nw + 1, sizeof *count);
    uint8_t *done = calloc(nw + 1, 1);
    CHECK(first && count && done);
    int64_t flushed = -1; /* writes with id <= flushed are covered by a completed flush */
    for (size_t i = 0; i < rs.n; i++) {
        const record *r = &rs.r[i];
        switch (r->type) {
        case R_SUBMIT:
            first[r->id] = r->sector;
            count[r->id] = r->nsect;
            break;
        case R_DONE:
            CHECK(r->id < nw);
            done[r->id] = 1;
            st->writes_done++;
            break;
        case R_FLUSHED:
            if ((int64_t)r->id - 1 > flushed) {
                flushed = (int64_t)r->id - 1;
            }
            st->flushes++;
            break;
        default:
            fail_trial(st, trial, setup, "the child reported error %d (%s) for %s %u", -(int)r->sector,
                       qed_strerror(-(int)r->sector), r->nsect == 1 ? "flush" : r->nsect == 2 ? "open" : "write", r->id);
        }
    }
    st->writes_submitted += nw;
    if (nw == 0) {
        st->early++;
    }

    /* QEMU's own verdict on the image as the dead process left it: leaks at most. */
    int q = test_sh("qemu-img check -q -f qed '%s' >/dev/null 2>&1", path);
    if (q != 0 && q != 3) {
        char out[2048];
        test_sh_out(out, sizeof out, "qemu-img check -f qed '%s' 2>&1", path);
        struct stat sb;
        CHECK(stat(path, &sb) == 0);
        fail_trial(st, trial, setup, "qemu-img check on the killed image exited %d (file length %lld, %s a multiple of "
                   "the cluster size):\n%s", q, (long long)sb.st_size,
                   sb.st_size % (backing ? 65536 : 4096) ? "not" : "", out);
    }

    /* Reopen read-write: the repair runs if the need-check bit is set. */
    qed_image *img;
    int ret = qed_open(path, QED_OPEN_RDWR, &img);
    if (ret != 0) {
        fail_trial(st, trial, setup, "the read-write reopen failed: %s", qed_last_error());
        goto out;
    }
    qed_check_result cr = QED_INIT(qed_check_result);
    ret = qed_check(img, QED_FIX_LEAKS | QED_FIX_ERRORS, &cr);
    if (ret != 0 || cr.corruptions || cr.leaks || cr.check_errors) {
        fail_trial(st, trial, setup, "qed_check with repair: ret %d, %llu corruptions, %llu leaks, %llu check errors (%s)",
                   ret, (unsigned long long)cr.corruptions, (unsigned long long)cr.leaks,
                   (unsigned long long)cr.check_errors, qed_last_error());
    }
    CHECK_RET(qed_read(img, 0, disk, DISK), 0);
    CHECK_RET(qed_close(img), 0);
    if (test_sh("qemu-img check -q -f qed '%s'", path) != 0) {
        fail_trial(st, trial, setup, "qemu-img check after our repair and close is not clean");
    }

    /* Per sector: the newest write covering it that is promised (covered by a completed flush,
     * or, without a backing file, completed); the sector must hold it or a later write. */
    int64_t *sure = malloc(NSECT * sizeof *sure);
    CHECK(sure != NULL);
    for (uint32_t s = 0; s < NSECT; s++) {
        sure[s] = -1;
    }
    for (uint32_t id = 0; id < nw; id++) {
        if ((int64_t)id <= flushed || (!backing && done[id])) {
            for (uint32_t k = 0; k < count[id]; k++) {
                sure[first[id] + k] = id;
            }
        }
    }
    uint8_t want[SECTOR];
    int64_t *holds = malloc(NSECT * sizeof *holds); /* the write id a sector holds, -1: old */
    CHECK(holds != NULL);
    int reported = 0;
    for (uint32_t s = 0; s < NSECT; s++) {
        const uint8_t *got = disk + (size_t)s * SECTOR;
        uint64_t h[3];
        memcpy(h, got, sizeof h);
        holds[s] = -2;
        old_value(want, backing, s);
        if (memcmp(got, want, SECTOR) == 0) {
            holds[s] = -1;
        } else if (h[0] == (TAG ^ ((uint64_t)trial << 8)) && h[1] < nw && h[2] == s && s >= first[h[1]] &&
                   s < first[h[1]] + count[h[1]]) {
            stamp(want, trial, (uint32_t)h[1], s);
            if (memcmp(got, want, SECTOR) == 0) {
                holds[s] = (int64_t)h[1];
            }
        }
        if (reported) {
            continue;
        }
        if (holds[s] == -2) {
            fail_trial(st, trial, setup, "sector %u holds neither its old value nor a write that covered it", s);
            reported = 1;
        } else if (holds[s] < sure[s]) {
            uint32_t w = (uint32_t)sure[s];
            char what[48] = "its old value";
            if (holds[s] >= 0) {
                snprintf(what, sizeof what, "write %lld", (long long)holds[s]);
            }
            fail_trial(st, trial, setup, "sector %u holds %s, but write %u (sectors %u+%u) %s: acknowledged data lost",
                       s, what, w, first[w], count[w],
                       (int64_t)w <= flushed ? "was covered by a completed flush" : "had completed (no backing file)");
            reported = 1;
        }
    }
    /* Completed, unflushed writes that survived whole (the sector holds them or a later one). */
    for (uint32_t id = 0; id < nw; id++) {
        if (done[id] && (int64_t)id > flushed) {
            st->unflushed_done++;
            int all = 1;
            for (uint32_t k = 0; k < count[id] && all; k++) {
                all = holds[first[id] + k] >= (int64_t)id;
            }
            st->unflushed_survived += all;
        }
    }
    free(sure);
    free(holds);
out:
    free(first);
    free(count);
    free(done);
    free(rs.r);
}

int main(int argc, char **argv)
{
    if (argc == 6 && strcmp(argv[1], "--child") == 0) {
        return child_main(argv[2], atoi(argv[3]), (uint32_t)strtoul(argv[4], NULL, 10),
                          strtoull(argv[5], NULL, 10));
    }
    CHECK(argc >= 1 && argv[0][0] != 0);
    static char exe[4096];
    CHECK(realpath(argv[0], exe) != NULL);
    self_exe = exe;
    int vg = test_under_valgrind();
    const char *e = getenv("QED_KILL_TRIALS");
    long trials = e ? atol(e) : vg ? 30 : 150;
    e = getenv("QED_KILL_SEED");
    rng_state = e ? strtoull(e, NULL, 0) | 1 : 0x2545f4914f6cdd1dull;
    uint64_t parent_seed = rng_state;

    /* The raw backing file: every sector stamped, so a lost copy-on-write shows. */
    {
        uint8_t *base = malloc(DISK);
        CHECK(base != NULL);
        for (uint32_t s = 0; s < NSECT; s++) {
            old_value(base + (size_t)s * SECTOR, 1, s);
        }
        test_write_file(test_path("base.raw"), base, DISK);
        free(base);
    }
    uint8_t *disk = malloc(DISK);
    CHECK(disk != NULL);
    stats st[2];
    memset(st, 0, sizeof st);
    uint32_t trial = 0;
    double t0 = now();
    for (int backing = 0; backing < 2; backing++) {
        for (long i = 0; i < trials; i++) {
            rng_state = parent_seed ^ (uint64_t)(trial + 1) * 0x9e3779b97f4a7c15ull;
            (void)rnd();
            /* A third of the kills land in the first 3 ms (often before or during the open), a
             * third within 40 ms, a third up to 250 ms in. */
            double delay;
            switch (i % 3) {
            case 0: delay = (double)(rnd() % 3000) / 1e6; break;
            case 1: delay = 0.003 + (double)(rnd() % 37000) / 1e6; break;
            default: delay = 0.040 + (double)(rnd() % 210000) / 1e6; break;
            }
            trial_once(backing, trial++, delay, &st[backing], disk);
        }
        stats *s = &st[backing];
        printf("%s: %ld trials (%ld killed before any write), %ld writes submitted, %ld completed, %ld flushes; "
               "%ld completed but unflushed writes, %ld survived whole; %ld failures\n",
               backing ? "raw backing file" : "no backing file", s->trials, s->early, s->writes_submitted,
               s->writes_done, s->flushes, s->unflushed_done, s->unflushed_survived, s->failures);
    }
    printf("%ld trials in %.1f s (seed %#llx)\n", st[0].trials + st[1].trials, now() - t0,
           (unsigned long long)parent_seed);
    free(disk);
    /* Kills must have landed both before any write and in the middle of many. */
    CHECK(st[0].early > 0 && st[0].writes_done > 0 && st[1].writes_done > 0 && st[0].flushes > 0);
    test_cleanup();
    return st[0].failures + st[1].failures != 0;
}
