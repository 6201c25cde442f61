// SPDX-License-Identifier: MIT OR Apache-2.0
//! `qed_version`, `qed_strerror`, `qed_last_error`.

use std::ffi::{c_char, c_int};

// Cargo.toml's version is the only source; cbindgen needs literals, so
// `strerror_is_static_and_never_null` checks these against it.
/// Major version of this library.
pub const QED_VERSION_MAJOR: u32 = 0;
/// Minor version of this library.
pub const QED_VERSION_MINOR: u32 = 2;
/// Patch version of this library.
pub const QED_VERSION_PATCH: u32 = 0;

static VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");

/// The library version, `"MAJOR.MINOR.PATCH"`.
///
/// **Ownership:** static; never free it. **Thread-safety:** any thread. Never NULL.
#[unsafe(no_mangle)]
pub extern "C" fn qed_version() -> *const c_char {
    VERSION.as_ptr().cast()
}

macro_rules! errno_texts {
    ($($e:ident => $t:literal,)*) => {
        fn errno_text(err: c_int) -> &'static str {
            match err {
                0 => "success\0",
                $(libc::$e => concat!($t, "\0"),)*
                _ => "unknown error\0",
            }
        }
    };
}

errno_texts! {
    EINVAL => "invalid argument or image",
    ENOTSUP => "operation or image feature not supported",
    EIO => "I/O error or corrupt image",
    EROFS => "image is opened read-only",
    EAGAIN => "image is locked by another process",
    ENOENT => "no such file",
    EACCES => "permission denied",
    EPERM => "operation not permitted",
    ENOMEM => "out of memory",
    ENOSPC => "no space left on device",
    EFBIG => "file too large",
    ERANGE => "buffer too small",
    EBUSY => "resource busy",
    EDEADLK => "call would deadlock",
    ECANCELED => "request cancelled",
    EEXIST => "file exists",
    EISDIR => "is a directory",
    ENOTDIR => "not a directory",
    EBADF => "bad file descriptor",
}

/// Static text for an errno value (either sign).
///
/// **Ownership:** static; never free it. **Thread-safety:** any thread. Never NULL, even for
/// unknown values (`"unknown error"`).
#[unsafe(no_mangle)]
pub extern "C" fn qed_strerror(err: c_int) -> *const c_char {
    // i32::MIN has no positive counterpart: it is simply unknown.
    errno_text(err.checked_abs().unwrap_or(i32::MAX))
        .as_ptr()
        .cast()
}

/// This thread's message for its last failed `qed_` call, naming the function and what was
/// wrong (for example the header field and its value); `""` after a call that succeeded.
///
/// **Ownership:** owned by the library; valid until this thread's next `qed_` call. Never free
/// it. **Thread-safety:** per thread. Never NULL.
#[unsafe(no_mangle)]
pub extern "C" fn qed_last_error() -> *const c_char {
    super::last_error_ptr()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    #[test]
    fn strerror_is_static_and_never_null() {
        for e in [0, libc::EINVAL, -libc::EINVAL, 9999, i32::MIN] {
            // SAFETY: qed_strerror returns a static NUL-terminated string.
            let s = unsafe { CStr::from_ptr(qed_strerror(e)) };
            assert!(!s.to_bytes().is_empty());
        }
        // SAFETY: as above.
        let v = unsafe { CStr::from_ptr(qed_version()) }.to_str().unwrap();
        assert_eq!(
            v,
            format!("{QED_VERSION_MAJOR}.{QED_VERSION_MINOR}.{QED_VERSION_PATCH}")
        );
    }
}
