// SPDX-License-Identifier: MIT OR Apache-2.0
//! Progress reports and cancellation for long operations (check and repair, commit, streaming,
//! convert): one handle the caller keeps, clones across threads and may cancel from any of them.

use crate::error::{Error, Result};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

type Callback = dyn Fn(u64, u64) -> ControlFlow<()> + Send + Sync;

/// How far a long operation got, and a way to stop it.
///
/// The operation calls the callback (if any) with `(done, total)` in units of its own choosing
/// (bytes for copies, clusters for checks), at least once at the start and once at the end;
/// `done` never decreases and never exceeds `total`. Returning [`ControlFlow::Break`] from the
/// callback, or calling [`Progress::cancel`] from any thread, stops the operation at its next
/// safe point with [`Error::Cancelled`]; everything it did up to there stays consistent.
///
/// ```
/// use std::ops::ControlFlow;
/// let p = qed::image::Progress::with_callback(|done, total| {
///     eprintln!("{done}/{total}");
///     ControlFlow::Continue(())
/// });
/// let q = p.clone(); // e.g. for another thread that may call q.cancel()
/// assert!(!q.is_cancelled());
/// ```
#[derive(Clone, Default)]
pub struct Progress {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    cancelled: AtomicBool,
    callback: Option<Box<Callback>>,
    done: AtomicU64,
    total: AtomicU64,
}

impl Progress {
    /// A handle without a callback: cancellable, and readable with [`Progress::get`].
    pub fn new() -> Progress {
        Progress::default()
    }

    /// A handle that reports to `f(done, total)`; `f` runs on the thread doing the operation.
    pub fn with_callback(
        f: impl Fn(u64, u64) -> ControlFlow<()> + Send + Sync + 'static,
    ) -> Progress {
        Progress {
            inner: Arc::new(Inner {
                callback: Some(Box::new(f)),
                ..Inner::default()
            }),
        }
    }

    /// Asks the operation to stop at its next safe point. Safe to call from any thread, any
    /// number of times, before or during the operation.
    pub fn cancel(&self) {
        self.inner.cancelled.store(true, Ordering::Release);
    }

    /// Whether [`Progress::cancel`] was called or the callback asked to stop.
    pub fn is_cancelled(&self) -> bool {
        self.inner.cancelled.load(Ordering::Acquire)
    }

    /// The last `(done, total)` reported.
    pub fn get(&self) -> (u64, u64) {
        (
            self.inner.done.load(Ordering::Acquire),
            self.inner.total.load(Ordering::Acquire),
        )
    }

    /// Records `(done, total)`, calls the callback, and returns [`Error::Cancelled`] naming
    /// `what` if the operation should stop now.
    pub(crate) fn update(&self, what: &'static str, done: u64, total: u64) -> Result<()> {
        let done = done.min(total);
        self.inner.total.store(total, Ordering::Release);
        self.inner.done.fetch_max(done, Ordering::AcqRel);
        if let Some(cb) = &self.inner.callback {
            let done = self.inner.done.load(Ordering::Acquire);
            if cb(done, total).is_break() {
                self.cancel();
            }
        }
        self.checkpoint(what)
    }

    /// Returns [`Error::Cancelled`] naming `what` if the operation was cancelled.
    pub(crate) fn checkpoint(&self, what: &'static str) -> Result<()> {
        if self.is_cancelled() {
            Err(Error::Cancelled { what })
        } else {
            Ok(())
        }
    }
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (done, total) = self.get();
        f.debug_struct("Progress")
            .field("done", &done)
            .field("total", &total)
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn reports_and_cancels() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let p = Progress::with_callback(move |d, t| {
            s.lock().unwrap().push((d, t));
            if d >= 3 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        assert!(p.update("x", 0, 5).is_ok());
        // done never goes back
        assert!(p.update("x", 2, 5).is_ok());
        assert!(p.update("x", 1, 5).is_ok());
        assert!(matches!(
            p.update("x", 3, 5),
            Err(Error::Cancelled { what: "x" })
        ));
        assert!(p.is_cancelled());
        assert_eq!(*seen.lock().unwrap(), vec![(0, 5), (2, 5), (2, 5), (3, 5)]);
        assert_eq!(p.get(), (3, 5));
    }

    #[test]
    fn cancel_from_another_thread() {
        let p = Progress::new();
        let q = p.clone();
        std::thread::spawn(move || q.cancel()).join().unwrap();
        assert!(p.checkpoint("y").is_err());
    }
}
