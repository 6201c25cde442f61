// SPDX-License-Identifier: MIT OR Apache-2.0
//! `qed-img bench` with qemu-img bench's flags and output.
//!
//! QED images go through libqed's asynchronous queue ([`AioQueue`], the engine behind the C
//! `qed_aio_*` functions), driven by qemu-img 10.0.2's `bench_cb` state machine as
//! `benches/qedbench.c` drives it: `depth` requests are started, each completion starts the
//! next one, and the offset advances by `step` after each submission, wrapping at the image size
//! (`offset %= image_size`; the first request uses `-o` as given). With `--flush-interval=N` a
//! flush is due each time a completion leaves a multiple of N requests not yet started: the queue
//! is drained first (no request starts until every one in flight has completed, then the flush
//! is sent and the next requests start from its completion); with `--no-drain` the flush is sent
//! alongside the requests in flight. `-t writethrough` and `directsync`: a write counts as
//! complete once a flush sent after it has completed. `-t unsafe`: no flush is sent (a drain
//! point still drains). Every slot in flight has its own aligned buffer, owned by the state that
//! the completions keep alive.
//!
//! Raw files (`-f raw`): the tool's `Disk` has no asynchronous path for them, so there depth N
//! is N threads issuing synchronous requests on the shared file, with the offsets handed out in
//! the same order (`offset += step`, wrapping at the file size) and the flushes after the same
//! numbers of requests.
//!
//! The printed time covers the requests only, not the open nor the final close (nor a flush
//! still in flight after the last request), as qemu-img's. A failed request ends the run: the
//! command exits 1 with `Failed request: ...`.

use crate::common::{parse_fmt, parse_size, CliError, CliResult};
use crate::disk::{Disk, OpenMode};
use crate::BenchArgs;
use qed::aio::{AioOptions, AioQueue, Op, RawBuf, SubmitError};
use qed::{Image, WriteFlags};
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// A buffer aligned for O_DIRECT, filled with one byte.
struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: the buffer is owned memory; its bytes are only reached through `as_mut` (which needs
// `&mut`) or through the raw segment of the one request that uses the buffer at a time.
unsafe impl Send for AlignedBuf {}
// SAFETY: `&AlignedBuf` gives out only the pointer value (`segment`), never the bytes.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    fn new(len: usize, fill: u8) -> CliResult<AlignedBuf> {
        let oom = || CliError::new(format!("out of memory ({len} bytes of buffer)"));
        let layout = Layout::from_size_align(len.max(1), 4096).map_err(|_| oom())?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(oom());
        }
        let mut b = AlignedBuf { ptr, layout };
        b.as_mut().fill(fill);
        Ok(b)
    }
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr points to layout.size() bytes we own, borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
    /// The whole buffer as a segment of a queued request.
    fn segment(&self) -> RawBuf {
        RawBuf {
            ptr: self.ptr,
            len: self.layout.size(),
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in `new`.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

/// The run's settings, from the command line.
#[derive(Clone, Copy, Debug)]
struct Params {
    count: u64,
    depth: u64,
    bufsize: u64,
    step: u64,
    start: u64,
    pattern: u8,
    write: bool,
    /// Flush every N requests (0: never).
    flush_interval: u64,
    /// Drain the requests in flight before each of those flushes (not `--no-drain`).
    drain: bool,
    /// writethrough / directsync writes: a flush after each write, before it counts as done.
    flush_each: bool,
    /// `-t unsafe`: flushes are not sent.
    ignore_flush: bool,
}

/// A number as qemu-img bench reads its counts and pattern (`qemu_strtoul`, base 0): leading
/// white space, an optional sign (only `-0` survives it here), then `0x` hex, `0` octal or
/// decimal digits, and nothing after them.
fn parse_ulong(s: &str) -> Option<u64> {
    let s = s.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (neg, s) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let (digits, radix) = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None if s.len() > 1 && s.starts_with('0') => (&s[1..], 8),
        None => (s, 10),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let v = u64::from_str_radix(digits, radix).ok()?;
    (!neg || v == 0).then_some(v)
}

fn int_arg(v: &Option<String>, what: &str, default: u64, min: u64) -> CliResult<u64> {
    match v {
        None => Ok(default),
        Some(s) => parse_ulong(s)
            .filter(|&n| n >= min && n <= i32::MAX as u64)
            .ok_or_else(|| CliError::new(format!("Invalid {what} specified"))),
    }
}

fn size_arg(v: &Option<String>, what: &str, default: u64) -> CliResult<u64> {
    match v {
        None => Ok(default),
        Some(s) => parse_size(s).ok_or_else(|| CliError::new(format!("Invalid {what} specified"))),
    }
}

/// The settings, and whether to open with O_DIRECT.
fn params(a: &BenchArgs) -> CliResult<(Params, bool)> {
    let count = int_arg(&a.count, "request count", 75000, 0)?;
    let depth = int_arg(&a.depth, "queue depth", 64, 1)?;
    let bufsize = size_arg(&a.buf_size, "buffer size", 4096)?;
    if bufsize == 0 || bufsize > i32::MAX as u64 {
        return Err(CliError::new("Invalid buffer size specified"));
    }
    let step = size_arg(&a.step, "step size", 0)?;
    if step > i32::MAX as u64 {
        return Err(CliError::new("Invalid step size specified"));
    }
    let step = if step == 0 { bufsize } else { step };
    let start = size_arg(&a.offset, "offset", 0)?;
    let pattern = match &a.pattern {
        None => 0u8,
        Some(s) => parse_ulong(s)
            .and_then(|v| u8::try_from(v).ok())
            .ok_or_else(|| CliError::new("Invalid pattern byte specified"))?,
    };
    let flush_interval = int_arg(&a.flush_interval, "flush interval", 0, 0)?;
    if a.pattern.is_some() && !a.write {
        return Err(CliError::new("--pattern is only available in write tests"));
    }
    if flush_interval > 0 && !a.write {
        return Err(CliError::new(
            "--flush-interval is only available in write tests",
        ));
    }
    if a.no_drain && flush_interval == 0 {
        return Err(CliError::new("--no-drain requires --flush-interval"));
    }
    let (direct, flush_each, ignore_flush) = match a.cache.as_deref().unwrap_or("writeback") {
        "writeback" => (false, false, false),
        "none" => (true, false, false),
        "writethrough" => (false, true, false),
        "directsync" => (true, true, false),
        "unsafe" => (false, false, true),
        c => return Err(CliError::new(format!("Invalid cache mode: {c}"))),
    };
    if let Some(aio) = a.aio.as_deref() {
        if !matches!(aio, "threads" | "native" | "io_uring") {
            return Err(CliError::new(format!("Invalid aio option: {aio}")));
        }
    }
    let p = Params {
        count,
        depth,
        bufsize,
        step,
        start,
        pattern,
        write: a.write,
        flush_interval,
        drain: flush_interval > 0 && !a.no_drain,
        flush_each: flush_each && a.write,
        ignore_flush,
    };
    Ok((p, direct || a.native))
}

pub(crate) fn run(a: BenchArgs) -> CliResult<i32> {
    let fmt = parse_fmt(a.fmt.as_deref())?;
    let (p, direct) = params(&a)?;
    let disk = Disk::open(
        &a.file,
        fmt,
        &OpenMode {
            writable: a.write,
            force_share: a.force_share && !a.write,
            direct,
            ..Default::default()
        },
    )?;
    let image_size = disk.size()?;
    println!(
        "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
        p.count,
        if p.write { "write" } else { "read" },
        p.bufsize,
        p.depth,
        p.start,
        p.step
    );
    if p.flush_interval > 0 {
        println!("Sending flush every {} requests", p.flush_interval);
    }
    let elapsed = match disk.image() {
        Some(img) => run_aio(img, &disk.path, p, image_size)?,
        None => run_threads(&disk, p, image_size)?,
    };
    println!("Run completed in {:.3} seconds.", elapsed.as_secs_f64());
    disk.close()?;
    Ok(0)
}

/// qemu's block layer refuses requests past the end with EIO.
fn past_end(offset: u64, len: u64, image_size: u64) -> Option<CliError> {
    match offset.checked_add(len) {
        Some(end) if end <= image_size => None,
        _ => Some(CliError::new(format!(
            "Failed request: Input/output error (offset {offset} + {len} is past the image size {image_size})"
        ))),
    }
}

/// The next offset after `offset` (qemu-img 10.0.2: `offset += step; offset %= image_size`).
fn next_offset(offset: u64, step: u64, image_size: u64) -> u64 {
    if image_size == 0 {
        0
    } else {
        offset.saturating_add(step) % image_size
    }
}

/// `e` prefixed with what failed.
fn wrap(what: &str, e: CliError) -> CliError {
    CliError::new(format!("{what}: {}", e.msg))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------- QED: the asynchronous queue

/// What a completion finishes.
#[derive(Clone, Copy, Debug)]
enum Event {
    /// The first call, from the main thread: nothing finished.
    Kick,
    /// A read or write from slot `slot` at `offset`.
    Request { slot: usize, offset: u64 },
    /// writethrough: the flush sent after slot `slot`'s write.
    WriteFlushed { slot: usize },
    /// The flush sent with the queue drained.
    DrainedFlush,
    /// A flush sent with requests in flight (`--no-drain`).
    UndrainedFlush,
}

/// qemu-img's `BenchData` counters.
struct Counters {
    /// Requests not completed yet.
    n: u64,
    in_flight: u64,
    /// Offset of the next request.
    offset: u64,
    /// Slots not in a request.
    free: Vec<usize>,
    /// The first failure: nothing more is submitted once it is set.
    failed: Option<CliError>,
}

struct AioBench {
    queue: AioQueue,
    p: Params,
    path: String,
    image_size: u64,
    /// One buffer per slot; a slot is in one request (and its writethrough flush) at a time.
    bufs: Vec<AlignedBuf>,
    state: Mutex<Counters>,
    /// Signalled when `n` reaches 0 or a request fails.
    finished: Condvar,
}

impl AioBench {
    /// qemu-img's `bench_cb`, for completions on the queue's workers and the first kick.
    fn complete(self: &Arc<Self>, ev: Event, r: qed::Result<()>) {
        let mut st = lock(&self.state);
        if st.failed.is_some() {
            return;
        }
        let r = match r {
            Ok(()) => self.advance(&mut st, ev),
            Err(e) => Err(self.failure(ev, &e)),
        };
        if let Err(e) = r {
            st.failed = Some(e);
        }
        if st.n == 0 || st.failed.is_some() {
            self.finished.notify_all();
        }
    }

    fn advance(self: &Arc<Self>, st: &mut Counters, ev: Event) -> CliResult<()> {
        let p = &self.p;
        match ev {
            // Just finished a flush with the queue drained: start the next requests.
            Event::Kick | Event::DrainedFlush => {}
            Event::UndrainedFlush => return Ok(()),
            Event::Request { slot, .. } if p.flush_each => {
                return self.submit(Event::WriteFlushed { slot }, Op::Flush);
            }
            Event::Request { slot, .. } | Event::WriteFlushed { slot } => {
                let remaining = st.n - st.in_flight;
                st.n -= 1;
                st.in_flight -= 1;
                st.free.push(slot);
                // Time for a flush? Drain the queue if asked, then flush.
                if p.flush_interval > 0 && remaining % p.flush_interval == 0 {
                    if p.drain {
                        if st.in_flight > 0 {
                            return Ok(());
                        }
                        if !p.ignore_flush {
                            return self.submit(Event::DrainedFlush, Op::Flush);
                        }
                    } else if !p.ignore_flush {
                        self.submit(Event::UndrainedFlush, Op::Flush)?;
                    }
                }
            }
        }
        while st.n > st.in_flight && st.in_flight < p.depth {
            let Some(slot) = st.free.pop() else { break };
            let offset = st.offset;
            st.in_flight += 1;
            st.offset = next_offset(offset, p.step, self.image_size);
            if let Some(e) = past_end(offset, p.bufsize, self.image_size) {
                return Err(e);
            }
            let bufs = vec![self.bufs[slot].segment()];
            let op = if p.write {
                Op::Write {
                    offset,
                    bufs,
                    flags: WriteFlags::NONE,
                }
            } else {
                Op::Read { offset, bufs }
            };
            self.submit(Event::Request { slot, offset }, op)?;
        }
        Ok(())
    }

    fn submit(self: &Arc<Self>, ev: Event, op: Op) -> CliResult<()> {
        let me = Arc::clone(self);
        // SAFETY: the only buffer an `op` names is the slot's, in `self.bufs`: the completion
        // holds an `Arc` to `self`, so the buffer outlives the request, and the slot is off the
        // free list until that completion, so nothing else reads or writes the buffer meanwhile.
        unsafe {
            self.queue
                .submit(op, 0, Box::new(move |r| me.complete(ev, r)))
        }
        .map_err(|e| {
            CliError::new(format!(
                "Failed to issue request: {}",
                match e {
                    SubmitError::Full => "queue full",
                    SubmitError::Closed => "queue closed",
                }
            ))
        })
    }

    fn failure(&self, ev: Event, e: &qed::Error) -> CliError {
        let path = &self.path;
        CliError::new(match ev {
            Event::Request { offset, .. } => format!(
                "Failed request: error while {} {path} at offset {offset}: {e}",
                if self.p.write { "writing" } else { "reading" }
            ),
            _ => format!("Failed flush request: error while flushing {path}: {e}"),
        })
    }
}

fn run_aio(img: &Arc<Image>, path: &str, p: Params, image_size: u64) -> CliResult<Duration> {
    // At most `depth` requests can be in flight, fewer when there are fewer requests.
    let slots = p.depth.min(p.count) as usize;
    let bufs = (0..slots)
        .map(|_| AlignedBuf::new(p.bufsize as usize, p.pattern))
        .collect::<CliResult<Vec<_>>>()?;
    let mut opts = AioOptions::for_image(img);
    // Room for every request, a writethrough flush for each, the drained flush, and the flushes
    // that --no-drain lets pile up behind the writes.
    let flushes = p.count.checked_div(p.flush_interval).unwrap_or(0);
    opts.queue_depth = usize::try_from(2 * p.depth + 2 + flushes).unwrap_or(usize::MAX);
    let queue = AioQueue::new(img.clone(), opts)
        .map_err(|e| CliError::new(format!("{path}: starting the request queue: {e}")))?;
    let b = Arc::new(AioBench {
        queue,
        p,
        path: path.to_string(),
        image_size,
        bufs,
        state: Mutex::new(Counters {
            n: p.count,
            in_flight: 0,
            offset: p.start,
            free: (0..slots).rev().collect(),
            failed: None,
        }),
        finished: Condvar::new(),
    });
    let t0 = Instant::now();
    b.complete(Event::Kick, Ok(()));
    {
        let mut st = lock(&b.state);
        while st.n > 0 && st.failed.is_none() {
            st = b.finished.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
    }
    let elapsed = t0.elapsed();
    // What is still in flight (a last flush, or the rest after a failure) completes before the
    // buffers can go; the completions then hold no more references to `b`.
    let drained = b.queue.drain();
    if let Some(e) = lock(&b.state).failed.take() {
        return Err(e);
    }
    drained.map_err(|e| CliError::new(format!("{path}: {e}")))?;
    b.queue
        .shutdown()
        .map_err(|e| CliError::new(format!("{path}: {e}")))?;
    Ok(elapsed)
}

// ---------------------------------------------------------------- raw: a pool of threads

struct Sched {
    issued: u64,
    completed: u64,
    offset: u64,
    /// Batches of `flush_interval` requests whose drain-and-flush is done.
    flushed: u64,
    failed: Option<CliError>,
}

fn run_threads(disk: &Disk, p: Params, image_size: u64) -> CliResult<Duration> {
    let Params {
        count,
        flush_interval,
        drain,
        ..
    } = p;
    let sched = Mutex::new(Sched {
        issued: 0,
        completed: 0,
        offset: p.start,
        flushed: 0,
        failed: None,
    });
    let cv = Condvar::new();
    let flush = || -> CliResult<()> {
        if p.ignore_flush {
            Ok(())
        } else {
            disk.flush()
        }
    };
    // Records the first failure; every thread stops at its next request.
    let fail = |e: CliError| {
        lock(&sched).failed.get_or_insert(e);
        cv.notify_all();
    };
    let bufs = (0..p.depth.min(count.max(1)))
        .map(|_| AlignedBuf::new(p.bufsize as usize, p.pattern))
        .collect::<CliResult<Vec<_>>>()?;
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for mut buf in bufs {
            let (sched, cv, flush, fail) = (&sched, &cv, &flush, &fail);
            s.spawn(move || loop {
                let off = {
                    let mut g = lock(sched);
                    loop {
                        if g.failed.is_some() || g.issued >= count {
                            return;
                        }
                        // Draining: the next batch waits until the last one is flushed.
                        if drain
                            && g.issued > 0
                            && g.issued % flush_interval == 0
                            && g.flushed < g.issued / flush_interval
                        {
                            g = cv.wait(g).unwrap_or_else(PoisonError::into_inner);
                            continue;
                        }
                        break;
                    }
                    let off = g.offset;
                    g.issued += 1;
                    g.offset = next_offset(off, p.step, image_size);
                    off
                };
                if let Some(e) = past_end(off, p.bufsize, image_size) {
                    return fail(e);
                }
                let r = if p.write {
                    disk.write_at(off, buf.as_mut()).and_then(|_| {
                        if p.flush_each {
                            flush()
                        } else {
                            Ok(())
                        }
                    })
                } else {
                    disk.read_at(off, buf.as_mut())
                };
                if let Err(e) = r {
                    return fail(wrap("Failed request", e));
                }
                let mut g = lock(sched);
                if g.failed.is_some() {
                    return;
                }
                g.completed += 1;
                if flush_interval > 0 {
                    if drain {
                        let batches = g.issued.div_ceil(flush_interval);
                        if g.completed == g.issued
                            && (g.issued % flush_interval == 0 || g.issued == count)
                            && g.flushed < batches
                        {
                            // Everything issued is done: flush with the queue drained.
                            if let Err(e) = flush() {
                                drop(g);
                                return fail(wrap("Failed flush request", e));
                            }
                            g.flushed = batches;
                            cv.notify_all();
                        }
                    } else if (count - g.issued) % flush_interval == 0 {
                        drop(g);
                        if let Err(e) = flush() {
                            return fail(wrap("Failed flush request", e));
                        }
                    }
                }
            });
        }
    });
    let elapsed = t0.elapsed();
    match sched
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
        .failed
    {
        Some(e) => Err(e),
        None => Ok(elapsed),
    }
}
