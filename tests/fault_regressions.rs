// SPDX-License-Identifier: MIT OR Apache-2.0
//! One test for each class of storage-fault defect found in issue 10, each failing on the code
//! before the fix: a flush that failed once gave up staged entries and a later flush reported
//! success; a failed read-write open truncated the file; a repair that could not read an L2
//! table reclaimed its data clusters as leaks; a failed reload after a repair left an empty L1
//! table that the next request indexed (a panic). Also one found by the concurrent crash test
//! (`tests/crash.rs`): without a backing file, a flush completed while an entry that another,
//! already completed write used was not yet written.

use qed::storage::{Fault, FaultCalls, FaultMode, FaultStorage, MemStorage, Storage};
use qed::{BackingFormat, CheckFix, CreateOptions, Image, OpenOptions};
use std::io;
use std::sync::Arc;

#[path = "support/mem_image.rs"]
mod mem_image;
use mem_image::{create, read, rw, CS};

/// Class 1: after a failed flush, no later flush may report success unless everything
/// acknowledged before it is durable.
#[test]
fn a_flush_that_failed_once_never_hides_lost_entries() {
    for with_backing in [true, false] {
        let base = Arc::new(MemStorage::from_bytes(&vec![0xbb; 4 << 20]));
        let backing = with_backing.then(|| base.clone());
        let disk = create(with_backing);
        let fs = Arc::new(FaultStorage::new(disk.clone()));
        let img = Image::open_storage(fs.clone(), &rw(backing.clone())).unwrap();
        img.write_at(0, &[1u8; 512]).unwrap();
        img.flush().unwrap();
        // An allocating write into a new cluster of the existing table: its entry is staged
        // (with a backing file) until the flush that now fails once.
        img.write_at(8 * CS, &[7u8; 512]).unwrap();
        fs.arm(Fault::new(FaultCalls::FLUSH, 0, libc::EIO));
        assert!(
            img.flush().is_err(),
            "the injected flush failure was not reported"
        );
        let second = img.flush();
        let closed = img.close();
        drop(img);
        let img = Image::open_storage(disk.clone(), &rw(backing.clone())).unwrap();
        let got = read(&img, 8 * CS, 512);
        if let (Err(e), Err(_)) = (&second, &closed) {
            // The policy: the handle failed; later requests say why.
            let e = e.to_string();
            assert!(e.contains("flushing image"), "unhelpful error: {e}");
        } else {
            assert_eq!(
                got,
                vec![7u8; 512],
                "backing={with_backing}: a flush after the failed one reported success, but the write made before it is gone after reopen"
            );
        }
        assert_eq!(read(&img, 0, 512), vec![1u8; 512]);
        let r = img.check(CheckFix::ALL).unwrap();
        assert_eq!((r.corruptions, r.leaks), (0, 0));
    }
}

/// Class 2: a read-write open that fails, whatever storage call failed, writes nothing after
/// the failure (it used to truncate the file to 0 bytes from a state it never read).
#[test]
fn a_failed_open_never_truncates_or_writes() {
    for dirty in [false, true] {
        let disk = create(false);
        {
            let fs = Arc::new(FaultStorage::new(disk.clone()));
            let img = Image::open_storage(fs.clone(), &rw(None)).unwrap();
            for i in 0..40u64 {
                img.write_at(i * 3 * CS, &[i as u8 + 1; 4096]).unwrap();
            }
            img.flush().unwrap();
            if dirty {
                fs.cut_off(); // killed: the need-check bit stays set
            } else {
                img.close().unwrap();
            }
        }
        let before = disk.to_bytes();
        // What a healthy repair cuts the file to (the allocator's stretch and leaks gone): no
        // failed open may go below it.
        let floor = {
            let d = Arc::new(MemStorage::from_bytes(&before));
            Image::open_storage(d.clone(), &rw(None))
                .unwrap()
                .close()
                .unwrap();
            d.len().unwrap()
        };
        let mut failed_opens = 0;
        for at in 0..64 {
            for mode in [FaultMode::Once, FaultMode::From] {
                let d = Arc::new(MemStorage::from_bytes(&before));
                let fs = Arc::new(FaultStorage::new(d.clone()));
                fs.arm(Fault::new(FaultCalls::ALL, at, libc::EIO).with_mode(mode));
                if let Err(e) = Image::open_storage(fs.clone(), &rw(None)) {
                    failed_opens += 1;
                    assert!(
                        d.len().unwrap() >= floor,
                        "dirty={dirty}, fault {mode:?} at call {at} ({e}): file cut to {} bytes",
                        d.len().unwrap()
                    );
                    assert_eq!(
                        fs.changed_after_fault(),
                        0,
                        "dirty={dirty}, fault {mode:?} at call {at} ({e}): the failed open changed the file afterwards"
                    );
                    if !dirty {
                        assert!(
                            d.to_bytes() == before,
                            "fault at {at}: a clean image changed"
                        );
                    }
                }
                let img = Image::open_storage(d, &rw(None)).unwrap();
                for i in 0..40u64 {
                    assert_eq!(read(&img, i * 3 * CS, 4096), vec![i as u8 + 1; 4096]);
                }
            }
        }
        assert!(
            failed_opens > 4,
            "dirty={dirty}: only {failed_opens} opens failed"
        );
    }
}

/// Fails the next `fails` reads that touch `[start, end)` (a transient error: the same
/// bytes read again later).
struct FailRange {
    inner: Arc<MemStorage>,
    start: u64,
    end: u64,
    fails: std::sync::atomic::AtomicU32,
}

impl Storage for FailRange {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        if offset < self.end
            && offset + buf.len() as u64 > self.start
            && self
                .fails
                .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
}

/// Class 3: a repair that cannot read an L2 table must not reclaim (or move) the clusters it
/// may reference: they are unknown, never leaks.
#[test]
fn a_repair_that_cannot_read_a_table_reclaims_nothing() {
    let disk = create(false);
    // The second L2 table maps guest offsets from 2 MiB (512 entries x 4 KiB).
    let guest = 2 << 20;
    {
        let fs = Arc::new(FaultStorage::new(disk.clone()));
        let img = Image::open_storage(fs.clone(), &rw(None)).unwrap();
        img.write_at(0, &[3u8; 4096]).unwrap();
        img.write_at(guest, &vec![9u8; 8 * 4096]).unwrap();
        img.flush().unwrap();
        fs.cut_off(); // dirty: the next read-write open repairs
    }
    let l1 = {
        let ro = Image::open_storage(
            disk.clone(),
            &OpenOptions {
                no_repair: true,
                ..Default::default()
            },
        )
        .unwrap();
        let info = ro.info().unwrap();
        let mut e = [0u8; 8];
        disk.read_at(&mut e, info.l1_table_offset + 8).unwrap();
        u64::from_le_bytes(e)
    };
    assert!(l1 > 0, "the second L2 table exists");
    let before = disk.to_bytes();
    let failing = Arc::new(FailRange {
        inner: disk.clone(),
        start: l1,
        end: l1 + CS,
        fails: 1.into(),
    });
    let opened = Image::open_storage(failing.clone(), &rw(None));
    assert!(
        disk.to_bytes() == before,
        "the repair that could not read a table changed the file (clusters under it reclaimed)"
    );
    let e = opened.expect_err("an open whose repair could not read a table must fail");
    assert!(
        e.to_string().contains("could not read"),
        "the error should say what could not be read: {e}"
    );
    // An explicit repair on a handle opened without the automatic one: the same rule.
    failing.fails.store(1, std::sync::atomic::Ordering::SeqCst);
    let img = Image::open_storage(
        failing,
        &OpenOptions {
            no_repair: true,
            ..rw(None)
        },
    )
    .unwrap();
    let r = img.check(CheckFix::ALL).unwrap();
    assert!(r.check_errors > 0 && r.leaks_fixed == 0, "{r:?}");
    drop(img);
    // Healthy again: everything is there.
    let img = Image::open_storage(disk.clone(), &rw(None)).unwrap();
    assert_eq!(read(&img, 0, 4096), vec![3u8; 4096]);
    assert_eq!(read(&img, guest, 8 * 4096), vec![9u8; 8 * 4096]);
    let r = img.check(CheckFix::NONE).unwrap();
    assert_eq!((r.corruptions, r.leaks, r.check_errors), (0, 0, 0));
}

/// Class 4: a repair whose reload of the L1 table fails left the handle with an empty table,
/// and the next request indexed it (a panic the C boundary turned into "internal error").
#[test]
fn a_failed_reload_after_repair_never_panics() {
    let disk = create(false);
    {
        let fs = Arc::new(FaultStorage::new(disk.clone()));
        let img = Image::open_storage(fs.clone(), &rw(None)).unwrap();
        img.write_at(0, &[5u8; 4096]).unwrap();
        img.flush().unwrap();
        fs.cut_off();
    }
    let bytes = disk.to_bytes();
    let mut healthy_calls = 0;
    let mut panics = Vec::new();
    let mut outcomes = Vec::new();
    let mut rereads = Vec::new();
    for at in 0..48 {
        let d = Arc::new(MemStorage::from_bytes(&bytes));
        // Two more clusters at the end: leaks for the repair to reclaim.
        d.write_at(&[0x5a; 2 * CS as usize], d.len().unwrap())
            .unwrap();
        let fs = Arc::new(FaultStorage::new(d.clone()));
        let img = Image::open_storage(
            fs.clone(),
            &OpenOptions {
                no_repair: true,
                ..rw(None)
            },
        )
        .unwrap();
        fs.arm(Fault::new(FaultCalls::ALL, at, libc::EIO));
        let repaired = img.check(CheckFix::ALL);
        fs.disarm();
        if fs.fired() == 0 {
            healthy_calls += 1;
        }
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut b = [0u8; 4096];
            let read = img.read_at(0, &mut b);
            let write = img.write_at(8 * CS, &[6u8; 512]);
            (read.map(|_| b), write)
        }));
        match r {
            Err(_) => panics.push(at),
            Ok(rw) => outcomes.push((at, repaired.is_err(), rw)),
        }
        drop(img);
        let reread = Image::open_storage(d, &rw(None)).and_then(|img| {
            let mut b = vec![0u8; 4096];
            img.read_at(0, &mut b).map(|_| b)
        });
        rereads.push((at, reread));
    }
    assert!(
        panics.is_empty(),
        "requests panicked after faults at calls {panics:?}"
    );
    for (at, r) in rereads {
        match r {
            Ok(b) => assert_eq!(
                b,
                vec![5u8; 4096],
                "fault at {at}: data changed after reopen"
            ),
            Err(e) => panic!("fault at {at}: reopen and read failed: {e}"),
        }
    }
    for (at, failed, (read, write)) in outcomes {
        if failed {
            // The policy: a repair stopped half way fails the handle.
            assert!(
                read.is_err() && write.is_err(),
                "fault at {at}: failed handle served"
            );
        } else {
            assert_eq!(read.unwrap(), [5u8; 4096]);
        }
    }
    assert!(
        healthy_calls > 0,
        "the sweep reached past the repair's last call"
    );
}

/// A write that hits a full disk returns ENOSPC (not a generic error) with the file offset,
/// and the handle goes on once there is room again.
#[test]
fn enospc_is_reported_and_transient() {
    let disk = create(false);
    let fs = Arc::new(FaultStorage::new(disk.clone()));
    let img = Image::open_storage(fs.clone(), &rw(None)).unwrap();
    img.write_at(0, &[1u8; 4096]).unwrap();
    img.flush().unwrap();
    fs.arm(
        Fault::new(FaultCalls::WRITE, 0, libc::ENOSPC)
            .with_mode(FaultMode::From)
            .with_torn(true),
    );
    let e = img.write_at(16 * CS, &[2u8; 8192]).unwrap_err();
    match e.root() {
        qed::Error::Io { source, context } => {
            assert_eq!(source.raw_os_error(), Some(libc::ENOSPC));
            assert!(context.contains("writing new clusters at"), "{context}");
        }
        other => panic!("not an I/O error: {other}"),
    }
    fs.disarm();
    img.write_at(16 * CS, &[2u8; 8192]).unwrap();
    img.flush().unwrap();
    img.close().unwrap();
    let img = Image::open_storage(disk, &rw(None)).unwrap();
    assert_eq!(read(&img, 16 * CS, 8192), vec![2u8; 8192]);
    let r = img.check(CheckFix::ALL).unwrap();
    assert_eq!(r.corruptions, 0);
}

/// A crash can leave the file ending inside a cluster an entry points at (the write that grew
/// the file cut short); repair pads the file to the cluster's end (QEMU would otherwise take
/// the entry as pointing past the end). A fault at any call of that repairing open loses
/// nothing: the bytes the file held read back after a healthy reopen, whose check is clean.
#[test]
fn padding_a_file_cut_inside_a_cluster_survives_faults() {
    let disk = create(false);
    {
        let fs = Arc::new(FaultStorage::new(disk.clone()));
        let img = Image::open_storage(fs.clone(), &rw(None)).unwrap();
        img.write_at(0, &[0x21; 4096]).unwrap();
        img.write_at(9 * CS, &[0x22; 4096]).unwrap();
        img.flush().unwrap();
        fs.cut_off(); // killed: the need-check bit stays set
    }
    // Cut the file 512 bytes into the last data cluster (and drop the allocator's stretch).
    let last = Image::open_storage(
        disk.clone(),
        &OpenOptions {
            no_repair: true,
            ..Default::default()
        },
    )
    .unwrap()
    .map(0, 4 << 20)
    .unwrap()
    .iter()
    .filter_map(|e| match e.kind {
        qed::ExtentKind::Data { host_offset } => Some(host_offset),
        _ => None,
    })
    .max()
    .unwrap();
    disk.set_len(last + 512).unwrap();
    let cut = disk.to_bytes();
    let want = |img: &Image| {
        assert_eq!(read(img, 0, 4096), vec![0x21; 4096]);
        let mut b = read(img, 9 * CS, 4096);
        assert_eq!(&b[..512], &[0x22; 512][..], "the bytes the file held");
        b.drain(..512);
        assert!(b.iter().all(|&x| x == 0), "past the cut: zeros");
    };
    // The healthy repair pads the file to whole clusters.
    {
        let d = Arc::new(MemStorage::from_bytes(&cut));
        let img = Image::open_storage(d.clone(), &rw(None)).unwrap();
        want(&img);
        assert_eq!(d.len().unwrap() % CS, 0, "not padded");
    }
    let mut failed = 0;
    for at in 0..40 {
        for mode in [FaultMode::Once, FaultMode::From] {
            let d = Arc::new(MemStorage::from_bytes(&cut));
            let fs = Arc::new(FaultStorage::new(d.clone()));
            fs.arm(Fault::new(FaultCalls::ALL, at, libc::EIO).with_mode(mode));
            if let Ok(img) = Image::open_storage(fs.clone(), &rw(None)) {
                fs.disarm();
                want(&img);
                drop(img);
            } else {
                failed += 1;
                assert_eq!(fs.changed_after_fault(), 0, "fault at {at}: wrote after it");
            }
            let img = Image::open_storage(d.clone(), &rw(None)).unwrap();
            want(&img);
            let r = img.check(CheckFix::NONE).unwrap();
            assert_eq!(
                (r.corruptions, r.leaks, r.check_errors),
                (0, 0, 0),
                "fault at {at}"
            );
            assert_eq!(
                d.len().unwrap() % CS,
                0,
                "fault at {at}: not padded after reopen"
            );
        }
    }
    assert!(failed > 4, "only {failed} opens failed");
}

/// Storage that holds the first table write after `arm` until `release`, and keeps the file's
/// bytes as of each flush (what a power loss right after it leaves).
struct HoldTableWrite {
    inner: Arc<MemStorage>,
    state: std::sync::Mutex<Hold>,
    cv: std::sync::Condvar,
    durable: std::sync::Mutex<Vec<u8>>,
}

#[derive(Default)]
struct Hold {
    armed: bool,
    holding: bool,
    released: bool,
}

impl HoldTableWrite {
    fn new(inner: Arc<MemStorage>) -> HoldTableWrite {
        HoldTableWrite {
            durable: std::sync::Mutex::new(inner.to_bytes()),
            inner,
            state: Default::default(),
            cv: Default::default(),
        }
    }
    fn arm(&self) {
        self.state.lock().unwrap().armed = true;
    }
    fn wait_holding(&self) {
        let mut s = self.state.lock().unwrap();
        while !s.holding {
            s = self.cv.wait(s).unwrap();
        }
    }
    fn release(&self) {
        self.state.lock().unwrap().released = true;
        self.cv.notify_all();
    }
}

impl Storage for HoldTableWrite {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn write_metadata_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut s = self.state.lock().unwrap();
        if std::mem::take(&mut s.armed) {
            s.holding = true;
            self.cv.notify_all();
            while !s.released {
                s = self.cv.wait(s).unwrap();
            }
        }
        drop(s);
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        *self.durable.lock().unwrap() = self.inner.to_bytes();
        self.inner.flush()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
}

/// Found by the concurrent crash test: without a backing file, an allocating write puts its
/// new L2 entry in the cache before writing the piece of table that holds it. A second write
/// into that cluster used the cached entry and completed; a flush then completed while the
/// first writer's table write was still pending, so a crash lost the acknowledged, flushed
/// second write. A flush must not complete before the entries it relies on are written.
#[test]
fn a_flush_waits_for_entries_other_writes_already_used() {
    let disk = create(false);
    let hs = Arc::new(HoldTableWrite::new(disk.clone()));
    let img = Arc::new(Image::open_storage(hs.clone(), &rw(None)).unwrap());
    img.write_at(0, &[1u8; 512]).unwrap();
    img.flush().unwrap();
    // The first writer allocates guest cluster 8; its table write is held.
    hs.arm();
    let first = {
        let img = img.clone();
        std::thread::spawn(move || img.write_at(8 * CS, &[7u8; 512]).unwrap())
    };
    hs.wait_holding();
    // The second write goes in place, through the entry the first one cached.
    img.write_at(8 * CS + 1024, &[9u8; 512]).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let flusher = {
        let (img, hs) = (img.clone(), hs.clone());
        std::thread::spawn(move || {
            img.flush().unwrap();
            tx.send(hs.durable.lock().unwrap().clone()).unwrap();
        })
    };
    // The fixed flush waits for the held table write: let it go after a while. (Before the
    // fix, the flush returned at once; the timeout only decides how long a fixed run waits.)
    let durable = match rx.recv_timeout(std::time::Duration::from_millis(300)) {
        Ok(d) => {
            hs.release();
            d
        }
        Err(_) => {
            hs.release();
            rx.recv().unwrap()
        }
    };
    first.join().unwrap();
    flusher.join().unwrap();
    // Power lost right after the flush returned.
    let img = Image::open_storage(Arc::new(MemStorage::from_bytes(&durable)), &rw(None)).unwrap();
    assert!(
        read(&img, 8 * CS + 1024, 512) == vec![9u8; 512],
        "a write acknowledged before a completed flush was lost"
    );
}

/// Storage that runs a hook (once, when armed) at the next flush, before flushing.
struct HookFlush {
    inner: Arc<MemStorage>,
    hook: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Storage for HookFlush {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        let hook = self.hook.lock().unwrap().take();
        if let Some(hook) = hook {
            hook();
        }
        self.inner.flush()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
}

/// Found by reading the write-back: it snapshots the staged pieces of table, then flushes the
/// data before writing them. The snapshot held only the bytes, so in between a piece was
/// unpinned: under cache pressure it could be evicted and reloaded from the disk without its
/// new entries, and a read then returned the backing file's bytes for a completed write (and
/// a write could allocate the cluster again). Pieces stay pinned until they are written.
#[test]
fn pieces_being_written_back_stay_in_the_cache() {
    const TABLES: u64 = 128; // each a single piece mapping 2 MiB; the smallest cache holds 64
    let span = 512 * CS;
    let disk = Arc::new(MemStorage::new());
    Image::create_on(
        &*disk,
        &CreateOptions {
            size: TABLES * span,
            cluster_size: CS as u32,
            table_size: 1,
            backing_file: Some("base".into()),
            backing_format: Some(BackingFormat::Raw),
        },
    )
    .unwrap();
    let base = Arc::new(MemStorage::new());
    base.set_len(TABLES * span).unwrap();
    let hooked = Arc::new(HookFlush {
        inner: disk.clone(),
        hook: Default::default(),
    });
    let opts = OpenOptions {
        l2_cache_bytes: 0,
        writeback_delay: None,
        need_check_delay: None,
        ..rw(Some(base))
    };
    let img = Arc::new(Image::open_storage(hooked.clone(), &opts).unwrap());
    for t in 0..TABLES {
        img.write_at(t * span, &[1u8; 512]).unwrap();
    }
    img.flush().unwrap();
    // Staged in table 0's piece, which the write-back snapshots and then flushes data for.
    img.write_at(CS, &[0x77u8; 512]).unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    {
        let (weak, seen) = (Arc::downgrade(&img), seen.clone());
        *hooked.hook.lock().unwrap() = Some(Box::new(move || {
            let img = weak.upgrade().unwrap();
            // Every other table: enough misses to evict anything unpinned.
            for t in 1..TABLES {
                read(&img, t * span, 1);
            }
            *seen.lock().unwrap() = read(&img, CS, 512);
        }));
    }
    img.flush().unwrap();
    assert!(
        hooked.hook.lock().unwrap().is_none(),
        "the hook did not run"
    );
    let during = seen.lock().unwrap().clone();
    assert!(
        during == vec![0x77u8; 512],
        "a completed write read back as {:#x} (the backing file) during the write-back",
        during.first().copied().unwrap_or(0)
    );
    assert!(read(&img, CS, 512) == vec![0x77u8; 512]);
    Arc::try_unwrap(img).ok().unwrap().close().unwrap();
    let ro = OpenOptions {
        no_backing: true,
        ..OpenOptions::read_only()
    };
    let again = Image::open_storage(disk, &ro).unwrap();
    assert!(read(&again, CS, 512) == vec![0x77u8; 512]);
}
