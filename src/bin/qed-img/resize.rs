// SPDX-License-Identifier: MIT OR Apache-2.0
//! `qed-img resize [-f FMT] [--shrink] FILE [+|-]SIZE`: QED images grow only (a header rewrite);
//! raw files may also shrink with `--shrink`.

use crate::common::{io_msg, parse_fmt, parse_size, CliError, CliResult};
use crate::disk::{Disk, Layer, OpenMode};
use crate::ResizeArgs;
use qed::Storage;

pub(crate) fn run(a: ResizeArgs) -> CliResult<i32> {
    let fmt = parse_fmt(a.fmt.as_deref())?;
    let (rel, num) = match a.size.as_bytes().first() {
        Some(b'+') => (1i8, &a.size[1..]),
        Some(b'-') => (-1i8, &a.size[1..]),
        _ => (0i8, a.size.as_str()),
    };
    let n = parse_size(num).ok_or_else(|| CliError::new("Invalid size specified."))?;
    let disk = Disk::open(
        &a.file,
        fmt,
        &OpenMode {
            writable: true,
            ..Default::default()
        },
    )?;
    let old = disk.size()?;
    let new = match rel {
        1 => old
            .checked_add(n)
            .ok_or_else(|| CliError::new("Invalid size specified."))?,
        -1 => old
            .checked_sub(n)
            .ok_or_else(|| CliError::new("New image size must be positive"))?,
        _ => n,
    };
    if new < old && !a.shrink {
        return Err(CliError::new(
            "Use the --shrink option to perform a shrink operation.",
        ));
    }
    match disk.top() {
        Layer::Qed { img, path } => {
            if new < old {
                return Err(CliError::new(format!(
                    "{path}: Shrinking images is currently not supported (QED cannot give clusters back)"
                )));
            }
            img.truncate(new)
                .map_err(|e| CliError::new(format!("{path}: {e}")))?;
        }
        Layer::Raw { file, path } => {
            file.storage
                .set_len(new)
                .map_err(|e| CliError::new(format!("{path}: {}", io_msg(&e))))?;
        }
    }
    disk.flush()?;
    disk.close()?;
    if !a.quiet {
        println!("Image resized.");
    }
    Ok(0)
}
