// SPDX-License-Identifier: MIT OR Apache-2.0
//! QEMU-compatible advisory image locking.
//!
//! This module owns the inter-process locking of image files: it takes the
//! same advisory byte-range locks that QEMU's `file-posix` block driver takes,
//! so that QEMU (`qemu-system-*`, `qemu-img`, `qemu-io`, ...) and this library
//! never write one image at the same time, and so that neither reads an image
//! the other is changing unless it explicitly asked for that
//! ([`LockMode::ForceShare`], QEMU's `-U` / `force-share=on`).
//!
//! # QEMU's byte layout
//!
//! QEMU describes every user of an image by two sets of *permissions*:
//! the permissions it holds and the permissions it lets others hold
//! ("shares"). The permission bits are:
//!
//! | bit | permission        | QEMU's name         |
//! |-----|-------------------|---------------------|
//! | 0   | consistent read   | `"consistent read"` |
//! | 1   | write             | `"write"`           |
//! | 2   | write unchanged   | `"write unchanged"` |
//! | 3   | resize            | `"resize"`          |
//!
//! (QEMU before 6.2 also had bit 4, graph-mod / `"change children"`; it was
//! always shared and is gone from current QEMU, so it never produces a lock.)
//!
//! Each permission maps to two bytes of the image file, locked with a
//! *shared* (`F_RDLCK`) lock of length 1:
//!
//! * permission `i` held                → byte `100 + i` ([`PERM_LOCK_BASE`]);
//! * permission `i` **not** shared      → byte `200 + i` ([`SHARED_LOCK_BASE`]).
//!
//! Locks are only ever shared, so taking them never fails because of QEMU;
//! conflicts are found by *testing* (`F_OFD_GETLK` with `F_WRLCK`):
//!
//! * for each permission we hold, byte `200 + i` must not be locked by anyone
//!   else (otherwise someone refuses to share it: `Failed to get "write" lock`);
//! * for each permission we refuse to share, byte `100 + i` must not be locked
//!   by anyone else (otherwise someone holds it:
//!   `Failed to get shared "write" lock`).
//!
//! Measured with QEMU 10.0 (`/proc/locks` and `strace -e fcntl`):
//!
//! | opener                          | bytes locked               | [`LockMode`]  |
//! |---------------------------------|----------------------------|---------------|
//! | `qemu-io` (read-write)          | 100, 101, 103, 201, 203    | `ReadWrite`   |
//! | `qemu-io -r`, `qemu-img check`  | 100, 201, 203              | `ReadOnly`    |
//! | `qemu-io -r -U`, `check -U`     | 100                        | `ForceShare`  |
//! | `qemu-img info`                 | 201, 203                   | —             |
//! | `qemu-img info -U`              | none                       | —             |
//!
//! # Race freedom
//!
//! Like QEMU (`raw_handle_perm_lock`), [`lock_image`] first takes all of its
//! own locks and only then tests for conflicting locks of others; if it finds
//! one it removes the locks it took. Of two openers racing for conflicting
//! modes, the one that tests last is guaranteed to see the other's locks, so
//! they can never both succeed (both may fail, which is safe).
//!
//! # Why open-file-description locks
//!
//! QEMU uses Linux open-file-description (OFD) locks (`F_OFD_SETLK` /
//! `F_OFD_GETLK`), and only locks of the same family see each other: on Linux
//! `flock(2)` locks and `fcntl` record locks do not conflict, so `flock` would
//! be invisible to QEMU. Classic POSIX `F_SETLK` locks would conflict with OFD
//! locks, but they belong to the *process* (so two opens in one process never
//! conflict) and are silently dropped when *any* descriptor of the file is
//! closed by the process. OFD locks belong to the open file description: they
//! conflict between two `open()`s even inside one process, and live until the
//! description's last descriptor is closed.
//!
//! # Other systems
//!
//! Where OFD locks are missing (FreeBSD; macOS has them only as private API),
//! the same bytes are locked with process-associated `F_SETLK` / `F_GETLK`
//! locks, as QEMU does there. They keep other processes out, with two caveats:
//! two opens of one image inside one process do not see each other, and closing
//! *any* descriptor of the image file in the process (another `open` of it, a
//! second image handle) silently drops every lock the process holds on it.
//!
//! # Lifetime
//!
//! [`ImageLock`] keeps a duplicate descriptor of the locked file (same open
//! file description), so the locks last as long as the `ImageLock`, even if
//! the caller's [`File`] is dropped first. Dropping the `ImageLock` (or
//! calling [`ImageLock::unlock`]) removes the locks explicitly, as QEMU does
//! on close; they also disappear when every descriptor of the open file
//! description is closed, e.g. when the process dies.
//!
//! Take at most one `ImageLock` per open file description: locks of one
//! description merge, so releasing one `ImageLock` would release bytes that a
//! second `ImageLock` on the same description relies on.

use std::error::Error;
use std::fmt;
use std::fs::File;
use std::io;

/// First byte of the "permission held" locks (`RAW_LOCK_PERM_BASE` in QEMU).
pub const PERM_LOCK_BASE: u64 = 100;
/// First byte of the "permission not shared" locks (`RAW_LOCK_SHARED_BASE`).
pub const SHARED_LOCK_BASE: u64 = 200;

/// One of QEMU's block-layer permissions (`BLK_PERM_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Permission {
    /// `BLK_PERM_CONSISTENT_READ`, bit 0.
    ConsistentRead,
    /// `BLK_PERM_WRITE`, bit 1.
    Write,
    /// `BLK_PERM_WRITE_UNCHANGED`, bit 2.
    WriteUnchanged,
    /// `BLK_PERM_RESIZE`, bit 3.
    Resize,
}

impl Permission {
    /// All permissions, in bit order.
    pub const ALL: [Permission; 4] = [
        Permission::ConsistentRead,
        Permission::Write,
        Permission::WriteUnchanged,
        Permission::Resize,
    ];

    /// The bit number of this permission.
    pub fn bit(self) -> u64 {
        match self {
            Permission::ConsistentRead => 0,
            Permission::Write => 1,
            Permission::WriteUnchanged => 2,
            Permission::Resize => 3,
        }
    }

    /// QEMU's name for the permission, as used in its error messages.
    pub fn name(self) -> &'static str {
        match self {
            Permission::ConsistentRead => "consistent read",
            Permission::Write => "write",
            Permission::WriteUnchanged => "write unchanged",
            Permission::Resize => "resize",
        }
    }

    /// The byte locked while this permission is held.
    pub fn held_byte(self) -> u64 {
        PERM_LOCK_BASE + self.bit()
    }

    /// The byte locked while this permission is not shared with others.
    pub fn unshared_byte(self) -> u64 {
        SHARED_LOCK_BASE + self.bit()
    }

    fn from_byte(byte: u64) -> Option<Permission> {
        Permission::ALL
            .into_iter()
            .find(|p| p.held_byte() == byte || p.unshared_byte() == byte)
    }
}

/// How an image is opened, i.e. which permissions are held and which are
/// refused to others. Each mode mirrors what QEMU takes for the same kind of
/// open (see the module documentation for the measured bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LockMode {
    /// Read-write open, like `qemu-io` / a running VM's writable disk:
    /// holds consistent read, write and resize; shares neither write nor
    /// resize. Bytes 100, 101, 103, 201, 203.
    ReadWrite,
    /// Read-only open, like `qemu-io -r` or `qemu-img check`: holds
    /// consistent read; shares neither write nor resize (so nobody may change
    /// the image under us). Bytes 100, 201, 203.
    ReadOnly,
    /// Read-only open that shares everything, like `qemu-io -r -U` or
    /// `qemu-img check -U`: holds consistent read and refuses nothing, so it
    /// coexists with a writer (and may see inconsistent data). Byte 100.
    /// It fails only if another user refuses to share consistent read.
    ForceShare,
}

impl LockMode {
    /// The permissions held in this mode.
    pub fn held_permissions(self) -> &'static [Permission] {
        match self {
            LockMode::ReadWrite => &[
                Permission::ConsistentRead,
                Permission::Write,
                Permission::Resize,
            ],
            LockMode::ReadOnly | LockMode::ForceShare => &[Permission::ConsistentRead],
        }
    }

    /// The permissions refused to other users in this mode.
    pub fn unshared_permissions(self) -> &'static [Permission] {
        match self {
            LockMode::ReadWrite | LockMode::ReadOnly => &[Permission::Write, Permission::Resize],
            LockMode::ForceShare => &[],
        }
    }

    /// The bytes this mode locks, in the order they are locked.
    pub fn lock_bytes(self) -> Vec<u64> {
        let held = self.held_permissions().iter().map(|p| p.held_byte());
        let unshared = self
            .unshared_permissions()
            .iter()
            .map(|p| p.unshared_byte());
        held.chain(unshared).collect()
    }
}

/// What kind of conflict stopped [`lock_image`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConflictKind {
    /// We need the permission but another user refuses to share it
    /// (QEMU: `Failed to get "write" lock`).
    NotShared,
    /// We refuse to share the permission but another user holds it
    /// (QEMU: `Failed to get shared "write" lock`).
    HeldByOther,
    /// Taking our shared lock on a byte failed because someone holds an
    /// exclusive lock on it (QEMU: `Failed to lock byte 101`). QEMU itself
    /// never takes exclusive locks there; another tool might.
    ByteLocked,
}

/// The error carried (as the inner error of an [`io::Error`] of kind
/// [`io::ErrorKind::WouldBlock`]) when the image is in use by another
/// process in a conflicting way.
///
/// `io::Error` cannot carry both a raw OS error and a message, so the errno
/// (`EAGAIN`) is available from [`LockConflict::raw_os_error`] and as this
/// error's [`source`](Error::source).
#[derive(Debug)]
pub struct LockConflict {
    permission: Permission,
    kind: ConflictKind,
    byte: u64,
    source: io::Error,
}

impl LockConflict {
    fn new(permission: Permission, kind: ConflictKind, byte: u64) -> Self {
        LockConflict {
            permission,
            kind,
            byte,
            source: io::Error::from_raw_os_error(libc::EAGAIN),
        }
    }

    /// Find the `LockConflict` inside an error returned by [`lock_image`].
    pub fn from_io_error(err: &io::Error) -> Option<&LockConflict> {
        err.get_ref()?.downcast_ref::<LockConflict>()
    }

    /// The permission in conflict.
    pub fn permission(&self) -> Permission {
        self.permission
    }

    /// Which side of the permission is in conflict.
    pub fn kind(&self) -> ConflictKind {
        self.kind
    }

    /// The lock byte on which the conflict was found.
    pub fn byte(&self) -> u64 {
        self.byte
    }

    /// Always `EAGAIN`, the errno QEMU reports for lock conflicts.
    pub fn raw_os_error(&self) -> i32 {
        libc::EAGAIN
    }
}

impl fmt::Display for LockConflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ConflictKind::NotShared => {
                write!(f, "Failed to get \"{}\" lock", self.permission.name())?
            }
            ConflictKind::HeldByOther => write!(
                f,
                "Failed to get shared \"{}\" lock",
                self.permission.name()
            )?,
            ConflictKind::ByteLocked => write!(
                f,
                "Failed to lock byte {} (\"{}\")",
                self.byte,
                self.permission.name()
            )?,
        }
        f.write_str(": is another process using the image?")
    }
}

impl Error for LockConflict {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&self.source)
    }
}

/// QEMU-compatible locks held on an image file.
///
/// Holds a duplicate descriptor of the file (same open file description), so
/// the locks stay until this value is dropped or [`unlock`](Self::unlock)ed,
/// whatever happens to the `File` it was created from.
#[derive(Debug)]
pub struct ImageLock {
    file: File,
    mode: LockMode,
    /// Bytes still locked; emptied by `unlock`.
    bytes: Vec<u64>,
}

impl ImageLock {
    /// The mode the locks were taken in.
    pub fn mode(&self) -> LockMode {
        self.mode
    }

    /// The bytes locked (empty once unlocked).
    pub fn locked_bytes(&self) -> &[u64] {
        &self.bytes
    }

    /// Remove the locks now, reporting errors (dropping ignores them).
    pub fn unlock(mut self) -> io::Result<()> {
        self.release()
    }

    fn release(&mut self) -> io::Result<()> {
        let mut result = Ok(());
        for byte in std::mem::take(&mut self.bytes) {
            if let Err(e) = ofd::set(&self.file, byte, ofd::LockType::Unlock) {
                if result.is_ok() {
                    result = Err(annotate(e, byte, "unlock"));
                }
            }
        }
        result
    }
}

impl Drop for ImageLock {
    fn drop(&mut self) {
        // Errors cannot be reported here; closing the duplicate descriptor
        // (when the caller's descriptors are closed too) drops them anyway.
        let _ = self.release();
    }
}

/// Take QEMU's locks for `mode` on `file`.
///
/// Locks our bytes first, then tests for conflicting locks held through other
/// open file descriptions (other processes, or other `open()`s in this one);
/// on a conflict the bytes we locked are unlocked again and an error of kind
/// [`io::ErrorKind::WouldBlock`] is returned, whose inner error is a
/// [`LockConflict`] (errno `EAGAIN`, message like QEMU's
/// `Failed to get "write" lock`). Other failures (e.g. a file system without
/// lock support) are returned with their OS error kind.
pub fn lock_image(file: &File, mode: LockMode) -> io::Result<ImageLock> {
    let mut lock = ImageLock {
        file: file.try_clone()?,
        mode,
        bytes: Vec::new(),
    };

    // 1. Take our own shared locks (held perms, then unshared perms).
    for byte in mode.lock_bytes() {
        match ofd::set(&lock.file, byte, ofd::LockType::Read) {
            Ok(()) => lock.bytes.push(byte),
            Err(e) => {
                let _ = lock.release();
                return Err(if is_conflict_errno(&e) {
                    conflict(byte, ConflictKind::ByteLocked)
                } else {
                    annotate(e, byte, "lock")
                });
            }
        }
    }

    // 2. Test for others' locks: does anyone refuse to share what we hold,
    //    and does anyone hold what we refuse to share?
    let tests = mode
        .held_permissions()
        .iter()
        .map(|p| (p.unshared_byte(), ConflictKind::NotShared))
        .chain(
            mode.unshared_permissions()
                .iter()
                .map(|p| (p.held_byte(), ConflictKind::HeldByOther)),
        );
    for (byte, kind) in tests {
        match ofd::is_locked_by_other(&lock.file, byte) {
            Ok(false) => {}
            Ok(true) => {
                let _ = lock.release();
                return Err(conflict(byte, kind));
            }
            Err(e) => {
                let _ = lock.release();
                return Err(annotate(e, byte, "test lock on"));
            }
        }
    }
    Ok(lock)
}

fn is_conflict_errno(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES))
}

fn conflict(byte: u64, kind: ConflictKind) -> io::Error {
    let permission = Permission::from_byte(byte).expect("lock byte maps to a permission");
    io::Error::new(
        io::ErrorKind::WouldBlock,
        LockConflict::new(permission, kind, byte),
    )
}

fn annotate(e: io::Error, byte: u64, what: &str) -> io::Error {
    let hint = if e.raw_os_error() == Some(libc::EINVAL) {
        " (are open file description locks, Linux >= 3.15, supported?)"
    } else {
        ""
    };
    io::Error::new(
        e.kind(),
        format!("Failed to {what} byte {byte} of image: {e}{hint}"),
    )
}

mod ofd {
    //! Thin wrappers around `fcntl(F_OFD_SETLK / F_OFD_GETLK)` on one byte, or, where open
    //! file description locks are missing, `F_SETLK / F_GETLK` (as QEMU's `file-posix` does).

    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;

    #[derive(Debug, Clone, Copy)]
    pub(super) enum LockType {
        Read,
        Unlock,
        /// Exclusive lock; only used by tests to play "another tool".
        #[cfg(all(test, any(target_os = "linux", target_os = "android")))]
        Write,
    }

    /// The `fcntl` commands that set and test a lock.
    #[derive(Debug, Clone, Copy)]
    pub(super) struct Cmds {
        set: libc::c_int,
        get: libc::c_int,
    }

    /// Process-associated record locks: they conflict with OFD locks (so QEMU sees them on
    /// Linux too), but never with the same process's own locks, and closing *any* descriptor
    /// of the file in the process drops them all.
    #[cfg_attr(any(target_os = "linux", target_os = "android"), allow(dead_code))]
    pub(super) const PROCESS: Cmds = Cmds {
        set: libc::F_SETLK,
        get: libc::F_GETLK,
    };

    /// The commands used: OFD locks on Linux (Linux >= 3.15), [`PROCESS`] elsewhere. (macOS
    /// defines F_OFD_* only as private API, and FreeBSD not at all.)
    #[cfg(any(target_os = "linux", target_os = "android"))]
    const PLATFORM: Cmds = Cmds {
        set: libc::F_OFD_SETLK,
        get: libc::F_OFD_GETLK,
    };
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    const PLATFORM: Cmds = PROCESS;

    /// (`l_type` is a `c_short` as in `struct flock`: the F_*LCK constants are `c_int` on
    /// Linux and `c_short` on the BSDs.)
    fn flock_for(byte: u64, l_type: libc::c_short) -> io::Result<libc::flock> {
        // SAFETY: `libc::flock` is a plain C struct of integers (plus padding
        // on some architectures); the all-zero bit pattern is a valid value,
        // and OFD locks require `l_pid` to be 0.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = l_type;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        // The lock bytes are below 300: a 32-bit off_t (i686 glibc) holds them, and glibc
        // passes them to the kernel's 64-bit F_OFD_* commands itself.
        fl.l_start = libc::off_t::try_from(byte)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "lock offset too large"))?;
        fl.l_len = 1;
        Ok(fl)
    }

    fn fcntl_lock(file: &File, cmd: libc::c_int, fl: &mut libc::flock) -> io::Result<()> {
        loop {
            // SAFETY: `file` owns an open descriptor for the whole call, `fl`
            // is a valid, exclusively borrowed `struct flock`, and
            // F_(OFD_)SETLK / F_(OFD_)GETLK take exactly a `struct flock *`.
            let ret = unsafe { libc::fcntl(file.as_raw_fd(), cmd, fl as *mut libc::flock) };
            if ret != -1 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// Set (shared) or remove our lock on `byte`, without waiting.
    pub(super) fn set(file: &File, byte: u64, ty: LockType) -> io::Result<()> {
        set_with(PLATFORM, file, byte, ty)
    }

    pub(super) fn set_with(cmds: Cmds, file: &File, byte: u64, ty: LockType) -> io::Result<()> {
        let l_type = match ty {
            LockType::Read => libc::F_RDLCK as libc::c_short,
            LockType::Unlock => libc::F_UNLCK as libc::c_short,
            #[cfg(all(test, any(target_os = "linux", target_os = "android")))]
            LockType::Write => libc::F_WRLCK as libc::c_short,
        };
        let mut fl = flock_for(byte, l_type)?;
        fcntl_lock(file, cmds.set, &mut fl)
    }

    /// Whether another open file description (another process, with [`PROCESS`] locks) holds
    /// any lock on `byte` (tested as QEMU does, by asking whether an exclusive lock could be
    /// taken; our own locks never count).
    pub(super) fn is_locked_by_other(file: &File, byte: u64) -> io::Result<bool> {
        is_locked_by_other_with(PLATFORM, file, byte)
    }

    pub(super) fn is_locked_by_other_with(cmds: Cmds, file: &File, byte: u64) -> io::Result<bool> {
        let mut fl = flock_for(byte, libc::F_WRLCK as libc::c_short)?;
        fcntl_lock(file, cmds.get, &mut fl)?;
        Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
    }
}

#[cfg(all(test, any(target_os = "linux", target_os = "android")))]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A temporary file removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new() -> TempFile {
            static COUNTER: AtomicU32 = AtomicU32::new(0);
            let path = std::env::temp_dir().join(format!(
                "qed-lock-unit-{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&path, [0u8; 4096]).unwrap();
            TempFile(path)
        }

        /// A new open file description of the file.
        fn open(&self) -> File {
            open(&self.0)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn open(path: &Path) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    /// Bytes in 100..=104 and 200..=204 locked through descriptions other
    /// than `probe`'s.
    fn locked_bytes(probe: &File) -> Vec<u64> {
        (100..=104)
            .chain(200..=204)
            .filter(|&b| ofd::is_locked_by_other(probe, b).unwrap())
            .collect()
    }

    fn expect_conflict(
        res: io::Result<ImageLock>,
        permission: Permission,
        kind: ConflictKind,
        message: &str,
    ) {
        let err = res.expect_err("lock should conflict");
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
        let c = LockConflict::from_io_error(&err).expect("inner LockConflict");
        assert_eq!(c.raw_os_error(), libc::EAGAIN);
        assert_eq!(c.permission(), permission);
        assert_eq!(c.kind(), kind);
        let source = c.source().unwrap().downcast_ref::<io::Error>().unwrap();
        assert_eq!(source.raw_os_error(), Some(libc::EAGAIN));
        assert!(err.to_string().starts_with(message), "{err}");
    }

    #[test]
    fn byte_layout_matches_qemu() {
        let t = TempFile::new();
        let probe = t.open();
        for (mode, bytes) in [
            (LockMode::ReadWrite, vec![100, 101, 103, 201, 203]),
            (LockMode::ReadOnly, vec![100, 201, 203]),
            (LockMode::ForceShare, vec![100]),
        ] {
            let f = t.open();
            let lock = lock_image(&f, mode).unwrap();
            assert_eq!(lock.mode(), mode);
            assert_eq!(lock.locked_bytes(), &bytes[..], "{mode:?}");
            assert_eq!(locked_bytes(&probe), bytes, "{mode:?}");
            drop(lock);
            assert_eq!(locked_bytes(&probe), Vec::<u64>::new(), "{mode:?}");
        }
    }

    #[test]
    fn rw_rw_conflict_and_undo() {
        let t = TempFile::new();
        let (a, b, probe) = (t.open(), t.open(), t.open());
        let la = lock_image(&a, LockMode::ReadWrite).unwrap();
        expect_conflict(
            lock_image(&b, LockMode::ReadWrite),
            Permission::Write,
            ConflictKind::NotShared,
            "Failed to get \"write\" lock",
        );
        // The failed attempt left no locks behind: only a's bytes remain.
        drop(la);
        assert!(locked_bytes(&probe).is_empty());
        lock_image(&b, LockMode::ReadWrite).unwrap();
    }

    #[test]
    fn rw_then_ro_conflict() {
        let t = TempFile::new();
        let (a, b) = (t.open(), t.open());
        let _la = lock_image(&a, LockMode::ReadWrite).unwrap();
        expect_conflict(
            lock_image(&b, LockMode::ReadOnly),
            Permission::Write,
            ConflictKind::HeldByOther,
            "Failed to get shared \"write\" lock",
        );
    }

    #[test]
    fn ro_then_rw_conflict() {
        let t = TempFile::new();
        let (a, b, probe) = (t.open(), t.open(), t.open());
        let _la = lock_image(&a, LockMode::ReadOnly).unwrap();
        expect_conflict(
            lock_image(&b, LockMode::ReadWrite),
            Permission::Write,
            ConflictKind::NotShared,
            "Failed to get \"write\" lock",
        );
        // b undid its locks: only a's read-only bytes are left.
        assert_eq!(locked_bytes(&probe), vec![100, 201, 203]);
    }

    #[test]
    fn ro_ro_ok() {
        let t = TempFile::new();
        let (a, b) = (t.open(), t.open());
        let _la = lock_image(&a, LockMode::ReadOnly).unwrap();
        let _lb = lock_image(&b, LockMode::ReadOnly).unwrap();
    }

    #[test]
    fn force_share_coexists_with_rw_and_ro() {
        let t = TempFile::new();
        let (a, b, c) = (t.open(), t.open(), t.open());
        // ForceShare first, then a writer.
        let la = lock_image(&a, LockMode::ForceShare).unwrap();
        let lb = lock_image(&b, LockMode::ReadWrite).unwrap();
        // Writer first, then ForceShare.
        drop(la);
        let _la = lock_image(&a, LockMode::ForceShare).unwrap();
        // ForceShare also coexists with read-only users.
        drop(lb);
        let _lc = lock_image(&c, LockMode::ReadOnly).unwrap();
        let _lb = lock_image(&b, LockMode::ForceShare).unwrap();
    }

    #[test]
    fn released_when_file_and_lock_dropped() {
        let t = TempFile::new();
        let (a, b) = (t.open(), t.open());
        let la = lock_image(&a, LockMode::ReadWrite).unwrap();
        assert!(lock_image(&b, LockMode::ReadWrite).is_err());
        drop(a);
        drop(la);
        let _lb = lock_image(&b, LockMode::ReadWrite).unwrap();
    }

    #[test]
    fn lock_outlives_dropped_file() {
        let t = TempFile::new();
        let (a, b) = (t.open(), t.open());
        let la = lock_image(&a, LockMode::ReadWrite).unwrap();
        drop(a);
        assert!(lock_image(&b, LockMode::ReadWrite).is_err());
        drop(la);
        lock_image(&b, LockMode::ReadWrite).unwrap();
    }

    #[test]
    fn explicit_unlock_keeps_file_usable() {
        let t = TempFile::new();
        let (a, b, probe) = (t.open(), t.open(), t.open());
        let la = lock_image(&a, LockMode::ReadWrite).unwrap();
        la.unlock().unwrap();
        assert!(locked_bytes(&probe).is_empty());
        let _lb = lock_image(&b, LockMode::ReadWrite).unwrap();
        // `a` is still open and can take a compatible lock again.
        expect_conflict(
            lock_image(&a, LockMode::ReadOnly),
            Permission::Write,
            ConflictKind::HeldByOther,
            "Failed to get shared \"write\" lock",
        );
    }

    #[test]
    fn exclusive_byte_lock_by_other_tool_is_a_conflict() {
        let t = TempFile::new();
        let (a, b) = (t.open(), t.open());
        ofd::set(&a, 101, ofd::LockType::Write).unwrap();
        expect_conflict(
            lock_image(&b, LockMode::ReadWrite),
            Permission::Write,
            ConflictKind::ByteLocked,
            "Failed to lock byte 101",
        );
        ofd::set(&a, 101, ofd::LockType::Unlock).unwrap();
        let _lb = lock_image(&b, LockMode::ReadWrite).unwrap();
    }

    /// The F_SETLK fallback (FreeBSD, macOS) and QEMU's OFD locks see each other, here on
    /// Linux where both exist: an image in use by both kinds of opener is never missed.
    #[test]
    fn process_lock_fallback_and_ofd_locks_conflict() {
        let t = TempFile::new();
        let (a, b) = (t.open(), t.open());
        ofd::set_with(ofd::PROCESS, &a, 101, ofd::LockType::Read).unwrap();
        assert!(ofd::is_locked_by_other(&b, 101).unwrap());
        assert!(!ofd::is_locked_by_other(&b, 102).unwrap());
        ofd::set(&b, 201, ofd::LockType::Read).unwrap();
        assert!(ofd::is_locked_by_other_with(ofd::PROCESS, &a, 201).unwrap());
        // Process locks never conflict with the process's own process locks.
        assert!(!ofd::is_locked_by_other_with(ofd::PROCESS, &b, 101).unwrap());
        ofd::set_with(ofd::PROCESS, &a, 101, ofd::LockType::Unlock).unwrap();
        assert!(!ofd::is_locked_by_other(&b, 101).unwrap());
    }
}
