// SPDX-License-Identifier: MIT OR Apache-2.0
//! `qed-img map [--output=human|json] [-s START] [-l LEN] FILE`: where each guest range lives,
//! through the backing chain, printed and merged exactly as `qemu-img map` does.

use crate::common::{parse_fmt, parse_size, CliError, CliResult};
use crate::disk::{Disk, OpenMode, Status};
use crate::MapArgs;
use std::io::Write;

/// One printed entry: a status with the file its offset points into.
struct Entry {
    st: Status,
    file: Option<String>,
}

/// qemu-img's `entry_mergeable`.
fn mergeable(a: &Entry, b: &Entry) -> bool {
    a.st.zero == b.st.zero
        && a.st.data == b.st.data
        && a.st.depth == b.st.depth
        && a.st.present == b.st.present
        && a.file == b.file
        && a.st.offset.is_some() == b.st.offset.is_some()
        && match (a.st.offset, b.st.offset) {
            (Some(x), Some(y)) => x + a.st.len == y,
            _ => true,
        }
}

fn b(v: bool) -> &'static str {
    if v {
        "true"
    } else {
        "false"
    }
}

fn dump(e: &Entry, json: bool, has_next: bool, out: &mut impl Write) -> std::io::Result<()> {
    if json {
        write!(
            out,
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": false",
            e.st.start,
            e.st.len,
            e.st.depth,
            b(e.st.present),
            b(e.st.zero),
            b(e.st.data)
        )?;
        if let Some(o) = e.st.offset {
            write!(out, ", \"offset\": {o}")?;
        }
        out.write_all(b"}")?;
        if has_next {
            out.write_all(b",\n")?;
        }
    } else if e.st.data && !e.st.zero {
        let hex = |v: u64| {
            if v == 0 {
                "0".to_string()
            } else {
                format!("{v:#x}")
            }
        };
        writeln!(
            out,
            "{:<16}{:<16}{:<16}{}",
            hex(e.st.start),
            hex(e.st.len),
            hex(e.st.offset.unwrap_or(0)),
            e.file.as_deref().unwrap_or("")
        )?;
    }
    Ok(())
}

pub(crate) fn run(a: MapArgs) -> CliResult<i32> {
    let fmt = parse_fmt(a.fmt.as_deref())?;
    let json = a.output.json();
    let mode = OpenMode {
        force_share: a.force_share,
        image_opts: a.image_opts.image_opts,
        ..Default::default()
    };
    let disk = Disk::open(&a.file, fmt, &mode)?;
    let size = disk.size()?;
    let start = match &a.start {
        Some(s) => parse_size(s)
            .ok_or_else(|| CliError::new(format!("Invalid start offset specified! '{s}'")))?,
        None => 0,
    };
    let end = match &a.length {
        Some(s) => {
            let l = parse_size(s)
                .ok_or_else(|| CliError::new(format!("Invalid max length specified! '{s}'")))?;
            start.saturating_add(l).min(size)
        }
        None => size,
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let io = |e: std::io::Error| CliError::new(format!("writing output: {e}"));
    if json {
        out.write_all(b"[").map_err(io)?;
    } else {
        writeln!(
            out,
            "{:<16}{:<16}{:<16}File",
            "Offset", "Length", "Mapped to"
        )
        .map_err(io)?;
    }
    let mut cur: Option<Entry> = None;
    let mut pos = start;
    while pos < end {
        // qemu-img probes at most 1 GiB at a time.
        let n = (end - pos).min(1 << 30);
        let st = disk.status(pos, n)?;
        pos += st.len;
        let next = Entry {
            file: st.layer.map(|l| disk.layers[l].path().to_string()),
            st,
        };
        match &mut cur {
            Some(c) if mergeable(c, &next) => c.st.len += next.st.len,
            _ => {
                if let Some(c) = cur.take() {
                    dump(&c, json, true, &mut out).map_err(io)?;
                }
                cur = Some(next);
            }
        }
    }
    // qemu-img dumps its last entry even when nothing was mapped (an empty entry).
    let last = cur.take().unwrap_or(Entry {
        st: Status {
            start,
            len: 0,
            depth: 0,
            present: false,
            zero: false,
            data: false,
            offset: None,
            layer: None,
        },
        file: None,
    });
    dump(&last, json, false, &mut out).map_err(io)?;
    if json {
        out.write_all(b"]\n").map_err(io)?;
    }
    out.flush().map_err(io)?;
    drop(out);
    disk.close()?;
    Ok(0)
}
