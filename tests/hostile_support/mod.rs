// SPDX-License-Identifier: MIT OR Apache-2.0
//! Helpers for the hostile-input corpus (`tests/hostile.rs`): raw header and table patching,
//! a tiny image builder for layouts `Image::create` does not make (header_size > 1), file
//! fingerprints (to prove that a refused or read-only open changed nothing), and getrusage.
//!
//! Everything here works on plain bytes and does not use the library's own parser, so that a
//! bug in the parser cannot hide itself.

#![allow(dead_code)]

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
pub const TIB: u64 = 1 << 40;

/// Byte offsets of the header fields.
pub mod off {
    pub const MAGIC: usize = 0;
    pub const CLUSTER_SIZE: usize = 4;
    pub const TABLE_SIZE: usize = 8;
    pub const HEADER_SIZE: usize = 12;
    pub const FEATURES: usize = 16;
    pub const COMPAT: usize = 24;
    pub const AUTOCLEAR: usize = 32;
    pub const L1_OFFSET: usize = 40;
    pub const IMAGE_SIZE: usize = 48;
    pub const BACKING_OFFSET: usize = 56;
    pub const BACKING_SIZE: usize = 60;
}

pub const F_BACKING: u64 = 1;
pub const F_NEED_CHECK: u64 = 2;
pub const F_NO_PROBE: u64 = 4;

pub fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
pub fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}
pub fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
pub fn put_u64(b: &mut [u8], at: u64, v: u64) {
    let at = at as usize;
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// The geometry of a (valid) base image, read from its raw bytes.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub cs: u64,
    pub ts: u64,
    pub header_bytes: u64,
    pub l1: u64,
    /// Entries per table.
    pub n: u64,
}

impl Layout {
    pub fn of(b: &[u8]) -> Layout {
        let cs = get_u32(b, off::CLUSTER_SIZE) as u64;
        let ts = get_u32(b, off::TABLE_SIZE) as u64;
        Layout {
            cs,
            ts,
            header_bytes: get_u32(b, off::HEADER_SIZE) as u64 * cs,
            l1: get_u64(b, off::L1_OFFSET),
            n: ts * cs / 8,
        }
    }
    pub fn table_bytes(&self) -> u64 {
        self.ts * self.cs
    }
    /// Guest bytes mapped by one L2 table.
    pub fn l2_coverage(&self) -> u64 {
        self.n * self.cs
    }
    /// File offset of the L1 entry mapping guest offset `guest`.
    pub fn l1_pos(&self, guest: u64) -> u64 {
        self.l1 + guest / self.l2_coverage() * 8
    }
    pub fn l1_entry(&self, b: &[u8], guest: u64) -> u64 {
        get_u64(b, self.l1_pos(guest) as usize)
    }
    /// File offset of the L2 entry mapping `guest` (the L2 table must exist).
    pub fn l2_pos(&self, b: &[u8], guest: u64) -> u64 {
        let t = self.l1_entry(b, guest);
        assert!(t != 0, "no L2 table maps guest offset {guest:#x}");
        t + (guest / self.cs % self.n) * 8
    }
    pub fn l2_entry(&self, b: &[u8], guest: u64) -> u64 {
        get_u64(b, self.l2_pos(b, guest) as usize)
    }
}

/// Stores `name` as the backing file name right after the 64-byte header and sets the
/// backing-file feature bit (plus `extra_features`).
pub fn set_backing(b: &mut [u8], name: &[u8], extra_features: u64) {
    let f = get_u64(b, off::FEATURES) | F_BACKING | extra_features;
    put_u64(b, off::FEATURES as u64, f);
    put_u32(b, off::BACKING_OFFSET, 64);
    put_u32(b, off::BACKING_SIZE, name.len() as u32);
    b[64..64 + name.len()].copy_from_slice(name);
}

/// A fresh, empty image as raw bytes: `header_size` header clusters, the L1 table right after
/// them, nothing else. For layouts `Image::create` does not produce.
pub fn raw_image(cs: u32, ts: u32, header_size: u32, size: u64) -> Vec<u8> {
    let len = (header_size as u64 + ts as u64) * cs as u64;
    let mut b = vec![0u8; len as usize];
    b[0..4].copy_from_slice(b"QED\0");
    put_u32(&mut b, off::CLUSTER_SIZE, cs);
    put_u32(&mut b, off::TABLE_SIZE, ts);
    put_u32(&mut b, off::HEADER_SIZE, header_size);
    put_u64(
        &mut b,
        off::L1_OFFSET as u64,
        header_size as u64 * cs as u64,
    );
    put_u64(&mut b, off::IMAGE_SIZE as u64, size);
    b
}

/// Writes a header-only image (for geometries whose L1 table is too large to hold in memory):
/// the header bytes, then the file is extended sparsely to `len` bytes.
pub fn write_sparse_image(path: &Path, header: &[u8], len: u64) -> io::Result<()> {
    let f = File::create(path)?;
    f.write_all_at(header, 0)?;
    f.set_len(len)?;
    Ok(())
}

/// Enough of a file to tell whether anything changed: all of it when it is small, else its
/// length and first and last MiB (the corpus only has sparse files above that size, whose
/// metadata lives at the start).
#[derive(Clone, PartialEq, Eq)]
pub struct Fingerprint {
    pub len: u64,
    pub head: Vec<u8>,
    pub tail: Vec<u8>,
}

/// Files up to this size are compared byte for byte.
pub const FULL_COMPARE: u64 = 4 * MIB;

pub fn fingerprint(path: &Path) -> io::Result<Fingerprint> {
    let f = File::open(path)?;
    let len = f.metadata()?.len();
    let read = |at: u64, n: u64| -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; n as usize];
        f.read_exact_at(&mut v, at)?;
        Ok(v)
    };
    if len <= FULL_COMPARE {
        return Ok(Fingerprint {
            len,
            head: read(0, len)?,
            tail: Vec::new(),
        });
    }
    Ok(Fingerprint {
        len,
        head: read(0, MIB)?,
        tail: read(len - MIB, MIB)?,
    })
}

/// Where two fingerprints differ, ignoring the bytes in `ignore` (a range of the head), or None.
pub fn diff(a: &Fingerprint, b: &Fingerprint, ignore: std::ops::Range<usize>) -> Option<String> {
    if a.len != b.len {
        return Some(format!("file length {} -> {}", a.len, b.len));
    }
    let first = |x: &[u8], y: &[u8], base: &str| {
        x.iter()
            .zip(y)
            .enumerate()
            .find(|(i, (p, q))| p != q && !ignore.contains(i))
            .map(|(i, (p, q))| format!("{base} byte {i:#x}: {p:#04x} -> {q:#04x}"))
    };
    first(&a.head, &b.head, "head").or_else(|| first(&a.tail, &b.tail, "last MiB"))
}

/// Peak RSS in KiB and CPU seconds (user + system) of this process so far.
pub fn rusage() -> (u64, f64) {
    let (rss, user, sys) = rusage_split();
    (rss, user + sys)
}

/// Peak RSS in KiB, user and system CPU seconds of this process so far.
pub fn rusage_split() -> (u64, f64, f64) {
    // SAFETY: getrusage writes one rusage struct to the pointer we pass, which is valid.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (ru.ru_maxrss as u64, tv(ru.ru_utime), tv(ru.ru_stime))
}

/// A deterministic fill pattern for guest writes.
pub fn pattern(byte: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| byte ^ (i as u8).wrapping_mul(7)).collect()
}
