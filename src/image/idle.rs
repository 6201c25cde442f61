// SPDX-License-Identifier: MIT OR Apache-2.0
//! The need-check idle timer: an image that has had no metadata update for a while (5 s by
//! default, as QEMU) writes everything back and clears its need-check bit, so a host that dies
//! while the guest idles leaves a clean image that needs no repair at the next open. The same
//! settling runs at close, on drain ([`super::Image::settle`]) and here from the process-wide
//! timer, which holds this part of the image only weakly.

use super::timer::{self, Fire};
use super::writeback::WriteBack;
use super::{lock, HeaderState};
use crate::error::{IoContext, Result};
use crate::format::FEATURE_NEED_CHECK;
use crate::log::qed_log;
use crate::storage::Storage;
use crate::sync::PinLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The parts of an image the settling needs, shared with the image (which owns them).
pub(super) struct Idle {
    pub(super) delay: Option<Duration>,
    pub(super) gate: Arc<PinLock>,
    pub(super) storage: Arc<dyn Storage>,
    pub(super) wb: Arc<WriteBack>,
    pub(super) hs: Arc<Mutex<HeaderState>>,
    /// The need-check bit is set in the file by this handle.
    pub(super) dirty: AtomicBool,
    pub(super) dirty_lock: Mutex<()>,
    /// The bit must stay set: a check of this session left something to repair, or the image
    /// was opened without the repair its set bit asked for.
    pub(super) recheck: AtomicBool,
    pub(super) closed: Arc<AtomicBool>,
    pub(super) alloc: Arc<Mutex<u64>>,
    pub(super) extended_to: Arc<AtomicU64>,
    pub(super) label: String,
    /// When the last metadata update began (nanoseconds since [`epoch`]).
    last_update: AtomicU64,
    /// A timer is scheduled (set by the update that arms it, cleared by the timer).
    armed: AtomicBool,
}

/// A process-wide origin for `last_update` (an `Instant` does not fit an atomic).
fn epoch() -> Instant {
    static E: OnceLock<Instant> = OnceLock::new();
    *E.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

impl Idle {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        delay: Option<Duration>,
        gate: Arc<PinLock>,
        storage: Arc<dyn Storage>,
        wb: Arc<WriteBack>,
        hs: Arc<Mutex<HeaderState>>,
        recheck: bool,
        closed: Arc<AtomicBool>,
        alloc: Arc<Mutex<u64>>,
        extended_to: Arc<AtomicU64>,
        label: String,
    ) -> Idle {
        Idle {
            delay: delay.filter(|d| !d.is_zero()),
            gate,
            storage,
            wb,
            hs,
            dirty: AtomicBool::new(false),
            dirty_lock: Mutex::new(()),
            recheck: AtomicBool::new(recheck),
            closed,
            alloc,
            extended_to,
            label,
            last_update: AtomicU64::new(0),
            armed: AtomicBool::new(false),
        }
    }

    /// Notes a metadata update (the caller holds the gate shared) and arms the timer if it is
    /// not armed. Re-arming is lazy: the timer, when it fires early, waits out the rest. On
    /// every allocation, so the armed case is one store and one load, no lock.
    pub(super) fn touched(self: &Arc<Self>) {
        let Some(delay) = self.delay else { return };
        self.last_update.store(now_ns(), Ordering::Release);
        if self.armed.load(Ordering::Acquire) || self.armed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.schedule(delay);
    }

    /// Puts this timer on the process-wide timer thread `after` from now; the caller set
    /// `armed`, which is cleared again when the timer cannot be scheduled.
    fn schedule(self: &Arc<Self>, after: Duration) {
        let weak = Arc::downgrade(&(self.clone() as Arc<dyn Fire>));
        let ok = Instant::now()
            .checked_add(after)
            .is_some_and(|at| timer::schedule(at, weak));
        if !ok {
            self.armed.store(false, Ordering::Release);
        }
    }

    /// Cuts the allocator's stretch past the last allocated cluster (see
    /// `Image::square_file_length`).
    pub(super) fn square_file_length(&self) -> Result<()> {
        let next = lock(&self.alloc);
        let len = self.storage.len().ctx(|| "reading image length".into())?;
        if len > *next {
            self.storage
                .set_len(*next)
                .ctx(|| format!("setting image length to {:#x}", *next))?;
            self.extended_to.store(*next, Ordering::Release);
        }
        Ok(())
    }

    /// Writes everything back and clears the need-check bit, leaving a file that `qemu-img
    /// check` finds clean; the caller holds the gate exclusively, so no metadata update is in
    /// flight and the next one sets the bit again first. Returns whether the bit was cleared.
    pub(super) fn settle_locked(&self) -> Result<bool> {
        if self.wb.is_failed() {
            // Nothing more is written: the bit stays and the next read-write open repairs.
            return Err(self.wb.failed_error());
        }
        self.wb.writeback()?;
        if !self.dirty.load(Ordering::Acquire) || self.recheck.load(Ordering::Acquire) {
            return Ok(false);
        }
        // A crash after the bit is cleared must not leave the stretch as leaked clusters.
        self.square_file_length()?;
        self.wb.sync()?;
        let _d = lock(&self.dirty_lock);
        let mut hs = lock(&self.hs);
        let mut h = hs.header.clone();
        h.features &= !FEATURE_NEED_CHECK;
        qed_log!(Debug, "{}: clearing the need-check bit", self.label);
        self.storage
            .write_at(&h.to_bytes(), 0)
            .ctx(|| "writing header".into())?;
        self.wb.meta_changed();
        self.wb.sync()?;
        hs.header = h;
        self.dirty.store(false, Ordering::Release);
        Ok(true)
    }

    /// Whether the timer is armed and the bit still set by this handle.
    pub(super) fn pending(&self) -> bool {
        self.armed.load(Ordering::Acquire) && self.dirty.load(Ordering::Acquire)
    }

    /// Settles now unless the handle is closed (close settles itself).
    pub(super) fn settle(&self) -> Result<bool> {
        let _g = self.gate.write();
        // Closed (close settles itself) or reopened read-only (which settled) meanwhile.
        if self.closed.load(Ordering::Acquire) || !self.dirty.load(Ordering::Acquire) {
            return Ok(false);
        }
        self.settle_locked()
    }
}

impl Fire for Idle {
    fn fire(self: Arc<Self>) {
        let Some(delay) = self.delay else { return };
        let since =
            Duration::from_nanos(now_ns().saturating_sub(self.last_update.load(Ordering::Acquire)));
        if since < delay {
            // An update came after the timer was armed: wait out the rest of its delay (the
            // timer stays armed).
            self.schedule(delay - since);
            return;
        }
        // An update from here on arms a new timer; one just before was seen by the settle
        // below, which waits for it on the gate.
        self.armed.store(false, Ordering::Release);
        if !self.dirty.load(Ordering::Acquire) {
            return;
        }
        match self.settle() {
            Ok(true) => qed_log!(Info, "{}: idle: need-check bit cleared", self.label),
            Ok(false) => {}
            // The handle has failed (requests report it) or the bit simply stays set.
            Err(e) => qed_log!(Warn, "{}: idle: need-check bit left set: {e}", self.label),
        }
    }
}
