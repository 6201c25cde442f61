// SPDX-License-Identifier: MIT OR Apache-2.0
//! `qed-img commit [-p] [-d] FILE`: writes every cluster the overlay holds (data, and zero
//! clusters as zeros) into its backing file, raw or QED, growing the backing file to the
//! overlay's size if it is shorter. The overlay is left as it is (qemu-img cannot empty a QED
//! overlay either).

use crate::common::{parse_fmt, CliError, CliResult, Progress};
use crate::disk::{Disk, OpenMode};
use crate::CommitArgs;
use qed::OpenOptions;

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
        .map_err(|e| CliError::new(format!("{}: {e}", a.file)))?;
    progress.finish();
    drop(progress);
    drop(img);
    top.close()?;
    if !a.quiet {
        println!("Image committed.");
    }
    Ok(0)
}
