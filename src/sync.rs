// SPDX-License-Identifier: MIT OR Apache-2.0
//! A reader-writer gate whose shared side can also be held by a [`Pin`]: a token that is
//! `Send` and outlives the call that took it, for I/O that an asynchronous engine finishes on
//! another thread after the submitting call has returned. The exclusive side waits for both
//! the readers and the pins.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

#[derive(Default)]
pub(crate) struct PinLock {
    lock: RwLock<()>,
    pins: AtomicUsize,
    drained: Mutex<()>,
    cv: Condvar,
}

/// Shared access held beyond a call; released when dropped, on any thread.
pub(crate) struct Pin {
    of: Arc<PinLock>,
}

impl PinLock {
    /// Shared access for the current call.
    pub(crate) fn read(&self) -> RwLockReadGuard<'_, ()> {
        self.lock.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Shared access for the current call, if no exclusive holder has or waits for it.
    pub(crate) fn try_read(&self) -> Option<RwLockReadGuard<'_, ()>> {
        match self.lock.try_read() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// Exclusive access: no reader and no pin.
    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, ()> {
        let g = self.lock.write().unwrap_or_else(PoisonError::into_inner);
        // New pins need the shared lock, so the count only falls from here.
        let mut d = self.drained.lock().unwrap_or_else(PoisonError::into_inner);
        while self.pins.load(Ordering::Acquire) != 0 {
            // The timeout only guards against a missed wake-up; pins are I/O in flight.
            d = self
                .cv
                .wait_timeout(d, Duration::from_millis(10))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        g
    }

    /// A pin, unless an exclusive holder has or waits for the lock.
    pub(crate) fn try_pin(self: &Arc<Self>) -> Option<Pin> {
        let _g = self.try_read()?;
        self.pins.fetch_add(1, Ordering::AcqRel);
        Some(Pin { of: self.clone() })
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        if self.of.pins.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Taking the mutex orders this wake-up after a waiter's check of the count.
            let _d = self
                .of
                .drained
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            self.of.cv.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exclusive_side_waits_for_pins_and_refuses_new_ones() {
        let l = Arc::new(PinLock::default());
        let p = l.try_pin().unwrap();
        let l2 = l.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let _w = l2.write();
            tx.send(()).unwrap();
        });
        // The writer cannot finish while the pin lives.
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        // A writer is waiting (holding the lock): no new pins.
        assert!(l.try_pin().is_none());
        drop(p);
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        t.join().unwrap();
        assert!(l.try_pin().is_some());
    }
}
