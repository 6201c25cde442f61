// SPDX-License-Identifier: MIT OR Apache-2.0
//! `qed-img dd [-f FMT] [-O OUTPUT_FMT] [-U] [bs=N] [count=N] [skip=N] if=INPUT of=OUTPUT`:
//! qemu-img dd's copy of guest bytes into a new image, block by block.
//!
//! One difference on purpose: `count` is the number of blocks copied after the `skip`ped ones,
//! as dd(1) and qemu-img's manual say; qemu-img 10.0 counts the skipped blocks in it too.

use crate::common::{parse_fmt, parse_size, CliError, CliResult, Fmt};
use crate::disk::{create_raw, Disk, OpenMode};
use crate::DdArgs;
use qed::{CreateOptions, Image};

/// The operands, as parsed from `key=value` words.
struct Operands {
    input: Option<String>,
    output: Option<String>,
    bs: u64,
    count: Option<u64>,
    skip: u64,
}

/// qemu-img's block count: a decimal or 0x number, no size suffix.
fn parse_blocks(key: &str, v: &str) -> CliResult<u64> {
    let n = if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        i128::from_str_radix(h, 16)
    } else {
        v.parse::<i128>()
    }
    .map_err(|_| CliError::new(format!("Invalid {key} specified: '{v}'.")))?;
    if !(0..=i64::MAX as i128).contains(&n) {
        return Err(CliError::new(format!(
            "Invalid {key} specified. Must be between 0 and {}.",
            i64::MAX
        )));
    }
    Ok(n as u64)
}

fn parse_operands(words: &[String]) -> CliResult<Operands> {
    let mut o = Operands {
        input: None,
        output: None,
        bs: 512,
        count: None,
        skip: 0,
    };
    for w in words {
        let Some((k, v)) = w.split_once('=') else {
            return Err(CliError::new(format!("unrecognized operand {w}")));
        };
        match k {
            "if" => o.input = Some(v.to_string()),
            "of" => o.output = Some(v.to_string()),
            "bs" => {
                let n = parse_size(v)
                    .ok_or_else(|| CliError::new(format!("Invalid bs specified: '{v}'.")))?;
                if n == 0 || n > i32::MAX as u64 {
                    return Err(CliError::new(format!(
                        "Invalid bs specified. Must be between 1 and {}.",
                        i32::MAX
                    )));
                }
                o.bs = n;
            }
            "count" => o.count = Some(parse_blocks("count", v)?),
            "skip" => o.skip = parse_blocks("skip", v)?,
            _ => return Err(CliError::new(format!("unrecognized operand {k}"))),
        }
    }
    Ok(o)
}

pub(crate) fn run(a: DdArgs) -> CliResult<i32> {
    let ops = parse_operands(&a.operands)?;
    let (Some(input), Some(output)) = (ops.input, ops.output) else {
        return Err(CliError::new("Must specify both input and output files"));
    };
    let in_fmt = parse_fmt(a.fmt.as_deref())?;
    let out_fmt = parse_fmt(a.out_fmt.as_deref())?.unwrap_or(Fmt::Raw);
    let src = Disk::open(
        &input,
        in_fmt,
        &OpenMode::source(a.force_share, a.image_opts.image_opts),
    )?;
    let len = src.size()?;
    // Skipping past the end gives an empty output, with a warning (as dd(1)).
    let start = ops.skip.checked_mul(ops.bs).filter(|&s| s <= len);
    if start.is_none() {
        eprintln!(
            "{}: {input}: cannot skip to specified offset",
            crate::common::prog_name()
        );
    }
    let start = start.unwrap_or(len);
    let end = match ops.count.and_then(|c| c.checked_mul(ops.bs)) {
        Some(n) => start.saturating_add(n).min(len),
        None => len,
    };
    let create_err =
        |e: String| CliError::new(format!("{output}: error while creating output image: {e}"));
    match out_fmt {
        Fmt::Raw => create_raw(&output, end - start).map_err(|e| create_err(e.msg))?,
        Fmt::Qed => Image::create(&output, &CreateOptions::new(end - start))
            .map_err(|e| create_err(e.to_string()))?,
    }
    let dst = Disk::open(
        &output,
        Some(out_fmt),
        &OpenMode {
            writable: true,
            ..Default::default()
        },
    )?;
    let mut buf = vec![0u8; ops.bs as usize];
    let mut pos = start;
    while pos < end {
        let n = (end - pos).min(ops.bs) as usize;
        src.read_at(pos, &mut buf[..n])?;
        dst.write_at(pos - start, &buf[..n])?;
        pos += n as u64;
    }
    dst.flush()?;
    dst.close()?;
    src.close()?;
    Ok(0)
}
