// SPDX-License-Identifier: MIT OR Apache-2.0
//! `qed-img stream [-p] FILE`: copies every cluster the overlay lacks from its backing chain
//! (zeros as zero clusters), then removes the backing file from the header
//! ([`qed::Image::stream`]). With `-p`, progress lines as qemu-img's `-p` prints them.

use crate::common::{parse_fmt, CliError, CliResult, Fmt, Progress};
use crate::StreamArgs;
use qed::{Image, OpenOptions};

pub(crate) fn run(a: StreamArgs) -> CliResult<i32> {
    if let Some(f) = parse_fmt(a.fmt.as_deref())? {
        if f != Fmt::Qed {
            return Err(CliError::new(format!(
                "{}: only qed images have a backing file to stream",
                a.file
            )));
        }
    }
    let img = Image::open(&a.file, &OpenOptions::read_write())
        .map_err(|e| CliError::new(format!("Could not open '{}': {e}", a.file)))?;
    let shown = Progress::new(a.progress && !a.quiet, img.size());
    let r = img.stream(&shown.library());
    shown.finish();
    r.map_err(|e| CliError::new(format!("{}: {e}", a.file)))?;
    img.close()
        .map_err(|e| CliError::new(format!("{}: {e}", a.file)))?;
    Ok(0)
}
