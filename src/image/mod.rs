// SPDX-License-Identifier: MIT OR Apache-2.0
//! The engine: create and open images, map guest ranges through the L1/L2 tables, read, write,
//! allocate, write zeroes, resize, change the backing file, check and repair, flush and close.
//!
//! Crash-safety order (every write acknowledged before a completed flush survives a power loss):
//! 1. before the first metadata update after a clean state, the need-check bit is written to the
//!    header and flushed;
//! 2. new clusters come from the end of the file; the file is extended first, so the unwritten
//!    part of a fresh cluster reads as zeros and needs no zero-fill write;
//! 3. data (and copy-on-write data from the backing file) is written before the L2 entry that
//!    points to it; with a backing file the data is flushed first, since a lost data write would
//!    otherwise expose zeros where the backing file's bytes were;
//! 4. a new L2 table is written and flushed before the L1 entry that points to it;
//! 5. a clean close flushes, clears the need-check bit, and flushes again.
//!
//! Concurrency: one [`Image`] is `Send + Sync`. Reads and in-place writes take no lock beyond a
//! shared gate; allocations lock the range of guest clusters they fill, so two writers never
//! allocate the same cluster, and L2 updates are serialised per 4 KiB piece of table, so no
//! update is lost. Exclusive operations (repair, resize, backing change, close) take the gate
//! exclusively.

mod backing;
mod check;
mod commit;
mod copy;
mod idle;
mod io;
mod l2cache;
mod options;
mod progress;
mod rangelock;
mod registry;
mod stats;
mod status;
mod stream;
mod timer;
mod writeback;

pub use backing::Backing;
pub use check::{CheckFix, CheckResult};
pub use copy::{copy, CopyOptions, CopySource, CopyStatus, CopyTarget};
#[cfg(qed_io_uring)]
pub(crate) use io::{DirectPiece, DirectPlan};
pub use io::{Extent, ExtentKind, WriteFlags, WriteZeroesFlags};
pub use options::{
    BackingApprover, BackingFormat, BackingPolicy, BackingResolver, CreateOptions, OpenOptions,
    DEFAULT_L2_CACHE_BYTES, DEFAULT_MAX_BACKING_DEPTH, DEFAULT_NEED_CHECK_DELAY,
    DEFAULT_WRITEBACK_DELAY,
};
pub use progress::Progress;
pub use stats::ImageStats;
pub use status::{ChainExtent, ChainKind};

use crate::error::{Error, IoContext, Result};
use crate::format::header::parse_backing_name;
use crate::format::*;
use crate::log::qed_log;
use crate::storage::lock::{lock_image, ImageLock, LockMode};
use crate::storage::{FileStorage, Storage};
use l2cache::L2Cache;
use rangelock::RangeLock;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// What [`Image::info`] reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u32,
    /// Table size in clusters.
    pub table_size: u32,
    /// Header size in clusters.
    pub header_size: u32,
    /// Incompatible feature bits as stored.
    pub features: u64,
    /// Compatible feature bits.
    pub compat_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// File offset of the L1 table.
    pub l1_table_offset: u64,
    /// Backing file name as stored in the header.
    pub backing_file: Option<String>,
    /// Backing format declared by the header (`Some(Raw)` with the no-probe bit), or found by
    /// probing when the backing file is open.
    pub backing_format: Option<BackingFormat>,
    /// Whether the need-check bit is set.
    pub needs_check: bool,
    /// Length of the image file in bytes.
    pub file_size: u64,
    /// Whether the image is open read-write.
    pub writable: bool,
}

struct HeaderState {
    header: Header,
    backing_name: Option<String>,
}

/// The in-memory L1 table: the entries that map the virtual size (rounded up to whole sectors of
/// the table), and which of them failed validation at open.
struct L1 {
    entries: Vec<u64>,
    bad: Vec<bool>,
}

/// An open QED image. `Send + Sync`: share it between threads with `Arc`.
pub struct Image {
    storage: Arc<dyn Storage>,
    geometry: Geometry,
    /// Header length in bytes and L1 table offset: fixed for the life of the handle.
    header_bytes: u64,
    l1_offset: u64,
    /// Changed only by [`Image::reopen`], under the exclusive gate.
    writable: AtomicBool,
    /// Opened with O_DIRECT (`OpenOptions::direct`).
    direct: bool,
    /// Opened with `OpenOptions::force_share` (which a read-write reopen refuses).
    force_share: bool,
    /// The image file, when opened by path: what a reopen changes.
    file: Option<Arc<FileStorage>>,
    /// This handle's entry among the files the process has open (locked opens by path).
    registration: Mutex<Option<registry::Registration>>,
    /// Opened without its backing file: a backing change must not open one either.
    no_backing: bool,
    /// Reads served by the backing file copy its clusters into the image
    /// (`OpenOptions::copy_on_read`).
    copy_on_read: bool,
    path: Option<PathBuf>,
    hs: Arc<Mutex<HeaderState>>,
    size: AtomicU64,
    l1: RwLock<L1>,
    /// Offsets of every valid L2 table, for overlap checks of data entries.
    l2_tables: RwLock<Vec<u64>>,
    /// L2 tables created in this session: their entries are ours.
    session_tables: RwLock<HashSet<u64>>,
    /// Chunks validated once against the file as opened; later loads may trust our allocations.
    validated: Mutex<HashSet<l2cache::ChunkKey>>,
    l2: L2Cache,
    /// Next free file offset (the end of the last allocated cluster).
    alloc: Arc<Mutex<u64>>,
    alloc_end: AtomicU64,
    /// The file length as set by the allocator (the file may be longer, grown by data writes);
    /// changed only under `alloc`.
    extended_to: Arc<AtomicU64>,
    /// File length when the metadata was loaded: entries at or past it were not written by us.
    open_eof: AtomicU64,
    /// Serialises creation of L2 tables.
    table_alloc: Mutex<()>,
    ranges: RangeLock,
    backing: RwLock<Option<Backing>>,
    /// The need-check bit's state and the idle timer that clears it (shares the fields the
    /// settling needs).
    idle: Arc<idle::Idle>,
    /// Shared by I/O, exclusive for repair, resize, backing change and close.
    gate: Arc<crate::sync::PinLock>,
    closed: Arc<AtomicBool>,
    lock: Mutex<Option<ImageLock>>,
    /// Whether the storage grows safely under concurrent writes past its end.
    grows_on_write: bool,
    /// Staged entries, flushes, the write-back timer and the failed state.
    wb: Arc<writeback::WriteBack>,
    /// New L2 entries are written to the file at once instead of staged until the next flush:
    /// images without a backing file, whose entries may reach the disk before their data (an
    /// unwritten cluster reads as zeros, which is what the guest saw there before).
    write_through: AtomicBool,
    /// What this handle did (shared with the write-back, which counts flushes and L2 writes).
    stats: Arc<stats::Counters>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
fn rlock<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(PoisonError::into_inner)
}
fn wlock<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(PoisonError::into_inner)
}

fn check_create_options(opts: &CreateOptions) -> Result<Geometry> {
    let g = Geometry::new(opts.cluster_size, opts.table_size).map_err(|e| match e {
        geometry::GeometryError::ClusterSize => Error::InvalidArgument {
            what: "cluster_size",
            value: opts.cluster_size as u64,
            reason: "must be a power of two from 4 KiB to 64 MiB".into(),
        },
        geometry::GeometryError::TableSize => Error::InvalidArgument {
            what: "table_size",
            value: opts.table_size as u64,
            reason: "must be a power of two from 1 to 16".into(),
        },
    })?;
    if !g.is_valid_image_size(opts.size) {
        return Err(Error::InvalidArgument {
            what: "size",
            value: opts.size,
            reason: format!(
                "must be a multiple of 512 and at most {} bytes for this geometry",
                g.max_image_size().min(u64::MAX as u128)
            ),
        });
    }
    if let Some(name) = &opts.backing_file {
        if name.is_empty()
            || name.len()
                > (g.cluster_bytes() as usize - HEADER_LEN).min(MAX_BACKING_NAME_LEN as usize)
        {
            return Err(Error::InvalidArgument {
                what: "backing_file",
                value: name.len() as u64,
                reason: "backing file name must be 1 to 4095 bytes and fit in the header cluster"
                    .into(),
            });
        }
        if name.as_bytes().contains(&0) {
            return Err(Error::InvalidArgument {
                what: "backing_file",
                value: 0,
                reason: "backing file name contains a NUL byte".into(),
            });
        }
    } else if opts.backing_format.is_some() {
        return Err(Error::InvalidArgument {
            what: "backing_format",
            value: 0,
            reason: "a backing format was given without a backing file".into(),
        });
    }
    Ok(g)
}

/// The bytes of a new image's header cluster area: header + backing name.
fn header_area(header: &Header, backing_name: Option<&str>) -> Vec<u8> {
    let mut area = header.to_bytes().to_vec();
    if let Some(name) = backing_name {
        area.extend_from_slice(name.as_bytes());
    }
    area
}

fn apply_backing(header: &mut Header, name: Option<&str>, format: Option<BackingFormat>) {
    header.features &= !(FEATURE_BACKING_FILE | FEATURE_BACKING_FORMAT_NO_PROBE);
    header.backing_filename_offset = 0;
    header.backing_filename_size = 0;
    if let Some(name) = name {
        header.features |= FEATURE_BACKING_FILE;
        if format == Some(BackingFormat::Raw) {
            header.features |= FEATURE_BACKING_FORMAT_NO_PROBE;
        }
        header.backing_filename_offset = HEADER_LEN as u32;
        header.backing_filename_size = name.len() as u32;
    }
}

impl Image {
    /// Creates a new image file at `path` (an existing file is replaced). With a backing file and
    /// `size` 0, the virtual size is the backing file's.
    pub fn create(path: impl AsRef<Path>, opts: &CreateOptions) -> Result<()> {
        let path = path.as_ref();
        let mut opts = opts.clone();
        if opts.size == 0 {
            if let Some(name) = &opts.backing_file {
                // The caller names this file explicitly: no confinement.
                let ro = OpenOptions {
                    lock: false,
                    backing_policy: BackingPolicy::Any,
                    ..OpenOptions::read_only()
                };
                let b = backing::open_by_path(path, name, opts.backing_format, &ro, &[])?;
                opts.size = b.size()?.next_multiple_of(SECTOR_SIZE);
                if opts.backing_format.is_none() {
                    opts.backing_format = Some(b.format());
                }
            }
        }
        check_create_options(&opts)?;
        let storage = FileStorage::create(path).ctx(|| format!("creating {}", path.display()))?;
        let _lock =
            lock_image(storage.file(), LockMode::ReadWrite).map_err(|e| lock_error(path, e))?;
        Self::create_on(&storage, &opts)
    }

    /// Writes a new, empty image onto `storage` (whose old content is discarded). The backing
    /// file name is stored as given and not opened.
    pub fn create_on(storage: &dyn Storage, opts: &CreateOptions) -> Result<()> {
        let g = check_create_options(opts)?;
        let mut header = Header::new(g, opts.size);
        apply_backing(
            &mut header,
            opts.backing_file.as_deref(),
            opts.backing_format,
        );
        let area = header_area(&header, opts.backing_file.as_deref());
        storage.set_len(0).ctx(|| "truncating new image".into())?;
        storage.write_at(&area, 0).ctx(|| "writing header".into())?;
        // The L1 table reads as zeros from the extended file: no need to write it (QEMU does).
        let len = (1 + g.table_size as u64) * g.cluster_bytes();
        storage.set_len(len).ctx(|| "sizing new image".into())?;
        storage.flush().ctx(|| "flushing new image".into())?;
        Ok(())
    }

    /// Opens the image file at `path`.
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Image> {
        let path = path.as_ref();
        Self::logged_open(Some(path), Self::open_file(path, opts))
    }

    fn open_file(path: &Path, opts: &OpenOptions) -> Result<Image> {
        let storage = FileStorage::open(path, opts.writable, opts.direct)
            .ctx(|| format!("opening {}", path.display()))?;
        if opts.writable && opts.force_share {
            return Err(Error::InvalidArgument {
                what: "force_share",
                value: 1,
                reason: "force-share can only be used with read-only opens".into(),
            });
        }
        // Another handle of this process: say so, rather than let the lock blame another process.
        let registration = if opts.lock && !opts.force_share {
            use std::os::unix::fs::MetadataExt;
            let m = storage
                .file()
                .metadata()
                .ctx(|| format!("reading the metadata of {}", path.display()))?;
            Some(registry::Registration::take(
                (m.dev(), m.ino()),
                opts.writable,
                &path.display().to_string(),
            )?)
        } else {
            None
        };
        let lock = if opts.lock {
            let mode = match (opts.writable, opts.force_share) {
                (true, _) => LockMode::ReadWrite,
                (false, false) => LockMode::ReadOnly,
                (false, true) => LockMode::ForceShare,
            };
            Some(lock_image(storage.file(), mode).map_err(|e| lock_error(path, e))?)
        } else {
            None
        };
        let canon = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        let storage = Arc::new(storage);
        let mut img = Self::open_inner(
            storage.clone(),
            opts,
            Some(&canon),
            std::slice::from_ref(&canon),
            lock,
        )?;
        img.file = Some(storage);
        *img.registration
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner) = registration;
        Ok(img)
    }

    /// Opens an image on caller-provided storage. A backing file is opened through
    /// `opts.backing_resolver`; without one, an image that names a backing file needs
    /// `opts.no_backing`.
    pub fn open_storage(storage: Arc<dyn Storage>, opts: &OpenOptions) -> Result<Image> {
        Self::logged_open(None, Self::open_inner(storage, opts, None, &[], None))
    }

    /// Reports how an open ended: what was opened, how, and the backing chain; or why not.
    pub(super) fn logged_open(path: Option<&Path>, r: Result<Image>) -> Result<Image> {
        let img = match &r {
            Ok(img) => img,
            Err(e) => {
                let label = stats::label_of(path);
                match e {
                    Error::InvalidHeader { .. } | Error::Unsupported { .. } => {
                        qed_log!(Warn, "{label}: open refused: {e}")
                    }
                    _ => qed_log!(Info, "{label}: open failed: {e}"),
                }
                return r;
            }
        };
        img.log_opened();
        r
    }

    fn log_opened(&self) {
        if !crate::log::enabled(crate::log::LogLevel::Info) {
            return;
        }
        let g = self.geometry;
        let mut chain = String::new();
        let mut b = self.backing();
        let mut name = lock(&self.hs).backing_name.clone();
        while let Some(n) = name.take() {
            chain.push_str(&format!(", backing {n:?}"));
            match b.take() {
                Some(Backing::Qed(img)) => {
                    chain.push_str(" (qed)");
                    b = img.backing();
                    name = lock(&img.hs).backing_name.clone();
                }
                Some(Backing::Raw(_)) => chain.push_str(" (raw)"),
                None => chain.push_str(" (not opened)"),
            }
        }
        qed_log!(
            Info,
            "{}: opened {}, virtual size {}, cluster size {}, table size {}{}",
            self.label(),
            if self.is_writable() {
                "read-write"
            } else {
                "read-only"
            },
            self.size(),
            g.cluster_bytes(),
            g.table_size,
            chain
        );
    }

    fn open_inner(
        storage: Arc<dyn Storage>,
        opts: &OpenOptions,
        path: Option<&Path>,
        chain: &[PathBuf],
        lock: Option<ImageLock>,
    ) -> Result<Image> {
        let label = stats::label_of(path);
        if opts.copy_on_read && !opts.writable {
            return Err(Error::InvalidArgument {
                what: "copy_on_read",
                value: 1,
                reason: "copy-on-read writes into the image: it needs a read-write open".into(),
            });
        }
        let counters = Arc::new(stats::Counters::default());
        let file_len = storage.len().ctx(|| "reading image length".into())?;
        let mut first = [0u8; HEADER_LEN];
        let n = file_len.min(HEADER_LEN as u64) as usize;
        storage
            .read_at(&mut first[..n], 0)
            .ctx(|| "reading header".into())?;
        let mut header = Header::parse(&first[..n])?;
        let geometry = header.validate(file_len)?;
        let backing_name = match header.backing_name_range() {
            Some((off, len)) => {
                let mut raw = vec![0u8; len];
                storage
                    .read_at(&mut raw, off)
                    .ctx(|| "reading backing file name".into())?;
                Some(parse_backing_name(&raw)?)
            }
            None => None,
        };

        // Open the backing chain before anything is written: a refused open changes nothing.
        let backing = if header.has_backing_file() && !opts.no_backing {
            let name = backing_name.as_deref().unwrap_or_default();
            let fmt = (header.features & FEATURE_BACKING_FORMAT_NO_PROBE != 0)
                .then_some(BackingFormat::Raw);
            let b = if let Some(resolver) = &opts.backing_resolver {
                resolver(name, fmt)
            } else if let Some(p) = path {
                backing::open_by_path(p, name, fmt, opts, chain)
            } else {
                Err(Error::InvalidArgument {
                    what: "backing_resolver",
                    value: 0,
                    reason: "the image has a backing file but was opened on caller storage without a resolver; pass one or open with no_backing".into(),
                })
            };
            Some(b.map_err(|e| Error::Backing {
                name: name.to_owned(),
                source: Box::new(e),
            })?)
        } else {
            None
        };

        if opts.writable && header.needs_check() && !opts.no_repair {
            qed_log!(Info, "{label}: need-check bit set: checking and repairing");
            let r = check::run(
                &*storage,
                &header,
                &geometry,
                CheckFix::ALL,
                &Progress::new(),
            )?;
            counters.repaired(&r);
            log_check(&label, "repair at open", &r);
            if r.check_errors > 0 || r.corruptions > 0 {
                let reason = if r.check_errors > 0 {
                    format!("the need-check bit is set and the repair could not read {} pieces of L2 table; nothing was reclaimed; open read-only, or retry when the storage reads again", r.check_errors)
                } else {
                    format!("{} corruptions remain after repair; open read-only or repair with a check tool", r.corruptions)
                };
                return Err(Error::Corrupt {
                    what: "image",
                    offset: 0,
                    reason,
                });
            }
            header.features &= !FEATURE_NEED_CHECK;
            storage
                .write_at(&header.to_bytes(), 0)
                .ctx(|| "clearing need-check bit".into())?;
            storage.flush().ctx(|| "flushing after repair".into())?;
            stats::add(&counters.storage_flushes, 1);
        }
        if opts.writable && header.autoclear_features & !AUTOCLEAR_FEATURE_MASK != 0 {
            header.autoclear_features &= AUTOCLEAR_FEATURE_MASK;
            storage
                .write_at(&header.to_bytes(), 0)
                .ctx(|| "clearing autoclear bits".into())?;
        }

        let writable = opts.writable;
        let grows_on_write = storage.grows_on_write();
        let has_backing_file = header.has_backing_file();
        let storage_for_wb = storage.clone();
        // Opened without the repair a set bit asks for: the bit must stay set.
        let recheck = writable && header.needs_check();
        let (header_bytes, l1_offset, image_size) = (
            header.header_bytes(),
            header.l1_table_offset,
            header.image_size,
        );
        let hs = Arc::new(Mutex::new(HeaderState {
            header,
            backing_name,
        }));
        let gate: Arc<crate::sync::PinLock> = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));
        let alloc = Arc::new(Mutex::new(0));
        let extended_to = Arc::new(AtomicU64::new(0));
        let wb = Arc::new(writeback::WriteBack::new(
            storage_for_wb,
            opts.writeback_delay,
            path.map(|p| p.display().to_string()),
            counters.clone(),
        ));
        let idle = Arc::new(idle::Idle::new(
            opts.need_check_delay,
            gate.clone(),
            storage.clone(),
            wb.clone(),
            hs.clone(),
            recheck,
            closed.clone(),
            alloc.clone(),
            extended_to.clone(),
            label.to_string(),
        ));
        let img = Image {
            storage,
            geometry,
            header_bytes,
            l1_offset,
            writable: AtomicBool::new(writable),
            direct: opts.direct,
            force_share: opts.force_share,
            file: None,
            registration: Mutex::new(None),
            no_backing: opts.no_backing,
            copy_on_read: opts.copy_on_read,
            path: path.map(Path::to_path_buf),
            size: AtomicU64::new(image_size),
            hs,
            l1: RwLock::new(L1 {
                entries: Vec::new(),
                bad: Vec::new(),
            }),
            l2_tables: RwLock::new(Vec::new()),
            session_tables: RwLock::new(HashSet::new()),
            validated: Mutex::new(HashSet::new()),
            l2: L2Cache::new(opts.l2_cache_bytes),
            alloc,
            alloc_end: AtomicU64::new(0),
            extended_to,
            open_eof: AtomicU64::new(0),
            table_alloc: Mutex::new(()),
            ranges: RangeLock::default(),
            backing: RwLock::new(backing),
            idle,
            gate,
            closed,
            lock: Mutex::new(lock),
            grows_on_write,
            wb,
            write_through: AtomicBool::new(!has_backing_file),
            stats: counters,
        };
        if let Err(e) = img.load_metadata() {
            // Nothing was loaded: the handle must not close like a live one (close squares the
            // file length with the allocation state, which was never read).
            img.closed.store(true, Ordering::Release);
            return Err(e);
        }
        Ok(img)
    }

    /// (Re)loads the L1 table and resets the allocation state from the file.
    fn load_metadata(&self) -> Result<()> {
        let g = self.geometry;
        let file_len = self.storage.len().ctx(|| "reading image length".into())?;
        let (l1_off, header_bytes, size) = {
            let hs = lock(&self.hs);
            (
                hs.header.l1_table_offset,
                hs.header.header_bytes(),
                hs.header.image_size,
            )
        };
        let n = Self::l1_loaded_len(&g, size);
        // Read in pieces; the old table stays in place until the new one is complete, so a
        // failed read leaves the handle's state as it was.
        let mut entries = Vec::with_capacity(n as usize);
        let mut bytes = Vec::new();
        let mut done = 0;
        while done < n {
            let count = (n - done).min(64 * 1024);
            bytes.resize(count as usize * 8, 0);
            let at = l1_off + done * 8;
            self.storage
                .read_at(&mut bytes, at)
                .ctx(|| format!("reading L1 table at {at:#x}"))?;
            table::decode_entries(&bytes, &mut entries);
            done += count;
        }
        drop(bytes);
        let (bad, tables) = Self::validate_l1(&g, &entries, header_bytes, l1_off, file_len);
        *wlock(&self.l1) = L1 { entries, bad };
        *wlock(&self.l2_tables) = tables;
        wlock(&self.session_tables).clear();
        lock(&self.validated).clear();
        self.l2.clear();
        let end = g.cluster_ceil(file_len);
        let mut next = lock(&self.alloc);
        *next = end;
        self.alloc_end.store(end, Ordering::Release);
        self.extended_to.store(file_len, Ordering::Release);
        drop(next);
        self.open_eof.store(file_len, Ordering::Release);
        Ok(())
    }

    /// L1 entries kept in memory: those mapping `size`, rounded up to whole 512-byte sectors so
    /// that an L1 sector can be rewritten from memory. At most 2^21 entries (16 MiB) for any
    /// valid header, however large its table.
    fn l1_loaded_len(g: &Geometry, size: u64) -> u64 {
        g.l1_entries_for(size)
            .next_multiple_of(64)
            .min(g.table_entries())
    }

    /// Flags L1 entries that are unaligned, inside the header or the L1 table, extend past the
    /// end of the file, or overlap another table. Returns the flags and the valid table offsets.
    fn validate_l1(
        g: &Geometry,
        entries: &[u64],
        header_bytes: u64,
        l1_off: u64,
        file_len: u64,
    ) -> (Vec<bool>, Vec<u64>) {
        let tb = g.table_bytes();
        let mut bad = vec![false; entries.len()];
        // Sorted offsets of the entries that pass the single-entry rules (8 bytes each: the
        // number of tables is bounded by the L1 entries kept, at most 2^21).
        let mut valid: Vec<u64> = Vec::new();
        for (i, &e) in entries.iter().enumerate() {
            if e == 0 {
                continue;
            }
            let ok = g.is_cluster_aligned(e)
                && e >= header_bytes
                && e.checked_add(tb).is_some_and(|end| end <= file_len)
                && (e + tb <= l1_off || e >= l1_off + tb);
            if ok {
                valid.push(e);
            } else {
                bad[i] = true;
            }
        }
        valid.sort_unstable();
        // Tables that overlap another (or are named twice) are all refused.
        let overlaps = |e: u64| {
            let i = valid.partition_point(|&v| v < e);
            (i > 0 && valid[i - 1] + tb > e) || valid.get(i + 1).is_some_and(|&n| n < e + tb)
        };
        for (i, &e) in entries.iter().enumerate() {
            if e != 0 && !bad[i] && overlaps(e) {
                bad[i] = true;
            }
        }
        let tables: Vec<u64> = valid.iter().copied().filter(|&e| !overlaps(e)).collect();
        (bad, tables)
    }

    /// The geometry of this image.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Whether the image is open read-write.
    pub fn is_writable(&self) -> bool {
        self.writable.load(Ordering::Acquire)
    }

    /// The open backing file, if any.
    pub fn backing(&self) -> Option<Backing> {
        rlock(&self.backing).clone()
    }

    /// The storage under the image.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// What the header says, and the file size.
    pub fn info(&self) -> Result<ImageInfo> {
        let hs = lock(&self.hs);
        let h = &hs.header;
        let declared = (h.has_backing_file() && h.features & FEATURE_BACKING_FORMAT_NO_PROBE != 0)
            .then_some(BackingFormat::Raw);
        let backing_format =
            declared.or_else(|| rlock(&self.backing).as_ref().map(Backing::format));
        Ok(ImageInfo {
            virtual_size: h.image_size,
            cluster_size: h.cluster_size,
            table_size: h.table_size,
            header_size: h.header_size,
            features: h.features,
            compat_features: h.compat_features,
            autoclear_features: h.autoclear_features,
            l1_table_offset: h.l1_table_offset,
            backing_file: hs.backing_name.clone(),
            backing_format,
            needs_check: h.needs_check(),
            file_size: self.storage.len().ctx(|| "reading image length".into())?,
            writable: self.is_writable(),
        })
    }

    /// Whether the image was opened with O_DIRECT (`OpenOptions::direct`): its I/O waits for
    /// the device, so callers size their thread pools for that.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Puts the image file's name in front of an I/O error's context (the storage does not
    /// know it), so that a message such as a full disk's says which file.
    fn named<T>(&self, r: Result<T>) -> Result<T> {
        r.map_err(|e| match (e, &self.path) {
            (Error::Io { context, source }, Some(p)) => Error::Io {
                context: format!("{}: {context}", p.display()),
                source,
            },
            (e, _) => e,
        })
    }

    /// Records a failure after which durability cannot be promised: the image refuses further
    /// requests until reopened.
    pub(super) fn fail(&self, e: Error) -> Error {
        self.wb.fail(e)
    }

    /// Writes staged L2 entries back (see [`writeback::WriteBack::writeback`]).
    pub(super) fn writeback(&self) -> Result<()> {
        self.wb.writeback()
    }

    /// Flushes the storage, sharing one flush among concurrent callers. A failed flush fails
    /// the image.
    pub(super) fn sync(&self) -> Result<()> {
        self.wb.sync()
    }

    fn check_usable(&self) -> Result<()> {
        if self.wb.is_failed() {
            return Err(self.wb.failed_error());
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::InvalidArgument {
                what: "image",
                value: 0,
                reason: "image is closed".into(),
            });
        }
        Ok(())
    }

    /// Checks that the image is open, usable and writable.
    pub fn check_writable(&self) -> Result<()> {
        self.check_usable()?;
        if !self.is_writable() {
            return Err(Error::ReadOnly);
        }
        Ok(())
    }

    /// Writes the header's fixed fields (need-check bit, size). A failure is not fatal: the
    /// sector holds the old or the new fields, and either is consistent with the tables (the
    /// bit only asks for a check; a grown size is already backed by zeroed clusters); memory
    /// keeps the old ones and a later call writes them again.
    fn write_header(&self, h: &Header) -> Result<()> {
        self.storage
            .write_at(&h.to_bytes(), 0)
            .ctx(|| "writing header".into())?;
        self.wb.meta_changed();
        Ok(())
    }

    /// Sets the need-check bit and flushes it before the first metadata update after a clean
    /// state (QEMU does not flush it; a reordering cache could then persist an L2 update without
    /// the bit).
    fn mark_dirty(&self) -> Result<()> {
        if !self.idle.dirty.load(Ordering::Acquire) {
            self.set_need_check()?;
        }
        // After the bit: a timer that finds it clear has nothing to settle, so the update must
        // not arm a timer before the bit it is for.
        self.idle.touched();
        Ok(())
    }

    fn set_need_check(&self) -> Result<()> {
        let _g = lock(&self.idle.dirty_lock);
        if self.idle.dirty.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut hs = lock(&self.hs);
        let mut h = hs.header.clone();
        h.features |= FEATURE_NEED_CHECK;
        qed_log!(Debug, "{}: setting the need-check bit", self.label());
        self.write_header(&h)?;
        self.sync()?;
        hs.header = h;
        self.idle.dirty.store(true, Ordering::Release);
        Ok(())
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> Result<()> {
        let r = self.flush_unnamed();
        self.account(stats::Req::Flush, 0, 0, self.named(r))
    }

    fn flush_unnamed(&self) -> Result<()> {
        self.check_usable()?;
        if !self.is_writable() {
            return Ok(());
        }
        self.writeback()
    }

    /// Grows the virtual size to `new_size` (a multiple of 512). Shrinking is refused, as QEMU
    /// refuses it: QED cannot give clusters back.
    pub fn truncate(&self, new_size: u64) -> Result<()> {
        self.named(self.truncate_unnamed(new_size))
    }

    fn truncate_unnamed(&self, new_size: u64) -> Result<()> {
        self.check_writable()?;
        let _g = self.gate.write();
        let old = self.size();
        if new_size < old {
            return Err(Error::Unsupported {
                field: "size",
                value: new_size,
                reason: format!("cannot shrink a QED image (current size {old})"),
            });
        }
        if !self.geometry.is_valid_image_size(new_size) {
            return Err(Error::InvalidArgument {
                what: "size",
                value: new_size,
                reason: format!(
                    "must be a multiple of 512 and at most {} bytes for this geometry",
                    self.geometry.max_image_size().min(u64::MAX as u128)
                ),
            });
        }
        if new_size == old {
            return Ok(());
        }
        // Load (and validate) the L1 entries the new size brings into use.
        let g = self.geometry;
        let want = Self::l1_loaded_len(&g, new_size);
        {
            let mut l1 = wlock(&self.l1);
            let have = l1.entries.len() as u64;
            if want > have {
                let hs = lock(&self.hs);
                let (l1_off, header_bytes) = (hs.header.l1_table_offset, hs.header.header_bytes());
                drop(hs);
                let mut bytes = vec![0u8; ((want - have) * 8) as usize];
                self.storage
                    .read_at(&mut bytes, l1_off + have * 8)
                    .ctx(|| "reading L1 table".into())?;
                let mut extra = Vec::new();
                table::decode_entries(&bytes, &mut extra);
                let mut all = l1.entries.clone();
                all.extend_from_slice(&extra);
                let file_len = self.open_eof.load(Ordering::Acquire);
                let (mut bad, tables) = Self::validate_l1(&g, &all, header_bytes, l1_off, file_len);
                // Keep tables this session created (past the length at open) valid.
                let session = rlock(&self.session_tables);
                for (i, e) in all.iter().enumerate() {
                    if session.contains(e) {
                        bad[i] = false;
                    }
                }
                let mut set = wlock(&self.l2_tables);
                let tables: Vec<u64> = tables
                    .into_iter()
                    .filter(|t| set.binary_search(t).is_err())
                    .collect();
                set.extend(tables);
                set.sort_unstable();
                l1.entries = all;
                l1.bad = bad;
            }
        }
        // The new area must read as zeros, not as whatever a longer backing file holds there
        // (QEMU refuses to grow such an image; we zero the area first, then publish the size).
        if let Some(b) = self.backing() {
            let reach = b.size()?.min(new_size);
            if reach > old {
                let end = g.cluster_ceil(reach);
                self.zero_locked(old, end - old)?;
                // The zero clusters must be on disk before the new size is.
                self.writeback()?;
            }
        }
        let mut hs = lock(&self.hs);
        let mut h = hs.header.clone();
        h.image_size = new_size;
        self.write_header(&h)?;
        hs.header = h;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    /// Changes the backing file named in the header (`None` removes it), as `qemu-img rebase -u`
    /// does: only the header changes, no data is copied. The new backing file is opened first
    /// (when the image was opened by path or with a resolver), so a name that cannot be opened
    /// changes nothing.
    pub fn change_backing_file(
        &self,
        name: Option<&str>,
        format: Option<BackingFormat>,
    ) -> Result<()> {
        self.check_writable()?;
        let _g = self.gate.write();
        self.change_backing_locked(name, format)
    }

    /// [`Image::change_backing_file`] for a caller that holds the gate exclusively.
    fn change_backing_locked(
        &self,
        name: Option<&str>,
        format: Option<BackingFormat>,
    ) -> Result<()> {
        let hs_header = lock(&self.hs).header.clone();
        // An unknown compatible feature may keep data in the header area the name would
        // overwrite, or depend on the backing file: QEMU refuses too.
        let unknown = hs_header.compat_features & !COMPAT_FEATURE_MASK;
        if unknown != 0 {
            return Err(Error::Unsupported {
                field: "compat_features",
                value: unknown,
                reason: "cannot change the backing file of an image with unknown compatible feature bits".into(),
            });
        }
        if let Some(n) = name {
            let room = hs_header.header_bytes().saturating_sub(HEADER_LEN as u64);
            if n.is_empty()
                || n.len() as u64 > room.min(MAX_BACKING_NAME_LEN as u64)
                || n.as_bytes().contains(&0)
            {
                return Err(Error::InvalidArgument {
                    what: "backing_file",
                    value: n.len() as u64,
                    reason: format!(
                        "backing file name must be 1 to {} bytes without NUL",
                        room.min(MAX_BACKING_NAME_LEN as u64)
                    ),
                });
            }
        }
        if name.is_none() && format.is_some() {
            return Err(Error::InvalidArgument {
                what: "backing_format",
                value: 0,
                reason: "a backing format was given without a backing file".into(),
            });
        }
        let new_backing = match name {
            Some(_) if self.no_backing => None,
            Some(n) => {
                if let Some(p) = &self.path {
                    // The caller names this file explicitly: no confinement.
                    let opts = OpenOptions {
                        backing_policy: BackingPolicy::Any,
                        ..OpenOptions::read_only()
                    };
                    let canon = p.clone();
                    Some(backing::open_by_path(p, n, format, &opts, &[canon])?)
                } else {
                    None
                }
            }
            None => None,
        };
        let mut h = hs_header;
        apply_backing(&mut h, name, format);
        if name.is_none() {
            // QEMU leaves the (empty) name at offset 64 when it removes a backing file; match
            // its header byte for byte.
            h.backing_filename_offset = HEADER_LEN as u32;
        }
        let area = header_area(&h, name);
        // Staged entries go out under the rules of the backing file they were staged under.
        self.writeback()?;
        self.storage
            .write_at(&area, 0)
            .map_err(|e| self.fail(Error::io("writing header", e)))?;
        self.wb.meta_changed();
        self.sync()?;
        let mut hs = lock(&self.hs);
        hs.header = h;
        hs.backing_name = name.map(str::to_owned);
        *wlock(&self.backing) = new_backing;
        self.write_through.store(name.is_none(), Ordering::Release);
        Ok(())
    }

    /// The allocator extends the file ahead of its allocations (a stretch); cut it back to the
    /// end of the last allocated cluster (for QEMU, which allocates at the file's end, and for
    /// check). Never grows the file: a file that ends inside a cluster (from elsewhere) keeps
    /// its length, since growing it could make a table entry that pointed past the end (and
    /// was refused as such) look valid, and a repair would then trust it over the data a
    /// read-only open serves there.
    fn square_file_length(&self) -> Result<()> {
        self.idle.square_file_length()
    }

    /// Checks the image's consistency and, with `fix`, repairs it. Runs exclusively: other
    /// requests wait until it is done.
    pub fn check(&self, fix: CheckFix) -> Result<CheckResult> {
        self.check_with(fix, &Progress::new())
    }

    /// [`Image::check`] reporting to `progress` (in guest clusters whose L2 table was examined)
    /// and stopping with [`Error::Cancelled`] when it is cancelled. A check without repair
    /// stops at once and changes nothing. A repair stops only where the file is consistent:
    /// before its first write (nothing changed), or after every corruption it found is fixed
    /// (only leaks may remain); the handle stays usable and, when anything was written, the
    /// need-check bit stays set so that the next read-write open finishes the repair.
    pub fn check_with(&self, fix: CheckFix, progress: &Progress) -> Result<CheckResult> {
        self.check_usable()?;
        if fix.any() && !self.is_writable() {
            return Err(Error::ReadOnly);
        }
        let _g = self.gate.write();
        self.named(match self.check_locked(fix, progress) {
            Err(Error::Cancelled { what }) if fix.any() => {
                // Stopped at a safe point (see check.rs): reload what the repair changed and
                // keep the need-check bit for the next open.
                self.idle.recheck.store(true, Ordering::Release);
                self.load_metadata().map_err(|e| self.fail(e))?;
                Err(Error::Cancelled { what })
            }
            // A repair stopped half way: the file may no longer match what this handle holds
            // in memory, so it may not write again (the next open repairs).
            Err(e) if fix.any() => Err(self.fail(e)),
            r => r,
        })
    }

    fn check_locked(&self, fix: CheckFix, progress: &Progress) -> Result<CheckResult> {
        if fix.any() {
            // A crash in the middle of a repair is repaired at the next open.
            self.mark_dirty()?;
        }
        if self.is_writable() {
            // The check reads the tables from the file: write staged entries back first.
            self.writeback()?;
            self.square_file_length()?;
        }
        let header = lock(&self.hs).header.clone();
        if fix.any() {
            qed_log!(Info, "{}: checking and repairing", self.label());
        }
        let r = check::run(&*self.storage, &header, &self.geometry, fix, progress);
        if fix.any() {
            // A repair rewrites tables behind the cache's back, even one that fails half way.
            self.wb.meta_changed();
        }
        let r = r?;
        if fix.any() {
            self.stats.repaired(&r);
            log_check(&self.label(), "repair", &r);
        } else {
            qed_log!(
                Info,
                "{}: check: {} corruptions, {} leaked clusters, {} unreadable tables",
                self.label(),
                r.corruptions,
                r.leaks,
                r.check_errors
            );
        }
        let left = r.check_errors > 0 || r.corruptions > 0;
        if left {
            self.idle.recheck.store(true, Ordering::Release);
        }
        if fix.any() {
            self.load_metadata()?;
            // A repaired image with nothing left to fix is clean again, as after QEMU's
            // `qemu-img check -r` (the bit was set by `mark_dirty` above). No request is in
            // flight.
            if !left {
                self.idle.recheck.store(false, Ordering::Release);
                self.idle.settle_locked()?;
            }
        }
        Ok(r)
    }

    /// Flushes, clears the need-check bit and releases the file locks. Later calls fail; calling
    /// it again does nothing. Dropping an image closes it too, ignoring errors.
    pub fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let _g = self.gate.write();
        let r = self.named(self.close_inner());
        lock(&self.lock).take();
        lock(&self.registration).take();
        match &r {
            Ok(()) => qed_log!(Info, "{}: closed", self.label()),
            Err(e) => qed_log!(Error, "{}: close failed: {e}", self.label()),
        }
        qed_log!(Debug, "{}: statistics: {:?}", self.label(), self.stats());
        r
    }

    fn close_inner(&self) -> Result<()> {
        self.wb.stop_timer();
        if !self.is_writable() {
            return Ok(());
        }
        self.leave_file_closed()
    }

    /// What a close leaves: everything written back, the file squared and flushed, the
    /// need-check bit cleared unless the handle failed (nothing more is written) or something
    /// is left to repair (the next read-write open repairs). The caller holds the gate
    /// exclusively.
    fn leave_file_closed(&self) -> Result<()> {
        if !self.idle.settle_locked()? {
            self.square_file_length()?;
            self.sync()?;
        }
        Ok(())
    }

    /// Writes everything back and clears the need-check bit now, as the idle timer does after
    /// [`OpenOptions::need_check_delay`] without metadata updates: the file is then clean, and a
    /// crash before the next allocating write needs no repair at the next open. For a caller
    /// about to copy or snapshot the file, or whose guest is quiesced. Waits for requests in
    /// flight; a read-only handle has nothing to do.
    pub fn settle(&self) -> Result<()> {
        self.check_usable()?;
        if !self.is_writable() {
            return Ok(());
        }
        let _g = self.gate.write();
        // Closed meanwhile: close settled.
        self.check_usable()?;
        // Also a flush: completed writes are durable when this returns, bit or no bit.
        self.named(self.idle.settle_locked().map(|_| ()))
    }

    /// Switches the open image between read-only and read-write in place, keeping its caches and
    /// its backing chain (which stays read-only), as QEMU's reopen does for live commit and
    /// snapshots. The file locks change as QEMU's do: a read-write handle refuses other writers
    /// and readers that do not share, a read-only one refuses writers only. Going read-only
    /// writes everything back and clears the need-check bit first (as a close does); going
    /// read-write repairs an image whose need-check bit is set (as an open does). Waits for
    /// requests in flight; requests submitted meanwhile wait for it.
    ///
    /// # Errors
    /// [`Error::Busy`] when another handle of this process has the file open in a conflicting
    /// way; [`Error::Locked`] when another process does; [`Error::InvalidArgument`] for a
    /// read-write reopen of a force-share handle; [`Error::Corrupt`] when the repair a
    /// read-write reopen needs leaves corruptions (the handle stays read-only);
    /// [`Error::Unsupported`] off Linux for image files. On any error the handle keeps its
    /// mode (unless its storage failed, which fails the handle as a failed flush does).
    pub fn reopen(&self, writable: bool) -> Result<()> {
        self.named(self.reopen_unnamed(writable))
    }

    fn reopen_unnamed(&self, writable: bool) -> Result<()> {
        self.check_usable()?;
        if writable && self.force_share {
            return Err(Error::InvalidArgument {
                what: "force_share",
                value: 1,
                reason: "a force-share handle cannot be reopened read-write".into(),
            });
        }
        if self.file.is_none() && self.path.is_some() {
            // Opened by path as another image's backing file: that image reads through it.
            return Err(Error::Unsupported {
                field: "reopen",
                value: writable.into(),
                reason: "a backing file opened as part of another image's chain cannot be reopened"
                    .into(),
            });
        }
        let _g = self.gate.write();
        if writable == self.is_writable() {
            return Ok(());
        }
        if !writable {
            self.leave_file_closed()?;
        }
        self.switch_mode(writable)?;
        if writable {
            if let Err(e) = self.prepare_writes() {
                // A failure of the storage has failed the handle already; else go back.
                if !self.wb.is_failed() {
                    let _ = self.switch_mode(false);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Changes the file's access mode, its locks and this process's registration; the caller
    /// holds the gate exclusively.
    fn switch_mode(&self, writable: bool) -> Result<()> {
        let label = self.label();
        if let Some(file) = &self.file {
            let new = file
                .reopen_file(writable)
                .ctx(|| format!("reopening {label}"))?;
            if let Some(r) = lock(&self.registration).as_mut() {
                r.change(writable, &label)?;
            }
            let mut lk = lock(&self.lock);
            if let Some(old) = lk.take() {
                let mode = old.mode();
                let new_mode = if writable {
                    LockMode::ReadWrite
                } else {
                    LockMode::ReadOnly
                };
                // Locks of one process's two descriptions conflict like any others: drop the
                // old ones first. Another process may take the file in between; we then try to
                // get our old locks back.
                let _ = old.unlock();
                match lock_image(&new, new_mode) {
                    Ok(l) => *lk = Some(l),
                    Err(e) => {
                        let back = lock_image(file.file(), mode);
                        let lost = back.is_err();
                        *lk = back.ok();
                        drop(lk);
                        if let Some(r) = lock(&self.registration).as_mut() {
                            let _ = r.change(!writable, &label);
                        }
                        let e = lock_error(self.path.as_deref().unwrap_or(Path::new("")), e);
                        if lost {
                            qed_log!(Error, "{label}: reopen failed and the old locks could not be taken again: the image is open without locks");
                        }
                        return Err(e);
                    }
                }
            }
            file.adopt(new, writable)
                .map_err(|e| self.fail(Error::io(format!("reopening {label}"), e)))?;
        }
        self.writable.store(writable, Ordering::Release);
        qed_log!(
            Info,
            "{label}: reopened {}",
            if writable { "read-write" } else { "read-only" }
        );
        Ok(())
    }

    /// What a read-write open does before the first write: repair an image whose need-check
    /// bit is set, clear unknown autoclear bits.
    fn prepare_writes(&self) -> Result<()> {
        let header = lock(&self.hs).header.clone();
        self.idle.recheck.store(false, Ordering::Release);
        if header.needs_check() {
            qed_log!(
                Info,
                "{}: need-check bit set: checking and repairing",
                self.label()
            );
            let r = self.check_locked(CheckFix::ALL, &Progress::new());
            let left = match &r {
                Ok(r) => r.corruptions > 0 || r.check_errors > 0,
                Err(_) => true,
            };
            if left {
                let r = r?;
                return Err(Error::Corrupt {
                    what: "image",
                    offset: 0,
                    reason: format!(
                        "{} corruptions and {} unreadable tables remain after the repair a read-write reopen needs; the handle stays read-only",
                        r.corruptions, r.check_errors
                    ),
                });
            }
        }
        if header.autoclear_features & !AUTOCLEAR_FEATURE_MASK != 0 {
            let mut hs = lock(&self.hs);
            let mut h = hs.header.clone();
            h.autoclear_features &= AUTOCLEAR_FEATURE_MASK;
            self.write_header(&h)?;
            hs.header = h;
        }
        Ok(())
    }

    /// Settles now if the idle timer is pending (QEMU fires it at once on drain). A failure is
    /// the handle's (it fails, and its requests report that), not the drain's: logged only.
    pub(crate) fn settle_if_pending(&self) {
        if self.is_writable() && !self.wb.is_failed() && self.idle.pending() {
            if let Err(e) = self.idle.settle() {
                qed_log!(Warn, "{}: settling at drain: {e}", self.label());
            }
        }
    }
}

/// A failed `lock_image`: a conflict with another holder is [`Error::Locked`] (EAGAIN, "is
/// another process using the image?"); anything else (no descriptor left, a file system without
/// locks) is the I/O error it is.
pub(crate) fn lock_error(path: &Path, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::WouldBlock {
        Error::Locked {
            path: path.display().to_string(),
            detail: e.to_string(),
        }
    } else {
        Error::io(format!("locking {}", path.display()), e)
    }
}

/// Reports what a check or repair found and fixed: a warning when something is left.
fn log_check(label: &str, what: &str, r: &CheckResult) {
    if r.corruptions > 0 || r.check_errors > 0 {
        qed_log!(
            Warn,
            "{label}: {what}: {} corruptions and {} unreadable tables remain ({} corruptions fixed, {} leaks fixed)",
            r.corruptions,
            r.check_errors,
            r.corruptions_fixed,
            r.leaks_fixed
        );
    } else {
        qed_log!(
            Info,
            "{label}: {what}: {} corruptions fixed, {} leaked clusters reclaimed, {} leaks left",
            r.corruptions_fixed,
            r.leaks_fixed,
            r.leaks
        );
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("path", &self.path)
            .field("size", &self.size())
            .field("geometry", &self.geometry)
            .field("writable", &self.is_writable())
            .finish()
    }
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<Image>();
}
