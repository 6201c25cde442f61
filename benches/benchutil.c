/* SPDX-License-Identifier: MIT OR Apache-2.0 */
#define _GNU_SOURCE
#include "benchutil.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "%s: ", bench_name);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(EXIT_FAILURE);
}

double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

long parse_num(const char *s, long min, long max, const char *what)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 0);
    long long mult = 1;
    switch (*end) {
    case 'k': case 'K': mult = 1024; end++; break;
    case 'm': case 'M': mult = 1024 * 1024; end++; break;
    case 'g': case 'G': mult = 1024 * 1024 * 1024; end++; break;
    default: break;
    }
    if (errno || end == s || *end || v < min || v > max / mult) {
        die("Invalid %s specified: %s", what, s);
    }
    return (long)(v * mult);
}

void select_io_engine(const char *engine)
{
    if (engine != NULL && setenv("QED_IO_ENGINE", engine, 1) < 0) {
        die("setenv: %s", strerror(errno));
    }
}
