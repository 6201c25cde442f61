// SPDX-License-Identifier: MIT OR Apache-2.0
//! On-disk structures of the QED format: the header, the geometry it implies, and L1/L2 table
//! entries. Pure bytes <-> structs, no I/O. Every value read from a file is validated here before
//! anything else sizes an allocation or a shift by it.

pub mod constants;
pub mod geometry;
pub mod header;
pub mod table;

pub use constants::*;
pub use geometry::Geometry;
pub use header::Header;
pub use table::L2Entry;
