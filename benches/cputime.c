/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * cputime: runs a command and reports the CPU time it used.
 *
 *   cputime OUTFILE COMMAND [ARG...]
 *
 * Runs COMMAND with its standard streams untouched, waits for it with wait4() and writes one
 * line "USER_S SYS_S MAXRSS_KIB" to OUTFILE: the child's user and system CPU seconds and its
 * peak resident set, including the descendants it waited for (wait4 reports RUSAGE_BOTH), so
 * `cputime F timeout 60 cmd` counts cmd too. The exit status is the command's (128 + signal
 * number when it was killed; 127 when it could not be started). scripts/bench uses it for its
 * CPU columns, as /usr/bin/time is not always installed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: cputime OUTFILE COMMAND [ARG...]\n");
        return 2;
    }
    pid_t pid = fork();
    if (pid < 0) {
        fprintf(stderr, "cputime: fork: %s\n", strerror(errno));
        return 127;
    }
    if (pid == 0) {
        execvp(argv[2], &argv[2]);
        fprintf(stderr, "cputime: %s: %s\n", argv[2], strerror(errno));
        _exit(127);
    }
    int status;
    struct rusage ru;
    while (wait4(pid, &status, 0, &ru) < 0) {
        if (errno != EINTR) {
            fprintf(stderr, "cputime: wait4: %s\n", strerror(errno));
            return 127;
        }
    }
    FILE *f = fopen(argv[1], "w");
    if (!f) {
        fprintf(stderr, "cputime: %s: %s\n", argv[1], strerror(errno));
        return 127;
    }
    fprintf(f, "%ld.%06ld %ld.%06ld %ld\n", (long)ru.ru_utime.tv_sec, (long)ru.ru_utime.tv_usec,
            (long)ru.ru_stime.tv_sec, (long)ru.ru_stime.tv_usec, ru.ru_maxrss);
    if (fclose(f) != 0) {
        fprintf(stderr, "cputime: %s: %s\n", argv[1], strerror(errno));
        return 127;
    }
    if (WIFSIGNALED(status)) {
        return 128 + WTERMSIG(status);
    }
    return WEXITSTATUS(status);
}
