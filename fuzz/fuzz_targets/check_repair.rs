// SPDX-License-Identifier: MIT OR Apache-2.0
//! Opens arbitrary bytes read-write (no backing file; the open repairs an image whose need-check
//! bit is set), then: check (report only), check and repair everything, check again, which must
//! find no corruption and exactly the leaks the repair reported as left (none when the L1 table
//! directly follows the header, as QEMU lays it out), and a second repair, which must change
//! nothing (repair is idempotent). The repaired image must reopen with the same result.
//!
//! Guest data must survive the repair: before it, a read-only open that repairs nothing walks
//! the disk (see `Survivors`); after it (through the repairing handle and again after reopening)
//! every cluster that read successfully reads back identical, and no cluster that was
//! unallocated or zero becomes data.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qed::format::Header;
use qed::{CheckFix, Error, ExtentKind, Image, MemStorage, OpenOptions};
use std::hash::{DefaultHasher, Hasher};
use std::sync::Arc;

/// Guest bytes walked extent by extent (as `open_read` maps them).
const WALK_SPAN: u64 = 1 << 40;
/// Extents (or skipped corrupt clusters) visited at most, and data bytes compared at most: many
/// entries may share one cluster of a small file, so mapped data can far exceed the input.
const MAX_STEPS: usize = 1 << 14;
const MAX_DATA: u64 = 16 << 20;

/// What the repair must keep. The rule: a guest cluster that reads successfully through a
/// read-only open without repair (so its L1 and L2 entries are valid: aligned, inside the file,
/// not on metadata, its table not overlapping another) reads back identical after repair, and a
/// range that was unallocated or zero (reads zeros: no backing file here) is not data after it.
/// Repair clears only entries such an open refuses to read through; entries sharing a data
/// cluster are separated by copying it (both keep their bytes); leak reclaim moves clusters
/// without changing them. Clusters whose read failed are not compared: repair may clear them
/// (they read zeros) or keep them (of two L1 entries sharing a table, both refused, the first
/// keeps it). One exception: data in a cluster that some L1 entry names as (part of) an L2
/// table. When two L1 entries name overlapping tables, the read-only open refuses both and
/// reads a third table's data entry pointing into them, while repair keeps the first table and
/// clears that data entry (it points into metadata): which owner wins is a choice.
struct Survivors {
    /// (guest offset, length, hash of the bytes): pieces of data extents, at most one cluster.
    data: Vec<(u64, u64, u64)>,
    /// Guest ranges that were unallocated or zero clusters.
    holes: Vec<(u64, u64)>,
}

fn hash(img: &Image, at: u64, buf: &mut [u8]) -> Result<u64, Error> {
    img.read_at(at, buf)?;
    let mut h = DefaultHasher::new();
    h.write(buf);
    Ok(h.finish())
}

/// File ranges that L1 entries of the raw image name as L2 tables (entries that are aligned,
/// past the header, inside the file and clear of the L1 table; overlaps between them allowed).
fn named_tables(data: &[u8]) -> Vec<(u64, u64)> {
    let Ok(h) = Header::parse(data) else {
        return Vec::new();
    };
    let (cs, tb) = (
        h.cluster_size as u64,
        h.table_size as u64 * h.cluster_size as u64,
    );
    let (l1, len) = (h.l1_table_offset, data.len() as u64);
    let Some(raw) = usize::try_from(l1)
        .ok()
        .and_then(|a| data.get(a..a.checked_add(usize::try_from(tb).ok()?)?))
    else {
        return Vec::new();
    };
    raw.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .filter(|&e| {
            e != 0
                && e % cs == 0
                && e >= h.header_bytes()
                && e.checked_add(tb).is_some_and(|end| end <= len)
                && (e + tb <= l1 || e >= l1 + tb)
        })
        .map(|e| (e, e + tb))
        .collect()
}

fn survivors(img: &Image, tables: &[(u64, u64)]) -> Survivors {
    let g = img.geometry();
    let cs = g.cluster_bytes();
    // Guest bytes behind one L1 entry (an L1-level failure skips all of them).
    let cov = 1u64.checked_shl(g.l2_coverage_bits()).unwrap_or(0);
    let span = img.size().min(WALK_SPAN);
    let mut out = Survivors {
        data: Vec::new(),
        holes: Vec::new(),
    };
    let mut buf = vec![0u8; cs as usize];
    let (mut pos, mut steps, mut data) = (0u64, 0usize, 0u64);
    while pos < span && steps < MAX_STEPS && data < MAX_DATA {
        steps += 1;
        match img.block_status(pos, span - pos) {
            Ok(e) => {
                if let ExtentKind::Data { host_offset } = e.kind {
                    let end = e.offset + e.length;
                    let mut at = e.offset;
                    while at < end && data < MAX_DATA {
                        let n = (g.cluster_floor(at) + cs).min(end) - at;
                        let host = host_offset + (at - e.offset);
                        if tables.iter().any(|&(t, te)| (t..te).contains(&host)) {
                            at += n;
                            continue;
                        }
                        // A data extent was validated entry by entry: its reads must succeed.
                        let h = hash(img, at, &mut buf[..n as usize])
                            .unwrap_or_else(|e| panic!("read of mapped data at {at:#x}: {e}"));
                        out.data.push((at, n, h));
                        data += n;
                        at += n;
                    }
                } else {
                    out.holes.push((e.offset, e.length));
                }
                pos = e.offset + e.length;
            }
            Err(Error::Corrupt { what, .. }) => {
                let next = if what.starts_with("L1") && cov != 0 {
                    (pos / cov + 1).checked_mul(cov)
                } else {
                    g.cluster_floor(pos).checked_add(cs)
                };
                pos = next.unwrap_or(span);
            }
            Err(e) => panic!("block status at {pos:#x}: {e}"),
        }
    }
    out
}

/// Asserts that `img` (repaired) still holds what `s` recorded; `when` names the handle.
fn assert_survived(s: &Survivors, img: &Image, when: &str) {
    let mut buf = vec![0u8; img.geometry().cluster_bytes() as usize];
    for &(at, n, h) in &s.data {
        match hash(img, at, &mut buf[..n as usize]) {
            Ok(x) => assert!(
                x == h,
                "{when}: guest data at {at:#x}+{n:#x} changed by repair"
            ),
            Err(e) => panic!("{when}: guest data at {at:#x}+{n:#x} unreadable after repair: {e}"),
        }
    }
    for &(at, n) in &s.holes {
        let mut pos = at;
        while pos < at + n {
            let e = img
                .block_status(pos, at + n - pos)
                .unwrap_or_else(|e| panic!("{when}: block status at {pos:#x}: {e}"));
            assert!(
                !matches!(e.kind, ExtentKind::Data { .. }),
                "{when}: unallocated/zero guest range at {pos:#x}+{:#x} is data after repair",
                e.length
            );
            pos += e.length;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let storage = Arc::new(MemStorage::from_bytes(data));
    let opts = OpenOptions {
        writable: true,
        no_backing: true,
        lock: false,
        l2_cache_bytes: 64 << 10,
        ..OpenOptions::read_write()
    };
    // Before anything repairs (a read-write open repairs an image whose need-check bit is set).
    let kept = {
        let ro = OpenOptions {
            writable: false,
            no_repair: true,
            ..opts.clone()
        };
        match Image::open_storage(Arc::new(MemStorage::from_bytes(data)), &ro) {
            Ok(img) => Some(survivors(&img, &named_tables(data))),
            Err(_) => None,
        }
    };
    let Ok(img) = Image::open_storage(storage.clone(), &opts) else {
        return;
    };
    let h = Header::parse(data).expect("an image that opens has a header");
    // Compaction moves data clusters and tables (whole) into holes, never the header or the L1
    // table: holes between them can stay leaked only if the L1 table does not follow the header.
    let qemu_layout = h.l1_table_offset == h.header_bytes();
    let Ok(before) = img.check(CheckFix::NONE) else {
        return;
    };
    let fixed = img
        .check(CheckFix::ALL)
        .expect("repair on memory storage cannot fail");
    assert_eq!(
        fixed.corruptions, 0,
        "repair left corruptions: {fixed:?} (report {before:?})"
    );
    assert_eq!(fixed.check_errors, 0, "repair hit check errors: {fixed:?}");
    let after = img.check(CheckFix::NONE).expect("check after repair");
    assert_eq!(
        after.corruptions, 0,
        "corruptions after repair: {after:?} (repair {fixed:?})"
    );
    assert_eq!(
        after.leaks, fixed.leaks,
        "leaks after repair: {after:?} (repair {fixed:?})"
    );
    if qemu_layout {
        assert_eq!(
            after.leaks, 0,
            "repair left leaks: {after:?} (repair {fixed:?})"
        );
    }
    assert_eq!(
        after.check_errors, 0,
        "check errors after repair: {after:?}"
    );
    let kept = kept.expect("an image that opens read-write opens read-only");
    assert_survived(&kept, &img, "after repair");
    let snapshot = storage.to_bytes();
    let again = img.check(CheckFix::ALL).expect("second repair");
    assert_eq!(
        again.corruptions_fixed, 0,
        "second repair fixed corruptions: {again:?}"
    );
    assert_eq!(again.leaks_fixed, 0, "second repair fixed leaks: {again:?}");
    assert!(
        storage.to_bytes() == snapshot,
        "second repair changed the image"
    );
    assert_eq!(again.allocated_clusters, after.allocated_clusters);
    img.close().expect("close");
    // The repaired image reopens, and is still clean.
    let img = Image::open_storage(storage.clone(), &opts).expect("reopen after repair");
    let last = img.check(CheckFix::NONE).expect("check after reopen");
    assert_eq!(last.corruptions, 0, "after reopen: {last:?}");
    assert_eq!(last.leaks, after.leaks, "after reopen: {last:?}");
    assert_survived(&kept, &img, "after reopen");
    let _ = img.close();
});
