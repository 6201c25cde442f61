// SPDX-License-Identifier: MIT OR Apache-2.0
//! A [`Storage`] wrapper that injects faults, for testing what an engine does when its storage
//! fails: the Nth call (of chosen kinds) fails with an errno, once or from then on, a failing
//! write may land torn, and the whole storage can be cut off as a killed process would be.

use super::Storage;
use std::io;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Kinds of storage call, as a bit set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultCalls(u8);

impl FaultCalls {
    /// Reads (`read_at`, `read_vectored_at`; not `read_vectored_nowait`, which never fails
    /// a request).
    pub const READ: FaultCalls = FaultCalls(1);
    /// Writes.
    pub const WRITE: FaultCalls = FaultCalls(2);
    /// Flushes.
    pub const FLUSH: FaultCalls = FaultCalls(4);
    /// Length queries (`len`, `data_from`, `hole_from`).
    pub const LEN: FaultCalls = FaultCalls(8);
    /// Length changes (`set_len`, `preallocate`).
    pub const SET_LEN: FaultCalls = FaultCalls(16);
    /// Holes punched (`punch_hole`; `can_punch_hole` only asks and never fails).
    pub const PUNCH: FaultCalls = FaultCalls(32);
    /// Every kind.
    pub const ALL: FaultCalls = FaultCalls(63);

    /// Both sets.
    pub const fn union(self, other: FaultCalls) -> FaultCalls {
        FaultCalls(self.0 | other.0)
    }
    /// Whether the sets share a kind.
    pub const fn intersects(self, other: FaultCalls) -> bool {
        self.0 & other.0 != 0
    }
}

/// When an armed fault fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FaultMode {
    /// The one matching call fails; later calls succeed (a transient error, or a flush that
    /// fails once and then succeeds).
    Once,
    /// The matching call and every later call of the chosen kinds fail (a device gone bad).
    From,
}

/// One fault to inject: `Fault::new(FaultCalls::FLUSH, 0, libc::EIO)` fails the first flush
/// once; `.with_mode(FaultMode::From)` and `.with_torn(true)` change how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Fault {
    /// Which calls count and can fail.
    pub calls: FaultCalls,
    /// The 0-based index, among calls of those kinds, of the first call that fails.
    pub at: u64,
    /// The errno it fails with (`libc::EIO`, `libc::ENOSPC`, ...).
    pub errno: i32,
    /// Once or from then on.
    pub mode: FaultMode,
    /// A failing write first writes the first half of its 512-byte sectors (a torn write, as a
    /// device that lost power or ran out of space mid-request may leave).
    pub torn: bool,
}

impl Fault {
    /// Fails the call numbered `at` (0-based) among calls of the kinds `calls`, once, with
    /// `errno`, not torn.
    pub fn new(calls: FaultCalls, at: u64, errno: i32) -> Fault {
        Fault {
            calls,
            at,
            errno,
            mode: FaultMode::Once,
            torn: false,
        }
    }
    /// The same fault, firing once or from then on.
    pub fn with_mode(self, mode: FaultMode) -> Fault {
        Fault { mode, ..self }
    }
    /// The same fault, with failing writes torn or not.
    pub fn with_torn(self, torn: bool) -> Fault {
        Fault { torn, ..self }
    }
}

#[derive(Default)]
struct State {
    fault: Option<Fault>,
    /// Calls seen, of every kind, and of the armed fault's kinds.
    calls: u64,
    matching: u64,
    fired: u64,
    /// Writes and length changes that went through after the fault first fired.
    changed_after: u64,
    cut_off: bool,
}

/// Wraps a storage and fails its calls as told. Counting starts when a fault is armed.
pub struct FaultStorage<S> {
    inner: S,
    state: Mutex<State>,
}

enum Verdict {
    Pass,
    Fail(i32, bool),
}

impl<S: Storage> FaultStorage<S> {
    /// A wrapper that injects nothing until a fault is armed.
    pub fn new(inner: S) -> Self {
        FaultStorage {
            inner,
            state: Mutex::new(State::default()),
        }
    }

    /// The wrapped storage.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Arms `fault` (replacing any other) and restarts the counts.
    pub fn arm(&self, fault: Fault) {
        let mut s = self.lock();
        s.fault = Some(fault);
        s.calls = 0;
        s.matching = 0;
        s.fired = 0;
        s.changed_after = 0;
    }

    /// Disarms the fault; calls succeed again (unless cut off).
    pub fn disarm(&self) {
        self.lock().fault = None;
    }

    /// From now on every call fails with `EIO` and reaches nothing, as if the process using
    /// the storage had been killed: what was written so far stays exactly as it is.
    pub fn cut_off(&self) {
        self.lock().cut_off = true;
    }

    /// Calls seen since the fault was armed (or since creation).
    pub fn calls(&self) -> u64 {
        self.lock().calls
    }

    /// How many calls the armed fault has failed.
    pub fn fired(&self) -> u64 {
        self.lock().fired
    }

    /// How many writes, punches and length changes reached the storage after the fault first fired
    /// (an error path that must change nothing keeps this at 0).
    pub fn changed_after_fault(&self) -> u64 {
        self.lock().changed_after
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn judge(&self, kind: FaultCalls) -> Verdict {
        let mut s = self.lock();
        if s.cut_off {
            return Verdict::Fail(libc::EIO, false);
        }
        s.calls += 1;
        let hit = match s.fault {
            Some(f) if f.calls.intersects(kind) => {
                let i = s.matching;
                s.matching += 1;
                match f.mode {
                    FaultMode::Once => i == f.at,
                    FaultMode::From => i >= f.at,
                }
            }
            _ => false,
        };
        match s.fault {
            Some(f) if hit => {
                s.fired += 1;
                Verdict::Fail(f.errno, f.torn)
            }
            _ => {
                let changes = FaultCalls::WRITE
                    .union(FaultCalls::SET_LEN)
                    .union(FaultCalls::PUNCH);
                if s.fired > 0 && kind.intersects(changes) {
                    s.changed_after += 1;
                }
                Verdict::Pass
            }
        }
    }
}

impl<S: Storage> FaultStorage<S> {
    /// A failing vectored write: lands torn if the fault says so, then fails with `errno`.
    fn fail_vectored(&self, bufs: &[&[u8]], offset: u64, errno: i32, torn: bool) -> io::Result<()> {
        if torn {
            let all = bufs.concat();
            let n = torn_len(offset, all.len());
            if n > 0 {
                self.inner.write_at(&all[..n], offset)?;
            }
        }
        Err(err(errno))
    }
}

fn err(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}

/// The first half (by whole 512-byte sectors of the file) of a write of `len` bytes at
/// `offset`.
fn torn_len(offset: u64, len: usize) -> usize {
    let end = offset + len as u64;
    let first_boundary = (offset / 512 + 1) * 512;
    if first_boundary >= end {
        return 0;
    }
    let sectors = (end - first_boundary).div_ceil(512);
    let keep_to = first_boundary + sectors / 2 * 512;
    (keep_to - offset) as usize
}

impl<S: Storage> Storage for FaultStorage<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self.judge(FaultCalls::READ) {
            Verdict::Pass => self.inner.read_at(buf, offset),
            Verdict::Fail(e, _) => Err(err(e)),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match self.judge(FaultCalls::WRITE) {
            Verdict::Pass => self.inner.write_at(buf, offset),
            Verdict::Fail(e, torn) => {
                if torn {
                    let n = torn_len(offset, buf.len());
                    if n > 0 {
                        self.inner.write_at(&buf[..n], offset)?;
                    }
                }
                Err(err(e))
            }
        }
    }

    fn write_metadata_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match self.judge(FaultCalls::WRITE) {
            Verdict::Pass => self.inner.write_metadata_at(buf, offset),
            Verdict::Fail(e, torn) => {
                if torn {
                    let n = torn_len(offset, buf.len());
                    if n > 0 {
                        self.inner.write_metadata_at(&buf[..n], offset)?;
                    }
                }
                Err(err(e))
            }
        }
    }

    fn read_vectored_at(&self, bufs: &mut [&mut [u8]], offset: u64) -> io::Result<()> {
        match self.judge(FaultCalls::READ) {
            Verdict::Pass => self.inner.read_vectored_at(bufs, offset),
            Verdict::Fail(e, _) => Err(err(e)),
        }
    }

    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        match self.judge(FaultCalls::WRITE) {
            Verdict::Pass => self.inner.write_vectored_at(bufs, offset),
            Verdict::Fail(e, torn) => self.fail_vectored(bufs, offset, e, torn),
        }
    }

    /// Counted (and failed) as a write followed by a flush: a write fault fails it before
    /// anything is durable (torn as a write would be), a flush fault after the bytes are
    /// written but not durable.
    fn write_vectored_at_fua(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        if let Verdict::Fail(e, torn) = self.judge(FaultCalls::WRITE) {
            return self.fail_vectored(bufs, offset, e, torn);
        }
        match self.judge(FaultCalls::FLUSH) {
            Verdict::Pass => self.inner.write_vectored_at_fua(bufs, offset),
            Verdict::Fail(e, _) => {
                self.inner.write_vectored_at(bufs, offset)?;
                Err(err(e))
            }
        }
    }

    fn flush(&self) -> io::Result<()> {
        match self.judge(FaultCalls::FLUSH) {
            Verdict::Pass => self.inner.flush(),
            Verdict::Fail(e, _) => Err(err(e)),
        }
    }

    fn len(&self) -> io::Result<u64> {
        match self.judge(FaultCalls::LEN) {
            Verdict::Pass => self.inner.len(),
            Verdict::Fail(e, _) => Err(err(e)),
        }
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        match self.judge(FaultCalls::SET_LEN) {
            Verdict::Pass => self.inner.set_len(len),
            Verdict::Fail(e, _) => Err(err(e)),
        }
    }

    fn preallocate(&self, len: u64) -> io::Result<()> {
        match self.judge(FaultCalls::SET_LEN) {
            Verdict::Pass => self.inner.preallocate(len),
            Verdict::Fail(e, _) => Err(err(e)),
        }
    }

    fn grows_on_write(&self) -> bool {
        self.inner.grows_on_write()
    }

    fn data_from(&self, offset: u64) -> io::Result<Option<u64>> {
        match self.judge(FaultCalls::LEN) {
            Verdict::Pass => self.inner.data_from(offset),
            Verdict::Fail(e, _) => Err(err(e)),
        }
    }

    /// A failing punch that is torn punches the first half of its sectors, as a torn write
    /// writes them.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.judge(FaultCalls::PUNCH) {
            Verdict::Pass => self.inner.punch_hole(offset, len),
            Verdict::Fail(e, torn) => {
                let n = if torn {
                    torn_len(offset, usize::try_from(len).unwrap_or(usize::MAX))
                } else {
                    0
                };
                if n > 0 {
                    self.inner.punch_hole(offset, n as u64)?;
                }
                Err(err(e))
            }
        }
    }

    fn can_punch_hole(&self) -> bool {
        self.inner.can_punch_hole()
    }

    fn hole_from(&self, offset: u64) -> io::Result<u64> {
        match self.judge(FaultCalls::LEN) {
            Verdict::Pass => self.inner.hole_from(offset),
            Verdict::Fail(e, _) => Err(err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    #[test]
    fn fails_the_nth_matching_call_once_or_from_then_on() {
        let s = FaultStorage::new(MemStorage::new());
        s.write_at(b"abcd", 0).unwrap();
        s.arm(Fault::new(FaultCalls::FLUSH, 1, libc::EIO));
        s.flush().unwrap();
        s.write_at(b"x", 0).unwrap();
        assert_eq!(s.flush().unwrap_err().raw_os_error(), Some(libc::EIO));
        s.flush().unwrap();
        assert_eq!((s.calls(), s.fired()), (4, 1));

        s.arm(
            Fault::new(
                FaultCalls::WRITE.union(FaultCalls::SET_LEN),
                0,
                libc::ENOSPC,
            )
            .with_mode(FaultMode::From)
            .with_torn(true),
        );
        // 1536 bytes at 256: sectors end at 512, 1024, 1536, 1792; the torn write keeps the
        // first partial sector and half of the three after it.
        let data = vec![7u8; 1536];
        assert_eq!(
            s.write_at(&data, 256).unwrap_err().raw_os_error(),
            Some(libc::ENOSPC)
        );
        assert_eq!(s.inner().len().unwrap(), 256 + 256 + 512);
        assert!(s.set_len(0).is_err());
        s.disarm();
        s.cut_off();
        let mut b = [0u8; 1];
        assert!(s.read_at(&mut b, 0).is_err());
        assert_eq!(s.inner().len().unwrap(), 1024);
    }
}
