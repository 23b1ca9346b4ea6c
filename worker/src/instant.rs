//! A backend that computes nothing: every step returns, for each sequence that wants logits, a row whose argmax is
//! `(last token + 1) % vocab`. It exists to measure what the engine, gRPC and router add on top of the model
//! (`ferrite serve --backend instant`, BENCHMARKS.md); it never serves real traffic.

use ferrite_common::config::LlamaConfig;

use crate::backend::{Backend, BackendError, BackendInfo, ForwardBatch, Logits, LogitsWanted, validate_batch};

/// See the module docs.
pub struct InstantBackend {
    config: LlamaConfig,
    num_blocks: usize,
    block_size: usize,
}

impl InstantBackend {
    pub fn new(config: LlamaConfig, num_blocks: usize, block_size: usize) -> Self {
        Self { config, num_blocks, block_size }
    }
}

impl Backend for InstantBackend {
    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn info(&self) -> BackendInfo {
        BackendInfo { name: "instant", num_kv_blocks: self.num_blocks, block_size: self.block_size }
    }

    fn forward(&mut self, batch: &ForwardBatch<'_>) -> Result<Logits, BackendError> {
        validate_batch(batch, &self.config, self.block_size, self.num_blocks)?;
        let vocab = self.config.vocab_size;
        let mut data = Vec::new();
        let mut ranges = Vec::with_capacity(batch.seqs.len());
        for s in &batch.seqs {
            let start = data.len() / vocab;
            let rows: Vec<u32> = match s.logits {
                LogitsWanted::None => Vec::new(),
                LogitsWanted::Last => s.tokens.last().copied().into_iter().collect(),
                LogitsWanted::All => s.tokens.to_vec(),
            };
            for t in rows {
                let mut row = vec![0f32; vocab];
                row[(t as usize + 1) % vocab] = 1.0;
                data.extend(row);
            }
            ranges.push(start..data.len() / vocab);
        }
        Ok(Logits { vocab, data, ranges })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::SeqInput;

    #[test]
    fn next_token_is_last_plus_one() {
        let cfg = LlamaConfig {
            hidden_size: 8,
            intermediate_size: 8,
            num_layers: 1,
            num_heads: 1,
            num_kv_heads: 1,
            head_dim: 8,
            vocab_size: 10,
            max_position_embeddings: 64,
            rms_norm_eps: 1e-5,
            rope_theta: 1e4,
            rope_scaling: None,
            rope_style: ferrite_common::config::RopeStyle::Half,
            tie_word_embeddings: true,
            bos_token_id: None,
            eos_token_ids: vec![],
        };
        let mut b = InstantBackend::new(cfg, 4, 16);
        let batch = ForwardBatch { seqs: vec![SeqInput { tokens: &[3, 9], start_pos: 0, block_table: &[1], logits: LogitsWanted::All }] };
        let l = b.forward(&batch).unwrap();
        assert_eq!(ferrite_kernels::cpu::ops::argmax(&l.seq(0)[..10]), 4);
        assert_eq!(ferrite_kernels::cpu::ops::argmax(&l.seq(0)[10..]), 0);
    }
}
