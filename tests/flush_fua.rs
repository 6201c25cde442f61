// SPDX-License-Identifier: MIT OR Apache-2.0
//! Flush group commit and FUA writes: concurrent flushes share storage flushes, writes never
//! wait for a storage flush in flight, and a FUA write is durable when it returns, without a
//! flush of the image where its mapping is already durable.

use qed::storage::{Storage, *};
use qed::{Image, OpenOptions, WriteFlags};
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

#[path = "support/mem_image.rs"]
mod mem_image;
use mem_image::{create, read, CS};

/// Read-write, with write-back only at flushes (unless a test asks for a delay).
fn rw(backing: Option<Arc<MemStorage>>) -> OpenOptions {
    OpenOptions {
        writeback_delay: None,
        need_check_delay: None,
        ..mem_image::rw(backing)
    }
}

/// Storage whose next flush (once armed) blocks until released. Counts flushes and keeps the
/// bytes as of the last flush (what a power loss right after it leaves).
struct BlockFlush {
    inner: Arc<MemStorage>,
    state: Mutex<Block>,
    cv: Condvar,
    flushes: AtomicUsize,
    durable: Mutex<Vec<u8>>,
}

#[derive(Default)]
struct Block {
    armed: bool,
    blocked: bool,
    released: bool,
}

impl BlockFlush {
    fn new(inner: Arc<MemStorage>) -> BlockFlush {
        BlockFlush {
            durable: Mutex::new(inner.to_bytes()),
            inner,
            state: Default::default(),
            cv: Default::default(),
            flushes: AtomicUsize::new(0),
        }
    }
    fn arm(&self) {
        *self.state.lock().unwrap() = Block {
            armed: true,
            ..Default::default()
        };
    }
    fn wait_blocked(&self) {
        let mut s = self.state.lock().unwrap();
        while !s.blocked {
            s = self.cv.wait(s).unwrap();
        }
    }
    fn release(&self) {
        self.state.lock().unwrap().released = true;
        self.cv.notify_all();
    }
}

impl Storage for BlockFlush {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        // Everything completed before the flush started is what it makes durable.
        let bytes = self.inner.to_bytes();
        let mut s = self.state.lock().unwrap();
        if std::mem::take(&mut s.armed) {
            s.blocked = true;
            self.cv.notify_all();
            while !s.released {
                s = self.cv.wait(s).unwrap();
            }
        }
        drop(s);
        *self.durable.lock().unwrap() = bytes;
        self.inner.flush()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
}

/// Runs `f` on a thread and waits for it; fails (rather than hangs) if it does not finish,
/// which here means it waited for the blocked storage flush.
fn completes(what: &str, f: impl FnOnce() + Send + 'static) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        f();
        tx.send(()).unwrap();
    });
    rx.recv_timeout(std::time::Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("{what} waited for a storage flush in flight"));
}

/// Flush A holds the storage flush; flushes B, C and D arrive meanwhile, must not complete
/// before it does, and then share one storage flush: 2 in all, not 4. Writes (in place and
/// allocating) complete while the storage flush is blocked, and the shared flush covers them.
#[test]
fn concurrent_flushes_share_storage_flushes_and_writes_do_not_wait() {
    for with_backing in [false, true] {
        let base = Arc::new(MemStorage::from_bytes(&vec![0xbb; 4 << 20]));
        let disk = create(with_backing);
        let bs = Arc::new(BlockFlush::new(disk.clone()));
        let opts = rw(with_backing.then(|| base.clone()));
        let img = Arc::new(Image::open_storage(bs.clone(), &opts).unwrap());
        // Sets the need-check bit and creates the table, so later writes need no flush.
        img.write_at(0, &[1u8; 512]).unwrap();
        img.flush().unwrap();
        let flushes0 = bs.flushes.load(Ordering::SeqCst);
        let waits0 = img.stats().flush_waits;
        bs.arm();
        let a = {
            let img = img.clone();
            std::thread::spawn(move || img.flush().unwrap())
        };
        bs.wait_blocked();
        {
            let img = img.clone();
            completes("an overwrite", move || {
                img.write_at(0, &[2u8; 512]).unwrap()
            });
        }
        {
            let img = img.clone();
            completes("an allocating write", move || {
                img.write_at(8 * CS, &[3u8; 512]).unwrap()
            });
        }
        let done = Arc::new(AtomicUsize::new(0));
        let others: Vec<_> = (0..3)
            .map(|_| {
                let (img, done) = (img.clone(), done.clone());
                std::thread::spawn(move || {
                    img.flush().unwrap();
                    done.fetch_add(1, Ordering::SeqCst);
                })
            })
            .collect();
        // B, C and D are waiting once each has counted its wait for the flush in flight.
        // (With a backing file the first to take the staged entry waits there; the others wait
        // for its table write, uncounted, and may need a flush of their own after it.)
        if !with_backing {
            while img.stats().flush_waits < waits0 + 3 {
                std::thread::yield_now();
            }
            assert_eq!(
                done.load(Ordering::SeqCst),
                0,
                "a flush completed while the storage flush it needs was blocked"
            );
            assert!(!a.is_finished());
        }
        bs.release();
        a.join().unwrap();
        for t in others {
            t.join().unwrap();
        }
        if !with_backing {
            let flushes = bs.flushes.load(Ordering::SeqCst) - flushes0;
            assert_eq!(flushes, 2, "storage flushes for 4 concurrent flushes");
        }
        // Power lost after the flushes returned: both writes are there.
        let durable = bs.durable.lock().unwrap().clone();
        let again = Image::open_storage(Arc::new(MemStorage::from_bytes(&durable)), &opts).unwrap();
        assert!(read(&again, 0, 512) == vec![2u8; 512]);
        assert!(read(&again, 8 * CS, 512) == vec![3u8; 512]);
    }
}

/// Calls `visit` with every disk a power loss at a point `k >= from` of `ops` (applied to
/// `base`) could leave: everything up to the last flush before `k` kept, the writes after it
/// kept or dropped in every combination (up to 8; else all, none and 64 pseudo-random ones),
/// except FUA writes, which are durable once they completed.
fn crash_states_from(base: &[u8], ops: &[MemOp], from: usize, mut visit: impl FnMut(&[u8])) {
    fn apply(disk: &mut Vec<u8>, op: &MemOp) {
        match op {
            MemOp::Write { offset, data } | MemOp::DurableWrite { offset, data } => {
                let (start, end) = (*offset as usize, *offset as usize + data.len());
                if disk.len() < end {
                    disk.resize(end, 0);
                }
                disk[start..end].copy_from_slice(data);
            }
            MemOp::SetLen(n) => disk.resize(*n as usize, 0),
            MemOp::PunchHole { offset, len } => {
                let end = ((*offset + *len) as usize).min(disk.len());
                if (*offset as usize) < end {
                    disk[*offset as usize..end].fill(0);
                }
            }
            MemOp::Flush => {}
        }
    }
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut coin = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed & 1 == 1
    };
    for k in from..=ops.len() {
        let f = ops[..k]
            .iter()
            .rposition(|o| *o == MemOp::Flush)
            .map_or(0, |i| i + 1);
        let mut durable = base.to_vec();
        ops[..f].iter().for_each(|o| apply(&mut durable, o));
        let post = &ops[f..k];
        let subsets: Vec<Vec<bool>> = if post.len() <= 8 {
            (0..1u32 << post.len())
                .map(|m| (0..post.len()).map(|i| m & (1 << i) != 0).collect())
                .collect()
        } else {
            let mut v = vec![vec![true; post.len()], vec![false; post.len()]];
            v.extend((0..64).map(|_| (0..post.len()).map(|_| coin()).collect()));
            v
        };
        for keep in subsets {
            let mut disk = durable.clone();
            for (op, kept) in post.iter().zip(keep) {
                if kept || matches!(op, MemOp::DurableWrite { .. }) {
                    apply(&mut disk, op);
                }
            }
            visit(&disk);
        }
    }
}

/// A FUA overwrite of clusters whose mapping a flush made durable is one FUA write of the
/// data: no flush of the image, no other write. Every crash state after it returns (with
/// unflushed writes elsewhere kept or lost) has the new bytes.
#[test]
fn fua_overwrite_of_a_durable_mapping_is_one_durable_write() {
    for with_backing in [false, true] {
        let base = Arc::new(MemStorage::from_bytes(&vec![0xbb; 4 << 20]));
        let disk = create(with_backing);
        let opts = rw(with_backing.then(|| base.clone()));
        let img = Image::open_storage(disk.clone(), &opts).unwrap();
        // Two clusters, contiguous in the file: one FUA write covers both.
        img.write_at(2 * CS, &[1u8; 2 * CS as usize]).unwrap();
        img.flush().unwrap();
        let flushes0 = img.stats().storage_flushes;
        let before = disk.to_bytes();
        disk.start_recording();
        let new: Vec<u8> = (0..CS + 1024).map(|i| (i % 251) as u8).collect();
        img.write_sg_flags(2 * CS + 512, &[&new[..100], &new[100..]], WriteFlags::FUA)
            .unwrap();
        let log = disk.take_log();
        assert_eq!(log.len(), 1, "backing={with_backing}: {} ops", log.len());
        assert!(
            matches!(&log[0], MemOp::DurableWrite { data, .. } if *data == new),
            "backing={with_backing}: not one FUA write of the data"
        );
        assert_eq!(img.stats().storage_flushes, flushes0);
        assert_eq!(img.stats().write_requests, 2);
        // Unflushed writes elsewhere after it: an allocation and an overwrite.
        disk.start_recording();
        img.write_at(9 * CS, &[5u8; 512]).unwrap();
        img.write_at(2 * CS, &[6u8; 512]).unwrap();
        let mut ops = log;
        ops.extend(disk.take_log());
        let mut states = 0;
        crash_states_from(&before, &ops, 1, |state| {
            let img = Image::open_storage(Arc::new(MemStorage::from_bytes(state)), &opts)
                .unwrap_or_else(|e| panic!("backing={with_backing}: open failed: {e}"));
            assert!(
                read(&img, 2 * CS + 512, new.len()) == new,
                "backing={with_backing}: a completed FUA write was lost"
            );
            states += 1;
        });
        assert!(states >= 4, "{states} crash states");
    }
}

/// A FUA write that allocates (with copy-on-write from the backing file) is durable when it
/// returns, data and table entry, in every crash state after it.
#[test]
fn fua_allocating_write_is_durable_in_every_crash_state() {
    for with_backing in [false, true] {
        let base = Arc::new(MemStorage::from_bytes(&vec![0xbb; 4 << 20]));
        let disk = create(with_backing);
        let opts = rw(with_backing.then(|| base.clone()));
        let before = disk.to_bytes();
        disk.start_recording();
        let img = Image::open_storage(disk.clone(), &opts).unwrap();
        // A new table, then a new cluster in it: both need their metadata durable.
        for at in [5 * CS + 1024, 7 * CS] {
            img.write_sg_flags(at, &[&[0x5a; 512]], WriteFlags::FUA)
                .unwrap();
        }
        let ops = disk.take_log();
        let old = if with_backing { 0xbb } else { 0 };
        let mut want = vec![old; 3 * CS as usize];
        want[1024..1536].fill(0x5a);
        want[2 * CS as usize..2 * CS as usize + 512].fill(0x5a);
        crash_states_from(&before, &ops, ops.len(), |state| {
            let img = Image::open_storage(Arc::new(MemStorage::from_bytes(state)), &opts)
                .unwrap_or_else(|e| panic!("backing={with_backing}: open failed: {e}"));
            assert!(
                read(&img, 5 * CS, want.len()) == want,
                "backing={with_backing}: a completed FUA allocating write was lost"
            );
            let r = img.check(qed::CheckFix::NONE).unwrap();
            assert_eq!((r.corruptions, r.leaks), (0, 0), "backing={with_backing}");
        });
    }
}

/// A FUA write that fails (in its write or its flush part) fails the handle, as a failed
/// flush does: whether the bytes are durable is unknown, and a later flush proves nothing.
#[test]
fn a_failed_fua_write_fails_the_handle() {
    for calls in [FaultCalls::WRITE, FaultCalls::FLUSH] {
        let disk = create(false);
        let fs = Arc::new(FaultStorage::new(disk.clone()));
        let img = Image::open_storage(fs.clone(), &rw(None)).unwrap();
        img.write_at(0, &[1u8; 4096]).unwrap();
        img.flush().unwrap();
        fs.arm(Fault::new(calls, 0, libc::EIO));
        let e = img
            .write_sg_flags(0, &[&[2u8; 512]], WriteFlags::FUA)
            .unwrap_err();
        assert!(e.to_string().contains("FUA"), "{calls:?}: {e}");
        assert_eq!(fs.fired(), 1, "{calls:?}: the fault was not hit");
        fs.disarm();
        for later in [
            img.flush().unwrap_err(),
            img.write_at(0, &[3u8; 512]).unwrap_err(),
            img.read_at(0, &mut [0u8; 512]).unwrap_err(),
        ] {
            assert!(
                matches!(later, qed::Error::Failed(_)) && later.to_string().contains("FUA"),
                "{calls:?}: a later request did not report the failed FUA write: {later}"
            );
        }
    }
}

#[test]
fn unknown_write_flags_are_refused() {
    assert_eq!(WriteFlags::from_bits(0), Some(WriteFlags::NONE));
    assert_eq!(WriteFlags::from_bits(1), Some(WriteFlags::FUA));
    assert_eq!(WriteFlags::from_bits(1).unwrap().bits(), 1);
    for bits in [2, 0x80, 0x81, 1 << 31] {
        assert_eq!(WriteFlags::from_bits(bits), None, "{bits:#x}");
    }
}

/// Threads of this process with the name `name`.
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter(|t| {
            let comm = t.as_ref().unwrap().path().join("comm");
            std::fs::read_to_string(comm).is_ok_and(|c| c.trim_end() == name)
        })
        .count()
}

/// 200 images with staged entries and a write-back delay share one timer thread; each one's
/// entries are still written back when due. The timer keeps no image alive, and closing an
/// image does not wait for it, even while it is stuck in another image's write-back.
#[test]
fn one_writeback_timer_thread_for_all_images() {
    let base = Arc::new(MemStorage::from_bytes(&vec![0xbb; 4 << 20]));
    let delayed = |ms: u64| OpenOptions {
        writeback_delay: Some(std::time::Duration::from_millis(ms)),
        ..rw(Some(base.clone()))
    };
    // The first write creates the table (written at once); the second stages its entry.
    let staged = |disk: Arc<dyn Storage>, delay: u64| {
        let img = Image::open_storage(disk, &delayed(delay)).unwrap();
        img.write_at(0, &[1u8; 512]).unwrap();
        img.flush().unwrap();
        let written = img.stats().l2_writes;
        img.write_at(8 * CS, &[7u8; 512]).unwrap();
        (img, written)
    };
    let imgs: Vec<(Image, u64)> = (0..200).map(|_| staged(create(true), 1)).collect();
    // Written back by the timer (no flush was asked for): staged entries reach the file.
    while imgs.iter().any(|(img, w)| img.stats().l2_writes == *w) {
        std::thread::yield_now();
    }
    assert_eq!(threads_named("qed-writeback"), 1);
    drop(imgs);

    // A write-back due in an hour holds no reference to its image.
    let disk = create(true);
    drop(staged(disk.clone(), 3_600_000));
    assert_eq!(
        Arc::strong_count(&disk),
        1,
        "a dropped image was kept alive"
    );

    // The timer stuck in one image's storage flush; another image closes all the same.
    let stuck = Arc::new(BlockFlush::new(create(true)));
    let (a, _) = staged(stuck.clone(), 1);
    stuck.arm();
    a.write_at(9 * CS, &[7u8; 512]).unwrap();
    stuck.wait_blocked();
    let (b, _) = staged(create(true), 1);
    completes("closing an image", move || b.close().unwrap());
    stuck.release();
    a.close().unwrap();
    assert_eq!(threads_named("qed-writeback"), 1);
}
