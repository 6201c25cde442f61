// SPDX-License-Identifier: MIT OR Apache-2.0
//! Live streaming and copy-on-read: the backing chain's data is copied into the overlay while
//! guest requests continue, then (for a stream) the backing file is dropped from the header.
//!
//! A copy works on whole clusters and follows the allocating write's rules: it locks the guest
//! clusters' range ([`super::rangelock`]), looks again under the lock, and copies only clusters
//! still unallocated, so a guest write always wins (a write that came first has allocated the
//! cluster; one that comes later waits for the lock, then writes in place over the copy). The
//! copied data goes to fresh clusters and the L2 entries are installed through the same path as
//! an allocating write's, so with a backing file they are staged until the data is flushed: a
//! crash at any point leaves a valid overlay that reads the same (a lost entry reads through to
//! the backing file, which holds the same bytes). Clusters that read as zeros become zero
//! clusters, with no data written.
//!
//! The io_uring ring (`plan_direct`) never sees a cluster half streamed: it plans reads of data
//! and zero clusters and of holes only without a backing file, and writes only in place into
//! data clusters. A streamed cluster goes from unallocated (which, with a backing file, the
//! ring refuses, so such requests take the synchronous path and its range lock) to data or
//! zero, and a copy never touches a cluster that is already data or zero, so a mapping the
//! ring planned stays true while its plan holds the gate. The backing file is dropped under
//! the exclusive gate, after every plan has finished, and only once no cluster within the
//! backing file's reach is unallocated, so no planned read could have meant "the backing file".

use super::stats::add;
use super::{ExtentKind, Image, Progress};
use crate::error::{Error, Result};
use crate::format::L2_ZERO_CLUSTER;
use crate::log::qed_log;

/// Guest bytes copied under one range lock at most (at least one cluster): bounds the buffer
/// and how long a guest write into the range waits.
const BATCH_BYTES: u64 = 1 << 20;

/// What progress reports and cancellation name.
const WHAT: &str = "stream";

impl Image {
    /// Streams the backing chain into this image while other threads (and the asynchronous
    /// queue) go on reading and writing it: every cluster the image does not have is copied
    /// from the backing chain (clusters that read as zeros become zero clusters), then the data
    /// is flushed and the backing file is removed from the header, as
    /// [`Image::change_backing_file`]`(None, None)` does.
    ///
    /// `progress` counts bytes of the virtual disk. Cancelled (or stopped by an error), the
    /// image is a valid overlay that still has its backing file and reads the same; so is an
    /// image whose stream was cut short by a crash. Calling `stream` again finishes the job.
    /// An image without a backing file has nothing to stream (`Ok`). An image opened without
    /// its backing file (`no_backing`) cannot be streamed.
    pub fn stream(&self, progress: &Progress) -> Result<()> {
        self.named(self.stream_unnamed(progress))
    }

    fn stream_unnamed(&self, progress: &Progress) -> Result<()> {
        self.check_writable()?;
        let mut pos = 0;
        loop {
            let size = self.size();
            progress.update(WHAT, pos, size)?;
            if pos < size {
                let _g = self.gate.read();
                pos += self.stream_step(pos)?;
                continue;
            }
            // Everything was copied once; drop the backing file under the exclusive gate,
            // unless something (a repair, a grow) left clusters to copy meanwhile.
            match self.finish_stream()? {
                None => return progress.update(WHAT, size, size),
                Some(p) => pos = p,
            }
        }
    }

    /// Copies the clusters of at most one batch at `pos` (cluster-aligned); returns the guest
    /// bytes looked at. The caller holds the gate.
    fn stream_step(&self, pos: u64) -> Result<u64> {
        self.check_usable()?;
        let size = self.size();
        let Some(reach) = self.backing_reach()? else {
            // No backing file (any more): nothing to copy.
            return Ok(size - pos);
        };
        if pos >= reach {
            return Ok(size - pos);
        }
        let ext = self.lookup(pos, reach - pos)?;
        if ext.kind == ExtentKind::Unallocated {
            return self.copy_up(pos, ext.length);
        }
        Ok(ext.length)
    }

    /// Where the backing file's data ends for this image: its size (bounded by ours) rounded
    /// up to a cluster; `None` without an open backing file. Unallocated clusters at or past
    /// it read as zeros with or without the backing file. Stable while the gate is held.
    fn backing_reach(&self) -> Result<Option<u64>> {
        let Some(b) = self.backing() else {
            if self.header_names_backing() {
                return Err(Error::InvalidArgument {
                    what: "backing",
                    value: 0,
                    reason: "the image was opened without its backing file, whose data cannot be copied; open it with the backing file".into(),
                });
            }
            return Ok(None);
        };
        let g = self.geometry;
        Ok(Some(g.cluster_ceil(b.size()?.min(self.size()))))
    }

    fn header_names_backing(&self) -> bool {
        super::lock(&self.hs).header.has_backing_file()
    }

    /// Under the exclusive gate: if no cluster within the backing file's reach is unallocated,
    /// writes everything back (data flushed, then the entries, then flushed again) and removes
    /// the backing file from the header; otherwise returns the first unallocated offset.
    fn finish_stream(&self) -> Result<Option<u64>> {
        let _g = self.gate.write();
        self.check_writable()?;
        // `None`: no backing file (any more), nothing to remove.
        let Some(reach) = self.backing_reach()? else {
            return Ok(None);
        };
        let mut pos = 0;
        while pos < reach {
            let ext = self.lookup(pos, reach - pos)?;
            if ext.kind == ExtentKind::Unallocated {
                return Ok(Some(self.geometry.cluster_floor(pos)));
            }
            pos += ext.length;
        }
        qed_log!(
            Info,
            "{}: stream complete: removing the backing file",
            self.label()
        );
        // Every streamed entry reaches the disk (after its data) before the header that makes
        // unallocated clusters read as zeros: `change_backing_locked` writes back first.
        self.change_backing_locked(None, None)?;
        Ok(None)
    }

    /// Copy-on-read for a read of `len` bytes at `pos` that found them unallocated: copies the
    /// clusters they touch (within the backing file's reach) into the image. Returns whether
    /// anything was looked at (the caller then maps the range again). The caller holds the
    /// gate.
    pub(super) fn copy_for_read(&self, pos: u64, len: u64) -> Result<bool> {
        let Some(reach) = self.backing_reach()? else {
            return Ok(false);
        };
        let g = self.geometry;
        let a = g.cluster_floor(pos);
        let b = g.cluster_ceil(pos + len).min(reach);
        if a >= b {
            return Ok(false);
        }
        let mut at = a;
        while at < b {
            at += self.copy_up(at, b - at)?;
        }
        Ok(true)
    }

    /// Copies the still unallocated clusters of `len` bytes at the cluster-aligned `pos` from
    /// the backing file, under the range lock; returns the bytes handled (at least one
    /// cluster, at most to the end of the L2 table). The caller holds the gate.
    fn copy_up(&self, pos: u64, len: u64) -> Result<u64> {
        let g = self.geometry;
        let cb = g.cluster_bits();
        let cs = g.cluster_bytes();
        let batch = BATCH_BYTES.max(cs);
        let len = g.cluster_ceil(len.min(self.to_table_end(pos)).min(batch));
        let c0 = pos >> cb;
        let _range = self.ranges.lock(c0, c0 + (len >> cb));
        // Under the lock: a guest write that allocated these clusters first wins.
        let ext = self.lookup(pos, len)?;
        let len = g.cluster_ceil(ext.length);
        if ext.kind != ExtentKind::Unallocated {
            return Ok(len);
        }
        let Some(backing) = self.backing() else {
            return Ok(len);
        };
        let mut buf = vec![0u8; len as usize];
        backing.read_vectored(&mut [&mut buf], pos)?;
        self.mark_dirty()?;
        let is_zero = |i: u64| {
            buf[(i * cs) as usize..((i + 1) * cs) as usize]
                .iter()
                .all(|&b| b == 0)
        };
        let n = len >> cb;
        let mut i = 0;
        while i < n {
            let zero = is_zero(i);
            let mut j = i + 1;
            while j < n && is_zero(j) == zero {
                j += 1;
            }
            let at = pos + (i << cb);
            if zero {
                self.install_entries(at, &vec![L2_ZERO_CLUSTER; (j - i) as usize])?;
            } else {
                let host = self.allocate_clusters(j - i)?;
                add(&self.stats.clusters_allocated, j - i);
                self.storage
                    .write_at(&buf[(i * cs) as usize..(j * cs) as usize], host)
                    .map_err(|e| Error::io(format!("writing streamed clusters at {host:#x}"), e))?;
                // The entries are staged: the write-back flushes this data before them.
                let values: Vec<u64> = (0..j - i).map(|k| host + (k << cb)).collect();
                self.install_entries(at, &values)?;
            }
            i = j;
        }
        qed_log!(
            Trace,
            "{}: copied {n} clusters at guest {pos:#x} from the backing file",
            self.label()
        );
        Ok(len)
    }
}
