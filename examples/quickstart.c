/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/* The README's main job: create a QED image, write to it, check it and read it back, through
 * the installed library found with pkg-config:
 *   cc quickstart.c $(pkg-config --cflags --libs qed) -o quickstart && ./quickstart disk.qed */
#include <qed.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int fail(const char *what, int ret)
{
    fprintf(stderr, "%s: %s (%s)\n", what, qed_strerror(ret), qed_last_error());
    return 1;
}

int main(int argc, char **argv)
{
    const char *path = argc > 1 ? argv[1] : "quickstart.qed";
    qed_create_options opts = QED_INIT(qed_create_options);
    opts.size = 1ull << 30; /* 1 GiB; cluster and table sizes take QEMU's defaults */
    int r = qed_create(path, &opts);
    if (r < 0) return fail("qed_create", r);

    qed_image *img;
    r = qed_open(path, QED_OPEN_RDWR, &img);
    if (r < 0) return fail("qed_open", r);

    size_t len = 200000;
    unsigned char *data = malloc(len), *back = malloc(len);
    if (!data || !back) return 1;
    for (size_t i = 0; i < len; i++) data[i] = (unsigned char)(i % 251);
    if ((r = qed_write(img, 123456, data, len)) < 0) return fail("qed_write", r);
    if ((r = qed_flush(img)) < 0) return fail("qed_flush", r);

    qed_check_result cr = QED_INIT(qed_check_result);
    if ((r = qed_check(img, 0, &cr)) < 0) return fail("qed_check", r);
    printf("check: %llu corruptions, %llu leaks, %llu/%llu clusters allocated\n",
           (unsigned long long)cr.corruptions, (unsigned long long)cr.leaks,
           (unsigned long long)cr.allocated_clusters, (unsigned long long)cr.total_clusters);

    if ((r = qed_read(img, 123456, back, len)) < 0) return fail("qed_read", r);
    if (memcmp(data, back, len) != 0) {
        fprintf(stderr, "read back differs from what was written\n");
        return 1;
    }
    if ((r = qed_close(img)) < 0) return fail("qed_close", r);
    printf("%s: libqed %s wrote, checked and read back %zu bytes\n", path, qed_version(), len);
    free(data);
    free(back);
    return cr.corruptions || cr.leaks ? 1 : 0;
}
