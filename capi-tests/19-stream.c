/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/* qed_stream: an overlay over a raw base is streamed with a progress callback that counts its
 * calls and checks that done never decreases and ends at total; afterwards the header has no
 * backing file, qemu-img check is clean and qemu-img compare matches the chain as it was. A
 * callback that returns nonzero stops the stream with -ECANCELED, the backing file stays and the
 * image reads the same. QED_OPEN_COPY_ON_READ: a read from the backing file allocates the
 * clusters in the overlay; the flag on a read-only open is refused with -EINVAL naming it. */
#include "util.h"

#define CS 65536u
#define SIZE (4u << 20)

typedef struct {
    int calls;
    uint64_t last_done, total;
    int monotonic;
    uint64_t cancel_at; /* stop once done reaches this (0: never) */
} counter;

static int on_progress(void *opaque, uint64_t done, uint64_t total)
{
    counter *c = opaque;
    if (c->calls > 0 && done < c->last_done) {
        c->monotonic = 0;
    }
    if (done > total) {
        c->monotonic = 0;
    }
    c->calls++;
    c->last_done = done;
    c->total = total;
    return c->cancel_at != 0 && done >= c->cancel_at;
}

static uint8_t *base_data(void)
{
    uint8_t *d = malloc(SIZE);
    CHECK(d != NULL);
    test_fill(d, SIZE, 7);
    memset(d + (1u << 20), 0, 512u << 10); /* a zero range: becomes zero clusters */
    return d;
}

static void make_chain(const uint8_t *data)
{
    FILE *f = fopen(test_path("base.raw"), "wb");
    CHECK(f != NULL);
    CHECK(fwrite(data, 1, SIZE, f) == SIZE);
    CHECK(fclose(f) == 0);
    qed_create_options o = QED_INIT(qed_create_options);
    o.backing_file = "base.raw";
    o.backing_format = "raw";
    CHECK_RET(qed_create(test_path("top.qed"), &o), 0);
    /* A partial cluster of the overlay's own. */
    qed_image *img;
    CHECK_RET(qed_open(test_path("top.qed"), QED_OPEN_RDWR, &img), 0);
    uint8_t buf[1000];
    memset(buf, 0x42, sizeof buf);
    CHECK_RET(qed_write(img, 3 * CS + 100, buf, sizeof buf), 0);
    CHECK_RET(qed_close(img), 0);
    CHECK(test_sh("qemu-img convert -f qed -O raw '%s' '%s'", test_path("top.qed"),
                  test_path("expect.raw")) == 0);
}

static void same_as_chain(qed_image *img)
{
    uint8_t *got = malloc(SIZE), *want = malloc(SIZE);
    CHECK(got != NULL && want != NULL);
    FILE *f = fopen(test_path("expect.raw"), "rb");
    CHECK(f != NULL);
    CHECK(fread(want, 1, SIZE, f) == SIZE);
    fclose(f);
    CHECK_RET(qed_read(img, 0, got, SIZE), 0);
    CHECK(memcmp(got, want, SIZE) == 0);
    free(got);
    free(want);
}

static unsigned status_at(qed_image *img, uint64_t off)
{
    qed_extent e = QED_INIT(qed_extent);
    CHECK_RET(qed_block_status(img, off, CS, &e), 0);
    return e.status;
}

static int has_backing(qed_image *img)
{
    qed_info info = QED_INIT(qed_info);
    CHECK_RET(qed_get_info(img, &info), 0);
    return (int)info.has_backing_file;
}

int main(void)
{
    uint8_t *data = base_data();
    make_chain(data);
    qed_image *img;

    /* Cancelled half way: -ECANCELED, the backing file stays, the image reads the same. */
    CHECK_RET(qed_open(test_path("top.qed"), QED_OPEN_RDWR, &img), 0);
    counter c = {.monotonic = 1, .cancel_at = 2u << 20};
    qed_progress p = QED_INIT(qed_progress);
    p.progress = on_progress;
    p.opaque = &c;
    CHECK_ERR(qed_stream(img, &p), -ECANCELED, "qed_stream");
    CHECK(c.calls >= 2 && c.monotonic && c.last_done >= c.cancel_at && c.last_done < SIZE);
    CHECK(has_backing(img));
    CHECK(status_at(img, 0) == QED_BLOCK_DATA);
    CHECK(status_at(img, SIZE - CS) == QED_BLOCK_UNALLOCATED);
    same_as_chain(img);
    CHECK_RET(qed_close(img), 0);
    CHECK(test_sh("qemu-img check -q -f qed '%s'", test_path("top.qed")) == 0);

    /* The second stream finishes, reporting monotonic progress up to the total. */
    CHECK_RET(qed_open(test_path("top.qed"), QED_OPEN_RDWR, &img), 0);
    c = (counter){.monotonic = 1};
    CHECK_RET(qed_stream(img, &p), 0);
    CHECK(c.calls >= 3 && c.monotonic);
    CHECK(c.last_done == SIZE && c.total == SIZE);
    CHECK(!has_backing(img));
    CHECK(status_at(img, (1u << 20) + CS) == QED_BLOCK_ZERO);
    same_as_chain(img);
    /* No backing file: nothing to do; NULL progress is allowed. */
    CHECK_RET(qed_stream(img, NULL), 0);
    CHECK_RET(qed_stream(NULL, NULL), -EINVAL);
    CHECK_RET(qed_close(img), 0);
    CHECK(test_sh("qemu-img check -q -f qed '%s'", test_path("top.qed")) == 0);
    CHECK(test_sh("qemu-img compare -q -f qed -F raw '%s' '%s'", test_path("top.qed"),
                  test_path("expect.raw")) == 0);
    CHECK(test_sh("qemu-img info '%s' | grep -q 'backing file'", test_path("top.qed")) != 0);

    /* Copy-on-read: refused read-only, naming the flag; read-write, reads allocate. */
    make_chain(data);
    CHECK_ERR(qed_open(test_path("top.qed"), QED_OPEN_COPY_ON_READ, &img), -EINVAL,
              "QED_OPEN_COPY_ON_READ");
    CHECK_RET(qed_open(test_path("top.qed"), QED_OPEN_RDWR | QED_OPEN_COPY_ON_READ, &img), 0);
    CHECK(status_at(img, 2 * CS) == QED_BLOCK_UNALLOCATED);
    uint8_t buf[100];
    CHECK_RET(qed_read(img, 2 * CS + 10, buf, sizeof buf), 0);
    CHECK(memcmp(buf, data + 2 * CS + 10, sizeof buf) == 0);
    CHECK(status_at(img, 2 * CS) == QED_BLOCK_DATA);
    CHECK(status_at(img, 5 * CS) == QED_BLOCK_UNALLOCATED);
    CHECK(has_backing(img));
    same_as_chain(img); /* copies everything */
    CHECK_RET(qed_close(img), 0);
    CHECK(test_sh("qemu-img check -q -f qed '%s'", test_path("top.qed")) == 0);
    CHECK(test_sh("qemu-img compare -q -f qed -F raw '%s' '%s'", test_path("top.qed"),
                  test_path("expect.raw")) == 0);
    /* Every cluster is the overlay's now: the same bytes without the backing file. */
    CHECK(test_sh("qemu-img compare -q -f qed -F raw 'json:{\"driver\":\"qed\",\"file\":{\"driver\":\"file\",\"filename\":\"%s\"},\"backing\":null}' '%s'",
                  test_path("top.qed"), test_path("expect.raw")) == 0);

    free(data);
    test_cleanup();
    return 0;
}
