// SPDX-License-Identifier: MIT OR Apache-2.0
//! Guest I/O: mapping guest ranges to where their bytes live, reads, writes (in place and
//! allocating, with copy-on-write from the backing file), write-zeroes and block status.

use super::l2cache::{Chunk, CHUNK_BYTES, CHUNK_ENTRIES};

/// Pieces of L2 table with staged entries at most before a write-back is forced.
const WRITEBACK_LIMIT: usize = 1024;
use super::stats::{add, Req};
use super::{lock, rlock, wlock, Image};
use crate::error::{Error, IoContext, Result};
use crate::log::qed_log;
use std::collections::VecDeque;
use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Where a guest range lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentKind {
    /// Allocated in this image; `host_offset` is the file offset of the extent's first byte.
    Data {
        /// File offset of the first byte.
        host_offset: u64,
    },
    /// A zero cluster: reads as zeros, whatever the backing file holds.
    Zero,
    /// Not allocated here: the backing file's bytes, or zeros without one.
    Unallocated,
}

/// A guest range of one kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Guest offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Where it lives.
    pub kind: ExtentKind,
}

static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// Slices covering `len` zero bytes.
fn zero_iov(len: u64) -> Vec<&'static [u8]> {
    let mut v = Vec::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(ZEROS.len() as u64) as usize;
        v.push(&ZEROS[..n]);
        left -= n as u64;
    }
    v
}

/// A cursor over caller buffers that hands out consecutive byte ranges as slices.
struct SgMut<'b> {
    segs: VecDeque<&'b mut [u8]>,
}

impl<'b> SgMut<'b> {
    fn new(bufs: &mut [&'b mut [u8]]) -> Self {
        SgMut {
            segs: bufs
                .iter_mut()
                .map(std::mem::take)
                .filter(|s| !s.is_empty())
                .collect(),
        }
    }
    fn take(&mut self, mut n: u64) -> Vec<&'b mut [u8]> {
        let mut out = Vec::new();
        while n > 0 {
            let s = self
                .segs
                .pop_front()
                .expect("cursor holds the request's bytes");
            if s.len() as u64 <= n {
                n -= s.len() as u64;
                out.push(s);
            } else {
                let (a, b) = s.split_at_mut(n as usize);
                out.push(a);
                self.segs.push_front(b);
                n = 0;
            }
        }
        out
    }
}

struct SgRef<'b> {
    segs: VecDeque<&'b [u8]>,
}

impl<'b> SgRef<'b> {
    fn new(bufs: &[&'b [u8]]) -> Self {
        SgRef {
            segs: bufs.iter().copied().filter(|s| !s.is_empty()).collect(),
        }
    }
    fn take(&mut self, mut n: u64) -> Vec<&'b [u8]> {
        let mut out = Vec::new();
        while n > 0 {
            let s = self
                .segs
                .pop_front()
                .expect("cursor holds the request's bytes");
            if s.len() as u64 <= n {
                n -= s.len() as u64;
                out.push(s);
            } else {
                let (a, b) = s.split_at(n as usize);
                out.push(a);
                self.segs.push_front(b);
                n = 0;
            }
        }
        out
    }
}

/// Per-request flags of a write (the block layer's request flags).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct WriteFlags(u32);

impl WriteFlags {
    /// No flags.
    pub const NONE: WriteFlags = WriteFlags(0);
    /// Force unit access: the write completes only when it is durable (NBD's `NBD_CMD_FLAG_FUA`,
    /// QEMU's `BDRV_REQ_FUA`).
    pub const FUA: WriteFlags = WriteFlags(1);
    /// Every flag this version knows.
    pub const ALL: WriteFlags = WriteFlags(1);

    /// The flags as bits (the values of the C API's `QED_REQ_*`).
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// The flags from bits; `None` when a bit this version does not know is set.
    pub const fn from_bits(bits: u32) -> Option<WriteFlags> {
        if bits & !Self::ALL.0 != 0 {
            None
        } else {
            Some(WriteFlags(bits))
        }
    }

    /// Whether every flag of `other` is set.
    pub const fn contains(self, other: WriteFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for WriteFlags {
    type Output = WriteFlags;
    fn bitor(self, o: WriteFlags) -> WriteFlags {
        WriteFlags(self.0 | o.0)
    }
}

/// Flags of a write-zeroes request (the block layer's `BDRV_REQ_MAY_UNMAP` and
/// `BDRV_REQ_NO_FALLBACK`; NBD's `NBD_CMD_FLAG_NO_HOLE` is the absence of the first and
/// `NBD_CMD_FLAG_FAST_ZERO` the second).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct WriteZeroesFlags(u32);

impl WriteZeroesFlags {
    /// No flags: [`Image::write_zeroes`].
    pub const NONE: WriteZeroesFlags = WriteZeroesFlags(0);
    /// Whole allocated clusters may give their space back to the host file system (a hole is
    /// punched, the cluster keeps its table entry and reads as zeros) instead of being
    /// overwritten with zeros.
    pub const MAY_UNMAP: WriteZeroesFlags = WriteZeroesFlags(1);
    /// Refuse with [`Error::Unsupported`] (ENOTSUP), changing nothing, rather than write zero
    /// bytes anywhere: a request is done only with table entries and punched holes, or not at
    /// all (NBD's fast zero: the client then writes the zeros itself, or not).
    pub const NO_FALLBACK: WriteZeroesFlags = WriteZeroesFlags(2);
    /// Every flag this version knows.
    pub const ALL: WriteZeroesFlags = WriteZeroesFlags(3);

    /// The flags as bits (the values of the C API's `QED_ZERO_*`).
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// The flags from bits; `None` when a bit this version does not know is set.
    pub const fn from_bits(bits: u32) -> Option<WriteZeroesFlags> {
        if bits & !Self::ALL.0 != 0 {
            None
        } else {
            Some(WriteZeroesFlags(bits))
        }
    }

    /// Whether every flag of `other` is set.
    pub const fn contains(self, other: WriteZeroesFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for WriteZeroesFlags {
    type Output = WriteZeroesFlags;
    fn bitor(self, o: WriteZeroesFlags) -> WriteZeroesFlags {
        WriteZeroesFlags(self.0 | o.0)
    }
}

/// One piece of a request that the asynchronous engine does itself.
#[cfg_attr(not(qed_io_uring), allow(dead_code))]
pub(crate) enum DirectPiece {
    /// Bytes of the image file.
    Host { host_offset: u64, len: u64 },
    /// Bytes that read as zeros (zero clusters, holes without a backing file).
    Zero { len: u64 },
}

/// A read, or an in-place write, that the engine issues straight to the image file. Holding
/// it keeps the image's exclusive operations (resize, repair, backing change, close) out until
/// the I/O is done, as the gate does for a synchronous request.
#[cfg_attr(not(qed_io_uring), allow(dead_code))]
pub(crate) struct DirectPlan {
    pub(crate) pieces: Vec<DirectPiece>,
    pub(crate) target: crate::storage::DirectTarget,
    _gate: crate::sync::Pin,
}

impl Image {
    /// Checks that `len` bytes at `offset` lie inside the virtual size (for callers that queue
    /// requests and want to refuse them up front).
    pub fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::OutOfRange { offset, len, size }),
        }
    }

    /// Reads `buf.len()` bytes at guest `offset`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_sg(offset, &mut [buf])
    }

    /// Writes `buf` at guest `offset`.
    pub fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.write_sg(offset, &[buf])
    }

    /// Reads consecutive guest bytes at `offset` into several buffers.
    pub fn readv_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        let mut v: Vec<&mut [u8]> = bufs.iter_mut().map(|b| &mut **b).collect();
        self.read_sg(offset, &mut v)
    }

    /// Writes several buffers to consecutive guest bytes at `offset`.
    pub fn writev_at(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        let v: Vec<&[u8]> = bufs.iter().map(|b| &**b).collect();
        self.write_sg(offset, &v)
    }

    /// Scatter-gather read: consecutive guest bytes at `offset` into `bufs`.
    pub fn read_sg(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Result<()> {
        let total = bufs.iter().map(|b| b.len() as u64).sum();
        let r = self.named(self.read_sg_unnamed(offset, bufs));
        self.account(Req::Read, offset, total, r)
    }

    fn read_sg_unnamed(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Result<()> {
        self.check_usable()?;
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.check_range(offset, total)?;
        let _g = self.gate.read();
        let mut cur = SgMut::new(bufs);
        let end = offset + total;
        let mut pos = offset;
        // Copy-on-read copies each range at most once, then maps it again.
        let mut copied_to = offset;
        while pos < end {
            let ext = self.lookup(pos, end - pos)?;
            if ext.kind == ExtentKind::Unallocated
                && pos >= copied_to
                && self.copy_on_read
                && self.is_writable()
                && self.copy_for_read(pos, ext.length)?
            {
                copied_to = pos + ext.length;
                continue;
            }
            let mut segs = cur.take(ext.length);
            match ext.kind {
                ExtentKind::Data { host_offset } => self
                    .storage
                    .read_vectored_at(&mut segs, host_offset)
                    .ctx(|| format!("reading data cluster at {host_offset:#x}"))?,
                ExtentKind::Zero => segs.iter_mut().for_each(|s| s.fill(0)),
                ExtentKind::Unallocated => match &*rlock(&self.backing) {
                    Some(b) => b.read_vectored(&mut segs, pos)?,
                    None => segs.iter_mut().for_each(|s| s.fill(0)),
                },
            }
            pos += ext.length;
        }
        Ok(())
    }

    /// Reads like [`Image::read_sg`] if that needs no waiting: every piece of L2 table it uses
    /// is cached, the data is in the page cache (or memory), nothing comes from a backing file
    /// and no check is running. `Ok(false)`: do a normal read (the buffers may have been
    /// written). Lets an event loop answer cached reads on its own thread.
    pub fn try_read_nowait(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Result<bool> {
        let total = bufs.iter().map(|b| b.len() as u64).sum();
        match self.try_read_nowait_uncounted(offset, bufs) {
            // A read that could not be done here is done (and counted) by the normal path.
            Ok(false) => Ok(false),
            r => self
                .account(Req::Read, offset, total, r.map(|_| ()))
                .map(|()| true),
        }
    }

    fn try_read_nowait_uncounted(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Result<bool> {
        self.check_usable()?;
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.check_range(offset, total)?;
        let Some(_g) = self.gate.try_read() else {
            return Ok(false);
        };
        let mut cur = SgMut::new(bufs);
        let end = offset + total;
        let mut pos = offset;
        while pos < end {
            let Some(ext) = self.lookup_inner(pos, end - pos, true)? else {
                return Ok(false);
            };
            let mut segs = cur.take(ext.length);
            match ext.kind {
                ExtentKind::Data { host_offset } => {
                    if !self
                        .storage
                        .read_vectored_nowait(&mut segs, host_offset)
                        .unwrap_or(false)
                    {
                        return Ok(false);
                    }
                }
                ExtentKind::Zero => segs.iter_mut().for_each(|s| s.fill(0)),
                ExtentKind::Unallocated => {
                    if rlock(&self.backing).is_some() {
                        return Ok(false);
                    }
                    segs.iter_mut().for_each(|s| s.fill(0));
                }
            }
            pos += ext.length;
        }
        Ok(true)
    }

    /// Writes `bufs` at guest `offset` with per-request `flags`. With [`WriteFlags::FUA`] the
    /// call returns only once the written bytes, and the table entries that lead to them, are
    /// durable (as if a flush followed, but without waiting for other requests' data where the
    /// format allows).
    ///
    /// An overwrite in place of clusters whose mapping is durable writes only its own bytes with
    /// force unit access (no flush of the image). Anything else (an allocation, a zero cluster,
    /// the backing file's bytes, or a mapping not yet flushed) is written as usual, then the
    /// image is flushed. A failed FUA write fails the handle, as a failed flush does.
    pub fn write_sg_flags(&self, offset: u64, bufs: &[&[u8]], flags: WriteFlags) -> Result<()> {
        if !flags.contains(WriteFlags::FUA) {
            return self.write_sg(offset, bufs);
        }
        let total = bufs.iter().map(|b| b.len() as u64).sum();
        let r = self.named(self.write_fua_unnamed(offset, total, bufs));
        self.account(Req::Write, offset, total, r)
    }

    fn write_fua_unnamed(&self, offset: u64, total: u64, bufs: &[&[u8]]) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, total)?;
        {
            let _g = self.gate.read();
            if let Some(extents) = self.durable_in_place(offset, total)? {
                let mut cur = SgRef::new(bufs);
                for (len, host) in extents {
                    let segs = cur.take(len);
                    // Data whose durability is unknown after an error: the fsync-after-error
                    // trap, as for a failed flush.
                    self.storage
                        .write_vectored_at_fua(&segs, host)
                        .map_err(|e| {
                            self.fail(Error::io(
                                format!("writing data cluster at {host:#x} (FUA)"),
                                e,
                            ))
                        })?;
                }
                return Ok(());
            }
            self.write_locked(offset, total, bufs)?;
        }
        self.writeback()
    }

    /// The file ranges (length, offset) that hold the guest range, if it is all allocated here
    /// and its mapping durable; `None` otherwise. Data mappings never change while the gate is
    /// held shared.
    fn durable_in_place(&self, offset: u64, total: u64) -> Result<Option<Vec<(u64, u64)>>> {
        let mut v: Vec<(u64, u64)> = Vec::new();
        let end = offset + total;
        let mut pos = offset;
        while pos < end {
            let ext = self.lookup(pos, end - pos)?;
            let ExtentKind::Data { host_offset } = ext.kind else {
                return Ok(None);
            };
            match v.last_mut() {
                Some((len, host)) if *host + *len == host_offset => *len += ext.length,
                _ => v.push((ext.length, host_offset)),
            }
            pos += ext.length;
        }
        // Asked after the lookups: the change that made each entry they saw is counted.
        Ok(self.wb.mapping_durable().then_some(v))
    }

    /// For the asynchronous engine: where the `total` bytes at `offset` live, if the engine can
    /// read them (or, for `write`, overwrite them in place) itself without waiting: every piece
    /// of table is cached, nothing comes from a backing file, a write allocates nothing, and the
    /// storage hands out its descriptor. `None`: the request takes the synchronous path, which
    /// also reports any error.
    ///
    /// With `fua` (a write with [`WriteFlags::FUA`]), only where the mapping is durable too: the
    /// engine then writes with RWF_DSYNC and reports the result through
    /// [`Image::finish_direct`], which fails the handle on an error as the synchronous FUA
    /// write does.
    #[cfg_attr(not(qed_io_uring), allow(dead_code))]
    pub(crate) fn plan_direct(
        &self,
        offset: u64,
        total: u64,
        write: bool,
        fua: bool,
    ) -> Option<DirectPlan> {
        if write {
            self.check_writable().ok()?;
        } else {
            self.check_usable().ok()?;
        }
        self.check_range(offset, total).ok()?;
        let gate = self.gate.try_pin()?;
        let target = self.storage.direct_target(write)?;
        let mut pieces = Vec::new();
        let end = offset + total;
        let mut pos = offset;
        while pos < end {
            let ext = self.lookup_inner(pos, end - pos, true).ok()??;
            pieces.push(match ext.kind {
                ExtentKind::Data { host_offset } => DirectPiece::Host {
                    host_offset,
                    len: ext.length,
                },
                ExtentKind::Zero if !write => DirectPiece::Zero { len: ext.length },
                ExtentKind::Unallocated if !write && rlock(&self.backing).is_none() => {
                    DirectPiece::Zero { len: ext.length }
                }
                _ => return None,
            });
            pos += ext.length;
        }
        // Asked after the lookups, as in `durable_in_place`.
        if fua && !self.wb.mapping_durable() {
            return None;
        }
        Some(DirectPlan {
            pieces,
            target,
            _gate: gate,
        })
    }

    /// Counts a request the engine did itself and names the image in its error.
    #[cfg_attr(not(qed_io_uring), allow(dead_code))]
    pub(crate) fn finish_direct(
        &self,
        write: bool,
        fua: bool,
        offset: u64,
        total: u64,
        r: Result<()>,
    ) -> Result<()> {
        // A FUA write whose durability is unknown: the fsync-after-error trap, as for a failed
        // flush.
        let r = match r {
            Err(e) if fua => Err(self.fail(e)),
            r => r,
        };
        let req = if write { Req::Write } else { Req::Read };
        self.account(req, offset, total, self.named(r))
    }

    /// Scatter-gather write: `bufs` to consecutive guest bytes at `offset`.
    pub fn write_sg(&self, offset: u64, bufs: &[&[u8]]) -> Result<()> {
        let total = bufs.iter().map(|b| b.len() as u64).sum();
        let r = self.named(self.write_sg_unnamed(offset, bufs));
        self.account(Req::Write, offset, total, r)
    }

    fn write_sg_unnamed(&self, offset: u64, bufs: &[&[u8]]) -> Result<()> {
        self.check_writable()?;
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.check_range(offset, total)?;
        let _g = self.gate.read();
        self.write_locked(offset, total, bufs)
    }

    fn write_locked(&self, offset: u64, total: u64, bufs: &[&[u8]]) -> Result<()> {
        let mut cur = SgRef::new(bufs);
        let end = offset + total;
        let mut pos = offset;
        while pos < end {
            let ext = self.lookup(pos, end - pos)?;
            match ext.kind {
                ExtentKind::Data { host_offset } => {
                    let segs = cur.take(ext.length);
                    self.storage
                        .write_vectored_at(&segs, host_offset)
                        .ctx(|| format!("writing data cluster at {host_offset:#x}"))?;
                    pos += ext.length;
                }
                _ => pos += self.allocate_write(pos, ext.length, &mut cur)?,
            }
        }
        Ok(())
    }

    /// Bytes from `pos` to the end of its 512-entry piece of L2 table.
    fn to_chunk_end(&self, pos: u64) -> u64 {
        let cb = self.geometry.cluster_bits();
        let in_chunk = self.geometry.l2_index(pos) % CHUNK_ENTRIES;
        let cluster_start = self.geometry.cluster_floor(pos);
        ((CHUNK_ENTRIES - in_chunk) << cb) - (pos - cluster_start)
    }

    /// Bytes from `pos` to the end of the guest range its L2 table maps.
    pub(super) fn to_table_end(&self, pos: u64) -> u64 {
        let bits = self.geometry.l2_coverage_bits();
        if bits >= 64 {
            return u64::MAX - pos;
        }
        let cov = 1u64 << bits;
        cov - (pos & (cov - 1))
    }

    /// Allocates clusters for the unallocated (or zero) run at `pos`, writes the caller's data
    /// with copy-on-write around it, then points the L2 entries at it. Returns the bytes written,
    /// or 0 when another writer allocated the clusters first (the caller then writes in place).
    fn allocate_write(&self, pos: u64, len: u64, cur: &mut SgRef<'_>) -> Result<u64> {
        let g = self.geometry;
        let cb = g.cluster_bits();
        // A run may span pieces of a table that does not exist yet (so the whole run is
        // allocated before the table, as QEMU lays files out), but never two tables.
        let len = len.min(self.to_table_end(pos));
        let c0 = pos >> cb;
        let c1 = (pos + len - 1) >> cb;
        let _range = self.ranges.lock(c0, c1 + 1);
        let ext = self.lookup(pos, len)?;
        if let ExtentKind::Data { .. } = ext.kind {
            return Ok(0);
        }
        let len = ext.length;
        let c1 = (pos + len - 1) >> cb;
        let n = c1 - c0 + 1;
        self.mark_dirty()?;
        let backing = match ext.kind {
            ExtentKind::Unallocated => rlock(&self.backing).clone(),
            _ => None,
        };
        let host = self.allocate_clusters(n)?;
        add(&self.stats.clusters_allocated, n);
        qed_log!(
            Debug,
            "{}: allocated {n} clusters at {host:#x} for guest {:#x}",
            self.label(),
            c0 << cb
        );
        let cstart = c0 << cb;
        let head = pos - cstart;
        let end = pos + len;
        let tail = ((c1 + 1) << cb) - end;
        let data = cur.take(len);
        // Fresh clusters lie past the old end of the file and read as zeros, so only backing
        // bytes need copying; zeros are never written.
        let mut head_buf = Vec::new();
        let mut tail_buf = Vec::new();
        if let Some(b) = &backing {
            if head > 0 {
                head_buf = vec![0u8; head as usize];
                b.read_vectored(&mut [&mut head_buf], cstart)?;
            }
            if tail > 0 {
                tail_buf = vec![0u8; tail as usize];
                b.read_vectored(&mut [&mut tail_buf], end)?;
            }
        }
        let mut iov: Vec<&[u8]> = Vec::with_capacity(data.len() + 2);
        let start = if head_buf.is_empty() {
            host + head
        } else {
            host
        };
        if !head_buf.is_empty() {
            iov.push(&head_buf);
        }
        iov.extend(data);
        if !tail_buf.is_empty() {
            iov.push(&tail_buf);
        }
        self.storage
            .write_vectored_at(&iov, start)
            .ctx(|| format!("writing new clusters at {host:#x}"))?;
        // No flush here: the L2 entries are only staged; the write-back flushes this data before
        // writing them (QEMU flushes before every L2 update when there is a backing file).
        let values: Vec<u64> = (0..n).map(|i| host + (i << cb)).collect();
        self.install_entries(pos, &values)?;
        Ok(len)
    }

    /// Takes `n` clusters from the end of the file. The file always covers whole allocated
    /// clusters before anything points at them: QEMU takes a file that ends inside a cluster
    /// as ending before it, so an entry written (or surviving a killed process) while the data
    /// write had grown the file only part way would be "outside the file" to QEMU, whose repair
    /// then drops it. To keep that cheap the file is extended ahead by a stretch (1/8 of the
    /// file, 1 to 64 MiB): storage that grows by writes gets a sparse `set_len`, storage that
    /// cannot (O_DIRECT) reserved blocks, so that most allocations need no syscall of their own
    /// and their writes run in parallel in the file system. Close and check cut the file back
    /// to the last cluster; after a crash the repair on open reclaims the stretch as trailing
    /// leaked clusters (QEMU reports them as leaks, harmless).
    pub(super) fn allocate_clusters(&self, n: u64) -> Result<u64> {
        let bytes = n << self.geometry.cluster_bits();
        let mut next = lock(&self.alloc);
        let start = *next;
        let end = start
            .checked_add(bytes)
            .filter(|&e| e <= i64::MAX as u64)
            .ok_or_else(|| {
                Error::io(
                    "allocating clusters",
                    std::io::Error::from_raw_os_error(libc::EFBIG),
                )
            })?;
        if end > self.extended_to.load(Ordering::Acquire) {
            let stretch = (end / 8).clamp(1 << 20, 64 << 20);
            let target = self
                .geometry
                .cluster_ceil(end + stretch)
                .min(self.geometry.cluster_floor(i64::MAX as u64))
                .max(end);
            // Nothing is ever written past `extended_to` (allocations stay below it), so this
            // only grows the file.
            if self.grows_on_write {
                self.storage.set_len(target)
            } else {
                self.storage.preallocate(target)
            }
            .ctx(|| format!("extending image file to {target:#x}"))?;
            qed_log!(
                Trace,
                "{}: extended the image file to {target:#x}",
                self.label()
            );
            self.extended_to.store(target, Ordering::Release);
        }
        *next = end;
        self.alloc_end.store(end, Ordering::Release);
        Ok(start)
    }

    /// Points the L2 entries of the clusters starting at guest `pos` (all in one L2 table) at
    /// `values`, creating the table if needed. The data must already be written.
    pub(super) fn install_entries(&self, pos: u64, values: &[u64]) -> Result<()> {
        let g = self.geometry;
        let l1i = g.l1_index(pos) as usize;
        let l2i = g.l2_index(pos);
        debug_assert!(l2i + values.len() as u64 <= g.table_entries());
        // Split into pieces of the table: (piece index, first entry in it, values).
        let mut segs: Vec<(u64, usize, &[u64])> = Vec::new();
        let mut k = 0usize;
        while k < values.len() {
            let idx = l2i + k as u64;
            let first = (idx % CHUNK_ENTRIES) as usize;
            let n = (CHUNK_ENTRIES as usize - first).min(values.len() - k);
            segs.push((idx / CHUNK_ENTRIES, first, &values[k..k + n]));
            k += n;
        }
        let table = rlock(&self.l1).entries[l1i];
        if table == 0 && self.create_table(l1i, &segs)? {
            return Ok(());
        }
        // The table exists (possibly created by another writer just now).
        let table = rlock(&self.l1).entries[l1i];
        if self.write_through.load(Ordering::Acquire) {
            // No backing file: the entries are written now (no flush), so a completed write
            // survives the death of the process, as with QEMU. Another request may use a cached
            // entry before its piece is written (a write in place completes through it), so
            // `staging` is held until it is: a flush takes it exclusively before it syncs.
            let _s = rlock(&self.wb.staging);
            self.wb.meta_changed();
            for &(ci, first, vals) in &segs {
                let chunk = self.chunk(table, ci)?;
                chunk.stage(first, vals);
                self.wb.write_through((table, ci), &chunk)?;
            }
            return Ok(());
        }
        // With a backing file, stage them: the next flush (or the write-back timer) writes them
        // back after the data is durable.
        let staged = {
            let _s = rlock(&self.wb.staging);
            self.wb.meta_changed();
            let mut staged = 0;
            for &(ci, first, vals) in &segs {
                let chunk = self.chunk(table, ci)?;
                chunk.stage(first, vals);
                staged = self.wb.queue((table, ci), &chunk);
            }
            staged
        };
        if staged >= WRITEBACK_LIMIT {
            // Bound the memory pinned by staged entries: write them back now.
            self.writeback()?;
        }
        Ok(())
    }

    /// Creates the L2 table for L1 index `l1i` holding the entries of `segs`. Returns false if
    /// another writer created it first.
    fn create_table(&self, l1i: usize, segs: &[(u64, usize, &[u64])]) -> Result<bool> {
        let g = self.geometry;
        let _t = lock(&self.table_alloc);
        if rlock(&self.l1).entries[l1i] != 0 {
            return Ok(false);
        }
        let t = self.allocate_clusters(g.table_size as u64)?;
        add(&self.stats.l2_tables_allocated, 1);
        qed_log!(
            Debug,
            "{}: new L2 table at {t:#x} for L1[{l1i}]",
            self.label()
        );
        {
            let mut tables = wlock(&self.l2_tables);
            let i = tables.partition_point(|&v| v < t);
            tables.insert(i, t);
        }
        wlock(&self.session_tables).insert(t);
        // Write the sectors holding the new entries; the rest of the table reads as zeros from
        // the extended file.
        let mut chunks = Vec::with_capacity(segs.len());
        for &(ci, first, vals) in segs {
            let mut raw = vec![0u64; CHUNK_ENTRIES as usize];
            raw[first..first + vals.len()].copy_from_slice(vals);
            let chunk = Chunk::new(&raw, &[]);
            let s0 = first / 64 * 64;
            let s1 = (first + vals.len()).next_multiple_of(64);
            let at = t + ci * CHUNK_BYTES + s0 as u64 * 8;
            qed_log!(
                Trace,
                "{}: writing L2 table piece at {at:#x} (new table)",
                self.label()
            );
            add(&self.stats.l2_writes, 1);
            self.storage
                .write_metadata_at(&chunk.encode(s0..s1), at)
                .ctx(|| format!("writing new L2 table at {t:#x}"))?;
            chunks.push((ci, chunk));
        }
        self.sync()?;
        for (ci, chunk) in chunks {
            self.l2.insert_new((t, ci), chunk);
        }
        let sector = l1i / 64 * 64;
        let bytes = {
            let l1 = rlock(&self.l1);
            let mut entries = l1.entries[sector..sector + 64].to_vec();
            entries[l1i - sector] = t;
            let mut b = Vec::with_capacity(512);
            crate::format::table::encode_entries(entries, &mut b);
            b
        };
        let at = self.l1_offset + sector as u64 * 8;
        // A failed write may have changed the sector or not: the handle can no longer know
        // what the file's L1 table says.
        self.storage
            .write_metadata_at(&bytes, at)
            .map_err(|e| self.fail(Error::io(format!("writing L1 table at {at:#x}"), e)))?;
        self.wb.meta_changed();
        wlock(&self.l1).entries[l1i] = t;
        Ok(true)
    }

    /// The chunk `ci` of the L2 table at `table`, from the cache or the file.
    fn chunk(&self, table: u64, ci: u64) -> Result<Arc<Chunk>> {
        let mut loaded = false;
        let r = self.l2.get((table, ci), || {
            loaded = true;
            self.load_chunk(table, ci)
        });
        if loaded {
            add(&self.stats.l2_cache_misses, 1);
            qed_log!(
                Trace,
                "{}: L2 cache miss: loaded table {table:#x} piece {ci}",
                self.label()
            );
        } else {
            add(&self.stats.l2_cache_hits, 1);
        }
        r
    }

    fn load_chunk(&self, table: u64, ci: u64) -> Result<Chunk> {
        let at = table + ci * CHUNK_BYTES;
        let mut bytes = vec![0u8; CHUNK_BYTES as usize];
        self.storage
            .read_at(&mut bytes, at)
            .ctx(|| format!("reading L2 table at {at:#x}"))?;
        let mut raw = Vec::with_capacity(CHUNK_ENTRIES as usize);
        crate::format::table::decode_entries(&bytes, &mut raw);
        // Entries past the file as it was opened can only be ours if this piece was validated
        // before, or belongs to a table this session created.
        let trusted = rlock(&self.session_tables).contains(&table)
            || !lock(&self.validated).insert((table, ci));
        let limit = if trusted {
            self.alloc_end.load(Ordering::Acquire)
        } else {
            self.open_eof.load(Ordering::Acquire)
        };
        let bad: Vec<usize> = raw
            .iter()
            .enumerate()
            .filter(|&(_, &e)| e > crate::format::L2_ZERO_CLUSTER && !self.data_offset_ok(e, limit))
            .map(|(i, _)| i)
            .collect();
        Ok(Chunk::new(&raw, &bad))
    }

    /// Whether a data cluster offset is aligned, starts inside the file (before `limit`), and
    /// does not overlap the header, the L1 table or any L2 table.
    fn data_offset_ok(&self, e: u64, limit: u64) -> bool {
        let g = self.geometry;
        let tb = g.table_bytes();
        if !g.is_cluster_aligned(e) || e < self.header_bytes || e >= limit {
            return false;
        }
        if e >= self.l1_offset && e < self.l1_offset + tb {
            return false;
        }
        let tables = rlock(&self.l2_tables);
        let i = tables.partition_point(|&t| t <= e);
        !(i > 0 && e < tables[i - 1] + tb)
    }

    /// The extent at guest `pos` (inside the image), at most `max_len` bytes, within one L2
    /// table and, when the table exists, one 512-entry piece of it.
    pub(super) fn lookup(&self, pos: u64, max_len: u64) -> Result<Extent> {
        match self.lookup_inner(pos, max_len, false)? {
            Some(e) => Ok(e),
            None => Err(Error::Failed(format!(
                "internal error: lookup at {pos:#x} found no L2 chunk"
            ))),
        }
    }

    /// The extent at `pos`; with `cached_only`, `None` when its piece of L2 table is not in
    /// the cache (nothing is loaded).
    fn lookup_inner(&self, pos: u64, max_len: u64, cached_only: bool) -> Result<Option<Extent>> {
        let g = self.geometry;
        let cb = g.cluster_bits();
        let cs = g.cluster_bytes();
        let l1i = g.l1_index(pos) as usize;
        let (table, bad) = {
            let l1 = rlock(&self.l1);
            (l1.entries[l1i], l1.bad[l1i])
        };
        if bad {
            return Err(Error::Corrupt {
                what: "L1 table entry",
                offset: table,
                reason: format!(
                    "L1[{l1i}] (mapping guest offset {pos:#x}) is unaligned, outside the file or overlaps other metadata; run a check with repair"
                ),
            });
        }
        let end = pos.saturating_add(max_len);
        if table == 0 {
            let table_end = if g.l2_coverage_bits() >= 64 {
                u64::MAX
            } else {
                let cov = g.l2_coverage();
                (pos & !(cov - 1)).saturating_add(cov)
            };
            let len = end.min(table_end) - pos;
            return Ok(Some(Extent {
                offset: pos,
                length: len,
                kind: ExtentKind::Unallocated,
            }));
        }
        let limit = end.min(pos.saturating_add(self.to_chunk_end(pos)));
        let l2i = g.l2_index(pos);
        let ci = l2i / CHUNK_ENTRIES;
        let i0 = (l2i % CHUNK_ENTRIES) as usize;
        let chunk = if cached_only {
            match self.l2.get_cached((table, ci)) {
                Some(c) => {
                    add(&self.stats.l2_cache_hits, 1);
                    c
                }
                None => return Ok(None),
            }
        } else {
            self.chunk(table, ci)?
        };
        let corrupt = |i: usize, e: u64| {
            Error::Corrupt {
            what: "L2 table entry",
            offset: table + ci * CHUNK_BYTES + i as u64 * 8,
            reason: format!(
                "entry {e:#x} for guest offset {:#x} is unaligned, outside the file or points at metadata; run a check with repair",
                g.cluster_floor(pos) + ((i - i0) as u64) * cs
            ),
        }
        };
        if chunk.is_bad(i0) {
            return Err(corrupt(i0, chunk.get(i0)));
        }
        let first = chunk.get(i0);
        let kind_of = |e: u64| match crate::format::L2Entry::from_raw(e) {
            crate::format::L2Entry::Unallocated => ExtentKind::Unallocated,
            crate::format::L2Entry::Zero => ExtentKind::Zero,
            crate::format::L2Entry::Data(h) => ExtentKind::Data { host_offset: h },
        };
        let cluster_start = g.cluster_floor(pos);
        let mut n = 1u64;
        let mut next = cluster_start + cs;
        while next < limit {
            let i = i0 + n as usize;
            let e = chunk.get(i);
            if chunk.is_bad(i) {
                break;
            }
            let same = match (kind_of(first), kind_of(e)) {
                (ExtentKind::Data { host_offset: a }, ExtentKind::Data { host_offset: b }) => {
                    b == a + (n << cb)
                }
                (a, b) => a == b,
            };
            if !same {
                break;
            }
            n += 1;
            next += cs;
        }
        let length = next.min(limit) - pos;
        let kind = match kind_of(first) {
            ExtentKind::Data { host_offset } => ExtentKind::Data {
                host_offset: host_offset + (pos - cluster_start),
            },
            k => k,
        };
        Ok(Some(Extent {
            offset: pos,
            length,
            kind,
        }))
    }

    /// Makes `len` guest bytes at `offset` read as zeros. Whole unallocated clusters become zero
    /// clusters (no data written); allocated ones are overwritten with zeros in place, as QEMU
    /// does; partial clusters at the ends are written with zeros.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let r = self.named(self.write_zeroes_unnamed(offset, len));
        self.account(Req::WriteZeroes, offset, len, r)
    }

    fn write_zeroes_unnamed(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let _g = self.gate.read();
        self.zero_locked(offset, len)
    }

    /// [`Image::write_zeroes`] without argument checks; the caller holds the gate. The range may
    /// lie past the virtual size as long as its L1 entries are loaded (truncate uses that).
    pub(super) fn zero_locked(&self, offset: u64, len: u64) -> Result<()> {
        let g = self.geometry;
        let end = offset + len;
        let a = g.cluster_ceil(offset).min(end);
        let b = g.cluster_floor(end).max(a);
        if a > offset {
            self.write_locked(offset, a - offset, &zero_iov(a - offset))?;
        }
        let mut pos = a;
        while pos < b {
            let ext = self.lookup(pos, b - pos)?;
            match ext.kind {
                ExtentKind::Data { .. } => {
                    self.write_locked(pos, ext.length, &zero_iov(ext.length))?;
                    pos += ext.length;
                }
                ExtentKind::Zero => pos += ext.length,
                ExtentKind::Unallocated => pos += self.zero_clusters(pos, ext.length)?,
            }
        }
        if end > b {
            self.write_locked(b, end - b, &zero_iov(end - b))?;
        }
        Ok(())
    }

    /// Turns the unallocated whole clusters at `pos` into zero clusters; returns the bytes done
    /// (0 if another writer changed them first).
    fn zero_clusters(&self, pos: u64, len: u64) -> Result<u64> {
        let cb = self.geometry.cluster_bits();
        let len = len.min(self.to_chunk_end(pos));
        let c0 = pos >> cb;
        let _range = self.ranges.lock(c0, c0 + (len >> cb));
        let ext = self.lookup(pos, len)?;
        if ext.kind != ExtentKind::Unallocated {
            return Ok(0);
        }
        self.mark_dirty()?;
        let values = vec![crate::format::L2_ZERO_CLUSTER; (ext.length >> cb) as usize];
        self.install_entries(pos, &values)?;
        Ok(ext.length)
    }

    /// Discards `len` guest bytes at `offset`: afterwards they read as zeros (also over a
    /// backing file), and whole data clusters give their space back to the host file system.
    ///
    /// Whole clusters: allocated ones keep their table entry (so nothing leaks and the image
    /// stays consistent for QEMU) and get a hole punched in the image file; unallocated ones
    /// over a backing file become zero clusters; unallocated ones without a backing file and
    /// zero clusters stay as they are. Partial clusters at the ends are written with zeros
    /// (unless they already read as zeros without a backing file's help). Where the storage
    /// cannot punch holes, allocated clusters are overwritten with zeros as by
    /// [`Image::write_zeroes`]. The same as [`Image::write_zeroes_flags`] with
    /// [`WriteZeroesFlags::MAY_UNMAP`], counted as a discard.
    ///
    /// Ordering: the request holds the gate shared (so no resize, repair or backing change
    /// overlaps it) and the range lock of the clusters it changes, so an allocating write to
    /// the same cluster runs wholly before or after that cluster's change. A write in place
    /// (synchronous or the io_uring engine's) takes no range lock; against a punch it is
    /// ordered per file-system block by the kernel, and the storage keeps its O_DIRECT
    /// read-modify-writes (and the ring's aligned writes in flight) out of a punch, so each
    /// block of an overlapping write lands wholly before or after the hole. Durable after the
    /// next flush, like a write: a crash before it leaves each byte old or zero.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let r = self.named(self.zero_checked(offset, len, WriteZeroesFlags::MAY_UNMAP));
        self.account(Req::Discard, offset, len, r)
    }

    /// [`Image::write_zeroes`] with request flags: [`WriteZeroesFlags::MAY_UNMAP`] lets whole
    /// allocated clusters be punched (as [`Image::discard`] does) instead of overwritten, and
    /// [`WriteZeroesFlags::NO_FALLBACK`] refuses with [`Error::Unsupported`] (ENOTSUP) before
    /// anything changes when the request would need zero bytes written: a partial cluster that
    /// does not already read as zeros on its own, or an allocated cluster without MAY_UNMAP or
    /// on storage that cannot punch holes. Unlike [`Image::write_zeroes`] (kept as it is),
    /// unallocated clusters of an image without a backing file are left as they are.
    ///
    /// A write that allocates a cluster of the range after the check and before its zeroing
    /// is ordered before the zeroing: with NO_FALLBACK its cluster is punched even without
    /// MAY_UNMAP (the one way to zero it without writing), and on storage that cannot punch the
    /// request then fails with ENOTSUP, having zeroed the clusters before it.
    pub fn write_zeroes_flags(&self, offset: u64, len: u64, flags: WriteZeroesFlags) -> Result<()> {
        let r = self.named(self.zero_checked(offset, len, flags));
        self.account(Req::WriteZeroes, offset, len, r)
    }

    fn zero_checked(&self, offset: u64, len: u64, flags: WriteZeroesFlags) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let _g = self.gate.read();
        let unmap = flags.contains(WriteZeroesFlags::MAY_UNMAP) && self.storage.can_punch_hole();
        if flags.contains(WriteZeroesFlags::NO_FALLBACK) {
            self.check_no_fallback(offset, len, unmap)?;
        }
        self.zero_unmap_locked(offset, len, flags, unmap)
    }

    /// Whether the guest bytes of `ext` already read as zeros with no change.
    fn reads_zero_as_is(&self, ext: &Extent) -> bool {
        match ext.kind {
            ExtentKind::Zero => true,
            ExtentKind::Unallocated => rlock(&self.backing).is_none(),
            ExtentKind::Data { .. } => false,
        }
    }

    /// Refuses (changing nothing) a NO_FALLBACK request that would have to write zero bytes.
    fn check_no_fallback(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let g = self.geometry;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let ext = self.lookup(pos, end - pos)?;
            let whole = g.cluster_floor(pos) == pos && ext.length >= g.cluster_bytes();
            let ok = self.reads_zero_as_is(&ext)
                || (whole && ext.kind == ExtentKind::Unallocated)
                || (whole && unmap);
            if !ok {
                let reason = match ext.kind {
                    ExtentKind::Data { .. } if whole => {
                        if self.storage.can_punch_hole() {
                            "allocated clusters would be overwritten with zeros (no MAY_UNMAP)"
                        } else {
                            "allocated clusters would be overwritten with zeros (the image's storage cannot punch holes)"
                        }
                    }
                    _ => "part of a cluster would be written with zeros",
                };
                return Err(Error::Unsupported {
                    field: "write zeroes without fallback at guest offset",
                    value: pos,
                    reason: reason.into(),
                });
            }
            pos += ext.length;
        }
        Ok(())
    }

    /// Zeroes the range under the gate: partial clusters written with zeros where they do not
    /// already read as zeros, whole ones as [`Image::discard`] describes (punched only with
    /// `unmap`).
    fn zero_unmap_locked(
        &self,
        offset: u64,
        len: u64,
        flags: WriteZeroesFlags,
        unmap: bool,
    ) -> Result<()> {
        let g = self.geometry;
        let no_fallback = flags.contains(WriteZeroesFlags::NO_FALLBACK);
        let end = offset + len;
        let a = g.cluster_ceil(offset).min(end);
        let b = g.cluster_floor(end).max(a);
        // Partial clusters (checked already with NO_FALLBACK; a race into them is ordered
        // before this request, and then its bytes are overwritten as any write's would be).
        let partial = |from: u64, to: u64| -> Result<()> {
            if from >= to {
                return Ok(());
            }
            let ext = self.lookup(from, to - from)?;
            if ext.length == to - from && self.reads_zero_as_is(&ext) {
                return Ok(());
            }
            if no_fallback {
                return Err(Error::Unsupported {
                    field: "write zeroes without fallback at guest offset",
                    value: from,
                    reason: "a write allocated the partial cluster during the request".into(),
                });
            }
            self.write_locked(from, to - from, &zero_iov(to - from))
        };
        partial(offset, a)?;
        let mut pos = a;
        while pos < b {
            let ext = self.lookup(pos, b - pos)?;
            match ext.kind {
                ExtentKind::Data { host_offset } => {
                    // With NO_FALLBACK the check passed, so this cluster was allocated since:
                    // punching is the only way left to zero it without writing.
                    if (unmap || no_fallback) && self.punch(pos, ext.length, host_offset)? {
                        pos += ext.length;
                        continue;
                    }
                    if no_fallback {
                        return Err(Error::Unsupported {
                            field: "write zeroes without fallback at guest offset",
                            value: pos,
                            reason: "the image's storage cannot punch holes".into(),
                        });
                    }
                    self.write_locked(pos, ext.length, &zero_iov(ext.length))?;
                    pos += ext.length;
                }
                ExtentKind::Zero => pos += ext.length,
                ExtentKind::Unallocated if rlock(&self.backing).is_none() => pos += ext.length,
                // 0 when a writer allocated it first: the next lookup sees its data.
                ExtentKind::Unallocated => pos += self.zero_clusters(pos, ext.length)?,
            }
        }
        partial(b, end)
    }

    /// Punches the whole data clusters of the guest range at `pos` (contiguous in the file at
    /// `host`): they keep their table entries and read as zeros. False (nothing changed) when
    /// the storage turns out not to punch holes.
    fn punch(&self, pos: u64, len: u64, host: u64) -> Result<bool> {
        let cb = self.geometry.cluster_bits();
        let c0 = pos >> cb;
        // Data mappings do not change under the shared gate; the range lock orders the punch
        // with whatever else changes these clusters under it (allocation, zeroing).
        let _range = self.ranges.lock(c0, c0 + (len >> cb));
        match self.storage.punch_hole(host, len) {
            Ok(()) => {
                add(&self.stats.clusters_punched, len >> cb);
                qed_log!(
                    Trace,
                    "{}: punched {len:#x} bytes at {host:#x} for guest {pos:#x}",
                    self.label()
                );
                Ok(true)
            }
            Err(e) if crate::storage::is_unsupported(&e) => Ok(false),
            Err(e) => Err(Error::io(
                format!("punching a hole in data clusters at {host:#x}"),
                e,
            )),
        }
    }

    /// Gives back the space of every data cluster that reads as zeros (a hole is punched; the
    /// cluster keeps its entry and still reads as zeros), for an image whose guest wrote zeros
    /// over data. Returns the number of clusters punched (clusters already holes in the file
    /// are not counted). Each 512-cluster piece of table is done with the gate held
    /// exclusively, so concurrent requests wait for that piece rather than race with it.
    /// [`Error::Unsupported`] when the storage cannot punch holes.
    pub fn sparsify(&self) -> Result<u64> {
        self.named(self.sparsify_unnamed())
    }

    fn sparsify_unnamed(&self) -> Result<u64> {
        self.check_writable()?;
        if !self.storage.can_punch_hole() {
            return Err(Error::Unsupported {
                field: "sparsify",
                value: 0,
                reason: "the image's storage cannot punch holes".into(),
            });
        }
        let cs = self.geometry.cluster_bytes();
        let mut buf = vec![0u8; cs as usize];
        let mut punched = 0;
        let mut pos = 0;
        loop {
            let _g = self.gate.write();
            let size = self.size();
            if pos >= size {
                return Ok(punched);
            }
            let piece_end = size.min(pos + self.to_chunk_end(pos));
            while pos < piece_end {
                let ext = self.lookup(pos, piece_end - pos)?;
                let ExtentKind::Data { host_offset } = ext.kind else {
                    pos += ext.length;
                    continue;
                };
                // Whole clusters (the piece starts and ends on cluster boundaries; the virtual
                // size may not, and the tail of its last cluster is the image's own).
                let mut c = 0;
                while c < ext.length {
                    let host = host_offset + c;
                    let hole = match self.storage.data_from(host) {
                        Ok(None) => true,
                        Ok(Some(d)) => d >= host + cs,
                        Err(_) => false,
                    };
                    if !hole {
                        self.storage
                            .read_at(&mut buf, host)
                            .ctx(|| format!("reading data cluster at {host:#x}"))?;
                        if buf.iter().all(|&x| x == 0) && self.punch(pos + c, cs, host)? {
                            punched += 1;
                        }
                    }
                    c += cs;
                }
                pos += ext.length;
            }
        }
    }

    /// The extent at guest `offset`, at most `len` bytes, merged across L2 tables while the kind
    /// stays the same (data extents also stay contiguous in the file).
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.check_status_args(offset, len)?;
        let _g = self.gate.read();
        let end = offset + len;
        let mut ext = self.lookup(offset, len)?;
        while ext.offset + ext.length < end {
            let next = self.lookup(ext.offset + ext.length, end - ext.offset - ext.length)?;
            let joins = match (ext.kind, next.kind) {
                (ExtentKind::Data { host_offset: a }, ExtentKind::Data { host_offset: b }) => {
                    b == a + ext.length
                }
                (a, b) => a == b,
            };
            if !joins {
                break;
            }
            ext.length += next.length;
        }
        Ok(ext)
    }

    /// Every extent of `[offset, offset + len)`, in order.
    pub fn map(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.collect_extents(offset, len, |p, l| {
            self.block_status(p, l).map(|e| (e, e.length))
        })
    }
}
