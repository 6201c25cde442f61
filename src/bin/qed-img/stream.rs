// SPDX-License-Identifier: MIT OR Apache-2.0
//! `qed-img stream [-p] FILE`: copies every cluster the overlay lacks from its backing chain
//! (zeros as zero clusters), then removes the backing file from the header
//! ([`qed::Image::stream`]). With `-p`, progress lines as qemu-img's `-p` prints them.

use crate::common::{parse_fmt, CliError, CliResult, Fmt};
use crate::StreamArgs;
use qed::image::Progress;
use qed::{Image, OpenOptions};
use std::io::Write;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};

/// One progress line as qemu-img prints it: on stdout, overwritten in place by the next.
fn print_progress(pct: f64) {
    let mut out = std::io::stdout().lock();
    let _ = write!(out, "    ({pct:.2}/100%)\r");
    let _ = out.flush();
}

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
    let show = a.progress && !a.quiet;
    // Hundredths of a percent last printed (qemu-img prints a line per 1% step).
    let last = AtomicU64::new(u64::MAX);
    let progress = Progress::with_callback(move |done, total| {
        if show {
            let hundredths = (done as u128 * 10_000 / total.max(1) as u128) as u64;
            let prev = last.load(Ordering::Relaxed);
            if prev == u64::MAX
                || hundredths >= prev + 100
                || (hundredths == 10_000 && prev != 10_000)
            {
                last.store(hundredths, Ordering::Relaxed);
                print_progress(hundredths as f64 / 100.0);
            }
        }
        ControlFlow::Continue(())
    });
    let r = img.stream(&progress);
    if show {
        println!();
    }
    r.map_err(|e| CliError::new(format!("{}: {e}", a.file)))?;
    img.close()
        .map_err(|e| CliError::new(format!("{}: {e}", a.file)))?;
    Ok(0)
}
