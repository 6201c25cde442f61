// SPDX-License-Identifier: MIT OR Apache-2.0
//! `qed-img create [-f qed|raw] [-o cluster_size=N,table_size=N] [-b BACKING [-F FMT]] [-u]
//! FILE [SIZE]`.

use crate::common::{
    check_backing_name, host_path, parse_fmt, parse_opts, parse_size, path_combine, CliError,
    CliResult, Fmt,
};
use crate::disk::{create_raw, Disk, OpenMode};
use crate::CreateArgs;
use qed::{BackingFormat, CreateOptions, Image};

pub(crate) const SIZE_HELP: &str = "Invalid image size specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.";

const QED_OPTS_HELP: &str = "Supported qed options:
  backing_fmt=<str>      - Image format of the base image
  backing_file=<str>     - File name of a base image
  cluster_size=<size>    - Cluster size (in bytes)
  size=<size>            - Virtual disk size
  table_size=<num>       - L1/L2 table size (in clusters)
";

const RAW_OPTS_HELP: &str = "Supported raw options:
  size=<size>            - Virtual disk size
";

/// QED geometry options shared by create and convert.
#[derive(Default, Debug)]
pub(crate) struct QedOpts {
    pub(crate) size: Option<u64>,
    pub(crate) cluster_size: Option<u32>,
    pub(crate) table_size: Option<u32>,
    pub(crate) backing_file: Option<String>,
    pub(crate) backing_fmt: Option<String>,
}

/// Parses `-o` for `fmt`. Returns `None` when help was asked for (and printed).
pub(crate) fn parse_create_opts(fmt: Fmt, list: &[String]) -> CliResult<Option<QedOpts>> {
    let mut o = QedOpts::default();
    for (k, v) in parse_opts(list)? {
        let bad = |what: &str| CliError::new(format!("Parameter '{k}' expects {what}, got '{v}'"));
        match (fmt, k.as_str()) {
            (_, "help") => {
                print!(
                    "{}",
                    if fmt == Fmt::Qed {
                        QED_OPTS_HELP
                    } else {
                        RAW_OPTS_HELP
                    }
                );
                return Ok(None);
            }
            (_, "size") => o.size = Some(parse_size(&v).ok_or_else(|| bad("a size"))?),
            (Fmt::Qed, "cluster_size") => {
                let n = parse_size(&v).ok_or_else(|| bad("a size"))?;
                o.cluster_size = Some(u32::try_from(n).map_err(|_| bad("a cluster size"))?);
            }
            (Fmt::Qed, "table_size") => {
                o.table_size = Some(v.parse().map_err(|_| bad("a number"))?)
            }
            (Fmt::Qed, "backing_file") => o.backing_file = Some(v),
            (Fmt::Qed, "backing_fmt") => o.backing_fmt = Some(v),
            _ => {
                return Err(CliError::new(format!(
                    "Invalid parameter '{k}' for format '{}'",
                    fmt.name()
                )))
            }
        }
    }
    Ok(Some(o))
}

pub(crate) fn backing_format(f: Fmt) -> BackingFormat {
    match f {
        Fmt::Raw => BackingFormat::Raw,
        Fmt::Qed => BackingFormat::Qed,
    }
}

pub(crate) fn run(a: CreateArgs) -> CliResult<i32> {
    let fmt = parse_fmt(a.fmt.as_deref())?.unwrap_or(Fmt::Qed);
    let Some(mut o) = parse_create_opts(fmt, &a.options)? else {
        return Ok(0);
    };
    if a.backing.is_some() {
        o.backing_file = a.backing.clone();
    }
    if a.backing_fmt.is_some() {
        o.backing_fmt = a.backing_fmt.clone();
    }
    if let Some(s) = &a.size {
        o.size = Some(parse_size(s).ok_or_else(|| CliError::new(SIZE_HELP))?);
    }
    let file = &a.file;
    let path = &host_path(file);
    match fmt {
        Fmt::Raw => {
            if o.backing_file.is_some() {
                return Err(CliError::new(format!(
                    "{file}: Backing file not supported for file format 'raw'"
                )));
            }
            let size = o
                .size
                .ok_or_else(|| CliError::new("Image creation needs a size parameter"))?;
            if !a.quiet {
                println!("Formatting '{file}', fmt=raw size={size}");
            }
            // Like qemu-img: the size is rounded up to whole sectors.
            create_raw(path, size.next_multiple_of(512))?;
        }
        Fmt::Qed => {
            let mut bfmt = parse_fmt(o.backing_fmt.as_deref())?;
            let mut size = o.size;
            if let Some(b) = &o.backing_file {
                if b.is_empty() {
                    return Err(CliError::new(format!(
                        "{file}: Expected backing file name, got empty string"
                    )));
                }
                // Names the library would refuse to open are refused here (CVE-2024-4467).
                check_backing_name(file, b)?;
                let bpath = path_combine(path, b);
                if !a.unsafe_ || (size.is_none()) {
                    // Open the backing file as qemu-img does, for its format and size.
                    let ro = OpenMode {
                        force_share: true,
                        no_backing: true,
                        ..Default::default()
                    };
                    let d = Disk::open(&bpath, bfmt, &ro).map_err(|e| {
                        // qemu-img's wording: the cause first, then its hint line.
                        CliError::new(format!("{file}: {}\nCould not open backing image.", e.msg))
                    })?;
                    bfmt = Some(d.fmt);
                    if size.is_none() {
                        size = Some(d.size()?);
                    }
                }
            }
            let size =
                size.ok_or_else(|| CliError::new("Image creation needs a size parameter"))?;
            let cluster_size = o.cluster_size.unwrap_or(65536);
            if !a.quiet {
                let mut line = format!("Formatting '{file}', fmt=qed size={size}");
                if let Some(b) = &o.backing_file {
                    // qemu prints option values with their commas doubled, as they are typed.
                    line += &format!(" backing_file={}", b.replace(',', ",,"));
                }
                if let Some(f) = bfmt {
                    if o.backing_file.is_some() {
                        line += &format!(" backing_fmt={}", f.name());
                    }
                }
                line += &format!(" cluster_size={cluster_size}");
                if let Some(t) = o.table_size {
                    line += &format!(" table_size={t}");
                }
                println!("{line}");
            }
            // Like qemu-img: the size is rounded up to whole sectors.
            let mut opts = CreateOptions::new(size.next_multiple_of(512));
            opts.cluster_size = cluster_size;
            if let Some(t) = o.table_size {
                opts.table_size = t;
            }
            opts.backing_file = o.backing_file.clone();
            opts.backing_format = if o.backing_file.is_some() {
                bfmt.map(backing_format)
            } else {
                None
            };
            Image::create(path, &opts).map_err(|e| CliError::new(format!("{file}: {e}")))?;
        }
    }
    Ok(0)
}
