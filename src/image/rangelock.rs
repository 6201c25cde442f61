// SPDX-License-Identifier: MIT OR Apache-2.0
//! Locks on ranges of guest clusters, held while those clusters are being allocated, so that two
//! writers never allocate the same cluster twice.

use std::sync::{Condvar, Mutex, PoisonError};

/// A set of locked `[start, end)` cluster ranges.
#[derive(Default)]
pub struct RangeLock {
    held: Mutex<Held>,
    released: Condvar,
}

/// Held ranges, and how many threads wait (a wake-up is a syscall: only sent to sleepers).
#[derive(Default)]
struct Held {
    ranges: Vec<(u64, u64)>,
    waiters: usize,
}

/// Releases its range when dropped.
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    range: (u64, u64),
}

impl RangeLock {
    /// Waits until no held range overlaps `[start, end)`, then holds it.
    pub fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        while held.ranges.iter().any(|&(s, e)| s < end && start < e) {
            held.waiters += 1;
            held = self
                .released
                .wait(held)
                .unwrap_or_else(PoisonError::into_inner);
            held.waiters -= 1;
        }
        held.ranges.push((start, end));
        RangeGuard {
            lock: self,
            range: (start, end),
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self
            .lock
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = held.ranges.iter().position(|&r| r == self.range) {
            held.ranges.swap_remove(i);
        }
        let wake = held.waiters > 0;
        drop(held);
        if wake {
            self.lock.released.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[test]
    fn overlapping_ranges_exclude_each_other() {
        let l = Arc::new(RangeLock::default());
        let inside = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let (l, inside) = (l.clone(), inside.clone());
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        let _g = l.lock(i, i + 4); // all overlap
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                        std::thread::yield_now();
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Disjoint ranges do not block each other.
        let _a = l.lock(0, 1);
        let _b = l.lock(1, 2);
    }
}
