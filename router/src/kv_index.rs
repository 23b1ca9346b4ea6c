//! The router's KV index: which worker holds which prefix-cache block hash, built from the workers' `KvEvents`
//! streams. Workers are named by their stable id ([`WorkerId`], never reused), not by a position, so the set of
//! workers can change while the index is in use.
//!
//! Block hashes are chained (`ferrite_common::hash`: a hash names its whole prefix), so the index is a flat
//! `hash → workers` map, sharded by hash so the event pumps never block routing behind one lock, plus a
//! per-worker hash set so a worker can be purged (on `Cleared`, a resync, or a lost stream) or removed.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError, RwLock};

const SHARDS: usize = 16;

/// A worker's id in the pool: stable while it is a member, never reused after.
pub type WorkerId = usize;

/// `hash → workers` (a handful at most: a small vector beats a set).
type Shard = HashMap<u64, Vec<WorkerId>>;

#[derive(Debug)]
pub struct KvIndex {
    shards: Vec<RwLock<Shard>>,
    /// Per member: the hashes it holds. Each worker's set is only changed by its own event pump; its lock orders
    /// that against purges from elsewhere. The map's lock is read-held for every change, so [`KvIndex::remove_worker`]
    /// (write) never races a store that would re-link a removed worker's hashes.
    held: RwLock<HashMap<WorkerId, Mutex<HashSet<u64>>>>,
}

impl Default for KvIndex {
    fn default() -> Self {
        Self::new()
    }
}

impl KvIndex {
    pub fn new() -> Self {
        Self { shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(), held: RwLock::new(HashMap::new()) }
    }

    /// Makes `worker` known (idempotent); changes for unknown workers are ignored.
    pub fn add_worker(&self, worker: WorkerId) {
        self.held.write().unwrap_or_else(PoisonError::into_inner).entry(worker).or_default();
    }

    /// Forgets `worker` and everything it holds; later changes for it are ignored.
    pub fn remove_worker(&self, worker: WorkerId) {
        let mut held = self.held.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(set) = held.remove(&worker) {
            for h in set.into_inner().unwrap_or_else(PoisonError::into_inner) {
                self.unlink(worker, h);
            }
        }
    }

    /// Runs `f` on `worker`'s hash set (if the worker is known) with the map read-locked.
    fn with_held(&self, worker: WorkerId, f: impl FnOnce(&mut HashSet<u64>)) {
        let held = self.held.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(set) = held.get(&worker) {
            f(&mut set.lock().unwrap_or_else(PoisonError::into_inner));
        }
    }

    fn shard(&self, h: u64) -> &RwLock<Shard> {
        // The hashes are xxh3 outputs: their low bits are already uniform.
        &self.shards[(h as usize) % SHARDS]
    }

    /// `worker` now holds `hashes`; returns the ones it did not hold before.
    pub fn store(&self, worker: WorkerId, hashes: &[u64]) -> Vec<u64> {
        let mut new = Vec::new();
        self.with_held(worker, |held| {
            for &h in hashes {
                if held.insert(h) {
                    let mut shard = self.shard(h).write().unwrap_or_else(PoisonError::into_inner);
                    shard.entry(h).or_default().push(worker);
                    new.push(h);
                }
            }
        });
        new
    }

    /// `worker` evicted `hashes` (ones it never reported are ignored).
    pub fn remove(&self, worker: WorkerId, hashes: &[u64]) {
        self.with_held(worker, |held| {
            for &h in hashes {
                if held.remove(&h) {
                    self.unlink(worker, h);
                }
            }
        });
    }

    /// Forgets everything `worker` holds (it stays known).
    pub fn purge(&self, worker: WorkerId) {
        self.with_held(worker, |held| {
            for h in held.drain() {
                self.unlink(worker, h);
            }
        });
    }

    fn unlink(&self, worker: WorkerId, h: u64) {
        let mut shard = self.shard(h).write().unwrap_or_else(PoisonError::into_inner);
        if let Some(ws) = shard.get_mut(&h) {
            ws.retain(|&w| w != worker);
            if ws.is_empty() {
                shard.remove(&h);
            }
        }
    }

    /// Whether `worker` holds `h`.
    #[cfg(test)]
    pub fn holds(&self, worker: WorkerId, h: u64) -> bool {
        let held = self.held.read().unwrap_or_else(PoisonError::into_inner);
        held.get(&worker).is_some_and(|s| s.lock().unwrap_or_else(PoisonError::into_inner).contains(&h))
    }

    /// How many hashes `worker` holds (0 if unknown).
    pub fn blocks_of(&self, worker: WorkerId) -> usize {
        let held = self.held.read().unwrap_or_else(PoisonError::into_inner);
        held.get(&worker).map_or(0, |s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
    }

    /// How many hashes all workers hold together (a hash held by two counts twice).
    pub fn total_blocks(&self) -> usize {
        let held = self.held.read().unwrap_or_else(PoisonError::into_inner);
        held.values().map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len()).sum()
    }

    /// True when no worker holds anything.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(|s| s.read().unwrap_or_else(PoisonError::into_inner).is_empty())
    }

    /// Per worker holding at least the first block, how many leading blocks of the chain `hashes` it holds (absent:
    /// 0): start from the holders of `h[0]` and walk forward; a worker that lacks `h[i]` drops out with `i`, the
    /// survivors score `hashes.len()`.
    pub fn overlap(&self, hashes: &[u64]) -> HashMap<WorkerId, usize> {
        let mut scores = HashMap::new();
        let Some((&first, rest)) = hashes.split_first() else { return scores };
        let mut active = self.holders(first);
        for (i, &h) in rest.iter().enumerate() {
            if active.is_empty() {
                break;
            }
            for &w in &active {
                scores.insert(w, i + 1);
            }
            let next = self.holders(h);
            active.retain(|w| next.contains(w));
        }
        for &w in &active {
            scores.insert(w, hashes.len());
        }
        scores
    }

    fn holders(&self, h: u64) -> Vec<WorkerId> {
        self.shard(h).read().unwrap_or_else(PoisonError::into_inner).get(&h).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The overlap of `hashes` for workers 0..n, as a vector.
    fn overlap(ix: &KvIndex, hashes: &[u64], n: usize) -> Vec<usize> {
        let m = ix.overlap(hashes);
        (0..n).map(|w| m.get(&w).copied().unwrap_or(0)).collect()
    }

    fn index(n: usize) -> KvIndex {
        let ix = KvIndex::new();
        (0..n).for_each(|w| ix.add_worker(w));
        ix
    }

    fn blocks(ix: &KvIndex, n: usize) -> Vec<usize> {
        (0..n).map(|w| ix.blocks_of(w)).collect()
    }

    #[test]
    fn overlap_counts_leading_blocks_until_the_chain_breaks() {
        let ix = index(3);
        ix.store(0, &[1, 2, 3, 4]);
        ix.store(1, &[1, 2]);
        ix.store(2, &[2, 3, 4]); // the chain's tail without its head: matches nothing
        assert_eq!(overlap(&ix, &[1, 2, 3, 4, 5], 3), vec![4, 2, 0]);
        assert_eq!(overlap(&ix, &[1, 2], 3), vec![2, 2, 0]);
        assert_eq!(overlap(&ix, &[9, 2, 3], 3), vec![0, 0, 0]);
        assert_eq!(overlap(&ix, &[], 3), vec![0, 0, 0]);
        // A hole in the middle ends the match there, even if later blocks are held.
        ix.remove(0, &[2]);
        assert_eq!(overlap(&ix, &[1, 2, 3, 4], 3), vec![1, 2, 0]);
    }

    #[test]
    fn purge_and_remove_forget_only_that_worker() {
        let ix = index(2);
        ix.store(0, &[1, 2, 3]);
        ix.store(1, &[1, 2, 3]);
        ix.store(1, &[1]); // a duplicate store is idempotent
        assert_eq!(blocks(&ix, 2), vec![3, 3]);
        ix.purge(0);
        assert_eq!(blocks(&ix, 2), vec![0, 3]);
        assert_eq!(overlap(&ix, &[1, 2, 3], 2), vec![0, 3]);
        ix.remove(1, &[3, 42]); // 42 was never held: ignored
        assert_eq!(overlap(&ix, &[1, 2, 3], 2), vec![0, 2]);
        assert!(!ix.is_empty());
        ix.purge(1);
        assert!(ix.is_empty(), "purging the last holder drops the map entries");
        assert_eq!(overlap(&ix, &[1], 2), vec![0, 0]);
    }

    #[test]
    fn a_removed_worker_leaves_nothing_and_later_events_for_it_are_ignored() {
        let ix = index(2);
        ix.store(0, &[1, 2]);
        ix.store(1, &[1]);
        ix.remove_worker(0);
        assert_eq!(overlap(&ix, &[1, 2], 2), vec![0, 1]);
        // A pump that was still running applies a late batch: nothing comes back.
        ix.store(0, &[1, 2, 3]);
        assert_eq!((ix.blocks_of(0), ix.total_blocks()), (0, 1));
        ix.remove_worker(1);
        assert!(ix.is_empty());
    }
}
