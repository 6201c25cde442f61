// SPDX-License-Identifier: MIT OR Apache-2.0
//! `qed_check`, `qed_check_ext`.

use super::abi::{check_out, write_out, Extensible};
use super::image::{image, qed_image};
use super::progress::{progress_from_c, qed_progress};
use super::{qed_boundary, CError, InFn};
use crate::image::CheckFix;
use std::ffi::{c_int, c_uint};

/// Reclaim leaked clusters (truncating leaked clusters at the end of the file).
pub const QED_FIX_LEAKS: c_uint = 1;
/// Repair corrupt table entries.
pub const QED_FIX_ERRORS: c_uint = 2;

/// What `qed_check` found and repaired, with QEMU's fields. Set `struct_size` first (see
/// "Structs that grow" at the top).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct qed_check_result {
    /// `sizeof(struct qed_check_result)`, set by the caller.
    pub struct_size: u32,
    /// Corruptions found and not repaired.
    pub corruptions: u64,
    /// Leaked clusters not reclaimed.
    pub leaks: u64,
    /// Errors that kept the check from completing.
    pub check_errors: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaked clusters reclaimed.
    pub leaks_fixed: u64,
    /// Data clusters in use.
    pub allocated_clusters: u64,
    /// Clusters of the virtual disk.
    pub total_clusters: u64,
    /// Data clusters not directly after the previous one.
    pub fragmented_clusters: u64,
    /// File length after the check.
    pub image_end_offset: u64,
}

// SAFETY: repr(C), struct_size first, integers only.
unsafe impl Extensible for qed_check_result {
    const NAME: &'static str = "qed_check_result";
}

/// Checks the image and, with `fix` (`QED_FIX_LEAKS | QED_FIX_ERRORS`), repairs it.
///
/// **Returns:** 0 when the check ran (read `*result` for what it found: corruptions and leaks are
/// results, not call failures); `-EINVAL` for NULL arguments or unknown `fix` bits; `-EROFS` for
/// repairs on a read-only image; `-errno` when the check could not run.
///
/// **Ownership:** `result` is borrowed and written only when 0 is returned.
///
/// **Thread-safety:** may be called from any thread; other requests on the image wait for it.
///
/// # Safety
/// Pointers must be NULL where allowed or valid for the access described above; a handle
/// must come from `qed_open*` and not have been closed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_check(
    img: *mut qed_image,
    fix: c_uint,
    result: *mut qed_check_result,
) -> c_int {
    // SAFETY: forwarded contract; no progress.
    unsafe { check_impl("qed_check", img, fix, result, std::ptr::null()) }
}

/// `qed_check` with a progress callback that can also stop it. Progress is in guest clusters
/// whose L2 table was examined, of the virtual disk's clusters.
///
/// A check without repair stops at the next report after the callback returns nonzero,
/// having changed nothing. A repair stops only where the image is consistent: before its first
/// write (nothing changed), or, once it wrote a fix, after every corruption it found is fixed
/// (a stop asked for during the table scan waits until the scan's fixes are written) or between
/// two rounds of leak reclaiming. The handle stays usable; when anything was written, the
/// need-check bit stays set so that the next read-write open finishes the repair.
///
/// **Returns:** as `qed_check`, and `-ECANCELED` when the callback stopped it (`*result` is
/// not written then).
///
/// **Ownership:** `result` and `progress` are borrowed for the call; `progress` may be NULL
/// (no reports).
///
/// **Thread-safety:** may be called from any thread; the callback runs on the calling thread,
/// while other requests on the image wait: it must not call functions on `img`.
///
/// # Safety
/// As `qed_check`; `progress` is NULL or valid per the size-prefix rule, and its callback is
/// callable with its `opaque`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_check_ext(
    img: *mut qed_image,
    fix: c_uint,
    result: *mut qed_check_result,
    progress: *const qed_progress,
) -> c_int {
    // SAFETY: forwarded contract.
    unsafe { check_impl("qed_check_ext", img, fix, result, progress) }
}

/// The body of `qed_check` and `qed_check_ext`.
///
/// # Safety
/// As `qed_check_ext`.
unsafe fn check_impl(
    func: &'static str,
    img: *mut qed_image,
    fix: c_uint,
    result: *mut qed_check_result,
    progress: *const qed_progress,
) -> c_int {
    qed_boundary!(func, {
        // SAFETY: handle contract.
        let img = unsafe { image(func, img) }?;
        // SAFETY: NULL or valid per the size-prefix rule.
        unsafe { check_out(func, "result", result) }?;
        // SAFETY: NULL or valid per the size-prefix rule, per the contract.
        let progress = unsafe { progress_from_c(func, progress) }?;
        if fix & !(QED_FIX_LEAKS | QED_FIX_ERRORS) != 0 {
            return Err(CError::arg(func, format_args!("unknown fix bits {fix:#x}")));
        }
        let f = CheckFix {
            leaks: fix & QED_FIX_LEAKS != 0,
            errors: fix & QED_FIX_ERRORS != 0,
        };
        let r = img.check_with(f, &progress).in_fn(func)?;
        let out = qed_check_result {
            struct_size: 0,
            corruptions: r.corruptions,
            leaks: r.leaks,
            check_errors: r.check_errors,
            corruptions_fixed: r.corruptions_fixed,
            leaks_fixed: r.leaks_fixed,
            allocated_clusters: r.allocated_clusters,
            total_clusters: r.total_clusters,
            fragmented_clusters: r.fragmented_clusters,
            image_end_offset: r.image_end_offset,
        };
        // SAFETY: valid per the size-prefix rule (checked above).
        unsafe { write_out(func, "result", result, out) }?;
        Ok(0)
    })
}
