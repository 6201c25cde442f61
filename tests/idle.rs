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

/// Every storage call of a settle fails in turn (once, and from then on; torn writes too), then
/// the client goes on as it would: the settle reports the error, the handle refuses further
/// writes, and after a reopen (which repairs) the flushed write is intact, the unflushed one is
/// old or new, and the image checks clean.
#[test]
fn a_settle_that_fails_at_any_storage_call_loses_nothing_flushed() {
    use qed::storage::{Fault, FaultCalls, FaultMode, FaultStorage, MemStorage, Storage};
    use qed::CheckFix;
    let cs = 4096u64;
    let a = vec![0xa1u8; 3 * cs as usize];
    let b = vec![0xb2u8; cs as usize + 512];
    let mut sweeps = 0;
    for (mode, torn) in [
        (FaultMode::Once, false),
        (FaultMode::From, false),
        (FaultMode::From, true),
    ] {
        for at in 0.. {
            let disk = Arc::new(MemStorage::new());
            Image::create_on(
                &*disk,
                &CreateOptions {
                    size: 8 * MIB,
                    cluster_size: cs as u32,
                    table_size: 1,
                    ..Default::default()
                },
            )
            .unwrap();
            let fs = Arc::new(FaultStorage::new(disk.clone()));
            let opts = OpenOptions {
                need_check_delay: None,
                writeback_delay: None,
                ..OpenOptions::read_write()
            };
            let img = Image::open_storage(fs.clone() as Arc<dyn Storage>, &opts).unwrap();
            img.write_at(cs, &a).unwrap();
            img.flush().unwrap();
            img.write_at(MIB + 100, &b).unwrap();
            fs.arm(
                Fault::new(FaultCalls::ALL, at, libc::EIO)
                    .with_mode(mode)
                    .with_torn(torn),
            );
            let r = img.settle();
            if fs.fired() == 0 {
                r.unwrap();
                assert!(at > 3, "a settle of a dirty image makes storage calls");
                break;
            }
            sweeps += 1;
            assert!(
                r.is_err(),
                "{mode:?} at {at}: the failed settle reported success"
            );
            // Go on as a client would.
            let _ = img.write_at(2 * MIB, &[1u8; 512]);
            let _ = img.flush();
            fs.cut_off();
            drop(img);
            let after = Arc::new(MemStorage::from_bytes(&disk.to_bytes()));
            let img = Image::open_storage(after as Arc<dyn Storage>, &opts)
                .unwrap_or_else(|e| panic!("{mode:?} at {at}: reopen failed: {e}"));
            let r = img.check(CheckFix::NONE).unwrap();
            assert_eq!(
                (r.corruptions, r.leaks, r.check_errors),
                (0, 0, 0),
                "{mode:?} at {at}: {r:?}"
            );
            let mut got = vec![0u8; a.len()];
            img.read_at(cs, &mut got).unwrap();
            assert!(got == a, "{mode:?} at {at}: the flushed write was lost");
            let mut got = vec![0u8; b.len()];
            img.read_at(MIB + 100, &mut got).unwrap();
            assert!(
                got == b || got.iter().all(|&x| x == 0),
                "{mode:?} at {at}: the unflushed write reads neither old nor new"
            );
            img.close().unwrap();
        }
    }
    assert!(sweeps >= 6, "only {sweeps} failing settles");
}

/// Another process's reader blocks a read-write reopen: `Locked`, and the handle stays
/// read-only and readable with its locks back (a writer is still kept out).
#[test]
fn a_reopen_refused_by_another_lock_keeps_the_old_mode() {
    use qed::storage::lock::{lock_image, LockMode};
    let dir = tempfile::tempdir().unwrap();
    let path = new_image(dir.path());
    let img = Image::open(&path, &OpenOptions::read_only()).unwrap();
    // A reader elsewhere (a bare lock on its own descriptor, as another process's would be).
    let other = std::fs::File::open(&path).unwrap();
    let held = lock_image(&other, LockMode::ReadOnly).unwrap();
    let e = img.reopen(true).unwrap_err();
    assert!(matches!(e, Error::Locked { .. }), "{e}");
    assert!(!img.is_writable());
    let mut buf = [0u8; 512];
    img.read_at(0, &mut buf).unwrap();
    drop(held);
    // Our read-only locks are back: a writer elsewhere is refused.
    let w = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    assert!(lock_image(&w, LockMode::ReadWrite).is_err());
    drop(w);
    img.reopen(true).unwrap();
    img.write_at(0, &[6u8; 512]).unwrap();
    img.close().unwrap();
}
