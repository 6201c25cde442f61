// SPDX-License-Identifier: MIT OR Apache-2.0
//! Inputs found by the fuzz targets in `fuzz/` (see `fuzz/CAMPAIGN.md`), minimised, kept as
//! plain tests. Each input lives in `fuzz/regressions/<name>`; the comment on each test gives
//! the image's layout (clusters of 4 KiB) and what went wrong.

use qed::{CheckFix, Image, MemStorage, OpenOptions, Storage};
use std::sync::Arc;

fn input(name: &str) -> Vec<u8> {
    let path = format!("{}/fuzz/regressions/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn open(storage: &Arc<MemStorage>, writable: bool) -> Image {
    let opts = OpenOptions {
        writable,
        no_backing: true,
        lock: false,
        ..OpenOptions::read_only()
    };
    Image::open_storage(storage.clone(), &opts).expect("open")
}

/// An L2 entry near `u64::MAX` followed by another allocated entry: the check's fragmentation
/// count computed `last + cluster_size` and overflowed (a panic with overflow checks on, i.e. in
/// debug builds, which the fuzz targets use). Found by `open_read` and `check_repair`.
///
/// Layout: header; L1 at 1-2 (table_size 2) with L1[0] = 0x4000; L2 table at 4-5 with
/// L2[622] = 0xffff_ffff_ffff_ff00 (corrupt) and L2[623] = 0x3300_0000_0000_0000 (corrupt).
#[test]
fn check_fragmentation_count_does_not_overflow() {
    let s = Arc::new(MemStorage::from_bytes(&input(
        "check-fragmented-overflow.qed",
    )));
    let img = open(&s, false);
    let r = img.check(CheckFix::NONE).expect("check");
    assert_eq!(r.corruptions, 2, "{r:?}");
    drop(img);
    let img = open(&s, true);
    let r = img.check(CheckFix::ALL).expect("repair");
    assert_eq!(r.corruptions, 0, "{r:?}");
    let r = img.check(CheckFix::NONE).expect("check after repair");
    assert_eq!((r.corruptions, r.check_errors), (0, 0), "{r:?}");
}

/// Leak repair (compaction) loses the second half of an L2 table, and the guest data it maps.
/// Found by `check_repair` (after a repair that reported 0 corruptions and 3 leaks fixed, the
/// next check found the L1 entry pointing past the end of the file).
///
/// A consistent image (qemu-img check: "3 leaked clusters", no corruption); 4 KiB clusters,
/// table_size 2, 4 MiB: header 0; L1 1-2; leak 3; data 4 (guest 0x328000, L2[808], which lies
/// in the table's *second* cluster); leaks 5-6; L2 table 7-8 (the end of the file).
///
/// In `compact` (src/image/check.rs), the table moves down into the hole 5-6 and is marked used
/// there; the loop then continues from `top = 7` and `prev_set` returns cluster 6 — the moved
/// table's new second cluster. `table_start` only knows the tables' *old* offsets, so cluster 6
/// is taken for a data cluster and "moved" to hole 3 (its `used` bit cleared). The file is then
/// truncated after the last used cluster, 5: the table at 5-6 loses its second cluster, the L1
/// entry now points past the end of the file, and guest 0x328000 reads as zeros.
#[test]
fn leak_repair_keeps_moved_tables_whole() {
    let s = Arc::new(MemStorage::from_bytes(&input(
        "compact-truncates-moved-table.qed",
    )));
    let img = open(&s, true);
    let before = img.check(CheckFix::NONE).expect("check");
    assert_eq!((before.corruptions, before.leaks), (0, 3), "{before:?}");
    let mut buf = vec![0u8; 4096];
    img.read_at(0x328000, &mut buf).expect("read");
    assert!(buf.iter().all(|&b| b == 0xab), "guest data before repair");

    let fixed = img.check(CheckFix::ALL).expect("repair");
    let after = img.check(CheckFix::NONE).expect("check after repair");
    assert_eq!(
        after.corruptions, 0,
        "after repair {after:?} (repair {fixed:?})"
    );
    assert_eq!(
        after.leaks, fixed.leaks,
        "after repair {after:?} (repair {fixed:?})"
    );
    assert!(
        s.len().unwrap() >= after.image_end_offset,
        "image end {after:?}"
    );
    buf.fill(0);
    img.read_at(0x328000, &mut buf).expect("read after repair");
    assert!(
        buf.iter().all(|&b| b == 0xab),
        "guest data lost by the repair"
    );
    img.close().expect("close");
    let img = open(&s, false);
    img.read_at(0x328000, &mut buf).expect("read after reopen");
    assert!(
        buf.iter().all(|&b| b == 0xab),
        "guest data lost after reopen"
    );
}

/// Leak repair gives up at the first L2 table that does not fit in a hole, even when moving the
/// data clusters below it first would make room: reclaimable leaks were left (not a corruption:
/// the repair reported the leaks it left). Compaction now moves tables in rounds.
///
/// Layout (4 KiB clusters, table_size 2, size 0): header 0; L1 1-2; leak 3; data 4 (L2[1]);
/// leak 5; data 6 (L2[3]); L2 table 7-8. Moving data 6 to 3 frees 5-6 for the table, and the
/// file shrinks to 7 clusters with no leak; `compact` used to stop at the table (`dst + len >
/// start`) before considering the data clusters below it.
#[test]
fn leak_repair_moves_data_to_make_room_for_a_table() {
    let s = Arc::new(MemStorage::from_bytes(&input("check-compact-gives-up.qed")));
    let img = open(&s, true);
    let before = img.check(CheckFix::NONE).expect("check");
    assert_eq!((before.corruptions, before.leaks), (0, 2), "{before:?}");
    let fixed = img.check(CheckFix::ALL).expect("repair");
    assert_eq!((fixed.corruptions, fixed.leaks), (0, 0), "{fixed:?}");
    assert_eq!(s.len().unwrap(), 7 * 4096);
}

/// Leak repair that made the file longer at every run. Found by `check_repair` after 59 minutes
/// of its hour-long campaign: "second repair changed the image".
///
/// A hostile 4 KiB-cluster image (table_size 4, L1 at cluster 5) whose tables cannot all move
/// down. When a table found no free run below it, compaction moved it past the end of the file
/// whenever *any* hole lay below, expecting the next round to bring it back down; with no hole
/// right under the table nothing could, so each round left it higher: 32 clusters more per
/// repair, with as many new leaks. Now a table is only moved past the end when a hole lies
/// right under it (then its old clusters and that hole form a run it comes back down into).
#[test]
fn leak_repair_never_grows_the_file_and_is_idempotent() {
    let s = Arc::new(MemStorage::from_bytes(&input(
        "check-repair-grows-file.qed",
    )));
    let img = open(&s, true);
    let len0 = s.len().unwrap();
    let first = img.check(CheckFix::ALL).expect("repair");
    assert_eq!(first.corruptions, 0, "{first:?}");
    let len1 = s.len().unwrap();
    assert!(len1 <= len0, "repair grew the file from {len0} to {len1}");
    let snapshot = s.to_bytes();
    let again = img.check(CheckFix::ALL).expect("second repair");
    assert_eq!(
        (again.corruptions_fixed, again.leaks_fixed),
        (0, 0),
        "{again:?}"
    );
    assert_eq!(again.leaks, first.leaks, "{again:?} after {first:?}");
    assert!(
        s.to_bytes() == snapshot,
        "the second repair changed the image"
    );
}

/// A check on a read-write handle first cut the file back to its allocation end, and that
/// also *grew* a file ending inside a cluster to the cluster's end: an L1 entry whose table had
/// ended past the end of the file (refused, so read-only opens served the data cluster it
/// overlaps) then looked valid, and the repair cleared the data entry in its favour: guest data
/// lost. Found by `check_repair` with its guest-bytes rule (issue 10). The file now only ever
/// shrinks there.
///
/// Hand-made twin: 4 KiB clusters, L1 at cluster 1, data at 2, L2 at 3, data at 4 (0xaa);
/// L1[1] = 0x4000 (a "table" over that data cluster) and the file cut to 0x4800.
#[test]
fn check_never_grows_a_file_into_a_refused_table() {
    for name in ["check-square-extends-file.qed", ""] {
        let s = if name.is_empty() {
            let s = Arc::new(MemStorage::new());
            qed::Image::create_on(
                &*s,
                &qed::CreateOptions {
                    size: 8 << 20,
                    cluster_size: 4096,
                    table_size: 1,
                    ..Default::default()
                },
            )
            .unwrap();
            let img = open(&s, true);
            img.write_at(0, &[0x11; 4096]).unwrap();
            img.write_at(4096, &[0xaa; 4096]).unwrap();
            img.close().unwrap();
            assert_eq!(s.len().unwrap(), 0x5000);
            s.write_at(&0x4000u64.to_le_bytes(), 0x1008).unwrap();
            s.set_len(0x4800).unwrap();
            s
        } else {
            Arc::new(MemStorage::from_bytes(&input(name)))
        };
        let size = open(&s, false).size() as usize;
        // What a read-only open serves, cluster by cluster (refused clusters stay None).
        let served = |img: &Image| -> Vec<Option<Vec<u8>>> {
            (0..size.div_ceil(4096))
                .map(|c| {
                    let mut b = vec![0u8; 4096.min(size - c * 4096)];
                    img.read_at((c * 4096) as u64, &mut b).ok().map(|_| b)
                })
                .collect()
        };
        let before = served(&open(&s, false));
        let len0 = s.len().unwrap();
        let img = open(&s, true);
        img.check(CheckFix::NONE).expect("check");
        assert!(s.len().unwrap() <= len0, "{name}: a check grew the file");
        img.check(CheckFix::ALL).expect("repair");
        drop(img);
        let after = served(&open(&s, false));
        for (c, (b, a)) in before.iter().zip(&after).enumerate() {
            if let Some(b) = b {
                assert_eq!(
                    Some(b),
                    a.as_ref(),
                    "{name}: guest cluster {c} changed by repair"
                );
            }
        }
    }
}
