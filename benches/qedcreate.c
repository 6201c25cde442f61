/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * qedcreate: `qemu-img create -f qed` for libqed, for timing qed_create against qemu-img create.
 *
 *   qedcreate [-o cluster_size=N,table_size=N] [-b BACKING [-F raw|qed]] [-T] FILE [SIZE]
 *
 * SIZE takes qemu's suffixes (K, M, G, T, P, E; powers of 1024). -T prints the time spent in
 * qed_create alone on stderr.
 */
#define _GNU_SOURCE
#include <qed.h>

#include "benchutil.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

const char *bench_name = "qedcreate";

static int parse_size(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || end == s || *s == '-') {
        return -1;
    }
    unsigned shift = 0;
    switch (*end) {
    case '\0': case 'b': case 'B': break;
    case 'k': case 'K': shift = 10; break;
    case 'm': case 'M': shift = 20; break;
    case 'g': case 'G': shift = 30; break;
    case 't': case 'T': shift = 40; break;
    case 'p': case 'P': shift = 50; break;
    case 'e': case 'E': shift = 60; break;
    default: return -1;
    }
    if ((*end && end[1]) || (shift && v > UINT64_MAX >> shift)) {
        return -1;
    }
    *out = (uint64_t)v << shift;
    return 0;
}

static void usage(void)
{
    fprintf(stderr, "usage: qedcreate [-o cluster_size=N,table_size=N] [-b BACKING [-F raw|qed]] [-T] "
                    "FILE [SIZE]\n");
    exit(1);
}

int main(int argc, char **argv)
{
    qed_create_options opts = QED_INIT(qed_create_options);
    int timing = 0, c;

    while ((c = getopt(argc, argv, "ho:b:F:T")) != -1) {
        switch (c) {
        case 'o': {
            char *list = strdup(optarg), *save = NULL;
            for (char *tok = strtok_r(list, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
                uint64_t v;
                char *eq = strchr(tok, '=');
                if (!eq || parse_size(eq + 1, &v) < 0 || v > UINT32_MAX) {
                    fprintf(stderr, "qedcreate: bad option '%s'\n", tok);
                    return 1;
                }
                *eq = '\0';
                if (!strcmp(tok, "cluster_size")) {
                    opts.cluster_size = (uint32_t)v;
                } else if (!strcmp(tok, "table_size")) {
                    opts.table_size = (uint32_t)v;
                } else {
                    fprintf(stderr, "qedcreate: unknown option '%s'\n", tok);
                    return 1;
                }
            }
            free(list);
            break;
        }
        case 'b':
            opts.backing_file = optarg;
            break;
        case 'F':
            opts.backing_format = optarg;
            break;
        case 'T':
            timing = 1;
            break;
        default:
            usage();
        }
    }
    if (optind != argc - 1 && optind != argc - 2) {
        usage();
    }
    if (optind == argc - 2 && parse_size(argv[argc - 1], &opts.size) < 0) {
        fprintf(stderr, "qedcreate: bad size '%s'\n", argv[argc - 1]);
        return 1;
    }
    double t0 = now_s();
    int r = qed_create(argv[optind], &opts);
    double t1 = now_s();
    if (r < 0) {
        fprintf(stderr, "qedcreate: %s\n", qed_last_error());
        return 1;
    }
    if (timing) {
        fprintf(stderr, "qed_create: %.6f s\n", t1 - t0);
    }
    return 0;
}
