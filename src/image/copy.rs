// SPDX-License-Identifier: MIT OR Apache-2.0
//! Copying one guest view into another (`qemu-img convert`'s core): walks the source by block
//! status, reads data in 2 MiB buffers, finds zeros in 512-byte sectors with qemu-img's minimum
//! run and alignment rules, and issues the same writes in the same order, so that a QED target
//! allocates its clusters and tables where qemu-img's would be. Zero runs are not written to a
//! target that already reads as zeros.
//!
//! Sources and targets are traits so that callers can copy from and to what the library does
//! not open itself (`qed-img` copies raw files this way); [`Image`] implements both.

use super::{Backing, ExtentKind, Image, Progress};
use crate::error::{Error, Result};

const SECTOR: u64 = 512;
/// qemu-img's IO_BUF_SIZE in sectors.
const BUF_SECTORS: u64 = (2 << 20) / SECTOR;
/// BDRV_REQUEST_MAX_SECTORS.
const REQUEST_MAX_SECTORS: u64 = (i32::MAX as u64) >> 9;
const WHAT: &str = "copy";

/// What a range of a source holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyStatus {
    /// The range reads as zeros.
    pub zero: bool,
    /// Bytes from the offset asked for that share this state (at least 1).
    pub len: u64,
    /// The range is left to the target's backing file, which holds the same bytes: nothing is
    /// written there (qemu-img convert -B's "backing file" state).
    pub from_backing: bool,
}

/// A guest view to copy from. `E` is the caller's error type (it must hold the library's).
pub trait CopySource<E = Error> {
    /// Bytes to copy.
    fn size(&self) -> u64;
    /// What `[offset, offset + len)` starts with, and how far that reaches (at most `len`).
    fn status(&self, offset: u64, len: u64) -> std::result::Result<CopyStatus, E>;
    /// Reads guest bytes; past the end they read as zeros.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::result::Result<(), E>;
    /// The granularity of the source's allocation in bytes (its cluster size; 512 for raw):
    /// status ranges are cut to it so that writes line up with the source's clusters.
    fn alignment(&self) -> u64 {
        SECTOR
    }
}

/// A guest view to copy into.
pub trait CopyTarget<E = Error> {
    /// Writes guest bytes.
    fn write_at(&self, offset: u64, buf: &[u8]) -> std::result::Result<(), E>;
    /// Makes a range read as zeros.
    fn write_zeroes(&self, offset: u64, len: u64) -> std::result::Result<(), E>;
}

/// How to copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyOptions {
    /// Zero runs of at least this many bytes (a multiple of 512, at most 16 MiB) are not
    /// written as data; 0 writes everything, zeros included (a fully allocated target).
    /// qemu-img's `-S`, default 4096.
    pub min_sparse: u64,
    /// The target already reads as zeros (a new image): zero runs are skipped rather than
    /// written as zeros.
    pub zero_init: bool,
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            min_sparse: 4096,
            zero_init: false,
        }
    }
}

/// Copies `src`'s guest view into `dst` (which must be at least as large), reporting bytes
/// walked to `progress` and stopping between steps (of at most 2 MiB of data) with
/// [`Error::Cancelled`] when cancelled. The target is not flushed: the caller flushes or closes
/// it, whether the copy completed or stopped; what was written by then is a valid prefix of
/// the work (each write whole).
pub fn copy<E: From<Error>>(
    src: &dyn CopySource<E>,
    dst: &dyn CopyTarget<E>,
    opts: &CopyOptions,
    progress: &Progress,
) -> std::result::Result<(), E> {
    if opts.min_sparse % SECTOR != 0 || opts.min_sparse > 16 << 20 {
        return Err(Error::InvalidArgument {
            what: "min_sparse",
            value: opts.min_sparse,
            reason: "not a multiple of 512 up to 16 MiB".into(),
        }
        .into());
    }
    let min_sparse = opts.min_sparse / SECTOR;
    let size = src.size();
    let src_alignment = (src.alignment() / SECTOR).max(1);
    let alignment = if min_sparse == 0 {
        1
    } else {
        1u64 << (63 - min_sparse.leading_zeros())
    };
    let total = size.div_ceil(SECTOR);
    progress.update(WHAT, 0, size)?;
    let mut buf = vec![0u8; (BUF_SECTORS.min(total) * SECTOR) as usize];
    let mut sector = 0u64;
    let mut next_status = 0u64;
    let mut zero_status = false;
    let mut backing_status = false;
    while sector < total {
        // convert_iteration_sectors
        let mut n = (total - sector).min(REQUEST_MAX_SECTORS);
        if next_status <= sector {
            let st = src.status(sector * SECTOR, n * SECTOR)?;
            n = st.len.div_ceil(SECTOR);
            let tail = (sector + n) % src_alignment;
            if n > tail {
                n -= tail;
            }
            zero_status = st.zero;
            backing_status = st.from_backing;
            next_status = sector + n;
        }
        n = n.min(next_status - sector);
        if backing_status {
            sector += n;
            progress.update(WHAT, (sector * SECTOR).min(size), size)?;
            continue;
        }
        if !zero_status {
            n = n.min(BUF_SECTORS);
        }
        // convert_co_write
        if !zero_status {
            let chunk = &mut buf[..(n * SECTOR) as usize];
            src.read_at(sector * SECTOR, chunk)?;
            let mut s = sector;
            let mut off = 0usize;
            let mut left = n as usize;
            while left > 0 {
                let (data, m) = if min_sparse == 0 {
                    (true, left)
                } else {
                    is_allocated_sectors_min(
                        &chunk[off * 512..],
                        left,
                        min_sparse as usize,
                        s,
                        alignment,
                    )
                };
                if data {
                    dst.write_at(s * SECTOR, &chunk[off * 512..(off + m) * 512])?;
                } else if !opts.zero_init {
                    dst.write_zeroes(s * SECTOR, m as u64 * SECTOR)?;
                }
                s += m as u64;
                off += m;
                left -= m;
            }
        } else if min_sparse == 0 {
            // Fully allocated output: zeros written as data.
            buf.fill(0);
            let mut s = sector;
            let end = sector + n;
            while s < end {
                let m = (end - s).min(BUF_SECTORS);
                dst.write_at(s * SECTOR, &buf[..(m * SECTOR) as usize])?;
                s += m;
            }
        } else if !opts.zero_init {
            dst.write_zeroes(sector * SECTOR, n * SECTOR)?;
        }
        sector += n;
        progress.update(WHAT, (sector * SECTOR).min(size), size)?;
    }
    Ok(())
}

fn sector_is_zero(buf: &[u8], i: usize) -> bool {
    // OR-folding a fixed-size block vectorises.
    buf[i * 512..(i + 1) * 512].iter().fold(0u8, |a, &b| a | b) == 0
}

/// qemu-img's `is_allocated_sectors`: whether the first sector of `buf` holds data, and how many
/// sectors share its state, with the end moved to an `alignment` boundary where that saves a
/// read-modify-write.
fn is_allocated_sectors(buf: &[u8], n: usize, sector_num: u64, alignment: u64) -> (bool, usize) {
    if n == 0 {
        return (false, 0);
    }
    let mut zero = sector_is_zero(buf, 0);
    let mut i = 1;
    while i < n && sector_is_zero(buf, i) == zero {
        i += 1;
    }
    if i == n {
        return (!zero, i);
    }
    let tail = ((sector_num + i as u64) & (alignment - 1)) as usize;
    if tail != 0 {
        if zero && i <= tail {
            zero = false;
        }
        if !zero {
            i = (i + alignment as usize - tail).min(n);
        } else {
            i -= tail;
        }
    }
    (!zero, i)
}

/// qemu-img's `is_allocated_sectors_min`: like the above, but a data run swallows zero runs
/// shorter than `min` sectors.
fn is_allocated_sectors_min(
    buf: &[u8],
    n: usize,
    min: usize,
    sector_num: u64,
    alignment: u64,
) -> (bool, usize) {
    let min = min.min(n);
    let (ret, p) = is_allocated_sectors(buf, n, sector_num, alignment);
    if !ret {
        return (false, p);
    }
    let mut used = p;
    let mut checked = p;
    let mut off = p;
    let mut left = n - p;
    let mut sector = sector_num + p as u64;
    while left > 0 {
        let (ret, p) = is_allocated_sectors(&buf[off * 512..], left, sector, alignment);
        off += p;
        left -= p;
        sector += p as u64;
        checked += p;
        if ret {
            used = checked;
        } else if p >= min {
            break;
        }
    }
    (true, used)
}

/// What the chain under `img` holds at `offset` (`len` > 0, inside `img`).
fn chain_status(img: &Image, offset: u64, len: u64) -> Result<CopyStatus> {
    let e = img.block_status(offset, len)?;
    let zero = match e.kind {
        ExtentKind::Data { .. } => false,
        ExtentKind::Zero => true,
        ExtentKind::Unallocated => match img.backing() {
            None => true,
            Some(Backing::Qed(b)) => {
                if offset >= b.size() {
                    true
                } else {
                    let st = chain_status(&b, offset, e.length.min(b.size() - offset))?;
                    return Ok(st);
                }
            }
            Some(Backing::Raw(s)) => {
                // Holes of a raw backing file read as zeros (SEEK_DATA where the storage knows).
                match s.data_from(offset) {
                    Ok(None) => true,
                    Ok(Some(d)) if d > offset => {
                        return Ok(CopyStatus {
                            zero: true,
                            len: (d - offset).min(e.length),
                            from_backing: false,
                        })
                    }
                    _ => false,
                }
            }
        },
    };
    Ok(CopyStatus {
        zero,
        len: e.length,
        from_backing: false,
    })
}

/// The image's guest view, through its backing chain.
impl CopySource for Image {
    fn size(&self) -> u64 {
        Image::size(self)
    }
    fn status(&self, offset: u64, len: u64) -> Result<CopyStatus> {
        chain_status(self, offset, len.min(Image::size(self) - offset))
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let inside = Image::size(self)
            .saturating_sub(offset)
            .min(buf.len() as u64) as usize;
        buf[inside..].fill(0);
        if inside > 0 {
            Image::read_at(self, offset, &mut buf[..inside])?;
        }
        Ok(())
    }
    fn alignment(&self) -> u64 {
        self.geometry().cluster_bytes()
    }
}

impl CopyTarget for Image {
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        Image::write_at(self, offset, buf)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        Image::write_zeroes(self, offset, len)
    }
}

impl Image {
    /// Copies this image's guest view (through its backing chain) into `dst`, which must be
    /// writable and at least as large, as [`copy`] does with the default options (zero runs of
    /// 4 KiB or more are not written as data; skipped entirely when `dst` has no backing file
    /// and nothing allocated, as a new image). Then flushes `dst`, whether the copy completed
    /// or was cancelled ([`Error::Cancelled`]; `dst` then holds a part of the copy and is a
    /// valid image).
    pub fn copy_to(&self, dst: &Image, progress: &Progress) -> Result<()> {
        self.check_usable()?;
        dst.check_writable()?;
        if dst.size() < self.size() {
            return Err(Error::InvalidArgument {
                what: "dst",
                value: dst.size(),
                reason: format!(
                    "the target ({} bytes) is smaller than the source ({} bytes)",
                    dst.size(),
                    self.size()
                ),
            });
        }
        let zero_init = dst.backing().is_none()
            && dst
                .map(0, dst.size())?
                .iter()
                .all(|e| e.kind == ExtentKind::Unallocated);
        let opts = CopyOptions {
            zero_init,
            ..CopyOptions::default()
        };
        let r = copy(self, dst, &opts, progress);
        let f = dst.flush();
        r.and(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(sectors: &[u8]) -> Vec<u8> {
        sectors.iter().flat_map(|&s| vec![s; 512]).collect()
    }

    #[test]
    fn small_zero_runs_join_data() {
        // data, 3 zero sectors, data: one write.
        let b = buf(&[1, 0, 0, 0, 1, 1, 1, 1]);
        assert_eq!(is_allocated_sectors_min(&b, 8, 8, 0, 8), (true, 8));
    }

    #[test]
    fn long_zero_run_splits() {
        let mut s = vec![1u8; 8];
        s.extend(vec![0u8; 16]);
        s.extend(vec![1u8; 8]);
        let b = buf(&s);
        assert_eq!(is_allocated_sectors_min(&b, 32, 8, 0, 8), (true, 8));
        assert_eq!(
            is_allocated_sectors_min(&b[8 * 512..], 24, 8, 8, 8),
            (false, 16)
        );
    }

    #[test]
    fn all_zero() {
        let b = buf(&[0; 16]);
        assert_eq!(is_allocated_sectors_min(&b, 16, 8, 0, 8), (false, 16));
    }

    /// A source whose middle third is left to the target's backing file, the rest data.
    struct ThirdsFromBacking;
    impl CopySource for ThirdsFromBacking {
        fn size(&self) -> u64 {
            3 << 20
        }
        fn status(&self, offset: u64, len: u64) -> Result<CopyStatus> {
            let third = offset >> 20;
            Ok(CopyStatus {
                zero: false,
                len: (((third + 1) << 20) - offset).min(len),
                from_backing: third == 1,
            })
        }
        fn read_at(&self, _offset: u64, buf: &mut [u8]) -> Result<()> {
            buf.fill(0x5a);
            Ok(())
        }
        fn alignment(&self) -> u64 {
            512
        }
    }

    /// Records the ranges written.
    struct Writes(std::sync::Mutex<Vec<(u64, u64)>>);
    impl CopyTarget for Writes {
        fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
            self.0.lock().unwrap().push((offset, buf.len() as u64));
            Ok(())
        }
        fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
            self.0.lock().unwrap().push((offset, len));
            Ok(())
        }
    }

    #[test]
    fn ranges_from_backing_are_not_written() {
        let w = Writes(std::sync::Mutex::new(Vec::new()));
        copy(
            &ThirdsFromBacking,
            &w,
            &CopyOptions::default(),
            &Progress::new(),
        )
        .unwrap();
        let writes = w.0.into_inner().unwrap();
        assert_eq!(writes, vec![(0, 1 << 20), (2 << 20, 1 << 20)]);
    }
}
