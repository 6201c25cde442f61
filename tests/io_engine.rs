// SPDX-License-Identifier: MIT OR Apache-2.0
//! The process's I/O engine: io_uring and the thread pool give the same bytes, threads stay
//! bounded whatever the number of images, images take turns, absurd settings are refused.
//! CI runs the whole suite twice, with `QED_IO_ENGINE=io_uring` and `QED_IO_ENGINE=threads`.

use qed::aio::{
    AioOptions, AioQueue, Delivery, Engine, EngineOptions, IoBackend, Op, RawBuf, MAX_THREADS,
};
use qed::storage::MemStorage;
use qed::{BackingFormat, CreateOptions, Error, Image, OpenOptions, WriteFlags};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// A buffer aligned for O_DIRECT.
struct Aligned {
    ptr: *mut u8,
    len: usize,
}
impl Aligned {
    fn new(len: usize) -> Self {
        let l = std::alloc::Layout::from_size_align(len.max(4096), 4096).unwrap();
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(l) };
        assert!(!ptr.is_null());
        Aligned { ptr, len }
    }
    fn slice(&mut self) -> &mut [u8] {
        // SAFETY: `len` bytes allocated above, borrowed mutably through self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}
impl Drop for Aligned {
    fn drop(&mut self) {
        let l = std::alloc::Layout::from_size_align(self.len.max(4096), 4096).unwrap();
        // SAFETY: allocated in new() with this layout.
        unsafe { std::alloc::dealloc(self.ptr, l) }
    }
}

/// A write of all of `b` at `offset`.
fn write_op(offset: u64, b: &mut [u8]) -> Op {
    Op::Write {
        offset,
        bufs: vec![RawBuf {
            ptr: b.as_mut_ptr(),
            len: b.len(),
        }],
        flags: WriteFlags::NONE,
    }
}

/// A read into all of `b` from `offset`.
fn read_op(offset: u64, b: &mut [u8]) -> Op {
    Op::Read {
        offset,
        bufs: vec![RawBuf {
            ptr: b.as_mut_ptr(),
            len: b.len(),
        }],
    }
}

/// The request segments of `parts`.
fn raw(parts: &[Aligned]) -> Vec<RawBuf> {
    parts
        .iter()
        .map(|p| RawBuf {
            ptr: p.ptr,
            len: p.len,
        })
        .collect()
}

fn submit_wait(q: &AioQueue, op: Op) -> qed::Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    // SAFETY: the caller's buffers outlive this call, which waits for the completion.
    unsafe {
        q.submit(
            op,
            0,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        )
    }
    .unwrap();
    rx.recv().unwrap()
}

fn create(path: &Path, size: u64, backing: Option<&str>) {
    let mut c = CreateOptions::new(size);
    if let Some(b) = backing {
        c.backing_file = Some(b.into());
        c.backing_format = Some(BackingFormat::Raw);
    }
    Image::create(path, &c).unwrap();
}

/// Random reads and writes of every shape (unaligned, several buffers, across clusters, over
/// zero clusters, holes and a backing file) through the async queue, checked against a model
/// and against a synchronous read; returns the engine's counters.
fn model_run(dir: &Path, direct: bool, engine: &Engine) {
    let size = 8u64 << 20;
    let base = dir.join("base.raw");
    let mut base_bytes = vec![0u8; size as usize];
    let mut seed = 0x9e3779b97f4a7c15u64 ^ direct as u64;
    for (i, b) in base_bytes.iter_mut().enumerate() {
        *b = (i as u64 * 7 + 3) as u8;
    }
    std::fs::write(&base, &base_bytes).unwrap();
    for (name, backing) in [("plain.qed", None), ("top.qed", Some("base.raw"))] {
        let p = dir.join(name);
        create(&p, size, backing);
        let mut o = OpenOptions::read_write();
        o.direct = direct;
        let img = Arc::new(Image::open(&p, &o).unwrap());
        let q = AioQueue::with_engine(img.clone(), AioOptions::default(), engine).unwrap();
        let mut model = if backing.is_some() {
            base_bytes.clone()
        } else {
            vec![0u8; size as usize]
        };
        for step in 0..300 {
            // Aligned requests (4 KiB multiples) most of the time, so O_DIRECT takes the ring;
            // odd ones exercise the fallback.
            let odd = rng(&mut seed) % 5 == 0;
            let (off, len) = if odd {
                let off = rng(&mut seed) % (size - 200_000);
                (off, 1 + rng(&mut seed) % 150_000)
            } else {
                let off = (rng(&mut seed) % (size / 4096 - 40)) * 4096;
                (off, 4096 * (1 + rng(&mut seed) % 36))
            };
            let nbufs = 1 + (rng(&mut seed) % 3) as usize;
            let mut parts = Vec::new();
            let mut left = len as usize;
            for i in 0..nbufs {
                let l = if i + 1 == nbufs {
                    left
                } else if odd {
                    left / 2
                } else {
                    (left / 2) & !4095
                };
                left -= l;
                parts.push(Aligned::new(l));
            }
            parts.retain(|p| p.len > 0);
            let kind = rng(&mut seed) % 4;
            if kind == 0 {
                // zeroes, sometimes over whole clusters
                submit_wait(
                    &q,
                    Op::WriteZeroes {
                        offset: off,
                        len,
                        flags: Default::default(),
                    },
                )
                .unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            } else if kind == 1 {
                let mut at = off as usize;
                for p in parts.iter_mut() {
                    let v = (step as u8).wrapping_mul(31).wrapping_add(at as u8);
                    p.slice().fill(v);
                    model[at..at + p.len].fill(v);
                    at += p.len;
                }
                let op = Op::Write {
                    offset: off,
                    bufs: raw(&parts),
                    flags: WriteFlags::NONE,
                };
                submit_wait(&q, op).unwrap();
            } else {
                let op = Op::Read {
                    offset: off,
                    bufs: raw(&parts),
                };
                submit_wait(&q, op).unwrap();
                let mut at = off as usize;
                for p in parts.iter_mut() {
                    let l = p.len;
                    assert!(
                        p.slice() == &model[at..at + l],
                        "{name} direct={direct} step {step}: read {at:#x}+{:#x} differs",
                        p.len
                    );
                    at += p.len;
                }
            }
        }
        // Many reads in flight at once, then the whole image through the synchronous path.
        let mut bufs: Vec<Aligned> = (0..64).map(|_| Aligned::new(65536)).collect();
        let done = Arc::new(AtomicUsize::new(0));
        for (i, b) in bufs.iter_mut().enumerate() {
            let d = done.clone();
            // SAFETY: `bufs` outlives the drain below.
            unsafe {
                q.submit(
                    Op::Read {
                        offset: i as u64 * 65536 * 2,
                        bufs: vec![RawBuf {
                            ptr: b.ptr,
                            len: b.len,
                        }],
                    },
                    0,
                    Box::new(move |r| {
                        r.unwrap();
                        d.fetch_add(1, Ordering::SeqCst);
                    }),
                )
            }
            .unwrap();
        }
        q.drain().unwrap();
        assert_eq!(done.load(Ordering::SeqCst), 64);
        for (i, b) in bufs.iter_mut().enumerate() {
            let at = i * 65536 * 2;
            assert!(
                b.slice() == &model[at..at + 65536],
                "{name}: parallel read {i}"
            );
        }
        let mut all = vec![0u8; size as usize];
        img.read_at(0, &mut all).unwrap();
        assert!(
            all == model,
            "{name} direct={direct}: synchronous read differs"
        );
        q.shutdown().unwrap();
        drop(q);
        Arc::try_unwrap(img).ok().unwrap().close().unwrap();
        let out = std::process::Command::new("qemu-img")
            .args(["check", "-f", "qed"])
            .arg(&p)
            .output()
            .expect("qemu-img (qemu-utils) is needed by this test");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

fn backends() -> Vec<Engine> {
    let mut v = vec![Engine::new(EngineOptions::new(3, IoBackend::Threads)).unwrap()];
    match Engine::new(EngineOptions::new(3, IoBackend::IoUring)) {
        Ok(e) => v.push(e),
        // Where the kernel refuses io_uring, only an explicit request may fail, with a message.
        Err(e) => {
            assert!(e.to_string().contains("io_uring"), "{e}");
            assert_ne!(std::env::var("QED_IO_ENGINE").as_deref(), Ok("io_uring"));
        }
    }
    v
}

#[test]
fn both_backends_read_back_what_was_written_buffered_and_direct() {
    for engine in backends() {
        for direct in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let before = engine.stats();
            model_run(dir.path(), direct, &engine);
            let after = engine.stats();
            assert!(after.pool_requests > before.pool_requests);
            if engine.backend() == IoBackend::IoUring {
                // Reads and in-place writes with cached tables take the ring.
                assert!(
                    after.ring_requests > before.ring_requests + 100,
                    "{before:?} -> {after:?}"
                );
            } else {
                assert_eq!(after.ring_requests, 0);
            }
        }
    }
}

#[test]
fn the_process_engine_is_the_one_qed_io_engine_names() {
    let e = Engine::global().unwrap();
    match std::env::var("QED_IO_ENGINE").as_deref() {
        Ok("io_uring") => assert_eq!(e.backend(), IoBackend::IoUring),
        Ok("threads") => assert_eq!(e.backend(), IoBackend::Threads),
        _ => assert!(matches!(
            e.backend(),
            IoBackend::IoUring | IoBackend::Threads
        )),
    }
    assert!(e.max_threads() <= 2 * std::thread::available_parallelism().unwrap().get() + 4);
}

fn mem_image() -> Arc<Image> {
    let s = Arc::new(MemStorage::new());
    Image::create_on(&*s, &CreateOptions::new(64 << 20)).unwrap();
    Arc::new(Image::open_storage(s, &OpenOptions::read_write()).unwrap())
}

#[test]
fn absurd_settings_are_refused_before_anything_starts() {
    let e = Engine::new(EngineOptions::new(2, IoBackend::Threads)).unwrap();
    let img = mem_image();
    for (opts, what) in [
        (
            AioOptions {
                workers: 1_000_000,
                ..Default::default()
            },
            "workers",
        ),
        (
            AioOptions {
                queue_depth: 0,
                ..Default::default()
            },
            "queue_depth",
        ),
        (
            AioOptions {
                queue_depth: usize::MAX,
                ..Default::default()
            },
            "queue_depth",
        ),
    ] {
        match AioQueue::with_engine(img.clone(), opts, &e) {
            Err(Error::InvalidArgument { what: w, .. }) => assert_eq!(w, what),
            Err(other) => panic!("{what}: {other}"),
            Ok(_) => panic!("{what}: accepted"),
        }
    }
    assert_eq!(e.threads(), 0);
    match Engine::new(EngineOptions::new(MAX_THREADS + 1, IoBackend::Threads)) {
        Err(Error::InvalidArgument { what, .. }) => assert_eq!(what, "threads"),
        other => panic!("{other:?}"),
    }
    // More workers than the engine has threads: the engine's bound wins.
    let q = AioQueue::with_engine(
        img,
        AioOptions {
            workers: 500,
            ..Default::default()
        },
        &e,
    )
    .unwrap();
    submit_wait(&q, Op::Flush).unwrap();
    assert!(e.threads() <= 2);
}

#[test]
fn many_images_share_a_bounded_number_of_threads() {
    let e = Engine::new(EngineOptions::new(4, IoBackend::Threads)).unwrap();
    let queues: Vec<AioQueue> = (0..60)
        .map(|_| AioQueue::with_engine(mem_image(), AioOptions::default(), &e).unwrap())
        .collect();
    // Idle images cost no thread.
    assert_eq!(e.threads(), 0);
    let mut bufs: Vec<Vec<u8>> = (0..60 * 8).map(|i| vec![i as u8; 4096]).collect();
    let done = Arc::new(AtomicUsize::new(0));
    for (i, b) in bufs.iter_mut().enumerate() {
        let d = done.clone();
        // SAFETY: `bufs` outlives the drains below.
        unsafe {
            queues[i % 60].submit(
                write_op((i / 60) as u64 * 65536, b),
                0,
                Box::new(move |r| {
                    r.unwrap();
                    d.fetch_add(1, Ordering::SeqCst);
                }),
            )
        }
        .unwrap();
    }
    for q in &queues {
        q.drain().unwrap();
    }
    assert_eq!(done.load(Ordering::SeqCst), 480);
    let t = e.threads();
    assert!((1..=4).contains(&t), "{t} threads");
    for (i, q) in queues.iter().enumerate() {
        let mut b = vec![0u8; 4096];
        q.image().read_at(7 * 65536, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == (7 * 60 + i) as u8));
    }
}

#[test]
fn a_busy_image_does_not_starve_another() {
    // One thread: the order in which it takes requests is the order they complete.
    let e = Engine::new(EngineOptions::new(1, IoBackend::Threads)).unwrap();
    let busy = AioQueue::with_engine(mem_image(), AioOptions::default(), &e).unwrap();
    let other = AioQueue::with_engine(mem_image(), AioOptions::default(), &e).unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let hold = Arc::new(std::sync::Barrier::new(2));
    // The first request holds the only thread until everything else is queued.
    {
        let h = hold.clone();
        // SAFETY: no buffers.
        unsafe {
            busy.submit(
                Op::Flush,
                0,
                Box::new(move |_| {
                    h.wait();
                }),
            )
        }
        .unwrap();
    }
    let mut bufs: Vec<Vec<u8>> = (0..200).map(|_| vec![1u8; 4096]).collect();
    for (i, b) in bufs.iter_mut().enumerate() {
        let o = order.clone();
        // SAFETY: `bufs` outlives the drains below.
        unsafe {
            busy.submit(
                write_op(i as u64 * 4096, b),
                0,
                Box::new(move |_| o.lock().unwrap().push("busy")),
            )
        }
        .unwrap();
    }
    {
        let o = order.clone();
        // SAFETY: no buffers.
        unsafe {
            other.submit(
                Op::Flush,
                0,
                Box::new(move |_| o.lock().unwrap().push("other")),
            )
        }
        .unwrap();
    }
    hold.wait();
    busy.drain().unwrap();
    other.drain().unwrap();
    let order = order.lock().unwrap();
    let at = order.iter().position(|&s| s == "other").unwrap();
    assert!(
        at <= 2,
        "the other image waited for {at} requests of the busy one"
    );
}

#[test]
fn event_loop_delivery_works_on_both_backends() {
    for engine in backends() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e.qed");
        create(&p, 4 << 20, None);
        let o = OpenOptions::read_write();
        let img = Arc::new(Image::open(&p, &o).unwrap());
        img.write_at(0, &[0xabu8; 65536]).unwrap();
        let q = AioQueue::with_engine(
            img,
            AioOptions {
                delivery: Delivery::EventLoop,
                ..Default::default()
            },
            &engine,
        )
        .unwrap();
        let mut bufs: Vec<Vec<u8>> = (0..16).map(|_| vec![0u8; 4096]).collect();
        let done = Arc::new(AtomicUsize::new(0));
        let me = std::thread::current().id();
        for (i, b) in bufs.iter_mut().enumerate() {
            let d = done.clone();
            // SAFETY: `bufs` outlives the drain below.
            unsafe {
                q.submit(
                    read_op(i as u64 * 4096, b),
                    0,
                    Box::new(move |r| {
                        r.unwrap();
                        // Event-loop completions run on the polling thread only.
                        assert_eq!(std::thread::current().id(), me);
                        d.fetch_add(1, Ordering::SeqCst);
                    }),
                )
            }
            .unwrap();
        }
        q.drain().unwrap();
        assert_eq!(done.load(Ordering::SeqCst), 16);
        assert!(bufs.iter().all(|b| b.iter().all(|&x| x == 0xab)));
    }
}

/// After `shutdown` no engine thread holds the image any more: the caller's reference is the
/// last, so dropping it closes the image there and then (qed-img's close depends on it).
#[test]
fn after_shutdown_the_caller_holds_the_last_reference() {
    for engine in backends() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.qed");
        create(&p, 4 << 20, None);
        for round in 0..30 {
            let img = Arc::new(Image::open(&p, &OpenOptions::read_write()).unwrap());
            let q = AioQueue::with_engine(img.clone(), AioOptions::default(), &engine).unwrap();
            let mut bufs: Vec<Vec<u8>> = (0..16).map(|i| vec![i as u8; 4096]).collect();
            for (i, b) in bufs.iter_mut().enumerate() {
                // SAFETY: `bufs` outlives the shutdown below, which waits for every request.
                unsafe { q.submit(write_op(i as u64 * 65536, b), 0, Box::new(|r| r.unwrap())) }
                    .unwrap();
            }
            q.shutdown().unwrap();
            drop(q);
            let img = Arc::try_unwrap(img)
                .unwrap_or_else(|_| panic!("round {round}: the engine still holds the image"));
            img.close().unwrap();
        }
    }
}

/// FUA overwrites of clusters whose mapping is durable: the ring writes them itself (with
/// RWF_DSYNC) and the image is not flushed; before the mapping is durable they take the pool,
/// which flushes. Either way the bytes are there after a reopen.
#[test]
fn fua_overwrites_take_the_ring_once_the_mapping_is_durable() {
    for engine in backends() {
        for direct in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("f.qed");
            create(&p, 4 << 20, None);
            let mut o = OpenOptions::read_write();
            o.direct = direct;
            let img = Arc::new(Image::open(&p, &o).unwrap());
            let q = AioQueue::with_engine(img.clone(), AioOptions::default(), &engine).unwrap();
            let fua = |b: &mut Aligned, off: u64| Op::Write {
                offset: off,
                bufs: raw(std::slice::from_ref(b)),
                flags: WriteFlags::FUA,
            };
            let mut b = Aligned::new(4096);
            b.slice().fill(1);
            // Allocating: written, then the image is flushed.
            let f0 = img.stats().storage_flushes;
            submit_wait(&q, fua(&mut b, 65536)).unwrap();
            assert!(img.stats().storage_flushes > f0);
            let ring0 = engine.stats().ring_requests;
            let f1 = img.stats().storage_flushes;
            for i in 0..20u8 {
                b.slice().fill(i + 2);
                submit_wait(&q, fua(&mut b, 65536)).unwrap();
            }
            if engine.backend() == IoBackend::IoUring && direct {
                // O_DIRECT overwrites go through the ring, durable on their own.
                assert_eq!(engine.stats().ring_requests, ring0 + 20);
            }
            // No image flush for in-place FUA overwrites on either path.
            assert_eq!(img.stats().storage_flushes, f1);
            q.shutdown().unwrap();
            drop(q);
            // Abandoned without close: only what was durable counts (the page cache keeps
            // more, so this shows the bytes landed, and the reopen repairs nothing).
            std::mem::forget(Arc::try_unwrap(img).ok().unwrap());
            // (The forgotten handle still holds its lock: this process knows it is gone.)
            let mut o = OpenOptions::read_write();
            o.lock = false;
            let img = Image::open(&p, &o).unwrap();
            let mut r = vec![0u8; 4096];
            img.read_at(65536, &mut r).unwrap();
            assert!(r.iter().all(|&x| x == 21), "direct={direct}");
        }
    }
}

/// Thousands of requests at once: the ring keeps what does not fit in flight waiting (the
/// completion queue must never overflow), and every request completes with the right bytes.
#[test]
fn thousands_of_requests_in_flight_all_complete() {
    for engine in backends() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("many.qed");
        create(&p, 16 << 20, None);
        let img = Arc::new(Image::open(&p, &OpenOptions::read_write()).unwrap());
        for c in 0..256u64 {
            img.write_at(c * 65536, &[c as u8; 65536]).unwrap();
        }
        let q = AioQueue::with_engine(
            img,
            AioOptions {
                queue_depth: 8192,
                ..Default::default()
            },
            &engine,
        )
        .unwrap();
        let n = 5000usize;
        let mut bufs: Vec<Vec<u8>> = (0..n).map(|_| vec![0u8; 4096]).collect();
        let done = Arc::new(AtomicUsize::new(0));
        for (i, b) in bufs.iter_mut().enumerate() {
            let d = done.clone();
            // Spread over every cluster, in an order that is not sequential.
            let off = (i as u64 * 7919 % 4096) * 4096;
            // SAFETY: `bufs` outlives the drain below.
            unsafe {
                q.submit(
                    read_op(off, b),
                    0,
                    Box::new(move |r| {
                        r.unwrap();
                        d.fetch_add(1, Ordering::SeqCst);
                    }),
                )
            }
            .unwrap();
        }
        q.drain().unwrap();
        assert_eq!(done.load(Ordering::SeqCst), n);
        for (i, b) in bufs.iter().enumerate() {
            let c = ((i as u64 * 7919 % 4096) * 4096 / 65536) as u8;
            assert!(b.iter().all(|&x| x == c), "request {i}");
        }
    }
}
