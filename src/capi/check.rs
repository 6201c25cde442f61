// SPDX-License-Identifier: MIT OR Apache-2.0
//! `qed_check`.

use super::abi::{check_out, write_out, Extensible};
use super::image::{image, qed_image};
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
    const F: &str = "qed_check";
    qed_boundary!(F, {
        // SAFETY: handle contract.
        let img = unsafe { image(F, img) }?;
        // SAFETY: NULL or valid per the size-prefix rule.
        unsafe { check_out(F, "result", result) }?;
        if fix & !(QED_FIX_LEAKS | QED_FIX_ERRORS) != 0 {
            return Err(CError::arg(F, format_args!("unknown fix bits {fix:#x}")));
        }
        let f = CheckFix {
            leaks: fix & QED_FIX_LEAKS != 0,
            errors: fix & QED_FIX_ERRORS != 0,
        };
        let r = img.check(f).in_fn(F)?;
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
        unsafe { write_out(F, "result", result, out) }?;
        Ok(0)
    })
}
