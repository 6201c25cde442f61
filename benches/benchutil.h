/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/* What the benchmark tools share: fatal errors, the clock, number arguments and the choice of
 * libqed's I/O engine. */
#ifndef QED_BENCHUTIL_H
#define QED_BENCHUTIL_H

/* The tool's name, for messages ("qedbench"); each tool defines it. */
extern const char *bench_name;

/* Prints "NAME: message" on stderr and exits with failure. */
void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

/* Seconds on the monotonic clock. */
double now_s(void);

/* A number with an optional k/m/g suffix (powers of 1024), from `min` to `max`; dies with
 * "Invalid WHAT specified" otherwise. */
long parse_num(const char *s, long min, long max, const char *what);

/* Sets QED_IO_ENGINE to `engine` (threads, io_uring) before the first open; NULL leaves it. */
void select_io_engine(const char *engine);

#endif
