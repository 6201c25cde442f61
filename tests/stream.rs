// SPDX-License-Identifier: MIT OR Apache-2.0
//! Live streaming and copy-on-read, judged by QEMU: a streamed overlay has no backing file
//! (`qemu-img info`), is clean (`qemu-img check`) and reads as the chain did (`qemu-img
//! compare` against a `qemu-img convert` of the chain made before), with the chain's zero
//! ranges as zero clusters. Concurrent guest writes during a stream, and reads with
//! copy-on-read, are checked against a shadow copy; a cancelled stream leaves a valid overlay
//! with its backing file that a second stream finishes.

mod common;
use common::*;
use qed::image::Progress;
use qed::{Error, ExtentKind, Image, OpenOptions};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

const CS: u64 = 64 * KIB;

/// Guest bytes of the base: a pattern, with zeros at [2 MiB, 3 MiB) (a hole in a raw file,
/// never written in a QED one) and at [5 MiB, 5.5 MiB).
fn base_bytes(len: u64, seed: u64) -> Vec<u8> {
    let mut v = random_bytes(seed, len as usize);
    v[(2 * MIB) as usize..(3 * MIB) as usize].fill(0);
    v[(5 * MIB) as usize..(5 * MIB + MIB / 2) as usize].fill(0);
    v
}

/// Writes the non-zero 64 KiB pieces of `data` into the QED image at `path` through qemu-io.
fn qemu_fill(path: &Path, data: &[u8], scratch: &Path) {
    let raw = scratch.join("fill.raw");
    write_raw(&raw, data);
    // `qemu-img convert -n` copies only what is not zero onto the existing image.
    qemu_img(&["convert", "-n", "-f", "raw", "-O", "qed", p(&raw), p(path)]).ok();
}

/// Overlay writes of its own: partial clusters and whole ones, some over the zero ranges.
fn overlay_writes(path: &Path) {
    qemu_io(
        path,
        &[
            "write -P 0x11 0 4096".into(),
            format!("write -P 0x22 {} {}", CS + 512, 3 * CS),
            format!("write -P 0x33 {} 8192", 2 * MIB + 4096),
            format!("write -P 0x44 {} {}", 7 * MIB, 2 * CS),
        ],
    );
}

/// Creates the QED overlay `path` of `size` bytes over `backing` (of format `fmt`).
fn overlay(path: &Path, backing: &str, fmt: &str, size: u64) {
    qemu_img(&[
        "create",
        "-f",
        "qed",
        "-b",
        backing,
        "-F",
        fmt,
        p(path),
        &size.to_string(),
    ])
    .ok();
}

enum ChainKind {
    Raw,
    Qed,
    Three,
}

/// Builds the chain in `dir`; returns the top overlay, its size and the expectation (a
/// `qemu-img convert` of the chain, made before streaming).
fn build_chain(dir: &Path, kind: ChainKind) -> (PathBuf, u64, PathBuf) {
    let top = dir.join("top.qed");
    // Not a multiple of the cluster size: the last cluster is partial.
    let size = 8 * MIB + 1536;
    match kind {
        ChainKind::Raw => {
            // Shorter than the overlay: the rest reads as zeros either way.
            write_raw(&dir.join("base.raw"), &base_bytes(6 * MIB, 1));
            overlay(&top, "base.raw", "raw", size);
        }
        ChainKind::Qed => {
            let base = dir.join("base.qed");
            qemu_img(&["create", "-f", "qed", p(&base), &size.to_string()]).ok();
            qemu_fill(&base, &base_bytes(size, 2), dir);
            overlay(&top, "base.qed", "qed", size);
        }
        ChainKind::Three => {
            write_raw(&dir.join("base.raw"), &base_bytes(size, 3));
            let mid = dir.join("mid.qed");
            overlay(&mid, "base.raw", "raw", size);
            // The middle image overrides part of the base, keeping the zero ranges zero.
            qemu_io(
                &mid,
                &[
                    format!("write -P 0x5a {} {}", MIB, MIB),
                    format!("write -P 0xa5 {} {}", 4 * MIB, CS),
                ],
            );
            overlay(&top, "mid.qed", "qed", size);
        }
    }
    overlay_writes(&top);
    let expect = dir.join("expect.raw");
    qemu_img(&["convert", "-f", "qed", "-O", "raw", p(&top), p(&expect)]).ok();
    (top, size, expect)
}

fn open_rw(path: &Path) -> Image {
    Image::open(path, &OpenOptions::read_write()).unwrap()
}

fn backing_of(path: &Path) -> Option<String> {
    let out = qemu_img(&["info", "--output=json", p(path)]).ok();
    Json::parse(&out.stdout)
        .get("backing-filename")
        .and_then(|j| j.as_str().map(str::to_owned))
}

/// The image passes `qemu-img check` and `qemu-img compare` against the raw expectation.
#[track_caller]
fn assert_qemu_agrees(what: &str, image: &Path, expect: &Path) {
    let out = qemu_img(&["check", "-f", "qed", p(image)]);
    assert!(
        out.success() && out.text().contains("No errors were found"),
        "{what}: qemu-img check: {}",
        out.text()
    );
    let out = qemu_img(&["compare", "-f", "qed", "-F", "raw", p(image), p(expect)]);
    assert!(out.success(), "{what}: qemu-img compare: {}", out.text());
}

#[track_caller]
fn assert_zero_clusters(what: &str, img: &Image, ranges: &[(u64, u64)]) {
    for &(a, b) in ranges {
        for e in img.map(a, b - a).unwrap() {
            assert_eq!(
                e.kind,
                ExtentKind::Zero,
                "{what}: {e:?} of a zero range is not a zero cluster"
            );
        }
    }
}

fn stream_case(kind: ChainKind, what: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (top, size, expect) = build_chain(dir.path(), kind);
    assert!(backing_of(&top).is_some(), "{what}: no backing file before");
    let calls = Arc::new(Mutex::new(Vec::new()));
    let c = calls.clone();
    let progress = Progress::with_callback(move |d, t| {
        c.lock().unwrap().push((d, t));
        ControlFlow::Continue(())
    });
    {
        let img = open_rw(&top);
        img.stream(&progress).unwrap();
        assert!(img.backing().is_none(), "{what}: backing still open");
        assert_eq!(img.info().unwrap().backing_file, None);
        // Nothing is left unallocated (up to the end of the shortest backing file, 6 MiB):
        // every cluster is data or a zero cluster.
        for e in img.map(0, 6 * MIB).unwrap() {
            assert_ne!(e.kind, ExtentKind::Unallocated, "{what}: {e:?}");
        }
        // The zero ranges the overlay did not write became zero clusters (no data).
        assert_zero_clusters(
            what,
            &img,
            &[(2 * MIB + 64 * KIB, 3 * MIB), (5 * MIB, 5 * MIB + MIB / 2)],
        );
        assert_image_matches_raw(what, &img, &expect);
        img.close().unwrap();
    }
    let calls = calls.lock().unwrap();
    assert!(calls.len() > 2, "{what}: {} progress calls", calls.len());
    assert!(
        calls.windows(2).all(|w| w[0].0 <= w[1].0),
        "{what}: done went back"
    );
    assert_eq!(*calls.last().unwrap(), (size, size), "{what}: final report");
    assert_eq!(
        backing_of(&top),
        None,
        "{what}: qemu-img info still shows a backing file"
    );
    assert_qemu_agrees(what, &top, &expect);
    // QEMU sees the zero clusters as zeros without data.
    let out = qemu_img(&["map", "--output=json", "-f", "qed", p(&top)]).ok();
    for e in Json::parse(&out.stdout).as_arr().unwrap() {
        let start = e.get("start").unwrap().as_u64().unwrap();
        let len = e.get("length").unwrap().as_u64().unwrap();
        if start >= 5 * MIB && start + len <= 5 * MIB + MIB / 2 {
            assert_eq!(
                e.get("data").unwrap().as_bool(),
                Some(false),
                "{what}: {e:?}"
            );
        }
    }
    // Streaming again (no backing file) has nothing to do.
    let img = open_rw(&top);
    img.stream(&Progress::new()).unwrap();
}

#[test]
fn stream_over_raw_backing() {
    stream_case(ChainKind::Raw, "raw backing");
}

#[test]
fn stream_over_qed_backing() {
    stream_case(ChainKind::Qed, "qed backing");
}

#[test]
fn stream_over_chain_of_three() {
    stream_case(ChainKind::Three, "chain of 3");
}

#[test]
fn cancelled_stream_keeps_backing_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (top, size, expect) = build_chain(dir.path(), ChainKind::Three);
    {
        let img = open_rw(&top);
        let progress = Progress::with_callback(move |d, _| {
            if d >= 4 * MIB {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        let e = img.stream(&progress).unwrap_err();
        assert!(matches!(e, Error::Cancelled { .. }), "{e}");
        assert!(img.backing().is_some());
        // Half done: the first part was copied, the rest still reads through.
        assert!(matches!(
            img.block_status(3 * MIB, CS).unwrap().kind,
            ExtentKind::Data { .. }
        ));
        assert_eq!(
            img.block_status(6 * MIB, CS).unwrap().kind,
            ExtentKind::Unallocated
        );
        assert_image_matches_raw("cancelled", &img, &expect);
        let r = img.check(qed::CheckFix::NONE).unwrap();
        assert_eq!((r.corruptions, r.leaks), (0, 0), "{r:?}");
        img.close().unwrap();
    }
    assert_eq!(backing_of(&top).as_deref(), Some("mid.qed"));
    assert_qemu_agrees("cancelled", &top, &expect);
    // A cancel from another thread before the start stops it at once, changing nothing.
    {
        let img = open_rw(&top);
        let p = Progress::new();
        let q = p.clone();
        thread::spawn(move || q.cancel()).join().unwrap();
        assert!(matches!(img.stream(&p), Err(Error::Cancelled { .. })));
        // The second stream finishes the job.
        img.stream(&Progress::new()).unwrap();
        assert_image_matches_raw("resumed", &img, &expect);
        for e in img.map(0, size).unwrap() {
            assert_ne!(e.kind, ExtentKind::Unallocated, "resumed: {e:?}");
        }
    }
    assert_eq!(backing_of(&top), None);
    assert_qemu_agrees("resumed", &top, &expect);
}

/// The shadow of the guest disk: each writer thread owns the clusters `i % THREADS == t`, so
/// its writes never overlap another's and the shadow, updated after each write completes, is
/// exact for every cluster at every moment its owner is not writing.
struct Shadow {
    bytes: Mutex<Vec<u8>>,
}

const THREADS: u64 = 4;

/// One writer: random writes (partial and whole clusters) into its own clusters, each read
/// back and compared with the shadow, until `stop` (and at least 64 writes). With `front` (a
/// stream's progress), every other write goes into the 1 MiB the stream is copying.
fn writer(
    img: &Image,
    sh: &Shadow,
    (t, cs): (u64, u64),
    front: Option<&Progress>,
    stop: &AtomicBool,
    ops: &AtomicU64,
) {
    let mut rng = Rng::new(0x57EA + t);
    let clusters = img.size() / cs;
    let mut n = 0;
    while !stop.load(Ordering::Acquire) || n < 64 {
        let (first, count) = match front {
            Some(p) if n % 2 == 0 => {
                let at = p.get().0 / cs;
                (at, (MIB / cs).min(clusters - at.min(clusters)))
            }
            _ => (0, clusters),
        };
        if count < THREADS {
            n += 1;
            continue;
        }
        let c = (first + rng.below(count)) / THREADS * THREADS + t;
        if c >= clusters {
            n += 1;
            continue;
        }
        let off = c * cs + rng.below(cs / 512) * 512;
        let len = rng.range(1, (c + 1) * cs / 512 - off / 512) * 512;
        let data = vec![rng.pattern(); len as usize];
        img.write_at(off, &data).unwrap();
        sh.bytes.lock().unwrap()[off as usize..(off + len) as usize].copy_from_slice(&data);
        // Read the whole cluster back: through the backing file or the overlay, it must match.
        let mut got = vec![0u8; cs as usize];
        img.read_at(c * cs, &mut got).unwrap();
        let want = sh.bytes.lock().unwrap()[(c * cs) as usize..((c + 1) * cs) as usize].to_vec();
        assert!(got == want, "thread {t}: cluster {c} differs after a write");
        ops.fetch_add(1, Ordering::AcqRel);
        n += 1;
    }
}

#[test]
fn stream_under_concurrent_guest_writes() {
    let dir = tempfile::tempdir().unwrap();
    let cs = 4 * KIB;
    // 4 KiB-cluster files stay under 16 MiB: QEMU's check counts phantom leaks past that.
    let size = 12 * MIB;
    let base = dir.path().join("base.raw");
    let mut initial = base_bytes(size, 9);
    write_raw(&base, &initial);
    let top = dir.path().join("top.qed");
    qemu_img(&[
        "create",
        "-f",
        "qed",
        "-o",
        &format!("cluster_size={cs},table_size=2"),
        "-b",
        "base.raw",
        "-F",
        "raw",
        p(&top),
        &size.to_string(),
    ])
    .ok();
    // Some clusters the overlay already has.
    initial[(MIB) as usize..(MIB + 3 * cs) as usize].fill(0x77);
    let img = Arc::new(open_rw(&top));
    img.write_at(MIB, &initial[(MIB) as usize..(MIB + 3 * cs) as usize])
        .unwrap();
    let shadow = Arc::new(Shadow {
        bytes: Mutex::new(initial),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    // Each batch waits until the writers did a few more writes: the stream and the guest
    // writes interleave whatever the scheduler does.
    let seen = Arc::new(AtomicU64::new(0));
    let (o, s) = (ops.clone(), seen.clone());
    let progress = Progress::with_callback(move |done, total| {
        if done < total {
            let want = s.load(Ordering::Acquire) + 6;
            while o.load(Ordering::Acquire) < want {
                thread::yield_now();
            }
            s.store(o.load(Ordering::Acquire), Ordering::Release);
        }
        ControlFlow::Continue(())
    });
    let writers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (img, sh, stop, ops) = (img.clone(), shadow.clone(), stop.clone(), ops.clone());
            let front = progress.clone();
            thread::spawn(move || writer(&img, &sh, (t, cs), Some(&front), &stop, &ops))
        })
        .collect();
    img.stream(&progress).unwrap();
    stop.store(true, Ordering::Release);
    for w in writers {
        w.join().unwrap();
    }
    assert!(img.backing().is_none());
    // Batches of 1 MiB: at least 12 of them each waited for writes.
    assert!(ops.load(Ordering::Acquire) >= 6 * 12);
    let want = shadow.bytes.lock().unwrap().clone();
    assert_image_matches_model("after the stream", &img, &want);
    let r = img.check(qed::CheckFix::NONE).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{r:?}");
    Arc::try_unwrap(img).unwrap().close().unwrap();
    let expect = dir.path().join("shadow.raw");
    write_raw(&expect, &want);
    assert_eq!(backing_of(&top), None);
    // The base is no longer needed: QEMU reads the overlay alone.
    std::fs::remove_file(&base).unwrap();
    assert_qemu_agrees("concurrent", &top, &expect);
}

#[test]
fn copy_on_read_copies_backing_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let (top, size, expect) = build_chain(dir.path(), ChainKind::Qed);
    let want = read_file(&expect);
    // Refused read-only.
    let e = Image::open(
        &top,
        &OpenOptions {
            copy_on_read: true,
            ..OpenOptions::read_only()
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidArgument {
                what: "copy_on_read",
                ..
            }
        ),
        "{e}"
    );
    let cor = OpenOptions {
        copy_on_read: true,
        ..OpenOptions::read_write()
    };
    {
        let img = Image::open(&top, &cor).unwrap();
        assert_eq!(
            img.block_status(3 * MIB, CS).unwrap().kind,
            ExtentKind::Unallocated
        );
        // An unaligned read copies the whole clusters it touches.
        let (off, len) = (3 * MIB + 100, CS + 1000);
        let mut got = vec![0u8; len as usize];
        img.read_at(off, &mut got).unwrap();
        assert_bytes_equal(
            "cor read",
            off,
            &got,
            &want[off as usize..(off + len) as usize],
        );
        let e = img.block_status(3 * MIB, 2 * CS).unwrap();
        assert!(matches!(e.kind, ExtentKind::Data { .. }), "{e:?}");
        assert_eq!(e.length, 2 * CS);
        // Zeros from the backing file become zero clusters.
        let mut z = vec![1u8; CS as usize];
        img.read_at(5 * MIB, &mut z).unwrap();
        assert!(z.iter().all(|&b| b == 0));
        assert_eq!(
            img.block_status(5 * MIB, CS).unwrap().kind,
            ExtentKind::Zero
        );
        // Untouched clusters stay unallocated.
        assert_eq!(
            img.block_status(6 * MIB, CS).unwrap().kind,
            ExtentKind::Unallocated
        );
        img.close().unwrap();
    }
    assert_qemu_agrees("cor", &top, &expect);
    // Concurrent: writers own clusters 0 and 1 mod 4; readers read anywhere with
    // copy-on-read and check the clusters nobody writes (2 and 3 mod 4).
    let img = Arc::new(Image::open(&top, &cor).unwrap());
    let shadow = Arc::new(Shadow {
        bytes: Mutex::new(want.clone()),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let mut threads: Vec<_> = (0..2)
        .map(|t| {
            let (img, sh, stop, ops) = (img.clone(), shadow.clone(), stop.clone(), ops.clone());
            thread::spawn(move || writer(&img, &sh, (t, CS), None, &stop, &ops))
        })
        .collect();
    for r in 0..2u64 {
        let (img, want, ops) = (img.clone(), want.clone(), ops.clone());
        threads.push(thread::spawn(move || {
            let mut rng = Rng::new(0xC0 + r);
            for _ in 0..200 {
                let off = rng.below(size / 512) * 512;
                let len = rng.range(1, ((size - off) / 512).min(512)) * 512;
                let mut got = vec![0u8; len as usize];
                img.read_at(off, &mut got).unwrap();
                for (i, (&g, &w)) in got.iter().zip(&want[off as usize..]).enumerate() {
                    let at = off + i as u64;
                    if (at / CS) % THREADS >= 2 {
                        assert_eq!(g, w, "reader {r}: byte at {at:#x}");
                    }
                }
                ops.fetch_add(1, Ordering::AcqRel);
            }
        }));
    }
    let readers = threads.split_off(2);
    for t in readers {
        t.join().unwrap();
    }
    stop.store(true, Ordering::Release);
    for t in threads {
        t.join().unwrap();
    }
    let model = shadow.bytes.lock().unwrap().clone();
    assert_image_matches_model("cor concurrent", &img, &model);
    Arc::try_unwrap(img).unwrap().close().unwrap();
    let expect2 = dir.path().join("shadow.raw");
    write_raw(&expect2, &model);
    assert_qemu_agrees("cor concurrent", &top, &expect2);
}

/// A raw backing file whose first read after `arm` waits for `release`: it holds a stream in
/// the middle of a copy, with the clusters' range locked.
#[derive(Default)]
struct HeldBacking {
    inner: qed::MemStorage,
    /// (armed, entered, released)
    state: Mutex<(bool, bool, bool)>,
    cv: std::sync::Condvar,
}

impl HeldBacking {
    fn wait_for(&self, f: impl Fn(&(bool, bool, bool)) -> bool) {
        let mut s = self.state.lock().unwrap();
        while !f(&s) {
            s = self.cv.wait(s).unwrap();
        }
    }
    fn set(&self, f: impl FnOnce(&mut (bool, bool, bool))) {
        f(&mut self.state.lock().unwrap());
        self.cv.notify_all();
    }
}

impl qed::Storage for HeldBacking {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let held = std::mem::take(&mut self.state.lock().unwrap().0);
        if held {
            self.set(|s| s.1 = true);
            self.wait_for(|s| s.2);
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
}

/// A guest write to a cluster the stream is copying at that moment (its backing read held)
/// waits for the copy and then overwrites it: the guest's bytes, not the backing file's, are
/// what the image holds afterwards.
#[test]
fn guest_write_during_a_copy_wins() {
    use qed::{Backing, BackingFormat, CreateOptions, MemStorage, Storage};
    let cs = 4096u64;
    let backing = Arc::new(HeldBacking::default());
    backing
        .inner
        .write_at(&vec![0x5a; MIB as usize], 0)
        .unwrap();
    let s = Arc::new(MemStorage::new());
    Image::create_on(
        &*s,
        &CreateOptions {
            size: MIB,
            cluster_size: cs as u32,
            backing_file: Some("base".into()),
            backing_format: Some(BackingFormat::Raw),
            ..CreateOptions::new(MIB)
        },
    )
    .unwrap();
    let b = backing.clone();
    let opts = OpenOptions {
        backing_resolver: Some(Arc::new(move |_: &str, _: Option<BackingFormat>| {
            Ok(Backing::Raw(b.clone()))
        })),
        ..OpenOptions::read_write()
    };
    let img = Arc::new(Image::open_storage(s, &opts).unwrap());
    backing.set(|s| s.0 = true);
    let i = img.clone();
    let streamer = thread::spawn(move || i.stream(&Progress::new()));
    backing.wait_for(|s| s.1);
    let i = img.clone();
    let writer = thread::spawn(move || i.write_at(3 * cs, &vec![0xaa; cs as usize]));
    // Only how likely a wrong order would show depends on this pause, never the outcome.
    thread::sleep(std::time::Duration::from_millis(50));
    backing.set(|s| s.2 = true);
    streamer.join().unwrap().unwrap();
    writer.join().unwrap().unwrap();
    assert!(img.backing().is_none());
    let mut got = vec![0u8; MIB as usize];
    img.read_at(0, &mut got).unwrap();
    for (c, chunk) in got.chunks(cs as usize).enumerate() {
        let want = if c == 3 { 0xaa } else { 0x5a };
        assert!(chunk.iter().all(|&b| b == want), "cluster {c}");
    }
}
