// SPDX-License-Identifier: MIT OR Apache-2.0
//! `qed-img compare [-f FMT] [-F FMT] [-s] [-p] [-q] A B`: exit 0 when the guest contents are the
//! same, 1 with the first differing offset (a 512-byte sector, as qemu-img reports it),
//! 2 when an image cannot be opened, 4 on read errors.

use crate::common::{find_nonzero, parse_fmt, CliError, CliResult, Progress};
use crate::disk::{Disk, OpenMode, Status};
use crate::CompareArgs;

const CHUNK: u64 = 2 << 20;

fn read_err(e: CliError) -> CliError {
    e.with_code(4)
}

fn status(d: &Disk, offset: u64, len: u64) -> CliResult<Status> {
    d.status(offset, len).map_err(|e| {
        CliError::new(format!(
            "Sector allocation test failed for {}: {}",
            d.path, e.msg
        ))
        .with_code(3)
    })
}

/// First sector at which `a` and `b` differ.
fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.chunks(512)
        .zip(b.chunks(512))
        .position(|(x, y)| x != y)
        .map(|i| i * 512)
}

pub(crate) fn run(a: CompareArgs) -> CliResult<i32> {
    let quiet = a.quiet;
    let say = |s: &str| {
        if !quiet {
            println!("{s}");
        }
    };
    let f1 = parse_fmt(a.fmt1.as_deref()).map_err(|e| e.with_code(2))?;
    let f2 = parse_fmt(a.fmt2.as_deref()).map_err(|e| e.with_code(2))?;
    let mode = OpenMode {
        force_share: a.force_share,
        image_opts: a.image_opts.image_opts,
        ..Default::default()
    };
    let d1 = Disk::open(&a.file1, f1, &mode).map_err(|e| e.with_code(2))?;
    let d2 = Disk::open(&a.file2, f2, &mode).map_err(|e| e.with_code(2))?;
    let s1 = d1.size().map_err(|e| e.with_code(4))?;
    let s2 = d2.size().map_err(|e| e.with_code(4))?;
    let common = s1.min(s2);
    let total = s1.max(s2);
    let progress = Progress::new(a.progress && !quiet, total);
    if a.strict && s1 != s2 {
        say("Strict mode: Image size mismatch!");
        return Ok(1);
    }
    let mut buf1 = vec![0u8; CHUNK as usize];
    let mut buf2 = vec![0u8; CHUNK as usize];
    let mut offset = 0u64;
    while offset < common {
        let st1 = status(&d1, offset, s1 - offset)?;
        let st2 = status(&d2, offset, s2 - offset)?;
        let mut chunk = st1.len.min(st2.len).min(common - offset);
        if a.strict
            && (st1.present, st1.zero, st1.data, st1.offset.is_some())
                != (st2.present, st2.zero, st2.data, st2.offset.is_some())
        {
            say(&format!(
                "Strict mode: Offset {offset} block status mismatch!"
            ));
            return Ok(1);
        }
        if !(st1.zero && st2.zero) {
            chunk = chunk.min(CHUNK);
            let n = chunk as usize;
            d1.read_at(offset, &mut buf1[..n]).map_err(read_err)?;
            d2.read_at(offset, &mut buf2[..n]).map_err(read_err)?;
            if let Some(i) = first_diff(&buf1[..n], &buf2[..n]) {
                progress.finish();
                drop(progress);
                say(&format!(
                    "Content mismatch at offset {}!",
                    offset + i as u64
                ));
                return Ok(1);
            }
        }
        offset += chunk;
        progress.set(offset);
    }
    if s1 != s2 {
        say("Warning: Image size mismatch!");
        let (over, size) = if s1 > s2 { (&d1, s1) } else { (&d2, s2) };
        while offset < size {
            let st = status(over, offset, size - offset)?;
            let mut chunk = st.len;
            if st.present && !st.zero {
                chunk = chunk.min(CHUNK);
                let n = chunk as usize;
                over.read_at(offset, &mut buf1[..n]).map_err(read_err)?;
                if let Some(i) = find_nonzero(&buf1[..n]) {
                    progress.finish();
                    drop(progress);
                    say(&format!(
                        "Content mismatch at offset {}!",
                        offset + i as u64
                    ));
                    return Ok(1);
                }
            }
            offset += chunk;
            progress.set(offset);
        }
    }
    progress.finish();
    drop(progress);
    say("Images are identical.");
    d1.close()?;
    d2.close()?;
    Ok(0)
}
