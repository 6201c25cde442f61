// SPDX-License-Identifier: MIT OR Apache-2.0
//! Crash-point enumeration: every write and flush of a workload is recorded on the in-memory
//! storage, then for every point in that record we build the disks a power loss could leave:
//! everything before the last completed flush kept, and the writes after it kept, dropped or
//! torn at 512-byte granularity in many combinations. Each disk must open read-write (repairing
//! itself), pass our check with no corruptions and no leaks, keep every write completed before
//! the last flush, and show every other byte with its old or its new value, never a third.
//!
//! Also: QEMU-openable geometries whose sampled crash states qemu-img must judge clean and read
//! as we do, and workloads of concurrent writers and flushes whose crash points are judged by
//! each guest op's start and end in the storage log.

#[path = "support/rng.rs"]
mod rng;
use qed::storage::{MemOp, MemStorage, Storage};
use qed::{Backing, BackingFormat, CheckFix, CreateOptions, Image, OpenOptions};
use rng::Rng;
use std::cell::Cell;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

#[derive(Clone, Debug)]
enum Guest {
    Write(u64, Vec<u8>),
    Zeroes(u64, u64),
    /// A discard: reads as zeros afterwards, whole data clusters punched.
    Discard(u64, u64),
    Truncate(u64),
    Flush,
    /// Write everything back and clear the need-check bit (what the idle timer does).
    Settle,
    /// Repair with leak reclaim (guest data must not change).
    Repair,
    /// Stream the backing file into the image (guest data must not change).
    Stream,
    Close,
}

struct Recorded {
    base: Vec<u8>,
    ops: Vec<MemOp>,
    /// (guest op, first storage op index, one past its last).
    guest: Vec<(Guest, usize, usize)>,
    size0: u64,
}

struct Setup {
    cluster_size: u32,
    table_size: u32,
    size: u64,
    backing: Option<Arc<MemStorage>>,
    /// Storage that does not grow by writes (like O_DIRECT files): the engine extends the file
    /// ahead of its allocations, and the stretch past the last cluster must be reclaimed.
    fixed_length: bool,
    /// Also judge a sample of the repaired states with qemu-img (table_size >= 2 only).
    qemu: Option<QemuJudge>,
}

/// QEMU as a second judge of repaired crash states: `qemu-img check` must find them clean and
/// `qemu-img convert` must read the same guest bytes as we do.
struct QemuJudge {
    dir: tempfile::TempDir,
    /// The backing file on disk (the same bytes as `Setup::backing`), named by the header.
    backing_file: Option<PathBuf>,
    judged: Cell<usize>,
}

impl QemuJudge {
    fn new(backing: Option<&MemStorage>) -> QemuJudge {
        let dir = tempfile::tempdir().unwrap();
        let backing_file = backing.map(|b| {
            let path = dir.path().join("base.raw");
            std::fs::write(&path, b.to_bytes()).unwrap();
            path
        });
        QemuJudge {
            dir,
            backing_file,
            judged: Cell::new(0),
        }
    }

    /// Judges the closed, repaired `image` whose guest bytes we read as `ours`.
    fn judge(&self, image: &[u8], ours: &[u8], k: usize) {
        let path = self.dir.path().join("state.qed");
        let raw = self.dir.path().join("state.raw");
        std::fs::write(&path, image).unwrap();
        let run = |args: &[&str]| {
            let out = Command::new("qemu-img")
                .args(args)
                .output()
                .unwrap_or_else(|e| panic!("cannot run qemu-img ({e}); install qemu-utils"));
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            (out.status.code(), text)
        };
        let keep = || {
            let kept = std::env::temp_dir().join(format!("qed-crash-state-{k}.qed"));
            std::fs::write(&kept, image).unwrap();
            kept
        };
        let p = path.to_str().unwrap();
        let (code, text) = run(&["check", "-f", "qed", p]);
        if code != Some(0) || !text.contains("No errors were found") {
            panic!(
                "crash point {k}: qemu-img check exit {code:?} on our repaired image (kept as {}):\n{text}",
                keep().display()
            );
        }
        let (code, text) = run(&[
            "convert",
            "-f",
            "qed",
            "-O",
            "raw",
            p,
            raw.to_str().unwrap(),
        ]);
        assert_eq!(code, Some(0), "crash point {k}: qemu-img convert: {text}");
        let theirs = std::fs::read(&raw).unwrap();
        if theirs != ours {
            let at = theirs.iter().zip(ours).position(|(a, b)| a != b);
            panic!(
                "crash point {k}: qemu-img reads {} bytes, we read {}; first difference at {at:?} (image kept as {})",
                theirs.len(),
                ours.len(),
                keep().display()
            );
        }
        self.judged.set(self.judged.get() + 1);
    }
}

impl Setup {
    fn opts(&self, writable: bool) -> OpenOptions {
        let b = self.backing.clone();
        OpenOptions {
            writable,
            backing_resolver: b.map(|b| {
                Arc::new(move |_: &str, _: Option<BackingFormat>| Ok(Backing::Raw(b.clone())))
                    as qed::image::BackingResolver
            }),
            ..Default::default()
        }
    }

    /// The backing file name the header carries: for QEMU, the real file with its bytes.
    fn backing_name(&self) -> Option<String> {
        self.backing.as_ref()?;
        Some(
            match self.qemu.as_ref().and_then(|q| q.backing_file.as_ref()) {
                Some(path) => path.to_str().unwrap().to_owned(),
                None => "base".into(),
            },
        )
    }

    fn backing_bytes(&self, len: u64) -> Vec<u8> {
        let mut v = vec![0u8; len as usize];
        if let Some(b) = &self.backing {
            b.read_at(&mut v, 0).unwrap();
        }
        v
    }
}

fn record(setup: &Setup, prepare: &[Guest], workload: &[Guest]) -> Recorded {
    let s = Arc::new(MemStorage::new());
    s.set_fixed_length(setup.fixed_length);
    Image::create_on(
        &*s,
        &CreateOptions {
            size: setup.size,
            cluster_size: setup.cluster_size,
            table_size: setup.table_size,
            backing_file: setup.backing_name(),
            backing_format: setup.backing.as_ref().map(|_| BackingFormat::Raw),
        },
    )
    .unwrap();
    let img = Image::open_storage(s.clone(), &setup.opts(true)).unwrap();
    for g in prepare {
        apply(&img, g);
    }
    img.flush().unwrap();
    let base = s.to_bytes();
    s.start_recording();
    let mut ops = Vec::new();
    let mut guest = Vec::new();
    for g in workload {
        let start = ops.len();
        apply(&img, g);
        ops.extend(s.take_log());
        guest.push((g.clone(), start, ops.len()));
    }
    std::mem::forget(img); // no close beyond what the workload does: the record ends here
    Recorded {
        base,
        ops,
        guest,
        size0: setup.size,
    }
}

fn apply(img: &Image, g: &Guest) {
    match g {
        Guest::Write(off, d) => img.write_at(*off, d).unwrap(),
        Guest::Zeroes(off, len) => img.write_zeroes(*off, *len).unwrap(),
        Guest::Discard(off, len) => img.discard(*off, *len).unwrap(),
        Guest::Truncate(n) => img.truncate(*n).unwrap(),
        Guest::Flush => img.flush().unwrap(),
        Guest::Settle => img.settle().unwrap(),
        Guest::Repair => {
            let r = img.check(CheckFix::ALL).unwrap();
            assert_eq!(r.corruptions, 0);
        }
        Guest::Stream => img.stream(&qed::image::Progress::new()).unwrap(),
        Guest::Close => img.close().unwrap(),
    }
}

fn apply_op(disk: &mut Vec<u8>, op: &MemOp, sectors: Option<&[bool]>) {
    match op {
        MemOp::Write { offset, data } | MemOp::DurableWrite { offset, data } => {
            let end = *offset as usize + data.len();
            if disk.len() < end {
                disk.resize(end, 0);
            }
            match sectors {
                None => disk[*offset as usize..end].copy_from_slice(data),
                Some(keep) => {
                    // Torn: only some 512-byte sectors (by absolute file offset) reached the disk.
                    let mut pos = *offset as usize;
                    while pos < end {
                        let sector_end = ((pos / 512) + 1) * 512;
                        let n = sector_end.min(end) - pos;
                        if keep[(pos - *offset as usize) / 512 % keep.len()] {
                            let s = pos - *offset as usize;
                            disk[pos..pos + n].copy_from_slice(&data[s..s + n]);
                        }
                        pos += n;
                    }
                }
            }
        }
        MemOp::SetLen(n) => disk.resize(*n as usize, 0),
        MemOp::PunchHole { offset, len } => {
            // A punch is a write of zeros that never grows the file (torn like one, too).
            let end = (*offset + *len).min(disk.len() as u64);
            if *offset < end {
                let zeros = MemOp::Write {
                    offset: *offset,
                    data: vec![0; (end - *offset) as usize],
                };
                apply_op(disk, &zeros, sectors);
            }
        }
        MemOp::Flush => {}
    }
}

/// The guest's view as a flat array, old values for bytes the in-flight ops may change.
struct Expect {
    durable: Vec<u8>,
    durable_size: u64,
}

fn apply_model(m: &mut Expect, g: &Guest) {
    match g {
        Guest::Write(off, d) => {
            m.durable[*off as usize..*off as usize + d.len()].copy_from_slice(d)
        }
        Guest::Zeroes(off, len) | Guest::Discard(off, len) => {
            m.durable[*off as usize..(*off + *len) as usize].fill(0)
        }
        Guest::Truncate(n) => {
            // The grown area reads as zeros, whatever the backing file holds there.
            m.durable[m.durable_size as usize..*n as usize].fill(0);
            m.durable_size = *n;
        }
        _ => {}
    }
}

/// Calls `visit(k, disk)` for disks a power loss at every point `k` of `ops` (applied to
/// `base`) could leave: everything before the last storage flush before `k` kept, the writes
/// after it kept, dropped or torn (all combinations of up to 6 writes, else all, none and
/// `max_subsets` random ones). Only every `stride`-th of those disks is built and visited (a
/// sample spread over all crash points). Returns the number of disks visited.
fn crash_states(
    base: &[u8],
    ops: &[MemOp],
    rng: &mut Rng,
    max_subsets: usize,
    stride: usize,
    mut visit: impl FnMut(usize, &[u8]),
) -> usize {
    let mut durable_disk = base.to_vec();
    let mut applied_ops = 0; // ops folded into durable_disk
    let (mut states, mut index) = (0, 0);
    for k in 0..=ops.len() {
        // The last flush that completed before the crash point.
        let f = ops[..k]
            .iter()
            .rposition(|o| *o == MemOp::Flush)
            .map_or(0, |i| i + 1);
        while applied_ops < f {
            apply_op(&mut durable_disk, &ops[applied_ops], None);
            applied_ops += 1;
        }
        let post: Vec<usize> = (f..k).filter(|&i| ops[i] != MemOp::Flush).collect();
        let mut subsets: Vec<Vec<bool>> = Vec::new();
        if post.len() <= 6 {
            for mask in 0..(1u32 << post.len()) {
                subsets.push((0..post.len()).map(|i| mask & (1 << i) != 0).collect());
            }
        } else {
            subsets.push(vec![true; post.len()]);
            subsets.push(vec![false; post.len()]);
            for _ in 0..max_subsets {
                subsets.push((0..post.len()).map(|_| rng.below(2) == 0).collect());
            }
        }
        let torn_variants = if post.is_empty() { 0 } else { 3 };
        for (si, keep) in subsets.iter().enumerate() {
            for torn in 0..=torn_variants.min(if si < 2 { torn_variants } else { 1 }) {
                index += 1;
                if (index - 1) % stride != 0 {
                    continue;
                }
                let mut disk = durable_disk.clone();
                let torn_at = if torn > 0 {
                    Some(rng.below(post.len() as u64) as usize)
                } else {
                    None
                };
                for (j, &i) in post.iter().enumerate() {
                    if matches!(ops[i], MemOp::DurableWrite { .. }) {
                        // A FUA write is durable (whole) once it completed.
                        apply_op(&mut disk, &ops[i], None);
                    } else if Some(j) == torn_at {
                        let n = (rng.below(8) + 1) as usize;
                        let sectors: Vec<bool> = (0..n).map(|_| rng.below(2) == 0).collect();
                        apply_op(&mut disk, &ops[i], Some(&sectors));
                    } else if keep[j] {
                        apply_op(&mut disk, &ops[i], None);
                    }
                }
                visit(k, &disk);
                states += 1;
            }
        }
    }
    states
}

/// Explores every crash point of `rec`; returns the number of crash states checked.
fn explore(
    setup: &Setup,
    rec: &Recorded,
    rng: &mut Rng,
    max_subsets: usize,
    stride: usize,
    repair_first: bool,
) -> usize {
    let max_size = rec
        .guest
        .iter()
        .filter_map(|(g, _, _)| {
            if let Guest::Truncate(n) = g {
                Some(*n)
            } else {
                None
            }
        })
        .max()
        .unwrap_or(rec.size0)
        .max(rec.size0);
    let backing = setup.backing_bytes(max_size);
    let mut model = Expect {
        durable: backing.clone(),
        durable_size: rec.size0,
    };
    // Bytes of the prepare phase are already in the base; reconstruct them by reading it.
    {
        let s = Arc::new(MemStorage::from_bytes(&rec.base));
        let img = Image::open_storage(
            s,
            &OpenOptions {
                no_repair: true,
                ..setup.opts(false)
            },
        )
        .unwrap();
        img.read_at(0, &mut model.durable[..rec.size0 as usize])
            .unwrap();
    }
    let mut applied_guest = 0; // guest ops folded into the model
    crash_states(&rec.base, &rec.ops, rng, max_subsets, stride, |k, disk| {
        // What the guest was promised: every op completed before the last completed guest
        // flush (or close, or repair) is durable. Storage flushes inside other ops promise
        // nothing: the engine may stage L2 entries until the guest flushes.
        // (By position in the guest sequence: an op with no storage writes of its own, such as
        // a staged write-zeroes, has an empty op range that says nothing about its order.)
        let durable_upto = rec
            .guest
            .iter()
            .rposition(|(g, _, end)| {
                *end <= k
                    && matches!(
                        g,
                        Guest::Flush | Guest::Settle | Guest::Close | Guest::Repair
                    )
            })
            .map_or(0, |i| i + 1);
        while applied_guest < durable_upto {
            apply_model(&mut model, &rec.guest[applied_guest].0);
            applied_guest += 1;
        }
        // Guest ops that may be partly on disk: started before k, not covered by a guest flush.
        let inflight: Vec<&Guest> = rec.guest[applied_guest..]
            .iter()
            .filter(|(_, start, _)| *start < k)
            .map(|(g, _, _)| g)
            .collect();
        verify(setup, disk, &model, &inflight, k, repair_first);
    })
}

fn verify(
    setup: &Setup,
    disk: &[u8],
    m: &Expect,
    inflight: &[&Guest],
    k: usize,
    repair_first: bool,
) {
    let s = Arc::new(MemStorage::from_bytes(disk));
    // A clear need-check bit is a promise that the image needs no repair: check it without one.
    {
        let opts = OpenOptions {
            no_repair: true,
            ..setup.opts(false)
        };
        let img = Image::open_storage(s.clone(), &opts)
            .unwrap_or_else(|e| panic!("crash point {k}: read-only open failed: {e}"));
        if !img.info().unwrap().needs_check && !repair_first {
            let r = img.check(CheckFix::NONE).unwrap();
            assert_eq!(
                (r.corruptions, r.leaks, r.check_errors),
                (0, 0, 0),
                "crash point {k}: the need-check bit is clear but the image is not clean: {r:?}"
            );
        }
    }
    let img = Image::open_storage(s.clone(), &setup.opts(true))
        .unwrap_or_else(|e| panic!("crash point {k}: read-write open failed: {e}"));
    if repair_first {
        // Leaks from before the recorded repair are not the crash's doing: repair them again.
        img.check(CheckFix::ALL).unwrap();
    }
    let r = img.check(CheckFix::NONE).unwrap();
    assert_eq!(
        (r.corruptions, r.leaks, r.check_errors),
        (0, 0, 0),
        "crash point {k}: {r:?}"
    );
    let size = img.size();
    let sizes: Vec<u64> = std::iter::once(m.durable_size)
        .chain(inflight.iter().filter_map(|g| {
            if let Guest::Truncate(n) = g {
                Some(*n)
            } else {
                None
            }
        }))
        .collect();
    assert!(
        sizes.contains(&size),
        "crash point {k}: size {size} not in {sizes:?}"
    );
    let mut got = vec![0u8; size as usize];
    img.read_at(0, &mut got).unwrap();
    let n = (m.durable_size.min(size)) as usize;
    if got[..n] != m.durable[..n] || got[n..].iter().any(|&b| b != 0) {
        check_bytes(&img, &got, m, inflight, k);
    }
    // The repaired image is clean for QEMU's rules too: close clears the need-check bit.
    img.close().unwrap();
    if let Some(q) = &setup.qemu {
        q.judge(&s.to_bytes(), &got, k);
    }
}

/// Every byte of `got` that differs from the durable model must come from an in-flight op.
fn check_bytes(img: &Image, got: &[u8], m: &Expect, inflight: &[&Guest], k: usize) {
    let size = got.len() as u64;
    for (i, &b) in got.iter().enumerate() {
        // Past the durable size, an in-flight grow shows zeros (never the backing file).
        let old = if (i as u64) < m.durable_size {
            m.durable[i]
        } else {
            0
        };
        if b == old {
            continue;
        }
        let ok = inflight.iter().any(|g| match g {
            Guest::Write(off, d) => {
                (*off as usize..*off as usize + d.len()).contains(&i) && d[i - *off as usize] == b
            }
            Guest::Zeroes(off, len) | Guest::Discard(off, len) => {
                (*off..*off + *len).contains(&(i as u64)) && b == 0
            }
            _ => false,
        });
        if !ok && std::env::var("QED_CRASH_DEBUG").is_ok() {
            let e = img.map(0, size).unwrap();
            eprintln!("map: {e:?}");
        }
        assert!(ok, "crash point {k}: byte {i:#x} reads {b:#x}, expected old {old:#x} or an in-flight write's value");
    }
}

fn pattern(rng: &mut Rng, len: usize) -> Vec<u8> {
    let v = rng.next_u64() as u8 | 1;
    (0..len).map(|i| v.wrapping_add(i as u8 / 7)).collect()
}

/// A mixed workload: allocating writes across clusters and L2 tables, sub-cluster writes, zero
/// clusters, overwrites, truncate, flushes, and a clean close.
fn workload(rng: &mut Rng, setup: &Setup, n: usize) -> Vec<Guest> {
    let cs = setup.cluster_size as u64;
    let mut w = Vec::new();
    let mut size = setup.size;
    for i in 0..n {
        let op = rng.below(10);
        let off = rng.below(size / 512) * 512 + if op % 2 == 0 { rng.below(512) } else { 0 };
        let max = (size - off).min(3 * cs);
        let len = 1 + rng.below(max.max(1));
        match op {
            0..=5 => w.push(Guest::Write(
                off,
                pattern(rng, len.min(size - off) as usize),
            )),
            6 => {
                let z = rng.below(size / cs) * cs;
                w.push(Guest::Zeroes(z, cs.min(size - z)));
            }
            7 if i > n / 2 && size + cs <= setup.size * 2 => {
                size += cs;
                w.push(Guest::Truncate(size));
            }
            8 => w.push(Guest::Settle),
            _ => w.push(Guest::Flush),
        }
    }
    w.push(Guest::Flush);
    w.push(Guest::Close);
    w
}

fn steps() -> usize {
    std::env::var("QED_CRASH_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120)
}

#[test]
fn crash_states_of_mixed_workloads_are_all_recoverable() {
    let seed = std::env::var("QED_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x51ED);
    let mut total = 0;
    let raw = Arc::new(MemStorage::from_bytes(
        &(0..(4u32 << 20))
            .map(|i| (i % 253) as u8 | 0x80)
            .collect::<Vec<_>>(),
    ));
    let setups = [
        // 4K/ts1: an L2 table maps 2 MiB, so 3 MiB spans two tables.
        Setup {
            cluster_size: 4096,
            table_size: 1,
            size: 3 << 20,
            backing: None,
            fixed_length: false,
            qemu: None,
        },
        Setup {
            cluster_size: 65536,
            table_size: 1,
            size: 2 << 20,
            backing: None,
            fixed_length: false,
            qemu: None,
        },
        Setup {
            cluster_size: 4096,
            table_size: 1,
            size: 3 << 20,
            backing: Some(raw.clone()),
            fixed_length: false,
            qemu: None,
        },
        Setup {
            cluster_size: 8192,
            table_size: 1,
            size: 2 << 20,
            backing: Some(raw.clone()),
            fixed_length: false,
            qemu: None,
        },
        Setup {
            cluster_size: 4096,
            table_size: 1,
            size: 3 << 20,
            backing: None,
            fixed_length: true,
            qemu: None,
        },
        Setup {
            cluster_size: 8192,
            table_size: 1,
            size: 2 << 20,
            backing: Some(raw.clone()),
            fixed_length: true,
            qemu: None,
        },
    ];
    for (i, setup) in setups.iter().enumerate() {
        let mut rng = Rng::new(seed + i as u64);
        let w = workload(&mut rng, setup, steps());
        let rec = record(setup, &[], &w);
        if std::env::var("QED_CRASH_DEBUG").is_ok() {
            for (g, a, b) in &rec.guest {
                let gs = match g {
                    Guest::Write(o, d) => format!("Write({o:#x}, {:#x})", d.len()),
                    g => format!("{g:?}"),
                };
                eprintln!("guest {gs} ops {a}..{b}");
            }
            for (i, o) in rec.ops.iter().enumerate() {
                match o {
                    MemOp::Write { offset, data } => eprintln!(
                        "op {i}: write {offset:#x} len {:#x} first8 {:x?}",
                        data.len(),
                        &data[..8.min(data.len())]
                    ),
                    o => eprintln!("op {i}: {o:?}"),
                }
            }
        }
        let n = explore(setup, &rec, &mut rng, 24, 1, false);
        println!(
            "crash: geometry {}K/ts{} backing={} fixed_length={} : {} storage ops, {} crash states explored",
            setup.cluster_size / 1024,
            setup.table_size,
            setup.backing.is_some(),
            setup.fixed_length,
            rec.ops.len(),
            n
        );
        total += n;
    }
    println!("crash: {total} crash states explored in all (seed {seed:#x})");
    // README promises 13,000+ crash states per run (mixed workloads; repair's are extra).
    assert!(total >= 13_000, "only {total} crash states explored");
}

/// Discards in the crash enumeration: an image full of data (flushed before recording), then
/// discards (whole clusters punched, partial ends written, unallocated clusters over the
/// backing file made zero clusters), writes into punched clusters and flushes. Every crash
/// state after a flushed discard reads zeros there; before the flush, each byte reads old or
/// zero, never anything else; every state repairs clean. The memory storage logs each punch,
/// which a crash keeps, drops or tears like a write of zeros.
#[test]
fn crash_states_of_discards_are_all_recoverable() {
    let raw = Arc::new(MemStorage::from_bytes(
        &(0..(2u32 << 20))
            .map(|i| (i % 251) as u8 | 0x40)
            .collect::<Vec<_>>(),
    ));
    let mut total = 0;
    for (i, (cluster_size, backing, fixed_length)) in [
        (4096u32, None, false),
        (8192, Some(raw.clone()), false),
        (4096, Some(raw.clone()), true),
    ]
    .into_iter()
    .enumerate()
    {
        let setup = Setup {
            cluster_size,
            table_size: 1,
            size: 1 << 20,
            backing,
            fixed_length,
            qemu: None,
        };
        let cs = cluster_size as u64;
        let mut rng = Rng::new(0xD15C + i as u64);
        // Half the image written before recording (the rest stays unallocated).
        let prepare = vec![Guest::Write(
            0,
            pattern(&mut rng, (setup.size / 2) as usize),
        )];
        let mut w = Vec::new();
        for _ in 0..24 {
            let off = rng.below(setup.size / 512) * 512 + rng.below(2) * rng.below(512);
            let len = (1 + rng.below(6 * cs)).min(setup.size - off);
            match rng.below(6) {
                0..=2 => w.push(Guest::Discard(off, len)),
                3 => {
                    let c = rng.below(setup.size / cs) * cs;
                    w.push(Guest::Discard(c, cs * (1 + rng.below(3))));
                }
                4 => w.push(Guest::Write(off, pattern(&mut rng, len.min(cs) as usize))),
                _ => w.push(Guest::Flush),
            }
        }
        w.push(Guest::Flush);
        w.push(Guest::Close);
        let rec = record(&setup, &prepare, &w);
        assert!(
            rec.ops.iter().any(|o| matches!(o, MemOp::PunchHole { .. })),
            "the workload punched nothing"
        );
        let n = explore(&setup, &rec, &mut rng, 16, 1, false);
        println!(
            "crash (discard): {}K backing={} fixed_length={}: {} storage ops, {n} crash states",
            cluster_size / 1024,
            setup.backing.is_some(),
            fixed_length,
            rec.ops.len()
        );
        total += n;
    }
    assert!(total >= 1000, "only {total} crash states explored");
}

/// QEMU cannot open table_size 1, which every setup above uses: these geometries are QEMU's
/// (4 KiB clusters x 2, 64 KiB x 4, with and without a raw backing file on disk), and a sample
/// of their repaired crash states is judged by qemu-img as well as by us.
#[test]
fn crash_states_judged_by_qemu_img() {
    let out = Command::new("qemu-img").arg("--version").output();
    assert!(
        out.is_ok_and(|o| o.status.success()),
        "qemu-img is needed (install qemu-utils)"
    );
    let seed = std::env::var("QED_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x9E11u64);
    let raw = Arc::new(MemStorage::from_bytes(
        &(0..(8u32 << 20))
            .map(|i| (i % 251) as u8 ^ 0x5c)
            .collect::<Vec<_>>(),
    ));
    // A sample spread over every crash point: each state costs about 30 ms (ours + qemu-img).
    let stride = 23;
    let (mut total, mut judged) = (0, 0);
    for (i, (cs, ts, size, backing)) in [
        (4096, 2, 6 << 20, false),
        (4096, 2, 6 << 20, true),
        (65536, 4, 8 << 20, false),
        (65536, 4, 8 << 20, true),
    ]
    .into_iter()
    .enumerate()
    {
        let backing = backing.then(|| raw.clone());
        let setup = Setup {
            cluster_size: cs,
            table_size: ts,
            size,
            qemu: Some(QemuJudge::new(backing.as_deref())),
            backing,
            fixed_length: false,
        };
        let mut rng = Rng::new(seed + i as u64);
        let w = workload(&mut rng, &setup, steps());
        let rec = record(&setup, &[], &w);
        let n = explore(&setup, &rec, &mut rng, 8, stride, false);
        let q = setup.qemu.as_ref().unwrap();
        println!(
            "crash: geometry {}K/ts{} backing={} : {} storage ops, 1 in {stride} crash states: {n} checked by us, {} by qemu-img",
            cs / 1024,
            ts,
            setup.backing.is_some(),
            rec.ops.len(),
            q.judged.get()
        );
        total += n;
        judged += q.judged.get();
    }
    println!(
        "crash: {judged} crash states of QEMU geometries judged by qemu-img check and convert"
    );
    // Every state we checked went to qemu-img too.
    assert_eq!(judged, total);
    assert!(judged >= 400, "only {judged} states judged by qemu-img");
}

#[test]
fn crash_states_during_repair_keep_all_data() {
    let setup = Setup {
        cluster_size: 4096,
        table_size: 1,
        size: 4 << 20,
        backing: None,
        fixed_length: false,
        qemu: None,
    };
    let mut rng = Rng::new(7);
    // Prepare an image with interior leaks: write, then orphan some clusters behind the
    // engine's back (as a lost L2 update would), so the recorded repair has work to do.
    let s = Arc::new(MemStorage::new());
    Image::create_on(
        &*s,
        &CreateOptions {
            size: setup.size,
            cluster_size: 4096,
            table_size: 1,
            ..Default::default()
        },
    )
    .unwrap();
    {
        let img = Image::open_storage(s.clone(), &setup.opts(true)).unwrap();
        for i in 0..200u64 {
            let off = (i * 131 % 1000) * 4096;
            img.write_at(off, &pattern(&mut rng, 4096)).unwrap();
        }
        img.close().unwrap();
    }
    let mut l1 = [0u8; 8];
    s.read_at(&mut l1, 4096).unwrap();
    let l2 = u64::from_le_bytes(l1);
    for i in (0..512u64).step_by(5) {
        s.write_at(&0u64.to_le_bytes(), l2 + i * 8).unwrap();
    }
    let setup2 = Setup {
        backing: None,
        ..setup
    };
    let img = Image::open_storage(s.clone(), &setup2.opts(true)).unwrap();
    let before = img.check(CheckFix::NONE).unwrap();
    assert!(before.leaks > 10, "{before:?}");
    let base = s.to_bytes();
    s.start_recording();
    img.check(CheckFix::ALL).unwrap();
    img.close().unwrap();
    let ops = s.take_log();
    let rec = Recorded {
        base,
        ops,
        guest: vec![(Guest::Repair, 0, usize::MAX)],
        size0: setup2.size,
    };
    // Every guest byte must read its pre-repair value at every crash point.
    let rec = Recorded {
        guest: vec![],
        ..rec
    };
    let n = explore(&setup2, &rec, &mut rng, 16, 1, true);
    println!(
        "crash: repair of {} leaked clusters: {} storage ops, {n} crash states explored",
        before.leaks,
        rec.ops.len()
    );
    assert!(n > 100);
}

// ---------------------------------------------------------------------------------------------
// Multi-threaded workloads: concurrent writers and flushes.

/// A log position (storage ops recorded so far) and a sequence number, taken together.
#[derive(Clone, Copy, Debug)]
struct Stamp {
    seq: u64,
    pos: usize,
}

#[derive(Default)]
struct Clock {
    ops: usize,
    seq: u64,
    recording: bool,
}

/// Forwards to a recording `MemStorage`, counting its logged ops under a lock that guest-op
/// stamps also take: a stamp's position is exactly the number of ops logged before it, and
/// stamps are ordered in real time by their sequence numbers.
struct Clocked {
    mem: MemStorage,
    clock: std::sync::Mutex<Clock>,
}

impl Clocked {
    fn logged<T>(&self, f: impl FnOnce(&MemStorage) -> std::io::Result<T>) -> std::io::Result<T> {
        // As a disk would, let other threads run in the middle of a guest op.
        std::thread::yield_now();
        let mut c = self.clock.lock().unwrap();
        let r = f(&self.mem)?;
        if c.recording {
            c.ops += 1;
        }
        Ok(r)
    }

    fn stamp(&self) -> Stamp {
        let mut c = self.clock.lock().unwrap();
        c.seq += 1;
        Stamp {
            seq: c.seq,
            pos: c.ops,
        }
    }

    fn start_recording(&self) {
        let mut c = self.clock.lock().unwrap();
        self.mem.start_recording();
        c.ops = 0;
        c.recording = true;
    }

    fn take_log(&self) -> Vec<MemOp> {
        let c = self.clock.lock().unwrap();
        let log = self.mem.take_log();
        assert_eq!(log.len(), c.ops, "every logged op was counted");
        log
    }
}

impl Storage for Clocked {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.mem.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.logged(|m| m.write_at(buf, offset))
    }
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> std::io::Result<()> {
        // One op in MemStorage's log, as one pwritev.
        self.logged(|m| m.write_vectored_at(bufs, offset))
    }
    fn read_vectored_nowait(&self, bufs: &mut [&mut [u8]], offset: u64) -> std::io::Result<bool> {
        self.mem.read_vectored_nowait(bufs, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.logged(|m| m.flush())
    }
    fn len(&self) -> std::io::Result<u64> {
        self.mem.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.logged(|m| m.set_len(len))
    }
    fn grows_on_write(&self) -> bool {
        self.mem.grows_on_write()
    }
    fn data_from(&self, offset: u64) -> std::io::Result<Option<u64>> {
        self.mem.data_from(offset)
    }
}

#[derive(Clone, Debug)]
enum MtOp {
    Write(u64, Vec<u8>),
    Zeroes(u64, u64),
    Flush,
}

impl MtOp {
    fn range(&self) -> Option<(u64, u64)> {
        match self {
            MtOp::Write(off, d) => Some((*off, *off + d.len() as u64)),
            MtOp::Zeroes(off, len) => Some((*off, *off + *len)),
            MtOp::Flush => None,
        }
    }
    fn byte(&self, i: u64) -> u8 {
        match self {
            MtOp::Write(off, d) => d[(i - off) as usize],
            _ => 0,
        }
    }
}

#[derive(Debug)]
struct MtEvent {
    op: MtOp,
    thread: usize,
    start: Stamp,
    end: Stamp,
}

impl std::fmt::Display for MtEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match &self.op {
            MtOp::Write(off, d) => format!("write {off:#x}+{:#x} ({:#04x}..)", d.len(), d[0]),
            MtOp::Zeroes(off, len) => format!("zeroes {off:#x}+{len:#x}"),
            MtOp::Flush => "flush".into(),
        };
        write!(
            f,
            "thread {} {what}: seq {}..{}, log {}..{}",
            self.thread, self.start.seq, self.end.seq, self.start.pos, self.end.pos
        )
    }
}

struct MtRecord {
    /// The file when recording started, and the guest bytes it holds.
    base: Vec<u8>,
    guest0: Vec<u8>,
    ops: Vec<MemOp>,
    events: Vec<MtEvent>,
}

const MT_WRITERS: usize = 4;

/// Four writers, each on its own clusters (every fourth, in the first MiB) and on a few clusters
/// all of them write (overlapping ranges), with write-zeroes and flushes of their own, plus a
/// thread that flushes whenever a few more writes have completed: flushes run concurrently
/// with allocating writes and with each other. A final flush ends the record.
fn record_mt(setup: &Setup, seed: u64, per_thread: usize) -> MtRecord {
    let cs = setup.cluster_size as u64;
    let clocked = Arc::new(Clocked {
        mem: MemStorage::new(),
        clock: Default::default(),
    });
    Image::create_on(
        &*clocked,
        &CreateOptions {
            size: setup.size,
            cluster_size: setup.cluster_size,
            table_size: setup.table_size,
            backing_file: setup.backing_name(),
            backing_format: setup.backing.as_ref().map(|_| BackingFormat::Raw),
        },
    )
    .unwrap();
    let img = Image::open_storage(clocked.clone(), &setup.opts(true)).unwrap();
    // Some clusters allocated beforehand, so that writes also overwrite in place.
    let mut rng = Rng::new(seed);
    for i in 0..16 {
        let c = i * 5 % (setup.size / cs);
        img.write_at(c * cs, &pattern(&mut rng, cs as usize))
            .unwrap();
    }
    img.flush().unwrap();
    let base = clocked.mem.to_bytes();
    let mut guest0 = vec![0u8; setup.size as usize];
    img.read_at(0, &mut guest0).unwrap();
    clocked.start_recording();

    let events = std::sync::Mutex::new(Vec::new());
    let writes_done = std::sync::atomic::AtomicUsize::new(0);
    let writers_left = std::sync::atomic::AtomicUsize::new(MT_WRITERS);
    let start = std::sync::Barrier::new(MT_WRITERS + 1);
    let timed = |thread: usize, op: MtOp| {
        let s = clocked.stamp();
        match &op {
            MtOp::Write(off, d) => img.write_at(*off, d).unwrap(),
            MtOp::Zeroes(off, len) => img.write_zeroes(*off, *len).unwrap(),
            MtOp::Flush => img.flush().unwrap(),
        }
        let e = clocked.stamp();
        events.lock().unwrap().push(MtEvent {
            op,
            thread,
            start: s,
            end: e,
        });
    };
    use std::sync::atomic::Ordering::SeqCst;
    std::thread::scope(|sc| {
        for t in 0..MT_WRITERS {
            let (timed, start) = (&timed, &start);
            let (writes_done, writers_left) = (&writes_done, &writers_left);
            let mut rng = Rng::new(seed * 31 + t as u64 + 1);
            sc.spawn(move || {
                start.wait();
                let own = (1 << 20) / cs / MT_WRITERS as u64;
                for _ in 0..per_thread {
                    let op = match rng.below(20) {
                        0..=11 => {
                            // Its own cluster, sometimes running into the next (another's).
                            let c = rng.below(own) * MT_WRITERS as u64 + t as u64;
                            let off = c * cs + rng.below(cs / 512) * 512;
                            let len = 512 * rng.range(1, cs / 512 + 2);
                            MtOp::Write(off, pattern(&mut rng, len as usize))
                        }
                        12..=15 => {
                            // One of 4 shared clusters past the first MiB (fresh L2 entries).
                            let c = (1 << 20) / cs + rng.below(4) * 7;
                            let off = c * cs + rng.below(cs / 512) * 512;
                            let len = 512 * rng.range(1, 4);
                            MtOp::Write(off, pattern(&mut rng, len as usize))
                        }
                        16 => {
                            let c = rng.below(own) * MT_WRITERS as u64 + t as u64;
                            MtOp::Zeroes(c * cs, cs)
                        }
                        _ => MtOp::Flush,
                    };
                    let is_write = !matches!(op, MtOp::Flush);
                    timed(t, op);
                    if is_write {
                        writes_done.fetch_add(1, SeqCst);
                    }
                    // Let the others in: more interleavings on a machine with fewer cores.
                    std::thread::yield_now();
                }
                writers_left.fetch_sub(1, SeqCst);
            });
        }
        sc.spawn(|| {
            start.wait();
            let mut last = 0;
            while writers_left.load(SeqCst) > 0 {
                let done = writes_done.load(SeqCst);
                if done >= last + 3 {
                    timed(MT_WRITERS, MtOp::Flush);
                    last = done;
                } else {
                    std::thread::yield_now();
                }
            }
        });
    });
    timed(MT_WRITERS, MtOp::Flush);
    let ops = clocked.take_log();
    drop(img); // no close: the record ends with the last flush
    let mut events = events.into_inner().unwrap();
    events.sort_by_key(|e| e.start.seq);
    MtRecord {
        base,
        guest0,
        ops,
        events,
    }
}

/// What a byte range may read at one crash point: the values of these events, or the old
/// bytes when `old` (no durable write covers the range).
struct Allowed {
    start: u64,
    end: u64,
    events: Vec<usize>,
    old: bool,
}

/// The durability promise at crash point `k`: a write (or write-zeroes) is durable when it
/// completed before some flush started (sequence numbers) and that flush completed before `k`
/// (its end position). A durable value is the only one allowed, unless another durable write
/// to the byte did not start after it completed (then either of them, their order unknown)
/// or a write that is not durable may have reached the disk (its stamp started before `k`:
/// its ops, and the table updates made for it, all come after that position).
fn allowed_at(rec: &MtRecord, segments: &[(u64, u64, Vec<usize>)], k: usize) -> Vec<Allowed> {
    let horizon = rec
        .events
        .iter()
        .filter(|e| matches!(e.op, MtOp::Flush) && e.end.pos <= k)
        .map(|e| e.start.seq)
        .max()
        .unwrap_or(0);
    let durable = |i: usize| rec.events[i].end.seq < horizon;
    let started = |i: usize| rec.events[i].start.pos < k;
    segments
        .iter()
        .map(|(start, end, cover)| {
            let d: Vec<usize> = cover.iter().copied().filter(|&i| durable(i)).collect();
            let mut events: Vec<usize> = d
                .iter()
                .copied()
                .filter(|&i| {
                    !d.iter()
                        .any(|&j| rec.events[i].end.seq < rec.events[j].start.seq)
                })
                .collect();
            events.extend(cover.iter().copied().filter(|&i| !durable(i) && started(i)));
            Allowed {
                start: *start,
                end: *end,
                events,
                old: d.is_empty(),
            }
        })
        .collect()
}

/// Guest ranges between the boundaries of all writes, each with the events covering it.
fn segments(rec: &MtRecord) -> Vec<(u64, u64, Vec<usize>)> {
    let mut cuts = vec![0, rec.guest0.len() as u64];
    for e in &rec.events {
        if let Some((a, b)) = e.op.range() {
            cuts.extend([a, b]);
        }
    }
    cuts.sort_unstable();
    cuts.dedup();
    cuts.windows(2)
        .map(|w| {
            let cover = rec
                .events
                .iter()
                .enumerate()
                .filter(|(_, e)| e.op.range().is_some_and(|(a, b)| a <= w[0] && w[1] <= b))
                .map(|(i, _)| i)
                .collect();
            (w[0], w[1], cover)
        })
        .collect()
}

fn verify_mt(setup: &Setup, rec: &MtRecord, disk: &[u8], allowed: &[Allowed], k: usize) {
    let s = Arc::new(MemStorage::from_bytes(disk));
    let img = Image::open_storage(s, &setup.opts(true))
        .unwrap_or_else(|e| panic!("MT crash point {k}: read-write open failed: {e}"));
    let r = img.check(CheckFix::NONE).unwrap();
    assert_eq!(
        (r.corruptions, r.leaks, r.check_errors),
        (0, 0, 0),
        "MT crash point {k}: {r:?}"
    );
    assert_eq!(img.size(), setup.size, "MT crash point {k}: size");
    let mut got = vec![0u8; setup.size as usize];
    img.read_at(0, &mut got).unwrap();
    img.close().unwrap();
    for a in allowed {
        let (s, e) = (a.start as usize, a.end as usize);
        // The usual case, one candidate: compare the slices.
        match (a.events.as_slice(), a.old) {
            ([], true) if got[s..e] == rec.guest0[s..e] => continue,
            ([i], false) => {
                if let MtOp::Write(off, d) = &rec.events[*i].op {
                    let o = (a.start - off) as usize;
                    if got[s..e] == d[o..o + e - s] {
                        continue;
                    }
                }
            }
            _ => {}
        }
        for i in a.start..a.end {
            let b = got[i as usize];
            let ok = (a.old && b == rec.guest0[i as usize])
                || a.events.iter().any(|&j| rec.events[j].op.byte(i) == b);
            if !ok {
                let cover: Vec<String> = rec
                    .events
                    .iter()
                    .filter(|e| e.op.range().is_some_and(|(x, y)| x <= i && i < y))
                    .map(|e| format!("  {e}"))
                    .collect();
                let flushes: Vec<String> = rec
                    .events
                    .iter()
                    .filter(|e| matches!(e.op, MtOp::Flush))
                    .map(|e| format!("  {e}"))
                    .collect();
                panic!(
                    "MT crash point {k} (of {} storage ops): guest byte {i:#x} reads {b:#04x}; allowed: {}{:?}\nwrites covering it:\n{}\nflushes:\n{}",
                    rec.ops.len(),
                    if a.old {
                        format!("old {:#04x}, ", rec.guest0[i as usize])
                    } else {
                        String::new()
                    },
                    a.events
                        .iter()
                        .map(|&j| format!("{:#04x}", rec.events[j].op.byte(i)))
                        .collect::<Vec<_>>(),
                    cover.join("\n"),
                    flushes.join("\n")
                );
            }
        }
    }
}

/// Crash states of multi-threaded workloads: the record is a real interleaving of 4 writers
/// and concurrent flushes (a different one each run); every crash point is explored as for the
/// single-threaded workloads and judged against the durability promise (see `allowed_at`).
#[test]
fn crash_states_of_concurrent_writers_and_flushes() {
    let seed = std::env::var("QED_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0xC0C0u64);
    let raw = Arc::new(MemStorage::from_bytes(
        &(0..(4u32 << 20))
            .map(|i| (i % 247) as u8 | 0x40)
            .collect::<Vec<_>>(),
    ));
    let mut total = 0;
    for (i, backing) in [None, Some(raw)].into_iter().enumerate() {
        let setup = Setup {
            cluster_size: 4096,
            table_size: 2,
            size: 2 << 20,
            backing,
            fixed_length: false,
            qemu: None,
        };
        let rec = record_mt(&setup, seed + i as u64, 100);
        let segs = segments(&rec);
        // The interleaving really was concurrent: flushes overlapping writes, and each other.
        let overlapping = |flush_with_flush: bool| {
            rec.events
                .iter()
                .filter(|f| matches!(f.op, MtOp::Flush))
                .filter(|f| {
                    rec.events.iter().any(|w| {
                        matches!(w.op, MtOp::Flush) == flush_with_flush
                            && !std::ptr::eq(*f, w)
                            && w.start.seq < f.end.seq
                            && f.start.seq < w.end.seq
                    })
                })
                .count()
        };
        let (overlaps, flush_overlaps) = (overlapping(false), overlapping(true));
        let flushes = rec
            .events
            .iter()
            .filter(|e| matches!(e.op, MtOp::Flush))
            .count();
        let mut rng = Rng::new((seed ^ 0xFEED) + i as u64);
        let mut plan: Option<(usize, Vec<Allowed>)> = None;
        let n = crash_states(&rec.base, &rec.ops, &mut rng, 4, 1, |k, disk| {
            if plan.as_ref().map(|p| p.0) != Some(k) {
                plan = Some((k, allowed_at(&rec, &segs, k)));
            }
            verify_mt(&setup, &rec, disk, &plan.as_ref().unwrap().1, k);
        });
        println!(
            "crash: {MT_WRITERS} writer threads + flusher, backing={}: {} guest ops ({flushes} flushes: {overlaps} concurrent with writes, {flush_overlaps} with flushes), {} storage ops, {n} crash states explored",
            setup.backing.is_some(),
            rec.events.len(),
            rec.ops.len()
        );
        assert!(
            overlaps > 0 && flush_overlaps > 0,
            "flushes ran concurrently with {overlaps} writes and {flush_overlaps} flushes"
        );
        total += n;
    }
    println!("crash: {total} crash states of concurrent workloads explored");
    assert!(total >= 10_000, "only {total} MT crash states");
}

/// A stream copies the backing file into the overlay and then drops it from the header: at
/// every crash point, the image (with its backing file still named, or without it once the
/// header went out) repairs clean and reads exactly what the chain read before.
#[test]
fn crash_states_during_stream_read_as_the_chain() {
    // Data with zero clusters in between (they become zero clusters) and a zero stretch.
    let mut bytes: Vec<u8> = (0..(2u32 << 20)).map(|i| (i % 253) as u8 | 0x80).collect();
    for (i, c) in bytes.chunks_mut(4096).enumerate() {
        if i % 7 == 3 || (128..192).contains(&i) {
            c.fill(0);
        }
    }
    let raw = Arc::new(MemStorage::from_bytes(&bytes));
    let mut total = 0;
    for (i, (ts, qemu, stride)) in [(1, false, 1), (2, true, 5)].into_iter().enumerate() {
        let setup = Setup {
            cluster_size: 4096,
            table_size: ts,
            size: 2 << 20,
            qemu: qemu.then(|| QemuJudge::new(Some(&raw))),
            backing: Some(raw.clone()),
            fixed_length: false,
        };
        let mut rng = Rng::new(0x57 + i as u64);
        // The overlay's own data: partial clusters (copied on write) and whole ones.
        let prepare = [
            Guest::Write(1000, pattern(&mut rng, 5000)),
            Guest::Write(600 << 10, pattern(&mut rng, 64 << 10)),
            Guest::Write((2 << 20) - 4096, pattern(&mut rng, 4096)),
        ];
        let rec = record(&setup, &prepare, &[Guest::Stream, Guest::Close]);
        let n = explore(&setup, &rec, &mut rng, 16, stride, false);
        println!(
            "crash: stream (4K/ts{ts}, qemu={qemu}): {} storage ops, {n} crash states explored",
            rec.ops.len()
        );
        // The stream's writes: data, entries, the header without the backing file.
        assert!(rec.ops.len() > 20, "{} storage ops", rec.ops.len());
        total += n;
    }
    assert!(total > 500, "only {total} crash states");
}
