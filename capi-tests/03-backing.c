/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/* Backing files: a chain top.qed -> mid.qed -> base.raw; reads through to the backing data,
 * copy-on-write of partial clusters, backing files shorter than the overlay, QED_OPEN_NO_BACKING,
 * qed_get_backing_file, qed_change_backing_file; checked against qemu-img info / check / convert. */
#include "util.h"

#include <sys/uio.h>

#define KiB 1024ull
#define MiB (1024ull * 1024ull)

#define RAW_LEN (MiB + 1000)   /* not a multiple of 512 */
#define MID_SIZE (4 * MiB - 1536) /* default geometry: 64 KiB clusters, the last one partial */
#define TOP_SIZE (6 * MiB)     /* 4 KiB clusters, 2-cluster tables */
#define BASE2_LEN (3 * MiB)

/* An image under test with the shadow of what it should read as. */
typedef struct {
    const char *path;
    qed_image *img;
    uint64_t size, cs;
    uint8_t *shadow;
    uint8_t *state; /* QED_BLOCK_* per cluster */
    uint32_t seed;
} image;

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    CHECK(p != NULL);
    return p;
}

static void compare(const char *what, uint64_t off, const uint8_t *got, const uint8_t *want,
                    size_t len)
{
    long d = test_first_diff(got, want, len);
    if (d >= 0) {
        fprintf(stderr, "%s: mismatch at offset %llu: got 0x%02x, want 0x%02x\n", what,
                (unsigned long long)(off + (uint64_t)d), got[d], want[d]);
        exit(1);
    }
}

static void verify(image *m, uint64_t off, uint64_t len)
{
    uint8_t *got = xmalloc(len);
    memset(got, 0xee, len);
    CHECK_RET(qed_read(m->img, off, got, len), 0);
    compare(m->path, off, got, m->shadow + off, len);
    free(got);
}

static void verify_all(image *m)
{
    /* Odd-sized pieces, so reads start and end everywhere relative to clusters. */
    static const uint64_t step[] = {1, 4097, 65537, 12345, 300001, 513, 7, 200000};
    int k = 0;
    for (uint64_t pos = 0; pos < m->size;) {
        uint64_t n = step[k++ % 8];
        if (pos + n > m->size) {
            n = m->size - pos;
        }
        verify(m, pos, n);
        pos += n;
    }
}

static void mark(image *m, uint64_t off, uint64_t len, uint8_t st)
{
    for (uint64_t c = off / m->cs; len && c <= (off + len - 1) / m->cs; c++) {
        m->state[c] = st;
    }
}

static void wr(image *m, uint64_t off, uint64_t len)
{
    uint8_t *b = xmalloc(len);
    test_fill(b, len, 1000 + ++m->seed);
    CHECK_RET(qed_write(m->img, off, b, len), 0);
    memcpy(m->shadow + off, b, len);
    mark(m, off, len, QED_BLOCK_DATA);
    free(b);
    uint64_t a = off >= m->cs ? off - m->cs : 0;
    uint64_t e = off + len + m->cs <= m->size ? off + len + m->cs : m->size;
    verify(m, a, e - a);
}

static void zero(image *m, uint64_t off, uint64_t len)
{
    CHECK_RET(qed_write_zeroes(m->img, off, len), 0);
    memset(m->shadow + off, 0, len);
    for (uint64_t c = off / m->cs; len && c <= (off + len - 1) / m->cs; c++) {
        int whole = c * m->cs >= off && (c + 1) * m->cs <= off + len;
        if (!whole) {
            m->state[c] = QED_BLOCK_DATA;
        } else if (m->state[c] == QED_BLOCK_UNALLOCATED) {
            m->state[c] = QED_BLOCK_ZERO;
        }
    }
    uint64_t a = off >= m->cs ? off - m->cs : 0;
    uint64_t e = off + len + m->cs <= m->size ? off + len + m->cs : m->size;
    verify(m, a, e - a);
}

static void check_status(image *m)
{
    for (uint64_t pos = 0; pos < m->size;) {
        qed_extent e = QED_INIT(qed_extent);
        CHECK_RET(qed_block_status(m->img, pos, m->size - pos, &e), 0);
        CHECK(e.offset == pos && e.length > 0);
        CHECK(e.length % m->cs == 0 || pos + e.length == m->size);
        for (uint64_t c = pos / m->cs; c < (pos + e.length + m->cs - 1) / m->cs; c++) {
            if (e.status != m->state[c]) {
                fprintf(stderr, "%s: cluster %llu has status %u, expected %u\n", m->path,
                        (unsigned long long)c, e.status, m->state[c]);
                exit(1);
            }
        }
        pos += e.length;
    }
}

/* Opened without its backing file, the image reads its own clusters only: allocated clusters
 * hold the whole cluster (the copy-on-write filled what the guest did not write), the rest
 * reads as zeros. */
static void verify_no_backing(image *m)
{
    qed_image *img;
    CHECK_RET(qed_open(m->path, QED_OPEN_NO_BACKING, &img), 0);
    uint8_t *got = xmalloc(m->cs), *want = xmalloc(m->cs);
    for (uint64_t c = 0; c * m->cs < m->size; c++) {
        size_t n = (size_t)(m->size - c * m->cs < m->cs ? m->size - c * m->cs : m->cs);
        CHECK_RET(qed_read(img, c * m->cs, got, n), 0);
        if (m->state[c] == QED_BLOCK_DATA) {
            memcpy(want, m->shadow + c * m->cs, n);
        } else {
            memset(want, 0, n);
        }
        compare("no-backing read", c * m->cs, got, want, n);
    }
    free(got);
    free(want);
    CHECK_RET(qed_close(img), 0);
}

static char *json_field(const char *path, const char *field)
{
    static char out[4096];
    CHECK(test_sh_out(out, sizeof out, "qemu-img info --output=json '%s' | jq -r '.\"%s\" // \"(none)\"'",
                      path, field) == 0);
    out[strcspn(out, "\n")] = 0;
    return out;
}

/* The image converted to raw by qemu-img equals want. */
static void check_convert(const char *path, const uint8_t *want, size_t len)
{
    const char *raw = test_path("converted.raw");
    CHECK(test_sh("qemu-img convert -f qed -O raw '%s' '%s'", path, raw) == 0);
    size_t n;
    uint8_t *got = test_read_file(raw, &n);
    CHECK(got != NULL);
    CHECK(n == len);
    compare("qemu-img convert", 0, got, want, len);
    free(got);
    CHECK(test_sh("rm -f '%s'", raw) == 0);
}

static void backing_file_is(qed_image *img, const char *name, const char *fmt)
{
    char b[4096], f[16];
    CHECK_RET(qed_get_backing_file(img, b, sizeof b, f, sizeof f), (int)strlen(name));
    CHECK(strcmp(b, name) == 0);
    CHECK(strcmp(f, fmt) == 0);
}

int main(void)
{
    /* base.raw: 1 MiB + 1000 bytes of data. */
    uint8_t *raw = xmalloc(RAW_LEN);
    test_fill(raw, RAW_LEN, 7);
    const char *raw_path = test_path("base.raw");
    test_write_file(raw_path, raw, RAW_LEN);

    /* mid.qed on base.raw (relative name, format raw), larger than it. */
    image mid = {strdup(test_path("mid.qed")), NULL, MID_SIZE, 65536, NULL, NULL, 0};
    mid.shadow = calloc(MID_SIZE, 1);
    mid.state = calloc((MID_SIZE + mid.cs - 1) / mid.cs, 1);
    CHECK(mid.shadow && mid.state);
    memcpy(mid.shadow, raw, RAW_LEN);
    qed_create_options o = QED_INIT(qed_create_options);
    o.size = MID_SIZE;
    o.backing_file = "base.raw";
    o.backing_format = "raw";
    CHECK_RET(qed_create(mid.path, &o), 0);
    CHECK_RET(qed_open(mid.path, QED_OPEN_RDWR, &mid.img), 0);

    qed_info info = QED_INIT(qed_info);
    CHECK_RET(qed_get_info(mid.img, &info), 0);
    CHECK(info.has_backing_file == 1);
    CHECK((info.features & 1) && (info.features & 4)); /* backing file, no-probe (raw) */
    backing_file_is(mid.img, "base.raw", "raw");

    /* qed_get_backing_file buffer rules: NUL needs room; nothing written on -ERANGE. */
    {
        char b[16], f[16];
        memset(b, 'x', sizeof b);
        memset(f, 'y', sizeof f);
        CHECK_ERR(qed_get_backing_file(mid.img, b, 8, f, sizeof f), -ERANGE, "9");
        CHECK(b[0] == 'x' && f[0] == 'y');
        CHECK_RET(qed_get_backing_file(mid.img, b, 9, f, sizeof f), 8);
        CHECK(strcmp(b, "base.raw") == 0 && strcmp(f, "raw") == 0);
        memset(b, 'x', sizeof b);
        CHECK_RET(qed_get_backing_file(mid.img, b, sizeof b, f, 3), -ERANGE);
        CHECK(b[0] == 'x');
        CHECK_RET(qed_get_backing_file(mid.img, b, sizeof b, f, 4), 8);
        /* A (NULL, 0) buffer is skipped: for the name that is a length query, like snprintf. */
        memset(b, 'x', sizeof b);
        CHECK_RET(qed_get_backing_file(mid.img, b, sizeof b, NULL, 0), 8);
        CHECK(strcmp(b, "base.raw") == 0);
        CHECK_RET(qed_get_backing_file(mid.img, NULL, 0, NULL, 0), 8);
        CHECK_RET(qed_get_backing_file(mid.img, b, 1, NULL, 0), -ERANGE);
        memset(f, 'y', sizeof f);
        CHECK_RET(qed_get_backing_file(mid.img, b, sizeof b, f, 1), -ERANGE);
        CHECK(f[0] == 'y');
    }

    /* Reads through: the raw data, then zeros past its end. */
    verify_all(&mid);
    check_status(&mid); /* all unallocated */

    /* Partial-cluster writes copy the rest of the cluster from the backing file. */
    wr(&mid, 100, 50);                 /* cluster 0 */
    wr(&mid, 3 * 65536 - 10, 20);      /* clusters 2 and 3 */
    wr(&mid, RAW_LEN - 1100, 200);     /* cluster 16, which holds the raw file's end */
    wr(&mid, 2 * MiB + 5, 10);         /* past the raw file's end */
    zero(&mid, 5 * 65536, 2 * 65536);  /* zero clusters over backing data */
    zero(&mid, 9 * 65536 + 1, 100);    /* partial: zeros written, the rest copied */
    wr(&mid, MID_SIZE - 1, 1);
    verify_all(&mid);
    check_status(&mid);
    CHECK_RET(qed_close(mid.img), 0);
    mid.img = NULL;
    verify_no_backing(&mid);

    /* The same through a read-only open; a raw backing keeps its declared format even when not
     * opened. */
    CHECK_RET(qed_open(mid.path, 0, &mid.img), 0);
    verify_all(&mid);
    CHECK_RET(qed_close(mid.img), 0);
    CHECK_RET(qed_open(mid.path, QED_OPEN_NO_BACKING, &mid.img), 0);
    backing_file_is(mid.img, "base.raw", "raw");
    CHECK_RET(qed_close(mid.img), 0);
    mid.img = NULL;

    /* QEMU agrees. */
    CHECK(test_sh("qemu-img check -q -f qed '%s'", mid.path) == 0);
    CHECK(strcmp(json_field(mid.path, "backing-filename"), "base.raw") == 0);
    CHECK(strcmp(json_field(mid.path, "backing-filename-format"), "raw") == 0);
    check_convert(mid.path, mid.shadow, MID_SIZE);

    /* Size 0 takes the backing file's size (rounded up to a sector). */
    {
        qed_create_options z = QED_INIT(qed_create_options);
        z.backing_file = "base.raw";
        z.backing_format = "raw";
        const char *p = test_path("sized.qed");
        CHECK_RET(qed_create(p, &z), 0);
        qed_image *img;
        CHECK_RET(qed_open(p, 0, &img), 0);
        CHECK_RET(qed_get_info(img, &info), 0);
        CHECK(info.virtual_size == (RAW_LEN + 511) / 512 * 512);
        uint8_t tail[1024];
        CHECK_RET(qed_read(img, MiB, tail, sizeof tail), 0);
        compare("raw tail", MiB, tail, raw + MiB, 1000);
        CHECK(test_all(tail + 1000, 24, 0));
        CHECK_RET(qed_close(img), 0);
        z.backing_file = mid.path;
        z.backing_format = "qed";
        CHECK_RET(qed_create(p, &z), 0);
        CHECK_RET(qed_open(p, 0, &img), 0);
        CHECK_RET(qed_get_info(img, &info), 0);
        CHECK(info.virtual_size == MID_SIZE);
        CHECK_RET(qed_close(img), 0);
    }

    /* top.qed on mid.qed (absolute name, format qed), larger than it, 4 KiB clusters. */
    image top = {strdup(test_path("top.qed")), NULL, TOP_SIZE, 4096, NULL, NULL, 0};
    top.shadow = calloc(TOP_SIZE, 1);
    top.state = calloc(TOP_SIZE / top.cs, 1);
    CHECK(top.shadow && top.state);
    memcpy(top.shadow, mid.shadow, MID_SIZE);
    o = QED_INIT(qed_create_options);
    o.size = TOP_SIZE;
    o.cluster_size = 4096;
    o.table_size = 2;
    o.backing_file = mid.path;
    o.backing_format = "qed";
    CHECK_RET(qed_create(top.path, &o), 0);
    CHECK_RET(qed_open(top.path, QED_OPEN_RDWR, &top.img), 0);
    CHECK_RET(qed_get_info(top.img, &info), 0);
    CHECK(info.has_backing_file == 1 && (info.features & 4) == 0);
    backing_file_is(top.img, mid.path, "qed");
    verify_all(&top); /* two levels down, then zeros past mid's end */

    wr(&top, 4000, 200);               /* top clusters 0-1: over mid's own cluster 0 */
    wr(&top, 512 * KiB + 7, 5000);     /* over mid-unallocated: copied from base.raw */
    wr(&top, 5 * 65536 + 4096 + 3, 9); /* over mid's zero clusters */
    wr(&top, RAW_LEN - 50, 100);       /* across the raw file's end */
    wr(&top, MID_SIZE - 100, 300);     /* across mid's end, inside one top cluster */
    wr(&top, 5 * MiB, 4096);           /* a whole cluster past mid's end */
    {
        static const size_t sz[] = {1, 0, 4095, 2, 0, 8191, 13};
        struct iovec iov[7];
        uint64_t off = 700 * KiB + 1, pos = off;
        for (int i = 0; i < 7; i++) {
            iov[i].iov_base = sz[i] ? xmalloc(sz[i]) : NULL;
            iov[i].iov_len = sz[i];
            test_fill(iov[i].iov_base, sz[i], 77 + (uint32_t)i);
        }
        CHECK_RET(qed_writev(top.img, off, iov, 7), 0);
        for (int i = 0; i < 7; i++) {
            if (sz[i]) {
                memcpy(top.shadow + pos, iov[i].iov_base, sz[i]);
            }
            mark(&top, pos, sz[i], QED_BLOCK_DATA);
            pos += sz[i];
            free(iov[i].iov_base);
        }
        verify(&top, off - 8192, pos - off + 16384);
    }
    zero(&top, 8192, 8192);            /* zero clusters hide mid's data */
    zero(&top, 900 * KiB + 5, 10000);  /* partial ends copied from base.raw */
    verify_all(&top);
    check_status(&top);
    {
        qed_extent e = QED_INIT(qed_extent);
        CHECK_RET(qed_block_status(top.img, 8192, 8192, &e), 0);
        CHECK(e.status == QED_BLOCK_ZERO && e.length == 8192);
        CHECK_RET(qed_block_status(top.img, 64 * KiB, 4096, &e), 0);
        CHECK(e.status == QED_BLOCK_UNALLOCATED);
    }
    CHECK_RET(qed_close(top.img), 0);
    top.img = NULL;
    verify_no_backing(&top);

    /* Without its backing file the format is unknown. */
    CHECK_RET(qed_open(top.path, QED_OPEN_NO_BACKING, &top.img), 0);
    backing_file_is(top.img, mid.path, "");
    CHECK_RET(qed_close(top.img), 0);

    CHECK(test_sh("qemu-img check -q -f qed '%s'", top.path) == 0);
    CHECK(strcmp(json_field(top.path, "backing-filename"), mid.path) == 0);
    check_convert(top.path, top.shadow, TOP_SIZE);

    /* Change top's backing file to base2.raw (relative, raw), as qemu-img rebase -u does. */
    uint8_t *raw2 = xmalloc(BASE2_LEN);
    test_fill(raw2, BASE2_LEN, 99);
    test_write_file(test_path("base2.raw"), raw2, BASE2_LEN);
    CHECK_RET(qed_open(top.path, QED_OPEN_RDWR, &top.img), 0);
    CHECK_RET(qed_change_backing_file(top.img, "base2.raw", "raw"), 0);
    backing_file_is(top.img, "base2.raw", "raw");
    for (uint64_t c = 0; c < TOP_SIZE / top.cs; c++) {
        if (top.state[c] == QED_BLOCK_UNALLOCATED) {
            uint64_t a = c * top.cs;
            memset(top.shadow + a, 0, top.cs);
            if (a < BASE2_LEN) {
                memcpy(top.shadow + a, raw2 + a, top.cs);
            }
        }
    }
    verify_all(&top);
    /* Refused changes change nothing. */
    CHECK_RET(qed_change_backing_file(top.img, "no-such-file.raw", "raw"), -ENOENT);
    CHECK_ERR(qed_change_backing_file(top.img, "base.raw", "qcow2"), -ENOTSUP, "qcow2");
    CHECK_RET(qed_change_backing_file(top.img, "nbd:localhost:10809", "raw"), -ENOTSUP);
    {
        char *huge = xmalloc(5000);
        memset(huge, 'a', 4999);
        huge[4999] = 0;
        CHECK_ERR(qed_change_backing_file(top.img, huge, "raw"), -EINVAL, "backing_file");
        free(huge);
    }
    backing_file_is(top.img, "base2.raw", "raw");
    verify_all(&top);
    CHECK_RET(qed_close(top.img), 0);
    top.img = NULL;

    CHECK(strcmp(json_field(top.path, "backing-filename"), "base2.raw") == 0);
    CHECK(strcmp(json_field(top.path, "backing-filename-format"), "raw") == 0);
    CHECK(test_sh("qemu-img check -q -f qed '%s'", top.path) == 0);
    check_convert(top.path, top.shadow, TOP_SIZE);

    /* Back to mid.qed with the format left to probing: found to be qed once opened. */
    CHECK_RET(qed_open(top.path, QED_OPEN_RDWR, &top.img), 0);
    CHECK_RET(qed_change_backing_file(top.img, "mid.qed", NULL), 0);
    backing_file_is(top.img, "mid.qed", "qed");
    CHECK_RET(qed_close(top.img), 0);
    CHECK(strcmp(json_field(top.path, "backing-filename"), "mid.qed") == 0);

    /* Read-only handles cannot change it. */
    CHECK_RET(qed_open(top.path, 0, &top.img), 0);
    CHECK_RET(qed_change_backing_file(top.img, "base2.raw", "raw"), -EROFS);
    CHECK_RET(qed_close(top.img), 0);

    /* Remove the backing file: unallocated clusters now read as zeros. */
    CHECK_RET(qed_open(top.path, QED_OPEN_RDWR, &top.img), 0);
    CHECK_RET(qed_change_backing_file(top.img, NULL, NULL), 0);
    CHECK_RET(qed_get_info(top.img, &info), 0);
    CHECK(info.has_backing_file == 0 && (info.features & 5) == 0);
    {
        char b[8] = "zzz", f[8] = "zzz";
        CHECK_RET(qed_get_backing_file(top.img, b, sizeof b, f, sizeof f), 0);
        CHECK(b[0] == 0 && f[0] == 0);
        CHECK_RET(qed_get_backing_file(top.img, NULL, 0, NULL, 0), 0);
    }
    for (uint64_t c = 0; c < TOP_SIZE / top.cs; c++) {
        if (top.state[c] == QED_BLOCK_UNALLOCATED) {
            memset(top.shadow + c * top.cs, 0, top.cs);
        }
    }
    verify_all(&top);
    CHECK_RET(qed_close(top.img), 0);
    top.img = NULL;
    CHECK(strcmp(json_field(top.path, "backing-filename"), "(none)") == 0);
    CHECK(test_sh("qemu-img check -q -f qed '%s'", top.path) == 0);
    check_convert(top.path, top.shadow, TOP_SIZE);

    /* A chain that loops back to itself is refused. */
    {
        const char *p = test_path("loop.qed");
        o = QED_INIT(qed_create_options);
        o.size = MiB;
        CHECK_RET(qed_create(p, &o), 0);
        qed_image *img;
        CHECK_RET(qed_open(p, QED_OPEN_RDWR, &img), 0);
        CHECK_RET(qed_change_backing_file(img, "base.raw", "raw"), 0);
        CHECK_RET(qed_close(img), 0);
        /* Point it at itself behind the library's back: same-length name, qed format. */
        size_t n;
        uint8_t *bytes = test_read_file(p, &n);
        CHECK(bytes != NULL && n > 72);
        CHECK(memcmp(bytes + 64, "base.raw", 8) == 0);
        memcpy(bytes + 64, "loop.qed", 8);
        bytes[16] &= (uint8_t)~4; /* clear no-probe: the name is a QED image */
        test_write_file(p, bytes, n);
        free(bytes);
        CHECK_ERR(qed_open(p, 0, &img), -EINVAL, "loops back");
        CHECK_RET(qed_open(p, QED_OPEN_NO_BACKING, &img), 0);
        backing_file_is(img, "loop.qed", "");
        CHECK_RET(qed_close(img), 0);
    }

    free(raw);
    free(raw2);
    free(mid.shadow);
    free(mid.state);
    free((void *)mid.path);
    free(top.shadow);
    free(top.state);
    free((void *)top.path);
    test_cleanup();
    return 0;
}
