/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/* Reads and writes of every shape (sub-sector, unaligned, cluster-, chunk- and L2-table-crossing,
 * large, vectored with odd and empty iovecs and more than IOV_MAX of them, write_zeroes aligned
 * and not, writes past the old end after qed_truncate grows the disk), checked against a
 * shadow copy through the library, then with qemu-img check / compare / map and qemu-io. Three
 * geometries: 4 KiB clusters with 1-cluster tables (an L2 table maps 2 MiB; QEMU cannot open
 * this geometry, so only the library checks it), 4 KiB clusters with 2-cluster tables (4 MiB per
 * L2 table) and the default 64 KiB / 4 (2 GiB per L2 table, checked through windows). */
#include "util.h"

#include <sys/uio.h>
#include <unistd.h>

#define KiB 1024ull
#define MiB (1024ull * 1024ull)
#define GiB (1024ull * MiB)

/* A range of the guest disk whose content the shadow tracks; everything else reads as zeros
 * and must never be written. */
typedef struct {
    uint64_t base, len;
    uint8_t *buf;
} window;

/* A region qemu-io checks with read -P at the end. */
typedef struct {
    uint64_t off, len;
    uint8_t byte;
} pattern;

typedef struct {
    const char *path;
    qed_image *img;
    uint64_t size, cs, l2cov, chunk;
    int qemu_ok;
    int nw;
    window w[4];
    uint64_t nclusters;
    uint8_t *state;  /* expected QED_BLOCK_* per cluster */
    uint64_t *host;  /* host offset per DATA cluster, filled by check_status */
    int np;
    pattern pat[16];
    uint32_t seed;
} model;

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    CHECK(p != NULL);
    return p;
}

static window *window_of(model *m, uint64_t off, uint64_t len)
{
    for (int i = 0; i < m->nw; i++) {
        window *w = &m->w[i];
        if (off >= w->base && off + len <= w->base + w->len) {
            return w;
        }
    }
    fprintf(stderr, "test bug: [%llu, +%llu) is outside every shadow window\n",
            (unsigned long long)off, (unsigned long long)len);
    exit(2);
}

/* What [off, off+len) should read as. */
static void expect(const model *m, uint64_t off, uint64_t len, uint8_t *out)
{
    memset(out, 0, len);
    for (int i = 0; i < m->nw; i++) {
        const window *w = &m->w[i];
        uint64_t a = off > w->base ? off : w->base;
        uint64_t e1 = off + len, e2 = w->base + w->len;
        uint64_t b = e1 < e2 ? e1 : e2;
        if (a < b) {
            memcpy(out + (a - off), w->buf + (a - w->base), b - a);
        }
    }
}

static void compare(const char *what, uint64_t off, const uint8_t *got, const uint8_t *want,
                    size_t len)
{
    long d = test_first_diff(got, want, len);
    if (d >= 0) {
        fprintf(stderr, "%s: mismatch at guest offset %llu (request %llu+%zu): got 0x%02x, want 0x%02x\n",
                what, (unsigned long long)(off + (uint64_t)d), (unsigned long long)off, len,
                got[d], want[d]);
        exit(1);
    }
}

static void verify(model *m, uint64_t off, uint64_t len)
{
    uint8_t *got = xmalloc(len), *want = xmalloc(len);
    memset(got, 0xee, len);
    CHECK_RET(qed_read(m->img, off, got, len), 0);
    expect(m, off, len, want);
    compare("qed_read", off, got, want, len);
    free(got);
    free(want);
}

/* Verifies [off - 700, off + len + 700) clipped to the image: the write and its surroundings. */
static void verify_around(model *m, uint64_t off, uint64_t len)
{
    uint64_t a = off > 700 ? off - 700 : 0;
    uint64_t b = off + len + 700 < m->size ? off + len + 700 : m->size;
    verify(m, a, b - a);
}

static void mark(model *m, uint64_t off, uint64_t len, uint8_t st)
{
    if (len == 0) {
        return;
    }
    for (uint64_t c = off / m->cs; c <= (off + len - 1) / m->cs; c++) {
        m->state[c] = st;
    }
}

static void do_write(model *m, uint64_t off, uint64_t len)
{
    uint8_t *b = xmalloc(len);
    test_fill(b, len, ++m->seed);
    CHECK_RET(qed_write(m->img, off, b, len), 0);
    window *w = window_of(m, off, len);
    memcpy(w->buf + (off - w->base), b, len);
    mark(m, off, len, QED_BLOCK_DATA);
    free(b);
    verify_around(m, off, len);
}

/* Writes a constant byte, remembered for qemu-io's read -P. */
static void do_pattern(model *m, uint64_t off, uint64_t len, uint8_t byte)
{
    uint8_t *b = xmalloc(len);
    memset(b, byte, len);
    CHECK_RET(qed_write(m->img, off, b, len), 0);
    window *w = window_of(m, off, len);
    memcpy(w->buf + (off - w->base), b, len);
    mark(m, off, len, QED_BLOCK_DATA);
    free(b);
    verify_around(m, off, len);
    CHECK(m->np < 16);
    m->pat[m->np++] = (pattern){off, len, byte};
}

/* Scatter-gather write: n buffers of sizes[i] bytes (0 allowed; every third empty one is NULL). */
static void do_writev(model *m, uint64_t off, const size_t *sizes, int n)
{
    struct iovec *iov = xmalloc(sizeof *iov * (size_t)n);
    uint64_t total = 0;
    for (int i = 0; i < n; i++) {
        iov[i].iov_len = sizes[i];
        if (sizes[i] == 0 && i % 3 == 0) {
            iov[i].iov_base = NULL;
        } else {
            iov[i].iov_base = xmalloc(sizes[i]);
            test_fill(iov[i].iov_base, sizes[i], ++m->seed);
        }
        total += sizes[i];
    }
    CHECK_RET(qed_writev(m->img, off, iov, n), 0);
    window *w = window_of(m, off, total);
    uint64_t pos = off;
    for (int i = 0; i < n; i++) {
        if (sizes[i]) {
            memcpy(w->buf + (pos - w->base), iov[i].iov_base, sizes[i]);
        }
        pos += sizes[i];
        free(iov[i].iov_base);
    }
    free(iov);
    mark(m, off, total, QED_BLOCK_DATA);
    verify_around(m, off, total);
}

/* Scatter-gather read into n buffers of sizes[i] bytes, compared with the shadow. */
static void verify_readv(model *m, uint64_t off, const size_t *sizes, int n)
{
    struct iovec *iov = xmalloc(sizeof *iov * (size_t)n);
    uint64_t total = 0;
    for (int i = 0; i < n; i++) {
        iov[i].iov_len = sizes[i];
        iov[i].iov_base = (sizes[i] == 0 && i % 2 == 0) ? NULL : xmalloc(sizes[i]);
        if (sizes[i]) {
            memset(iov[i].iov_base, 0xee, sizes[i]);
        }
        total += sizes[i];
    }
    CHECK_RET(qed_readv(m->img, off, iov, n), 0);
    uint8_t *want = xmalloc(total);
    expect(m, off, total, want);
    uint64_t pos = 0;
    for (int i = 0; i < n; i++) {
        if (sizes[i]) {
            compare("qed_readv", off + pos, iov[i].iov_base, want + pos, sizes[i]);
        }
        pos += sizes[i];
        free(iov[i].iov_base);
    }
    free(want);
    free(iov);
}

static void do_zero(model *m, uint64_t off, uint64_t len)
{
    CHECK_RET(qed_write_zeroes(m->img, off, len), 0);
    window *w = window_of(m, off, len);
    memset(w->buf + (off - w->base), 0, len);
    uint64_t end = off + len;
    for (uint64_t c = off / m->cs; len && c <= (end - 1) / m->cs; c++) {
        uint64_t cstart = c * m->cs;
        int whole = cstart >= off && cstart + m->cs <= end;
        if (!whole) {
            m->state[c] = QED_BLOCK_DATA; /* partial clusters are written with zeros */
        } else if (m->state[c] == QED_BLOCK_UNALLOCATED) {
            m->state[c] = QED_BLOCK_ZERO;
        } /* whole DATA clusters are overwritten in place; ZERO ones stay ZERO */
    }
    verify_around(m, off, len);
}

/* Reads every window in odd-sized pieces, and some ranges outside the windows. */
static void verify_all(model *m)
{
    static const uint64_t step[] = {1, 511, 4097, 65537, 12345, 300001, 513, 7};
    int k = 0;
    for (int i = 0; i < m->nw; i++) {
        const window *w = &m->w[i];
        for (uint64_t pos = w->base; pos < w->base + w->len;) {
            uint64_t n = step[k++ % 8];
            if (pos + n > w->base + w->len) {
                n = w->base + w->len - pos;
            }
            verify(m, pos, n);
            pos += n;
        }
    }
    /* Outside the windows (only the default geometry has any): zeros. */
    if (m->nw > 1) {
        verify(m, 64 * MiB + 5, 70000);
        verify(m, GiB - 3, 6);
        verify(m, 2 * GiB + 2 * MiB - 100, 200); /* straddles the end of window 2 */
    }
}

static const char *kind(unsigned st)
{
    return st == QED_BLOCK_DATA ? "DATA" : st == QED_BLOCK_ZERO ? "ZERO" : st == QED_BLOCK_UNALLOCATED ? "UNALLOCATED" : "?";
}

/* Walks the image with qed_block_status, checks every cluster's kind against the model and
 * records host offsets; then checks the data at each host offset in the file itself. */
static void check_status(model *m)
{
    uint64_t pos = 0, n = 0;
    while (pos < m->size) {
        qed_extent e = QED_INIT(qed_extent);
        memset(&e, 0xab, sizeof e);
        e.struct_size = sizeof e;
        CHECK_RET(qed_block_status(m->img, pos, m->size - pos, &e), 0);
        CHECK(e.offset == pos);
        CHECK(e.length > 0 && e.length <= m->size - pos);
        CHECK(e.length % m->cs == 0);
        for (uint64_t c = pos / m->cs; c < (pos + e.length) / m->cs; c++) {
            if (e.status != m->state[c]) {
                fprintf(stderr, "block status: cluster %llu (guest %llu) in extent %llu+%llu is %s, expected %s\n",
                        (unsigned long long)c, (unsigned long long)(c * m->cs),
                        (unsigned long long)e.offset, (unsigned long long)e.length, kind(e.status),
                        kind(m->state[c]));
                exit(1);
            }
            if (e.status == QED_BLOCK_DATA) {
                m->host[c] = e.host_offset + (c * m->cs - pos);
                CHECK(m->host[c] % m->cs == 0);
                CHECK(m->host[c] >= 2 * m->cs); /* past the header and the L1 table */
            } else {
                CHECK(e.host_offset == 0);
            }
        }
        pos += e.length;
        n++;
    }
    CHECK(n > 3);

    /* Sub-cluster queries: offset and length as asked, host offset inside the cluster. */
    qed_extent e = QED_INIT(qed_extent);
    CHECK_RET(qed_block_status(m->img, 1, 10, &e), 0);
    CHECK(e.offset == 1 && e.length == 10 && e.status == QED_BLOCK_DATA);
    CHECK(e.host_offset == m->host[0] + 1);
    CHECK_RET(qed_block_status(m->img, 27 * m->cs + 5, 100, &e), 0);
    CHECK(e.offset == 27 * m->cs + 5 && e.length == 100 && e.status == QED_BLOCK_ZERO);
    CHECK(e.host_offset == 0);
    CHECK_RET(qed_block_status(m->img, 40 * m->cs + 5, 100, &e), 0);
    CHECK(e.length == 100 && e.status == QED_BLOCK_UNALLOCATED);
    CHECK_RET(qed_block_status(m->img, m->size - 1, 1, &e), 0);
    CHECK(e.offset == m->size - 1 && e.length == 1 && e.status == QED_BLOCK_DATA);

    /* Each data cluster's bytes in the file are the guest's, and no two share a host cluster. */
    CHECK_RET(qed_flush(m->img), 0);
    FILE *f = fopen(m->path, "rb");
    CHECK(f != NULL);
    uint8_t *got = xmalloc(m->cs), *want = xmalloc(m->cs);
    for (uint64_t c = 0; c < m->nclusters; c++) {
        if (m->state[c] != QED_BLOCK_DATA) {
            continue;
        }
        for (uint64_t d = c + 1; d < m->nclusters && d < c + 64; d++) {
            CHECK(m->state[d] != QED_BLOCK_DATA || m->host[d] != m->host[c]);
        }
        CHECK(pread(fileno(f), got, m->cs, (off_t)m->host[c]) == (ssize_t)m->cs);
        expect(m, c * m->cs, m->cs, want);
        compare("file at host offset", c * m->cs, got, want, m->cs);
    }
    free(got);
    free(want);
    fclose(f);
}

/* qemu-img map --output=json agrees with the model cluster by cluster, host offsets included. */
static void check_qemu_map(model *m)
{
    size_t cap = 1 << 20;
    char *out = xmalloc(cap);
    int rc = test_sh_out(out, cap,
                         "qemu-img map --output=json -f qed '%s' | "
                         "jq -r '.[] | \"\\(.start) \\(.length) \\(.present) \\(.zero) \\(.data) \\(.offset // 0)\"'",
                         m->path);
    CHECK(rc == 0);
    uint64_t covered = 0;
    for (char *line = strtok(out, "\n"); line; line = strtok(NULL, "\n")) {
        unsigned long long start, length, offset;
        char present[8], zero[8], data[8];
        CHECK(sscanf(line, "%llu %llu %7s %7s %7s %llu", &start, &length, present, zero, data,
                     &offset) == 6);
        CHECK(start == covered && start % m->cs == 0 && length % m->cs == 0);
        unsigned st = !strcmp(data, "true")      ? QED_BLOCK_DATA
                      : !strcmp(present, "true") ? QED_BLOCK_ZERO
                                                 : QED_BLOCK_UNALLOCATED;
        if (st == QED_BLOCK_ZERO || st == QED_BLOCK_UNALLOCATED) {
            CHECK(!strcmp(zero, "true"));
        }
        for (uint64_t c = start / m->cs; c < (start + length) / m->cs; c++) {
            if (st != m->state[c]) {
                fprintf(stderr, "qemu-img map: cluster %llu is %s, library said %s\n",
                        (unsigned long long)c, kind(st), kind(m->state[c]));
                exit(1);
            }
            if (st == QED_BLOCK_DATA) {
                CHECK(m->host[c] == offset + (c * m->cs - start));
            }
        }
        covered += length;
    }
    CHECK(covered == m->size);
    free(out);
}

static void check_with_qemu(model *m)
{
    CHECK(test_sh("qemu-img check -f qed '%s'", m->path) == 0);

    /* The shadow as a sparse raw file, compared byte for byte by qemu-img. */
    const char *raw = test_path("shadow.raw");
    test_write_file(raw, NULL, 0);
    CHECK(truncate(raw, (off_t)m->size) == 0);
    for (int i = 0; i < m->nw; i++) {
        test_pwrite_file(raw, m->w[i].buf, m->w[i].len, m->w[i].base);
    }
    CHECK(test_sh("qemu-img compare -f raw -F qed '%s' '%s'", raw, m->path) == 0);
    CHECK(test_sh("rm -f '%s'", raw) == 0);

    check_qemu_map(m);

    char cmd[3000];
    int n = snprintf(cmd, sizeof cmd, "qemu-io -r -f qed");
    for (int i = 0; i < m->np; i++) {
        uint8_t *want = xmalloc(m->pat[i].len);
        expect(m, m->pat[i].off, m->pat[i].len, want);
        CHECK(test_all(want, m->pat[i].len, m->pat[i].byte)); /* the test kept it intact */
        free(want);
        n += snprintf(cmd + n, sizeof cmd - (size_t)n, " -c 'read -P 0x%02x %llu %llu'",
                      m->pat[i].byte, (unsigned long long)m->pat[i].off,
                      (unsigned long long)m->pat[i].len);
    }
    CHECK(n < (int)sizeof cmd - 600);
    CHECK(test_sh("%s '%s' > '%s' 2>&1 || { cat '%s'; exit 1; }", cmd, m->path,
                  test_path("qemu-io.log"), test_path("qemu-io.log")) == 0);
}

/* cs/ts 0 create with the library's defaults (64 KiB clusters, 4-cluster tables). */
static void run(const char *name, uint32_t cs, uint32_t ts, uint64_t size, int qemu_ok)
{
    model m;
    memset(&m, 0, sizeof m);
    m.path = strdup(test_path(name));
    const uint32_t want_cs = cs ? cs : 65536, want_ts = ts ? ts : 4;
    m.size = size;
    m.cs = want_cs;
    m.l2cov = (uint64_t)want_cs * ((uint64_t)want_ts * want_cs / 8);
    m.chunk = 512ull * want_cs;
    m.qemu_ok = qemu_ok;
    m.nclusters = size / want_cs;
    m.state = calloc(m.nclusters, 1);
    m.host = calloc(m.nclusters, sizeof *m.host);
    CHECK(m.state && m.host);
    if (size <= 16 * MiB) {
        m.w[m.nw++] = (window){0, size, NULL};
    } else {
        m.w[m.nw++] = (window){0, 8 * MiB, NULL};
        m.w[m.nw++] = (window){m.chunk - MiB, 2 * MiB, NULL};
        m.w[m.nw++] = (window){m.l2cov - 2 * MiB, 4 * MiB, NULL};
        m.w[m.nw++] = (window){size - MiB, MiB, NULL};
    }
    for (int i = 0; i < m.nw; i++) {
        m.w[i].buf = calloc(m.w[i].len, 1);
        CHECK(m.w[i].buf != NULL);
    }

    qed_create_options o = QED_INIT(qed_create_options);
    o.size = size;
    o.cluster_size = cs;
    o.table_size = ts;
    CHECK_RET(qed_create(m.path, &o), 0);
    CHECK_RET(qed_open(m.path, QED_OPEN_RDWR, &m.img), 0);
    qed_info info = QED_INIT(qed_info);
    CHECK_RET(qed_get_info(m.img, &info), 0);
    CHECK(info.virtual_size == size && info.cluster_size == want_cs && info.table_size == want_ts);

    const uint64_t C = m.cs, L2 = m.l2cov, CH = m.chunk, E = m.size;

    /* A fresh image reads as zeros everywhere, including across table boundaries. */
    verify(&m, 0, 3 * C + 5);
    verify(&m, L2 - 100, 200);

    /* Sub-sector writes: inside one sector, across a sector boundary, up to one. */
    do_write(&m, 1, 1);
    do_write(&m, 700, 100);
    do_write(&m, 513, 511);
    do_write(&m, C - 3, 2);
    /* Unaligned, across two cluster boundaries (half in place, half allocating). */
    do_write(&m, C - 1, C + 3);
    /* Across an L2 table boundary, on fresh clusters (creates the second table). */
    do_write(&m, L2 - C - 5, 2 * C + 17);
    /* Across a 512-entry piece of L2 table. */
    do_write(&m, CH - 100, 200);
    /* Larger, multi-cluster, unaligned at both ends. */
    do_write(&m, 3 * C + 333, 10 * C + 1000);
    /* 1.4 MiB across the L2 boundary, mixing in-place and allocating clusters. */
    do_write(&m, L2 - 700 * KiB, 1400 * KiB + 5);
    /* Overwrite partly allocated, partly fresh clusters in one call. */
    do_write(&m, 12 * C + 7, 4 * C);

    /* Vectored writes with odd and empty buffers. */
    static const size_t v1[] = {0, 1, 511, 0, 513, 4095, 7, 4097, 0, 65539, 12345, 0, 1, 2, 3, 1000, 0};
    do_writev(&m, 60 * C + 17, v1, (int)(sizeof v1 / sizeof v1[0]));
    do_writev(&m, CH - 5000, v1, (int)(sizeof v1 / sizeof v1[0]));
    static const size_t v2[] = {3, 0, 0, 8191, 1, 0, 20000, 5};
    do_writev(&m, L2 - 9000, v2, (int)(sizeof v2 / sizeof v2[0]));
    static const size_t v3[] = {0, 0, 0};
    do_writev(&m, E, v3, 3); /* nothing at the very end: allowed */
    CHECK_RET(qed_writev(m.img, 0, NULL, 0), 0);
    CHECK_RET(qed_write(m.img, E, NULL, 0), 0);
    /* More iovecs than IOV_MAX (1024), of 0 to 7 bytes, across clusters. */
    enum { NIOV = 3000 };
    size_t *many = xmalloc(NIOV * sizeof *many);
    for (int i = 0; i < NIOV; i++) {
        many[i] = (size_t)(i * 5 % 8);
    }
    do_writev(&m, CH + 3 * C + 77, many, NIOV);

    /* Write zeroes. (The model's states before each call make sure each case is the one named.) */
    for (int c = 20; c < 29; c++) {
        CHECK(c == 24 || c == 25 || m.state[c] == QED_BLOCK_UNALLOCATED);
    }
    for (int c = 3; c < 7; c++) {
        CHECK(m.state[c] == QED_BLOCK_DATA);
    }
    do_zero(&m, 20 * C, 4 * C);            /* aligned, unallocated: zero clusters */
    do_zero(&m, 3 * C, 4 * C);             /* aligned, over data: stays data, reads zeros */
    do_zero(&m, 26 * C + 100, 3 * C + 100); /* unaligned: partial ends written, middle zero clusters */
    do_zero(&m, 31 * C + 10, 20);          /* inside one unallocated cluster */
    do_zero(&m, L2 - 100 * KiB - 7, 300 * KiB); /* unaligned over data, across the L2 boundary */
    {
        uint64_t X = E >= 3 * L2 ? 2 * L2 : CH + 8 * C; /* a fresh boundary to zero across */
        do_zero(&m, X - 2 * C, 4 * C);
        CHECK(m.state[X / C] == QED_BLOCK_ZERO && m.state[X / C - 1] == QED_BLOCK_ZERO);
    }
    CHECK_RET(qed_write_zeroes(m.img, E, 0), 0);
    /* A partial write into a zero cluster allocates it; the rest of it still reads zeros. */
    do_write(&m, 21 * C + 100, 50);
    /* The last bytes of the disk. */
    do_write(&m, E - 512, 512);
    do_write(&m, E - C - 10, 20);
    do_write(&m, E - 1, 1);
    /* Constant patterns for qemu-io to check, including across the L2 boundary. */
    do_pattern(&m, 9 * C + 1, 2 * C, 0xa5);
    do_pattern(&m, L2 - 3, 6, 0x3c);
    do_pattern(&m, 40 * C - 512, 512, 0x11);
    do_pattern(&m, E - 511, 500, 0x77);
    m.pat[m.np++] = (pattern){27 * C, 2 * C, 0};  /* zero clusters */
    m.pat[m.np++] = (pattern){4 * C, 3 * C, 0};   /* zeroed data */
    m.pat[m.np++] = (pattern){50 * C, 7 * C, 0};  /* never written */
    CHECK(m.state[40] == QED_BLOCK_UNALLOCATED);

    /* Vectored reads of odd shapes, across clusters, chunks and the L2 boundary. */
    static const size_t r1[] = {0, 1, 2, 509, 0, 4096, 3, 70000, 0, 1};
    verify_readv(&m, 0, r1, (int)(sizeof r1 / sizeof r1[0]));
    verify_readv(&m, L2 - 40000, r1, (int)(sizeof r1 / sizeof r1[0]));
    verify_readv(&m, CH - 1, r1, (int)(sizeof r1 / sizeof r1[0]));
    verify_readv(&m, 19 * C + 77, r1, (int)(sizeof r1 / sizeof r1[0]));
    verify_readv(&m, CH + 3 * C + 1, many, NIOV);
    verify_readv(&m, 11, many, NIOV);
    free(many);
    static const size_t r2[] = {0, 0};
    verify_readv(&m, E, r2, 2);
    CHECK_RET(qed_readv(m.img, 5, NULL, 0), 0);
    CHECK_RET(qed_read(m.img, E, NULL, 0), 0);

    verify_all(&m);
    check_status(&m);
    qed_check_result cr = QED_INIT(qed_check_result);
    CHECK_RET(qed_check(m.img, 0, &cr), 0);
    CHECK(cr.corruptions == 0 && cr.leaks == 0 && cr.check_errors == 0);
    CHECK_RET(qed_close(m.img), 0);

    /* Everything persists across a reopen. */
    CHECK_RET(qed_open(m.path, 0, &m.img), 0);
    CHECK_RET(qed_get_info(m.img, &info), 0);
    CHECK(info.needs_check == 0);
    verify_all(&m);
    check_status(&m);
    CHECK_RET(qed_close(m.img), 0);
    m.img = NULL;

    if (m.qemu_ok) {
        check_with_qemu(&m);
    } else {
        /* QEMU refuses 1-cluster tables ("QED table offset is invalid"); make sure it still does,
         * so this branch is revisited if that changes. */
        CHECK(test_sh("qemu-img info '%s' >/dev/null 2>&1", m.path) != 0);
    }

    for (int i = 0; i < m.nw; i++) {
        free(m.w[i].buf);
    }
    free(m.state);
    free(m.host);
    free((void *)m.path);
}

static void check_pattern(qed_image *img, uint64_t off, size_t len, uint8_t v)
{
    uint8_t *b = xmalloc(len);
    CHECK_RET(qed_read(img, off, b, len), 0);
    CHECK(test_all(b, len, v));
    free(b);
}

/* Writes after qed_truncate grew the disk past the L1 entries in use at open, up to the last
 * cluster the geometry can address. */
static void run_grow(void)
{
    const char *p = test_path("grow.qed");
    qed_create_options o = QED_INIT(qed_create_options);
    o.size = 16 * MiB;
    o.cluster_size = 4096;
    o.table_size = 2; /* at most 4096 * 1024 * 1024 = 4 GiB */
    CHECK_RET(qed_create(p, &o), 0);
    qed_image *img;
    CHECK_RET(qed_open(p, QED_OPEN_RDWR, &img), 0);
    uint8_t b[4096];
    memset(b, 0x5a, sizeof b);
    CHECK_RET(qed_write(img, MiB, b, sizeof b), 0);
    CHECK_RET(qed_truncate(img, 4 * GiB + 512), -EINVAL);
    CHECK_RET(qed_truncate(img, 4 * GiB), 0);
    memset(b, 0x6b, sizeof b);
    CHECK_RET(qed_write(img, 4 * GiB - 4096, b, sizeof b), 0);
    memset(b, 0x7c, sizeof b);
    CHECK_RET(qed_write(img, 600 * MiB + 100, b, sizeof b), 0);
    for (int pass = 0; pass < 2; pass++) {
        qed_info info = QED_INIT(qed_info);
        CHECK_RET(qed_get_info(img, &info), 0);
        CHECK(info.virtual_size == 4 * GiB);
        check_pattern(img, MiB, 4096, 0x5a);
        check_pattern(img, 4 * GiB - 4096, 4096, 0x6b);
        check_pattern(img, 600 * MiB + 100, 4096, 0x7c);
        check_pattern(img, 3 * GiB, 65536, 0);
        qed_extent e = QED_INIT(qed_extent);
        CHECK_RET(qed_block_status(img, 4 * GiB - 4096, 4096, &e), 0);
        CHECK(e.status == QED_BLOCK_DATA);
        CHECK_RET(qed_block_status(img, 2 * GiB, GiB, &e), 0);
        CHECK(e.status == QED_BLOCK_UNALLOCATED && e.length == GiB);
        CHECK_RET(qed_close(img), 0);
        if (pass == 0) {
            CHECK_RET(qed_open(p, 0, &img), 0);
        }
    }
    CHECK(test_sh("qemu-img check -q -f qed '%s'", p) == 0);
    CHECK(test_sh("qemu-io -r -f qed -c 'read -P 0x5a %llu 4096' -c 'read -P 0x6b %llu 4096' "
                  "-c 'read -P 0x7c %llu 4096' -c 'read -P 0 %llu 65536' '%s' >/dev/null",
                  MiB, 4 * GiB - 4096, 600 * MiB + 100, 3 * GiB, p) == 0);
    char out[64];
    CHECK(test_sh_out(out, sizeof out, "qemu-img info --output=json '%s' | jq '.\"virtual-size\"'", p) == 0);
    CHECK(strtoull(out, NULL, 10) == 4 * GiB);
}

int main(void)
{
    run("c4k-t1.qed", 4096, 1, 8 * MiB, 0);
    run("c4k-t2.qed", 4096, 2, 12 * MiB, 1);
    run("default.qed", 0, 0, 2 * GiB + 4 * MiB, 1);
    run_grow();
    test_cleanup();
    return 0;
}
