// SPDX-License-Identifier: MIT OR Apache-2.0
//! Which image files this process has open, and how: a second read-write open of a file (or a
//! read-write open beside a read-only one) is refused with [`Error::Busy`], naming this process,
//! instead of the lock conflict QEMU's locks would report as "another process". Only locked
//! opens take part; force-share opens and opens without locks are not recorded.

use super::lock;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

#[derive(Default, Clone, Copy)]
struct Counts {
    rw: usize,
    ro: usize,
}

fn table() -> &'static Mutex<HashMap<(u64, u64), Counts>> {
    static T: OnceLock<Mutex<HashMap<(u64, u64), Counts>>> = OnceLock::new();
    T.get_or_init(Default::default)
}

/// One handle's entry; removed when dropped.
pub(super) struct Registration {
    key: (u64, u64),
    writable: bool,
}

fn busy(path: &str, writable: bool, c: Counts) -> Option<Error> {
    let reason = if c.rw > 0 {
        "the image is already open read-write in this process; share that handle, or close it first"
    } else if writable && c.ro > 0 {
        "the image is open read-only in this process; close that handle, or reopen it read-write (qed_reopen)"
    } else {
        return None;
    };
    Some(Error::Busy {
        path: path.to_owned(),
        reason: reason.into(),
    })
}

impl Registration {
    /// Records an open of the file `key` (device, inode), unless it conflicts with another
    /// handle of this process.
    pub(super) fn take(key: (u64, u64), writable: bool, path: &str) -> Result<Registration> {
        let mut t = lock(table());
        let c = t.get(&key).copied().unwrap_or_default();
        if let Some(e) = busy(path, writable, c) {
            return Err(e);
        }
        let e = t.entry(key).or_default();
        if writable {
            e.rw += 1;
        } else {
            e.ro += 1;
        }
        Ok(Registration { key, writable })
    }

    /// Switches this handle's entry to `writable`, unless another handle of this process
    /// conflicts.
    pub(super) fn change(&mut self, writable: bool, path: &str) -> Result<()> {
        if writable == self.writable {
            return Ok(());
        }
        let mut t = lock(table());
        let e = t.entry(self.key).or_default();
        let mut others = *e;
        if self.writable {
            others.rw -= 1;
        } else {
            others.ro -= 1;
        }
        if let Some(err) = busy(path, writable, others) {
            return Err(err);
        }
        *e = others;
        if writable {
            e.rw += 1;
        } else {
            e.ro += 1;
        }
        self.writable = writable;
        Ok(())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut t = lock(table());
        if let Some(e) = t.get_mut(&self.key) {
            if self.writable {
                e.rw -= 1;
            } else {
                e.ro -= 1;
            }
            if e.rw == 0 && e.ro == 0 {
                t.remove(&self.key);
            }
        }
    }
}
