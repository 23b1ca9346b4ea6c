//! The KV block pool with automatic prefix caching (vLLM v1 `BlockPool` design).
//!
//! - Blocks have reference counts. A block whose count drops to 0 goes to the tail of an intrusive LRU free list
//!   (O(1) push, pop and unlink); if it was full it **keeps its hash and tokens** and stays findable.
//! - Allocation pops the LRU head; a cached block taken that way is evicted first (its hash leaves the index).
//! - A prefix-cache hit is a hash lookup **plus a comparison of the stored tokens**, so a hash collision is a miss,
//!   never another prompt's KV. A hit on a free block unlinks it from the free list.
//! - Newly full blocks are registered under their hash; a hash already in the index keeps its old block (no
//!   de-duplication, so block tables stay append-only, as in vLLM).
//! - Block 0 is reserved (health checks and padding) and never handed out.
//! - Every change to the index is recorded as a [`BlockEvent`] (a hash entered: `Stored`; a hash left on eviction:
//!   `Removed`) in a plain `Vec` that the engine core drains after each step ([`BlockPool::take_events`]) and the
//!   engine thread publishes (`crate::kv_events`). A re-registration of a hash already indexed records nothing.
//!
//! Invariant (checked by `BlockPool::check_invariants` in tests): `free_uncached + cached_free + in_use == total`.

use std::collections::HashMap;

/// A physical KV block id.
pub(crate) type BlockId = u32;

const NIL: u32 = u32::MAX;

#[derive(Debug, Clone)]
struct Block {
    ref_cnt: u32,
    /// Set once the block is full and registered.
    hash: Option<u64>,
    tokens: Vec<u32>,
    prev: u32,
    next: u32,
    in_free_list: bool,
}

/// A change to the prefix-cache index, for the router's KV index (`KvEvents`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockEvent {
    /// A full block became findable under this (chained) hash.
    Stored(u64),
    /// The hash left the index (its block was evicted for reuse).
    Removed(u64),
}

/// Counts for metrics and load reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolUsage {
    /// Usable blocks (the reserved block excluded).
    pub total: usize,
    pub in_use: usize,
    /// Free blocks that still hold a cached prefix.
    pub cached_free: usize,
    pub free_uncached: usize,
}

/// Returned by [`BlockPool::allocate`] when too few blocks are free.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("out of KV blocks: {needed} needed, {free} free")]
pub(crate) struct OutOfBlocks {
    pub(crate) needed: usize,
    pub(crate) free: usize,
}

/// The pool. Single-threaded: owned by the engine thread.
#[derive(Debug)]
pub(crate) struct BlockPool {
    block_size: usize,
    blocks: Vec<Block>,
    /// LRU free list: head is evicted first.
    head: u32,
    tail: u32,
    num_free: usize,
    index: HashMap<u64, BlockId>,
    /// Index changes not yet taken by [`BlockPool::take_events`].
    events: Vec<BlockEvent>,
    /// Prefix-cache lookups and hits, in blocks.
    pub(crate) queries: u64,
    pub(crate) hits: u64,
}

impl BlockPool {
    /// A pool of `num_blocks` blocks (block 0 reserved) of `block_size` tokens.
    pub(crate) fn new(num_blocks: usize, block_size: usize) -> Self {
        let blocks = (0..num_blocks)
            .map(|_| Block { ref_cnt: 0, hash: None, tokens: Vec::new(), prev: NIL, next: NIL, in_free_list: false })
            .collect();
        let mut pool =
            Self { block_size, blocks, head: NIL, tail: NIL, num_free: 0, index: HashMap::new(), events: Vec::new(), queries: 0, hits: 0 };
        for id in 1..num_blocks as u32 {
            pool.push_tail(id);
        }
        pool
    }

    pub(crate) fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks that can be allocated now (free, cached or not).
    #[cfg(test)]
    pub(crate) fn num_free(&self) -> usize {
        self.num_free
    }

    /// Usable blocks in total.
    pub(crate) fn capacity(&self) -> usize {
        self.blocks.len().saturating_sub(1)
    }

    fn push_tail(&mut self, id: BlockId) {
        let b = &mut self.blocks[id as usize];
        debug_assert!(!b.in_free_list);
        b.in_free_list = true;
        b.prev = self.tail;
        b.next = NIL;
        if self.tail == NIL {
            self.head = id;
        } else {
            self.blocks[self.tail as usize].next = id;
        }
        self.tail = id;
        self.num_free += 1;
    }

    fn unlink(&mut self, id: BlockId) {
        let (prev, next) = {
            let b = &mut self.blocks[id as usize];
            debug_assert!(b.in_free_list);
            b.in_free_list = false;
            (std::mem::replace(&mut b.prev, NIL), std::mem::replace(&mut b.next, NIL))
        };
        if prev == NIL {
            self.head = next;
        } else {
            self.blocks[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.blocks[next as usize].prev = prev;
        }
        self.num_free -= 1;
    }

    /// Takes `n` blocks from the LRU head (evicting cached ones). All or nothing.
    pub(crate) fn allocate(&mut self, n: usize) -> Result<Vec<BlockId>, OutOfBlocks> {
        if n > self.num_free {
            return Err(OutOfBlocks { needed: n, free: self.num_free });
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let id = self.head;
            self.unlink(id);
            self.evict(id);
            self.blocks[id as usize].ref_cnt = 1;
            out.push(id);
        }
        Ok(out)
    }

    fn evict(&mut self, id: BlockId) {
        let b = &mut self.blocks[id as usize];
        if let Some(h) = b.hash.take() {
            b.tokens.clear();
            if self.index.get(&h) == Some(&id) {
                self.index.remove(&h);
                self.events.push(BlockEvent::Removed(h));
            }
        }
    }

    /// Looks up a full block by hash and verifies its tokens. On a hit the block gains a reference.
    pub(crate) fn lookup_and_touch(&mut self, hash: u64, tokens: &[u32]) -> Option<BlockId> {
        self.queries += 1;
        let id = *self.index.get(&hash)?;
        if self.blocks[id as usize].tokens != tokens {
            return None; // hash collision: never serve another prompt's KV
        }
        self.hits += 1;
        if self.blocks[id as usize].in_free_list {
            self.unlink(id);
        }
        self.blocks[id as usize].ref_cnt += 1;
        Some(id)
    }

    /// Marks a block the caller owns as full with `tokens` under `hash`, making it findable.
    pub(crate) fn register(&mut self, id: BlockId, hash: u64, tokens: &[u32]) {
        debug_assert_eq!(tokens.len(), self.block_size);
        let b = &mut self.blocks[id as usize];
        if b.hash.is_some() {
            return; // already registered (a prefix-cache hit)
        }
        b.hash = Some(hash);
        b.tokens = tokens.to_vec();
        if let std::collections::hash_map::Entry::Vacant(e) = self.index.entry(hash) {
            e.insert(id);
            self.events.push(BlockEvent::Stored(hash));
        }
    }

    /// The index changes since the last call, in order.
    pub(crate) fn take_events(&mut self) -> Vec<BlockEvent> {
        std::mem::take(&mut self.events)
    }

    /// Every hash in the index now (what a consumer that applied every event holds), in no particular order.
    #[cfg(test)]
    pub(crate) fn cached_hashes(&self) -> Vec<u64> {
        self.index.keys().copied().collect()
    }

    /// Drops one reference to each block, in the given order: callers pass a sequence's blocks last-first so the
    /// tail of a prompt is evicted before its head.
    pub(crate) fn free(&mut self, ids: impl IntoIterator<Item = BlockId>) {
        for id in ids {
            let b = &mut self.blocks[id as usize];
            debug_assert!(b.ref_cnt > 0, "double free of block {id}");
            b.ref_cnt = b.ref_cnt.saturating_sub(1);
            if b.ref_cnt == 0 {
                if b.hash.is_none() {
                    b.tokens.clear();
                }
                self.push_tail(id);
            }
        }
    }

    pub(crate) fn usage(&self) -> PoolUsage {
        let mut u = PoolUsage { total: self.capacity(), ..Default::default() };
        for b in &self.blocks[1..] {
            if b.in_free_list {
                if b.hash.is_some() {
                    u.cached_free += 1;
                } else {
                    u.free_uncached += 1;
                }
            } else {
                u.in_use += 1;
            }
        }
        u
    }

    /// Asserts the pool's bookkeeping (tests).
    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        let u = self.usage();
        assert_eq!(u.free_uncached + u.cached_free + u.in_use, u.total);
        assert_eq!(u.free_uncached + u.cached_free, self.num_free);
        let mut n = 0;
        let mut id = self.head;
        while id != NIL {
            assert!(self.blocks[id as usize].in_free_list && self.blocks[id as usize].ref_cnt == 0);
            n += 1;
            id = self.blocks[id as usize].next;
        }
        assert_eq!(n, self.num_free, "free list length");
        for b in &self.blocks[1..] {
            assert_eq!(b.in_free_list, b.ref_cnt == 0, "a block is free iff unreferenced");
        }
        for (h, &id) in &self.index {
            assert_eq!(self.blocks[id as usize].hash, Some(*h), "index points at a block with that hash");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(x: u32) -> Vec<u32> {
        vec![x; 4]
    }

    #[test]
    fn allocate_free_and_reserved_block() {
        let mut p = BlockPool::new(5, 4);
        assert_eq!(p.capacity(), 4);
        let a = p.allocate(3).unwrap();
        assert!(!a.contains(&0), "block 0 is reserved");
        assert_eq!(p.allocate(2), Err(OutOfBlocks { needed: 2, free: 1 }));
        assert_eq!(p.num_free(), 1, "failed allocation takes nothing");
        p.free(a.into_iter().rev());
        assert_eq!(p.num_free(), 4);
        p.check_invariants();
    }

    #[test]
    fn cached_blocks_survive_free_and_are_evicted_lru_first() {
        let mut p = BlockPool::new(4, 4); // 3 usable
        let a = p.allocate(2).unwrap();
        p.register(a[0], 10, &toks(1));
        p.register(a[1], 11, &toks(2));
        // Free tail first (the order a sequence frees in): a[1] then a[0] → a[1] is evicted first.
        p.free(a.iter().rev().copied());
        assert_eq!(p.usage().cached_free, 2);
        p.check_invariants();
        // A hit revives a free cached block.
        assert_eq!(p.lookup_and_touch(10, &toks(1)), Some(a[0]));
        assert_eq!(p.usage().in_use, 1);
        // Allocating 2 takes the uncached block, then evicts a[1] (LRU head), not the touched a[0].
        let b = p.allocate(2).unwrap();
        assert!(b.contains(&a[1]) && !b.contains(&a[0]));
        assert_eq!(p.lookup_and_touch(11, &toks(2)), None, "evicted");
        assert_eq!((p.queries, p.hits), (2, 1));
        p.free([a[0]]);
        p.free(b);
        p.check_invariants();
        assert_eq!(p.usage().in_use, 0);
    }

    #[test]
    fn hits_verify_tokens_and_share_blocks() {
        let mut p = BlockPool::new(4, 4);
        let a = p.allocate(1).unwrap();
        p.register(a[0], 7, &toks(3));
        assert_eq!(p.lookup_and_touch(7, &toks(4)), None, "same hash, other tokens: a collision is a miss");
        assert_eq!(p.lookup_and_touch(7, &toks(3)), Some(a[0]));
        p.free([a[0]]);
        assert_eq!(p.usage().in_use, 1, "still referenced by the second user");
        p.free([a[0]]);
        assert_eq!(p.usage().cached_free, 1);
        // A second block with the same hash does not replace the indexed one.
        let b = p.allocate(1).unwrap();
        p.register(b[0], 7, &toks(3));
        assert_eq!(p.lookup_and_touch(7, &toks(3)), Some(a[0]));
        p.free([a[0], b[0]]);
        p.check_invariants();
    }

    #[test]
    fn index_changes_are_recorded_as_events() {
        use BlockEvent::{Removed, Stored};
        let mut p = BlockPool::new(3, 4); // 2 usable
        let a = p.allocate(2).unwrap();
        assert_eq!(p.take_events(), [], "allocating free, uncached blocks changes no index");
        p.register(a[0], 10, &toks(1));
        p.register(a[1], 11, &toks(2));
        assert_eq!(p.take_events(), [Stored(10), Stored(11)]);
        assert_eq!(p.take_events(), [], "taken once");
        p.register(a[0], 10, &toks(1));
        assert_eq!(p.take_events(), [], "the same block again: nothing");
        p.free([a[1], a[0]]);
        assert_eq!(p.take_events(), [], "freeing keeps cached blocks findable");
        // A hit, then a second block with a hash already indexed: the index keeps its block, nothing is recorded.
        assert_eq!(p.lookup_and_touch(10, &toks(1)), Some(a[0]));
        let b = p.allocate(1).unwrap(); // evicts a[1] (hash 11)
        assert_eq!(b, [a[1]]);
        assert_eq!(p.take_events(), [Removed(11)]);
        p.register(b[0], 10, &toks(1));
        assert_eq!(p.take_events(), [], "a hash already in the index is not stored again");
        // That duplicate leaves without a Removed (it was never indexed); the indexed block's eviction records one.
        p.free([b[0], a[0]]);
        let c = p.allocate(2).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(p.take_events(), [Removed(10)]);
        let mut cached = p.cached_hashes();
        cached.sort_unstable();
        assert_eq!(cached, Vec::<u64>::new());
        p.check_invariants();
    }

    #[test]
    fn random_workload_keeps_invariants() {
        let mut p = BlockPool::new(33, 4);
        let mut owned: Vec<Vec<BlockId>> = Vec::new();
        let mut mirror = std::collections::BTreeSet::new();
        let mut s = 1u64;
        for step in 0..2000u64 {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let r = (s >> 33) as usize;
            if r.is_multiple_of(3) && !owned.is_empty() {
                let v = owned.swap_remove(r % owned.len());
                p.free(v.into_iter().rev());
            } else if let Ok(mut v) = p.allocate(1 + r % 4) {
                for (i, &id) in v.iter().enumerate() {
                    let h = (step * 8 + i as u64) % 40;
                    if let Some(hit) = p.lookup_and_touch(h, &toks(h as u32)) {
                        owned.push(vec![hit]);
                    }
                    p.register(id, h, &toks(h as u32));
                }
                v.shrink_to_fit();
                owned.push(v);
            }
            for e in p.take_events() {
                match e {
                    BlockEvent::Stored(h) => assert!(mirror.insert(h), "stored twice without a removal: {h}"),
                    BlockEvent::Removed(h) => assert!(mirror.remove(&h), "removed without being stored: {h}"),
                }
            }
            if step % 100 == 0 {
                p.check_invariants();
                let mut cached = p.cached_hashes();
                cached.sort_unstable();
                assert_eq!(cached, mirror.iter().copied().collect::<Vec<_>>(), "the events replay to the index");
            }
        }
        for v in owned {
            p.free(v);
        }
        p.check_invariants();
        assert_eq!(p.usage().in_use, 0);
    }
}
