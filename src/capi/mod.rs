// SPDX-License-Identifier: MIT OR Apache-2.0
//! The C face of libqed: `extern "C"` functions that check their arguments, call the public Rust
//! API, and turn its errors into negative errno values (in [`errno_of`], the only place that
//! mapping lives) with a message for `qed_last_error`. Every entry point runs its body inside
//! [`qed_boundary!`], so no panic crosses into C: it becomes `-EIO` and an "internal error"
//! message.

#![allow(non_camel_case_types)]

use crate::error::Error;
use std::cell::RefCell;
use std::ffi::{c_char, c_int, CStr, CString};

pub(crate) mod abi;
pub mod aio;
pub mod check;
pub mod create;
pub mod debug;
pub mod engine;
pub mod image;
pub mod io;
pub mod jobs;
pub mod progress;
pub mod stream;
pub mod version;

/// An error on its way to C: a positive errno and the message for `qed_last_error`.
#[derive(Debug)]
pub(crate) struct CError {
    pub errno: c_int,
    pub msg: String,
}

/// Maps a core error to a positive errno value. The one place this mapping lives.
pub(crate) fn errno_of(e: &Error) -> c_int {
    match e {
        Error::InvalidHeader { .. } | Error::InvalidArgument { .. } | Error::OutOfRange { .. } => {
            libc::EINVAL
        }
        Error::Unsupported { .. } => libc::ENOTSUP,
        Error::Corrupt { .. } | Error::Failed(_) => libc::EIO,
        Error::ReadOnly => libc::EROFS,
        Error::Locked { .. } => libc::EAGAIN,
        Error::Cancelled { .. } => libc::ECANCELED,
        Error::Busy { .. } => libc::EBUSY,
        Error::BackingRefused { .. } => libc::EACCES,
        Error::Backing { source, .. } => errno_of(source),
        Error::Io { source, .. } => match source.raw_os_error() {
            Some(n) if n > 0 => n,
            _ => match source.kind() {
                std::io::ErrorKind::NotFound => libc::ENOENT,
                std::io::ErrorKind::PermissionDenied => libc::EACCES,
                std::io::ErrorKind::WouldBlock => libc::EAGAIN,
                std::io::ErrorKind::OutOfMemory => libc::ENOMEM,
                std::io::ErrorKind::Unsupported => libc::ENOTSUP,
                std::io::ErrorKind::InvalidInput => libc::EINVAL,
                _ => libc::EIO,
            },
        },
    }
}

impl CError {
    /// A bad argument to `func`.
    pub fn arg(func: &str, msg: impl std::fmt::Display) -> CError {
        CError {
            errno: libc::EINVAL,
            msg: format!("{func}: {msg}"),
        }
    }
    /// A core error from `func`.
    pub fn core(func: &str, e: Error) -> CError {
        CError {
            errno: errno_of(&e),
            msg: format!("{func}: {e}"),
        }
    }
}

/// `Result` of an entry point body.
pub(crate) type CResult<T> = std::result::Result<T, CError>;

/// Adds the function name to core errors.
pub(crate) trait InFn<T> {
    fn in_fn(self, func: &str) -> CResult<T>;
}

impl<T> InFn<T> for crate::Result<T> {
    fn in_fn(self, func: &str) -> CResult<T> {
        self.map_err(|e| CError::core(func, e))
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

pub(crate) fn set_last_error(msg: &str) {
    let c = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|l| *l.borrow_mut() = c);
}

pub(crate) fn clear_last_error() {
    LAST_ERROR.with(|l| {
        let mut l = l.borrow_mut();
        if !l.as_bytes().is_empty() {
            *l = CString::default();
        }
    });
}

pub(crate) fn last_error_ptr() -> *const c_char {
    LAST_ERROR.with(|l| l.borrow().as_ptr())
}

/// Text of a panic payload.
pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_owned()
    }
}

/// Runs an entry point body (returning `CResult<c_int>`) behind a panic boundary; errors become
/// `-errno` with a message for `qed_last_error`, success clears the message.
macro_rules! qed_boundary {
    ($func:expr, $body:block) => {{
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(
            || -> $crate::capi::CResult<std::ffi::c_int> { $body },
        ));
        match r {
            Ok(Ok(v)) => {
                $crate::capi::clear_last_error();
                v
            }
            Ok(Err(e)) => {
                $crate::capi::set_last_error(&e.msg);
                -e.errno
            }
            Err(p) => {
                $crate::capi::set_last_error(&format!(
                    "{}: internal error (panic): {}",
                    $func,
                    $crate::capi::panic_message(&*p)
                ));
                -libc::EIO
            }
        }
    }};
}
pub(crate) use qed_boundary;

/// Borrows a C string argument; NULL or non-UTF-8 is an argument error.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that outlives the returned borrow.
pub(crate) unsafe fn c_str<'a>(func: &str, name: &str, p: *const c_char) -> CResult<&'a str> {
    if p.is_null() {
        return Err(CError::arg(func, format_args!("{name} is NULL")));
    }
    // SAFETY: p is non-NULL and NUL-terminated per the caller's contract.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map_err(|_| CError::arg(func, format_args!("{name} is not valid UTF-8")))
}

/// Like [`c_str`] but NULL gives `None`.
///
/// # Safety
/// As for [`c_str`].
pub(crate) unsafe fn opt_c_str<'a>(
    func: &str,
    name: &str,
    p: *const c_char,
) -> CResult<Option<&'a str>> {
    if p.is_null() {
        Ok(None)
    } else {
        // SAFETY: forwarded contract.
        unsafe { c_str(func, name, p) }.map(Some)
    }
}

/// Completion callback of the asynchronous entry points: `ret` is 0 or a negative errno.
pub type qed_completion_fn =
    Option<unsafe extern "C" fn(opaque: *mut std::ffi::c_void, ret: c_int)>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_table() {
        let io = |n| Error::io("x", std::io::Error::from_raw_os_error(n));
        let cases: Vec<(Error, c_int)> = vec![
            (
                Error::InvalidHeader {
                    field: "magic",
                    value: 0,
                    reason: "",
                },
                libc::EINVAL,
            ),
            (
                Error::Unsupported {
                    field: "features",
                    value: 1,
                    reason: String::new(),
                },
                libc::ENOTSUP,
            ),
            (
                Error::InvalidArgument {
                    what: "x",
                    value: 0,
                    reason: String::new(),
                },
                libc::EINVAL,
            ),
            (
                Error::OutOfRange {
                    offset: 0,
                    len: 1,
                    size: 0,
                },
                libc::EINVAL,
            ),
            (
                Error::Corrupt {
                    what: "L2",
                    offset: 0,
                    reason: String::new(),
                },
                libc::EIO,
            ),
            (Error::ReadOnly, libc::EROFS),
            (
                Error::Locked {
                    path: String::new(),
                    detail: String::new(),
                },
                libc::EAGAIN,
            ),
            (io(libc::ENOSPC), libc::ENOSPC),
            (
                Error::Backing {
                    name: "b".into(),
                    source: Box::new(io(libc::ENOENT)),
                },
                libc::ENOENT,
            ),
            (Error::Failed(String::new()), libc::EIO),
            (Error::Cancelled { what: "check" }, libc::ECANCELED),
            (
                Error::Busy {
                    path: String::new(),
                    reason: String::new(),
                },
                libc::EBUSY,
            ),
            (
                Error::BackingRefused {
                    name: String::new(),
                    reason: String::new(),
                },
                libc::EACCES,
            ),
        ];
        for (e, n) in cases {
            assert_eq!(errno_of(&e), n, "{e}");
        }
    }

    #[test]
    fn boundary_turns_panics_into_eio() {
        fn f() -> c_int {
            qed_boundary!("qed_test", {
                if std::hint::black_box(true) {
                    panic!("boom");
                }
                Ok(0)
            })
        }
        assert_eq!(f(), -libc::EIO);
        // SAFETY: last_error_ptr returns a valid NUL-terminated thread-local string.
        let msg = unsafe { CStr::from_ptr(last_error_ptr()) }
            .to_str()
            .unwrap()
            .to_owned();
        assert!(msg.contains("internal error (panic): boom"), "{msg}");
    }
}
