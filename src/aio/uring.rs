// SPDX-License-Identifier: MIT OR Apache-2.0
//! The engine's io_uring ring (Linux). One thread owns the ring. It takes reads and in-place
//! writes from every queue of the engine, asks the image where their bytes live (cached
//! tables only: [`Image::plan_direct`](crate::image::Image)) and issues them straight to the
//! image files, many per system call, with no thread hand-off per request. What it cannot plan
//! (a table to load, a backing file, an allocation, storage without a descriptor, unaligned
//! O_DIRECT) goes to the pool, as does every other kind of request. Completions of the ring's
//! requests run on its thread; requests their callbacks submit are issued in the next round
//! without a wake-up.

use super::engine::Inner;
use super::{lock, Op, RawBuf, Request, Shared};
use crate::error::{Error, Result};
use crate::image::{DirectPiece, DirectPlan, WriteFlags};
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Entries of the submission queue; the completion queue has twice as many, and the kernel
/// keeps completions beyond that rather than drop them (IORING_FEAT_NODROP, Linux 5.5).
const ENTRIES: u32 = 256;
/// `user_data` of the read that waits on the wake-up eventfd.
const WAKE: u64 = u64::MAX;
/// Pieces in the kernel at most (a request starts below it and may add up to this many), so
/// with the wake-up read they never fill the completion queue (twice the entries).
const MAX_IN_FLIGHT: usize = ENTRIES as usize / 2;
/// Most iovecs one readv/writev takes (UIO_MAXIOV).
const IOV_MAX: usize = 1024;

/// Whether the ring may take `op` (everything else goes to the pool).
pub(super) fn wants(op: &Op) -> bool {
    match op {
        Op::Read { .. } => true,
        // FUA writes too: the image plans them only where their mapping is durable, and they
        // go out with RWF_DSYNC.
        Op::Write { .. } => true,
        _ => false,
    }
}

thread_local! {
    /// The engine whose ring this thread runs (0: none).
    static RING_OF: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

pub(super) struct Ring {
    engine_id: u64,
    /// Requests for the ring thread.
    inbox: Mutex<Vec<(Arc<Shared>, Request)>>,
    /// Set while the ring thread waits in the kernel: a submitter then writes the eventfd.
    sleeping: AtomicBool,
    wake: OwnedFd,
    stop: AtomicBool,
}

impl Ring {
    pub(super) fn new(engine_id: u64) -> Result<Ring> {
        // SAFETY: eventfd takes no pointers; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(Error::io(
                "creating the ring's eventfd",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Ring {
            engine_id,
            inbox: Mutex::new(Vec::new()),
            sleeping: AtomicBool::new(false),
            // SAFETY: `fd` is a new descriptor that nothing else owns.
            wake: unsafe { OwnedFd::from_raw_fd(fd) },
            stop: AtomicBool::new(false),
        })
    }

    /// Starts the ring thread, which creates the ring itself (a single-issuer ring belongs to
    /// the thread that made it); fails when the kernel refuses io_uring.
    pub(super) fn start(&self, inner: &Arc<Inner>) -> Result<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        let me = inner.clone();
        crate::thread::spawn(
            std::thread::Builder::new().name("qed-uring".into()),
            move || {
                let ring = match build() {
                    Ok(r) => {
                        let _ = tx.send(Ok(()));
                        r
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                drop(tx);
                Worker::new(me, ring).run();
            },
        )
        .map_err(|e| Error::io("starting the io_uring thread", e))?;
        match rx.recv() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::io("setting up io_uring", e)),
            Err(_) => Err(Error::Failed("the io_uring thread ended at start".into())),
        }
    }

    /// Hands a request to the ring thread.
    pub(super) fn submit(&self, sh: Arc<Shared>, req: Request) {
        lock(&self.inbox).push((sh, req));
        // From the ring thread itself (a completion submitting) nothing needs waking.
        if !self.is_ring_thread() && self.sleeping.swap(false, Ordering::SeqCst) {
            self.kick();
        }
    }

    pub(super) fn is_ring_thread(&self) -> bool {
        RING_OF.with(|r| r.get()) == self.engine_id
    }

    fn kick(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd. A full counter (EAGAIN)
        // already means a pending wake-up.
        unsafe {
            libc::write(
                self.wake.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }

    pub(super) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.kick();
    }
}

fn build() -> std::io::Result<IoUring> {
    // Completions are reaped by the one thread that submits: tell the kernel so where it can
    // use it (Linux 5.19 / 6.0), and fall back to a plain ring on older kernels.
    let mut b = IoUring::builder();
    b.setup_coop_taskrun().setup_single_issuer();
    let ring = match b.build(ENTRIES) {
        Ok(r) => r,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::new(ENTRIES)?,
        Err(e) => return Err(e),
    };
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for (code, name) in [
        (opcode::Readv::CODE, "readv"),
        (opcode::Writev::CODE, "writev"),
        (opcode::Read::CODE, "read"),
    ] {
        if !probe.is_supported(code) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                format!("this kernel's io_uring has no {name}"),
            ));
        }
    }
    Ok(ring)
}

/// A request the ring is doing.
struct Job {
    sh: Arc<Shared>,
    req: Request,
    write: bool,
    fua: bool,
    offset: u64,
    total: u64,
    /// Pieces not yet done.
    pending: usize,
    err: Option<Error>,
    /// Held until the I/O is done: keeps the image's exclusive operations out.
    _plan: DirectPlan,
}

/// One readv/writev of a job.
struct Seg {
    job: usize,
    fd: i32,
    iov: Vec<libc::iovec>,
    /// Where the next byte goes in the file, and how many are left.
    host: u64,
    left: usize,
}

/// A vector whose free slots are reused, so indices stay valid as `user_data`.
struct Slab<T> {
    items: Vec<Option<T>>,
    free: Vec<usize>,
}

impl<T> Slab<T> {
    fn new() -> Self {
        Slab {
            items: Vec::new(),
            free: Vec::new(),
        }
    }
    fn insert(&mut self, t: T) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.items[i] = Some(t);
                i
            }
            None => {
                self.items.push(Some(t));
                self.items.len() - 1
            }
        }
    }
    fn remove(&mut self, i: usize) -> Option<T> {
        let t = self.items.get_mut(i)?.take();
        if t.is_some() {
            self.free.push(i);
        }
        t
    }
    fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        self.items.get_mut(i)?.as_mut()
    }
    fn len(&self) -> usize {
        self.items.len() - self.free.len()
    }
}

struct Worker {
    inner: Arc<Inner>,
    ring: IoUring,
    jobs: Slab<Job>,
    segs: Slab<Seg>,
    /// Leaked: the kernel may write it until the ring is torn down, after the worker.
    wake_buf: &'static mut u64,
    wake_armed: bool,
}

impl Worker {
    fn new(inner: Arc<Inner>, ring: IoUring) -> Self {
        Worker {
            inner,
            ring,
            jobs: Slab::new(),
            segs: Slab::new(),
            wake_buf: Box::leak(Box::new(0)),
            wake_armed: false,
        }
    }

    fn me(&self) -> &Ring {
        self.inner
            .ring
            .as_ref()
            .expect("a ring worker's engine has a ring")
    }

    fn run(mut self) {
        RING_OF.with(|r| r.set(self.me().engine_id));
        let mut local = Vec::new();
        // Requests that wait for room: at most MAX_IN_FLIGHT pieces are in the kernel, so the
        // completion queue (twice the entries) never overflows.
        let mut waiting = std::collections::VecDeque::new();
        loop {
            if !self.wake_armed {
                self.arm_wake();
            }
            std::mem::swap(&mut *lock(&self.me().inbox), &mut local);
            let had_work = !local.is_empty() || !waiting.is_empty();
            waiting.extend(local.drain(..));
            while self.segs.len() < MAX_IN_FLIGHT {
                let Some((sh, req)) = waiting.pop_front() else {
                    break;
                };
                self.start(sh, req);
            }
            if self.me().stop.load(Ordering::SeqCst) && self.jobs.len() == 0 && waiting.is_empty() {
                return;
            }
            let r = if !waiting.is_empty() {
                // Full: wait for pieces to complete (some are in flight, so this wakes).
                self.ring.submit_and_wait(1)
            } else if had_work {
                self.ring.submit()
            } else {
                // Announce the sleep, then look once more: a submitter that saw `sleeping`
                // clear has already put its request in the inbox.
                self.me().sleeping.store(true, Ordering::SeqCst);
                if lock(&self.me().inbox).is_empty() && !self.me().stop.load(Ordering::SeqCst) {
                    self.ring.submit_and_wait(1)
                } else {
                    self.ring.submit()
                }
            };
            self.me().sleeping.store(false, Ordering::SeqCst);
            if let Err(e) = r {
                if e.raw_os_error() != Some(libc::EINTR) && e.raw_os_error() != Some(libc::EBUSY) {
                    crate::log::qed_log!(Error, "io_uring_enter failed: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            self.reap();
        }
    }

    fn arm_wake(&mut self) {
        let e = opcode::Read::new(
            types::Fd(self.me().wake.as_raw_fd()),
            (&mut *self.wake_buf as *mut u64).cast::<u8>(),
            8,
        )
        .build()
        .user_data(WAKE);
        // SAFETY: the buffer is leaked (`wake_buf` is 'static), so it outlives the read.
        if unsafe { self.push(&e) } {
            self.wake_armed = true;
        }
    }

    /// Queues an entry, submitting what is queued first when the queue is full.
    ///
    /// # Safety
    /// The entry's buffers stay valid until its completion.
    unsafe fn push(&mut self, e: &squeue::Entry) -> bool {
        for _ in 0..2 {
            // SAFETY: forwarded: the buffers outlive the completion.
            if unsafe { self.ring.submission().push(e) }.is_ok() {
                return true;
            }
            let _ = self.ring.submit();
        }
        false
    }

    /// Plans a request and issues its pieces, or hands it to the pool.
    fn start(&mut self, sh: Arc<Shared>, req: Request) {
        let (offset, bufs, write, fua) = match &req.op {
            Op::Read { offset, bufs } => (*offset, bufs.as_slice(), false, false),
            Op::Write {
                offset,
                bufs,
                flags,
            } => (
                *offset,
                bufs.as_slice(),
                true,
                flags.contains(WriteFlags::FUA),
            ),
            _ => return sh.enqueue(req),
        };
        let total: u64 = bufs.iter().map(|b| b.len as u64).sum();
        let Some(plan) = sh.img.plan_direct(offset, total, write, fua) else {
            return sh.enqueue(req);
        };
        let a = plan.target.align;
        if bufs.len() > IOV_MAX
            || plan.pieces.len() > MAX_IN_FLIGHT
            || (a > 1
                && (offset % a as u64 != 0
                    || bufs
                        .iter()
                        .any(|b| b.ptr as usize % a != 0 || b.len % a != 0)))
        {
            drop(plan);
            return sh.enqueue(req);
        }
        let fd = plan.target.fd;
        // Cut the caller's buffers along the pieces.
        let mut cur = Cursor::new(bufs);
        let mut segs = Vec::new();
        for p in &plan.pieces {
            match *p {
                DirectPiece::Host { host_offset, len } => {
                    segs.push((host_offset, len as usize, cur.take(len as usize)))
                }
                DirectPiece::Zero { len } => {
                    // SAFETY: a read's buffers are the caller's, valid and ours until the
                    // completion (the submit contract).
                    unsafe { zero(&cur.take(len as usize)) };
                }
            }
        }
        let job = self.jobs.insert(Job {
            sh,
            req,
            write,
            fua,
            offset,
            total,
            pending: segs.len(),
            err: None,
            _plan: plan,
        });
        if segs.is_empty() {
            return self.complete(job);
        }
        for (host, len, iov) in segs {
            let s = self.segs.insert(Seg {
                job,
                fd,
                iov,
                host,
                left: len,
            });
            self.issue(s);
        }
    }

    /// Issues (or re-issues, after a short transfer) one piece.
    fn issue(&mut self, s: usize) {
        let seg = self.segs.get_mut(s).expect("live piece");
        let job = self.jobs.get(seg.job);
        let (write, fua) = (job.write, job.fua);
        let fd = types::Fd(seg.fd);
        let (ptr, n, at) = (seg.iov.as_ptr(), seg.iov.len() as u32, seg.host);
        let e = if write {
            let flags = if fua { libc::RWF_DSYNC } else { 0 };
            opcode::Writev::new(fd, ptr, n)
                .offset(at)
                .rw_flags(flags)
                .build()
        } else {
            opcode::Readv::new(fd, ptr, n).offset(at).build()
        }
        .user_data(s as u64);
        // SAFETY: the iovecs live in the slab until the piece completes, and the buffers they
        // name are the caller's, valid until the request's completion.
        if !unsafe { self.push(&e) } {
            // The queue stays full even after submitting: the kernel is out of resources.
            self.piece_done(s, Some(std::io::Error::from_raw_os_error(libc::EAGAIN)));
        }
    }

    fn reap(&mut self) {
        let done: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c: cqueue::Entry| (c.user_data(), c.result()))
            .collect();
        for (ud, res) in done {
            if ud == WAKE {
                self.wake_armed = false;
                continue;
            }
            self.transferred(ud as usize, res);
        }
    }

    fn transferred(&mut self, s: usize, res: i32) {
        if res == -libc::EAGAIN || res == -libc::EINTR {
            return self.issue(s);
        }
        if res < 0 {
            return self.piece_done(s, Some(std::io::Error::from_raw_os_error(-res)));
        }
        let job = self.segs.get_mut(s).expect("live piece").job;
        let write = self.jobs.get(job).write;
        let seg = self.segs.get_mut(s).expect("live piece");
        let n = res as usize;
        if n >= seg.left {
            return self.piece_done(s, None);
        }
        if n == 0 {
            if write {
                return self.piece_done(s, Some(std::io::Error::from_raw_os_error(libc::EIO)));
            }
            // End of the file: the rest reads as zeros, as the synchronous read has it.
            // SAFETY: the caller's read buffers, valid until the completion.
            unsafe { zero(&seg.iov) };
            return self.piece_done(s, None);
        }
        seg.left -= n;
        seg.host += n as u64;
        advance(&mut seg.iov, n);
        self.issue(s);
    }

    fn piece_done(&mut self, s: usize, err: Option<std::io::Error>) {
        let Some(seg) = self.segs.remove(s) else {
            return;
        };
        let job = self.jobs.get_mut(seg.job).expect("live job");
        if let (Some(e), None) = (err, &job.err) {
            let what = if job.write { "writing" } else { "reading" };
            job.err = Some(Error::io(
                format!("{what} data cluster at {:#x}", seg.host),
                e,
            ));
        }
        job.pending -= 1;
        if job.pending == 0 {
            self.complete(seg.job);
        }
    }

    fn complete(&mut self, j: usize) {
        let Some(job) = self.jobs.remove(j) else {
            return;
        };
        let Job {
            sh,
            req,
            write,
            fua,
            offset,
            total,
            err,
            _plan,
            ..
        } = job;
        // The pins go before the callback, which may close the image.
        drop(_plan);
        let r = match err {
            None => Ok(()),
            Some(e) => Err(e),
        };
        let r = sh.img.finish_direct(write, fua, offset, total, r);
        self.inner.ring_requests.fetch_add(1, Ordering::Relaxed);
        sh.finish(req, r, false);
    }
}

impl Slab<Job> {
    fn get(&mut self, i: usize) -> &mut Job {
        self.get_mut(i).expect("live job")
    }
}

/// Walks a request's buffers, cutting them into iovecs.
struct Cursor<'a> {
    bufs: &'a [RawBuf],
    idx: usize,
    skip: usize,
}

impl<'a> Cursor<'a> {
    fn new(bufs: &'a [RawBuf]) -> Self {
        Cursor {
            bufs,
            idx: 0,
            skip: 0,
        }
    }

    fn take(&mut self, mut n: usize) -> Vec<libc::iovec> {
        let mut out = Vec::new();
        while n > 0 && self.idx < self.bufs.len() {
            let b = self.bufs[self.idx];
            let here = (b.len - self.skip).min(n);
            if here > 0 {
                out.push(libc::iovec {
                    // SAFETY: `skip` < the buffer's length: an offset inside the caller's buffer.
                    iov_base: unsafe { b.ptr.add(self.skip) }.cast(),
                    iov_len: here,
                });
            }
            n -= here;
            self.skip += here;
            if self.skip == b.len {
                self.idx += 1;
                self.skip = 0;
            }
        }
        out
    }
}

/// Fills the buffers an iovec list names with zeros.
///
/// # Safety
/// Each iovec names writable memory no one else uses meanwhile.
unsafe fn zero(iov: &[libc::iovec]) {
    for v in iov {
        // SAFETY: forwarded contract.
        unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
    }
}

/// Drops the first `n` bytes of an iovec list.
fn advance(iov: &mut Vec<libc::iovec>, mut n: usize) {
    let mut drop_front = 0;
    for v in iov.iter_mut() {
        if n >= v.iov_len {
            n -= v.iov_len;
            drop_front += 1;
        } else {
            // SAFETY: `n` < iov_len: still inside the same buffer.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
            v.iov_len -= n;
            break;
        }
    }
    iov.drain(..drop_front);
}

#[cfg(test)]
mod tests {
    use super::super::{AioOptions, AioQueue, Engine, EngineOptions, IoBackend, Op, RawBuf};
    use crate::image::{CreateOptions, Image, OpenOptions, WriteFlags};
    use crate::storage::{DirectTarget, FileStorage, Storage};
    use std::io;
    use std::os::fd::AsRawFd;
    use std::sync::Arc;

    /// The image file, except that the ring gets a descriptor open the wrong way: its reads
    /// (write-only descriptor) and writes (read-only) fail with EBADF in the kernel.
    struct WrongWay {
        inner: FileStorage,
        read_only: std::fs::File,
        write_only: std::fs::File,
    }

    impl Storage for WrongWay {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.inner.write_at(buf, offset)
        }
        fn direct_target(&self, write: bool) -> Option<DirectTarget> {
            let f = if write {
                &self.read_only
            } else {
                &self.write_only
            };
            Some(DirectTarget {
                fd: f.as_raw_fd(),
                align: 1,
                _pin: None,
            })
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

    fn submit_wait(q: &AioQueue, op: Op) -> crate::Result<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        // SAFETY: the caller's buffers outlive this call, which waits for the completion.
        unsafe { q.submit(op, 0, Box::new(move |r| drop(tx.send(r)))) }.unwrap();
        rx.recv().unwrap()
    }

    /// Errors of the ring's own reads and writes reach the request; a failed FUA write fails
    /// the handle; what was flushed before is intact after a reopen.
    #[test]
    fn ring_io_errors_complete_the_request_and_lose_nothing_flushed() {
        let Ok(engine) = Engine::new(EngineOptions::new(2, IoBackend::IoUring)) else {
            assert_ne!(std::env::var("QED_IO_ENGINE").as_deref(), Ok("io_uring"));
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e.qed");
        Image::create(&p, &CreateOptions::new(4 << 20)).unwrap();
        let open = |o: &mut std::fs::OpenOptions| o.open(&p).unwrap();
        let storage = WrongWay {
            inner: FileStorage::open(&p, true, false).unwrap(),
            read_only: open(std::fs::OpenOptions::new().read(true)),
            write_only: open(std::fs::OpenOptions::new().write(true)),
        };
        let mut o = OpenOptions::read_write();
        o.lock = false;
        let img = Arc::new(Image::open_storage(Arc::new(storage), &o).unwrap());
        img.write_at(0, &[7u8; 4096]).unwrap();
        img.flush().unwrap();
        let q = AioQueue::with_engine(img.clone(), AioOptions::default(), &engine).unwrap();
        let mut b = vec![9u8; 4096];
        let seg = |b: &mut Vec<u8>| {
            vec![RawBuf {
                ptr: b.as_mut_ptr(),
                len: b.len(),
            }]
        };
        let ebadf = |r: crate::Result<()>| {
            let e = r.unwrap_err();
            assert!(e.to_string().contains("data cluster"), "{e}");
            assert_eq!(crate::capi::errno_of(&e), libc::EBADF, "{e}");
        };
        let ring0 = engine.stats().ring_requests;
        ebadf(submit_wait(
            &q,
            Op::Read {
                offset: 0,
                bufs: seg(&mut b),
            },
        ));
        let write = |b: &mut Vec<u8>, flags| Op::Write {
            offset: 0,
            bufs: seg(b),
            flags,
        };
        ebadf(submit_wait(&q, write(&mut b, WriteFlags::NONE)));
        assert_eq!(engine.stats().ring_requests, ring0 + 2);
        // A plain write error leaves the handle usable; a FUA one fails it.
        let mut r = vec![0u8; 4096];
        img.read_at(0, &mut r).unwrap();
        assert_eq!(r, vec![7u8; 4096]);
        ebadf(submit_wait(&q, write(&mut b, WriteFlags::FUA)));
        assert!(img.read_at(0, &mut r).is_err());
        q.shutdown().unwrap();
        drop(q);
        drop(img);
        let img = Image::open(&p, &OpenOptions::read_write()).unwrap();
        img.read_at(0, &mut r).unwrap();
        assert_eq!(r, vec![7u8; 4096]);
    }
}
