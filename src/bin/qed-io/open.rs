// SPDX-License-Identifier: MIT OR Apache-2.0
//! `open -o`: the block-layer options qemu-io takes (a QemuOpts string) as far as they mean
//! something for one QED image on one file, and the file protocols' own checks and messages
//! (block/file-posix.c) for `driver=file|host_device|host_cdrom`.

use qed::{Image, Storage};
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What `-o` asks for.
#[derive(Clone, Default)]
pub(crate) struct OpenOpts {
    /// The image (or protocol node) file, from `filename`, `file.filename` or
    /// `file.file.filename`.
    pub(crate) filename: Option<String>,
    /// `driver=file|host_device|host_cdrom`: a protocol node with no format on it.
    pub(crate) protocol: Option<String>,
    /// `file.driver=qed`: the image lives inside another QED image's guest disk.
    pub(crate) nested: bool,
    /// `locking=off` (or `file.locking=off`).
    pub(crate) no_lock: bool,
}

/// Splits a QemuOpts string: `key=value` pairs separated by commas, `,,` standing for a comma;
/// a key alone means `on`.
fn split_opts(s: &str) -> Vec<(String, String)> {
    let mut items = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                items.last_mut().expect("one item").push(',');
            } else {
                items.push(String::new());
            }
        } else {
            items.last_mut().expect("one item").push(c);
        }
    }
    items
        .into_iter()
        .filter(|i| !i.is_empty())
        .map(|i| match i.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (i, "on".to_string()),
        })
        .collect()
}

impl OpenOpts {
    /// Adds the options of one `-o` argument.
    pub(crate) fn parse(&mut self, s: &str) -> Result<(), String> {
        for (k, v) in split_opts(s) {
            match (k.as_str(), v.as_str()) {
                ("driver", "qed") => {}
                ("driver", "file" | "host_device" | "host_cdrom") => self.protocol = Some(v),
                ("driver", other) => {
                    return Err(format!(
                        "Unknown driver '{other}' (qed-io opens 'qed' images)"
                    ))
                }
                ("file.driver", "file") | ("file.file.driver", "file") => {}
                // blkdebug without rules passes every request through.
                ("file.driver", "blkdebug") => {}
                ("file.driver", "qed") => self.nested = true,
                ("filename" | "file.filename" | "file.file.filename", _) => self.filename = Some(v),
                // blkdebug's alignment only splits requests; qemu's block layer still reads
                // and writes the same bytes.
                ("file.align" | "align", a)
                    if a.trim_end_matches(['k', 'K', 'M']).parse::<u32>().is_ok() => {}
                ("locking" | "file.locking" | "file.file.locking", "off") => self.no_lock = true,
                ("locking" | "file.locking" | "file.file.locking", "on" | "auto") => {
                    self.no_lock = false
                }
                _ => return Err(format!("open -o {k}={v} is not supported by qed-io")),
            }
        }
        Ok(())
    }
}

/// The file behind a filename with a protocol prefix qed-io understands: `file:PATH`, and
/// `blkdebug::PATH` (blkdebug with no rules file: every request passes through).
pub(crate) fn strip_protocol(name: &str) -> Result<&str, String> {
    if let Some(rest) = name.strip_prefix("blkdebug:") {
        return match rest.split_once(':') {
            Some(("", path)) => Ok(path),
            _ => Err(format!(
                "blkdebug rules are not supported by qed-io: {name}"
            )),
        };
    }
    Ok(name.strip_prefix("file:").unwrap_or(name))
}

/// file-posix's checks when it opens `path` for `driver` alone (no format on top), with its
/// messages. qed-io then holds the node but does no I/O on it (it works on QED images).
pub(crate) fn open_protocol(driver: &str, path: &str, read_only: bool) -> Result<(), String> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(|e| format!("Could not open '{path}': {}", os_message(&e)))?;
    let t = f
        .metadata()
        .map_err(|e| format!("Could not stat '{path}': {}", os_message(&e)))?
        .file_type();
    if driver == "file" && !t.is_file() {
        return Err(format!(
            "'{driver}' driver requires '{path}' to be a regular file"
        ));
    }
    if driver != "file" && !t.is_block_device() && !t.is_char_device() {
        return Err(format!(
            "'{driver}' driver requires '{path}' to be either a character or block device"
        ));
    }
    Ok(())
}

/// strerror's text, without Rust's " (os error N)".
fn os_message(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// An image's guest disk as the storage of another image (`driver=qed,file.driver=qed`, as
/// QEMU's iotest 072 nests formats). The inner image grows only where bytes are written or a
/// length is set: QED images cannot shrink, so the engine's allocation stretch (`preallocate`,
/// cut back at close) is kept as a length of our own, never as inner guest-disk size, which
/// `qemu-img check` would count as leaked clusters of the outer image.
pub(crate) struct ImageStorage {
    inner: Arc<Image>,
    len: AtomicU64,
    /// Serialises growth: two writers growing at once must not truncate out of order.
    grow: Mutex<()>,
}

impl ImageStorage {
    pub(crate) fn new(inner: Image) -> ImageStorage {
        let len = AtomicU64::new(inner.size());
        ImageStorage {
            inner: Arc::new(inner),
            len,
            grow: Mutex::new(()),
        }
    }

    /// Grows the inner image to hold `end` bytes (QED sizes are whole sectors).
    fn grow_to(&self, end: u64) -> io::Result<()> {
        if end <= self.inner.size() {
            return Ok(());
        }
        let _g = self.grow.lock().unwrap_or_else(|p| p.into_inner());
        if end > self.inner.size() {
            self.inner
                .truncate(end.next_multiple_of(512))
                .map_err(io_err)?;
        }
        Ok(())
    }
}

fn io_err(e: qed::Error) -> io::Error {
    match e {
        qed::Error::Io { source, .. } => source,
        e => io::Error::other(e.to_string()),
    }
}

impl Storage for ImageStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // Past the inner disk reads as zeros (the Storage contract).
        let n = self
            .inner
            .size()
            .saturating_sub(offset)
            .min(buf.len() as u64) as usize;
        let (inside, past) = buf.split_at_mut(n);
        if !inside.is_empty() {
            self.inner.read_at(offset, inside).map_err(io_err)?;
        }
        past.fill(0);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        self.grow_to(end)?;
        self.inner.write_at(offset, buf).map_err(io_err)?;
        self.len.fetch_max(end, Ordering::AcqRel);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.flush().map_err(io_err)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.len.load(Ordering::Acquire))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        // Shorter than the inner disk: only our length shrinks (the engine cuts its stretch,
        // which never reached the inner disk).
        self.grow_to(len)?;
        self.len.store(len, Ordering::Release);
        Ok(())
    }

    fn preallocate(&self, len: u64) -> io::Result<()> {
        self.len.fetch_max(len, Ordering::AcqRel);
        Ok(())
    }

    fn grows_on_write(&self) -> bool {
        // Growing is a header update of the inner image: through `write_at`'s own check.
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_opts_split_like_qemu() {
        assert_eq!(
            split_opts("driver=qed,file.filename=a,,b,locking"),
            vec![
                ("driver".into(), "qed".into()),
                ("file.filename".into(), "a,b".into()),
                ("locking".into(), "on".into()),
            ]
        );
        assert_eq!(strip_protocol("blkdebug::x.qed"), Ok("x.qed"));
        assert_eq!(strip_protocol("file:x.qed"), Ok("x.qed"));
        assert!(strip_protocol("blkdebug:rules.conf:x.qed").is_err());
    }
}
