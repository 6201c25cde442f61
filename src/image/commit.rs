// SPDX-License-Identifier: MIT OR Apache-2.0
//! Commit: write every cluster an overlay holds into its backing file, so that the backing file
//! reads as the overlay does (`qemu-img commit`). The overlay is left as it is: it still shadows
//! everything it committed, so a commit stopped half way (cancelled, or by an error) changes
//! nothing a guest of the overlay sees, and the backing file holds a mix of old data and the
//! overlay's, each cluster whole.

use super::{backing, Backing, ExtentKind, Image, OpenOptions, Progress};
use crate::error::{Error, IoContext, Result};
use crate::storage::Storage;

/// Bytes copied per step; progress is reported and cancellation checked between steps.
const CHUNK: u64 = 2 << 20;
const WHAT: &str = "commit";

impl Image {
    /// Commits this image into its backing file: opens the backing file named in the header
    /// read-write (resolved like [`Image::open`] does, under `opts`' backing policy, approver,
    /// resolver and locking; `opts.writable` is ignored), runs [`Image::commit_to`], then
    /// flushes and closes it.
    ///
    /// This image must have been opened without its backing file
    /// ([`OpenOptions::no_backing`]): its own read-only hold on the backing file would refuse
    /// the write ([`Error::Busy`]). It may be read-only.
    pub fn commit(&self, opts: &OpenOptions, progress: &Progress) -> Result<()> {
        self.check_usable()?;
        let info = self.info()?;
        let Some(name) = info.backing_file else {
            return Err(Error::InvalidArgument {
                what: "image",
                value: 0,
                reason: "the image has no backing file to commit into".into(),
            });
        };
        if self.backing().is_some() {
            return Err(Error::Busy {
                path: self.label().into_owned(),
                reason: "the image holds its backing file open read-only; open it without its backing file (no_backing) to commit".into(),
            });
        }
        // With no backing file open, this is the format the header declares (or None: probe).
        let fmt = info.backing_format;
        let mut opts = opts.clone();
        opts.writable = true;
        let base = if let Some(resolver) = &opts.backing_resolver {
            resolver(&name, fmt)
        } else if let Some(p) = &self.path {
            let canon = p
                .canonicalize()
                .ctx(|| format!("resolving {}", p.display()))?;
            backing::open_for_write(p, &name, fmt, &opts, &[canon])
        } else {
            Err(Error::InvalidArgument {
                what: "backing_resolver",
                value: 0,
                reason: "the image was opened on caller storage: pass a resolver that opens its backing file read-write".into(),
            })
        }
        .map_err(|e| Error::Backing {
            name: name.clone(),
            source: Box::new(e),
        })?;
        let r = self.commit_to(&base, progress);
        let c = match &base {
            Backing::Qed(b) => b.close(),
            Backing::Raw(s) => s.flush().ctx(|| format!("flushing backing file {name}")),
        };
        r.and(c)
    }

    /// Writes every cluster this image holds (data, and zero clusters as zeros) into `base`,
    /// which must be writable, growing `base` to this image's size if it is shorter. Progress
    /// is in bytes (of the clusters this image holds); a cancellation stops between steps of at
    /// most 2 MiB with [`Error::Cancelled`]. Whether it completes or stops, `base` is flushed,
    /// and every byte it holds is either its own or this image's (see the module documentation).
    pub fn commit_to(&self, base: &Backing, progress: &Progress) -> Result<()> {
        self.check_usable()?;
        let size = self.size();
        match base {
            Backing::Qed(b) => {
                b.check_writable()?;
                if b.size() < size {
                    b.truncate(size)?;
                }
            }
            Backing::Raw(s) => {
                if s.len().ctx(|| "reading backing file length".into())? < size {
                    s.set_len(size)
                        .ctx(|| format!("growing the backing file to {size}"))?;
                }
            }
        }
        let extents = self.map(0, size)?;
        let total: u64 = extents
            .iter()
            .filter(|e| e.kind != ExtentKind::Unallocated)
            .map(|e| e.length)
            .sum();
        let r = copy_extents(self, base, &extents, total, progress);
        // Flushed whether it completed or not: what was written stays written.
        let f = match base {
            Backing::Qed(b) => b.flush(),
            Backing::Raw(s) => s.flush().ctx(|| "flushing the backing file".into()),
        };
        r.and(f)
    }
}

fn copy_extents(
    top: &Image,
    base: &Backing,
    extents: &[super::Extent],
    total: u64,
    progress: &Progress,
) -> Result<()> {
    let mut done = 0;
    progress.update(WHAT, 0, total)?;
    let mut buf = vec![0u8; CHUNK.min(total) as usize];
    for e in extents {
        let end = e.offset + e.length;
        match (e.kind, base) {
            (ExtentKind::Unallocated, _) => {}
            (ExtentKind::Zero, Backing::Qed(b)) => {
                // Zero clusters: metadata only, one step.
                b.write_zeroes(e.offset, e.length)?;
                done += e.length;
                progress.update(WHAT, done, total)?;
            }
            (ExtentKind::Zero, Backing::Raw(s)) => {
                let mut pos = e.offset;
                while pos < end {
                    let n = (end - pos).min(CHUNK) as usize;
                    zero_raw(&**s, pos, &mut buf[..n])?;
                    pos += n as u64;
                    done += n as u64;
                    progress.update(WHAT, done, total)?;
                }
            }
            (ExtentKind::Data { .. }, _) => {
                let mut pos = e.offset;
                while pos < end {
                    let n = (end - pos).min(CHUNK) as usize;
                    top.read_at(pos, &mut buf[..n])?;
                    match base {
                        Backing::Qed(b) => b.write_at(pos, &buf[..n])?,
                        Backing::Raw(s) => s
                            .write_at(&buf[..n], pos)
                            .ctx(|| format!("writing backing file at {pos:#x}"))?,
                    }
                    pos += n as u64;
                    done += n as u64;
                    progress.update(WHAT, done, total)?;
                }
            }
        }
    }
    Ok(())
}

/// Makes `buf.len()` bytes of a raw file at `at` read as zeros, writing only where they do not
/// already (a hole stays a hole).
fn zero_raw(s: &dyn Storage, at: u64, buf: &mut [u8]) -> Result<()> {
    s.read_at(buf, at)
        .ctx(|| format!("reading backing file at {at:#x}"))?;
    if buf.iter().any(|&b| b != 0) {
        buf.fill(0);
        s.write_at(buf, at)
            .ctx(|| format!("zeroing backing file at {at:#x}"))?;
    }
    Ok(())
}
