// SPDX-License-Identifier: MIT OR Apache-2.0
//! `qed-img check [-r leaks|all] [--output=human|json] [-q] [-U] FILE`, with qemu-img's output and
//! exit codes: 0 clean, 1 the check could not complete, 2 corruptions, 3 leaks only.

use crate::common::{parse_fmt, CliError, CliResult, Fmt, Progress};
use crate::disk::{Disk, OpenMode};
use crate::json::{pretty, ObjBuilder};
use crate::CheckArgs;
use qed::{CheckFix, CheckResult};

fn human(r: &CheckResult) -> String {
    let mut s = String::new();
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        s += "No errors were found on the image.\n";
    } else {
        if r.corruptions > 0 {
            s += &format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            );
        }
        if r.leaks > 0 {
            s += &format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                r.leaks
            );
        }
        if r.check_errors > 0 {
            s += &format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            );
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        s += &format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            r.allocated_clusters as f64 * 100.0 / r.total_clusters as f64,
            r.fragmented_clusters as f64 * 100.0 / r.allocated_clusters as f64,
            0.0
        );
    }
    // QEMU's QED check does not report an image end offset; neither do we.
    s
}

fn json(file: &str, r: &CheckResult) -> String {
    let nz = |v: u64| (v != 0).then_some(v);
    let v = ObjBuilder::new()
        .add("filename", file)
        .add("format", "qed")
        .add("check-errors", r.check_errors)
        .add_opt("corruptions", nz(r.corruptions))
        .add_opt("leaks", nz(r.leaks))
        .add_opt("corruptions-fixed", nz(r.corruptions_fixed))
        .add_opt("leaks-fixed", nz(r.leaks_fixed))
        .add_opt("total-clusters", nz(r.total_clusters))
        .add_opt("allocated-clusters", nz(r.allocated_clusters))
        .add_opt("fragmented-clusters", nz(r.fragmented_clusters))
        .build();
    pretty(&v)
}

pub(crate) fn run(a: CheckArgs) -> CliResult<i32> {
    let fmt = parse_fmt(a.fmt.as_deref())?;
    let fix = match a.repair.as_deref() {
        None => CheckFix::NONE,
        Some("leaks") => CheckFix {
            leaks: true,
            errors: false,
        },
        _ => CheckFix::ALL,
    };
    if fix.any() && a.force_share {
        return Err(CliError::new(
            "--force-share/-U cannot be used with -r (repair needs exclusive access)",
        ));
    }
    let mode = OpenMode {
        writable: fix.any(),
        force_share: a.force_share,
        no_backing: true,
        no_repair: true,
        image_opts: a.image_opts.image_opts,
        ..Default::default()
    };
    let disk = Disk::open(&a.file, fmt, &mode)?;
    if disk.fmt == Fmt::Raw {
        return Err(CliError::new("This image format does not support checks").with_code(63));
    }
    let img = disk.image().expect("qed").clone();
    // qemu-img check has no -p; ours shows the library's progress (L2 tables examined).
    let progress = Progress::new(a.progress && !a.quiet, 1);
    let failed = |e: qed::Error| CliError::new(format!("Check failed: {}: {e}", a.file));
    let mut r = img.check_with(fix, &progress.library()).map_err(failed)?;
    let mut out = String::new();
    if r.corruptions_fixed > 0 || r.leaks_fixed > 0 {
        if !a.output.json() {
            out += &format!(
                "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
                r.leaks_fixed, r.corruptions_fixed
            );
        }
        let again = img.check(CheckFix::NONE).map_err(failed)?;
        r = CheckResult {
            leaks_fixed: r.leaks_fixed,
            corruptions_fixed: r.corruptions_fixed,
            ..again
        };
    }
    progress.finish();
    drop(progress);
    out += &if a.output.json() {
        json(&a.file, &r)
    } else {
        human(&r)
    };
    if !a.quiet {
        print!("{out}");
    }
    drop(img);
    disk.close()?;
    if r.check_errors > 0 {
        return Err(CliError::new("Check failed"));
    }
    Ok(if r.corruptions > 0 {
        2
    } else if r.leaks > 0 {
        3
    } else {
        0
    })
}
