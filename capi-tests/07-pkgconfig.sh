#!/bin/sh
# SPDX-License-Identifier: MIT OR Apache-2.0
# Builds a C program against the uninstalled libqed the way a user would, with
# `cc $(pkg-config --cflags --libs qed)` and meson-uninstalled/qed-uninstalled.pc, runs it, and
# links it statically too (libqed.a + Libs.private). Nothing is installed.
# Usage: 07-pkgconfig.sh BUILD_ROOT SOURCE_DIR
set -eu
# Under `meson test --setup valgrind` this shell itself runs in valgrind, and dash leaks a few
# bytes at exit by design. Re-exec once: valgrind does not follow exec, so the script goes on in
# a plain shell, and the programs it builds are run under valgrind below instead.
if [ -z "${QED_PC_REEXEC:-}" ]; then
    QED_PC_REEXEC=1 exec /bin/sh "$0" "$@"
fi
# `meson test --setup valgrind` sets QED_TEST_VALGRIND=1 (top-level meson.build): the programs
# must then really run in valgrind, so a missing valgrind is an error, not a silent plain run.
run=
if [ -n "${QED_TEST_VALGRIND:-}" ] && [ "$QED_TEST_VALGRIND" != 0 ]; then
    command -v valgrind >/dev/null || { echo "07-pkgconfig: QED_TEST_VALGRIND is set but valgrind is not installed" >&2; exit 1; }
    run="valgrind -q --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite"
fi
build=$1
src=$2
: "${CC:=cc}"
export PKG_CONFIG_PATH="$build/meson-uninstalled"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/qedpc.XXXXXX")
trap 'rm -rf "$tmp"' EXIT INT TERM

fail() { echo "07-pkgconfig: $*" >&2; exit 1; }

pkg-config --exists qed || fail "pkg-config does not find qed in $PKG_CONFIG_PATH"
version=$(pkg-config --modversion qed)
hdr_version=$(sed -n 's/^#define QED_VERSION_\(MAJOR\|MINOR\|PATCH\) \([0-9]*\)$/\2/p' "$src/../include/qed.h" | paste -sd. -)
[ "$version" = "$hdr_version" ] || fail "pkg-config says $version, qed.h says $hdr_version"

cat > "$tmp/prog.c" <<'PROG'
#include <qed.h>

#include <errno.h>
#include <stdio.h>
#include <string.h>

#define STR2(x) #x
#define STR(x) STR2(x)

int main(int argc, char **argv)
{
    qed_create_options o = QED_INIT(qed_create_options);
    qed_image *img;
    unsigned char w[4096], r[4096];
    size_t i;
    if (argc != 3) {
        return 2;
    }
    if (strcmp(qed_version(), STR(QED_VERSION_MAJOR) "." STR(QED_VERSION_MINOR) "." STR(QED_VERSION_PATCH)) != 0 ||
        strcmp(qed_version(), argv[2]) != 0) {
        fprintf(stderr, "library version %s\n", qed_version());
        return 1;
    }
    o.size = 1 << 20;
    for (i = 0; i < sizeof w; i++) {
        w[i] = (unsigned char)(i * 7 + 3);
    }
    if (qed_create(argv[1], &o) != 0 || qed_open(argv[1], QED_OPEN_RDWR, &img) != 0) {
        fprintf(stderr, "%s\n", qed_last_error());
        return 1;
    }
    if (qed_write(img, 1000, w, sizeof w) != 0 || qed_read(img, 1000, r, sizeof r) != 0 ||
        memcmp(w, r, sizeof w) != 0 || qed_write(NULL, 0, w, 1) != -EINVAL) {
        fprintf(stderr, "%s\n", qed_last_error());
        return 1;
    }
    return qed_close(img) == 0 ? 0 : 1;
}
PROG

flags="-std=c99 -Wall -Wextra -Wpedantic -Werror"
# shellcheck disable=SC2046,SC2086
$CC $flags "$tmp/prog.c" -o "$tmp/prog" $(pkg-config --cflags --libs qed) || fail "shared build failed"
libpath=$(pkg-config --libs-only-L qed | sed 's/-L//g; s/^ *//; s/ *$//; s/  */:/g')
LD_LIBRARY_PATH="$libpath${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" $run "$tmp/prog" "$tmp/shared.qed" "$version" ||
    fail "the shared-linked program failed"
qemu-img check -q -f qed "$tmp/shared.qed" || fail "qemu-img check failed on the shared-linked program's image"

# Static: libqed.a from the same directory plus the private libraries the .pc lists.
static_lib=
for d in $(echo "$libpath" | tr : ' '); do
    [ -f "$d/libqed.a" ] && static_lib="$d/libqed.a" && break
done
[ -n "$static_lib" ] || fail "no libqed.a next to the shared library ($libpath)"
privates=$(pkg-config --libs-only-l --static qed | sed 's/-lqed\b//')
# shellcheck disable=SC2046,SC2086
$CC $flags "$tmp/prog.c" -o "$tmp/prog-static" $(pkg-config --cflags qed) "$static_lib" $privates ||
    fail "static build failed"
if command -v ldd >/dev/null && ldd "$tmp/prog-static" | grep -q libqed; then
    fail "the static program still needs libqed.so"
fi
$run "$tmp/prog-static" "$tmp/static.qed" "$version" || fail "the static-linked program failed"
qemu-img check -q -f qed "$tmp/static.qed" || fail "qemu-img check failed on the static-linked program's image"
echo "07-pkgconfig: shared and static builds of a pkg-config client work (libqed $version)${run:+, under valgrind}"
