// SPDX-License-Identifier: MIT OR Apache-2.0
//! Asynchronous requests on top of the engine: a bounded queue per image, worker threads that
//! run the engine's synchronous calls in parallel, and completion delivery either on the
//! workers (the default) or on the caller's event loop through an eventfd (a pipe where the
//! system has no eventfd, see [`notify`]).
//!
//! The engine does the ordering that matters for correctness (two writers never allocate one
//! cluster; L2 updates are serialised per piece of table), so workers need no extra locking:
//! requests on different clusters run in parallel, and reads of allocated data never wait for
//! an unrelated allocating write. The queue adds only the flush rule: a flush completes after
//! every write submitted before it.
//!
//! Every accepted request completes exactly once: the completion is an `Option` taken in one
//! place, a request dropped without completing completes with `ECANCELED`, and a panic in the
//! engine completes with `EIO`.

use crate::error::{Error, Result};
use crate::image::{Image, WriteFlags};
use std::collections::{BTreeSet, VecDeque};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

mod notify;
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
    /// Write zeroes.
    WriteZeroes {
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
    /// Worker threads (default: twice the CPUs, at least 2, at most 16; for an O_DIRECT image,
    /// see [`AioOptions::for_image`]).
    pub workers: usize,
    /// Requests queued or in flight at most (default 1024).
    pub queue_depth: usize,
    /// Where completions run.
    pub delivery: Delivery,
    /// When the queue is full: wait for room (true) or refuse the submit (false, the default).
    pub block_when_full: bool,
}

impl Default for AioOptions {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        AioOptions {
            workers: (cpus * 2).clamp(2, 16),
            queue_depth: 1024,
            delivery: Delivery::Workers,
            block_when_full: false,
        }
    }
}

impl AioOptions {
    /// The defaults for `img`. An O_DIRECT image gets eight workers per CPU (8 to 32): each
    /// request waits for the device in its worker, so the workers are how many requests the
    /// device sees at once. Page-cache I/O is CPU work, and more workers than that only
    /// contend.
    pub fn for_image(img: &Image) -> Self {
        let mut o = AioOptions::default();
        if img.is_direct() {
            let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
            o.workers = (cpus * 8).clamp(8, 32);
        }
        o
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

struct Request {
    seq: u64,
    tag: u64,
    op: Op,
    done: Option<Completion>,
}

impl Request {
    fn complete(&mut self, r: Result<()>, shared: &Shared) {
        if let Some(done) = self.done.take() {
            shared.deliver(done, r);
        }
    }
}

struct State {
    queue: VecDeque<Request>,
    /// Requests accepted and not yet completed (callback returned).
    outstanding: usize,
    /// Sequence numbers of writes accepted and not yet finished.
    writes: BTreeSet<u64>,
    /// Flushes waiting for earlier writes.
    parked_flushes: Vec<Request>,
    shutdown: bool,
    /// Workers waiting for work and submitters waiting for room: wake-ups (each a futex
    /// syscall) are sent only when someone sleeps.
    idle_workers: usize,
    waiting_submitters: usize,
}

struct Shared {
    img: Arc<Image>,
    opts: AioOptions,
    state: Mutex<State>,
    /// Signals workers (work queued) and submitters (room freed).
    work: Condvar,
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
    /// The queue this thread is a worker of (0: none).
    static WORKER_OF: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// Runs or queues a completion, then accounts for it.
    fn deliver(&self, done: Completion, r: Result<()>) {
        match self.opts.delivery {
            Delivery::Workers => {
                self.run_completion(done, r);
                self.finished_one();
            }
            Delivery::EventLoop => {
                lock(&self.ready).push_back((done, r));
                if let Some(n) = &self.notifier {
                    n.signal();
                }
            }
        }
    }

    /// Event-loop mode: answers a small read on the submitting thread when the engine can do
    /// it without waiting (cached L2 pieces, data in the page cache). The completion still
    /// goes through the ready list and runs in `poll`, never inside the submit; what is saved
    /// is the two cross-thread wake-ups of a worker round trip. Gives the op back otherwise.
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
        // A panicking callback must not take the worker (or the accounting) down with it.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| done(r)));
        IN_COMPLETION.with(|c| c.set(prev));
    }

    fn finished_one(&self) {
        let mut st = lock(&self.state);
        self.finished_one_locked(&mut st);
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
            Op::WriteZeroes { offset, len } => img.write_zeroes(*offset, *len),
            Op::Flush => img.flush(),
        }));
        r.unwrap_or_else(|p| {
            Err(Error::Failed(format!(
                "internal error (panic): {}",
                panic_text(&*p)
            )))
        })
    }

    fn worker(self: Arc<Self>) {
        WORKER_OF.with(|w| w.set(self.id));
        // What the previous request left to account for: its callback ran here (worker
        // delivery) and/or it was a write. Done under the lock taken for the next request, so a
        // request costs two lock round trips here, not four.
        let mut finished: Option<(bool, Option<u64>)> = None;
        loop {
            let mut req = {
                let mut st = lock(&self.state);
                if let Some((delivered, write)) = finished.take() {
                    if let Some(seq) = write {
                        self.write_done_locked(&mut st, seq);
                    }
                    if delivered {
                        self.finished_one_locked(&mut st);
                    }
                }
                loop {
                    if let Some(r) = st.queue.pop_front() {
                        break r;
                    }
                    if st.shutdown {
                        return;
                    }
                    st.idle_workers += 1;
                    st = self.work.wait(st).unwrap_or_else(PoisonError::into_inner);
                    st.idle_workers -= 1;
                }
            };
            let r = self.execute(&mut req);
            let write =
                matches!(req.op, Op::Write { .. } | Op::WriteZeroes { .. }).then_some(req.seq);
            let delivered = match (self.opts.delivery, req.done.take()) {
                (Delivery::Workers, Some(done)) => {
                    self.run_completion(done, r);
                    true
                }
                // Event loop: queued for poll, which accounts for it.
                (_, Some(done)) => {
                    self.deliver(done, r);
                    false
                }
                (_, None) => false,
            };
            finished = Some((delivered, write));
        }
    }

    /// Releases flushes that were waiting only for writes up to now.
    fn write_done_locked(&self, st: &mut State, seq: u64) {
        st.writes.remove(&seq);
        let oldest = st.writes.first().copied().unwrap_or(u64::MAX);
        let (ready, parked): (Vec<_>, Vec<_>) = std::mem::take(&mut st.parked_flushes)
            .into_iter()
            .partition(|f| f.seq < oldest);
        st.parked_flushes = parked;
        if !ready.is_empty() {
            st.queue.extend(ready);
            if st.idle_workers > 0 {
                self.work.notify_all();
            }
        }
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
    workers: Mutex<Vec<JoinHandle<()>>>,
    closed: AtomicBool,
}

impl AioQueue {
    /// Starts the workers for `img`.
    pub fn new(img: Arc<Image>, opts: AioOptions) -> Result<AioQueue> {
        if opts.workers == 0 || opts.queue_depth == 0 {
            return Err(Error::InvalidArgument {
                what: if opts.workers == 0 {
                    "workers"
                } else {
                    "queue_depth"
                },
                value: 0,
                reason: "must be at least 1".into(),
            });
        }
        let notifier = if opts.delivery == Delivery::EventLoop {
            Some(Notifier::new().map_err(|e| Error::io("creating the event-loop descriptor", e))?)
        } else {
            None
        };
        let shared = Arc::new(Shared {
            img,
            opts,
            state: Mutex::new(State {
                queue: VecDeque::new(),
                outstanding: 0,
                writes: BTreeSet::new(),
                parked_flushes: Vec::new(),
                shutdown: false,
                idle_workers: 0,
                waiting_submitters: 0,
            }),
            work: Condvar::new(),
            room: Condvar::new(),
            idle: Condvar::new(),
            next_seq: AtomicU64::new(1),
            ready: Mutex::new(VecDeque::new()),
            notifier,
            id: NEXT_QUEUE_ID.fetch_add(1, Ordering::Relaxed),
        });
        let mut workers = Vec::with_capacity(opts.workers);
        for i in 0..opts.workers {
            let s = shared.clone();
            let h = crate::thread::spawn(
                std::thread::Builder::new().name(format!("qed-aio-{i}")),
                move || s.worker(),
            )
            .map_err(|e| Error::io("starting worker thread", e))?;
            workers.push(h);
        }
        Ok(AioQueue {
            shared,
            workers: Mutex::new(workers),
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
        let sh = &*self.shared;
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
                    sh.deliver(done, r);
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
        let is_write = matches!(op, Op::Write { .. } | Op::WriteZeroes { .. });
        let is_flush = matches!(op, Op::Flush);
        let req = Request {
            seq,
            tag,
            op,
            done: Some(done),
        };
        if is_write {
            st.writes.insert(seq);
        }
        if is_flush && st.writes.first().is_some_and(|&w| w < seq) {
            st.parked_flushes.push(req);
        } else {
            // A worker submitting from its own callback onto an empty queue takes the request
            // itself as soon as the callback returns: waking another thread would only add a
            // context switch (the common case of a depth-1 request loop).
            let self_pickup = st.queue.is_empty() && WORKER_OF.with(|w| w.get()) == sh.id;
            st.queue.push_back(req);
            if st.idle_workers > 0 && !self_pickup {
                sh.work.notify_one();
            }
        }
        Ok(())
    }

    /// Cancels queued requests with `tag` that have not started; each completes with
    /// `ECANCELED` (through the normal delivery). Returns how many were cancelled.
    pub fn cancel(&self, tag: u64) -> usize {
        let sh = &*self.shared;
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
        for mut r in cancelled {
            let is_write = matches!(r.op, Op::Write { .. } | Op::WriteZeroes { .. });
            r.complete(Err(cancelled_error()), sh);
            if is_write {
                sh.write_done_locked(&mut lock(&sh.state), r.seq);
            }
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
            sh.finished_one();
        }
        Ok(n)
    }

    /// Waits until every accepted request has completed and its completion has returned. In
    /// event-loop delivery it runs the completions itself.
    pub fn drain(&self) -> Result<()> {
        if self.in_own_completion() {
            return Err(deadlock("drain"));
        }
        let sh = &*self.shared;
        loop {
            if sh.opts.delivery == Delivery::EventLoop {
                self.poll()?;
            }
            let st = lock(&sh.state);
            if st.outstanding == 0 {
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

    /// Drains, then stops the workers. Later submits are refused.
    pub fn shutdown(&self) -> Result<()> {
        if self.in_own_completion() {
            return Err(deadlock("shutdown"));
        }
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.drain()?;
        {
            let mut st = lock(&self.shared.state);
            st.shutdown = true;
            self.shared.work.notify_all();
            self.shared.room.notify_all();
        }
        for h in lock(&self.workers).drain(..) {
            let _ = h.join();
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
