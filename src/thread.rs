// SPDX-License-Identifier: MIT OR Apache-2.0
//! Starting library threads. Every thread libqed starts blocks all signals, so a signal meant
//! for the application (SIGINT, SIGCHLD, a timer) is never delivered to a thread that would not
//! handle it; the header promises this.

use std::io;
use std::thread::{Builder, JoinHandle};

/// Spawns a thread with every signal blocked. The mask is set in the spawning thread around
/// the spawn, so the new thread starts with it and no signal can slip in before it is set.
pub(crate) fn spawn<F, T>(builder: Builder, f: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    // SAFETY: sigset_t is plain data; sigfillset initialises it and pthread_sigmask only reads
    // `all` and writes `old`, both live locals.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let r = builder.spawn(f);
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        r
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn library_threads_block_every_signal() {
        let h = super::spawn(std::thread::Builder::new(), || {
            // SAFETY: as in spawn; reads the calling thread's mask.
            unsafe {
                let mut cur: libc::sigset_t = std::mem::zeroed();
                libc::pthread_sigmask(libc::SIG_SETMASK, std::ptr::null(), &mut cur);
                (
                    libc::sigismember(&cur, libc::SIGINT),
                    libc::sigismember(&cur, libc::SIGTERM),
                    libc::sigismember(&cur, libc::SIGUSR1),
                )
            }
        })
        .unwrap();
        assert_eq!(h.join().unwrap(), (1, 1, 1));
        // The spawning thread's own mask is left as it was.
        // SAFETY: as above.
        let here = unsafe {
            let mut cur: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_SETMASK, std::ptr::null(), &mut cur);
            libc::sigismember(&cur, libc::SIGUSR1)
        };
        assert_eq!(here, 0);
    }
}
