// SPDX-License-Identifier: MIT OR Apache-2.0
//! `qed_open_ext` with `opts->aio` starts the asynchronous queue after the image is open; when
//! that fails (here: no descriptor left for the event-loop notifier, by RLIMIT_NOFILE), the
//! open must fail, close what it opened (the lock is free again) and change nothing in the
//! image. Its own test binary, because the descriptor limit is process-wide.

use qed::capi::aio::{qed_aio_options, QED_AIO_EVENT_LOOP};
use qed::capi::image::{qed_close, qed_image, qed_open_ext, qed_open_options, QED_OPEN_RDWR};
use qed::capi::version::qed_last_error;
use qed::{CreateOptions, Image, OpenOptions};
use std::ffi::{CStr, CString};
use std::os::unix::ffi::OsStrExt;

fn nofile() -> libc::rlimit {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) }, 0);
    r
}

fn set_nofile(r: &libc::rlimit) {
    // SAFETY: setrlimit reads one rlimit.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, r) }, 0);
}

/// The lowest descriptor number free now.
fn lowest_free_fd() -> libc::rlim_t {
    let f = std::fs::File::open("/dev/null").unwrap();
    std::os::fd::AsRawFd::as_raw_fd(&f) as libc::rlim_t
}

#[test]
fn a_queue_that_cannot_start_fails_the_open_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.qed");
    Image::create(&path, &CreateOptions::new(16 << 20)).unwrap();
    let rw = OpenOptions {
        writable: true,
        ..OpenOptions::default()
    };
    {
        let img = Image::open(&path, &rw).unwrap();
        img.write_at(65536, &[0x5au8; 4096]).unwrap();
        img.close().unwrap();
    }
    let before = std::fs::read(&path).unwrap();

    let cpath = CString::new(path.as_os_str().as_bytes()).unwrap();
    let ao = qed_aio_options {
        struct_size: std::mem::size_of::<qed_aio_options>() as u32,
        flags: QED_AIO_EVENT_LOOP,
        ..Default::default()
    };
    let opts = qed_open_options {
        struct_size: std::mem::size_of::<qed_open_options>() as u32,
        flags: QED_OPEN_RDWR,
        l2_cache_size: 0,
        max_backing_depth: 0,
        writeback_delay_ms: 0,
        need_check_delay_ms: 0,
        backing_approve: None,
        backing_approve_opaque: std::ptr::null_mut(),
        aio: &ao,
        engine: std::ptr::null(),
    };
    let saved = nofile();
    let first = lowest_free_fd();
    let (mut queue_failed, mut opened) = (0, 0);
    // Room for 0, 1, 2, ... more descriptors: the image file opens, then the notifier does not.
    for extra in 0..8 {
        set_nofile(&libc::rlimit {
            rlim_cur: first + extra,
            rlim_max: saved.rlim_max,
        });
        let mut img: *mut qed_image = std::ptr::null_mut();
        // SAFETY: valid path, options and out-pointer.
        let r = unsafe { qed_open_ext(cpath.as_ptr(), &opts, &mut img) };
        // SAFETY: qed_last_error is never NULL.
        let msg = unsafe { CStr::from_ptr(qed_last_error()) }
            .to_string_lossy()
            .into_owned();
        set_nofile(&saved);
        if r == 0 {
            opened += 1;
            // SAFETY: a live handle, closed once.
            assert_eq!(unsafe { qed_close(img) }, 0);
        } else {
            assert!(img.is_null());
            assert!(r == -libc::EMFILE || r == -libc::ENFILE, "{r}: {msg}");
            if msg.contains("event-loop descriptor") {
                queue_failed += 1;
            }
        }
    }
    assert!(queue_failed > 0, "no open failed in the queue's start");
    assert!(opened > 0, "no open succeeded once descriptors were there");

    // Nothing changed, and the failed opens left no lock behind.
    assert!(std::fs::read(&path).unwrap() == before);
    let img = Image::open(&path, &rw).unwrap();
    let mut b = vec![0u8; 4096];
    img.read_at(65536, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0x5a));
    assert!(!img.info().unwrap().needs_check);
    img.close().unwrap();
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-f", "qed"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}
