// SPDX-License-Identifier: MIT OR Apache-2.0
//! `qed-img info [-f FMT] [--output=human|json] [--backing-chain] [-U] FILE`: qemu-img's fields
//! and JSON keys, plus QED's table and header sizes under `format-specific`.

use crate::common::{parse_fmt, path_combine, size_to_str, CliError, CliResult, Fmt};
use crate::disk::{Disk, Layer, OpenMode};
use crate::json::{pretty, Json, ObjBuilder};
use crate::InfoArgs;
use std::os::unix::fs::MetadataExt;

/// What we print about one image.
struct Info {
    filename: String,
    format: &'static str,
    virtual_size: u64,
    actual_size: u64,
    file_length: u64,
    cluster_size: Option<u32>,
    dirty: bool,
    backing: Option<String>,
    full_backing: Option<String>,
    backing_fmt: Option<&'static str>,
    /// QED: (table size, header size).
    qed: Option<(u32, u32)>,
}

fn layer_info(layer: &Layer) -> CliResult<Info> {
    let path = layer.path().to_string();
    let meta = std::fs::metadata(&path)
        .map_err(|e| CliError::new(format!("{path}: {}", crate::common::io_msg(&e))))?;
    let actual_size = meta.blocks() * 512;
    match layer {
        Layer::Raw { .. } => Ok(Info {
            filename: path,
            format: "raw",
            virtual_size: layer.size()?,
            actual_size,
            file_length: meta.len(),
            cluster_size: None,
            dirty: false,
            backing: None,
            full_backing: None,
            backing_fmt: None,
            qed: None,
        }),
        Layer::Qed { img, .. } => {
            let i = img
                .info()
                .map_err(|e| CliError::new(format!("{path}: {e}")))?;
            let full_backing = i.backing_file.as_deref().map(|b| path_combine(&path, b));
            Ok(Info {
                virtual_size: i.virtual_size,
                actual_size,
                file_length: i.file_size,
                cluster_size: Some(i.cluster_size),
                dirty: i.needs_check,
                backing_fmt: i
                    .backing_file
                    .as_ref()
                    .and(i.backing_format)
                    .map(|f| f.name()),
                backing: i.backing_file,
                full_backing,
                qed: Some((i.table_size, i.header_size)),
                filename: path,
                format: "qed",
            })
        }
    }
}

/// The top image's info, named as QEMU names an image given by options.
fn disk_info(disk: &Disk) -> CliResult<Info> {
    let mut i = layer_info(disk.top())?;
    if let Some((name, dir)) = &disk.shown {
        i.filename = name.clone();
        // An absolute name needs no folder.
        i.full_backing = match (dir, i.backing.as_deref()) {
            (_, Some(b)) if b.starts_with('/') => Some(b.to_string()),
            (Some(d), b) => b.map(|b| path_combine(d, b)),
            (None, _) => None,
        };
    }
    Ok(i)
}

fn to_json(i: &Info) -> Json {
    // Keys added in the order of QEMU's ImageInfo; the printer orders them as QEMU's QDict.
    let child = ObjBuilder::new()
        .add("filename", i.filename.as_str())
        .add("format", "file")
        .add("dirty-flag", false)
        .add("actual-size", i.actual_size)
        .add("virtual-size", i.file_length)
        .add(
            "format-specific",
            ObjBuilder::new()
                .add("type", "file")
                .add("data", ObjBuilder::new().build())
                .build(),
        )
        .add("children", Json::Arr(vec![]))
        .build();
    let specific = i.qed.map(|(table, header)| {
        ObjBuilder::new()
            .add("type", "qed")
            .add(
                "data",
                ObjBuilder::new()
                    .add("table-size", table)
                    .add("header-size", header)
                    .build(),
            )
            .build()
    });
    ObjBuilder::new()
        .add("filename", i.filename.as_str())
        .add("format", i.format)
        .add("dirty-flag", i.dirty)
        .add("actual-size", i.actual_size)
        .add("virtual-size", i.virtual_size)
        .add_opt("cluster-size", i.cluster_size)
        .add_opt("backing-filename", i.backing.clone())
        .add_opt("full-backing-filename", i.full_backing.clone())
        .add_opt("backing-filename-format", i.backing_fmt)
        .add_opt("format-specific", specific)
        .add(
            "children",
            Json::Arr(vec![ObjBuilder::new()
                .add("name", "file")
                .add("info", child)
                .build()]),
        )
        .build()
}

fn human(i: &Info) -> String {
    let mut s = format!(
        "image: {}\nfile format: {}\nvirtual size: {} ({} bytes)\ndisk size: {}\n",
        i.filename,
        i.format,
        size_to_str(i.virtual_size),
        i.virtual_size,
        size_to_str(i.actual_size)
    );
    if let Some(c) = i.cluster_size {
        s += &format!("cluster_size: {c}\n");
    }
    if i.dirty {
        s += "cleanly shut down: no\n";
    }
    if let Some(b) = &i.backing {
        s += &format!("backing file: {b}");
        match &i.full_backing {
            Some(full) if full != b => s += &format!(" (actual path: {full})"),
            Some(_) => {}
            None => s += " (cannot determine actual path)",
        }
        s += "\n";
        if let Some(f) = i.backing_fmt {
            s += &format!("backing file format: {f}\n");
        }
    }
    if let Some((table, header)) = i.qed {
        // QEMU prints format-specific keys in QDict order, with '-' shown as ' '.
        s += &format!(
            "Format specific information:\n    header size: {header}\n    table size: {table}\n"
        );
    }
    s += &format!(
        "Child node '/file':\n    filename: {}\n    protocol type: file\n    file length: {} ({} bytes)\n    disk size: {}\n",
        i.filename,
        size_to_str(i.file_length),
        i.file_length,
        size_to_str(i.actual_size)
    );
    s
}

pub(crate) fn run(a: InfoArgs) -> CliResult<i32> {
    let fmt = parse_fmt(a.fmt.as_deref())?;
    let mode = OpenMode {
        force_share: a.force_share,
        no_backing: true,
        no_repair: true,
        ..Default::default()
    };
    let mut infos = Vec::new();
    if a.backing_chain {
        // As qemu-img: each image opened alone, its backing file named by the one above; a
        // name met twice is a loop, reported before anything is printed.
        let mut seen = std::collections::HashSet::new();
        let (mut file, mut fmt) = (a.file.clone(), fmt);
        loop {
            if !seen.insert(file.clone()) {
                return Err(CliError::new(format!(
                    "Backing file '{file}' creates an infinite loop."
                )));
            }
            let first = infos.is_empty();
            let m = OpenMode {
                image_opts: first && a.image_opts.image_opts,
                ..mode
            };
            let disk = Disk::open(&file, fmt, &m)?;
            let i = disk_info(&disk)?;
            let next = match (&i.full_backing, &i.backing) {
                (Some(f), _) => Some(f.clone()),
                (None, Some(b)) => {
                    return Err(CliError::new(format!(
                        "Could not determine absolute backing filename, but backing filename '{b}' present"
                    )))
                }
                (None, None) => None,
            };
            fmt = i.backing_fmt.map(Fmt::parse).transpose()?;
            infos.push(i);
            match next {
                Some(n) => file = n,
                None => break,
            }
        }
    } else {
        let m = OpenMode {
            image_opts: a.image_opts.image_opts,
            ..mode
        };
        let disk = Disk::open(&a.file, fmt, &m)?;
        infos.push(disk_info(&disk)?);
    }
    if a.output.json() {
        if a.backing_chain {
            print!(
                "{}",
                pretty(&Json::Arr(infos.iter().map(to_json).collect()))
            );
        } else {
            print!("{}", pretty(&to_json(&infos[0])));
        }
    } else {
        let parts: Vec<String> = infos.iter().map(human).collect();
        print!("{}", parts.join("\n"));
    }
    Ok(0)
}
