// SPDX-License-Identifier: MIT OR Apache-2.0
//! The crate's one error type. Every variant names what was wrong and, where there is one, the
//! value; the C layer maps each variant to a negative errno in one place (`capi`).

use std::io;

/// A specialised `Result` for libqed.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in libqed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A header field holds a value the format does not allow (EINVAL).
    #[error("invalid QED header: {field} = {value:#x}: {reason}")]
    InvalidHeader {
        /// The header field, in the format's own words.
        field: &'static str,
        /// The value found.
        value: u64,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The image uses something this implementation does not support (ENOTSUP).
    #[error("unsupported: {field} = {value:#x}: {reason}")]
    Unsupported {
        /// What is unsupported.
        field: &'static str,
        /// The value found.
        value: u64,
        /// Explanation.
        reason: String,
    },
    /// A caller passed an argument that is out of range or malformed (EINVAL).
    #[error("invalid argument: {what} = {value:#x}: {reason}")]
    InvalidArgument {
        /// The argument.
        what: &'static str,
        /// The value passed.
        value: u64,
        /// Why it is refused.
        reason: String,
    },
    /// A request reaches past the virtual size of the image (EINVAL).
    #[error("request out of range: offset {offset:#x} + length {len:#x} exceeds the image size {size:#x}")]
    OutOfRange {
        /// Guest offset of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// Virtual size of the image.
        size: u64,
    },
    /// Image metadata is inconsistent (EIO, or EUCLEAN where the platform has it).
    #[error("corrupt image: {what} at {offset:#x}: {reason}")]
    Corrupt {
        /// Which metadata structure.
        what: &'static str,
        /// File (or guest) offset involved.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// A write was attempted on an image opened read-only (EROFS... mapped to EACCES/EPERM).
    #[error("image is opened read-only")]
    ReadOnly,
    /// Another process holds a conflicting lock on the image file (EAGAIN).
    #[error("{path}: {detail}")]
    Locked {
        /// The image file.
        path: String,
        /// Which lock could not be taken.
        detail: String,
    },
    /// The backing file could not be opened or is not acceptable.
    #[error("backing file {name:?}: {source}")]
    Backing {
        /// The backing file name as stored in the header.
        name: String,
        /// The underlying error.
        source: Box<Error>,
    },
    /// The image names a backing file that the open options do not allow (EACCES).
    #[error("backing file {name:?} refused: {reason}")]
    BackingRefused {
        /// The backing file name as stored in the header.
        name: String,
        /// Why it is refused.
        reason: String,
    },
    /// An I/O error from the storage, with what we were doing.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The image was marked unusable after an earlier failure in the middle of a metadata update.
    #[error("image unusable after an earlier error: {0}")]
    Failed(String),
    /// A long operation was stopped by its caller through [`Progress`](crate::image::Progress)
    /// (ECANCELED). What it had done stays done and consistent.
    #[error("{what} cancelled")]
    Cancelled {
        /// The operation.
        what: &'static str,
    },
    /// The image is in use in a way that forbids the request (EBUSY), e.g. already open
    /// read-write in this process.
    #[error("{path}: {reason}")]
    Busy {
        /// The image file.
        path: String,
        /// What holds it.
        reason: String,
    },
}

impl Error {
    /// Wraps an I/O error with context.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The innermost error, through backing-file wrappers.
    pub fn root(&self) -> &Error {
        match self {
            Error::Backing { source, .. } => source.root(),
            e => e,
        }
    }
}

/// Adds context to `io::Result`s.
pub(crate) trait IoContext<T> {
    /// Wraps the error with a context computed lazily.
    fn ctx(self, f: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, f: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(f(), e))
    }
}
