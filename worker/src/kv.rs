//! KV block allocation: which physical KV blocks a sequence owns.
//!
//! Backends store K/V in fixed-size blocks addressed by block tables ([`crate::backend::SeqInput::block_table`]).
//! [`BlockAllocator`] with [`SimpleBlockAllocator`] (a plain free list, no sharing) serves single-request generation,
//! benchmarks and backend tests. The serving engine manages blocks itself, with reference counts and prefix caching
//! (`crate::engine::block_pool` and `crate::engine::scheduler`).

use std::collections::HashMap;

pub use crate::backend::DEFAULT_BLOCK_SIZE;

/// A sequence id, unique among live sequences of one allocator.
pub type SeqId = u64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    #[error("out of KV blocks: {needed} more needed, {free} free")]
    OutOfBlocks { needed: usize, free: usize },
}

/// Hands out KV blocks to sequences.
pub trait BlockAllocator {
    fn block_size(&self) -> usize;
    /// Grows `seq`'s block table to hold `num_tokens` tokens (allocating what is missing) and returns it. On error
    /// nothing is allocated.
    fn ensure(&mut self, seq: SeqId, num_tokens: usize) -> Result<&[u32], KvError>;
    /// Returns all of `seq`'s blocks.
    fn free(&mut self, seq: SeqId);
    fn num_free(&self) -> usize;
}

/// A free list of blocks with no sharing. Blocks come out in ascending order.
#[derive(Debug, Clone)]
pub struct SimpleBlockAllocator {
    block_size: usize,
    free: Vec<u32>,
    tables: HashMap<SeqId, Vec<u32>>,
}

impl SimpleBlockAllocator {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self { block_size, free: (0..num_blocks as u32).rev().collect(), tables: HashMap::new() }
    }
}

impl BlockAllocator for SimpleBlockAllocator {
    fn block_size(&self) -> usize {
        self.block_size
    }

    fn ensure(&mut self, seq: SeqId, num_tokens: usize) -> Result<&[u32], KvError> {
        let table = self.tables.entry(seq).or_default();
        let need = num_tokens.div_ceil(self.block_size).saturating_sub(table.len());
        if need > self.free.len() {
            return Err(KvError::OutOfBlocks { needed: need, free: self.free.len() });
        }
        for _ in 0..need {
            table.extend(self.free.pop());
        }
        Ok(table)
    }

    fn free(&mut self, seq: SeqId) {
        if let Some(t) = self.tables.remove(&seq) {
            self.free.extend(t.into_iter().rev());
        }
    }

    fn num_free(&self) -> usize {
        self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_grows_and_frees() {
        let mut a = SimpleBlockAllocator::new(4, 16);
        assert_eq!(a.ensure(1, 17).unwrap(), &[0, 1]);
        assert_eq!(a.ensure(1, 32).unwrap(), &[0, 1]);
        assert_eq!(a.ensure(2, 1).unwrap(), &[2]);
        assert_eq!(a.ensure(1, 49), Err(KvError::OutOfBlocks { needed: 2, free: 1 }));
        assert_eq!(a.num_free(), 1, "a failed ensure allocates nothing");
        a.free(1);
        assert_eq!(a.num_free(), 3);
        assert_eq!(a.ensure(3, 48).unwrap().len(), 3);
        a.free(2);
        a.free(3);
        a.free(99);
        assert_eq!(a.num_free(), 4);
    }
}
