// SPDX-License-Identifier: MIT OR Apache-2.0
//! Reports of what the library does (opens, repairs, allocations, flushes, failures), for
//! debugging. Nothing is reported by default: a callback ([`set_log_callback`]) or the
//! `QED_DEBUG` environment variable turns it on. A disabled report costs one relaxed atomic
//! load: `qed_log!` checks the level before it formats anything.
//!
//! `QED_DEBUG` is read once, at the first check: `error`, `warn`, `info`, `debug`, `trace`
//! (or `1`, meaning `debug`) report up to that level on stderr as `libqed: <level>: <message>`.
//! An installed callback wins over stderr.

use crate::error::{Error, Result};
use std::cell::Cell;
use std::io::Write;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

/// How much a report matters; each level includes the ones before it.
#[non_exhaustive]
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LogLevel {
    /// The handle failed, a storage call failed.
    Error = 1,
    /// Something was refused or repaired (a hostile header field, a bad repair result).
    Warn = 2,
    /// Opens, closes, repairs.
    Info = 3,
    /// Allocations, flushes, write-backs of staged L2 entries.
    Debug = 4,
    /// Per-cluster and per-table-piece detail.
    Trace = 5,
}

impl LogLevel {
    /// The level's name as printed (`"debug"`).
    pub fn name(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }

    /// The level numbered `n` (1 = error .. 5 = trace), as the C constants number them.
    pub fn from_u32(n: u32) -> Option<LogLevel> {
        Some(match n {
            1 => LogLevel::Error,
            2 => LogLevel::Warn,
            3 => LogLevel::Info,
            4 => LogLevel::Debug,
            5 => LogLevel::Trace,
            _ => return None,
        })
    }
}

/// A receiver of reports: the level and the message (no trailing newline).
pub type LogCallback = Arc<dyn Fn(LogLevel, &str) + Send + Sync>;

/// The highest level reported now (0: none); `UNSET` until `QED_DEBUG` has been read, so the
/// first check takes the slow path once.
static MAX: AtomicU32 = AtomicU32::new(UNSET);
const UNSET: u32 = u32::MAX;

/// The installed callback and its level. Held shared while a callback runs, so replacing it
/// waits for calls in progress (the old callback's data may be freed once the swap returns).
static SINK: RwLock<Option<(LogLevel, LogCallback)>> = RwLock::new(None);

/// The level `QED_DEBUG` asks for (0: none).
static ENV: OnceLock<u32> = OnceLock::new();

thread_local! {
    /// Set while this thread runs the callback: reports it causes are dropped (no recursion,
    /// no second shared lock a waiting writer could block).
    static IN_CALLBACK: Cell<bool> = const { Cell::new(false) };
}

fn env_level() -> u32 {
    *ENV.get_or_init(|| {
        let v = std::env::var("QED_DEBUG").unwrap_or_default();
        match v.trim().to_ascii_lowercase().as_str() {
            "" | "0" | "off" | "none" => 0,
            "error" => 1,
            "warn" | "warning" => 2,
            "info" => 3,
            "1" | "debug" => 4,
            "trace" => 5,
            other => {
                // Said once, since the variable is read once; a typo should not be silent.
                let _ = writeln!(
                    std::io::stderr().lock(),
                    "libqed: warn: QED_DEBUG={other:?} not understood (use error, warn, info, debug or trace); nothing is logged"
                );
                0
            }
        }
    })
}

/// Recomputes `MAX` from the sink and the environment; the caller holds `SINK`.
fn refresh(sink: &Option<(LogLevel, LogCallback)>) {
    let max = match sink {
        Some((level, _)) => *level as u32,
        None => env_level(),
    };
    MAX.store(max, Ordering::Relaxed);
}

#[cold]
fn init_enabled(level: LogLevel) -> bool {
    let sink = SINK.read().unwrap_or_else(PoisonError::into_inner);
    refresh(&sink);
    level as u32 <= MAX.load(Ordering::Relaxed)
}

/// Whether a report at `level` would be delivered; the one cost of a disabled report.
#[inline]
pub(crate) fn enabled(level: LogLevel) -> bool {
    let max = MAX.load(Ordering::Relaxed);
    level as u32 <= max && (max != UNSET || init_enabled(level))
}

/// Installs `cb` to receive every report up to `level` (it replaces stderr and any previous
/// callback), or with `None` goes back to what `QED_DEBUG` says (nothing when unset; `level` is
/// then ignored).
///
/// Thread-safe. When it returns, calls to the previous callback have finished and no new ones
/// start. The callback may run on any thread, concurrently; a panic in it is caught and
/// dropped. It must not call `set_log_callback` (refused: that would wait for itself); reports
/// it causes itself are dropped.
pub fn set_log_callback(level: LogLevel, cb: Option<LogCallback>) -> Result<()> {
    if in_callback() {
        return Err(Error::InvalidArgument {
            what: "log callback",
            value: 0,
            reason: "the log callback cannot be changed from inside the log callback".into(),
        });
    }
    let mut sink = SINK.write().unwrap_or_else(PoisonError::into_inner);
    *sink = cb.map(|cb| (level, cb));
    refresh(&sink);
    Ok(())
}

/// Whether this thread is running the log callback now.
pub(crate) fn in_callback() -> bool {
    IN_CALLBACK.with(Cell::get)
}

/// Delivers a report; callers check [`enabled`] first (the macro does).
#[cold]
pub(crate) fn emit(level: LogLevel, args: std::fmt::Arguments<'_>) {
    if in_callback() {
        return;
    }
    let sink = SINK.read().unwrap_or_else(PoisonError::into_inner);
    match &*sink {
        Some((max, cb)) => {
            if level > *max {
                return;
            }
            let msg = args.to_string();
            IN_CALLBACK.with(|f| f.set(true));
            // A logger must never break the request that reported: a panic stops here.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cb(level, &msg)));
            IN_CALLBACK.with(|f| f.set(false));
        }
        None => {
            drop(sink);
            if level as u32 > env_level() {
                return;
            }
            // One write per line, so lines from several threads do not interleave.
            let line = format!("libqed: {}: {args}\n", level.name());
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        }
    }
}

/// Reports a message at a level, formatting it only when that level is delivered:
/// `qed_log!(Debug, "allocated {n} clusters")`.
macro_rules! qed_log {
    ($level:ident, $($arg:tt)+) => {
        if $crate::log::enabled($crate::log::LogLevel::$level) {
            $crate::log::emit($crate::log::LogLevel::$level, format_args!($($arg)+));
        }
    };
}
pub(crate) use qed_log;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_order_and_names() {
        assert!(LogLevel::Error < LogLevel::Trace);
        for n in 1..=5 {
            assert_eq!(LogLevel::from_u32(n).unwrap() as u32, n);
        }
        assert_eq!(LogLevel::from_u32(0), None);
        assert_eq!(LogLevel::from_u32(6), None);
        assert_eq!(LogLevel::Warn.name(), "warn");
    }
}
