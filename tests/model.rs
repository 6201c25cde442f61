// SPDX-License-Identifier: MIT OR Apache-2.0
//! Model-based tests of the engine: random sequences of guest operations on in-memory images,
//! checked against a byte model of the guest disk.
//!
//! The model is flat (a byte array the size of the virtual disk) but stored sparsely, in 4 KiB
//! pages materialised on first write; untouched pages read as the backing file's bytes (or zeros).
//! Images up to [`FULL_COMPARE_LIMIT`] are compared byte for byte over their whole virtual size;
//! larger ones (geometries whose L2 tables cover gigabytes, or after a jump past a 64-entry L1
//! sector) are compared over every byte ever written, every byte of the backing file's data
//! regions, the whole of every data and zero extent, the edges of every unallocated extent and
//! random samples.
//!
//! Each configuration (geometry x no backing file / raw backing file / QED backing image, all on
//! memory, plus two on real files, one of them O_DIRECT) runs random writes, vectored writes,
//! write-zeroes, reads, flushes, resizes, check and repair, clean reopens, crashes after a flush
//! and crashes without one (where every sector changed since the last flush must hold one of
//! the contents it had since), out-of-range requests and block-status queries. It ends with a
//! clean check and a walk of `map()` checked against the model.
//!
//! Environment (all optional):
//! - `QED_MODEL_SEED`: the seed, decimal or `0x` hex (default [`DEFAULT_SEED`]); printed on failure;
//! - `QED_MODEL_STEPS`: random steps per configuration (default [`DEFAULT_STEPS`]);
//! - `QED_MODEL_CONFIG`: run only the configurations whose name contains this string
//!   (names look like `4K/ts1 raw`).

#[path = "support/rng.rs"]
mod rng;
use qed::image::BackingResolver;
use qed::{
    Backing, BackingFormat, CheckFix, CheckResult, CreateOptions, Error, Extent, ExtentKind,
    FileStorage, Image, MemStorage, OpenOptions, Storage,
};
use rng::{env_u64, mix, FailureNote, Rng};
use std::collections::{BTreeMap, VecDeque};
use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;
use std::time::Instant;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const SECTOR: u64 = 512;
/// Page size of the model.
const PAGE: u64 = 4 * KIB;
/// Images at most this large are compared over their whole virtual size.
const FULL_COMPARE_LIMIT: u64 = 96 * MIB;
/// Whole-image comparison period, in steps.
const COMPARE_EVERY: u64 = 40;
/// Longest single request.
const MAX_REQUEST: u64 = 8 * MIB;
const DEFAULT_SEED: u64 = 0x51ED_0000_00C0_FFEE;
const DEFAULT_STEPS: u64 = 300;
/// Incompatible feature bit: need check.
const FEATURE_NEED_CHECK: u64 = 0x2;

// ------------------------------------------------------------------------------------------------
// What the backing file holds: data regions of random bytes, zeros elsewhere, and zeros past `len`.

struct Base {
    len: u64,
    /// Sorted, disjoint, inside `len`.
    regions: Vec<(u64, Vec<u8>)>,
}

impl Base {
    fn none() -> Base {
        Base {
            len: 0,
            regions: Vec::new(),
        }
    }

    fn read(&self, off: u64, buf: &mut [u8]) {
        buf.fill(0);
        let end = off + buf.len() as u64;
        for (s, data) in &self.regions {
            let e = s + data.len() as u64;
            let a = off.max(*s);
            let b = end.min(e);
            if a < b {
                buf[(a - off) as usize..(b - off) as usize]
                    .copy_from_slice(&data[(a - s) as usize..(b - s) as usize]);
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// The model of the guest disk.

struct Model {
    size: u64,
    pages: BTreeMap<u64, Box<[u8]>>,
    base: Arc<Base>,
    /// The size the image was created with. Never-written bytes past it read as zeros, whatever
    /// the backing file holds there: growing an image zeroes the new area, as QEMU does since
    /// 5.0 (`block: truncate: Don't make backing file data visible`).
    visible_end: u64,
    /// Sectors changed since the last flush, with the hashes of every content they had since
    /// then, the durable one first: a crash without flush may leave any of them.
    pending: BTreeMap<u64, Vec<u64>>,
}

fn sector_hash(sector: &[u8]) -> u64 {
    sector.chunks_exact(8).fold(0xCBF2_9CE4_8422_2325, |h, w| {
        (h ^ u64::from_le_bytes(w.try_into().unwrap()))
            .wrapping_mul(0x0100_0000_01B3)
            .rotate_left(29)
    })
}

impl Model {
    fn read(&self, off: u64, buf: &mut [u8]) {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let in_page = (pos % PAGE) as usize;
            let n = (PAGE as usize - in_page).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            match self.pages.get(&(pos / PAGE)) {
                Some(p) => out.copy_from_slice(&p[in_page..in_page + n]),
                None => self.read_base(pos, out),
            }
            done += n;
        }
    }

    /// What a never-written range reads.
    fn read_base(&self, off: u64, buf: &mut [u8]) {
        self.base.read(off, buf);
        if off + buf.len() as u64 > self.visible_end {
            let from = self.visible_end.saturating_sub(off) as usize;
            buf[from..].fill(0);
        }
    }

    fn page_mut(&mut self, page: u64) -> &mut [u8] {
        if !self.pages.contains_key(&page) {
            let mut p = vec![0u8; PAGE as usize].into_boxed_slice();
            self.read_base(page * PAGE, &mut p);
            self.pages.insert(page, p);
        }
        self.pages.get_mut(&page).unwrap()
    }

    /// Records the content of every sector of `[off, off + len)`: with `before`, only for
    /// sectors not changed since the last flush (their durable content), else always (a state
    /// a crash without flush may leave).
    fn record(&mut self, off: u64, len: u64, before: bool) {
        let mut buf = [0u8; SECTOR as usize];
        for s in off / SECTOR..(off + len).div_ceil(SECTOR) {
            if before && self.pending.contains_key(&s) {
                continue;
            }
            self.read(s * SECTOR, &mut buf);
            self.pending.entry(s).or_default().push(sector_hash(&buf));
        }
    }

    fn write(&mut self, off: u64, data: &[u8]) {
        self.record(off, data.len() as u64, true);
        self.apply_write(off, data);
        self.record(off, data.len() as u64, false);
    }

    fn zero(&mut self, off: u64, len: u64) {
        self.record(off, len, true);
        self.apply_zero(off, len);
        self.record(off, len, false);
    }

    fn apply_write(&mut self, off: u64, data: &[u8]) {
        assert!(off + data.len() as u64 <= self.size);
        let mut done = 0usize;
        while done < data.len() {
            let pos = off + done as u64;
            let in_page = (pos % PAGE) as usize;
            let n = (PAGE as usize - in_page).min(data.len() - done);
            self.page_mut(pos / PAGE)[in_page..in_page + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
    }

    fn apply_zero(&mut self, off: u64, len: u64) {
        assert!(off + len <= self.size);
        let mut pos = off;
        while pos < off + len {
            let in_page = (pos % PAGE) as usize;
            let n = (PAGE - in_page as u64).min(off + len - pos) as usize;
            self.page_mut(pos / PAGE)[in_page..in_page + n].fill(0);
            pos += n as u64;
        }
    }

    /// Runs of materialised pages, as byte ranges clipped to the size.
    fn written_runs(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for &p in self.pages.keys() {
            let (s, e) = (p * PAGE, ((p + 1) * PAGE).min(self.size));
            match out.last_mut() {
                Some(last) if last.1 == s => last.1 = e,
                _ => out.push((s, e)),
            }
        }
        out
    }
}

// ------------------------------------------------------------------------------------------------
// Configurations.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BackingKind {
    None,
    Raw,
    Qed,
}

impl BackingKind {
    fn name(self) -> &'static str {
        match self {
            BackingKind::None => "no-backing",
            BackingKind::Raw => "raw",
            BackingKind::Qed => "qed",
        }
    }
}

fn l2_coverage(cs: u64, ts: u64) -> u64 {
    cs * (cs * ts / 8)
}

fn geometry_name(cs: u64, ts: u64) -> String {
    if cs >= MIB {
        format!("{}M/ts{ts}", cs / MIB)
    } else {
        format!("{}K/ts{ts}", cs / KIB)
    }
}

/// Initial and largest virtual size for a geometry: several L2 tables for small geometries;
/// for the large ones, an image that ends just before its first L2 boundary and grows across it.
fn sizes(cs: u64, ts: u64) -> (u64, u64) {
    let cov = l2_coverage(cs, ts);
    if cov <= 2 * MIB {
        let s = 4 * cov + cov / 2 + 3 * SECTOR;
        (s, s + 2 * cov)
    } else if cov <= 32 * MIB {
        let s = cov + cov / 4 + 7 * SECTOR;
        (s, 2 * cov + 3 * MIB)
    } else {
        let s = cov - 2 * cs - 2 * SECTOR;
        (s, s + 64 * cs)
    }
}

/// The backing file's content for an image of `size0` bytes.
fn make_base(rng: &mut Rng, cs: u64, size0: u64, kind: BackingKind) -> Base {
    if kind == BackingKind::None {
        return Base::none();
    }
    // A raw backing file longer than the image (growing must not expose the rest), a QED one
    // shorter (bytes past its end read as zeros).
    let raw_len = match (size0 <= FULL_COMPARE_LIMIT, kind) {
        (true, BackingKind::Raw) => size0 + size0 / 3 + 123,
        (true, _) => size0 * 3 / 4 + 123,
        (false, BackingKind::Raw) => size0 + 3 * cs + cs / 2 + 123,
        (false, _) => size0 - 3 * cs - cs / 2 + 123,
    };
    let mut regions = Vec::new();
    if size0 <= FULL_COMPARE_LIMIT {
        regions.push((0, rng.bytes(raw_len)));
    } else {
        let r = 4 * cs;
        let chunk = 512 * cs;
        regions.push((0, rng.bytes(r)));
        if chunk + r < raw_len - r {
            regions.push((chunk - r / 2, rng.bytes(r)));
        }
        regions.push((raw_len - r, rng.bytes(r)));
    }
    let len = match kind {
        BackingKind::Qed => raw_len.next_multiple_of(SECTOR),
        _ => raw_len,
    };
    Base { len, regions }
}

fn open_options(resolver: Option<BackingResolver>) -> OpenOptions {
    OpenOptions {
        writable: true,
        backing_resolver: resolver,
        // Crashes are simulated by forgetting the handle, which a live write-back thread would
        // outlive (a dead process takes its threads along): no timer here; tests/faults.rs
        // covers it.
        writeback_delay: None,
        need_check_delay: None,
        ..Default::default()
    }
}

/// Builds the backing file for `base` and a resolver handing it out.
fn make_backing(
    rng: &mut Rng,
    kind: BackingKind,
    top_cs: u64,
    base: &mut Base,
) -> Option<BackingResolver> {
    match kind {
        BackingKind::None => None,
        BackingKind::Raw => {
            let s = Arc::new(MemStorage::new());
            for (off, data) in &base.regions {
                s.write_at(data, *off).unwrap();
            }
            s.set_len(base.len).unwrap();
            let s: Arc<dyn Storage> = s;
            Some(Arc::new(move |name: &str, fmt: Option<BackingFormat>| {
                assert_eq!(name, "base");
                assert_eq!(fmt, Some(BackingFormat::Raw));
                Ok(Backing::Raw(s.clone()))
            }))
        }
        BackingKind::Qed => {
            // A QED backing image with its own geometry and data, including a zeroed range.
            let (bcs, bts) = if top_cs == 4 * KIB {
                (64 * KIB, 2)
            } else {
                (64 * KIB, 1)
            };
            let bs = Arc::new(MemStorage::new());
            Image::create_on(
                &*bs,
                &CreateOptions {
                    size: base.len,
                    cluster_size: bcs as u32,
                    table_size: bts,
                    backing_file: None,
                    backing_format: None,
                },
            )
            .unwrap();
            let img = Image::open_storage(bs.clone(), &open_options(None)).unwrap();
            for (off, data) in &base.regions {
                let mut done = 0u64;
                while done < data.len() as u64 {
                    let n = rng.range(1, MIB).min(data.len() as u64 - done);
                    img.write_at(off + done, &data[done as usize..(done + n) as usize])
                        .unwrap();
                    done += n;
                }
            }
            let (zoff, zdata) = &mut base.regions[0];
            let zlen = zdata.len() as u64;
            let a = rng.below(zlen / 2);
            let n = rng.range(1, (3 * bcs).min(zlen - a));
            img.write_zeroes(*zoff + a, n).unwrap();
            zdata[a as usize..(a + n) as usize].fill(0);
            let r = img.check(CheckFix::NONE).unwrap();
            assert_eq!(
                (r.corruptions, r.leaks),
                (0, 0),
                "backing image check: {r:?}"
            );
            img.close().unwrap();
            drop(img);
            let ro = Image::open_storage(bs, &OpenOptions::default()).unwrap();
            assert!(!ro.is_writable());
            let ro = Arc::new(ro);
            Some(Arc::new(move |name: &str, _fmt: Option<BackingFormat>| {
                assert_eq!(name, "base");
                Ok(Backing::Qed(ro.clone()))
            }))
        }
    }
}

// ------------------------------------------------------------------------------------------------
// The harness: one image, its model, and the random operations.

struct Harness {
    rng: Rng,
    storage: Arc<dyn Storage>,
    opts: OpenOptions,
    img: Option<Image>,
    model: Model,
    cs: u64,
    cov: u64,
    max_size: u64,
    steps: u64,
    step: u64,
    jumped: bool,
    log: VecDeque<String>,
    stats: BTreeMap<&'static str, u64>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- last operations (step {}, size {:#x}) ---",
                self.step, self.model.size
            );
            for l in &self.log {
                eprintln!("  {l}");
            }
        }
    }
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

fn merge_ranges(mut v: Vec<(u64, u64)>, size: u64) -> Vec<(u64, u64)> {
    v.retain_mut(|r| {
        r.1 = r.1.min(size);
        r.0 < r.1
    });
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

fn is_out_of_range<T: std::fmt::Debug>(r: &qed::Result<T>) -> bool {
    matches!(r, Err(Error::OutOfRange { .. }))
}

impl Harness {
    fn img(&self) -> &Image {
        self.img.as_ref().expect("image is open")
    }

    fn note(&mut self, s: String) {
        if self.log.len() == 40 {
            self.log.pop_front();
        }
        self.log.push_back(format!("[{}] {s}", self.step));
    }

    fn count(&mut self, what: &'static str) {
        *self.stats.entry(what).or_default() += 1;
    }

    fn describe(&self, pos: u64) -> String {
        let ext = self.img().block_status(pos, 1);
        let mut b = [0u8; 1];
        self.model.base.read(pos, &mut b);
        format!("block_status {ext:?}, backing byte {:#04x}", b[0])
    }

    /// Compares guest bytes `[off, off + len)` of the image with the model.
    fn compare(&self, off: u64, len: u64, why: &str) {
        let mut got = Vec::new();
        let mut want = Vec::new();
        let mut pos = off;
        let end = off + len;
        while pos < end {
            let n = (end - pos).min(4 * MIB) as usize;
            got.resize(n, 0);
            want.resize(n, 0);
            self.img()
                .read_at(pos, &mut got)
                .unwrap_or_else(|e| panic!("{why}: read_at({pos:#x}, {n:#x}) failed: {e}"));
            self.model.read(pos, &mut want);
            if let Some(i) = first_diff(&got, &want) {
                let at = pos + i as u64;
                let run = got[i..]
                    .iter()
                    .zip(&want[i..])
                    .take_while(|(a, b)| a != b)
                    .count();
                panic!(
                    "{why}: image differs from the model at guest offset {at:#x} ({run} bytes differ from there): \
                     image {:#04x}, model {:#04x}; {}",
                    got[i],
                    want[i],
                    self.describe(at)
                );
            }
            pos += n as u64;
        }
    }

    /// Compares the neighbourhood of a request.
    fn compare_around(&self, off: u64, len: u64, why: &str) {
        let cs = self.cs;
        let a = (off / cs * cs).saturating_sub(cs);
        let b = (off + len).next_multiple_of(cs).saturating_add(cs);
        let b = b.min(self.model.size);
        if a < b {
            self.compare(a, b - a, why);
        }
    }

    fn hotspots(&self) -> Vec<u64> {
        let s = self.model.size;
        let cov = self.cov;
        let mut v = vec![
            0,
            512 * self.cs,
            cov,
            2 * cov,
            3 * cov,
            s / cov * cov,
            s / (64 * cov) * (64 * cov),
            s,
            self.model.base.len,
            self.model.visible_end,
            s / 2 / self.cs * self.cs,
        ];
        v.retain(|&p| p <= s);
        v
    }

    /// Ranges worth comparing when the image is too large to compare whole.
    fn sample_ranges(&mut self, extents: &[Extent]) -> Vec<(u64, u64)> {
        let size = self.model.size;
        let cs = self.cs;
        let mut v = self.model.written_runs();
        for (s, d) in &self.model.base.regions {
            v.push((*s, s + d.len() as u64));
        }
        for h in self.hotspots() {
            v.push((h.saturating_sub(2 * cs), h + 2 * cs));
        }
        for e in extents {
            let end = e.offset + e.length;
            match e.kind {
                ExtentKind::Unallocated if e.length > 16 * MIB => {
                    v.push((e.offset, e.offset + 4 * KIB));
                    v.push((end - 4 * KIB, end));
                }
                _ => v.push((e.offset, end)),
            }
        }
        for _ in 0..16 {
            let s = self.rng.below(size / SECTOR) * SECTOR;
            v.push((s, s + SECTOR));
        }
        merge_ranges(v, size)
    }

    /// Compares the whole image (or, for huge images, everything that matters) with the model.
    fn compare_all(&mut self, why: &str) {
        let size = self.model.size;
        if size <= FULL_COMPARE_LIMIT {
            self.compare(0, size, why);
            return;
        }
        let extents = self.img().map(0, size).unwrap();
        for (a, b) in self.sample_ranges(&extents) {
            self.compare(a, b - a, why);
        }
    }

    /// Checks an extent against the model: zero extents read (and model) zeros, unallocated
    /// extents read (and model) the backing file's bytes, data extents read the model.
    fn check_extent(&mut self, e: &Extent, ranges: &[(u64, u64)]) {
        let mut got = Vec::new();
        let mut want = Vec::new();
        let mut base = Vec::new();
        for &(a, b) in ranges {
            let (a, b) = (a.max(e.offset), b.min(e.offset + e.length));
            let mut pos = a;
            while pos < b {
                let n = (b - pos).min(4 * MIB) as usize;
                got.resize(n, 0);
                want.resize(n, 0);
                base.resize(n, 0);
                self.img().read_at(pos, &mut got).unwrap();
                self.model.read(pos, &mut want);
                self.model.base.read(pos, &mut base);
                let bad = |what: &str, x: &[u8], y: &[u8]| {
                    if let Some(i) = first_diff(x, y) {
                        panic!(
                            "extent {e:?}: {what} at guest offset {:#x} ({:#04x} vs {:#04x})",
                            pos + i as u64,
                            x[i],
                            y[i]
                        );
                    }
                };
                match e.kind {
                    ExtentKind::Zero => {
                        base.fill(0);
                        bad("zero extent does not read zeros", &got, &base);
                        bad("zero extent where the model holds data", &want, &base);
                    }
                    ExtentKind::Unallocated => {
                        bad(
                            "unallocated extent does not read the backing bytes",
                            &got,
                            &base,
                        );
                        bad(
                            "unallocated extent where the model was written",
                            &want,
                            &base,
                        );
                    }
                    ExtentKind::Data { host_offset } => {
                        assert_eq!(
                            host_offset % self.cs,
                            e.offset % self.cs,
                            "data extent {e:?} misaligned"
                        );
                        bad("data extent differs from the model", &got, &want);
                    }
                }
                pos += n as u64;
            }
        }
    }

    /// The final checks: check() clean, and map() consistent with the model and the check.
    fn check_clean(&self, why: &str) -> CheckResult {
        let r = self.img().check(CheckFix::NONE).unwrap();
        assert_eq!(
            (r.corruptions, r.leaks, r.check_errors),
            (0, 0, 0),
            "{why}: check is not clean: {r:?}"
        );
        r
    }

    fn map_consistency(&mut self) {
        let size = self.model.size;
        let cs = self.cs;
        let r = self.check_clean("final check");
        let extents = self.img().map(0, size).unwrap();
        let mut pos = 0;
        let mut data_clusters = 0u64;
        let mut last_counted = u64::MAX;
        for e in &extents {
            assert_eq!(e.offset, pos, "map() leaves a gap or overlaps: {e:?}");
            assert!(e.length > 0, "empty extent {e:?}");
            pos += e.length;
            if let ExtentKind::Data { .. } = e.kind {
                let c0 = e.offset / cs;
                let c1 = (e.offset + e.length - 1) / cs;
                data_clusters += c1 - c0 + 1 - u64::from(c0 == last_counted);
                last_counted = c1;
            }
        }
        assert_eq!(pos, size, "map() does not cover the image");
        assert_eq!(
            data_clusters, r.allocated_clusters,
            "clusters in data extents vs allocated clusters reported by check"
        );
        let samples = if size <= FULL_COMPARE_LIMIT {
            vec![(0, size)]
        } else {
            self.sample_ranges(&extents)
        };
        for e in &extents {
            self.check_extent(e, &samples);
        }
    }

    /// A request inside the image, biased towards cluster, chunk, L2-table and image boundaries.
    fn pick_range(&mut self) -> (u64, u64) {
        let s = self.model.size;
        let cs = self.cs;
        let hot = self.hotspots();
        let center = if self.rng.chance(20) {
            self.rng.below(s)
        } else {
            hot[self.rng.below(hot.len() as u64) as usize]
        };
        let jitter = self.rng.below(8 * cs) as i128 - 4 * cs as i128;
        let mut off = (center as i128 + jitter).clamp(0, s as i128 - 1) as u64;
        let big = MAX_REQUEST.min((3 * cs).max(2 * self.cov + cs));
        let len = match self.rng.below(100) {
            0..=24 => self.rng.range(1, 700),
            25..=44 => {
                off = off / SECTOR * SECTOR;
                SECTOR * self.rng.range(1, 2 * cs / SECTOR)
            }
            45..=69 => self.rng.range(1, 3 * cs),
            70..=84 => {
                off = off / cs * cs;
                cs * self.rng.range(1, 4)
            }
            _ => self.rng.range(1, big),
        };
        let len = if self.rng.chance(2) {
            0
        } else {
            len.min(s - off)
        };
        (off, len)
    }

    fn op_write(&mut self) {
        let (off, len) = self.pick_range();
        let data = self.rng.bytes(len);
        self.note(format!("write_at({off:#x}, len {len:#x})"));
        self.img()
            .write_at(off, &data)
            .unwrap_or_else(|e| panic!("write_at({off:#x}, {len:#x}): {e}"));
        self.model.write(off, &data);
        self.compare_around(off, len, "after write_at");
        self.count("write");
    }

    fn cuts(&mut self, len: u64, max_pieces: u64) -> Vec<usize> {
        let pieces = self.rng.range(1, max_pieces);
        let mut cuts: Vec<usize> = (1..pieces)
            .map(|_| self.rng.range(0, len) as usize)
            .collect();
        cuts.sort_unstable();
        cuts
    }

    fn op_writev(&mut self) {
        let (off, len) = self.pick_range();
        let data = self.rng.bytes(len);
        let cuts = self.cuts(len, 5);
        let mut slices = Vec::new();
        let mut prev = 0;
        for &c in cuts.iter().chain(std::iter::once(&data.len())) {
            slices.push(IoSlice::new(&data[prev..c]));
            prev = c;
        }
        let lens: Vec<usize> = slices.iter().map(|s| s.len()).collect();
        self.note(format!(
            "writev_at({off:#x}, len {len:#x}, pieces {lens:?})"
        ));
        self.img()
            .writev_at(off, &slices)
            .unwrap_or_else(|e| panic!("writev_at({off:#x}, {lens:?}): {e}"));
        drop(slices);
        self.model.write(off, &data);
        self.compare_around(off, len, "after writev_at");
        self.count("writev");
    }

    fn op_write_zeroes(&mut self) {
        let (mut off, mut len) = self.pick_range();
        let cs = self.cs;
        if self.rng.chance(50) {
            // Whole clusters (the end of the image may cut the last one).
            off = off / cs * cs;
            len =
                (cs * self.rng.range(1, (MAX_REQUEST / cs).clamp(1, 6))).min(self.model.size - off);
        }
        self.note(format!("write_zeroes({off:#x}, len {len:#x})"));
        self.img()
            .write_zeroes(off, len)
            .unwrap_or_else(|e| panic!("write_zeroes({off:#x}, {len:#x}): {e}"));
        self.model.zero(off, len);
        self.compare_around(off, len, "after write_zeroes");
        self.count("write_zeroes");
    }

    fn op_read(&mut self) {
        let (off, len) = self.pick_range();
        let mut got = vec![0xA5u8; len as usize];
        let vectored = self.rng.chance(40);
        if vectored {
            let cuts = self.cuts(len, 4);
            self.note(format!("readv_at({off:#x}, len {len:#x}, cuts {cuts:?})"));
            let mut rest: &mut [u8] = &mut got;
            let mut slices = Vec::new();
            let mut prev = 0;
            for &c in &cuts {
                let (a, b) = std::mem::take(&mut rest).split_at_mut(c - prev);
                slices.push(IoSliceMut::new(a));
                rest = b;
                prev = c;
            }
            slices.push(IoSliceMut::new(rest));
            self.img()
                .readv_at(off, &mut slices)
                .unwrap_or_else(|e| panic!("readv_at({off:#x}, {len:#x}): {e}"));
        } else {
            self.note(format!("read_at({off:#x}, len {len:#x})"));
            self.img()
                .read_at(off, &mut got)
                .unwrap_or_else(|e| panic!("read_at({off:#x}, {len:#x}): {e}"));
        }
        let mut want = vec![0u8; len as usize];
        self.model.read(off, &mut want);
        if let Some(i) = first_diff(&got, &want) {
            let at = off + i as u64;
            panic!(
                "{} at {off:#x} len {len:#x}: guest offset {at:#x} reads {:#04x}, model has {:#04x}; {}",
                if vectored { "readv_at" } else { "read_at" },
                got[i],
                want[i],
                self.describe(at)
            );
        }
        self.count("read");
    }

    fn op_flush(&mut self) {
        self.note("flush()".into());
        self.img().flush().unwrap();
        self.model.pending.clear();
        self.count("flush");
    }

    /// The process dies without flushing: every sector changed since the last flush must hold
    /// one of the contents it had since then (the engine may lose unflushed writes, and only
    /// those), and the image must open (with repair) consistent.
    fn crash_unflushed(&mut self) {
        let pending = std::mem::take(&mut self.model.pending);
        self.note(format!(
            "crash without flush ({} sectors changed since the last flush) + reopen",
            pending.len()
        ));
        std::mem::forget(self.img.take().unwrap());
        let img = Image::open_storage(self.storage.clone(), &self.opts)
            .unwrap_or_else(|e| panic!("reopen after a crash without flush: {e}"));
        assert!(!img.info().unwrap().needs_check);
        assert_eq!(img.size(), self.model.size, "size after a crash");
        self.img = Some(img);
        self.check_clean("after a crash without flush and reopen");
        let mut buf = [0u8; SECTOR as usize];
        let (mut durable, mut latest, mut between) = (0u64, 0u64, 0u64);
        for (&s, states) in &pending {
            self.img().read_at(s * SECTOR, &mut buf).unwrap();
            match states.iter().position(|&h| h == sector_hash(&buf)) {
                None => panic!(
                    "after a crash without flush, sector {s} (guest {:#x}) holds none of the {} \
                     contents it had since the last flush; {}",
                    s * SECTOR,
                    states.len(),
                    self.describe(s * SECTOR)
                ),
                Some(0) => durable += 1,
                Some(i) if i == states.len() - 1 => latest += 1,
                Some(_) => between += 1,
            }
            // The model follows what survived.
            self.model.apply_write(s * SECTOR, &buf);
        }
        self.note(format!(
            "  after the crash: {durable} sectors as at the last flush, {latest} as last written, \
             {between} in between"
        ));
        self.count("crash-unflushed");
        *self.stats.entry("crash-sectors-durable").or_default() += durable;
        *self.stats.entry("crash-sectors-latest").or_default() += latest;
        *self.stats.entry("crash-sectors-between").or_default() += between;
        self.compare_all("after a crash without flush");
    }

    fn op_truncate(&mut self) {
        let s = self.model.size;
        let cs = self.cs;
        let choice = self.rng.below(10);
        if choice == 0 && s > SECTOR {
            let new = s - SECTOR * self.rng.range(1, (s / SECTOR - 1).min(64));
            self.note(format!("truncate({new:#x}) (shrink, refused)"));
            let r = self.img().truncate(new);
            assert!(
                matches!(r, Err(Error::Unsupported { .. })),
                "shrinking to {new:#x} must be refused with Unsupported, got {r:?}"
            );
            assert_eq!(self.img().size(), s, "refused shrink changed the size");
            self.compare(s - SECTOR, SECTOR, "after refused shrink");
            self.count("truncate-refused");
        } else if choice == 1 {
            let new = s + self.rng.range(1, SECTOR - 1);
            self.note(format!("truncate({new:#x}) (unaligned, refused)"));
            let r = self.img().truncate(new);
            assert!(
                matches!(r, Err(Error::InvalidArgument { .. })),
                "unaligned truncate to {new:#x} must fail with InvalidArgument, got {r:?}"
            );
            assert_eq!(self.img().size(), s);
            self.count("truncate-refused");
        } else if choice == 2 {
            self.note(format!("truncate({s:#x}) (same size)"));
            self.img().truncate(s).unwrap();
            self.count("truncate-same");
        } else if choice <= 5 && !self.jumped && self.step > self.steps / 3 {
            // Jump past the next 64-entry sector of the L1 table (the in-memory L1 grows).
            let unit = 64 * self.cov;
            let new = (s / unit + 1) * unit + SECTOR * self.rng.range(1, 4 * cs / SECTOR);
            self.note(format!("truncate({new:#x}) (jump past an L1 sector)"));
            self.compare_all("before the L1 jump");
            self.img()
                .truncate(new)
                .unwrap_or_else(|e| panic!("truncate({new:#x}): {e}"));
            self.model.size = new;
            self.jumped = true;
            self.count("truncate-jump");
            self.compare(s.saturating_sub(2 * cs), 4 * cs, "after truncate jump");
        } else {
            let mut new = s + SECTOR * self.rng.range(1, 3 * cs / SECTOR + 16);
            if self.rng.chance(30) {
                new = new.next_multiple_of(cs);
            }
            if new > self.max_size && !self.jumped {
                return;
            }
            self.note(format!("truncate({new:#x}) (grow)"));
            self.img()
                .truncate(new)
                .unwrap_or_else(|e| panic!("truncate({new:#x}): {e}"));
            self.model.size = new;
            self.compare(
                s.saturating_sub(cs),
                new - s.saturating_sub(cs),
                "after grow",
            );
            self.count("truncate-grow");
        }
    }

    fn need_check_bit(&self) -> bool {
        let mut f = [0u8; 8];
        self.storage.read_at(&mut f, 16).unwrap();
        u64::from_le_bytes(f) & FEATURE_NEED_CHECK != 0
    }

    fn reopen(&mut self, crash: bool) {
        let img = self.img.take().unwrap();
        if crash {
            self.note("crash (image leaked without close) + reopen".into());
            // A process dying without power loss after its last flush: nothing of close() runs.
            // (Writes after the last flush may be lost by a crash: the engine stages L2 entries
            // until the guest flushes; tests/crash.rs covers those states.)
            img.flush().unwrap();
            std::mem::forget(img);
        } else {
            self.note("close() + reopen".into());
            img.close().unwrap();
            assert!(
                img.read_at(0, &mut [0u8; 1]).is_err(),
                "a closed image must refuse reads"
            );
            img.close().unwrap();
            drop(img);
            assert!(
                !self.need_check_bit(),
                "need-check bit still set after a clean close"
            );
        }
        self.model.pending.clear();
        let img = Image::open_storage(self.storage.clone(), &self.opts)
            .unwrap_or_else(|e| panic!("reopen (crash: {crash}): {e}"));
        assert!(
            !img.info().unwrap().needs_check,
            "need-check bit set after a read-write open"
        );
        assert_eq!(img.size(), self.model.size, "size after reopen");
        self.img = Some(img);
        if crash {
            self.check_clean("after crash and reopen");
            self.count("crash-reopen");
        } else {
            self.count("reopen");
        }
        self.compare_all("after reopen");
    }

    fn op_out_of_range(&mut self) {
        let s = self.model.size;
        let cs = self.cs;
        let storage_len = self.storage.len().unwrap();
        let (off, len) = match self.rng.below(4) {
            0 => {
                let back = self.rng.range(0, s.min(2 * cs));
                (s - back, back + self.rng.range(1, 2 * cs))
            }
            1 => (s + self.rng.range(1, 4 * cs), self.rng.range(0, 2 * cs)),
            2 => (u64::MAX - self.rng.below(4096), self.rng.range(1, 8192)),
            _ => (self.rng.below(s), u64::MAX - self.rng.below(s)),
        };
        let huge = len > 4 * cs;
        let op = if huge {
            ["write_zeroes", "block_status", "map"][self.rng.below(3) as usize]
        } else {
            [
                "read_at",
                "readv_at",
                "write_at",
                "writev_at",
                "write_zeroes",
                "block_status",
                "map",
            ][self.rng.below(7) as usize]
        };
        self.note(format!("{op}({off:#x}, len {len:#x}) (out of range)"));
        let img = self.img.as_ref().unwrap();
        let ok = match op {
            "read_at" => is_out_of_range(&img.read_at(off, &mut vec![0u8; len as usize])),
            "readv_at" => {
                let mut buf = vec![0u8; len as usize];
                let (a, b) = buf.split_at_mut(len as usize / 2);
                is_out_of_range(&img.readv_at(off, &mut [IoSliceMut::new(a), IoSliceMut::new(b)]))
            }
            "write_at" => is_out_of_range(&img.write_at(off, &vec![0x5Au8; len as usize])),
            "writev_at" => {
                let buf = vec![0x5Bu8; len as usize];
                let (a, b) = buf.split_at(len as usize / 3);
                is_out_of_range(&img.writev_at(off, &[IoSlice::new(a), IoSlice::new(b)]))
            }
            "write_zeroes" => is_out_of_range(&img.write_zeroes(off, len)),
            "block_status" => is_out_of_range(&img.block_status(off, len)),
            _ => is_out_of_range(&img.map(off, len)),
        };
        assert!(
            ok,
            "{op}({off:#x}, len {len:#x}) on an image of {s:#x} bytes must fail with OutOfRange"
        );
        assert_eq!(img.size(), s, "out-of-range request changed the size");
        assert_eq!(
            self.storage.len().unwrap(),
            storage_len,
            "out-of-range request changed the file"
        );
        let tail = s.min(4 * cs);
        self.compare(s - tail, tail, "after an out-of-range request");
        if off < s {
            let n = (s - off).min(4 * cs);
            self.compare_around(off, n, "after an out-of-range request");
        }
        self.count("out-of-range");
    }

    fn op_block_status(&mut self) {
        let (off, len) = self.pick_range();
        self.note(format!("block_status({off:#x}, len {len:#x})"));
        let r = self.img().block_status(off, len);
        if len == 0 {
            assert!(
                matches!(r, Err(Error::InvalidArgument { .. })),
                "block_status of an empty range: {r:?}"
            );
            return;
        }
        let e = r.unwrap_or_else(|e| panic!("block_status({off:#x}, {len:#x}): {e}"));
        assert_eq!(e.offset, off, "block_status extent start");
        assert!(
            e.length > 0 && e.length <= len,
            "block_status extent length {e:?} for request {len:#x}"
        );
        self.check_extent(&e, &[(e.offset, e.offset + e.length)]);
        self.count("block_status");
    }

    fn op_check(&mut self) {
        if self.rng.chance(30) {
            // Repair of a clean image: nothing to fix, and the engine reloads its metadata.
            self.note("check(ALL)".into());
            let r = self.img().check(CheckFix::ALL).unwrap();
            assert_eq!(
                (
                    r.corruptions,
                    r.leaks,
                    r.check_errors,
                    r.corruptions_fixed,
                    r.leaks_fixed
                ),
                (0, 0, 0, 0, 0),
                "repair of a clean image: {r:?}"
            );
            self.count("check-repair");
            self.compare_all("after check(ALL)");
        } else {
            self.note("check(NONE)".into());
            self.check_clean("check during the run");
            self.count("check");
        }
    }

    fn run(&mut self) {
        for step in 0..self.steps {
            self.step = step;
            match self.rng.below(100) {
                0..=24 => self.op_write(),
                25..=36 => self.op_writev(),
                37..=46 => self.op_write_zeroes(),
                47..=64 => self.op_read(),
                65..=67 => self.op_flush(),
                68..=71 => self.op_truncate(),
                72..=74 => self.reopen(false),
                75 => self.reopen(true),
                76..=83 => self.op_out_of_range(),
                84..=91 => self.op_block_status(),
                92..=93 => self.op_check(),
                94 => self.crash_unflushed(),
                _ => self.op_write(),
            }
            assert_eq!(self.img().size(), self.model.size, "size");
            if (step + 1) % COMPARE_EVERY == 0 {
                self.compare_all("periodic comparison");
            }
        }
        self.step = self.steps;
        self.compare_all("final comparison");
        self.map_consistency();
        self.reopen(false);
        self.map_consistency();
    }
}

/// Where a configuration's image lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Medium {
    Memory,
    File,
    DirectFile,
}

fn run_config(
    seed: u64,
    steps: u64,
    cs: u64,
    ts: u64,
    kind: BackingKind,
    medium: Medium,
) -> BTreeMap<&'static str, u64> {
    let mut rng = Rng::new(seed);
    let (size0, max_size) = sizes(cs, ts);
    let mut base = make_base(&mut rng, cs, size0, kind);
    let resolver = make_backing(&mut rng, kind, cs, &mut base);
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = match medium {
        Medium::Memory => Arc::new(MemStorage::new()),
        Medium::File | Medium::DirectFile => {
            let path = dir.path().join("model.qed");
            FileStorage::create(&path).unwrap();
            Arc::new(FileStorage::open(&path, true, medium == Medium::DirectFile).unwrap())
        }
    };
    Image::create_on(
        &*storage,
        &CreateOptions {
            size: size0,
            cluster_size: cs as u32,
            table_size: ts as u32,
            backing_file: (kind != BackingKind::None).then(|| "base".into()),
            backing_format: match kind {
                BackingKind::None => None,
                BackingKind::Raw => Some(BackingFormat::Raw),
                BackingKind::Qed => Some(BackingFormat::Qed),
            },
        },
    )
    .unwrap();
    let mut opts = open_options(resolver);
    if kind != BackingKind::Raw {
        // The smallest L2 cache (a few 4 KiB pieces per shard): pieces are evicted and reloaded.
        opts.l2_cache_bytes = 0;
    }
    let img = Image::open_storage(storage.clone(), &opts).unwrap();
    let mut h = Harness {
        rng,
        storage,
        opts,
        img: Some(img),
        model: Model {
            size: size0,
            pages: BTreeMap::new(),
            base: Arc::new(base),
            visible_end: size0,
            pending: BTreeMap::new(),
        },
        cs,
        cov: l2_coverage(cs, ts),
        max_size,
        steps,
        step: 0,
        jumped: false,
        log: VecDeque::new(),
        stats: BTreeMap::new(),
    };
    h.compare_all("fresh image");
    h.run();
    h.img.take().unwrap().close().unwrap();
    std::mem::take(&mut h.stats)
}

#[test]
fn model_random_ops_match_flat_model() {
    let seed = env_u64("QED_MODEL_SEED").unwrap_or(DEFAULT_SEED);
    let steps = env_u64("QED_MODEL_STEPS").unwrap_or(DEFAULT_STEPS);
    let filter = std::env::var("QED_MODEL_CONFIG").ok();
    let geometries = [
        (4 * KIB, 1),
        (4 * KIB, 16),
        (64 * KIB, 4),
        (MIB, 1),
        (2 * MIB, 2),
    ];
    let kinds = [BackingKind::None, BackingKind::Raw, BackingKind::Qed];
    let mut configs: Vec<(u64, u64, BackingKind, Medium)> = Vec::new();
    for &(cs, ts) in &geometries {
        for &kind in &kinds {
            configs.push((cs, ts, kind, Medium::Memory));
        }
    }
    // The same engine on real files, buffered and O_DIRECT (unaligned requests bounce).
    configs.push((4 * KIB, 1, BackingKind::Raw, Medium::File));
    configs.push((64 * KIB, 4, BackingKind::Qed, Medium::DirectFile));
    let start = Instant::now();
    let mut total = 0;
    let mut ran = 0;
    for (i, &(cs, ts, kind, medium)) in configs.iter().enumerate() {
        {
            let name = format!(
                "{} {}{}",
                geometry_name(cs, ts),
                kind.name(),
                match medium {
                    Medium::Memory => "",
                    Medium::File => " file",
                    Medium::DirectFile => " O_DIRECT-file",
                }
            );
            if filter.as_deref().is_some_and(|f| !name.contains(f)) {
                continue;
            }
            let _note = FailureNote(format!(
                "model test: rerun with QED_MODEL_SEED={seed:#x} QED_MODEL_STEPS={steps} QED_MODEL_CONFIG='{name}'"
            ));
            let t = Instant::now();
            let stats = run_config(mix(seed, i as u64), steps, cs, ts, kind, medium);
            eprintln!(
                "model {name}: {steps} steps in {:.2?}: {stats:?}",
                t.elapsed()
            );
            total += steps;
            ran += 1;
        }
    }
    assert!(
        ran > 0,
        "QED_MODEL_CONFIG={filter:?} matches no configuration"
    );
    eprintln!(
        "model: {ran} configurations, {total} steps in {:.2?} (QED_MODEL_SEED={seed:#x})",
        start.elapsed()
    );
}

// ------------------------------------------------------------------------------------------------
// Crash without power loss, read-only opens, refused requests.

/// A 64 KiB / ts4 image on memory over a raw backing file, with a few allocating writes, a zeroed
/// range and an in-place overwrite; returns the storage, its options and the expected bytes.
fn small_image_with_data(seed: u64) -> (Arc<MemStorage>, OpenOptions, Vec<u8>) {
    let mut rng = Rng::new(seed);
    let size = 8 * MIB;
    let backing_len = 5 * MIB + 321;
    let backing = Arc::new(MemStorage::from_bytes(&rng.bytes(backing_len)));
    let mut model = vec![0u8; size as usize];
    backing
        .read_at(&mut model[..backing_len as usize], 0)
        .unwrap();
    let b: Arc<dyn Storage> = backing;
    let resolver: BackingResolver =
        Arc::new(move |_: &str, _: Option<BackingFormat>| Ok(Backing::Raw(b.clone())));
    let storage = Arc::new(MemStorage::new());
    Image::create_on(
        &*storage,
        &CreateOptions {
            size,
            backing_file: Some("base".into()),
            backing_format: Some(BackingFormat::Raw),
            ..Default::default()
        },
    )
    .unwrap();
    let opts = open_options(Some(resolver));
    let img = Image::open_storage(storage.clone(), &opts).unwrap();
    for &(off, len) in &[
        (100u64, 1000u64),
        (64 * KIB - 7, 20),
        (5 * MIB - 1000, 3 * 64 * KIB),
        (7 * MIB + 3, 300 * KIB),
        (150, 10),
    ] {
        let d = rng.bytes(len);
        img.write_at(off, &d).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&d);
    }
    img.write_zeroes(2 * MIB - 100, 3 * 64 * KIB).unwrap();
    model[(2 * MIB - 100) as usize..(2 * MIB - 100 + 3 * 64 * KIB) as usize].fill(0);
    img.flush().unwrap();
    // Leave the image open and dirty: the caller decides how it ends.
    std::mem::forget(img);
    (storage, opts, model)
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
    assert_eq!(got.len(), want.len(), "{why}: length");
}

fn header_features(storage: &MemStorage) -> u64 {
    let mut f = [0u8; 8];
    storage.read_at(&mut f, 16).unwrap();
    u64::from_le_bytes(f)
}

#[test]
fn reopen_after_drop_without_close() {
    // 1. Dropping the handle without close(): Drop closes it.
    {
        let storage = Arc::new(MemStorage::new());
        Image::create_on(&*storage, &CreateOptions::new(4 * MIB)).unwrap();
        let opts = open_options(None);
        let img = Image::open_storage(storage.clone(), &opts).unwrap();
        let mut rng = Rng::new(7);
        let d = rng.bytes(200 * KIB);
        img.write_at(12345, &d).unwrap();
        drop(img);
        assert_eq!(
            header_features(&storage) & FEATURE_NEED_CHECK,
            0,
            "dropping the image should close it cleanly"
        );
        let img = Image::open_storage(storage.clone(), &opts).unwrap();
        let mut got = vec![0u8; d.len()];
        img.read_at(12345, &mut got).unwrap();
        assert_same(&got, &d, "after drop and reopen");
        let r = img.check(CheckFix::NONE).unwrap();
        assert_eq!((r.corruptions, r.leaks, r.check_errors), (0, 0, 0), "{r:?}");
    }

    // 2. The process dies (the handle is leaked, nothing of close runs).
    let (storage, opts, model) = small_image_with_data(11);
    assert_ne!(
        header_features(&storage) & FEATURE_NEED_CHECK,
        0,
        "an image with allocating writes and no close must carry the need-check bit"
    );
    // A read-only open skips the check and leaves the bit alone, but reads the data.
    {
        let ro = Image::open_storage(
            storage.clone(),
            &OpenOptions {
                writable: false,
                ..opts.clone()
            },
        )
        .unwrap();
        assert!(ro.info().unwrap().needs_check);
        assert_same(
            &read_all(&ro),
            &model,
            "read-only open of the crashed image",
        );
        let r = ro.check(CheckFix::NONE).unwrap();
        assert_eq!((r.corruptions, r.leaks, r.check_errors), (0, 0, 0), "{r:?}");
        ro.close().unwrap();
    }
    assert_ne!(header_features(&storage) & FEATURE_NEED_CHECK, 0);
    let before = storage.to_bytes();
    let img = Image::open_storage(storage.clone(), &opts).unwrap();
    assert!(
        !img.info().unwrap().needs_check,
        "read-write open must check and clear the bit"
    );
    assert_eq!(header_features(&storage) & FEATURE_NEED_CHECK, 0);
    assert_eq!(
        storage.len().unwrap(),
        before.len() as u64,
        "nothing was leaked, the repair should not change the file length"
    );
    assert_same(&read_all(&img), &model, "read-write reopen after the crash");
    let r = img.check(CheckFix::NONE).unwrap();
    assert_eq!((r.corruptions, r.leaks, r.check_errors), (0, 0, 0), "{r:?}");
    // And the image keeps working.
    let mut model = model;
    img.write_at(6 * MIB + 17, b"after the crash").unwrap();
    model[(6 * MIB + 17) as usize..(6 * MIB + 32) as usize].copy_from_slice(b"after the crash");
    img.close().unwrap();
    let img = Image::open_storage(storage.clone(), &opts).unwrap();
    assert_same(&read_all(&img), &model, "after writing and a clean close");
    let r = img.check(CheckFix::NONE).unwrap();
    assert_eq!((r.corruptions, r.leaks, r.check_errors), (0, 0, 0), "{r:?}");
    img.close().unwrap();

    // 3. The same on a file: drop without close, reopen by path.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dropped.qed");
    Image::create(
        &path,
        &CreateOptions {
            size: 3 * MIB,
            cluster_size: 4096,
            table_size: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let mut want = vec![0u8; 3 * MIB as usize];
    {
        let img = Image::open(&path, &OpenOptions::read_write()).unwrap();
        let mut rng = Rng::new(99);
        for &(off, len) in &[(0u64, 5000u64), (2 * MIB - 3, 9000), (3 * MIB - 512, 512)] {
            let d = rng.bytes(len);
            img.write_at(off, &d).unwrap();
            want[off as usize..(off + len) as usize].copy_from_slice(&d);
        }
    }
    let img = Image::open(&path, &OpenOptions::read_write()).unwrap();
    assert!(!img.info().unwrap().needs_check);
    assert_same(&read_all(&img), &want, "file image after drop and reopen");
    let r = img.check(CheckFix::NONE).unwrap();
    assert_eq!((r.corruptions, r.leaks, r.check_errors), (0, 0, 0), "{r:?}");
    img.close().unwrap();
}

#[test]
fn out_of_range_and_read_only() {
    let (storage, opts, model) = small_image_with_data(23);
    let size = model.len() as u64;
    // Close the dirty image cleanly first (a read-write open repairs and clears the bit).
    Image::open_storage(storage.clone(), &opts)
        .unwrap()
        .close()
        .unwrap();
    let before = storage.to_bytes();

    let ro = Image::open_storage(
        storage.clone(),
        &OpenOptions {
            writable: false,
            ..opts.clone()
        },
    )
    .unwrap();
    assert!(!ro.is_writable());
    let ro_err = |what: &str, r: qed::Result<()>| {
        assert!(
            matches!(r, Err(Error::ReadOnly)),
            "read-only image: {what} must fail with ReadOnly, got {r:?}"
        );
    };
    ro_err("write_at", ro.write_at(0, b"x"));
    ro_err("write_at (empty)", ro.write_at(10, b""));
    ro_err(
        "writev_at",
        ro.writev_at(4096, &[IoSlice::new(b"ab"), IoSlice::new(b"cd")]),
    );
    ro_err("write_zeroes", ro.write_zeroes(0, 64 * KIB));
    ro_err("truncate (grow)", ro.truncate(size + 64 * KIB));
    ro_err("truncate (shrink)", ro.truncate(size - 512));
    ro_err("check with repair", ro.check(CheckFix::ALL).map(|_| ()));
    ro_err("change_backing_file", ro.change_backing_file(None, None));
    ro.flush().unwrap();
    assert_same(&read_all(&ro), &model, "read-only reads");
    let r = ro.check(CheckFix::NONE).unwrap();
    assert_eq!((r.corruptions, r.leaks, r.check_errors), (0, 0, 0), "{r:?}");
    assert_eq!(ro.size(), size);
    ro.close().unwrap();
    assert!(
        storage.to_bytes() == before,
        "a read-only open changed the image file"
    );

    // Out-of-range requests and refused resizes on a read-write image change nothing.
    let img = Image::open_storage(storage.clone(), &opts).unwrap();
    let oor = |what: &str, ok: bool| assert!(ok, "{what} must fail with OutOfRange");
    let mut buf = vec![0u8; 4096];
    oor(
        "read crossing the end",
        is_out_of_range(&img.read_at(size - 10, &mut buf)),
    );
    oor(
        "read at the end",
        is_out_of_range(&img.read_at(size, &mut buf[..1])),
    );
    oor(
        "empty read past the end",
        is_out_of_range(&img.read_at(size + 1, &mut [])),
    );
    oor(
        "read at u64::MAX",
        is_out_of_range(&img.read_at(u64::MAX, &mut buf[..2])),
    );
    oor(
        "write crossing the end",
        is_out_of_range(&img.write_at(size - 512, &buf)),
    );
    oor(
        "write past the end",
        is_out_of_range(&img.write_at(size + 512, &buf)),
    );
    oor(
        "write overflowing",
        is_out_of_range(&img.write_at(u64::MAX - 100, &buf)),
    );
    oor(
        "writev crossing the end",
        is_out_of_range(&img.writev_at(size - 1, &[IoSlice::new(b"a"), IoSlice::new(b"b")])),
    );
    oor(
        "write_zeroes crossing the end",
        is_out_of_range(&img.write_zeroes(size - 64 * KIB, 128 * KIB)),
    );
    oor(
        "write_zeroes overflowing",
        is_out_of_range(&img.write_zeroes(64 * KIB, u64::MAX)),
    );
    oor(
        "block_status past the end",
        is_out_of_range(&img.block_status(size, 1)),
    );
    oor(
        "map crossing the end",
        is_out_of_range(&img.map(0, size + 1)),
    );
    // Empty requests inside the image (or right at its end) are fine and do nothing.
    img.read_at(size, &mut []).unwrap();
    img.write_at(size, &[]).unwrap();
    img.write_zeroes(size, 0).unwrap();
    let r = img.truncate(size - 512);
    assert!(matches!(r, Err(Error::Unsupported { .. })), "shrink: {r:?}");
    let r = img.truncate(0);
    assert!(
        matches!(r, Err(Error::Unsupported { .. })),
        "shrink to 0: {r:?}"
    );
    let r = img.truncate(size + 100);
    assert!(
        matches!(r, Err(Error::InvalidArgument { .. })),
        "unaligned grow: {r:?}"
    );
    img.truncate(size).unwrap();
    assert_eq!(img.size(), size);
    assert_same(&read_all(&img), &model, "after refused requests");
    img.close().unwrap();
    assert!(
        storage.to_bytes() == before,
        "refused requests changed the image file"
    );
    // Growing works and exposes the backing file (zeros past its end).
    let img = Image::open_storage(storage.clone(), &opts).unwrap();
    img.truncate(size + 64 * KIB + 512).unwrap();
    let mut tail = vec![0xFFu8; 64 * KIB as usize + 512];
    img.read_at(size, &mut tail).unwrap();
    assert!(tail.iter().all(|&b| b == 0), "a grown area must read zeros");
    img.close().unwrap();
    let img = Image::open_storage(storage.clone(), &opts).unwrap();
    assert_eq!(img.size(), size + 64 * KIB + 512, "grown size after reopen");
    let r = img.check(CheckFix::NONE).unwrap();
    assert_eq!((r.corruptions, r.leaks, r.check_errors), (0, 0, 0), "{r:?}");
}
