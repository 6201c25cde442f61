// SPDX-License-Identifier: MIT OR Apache-2.0
//! A bounded cache of L2 table pieces.
//!
//! Changed entries are staged in memory and written back at the next flush (see the engine's
//! write-back); a chunk with staged changes is held by the write-back list, so it is never
//! evicted before it is written.
//!
//! L2 tables can be up to 1 GiB (64 MiB clusters x 16), so the cache never holds whole tables: it
//! holds 4 KiB chunks (512 entries), loaded on demand. Entries are atomics, updated in place by
//! writers after the data they point to is written, so readers never wait on a lock to read a
//! mapping. A chunk in use (an `Arc` held outside the cache) is never evicted, so an update in
//! progress cannot be lost by a reload from disk. The map is sharded to keep threads apart.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

/// Entries per chunk.
pub const CHUNK_ENTRIES: u64 = 512;
/// Bytes per chunk.
pub const CHUNK_BYTES: u64 = CHUNK_ENTRIES * 8;
const SHARDS: usize = 16;

/// (file offset of the L2 table, chunk index inside it).
pub type ChunkKey = (u64, u64);

/// 512 consecutive entries of one L2 table.
pub struct Chunk {
    entries: Box<[AtomicU64]>,
    /// Entries that failed validation when loaded (bitmap); requests through them fail.
    bad: Box<[u64]>,
    /// Entries changed in memory and not yet written, and how many snapshots were taken.
    dirty: Mutex<(bool, u64)>,
    /// Orders the writes of this piece and holds the number of the snapshot last written: an
    /// older snapshot must never land over a newer one (concurrent write-backs may finish out
    /// of order).
    pub io: Mutex<u64>,
}

impl Chunk {
    /// A chunk holding `raw` entries, with the indices in `bad` flagged.
    pub fn new(raw: &[u64], bad: &[usize]) -> Chunk {
        let mut bits = vec![0u64; raw.len().div_ceil(64)].into_boxed_slice();
        for &i in bad {
            bits[i / 64] |= 1 << (i % 64);
        }
        Chunk {
            entries: raw.iter().map(|&e| AtomicU64::new(e)).collect(),
            bad: bits,
            dirty: Mutex::new((false, 0)),
            io: Mutex::new(0),
        }
    }
    /// The raw entry at `i`.
    pub fn get(&self, i: usize) -> u64 {
        self.entries[i].load(Ordering::Acquire)
    }
    /// Whether entry `i` failed validation.
    pub fn is_bad(&self, i: usize) -> bool {
        self.bad[i / 64] & (1 << (i % 64)) != 0
    }
    /// Whether any entry failed validation.
    pub fn has_bad(&self) -> bool {
        self.bad.iter().any(|&w| w != 0)
    }
    /// Little-endian bytes of entries `range`.
    pub fn encode(&self, range: std::ops::Range<usize>) -> Vec<u8> {
        let mut out = Vec::with_capacity(range.len() * 8);
        crate::format::table::encode_entries(range.map(|i| self.get(i)), &mut out);
        out
    }
    /// Sets entries `first..first + values.len()` in memory and marks the piece dirty;
    /// [`Chunk::take_dirty`] later hands it to the write-back.
    pub fn stage(&self, first: usize, values: &[u64]) {
        let mut dirty = self.dirty.lock().unwrap_or_else(PoisonError::into_inner);
        for (i, &v) in values.iter().enumerate() {
            self.entries[first + i].store(v, Ordering::Release);
        }
        dirty.0 = true;
    }

    /// The whole piece encoded now (so the snapshot is consistent), with the snapshot's number
    /// (increasing), if anything changed since the last call, `None` otherwise. The whole 4 KiB is written, not just the changed
    /// 512-byte sectors: it is aligned for O_DIRECT (a sector would need a read-modify-write
    /// that stalls every other write of the file), costs a page-cache write no more, and
    /// unchanged sectors are written with the bytes they already hold.
    pub fn take_dirty(&self) -> Option<(u64, Vec<u8>)> {
        let mut dirty = self.dirty.lock().unwrap_or_else(PoisonError::into_inner);
        if !std::mem::take(&mut dirty.0) {
            return None;
        }
        dirty.1 += 1;
        Some((dirty.1, self.encode(0..CHUNK_ENTRIES as usize)))
    }
}

struct Slot {
    chunk: OnceLock<Arc<Chunk>>,
    loading: Mutex<()>,
    referenced: AtomicBool,
}

#[derive(Default)]
struct Shard {
    map: HashMap<ChunkKey, Arc<Slot>>,
    clock: VecDeque<ChunkKey>,
}

/// The cache.
pub struct L2Cache {
    shards: Vec<Mutex<Shard>>,
    per_shard: usize,
}

impl L2Cache {
    /// A cache of about `bytes` of chunks (at least a few per shard).
    pub fn new(bytes: usize) -> L2Cache {
        let chunks = (bytes as u64 / CHUNK_BYTES).max(SHARDS as u64 * 4) as usize;
        L2Cache {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            per_shard: chunks.div_ceil(SHARDS),
        }
    }

    fn shard(&self, key: ChunkKey) -> MutexGuard<'_, Shard> {
        let h = (key.0 >> 12).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ key.1.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
        let i = (h >> 32) as usize % SHARDS;
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Returns the chunk for `key`, loading it with `load` if it is not cached. Concurrent callers
    /// for the same key share one load.
    pub fn get<E>(
        &self,
        key: ChunkKey,
        load: impl FnOnce() -> Result<Chunk, E>,
    ) -> Result<Arc<Chunk>, E> {
        let slot = {
            let mut sh = self.shard(key);
            if let Some(s) = sh.map.get(&key) {
                s.referenced.store(true, Ordering::Relaxed);
                s.clone()
            } else {
                if sh.map.len() >= self.per_shard {
                    Self::evict(&mut sh, self.per_shard);
                }
                let s = Arc::new(Slot {
                    chunk: OnceLock::new(),
                    loading: Mutex::new(()),
                    referenced: AtomicBool::new(false),
                });
                sh.map.insert(key, s.clone());
                sh.clock.push_back(key);
                s
            }
        };
        if let Some(c) = slot.chunk.get() {
            return Ok(c.clone());
        }
        let _g = slot.loading.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = slot.chunk.get() {
            return Ok(c.clone());
        }
        match load() {
            Ok(c) => {
                let c = Arc::new(c);
                let _ = slot.chunk.set(c.clone());
                Ok(c)
            }
            Err(e) => {
                drop(_g);
                // Forget the empty slot so a later call retries the load.
                let mut sh = self.shard(key);
                if sh
                    .map
                    .get(&key)
                    .is_some_and(|s| Arc::ptr_eq(s, &slot) && s.chunk.get().is_none())
                {
                    sh.map.remove(&key);
                }
                Err(e)
            }
        }
    }

    /// The chunk for `key` if it is cached and loaded; never loads.
    pub fn get_cached(&self, key: ChunkKey) -> Option<Arc<Chunk>> {
        let sh = self.shard(key);
        let s = sh.map.get(&key)?;
        let c = s.chunk.get()?.clone();
        s.referenced.store(true, Ordering::Relaxed);
        Some(c)
    }

    /// Inserts a chunk for a table this session created (its content is known without a read).
    pub fn insert_new(&self, key: ChunkKey, chunk: Chunk) -> Arc<Chunk> {
        self.get::<std::convert::Infallible>(key, || Ok(chunk))
            .unwrap_or_else(|e| match e {})
    }

    /// Second-chance eviction of one unused chunk; chunks in use or with bad entries stay.
    fn evict(sh: &mut Shard, limit: usize) {
        let mut budget = sh.clock.len() * 2;
        while sh.map.len() >= limit && budget > 0 {
            budget -= 1;
            let Some(key) = sh.clock.pop_front() else {
                return;
            };
            let Some(slot) = sh.map.get(&key) else {
                continue;
            };
            let in_use = Arc::strong_count(slot) > 1
                || slot
                    .chunk
                    .get()
                    .is_some_and(|c| Arc::strong_count(c) > 1 || c.has_bad());
            let unloaded = slot.chunk.get().is_none();
            if in_use || unloaded || slot.referenced.swap(false, Ordering::Relaxed) {
                sh.clock.push_back(key);
                continue;
            }
            sh.map.remove(&key);
        }
    }

    /// Drops every cached chunk (after a repair rewrote tables behind the cache).
    pub fn clear(&self) {
        for s in &self.shards {
            let mut sh = s.lock().unwrap_or_else(PoisonError::into_inner);
            sh.map.clear();
            sh.clock.clear();
        }
    }

    /// Number of cached chunks.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).map.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_keeps_chunks_in_use() {
        let cache = L2Cache::new(0); // minimum: 4 per shard
        let held = cache
            .get::<()>((4096, 0), || Ok(Chunk::new(&[7; 512], &[])))
            .unwrap();
        for i in 1..1000u64 {
            cache
                .get::<()>((4096 * (i + 1), 0), || Ok(Chunk::new(&[0; 512], &[])))
                .unwrap();
        }
        assert!(
            cache.len() <= SHARDS * 4 + 1,
            "cache grew to {}",
            cache.len()
        );
        // The chunk we hold was never evicted, so a second get returns the same one.
        let again = cache
            .get::<()>((4096, 0), || panic!("reloaded a chunk in use"))
            .unwrap();
        assert!(Arc::ptr_eq(&held, &again));
        assert_eq!(again.get(3), 7);
    }

    #[test]
    fn failed_load_is_retried() {
        let cache = L2Cache::new(1 << 20);
        assert!(cache.get((0, 0), || Err("io")).is_err());
        assert!(cache
            .get::<()>((0, 0), || Ok(Chunk::new(&[1; 512], &[5])))
            .unwrap()
            .is_bad(5));
    }
}
