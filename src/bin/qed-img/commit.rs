// SPDX-License-Identifier: MIT OR Apache-2.0
//! `qed-img commit [-p] [-d] FILE`: writes every cluster the overlay holds (data, and zero
//! clusters as zeros) into its backing file, raw or QED, growing the backing file to the
//! overlay's size if it is shorter. The overlay is left as it is (qemu-img cannot empty a QED
//! overlay either).

use crate::common::{parse_fmt, path_combine, CliError, CliResult, Fmt, Progress};
use crate::disk::{Disk, Layer, OpenMode, RawFile};
use crate::CommitArgs;
use qed::{Backing, OpenOptions};
use std::path::Path;

/// The operating system's words for what failed, if an I/O error did (qemu's strerror).
fn cause(e: &qed::Error) -> String {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return crate::common::io_msg(io);
        }
        cur = err.source();
    }
    e.to_string()
}

/// Whether `name` (as given to -b) names the backing file `layer_path` of `overlay_path`:
/// qemu's bdrv_find_backing_image, a relative name taken relative to the overlay's folder
/// (so `subdir/b.qed` does not name `subdir/top.qed`'s backing file `b.qed`), compared after
/// resolving both paths.
fn names(name: &str, overlay_path: &str, layer_path: &str) -> bool {
    let canon = |p: &str| Path::new(p).canonicalize().ok();
    let wanted = canon(&path_combine(overlay_path, name));
    wanted.is_some() && wanted == canon(layer_path)
}

/// `commit -b BASE`: each image above BASE, from the lowest up, written into BASE, so that
/// BASE ends up reading as the top image over every range one of them holds.
fn commit_to_base(a: &CommitArgs, fmt: Option<Fmt>, base: &str) -> CliResult<i32> {
    let chain = Disk::open(&a.file, fmt, &OpenMode::source(true, false))?;
    let layers: Vec<(String, Fmt)> = chain
        .layers
        .iter()
        .map(|l| {
            let f = match l {
                Layer::Qed { .. } => Fmt::Qed,
                Layer::Raw { .. } => Fmt::Raw,
            };
            (l.path().to_string(), f)
        })
        .collect();
    // Our own read-only hold on the chain would refuse the write: let it go first.
    drop(chain);
    let k = (1..layers.len())
        .find(|&i| names(base, &layers[i - 1].0, &layers[i].0))
        .ok_or_else(|| {
            CliError::new(format!(
                "Did not find '{base}' in the backing chain of '{}'",
                a.file
            ))
        })?;
    let (base_path, base_fmt) = &layers[k];
    let write = OpenMode {
        writable: true,
        no_backing: true,
        ..Default::default()
    };
    let (target, _raw_lock, base_disk) = match base_fmt {
        Fmt::Raw => {
            let (s, lock) = RawFile::open(base_path, &write, true)?.into_shared();
            (Backing::Raw(s), lock, None)
        }
        Fmt::Qed => {
            let d = Disk::open(base_path, Some(Fmt::Qed), &write)?;
            let img = d.image().cloned().expect("a QED disk has an image");
            (Backing::Qed(img), None, Some(d))
        }
    };
    let progress = Progress::new(a.progress && !a.quiet, k as u64);
    for (i, (path, _)) in layers[..k].iter().enumerate().rev() {
        let read = OpenMode {
            no_backing: true,
            ..Default::default()
        };
        let d = Disk::open(path, Some(Fmt::Qed), &read)?;
        let img = d
            .image()
            .cloned()
            .expect("an image with a backing file is QED");
        img.commit_to(&target, &qed::Progress::new())
            .map_err(|e| CliError::new(format!("{path}: {e}")))?;
        drop(img);
        d.close()?;
        progress.set((k - i) as u64);
    }
    progress.finish();
    drop(progress);
    match target {
        Backing::Raw(s) => s
            .flush()
            .map_err(|e| CliError::new(format!("{base_path}: {e}")))?,
        Backing::Qed(img) => {
            drop(img);
            if let Some(d) = base_disk {
                d.close()?;
            }
        }
    }
    if !a.quiet {
        println!("Image committed.");
    }
    Ok(0)
}

pub(crate) fn run(a: CommitArgs) -> CliResult<i32> {
    let fmt = parse_fmt(a.fmt.as_deref())?;
    if let Some(base) = &a.base {
        return commit_to_base(&a, fmt, base);
    }
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
    if info.backing_file.is_none() {
        return Err(CliError::new(format!(
            "{}: Image does not have a backing file",
            a.file
        )));
    }
    let progress = Progress::new(a.progress && !a.quiet, 1);
    // The library opens the backing file read-write, grows it and copies (see Image::commit).
    let opts = OpenOptions::read_write();
    img.commit(&opts, &progress.library())
        .map_err(|e| match e {
            qed::Error::Backing { .. } => CliError::new(format!("{}: {e}", a.file)),
            // Failing once the copy runs: qemu-img's commit job words it so.
            e => CliError::new(format!("Block job failed: {}", cause(&e))),
        })?;
    progress.finish();
    drop(progress);
    drop(img);
    top.close()?;
    if !a.quiet {
        println!("Image committed.");
    }
    Ok(0)
}
