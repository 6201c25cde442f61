/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/* qed_set_log_callback (levels, filtering, removal, no re-entry) and qed_get_stats (counts,
 * the size-prefix rule: a newer caller's tail untouched, bad sizes refused). */
#include "util.h"
#include <pthread.h>

struct log {
    pthread_mutex_t mu;
    int by_level[6];
    int bad_level;
    int opened, allocated, flushed, closed;
    int reentry; /* what qed_set_log_callback returned from inside the callback */
    int try_reentry;
};

static void on_log(void *opaque, int level, const char *msg)
{
    struct log *l = opaque;
    pthread_mutex_lock(&l->mu);
    if (level < QED_LOG_ERROR || level > QED_LOG_TRACE || msg == NULL)
        l->bad_level++;
    else
        l->by_level[level]++;
    if (strstr(msg, "opened read-write") != NULL)
        l->opened++;
    if (strstr(msg, "allocated 1 clusters at") != NULL)
        l->allocated++;
    if (strstr(msg, "flushing the image file") != NULL)
        l->flushed++;
    if (strstr(msg, ": closed") != NULL)
        l->closed++;
    int try_reentry = l->try_reentry;
    l->try_reentry = 0;
    pthread_mutex_unlock(&l->mu);
    if (try_reentry)
        l->reentry = qed_set_log_callback(QED_LOG_TRACE, NULL, NULL);
}

static void reset(struct log *l)
{
    pthread_mutex_lock(&l->mu);
    memset(l->by_level, 0, sizeof l->by_level);
    l->bad_level = l->opened = l->allocated = l->flushed = l->closed = 0;
    pthread_mutex_unlock(&l->mu);
}

/* Opens p read-write, writes 4 KiB at each of n fresh clusters, flushes; returns the handle. */
static qed_image *write_clusters(const char *p, int n)
{
    qed_image *img = NULL;
    CHECK_RET(qed_open(p, QED_OPEN_RDWR, &img), 0);
    uint8_t buf[4096];
    test_fill(buf, sizeof buf, 12);
    for (int i = 0; i < n; i++)
        CHECK_RET(qed_write(img, (uint64_t)i * 65536, buf, sizeof buf), 0);
    CHECK_RET(qed_flush(img), 0);
    return img;
}

int main(void)
{
    const char *p = test_path("log.qed");
    qed_create_options o = QED_INIT(qed_create_options);
    o.size = 1 << 30;
    CHECK_RET(qed_create(p, &o), 0);

    static struct log l = {.mu = PTHREAD_MUTEX_INITIALIZER};
    CHECK_RET(qed_set_log_callback(0, on_log, &l), -EINVAL);
    CHECK_RET(qed_set_log_callback(QED_LOG_TRACE + 1, on_log, &l), -EINVAL);
    CHECK_RET(qed_set_log_callback(QED_LOG_DEBUG, on_log, &l), 0);

    /* Debug: opens, allocations, flushes and closes arrive; trace does not. */
    qed_image *img = write_clusters(p, 3);
    uint8_t buf[4096];
    for (int i = 0; i < 3; i++)
        CHECK_RET(qed_read(img, (uint64_t)i * 65536, buf, sizeof buf), 0);

    qed_stats s;
    memset(&s, 0xff, sizeof s);
    s.struct_size = sizeof s;
    CHECK_RET(qed_get_stats(img, &s), 0);
    CHECK(s.struct_size == sizeof s);
    CHECK(s.reserved == 0);
    CHECK(s.write_requests == 3 && s.write_bytes == 3 * 4096);
    CHECK(s.clusters_allocated == 3 && s.l2_tables_allocated == 1);
    CHECK(s.read_requests == 3 && s.read_bytes == 3 * 4096);
    CHECK(s.l2_cache_hits >= 3 && s.l2_cache_misses == 0);
    CHECK(s.flush_requests == 1 && s.storage_flushes >= 1);
    CHECK(s.write_zeroes_requests == 0 && s.failed_requests == 0 && s.repairs == 0);
    CHECK_RET(qed_read(img, 1ull << 30, buf, sizeof buf), -EINVAL);
    CHECK_RET(qed_get_stats(img, &s), 0);
    CHECK(s.failed_requests == 1 && s.read_requests == 3);

    /* A caller built against a newer header: its struct is longer; the tail is not ours. */
    struct {
        qed_stats s;
        uint64_t newer_field;
    } big;
    memset(&big, 0, sizeof big);
    big.s.struct_size = sizeof big;
    big.newer_field = 0x5eed5eed5eed5eedull;
    CHECK_RET(qed_get_stats(img, &big.s), 0);
    CHECK(big.s.struct_size == sizeof big);
    CHECK(big.s.write_requests == 3);
    CHECK(big.newer_field == 0x5eed5eed5eed5eedull);

    /* An older, smaller layout (without the last counter) gets the fields it has. */
    memset(&s, 0, sizeof s);
    s.struct_size = sizeof s - 8;
    s.clusters_punched = 0x1234;
    CHECK_RET(qed_get_stats(img, &s), 0);
    CHECK(s.write_requests == 3 && s.clusters_punched == 0x1234);

    /* Sizes no release had are refused, and nothing is written. */
    memset(&s, 0, sizeof s);
    CHECK_ERR(qed_get_stats(img, &s), -EINVAL, "struct_size");
    s.struct_size = 6;
    CHECK_ERR(qed_get_stats(img, &s), -EINVAL, "struct_size");
    CHECK(s.write_requests == 0);
    CHECK_ERR(qed_get_stats(img, NULL), -EINVAL, "stats is NULL");
    s.struct_size = sizeof s;
    CHECK_ERR(qed_get_stats(NULL, &s), -EINVAL, "img is NULL");
    CHECK_RET(qed_close(img), 0);

    pthread_mutex_lock(&l.mu);
    CHECK(l.bad_level == 0);
    CHECK(l.opened == 1 && l.allocated == 3 && l.flushed >= 1 && l.closed == 1);
    CHECK(l.by_level[QED_LOG_TRACE] == 0);
    CHECK(l.by_level[QED_LOG_DEBUG] > 0 && l.by_level[QED_LOG_INFO] > 0);
    pthread_mutex_unlock(&l.mu);

    /* Info: debug reports are not delivered. */
    reset(&l);
    CHECK_RET(qed_set_log_callback(QED_LOG_INFO, on_log, &l), 0);
    img = write_clusters(p, 5);
    CHECK_RET(qed_close(img), 0);
    pthread_mutex_lock(&l.mu);
    CHECK(l.opened == 1 && l.closed == 1);
    CHECK(l.allocated == 0 && l.flushed == 0 && l.by_level[QED_LOG_DEBUG] == 0);
    /* The callback may not replace itself: that would wait for itself. */
    l.try_reentry = 1;
    l.reentry = 1;
    pthread_mutex_unlock(&l.mu);
    CHECK_RET(qed_open(p, 0, &img), 0);
    CHECK(l.reentry == -EDEADLK);
    CHECK_RET(qed_close(img), 0);

    /* Removed: the callback gets nothing more. */
    CHECK_RET(qed_set_log_callback(QED_LOG_TRACE, NULL, NULL), 0);
    reset(&l);
    img = write_clusters(p, 7);
    CHECK_RET(qed_close(img), 0);
    CHECK(l.by_level[QED_LOG_ERROR] + l.by_level[QED_LOG_INFO] + l.by_level[QED_LOG_DEBUG] == 0);

    CHECK(test_sh("qemu-img check -q '%s'", p) == 0);
    test_cleanup();
    return 0;
}
