/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * qedcheck: `qemu-img check -f qed` for libqed, for timing qed_check against qemu-img check.
 *
 *   qedcheck [-r leaks|all] [-U] [-T] FILE
 *
 * Opens FILE (read-only unless -r; QED_OPEN_CHECK, so the open itself repairs nothing), runs
 * qed_check and prints qemu-img check's summary. -T prints the time spent in qed_check alone
 * on stderr. Exit status as qemu-img check: 0 clean, 1 check failed to run, 2 corruptions,
 * 3 leaks only.
 */
#define _GNU_SOURCE
#include <qed.h>

#include "benchutil.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

const char *bench_name = "qedcheck";

int main(int argc, char **argv)
{
    unsigned fix = 0, flags = QED_OPEN_CHECK;
    int timing = 0, c;

    while ((c = getopt(argc, argv, "hr:UT")) != -1) {
        switch (c) {
        case 'r':
            if (!strcmp(optarg, "leaks")) {
                fix = QED_FIX_LEAKS;
            } else if (!strcmp(optarg, "all")) {
                fix = QED_FIX_LEAKS | QED_FIX_ERRORS;
            } else {
                fprintf(stderr, "qedcheck: -r takes leaks or all\n");
                return 1;
            }
            flags |= QED_OPEN_RDWR;
            break;
        case 'U':
            flags |= QED_OPEN_FORCE_SHARE;
            break;
        case 'T':
            timing = 1;
            break;
        default:
            fprintf(stderr, "usage: qedcheck [-r leaks|all] [-U] [-T] FILE\n");
            return c == 'h' ? 0 : 1;
        }
    }
    if (optind != argc - 1) {
        fprintf(stderr, "usage: qedcheck [-r leaks|all] [-U] [-T] FILE\n");
        return 1;
    }
    if (fix) {
        flags &= ~(unsigned)QED_OPEN_FORCE_SHARE;
    }

    qed_image *img;
    int r = qed_open(argv[optind], flags, &img);
    if (r < 0) {
        fprintf(stderr, "qedcheck: %s\n", qed_last_error());
        return 1;
    }
    qed_check_result res = QED_INIT(qed_check_result);
    double t0 = now_s();
    r = qed_check(img, fix, &res);
    double t1 = now_s();
    if (r < 0) {
        fprintf(stderr, "qedcheck: %s\n", qed_last_error());
        qed_close(img);
        return 1;
    }
    if (timing) {
        fprintf(stderr, "qed_check: %.6f s\n", t1 - t0);
    }
    if (qed_close(img) < 0) {
        fprintf(stderr, "qedcheck: qed_close: %s\n", qed_last_error());
        return 1;
    }

    if (res.corruptions_fixed || res.leaks_fixed) {
        printf("Leaked clusters fixed: %" PRIu64 ", corruptions fixed: %" PRIu64 "\n",
               res.leaks_fixed, res.corruptions_fixed);
    }
    if (!res.corruptions && !res.leaks && !res.check_errors) {
        printf("No errors were found on the image.\n");
    } else {
        if (res.corruptions) {
            printf("\n%" PRIu64 " errors were found on the image.\n", res.corruptions);
        }
        if (res.leaks) {
            printf("\n%" PRIu64 " leaked clusters were found on the image.\n", res.leaks);
        }
        if (res.check_errors) {
            printf("\n%" PRIu64 " internal errors have occurred during the check.\n", res.check_errors);
        }
    }
    if (res.total_clusters) {
        printf("%" PRIu64 "/%" PRIu64 " = %0.2f%% allocated, %0.2f%% fragmented, 0.00%% compressed "
               "clusters\n",
               res.allocated_clusters, res.total_clusters,
               res.allocated_clusters * 100.0 / (double)res.total_clusters,
               res.allocated_clusters ? res.fragmented_clusters * 100.0 / (double)res.allocated_clusters
                                      : 0.0);
    }
    printf("Image end offset: %" PRIu64 "\n", res.image_end_offset);
    if (res.check_errors) {
        return 1;
    }
    if (res.corruptions) {
        return 2;
    }
    return res.leaks ? 3 : 0;
}
