//! The router's KV index: which worker slot holds which prefix-cache block hash, built from the workers' `KvEvents`
//! streams.
//!
//! Block hashes are chained (`ferrite_common::hash`: a hash names its whole prefix), so the index is a flat
//! `hash → worker slots` map, sharded by hash so the event pumps never block routing behind one lock, plus a
//! per-worker hash set so a worker can be purged (on `Cleared`, a resync, or a lost stream).

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError, RwLock};

const SHARDS: usize = 16;

/// `hash → worker slots` (a handful at most: a small vector beats a set).
type Shard = HashMap<u64, Vec<usize>>;

#[derive(Debug)]
pub struct KvIndex {
    shards: Vec<RwLock<Shard>>,
    /// Per worker slot: the hashes it holds. Each worker's set is only changed by its own event pump; the lock
    /// orders that against purges from elsewhere.
    held: Vec<Mutex<HashSet<u64>>>,
}

impl KvIndex {
    pub fn new(workers: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            held: (0..workers).map(|_| Mutex::new(HashSet::new())).collect(),
        }
    }

    fn shard(&self, h: u64) -> &RwLock<Shard> {
        // The hashes are xxh3 outputs: their low bits are already uniform.
        &self.shards[(h as usize) % SHARDS]
    }

    /// `worker` now holds `hashes`.
    pub fn store(&self, worker: usize, hashes: &[u64]) {
        let mut held = self.held[worker].lock().unwrap_or_else(PoisonError::into_inner);
        for &h in hashes {
            if held.insert(h) {
                let mut shard = self.shard(h).write().unwrap_or_else(PoisonError::into_inner);
                shard.entry(h).or_default().push(worker);
            }
        }
    }

    /// `worker` evicted `hashes` (ones it never reported are ignored).
    pub fn remove(&self, worker: usize, hashes: &[u64]) {
        let mut held = self.held[worker].lock().unwrap_or_else(PoisonError::into_inner);
        for &h in hashes {
            if held.remove(&h) {
                self.unlink(worker, h);
            }
        }
    }

    /// Forgets everything `worker` holds.
    pub fn purge(&self, worker: usize) {
        let mut held = self.held[worker].lock().unwrap_or_else(PoisonError::into_inner);
        for h in held.drain() {
            self.unlink(worker, h);
        }
    }

    fn unlink(&self, worker: usize, h: u64) {
        let mut shard = self.shard(h).write().unwrap_or_else(PoisonError::into_inner);
        if let Some(ws) = shard.get_mut(&h) {
            ws.retain(|&w| w != worker);
            if ws.is_empty() {
                shard.remove(&h);
            }
        }
    }

    /// How many hashes each worker slot holds.
    pub fn blocks_per_worker(&self) -> Vec<usize> {
        self.held.iter().map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len()).collect()
    }

    /// True when no worker holds anything.
    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(|s| s.read().unwrap_or_else(PoisonError::into_inner).is_empty())
    }

    /// Per worker slot, how many leading blocks of the chain `hashes` it holds: start from the holders of `h[0]`
    /// and walk forward; a worker that lacks `h[i]` drops out with `i`, the survivors score `hashes.len()`.
    pub fn overlap(&self, hashes: &[u64]) -> Vec<usize> {
        let mut scores = vec![0; self.held.len()];
        let Some((&first, rest)) = hashes.split_first() else { return scores };
        let mut active = self.holders(first);
        for (i, &h) in rest.iter().enumerate() {
            if active.is_empty() {
                break;
            }
            for &w in &active {
                scores[w] = i + 1;
            }
            let next = self.holders(h);
            active.retain(|w| next.contains(w));
        }
        for &w in &active {
            scores[w] = hashes.len();
        }
        scores
    }

    fn holders(&self, h: u64) -> Vec<usize> {
        self.shard(h).read().unwrap_or_else(PoisonError::into_inner).get(&h).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_counts_leading_blocks_until_the_chain_breaks() {
        let ix = KvIndex::new(3);
        ix.store(0, &[1, 2, 3, 4]);
        ix.store(1, &[1, 2]);
        ix.store(2, &[2, 3, 4]); // the chain's tail without its head: matches nothing
        assert_eq!(ix.overlap(&[1, 2, 3, 4, 5]), vec![4, 2, 0]);
        assert_eq!(ix.overlap(&[1, 2]), vec![2, 2, 0]);
        assert_eq!(ix.overlap(&[9, 2, 3]), vec![0, 0, 0]);
        assert_eq!(ix.overlap(&[]), vec![0, 0, 0]);
        // A hole in the middle ends the match there, even if later blocks are held.
        ix.remove(0, &[2]);
        assert_eq!(ix.overlap(&[1, 2, 3, 4]), vec![1, 2, 0]);
    }

    #[test]
    fn purge_and_remove_forget_only_that_worker() {
        let ix = KvIndex::new(2);
        ix.store(0, &[1, 2, 3]);
        ix.store(1, &[1, 2, 3]);
        ix.store(1, &[1]); // a duplicate store is idempotent
        assert_eq!(ix.blocks_per_worker(), vec![3, 3]);
        ix.purge(0);
        assert_eq!(ix.blocks_per_worker(), vec![0, 3]);
        assert_eq!(ix.overlap(&[1, 2, 3]), vec![0, 3]);
        ix.remove(1, &[3, 42]); // 42 was never held: ignored
        assert_eq!(ix.overlap(&[1, 2, 3]), vec![0, 2]);
        assert!(!ix.is_empty());
        ix.purge(1);
        assert!(ix.is_empty(), "purging the last holder drops the map entries");
        assert_eq!(ix.overlap(&[1]), vec![0, 0]);
    }
}
