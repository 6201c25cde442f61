/* SPDX-License-Identifier: MIT OR Apache-2.0 */
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

/* Open options with only `flags` set, for calls that take a `const qed_open_options *`. */
#define OPEN_OPTS(f) (&(qed_open_options){.struct_size = sizeof(qed_open_options), .flags = (f)})

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
/* Grows the heap buffer *data (length *len, capacity *cap) to at least want bytes, the new
 * ones zero; never shrinks. Aborts the test when out of memory. */
void test_grow(uint8_t **data, size_t *len, size_t *cap, size_t want);
/* Fills buf with a pattern derived from seed. */
void test_fill(uint8_t *buf, size_t len, uint32_t seed);

/* Expects call == want and qed_last_error() to contain the substring `needle`. */
#define CHECK_ERR(call, want, needle)                                                    \
    do {                                                                                 \
        CHECK_RET(call, want);                                                           \
        if (strstr(qed_last_error(), (needle)) == NULL) {                                \
            fprintf(stderr, "%s:%d: %s: last error \"%s\" does not mention \"%s\"\n",     \
                    __FILE__, __LINE__, #call, qed_last_error(), (needle));              \
            exit(1);                                                                     \
        }                                                                                \
    } while (0)

/* Soft checks: report and count the failure, and carry on (for tables of independent cases,
 * so one failure does not hide the others). main returns test_failures != 0. */
extern int test_failures;
#define EXPECT(cond)                                                                     \
    do {                                                                                 \
        if (!(cond)) {                                                                   \
            fprintf(stderr, "%s:%d: EXPECT failed: %s (last error: %s)\n", __FILE__,     \
                    __LINE__, #cond, qed_last_error());                                  \
            test_failures++;                                                             \
        }                                                                                \
    } while (0)
/* Expects call == want and, if needle is not NULL, qed_last_error() to contain it. */
#define EXPECT_ERR(call, want, needle)                                                   \
    do {                                                                                 \
        int r_ = (call);                                                                 \
        const char *n_ = (needle);                                                       \
        if (r_ != (want)) {                                                              \
            fprintf(stderr, "%s:%d: %s returned %d (%s), expected %d; last error: %s\n", \
                    __FILE__, __LINE__, #call, r_, qed_strerror(r_), (want),             \
                    qed_last_error());                                                   \
            test_failures++;                                                             \
        } else if (n_ != NULL && strstr(qed_last_error(), n_) == NULL) {                 \
            fprintf(stderr, "%s:%d: %s: last error \"%s\" does not mention \"%s\"\n",     \
                    __FILE__, __LINE__, #call, qed_last_error(), n_);                    \
            test_failures++;                                                             \
        }                                                                                \
    } while (0)

/* Like test_sh, but captures up to outsz-1 bytes of the command's stdout in out (NUL-terminated). */
int test_sh_out(char *out, size_t outsz, const char *fmt, ...);
/* Reads a whole file into a malloc'd buffer (NUL-terminated past *len); NULL if it cannot. */
uint8_t *test_read_file(const char *path, size_t *len);
/* Replaces the file at path with len bytes of buf; aborts the test on failure. */
void test_write_file(const char *path, const void *buf, size_t len);
/* Writes len bytes at offset of an existing file (which may grow); aborts on failure. */
void test_pwrite_file(const char *path, const void *buf, size_t len, uint64_t offset);
/* Index of the first differing byte of a and b, or -1 if the len bytes are equal. */
long test_first_diff(const uint8_t *a, const uint8_t *b, size_t len);
/* Whether len bytes of buf all equal v. */
int test_all(const uint8_t *buf, size_t len, uint8_t v);
/* Whether the test runs under valgrind (QED_TEST_VALGRIND, set by the valgrind test setup, or
 * valgrind's own client request), so that it can do less work there, never skip. */
int test_under_valgrind(void);
/* Creates a QED image of `size` bytes at `path` with the default geometry, over the QED image
 * `backing` (a name relative to path's folder), or over nothing when it is NULL. */
void test_create_qed(const char *path, uint64_t size, const char *backing);

#endif
