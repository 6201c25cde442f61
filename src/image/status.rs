// SPDX-License-Identifier: MIT OR Apache-2.0
//! Block status through the backing chain: where a guest range's bytes come from once every
//! backing file is taken into account, using the chain the image opened (never re-opening a
//! file, so `BackingPolicy` and the approver keep their say). QED backing files answer from
//! their tables, raw ones from their holes (`Storage::data_from` / `hole_from`: SEEK_DATA and
//! SEEK_HOLE for files). The answers are the ones QEMU's block layer gives `qemu-img map`.

use super::backing::Backing;
use super::io::ExtentKind;
use super::Image;
use crate::error::{Error, IoContext, Result};

/// What a guest range reads as, through the backing chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChainKind {
    /// Stored in the image at `depth`: a data cluster of a QED image, or a part of a raw file
    /// that is not a hole. (Data may still be zeros; it is only stored.)
    Data,
    /// Reads as zeros, as the image at `depth` records: a zero cluster of a QED image, or a
    /// hole in a raw file.
    Zero,
    /// Stored nowhere in the chain, so it reads as zeros: `depth` is the deepest image that
    /// covers the range, the bottom of the chain or an image whose backing file ends before
    /// the range.
    Unallocated,
}

/// A guest range of one kind, found at one depth of the backing chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ChainExtent {
    /// Guest offset (the offset asked for).
    pub offset: u64,
    /// Length in bytes (at most the length asked for).
    pub length: u64,
    /// What it reads as.
    pub kind: ChainKind,
    /// The image that decides it: 0 this image, 1 its backing file, 2 that file's backing
    /// file, and so on.
    pub depth: u32,
    /// File offset of the extent's first byte in the image at `depth`: for data, and for a raw
    /// file's holes; `None` for zero clusters and unallocated ranges.
    pub host_offset: Option<u64>,
}

impl ChainExtent {
    /// Whether the range reads as zeros (a zero cluster, a hole, or nothing stored in the
    /// chain). `false` means it may hold anything.
    pub fn reads_as_zeros(&self) -> bool {
        self.kind != ChainKind::Data
    }

    fn end(&self) -> u64 {
        self.offset + self.length
    }

    /// Whether `next`, which starts where `self` ends, extends it.
    fn joins(&self, next: &ChainExtent) -> bool {
        self.kind == next.kind
            && self.depth == next.depth
            && match (self.host_offset, next.host_offset) {
                (Some(a), Some(b)) => a + self.length == b,
                (None, None) => true,
                _ => false,
            }
    }
}

/// Size of a backing file as QEMU's block layer sees it: a raw file counts in whole 512-byte
/// sectors (the part of the last one after the file's end is a hole, reading as zeros).
fn backing_size(b: &Backing) -> Result<u64> {
    match b {
        Backing::Raw(s) => Ok(s
            .len()
            .ctx(|| "backing file length".into())?
            .saturating_add(511)
            & !511),
        Backing::Qed(img) => Ok(img.size()),
    }
}

/// The first extent at `pos` through the chain below `img` (at `depth`), at most `len` bytes;
/// `[pos, pos + len)` lies inside `img`.
fn piece(img: &Image, depth: u32, pos: u64, len: u64) -> Result<ChainExtent> {
    // At most one L2 table's range (as QEMU's QED driver answers): a walk over a long
    // unallocated run above a fragmented backing file then scans each table once per piece of
    // it, not the whole run again for every piece.
    let bits = img.geometry().l2_coverage_bits();
    let len = if bits < 64 {
        let cov = 1u64 << bits;
        len.min((pos & !(cov - 1)).saturating_add(cov) - pos)
    } else {
        len
    };
    let e = img.block_status(pos, len)?;
    let mut out = ChainExtent {
        offset: pos,
        length: e.length,
        kind: ChainKind::Unallocated,
        depth,
        host_offset: None,
    };
    match e.kind {
        ExtentKind::Data { host_offset } => {
            out.kind = ChainKind::Data;
            out.host_offset = Some(host_offset);
        }
        ExtentKind::Zero => out.kind = ChainKind::Zero,
        ExtentKind::Unallocated => {
            let Some(b) = img.backing() else {
                return Ok(out);
            };
            let size = backing_size(&b)?;
            if pos >= size {
                // Past the end of the backing file: zeros, stored nowhere.
                return Ok(out);
            }
            let len = e.length.min(size - pos);
            match b {
                Backing::Qed(sub) => return piece(&sub, depth + 1, pos, len),
                Backing::Raw(s) => {
                    let (data, n) = crate::storage::sparse_status(&*s, pos, len)
                        .ctx(|| format!("block status of the backing file at {pos:#x}"))?;
                    return Ok(ChainExtent {
                        offset: pos,
                        length: n,
                        kind: if data {
                            ChainKind::Data
                        } else {
                            ChainKind::Zero
                        },
                        depth: depth + 1,
                        host_offset: Some(pos),
                    });
                }
            }
        }
    }
    Ok(out)
}

impl Image {
    /// Block status through the backing chain: the extent at guest `offset`, at most `len`
    /// bytes, that is all data, all zeros or all unallocated in the whole chain, with the depth
    /// of the image that decides it and the host offset in that image's file where there is
    /// one. Adjacent pieces of one kind at one depth are merged (data and raw holes also stay
    /// contiguous in the file), so each call ends where the answer changes. Uses the backing
    /// chain opened with the image; an image opened without its backing file reports its own
    /// unallocated ranges as [`ChainKind::Unallocated`] at depth 0.
    ///
    /// [`Image::block_status`] answers for this image alone.
    pub fn block_status_chain(&self, offset: u64, len: u64) -> Result<ChainExtent> {
        self.check_status_args(offset, len)?;
        let end = offset + len;
        let mut ext = piece(self, 0, offset, len)?;
        while ext.end() < end {
            let next = piece(self, 0, ext.end(), end - ext.end())?;
            if !ext.joins(&next) {
                break;
            }
            ext.length += next.length;
        }
        Ok(ext)
    }

    /// Every extent of `[offset, offset + len)` through the backing chain, in order (see
    /// [`Image::block_status_chain`]).
    pub fn map_chain(&self, offset: u64, len: u64) -> Result<Vec<ChainExtent>> {
        self.collect_extents(offset, len, |p, l| {
            self.block_status_chain(p, l).map(|e| (e, e.length))
        })
    }

    /// The argument checks of the block status calls.
    pub(super) fn check_status_args(&self, offset: u64, len: u64) -> Result<()> {
        self.check_usable()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Err(Error::InvalidArgument {
                what: "len",
                value: 0,
                reason: "block status of an empty range".into(),
            });
        }
        Ok(())
    }

    /// Every extent of `[offset, offset + len)`, in order, from a block status call that
    /// returns an extent with its length.
    pub(super) fn collect_extents<E>(
        &self,
        offset: u64,
        len: u64,
        status: impl Fn(u64, u64) -> Result<(E, u64)>,
    ) -> Result<Vec<E>> {
        let end = offset.checked_add(len).ok_or(Error::OutOfRange {
            offset,
            len,
            size: self.size(),
        })?;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let (e, n) = status(pos, end - pos)?;
            pos += n;
            out.push(e);
        }
        Ok(out)
    }
}
