// SPDX-License-Identifier: MIT OR Apache-2.0
//! Backing files: what unallocated clusters read through to. A backing file is a raw file or
//! another QED image (whose own backing file is opened the same way, up to a depth limit).

use super::options::{BackingFormat, BackingPolicy, OpenOptions};
use super::Image;
use crate::error::{Error, IoContext, Result};
use crate::storage::Storage;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// An opened backing file.
#[derive(Clone)]
pub enum Backing {
    /// A raw file; bytes past its end read as zeros.
    Raw(Arc<dyn Storage>),
    /// A QED image; bytes past its virtual size read as zeros.
    Qed(Arc<Image>),
}

impl std::fmt::Debug for Backing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backing::Raw(_) => f.write_str("Backing::Raw"),
            Backing::Qed(img) => write!(f, "Backing::Qed({} bytes)", img.size()),
        }
    }
}

impl Backing {
    /// The format of this backing file.
    pub fn format(&self) -> BackingFormat {
        match self {
            Backing::Raw(_) => BackingFormat::Raw,
            Backing::Qed(_) => BackingFormat::Qed,
        }
    }

    /// Size of the backing file as a guest sees it.
    pub fn size(&self) -> Result<u64> {
        match self {
            Backing::Raw(s) => s.len().ctx(|| "backing file length".into()),
            Backing::Qed(img) => Ok(img.size()),
        }
    }

    /// Reads guest bytes at `offset`; past the end of the backing file they read as zeros.
    pub(crate) fn read_vectored(&self, bufs: &mut [&mut [u8]], offset: u64) -> Result<()> {
        match self {
            Backing::Raw(s) => s
                .read_vectored_at(bufs, offset)
                .ctx(|| format!("reading backing file at {offset:#x}")),
            Backing::Qed(img) => {
                let size = img.size();
                let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
                if offset.saturating_add(total) <= size {
                    return img.read_sg(offset, bufs);
                }
                // Read what lies inside the backing image, zero the rest.
                let mut pos = offset;
                for b in bufs.iter_mut() {
                    let inside = size.saturating_sub(pos).min(b.len() as u64) as usize;
                    if inside > 0 {
                        img.read_sg(pos, &mut [&mut b[..inside]])?;
                    }
                    b[inside..].fill(0);
                    pos += b.len() as u64;
                }
                Ok(())
            }
        }
    }
}

/// Refuses backing names QEMU would hand to a protocol driver: we only ever open plain paths.
fn check_plain_path(name: &str) -> Result<()> {
    let proto = name.split_once(':').map(|(p, _)| p).filter(|p| {
        !p.is_empty()
            && !p.contains('/')
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '-' || c == '.')
    });
    if let Some(p) = proto {
        return Err(Error::Unsupported {
            field: "backing_filename",
            value: 0,
            reason: format!("backing file names with a protocol prefix ({p}:) are not supported"),
        });
    }
    Ok(())
}

/// Guesses the format of a backing file from its first bytes.
pub(crate) fn probe(storage: &dyn Storage, name: &str) -> Result<BackingFormat> {
    let mut magic = [0u8; 4];
    storage
        .read_at(&mut magic, 0)
        .ctx(|| format!("probing backing file {name}"))?;
    match &magic {
        b"QED\0" => Ok(BackingFormat::Qed),
        b"QFI\xfb" => Err(unsupported_format(name, "qcow2")),
        b"KDMV" => Err(unsupported_format(name, "vmdk")),
        b"QFI\0" => Err(unsupported_format(name, "qcow")),
        _ => Ok(BackingFormat::Raw),
    }
}

fn unsupported_format(name: &str, fmt: &str) -> Error {
    Error::Unsupported {
        field: "backing_format",
        value: 0,
        reason: format!("backing file {name} is in {fmt} format; only raw and qed are supported"),
    }
}

/// Where a backing name points, relative to the folder of the image that names it.
pub(crate) fn resolve_path(image_path: Option<&Path>, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match image_path.and_then(Path::parent) {
        Some(dir) => dir.join(p),
        None => p.to_path_buf(),
    }
}

/// Opens the backing file named by an image at `image_path`, following QED chains.
/// `chain` holds the canonical paths of the images above it, to refuse loops.
pub(crate) fn open_by_path(
    image_path: &Path,
    name: &str,
    format: Option<BackingFormat>,
    opts: &OpenOptions,
    chain: &[PathBuf],
) -> Result<Backing> {
    open_path(image_path, name, format, opts, chain, false)
}

/// Like [`open_by_path`], but read-write (with a write lock) and without its own backing chain:
/// the target of a commit.
pub(crate) fn open_for_write(
    image_path: &Path,
    name: &str,
    format: Option<BackingFormat>,
    opts: &OpenOptions,
    chain: &[PathBuf],
) -> Result<Backing> {
    open_path(image_path, name, format, opts, chain, true)
}

fn open_path(
    image_path: &Path,
    name: &str,
    format: Option<BackingFormat>,
    opts: &OpenOptions,
    chain: &[PathBuf],
    writable: bool,
) -> Result<Backing> {
    check_plain_path(name)?;
    if chain.len() as u32 > opts.max_backing_depth {
        return Err(Error::Unsupported {
            field: "backing_filename",
            value: chain.len() as u64,
            reason: format!(
                "backing chain deeper than {} images",
                opts.max_backing_depth
            ),
        });
    }
    let path = resolve_path(Some(image_path), name);
    let canon = path
        .canonicalize()
        .ctx(|| format!("opening backing file {}", path.display()))?;
    if chain.contains(&canon) {
        return Err(Error::InvalidHeader {
            field: "backing_filename",
            value: chain.len() as u64,
            reason: "backing chain loops back to an image already in the chain",
        });
    }
    if opts.backing_policy == BackingPolicy::SameDirectory {
        // The folder of the image at the top of the chain bounds the whole chain.
        let root = chain
            .first()
            .map(|p| p.as_path())
            .unwrap_or(image_path)
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        if !canon.starts_with(&root) {
            return Err(Error::BackingRefused {
                name: name.to_owned(),
                reason: format!(
                    "{} lies outside the image's folder {}; open with the any-backing policy to follow it",
                    canon.display(),
                    root.display()
                ),
            });
        }
    }
    let meta =
        std::fs::metadata(&canon).ctx(|| format!("opening backing file {}", canon.display()))?;
    if !meta.is_file() {
        return Err(Error::BackingRefused {
            name: name.to_owned(),
            reason: format!("{} is not a regular file", canon.display()),
        });
    }
    if let Some(approve) = &opts.backing_approver {
        approve(&canon, name, chain.len().max(1) as u32)?;
    }
    let storage = crate::storage::FileStorage::open(&canon, writable, false)
        .ctx(|| format!("opening backing file {}", canon.display()))?;
    let lock = if opts.lock {
        let mode = if writable {
            crate::storage::lock::LockMode::ReadWrite
        } else {
            crate::storage::lock::LockMode::ReadOnly
        };
        Some(
            crate::storage::lock::lock_image(storage.file(), mode)
                .map_err(|e| super::lock_error(&canon, e))?,
        )
    } else {
        None
    };
    let storage: Arc<dyn Storage> = Arc::new(storage);
    let format = match format {
        Some(f) => f,
        None => probe(&*storage, name)?,
    };
    match format {
        BackingFormat::Raw => {
            // The lock lives as long as the file; keep it alive with the storage.
            Ok(Backing::Raw(Arc::new(LockedStorage {
                inner: storage,
                _lock: lock,
            })))
        }
        BackingFormat::Qed => {
            let mut sub = opts.clone();
            // A commit target is written with its own chain below it (read-only): a write of
            // part of one of its clusters copies the rest from there.
            sub.writable = writable;
            // The backing files are read, never written: copy-on-read is the top image's.
            sub.copy_on_read = false;
            let mut chain = chain.to_vec();
            chain.push(canon.clone());
            let img = Image::logged_open(
                Some(&canon),
                Image::open_inner(storage, &sub, Some(&canon), &chain, lock),
            )?;
            Ok(Backing::Qed(Arc::new(img)))
        }
    }
}

/// A storage that keeps its file lock alive.
struct LockedStorage {
    inner: Arc<dyn Storage>,
    _lock: Option<crate::storage::lock::ImageLock>,
}

impl Storage for LockedStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn read_vectored_at(&self, bufs: &mut [&mut [u8]], offset: u64) -> std::io::Result<()> {
        self.inner.read_vectored_at(bufs, offset)
    }
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> std::io::Result<()> {
        self.inner.write_vectored_at(bufs, offset)
    }
    fn write_metadata_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_metadata_at(buf, offset)
    }
    fn read_vectored_nowait(&self, bufs: &mut [&mut [u8]], offset: u64) -> std::io::Result<bool> {
        self.inner.read_vectored_nowait(bufs, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn preallocate(&self, len: u64) -> std::io::Result<()> {
        self.inner.preallocate(len)
    }
    fn grows_on_write(&self) -> bool {
        self.inner.grows_on_write()
    }
    fn data_from(&self, offset: u64) -> std::io::Result<Option<u64>> {
        self.inner.data_from(offset)
    }
    fn hole_from(&self, offset: u64) -> std::io::Result<u64> {
        self.inner.hole_from(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_names_are_refused() {
        for n in [
            "json:{\"driver\":\"file\"}",
            "nbd:localhost:10809",
            "file:/etc/passwd",
        ] {
            assert!(check_plain_path(n).is_err(), "{n}");
        }
        for n in ["base.raw", "../x/base.qed", "/abs/path:with/colon"] {
            assert!(check_plain_path(n).is_ok(), "{n}");
        }
    }
}
