#!/bin/sh
# SPDX-License-Identifier: MIT OR Apache-2.0
# Serves QED images with nbdkit-qed-plugin and drives them with clients nobody here wrote:
# QEMU's NBD client (qemu-io, qemu-img map/compare), nbdinfo and nbdcopy. Every write is
# mirrored on a raw reference file, so qemu-img compare proves the bytes; qemu-img check
# proves the image afterwards. Usage: test-nbdkit-plugin.sh PLUGIN.so
set -eu
plugin=$(realpath "$1")
# nbdclient.py (next to this script): raw NBD requests qemu-io and nbdinfo cannot send
PYTHONPATH=$(cd "$(dirname "$0")" && pwd)
export PYTHONPATH
for t in nbdkit nbdinfo nbdcopy qemu-io qemu-img python3; do
  command -v "$t" >/dev/null || { echo "SKIP: $t not found"; exit 77; }
done
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cd "$dir"
fail() { echo "FAIL: $*" >&2; exit 1; }
# serve [nbdkit options] -- SCRIPT: runs SCRIPT with $uri set while nbdkit serves the image.
serve() {
  opts=
  while [ "$1" != -- ]; do opts="$opts $1"; shift; done
  shift
  # shellcheck disable=SC2086
  nbdkit -U - $opts "$plugin" file="$img" $plugin_args --run "$1" 2>>nbdkit.err
}
plugin_args=

# A QED backing file with data in two places, and a QED overlay on it.
qemu-img create -q -f qed base.qed 64M
qemu-io -f qed -c 'write -q -P 0x11 0 2M' -c 'write -q -P 0x22 8M 1M' base.qed
qemu-img create -q -f qed -b base.qed -F qed overlay.qed
qemu-img convert -O raw overlay.qed ref.raw

echo "== writes over NBD through the backing chain (qemu-io), mirrored on ref.raw"
cat > cmds <<'CMDS'
write -q -P 0x33 1M 64k
write -q -f -P 0x44 16M 192k
write -q -P 0x55 20M 512
write -q -z 8M 64k
write -q -z -u 16M 64k
discard -q 1536k 128k
write -q -P 0x66 33554432 1536
write -q -P 0x77 4196000 1000
flush
CMDS
img=overlay.qed plugin_args=confine-backing=true
qemu-io -f raw ref.raw < cmds > /dev/null
serve -- 'qemu-io -f raw "$uri" < cmds | grep -v "^qemu-io>" | grep . && exit 1; true' || fail "qemu-io writes"
serve -- 'qemu-io -f raw -c "read -q -P 0x11 0 1M" -c "read -q -P 0x33 1M 64k" -c "read -q -P 0x22 8256k 64k" -c "read -q -P 0 8M 64k" "$uri" | grep . && exit 1; qemu-img compare -q -f raw -F raw ref.raw "$uri"' \
  || fail "read back through NBD differs from ref.raw"

echo "== fast zero: ENOTSUP and nothing changed where zeros would have to be written"
out=$(serve -- 'qemu-io -f raw -c "write -z -n 16448k 512" "$uri"' 2>&1 || true)
echo "$out" | grep -q 'Operation not supported' || fail "fast zero of a partial data cluster: $out"
serve -- 'qemu-io -f raw -c "write -q -z -n -u 16512k 64k" -c "read -q -P 0x44 16448k 512" -c "read -q -P 0 16512k 64k" "$uri" | grep . && exit 1; true' \
  || fail "fast zero with unmap of a whole data cluster"
qemu-io -f raw -c 'write -q -z 16512k 64k' ref.raw

echo "== extents: nbdinfo --map and qemu-img map over NBD agree with qemu-img map of the file"
serve -- 'nbdinfo --map "$uri" > nbd.map && qemu-img map -f raw --output=json "$uri" > qnbd.json' || fail map
qemu-img map -f qed --output=json overlay.qed > file.json
python3 - <<'PY' || fail "maps differ"
import json
def merge(r):
    out = []
    for s, e in sorted(r):
        if out and out[-1][1] == s: out[-1][1] = e
        else: out.append([s, e])
    return out
nbd = [(int(l.split()[0]), int(l.split()[0]) + int(l.split()[1])) for l in open("nbd.map") if l.split()[2] == "0"]
qnbd = [(e["start"], e["start"] + e["length"]) for e in json.load(open("qnbd.json")) if e["data"]]
qfile = [(e["start"], e["start"] + e["length"]) for e in json.load(open("file.json")) if e["data"]]
a, b, c = merge(nbd), merge(qnbd), merge(qfile)
print("data extents:", a)
assert a == b == c, (a, b, c)
assert a, "no data at all"
PY

echo "== read-only (nbdkit -r)"
serve -r -- 'nbdinfo "$uri" | grep -q "is_read_only: true" && qemu-io -f raw -c "read -q -P 0x33 1M 64k" "$uri" | grep . && exit 1; qemu-io -f raw -c "write 0 512" "$uri" 2>&1 | grep -qi "read-only\|not permitted\|denied"' \
  || fail "read-only serving"

echo "== read-only open under a filter (cow): writes land in the filter, the image is untouched"
sum=$(md5sum < overlay.qed)
serve --filter=cow -- 'qemu-io -f raw -c "write -q -P 0x99 0 64k" -c "read -q -P 0x99 0 64k" "$uri" | grep . && exit 1; true' \
  || fail "serving through the cow filter"
[ "$(md5sum < overlay.qed)" = "$sum" ] || fail "the image changed under the cow filter"

echo "== image is sound and holds exactly ref.raw"
qemu-img check -q overlay.qed || fail "qemu-img check overlay.qed"
qemu-img compare -q -F raw overlay.qed ref.raw || fail "overlay.qed differs from ref.raw"

echo "== multi-conn: nbdcopy with 4 connections in and out, 4 qemu-io clients at once"
qemu-img create -q -f qed copy.qed 32M
head -c 16M /dev/urandom > rand.raw
truncate -s 32M rand.raw
img=copy.qed plugin_args=
serve -- 'nbdcopy -C 4 --flush rand.raw "$uri" && nbdcopy -C 4 "$uri" out.raw' || fail nbdcopy
cmp rand.raw out.raw || fail "nbdcopy round trip differs"
serve -- 'for i in 1 2 3 4; do qemu-io -f raw -c "write -q -f -P $i $((i * 4))M 4M" "$uri" & done; wait
          for i in 1 2 3 4; do qemu-io -f raw -c "read -q -P $i $((i * 4))M 4M" "$uri" | grep . && exit 1; done; true' \
  || fail "parallel clients"
for i in 1 2 3 4; do qemu-io -f raw -c "write -q -P $i $((i * 4))M 4M" rand.raw; done
# O_DIRECT (direct=true), where the file system takes it: aligned and unaligned requests.
if python3 -c 'import os; os.close(os.open("rand.raw", os.O_RDONLY | os.O_DIRECT))' 2>/dev/null; then
  plugin_args=direct=true
  serve -- 'qemu-io -f raw -c "write -q -P 0x5a 1M 100k" -c "write -q -P 0x5b 3000 1000" "$uri"' || fail "direct=true writes"
  qemu-io -f raw -c 'write -q -P 0x5a 1M 100k' -c 'write -q -P 0x5b 3000 1000' rand.raw
  plugin_args=
else
  echo "(O_DIRECT not supported here: direct=true not tested)"
fi
qemu-img check -q copy.qed || fail "qemu-img check copy.qed"
qemu-img compare -q -F raw copy.qed rand.raw || fail "copy.qed differs"

echo "== backing confinement and errors through nbdkit_error"
mkdir sub
qemu-img create -q -f qed -b ../base.qed -F qed sub/escape.qed
img=sub/escape.qed plugin_args=confine-backing=true
: > nbdkit.err
# Refused at startup (.get_ready), with libqed's message through nbdkit_error.
serve -- 'echo served' && fail "confine-backing let ../base.qed through"
grep -q 'escape.qed: open: .*outside' nbdkit.err || { cat nbdkit.err; fail "no nbdkit_error for the refused backing file"; }
plugin_args=
serve -- 'qemu-io -f raw -c "read -q -P 0x11 0 64k" "$uri" | grep . && exit 1; true' || fail "backing file outside without confinement"
nbdkit -U - "$plugin" --run true 2>/dev/null && fail "no file= accepted"
img=missing.qed
serve -- 'echo served' && fail "a missing file was served"
grep -q 'missing.qed: open: .*No such file' nbdkit.err || fail "no nbdkit_error for a missing file"
echo "== NBD_CMD_CACHE: advertised, answered, and carried to the image (an error there reaches the client)"
qemu-img create -q -f qed c.qed 64M
qemu-io -f qed -c 'write -q -P 0x42 0 128k' -c 'write -q -P 0x43 32M 64k' c.qed
img=c.qed plugin_args=
serve -- 'nbdinfo --can cache "$uri"' || fail "nbdinfo --can cache: cache not advertised"
cat > cache.py <<'PY'
import sys
from nbdclient import *
c = Conn(sys.argv[1])
assert c.flags & FLAG_SEND_CACHE, c.flags
assert c.cmd("cache", 0, 1 << 20) == (0, b""), "cache of data"
assert c.cmd("cache", 16 << 20, 1 << 20) == (0, b""), "cache of a hole"
assert c.cmd("read", 0, 4096) == (0, b"\x42" * 4096)
PY
serve -- 'python3 cache.py "$unixsocket"' || fail "NBD_CMD_CACHE"

echo "== a failing request: EIO to the client, libqed's message in the log through nbdkit_error"
# L2 entry of guest offset 32M -> an unaligned data offset: the image opens, and only requests
# touching that cluster fail (a read, then a cache, which nbdkit emulates with a read).
python3 - c.qed <<'PY'
import struct, sys
f = open(sys.argv[1], "r+b")
h = f.read(64)
cluster, table = struct.unpack("<II", h[4:12])
l1 = struct.unpack("<Q", h[40:48])[0]
n = table * cluster // 8
f.seek(l1 + 8 * ((32 << 20) // (cluster * n)))
l2 = struct.unpack("<Q", f.read(8))[0]
assert l2, "no L2 table for 32M"
f.seek(l2 + 8 * (((32 << 20) // cluster) % n))
f.write(struct.pack("<Q", 12345))
PY
cat > eio.py <<'PY'
import sys
from nbdclient import *
c = Conn(sys.argv[1])
assert c.cmd("read", 0, 4096) == (0, b"\x42" * 4096)
assert c.cmd("read", 32 << 20, 4096)[0] == EIO, "read of the broken cluster: not EIO"
assert c.cmd("cache", 32 << 20, 4096)[0] == EIO, "cache of the broken cluster: not EIO"
assert c.cmd("read", 64 << 10, 4096) == (0, b"\x42" * 4096), "the connection survives"
PY
: > nbdkit.err
serve -- 'python3 eio.py "$unixsocket"' || fail "errors on requests"
grep -q 'c.qed: read: ' nbdkit.err || { cat nbdkit.err; fail "no nbdkit_error line for the failed read"; }
echo "(logged: $(grep -m1 'c.qed: read: ' nbdkit.err))"

echo "== read-only (nbdkit -r, readonly=true): writes, trims and zeroes refused with EPERM, file untouched"
qemu-img create -q -f qed ro.qed 16M
qemu-io -f qed -c 'write -q -P 0x61 0 64k' ro.qed
sum=$(md5sum < ro.qed)
cat > ro.py <<'PY'
import sys
from nbdclient import *
c = Conn(sys.argv[1])
assert c.flags & FLAG_READ_ONLY, c.flags
for cmd in ("write", "trim", "zero"):
    err = c.cmd(cmd, 0, 4096, b"x" * 4096 if cmd == "write" else b"")[0]
    assert err == EPERM, "%s on a read-only export: error %d, not EPERM" % (cmd, err)
assert c.cmd("read", 0, 4096) == (0, b"a" * 4096)
assert c.cmd("flush")[0] == 0
PY
img=ro.qed plugin_args=
serve -r -- 'python3 ro.py "$unixsocket"' || fail "nbdkit -r"
plugin_args=readonly=true
serve -- 'python3 ro.py "$unixsocket" && qemu-io -f raw -c "write 0 512" "$uri" 2>&1 | grep -qi "read-only\|not permitted\|denied"' \
  || fail "readonly=true"
[ "$(md5sum < ro.qed)" = "$sum" ] || fail "read-only serving changed ro.qed"
qemu-img check -q ro.qed || fail "qemu-img check ro.qed"

echo "== multi-conn: writes on connection A, flush on connection B, kill -9 nbdkit: reopened, the data is there, check clean"
qemu-img create -q -f qed mc.qed 64M
rm -f mc.sock mc.pid
nbdkit -U mc.sock -P mc.pid "$plugin" file=mc.qed 2>>nbdkit.err
for i in $(seq 100); do [ -S mc.sock ] && [ -s mc.pid ] && break; sleep 0.1; done
cat > mc.py <<'PY'
import sys
from nbdclient import *
a, b = Conn(sys.argv[1]), Conn(sys.argv[1])
for i in range(16):  # allocating writes: new L2 tables and data clusters
    assert a.cmd("write", i * (3 << 20), data=bytes([0x70 + i]) * 65536)[0] == 0
assert b.cmd("flush")[0] == 0
PY
python3 mc.py mc.sock || { kill -9 "$(cat mc.pid)"; fail "write on A, flush on B"; }
kill -9 "$(cat mc.pid)"
for i in $(seq 100); do [ -e "/proc/$(cat mc.pid)" ] || break; sleep 0.05; done
cat > mc-check.py <<'PY'
import sys
from nbdclient import *
c = Conn(sys.argv[1])
for i in range(16):
    assert c.cmd("read", i * (3 << 20), 65536) == (0, bytes([0x70 + i]) * 65536), i
PY
img=mc.qed plugin_args=
serve -- 'python3 mc-check.py "$unixsocket"' || fail "data written on A and flushed on B lost after kill -9"
qemu-img check -q mc.qed || fail "qemu-img check mc.qed after kill -9"
echo PASS
