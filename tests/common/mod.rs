// SPDX-License-Identifier: MIT OR Apache-2.0
//! Helpers shared by the QEMU interop tests: running `qemu-img` / `qemu-io` with a time limit,
//! a tiny JSON reader for their `--output=json`, a deterministic RNG, extent normalisation and
//! byte comparisons with useful failure messages.

#![allow(dead_code)]

use qed::{Extent, ExtentKind, Image};
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
pub const TIB: u64 = 1 << 40;

/// Longest one QEMU command may run before it is killed and the test fails.
const CMD_TIMEOUT: Duration = Duration::from_secs(120);

/// Fails (never skips) when qemu-img or qemu-io cannot be run.
pub fn require_qemu() {
    static CHECKED: OnceLock<Result<(), String>> = OnceLock::new();
    let r = CHECKED.get_or_init(|| {
        for tool in ["qemu-img", "qemu-io"] {
            match Command::new(tool).arg("--version").output() {
                Ok(out) if out.status.success() => {}
                Ok(out) => {
                    return Err(format!(
                        "`{tool} --version` failed ({}): {}; install qemu-utils \
                         (`apt-get install qemu-utils`)",
                        out.status,
                        String::from_utf8_lossy(&out.stderr)
                    ))
                }
                Err(e) => {
                    return Err(format!(
                        "{tool} is required by the QEMU interop tests but cannot be run ({e}); \
                         install qemu-utils (`apt-get install qemu-utils`)"
                    ))
                }
            }
        }
        Ok(())
    });
    if let Err(e) = r {
        panic!("{e}");
    }
}

/// What a finished command produced.
#[derive(Debug)]
pub struct Out {
    pub what: String,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Panics unless the command exited 0.
    #[track_caller]
    pub fn ok(self) -> Out {
        assert!(
            self.success(),
            "{} failed (exit {:?})\nstdout:\n{}\nstderr:\n{}",
            self.what,
            self.code,
            self.stdout,
            self.stderr
        );
        self
    }

    /// stdout and stderr together.
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

fn reader(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut s);
        }
        String::from_utf8_lossy(&s).into_owned()
    })
}

/// Runs `prog args...` (in `cwd` if given), killing it after [`CMD_TIMEOUT`].
pub fn run_in(cwd: Option<&Path>, prog: &str, args: &[&str]) -> Out {
    require_qemu();
    let what = format!("{prog} {}", args.join(" "));
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{what}` ({e}); install qemu-utils"));
    let out = reader(child.stdout.take());
    let err = reader(child.stderr.take());
    let deadline = Instant::now() + CMD_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for a child process") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`{what}` did not finish within {CMD_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(2));
    };
    Out {
        what,
        code: status.code(),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

pub fn qemu_img(args: &[&str]) -> Out {
    run_in(None, "qemu-img", args)
}

/// Runs `qemu-io -f qed -c CMD... image` and panics if it fails or any command reports a failure
/// (a write error, a pattern mismatch).
#[track_caller]
pub fn qemu_io(image: &Path, cmds: &[String]) -> Out {
    let mut args: Vec<&str> = vec!["-f", "qed"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(p(image));
    let out = run_in(None, "qemu-io", &args);
    let text = out.text();
    assert!(
        out.success() && !text.contains("failed") && !text.contains("error"),
        "{} reported a failure (exit {:?}):\n{}",
        out.what,
        out.code,
        text
    );
    out
}

pub fn p(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

// ---------------------------------------------------------------------------------------------
// JSON (just enough for qemu-img's --output=json).

#[derive(Clone, Debug, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Num(String),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    pub fn parse(text: &str) -> Json {
        let mut parser = JsonParser {
            s: text.as_bytes(),
            i: 0,
        };
        let v = parser.value();
        parser.ws();
        assert_eq!(parser.i, parser.s.len(), "trailing text after JSON: {text}");
        v
    }
    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(v) => v.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Json::Num(n) => n.parse().ok(),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Json::Bool(b) => Some(*b),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_arr(&self) -> Option<&[Json]> {
        match self {
            Json::Arr(v) => Some(v),
            _ => None,
        }
    }
}

struct JsonParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl JsonParser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn peek(&mut self) -> u8 {
        self.ws();
        *self.s.get(self.i).expect("unexpected end of JSON")
    }
    fn eat(&mut self, c: u8) {
        let got = self.peek();
        assert_eq!(got as char, c as char, "bad JSON at byte {}", self.i);
        self.i += 1;
    }
    fn lit(&mut self, word: &str) {
        assert!(
            self.s[self.i..].starts_with(word.as_bytes()),
            "bad JSON literal at byte {}",
            self.i
        );
        self.i += word.len();
    }
    fn value(&mut self) -> Json {
        match self.peek() {
            b'{' => {
                self.i += 1;
                let mut v = Vec::new();
                if self.peek() == b'}' {
                    self.i += 1;
                    return Json::Obj(v);
                }
                loop {
                    let k = self.string();
                    self.eat(b':');
                    let val = self.value();
                    v.push((k, val));
                    match self.peek() {
                        b',' => self.i += 1,
                        b'}' => {
                            self.i += 1;
                            return Json::Obj(v);
                        }
                        c => panic!("bad JSON object at byte {}: {:?}", self.i, c as char),
                    }
                }
            }
            b'[' => {
                self.i += 1;
                let mut v = Vec::new();
                if self.peek() == b']' {
                    self.i += 1;
                    return Json::Arr(v);
                }
                loop {
                    v.push(self.value());
                    match self.peek() {
                        b',' => self.i += 1,
                        b']' => {
                            self.i += 1;
                            return Json::Arr(v);
                        }
                        c => panic!("bad JSON array at byte {}: {:?}", self.i, c as char),
                    }
                }
            }
            b'"' => Json::Str(self.string()),
            b't' => {
                self.lit("true");
                Json::Bool(true)
            }
            b'f' => {
                self.lit("false");
                Json::Bool(false)
            }
            b'n' => {
                self.lit("null");
                Json::Null
            }
            _ => {
                let start = self.i;
                while self.i < self.s.len()
                    && matches!(
                        self.s[self.i],
                        b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'
                    )
                {
                    self.i += 1;
                }
                assert!(self.i > start, "bad JSON value at byte {start}");
                Json::Num(String::from_utf8(self.s[start..self.i].to_vec()).unwrap())
            }
        }
    }
    fn string(&mut self) -> String {
        self.eat(b'"');
        let mut out = Vec::new();
        loop {
            let c = self.s[self.i];
            self.i += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let e = self.s[self.i];
                    self.i += 1;
                    match e {
                        b'n' => out.push(b'\n'),
                        b't' => out.push(b'\t'),
                        b'r' => out.push(b'\r'),
                        b'b' => out.push(8),
                        b'f' => out.push(12),
                        b'u' => {
                            let hex = std::str::from_utf8(&self.s[self.i..self.i + 4]).unwrap();
                            self.i += 4;
                            let ch = char::from_u32(u32::from_str_radix(hex, 16).unwrap())
                                .unwrap_or('\u{fffd}');
                            let mut b = [0u8; 4];
                            out.extend_from_slice(ch.encode_utf8(&mut b).as_bytes());
                        }
                        other => out.push(other),
                    }
                }
                c => out.push(c),
            }
        }
        String::from_utf8(out).expect("JSON strings are UTF-8")
    }
}

// ---------------------------------------------------------------------------------------------
// Deterministic randomness.

#[path = "../support/rng.rs"]
mod rng;
pub use rng::Rng;

/// `len` pseudo-random bytes from `seed`.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng::new(seed).fill(&mut v);
    v
}

// ---------------------------------------------------------------------------------------------
// Extents.

/// Merges neighbouring extents of the same kind (data extents only when also contiguous in the
/// file), so that maps split at different places compare equal.
pub fn normalize(extents: impl IntoIterator<Item = Extent>) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for e in extents {
        if e.length == 0 {
            continue;
        }
        if let Some(last) = out.last_mut() {
            let joins = last.offset + last.length == e.offset
                && match (last.kind, e.kind) {
                    (ExtentKind::Data { host_offset: a }, ExtentKind::Data { host_offset: b }) => {
                        b == a + last.length
                    }
                    (a, b) => a == b,
                };
            if joins {
                last.length += e.length;
                continue;
            }
        }
        out.push(e);
    }
    out
}

/// `qemu-img map --output=json` of `[start, start + len)` of the top image. Ranges QEMU reports
/// from a backing file (depth > 0) or as not present are unallocated at the top.
pub fn qemu_map(image: &Path, start: u64, len: u64) -> Vec<Extent> {
    let s = start.to_string();
    let l = len.to_string();
    let out = qemu_img(&[
        "map",
        "--output=json",
        "-f",
        "qed",
        "--start-offset",
        &s,
        "--max-length",
        &l,
        p(image),
    ])
    .ok();
    let json = Json::parse(&out.stdout);
    let entries = json.as_arr().expect("qemu-img map prints an array");
    normalize(entries.iter().map(|e| {
        let f = |k: &str| {
            e.get(k)
                .unwrap_or_else(|| panic!("map entry without {k}: {e:?}"))
        };
        let offset = f("start").as_u64().unwrap();
        let length = f("length").as_u64().unwrap();
        let depth = f("depth").as_u64().unwrap();
        let present = f("present").as_bool().unwrap();
        let zero = f("zero").as_bool().unwrap();
        let data = f("data").as_bool().unwrap();
        let kind = if depth > 0 || !present {
            ExtentKind::Unallocated
        } else if data {
            ExtentKind::Data {
                host_offset: f("offset").as_u64().expect("data extents have an offset"),
            }
        } else {
            assert!(zero, "present, not data and not zero? {e:?}");
            ExtentKind::Zero
        };
        Extent {
            offset,
            length,
            kind,
        }
    }))
}

/// Our map of `[start, start + len)`, normalised.
pub fn our_map(img: &Image, start: u64, len: u64) -> Vec<Extent> {
    normalize(img.map(start, len).expect("map"))
}

#[track_caller]
pub fn assert_maps_equal(what: &str, ours: &[Extent], qemu: &[Extent]) {
    if ours != qemu {
        let n = ours.iter().zip(qemu).take_while(|(a, b)| a == b).count();
        panic!(
            "{what}: our map differs from qemu-img map at entry {n}:\n  ours: {:?}\n  qemu: {:?}\n\
             full ours: {ours:?}\nfull qemu: {qemu:?}",
            ours.get(n),
            qemu.get(n)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Byte comparisons.

#[track_caller]
pub fn assert_bytes_equal(what: &str, offset: u64, ours: &[u8], expected: &[u8]) {
    assert_eq!(ours.len(), expected.len(), "{what}: lengths differ");
    if ours != expected {
        let i = ours.iter().zip(expected).position(|(a, b)| a != b).unwrap();
        let j = (i + 16).min(ours.len());
        let run = ours[i..]
            .iter()
            .zip(&expected[i..])
            .take_while(|(a, b)| a != b)
            .count();
        panic!(
            "{what}: first difference at guest offset {:#x} ({}), {run} differing bytes from there:\n  \
             ours:     {:02x?}\n  expected: {:02x?}",
            offset + i as u64,
            offset + i as u64,
            &ours[i..j],
            &expected[i..j]
        );
    }
}

const CHUNK: u64 = 4 * MIB;

/// Reads the whole image through our library and compares it with `model`.
#[track_caller]
pub fn assert_image_matches_model(what: &str, img: &Image, model: &[u8]) {
    assert_eq!(img.size(), model.len() as u64, "{what}: virtual size");
    let mut buf = vec![0u8; CHUNK as usize];
    let mut off = 0u64;
    while off < model.len() as u64 {
        let n = CHUNK.min(model.len() as u64 - off) as usize;
        img.read_at(off, &mut buf[..n])
            .unwrap_or_else(|e| panic!("{what}: read at {off:#x}: {e}"));
        assert_bytes_equal(what, off, &buf[..n], &model[off as usize..off as usize + n]);
        off += n as u64;
    }
}

fn compare_range(what: &str, img: &Image, raw: &File, start: u64, end: u64) {
    let mut a = vec![0u8; CHUNK as usize];
    let mut b = vec![0u8; CHUNK as usize];
    let mut off = start;
    while off < end {
        let n = CHUNK.min(end - off) as usize;
        img.read_at(off, &mut a[..n])
            .unwrap_or_else(|e| panic!("{what}: our read at {off:#x}: {e}"));
        read_raw(raw, &mut b[..n], off);
        assert_bytes_equal(what, off, &a[..n], &b[..n]);
        off += n as u64;
    }
}

/// Reads `buf.len()` bytes of a raw file at `off` (zeros past its end).
pub fn read_raw(f: &File, buf: &mut [u8], off: u64) {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("reading raw file: {e}"),
        }
    }
}

/// The data (non-hole) segments of a sparse file.
pub fn data_segments(f: &File, len: u64) -> Vec<(u64, u64)> {
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        // SAFETY: lseek on a file descriptor we own; no memory is involved.
        let d = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if d < 0 {
            break;
        }
        // SAFETY: as above.
        let h = unsafe { libc::lseek(fd, d, libc::SEEK_HOLE) };
        let h = if h < 0 { len } else { (h as u64).min(len) };
        out.push((d as u64, h));
        pos = h;
    }
    out
}

/// Images up to this size are compared byte for byte over their whole range; larger (sparse)
/// ones over every range that holds data on either side, plus samples of the holes between.
pub const FULL_COMPARE_MAX: u64 = 256 * MIB;

/// Compares the whole image, read through our library, with a raw file (`qemu-img convert -O
/// raw` of the same image).
#[track_caller]
pub fn assert_image_matches_raw(what: &str, img: &Image, raw: &Path) {
    let f = File::open(raw).unwrap();
    let size = img.size();
    let raw_len = f.metadata().unwrap().len();
    assert_eq!(raw_len, size, "{what}: raw file length vs our virtual size");
    if size <= FULL_COMPARE_MAX {
        compare_range(what, img, &f, 0, size);
        return;
    }
    // Sparse comparison: every byte either side stores, in full.
    let mut regions: Vec<(u64, u64)> = data_segments(&f, size);
    for e in img.map(0, size).expect("map") {
        if e.kind != ExtentKind::Unallocated || img.backing().is_some() {
            regions.push((e.offset, e.offset + e.length));
        }
    }
    regions.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in regions {
        let s = s & !(4 * KIB - 1);
        let e = e.next_multiple_of(4 * KIB).min(size);
        match merged.last_mut() {
            Some(last) if s <= last.1 + MIB => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    let mut pos = 0;
    let mut zeros = vec![0u8; 64 * KIB as usize];
    let mut sample = |from: u64, to: u64| {
        // A hole in the raw file: our library must read zeros there (checked at both ends).
        for at in [from, to.saturating_sub(64 * KIB).max(from)] {
            let n = (to - at).min(64 * KIB) as usize;
            if n == 0 {
                continue;
            }
            img.read_at(at, &mut zeros[..n]).unwrap();
            assert!(
                zeros[..n].iter().all(|&b| b == 0),
                "{what}: our read of {at:#x}+{n:#x} (a hole in qemu's raw output) is not zero"
            );
        }
    };
    for &(s, e) in &merged {
        if s > pos {
            sample(pos, s);
        }
        compare_range(what, img, &f, s, e);
        pos = e;
    }
    if pos < size {
        sample(pos, size);
    }
}

/// Writes `model` to a sparse raw file (zero 64 KiB blocks are left as holes).
pub fn write_raw(path: &Path, model: &[u8]) {
    let f = File::create(path).unwrap();
    for (i, chunk) in model.chunks(64 * KIB as usize).enumerate() {
        if chunk.iter().any(|&b| b != 0) {
            f.write_all_at(chunk, i as u64 * 64 * KIB).unwrap();
        }
    }
    f.set_len(model.len() as u64).unwrap();
}

/// Reads a whole raw file.
pub fn read_file(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The `features` field of a QED header, read from the file.
pub fn header_features(path: &Path) -> u64 {
    let f = File::open(path).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, 16).unwrap();
    u64::from_le_bytes(b)
}
