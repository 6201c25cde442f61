// SPDX-License-Identifier: MIT OR Apache-2.0
//! Debugging and introspection: `qed_set_log_callback` (reports of what the library does) and
//! `qed_get_stats` (per-image counters).

use super::abi::{self, Extensible};
use super::image::{image, qed_image};
use super::{qed_boundary, CError, InFn};
use crate::log::{self, LogLevel};
use std::ffi::{c_char, c_int, c_void, CString};
use std::sync::Arc;

/// Log level: the handle failed, a storage call failed.
pub const QED_LOG_ERROR: c_int = 1;
/// Log level: something was refused (a hostile header field) or left unrepaired.
pub const QED_LOG_WARN: c_int = 2;
/// Log level: opens, closes, checks and repairs.
pub const QED_LOG_INFO: c_int = 3;
/// Log level: allocations of clusters and L2 tables, flushes, write-backs of staged entries.
pub const QED_LOG_DEBUG: c_int = 4;
/// Log level: per-piece detail (L2 cache misses, table writes, file extensions).
pub const QED_LOG_TRACE: c_int = 5;

/// Receives one report: `level` is one of `QED_LOG_ERROR` .. `QED_LOG_TRACE`, `msg` a line of
/// text without a newline that names the image file, valid only during the call.
pub type qed_log_fn =
    Option<unsafe extern "C" fn(opaque: *mut c_void, level: c_int, msg: *const c_char)>;

/// The caller's pointer, handed back unchanged; the caller vouches that it may be used from
/// any thread (the documented contract of `qed_set_log_callback`).
struct Opaque(*mut c_void);
// SAFETY: libqed never dereferences it; the caller promises the callback may receive it on any
// thread.
unsafe impl Send for Opaque {}
// SAFETY: as above.
unsafe impl Sync for Opaque {}

impl Opaque {
    /// The pointer (a method, so that closures capture the whole `Send` wrapper).
    fn get(&self) -> *mut c_void {
        self.0
    }
}

/// Sends the library's reports to `cb`: every report at `level` or more important
/// (`QED_LOG_ERROR` = 1 .. `QED_LOG_TRACE` = 5) is passed to `cb(opaque, level, msg)`. `cb` NULL
/// removes the callback: reports then go where the `QED_DEBUG` environment variable says
/// (`error`, `warn`, `info`, `debug` or `trace`: to stderr, as `libqed: <level>: <msg>`;
/// unset: nowhere). Nothing is reported unless one of the two asks for it. A callback takes
/// the place of stderr.
///
/// The callback:
/// - may be called from any thread, including library worker threads (asynchronous requests,
///   the write-back timer), and from several threads at once;
/// - may be called while the library holds locks of the image it reports on: it must not call
///   any function on a `qed_image` (that may deadlock), nor `qed_set_log_callback` (refused
///   with `-EDEADLK`). It may call `qed_version`, `qed_strerror` and `qed_last_error`; reports
///   the callback itself would cause are dropped;
/// - must return normally (no `longjmp`, no C++ exception);
/// - gets `msg` valid only during the call: copy it to keep it.
///
/// `opaque` is passed back unchanged and must stay valid until the callback is replaced.
///
/// **Returns:** 0; `-EINVAL` for a `level` outside 1..5 with a non-NULL `cb`; `-EDEADLK` when
/// called from inside the log callback.
///
/// **Thread-safety:** may be called from any thread at any time; the setting is process-wide.
/// When it returns, calls to the previous callback have finished and none start again: its
/// `opaque` may then be freed.
///
/// **NULL:** `cb` may be NULL (see above); `opaque` may be NULL.
///
/// # Safety
/// `cb`, when not NULL, must be a function that may be called as described above with
/// `opaque`, until replaced.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_set_log_callback(
    level: c_int,
    cb: qed_log_fn,
    opaque: *mut c_void,
) -> c_int {
    const F: &str = "qed_set_log_callback";
    qed_boundary!(F, {
        if log::in_callback() {
            return Err(CError {
                errno: libc::EDEADLK,
                msg: format!("{F}: called from inside the log callback"),
            });
        }
        let sink: Option<(LogLevel, log::LogCallback)> = match cb {
            None => None,
            Some(cb) => {
                let lv = u32::try_from(level)
                    .ok()
                    .and_then(LogLevel::from_u32)
                    .ok_or_else(|| {
                        CError::arg(
                            F,
                            format_args!(
                                "level {level} is not QED_LOG_ERROR (1) .. QED_LOG_TRACE (5)"
                            ),
                        )
                    })?;
                let opaque = Opaque(opaque);
                let f: log::LogCallback = Arc::new(move |l: LogLevel, msg: &str| {
                    let text = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
                    // SAFETY: the caller of qed_set_log_callback vouches for cb and opaque
                    // until replaced, and the logger never calls a replaced callback.
                    unsafe { cb(opaque.get(), l as c_int, text.as_ptr()) };
                });
                Some((lv, f))
            }
        };
        match sink {
            Some((lv, f)) => log::set_log_callback(lv, Some(f)),
            None => log::set_log_callback(LogLevel::Error, None),
        }
        .in_fn(F)?;
        Ok(0)
    })
}

/// Counters of what an image handle did since it was opened (filled by `qed_get_stats`).
/// Set `struct_size` to `sizeof(struct qed_stats)` first (see "Structs that grow" at the top).
/// Each counter is read on its own, so a snapshot taken under load may mix moments.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct qed_stats {
    /// `sizeof(struct qed_stats)`, set by the caller.
    pub struct_size: u32,
    /// Written as 0.
    pub reserved: u32,
    /// Read requests that completed.
    pub read_requests: u64,
    /// Bytes those reads returned.
    pub read_bytes: u64,
    /// Write requests that completed.
    pub write_requests: u64,
    /// Bytes those writes carried.
    pub write_bytes: u64,
    /// Write-zeroes requests that completed.
    pub write_zeroes_requests: u64,
    /// Bytes those requests zeroed.
    pub write_zeroes_bytes: u64,
    /// Flush requests that completed.
    pub flush_requests: u64,
    /// Requests (read, write, write zeroes, discard, flush; synchronous or not) that returned an
    /// error.
    pub failed_requests: u64,
    /// Flushes of the image file (by requests, write-back, close and the repair at open;
    /// concurrent flush requests share one). A check's own flushes are not counted.
    pub storage_flushes: u64,
    /// Data clusters allocated.
    pub clusters_allocated: u64,
    /// L2 tables allocated.
    pub l2_tables_allocated: u64,
    /// Lookups that found their 4 KiB piece of L2 table in the cache.
    pub l2_cache_hits: u64,
    /// Lookups that read their piece of L2 table from the file.
    pub l2_cache_misses: u64,
    /// Pieces of L2 table written to the file.
    pub l2_writes: u64,
    /// Repairs run: at open (need-check bit set) and by `qed_check` with a fix.
    pub repairs: u64,
    /// Corruptions those repairs fixed.
    pub corruptions_fixed: u64,
    /// Leaked clusters those repairs reclaimed.
    pub leaks_fixed: u64,
    /// Discard requests that completed (synchronous or not).
    pub discard_requests: u64,
    /// Bytes those requests discarded.
    pub discard_bytes: u64,
    /// Data clusters whose space was given back to the host file system (discard,
    /// write-zeroes with `QED_ZERO_MAY_UNMAP`).
    pub clusters_punched: u64,
}

// SAFETY: repr(C), u32 size first, integers only.
unsafe impl Extensible for qed_stats {
    const NAME: &'static str = "qed_stats";
}

/// Fills `*stats` with the counters of `img` (see `struct qed_stats`). The library writes only
/// the first `stats->struct_size` bytes it knows; a caller built against a newer header sees
/// the fields this library lacks untouched.
///
/// **Returns:** 0; `-EINVAL` for NULL arguments or a `struct_size` no release had (see
/// "Structs that grow" at the top). `*stats` is written only on success.
///
/// **Thread-safety:** may be called concurrently with any request on the same image, from
/// any thread.
///
/// # Safety
/// Pointers must be NULL where allowed or valid for the access described above; a handle
/// must come from `qed_open*` and not have been closed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_get_stats(img: *mut qed_image, stats: *mut qed_stats) -> c_int {
    const F: &str = "qed_get_stats";
    qed_boundary!(F, {
        // SAFETY: handle contract.
        let img = unsafe { image(F, img) }?;
        let s = img.stats();
        let out = qed_stats {
            struct_size: 0,
            reserved: 0,
            read_requests: s.read_requests,
            read_bytes: s.read_bytes,
            write_requests: s.write_requests,
            write_bytes: s.write_bytes,
            write_zeroes_requests: s.write_zeroes_requests,
            write_zeroes_bytes: s.write_zeroes_bytes,
            flush_requests: s.flush_requests,
            failed_requests: s.failed_requests,
            storage_flushes: s.storage_flushes,
            clusters_allocated: s.clusters_allocated,
            l2_tables_allocated: s.l2_tables_allocated,
            l2_cache_hits: s.l2_cache_hits,
            l2_cache_misses: s.l2_cache_misses,
            l2_writes: s.l2_writes,
            repairs: s.repairs,
            corruptions_fixed: s.corruptions_fixed,
            leaks_fixed: s.leaks_fixed,
            discard_requests: s.discard_requests,
            discard_bytes: s.discard_bytes,
            clusters_punched: s.clusters_punched,
        };
        // SAFETY: stats is NULL (refused) or points to struct_size writable bytes, per the
        // size-prefix contract.
        unsafe { abi::write_out(F, "stats", stats, out) }?;
        Ok(0)
    })
}
