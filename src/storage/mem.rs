// SPDX-License-Identifier: MIT OR Apache-2.0
//! An in-memory, sparse [`Storage`], optionally recording every write, flush and length change so
//! that tests can rebuild the disk as it could be after a power loss at any point.

use super::Storage;
use std::collections::BTreeMap;
use std::io;
use std::sync::{Mutex, MutexGuard, PoisonError};

const PAGE: u64 = 64 * 1024;

/// One recorded operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemOp {
    /// Bytes written at an offset.
    Write {
        /// Offset.
        offset: u64,
        /// Bytes.
        data: Vec<u8>,
    },
    /// Bytes written with force unit access (`write_vectored_at_fua`): durable once written,
    /// unlike the writes before it that no flush covered.
    DurableWrite {
        /// Offset.
        offset: u64,
        /// Bytes.
        data: Vec<u8>,
    },
    /// A completed flush.
    Flush,
    /// A length change.
    SetLen(u64),
    /// A hole punched (`punch_hole`): the bytes inside the length read as zeros once it lands;
    /// lost in a crash, they keep their old values. Never changes the length.
    PunchHole {
        /// Offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
}

#[derive(Default)]
struct Inner {
    pages: BTreeMap<u64, Box<[u8]>>,
    len: u64,
    log: Option<Vec<MemOp>>,
}

/// Sparse in-memory storage; pages that were never written read as zeros.
#[derive(Default)]
pub struct MemStorage {
    inner: Mutex<Inner>,
    /// Behave like an O_DIRECT file: the engine must extend the file before writing past it.
    fixed_length: std::sync::atomic::AtomicBool,
    /// Refuse `punch_hole` as unsupported (tests of the write-zeros fallback).
    no_punch: std::sync::atomic::AtomicBool,
}

impl MemStorage {
    /// An empty storage.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty storage that records every operation.
    pub fn recording() -> Self {
        let s = Self::default();
        s.lock().log = Some(Vec::new());
        s
    }

    /// A storage holding `bytes`.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let s = Self::default();
        s.write_at(bytes, 0).expect("memory write cannot fail");
        s
    }

    /// Makes [`Storage::grows_on_write`] false, as for an O_DIRECT file, so the engine extends
    /// the file with `set_len` before it writes new clusters (tests of that path).
    pub fn set_fixed_length(&self, fixed: bool) {
        self.fixed_length
            .store(fixed, std::sync::atomic::Ordering::Relaxed);
    }

    /// Makes [`Storage::punch_hole`] fail as unsupported (or work again), as on a file system
    /// without hole punching (tests of the fallback that writes zeros).
    pub fn set_punch_supported(&self, supported: bool) {
        self.no_punch
            .store(!supported, std::sync::atomic::Ordering::Relaxed);
    }

    /// Starts (or restarts) recording operations.
    pub fn start_recording(&self) {
        self.lock().log = Some(Vec::new());
    }

    /// Takes the operations recorded so far.
    pub fn take_log(&self) -> Vec<MemOp> {
        self.lock()
            .log
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// A copy of the whole contents.
    pub fn to_bytes(&self) -> Vec<u8> {
        let len = self.lock().len;
        let mut v = vec![0u8; len as usize];
        self.read_at(&mut v, 0).expect("memory read cannot fail");
        v
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Inner {
    fn read(&self, buf: &mut [u8], offset: u64) {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let page = pos / PAGE;
            let in_page = (pos % PAGE) as usize;
            let n = (PAGE as usize - in_page).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            match self.pages.get(&page) {
                Some(p) if pos < self.len => {
                    out.copy_from_slice(&p[in_page..in_page + n]);
                    // Bytes past the length read as zeros even if the page still holds data.
                    if pos + n as u64 > self.len {
                        let keep = (self.len - pos) as usize;
                        out[keep..].fill(0);
                    }
                }
                _ => out.fill(0),
            }
            done += n;
        }
    }

    fn write(&mut self, buf: &[u8], offset: u64) {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let page = pos / PAGE;
            let in_page = (pos % PAGE) as usize;
            let n = (PAGE as usize - in_page).min(buf.len() - done);
            let p = self
                .pages
                .entry(page)
                .or_insert_with(|| vec![0u8; PAGE as usize].into_boxed_slice());
            p[in_page..in_page + n].copy_from_slice(&buf[done..done + n]);
            done += n;
        }
        self.len = self.len.max(offset + buf.len() as u64);
    }

    /// Zeros the bytes of `[offset, offset + len)` inside the length, dropping whole pages.
    fn punch(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.len);
        let mut pos = offset;
        while pos < end {
            let page = pos / PAGE;
            let in_page = pos % PAGE;
            let n = (PAGE - in_page).min(end - pos);
            if n == PAGE {
                self.pages.remove(&page);
            } else if let Some(p) = self.pages.get_mut(&page) {
                p[in_page as usize..(in_page + n) as usize].fill(0);
            }
            pos += n;
        }
    }

    fn set_len(&mut self, len: u64) {
        if len < self.len {
            // Drop whole pages past the end and zero the tail of the last one.
            let first_dead = len.div_ceil(PAGE);
            self.pages.split_off(&first_dead);
            if len % PAGE != 0 {
                if let Some(p) = self.pages.get_mut(&(len / PAGE)) {
                    p[(len % PAGE) as usize..].fill(0);
                }
            }
        }
        self.len = len;
    }
}

fn check_range(offset: u64, len: usize) -> io::Result<()> {
    offset
        .checked_add(len as u64)
        .filter(|&end| end <= i64::MAX as u64)
        .map(|_| ())
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(offset, buf.len())?;
        self.lock().read(buf, offset);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        check_range(offset, buf.len())?;
        let mut g = self.lock();
        g.write(buf, offset);
        if let Some(log) = g.log.as_mut() {
            log.push(MemOp::Write {
                offset,
                data: buf.to_vec(),
            });
        }
        Ok(())
    }

    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        // One operation in the log, as one pwritev is one request to a disk.
        self.write_at(&bufs.concat(), offset)
    }

    fn write_vectored_at_fua(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        let data = bufs.concat();
        check_range(offset, data.len())?;
        let mut g = self.lock();
        g.write(&data, offset);
        if let Some(log) = g.log.as_mut() {
            log.push(MemOp::DurableWrite { offset, data });
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        if let Some(log) = self.lock().log.as_mut() {
            log.push(MemOp::Flush);
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().len)
    }

    fn read_vectored_nowait(&self, bufs: &mut [&mut [u8]], offset: u64) -> io::Result<bool> {
        // Memory never waits.
        self.read_vectored_at(bufs, offset)?;
        Ok(true)
    }

    fn grows_on_write(&self) -> bool {
        !self.fixed_length.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn data_from(&self, offset: u64) -> io::Result<Option<u64>> {
        let g = self.lock();
        if offset >= g.len {
            return Ok(None);
        }
        Ok(g.pages
            .range(offset / PAGE..)
            .next()
            .map(|(&p, _)| (p * PAGE).max(offset)))
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        if !self.can_punch_hole() {
            return Err(io::ErrorKind::Unsupported.into());
        }
        if offset
            .checked_add(len)
            .map_or(true, |e| e > i64::MAX as u64)
        {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        let mut g = self.lock();
        g.punch(offset, len);
        if let Some(log) = g.log.as_mut() {
            log.push(MemOp::PunchHole { offset, len });
        }
        Ok(())
    }

    fn can_punch_hole(&self) -> bool {
        !self.no_punch.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn hole_from(&self, offset: u64) -> io::Result<u64> {
        let g = self.lock();
        if offset >= g.len {
            return Ok(offset);
        }
        // Pages ever written are data (even when written with zeros), as a file system's
        // allocated blocks are; the first missing page after `offset` starts a hole.
        let mut page = offset / PAGE;
        for &p in g.pages.range(page..).map(|(p, _)| p) {
            if p != page {
                break;
            }
            page += 1;
        }
        Ok((page * PAGE).max(offset).min(g.len))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        check_range(len, 0)?;
        let mut g = self.lock();
        g.set_len(len);
        if let Some(log) = g.log.as_mut() {
            log.push(MemOp::SetLen(len));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_reads_writes_and_truncate() {
        let s = MemStorage::recording();
        s.write_at(b"hello", PAGE - 2).unwrap();
        assert_eq!(s.len().unwrap(), PAGE + 3);
        let mut b = [9u8; 9];
        s.read_at(&mut b, PAGE - 4).unwrap();
        assert_eq!(&b, b"\0\0hello\0\0");
        s.set_len(PAGE).unwrap();
        s.set_len(2 * PAGE).unwrap();
        s.read_at(&mut b, PAGE - 4).unwrap();
        assert_eq!(&b, b"\0\0he\0\0\0\0\0");
        s.flush().unwrap();
        let log = s.take_log();
        assert_eq!(log.len(), 4);
        assert_eq!(log[3], MemOp::Flush);
        assert!(s.write_at(b"x", u64::MAX).is_err());
    }

    #[test]
    fn punched_holes_read_zeros_keep_the_length_and_are_logged() {
        let s = MemStorage::recording();
        s.write_at(&vec![7u8; 3 * PAGE as usize], 0).unwrap();
        s.punch_hole(PAGE - 1, PAGE + 2).unwrap();
        // Past the end: nothing, and the length stays.
        s.punch_hole(3 * PAGE - 1, 10).unwrap();
        assert_eq!(s.len().unwrap(), 3 * PAGE);
        let b = s.to_bytes();
        assert!(b[..PAGE as usize - 1].iter().all(|&x| x == 7));
        assert!(b[PAGE as usize - 1..2 * PAGE as usize + 1]
            .iter()
            .all(|&x| x == 0));
        assert!(b[2 * PAGE as usize + 1..3 * PAGE as usize - 1]
            .iter()
            .all(|&x| x == 7));
        assert_eq!(b[3 * PAGE as usize - 1], 0);
        // The whole middle page is a hole now.
        assert_eq!(s.data_from(PAGE).unwrap(), Some(2 * PAGE));
        let log = s.take_log();
        assert_eq!(
            log[1],
            MemOp::PunchHole {
                offset: PAGE - 1,
                len: PAGE + 2
            }
        );
        s.set_punch_supported(false);
        assert!(!s.can_punch_hole());
        assert_eq!(
            s.punch_hole(0, 1).unwrap_err().kind(),
            io::ErrorKind::Unsupported
        );
    }
}
