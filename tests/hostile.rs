// SPDX-License-Identifier: MIT OR Apache-2.0
//! Hostile input (issue 4, item 5): a corpus of malformed QED images, generated here from small
//! valid bases (made by `Image::create` + `write_at`, a few by `qemu-img create`), each opened
//! through the Rust API (read-only and read-write) and the C API (`qed_open`).
//!
//! Every case runs in a child process (this test binary re-executed with `--ignored --exact
//! hostile_child` and the case in environment variables), which reports what happened and its
//! own `getrusage`. For each case:
//! - refused: the errno is the expected one (-EINVAL, -ENOTSUP, -EACCES; -ENOENT for a missing
//!   backing file), `qed_last_error()` and the Rust error name the field, and the file is
//!   unchanged after every open attempt, read-only and read-write;
//! - opened: the whole image (a sample of ranges for huge ones) reads without a panic, failing
//!   only with `Error::Corrupt`; `check(NONE)` reports the damage; the file is unchanged after
//!   the read-only opens; a read-write open + `check(ALL)` leaves an image that checks clean,
//!   reads without errors, and that `qemu-img check` accepts where QEMU can open the geometry;
//!   a guest write through a corrupt entry fails and leaves the metadata alone;
//! - always: no panic, peak RSS < 64 MiB, CPU < 1 s (debug build).
//!
//! A summary table is written to stderr (uncaptured) at the end.

mod hostile_support;

use hostile_support::*;
use qed::capi::image::{qed_close, qed_image, qed_open, QED_OPEN_CONFINE_BACKING, QED_OPEN_RDWR};
use qed::capi::version::qed_last_error;
use qed::OpenOptions;
use qed::{BackingFormat, BackingPolicy, CheckFix, CheckResult, CreateOptions, Error, Image};
use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const RSS_LIMIT_KIB: u64 = 64 * 1024;
const CPU_LIMIT_S: f64 = 1.0;
const CHILD_TIMEOUT: Duration = Duration::from_secs(60);
/// Images up to this virtual size are read whole; larger ones are sampled.
const READ_WHOLE_LIMIT: u64 = 256 * MIB;

const EINVAL: i32 = libc::EINVAL;
const ENOTSUP: i32 = libc::ENOTSUP;
const EACCES: i32 = libc::EACCES;
const ENOENT: i32 = libc::ENOENT;

// ------------------------------------------------------------------------------------------
// The corpus
// ------------------------------------------------------------------------------------------

/// What `check(CheckFix::NONE)` must report on the image as given.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Chk {
    Clean,
    Corrupt,
    Leaks,
}

#[derive(Clone, Debug)]
enum Expect {
    /// Every open fails with one of `errnos`, and the messages contain every needle.
    Refused {
        errnos: &'static [i32],
        needles: &'static [&'static str],
    },
    /// The image opens; `qemu`: `qemu-img check` must accept it after our repair.
    Opened { check: Chk, qemu: bool },
}

fn refused(errnos: &'static [i32], needles: &'static [&'static str]) -> Expect {
    Expect::Refused { errnos, needles }
}
fn opened(check: Chk, qemu: bool) -> Expect {
    Expect::Opened { check, qemu }
}

/// Case-specific facts to verify.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Extra {
    None,
    /// Unknown autoclear bits: kept by read-only opens, cleared by a read-write open.
    AutoclearCleared,
    /// Unknown compat bits: ignored, kept as they are.
    CompatKept(u64),
}

struct Case {
    name: String,
    file: PathBuf,
    /// Open with `BackingPolicy::SameDirectory` / `QED_OPEN_CONFINE_BACKING`.
    confine: bool,
    expect: Expect,
    /// A guest offset whose mapping is corrupt: a 4 KiB write there must fail with Corrupt and
    /// leave the file's metadata as it was.
    probe: Option<u64>,
    /// The image must read, at guest offset 0, the first bytes of this file (its backing file).
    prefix: Option<PathBuf>,
    extra: Extra,
    /// A well-formed control, not counted as a hostile image.
    control: bool,
}

impl Case {
    fn probe(&mut self, at: u64) -> &mut Self {
        self.probe = Some(at);
        self
    }
    fn confine(&mut self) -> &mut Self {
        self.confine = true;
        self
    }
    fn prefix(&mut self, p: impl Into<PathBuf>) -> &mut Self {
        self.prefix = Some(p.into());
        self
    }
    fn extra(&mut self, e: Extra) -> &mut Self {
        self.extra = e;
        self
    }
    fn control(&mut self) -> &mut Self {
        self.control = true;
        self
    }
}

struct Corpus {
    dir: PathBuf,
    cases: Vec<Case>,
}

impl Corpus {
    fn case_dir(&self, name: &str) -> PathBuf {
        let d = self.dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Registers `file` (already written) as case `name`.
    fn push(&mut self, name: &str, file: PathBuf, expect: Expect) -> &mut Case {
        assert!(
            self.cases.iter().all(|c| c.name != name),
            "duplicate case {name}"
        );
        self.cases.push(Case {
            name: name.to_owned(),
            file,
            confine: false,
            expect,
            probe: None,
            prefix: None,
            extra: Extra::None,
            control: false,
        });
        self.cases.last_mut().unwrap()
    }

    /// Writes `bytes` as `<dir>/<name>/img.qed`.
    fn add(&mut self, name: &str, bytes: &[u8], expect: Expect) -> &mut Case {
        let file = self.case_dir(name).join("img.qed");
        std::fs::write(&file, bytes).unwrap();
        self.push(name, file, expect)
    }

    /// A copy of `base` patched by `patch`.
    fn patched(
        &mut self,
        name: &str,
        base: &[u8],
        expect: Expect,
        patch: impl FnOnce(&mut Vec<u8>, Layout),
    ) -> &mut Case {
        let mut b = base.to_vec();
        patch(&mut b, Layout::of(base));
        self.add(name, &b, expect)
    }
}

/// Guest writes of the bases: (offset, length, pattern byte).
const W64K: &[(u64, usize, u8)] = &[
    (0, 65536, 0xa1),
    (200 * KIB, 10 * KIB as usize, 0xa2),
    (63 * MIB, 65536, 0xa3),
];
const W4K: &[(u64, usize, u8)] = &[
    (0, 4096, 0xb1),
    (8192, 4096, 0xb2),
    (4 * MIB + 4096, 4096, 0xb3),
    (40 * MIB, 4096, 0xb4),
];

fn write_data(p: &Path, writes: &[(u64, usize, u8)]) {
    let img = Image::open(p, &OpenOptions::read_write()).unwrap();
    for &(off, len, byte) in writes {
        img.write_at(off, &pattern(byte, len)).unwrap();
    }
    img.close().unwrap();
}

fn create(p: &Path, size: u64, cs: u32, ts: u32, backing: Option<&str>) {
    Image::create(
        p,
        &CreateOptions {
            size,
            cluster_size: cs,
            table_size: ts,
            backing_file: backing.map(str::to_owned),
            backing_format: backing.map(|_| BackingFormat::Qed),
        },
    )
    .unwrap();
}

fn run_tool(prog: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog} ({e}); install qemu-utils"));
    out
}

fn tool_ok(prog: &str, args: &[&str]) {
    let out = run_tool(prog, args);
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

struct Bases {
    /// 64 KiB clusters, table 4 (QEMU's defaults), 64 MiB: one L2 table, three data clusters.
    b64k: Vec<u8>,
    /// 4 KiB clusters, table 2 (1024 entries, 4 MiB per L2 table), 64 MiB: three L2 tables.
    b4k: Vec<u8>,
    /// As `b4k`, with a two-cluster header (so there are aligned offsets inside the header).
    b4k_h2: Vec<u8>,
    /// 64 KiB clusters, 64 MiB, nothing written (for backing files: every cluster reads
    /// through).
    empty64k: Vec<u8>,
    /// `qemu-img create -f qed x 64M`.
    qemu: Vec<u8>,
    /// The same, after `qemu-io -c 'write -P 0x11 0 64k'`.
    qemu_written: Vec<u8>,
}

fn make_bases(dir: &Path) -> Bases {
    let d = dir.join("bases");
    std::fs::create_dir_all(&d).unwrap();
    let b64k = d.join("b64k.qed");
    create(&b64k, 64 * MIB, 65536, 4, None);
    write_data(&b64k, W64K);
    let e64k = d.join("empty64k.qed");
    create(&e64k, 64 * MIB, 65536, 4, None);
    let b4k = d.join("b4k.qed");
    create(&b4k, 64 * MIB, 4096, 2, None);
    write_data(&b4k, W4K);
    let h2 = d.join("b4k_h2.qed");
    std::fs::write(&h2, raw_image(4096, 2, 2, 64 * MIB)).unwrap();
    write_data(&h2, W4K);
    let q = d.join("qemu.qed");
    tool_ok("qemu-img", &["create", "-q", "-f", "qed", p(&q), "64M"]);
    let qw = d.join("qemu_written.qed");
    tool_ok("qemu-img", &["create", "-q", "-f", "qed", p(&qw), "64M"]);
    tool_ok("qemu-io", &["-c", "write -P 0x11 0 64k", p(&qw)]);
    let rd = |p: &Path| std::fs::read(p).unwrap();
    Bases {
        b64k: rd(&b64k),
        b4k: rd(&b4k),
        b4k_h2: rd(&h2),
        empty64k: rd(&e64k),
        qemu: rd(&q),
        qemu_written: rd(&qw),
    }
}

fn set32(b: &mut [u8], at: usize, v: u32) {
    put_u32(b, at, v)
}
fn set64(b: &mut [u8], at: usize, v: u64) {
    put_u64(b, at as u64, v)
}

fn build_corpus(dir: &Path) -> Corpus {
    let bases = make_bases(dir);
    let mut c = Corpus {
        dir: dir.to_path_buf(),
        cases: Vec::new(),
    };
    let b64 = &bases.b64k;
    let b4 = &bases.b4k;
    let h2 = &bases.b4k_h2;

    // Controls: the bases themselves.
    c.add("ctl_base64k", b64, opened(Chk::Clean, true))
        .control();
    c.add("ctl_base4k", b4, opened(Chk::Clean, true)).control();
    c.add("ctl_base4k_header2", h2, opened(Chk::Clean, true))
        .control();
    c.add("ctl_qemu_base", &bases.qemu, opened(Chk::Clean, true))
        .control();

    // --- Header fields -----------------------------------------------------------------
    c.patched(
        "magic_bad",
        &bases.qemu,
        refused(&[EINVAL], &["magic"]),
        |b, _| b[0..4].copy_from_slice(b"QEX\0"),
    );
    for (name, v) in [
        ("cluster_size_0", 0),
        ("cluster_size_512", 512),
        ("cluster_size_1000", 1000),
        ("cluster_size_69632", 69632),
        ("cluster_size_2p31", 1 << 31),
        ("cluster_size_u32max", u32::MAX),
    ] {
        c.patched(name, b64, refused(&[EINVAL], &["cluster_size"]), |b, _| {
            set32(b, off::CLUSTER_SIZE, v)
        });
    }
    for (name, v) in [
        ("table_size_0", 0),
        ("table_size_3", 3),
        ("table_size_32", 32),
        ("table_size_u32max", u32::MAX),
    ] {
        c.patched(name, b64, refused(&[EINVAL], &["table_size"]), |b, _| {
            set32(b, off::TABLE_SIZE, v)
        });
    }
    // QEMU opens header_size 0 and its check then calls the header a leak.
    c.patched(
        "header_size_0_qemu",
        &bases.qemu,
        refused(&[EINVAL], &["header_size"]),
        |b, _| set32(b, off::HEADER_SIZE, 0),
    );
    c.patched(
        "header_size_0",
        b64,
        refused(&[EINVAL], &["header_size"]),
        |b, _| set32(b, off::HEADER_SIZE, 0),
    );
    c.patched(
        "header_size_1000",
        b64,
        refused(&[EINVAL], &["header_size"]),
        |b, _| set32(b, off::HEADER_SIZE, 1000),
    );
    c.patched(
        "header_size_u32max",
        b64,
        refused(&[EINVAL], &["header_size"]),
        |b, _| set32(b, off::HEADER_SIZE, u32::MAX),
    );
    // CVE-2014-0143 shape: header_size * cluster_size is 2^58 (overflows u32, not u64).
    c.patched(
        "header_size_u32max_x_64m_clusters",
        b64,
        refused(&[EINVAL], &["header_size"]),
        |b, _| {
            set32(b, off::CLUSTER_SIZE, 64 << 20);
            set32(b, off::HEADER_SIZE, u32::MAX);
        },
    );
    for (name, v) in [
        ("features_bit40", 1u64 << 40),
        ("features_bit3", 1 << 3),
        ("features_all_ones", u64::MAX),
    ] {
        c.patched(name, b64, refused(&[ENOTSUP], &["features"]), |b, _| {
            set64(b, off::FEATURES, v)
        });
    }
    let compat = 1 | (1u64 << 63);
    c.patched(
        "compat_unknown_bits",
        b64,
        opened(Chk::Clean, true),
        |b, _| set64(b, off::COMPAT, compat),
    )
    .extra(Extra::CompatKept(compat));
    c.patched(
        "autoclear_unknown_bits",
        b64,
        opened(Chk::Clean, true),
        |b, _| set64(b, off::AUTOCLEAR, 1 | (1 << 7) | (1 << 63)),
    )
    .extra(Extra::AutoclearCleared);

    let l1_bad = refused(&[EINVAL], &["l1_table_offset"]);
    for (name, v) in [
        ("l1_offset_0", 0u64),
        ("l1_offset_unaligned", 65536 + 512),
        ("l1_offset_past_eof", GIB),
        ("l1_offset_wrapping", 0xffff_ffff_ffff_0000),
        ("l1_offset_negative_i64", 1 << 63),
    ] {
        c.patched(name, b64, l1_bad.clone(), |b, _| {
            set64(b, off::L1_OFFSET, v)
        });
    }
    c.patched("l1_offset_straddles_eof", b64, l1_bad.clone(), |b, l| {
        // Aligned and inside the file, but the 4-cluster table ends past EOF.
        let last = b.len() as u64 - l.cs;
        set64(b, off::L1_OFFSET, last)
    });
    c.patched("l1_offset_inside_header", h2, l1_bad.clone(), |b, _| {
        set64(b, off::L1_OFFSET, 4096)
    });

    let size_bad = refused(&[EINVAL], &["image_size"]);
    for (name, v) in [
        ("image_size_not_512", 64 * MIB + 100),
        ("image_size_2p62", 1 << 62),
        ("image_size_u64max", u64::MAX),
        ("image_size_max_plus_512", (1 << 46) + 512),
    ] {
        c.patched(name, b64, size_bad.clone(), |b, _| {
            set64(b, off::IMAGE_SIZE, v)
        });
    }
    c.patched("image_size_0", b64, opened(Chk::Clean, true), |b, _| {
        set64(b, off::IMAGE_SIZE, 0)
    });
    // Exactly the maximum for 64 KiB clusters x 4: 2^46 (64 TiB).
    c.patched(
        "image_size_max_64tib",
        b64,
        opened(Chk::Clean, true),
        |b, _| set64(b, off::IMAGE_SIZE, 1 << 46),
    );

    // --- Backing file names (CVE-2014-0144/0145, CVE-2024-4467, OpenStack host-file CVEs) ---
    let bf = refused(&[EINVAL], &["backing_filename"]);
    c.patched("backing_offset_outside_header", b64, bf.clone(), |b, _| {
        set64(b, off::FEATURES, F_BACKING);
        set32(b, off::BACKING_OFFSET, 65530);
        set32(b, off::BACKING_SIZE, 10);
    });
    c.patched("backing_size_u32max", b64, bf.clone(), |b, _| {
        set64(b, off::FEATURES, F_BACKING);
        set32(b, off::BACKING_OFFSET, 64);
        set32(b, off::BACKING_SIZE, u32::MAX);
    });
    c.patched("backing_offset_u32max", b64, bf.clone(), |b, _| {
        set64(b, off::FEATURES, F_BACKING);
        set32(b, off::BACKING_OFFSET, u32::MAX);
        set32(b, off::BACKING_SIZE, 1);
    });
    c.patched(
        "backing_size_5000_large_header",
        h2,
        refused(&[EINVAL], &["backing_filename_size"]),
        |b, _| set_backing(b, &[b'a'; 5000], 0),
    );
    c.patched(
        "backing_size_0",
        b64,
        refused(&[EINVAL], &["backing_filename_size"]),
        |b, _| {
            set64(b, off::FEATURES, F_BACKING);
            set32(b, off::BACKING_OFFSET, 64);
            set32(b, off::BACKING_SIZE, 0);
        },
    );
    c.patched(
        "backing_name_nul",
        b64,
        refused(&[EINVAL], &["backing_filename", "NUL"]),
        |b, _| set_backing(b, b"ba\0se.raw", F_NO_PROBE),
    );
    c.patched("backing_name_not_utf8", b64, bf.clone(), |b, _| {
        set_backing(b, b"\xff\xfebase", 0)
    });
    let proto = refused(&[ENOTSUP], &["backing_filename", "protocol"]);
    c.patched("backing_json", b64, proto.clone(), |b, _| {
        set_backing(b, br#"json:{"driver":"file","filename":"/etc/passwd"}"#, 0)
    });
    c.patched("backing_nbd", b64, proto.clone(), |b, _| {
        set_backing(b, b"nbd:localhost:1", 0)
    });
    c.patched("backing_file_protocol", b64, proto.clone(), |b, _| {
        set_backing(b, b"file:/etc/passwd", 0)
    });
    // QEMU-compatible by default: an absolute name is followed (QEMU reads host /etc/passwd).
    c.patched(
        "backing_etc_passwd",
        &bases.empty64k,
        opened(Chk::Clean, true),
        |b, _| set_backing(b, b"/etc/passwd", 0),
    )
    .prefix("/etc/passwd");
    c.patched(
        "backing_etc_passwd_confined",
        b64,
        refused(&[EACCES], &["/etc/passwd", "refused"]),
        |b, _| set_backing(b, b"/etc/passwd", 0),
    )
    .confine();
    for (name, confine) in [("backing_dotdot", false), ("backing_dotdot_confined", true)] {
        let d = c.case_dir(name);
        std::fs::create_dir_all(d.join("sub")).unwrap();
        let outside = d.join("x.raw");
        std::fs::write(&outside, b"ESCAPED-THE-IMAGE-FOLDER").unwrap();
        let mut b = bases.empty64k.clone();
        set_backing(&mut b, b"../x.raw", F_NO_PROBE);
        let file = d.join("sub").join("img.qed");
        std::fs::write(&file, &b).unwrap();
        if confine {
            c.push(name, file, refused(&[EACCES], &["../x.raw", "refused"]))
                .confine();
        } else {
            c.push(name, file, opened(Chk::Clean, true)).prefix(outside);
        }
    }
    c.patched(
        "backing_dev_zero",
        b64,
        refused(&[EACCES], &["/dev/zero", "not a regular file"]),
        |b, _| set_backing(b, b"/dev/zero", F_NO_PROBE),
    );
    c.patched(
        "backing_directory",
        b64,
        refused(&[EACCES], &["not a regular file"]),
        |b, _| set_backing(b, b".", F_NO_PROBE),
    );
    {
        // The backing file is a QED image with a bad header: the error names its field.
        let name = "backing_image_bad_header";
        let d = c.case_dir(name);
        let mut bad = b64.clone();
        set32(&mut bad, off::CLUSTER_SIZE, 0);
        std::fs::write(d.join("b.qed"), &bad).unwrap();
        let mut b = bases.empty64k.clone();
        set_backing(&mut b, b"b.qed", 0);
        std::fs::write(d.join("img.qed"), &b).unwrap();
        c.push(
            name,
            d.join("img.qed"),
            refused(&[EINVAL], &["b.qed", "cluster_size"]),
        );
        // CVE-2008-2004: a raw backing file that starts with QED's magic is read as raw when
        // the header says so (no-probe bit), never probed into a QED image.
        let name = "backing_raw_with_qed_magic";
        let d = c.case_dir(name);
        let mut fake = b64[..4096].to_vec();
        set_backing(&mut fake, b"/etc/passwd", 0);
        std::fs::write(d.join("disk.raw"), &fake).unwrap();
        let mut b = bases.empty64k.clone();
        set_backing(&mut b, b"disk.raw", F_NO_PROBE);
        std::fs::write(d.join("img.qed"), &b).unwrap();
        c.push(name, d.join("img.qed"), opened(Chk::Clean, true))
            .prefix(d.join("disk.raw"));
        // A symbolic link inside the folder that leads out of it.
        let name = "backing_symlink_escape_confined";
        let d = c.case_dir(name);
        std::fs::create_dir_all(d.join("sub")).unwrap();
        std::fs::write(d.join("x.raw"), b"outside").unwrap();
        std::os::unix::fs::symlink("../x.raw", d.join("sub").join("link.raw")).unwrap();
        let mut b = bases.empty64k.clone();
        set_backing(&mut b, b"link.raw", F_NO_PROBE);
        std::fs::write(d.join("sub").join("img.qed"), &b).unwrap();
        c.push(
            name,
            d.join("sub").join("img.qed"),
            refused(&[EACCES], &["link.raw", "refused"]),
        )
        .confine();
    }
    c.patched(
        "backing_missing",
        b64,
        refused(&[ENOENT], &["backing file", "missing.raw"]),
        |b, _| set_backing(b, b"missing.raw", F_NO_PROBE),
    );
    {
        let d = c.case_dir("backing_loop_a_b_a");
        create(&d.join("img.qed"), MIB, 4096, 2, Some("b.qed"));
        create(&d.join("b.qed"), MIB, 4096, 2, Some("img.qed"));
        c.push(
            "backing_loop_a_b_a",
            d.join("img.qed"),
            refused(&[EINVAL], &["backing_filename", "loops"]),
        );
        let d = c.case_dir("backing_self");
        create(&d.join("img.qed"), MIB, 4096, 2, Some("img.qed"));
        c.push(
            "backing_self",
            d.join("img.qed"),
            refused(&[EINVAL], &["backing_filename", "loops"]),
        );
    }
    // A chain of `n` backing files below the top image.
    let chain = |c: &mut Corpus, name: &str, n: usize| -> PathBuf {
        let d = c.case_dir(name);
        for i in (0..=n).rev() {
            let f = if i == 0 {
                "img.qed".to_owned()
            } else {
                format!("b{i}.qed")
            };
            let below = format!("b{}.qed", i + 1);
            create(&d.join(&f), MIB, 4096, 2, (i < n).then_some(&*below));
        }
        d.join("img.qed")
    };
    let f = chain(&mut c, "backing_chain_20", 20);
    c.push(
        "backing_chain_20",
        f,
        refused(&[ENOTSUP], &["backing_filename", "deeper than 16"]),
    );
    let f = chain(&mut c, "ctl_backing_chain_16", 16);
    c.push("ctl_backing_chain_16", f, opened(Chk::Clean, true))
        .control();

    // --- Truncated files and huge claims ----------------------------------------------------
    c.add("trunc_zero_length", &[], refused(&[EINVAL], &["header"]));
    c.add(
        "trunc_40_bytes",
        &b64[..40],
        refused(&[EINVAL], &["header"]),
    );
    c.add(
        "trunc_64_bytes",
        &b64[..64],
        refused(&[EINVAL], &["header_size"]),
    );
    c.add(
        "trunc_inside_l1",
        &b64[..(64 * KIB + 100 * KIB) as usize],
        l1_bad.clone(),
    );
    c.add(
        "trunc_inside_l1_qemu",
        &bases.qemu[..(100 * KIB) as usize],
        l1_bad.clone(),
    );
    // A 4 KiB file that claims 4 TiB.
    let t16 = raw_image(4096, 16, 1, 4 * TIB);
    c.add("tiny_4k_file_claims_4tib", &t16[..4096], l1_bad.clone());
    // 4 TiB with its (empty) L1 table present: 320 KiB of file at QEMU's default geometry.
    c.add(
        "huge_4tib_in_320k_file",
        &raw_image(65536, 4, 1, 4 * TIB),
        opened(Chk::Clean, true),
    );
    {
        // 64 MiB clusters x 16: 1 GiB tables, the largest u64 size, in a sparse 1088 MiB file.
        let name = "table_1gib_sparse";
        let hdr = raw_image(4096, 1, 1, 0);
        let mut h = hdr[..64].to_vec();
        set32(&mut h, off::CLUSTER_SIZE, 64 << 20);
        set32(&mut h, off::TABLE_SIZE, 16);
        set64(&mut h, off::L1_OFFSET, 64 << 20);
        set64(&mut h, off::IMAGE_SIZE, !511u64);
        let f = c.case_dir(name).join("img.qed");
        write_sparse_image(&f, &h, 17 * (64 << 20)).unwrap();
        c.push(name, f, opened(Chk::Clean, false));
        // 1 MiB clusters x 16 with 2^62 bytes: 2^21 L1 entries (16 MiB) in use, the most any
        // valid header can make an implementation hold.
        let name = "l1_2m_entries_sparse";
        let mut h = hdr[..64].to_vec();
        set32(&mut h, off::CLUSTER_SIZE, 1 << 20);
        set32(&mut h, off::TABLE_SIZE, 16);
        set64(&mut h, off::L1_OFFSET, 1 << 20);
        set64(&mut h, off::IMAGE_SIZE, 1 << 62);
        let f = c.case_dir(name).join("img.qed");
        write_sparse_image(&f, &h, 17 * MIB).unwrap();
        c.push(name, f, opened(Chk::Clean, true));
        // A valid image whose file is extended to 1 TiB (sparse): 16M leaked clusters.
        let name = "sparse_1tib_file";
        let f = c.case_dir(name).join("img.qed");
        std::fs::write(&f, b64).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&f)
            .unwrap()
            .set_len(TIB)
            .unwrap();
        c.push(name, f, opened(Chk::Leaks, true));
    }

    // --- L1 entries -------------------------------------------------------------------------
    let g2 = 4 * MIB; // a guest offset mapped by the second L2 table of the 4 KiB bases
    let g3 = 8 * MIB; // one whose L1 entry is empty
    let corrupt = opened(Chk::Corrupt, true);
    c.patched("l1e_unaligned", b4, corrupt.clone(), |b, l| {
        let e = l.l1_entry(b, g2);
        set64(b, l.l1_pos(g2) as usize, e + 512)
    })
    .probe(g2 + 4096);
    c.patched("l1e_inside_header", h2, corrupt.clone(), |b, l| {
        set64(b, l.l1_pos(g2) as usize, 4096)
    })
    .probe(g2 + 4096);
    c.patched("l1e_past_eof", b4, corrupt.clone(), |b, l| {
        set64(b, l.l1_pos(g2) as usize, GIB)
    })
    .probe(g2 + 4096);
    c.patched("l1e_table_straddles_eof", b4, corrupt.clone(), |b, l| {
        let last = b.len() as u64 - l.cs;
        set64(b, l.l1_pos(g2) as usize, last)
    })
    .probe(g2 + 4096);
    c.patched("l1e_high_bit", b4, corrupt.clone(), |b, l| {
        set64(b, l.l1_pos(g2) as usize, 1 << 63)
    })
    .probe(g2 + 4096);
    c.patched("l1e_aligned_near_u64max", b4, corrupt.clone(), |b, l| {
        set64(b, l.l1_pos(g2) as usize, !4095u64)
    })
    .probe(g2 + 4096);
    c.patched("l1e_points_at_l1", b4, corrupt.clone(), |b, l| {
        set64(b, l.l1_pos(0) as usize, l.l1)
    })
    .probe(0);
    c.patched("l1e_two_share_one_l2", b4, corrupt.clone(), |b, l| {
        let t = l.l1_entry(b, 0);
        set64(b, l.l1_pos(g3) as usize, t)
    })
    .probe(g3 + 4096);
    c.patched("l1e_overlaps_l2", b4, corrupt.clone(), |b, l| {
        let t = l.l1_entry(b, 0);
        set64(b, l.l1_pos(g3) as usize, t + 4096)
    })
    .probe(g3);
    // QEMU lets a guest write through this one overwrite the L1 table (field notes 5.3).
    c.patched(
        "l1e_points_at_l1_qemu",
        &bases.qemu_written,
        corrupt.clone(),
        |b, l| set64(b, l.l1_pos(0) as usize, l.l1),
    )
    .probe(0);

    // --- L2 entries -------------------------------------------------------------------------
    let l2 = |name: &str, c: &mut Corpus, base: &[u8], v: &dyn Fn(&[u8], Layout) -> u64| {
        c.patched(name, base, opened(Chk::Corrupt, true), |b, l| {
            let (val, at) = (v(b, l), l.l2_pos(b, 0));
            set64(b, at as usize, val)
        })
        .probe(0);
    };
    l2("l2e_unaligned", &mut c, b4, &|b, l| l.l2_entry(b, 0) + 1);
    l2("l2e_u64max", &mut c, b4, &|_, _| u64::MAX);
    l2("l2e_aligned_near_u64max", &mut c, b4, &|_, _| !4095u64);
    l2("l2e_past_eof", &mut c, b4, &|_, _| GIB);
    l2("l2e_high_bit", &mut c, b4, &|_, _| 1 << 63);
    l2("l2e_into_header", &mut c, h2, &|_, _| 4096);
    l2("l2e_into_l1", &mut c, b4, &|_, l| l.l1);
    l2("l2e_into_own_l2", &mut c, b4, &|b, l| l.l1_entry(b, 0));
    l2("l2e_into_other_l2", &mut c, b4, &|b, l| {
        l.l1_entry(b, g2) + 4096
    });
    l2("l2e_into_l1_qemu", &mut c, &bases.qemu_written, &|_, l| {
        l.l1
    });
    c.patched("l2e_two_share_one_cluster", b4, corrupt.clone(), |b, l| {
        let (e, at) = (l.l2_entry(b, 0), l.l2_pos(b, 8192));
        set64(b, at as usize, e)
    });
    c.patched(
        "l1e_garbage_past_virtual_size",
        b4,
        corrupt.clone(),
        |b, l| {
            // 64 MiB uses 16 of the 1024 L1 entries; entry 1000 maps nothing.
            set64(b, (l.l1 + 1000 * 8) as usize, 0x1234_5677)
        },
    );
    // With need-check set, the read-write open itself runs the repair over the bad entry.
    c.patched("need_check_with_l2e_u64max", b4, corrupt.clone(), |b, l| {
        set64(b, off::FEATURES, F_NEED_CHECK);
        let at = l.l2_pos(b, 0);
        set64(b, at as usize, u64::MAX)
    });
    c.patched("need_check_with_bad_l1e", b4, corrupt.clone(), |b, l| {
        set64(b, off::FEATURES, F_NEED_CHECK);
        let e = l.l1_entry(b, g2);
        set64(b, l.l1_pos(g2) as usize, e + 512)
    });

    // --- A refused read-write open must not change the file either -------------------------
    c.patched(
        "autoclear_bits_and_protocol_backing",
        b64,
        refused(&[ENOTSUP], &["backing_filename", "protocol"]),
        |b, _| {
            set64(b, off::AUTOCLEAR, 1 << 9);
            set_backing(b, b"json:{}", 0)
        },
    );
    c.patched(
        "need_check_and_missing_backing",
        b4,
        refused(&[ENOENT], &["backing file", "missing.raw"]),
        |b, l| {
            let e = l.l1_entry(b, g2);
            set64(b, l.l1_pos(g2) as usize, e + 512);
            set_backing(b, b"missing.raw", F_NEED_CHECK | F_NO_PROBE)
        },
    );
    c
}

// ------------------------------------------------------------------------------------------
// The child: opens one image every way and reports what happened
// ------------------------------------------------------------------------------------------

/// Ordered key=value report.
#[derive(Default)]
struct Report(BTreeMap<String, String>);

impl Report {
    fn put(&mut self, k: &str, v: impl ToString) {
        let v = v.to_string().replace(['\n', '\r'], " ");
        self.0.insert(k.to_owned(), v);
    }
    fn text(&self) -> String {
        self.0.iter().map(|(k, v)| format!("{k}={v}\n")).collect()
    }
    fn parse(s: &str) -> Report {
        Report(
            s.lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        )
    }
    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }
    fn is(&self, k: &str, v: &str) -> bool {
        self.get(k) == Some(v)
    }
    fn num(&self, k: &str) -> Option<i64> {
        self.get(k).and_then(|v| v.parse().ok())
    }
}

/// The errno our own reading of the error implies (the C API's mapping is checked against it).
fn rust_errno(e: &Error) -> i32 {
    let e = e.root();
    if matches!(
        e,
        Error::InvalidHeader { .. } | Error::InvalidArgument { .. } | Error::OutOfRange { .. }
    ) {
        EINVAL
    } else if matches!(e, Error::Unsupported { .. }) {
        ENOTSUP
    } else if matches!(e, Error::BackingRefused { .. }) {
        EACCES
    } else if let Error::Io { source, .. } = e {
        source.raw_os_error().unwrap_or(libc::EIO)
    } else {
        libc::EIO
    }
}

fn variant(e: &Error) -> String {
    let d = format!("{:?}", e.root());
    d.split(|c: char| !c.is_alphanumeric())
        .next()
        .unwrap_or("")
        .to_owned()
}

fn open_opts(writable: bool, confine: bool) -> OpenOptions {
    OpenOptions {
        writable,
        backing_policy: if confine {
            BackingPolicy::SameDirectory
        } else {
            BackingPolicy::Any
        },
        ..OpenOptions::default()
    }
}

fn unchanged(before: &Fingerprint, path: &Path, ignore: std::ops::Range<usize>) -> String {
    match fingerprint(path) {
        Ok(after) => diff(before, &after, ignore).unwrap_or_else(|| "yes".into()),
        Err(e) => format!("cannot read file: {e}"),
    }
}

fn check_str(r: &CheckResult) -> String {
    format!(
        "{},{},{},{},{}",
        r.corruptions, r.leaks, r.check_errors, r.corruptions_fixed, r.leaks_fixed
    )
}

/// Reads the image (whole, or sampled when huge) and block status; counts outcomes.
fn read_image(img: &Image, tag: &str, r: &mut Report) {
    let size = img.size();
    let mut ranges = Vec::new();
    if size <= READ_WHOLE_LIMIT {
        let step = 256 * KIB;
        let mut o = 0;
        while o < size {
            ranges.push((o, step.min(size - o)));
            o += step;
        }
    } else {
        ranges.push((0, MIB));
        ranges.push((size - MIB, MIB));
        for i in 1..16u64 {
            let at = (size / 16 * i) & !(64 * KIB - 1);
            ranges.push((at, 64 * KIB));
        }
    }
    let mut buf = vec![0u8; 1 << 20];
    let (mut ok, mut corrupt, mut other) = (0, 0, 0);
    let mut other_msg = String::new();
    for (o, n) in ranges {
        match img.read_at(o, &mut buf[..n as usize]) {
            Ok(()) => ok += 1,
            Err(Error::Corrupt { .. }) => corrupt += 1,
            Err(e) => {
                other += 1;
                other_msg = format!("read {o:#x}+{n:#x}: {e}");
            }
        }
    }
    // Block status over the first 256 MiB (or the image), in 4 MiB steps.
    let end = size.min(READ_WHOLE_LIMIT);
    let mut o = 0;
    while o < end {
        let n = (4 * MIB).min(end - o);
        match img.block_status(o, n) {
            Ok(_) => ok += 1,
            Err(Error::Corrupt { .. }) => corrupt += 1,
            Err(e) => {
                other += 1;
                other_msg = format!("block_status {o:#x}: {e}");
            }
        }
        o += n;
    }
    r.put(&format!("{tag}_read_ok"), ok);
    r.put(&format!("{tag}_read_corrupt"), corrupt);
    r.put(&format!("{tag}_read_other"), other);
    if other > 0 {
        r.put(&format!("{tag}_read_other_msg"), other_msg);
    }
}

/// What survives a repair: the guest bytes of every piece (a guest cluster; for huge images,
/// the cluster-sized parts of `read_image`'s sample ranges) that read successfully, as a hash;
/// `None` for pieces whose read failed (their mapping is corrupt).
struct GuestSnapshot {
    pieces: Vec<(u64, u64)>,
    hashes: Vec<Option<u64>>,
}

fn guest_pieces(img: &Image) -> Vec<(u64, u64)> {
    let size = img.size();
    let cs = img.geometry().cluster_bytes();
    let ranges: Vec<(u64, u64)> = if size <= READ_WHOLE_LIMIT {
        vec![(0, size)]
    } else {
        // The same sample as `read_image`: the ends and 15 points between.
        let mut v = vec![(0, MIB), (size - MIB, MIB)];
        v.extend((1..16u64).map(|i| ((size / 16 * i) & !(64 * KIB - 1), 64 * KIB)));
        v
    };
    let mut pieces = Vec::new();
    for (mut o, n) in ranges {
        let end = o + n;
        while o < end {
            // The next cluster boundary may lie past u64::MAX (a disk of 2^64 - 512 bytes).
            let next = (o / cs + 1).checked_mul(cs).map_or(end, |b| b.min(end));
            pieces.push((o, next - o));
            o = next;
        }
    }
    pieces
}

fn guest_snapshot(img: &Image, pieces: Vec<(u64, u64)>) -> GuestSnapshot {
    use std::hash::Hasher;
    let mut buf = vec![0u8; MIB as usize];
    let hashes = pieces
        .iter()
        .map(|&(o, n)| {
            // Clusters of up to 64 MiB are read 1 MiB at a time; any failure drops the piece.
            let mut h = std::collections::hash_map::DefaultHasher::new();
            let mut at = 0;
            while at < n {
                let k = (n - at).min(MIB) as usize;
                img.read_at(o + at, &mut buf[..k]).ok()?;
                if buf[..k].iter().all(|&b| b == 0) {
                    h.write_u64(k as u64); // zeros are common: skip hashing them byte by byte
                } else {
                    h.write(&buf[..k]);
                }
                at += k as u64;
            }
            Some(h.finish())
        })
        .collect();
    GuestSnapshot { pieces, hashes }
}

/// Compares the guest bytes after every repair with those before it. The rule: a piece whose
/// read succeeded before (through a read-only open that repairs nothing, so its mapping was
/// valid) reads back identical after. Repair may clear only entries that are unaligned, point
/// into metadata or past the end, or overlap another table, and a read-only open refuses to read
/// through exactly those; entries sharing a data cluster are separated by copying it, so both
/// keep their bytes; leak reclaim moves clusters and must not change what they hold.
fn compare_guest(before: &GuestSnapshot, img: &Image, r: &mut Report) {
    let after = guest_snapshot(img, before.pieces.clone());
    let ok = before.hashes.iter().filter(|h| h.is_some()).count();
    r.put("guest_readable_before", ok);
    r.put("guest_unreadable_before", before.hashes.len() - ok);
    let bad: Vec<String> = before
        .pieces
        .iter()
        .zip(before.hashes.iter().zip(&after.hashes))
        .filter(|(_, (b, a))| b.is_some() && b != a)
        .map(|(&(o, n), (_, a))| {
            let what = if a.is_some() { "changed" } else { "unreadable" };
            format!("{o:#x}+{n:#x} {what}")
        })
        .collect();
    r.put(
        "guest_kept",
        if bad.is_empty() {
            "yes".to_owned()
        } else {
            format!(
                "{} pieces lost: {}",
                bad.len(),
                bad[..bad.len().min(4)].join(", ")
            )
        },
    );
}

fn put_err(r: &mut Report, tag: &str, e: &Error) {
    r.put(&format!("{tag}_open"), "err");
    r.put(&format!("{tag}_errno"), rust_errno(e));
    r.put(&format!("{tag}_kind"), variant(e));
    r.put(&format!("{tag}_msg"), e);
}

/// Opens through the C API; returns (rc, qed_last_error()). Closes on success.
fn c_open(path: &Path, flags: u32) -> (i32, String) {
    let cpath = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut h: *mut qed_image = std::ptr::null_mut();
    // SAFETY: cpath is NUL-terminated and outlives the call; h is a valid out pointer.
    let rc = unsafe { qed_open(cpath.as_ptr(), flags, &mut h) };
    // SAFETY: qed_last_error never returns NULL and the string lives until our next call.
    let msg = unsafe { CStr::from_ptr(qed_last_error()) }
        .to_string_lossy()
        .into_owned();
    if rc == 0 {
        // SAFETY: h is the live handle qed_open just returned.
        unsafe { qed_close(h) };
    }
    (rc, msg)
}

/// Records peak RSS and CPU so far under `usage_<name>`, to tell which step used them.
fn mark(r: &mut Report, name: &str) {
    let (rss, user, sys) = rusage_split();
    r.put(
        &format!("usage_{name}"),
        format!(
            "{rss} KiB, {} ms user + {} ms sys",
            (user * 1000.0).round(),
            (sys * 1000.0).round()
        ),
    );
}

/// Runs `f`, recording a panic under `panic_<step>` instead of unwinding out of the child.
fn step(r: &mut Report, name: &str, f: impl FnOnce(&mut Report)) {
    let res = catch_unwind(AssertUnwindSafe(|| f(&mut *r)));
    mark(r, name);
    if let Err(p) = res {
        let msg = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic".into());
        r.put(&format!("panic_{name}"), msg);
    }
}

fn child(path: &Path, confine: bool, probe: Option<u64>, prefix: Option<PathBuf>, r: &mut Report) {
    let fp0 = fingerprint(path).unwrap();
    let hdr = |p: &Path| {
        use std::os::unix::fs::FileExt;
        let mut b = vec![0u8; 64];
        let f = std::fs::File::open(p).ok()?;
        f.read_exact_at(&mut b, 0).ok().map(|_| b)
    };
    let cflags = if confine { QED_OPEN_CONFINE_BACKING } else { 0 };

    // 1. Rust, read-only: open, read everything, check without repair.
    let mut guest = None;
    step(r, "rust_ro", |r| {
        match Image::open(path, &open_opts(false, confine)) {
            Err(e) => put_err(r, "ro", &e),
            Ok(img) => {
                r.put("ro_open", "ok");
                r.put("ro_size", img.size());
                mark(r, "ro_1_opened");
                let _ = img.info();
                read_image(&img, "ro", r);
                guest = Some(guest_snapshot(&img, guest_pieces(&img)));
                mark(r, "ro_2_read");
                if let Some(pf) = &prefix {
                    let want = std::fs::read(pf).unwrap();
                    let n = want.len().min(64).min(img.size() as usize);
                    let mut got = vec![0u8; n];
                    let ok = img.read_at(0, &mut got).is_ok() && got == want[..n];
                    r.put("prefix_match", if ok { "yes" } else { "no" });
                }
                match img.check(CheckFix::NONE) {
                    Ok(c) => r.put("ro_check", check_str(&c)),
                    Err(e) => r.put("ro_check_err", e),
                }
                if let Err(e) = img.close() {
                    r.put("ro_close_err", e);
                }
            }
        }
    });
    r.put("ro_unchanged", unchanged(&fp0, path, 0..0));

    // 2. C, read-only.
    step(r, "c_ro", |r| {
        let (rc, msg) = c_open(path, cflags);
        r.put("c_ro_rc", rc);
        r.put("c_ro_msg", msg);
    });
    r.put("c_ro_unchanged", unchanged(&fp0, path, 0..0));

    // 3. C, read-write (an image that opens may legitimately change: autoclear, repair).
    step(r, "c_rw", |r| {
        let before = fingerprint(path).unwrap();
        let (rc, msg) = c_open(path, cflags | QED_OPEN_RDWR);
        r.put("c_rw_rc", rc);
        r.put("c_rw_msg", msg);
        if rc != 0 {
            r.put("c_rw_unchanged", unchanged(&before, path, 0..0));
        }
    });

    // 4. Rust, read-write: a guest write through the corrupt mapping, repair, re-check, re-read.
    step(r, "rust_rw", |r| {
        let before = fingerprint(path).unwrap();
        match Image::open(path, &open_opts(true, confine)) {
            Err(e) => {
                put_err(r, "rw", &e);
                r.put("rw_unchanged", unchanged(&before, path, 0..0));
            }
            Ok(img) => {
                r.put("rw_open", "ok");
                mark(r, "rw_1_opened");
                if let Some(at) = probe {
                    let fp = fingerprint(path).unwrap();
                    let res = img.write_at(at, &[0x5a; 4096]);
                    r.put(
                        "probe_write",
                        match res {
                            Ok(()) => "ok".to_owned(),
                            Err(Error::Corrupt { .. }) => "corrupt".to_owned(),
                            Err(e) => format!("other: {e}"),
                        },
                    );
                    // The need-check bit (features) may be set; nothing else may change.
                    r.put("probe_unchanged", unchanged(&fp, path, 16..24));
                }
                match img.check(CheckFix::ALL) {
                    Ok(c) => r.put("rw_fix", check_str(&c)),
                    Err(e) => r.put("rw_fix_err", e),
                }
                mark(r, "rw_2_repaired");
                match img.check(CheckFix::NONE) {
                    Ok(c) => r.put("rw_after", check_str(&c)),
                    Err(e) => r.put("rw_after_err", e),
                }
                mark(r, "rw_3_checked");
                if let Err(e) = img.close() {
                    r.put("rw_close_err", e);
                }
                drop(img);
                match Image::open(path, &open_opts(false, confine)) {
                    Ok(img) => {
                        read_image(&img, "post", r);
                        // After the C read-write open (which repairs a need-check image) and
                        // our repair: compare with the bytes before either.
                        if let Some(g) = &guest {
                            compare_guest(g, &img, r);
                        }
                    }
                    Err(e) => r.put("post_open_err", e),
                }
            }
        }
    });
    if let Some(h) = hdr(path) {
        r.put("final_features", get_u64(&h, off::FEATURES));
        r.put("final_compat", get_u64(&h, off::COMPAT));
        r.put("final_autoclear", get_u64(&h, off::AUTOCLEAR));
    }
}

/// Entry point of the child process (does nothing when run without the environment).
#[test]
#[ignore = "child process of hostile_corpus"]
fn hostile_child() {
    let Some(image) = std::env::var_os("QED_HOSTILE_IMAGE") else {
        return;
    };
    let report = PathBuf::from(std::env::var_os("QED_HOSTILE_REPORT").unwrap());
    let confine = std::env::var_os("QED_HOSTILE_CONFINE").is_some();
    let probe = std::env::var("QED_HOSTILE_PROBE")
        .ok()
        .map(|s| s.parse().unwrap());
    let prefix = std::env::var_os("QED_HOSTILE_PREFIX").map(PathBuf::from);
    let mut r = Report::default();
    let t = Instant::now();
    child(Path::new(&image), confine, probe, prefix, &mut r);
    let (rss, cpu) = rusage();
    r.put("maxrss_kib", rss);
    r.put("cpu_ms", (cpu * 1000.0).round() as u64);
    r.put("wall_ms", t.elapsed().as_millis());
    std::fs::write(report, r.text()).unwrap();
}

// ------------------------------------------------------------------------------------------
// The parent: runs every case in a child and judges the reports
// ------------------------------------------------------------------------------------------

struct Outcome {
    report: Report,
    status: String,
    child_ok: bool,
    stderr_tail: String,
    qemu: Option<(i32, String)>,
}

fn run_case(case: &Case) -> Outcome {
    let dir = case.file.parent().unwrap();
    let rep = dir.join("report.txt");
    let out = std::fs::File::create(dir.join("child.stdout")).unwrap();
    let err = std::fs::File::create(dir.join("child.stderr")).unwrap();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "hostile_child",
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("QED_HOSTILE_IMAGE", &case.file)
    .env("QED_HOSTILE_REPORT", &rep)
    // A panic's backtrace would load the debug info and inflate the child's RSS.
    .env("RUST_BACKTRACE", "0")
    .stdin(Stdio::null())
    .stdout(out)
    .stderr(err);
    if case.confine {
        cmd.env("QED_HOSTILE_CONFINE", "1");
    }
    if let Some(at) = case.probe {
        cmd.env("QED_HOSTILE_PROBE", at.to_string());
    }
    if let Some(pf) = &case.prefix {
        cmd.env("QED_HOSTILE_PREFIX", pf);
    }
    let mut ch = cmd.spawn().unwrap();
    let deadline = Instant::now() + CHILD_TIMEOUT;
    let status = loop {
        if let Some(s) = ch.try_wait().unwrap() {
            break format!("{s}");
        }
        if Instant::now() > deadline {
            let _ = ch.kill();
            let _ = ch.wait();
            break format!("killed after {CHILD_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let child_ok = status == "exit status: 0";
    let report = std::fs::read_to_string(&rep)
        .map(|s| Report::parse(&s))
        .unwrap_or_default();
    let stderr = std::fs::read_to_string(dir.join("child.stderr")).unwrap_or_default()
        + &std::fs::read_to_string(dir.join("child.stdout")).unwrap_or_default();
    let stderr_tail: String = stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .rev()
        .take(6)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join(" | ");
    let qemu = match case.expect {
        Expect::Opened { qemu: true, .. } if report.is("rw_open", "ok") => {
            let o = run_tool("qemu-img", &["check", "-f", "qed", p(&case.file)]);
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            Some((o.status.code().unwrap_or(-1), text))
        }
        _ => None,
    };
    Outcome {
        report,
        status,
        child_ok,
        stderr_tail,
        qemu,
    }
}

fn errno_name(rc: i64) -> String {
    match -rc as i32 {
        0 => "0".into(),
        libc::EINVAL => "-EINVAL".into(),
        libc::ENOTSUP => "-ENOTSUP".into(),
        libc::EACCES => "-EACCES".into(),
        libc::ENOENT => "-ENOENT".into(),
        libc::EIO => "-EIO".into(),
        n => format!("-{n}"),
    }
}

fn check_tuple(s: Option<&str>) -> Option<(u64, u64, u64)> {
    let v: Vec<u64> = s?.split(',').filter_map(|x| x.parse().ok()).collect();
    (v.len() >= 3).then(|| (v[0], v[1], v[2]))
}

/// Judges one case; returns the failures.
fn judge(case: &Case, o: &Outcome) -> Vec<String> {
    let r = &o.report;
    let mut f = Vec::new();
    let mut need = |cond: bool, what: String| {
        if !cond {
            f.push(what)
        }
    };
    need(
        o.child_ok,
        format!("child failed ({}): {}", o.status, o.stderr_tail),
    );
    for (k, v) in &r.0 {
        if k.starts_with("panic_") {
            need(false, format!("PANIC in {k}: {v}"));
        }
        if k.ends_with("_msg") && v.contains("panic") {
            need(false, format!("panic caught at the C boundary ({k}): {v}"));
        }
    }
    let rss = r.num("maxrss_kib").unwrap_or(i64::MAX);
    let cpu = r.num("cpu_ms").unwrap_or(i64::MAX);
    need(
        (rss as u64) < RSS_LIMIT_KIB,
        format!("peak RSS {rss} KiB >= {RSS_LIMIT_KIB} KiB"),
    );
    need(
        (cpu as f64) < CPU_LIMIT_S * 1000.0,
        format!("CPU {cpu} ms >= {} ms", CPU_LIMIT_S * 1000.0),
    );
    for k in ["ro_unchanged", "c_ro_unchanged"] {
        need(
            r.is(k, "yes"),
            format!("file changed by a read-only open ({k}): {:?}", r.get(k)),
        );
    }
    match &case.expect {
        Expect::Refused { errnos, needles } => {
            for tag in ["ro", "rw"] {
                need(
                    r.is(&format!("{tag}_open"), "err"),
                    format!("Rust {tag} open was expected to fail but did not"),
                );
                let e = r.num(&format!("{tag}_errno")).unwrap_or(0) as i32;
                need(
                    errnos.contains(&e),
                    format!(
                        "Rust {tag} error {} ({}) maps to errno {e}, expected {errnos:?}",
                        r.get(&format!("{tag}_kind")).unwrap_or("?"),
                        r.get(&format!("{tag}_msg")).unwrap_or("?")
                    ),
                );
                let msg = r.get(&format!("{tag}_msg")).unwrap_or("");
                for n in *needles {
                    need(
                        msg.contains(n),
                        format!("Rust {tag} error does not mention {n:?}: {msg}"),
                    );
                }
            }
            for tag in ["c_ro", "c_rw"] {
                let rc = r.num(&format!("{tag}_rc")).unwrap_or(0) as i32;
                need(
                    errnos.iter().any(|&e| rc == -e),
                    format!(
                        "{tag}: qed_open returned {rc}, expected one of {:?}",
                        errnos.iter().map(|e| -e).collect::<Vec<_>>()
                    ),
                );
                let msg = r.get(&format!("{tag}_msg")).unwrap_or("");
                for n in *needles {
                    need(
                        msg.contains(n),
                        format!("{tag}: qed_last_error() does not mention {n:?}: {msg:?}"),
                    );
                }
            }
            for k in ["c_rw_unchanged", "rw_unchanged"] {
                need(
                    r.is(k, "yes"),
                    format!(
                        "file changed by a REFUSED read-write open ({k}): {}",
                        r.get(k).unwrap_or("not recorded")
                    ),
                );
            }
        }
        Expect::Opened { check, qemu } => {
            need(
                r.is("ro_open", "ok"),
                format!("Rust ro open failed: {}", r.get("ro_msg").unwrap_or("?")),
            );
            need(
                r.num("ro_read_other") == Some(0),
                format!(
                    "reads failed with something other than Corrupt: {}",
                    r.get("ro_read_other_msg").unwrap_or("?")
                ),
            );
            match check_tuple(r.get("ro_check")) {
                None => need(
                    false,
                    format!(
                        "check(NONE) failed: {}",
                        r.get("ro_check_err").unwrap_or("not run")
                    ),
                ),
                Some((c, l, e)) => {
                    let ok = match check {
                        Chk::Clean => c == 0 && l == 0 && e == 0,
                        Chk::Corrupt => c > 0,
                        Chk::Leaks => c == 0 && l > 0,
                    };
                    need(
                        ok,
                        format!("check(NONE) reported {c} corruptions, {l} leaks, {e} errors; expected {check:?}"),
                    );
                }
            }
            for tag in ["c_ro", "c_rw"] {
                need(
                    r.num(&format!("{tag}_rc")) == Some(0),
                    format!(
                        "{tag}: qed_open returned {:?}: {}",
                        r.num(&format!("{tag}_rc")),
                        r.get(&format!("{tag}_msg")).unwrap_or("")
                    ),
                );
            }
            need(
                r.is("rw_open", "ok"),
                format!("Rust rw open failed: {}", r.get("rw_msg").unwrap_or("?")),
            );
            if r.is("rw_open", "ok") {
                need(
                    check_tuple(r.get("rw_fix")).is_some(),
                    format!("check(ALL) failed: {}", r.get("rw_fix_err").unwrap_or("?")),
                );
                need(
                    check_tuple(r.get("rw_after")) == Some((0, 0, 0)),
                    format!(
                        "not clean after check(ALL): fix {:?}, after {:?} {:?}",
                        r.get("rw_fix"),
                        r.get("rw_after"),
                        r.get("rw_after_err")
                    ),
                );
                need(
                    r.num("post_read_corrupt") == Some(0) && r.num("post_read_other") == Some(0),
                    format!(
                        "reads after repair failed: {:?} corrupt, {:?} other ({})",
                        r.num("post_read_corrupt"),
                        r.num("post_read_other"),
                        r.get("post_read_other_msg")
                            .or(r.get("post_open_err"))
                            .unwrap_or("")
                    ),
                );
            }
            need(
                r.is("guest_kept", "yes"),
                format!(
                    "guest bytes readable before repair changed: {}",
                    r.get("guest_kept").unwrap_or("not compared")
                ),
            );
            if case.probe.is_some() {
                need(
                    r.is("probe_write", "corrupt"),
                    format!(
                        "guest write through the corrupt entry: {:?}, expected Error::Corrupt",
                        r.get("probe_write")
                    ),
                );
                need(
                    r.is("probe_unchanged", "yes"),
                    format!(
                        "refused guest write changed the file: {:?}",
                        r.get("probe_unchanged")
                    ),
                );
            }
            if case.prefix.is_some() {
                need(
                    r.is("prefix_match", "yes"),
                    format!(
                        "image does not read its backing file's bytes: {:?}",
                        r.get("prefix_match")
                    ),
                );
            }
            if *qemu {
                match &o.qemu {
                    Some((0, _)) => {}
                    Some((code, text)) => need(
                        false,
                        format!(
                            "qemu-img check exit {code} after our repair: {}",
                            text.trim()
                        ),
                    ),
                    None => need(false, "qemu-img check not run".into()),
                }
            }
        }
    }
    match case.extra {
        Extra::None => {}
        Extra::AutoclearCleared => need(
            r.is("final_autoclear", "0"),
            format!(
                "autoclear bits not cleared by a read-write open: {:?}",
                r.get("final_autoclear")
            ),
        ),
        Extra::CompatKept(v) => need(
            r.get("final_compat").and_then(|x| x.parse::<u64>().ok()) == Some(v),
            format!("compat bits changed: {:?}", r.get("final_compat")),
        ),
    }
    f
}

fn excerpt(s: &str, n: usize) -> String {
    let s = s.strip_prefix("qed_open: ").unwrap_or(s);
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        s.chars().take(n - 1).collect::<String>() + "…"
    }
}

#[test]
fn hostile_corpus() {
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let corpus = build_corpus(tmp.path());
    // QED_HOSTILE_KEEP=1 keeps the corpus, the child reports and their output for inspection.
    let tmp = if std::env::var_os("QED_HOSTILE_KEEP").is_some() {
        let kept = tmp.keep();
        eprintln!("hostile corpus kept in {}", kept.display());
        None
    } else {
        Some(tmp)
    };
    let cases = &corpus.cases;
    let built = t0.elapsed();

    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 4);
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<Outcome>>> = cases.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= cases.len() {
                    break;
                }
                let o = run_case(&cases[i]);
                *results[i].lock().unwrap() = Some(o);
            });
        }
    });

    let mut table = String::new();
    let mut failures = Vec::new();
    let (mut max_rss, mut max_cpu) = ((0i64, String::new()), (0i64, String::new()));
    table += &format!(
        "\n{:<38} {:<8} {:<9} {:>7} {:>6}  {}\n",
        "case",
        "outcome",
        "errno",
        "RSS KiB",
        "CPU ms",
        "message / check (corruptions,leaks,errors)"
    );
    let (mut kept, mut unreadable) = (0, 0);
    for (case, res) in cases.iter().zip(&results) {
        let o = res.lock().unwrap().take().unwrap();
        let r = &o.report;
        kept += r.num("guest_readable_before").unwrap_or(0);
        unreadable += r.num("guest_unreadable_before").unwrap_or(0);
        let fails = judge(case, &o);
        let panicked = r.0.keys().any(|k| k.starts_with("panic_"));
        let outcome = match (r.get("ro_open"), r.get("rw_open")) {
            _ if panicked || !o.child_ok => "PANIC",
            (Some("ok"), Some("ok")) => "opened",
            (Some("err"), Some("err")) => "refused",
            (Some("ok"), Some("err")) => "ro-only",
            _ => "?",
        };
        let rc = r.num("c_ro_rc").unwrap_or(0);
        let msg = if rc != 0 {
            excerpt(r.get("c_ro_msg").unwrap_or(""), 90)
        } else {
            format!(
                "check {} -> repair {} -> {}{}",
                r.get("ro_check")
                    .map(|s| s.splitn(4, ',').take(3).collect::<Vec<_>>().join(","))
                    .unwrap_or_default(),
                r.get("rw_fix").unwrap_or("-"),
                r.get("rw_after")
                    .map(|s| s.splitn(4, ',').take(3).collect::<Vec<_>>().join(","))
                    .unwrap_or("-".into()),
                match &o.qemu {
                    Some((code, _)) => format!("; qemu-img check {code}"),
                    None => String::new(),
                }
            )
        };
        let rss = r.num("maxrss_kib").unwrap_or(-1);
        let cpu = r.num("cpu_ms").unwrap_or(-1);
        if rss > max_rss.0 {
            max_rss = (rss, case.name.clone());
        }
        if cpu > max_cpu.0 {
            max_cpu = (cpu, case.name.clone());
        }
        table += &format!(
            "{:<38} {:<8} {:<9} {:>7} {:>6}  {}{}\n",
            case.name,
            outcome,
            errno_name(rc),
            rss,
            cpu,
            msg,
            if fails.is_empty() { "" } else { "   <== FAIL" }
        );
        for fl in fails {
            failures.push(format!("{}: {fl}", case.name));
        }
    }
    let hostile = cases.iter().filter(|c| !c.control).count();
    table += &format!(
        "\n{} cases: {hostile} hostile images + {} controls; peak RSS {} KiB ({}), max CPU {} ms ({}); \
         corpus built in {:.1?}, total {:.1?}\n",
        cases.len(),
        cases.len() - hostile,
        max_rss.0,
        max_rss.1,
        max_cpu.0,
        max_cpu.1,
        built,
        t0.elapsed()
    );
    table += &format!(
        "guest pieces compared across repairs: {kept} readable before (each must read back identical), \
         {unreadable} unreadable before (corrupt mappings)\n"
    );
    // Straight to the process's stderr: libtest does not capture it, so the table is always shown.
    let _ = std::io::stderr().write_all(table.as_bytes());
    // README promises 90+ malformed images.
    assert!(hostile >= 90, "only {hostile} hostile images");
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    drop(tmp);
}
