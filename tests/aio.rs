// SPDX-License-Identifier: MIT OR Apache-2.0
//! Ordering and delivery rules of the asynchronous queue.

use qed::aio::{AioOptions, AioQueue, Delivery, Op, RawBuf};
use qed::storage::{MemOp, MemStorage};
use qed::{CreateOptions, Image, OpenOptions, WriteFlags};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

fn image(s: &Arc<MemStorage>) -> Arc<Image> {
    Image::create_on(
        &**s,
        &CreateOptions {
            size: 16 << 20,
            cluster_size: 4096,
            table_size: 2,
            ..Default::default()
        },
    )
    .unwrap();
    Arc::new(Image::open_storage(s.clone(), &OpenOptions::read_write()).unwrap())
}

fn buf(v: &mut [u8]) -> Vec<RawBuf> {
    vec![RawBuf {
        ptr: v.as_mut_ptr(),
        len: v.len(),
    }]
}

#[test]
fn flush_completes_after_every_earlier_write_and_is_durable() {
    let s = Arc::new(MemStorage::new());
    let img = image(&s);
    let q = AioQueue::new(
        img.clone(),
        AioOptions {
            workers: 4,
            ..Default::default()
        },
    )
    .unwrap();
    s.start_recording();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut bufs: Vec<Vec<u8>> = (0..32).map(|i| vec![i as u8 + 1; 8192]).collect();
    for (i, b) in bufs.iter_mut().enumerate() {
        let o = order.clone();
        // SAFETY: `bufs` outlives the drain below.
        unsafe {
            q.submit(
                Op::Write {
                    offset: i as u64 * 65536,
                    bufs: buf(b),
                    flags: WriteFlags::NONE,
                },
                0,
                Box::new(move |r| {
                    r.unwrap();
                    o.lock().unwrap().push(format!("w{i}"));
                }),
            )
        }
        .unwrap();
    }
    let o = order.clone();
    // SAFETY: no buffers.
    unsafe {
        q.submit(
            Op::Flush,
            0,
            Box::new(move |r| {
                r.unwrap();
                o.lock().unwrap().push("flush".into());
            }),
        )
    }
    .unwrap();
    q.drain().unwrap();
    let order = order.lock().unwrap();
    assert_eq!(order.last().map(String::as_str), Some("flush"), "{order:?}");
    assert_eq!(order.len(), 33);
    // On the storage, the flush the queue issued comes after the last write of any of them.
    let log = s.take_log();
    let last_write = log
        .iter()
        .rposition(|o| matches!(o, MemOp::Write { .. }))
        .unwrap();
    assert!(log[last_write..].contains(&MemOp::Flush));
    let mut back = vec![0u8; 8192];
    img.read_at(31 * 65536, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 32));
}

#[test]
fn every_request_completes_exactly_once_and_none_after_drain() {
    let s = Arc::new(MemStorage::new());
    let img = image(&s);
    for delivery in [Delivery::Workers, Delivery::EventLoop] {
        let q = AioQueue::new(
            img.clone(),
            AioOptions {
                workers: 3,
                queue_depth: 64,
                delivery,
                block_when_full: true,
            },
        )
        .unwrap();
        let counts: Arc<Vec<AtomicUsize>> =
            Arc::new((0..500).map(|_| AtomicUsize::new(0)).collect());
        let mut bufs: Vec<Vec<u8>> = (0..500).map(|i| vec![i as u8; 1000]).collect();
        std::thread::scope(|sc| {
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            if delivery == Delivery::EventLoop {
                let (q, stop) = (&q, stop.clone());
                sc.spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        q.poll().unwrap();
                        std::thread::yield_now();
                    }
                });
            }
            for (i, b) in bufs.iter_mut().enumerate() {
                let c = counts.clone();
                let op = if i % 3 == 0 {
                    Op::Read {
                        offset: (i as u64 * 7919) % (15 << 20),
                        bufs: buf(b),
                    }
                } else {
                    Op::Write {
                        offset: (i as u64 * 7919) % (15 << 20),
                        bufs: buf(b),
                        flags: WriteFlags::NONE,
                    }
                };
                // SAFETY: `bufs` outlives the drain below.
                unsafe {
                    q.submit(
                        op,
                        i as u64,
                        Box::new(move |r| {
                            r.unwrap();
                            c[i].fetch_add(1, Ordering::SeqCst);
                        }),
                    )
                }
                .unwrap();
            }
            q.drain().unwrap();
            stop.store(true, Ordering::Release);
        });
        assert!(counts.iter().all(|c| c.load(Ordering::SeqCst) == 1));
        assert_eq!(q.outstanding(), 0);
        q.shutdown().unwrap();
        // SAFETY: no buffers; the queue is shut down, so the submit is refused.
        let refused = unsafe {
            q.submit(
                Op::Flush,
                0,
                Box::new(|_| panic!("callback of a refused submit")),
            )
        };
        assert!(refused.is_err());
    }
}

#[test]
fn drain_inside_a_completion_is_refused_not_deadlocked() {
    let s = Arc::new(MemStorage::new());
    let img = image(&s);
    let q = Arc::new(
        AioQueue::new(
            img,
            AioOptions {
                workers: 2,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let seen = Arc::new(Mutex::new(None));
    let (q2, seen2) = (q.clone(), seen.clone());
    // SAFETY: no buffers.
    unsafe {
        q.submit(
            Op::Flush,
            0,
            Box::new(move |_| {
                *seen2.lock().unwrap() = Some(q2.drain().map_err(|e| e.to_string()));
            }),
        )
    }
    .unwrap();
    q.drain().unwrap();
    let r = seen.lock().unwrap().take().unwrap();
    assert!(r
        .unwrap_err()
        .contains("inside one of this image's completions"));
}

#[test]
fn cancel_removes_queued_requests_with_ecanceled() {
    let s = Arc::new(MemStorage::new());
    let img = image(&s);
    // One worker, blocked by a slow first request, so later ones stay queued.
    let q = AioQueue::new(
        img,
        AioOptions {
            workers: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let gate = Arc::new(std::sync::Barrier::new(2));
    let g2 = gate.clone();
    let results = Arc::new(Mutex::new(Vec::new()));
    let mut big = vec![7u8; 1 << 20];
    let r0 = results.clone();
    // SAFETY: `big` outlives the drain.
    unsafe {
        q.submit(
            Op::Write {
                offset: 0,
                bufs: buf(&mut big),
                flags: WriteFlags::NONE,
            },
            1,
            Box::new(move |r| {
                r0.lock().unwrap().push((1, r.is_ok()));
                g2.wait();
            }),
        )
    }
    .unwrap();
    for i in 0..5u64 {
        let r = results.clone();
        // SAFETY: no buffers.
        unsafe {
            q.submit(
                Op::Flush,
                99,
                Box::new(move |res| {
                    let errno = match &res {
                        Err(qed::Error::Io { source, .. }) => source.raw_os_error(),
                        _ => None,
                    };
                    r.lock()
                        .unwrap()
                        .push((100 + i, errno == Some(libc::ECANCELED)));
                }),
            )
        }
        .unwrap();
    }
    let n = q.cancel(99);
    gate.wait();
    q.drain().unwrap();
    assert_eq!(n, 5);
    let res = results.lock().unwrap();
    assert_eq!(res.len(), 6, "{res:?}");
    assert!(res.iter().all(|&(_, ok)| ok), "{res:?}");
}

/// One step of a request chain: write `buf` (owned by the chain) at step `i`, then, from the
/// completion, submit step `i + 1`. The submit runs inside a worker's callback, where the queue
/// lets that worker take the request itself.
struct Chain {
    q: AioQueue,
    data: Mutex<Vec<Vec<u8>>>,
    done: AtomicUsize,
    steps: usize,
}

fn chain_step(c: Arc<Chain>, i: usize) {
    let bufs = {
        let mut d = c.data.lock().unwrap();
        buf(&mut d[i])
    };
    let next = c.clone();
    // SAFETY: the vectors in `data` are never resized or dropped before the chain's drain.
    unsafe {
        c.q.submit(
            Op::Write {
                offset: i as u64 * 12288 + 100,
                bufs,
                flags: WriteFlags::NONE,
            },
            0,
            Box::new(move |r| {
                r.unwrap();
                next.done.fetch_add(1, Ordering::SeqCst);
                if i + 1 < next.steps {
                    chain_step(next.clone(), i + 1);
                }
            }),
        )
    }
    .unwrap();
}

#[test]
fn requests_submitted_from_callbacks_run_to_the_end_of_a_depth_one_chain() {
    let s = Arc::new(MemStorage::new());
    let img = image(&s);
    let steps = 600;
    let c = Arc::new(Chain {
        q: AioQueue::new(
            img.clone(),
            AioOptions {
                workers: 3,
                ..Default::default()
            },
        )
        .unwrap(),
        data: Mutex::new(
            (0..steps)
                .map(|i| vec![(i % 251) as u8 + 1; 5000])
                .collect(),
        ),
        done: AtomicUsize::new(0),
        steps,
    });
    chain_step(c.clone(), 0);
    // The chain is never empty until its last step completes, so drain waits for all of it.
    c.q.drain().unwrap();
    assert_eq!(c.done.load(Ordering::SeqCst), steps);
    let mut got = vec![0u8; 5000];
    for i in 0..steps {
        img.read_at(i as u64 * 12288 + 100, &mut got).unwrap();
        assert!(got.iter().all(|&b| b == (i % 251) as u8 + 1), "step {i}");
    }
}

/// Event-loop mode answers cached reads on the submitting thread, but the completion still
/// runs only in `poll`, and a poll runs only what was ready when it started (a callback that
/// submits the next read does not make one poll run the whole chain). Reads the engine cannot
/// answer without waiting (here: from the backing file) go to the workers and read the same.
#[test]
fn event_loop_reads_complete_in_poll_only_and_one_poll_runs_no_chain() {
    use qed::{Backing, BackingFormat};
    let base = Arc::new(MemStorage::from_bytes(&vec![0xB5u8; 1 << 20]));
    let s = Arc::new(MemStorage::new());
    Image::create_on(
        &*s,
        &CreateOptions {
            size: 1 << 20,
            cluster_size: 4096,
            table_size: 1,
            backing_file: Some("base".into()),
            backing_format: Some(BackingFormat::Raw),
        },
    )
    .unwrap();
    let b = base.clone();
    let img = Arc::new(
        Image::open_storage(
            s.clone(),
            &OpenOptions {
                writable: true,
                backing_resolver: Some(Arc::new(move |_: &str, _: Option<BackingFormat>| {
                    Ok(Backing::Raw(b.clone()))
                })),
                ..Default::default()
            },
        )
        .unwrap(),
    );
    img.write_at(0, &[0x11u8; 8192]).unwrap();
    let q = Arc::new(
        AioQueue::new(
            img.clone(),
            AioOptions {
                workers: 2,
                delivery: Delivery::EventLoop,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    // Three chained reads of allocated data, each submitted by the previous completion.
    let mut bufs = vec![vec![0u8; 4096]; 3];
    let ptrs: Vec<RawBuf> = bufs.iter_mut().flat_map(|b| buf(b)).collect();
    let ran = Arc::new(AtomicUsize::new(0));
    fn chained(q: Arc<AioQueue>, ptrs: Arc<Mutex<Vec<RawBuf>>>, i: usize, ran: Arc<AtomicUsize>) {
        let (q2, p2, r2) = (q.clone(), ptrs.clone(), ran.clone());
        let (this, count) = {
            let p = ptrs.lock().unwrap();
            (p[i], p.len())
        };
        // SAFETY: the buffers outlive the test's last poll.
        unsafe {
            q.submit(
                Op::Read {
                    offset: (i as u64 % 2) * 4096,
                    bufs: vec![this],
                },
                0,
                Box::new(move |r| {
                    r.unwrap();
                    r2.fetch_add(1, Ordering::SeqCst);
                    if i + 1 < count {
                        chained(q2, p2, i + 1, r2);
                    }
                }),
            )
        }
        .unwrap();
    }
    chained(q.clone(), Arc::new(Mutex::new(ptrs)), 0, ran.clone());
    assert_eq!(
        ran.load(Ordering::SeqCst),
        0,
        "a completion ran inside submit"
    );
    for expect in 1..=3 {
        let mut n = 0;
        for _ in 0..2000 {
            n = q.poll().unwrap();
            if n > 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(n, 1, "poll {expect} ran {n} completions");
        assert_eq!(ran.load(Ordering::SeqCst), expect);
    }
    assert!(bufs.iter().all(|b| b.iter().all(|&x| x == 0x11)));
    // Unallocated clusters read through the backing file (the worker path).
    let mut back = vec![0u8; 12288];
    let done = Arc::new(AtomicUsize::new(0));
    let d = done.clone();
    // SAFETY: `back` outlives the drain.
    unsafe {
        q.submit(
            Op::Read {
                offset: 4096,
                bufs: buf(&mut back),
            },
            0,
            Box::new(move |r| {
                r.unwrap();
                d.fetch_add(1, Ordering::SeqCst);
            }),
        )
    }
    .unwrap();
    q.drain().unwrap();
    assert_eq!(done.load(Ordering::SeqCst), 1);
    assert!(back[..4096].iter().all(|&x| x == 0x11));
    assert!(back[4096..].iter().all(|&x| x == 0xB5));
}
