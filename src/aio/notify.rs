// SPDX-License-Identifier: MIT OR Apache-2.0
//! The descriptor that tells an event loop completions are pending: an eventfd on Linux, a
//! non-blocking pipe elsewhere (its read end is what the caller polls). Both are level
//! triggered: readable from the first [`Notifier::signal`] until [`Notifier::clear`].

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

pub(crate) struct Notifier {
    /// The descriptor the caller polls (the eventfd, or the pipe's read end).
    read: OwnedFd,
    /// The pipe's write end; `None` for an eventfd, which is written through `read`.
    write: Option<OwnedFd>,
}

impl Notifier {
    /// An eventfd where the system has one, a pipe otherwise.
    pub(crate) fn new() -> io::Result<Notifier> {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            // SAFETY: plain syscall with constant flags.
            let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: fd is a fresh descriptor nothing else owns.
            let read = unsafe { OwnedFd::from_raw_fd(fd) };
            Ok(Notifier { read, write: None })
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        Notifier::pipe()
    }

    /// The pipe variant (built on Linux too, for its tests).
    #[cfg_attr(any(target_os = "linux", target_os = "android"), allow(dead_code))]
    pub(crate) fn pipe() -> io::Result<Notifier> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe writes two descriptors into the two-element array.
        if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both are fresh descriptors nothing else owns (closed on drop from here on).
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // pipe2 would set the flags atomically but macOS lacks it; a fork between the two
        // calls can only leak the pipe into a child, not break it.
        for fd in [&read, &write] {
            // SAFETY: fcntl on a descriptor we own, with integer arguments only.
            let ok = unsafe {
                libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) == 0
                    && libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) == 0
            };
            if !ok {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(Notifier {
            read,
            write: Some(write),
        })
    }

    /// The descriptor to poll for readability.
    pub(crate) fn fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    /// Makes the descriptor readable. A full pipe (EAGAIN) is already readable.
    pub(crate) fn signal(&self) {
        match &self.write {
            None => {
                let one: u64 = 1;
                // SAFETY: writing 8 bytes from a live u64 to our eventfd is its protocol.
                let _ =
                    unsafe { libc::write(self.read.as_raw_fd(), (&one as *const u64).cast(), 8) };
            }
            Some(w) => {
                let b = 1u8;
                // SAFETY: writing one byte from a live u8 to our pipe.
                let _ = unsafe { libc::write(w.as_raw_fd(), (&b as *const u8).cast(), 1) };
            }
        }
    }

    /// Makes the descriptor not readable until the next signal.
    pub(crate) fn clear(&self) {
        let mut buf = [0u8; 64];
        loop {
            // SAFETY: reading into a live buffer of buf.len() bytes from our non-blocking fd;
            // an eventfd needs 8 of them and resets in one read.
            let n =
                unsafe { libc::read(self.read.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            // An eventfd empties in one read; a pipe until EAGAIN (or a short read).
            if self.write.is_none() || n < buf.len() as isize {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(fd: RawFd) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one live pollfd, without waiting.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        assert!(n >= 0, "poll: {}", io::Error::last_os_error());
        n == 1 && p.revents & libc::POLLIN != 0
    }

    fn check(n: Notifier) {
        assert!(!readable(n.fd()));
        n.signal();
        n.signal();
        assert!(readable(n.fd()));
        n.clear();
        assert!(!readable(n.fd()));
        // More signals than a pipe holds: the writes that find it full are dropped.
        for _ in 0..100_000 {
            n.signal();
        }
        assert!(readable(n.fd()));
        n.clear();
        assert!(!readable(n.fd()));
    }

    #[test]
    fn default_notifier_is_level_triggered() {
        check(Notifier::new().unwrap());
    }

    #[test]
    fn pipe_fallback_is_level_triggered() {
        check(Notifier::pipe().unwrap());
    }
}
