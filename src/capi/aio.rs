// SPDX-License-Identifier: MIT OR Apache-2.0
//! The asynchronous entry points: `qed_aio_*`, callbacks `cb(opaque, ret)` called exactly once.

use super::abi::{read_in, Extensible};
use super::image::{buf_mut, buf_ref, image, iovecs, qed_image, write_flags, zero_flags};
use super::{errno_of, qed_boundary, qed_completion_fn, CError, CResult, InFn};
use crate::aio::{AioOptions, AioQueue, Completion, Delivery, Op, RawBuf, SubmitError};
use std::ffi::{c_int, c_uint, c_void};
use std::sync::{Arc, PoisonError};

/// `qed_aio_options.flags`: deliver completions on the caller's event loop (`qed_aio_get_fd`,
/// `qed_aio_poll`) instead of on library threads. A read of up to 256 KiB whose data is in the
/// page cache (and whose L2 entries are cached) is done during the submit, on the caller's
/// thread, like an io_uring page-cache hit; its callback still runs only in `qed_aio_poll`.
/// `qed_aio_poll` runs the completions that were ready when it started, not those that its
/// callbacks cause.
pub const QED_AIO_EVENT_LOOP: c_uint = 1;
/// `qed_aio_options.flags`: when the queue is full, a submit waits for room instead of returning
/// `-EAGAIN`. (Never inside a completion callback of the same image: there it returns -EAGAIN.)
pub const QED_AIO_BLOCK_WHEN_FULL: c_uint = 2;

/// Settings of an image's asynchronous queue. Zero-initialised fields take the defaults; set
/// `struct_size` first (see "Structs that grow" at the top).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct qed_aio_options {
    /// `sizeof(struct qed_aio_options)`, set by the caller.
    pub struct_size: u32,
    /// At most this many of the image's requests run on the engine's pool threads at once (0:
    /// as many as the engine has; more than the engine has is the same; more than 1024 is
    /// refused with -EINVAL). The threads belong to the engine (`qed_open_options.engine`,
    /// by default the process's), shared by every image, not to the image.
    pub workers: u32,
    /// Requests queued or in flight at most (0: 1024; more than 1048576 is refused).
    pub queue_depth: u32,
    /// `QED_AIO_EVENT_LOOP`, `QED_AIO_BLOCK_WHEN_FULL`.
    pub flags: c_uint,
}

// SAFETY: repr(C), struct_size first, integers only.
unsafe impl Extensible for qed_aio_options {
    const NAME: &'static str = "qed_aio_options";
}

/// Refuses settings this library does not know.
pub(crate) fn check_options(func: &str, o: &qed_aio_options) -> CResult<()> {
    let unknown = o.flags & !(QED_AIO_EVENT_LOOP | QED_AIO_BLOCK_WHEN_FULL);
    if unknown != 0 {
        return Err(CError::arg(
            func,
            format_args!("unknown aio flags {unknown:#x}"),
        ));
    }
    Ok(())
}

pub(crate) fn options(o: &qed_aio_options, img: &crate::image::Image) -> AioOptions {
    let d = AioOptions::for_image(img);
    AioOptions {
        workers: if o.workers == 0 {
            d.workers
        } else {
            o.workers as usize
        },
        queue_depth: if o.queue_depth == 0 {
            d.queue_depth
        } else {
            o.queue_depth as usize
        },
        delivery: if o.flags & QED_AIO_EVENT_LOOP != 0 {
            Delivery::EventLoop
        } else {
            Delivery::Workers
        },
        block_when_full: o.flags & QED_AIO_BLOCK_WHEN_FULL != 0,
    }
}

/// A queue for `img` on `engine` (`None`: the process's engine).
pub(crate) fn new_queue(
    img: &Arc<crate::image::Image>,
    engine: Option<&crate::aio::Engine>,
    opts: AioOptions,
) -> crate::Result<AioQueue> {
    match engine {
        Some(e) => AioQueue::with_engine(img.clone(), opts, e),
        None => AioQueue::new(img.clone(), opts),
    }
}

/// The queue of a handle, started with defaults on first use.
fn queue(func: &str, h: &qed_image) -> CResult<Arc<AioQueue>> {
    let mut q = h.aio.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(q) = &*q {
        return Ok(q.clone());
    }
    let new =
        Arc::new(new_queue(&h.img, h.engine.as_ref(), AioOptions::for_image(&h.img)).in_fn(func)?);
    *q = Some(new.clone());
    Ok(new)
}

/// The handle behind the pointer.
///
/// # Safety
/// `img` is NULL or a live handle.
unsafe fn handle<'a>(func: &str, img: *mut qed_image) -> CResult<&'a qed_image> {
    // SAFETY: forwarded contract; image() checks NULL.
    unsafe { image(func, img) }?;
    // SAFETY: non-NULL live handle.
    Ok(unsafe { &*img })
}

struct SendPtr(*mut c_void);
// SAFETY: the caller promises `opaque` may be used from the library's threads (header).
unsafe impl Send for SendPtr {}

fn completion(cb: qed_completion_fn, opaque: *mut c_void) -> CResult<(Completion, u64)> {
    let Some(f) = cb else {
        return Err(CError::arg("qed_aio", "cb is NULL"));
    };
    let p = SendPtr(opaque);
    let tag = opaque as usize as u64;
    let done: Completion = Box::new(move |r| {
        let p = p;
        let ret = match r {
            Ok(()) => 0,
            Err(e) => -errno_of(&e),
        };
        // SAFETY: calling the caller's callback with its own opaque pointer, once.
        unsafe { f(p.0, ret) }
    });
    Ok((done, tag))
}

/// Submits `op` on the handle's queue.
///
/// # Safety
/// Buffers in `op` stay valid until the callback (the caller's contract).
unsafe fn submit(
    func: &str,
    h: &qed_image,
    op: Op,
    cb: qed_completion_fn,
    opaque: *mut c_void,
) -> CResult<c_int> {
    let (done, tag) = completion(cb, opaque).map_err(|e| CError {
        msg: format!("{func}: cb is NULL"),
        ..e
    })?;
    let q = queue(func, h)?;
    // SAFETY: forwarded buffer contract.
    match unsafe { q.submit(op, tag, done) } {
        Ok(()) => Ok(0),
        Err(SubmitError::Full) => Err(CError {
            errno: libc::EAGAIN,
            msg: format!(
                "{func}: queue full ({} requests outstanding)",
                q.options().queue_depth
            ),
        }),
        Err(SubmitError::Closed) => Err(CError {
            errno: libc::EINVAL,
            msg: format!("{func}: image is closing"),
        }),
    }
}

/// Sets up the image's asynchronous queue (optional: the first `qed_aio_*` submit starts one
/// with the defaults). Replaces an existing queue after draining it.
///
/// Callbacks should return promptly and must not wait for another request of the same image
/// to complete: a request submitted from inside a callback may run on that callback's own
/// worker once the callback has returned.
///
/// **Returns:** 0; `-EINVAL` for NULL arguments or unknown flags; `-EDEADLK` inside a
/// completion callback of this image.
///
/// **Ownership:** `opts` is copied.
///
/// **Thread-safety:** must not run concurrently with submits on the same image.
///
/// # Safety
/// Pointers must be NULL where allowed or valid; `img` a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_aio_setup(img: *mut qed_image, opts: *const qed_aio_options) -> c_int {
    const F: &str = "qed_aio_setup";
    qed_boundary!(F, {
        // SAFETY: handle contract.
        let h = unsafe { handle(F, img) }?;
        // SAFETY: valid per the size-prefix rule, or NULL (refused).
        let o = unsafe { read_in(F, "opts", opts) }?;
        check_options(F, &o)?;
        let mut slot = h.aio.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(old) = slot.take() {
            if let Err(e) = old.shutdown() {
                *slot = Some(old);
                return Err(CError::core(F, e));
            }
        }
        *slot = Some(Arc::new(
            new_queue(&h.img, h.engine.as_ref(), options(&o, &h.img)).in_fn(F)?,
        ));
        Ok(0)
    })
}

/// Reads `len` bytes at guest `offset` into `buf`; `cb(opaque, ret)` runs once when done.
///
/// **Returns:** 0 when accepted: then `cb` runs exactly once, later, never inside this call,
/// with `ret` 0 or a negative errno. A negative errno when refused: then `cb` never runs
/// (`-EINVAL` for bad arguments or a range past the virtual size, `-EAGAIN` when the queue is
/// full).
///
/// **Ownership:** `buf` must stay valid, and untouched by the caller, until `cb` starts.
/// `opaque` is passed to `cb` and never touched by the library.
///
/// **Thread-safety:** may be called concurrently from any thread, including from inside a
/// callback. Callbacks run on library threads unless the queue uses `QED_AIO_EVENT_LOOP`: the
/// engine's pool threads, or its io_uring thread, which also issues every image's reads and
/// writes. A callback should therefore return quickly and never wait for another request (no
/// `qed_aio_drain` or `qed_close` there; on the io_uring thread they return `-EDEADLK`).
///
/// # Safety
/// Pointers must be valid as described; `img` a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_aio_read(
    img: *mut qed_image,
    offset: u64,
    buf: *mut c_void,
    len: usize,
    cb: qed_completion_fn,
    opaque: *mut c_void,
) -> c_int {
    const F: &str = "qed_aio_read";
    qed_boundary!(F, {
        // SAFETY: handle contract.
        let h = unsafe { handle(F, img) }?;
        // SAFETY: buf points to len writable bytes.
        let b = unsafe { buf_mut(F, "buf", buf.cast(), len) }?;
        h.img.check_range(offset, len as u64).in_fn(F)?;
        let op = Op::Read {
            offset,
            bufs: vec![RawBuf {
                ptr: b.as_mut_ptr(),
                len,
            }],
        };
        // SAFETY: the caller keeps buf valid until cb.
        unsafe { submit(F, h, op, cb, opaque) }
    })
}

/// Writes `len` bytes from `buf` at guest `offset`; `cb(opaque, ret)` runs once when done.
///
/// **Returns:** as `qed_aio_read`; also `-EROFS` for a read-only image.
///
/// **Ownership:** `buf` must stay valid and unchanged until `cb` starts.
///
/// **Thread-safety:** as `qed_aio_read`.
///
/// # Safety
/// Pointers must be valid as described; `img` a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_aio_write(
    img: *mut qed_image,
    offset: u64,
    buf: *const c_void,
    len: usize,
    cb: qed_completion_fn,
    opaque: *mut c_void,
) -> c_int {
    const F: &str = "qed_aio_write";
    qed_boundary!(F, {
        // SAFETY: forwarded contract.
        unsafe { aio_write(F, img, offset, buf, len, 0, cb, opaque) }
    })
}

/// `qed_aio_write` and `qed_aio_write_flags`.
///
/// # Safety
/// As `qed_aio_write_flags`.
#[allow(clippy::too_many_arguments)]
unsafe fn aio_write(
    func: &'static str,
    img: *mut qed_image,
    offset: u64,
    buf: *const c_void,
    len: usize,
    flags: c_uint,
    cb: qed_completion_fn,
    opaque: *mut c_void,
) -> CResult<c_int> {
    // SAFETY: handle contract.
    let h = unsafe { handle(func, img) }?;
    let flags = write_flags(func, flags)?;
    // SAFETY: buf points to len readable bytes.
    let b = unsafe { buf_ref(func, "buf", buf.cast(), len) }?;
    h.img.check_writable().in_fn(func)?;
    h.img.check_range(offset, len as u64).in_fn(func)?;
    let op = Op::Write {
        offset,
        bufs: vec![RawBuf {
            ptr: b.as_ptr() as *mut u8,
            len,
        }],
        flags,
    };
    // SAFETY: the caller keeps buf valid until cb.
    unsafe { submit(func, h, op, cb, opaque) }
}

fn raw_bufs(v: &[libc::iovec]) -> (Vec<RawBuf>, u64) {
    let bufs: Vec<RawBuf> = v
        .iter()
        .map(|e| RawBuf {
            ptr: e.iov_base.cast(),
            len: e.iov_len,
        })
        .collect();
    let total = v.iter().map(|e| e.iov_len as u64).sum();
    (bufs, total)
}

/// Reads consecutive guest bytes at `offset` into the buffers of `iov`.
///
/// **Returns:** as `qed_aio_read`.
///
/// **Ownership:** the `iov` array is copied during the call and may be freed afterwards; the
/// buffers it names must stay valid until `cb` starts.
///
/// **Thread-safety:** as `qed_aio_read`.
///
/// # Safety
/// Pointers must be valid as described; `img` a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_aio_readv(
    img: *mut qed_image,
    offset: u64,
    iov: *const libc::iovec,
    iovcnt: c_int,
    cb: qed_completion_fn,
    opaque: *mut c_void,
) -> c_int {
    const F: &str = "qed_aio_readv";
    qed_boundary!(F, {
        // SAFETY: handle contract.
        let h = unsafe { handle(F, img) }?;
        // SAFETY: iov points to iovcnt elements.
        let v = unsafe { iovecs(F, iov, iovcnt) }?;
        let (bufs, total) = raw_bufs(v);
        h.img.check_range(offset, total).in_fn(F)?;
        // SAFETY: the caller keeps the buffers valid until cb.
        unsafe { submit(F, h, Op::Read { offset, bufs }, cb, opaque) }
    })
}

/// Writes the buffers of `iov` to consecutive guest bytes at `offset`.
///
/// **Returns:** as `qed_aio_write`.
///
/// **Ownership:** as `qed_aio_readv`.
///
/// **Thread-safety:** as `qed_aio_read`.
///
/// # Safety
/// Pointers must be valid as described; `img` a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_aio_writev(
    img: *mut qed_image,
    offset: u64,
    iov: *const libc::iovec,
    iovcnt: c_int,
    cb: qed_completion_fn,
    opaque: *mut c_void,
) -> c_int {
    const F: &str = "qed_aio_writev";
    qed_boundary!(F, {
        // SAFETY: forwarded contract.
        unsafe { aio_writev(F, img, offset, iov, iovcnt, 0, cb, opaque) }
    })
}

/// `qed_aio_writev` and `qed_aio_writev_flags`.
///
/// # Safety
/// As `qed_aio_writev_flags`.
#[allow(clippy::too_many_arguments)]
unsafe fn aio_writev(
    func: &'static str,
    img: *mut qed_image,
    offset: u64,
    iov: *const libc::iovec,
    iovcnt: c_int,
    flags: c_uint,
    cb: qed_completion_fn,
    opaque: *mut c_void,
) -> CResult<c_int> {
    // SAFETY: handle contract.
    let h = unsafe { handle(func, img) }?;
    let flags = write_flags(func, flags)?;
    // SAFETY: iov points to iovcnt elements.
    let v = unsafe { iovecs(func, iov, iovcnt) }?;
    h.img.check_writable().in_fn(func)?;
    let (bufs, total) = raw_bufs(v);
    h.img.check_range(offset, total).in_fn(func)?;
    let op = Op::Write {
        offset,
        bufs,
        flags,
    };
    // SAFETY: the caller keeps the buffers valid until cb.
    unsafe { submit(func, h, op, cb, opaque) }
}

/// Writes `len` bytes from `buf` at guest `offset` with request `flags` (`QED_REQ_*`);
/// `cb(opaque, ret)` runs once when done. With `QED_REQ_FUA`, `cb` runs once the write is
/// durable.
///
/// **Returns:** as `qed_aio_write`; `-ENOTSUP` (and no callback) for a flag this version does
/// not know.
///
/// **Ownership:** `buf` must stay valid and unchanged until `cb` starts.
///
/// **Thread-safety:** as `qed_aio_read`.
///
/// # Safety
/// Pointers must be valid as described; `img` a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_aio_write_flags(
    img: *mut qed_image,
    offset: u64,
    buf: *const c_void,
    len: usize,
    flags: c_uint,
    cb: qed_completion_fn,
    opaque: *mut c_void,
) -> c_int {
    const F: &str = "qed_aio_write_flags";
    qed_boundary!(F, {
        // SAFETY: forwarded contract.
        unsafe { aio_write(F, img, offset, buf, len, flags, cb, opaque) }
    })
}

/// Writes the buffers of `iov` to consecutive guest bytes at `offset` with request `flags`.
///
/// **Returns:** as `qed_aio_write_flags`.
///
/// **Ownership:** as `qed_aio_readv`.
///
/// **Thread-safety:** as `qed_aio_read`.
///
/// # Safety
/// Pointers must be valid as described; `img` a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_aio_writev_flags(
    img: *mut qed_image,
    offset: u64,
    iov: *const libc::iovec,
    iovcnt: c_int,
    flags: c_uint,
    cb: qed_completion_fn,
    opaque: *mut c_void,
) -> c_int {
    const F: &str = "qed_aio_writev_flags";
    qed_boundary!(F, {
        // SAFETY: forwarded contract.
        unsafe { aio_writev(F, img, offset, iov, iovcnt, flags, cb, opaque) }
    })
}

/// Makes `len` guest bytes at `offset` read as zeros, asynchronously.
///
/// **Returns:** as `qed_aio_write`.
///
/// **Thread-safety:** as `qed_aio_read`.
///
/// # Safety
/// `img` must be a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_aio_write_zeroes(
    img: *mut qed_image,
    offset: u64,
    len: u64,
    cb: qed_completion_fn,
    opaque: *mut c_void,
) -> c_int {
    const F: &str = "qed_aio_write_zeroes";
    qed_boundary!(F, {
        // SAFETY: handle contract.
        let h = unsafe { handle(F, img) }?;
        h.img.check_writable().in_fn(F)?;
        h.img.check_range(offset, len).in_fn(F)?;
        let op = Op::WriteZeroes {
            offset,
            len,
            flags: Default::default(),
        };
        // SAFETY: no buffers.
        unsafe { submit(F, h, op, cb, opaque) }
    })
}

/// `qed_write_zeroes_flags`, asynchronously: a refusal of `QED_ZERO_NO_FALLBACK` comes as
/// `cb(opaque, -ENOTSUP)`, with nothing changed.
///
/// **Returns:** as `qed_aio_write`; `-ENOTSUP` (and `cb` never runs) for unknown flag bits.
///
/// **Thread-safety:** as `qed_aio_read`.
///
/// # Safety
/// `img` must be a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_aio_write_zeroes_flags(
    img: *mut qed_image,
    offset: u64,
    len: u64,
    flags: c_uint,
    cb: qed_completion_fn,
    opaque: *mut c_void,
) -> c_int {
    const F: &str = "qed_aio_write_zeroes_flags";
    qed_boundary!(F, {
        let flags = zero_flags(F, flags)?;
        // SAFETY: handle contract.
        let h = unsafe { handle(F, img) }?;
        h.img.check_writable().in_fn(F)?;
        h.img.check_range(offset, len).in_fn(F)?;
        // SAFETY: no buffers.
        unsafe { submit(F, h, Op::WriteZeroes { offset, len, flags }, cb, opaque) }
    })
}

/// `qed_discard`, asynchronously: `cb(opaque, ret)` runs once when the range reads as zeros.
/// Ordered like a write (a later `qed_aio_flush` covers it).
///
/// **Returns:** as `qed_aio_write`.
///
/// **Thread-safety:** as `qed_aio_read`.
///
/// # Safety
/// `img` must be a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_aio_discard(
    img: *mut qed_image,
    offset: u64,
    len: u64,
    cb: qed_completion_fn,
    opaque: *mut c_void,
) -> c_int {
    const F: &str = "qed_aio_discard";
    qed_boundary!(F, {
        // SAFETY: handle contract.
        let h = unsafe { handle(F, img) }?;
        h.img.check_writable().in_fn(F)?;
        h.img.check_range(offset, len).in_fn(F)?;
        // SAFETY: no buffers.
        unsafe { submit(F, h, Op::Discard { offset, len }, cb, opaque) }
    })
}

/// Flushes: `cb` runs after every write submitted before this call has completed and the
/// image file has been flushed, so those writes survive a crash.
///
/// **Returns:** as `qed_aio_read`.
///
/// **Thread-safety:** as `qed_aio_read`.
///
/// # Safety
/// `img` must be a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_aio_flush(
    img: *mut qed_image,
    cb: qed_completion_fn,
    opaque: *mut c_void,
) -> c_int {
    const F: &str = "qed_aio_flush";
    qed_boundary!(F, {
        // SAFETY: handle contract.
        let h = unsafe { handle(F, img) }?;
        // SAFETY: no buffers.
        unsafe { submit(F, h, Op::Flush, cb, opaque) }
    })
}

/// Waits until every submitted request has completed and its callback has returned. With
/// `QED_AIO_EVENT_LOOP` it runs the pending callbacks on this thread. Then, if the image has
/// had metadata updates since its need-check bit was last cleared and the idle timer is
/// pending, it settles the image at once, as QEMU does on drain (see `qed_settle`).
///
/// **Returns:** 0; `-EDEADLK` when called from inside a callback of this image. (A storage
/// failure while settling fails the handle as a failed flush does; later calls report it.)
///
/// **Thread-safety:** may be called from any thread except from this image's callbacks.
///
/// # Safety
/// `img` must be a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_aio_drain(img: *mut qed_image) -> c_int {
    const F: &str = "qed_aio_drain";
    qed_boundary!(F, {
        // SAFETY: handle contract.
        let h = unsafe { handle(F, img) }?;
        let q = h.aio.lock().unwrap_or_else(PoisonError::into_inner).clone();
        if let Some(q) = q {
            q.drain().in_fn(F)?;
        }
        Ok(0)
    })
}

/// With `QED_AIO_EVENT_LOOP`: a descriptor that becomes readable while completions are pending
/// (an eventfd on Linux, the read end of a pipe elsewhere). Add it to your poll set and call
/// `qed_aio_poll` when it is readable; do not read from it yourself.
///
/// **Returns:** the file descriptor (owned by the library: do not close it; valid until
/// `qed_close`), or `-EINVAL` when the queue does not use `QED_AIO_EVENT_LOOP`.
///
/// **Thread-safety:** any thread.
///
/// # Safety
/// `img` must be a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_aio_get_fd(img: *mut qed_image) -> c_int {
    const F: &str = "qed_aio_get_fd";
    qed_boundary!(F, {
        // SAFETY: handle contract.
        let h = unsafe { handle(F, img) }?;
        let q = queue(F, h)?;
        q.event_fd().ok_or_else(|| {
            CError::arg(
                F,
                "the queue does not use QED_AIO_EVENT_LOOP (see qed_aio_setup)",
            )
        })
    })
}

/// With `QED_AIO_EVENT_LOOP`: runs the pending completion callbacks on this thread.
///
/// **Returns:** how many callbacks ran (0 without `QED_AIO_EVENT_LOOP`); `-EDEADLK` from inside
/// a callback of this image.
///
/// **Thread-safety:** any thread; callbacks run on the calling thread.
///
/// # Safety
/// `img` must be a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_aio_poll(img: *mut qed_image) -> c_int {
    const F: &str = "qed_aio_poll";
    qed_boundary!(F, {
        // SAFETY: handle contract.
        let h = unsafe { handle(F, img) }?;
        let q = h.aio.lock().unwrap_or_else(PoisonError::into_inner).clone();
        match q {
            Some(q) => Ok(q.poll().in_fn(F)?.min(c_int::MAX as usize) as c_int),
            None => Ok(0),
        }
    })
}

/// Cancels the requests submitted with this `opaque` that have not started yet. Each still gets
/// its one callback, with `-ECANCELED`. Requests already running complete normally.
///
/// **Returns:** how many requests were cancelled.
///
/// **Thread-safety:** any thread, including inside callbacks.
///
/// # Safety
/// `img` must be a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qed_aio_cancel(img: *mut qed_image, opaque: *mut c_void) -> c_int {
    const F: &str = "qed_aio_cancel";
    qed_boundary!(F, {
        // SAFETY: handle contract.
        let h = unsafe { handle(F, img) }?;
        let q = h.aio.lock().unwrap_or_else(PoisonError::into_inner).clone();
        Ok(q.map_or(0, |q| q.cancel(opaque as usize as u64))
            .min(c_int::MAX as usize) as c_int)
    })
}
