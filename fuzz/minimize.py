#!/usr/bin/env python3
# SPDX-License-Identifier: MIT OR Apache-2.0
"""Structural minimiser for crashing inputs of the image targets (complements `cargo fuzz tmin`,
which mostly shortens): zeroes blocks of the file (4 KiB down to 8 bytes) and cuts its tail while
the target still fails with the same message.

    python3 fuzz/minimize.py <target-binary> <crash-file> <message-substring> <out-file>
"""
import os
import subprocess
import sys
import tempfile


def fails(binary, data, needle, tmp):
    with open(tmp, "wb") as f:
        f.write(data)
    p = subprocess.run([binary, tmp], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       env=dict(os.environ, RUST_BACKTRACE="0"))
    return p.returncode != 0 and needle.encode() in p.stderr


def main():
    binary, src, needle, out = sys.argv[1:5]
    data = bytearray(open(src, "rb").read())
    tmp = tempfile.mktemp()
    assert fails(binary, data, needle, tmp), "input does not fail as described"
    # Cut the tail.
    step = 4096
    while step >= 8:
        while len(data) > step and fails(binary, data[:-step], needle, tmp):
            del data[-step:]
        step //= 2
    # Zero blocks.
    for size in (4096, 512, 64, 8):
        for at in range(0, len(data), size):
            blk = data[at:at + size]
            if not any(blk):
                continue
            cand = bytearray(data)
            cand[at:at + size] = bytes(len(blk))
            if fails(binary, cand, needle, tmp):
                data = cand
    # Simplify remaining nonzero bytes one by one (to zero).
    for at in range(len(data)):
        if data[at]:
            cand = bytearray(data)
            cand[at] = 0
            if fails(binary, cand, needle, tmp):
                data = cand
    os.unlink(tmp)
    open(out, "wb").write(data)
    print(f"{len(data)} bytes, {sum(1 for b in data if b)} nonzero")


if __name__ == "__main__":
    main()
