// SPDX-License-Identifier: MIT OR Apache-2.0
//! Interoperability of `qed::storage::lock` with QEMU's own image locking.
//!
//! Runs the real `qemu-img` / `qemu-io` (Debian package `qemu-utils`); the
//! tests fail, rather than skip, when they are missing. Every QEMU process is
//! bounded in time (foreground: killed after [`CMD_TIMEOUT`]; background:
//! `qemu-io -c 'sleep ...'` exits by itself and a guard kills it on drop).

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use qed::storage::lock::{lock_image, LockConflict, LockMode};

/// Longest a foreground QEMU command may run.
const CMD_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a background `qemu-io` lives on its own (milliseconds for `sleep`).
const BACKGROUND_SLEEP_MS: u32 = 120_000;
/// Longest we wait for locks to appear in or vanish from /proc/locks.
const LOCK_WAIT: Duration = Duration::from_secs(20);

const RW_BYTES: &[u64] = &[100, 101, 103, 201, 203];
const RO_BYTES: &[u64] = &[100, 201, 203];
const FORCE_SHARE_BYTES: &[u64] = &[100];

const GET_WRITE: &str = "Failed to get \"write\" lock";
const GET_SHARED_WRITE: &str = "Failed to get shared \"write\" lock";

fn require_tool(tool: &str) {
    match Command::new(tool).arg("--version").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "`{tool} --version` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!(
            "{tool} is required by the lock interop tests but could not be run ({e}); \
             install it with `apt-get install qemu-utils`"
        ),
    }
}

/// A scratch directory with one fresh QED image, removed on drop.
struct Scratch {
    dir: PathBuf,
    image: PathBuf,
}

impl Scratch {
    fn new(name: &str) -> Scratch {
        require_tool("qemu-img");
        require_tool("qemu-io");
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "qed-lock-interop-{}-{}-{name}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join("image.qed");
        let scratch = Scratch { dir, image };
        let out = run(Command::new("qemu-img")
            .args(["create", "-f", "qed"])
            .arg(&scratch.image)
            .arg("1M"));
        out.assert_success("qemu-img create");
        scratch
    }

    /// A new open file description of the image, read-write.
    fn open(&self) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.image)
            .unwrap()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Result of a foreground command.
struct Outcome {
    what: String,
    success: bool,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn assert_success(&self, ctx: &str) {
        assert!(
            self.success,
            "{ctx}: `{}` should succeed; stdout: {} stderr: {}",
            self.what, self.stdout, self.stderr
        );
    }

    fn assert_lock_failure(&self, ctx: &str, message: &str) {
        assert!(
            !self.success,
            "{ctx}: `{}` should fail on the lock; stdout: {}",
            self.what, self.stdout
        );
        assert!(
            self.stderr.contains(message),
            "{ctx}: `{}` should report {message:?}; stderr: {}",
            self.what,
            self.stderr
        );
    }
}

fn reader<R: Read + Send + 'static>(pipe: Option<R>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_string(&mut s);
        }
        s
    })
}

/// Run a command to completion, killing it after [`CMD_TIMEOUT`].
fn run(cmd: &mut Command) -> Outcome {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let out = reader(child.stdout.take());
    let err = reader(child.stderr.take());
    let deadline = Instant::now() + CMD_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {CMD_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    Outcome {
        what,
        success: status.success(),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn qemu_io(args: &[&str], image: &Path) -> Outcome {
    run(Command::new("qemu-io").args(args).arg(image))
}

fn qemu_img(args: &[&str], image: &Path) -> Outcome {
    run(Command::new("qemu-img").args(args).arg(image))
}

/// A background `qemu-io` holding the image open; killed on drop.
struct Background {
    child: Child,
}

impl Background {
    /// Start `qemu-io ARGS -c 'sleep ...' IMAGE` and wait until its locks
    /// (`expected` bytes) show up in /proc/locks.
    fn start(args: &[&str], image: &Path, expected: &[u64]) -> Background {
        let sleep = format!("sleep {BACKGROUND_SLEEP_MS}");
        let child = Command::new("qemu-io")
            .args(args)
            .args(["-c", &sleep])
            .arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start qemu-io: {e}"));
        let mut bg = Background { child };
        let deadline = Instant::now() + LOCK_WAIT;
        loop {
            let held = proc_locks(image);
            if held.iter().copied().eq(expected.iter().copied()) {
                return bg;
            }
            if let Some(status) = bg.child.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut e) = bg.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!("background qemu-io {args:?} exited early ({status}): {err}");
            }
            if Instant::now() > deadline {
                panic!(
                    "background qemu-io {args:?}: expected locks {expected:?}, \
                     /proc/locks shows {held:?}"
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Bytes of `path` locked with OFD locks by anyone, per /proc/locks.
fn proc_locks(path: &Path) -> BTreeSet<u64> {
    let meta = std::fs::metadata(path).unwrap();
    let dev = meta.dev();
    // glibc's encoding of dev_t (gnu_dev_major / gnu_dev_minor).
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let id = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    let text = std::fs::read_to_string("/proc/locks").unwrap();
    let mut bytes = BTreeSet::new();
    for line in text.lines() {
        // "12: OFDLCK ADVISORY READ -1 fe:00:10010714 100 101"
        // (blocked waiters have an extra "->" field after the number).
        let fields: Vec<&str> = line.split_whitespace().filter(|f| *f != "->").collect();
        if fields.len() < 8 || fields[1] != "OFDLCK" || fields[5] != id {
            continue;
        }
        let start: u64 = fields[6].parse().unwrap();
        let end: u64 = fields[7].parse().unwrap_or(u64::MAX); // "EOF"
        bytes.extend(start..=end.min(start + 1024));
    }
    bytes
}

fn wait_unlocked(path: &Path) {
    let deadline = Instant::now() + LOCK_WAIT;
    while !proc_locks(path).is_empty() {
        assert!(
            Instant::now() < deadline,
            "locks on {path:?} did not go away: {:?}",
            proc_locks(path)
        );
        thread::sleep(Duration::from_millis(20));
    }
}

fn expect_eagain(res: io::Result<qed::storage::lock::ImageLock>, ctx: &str, message: &str) {
    let err = match res {
        Ok(_) => panic!("{ctx}: lock_image should fail with EAGAIN"),
        Err(e) => e,
    };
    assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{ctx}: {err}");
    let conflict = LockConflict::from_io_error(&err)
        .unwrap_or_else(|| panic!("{ctx}: not a LockConflict: {err}"));
    assert_eq!(conflict.raw_os_error(), libc::EAGAIN, "{ctx}");
    assert!(
        err.to_string().contains(message),
        "{ctx}: expected {message:?} in {err}"
    );
}

/// Our byte layout for each mode is exactly the one QEMU takes.
#[test]
fn byte_layout_matches_qemu() {
    let s = Scratch::new("layout");
    for (args, mode, bytes) in [
        (&[][..], LockMode::ReadWrite, RW_BYTES),
        (&["-r"][..], LockMode::ReadOnly, RO_BYTES),
        (&["-r", "-U"][..], LockMode::ForceShare, FORCE_SHARE_BYTES),
    ] {
        let bg = Background::start(args, &s.image, bytes);
        drop(bg);
        wait_unlocked(&s.image);

        let f = s.open();
        let lock = lock_image(&f, mode).unwrap();
        let ours: Vec<u64> = proc_locks(&s.image).into_iter().collect();
        assert_eq!(ours, bytes, "{mode:?} vs qemu-io {args:?}");
        drop(lock);
        assert!(
            proc_locks(&s.image).is_empty(),
            "{mode:?} left locks behind"
        );
    }
}

/// (1) While qemu-io holds the image read-write we cannot lock it, except
/// with ForceShare.
#[test]
fn qemu_rw_holder_blocks_us() {
    let s = Scratch::new("qemu-rw");
    {
        let _bg = Background::start(&[], &s.image, RW_BYTES);
        let f = s.open();
        expect_eagain(
            lock_image(&f, LockMode::ReadWrite),
            "RW vs qemu-io",
            GET_WRITE,
        );
        expect_eagain(
            lock_image(&f, LockMode::ReadOnly),
            "RO vs qemu-io",
            GET_SHARED_WRITE,
        );
        // The failed attempts left nothing of ours behind.
        assert_eq!(
            proc_locks(&s.image).into_iter().collect::<Vec<_>>(),
            RW_BYTES
        );
        let fs = lock_image(&f, LockMode::ForceShare).expect("ForceShare vs qemu-io");
        drop(fs);
    }
    // Once qemu-io is gone (killed), the image is ours.
    wait_unlocked(&s.image);
    let f = s.open();
    lock_image(&f, LockMode::ReadWrite).expect("RW after qemu-io exited");
}

/// While `qemu-io -r` holds the image, we may read-lock but not write-lock.
#[test]
fn qemu_ro_holder_allows_our_readers_only() {
    let s = Scratch::new("qemu-ro");
    let _bg = Background::start(&["-r"], &s.image, RO_BYTES);
    let f = s.open();
    expect_eagain(
        lock_image(&f, LockMode::ReadWrite),
        "RW vs qemu-io -r",
        GET_WRITE,
    );
    lock_image(&f, LockMode::ReadOnly).expect("RO vs qemu-io -r");
    lock_image(&f, LockMode::ForceShare).expect("ForceShare vs qemu-io -r");
}

/// (2) While we hold the image read-write, QEMU cannot open it except with
/// force-share (-U).
#[test]
fn our_rw_blocks_qemu() {
    let s = Scratch::new("ours-rw");
    let img = &s.image;
    let f = s.open();
    let lock = lock_image(&f, LockMode::ReadWrite).unwrap();

    qemu_img(&["check"], img).assert_lock_failure("check", GET_SHARED_WRITE);
    qemu_img(&["info"], img).assert_lock_failure("info", GET_SHARED_WRITE);
    qemu_io(&["-r", "-c", "read 0 512"], img).assert_lock_failure("qemu-io -r", GET_SHARED_WRITE);
    qemu_io(&["-c", "write 0 512"], img).assert_lock_failure("qemu-io", GET_WRITE);

    qemu_img(&["check", "-U"], img).assert_success("check -U");
    qemu_img(&["info", "-U"], img).assert_success("info -U");
    let read = qemu_io(&["-r", "-U", "-c", "read 0 512"], img);
    read.assert_success("qemu-io -r -U");
    assert!(
        read.stdout.contains("read 512/512 bytes"),
        "{}",
        read.stdout
    );

    drop(lock);
    qemu_io(&["-c", "write 0 512"], img).assert_success("qemu-io after unlock");
    qemu_img(&["check"], img).assert_success("check after unlock");
}

/// (3) While we hold the image read-only, QEMU may read it but not write it.
#[test]
fn our_ro_allows_qemu_readers_only() {
    let s = Scratch::new("ours-ro");
    let img = &s.image;
    let f = s.open();
    let _lock = lock_image(&f, LockMode::ReadOnly).unwrap();

    let read = qemu_io(&["-r", "-c", "read 0 512"], img);
    read.assert_success("qemu-io -r");
    assert!(
        read.stdout.contains("read 512/512 bytes"),
        "{}",
        read.stdout
    );
    qemu_img(&["check"], img).assert_success("check");
    qemu_img(&["info"], img).assert_success("info");

    qemu_io(&["-c", "write 0 512"], img).assert_lock_failure("qemu-io", GET_WRITE);
}

/// While we hold ForceShare, QEMU may even write the image.
#[test]
fn our_force_share_lets_qemu_write() {
    let s = Scratch::new("ours-fs");
    let img = &s.image;
    let f = s.open();
    let _lock = lock_image(&f, LockMode::ForceShare).unwrap();

    let write = qemu_io(&["-c", "write -P 0x5a 0 512"], img);
    write.assert_success("qemu-io write");
    assert!(
        write.stdout.contains("wrote 512/512 bytes"),
        "{}",
        write.stdout
    );
    qemu_img(&["check"], img).assert_success("check");
}
