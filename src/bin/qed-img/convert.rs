// SPDX-License-Identifier: MIT OR Apache-2.0
//! `qed-img convert [-f FMT] -O raw|qed [-o ...] [-B BACKING] [-p] [-n] [-S SIZE] SRC DST`.
//!
//! The copy is the library's (`qed::image::copy`), which walks the source the way qemu-img
//! convert does and issues the same writes in the same order, so that a QED output allocates
//! its clusters and L2 tables where qemu-img's would be and the files come out byte-identical.
//! Here: the options, creating the output, and the source and target as the copy sees them
//! (raw files and QED chains, through `disk.rs`).

use crate::common::{
    check_backing_name, host_path, parse_fmt, parse_size, CliError, CliResult, Fmt, Progress,
};
use crate::create::{backing_format, parse_create_opts};
use crate::disk::{create_raw, Disk, OpenMode};
use crate::ConvertArgs;
use qed::image::{copy, CopyOptions, CopySource, CopyStatus, CopyTarget};
use qed::{CreateOptions, Image};

/// The source as the library's copy walks it: qemu-img's view of the chain (raw holes too).
impl CopySource<CliError> for Disk {
    fn size(&self) -> u64 {
        self.size().unwrap_or(0)
    }
    fn status(&self, offset: u64, len: u64) -> CliResult<CopyStatus> {
        let st = Disk::status(self, offset, len)?;
        Ok(CopyStatus {
            zero: st.zero,
            len: st.len,
            from_backing: false,
        })
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> CliResult<()> {
        Disk::read_at(self, offset, buf)
    }
    fn alignment(&self) -> u64 {
        self.image()
            .map_or(512, |img| img.geometry().cluster_bytes())
    }
}

/// The source seen as qemu-img convert -B sees it: only what its top image holds is copied;
/// everything its backing chain provides is taken to be in the target's new backing file
/// already (qemu-img does not compare them either). Past the end of that backing file, zeros
/// need no writing.
struct OverBacking<'a> {
    src: &'a Disk,
    /// Size of the target's backing file.
    backing_size: u64,
}

impl CopySource<CliError> for OverBacking<'_> {
    fn size(&self) -> u64 {
        self.src.size().unwrap_or(0)
    }
    fn status(&self, offset: u64, len: u64) -> CliResult<CopyStatus> {
        let st = self.src.status(offset, len)?;
        // The top image's own state: data or zero at depth 0; below it (or nowhere in a chain
        // that has a backing file) it is the backing file's.
        let own = st.depth == 0 && (st.present || self.src.layers.len() == 1);
        let post_backing_zero = offset >= self.backing_size;
        Ok(CopyStatus {
            zero: own && st.zero,
            len: st.len,
            from_backing: !own || (st.zero && post_backing_zero),
        })
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> CliResult<()> {
        self.src.read_at(offset, buf)
    }
    fn alignment(&self) -> u64 {
        CopySource::alignment(self.src)
    }
}

impl CopyTarget<CliError> for Disk {
    fn write_at(&self, offset: u64, buf: &[u8]) -> CliResult<()> {
        Disk::write_at(self, offset, buf)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> CliResult<()> {
        Disk::write_zeroes(self, offset, len)
    }
}

/// A source read with `--salvage`: block status failures are retried on shorter ranges down to
/// one sector, which is then taken as data; reads that fail are retried sector by sector, and
/// sectors that still fail read as zeros. Each failure is a warning (qemu-img's
/// convert_iteration_sectors and convert_co_read).
struct Salvage<'a> {
    src: &'a dyn CopySource<CliError>,
    quiet: bool,
}

impl Salvage<'_> {
    fn warn(&self, e: &CliError) {
        if !self.quiet {
            eprintln!("{}: warning: {}", crate::common::prog_name(), e.msg);
        }
    }
    /// qemu-img's first walk over the source, counting what it will copy (for its progress):
    /// block status warnings show up there first.
    fn walk(&self) -> CliResult<()> {
        let size = self.src.size();
        let mut pos = 0;
        while pos < size {
            pos += self.status(pos, size - pos)?.len.max(1);
        }
        Ok(())
    }
}

impl CopySource<CliError> for Salvage<'_> {
    fn size(&self) -> u64 {
        self.src.size()
    }
    fn status(&self, offset: u64, len: u64) -> CliResult<CopyStatus> {
        let mut n = len.div_ceil(512);
        loop {
            match self.src.status(offset, (n * 512).min(len)) {
                Ok(st) => return Ok(st),
                Err(e) if n == 1 => {
                    self.warn(&e);
                    return Ok(CopyStatus {
                        zero: false,
                        len: 512.min(len),
                        from_backing: false,
                    });
                }
                Err(_) => n = n.div_ceil(4),
            }
        }
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> CliResult<()> {
        if self.src.read_at(offset, buf).is_ok() {
            return Ok(());
        }
        for (i, sector) in buf.chunks_mut(512).enumerate() {
            let at = offset + i as u64 * 512;
            if let Err(e) = self.src.read_at(at, sector) {
                self.warn(&e);
                sector.fill(0);
            }
        }
        Ok(())
    }
    fn alignment(&self) -> u64 {
        self.src.alignment()
    }
}

pub(crate) fn run(a: ConvertArgs) -> CliResult<i32> {
    let src_fmt = parse_fmt(a.fmt.as_deref())?;
    let out_fmt = parse_fmt(a.out_fmt.as_deref())?.unwrap_or(Fmt::Raw);
    let Some(o) = parse_create_opts(out_fmt, &a.options)? else {
        return Ok(0);
    };
    let backing = a.backing.clone().or(o.backing_file.clone());
    if backing.is_some() && out_fmt == Fmt::Raw {
        return Err(CliError::new(format!(
            "{}: Backing file not supported for file format 'raw'",
            a.dst
        )));
    }
    let backing_fmt = parse_fmt(a.backing_fmt.as_deref().or(o.backing_fmt.as_deref()))?;
    if backing.is_some() && backing_fmt.is_none() {
        return Err(CliError::new(
            "Use of backing file requires explicit backing format",
        ));
    }
    if let Some(b) = &backing {
        check_backing_name(&a.dst, b)?;
    }
    if backing.is_some() && a.no_create {
        return Err(CliError::new(
            "-B and -n cannot be used together (the target's backing file is its own)",
        ));
    }
    let min_sparse: u64 = match &a.sparse {
        None => 8,
        Some(s) => {
            let v = parse_size(s).filter(|v| v % 512 == 0 && *v <= 16 << 20).ok_or_else(|| {
                CliError::new(
                    "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16M.",
                )
            })?;
            v / 512
        }
    };
    let direct = matches!(a.cache.as_deref(), Some("none") | Some("directsync"));
    let src = Disk::open(
        &a.src,
        src_fmt,
        &OpenMode::source(a.force_share, a.image_opts.image_opts),
    )?;
    let size = src.size()?;
    if !a.no_create {
        if o.size.is_some() {
            return Err(CliError::new(
                "convert: the output size is the source's; drop -o size",
            ));
        }
        match out_fmt {
            Fmt::Raw => create_raw(&host_path(&a.dst), size)?,
            Fmt::Qed => {
                let mut opts = CreateOptions::new(size);
                if let Some(c) = o.cluster_size {
                    opts.cluster_size = c;
                }
                if let Some(t) = o.table_size {
                    opts.table_size = t;
                }
                if let Some(b) = &backing {
                    opts.backing_file = Some(b.clone());
                    opts.backing_format = backing_fmt.map(backing_format);
                }
                Image::create(host_path(&a.dst), &opts)
                    .map_err(|e| CliError::new(format!("{}: {e}", a.dst)))?;
            }
        }
    }
    let dst = Disk::open(
        &a.dst,
        Some(out_fmt),
        &OpenMode {
            writable: true,
            direct,
            ..Default::default()
        },
    )?;
    if dst.size()? < size {
        return Err(CliError::new(format!(
            "Output image is too small ({} bytes for a {size}-byte source): {}",
            dst.size()?,
            a.dst
        )));
    }
    // A new target reads as zeros (QED without backing, a fresh raw file): zero runs are left
    // alone. An existing one (-n), or one over a backing file, gets them zeroed.
    let opts = CopyOptions {
        min_sparse: min_sparse * 512,
        zero_init: !a.no_create && backing.is_none(),
    };
    let progress = Progress::new(a.progress && !a.quiet, 1);
    let over;
    let mut source: &dyn CopySource<CliError> = &src;
    if backing.is_some() {
        let backing_size = match dst.layers.get(1) {
            Some(l) => l.size()?,
            None => 0,
        };
        over = OverBacking {
            src: &src,
            backing_size,
        };
        source = &over;
    }
    if a.salvage {
        let salvage = Salvage {
            src: source,
            quiet: a.quiet,
        };
        salvage.walk()?;
        copy(&salvage, &dst, &opts, &progress.library())?;
    } else {
        copy(source, &dst, &opts, &progress.library())?;
    }
    progress.finish();
    drop(progress);
    dst.flush()?;
    dst.close()?;
    src.close()?;
    Ok(0)
}
