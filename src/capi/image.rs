// SPDX-License-Identifier: MIT OR Apache-2.0
//! Open, close, read, write, flush, write-zeroes, truncate, info, block status and backing
//! changes.

use super::abi::{read_in_opt, write_out, Extensible};
use super::{c_str, opt_c_str, qed_boundary, CError, CResult, InFn};
use crate::image::{
    BackingFormat, BackingPolicy, ChainKind, ExtentKind, Image, OpenOptions, WriteFlags,
    WriteZeroesFlags,
};
use std::ffi::{c_char, c_int, c_uint, c_void};
use std::sync::Arc;

/// Open the image read-write (the default is read-only).
pub const QED_OPEN_RDWR: c_uint = 1;
/// Do not open the backing file: unallocated clusters read as zeros.
pub const QED_OPEN_NO_BACKING: c_uint = 2;
/// For check tools: do not check and repair an image whose need-check bit is set.
pub const QED_OPEN_CHECK: c_uint = 4;
/// Use O_DIRECT for the image file.
pub const QED_OPEN_DIRECT: c_uint = 8;
/// Read-only opens: share the image with a writer (QEMU's force-share, `-U`).
pub const QED_OPEN_FORCE_SHARE: c_uint = 16;
/// Do not take QEMU-compatible advisory locks on the image file.
pub const QED_OPEN_NO_LOCK: c_uint = 32;
/// Confine the backing chain to regular files inside the folder of the image being opened (and
/// its subfolders); anything else is refused with -EACCES. Use it, or `QED_OPEN_NO_BACKING`,
/// for images from untrusted sources (see "Backing files and security" at the top).
pub const QED_OPEN_CONFINE_BACKING: c_uint = 64;
/// Read-write opens only (refused with -EINVAL otherwise): a read served by the backing file
/// also copies the clusters it touches into the image (QEMU's copy-on-read). A guest write
/// always wins over the copy; a copy that fails fails the read, as in QEMU.
pub const QED_OPEN_COPY_ON_READ: c_uint = 128;
const OPEN_FLAGS: c_uint = QED_OPEN_RDWR
    | QED_OPEN_NO_BACKING
    | QED_OPEN_CHECK
    | QED_OPEN_DIRECT
    | QED_OPEN_FORCE_SHARE
    | QED_OPEN_NO_LOCK
    | QED_OPEN_CONFINE_BACKING
    | QED_OPEN_COPY_ON_READ;

/// An open image. Opaque to C.
pub struct qed_image {
    pub(crate) img: Arc<Image>,
    /// The engine of `qed_open_options.engine` (`None`: the process's engine).
    pub(crate) engine: Option<crate::aio::Engine>,
    /// The asynchronous queue, started on first use (see `qed_aio_setup`).
    pub(crate) aio: std::sync::Mutex<Option<Arc<crate::aio::AioQueue>>>,
}

/// Information about an open image (filled by `qed_get_info`). Set `struct_size` first (see
/// "Structs that grow" at the top).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct qed_info {
    /// `sizeof(struct qed_info)`, set by the caller.
    pub struct_size: u32,
    /// Cluster size in bytes.
    pub cluster_size: u32,
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// L1/L2 table size in clusters.
    pub table_size: u32,
    /// Header size in clusters.
    pub header_size: u32,
    /// Incompatible feature bits as stored in the header.
    pub features: u64,
    /// Compatible feature bits.
    pub compat_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// Length of the image file in bytes.
    pub file_size: u64,
    /// File offset of the L1 table.
    pub l1_table_offset: u64,
    /// 1 if the image is open read-write.
    pub writable: u32,
    /// 1 if the need-check (dirty) bit is set.
    pub needs_check: u32,
    /// 1 if the header names a backing file (see `qed_get_backing_file`).
    pub has_backing_file: u32,
}

// SAFETY: repr(C), struct_size first, integers only.
unsafe impl Extensible for qed_info {
    const NAME: &'static str = "qed_info";
}

/// The range is not allocated in this image: it reads from the backing file, or as zeros.
/// With `QED_BLOCK_STATUS_CHAIN`: no image of the chain stores it, so it reads as zeros.
pub const QED_BLOCK_UNALLOCATED: c_uint = 0;
/// The range is allocated data at `host_offset` in the image file (with
/// `QED_BLOCK_STATUS_CHAIN`: in the file of the image at `depth`, a QED image or a raw file).
pub const QED_BLOCK_DATA: c_uint = 1;
/// The range is made of zero clusters: it reads as zeros whatever the backing file holds.
/// With `QED_BLOCK_STATUS_CHAIN` also a hole in a raw backing file (`host_offset` then gives
/// its offset in that file, with `QED_EXTENT_OFFSET_VALID`).
pub const QED_BLOCK_ZERO: c_uint = 2;

/// `qed_extent.flags`: `host_offset` is an offset in the file of the image at `depth` (set for
/// data, and for holes of a raw backing file).
pub const QED_EXTENT_OFFSET_VALID: u32 = 1;

/// `qed_block_status_ext` flag: answer through the backing chain (the chain opened with the
/// image; no file is opened): data or zeros at the depth that decides the range, or
/// unallocated in every image of the chain.
pub const QED_BLOCK_STATUS_CHAIN: c_uint = 1;
const BLOCK_STATUS_FLAGS: c_uint = QED_BLOCK_STATUS_CHAIN;

/// Request flag of `qed_write_flags`, `qed_writev_flags` and their `qed_aio_` forms: force unit
/// access. The write completes only once it is durable, with the table entries that lead to
/// it, as if a `qed_flush` followed it (NBD's FUA flag, QEMU's `BDRV_REQ_FUA`).
pub const QED_REQ_FUA: c_uint = 1;

/// Checks a request's flags: a bit this version does not know is refused (`-ENOTSUP`), never
/// ignored, so a caller asking for durability never silently goes without it.
pub(crate) fn write_flags(func: &str, flags: c_uint) -> CResult<WriteFlags> {
    WriteFlags::from_bits(flags).ok_or_else(|| CError {
        errno: libc::ENOTSUP,
        msg: format!(
            "{func}: flags {flags:#x}: unknown bits {:#x} (this version knows QED_REQ_FUA only)",
            flags & !WriteFlags::ALL.bits()
        ),
    })
}

/// Flag of `qed_write_zeroes_flags` and `qed_aio_write_zeroes_flags`: whole allocated clusters
/// may give their space back to the host file system (a hole is punched; the cluster keeps its
/// table entry and reads as zeros) instead of being overwritten with zeros (QEMU's
/// `BDRV_REQ_MAY_UNMAP`; NBD without `NBD_CMD_FLAG_NO_HOLE`).
pub const QED_ZERO_MAY_UNMAP: c_uint = 1;
/// Flag of `qed_write_zeroes_flags` and `qed_aio_write_zeroes_flags`: fail with `-ENOTSUP`,
/// changing nothing, instead of writing zero bytes anywhere (a partial cluster that does not
/// already read as zeros, or an allocated cluster without `QED_ZERO_MAY_UNMAP` or on storage
/// that cannot punch holes): QEMU's `BDRV_REQ_NO_FALLBACK`, NBD's `NBD_CMD_FLAG_FAST_ZERO`.
pub const QED_ZERO_NO_FALLBACK: c_uint = 2;

/// Checks write-zeroes flags: unknown bits are refused (`-ENOTSUP`) and named.
pub(crate) fn zero_flags(func: &str, flags: c_uint) -> CResult<WriteZeroesFlags> {
    WriteZeroesFlags::from_bits(flags).ok_or_else(|| CError {
        errno: libc::ENOTSUP,
        msg: format!(
            "{func}: flags {flags:#x}: unknown bits {:#x} (this version knows QED_ZERO_MAY_UNMAP and QED_ZERO_NO_FALLBACK only)",
            flags & !WriteZeroesFlags::ALL.bits()
        ),
    })
}

/// One extent reported by `qed_block_status` and `qed_block_status_ext`. Set `struct_size`
/// first; a caller built with the 0.1 header (32 bytes, no `depth` and `flags`) gets the
/// fields it has.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct qed_extent {
    /// `sizeof(struct qed_extent)`, set by the caller.
    pub struct_size: u32,
    /// `QED_BLOCK_DATA`, `QED_BLOCK_ZERO` or `QED_BLOCK_UNALLOCATED`.
    pub status: c_uint,
    /// Guest offset of the extent (the offset asked for).
    pub offset: u64,
    /// Length in bytes (at most the length asked for).
    pub length: u64,
    /// File offset of the first byte for `QED_BLOCK_DATA`, else 0 (see `flags`).
    pub host_offset: u64,
    /// The image that decides the range: 0 this image, 1 its backing file, and so on (0
    /// without `QED_BLOCK_STATUS_CHAIN`). Added in 0.2.
    pub depth: u32,
    /// `QED_EXTENT_OFFSET_VALID` or 0. Added in 0.2.
    pub flags: u32,
}

// SAFETY: repr(C), struct_size first, integers only.
unsafe impl Extensible for qed_extent {
    const NAME: &'static str = "qed_extent";
}

/// `qed_open_options.writeback_delay_ms`: write staged table entries back only at flush and
/// close, never by timer.
pub const QED_WRITEBACK_AT_FLUSH: u32 = u32::MAX;

/// `qed_open_options.need_check_delay_ms`: no idle timer; the need-check bit is cleared only at
/// close, by `qed_settle` and by `qed_aio_drain`.
pub const QED_NEED_CHECK_AT_CLOSE: u32 = u32::MAX;

/// Approves a backing file before it is opened (`qed_open_options.backing_approve`). `path` is
/// the file's canonical path (symbolic links resolved), `name` the name the header stores,
/// `depth` 1 for the image's own backing file, 2 for that file's backing file, and so on. Return
/// 0 to open it, or a negative errno to refuse: the open then fails with -EACCES and
/// `qed_last_error()` names the file. Called on the thread that opens, during the open only;
/// the strings are valid for the call only. It must not call libqed on the image being opened.
pub type qed_backing_approve_fn = Option<
    unsafe extern "C" fn(
        opaque: *mut c_void,
        path: *const c_char,
        name: *const c_char,
        depth: c_uint,
    ) -> c_int,
>;

/// How to open an image (`qed_open_ext`, `qed_open_with_io`). Zero-initialised fields take the
/// defaults; set `struct_size` first (see "Structs that grow" at the top).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct qed_open_options {
    /// `sizeof(struct qed_open_options)`, set by the caller.
    pub struct_size: u32,
    /// `QED_OPEN_*` flags: read-write, O_DIRECT, locking (`QED_OPEN_NO_LOCK`,
    /// `QED_OPEN_FORCE_SHARE`), backing-file policy.
    pub flags: c_uint,
    /// Byte budget of the L2 table cache (0: 128 MiB, which maps 1 TiB at the default geometry).
    pub l2_cache_size: u64,
    /// Longest backing chain accepted (0: 16).
    pub max_backing_depth: u32,
    /// Images with a backing file: milliseconds after which staged table entries are written
    /// back by a library thread if no flush came first (0: 1000; `QED_WRITEBACK_AT_FLUSH`: only
    /// at flush and close). It bounds what a killed process loses (see "Durability").
    pub writeback_delay_ms: u32,
    /// Called for each backing file of the chain before it is opened; NULL approves all
    /// (within `flags`' policy). Not called on images opened with `qed_open_with_io`, which
    /// open no backing file.
    pub backing_approve: qed_backing_approve_fn,
    /// Passed to `backing_approve`.
    pub backing_approve_opaque: *mut c_void,
    /// Settings of the image's asynchronous queue, started at open when not NULL (else the
    /// first `qed_aio_*` call starts one with the defaults). Copied during the call.
    pub aio: *const super::aio::qed_aio_options,
    /// The engine that runs this image's asynchronous requests (NULL: the process's engine,
    /// see `qed_engine_global`). The image keeps its own reference: the caller may free its
    /// `qed_engine` at any time.
    pub engine: *const super::engine::qed_engine,
    /// Read-write opens: milliseconds without metadata updates (allocations, new zero
    /// clusters) after which a library thread writes everything back and clears the
    /// need-check bit, so a host that dies while the guest idles leaves a clean image (0: 5000,
    /// as QEMU; `QED_NEED_CHECK_AT_CLOSE`: only at close, `qed_settle` and `qed_aio_drain`).
    pub need_check_delay_ms: u32,
}

// SAFETY: repr(C), struct_size first, integers, raw pointers and an optional function pointer.
unsafe impl Extensible for qed_open_options {
    const NAME: &'static str = "qed_open_options";
}

struct Approver {
    f: unsafe extern "C" fn(*mut c_void, *const c_char, *const c_char, c_uint) -> c_int,
    opaque: *mut c_void,
}
// SAFETY: the approver runs only during the open, on the opening thread; `Send`/`Sync` are
// needed only because OpenOptions may be shared, and the header says what the callback may do.
unsafe impl Send for Approver {}
// SAFETY: as above.
unsafe impl Sync for Approver {}

impl Approver {
    fn approve(&self, path: &std::path::Path, name: &str, depth: u32) -> crate::Result<()> {
        use std::os::unix::ffi::OsStrExt;
        let refused = |reason: String| crate::Error::BackingRefused {
            name: name.to_owned(),
            reason,
        };
        let cpath = std::ffi::CString::new(path.as_os_str().as_bytes())
            .map_err(|_| refused("its path contains a NUL byte".into()))?;
        let cname = std::ffi::CString::new(name)
            .map_err(|_| refused("its name contains a NUL byte".into()))?;
        // SAFETY: the caller's callback with its own opaque pointer and two strings valid for
        // the call, as the header documents.
        let r = unsafe { (self.f)(self.opaque, cpath.as_ptr(), cname.as_ptr(), depth) };
        if r == 0 {
            Ok(())
        } else {
            let err = std::io::Error::from_raw_os_error(r.checked_neg().unwrap_or(libc::EIO));
            Err(refused(format!(
                "the backing_approve callback refused {} (returned {r}: {err})",
                path.display()
            )))
        }
    }
}

/// Open options from C, checked, and the queue settings to start at open (if any).
pub(crate) struct COpen {
    pub opts: OpenOptions,
    pub aio: Option<super::aio::qed_aio_options>,
    pub engine: Option<crate::aio::Engine>,
}

/// Converts `qed_open_options` (NULL: the defaults, read-only).
///
/// # Safety
/// `o` is NULL or valid per the size-prefix rule; `o->aio` NULL or valid likewise.
pub(crate) unsafe fn c_open_options(func: &str, o: *const qed_open_options) -> CResult<COpen> {
    // SAFETY: forwarded contract.
    let Some(o) = unsafe { read_in_opt(func, "opts", o) }? else {
        return Ok(COpen {
            opts: open_options(func, 0)?,
            aio: None,
            engine: None,
        });
    };
    let mut opts = open_options(func, o.flags)?;
    if o.l2_cache_size != 0 {
        opts.l2_cache_bytes = usize::try_from(o.l2_cache_size).map_err(|_| {
            CError::arg(
                func,
                format_args!(
                    "opts->l2_cache_size {} does not fit in memory",
                    o.l2_cache_size
                ),
            )
        })?;
    }
    if o.max_backing_depth != 0 {
        opts.max_backing_depth = o.max_backing_depth;
    }
    opts.writeback_delay = match o.writeback_delay_ms {
        0 => Some(crate::image::DEFAULT_WRITEBACK_DELAY),
        QED_WRITEBACK_AT_FLUSH => None,
        ms => Some(std::time::Duration::from_millis(ms.into())),
    };
    opts.need_check_delay = match o.need_check_delay_ms {
        0 => Some(crate::image::DEFAULT_NEED_CHECK_DELAY),
        QED_NEED_CHECK_AT_CLOSE => None,
        ms => Some(std::time::Duration::from_millis(ms.into())),
    };
    if let Some(f) = o.backing_approve {
        let a = Approver {
            f,
            opaque: o.backing_approve_opaque,
        };
        opts.backing_approver = Some(Arc::new(move |p, n, d| a.approve(p, n, d)));
    }
    // SAFETY: forwarded contract.
    let aio = unsafe { read_in_opt(func, "opts->aio", o.aio) }?;
    if let Some(a) = &aio {
        super::aio::check_options(func, a)?;
    }
    // SAFETY: NULL or a live engine, per the contract.
    let engine = (!o.engine.is_null()).then(|| unsafe { (*o.engine).engine.clone() });
    Ok(COpen { opts, aio, engine })
}

pub(crate) fn open_options(func: &str, flags: c_uint) -> CResult<OpenOptions> {
    if flags & !OPEN_FLAGS != 0 {
        return Err(CError::arg(
            func,
            format_args!("unknown flags {:#x}", flags & !OPEN_FLAGS),
        ));
    }
    if flags & QED_OPEN_COPY_ON_READ != 0 && flags & QED_OPEN_RDWR == 0 {
        return Err(CError::arg(
            func,
            "QED_OPEN_COPY_ON_READ writes into the image: it needs QED_OPEN_RDWR",
        ));
    }
    Ok(OpenOptions {
        writable: flags & QED_OPEN_RDWR != 0,
        copy_on_read: flags & QED_OPEN_COPY_ON_READ != 0,
        no_backing: flags & QED_OPEN_NO_BACKING != 0,
        no_repair: flags & QED_OPEN_CHECK != 0,
        direct: flags & QED_OPEN_DIRECT != 0,
        force_share: flags & QED_OPEN_FORCE_SHARE != 0,
        lock: flags & QED_OPEN_NO_LOCK == 0,
        backing_policy: if flags & QED_OPEN_CONFINE_BACKING != 0 {
            BackingPolicy::SameDirectory
        } else {
            BackingPolicy::Any
        },
        ..OpenOptions::default()
    })
}

/// Borrows the image behind a handle.
///
/// # Safety
/// `img` is NULL or a live handle from `qed_open*`.
pub(crate) unsafe fn image<'a>(func: &str, img: *const qed_image) -> CResult<&'a Image> {
    if img.is_null() {
        return Err(CError::arg(func, "img is NULL"));
    }
    // SAFETY: non-NULL handles come from Box::into_raw in qed_open* and live until qed_close.
    Ok(unsafe { &(*img).img })
}

/// Hands a new handle to C.
///
/// # Safety
/// `out` is a valid pointer to write to.
pub(crate) unsafe fn give(
    func: &str,
    out: *mut *mut qed_image,
    img: Image,
    aio: Option<super::aio::qed_aio_options>,
    engine: Option<crate::aio::Engine>,
) -> CResult<c_int> {
    let img = Arc::new(img);
    let queue = match aio {
        Some(o) => {
            let q = super::aio::new_queue(&img, engine.as_ref(), super::aio::options(&o, &img));
            match q {
                Ok(q) => Some(Arc::new(q)),
                Err(e) => {
                    // The caller gets no handle, so the image is closed here.
                    let _ = img.close();
                    return Err(CError::core(func, e));
                }
            }
        }
        None => None,
    };
    let h = Box::into_raw(Box::new(qed_image {
        img,
        engine,
        aio: std::sync::Mutex::new(queue),
    }));
    // SAFETY: out was checked non-NULL by the caller and points to writable memory.
    unsafe { *out = h };
    Ok(0)
}

/// Builds slices from a buffer argument; `(NULL, 0)` is an empty buffer.
///
/// # Safety
/// `buf` is NULL with `len` 0, or points to `len` readable bytes.
pub(crate) unsafe fn buf_ref<'a>(
    func: &str,
    name: &str,
    buf: *const u8,
    len: usize,
) -> CResult<&'a [u8]> {
    if buf.is_null() {
        return if len == 0 {
            Ok(&[])
        } else {
            Err(CError::arg(func, format_args!("{name} is NULL")))
        };
    }
    if len > isize::MAX as usize {
        return Err(CError::arg(
            func,
            format_args!("{name} length {len} is too large"),
        ));
    }
    // SAFETY: per the contract, buf points to len readable bytes.
    Ok(unsafe { std::slice::from_raw_parts(buf, len) })
}

/// Mutable counterpart of [`buf_ref`].
///
/// # Safety
/// `buf` is NULL with `len` 0, or points to `len` writable bytes not aliased during the call.
pub(crate) unsafe fn buf_mut<'a>(
    func: &str,
    name: &str,
    buf: *mut u8,
    len: usize,
) -> CResult<&'a mut [u8]> {
    if buf.is_null() {
        return if len == 0 {
            Ok(&mut [])
        } else {
            Err(CError::arg(func, format_args!("{name} is NULL")))
        };
    }
    if len > isize::MAX as usize {
        return Err(CError::arg(
            func,
            format_args!("{name} length {len} is too large"),
        ));
    }
    // SAFETY: per the contract, buf points to len writable bytes.
    Ok(unsafe { std::slice::from_raw_parts_mut(buf, len) })
}

/// Checks an iovec array and returns its elements.
///
/// # Safety
/// `iov` is NULL with `iovcnt` 0, or points to `iovcnt` iovecs.
pub(crate) unsafe fn iovecs<'a>(
    func: &str,
    iov: *const libc::iovec,
    iovcnt: c_int,
) -> CResult<&'a [libc::iovec]> {
    if iovcnt < 0 {
        return Err(CError::arg(
            func,
            format_args!("iovcnt={iovcnt} is negative"),
        ));
    }
    if iov.is_null() {
        return if iovcnt == 0 {
            Ok(&[])
        } else {
            Err(CError::arg(func, "iov is NULL"))
        };
    }
    // SAFETY: per the contract, iov points to iovcnt elements.
    let v = unsafe { std::slice::from_raw_parts(iov, iovcnt as usize) };
    let mut total: usize = 0;
    for (i, e) in v.iter().enumerate() {
        if e.iov_base.is_null() && e.iov_len != 0 {
            return Err(CError::arg(func, format_args!("iov[{i}].iov_base is NULL")));
        }
        total = total
            .checked_add(e.iov_len)
            .filter(|&t| t <= isize::MAX as usize)
            .ok_or_else(|| CError::arg(func, "total iovec length overflows"))?;
    }
    Ok(v)
}

/// Opens the image file at `path`.
///
/// **Returns:** 0 and a handle in `*out`; `-EINVAL` for NULL arguments, unknown flags or an
/// invalid header; `-ENOTSUP` for unsupported features or backing formats; `-EAGAIN` when
/// another process holds a conflicting lock; `-EBUSY` when another handle of this process has the
/// file open read-write, or read-only for a read-write open (share that handle, or
/// `qed_reopen` it); `-EIO` for corruption that a read-write open could
/// not repair; other `-errno` from the operating system.
///
/// **Ownership:** `path` is borrowed for the call. The handle must eventually be released with
/// `qed_close`. `*out` is written only on success.
///
/// **Thread-safety:** may be called from any thread.
///
/// **NULL:** `path` and `out` must not be NULL.
///
/// # Safety
/// Pointers must be NULL where allowed or valid for the access described above; a handle
/// must come from `qed_open*` and not have been closed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_open(
    path: *const c_char,
    flags: c_uint,
    out: *mut *mut qed_image,
) -> c_int {
    const F: &str = "qed_open";
    qed_boundary!(F, {
        // SAFETY: caller passes a NUL-terminated path.
        let path = unsafe { c_str(F, "path", path) }?;
        if out.is_null() {
            return Err(CError::arg(F, "out is NULL"));
        }
        let opts = open_options(F, flags)?;
        let img = Image::open(path, &opts).in_fn(F)?;
        // SAFETY: out is non-NULL.
        unsafe { give(F, out, img, None, None) }
    })
}

/// Opens the QED image at `path` with the settings in `opts` (NULL: the defaults, read-only):
/// everything `qed_open` does, plus the L2 cache budget, the backing chain's depth limit, a
/// callback that approves each backing file, the write-back delay and the asynchronous queue.
/// An `opts` from a newer header that sets a field this library does not know is refused with
/// -ENOTSUP; one from an older header gets the defaults for the fields it lacks.
///
/// **Returns:** as `qed_open`; `-EINVAL` also for a bad `opts->struct_size` or `opts->aio`;
/// `-EACCES` when `backing_approve` refuses a backing file (nothing is written then).
///
/// **Ownership:** `opts` and `opts->aio` are borrowed for the call; `backing_approve_opaque`
/// is used only during the call. `*out` must eventually be released with `qed_close`.
///
/// **Thread-safety:** may be called from any thread.
///
/// **NULL:** `path` and `out` must not be NULL; `opts` may be.
///
/// # Safety
/// Pointers must be NULL where allowed or valid for the access described above.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_open_ext(
    path: *const c_char,
    opts: *const qed_open_options,
    out: *mut *mut qed_image,
) -> c_int {
    const F: &str = "qed_open_ext";
    qed_boundary!(F, {
        // SAFETY: caller passes a NUL-terminated path.
        let path = unsafe { c_str(F, "path", path) }?;
        if out.is_null() {
            return Err(CError::arg(F, "out is NULL"));
        }
        // SAFETY: opts valid per the size-prefix rule, or NULL.
        let o = unsafe { c_open_options(F, opts) }?;
        let img = Image::open(path, &o.opts).in_fn(F)?;
        // SAFETY: out is non-NULL.
        unsafe { give(F, out, img, o.aio, o.engine) }
    })
}

/// Flushes, clears the need-check bit, releases the locks and frees the handle.
///
/// Outstanding asynchronous requests are drained first: their callbacks run during this call
/// (on library threads, or on this thread in event-loop mode).
///
/// **Returns:** 0, or `-errno` if the final flush or header write failed, or `-EIO` if the
/// handle had failed before (nothing is written then, and the need-check bit stays set for
/// the next read-write open to repair); the handle is freed even then, like `fclose`. From
/// inside one of the image's own callbacks, or from any callback on the engine's io_uring
/// thread (which would wait for itself), it returns `-EDEADLK` and frees nothing.
///
/// **Ownership:** consumes `img`; it must not be used afterwards.
///
/// **Thread-safety:** must be the last call on `img` and must not run concurrently with any
/// other call on it.
///
/// **NULL:** `img` may be NULL (a no-op returning 0).
///
/// # Safety
/// Pointers must be NULL where allowed or valid for the access described above; a handle
/// must come from `qed_open*` and not have been closed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_close(img: *mut qed_image) -> c_int {
    qed_boundary!("qed_close", {
        if img.is_null() {
            return Ok(0);
        }
        // SAFETY: img came from Box::into_raw in qed_open* and is not used after this call.
        let h = unsafe { Box::from_raw(img) };
        let q = h
            .aio
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(q) = q {
            // Outstanding callbacks run now (on workers, or here in event-loop mode).
            if let Err(e) = q.shutdown() {
                // Called from inside one of this image's callbacks: refuse and keep the handle.
                *h.aio
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(q);
                let _ = Box::into_raw(h);
                return Err(super::CError::core("qed_close", e));
            }
        }
        let r = h.img.close();
        drop(h);
        r.in_fn("qed_close")?;
        Ok(0)
    })
}

/// Reads `len` bytes at guest `offset` into `buf`.
///
/// **Returns:** 0; `-EINVAL` for NULL arguments or a range past the virtual size; `-EIO` for
/// corrupt metadata on the way; other `-errno` from the storage.
///
/// **Ownership:** `buf` is borrowed for the call.
///
/// **Thread-safety:** may be called concurrently on the same image from any thread.
///
/// **NULL:** `buf` may be NULL only when `len` is 0.
///
/// # Safety
/// Pointers must be NULL where allowed or valid for the access described above; a handle
/// must come from `qed_open*` and not have been closed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_read(
    img: *mut qed_image,
    offset: u64,
    buf: *mut c_void,
    len: usize,
) -> c_int {
    const F: &str = "qed_read";
    qed_boundary!(F, {
        // SAFETY: handle contract.
        let img = unsafe { image(F, img) }?;
        // SAFETY: buf points to len writable bytes.
        let buf = unsafe { buf_mut(F, "buf", buf.cast(), len) }?;
        img.read_at(offset, buf).in_fn(F)?;
        Ok(0)
    })
}

/// Writes `len` bytes from `buf` at guest `offset`.
///
/// **Returns:** 0; `-EINVAL` for NULL arguments or a range past the virtual size; `-EROFS` on a
/// read-only image; `-EIO` for corrupt metadata; other `-errno` from the storage.
///
/// **Ownership:** `buf` is borrowed for the call.
///
/// **Thread-safety:** may be called concurrently on the same image from any thread.
///
/// **NULL:** `buf` may be NULL only when `len` is 0.
///
/// # Safety
/// Pointers must be NULL where allowed or valid for the access described above; a handle
/// must come from `qed_open*` and not have been closed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_write(
    img: *mut qed_image,
    offset: u64,
    buf: *const c_void,
    len: usize,
) -> c_int {
    const F: &str = "qed_write";
    qed_boundary!(F, {
        // SAFETY: forwarded contract.
        unsafe { write(F, img, offset, buf, len, 0) }
    })
}

/// `qed_write` and `qed_write_flags`.
///
/// # Safety
/// As `qed_write_flags`.
unsafe fn write(
    func: &'static str,
    img: *mut qed_image,
    offset: u64,
    buf: *const c_void,
    len: usize,
    flags: c_uint,
) -> CResult<c_int> {
    // SAFETY: handle contract.
    let img = unsafe { image(func, img) }?;
    let flags = write_flags(func, flags)?;
    // SAFETY: buf points to len readable bytes.
    let buf = unsafe { buf_ref(func, "buf", buf.cast(), len) }?;
    img.write_sg_flags(offset, &[buf], flags).in_fn(func)?;
    Ok(0)
}

/// Reads consecutive guest bytes at `offset` into the `iovcnt` buffers of `iov`.
///
/// **Returns:** as `qed_read`; `-EINVAL` also for a negative `iovcnt`.
///
/// **Ownership:** `iov` and its buffers are borrowed for the call.
///
/// **Thread-safety:** may be called concurrently on the same image from any thread.
///
/// **NULL:** `iov` may be NULL only when `iovcnt` is 0.
///
/// # Safety
/// Pointers must be NULL where allowed or valid for the access described above; a handle
/// must come from `qed_open*` and not have been closed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_readv(
    img: *mut qed_image,
    offset: u64,
    iov: *const libc::iovec,
    iovcnt: c_int,
) -> c_int {
    const F: &str = "qed_readv";
    qed_boundary!(F, {
        // SAFETY: handle contract.
        let img = unsafe { image(F, img) }?;
        // SAFETY: iov points to iovcnt elements.
        let v = unsafe { iovecs(F, iov, iovcnt) }?;
        let mut bufs: Vec<&mut [u8]> = Vec::with_capacity(v.len());
        for e in v {
            // SAFETY: each iovec names len writable bytes (checked non-NULL when len > 0).
            bufs.push(unsafe { buf_mut(F, "iov_base", e.iov_base.cast(), e.iov_len) }?);
        }
        img.read_sg(offset, &mut bufs).in_fn(F)?;
        Ok(0)
    })
}

/// Writes the `iovcnt` buffers of `iov` to consecutive guest bytes at `offset`.
///
/// **Returns:** as `qed_write`; `-EINVAL` also for a negative `iovcnt`.
///
/// **Ownership:** `iov` and its buffers are borrowed for the call.
///
/// **Thread-safety:** may be called concurrently on the same image from any thread.
///
/// **NULL:** `iov` may be NULL only when `iovcnt` is 0.
///
/// # Safety
/// Pointers must be NULL where allowed or valid for the access described above; a handle
/// must come from `qed_open*` and not have been closed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_writev(
    img: *mut qed_image,
    offset: u64,
    iov: *const libc::iovec,
    iovcnt: c_int,
) -> c_int {
    const F: &str = "qed_writev";
    qed_boundary!(F, {
        // SAFETY: forwarded contract.
        unsafe { writev(F, img, offset, iov, iovcnt, 0) }
    })
}

/// `qed_writev` and `qed_writev_flags`.
///
/// # Safety
/// As `qed_writev_flags`.
unsafe fn writev(
    func: &'static str,
    img: *mut qed_image,
    offset: u64,
    iov: *const libc::iovec,
    iovcnt: c_int,
    flags: c_uint,
) -> CResult<c_int> {
    // SAFETY: handle contract.
    let img = unsafe { image(func, img) }?;
    let flags = write_flags(func, flags)?;
    // SAFETY: iov points to iovcnt elements.
    let v = unsafe { iovecs(func, iov, iovcnt) }?;
    let mut bufs: Vec<&[u8]> = Vec::with_capacity(v.len());
    for e in v {
        // SAFETY: each iovec names len readable bytes (checked non-NULL when len > 0).
        bufs.push(unsafe { buf_ref(func, "iov_base", e.iov_base as *const u8, e.iov_len) }?);
    }
    img.write_sg_flags(offset, &bufs, flags).in_fn(func)?;
    Ok(0)
}

/// Writes `len` bytes from `buf` at guest `offset` with request `flags` (`QED_REQ_*`, or 0 for
/// a plain `qed_write`).
///
/// **Returns:** as `qed_write`; `-ENOTSUP` for a flag this version does not know. With
/// `QED_REQ_FUA`, a failure to make the write durable fails the handle as a failed `qed_flush`
/// does.
///
/// **Ownership:** `buf` is borrowed for the call.
///
/// **Thread-safety:** may be called concurrently on the same image from any thread.
///
/// **NULL:** `buf` may be NULL only when `len` is 0.
///
/// # Safety
/// Pointers must be NULL where allowed or valid for the access described above; a handle
/// must come from `qed_open*` and not have been closed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_write_flags(
    img: *mut qed_image,
    offset: u64,
    buf: *const c_void,
    len: usize,
    flags: c_uint,
) -> c_int {
    const F: &str = "qed_write_flags";
    qed_boundary!(F, {
        // SAFETY: forwarded contract.
        unsafe { write(F, img, offset, buf, len, flags) }
    })
}

/// Writes the `iovcnt` buffers of `iov` to consecutive guest bytes at `offset` with request
/// `flags`.
///
/// **Returns:** as `qed_write_flags`; `-EINVAL` also for a negative `iovcnt`.
///
/// **Ownership:** `iov` and its buffers are borrowed for the call.
///
/// **Thread-safety:** may be called concurrently on the same image from any thread.
///
/// **NULL:** `iov` may be NULL only when `iovcnt` is 0.
///
/// # Safety
/// Pointers must be NULL where allowed or valid for the access described above; a handle
/// must come from `qed_open*` and not have been closed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_writev_flags(
    img: *mut qed_image,
    offset: u64,
    iov: *const libc::iovec,
    iovcnt: c_int,
    flags: c_uint,
) -> c_int {
    const F: &str = "qed_writev_flags";
    qed_boundary!(F, {
        // SAFETY: forwarded contract.
        unsafe { writev(F, img, offset, iov, iovcnt, flags) }
    })
}

/// Makes every write completed before this call durable.
///
/// **Returns:** 0 or `-errno` from the storage. A failed flush is fatal for the handle (see
/// "Durability and storage failures" at the top): this and every later call return `-EIO`.
///
/// **Thread-safety:** may be called concurrently on the same image from any thread.
///
/// # Safety
/// Pointers must be NULL where allowed or valid for the access described above; a handle
/// must come from `qed_open*` and not have been closed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_flush(img: *mut qed_image) -> c_int {
    const F: &str = "qed_flush";
    qed_boundary!(F, {
        // SAFETY: handle contract.
        let img = unsafe { image(F, img) }?;
        img.flush().in_fn(F)?;
        Ok(0)
    })
}

/// Switches an open image between read-only (`flags` 0) and read-write (`flags`
/// `QED_OPEN_RDWR`) in place, keeping its caches, its backing chain (always read-only) and its
/// asynchronous queue, as QEMU's reopen does for live commit and snapshots. The file locks
/// change as QEMU's do, so other processes see the new mode. Going read-only writes everything
/// back and clears the need-check bit first, as `qed_close` does; going read-write repairs an
/// image whose need-check bit is set, as `qed_open` does.
///
/// **Returns:** 0 (also when the image is already in that mode); `-ENOTSUP` for any other flag
/// bit (they are fixed at open) or, off Linux, for image files; `-EBUSY` when another handle of
/// this process has the file open in a conflicting way; `-EAGAIN` when another process does;
/// `-EINVAL` for a read-write reopen of a `QED_OPEN_FORCE_SHARE` handle; `-EIO` when the repair
/// leaves corruptions. On error the handle keeps its old mode (a storage failure fails the
/// handle, as for `qed_flush`).
///
/// **Thread-safety:** may be called from any thread; waits for requests in flight, and requests
/// submitted meanwhile wait for it. Not from this image's completion callbacks.
///
/// # Safety
/// `img` must come from `qed_open*` and not have been closed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_reopen(img: *mut qed_image, flags: c_uint) -> c_int {
    const F: &str = "qed_reopen";
    qed_boundary!(F, {
        // SAFETY: handle contract.
        let img = unsafe { image(F, img) }?;
        let unknown = flags & !QED_OPEN_RDWR;
        if unknown != 0 {
            return Err(CError::core(
                F,
                crate::Error::Unsupported {
                    field: "flags",
                    value: unknown.into(),
                    reason: "only QED_OPEN_RDWR can change at reopen".into(),
                },
            ));
        }
        img.reopen(flags & QED_OPEN_RDWR != 0).in_fn(F)?;
        Ok(0)
    })
}

/// Writes everything back and clears the need-check bit now, as the idle timer does (see
/// `qed_open_options.need_check_delay_ms`): the file is then clean, and a crash before the next
/// allocating write needs no repair at the next open. For a caller about to copy or snapshot the
/// file, or whose guest is quiesced.
///
/// **Returns:** 0 (also on a read-only image, which has nothing to do); `-errno` from the
/// storage, which is fatal for the handle as for `qed_flush`.
///
/// **Thread-safety:** may be called from any thread; waits for requests in flight, and requests
/// submitted meanwhile wait for it.
///
/// # Safety
/// `img` must come from `qed_open*` and not have been closed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_settle(img: *mut qed_image) -> c_int {
    const F: &str = "qed_settle";
    qed_boundary!(F, {
        // SAFETY: handle contract.
        let img = unsafe { image(F, img) }?;
        img.settle().in_fn(F)?;
        Ok(0)
    })
}

/// Makes `len` guest bytes at `offset` read as zeros: whole unallocated clusters become zero
/// clusters without data writes; the rest is written with zeros.
///
/// **Returns:** as `qed_write`.
///
/// **Thread-safety:** may be called concurrently on the same image from any thread.
///
/// # Safety
/// Pointers must be NULL where allowed or valid for the access described above; a handle
/// must come from `qed_open*` and not have been closed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_write_zeroes(img: *mut qed_image, offset: u64, len: u64) -> c_int {
    const F: &str = "qed_write_zeroes";
    qed_boundary!(F, {
        // SAFETY: handle contract.
        let img = unsafe { image(F, img) }?;
        img.write_zeroes(offset, len).in_fn(F)?;
        Ok(0)
    })
}

/// Makes `len` guest bytes at `offset` read as zeros with request `flags` (`QED_ZERO_*`; 0
/// behaves as `qed_write_zeroes`, except that unallocated clusters of an image without a
/// backing file are left as they are).
///
/// **Returns:** as `qed_write`; `-ENOTSUP` for unknown flag bits (named in `qed_last_error`),
/// and with `QED_ZERO_NO_FALLBACK` when zeros would have to be written (nothing changed).
///
/// **Thread-safety:** may be called concurrently on the same image from any thread.
///
/// # Safety
/// Pointers must be NULL where allowed or valid for the access described above; a handle
/// must come from `qed_open*` and not have been closed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_write_zeroes_flags(
    img: *mut qed_image,
    offset: u64,
    len: u64,
    flags: c_uint,
) -> c_int {
    const F: &str = "qed_write_zeroes_flags";
    qed_boundary!(F, {
        let flags = zero_flags(F, flags)?;
        // SAFETY: handle contract.
        let img = unsafe { image(F, img) }?;
        img.write_zeroes_flags(offset, len, flags).in_fn(F)?;
        Ok(0)
    })
}

/// Discards `len` guest bytes at `offset`: afterwards they read as zeros (also over a backing
/// file), and whole data clusters give their space back to the host file system (a hole is
/// punched in the image file; the cluster keeps its table entry, so the image stays
/// consistent). Partial clusters at the ends are written with zeros; where the storage cannot
/// punch holes, allocated clusters are too. Durable after the next `qed_flush`.
///
/// **Returns:** as `qed_write`.
///
/// **Thread-safety:** may be called concurrently on the same image from any thread.
///
/// # Safety
/// Pointers must be NULL where allowed or valid for the access described above; a handle
/// must come from `qed_open*` and not have been closed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_discard(img: *mut qed_image, offset: u64, len: u64) -> c_int {
    const F: &str = "qed_discard";
    qed_boundary!(F, {
        // SAFETY: handle contract.
        let img = unsafe { image(F, img) }?;
        img.discard(offset, len).in_fn(F)?;
        Ok(0)
    })
}

/// Grows the virtual size to `new_size` bytes (a multiple of 512).
///
/// **Returns:** 0; `-ENOTSUP` for a smaller size (QED cannot shrink); `-EINVAL` for a size that
/// is not a multiple of 512 or too large for the geometry; `-EROFS` on a read-only image.
///
/// **Thread-safety:** may be called from any thread; waits for requests in progress.
///
/// # Safety
/// Pointers must be NULL where allowed or valid for the access described above; a handle
/// must come from `qed_open*` and not have been closed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_truncate(img: *mut qed_image, new_size: u64) -> c_int {
    const F: &str = "qed_truncate";
    qed_boundary!(F, {
        // SAFETY: handle contract.
        let img = unsafe { image(F, img) }?;
        img.truncate(new_size).in_fn(F)?;
        Ok(0)
    })
}

/// Fills `*info` with the image's geometry, sizes and header bits.
///
/// **Returns:** 0, or `-EINVAL` for NULL arguments. `*info` is written only on success.
///
/// **Thread-safety:** may be called concurrently on the same image from any thread.
///
/// # Safety
/// Pointers must be NULL where allowed or valid for the access described above; a handle
/// must come from `qed_open*` and not have been closed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_get_info(img: *mut qed_image, info: *mut qed_info) -> c_int {
    const F: &str = "qed_get_info";
    qed_boundary!(F, {
        // SAFETY: handle contract.
        let img = unsafe { image(F, img) }?;
        // SAFETY: NULL or valid per the size-prefix rule.
        unsafe { super::abi::check_out(F, "info", info) }?;
        let i = img.info().in_fn(F)?;
        let out = qed_info {
            struct_size: 0,
            virtual_size: i.virtual_size,
            cluster_size: i.cluster_size,
            table_size: i.table_size,
            header_size: i.header_size,
            writable: i.writable as u32,
            features: i.features,
            compat_features: i.compat_features,
            autoclear_features: i.autoclear_features,
            file_size: i.file_size,
            needs_check: i.needs_check as u32,
            has_backing_file: i.backing_file.is_some() as u32,
            l1_table_offset: i.l1_table_offset,
        };
        // SAFETY: valid per the size-prefix rule (checked above).
        unsafe { write_out(F, "info", info, out) }?;
        Ok(0)
    })
}

/// Copies the backing file name stored in the header into `buf` (NUL-terminated) and its
/// format (`"raw"`, `"qed"`, or `""` when unknown) into `fmt_buf`.
///
/// **Returns:** the length of the name (0 when the image has no backing file), or `-ERANGE` when
/// a buffer is too small (nothing is written then), `-EINVAL` for NULL arguments. A `(NULL, 0)`
/// buffer is skipped, so `qed_get_backing_file(img, NULL, 0, NULL, 0)` returns the length
/// (the buffer then needs one more byte for the NUL).
///
/// **Ownership:** both buffers are borrowed for the call.
///
/// **Thread-safety:** may be called concurrently on the same image from any thread.
///
/// **NULL:** `buf` and `fmt_buf` may be NULL when their sizes are 0.
///
/// # Safety
/// Pointers must be NULL where allowed or valid for the access described above; a handle
/// must come from `qed_open*` and not have been closed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_get_backing_file(
    img: *mut qed_image,
    buf: *mut c_char,
    size: usize,
    fmt_buf: *mut c_char,
    fmt_size: usize,
) -> c_int {
    const F: &str = "qed_get_backing_file";
    qed_boundary!(F, {
        // SAFETY: handle contract.
        let img = unsafe { image(F, img) }?;
        let i = img.info().in_fn(F)?;
        let name = i.backing_file.unwrap_or_default();
        let fmt = i.backing_format.map(BackingFormat::name).unwrap_or("");
        // SAFETY: buffers point to size/fmt_size writable bytes (or are NULL with 0).
        let b = unsafe { buf_mut(F, "buf", buf.cast(), size) }?;
        // SAFETY: as above.
        let fb = unsafe { buf_mut(F, "fmt_buf", fmt_buf.cast(), fmt_size) }?;
        // (NULL, 0) asks only for the length, like snprintf.
        if !b.is_empty() && b.len() <= name.len() {
            return Err(CError {
                errno: libc::ERANGE,
                msg: format!("{F}: name needs {} bytes", name.len() + 1),
            });
        }
        if !fb.is_empty() && fb.len() <= fmt.len() {
            return Err(CError {
                errno: libc::ERANGE,
                msg: format!("{F}: format needs {} bytes", fmt.len() + 1),
            });
        }
        if !b.is_empty() {
            b[..name.len()].copy_from_slice(name.as_bytes());
            b[name.len()] = 0;
        }
        if !fb.is_empty() {
            fb[..fmt.len()].copy_from_slice(fmt.as_bytes());
            fb[fmt.len()] = 0;
        }
        Ok(name.len() as c_int)
    })
}

/// Reports where the guest range starting at `offset` lives: the first extent of at most `len`
/// bytes whose bytes are all data (with a host offset), all zero clusters, or all unallocated.
/// Call again at `offset + extent.length` to walk a range.
///
/// **Returns:** 0 with `*extent` filled; `-EINVAL` for NULL arguments, `len` 0 or a range past
/// the virtual size; `-EIO` for corrupt metadata.
///
/// **Thread-safety:** may be called concurrently on the same image from any thread.
///
/// # Safety
/// Pointers must be NULL where allowed or valid for the access described above; a handle
/// must come from `qed_open*` and not have been closed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_block_status(
    img: *mut qed_image,
    offset: u64,
    len: u64,
    extent: *mut qed_extent,
) -> c_int {
    const F: &str = "qed_block_status";
    qed_boundary!(F, {
        // SAFETY: forwarded contract.
        unsafe { block_status(F, img, offset, len, 0, extent) }
    })
}

/// Like `qed_block_status`, with `flags`: 0 answers for this image alone (as
/// `qed_block_status`); `QED_BLOCK_STATUS_CHAIN` answers through the backing chain: data
/// (`host_offset` in the file of the image at `depth`), zeros (a zero cluster, or a hole of a
/// raw backing file) or unallocated in every image (reads as zeros; `depth` is the deepest image
/// that covers the range), each extent ending where the answer changes. An image opened with
/// `QED_OPEN_NO_BACKING` answers for itself. `extent->depth` and `extent->flags` are filled when
/// `struct_size` includes them.
///
/// **Returns:** 0 with `*extent` filled; `-EINVAL` for NULL arguments, a bad `struct_size`,
/// `len` 0 or a range past the virtual size; `-ENOTSUP` for unknown `flags` bits (nothing is
/// done); `-EIO` for corrupt metadata in any image of the chain, or a failed read of it.
///
/// **Ownership:** `extent` is the caller's, written only on success.
///
/// **Thread-safety:** may be called concurrently on the same image from any thread.
///
/// # Safety
/// Pointers must be NULL where allowed or valid for the access described above; a handle
/// must come from `qed_open*` and not have been closed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_block_status_ext(
    img: *mut qed_image,
    offset: u64,
    len: u64,
    flags: c_uint,
    extent: *mut qed_extent,
) -> c_int {
    const F: &str = "qed_block_status_ext";
    qed_boundary!(F, {
        // SAFETY: forwarded contract.
        unsafe { block_status(F, img, offset, len, flags, extent) }
    })
}

/// The body of `qed_block_status` and `qed_block_status_ext`.
///
/// # Safety
/// As for `qed_block_status_ext`.
unsafe fn block_status(
    func: &str,
    img: *mut qed_image,
    offset: u64,
    len: u64,
    flags: c_uint,
    extent: *mut qed_extent,
) -> CResult<c_int> {
    // SAFETY: handle contract.
    let img = unsafe { image(func, img) }?;
    // SAFETY: NULL or valid per the size-prefix rule.
    unsafe { super::abi::check_out(func, "extent", extent) }?;
    if flags & !BLOCK_STATUS_FLAGS != 0 {
        return Err(CError {
            errno: libc::ENOTSUP,
            msg: format!(
                "{func}: flags {flags:#x}: unknown bits {:#x} (this version knows QED_BLOCK_STATUS_CHAIN only)",
                flags & !BLOCK_STATUS_FLAGS
            ),
        });
    }
    let mut v = qed_extent::default();
    if flags & QED_BLOCK_STATUS_CHAIN != 0 {
        let e = img.block_status_chain(offset, len).in_fn(func)?;
        (v.offset, v.length, v.depth) = (e.offset, e.length, e.depth);
        v.status = match e.kind {
            ChainKind::Data => QED_BLOCK_DATA,
            ChainKind::Zero => QED_BLOCK_ZERO,
            _ => QED_BLOCK_UNALLOCATED,
        };
        if let Some(h) = e.host_offset {
            (v.host_offset, v.flags) = (h, QED_EXTENT_OFFSET_VALID);
        }
    } else {
        let e = img.block_status(offset, len).in_fn(func)?;
        (v.offset, v.length) = (e.offset, e.length);
        v.status = match e.kind {
            ExtentKind::Data { host_offset } => {
                (v.host_offset, v.flags) = (host_offset, QED_EXTENT_OFFSET_VALID);
                QED_BLOCK_DATA
            }
            ExtentKind::Zero => QED_BLOCK_ZERO,
            ExtentKind::Unallocated => QED_BLOCK_UNALLOCATED,
        };
    }
    // SAFETY: valid per the size-prefix rule (checked above).
    unsafe { write_out(func, "extent", extent, v) }?;
    Ok(0)
}

/// Changes the backing file named in the header, as `qemu-img rebase -u` does (no data is
/// copied). `backing_file` NULL removes the backing file. `backing_format` is `"raw"`, `"qed"`
/// or NULL (probe at open).
///
/// **Returns:** 0; `-EINVAL` for a name that does not fit in the header; `-ENOTSUP` for another
/// format; `-EROFS` on a read-only image; `-errno` when the new backing file cannot be opened
/// (nothing is changed then).
///
/// **Ownership:** strings are borrowed for the call.
///
/// **Thread-safety:** may be called from any thread; waits for requests in progress.
///
/// # Safety
/// Pointers must be NULL where allowed or valid for the access described above; a handle
/// must come from `qed_open*` and not have been closed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_change_backing_file(
    img: *mut qed_image,
    backing_file: *const c_char,
    backing_format: *const c_char,
) -> c_int {
    const F: &str = "qed_change_backing_file";
    qed_boundary!(F, {
        // SAFETY: handle contract.
        let img = unsafe { image(F, img) }?;
        // SAFETY: NUL-terminated or NULL.
        let name = unsafe { opt_c_str(F, "backing_file", backing_file) }?;
        // SAFETY: NUL-terminated or NULL.
        let fmt = unsafe { opt_c_str(F, "backing_format", backing_format) }?;
        let fmt = fmt.map(BackingFormat::from_name).transpose().in_fn(F)?;
        img.change_backing_file(name, fmt).in_fn(F)?;
        Ok(0)
    })
}
