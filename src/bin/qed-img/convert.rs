// SPDX-License-Identifier: MIT OR Apache-2.0
//! `qed-img convert [-f FMT] -O raw|qed [-o ...] [-p] [-n] [-S SIZE] SRC DST`.
//!
//! Walks the source the way qemu-img convert does (block status, 2 MiB buffers, zero detection
//! in 512-byte sectors with the same 4 KiB minimum and alignment rules) and issues the same
//! writes in the same order, so that a QED output allocates its clusters and L2 tables where
//! qemu-img's would be and the files come out byte-identical. Zero runs are not written.

use crate::common::{is_zero, parse_fmt, parse_size, CliError, CliResult, Fmt, Progress};
use crate::create::parse_create_opts;
use crate::disk::{create_raw, Disk, OpenMode};
use crate::ConvertArgs;
use qed::{CreateOptions, Image};

const SECTOR: u64 = 512;
/// qemu-img's IO_BUF_SIZE in sectors.
const BUF_SECTORS: u64 = (2 << 20) / SECTOR;
/// BDRV_REQUEST_MAX_SECTORS.
const REQUEST_MAX_SECTORS: u64 = (i32::MAX as u64) >> 9;

fn sector_is_zero(buf: &[u8], i: usize) -> bool {
    is_zero(&buf[i * 512..(i + 1) * 512])
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

#[derive(Clone, Copy, PartialEq, Eq)]
enum Blk {
    Data,
    Zero,
}

pub(crate) fn run(a: ConvertArgs) -> CliResult<i32> {
    let src_fmt = parse_fmt(a.fmt.as_deref())?;
    let out_fmt = parse_fmt(a.out_fmt.as_deref())?.unwrap_or(Fmt::Raw);
    let Some(o) = parse_create_opts(out_fmt, &a.options)? else {
        return Ok(0);
    };
    if o.backing_file.is_some() || o.backing_fmt.is_some() {
        return Err(CliError::new(
            "convert: backing_file and backing_fmt are not supported for the output",
        ));
    }
    let min_sparse: u64 = match &a.sparse {
        None => 8,
        Some(s) => {
            let v = parse_size(s).filter(|v| v % 512 == 0 && *v <= 16 << 20).ok_or_else(|| {
                CliError::new(
                    "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16M.",
                )
            })?;
            v / 512
        }
    };
    let direct = matches!(a.cache.as_deref(), Some("none") | Some("directsync"));
    let src = Disk::open(
        &a.src,
        src_fmt,
        &OpenMode {
            force_share: a.force_share,
            ..Default::default()
        },
    )?;
    let size = src.size()?;
    if !a.no_create {
        if o.size.is_some() {
            return Err(CliError::new(
                "convert: the output size is the source's; drop -o size",
            ));
        }
        match out_fmt {
            Fmt::Raw => create_raw(&a.dst, size)?,
            Fmt::Qed => {
                let mut opts = CreateOptions::new(size);
                if let Some(c) = o.cluster_size {
                    opts.cluster_size = c;
                }
                if let Some(t) = o.table_size {
                    opts.table_size = t;
                }
                Image::create(&a.dst, &opts)
                    .map_err(|e| CliError::new(format!("{}: {e}", a.dst)))?;
            }
        }
    }
    let dst = Disk::open(
        &a.dst,
        Some(out_fmt),
        &OpenMode {
            writable: true,
            direct,
            ..Default::default()
        },
    )?;
    if dst.size()? < size {
        return Err(CliError::new(format!(
            "Output image is too small ({} bytes for a {size}-byte source): {}",
            dst.size()?,
            a.dst
        )));
    }
    // A new target reads as zeros (QED without backing, a fresh raw file): zero runs are left
    // alone. An existing one (-n) gets them zeroed.
    let has_zero_init = !a.no_create;
    let src_alignment = match src.image() {
        Some(img) => (img.geometry().cluster_bytes() / SECTOR).max(1),
        None => 1,
    };
    let alignment = if min_sparse == 0 {
        1
    } else {
        1u64 << (63 - min_sparse.leading_zeros())
    };
    let total = size.div_ceil(SECTOR);
    let progress = Progress::new(a.progress && !a.quiet, total);
    let mut buf = vec![0u8; (BUF_SECTORS * SECTOR) as usize];
    let mut sector = 0u64;
    let mut next_status = 0u64;
    let mut status = Blk::Data;
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
            status = if st.zero { Blk::Zero } else { Blk::Data };
            next_status = sector + n;
        }
        n = n.min(next_status - sector);
        if status == Blk::Data {
            n = n.min(BUF_SECTORS);
        }
        let bytes = (n * SECTOR) as usize;
        // convert_co_write
        match status {
            Blk::Data => {
                let chunk = &mut buf[..bytes];
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
                    } else if !has_zero_init {
                        dst.write_zeroes(s * SECTOR, m as u64 * SECTOR)?;
                    }
                    s += m as u64;
                    off += m;
                    left -= m;
                }
            }
            Blk::Zero => {
                if min_sparse == 0 {
                    // -S 0: fully allocated output, zeros written as data.
                    let mut s = sector;
                    let end = sector + n;
                    let zeros = vec![0u8; (BUF_SECTORS * SECTOR) as usize];
                    while s < end {
                        let m = (end - s).min(BUF_SECTORS);
                        dst.write_at(s * SECTOR, &zeros[..(m * SECTOR) as usize])?;
                        s += m;
                    }
                } else if !has_zero_init {
                    dst.write_zeroes(sector * SECTOR, n * SECTOR)?;
                }
            }
        }
        sector += n;
        progress.set(sector);
    }
    progress.finish();
    drop(progress);
    dst.flush()?;
    dst.close()?;
    src.close()?;
    Ok(0)
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
}
