// SPDX-License-Identifier: MIT OR Apache-2.0
//! Discard and write-zeroes flags: the range reads as zeros (also over raw and QED backing
//! files), whole data clusters give their blocks back to the file system (st_blocks shrinks)
//! while keeping their table entries, so qemu-img check finds no leak and QEMU reads zeros;
//! NO_FALLBACK refuses before anything changes; storage without hole punching falls back to
//! writing zeros; a storage fault at any call of a discard leaves each byte old or zero.

mod common;
use common::*;
use qed::storage::{Fault, FaultCalls, FaultMode, FaultStorage, MemStorage, Storage};
use qed::{
    BackingFormat, CheckFix, CreateOptions, Error, ExtentKind, Image, OpenOptions, WriteZeroesFlags,
};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const CS: u64 = 64 * KIB;

fn create(dir: &Path, name: &str, size: u64, backing: Option<(&str, BackingFormat)>) -> PathBuf {
    let path = dir.join(name);
    Image::create(
        &path,
        &CreateOptions {
            size,
            cluster_size: CS as u32,
            backing_file: backing.map(|b| b.0.to_owned()),
            backing_format: backing.map(|b| b.1),
            ..Default::default()
        },
    )
    .unwrap();
    path
}

fn open_rw(path: &Path) -> Image {
    Image::open(path, &OpenOptions::read_write()).unwrap()
}

/// 512-byte blocks the file holds on disk.
fn blocks(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks()
}

/// The file system's own bookkeeping may take a block or two back (ext4 splits an extent),
/// so a punch of `bytes` must free all but 64 KiB of them.
#[track_caller]
fn assert_freed(before: u64, after: u64, bytes: u64) {
    assert!(
        after + bytes / 512 <= before + 128,
        "st_blocks {before} -> {after}: {bytes} bytes should have been given back"
    );
}

#[track_caller]
fn qemu_clean(path: &Path) {
    let out = qemu_img(&["check", "-f", "qed", p(path)]);
    assert!(
        out.success() && out.text().contains("No errors were found"),
        "qemu-img check of {}:\n{}",
        path.display(),
        out.text()
    );
}

/// qemu-img compare of the image with a raw file holding `expect`.
#[track_caller]
fn qemu_same(path: &Path, expect: &[u8]) {
    let raw = path.with_extension("expect.raw");
    std::fs::write(&raw, expect).unwrap();
    let out = qemu_img(&["compare", "-f", "qed", "-F", "raw", p(path), p(&raw)]);
    assert!(
        out.success() && out.text().contains("Images are identical"),
        "qemu-img compare {} with the expectation:\n{}",
        path.display(),
        out.text()
    );
}

fn read_all(img: &Image) -> Vec<u8> {
    let mut v = vec![0u8; img.size() as usize];
    img.read_at(0, &mut v).unwrap();
    v
}

fn kind_at(img: &Image, off: u64) -> ExtentKind {
    img.block_status(off, 1).unwrap().kind
}

#[test]
fn discard_without_backing_frees_blocks_and_reads_zeros() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let path = create(dir.path(), "a.qed", 8 * MIB, None);
    let img = open_rw(&path);
    let data = random_bytes(1, 4 * MIB as usize);
    img.write_at(0, &data).unwrap();
    img.flush().unwrap();
    let before = blocks(&path);
    // Partial head (in cluster 1), 46 whole clusters (2 ..= 47), partial tail (cluster 48), and
    // an unallocated stretch past the data that must stay unallocated.
    let (off, len) = (100_000u64, 3 * MIB + 5000 - 100_000);
    img.discard(off, len).unwrap();
    img.discard(5 * MIB, MIB).unwrap();
    img.flush().unwrap();
    let after = blocks(&path);
    assert_freed(before, after, 46 * CS);
    let s = img.stats();
    assert_eq!((s.discard_requests, s.discard_bytes), (2, len + MIB));
    assert_eq!(s.clusters_punched, 46);
    // The punched clusters keep their entries (no leak); the stretch stays unallocated.
    assert!(matches!(kind_at(&img, 2 * CS), ExtentKind::Data { .. }));
    assert!(matches!(kind_at(&img, 47 * CS), ExtentKind::Data { .. }));
    assert_eq!(kind_at(&img, 5 * MIB), ExtentKind::Unallocated);
    let mut expect = data.clone();
    expect.resize(8 * MIB as usize, 0);
    expect[off as usize..(off + len) as usize].fill(0);
    assert_bytes_equal("after discard", 0, &read_all(&img), &expect);
    // A write into a punched cluster lands in it again; the rest of it still reads zeros.
    img.write_at(10 * CS + 7, b"again").unwrap();
    expect[(10 * CS + 7) as usize..(10 * CS + 12) as usize].copy_from_slice(b"again");
    img.close().unwrap();
    qemu_clean(&path);
    qemu_same(&path, &expect);
    qemu_io(&path, &[format!("read -P 0 {} {}", 2 * CS, 8 * CS)]);
    qemu_io(&path, &[format!("read -P 0 {} {}", 11 * CS, 37 * CS)]);
    let img = Image::open(&path, &OpenOptions::read_only()).unwrap();
    let r = img.check(CheckFix::NONE).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{r:?}");
}

fn discard_over_backing(fmt: BackingFormat) {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let base_data = random_bytes(2, 4 * MIB as usize);
    let base_name = match fmt {
        BackingFormat::Raw => {
            std::fs::write(dir.path().join("base.raw"), &base_data).unwrap();
            "base.raw"
        }
        _ => {
            let b = create(dir.path(), "base.qed", 4 * MIB, None);
            let img = open_rw(&b);
            img.write_at(0, &base_data).unwrap();
            // A hole in the QED backing file too.
            img.write_zeroes(3 * MIB, CS).unwrap();
            img.close().unwrap();
            "base.qed"
        }
    };
    let mut expect = base_data.clone();
    if fmt == BackingFormat::Qed {
        expect[3 * MIB as usize..(3 * MIB + CS) as usize].fill(0);
    }
    let path = create(dir.path(), "top.qed", 4 * MIB, Some((base_name, fmt)));
    let img = open_rw(&path);
    let top = random_bytes(3, MIB as usize);
    img.write_at(0, &top).unwrap();
    expect[..MIB as usize].copy_from_slice(&top);
    img.flush().unwrap();
    let before = blocks(&path);
    // Partial head in allocated cluster 0; allocated whole clusters 1..16; unallocated whole
    // clusters 16..50 over the backing file; partial tail in unallocated cluster 50.
    let (off, len) = (5000u64, 50 * CS + 333 - 5000);
    img.discard(off, len).unwrap();
    img.flush().unwrap();
    expect[off as usize..(off + len) as usize].fill(0);
    // 15 clusters punched, one allocated for the partial tail.
    assert_freed(before, blocks(&path), 14 * CS);
    assert!(matches!(kind_at(&img, CS), ExtentKind::Data { .. }));
    assert_eq!(kind_at(&img, 16 * CS), ExtentKind::Zero);
    assert_eq!(kind_at(&img, 49 * CS), ExtentKind::Zero);
    // The partial tail was written (copy-on-write keeps the backing bytes after it).
    assert!(matches!(kind_at(&img, 50 * CS), ExtentKind::Data { .. }));
    assert_bytes_equal("after discard", 0, &read_all(&img), &expect);
    img.close().unwrap();
    qemu_clean(&path);
    qemu_same(&path, &expect);
    qemu_io(&path, &[format!("read -P 0 {off} {len}")]);
}

#[test]
fn discard_over_a_raw_backing_file_reads_zeros() {
    discard_over_backing(BackingFormat::Raw);
}

#[test]
fn discard_over_a_qed_backing_file_reads_zeros() {
    discard_over_backing(BackingFormat::Qed);
}

#[test]
fn may_unmap_frees_blocks_and_plain_write_zeroes_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = create(dir.path(), "a.qed", 4 * MIB, None);
    let img = open_rw(&path);
    img.write_at(0, &random_bytes(4, 2 * MIB as usize)).unwrap();
    img.flush().unwrap();
    let b0 = blocks(&path);
    img.write_zeroes(0, MIB).unwrap();
    img.flush().unwrap();
    let b1 = blocks(&path);
    assert!(b1 + 16 >= b0, "write_zeroes freed blocks: {b0} -> {b1}");
    img.write_zeroes_flags(MIB, MIB, WriteZeroesFlags::MAY_UNMAP)
        .unwrap();
    img.flush().unwrap();
    let b2 = blocks(&path);
    assert_freed(b1, b2, MIB);
    assert!(read_all(&img)[..2 * MIB as usize].iter().all(|&b| b == 0));
    let s = img.stats();
    assert_eq!((s.write_zeroes_requests, s.clusters_punched), (2, 16));
    assert_eq!(s.discard_requests, 0);
    img.close().unwrap();
}

/// Everything a refusal must leave as it was: the file's bytes, the map and the stats' writes.
fn snapshot(img: &Image, path: &Path) -> (Vec<u8>, Vec<qed::Extent>, u64) {
    (
        std::fs::read(path).unwrap(),
        img.map(0, img.size()).unwrap(),
        img.stats().l2_writes,
    )
}

#[test]
fn no_fallback_refuses_before_changing_anything() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("base.raw"),
        random_bytes(5, 4 * MIB as usize),
    )
    .unwrap();
    let path = create(
        dir.path(),
        "top.qed",
        4 * MIB,
        Some(("base.raw", BackingFormat::Raw)),
    );
    let img = open_rw(&path);
    img.write_at(8 * CS, &random_bytes(6, 8 * CS as usize))
        .unwrap();
    img.flush().unwrap();
    let nf = WriteZeroesFlags::NO_FALLBACK;
    let both = nf | WriteZeroesFlags::MAY_UNMAP;
    let refused = |off: u64, len: u64, flags: WriteZeroesFlags, why: &str| {
        let before = snapshot(&img, &path);
        match img.write_zeroes_flags(off, len, flags) {
            Err(Error::Unsupported { reason, .. }) => {
                assert!(reason.contains(why), "{off:#x}+{len:#x}: {reason}")
            }
            r => panic!("{off:#x}+{len:#x} {flags:?}: expected ENOTSUP, got {r:?}"),
        }
        assert!(
            before == snapshot(&img, &path),
            "{off:#x}+{len:#x}: changed"
        );
    };
    // A partial cluster over data, and one over the backing file.
    refused(8 * CS + 1, 100, both, "part of a cluster");
    refused(CS, 100, both, "part of a cluster");
    // Whole allocated clusters without MAY_UNMAP; also when unallocated clusters that could be
    // zeroed come first (the check runs before the first change).
    refused(8 * CS, 2 * CS, nf, "no MAY_UNMAP");
    refused(0, 10 * CS, nf, "no MAY_UNMAP");
    // What needs no written zeros is done.
    img.write_zeroes_flags(0, 8 * CS, nf).unwrap();
    assert_eq!(kind_at(&img, 0), ExtentKind::Zero);
    let b0 = blocks(&path);
    img.write_zeroes_flags(8 * CS, 8 * CS, both).unwrap();
    img.flush().unwrap();
    assert_freed(b0, blocks(&path), 8 * CS);
    assert!(read_all(&img)[..16 * CS as usize].iter().all(|&b| b == 0));
    // A partial cluster that already reads as zeros (a zero cluster) needs nothing either.
    img.write_zeroes_flags(3 * CS + 5, 10, nf).unwrap();
    img.close().unwrap();

    // Storage that cannot punch: MAY_UNMAP | NO_FALLBACK over data is refused, unchanged.
    let s = Arc::new(MemStorage::new());
    Image::create_on(
        &*s,
        &CreateOptions {
            size: MIB,
            cluster_size: CS as u32,
            ..Default::default()
        },
    )
    .unwrap();
    let img = Image::open_storage(s.clone(), &OpenOptions::read_write()).unwrap();
    img.write_at(0, &random_bytes(7, MIB as usize)).unwrap();
    img.flush().unwrap();
    s.set_punch_supported(false);
    let bytes = s.to_bytes();
    match img.write_zeroes_flags(0, MIB, both) {
        Err(Error::Unsupported { reason, .. }) => assert!(reason.contains("cannot punch")),
        r => panic!("expected ENOTSUP, got {r:?}"),
    }
    assert!(s.to_bytes() == bytes, "refusal changed the storage");
    // Discard falls back to writing zeros there.
    img.discard(0, MIB).unwrap();
    assert!(read_all(&img).iter().all(|&b| b == 0));
    assert_eq!(img.stats().clusters_punched, 0);
    img.close().unwrap();
}

/// Every call of a discard fails in turn (once, and from then on, torn or not); the client
/// flushes and closes as it would. The reopened image repairs clean, reads old or zero bytes
/// in the range (zeros when the discard and the flush after it succeeded) and old ones
/// elsewhere.
#[test]
fn storage_faults_during_discard_leave_old_or_zero_bytes() {
    let mut swept = 0;
    for backing in [false, true] {
        for (mode, torn) in [
            (FaultMode::Once, false),
            (FaultMode::From, false),
            (FaultMode::Once, true),
        ] {
            for n in 0.. {
                if !fault_case(
                    backing,
                    Fault::new(FaultCalls::ALL, n, libc::EIO)
                        .with_mode(mode)
                        .with_torn(torn),
                ) {
                    break;
                }
                swept += 1;
            }
        }
    }
    // Punches, writes (partial clusters, zero-cluster entries), flushes, and reads all failed.
    assert!(swept >= 20, "only {swept} fault points");
}

/// Runs one fault case; false when the fault was never reached (the sweep is done).
fn fault_case(backing: bool, fault: Fault) -> bool {
    let size = 2 * MIB;
    let base = Arc::new(MemStorage::from_bytes(&random_bytes(8, size as usize)));
    let opts = |writable| OpenOptions {
        writable,
        backing_resolver: backing.then(|| {
            let b = base.clone();
            Arc::new(move |_: &str, _: Option<BackingFormat>| {
                Ok(qed::Backing::Raw(b.clone() as Arc<dyn Storage>))
            }) as qed::image::BackingResolver
        }),
        ..Default::default()
    };
    let mem = Arc::new(MemStorage::new());
    Image::create_on(
        &*mem,
        &CreateOptions {
            size,
            cluster_size: 4096,
            backing_file: backing.then(|| "base".into()),
            backing_format: backing.then_some(BackingFormat::Raw),
            ..Default::default()
        },
    )
    .unwrap();
    let img = Image::open_storage(mem.clone(), &opts(true)).unwrap();
    img.write_at(0, &random_bytes(9, MIB as usize)).unwrap();
    img.flush().unwrap();
    let old = read_all(&img);
    img.close().unwrap();

    let fs = Arc::new(FaultStorage::new(mem.clone()));
    let img = Image::open_storage(fs.clone(), &opts(true)).unwrap();
    fs.arm(fault);
    // Allocated clusters with partial ends, then unallocated ones (zero clusters over the
    // backing file), in two requests.
    let (a, b) = ((1000u64, MIB - 1000), (MIB - 5000, 100 * 4096 + 77));
    let ra = img.discard(a.0, a.1);
    let rb = img.discard(b.0, b.1);
    let rf = img.flush();
    let reached = fs.fired() > 0;
    fs.disarm();
    let _ = img.close();
    drop(img);

    let disk = Arc::new(MemStorage::from_bytes(&mem.to_bytes()));
    let what = format!("backing={backing} {fault:?}");
    let img = Image::open_storage(disk, &opts(true))
        .unwrap_or_else(|e| panic!("{what}: reopen failed: {e}"));
    img.check(CheckFix::ALL).unwrap();
    let r = img.check(CheckFix::NONE).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{what}: {r:?}");
    let got = read_all(&img);
    let in_range = |i: u64, (o, l): (u64, u64)| (o..o + l).contains(&i);
    for (i, (&g, &o)) in got.iter().zip(&old).enumerate() {
        let i = i as u64;
        let hit_a = in_range(i, a);
        let hit_b = in_range(i, b);
        if (hit_a && ra.is_ok() || hit_b && rb.is_ok()) && rf.is_ok() {
            assert_eq!(
                g, 0,
                "{what}: byte {i:#x} not zero after an acknowledged discard"
            );
        } else if hit_a || hit_b {
            assert!(
                g == o || g == 0,
                "{what}: byte {i:#x} is {g:#x}, neither old nor zero"
            );
        } else {
            assert_eq!(g, o, "{what}: byte {i:#x} outside the discards changed");
        }
    }
    reached
}
