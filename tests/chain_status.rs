// SPDX-License-Identifier: MIT OR Apache-2.0
//! Block status through the backing chain (`Image::block_status_chain` / `map_chain`): fixed
//! chains with every depth, kind and host offset asserted (QED and raw backing files, raw
//! holes, zero clusters over backing data, backing files shorter than the overlay, a chain of
//! three, nothing allocated anywhere, confined and backing-less opens, a raw backing file in
//! memory), and random chains compared with an expectation built by walking the chain 512 bytes
//! at a time, and with `qemu-img map` (through `qed-img map`, byte for byte).

mod common;

use common::{data_segments, require_qemu, KIB, MIB};
use qed::{
    Backing, BackingFormat, BackingPolicy, ChainKind, CreateOptions, ExtentKind, Image, MemStorage,
    OpenOptions, Storage,
};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

const QED_IMG: &str = env!("CARGO_BIN_EXE_qed-img");

/// (offset, length, kind, depth, host offset): one extent as asserted.
type Row = (u64, u64, ChainKind, u32, Option<u64>);

fn rows(img: &Image, offset: u64, len: u64) -> Vec<Row> {
    img.map_chain(offset, len)
        .expect("map_chain")
        .iter()
        .map(|e| (e.offset, e.length, e.kind, e.depth, e.host_offset))
        .collect()
}

/// Creates a QED image of `size` bytes with `cluster` byte clusters over `backing`.
fn create(dir: &Path, name: &str, size: u64, cluster: u32, backing: Option<(&str, BackingFormat)>) {
    create_tables(dir, name, size, cluster, 4, backing)
}

/// [`create`] with `table` clusters per table.
fn create_tables(
    dir: &Path,
    name: &str,
    size: u64,
    cluster: u32,
    table: u32,
    backing: Option<(&str, BackingFormat)>,
) {
    Image::create(
        dir.join(name),
        &CreateOptions {
            size,
            cluster_size: cluster,
            table_size: table,
            backing_file: backing.map(|b| b.0.to_string()),
            backing_format: backing.map(|b| b.1),
        },
    )
    .expect("create");
}

/// A change to a QED image.
#[derive(Clone, Copy, Debug)]
enum Op {
    Write(u64, u64, u8),
    Zero(u64, u64),
}

fn apply(dir: &Path, name: &str, ops: &[Op]) {
    let img = Image::open(dir.join(name), &OpenOptions::read_write()).expect("open rw");
    for op in ops {
        match *op {
            Op::Write(off, len, p) => img.write_at(off, &vec![p; len as usize]).expect("write"),
            Op::Zero(off, len) => img.write_zeroes(off, len).expect("write_zeroes"),
        }
    }
    img.close().expect("close");
}

/// A sparse raw file of `len` bytes (truncate, then writes).
fn raw(dir: &Path, name: &str, len: u64, writes: &[(u64, u64, u8)]) {
    let f = std::fs::File::create(dir.join(name)).expect("create raw");
    f.set_len(len).expect("set_len");
    for &(off, n, p) in writes {
        f.write_all_at(&vec![p; n as usize], off)
            .expect("write raw");
    }
    f.sync_all().expect("sync");
}

fn open(dir: &Path, name: &str) -> Image {
    Image::open(dir.join(name), &OpenOptions::read_only()).expect("open")
}

/// File offset of guest `off` in the QED image at `depth` below `img`.
fn host(img: &Image, depth: u32, off: u64) -> u64 {
    if depth == 0 {
        return match img.block_status(off, 1).expect("block_status").kind {
            ExtentKind::Data { host_offset } => host_offset,
            k => panic!("no data at {off:#x}: {k:?}"),
        };
    }
    match img.backing() {
        Some(Backing::Qed(sub)) => host(&sub, depth - 1, off),
        b => panic!("no QED image at depth {depth}: {b:?}"),
    }
}

use ChainKind::{Data, Unallocated, Zero};

#[test]
fn qed_backing_file_shorter_than_the_overlay() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    create(d, "base.qed", 4 * MIB, 64 * 1024, None);
    apply(
        d,
        "base.qed",
        &[
            Op::Write(0, 256 * KIB, 1),
            Op::Zero(MIB, 64 * KIB),
            Op::Write(3 * MIB, 64 * KIB, 2),
        ],
    );
    create(
        d,
        "top.qed",
        6 * MIB,
        64 * 1024,
        Some(("base.qed", BackingFormat::Qed)),
    );
    apply(
        d,
        "top.qed",
        &[
            Op::Write(64 * KIB, 64 * KIB, 3),
            Op::Zero(3 * MIB, 64 * KIB),
        ],
    );
    let img = open(d, "top.qed");
    let b0 = host(&img, 1, 0);
    assert_eq!(
        rows(&img, 0, 6 * MIB),
        vec![
            (0, 64 * KIB, Data, 1, Some(b0)),
            (64 * KIB, 64 * KIB, Data, 0, Some(host(&img, 0, 64 * KIB))),
            // The base's one allocation continues past the overlay's cluster.
            (128 * KIB, 128 * KIB, Data, 1, Some(b0 + 128 * KIB)),
            (256 * KIB, 768 * KIB, Unallocated, 1, None),
            (MIB, 64 * KIB, Zero, 1, None),
            (MIB + 64 * KIB, 2 * MIB - 64 * KIB, Unallocated, 1, None),
            // A zero cluster over backing data hides it.
            (3 * MIB, 64 * KIB, Zero, 0, None),
            (3 * MIB + 64 * KIB, MIB - 64 * KIB, Unallocated, 1, None),
            // Past the base's end: zeros stored nowhere, decided by the overlay.
            (4 * MIB, 2 * MIB, Unallocated, 0, None),
        ]
    );
    // One call answers for a range that starts inside an extent and stops at `len`.
    let e = img.block_status_chain(130 * KIB, 10 * KIB).unwrap();
    assert_eq!(
        (e.offset, e.length, e.kind, e.depth, e.host_offset),
        (130 * KIB, 10 * KIB, Data, 1, Some(b0 + 130 * KIB))
    );
    assert!(!e.reads_as_zeros());
    let e = img.block_status_chain(5 * MIB, MIB).unwrap();
    assert!(e.reads_as_zeros());
    // The top-only call still answers for the top image alone.
    assert_eq!(
        img.block_status(0, 64 * KIB).unwrap().kind,
        ExtentKind::Unallocated
    );
    // Bad ranges are refused as block_status refuses them.
    assert!(img.block_status_chain(0, 0).is_err());
    assert!(img.block_status_chain(6 * MIB, 1).is_err());
    assert!(img.block_status_chain(6 * MIB - 512, 1024).is_err());
    assert!(img.map_chain(0, 0).unwrap().is_empty());
}

#[test]
fn raw_backing_file_holes_and_its_end() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    // 3 MiB + 1000 bytes: the block layer sees 3 MiB + 1024 (whole sectors); the file ends in
    // a hole.
    raw(
        d,
        "base.raw",
        3 * MIB + 1000,
        &[(0, MIB, 0x11), (2 * MIB, 64 * KIB, 0x22)],
    );
    create(
        d,
        "ov.qed",
        8 * MIB,
        64 * 1024,
        Some(("base.raw", BackingFormat::Raw)),
    );
    apply(
        d,
        "ov.qed",
        &[
            Op::Write(512 * KIB, 64 * KIB, 0x33),
            Op::Zero(2 * MIB, 64 * KIB),
            Op::Write(6 * MIB, 64 * KIB, 0x44),
        ],
    );
    let img = open(d, "ov.qed");
    let end = 3 * MIB + 1024;
    assert_eq!(
        rows(&img, 0, 8 * MIB),
        vec![
            (0, 512 * KIB, Data, 1, Some(0)),
            (512 * KIB, 64 * KIB, Data, 0, Some(host(&img, 0, 512 * KIB))),
            (576 * KIB, 448 * KIB, Data, 1, Some(576 * KIB)),
            // Holes of a raw file are zeros, with their offset in the file.
            (MIB, MIB, Zero, 1, Some(MIB)),
            (2 * MIB, 64 * KIB, Zero, 0, None),
            (
                2 * MIB + 64 * KIB,
                end - 2 * MIB - 64 * KIB,
                Zero,
                1,
                Some(2 * MIB + 64 * KIB)
            ),
            (end, 6 * MIB - end, Unallocated, 0, None),
            (6 * MIB, 64 * KIB, Data, 0, Some(host(&img, 0, 6 * MIB))),
            (6 * MIB + 64 * KIB, 2 * MIB - 64 * KIB, Unallocated, 0, None),
        ]
    );
    // The bytes agree: holes and the part past the end read as zeros.
    let mut buf = vec![0xffu8; 4 * MIB as usize];
    img.read_at(MIB, &mut buf).unwrap();
    assert!(buf[..MIB as usize].iter().all(|&b| b == 0));
    assert!(buf[2 * MIB as usize..].iter().all(|&b| b == 0));
}

#[test]
fn chain_of_three_over_a_raw_file_ending_in_data() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    // Ends in data at an odd length: the rest of its last sector is a hole.
    raw(
        d,
        "base.raw",
        MIB + 700,
        &[(0, 64 * KIB, 0x55), (MIB, 700, 0x66)],
    );
    create(
        d,
        "mid.qed",
        2 * MIB,
        4096,
        Some(("base.raw", BackingFormat::Raw)),
    );
    apply(
        d,
        "mid.qed",
        &[
            Op::Write(128 * KIB, 64 * KIB, 1),
            Op::Zero(192 * KIB, 64 * KIB),
        ],
    );
    create(
        d,
        "top.qed",
        2 * MIB,
        64 * 1024,
        Some(("mid.qed", BackingFormat::Qed)),
    );
    apply(d, "top.qed", &[Op::Write(0, 64 * KIB, 2)]);
    let img = open(d, "top.qed");
    assert_eq!(
        rows(&img, 0, 2 * MIB),
        vec![
            (0, 64 * KIB, Data, 0, Some(host(&img, 0, 0))),
            (64 * KIB, 64 * KIB, Zero, 2, Some(64 * KIB)),
            (128 * KIB, 64 * KIB, Data, 1, Some(host(&img, 1, 128 * KIB))),
            (192 * KIB, 64 * KIB, Zero, 1, None),
            (256 * KIB, 768 * KIB, Zero, 2, Some(256 * KIB)),
            (MIB, 700, Data, 2, Some(MIB)),
            (MIB + 700, 324, Zero, 2, Some(MIB + 700)),
            // Past the raw file: the middle image decides.
            (MIB + 1024, MIB - 1024, Unallocated, 1, None),
        ]
    );
}

#[test]
fn nothing_allocated_anywhere() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    create(d, "alone.qed", MIB, 65536, None);
    create(d, "base.qed", MIB, 65536, None);
    create(
        d,
        "top.qed",
        2 * MIB,
        65536,
        Some(("base.qed", BackingFormat::Qed)),
    );
    assert_eq!(
        rows(&open(d, "alone.qed"), 0, MIB),
        vec![(0, MIB, Unallocated, 0, None)]
    );
    assert_eq!(
        rows(&open(d, "top.qed"), 0, 2 * MIB),
        vec![
            (0, MIB, Unallocated, 1, None),
            (MIB, MIB, Unallocated, 0, None)
        ]
    );
}

#[test]
fn confined_and_backing_less_opens_use_the_open_chain() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    raw(d, "base.raw", MIB, &[(0, 64 * KIB, 7)]);
    create(
        d,
        "ov.qed",
        MIB,
        65536,
        Some(("base.raw", BackingFormat::Raw)),
    );
    // Counts the backing files opened: the chain call must open none of its own.
    let opened = Arc::new(AtomicU32::new(0));
    let o = opened.clone();
    let opts = OpenOptions {
        backing_policy: BackingPolicy::SameDirectory,
        backing_approver: Some(Arc::new(move |_: &Path, _: &str, _: u32| {
            o.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })),
        ..OpenOptions::read_only()
    };
    let img = Image::open(d.join("ov.qed"), &opts).unwrap();
    assert_eq!(opened.load(Ordering::SeqCst), 1);
    assert_eq!(
        rows(&img, 0, MIB),
        vec![
            (0, 64 * KIB, Data, 1, Some(0)),
            (64 * KIB, MIB - 64 * KIB, Zero, 1, Some(64 * KIB))
        ]
    );
    assert_eq!(opened.load(Ordering::SeqCst), 1);
    // Without its backing file the image answers for itself.
    let alone = Image::open(
        d.join("ov.qed"),
        &OpenOptions {
            no_backing: true,
            ..OpenOptions::read_only()
        },
    )
    .unwrap();
    assert_eq!(rows(&alone, 0, MIB), vec![(0, MIB, Unallocated, 0, None)]);
}

#[test]
fn raw_backing_in_memory_reports_its_written_pages() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    create(
        d,
        "ov.qed",
        2 * MIB,
        65536,
        Some(("whatever", BackingFormat::Raw)),
    );
    let mem = Arc::new(MemStorage::new());
    mem.set_len(MIB + 512).unwrap();
    // MemStorage keeps 64 KiB pages: a byte written makes its page data.
    mem.write_at(&[9], 256 * KIB + 5).unwrap();
    mem.write_at(&[9; 4], MIB).unwrap();
    let m: Arc<dyn Storage> = mem.clone();
    let opts = OpenOptions {
        backing_resolver: Some(Arc::new(move |_: &str, _| Ok(Backing::Raw(m.clone())))),
        ..OpenOptions::read_only()
    };
    let img = Image::open(d.join("ov.qed"), &opts).unwrap();
    assert_eq!(
        rows(&img, 0, 2 * MIB),
        vec![
            (0, 256 * KIB, Zero, 1, Some(0)),
            (256 * KIB, 64 * KIB, Data, 1, Some(256 * KIB)),
            (320 * KIB, 704 * KIB, Zero, 1, Some(320 * KIB)),
            (MIB, 512, Data, 1, Some(MIB)),
            (MIB + 512, MIB - 512, Unallocated, 0, None),
        ]
    );
    // The storage-level answers the chain is built from.
    assert_eq!(mem.hole_from(256 * KIB + 9).unwrap(), 320 * KIB);
    assert_eq!(mem.hole_from(0).unwrap(), 0);
    assert_eq!(mem.hole_from(MIB + 512).unwrap(), MIB + 512);
    assert_eq!(
        qed::storage::sparse_status(&*mem, 100, 10 * MIB).unwrap(),
        (false, 256 * KIB - 100)
    );
}

#[test]
fn file_storage_finds_holes() {
    let t = tempfile::tempdir().unwrap();
    raw(
        t.path(),
        "f.raw",
        4 * MIB,
        &[(MIB, 8 * KIB, 1), (3 * MIB, 4096, 2)],
    );
    let s = qed::FileStorage::open(&t.path().join("f.raw"), false, false).unwrap();
    assert_eq!(s.hole_from(MIB).unwrap(), MIB + 8 * KIB);
    assert_eq!(s.hole_from(0).unwrap(), 0);
    assert_eq!(s.hole_from(5 * MIB).unwrap(), 5 * MIB);
    assert_eq!(
        qed::storage::sparse_status(&s, 0, 8 * MIB).unwrap(),
        (false, MIB)
    );
    assert_eq!(
        qed::storage::sparse_status(&s, MIB + 4096, 8 * MIB).unwrap(),
        (true, 4096)
    );
    assert_eq!(
        qed::storage::sparse_status(&s, 3 * MIB + 4096, 8 * MIB).unwrap(),
        (false, 8 * MIB)
    );
}

// ---------------------------------------------------------------------------------------------
// Random chains against a brute-force expectation and against qemu-img map.

use common::Rng;

/// One layer of a random chain, top first.
enum Layer {
    Qed {
        name: String,
        size: u64,
        cluster: u64,
        table: u32,
    },
    Raw {
        name: String,
        len: u64,
    },
}

/// The expected answer for the 512 bytes at `x`, found by asking each layer alone.
fn unit(dir: &Path, layers: &[Layer], imgs: &[Image], x: u64) -> Vec<Row> {
    for (depth, l) in layers.iter().enumerate() {
        let depth = depth as u32;
        match l {
            Layer::Qed { .. } => {
                let img = &imgs[depth as usize];
                match img.block_status(x, 512).unwrap().kind {
                    ExtentKind::Data { host_offset } => {
                        return vec![(x, 512, Data, depth, Some(host_offset))];
                    }
                    ExtentKind::Zero => return vec![(x, 512, Zero, depth, None)],
                    ExtentKind::Unallocated => {}
                }
                let below = match layers.get(depth as usize + 1) {
                    None => return vec![(x, 512, Unallocated, depth, None)],
                    Some(Layer::Qed { size, .. }) => *size,
                    Some(Layer::Raw { len, .. }) => len.next_multiple_of(512),
                };
                if x >= below {
                    return vec![(x, 512, Unallocated, depth, None)];
                }
            }
            Layer::Raw { name, len } => {
                let f = std::fs::File::open(dir.join(name)).unwrap();
                let segs = data_segments(&f, *len);
                // 512-byte units are exact except the one holding the end of the file: its
                // data stops there, and the rest of the sector is a hole.
                let data = segs.iter().any(|&(a, b)| a <= x && x < b);
                if data && x + 512 > *len {
                    return vec![
                        (x, *len - x, Data, depth, Some(x)),
                        (*len, x + 512 - *len, Zero, depth, Some(*len)),
                    ];
                }
                return vec![(x, 512, if data { Data } else { Zero }, depth, Some(x))];
            }
        }
    }
    unreachable!("the bottom layer always decides")
}

/// Merges 512-byte rows as the chain call merges extents.
fn merge(units: impl IntoIterator<Item = Row>) -> Vec<Row> {
    let mut out: Vec<Row> = Vec::new();
    for u in units {
        if let Some(l) = out.last_mut() {
            let joins = l.2 == u.2
                && l.3 == u.3
                && match (l.4, u.4) {
                    (Some(a), Some(b)) => a + l.1 == b,
                    (None, None) => true,
                    _ => false,
                };
            if joins {
                l.1 += u.1;
                continue;
            }
        }
        out.push(u);
    }
    out
}

/// A random chain of 1 to 3 images above an optional raw file; returns the layers, top first.
fn random_chain(dir: &Path, rng: &mut Rng) -> Vec<Layer> {
    let qeds = rng.range(1, 3) as usize;
    let mut layers = Vec::new();
    for i in 0..qeds {
        layers.push(Layer::Qed {
            name: format!("l{i}.qed"),
            size: rng.range(2, 24) * 256 * KIB,
            cluster: [4096, 65536][rng.below(2) as usize],
            // 4 MiB per L2 table at 4 KiB clusters: extents cross tables.
            table: [2, 4][rng.below(2) as usize],
        });
    }
    if rng.chance(60) {
        layers.push(Layer::Raw {
            name: "base.raw".into(),
            len: rng.range(1, 4 * MIB),
        });
    }
    // Create bottom up, each naming the one below.
    for i in (0..layers.len()).rev() {
        let below = layers.get(i + 1).map(|l| match l {
            Layer::Qed { name, .. } => (name.as_str(), BackingFormat::Qed),
            Layer::Raw { name, .. } => (name.as_str(), BackingFormat::Raw),
        });
        match &layers[i] {
            Layer::Raw { name, len } => {
                let mut writes = Vec::new();
                for _ in 0..rng.range(0, 5) {
                    let off = rng.below(*len);
                    let n = rng.range(1, 256 * KIB).min(len - off);
                    writes.push((off, n, rng.pattern()));
                }
                raw(dir, name, *len, &writes);
            }
            Layer::Qed {
                name,
                size,
                cluster,
                table,
            } => {
                create_tables(dir, name, *size, *cluster as u32, *table, below);
                let mut ops = Vec::new();
                for _ in 0..rng.range(0, 7) {
                    let off = rng.below(*size / 512) * 512;
                    let n = (rng.range(1, 2 * *cluster / 512) * 512).min(size - off);
                    if rng.chance(30) {
                        // Whole clusters become zero clusters.
                        let a = off / cluster * cluster;
                        let n = (n.div_ceil(*cluster) * cluster).min(size - a);
                        ops.push(Op::Zero(a, n));
                    } else {
                        ops.push(Op::Write(off, n, rng.pattern()));
                    }
                }
                apply(dir, name, &ops);
            }
        }
    }
    layers
}

#[test]
fn random_chains_match_a_walk_and_qemu_img_map() {
    require_qemu();
    let seeds: u64 = std::env::var("QED_CHAIN_SEEDS")
        .map(|v| v.parse().expect("QED_CHAIN_SEEDS is a number"))
        .unwrap_or(12);
    for seed in 0..seeds {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        let mut rng = Rng::new(0xc4a1_0000 + seed);
        let layers = random_chain(d, &mut rng);
        let imgs: Vec<Image> = layers
            .iter()
            .filter_map(|l| match l {
                Layer::Qed { name, .. } => Some(Image::open(
                    d.join(name),
                    &OpenOptions {
                        no_backing: true,
                        ..OpenOptions::read_only()
                    },
                )),
                Layer::Raw { .. } => None,
            })
            .collect::<qed::Result<_>>()
            .unwrap();
        let top = open(d, "l0.qed");
        let size = top.size();
        let expected = merge((0..size / 512).flat_map(|u| unit(d, &layers, &imgs, u * 512)));
        assert_eq!(rows(&top, 0, size), expected, "seed {seed}");
        // Any sub-range answers as the walk's extents clipped to it.
        let a = rng.below(size / 512) * 512;
        let b = a + rng.range(1, (size - a) / 512) * 512;
        let clipped = merge((a / 512..b / 512).flat_map(|u| unit(d, &layers, &imgs, u * 512)));
        assert_eq!(
            rows(&top, a, b - a),
            clipped,
            "seed {seed} range {a:#x}..{b:#x}"
        );
        drop((top, imgs));
        for args in [&["map", "--output=json", "l0.qed"][..], &["map", "l0.qed"]] {
            let q = common::run_in(Some(d), "qemu-img", args).ok();
            let o = common::run_in(Some(d), QED_IMG, args).ok();
            assert_eq!(q.stdout, o.stdout, "seed {seed}: {args:?}");
        }
    }
}
