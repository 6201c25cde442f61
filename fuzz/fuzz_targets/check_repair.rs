//! Opens arbitrary bytes read-write (no backing file; the open repairs an image whose need-check
//! bit is set), then: check (report only), check and repair everything, check again, which must
//! find no corruption and exactly the leaks the repair reported as left (none when the L1 table
//! directly follows the header, as QEMU lays it out), and a second repair, which must change
//! nothing (repair is idempotent). The repaired image must reopen with the same result.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qed::format::Header;
use qed::{CheckFix, Image, MemStorage, OpenOptions};
use std::sync::Arc;

fuzz_target!(|data: &[u8]| {
    let storage = Arc::new(MemStorage::from_bytes(data));
    let opts = OpenOptions {
        writable: true,
        no_backing: true,
        lock: false,
        l2_cache_bytes: 64 << 10,
        ..OpenOptions::read_write()
    };
    let Ok(img) = Image::open_storage(storage.clone(), &opts) else {
        return;
    };
    let h = Header::parse(data).expect("an image that opens has a header");
    // Compaction moves data clusters and tables (whole) into holes, never the header or the L1
    // table: holes between them can stay leaked only if the L1 table does not follow the header.
    let qemu_layout = h.l1_table_offset == h.header_bytes();
    let Ok(before) = img.check(CheckFix::NONE) else {
        return;
    };
    let fixed = img
        .check(CheckFix::ALL)
        .expect("repair on memory storage cannot fail");
    assert_eq!(
        fixed.corruptions, 0,
        "repair left corruptions: {fixed:?} (report {before:?})"
    );
    assert_eq!(fixed.check_errors, 0, "repair hit check errors: {fixed:?}");
    let after = img.check(CheckFix::NONE).expect("check after repair");
    assert_eq!(
        after.corruptions, 0,
        "corruptions after repair: {after:?} (repair {fixed:?})"
    );
    assert_eq!(
        after.leaks, fixed.leaks,
        "leaks after repair: {after:?} (repair {fixed:?})"
    );
    if qemu_layout {
        assert_eq!(
            after.leaks, 0,
            "repair left leaks: {after:?} (repair {fixed:?})"
        );
    }
    assert_eq!(
        after.check_errors, 0,
        "check errors after repair: {after:?}"
    );
    let snapshot = storage.to_bytes();
    let again = img.check(CheckFix::ALL).expect("second repair");
    assert_eq!(
        again.corruptions_fixed, 0,
        "second repair fixed corruptions: {again:?}"
    );
    assert_eq!(again.leaks_fixed, 0, "second repair fixed leaks: {again:?}");
    assert!(
        storage.to_bytes() == snapshot,
        "second repair changed the image"
    );
    assert_eq!(again.allocated_clusters, after.allocated_clusters);
    img.close().expect("close");
    // The repaired image reopens, and is still clean.
    let img = Image::open_storage(storage.clone(), &opts).expect("reopen after repair");
    let last = img.check(CheckFix::NONE).expect("check after reopen");
    assert_eq!(last.corruptions, 0, "after reopen: {last:?}");
    assert_eq!(last.leaks, after.leaks, "after reopen: {last:?}");
    let _ = img.close();
});
