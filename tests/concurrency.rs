// SPDX-License-Identifier: MIT OR Apache-2.0
//! Concurrency tests: several threads sharing one `Image`, allocating into the same fresh L2
//! tables, writing the same unallocated clusters, and reading clusters while they are allocated.
//!
//! Every scenario runs on in-memory storage, wrapped so that it yields the CPU around its I/O
//! (which makes threads interleave inside the engine's multi-step updates), and some also on a
//! file (`Image::create`/`Image::open` in a temporary directory, with a raw or QED backing file
//! found by path). The seed of each scenario is fixed; `QED_MODEL_SEED` overrides it (it is
//! printed on failure).
//!
//! Sector atomicity is checked for sectors that lie whole inside one buffer of a request: the
//! storage's vectored I/O is not atomic across buffers (`MemStorage` does one locked copy per
//! buffer), so a sector split between two buffers of a `writev_at`/`readv_at` may legitimately
//! be seen half old and half new by a concurrent request to that sector.

#[path = "support/rng.rs"]
mod rng;
use qed::image::BackingResolver;
use qed::{
    Backing, BackingFormat, CheckFix, CheckResult, CreateOptions, Image, MemStorage, OpenOptions,
    Storage,
};
use rng::{env_u64, mix, FailureNote, Rng};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{IoSlice, IoSliceMut};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const SECTOR: u64 = 512;
const DEFAULT_SEED: u64 = 0xC0C0_2024_5EED_0001;

fn base_seed() -> u64 {
    env_u64("QED_MODEL_SEED").unwrap_or(DEFAULT_SEED)
}

/// The content of one 512-byte sector written by the write tagged `tag` at guest sector `sector`:
/// the tag and the sector number, then bytes derived from both. A sector read back either decodes
/// to a (tag, sector) pair and equals its content exactly, or it is not one of our writes.
fn sector_content(tag: u64, sector: u64) -> [u8; 512] {
    let mut s = [0u8; 512];
    s[..8].copy_from_slice(&tag.to_le_bytes());
    s[8..16].copy_from_slice(&sector.to_le_bytes());
    Rng::new(tag ^ sector.wrapping_mul(0xA076_1D64_78BD_642F)).fill(&mut s[16..]);
    s
}

fn decode_sector(buf: &[u8]) -> Option<(u64, u64)> {
    let tag = u64::from_le_bytes(buf[..8].try_into().unwrap());
    let sector = u64::from_le_bytes(buf[8..16].try_into().unwrap());
    (tag != 0 && buf == sector_content(tag, sector)).then_some((tag, sector))
}

/// What a sector that is none of the expected contents holds, for failure messages.
fn describe_sector(sector: &[u8], old: &[u8]) -> String {
    if sector == old {
        return "it reads the old content".into();
    }
    if sector.iter().all(|&b| b == 0) {
        return "it reads zeros".into();
    }
    let mut torn = Vec::new();
    for (i, piece) in sector.chunks(64).enumerate() {
        let tag = u64::from_le_bytes(sector[..8].try_into().unwrap());
        let at = u64::from_le_bytes(sector[8..16].try_into().unwrap());
        let known = if piece == &sector_content(tag, at)[i * 64..(i + 1) * 64] {
            "write-in-header"
        } else if piece == &old[i * 64..(i + 1) * 64] {
            "old"
        } else if piece.iter().all(|&b| b == 0) {
            "zeros"
        } else {
            "other"
        };
        torn.push(known);
    }
    format!(
        "unknown bytes (header tag {:#x}, sector {}; 64-byte pieces: {torn:?})",
        u64::from_le_bytes(sector[..8].try_into().unwrap()),
        u64::from_le_bytes(sector[8..16].try_into().unwrap())
    )
}

fn tag_of(thread: u64, seq: u64) -> u64 {
    ((thread + 1) << 40) | (seq + 1)
}

fn tag_parts(tag: u64) -> (u64, u64) {
    ((tag >> 40) - 1, (tag & ((1 << 40) - 1)) - 1)
}

fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    if a == b {
        return None;
    }
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or(Some(a.len().min(b.len())))
}

// ------------------------------------------------------------------------------------------------
// Where the image lives.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Back {
    None,
    Raw,
    Qed,
}

enum Store {
    Mem(Arc<MemStorage>),
    File(PathBuf),
}

/// Memory storage that yields the CPU around some of its operations, so that threads interleave
/// inside the engine's multi-step updates (allocation, copy-on-write, L2 and L1 updates) far more
/// often than the memory storage's own lock would let them.
struct Jitter {
    inner: Arc<MemStorage>,
    counter: AtomicU64,
}

impl Jitter {
    fn wrap(inner: Arc<MemStorage>) -> Arc<dyn Storage> {
        Arc::new(Jitter {
            inner,
            counter: AtomicU64::new(0),
        })
    }
    fn maybe_yield(&self) {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        if mix(n, 0x5EED) % 3 == 0 {
            thread::yield_now();
        }
    }
}

impl Storage for Jitter {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.maybe_yield();
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.maybe_yield();
        let r = self.inner.write_at(buf, offset);
        self.maybe_yield();
        r
    }
    fn flush(&self) -> std::io::Result<()> {
        self.maybe_yield();
        self.inner.flush()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.maybe_yield();
        let r = self.inner.set_len(len);
        self.maybe_yield();
        r
    }
}

struct Target {
    _dir: Option<tempfile::TempDir>,
    store: Store,
    opts: OpenOptions,
    size: u64,
    cs: u64,
    /// What never-written guest bytes read: the backing file's bytes, zeros past its end.
    old: Vec<u8>,
    name: String,
    /// Opened with O_DIRECT.
    direct: bool,
}

/// Writes `data` into a fresh QED image at `path` or on `storage`.
fn fill_qed(img: &Image, data: &[u8]) {
    for (i, piece) in data.chunks(MIB as usize).enumerate() {
        img.write_at(i as u64 * MIB, piece).unwrap();
    }
    img.close().unwrap();
}

impl Target {
    /// An image of `size` bytes with `cs`/`ts` geometry, on a file or in memory, over a backing
    /// file of random bytes shorter than the image.
    fn new(file: bool, cs: u64, ts: u32, size: u64, back: Back, seed: u64) -> Target {
        let mut rng = Rng::new(seed);
        let blen = match back {
            Back::None => 0,
            Back::Raw => size * 5 / 8 + 77,
            Back::Qed => size * 5 / 8,
        };
        let bdata = rng.bytes(blen);
        let mut old = vec![0u8; size as usize];
        old[..blen as usize].copy_from_slice(&bdata);
        let backing_format = match back {
            Back::None => None,
            Back::Raw => Some(BackingFormat::Raw),
            Back::Qed => Some(BackingFormat::Qed),
        };
        let mut create = CreateOptions {
            size,
            cluster_size: cs as u32,
            table_size: ts,
            backing_file: None,
            backing_format,
        };
        let name = format!(
            "{} {}K/ts{ts} {:?} backing, {} MiB",
            if file { "file" } else { "memory" },
            cs / KIB,
            back,
            size / MIB
        );
        if file {
            let dir = tempfile::tempdir().unwrap();
            match back {
                Back::None => {}
                Back::Raw => {
                    std::fs::write(dir.path().join("base.raw"), &bdata).unwrap();
                    create.backing_file = Some("base.raw".into());
                }
                Back::Qed => {
                    let p = dir.path().join("base.qed");
                    Image::create(
                        &p,
                        &CreateOptions {
                            size: blen,
                            cluster_size: 64 * 1024,
                            table_size: 1,
                            ..Default::default()
                        },
                    )
                    .unwrap();
                    fill_qed(
                        &Image::open(&p, &OpenOptions::read_write()).unwrap(),
                        &bdata,
                    );
                    create.backing_file = Some("base.qed".into());
                }
            }
            let path = dir.path().join("top.qed");
            Image::create(&path, &create).unwrap();
            Target {
                _dir: Some(dir),
                store: Store::File(path),
                opts: OpenOptions::read_write(),
                size,
                cs,
                old,
                name,
                direct: false,
            }
        } else {
            let resolver: Option<BackingResolver> = match back {
                Back::None => None,
                Back::Raw => {
                    let s: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(&bdata));
                    Some(Arc::new(move |_: &str, _: Option<BackingFormat>| {
                        Ok(Backing::Raw(s.clone()))
                    }))
                }
                Back::Qed => {
                    let bs = Arc::new(MemStorage::new());
                    Image::create_on(
                        &*bs,
                        &CreateOptions {
                            size: blen,
                            cluster_size: 4096,
                            table_size: 4,
                            ..Default::default()
                        },
                    )
                    .unwrap();
                    let rw = OpenOptions::read_write();
                    fill_qed(&Image::open_storage(bs.clone(), &rw).unwrap(), &bdata);
                    let ro = Arc::new(Image::open_storage(bs, &OpenOptions::default()).unwrap());
                    Some(Arc::new(move |_: &str, _: Option<BackingFormat>| {
                        Ok(Backing::Qed(ro.clone()))
                    }))
                }
            };
            if back != Back::None {
                create.backing_file = Some("base".into());
            }
            let storage = Arc::new(MemStorage::new());
            Image::create_on(&*storage, &create).unwrap();
            Target {
                _dir: None,
                store: Store::Mem(storage),
                opts: OpenOptions {
                    writable: true,
                    backing_resolver: resolver,
                    ..Default::default()
                },
                size,
                cs,
                old,
                name,
                direct: false,
            }
        }
    }

    /// The same on a file opened with O_DIRECT.
    fn direct(cs: u64, ts: u32, size: u64, back: Back, seed: u64) -> Target {
        let mut t = Target::new(true, cs, ts, size, back, seed);
        t.opts.direct = true;
        t.direct = true;
        t.name = format!("{} (O_DIRECT)", t.name);
        t
    }

    fn open(&self) -> Image {
        match &self.store {
            Store::Mem(s) => Image::open_storage(Jitter::wrap(s.clone()), &self.opts).unwrap(),
            Store::File(p) => Image::open(p, &self.opts).unwrap(),
        }
    }
}

fn read_all(img: &Image) -> Vec<u8> {
    let mut v = vec![0u8; img.size() as usize];
    img.read_at(0, &mut v).unwrap();
    v
}

fn assert_same(got: &[u8], want: &[u8], why: &str) {
    if let Some(i) = first_diff(got, want) {
        panic!(
            "{why}: guest offset {i:#x} reads {:#04x}, expected {:#04x}",
            got[i], want[i]
        );
    }
}

fn check_clean(img: &Image, why: &str) -> CheckResult {
    let r = img.check(CheckFix::NONE).unwrap();
    assert_eq!(
        (r.corruptions, r.leaks, r.check_errors),
        (0, 0, 0),
        "{why}: check is not clean: {r:?}"
    );
    r
}

/// Clusters `[off, off + len)` touches.
fn clusters(off: u64, len: u64, cs: u64) -> std::ops::RangeInclusive<u64> {
    off / cs..=(off + len - 1) / cs
}

// ------------------------------------------------------------------------------------------------
// Disjoint clusters.

#[derive(Clone, Debug)]
enum Op {
    Write { off: u64, len: u64, tag: u64 },
    Zero { off: u64, len: u64 },
}

/// A random request inside the slot `[so, so + sl)`: the whole slot, or a piece of it that may
/// start and end anywhere.
fn sub_range(rng: &mut Rng, so: u64, sl: u64) -> (u64, u64) {
    if rng.chance(40) {
        return (so, sl);
    }
    let a = rng.below(sl);
    let b = rng.range(a + 1, sl);
    (so + a, b - a)
}

fn disjoint_op(img: &Image, rng: &mut Rng, t: u64, seq: u64, so: u64, sl: u64, cs: u64) -> Op {
    let (off, len) = sub_range(rng, so, sl);
    let tag = tag_of(t, seq);
    match rng.below(10) {
        0..=5 => {
            img.write_at(off, &Rng::new(tag).bytes(len)).unwrap();
            Op::Write { off, len, tag }
        }
        6..=7 => {
            let data = Rng::new(tag).bytes(len);
            let c1 = rng.range(0, len) as usize;
            let c2 = rng.range(c1 as u64, len) as usize;
            img.writev_at(
                off,
                &[
                    IoSlice::new(&data[..c1]),
                    IoSlice::new(&data[c1..c2]),
                    IoSlice::new(&data[c2..]),
                ],
            )
            .unwrap();
            Op::Write { off, len, tag }
        }
        _ => {
            // Whole clusters of the slot, or any piece of it.
            let (off, len) = if rng.chance(50) {
                let c = so / cs + rng.below(sl / cs);
                (c * cs, cs)
            } else {
                (off, len)
            };
            img.write_zeroes(off, len).unwrap();
            Op::Zero { off, len }
        }
    }
}

fn disjoint_scenario(target: &Target, threads: u64, seed: u64) {
    let _note = FailureNote(format!(
        "disjoint clusters on {}, seed QED_MODEL_SEED={seed:#x}",
        target.name
    ));
    let cs = target.cs;
    let mut rng = Rng::new(seed);
    // Cut the disk into slots of 1 to 3 whole clusters; neighbouring slots go to different
    // threads, so the threads allocate into the same L2 tables at the same time.
    let nclusters = target.size / cs;
    let mut slots = Vec::new();
    let mut c = 0;
    while c < nclusters {
        let n = rng.range(1, 3).min(nclusters - c);
        slots.push((c * cs, n * cs));
        c += n;
    }
    let img = target.open();
    let barrier = Barrier::new(threads as usize);
    let writers_done = AtomicBool::new(false);
    let mut checks = 0;
    let logs: Vec<Vec<Op>> = thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (img, barrier, slots) = (&img, &barrier, &slots);
                s.spawn(move || {
                    let mut rng = Rng::new(mix(seed, t + 1));
                    let mut mine: Vec<(u64, u64)> = slots
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| *i as u64 % threads == t)
                        .map(|(_, &x)| x)
                        .collect();
                    let mut log = Vec::new();
                    barrier.wait();
                    // Phase 1: ascending, so that every thread fills the same fresh table.
                    for &(so, sl) in &mine {
                        if rng.chance(90) {
                            let seq = log.len() as u64;
                            log.push(disjoint_op(img, &mut rng, t, seq, so, sl, cs));
                        }
                    }
                    barrier.wait();
                    // Phase 2: random order, in place and allocating, across all tables.
                    rng.shuffle(&mut mine);
                    for &(so, sl) in &mine {
                        if rng.chance(50) {
                            let seq = log.len() as u64;
                            log.push(disjoint_op(img, &mut rng, t, seq, so, sl, cs));
                        }
                    }
                    log
                })
            })
            .collect();
        // Meanwhile: checks (exclusive: they wait for the writes in flight), flushes and maps
        // must see a consistent image between any two requests.
        let checker = s.spawn(|| {
            let mut checks = 0;
            while !writers_done.load(Ordering::Acquire) {
                let r = img.check(CheckFix::NONE).unwrap();
                assert_eq!(
                    (r.corruptions, r.leaks, r.check_errors),
                    (0, 0, 0),
                    "check while the writers run: {r:?}"
                );
                img.flush().unwrap();
                let extents = img.map(0, img.size()).unwrap();
                assert_eq!(extents.iter().map(|e| e.length).sum::<u64>(), img.size());
                checks += 1;
                thread::yield_now();
            }
            checks
        });
        let logs = handles.into_iter().map(|h| h.join().unwrap()).collect();
        writers_done.store(true, Ordering::Release);
        checks = checker.join().unwrap();
        logs
    });

    // The expected disk: each slot belongs to one thread, so its operations apply in order.
    let mut want = target.old.clone();
    let mut allocated = BTreeSet::new();
    let mut ops = 0;
    for log in &logs {
        for op in log {
            ops += 1;
            match *op {
                Op::Write { off, len, tag } => {
                    want[off as usize..(off + len) as usize]
                        .copy_from_slice(&Rng::new(tag).bytes(len));
                    allocated.extend(clusters(off, len, cs));
                }
                Op::Zero { off, len } => {
                    want[off as usize..(off + len) as usize].fill(0);
                    // Partial clusters at the ends are written with zeros (allocated); whole
                    // clusters become zero clusters unless already allocated.
                    let end = off + len;
                    let a = (off.next_multiple_of(cs)).min(end);
                    if a > off {
                        allocated.insert(off / cs);
                    }
                    let b = (end / cs * cs).max(a);
                    if end > b {
                        allocated.insert(b / cs);
                    }
                }
            }
        }
    }
    assert_same(&read_all(&img), &want, "after the threads");
    let r = check_clean(&img, "after the threads");
    assert_eq!(
        r.allocated_clusters,
        allocated.len() as u64,
        "allocated clusters: each cluster written must be allocated exactly once"
    );
    img.close().unwrap();
    drop(img);
    let img = target.open();
    assert_same(&read_all(&img), &want, "after reopening");
    check_clean(&img, "after reopening");
    img.close().unwrap();
    eprintln!(
        "disjoint clusters on {}: {threads} threads, {ops} operations, {} clusters allocated, \
         {checks} concurrent checks",
        target.name,
        allocated.len()
    );
}

#[test]
fn threads_writing_disjoint_clusters() {
    let seed = base_seed();
    // 4 KiB clusters, one-cluster tables: each L2 table maps 2 MiB, 12 tables in all.
    let t = Target::new(false, 4 * KIB, 1, 24 * MIB, Back::None, mix(seed, 1));
    disjoint_scenario(&t, 8, mix(seed, 2));
    let t = Target::new(false, 4 * KIB, 1, 12 * MIB, Back::Qed, mix(seed, 3));
    disjoint_scenario(&t, 8, mix(seed, 4));
}

#[test]
fn threads_writing_disjoint_clusters_on_file() {
    let seed = base_seed();
    let t = Target::new(true, 4 * KIB, 1, 12 * MIB, Back::Raw, mix(seed, 5));
    disjoint_scenario(&t, 8, mix(seed, 6));
    let t = Target::new(true, 64 * KIB, 1, 40 * MIB, Back::None, mix(seed, 7));
    disjoint_scenario(&t, 8, mix(seed, 8));
}

// ------------------------------------------------------------------------------------------------
// The same clusters.

/// One write of whole sectors: `[first, first + count)` in sectors, with tagged content or
/// (`zero`) with `write_zeroes`.
#[derive(Clone, Copy, Debug)]
struct SectorWrite {
    thread: u64,
    seq: u64,
    first: u64,
    count: u64,
    zero: bool,
}

fn write_sectors(img: &Image, rng: &mut Rng, tag: u64, first: u64, count: u64) {
    // A 4 KiB-aligned buffer, as a guest using O_DIRECT passes: with an aligned offset and
    // length, an O_DIRECT file writes it directly rather than through a bounce buffer.
    let n = (count * SECTOR) as usize;
    let mut backing = vec![0u8; n + 4096];
    let start = backing.as_ptr().align_offset(4096);
    let data = &mut backing[start..start + n];
    for (i, s) in (first..first + count).enumerate() {
        data[i * SECTOR as usize..(i + 1) * SECTOR as usize]
            .copy_from_slice(&sector_content(tag, s));
    }
    let data = &*data;
    let off = first * SECTOR;
    if rng.chance(30) && count > 1 {
        let cut = (rng.range(1, count - 1) * SECTOR) as usize;
        // Buffer boundaries fall between sectors: a sector split across two buffers is not
        // promised to be written (or read) atomically (see the module documentation).
        let cut2 = (rng.range(cut as u64 / SECTOR, count) * SECTOR) as usize;
        img.writev_at(
            off,
            &[
                IoSlice::new(&data[..cut]),
                IoSlice::new(&data[cut..cut2]),
                IoSlice::new(&data[cut2..]),
            ],
        )
        .unwrap();
    } else {
        img.write_at(off, data).unwrap();
    }
}

/// Clusters that must end up allocated after `writes`: every cluster a write touched, and the
/// partly covered clusters at the ends of a zero request (written with zeros); whole clusters
/// zeroed are not allocated unless a write allocates them.
fn allocated_by<'a>(writes: impl Iterator<Item = &'a SectorWrite>, cs: u64) -> BTreeSet<u64> {
    let mut touched = BTreeSet::new();
    for w in writes {
        let (off, len) = (w.first * SECTOR, w.count * SECTOR);
        if !w.zero {
            touched.extend(clusters(off, len, cs));
        } else {
            let end = off + len;
            let a = off.next_multiple_of(cs).min(end);
            if a > off {
                touched.insert(off / cs);
            }
            let b = (end / cs * cs).max(a);
            if end > b {
                touched.insert(b / cs);
            }
        }
    }
    touched
}

/// Checks the final content of sector `s` covered by the operations `cover` (thread, seq,
/// zero), issued concurrently: it must be the whole content of one of them that its own thread
/// did not cover again later, or, if nothing covered it, its old content.
fn check_sector(
    s: u64,
    sector: &[u8],
    old: &[u8],
    cover: &[(u64, u64, bool)],
) -> Result<(), String> {
    let last_of_thread = |t: u64, seq: u64| !cover.iter().any(|&(t2, q2, _)| t2 == t && q2 > seq);
    match decode_sector(sector) {
        Some((tag, at)) => {
            let (t, seq) = tag_parts(tag);
            if at != s {
                return Err(format!("sector {s} holds the content of sector {at}"));
            }
            if !cover.contains(&(t, seq, false)) {
                return Err(format!(
                    "sector {s} holds write {t}/{seq}, which did not cover it"
                ));
            }
            if !last_of_thread(t, seq) {
                return Err(format!(
                    "sector {s} holds write {t}/{seq}, but thread {t} wrote it again later: {cover:?}"
                ));
            }
        }
        None => {
            let zeroed = sector.iter().all(|&b| b == 0)
                && cover
                    .iter()
                    .any(|&(t, q, zero)| zero && last_of_thread(t, q));
            let untouched = cover.is_empty() && sector == old;
            if !(zeroed || untouched) {
                return Err(format!(
                    "sector {s} (guest {:#x}) was covered by {cover:?} (thread, seq, zero) but holds none of them: {}",
                    s * SECTOR,
                    describe_sector(sector, old)
                ));
            }
        }
    }
    Ok(())
}

fn same_clusters_scenario(target: &Target, threads: u64, rounds: u64, seed: u64) {
    let _note = FailureNote(format!(
        "same clusters on {}, seed QED_MODEL_SEED={seed:#x}",
        target.name
    ));
    let cs = target.cs;
    let spc = cs / SECTOR;
    // Round r writes into clusters [3r, 3r + 3): fresh, unallocated clusters; with 4 KiB
    // clusters and one-cluster tables some rounds straddle an L2 table boundary.
    let region = 3;
    assert!(rounds * region * cs <= target.size);
    let img = target.open();
    let barrier = Barrier::new(threads as usize);
    let logs: Vec<Vec<SectorWrite>> = thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (img, barrier) = (&img, &barrier);
                s.spawn(move || {
                    let mut rng = Rng::new(mix(seed, t + 1));
                    let mut log = Vec::new();
                    for r in 0..rounds {
                        let base = r * region * spc;
                        barrier.wait();
                        for _ in 0..3 {
                            let mut first = base + rng.below(region * spc);
                            let max = base + region * spc - first;
                            let mut count = if rng.chance(30) {
                                max
                            } else {
                                rng.range(1, max.min(2 * spc))
                            };
                            if target.direct && rng.chance(50) {
                                // Whole 4 KiB blocks: written without a bounce buffer.
                                first = first / 8 * 8;
                                count = (count / 8 * 8).max(8).min(base + region * spc - first);
                            }
                            let seq = log.len() as u64;
                            let zero = rng.chance(15);
                            if zero {
                                if rng.chance(50) {
                                    // A whole cluster: becomes a zero cluster if unallocated.
                                    first = base + rng.below(region) * spc;
                                    count = spc;
                                }
                                img.write_zeroes(first * SECTOR, count * SECTOR).unwrap();
                            } else {
                                write_sectors(img, &mut rng, tag_of(t, seq), first, count);
                            }
                            log.push(SectorWrite {
                                thread: t,
                                seq,
                                first,
                                count,
                                zero,
                            });
                        }
                    }
                    log
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let nsectors = rounds * region * spc;
    let mut covering: Vec<Vec<(u64, u64, bool)>> = vec![Vec::new(); nsectors as usize];
    for w in logs.iter().flatten() {
        for s in w.first..w.first + w.count {
            covering[s as usize].push((w.thread, w.seq, w.zero));
        }
    }
    let touched = allocated_by(logs.iter().flatten(), cs);
    let verify = |img: &Image, why: &str| -> Vec<u8> {
        let mut got = vec![0u8; (nsectors * SECTOR) as usize];
        img.read_at(0, &mut got).unwrap();
        for (s, sector) in got.chunks(SECTOR as usize).enumerate() {
            let old = &target.old[s * SECTOR as usize..(s + 1) * SECTOR as usize];
            if let Err(e) = check_sector(s as u64, sector, old, &covering[s]) {
                panic!(
                    "{why}: {e}; {:?}",
                    img.block_status(s as u64 * SECTOR, SECTOR)
                );
            }
        }
        got
    };
    let before = verify(&img, "after the threads");
    let r = check_clean(&img, "after the threads");
    assert_eq!(
        r.allocated_clusters,
        touched.len() as u64,
        "allocated clusters vs distinct clusters written (a cluster allocated twice?)"
    );
    img.close().unwrap();
    drop(img);
    let img = target.open();
    let after = verify(&img, "after reopening");
    assert_same(&after, &before, "reopening changed the content");
    check_clean(&img, "after reopening");
    img.close().unwrap();
    eprintln!(
        "same clusters on {}: {threads} threads x {rounds} rounds, {} writes, {} clusters",
        target.name,
        logs.iter().map(Vec::len).sum::<usize>(),
        touched.len()
    );
}

#[test]
fn threads_writing_same_clusters() {
    let seed = base_seed();
    let t = Target::new(false, 4 * KIB, 1, 4 * MIB, Back::None, mix(seed, 11));
    same_clusters_scenario(&t, 6, 300, mix(seed, 12));
    let t = Target::new(false, 64 * KIB, 4, 32 * MIB, Back::Raw, mix(seed, 13));
    same_clusters_scenario(&t, 6, 100, mix(seed, 14));
    let t = Target::new(false, 4 * KIB, 16, 4 * MIB, Back::Qed, mix(seed, 15));
    same_clusters_scenario(&t, 4, 200, mix(seed, 16));
}

#[test]
fn threads_writing_same_clusters_on_file() {
    let seed = base_seed();
    let t = Target::new(true, 4 * KIB, 1, 4 * MIB, Back::Raw, mix(seed, 17));
    same_clusters_scenario(&t, 6, 200, mix(seed, 18));
}

/// The same on an O_DIRECT file, with half the writes in whole 4 KiB blocks from aligned
/// buffers. Fails while aligned O_DIRECT writes can be undone by a concurrent bounced
/// read-modify-write of the same block (see `o_direct_aligned_write_is_not_undone_by_an_unaligned_one`).
#[test]
fn threads_writing_same_clusters_on_o_direct_file() {
    let seed = base_seed();
    let t = Target::direct(64 * KIB, 1, 32 * MIB, Back::None, mix(seed, 19));
    same_clusters_scenario(&t, 6, 100, mix(seed, 20));
}

// ------------------------------------------------------------------------------------------------
// Scattered writes through the smallest L2 cache.

fn scattered_scenario(target: &Target, threads: u64, ops: u64, seed: u64) {
    let _note = FailureNote(format!(
        "scattered writes on {}, seed QED_MODEL_SEED={seed:#x}",
        target.name
    ));
    let cs = target.cs;
    let spc = cs / SECTOR;
    let nclusters = target.size / cs;
    let mut rng = Rng::new(seed);
    // A few hot clusters, spread over the disk, that several threads write at once.
    let hot: Vec<u64> = (0..64).map(|_| rng.below(nclusters)).collect();
    let img = target.open();
    let barrier = Barrier::new(threads as usize + 1);
    let done = AtomicBool::new(false);
    let mut checks = 0;
    let logs: Vec<Vec<SectorWrite>> = thread::scope(|sc| {
        let (img, barrier, hot, done) = (&img, &barrier, &hot, &done);
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                sc.spawn(move || {
                    let mut rng = Rng::new(mix(seed, t + 1));
                    let mut log = Vec::new();
                    barrier.wait();
                    for seq in 0..ops {
                        let c = if rng.chance(25) {
                            hot[rng.below(hot.len() as u64) as usize]
                        } else {
                            rng.below(nclusters)
                        };
                        let mut first = c * spc + rng.below(spc);
                        let mut count = rng.range(1, 2 * spc).min(nclusters * spc - first);
                        let zero = rng.chance(15);
                        if zero {
                            if rng.chance(50) {
                                first = c * spc;
                                count = spc;
                            }
                            img.write_zeroes(first * SECTOR, count * SECTOR).unwrap();
                        } else {
                            write_sectors(img, &mut rng, tag_of(t, seq), first, count);
                        }
                        log.push(SectorWrite {
                            thread: t,
                            seq,
                            first,
                            count,
                            zero,
                        });
                    }
                    log
                })
            })
            .collect();
        let checker = sc.spawn(move || {
            barrier.wait();
            let mut n = 0;
            while !done.load(Ordering::Acquire) {
                let r = img.check(CheckFix::NONE).unwrap();
                assert_eq!(
                    (r.corruptions, r.leaks, r.check_errors),
                    (0, 0, 0),
                    "check while the writers run: {r:?}"
                );
                n += 1;
                thread::yield_now();
            }
            n
        });
        let logs = handles.into_iter().map(|h| h.join().unwrap()).collect();
        done.store(true, Ordering::Release);
        checks = checker.join().unwrap();
        logs
    });

    let mut covering: BTreeMap<u64, Vec<(u64, u64, bool)>> = BTreeMap::new();
    for w in logs.iter().flatten() {
        for s in w.first..w.first + w.count {
            covering
                .entry(s)
                .or_default()
                .push((w.thread, w.seq, w.zero));
        }
    }
    let touched = allocated_by(logs.iter().flatten(), cs);
    let verify = |img: &Image, why: &str| {
        let mut rng = Rng::new(mix(seed, 99));
        // Every sector of every cluster written, and some never-written clusters.
        let mut clusters: BTreeSet<u64> = covering.keys().map(|s| s / spc).collect();
        clusters.extend((0..200).map(|_| rng.below(nclusters)));
        let mut buf = vec![0u8; cs as usize];
        for &c in &clusters {
            img.read_at(c * cs, &mut buf).unwrap();
            for (i, sector) in buf.chunks(SECTOR as usize).enumerate() {
                let s = c * spc + i as u64;
                let o = (s * SECTOR) as usize;
                let cover = covering.get(&s).map_or(&[][..], Vec::as_slice);
                if let Err(e) = check_sector(s, sector, &target.old[o..o + SECTOR as usize], cover)
                {
                    panic!("{why}: {e}; {:?}", img.block_status(s * SECTOR, SECTOR));
                }
            }
        }
    };
    verify(&img, "after the threads");
    let r = check_clean(&img, "after the threads");
    assert_eq!(
        r.allocated_clusters,
        touched.len() as u64,
        "allocated clusters vs distinct clusters written (a cluster allocated twice?)"
    );
    img.close().unwrap();
    drop(img);
    let img = target.open();
    verify(&img, "after reopening");
    check_clean(&img, "after reopening");
    img.close().unwrap();
    eprintln!(
        "scattered writes on {}: {threads} threads x {ops} requests, {} clusters, {checks} concurrent checks",
        target.name,
        touched.len()
    );
}

#[test]
fn threads_scattered_through_a_tiny_l2_cache() {
    let seed = base_seed();
    // 4 KiB clusters, 4-cluster tables: 4 pieces of 512 entries per table, 8 MiB per table; 512
    // MiB is 256 pieces, far more than the smallest cache holds (4 per shard).
    let mut t = Target::new(false, 4 * KIB, 4, 512 * MIB, Back::None, mix(seed, 41));
    t.opts.l2_cache_bytes = 0;
    scattered_scenario(&t, 6, 400, mix(seed, 42));
    let mut t = Target::new(true, 4 * KIB, 2, 256 * MIB, Back::None, mix(seed, 43));
    t.opts.l2_cache_bytes = 0;
    scattered_scenario(&t, 6, 300, mix(seed, 44));
}

// ------------------------------------------------------------------------------------------------
// Readers while clusters are allocated.

/// What readers observed, shared between them.
#[derive(Default)]
struct ReadStats {
    reads: AtomicU64,
    saw_old: AtomicU64,
    saw_new: AtomicU64,
    /// Sectors seen as a mixture of old and new bytes (tolerated on files only).
    saw_mixed: AtomicU64,
    /// The first failure, and the sector it is about.
    failure: Mutex<Option<(String, u64)>>,
}

/// Checks what one read returned: every sector (or piece of one) must hold the old content or
/// the one new content written there, and a sector once seen new must never read old again.
///
/// Unless `strict`, a sector may also read as a mixture of its old and new bytes: the kernel
/// does not make a buffered `pread` atomic against a concurrent `pwrite` of the same page, so a
/// file read racing an in-place write may see the write half done. Each byte must still be old
/// or new (no zeros for backing data, no bytes from elsewhere), and never after the sector was
/// seen whole and new.
#[allow(clippy::too_many_arguments)]
fn check_read(
    reader: u64,
    off: u64,
    buf: &[u8],
    old: &[u8],
    new_tag: &[u64],
    seen_new: &mut [bool],
    stats: &ReadStats,
    strict: bool,
) -> Result<(), (String, u64)> {
    let len = buf.len() as u64;
    let mut pos = off;
    while pos < off + len {
        let s = pos / SECTOR;
        let end = ((s + 1) * SECTOR).min(off + len);
        let piece = &buf[(pos - off) as usize..(end - off) as usize];
        let in_sector = (pos - s * SECTOR) as usize;
        let n = piece.len();
        let new = sector_content(new_tag[s as usize], s);
        let is_new = piece == &new[in_sector..in_sector + n];
        let is_old = piece == &old[pos as usize..end as usize];
        let mixed = !is_new
            && !is_old
            && !strict
            && !seen_new[s as usize]
            && piece
                .iter()
                .zip(&new[in_sector..in_sector + n])
                .zip(&old[pos as usize..end as usize])
                .all(|((b, nb), ob)| b == nb || b == ob);
        if mixed {
            stats.saw_mixed.fetch_add(1, Ordering::Relaxed);
        } else if !is_new && !is_old {
            let holds = match (n == SECTOR as usize)
                .then(|| decode_sector(piece))
                .flatten()
            {
                Some((t, at)) => format!("; it holds write {:?} of sector {at}", tag_parts(t)),
                None if n == SECTOR as usize => {
                    format!(
                        "; {}",
                        describe_sector(piece, &old[pos as usize..end as usize])
                    )
                }
                None => String::new(),
            };
            return Err((
                format!(
                    "reader {reader}: read at {off:#x} len {len:#x}: sector {s} (guest {:#x}, bytes {in_sector}..{}) \
                     holds neither its old content nor write {:?}{holds}",
                    s * SECTOR,
                    in_sector + n,
                    tag_parts(new_tag[s as usize]),
                ),
                s,
            ));
        }
        if is_old && !is_new {
            if seen_new[s as usize] {
                return Err((
                    format!(
                        "reader {reader}: sector {s} (guest {:#x}) read its new content earlier and its old content now",
                        s * SECTOR
                    ),
                    s,
                ));
            }
            stats.saw_old.fetch_add(1, Ordering::Relaxed);
        } else if is_new && !is_old {
            seen_new[s as usize] = true;
            stats.saw_new.fetch_add(1, Ordering::Relaxed);
        }
        pos = end;
    }
    Ok(())
}

fn readers_scenario(target: &Target, writers: u64, readers: u64, seed: u64) {
    let _note = FailureNote(format!(
        "readers during allocating writes on {}, seed QED_MODEL_SEED={seed:#x}",
        target.name
    ));
    let cs = target.cs;
    let spc = cs / SECTOR;
    let nsectors = target.size / SECTOR;
    let mut rng = Rng::new(seed);
    // Every sector is written exactly once, by runs of 1 sector to 2 clusters dealt to the
    // writers in turn and written in random order: a cluster is allocated by one writer (with
    // copy-on-write of the rest from the backing file) and completed in place by others, while
    // the readers read it.
    let mut runs = Vec::new();
    let mut s = 0;
    while s < nsectors {
        let n = rng.range(1, 2 * spc).min(nsectors - s);
        runs.push((s, n));
        s += n;
    }
    let mut new_tag = vec![0u64; nsectors as usize];
    let mut per_writer: Vec<Vec<(u64, u64, u64)>> = vec![Vec::new(); writers as usize];
    for (i, &(first, n)) in runs.iter().enumerate() {
        let w = i as u64 % writers;
        let tag = tag_of(w, i as u64);
        new_tag[first as usize..(first + n) as usize].fill(tag);
        per_writer[w as usize].push((first, n, tag));
    }
    for list in &mut per_writer {
        rng.shuffle(list);
    }
    let img = target.open();
    let strict = matches!(target.store, Store::Mem(_));
    let stop = AtomicBool::new(false);
    let stats = ReadStats::default();
    let barrier = Barrier::new((writers + readers) as usize);
    thread::scope(|sc| {
        let (img, barrier, stop, stats) = (&img, &barrier, &stop, &stats);
        let (old, new_tag) = (&target.old, &new_tag);
        let writer_handles: Vec<_> = per_writer
            .iter()
            .enumerate()
            .map(|(w, list)| {
                sc.spawn(move || {
                    let mut rng = Rng::new(mix(seed, 100 + w as u64));
                    barrier.wait();
                    for &(first, n, tag) in list {
                        if stats.failure.lock().unwrap().is_some() {
                            break;
                        }
                        write_sectors(img, &mut rng, tag, first, n);
                    }
                })
            })
            .collect();
        let reader_handles: Vec<_> = (0..readers)
            .map(|r| {
                sc.spawn(move || {
                    let mut rng = Rng::new(mix(seed, 200 + r));
                    let mut seen_new = vec![false; nsectors as usize];
                    barrier.wait();
                    let mut last_pass = false;
                    loop {
                        if stop.load(Ordering::Acquire) {
                            if last_pass {
                                break;
                            }
                            last_pass = true; // one more read after the writers are done
                        }
                        let (off, len) = if rng.chance(80) {
                            let first = rng.below(nsectors);
                            let n = rng.range(1, 3 * spc).min(nsectors - first);
                            (first * SECTOR, n * SECTOR)
                        } else {
                            let off = rng.below(nsectors * SECTOR);
                            (off, rng.range(1, 2 * cs).min(nsectors * SECTOR - off))
                        };
                        let mut buf = vec![0u8; len as usize];
                        if rng.chance(30) {
                            let first = off.next_multiple_of(SECTOR) - off;
                            let cut = (first + rng.below(len / SECTOR + 1) * SECTOR).min(len);
                            let (a, b) = buf.split_at_mut(cut as usize);
                            img.readv_at(off, &mut [IoSliceMut::new(a), IoSliceMut::new(b)])
                                .unwrap();
                        } else {
                            img.read_at(off, &mut buf).unwrap();
                        }
                        if rng.chance(5) {
                            img.map(off, len).unwrap();
                        }
                        stats.reads.fetch_add(1, Ordering::Relaxed);
                        if let Err(e) =
                            check_read(r, off, &buf, old, new_tag, &mut seen_new, stats, strict)
                        {
                            stats.failure.lock().unwrap().get_or_insert(e);
                            return;
                        }
                    }
                })
            })
            .collect();
        for h in writer_handles {
            h.join().unwrap();
        }
        stop.store(true, Ordering::Release);
        for h in reader_handles {
            h.join().unwrap();
        }
    });
    if let Some((f, s)) = stats.failure.lock().unwrap().take() {
        // Was it transient? Read the sector again now that the writers are done.
        let mut now = [0u8; SECTOR as usize];
        img.read_at(s * SECTOR, &mut now).unwrap();
        let (o, n) = ((s * SECTOR) as usize, ((s + 1) * SECTOR) as usize);
        let state = if now == sector_content(new_tag[s as usize], s) {
            "its new content".to_string()
        } else {
            describe_sector(&now, &target.old[o..n])
        };
        panic!("{f}\n(after the writers stopped, sector {s} reads: {state})");
    }
    let reads = stats.reads.load(Ordering::Relaxed);
    assert!(reads > 0, "the readers did not read");

    let mut want = Vec::with_capacity(target.size as usize);
    for s in 0..nsectors {
        want.extend_from_slice(&sector_content(new_tag[s as usize], s));
    }
    assert_same(&read_all(&img), &want, "after the writers");
    let r = check_clean(&img, "after the writers");
    assert_eq!(
        r.allocated_clusters,
        target.size.div_ceil(cs),
        "every cluster was written once: allocated clusters"
    );
    img.close().unwrap();
    drop(img);
    let img = target.open();
    assert_same(&read_all(&img), &want, "after reopening");
    check_clean(&img, "after reopening");
    img.close().unwrap();
    eprintln!(
        "readers on {}: {writers} writers, {readers} readers, {reads} reads, sectors seen old {} / new {} / \
         mixed {}",
        target.name,
        stats.saw_old.load(Ordering::Relaxed),
        stats.saw_new.load(Ordering::Relaxed),
        stats.saw_mixed.load(Ordering::Relaxed)
    );
}

#[test]
fn readers_during_allocating_writes() {
    let seed = base_seed();
    let t = Target::new(false, 4 * KIB, 1, 6 * MIB, Back::Raw, mix(seed, 21));
    readers_scenario(&t, 3, 3, mix(seed, 22));
    let t = Target::new(false, 64 * KIB, 4, 16 * MIB, Back::Qed, mix(seed, 23));
    readers_scenario(&t, 3, 3, mix(seed, 24));
    let t = Target::new(false, 4 * KIB, 16, 4 * MIB, Back::None, mix(seed, 25));
    readers_scenario(&t, 4, 2, mix(seed, 26));
}

#[test]
fn readers_during_allocating_writes_on_file() {
    let seed = base_seed();
    // Fresh clusters at the end of the file, partly written, are read while the file grows.
    let t = Target::new(true, 4 * KIB, 1, 4 * MIB, Back::None, mix(seed, 27));
    readers_scenario(&t, 3, 3, mix(seed, 28));
    let t = Target::new(true, 64 * KIB, 4, 8 * MIB, Back::Raw, mix(seed, 29));
    readers_scenario(&t, 3, 3, mix(seed, 30));
}

// ------------------------------------------------------------------------------------------------
// O_DIRECT: an aligned write racing a read-modify-write of the same 4 KiB block.

/// Minimal reproduction of a lost write on O_DIRECT files. One thread writes the 4 KiB block at
/// guest offset 0 again and again from an aligned buffer (the direct path), and checks that
/// sector 0, which only it writes, holds what it wrote last. Another thread writes sector 1 alone
/// (512 bytes: unaligned for O_DIRECT, so the storage reads the block, patches it and writes it
/// back). If the aligned write lands between that read and write-back, the write-back puts the
/// previous content of sector 0 back: a completed write is undone.
#[test]
fn o_direct_aligned_write_is_not_undone_by_an_unaligned_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("direct.qed");
    Image::create(&path, &CreateOptions::new(MIB)).unwrap();
    let img = Image::open(
        &path,
        &OpenOptions {
            direct: true,
            ..OpenOptions::read_write()
        },
    )
    .unwrap();
    img.write_at(0, &vec![0u8; 64 * KIB as usize]).unwrap(); // allocate: later writes are in place
    let stop = AtomicBool::new(false);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let lost = thread::scope(|s| {
        s.spawn(|| {
            let mut i = 0u8;
            while !stop.load(Ordering::Relaxed) {
                i = i.wrapping_add(1);
                img.write_at(SECTOR, &[i; SECTOR as usize]).unwrap();
            }
        });
        let mut block = vec![0u8; 2 * 4096];
        let start = block.as_ptr().align_offset(4096);
        let mut lost = None;
        let mut n = 0u64;
        while lost.is_none() && std::time::Instant::now() < deadline {
            n += 1;
            let tag = n.to_le_bytes();
            for sector in block[start..start + 4096].chunks_mut(SECTOR as usize) {
                sector[..8].copy_from_slice(&tag);
            }
            img.write_at(0, &block[start..start + 4096]).unwrap();
            let mut s0 = [0u8; 8];
            img.read_at(0, &mut s0).unwrap();
            if s0 != tag {
                lost = Some((n, u64::from_le_bytes(s0)));
            }
        }
        stop.store(true, Ordering::Relaxed);
        lost
    });
    if let Some((n, found)) = lost {
        panic!(
            "O_DIRECT: write #{n} of the aligned block at guest offset 0 completed, but sector 0 \
             then read as write #{found}: a concurrent unaligned write to sector 1 (bounced \
             read-modify-write of the same 4 KiB block) wrote the old block back over it"
        );
    }
}
