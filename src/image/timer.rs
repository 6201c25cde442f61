// SPDX-License-Identifier: MIT OR Apache-2.0
//! One process-wide timer thread for the delayed write-back of staged L2 entries and the
//! need-check idle timer, however many images are open. It holds only weak references: an image closed or dropped before its
//! write-back is due is never kept alive, and its entry just expires. The thread starts with
//! the first write-back due (every signal blocked, as all library threads) and then stays.

use super::lock;
use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex, OnceLock, PoisonError, Weak};
use std::time::Instant;

/// Something the timer runs when it is due.
pub(super) trait Fire: Send + Sync {
    /// Runs on the timer thread; other images' timers wait meanwhile.
    fn fire(self: std::sync::Arc<Self>);
}

#[derive(Default)]
struct Queue {
    /// Timers by due time (then by arrival, so equal times do not collide).
    due: BTreeMap<(Instant, u64), Weak<dyn Fire>>,
    arrivals: u64,
    started: bool,
}

struct Timer {
    queue: Mutex<Queue>,
    cv: Condvar,
}

static TIMER: OnceLock<Timer> = OnceLock::new();

/// Runs `f`'s [`Fire::fire`] at `at`, unless it is gone by then. False when the timer thread
/// cannot be started (staged entries then wait for the next flush, as with no delay).
pub(super) fn schedule(at: Instant, wb: Weak<dyn Fire>) -> bool {
    let t = TIMER.get_or_init(|| Timer {
        queue: Mutex::new(Queue::default()),
        cv: Condvar::new(),
    });
    let mut q = lock(&t.queue);
    if !q.started {
        let spawned = crate::thread::spawn(
            std::thread::Builder::new()
                .name("qed-writeback".into())
                .stack_size(256 << 10),
            move || run(t),
        );
        if spawned.is_err() {
            return false;
        }
        q.started = true;
    }
    q.arrivals += 1;
    let key = (at, q.arrivals);
    q.due.insert(key, wb);
    t.cv.notify_one();
    true
}

/// The timer thread: fires each timer when due, one at a time, holding no lock while it
/// runs (images schedule and close meanwhile).
fn run(t: &'static Timer) {
    loop {
        let mut q = lock(&t.queue);
        let wb = loop {
            let now = Instant::now();
            match q.due.first_key_value() {
                None => q = t.cv.wait(q).unwrap_or_else(PoisonError::into_inner),
                Some((&(at, _), _)) if at > now => {
                    q =
                        t.cv.wait_timeout(q, at - now)
                            .unwrap_or_else(PoisonError::into_inner)
                            .0;
                }
                Some(_) => break q.due.pop_first().map(|(_, wb)| wb),
            }
        };
        drop(q);
        if let Some(f) = wb.and_then(|w| w.upgrade()) {
            f.fire();
        }
    }
}
