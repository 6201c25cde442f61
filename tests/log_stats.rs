// SPDX-License-Identifier: MIT OR Apache-2.0
//! The log callback, `QED_DEBUG` and per-image statistics. The logger is process-wide, so the
//! tests that install a callback take `LOGGER` and live in this file of their own.

use qed::storage::{Fault, FaultCalls, FaultStorage};
use qed::{set_log_callback, CheckFix, CreateOptions, Image, LogLevel, MemStorage, OpenOptions};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

static LOGGER: Mutex<()> = Mutex::new(());

type Events = Arc<Mutex<Vec<(LogLevel, String)>>>;

/// Installs a callback recording every report up to `level`; removed when the guard drops.
struct Capture {
    events: Events,
    _serial: MutexGuard<'static, ()>,
}

impl Capture {
    fn new(level: LogLevel) -> Capture {
        let serial = LOGGER.lock().unwrap_or_else(PoisonError::into_inner);
        let events: Events = Arc::default();
        let sink = events.clone();
        set_log_callback(
            level,
            Some(Arc::new(move |l, m: &str| {
                sink.lock().unwrap().push((l, m.to_owned()))
            })),
        )
        .unwrap();
        Capture {
            events,
            _serial: serial,
        }
    }
    fn take(&self) -> Vec<(LogLevel, String)> {
        std::mem::take(&mut *self.events.lock().unwrap())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        set_log_callback(LogLevel::Error, None).unwrap();
    }
}

fn has(events: &[(LogLevel, String)], level: LogLevel, needle: &str) -> bool {
    events
        .iter()
        .any(|(l, m)| *l == level && m.contains(needle))
}

fn new_image(dir: &tempfile::TempDir, name: &str) -> std::path::PathBuf {
    let p = dir.path().join(name);
    Image::create(&p, &CreateOptions::new(1 << 30)).unwrap();
    p
}

/// Opens `p` read-write, writes 512 bytes at `offset`, flushes and closes.
fn write_session(p: &std::path::Path, offset: u64) {
    let img = Image::open(p, &OpenOptions::read_write()).unwrap();
    img.write_at(offset, &[1u8; 512]).unwrap();
    img.flush().unwrap();
    img.close().unwrap();
}

#[test]
fn debug_callback_sees_open_allocations_flushes_and_close() {
    let cap = Capture::new(LogLevel::Debug);
    let dir = tempfile::tempdir().unwrap();
    let p = new_image(&dir, "a.qed");
    let img = Image::open(&p, &OpenOptions::read_write()).unwrap();
    let data = [0x5au8; 4096];
    for i in 0..3u64 {
        img.write_at(i * 65536, &data).unwrap();
    }
    img.flush().unwrap();
    img.close().unwrap();
    let ev = cap.take();
    let name = p.canonicalize().unwrap().display().to_string();
    assert!(
        has(
            &ev,
            LogLevel::Info,
            "opened read-write, virtual size 1073741824"
        ),
        "{ev:#?}"
    );
    assert!(ev.iter().all(|(_, m)| m.starts_with(&name)), "{ev:#?}");
    assert!(has(&ev, LogLevel::Debug, "new L2 table at"), "{ev:#?}");
    assert_eq!(
        ev.iter()
            .filter(|(l, m)| *l == LogLevel::Debug && m.contains("allocated 1 clusters at"))
            .count(),
        3,
        "{ev:#?}"
    );
    assert!(
        has(&ev, LogLevel::Debug, "flushing the image file"),
        "{ev:#?}"
    );
    assert!(has(&ev, LogLevel::Debug, "need-check bit"), "{ev:#?}");
    assert!(has(&ev, LogLevel::Info, "closed"), "{ev:#?}");
    assert!(
        has(&ev, LogLevel::Debug, "statistics: ImageStats"),
        "{ev:#?}"
    );
    // Trace reports (file extension, L2 piece writes) stay below the level asked for.
    assert!(ev.iter().all(|(l, _)| *l <= LogLevel::Debug), "{ev:#?}");
}

#[test]
fn nothing_below_the_level_is_delivered() {
    let cap = Capture::new(LogLevel::Info);
    let dir = tempfile::tempdir().unwrap();
    let p = new_image(&dir, "b.qed");
    write_session(&p, 0);
    let ev = cap.take();
    assert!(has(&ev, LogLevel::Info, "opened read-write"), "{ev:#?}");
    assert!(has(&ev, LogLevel::Info, "closed"), "{ev:#?}");
    assert!(ev.iter().all(|(l, _)| *l <= LogLevel::Info), "{ev:#?}");

    // At error level a healthy session reports nothing.
    drop(cap);
    let cap = Capture::new(LogLevel::Error);
    write_session(&p, 65536);
    assert_eq!(cap.take(), vec![]);
}

#[test]
fn trace_reports_per_piece_detail() {
    let cap = Capture::new(LogLevel::Trace);
    let dir = tempfile::tempdir().unwrap();
    let p = new_image(&dir, "t.qed");
    write_session(&p, 0);
    let img = Image::open(&p, &OpenOptions::read_only()).unwrap();
    img.read_at(0, &mut [0u8; 512]).unwrap();
    drop(img);
    let ev = cap.take();
    assert!(
        has(&ev, LogLevel::Trace, "extended the image file to"),
        "{ev:#?}"
    );
    assert!(
        has(&ev, LogLevel::Trace, "writing L2 table piece at"),
        "{ev:#?}"
    );
    assert!(has(&ev, LogLevel::Trace, "L2 cache miss"), "{ev:#?}");
}

#[test]
fn stats_count_what_was_done() {
    // Other tests' callbacks would see this test's reports.
    let _serial = LOGGER.lock().unwrap_or_else(PoisonError::into_inner);
    let dir = tempfile::tempdir().unwrap();
    let p = new_image(&dir, "s.qed");
    let img = Image::open(&p, &OpenOptions::read_write()).unwrap();
    assert_eq!(img.stats(), qed::ImageStats::default());
    let data = [7u8; 4096];
    for i in 0..3u64 {
        img.write_at(i * 65536, &data).unwrap();
    }
    let s = img.stats();
    assert_eq!((s.write_requests, s.write_bytes), (3, 12288));
    assert_eq!((s.clusters_allocated, s.l2_tables_allocated), (3, 1));
    // A write into an allocated cluster allocates nothing.
    img.write_at(512, &data[..512]).unwrap();
    let before = img.stats();
    assert_eq!(before.clusters_allocated, 3);
    assert_eq!(before.write_bytes, 12288 + 512);
    let mut buf = [0u8; 4096];
    for i in 0..3u64 {
        img.read_at(i * 65536, &mut buf).unwrap();
    }
    let s = img.stats();
    assert_eq!((s.read_requests, s.read_bytes), (3, 12288));
    // The table was created by this handle: every lookup finds its piece cached.
    assert_eq!(s.l2_cache_hits, before.l2_cache_hits + 3);
    assert_eq!(s.l2_cache_misses, 0);
    img.write_zeroes(3 * 65536, 2 * 65536).unwrap();
    img.flush().unwrap();
    let s = img.stats();
    assert_eq!((s.write_zeroes_requests, s.write_zeroes_bytes), (1, 131072));
    assert_eq!(s.flush_requests, 1);
    assert!(s.storage_flushes >= 1, "{s:?}");
    assert!(s.l2_writes >= 1, "{s:?}");
    // A refused request counts as failed, not as a read.
    assert!(img.read_at(1 << 30, &mut buf).is_err());
    let s = img.stats();
    assert_eq!((s.failed_requests, s.read_requests), (1, 3));
    assert_eq!(s.repairs, 0);
    img.close().unwrap();

    // A new handle starts from zero and reads its table from the file: one miss, then hits.
    let img = Image::open(&p, &OpenOptions::read_only()).unwrap();
    img.read_at(0, &mut buf).unwrap();
    img.read_at(65536, &mut buf).unwrap();
    let s = img.stats();
    assert_eq!((s.l2_cache_misses, s.l2_cache_hits), (1, 1));
    assert_eq!(s.write_requests, 0);
}

#[test]
fn repairs_are_counted_and_reported() {
    let cap = Capture::new(LogLevel::Info);
    let dir = tempfile::tempdir().unwrap();
    let p = new_image(&dir, "r.qed");
    write_session(&p, 0);
    // What a crash leaves: the need-check bit, and a leaked cluster at the end.
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len + 65536).unwrap();
    let mut bytes = std::fs::read(&p).unwrap()[16..24].to_vec();
    bytes[0] |= qed::format::FEATURE_NEED_CHECK as u8;
    std::os::unix::fs::FileExt::write_all_at(&f, &bytes, 16).unwrap();
    drop(f);
    cap.take();

    let img = Image::open(&p, &OpenOptions::read_write()).unwrap();
    let s = img.stats();
    assert_eq!((s.repairs, s.leaks_fixed, s.corruptions_fixed), (1, 1, 0));
    assert_eq!(s.storage_flushes, 1);
    let ev = cap.take();
    assert!(has(&ev, LogLevel::Info, "need-check bit set"), "{ev:#?}");
    assert!(
        has(
            &ev,
            LogLevel::Info,
            "repair at open: 0 corruptions fixed, 1 leaked"
        ),
        "{ev:#?}"
    );
    // A check without a fix is not a repair; one with a fix is.
    img.check(CheckFix::NONE).unwrap();
    assert_eq!(img.stats().repairs, 1);
    img.check(CheckFix::ALL).unwrap();
    assert_eq!(img.stats().repairs, 2);
    assert!(has(&cap.take(), LogLevel::Info, "checking and repairing"));
}

#[test]
fn hostile_header_is_a_warning_naming_the_field() {
    let cap = Capture::new(LogLevel::Warn);
    let dir = tempfile::tempdir().unwrap();
    let p = new_image(&dir, "h.qed");
    // cluster_size (bytes 4..8) of 3: not a power of two.
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &3u32.to_le_bytes(), 4).unwrap();
    drop(f);
    assert!(Image::open(&p, &OpenOptions::read_only()).is_err());
    let ev = cap.take();
    assert!(has(&ev, LogLevel::Warn, "open refused"), "{ev:#?}");
    assert!(has(&ev, LogLevel::Warn, "cluster_size"), "{ev:#?}");
}

#[test]
fn a_failed_flush_is_an_error_report_and_a_failed_request() {
    let cap = Capture::new(LogLevel::Error);
    let mem = MemStorage::new();
    Image::create_on(&mem, &CreateOptions::new(1 << 20)).unwrap();
    let st = Arc::new(FaultStorage::new(mem));
    let img = Image::open_storage(st.clone(), &OpenOptions::read_write()).unwrap();
    img.write_at(0, &[1u8; 512]).unwrap();
    st.arm(Fault::new(FaultCalls::FLUSH, 0, libc::EIO));
    assert!(img.flush().is_err());
    assert!(img.read_at(0, &mut [0u8; 512]).is_err());
    let s = img.stats();
    assert_eq!((s.failed_requests, s.flush_requests), (2, 0));
    let ev = cap.take();
    assert!(
        has(&ev, LogLevel::Error, "<storage>: flushing image: ")
            && has(&ev, LogLevel::Error, "the handle has failed"),
        "{ev:#?}"
    );
    // The failure is reported once, not again by every later request.
    assert_eq!(
        ev.iter()
            .filter(|(_, m)| m.contains("the handle has failed"))
            .count(),
        1
    );
    drop(img);
}

#[test]
fn the_callback_may_not_replace_itself_and_may_panic() {
    let serial = LOGGER.lock().unwrap_or_else(PoisonError::into_inner);
    let refused = Arc::new(AtomicBool::new(false));
    let r = refused.clone();
    set_log_callback(
        LogLevel::Info,
        Some(Arc::new(move |_, _: &str| {
            r.store(
                set_log_callback(LogLevel::Info, None).is_err(),
                Ordering::Relaxed,
            );
            panic!("a logger bug");
        })),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = new_image(&dir, "c.qed");
    // The open reports, the callback panics: the open is unaffected.
    write_session(&p, 0);
    assert!(refused.load(Ordering::Relaxed));
    set_log_callback(LogLevel::Error, None).unwrap();
    drop(serial);
}

/// Runs this test binary again, running only `child_does_io`, with `QED_DEBUG` as given.
fn child_stderr(qed_debug: Option<&str>, dir: &std::path::Path) -> String {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "child_does_io",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("QED_LOG_STATS_CHILD_DIR", dir);
    stderr_of(cmd, qed_debug)
}

/// Runs `cmd` with `QED_DEBUG` set to `qed_debug` (or unset); checks it succeeds and returns
/// its stderr.
fn stderr_of(mut cmd: Command, qed_debug: Option<&str>) -> String {
    match qed_debug {
        Some(v) => cmd.env("QED_DEBUG", v),
        None => cmd.env_remove("QED_DEBUG"),
    };
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stderr).unwrap()
}

/// Not a test of its own: the child side of `qed_debug_reports_on_stderr`.
#[test]
fn child_does_io() {
    let Some(dir) = std::env::var_os("QED_LOG_STATS_CHILD_DIR") else {
        return;
    };
    let p = std::path::Path::new(&dir).join("child.qed");
    Image::create(&p, &CreateOptions::new(1 << 30)).unwrap();
    write_session(&p, 0);
}

#[test]
fn qed_debug_reports_on_stderr() {
    let _serial = LOGGER.lock().unwrap_or_else(PoisonError::into_inner);
    let dir = tempfile::tempdir().unwrap();
    let err = child_stderr(Some("debug"), dir.path());
    assert!(
        err.lines()
            .any(|l| l.starts_with("libqed: info: ") && l.contains("child.qed: opened")),
        "{err}"
    );
    assert!(
        err.lines()
            .any(|l| l.starts_with("libqed: debug: ") && l.contains("allocated 1 clusters")),
        "{err}"
    );
    assert!(!err.contains("libqed: trace: "), "{err}");

    let err = child_stderr(Some("info"), dir.path());
    assert!(err.contains("libqed: info: "), "{err}");
    assert!(!err.contains("libqed: debug: "), "{err}");

    for quiet in [None, Some(""), Some("0")] {
        let err = child_stderr(quiet, dir.path());
        assert!(!err.contains("libqed:"), "{quiet:?}: {err}");
    }

    let err = child_stderr(Some("loud"), dir.path());
    assert_eq!(
        err.matches("libqed:").count(),
        1,
        "one warning about the value, then nothing: {err}"
    );
    assert!(err.contains("QED_DEBUG=\"loud\" not understood"), "{err}");
}

#[test]
fn qed_img_reports_with_qed_debug() {
    let _serial = LOGGER.lock().unwrap_or_else(PoisonError::into_inner);
    let dir = tempfile::tempdir().unwrap();
    let p = new_image(&dir, "cli.qed");
    let run = |v: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_qed-img"));
        cmd.arg("info").arg(&p);
        stderr_of(cmd, v)
    };
    let err = run(Some("info"));
    assert!(
        err.contains("libqed: info: ") && err.contains("opened read-only"),
        "{err}"
    );
    assert!(!run(None).contains("libqed:"));
}
