// SPDX-License-Identifier: MIT OR Apache-2.0
//! Opens arbitrary bytes as an image (read-only, no backing file, a small L2 cache) and reads it.
//!
//! Reads every cluster-sized piece (pieces capped at 1 MiB) of the first 64 MiB of the virtual
//! disk, the last cluster, the clusters on both sides of each L2-table boundary in that range,
//! then maps the disk. Any `Err` is fine; a panic, OOM or timeout is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qed::{ExtentKind, Image, MemStorage, OpenOptions, Storage};
use std::sync::Arc;

/// Guest bytes read from the start of the disk.
const FRONT: u64 = 64 << 20;
/// Largest single read.
const PIECE: u64 = 1 << 20;
/// Guest bytes mapped extent by extent (a full map could list millions of extents).
const MAP_SPAN: u64 = 1 << 40;

fuzz_target!(|data: &[u8]| {
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(data));
    let opts = OpenOptions {
        writable: false,
        no_backing: true,
        lock: false,
        l2_cache_bytes: 64 << 10,
        ..OpenOptions::read_only()
    };
    let Ok(img) = Image::open_storage(storage, &opts) else {
        return;
    };
    let size = img.size();
    let cs = img.geometry().cluster_bytes();
    let piece = cs.min(PIECE);
    let mut buf = vec![0u8; piece as usize];
    let front = size.min(FRONT);
    let mut pos = 0;
    while pos < front {
        let n = piece.min(front - pos) as usize;
        let _ = img.read_at(pos, &mut buf[..n]);
        pos += n as u64;
    }
    // The last cluster (its last piece).
    if size > front {
        let start = size.saturating_sub(piece).max(front);
        let n = (size - start) as usize;
        let _ = img.read_at(start, &mut buf[..n]);
    }
    // A read straddling the end of the disk must fail, not panic.
    let _ = img.read_at(size.saturating_sub(1), &mut [0u8; 2]);
    let _ = img.read_at(u64::MAX - 1, &mut [0u8; 2]);

    // Map: extents must tile the range in order, without overlap.
    let span = size.min(MAP_SPAN);
    if let Ok(extents) = img.map(0, span) {
        let mut at = 0;
        for e in &extents {
            assert_eq!(e.offset, at, "extents are contiguous");
            assert!(e.length > 0, "no empty extents");
            if let ExtentKind::Data { host_offset } = e.kind {
                assert_eq!(
                    host_offset % cs,
                    e.offset % cs,
                    "data extents are cluster-aligned"
                );
            }
            at += e.length;
        }
        assert_eq!(at, span, "extents cover the range");
    }
    if size > 0 {
        let _ = img.block_status(size - 1, 1);
    }
    let _ = img.info();
    let _ = img.check(qed::CheckFix::NONE);
    let _ = img.close();
});
