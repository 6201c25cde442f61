// SPDX-License-Identifier: MIT OR Apache-2.0
//! Asynchronous requests on top of the engine: a bounded queue per image, run by the process's
//! I/O engine ([`Engine`]: a bounded pool of threads shared by every image, taking one request
//! per image in turn, and on Linux an io_uring ring that issues reads and in-place writes
//! itself), with completion delivery either on the engine's threads (the default) or on the
//! caller's event loop through an eventfd (a pipe where the system has no eventfd, see
//! [`notify`]).
//!
//! The image does the ordering that matters for correctness (two writers never allocate one
//! cluster; L2 updates are serialised per piece of table), so requests need no extra locking:
//! requests on different clusters run in parallel, and reads of allocated data never wait for
//! an unrelated allocating write. The queue adds only the flush rule: a flush completes after
//! every write submitted before it.
//!
//! Every accepted request completes exactly once: the completion is an `Option` taken in one
//! place, a request dropped without completing completes with `ECANCELED`, and a panic in the
//! engine completes with `EIO`.

use crate::error::{Error, Result};
use crate::image::{Image, WriteFlags, WriteZeroesFlags};
use crate::log::qed_log;
use std::collections::{BTreeSet, VecDeque};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

mod engine;
mod notify;
#[cfg(qed_io_uring)]
mod uring;
pub use engine::{Engine, EngineOptions, EngineStats, IoBackend, MAX_THREADS};
use notify::Notifier;

/// A raw buffer segment owned by the submitter, valid until its completion runs.
#[derive(Clone, Copy, Debug)]
pub struct RawBuf {
    /// Start of the buffer.
    pub ptr: *mut u8,
    /// Length in bytes.
    pub len: usize,
}

// SAFETY: the submitter promises the buffer stays valid and unaliased until completion, from
// whichever thread the worker runs on.
unsafe impl Send for RawBuf {}

/// What a request does.
#[derive(Debug)]
pub enum Op {
    /// Read into the buffers.
    Read {
        /// Guest offset.
        offset: u64,
        /// Destination segments.
        bufs: Vec<RawBuf>,
    },
    /// Write the buffers.
    Write {
        /// Guest offset.
        offset: u64,
        /// Source segments.
        bufs: Vec<RawBuf>,
        /// Per-request flags ([`WriteFlags::FUA`]).
        flags: WriteFlags,
    },
    /// Write zeroes ([`Image::write_zeroes`], or [`Image::write_zeroes_flags`] when `flags`
    /// has any).
    WriteZeroes {
        /// Guest offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Request flags.
        flags: WriteZeroesFlags,
    },
    /// Discard ([`Image::discard`]): the range reads as zeros, whole clusters give their space
    /// back.
    Discard {
        /// Guest offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Flush after every write submitted before it has completed.
    Flush,
}

/// Called once with the request's result.
pub type Completion = Box<dyn FnOnce(Result<()>) + Send>;

/// Where completions run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Delivery {
    /// On the library's worker threads, as soon as a request finishes.
    #[default]
    Workers,
    /// On the thread that calls [`AioQueue::poll`]; an eventfd becomes readable when
    /// completions are pending.
    EventLoop,
}

/// Queue settings.
#[derive(Clone, Copy, Debug)]
pub struct AioOptions {
    /// At most this many of the image's requests run on the engine's pool threads at once
    /// (0, the default: as many as the engine has; more than [`engine::MAX_THREADS`] is
    /// refused). Reads and writes the engine's io_uring ring does itself do not count.
    pub workers: usize,
    /// Requests queued or in flight at most (default 1024; 1 to [`MAX_QUEUE_DEPTH`]).
    pub queue_depth: usize,
    /// Where completions run.
    pub delivery: Delivery,
    /// When the queue is full: wait for room (true) or refuse the submit (false, the default).
    pub block_when_full: bool,
}

/// Most requests one queue may hold.
pub const MAX_QUEUE_DEPTH: usize = 1 << 20;

impl Default for AioOptions {
    fn default() -> Self {
        AioOptions {
            workers: 0,
            queue_depth: 1024,
            delivery: Delivery::Workers,
            block_when_full: false,
        }
    }
}

impl AioOptions {
    /// The defaults for `img` (the same for every image now that the engine's threads are
    /// shared; kept so that callers need not change).
    pub fn for_image(img: &Image) -> Self {
        let _ = img;
        AioOptions::default()
    }

    /// Refuses settings that cannot be applied, before anything is started.
    fn check(&self) -> Result<()> {
        let bad = |what, value: usize, reason: String| {
            Err(Error::InvalidArgument {
                what,
                value: value as u64,
                reason,
            })
        };
        if self.workers > engine::MAX_THREADS {
            return bad(
                "workers",
                self.workers,
                format!(
                    "at most {} (0: all the engine's threads)",
                    engine::MAX_THREADS
                ),
            );
        }
        if self.queue_depth == 0 || self.queue_depth > MAX_QUEUE_DEPTH {
            return bad(
                "queue_depth",
                self.queue_depth,
                format!("must be 1 to {MAX_QUEUE_DEPTH}"),
            );
        }
        Ok(())
    }
}

/// Why a submit was refused (no completion will run).
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum SubmitError {
    /// The queue is full (and `block_when_full` is off).
    Full,
    /// The queue is shutting down.
    Closed,
}

pub(crate) struct Request {
    seq: u64,
    tag: u64,
    pub(crate) op: Op,
    done: Option<Completion>,
}

impl Request {
    fn is_write(&self) -> bool {
        matches!(
            self.op,
            Op::Write { .. } | Op::WriteZeroes { .. } | Op::Discard { .. }
        )
    }
}

struct State {
    /// Requests waiting for a pool thread.
    queue: VecDeque<Request>,
    /// Requests accepted and not yet completed (callback returned).
    outstanding: usize,
    /// Sequence numbers of writes accepted and not yet finished.
    writes: BTreeSet<u64>,
    /// Flushes waiting for earlier writes.
    parked_flushes: Vec<Request>,
    shutdown: bool,
    /// Requests running on pool threads now, and whether the image is in the engine's line.
    running: usize,
    scheduled: bool,
    /// Submitters waiting for room: wake-ups (each a futex syscall) only when someone sleeps.
    waiting_submitters: usize,
}

pub(crate) struct Shared {
    pub(crate) img: Arc<Image>,
    opts: AioOptions,
    /// Pool threads this image may use at once.
    limit: usize,
    engine: Arc<engine::Inner>,
    state: Mutex<State>,
    /// Signals submitters (room freed).
    room: Condvar,
    /// Signals drain (outstanding reached zero).
    idle: Condvar,
    next_seq: AtomicU64,
    ready: Mutex<VecDeque<(Completion, Result<()>)>>,
    /// Event-loop delivery only.
    notifier: Option<Notifier>,
    id: u64,
}

static NEXT_QUEUE_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The queue whose completion this thread is running, to refuse re-entrant drain/poll.
    static IN_COMPLETION: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// Event-loop mode: answers a small read on the submitting thread when the engine can do
    /// it without waiting (cached L2 pieces, data in the page cache). The completion still
    /// goes through the ready list and runs in `poll`, never inside the submit; what is saved
    /// is the two cross-thread wake-ups of a round trip. Gives the op back otherwise.
    ///
    /// # Safety
    /// As for [`AioQueue::submit`]: the buffers are valid, and ours, until the completion.
    unsafe fn try_inline(&self, op: Op) -> std::result::Result<Result<()>, Op> {
        const INLINE_MAX: usize = 256 << 10;
        let Op::Read { offset, bufs } = &op else {
            return Err(op);
        };
        if bufs.iter().map(|b| b.len).sum::<usize>() > INLINE_MAX {
            return Err(op);
        }
        // SAFETY: the caller keeps each buffer valid and exclusively ours until the completion.
        let mut v: Vec<&mut [u8]> = bufs
            .iter()
            .map(|b| unsafe { std::slice::from_raw_parts_mut(b.ptr, b.len) })
            .collect();
        let offset = *offset;
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.img.try_read_nowait(offset, &mut v)
        }));
        drop(v);
        match r {
            Ok(Ok(true)) => Ok(Ok(())),
            Ok(Err(e)) => Ok(Err(e)),
            Ok(Ok(false)) => Err(op),
            Err(p) => Ok(Err(Error::Failed(format!(
                "internal error (panic): {}",
                panic_text(&*p)
            )))),
        }
    }

    fn run_completion(&self, done: Completion, r: Result<()>) {
        let prev = IN_COMPLETION.with(|c| c.replace(self.id));
        // A panicking callback must not take the thread (or the accounting) down with it.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| done(r)));
        IN_COMPLETION.with(|c| c.set(prev));
    }

    fn finished_one_locked(&self, st: &mut State) {
        st.outstanding -= 1;
        if st.outstanding == 0 {
            self.idle.notify_all();
        }
        if st.waiting_submitters > 0 {
            self.room.notify_one();
        }
    }

    /// Puts the image in the engine's line if it has queued requests and room to run one.
    fn kick_locked(self: &Arc<Self>, st: &mut State) {
        if !st.scheduled && !st.queue.is_empty() && st.running < self.limit {
            st.scheduled = true;
            self.engine.schedule(self.clone());
        }
    }

    /// Queues a request for the pool.
    #[cfg_attr(not(qed_io_uring), allow(dead_code))]
    pub(crate) fn enqueue(self: &Arc<Self>, req: Request) {
        let mut st = lock(&self.state);
        st.queue.push_back(req);
        self.kick_locked(&mut st);
    }

    /// A pool thread's turn on this image: runs one request. The image goes back to the end of
    /// the line while it has more, so images take turns request by request.
    pub(super) fn run_one(self: &Arc<Self>) {
        let mut req = {
            let mut st = lock(&self.state);
            st.scheduled = false;
            let Some(r) = st.queue.pop_front() else {
                return;
            };
            st.running += 1;
            self.kick_locked(&mut st);
            r
        };
        let r = self.execute(&mut req);
        self.engine.pool_requests.fetch_add(1, Ordering::Relaxed);
        self.finish(req, r, true);
    }

    /// Delivers a request's result and does its accounting: wherever it ran, this is the one
    /// place a request ends.
    pub(crate) fn finish(self: &Arc<Self>, mut req: Request, r: Result<()>, pooled: bool) {
        let write = req.is_write().then_some(req.seq);
        let delivered = match (self.opts.delivery, req.done.take()) {
            (Delivery::Workers, Some(done)) => {
                self.run_completion(done, r);
                true
            }
            (Delivery::EventLoop, Some(done)) => {
                lock(&self.ready).push_back((done, r));
                if let Some(n) = &self.notifier {
                    n.signal();
                }
                false
            }
            (_, None) => false,
        };
        let mut st = lock(&self.state);
        if pooled {
            st.running -= 1;
        }
        if let Some(seq) = write {
            self.write_done_locked(&mut st, seq);
        }
        if delivered {
            self.finished_one_locked(&mut st);
        }
        self.kick_locked(&mut st);
    }

    fn execute(&self, req: &mut Request) -> Result<()> {
        let img = &*self.img;
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match &req.op {
            Op::Read { offset, bufs } => {
                // SAFETY: the submitter keeps each buffer valid, exclusively ours, until the
                // completion runs (the contract of `AioQueue::submit`).
                let mut v: Vec<&mut [u8]> = bufs
                    .iter()
                    .map(|b| unsafe { std::slice::from_raw_parts_mut(b.ptr, b.len) })
                    .collect();
                img.read_sg(*offset, &mut v)
            }
            Op::Write {
                offset,
                bufs,
                flags,
            } => {
                // SAFETY: as above; the buffers are only read.
                let v: Vec<&[u8]> = bufs
                    .iter()
                    .map(|b| unsafe { std::slice::from_raw_parts(b.ptr as *const u8, b.len) })
                    .collect();
                img.write_sg_flags(*offset, &v, *flags)
            }
            Op::WriteZeroes { offset, len, flags } if *flags == WriteZeroesFlags::NONE => {
                img.write_zeroes(*offset, *len)
            }
            Op::WriteZeroes { offset, len, flags } => img.write_zeroes_flags(*offset, *len, *flags),
            Op::Discard { offset, len } => img.discard(*offset, *len),
            Op::Flush => img.flush(),
        }));
        r.unwrap_or_else(|p| {
            Err(Error::Failed(format!(
                "internal error (panic): {}",
                panic_text(&*p)
            )))
        })
    }

    /// Releases flushes that were waiting only for writes up to now (the caller kicks).
    fn write_done_locked(&self, st: &mut State, seq: u64) {
        st.writes.remove(&seq);
        let oldest = st.writes.first().copied().unwrap_or(u64::MAX);
        let (ready, parked): (Vec<_>, Vec<_>) = std::mem::take(&mut st.parked_flushes)
            .into_iter()
            .partition(|f| f.seq < oldest);
        st.parked_flushes = parked;
        st.queue.extend(ready);
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown".into())
}

/// The asynchronous face of one image.
pub struct AioQueue {
    shared: Arc<Shared>,
    engine: Engine,
    closed: AtomicBool,
}

impl AioQueue {
    /// The asynchronous queue of `img` on the process's engine ([`Engine::global`]).
    ///
    /// # Errors
    /// `InvalidArgument` for settings out of range (nothing is started); as
    /// [`Engine::global`] when the process's engine cannot start.
    pub fn new(img: Arc<Image>, opts: AioOptions) -> Result<AioQueue> {
        opts.check()?;
        AioQueue::with_engine(img, opts, &Engine::global()?)
    }

    /// The asynchronous queue of `img` on `engine`.
    ///
    /// # Errors
    /// `InvalidArgument` for settings out of range (nothing is started); `Io` when the
    /// event-loop descriptor cannot be created.
    pub fn with_engine(img: Arc<Image>, opts: AioOptions, engine: &Engine) -> Result<AioQueue> {
        opts.check()?;
        let max = engine.max_threads();
        let limit = if opts.workers == 0 || opts.workers > max {
            if opts.workers > max {
                qed_log!(
                    Info,
                    "{} workers asked for an image: the engine has {max} threads, all of which \
                     it may use",
                    opts.workers
                );
            }
            max
        } else {
            opts.workers
        };
        let notifier = if opts.delivery == Delivery::EventLoop {
            Some(Notifier::new().map_err(|e| Error::io("creating the event-loop descriptor", e))?)
        } else {
            None
        };
        let shared = Arc::new(Shared {
            img,
            opts,
            limit,
            engine: engine.inner().clone(),
            state: Mutex::new(State {
                queue: VecDeque::new(),
                outstanding: 0,
                writes: BTreeSet::new(),
                parked_flushes: Vec::new(),
                shutdown: false,
                running: 0,
                scheduled: false,
                waiting_submitters: 0,
            }),
            room: Condvar::new(),
            idle: Condvar::new(),
            next_seq: AtomicU64::new(1),
            ready: Mutex::new(VecDeque::new()),
            notifier,
            id: NEXT_QUEUE_ID.fetch_add(1, Ordering::Relaxed),
        });
        Ok(AioQueue {
            shared,
            engine: engine.clone(),
            closed: AtomicBool::new(false),
        })
    }

    /// The image.
    pub fn image(&self) -> &Arc<Image> {
        &self.shared.img
    }

    /// The settings.
    pub fn options(&self) -> AioOptions {
        self.shared.opts
    }

    /// The engine that runs the requests.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Queues a request; `done` runs exactly once, later, never inside this call. `tag` is for
    /// [`AioQueue::cancel`].
    ///
    /// # Safety
    /// Every buffer in `op` must stay valid (and, for reads, not be accessed by anyone else)
    /// until `done` runs.
    pub unsafe fn submit(
        &self,
        op: Op,
        tag: u64,
        done: Completion,
    ) -> std::result::Result<(), SubmitError> {
        let sh = &self.shared;
        let mut st = lock(&sh.state);
        loop {
            if st.shutdown {
                return Err(SubmitError::Closed);
            }
            if st.outstanding < sh.opts.queue_depth {
                break;
            }
            if !sh.opts.block_when_full || IN_COMPLETION.with(|c| c.get()) == sh.id {
                return Err(SubmitError::Full);
            }
            st.waiting_submitters += 1;
            st = sh.room.wait(st).unwrap_or_else(PoisonError::into_inner);
            st.waiting_submitters -= 1;
        }
        st.outstanding += 1;
        // Only reads can be answered at submit: other requests keep the lock and queue.
        let op = if sh.opts.delivery == Delivery::EventLoop && matches!(op, Op::Read { .. }) {
            drop(st);
            // SAFETY: forwarded from the caller: the buffers are valid and ours until `done`.
            match unsafe { sh.try_inline(op) } {
                Ok(r) => {
                    lock(&sh.ready).push_back((done, r));
                    if let Some(n) = &sh.notifier {
                        n.signal();
                    }
                    return Ok(());
                }
                Err(op) => {
                    st = lock(&sh.state);
                    op
                }
            }
        } else {
            op
        };
        let seq = sh.next_seq.fetch_add(1, Ordering::Relaxed);
        let req = Request {
            seq,
            tag,
            op,
            done: Some(done),
        };
        if req.is_write() {
            st.writes.insert(seq);
        }
        if matches!(req.op, Op::Flush) && st.writes.first().is_some_and(|&w| w < seq) {
            st.parked_flushes.push(req);
            return Ok(());
        }
        #[cfg(qed_io_uring)]
        if let Some(ring) = &sh.engine.ring {
            if uring::wants(&req.op) {
                drop(st);
                ring.submit(sh.clone(), req);
                return Ok(());
            }
        }
        st.queue.push_back(req);
        sh.kick_locked(&mut st);
        Ok(())
    }

    /// Cancels queued requests with `tag` that have not started; each completes with
    /// `ECANCELED` (through the normal delivery). Returns how many were cancelled.
    pub fn cancel(&self, tag: u64) -> usize {
        let sh = &self.shared;
        let mut cancelled = Vec::new();
        {
            let mut st = lock(&sh.state);
            let q = std::mem::take(&mut st.queue);
            for r in q {
                if r.tag == tag {
                    cancelled.push(r);
                } else {
                    st.queue.push_back(r);
                }
            }
            let parked = std::mem::take(&mut st.parked_flushes);
            for r in parked {
                if r.tag == tag {
                    cancelled.push(r);
                } else {
                    st.parked_flushes.push(r);
                }
            }
        }
        let n = cancelled.len();
        for r in cancelled {
            sh.finish(r, Err(cancelled_error()), false);
        }
        n
    }

    /// Whether the calling thread is inside one of this queue's completions.
    fn in_own_completion(&self) -> bool {
        IN_COMPLETION.with(|c| c.get()) == self.shared.id
    }

    /// The eventfd that becomes readable while completions are pending (event-loop delivery).
    pub fn event_fd(&self) -> Option<RawFd> {
        self.shared.notifier.as_ref().map(Notifier::fd)
    }

    /// Runs pending completions on this thread (event-loop delivery); returns how many ran.
    pub fn poll(&self) -> Result<usize> {
        if self.in_own_completion() {
            return Err(deadlock("poll"));
        }
        let sh = &*self.shared;
        if sh.opts.delivery != Delivery::EventLoop {
            return Ok(0);
        }
        if let Some(n) = &sh.notifier {
            n.clear();
        }
        // Only the completions ready now: those that callbacks cause (a read answered at
        // submit) wait for the next poll, so one poll never runs an endless chain.
        let ready = std::mem::take(&mut *lock(&sh.ready));
        let n = ready.len();
        for (done, r) in ready {
            sh.run_completion(done, r);
            sh.finished_one_locked(&mut lock(&sh.state));
        }
        Ok(n)
    }

    /// Waits until every accepted request has completed and its completion has returned. In
    /// event-loop delivery it runs the completions itself. Then, if the need-check idle timer
    /// is pending, settles the image at once ([`Image::settle`]).
    pub fn drain(&self) -> Result<()> {
        if self.in_own_completion() {
            return Err(deadlock("drain"));
        }
        #[cfg(qed_io_uring)]
        if self
            .shared
            .engine
            .ring
            .as_ref()
            .is_some_and(|r| r.is_ring_thread())
        {
            // The ring's own thread would wait for itself.
            return Err(deadlock("drain"));
        }
        let sh = &*self.shared;
        loop {
            if sh.opts.delivery == Delivery::EventLoop {
                self.poll()?;
            }
            let st = lock(&sh.state);
            if st.outstanding == 0 {
                drop(st);
                // A drained guest is idle: clear the need-check bit now rather than when the
                // idle timer comes, as QEMU does on drain.
                sh.img.settle_if_pending();
                return Ok(());
            }
            let timeout =
                std::time::Duration::from_millis(if sh.opts.delivery == Delivery::EventLoop {
                    1
                } else {
                    100
                });
            drop(
                sh.idle
                    .wait_timeout(st, timeout)
                    .unwrap_or_else(PoisonError::into_inner),
            );
        }
    }

    /// Drains; later submits are refused. The engine's threads are shared and stay.
    pub fn shutdown(&self) -> Result<()> {
        if self.in_own_completion() {
            return Err(deadlock("shutdown"));
        }
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        if let Err(e) = self.drain() {
            self.closed.store(false, Ordering::Release);
            return Err(e);
        }
        {
            let mut st = lock(&self.shared.state);
            st.shutdown = true;
            self.shared.room.notify_all();
        }
        // An engine thread may still hold the queue (and so the image) for a moment after the
        // last completion: wait for it, so that a caller who then drops its last reference to
        // the image closes it here, not later on an engine thread (or never, at exit).
        let mut spins = 0u32;
        while Arc::strong_count(&self.shared) > 1 {
            spins += 1;
            if spins < 100 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(std::time::Duration::from_micros(100));
            }
        }
        Ok(())
    }

    /// Requests accepted and not yet completed.
    pub fn outstanding(&self) -> usize {
        lock(&self.shared.state).outstanding
    }
}

fn cancelled_error() -> Error {
    Error::io(
        "request cancelled",
        std::io::Error::from_raw_os_error(libc::ECANCELED),
    )
}

fn deadlock(what: &str) -> Error {
    Error::io(
        format!("{what} called from inside one of this image's completions"),
        std::io::Error::from_raw_os_error(libc::EDEADLK),
    )
}

impl Drop for AioQueue {
    fn drop(&mut self) {
        // The notifier's descriptors close with the last reference to `shared`.
        let _ = self.shutdown();
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        // Structural exactly-once: a request that never completed still gets its one call.
        if let Some(done) = self.done.take() {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                done(Err(cancelled_error()))
            }));
        }
    }
}
