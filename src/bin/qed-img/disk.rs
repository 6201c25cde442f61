// SPDX-License-Identifier: MIT OR Apache-2.0
//! An opened image (QED or raw) and its backing chain, with reads, writes and block status the
//! way QEMU's block layer reports it, so that `map`, `convert` and `compare` walk an image as
//! qemu-img does.

use crate::common::{
    format_of, host_path, io_msg, path_combine, protocol_prefix, CliError, CliResult, Context, Fmt,
};
use crate::spec::{fire, Io, Rule, Spec};
use qed::storage::lock::{lock_image, ImageLock, LockMode};
use qed::storage::sys;
use qed::{Backing, ChainKind, FileStorage, Image, OpenOptions, Storage};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;

/// How to open an image.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct OpenMode {
    pub(crate) writable: bool,
    pub(crate) force_share: bool,
    pub(crate) direct: bool,
    pub(crate) no_backing: bool,
    pub(crate) no_repair: bool,
    /// The name is an `--image-opts` list, not a file name.
    pub(crate) image_opts: bool,
}

impl OpenMode {
    /// The library's options for this mode.
    pub(crate) fn library_options(&self) -> OpenOptions {
        OpenOptions {
            writable: self.writable,
            force_share: self.force_share && !self.writable,
            direct: self.direct,
            no_backing: self.no_backing,
            no_repair: self.no_repair,
            ..OpenOptions::read_only()
        }
    }

    /// Read-only, sharing with a writer when `force_share` (-U), the name an --image-opts list
    /// when `image_opts`: how a copy opens its source.
    pub(crate) fn source(force_share: bool, image_opts: bool) -> OpenMode {
        OpenMode {
            force_share,
            image_opts,
            ..Default::default()
        }
    }
}

/// A raw file with its lock (when we took one).
pub(crate) struct RawFile {
    pub(crate) storage: FileStorage,
    _lock: Option<ImageLock>,
}

impl RawFile {
    pub(crate) fn open(path: &str, mode: &OpenMode, lock: bool) -> CliResult<RawFile> {
        let storage = FileStorage::open(Path::new(path), mode.writable, mode.direct)
            .map_err(|e| CliError::new(format!("Could not open '{path}': {}", io_msg(&e))))?;
        let lock = if lock {
            let m = if mode.writable {
                LockMode::ReadWrite
            } else if mode.force_share {
                LockMode::ForceShare
            } else {
                LockMode::ReadOnly
            };
            Some(lock_image(storage.file(), m).map_err(|e| {
                CliError::new(format!(
                    "Could not open '{path}': Failed to get \"{}\" lock: {}",
                    if mode.writable {
                        "write"
                    } else {
                        "consistent read"
                    },
                    io_msg(&e)
                ))
            })?)
        } else {
            None
        };
        Ok(RawFile {
            storage,
            _lock: lock,
        })
    }

    /// The storage, shared, with the lock that goes with it.
    pub(crate) fn into_shared(self) -> (Arc<dyn Storage>, Option<ImageLock>) {
        (Arc::new(self.storage), self._lock)
    }

    /// Length of the file.
    pub(crate) fn len(&self) -> CliResult<u64> {
        self.storage.len().ctx(|| "reading file length".into())
    }
}

/// One layer of a chain.
pub(crate) enum Layer {
    Qed { img: Arc<Image>, path: String },
    Raw { file: RawFile, path: String },
}

impl Layer {
    pub(crate) fn path(&self) -> &str {
        match self {
            Layer::Qed { path, .. } | Layer::Raw { path, .. } => path,
        }
    }
    /// Size as the block layer sees it (raw files round up to whole sectors).
    pub(crate) fn size(&self) -> CliResult<u64> {
        match self {
            Layer::Qed { img, .. } => Ok(img.size()),
            Layer::Raw { file, path } => Ok(file
                .len()
                .map_err(|e| CliError::new(format!("{path}: {e}")))?
                .next_multiple_of(512)),
        }
    }
}

/// `qemu-img map`'s view of a range: the first layer that decides it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Status {
    pub(crate) start: u64,
    pub(crate) len: u64,
    pub(crate) depth: usize,
    pub(crate) present: bool,
    pub(crate) zero: bool,
    pub(crate) data: bool,
    pub(crate) offset: Option<u64>,
    /// The layer whose file `offset` points into.
    pub(crate) layer: Option<usize>,
}

/// An open image with its chain: `layers[0]` is the image itself.
pub(crate) struct Disk {
    pub(crate) path: String,
    pub(crate) fmt: Fmt,
    pub(crate) layers: Vec<Layer>,
    /// An image given by options (json:, --image-opts): how QEMU names it, and the path its
    /// relative backing names are relative to (`None`: it has no one folder).
    pub(crate) shown: Option<(String, Option<String>)>,
    /// blkdebug rules above the format (failing reads and block status).
    pub(crate) guest_rules: Vec<Arc<Rule>>,
}

/// `qed::Error`s as one line, naming the file.
pub(crate) fn open_err(path: &str, e: impl std::fmt::Display) -> CliError {
    CliError::new(format!("Could not open '{path}': {e}"))
}

impl Disk {
    /// Opens `path` as `fmt` (probed when `None`).
    pub(crate) fn open(name: &str, fmt: Option<Fmt>, mode: &OpenMode) -> CliResult<Disk> {
        if let Some(spec) = Spec::of_name(name, mode.image_opts)? {
            return Disk::open_spec(spec, fmt, mode);
        }
        let path = &host_path(name);
        let fmt = format_of(path, fmt)?;
        let mut layers = Vec::new();
        match fmt {
            Fmt::Raw => layers.push(Layer::Raw {
                file: RawFile::open(path, mode, true)?,
                path: path.to_string(),
            }),
            Fmt::Qed => {
                if Path::new(path).is_dir() {
                    return Err(open_err(path, "Is a directory"));
                }
                let opts = mode.library_options();
                let img = Image::open(path, &opts).map_err(|e| match e {
                    // A file that cannot be opened: qemu's "Could not open 'F': <errno text>".
                    qed::Error::Io { context, source } if context.starts_with("opening") => {
                        open_err(path, io_msg(&source))
                    }
                    e => open_err(path, e),
                })?;
                layers.extend(chain_layers(Arc::new(img), path.to_string())?);
            }
        }
        Ok(Disk {
            path: path.to_string(),
            fmt,
            layers,
            shown: None,
            guest_rules: Vec::new(),
        })
    }

    /// Opens an image given by options: as its file when the options add nothing to it, else
    /// on the storage they describe.
    fn open_spec(spec: Spec, fmt: Option<Fmt>, mode: &OpenMode) -> CliResult<Disk> {
        let fmt = fmt.or(spec.fmt);
        let shown = Some((spec.shown.clone(), spec.dir_base()));
        let plain = OpenMode {
            image_opts: false,
            ..*mode
        };
        if let Some(f) = spec.plain_file() {
            let mut d = Disk::open(f, fmt, &plain)?;
            d.shown = shown;
            d.guest_rules = spec.guest_rules;
            return Ok(d);
        }
        let storage = spec
            .storage(mode.writable, mode.force_share)
            .map_err(|e| open_err(&spec.shown, e.msg))?;
        let fmt = match fmt {
            Some(f) => f,
            None => {
                let mut magic = [0u8; 4];
                storage
                    .read_at(&mut magic, 0)
                    .map_err(|e| open_err(&spec.shown, io_msg(&e)))?;
                if &magic == b"QED\0" {
                    Fmt::Qed
                } else {
                    Fmt::Raw
                }
            }
        };
        if fmt == Fmt::Raw {
            return Err(open_err(
                &spec.shown,
                "raw images are opened as files only (no blkdebug or quorum under them)",
            ));
        }
        let dir = spec.dir_base();
        let opts = OpenOptions {
            backing_resolver: Some(backing_resolver(dir.clone())),
            ..mode.library_options()
        };
        let img = Image::open_storage(storage, &opts).map_err(|e| open_err(&spec.shown, e))?;
        let first = spec.first_file().to_string();
        // Layer 0's path: the file backing names are combined with (and info's sizes).
        let layers = chain_layers(Arc::new(img), dir.unwrap_or(first))?;
        Ok(Disk {
            path: spec.shown.clone(),
            fmt,
            layers,
            shown,
            guest_rules: spec.guest_rules,
        })
    }

    /// This image as a backing file of another.
    pub(crate) fn into_backing(self) -> CliResult<Backing> {
        match self.layers.into_iter().next() {
            Some(Layer::Qed { img, .. }) => Ok(Backing::Qed(img)),
            Some(Layer::Raw { file, .. }) => Ok(Backing::Raw(file.into_shared().0)),
            None => Err(CliError::new("no image")),
        }
    }

    pub(crate) fn top(&self) -> &Layer {
        &self.layers[0]
    }

    /// The QED image on top, if the image is QED.
    pub(crate) fn image(&self) -> Option<&Arc<Image>> {
        match &self.layers[0] {
            Layer::Qed { img, .. } => Some(img),
            Layer::Raw { .. } => None,
        }
    }

    /// Virtual size.
    pub(crate) fn size(&self) -> CliResult<u64> {
        self.layers[0].size()
    }

    /// Reads guest bytes; past the end they read as zeros.
    pub(crate) fn read_at(&self, offset: u64, buf: &mut [u8]) -> CliResult<()> {
        if let Err(e) = fire(&self.guest_rules, Io::Read, offset, buf.len() as u64) {
            return Err(CliError::new(format!(
                "error while reading offset {offset}: {}",
                io_msg(&e)
            )));
        }
        let r = match &self.layers[0] {
            Layer::Qed { img, .. } => {
                let size = img.size();
                let inside = size.saturating_sub(offset).min(buf.len() as u64) as usize;
                buf[inside..].fill(0);
                if inside > 0 {
                    img.read_at(offset, &mut buf[..inside])
                        .map_err(|e| e.to_string())
                } else {
                    Ok(())
                }
            }
            Layer::Raw { file, .. } => file.storage.read_at(buf, offset).map_err(|e| io_msg(&e)),
        };
        r.map_err(|e| {
            CliError::new(format!(
                "error while reading {} at offset {offset}: {e}",
                self.path
            ))
        })
    }

    /// Writes guest bytes.
    pub(crate) fn write_at(&self, offset: u64, buf: &[u8]) -> CliResult<()> {
        let r = match &self.layers[0] {
            Layer::Qed { img, .. } => img.write_at(offset, buf).map_err(|e| e.to_string()),
            Layer::Raw { file, .. } => file.storage.write_at(buf, offset).map_err(|e| io_msg(&e)),
        };
        r.map_err(|e| {
            CliError::new(format!(
                "error while writing {} at offset {offset}: {e}",
                self.path
            ))
        })
    }

    /// Makes a range read as zeros (QED: zero clusters where whole clusters are covered).
    pub(crate) fn write_zeroes(&self, offset: u64, len: u64) -> CliResult<()> {
        let r = match &self.layers[0] {
            Layer::Qed { img, .. } => img.write_zeroes(offset, len).map_err(|e| e.to_string()),
            Layer::Raw { file, .. } => punch_or_write_zeroes(&file.storage, offset, len),
        };
        r.map_err(|e| {
            CliError::new(format!(
                "error while writing zeroes to {} at offset {offset}: {e}",
                self.path
            ))
        })
    }

    pub(crate) fn flush(&self) -> CliResult<()> {
        let r = match &self.layers[0] {
            Layer::Qed { img, .. } => img.flush().map_err(|e| e.to_string()),
            Layer::Raw { file, .. } => file.storage.flush().map_err(|e| io_msg(&e)),
        };
        r.map_err(|e| CliError::new(format!("error while flushing {}: {e}", self.path)))
    }

    /// Flushes and closes; a QED image clears its need-check bit.
    pub(crate) fn close(self) -> CliResult<()> {
        let path = self.path.clone();
        for l in self.layers {
            match l {
                Layer::Qed { img, path: p } => {
                    // Backing images stay referenced by the image above until it is dropped.
                    if let Ok(img) = Arc::try_unwrap(img) {
                        img.close()
                            .map_err(|e| CliError::new(format!("error while closing {p}: {e}")))?;
                    }
                }
                Layer::Raw { file, .. } => {
                    if file.storage.is_writable() {
                        file.storage
                            .flush()
                            .map_err(|e| CliError::new(format!("{path}: {}", io_msg(&e))))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// qemu-img map's `get_block_status`: the layer that decides `[offset, offset + bytes)`,
    /// walking down the chain (the library's chain block status for a QED image).
    pub(crate) fn status(&self, offset: u64, bytes: u64) -> CliResult<Status> {
        if let Err(e) = fire(&self.guest_rules, Io::Status, offset, bytes) {
            return Err(CliError::new(format!(
                "error while reading block status at offset {offset}: {}",
                io_msg(&e)
            )));
        }
        let mut st = Status {
            start: offset,
            len: bytes,
            depth: 0,
            present: true,
            zero: false,
            data: true,
            offset: None,
            layer: None,
        };
        match &self.layers[0] {
            Layer::Qed { img, path } => {
                let e = img
                    .block_status_chain(offset, bytes)
                    .map_err(|e| CliError::new(format!("{path}: {e}")))?;
                st.len = e.length;
                st.depth = e.depth as usize;
                st.offset = e.host_offset;
                match e.kind {
                    ChainKind::Zero => (st.zero, st.data) = (true, false),
                    // QEMU's generic layer: no image has it, it reads as zeros.
                    ChainKind::Unallocated => (st.present, st.zero, st.data) = (false, true, false),
                    // Data, and anything a newer library reports: read it.
                    _ => {}
                }
            }
            Layer::Raw { file, path } => {
                // The block layer sees a raw file in whole sectors; map never asks past them.
                let (data, len) = qed::storage::sparse_status(&file.storage, offset, bytes)
                    .map_err(|e| CliError::new(format!("{path}: {}", io_msg(&e))))?;
                st.len = len;
                st.offset = Some(offset);
                (st.zero, st.data) = (!data, data);
            }
        }
        st.layer = st.offset.map(|_| st.depth);
        Ok(st)
    }
}

/// An open QED image and its backing chain as layers, `path` being the image's.
fn chain_layers(img: Arc<Image>, path: String) -> CliResult<Vec<Layer>> {
    let mut layers = Vec::new();
    let mut cur = img;
    let mut cur_path = path;
    layers.push(Layer::Qed {
        img: cur.clone(),
        path: cur_path.clone(),
    });
    loop {
        let Some(b) = cur.backing() else { break };
        let name = cur
            .info()
            .map_err(|e| open_err(&cur_path, e))?
            .backing_file
            .unwrap_or_default();
        let bpath = path_combine(&cur_path, &name);
        match b {
            Backing::Qed(bimg) => {
                layers.push(Layer::Qed {
                    img: bimg.clone(),
                    path: bpath.clone(),
                });
                cur = bimg;
                cur_path = bpath;
            }
            Backing::Raw(_) => {
                // Our own descriptor, for info's sizes; the library holds the lock
                // (and answers block status through its own).
                let ro = OpenMode::default();
                layers.push(Layer::Raw {
                    file: RawFile::open(&bpath, &ro, false)?,
                    path: bpath,
                });
                break;
            }
        }
    }
    Ok(layers)
}

/// Opens the backing files of an image given by options (it has no path of its own for the
/// library to resolve them from): relative names from `base`'s folder (none: only absolute
/// names), the format probed unless the header says it. As the library does, a name with a
/// protocol prefix (json:, file:, ...) is refused: the image does not choose drivers or options.
fn backing_resolver(base: Option<String>) -> qed::image::BackingResolver {
    Arc::new(move |name: &str, fmt: Option<qed::BackingFormat>| {
        let refuse = |reason: String| qed::Error::BackingRefused {
            name: name.to_string(),
            reason,
        };
        if let Some(p) = protocol_prefix(name) {
            return Err(refuse(format!(
                "backing file names with a protocol prefix ({p}:) are not supported"
            )));
        }
        let path = if name.starts_with('/') {
            name.to_string()
        } else {
            match &base {
                Some(b) => path_combine(b, name),
                None => {
                    // QEMU's words for a relative name under several files.
                    return Err(refuse(
                        "Cannot generate a base directory for quorum nodes".into(),
                    ));
                }
            }
        };
        let fmt = fmt.map(|f| match f {
            qed::BackingFormat::Raw => Fmt::Raw,
            _ => Fmt::Qed,
        });
        let ro = OpenMode {
            force_share: true,
            ..Default::default()
        };
        let d = Disk::open(&path, fmt, &ro).map_err(|e| refuse(e.msg))?;
        d.into_backing().map_err(|e| refuse(e.msg))
    })
}

/// Zeroes a range of a raw file: punch a hole (keeping the size), or write zeros if the file
/// system cannot.
fn punch_or_write_zeroes(storage: &FileStorage, offset: u64, len: u64) -> Result<(), String> {
    if sys::punch_hole(storage.file().as_raw_fd(), offset, len).is_ok() {
        return Ok(());
    }
    // (u64 first: `len as usize` would wrap on 32-bit hosts, to an empty buffer at 4 GiB.)
    let zeros = vec![0u8; (1u64 << 20).min(len) as usize];
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let n = (end - pos).min(zeros.len() as u64) as usize;
        storage.write_at(&zeros[..n], pos).map_err(|e| io_msg(&e))?;
        pos += n as u64;
    }
    Ok(())
}

/// Creates (or truncates) a raw file of `size` bytes, sparse, with its first block written as
/// qemu-img does (so that O_DIRECT alignment probing works on it).
pub(crate) fn create_raw(path: &str, size: u64) -> CliResult<()> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| CliError::new(format!("{path}: Could not create '{path}': {}", io_msg(&e))))?;
    let _lock = lock_image(&f, LockMode::ReadWrite).map_err(|e| {
        CliError::new(format!(
            "{path}: Failed to get \"write\" lock: {}",
            io_msg(&e)
        ))
    })?;
    let err = |e: std::io::Error| CliError::new(format!("{path}: {}", io_msg(&e)));
    f.set_len(0).map_err(err)?;
    f.set_len(size).map_err(err)?;
    if size > 0 {
        use std::os::unix::fs::FileExt;
        let first = vec![0u8; size.min(4096) as usize];
        f.write_all_at(&first, 0).map_err(err)?;
    }
    f.sync_data().map_err(err)?;
    Ok(())
}
