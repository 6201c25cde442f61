/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/* Create, open, info, close; close(NULL); version and error strings. */
#include "util.h"

int main(void)
{
    const char *p = test_path("life.qed");
    qed_create_options o = QED_INIT(qed_create_options);
    o.size = 1 << 30;
    CHECK_RET(qed_create(p, &o), 0);

    qed_image *img = NULL;
    CHECK_RET(qed_open(p, QED_OPEN_RDWR, &img), 0);
    CHECK(img != NULL);
    qed_info info = QED_INIT(qed_info);
    CHECK_RET(qed_get_info(img, &info), 0);
    CHECK(info.virtual_size == 1u << 30);
    CHECK(info.cluster_size == 65536);
    CHECK(info.table_size == 4);
    CHECK(info.header_size == 1);
    CHECK(info.writable == 1);
    CHECK(info.file_size == 5 * 65536);
    CHECK(info.has_backing_file == 0);
    CHECK_RET(qed_close(img), 0);
    CHECK_RET(qed_close(NULL), 0);

    char want[32];
    snprintf(want, sizeof want, "%d.%d.%d", QED_VERSION_MAJOR, QED_VERSION_MINOR, QED_VERSION_PATCH);
    CHECK(strcmp(qed_version(), want) == 0);
    CHECK(strcmp(qed_strerror(-EINVAL), qed_strerror(EINVAL)) == 0);
    CHECK(qed_strerror(123456) != NULL);
    CHECK(strcmp(qed_last_error(), "") == 0);

    /* A read-only open refuses writes and says so. */
    CHECK_RET(qed_open(p, 0, &img), 0);
    char b[512] = {0};
    CHECK_RET(qed_write(img, 0, b, sizeof b), -EROFS);
    CHECK(strstr(qed_last_error(), "read-only") != NULL);
    CHECK_RET(qed_close(img), 0);

    CHECK(test_sh("qemu-img check -q '%s'", p) == 0);
    test_cleanup();
    return 0;
}
