// SPDX-License-Identifier: MIT OR Apache-2.0
//! qemu-io's output formats, byte for byte: sizes (`cvtstr`), times (`timestr`), the two-line
//! I/O report and the hex dump. Scripts and QEMU's iotests filter only the numbers of the rate
//! line, so everything else here must match qemu-io 10.0.2 exactly.

use std::io::{IsTerminal, Write};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// Standard output, buffered as C stdio buffers it: by line on a terminal, else until the next
/// prompt or exit. qemu-io's errors on stderr therefore come before its buffered results when
/// both go to one pipe, and scripts (and the iotests' expected outputs) rely on that order.
static OUT: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// Appends to standard output (see [`OUT`]).
pub(crate) fn emit(s: &str) {
    static TTY: OnceLock<bool> = OnceLock::new();
    let mut b = OUT.lock().unwrap_or_else(|p| p.into_inner());
    b.extend_from_slice(s.as_bytes());
    if *TTY.get_or_init(|| std::io::stdout().is_terminal()) {
        drop(b);
        flush_out();
    }
}

/// Writes what [`emit`] buffered.
pub(crate) fn flush_out() {
    let mut b = OUT.lock().unwrap_or_else(|p| p.into_inner());
    let mut so = std::io::stdout().lock();
    let _ = so.write_all(&b);
    let _ = so.flush();
    b.clear();
}

/// `print!` into [`OUT`].
#[macro_export]
macro_rules! out {
    ($($t:tt)*) => { $crate::report::emit(&format!($($t)*)) };
}

/// `println!` into [`OUT`].
#[macro_export]
macro_rules! outln {
    ($($t:tt)*) => {{ $crate::report::emit(&format!($($t)*)); $crate::report::emit("\n"); }};
}

/// qemu's `cvtstr`: a binary-unit size with three decimals, ".000" dropped.
pub(crate) fn cvtstr(value: f64) -> String {
    const UNITS: [(&str, u32); 6] = [
        (" EiB", 60),
        (" PiB", 50),
        (" TiB", 40),
        (" GiB", 30),
        (" MiB", 20),
        (" KiB", 10),
    ];
    let (mut v, mut suffix) = (value, " bytes");
    for (s, shift) in UNITS {
        let unit = (1u64 << shift) as f64;
        if value >= unit {
            v = value / unit;
            suffix = s;
            break;
        }
    }
    // Whole bytes print with six decimals ("563.866954 bytes"), larger units with three.
    let mut s = if suffix == " bytes" {
        format!("{v:.6}")
    } else {
        format!("{v:.3}")
    };
    if let Some(i) = s.find(".000") {
        s.truncate(i);
    }
    s.push_str(suffix);
    s
}

/// qemu's `timestr`: "SS.ss sec", or "H:MM:SS.ss" when `verbose` (the -C format) or an hour
/// has passed.
pub(crate) fn timestr(t: Duration, verbose: bool) -> String {
    let secs = t.as_secs();
    let frac = f64::from(t.subsec_nanos()) / 1e9;
    if verbose || secs >= 3600 {
        format!(
            "{}:{:02}:{:05.2}",
            secs / 3600,
            (secs / 60) % 60,
            (secs % 60) as f64 + frac
        )
    } else {
        format!("{:05.2} sec", secs as f64 + frac)
    }
}

fn per_sec(v: f64, t: Duration) -> f64 {
    v / t.as_secs_f64()
}

/// qemu-io's `print_report`: what was done, then size, ops, time and rates (or one CSV line
/// with `-C`).
pub(crate) fn print_report(
    op: &str,
    t: Duration,
    offset: u64,
    count: u64,
    total: u64,
    cnt: u32,
    machine: bool,
) {
    let ts = timestr(t, machine);
    if machine {
        outln!(
            "{},{},{},{:.3},{:.3}",
            total,
            cnt,
            ts,
            per_sec(total as f64, t),
            per_sec(f64::from(cnt), t)
        );
    } else {
        outln!("{op} {total}/{count} bytes at offset {offset}");
        outln!(
            "{}, {} ops; {} ({}/sec and {:.4} ops/sec)",
            cvtstr(total as f64),
            cnt,
            ts,
            cvtstr(per_sec(total as f64, t)),
            per_sec(f64::from(cnt), t)
        );
    }
}

/// qemu-io's `dump_buffer`: offset, up to 16 hex bytes, then the alphanumeric ones.
pub(crate) fn dump_buffer(buf: &[u8], offset: u64) {
    let mut out = String::new();
    for (i, line) in buf.chunks(16).enumerate() {
        out.push_str(&format!("{:08x}:  ", offset + 16 * i as u64));
        for b in line {
            out.push_str(&format!("{b:02x} "));
        }
        out.push(' ');
        out.extend(line.iter().map(|&b| {
            if b.is_ascii_alphanumeric() {
                b as char
            } else {
                '.'
            }
        }));
        out.push('\n');
    }
    out!("{out}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_as_qemu_prints_them() {
        assert_eq!(cvtstr(512.0), "512 bytes");
        assert_eq!(cvtstr(1536.0), "1.500 KiB");
        assert_eq!(cvtstr(65536.0), "64 KiB");
        assert_eq!(cvtstr(4194304.0 - 131072.0), "3.875 MiB");
        assert_eq!(cvtstr(0.0), "0 bytes");
        assert_eq!(cvtstr(563.866954), "563.866954 bytes");
        assert_eq!(cvtstr(1024.0 * 1.0004), "1 KiB");
    }

    #[test]
    fn times_as_qemu_prints_them() {
        assert_eq!(timestr(Duration::from_millis(5), false), "00.01 sec");
        assert_eq!(timestr(Duration::from_millis(1), true), "0:00:00.00");
        assert_eq!(timestr(Duration::from_secs(3725), false), "1:02:05.00");
    }
}
