// SPDX-License-Identifier: MIT OR Apache-2.0
//! `qed_open_with_io` / `qed_create_with_io`: images on caller-provided storage (NBD, RBD,
//! iSCSI through the host's own drivers), through a table of callbacks adapted to [`Storage`].

use super::abi::{read_in, Extensible};
use super::create::{create_options, qed_create_options};
use super::image::{c_open_options, give, qed_image, qed_open_options};
use super::{qed_boundary, CError, CResult, InFn};
use crate::image::Image;
use crate::storage::Storage;
use std::ffi::{c_int, c_void};
use std::io;
use std::sync::Arc;

/// Callbacks through which the library reaches caller-provided storage. Each returns 0 or a
/// negative errno. **They may be called from several library threads at once**, with the same
/// `opaque`. Set `struct_size` first (see "Structs that grow" at the top).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct qed_io_ops {
    /// `sizeof(struct qed_io_ops)`, set by the caller.
    pub struct_size: u32,
    /// Read `len` bytes at `offset` into `buf`; bytes past the end must read as zeros.
    pub pread: Option<
        unsafe extern "C" fn(
            opaque: *mut c_void,
            buf: *mut c_void,
            len: usize,
            offset: u64,
        ) -> c_int,
    >,
    /// Write `len` bytes from `buf` at `offset`, growing the storage if needed.
    pub pwrite: Option<
        unsafe extern "C" fn(
            opaque: *mut c_void,
            buf: *const c_void,
            len: usize,
            offset: u64,
        ) -> c_int,
    >,
    /// Make every completed write durable.
    pub flush: Option<unsafe extern "C" fn(opaque: *mut c_void) -> c_int>,
    /// Store the current length in bytes in `*len`.
    pub get_length: Option<unsafe extern "C" fn(opaque: *mut c_void, len: *mut u64) -> c_int>,
    /// Set the length (growing reads as zeros).
    pub set_length: Option<unsafe extern "C" fn(opaque: *mut c_void, len: u64) -> c_int>,
    /// Optional: called once, after the last other callback, when the image is closed (or when
    /// `qed_open_with_io` fails after taking the table).
    pub release: Option<unsafe extern "C" fn(opaque: *mut c_void)>,
}

// SAFETY: repr(C), struct_size first, then optional function pointers (NULL when zeroed).
unsafe impl Extensible for qed_io_ops {
    const NAME: &'static str = "qed_io_ops";
}

struct CallbackStorage {
    ops: qed_io_ops,
    opaque: *mut c_void,
}

// SAFETY: the header documents that callbacks may be called from any library thread at once;
// the caller promises `opaque` is usable that way.
unsafe impl Send for CallbackStorage {}
// SAFETY: as above; we never touch `opaque` ourselves.
unsafe impl Sync for CallbackStorage {}

fn ret(r: c_int, what: &str) -> io::Result<()> {
    match r {
        0 => Ok(()),
        r if r < 0 => Err(io::Error::from_raw_os_error(
            r.checked_neg().unwrap_or(libc::EIO),
        )),
        r => Err(io::Error::other(format!(
            "{what} callback returned {r}, expected 0 or -errno"
        ))),
    }
}

impl Storage for CallbackStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let f = self.ops.pread.expect("checked at open");
        // SAFETY: buf is valid for buf.len() writable bytes during the call.
        ret(
            unsafe { f(self.opaque, buf.as_mut_ptr().cast(), buf.len(), offset) },
            "pread",
        )
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let f = self.ops.pwrite.expect("checked at open");
        // SAFETY: buf is valid for buf.len() readable bytes during the call.
        ret(
            unsafe { f(self.opaque, buf.as_ptr().cast(), buf.len(), offset) },
            "pwrite",
        )
    }
    fn flush(&self) -> io::Result<()> {
        let f = self.ops.flush.expect("checked at open");
        // SAFETY: calling the caller's callback with its own opaque pointer.
        ret(unsafe { f(self.opaque) }, "flush")
    }
    fn len(&self) -> io::Result<u64> {
        let f = self.ops.get_length.expect("checked at open");
        let mut len = 0u64;
        // SAFETY: &mut len is a valid out-pointer for the call.
        ret(unsafe { f(self.opaque, &mut len) }, "get_length")?;
        Ok(len)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let f = self.ops.set_length.expect("checked at open");
        // SAFETY: calling the caller's callback with its own opaque pointer.
        ret(unsafe { f(self.opaque, len) }, "set_length")
    }
}

impl Drop for CallbackStorage {
    fn drop(&mut self) {
        if let Some(release) = self.ops.release {
            // SAFETY: the last use of opaque by the library; the caller asked to be told.
            unsafe { release(self.opaque) }
        }
    }
}

/// Checks and copies the callback table.
///
/// # Safety
/// `ops` is NULL or points to a valid table.
unsafe fn storage(
    func: &str,
    ops: *const qed_io_ops,
    opaque: *mut c_void,
) -> CResult<CallbackStorage> {
    // SAFETY: NULL (refused) or valid per the size-prefix rule; copied so the caller's table
    // may go away.
    let ops = unsafe { read_in(func, "ops", ops) }?;
    for (name, missing) in [
        ("pread", ops.pread.is_none()),
        ("pwrite", ops.pwrite.is_none()),
        ("flush", ops.flush.is_none()),
        ("get_length", ops.get_length.is_none()),
        ("set_length", ops.set_length.is_none()),
    ] {
        if missing {
            return Err(CError::arg(func, format_args!("ops->{name} is NULL")));
        }
    }
    Ok(CallbackStorage { ops, opaque })
}

/// Opens an image on caller-provided storage, with the settings in `opts` (NULL: the defaults,
/// read-only; see `qed_open_ext`). An image that names a backing file needs
/// `QED_OPEN_NO_BACKING` here. No file locks are taken and `QED_OPEN_DIRECT` has no effect:
/// the caller's storage is its own.
///
/// **Returns:** as `qed_open_ext`; `-EINVAL` also when a required callback is NULL.
///
/// **Ownership:** `ops` and `opts` are copied; `opaque` is passed to every callback until
/// `release` (if set) is called, once, when the handle is closed or when this call fails after
/// checking `ops`. The handle must eventually be released with `qed_close`.
///
/// **Thread-safety:** may be called from any thread. **The callbacks may be called from several
/// library threads at once.**
///
/// **NULL:** `ops` and `out` must not be NULL; `opaque` and `opts` may be.
///
/// # Safety
/// Pointers must be NULL where allowed or valid for the access described above; a handle
/// must come from `qed_open*` and not have been closed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_open_with_io(
    ops: *const qed_io_ops,
    opaque: *mut c_void,
    opts: *const qed_open_options,
    out: *mut *mut qed_image,
) -> c_int {
    const F: &str = "qed_open_with_io";
    qed_boundary!(F, {
        if out.is_null() {
            return Err(CError::arg(F, "out is NULL"));
        }
        // SAFETY: valid table per the contract. Built first, so that `release` runs once on
        // every failure after `ops` is accepted.
        let st = unsafe { storage(F, ops, opaque) }?;
        // SAFETY: opts valid per the size-prefix rule, or NULL.
        let mut o = unsafe { c_open_options(F, opts) }?;
        o.opts.lock = false;
        let img = Image::open_storage(Arc::new(st), &o.opts).in_fn(F)?;
        // SAFETY: out is non-NULL.
        unsafe { give(F, out, img, o.aio, o.engine) }
    })
}

/// Creates an image on caller-provided storage (its old content is discarded). The backing file
/// name, if any, is stored but not opened.
///
/// **Returns:** as `qed_create`.
///
/// **Ownership:** `ops` and `opts` are borrowed for the call; once `ops` is accepted (all
/// required callbacks set), `release` (if set) is called exactly once before this returns,
/// whether it succeeds or fails.
///
/// **Thread-safety:** may be called from any thread.
///
/// # Safety
/// Pointers must be NULL where allowed or valid for the access described above; a handle
/// must come from `qed_open*` and not have been closed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_create_with_io(
    ops: *const qed_io_ops,
    opaque: *mut c_void,
    opts: *const qed_create_options,
) -> c_int {
    const F: &str = "qed_create_with_io";
    qed_boundary!(F, {
        // SAFETY: valid table per the contract. Built first, so that `release` runs once on
        // every path after `ops` is accepted, including bad options.
        let st = unsafe { storage(F, ops, opaque) }?;
        // SAFETY: valid options per the contract.
        let o = unsafe { create_options(F, opts) }?;
        Image::create_on(&st, &o).in_fn(F)?;
        Ok(0)
    })
}
