// SPDX-License-Identifier: MIT OR Apache-2.0
//! The operating-system calls that take file offsets, behind one portable face.
//!
//! Every file offset goes through a 64-bit call: on 32-bit glibc `off_t` is 32 bits unless a
//! program is built with `_FILE_OFFSET_BITS=64`, and the `libc` crate binds the 32-bit `pread`,
//! `lseek`, `fallocate`, so there the `*64` functions (`preadv64`, `lseek64`, ...) are used. On
//! musl, FreeBSD and macOS `off_t` is 64 bits everywhere and the plain calls are the 64-bit ones.
//!
//! Where a call is missing, the fallback (also listed in README.md, "Platforms"):
//!
//! | call                       | where it exists   | elsewhere                                      |
//! |----------------------------|-------------------|------------------------------------------------|
//! | `preadv2(RWF_NOWAIT)`      | Linux             | no non-blocking try: the caller does a `preadv` |
//! | `pwritev2(RWF_DSYNC)`      | Linux 4.7+        | `pwritev`, then `fdatasync`                     |
//! | `fallocate` (reserve)      | Linux             | `posix_fallocate` (FreeBSD); nothing (macOS)    |
//! | `fallocate(PUNCH_HOLE)`    | Linux             | `-ENOTSUP`: the caller writes zeros             |
//! | `O_DIRECT`                 | Linux, FreeBSD    | `F_NOCACHE` (macOS); `-ENOTSUP` elsewhere       |
//! | `SEEK_DATA` / `SEEK_HOLE`  | Linux, FreeBSD, macOS | the callers treat failure as "all data"     |
//!
//! Open file description locks and eventfd have their fallbacks in [`super::lock`] and
//! [`crate::aio`].

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::RawFd;

/// The 64-bit offset type of the calls below.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
type Off = libc::off64_t;
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
type Off = libc::off_t;

// A 32-bit off_t here would bring back the truncation this module exists to avoid.
const _: () = assert!(std::mem::size_of::<Off>() == 8);

/// `offset` as the calls' offset type; EFBIG past `i64::MAX` (no file can reach there).
pub fn to_off(offset: u64) -> io::Result<i64> {
    i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))
}

#[cfg(target_os = "linux")]
fn check(r: libc::c_int) -> io::Result<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The result of a call that returns a count or -1 and errno.
fn count(n: isize) -> io::Result<usize> {
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

fn iov_count(iov: &[libc::iovec]) -> io::Result<libc::c_int> {
    libc::c_int::try_from(iov.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `preadv` at a 64-bit offset: the bytes read (0 at the end of the file).
///
/// # Safety
/// Every iovec must point into a live buffer of `iov_len` writable bytes, not aliased
/// elsewhere for the duration of the call.
pub unsafe fn preadv(fd: RawFd, iov: &[libc::iovec], offset: u64) -> io::Result<usize> {
    let (off, cnt) = (to_off(offset)? as Off, iov_count(iov)?);
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: the caller guarantees the iovecs; the count is the slice's length.
    let n = unsafe { libc::preadv64(fd, iov.as_ptr(), cnt, off) };
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    // SAFETY: as above.
    let n = unsafe { libc::preadv(fd, iov.as_ptr(), cnt, off) };
    count(n)
}

/// `pwritev` at a 64-bit offset: the bytes written.
///
/// # Safety
/// Every iovec must point into a live buffer of `iov_len` readable bytes.
pub unsafe fn pwritev(fd: RawFd, iov: &[libc::iovec], offset: u64) -> io::Result<usize> {
    let (off, cnt) = (to_off(offset)? as Off, iov_count(iov)?);
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: the caller guarantees the iovecs; the count is the slice's length.
    let n = unsafe { libc::pwritev64(fd, iov.as_ptr(), cnt, off) };
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    // SAFETY: as above.
    let n = unsafe { libc::pwritev(fd, iov.as_ptr(), cnt, off) };
    count(n)
}

/// `preadv2(RWF_NOWAIT)`: reads only what is cached, without blocking (EAGAIN if nothing is).
/// ENOTSUP where the call does not exist: the caller then reads with [`preadv`].
///
/// # Safety
/// As [`preadv`].
pub unsafe fn preadv_nowait(fd: RawFd, iov: &[libc::iovec], offset: u64) -> io::Result<usize> {
    let (off, cnt) = (to_off(offset)? as Off, iov_count(iov)?);
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: the caller guarantees the iovecs; the count is the slice's length.
    return count(unsafe { libc::preadv64v2(fd, iov.as_ptr(), cnt, off, libc::RWF_NOWAIT) });
    #[cfg(all(target_os = "linux", not(target_env = "gnu")))]
    // SAFETY: as above.
    return count(unsafe { libc::preadv2(fd, iov.as_ptr(), cnt, off, libc::RWF_NOWAIT) });
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (fd, off, cnt);
        Err(io::Error::from_raw_os_error(libc::ENOTSUP))
    }
}

/// `pwritev2(RWF_DSYNC)`: writes and makes the bytes written durable before returning (force
/// unit access). ENOTSUP where the call does not exist; EOPNOTSUPP or ENOSYS from kernels
/// without it: the caller then writes with [`pwritev`] and syncs.
///
/// # Safety
/// As [`pwritev`].
pub unsafe fn pwritev_dsync(fd: RawFd, iov: &[libc::iovec], offset: u64) -> io::Result<usize> {
    let (off, cnt) = (to_off(offset)? as Off, iov_count(iov)?);
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: the caller guarantees the iovecs; the count is the slice's length.
    return count(unsafe { libc::pwritev64v2(fd, iov.as_ptr(), cnt, off, libc::RWF_DSYNC) });
    #[cfg(all(target_os = "linux", not(target_env = "gnu")))]
    // SAFETY: as above.
    return count(unsafe { libc::pwritev2(fd, iov.as_ptr(), cnt, off, libc::RWF_DSYNC) });
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (fd, off, cnt);
        Err(io::Error::from_raw_os_error(libc::ENOTSUP))
    }
}

/// Whether `e` says that a call (or a flag of it) does not exist here.
pub fn unsupported(e: &io::Error) -> bool {
    let e = e.raw_os_error();
    // (ENOTSUP and EOPNOTSUPP are one value on Linux, two on the BSDs.)
    e == Some(libc::ENOTSUP) || matches!(e, Some(libc::EOPNOTSUPP | libc::ENOSYS))
}

/// Where `lseek` looks.
#[derive(Debug, Clone, Copy)]
pub enum Seek {
    /// The first data at or after the offset (`SEEK_DATA`).
    Data,
    /// The first hole at or after the offset (`SEEK_HOLE`; the end of the file counts).
    Hole,
}

/// `lseek(SEEK_DATA / SEEK_HOLE)` at a 64-bit offset. ENXIO: no data after `offset`.
pub fn seek(fd: RawFd, offset: u64, whence: Seek) -> io::Result<u64> {
    let off = to_off(offset)? as Off;
    let whence = match whence {
        Seek::Data => libc::SEEK_DATA,
        Seek::Hole => libc::SEEK_HOLE,
    };
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: lseek on a descriptor has no memory effects.
    let r = unsafe { libc::lseek64(fd, off, whence) };
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    // SAFETY: as above.
    let r = unsafe { libc::lseek(fd, off, whence) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as u64)
}

/// Reserves `len` bytes at `offset` (growing the file): `fallocate` on Linux, `posix_fallocate`
/// on FreeBSD, ENOTSUP elsewhere (the caller then extends the file sparsely).
pub fn reserve(fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
    let (off, len) = (to_off(offset)? as Off, to_off(len)? as Off);
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: fallocate on a descriptor has no memory effects.
    return check(unsafe { libc::fallocate64(fd, 0, off, len) });
    #[cfg(all(target_os = "linux", not(target_env = "gnu")))]
    // SAFETY: as above.
    return check(unsafe { libc::fallocate(fd, 0, off, len) });
    #[cfg(target_os = "freebsd")]
    {
        // posix_fallocate returns the error instead of setting errno.
        // SAFETY: as above.
        let r = unsafe { libc::posix_fallocate(fd, off, len) };
        return if r == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(r))
        };
    }
    #[cfg(not(any(target_os = "linux", target_os = "freebsd")))]
    {
        let _ = (fd, off, len);
        Err(io::Error::from_raw_os_error(libc::ENOTSUP))
    }
}

/// Deallocates `len` bytes at `offset`, keeping the file's size (they then read as zeros):
/// `fallocate(PUNCH_HOLE | KEEP_SIZE)` on Linux, ENOTSUP elsewhere (the caller writes zeros).
pub fn punch_hole(fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
    let (off, len) = (to_off(offset)? as Off, to_off(len)? as Off);
    #[cfg(target_os = "linux")]
    {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        #[cfg(target_env = "gnu")]
        // SAFETY: fallocate on a descriptor has no memory effects.
        return check(unsafe { libc::fallocate64(fd, mode, off, len) });
        #[cfg(not(target_env = "gnu"))]
        // SAFETY: as above.
        return check(unsafe { libc::fallocate(fd, mode, off, len) });
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (fd, off, len);
        Err(io::Error::from_raw_os_error(libc::ENOTSUP))
    }
}

/// Opens `path` with `options`, bypassing the page cache: `O_DIRECT` where it exists,
/// `F_NOCACHE` on macOS (set after the open), ENOTSUP with a message elsewhere.
pub fn open_direct(options: &mut OpenOptions, path: &std::path::Path) -> io::Result<File> {
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_DIRECT).open(path)
    }
    #[cfg(target_os = "macos")]
    {
        use std::os::fd::AsRawFd;
        let file = options.open(path)?;
        // SAFETY: fcntl(F_NOCACHE) on our own descriptor has no memory effects.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_NOCACHE, 1) } == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok(file)
    }
    #[cfg(not(any(
        target_os = "linux",
        target_os = "android",
        target_os = "freebsd",
        target_os = "macos"
    )))]
    {
        let _ = (options, path);
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "direct I/O (O_DIRECT) is not supported on this platform",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn offsets_past_i64_are_efbig() {
        assert_eq!(to_off(i64::MAX as u64).unwrap(), i64::MAX);
        let e = to_off(i64::MAX as u64 + 1).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EFBIG));
    }

    #[test]
    fn vectored_io_and_seek_past_4_gib() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        // Past 4 GiB: a 32-bit off_t would wrap this to 4096 or fail with EINVAL/EOVERFLOW.
        let at = (5u64 << 30) + 4096;
        let data = *b"far away";
        let iov = [libc::iovec {
            iov_base: data.as_ptr() as *mut _,
            iov_len: data.len(),
        }];
        // SAFETY: the iovec points into `data`, alive for the call; pwritev only reads it.
        let n = unsafe { pwritev(f.as_raw_fd(), &iov, at) }.unwrap();
        assert_eq!(n, data.len());
        assert_eq!(f.metadata().unwrap().len(), at + data.len() as u64);
        let mut back = [0u8; 8];
        let iov = [libc::iovec {
            iov_base: back.as_mut_ptr().cast(),
            iov_len: back.len(),
        }];
        // SAFETY: the iovec points into `back`, exclusively borrowed for the call.
        let n = unsafe { preadv(f.as_raw_fd(), &iov, at) }.unwrap();
        assert_eq!(n, 8);
        assert_eq!(back, data);
        // The data block is found past 4 GiB (a file system without SEEK_DATA answers with
        // the offset itself).
        let d = seek(f.as_raw_fd(), 1 << 32, Seek::Data).unwrap();
        assert!((1 << 32..=at).contains(&d), "{d}");
        let h = seek(f.as_raw_fd(), at, Seek::Hole).unwrap();
        assert_eq!(h, at + 8);
    }
}
