// SPDX-License-Identifier: MIT OR Apache-2.0
//! Consistency check and repair, streaming over the tables so memory stays bounded whatever the
//! image claims: tables are read in pieces of at most 512 KiB, and referenced clusters are kept
//! in a sparse bitmap that grows only with clusters actually referenced.
//!
//! Like QEMU's check it reports corruptions (entries that are unaligned, inside the header, past
//! the end of the file, or referencing a cluster twice), leaks (clusters nothing references),
//! check errors (tables that could not be read), and cluster statistics. Repair goes further
//! than QEMU: an entry pointing into metadata is cleared; two data entries sharing a cluster are
//! separated by copying the cluster (copy, flush, repoint), so neither guest range loses data;
//! and leaked clusters at the end of the file are truncated away.
//!
//! Progress is reported in guest clusters: as each L2 table is examined, the clusters it maps
//! count as done (total: the virtual disk's clusters). Where a check may stop when cancelled:
//! - a check without repair: at any report (it writes nothing);
//! - a repair: only where the file holds no half-done fix and no corruption this run could
//!   have removed. That is before its first write (nothing changed), or, once a fix was written,
//!   after the whole table scan with all of its fixes written and flushed (a cancellation asked
//!   for during the scan waits until then), or between two compaction rounds (each round is
//!   complete and flushed: only leaks remain). The caller keeps the need-check bit set, so the
//!   next read-write open finishes the repair.

use super::Progress;
use crate::error::{IoContext, Result};
use crate::format::{table, Geometry, Header};
use crate::storage::Storage;
use std::collections::{BTreeMap, HashMap};

/// What to repair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckFix {
    /// Reclaim leaked clusters.
    pub leaks: bool,
    /// Repair corrupt entries.
    pub errors: bool,
}

impl CheckFix {
    /// Report only.
    pub const NONE: CheckFix = CheckFix {
        leaks: false,
        errors: false,
    };
    /// Repair everything.
    pub const ALL: CheckFix = CheckFix {
        leaks: true,
        errors: true,
    };
    /// Whether anything is to be repaired.
    pub fn any(self) -> bool {
        self.leaks || self.errors
    }
}

/// Result of a check, with QEMU's fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckResult {
    /// Corruptions found and not repaired.
    pub corruptions: u64,
    /// Leaked clusters found and not repaired.
    pub leaks: u64,
    /// Errors that kept the check from completing (unreadable tables). When there are any,
    /// leaks are not counted (an unreadable table may reference any cluster) and a repair
    /// reclaims nothing.
    pub check_errors: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaked clusters reclaimed.
    pub leaks_fixed: u64,
    /// Data clusters referenced by L2 entries.
    pub allocated_clusters: u64,
    /// Clusters of the virtual disk.
    pub total_clusters: u64,
    /// Data clusters not directly after the previous one of the same table.
    pub fragmented_clusters: u64,
    /// File length after the check (and repair).
    pub image_end_offset: u64,
}

const PAGE_BITS: u64 = 1 << 16;

/// A sparse bitmap of cluster indices.
#[derive(Default)]
struct Bitmap {
    pages: BTreeMap<u64, Box<[u64]>>,
}

impl Bitmap {
    fn get(&self, i: u64) -> bool {
        self.pages
            .get(&(i / PAGE_BITS))
            .is_some_and(|p| p[((i % PAGE_BITS) / 64) as usize] & (1 << (i % 64)) != 0)
    }
    fn set(&mut self, i: u64) {
        let p = self
            .pages
            .entry(i / PAGE_BITS)
            .or_insert_with(|| vec![0u64; (PAGE_BITS / 64) as usize].into_boxed_slice());
        p[((i % PAGE_BITS) / 64) as usize] |= 1 << (i % 64);
    }
    fn any_in(&self, start: u64, n: u64) -> bool {
        (start..start + n).any(|i| self.get(i))
    }
    fn set_range(&mut self, start: u64, n: u64) {
        (start..start + n).for_each(|i| self.set(i))
    }
    fn count_in(&self, start: u64, end: u64) -> u64 {
        let mut c = 0;
        for (&pi, p) in self
            .pages
            .range(start / PAGE_BITS..=end.saturating_sub(1) / PAGE_BITS)
        {
            for (wi, &w) in p.iter().enumerate() {
                if w == 0 {
                    continue;
                }
                for b in 0..64 {
                    let i = pi * PAGE_BITS + wi as u64 * 64 + b;
                    if i >= start && i < end && w & (1 << b) != 0 {
                        c += 1;
                    }
                }
            }
        }
        c
    }
    fn clear(&mut self, i: u64) {
        if let Some(p) = self.pages.get_mut(&(i / PAGE_BITS)) {
            p[((i % PAGE_BITS) / 64) as usize] &= !(1 << (i % 64));
        }
    }
    /// The highest set bit below `before`.
    fn prev_set(&self, before: u64) -> Option<u64> {
        let before = before.checked_sub(1)?;
        for (&pi, p) in self.pages.range(..=before / PAGE_BITS).rev() {
            let top = if pi == before / PAGE_BITS {
                before % PAGE_BITS
            } else {
                PAGE_BITS - 1
            };
            for wi in (0..=(top / 64) as usize).rev() {
                let mut w = p[wi];
                if wi as u64 == top / 64 && top % 64 != 63 {
                    w &= (1u64 << (top % 64 + 1)) - 1;
                }
                if w != 0 {
                    return Some(pi * PAGE_BITS + wi as u64 * 64 + 63 - w.leading_zeros() as u64);
                }
            }
        }
        None
    }
    /// The lowest clear bit at or after `from`.
    fn next_clear(&self, mut from: u64) -> u64 {
        loop {
            match self.pages.get(&(from / PAGE_BITS)) {
                None => return from,
                Some(p) => {
                    let w = p[((from % PAGE_BITS) / 64) as usize] | ((1u64 << (from % 64)) - 1);
                    if w != u64::MAX {
                        return from - from % 64 + w.trailing_ones() as u64;
                    }
                    from = from - from % 64 + 64;
                }
            }
        }
    }
}

/// Whether `len` bytes at `at` are a hole (read as zeros) and need not be read.
fn is_hole(storage: &dyn Storage, at: u64, len: u64) -> bool {
    match storage.data_from(at) {
        Ok(None) => true,
        Ok(Some(d)) => d >= at.saturating_add(len),
        Err(_) => false,
    }
}

/// Entries read per piece of table.
const PIECE_ENTRIES: u64 = 64 * 1024;

/// What a cancelled check or repair reports.
const WHAT: &str = "check";

/// Runs the check over `storage` with its validated `header`, reporting to `progress` (see the
/// module documentation for where it may stop).
pub(crate) fn run(
    storage: &dyn Storage,
    header: &Header,
    g: &Geometry,
    fix: CheckFix,
    progress: &Progress,
) -> Result<CheckResult> {
    let cs = g.cluster_bytes();
    let cb = g.cluster_bits();
    let tb = g.table_bytes();
    let ts = g.table_size as u64;
    let file_len = storage.len().ctx(|| "reading image length".into())?;
    let header_bytes = header.header_bytes();
    let l1_off = header.l1_table_offset;
    let mut res = CheckResult {
        total_clusters: header.image_size.div_ceil(cs),
        ..Default::default()
    };
    let mut used = Bitmap::default();
    let mut meta = Bitmap::default();
    used.set_range(0, header.header_size as u64);
    used.set_range(l1_off >> cb, ts);
    meta.set_range(0, header.header_size as u64);
    meta.set_range(l1_off >> cb, ts);
    let mut wrote = false;
    let mut pad = false;
    let mut append_at = g.cluster_ceil(file_len);
    let total = res.total_clusters;
    // Once a fix is written, a cancellation waits for the end of the scan (see above).
    let report = |done: u64, wrote: bool| match progress.update(WHAT, done, total) {
        Err(e) if !wrote => Err(e),
        _ => Ok(()),
    };
    report(0, false)?;

    // Pass 1: the L1 table; mark every table so that data entries pointing at one are caught
    // whatever order they come in.
    let mut tables: Vec<(u64, u64)> = Vec::new(); // (L1 index, table offset)
    let n = g.table_entries();
    let mut bytes = Vec::new();
    let mut entries = Vec::new();
    let mut start = 0;
    while start < n {
        let count = (n - start).min(PIECE_ENTRIES);
        let at = l1_off + start * 8;
        if is_hole(storage, at, count * 8) {
            start += count;
            continue;
        }
        bytes.resize((count * 8) as usize, 0);
        storage
            .read_at(&mut bytes, at)
            .ctx(|| format!("reading L1 table at {at:#x}"))?;
        entries.clear();
        table::decode_entries(&bytes, &mut entries);
        let mut modified = false;
        for (i, e) in entries.iter_mut().enumerate() {
            if *e == 0 {
                continue;
            }
            let valid = g.is_cluster_aligned(*e)
                && *e >= header_bytes
                && e.checked_add(tb).is_some_and(|end| end <= file_len)
                && !used.any_in(*e >> cb, ts);
            if valid {
                used.set_range(*e >> cb, ts);
                meta.set_range(*e >> cb, ts);
                tables.push((start + i as u64, *e));
            } else if fix.errors {
                *e = 0;
                modified = true;
                res.corruptions_fixed += 1;
            } else {
                res.corruptions += 1;
            }
        }
        if modified {
            let mut out = Vec::with_capacity(bytes.len());
            table::encode_entries(entries.iter().copied(), &mut out);
            storage
                .write_at(&out, at)
                .ctx(|| format!("repairing L1 table at {at:#x}"))?;
            wrote = true;
        }
        start += count;
    }

    // Pass 2: each L2 table's data entries.
    for &(l1i, t) in &tables {
        report(l1i.saturating_mul(n), wrote)?;
        let mut last = 0u64;
        let mut start = 0;
        while start < n {
            let count = (n - start).min(PIECE_ENTRIES);
            let at = t + start * 8;
            if is_hole(storage, at, count * 8) {
                start += count;
                continue;
            }
            bytes.resize((count * 8) as usize, 0);
            if storage.read_at(&mut bytes, at).is_err() {
                res.check_errors += 1;
                start += count;
                continue;
            }
            entries.clear();
            table::decode_entries(&bytes, &mut entries);
            let mut modified = false;
            let mut copied = false;
            for e in entries.iter_mut() {
                if *e <= crate::format::L2_ZERO_CLUSTER {
                    continue;
                }
                res.allocated_clusters += 1;
                if last != 0 && last.checked_add(cs) != Some(*e) {
                    res.fragmented_clusters += 1;
                }
                last = *e;
                let in_file = g.is_cluster_aligned(*e) && *e >= header_bytes && *e < file_len;
                if in_file && !used.get(*e >> cb) {
                    used.set(*e >> cb);
                    if *e + cs > file_len {
                        // The file ends inside this cluster (a crash cut the write that grew
                        // it). We read the rest as zeros, but QEMU takes the file as ending
                        // before the cluster and its repair would drop the entry: pad the file
                        // (after pass 1 cleared the tables that ended past it, so that growing
                        // it cannot make one of them valid).
                        if fix.errors {
                            pad = true;
                            res.corruptions_fixed += 1;
                        } else {
                            res.corruptions += 1;
                        }
                    }
                    continue;
                }
                if !fix.errors {
                    res.corruptions += 1;
                    continue;
                }
                if in_file && !meta.get(*e >> cb) {
                    // Two data entries share this cluster: give this one its own copy.
                    let mut data = vec![0u8; cs as usize];
                    storage
                        .read_at(&mut data, *e)
                        .ctx(|| format!("reading data cluster at {e:#x}"))?;
                    storage
                        .write_at(&data, append_at)
                        .ctx(|| format!("copying cluster to {append_at:#x}"))?;
                    used.set(append_at >> cb);
                    *e = append_at;
                    append_at += cs;
                    copied = true;
                } else {
                    *e = 0;
                }
                modified = true;
                res.corruptions_fixed += 1;
            }
            if modified {
                if copied {
                    storage.flush().ctx(|| "flushing copied clusters".into())?;
                }
                let mut out = Vec::with_capacity(bytes.len());
                table::encode_entries(entries.iter().copied(), &mut out);
                storage
                    .write_at(&out, at)
                    .ctx(|| format!("repairing L2 table at {at:#x}"))?;
                wrote = true;
            }
            start += count;
        }
    }

    if pad {
        // Only ever grows: copies of shared clusters may already lie past the old end.
        let end = g.cluster_ceil(file_len);
        if storage.len().ctx(|| "reading image length".into())? < end {
            storage
                .set_len(end)
                .ctx(|| format!("padding the file to {end:#x}"))?;
        }
        wrote = true;
    }
    if wrote {
        storage.flush().ctx(|| "flushing repairs".into())?;
    }
    // Every fix of the scan is written and flushed: a safe point even after writes.
    progress.update(WHAT, total, total)?;
    let file_len = storage.len().ctx(|| "reading image length".into())?;
    let file_clusters = file_len.div_ceil(cs);
    let first = header.header_size as u64;
    res.image_end_offset = file_len;
    if res.check_errors > 0 {
        // A table that could not be read may reference any cluster: nothing is known to be
        // leaked, and nothing may be reclaimed or moved (its data would be lost).
        return Ok(res);
    }
    let leaks_in = |used: &Bitmap, end: u64| end.saturating_sub(first) - used.count_in(first, end);
    let leaks = leaks_in(&used, file_clusters);
    res.leaks = leaks;
    if fix.leaks && leaks > 0 {
        let keep = compact(
            storage,
            g,
            l1_off,
            &mut used,
            &meta,
            &tables,
            first,
            file_clusters,
            &|| progress.update(WHAT, total, total),
        )?;
        // Moves may have grown the file (data moved out of a table's way lands past the end).
        let cur = storage.len().ctx(|| "reading image length".into())?;
        let end = (keep << cb).min(cur);
        if end < cur {
            storage
                .set_len(end)
                .ctx(|| "truncating leaked clusters".into())?;
            storage.flush().ctx(|| "flushing truncation".into())?;
        }
        res.leaks = leaks_in(&used, keep);
        res.leaks_fixed = leaks.saturating_sub(res.leaks);
        res.image_end_offset = end;
    }
    Ok(res)
}

/// Largest number of cluster moves planned in one compaction round.
const MAX_MOVES: usize = 1 << 20;
/// Compaction rounds at most (each one executes its moves crash-safely before the next plans).
const MAX_ROUNDS: usize = 16;

/// Moves clusters from the end of the file into leaked holes: data clusters one by one, L2
/// tables whole, so that the file can be truncated. Each round is crash-safe: copy everything,
/// flush, repoint the entries, flush (data clusters first, then tables). A crash before a
/// repoint leaves the copies as leaks; after it, the old places are leaks. When a table at the
/// top finds no free run of `table_size` clusters below it, the data clusters in the lowest
/// window of holes and data are moved out of the way (to single holes, or past the end of the
/// file) and the table moves into the window; the next round packs what moved. Returns the
/// clusters in use from the start of the file (the new length in clusters).
#[allow(clippy::too_many_arguments)]
fn compact(
    storage: &dyn Storage,
    g: &Geometry,
    l1_off: u64,
    used: &mut Bitmap,
    meta: &Bitmap,
    tables: &[(u64, u64)],
    first: u64,
    file_clusters: u64,
    between_rounds: &dyn Fn() -> Result<()>,
) -> Result<u64> {
    let cb = g.cluster_bits();
    // Current table positions: start cluster -> L1 index (updated as tables move).
    let mut table_start: BTreeMap<u64, u64> = tables.iter().map(|&(i, o)| (o >> cb, i)).collect();
    let mut end = file_clusters;
    for round in 0..MAX_ROUNDS {
        if round > 0 {
            // Each round is complete and flushed: stopping here leaves leaks only.
            between_rounds()?;
        }
        let moved = compact_round(storage, g, l1_off, used, meta, &mut table_start, first, end)?;
        end = end.max(used.prev_set(u64::MAX).map_or(first, |c| c + 1));
        if !moved {
            break;
        }
    }
    Ok(used.prev_set(end).map_or(first, |c| c + 1).max(first))
}

#[allow(clippy::too_many_arguments)]
fn compact_round(
    storage: &dyn Storage,
    g: &Geometry,
    l1_off: u64,
    used: &mut Bitmap,
    meta: &Bitmap,
    table_start: &mut BTreeMap<u64, u64>,
    first: u64,
    end: u64,
) -> Result<bool> {
    let cb = g.cluster_bits();
    let ts = g.table_size as u64;
    let mut data_moves: HashMap<u64, u64> = HashMap::new(); // src cluster -> dst cluster
    let mut table_moves: Vec<(u64, u64, u64)> = Vec::new(); // (L1 index, src, dst)
    let mut busy = Bitmap::default(); // clusters a move of this round writes or vacates
    let mut append = end; // past the end of the file: room for data moved out of a window
    let mut top = end;
    let mut hole = first;
    let is_table_cluster = |ts_map: &BTreeMap<u64, u64>, c: u64| {
        ts_map
            .range(..=c)
            .next_back()
            .filter(|&(&t, _)| c < t + ts)
            .map(|(&t, &i)| (t, i))
    };
    while data_moves.len() + table_moves.len() < MAX_MOVES {
        let Some(c) = used.prev_set(top) else { break };
        if busy.get(c) {
            break;
        }
        let table = is_table_cluster(table_start, c);
        let (start, len) = match table {
            Some((t, _)) => (t, ts),
            None if meta.get(c) => break, // header or L1 table: never moved
            None => (c, 1),
        };
        // The lowest run of `len` free clusters below the unit.
        let mut dst = used.next_clear(hole);
        while len > 1 && dst + len <= start && (dst..dst + len).any(|i| used.get(i)) {
            dst = used.next_clear(dst + 1);
        }
        if dst + len <= start {
            for i in 0..len {
                used.clear(start + i);
                used.set(dst + i);
                busy.set(start + i);
                busy.set(dst + i);
            }
            match table {
                Some((_, l1i)) => {
                    table_start.remove(&start);
                    table_start.insert(dst, l1i);
                    table_moves.push((l1i, start, dst));
                }
                None => {
                    data_moves.insert(start, dst);
                    hole = dst + 1;
                }
            }
            top = start;
            continue;
        }
        let Some((_, l1i)) = table else { break };
        // A table with no free run below: clear the lowest window made only of holes and data
        // clusters that this round has not touched, moving its data past the end of the file.
        let mut w = used.next_clear(first);
        let window = loop {
            if w + ts > start {
                break None;
            }
            let ok = (w..w + ts).all(|i| {
                !busy.get(i) && !meta.get(i) && is_table_cluster(table_start, i).is_none()
            });
            if ok {
                break Some(w);
            }
            w = used.next_clear(w + 1);
        };
        let Some(w) = window else {
            if start > first && !used.get(start - 1) && !busy.get(start - 1) {
                // A hole right under the table, too small to take it: move it past the end,
                // which frees its clusters next to the hole; the next round brings it back down
                // into that run, lower than it was. Never an overlapping copy. (With no hole
                // right under it, such a move could not come back lower, and repairs would
                // only grow the file: found by fuzzing.)
                for i in 0..ts {
                    used.clear(start + i);
                    busy.set(start + i);
                    used.set(append + i);
                    busy.set(append + i);
                }
                table_start.remove(&start);
                table_start.insert(append, l1i);
                table_moves.push((l1i, start, append));
                append += ts;
            }
            top = start;
            continue;
        };
        for i in w..w + ts {
            if used.get(i) {
                data_moves.insert(i, append);
                used.set(append);
                busy.set(append);
                append += 1;
            }
            used.set(i);
            busy.set(i);
        }
        for i in 0..ts {
            used.clear(start + i);
            busy.set(start + i);
        }
        table_start.remove(&start);
        table_start.insert(w, l1i);
        table_moves.push((l1i, start, w));
        top = start;
    }
    if data_moves.is_empty() && table_moves.is_empty() {
        return Ok(false);
    }
    // Where each moved data cluster is referenced from (tables at their current places: data
    // moves are repointed before any table of this round moves).
    let mut repoint: Vec<(u64, u64)> = Vec::with_capacity(data_moves.len());
    let n = g.table_entries();
    let mut bytes = Vec::new();
    let mut entries = Vec::new();
    let current: Vec<u64> = {
        let mut v: Vec<u64> = table_start.keys().map(|&c| c << cb).collect();
        for &(_, src, dst) in &table_moves {
            if let Some(p) = v.iter_mut().find(|p| **p == dst << cb) {
                *p = src << cb;
            }
        }
        v
    };
    for &t in &current {
        let mut start = 0;
        while start < n && repoint.len() < data_moves.len() {
            let count = (n - start).min(PIECE_ENTRIES);
            if is_hole(storage, t + start * 8, count * 8) {
                start += count;
                continue;
            }
            bytes.resize((count * 8) as usize, 0);
            storage
                .read_at(&mut bytes, t + start * 8)
                .ctx(|| format!("reading L2 table at {t:#x}"))?;
            entries.clear();
            table::decode_entries(&bytes, &mut entries);
            for (i, &e) in entries.iter().enumerate() {
                if e > crate::format::L2_ZERO_CLUSTER && g.is_cluster_aligned(e) {
                    if let Some(&dst) = data_moves.get(&(e >> cb)) {
                        repoint.push((t + (start + i as u64) * 8, dst << cb));
                    }
                }
            }
            start += count;
        }
    }
    for (&src, &dst) in &data_moves {
        copy(storage, src << cb, dst << cb, g.cluster_bytes())?;
    }
    storage.flush().ctx(|| "flushing moved clusters".into())?;
    for &(at, v) in &repoint {
        storage
            .write_at(&v.to_le_bytes(), at)
            .ctx(|| format!("repointing L2 entry at {at:#x}"))?;
    }
    storage
        .flush()
        .ctx(|| "flushing repointed entries".into())?;
    if !table_moves.is_empty() {
        for &(_, src, dst) in &table_moves {
            copy(storage, src << cb, dst << cb, g.table_bytes())?;
        }
        storage.flush().ctx(|| "flushing moved tables".into())?;
        for &(l1i, _, dst) in &table_moves {
            let at = l1_off + l1i * 8;
            storage
                .write_at(&(dst << cb).to_le_bytes(), at)
                .ctx(|| format!("repointing L1 entry at {at:#x}"))?;
        }
        storage
            .flush()
            .ctx(|| "flushing repointed L1 entries".into())?;
    }
    Ok(true)
}

/// Copies `len` bytes inside the storage, 1 MiB at a time.
fn copy(storage: &dyn Storage, src: u64, dst: u64, len: u64) -> Result<()> {
    let mut buf = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        storage
            .read_at(&mut buf[..n], src + done)
            .ctx(|| format!("reading cluster at {:#x}", src + done))?;
        storage
            .write_at(&buf[..n], dst + done)
            .ctx(|| format!("moving cluster to {:#x}", dst + done))?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_counts_and_finds_last() {
        let mut b = Bitmap::default();
        b.set_range(3, 5);
        b.set(PAGE_BITS * 3 + 7);
        assert!(b.get(4) && !b.get(8));
        assert_eq!(b.count_in(0, PAGE_BITS * 4), 6);
        assert_eq!(b.count_in(4, 6), 2);
        assert!(b.any_in(0, 4));
        assert!(!b.any_in(8, 100));
        assert_eq!(b.prev_set(PAGE_BITS * 3 + 7), Some(7));
        assert_eq!(b.prev_set(PAGE_BITS * 3 + 8), Some(PAGE_BITS * 3 + 7));
        assert_eq!(b.prev_set(3), None);
        assert_eq!(b.next_clear(0), 0);
        assert_eq!(b.next_clear(3), 8);
        b.set_range(8, 120);
        assert_eq!(b.next_clear(3), 128);
        b.clear(100);
        assert_eq!(b.next_clear(3), 100);
    }
}
