// SPDX-License-Identifier: MIT OR Apache-2.0
//! L1 and L2 table entries: arrays of little-endian u64 file offsets.
//!
//! An L1 entry is 0 (no L2 table) or the file offset of an L2 table. An L2 entry is 0
//! (unallocated: the backing file or zeros), 1 (a zero cluster) or the file offset of a data
//! cluster.

use super::constants::L2_ZERO_CLUSTER;

/// What an L2 entry says about its guest cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L2Entry {
    /// No data here: read through to the backing file, or zeros.
    Unallocated,
    /// Reads as zeros, even over a backing file.
    Zero,
    /// Data at this file offset.
    Data(u64),
}

impl L2Entry {
    /// Decodes a raw entry.
    pub fn from_raw(raw: u64) -> L2Entry {
        match raw {
            0 => L2Entry::Unallocated,
            L2_ZERO_CLUSTER => L2Entry::Zero,
            off => L2Entry::Data(off),
        }
    }
    /// Encodes to the on-disk value.
    pub fn to_raw(self) -> u64 {
        match self {
            L2Entry::Unallocated => 0,
            L2Entry::Zero => L2_ZERO_CLUSTER,
            L2Entry::Data(off) => off,
        }
    }
}

/// Decodes table bytes into entries (`bytes.len()` must be a multiple of 8).
pub fn decode_entries(bytes: &[u8], out: &mut Vec<u64>) {
    out.extend(bytes.chunks_exact(8).map(|c| {
        let mut a = [0u8; 8];
        a.copy_from_slice(c);
        u64::from_le_bytes(a)
    }));
}

/// Encodes entries into table bytes.
pub fn encode_entries(entries: impl IntoIterator<Item = u64>, out: &mut Vec<u8>) {
    for e in entries {
        out.extend_from_slice(&e.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_roundtrip() {
        let mut bytes = Vec::new();
        encode_entries([0, 1, 0x30000, u64::MAX], &mut bytes);
        assert_eq!(bytes.len(), 32);
        assert_eq!(&bytes[16..24], &[0, 0, 3, 0, 0, 0, 0, 0]);
        let mut back = Vec::new();
        decode_entries(&bytes, &mut back);
        assert_eq!(back, vec![0, 1, 0x30000, u64::MAX]);
        assert_eq!(L2Entry::from_raw(1), L2Entry::Zero);
        assert_eq!(L2Entry::from_raw(0), L2Entry::Unallocated);
        assert_eq!(L2Entry::Data(4096).to_raw(), 4096);
    }
}
