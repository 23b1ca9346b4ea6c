//! Tensor-parallel sharding plan (Megatron style), the same for every backend: which rows or columns of each weight a
//! rank loads. Q/K/V are column-parallel by heads (each rank gets `n_heads / tp` query heads and the KV heads they
//! use), gate/up column-parallel by FFN rows, o_proj and down row-parallel (one all-reduce after each), the lm_head
//! vocab-parallel (logits gathered), embedding and norms replicated.
//!
//! GQA: when `tp` divides the KV heads they are split; when `tp` is a multiple of them each KV head is replicated on
//! the `tp / n_kv` ranks whose query heads use it. Row-parallel splits must fall on quantization-block boundaries of
//! the weights' storage type (32 for Q4_1/Q8_0, 256 for K-quants, 1 for float checkpoints).

use std::ops::Range;

use crate::config::LlamaConfig;
use crate::model::LlamaTensor;

/// Why a tensor-parallel size does not work for a model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tensor parallel size {tp} does not work for this model: {why} (sizes that work: {valid:?})")]
pub struct ShardError {
    pub tp: usize,
    pub why: String,
    pub valid: Vec<usize>,
}

/// What rank `rank` of `tp` holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSpec {
    pub tp: usize,
    pub rank: usize,
    /// Query heads of this rank (global indices, consecutive).
    pub q_heads: Range<usize>,
    /// KV heads this rank holds (global indices); replicated ones appear on several ranks.
    pub kv_heads: Range<usize>,
    /// FFN rows of gate/up and input columns of down.
    pub ffn: Range<usize>,
    /// Vocabulary rows of the lm_head.
    pub vocab: Range<usize>,
}

impl ShardSpec {
    /// The plan for every rank, or why `tp` is impossible. `block` is the quantization block of the weights (the
    /// row-parallel splits must be multiples of it).
    pub fn plan(c: &LlamaConfig, tp: usize, block: usize) -> Result<Vec<ShardSpec>, ShardError> {
        if let Some(why) = Self::reject(c, tp, block) {
            let valid = (1..=c.num_heads).filter(|&t| Self::reject(c, t, block).is_none()).collect();
            return Err(ShardError { tp, why, valid });
        }
        let (nh, nkv, ffn, vocab) = (c.num_heads, c.num_kv_heads, c.intermediate_size, c.vocab_size);
        let per_vocab = vocab.div_ceil(tp);
        Ok((0..tp)
            .map(|rank| {
                let q = rank * nh / tp..(rank + 1) * nh / tp;
                let kv = if tp <= nkv {
                    rank * nkv / tp..(rank + 1) * nkv / tp
                } else {
                    let kvh = rank / (tp / nkv);
                    kvh..kvh + 1
                };
                ShardSpec {
                    tp,
                    rank,
                    q_heads: q,
                    kv_heads: kv,
                    ffn: rank * ffn / tp..(rank + 1) * ffn / tp,
                    vocab: (rank * per_vocab).min(vocab)..((rank + 1) * per_vocab).min(vocab),
                }
            })
            .collect())
    }

    fn reject(c: &LlamaConfig, tp: usize, block: usize) -> Option<String> {
        let (nh, nkv, hd, ffn) = (c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size);
        let block = block.max(1);
        if tp == 0 {
            return Some("it must be at least 1".into());
        }
        if !nh.is_multiple_of(tp) {
            return Some(format!("{nh} query heads do not split into {tp}"));
        }
        if tp <= nkv && !nkv.is_multiple_of(tp) {
            return Some(format!("{nkv} KV heads do not split into {tp}"));
        }
        if tp > nkv && !tp.is_multiple_of(nkv) {
            return Some(format!("{tp} is neither a divisor nor a multiple of the {nkv} KV heads"));
        }
        if !ffn.is_multiple_of(tp) || !(ffn / tp).is_multiple_of(block) {
            return Some(format!("the FFN width {ffn} does not split into {tp} parts of whole {block}-element blocks"));
        }
        if !(nh / tp * hd).is_multiple_of(block) {
            return Some(format!("o_proj's {} input columns per rank are not whole {block}-element blocks", nh / tp * hd));
        }
        None
    }

    /// This rank's rows of the full Q weight.
    pub fn q_rows(&self, head_dim: usize) -> Range<usize> {
        self.q_heads.start * head_dim..self.q_heads.end * head_dim
    }

    /// This rank's rows of the full K (and V) weight.
    pub fn kv_rows(&self, head_dim: usize) -> Range<usize> {
        self.kv_heads.start * head_dim..self.kv_heads.end * head_dim
    }

    /// The (rows, columns) of `role`'s full `[rows, cols]` matrix this rank holds: its query/KV heads' rows of Q/K/V
    /// and their input columns of o_proj, its FFN rows of gate/up and columns of down, its vocabulary rows of the
    /// lm_head (`LmHead` also names the tied embedding sliced as the lm_head); everything else whole.
    pub fn part(&self, role: LlamaTensor, rows: usize, cols: usize, head_dim: usize) -> (Range<usize>, Range<usize>) {
        match role {
            LlamaTensor::Wq(_) => (self.q_rows(head_dim), 0..cols),
            LlamaTensor::Wk(_) | LlamaTensor::Wv(_) => (self.kv_rows(head_dim), 0..cols),
            LlamaTensor::Wo(_) => (0..rows, self.q_rows(head_dim)),
            LlamaTensor::Gate(_) | LlamaTensor::Up(_) => (self.ffn.clone(), 0..cols),
            LlamaTensor::Down(_) => (0..rows, self.ffn.clone()),
            LlamaTensor::LmHead => (self.vocab.clone(), 0..cols),
            _ => (0..rows, 0..cols),
        }
    }

    /// The model as this rank sees it: its own head and FFN counts (vocabulary and hidden size unchanged).
    pub fn local_config(&self, c: &LlamaConfig) -> LlamaConfig {
        LlamaConfig { num_heads: self.q_heads.len(), num_kv_heads: self.kv_heads.len(), intermediate_size: self.ffn.len(), ..c.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RopeStyle;

    fn cfg(nh: usize, nkv: usize, hd: usize, ffn: usize, vocab: usize) -> LlamaConfig {
        LlamaConfig {
            hidden_size: nh * hd,
            intermediate_size: ffn,
            num_layers: 2,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            vocab_size: vocab,
            max_position_embeddings: 128,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: None,
            rope_style: RopeStyle::Half,
            tie_word_embeddings: true,
            bos_token_id: None,
            eos_token_ids: vec![],
        }
    }

    #[test]
    fn smollm2_sizes() {
        // SmolLM2-135M: 9 query / 3 KV heads, head_dim 64, FFN 1536, Q4_1 blocks of 32.
        let c = cfg(9, 3, 64, 1536, 49152);
        let e = ShardSpec::plan(&c, 2, 32).unwrap_err();
        // 9 would split the heads, but not the FFN (1536 / 9 is not whole).
        assert_eq!(e.valid, vec![1, 3]);
        assert!(e.to_string().contains("9 query heads do not split into 2"), "{e}");
        let p = ShardSpec::plan(&c, 3, 32).unwrap();
        assert_eq!(p[1].q_heads, 3..6);
        assert_eq!(p[1].kv_heads, 1..2);
        assert_eq!(p[2].ffn, 1024..1536);
        assert_eq!(p[2].vocab, 32768..49152);
        // TP=9 (with an FFN that splits): one query head per rank, each KV head replicated on the 3 ranks of its
        // group.
        let c = cfg(9, 3, 64, 9 * 192, 49152);
        let p = ShardSpec::plan(&c, 9, 32).unwrap();
        let kv: Vec<usize> = p.iter().map(|s| s.kv_heads.start).collect();
        assert_eq!(kv, vec![0, 0, 0, 1, 1, 1, 2, 2, 2]);
        assert_eq!(p[4].local_config(&c).num_heads, 1);
    }

    #[test]
    fn parts_cover_each_matrix_once_across_ranks() {
        let c = cfg(8, 4, 32, 512, 1000);
        let (h, hd) = (c.hidden_size, c.head_dim);
        for tp in [1, 2, 4] {
            let p = ShardSpec::plan(&c, tp, 1).unwrap();
            // Column-parallel roles split rows, row-parallel ones columns; the pieces tile the matrix.
            for (role, rows, cols, by_rows) in [
                (LlamaTensor::Wq(0), 8 * hd, h, true),
                (LlamaTensor::Gate(0), 512, h, true),
                (LlamaTensor::LmHead, 1000, h, true),
                (LlamaTensor::Wo(0), h, 8 * hd, false),
                (LlamaTensor::Down(0), h, 512, false),
            ] {
                let mut next = 0;
                for s in &p {
                    let (r, k) = s.part(role, rows, cols, hd);
                    let (split, whole, n) = if by_rows { (r, k, cols) } else { (k, r, rows) };
                    assert_eq!(whole, 0..n, "{role:?}");
                    assert_eq!(split.start, next, "{role:?} tp {tp}");
                    next = split.end;
                }
                assert_eq!(next, if by_rows { rows } else { cols }, "{role:?} tp {tp}");
            }
            assert_eq!(p[0].part(LlamaTensor::TokenEmbedding, 1000, h, hd), (0..1000, 0..h));
        }
    }

    #[test]
    fn replication_split_and_blocks() {
        let c = cfg(8, 4, 32, 512, 1000);
        let p = ShardSpec::plan(&c, 2, 1).unwrap();
        assert_eq!((p[0].kv_heads.clone(), p[1].kv_heads.clone()), (0..2, 2..4));
        let p = ShardSpec::plan(&c, 8, 1).unwrap();
        assert_eq!(p[7].kv_heads, 3..4);
        assert_eq!(p[6].kv_heads, 3..4);
        // Uneven vocabulary: the last rank takes the remainder.
        let p = ShardSpec::plan(&c, 4, 1).unwrap();
        assert_eq!(p.iter().map(|s| s.vocab.len()).sum::<usize>(), 1000);
        // 512 / 4 = 128 FFN rows per rank are not whole 256-element K-quant blocks.
        let e = ShardSpec::plan(&c, 4, 256).unwrap_err();
        assert!(e.why.contains("FFN"), "{e}");
        assert_eq!(ShardSpec::plan(&c, 0, 1).unwrap_err().tp, 0);
    }
}
