// SPDX-License-Identifier: MIT OR Apache-2.0
//! The need-check bit of a running image, read from the file: the idle timer clears it after
//! the last metadata update (so a crash while the guest idles leaves an image QEMU finds clean),
//! drain and `settle` clear it at once, a disabled timer leaves it to close, and an image
//! opened without the repair its bit asked for keeps it. Also QEMU's refusal to change the
//! backing file of an image with unknown compatible feature bits.

mod common;
use common::*;
use qed::aio::{AioOptions, AioQueue, Op, RawBuf};
use qed::{CreateOptions, Error, Image, OpenOptions, WriteFlags};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const NEED_CHECK: u64 = 2;

fn new_image(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("vm.qed");
    Image::create(
        &path,
        &CreateOptions {
            size: 64 * MIB,
            ..Default::default()
        },
    )
    .unwrap();
    path
}

fn rw(delay: Option<Duration>) -> OpenOptions {
    OpenOptions {
        need_check_delay: delay,
        // These tests leave handles open as a crash would, then let QEMU look.
        lock: false,
        ..OpenOptions::read_write()
    }
}

fn bit_set(path: &Path) -> bool {
    header_features(path) & NEED_CHECK != 0
}

/// Waits (bounded) until the bit reads `want`; false if it never did.
fn wait_for_bit(path: &Path, want: bool, limit: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if bit_set(path) == want {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bit_set(path) == want
}

fn qemu_check_clean(path: &Path) {
    let out = qemu_img(&["check", "-f", "qed", p(path)]);
    assert!(out.success(), "qemu-img check is not clean: {}", out.text());
}

#[test]
fn idle_timer_clears_the_bit_and_a_crash_while_idle_leaves_a_clean_image() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let path = new_image(dir.path());
    let img = Image::open(&path, &rw(Some(Duration::from_millis(200)))).unwrap();
    assert!(!bit_set(&path), "a fresh image starts clean");
    let data = vec![0x5au8; 3 * 65536 + 512];
    img.write_at(65536 * 7, &data).unwrap();
    assert!(
        bit_set(&path),
        "the bit is set before the first allocation lands"
    );
    assert!(
        wait_for_bit(&path, false, Duration::from_secs(20)),
        "the idle timer never cleared the need-check bit"
    );
    // The next allocating write sets it again before it returns.
    img.write_at(0, &[1u8; 4096]).unwrap();
    assert!(
        bit_set(&path),
        "an allocation after settling must set the bit again"
    );
    assert!(wait_for_bit(&path, false, Duration::from_secs(20)));
    // An in-place overwrite is no metadata update: the bit stays clear.
    img.write_at(65536 * 7, &[0x77u8; 512]).unwrap();
    assert!(!bit_set(&path), "an overwrite set the need-check bit");
    // Crash: no close, no flush beyond what the timer did.
    std::mem::forget(img);
    qemu_check_clean(&path);
    let out = qemu_io(
        &path,
        &[
            format!("read -P 0x77 {} 512", 65536 * 7),
            format!("read -P 0x5a {} {}", 65536 * 7 + 512, data.len() - 512),
            "read -P 1 0 4096".into(),
        ],
    );
    assert!(
        out.success() && !out.text().contains("mismatch"),
        "{}",
        out.text()
    );
}

#[test]
fn a_disabled_timer_leaves_the_bit_to_settle_and_close() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_image(dir.path());
    let img = Image::open(&path, &rw(None)).unwrap();
    img.write_at(0, &[3u8; 8192]).unwrap();
    img.flush().unwrap();
    // With a 200 ms delay the timer clears the bit well within this (see the test above).
    std::thread::sleep(Duration::from_millis(800));
    assert!(bit_set(&path), "no timer, yet the bit was cleared");
    img.settle().unwrap();
    assert!(!bit_set(&path), "settle left the bit set");
    img.write_at(1 << 20, &[4u8; 512]).unwrap();
    assert!(bit_set(&path));
    img.close().unwrap();
    assert!(!bit_set(&path), "close left the bit set");
}

#[test]
fn drain_settles_at_once_when_the_timer_is_pending() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_image(dir.path());
    let img = Arc::new(Image::open(&path, &rw(Some(Duration::from_secs(3600)))).unwrap());
    let q = AioQueue::new(img.clone(), AioOptions::default()).unwrap();
    let mut data = vec![9u8; 65536];
    // SAFETY: `data` outlives the drain below.
    unsafe {
        q.submit(
            Op::Write {
                offset: 5 << 20,
                bufs: vec![RawBuf {
                    ptr: data.as_mut_ptr(),
                    len: data.len(),
                }],
                flags: WriteFlags::NONE,
            },
            0,
            Box::new(|r| r.unwrap()),
        )
    }
    .unwrap();
    q.drain().unwrap();
    assert!(
        !bit_set(&path),
        "drain with the idle timer pending left the bit set"
    );
    std::mem::forget(q);
    std::mem::forget(img);
    // Crash after the drain: clean for QEMU too.
    require_qemu();
    qemu_check_clean(&path);
}

#[test]
fn an_image_opened_without_its_repair_keeps_the_bit() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_image(dir.path());
    {
        // No timer: a forgotten handle's timer would still run, which a crash's would not.
        let img = Image::open(&path, &rw(None)).unwrap();
        img.write_at(0, &[1u8; 4096]).unwrap();
        std::mem::forget(img); // crash with the bit set
    }
    assert!(bit_set(&path));
    let img = Image::open(
        &path,
        &OpenOptions {
            no_repair: true,
            ..rw(Some(Duration::from_millis(50)))
        },
    )
    .unwrap();
    img.write_at(1 << 20, &[2u8; 4096]).unwrap();
    std::thread::sleep(Duration::from_millis(400));
    img.settle().unwrap();
    img.close().unwrap();
    assert!(
        bit_set(&path),
        "an image never repaired must keep its need-check bit"
    );
    // A repair makes it clean again; the next open (with its repair) too.
    let img = Image::open(
        &path,
        &OpenOptions {
            no_repair: true,
            ..rw(None)
        },
    )
    .unwrap();
    let r = img.check(qed::CheckFix::ALL).unwrap();
    assert_eq!(r.corruptions, 0);
    assert!(!bit_set(&path), "a clean repair leaves the bit clear");
    img.close().unwrap();
    assert!(!bit_set(&path));
}

#[test]
fn backing_file_changes_are_refused_with_unknown_compat_bits() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let path = new_image(dir.path());
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    // compat_features is the u64 at offset 24.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[24..32].copy_from_slice(&(1u64 << 5).to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let before = read_file(&path);
    let img = Image::open(&path, &rw(None)).unwrap();
    let e = img
        .change_backing_file(Some("base.raw"), Some(qed::BackingFormat::Raw))
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Unsupported {
                field: "compat_features",
                value: 32,
                ..
            }
        ),
        "{e}"
    );
    img.close().unwrap();
    assert_eq!(
        read_file(&path),
        before,
        "a refused change wrote to the image"
    );
    // QEMU refuses the same change.
    let out = qemu_img(&[
        "rebase",
        "-u",
        "-f",
        "qed",
        "-b",
        "base.raw",
        "-F",
        "raw",
        p(&path),
    ]);
    assert!(!out.success(), "qemu-img accepted it: {}", out.text());
}
