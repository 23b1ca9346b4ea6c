//! The prefix-cache block hash, shared by router and worker (they must agree bit for bit).
//!
//! A prompt is cut into full blocks of `block_size` tokens. Block `i` hashes to
//! `h_i = xxh3_64_with_seed(seed, "ferrite.block" ‖ h_{i-1} (LE u64) ‖ tokens (LE u32))`, where `seed` is derived from
//! the model fingerprint and `h_{-1}` from the per-tenant cache salt. Chaining makes a block's hash name its whole
//! prefix, so the router's index can be a flat `hash → workers` map. xxh3 is not collision resistant on purpose-built
//! input; the worker compares stored tokens on every hit, so a collision costs a cache miss, never wrong KV
//! (vLLM GHSA-rm76-4mrf-v9r8 is the attack this closes).
//!
//! Bump [`HASH_VERSION`] whenever any byte that goes into a hash changes; workers report it in `Info` and routers
//! refuse mismatches.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Version of the hashing scheme below.
pub const HASH_VERSION: u32 = 1;

const SEED_TAG: &[u8] = b"ferrite.kv.seed.v1\0";
const SALT_TAG: &[u8] = b"ferrite.salt\0";
const BLOCK_TAG: &[u8] = b"ferrite.block\0";

/// Computes chained block hashes for one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockHasher {
    seed: u64,
    block_size: usize,
}

impl BlockHasher {
    /// `model_fingerprint` identifies the weights (see `ModelFiles::fingerprint`); `block_size` tokens per block.
    pub fn new(model_fingerprint: &[u8], block_size: usize) -> Self {
        let mut buf = Vec::with_capacity(SEED_TAG.len() + model_fingerprint.len());
        buf.extend_from_slice(SEED_TAG);
        buf.extend_from_slice(model_fingerprint);
        Self { seed: xxh3_64(&buf), block_size }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The parent hash of a sequence's first block: depends on the (possibly empty) cache salt.
    pub fn root(&self, cache_salt: &[u8]) -> u64 {
        let mut buf = Vec::with_capacity(SALT_TAG.len() + cache_salt.len());
        buf.extend_from_slice(SALT_TAG);
        buf.extend_from_slice(cache_salt);
        xxh3_64_with_seed(&buf, self.seed)
    }

    /// Hash of one full block given its parent's hash.
    pub fn block(&self, parent: u64, tokens: &[u32]) -> u64 {
        debug_assert_eq!(tokens.len(), self.block_size);
        let mut buf = Vec::with_capacity(BLOCK_TAG.len() + 8 + 4 * tokens.len());
        buf.extend_from_slice(BLOCK_TAG);
        buf.extend_from_slice(&parent.to_le_bytes());
        for t in tokens {
            buf.extend_from_slice(&t.to_le_bytes());
        }
        xxh3_64_with_seed(&buf, self.seed)
    }

    /// Hashes of every full block of `tokens` (a trailing partial block has none).
    pub fn prefix_hashes(&self, cache_salt: &[u8], tokens: &[u32]) -> Vec<u64> {
        let mut parent = self.root(cache_salt);
        tokens
            .chunks_exact(self.block_size)
            .map(|b| {
                parent = self.block(parent, b);
                parent
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known-answer vectors: if these change, HASH_VERSION must change too (routers and workers compare it).
    #[test]
    fn known_answers() {
        let h = BlockHasher::new(b"model-fingerprint", 4);
        let tokens: Vec<u32> = (0..10).collect();
        let got = h.prefix_hashes(b"", &tokens);
        assert_eq!(got.len(), 2);
        assert_eq!(got, KAT, "hash scheme changed: bump HASH_VERSION and update the vectors");
        assert_eq!(h.block(h.root(b""), &tokens[..4]), got[0]);
        assert_eq!(h.block(got[0], &tokens[4..8]), got[1]);
    }

    /// Computed independently with Python's `xxhash` (`xxh3_64_intdigest`) from the byte layout in the module doc.
    const KAT: [u64; 2] = [0xe929_a043_1476_9207, 0xde46_6154_9ec6_337f];

    #[test]
    fn chaining_salt_and_model_separate_hashes() {
        let h = BlockHasher::new(b"m", 2);
        let a = h.prefix_hashes(b"", &[1, 2, 3, 4]);
        let b = h.prefix_hashes(b"", &[9, 9, 3, 4]);
        assert_ne!(a[1], b[1], "same block after different prefixes must differ");
        assert_ne!(h.prefix_hashes(b"tenant", &[1, 2]), a[..1]);
        assert_ne!(BlockHasher::new(b"other", 2).prefix_hashes(b"", &[1, 2]), a[..1]);
        assert_eq!(h.prefix_hashes(b"", &[1, 2, 3]), a[..1], "partial blocks are not hashed");
    }
}
