//! `qed-img bench` with qemu-img bench's flags and output. The library has no asynchronous API,
//! so a queue depth of N is N threads issuing synchronous requests on one shared image; the
//! offsets are handed out in qemu-img's order (`offset += step`, wrapping at the image size).
//! The printed time covers the requests only, not the open or the final close, as qemu-img's.

use crate::common::{parse_fmt, parse_size, CliError, CliResult};
use crate::disk::{Disk, OpenMode};
use crate::BenchArgs;
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::sync::{Condvar, Mutex};
use std::time::Instant;

/// A zeroed buffer aligned for O_DIRECT.
struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: the buffer is owned memory, used by one thread at a time.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn new(len: usize, fill: u8) -> AlignedBuf {
        let layout = Layout::from_size_align(len.max(1), 4096).expect("valid layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory");
        let mut b = AlignedBuf { ptr, layout };
        b.as_mut().fill(fill);
        b
    }
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr points to layout.size() bytes we own.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in `new`.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

struct Sched {
    issued: u64,
    completed: u64,
    offset: u64,
    /// Batches of `flush_interval` requests whose drain-and-flush is done.
    flushed: u64,
    failed: Option<CliError>,
}

fn int_arg(v: &Option<String>, what: &str, default: u64, min: u64) -> CliResult<u64> {
    match v {
        None => Ok(default),
        Some(s) => s
            .parse::<u64>()
            .ok()
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

pub(crate) fn run(a: BenchArgs) -> CliResult<i32> {
    let fmt = parse_fmt(a.fmt.as_deref())?;
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
        Some(s) => s
            .parse::<u8>()
            .map_err(|_| CliError::new("Invalid pattern byte specified"))?,
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
    let direct = direct || a.native;
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
        "Sending {count} {} requests, {bufsize} bytes each, {depth} in parallel (starting at offset {start}, step size {step})",
        if a.write { "write" } else { "read" }
    );
    if flush_interval > 0 {
        println!("Sending flush every {flush_interval} requests");
    }
    let drain = flush_interval > 0 && !a.no_drain;
    let sched = Mutex::new(Sched {
        issued: 0,
        completed: 0,
        offset: start,
        flushed: 0,
        failed: None,
    });
    let cv = Condvar::new();
    let flush = || -> CliResult<()> {
        if ignore_flush {
            Ok(())
        } else {
            disk.flush()
        }
    };
    let threads = depth.min(count.max(1));
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut buf = AlignedBuf::new(bufsize as usize, pattern);
                loop {
                    let off = {
                        let mut g = sched.lock().unwrap_or_else(|e| e.into_inner());
                        loop {
                            if g.failed.is_some() || g.issued >= count {
                                return;
                            }
                            // Draining: the next batch waits until the last one is flushed.
                            if drain && g.issued > 0 && g.issued % flush_interval == 0
                                && g.flushed < g.issued / flush_interval
                            {
                                g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
                                continue;
                            }
                            break;
                        }
                        let off = g.offset;
                        g.issued += 1;
                        g.offset += step;
                        if image_size == 0 {
                            g.offset = 0;
                        } else {
                            g.offset %= image_size;
                        }
                        off
                    };
                    let r = if !matches!(off.checked_add(bufsize), Some(e) if e <= image_size) {
                        // qemu's block layer refuses requests past the end with EIO.
                        Err(CliError::new(format!(
                            "Input/output error (offset {off} + {bufsize} is past the image size {image_size})"
                        )))
                    } else if a.write {
                        disk.write_at(off, buf.as_mut()).and_then(|_| {
                            if flush_each {
                                flush()
                            } else {
                                Ok(())
                            }
                        })
                    } else {
                        disk.read_at(off, buf.as_mut())
                    };
                    let mut g = sched.lock().unwrap_or_else(|e| e.into_inner());
                    if let Err(e) = r {
                        g.failed.get_or_insert(CliError::new(format!("Failed request: {}", e.msg)));
                        cv.notify_all();
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
                                    g.failed.get_or_insert(CliError::new(format!(
                                        "Failed flush request: {}",
                                        e.msg
                                    )));
                                }
                                g.flushed = batches;
                                cv.notify_all();
                            }
                        } else if (count - g.issued) % flush_interval == 0 {
                            drop(g);
                            if let Err(e) = flush() {
                                let mut g = sched.lock().unwrap_or_else(|e| e.into_inner());
                                g.failed.get_or_insert(CliError::new(format!(
                                    "Failed flush request: {}",
                                    e.msg
                                )));
                                cv.notify_all();
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    let elapsed = t0.elapsed();
    let failed = sched.into_inner().unwrap_or_else(|e| e.into_inner()).failed;
    if let Some(e) = failed {
        return Err(e);
    }
    println!("Run completed in {:.3} seconds.", elapsed.as_secs_f64());
    disk.close()?;
    Ok(0)
}
