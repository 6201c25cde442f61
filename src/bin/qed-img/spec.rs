// SPDX-License-Identifier: MIT OR Apache-2.0
//! Images named by options rather than by a file name, as QEMU's block layer takes them:
//! `json:{...}` names (also as backing file names) and `--image-opts` key=value lists. The
//! nodes we know: the formats `qed` and `raw` over a protocol node, and the protocol nodes
//! `file` (`filename`), `blkdebug` (`image`; its `inject-error` rules fail requests with an
//! errno, `set-state` rules are accepted and change nothing here) and `quorum` (`children`,
//! `vote-threshold`: reads vote among the children, writes go to all).

use crate::common::{host_path, io_msg, CliError, CliResult, Fmt};
use qed::storage::lock::{lock_image, ImageLock, LockMode};
use qed::{FileStorage, Storage};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A parsed option value: QEMU's QDict/QList with scalars kept as written.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Val {
    Str(String),
    Num(String),
    Bool(bool),
    Null,
    List(Vec<Val>),
    Dict(Vec<(String, Val)>),
}

impl Val {
    fn get(&self, key: &str) -> Option<&Val> {
        match self {
            Val::Dict(kv) => kv.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
    fn str_of(&self, key: &str) -> Option<String> {
        match self.get(key)? {
            Val::Str(s) | Val::Num(s) => Some(s.clone()),
            Val::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }
    /// JSON text, keys in the order given.
    pub(crate) fn to_json(&self) -> String {
        match self {
            Val::Str(s) => format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")),
            Val::Num(n) => n.clone(),
            Val::Bool(b) => b.to_string(),
            Val::Null => "null".into(),
            Val::List(l) => format!(
                "[{}]",
                l.iter().map(Val::to_json).collect::<Vec<_>>().join(", ")
            ),
            Val::Dict(kv) => format!(
                "{{{}}}",
                kv.iter()
                    .map(|(k, v)| format!("\"{k}\": {}", v.to_json()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

/// A parser for QEMU's JSON, which also takes 'single-quoted' strings.
struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn err(&self, what: &str) -> CliError {
        CliError::new(format!("JSON parse error at offset {}: {what}", self.i))
    }
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn string(&mut self, quote: u8) -> CliResult<String> {
        let mut out = Vec::new();
        loop {
            let Some(&c) = self.s.get(self.i) else {
                return Err(self.err("unterminated string"));
            };
            self.i += 1;
            match c {
                c if c == quote => break,
                b'\\' => {
                    let Some(&e) = self.s.get(self.i) else {
                        return Err(self.err("unterminated escape"));
                    };
                    self.i += 1;
                    out.push(match e {
                        b'n' => b'\n',
                        b't' => b'\t',
                        b'r' => b'\r',
                        b'b' => 8,
                        b'f' => 12,
                        other => other,
                    });
                }
                c => out.push(c),
            }
        }
        String::from_utf8(out).map_err(|_| self.err("string is not UTF-8"))
    }
    fn value(&mut self) -> CliResult<Val> {
        self.ws();
        let Some(&c) = self.s.get(self.i) else {
            return Err(self.err("value expected"));
        };
        match c {
            b'{' => {
                self.i += 1;
                let mut kv = Vec::new();
                if self.eat(b'}') {
                    return Ok(Val::Dict(kv));
                }
                loop {
                    self.ws();
                    let q = self.s.get(self.i).copied();
                    let key = match q {
                        Some(q @ (b'"' | b'\'')) => {
                            self.i += 1;
                            self.string(q)?
                        }
                        _ => return Err(self.err("key expected")),
                    };
                    if !self.eat(b':') {
                        return Err(self.err("':' expected"));
                    }
                    kv.push((key, self.value()?));
                    if self.eat(b'}') {
                        return Ok(Val::Dict(kv));
                    }
                    if !self.eat(b',') {
                        return Err(self.err("',' or '}' expected"));
                    }
                }
            }
            b'[' => {
                self.i += 1;
                let mut l = Vec::new();
                if self.eat(b']') {
                    return Ok(Val::List(l));
                }
                loop {
                    l.push(self.value()?);
                    if self.eat(b']') {
                        return Ok(Val::List(l));
                    }
                    if !self.eat(b',') {
                        return Err(self.err("',' or ']' expected"));
                    }
                }
            }
            b'"' | b'\'' => {
                self.i += 1;
                Ok(Val::Str(self.string(c)?))
            }
            _ => {
                let start = self.i;
                while self.i < self.s.len()
                    && (self.s[self.i].is_ascii_alphanumeric() || b"+-.".contains(&self.s[self.i]))
                {
                    self.i += 1;
                }
                match &self.s[start..self.i] {
                    b"true" => Ok(Val::Bool(true)),
                    b"false" => Ok(Val::Bool(false)),
                    b"null" => Ok(Val::Null),
                    w if !w.is_empty() && (w[0].is_ascii_digit() || w[0] == b'-') => {
                        Ok(Val::Num(String::from_utf8_lossy(w).into_owned()))
                    }
                    _ => Err(self.err("value expected")),
                }
            }
        }
    }
}

/// Parses the text after `json:`.
pub(crate) fn parse_json(text: &str) -> CliResult<Val> {
    let mut p = Parser {
        s: text.as_bytes(),
        i: 0,
    };
    let v = p.value()?;
    p.ws();
    if p.i != text.len() {
        return Err(p.err("trailing characters"));
    }
    if !matches!(v, Val::Dict(_)) {
        return Err(CliError::new("json: names need an object"));
    }
    Ok(v)
}

/// Parses `--image-opts` (`driver=qed,file.filename=x`, `,,` for a comma) into nested dicts;
/// keys whose parts are all numbers become lists, as QEMU's keyval does.
pub(crate) fn parse_keyval(text: &str) -> CliResult<Val> {
    let list = crate::common::parse_opts(&[text.to_string()])?;
    let mut root = Val::Dict(Vec::new());
    for (k, v) in list {
        let mut cur = &mut root;
        let parts: Vec<&str> = k.split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            let Val::Dict(kv) = cur else {
                return Err(CliError::new(format!(
                    "Parameter '{k}' conflicts with another"
                )));
            };
            let pos = match kv.iter().position(|(kk, _)| kk == part) {
                Some(p) => p,
                None => {
                    let fresh = if i + 1 == parts.len() {
                        Val::Str(v.clone())
                    } else {
                        Val::Dict(Vec::new())
                    };
                    kv.push((part.to_string(), fresh));
                    kv.len() - 1
                }
            };
            cur = &mut kv[pos].1;
        }
    }
    Ok(lists_from_numbered(root))
}

fn lists_from_numbered(v: Val) -> Val {
    match v {
        Val::Dict(kv) => {
            let kv: Vec<(String, Val)> = kv
                .into_iter()
                .map(|(k, v)| (k, lists_from_numbered(v)))
                .collect();
            let numbered =
                !kv.is_empty() && kv.iter().enumerate().all(|(i, (k, _))| *k == i.to_string());
            if numbered {
                Val::List(kv.into_iter().map(|(_, v)| v).collect())
            } else {
                Val::Dict(kv)
            }
        }
        other => other,
    }
}

/// Which requests a blkdebug rule fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Io {
    Read,
    Write,
    /// Block status queries (of a blkdebug node above a format).
    Status,
    Any,
}

#[derive(Debug)]
pub(crate) struct Rule {
    io: Io,
    errno: i32,
    sector: Option<u64>,
    once: bool,
    fired: AtomicBool,
}

/// A protocol node: where the format's bytes come from.
#[derive(Debug)]
pub(crate) enum Proto {
    File(String),
    Blkdebug(Box<Proto>, Vec<Arc<Rule>>),
    Quorum(Vec<Proto>, usize),
}

/// An image given by options.
#[derive(Debug)]
pub(crate) struct Spec {
    /// `None`: probe.
    pub(crate) fmt: Option<Fmt>,
    pub(crate) proto: Proto,
    /// How QEMU shows it: the file name when the options say no more than that, else `json:`.
    pub(crate) shown: String,
    /// Rules of a blkdebug node above the format: they fail guest reads and block status.
    pub(crate) guest_rules: Vec<Arc<Rule>>,
}

fn proto_of(v: &Val) -> CliResult<Proto> {
    if let Val::Str(s) = v {
        return Ok(Proto::File(host_path(s)));
    }
    // As QEMU: a node needs its driver, but a bare filename is a file.
    let driver = match v.str_of("driver") {
        Some(d) => d,
        None if v.get("filename").is_some() && v.get("file").is_none() => "file".into(),
        None => return Err(CliError::new("Must specify either driver or file")),
    };
    match driver.as_str() {
        "file" => v
            .str_of("filename")
            .map(|f| Proto::File(host_path(&f)))
            .ok_or_else(|| CliError::new("Parameter 'filename' is required")),
        "blkdebug" => {
            let image = v
                .get("image")
                .ok_or_else(|| CliError::new("Parameter 'image' is required"))?;
            let mut rules = Vec::new();
            if let Some(Val::List(l)) = v.get("inject-error") {
                for r in l {
                    rules.push(Arc::new(rule_of(r)?));
                }
            }
            Ok(Proto::Blkdebug(Box::new(proto_of(image)?), rules))
        }
        "quorum" => {
            let Some(Val::List(children)) = v.get("children") else {
                return Err(CliError::new("Parameter 'children' is required"));
            };
            let threshold = v
                .str_of("vote-threshold")
                .and_then(|t| t.parse::<usize>().ok())
                .filter(|&t| t >= 1 && t <= children.len())
                .ok_or_else(|| {
                    CliError::new("Parameter 'vote-threshold' is required, from 1 to the children")
                })?;
            Ok(Proto::Quorum(
                children.iter().map(proto_of).collect::<CliResult<_>>()?,
                threshold,
            ))
        }
        d => Err(CliError::new(format!(
            "Unknown driver '{d}' (qed-img knows file, blkdebug and quorum under qed and raw)"
        ))),
    }
}

fn rule_of(r: &Val) -> CliResult<Rule> {
    let event = r.str_of("event").unwrap_or_default();
    // blkdebug events: QED's data reads and writes are read_aio and write_aio; "none" rules
    // match by iotype alone.
    let io = match (event.as_str(), r.str_of("iotype").as_deref()) {
        ("read_aio", _) | ("none", Some("read")) => Io::Read,
        ("write_aio", _) | ("none", Some("write")) => Io::Write,
        ("none", Some("block-status")) => Io::Status,
        ("none", None) => Io::Any,
        (e, t) => {
            return Err(CliError::new(format!(
                "blkdebug: event '{e}' (iotype {}) is not supported by qed-img",
                t.unwrap_or("any")
            )))
        }
    };
    let num = |k: &str| -> CliResult<Option<i64>> {
        r.str_of(k)
            .map(|s| {
                s.parse::<i64>()
                    .map_err(|_| CliError::new(format!("blkdebug: {k} = '{s}' is not a number")))
            })
            .transpose()
    };
    Ok(Rule {
        io,
        errno: num("errno")?.unwrap_or(5) as i32,
        sector: num("sector")?.and_then(|s| u64::try_from(s).ok()),
        once: r.str_of("once").as_deref() == Some("true"),
        fired: AtomicBool::new(false),
    })
}

impl Spec {
    /// The image named by `v` (a json: object or parsed --image-opts).
    pub(crate) fn from_val(v: &Val) -> CliResult<Spec> {
        let driver = v.str_of("driver");
        // blkdebug above a format node: the image below, with guest-level rules.
        if driver.as_deref() == Some("blkdebug") {
            if let Some(image @ Val::Dict(_)) = v.get("image") {
                if matches!(image.str_of("driver").as_deref(), Some("qed" | "raw")) {
                    let mut spec = Spec::from_val(image)?;
                    if let Some(Val::List(l)) = v.get("inject-error") {
                        for r in l {
                            spec.guest_rules.push(Arc::new(rule_of(r)?));
                        }
                    }
                    spec.shown = format!("json:{}", v.to_json());
                    return Ok(spec);
                }
            }
        }
        let (fmt, proto) = match driver.as_deref() {
            Some(f @ ("qed" | "raw")) => {
                let file = v
                    .get("file")
                    .ok_or_else(|| CliError::new("Parameter 'file' is required"))?;
                (Some(Fmt::parse(f)?), proto_of(file)?)
            }
            Some("file" | "blkdebug" | "quorum") => (None, proto_of(v)?),
            Some(other) => {
                return Err(CliError::new(format!(
                    "Unknown driver '{other}' (qed-img knows the formats qed and raw)"
                )))
            }
            None => (None, proto_of(v.get("file").unwrap_or(v))?),
        };
        // Only a format (or nothing) over a plain file, saying nothing more, is shown by the
        // file's name (QEMU's bdrv_refresh_filename).
        let only = |v: &Val, keys: &[&str]| match v {
            Val::Dict(kv) => kv.iter().all(|(k, _)| keys.contains(&k.as_str())),
            _ => true,
        };
        let plain = matches!(proto, Proto::File(_))
            && only(v, &["driver", "file", "filename"])
            && v.get("file")
                .map_or(true, |f| only(f, &["driver", "filename"]));
        let shown = match &proto {
            Proto::File(f) if plain => f.clone(),
            _ => format!("json:{}", v.to_json()),
        };
        Ok(Spec {
            fmt,
            proto,
            shown,
            guest_rules: Vec::new(),
        })
    }

    /// The spec of an image name, if it is one (`json:...`, or anything with `image_opts`).
    pub(crate) fn of_name(name: &str, image_opts: bool) -> CliResult<Option<Spec>> {
        if image_opts {
            return Spec::from_val(&parse_keyval(name)?).map(Some);
        }
        match name.strip_prefix("json:") {
            Some(j) => Spec::from_val(&parse_json(j)?).map(Some),
            None => Ok(None),
        }
    }

    /// The plain file this spec reduces to, when it adds nothing to it (no fault rules, no
    /// votes): then it is opened as that file.
    pub(crate) fn plain_file(&self) -> Option<&str> {
        let mut p = &self.proto;
        loop {
            match p {
                Proto::File(f) => return Some(f),
                Proto::Blkdebug(inner, rules) if rules.is_empty() => p = inner,
                _ => return None,
            }
        }
    }

    /// The folder relative backing names are taken from: that of the one file underneath, or
    /// `None` when there are several (QEMU: "cannot determine actual path").
    pub(crate) fn dir_base(&self) -> Option<String> {
        let mut p = &self.proto;
        loop {
            match p {
                Proto::File(f) => return Some(f.clone()),
                Proto::Blkdebug(inner, _) => p = inner,
                Proto::Quorum(..) => return None,
            }
        }
    }

    /// A file underneath, for what only a file has (its size on disk).
    pub(crate) fn first_file(&self) -> &str {
        let mut p = &self.proto;
        loop {
            match p {
                Proto::File(f) => return f,
                Proto::Blkdebug(inner, _) => p = inner,
                Proto::Quorum(c, _) => p = &c[0],
            }
        }
    }

    /// Opens the protocol nodes as storage, their files locked as for `writable` for as long
    /// as the storage lives.
    pub(crate) fn storage(&self, writable: bool, force_share: bool) -> CliResult<Arc<dyn Storage>> {
        open_proto(&self.proto, writable, force_share, &mut Vec::new(), true)
    }
}

/// Opens a protocol node, collecting its files' locks; the `top` node keeps them all.
fn open_proto(
    p: &Proto,
    writable: bool,
    force_share: bool,
    locks: &mut Vec<ImageLock>,
    top: bool,
) -> CliResult<Arc<dyn Storage>> {
    Ok(match p {
        Proto::File(f) => {
            let s = FileStorage::open(Path::new(f), writable, false)
                .map_err(|e| CliError::new(format!("Could not open '{f}': {}", io_msg(&e))))?;
            let mode = match (writable, force_share) {
                (true, _) => LockMode::ReadWrite,
                (false, true) => LockMode::ForceShare,
                (false, false) => LockMode::ReadOnly,
            };
            locks.push(
                lock_image(s.file(), mode)
                    .map_err(|e| CliError::new(format!("Could not open '{f}': {}", io_msg(&e))))?,
            );
            Arc::new(s)
        }
        Proto::Blkdebug(inner, rules) => {
            let inner = open_proto(inner, writable, force_share, locks, false)?;
            Arc::new(Blkdebug {
                inner,
                rules: rules.clone(),
                _locks: if top {
                    std::mem::take(locks)
                } else {
                    Vec::new()
                },
            })
        }
        Proto::Quorum(children, threshold) => {
            let children = children
                .iter()
                .map(|c| open_proto(c, writable, force_share, locks, false))
                .collect::<CliResult<_>>()?;
            Arc::new(Quorum {
                children,
                threshold: *threshold,
                _locks: if top {
                    std::mem::take(locks)
                } else {
                    Vec::new()
                },
            })
        }
    })
}

/// blkdebug's rules on a request: the errno of the first rule it matches (a rule with a sector
/// matches requests covering that sector; a `once` rule fires once).
pub(crate) fn fire(rules: &[Arc<Rule>], io: Io, offset: u64, len: u64) -> io::Result<()> {
    for r in rules {
        if r.io != Io::Any && r.io != io {
            continue;
        }
        if let Some(s) = r.sector {
            let at = s * 512;
            if at < offset || at >= offset + len.max(1) {
                continue;
            }
        }
        if r.once && r.fired.swap(true, Ordering::SeqCst) {
            continue;
        }
        return Err(io::Error::from_raw_os_error(r.errno));
    }
    Ok(())
}

/// blkdebug's error injection: a request that a rule matches fails with the rule's errno.
struct Blkdebug {
    inner: Arc<dyn Storage>,
    rules: Vec<Arc<Rule>>,
    /// The top node holds the locks of every file under it.
    _locks: Vec<ImageLock>,
}

impl Blkdebug {
    fn check(&self, io: Io, offset: u64, len: u64) -> io::Result<()> {
        fire(&self.rules, io, offset, len)
    }
}

impl Storage for Blkdebug {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(Io::Read, offset, buf.len() as u64)?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check(Io::Write, offset, buf.len() as u64)?;
        self.inner.write_at(buf, offset)
    }
    fn write_metadata_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        // Table updates are no data write (no write_aio event), as in QEMU's QED.
        self.inner.write_metadata_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
}

/// quorum: reads vote among the children (at least `threshold` identical answers win), writes
/// go to every child and succeed when `threshold` of them do.
struct Quorum {
    children: Vec<Arc<dyn Storage>>,
    threshold: usize,
    _locks: Vec<ImageLock>,
}

impl Storage for Quorum {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut answers: Vec<(Vec<u8>, usize)> = Vec::new();
        for c in &self.children {
            let mut b = vec![0u8; buf.len()];
            if c.read_at(&mut b, offset).is_ok() {
                match answers.iter_mut().find(|(a, _)| *a == b) {
                    Some((_, n)) => *n += 1,
                    None => answers.push((b, 1)),
                }
            }
        }
        let best = answers.into_iter().max_by_key(|(_, n)| *n);
        match best {
            Some((b, n)) if n >= self.threshold => {
                buf.copy_from_slice(&b);
                Ok(())
            }
            _ => Err(io::Error::from_raw_os_error(EIO)),
        }
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.all(|c| c.write_at(buf, offset))
    }
    fn flush(&self) -> io::Result<()> {
        self.all(|c| c.flush())
    }
    fn len(&self) -> io::Result<u64> {
        self.children[0].len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.all(|c| c.set_len(len))
    }
}

impl Quorum {
    fn all(&self, f: impl Fn(&Arc<dyn Storage>) -> io::Result<()>) -> io::Result<()> {
        let mut ok = 0;
        let mut last = None;
        for c in &self.children {
            match f(c) {
                Ok(()) => ok += 1,
                Err(e) => last = Some(e),
            }
        }
        match last {
            Some(e) if ok < self.threshold => Err(e),
            _ => Ok(()),
        }
    }
}

/// EIO, the errno of a failed vote.
const EIO: i32 = 5;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_with_single_quotes() {
        let v =
            parse_json("{'driver': 'qed', 'file': {'driver': 'file', 'filename': 'a b'}}").unwrap();
        let s = Spec::from_val(&v).unwrap();
        assert_eq!(s.fmt, Some(Fmt::Qed));
        assert_eq!(s.shown, "a b");
        assert_eq!(s.plain_file(), Some("a b"));
    }

    #[test]
    fn keyval_nests_and_numbers_lists() {
        let v = parse_keyval("driver=qed,file.driver=quorum,file.vote-threshold=1,file.children.0.filename=a,file.children.1.filename=b,,c").unwrap();
        let s = Spec::from_val(&v).unwrap();
        assert!(
            s.shown.starts_with("json:{\"driver\": \"qed\""),
            "{}",
            s.shown
        );
        assert_eq!(s.dir_base(), None);
        assert_eq!(s.first_file(), "a");
        match &s.proto {
            Proto::Quorum(c, 1) => assert!(matches!(&c[1], Proto::File(f) if f == "b,c")),
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn blkdebug_rules() {
        let v = parse_json("{'driver':'qed','file':{'driver':'blkdebug','image':{'driver':'file','filename':'x'},'inject-error':[{'event':'write_aio','errno':28,'once':true}]}}").unwrap();
        let s = Spec::from_val(&v).unwrap();
        assert_eq!(s.plain_file(), None);
        assert_eq!(s.dir_base().as_deref(), Some("x"));
        assert!(parse_json("{'driver': 'qed'").is_err());
        assert!(parse_json("[1]").is_err());
    }
}
