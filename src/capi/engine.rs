// SPDX-License-Identifier: MIT OR Apache-2.0
//! `qed_engine_*`: the I/O engine that runs asynchronous requests, shared by images.

use super::abi::{read_in_opt, write_out, Extensible};
use super::{qed_boundary, CError, InFn};
use crate::aio::{Engine, EngineOptions, IoBackend};
use std::ffi::{c_int, c_uint};

/// `qed_engine_options.backend`, `qed_engine_stats.backend`: io_uring where the kernel allows
/// it, the thread pool otherwise (the default; the environment variable `QED_IO_ENGINE`,
/// `threads` or `io_uring`, chooses for the process's engine).
pub const QED_IO_BACKEND_AUTO: c_uint = 0;
/// The thread pool: each request runs on a pool thread with `preadv`/`pwritev`.
pub const QED_IO_BACKEND_THREADS: c_uint = 1;
/// io_uring for reads and in-place writes (Linux); `qed_engine_new` fails with the kernel's
/// error where io_uring is not available.
pub const QED_IO_BACKEND_IO_URING: c_uint = 2;

/// An I/O engine: a bounded pool of threads (and, with io_uring, one ring thread) that runs
/// the asynchronous requests of every image opened with it. Opaque to C.
pub struct qed_engine {
    pub(crate) engine: Engine,
}

/// How to build an engine (`qed_engine_new`). Zero-initialised fields take the defaults; set
/// `struct_size` first (see "Structs that grow" at the top).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct qed_engine_options {
    /// `sizeof(struct qed_engine_options)`, set by the caller.
    pub struct_size: u32,
    /// Pool threads at most (0: twice the CPUs plus four, at most 64; at most 1024).
    pub threads: u32,
    /// `QED_IO_BACKEND_*`.
    pub backend: c_uint,
}

// SAFETY: repr(C), struct_size first, integers only.
unsafe impl Extensible for qed_engine_options {
    const NAME: &'static str = "qed_engine_options";
}

/// What an engine is and has done (`qed_engine_get_stats`). Set `struct_size` first.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct qed_engine_stats {
    /// `sizeof(struct qed_engine_stats)`, set by the caller.
    pub struct_size: u32,
    /// `QED_IO_BACKEND_THREADS` or `QED_IO_BACKEND_IO_URING`: the one in use.
    pub backend: c_uint,
    /// Pool threads at most.
    pub max_threads: u32,
    /// Pool threads running now.
    pub threads: u32,
    /// Requests the io_uring ring did itself.
    pub ring_requests: u64,
    /// Requests pool threads ran.
    pub pool_requests: u64,
}

// SAFETY: repr(C), struct_size first, integers only.
unsafe impl Extensible for qed_engine_stats {
    const NAME: &'static str = "qed_engine_stats";
}

/// Starts an engine for `qed_open_options.engine`. Its threads start as requests need them: an
/// engine whose images are idle has none.
///
/// **Returns:** 0 and `*out`; `-EINVAL` for a NULL `out`, a bad `struct_size`, more than 1024
/// threads or an unknown backend; `-ENOSYS`, `-EPERM` or another `-errno` when
/// `QED_IO_BACKEND_IO_URING` was asked for and the kernel refuses io_uring.
///
/// **Ownership:** `opts` (may be NULL: defaults) is read during the call. `*out` belongs to the
/// caller, who frees it with `qed_engine_free`; images opened with it hold their own
/// reference, so it may be freed while they are open.
///
/// **Thread-safety:** any thread; an engine may be used by any number of images and threads.
///
/// # Safety
/// `opts` NULL or valid per the size-prefix rule; `out` valid for writing a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_engine_new(
    opts: *const qed_engine_options,
    out: *mut *mut qed_engine,
) -> c_int {
    const F: &str = "qed_engine_new";
    qed_boundary!(F, {
        if out.is_null() {
            return Err(CError::arg(F, "out is NULL"));
        }
        // SAFETY: forwarded contract.
        let o = unsafe { read_in_opt(F, "opts", opts) }?.unwrap_or_default();
        let backend = match o.backend {
            QED_IO_BACKEND_AUTO => IoBackend::Auto,
            QED_IO_BACKEND_THREADS => IoBackend::Threads,
            QED_IO_BACKEND_IO_URING => IoBackend::IoUring,
            other => {
                return Err(CError::arg(
                    F,
                    format_args!("opts->backend {other} is not a QED_IO_BACKEND_* value"),
                ))
            }
        };
        let engine = Engine::new(EngineOptions::new(o.threads as usize, backend)).in_fn(F)?;
        // SAFETY: out is non-NULL and writable per the contract.
        unsafe { *out = Box::into_raw(Box::new(qed_engine { engine })) };
        Ok(0)
    })
}

/// A reference to the process's engine, the one images use when `qed_open_options.engine` is
/// NULL (started now if no image has used it yet).
///
/// **Returns:** 0 and `*out`; `-EINVAL` for a NULL `out` or a bad `QED_IO_ENGINE`; as
/// `qed_engine_new` when it cannot start.
///
/// **Ownership:** free `*out` with `qed_engine_free` (the engine itself stays for the
/// process's lifetime).
///
/// **Thread-safety:** any thread.
///
/// # Safety
/// `out` valid for writing a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_engine_global(out: *mut *mut qed_engine) -> c_int {
    const F: &str = "qed_engine_global";
    qed_boundary!(F, {
        if out.is_null() {
            return Err(CError::arg(F, "out is NULL"));
        }
        let engine = Engine::global().in_fn(F)?;
        // SAFETY: out is non-NULL and writable per the contract.
        unsafe { *out = Box::into_raw(Box::new(qed_engine { engine })) };
        Ok(0)
    })
}

/// Drops the caller's reference. The engine stops its threads once no reference and no image
/// uses it; images opened with it keep working.
///
/// **Ownership:** `eng` (NULL is ignored) is invalid afterwards.
///
/// **Thread-safety:** any thread, but not concurrently with other calls on the same `eng`.
///
/// # Safety
/// `eng` NULL or from `qed_engine_new` / `qed_engine_global`, not freed before.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_engine_free(eng: *mut qed_engine) {
    if eng.is_null() {
        return;
    }
    // SAFETY: from Box::into_raw in qed_engine_new / qed_engine_global, freed once.
    let b = unsafe { Box::from_raw(eng) };
    // Dropping the last reference stops threads; a panic there must not cross into C.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(b)));
}

/// Fills `out` with the engine's backend, threads and request counters.
///
/// **Returns:** 0; `-EINVAL` for NULL arguments or a bad `out->struct_size`.
///
/// **Ownership:** `out` is the caller's; written up to its `struct_size`.
///
/// **Thread-safety:** any thread.
///
/// # Safety
/// `eng` a live engine; `out` valid per the size-prefix rule.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_engine_get_stats(
    eng: *const qed_engine,
    out: *mut qed_engine_stats,
) -> c_int {
    const F: &str = "qed_engine_get_stats";
    qed_boundary!(F, {
        if eng.is_null() {
            return Err(CError::arg(F, "eng is NULL"));
        }
        // SAFETY: a live engine per the contract.
        let e = unsafe { &(*eng).engine };
        let s = e.stats();
        let v = qed_engine_stats {
            struct_size: 0,
            backend: match e.backend() {
                IoBackend::IoUring => QED_IO_BACKEND_IO_URING,
                _ => QED_IO_BACKEND_THREADS,
            },
            max_threads: e.max_threads() as u32,
            threads: s.threads as u32,
            ring_requests: s.ring_requests,
            pool_requests: s.pool_requests,
        };
        // SAFETY: valid per the size-prefix rule (the contract); write_out checks it.
        unsafe { write_out(F, "out", out, v) }?;
        Ok(0)
    })
}
