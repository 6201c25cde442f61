// SPDX-License-Identifier: MIT OR Apache-2.0
//! Storage-fault sweep: mixed workloads run on a storage that fails one call (the Nth, for
//! every N) with EIO or ENOSPC, once or from then on, sometimes leaving a torn write. The
//! client goes on as a real one would (later calls may succeed), then closes the image or
//! abandons it as a killed process would. A healthy reopen must then succeed read-write,
//! repair to a clean check, and show:
//! - every byte of a write acknowledged before a successful flush (or a successful close);
//! - without a backing file, every byte of every acknowledged write (process death keeps
//!   completed writes, as with QEMU: the kernel holds them);
//! - every other byte with its old value or the value of some write to it, never a third.
//!
//! Also swept: read-write opens that repair an image (a failed open never writes after the
//! fault), explicit repairs, backing-file reads, and the write-back timer.

#[path = "support/rng.rs"]
mod rng;
use qed::storage::{Fault, FaultCalls, FaultMode, FaultStorage, MemStorage, Storage};
use qed::{Backing, BackingFormat, CheckFix, CreateOptions, Image, OpenOptions};
use rng::Rng;
use std::sync::Arc;

const SECTOR: u64 = 512;

#[derive(Clone, Debug)]
enum Op {
    Write { off: u64, len: u64, ver: u32 },
    Zeroes { off: u64, len: u64 },
    Truncate(u64),
    Flush,
    Repair,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Close,
    Abandon,
}

#[derive(Clone)]
struct Setup {
    name: &'static str,
    cluster_size: u32,
    table_size: u32,
    size: u64,
    backing: bool,
    fixed_length: bool,
}

/// Version ids: 0 = the content before the workload (backing bytes or zeros), 1 = zeros, and
/// every write its own id from 2 on, whose bytes are derived from (id, sector).
const BASE: u32 = 0;
const ZERO: u32 = 1;

fn sector_bytes(ver: u32, sector: u64, backing: &[u8]) -> [u8; SECTOR as usize] {
    let mut b = [0u8; SECTOR as usize];
    match ver {
        BASE => {
            let s = (sector * SECTOR) as usize;
            if s < backing.len() {
                let n = (backing.len() - s).min(SECTOR as usize);
                b[..n].copy_from_slice(&backing[s..s + n]);
            }
        }
        ZERO => {}
        v => {
            let mut r = Rng::new(rng::mix(v as u64, sector));
            r.fill(&mut b);
            b[0] = v as u8 | 1; // never a whole zero sector
        }
    }
    b
}

/// Per 512-byte sector, what the guest may see.
#[derive(Clone)]
struct Model {
    /// What a healthy close would leave: the last acknowledged write, or, after a failed
    /// write, it or the failed one.
    cur: Vec<Vec<u32>>,
    /// Everything possible after a crash: `cur` at the last successful flush plus every write
    /// since.
    all: Vec<Vec<u32>>,
    sizes: Vec<u64>,
    size: u64,
}

impl Model {
    fn new(sectors: u64, size: u64) -> Model {
        Model {
            cur: vec![vec![BASE]; sectors as usize],
            all: vec![vec![BASE]; sectors as usize],
            sizes: vec![size],
            size,
        }
    }
    fn write(&mut self, off: u64, len: u64, ver: u32, ok: bool) {
        for s in off / SECTOR..(off + len) / SECTOR {
            let s = s as usize;
            if ok {
                self.cur[s] = vec![ver];
            } else if !self.cur[s].contains(&ver) {
                self.cur[s].push(ver);
            }
            if !self.all[s].contains(&ver) {
                self.all[s].push(ver);
            }
        }
    }
    fn flushed(&mut self) {
        self.all.clone_from(&self.cur);
        self.sizes = vec![self.size];
    }
}

fn base_image(setup: &Setup, rng: &mut Rng) -> (Vec<u8>, Option<Arc<MemStorage>>) {
    let backing = setup.backing.then(|| {
        let mut b = vec![0u8; setup.size as usize];
        rng.fill(&mut b);
        Arc::new(MemStorage::from_bytes(&b))
    });
    let s = Arc::new(MemStorage::new());
    s.set_fixed_length(setup.fixed_length);
    Image::create_on(
        &*s,
        &CreateOptions {
            size: setup.size,
            cluster_size: setup.cluster_size,
            table_size: setup.table_size,
            backing_file: setup.backing.then(|| "base".into()),
            backing_format: setup.backing.then_some(BackingFormat::Raw),
        },
    )
    .unwrap();
    // A first table and some data, so that the workload also writes in place.
    let img = Image::open_storage(s.clone(), &opts(&backing_storage(&backing), true)).unwrap();
    let cs = setup.cluster_size as u64;
    img.write_at(0, &vec![0x11; cs as usize + 1024]).unwrap();
    img.write_at(5 * cs, &vec![0x22; 2048]).unwrap();
    img.close().unwrap();
    (s.to_bytes(), backing)
}

/// The guest's bytes before the workload.
fn guest_bytes(base: &[u8], backing: &Option<Arc<MemStorage>>) -> Vec<u8> {
    let img = Image::open_storage(
        Arc::new(MemStorage::from_bytes(base)),
        &opts(&backing_storage(backing), false),
    )
    .unwrap();
    let mut v = vec![0u8; img.size() as usize];
    img.read_at(0, &mut v).unwrap();
    v
}

fn backing_storage(b: &Option<Arc<MemStorage>>) -> Option<Arc<dyn Storage>> {
    b.as_ref().map(|b| b.clone() as Arc<dyn Storage>)
}

fn opts(backing: &Option<Arc<dyn Storage>>, writable: bool) -> OpenOptions {
    OpenOptions {
        writable,
        backing_resolver: backing.clone().map(|b| {
            Arc::new(move |_: &str, _: Option<BackingFormat>| Ok(Backing::Raw(b.clone())))
                as qed::image::BackingResolver
        }),
        // Deterministic call sequences: no timer (swept on its own below).
        writeback_delay: None,
        need_check_delay: None,
        ..Default::default()
    }
}

fn workload(setup: &Setup, rng: &mut Rng, len: usize) -> Vec<Op> {
    let cs = setup.cluster_size as u64;
    let mut ops = Vec::new();
    let mut ver = 2u32;
    let mut size = setup.size;
    for _ in 0..len {
        let op = match rng.below(100) {
            0..=49 => {
                // Allocating or in-place, often crossing clusters, sector-aligned.
                let cluster = rng.below(size / cs);
                let off = cluster * cs + rng.below(cs / SECTOR) * SECTOR;
                let len = (rng.range(1, (cs / SECTOR) * 2) * SECTOR).min(size - off);
                ver += 1;
                Op::Write { off, len, ver }
            }
            50..=61 => {
                let cluster = rng.below(size / cs);
                let off = cluster * cs + rng.below(2) * 4 * SECTOR;
                let len = (rng.range(1, 3) * cs).min(size - off);
                Op::Zeroes { off, len }
            }
            62..=85 => Op::Flush,
            86..=91 if size < 2 * setup.size => {
                size += 4 * cs;
                Op::Truncate(size)
            }
            _ => Op::Repair,
        };
        ops.push(op);
    }
    ops.push(Op::Flush);
    ops
}

/// Highest end of a data cluster mapped by `img`.
fn mapped_end(img: &Image) -> u64 {
    let cs = img.geometry().cluster_bytes();
    img.map(0, img.size())
        .map(|v| {
            v.iter()
                .filter_map(|e| match e.kind {
                    qed::ExtentKind::Data { host_offset } => {
                        Some((host_offset + e.length).next_multiple_of(cs))
                    }
                    _ => None,
                })
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0)
}

/// Runs `ops` on `img`, going on after errors; returns the model of what must survive.
/// The returned length is what the file may never again be shorter than: its length at a
/// successful flush, or the end of its mapped clusters if that is less (the part past them is
/// room allocated ahead, which close gives back).
fn run(img: &Image, disk: &MemStorage, ops: &[Op], model: &mut Model) -> u64 {
    let mut min_len = 0;
    for op in ops {
        match *op {
            Op::Write { off, len, ver } => {
                if off + len > img.size() {
                    continue;
                }
                let mut buf = Vec::with_capacity(len as usize);
                for s in off / SECTOR..(off + len) / SECTOR {
                    buf.extend_from_slice(&sector_bytes(ver, s, &[]));
                }
                let ok = img.write_at(off, &buf).is_ok();
                model.write(off, len, ver, ok);
            }
            Op::Zeroes { off, len } => {
                if off + len > img.size() {
                    continue;
                }
                let ok = img.write_zeroes(off, len).is_ok();
                model.write(off, len, ZERO, ok);
            }
            Op::Truncate(n) => {
                let old = img.size();
                if n <= old {
                    continue;
                }
                let ok = img.truncate(n).is_ok();
                model.write(old, n - old, ZERO, ok);
                if ok {
                    model.size = n;
                }
                if !model.sizes.contains(&n) {
                    model.sizes.push(n);
                }
            }
            Op::Flush => {
                if img.flush().is_ok() {
                    model.flushed();
                    min_len = min_len.max(mapped_end(img).min(disk.len().unwrap()));
                }
            }
            Op::Repair => {
                // A repair may move clusters down and cut the file: its layout is the new
                // flushed one.
                if img.check(CheckFix::ALL).is_ok() {
                    min_len = mapped_end(img).min(disk.len().unwrap());
                }
            }
        }
    }
    min_len
}

struct Outcome {
    states: usize,
    qemu_checked: usize,
}

#[allow(clippy::too_many_arguments)]
/// Reopens `disk` healthily and verifies it against `model`; `strong` = the acknowledged
/// writes must all be there.
fn verify(
    what: &str,
    setup: &Setup,
    disk: &Arc<MemStorage>,
    backing: &Option<Arc<MemStorage>>,
    base_guest: &[u8],
    model: &Model,
    strong: bool,
    qemu_dir: Option<&std::path::Path>,
) -> bool {
    let bs = backing_storage(backing);
    let img = Image::open_storage(disk.clone(), &opts(&bs, true))
        .unwrap_or_else(|e| panic!("{what}: healthy read-write open failed: {e}"));
    repairs_clean(what, &img);
    let size = img.size();
    assert!(
        model.sizes.contains(&size) || size == model.size,
        "{what}: size {size} is none of {:?}",
        model.sizes
    );
    let mut buf = vec![0u8; size as usize];
    img.read_at(0, &mut buf)
        .unwrap_or_else(|e| panic!("{what}: read after repair failed: {e}"));
    for s in 0..size / SECTOR {
        let got = &buf[(s * SECTOR) as usize..((s + 1) * SECTOR) as usize];
        let allowed = if strong {
            &model.cur[s as usize]
        } else {
            &model.all[s as usize]
        };
        // Sectors past the size at the start read as zeros whatever the model's base says.
        let base_bytes: &[u8] = if s * SECTOR < setup.size {
            base_guest
        } else {
            &[]
        };
        if !allowed
            .iter()
            .any(|&v| got == sector_bytes(v, s, base_bytes))
        {
            panic!(
                "{what}: guest sector {s} (offset {:#x}) holds none of the versions {allowed:?} (strong: {strong}); first bytes {:02x?}",
                s * SECTOR,
                &got[..8]
            );
        }
    }
    img.close().unwrap();
    if let Some(dir) = qemu_dir {
        qemu_check(what, disk, dir);
        return true;
    }
    false
}

/// A repair leaves nothing to fix, and a check after it finds the image clean.
fn repairs_clean(what: &str, img: &Image) {
    let r = img
        .check(CheckFix::ALL)
        .unwrap_or_else(|e| panic!("{what}: repair failed: {e}"));
    assert!(
        r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0,
        "{what}: repair left {r:?}"
    );
    let r = img.check(CheckFix::NONE).unwrap();
    assert!(
        r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0,
        "{what}: not clean after repair: {r:?}"
    );
}

/// `qemu-img check` of the repaired image must agree: no corruptions, no leaks.
fn qemu_check(what: &str, disk: &MemStorage, dir: &std::path::Path) {
    let p = dir.join("img.qed");
    std::fs::write(&p, disk.to_bytes()).unwrap();
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-f", "qed"])
        .arg(&p)
        .output()
        .expect("qemu-img must be installed (scripts/test installs qemu-utils)");
    assert!(
        out.status.success(),
        "{what}: qemu-img check disagrees: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sweep_setup(setup: &Setup, seed: u64, workload_len: usize, qemu_every: usize) -> Outcome {
    let mut rng = Rng::new(seed);
    let (base, backing) = base_image(setup, &mut rng);
    let ops = workload(setup, &mut rng, workload_len);
    let base_guest = guest_bytes(&base, &backing);
    let sectors = (2 * setup.size + 64 * setup.cluster_size as u64) / SECTOR;
    let qemu_dir = tempfile::tempdir().unwrap();
    if let Some(b) = &backing {
        std::fs::write(qemu_dir.path().join("base"), b.to_bytes()).unwrap();
    }
    let fresh = || {
        let s = Arc::new(MemStorage::from_bytes(&base));
        s.set_fixed_length(setup.fixed_length);
        s
    };

    // A healthy run counts the calls to sweep over.
    let calls = {
        let disk = fresh();
        let fs = Arc::new(FaultStorage::new(disk.clone()));
        let img = Image::open_storage(fs.clone(), &opts(&backing_storage(&backing), true)).unwrap();
        let mut m = Model::new(sectors, setup.size);
        run(&img, &disk, &ops, &mut m);
        img.close().unwrap();
        let n = fs.calls();
        verify(
            &format!("{} healthy", setup.name),
            setup,
            &disk,
            &backing,
            &base_guest,
            &m,
            true,
            None,
        );
        n
    };

    let variants = [
        (FaultMode::Once, libc::EIO, false),
        (FaultMode::Once, libc::ENOSPC, true),
        (FaultMode::From, libc::EIO, false),
        (FaultMode::From, libc::ENOSPC, true),
    ];
    let mut out = Outcome {
        states: 0,
        qemu_checked: 0,
    };
    for at in 0..calls + 2 {
        for &(mode, errno, torn) in &variants {
            for end in [End::Close, End::Abandon] {
                let disk = fresh();
                let fs = Arc::new(FaultStorage::new(disk.clone()));
                let bs = backing_storage(&backing);
                let img = Image::open_storage(fs.clone(), &opts(&bs, true)).unwrap();
                fs.arm(
                    Fault::new(FaultCalls::ALL, at, errno)
                        .with_mode(mode)
                        .with_torn(torn),
                );
                let mut model = Model::new(sectors, setup.size);
                let min_len = run(&img, &disk, &ops, &mut model);
                let closed_ok = match end {
                    End::Close => img.close().is_ok(),
                    End::Abandon => false,
                };
                // A killed process writes nothing more; dropping the handle tries to close,
                // which the cut-off storage refuses.
                fs.cut_off();
                drop(img);
                let what = format!(
                    "{} seed {seed}: fault {mode:?} {errno} torn={torn} at call {at} of {calls}, {end:?} (closed ok: {closed_ok})",
                    setup.name
                );
                let len = disk.len().unwrap();
                assert!(
                    len >= min_len,
                    "{what}: the file shrank to {len} bytes below its last flushed cluster end {min_len}"
                );
                // Without a backing file every acknowledged write reached the file (no flush
                // needed to survive the death of the process); with one, only flushed ones.
                let strong = closed_ok || !setup.backing;
                let q = (setup.table_size > 1 && qemu_every > 0 && out.states % qemu_every == 0)
                    .then(|| qemu_dir.path());
                if verify(
                    &what,
                    setup,
                    &disk,
                    &backing,
                    &base_guest,
                    &model,
                    strong,
                    q,
                ) {
                    out.qemu_checked += 1;
                }
                out.states += 1;
            }
        }
    }

    // Backing-file reads that fail (copy-on-write and plain reads): the write fails, nothing
    // is half-mapped.
    if let Some(b) = &backing {
        for at in 0..24 {
            let disk = fresh();
            let fb = Arc::new(FaultStorage::new(b.clone()));
            let bs: Option<Arc<dyn Storage>> = Some(fb.clone());
            let img = Image::open_storage(disk.clone(), &opts(&bs, true)).unwrap();
            fb.arm(Fault::new(FaultCalls::READ, at, libc::EIO));
            let mut model = Model::new(sectors, setup.size);
            run(&img, &disk, &ops, &mut model);
            let mut buf = vec![0u8; 4096];
            let _ = img.read_at(0, &mut buf);
            let closed_ok = img.close().is_ok();
            drop(img);
            let what = format!("{} backing read fault at {at}", setup.name);
            verify(
                &what,
                setup,
                &disk,
                &backing,
                &base_guest,
                &model,
                closed_ok,
                None,
            );
            out.states += 1;
        }
    }
    out
}

fn setups() -> Vec<Setup> {
    vec![
        Setup {
            name: "4k/t1",
            cluster_size: 4096,
            table_size: 1,
            size: 4 << 20,
            backing: false,
            fixed_length: false,
        },
        Setup {
            name: "4k/t2+backing",
            cluster_size: 4096,
            table_size: 2,
            size: 4 << 20,
            backing: true,
            fixed_length: false,
        },
        Setup {
            name: "4k/t2",
            cluster_size: 4096,
            table_size: 2,
            size: 4 << 20,
            backing: false,
            fixed_length: false,
        },
        Setup {
            name: "64k/t4+backing",
            cluster_size: 65536,
            table_size: 4,
            size: 8 << 20,
            backing: true,
            fixed_length: false,
        },
        Setup {
            name: "4k/t1 fixed-length",
            cluster_size: 4096,
            table_size: 1,
            size: 4 << 20,
            backing: false,
            fixed_length: true,
        },
        Setup {
            name: "4k/t2+backing fixed-length",
            cluster_size: 4096,
            table_size: 2,
            size: 4 << 20,
            backing: true,
            fixed_length: true,
        },
    ]
}

#[test]
fn fault_sweep_keeps_acknowledged_data() {
    let mut states = 0;
    let mut qemu = 0;
    for (i, setup) in setups().iter().enumerate() {
        for seed in 0..3u64 {
            let o = sweep_setup(setup, rng::mix(0xfa17, i as u64 * 16 + seed), 18, 60);
            eprintln!(
                "fault sweep {} seed {seed}: {} states, {} judged by qemu-img",
                setup.name, o.states, o.qemu_checked
            );
            states += o.states;
            qemu += o.qemu_checked;
        }
    }
    println!("fault sweep: {states} states, {qemu} judged by qemu-img check too, 0 violations");
    assert!(states >= 10_000, "only {states} fault states explored");
    assert!(qemu >= 50, "only {qemu} states judged by qemu-img");
}

/// An image left dirty by a killed process, with leaked clusters in the middle and at the end
/// (so that repair truncates and moves clusters): its bytes, and the guest bytes it holds.
fn dirty_image(setup: &Setup, seed: u64) -> (Vec<u8>, Option<Arc<MemStorage>>, Vec<u8>) {
    let mut rng = Rng::new(seed);
    let (base, backing) = base_image(setup, &mut rng);
    let disk = Arc::new(MemStorage::from_bytes(&base));
    let cs = setup.cluster_size as u64;
    {
        let fs = Arc::new(FaultStorage::new(disk.clone()));
        let img = Image::open_storage(fs.clone(), &opts(&backing_storage(&backing), true)).unwrap();
        for i in 0..24u64 {
            let off = rng.below(setup.size / cs) * cs + rng.below(4) * SECTOR;
            let n = rng.range(1, 2 * cs / SECTOR) * SECTOR;
            let d = rng.bytes(n);
            let d = &d[..d.len().min((setup.size - off) as usize)];
            img.write_at(off, d).unwrap();
            if i == 12 {
                img.write_zeroes(off & !(cs - 1), cs).unwrap();
            }
        }
        img.flush().unwrap();
        fs.cut_off();
    }
    // Leaks: a cluster no entry points to in the middle (an entry cleared by hand) and two
    // past the end.
    let img = Image::open_storage(
        Arc::new(MemStorage::from_bytes(&disk.to_bytes())),
        &OpenOptions {
            no_repair: true,
            ..opts(&backing_storage(&backing), false)
        },
    )
    .unwrap();
    let victim = img
        .map(0, img.size())
        .unwrap()
        .into_iter()
        .find(|e| matches!(e.kind, qed::ExtentKind::Data { .. }) && e.offset >= cs)
        .expect("some data cluster");
    drop(img);
    let mut bytes = disk.to_bytes();
    {
        // Find the L2 entry by its value and clear it (its guest cluster reads old bytes again).
        let qed::ExtentKind::Data { host_offset } = victim.kind else {
            unreachable!()
        };
        let host = host_offset & !(cs - 1);
        let needle = host.to_le_bytes();
        let pos = (cs as usize..bytes.len())
            .step_by(8)
            .find(|&p| bytes[p..p + 8] == needle)
            .expect("the entry");
        bytes[pos..pos + 8].fill(0);
    }
    let end = bytes.len().next_multiple_of(cs as usize);
    bytes.resize(end + 2 * cs as usize, 0x5a);
    let guest = guest_bytes(&bytes, &backing);
    (bytes, backing, guest)
}

fn check_guest(what: &str, img: &Image, want: &[u8]) {
    let mut got = vec![0u8; want.len()];
    img.read_at(0, &mut got)
        .unwrap_or_else(|e| panic!("{what}: read failed: {e}"));
    if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
        panic!("{what}: guest byte {i:#x} changed by the repair");
    }
}

fn healthy_reopen(
    what: &str,
    disk: &Arc<MemStorage>,
    backing: &Option<Arc<MemStorage>>,
    want: &[u8],
) {
    let img = Image::open_storage(disk.clone(), &opts(&backing_storage(backing), true))
        .unwrap_or_else(|e| panic!("{what}: healthy read-write open failed: {e}"));
    check_guest(what, &img, want);
    repairs_clean(what, &img);
    check_guest(what, &img, want);
    img.close().unwrap();
}

/// Read-write opens (which repair the dirty image) and explicit repairs, with a fault at every
/// call: a failed open writes nothing after the fault (so one that fails before its repair
/// began leaves the file byte-identical), and no guest byte is ever lost.
fn sweep_repair(setup: &Setup, seed: u64) -> usize {
    let (bytes, backing, guest) = dirty_image(setup, seed);
    let bs = backing_storage(&backing);
    let count = |explicit: bool| {
        let disk = Arc::new(MemStorage::from_bytes(&bytes));
        let fs = Arc::new(FaultStorage::new(disk.clone()));
        let o = OpenOptions {
            no_repair: explicit,
            ..opts(&bs, true)
        };
        let img = Image::open_storage(fs.clone(), &o).unwrap();
        if explicit {
            let r = img.check(CheckFix::ALL).unwrap();
            assert!(
                r.leaks_fixed >= 3,
                "{}: the dirty image has leaks: {r:?}",
                setup.name
            );
        }
        img.close().unwrap();
        fs.calls()
    };
    let mut states = 0;
    for explicit in [false, true] {
        let calls = count(explicit);
        for at in 0..calls {
            for (mode, errno, torn) in [
                (FaultMode::Once, libc::EIO, false),
                (FaultMode::From, libc::EIO, false),
                (FaultMode::Once, libc::ENOSPC, true),
            ] {
                let disk = Arc::new(MemStorage::from_bytes(&bytes));
                let fs = Arc::new(FaultStorage::new(disk.clone()));
                let what = format!(
                    "{} seed {seed}: {} with fault {mode:?} {errno} at call {at} of {calls}",
                    setup.name,
                    if explicit { "repair" } else { "open" }
                );
                let o = OpenOptions {
                    no_repair: explicit,
                    ..opts(&bs, true)
                };
                if !explicit {
                    fs.arm(
                        Fault::new(FaultCalls::ALL, at, errno)
                            .with_mode(mode)
                            .with_torn(torn),
                    );
                }
                match Image::open_storage(fs.clone(), &o) {
                    Err(_) => {
                        assert_eq!(
                            fs.changed_after_fault(),
                            0,
                            "{what}: the failed open wrote after the fault"
                        );
                    }
                    Ok(img) => {
                        let mut failed = false;
                        if explicit {
                            fs.arm(
                                Fault::new(FaultCalls::ALL, at, errno)
                                    .with_mode(mode)
                                    .with_torn(torn),
                            );
                            failed = img.check(CheckFix::ALL).is_err();
                        }
                        fs.disarm();
                        if failed {
                            // The handle has failed: it refuses requests and writes nothing
                            // more, not even at close.
                            let before = disk.to_bytes();
                            let mut b = [0u8; 1];
                            assert!(
                                img.read_at(0, &mut b).is_err(),
                                "{what}: failed handle read"
                            );
                            assert!(
                                img.write_at(0, b"x").is_err(),
                                "{what}: failed handle wrote"
                            );
                            assert!(img.flush().is_err(), "{what}: failed handle flushed");
                            assert!(img.close().is_err(), "{what}: failed handle closed cleanly");
                            assert!(
                                disk.to_bytes() == before,
                                "{what}: failed handle changed the file"
                            );
                        } else {
                            check_guest(&what, &img, &guest);
                            img.close().unwrap();
                        }
                    }
                }
                healthy_reopen(&what, &disk, &backing, &guest);
                states += 1;
            }
        }
    }
    states
}

#[test]
fn open_and_repair_under_faults_never_lose_data() {
    let mut states = 0;
    for (i, setup) in setups().iter().enumerate() {
        let n = sweep_repair(setup, rng::mix(0x0be7, i as u64));
        eprintln!("open/repair sweep {}: {n} states", setup.name);
        states += n;
    }
    println!("open/repair fault sweep: {states} states, 0 violations");
    assert!(states >= 1_000, "only {states} open/repair fault states");
}

/// With a backing file, new entries wait in memory for a flush or the write-back timer: a
/// process killed after the delay keeps its completed (unflushed) allocating writes; without
/// the timer it would lose them (the control). A timer write-back that fails fails the handle.
#[test]
fn writeback_timer_bounds_what_process_death_loses() {
    let setup = &setups()[1]; // 4k/t2+backing
    let mut rng = Rng::new(7);
    let (base, backing) = base_image(setup, &mut rng);
    let guest0 = guest_bytes(&base, &backing);
    let bs = backing_storage(&backing);
    let cs = setup.cluster_size as u64;
    let kept = |delay: Option<std::time::Duration>| -> usize {
        let disk = Arc::new(MemStorage::from_bytes(&base));
        let fs = Arc::new(FaultStorage::new(disk.clone()));
        let img = Image::open_storage(
            fs.clone(),
            &OpenOptions {
                writeback_delay: delay,
                ..opts(&bs, true)
            },
        )
        .unwrap();
        for i in 0..8u64 {
            img.write_at((20 + 3 * i) * cs + 512, &[0x40 + i as u8; 1024])
                .unwrap();
        }
        // Well past the delay (and its write-back, two flushes of a small file).
        std::thread::sleep(std::time::Duration::from_millis(400));
        fs.cut_off(); // the process dies: nothing more reaches the file
        drop(img);
        let img = Image::open_storage(disk, &opts(&bs, true)).unwrap();
        let mut n = 0;
        for i in 0..8u64 {
            let at = (20 + 3 * i) * cs;
            let mut got = vec![0u8; cs as usize];
            img.read_at(at, &mut got).unwrap();
            let mut want = guest0[at as usize..(at + cs) as usize].to_vec();
            want[512..1536].fill(0x40 + i as u8);
            if got == want {
                n += 1;
            } else {
                assert_eq!(
                    got,
                    guest0[at as usize..(at + cs) as usize],
                    "cluster {i}: neither the old nor the new bytes"
                );
            }
        }
        img.close().unwrap();
        n
    };
    assert_eq!(kept(Some(std::time::Duration::from_millis(20))), 8);
    assert_eq!(
        kept(None),
        0,
        "control: without the timer the entries die with the process"
    );

    // A failing timer write-back fails the handle, and the next request says why.
    let disk = Arc::new(MemStorage::from_bytes(&base));
    let fs = Arc::new(FaultStorage::new(disk.clone()));
    let img = Image::open_storage(
        fs.clone(),
        &OpenOptions {
            writeback_delay: Some(std::time::Duration::from_millis(20)),
            ..opts(&bs, true)
        },
    )
    .unwrap();
    img.write_at(40 * cs, &[9u8; 512]).unwrap();
    fs.arm(Fault::new(FaultCalls::FLUSH, 0, libc::EIO));
    let t0 = std::time::Instant::now();
    while fs.fired() == 0 && t0.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(fs.fired(), 1, "the timer never flushed");
    // The failure is recorded by the timer thread right after the flush returns.
    let mut e = None;
    for _ in 0..200 {
        match img.write_at(0, &[1u8; 512]) {
            Err(err) => {
                e = Some(err);
                break;
            }
            Ok(()) => std::thread::sleep(std::time::Duration::from_millis(5)),
        }
    }
    let e = e.expect("the handle kept accepting writes after its write-back failed");
    assert!(e.to_string().contains("flushing image"), "{e}");
    assert!(img.flush().is_err());
    assert!(img.close().is_err());
}

/// A process killed right after its writes completed, without a flush or a close: QEMU must
/// see every completed write too. (QEMU takes a file that ends inside a cluster as ending
/// before it; an entry to such a cluster is "outside the file" to qemu-img check, and QEMU's
/// repair drops it. The allocator keeps the file past whole clusters, so that never happens.)
#[test]
fn completed_writes_survive_process_death_for_qemu_too() {
    // Also with O_DIRECT, where table writes go through a second, buffered descriptor.
    for direct in [false, true] {
        completed_writes_survive_process_death(direct);
    }
}

fn completed_writes_survive_process_death(direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("killed.qed");
    let what = if direct { "O_DIRECT" } else { "page cache" };
    Image::create(
        &p,
        &CreateOptions {
            size: 8 << 20,
            cluster_size: 4096,
            table_size: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let img = Image::open(
        &p,
        &OpenOptions {
            direct,
            ..OpenOptions::read_write()
        },
    )
    .unwrap();
    img.write_at(0, &[0x5a; 512]).unwrap();
    img.write_at(8192, &[0x5b; 512]).unwrap();
    img.write_at(3 << 20, &[0x5c; 1024]).unwrap();
    // A killed process: no close, no flush, no thread left behind (no backing file).
    std::mem::forget(img);
    let check = std::process::Command::new("qemu-img")
        .args(["check", "-f", "qed", "-U"])
        .arg(&p)
        .output()
        .expect("qemu-img must be installed");
    // 0 clean, 3 leaks only (the allocator's stretch past the last cluster); 2 = corruption.
    assert!(
        matches!(check.status.code(), Some(0) | Some(3)),
        "{what}: qemu-img check of the killed image: {:?} {}",
        check.status.code(),
        String::from_utf8_lossy(&check.stdout)
    );
    for (off, len, pat) in [(0u64, 512, 0x5a), (8192, 512, 0x5b), (3 << 20, 1024, 0x5c)] {
        let out = std::process::Command::new("qemu-io")
            .args(["-f", "qed", "-r", "-U", "-c"])
            .arg(format!("read -P {pat} {off} {len}"))
            .arg(&p)
            .output()
            .expect("qemu-io must be installed");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && !text.contains("Pattern verification failed"),
            "{what}: qemu-io does not see the completed write at {off:#x}: {text}"
        );
    }
}
