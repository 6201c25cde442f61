// SPDX-License-Identifier: MIT OR Apache-2.0
//! JSON as qemu-img prints it: QEMU's pretty printer (4-space indent, `"key": value`) with the
//! key order of a QDict, which iterates its 512 hash buckets in order and, inside a bucket, the
//! most recently inserted key first. Matching that order makes `--output=json` byte-identical.

use std::fmt::Write;

#[derive(Clone, Debug)]
pub(crate) enum Json {
    Int(i128),
    Bool(bool),
    Str(String),
    Arr(Vec<Json>),
    /// Keys in insertion order (the order QEMU's QAPI visitor adds them).
    Obj(Vec<(String, Json)>),
}

impl From<u64> for Json {
    fn from(v: u64) -> Self {
        Json::Int(v as i128)
    }
}
impl From<u32> for Json {
    fn from(v: u32) -> Self {
        Json::Int(v as i128)
    }
}
impl From<bool> for Json {
    fn from(v: bool) -> Self {
        Json::Bool(v)
    }
}
impl From<&str> for Json {
    fn from(v: &str) -> Self {
        Json::Str(v.to_string())
    }
}
impl From<String> for Json {
    fn from(v: String) -> Self {
        Json::Str(v)
    }
}

/// Builds an object in insertion order.
#[derive(Default)]
pub(crate) struct ObjBuilder(Vec<(String, Json)>);

impl ObjBuilder {
    pub(crate) fn new() -> Self {
        Self::default()
    }
    pub(crate) fn add(mut self, k: &str, v: impl Into<Json>) -> Self {
        self.0.push((k.to_string(), v.into()));
        self
    }
    pub(crate) fn add_opt(self, k: &str, v: Option<impl Into<Json>>) -> Self {
        match v {
            Some(v) => self.add(k, v),
            None => self,
        }
    }
    pub(crate) fn build(self) -> Json {
        Json::Obj(self.0)
    }
}

/// QEMU's `tdb_hash` reduced to a QDict bucket.
fn bucket(key: &str) -> u32 {
    let mut value = 0x238F13AFu32.wrapping_mul(key.len() as u32);
    for (i, &c) in key.as_bytes().iter().enumerate() {
        value = value.wrapping_add((c as u32) << ((i * 5) % 24));
    }
    1103515243u32.wrapping_mul(value).wrapping_add(12345) % 512
}

fn escape(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || (c as u32) >= 0x7f => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{:04X}", u);
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn indent(out: &mut String, level: usize) {
    for _ in 0..level {
        out.push_str("    ");
    }
}

fn write_value(v: &Json, level: usize, out: &mut String) {
    match v {
        Json::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Json::Str(s) => escape(s, out),
        Json::Arr(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push('\n');
                indent(out, level + 1);
                write_value(item, level + 1, out);
            }
            out.push('\n');
            indent(out, level);
            out.push(']');
        }
        Json::Obj(items) => {
            // Bucket order; inside a bucket the later insertion comes first.
            let mut order: Vec<(u32, usize)> = items
                .iter()
                .enumerate()
                .map(|(i, (k, _))| (bucket(k), i))
                .collect();
            order.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
            out.push('{');
            for (n, &(_, i)) in order.iter().enumerate() {
                if n > 0 {
                    out.push(',');
                }
                out.push('\n');
                indent(out, level + 1);
                escape(&items[i].0, out);
                out.push_str(": ");
                write_value(&items[i].1, level + 1, out);
            }
            out.push('\n');
            indent(out, level);
            out.push('}');
        }
    }
}

/// The pretty form, with a final newline, as `qemu-img ... --output=json` prints it.
pub(crate) fn pretty(v: &Json) -> String {
    let mut out = String::new();
    write_value(v, 0, &mut out);
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_check_order() {
        let v = ObjBuilder::new()
            .add("filename", "l.qed")
            .add("format", "qed")
            .add("check-errors", 0u64)
            .add("leaks", 2u64)
            .add("total-clusters", 160u64)
            .add("allocated-clusters", 3u64)
            .add("fragmented-clusters", 1u64)
            .build();
        assert_eq!(
            pretty(&v),
            "{\n    \"total-clusters\": 160,\n    \"check-errors\": 0,\n    \"leaks\": 2,\n    \"allocated-clusters\": 3,\n    \"filename\": \"l.qed\",\n    \"format\": \"qed\",\n    \"fragmented-clusters\": 1\n}\n"
        );
    }

    #[test]
    fn same_bucket_latest_first() {
        assert_eq!(bucket("children"), bucket("backing-filename-format"));
        let v = ObjBuilder::new()
            .add("backing-filename-format", "raw")
            .add("children", Json::Arr(vec![]))
            .build();
        assert!(pretty(&v).starts_with("{\n    \"children\": [\n    ],\n    \"backing"));
    }
}
