// SPDX-License-Identifier: MIT OR Apache-2.0
//! `qed_commit`, `qed_copy`: long operations with a progress callback.

use super::image::{image, qed_image, QED_OPEN_CONFINE_BACKING, QED_OPEN_DIRECT, QED_OPEN_NO_LOCK};
use super::progress::{progress_from_c, qed_progress};
use super::{qed_boundary, CError, InFn};
use std::ffi::{c_int, c_uint};

/// The `qed_open` flags that apply to the backing file a commit opens.
const COMMIT_FLAGS: c_uint = QED_OPEN_CONFINE_BACKING | QED_OPEN_NO_LOCK | QED_OPEN_DIRECT;

/// Commits `img` into its backing file: writes every cluster `img` holds (data, and zero
/// clusters as zeros) into the backing file named in its header, which this call opens
/// read-write (resolved relative to the image, as `qed_open` does), growing it to `img`'s size
/// if it is shorter, then flushes and closes it. `img` is left as it is and may be read-only;
/// it must have been opened with `QED_OPEN_NO_BACKING` (its own read-only hold on the backing
/// file would refuse the write). `flags` may hold `QED_OPEN_CONFINE_BACKING`,
/// `QED_OPEN_NO_LOCK` and `QED_OPEN_DIRECT`, applied to the backing file.
///
/// Progress is in bytes of the clusters `img` holds. When the callback returns nonzero the
/// commit stops between steps of at most 2 MiB, flushes what it wrote and returns
/// `-ECANCELED`: the backing file then holds some of `img`'s clusters (each whole), which `img`
/// still shadows, so what `img` reads is unchanged and both images stay valid.
///
/// **Returns:** 0; `-EINVAL` for NULL arguments or an image without a backing file; `-ENOTSUP`
/// for other flags; `-EBUSY` when `img` holds its backing file open; `-ECANCELED` when the
/// callback stopped it; `-errno` from opening or writing the backing file (`-EAGAIN` when
/// another process holds it).
///
/// **Ownership:** `progress` is borrowed for the call and may be NULL (no reports).
///
/// **Thread-safety:** may be called from any thread, with other requests on `img` running; the
/// callback runs on the calling thread.
///
/// # Safety
/// `img` comes from `qed_open*` and was not closed; `progress` is NULL or valid per the
/// size-prefix rule, and its callback is callable with its `opaque`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_commit(
    img: *mut qed_image,
    flags: c_uint,
    progress: *const qed_progress,
) -> c_int {
    const F: &str = "qed_commit";
    qed_boundary!(F, {
        // SAFETY: handle contract.
        let img = unsafe { image(F, img) }?;
        // SAFETY: NULL or valid per the size-prefix rule.
        let progress = unsafe { progress_from_c(F, progress) }?;
        if flags & !COMMIT_FLAGS != 0 {
            return Err(CError {
                errno: libc::ENOTSUP,
                msg: format!(
                    "{F}: unsupported flags {:#x} (only QED_OPEN_CONFINE_BACKING, QED_OPEN_NO_LOCK and QED_OPEN_DIRECT apply)",
                    flags & !COMMIT_FLAGS
                ),
            });
        }
        // The commit flags are open flags, read as `qed_open` reads them.
        let opts = super::image::open_options(F, flags)?;
        img.commit(&opts, &progress).in_fn(F)?;
        Ok(0)
    })
}

/// Copies what `src` reads (through its backing chain) into `dst`, as `qemu-img convert`
/// does: zero runs of 4 KiB or more are not written as data, and are skipped altogether when
/// `dst` has no backing file and nothing allocated (a new image). `dst` must be read-write and
/// at least as large as `src`; it is flushed at the end, also when the copy stopped.
///
/// Progress is in bytes of `src` walked. When the callback returns nonzero the copy stops
/// between steps of at most 2 MiB and returns `-ECANCELED`; `dst` is a valid image holding
/// part of the copy.
///
/// **Returns:** 0; `-EINVAL` for NULL arguments, the same handle twice, or a `dst` smaller than
/// `src`; `-EROFS` when `dst` is read-only; `-ECANCELED` when the callback stopped it; `-errno`
/// for I/O errors.
///
/// **Ownership:** `progress` is borrowed for the call and may be NULL (no reports).
///
/// **Thread-safety:** may be called from any thread; the callback runs on the calling thread.
/// Writes to `src` during the copy may or may not be in the copy.
///
/// # Safety
/// `src` and `dst` come from `qed_open*` and were not closed; `progress` is NULL or valid per
/// the size-prefix rule, and its callback is callable with its `opaque`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_copy(
    src: *mut qed_image,
    dst: *mut qed_image,
    progress: *const qed_progress,
) -> c_int {
    const F: &str = "qed_copy";
    qed_boundary!(F, {
        if !src.is_null() && src == dst {
            return Err(CError::arg(F, "src and dst are the same image"));
        }
        // SAFETY: handle contract.
        let s = unsafe { image(F, src) }?;
        // SAFETY: handle contract.
        let d = unsafe { image(F, dst) }?;
        // SAFETY: NULL or valid per the size-prefix rule.
        let progress = unsafe { progress_from_c(F, progress) }?;
        s.copy_to(d, &progress).in_fn(F)?;
        Ok(0)
    })
}
