// SPDX-License-Identifier: MIT OR Apache-2.0
//! Numbers fixed by the QED format and by the limits we (and QEMU) enforce.

/// `QED\0` read as a little-endian u32.
pub const QED_MAGIC: u32 = 0x0044_4551;
/// Size of the fixed part of the header in bytes.
pub const HEADER_LEN: usize = 64;

/// Incompatible feature: the image has a backing file.
pub const FEATURE_BACKING_FILE: u64 = 0x1;
/// Incompatible feature: the image may be inconsistent and must be checked before read-write use.
pub const FEATURE_NEED_CHECK: u64 = 0x2;
/// Incompatible feature: the backing file is raw; do not probe its format.
pub const FEATURE_BACKING_FORMAT_NO_PROBE: u64 = 0x4;
/// Every incompatible feature bit we understand; any other bit makes the image unopenable.
pub const FEATURE_MASK: u64 =
    FEATURE_BACKING_FILE | FEATURE_NEED_CHECK | FEATURE_BACKING_FORMAT_NO_PROBE;
/// Compatible features we know (none are defined).
pub const COMPAT_FEATURE_MASK: u64 = 0;
/// Autoclear features we know (none are defined); unknown ones are cleared on read-write open.
pub const AUTOCLEAR_FEATURE_MASK: u64 = 0;

/// Smallest cluster size.
pub const MIN_CLUSTER_SIZE: u32 = 4 * 1024;
/// Largest cluster size.
pub const MAX_CLUSTER_SIZE: u32 = 64 * 1024 * 1024;
/// Default cluster size for new images.
pub const DEFAULT_CLUSTER_SIZE: u32 = 64 * 1024;
/// Smallest table size, in clusters.
pub const MIN_TABLE_SIZE: u32 = 1;
/// Largest table size, in clusters.
pub const MAX_TABLE_SIZE: u32 = 16;
/// Default table size for new images.
pub const DEFAULT_TABLE_SIZE: u32 = 4;
/// Guest sizes are whole 512-byte sectors.
pub const SECTOR_SIZE: u64 = 512;
/// L2 entry value meaning "this cluster reads as zeros", even over a backing file.
pub const L2_ZERO_CLUSTER: u64 = 1;
/// The longest backing file name we accept (QEMU reads names into a 4 KiB buffer, with a NUL).
pub const MAX_BACKING_NAME_LEN: u32 = 4095;
