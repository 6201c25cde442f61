// SPDX-License-Identifier: MIT OR Apache-2.0
//! Sequences of guest operations on a fresh image of a fuzzer-chosen geometry (optionally over a
//! raw backing file), compared with a flat byte model of the guest disk.
//!
//! Operations: write (plain or scatter-gather), write-zeroes, read (plain or scatter-gather),
//! flush, grow, close + reopen, "crash" + reopen (the image's bytes as they are, need-check bit
//! and all, opened read-write so the open repairs), check (must be clean), check + repair (must
//! change no guest byte), map (extents must tile the disk, and data extents must hold the model's
//! bytes in the file). Every read is compared with the model; so is the whole disk at the end.
//!
//! Durability is promised at guest flushes only (L2 entries are staged until then), so after a
//! crash every guest byte must read as it was at the last flush (or close) or as one of the
//! writes since then left it, as on a disk with a volatile write cache; the model then continues
//! from what the image holds.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use qed::{
    Backing, BackingFormat, CheckFix, CreateOptions, ExtentKind, Image, MemStorage, OpenOptions,
    Storage,
};
use std::sync::{Arc, OnceLock};

const SECTOR: u64 = 512;
/// Largest virtual size, initial or grown (the model is a flat vector).
const MAX_SIZE: u64 = 8 << 20;
/// Longest single request.
const MAX_REQUEST: u64 = 256 << 10;
/// Most operations run per input.
const MAX_OPS: usize = 64;

#[derive(Arbitrary, Debug)]
struct Input {
    /// Cluster size 4 KiB << (x % 5): 4 KiB ..= 64 KiB. Bit 7: the storage does not grow by
    /// writes (as an O_DIRECT file), so the engine extends the file ahead of its clusters.
    cluster_shift: u8,
    /// Table size 1 << (x % 5): 1 ..= 16 clusters.
    table_shift: u8,
    /// Virtual size in sectors, taken modulo the limit of the size class.
    size_sectors: u16,
    /// Size class: up to 256 KiB, 2 MiB or [`MAX_SIZE`] (small disks run faster).
    size_class: u8,
    /// L2 cache budget in 4 KiB units (tiny budgets exercise eviction).
    cache_pages: u8,
    backing: Option<BackingSpec>,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
struct BackingSpec {
    /// Length in bytes (any, not just sectors; may be shorter or longer than the disk).
    len: u32,
    seed: u8,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Write {
        offset: u32,
        len: u32,
        seed: u8,
        split: u8,
    },
    Zeroes {
        offset: u32,
        len: u32,
    },
    Read {
        offset: u32,
        len: u32,
        split: u8,
    },
    Flush,
    Grow {
        sectors: u16,
        raw: Option<u64>,
    },
    Reopen,
    Crash,
    Check,
    Repair,
    Map,
}

/// Period of the data pattern: prime, so no cluster or table multiple maps onto itself.
const PERIOD: usize = 65521;

/// A fixed pseudo-random block that written data is cut from (copying is cheap; computing
/// bytes one by one under coverage instrumentation is not).
fn table() -> &'static [u8] {
    static T: OnceLock<Vec<u8>> = OnceLock::new();
    T.get_or_init(|| {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        (0..2 * PERIOD)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    })
}

/// The data bytes for guest range `[pos, pos + len)` of a write with `seed`: they depend on the
/// seed and the position, so misplaced or stale data shows.
fn pattern(seed: u8, pos: u64, len: usize) -> Vec<u8> {
    let t = table();
    let mut at = ((pos + seed as u64 * 4099) % PERIOD as u64) as usize;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        let n = (len - v.len()).min(PERIOD);
        v.extend_from_slice(&t[at..at + n]);
        at = (at + n) % PERIOD;
    }
    v
}

/// One byte of [`pattern`].
fn pattern_byte(seed: u8, pos: u64) -> u8 {
    table()[((pos + seed as u64 * 4099) % PERIOD as u64) as usize]
}

static ZEROS: [u8; 4096] = [0; 4096];

fn is_zero(b: &[u8]) -> bool {
    b.chunks(ZEROS.len()).all(|c| c == &ZEROS[..c.len()])
}

/// Splits `len` into at most 4 pieces chosen by `split`.
fn pieces(len: usize, split: u8) -> Vec<usize> {
    let n = (split % 4) as usize + 1;
    let mut out = Vec::new();
    let mut left = len;
    for i in 0..n {
        let take = if i + 1 == n {
            left
        } else {
            (left * ((split as usize >> (2 * i)) % 3 + 1) / 4).min(left)
        };
        out.push(take);
        left -= take;
    }
    out
}

/// A write since the last flush: `[start, end)` holding the pattern of `seed`, or zeros.
struct Touch {
    start: u64,
    end: u64,
    seed: Option<u8>,
}

impl Touch {
    fn could_leave(&self, pos: u64, b: u8) -> bool {
        (self.start..self.end).contains(&pos)
            && match self.seed {
                Some(seed) => pattern_byte(seed, pos) == b,
                None => b == 0,
            }
    }
}

struct State {
    storage: Arc<MemStorage>,
    opts: OpenOptions,
    img: Option<Image>,
    model: Vec<u8>,
    /// The guest disk as of the last flush or close: what a crash may fall back to.
    flushed: Vec<u8>,
    /// Writes since then (a crash may leave any of their bytes).
    unflushed: Vec<Touch>,
    has_backing: bool,
}

impl State {
    fn img(&self) -> &Image {
        self.img.as_ref().unwrap()
    }

    fn open(&mut self) {
        let img = Image::open_storage(self.storage.clone(), &self.opts).expect("open");
        assert_eq!(img.size(), self.model.len() as u64, "size after open");
        self.img = Some(img);
    }

    /// Everything so far is durable.
    fn flushed_now(&mut self) {
        self.flushed = self.model.clone();
        self.unflushed.clear();
    }

    /// After a crash: each byte must be as at the last flush or as a write since left it (the
    /// model being the last of them); the model becomes what the image holds.
    fn after_crash(&mut self) {
        let img = Image::open_storage(self.storage.clone(), &self.opts).expect("open after crash");
        let size = img.size() as usize;
        assert!(
            size == self.model.len() || size == self.flushed.len(),
            "size after crash {size}: neither {} nor flushed {}",
            self.model.len(),
            self.flushed.len()
        );
        let mut got = vec![0u8; size];
        for (i, c) in got.chunks_mut(MAX_REQUEST as usize).enumerate() {
            img.read_at(i as u64 * MAX_REQUEST, c)
                .expect("read after crash");
        }
        // Compare page by page (memcmp); only pages matching neither the model nor the last flush
        // are examined byte by byte.
        fn page(v: &[u8], at: usize) -> Option<&[u8]> {
            (at < v.len()).then(|| &v[at..(at + 4096).min(v.len())])
        }
        for at in (0..size).step_by(4096) {
            let g = &got[at..(at + 4096).min(size)];
            if page(&self.model, at) == Some(g) || page(&self.flushed, at) == Some(g) {
                continue;
            }
            for (k, &b) in g.iter().enumerate() {
                let i = at + k;
                let now = self.model.get(i) == Some(&b);
                let then = self.flushed.get(i) == Some(&b);
                let between = || self.unflushed.iter().any(|t| t.could_leave(i as u64, b));
                // Grown areas read as zeros.
                let grown = i >= self.flushed.len() && b == 0;
                assert!(
                    now || then || grown || between(),
                    "after crash: guest byte {i:#x} reads {b:#04x}, model has {:?}, last flush {:?}, no write since left it",
                    self.model.get(i),
                    self.flushed.get(i)
                );
            }
        }
        self.model = got;
        self.flushed_now();
        self.img = Some(img);
    }

    fn compare(&self, offset: u64, got: &[u8], what: &str) {
        let want = &self.model[offset as usize..offset as usize + got.len()];
        if got != want {
            let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
            panic!(
                "{what}: guest byte {:#x} reads {:#04x}, model has {:#04x}",
                offset + i as u64,
                got[i],
                want[i]
            );
        }
    }

    fn read_all(&self, what: &str) {
        let mut buf = vec![0u8; MAX_REQUEST as usize];
        let size = self.model.len() as u64;
        let mut pos = 0;
        while pos < size {
            let n = (size - pos).min(MAX_REQUEST) as usize;
            self.img().read_at(pos, &mut buf[..n]).expect("read");
            self.compare(pos, &buf[..n], what);
            pos += n as u64;
        }
    }

    fn in_range(&self, offset: u64, len: u64) -> bool {
        offset + len <= self.model.len() as u64
    }
}

fuzz_target!(|input: Input| {
    let cs = 4096u32 << (input.cluster_shift % 5);
    let ts = 1u32 << (input.table_shift % 5);
    let limit = [256 << 10, 2 << 20, MAX_SIZE][input.size_class as usize % 3];
    let size = (input.size_sectors as u64 % (limit / SECTOR) + 1) * SECTOR;
    let fixed_length = input.cluster_shift & 0x80 != 0;
    let storage = Arc::new(MemStorage::new());
    storage.set_fixed_length(fixed_length);
    let mut create = CreateOptions {
        size,
        cluster_size: cs,
        table_size: ts,
        ..Default::default()
    };
    let mut model = vec![0u8; size as usize];
    let mut resolver = None;
    if let Some(b) = &input.backing {
        let len = b.len as u64 % (size + size / 2 + 1);
        let bytes = pattern(b.seed ^ 0x5a, 0, len as usize);
        let n = (len.min(size)) as usize;
        model[..n].copy_from_slice(&bytes[..n]);
        let base: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(&bytes));
        let r: qed::image::BackingResolver =
            Arc::new(move |_: &str, _: Option<BackingFormat>| Ok(Backing::Raw(base.clone())));
        resolver = Some(r);
        create.backing_file = Some("base.raw".into());
        create.backing_format = Some(BackingFormat::Raw);
    }
    Image::create_on(&*storage, &create).expect("create");
    let opts = OpenOptions {
        writable: true,
        no_backing: resolver.is_none(),
        lock: false,
        l2_cache_bytes: (input.cache_pages as usize + 1) * 4096,
        backing_resolver: resolver,
        ..OpenOptions::read_write()
    };
    let mut st = State {
        storage,
        opts,
        img: None,
        flushed: model.clone(),
        unflushed: Vec::new(),
        model,
        has_backing: input.backing.is_some(),
    };
    st.open();

    for op in input.ops.iter().take(MAX_OPS) {
        let size = st.model.len() as u64;
        // Offsets reach a little past the end, so that out-of-range requests are tried too.
        let off = |o: u32| o as u64 % (size + 2 * cs as u64);
        let len = |l: u32| l as u64 % (MAX_REQUEST.min(size + cs as u64) + 1);
        match *op {
            Op::Write {
                offset,
                len: l,
                seed,
                split,
            } => {
                let (o, l) = (off(offset), len(l));
                let data = pattern(seed, o, l as usize);
                let parts = pieces(data.len(), split);
                let mut bufs: Vec<&[u8]> = Vec::new();
                let mut rest = &data[..];
                for n in parts {
                    let (a, b) = rest.split_at(n);
                    bufs.push(a);
                    rest = b;
                }
                let r = st.img().write_sg(o, &bufs);
                if st.in_range(o, l) {
                    r.expect("write in range");
                    st.model[o as usize..(o + l) as usize].copy_from_slice(&data);
                    st.unflushed.push(Touch {
                        start: o,
                        end: o + l,
                        seed: Some(seed),
                    });
                } else {
                    assert!(r.is_err(), "write past the end succeeded");
                }
            }
            Op::Zeroes { offset, len: l } => {
                let (o, l) = (off(offset), len(l));
                let r = st.img().write_zeroes(o, l);
                if st.in_range(o, l) {
                    r.expect("write_zeroes in range");
                    st.model[o as usize..(o + l) as usize].fill(0);
                    st.unflushed.push(Touch {
                        start: o,
                        end: o + l,
                        seed: None,
                    });
                } else {
                    assert!(r.is_err(), "write_zeroes past the end succeeded");
                }
            }
            Op::Read {
                offset,
                len: l,
                split,
            } => {
                let (o, l) = (off(offset), len(l));
                let mut data = vec![0xeeu8; l as usize];
                let parts = pieces(data.len(), split);
                let mut bufs: Vec<&mut [u8]> = Vec::new();
                let mut rest = &mut data[..];
                for n in parts {
                    let (a, b) = rest.split_at_mut(n);
                    bufs.push(a);
                    rest = b;
                }
                let r = st.img().read_sg(o, &mut bufs);
                if st.in_range(o, l) {
                    r.expect("read in range");
                    st.compare(o, &data, "read");
                } else {
                    assert!(r.is_err(), "read past the end succeeded");
                }
            }
            Op::Flush => {
                st.img().flush().expect("flush");
                st.flushed_now();
            }
            Op::Grow { sectors, raw } => {
                let new = match raw {
                    Some(v) => v,
                    None => size + sectors as u64 * SECTOR,
                };
                let r = st.img().truncate(new);
                let ok = new >= size && new % SECTOR == 0 && new <= MAX_SIZE;
                if ok {
                    r.expect("grow");
                    // The new area reads as zeros, whatever a backing file holds there.
                    st.model.resize(new as usize, 0);
                } else if new < size || new % SECTOR != 0 {
                    assert!(r.is_err(), "invalid truncate to {new} succeeded");
                } else if r.is_ok() {
                    // Valid for the format but beyond what the model follows: stop here.
                    return;
                }
                assert_eq!(st.img().size(), st.model.len() as u64, "size after grow");
            }
            Op::Reopen => {
                st.img().close().expect("close");
                st.img = None;
                st.flushed_now();
                st.open();
            }
            Op::Crash => {
                // Power loss: the file's bytes as they are now (staged metadata not written,
                // need-check bit included). The read-write open repairs.
                let snapshot = Arc::new(MemStorage::from_bytes(&st.storage.to_bytes()));
                snapshot.set_fixed_length(fixed_length);
                st.img = None; // closes the old image on the old storage
                st.storage = snapshot;
                st.after_crash();
            }
            Op::Check => {
                let r = st.img().check(CheckFix::NONE).expect("check");
                assert_eq!(
                    (r.corruptions, r.leaks, r.check_errors),
                    (0, 0, 0),
                    "check of a healthy image: {r:?}"
                );
            }
            Op::Repair => {
                let r = st.img().check(CheckFix::ALL).expect("repair");
                assert_eq!(
                    (r.corruptions_fixed, r.corruptions, r.check_errors),
                    (0, 0, 0),
                    "repair of a healthy image: {r:?}"
                );
            }
            Op::Map => {
                let extents = st.img().map(0, size).expect("map");
                let mut at = 0;
                for e in &extents {
                    assert_eq!(e.offset, at, "extents are contiguous");
                    assert!(e.length > 0, "empty extent");
                    at += e.length;
                    let range = e.offset as usize..(e.offset + e.length) as usize;
                    match e.kind {
                        ExtentKind::Data { host_offset } => {
                            assert_eq!(host_offset % cs as u64, e.offset % cs as u64);
                            let mut buf = vec![0u8; e.length.min(MAX_REQUEST) as usize];
                            st.storage.read_at(&mut buf, host_offset).unwrap();
                            st.compare(e.offset, &buf, "data extent in the file");
                        }
                        ExtentKind::Zero => {
                            assert!(is_zero(&st.model[range]), "zero extent")
                        }
                        ExtentKind::Unallocated if !st.has_backing => {
                            assert!(is_zero(&st.model[range]), "unallocated")
                        }
                        ExtentKind::Unallocated => {}
                    }
                }
                assert_eq!(at, size, "extents cover the disk");
            }
        }
    }
    st.read_all("final read");
    // Close, reopen, and everything is still there; the image is clean.
    st.img().close().expect("close");
    st.img = None;
    st.open();
    st.read_all("read after reopen");
    let r = st.img().check(CheckFix::NONE).expect("final check");
    assert_eq!(
        (r.corruptions, r.leaks, r.check_errors),
        (0, 0, 0),
        "final check: {r:?}"
    );
});
