// SPDX-License-Identifier: MIT OR Apache-2.0
//! The QED header: the first 64 bytes of cluster 0, little-endian.
//!
//! | offset | size | field                   |
//! |--------|------|-------------------------|
//! | 0      | 4    | magic `QED\0`           |
//! | 4      | 4    | cluster_size            |
//! | 8      | 4    | table_size (clusters)   |
//! | 12     | 4    | header_size (clusters)  |
//! | 16     | 8    | features                |
//! | 24     | 8    | compat_features         |
//! | 32     | 8    | autoclear_features      |
//! | 40     | 8    | l1_table_offset         |
//! | 48     | 8    | image_size              |
//! | 56     | 4    | backing_filename_offset |
//! | 60     | 4    | backing_filename_size   |
//!
//! [`Header::validate`] refuses everything QEMU refuses, and a little more that QEMU lets through
//! to its own harm (header_size 0, backing names with NUL bytes), but none of the valid geometries
//! QEMU wrongly refuses (table_size 1, sizes whose maximum overflows u64).

use super::constants::*;
use super::geometry::{Geometry, GeometryError};
use crate::error::{Error, Result};

/// The fixed part of a QED header, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Must be [`QED_MAGIC`].
    pub magic: u32,
    /// Cluster size in bytes: a power of two, 4 KiB ..= 64 MiB.
    pub cluster_size: u32,
    /// L1 and L2 table size in clusters: a power of two, 1 ..= 16.
    pub table_size: u32,
    /// Header length in clusters, at least 1; the backing file name lives inside it.
    pub header_size: u32,
    /// Incompatible features; unknown bits make the image unopenable.
    pub features: u64,
    /// Compatible features; unknown bits are ignored.
    pub compat_features: u64,
    /// Autoclear features; unknown bits are cleared on a read-write open.
    pub autoclear_features: u64,
    /// File offset of the L1 table: cluster-aligned, after the header, inside the file.
    pub l1_table_offset: u64,
    /// Virtual disk size in bytes: a multiple of 512, at most the geometry's maximum.
    pub image_size: u64,
    /// File offset of the backing file name (valid with [`FEATURE_BACKING_FILE`]).
    pub backing_filename_offset: u32,
    /// Length of the backing file name, with no terminating NUL.
    pub backing_filename_size: u32,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn invalid(field: &'static str, value: u64, reason: &'static str) -> Error {
    Error::InvalidHeader {
        field,
        value,
        reason,
    }
}

impl Header {
    /// A header for a new image (header_size 1, L1 table right after it).
    pub fn new(geometry: Geometry, image_size: u64) -> Header {
        Header {
            magic: QED_MAGIC,
            cluster_size: geometry.cluster_size,
            table_size: geometry.table_size,
            header_size: 1,
            features: 0,
            compat_features: 0,
            autoclear_features: 0,
            l1_table_offset: geometry.cluster_bytes(),
            image_size,
            backing_filename_offset: 0,
            backing_filename_size: 0,
        }
    }

    /// Decodes the 64-byte header. Only the length and the magic are checked here.
    pub fn parse(bytes: &[u8]) -> Result<Header> {
        if bytes.len() < HEADER_LEN {
            return Err(invalid(
                "header",
                bytes.len() as u64,
                "file is shorter than a QED header",
            ));
        }
        let h = Header {
            magic: u32_at(bytes, 0),
            cluster_size: u32_at(bytes, 4),
            table_size: u32_at(bytes, 8),
            header_size: u32_at(bytes, 12),
            features: u64_at(bytes, 16),
            compat_features: u64_at(bytes, 24),
            autoclear_features: u64_at(bytes, 32),
            l1_table_offset: u64_at(bytes, 40),
            image_size: u64_at(bytes, 48),
            backing_filename_offset: u32_at(bytes, 56),
            backing_filename_size: u32_at(bytes, 60),
        };
        if h.magic != QED_MAGIC {
            return Err(invalid("magic", h.magic as u64, "not a QED image"));
        }
        Ok(h)
    }

    /// Encodes the header into its 64 on-disk bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&self.magic.to_le_bytes());
        b[4..8].copy_from_slice(&self.cluster_size.to_le_bytes());
        b[8..12].copy_from_slice(&self.table_size.to_le_bytes());
        b[12..16].copy_from_slice(&self.header_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.features.to_le_bytes());
        b[24..32].copy_from_slice(&self.compat_features.to_le_bytes());
        b[32..40].copy_from_slice(&self.autoclear_features.to_le_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_le_bytes());
        b[48..56].copy_from_slice(&self.image_size.to_le_bytes());
        b[56..60].copy_from_slice(&self.backing_filename_offset.to_le_bytes());
        b[60..64].copy_from_slice(&self.backing_filename_size.to_le_bytes());
        b
    }

    /// Checks every field against the format's rules and a file of `file_len` bytes, and returns
    /// the geometry. Arithmetic is overflow-free: sizes are validated before they are combined.
    pub fn validate(&self, file_len: u64) -> Result<Geometry> {
        if self.magic != QED_MAGIC {
            return Err(invalid("magic", self.magic as u64, "not a QED image"));
        }
        let geometry = Geometry::new(self.cluster_size, self.table_size).map_err(|e| match e {
            GeometryError::ClusterSize => invalid(
                "cluster_size",
                self.cluster_size as u64,
                "must be a power of two from 4 KiB to 64 MiB",
            ),
            GeometryError::TableSize => invalid(
                "table_size",
                self.table_size as u64,
                "must be a power of two from 1 to 16",
            ),
        })?;
        let unknown = self.features & !FEATURE_MASK;
        if unknown != 0 {
            return Err(Error::Unsupported {
                field: "features",
                value: unknown,
                reason: "unknown incompatible feature bits".into(),
            });
        }
        if self.header_size == 0 {
            return Err(invalid("header_size", 0, "must be at least one cluster"));
        }
        // Both factors are u32, so the product fits in u64.
        let header_bytes = self.header_size as u64 * geometry.cluster_bytes();
        if header_bytes > file_len {
            return Err(invalid(
                "header_size",
                self.header_size as u64,
                "header clusters extend past the end of the file",
            ));
        }
        self.validate_table_offset(&geometry, header_bytes, file_len)?;
        if !geometry.is_valid_image_size(self.image_size) {
            return Err(invalid(
                "image_size",
                self.image_size,
                "must be a multiple of 512 and at most cluster_size * entries^2",
            ));
        }
        if self.has_backing_file() {
            let end = self.backing_filename_offset as u64 + self.backing_filename_size as u64;
            if end > header_bytes {
                return Err(invalid(
                    "backing_filename_offset",
                    self.backing_filename_offset as u64,
                    "backing file name lies outside the header clusters",
                ));
            }
            if self.backing_filename_size > MAX_BACKING_NAME_LEN {
                return Err(invalid(
                    "backing_filename_size",
                    self.backing_filename_size as u64,
                    "backing file name longer than 4095 bytes",
                ));
            }
        }
        Ok(geometry)
    }

    fn validate_table_offset(&self, g: &Geometry, header_bytes: u64, file_len: u64) -> Result<()> {
        let off = self.l1_table_offset;
        if !g.is_cluster_aligned(off) {
            return Err(invalid("l1_table_offset", off, "not cluster-aligned"));
        }
        if off < header_bytes {
            return Err(invalid(
                "l1_table_offset",
                off,
                "L1 table overlaps the header",
            ));
        }
        match off.checked_add(g.table_bytes()) {
            Some(end) if end <= file_len => Ok(()),
            _ => Err(invalid(
                "l1_table_offset",
                off,
                "L1 table extends past the end of the file",
            )),
        }
    }

    /// Header length in bytes (valid after [`Header::validate`]).
    pub fn header_bytes(&self) -> u64 {
        self.header_size as u64 * self.cluster_size as u64
    }

    /// Whether the image has a backing file.
    pub fn has_backing_file(&self) -> bool {
        self.features & FEATURE_BACKING_FILE != 0
    }

    /// Whether the image needs a consistency check before it is trusted read-write.
    pub fn needs_check(&self) -> bool {
        self.features & FEATURE_NEED_CHECK != 0
    }

    /// Where the backing file name lies in the file, if the image has one (valid after
    /// [`Header::validate`], which bounds it inside the header and to 4095 bytes).
    pub fn backing_name_range(&self) -> Option<(u64, usize)> {
        self.has_backing_file().then_some((
            self.backing_filename_offset as u64,
            self.backing_filename_size as usize,
        ))
    }
}

/// Validates the raw bytes of a backing file name.
pub fn parse_backing_name(raw: &[u8]) -> Result<String> {
    if raw.is_empty() {
        return Err(invalid(
            "backing_filename_size",
            0,
            "backing file flag set but name is empty",
        ));
    }
    if let Some(pos) = raw.iter().position(|&b| b == 0) {
        return Err(invalid(
            "backing_filename",
            pos as u64,
            "name contains a NUL byte",
        ));
    }
    let name = std::str::from_utf8(raw).map_err(|e| {
        invalid(
            "backing_filename",
            e.valid_up_to() as u64,
            "name is not UTF-8",
        )
    })?;
    Ok(name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Header {
        Header::new(Geometry::new(65536, 4).unwrap(), 64 << 20)
    }

    #[test]
    fn roundtrip_matches_qemu_layout() {
        let h = base();
        let b = h.to_bytes();
        assert_eq!(&b[0..4], b"QED\0");
        assert_eq!(Header::parse(&b).unwrap(), h);
        assert_eq!(h.validate(5 * 65536).unwrap().table_entries(), 32768);
    }

    #[test]
    fn refuses_each_bad_field_by_name() {
        let file = 5 * 65536;
        type Mutation = Box<dyn Fn(&mut Header)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|h| h.magic = 0x58444551), "magic"),
            (Box::new(|h| h.cluster_size = 0), "cluster_size"),
            (Box::new(|h| h.cluster_size = 69632), "cluster_size"),
            (Box::new(|h| h.table_size = 0), "table_size"),
            (Box::new(|h| h.table_size = 32), "table_size"),
            (Box::new(|h| h.header_size = 0), "header_size"),
            (Box::new(|h| h.header_size = u32::MAX), "header_size"),
            (Box::new(|h| h.features = 1 << 40), "features"),
            (Box::new(|h| h.l1_table_offset = 0), "l1_table_offset"),
            (Box::new(|h| h.l1_table_offset = 65537), "l1_table_offset"),
            (
                Box::new(|h| h.l1_table_offset = 2 * 65536),
                "l1_table_offset",
            ),
            (
                Box::new(|h| h.l1_table_offset = 0xffff_ffff_ffff_0000),
                "l1_table_offset",
            ),
            (Box::new(|h| h.image_size = 1000), "image_size"),
            (Box::new(|h| h.image_size = 1 << 62), "image_size"),
            (
                Box::new(|h| {
                    h.features = FEATURE_BACKING_FILE;
                    h.backing_filename_offset = 65530;
                    h.backing_filename_size = 10;
                }),
                "backing_filename_offset",
            ),
            (
                Box::new(|h| {
                    h.features = FEATURE_BACKING_FILE;
                    h.backing_filename_offset = 64;
                    h.backing_filename_size = u32::MAX;
                }),
                "backing_filename_offset",
            ),
        ];
        for (mutate, field) in cases {
            let mut h = base();
            mutate(&mut h);
            let err = Header::parse(&h.to_bytes()).and_then(|h| h.validate(file));
            match err {
                Err(Error::InvalidHeader { field: f, .. })
                | Err(Error::Unsupported { field: f, .. }) => {
                    assert_eq!(f, field)
                }
                other => panic!("expected {field} to be refused, got {other:?}"),
            }
        }
    }

    #[test]
    fn accepts_geometries_qemu_refuses() {
        // table_size 1 and u64-overflowing maxima are valid.
        let g = Geometry::new(4096, 1).unwrap();
        assert!(Header::new(g, 1 << 20).validate(2 * 4096).is_ok());
        let g = Geometry::new(64 << 20, 16).unwrap();
        assert!(Header::new(g, 1 << 40).validate(17 * (64 << 20)).is_ok());
    }

    #[test]
    fn short_header_refused() {
        assert!(matches!(
            Header::parse(&[0u8; 40]),
            Err(Error::InvalidHeader {
                field: "header",
                ..
            })
        ));
    }

    #[test]
    fn backing_name_rules() {
        let mut h = base();
        h.features = FEATURE_BACKING_FILE;
        h.backing_filename_offset = 64;
        h.backing_filename_size = 8;
        assert_eq!(h.backing_name_range(), Some((64, 8)));
        assert_eq!(parse_backing_name(b"base.raw").unwrap(), "base.raw");
        assert!(parse_backing_name(b"ba\0e.raw").is_err());
        assert!(parse_backing_name(b"").is_err());
        assert!(parse_backing_name(&[0xff, 0xfe]).is_err());
    }
}
