#!/usr/bin/env python3
# SPDX-License-Identifier: MIT OR Apache-2.0
"""Builds the seed corpora of the fuzz targets into fuzz/corpus/<target>/.

Images come from qemu-img/qemu-io (tiny geometries, so that every file stays under 50 KiB), plus
hand-made damaged variants (need-check bit set, L1/L2 entries pointing into metadata or past the
end, two entries sharing a cluster, leaked clusters) and hostile headers. Needs qemu-utils.
Run from anywhere: python3 fuzz/make-corpus.py. The output is deterministic apart from the raw
backing file's bytes (a fixed pattern is used).
"""
import os
import struct
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")
MAGIC = 0x00444551


def run(*args, cwd):
    subprocess.run(args, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def qemu_images(tmp):
    """(name, bytes) of images made by QEMU. Default geometry images are too large for the
    image corpora (a 64 KiB header cluster plus a 256 KiB L1 table): only their headers are
    used, by the header target."""
    with open(os.path.join(tmp, "base.raw"), "wb") as f:
        f.write(bytes((i * 7 + (i >> 9)) & 0xFF for i in range(64 * 1024)))
    specs = [
        ("4k_t2_1m", "cluster_size=4096,table_size=2", "1M", []),
        ("4k_t1_1m", "cluster_size=4096,table_size=1", "1M", []),
        ("4k_t8_4m", "cluster_size=4096,table_size=8", "4M", []),
        ("8k_t2_16m", "cluster_size=8192,table_size=2", "16M", ["write -P 0x77 16k 8k"]),
        ("16k_t2_2m", "cluster_size=16384,table_size=2", "2M", []),
        ("4k_t2_data", "cluster_size=4096,table_size=2", "1M",
         ["write -P 0x11 0 16k", "write -z 16k 48k"]),
        ("4k_t2_scatter", "cluster_size=4096,table_size=2", "4M",
         ["write -P 0x22 4096 4k", "write -P 0x33 1M 8k", "write -z 2M 64k", "write -P 0x44 3M 512"]),
        ("4k_t2_backing_raw", "cluster_size=4096,table_size=2,backing_file=base.raw,backing_fmt=raw",
         "1M", ["write -P 0x55 8k 4k"]),
        ("4k_t2_backing_nodata", "cluster_size=4096,table_size=2,backing_file=base.raw,backing_fmt=raw",
         "64K", []),
        ("4k_t4_grown", "cluster_size=4096,table_size=4", "1M", []),
        ("default_16m", "", "16M", []),
        ("default_data", "", "16M", ["write -P 0x11 0 64k"]),
    ]
    out = []
    for name, opts, size, writes in specs:
        path = os.path.join(tmp, name + ".qed")
        args = ["qemu-img", "create", "-f", "qed"]
        if opts:
            args += ["-o", opts]
        run(*args, path, size, cwd=tmp)
        if name == "4k_t4_grown":
            run("qemu-img", "resize", path, "3M", cwd=tmp)
            writes = ["write -P 0x66 2M 12k"]
        for w in writes:
            run("qemu-io", "-c", w, path, cwd=tmp)
        with open(path, "rb") as f:
            out.append((name, f.read()))
    return out


def header(data):
    return list(struct.unpack_from("<IIIIQQQQQII", data, 0))


def set_header(data, h):
    data[0:64] = struct.pack("<IIIIQQQQQII", *h)


def u64(data, at):
    return struct.unpack_from("<Q", data, at)[0]


def put64(data, at, v):
    struct.pack_into("<Q", data, at, v)


def damaged(images):
    """Hand-made damage on the small QEMU images."""
    by = dict(images)
    out = []
    scatter = bytearray(by["4k_t2_scatter"])
    h = header(scatter)
    cs, l1 = h[1], h[7]
    l2 = u64(scatter, l1)  # L2 table of the first 4 MiB
    # Need-check bit set on a consistent image.
    d = bytearray(scatter)
    h2 = header(d)
    h2[4] |= 2
    set_header(d, h2)
    out.append(("dmg_need_check", bytes(d)))
    # L2 entry pointing into the header; another past the end; another unaligned.
    d = bytearray(scatter)
    put64(d, l2 + 8 * 10, 0)
    put64(d, l2 + 8 * 11, len(d) + 10 * cs)
    put64(d, l2 + 8 * 12, 3 * cs + 512)
    put64(d, l2 + 8 * 13, l1)  # points at the L1 table
    h2 = header(d)
    h2[4] |= 2
    set_header(d, h2)
    out.append(("dmg_l2_bad_entries", bytes(d)))
    # Two L2 entries sharing one data cluster.
    d = bytearray(scatter)
    first = u64(d, l2 + 8 * 1)
    put64(d, l2 + 8 * 20, first)
    out.append(("dmg_shared_cluster", bytes(d)))
    # L1 entry pointing at the L1 table itself, and at the header.
    d = bytearray(scatter)
    put64(d, l1 + 8, l1)
    put64(d, l1 + 16, 0)
    put64(d, l1 + 24, cs * 1000)
    out.append(("dmg_l1_bad_entries", bytes(d)))
    # Two L1 entries naming the same L2 table.
    d = bytearray(scatter)
    put64(d, l1 + 8, l2)
    out.append(("dmg_l1_shared_table", bytes(d)))
    # Leaked clusters: interior and at the end.
    d = bytearray(scatter) + bytes(3 * cs)
    d[len(d) - cs:len(d) - cs + 4] = b"leak"
    out.append(("dmg_leak_end", bytes(d)))
    d = bytearray(scatter)
    put64(d, l2 + 8 * 1, 0)  # the data cluster of guest 4 KiB becomes a leak
    out.append(("dmg_leak_interior", bytes(d)))
    # Zero-cluster entries everywhere in one table.
    d = bytearray(by["4k_t2_1m"]) + bytes(2 * cs)
    l1b = header(d)[7]
    put64(d, l1b, len(d) - 2 * cs)
    for i in range(0, 256, 3):
        put64(d, len(d) - 2 * cs + 8 * i, 1)
    out.append(("dmg_zero_clusters", bytes(d)))
    # A file cut short: the last data cluster is missing.
    out.append(("dmg_truncated", bytes(scatter[: len(scatter) - cs // 2])))
    # Unknown autoclear and compat bits.
    d = bytearray(by["4k_t2_data"])
    h2 = header(d)
    h2[5] |= 1 << 40
    h2[6] |= 0xFF
    set_header(d, h2)
    out.append(("dmg_autoclear_compat", bytes(d)))
    return out


def hostile_headers(base):
    """64-byte headers (plus the rest of a small image) with one bad field each."""
    h0 = header(base)
    cases = {
        "cluster_0": (1, 0),
        "cluster_not_pow2": (1, 4096 + 512),
        "cluster_huge": (1, 1 << 31),
        "table_0": (2, 0),
        "table_32": (2, 32),
        "header_size_0": (3, 0),
        "header_size_huge": (3, 0xFFFFFFFF),
        "unknown_feature": (4, 1 << 20),
        "l1_unaligned": (7, 4096 + 8),
        "l1_in_header": (7, 0),
        "l1_wraps": (7, (1 << 64) - 4096),
        "size_unaligned": (8, 1000),
        "size_huge": (8, (1 << 64) - 512),
        "backing_name_outside": (9, 4090),
        "backing_name_huge": (10, 0xFFFFFFFF),
    }
    out = []
    for name, (i, v) in cases.items():
        h = list(h0)
        h[i] = v
        if name.startswith("backing"):
            h[4] |= 1
            if name == "backing_name_outside":
                h[10] = 16
            else:
                h[9] = 64
        d = bytearray(base)
        set_header(d, h)
        out.append(("hdr_" + name, bytes(d)))
    return out


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    assert len(data) < 50 * 1024, (target, name, len(data))
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def ops_seeds():
    """Arbitrary-encoded op sequences: the bytes are interpreted by the derive, so any bytes
    do; a few fixed patterns give the fuzzer a start with several ops."""
    seeds = {
        "ops_zero": bytes(64),
        "ops_ff": b"\xff" * 64,
        "ops_counting": bytes(range(256)),
        "ops_mixed": bytes((i * 37 + 11) & 0xFF for i in range(512)),
        "ops_small": bytes([0, 1, 7, 3, 1] + [0, 0x10, 0, 0, 0, 0x20, 0, 0, 0x33, 2] * 8),
    }
    return seeds.items()


def main():
    with tempfile.TemporaryDirectory() as tmp:
        images = qemu_images(tmp)
    small = [(n, d) for n, d in images if len(d) < 50 * 1024]
    base = dict(images)["4k_t2_1m"]
    for target in ("open_read", "check_repair"):
        for name, data in small + damaged(images) + hostile_headers(base):
            write(target, name, data)
    for name, data in images + hostile_headers(base):
        write("header", name, data[:64])
        write("header", name + "_len", data[:64] + struct.pack("<Q", len(data)))
    for name, data in ops_seeds():
        write("ops", name, data)


if __name__ == "__main__":
    main()
