// SPDX-License-Identifier: MIT OR Apache-2.0
//! `qed-io` against `qemu-io` 10.x as the oracle: the same commands run through both on copies of
//! one image; their merged stdout+stderr must be identical once the timing numbers of the rate
//! lines are replaced (as QEMU's iotests `_filter_qemu_io` does), their exit codes equal, the
//! resulting images identical (`qemu-img compare`) and clean (`qemu-img check`).
//!
//! qed-io runs through a link named `qemu-io`, as qemu-io names itself after argv[0] in its
//! prompt and error prefix. Needs `qemu-img` and `qemu-io` (Debian `qemu-utils`): the tests
//! fail, never skip, without them.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const QED_IO: &str = env!("CARGO_BIN_EXE_qed-io");

struct Dir {
    _tmp: tempfile::TempDir,
    path: PathBuf,
    ours: PathBuf,
}

struct Out {
    code: i32,
    text: String,
}

impl Dir {
    fn new() -> Dir {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().to_path_buf();
        let bin = path.join("bin");
        std::fs::create_dir(&bin).expect("mkdir");
        let ours = bin.join("qemu-io");
        std::os::unix::fs::symlink(QED_IO, &ours).expect("symlink");
        Dir {
            _tmp: tmp,
            path,
            ours,
        }
    }

    #[track_caller]
    fn sh(&self, prog: &str, args: &[&str]) -> String {
        let o = Command::new(prog)
            .args(args)
            .current_dir(&self.path)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {prog} (install qemu-utils): {e}"));
        assert!(
            o.status.success(),
            "{prog} {args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Runs `prog args` with stdout and stderr on one pipe (so their order is part of the
    /// result, as in the iotests' reference outputs) and `stdin` as input.
    fn run(&self, prog: &std::path::Path, args: &[&str], stdin: &str) -> Out {
        self.run_in(&self.path, prog, args, stdin)
    }

    fn run_in(
        &self,
        dir: &std::path::Path,
        prog: &std::path::Path,
        args: &[&str],
        stdin: &str,
    ) -> Out {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg("exec \"$0\" \"$@\" 2>&1")
            .arg(prog)
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("write stdin");
        let o = child.wait_with_output().expect("wait");
        Out {
            code: o.status.code().unwrap_or(-1),
            text: filter(&String::from_utf8_lossy(&o.stdout)),
        }
    }

    /// `qemu-img create -f qed [opts] name [size]`.
    fn create(&self, name: &str, opts: &[&str], size: &str) {
        let mut args = vec!["create", "-q", "-f", "qed"];
        args.extend_from_slice(opts);
        args.push(name);
        if !size.is_empty() {
            args.push(size);
        }
        self.sh("qemu-img", &args);
    }

    /// Runs `args` (with the image name last) through qemu-io in a folder `q` and through
    /// qed-io in a folder `o`, each holding a copy of every image made so far (so that backing
    /// files and `open` find the same names); asserts equal output and exit code and returns
    /// the output.
    #[track_caller]
    fn same(&self, image: &str, args: &[&str], stdin: &str) -> String {
        let mut a: Vec<&str> = args.to_vec();
        // No image argument: the commands open one themselves.
        if !image.is_empty() {
            a.push(image);
        }
        let mut outs = Vec::new();
        for (sub, prog) in [("q", PathBuf::from("qemu-io")), ("o", self.ours.clone())] {
            let dir = self.path.join(sub);
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir(&dir).expect("mkdir");
            for e in std::fs::read_dir(&self.path).expect("readdir") {
                let e = e.expect("entry");
                if e.file_type().expect("type").is_file() {
                    std::fs::copy(e.path(), dir.join(e.file_name())).expect("copy");
                }
            }
            outs.push(self.run_in(&dir, &prog, &a, stdin));
        }
        let (q, o) = (&outs[0], &outs[1]);
        assert_eq!(o.text, q.text, "output differs for {args:?}");
        assert_eq!(o.code, q.code, "exit code differs for {args:?}");
        q.text.clone()
    }

    /// The image qemu-io and qed-io changed in [`Dir::same`] hold the same data, and ours is
    /// clean.
    #[track_caller]
    fn images_agree(&self, image: &str) {
        let (q, o) = (format!("q/{image}"), format!("o/{image}"));
        let c = self.sh("qemu-img", &["compare", "-f", "qed", "-F", "qed", &q, &o]);
        assert!(c.contains("Images are identical"), "{c}");
        let c = self.sh("qemu-img", &["check", "-f", "qed", &o]);
        assert!(c.contains("No errors were found"), "{c}");
    }
}

/// QEMU's `_filter_qemu_io` for the rate line, and the same for `-C`'s CSV line: the timing
/// numbers become X, but only where the rest of the line has qemu-io's exact shape, so a
/// wrongly shaped line stays as it is and fails the comparison.
fn filter(s: &str) -> String {
    s.lines()
        .map(|l| {
            filter_rate(l)
                .or_else(|| filter_csv(l))
                .unwrap_or_else(|| l.to_string())
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_num(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_digit() || "./inf".contains(c))
}

fn filter_rate(l: &str) -> Option<String> {
    // "<size>, <N> ops; <time> (<rate> <unit>/sec and <ops> ops/sec)"
    let (head, rest) = l.split_once(" ops; ")?;
    let (size, n) = head.rsplit_once(", ")?;
    let (time, rest) = rest.split_once(" (")?;
    let rest = rest.strip_suffix(" ops/sec)")?;
    let (rate, ops) = rest.split_once("/sec and ")?;
    let (num, unit) = rate.split_once(' ')?;
    let ok = n.chars().all(|c| c.is_ascii_digit())
        && time
            .chars()
            .all(|c| c.is_ascii_digit() || ":. sec".contains(c))
        && is_num(num)
        && ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"].contains(&unit)
        && is_num(ops);
    ok.then(|| format!("{size}, X ops; XX:XX:XX.X (XXX YYY/sec and XXX ops/sec)"))
}

fn filter_csv(l: &str) -> Option<String> {
    // "-C": "<total>,<ops>,H:MM:SS.ss,<bytes/s>,<ops/s>"
    let f: Vec<&str> = l.split(',').collect();
    let ok = f.len() == 5
        && f[0].chars().all(|c| c.is_ascii_digit())
        && f[1].chars().all(|c| c.is_ascii_digit())
        && f[2].len() == 10
        && f[2].chars().all(|c| c.is_ascii_digit() || ":.".contains(c))
        && is_num(f[3])
        && is_num(f[4]);
    ok.then(|| format!("{},{},TIME,RATE,RATE", f[0], f[1]))
}

fn c_args(cmds: &[&str]) -> Vec<String> {
    cmds.iter()
        .flat_map(|c| ["-c".to_string(), c.to_string()])
        .collect()
}

#[track_caller]
fn same_cmds(d: &Dir, image: &str, opts: &[&str], cmds: &[&str]) -> String {
    let mut a: Vec<String> = opts.iter().map(|s| s.to_string()).collect();
    a.extend(c_args(cmds));
    d.same(image, &a.iter().map(String::as_str).collect::<Vec<_>>(), "")
}

/// A new folder with a new image `a.qed` of `size`, and [`same_cmds`] of `cmds` on it.
#[track_caller]
fn fresh(size: &str, cmds: &[&str]) -> (Dir, String) {
    let d = Dir::new();
    d.create("a.qed", &[], size);
    let out = same_cmds(&d, "a.qed", &["-f", "qed"], cmds);
    (d, out)
}

#[test]
fn filter_keeps_wrongly_shaped_rate_lines() {
    let good = "512 bytes, 1 ops; 00.00 sec (12.483 MiB/sec and 25565.6398 ops/sec)";
    assert_eq!(
        filter(good),
        "512 bytes, X ops; XX:XX:XX.X (XXX YYY/sec and XXX ops/sec)"
    );
    let bad = "512 bytes, 1 ops; 00.00 sec (12.483 MB/sec and 25565.6398 ops/sec)";
    assert_eq!(filter(bad), bad);
    assert_eq!(
        filter("512,1,0:00:00.00,8405706.687,16417.396"),
        "512,1,TIME,RATE,RATE"
    );
}

#[test]
fn read_write_commands_match_qemu_io() {
    let (d, out) = fresh(
        "4M",
        &[
            "write -P 0xab 0 1536",
            "read -P 0xab 0 1536",
            "read -P 0xac 0 512",
            "read -P 0xab -s 10 -l 20 0 100",
            "read -P 0xac -s 10 -l 20 0 100",
            "read -v 0 40",
            "write 70000 100",
            "read -v 69990 40",
            "write -z 4096 65536",
            "read -C 0 512",
            "write -q -P 7 1M 64k",
            "read -q -P 7 1M 64k",
            "write -f -P 9 2M 512",
            "length",
            "map",
            "alloc 0 1M",
            "alloc 1M",
            "read 4M 512",
            "write 4194000 512",
            "read -P 300 0 1",
            "read 0 x",
            "flush",
        ],
    );
    // Guard against both tools failing the same way: the writes really happened.
    assert!(out.contains("wrote 1536/1536 bytes at offset 0"), "{out}");
    assert!(
        out.contains("Pattern verification failed at offset 10, 20 bytes"),
        "{out}"
    );
    assert!(out.contains("read failed: Input/output error"), "{out}");
    d.images_agree("a.qed");
}

#[test]
fn vector_and_aio_commands_match_qemu_io() {
    let (d, out) = fresh(
        "8M",
        &[
            "writev -P 3 8192 512 1024",
            "readv -P 3 8192 512 1024",
            "readv -P 4 8192 512 1024",
            "readv -v 8192 16 16",
            "aio_write -P 5 65536 4096",
            "aio_flush",
            "aio_read -P 5 65536 4096",
            "aio_flush",
            // One real aio request in flight at a time: the order in which concurrent ones
            // complete (and print) is a race in qemu-io as in qed-io.
            "aio_write -P 6 1M 64k 64k",
            "aio_flush",
            "aio_write -P 7 2M 4k",
            "aio_flush",
            "read -P 6 1M 128k",
            "read -P 7 2M 4k",
            "aio_write -z 3M 64k",
            "aio_flush",
            "aio_read -P 0 3M 64k",
            "aio_flush",
            "writev 8M 512",
            "map",
        ],
    );
    assert!(
        out.contains("wrote 131072/131072 bytes at offset 1048576"),
        "{out}"
    );
    d.images_agree("a.qed");
}

#[test]
fn other_commands_and_errors_match_qemu_io() {
    let (d, _) = fresh(
        "4M",
        &[
            "write -P 1 0 64k",
            "truncate 8M",
            "length",
            "map",
            "close",
            "length",
            "bogus",
            "open a.qed",
            "open a.qed",
            "read 0",
            "alloc 0 1 2",
            "write -z -P 1 0 512",
            "write -u 0 512",
            "write -P 2 4M 512",
            "read -P 2 4M 512",
            "quit",
            "read 0 512",
        ],
    );
    d.images_agree("a.qed");

    // Read-only: writers are refused before their arguments are looked at.
    d.create("r.qed", &[], "1M");
    let out = same_cmds(
        &d,
        "r.qed",
        &["-r", "-f", "qed"],
        &[
            "write 0 512",
            "discard 0 512",
            "truncate 2M",
            "read 0 512",
            "flush",
        ],
    );
    assert!(out.contains("qemu-io: Block node is read-only"), "{out}");
    d.images_agree("r.qed");
}

#[test]
fn commands_from_stdin_match_qemu_io() {
    let d = Dir::new();
    d.create("a.qed", &[], "1M");
    let out = d.same(
        "a.qed",
        &["-f", "qed"],
        "write -P 0x5a 512 512\nread -P 0x5a 512 512\nbogus\nlength\n",
    );
    assert!(out.starts_with("qemu-io> wrote 512/512"), "{out}");
    d.images_agree("a.qed");
}

#[test]
fn backing_chain_reads_and_map_match_qemu_io() {
    let d = Dir::new();
    d.create("base.qed", &[], "4M");
    d.sh(
        "qemu-io",
        &["-f", "qed", "-c", "write -P 0x11 0 1M", "base.qed"],
    );
    d.create("top.qed", &["-b", "base.qed", "-F", "qed"], "");
    same_cmds(
        &d,
        "top.qed",
        &["-f", "qed"],
        &[
            "write -P 0x22 64k 4k",
            "read -P 0x11 0 64k",
            "read -P 0x22 64k 4k",
            "read -P 0x11 68k 60k",
            "read -P 0 1M 1M",
            "map",
            "alloc 0 1M",
            "alloc 64k 64k",
        ],
    );
    d.images_agree("top.qed");
}

/// `write -u -z` unmaps through `WriteZeroesFlags::MAY_UNMAP`: the range reads as zeros and the
/// image stays clean, while qemu keeps a zero cluster (so only contents are compared, not
/// `map`).
#[test]
fn write_zeroes_unmap_reads_zeros() {
    let (d, _) = fresh(
        "1M",
        &[
            "write -P 3 0 256k",
            "write -u -z 64k 128k",
            "read -P 0 64k 128k",
            "read -P 3 0 64k",
        ],
    );
    d.images_agree("a.qed");
}

#[test]
fn options_engines_and_refusals() {
    let d = Dir::new();
    d.create("a.qed", &[], "1M");
    for aio in ["threads", "io_uring", "native"] {
        let o = d.run(
            &d.ours,
            &[
                "-i",
                aio,
                "-t",
                "writeback",
                "-c",
                "write -P 4 0 4k",
                "-c",
                "read -P 4 0 4k",
                "a.qed",
            ],
            "",
        );
        if aio == "io_uring" && !cfg!(qed_io_uring) {
            // Builds without the ring (i686, other targets) refuse it, saying why.
            assert_eq!(o.code, 1, "-i {aio}: {}", o.text);
            assert!(
                o.text.contains("this build has no io_uring engine"),
                "-i {aio}: {}",
                o.text
            );
            continue;
        }
        assert_eq!(o.code, 0, "-i {aio}: {}", o.text);
        assert!(!o.text.contains("failed"), "-i {aio}: {}", o.text);
    }
    // The option spelling QEMU's iotests use (QEMU_IO_OPTIONS), against qemu-io.
    let out = d.same(
        "a.qed",
        &[
            "--cache",
            "writeback",
            "--aio",
            "threads",
            "-f",
            "qed",
            "-d",
            "unmap",
            "-c",
            "read -P 4 0 4k",
        ],
        "",
    );
    assert!(out.starts_with("read 4096/4096"), "{out}");
    let o = d.run(&d.ours, &["-r", "-U", "-c", "read -P 4 0 4k", "a.qed"], "");
    assert_eq!(o.code, 0, "{}", o.text);
    for (args, msg) in [
        (&["-f", "raw", "a.qed"][..], "format 'raw' is not supported"),
        (
            &["-c", "open -o driver=vmdk a.qed"][..],
            "Unknown driver 'vmdk'",
        ),
        (
            &["-c", "open blkdebug:rules:a.qed"][..],
            "blkdebug rules are not supported",
        ),
        (&["-t", "bogus", "a.qed"][..], "Invalid cache option: bogus"),
        (&["-i", "bogus", "a.qed"][..], "Invalid aio option: bogus"),
    ] {
        let o = d.run(&d.ours, args, "");
        assert_eq!(o.code, 1, "{args:?}: {}", o.text);
        assert!(o.text.contains(msg), "{args:?}: {}", o.text);
    }
    let c = d.sh("qemu-img", &["check", "-f", "qed", "a.qed"]);
    assert!(c.contains("No errors were found"), "{c}");
}

/// Argument parsing and limits: fractional sizes, empty requests, `alloc` past the end (clipped
/// as qemu-io does), the request size limit, pattern bytes, getopt's complaint, truncate's
/// messages, a missing image, and the one-line help.
#[test]
fn parsing_limits_and_messages_match_qemu_io() {
    let (d, out) = fresh(
        "4M",
        &[
            "write 0 1.5k",
            "write 0 0",
            "read 0 0",
            "alloc 4M",
            "alloc 0 5M",
            "alloc 5M",
            "read 0 4G",
            "write -P 0x100 0 1",
            "write -P 012 0 1",
            "read -P 10 0 1",
            "write -P abc 0 1",
            "read -x 0 1",
            "read -p 0 512",
            "truncate 1M",
            "truncate 3000",
            "truncate 5M",
            "length",
            "help quit",
            "help map",
        ],
    );
    assert!(
        out.contains("length cannot exceed 2147483136, given 4G"),
        "{out}"
    );
    d.images_agree("a.qed");
    d.same("missing.qed", &["-c", "read 0 512"], "");
}

/// `discard` prints what qemu-io prints, but libqed's discard really discards: the range then
/// reads as zeros (qemu's QED driver ignores discards, so the images are not compared).
#[test]
fn discard_output_matches_and_range_reads_zeros() {
    let (d, _) = fresh(
        "1M",
        &["write -P 9 0 192k", "discard 64k 64k", "discard -q 0 512"],
    );
    let o = d.run_in(
        &d.path.join("o"),
        &d.ours,
        &[
            "-c",
            "read -P 0 0 512",
            "-c",
            "read -P 0 64k 64k",
            "-c",
            "read -P 9 512 63k",
            "a.qed",
        ],
        "",
    );
    assert_eq!(o.code, 0, "{}", o.text);
    assert!(!o.text.contains("verification failed"), "{}", o.text);
    let c = d.sh("qemu-img", &["check", "-f", "qed", "o/a.qed"]);
    assert!(c.contains("No errors were found"), "{c}");
}

/// `info`, `sleep`, `reopen -r/-w`, `write -c` (QED has no compression), the vector length
/// limit, and refused aio requests, whose errors qemu-io prints newest first at the next
/// event-loop turn, before earlier completions, without failing the command.
#[test]
fn info_reopen_and_aio_errors_match_qemu_io() {
    let (d, out) = fresh(
        "4M",
        &[
            "info",
            "sleep 1",
            "reopen -r",
            "write 0 1",
            "reopen -w",
            "write 0 1",
            "reopen -r -w",
            "write -c 0 64k",
            "readv -C 0 512",
            "aio_read -v 0 16",
            "aio_write -P 1 5M 1",
            "writev 0 4G",
            "aio_read 4M 1",
            "aio_flush",
        ],
    );
    assert!(
        out.contains("aio_write failed: Input/output error"),
        "{out}"
    );
    d.images_agree("a.qed");
}

/// An image another process holds: the same two-line lock message as qemu-io, read-write and
/// read-only (`-U` then opens it).
#[test]
fn lock_conflict_message_matches_qemu_io() {
    let d = Dir::new();
    d.create("a.qed", &[], "1M");
    // qemu-io reading commands from stdin prints its first prompt once the image is open (and
    // locked); the probe opens nothing, so it cannot race the holder for the lock.
    let mut holder = Command::new("qemu-io")
        .arg("a.qed")
        .current_dir(&d.path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("qemu-io");
    let mut prompt = [0u8; 9];
    let held = std::io::Read::read_exact(holder.stdout.as_mut().expect("stdout"), &mut prompt)
        .is_ok()
        && &prompt == b"qemu-io> ";
    let mut results = Vec::new();
    if held {
        for args in [
            &["-c", "read 0 1", "a.qed"][..],
            &["-r", "-c", "read 0 1", "a.qed"][..],
        ] {
            let q = d.run(Path::new("qemu-io"), args, "");
            let o = d.run(&d.ours, args, "");
            results.push((args, q.text, o.text, q.code, o.code));
        }
        let o = d.run(&d.ours, &["-r", "-U", "-c", "read 0 1", "a.qed"], "");
        results.push((&["-U"][..], String::new(), String::new(), o.code, 0));
    }
    // Closing its stdin ends the holder.
    drop(holder.stdin.take());
    let _ = holder.wait();
    assert!(held, "qemu-io did not open the image: {prompt:?}");
    assert!(
        results[0]
            .1
            .contains("Is another process using the image [a.qed]?"),
        "{}",
        results[0].1
    );
    for (args, q, o, qc, oc) in results {
        assert_eq!(o, q, "{args:?}");
        assert_eq!(oc, qc, "{args:?}");
    }
}

/// Hostile headers, one field each: qed-io prints qemu's sentence for the check that fails
/// (as QEMU's iotest 116 expects), not the library's detailed message.
#[test]
fn hostile_header_messages_match_qemu_io() {
    // (what, header offset, little-endian bytes written there)
    let cases: &[(&str, u64, &[u8])] = &[
        ("magic", 0, b"QEDX"),
        ("cluster_size 0", 4, &0u32.to_le_bytes()),
        ("cluster_size not a power of 2", 4, &69632u32.to_le_bytes()),
        ("cluster_size 2^31", 4, &(1u32 << 31).to_le_bytes()),
        ("cluster_size ~0", 4, &u32::MAX.to_le_bytes()),
        ("table_size 0", 8, &0u32.to_le_bytes()),
        ("table_size 32", 8, &32u32.to_le_bytes()),
        ("header_size ~0", 12, &u32::MAX.to_le_bytes()),
        ("unknown feature bit 40", 16, &(1u64 << 40).to_le_bytes()),
        ("l1_table_offset 0", 40, &0u64.to_le_bytes()),
        ("l1_table_offset unaligned", 40, &0x10200u64.to_le_bytes()),
        ("l1_table_offset past EOF", 40, &(1u64 << 40).to_le_bytes()),
        (
            "l1_table_offset wraps",
            40,
            &0xffff_ffff_ffff_0000u64.to_le_bytes(),
        ),
        ("image_size unaligned", 48, &1000u64.to_le_bytes()),
        ("image_size 2^62", 48, &(1u64 << 62).to_le_bytes()),
    ];
    let d = Dir::new();
    for (what, off, bytes) in cases {
        d.create("h.qed", &[], "64M");
        poke(&d.path.join("h.qed"), *off, bytes);
        let out = d.same("h.qed", &["-f", "qed", "-c", "read 0 64k"], "");
        assert!(
            out.starts_with("qemu-io: can't open device h.qed: "),
            "{what}: {out}"
        );
    }
    // A backing file name reaching past the header clusters.
    d.create("h.qed", &[], "64M");
    poke(&d.path.join("h.qed"), 16, &1u64.to_le_bytes());
    poke(&d.path.join("h.qed"), 56, &0xfff0u32.to_le_bytes());
    poke(&d.path.join("h.qed"), 60, &0x100u32.to_le_bytes());
    let out = d.same("h.qed", &["-c", "read 0 64k"], "");
    assert!(
        out.contains("QED backing filename offset is invalid"),
        "{out}"
    );
    // A file cut inside the header.
    d.create("h.qed", &[], "64M");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.path.join("h.qed"))
        .expect("open");
    f.set_len(40).expect("truncate");
    let out = d.same("h.qed", &["-c", "read 0 64k"], "");
    assert!(out.contains("QED table offset is invalid"), "{out}");
}

fn poke(path: &Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open");
    f.write_all_at(bytes, off).expect("poke");
}

/// A missing backing file (relative, then two levels down a chain) fails with qemu-io's
/// "Could not open backing file: ..." (iotest 069).
#[test]
fn missing_backing_file_message_matches_qemu_io() {
    let d = Dir::new();
    d.create("base.qed", &[], "1M");
    d.create("mid.qed", &["-b", "base.qed", "-F", "qed"], "");
    d.create("top.qed", &["-b", "mid.qed", "-F", "qed"], "");
    std::fs::remove_file(d.path.join("base.qed")).expect("rm");
    let out = d.same("mid.qed", &["-c", "read 0 512"], "");
    assert!(
        out.contains("Could not open backing file: Could not open 'base.qed'"),
        "{out}"
    );
    d.same("top.qed", &["-c", "read 0 512"], "");
}

/// `-s` and `open -s`: writes land in a temporary overlay and the image is unchanged (iotest
/// 052); the overlay is removed at exit.
#[test]
fn snapshot_mode_matches_qemu_io_and_leaves_image_alone() {
    let tmp = std::env::var_os("TMPDIR").unwrap_or_else(|| "/var/tmp".into());
    let leftovers = || {
        std::fs::read_dir(&tmp)
            .expect("tmp dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("qed-io."))
            .count()
    };
    let before = leftovers();
    let d = Dir::new();
    d.create("a.qed", &[], "4M");
    qemu_io_prepares(&d, "a.qed", &["write -P 7 0 64k", "write -P 3 64k 64k"]);
    let out = same_cmds(
        &d,
        "a.qed",
        &["-s", "-f", "qed"],
        &[
            "write -P 9 0 128k",
            "read -P 9 0 128k",
            "map",
            "close",
            "open -s a.qed",
            "read -P 7 0 64k",
            "write -z 0 1M",
            "read -P 0 0 1M",
        ],
    );
    assert!(out.contains("wrote 131072/131072"), "{out}");
    // Both runs left their copy as it was before them.
    d.images_agree("a.qed");
    let c = d.sh(
        "qemu-img",
        &["compare", "-f", "qed", "-F", "qed", "a.qed", "o/a.qed"],
    );
    assert!(c.contains("Images are identical"), "{c}");
    let bytes = |p: &str| std::fs::read(d.path.join(p)).expect("read image");
    assert!(
        bytes("a.qed") == bytes("o/a.qed"),
        "snapshot mode changed the image file"
    );
    assert_eq!(leftovers(), before, "snapshot overlays left in {tmp:?}");
}

/// Runs `cmds` on `image` with the real qemu-io, to set up a test.
fn qemu_io_prepares(d: &Dir, image: &str, cmds: &[&str]) {
    let mut a = vec!["-f".to_string(), "qed".to_string()];
    a.extend(c_args(cmds));
    a.push(image.to_string());
    d.sh("qemu-io", &a.iter().map(String::as_str).collect::<Vec<_>>());
}

/// Runs `args` (no image argument) through qemu-io and qed-io in the folder itself and asserts
/// the same output and exit code; for commands that change nothing.
#[track_caller]
fn same_in_place(d: &Dir, args: &[&str]) -> String {
    let q = d.run(Path::new("qemu-io"), args, "");
    let o = d.run(&d.ours, args, "");
    assert_eq!(o.text, q.text, "output differs for {args:?}");
    assert_eq!(o.code, q.code, "exit code differs for {args:?}");
    q.text
}

/// `open -o`: a QED image inside a QED image's guest disk (iotest 072), blkdebug with no rules
/// and an alignment (033), and the file protocols' own checks on a folder and on /dev/null
/// (226), with "can't open:" when the name came from the options.
#[test]
fn open_options_match_qemu_io() {
    let d = Dir::new();
    d.create("inner.qed", &[], "4M");
    qemu_io_prepares(
        &d,
        "inner.qed",
        &["write -P 42 0 512", "write -P 23 512 512"],
    );
    d.sh(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qed",
            "inner.qed",
            "outer.qed",
        ],
    );
    let out = same_in_place(
        &d,
        &[
            "-c",
            "open -r -o driver=qed,file.driver=qed,file.file.filename=outer.qed",
            "-c",
            "read -P 42 0 512",
            "-c",
            "read -P 23 512 512",
            "-c",
            "map",
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(out.contains("read 512/512 bytes at offset 512"), "{out}");
    // Writes through the nesting grow the inner image's guest disk as the outer one allocates
    // (qemu 10.0.2 leaves the inner size as it was, so its outer image no longer reads back:
    // only ours is checked, with qemu-io reading the result).
    let nested = "driver=qed,file.driver=qed,file.file.filename=outer.qed";
    let o = d.run(
        &d.ours,
        &[
            "-c",
            &format!("open -o {nested}"),
            "-c",
            "aio_write -P 9 64k 64k",
            "-c",
            "aio_write -P 9 128k 64k",
            "-c",
            "aio_flush",
        ],
        "",
    );
    assert_eq!(o.code, 0, "{}", o.text);
    for image in ["outer.qed", nested] {
        let check = if image == nested {
            d.sh("qemu-img", &["check", "--image-opts", image])
        } else {
            d.sh("qemu-img", &["check", "-f", "qed", image])
        };
        assert!(check.contains("No errors were found"), "{image}: {check}");
    }
    let q = d.run(
        Path::new("qemu-io"),
        &[
            "-c",
            &format!("open -r -o {nested}"),
            "-c",
            "read -P 9 64k 128k",
            "-c",
            "read -P 23 512 512",
        ],
        "",
    );
    assert_eq!(q.code, 0, "{}", q.text);
    assert!(
        !q.text.contains("Pattern verification failed"),
        "{}",
        q.text
    );

    d.create("a.qed", &[], "1M");
    let out = d.same(
        "",
        &[],
        "open -o driver=qed,file.align=4k blkdebug::a.qed\nwrite -P 5 512 1k\nread -P 5 512 1k\n",
    );
    assert!(out.contains("wrote 1024/1024"), "{out}");
    d.images_agree("a.qed");

    std::fs::create_dir(d.path.join("dir")).expect("mkdir");
    for driver in ["file", "host_device", "host_cdrom"] {
        for ro in ["-r ", ""] {
            for (name, lock) in [("dir", ""), ("/dev/null", ",locking=off")] {
                let open = format!("open {ro}-o driver={driver},filename={name}{lock}");
                let out = same_in_place(&d, &["-c", &open]);
                // A character device is what host_device and host_cdrom want.
                let fine = driver != "file" && name == "/dev/null";
                assert_eq!(out.is_empty(), fine, "{open}: {out}");
            }
        }
    }
    same_in_place(&d, &["-c", "open -o driver=file,filename=missing.qed"]);
}

/// `-C` (copy-on-read, iotest 197's qemu-io calls on QED): reads served by the backing file
/// copy what they touch into the image, as `map` shows; refused on read-only opens.
#[test]
fn copy_on_read_matches_qemu_io() {
    let d = Dir::new();
    d.create("base.qed", &[], "4M");
    qemu_io_prepares(&d, "base.qed", &["write -P 1 0 1M", "write -P 2 3M 4k"]);
    d.create("top.qed", &["-b", "base.qed", "-F", "qed"], "");
    let out = same_cmds(
        &d,
        "top.qed",
        &["-C", "-f", "qed"],
        &[
            "read -P 1 0 4k",
            "map",
            "read -P 1 100k 200k",
            "read 0 0",
            "read -P 2 3M 4k",
            "read -P 0 2M 64k",
            "map",
        ],
    );
    assert!(
        out.contains("bytes     allocated at offset 0 bytes"),
        "{out}"
    );
    d.images_agree("top.qed");
    for opts in [&["-C", "-r"][..], &["-C", "-r", "-U"], &["-C", "-U"]] {
        let mut a = opts.to_vec();
        a.extend(["-c", "map"]);
        let out = d.same("top.qed", &a, "");
        assert!(
            out.starts_with("qemu-io: can't open device top.qed: "),
            "{out}"
        );
    }
    let out = d.same(
        "",
        &[],
        "open -C -r top.qed\nopen -C top.qed\nread -P 1 1020k 4k\nmap\n",
    );
    assert!(
        out.contains("read 4096/4096 bytes at offset 1044480"),
        "{out}"
    );
}
