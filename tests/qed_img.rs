// SPDX-License-Identifier: MIT OR Apache-2.0
//! `qed-img` against `qemu-img` 10.x as the oracle: every subcommand runs on images qemu-img and
//! qemu-io made, and its results are checked with qemu-img (identical `map` and `check` output,
//! identical `convert` files, `qemu-img compare` after our convert / commit / rebase).
//!
//! Needs `qemu-img` and `qemu-io` (Debian `qemu-utils`): the tests fail, never skip, without them.
//! Commands run inside a temporary folder with relative file names, so that outputs that name
//! files are the same for both tools. QEMU's known bugs are kept out of the way: no 4 KiB-cluster
//! image of 16 MiB or more is checked by qemu-img, no table_size 1 image is given to it, and no
//! run of 4 GiB or more is mapped by it.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

const QED_IMG: &str = env!("CARGO_BIN_EXE_qed-img");

#[derive(Debug)]
struct Out {
    what: String,
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    #[track_caller]
    fn ok(self) -> Out {
        assert_eq!(
            self.code, 0,
            "{} failed\nstdout:\n{}\nstderr:\n{}",
            self.what, self.stdout, self.stderr
        );
        self
    }
}

fn require_qemu() {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| {
        for tool in ["qemu-img", "qemu-io"] {
            let ok = Command::new(tool)
                .arg("--version")
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            assert!(
                ok,
                "{tool} is needed by the qed-img tests; install qemu-utils (apt-get install qemu-utils)"
            );
        }
    });
}

/// A temporary folder where commands run with relative names.
struct Dir {
    _tmp: tempfile::TempDir,
    path: PathBuf,
}

impl Dir {
    fn new() -> Dir {
        require_qemu();
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().to_path_buf();
        Dir { _tmp: tmp, path }
    }

    fn run(&self, prog: &str, args: &[&str]) -> Out {
        let out = Command::new(prog)
            .args(args)
            .current_dir(&self.path)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
        Out {
            what: format!("{prog} {}", args.join(" ")),
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
    /// qed-img run through a link named `qemu-img`, as QEMU's iotests run it: messages must then
    /// be qemu-img's, prefix included.
    fn as_qemu_img(&self, args: &[&str]) -> Out {
        let link = self.p(".bin/qemu-img");
        if !link.exists() {
            std::fs::create_dir_all(self.p(".bin")).expect("mkdir");
            std::os::unix::fs::symlink(QED_IMG, &link).expect("symlink");
        }
        self.run(link.to_str().expect("utf-8 path"), args)
    }
    /// qemu-img for "qemu", else qed-img named `qemu-img`.
    fn by(&self, tool: &str, args: &[&str]) -> Out {
        if tool == "qemu" {
            self.qemu(args)
        } else {
            self.as_qemu_img(args)
        }
    }
    /// A QED overlay `name` of the QED image `backing` (named as the header will store it).
    fn overlay(&self, backing: &str, name: &str, size: Option<&str>) {
        let mut args = vec![
            "create", "-q", "-f", "qed", "-b", backing, "-F", "qed", name,
        ];
        args.extend(size);
        self.qemu(&args).ok();
    }
    fn qemu(&self, args: &[&str]) -> Out {
        self.run("qemu-img", args)
    }
    fn ours(&self, args: &[&str]) -> Out {
        self.run(QED_IMG, args)
    }
    /// qemu-io with writeback cache, commands given as `-c` strings.
    fn qio(&self, fmt: &str, file: &str, cmds: &[&str]) {
        let mut args = vec!["-f", fmt, "-t", "writeback"];
        for c in cmds {
            args.push("-c");
            args.push(c);
        }
        args.push(file);
        self.run("qemu-io", &args).ok();
    }
    fn p(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
    fn bytes(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.p(name)).unwrap_or_else(|e| panic!("reading {name}: {e}"))
    }
    fn copy(&self, from: &str, to: &str) {
        std::fs::copy(self.p(from), self.p(to)).expect("copy");
    }
}

/// Runs the same arguments through both tools and asserts identical stdout and exit code.
#[track_caller]
fn same(d: &Dir, args: &[&str]) -> Out {
    let q = d.qemu(args);
    let o = d.ours(args);
    assert_eq!(
        (q.code, &q.stdout),
        (o.code, &o.stdout),
        "`{}`: qemu-img (left) and qed-img (right) differ\nqemu stderr: {}\nour stderr: {}",
        args.join(" "),
        q.stderr,
        o.stderr
    );
    o
}

/// Runs the same arguments through qemu-img and through qed-img named `qemu-img`; asserts
/// identical exit code, stdout and stderr.
#[track_caller]
fn same_all(d: &Dir, args: &[&str]) -> Out {
    let q = d.qemu(args);
    let o = d.as_qemu_img(args);
    assert_eq!(
        (q.code, &q.stdout, &q.stderr),
        (o.code, &o.stdout, &o.stderr),
        "`{}`: qemu-img (left) and qed-img (right) differ",
        args.join(" ")
    );
    o
}

/// Our `info` output without the QED-only `format-specific` section.
fn strip_qed_specific(s: &str) -> String {
    let mut s = s.replace(
        "Format specific information:\n    header size: 1\n    table size: 4\n",
        "",
    );
    let key = "    \"format-specific\": {\n        \"type\": \"qed\",";
    if let Some(i) = s.find(key) {
        let end = s[i..].find("\n    },\n").expect("end of format-specific") + i;
        s.replace_range(i..end + "\n    },\n".len(), "");
    }
    s
}

/// A raw base with data and holes, a QED overlay with data, a zero cluster, and a size larger
/// than the base's.
fn raw_chain(d: &Dir) {
    d.qemu(&["create", "-q", "-f", "raw", "base.raw", "8M"])
        .ok();
    d.qio(
        "raw",
        "base.raw",
        &[
            "write -P 0x11 0 1M",
            "write -P 0x22 3M 64k",
            "write -P 0x23 7M 512",
        ],
    );
    d.qemu(&[
        "create", "-q", "-f", "qed", "-b", "base.raw", "-F", "raw", "ov.qed", "16M",
    ])
    .ok();
    d.qio(
        "qed",
        "ov.qed",
        &[
            "write -P 0x33 512k 128k",
            "write -z 2M 128k",
            "write -P 0x44 5M 4k",
            "write -P 0x45 9M 64k",
        ],
    );
}

/// A three-level QED chain: base.qed <- mid.qed <- top.qed.
fn qed_chain(d: &Dir) {
    d.qemu(&["create", "-q", "-f", "qed", "base.qed", "4M"])
        .ok();
    d.qio(
        "qed",
        "base.qed",
        &["write -P 1 0 256k", "write -z 1M 64k", "write -P 2 3M 64k"],
    );
    d.qemu(&[
        "create", "-q", "-f", "qed", "-b", "base.qed", "-F", "qed", "mid.qed", "6M",
    ])
    .ok();
    d.qio(
        "qed",
        "mid.qed",
        &["write -P 3 128k 64k", "write -P 4 1M 128k"],
    );
    d.qemu(&[
        "create", "-q", "-f", "qed", "-b", "mid.qed", "-F", "qed", "top.qed",
    ])
    .ok();
    d.qio(
        "qed",
        "top.qed",
        &["write -P 5 64k 64k", "write -z 3M 64k", "write -P 6 5M 4k"],
    );
}

/// 4 KiB clusters, two-cluster tables (4 MiB per L2 table), writes spread over several tables.
fn small_cluster_image(d: &Dir, name: &str) {
    d.qemu(&[
        "create",
        "-q",
        "-f",
        "qed",
        "-o",
        "cluster_size=4k,table_size=2",
        name,
        "12M",
    ])
    .ok();
    d.qio(
        "qed",
        name,
        &[
            "write -P 7 0 12k",
            "write -P 8 4092k 8k",
            "write -z 5M 16k",
            "write -P 9 6M 4k",
            "write -P 10 8190k 4k",
            "write -P 11 11M 1M",
        ],
    );
}

#[test]
fn info_matches_qemu() {
    let d = Dir::new();
    raw_chain(&d);
    qed_chain(&d);
    for file in ["ov.qed", "top.qed", "base.qed", "base.raw"] {
        for out in ["human", "json"] {
            let args = ["info", "--output", out, file];
            let q = d.qemu(&args).ok();
            let o = d.ours(&args).ok();
            assert_eq!(
                q.stdout,
                strip_qed_specific(&o.stdout),
                "info --output={out} {file}"
            );
        }
    }
    // The QED additions.
    let o = d.ours(&["info", "--output=json", "ov.qed"]).ok();
    assert!(o.stdout.contains("\"table-size\": 4") && o.stdout.contains("\"header-size\": 1"));
    let o = d.ours(&["info", "ov.qed"]).ok();
    assert!(o.stdout.contains("    table size: 4\n"));
    // A path with a folder: "actual path" of the backing file.
    let sub = format!("{}/ov.qed", d.path.display());
    let q = d.qemu(&["info", &sub]).ok();
    let o = d.ours(&["info", &sub]).ok();
    assert_eq!(q.stdout, strip_qed_specific(&o.stdout));
    assert!(o.stdout.contains("(actual path: "));
    // --backing-chain lists every image.
    let o = d.ours(&["info", "--backing-chain", "top.qed"]).ok();
    assert_eq!(o.stdout.matches("image: ").count(), 3, "{}", o.stdout);
}

#[test]
fn info_dirty_flag_and_table_size() {
    let d = Dir::new();
    d.qemu(&[
        "create",
        "-q",
        "-f",
        "qed",
        "-o",
        "table_size=8",
        "t.qed",
        "1G",
    ])
    .ok();
    // Set the need-check bit (features bit 1) by hand, as after a crash.
    let mut b = d.bytes("t.qed");
    b[16] |= 2;
    std::fs::write(d.p("t.qed"), &b).unwrap();
    let q = d.qemu(&["info", "--output=json", "t.qed"]).ok();
    let o = d.ours(&["info", "--output=json", "t.qed"]).ok();
    // QEMU's QED driver never reports the need-check bit as dirty; we do.
    assert!(q.stdout.contains("\n    \"dirty-flag\": false\n"));
    assert!(o.stdout.contains("\n    \"dirty-flag\": true\n"));
    let ours = o
        .stdout
        .replace(
            "            \"table-size\": 8\n",
            "            \"table-size\": 4\n",
        )
        .replace(
            "\n    \"dirty-flag\": true\n",
            "\n    \"dirty-flag\": false\n",
        );
    assert_eq!(q.stdout, strip_qed_specific(&ours));
    let o = d.ours(&["info", "t.qed"]).ok();
    assert!(o.stdout.contains("cleanly shut down: no\n"));
    assert!(o.stdout.contains("    table size: 8\n"));
}

#[test]
fn map_matches_qemu() {
    let d = Dir::new();
    raw_chain(&d);
    qed_chain(&d);
    small_cluster_image(&d, "small.qed");
    d.qemu(&["create", "-q", "-f", "qed", "empty.qed", "1G"])
        .ok();
    for file in [
        "ov.qed",
        "top.qed",
        "mid.qed",
        "base.qed",
        "small.qed",
        "empty.qed",
        "base.raw",
    ] {
        same(&d, &["map", "--output=json", file]);
        same(&d, &["map", file]);
    }
    same(
        &d,
        &[
            "map",
            "--output=json",
            "--start-offset=1M",
            "--max-length=5M",
            "ov.qed",
        ],
    );
    // The raw backing file is reported at depth 1 with offsets into it, holes as zero.
    let o = d.ours(&["map", "--output=json", "ov.qed"]).ok();
    assert!(o
        .stdout
        .contains("\"depth\": 1, \"present\": true, \"zero\": false, \"data\": true"));
}

/// Raw backing files made with truncate and writes, of odd lengths that end in data or in a
/// hole, under overlays larger than they are, with zero clusters over their data; a QED backing
/// file shorter than its overlay; a chain of three over a raw file; nothing allocated anywhere.
#[test]
fn map_through_chains_matches_qemu() {
    let d = Dir::new();
    let sparse = |name: &str, len: u64, writes: &[(u64, usize, u8)]| {
        let f = std::fs::File::create(d.p(name)).expect("create raw");
        f.set_len(len).expect("truncate");
        for &(off, n, pat) in writes {
            std::os::unix::fs::FileExt::write_all_at(&f, &vec![pat; n], off).expect("write");
        }
    };
    // Ends in data 700 bytes into a sector: QEMU maps data to the end, then the rest of the
    // sector as a zero hole.
    sparse(
        "tail.raw",
        (3 << 20) + 700,
        &[(4096, 8192, 1), (3 << 20, 700, 2)],
    );
    // Ends in a hole, mid-sector.
    sparse("hole.raw", (2 << 20) + 1000, &[(1 << 20, 100, 3)]);
    for (base, ov) in [("tail.raw", "tail.qed"), ("hole.raw", "hole.qed")] {
        d.qemu(&[
            "create", "-q", "-f", "qed", "-b", base, "-F", "raw", ov, "8M",
        ])
        .ok();
        d.qio(
            "qed",
            ov,
            &["write -P 9 0 4k", "write -z 1M 64k", "write -P 8 5M 64k"],
        );
    }
    // A chain of three over the raw file, each level shorter than the one above.
    d.qemu(&[
        "create", "-q", "-f", "qed", "-b", "tail.raw", "-F", "raw", "c1.qed", "4M",
    ])
    .ok();
    d.qio("qed", "c1.qed", &["write -P 5 64k 64k", "write -z 3M 64k"]);
    d.qemu(&[
        "create", "-q", "-f", "qed", "-b", "c1.qed", "-F", "qed", "c2.qed", "6M",
    ])
    .ok();
    d.qio("qed", "c2.qed", &["write -z 1M 64k", "write -P 6 4M 4k"]);
    d.qemu(&[
        "create", "-q", "-f", "qed", "-b", "c2.qed", "-F", "qed", "c3.qed", "7M",
    ])
    .ok();
    d.qio("qed", "c3.qed", &["write -P 7 128k 4k"]);
    // Nothing allocated in any level.
    d.qemu(&["create", "-q", "-f", "qed", "e1.qed", "1M"]).ok();
    d.qemu(&[
        "create", "-q", "-f", "qed", "-b", "e1.qed", "-F", "qed", "e2.qed", "3M",
    ])
    .ok();
    for file in [
        "tail.qed", "hole.qed", "c1.qed", "c2.qed", "c3.qed", "e2.qed", "tail.raw", "hole.raw",
    ] {
        same(&d, &["map", "--output=json", file]);
        same(&d, &["map", file]);
    }
    same(
        &d,
        &["map", "--output=json", "-s", "3M", "-l", "1M", "c3.qed"],
    );
    // The chain's depths are all there: data at 0, 1 and 3, zeros at 1 and 2.
    let o = d.ours(&["map", "--output=json", "c3.qed"]).ok();
    for want in [
        "\"depth\": 0, \"present\": true, \"zero\": false, \"data\": true",
        "\"depth\": 1, \"present\": true, \"zero\": true, \"data\": false",
        "\"depth\": 2, \"present\": true, \"zero\": true, \"data\": false, \"compressed\": false}",
        "\"depth\": 2, \"present\": true, \"zero\": false, \"data\": true",
        "\"depth\": 3, \"present\": true, \"zero\": false, \"data\": true",
        "\"depth\": 3, \"present\": true, \"zero\": true, \"data\": false",
    ] {
        assert!(o.stdout.contains(want), "{want} not in\n{}", o.stdout);
    }
}

#[test]
fn check_matches_qemu_exit_codes_and_output() {
    let d = Dir::new();
    d.qemu(&["create", "-q", "-f", "qed", "clean.qed", "10M"])
        .ok();
    d.qio(
        "qed",
        "clean.qed",
        &["write -P 1 0 128k", "write -P 2 1M 64k"],
    );
    // Leaking: clusters nothing references at the end of the file.
    d.copy("clean.qed", "leak.qed");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.p("leak.qed"))
        .unwrap();
    f.set_len(f.metadata().unwrap().len() + 128 * 1024).unwrap();
    drop(f);
    // Corrupted: L2 entries past the end of the file and unaligned.
    d.copy("clean.qed", "bad.qed");
    let mut b = d.bytes("bad.qed");
    let l1 = u64::from_le_bytes(b[40..48].try_into().unwrap()) as usize;
    let l2 = u64::from_le_bytes(b[l1..l1 + 8].try_into().unwrap()) as usize;
    b[l2 + 8 * 16..l2 + 8 * 17].copy_from_slice(&0x1000_0000u64.to_le_bytes());
    b[l2 + 8 * 17..l2 + 8 * 18].copy_from_slice(&0x10001u64.to_le_bytes());
    std::fs::write(d.p("bad.qed"), &b).unwrap();

    for (file, code) in [("clean.qed", 0), ("leak.qed", 3), ("bad.qed", 2)] {
        let o = same(&d, &["check", file]);
        assert_eq!(o.code, code, "{file}");
        same(&d, &["check", "--output=json", file]);
        same(&d, &["check", "-q", file]);
    }
    // Raw images have no check: qemu-img's exit code 63.
    d.qemu(&["create", "-q", "-f", "raw", "r.raw", "1M"]).ok();
    same(&d, &["check", "r.raw"]);

    // Repair: our repair leaves images qemu-img finds clean.
    d.copy("bad.qed", "bad2.qed");
    let o = d.ours(&["check", "-r", "all", "bad2.qed"]);
    assert!(
        o.stdout
            .starts_with("The following inconsistencies were found and repaired:\n\n"),
        "{}",
        o.stdout
    );
    assert!(o.stdout.contains("    2 corruptions\n"), "{}", o.stdout);
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert_eq!(d.qemu(&["check", "bad2.qed"]).code, 0);
    d.copy("leak.qed", "leak2.qed");
    let o = d.ours(&["check", "-r", "leaks", "--output=json", "leak2.qed"]);
    assert_eq!(o.code, 0, "{}", o.stdout);
    assert!(o.stdout.contains("\"leaks-fixed\": 2"), "{}", o.stdout);
    assert_eq!(d.qemu(&["check", "leak2.qed"]).code, 0);
}

#[test]
fn convert_output_is_identical_to_qemu() {
    let d = Dir::new();
    raw_chain(&d);
    qed_chain(&d);
    small_cluster_image(&d, "small.qed");
    // A raw source with holes, zero runs shorter and longer than 4 KiB inside data, and data
    // across 2 MiB buffer boundaries and L2 tables.
    d.qemu(&["create", "-q", "-f", "raw", "src.raw", "40M"])
        .ok();
    d.qio(
        "raw",
        "src.raw",
        &[
            "write -P 1 0 3M",
            "write -z 4k 2k",
            "write -z 64k 8k",
            "write -P 2 5M 1k",
            "write -P 3 6143k 2M",
            "write -P 4 33M 512",
            "write -P 5 40956k 4k",
        ],
    );
    let cases: &[(&str, &[&str])] = &[
        ("ov.qed", &["-O", "raw"]),
        ("ov.qed", &["-O", "qed"]),
        (
            "top.qed",
            &["-O", "qed", "-o", "cluster_size=4k,table_size=2"],
        ),
        ("small.qed", &["-O", "qed"]),
        ("small.qed", &["-O", "raw"]),
        ("src.raw", &["-f", "raw", "-O", "qed"]),
        (
            "src.raw",
            &[
                "-f",
                "raw",
                "-O",
                "qed",
                "-o",
                "cluster_size=4096,table_size=2",
            ],
        ),
        (
            "src.raw",
            &["-f", "raw", "-O", "qed", "-o", "cluster_size=1M"],
        ),
        ("src.raw", &["-f", "raw", "-O", "raw"]),
        ("base.raw", &["-O", "qed", "-S", "0"]),
    ];
    for (i, (src, opts)) in cases.iter().enumerate() {
        let a = format!("q{i}.out");
        let b = format!("o{i}.out");
        let mut qa = vec!["convert"];
        qa.extend_from_slice(opts);
        qa.extend_from_slice(&[src, &a]);
        let mut oa = vec!["convert", "-p"];
        oa.extend_from_slice(opts);
        oa.extend_from_slice(&[src, &b]);
        d.qemu(&qa).ok();
        let o = d.ours(&oa).ok();
        // -p prints qemu-img's steps on a pipe too, and nothing else.
        assert!(
            o.stdout.starts_with("    (0.00/100%)\r")
                && o.stdout.ends_with("    (100.00/100%)\r\n")
                && o.stderr.is_empty(),
            "{:?} {:?}",
            o.stdout,
            o.stderr
        );
        assert!(
            d.bytes(&a) == d.bytes(&b),
            "convert {} {src}: output differs from qemu-img's",
            opts.join(" ")
        );
        assert_eq!(
            d.qemu(&["compare", src, &b]).code,
            0,
            "compare after convert {i}"
        );
        // Raw output: sparse the same way, the same data and holes in the files. (QEMU writes the
        // zeros around data in a new QED cluster; we leave them as holes.)
        if opts.last() != Some(&"raw") {
            continue;
        }
        let qm = d
            .qemu(&["map", "--output=json", "-f", "raw", &a])
            .ok()
            .stdout;
        let om = d
            .qemu(&["map", "--output=json", "-f", "raw", &b])
            .ok()
            .stdout;
        assert_eq!(qm, om, "convert {i}: holes differ");
    }
    // Round trip through qed and back.
    d.ours(&["convert", "-O", "qed", "src.raw", "rt.qed"]).ok();
    d.ours(&["convert", "-O", "raw", "rt.qed", "rt.raw"]).ok();
    assert!(d.bytes("rt.raw") == d.bytes("src.raw"));
    // -n writes into an existing image and zeroes what the source has as zeros.
    d.qemu(&["create", "-q", "-f", "qed", "n.qed", "16M"]).ok();
    d.qio("qed", "n.qed", &["write -P 0x77 0 16M"]);
    d.ours(&["convert", "-n", "-O", "qed", "ov.qed", "n.qed"])
        .ok();
    assert_eq!(d.qemu(&["compare", "ov.qed", "n.qed"]).code, 0);
}

#[test]
fn compare_matches_qemu() {
    let d = Dir::new();
    raw_chain(&d);
    d.qemu(&["convert", "-O", "raw", "ov.qed", "ov.raw"]).ok();
    d.qemu(&["convert", "-O", "qed", "ov.qed", "flat.qed"]).ok();
    d.copy("ov.raw", "diff.raw");
    d.qio("raw", "diff.raw", &["write -P 0x99 9437696 10"]);
    d.copy("ov.raw", "big.raw");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.p("big.raw"))
        .unwrap();
    f.set_len(20 << 20).unwrap();
    drop(f);
    d.copy("big.raw", "bigdiff.raw");
    d.qio("raw", "bigdiff.raw", &["write -P 1 18M 4k"]);
    d.qemu(&["create", "-q", "-f", "qed", "zero.qed", "16M"])
        .ok();
    for (a, b, code) in [
        ("ov.qed", "ov.raw", 0),
        ("ov.raw", "ov.qed", 0),
        ("ov.qed", "flat.qed", 0),
        ("ov.qed", "diff.raw", 1),
        ("diff.raw", "flat.qed", 1),
        ("ov.qed", "zero.qed", 1),
        ("ov.qed", "base.raw", 1),
        ("big.raw", "ov.qed", 0),
        ("ov.qed", "bigdiff.raw", 1),
    ] {
        let o = same(&d, &["compare", a, b]);
        assert_eq!(o.code, code, "compare {a} {b}: {}", o.stdout);
        same(&d, &["compare", "-q", a, b]);
    }
    // Strict mode: sizes, and the block status of copies. (Where QEMU's block status flags
    // differ between two images depends on its internals; we compare allocation, zero and data.)
    d.copy("ov.qed", "ov2.qed");
    for (a, b) in [("ov.qed", "ov2.qed"), ("big.raw", "ov.qed")] {
        same(&d, &["compare", "-s", a, b]);
    }
    same(
        &d,
        &["compare", "-f", "qed", "-F", "raw", "ov.qed", "ov.raw"],
    );
    // Errors: exit 2, naming the file.
    let o = d.ours(&["compare", "ov.qed", "missing.qed"]);
    assert_eq!(o.code, 2);
    assert!(o.stderr.contains("missing.qed"), "{}", o.stderr);
    assert_eq!(d.qemu(&["compare", "ov.qed", "missing.qed"]).code, 2);
}

#[test]
fn create_makes_what_qemu_makes() {
    let d = Dir::new();
    d.qemu(&["create", "-q", "-f", "raw", "b.raw", "3M"]).ok();
    d.qemu(&["create", "-q", "-f", "qed", "b.qed", "5M"]).ok();
    let cases: &[&[&str]] = &[
        &["-f", "qed", "X", "1G"],
        &[
            "-f",
            "qed",
            "-o",
            "cluster_size=4k,table_size=2",
            "X",
            "100M",
        ],
        &[
            "-f",
            "qed",
            "-o",
            "cluster_size=1M",
            "-o",
            "table_size=16",
            "X",
            "1.5T",
        ],
        &["-f", "qed", "-b", "b.raw", "-F", "raw", "X", "16M"],
        &["-f", "qed", "-b", "b.raw", "-F", "raw", "X"],
        &["-f", "qed", "-b", "b.qed", "-F", "qed", "X"],
        &[
            "-f",
            "qed",
            "-o",
            "backing_file=b.qed,backing_fmt=qed",
            "X",
            "7M",
        ],
        &["-f", "qed", "X", "1000"],
        &["-f", "raw", "X", "1000"],
        &["-f", "raw", "X", "5M"],
    ];
    for (i, args) in cases.iter().enumerate() {
        let q = format!("q{i}.img");
        let o = format!("o{i}.img");
        let qa: Vec<&str> = std::iter::once("create")
            .chain(args.iter().map(|a| if *a == "X" { q.as_str() } else { a }))
            .collect();
        let oa: Vec<&str> = std::iter::once("create")
            .chain(args.iter().map(|a| if *a == "X" { o.as_str() } else { a }))
            .collect();
        let qo = d.qemu(&qa).ok();
        let oo = d.ours(&oa).ok();
        assert_eq!(
            qo.stdout.replace(&q, "X"),
            oo.stdout.replace(&o, "X"),
            "create {i}"
        );
        // Same bytes (QEMU writes the L1 table's zeros, we leave them sparse: same content).
        assert!(d.bytes(&q) == d.bytes(&o), "create {i}: file differs");
        if args.contains(&"qed") {
            assert_eq!(d.qemu(&["check", &o]).code, 0);
        }
        let qi = d.qemu(&["info", "--output=json", &q]).ok().stdout;
        let oi = d.qemu(&["info", "--output=json", &o]).ok().stdout;
        let strip = |s: &str, n: &str| {
            s.lines()
                .filter(|l| !l.contains("actual-size"))
                .collect::<Vec<_>>()
                .join("\n")
                .replace(n, "X")
        };
        assert_eq!(strip(&qi, &q), strip(&oi, &o), "create {i}: info differs");
    }
    // Sizes and options qemu-img refuses are refused.
    for bad in [
        &["create", "-f", "qed", "x.qed", "12Q"][..],
        &[
            "create",
            "-f",
            "qed",
            "-o",
            "cluster_size=3000",
            "x.qed",
            "1G",
        ],
        &["create", "-f", "qed", "-o", "table_size=3", "x.qed", "1G"],
        &["create", "-f", "qed", "-o", "bogus=1", "x.qed", "1G"],
        &[
            "create",
            "-f",
            "qed",
            "-b",
            "missing.raw",
            "-F",
            "raw",
            "x.qed",
        ],
    ] {
        let o = d.ours(bad);
        assert_eq!(o.code, 1, "{bad:?}: {}", o.stderr);
        assert!(o.stderr.starts_with("qed-img: "), "{}", o.stderr);
    }
    let o = d.ours(&["create", "-f", "qed", "-o", "help", "x.qed"]).ok();
    assert!(o.stdout.contains("cluster_size"));
}

#[test]
fn resize_grows_like_qemu() {
    let d = Dir::new();
    d.qemu(&["create", "-q", "-f", "qed", "a.qed", "10M"]).ok();
    d.qio("qed", "a.qed", &["write -P 1 0 1M"]);
    d.copy("a.qed", "b.qed");
    for size in ["+5M", "1G"] {
        let q = d.qemu(&["resize", "a.qed", size]).ok();
        let o = d.ours(&["resize", "b.qed", size]).ok();
        assert_eq!(q.stdout, o.stdout);
        assert!(
            d.bytes("a.qed") == d.bytes("b.qed"),
            "resize {size}: files differ"
        );
    }
    assert_eq!(d.qemu(&["check", "b.qed"]).code, 0);
    // Shrinking is refused, with and without --shrink.
    let o = same(&d, &["resize", "b.qed", "1M"]);
    assert_eq!(o.code, 1);
    let o = d.ours(&["resize", "--shrink", "b.qed", "-1M"]);
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("b.qed"), "{}", o.stderr);
    // Raw files resize both ways.
    d.qemu(&["create", "-q", "-f", "raw", "r.raw", "1M"]).ok();
    d.ours(&["resize", "r.raw", "+1M"]).ok();
    assert_eq!(std::fs::metadata(d.p("r.raw")).unwrap().len(), 2 << 20);
    d.ours(&["resize", "--shrink", "r.raw", "512k"]).ok();
    assert_eq!(std::fs::metadata(d.p("r.raw")).unwrap().len(), 512 << 10);
}

#[test]
fn rebase_unsafe_and_safe() {
    let d = Dir::new();
    raw_chain(&d);
    qed_chain(&d);
    // -u: header only, same bytes as qemu-img's.
    d.copy("ov.qed", "u1.qed");
    d.copy("ov.qed", "u2.qed");
    d.qemu(&["rebase", "-u", "-b", "base.qed", "-F", "qed", "u1.qed"])
        .ok();
    d.ours(&["rebase", "-u", "-b", "base.qed", "-F", "qed", "u2.qed"])
        .ok();
    assert!(
        d.bytes("u1.qed") == d.bytes("u2.qed"),
        "rebase -u: files differ"
    );
    d.qemu(&["rebase", "-u", "-b", "", "u1.qed"]).ok();
    d.ours(&["rebase", "-u", "-b", "", "u2.qed"]).ok();
    assert!(
        d.bytes("u1.qed") == d.bytes("u2.qed"),
        "rebase -u -b '': files differ"
    );

    // Safe rebase: the guest contents stay the same, onto another file or onto none.
    for (img, new, fmt) in [
        ("ov.qed", "base.qed", "qed"),
        ("top.qed", "base.qed", "qed"),
        ("top.qed", "base.raw", "raw"),
        ("ov.qed", "", ""),
        ("top.qed", "", ""),
    ] {
        let orig = format!("{img}.orig.raw");
        let work = format!("w-{img}");
        d.copy(img, &work);
        d.qemu(&["convert", "-O", "raw", img, &orig]).ok();
        let mut args = vec!["rebase", "-p", "-b", new];
        if !fmt.is_empty() {
            args.extend_from_slice(&["-F", fmt]);
        }
        args.push(&work);
        d.ours(&args).ok();
        let o = d.qemu(&["compare", &orig, &work]);
        assert_eq!(o.code, 0, "rebase {img} onto '{new}': {}", o.stdout);
        assert_eq!(d.qemu(&["check", &work]).code, 0);
        let info = d.qemu(&["info", "--output=json", &work]).ok().stdout;
        if new.is_empty() {
            assert!(!info.contains("backing-filename"), "{info}");
        } else {
            assert!(
                info.contains(&format!("\"backing-filename\": \"{new}\"")),
                "{info}"
            );
        }
    }
}

#[test]
fn commit_into_raw_and_qed() {
    let d = Dir::new();
    raw_chain(&d);
    qed_chain(&d);
    for (top, base) in [("ov.qed", "base.raw"), ("top.qed", "mid.qed")] {
        // Oracle: qemu-img commit on copies.
        let dq = Dir::new();
        for f in ["base.raw", "ov.qed", "base.qed", "mid.qed", "top.qed"] {
            std::fs::copy(d.p(f), dq.p(f)).unwrap();
        }
        dq.qemu(&["commit", top]).ok();
        let before = format!("{top}.raw");
        d.qemu(&["convert", "-O", "raw", top, &before]).ok();
        let o = d.ours(&["commit", "-p", top]).ok();
        assert!(
            o.stdout.starts_with("    (0.00/100%)\r")
                && o.stdout.ends_with("(100.00/100%)\r\nImage committed.\n"),
            "{:?}",
            o.stdout
        );
        // The base now reads as the overlay did.
        let base_raw = format!("{base}.after.raw");
        d.qemu(&["convert", "-O", "raw", base, &base_raw]).ok();
        assert_eq!(
            d.qemu(&["compare", &before, &base_raw]).code,
            0,
            "commit {top}"
        );
        // ... and as qemu-img's committed base.
        let theirs = format!("{}/{base}", dq.path.display());
        assert_eq!(d.qemu(&["compare", &theirs, base]).code, 0);
        if base.ends_with(".qed") {
            assert_eq!(d.qemu(&["check", base]).code, 0);
        }
    }
    let o = d.ours(&["commit", "base.qed"]);
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("base.qed"), "{}", o.stderr);
}

#[test]
fn bench_output_and_effects() {
    let d = Dir::new();
    d.qemu(&["create", "-q", "-f", "qed", "b.qed", "64M"]).ok();
    let check_lines = |o: &Out, first: &str| {
        let lines: Vec<&str> = o.stdout.lines().collect();
        assert_eq!(lines[0], first, "{}", o.stdout);
        let last = lines.last().unwrap();
        assert!(
            last.starts_with("Run completed in ") && last.ends_with(" seconds."),
            "{}",
            o.stdout
        );
        let secs = &last["Run completed in ".len()..last.len() - " seconds.".len()];
        assert!(secs.parse::<f64>().is_ok() && secs.split('.').nth(1).unwrap().len() == 3);
    };
    let args = [
        "bench",
        "-w",
        "-c",
        "2000",
        "-d",
        "8",
        "-s",
        "4k",
        "-S",
        "64k",
        "--pattern=165",
        "b.qed",
    ];
    let o = d.ours(&args).ok();
    check_lines(
        &o,
        "Sending 2000 write requests, 4096 bytes each, 8 in parallel (starting at offset 0, step size 65536)",
    );
    let q = d.qemu(&args).ok();
    assert_eq!(q.stdout.lines().next(), o.stdout.lines().next());
    assert_eq!(d.qemu(&["check", "b.qed"]).code, 0);
    // 2000 steps of 64 KiB wrap at 64 MiB (1024 steps): every 64 KiB cluster starts with the
    // pattern.
    d.qio(
        "qed",
        "b.qed",
        &["read -P 165 0 4k", "read -P 165 63M 4k", "read -P 0 4k 60k"],
    );
    let o = d
        .ours(&[
            "bench",
            "-w",
            "-c",
            "1000",
            "-d",
            "4",
            "-o",
            "4096",
            "--flush-interval=100",
            "-t",
            "none",
            "b.qed",
        ])
        .ok();
    assert!(o.stdout.contains("Sending flush every 100 requests\n"));
    let o = d
        .ours(&[
            "bench",
            "-w",
            "-c",
            "300",
            "--flush-interval=7",
            "--no-drain",
            "-n",
            "b.qed",
        ])
        .ok();
    assert!(o
        .stdout
        .starts_with("Sending 300 write requests, 4096 bytes each, 64 in parallel"));
    let o = d
        .ours(&["bench", "-c", "5000", "-d", "16", "-s", "64k", "b.qed"])
        .ok();
    check_lines(
        &o,
        "Sending 5000 read requests, 65536 bytes each, 16 in parallel (starting at offset 0, step size 65536)",
    );
    assert_eq!(d.qemu(&["check", "b.qed"]).code, 0);
    // Raw files too.
    d.qemu(&["create", "-q", "-f", "raw", "b.raw", "8M"]).ok();
    d.ours(&[
        "bench",
        "-f",
        "raw",
        "-w",
        "-c",
        "100",
        "--pattern=7",
        "b.raw",
    ])
    .ok();
    d.qio("raw", "b.raw", &["read -P 7 0 400k"]);
    // Invalid arguments.
    assert_eq!(d.ours(&["bench", "-d", "0", "b.qed"]).code, 1);
    assert_eq!(d.ours(&["bench", "--flush-interval=3", "b.qed"]).code, 1);
}

/// QED benches run through the asynchronous queue: writes with flushes (drained, undrained,
/// after every write, or skipped) all land, and a request past the end stops the run with
/// requests in flight and leaves a clean image.
#[test]
fn bench_async_writes_land_and_failures_stop() {
    let d = Dir::new();
    let modes: [&[&str]; 5] = [
        &["--flush-interval=10"],
        &["--flush-interval=10", "--no-drain"],
        &["--flush-interval=3", "-t", "unsafe"],
        &["-t", "writethrough"],
        &["-t", "directsync", "--flush-interval=40"],
    ];
    for (i, mode) in modes.iter().enumerate() {
        let img = format!("w{i}.qed");
        d.qemu(&["create", "-q", "-f", "qed", &img, "16M"]).ok();
        // qemu-img's number syntax: hex here (as scripts/bench passes it).
        let pattern = format!("--pattern={:#x}", 17 + i);
        // 300 steps of 64 KiB wrap once at 16 MiB (256 steps).
        let mut args = vec!["bench", "-w", "-c", "300", "-d", "8", "-S", "64k", &pattern];
        args.extend_from_slice(mode);
        args.push(&img);
        let o = d.ours(&args).ok();
        assert!(o.stdout.ends_with(" seconds.\n"), "{mode:?}: {}", o.stdout);
        assert_eq!(d.qemu(&["check", &img]).code, 0, "{mode:?}");
        let p = 17 + i;
        d.qio(
            "qed",
            &img,
            &[
                &format!("read -P {p} 0 4k"),
                &format!("read -P {p} 15M 4k"),
                &format!("read -P {p} 16320k 4k"),
                "read -P 0 4k 60k",
            ],
        );
    }
    // Counts in C's base-0 syntax, as qemu-img reads them.
    let args = ["bench", "-c", "0x10", "-d", "010", "w0.qed"];
    let o = d.ours(&args).ok();
    assert_eq!(
        o.stdout.lines().next(),
        d.qemu(&args).ok().stdout.lines().next()
    );
    assert!(o
        .stdout
        .starts_with("Sending 16 read requests, 4096 bytes each, 8 in parallel"));
    // 64 KiB requests every 48 KiB: offset 67092480 runs past 64 MiB after ~1365 requests.
    d.qemu(&["create", "-q", "-f", "qed", "f.qed", "64M"]).ok();
    for extra in [&[][..], &["-w", "--flush-interval=50"]] {
        let mut args = vec!["bench", "-c", "5000", "-d", "16", "-s", "64k", "-S", "48k"];
        args.extend_from_slice(extra);
        args.push("f.qed");
        let q = d.qemu(&args);
        let o = d.ours(&args);
        assert_eq!((o.code, q.code), (1, 1), "{extra:?}: {}", o.stderr);
        assert_eq!(o.stdout, q.stdout);
        assert!(
            o.stderr
                .starts_with("qed-img: Failed request: Input/output error (offset 67092480 "),
            "{}",
            o.stderr
        );
        assert_eq!(d.qemu(&["check", "f.qed"]).code, 0);
    }
}

#[test]
fn errors_name_the_file() {
    let d = Dir::new();
    for args in [
        &["info", "nope.qed"][..],
        &["check", "nope.qed"],
        &["map", "nope.qed"],
        &["convert", "-O", "qed", "nope.qed", "x.qed"],
        &["resize", "nope.qed", "+1M"],
        &["rebase", "-u", "-b", "x", "nope.qed"],
        &["commit", "nope.qed"],
        &["bench", "nope.qed"],
    ] {
        let o = d.ours(args);
        assert_eq!(o.code, 1, "{args:?}");
        assert!(
            o.stderr.starts_with("qed-img: ") && o.stderr.contains("nope.qed"),
            "{args:?}: {}",
            o.stderr
        );
    }
    // A file held by a writer: refused, naming it.
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", "-c", "sleep 3000", "held.raw"])
        .current_dir(&d.path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    std::fs::write(d.p("held.raw"), vec![0u8; 4096]).unwrap();
    let mut child = cmd.spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let o = d.ours(&["resize", "-f", "raw", "held.raw", "+1M"]);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(o.stderr.contains("held.raw"), "{}", o.stderr);
    // Usage errors exit 1 too.
    assert_eq!(d.ours(&["info"]).code, 1);
    assert_eq!(d.ours(&["frobnicate"]).code, 1);
    assert_eq!(d.ours(&["--help"]).code, 0);
}

#[test]
fn stream_drops_the_backing_file() {
    let d = Dir::new();
    raw_chain(&d);
    qed_chain(&d);
    for top in ["ov.qed", "top.qed"] {
        let before = format!("{top}.raw");
        d.qemu(&["convert", "-O", "raw", top, &before]).ok();
        let o = d.ours(&["stream", "-p", top]).ok();
        // qemu-img -p's lines: each ended by a carriage return, the last by a newline.
        assert!(o.stdout.starts_with("    (0.00/100%)\r"), "{:?}", o.stdout);
        assert!(
            o.stdout.ends_with("    (100.00/100%)\r\n"),
            "{:?}",
            o.stdout
        );
        let info = d.qemu(&["info", top]).ok();
        assert!(
            !info.stdout.contains("backing file"),
            "{top}: {}",
            info.stdout
        );
        assert_eq!(d.qemu(&["check", top]).code, 0, "check {top}");
        assert_eq!(d.qemu(&["compare", &before, top]).code, 0, "compare {top}");
        // Nothing left to do; -q prints nothing.
        let o = d.ours(&["stream", "-q", "-p", top]).ok();
        assert_eq!(o.stdout, "");
    }
    let o = d.ours(&["stream", "-f", "raw", "base.raw"]);
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("base.raw"), "{}", o.stderr);
}

#[test]
fn help_lists_every_subcommand() {
    let o = Command::new(QED_IMG).arg("--help").output().unwrap();
    let s = String::from_utf8_lossy(&o.stdout);
    for sub in [
        "create", "info", "check", "map", "convert", "compare", "resize", "rebase", "commit",
        "bench", "stream",
    ] {
        assert!(s.contains(sub), "{sub} missing from --help:\n{s}");
    }
}

/// `qed-img sparsify`: an image whose guest wrote data and then zeros over it (QEMU's
/// write-zeroes without unmap writes the zeros in place) gets those clusters' blocks back;
/// every cluster keeps its entry, so qemu-img check stays clean, and the contents do not change
/// (qemu-img compare with a copy made before). Data clusters and a partly zero cluster stay.
#[test]
fn sparsify_gives_back_zeroed_clusters() {
    use std::os::unix::fs::MetadataExt;
    let d = Dir::new();
    d.qemu(&["create", "-q", "-f", "qed", "a.qed", "8M"]).ok();
    d.qio(
        "qed",
        "a.qed",
        &[
            "write -P 0x5a 0 4M",
            "write -P 0 64k 3M",
            "write -P 7 1M 100",
        ],
    );
    d.copy("a.qed", "before.qed");
    let blocks = |name: &str| std::fs::metadata(d.p(name)).unwrap().blocks();
    let b0 = blocks("a.qed");
    let o = d.ours(&["sparsify", "a.qed"]).ok();
    // 3M of zeros at 64k is 48 clusters, one of which (at 1M) holds 100 written bytes.
    assert!(
        o.stdout.contains("47 zero clusters (3080192 bytes)"),
        "{}",
        o.stdout
    );
    let b1 = blocks("a.qed");
    assert!(
        b1 + 47 * 128 <= b0 + 128,
        "st_blocks {b0} -> {b1}: 47 clusters not given back"
    );
    assert_eq!(d.qemu(&["check", "a.qed"]).code, 0);
    d.qemu(&["compare", "-q", "a.qed", "before.qed"]).ok();
    d.qio(
        "qed",
        "a.qed",
        &["read -P 0 2M 1M", "read -P 7 1M 100", "read -P 0x5a 0 64k"],
    );
    // Nothing left to give back; quiet prints nothing.
    let o = d.ours(&["sparsify", "-q", "a.qed"]).ok();
    assert_eq!(o.stdout, "");
    // A raw file is refused: its zeros are the guest's data.
    d.qemu(&["create", "-q", "-f", "raw", "r.raw", "1M"]).ok();
    let o = d.ours(&["sparsify", "r.raw"]);
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("QED images only"), "{}", o.stderr);
}

/// `-p` on a terminal (a pty from script(1)) prints what qemu-img prints: `    (x.xx/100%)`
/// steps ended by `\r`, from 0.00 up to 100.00, then a line feed; qemu-img's own output for the
/// same convert has that shape too.
#[test]
fn progress_output_on_a_terminal_is_qemu_img_s() {
    // script(1) is in util-linux (Debian: bsdutils, essential): never skipped.
    assert!(
        Command::new("script").arg("-V").output().is_ok(),
        "script(1) from util-linux is needed for a pty"
    );
    let d = Dir::new();
    raw_chain(&d);
    // The pty turns "\n" into "\r\n"; the steps are what lies between the '\r's before it.
    let on_tty = |prog: &str, args: &str| -> String {
        let o = d.run("script", &["-qec", &format!("{prog} {args}"), "/dev/null"]);
        assert_eq!(o.code, 0, "{prog} {args}: {}{}", o.stdout, o.stderr);
        o.stdout.replace("\r\n", "\n")
    };
    let steps = |out: &str| -> Vec<f64> {
        let (line, _) = out.split_once('\n').expect("a line feed after the steps");
        let parts: Vec<&str> = line.split('\r').collect();
        assert_eq!(parts.last(), Some(&""), "every step ends with \\r: {out:?}");
        parts[..parts.len() - 1]
            .iter()
            .map(|p| {
                let v = p
                    .strip_prefix("    (")
                    .and_then(|p| p.strip_suffix("/100%)"))
                    .unwrap_or_else(|| panic!("not a qemu-img step: {p:?} in {out:?}"));
                assert_eq!(v.split_once('.').map(|(_, f)| f.len()), Some(2), "{p:?}");
                v.parse().unwrap()
            })
            .collect()
    };
    let shape = |v: &[f64], what: &str| {
        assert!(v.len() >= 2, "{what}: {v:?}");
        assert_eq!(v[0], 0.0, "{what}: {v:?}");
        assert_eq!(*v.last().unwrap(), 100.0, "{what}: {v:?}");
        assert!(v.windows(2).all(|w| w[1] >= w[0]), "{what}: {v:?}");
    };
    let q = on_tty("qemu-img", "convert -p -O qed ov.qed q.qed");
    shape(&steps(&q), "qemu-img convert");
    let ours = on_tty(QED_IMG, "convert -p -O qed ov.qed o.qed");
    shape(&steps(&ours), "qed-img convert");
    assert!(
        ours.ends_with("\n") && ours.matches('\n').count() == 1,
        "{ours:?}"
    );
    assert!(d.bytes("q.qed") == d.bytes("o.qed"));
    // commit: the steps, then qemu-img's message on its own line.
    let ours = on_tty(QED_IMG, "commit -p ov.qed");
    shape(&steps(&ours), "qed-img commit");
    assert!(ours.ends_with("\nImage committed.\n"), "{ours:?}");
    // check: the steps, then the report.
    d.qemu(&["convert", "-O", "qed", "ov.qed", "c.qed"]).ok();
    let ours = on_tty(QED_IMG, "check -p c.qed");
    shape(&steps(&ours), "qed-img check");
    assert!(
        ours.contains("\r\nNo errors were found on the image.\n"),
        "{ours:?}"
    );
    // -q wins over -p.
    assert_eq!(on_tty(QED_IMG, "convert -q -p -O qed ov.qed o2.qed"), "");
}

#[test]
fn messages_carry_the_invoked_name_and_qemu_img_s_wording() {
    let d = Dir::new();
    // The prefix is the program's file name as invoked.
    let o = d.ours(&["info", "nope.qed"]);
    assert!(
        o.stderr.starts_with("qed-img: Could not open 'nope.qed'"),
        "{}",
        o.stderr
    );
    let o = d.as_qemu_img(&["info", "nope.qed"]);
    assert!(
        o.stderr.starts_with("qemu-img: Could not open 'nope.qed'"),
        "{}",
        o.stderr
    );
    // A missing backing file at create: the cause, then qemu-img's hint line.
    same_all(
        &d,
        &[
            "create", "-f", "qed", "-b", "gone.qed", "-F", "qed", "x.qed",
        ],
    );
    // Backing loops found by info --backing-chain, named as qemu-img names them.
    d.qemu(&["create", "-q", "-f", "qed", "a.qed", "1M"]).ok();
    d.qemu(&[
        "create", "-q", "-f", "qed", "-b", "a.qed", "-F", "qed", "b.qed",
    ])
    .ok();
    d.qemu(&[
        "create", "-q", "-f", "qed", "-b", "b.qed", "-F", "qed", "c.qed",
    ])
    .ok();
    let (q, o) = (
        d.qemu(&["info", "--backing-chain", "c.qed"]).ok(),
        d.as_qemu_img(&["info", "--backing-chain", "c.qed"]).ok(),
    );
    assert_eq!(q.stdout, strip_qed_specific(&o.stdout));
    d.qemu(&["rebase", "-u", "-b", "c.qed", "-F", "qed", "a.qed"])
        .ok();
    let o = same_all(&d, &["info", "--backing-chain", "c.qed"]);
    assert_eq!(
        o.stderr,
        "qemu-img: Backing file 'c.qed' creates an infinite loop.\n"
    );
    // A loop further down, met after the first two images.
    d.qemu(&["rebase", "-u", "-b", "b.qed", "-F", "qed", "a.qed"])
        .ok();
    let o = same_all(&d, &["info", "--backing-chain", "--output=json", "c.qed"]);
    assert_eq!(
        o.stderr,
        "qemu-img: Backing file 'b.qed' creates an infinite loop.\n"
    );
}

#[test]
fn dd_copies_as_qemu_img_dd() {
    let d = Dir::new();
    d.qemu(&["create", "-q", "-f", "qed", "a.qed", "1M"]).ok();
    d.qio(
        "qed",
        "a.qed",
        &["write -P 0xa 0 300k", "write -P 0xb 700k 5k"],
    );
    for bs in ["5", "512", "1999", "64K", "1.5k", "4M"] {
        let bs_op = format!("bs={bs}");
        for (tool, out) in [("qemu", "q.raw"), ("ours", "o.raw")] {
            let of = format!("of={out}");
            let args = ["dd", "if=a.qed", &of, &bs_op];
            let o = if tool == "qemu" {
                d.qemu(&args)
            } else {
                d.ours(&args)
            };
            assert_eq!(
                (o.code, o.stdout.as_str(), o.stderr.as_str()),
                (0, "", ""),
                "{bs}"
            );
        }
        assert!(
            d.bytes("q.raw") == d.bytes("o.raw"),
            "bs={bs}: outputs differ"
        );
        // A QED output holds the same guest bytes and is clean.
        d.ours(&["dd", "-O", "qed", "if=a.qed", "of=o.qed", &bs_op])
            .ok();
        d.qemu(&["check", "o.qed"]).ok();
        d.qemu(&["compare", "a.qed", "o.qed"]).ok();
    }
    // skip alone matches qemu-img byte for byte.
    d.qemu(&["dd", "if=a.qed", "of=q.raw", "bs=4k", "skip=3"])
        .ok();
    d.ours(&["dd", "if=a.qed", "of=o.raw", "bs=4k", "skip=3"])
        .ok();
    assert!(d.bytes("q.raw") == d.bytes("o.raw"));
    assert_eq!(d.bytes("o.raw").len(), (1 << 20) - 3 * 4096);
    // count counts the blocks after the skipped ones (dd(1), qemu-img's manual).
    d.ours(&["dd", "if=a.qed", "of=o.raw", "bs=100k", "skip=2", "count=2"])
        .ok();
    let b = d.bytes("o.raw");
    assert_eq!(b.len(), 200 << 10);
    assert!(b[..100 << 10].iter().all(|&x| x == 0xa));
    assert!(b[100 << 10..].iter().all(|&x| x == 0));
    // Skipping past the end: an empty output and qemu-img's warning.
    let o = same_all(&d, &["dd", "if=a.qed", "of=e.raw", "bs=1M", "skip=3"]);
    assert!(o.stderr.contains("cannot skip"), "{}", o.stderr);
    assert_eq!(d.bytes("e.raw").len(), 0);
    // Operand errors, word for word.
    for bad in [
        &["dd", "if=a.qed", "of=x", "bs=0"][..],
        &["dd", "if=a.qed", "of=x", "bs=x"],
        &["dd", "if=a.qed", "of=x", "count=1k"],
        &["dd", "if=a.qed", "of=x", "skip=-1"],
        &["dd", "if=a.qed", "of=x", "foo=1"],
        &["dd", "if=a.qed", "of=x", "if"],
        &["dd", "if=a.qed"],
        &["dd", "if=nope", "of=x"],
    ] {
        let o = d.as_qemu_img(bad);
        let q = d.qemu(bad);
        assert_eq!(o.code, 1, "{bad:?}");
        assert_eq!(q.code, 1, "{bad:?}");
        assert!(o.stderr.starts_with("qemu-img: "), "{bad:?}: {}", o.stderr);
        if !bad[1].contains("nope") {
            assert_eq!(q.stderr, o.stderr, "{bad:?}");
        }
        assert!(!d.p("x").exists(), "{bad:?} created its output");
    }
}

/// Safe rebase writes each run of differing clusters in one request, as qemu-img does, so the
/// overlay's clusters land where qemu-img's land: identical `map` afterwards.
#[test]
fn rebase_writes_runs_as_qemu_img() {
    let d = Dir::new();
    let mut maps = Vec::new();
    for tool in ["qemu", "ours"] {
        d.qemu(&["create", "-q", "-f", "qed", "bo.qed", "1M"]).ok();
        d.qemu(&["create", "-q", "-f", "qed", "bn.qed", "1M"]).ok();
        d.qemu(&[
            "create", "-q", "-f", "qed", "-b", "bo.qed", "-F", "qed", "ov.qed",
        ])
        .ok();
        d.qio(
            "qed",
            "bo.qed",
            &["write -P 0x11 0 128k", "write -P 0x11 192k 64k"],
        );
        d.qio(
            "qed",
            "bn.qed",
            &["write -P 0x22 64k 128k", "write -P 0x11 192k 64k"],
        );
        let args = ["rebase", "-b", "bn.qed", "-F", "qed", "ov.qed"];
        if tool == "qemu" {
            d.qemu(&args).ok();
        } else {
            d.ours(&args).ok();
        }
        maps.push(d.qemu(&["map", "--output=json", "ov.qed"]).ok().stdout);
        d.qemu(&["check", "ov.qed"]).ok();
        d.qio(
            "qed",
            "ov.qed",
            &["read -P 0x11 0 128k", "read -P 0 128k 64k"],
        );
    }
    assert_eq!(maps[0], maps[1]);
}

/// `file:NAME` is QEMU's file protocol: the prefix names no folder, and a relative name with a
/// colon is shown as `./NAME`, backing paths combined from it.
#[test]
fn file_protocol_prefix_as_qemu_img() {
    let d = Dir::new();
    let mut outs = Vec::new();
    for tool in ["qemu", "ours"] {
        let run = |args: &[&str]| d.by(tool, args).ok();
        let top = format!("{tool}:top.qed");
        let name = format!("file:{top}");
        let mut out = run(&["create", "-f", "qed", "base.qed", "1M"]).stdout;
        out += &run(&["create", "-f", "qed", "-b", "base.qed", "-F", "qed", &name]).stdout;
        assert!(d.p(&top).exists(), "{tool} did not create {top}");
        out += &strip_qed_specific(&run(&["info", &name]).stdout);
        // (Disk usage differs on purpose: libqed does not write the new L1 table's zeros.)
        let out: String = out
            .lines()
            .filter(|l| !l.trim_start().starts_with("disk size:"))
            .map(|l| format!("{l}\n"))
            .collect();
        outs.push(out.replace(&top, "TOP"));
    }
    assert_eq!(outs[0], outs[1]);
    assert!(outs[1].contains("image: ./TOP\n"), "{}", outs[1]);
    assert!(outs[1].contains("backing file: base.qed (actual path: ./base.qed)\n"));
    // Both tools made the same image.
    d.qemu(&["compare", "file:qemu:top.qed", "file:ours:top.qed"])
        .ok();
}

/// convert -B (and -o backing_file=): only the source's top image is copied, over a target
/// that names the backing file; the file comes out as qemu-img's, byte for byte.
#[test]
fn convert_onto_a_backing_file_as_qemu_img() {
    let d = Dir::new();
    d.qemu(&["create", "-q", "-f", "qed", "base.qed", "2M"])
        .ok();
    d.qio(
        "qed",
        "base.qed",
        &["write -P 0x11 0 1M", "write -P 0x12 1536k 512k"],
    );
    d.qemu(&[
        "create", "-q", "-f", "qed", "-b", "base.qed", "-F", "qed", "top.qed", "4M",
    ])
    .ok();
    d.qio(
        "qed",
        "top.qed",
        &[
            "write -P 0x21 512 1024",
            "write -P 0x22 128k 64k",
            "write -z 256k 128k",
            "write -z 3M 128k",
            "write -P 0x23 3584k 4k",
        ],
    );
    let cases: [&[&str]; 3] = [
        &["-B", "base.qed", "-F", "qed"],
        &["-o", "backing_file=base.qed,backing_fmt=qed"],
        &["-B", "base.qed", "-o", "backing_fmt=qed", "-S", "0"],
    ];
    for extra in cases {
        for (tool, out) in [("qemu", "q.qed"), ("ours", "o.qed")] {
            let mut args = vec!["convert", "-f", "qed", "-O", "qed"];
            args.extend_from_slice(extra);
            args.extend_from_slice(&["top.qed", out]);
            let o = if tool == "qemu" {
                d.qemu(&args)
            } else {
                d.ours(&args)
            };
            o.ok();
        }
        assert!(
            d.bytes("q.qed") == d.bytes("o.qed"),
            "{extra:?}: files differ"
        );
        d.qemu(&["check", "o.qed"]).ok();
        d.qemu(&["compare", "top.qed", "o.qed"]).ok();
        let info = d.qemu(&["info", "o.qed"]).ok().stdout;
        assert!(info.contains("backing file: base.qed\n"), "{info}");
    }
    // No backing file for raw targets, as qemu-img.
    assert_eq!(
        d.ours(&["convert", "-B", "base.qed", "top.qed", "x.raw"])
            .code,
        1
    );
    assert!(!d.p("x.raw").exists());
}

/// commit -b BASE: everything the images above BASE hold goes into BASE, found as qemu-img
/// finds it (a relative name is relative to the folder of the image naming it).
#[test]
fn commit_into_a_chosen_base_as_qemu_img() {
    let d = Dir::new();
    std::fs::create_dir(d.p("sub")).unwrap();
    let mut bases = Vec::new();
    for tool in ["qemu", "ours"] {
        d.qemu(&["create", "-q", "-f", "qed", "sub/b.qed", "1M"])
            .ok();
        d.qio("qed", "sub/b.qed", &["write -P 0x01 0 1M"]);
        d.overlay("b.qed", "sub/m.qed", Some("2M"));
        d.qio(
            "qed",
            "sub/m.qed",
            &["write -P 0x02 64k 128k", "write -z 512k 64k"],
        );
        d.overlay("m.qed", "sub/t.qed", None);
        d.qio(
            "qed",
            "sub/t.qed",
            &["write -P 0x03 128k 128k", "write -P 0x04 1536k 4k"],
        );
        let run = |args: &[&str]| d.by(tool, args);
        // Not a name of the chain from the overlay's folder: refused, nothing written.
        let o = run(&["commit", "-b", "sub/b.qed", "sub/t.qed"]);
        assert_eq!(o.code, 1, "{tool}");
        assert_eq!(
            o.stderr,
            "qemu-img: Did not find 'sub/b.qed' in the backing chain of 'sub/t.qed'\n"
        );
        let o = run(&["commit", "-b", "b.qed", "sub/t.qed"]).ok();
        assert_eq!(o.stdout, "Image committed.\n");
        d.qemu(&["check", "sub/b.qed"]).ok();
        // The base now reads as the top image.
        d.qemu(&["compare", "sub/t.qed", "sub/b.qed"]).ok();
        bases.push(d.bytes("sub/b.qed"));
        for f in ["sub/b.qed", "sub/m.qed", "sub/t.qed"] {
            std::fs::remove_file(d.p(f)).unwrap();
        }
    }
    // Same guest view; qemu-img's base file layout is its own block job's, so only the
    // contents are compared (above).
    assert_eq!(bases[0].len(), bases[1].len());
}

/// Images given by QEMU block options, `json:{...}` and `--image-opts`: a format over a plain
/// file is shown by its file name, anything more as `json:`; blkdebug and quorum nodes open
/// (reads vote among quorum's children); results match qemu-img's.
#[test]
fn image_options_and_json_names_as_qemu_img() {
    let d = Dir::new();
    d.qemu(&["create", "-q", "-f", "qed", "b.qed", "1M"]).ok();
    d.qio("qed", "b.qed", &["write -P 0x11 0 64k"]);
    // An absolute backing name: quorum nodes have no folder for a relative one.
    let base = d.p("b.qed").to_str().unwrap().to_string();
    d.overlay(&base, "t.qed", None);
    d.qio("qed", "t.qed", &["write -P 0x22 128k 64k"]);
    d.copy("t.qed", "t2.qed");
    d.overlay("b.qed", "rel.qed", None);
    let rel = "json:{'driver': 'qed', 'file': {'driver': 'quorum', 'vote-threshold': 1, 'children': [{'driver': 'file', 'filename': 'rel.qed'}]}}";
    assert_eq!(
        d.ours(&["info", "--backing-chain", rel]).code,
        d.qemu(&["info", "--backing-chain", rel]).code
    );
    let o = d.ours(&["map", rel]);
    assert_eq!(o.code, 1);
    assert!(
        o.stderr
            .contains("Cannot generate a base directory for quorum nodes"),
        "{}",
        o.stderr
    );
    let o = d.ours(&["info", rel]).ok().stdout;
    assert!(
        o.contains("backing file: b.qed (cannot determine actual path)\n"),
        "{o}"
    );
    let strip = |s: &str| -> String {
        strip_qed_specific(s)
            .lines()
            .filter(|l| {
                !l.contains("disk size") && !l.starts_with("Child") && !l.starts_with("    ")
            })
            .map(|l| format!("{l}\n"))
            .collect()
    };
    let plain = "json:{'driver': 'qed', 'file': {'driver': 'file', 'filename': 't.qed'}}";
    let debug = "json:{'driver': 'qed', 'file': {'driver': 'blkdebug', 'image': {'driver': 'file', 'filename': 't.qed'}, 'set-state': [{'event': 'read_aio', 'new_state': 42}]}}";
    let quorum = "json:{'driver': 'qed', 'file': {'driver': 'quorum', 'vote-threshold': 1, 'children': [{'driver': 'file', 'filename': 't.qed'}, {'driver': 'file', 'filename': 't2.qed'}]}}";
    for args in [
        &["info", plain][..],
        &["info", "--backing-chain", "--image-opts", "driver=qed,file.driver=file,file.filename=t.qed"],
        &["info", "--image-opts", "driver=qed,file.driver=quorum,file.vote-threshold=2,file.children.0.driver=file,file.children.0.filename=t.qed,file.children.1.driver=file,file.children.1.filename=t2.qed"],
        &["info", debug],
        &["info", quorum],
    ] {
        let q = d.qemu(args).ok();
        let o = d.as_qemu_img(args).ok();
        // json: names are QEMU's own spelling of the options; compare the rest.
        let unjson = |s: &str| -> String {
            s.lines()
                .map(|l| if l.starts_with("image: json:") { "image: json:..." } else { l })
                .map(|l| format!("{l}\n"))
                .collect()
        };
        assert_eq!(unjson(&strip(&q.stdout)), unjson(&strip(&o.stdout)), "{args:?}");
    }
    // Contents through the options are the image's.
    for name in [plain, debug, quorum] {
        assert_eq!(same(&d, &["compare", name, "t.qed"]).code, 0);
        same(&d, &["map", "--output=json", name]).ok();
    }
    // A quorum whose children disagree, with 2 votes needed: reads fail, as in qemu-img.
    d.qio("qed", "t2.qed", &["write -P 0x33 128k 64k"]);
    let split = "json:{'driver': 'qed', 'file': {'driver': 'quorum', 'vote-threshold': 2, 'children': [{'driver': 'file', 'filename': 't.qed'}, {'driver': 'file', 'filename': 't2.qed'}]}}";
    let q = d.qemu(&["compare", split, "t.qed"]);
    let o = d.ours(&["compare", split, "t.qed"]);
    assert_eq!(q.code, o.code, "{}\n{}", q.stderr, o.stderr);
    assert_ne!(o.code, 0);
}

/// qed-img run with `args` fails (exit 1) saying `what`.
#[track_caller]
fn fails_with(d: &Dir, args: &[&str], what: &str) {
    let o = d.ours(args);
    assert_eq!(o.code, 1, "{args:?}");
    assert!(o.stderr.contains(what), "{args:?}: {}", o.stderr);
}

/// A backing file named by options in an image's header (json:, or any protocol prefix) lets
/// the image choose drivers and host files (CVE-2024-4467): like the library, qed-img refuses
/// to create such an image or open its backing file, whether the image is opened by name or
/// by options; the user's own json: names on the command line are taken.
#[test]
fn image_chosen_backing_drivers_are_refused() {
    let d = Dir::new();
    d.qemu(&["create", "-q", "-f", "qed", "b.qed", "1M"]).ok();
    let named = "json:{'driver': 'qed', 'file': {'driver': 'file', 'filename': 'b.qed'}}";
    // The user may name an image by options ...
    d.ours(&["info", named]).ok();
    // ... but not make an image that names its backing file so.
    for args in [
        &["create", "-f", "qed", "-b", named, "-F", "qed", "t.qed"][..],
        &[
            "create",
            "-f",
            "qed",
            "-b",
            "file:b.qed",
            "-F",
            "qed",
            "t.qed",
        ],
        &[
            "convert", "-O", "qed", "-B", named, "-F", "qed", "b.qed", "t.qed",
        ],
    ] {
        fails_with(&d, args, "protocol prefix");
        assert!(!d.p("t.qed").exists(), "{args:?} created the image");
    }
    // An image made so by qemu-img opens without its backing file only.
    d.qemu(&[
        "create", "-q", "-f", "qed", "-b", named, "-F", "qed", "t.qed",
    ])
    .ok();
    d.ours(&["info", "t.qed"]).ok();
    let via_opts = "json:{'driver': 'qed', 'file': {'driver': 'blkdebug', 'image': {'driver': 'file', 'filename': 't.qed'}}}";
    for args in [
        &["map", "t.qed"][..],
        &["commit", "t.qed"],
        &["map", via_opts],
    ] {
        fails_with(&d, args, "protocol prefix (json:)");
    }
}

#[test]
fn convert_salvage_as_qemu_img() {
    let d = Dir::new();
    d.qemu(&["create", "-q", "-f", "qed", "o.qed", "8M"]).ok();
    d.qio("qed", "o.qed", &["write -P 42 0 8M"]);
    let rule = |io: &str, off: u64| {
        format!(
            "{{'event': 'none', 'iotype': '{io}', 'errno': 5, 'sector': {}}}",
            off / 512
        )
    };
    let rules = [
        rule("block-status", (2 << 20) + 8192),
        rule("block-status", (5 << 20) + 512),
        rule("read", (4 << 20) - 65536),
        rule("read", (5 << 20) + 512),
        rule("read", 6 << 20),
        rule("read", (6 << 20) + 512),
    ];
    let src = format!(
        "json:{{'driver': 'blkdebug', 'image': {{'driver': 'qed', 'file': {{'driver': 'file', 'filename': 'o.qed'}}}}, 'inject-error': [{}]}}",
        rules.join(", ")
    );
    let q = d.qemu(&["convert", "--salvage", &src, "q.raw"]).ok();
    let o = d.as_qemu_img(&["convert", "--salvage", &src, "x.raw"]).ok();
    assert_eq!(q.stderr, o.stderr);
    assert_eq!(o.stderr.lines().count(), 2 + 2 + 4, "{}", o.stderr);
    assert!(d.bytes("q.raw") == d.bytes("x.raw"), "outputs differ");
    // Without --salvage the first failure stops the copy.
    let o = d.ours(&["convert", &src, "y.raw"]);
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(o.stderr.contains("Input/output error"), "{}", o.stderr);
}
