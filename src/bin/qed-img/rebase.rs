// SPDX-License-Identifier: MIT OR Apache-2.0
//! `qed-img rebase [-u] -b BACKING [-F FMT] [-p] FILE`: `-u` rewrites the header only; without
//! it, every cluster the image does not hold itself and whose contents differ between the old
//! and the new backing file is first copied into the image (zeros as zero clusters).

use crate::common::{is_zero, parse_fmt, path_combine, probe, CliError, CliResult, Fmt, Progress};
use crate::create::backing_format;
use crate::disk::{Disk, OpenMode};
use crate::RebaseArgs;
use qed::ExtentKind;
use std::path::Path;

/// Copy granularity: whole clusters, up to this many bytes at a time.
const CHUNK: u64 = 2 << 20;

pub(crate) fn run(a: RebaseArgs) -> CliResult<i32> {
    let fmt = parse_fmt(a.fmt.as_deref())?;
    if fmt == Some(Fmt::Raw) {
        return Err(CliError::new(format!(
            "Could not change the backing file of '{}': raw images have no backing file",
            a.file
        )));
    }
    let backing = a
        .backing
        .clone()
        .ok_or_else(|| CliError::new("Must specify backing file (-b) or use unsafe mode (-u)"))?;
    let name = (!backing.is_empty()).then_some(backing);
    let new_fmt = parse_fmt(a.backing_fmt.as_deref())?;
    if name.is_none() && new_fmt.is_some() {
        return Err(CliError::new("-F given without a backing file"));
    }
    let new_path = name.as_deref().map(|n| path_combine(&a.file, n));

    if a.unsafe_ {
        let disk = Disk::open(
            &a.file,
            fmt,
            &OpenMode {
                writable: true,
                no_backing: true,
                ..Default::default()
            },
        )?;
        let Some(img) = disk.image() else {
            return Err(CliError::new(format!(
                "{}: raw images have no backing file",
                a.file
            )));
        };
        // Without -F, record the probed format when the file is there (as qemu-img warns and
        // probes); a missing file stays unprobed.
        let f = match (new_fmt, &new_path) {
            (Some(f), _) => Some(f),
            (None, Some(p)) if Path::new(p).exists() => probe(Path::new(p)).ok(),
            _ => None,
        };
        img.change_backing_file(name.as_deref(), f.map(backing_format))
            .map_err(|e| {
                CliError::new(format!(
                    "Could not change the backing file to '{}': {e}",
                    name.as_deref().unwrap_or("")
                ))
            })?;
        disk.close()?;
        return Ok(0);
    }

    let disk = Disk::open(
        &a.file,
        fmt,
        &OpenMode {
            writable: true,
            ..Default::default()
        },
    )?;
    let Some(img) = disk.image().cloned() else {
        return Err(CliError::new(format!(
            "{}: raw images have no backing file",
            a.file
        )));
    };
    let new = match &new_path {
        Some(p) => Some(
            Disk::open(
                p,
                new_fmt,
                &OpenMode {
                    force_share: true,
                    ..Default::default()
                },
            )
            .map_err(|e| {
                CliError::new(format!("Could not open new backing file '{p}': {}", e.msg))
            })?,
        ),
        None => None,
    };
    let new_fmt = new.as_ref().map(|d| d.fmt);
    let size = img.size();
    let cs = img.geometry().cluster_bytes();
    let chunk_max = CHUNK.max(cs);
    let extents = img
        .map(0, size)
        .map_err(|e| CliError::new(format!("{}: {e}", a.file)))?;
    let to_check: u64 = extents
        .iter()
        .filter(|e| e.kind == ExtentKind::Unallocated)
        .map(|e| e.length)
        .sum();
    let progress = Progress::new(a.progress && !a.quiet, to_check);
    let mut old_buf = vec![0u8; chunk_max as usize];
    let mut new_buf = vec![0u8; chunk_max as usize];
    // Only the old chain matters where it is visible: clusters this image does not hold.
    if disk.layers.len() > 1 || new.is_some() {
        for e in extents.iter().filter(|e| e.kind == ExtentKind::Unallocated) {
            let mut pos = e.offset;
            let end = e.offset + e.length;
            while pos < end {
                // Skip ranges that read as zeros through both chains without reading them.
                let old_st = disk.status(pos, end - pos)?;
                let new_zero_len = match &new {
                    None => Some(end - pos),
                    Some(d) => {
                        let nsize = d.size()?;
                        if pos >= nsize {
                            Some(end - pos)
                        } else {
                            let st = d.status(pos, (end - pos).min(nsize - pos))?;
                            st.zero.then_some(st.len)
                        }
                    }
                };
                if let (true, Some(nl)) = (old_st.zero, new_zero_len) {
                    let skip = old_st.len.min(nl);
                    pos += skip;
                    progress.inc(skip);
                    continue;
                }
                let n = (end - pos).min(chunk_max - (pos % cs));
                let nb = n as usize;
                disk.read_at(pos, &mut old_buf[..nb])?;
                match &new {
                    Some(d) => d.read_at(pos, &mut new_buf[..nb])?,
                    None => new_buf[..nb].fill(0),
                }
                // Cluster by cluster: copy the ones that differ.
                // As qemu-img: each run of differing clusters is one write (so its clusters
                // land next to each other in the file), and zeros are written as zeros only
                // when the whole chunk read from the old chain is zeros.
                let old_zero = is_zero(&old_buf[..nb]);
                let cluster_end = |p: u64| ((p / cs + 1) * cs).min(pos + n);
                let differs = |p: u64| {
                    let r = (p - pos) as usize..(cluster_end(p) - pos) as usize;
                    old_buf[r.clone()] != new_buf[r]
                };
                let mut p = pos;
                while p < pos + n {
                    let mut run_end = cluster_end(p);
                    let same = !differs(p);
                    while run_end < pos + n && differs(run_end) != same {
                        run_end = cluster_end(run_end);
                    }
                    if !same {
                        if old_zero {
                            disk.write_zeroes(p, run_end - p)?;
                        } else {
                            disk.write_at(
                                p,
                                &old_buf[(p - pos) as usize..(run_end - pos) as usize],
                            )?;
                        }
                    }
                    p = run_end;
                }
                pos += n;
                progress.inc(n);
            }
        }
    }
    progress.finish();
    drop(progress);
    disk.flush()?;
    if let Some(d) = new {
        d.close()?;
    }
    img.change_backing_file(name.as_deref(), new_fmt.map(backing_format))
        .map_err(|e| {
            CliError::new(format!(
                "Could not change the backing file to '{}': {e}",
                name.as_deref().unwrap_or("")
            ))
        })?;
    drop(img);
    disk.close()?;
    Ok(0)
}
