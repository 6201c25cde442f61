/* Shared helpers for the C API tests: CHECK() that survives NDEBUG, temp dirs, shell-outs. */
#ifndef QED_TEST_UTIL_H
#define QED_TEST_UTIL_H

#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <qed.h>

#define CHECK(cond)                                                                      \
    do {                                                                                 \
        if (!(cond)) {                                                                   \
            fprintf(stderr, "%s:%d: CHECK failed: %s (last error: %s)\n", __FILE__,      \
                    __LINE__, #cond, qed_last_error());                                  \
            exit(1);                                                                     \
        }                                                                                \
    } while (0)

/* Expects call == want (0 or -errno), printing the library's message otherwise. */
#define CHECK_RET(call, want)                                                            \
    do {                                                                                 \
        int r_ = (call);                                                                 \
        if (r_ != (want)) {                                                              \
            fprintf(stderr, "%s:%d: %s returned %d (%s), expected %d; last error: %s\n", \
                    __FILE__, __LINE__, #call, r_, qed_strerror(r_), (want),             \
                    qed_last_error());                                                   \
            exit(1);                                                                     \
        }                                                                                \
    } while (0)

/* A fresh temporary directory (removed by test_cleanup). */
const char *test_tmpdir(void);
/* test_tmpdir()/name in a static buffer (one of a few rotating buffers). */
const char *test_path(const char *name);
/* Runs a shell command; returns its exit status (or -1). */
int test_sh(const char *fmt, ...);
/* Removes the temporary directory. */
void test_cleanup(void);
/* Fills buf with a pattern derived from seed. */
void test_fill(uint8_t *buf, size_t len, uint32_t seed);

#endif
