// SPDX-License-Identifier: MIT OR Apache-2.0
//! `qed_stream`.

use super::image::{image, qed_image};
use super::progress::{progress_from_c, qed_progress};
use super::{qed_boundary, InFn};
use std::ffi::c_int;

/// Streams the backing chain into the image while it stays in use: every cluster the image
/// does not have is copied from the backing chain (clusters that read as zeros become zero
/// clusters), then the data is flushed and the backing file is removed from the header, as
/// `qed_change_backing_file(img, NULL, NULL)` does. Guest reads and writes from other threads
/// and through the asynchronous queue go on meanwhile; a guest write always wins over the copy.
/// `progress` (NULL for none) is called with bytes of the virtual disk.
///
/// **Returns:** 0 when the image no longer has a backing file (also when it had none);
/// `-ECANCELED` when the progress callback returned nonzero: the image is then a valid overlay
/// that still has its backing file and reads the same, and a later `qed_stream` finishes the
/// job (as after a crash in the middle of a stream); `-EROFS` for a read-only image;
/// `-EINVAL` for a NULL image, a bad `progress` struct, or an image opened with
/// `QED_OPEN_NO_BACKING` whose header names a backing file; `-errno` for I/O errors.
///
/// **Ownership:** `progress` is borrowed for the duration of the call.
///
/// **Thread-safety:** runs on the calling thread, which it blocks until done; the progress
/// callback runs on that thread. Other threads may use the image meanwhile.
///
/// # Safety
/// `img` must come from `qed_open*` and not have been closed; `progress` is NULL or valid per
/// the size-prefix rule, and its callback may be called with its `opaque`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_stream(img: *mut qed_image, progress: *const qed_progress) -> c_int {
    const F: &str = "qed_stream";
    qed_boundary!(F, {
        // SAFETY: handle contract.
        let img = unsafe { image(F, img) }?;
        // SAFETY: NULL or valid per the size-prefix rule.
        let progress = unsafe { progress_from_c(F, progress) }?;
        img.stream(&progress).in_fn(F)?;
        Ok(0)
    })
}
