// SPDX-License-Identifier: MIT OR Apache-2.0
//! Writes qed-img's manual pages, `qed-img.1` and one `qed-img-<command>.1` per subcommand, into
//! the folder given as the only argument, from the clap definitions qed-img itself parses
//! (src/bin/qed-img/cli.rs), so the pages cannot drift from the options. meson runs it at build
//! time: `cargo run --example qed-img-man -- DIR`.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use clap::CommandFactory;
use clap_mangen::roff::{roman, Roff};
use clap_mangen::Man;

// The binary's own module: its structs are built here only to describe them, never read.
#[allow(dead_code)]
#[path = "../src/bin/qed-img/cli.rs"]
mod cli;

fn page(cmd: clap::Command, top: &str, out: &Path) -> std::io::Result<()> {
    // Subcommands carry no version of their own: every page's footer names the package's.
    let man = Man::new(cmd.clone())
        .manual("libqed manual")
        .source(format!("qed-img {}", env!("CARGO_PKG_VERSION")));
    let name = man.get_filename();
    let mut f = File::create(out.join(&name))?;
    man.render_title(&mut f)?;
    man.render_name_section(&mut f)?;
    man.render_synopsis_section(&mut f)?;
    man.render_description_section(&mut f)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(&mut f)?;
    }
    if cmd.get_subcommands().any(|s| !s.is_hide_set()) {
        man.render_subcommands_section(&mut f)?;
    }
    // clap_mangen would title the after-help text "EXTRA"; man-pages(7) calls it EXIT STATUS.
    let mut roff = Roff::default();
    let mut see_also = vec![("libqed", "3"), ("qemu-img", "1")];
    if cmd.get_name() == top {
        roff.control("SH", ["EXIT STATUS"])
            .text([roman(cli::EXIT_STATUS)]);
    } else {
        see_also.insert(0, (top, "1"));
    }
    let last = see_also.len() - 1;
    let refs: Vec<String> = see_also
        .iter()
        .enumerate()
        .map(|(i, (n, sect))| format!(".BR {n} ({sect}){}", if i < last { "," } else { "" }))
        .collect();
    roff.control("SH", ["SEE ALSO"]);
    roff.to_writer(&mut f)?;
    writeln!(f, "{}", refs.join("\n"))?;
    if cmd.get_version().is_some() {
        man.render_version_section(&mut f)?;
    }
    Ok(())
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [out] = args.as_slice() else {
        eprintln!("usage: qed-img-man OUTPUT_DIR");
        std::process::exit(2);
    };
    let out = Path::new(out);
    std::fs::create_dir_all(out)?;
    let mut cmd = cli::Cli::command().disable_help_subcommand(true);
    // build() names each subcommand "qed-img-<name>", which is what its page is called.
    cmd.build();
    let top = cmd.get_name().to_string();
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        page(sub.clone(), &top, out)?;
    }
    page(cmd, &top, out)
}
