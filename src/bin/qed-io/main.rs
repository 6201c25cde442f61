// SPDX-License-Identifier: MIT OR Apache-2.0
//! `qed-io`: qemu-io for QED images, on libqed.
//!
//! Options and commands are spelled as qemu-io 10.0.2 spells them and the output is the same
//! byte for byte (report.rs), so scripts and QEMU's iotests can run it in place of qemu-io.
//! Every data request goes through a [`qed::aio::AioQueue`], so `-i` chooses the engine.

mod cmds;
mod getopt;
mod open;
mod report;

use cmds::{Session, Settings};
use getopt::getopt_permute;
use std::io::BufRead;

const USAGE: &str = "Usage: PROG [OPTIONS]... [-c STRING]... [file]
QEMU Disk exerciser for QED images (libqed)

  -c, --cmd STRING     execute command with its arguments
                       from the given string
  -f, --format FMT     specifies the block driver to use (qed)
  -r, --read-only      export read-only
  -s, --snapshot       use snapshot file
  -C, --copy-on-read   enable copy-on-read
  -n, --nocache        disable host cache, short for -t none
  -d, --discard=MODE   accepted (ignore, off, unmap, on); discards are always done
  -k, --native-aio     use kernel AIO (here: the automatic I/O engine)
  -m, --misalign       accepted, no effect
  -T, --trace OPTS     accepted, no effect
  -U, --force-share    force shared permissions
  -i, --aio=MODE       use AIO mode (threads, native or io_uring)
  -t, --cache=MODE     use the given cache mode for the image
  -h, --help           display this help and exit
  -V, --version        output version information and exit

See 'PROG -c help' for information on available commands.
";

/// Long options qemu-io accepts, as their short letters.
fn long_to_short(arg: &str) -> Option<(String, Option<String>)> {
    let body = arg.strip_prefix("--")?;
    let (name, val) = match body.split_once('=') {
        Some((n, v)) => (n, Some(v.to_string())),
        None => (body, None),
    };
    let c = match name {
        "cmd" => 'c',
        "format" => 'f',
        "read-only" => 'r',
        "snapshot" => 's',
        "copy-on-read" => 'C',
        "nocache" => 'n',
        "force-share" => 'U',
        "aio" => 'i',
        "cache" => 't',
        "discard" => 'd',
        "native-aio" => 'k',
        "misalign" => 'm',
        "trace" => 'T',
        "help" => 'h',
        "version" => 'V',
        _ => return None,
    };
    Some((format!("-{c}"), val))
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    // qemu-io names itself after argv[0] in prompts and error messages; so do we, so that a
    // `qemu-io` link prints what the iotests expect.
    let prog = argv
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "qed-io".into());
    let mut args = Vec::new();
    for a in &argv[1..] {
        match long_to_short(a) {
            Some((s, v)) => {
                args.push(s);
                args.extend(v);
            }
            None if a.starts_with("--") && a.len() > 2 => {
                eprintln!("{prog}: unrecognized option '{a}'");
                eprintln!("Try '{prog} --help' for more information.");
                std::process::exit(1);
            }
            None => args.push(a.clone()),
        }
    }
    let (opts, rest) = match getopt_permute(&args, "c:d:f:rsnkmUi:t:T:hVC") {
        Ok(x) => x,
        Err(e) => {
            eprintln!("{prog}: {e}");
            eprintln!("Try '{prog} --help' for more information.");
            std::process::exit(1);
        }
    };
    let mut settings = Settings::default();
    let mut cmdline = Vec::new();
    for (c, v) in opts {
        let v = v.unwrap_or_default();
        let shared = settings.apply_open_option(c, &v);
        let r = match c {
            _ if shared.is_some() => shared.unwrap_or(Ok(())),
            'c' => {
                cmdline.push(v);
                Ok(())
            }
            'f' => settings.set_format(&v),
            'i' => settings.set_aio(&v),
            // Discard is always passed down; buffer misalignment and tracing change nothing
            // qed-io prints.
            'd' => match v.as_str() {
                "ignore" | "off" | "unmap" | "on" => Ok(()),
                _ => Err(format!("Invalid discard option: {v}")),
            },
            'm' | 'T' => Ok(()),
            'h' => {
                print!("{}", USAGE.replace("PROG", &prog));
                std::process::exit(0);
            }
            'V' => {
                println!(
                    "{prog} version {} (libqed, qemu-io 10.0.2 compatible)",
                    env!("CARGO_PKG_VERSION")
                );
                std::process::exit(0);
            }
            _ => unreachable!("getopt returns only listed letters"),
        };
        if let Err(e) = r {
            eprintln!("{prog}: {e}");
            std::process::exit(1);
        }
    }
    if rest.len() > 1 {
        eprintln!("{prog}: too many arguments");
        eprintln!("Try '{prog} --help' for more information.");
        std::process::exit(1);
    }
    let mut s = Session::new(prog.clone(), settings);
    if let Some(path) = rest.first() {
        if s.open(Some(path), &s.settings()).is_err() {
            report::flush_out();
            std::process::exit(1);
        }
    }
    let mut failed = false;
    if cmdline.is_empty() {
        // Commands from stdin, each after a prompt, as qemu-io does when stdin is not a tty.
        let stdin = std::io::stdin();
        let mut lines = stdin.lock().lines();
        loop {
            out!("{prog}> ");
            report::flush_out();
            let Some(Ok(line)) = lines.next() else { break };
            failed |= s.command(&line).is_err();
            if s.quit {
                break;
            }
        }
    } else {
        for c in &cmdline {
            failed |= s.command(c).is_err();
            if s.quit {
                break;
            }
        }
    }
    s.close();
    report::flush_out();
    std::process::exit(i32::from(failed));
}
