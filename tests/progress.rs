// SPDX-License-Identifier: MIT OR Apache-2.0
//! Long operations with progress and cancellation (check and repair, commit, copy), with QEMU
//! as the oracle: reports are monotonic and end at their total; a cancellation at every point
//! the operation reports leaves images that `qemu-img check` passes (or that the next open
//! repairs) and a guest view `qemu-img compare` finds unchanged; completed commits and copies
//! match what qemu-img makes.

use qed::{CheckFix, Error, Image, OpenOptions, Progress};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

fn run(prog: &str, args: &[&str]) -> (i32, String) {
    let o = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{prog} must be installed: {e}"));
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    (o.status.code().unwrap_or(-1), text)
}

#[track_caller]
fn ok(prog: &str, args: &[&str]) {
    let (code, out) = run(prog, args);
    assert_eq!(code, 0, "{prog} {args:?}: {out}");
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A progress handle that records every report and cancels at report number `stop_at`
/// (1-based; 0 never).
type Seen = Arc<Mutex<Vec<(u64, u64)>>>;

fn recorder(stop_at: usize) -> (Progress, Seen) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let p = Progress::with_callback(move |d, t| {
        let mut v = s2.lock().unwrap();
        v.push((d, t));
        if v.len() == stop_at {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    (p, seen)
}

/// Reports start at 0, never go back, keep one total, and (when complete) end at it.
#[track_caller]
fn assert_monotonic(seen: &[(u64, u64)], complete: bool) {
    assert!(!seen.is_empty());
    assert_eq!(seen[0].0, 0, "{seen:?}");
    let total = seen[0].1;
    for w in seen.windows(2) {
        assert!(w[1].0 >= w[0].0, "went back: {seen:?}");
        assert_eq!(w[1].1, total, "total changed: {seen:?}");
    }
    assert!(seen.iter().all(|&(d, _)| d <= total));
    if complete {
        assert_eq!(*seen.last().unwrap(), (total, total), "{seen:?}");
    }
}

fn cancelled<T: std::fmt::Debug>(r: qed::Result<T>) -> bool {
    match r {
        Err(Error::Cancelled { .. }) => true,
        Ok(_) => false,
        Err(e) => panic!("unexpected error {e}"),
    }
}

struct Dir(tempfile::TempDir);
impl Dir {
    fn new() -> Dir {
        Dir(tempfile::tempdir().unwrap())
    }
    fn p(&self, n: &str) -> PathBuf {
        self.0.path().join(n)
    }
}

/// A 64 MiB image of 4 KiB clusters and two-cluster tables (16 L2 tables), with data in most
/// tables; then, behind QEMU's back, a data entry cleared in the middle (a leak) and clusters
/// appended at the end (leaks to truncate). The need-check bit is clear, so an open does not
/// repair it.
/// With `shared`, two more entries (in the third and the eleventh table) point at the first
/// table's data cluster: corruptions a repair fixes by copying, keeping the guest view.
fn leaky_image(d: &Dir, name: &str, shared: bool) -> PathBuf {
    let p = d.p(name);
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qed",
            "-o",
            "cluster_size=4096,table_size=2",
            s(&p),
            "64M",
        ],
    );
    let mut cmds = Vec::new();
    for i in 0..14u64 {
        cmds.push("-c".to_string());
        cmds.push(format!("write -P {} {} 24k", i + 1, i * (4 << 20) + 8192));
    }
    let args: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let mut a = vec!["-f", "qed"];
    a.extend(args);
    a.push(s(&p));
    ok("qemu-io", &a);
    let mut f = std::fs::read(&p).unwrap();
    let l1 = u64::from_le_bytes(f[40..48].try_into().unwrap()) as usize;
    let l2 = u64::from_le_bytes(f[l1 + 3 * 8..l1 + 4 * 8].try_into().unwrap()) as usize;
    // Third table, third entry (guest 8 MiB + 8 KiB): its cluster leaks.
    assert_ne!(f[l2 + 2 * 8..l2 + 3 * 8], [0u8; 8]);
    f[l2 + 2 * 8..l2 + 3 * 8].fill(0);
    if shared {
        let t0 = u64::from_le_bytes(f[l1..l1 + 8].try_into().unwrap()) as usize;
        let e: [u8; 8] = f[t0 + 2 * 8..t0 + 3 * 8].try_into().unwrap();
        for t in [2, 10] {
            let l2 = u64::from_le_bytes(f[l1 + t * 8..l1 + t * 8 + 8].try_into().unwrap()) as usize;
            f[l2 + 100 * 8..l2 + 101 * 8].copy_from_slice(&e);
        }
    }
    f.extend(vec![0x5au8; 5 * 4096]);
    std::fs::write(&p, f).unwrap();
    let (code, out) = run("qemu-img", &["check", s(&p)]);
    assert_eq!(code, if shared { 2 } else { 3 }, "{out}");
    p
}

#[test]
fn check_reports_and_cancels_without_changing_anything() {
    let d = Dir::new();
    let p = leaky_image(&d, "a.qed", false);
    let orig = std::fs::read(&p).unwrap();
    let img = Image::open(&p, &OpenOptions::read_only()).unwrap();
    let (prog, seen) = recorder(0);
    let r = img.check_with(CheckFix::NONE, &prog).unwrap();
    assert_eq!(r.leaks, 6);
    let seen = seen.lock().unwrap().clone();
    assert_monotonic(&seen, true);
    assert_eq!(seen[0].1, r.total_clusters);
    let calls = seen.len();
    assert!(calls >= 10, "one report per table at least: {seen:?}");
    for stop in 1..=calls {
        let (prog, seen) = recorder(stop);
        assert!(
            cancelled(img.check_with(CheckFix::NONE, &prog)),
            "stop at {stop}"
        );
        assert_eq!(seen.lock().unwrap().len(), stop);
        // The handle is still usable.
        assert_eq!(img.check(CheckFix::NONE).unwrap().leaks, 6);
    }
    // Cancelled before it starts: Progress::cancel from the caller.
    let p2 = Progress::new();
    p2.cancel();
    assert!(cancelled(img.check_with(CheckFix::NONE, &p2)));
    drop(img);
    assert!(std::fs::read(&p).unwrap() == orig);
}

#[test]
fn repair_cancelled_anywhere_leaves_a_consistent_image() {
    let d = Dir::new();
    let src = leaky_image(&d, "src.qed", true);
    let before = d.p("before.raw");
    ok("qemu-img", &["convert", "-O", "raw", s(&src), s(&before)]);
    // A full repair, to count its reports.
    let full = d.p("full.qed");
    std::fs::copy(&src, &full).unwrap();
    let img = Image::open(&full, &OpenOptions::read_write()).unwrap();
    let (prog, seen) = recorder(0);
    let r = img.check_with(CheckFix::ALL, &prog).unwrap();
    assert_eq!((r.leaks_fixed, r.corruptions_fixed), (6, 2));
    img.close().unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_monotonic(&seen, true);
    let calls = seen.len();
    ok("qemu-img", &["check", s(&full)]);
    let (mut stops_before_writes, mut stops_after_writes) = (0, 0);
    for stop in 1..=calls + 1 {
        let p = d.p(&format!("r{stop}.qed"));
        std::fs::copy(&src, &p).unwrap();
        let img = Image::open(&p, &OpenOptions::read_write()).unwrap();
        let (prog, _) = recorder(stop);
        let r = img.check_with(CheckFix::ALL, &prog);
        let was_cancelled = cancelled(r);
        assert_eq!(was_cancelled, stop <= calls, "stop at {stop}");
        // The handle stays usable: the guest view reads as before.
        let mut buf = vec![0u8; 24 << 10];
        img.read_at((4 << 20) + 8192, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 2));
        img.close().unwrap();
        // Either nothing fixed (stopped before the first write) or every corruption fixed
        // (leaks at most: a stop asked for after the first shared cluster was copied waits
        // until the second is too), never half; the guest view unchanged.
        let (code, out) = run("qemu-img", &["check", s(&p)]);
        match code {
            0 | 3 => {}
            2 => assert!(out.contains("2 errors were found"), "stop at {stop}: {out}"),
            _ => panic!("stop at {stop}: {out}"),
        }
        if code == 2 {
            stops_before_writes += 1;
        } else if was_cancelled {
            stops_after_writes += 1;
        }
        let (code, out) = run("qemu-img", &["compare", "-q", s(&before), s(&p)]);
        assert_eq!(code, 0, "stop at {stop}: {out}");
        let info = Image::open(&p, &OpenOptions::read_only())
            .unwrap()
            .info()
            .unwrap();
        // A cancelled repair leaves the need-check bit for the next open.
        assert_eq!(info.needs_check, was_cancelled, "stop at {stop}");
        // The next read-write open finishes the repair.
        let img = Image::open(&p, &OpenOptions::read_write()).unwrap();
        let r = img.check(CheckFix::NONE).unwrap();
        assert_eq!((r.leaks, r.corruptions), (0, 0), "stop at {stop}");
        img.close().unwrap();
        let (code, out) = run("qemu-img", &["check", s(&p)]);
        assert_eq!(code, 0, "stop at {stop}: {out}");
        let (code, out) = run("qemu-img", &["compare", "-q", s(&before), s(&p)]);
        assert_eq!(code, 0, "stop at {stop}: {out}");
    }
    // Both kinds of stop happened: before the first fix, and after all of them.
    assert!(stops_before_writes > 0 && stops_after_writes > 0);
}

/// base.qed (64 KiB clusters) with data, overlay ov.qed with data over 9 MiB in several runs
/// and a zeroed range.
fn chain(d: &Dir) -> (PathBuf, PathBuf) {
    let base = d.p("base.qed");
    let ov = d.p("ov.qed");
    ok("qemu-img", &["create", "-q", "-f", "qed", s(&base), "24M"]);
    ok(
        "qemu-io",
        &["-f", "qed", "-c", "write -P 1 0 20M", s(&base)],
    );
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qed",
            "-b",
            "base.qed",
            "-F",
            "qed",
            s(&ov),
            "32M",
        ],
    );
    ok(
        "qemu-io",
        &[
            "-f",
            "qed",
            "-c",
            "write -P 2 1M 5M",
            "-c",
            "write -P 3 7M 3M",
            "-c",
            "write -z 12M 1M",
            "-c",
            "write -P 4 30M 1M",
            "-c",
            "write -P 5 10300k 4k",
            s(&ov),
        ],
    );
    (base, ov)
}

fn open_overlay(p: &Path) -> Image {
    let o = OpenOptions {
        no_backing: true,
        ..OpenOptions::read_only()
    };
    Image::open(p, &o).unwrap()
}

#[test]
fn commit_reports_cancels_and_matches_qemu() {
    let d = Dir::new();
    let (base, ov) = chain(&d);
    let view = d.p("view.raw");
    ok("qemu-img", &["convert", "-O", "raw", s(&ov), s(&view)]);
    // Oracle: qemu-img commit on copies.
    let q = Dir::new();
    std::fs::copy(&base, q.p("base.qed")).unwrap();
    std::fs::copy(&ov, q.p("ov.qed")).unwrap();
    ok("qemu-img", &["commit", "-q", s(&q.p("ov.qed"))]);

    // Opened with its backing chain, the overlay refuses (its read-only hold on base).
    let held = Image::open(&ov, &OpenOptions::read_only()).unwrap();
    assert!(matches!(
        held.commit(&OpenOptions::default(), &Progress::new()),
        Err(Error::Busy { .. })
    ));
    drop(held);

    let base0 = std::fs::read(&base).unwrap();
    let ov0 = std::fs::read(&ov).unwrap();
    let img = open_overlay(&ov);
    let (prog, seen) = recorder(0);
    img.commit(&OpenOptions::default(), &prog).unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_monotonic(&seen, true);
    // 5 + 3 + 1 (zeros) + 1 MiB, and one 64 KiB cluster for the 4 KiB write.
    assert_eq!(
        seen[0].1,
        (10 << 20) + (64 << 10),
        "bytes the overlay holds"
    );
    let calls = seen.len();
    drop(img);
    ok("qemu-img", &["check", s(&base)]);
    let (code, out) = run("qemu-img", &["compare", s(&q.p("base.qed")), s(&base)]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = run("qemu-img", &["compare", "-q", s(&view), s(&base)]);
    assert_eq!(code, 0, "{out}");

    for stop in 1..=calls {
        std::fs::write(&base, &base0).unwrap();
        std::fs::write(&ov, &ov0).unwrap();
        let img = open_overlay(&ov);
        let (prog, _) = recorder(stop);
        assert!(
            cancelled(img.commit(&OpenOptions::default(), &prog)),
            "stop at {stop}"
        );
        drop(img);
        // Both valid, and the overlay's guest view unchanged.
        ok("qemu-img", &["check", s(&base)]);
        ok("qemu-img", &["check", s(&ov)]);
        let (code, out) = run("qemu-img", &["compare", "-q", s(&view), s(&ov)]);
        assert_eq!(code, 0, "stop at {stop}: {out}");
    }
}

#[test]
fn commit_into_raw() {
    let d = Dir::new();
    let base = d.p("base.raw");
    let ov = d.p("ov.qed");
    ok("qemu-img", &["create", "-q", "-f", "raw", s(&base), "8M"]);
    ok("qemu-io", &["-f", "raw", "-c", "write -P 7 0 8M", s(&base)]);
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qed",
            "-b",
            "base.raw",
            "-F",
            "raw",
            s(&ov),
            "12M",
        ],
    );
    ok(
        "qemu-io",
        &[
            "-f",
            "qed",
            "-c",
            "write -P 2 1M 3M",
            "-c",
            "write -z 6M 1M",
            "-c",
            "write -P 3 10M 1M",
            s(&ov),
        ],
    );
    let view = d.p("view.raw");
    ok("qemu-img", &["convert", "-O", "raw", s(&ov), s(&view)]);
    let img = open_overlay(&ov);
    let (prog, seen) = recorder(0);
    img.commit(&OpenOptions::default(), &prog).unwrap();
    assert_monotonic(&seen.lock().unwrap(), true);
    drop(img);
    // The raw base grew to the overlay's size and reads as the overlay did.
    assert_eq!(std::fs::metadata(&base).unwrap().len(), 12 << 20);
    let (code, out) = run(
        "qemu-img",
        &[
            "compare",
            "-q",
            "-f",
            "raw",
            "-F",
            "raw",
            s(&view),
            s(&base),
        ],
    );
    assert_eq!(code, 0, "{out}");
}

#[test]
fn copy_reports_cancels_and_matches_qemu_convert() {
    let d = Dir::new();
    let (_, ov) = chain(&d);
    let theirs = d.p("theirs.qed");
    ok("qemu-img", &["convert", "-O", "qed", s(&ov), s(&theirs)]);
    let src = Image::open(&ov, &OpenOptions::read_only()).unwrap();
    let fresh = |name: &str| {
        let p = d.p(name);
        Image::create(&p, &qed::CreateOptions::new(src.size())).unwrap();
        let img = Image::open(&p, &OpenOptions::read_write()).unwrap();
        (p, img)
    };
    let (p, dst) = fresh("full.qed");
    let (prog, seen) = recorder(0);
    src.copy_to(&dst, &prog).unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_monotonic(&seen, true);
    assert_eq!(seen[0].1, 32 << 20);
    dst.close().unwrap();
    ok("qemu-img", &["check", s(&p)]);
    let (code, out) = run("qemu-img", &["compare", s(&ov), s(&p)]);
    assert_eq!(code, 0, "{out}");
    // The same writes as qemu-img convert: the same file.
    assert!(std::fs::read(&p).unwrap() == std::fs::read(&theirs).unwrap());
    let calls = seen.len();
    assert!(calls > 5, "{seen:?}");
    for stop in 1..=calls {
        let (p, dst) = fresh(&format!("c{stop}.qed"));
        let (prog, _) = recorder(stop);
        assert!(cancelled(src.copy_to(&dst, &prog)), "stop at {stop}");
        dst.close().unwrap();
        ok("qemu-img", &["check", s(&p)]);
    }
    // A target that is too small is refused before anything is written.
    let small = d.p("small.qed");
    Image::create(&small, &qed::CreateOptions::new(1 << 20)).unwrap();
    let img = Image::open(&small, &OpenOptions::read_write()).unwrap();
    assert!(matches!(
        src.copy_to(&img, &Progress::new()),
        Err(Error::InvalidArgument { what: "dst", .. })
    ));
}
