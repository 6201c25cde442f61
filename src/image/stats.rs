// SPDX-License-Identifier: MIT OR Apache-2.0
//! Per-image counters of what a handle did, for debugging and monitoring. Counted at the
//! `Image` API, so synchronous, asynchronous and `qed-img` requests all count. Each count is
//! one relaxed `fetch_add`: no lock on the request path.

use super::Image;
use crate::error::{Error, Result};
use crate::log::qed_log;
use std::borrow::Cow;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of an image's counters ([`Image::stats`]). Each is counted since the open; the
/// counts are read one by one, so a snapshot taken under load may mix moments.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImageStats {
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
    /// Discard requests that completed.
    pub discard_requests: u64,
    /// Bytes those requests discarded.
    pub discard_bytes: u64,
    /// Data clusters whose space was given back to the host file system (discard,
    /// write-zeroes with MAY_UNMAP, sparsify).
    pub clusters_punched: u64,
    /// Requests (read, write, write zeroes, discard, flush) that returned an error.
    pub failed_requests: u64,
    /// Flushes of the image file issued by requests, write-back, close and the repair at open
    /// (concurrent flush requests share one). A check's own flushes are not counted.
    pub storage_flushes: u64,
    /// Times a flush (of a request, a write-back or close) found a flush of the image file
    /// running and waited to share the next one with the others waiting (group commit).
    pub flush_waits: u64,
    /// Data clusters allocated.
    pub clusters_allocated: u64,
    /// L2 tables allocated.
    pub l2_tables_allocated: u64,
    /// Lookups that found their 4 KiB piece of L2 table in the cache.
    pub l2_cache_hits: u64,
    /// Lookups that read their piece of L2 table from the file (concurrent lookups of one
    /// piece share the read and count one miss).
    pub l2_cache_misses: u64,
    /// Pieces of L2 table written to the file (write-through or write-back of staged entries).
    pub l2_writes: u64,
    /// Repairs run: at open (need-check bit set) and by [`Image::check`] with a fix.
    pub repairs: u64,
    /// Corruptions those repairs fixed.
    pub corruptions_fixed: u64,
    /// Leaked clusters those repairs reclaimed.
    pub leaks_fixed: u64,
}

/// The live counters. The per-request ones come first so a request touches at most two cache
/// lines; aligned so that they share none with the image's locks.
#[derive(Default)]
#[repr(align(64))]
pub(super) struct Counters {
    pub read_requests: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_requests: AtomicU64,
    pub write_bytes: AtomicU64,
    pub l2_cache_hits: AtomicU64,
    pub l2_cache_misses: AtomicU64,
    pub clusters_allocated: AtomicU64,
    pub l2_writes: AtomicU64,
    pub write_zeroes_requests: AtomicU64,
    pub write_zeroes_bytes: AtomicU64,
    pub flush_requests: AtomicU64,
    pub failed_requests: AtomicU64,
    pub storage_flushes: AtomicU64,
    pub flush_waits: AtomicU64,
    pub l2_tables_allocated: AtomicU64,
    pub repairs: AtomicU64,
    pub corruptions_fixed: AtomicU64,
    pub leaks_fixed: AtomicU64,
    pub discard_requests: AtomicU64,
    pub discard_bytes: AtomicU64,
    pub clusters_punched: AtomicU64,
}

/// Adds `n` to a counter.
#[inline]
pub(super) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    pub(super) fn snapshot(&self) -> ImageStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ImageStats {
            read_requests: g(&self.read_requests),
            read_bytes: g(&self.read_bytes),
            write_requests: g(&self.write_requests),
            write_bytes: g(&self.write_bytes),
            write_zeroes_requests: g(&self.write_zeroes_requests),
            write_zeroes_bytes: g(&self.write_zeroes_bytes),
            flush_requests: g(&self.flush_requests),
            failed_requests: g(&self.failed_requests),
            storage_flushes: g(&self.storage_flushes),
            flush_waits: g(&self.flush_waits),
            clusters_allocated: g(&self.clusters_allocated),
            l2_tables_allocated: g(&self.l2_tables_allocated),
            l2_cache_hits: g(&self.l2_cache_hits),
            l2_cache_misses: g(&self.l2_cache_misses),
            l2_writes: g(&self.l2_writes),
            repairs: g(&self.repairs),
            corruptions_fixed: g(&self.corruptions_fixed),
            leaks_fixed: g(&self.leaks_fixed),
            discard_requests: g(&self.discard_requests),
            discard_bytes: g(&self.discard_bytes),
            clusters_punched: g(&self.clusters_punched),
        }
    }

    /// Counts one repair and what it fixed.
    pub(super) fn repaired(&self, r: &super::CheckResult) {
        add(&self.repairs, 1);
        add(&self.corruptions_fixed, r.corruptions_fixed);
        add(&self.leaks_fixed, r.leaks_fixed);
    }
}

/// The kinds of request counted.
#[derive(Clone, Copy, Debug)]
pub(super) enum Req {
    Read,
    Write,
    WriteZeroes,
    Discard,
    Flush,
}

impl Image {
    /// What this handle has done since it was opened.
    pub fn stats(&self) -> ImageStats {
        self.stats.snapshot()
    }

    /// Counts a finished request of `bytes` bytes and reports its failure.
    pub(super) fn account(&self, req: Req, offset: u64, bytes: u64, r: Result<()>) -> Result<()> {
        let c = &*self.stats;
        match &r {
            Ok(()) => {
                let (n, b) = match req {
                    Req::Read => (&c.read_requests, Some(&c.read_bytes)),
                    Req::Write => (&c.write_requests, Some(&c.write_bytes)),
                    Req::WriteZeroes => (&c.write_zeroes_requests, Some(&c.write_zeroes_bytes)),
                    Req::Discard => (&c.discard_requests, Some(&c.discard_bytes)),
                    Req::Flush => (&c.flush_requests, None),
                };
                add(n, 1);
                if let Some(b) = b {
                    add(b, bytes);
                }
            }
            Err(e) => {
                add(&c.failed_requests, 1);
                // The storage or the metadata failing is the library's news; a caller's bad
                // argument, or a handle that already failed (said once, when it failed), is not.
                if matches!(e, Error::Io { .. } | Error::Corrupt { .. }) {
                    qed_log!(
                        Error,
                        "{}: {req:?} of {bytes} bytes at {offset:#x} failed: {e}",
                        self.label()
                    );
                } else {
                    qed_log!(
                        Debug,
                        "{}: {req:?} of {bytes} bytes at {offset:#x} refused: {e}",
                        self.label()
                    );
                }
            }
        }
        r
    }

    /// The image's name for reports (see [`label_of`]).
    pub(super) fn label(&self) -> Cow<'_, str> {
        label_of(self.path.as_deref())
    }
}

/// An image's name for reports: its path, or `<storage>` when opened on caller storage.
pub(super) fn label_of(path: Option<&Path>) -> Cow<'_, str> {
    path.map_or_else(|| "<storage>".into(), Path::to_string_lossy)
}
