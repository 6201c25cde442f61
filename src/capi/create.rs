// SPDX-License-Identifier: MIT OR Apache-2.0
//! `qed_create`.

use super::abi::{read_in, Extensible};
use super::{c_str, opt_c_str, qed_boundary, CResult, InFn};
use crate::format::{DEFAULT_CLUSTER_SIZE, DEFAULT_TABLE_SIZE};
use crate::image::{BackingFormat, CreateOptions, Image};
use std::ffi::{c_char, c_int};

/// How to create an image. Zero-initialised fields take the defaults; set `struct_size` first
/// (see "Structs that grow" at the top).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct qed_create_options {
    /// `sizeof(struct qed_create_options)`, set by the caller.
    pub struct_size: u32,
    /// Cluster size in bytes: a power of two from 4096 to 64 MiB; 0 means 65536.
    pub cluster_size: u32,
    /// Virtual size in bytes, a multiple of 512; 0 with a backing file takes its size.
    pub size: u64,
    /// Table size in clusters: a power of two from 1 to 16; 0 means 4.
    pub table_size: u32,
    /// Backing file name, stored as given (relative names resolve against the image's folder);
    /// NULL for none.
    pub backing_file: *const c_char,
    /// `"raw"` or `"qed"`; NULL lets the format be probed at open.
    pub backing_format: *const c_char,
}

// SAFETY: repr(C), struct_size first, integers and raw pointers.
unsafe impl Extensible for qed_create_options {
    const NAME: &'static str = "qed_create_options";
}

/// Converts C options to Rust ones.
///
/// # Safety
/// `o` points to a valid `qed_create_options` whose strings are NULL or NUL-terminated.
pub(crate) unsafe fn create_options(
    func: &str,
    o: *const qed_create_options,
) -> CResult<CreateOptions> {
    // SAFETY: NULL (refused) or valid per the size-prefix rule.
    let o = unsafe { read_in(func, "opts", o) }?;
    // SAFETY: NULL or NUL-terminated.
    let backing_file =
        unsafe { opt_c_str(func, "opts->backing_file", o.backing_file) }?.map(str::to_owned);
    // SAFETY: NULL or NUL-terminated.
    let fmt = unsafe { opt_c_str(func, "opts->backing_format", o.backing_format) }?;
    Ok(CreateOptions {
        size: o.size,
        cluster_size: if o.cluster_size == 0 {
            DEFAULT_CLUSTER_SIZE
        } else {
            o.cluster_size
        },
        table_size: if o.table_size == 0 {
            DEFAULT_TABLE_SIZE
        } else {
            o.table_size
        },
        backing_file,
        backing_format: fmt.map(BackingFormat::from_name).transpose().in_fn(func)?,
    })
}

/// Creates a QED image file at `path` (an existing file is replaced).
///
/// **Returns:** 0; `-EINVAL` for NULL arguments or options out of range (the message names the
/// option); `-ENOTSUP` for a backing format other than raw or qed; `-errno` from the file system.
///
/// **Ownership:** `path` and `opts` (with its strings) are borrowed for the call.
///
/// **Thread-safety:** may be called from any thread.
///
/// **NULL:** `path` and `opts` must not be NULL.
///
/// # Safety
/// Pointers must be NULL where allowed or valid for the access described above; a handle
/// must come from `qed_open*` and not have been closed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_create(path: *const c_char, opts: *const qed_create_options) -> c_int {
    const F: &str = "qed_create";
    qed_boundary!(F, {
        // SAFETY: NUL-terminated path.
        let path = unsafe { c_str(F, "path", path) }?;
        // SAFETY: valid options per the contract.
        let opts = unsafe { create_options(F, opts) }?;
        Image::create(path, &opts).in_fn(F)?;
        Ok(0)
    })
}
