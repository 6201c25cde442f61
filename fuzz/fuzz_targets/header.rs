// SPDX-License-Identifier: MIT OR Apache-2.0
//! Header::parse + Header::validate on arbitrary bytes.
//!
//! Input: the 64 header bytes, then optionally 8 bytes (little-endian) giving the file length
//! to validate against; without them, the input length is the file length. Checks that a
//! validated header's derived ranges really lie inside the file, and that encoding round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qed::format::{Header, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    let file_len = match data.get(HEADER_LEN..HEADER_LEN + 8) {
        Some(b) => u64::from_le_bytes(b.try_into().unwrap()),
        None => data.len() as u64,
    };
    let Ok(h) = Header::parse(data) else { return };
    // Encoding round-trips exactly.
    assert_eq!(&h.to_bytes()[..], &data[..HEADER_LEN]);
    assert_eq!(Header::parse(&h.to_bytes()).unwrap(), h);
    let Ok(g) = h.validate(file_len) else { return };
    // Everything validate promises, recomputed with wide arithmetic.
    let cs = g.cluster_bytes() as u128;
    assert_eq!(cs, h.cluster_size as u128);
    assert!(cs.is_power_of_two() && (4096..=64 << 20).contains(&cs));
    assert!(h.table_size.is_power_of_two() && (1..=16).contains(&h.table_size));
    let header_bytes = h.header_size as u128 * cs;
    assert!(header_bytes >= cs && header_bytes <= file_len as u128);
    assert_eq!(h.header_bytes() as u128, header_bytes);
    let l1 = h.l1_table_offset as u128;
    assert!(l1 % cs == 0 && l1 >= header_bytes);
    assert!(l1 + g.table_bytes() as u128 <= file_len as u128);
    assert!(h.image_size % 512 == 0);
    assert!((h.image_size as u128) <= g.max_image_size());
    let entries = g.table_entries() as u128;
    assert_eq!(g.max_image_size(), cs * entries * entries);
    if let Some((off, len)) = h.backing_name_range() {
        assert!(off as u128 + len as u128 <= header_bytes);
        assert!(len <= 4095);
    }
    // The L1 entries needed for the virtual size fit in the table.
    assert!((g.l1_entries_for(h.image_size) as u128) <= entries);
    // Index helpers on the last byte of the disk stay in range.
    if h.image_size > 0 {
        let last = h.image_size - 1;
        assert!((g.l1_index(last) as u128) < entries);
        assert!((g.l2_index(last) as u128) < entries);
        assert!(g.offset_in_cluster(last) < g.cluster_bytes());
    }
});
