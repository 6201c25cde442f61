/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/* What qed.h promises under "Fork, exec and signals": every descriptor the library opens is
 * close-on-exec (checked with fcntl, then across fork and exec), and library threads block
 * every signal. */
#define _GNU_SOURCE
#include "util.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_FD 4096

static void store_ret(void *opaque, int ret)
{
    *(int *)opaque = ret;
}

static void open_fds(unsigned char *set)
{
    for (int fd = 0; fd < MAX_FD; fd++) {
        set[fd] = fcntl(fd, F_GETFD) != -1;
    }
}

#ifdef __linux__
/* Checks SigBlk of every thread but the main one (this test starts none, so the others are the
 * library's; their names may not be set yet): all of signals 1..64 blocked. Returns how many. */
static int library_threads_blocking_all(void)
{
    DIR *d = opendir("/proc/self/task");
    CHECK(d != NULL);
    struct dirent *e;
    int n = 0;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') {
            continue;
        }
        char path[512], line[256], name[64] = "";
        snprintf(path, sizeof path, "/proc/self/task/%s/status", e->d_name);
        FILE *f = fopen(path, "r");
        if (f == NULL) {
            continue; /* the thread ended meanwhile */
        }
        unsigned long long blocked = 0;
        while (fgets(line, sizeof line, f) != NULL) {
            sscanf(line, "Name: %63s", name);
            sscanf(line, "SigBlk: %llx", &blocked);
        }
        fclose(f);
        if (atoi(e->d_name) != (int)getpid()) {
            /* Signals 1-31 and 34-60: SIGKILL and SIGSTOP cannot be blocked, glibc keeps its
             * two internal real-time signals (32, 33) out of any mask, and valgrind keeps the
             * last few for itself. */
            unsigned long long want = ((1ull << 60) - 1) & ~(3ull << 31) &
                                      ~(1ull << (SIGKILL - 1)) & ~(1ull << (SIGSTOP - 1));
            if ((blocked & want) != want) {
                fprintf(stderr, "thread %s (%s) blocks only %llx\n", e->d_name, name, blocked);
                exit(1);
            }
            n++;
        }
    }
    closedir(d);
    return n;
}
#endif

/* The exec'd child: the parent's library descriptors are gone, and an image opens. */
static int child(const char *base, char *fds)
{
    for (char *t = strtok(fds, ","); t != NULL; t = strtok(NULL, ",")) {
        if (fcntl(atoi(t), F_GETFD) != -1) {
            fprintf(stderr, "child: descriptor %s survived exec\n", t);
            return 1;
        }
    }
    qed_image *c = NULL;
    char r[4096];
    CHECK_RET(qed_open(base, QED_OPEN_FORCE_SHARE, &c), 0);
    CHECK_RET(qed_read(c, 0, r, sizeof r), 0);
    CHECK_RET(qed_close(c), 0);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 4 && strcmp(argv[1], "child") == 0) {
        return child(argv[2], argv[3]);
    }
    static unsigned char before[MAX_FD], after[MAX_FD];
    const char *base = test_path("base.qed");
    char top[4096];
    snprintf(top, sizeof top, "%s", test_path("top.qed"));
    test_create_qed(base, 1 << 24, NULL);
    test_create_qed(top, 1 << 24, "base.qed");

    /* Everything that opens descriptors: image, backing file, locks, the event-loop fd,
     * O_DIRECT's second descriptor, workers and the write-back timer. */
    open_fds(before);
    qed_aio_options ao = QED_INIT(qed_aio_options);
    ao.flags = QED_AIO_EVENT_LOOP;
    ao.workers = 2;
    qed_open_options o = QED_INIT(qed_open_options);
    o.flags = QED_OPEN_RDWR | QED_OPEN_DIRECT;
    o.aio = &ao;
    qed_image *img = NULL;
    int r = qed_open_ext(top, &o, &img);
    if (r == -EINVAL || r == -ENOTSUP) {
        /* tmpfs and some file systems refuse O_DIRECT; the descriptors are the same without. */
        o.flags = QED_OPEN_RDWR;
        r = qed_open_ext(top, &o, &img);
    }
    CHECK_RET(r, 0);
    char buf[4096];
    memset(buf, 0x3c, sizeof buf);
    /* The first write creates the L2 table (written at once); the second stages an entry,
     * which starts the write-back timer's thread. */
    CHECK_RET(qed_write(img, 1 << 20, buf, sizeof buf), 0);
    CHECK_RET(qed_write(img, (1 << 20) + 65536, buf, sizeof buf), 0);
    CHECK(qed_aio_get_fd(img) >= 0);
    /* The engine starts its threads as requests need them: a flush runs on a pool thread. */
    int flushed = 1;
    CHECK_RET(qed_aio_flush(img, store_ret, &flushed), 0);
    CHECK_RET(qed_aio_drain(img), 0);
    CHECK_RET(flushed, 0);
    open_fds(after);
    int new_fds = 0;
    for (int fd = 0; fd < MAX_FD; fd++) {
        if (after[fd] && !before[fd]) {
            new_fds++;
            int flags = fcntl(fd, F_GETFD);
            if (!(flags & FD_CLOEXEC)) {
                fprintf(stderr, "descriptor %d opened by libqed is not close-on-exec\n", fd);
                return 1;
            }
        }
    }
    CHECK(new_fds >= 3); /* image, backing file, event fd at least */

#ifdef __linux__
    /* a pool thread and the write-back timer (and, with io_uring, the ring's thread) */
    CHECK(library_threads_blocking_all() >= 2);
#endif

    /* fork() and exec() of this program: none of the library's descriptors reach the new
     * program, which opens an image of its own (not the one the parent holds read-write). */
    char fds[1024] = "";
    for (int fd = 0; fd < MAX_FD; fd++) {
        if (after[fd] && !before[fd] && strlen(fds) < sizeof fds - 16) {
            snprintf(fds + strlen(fds), sizeof fds - strlen(fds), "%d,", fd);
        }
    }
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        /* argv[0], not /proc/self/exe, which is valgrind itself under valgrind. */
        execl(argv[0], argv[0], "child", base, fds, (char *)NULL);
        _exit(127);
    }
    int status = 0;
    CHECK(waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);

    CHECK_RET(qed_close(img), 0);
    CHECK(test_sh("qemu-img check -q %s", top) == 0);
    test_cleanup();
    return 0;
}
