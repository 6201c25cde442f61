/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/* Per-request write flags on caller storage (qed_io_ops) that records the order of its write
 * and flush callbacks: a QED_REQ_FUA write that allocates returns only after a flush that
 * follows its data write and its table writes; an unknown flag is refused with -ENOTSUP, a
 * message naming the bits, and nothing written; qed_aio_write_flags with QED_REQ_FUA
 * completes with 0 and its data reads back. */
#include "util.h"

#include <pthread.h>

#define CS 4096u
#define MAX_OPS 256

typedef struct {
    char kind; /* 'W' write, 'F' flush */
    uint64_t offset;
    size_t len;
    int is_data; /* the write carries the test's data */
} op;

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    uint8_t *data;
    size_t len, cap;
    op ops[MAX_OPS];
    int nops;
    const uint8_t *pattern; /* the data under test, CS bytes */
    int aio_done, aio_ret;
} mem;

static void grow(mem *m, size_t len)
{
    test_grow(&m->data, &m->len, &m->cap, len);
}

static void record(mem *m, char kind, uint64_t offset, size_t len, int is_data)
{
    CHECK(m->nops < MAX_OPS);
    m->ops[m->nops++] = (op){kind, offset, len, is_data};
}

static int m_pread(void *opaque, void *buf, size_t len, uint64_t offset)
{
    mem *m = opaque;
    pthread_mutex_lock(&m->mu);
    size_t n = offset < m->len ? m->len - (size_t)offset : 0;
    n = n < len ? n : len;
    if (n) {
        memcpy(buf, m->data + offset, n);
    }
    memset((uint8_t *)buf + n, 0, len - n);
    pthread_mutex_unlock(&m->mu);
    return 0;
}

static int m_pwrite(void *opaque, const void *buf, size_t len, uint64_t offset)
{
    mem *m = opaque;
    pthread_mutex_lock(&m->mu);
    grow(m, (size_t)offset + len);
    memcpy(m->data + offset, buf, len);
    int is_data = m->pattern && len == CS && memcmp(buf, m->pattern, CS) == 0;
    record(m, 'W', offset, len, is_data);
    pthread_mutex_unlock(&m->mu);
    return 0;
}

static int m_flush(void *opaque)
{
    mem *m = opaque;
    pthread_mutex_lock(&m->mu);
    record(m, 'F', 0, 0, 0);
    pthread_mutex_unlock(&m->mu);
    return 0;
}

static int m_get_length(void *opaque, uint64_t *len)
{
    mem *m = opaque;
    pthread_mutex_lock(&m->mu);
    *len = m->len;
    pthread_mutex_unlock(&m->mu);
    return 0;
}

static int m_set_length(void *opaque, uint64_t len)
{
    mem *m = opaque;
    pthread_mutex_lock(&m->mu);
    if (len > m->len) {
        grow(m, (size_t)len);
    } else {
        m->len = (size_t)len;
    }
    pthread_mutex_unlock(&m->mu);
    return 0;
}

static const qed_io_ops OPS = {sizeof(qed_io_ops), m_pread, m_pwrite, m_flush, m_get_length, m_set_length, NULL};

static void aio_cb(void *opaque, int ret)
{
    mem *m = opaque;
    pthread_mutex_lock(&m->mu);
    m->aio_ret = ret;
    m->aio_done++;
    pthread_cond_broadcast(&m->cv);
    pthread_mutex_unlock(&m->mu);
}

int main(void)
{
    static mem m;
    CHECK(pthread_mutex_init(&m.mu, NULL) == 0);
    CHECK(pthread_cond_init(&m.cv, NULL) == 0);
    qed_create_options o = QED_INIT(qed_create_options);
    o.size = 16 << 20;
    o.cluster_size = CS;
    o.table_size = 2;
    CHECK_RET(qed_create_with_io(&OPS, &m, &o), 0);
    const uint64_t l1 = CS, l1_end = CS + 2 * CS; /* the L1 table: clusters 1 and 2 */

    qed_image *img;
    CHECK_RET(qed_open_with_io(&OPS, &m, OPEN_OPTS(QED_OPEN_RDWR), &img), 0);
    uint8_t buf[CS], back[CS];
    test_fill(buf, CS, 15);
    m.pattern = buf;
    m.nops = 0;

    /* A FUA write into a fresh image: data cluster, new L2 table, L1 entry, then a flush. */
    CHECK_RET(qed_write_flags(img, 3 * CS, buf, CS, QED_REQ_FUA), 0);
    pthread_mutex_lock(&m.mu);
    int data = -1, l2 = -1, l1w = -1, last_flush = -1;
    for (int i = 0; i < m.nops; i++) {
        const op *p = &m.ops[i];
        if (p->kind == 'F') {
            last_flush = i;
        } else if (p->is_data) {
            data = i;
        } else if (p->offset >= l1 && p->offset < l1_end) {
            l1w = i;
        } else if (p->offset >= l1_end) {
            l2 = i;
        }
    }
    pthread_mutex_unlock(&m.mu);
    CHECK(data >= 0 && l2 >= 0 && l1w >= 0);
    CHECK(l2 > data);
    CHECK(last_flush > data && last_flush > l2 && last_flush > l1w);
    CHECK_RET(qed_read(img, 3 * CS, back, CS), 0);
    CHECK(memcmp(back, buf, CS) == 0);

    /* An unknown flag: refused, nothing written. */
    pthread_mutex_lock(&m.mu);
    m.nops = 0;
    pthread_mutex_unlock(&m.mu);
    CHECK_ERR(qed_write_flags(img, 8 * CS, buf, CS, 0x80), -ENOTSUP, "0x80");
    CHECK_ERR(qed_write_flags(img, 8 * CS, buf, CS, QED_REQ_FUA | 0x80), -ENOTSUP, "0x80");
    pthread_mutex_lock(&m.mu);
    CHECK(m.nops == 0);
    pthread_mutex_unlock(&m.mu);
    CHECK_RET(qed_read(img, 8 * CS, back, CS), 0);
    CHECK(test_all(back, CS, 0));

    /* Asynchronous FUA write: completes with 0, and the data reads back. */
    test_fill(buf, CS, 16);
    CHECK_RET(qed_aio_write_flags(img, 9 * CS + 512, buf, CS, QED_REQ_FUA, aio_cb, &m), 0);
    pthread_mutex_lock(&m.mu);
    while (m.aio_done == 0) {
        pthread_cond_wait(&m.cv, &m.mu);
    }
    CHECK(m.aio_done == 1 && m.aio_ret == 0);
    pthread_mutex_unlock(&m.mu);
    CHECK_RET(qed_read(img, 9 * CS + 512, back, CS), 0);
    CHECK(memcmp(back, buf, CS) == 0);

    CHECK_RET(qed_close(img), 0);
    free(m.data);
    return 0;
}
