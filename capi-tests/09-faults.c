/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/* Storage faults through qed_io_ops: a fault-injecting in-memory storage fails the Nth call (of
 * any kind, or of one kind) once or from then on, with -EIO or -ENOSPC, sometimes after writing
 * part of the data. For every N, a mixed workload (create, open, allocating and in-place writes,
 * write_zeroes, flushes, a check with repair, a resize, reads, close) runs with the fault and
 * then ends by close, by process death (the storage keeps every write) or by power loss (it
 * keeps what the last successful flush covered). Reopened on healthy storage, the image must
 * open read-write, repair to 0 corruptions and 0 leaks, hold every byte that a write
 * acknowledged before a successful flush wrote, and only old or new values elsewhere; the
 * storage may never have been cut below its flushed clusters. A second sweep faults every call
 * of a read-write open that repairs a dirty image: a failed open must leave the image as it was.
 *
 * QED_FAULTS_STRIDE=k runs every k-th N only (3 under valgrind, where a state costs about 20
 * times more; the offset rotates between variants, so every call is still faulted by some). */
#include "util.h"

#include <pthread.h>
#include <stdarg.h>
#include <unistd.h>

#define KiB 1024ull
#define MiB (1024ull * 1024ull)
#define CS 4096ull                 /* cluster size: an L2 table (one cluster) maps 2 MiB */
#define SIZE0 (4 * MiB)            /* virtual size at create: two L2 tables */
#define SIZE1 (6 * MiB)            /* after qed_truncate: a third */
#define MAX_TRACE 4096
#define MAX_OPS 64

/* ---- The storage ------------------------------------------------------------------------ */

static int tracing; /* QED_FAULTS_TRACE: print every storage call and client operation */

enum kind { K_PREAD, K_PWRITE, K_FLUSH, K_GETLEN, K_SETLEN, K_NKINDS, K_ANY = K_NKINDS };
static const char *const kind_name[] = {"pread", "pwrite", "flush", "get_length", "set_length", "any"};

typedef struct {
    uint8_t *data;
    size_t len, cap;
} blob;

typedef struct {
    pthread_mutex_t mu;
    blob cur;     /* what a process sees (and what survives its death: the kernel has it) */
    blob durable; /* what survives a power loss: the state at the last successful flush */
    unsigned long calls, kcalls[K_NKINDS];
    /* The fault: calls of kind `f_kind` (or any) numbered f_n (or from f_n on, with f_from)
     * return f_err; with f_torn a refused pwrite first writes the sectors before its middle. */
    int f_kind, f_from, f_err, f_torn;
    unsigned long f_n;
    unsigned long fired;
    int first_fired_kind;
    int dead;            /* after an abandon: every call fails and changes nothing */
    int exempt;          /* inside a repair, where cutting leaked clusters is legitimate */
    uint64_t floor;      /* end of the last cluster covered by a successful flush */
    uint64_t written_end; /* highest byte pwrite ever wrote (set_length's room ahead is not data) */
    int cut;             /* the storage was cut below floor: */
    uint64_t cut_to, cut_floor;
    unsigned long cut_call;
    unsigned long mutations; /* pwrite/set_length calls that changed something */
    unsigned long mutations_at_fire; /* ... before the fault first fired */
    /* Recorded in the healthy run: the kind of every call. */
    unsigned char *trace;
    uint64_t hash;
} fstore;

static void blob_set_len(blob *b, size_t len)
{
    if (len > b->cap) {
        size_t cap = b->cap ? b->cap : 65536;
        while (cap < len) {
            cap *= 2;
        }
        uint8_t *d = realloc(b->data, cap);
        CHECK(d != NULL);
        b->data = d;
        b->cap = cap;
    }
    if (len > b->len) {
        memset(b->data + b->len, 0, len - b->len);
    }
    b->len = len;
}

static void blob_copy(blob *dst, const blob *src)
{
    blob_set_len(dst, src->len);
    if (src->len) {
        memcpy(dst->data, src->data, src->len);
    }
}

static void store_init(fstore *s, const blob *content)
{
    memset(s, 0, sizeof *s);
    CHECK(pthread_mutex_init(&s->mu, NULL) == 0);
    s->first_fired_kind = -1;
    if (content) {
        blob_copy(&s->cur, content);
        blob_copy(&s->durable, content);
        s->floor = content->len / CS * CS;
        s->written_end = content->len;
    }
}

static void store_free(fstore *s)
{
    free(s->cur.data);
    free(s->durable.data);
    pthread_mutex_destroy(&s->mu);
}

/* Counts the call and decides whether it fails. Called locked. */
static int inject(fstore *s, int kind, uint64_t a, uint64_t b)
{
    s->calls++;
    s->kcalls[kind]++;
    s->hash = (s->hash ^ ((uint64_t)kind << 56 ^ a * 31 ^ b)) * 1099511628211ull;
    if (s->trace && s->calls <= MAX_TRACE) {
        s->trace[s->calls - 1] = (unsigned char)kind;
    }
    int r = 0;
    if (s->dead) {
        r = -EIO;
    } else if (s->f_err) {
        unsigned long idx = s->f_kind == K_ANY ? s->calls : s->f_kind == kind ? s->kcalls[kind] : 0;
        if (idx != 0 && (s->f_from ? idx >= s->f_n : idx == s->f_n)) {
            if (s->fired++ == 0) {
                s->first_fired_kind = kind;
                s->mutations_at_fire = s->mutations;
            }
            r = s->f_err;
        }
    }
    if (tracing) {
        fprintf(stderr, "  call #%lu %s %#llx %llu -> %d\n", s->calls, kind_name[kind], (unsigned long long)a,
                (unsigned long long)b, r);
    }
    return r;
}

static int s_pread(void *opaque, void *buf, size_t len, uint64_t offset)
{
    fstore *s = opaque;
    pthread_mutex_lock(&s->mu);
    int r = inject(s, K_PREAD, offset, len);
    if (r == 0) {
        size_t n = offset < s->cur.len ? s->cur.len - (size_t)offset : 0;
        n = n < len ? n : len;
        if (n) {
            memcpy(buf, s->cur.data + offset, n);
        }
        memset((uint8_t *)buf + n, 0, len - n);
    }
    pthread_mutex_unlock(&s->mu);
    return r;
}

static int s_pwrite(void *opaque, const void *buf, size_t len, uint64_t offset)
{
    fstore *s = opaque;
    pthread_mutex_lock(&s->mu);
    int r = inject(s, K_PWRITE, offset, len);
    size_t n = len;
    if (r != 0) {
        n = 0;
        if (s->f_torn && !s->dead) {
            /* A device that fails part-way: the sectors before the middle made it (disks write
             * 512-byte sectors whole; a write inside one sector lands whole, yet fails). */
            uint64_t cut = (offset + len / 2) / 512 * 512;
            if (cut <= offset) {
                cut = (offset / 512 + 1) * 512;
            }
            n = cut < offset + len ? (size_t)(cut - offset) : len;
        }
    }
    if (n) {
        if (offset + n > s->cur.len) {
            blob_set_len(&s->cur, (size_t)(offset + n));
        }
        memcpy(s->cur.data + offset, buf, n);
        s->mutations++;
        if (offset + n > s->written_end) {
            s->written_end = offset + n;
        }
        if (r != 0 && s->fired == 1) {
            s->mutations_at_fire = s->mutations; /* the refused write's own torn part */
        }
    }
    pthread_mutex_unlock(&s->mu);
    return r;
}

static int s_flush(void *opaque)
{
    fstore *s = opaque;
    pthread_mutex_lock(&s->mu);
    int r = inject(s, K_FLUSH, 0, 0);
    if (r == 0) {
        blob_copy(&s->durable, &s->cur);
        /* The clusters data was written into, not the room the library extends the file by
         * ahead of its allocations (close cuts that back). */
        uint64_t used = (s->written_end + CS - 1) / CS * CS;
        s->floor = (used < s->cur.len ? used : s->cur.len) / CS * CS;
    }
    pthread_mutex_unlock(&s->mu);
    return r;
}

static int s_get_length(void *opaque, uint64_t *len)
{
    fstore *s = opaque;
    pthread_mutex_lock(&s->mu);
    int r = inject(s, K_GETLEN, 0, 0);
    if (r == 0) {
        *len = s->cur.len;
    }
    pthread_mutex_unlock(&s->mu);
    return r;
}

static int s_set_length(void *opaque, uint64_t len)
{
    fstore *s = opaque;
    pthread_mutex_lock(&s->mu);
    int r = inject(s, K_SETLEN, len, 0);
    if (r == 0) {
        if (len < s->floor) {
            if (s->exempt) {
                s->floor = len / CS * CS;
            } else if (!s->cut) {
                s->cut = 1;
                s->cut_to = len;
                s->cut_floor = s->floor;
                s->cut_call = s->calls;
            }
        }
        if (len != s->cur.len) {
            s->mutations++;
        }
        blob_set_len(&s->cur, (size_t)len);
    }
    pthread_mutex_unlock(&s->mu);
    return r;
}

static const qed_io_ops OPS = {sizeof(qed_io_ops), s_pread, s_pwrite, s_flush, s_get_length, s_set_length, NULL};

/* ---- The model: what the client did and what each call returned ------------------------- */

enum op_type { OP_WRITE, OP_ZERO, OP_FLUSH, OP_CLOSE, OP_TRUNC, OP_CHECK, OP_READ };
static const char *const op_name[] = {"write", "write_zeroes", "flush", "close", "truncate", "check", "read"};

typedef struct {
    int type;
    uint64_t off, len;
    uint8_t *data; /* NULL for zeros */
    int ret;
} op;

typedef struct {
    op ops[MAX_OPS];
    int n;
} model;

static void model_free(model *m)
{
    for (int i = 0; i < m->n; i++) {
        free(m->ops[i].data);
    }
    m->n = 0;
}

static op *model_add(model *m, int type, uint64_t off, uint64_t len)
{
    CHECK(m->n < MAX_OPS);
    op *o = &m->ops[m->n++];
    memset(o, 0, sizeof *o);
    o->type = type;
    o->off = off;
    o->len = len;
    return o;
}

/* Index of the last successful flush (or close), or -1: writes acknowledged before it must
 * survive. */
static int last_flush(const model *m)
{
    for (int i = m->n - 1; i >= 0; i--) {
        if ((m->ops[i].type == OP_FLUSH || m->ops[i].type == OP_CLOSE) && m->ops[i].ret == 0) {
            return i;
        }
    }
    return -1;
}

static int is_write(const op *o)
{
    return o->type == OP_WRITE || o->type == OP_ZERO;
}

static uint8_t op_byte(const op *o, uint64_t pos)
{
    return o->data ? o->data[pos - o->off] : 0;
}

/* ---- Reporting ---------------------------------------------------------------------------- */

typedef struct {
    const char *phase; /* "workload" or "open" */
    int v;             /* index in VARIANTS (for QED_FAULTS_ONLY) */
    int from, kind, err, torn;
    unsigned long n;
    int nth_kind; /* kind of the faulted call in the healthy run, or -1 */
    int end;
} scen;

enum end_mode { END_CLOSE, END_ABANDON, END_POWER, END_NMODES };
static const char *const end_name[] = {"close", "process death", "power loss"};

static long violations;
static char cur_scen[256];

/* Violations are counted per category; the first few of each are printed in full, and a table
 * at the end says which categories failed and where first. */
#define MAX_CATS 32
static struct {
    const char *cat;
    long count;
    char first[256];
} cats[MAX_CATS];

static void violation(const char *cat, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

static void violation(const char *cat, const char *fmt, ...)
{
    int i = 0;
    while (i < MAX_CATS - 1 && cats[i].cat && strcmp(cats[i].cat, cat) != 0) {
        i++;
    }
    if (!cats[i].cat) {
        cats[i].cat = cat;
        snprintf(cats[i].first, sizeof cats[i].first, "%s", cur_scen);
    }
    violations++;
    if (cats[i].count++ < 3 || tracing) {
        va_list ap;
        va_start(ap, fmt);
        fprintf(stderr, "VIOLATION (%s) [%s]: ", cat, cur_scen);
        vfprintf(stderr, fmt, ap);
        fprintf(stderr, "\n");
        va_end(ap);
    }
}

static void summary(void)
{
    for (int i = 0; i < MAX_CATS && cats[i].cat; i++) {
        fprintf(stderr, "%6ld x %s; first: %s\n", cats[i].count, cats[i].cat, cats[i].first);
    }
}

static void describe(const scen *sc)
{
    if (!sc->err) {
        snprintf(cur_scen, sizeof cur_scen, "%s sweep, no fault%s%s", sc->phase,
                 sc->phase[0] == 'w' ? ", end by " : "", sc->phase[0] == 'w' ? end_name[sc->end] : "");
        return;
    }
    char nth[48] = "";
    if (sc->nth_kind >= 0) {
        snprintf(nth, sizeof nth, " (a %s)", kind_name[sc->nth_kind]);
    }
    char end[64] = "";
    if (sc->phase[0] == 'w') {
        snprintf(end, sizeof end, ", end by %s", end_name[sc->end]);
    }
    snprintf(cur_scen, sizeof cur_scen, "%s sweep, %s %s call #%lu%s %s %s%s%s; rerun: QED_FAULTS_ONLY='%c %d %d %lu' "
             "QED_FAULTS_TRACE=1", sc->phase, sc->from ? "every" : "the", kind_name[sc->kind], sc->n, nth,
             sc->from ? "on fails with" : "fails with", sc->err == -EIO ? "-EIO" : "-ENOSPC",
             sc->torn ? " after writing part" : "", end, sc->phase[0], sc->v, sc->end, sc->n);
}

/* Checks `got` (guest bytes [off, off+len)) against the model: a byte must hold the value of the
 * last write acknowledged before op `sure` (or 0 if none), or the value of a write issued after
 * that one (acknowledged or not). Returns 0 if all match. */
static int check_bytes(const model *m, int sure, const uint8_t *got, uint64_t off, uint64_t len,
                       uint8_t *exp, const char *what)
{
    memset(exp, 0, len);
    for (int i = 0; i < sure && i < m->n; i++) {
        const op *o = &m->ops[i];
        if (!is_write(o) || o->ret != 0) {
            continue;
        }
        uint64_t a = o->off > off ? o->off : off;
        uint64_t e = o->off + o->len < off + len ? o->off + o->len : off + len;
        for (uint64_t p = a; p < e; p++) {
            exp[p - off] = op_byte(o, p);
        }
    }
    if (memcmp(exp, got, len) == 0) {
        return 0;
    }
    int bad = 0;
    for (uint64_t i = 0; i < len; i++) {
        if (exp[i] == got[i]) {
            continue;
        }
        uint64_t pos = off + i;
        int w = -1; /* the write whose value is sure */
        for (int k = (sure < m->n ? sure : m->n) - 1; k >= 0; k--) {
            const op *o = &m->ops[k];
            if (is_write(o) && o->ret == 0 && pos >= o->off && pos < o->off + o->len) {
                w = k;
                break;
            }
        }
        int ok = 0, later = 0;
        for (int k = w + 1; k < m->n && !ok; k++) {
            const op *o = &m->ops[k];
            if (is_write(o) && pos >= o->off && pos < o->off + o->len) {
                later++;
                ok = op_byte(o, pos) == got[i];
            }
        }
        if (ok) {
            continue;
        }
        bad = 1;
        if (later == 0 && w >= 0) {
            violation("acknowledged and flushed data lost", "%s: offset %llu reads 0x%02x, but op #%d (%s of %llu bytes at %llu, returned 0 "
                      "before a successful flush) wrote 0x%02x there: acknowledged data lost",
                      what, (unsigned long long)pos, got[i], w, op_name[m->ops[w].type],
                      (unsigned long long)m->ops[w].len, (unsigned long long)m->ops[w].off, exp[i]);
        } else if (later == 0) {
            violation("bytes appeared where nothing was written", "%s: offset %llu reads 0x%02x; nothing was ever written there (expected 0)", what,
                      (unsigned long long)pos, got[i]);
        } else {
            violation("neither the old nor a new value", "%s: offset %llu reads 0x%02x: neither the sure value 0x%02x (op #%d) nor any of "
                      "the %d later writes there", what, (unsigned long long)pos, got[i], exp[i], w, later);
        }
        break; /* one report per range: the rest is usually the same story */
    }
    return bad;
}

/* ---- The workload ------------------------------------------------------------------------- */

typedef struct {
    fstore *s;
    model *m;
    qed_image *img;
    uint8_t *buf, *exp; /* scratch, SIZE1 bytes each */
    int create_failed, open_failed;
    uint64_t size_ok;   /* size after the last successful truncate */
} run;

/* Traces a client call and flags internal errors: a Rust panic caught at the C boundary is a
 * bug whatever the storage did. */
static void done(const char *what, int idx, uint64_t off, uint64_t len, int ret)
{
    if (tracing) {
        fprintf(stderr, "op #%d %s %llu+%llu -> %d %s\n", idx, what, (unsigned long long)off,
                (unsigned long long)len, ret, ret ? qed_last_error() : "");
    }
    if (ret != 0 && strstr(qed_last_error(), "internal error") != NULL) {
        violation("engine panic (internal error)", "%s at %llu+%llu: %s", what, (unsigned long long)off,
                  (unsigned long long)len, qed_last_error());
    }
}

static void done_op(const model *m, const op *o)
{
    done(op_name[o->type], (int)(o - m->ops), o->off, o->len, o->ret);
}

static uint8_t *pattern(uint64_t len, uint32_t seed)
{
    uint8_t *b = malloc(len);
    CHECK(b != NULL);
    test_fill(b, len, seed);
    return b;
}

static void w_write(run *r, uint64_t off, uint64_t len, int vectored)
{
    if (!r->img) {
        return;
    }
    op *o = model_add(r->m, OP_WRITE, off, len);
    o->data = pattern(len, 7000 + (uint32_t)r->m->n);
    if (vectored) {
        struct iovec iov[3] = {{o->data, 100}, {o->data + 100, len / 2}, {o->data + 100 + len / 2, len - 100 - len / 2}};
        o->ret = qed_writev(r->img, off, iov, 3);
    } else {
        o->ret = qed_write(r->img, off, o->data, len);
    }
    done_op(r->m, o);
}

static void w_zero(run *r, uint64_t off, uint64_t len)
{
    if (r->img) {
        op *o = model_add(r->m, OP_ZERO, off, len);
        o->ret = qed_write_zeroes(r->img, off, len);
        done_op(r->m, o);
    }
}

static void w_flush(run *r)
{
    if (r->img) {
        op *o = model_add(r->m, OP_FLUSH, 0, 0);
        o->ret = qed_flush(r->img);
        done_op(r->m, o);
    }
}

static void w_trunc(run *r, uint64_t size)
{
    if (r->img) {
        op *o = model_add(r->m, OP_TRUNC, 0, size);
        o->ret = qed_truncate(r->img, size);
        done_op(r->m, o);
        if (o->ret == 0) {
            r->size_ok = size;
        }
    }
}

/* A check with repair in the middle of the session: what it cuts from the end are leaks. */
static void w_check(run *r)
{
    if (r->img) {
        qed_check_result cr = QED_INIT(qed_check_result);
        r->s->exempt = 1;
        op *o = model_add(r->m, OP_CHECK, 0, 0);
        o->ret = qed_check(r->img, QED_FIX_LEAKS | QED_FIX_ERRORS, &cr);
        r->s->exempt = 0;
        done_op(r->m, o);
    }
}

/* A read that succeeds must show, for each byte, the last acknowledged write or a later failed
 * one. */
static void w_read(run *r, uint64_t off, uint64_t len)
{
    if (!r->img) {
        return;
    }
    op *o = model_add(r->m, OP_READ, off, len);
    o->ret = qed_read(r->img, off, r->buf, len);
    done_op(r->m, o);
    if (o->ret == 0) {
        check_bytes(r->m, r->m->n, r->buf, off, len, r->exp, "a read during the session");
    }
}

static int blob_equal(const blob *a, const blob *b)
{
    return a->len == b->len && (a->len == 0 || memcmp(a->data, b->data, a->len) == 0);
}

/* The client's open: a failure must change nothing; it tries once more, as a client would. */
static void w_open(run *r)
{
    blob before = {0};
    for (int attempt = 0; attempt < 2 && !r->img; attempt++) {
        blob_copy(&before, &r->s->cur);
        int ret = qed_open_with_io(&OPS, r->s, OPEN_OPTS(QED_OPEN_RDWR), &r->img);
        done("open", -1, 0, 0, ret);
        if (ret != 0) {
            r->img = NULL;
            r->open_failed++;
            if (!blob_equal(&before, &r->s->cur)) {
                violation("a failed open changed the storage", "a failed open (%d, %s) changed the storage (length %zu -> %zu)", ret,
                          qed_last_error(), before.len, r->s->cur.len);
            }
        }
    }
    free(before.data);
}

static void workload(run *r)
{
    qed_create_options o = QED_INIT(qed_create_options);
    o.size = SIZE0;
    o.cluster_size = CS;
    o.table_size = 1;
    r->size_ok = SIZE0;
    int ret = qed_create_with_io(&OPS, r->s, &o);
    done("create", -1, 0, SIZE0, ret);
    if (ret != 0) {
        r->create_failed = 1;
        if (r->s->fired == 0) {
            violation("create failed without a fault", "qed_create_with_io failed (%d, %s) without a fault", ret, qed_last_error());
        } else if (ret != r->s->f_err) {
            violation("create returned another error than the storage", "qed_create_with_io returned %d for an injected %d (%s)", ret, r->s->f_err, qed_last_error());
        }
        return;
    }
    if (r->s->fired) {
        violation("create hid a storage error", "qed_create_with_io returned 0 though its storage refused a call");
    }
    w_open(r);
    w_write(r, 0, 8 * KiB, 0);                   /* allocating: creates the first L2 table */
    w_write(r, 2 * MiB + 8 * KiB, 4 * KiB, 0);   /* the second table */
    w_write(r, 20 * KiB + 100, 3000, 0);         /* partial cluster, staged L2 entry */
    w_flush(r);
    w_read(r, 0, 32 * KiB);
    w_write(r, 4 * KiB + 512, 1 * KiB, 0);       /* in place */
    w_write(r, 64 * KiB, 12 * KiB, 0);           /* allocating, three staged entries */
    w_zero(r, 2 * MiB + 8 * KiB, 4 * KiB);       /* over allocated data: written zeros */
    w_zero(r, 1 * MiB, 16 * KiB);                /* unallocated: zero clusters */
    w_flush(r);
    w_write(r, 1 * MiB + 4 * KiB + 1024, 2 * KiB, 0); /* into a zero cluster: allocates */
    w_check(r);
    w_trunc(r, SIZE1);
    w_write(r, 5 * MiB, 8 * KiB, 0);             /* the third table, past the old size */
    w_write(r, 3 * MiB + 512, 6 * KiB, 1);       /* vectored, allocating, unaligned to clusters */
    w_flush(r);
    w_read(r, 1 * MiB, 24 * KiB);
    w_write(r, 0, 4 * KiB, 0);                   /* in place, unflushed */
    w_write(r, 1536 * KiB, 4 * KiB, 0);          /* allocating, unflushed */
    w_zero(r, 64 * KiB + 100, 1000);             /* partial zeroing of allocated data, unflushed */
}

/* ---- Verification on healthy storage ----------------------------------------------------- */

static void read_all_and_check(run *r, qed_image *img, uint64_t size, int sure, const char *what)
{
    int ret = qed_read(img, 0, r->buf, size);
    if (ret != 0) {
        violation("reading the reopened image failed", "%s: reading the whole disk failed: %d (%s)", what, ret, qed_last_error());
        return;
    }
    check_bytes(r->m, sure, r->buf, 0, size, r->exp, what);
}

/* Reopens `content` read-write on healthy storage and checks everything the model promises. */
static void verify_reopen(run *r, const blob *content)
{
    fstore h;
    store_init(&h, content);
    qed_image *img;
    if (tracing) {
        fprintf(stderr, "reopen on healthy storage (%zu bytes)\n", content->len);
    }
    int ret = qed_open_with_io(&OPS, &h, OPEN_OPTS(QED_OPEN_RDWR), &img);
    done("healthy reopen", -1, 0, 0, ret);
    if (ret != 0) {
        violation("the reopen on healthy storage failed", "the read-write reopen on healthy storage failed: %d (%s)", ret, qed_last_error());
        store_free(&h);
        return;
    }
    int sure = last_flush(r->m);
    qed_info info = QED_INIT(qed_info);
    CHECK_RET(qed_get_info(img, &info), 0);
    /* The resize is sure once a flush follows it; until then either size may be on disk. */
    int trunc_sure = 0, trunc_tried = 0;
    for (int i = 0; i < r->m->n; i++) {
        if (r->m->ops[i].type == OP_TRUNC) {
            trunc_tried = 1;
            trunc_sure = r->m->ops[i].ret == 0 && i < sure;
        }
    }
    uint64_t size = info.virtual_size;
    if (trunc_sure ? size != SIZE1 : !(size == SIZE0 || (trunc_tried && size == SIZE1))) {
        violation("wrong virtual size after reopen", "reopened virtual size %llu (resize to %llu %s)", (unsigned long long)size,
                  (unsigned long long)SIZE1, trunc_sure ? "acknowledged and flushed" : trunc_tried ? "tried" : "never tried");
        size = size < SIZE0 ? size : SIZE0;
    }
    if (info.needs_check) {
        violation("need-check bit left set", "the need-check bit is still set after a read-write open");
    }
    read_all_and_check(r, img, size, sure, "after reopen");
    qed_check_result cr = QED_INIT(qed_check_result);
    ret = qed_check(img, QED_FIX_LEAKS | QED_FIX_ERRORS, &cr);
    done("healthy check with repair", -1, 0, 0, ret);
    if (ret != 0 || cr.corruptions || cr.leaks || cr.check_errors) {
        violation("repair left the image unclean", "qed_check with repair: ret %d, %llu corruptions, %llu leaks, %llu check errors left (%s)",
                  ret, (unsigned long long)cr.corruptions, (unsigned long long)cr.leaks,
                  (unsigned long long)cr.check_errors, qed_last_error());
    }
    read_all_and_check(r, img, size, sure, "after qed_check repair");
    ret = qed_check(img, 0, &cr);
    if (ret != 0 || cr.corruptions || cr.leaks || cr.check_errors) {
        violation("check unclean after repair", "qed_check after repair: ret %d, %llu corruptions, %llu leaks, %llu check errors",
                  ret, (unsigned long long)cr.corruptions, (unsigned long long)cr.leaks,
                  (unsigned long long)cr.check_errors);
    }
    ret = qed_close(img);
    if (ret != 0) {
        violation("close failed on healthy storage", "closing the reopened image failed: %d (%s)", ret, qed_last_error());
    }
    store_free(&h);
}

typedef struct {
    long states, create_failed, open_failed, close_failed, close_ok, faults_fired;
} tally;

/* One state: the workload with the fault of `sc`, ended as `sc->end` says, then verified. */
static void workload_state(const scen *sc, uint8_t *buf, uint8_t *exp, tally *t)
{
    fstore st, *s = &st;
    store_init(s, NULL);
    s->f_kind = sc->kind;
    s->f_from = sc->from;
    s->f_n = sc->n;
    s->f_err = sc->err;
    s->f_torn = sc->torn;
    describe(sc);
    model m;
    m.n = 0;
    run r;
    memset(&r, 0, sizeof r);
    r.s = s;
    r.m = &m;
    r.buf = buf;
    r.exp = exp;
    workload(&r);
    t->states++;
    if (r.create_failed) {
        t->create_failed++;
        t->faults_fired++;
        model_free(&m);
        store_free(s);
        return;
    }
    t->open_failed += r.open_failed;
    blob content = {0};
    if (r.img) {
        if (sc->end == END_CLOSE) {
            op *o = model_add(&m, OP_CLOSE, 0, 0);
            o->ret = qed_close(r.img);
            done_op(&m, o);
            if (o->ret == 0) {
                t->close_ok++;
            } else {
                t->close_failed++;
            }
            blob_copy(&content, &s->cur);
        } else {
            blob_copy(&content, sc->end == END_POWER ? &s->durable : &s->cur);
            /* The abandoned handle: free its memory without touching the image any more. */
            s->dead = 1;
            if (tracing) {
                fprintf(stderr, "abandoned: the storage is dead from here on\n");
            }
            (void)qed_close(r.img);
        }
    } else {
        blob_copy(&content, sc->end == END_POWER ? &s->durable : &s->cur);
    }
    if (sc->err && sc->n && !s->fired && sc->nth_kind >= 0) {
        violation("nondeterministic calls", "the fault never fired: the workload's calls differ from the healthy run");
    }
    t->faults_fired += s->fired != 0;
    if (s->cut) {
        violation("storage cut below its flushed clusters", "the storage was cut to %llu bytes (call #%lu), below the end %llu of the last flushed cluster",
                  (unsigned long long)s->cut_to, s->cut_call, (unsigned long long)s->cut_floor);
    }
    verify_reopen(&r, &content);
    free(content.data);
    model_free(&m);
    store_free(s);
}

/* The healthy session: the calls made before its end (*pre) and through a clean close
 * (*total), per kind, the kind of every call, and a hash of the whole sequence. */
static void healthy_counts(uint8_t *buf, uint8_t *exp, unsigned char *trace, unsigned long *pre,
                           unsigned long *pre_kind, unsigned long *total, unsigned long *total_kind,
                           uint64_t *hash)
{
    fstore s;
    store_init(&s, NULL);
    s.trace = trace;
    model m;
    m.n = 0;
    run r;
    memset(&r, 0, sizeof r);
    r.s = &s;
    r.m = &m;
    r.buf = buf;
    r.exp = exp;
    workload(&r);
    CHECK(r.img != NULL);
    *pre = s.calls;
    memcpy(pre_kind, s.kcalls, sizeof s.kcalls);
    CHECK_RET(qed_close(r.img), 0);
    *total = s.calls;
    memcpy(total_kind, s.kcalls, sizeof s.kcalls);
    *hash = s.hash;
    CHECK(s.calls <= MAX_TRACE);
    model_free(&m);
    store_free(&s);
}

/* ---- The open sweep ------------------------------------------------------------------------ */

/* A dirty image, as a crash leaves it: flushed data, unflushed writes, the need-check bit set,
 * and leaks for the repair to reclaim: the L2 entry of an unflushed allocation below later data
 * and a table is dropped (as when it was only staged: the data must move down), and junk
 * clusters trail the file (as a preallocated stretch leaves them). */
static void make_dirty(blob *out, model *m, uint8_t *buf, uint8_t *exp)
{
    fstore s;
    store_init(&s, NULL);
    run r;
    memset(&r, 0, sizeof r);
    r.s = &s;
    r.m = m;
    r.buf = buf;
    r.exp = exp;
    qed_create_options o = QED_INIT(qed_create_options);
    o.size = SIZE0;
    o.cluster_size = CS;
    o.table_size = 1;
    CHECK_RET(qed_create_with_io(&OPS, &s, &o), 0);
    CHECK_RET(qed_open_with_io(&OPS, &s, OPEN_OPTS(QED_OPEN_RDWR), &r.img), 0);
    w_write(&r, 0, 16 * KiB, 0);
    w_write(&r, 100 * KiB, 8 * KiB, 0);
    w_flush(&r);
    w_write(&r, 4 * KiB, 4 * KiB, 0);            /* in place, unflushed */
    w_write(&r, 200 * KiB, 4 * KiB, 0);          /* allocating, unflushed: its entry is dropped */
    w_write(&r, 2 * MiB + 64 * KiB, 8 * KiB, 0); /* a new table and data after it */
    w_write(&r, 300 * KiB, 4 * KiB, 0);          /* allocating, unflushed */
    for (int i = 0; i < m->n; i++) {
        CHECK(m->ops[i].ret == 0);
    }
    blob_copy(out, &s.cur);
    s.dead = 1;
    (void)qed_close(r.img);
    store_free(&s);
    CHECK(out->len > 64 && (out->data[16] & 2)); /* the need-check bit (features bit 1) */
    uint64_t l1, l2;
    memcpy(&l1, out->data + 40, 8); /* header: l1_table_offset */
    memcpy(&l2, out->data + l1, 8); /* L1[0]: the table of the first 2 MiB */
    CHECK(l2 != 0 && l2 % CS == 0 && l2 + CS <= out->len);
    uint64_t zero = 0, idx = 200 * KiB / CS, host;
    memcpy(&host, out->data + l2 + idx * 8, 8);
    CHECK(host != 0 && host + CS < out->len); /* not the last cluster: a hole to fill */
    memcpy(out->data + l2 + idx * 8, &zero, 8);
    size_t end = out->len / CS * CS + (out->len % CS ? CS : 0);
    blob_set_len(out, end + 3 * CS);
    test_fill(out->data + end, 3 * CS, 99);
}

static void open_state(const scen *sc, const blob *dirty, model *m, uint8_t *buf, uint8_t *exp,
                       tally *t, long *identical_required)
{
    describe(sc);
    fstore s;
    store_init(&s, dirty);
    s.f_kind = sc->kind;
    s.f_from = sc->from;
    s.f_n = sc->n;
    s.f_err = sc->err;
    s.f_torn = sc->torn;
    run r;
    memset(&r, 0, sizeof r);
    r.m = m;
    r.buf = buf;
    r.exp = exp;
    int sure = last_flush(m);
    qed_image *img = NULL;
    int ret = qed_open_with_io(&OPS, &s, OPEN_OPTS(QED_OPEN_RDWR), &img);
    done("faulty open", -1, 0, 0, ret);
    t->states++;
    t->faults_fired += s.fired != 0;
    if (sc->err && !s.fired && sc->nth_kind >= 0) {
        violation("nondeterministic calls", "the fault never fired: the open's calls differ from the healthy run");
    }
    if (ret != 0) {
        t->open_failed++;
        if (!sc->err) {
            violation("the healthy repairing open failed", "the healthy open failed: %d (%s)", ret, qed_last_error());
        }
        /* No error path writes: after the refused call nothing changed the image. So an open
         * refused before its repair's first write leaves the image byte-identical; one refused
         * later (a read after the repair's writes landed, or a refused write) keeps what the
         * repair had done, and the data checks below must still hold. */
        if (s.fired && s.mutations != s.mutations_at_fire) {
            violation("a failed open wrote after the failure", "the open failed (%d: %s) after a refused %s, then changed the image %lu more times",
                      ret, qed_last_error(), kind_name[s.first_fired_kind], s.mutations - s.mutations_at_fire);
        }
        if (s.fired && s.mutations_at_fire == 0) {
            (*identical_required)++;
            if (!blob_equal(dirty, &s.cur)) {
                uint64_t n = dirty->len < s.cur.len ? dirty->len : s.cur.len;
                long d = test_first_diff(dirty->data, s.cur.data, (size_t)n);
                violation("a failed open changed the image before writing", "the open failed (%d: %s) after a refused %s before any write, yet changed the image: length %zu -> "
                          "%zu, first differing byte %ld", ret, qed_last_error(), kind_name[s.first_fired_kind],
                          dirty->len, s.cur.len, d);
            }
        }
    } else {
        qed_info info = QED_INIT(qed_info);
        CHECK_RET(qed_get_info(img, &info), 0);
        s.f_err = 0; /* from here on the storage is healthy: check what the open left */
        read_all_and_check(&r, img, SIZE0, sure, "after the faulty open succeeded");
        qed_check_result cr = QED_INIT(qed_check_result);
        ret = qed_check(img, 0, &cr);
        if (ret != 0 || cr.corruptions || cr.leaks || cr.check_errors) {
            violation("a faulty open succeeded but left the image unclean", "the faulty open succeeded but left: ret %d, %llu corruptions, %llu leaks, %llu check errors",
                      ret, (unsigned long long)cr.corruptions, (unsigned long long)cr.leaks,
                      (unsigned long long)cr.check_errors);
        }
        ret = qed_close(img);
        if (ret != 0) {
            violation("close failed on healthy storage", "closing after the faulty open failed: %d (%s)", ret, qed_last_error());
        }
    }
    verify_reopen(&r, &s.cur);
    store_free(&s);
}

/* ---- The sweeps ---------------------------------------------------------------------------- */

typedef struct {
    int from, kind, err, torn;
} variant;

/* Single faults at every call of any kind cover the Nth call of each kind too (the workload is
 * deterministic: checked below); persistent faults differ per kind. */
static const variant VARIANTS[] = {
    {0, K_ANY, -EIO, 0},    {0, K_ANY, -ENOSPC, 0},  {0, K_PWRITE, -EIO, 1},
    {1, K_ANY, -EIO, 0},    {1, K_PREAD, -EIO, 0},   {1, K_PWRITE, -ENOSPC, 0},
    {1, K_PWRITE, -EIO, 1}, {1, K_FLUSH, -EIO, 0},   {1, K_GETLEN, -EIO, 0},
    {1, K_SETLEN, -ENOSPC, 0},
};
#define NVARIANTS (sizeof VARIANTS / sizeof VARIANTS[0])

int main(void)
{
    int vg = test_under_valgrind();
    const char *st = getenv("QED_FAULTS_STRIDE");
    unsigned long stride = st ? strtoul(st, NULL, 10) : vg ? 3 : 1;
    if (stride == 0) {
        stride = 1;
    }
    /* QED_FAULTS_ONLY='w V END N' or 'o V 0 N' runs one state (as printed with a violation). */
    const char *only = getenv("QED_FAULTS_ONLY");
    char only_phase = 0;
    int only_v = -1, only_end = -1;
    unsigned long only_n = 0;
    if (only && (sscanf(only, " %c %d %d %lu", &only_phase, &only_v, &only_end, &only_n) != 4 ||
                 only_v < 0 || (size_t)only_v >= NVARIANTS || only_end < 0 || only_end >= END_NMODES)) {
        fprintf(stderr, "QED_FAULTS_ONLY='%s': expected 'w|o VARIANT END N'\n", only);
        return 1;
    }
    uint8_t *buf = malloc(SIZE1), *exp = malloc(SIZE1);
    CHECK(buf != NULL && exp != NULL);

    /* The healthy session, twice: its calls must be the same (so that "call N" names one call
     * in every run), counted up to the end of the session and through a clean close. */
    unsigned char *trace = calloc(MAX_TRACE, 1);
    CHECK(trace != NULL);
    unsigned long pre[2], total[2], pre_kind[2][K_NKINDS], total_kind[2][K_NKINDS];
    uint64_t hash[2];
    for (int i = 0; i < 2; i++) {
        healthy_counts(buf, exp, trace, &pre[i], pre_kind[i], &total[i], total_kind[i], &hash[i]);
    }
    if (pre[0] != pre[1] || total[0] != total[1] || hash[0] != hash[1]) {
        fprintf(stderr, "the workload is not deterministic: %lu/%lu calls (hash %llx), then %lu/%lu (%llx)\n",
                pre[0], total[0], (unsigned long long)hash[0], pre[1], total[1], (unsigned long long)hash[1]);
        return 1;
    }
    printf("healthy workload: %lu storage calls (%lu pread, %lu pwrite, %lu flush, %lu get_length, %lu set_length), "
           "%lu before close\n", total[0], total_kind[0][K_PREAD], total_kind[0][K_PWRITE], total_kind[0][K_FLUSH],
           total_kind[0][K_GETLEN], total_kind[0][K_SETLEN], pre[0]);

    /* The dirty image of the open sweep, and the calls of its healthy repairing open. */
    model dm = {.n = 0};
    blob dirty = {0};
    make_dirty(&dirty, &dm, buf, exp);
    unsigned long otrace_n, okind[K_NKINDS];
    unsigned char *otrace = calloc(MAX_TRACE, 1);
    CHECK(otrace != NULL);
    {
        fstore a;
        store_init(&a, &dirty);
        a.trace = otrace;
        qed_image *img;
        CHECK_RET(qed_open_with_io(&OPS, &a, OPEN_OPTS(QED_OPEN_RDWR), &img), 0);
        otrace_n = a.calls;
        memcpy(okind, a.kcalls, sizeof okind);
        CHECK(otrace_n <= MAX_TRACE);
        a.trace = NULL;
        CHECK(a.kcalls[K_SETLEN] > 0 && a.kcalls[K_PWRITE] > 2); /* the open moves clusters and cuts */
        CHECK_RET(qed_close(img), 0);
        store_free(&a);
    }
    printf("healthy repairing open: %lu storage calls (%lu pread, %lu pwrite, %lu flush, %lu get_length, %lu "
           "set_length)\n", otrace_n, okind[K_PREAD], okind[K_PWRITE], okind[K_FLUSH], okind[K_GETLEN], okind[K_SETLEN]);

    tally t, ot;
    memset(&t, 0, sizeof t);
    memset(&ot, 0, sizeof ot);
    long identical = 0;
    if (only) {
        const variant *va = &VARIANTS[only_v];
        tracing = getenv("QED_FAULTS_TRACE") != NULL;
        unsigned char *tr = only_phase == 'o' ? otrace : trace;
        scen sc = {only_phase == 'o' ? "open" : "workload", only_v, va->from, va->kind, va->err, va->torn,
                   only_n, va->kind == K_ANY ? (only_n >= 1 && only_n <= MAX_TRACE ? tr[only_n - 1] : -1) : va->kind,
                   only_end};
        if (only_n == 0) { /* N 0: the healthy run */
            sc.err = 0;
        }
        if (only_phase == 'o') {
            open_state(&sc, &dirty, &dm, buf, exp, &ot, &identical);
        } else {
            workload_state(&sc, buf, exp, &t);
        }
    } else {
        /* Without a fault, every ending must verify too. */
        for (int end = 0; end < END_NMODES; end++) {
            scen sc = {"workload", 0, 0, K_ANY, 0, 0, 0, -1, end};
            workload_state(&sc, buf, exp, &t);
        }
        if (violations) {
            fprintf(stderr, "the healthy workload already fails; not sweeping\n");
            summary();
            return 1;
        }
        unsigned long rot = 0;
        for (size_t v = 0; v < NVARIANTS; v++) {
            const variant *va = &VARIANTS[v];
            for (int end = 0; end < END_NMODES; end++) {
                /* Abandoned sessions end before close: only the calls before it can fail. */
                unsigned long count = end == END_CLOSE ? (va->kind == K_ANY ? total[0] : total_kind[0][va->kind])
                                                       : (va->kind == K_ANY ? pre[0] : pre_kind[0][va->kind]);
                for (unsigned long n = 1 + rot++ % stride; n <= count; n += stride) {
                    scen sc = {"workload", (int)v, va->from, va->kind, va->err, va->torn, n,
                               va->kind == K_ANY ? trace[n - 1] : va->kind, end};
                    workload_state(&sc, buf, exp, &t);
                }
            }
        }
        printf("workload sweep: %ld states (stride %lu), %ld with a fault that fired; %ld creates refused, %ld "
               "opens refused, %ld closes failed, %ld closed cleanly; %ld violations\n", t.states, stride,
               t.faults_fired, t.create_failed, t.open_failed, t.close_failed, t.close_ok, violations);
        /* The sweep must really have reached the paths it claims to test. */
        CHECK(t.close_failed > 0 && t.close_ok > 0 && t.create_failed > 0 && t.open_failed > 0);

        long before = violations;
        {
            scen sc = {"open", 0, 0, K_ANY, 0, 0, 0, -1, 0};
            open_state(&sc, &dirty, &dm, buf, exp, &ot, &identical);
        }
        for (size_t v = 0; v < NVARIANTS; v++) {
            const variant *va = &VARIANTS[v];
            unsigned long count = va->kind == K_ANY ? otrace_n : okind[va->kind];
            for (unsigned long n = 1 + rot++ % stride; n <= count; n += stride) {
                scen sc = {"open", (int)v, va->from, va->kind, va->err, va->torn, n,
                           va->kind == K_ANY ? otrace[n - 1] : va->kind, 0};
                open_state(&sc, &dirty, &dm, buf, exp, &ot, &identical);
            }
        }
        printf("open sweep: %ld states, %ld opens failed (%ld before any write: the image must be unchanged); "
               "%ld violations\n", ot.states, ot.open_failed, identical, violations - before);
        CHECK(ot.open_failed > 0 && identical > 0);
    }
    model_free(&dm);
    free(dirty.data);
    free(trace);
    free(otrace);
    free(buf);
    free(exp);
    if (violations) {
        fprintf(stderr, "FAILED: %ld violations in %ld states, by kind:\n", violations, t.states + ot.states);
        summary();
        return 1;
    }
    printf("%ld states checked, 0 violations\n", t.states + ot.states);
    return 0;
}
