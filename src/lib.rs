// SPDX-License-Identifier: MIT OR Apache-2.0
//! libqed: an independent implementation of QEMU's QED disk-image format.
//!
//! Layers, each depending only on the ones before it:
//! - [`format`]: on-disk structures, pure bytes <-> structs;
//! - [`storage`]: where bytes live (files, memory, caller-provided I/O);
//! - [`image`]: the engine (open, create, read, write, allocate, check, repair, close).
//!
//! ```no_run
//! use qed::{CreateOptions, Image, OpenOptions};
//! Image::create("disk.qed", &CreateOptions::new(1 << 30))?;
//! let img = Image::open("disk.qed", &OpenOptions::read_write())?;
//! img.write_at(4096, b"hello")?;
//! img.flush()?;
//! let mut buf = [0u8; 5];
//! img.read_at(4096, &mut buf)?;
//! img.close()?;
//! # Ok::<(), qed::Error>(())
//! ```

pub mod aio;
pub mod error;
pub mod format;
pub mod image;
pub mod log;
pub mod storage;
mod sync;
mod thread;

pub mod capi;

pub use error::{Error, Result};
pub use image::{
    Backing, BackingApprover, BackingFormat, BackingPolicy, ChainExtent, ChainKind, CheckFix,
    CheckResult, CreateOptions, Extent, ExtentKind, Image, ImageInfo, ImageStats, OpenOptions,
    Progress, WriteFlags, WriteZeroesFlags,
};
pub use log::{set_log_callback, LogCallback, LogLevel};
pub use storage::{FileStorage, MemStorage, Storage};
