// SPDX-License-Identifier: MIT OR Apache-2.0
//! POSIX getopt, as qemu-io parses both its options and each command's: letters may be
//! bundled (`-qv`), an argument follows its letter or is the next word, `--` ends options,
//! and options stop at the first non-option word.

/// The options found (letter, argument) and the remaining words.
pub(crate) type Parsed = (Vec<(char, Option<String>)>, Vec<String>);

/// Parses `args` against `spec` (a letter followed by `:` takes an argument).
pub(crate) fn getopt(args: &[String], spec: &str) -> Result<Parsed, String> {
    getopt_impl(args, spec, false)
}

/// As [`getopt`], but non-option words may come between options (GNU getopt's permutation,
/// which qemu-io's own command line gets).
pub(crate) fn getopt_permute(args: &[String], spec: &str) -> Result<Parsed, String> {
    getopt_impl(args, spec, true)
}

fn getopt_impl(args: &[String], spec: &str, permute: bool) -> Result<Parsed, String> {
    let mut opts = Vec::new();
    let mut words = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if a == "--" {
            i += 1;
            break;
        }
        if !a.starts_with('-') || a.len() == 1 {
            if permute {
                words.push(a.clone());
                i += 1;
                continue;
            }
            break;
        }
        let letters: Vec<char> = a[1..].chars().collect();
        let mut j = 0;
        while j < letters.len() {
            let c = letters[j];
            let pos = spec
                .find(c)
                .filter(|_| c != ':')
                .ok_or_else(|| format!("invalid option -- '{c}'"))?;
            if spec[pos + c.len_utf8()..].starts_with(':') {
                let rest: String = letters[j + 1..].iter().collect();
                let val = if !rest.is_empty() {
                    rest
                } else {
                    i += 1;
                    args.get(i)
                        .cloned()
                        .ok_or_else(|| format!("option requires an argument -- '{c}'"))?
                };
                opts.push((c, Some(val)));
                break;
            }
            opts.push((c, None));
            j += 1;
        }
        i += 1;
    }
    words.extend_from_slice(&args[i.min(args.len())..]);
    Ok((opts, words))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn bundles_arguments_and_stops() {
        let (o, r) = getopt(&v("-qvP 0xab -s4 0 512"), "P:qs:v").unwrap();
        assert_eq!(
            o,
            vec![
                ('q', None),
                ('v', None),
                ('P', Some("0xab".into())),
                ('s', Some("4".into()))
            ]
        );
        assert_eq!(r, v("0 512"));
        assert!(getopt(&v("-x 0"), "q").is_err());
        assert!(getopt(&v("-P"), "P:").is_err());
    }
}
