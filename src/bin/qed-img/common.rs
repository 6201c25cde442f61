// SPDX-License-Identifier: MIT OR Apache-2.0
//! Shared pieces: errors and exit codes, qemu-style size parsing and printing, format probing,
//! progress display.

use std::fmt;
use std::fs::File;
use std::io::{Read, Write};
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// The name messages start with: the last component of argv[0], as qemu-img prints it
/// (`error_init(argv[0])`), so that a `qemu-img` link to qed-img speaks as qemu-img does and
/// scripts filtering on that name (QEMU's iotests) read us unchanged.
pub(crate) fn prog_name() -> &'static str {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        std::env::args_os()
            .next()
            .and_then(|a| {
                Path::new(&a)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
            })
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "qed-img".into())
    })
}

/// An error to report on stderr, with the exit code to leave with.
#[derive(Debug)]
pub(crate) struct CliError {
    pub(crate) msg: String,
    pub(crate) code: i32,
}

impl CliError {
    pub(crate) fn new(msg: impl Into<String>) -> Self {
        CliError {
            msg: msg.into(),
            code: 1,
        }
    }
    pub(crate) fn with_code(mut self, code: i32) -> Self {
        self.code = code;
        self
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

pub(crate) type CliResult<T> = Result<T, CliError>;

/// Library errors met where no file needs naming (a cancelled copy, bad options).
impl From<qed::Error> for CliError {
    fn from(e: qed::Error) -> Self {
        CliError::new(e.to_string())
    }
}

/// Adds "which file" context to library and I/O errors.
pub(crate) trait Context<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> CliResult<T>;
}

impl<T, E: fmt::Display> Context<T> for Result<T, E> {
    fn ctx(self, what: impl FnOnce() -> String) -> CliResult<T> {
        self.map_err(|e| CliError::new(format!("{}: {}", what(), e)))
    }
}

/// Image formats the tool reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fmt {
    Raw,
    Qed,
}

impl Fmt {
    pub(crate) fn parse(s: &str) -> CliResult<Fmt> {
        match s {
            "raw" => Ok(Fmt::Raw),
            "qed" => Ok(Fmt::Qed),
            _ => Err(CliError::new(format!(
                "Unknown file format '{s}' (qed-img handles 'qed' and 'raw')"
            ))),
        }
    }
    pub(crate) fn name(self) -> &'static str {
        match self {
            Fmt::Raw => "raw",
            Fmt::Qed => "qed",
        }
    }
}

pub(crate) fn parse_fmt(s: Option<&str>) -> CliResult<Option<Fmt>> {
    s.map(Fmt::parse).transpose()
}

/// Guesses a file's format from its magic, as qemu-img's probing does for the two formats we know.
pub(crate) fn probe(path: &Path) -> std::io::Result<Fmt> {
    let mut f = File::open(path)?;
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = f.read(&mut magic[got..])?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(if got == 4 && &magic == b"QED\0" {
        Fmt::Qed
    } else {
        Fmt::Raw
    })
}

/// The format to use for `path`: the one given, or the probed one.
pub(crate) fn format_of(path: &str, given: Option<Fmt>) -> CliResult<Fmt> {
    match given {
        Some(f) => Ok(f),
        None => probe(Path::new(path)).map_err(|e| {
            CliError::new(format!(
                "Could not open '{path}': {}",
                crate::common::io_msg(&e)
            ))
        }),
    }
}

/// An I/O error as qemu prints it ("No such file or directory"), without Rust's "(os error 2)".
pub(crate) fn io_msg(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// The host file a command-line name stands for, spelled as QEMU shows it: a `file:` prefix
/// (QEMU's file protocol) is dropped, and a relative name that would then look like it has a
/// protocol prefix of its own (`image:top.qed`) is shown as `./image:top.qed`.
pub(crate) fn host_path(name: &str) -> String {
    let Some(rest) = name.strip_prefix("file:") else {
        return name.to_string();
    };
    // QEMU's path_has_protocol: a ':' before any '/'.
    match rest.find([':', '/']) {
        Some(i) if rest.as_bytes()[i] == b':' => format!("./{rest}"),
        _ => rest.to_string(),
    }
}

/// The protocol prefix of a name QEMU would hand to a protocol driver (`json:`, `file:`,
/// `nbd:`...): what the library refuses in a backing file name (an image must not choose
/// drivers or host files beyond a plain path; CVE-2024-4467).
pub(crate) fn protocol_prefix(name: &str) -> Option<&str> {
    name.split_once(':').map(|(p, _)| p).filter(|p| {
        !p.is_empty()
            && !p.contains('/')
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '-' || c == '.')
    })
}

/// Refuses a backing file name for a new image that the library would refuse to open.
pub(crate) fn check_backing_name(file: &str, name: &str) -> CliResult<()> {
    match protocol_prefix(name) {
        Some(p) => Err(CliError::new(format!(
            "{file}: backing file names with a protocol prefix ({p}:) are not supported"
        ))),
        None => Ok(()),
    }
}

/// qemu's `path_combine`: a relative backing name is taken relative to the folder of the image
/// that names it, keeping the image path's spelling (relative stays relative).
pub(crate) fn path_combine(base: &str, name: &str) -> String {
    if name.starts_with('/') {
        return name.to_string();
    }
    match base.rfind('/') {
        Some(i) => format!("{}{}", &base[..=i], name),
        None => name.to_string(),
    }
}

/// Parses a size as qemu-img does (`qemu_strtosz`): a decimal number, optionally with a fraction,
/// and an optional suffix B, K, M, G, T, P or E (case-insensitive; powers of 1024). Hexadecimal
/// (`0x...`) is accepted without fraction or suffix.
pub(crate) fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        let v = u64::from_str_radix(hex, 16).ok()?;
        return (v <= i64::MAX as u64).then_some(v);
    }
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(end);
    if num.is_empty() || num.starts_with('.') || num.matches('.').count() > 1 {
        return None;
    }
    let mult: u64 = match suffix {
        "" | "b" | "B" => 1,
        "k" | "K" => 1 << 10,
        "m" | "M" => 1 << 20,
        "g" | "G" => 1 << 30,
        "t" | "T" => 1 << 40,
        "p" | "P" => 1 << 50,
        "e" | "E" => 1 << 60,
        _ => return None,
    };
    let v = if num.contains('.') {
        if mult == 1 {
            // A fraction of a byte makes no sense; qemu refuses it too.
            return None;
        }
        let f: f64 = num.parse().ok()?;
        let v = f * mult as f64;
        if v.is_nan() || v >= i64::MAX as f64 {
            return None;
        }
        v as u64
    } else {
        let n: u64 = num.parse().ok()?;
        n.checked_mul(mult)?
    };
    (v <= i64::MAX as u64).then_some(v)
}

/// C's `%.{prec}g` for a non-negative finite value.
pub(crate) fn fmt_g(v: f64, prec: usize) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let p = prec.max(1);
    let e_form = format!("{:.*e}", p - 1, v);
    let (mant, exp) = e_form.split_once('e').expect("exponent form");
    let x: i32 = exp.parse().expect("exponent");
    let strip = |s: String| -> String {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    };
    if x < -4 || x >= p as i32 {
        let m = strip(mant.to_string());
        format!("{m}e{}{:02}", if x < 0 { '-' } else { '+' }, x.abs())
    } else {
        strip(format!("{:.*}", (p as i32 - 1 - x) as usize, v))
    }
}

/// qemu's `size_to_str`: "708 KiB", "1.06 MiB", "16 MiB", "0 B".
pub(crate) fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let x = val as f64 / (1000.0 / 1024.0);
    // frexp's exponent: x = m * 2^e with m in [0.5, 1).
    let e = if x == 0.0 {
        0
    } else {
        ((x.to_bits() >> 52) & 0x7ff) as i32 - 1022
    };
    let i = ((e - 1) / 10).clamp(0, 6) as usize;
    let div = (1u64 << (i * 10)) as f64;
    format!("{} {}B", fmt_g(val as f64 / div, 3), SUFFIXES[i])
}

/// Progress of long work as qemu-img prints it with `-p`: `    (12.34/100%)` lines ended by
/// `\r` on stdout, a new line each time the percentage moved by more than one point (and at 0
/// and 100), then a line feed at the end; on a pipe too, as qemu-img prints them.
pub(crate) struct Progress {
    state: Option<Arc<Mutex<Shown>>>,
}

struct Shown {
    total: u64,
    done: u64,
    last: f32,
    ended: bool,
}

impl Shown {
    /// qemu's `qemu_progress_print` with an absolute value and a minimum step of 1%.
    fn show(&mut self, done: u64) {
        self.done = done.min(self.total);
        let current = (100.0 * self.done as f64 / self.total as f64) as f32;
        if current > self.last + 1.0
            || current < self.last - 1.0
            || current == 100.0
            || current == 0.0
        {
            self.last = current;
            let mut out = std::io::stdout().lock();
            let _ = write!(out, "    ({current:.2}/100%)\r");
            let _ = out.flush();
        }
    }
    fn end(&mut self) {
        if !self.ended {
            self.ended = true;
            println!();
        }
    }
}

impl Progress {
    /// `enabled` is the `-p` flag (and not `-q`); `total` is the amount of work in any unit.
    pub(crate) fn new(enabled: bool, total: u64) -> Self {
        let state = enabled.then(|| {
            let mut s = Shown {
                total: total.max(1),
                done: 0,
                last: 0.0,
                ended: false,
            };
            s.show(0);
            Arc::new(Mutex::new(s))
        });
        Progress { state }
    }
    fn with(&self, f: impl FnOnce(&mut Shown)) {
        if let Some(s) = &self.state {
            f(&mut s.lock().unwrap_or_else(|e| e.into_inner()));
        }
    }
    pub(crate) fn set(&self, done: u64) {
        self.with(|s| s.show(done));
    }
    pub(crate) fn inc(&self, n: u64) {
        self.with(|s| s.show(s.done.saturating_add(n)));
    }
    pub(crate) fn finish(&self) {
        self.with(|s| {
            s.show(s.total);
            s.end();
        });
    }
    /// A library progress handle that shows what the library reports (its own total).
    pub(crate) fn library(&self) -> qed::Progress {
        let Some(state) = self.state.clone() else {
            return qed::Progress::new();
        };
        qed::Progress::with_callback(move |done, total| {
            let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
            s.total = total.max(1);
            s.show(done);
            ControlFlow::Continue(())
        })
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        // Whatever comes next (an error) starts on a line of its own.
        self.with(Shown::end);
    }
}

/// Parses qemu's `-o key=value,key=value` lists (several `-o` add up). `help` is kept as a key.
pub(crate) fn parse_opts(list: &[String]) -> CliResult<Vec<(String, String)>> {
    let mut out = Vec::new();
    for item in list {
        // qemu escapes a comma inside a value as ",,".
        let mut cur = String::new();
        let mut parts = Vec::new();
        let mut chars = item.chars().peekable();
        while let Some(c) = chars.next() {
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                    cur.push(',');
                } else {
                    parts.push(std::mem::take(&mut cur));
                }
            } else {
                cur.push(c);
            }
        }
        parts.push(cur);
        for p in parts {
            if p.is_empty() {
                continue;
            }
            match p.split_once('=') {
                Some((k, v)) => out.push((k.to_string(), v.to_string())),
                None if p == "help" || p == "?" => out.push(("help".into(), String::new())),
                None => {
                    return Err(CliError::new(format!(
                        "Invalid parameter '{p}': options are key=value"
                    )))
                }
            }
        }
    }
    Ok(out)
}

/// Whether every byte is zero.
pub(crate) fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(64);
    for c in &mut chunks {
        // OR-folding a fixed-size block vectorises; test once per block.
        if c.iter().fold(0u8, |a, &b| a | b) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

/// The offset of the first 512-byte sector of `buf` that holds a non-zero byte (qemu's
/// `find_nonzero`).
pub(crate) fn find_nonzero(buf: &[u8]) -> Option<usize> {
    buf.chunks(512).position(|c| !is_zero(c)).map(|i| i * 512)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("1.5M"), Some(3 << 19));
        assert_eq!(parse_size("64k"), Some(65536));
        assert_eq!(parse_size("1000"), Some(1000));
        assert_eq!(parse_size("0x1000"), Some(4096));
        assert_eq!(parse_size("1X"), None);
        assert_eq!(parse_size("-1"), None);
        assert_eq!(parse_size("16E"), None);
    }

    #[test]
    fn size_strings() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(724992), "708 KiB");
        assert_eq!(size_to_str(1114112), "1.06 MiB");
        assert_eq!(size_to_str(16 << 20), "16 MiB");
        assert_eq!(size_to_str(1024), "1 KiB");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(999), "999 B");
        assert_eq!(fmt_g(1e-5, 3), "1e-05");
    }

    #[test]
    fn file_protocol_prefix() {
        assert_eq!(host_path("a.qed"), "a.qed");
        assert_eq!(host_path("file:a.qed"), "a.qed");
        assert_eq!(host_path("file:/t/a:b.qed"), "/t/a:b.qed");
        assert_eq!(host_path("file:image:top.qed"), "./image:top.qed");
        assert_eq!(host_path("file:d/x:y"), "d/x:y");
    }

    #[test]
    fn combine() {
        assert_eq!(path_combine("ov.qed", "base.raw"), "base.raw");
        assert_eq!(path_combine("/tmp/q/ov.qed", "base.raw"), "/tmp/q/base.raw");
        assert_eq!(path_combine("/tmp/q/ov.qed", "/x/b"), "/x/b");
        assert_eq!(path_combine("a/ov.qed", "../b"), "a/../b");
    }
}
