// SPDX-License-Identifier: MIT OR Apache-2.0
//! Engine behaviour that the QEMU oracle cannot show: the order of writes and flushes that makes
//! crashes safe, metadata-overlap protection, and memory bounds on hostile geometry.

use qed::format::{Header, FEATURE_NEED_CHECK};
use qed::storage::{MemOp, MemStorage, Storage};
use qed::{CheckFix, CreateOptions, Error, Image, OpenOptions};
use std::sync::Arc;

fn mem_image(size: u64, cs: u32, ts: u32) -> Arc<MemStorage> {
    let s = Arc::new(MemStorage::new());
    Image::create_on(
        &*s,
        &CreateOptions {
            size,
            cluster_size: cs,
            table_size: ts,
            ..Default::default()
        },
    )
    .unwrap();
    s
}

fn open_rw(s: &Arc<MemStorage>) -> Image {
    Image::open_storage(s.clone(), &OpenOptions::read_write()).unwrap()
}

fn header_of(s: &MemStorage) -> Header {
    let mut b = [0u8; 64];
    s.read_at(&mut b, 0).unwrap();
    Header::parse(&b).unwrap()
}

/// Classifies a recorded write by where it lands.
#[derive(Debug, PartialEq, Clone, Copy)]
enum W {
    Header { need_check: bool },
    L1,
    L2,
    Data,
}

fn classify(op: &MemOp, cs: u64, ts: u64, l2: &[u64]) -> Option<W> {
    match op {
        MemOp::Write { offset, data } if *offset == 0 => {
            let f = u64::from_le_bytes(data[16..24].try_into().unwrap());
            Some(W::Header {
                need_check: f & FEATURE_NEED_CHECK != 0,
            })
        }
        MemOp::Write { offset, .. } if *offset >= cs && *offset < cs * (1 + ts) => Some(W::L1),
        MemOp::Write { offset, .. }
            if l2.iter().any(|&t| *offset >= t && *offset < t + cs * ts) =>
        {
            Some(W::L2)
        }
        MemOp::Write { .. } => Some(W::Data),
        _ => None,
    }
}

#[test]
fn need_check_bit_is_flushed_before_the_first_metadata_update_and_cleared_on_close() {
    let (cs, ts) = (65536u64, 4u64);
    let s = mem_image(1 << 30, cs as u32, ts as u32);
    let img = open_rw(&s);
    s.start_recording();
    img.write_at(4096, &[7u8; 4096]).unwrap();
    img.write_at(1 << 20, &[8u8; 512]).unwrap();
    let log = s.take_log();
    let l2 = [peek(&s, cs)];
    let ops: Vec<_> = log
        .iter()
        .map(|o| (o.clone(), classify(o, cs, ts, &l2)))
        .collect();
    let first_meta = ops
        .iter()
        .position(|(_, c)| matches!(c, Some(W::L1) | Some(W::L2)))
        .unwrap();
    let set = ops
        .iter()
        .position(|(_, c)| *c == Some(W::Header { need_check: true }))
        .unwrap();
    let flush_after_set = ops[set..]
        .iter()
        .position(|(o, _)| *o == MemOp::Flush)
        .unwrap()
        + set;
    assert!(
        flush_after_set < first_meta,
        "need-check not flushed before metadata: {ops:?}"
    );
    // New L2 table: its entries are written, then flushed, then the L1 entry.
    let l2w = ops.iter().position(|(_, c)| *c == Some(W::L2)).unwrap();
    let l1w = ops.iter().position(|(_, c)| *c == Some(W::L1)).unwrap();
    assert!(l2w < l1w);
    assert!(
        ops[l2w..l1w].iter().any(|(o, _)| *o == MemOp::Flush),
        "no flush between L2 and L1"
    );
    // Data before the L2 entries that point to it.
    let data = ops.iter().position(|(_, c)| *c == Some(W::Data)).unwrap();
    assert!(data < l2w);
    assert!(header_of(&s).needs_check());
    img.close().unwrap();
    assert!(!header_of(&s).needs_check());
    let log = s.take_log();
    assert_eq!(
        log.last(),
        Some(&MemOp::Flush),
        "close must end with a flush: {log:?}"
    );
}

#[test]
fn fresh_clusters_are_not_zero_filled_and_runs_are_one_write() {
    let s = mem_image(64 << 20, 65536, 4);
    let img = open_rw(&s);
    img.write_at(0, &[1u8; 512]).unwrap(); // creates the table
    let table = peek(&s, 65536);
    s.start_recording();
    // Sub-cluster write into a fresh cluster: one data write of exactly the caller's bytes.
    img.write_at(3 * 65536 + 1000, &[2u8; 100]).unwrap();
    let data: Vec<_> = s
        .take_log()
        .into_iter()
        .filter_map(|o| match o {
            // Past the header and L1 table, and not into the L2 table (its entries).
            MemOp::Write { offset, data }
                if offset >= 5 * 65536 && !(table..table + 4 * 65536).contains(&offset) =>
            {
                Some(data.len())
            }
            _ => None,
        })
        .collect();
    assert_eq!(data, vec![100], "zero fill written for a fresh cluster");
    // A write over 8 unallocated clusters: one data write.
    img.write_at(16 * 65536, &vec![3u8; 8 * 65536]).unwrap();
    let big: Vec<_> = s
        .take_log()
        .into_iter()
        .filter(|o| matches!(o, MemOp::Write { data, .. } if data.len() >= 65536))
        .collect();
    assert_eq!(big.len(), 1);
    let mut back = vec![0u8; 65536 * 4];
    img.read_at(3 * 65536, &mut back).unwrap();
    assert!(back[..1000].iter().all(|&b| b == 0));
    assert!(back[1000..1100].iter().all(|&b| b == 2));
    assert!(back[1100..].iter().all(|&b| b == 0));
}

#[test]
fn copy_on_write_data_is_flushed_before_the_l2_update() {
    let base = Arc::new(MemStorage::from_bytes(&vec![0xabu8; 1 << 20]));
    let s = Arc::new(MemStorage::new());
    Image::create_on(
        &*s,
        &CreateOptions {
            size: 1 << 20,
            cluster_size: 4096,
            table_size: 1,
            backing_file: Some("base".into()),
            backing_format: Some(qed::BackingFormat::Raw),
        },
    )
    .unwrap();
    let b2 = base.clone();
    let opts = OpenOptions {
        writable: true,
        backing_resolver: Some(Arc::new(move |_, _| Ok(qed::Backing::Raw(b2.clone())))),
        ..Default::default()
    };
    let img = Image::open_storage(s.clone(), &opts).unwrap();
    img.write_at(0, &[1u8; 4096]).unwrap(); // table exists now
    let table = peek(&s, 4096);
    s.start_recording();
    img.write_at(8192 + 100, &[5u8; 10]).unwrap();
    // L2 entries are staged until the guest flushes; the write-back flushes the data first.
    img.flush().unwrap();
    let log = s.take_log();
    let data = log
        .iter()
        .position(
            |o| matches!(o, MemOp::Write { offset, data } if data.len() == 4096 && *offset != table),
        )
        .unwrap();
    let l2 = log
        .iter()
        .position(|o| matches!(o, MemOp::Write { offset, .. } if *offset == table))
        .unwrap();
    assert!(
        data < l2 && log[data..l2].contains(&MemOp::Flush),
        "{log:?}"
    );
    let mut back = vec![0u8; 4096];
    img.read_at(8192, &mut back).unwrap();
    assert!(back[..100].iter().all(|&b| b == 0xab) && back[100..110].iter().all(|&b| b == 5));
    assert!(back[110..].iter().all(|&b| b == 0xab));
}

/// Reads one u64 of the storage.
fn peek(s: &MemStorage, at: u64) -> u64 {
    let mut b = [0u8; 8];
    s.read_at(&mut b, at).unwrap();
    u64::from_le_bytes(b)
}

/// Patches one u64 of the storage.
fn poke(s: &MemStorage, at: u64, v: u64) {
    s.write_at(&v.to_le_bytes(), at).unwrap();
}

#[test]
fn l2_entry_pointing_at_metadata_is_refused_and_metadata_survives() {
    let (cs, ts) = (4096u64, 1u64);
    let s = mem_image(16 << 20, cs as u32, ts as u32);
    {
        let img = open_rw(&s);
        img.write_at(0, &[1u8; 4096]).unwrap();
        img.close().unwrap();
    }
    // Point guest cluster 1 at the L1 table, cluster 2 at the L2 table, cluster 4 at an
    // unaligned offset (QEMU accepts these and then overwrites metadata).
    let l2 = peek(&s, cs);
    assert_eq!(l2, 3 * cs, "data is allocated before its new L2 table");
    poke(&s, l2 + 8, cs);
    poke(&s, l2 + 16, l2);
    poke(&s, l2 + 24, 0);
    poke(&s, l2 + 32, 0x1000 + 7); // unaligned
    let before = s.to_bytes();
    let img = open_rw(&s);
    for (guest, what) in [(cs, "L1"), (2 * cs, "L2"), (4 * cs, "unaligned")] {
        let e = img.write_at(guest, &[0x77u8; 512]).unwrap_err();
        assert!(matches!(e, Error::Corrupt { .. }), "{what}: {e}");
        assert!(e.to_string().contains("run a check"), "{e}");
        let mut b = [0u8; 512];
        assert!(
            matches!(img.read_at(guest, &mut b), Err(Error::Corrupt { .. })),
            "{what}"
        );
    }
    img.write_at(0, &[2u8; 512]).unwrap(); // unaffected clusters still work
    let after = s.to_bytes();
    let (l1r, l2r) = (
        cs as usize..2 * cs as usize,
        l2 as usize..(l2 + cs) as usize,
    );
    assert!(before[l1r.clone()] == after[l1r], "L1 table changed");
    assert!(before[l2r.clone()] == after[l2r], "L2 table changed");
    // Repair clears the bad entries; the image is then clean.
    let r = img.check(CheckFix::ALL).unwrap();
    assert_eq!(r.corruptions, 0);
    assert!(r.corruptions_fixed >= 3, "{r:?}");
    let r = img.check(CheckFix::NONE).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{r:?}");
    img.write_at(cs, &[0x77u8; 512]).unwrap();
    let mut b = [0u8; 512];
    img.read_at(cs, &mut b).unwrap();
    assert_eq!(b, [0x77u8; 512]);
}

#[test]
fn l1_entry_pointing_at_the_l1_table_is_refused() {
    let s = mem_image(16 << 20, 4096, 1);
    poke(&s, 4096, 4096); // L1[0] -> the L1 table itself
    let img = open_rw(&s);
    let e = img.write_at(0, &[0x77u8; 4096]).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Corrupt {
                what: "L1 table entry",
                ..
            }
        ),
        "{e}"
    );
    let mut l1 = [0u8; 8];
    s.read_at(&mut l1, 4096).unwrap();
    assert_eq!(u64::from_le_bytes(l1), 4096, "L1 overwritten by guest data");
}

#[test]
fn duplicate_data_references_are_separated_by_repair() {
    let s = mem_image(16 << 20, 4096, 1);
    {
        let img = open_rw(&s);
        img.write_at(0, &[0x11u8; 4096]).unwrap();
        img.close().unwrap();
    }
    let l2 = peek(&s, 4096);
    let data = peek(&s, l2);
    poke(&s, l2 + 8, data); // guest cluster 1 shares guest cluster 0's data
    let img = open_rw(&s);
    let r = img.check(CheckFix::NONE).unwrap();
    assert_eq!(r.corruptions, 1);
    let r = img.check(CheckFix::ALL).unwrap();
    assert_eq!((r.corruptions, r.corruptions_fixed), (0, 1));
    // Both guest clusters keep the shared data, and writing one no longer changes the other.
    img.write_at(4096, &[0x22u8; 4096]).unwrap();
    let mut a = vec![0u8; 4096];
    img.read_at(0, &mut a).unwrap();
    assert!(a.iter().all(|&b| b == 0x11));
    assert_eq!(img.check(CheckFix::NONE).unwrap().corruptions, 0);
}

#[test]
fn dirty_image_is_repaired_on_read_write_open_but_not_read_only() {
    let s = mem_image(16 << 20, 4096, 1);
    {
        let img = open_rw(&s);
        img.write_at(0, &[0x11u8; 8192]).unwrap();
        std::mem::forget(img); // a crash: no close, need-check stays set
    }
    assert!(header_of(&s).needs_check());
    // Simulate a lost data write: an L2 entry past the end of the file, plus a trailing leak.
    let l2 = peek(&s, 4096);
    let len = s.len().unwrap(); // the allocator's stretch past the last cluster included
    poke(&s, l2 + 16, len.next_multiple_of(4096) + 64 * 4096);
    s.set_len(len + 3 * 4096).unwrap();
    let ro = Image::open_storage(s.clone(), &OpenOptions::read_only()).unwrap();
    assert!(ro.info().unwrap().needs_check);
    drop(ro);
    let img = open_rw(&s);
    assert!(!img.info().unwrap().needs_check);
    let r = img.check(CheckFix::NONE).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{r:?}");
    // Header, L1 table, two data clusters, the L2 table: the stretch and the leak are gone.
    assert_eq!(s.len().unwrap(), 5 * 4096);
    let mut b = vec![0u8; 8192];
    img.read_at(0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0x11));
}

#[test]
fn huge_tables_are_loaded_in_pieces() {
    // 64 MiB clusters x 16: 1 GiB tables. QEMU refuses this geometry; we map only what is used.
    let s = mem_image(1 << 40, 64 << 20, 16);
    let img = open_rw(&s);
    img.write_at((1 << 40) - 4096, &[9u8; 4096]).unwrap();
    img.write_at(0, &[8u8; 100]).unwrap();
    img.close().unwrap();
    let img = Image::open_storage(s.clone(), &OpenOptions::read_only()).unwrap();
    let mut b = vec![0u8; 4096];
    img.read_at((1 << 40) - 4096, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 9));
    let r = img.check(CheckFix::NONE).unwrap();
    assert_eq!(
        (r.corruptions, r.leaks, r.allocated_clusters),
        (0, 0, 2),
        "{r:?}"
    );
}

#[test]
fn second_read_write_open_of_a_locked_file_fails_with_locked() {
    use qed::storage::lock::{lock_image, LockMode};
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("l.qed");
    Image::create(&p, &CreateOptions::new(1 << 20)).unwrap();
    let a = Image::open(&p, &OpenOptions::read_write()).unwrap();
    // Another handle of this process: named as such.
    let e = Image::open(&p, &OpenOptions::read_write()).unwrap_err();
    assert!(matches!(e, Error::Busy { .. }), "{e}");
    let e = Image::open(&p, &OpenOptions::read_only()).unwrap_err();
    assert!(matches!(e, Error::Busy { .. }), "{e}");
    let ro = OpenOptions {
        force_share: true,
        ..OpenOptions::read_only()
    };
    Image::open(&p, &ro).unwrap();
    a.close().unwrap();
    // A lock held by someone else (here a bare lock, as another process's would be): Locked.
    let other = std::fs::File::open(&p).unwrap();
    let held = lock_image(&other, LockMode::ReadWrite).unwrap();
    let e = Image::open(&p, &OpenOptions::read_write()).unwrap_err();
    assert!(matches!(e, Error::Locked { .. }), "{e}");
    drop(held);
    Image::open(&p, &OpenOptions::read_write()).unwrap();
}

#[test]
fn interior_leaks_are_compacted_and_data_survives() {
    let cs = 4096u64;
    let s = mem_image(8 << 20, cs as u32, 1);
    let img = open_rw(&s);
    // Four tables' worth of data interleaved with allocations we then orphan.
    let mut model = vec![0u8; 8 << 20];
    for i in 0..64u64 {
        let off = (i * 37 % 2048) * cs + (i % 3) * 100;
        let data: Vec<u8> = (0..3000).map(|j| (i * 7 + j) as u8).collect();
        img.write_at(off, &data).unwrap();
        model[off as usize..off as usize + 3000].copy_from_slice(&data);
    }
    img.close().unwrap();
    drop(img);
    // Orphan some data clusters and a whole L2 table by clearing their entries.
    let l1_0 = peek(&s, cs);
    for i in [3u64, 9, 20] {
        let e = peek(&s, l1_0 + i * 8);
        if e > 1 {
            poke(&s, l1_0 + i * 8, 0);
            let g = i * cs;
            model[g as usize..(g + cs) as usize].fill(0);
        }
    }
    let l1_3 = peek(&s, cs + 3 * 8);
    if l1_3 != 0 {
        poke(&s, cs + 3 * 8, 0);
        model[(3 * 512 * cs) as usize..(4 * 512 * cs) as usize].fill(0);
    }
    let len_before = s.len().unwrap();
    let img = open_rw(&s);
    let r = img.check(CheckFix::NONE).unwrap();
    assert!(r.leaks >= 3, "{r:?}");
    let r = img.check(CheckFix::ALL).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{r:?}");
    assert!(r.leaks_fixed >= 3);
    assert!(s.len().unwrap() < len_before);
    let r2 = img.check(CheckFix::NONE).unwrap();
    assert_eq!((r2.corruptions, r2.leaks), (0, 0), "{r2:?}");
    let mut back = vec![0u8; 8 << 20];
    img.read_at(0, &mut back).unwrap();
    assert!(back == model, "data changed by compaction");
    // And the image still takes new writes in the right place.
    img.write_at(5 << 20, &[0xeeu8; 10000]).unwrap();
    assert_eq!(img.check(CheckFix::NONE).unwrap().leaks, 0);
}

#[test]
fn confined_backing_policy_refuses_files_outside_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("img")).unwrap();
    std::fs::write(dir.path().join("outside.raw"), vec![0x5au8; 65536]).unwrap();
    std::fs::write(dir.path().join("img/inside.raw"), vec![0x6bu8; 65536]).unwrap();
    for (name, allowed) in [("../outside.raw", false), ("inside.raw", true)] {
        let p = dir.path().join("img/top.qed");
        let opts = CreateOptions {
            size: 65536,
            backing_file: Some(name.into()),
            backing_format: Some(qed::BackingFormat::Raw),
            ..Default::default()
        };
        Image::create(&p, &opts).unwrap();
        let confined = OpenOptions {
            backing_policy: qed::BackingPolicy::SameDirectory,
            ..OpenOptions::read_only()
        };
        match Image::open(&p, &confined) {
            Ok(img) => {
                assert!(allowed, "{name} was followed");
                let mut b = [0u8; 4];
                img.read_at(0, &mut b).unwrap();
                assert_eq!(b, [0x6b; 4]);
            }
            Err(e) => {
                assert!(!allowed, "{name}: {e}");
                assert!(matches!(e.root(), Error::BackingRefused { .. }), "{e}");
            }
        }
        // The default follows any path, as QEMU does.
        Image::open(&p, &OpenOptions::read_only()).unwrap();
    }
}

#[test]
fn backing_approver_sees_each_file_of_the_chain_and_can_refuse() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("base.raw"), vec![0x7cu8; 65536]).unwrap();
    let mid = dir.path().join("mid.qed");
    let top = dir.path().join("top.qed");
    for (p, b, f) in [
        (&mid, "base.raw", qed::BackingFormat::Raw),
        (&top, "mid.qed", qed::BackingFormat::Qed),
    ] {
        let opts = CreateOptions {
            size: 65536,
            backing_file: Some(b.into()),
            backing_format: Some(f),
            ..Default::default()
        };
        Image::create(p, &opts).unwrap();
    }
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let refuse_at = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let (s, r) = (seen.clone(), refuse_at.clone());
    let approver: qed::BackingApprover = Arc::new(move |path, name, depth| {
        s.lock()
            .unwrap()
            .push((path.to_path_buf(), name.to_owned(), depth));
        if depth == r.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Error::BackingRefused {
                name: name.into(),
                reason: "not on the list".into(),
            });
        }
        Ok(())
    });
    let opts = OpenOptions {
        backing_approver: Some(approver),
        ..OpenOptions::read_only()
    };
    let img = Image::open(&top, &opts).unwrap();
    let mut b = [0u8; 4];
    img.read_at(0, &mut b).unwrap();
    assert_eq!(b, [0x7c; 4]);
    drop(img);
    let canon = dir.path().canonicalize().unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            (canon.join("mid.qed"), "mid.qed".to_owned(), 1),
            (canon.join("base.raw"), "base.raw".to_owned(), 2),
        ]
    );
    for depth in [1, 2] {
        seen.lock().unwrap().clear();
        refuse_at.store(depth, std::sync::atomic::Ordering::Relaxed);
        let e = Image::open(&top, &opts).expect_err("refused");
        assert!(matches!(e.root(), Error::BackingRefused { .. }), "{e}");
        assert!(e.to_string().contains("not on the list"), "{e}");
        assert_eq!(seen.lock().unwrap().len(), depth as usize);
    }
}

/// Storage whose writes at or past `fail_from` fail, to exercise metadata write errors.
struct FailingStorage {
    inner: MemStorage,
    fail_at: std::sync::atomic::AtomicU64,
}

impl Storage for FailingStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if offset == self.fail_at.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
}

#[test]
fn failed_l2_write_fails_the_image_and_keeps_it_dirty_for_repair() {
    let s = Arc::new(FailingStorage {
        inner: MemStorage::new(),
        fail_at: u64::MAX.into(),
    });
    Image::create_on(
        &*s,
        &CreateOptions {
            size: 16 << 20,
            cluster_size: 4096,
            table_size: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let img = Image::open_storage(s.clone(), &OpenOptions::read_write()).unwrap();
    img.write_at(0, &[1u8; 4096]).unwrap();
    let l2 = peek(&s.inner, 4096);
    s.fail_at.store(l2, std::sync::atomic::Ordering::SeqCst); // the L2 sector of entries 0..63
                                                              // Without a backing file the entry is written with the write; with one, at the flush.
    let e = img
        .write_at(8192, &[2u8; 4096])
        .and_then(|_| img.flush())
        .unwrap_err();
    assert!(e.to_string().contains("writing L2 table"), "{e}");
    // The image refuses further work and close reports the failure without clearing the bit.
    assert!(matches!(
        img.write_at(0, &[3u8; 512]),
        Err(Error::Failed(_))
    ));
    assert!(img.close().is_err());
    assert!(header_of(&s.inner).needs_check());
    s.fail_at
        .store(u64::MAX, std::sync::atomic::Ordering::SeqCst);
    let img = Image::open_storage(s.clone(), &OpenOptions::read_write()).unwrap();
    let r = img.check(CheckFix::NONE).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{r:?}");
    let mut b = [0u8; 4096];
    img.read_at(0, &mut b).unwrap();
    assert_eq!(b, [1u8; 4096]);
}

/// Flushes racing with allocating writes into the same pieces of L2 table: every staged entry
/// must reach the file. Two write-backs running at once could write their copies of a piece out
/// of order, the older over the newer, losing entries (leaked clusters, other bytes after a
/// reopen).
#[test]
fn concurrent_flushes_never_lose_staged_entries() {
    let s = mem_image(64 << 20, 4096, 1);
    let img = Image::open_storage(s.clone(), &OpenOptions::read_write()).unwrap();
    let threads = 8u64;
    let per = 1500u64;
    std::thread::scope(|sc| {
        for t in 0..threads {
            let img = &img;
            sc.spawn(move || {
                for i in 0..per {
                    // Interleaved clusters: the threads share every piece of table.
                    let c = i * threads + t;
                    img.write_at(c * 4096, &[(c % 251) as u8 + 1; 4096])
                        .unwrap();
                    if i % 2 == t % 2 {
                        img.flush().unwrap();
                    }
                }
            });
        }
    });
    img.close().unwrap();
    let img = Image::open_storage(s.clone(), &OpenOptions::read_write()).unwrap();
    let r = img.check(CheckFix::NONE).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{r:?}");
    let mut buf = vec![0u8; 4096];
    for c in 0..threads * per {
        img.read_at(c * 4096, &mut buf).unwrap();
        assert!(
            buf.iter().all(|&b| b == (c % 251) as u8 + 1),
            "cluster {c} lost its data after reopen"
        );
    }
}
