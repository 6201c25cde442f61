// SPDX-License-Identifier: MIT OR Apache-2.0
//! How the structs that cross the C boundary grow without breaking old binaries (the rule at
//! the top of qed.h): each begins with `uint32_t struct_size`, which the caller sets to
//! `sizeof` the struct its header declares. Fields are only ever appended. The library reads
//! (input structs) or writes (output structs) only the bytes both sides know; input fields the
//! caller's header lacks take their defaults, as if zero.

use super::{CError, CResult};

/// The smallest `struct_size` taken: the size field and one more 4-byte field. Any release's
/// layout is at least that, and the smallest release of a struct is its first.
const MIN_STRUCT_SIZE: u32 = 8;
/// The largest `struct_size` taken: anything bigger is an uninitialised field, not a struct.
const MAX_STRUCT_SIZE: u32 = 4096;

/// A `#[repr(C)]` struct whose first field is `struct_size: u32` and for which all-zero bytes
/// are a valid value (integers, raw pointers, `Option` of function pointers).
///
/// # Safety
/// Implementors must be `#[repr(C)]`, start with a `u32` size field, and be valid when zeroed.
pub(crate) unsafe trait Extensible: Copy {
    /// The C name, for messages.
    const NAME: &'static str;
}

/// Reads the caller's `struct_size` and checks it is one we can serve.
///
/// # Safety
/// `p` is non-NULL, aligned and valid for reading 4 bytes.
unsafe fn struct_size<T: Extensible>(func: &str, arg: &str, p: *const T) -> CResult<usize> {
    // SAFETY: per the caller's contract; struct_size is the first field of every Extensible.
    let size = unsafe { p.cast::<u32>().read() };
    if !(MIN_STRUCT_SIZE..=MAX_STRUCT_SIZE).contains(&size) || size % 4 != 0 {
        return Err(CError::arg(
            func,
            format_args!(
                "{arg}->struct_size is {size}; set it to sizeof(struct {}) ({} in this header)",
                T::NAME,
                std::mem::size_of::<T>()
            ),
        ));
    }
    Ok(size as usize)
}

/// Copies an input struct from C. Fields past the caller's `struct_size` read as zero (their
/// default); bytes past the fields this library knows must be zero, or the caller asked for
/// something this version cannot do and gets `-ENOTSUP`.
///
/// # Safety
/// `p` is NULL or points to `struct_size` readable bytes laid out as `T`'s prefix.
pub(crate) unsafe fn read_in<T: Extensible>(func: &str, arg: &str, p: *const T) -> CResult<T> {
    if p.is_null() {
        return Err(CError::arg(func, format_args!("{arg} is NULL")));
    }
    // SAFETY: p is non-NULL and valid per the contract.
    let size = unsafe { struct_size(func, arg, p) }?;
    let known = std::mem::size_of::<T>();
    if size > known {
        // SAFETY: the caller declared `size` readable bytes.
        let tail = unsafe { std::slice::from_raw_parts(p.cast::<u8>().add(known), size - known) };
        if let Some(i) = tail.iter().position(|&b| b != 0) {
            return Err(CError {
                errno: libc::ENOTSUP,
                msg: format!(
                    "{func}: {arg} sets a field this libqed ({}) does not know (byte {} of struct {}, which ends at {known} here); a newer libqed is needed",
                    env!("CARGO_PKG_VERSION"),
                    known + i,
                    T::NAME
                ),
            });
        }
    }
    // SAFETY: T is valid when zeroed (Extensible's contract).
    let mut v: T = unsafe { std::mem::zeroed() };
    // SAFETY: min(size, known) bytes are readable at p and writable at &mut v; an untyped copy
    // may carry the caller's padding bytes, which T never reads.
    unsafe {
        std::ptr::copy_nonoverlapping(
            p.cast::<u8>(),
            (&mut v as *mut T).cast::<u8>(),
            size.min(known),
        )
    };
    Ok(v)
}

/// Like [`read_in`], but NULL gives `None` (the defaults).
///
/// # Safety
/// As for [`read_in`].
pub(crate) unsafe fn read_in_opt<T: Extensible>(
    func: &str,
    arg: &str,
    p: *const T,
) -> CResult<Option<T>> {
    if p.is_null() {
        Ok(None)
    } else {
        // SAFETY: forwarded contract.
        unsafe { read_in(func, arg, p) }.map(Some)
    }
}

/// Checks an output struct's `struct_size` before any work is done, so a bad size changes nothing.
///
/// # Safety
/// `p` is NULL or valid for reading its first 4 bytes.
pub(crate) unsafe fn check_out<T: Extensible>(func: &str, arg: &str, p: *mut T) -> CResult<()> {
    if p.is_null() {
        return Err(CError::arg(func, format_args!("{arg} is NULL")));
    }
    // SAFETY: p is non-NULL and valid per the contract.
    unsafe { struct_size(func, arg, p) }.map(|_| ())
}

/// Writes an output struct to C: the first `min(struct_size, sizeof here)` bytes of `v`, with
/// the caller's `struct_size` kept. Bytes past the fields this library knows are not touched
/// (a caller with a newer header zero-initialises the struct to see which were filled).
///
/// # Safety
/// `p` is NULL or points to `struct_size` writable bytes laid out as `T`'s prefix.
pub(crate) unsafe fn write_out<T: Extensible>(
    func: &str,
    arg: &str,
    p: *mut T,
    v: T,
) -> CResult<()> {
    // SAFETY: forwarded contract.
    unsafe { check_out(func, arg, p) }?;
    // SAFETY: checked non-NULL and valid above.
    let size = unsafe { p.cast::<u32>().read() };
    let n = (size as usize).min(std::mem::size_of::<T>());
    // SAFETY: n bytes are readable at &v and writable at p; the size field is then restored.
    unsafe {
        std::ptr::copy_nonoverlapping((&v as *const T).cast::<u8>(), p.cast::<u8>(), n);
        p.cast::<u32>().write(size);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq)]
    struct Two {
        struct_size: u32,
        a: u32,
        b: u64,
    }
    // SAFETY: repr(C), u32 size first, integers only.
    unsafe impl Extensible for Two {
        const NAME: &'static str = "two";
    }

    #[test]
    fn smaller_input_defaults_the_missing_fields() {
        let old: [u32; 2] = [8, 7];
        // SAFETY: 8 readable bytes, the prefix of Two.
        let v = unsafe { read_in("f", "o", old.as_ptr().cast::<Two>()) }.unwrap();
        assert_eq!((v.struct_size, v.a, v.b), (8, 7, 0));
    }

    #[test]
    fn larger_input_needs_a_zero_tail() {
        let mut newer = [0u64; 4];
        newer[0] = 32 | (5 << 32); // struct_size 32, a = 5 (little-endian)
        newer[1] = 9;
        // SAFETY: 32 readable bytes.
        let v = unsafe { read_in("f", "o", newer.as_ptr().cast::<Two>()) }.unwrap();
        assert_eq!((v.a, v.b), (5, 9));
        newer[3] = 1;
        // SAFETY: as above.
        let e = unsafe { read_in("f", "o", newer.as_ptr().cast::<Two>()) }.unwrap_err();
        assert_eq!(e.errno, libc::ENOTSUP, "{}", e.msg);
        assert!(e.msg.contains("byte 24"), "{}", e.msg);
    }

    #[test]
    fn bad_sizes_are_refused() {
        for size in [0u32, 4, 7, 10, 4097, 8192, u32::MAX] {
            let raw = [size as u64, 0, 0, 0];
            // SAFETY: 32 readable bytes; sizes above that are refused before any read.
            let e = unsafe { read_in("f", "o", raw.as_ptr().cast::<Two>()) }.unwrap_err();
            assert_eq!(e.errno, libc::EINVAL, "{size}");
            assert!(e.msg.contains("struct_size"), "{}", e.msg);
        }
    }

    #[test]
    fn output_writes_only_what_the_caller_knows() {
        let mut old: [u32; 4] = [8, 0, 0xdead, 0xbeef];
        let v = Two {
            struct_size: 999,
            a: 1,
            b: u64::MAX,
        };
        // SAFETY: 16 writable bytes, the caller declares 8.
        unsafe { write_out("f", "o", old.as_mut_ptr().cast::<Two>(), v) }.unwrap();
        assert_eq!(old, [8, 1, 0xdead, 0xbeef]);
        let mut full = Two {
            struct_size: 16,
            a: 0,
            b: 0,
        };
        // SAFETY: a whole Two.
        unsafe { write_out("f", "o", &mut full, v) }.unwrap();
        assert_eq!((full.struct_size, full.a, full.b), (16, 1, u64::MAX));
    }
}
