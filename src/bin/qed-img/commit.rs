// SPDX-License-Identifier: MIT OR Apache-2.0
//! `qed-img commit [-p] [-d] FILE`: writes every cluster the overlay holds (data, and zero
//! clusters as zeros) into its backing file, raw or QED, growing the backing file to the
//! overlay's size if it is shorter. The overlay is left as it is (qemu-img cannot empty a QED
//! overlay either).

use crate::common::{parse_fmt, path_combine, CliError, CliResult, Fmt, Progress};
use crate::disk::{Disk, Layer, OpenMode};
use crate::CommitArgs;
use qed::{ExtentKind, Storage};

const CHUNK: u64 = 2 << 20;

pub(crate) fn run(a: CommitArgs) -> CliResult<i32> {
    let fmt = parse_fmt(a.fmt.as_deref())?;
    let top = Disk::open(
        &a.file,
        fmt,
        &OpenMode {
            no_backing: true,
            ..Default::default()
        },
    )?;
    let Some(img) = top.image().cloned() else {
        return Err(CliError::new(format!(
            "{}: Image does not have a backing file",
            a.file
        )));
    };
    let info = img
        .info()
        .map_err(|e| CliError::new(format!("{}: {e}", a.file)))?;
    let Some(name) = info.backing_file.clone() else {
        return Err(CliError::new(format!(
            "{}: Image does not have a backing file",
            a.file
        )));
    };
    let bpath = path_combine(&a.file, &name);
    let bfmt = match info.backing_format {
        Some(qed::BackingFormat::Raw) => Some(Fmt::Raw),
        Some(qed::BackingFormat::Qed) => Some(Fmt::Qed),
        _ => None,
    };
    let base = Disk::open(
        &bpath,
        bfmt,
        &OpenMode {
            writable: true,
            ..Default::default()
        },
    )?;
    let size = img.size();
    if base.size()? < size {
        match base.top() {
            Layer::Qed { img: b, path } => b
                .truncate(size)
                .map_err(|e| CliError::new(format!("{path}: {e}")))?,
            Layer::Raw { file, path } => file
                .storage
                .set_len(size)
                .map_err(|e| CliError::new(format!("{path}: {e}")))?,
        }
    }
    let extents = img
        .map(0, size)
        .map_err(|e| CliError::new(format!("{}: {e}", a.file)))?;
    let work: u64 = extents
        .iter()
        .filter(|e| e.kind != ExtentKind::Unallocated)
        .map(|e| e.length)
        .sum();
    let progress = Progress::new(a.progress && !a.quiet, work);
    let mut buf = vec![0u8; CHUNK as usize];
    for e in &extents {
        match e.kind {
            ExtentKind::Unallocated => {}
            ExtentKind::Zero => {
                base.write_zeroes(e.offset, e.length)?;
                progress.inc(e.length);
            }
            ExtentKind::Data { .. } => {
                let mut pos = e.offset;
                let end = e.offset + e.length;
                while pos < end {
                    let n = (end - pos).min(CHUNK) as usize;
                    top.read_at(pos, &mut buf[..n])?;
                    base.write_at(pos, &buf[..n])?;
                    pos += n as u64;
                    progress.inc(n as u64);
                }
            }
        }
    }
    progress.finish();
    drop(progress);
    base.flush()?;
    base.close()?;
    drop(img);
    top.close()?;
    if !a.quiet {
        println!("Image committed.");
    }
    Ok(0)
}
