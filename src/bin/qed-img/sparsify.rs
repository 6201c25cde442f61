// SPDX-License-Identifier: MIT OR Apache-2.0
//! `qed-img sparsify [-f qed] [-q] FILE`: punches a hole over every data cluster that reads as
//! zeros (libqed's `Image::sparsify`), in place; entries stay, so the image stays consistent.

use crate::common::{format_of, parse_fmt, CliError, CliResult, Fmt};
use crate::SparsifyArgs;
use qed::{Image, OpenOptions};

pub(crate) fn run(a: SparsifyArgs) -> CliResult<i32> {
    let fmt = format_of(&a.file, parse_fmt(a.fmt.as_deref())?)?;
    if fmt != Fmt::Qed {
        return Err(CliError::new(format!(
            "{}: sparsify works on QED images only (a raw file's zeros are its guest's data)",
            a.file
        )));
    }
    let err = |e: qed::Error| CliError::new(format!("{}: {e}", a.file));
    // Only this image's own clusters are looked at: its backing file is not needed.
    let opts = OpenOptions {
        no_backing: true,
        ..OpenOptions::read_write()
    };
    let img = Image::open(&a.file, &opts).map_err(err)?;
    let cs = img.info().map_err(err)?.cluster_size as u64;
    let punched = img.sparsify().map_err(err)?;
    img.close().map_err(err)?;
    if !a.quiet {
        println!(
            "Sparsified: {punched} zero clusters ({} bytes) given back to the file system.",
            punched * cs
        );
    }
    Ok(0)
}
