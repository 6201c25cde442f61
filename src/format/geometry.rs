// SPDX-License-Identifier: MIT OR Apache-2.0
//! The geometry of an image: cluster and table sizes and the arithmetic of guest addresses.
//!
//! All address arithmetic of the engine goes through here, with shifts and masks derived once from
//! validated sizes, so there is no division by a size minus one and no overflow.

use super::constants::*;

/// Cluster and table sizes, validated, with the derived shifts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Cluster size in bytes (power of two, 4 KiB ..= 64 MiB).
    pub cluster_size: u32,
    /// Table size in clusters (power of two, 1 ..= 16).
    pub table_size: u32,
    cluster_bits: u32,
    table_bits: u32,
}

/// Why a geometry was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GeometryError {
    /// cluster_size is not a power of two in range.
    ClusterSize,
    /// table_size is not a power of two in range.
    TableSize,
}

impl Geometry {
    /// Validates the two sizes.
    pub fn new(cluster_size: u32, table_size: u32) -> Result<Self, GeometryError> {
        if !cluster_size.is_power_of_two()
            || !(MIN_CLUSTER_SIZE..=MAX_CLUSTER_SIZE).contains(&cluster_size)
        {
            return Err(GeometryError::ClusterSize);
        }
        if !table_size.is_power_of_two() || !(MIN_TABLE_SIZE..=MAX_TABLE_SIZE).contains(&table_size)
        {
            return Err(GeometryError::TableSize);
        }
        let cluster_bits = cluster_size.trailing_zeros();
        // entries per table = table_size * cluster_size / 8
        let table_bits = table_size.trailing_zeros() + cluster_bits - 3;
        Ok(Geometry {
            cluster_size,
            table_size,
            cluster_bits,
            table_bits,
        })
    }

    /// log2(cluster_size).
    pub fn cluster_bits(&self) -> u32 {
        self.cluster_bits
    }
    /// log2(entries per table).
    pub fn table_bits(&self) -> u32 {
        self.table_bits
    }
    /// Cluster size as u64.
    pub fn cluster_bytes(&self) -> u64 {
        self.cluster_size as u64
    }
    /// Entries in one L1 or L2 table.
    pub fn table_entries(&self) -> u64 {
        1u64 << self.table_bits
    }
    /// Bytes of one L1 or L2 table (at most 1 GiB).
    pub fn table_bytes(&self) -> u64 {
        (self.table_size as u64) << self.cluster_bits
    }
    /// log2 of the guest bytes one L2 table maps.
    pub fn l2_coverage_bits(&self) -> u32 {
        self.cluster_bits + self.table_bits
    }
    /// The largest virtual size the geometry can address, `cluster_size * N * N`, computed
    /// without overflow (it exceeds u64 for large geometries; QEMU wraps it to 0).
    pub fn max_image_size(&self) -> u128 {
        1u128 << (self.cluster_bits + 2 * self.table_bits)
    }
    /// Whether `size` is a valid virtual size: a multiple of 512, at most the maximum.
    pub fn is_valid_image_size(&self, size: u64) -> bool {
        size % SECTOR_SIZE == 0 && (size as u128) <= self.max_image_size()
    }
    /// L1 index of a guest offset.
    pub fn l1_index(&self, pos: u64) -> u64 {
        pos >> self.l2_coverage_bits()
    }
    /// L2 index of a guest offset.
    pub fn l2_index(&self, pos: u64) -> u64 {
        (pos >> self.cluster_bits) & (self.table_entries() - 1)
    }
    /// Offset of `pos` inside its cluster.
    pub fn offset_in_cluster(&self, pos: u64) -> u64 {
        pos & (self.cluster_bytes() - 1)
    }
    /// Whether `off` is a multiple of the cluster size.
    pub fn is_cluster_aligned(&self, off: u64) -> bool {
        self.offset_in_cluster(off) == 0
    }
    /// Rounds down to a cluster boundary.
    pub fn cluster_floor(&self, off: u64) -> u64 {
        off & !(self.cluster_bytes() - 1)
    }
    /// Rounds up to a cluster boundary (saturating at the last boundary below 2^64).
    pub fn cluster_ceil(&self, off: u64) -> u64 {
        match off.checked_add(self.cluster_bytes() - 1) {
            Some(v) => self.cluster_floor(v),
            None => self.cluster_floor(u64::MAX),
        }
    }
    /// Number of L1 entries needed to map `image_size` guest bytes.
    pub fn l1_entries_for(&self, image_size: u64) -> u64 {
        let bits = self.l2_coverage_bits();
        if bits >= 64 {
            return u64::from(image_size > 0);
        }
        let n = (image_size >> bits) + u64::from(image_size & ((1u64 << bits) - 1) != 0);
        n.min(self.table_entries())
    }
    /// Guest bytes mapped by one L2 table, saturated to u64::MAX.
    pub fn l2_coverage(&self) -> u64 {
        let bits = self.l2_coverage_bits();
        if bits >= 64 {
            u64::MAX
        } else {
            1u64 << bits
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_bad_sizes() {
        for cs in [0, 512, 2048, 4097, 69632, 1 << 27, 1 << 31, u32::MAX] {
            assert_eq!(
                Geometry::new(cs, 4),
                Err(GeometryError::ClusterSize),
                "cs {cs}"
            );
        }
        for ts in [0, 3, 32, u32::MAX] {
            assert_eq!(
                Geometry::new(65536, ts),
                Err(GeometryError::TableSize),
                "ts {ts}"
            );
        }
    }

    #[test]
    fn max_size_does_not_wrap_where_qemu_does() {
        // QEMU computes this in u64 and gets 0 for 64 MiB clusters.
        let g = Geometry::new(64 << 20, 4).unwrap();
        assert_eq!(g.max_image_size(), 1u128 << (26 + 2 * 25));
        assert!(g.is_valid_image_size(1 << 30));
        let g = Geometry::new(2 << 20, 16).unwrap();
        assert!(g.is_valid_image_size(1 << 40));
        let g = Geometry::new(65536, 4).unwrap();
        assert_eq!(g.max_image_size(), 65536u128 * 32768 * 32768);
        assert!(!g.is_valid_image_size(1 << 62));
        assert!(!g.is_valid_image_size(1000));
    }

    #[test]
    fn addressing() {
        let g = Geometry::new(4096, 1).unwrap();
        assert_eq!(g.table_entries(), 512);
        assert_eq!(g.l1_index(512 * 4096), 1);
        assert_eq!(g.l2_index(512 * 4096 + 4096 * 3 + 7), 3);
        assert_eq!(g.offset_in_cluster(4096 * 3 + 7), 7);
        assert_eq!(g.l1_entries_for(0), 0);
        assert_eq!(g.l1_entries_for(1), 1);
        assert_eq!(g.l1_entries_for(512 * 4096), 1);
        assert_eq!(g.l1_entries_for(512 * 4096 + 512), 2);
        // Biggest geometry: the L2 coverage is 2^53, and u64 sizes need only 2^11 L1 entries.
        let g = Geometry::new(64 << 20, 16).unwrap();
        assert_eq!(g.l1_entries_for(!511u64), 1 << 11);
    }
}
