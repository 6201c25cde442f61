// SPDX-License-Identifier: MIT OR Apache-2.0
//! The I/O engine: one per process by default, shared by every image's queue. It owns a
//! bounded pool of threads that run the engine's synchronous calls, taking one request per
//! image in turn so that a busy image cannot starve another, and (on Linux, where the kernel
//! allows it) an io_uring ring whose one thread issues reads and in-place writes straight to
//! the image files. An open image with no requests costs no thread; threads start as requests
//! need them, up to the bound, whatever the number of images.

use super::Shared;
use crate::error::{Error, Result};
use crate::log::qed_log;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};

/// Which mechanism carries the data I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum IoBackend {
    /// io_uring where the kernel allows it, the thread pool otherwise (the default). The
    /// environment variable `QED_IO_ENGINE` (`threads`, `io_uring`) chooses for the process's
    /// default engine.
    #[default]
    Auto,
    /// The thread pool only: each request runs on a pool thread with `preadv`/`pwritev`.
    Threads,
    /// io_uring for reads and in-place writes (Linux 5.6 or later; refused where it is not
    /// available, for example under a seccomp filter or with `kernel.io_uring_disabled`).
    IoUring,
}

impl IoBackend {
    /// The name `QED_IO_ENGINE` uses.
    pub fn name(self) -> &'static str {
        match self {
            IoBackend::Auto => "auto",
            IoBackend::Threads => "threads",
            IoBackend::IoUring => "io_uring",
        }
    }

    fn from_env() -> Result<IoBackend> {
        match std::env::var("QED_IO_ENGINE") {
            Err(_) => Ok(IoBackend::Auto),
            Ok(v) => match v.as_str() {
                "" | "auto" => Ok(IoBackend::Auto),
                "threads" => Ok(IoBackend::Threads),
                "io_uring" => Ok(IoBackend::IoUring),
                other => Err(Error::InvalidArgument {
                    what: "QED_IO_ENGINE",
                    value: 0,
                    reason: format!("{other:?} is not an I/O engine (auto, threads, io_uring)"),
                }),
            },
        }
    }
}

/// Most pool threads an engine may have.
pub const MAX_THREADS: usize = 1024;

/// How to build an [`Engine`].
#[derive(Clone, Copy, Debug, Default)]
#[non_exhaustive]
pub struct EngineOptions {
    /// Pool threads at most (0: twice the CPUs plus four, at most 64). Refused above
    /// [`MAX_THREADS`].
    pub threads: usize,
    /// The data I/O mechanism.
    pub backend: IoBackend,
}

impl EngineOptions {
    /// Options with `threads` pool threads at most and the given backend.
    pub fn new(threads: usize, backend: IoBackend) -> Self {
        EngineOptions { threads, backend }
    }
}

/// What an engine has done (see [`Engine::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EngineStats {
    /// Requests the io_uring ring did itself.
    pub ring_requests: u64,
    /// Requests pool threads ran (everything the ring does not take or cannot plan).
    pub pool_requests: u64,
    /// Pool threads running now.
    pub threads: usize,
}

/// Whether valgrind runs this process (its preloaded core library is in LD_PRELOAD).
#[cfg(qed_io_uring)]
fn under_valgrind() -> bool {
    std::env::var_os("LD_PRELOAD").is_some_and(|v| v.to_string_lossy().contains("vgpreload"))
}

fn default_threads() -> usize {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    (cpus * 2 + 4).min(64)
}

struct Sched {
    /// Images with queued requests, each once, in turn.
    runq: VecDeque<Arc<Shared>>,
    threads: usize,
    idle: usize,
    shutdown: bool,
}

pub(super) struct Inner {
    pub(super) id: u64,
    max_threads: usize,
    backend: IoBackend,
    sched: Mutex<Sched>,
    work: Condvar,
    /// Requests done by the ring itself and by pool threads (see [`EngineStats`]).
    pub(super) ring_requests: AtomicU64,
    pub(super) pool_requests: AtomicU64,
    #[cfg(qed_io_uring)]
    pub(super) ring: Option<super::uring::Ring>,
}

/// A shared I/O engine (cheap to clone: clones are handles to one engine). Dropping the last
/// handle, once no queue uses it, stops its threads.
#[derive(Clone)]
pub struct Engine {
    handle: Arc<Handle>,
}

struct Handle {
    inner: Arc<Inner>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.inner.stop();
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("backend", &self.backend())
            .field("max_threads", &self.max_threads())
            .finish()
    }
}

static NEXT_ENGINE_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The engine whose pool this thread belongs to (0: none).
    static POOL_OF: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Engine {
    /// Starts an engine. Its threads start as requests need them.
    ///
    /// # Errors
    /// `InvalidArgument` for more than [`MAX_THREADS`] threads or a bad `QED_IO_ENGINE`;
    /// `Io` when [`IoBackend::IoUring`] was asked for and the kernel refuses io_uring.
    pub fn new(opts: EngineOptions) -> Result<Engine> {
        if opts.threads > MAX_THREADS {
            return Err(Error::InvalidArgument {
                what: "threads",
                value: opts.threads as u64,
                reason: format!("an engine has at most {MAX_THREADS} threads"),
            });
        }
        let max_threads = if opts.threads == 0 {
            default_threads()
        } else {
            opts.threads
        };
        let id = NEXT_ENGINE_ID.fetch_add(1, Ordering::Relaxed);
        #[cfg(qed_io_uring)]
        let (ring, backend) = match opts.backend {
            IoBackend::Threads => (None, IoBackend::Threads),
            IoBackend::IoUring => (Some(super::uring::Ring::new(id)?), IoBackend::IoUring),
            // Valgrind cannot follow io_uring: a thread waiting in io_uring_enter holds its
            // lock, and the other threads never run.
            IoBackend::Auto if under_valgrind() => {
                qed_log!(
                    Info,
                    "running under valgrind: using the thread pool, not io_uring"
                );
                (None, IoBackend::Threads)
            }
            IoBackend::Auto => match super::uring::Ring::new(id) {
                Ok(r) => (Some(r), IoBackend::IoUring),
                Err(e) => {
                    qed_log!(Info, "io_uring unavailable ({e}): using the thread pool");
                    (None, IoBackend::Threads)
                }
            },
        };
        #[cfg(not(qed_io_uring))]
        let backend = match opts.backend {
            IoBackend::IoUring => {
                return Err(Error::Unsupported {
                    field: "backend",
                    value: 0,
                    reason: "this build has no io_uring engine (Linux on x86_64, aarch64, \
                             riscv64, loongarch64 or powerpc64 only)"
                        .into(),
                })
            }
            _ => IoBackend::Threads,
        };
        qed_log!(
            Debug,
            "I/O engine {id}: {} with up to {max_threads} pool threads",
            backend.name()
        );
        let inner = Arc::new(Inner {
            id,
            max_threads,
            backend,
            sched: Mutex::new(Sched {
                runq: VecDeque::new(),
                threads: 0,
                idle: 0,
                shutdown: false,
            }),
            work: Condvar::new(),
            ring_requests: AtomicU64::new(0),
            pool_requests: AtomicU64::new(0),
            #[cfg(qed_io_uring)]
            ring,
        });
        #[cfg(qed_io_uring)]
        if let Some(r) = &inner.ring {
            r.start(&inner)?;
        }
        Ok(Engine {
            handle: Arc::new(Handle { inner }),
        })
    }

    /// The process's engine, started on first use with the defaults, or what the environment
    /// says: `QED_IO_ENGINE` (`threads`, `io_uring`) and `QED_IO_THREADS` (pool threads at
    /// most).
    ///
    /// # Errors
    /// As [`Engine::new`]; a failure is not remembered, so a later call tries again.
    pub fn global() -> Result<Engine> {
        static GLOBAL: OnceLock<Engine> = OnceLock::new();
        static STARTING: Mutex<()> = Mutex::new(());
        if let Some(e) = GLOBAL.get() {
            return Ok(e.clone());
        }
        let _g = lock(&STARTING);
        if let Some(e) = GLOBAL.get() {
            return Ok(e.clone());
        }
        let threads = match std::env::var("QED_IO_THREADS") {
            Err(_) => 0,
            Ok(v) => v.parse::<usize>().map_err(|_| Error::InvalidArgument {
                what: "QED_IO_THREADS",
                value: 0,
                reason: format!("{v:?} is not a thread count"),
            })?,
        };
        let e = Engine::new(EngineOptions::new(threads, IoBackend::from_env()?))?;
        Ok(GLOBAL.get_or_init(|| e).clone())
    }

    /// The mechanism in use: [`IoBackend::IoUring`] or [`IoBackend::Threads`].
    pub fn backend(&self) -> IoBackend {
        self.handle.inner.backend
    }

    /// Pool threads at most.
    pub fn max_threads(&self) -> usize {
        self.handle.inner.max_threads
    }

    /// Pool threads running now.
    pub fn threads(&self) -> usize {
        lock(&self.handle.inner.sched).threads
    }

    /// Counters since the engine started.
    pub fn stats(&self) -> EngineStats {
        let i = &self.handle.inner;
        EngineStats {
            ring_requests: i.ring_requests.load(Ordering::Relaxed),
            pool_requests: i.pool_requests.load(Ordering::Relaxed),
            threads: self.threads(),
        }
    }

    pub(super) fn inner(&self) -> &Arc<Inner> {
        &self.handle.inner
    }
}

impl Inner {
    /// Puts an image with queued requests in line for a pool thread; starts a thread when
    /// none is idle and the bound allows.
    pub(super) fn schedule(self: &Arc<Self>, sh: Arc<Shared>) {
        let spawn = {
            let mut s = lock(&self.sched);
            let was_empty = s.runq.is_empty();
            s.runq.push_back(sh);
            if s.idle > 0 {
                // A pool thread submitting from a completion onto an empty line takes it
                // itself when the callback returns: waking another would only add a switch.
                if !(was_empty && POOL_OF.with(|p| p.get()) == self.id) {
                    self.work.notify_one();
                }
                false
            } else if s.threads < self.max_threads && !s.shutdown {
                s.threads += 1;
                true
            } else {
                false
            }
        };
        if spawn {
            let me = self.clone();
            let n = lock(&self.sched).threads;
            let r = crate::thread::spawn(
                std::thread::Builder::new().name(format!("qed-io-{n}")),
                move || me.worker(),
            );
            if let Err(e) = r {
                let mut s = lock(&self.sched);
                s.threads -= 1;
                // With no thread at all nobody would ever run the line: say so loudly; the
                // next submit tries again.
                qed_log!(
                    Error,
                    "cannot start an I/O thread ({e}); {} threads serve the engine",
                    s.threads
                );
            }
        }
    }

    fn worker(self: Arc<Self>) {
        POOL_OF.with(|p| p.set(self.id));
        loop {
            let sh = {
                let mut s = lock(&self.sched);
                loop {
                    if let Some(sh) = s.runq.pop_front() {
                        break sh;
                    }
                    if s.shutdown {
                        s.threads -= 1;
                        return;
                    }
                    s.idle += 1;
                    s = self.work.wait(s).unwrap_or_else(PoisonError::into_inner);
                    s.idle -= 1;
                }
            };
            sh.run_one();
        }
    }

    fn stop(&self) {
        let mut s = lock(&self.sched);
        s.shutdown = true;
        self.work.notify_all();
        drop(s);
        #[cfg(qed_io_uring)]
        if let Some(r) = &self.ring {
            r.stop();
        }
    }
}
