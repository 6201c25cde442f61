// SPDX-License-Identifier: MIT OR Apache-2.0
//! Where the bytes of an image live. The engine talks only to the [`Storage`] trait, so files,
//! memory and caller-provided I/O (the C API's `qed_open_with_io`) are interchangeable.
//!
//! Contract of every backend:
//! - reads and writes are complete: no short reads or writes are returned to the caller;
//! - a read past the end of the storage returns zeros for the missing part;
//! - a write past the end grows the storage (the gap reads as zeros);
//! - `flush` makes every completed write durable; `set_len` is separate from it and is made
//!   durable by the next `flush`; `write_vectored_at_fua` makes its own bytes durable;
//! - there is no alignment requirement on offsets, lengths or buffers;
//! - every method may be called from several threads at once.

pub mod fault;
pub mod file;
pub mod lock;
pub mod mem;
// Public only for qed-img's raw-file paths; not part of the API (hidden from the docs).
#[doc(hidden)]
pub mod sys;

pub use fault::{Fault, FaultCalls, FaultMode, FaultStorage};
pub use file::FileStorage;
pub use mem::{MemOp, MemStorage};

use std::io;

/// Byte-addressed storage for an image file.
pub trait Storage: Send + Sync {
    /// Reads `buf.len()` bytes at `offset`; bytes past the end read as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Reads into several buffers from consecutive bytes starting at `offset`.
    fn read_vectored_at(&self, bufs: &mut [&mut [u8]], mut offset: u64) -> io::Result<()> {
        for b in bufs.iter_mut() {
            self.read_at(b, offset)?;
            offset += b.len() as u64;
        }
        Ok(())
    }
    /// Writes several buffers to consecutive bytes starting at `offset`.
    fn write_vectored_at(&self, bufs: &[&[u8]], mut offset: u64) -> io::Result<()> {
        for b in bufs {
            self.write_at(b, offset)?;
            offset += b.len() as u64;
        }
        Ok(())
    }
    /// Writes several buffers like `write_vectored_at` and returns once they are durable: a
    /// write with force unit access, which need not make any other write durable (that is a
    /// `flush`). A failure leaves the bytes written or not, durable or not. The default writes,
    /// then flushes.
    fn write_vectored_at_fua(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        self.write_vectored_at(bufs, offset)?;
        self.flush()
    }
    /// Writes a small piece of image metadata (table entries). Same contract and durability as
    /// `write_at` (made durable by the next `flush`); a backend whose data I/O bypasses the
    /// page cache may route these through it, so that a table update costs no device round
    /// trip and needs no read-modify-write of a partly written block. The default is
    /// `write_at`.
    fn write_metadata_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_at(buf, offset)
    }
    /// Reads like `read_vectored_at`, but only if that needs no waiting for a device (data in
    /// the page cache, memory): `Ok(false)` means nothing useful was read and the caller must
    /// do a normal read (the buffers may have been written). The default never can.
    fn read_vectored_nowait(&self, bufs: &mut [&mut [u8]], offset: u64) -> io::Result<bool> {
        let _ = (bufs, offset);
        Ok(false)
    }
    /// For the library's asynchronous engine: the descriptor it may read (and, for `write`,
    /// write) itself, bypassing these methods. `None` (the default) keeps every request on
    /// these methods, as storage that counts, transforms or fails calls needs.
    #[doc(hidden)]
    fn direct_target(&self, write: bool) -> Option<DirectTarget> {
        let _ = write;
        None
    }
    /// Makes every completed write (and length change) durable.
    fn flush(&self) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the storage is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Sets the length; growing fills with zeros.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Grows the storage to `len` (never shrinks it), reserving space for the new part where
    /// the storage can, so that later writes there need no allocation of their own. The
    /// default is `set_len`.
    fn preallocate(&self, len: u64) -> io::Result<()> {
        if len > self.len()? {
            self.set_len(len)?;
        }
        Ok(())
    }
    /// Whether concurrent writes past the end grow the storage safely (no write is ever cut by
    /// another). When false, the engine extends the storage with `set_len` before writing there.
    fn grows_on_write(&self) -> bool {
        true
    }
    /// The first offset at or after `offset` that may hold data (not a hole), or `None` when
    /// only zeros follow. Lets scans of sparse files skip holes; the default knows no holes.
    fn data_from(&self, offset: u64) -> io::Result<Option<u64>> {
        Ok(Some(offset))
    }
    /// Gives the space of `len` bytes at `offset` back (a hole), keeping the length: they then
    /// read as zeros. Made durable by the next `flush`, like a write; a failure leaves the
    /// bytes old or zero. `ErrorKind::Unsupported` (or ENOTSUP/EOPNOTSUPP) when the storage
    /// cannot: the caller then writes zeros. The default cannot.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Err(io::ErrorKind::Unsupported.into())
    }
    /// Whether [`Storage::punch_hole`] is expected to work: false means it certainly fails as
    /// unsupported, so a caller that must not write zeros instead can refuse before it changes
    /// anything. The default (no `punch_hole`) says false.
    fn can_punch_hole(&self) -> bool {
        false
    }
    /// The first offset at or after `offset` that starts a hole (reads as zeros without
    /// storing them); the end of the storage counts as one, and an `offset` past the end is
    /// returned as it is. With `data_from`, tells a sparse file's data from its holes for block
    /// status; the default knows no holes (everything up to the end is data).
    fn hole_from(&self, offset: u64) -> io::Result<u64> {
        Ok(self.len()?.max(offset))
    }
}

/// Whether `e` says that a storage call does not exist (here, or on this file system).
pub(crate) fn is_unsupported(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Unsupported || sys::unsupported(e)
}

impl<S: Storage + ?Sized> Storage for std::sync::Arc<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn read_vectored_at(&self, bufs: &mut [&mut [u8]], offset: u64) -> io::Result<()> {
        (**self).read_vectored_at(bufs, offset)
    }
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        (**self).write_vectored_at(bufs, offset)
    }
    fn write_vectored_at_fua(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        (**self).write_vectored_at_fua(bufs, offset)
    }
    fn write_metadata_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_metadata_at(buf, offset)
    }
    fn read_vectored_nowait(&self, bufs: &mut [&mut [u8]], offset: u64) -> io::Result<bool> {
        (**self).read_vectored_nowait(bufs, offset)
    }
    fn direct_target(&self, write: bool) -> Option<DirectTarget> {
        (**self).direct_target(write)
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
    fn preallocate(&self, len: u64) -> io::Result<()> {
        (**self).preallocate(len)
    }
    fn grows_on_write(&self) -> bool {
        (**self).grows_on_write()
    }
    fn data_from(&self, offset: u64) -> io::Result<Option<u64>> {
        (**self).data_from(offset)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).punch_hole(offset, len)
    }
    fn can_punch_hole(&self) -> bool {
        (**self).can_punch_hole()
    }
    fn hole_from(&self, offset: u64) -> io::Result<u64> {
        (**self).hole_from(offset)
    }
}

/// Whether `offset` starts data or a hole in `storage`, and how far that reaches (at most
/// `len`), from [`Storage::data_from`] and [`Storage::hole_from`], as QEMU's file-posix driver
/// answers: at and past the end of the storage is a hole (so the partial sector after a file's
/// last byte is one), and storage that knows no holes is data up to its end.
// For qed-img's raw files; not a promise of the crate's API (issue 15 chooses its surface).
#[doc(hidden)]
pub fn sparse_status(storage: &dyn Storage, offset: u64, len: u64) -> io::Result<(bool, u64)> {
    if offset >= storage.len()? {
        return Ok((false, len));
    }
    let data = match storage.data_from(offset)? {
        None => return Ok((false, len)),
        Some(d) => d,
    };
    if data > offset {
        return Ok((false, (data - offset).min(len)));
    }
    let hole = storage.hole_from(offset)?;
    // (A hole at `offset` itself contradicts data_from, as a racing writer could make it:
    // call it data, which is never wrong.)
    if hole <= offset {
        return Ok((true, len));
    }
    Ok((true, (hole - offset).min(len)))
}

/// A descriptor the asynchronous engine reads and writes directly (see
/// [`Storage::direct_target`]).
#[doc(hidden)]
#[cfg_attr(not(qed_io_uring), allow(dead_code))]
pub struct DirectTarget {
    pub(crate) fd: std::os::fd::RawFd,
    /// Offsets, lengths and buffer addresses must be multiples of this (O_DIRECT).
    pub(crate) align: usize,
    /// Keeps the storage's own exclusive operations out until the I/O completes.
    pub(crate) _pin: Option<crate::sync::Pin>,
}
