// SPDX-License-Identifier: MIT OR Apache-2.0
//! What stands between the engine's memory and the durable file: staged L2 entries and their
//! write-back, flush combining, the background write-back timer, and the failed state.
//!
//! Failure policy (the fsync-after-error trap): once a storage flush or a metadata write fails,
//! the kernel may already have dropped the dirty pages a later flush would have written, so a
//! later successful flush proves nothing. The handle therefore enters a failed state: every
//! later request returns an error naming the first failure, nothing more is written (staged
//! entries are neither written nor reported durable), close leaves the need-check bit set, and
//! the next read-write open repairs the image. QEMU's file driver and PostgreSQL treat a failed
//! fsync the same way.
//!
//! Kept apart from the image so that the process-wide timer ([`super::timer`]) can refer to it.

use super::l2cache::{Chunk, ChunkKey, CHUNK_BYTES};
use super::stats::{add, Counters};
use super::{lock, wlock};
use crate::error::{Error, Result};
use crate::log::qed_log;
use crate::storage::Storage;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

/// Flush combining: a caller needs a flush that starts after it asked.
#[derive(Default)]
struct FlushState {
    started: u64,
    completed: u64,
    running: bool,
}

#[derive(Default)]
struct Backlog {
    next: u64,
    writing: BTreeSet<u64>,
}

#[derive(Default)]
struct TimerState {
    /// A write-back is scheduled on the process-wide timer.
    armed: bool,
    stop: bool,
}

pub(super) struct WriteBack {
    storage: Arc<dyn Storage>,
    /// The image file's name, for the failed state's message.
    label: Option<String>,
    failed: Mutex<Option<String>>,
    is_failed: AtomicBool,
    /// Pieces of L2 table whose staged entries the next write-back writes (holding them keeps
    /// them in the cache).
    list: Mutex<HashMap<ChunkKey, Arc<Chunk>>>,
    /// Write-backs whose snapshot is taken and whose pieces are not all written yet, by
    /// snapshot number: a flush must not sync before the entries an earlier write-back took
    /// from the list are written, or it would return without them.
    backlog: Mutex<Backlog>,
    written: Condvar,
    /// Shared by writers staging entries (without a backing file: until their pieces are
    /// written through), exclusive while a write-back snapshots them, so no flush syncs while
    /// an entry that other requests may already rely on is neither written nor snapshotted.
    pub(super) staging: RwLock<()>,
    /// Bumped by every change of the metadata (before a new entry becomes visible, after a
    /// table or header write completes): mappings are durable when no change is newer than
    /// `durable_gen`.
    meta_gen: AtomicU64,
    /// The `meta_gen` a write-back read at its snapshot, once its final sync completed.
    durable_gen: AtomicU64,
    flusher: Mutex<FlushState>,
    flushed: Condvar,
    /// Staged entries are written back at most this long after they were staged (`None`: only
    /// at flush and close).
    delay: Option<Duration>,
    timer: Mutex<TimerState>,
    stats: Arc<Counters>,
}

impl WriteBack {
    pub(super) fn new(
        storage: Arc<dyn Storage>,
        delay: Option<Duration>,
        label: Option<String>,
        stats: Arc<Counters>,
    ) -> WriteBack {
        WriteBack {
            storage,
            label,
            failed: Mutex::new(None),
            is_failed: AtomicBool::new(false),
            list: Mutex::new(HashMap::new()),
            backlog: Mutex::new(Backlog::default()),
            written: Condvar::new(),
            staging: RwLock::new(()),
            // Whatever the file held at open may not be durable yet (another process, a killed
            // one): nothing counts as durable before the first write-back.
            meta_gen: AtomicU64::new(1),
            durable_gen: AtomicU64::new(0),
            flusher: Mutex::new(FlushState::default()),
            flushed: Condvar::new(),
            delay,
            timer: Mutex::new(TimerState::default()),
            stats,
        }
    }

    /// Records a failure after which the handle cannot promise durability; returns `e`.
    pub(super) fn fail(&self, e: Error) -> Error {
        let mut f = lock(&self.failed);
        if f.is_none() {
            *f = Some(match &self.label {
                Some(l) => format!("{l}: {e}"),
                None => e.to_string(),
            });
            qed_log!(
                Error,
                "{}: {e}: the handle has failed and refuses further requests until reopened",
                self.name()
            );
        }
        self.is_failed.store(true, Ordering::Release);
        e
    }

    /// The image's name for reports.
    fn name(&self) -> &str {
        self.label.as_deref().unwrap_or("<storage>")
    }

    pub(super) fn is_failed(&self) -> bool {
        self.is_failed.load(Ordering::Acquire)
    }

    /// The error every request gets once the handle has failed.
    pub(super) fn failed_error(&self) -> Error {
        let why = lock(&self.failed).clone().unwrap_or_default();
        Error::Failed(format!(
            "{why}; the image must be closed and reopened (a read-write open repairs it)"
        ))
    }

    fn check(&self) -> Result<()> {
        if self.is_failed() {
            return Err(self.failed_error());
        }
        Ok(())
    }

    /// Queues `chunk` for the next write-back; the caller holds `staging` shared. Starts the
    /// timer when this is the first piece staged since the last write-back.
    pub(super) fn queue(self: &Arc<Self>, key: ChunkKey, chunk: &Arc<Chunk>) -> usize {
        let mut list = lock(&self.list);
        let first = list.is_empty();
        list.entry(key).or_insert_with(|| chunk.clone());
        let n = list.len();
        drop(list);
        if first {
            self.arm_timer();
        }
        n
    }

    /// Writes staged L2 entries back, crash-safely: the snapshot of the staged entries is taken
    /// first (staging waits only for that), then the data they point to is flushed, then the
    /// table pieces are written and flushed, so no entry reaches the disk before its data. A
    /// failure fails the handle: what was not written is never written nor reported durable.
    ///
    /// No lock is held across a storage flush: concurrent write-backs (flush requests, the
    /// timer, close) share flushes through [`WriteBack::sync`]. Each waits only until the
    /// write-backs that took their snapshots before it have written their pieces.
    pub(super) fn writeback(&self) -> Result<()> {
        self.check()?;
        // Each piece stays pinned (its `Arc` held) until it is written: an unpinned piece could
        // be evicted meanwhile and reloaded from the disk without its new entries.
        type Snapshot = Vec<(ChunkKey, Arc<Chunk>, u64, Vec<u8>)>;
        let (id, gen, snapshot): (u64, u64, Snapshot) = {
            let _s = wlock(&self.staging);
            let gen = self.meta_gen.load(Ordering::SeqCst);
            let list = std::mem::take(&mut *lock(&self.list));
            let snapshot: Snapshot = list
                .into_iter()
                .filter_map(|(k, c)| c.take_dirty().map(|(seq, bytes)| (k, c, seq, bytes)))
                .collect();
            let mut b = lock(&self.backlog);
            b.next += 1;
            let id = b.next;
            if !snapshot.is_empty() {
                b.writing.insert(id);
            }
            (id, gen, snapshot)
        };
        if !snapshot.is_empty() {
            qed_log!(
                Debug,
                "{}: writing back staged entries of {} pieces of L2 table",
                self.name(),
                snapshot.len()
            );
            let r = self.sync().and_then(|()| {
                snapshot.iter().try_for_each(|(key, chunk, seq, bytes)| {
                    self.write_piece(*key, chunk, *seq, bytes)
                })
            });
            lock(&self.backlog).writing.remove(&id);
            self.written.notify_all();
            r?;
        }
        {
            let mut b = lock(&self.backlog);
            while b.writing.range(..id).next().is_some() {
                // An earlier write-back that fails fails the handle and wakes us.
                self.check()?;
                b = self.written.wait(b).unwrap_or_else(PoisonError::into_inner);
            }
        }
        self.sync()?;
        self.durable_gen.fetch_max(gen, Ordering::SeqCst);
        Ok(())
    }

    /// Writes the staged entries of one piece of table now (images whose entries may reach the
    /// disk before their data: no backing file); the caller holds `staging` shared from staging
    /// them until this returns. Concurrent writers of one piece share writes:
    /// the piece's own lock orders them, and a writer whose entries an earlier write already
    /// carried finds nothing dirty.
    pub(super) fn write_through(&self, key: ChunkKey, chunk: &Chunk) -> Result<()> {
        self.check()?;
        match chunk.take_dirty() {
            Some((seq, bytes)) => self.write_piece(key, chunk, seq, &bytes),
            None => Ok(()),
        }
    }

    /// Writes snapshot `seq` of a piece, unless a newer snapshot of it is already written.
    fn write_piece(
        &self,
        (table, ci): ChunkKey,
        chunk: &Chunk,
        seq: u64,
        bytes: &[u8],
    ) -> Result<()> {
        let mut last = chunk.io.lock().unwrap_or_else(PoisonError::into_inner);
        if *last > seq {
            return Ok(());
        }
        self.check()?;
        let at = table + ci * CHUNK_BYTES;
        qed_log!(Trace, "{}: writing L2 table piece at {at:#x}", self.name());
        add(&self.stats.l2_writes, 1);
        self.storage
            .write_metadata_at(bytes, at)
            .map_err(|e| self.fail(Error::io(format!("writing L2 table at {at:#x}"), e)))?;
        *last = seq;
        Ok(())
    }

    /// Notes a change of the metadata: mappings are not durable until a write-back that
    /// started after it completes. Called before a new entry becomes visible to lookups (with
    /// `staging` held shared), or after a table or header write completed.
    pub(super) fn meta_changed(&self) {
        self.meta_gen.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether every mapping a lookup can see now is durable (no metadata change since the
    /// last completed write-back's snapshot).
    pub(super) fn mapping_durable(&self) -> bool {
        self.meta_gen.load(Ordering::SeqCst) <= self.durable_gen.load(Ordering::SeqCst)
    }

    /// Flushes the storage, sharing one flush among concurrent callers: returns once a flush
    /// that started after this call has completed. A failed flush fails the handle.
    pub(super) fn sync(&self) -> Result<()> {
        let mut st = lock(&self.flusher);
        let target = st.started + 1;
        let mut waited = false;
        loop {
            self.check()?;
            if st.completed >= target {
                return Ok(());
            }
            if st.running {
                if !std::mem::replace(&mut waited, true) {
                    add(&self.stats.flush_waits, 1);
                }
                st = self
                    .flushed
                    .wait(st)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            st.running = true;
            st.started += 1;
            let mine = st.started;
            drop(st);
            qed_log!(Debug, "{}: flushing the image file", self.name());
            add(&self.stats.storage_flushes, 1);
            let r = self.storage.flush();
            if let Err(e) = r {
                let err = self.fail(Error::io("flushing image", e));
                let mut st = lock(&self.flusher);
                st.running = false;
                self.flushed.notify_all();
                return Err(err);
            }
            st = lock(&self.flusher);
            st.running = false;
            st.completed = mine;
            self.flushed.notify_all();
        }
    }

    /// Schedules a write-back of the entries just staged on the process-wide timer, unless
    /// one is scheduled already (it then writes these back too, maybe sooner than `delay`).
    fn arm_timer(self: &Arc<Self>) {
        let Some(delay) = self.delay else { return };
        let mut t = lock(&self.timer);
        if t.stop || t.armed {
            return;
        }
        // A delay too long to represent never comes: only flushes write back.
        if let Some(at) = Instant::now().checked_add(delay) {
            let weak = Arc::downgrade(&(self.clone() as Arc<dyn super::timer::Fire>));
            t.armed = super::timer::schedule(at, weak);
        }
    }

    /// The timer's call when the write-back is due.
    fn timer_fired(&self) {
        {
            let mut t = lock(&self.timer);
            t.armed = false;
            if t.stop || self.is_failed() {
                return;
            }
        }
        // A failure fails the handle; requests report it.
        let _ = self.writeback();
    }

    /// Stops timed write-backs (at close). A write-back the timer is running meanwhile goes on
    /// beside close's own; close does not wait for the timer.
    pub(super) fn stop_timer(&self) {
        lock(&self.timer).stop = true;
    }
}

impl super::timer::Fire for WriteBack {
    fn fire(self: Arc<Self>) {
        self.timer_fired();
    }
}
