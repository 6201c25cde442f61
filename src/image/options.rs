// SPDX-License-Identifier: MIT OR Apache-2.0
//! Options for creating and opening images.

use super::backing::Backing;
use crate::error::Result;
use crate::format::{DEFAULT_CLUSTER_SIZE, DEFAULT_TABLE_SIZE};
use std::sync::Arc;

/// Format of a backing file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackingFormat {
    /// A raw file: guest offset = file offset (the header's no-probe bit is set).
    Raw,
    /// A QED image.
    Qed,
}

impl BackingFormat {
    /// Parses a format name as qemu-img spells it (`raw`, `qed`); other names are unsupported.
    pub fn from_name(name: &str) -> Result<BackingFormat> {
        match name {
            "raw" => Ok(BackingFormat::Raw),
            "qed" => Ok(BackingFormat::Qed),
            other => Err(crate::Error::Unsupported {
                field: "backing_format",
                value: 0,
                reason: format!("backing format {other:?} is not supported (only raw and qed)"),
            }),
        }
    }

    /// The qemu-img name of the format.
    pub fn name(self) -> &'static str {
        match self {
            BackingFormat::Raw => "raw",
            BackingFormat::Qed => "qed",
        }
    }
}

/// Which backing files an image may name. A backing file name comes from the image header, so an
/// image from a stranger could name any file on the host (`/etc/passwd`, a disk device) and
/// expose it to the guest; QEMU follows any path.
///
/// The default follows QEMU, so that images made by qemu-img with backing files in other folders
/// (template pools, `../base/x.qed`) keep working; names are still only ever plain paths (never
/// `json:` or protocol prefixes), loops are refused and chains are at most 16 deep. Open images
/// you did not make with [`BackingPolicy::SameDirectory`], or with `no_backing`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BackingPolicy {
    /// Follow any plain path, as QEMU does. For images you trust.
    #[default]
    Any,
    /// Backing files (the whole chain) must be regular files inside the folder of the image
    /// being opened, or its subfolders, after symbolic links are resolved.
    SameDirectory,
}

/// How to create an image. `Default` gives QEMU's defaults (64 KiB clusters, 4-cluster tables).
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Virtual size in bytes (a multiple of 512). 0 with a backing file takes its size.
    pub size: u64,
    /// Cluster size in bytes (power of two, 4 KiB ..= 64 MiB).
    pub cluster_size: u32,
    /// Table size in clusters (power of two, 1 ..= 16).
    pub table_size: u32,
    /// Backing file name, stored as given (relative names resolve against the image's folder).
    pub backing_file: Option<String>,
    /// Backing file format; `None` leaves it to be probed at open.
    pub backing_format: Option<BackingFormat>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: DEFAULT_CLUSTER_SIZE,
            table_size: DEFAULT_TABLE_SIZE,
            backing_file: None,
            backing_format: None,
        }
    }
}

impl CreateOptions {
    /// Default options for an image of `size` bytes.
    pub fn new(size: u64) -> Self {
        CreateOptions {
            size,
            ..Default::default()
        }
    }
}

/// A caller-supplied way to open backing files: given the name stored in the header and the
/// format it declares (`None`: probe), return the backing file. Used for images on caller storage
/// and to confine which files an untrusted image may name.
pub type BackingResolver =
    Arc<dyn Fn(&str, Option<BackingFormat>) -> Result<Backing> + Send + Sync>;

/// A caller-supplied check on each backing file before it is opened: given its canonical path
/// (symbolic links resolved), the name as the header stores it, and its depth in the chain (1 for
/// the image's own backing file), return `Ok(())` to open it or an error to refuse the open. It
/// runs after [`BackingPolicy`] and the chain-depth and loop checks, only for files opened by
/// path (not through a [`BackingResolver`]).
pub type BackingApprover = Arc<dyn Fn(&std::path::Path, &str, u32) -> Result<()> + Send + Sync>;

/// How to open an image.
#[derive(Clone)]
pub struct OpenOptions {
    /// Open read-write (default: read-only).
    pub writable: bool,
    /// Do not open the backing file; unallocated clusters then read as zeros.
    pub no_backing: bool,
    /// For check tools: do not check and repair an image whose need-check bit is set.
    pub no_repair: bool,
    /// Use O_DIRECT for the image file.
    pub direct: bool,
    /// Take QEMU-compatible advisory locks on the image file (default: true).
    pub lock: bool,
    /// Read-only opens only: share the image with a writer (QEMU's `-U`/force-share). Reads may
    /// then see a changing, inconsistent image.
    pub force_share: bool,
    /// Byte budget of the L2 table cache (default: 128 MiB, enough to map 1 TiB at the default
    /// geometry).
    pub l2_cache_bytes: usize,
    /// Opens backing files; the default opens them by path relative to the image's folder.
    pub backing_resolver: Option<BackingResolver>,
    /// Which backing files an image may name (default: any plain path, as QEMU).
    pub backing_policy: BackingPolicy,
    /// Approves each backing file of the chain before it is opened (default: none).
    pub backing_approver: Option<BackingApprover>,
    /// Longest backing chain accepted (default 16).
    pub max_backing_depth: u32,
    /// Images with a backing file only: new L2 entries are staged in memory (their data must be
    /// flushed before they may reach the disk) and written back at the guest's flush, or at
    /// most this long after they were staged, by a background thread (default: 1 second).
    /// That bounds what a killed process loses: completed writes into clusters allocated in
    /// the last `writeback_delay` before the kill and not flushed since. `None`: only at flush
    /// and close. Images without a backing file write their entries at once and lose nothing
    /// a process death could take.
    pub writeback_delay: Option<std::time::Duration>,
    /// Read-write opens: this long after the last metadata update (an allocation, a new zero
    /// cluster), everything is written back and the need-check bit cleared, so a host that
    /// dies while the guest idles leaves a clean image (default: 5 seconds, as QEMU). `None`
    /// (or zero): the bit is cleared only at close and by [`Image::settle`](super::Image::settle).
    pub need_check_delay: Option<std::time::Duration>,
    /// Read-write opens only: a read served by the backing file also copies the clusters it
    /// touches into the image (QEMU's `copy-on-read`), so the next read of them stays local.
    /// A guest write always wins over the copy; a copy that fails fails the read, as in QEMU.
    pub copy_on_read: bool,
}

/// Default for [`OpenOptions::writeback_delay`].
pub const DEFAULT_WRITEBACK_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

/// Default for [`OpenOptions::need_check_delay`].
pub const DEFAULT_NEED_CHECK_DELAY: std::time::Duration = std::time::Duration::from_secs(5);

/// Default L2 cache budget: 1 TiB of 64 KiB clusters needs 128 MiB of L2 entries.
pub const DEFAULT_L2_CACHE_BYTES: usize = 128 << 20;
/// Default limit on backing chain depth.
pub const DEFAULT_MAX_BACKING_DEPTH: u32 = 16;

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            writable: false,
            no_backing: false,
            no_repair: false,
            direct: false,
            lock: true,
            force_share: false,
            l2_cache_bytes: DEFAULT_L2_CACHE_BYTES,
            backing_resolver: None,
            backing_policy: BackingPolicy::Any,
            backing_approver: None,
            max_backing_depth: DEFAULT_MAX_BACKING_DEPTH,
            writeback_delay: Some(DEFAULT_WRITEBACK_DELAY),
            need_check_delay: Some(DEFAULT_NEED_CHECK_DELAY),
            copy_on_read: false,
        }
    }
}

impl std::fmt::Debug for OpenOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenOptions")
            .field("writable", &self.writable)
            .field("no_backing", &self.no_backing)
            .field("no_repair", &self.no_repair)
            .field("direct", &self.direct)
            .field("lock", &self.lock)
            .field("force_share", &self.force_share)
            .field("l2_cache_bytes", &self.l2_cache_bytes)
            .field("backing_resolver", &self.backing_resolver.is_some())
            .field("backing_policy", &self.backing_policy)
            .field("backing_approver", &self.backing_approver.is_some())
            .field("max_backing_depth", &self.max_backing_depth)
            .field("writeback_delay", &self.writeback_delay)
            .field("need_check_delay", &self.need_check_delay)
            .field("copy_on_read", &self.copy_on_read)
            .finish()
    }
}

impl OpenOptions {
    /// Read-only defaults.
    pub fn read_only() -> Self {
        Self::default()
    }
    /// Read-write defaults.
    pub fn read_write() -> Self {
        OpenOptions {
            writable: true,
            ..Self::default()
        }
    }
}
