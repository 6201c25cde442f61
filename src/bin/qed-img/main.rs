// SPDX-License-Identifier: MIT OR Apache-2.0
//! `qed-img`: qemu-img's commands for QED (and raw) images, on libqed.
//!
//! Options are spelled as qemu-img spells them (cli.rs) and exit codes follow qemu-img where it
//! has them (`cli::EXIT_STATUS`).

mod bench;
mod check;
mod cli;
mod commit;
mod common;
mod compare;
mod convert;
mod create;
mod dd;
mod disk;
mod info;
mod json;
mod map;
mod rebase;
mod resize;
mod sparsify;
mod spec;
mod stream;

use clap::Parser;
pub(crate) use cli::*;
use common::CliResult;

fn run(cmd: Cmd) -> CliResult<i32> {
    match cmd {
        Cmd::Create(a) => create::run(a),
        Cmd::Info(a) => info::run(a),
        Cmd::Check(a) => check::run(a),
        Cmd::Map(a) => map::run(a),
        Cmd::Convert(a) => convert::run(a),
        Cmd::Compare(a) => compare::run(a),
        Cmd::Resize(a) => resize::run(a),
        Cmd::Rebase(a) => rebase::run(a),
        Cmd::Commit(a) => commit::run(a),
        Cmd::Stream(a) => stream::run(a),
        Cmd::Dd(a) => dd::run(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Sparsify(a) => sparsify::run(a),
    }
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            let code = match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => 0,
                _ => 1,
            };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    let code = match run(cli.cmd) {
        Ok(code) => code,
        Err(e) => {
            use std::io::Write;
            let _ = std::io::stdout().flush();
            eprintln!("{}: {}", common::prog_name(), e.msg);
            e.code
        }
    };
    std::process::exit(code);
}
