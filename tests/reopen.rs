// SPDX-License-Identifier: MIT OR Apache-2.0
//! Reopen between read-only and read-write in place, judged by what another process (QEMU)
//! may do to the file in each mode, and the in-process refusal of a conflicting second open.

mod common;
use common::*;
use qed::{CheckFix, CreateOptions, Error, Image, OpenOptions};
use std::path::Path;

fn new_image(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("vm.qed");
    Image::create(
        &path,
        &CreateOptions {
            size: 16 * MIB,
            ..Default::default()
        },
    )
    .unwrap();
    path
}

/// Whether QEMU can open the image read-only (`-r`) and read-write right now.
fn qemu_can(path: &Path) -> (bool, bool) {
    let ro = run_in(
        None,
        "qemu-io",
        &["-f", "qed", "-r", "-c", "read 0 512", p(path)],
    );
    let rw = run_in(None, "qemu-io", &["-f", "qed", "-c", "read 0 512", p(path)]);
    (ro.success(), rw.success())
}

#[test]
fn reopen_switches_modes_and_locks_as_qemu_sees_them() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let path = new_image(dir.path());
    let img = Image::open(&path, &OpenOptions::read_only()).unwrap();
    assert_eq!(
        qemu_can(&path),
        (true, false),
        "read-only: readers in, writers out"
    );
    assert!(matches!(img.write_at(0, &[1u8; 512]), Err(Error::ReadOnly)));

    img.reopen(true).unwrap();
    assert!(img.is_writable());
    assert_eq!(
        qemu_can(&path),
        (false, false),
        "read-write: nobody else in"
    );
    img.write_at(0, &[0xabu8; 65536 + 512]).unwrap();
    assert_ne!(
        header_features(&path) & 2,
        0,
        "allocation sets the need-check bit"
    );

    img.reopen(false).unwrap();
    assert!(!img.is_writable());
    assert_eq!(
        header_features(&path) & 2,
        0,
        "going read-only clears the bit"
    );
    assert_eq!(qemu_can(&path), (true, false));
    assert!(matches!(img.write_at(0, &[1u8; 512]), Err(Error::ReadOnly)));
    // The handle still reads what it wrote; QEMU reads it and finds the file clean meanwhile.
    let mut b = vec![0u8; 65536 + 512];
    img.read_at(0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0xab));
    qemu_img(&["check", "-f", "qed", p(&path)]).ok();
    let out = run_in(
        None,
        "qemu-io",
        &["-f", "qed", "-r", "-c", "read -P 0xab 0 66048", p(&path)],
    );
    assert!(
        out.success() && !out.text().contains("mismatch"),
        "{}",
        out.text()
    );

    // Same mode again: nothing to do.
    img.reopen(false).unwrap();
    img.close().unwrap();
    assert_eq!(qemu_can(&path), (true, true), "closed: everything released");
}

#[test]
fn a_second_conflicting_open_in_this_process_is_busy() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_image(dir.path());
    let a = Image::open(&path, &OpenOptions::read_write()).unwrap();
    for opts in [OpenOptions::read_write(), OpenOptions::read_only()] {
        let e = Image::open(&path, &opts).unwrap_err();
        assert!(matches!(e, Error::Busy { .. }), "{e}");
        assert!(e.to_string().contains("in this process"), "{e}");
    }
    // A force-share reader is allowed beside it, as beside QEMU.
    let fs = Image::open(
        &path,
        &OpenOptions {
            force_share: true,
            ..OpenOptions::read_only()
        },
    )
    .unwrap();
    drop(fs);
    // Read-only beside read-only is fine; going read-write beside another reader is not.
    a.reopen(false).unwrap();
    let b = Image::open(&path, &OpenOptions::read_only()).unwrap();
    let e = a.reopen(true).unwrap_err();
    assert!(matches!(e, Error::Busy { .. }), "{e}");
    assert!(!a.is_writable(), "a refused reopen changed the mode");
    drop(b);
    a.reopen(true).unwrap();
    a.write_at(0, &[5u8; 512]).unwrap();
    a.close().unwrap();
    // Closed handles leave nothing behind.
    let c = Image::open(&path, &OpenOptions::read_write()).unwrap();
    c.close().unwrap();
}

#[test]
fn reopen_read_write_repairs_an_image_left_dirty() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let path = new_image(dir.path());
    {
        let img = Image::open(
            &path,
            &OpenOptions {
                lock: false,
                need_check_delay: None,
                ..OpenOptions::read_write()
            },
        )
        .unwrap();
        img.write_at(0, &[7u8; 4096]).unwrap();
        img.flush().unwrap();
        std::mem::forget(img); // crash: the bit stays set
    }
    // Leak a cluster behind the engine's back, as a crash between allocation and entry would.
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len + 65536).unwrap();
    drop(f);
    let img = Image::open(&path, &OpenOptions::read_only()).unwrap();
    assert_ne!(header_features(&path) & 2, 0);
    img.reopen(true).unwrap();
    assert_eq!(header_features(&path) & 2, 0, "the repair clears the bit");
    let r = img.check(CheckFix::NONE).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{r:?}");
    img.close().unwrap();
    qemu_img(&["check", "-f", "qed", p(&path)]).ok();
}

#[test]
fn force_share_handles_stay_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_image(dir.path());
    let img = Image::open(
        &path,
        &OpenOptions {
            force_share: true,
            ..OpenOptions::read_only()
        },
    )
    .unwrap();
    let e = img.reopen(true).unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidArgument {
                what: "force_share",
                ..
            }
        ),
        "{e}"
    );
}
