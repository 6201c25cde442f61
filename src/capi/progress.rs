// SPDX-License-Identifier: MIT OR Apache-2.0
//! `qed_progress`: the C face of [`Progress`] for long operations.

use super::abi::{read_in_opt, Extensible};
use super::CError;
use crate::image::Progress;
use std::ffi::{c_int, c_void};
use std::ops::ControlFlow;

/// Called by a long operation with how far it got: `done` of `total` (bytes for copies,
/// clusters for checks; `done` never decreases). Return 0 to go on, anything else to stop the
/// operation, which then returns `-ECANCELED` with everything it did left consistent. Called on
/// the thread that called the operation, at least at the start and at the end.
pub type qed_progress_fn =
    Option<unsafe extern "C" fn(opaque: *mut c_void, done: u64, total: u64) -> c_int>;

/// A progress callback for long operations. Set `struct_size` first (see "Structs that grow"
/// at the top); passing NULL where a `const qed_progress *` is taken means no reports and no
/// cancellation.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct qed_progress {
    /// `sizeof(struct qed_progress)`, set by the caller.
    pub struct_size: u32,
    /// The callback; NULL for none.
    pub progress: qed_progress_fn,
    /// Passed to `progress` unchanged.
    pub opaque: *mut c_void,
}

// SAFETY: repr(C), struct_size first; the pointers are plain data until called.
unsafe impl Extensible for qed_progress {
    const NAME: &'static str = "qed_progress";
}

/// The caller's opaque pointer, carried into the callback closure.
struct Opaque(*mut c_void);
// SAFETY: the header says the callback runs on the calling thread and the pointer is the
// caller's to share; we only pass it back.
unsafe impl Send for Opaque {}
// SAFETY: as above; never dereferenced here.
unsafe impl Sync for Opaque {}

/// Builds a [`Progress`] from the caller's optional `qed_progress`.
///
/// # Safety
/// `p` is NULL or valid per the size-prefix rule; its callback is callable with its opaque.
pub(crate) unsafe fn progress_from_c(
    func: &str,
    p: *const qed_progress,
) -> Result<Progress, CError> {
    // SAFETY: forwarded contract.
    let Some(p) = unsafe { read_in_opt(func, "progress", p) }? else {
        return Ok(Progress::new());
    };
    let Some(cb) = p.progress else {
        return Ok(Progress::new());
    };
    let opaque = Opaque(p.opaque);
    Ok(Progress::with_callback(move |done, total| {
        let o = &opaque;
        // SAFETY: the caller's callback with the caller's opaque, per the contract above.
        if unsafe { cb(o.0, done, total) } == 0 {
            ControlFlow::Continue(())
        } else {
            ControlFlow::Break(())
        }
    }))
}
