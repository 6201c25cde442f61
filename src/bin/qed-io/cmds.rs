// SPDX-License-Identifier: MIT OR Apache-2.0
//! The open image and qemu-io's commands on it. Messages, their stream (stdout or stderr) and
//! their order follow qemu-io-cmds.c; a failed command makes the program exit with 1.

use crate::getopt::getopt;
use crate::open::{open_protocol, strip_protocol, ImageStorage, OpenOpts};
use crate::outln;
use crate::report::{cvtstr, dump_buffer, print_report};
use qed::aio::{AioOptions, AioQueue, Engine, EngineOptions, IoBackend, Op, RawBuf};
use qed::{BackingFormat, CreateOptions, Image, OpenOptions, WriteFlags, WriteZeroesFlags};
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A command failed (its message is already printed).
pub(crate) struct Failed;
type CmdResult = Result<(), Failed>;

/// How images are opened (the program's options, and `open`'s).
#[derive(Clone, Default)]
pub(crate) struct Settings {
    pub(crate) read_only: bool,
    pub(crate) force_share: bool,
    /// `-s`: writes go to a temporary overlay, deleted at close; the image is only read.
    pub(crate) snapshot: bool,
    /// `open -o`.
    pub(crate) opts: OpenOpts,
    /// `-C`: reads served by the backing file copy its clusters into the image.
    pub(crate) copy_on_read: bool,
    direct: bool,
    writethrough: bool,
    backend: Option<IoBackend>,
}

impl Settings {
    pub(crate) fn set_format(&mut self, f: &str) -> Result<(), String> {
        match f {
            "qed" => Ok(()),
            "raw" => {
                Err("format 'raw' is not supported by qed-io (use qemu-io); only 'qed'".into())
            }
            other => Err(format!(
                "Unknown driver '{other}' (qed-io opens 'qed' images)"
            )),
        }
    }
    pub(crate) fn set_cache(&mut self, mode: &str) -> Result<(), String> {
        // As bdrv_parse_cache_mode: none/directsync bypass the page cache; writethrough and
        // directsync flush after every write.
        let (direct, wt) = match mode {
            "none" | "off" => (true, false),
            "directsync" => (true, true),
            "writeback" | "unsafe" => (false, false),
            "writethrough" => (false, true),
            _ => return Err(format!("Invalid cache option: {mode}")),
        };
        self.direct = direct;
        self.writethrough = wt;
        Ok(())
    }
    pub(crate) fn set_aio(&mut self, mode: &str) -> Result<(), String> {
        // Linux native AIO has no counterpart here; the automatic choice (io_uring where the
        // kernel allows it) stands in for it.
        self.backend = Some(match mode {
            "threads" => IoBackend::Threads,
            "io_uring" => IoBackend::IoUring,
            "native" => IoBackend::Auto,
            _ => return Err(format!("Invalid aio option: {mode}")),
        });
        Ok(())
    }
    /// Applies an option the command line and `open` share (-r -U -n -t -k -s -C); `None`
    /// for any other letter, which the caller handles.
    pub(crate) fn apply_open_option(&mut self, c: char, v: &str) -> Option<Result<(), String>> {
        match c {
            'r' => self.read_only = true,
            'U' => self.force_share = true,
            's' => self.snapshot = true,
            'C' => self.copy_on_read = true,
            'n' => return Some(self.set_cache("none")),
            't' => return Some(self.set_cache(v)),
            'k' => return Some(self.set_aio("native")),
            _ => return None,
        }
        Some(Ok(()))
    }
}

/// An aio request's result, printed at the next synchronous command (where qemu-io's event
/// loop would run its callback).
struct AioDone {
    write: bool,
    offset: u64,
    total: u64,
    bufs: Vec<Vec<u8>>,
    elapsed: Duration,
    result: qed::Result<()>,
    flags: IoFlags,
}

#[derive(Clone, Copy, Default)]
struct IoFlags {
    quiet: bool,
    machine: bool,
    dump: bool,
    pattern: Option<u8>,
}

struct Open {
    img: Arc<Image>,
    queue: AioQueue,
    writethrough: bool,
    /// The temporary overlay of snapshot mode, deleted at close.
    overlay: Option<TempOverlay>,
}

/// A file deleted when dropped.
struct TempOverlay(std::path::PathBuf);

impl Drop for TempOverlay {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Snapshot mode as qemu's `bdrv_append_temp_snapshot`: a new QED image in `$TMPDIR` (else
/// /var/tmp) backed by `path` (read, never written), to be opened in its place.
fn temp_overlay(path: &str, s: &Settings) -> qed::Result<TempOverlay> {
    // The image must open read-only as itself first, so its errors are its own.
    let base = Image::open(
        path,
        &OpenOptions {
            force_share: s.force_share,
            ..OpenOptions::read_only()
        },
    )?;
    drop(base);
    let canon = std::fs::canonicalize(path).map_err(|e| qed::Error::io(path, e))?;
    let dir = std::env::var_os("TMPDIR").unwrap_or_else(|| "/var/tmp".into());
    let mut n = 0u32;
    let file = loop {
        let p = std::path::Path::new(&dir).join(format!("qed-io.{}.{n}", std::process::id()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
        {
            Ok(_) => break TempOverlay(p),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
            Err(e) => return Err(qed::Error::io("creating the snapshot overlay", e)),
        }
    };
    Image::create(
        &file.0,
        &CreateOptions {
            size: 0,
            backing_file: Some(canon.to_string_lossy().into_owned()),
            backing_format: Some(BackingFormat::Qed),
            ..CreateOptions::default()
        },
    )?;
    Ok(file)
}

pub(crate) struct Session {
    prog: String,
    settings: Settings,
    open: Option<Open>,
    done: Arc<Mutex<Vec<AioDone>>>,
    /// Aio requests refused at submission (out of range), not yet reported.
    refused: Mutex<Vec<AioDone>>,
    /// A protocol node opened with no format (`open -o driver=file,...`): its driver.
    raw_node: Option<String>,
    pub(crate) quit: bool,
}

/// qemu's strerror text for a library error.
fn strerror(e: &qed::Error) -> String {
    let os = match e.root() {
        qed::Error::Io { source, .. } => source.raw_os_error(),
        qed::Error::ReadOnly => Some(libc::EROFS),
        qed::Error::Unsupported { .. } => Some(libc::ENOTSUP),
        qed::Error::InvalidArgument { .. } => Some(libc::EINVAL),
        _ => None,
    };
    let s = std::io::Error::from_raw_os_error(os.unwrap_or(libc::EIO)).to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// The sentence qemu-io prints for an image (`path`) that fails to open with `e`: qemu's QED
/// driver says only which check failed, so the library's detail (field, value, reason) is
/// mapped to the sentence of the check qemu makes at that point (block/qed.c).
fn open_error(path: &str, e: &qed::Error) -> String {
    match e {
        qed::Error::Backing { name, source } => {
            // qemu resolves a relative name against the folder of the image naming it.
            let resolved = match path.rfind('/') {
                Some(i) if !name.starts_with('/') => format!("{}{name}", &path[..=i]),
                _ => name.clone(),
            };
            format!(
                "Could not open backing file: {}",
                open_error(&resolved, source)
            )
        }
        qed::Error::Io { .. } => format!("Could not open '{path}': {}", strerror(e)),
        // qemu's file-posix words a lock conflict on two lines.
        qed::Error::Locked { detail, .. } => {
            let head = detail.split(": is another").next().unwrap_or(detail);
            format!("{head}\nIs another process using the image [{path}]?")
        }
        qed::Error::InvalidHeader { field, .. } => match *field {
            "magic" => "Image not in QED format".into(),
            "cluster_size" => "QED cluster size is invalid".into(),
            "table_size" => "QED table size is invalid".into(),
            // qemu reads a short header as zeroes and validates the header clusters and the
            // L1 table together, as one table offset check.
            "header" | "header_size" | "l1_table_offset" => "QED table offset is invalid".into(),
            "image_size" => "QED image size is invalid".into(),
            "backing_filename_offset" => "QED backing filename offset is invalid".into(),
            "backing_filename_size" => "Failed to read backing filename".into(),
            _ => e.to_string(),
        },
        qed::Error::Unsupported {
            field: "features",
            value,
            ..
        } => format!("Unsupported QED features: {value:x}"),
        _ => e.to_string(),
    }
}

/// qemu's `cvtnum`: a byte count with an optional binary suffix (`k`, `M`, ...).
fn cvtnum(arg: &str) -> Result<u64, Failed> {
    let bad = || {
        outln!("Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {arg}");
        Failed
    };
    let (num, mult) = match arg.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() && !arg.starts_with("0x") => {
            let shift = match c.to_ascii_lowercase() {
                'b' => 0,
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                'p' => 50,
                'e' => 60,
                _ => return Err(bad()),
            };
            (&arg[..i], 1u64 << shift)
        }
        _ => (arg, 1),
    };
    let v = if let Some(h) = num.strip_prefix("0x").or_else(|| num.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).map_err(|_| bad())?
    } else if num.contains('.') {
        // qemu_strtosz takes a fraction with a suffix ("1.5k"), rounded down to a byte.
        let f: f64 = num.parse().map_err(|_| bad())?;
        if mult == 1 || !f.is_finite() || f < 0.0 {
            return Err(bad());
        }
        let bytes = (f * mult as f64).floor();
        if bytes >= u64::MAX as f64 {
            outln!("Parsing error: argument too large -- {arg}");
            return Err(Failed);
        }
        return Ok(bytes as u64);
    } else {
        num.parse::<u64>().map_err(|_| bad())?
    };
    v.checked_mul(mult).ok_or_else(|| {
        outln!("Parsing error: argument too large -- {arg}");
        Failed
    })
}

fn parse_pattern(arg: &str) -> Result<u8, Failed> {
    let v = if let Some(h) = arg.strip_prefix("0x").or_else(|| arg.strip_prefix("0X")) {
        i64::from_str_radix(h, 16).ok()
    } else if arg.len() > 1 && arg.starts_with('0') {
        i64::from_str_radix(&arg[1..], 8).ok()
    } else {
        arg.parse::<i64>().ok()
    };
    match v {
        Some(p) if (0..=255).contains(&p) => Ok(p as u8),
        _ => {
            outln!("{arg} is not a valid pattern byte");
            Err(Failed)
        }
    }
}

/// name, args, one-line help, least and most arguments (-1: any).
#[rustfmt::skip]
const COMMANDS: &[(&str, &str, &str, usize, isize)] = &[
    ("aio_flush", "", "completes all outstanding aio requests", 0, 0),
    ("aio_read", "[-Ciqrv] [-P pattern] off len [len..]", "asynchronously reads a number of bytes", 2, -1),
    ("aio_write", "[-Cfiqruz] [-P pattern] off len [len..]", "asynchronously writes a number of bytes", 2, -1),
    ("alloc", "offset [count]", "checks if offset is allocated in the file", 1, 2),
    ("close", "", "close the current open file", 0, 0),
    ("discard", "[-Cq] off len", "discards a number of bytes at a specified offset", 2, -1),
    ("flush", "", "flush all in-core file state to disk", 0, 0),
    ("help", "[command]", "help for one or all commands", 0, 1),
    ("info", "", "prints information about the current file", 0, 0),
    ("length", "", "gets the length of the current file", 0, 0),
    ("map", "", "prints the allocated areas of a file", 0, 0),
    ("open", "[-rsCnkU] [-t cache] [-d discard] [-o options] [path]", "open the file specified by path", 1, -1),
    ("quit", "", "exit the program", 0, 0),
    ("read", "[-abCqrv] [-P pattern [-s off] [-l len]] off len", "reads a number of bytes at a specified offset", 2, -1),
    ("readv", "[-Cqrv] [-P pattern] off len [len..]", "reads a number of bytes at a specified offset", 2, -1),
    ("reopen", "[(-r|-w)] [-c cache] [-o options]", "reopens an image with new options", 0, -1),
    ("sleep", "", "waits for the given value in milliseconds", 1, 1),
    ("truncate", "[-m prealloc_mode] off", "truncates the current file at the given offset", 1, 3),
    ("write", "[-bcCfnqruz] [-P pattern | -s source_file] off len", "writes a number of bytes at a specified offset", 2, -1),
    ("writev", "[-Cfqr] [-P pattern] off len [len..]", "writes a number of bytes at a specified offset", 2, -1),
];

/// A bad option: getopt's complaint on stderr, then the command's usage line.
fn bad_option(name: &str, err: String) -> Failed {
    eprintln!("{name}: {err}");
    usage(name)
}

/// The largest request qemu's block layer takes (`BDRV_REQUEST_MAX_BYTES`).
const MAX_REQUEST: u64 = (i32::MAX as u64) & !511;

/// qemu-io refuses longer requests before doing anything.
fn check_length(count: u64, arg: &str) -> CmdResult {
    if count > MAX_REQUEST {
        outln!("length cannot exceed {MAX_REQUEST}, given {arg}");
        return Err(Failed);
    }
    Ok(())
}

fn usage(name: &str) -> Failed {
    if let Some((n, a, o, ..)) = COMMANDS.iter().find(|c| c.0 == name) {
        outln!("{n} {a} -- {o}");
    }
    Failed
}

/// Commands that need write permission: qemu-io asks for it before parsing their arguments.
const WRITERS: &[&str] = &["write", "writev", "aio_write", "discard", "truncate"];

impl Session {
    pub(crate) fn new(prog: String, settings: Settings) -> Session {
        Session {
            prog,
            settings,
            open: None,
            done: Arc::new(Mutex::new(Vec::new())),
            refused: Mutex::new(Vec::new()),
            raw_node: None,
            quit: false,
        }
    }

    pub(crate) fn settings(&self) -> Settings {
        self.settings.clone()
    }

    fn error(&self, msg: impl std::fmt::Display) -> Failed {
        eprintln!("{}: {msg}", self.prog);
        Failed
    }

    /// Opens `name`, or the file `-o` names (no image may be open).
    pub(crate) fn open(&mut self, name: Option<&str>, s: &Settings) -> CmdResult {
        // qemu-io names the device only when it was given as an argument.
        let prefix = match name {
            Some(n) => format!("can't open device {n}"),
            None => "can't open".to_string(),
        };
        let Some(given) = name.or(s.opts.filename.as_deref()) else {
            return Err(self.error(format!("{prefix}: no file name given")));
        };
        if let Some(driver) = &s.opts.protocol {
            open_protocol(driver, given, s.read_only)
                .map_err(|e| self.error(format!("{prefix}: {e}")))?;
            self.raw_node = Some(driver.clone());
            return Ok(());
        }
        let path = strip_protocol(given).map_err(|e| self.error(format!("{prefix}: {e}")))?;
        let opts = OpenOptions {
            writable: !s.read_only,
            force_share: s.force_share && s.read_only,
            direct: s.direct,
            lock: !s.opts.no_lock,
            copy_on_read: s.copy_on_read,
            ..OpenOptions::default()
        };
        if s.copy_on_read && s.read_only {
            return Err(self.error(format!(
                "{prefix}: Can't use copy-on-read on read-only device"
            )));
        }
        if s.force_share && !s.read_only {
            return Err(self.error(format!(
                "{prefix}: force-share=on can only be used with read-only images"
            )));
        }
        if s.snapshot && s.opts.nested {
            return Err(self.error(format!(
                "{prefix}: snapshot mode on a nested image is not supported by qed-io"
            )));
        }
        let overlay = match s.snapshot.then(|| temp_overlay(path, s)).transpose() {
            Ok(o) => o,
            Err(e) => return Err(self.error(format!("{prefix}: {}", open_error(path, &e)))),
        };
        let target = overlay.as_ref().map_or(Path::new(path), |o| o.0.as_path());
        let image = if s.opts.nested {
            // The outer image's file is the inner image's guest disk.
            Image::open(target, &opts).and_then(|inner| {
                let storage = Arc::new(ImageStorage::new(inner));
                Image::open_storage(storage, &opts)
            })
        } else {
            Image::open(target, &opts)
        };
        let opened = image.and_then(|img| {
            let img = Arc::new(img);
            let aio = AioOptions {
                block_when_full: true,
                ..AioOptions::default()
            };
            let queue = match s.backend {
                Some(b) => AioQueue::with_engine(
                    img.clone(),
                    aio,
                    &Engine::new(EngineOptions::new(0, b))?,
                )?,
                None => AioQueue::new(img.clone(), aio)?,
            };
            Ok(Open {
                img,
                queue,
                writethrough: s.writethrough,
                overlay,
            })
        });
        match opened {
            Ok(o) => {
                self.open = Some(o);
                Ok(())
            }
            Err(e) => Err(self.error(format!("{prefix}: {}", open_error(path, &e)))),
        }
    }

    /// Finishes outstanding aio requests and closes the image.
    pub(crate) fn close(&mut self) {
        self.raw_node = None;
        self.drain_aio();
        if let Some(o) = self.open.take() {
            let _ = o.queue.shutdown();
            if let Err(e) = o.img.close() {
                eprintln!("{}: {e}", self.prog);
            }
            // The overlay goes only once the image on it is closed.
            drop(o.overlay);
        }
    }

    /// Runs one command line.
    pub(crate) fn command(&mut self, line: &str) -> CmdResult {
        let words: Vec<String> = line.split_whitespace().map(String::from).collect();
        let Some(name) = words.first() else {
            return Ok(());
        };
        let Some(&(_, _, _, min, max)) = COMMANDS.iter().find(|c| c.0 == name.as_str()) else {
            eprintln!("command \"{name}\" not found");
            return Err(Failed);
        };
        let args = &words[1..];
        let global = matches!(name.as_str(), "help" | "quit" | "open");
        if !global && self.open.is_none() {
            if let Some(driver) = &self.raw_node {
                if name != "close" {
                    return Err(self.error(format!(
                        "the open node is a bare '{driver}' protocol node; qed-io does I/O on QED images only"
                    )));
                }
            } else {
                eprintln!("no file open, try 'help open'");
                return Err(Failed);
            }
        }
        if args.len() < min || (max >= 0 && args.len() > max as usize) {
            if max < 0 {
                eprintln!(
                    "bad argument count {} to {name}, expected at least {min} arguments",
                    args.len()
                );
            } else if min as isize == max {
                eprintln!(
                    "bad argument count {} to {name}, expected {min} arguments",
                    args.len()
                );
            } else {
                eprintln!(
                    "bad argument count {} to {name}, expected between {min} and {max} arguments",
                    args.len()
                );
            }
            return Err(Failed);
        }
        if WRITERS.contains(&name.as_str()) && !self.img().is_writable() {
            return Err(self.error("Block node is read-only"));
        }
        match name.as_str() {
            "read" => self.read(args),
            "readv" => self.rw_vec(args, false, false),
            "write" => self.write(args),
            "writev" => self.rw_vec(args, true, false),
            "aio_read" => self.rw_vec(args, false, true),
            "aio_write" => self.rw_vec(args, true, true),
            "aio_flush" => {
                self.drain_aio();
                Ok(())
            }
            "flush" => self.sync(Op::Flush).map_err(|e| self.error(e)),
            "length" => {
                outln!("{}", cvtstr(self.img().size() as f64));
                Ok(())
            }
            "truncate" => self.truncate(args),
            "discard" => self.discard(args),
            "map" => self.map(),
            "alloc" => self.alloc(args),
            "open" => self.open_cmd(args),
            "close" => {
                self.close();
                Ok(())
            }
            "help" => {
                help(args);
                Ok(())
            }
            "info" => {
                let g = self.img().geometry();
                outln!("format name: qed");
                outln!("cluster size: {}", cvtstr(f64::from(g.cluster_size)));
                outln!("vm state offset: {}", cvtstr(0.0));
                Ok(())
            }
            "sleep" => {
                let ms = args[0].parse::<u64>().map_err(|_| {
                    outln!("{} is not a valid number", args[0]);
                    Failed
                })?;
                std::thread::sleep(Duration::from_millis(ms));
                Ok(())
            }
            "reopen" => self.reopen(args),
            "quit" => {
                self.quit = true;
                Ok(())
            }
            _ => unreachable!("every listed command is handled"),
        }
    }

    fn img(&self) -> &Arc<Image> {
        &self.open.as_ref().expect("checked: an image is open").img
    }

    /// Submits `op` and waits for it.
    fn sync(&self, op: Op) -> qed::Result<()> {
        // qemu-io's event loop runs earlier aio callbacks while a synchronous request waits.
        self.drain_aio();
        let o = self.open.as_ref().expect("checked: an image is open");
        let (tx, rx) = mpsc::channel();
        // SAFETY: the buffers in `op` belong to our caller, who keeps them and does not touch
        // them until we return, and we return only after the completion has run.
        let r = unsafe {
            o.queue.submit(
                op,
                0,
                Box::new(move |r| {
                    let _ = tx.send(r);
                }),
            )
        };
        r.map_err(|e| qed::Error::Failed(format!("submit refused: {e:?}")))?;
        rx.recv()
            .unwrap_or_else(|_| Err(qed::Error::Failed("request dropped".into())))
    }

    /// A write, and the flush writethrough caching adds.
    fn sync_write(&self, op: Op) -> qed::Result<()> {
        self.sync(op)?;
        if self.open.as_ref().is_some_and(|o| o.writethrough) {
            self.sync(Op::Flush)?;
        }
        Ok(())
    }

    fn read(&mut self, args: &[String]) -> CmdResult {
        let (opts, rest) = getopt(args, "abCl:pP:qrs:v").map_err(|e| bad_option("read", e))?;
        let mut f = IoFlags::default();
        let (mut poff, mut plen) = (None, None);
        for (c, v) in opts {
            match c {
                'C' => f.machine = true,
                'q' => f.quiet = true,
                'v' => f.dump = true,
                'P' => f.pattern = Some(parse_pattern(&v.unwrap_or_default())?),
                's' => poff = Some(cvtnum(&v.unwrap_or_default())?),
                'l' => plen = Some(cvtnum(&v.unwrap_or_default())?),
                'a' | 'b' => {
                    outln!("qed-io has no VM state (-b) or aligned buffer (-a) support");
                    return Err(Failed);
                }
                _ => {}
            }
        }
        if rest.len() != 2 {
            return Err(usage("read"));
        }
        if f.pattern.is_none() && (poff.is_some() || plen.is_some()) {
            return Err(usage("read"));
        }
        let offset = cvtnum(&rest[0])?;
        let count = cvtnum(&rest[1])?;
        check_length(count, &rest[1])?;
        let poff = poff.unwrap_or(0);
        let plen = plen.unwrap_or(count);
        if poff.checked_add(plen).map_or(true, |e| e > count) {
            outln!("pattern verification range exceeds end of read data");
            return Err(Failed);
        }
        // Checked before the buffer is allocated: a count past the end fails, not aborts.
        let mut buf = Vec::new();
        let t = Instant::now();
        let r = self.checked(offset, count).and_then(|_| {
            buf = vec![0u8; count as usize];
            self.sync(Op::Read {
                offset,
                bufs: vec![raw(&mut buf)],
            })
        });
        let t = t.elapsed();
        if let Err(e) = r {
            outln!("read failed: {}", strerror(&e));
            return Err(Failed);
        }
        let mut ret = Ok(());
        if let Some(p) = f.pattern {
            let part = &buf[poff as usize..(poff + plen) as usize];
            if part.iter().any(|&b| b != p) {
                outln!(
                    "Pattern verification failed at offset {}, {} bytes",
                    offset + poff,
                    plen
                );
                ret = Err(Failed);
            }
        }
        if f.quiet {
            return ret;
        }
        if f.dump {
            dump_buffer(&buf, offset);
        }
        print_report("read", t, offset, count, count, 1, f.machine);
        ret
    }

    /// Guest ranges past the end fail with EIO, as qemu's block layer refuses them.
    fn checked(&self, offset: u64, count: u64) -> qed::Result<()> {
        if offset
            .checked_add(count)
            .map_or(true, |e| e > self.img().size())
        {
            return Err(qed::Error::io(
                "request",
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        Ok(())
    }

    fn write(&mut self, args: &[String]) -> CmdResult {
        let (opts, rest) = getopt(args, "bcCfnpP:qrs:uz").map_err(|e| bad_option("write", e))?;
        let mut f = IoFlags::default();
        let (mut zero, mut unmap, mut fua, mut compressed) = (false, false, false, false);
        for (c, v) in opts {
            match c {
                'C' => f.machine = true,
                'q' => f.quiet = true,
                'f' => fua = true,
                'z' => zero = true,
                'u' => unmap = true,
                'P' => f.pattern = Some(parse_pattern(&v.unwrap_or_default())?),
                'c' => compressed = true,
                'b' | 's' | 'n' => {
                    outln!("qed-io supports neither -b, -c, -n nor -s for write");
                    return Err(Failed);
                }
                _ => {}
            }
        }
        if rest.len() != 2 {
            return Err(usage("write"));
        }
        if zero && f.pattern.is_some() {
            outln!("Only one of -z, -P, and -s can be specified at the same time");
            return Err(Failed);
        }
        if unmap && !zero {
            outln!("-u requires -z to be specified");
            return Err(Failed);
        }
        let offset = cvtnum(&rest[0])?;
        let count = cvtnum(&rest[1])?;
        check_length(count, &rest[1])?;
        if compressed {
            // The QED format has no compressed clusters.
            outln!("write failed: {}", strerror(&unsupported()));
            return Err(Failed);
        }
        let t = Instant::now();
        let r = if zero {
            let flags = if unmap {
                WriteZeroesFlags::MAY_UNMAP
            } else {
                WriteZeroesFlags::NONE
            };
            self.checked(offset, count).and_then(|_| {
                self.sync_write(Op::WriteZeroes {
                    offset,
                    len: count,
                    flags,
                })
            })
        } else {
            self.checked(offset, count).and_then(|_| {
                let mut buf = vec![f.pattern.unwrap_or(0xcd); count as usize];
                self.sync_write(Op::Write {
                    offset,
                    bufs: vec![raw(&mut buf)],
                    flags: if fua {
                        WriteFlags::FUA
                    } else {
                        WriteFlags::NONE
                    },
                })
            })
        };
        let t = t.elapsed();
        if let Err(e) = r {
            outln!("write failed: {}", strerror(&e));
            return Err(Failed);
        }
        if !f.quiet {
            print_report("wrote", t, offset, count, count, 1, f.machine);
        }
        Ok(())
    }

    /// readv, writev, aio_read and aio_write: one request over several buffers.
    fn rw_vec(&mut self, args: &[String], write: bool, aio: bool) -> CmdResult {
        let name = match (write, aio) {
            (false, false) => "readv",
            (true, false) => "writev",
            (false, true) => "aio_read",
            (true, true) => "aio_write",
        };
        let spec = if aio { "CfiP:qruvz" } else { "CfP:qrv" };
        let (opts, rest) = getopt(args, spec).map_err(|e| bad_option(name, e))?;
        let mut f = IoFlags::default();
        let (mut zero, mut unmap, mut fua) = (false, false, false);
        for (c, v) in opts {
            match c {
                'C' => f.machine = true,
                'q' => f.quiet = true,
                'v' if !write => f.dump = true,
                'f' if write => fua = true,
                'z' if write && aio => zero = true,
                'u' if write && aio => unmap = true,
                'P' => f.pattern = Some(parse_pattern(&v.unwrap_or_default())?),
                'r' | 'i' => {}
                _ => return Err(usage(name)),
            }
        }
        if rest.len() < 2 {
            return Err(usage(name));
        }
        if zero && f.pattern.is_some() {
            outln!("-z and -P cannot be specified at the same time");
            return Err(Failed);
        }
        if unmap && !zero {
            outln!("-u requires -z to be specified");
            return Err(Failed);
        }
        let offset = cvtnum(&rest[0])?;
        let mut lens = Vec::new();
        for l in &rest[1..] {
            let n = cvtnum(l)?;
            if n > MAX_REQUEST {
                outln!("Argument '{l}' exceeds maximum size {MAX_REQUEST}");
                return Err(Failed);
            }
            lens.push(n);
        }
        let total: u64 = lens.iter().sum();
        if aio {
            if let Err(e) = self.checked(offset, total) {
                // qemu completes a refused aio request from a bottom half, so its error
                // prints at the next event-loop turn, not now (see `drain_aio`).
                self.push_refused(AioDone {
                    write,
                    offset,
                    total,
                    bufs: Vec::new(),
                    elapsed: Duration::ZERO,
                    result: Err(e),
                    flags: f,
                });
                return Ok(());
            }
        }
        if let Err(e) = self.checked(offset, total) {
            let name = if aio && write {
                "aio_write"
            } else if write {
                "writev"
            } else {
                "readv"
            };
            outln!("{name} failed: {}", strerror(&e));
            return Err(Failed);
        }
        let fill = if write { f.pattern.unwrap_or(0xcd) } else { 0 };
        let mut bufs: Vec<Vec<u8>> = if zero {
            Vec::new()
        } else {
            lens.iter().map(|&l| vec![fill; l as usize]).collect()
        };
        let raws: Vec<RawBuf> = bufs.iter_mut().map(|b| raw(b)).collect();
        let op = if zero {
            Op::WriteZeroes {
                offset,
                len: total,
                flags: if unmap {
                    WriteZeroesFlags::MAY_UNMAP
                } else {
                    WriteZeroesFlags::NONE
                },
            }
        } else if write {
            Op::Write {
                offset,
                bufs: raws,
                flags: if fua {
                    WriteFlags::FUA
                } else {
                    WriteFlags::NONE
                },
            }
        } else {
            Op::Read { offset, bufs: raws }
        };
        if aio {
            return self.submit_aio(op, write, offset, total, bufs, f);
        }
        let t = Instant::now();
        let r = self.checked(offset, total).and_then(|_| {
            if write {
                self.sync_write(op)
            } else {
                self.sync(op)
            }
        });
        let t = t.elapsed();
        if let Err(e) = r {
            outln!("{name} failed: {}", strerror(&e));
            return Err(Failed);
        }
        report_vec(write, offset, total, &bufs, t, f)
    }

    fn submit_aio(
        &mut self,
        op: Op,
        write: bool,
        offset: u64,
        total: u64,
        bufs: Vec<Vec<u8>>,
        flags: IoFlags,
    ) -> CmdResult {
        let fail = |e: qed::Error| {
            let name = if write { "aio_write" } else { "readv" };
            outln!("{name} failed: {}", strerror(&e));
            Failed
        };
        let o = self.open.as_ref().expect("checked: an image is open");
        let done = self.done.clone();
        let t = Instant::now();
        // The buffers move into the completion: their heap blocks (which `op` points into)
        // stay put and alive until it has run.
        let mut bufs = Some(bufs);
        // SAFETY: the RawBufs in `op` point into `bufs`' heap blocks, owned by the completion
        // closure until it runs; nothing else touches them meanwhile.
        let r = unsafe {
            o.queue.submit(
                op,
                0,
                Box::new(move |result| {
                    let elapsed = t.elapsed();
                    let bufs = bufs.take().unwrap_or_default();
                    if let Ok(mut d) = done.lock() {
                        d.push(AioDone {
                            write,
                            offset,
                            total,
                            bufs,
                            elapsed,
                            result,
                            flags,
                        });
                    }
                }),
            )
        };
        r.map_err(|e| fail(qed::Error::Failed(format!("submit refused: {e:?}"))))
    }

    fn push_refused(&self, d: AioDone) {
        self.refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(d);
    }

    /// Waits for outstanding aio requests and prints their results in completion order.
    fn drain_aio(&self) {
        if let Some(o) = &self.open {
            let _ = o.queue.drain();
        }
        self.print_aio();
    }

    /// Prints the aio results that are in, without waiting for the others (qemu-io's metadata
    /// queries run the event loop only until their own answer is in).
    fn print_aio(&self) {
        let take = |m: &Mutex<Vec<AioDone>>| {
            std::mem::take(&mut *m.lock().unwrap_or_else(|p| p.into_inner()))
        };
        // qemu runs bottom halves newest first, and before the I/O completions.
        let mut refused = take(&self.refused);
        refused.reverse();
        for d in refused.into_iter().chain(take(&self.done)) {
            if let Err(e) = &d.result {
                let name = if d.write { "aio_write" } else { "readv" };
                outln!("{name} failed: {}", strerror(e));
                continue;
            }
            let _ = report_vec(d.write, d.offset, d.total, &d.bufs, d.elapsed, d.flags);
        }
    }

    fn truncate(&mut self, args: &[String]) -> CmdResult {
        let (opts, rest) = getopt(args, "m:").map_err(|e| bad_option("truncate", e))?;
        for (_, v) in opts {
            if v.as_deref() != Some("off") {
                return Err(self.error(format!(
                    "Invalid preallocation mode: '{}'",
                    v.unwrap_or_default()
                )));
            }
        }
        if rest.len() != 1 {
            return Err(usage("truncate"));
        }
        let size = cvtnum(&rest[0])?;
        self.drain_aio();
        // QED driver's messages, in its order: an invalid size, then shrinking.
        if size % 512 != 0 {
            return Err(self.error("Invalid image size specified"));
        }
        if size < self.img().size() {
            return Err(self.error("Shrinking images is currently not supported"));
        }
        self.img().truncate(size).map_err(|e| match e {
            qed::Error::InvalidArgument { .. } | qed::Error::Unsupported { .. } => {
                self.error("Invalid image size specified")
            }
            e => self.error(e),
        })
    }

    fn discard(&mut self, args: &[String]) -> CmdResult {
        let (opts, rest) = getopt(args, "Cq").map_err(|e| bad_option("discard", e))?;
        let mut f = IoFlags::default();
        for (c, _) in opts {
            match c {
                'C' => f.machine = true,
                _ => f.quiet = true,
            }
        }
        if rest.len() != 2 {
            return Err(usage("discard"));
        }
        let offset = cvtnum(&rest[0])?;
        let count = cvtnum(&rest[1])?;
        check_length(count, &rest[1])?;
        let t = Instant::now();
        let r = self
            .checked(offset, count)
            .and_then(|_| self.sync(Op::Discard { offset, len: count }));
        let t = t.elapsed();
        if let Err(e) = r {
            outln!("discard failed: {}", strerror(&e));
            return Err(Failed);
        }
        if !f.quiet {
            print_report("discard", t, offset, count, count, 1, f.machine);
        }
        Ok(())
    }

    /// qemu-io's `map`: which ranges this image (not its backing file) holds, zero clusters
    /// included.
    fn map(&mut self) -> CmdResult {
        self.print_aio();
        let img = self.img();
        let ext = img.map(0, img.size()).map_err(|e| self.error(e))?;
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        for e in ext {
            let alloc = e.kind != qed::ExtentKind::Unallocated;
            match runs.last_mut() {
                Some(r) if r.2 == alloc && r.0 + r.1 == e.offset => r.1 += e.length,
                _ => runs.push((e.offset, e.length, alloc)),
            }
        }
        for (off, len, alloc) in runs {
            outln!(
                "{} (0x{len:x}) bytes {} at offset {} (0x{off:x})",
                cvtstr(len as f64),
                if alloc {
                    "    allocated"
                } else {
                    "not allocated"
                },
                cvtstr(off as f64)
            );
        }
        Ok(())
    }

    /// qemu-io's `alloc`: how much of the range this image (not its backing file) holds.
    fn alloc(&mut self, args: &[String]) -> CmdResult {
        let offset = cvtnum(&args[0])?;
        let count = match args.get(1) {
            Some(a) => cvtnum(a)?,
            None => 512,
        };
        self.print_aio();
        // Past the end, qemu-io counts only what the image has (0/0 at its end).
        let count = count.min(self.img().size().saturating_sub(offset));
        let ext = self.img().map(offset, count).map_err(|e| {
            outln!("alloc failed: {}", strerror(&e));
            Failed
        })?;
        let held: u64 = ext
            .iter()
            .filter(|e| e.kind != qed::ExtentKind::Unallocated)
            .map(|e| e.length)
            .sum();
        outln!(
            "{held}/{count} bytes allocated at offset {}",
            cvtstr(offset as f64)
        );
        Ok(())
    }

    /// `reopen -r|-w`: the library's [`Image::reopen`]; cache and driver options cannot change.
    fn reopen(&mut self, args: &[String]) -> CmdResult {
        let (opts, rest) = getopt(args, "c:o:rw").map_err(|e| bad_option("reopen", e))?;
        if !rest.is_empty() {
            return Err(usage("reopen"));
        }
        let mut writable = None;
        for (c, _) in opts {
            let want = match c {
                'r' => false,
                'w' => true,
                _ => return Err(self.error(format!("reopen -{c} is not supported by qed-io"))),
            };
            if writable.replace(want).is_some() {
                return Err(self.error("Only one -r/-w option may be given"));
            }
        }
        let writable = writable.unwrap_or(self.img().is_writable());
        self.img().reopen(writable).map_err(|e| self.error(e))
    }

    fn open_cmd(&mut self, args: &[String]) -> CmdResult {
        if self.open.is_some() || self.raw_node.is_some() {
            return Err(self.error("file open already, try 'help close'"));
        }
        let (opts, rest) = getopt(args, "rsCnkUt:d:o:").map_err(|e| bad_option("open", e))?;
        let mut s = self.settings.clone();
        s.read_only = false;
        s.snapshot = false;
        s.opts = OpenOpts::default();
        s.copy_on_read = false;
        for (c, v) in opts {
            let v = v.unwrap_or_default();
            let r = match (c, s.apply_open_option(c, &v)) {
                (_, Some(r)) => r,
                ('o', None) => s.opts.parse(&v),
                _ => Err(format!("open -{c} is not supported by qed-io")),
            };
            r.map_err(|e| self.error(e))?;
        }
        let name = match rest.as_slice() {
            [] => None,
            [path] => Some(path.as_str()),
            _ => return Err(usage("open")),
        };
        self.open(name, &s)
    }
}

fn unsupported() -> qed::Error {
    qed::Error::io("write", std::io::Error::from_raw_os_error(libc::ENOTSUP))
}

fn raw(b: &mut [u8]) -> RawBuf {
    RawBuf {
        ptr: b.as_mut_ptr(),
        len: b.len(),
    }
}

/// The report of readv/writev/aio_*: pattern check of reads, dump, then the two lines.
fn report_vec(
    write: bool,
    offset: u64,
    total: u64,
    bufs: &[Vec<u8>],
    t: Duration,
    f: IoFlags,
) -> CmdResult {
    let mut ret = Ok(());
    let data = || bufs.concat();
    if !write {
        if let Some(p) = f.pattern {
            if data().iter().any(|&b| b != p) {
                outln!("Pattern verification failed at offset {offset}, {total} bytes");
                ret = Err(Failed);
            }
        }
    }
    if f.quiet {
        return ret;
    }
    if f.dump {
        dump_buffer(&data(), offset);
    }
    let op = if write { "wrote" } else { "read" };
    print_report(op, t, offset, total, total, 1, f.machine);
    ret
}

/// qemu-io's one-line help: commands without arguments have none to print, except `map`,
/// whose empty argument string leaves two spaces.
fn help_line(n: &str, a: &str, o: &str) {
    if a.is_empty() && n != "map" {
        outln!("{n} -- {o}");
    } else {
        outln!("{n} {a} -- {o}");
    }
}

fn help(args: &[String]) {
    if let Some(name) = args.first() {
        match COMMANDS.iter().find(|c| c.0 == name.as_str()) {
            Some((n, a, o, ..)) => help_line(n, a, o),
            None => outln!("command {name} not found"),
        }
        return;
    }
    for (n, a, o, ..) in COMMANDS {
        help_line(n, a, o);
    }
    outln!("\nUse 'help commandname' for extended help.");
}
