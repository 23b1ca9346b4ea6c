//! Single-request generation: prefill the prompt, then decode one token per step until a stop token or the token
//! limit. Used by `ferrite generate`, the benchmarks and the reference tests. (The serving engine with continuous
//! batching builds on the same [`Backend`] and [`BlockAllocator`] seams.)

use ferrite_common::sampling::{SamplingParams, StoppingParams};

use crate::backend::{Backend, BackendError, ForwardBatch, LogitsWanted, SeqInput};
pub use crate::engine::sampler::argmax;
use crate::engine::sampler::Sampler;
use crate::kv::{BlockAllocator, KvError, SeqId};

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token was produced (it is included in the output).
    Stop,
    /// `max_tokens` reached.
    Length,
}

/// Sampling and stopping parameters.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub max_tokens: usize,
    /// 0 = greedy.
    pub temperature: f32,
    pub seed: u64,
    pub stop_token_ids: Vec<u32>,
    /// Tokens per prefill step (the whole prompt when 0).
    pub prefill_chunk: usize,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self { max_tokens: 64, temperature: 0.0, seed: 0, stop_token_ids: Vec::new(), prefill_chunk: 0 }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GenerateError {
    #[error("prompt is empty")]
    EmptyPrompt,
    #[error("temperature must be a finite number >= 0, got {0}")]
    BadTemperature(f32),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Kv(#[from] KvError),
}

/// Generated tokens and why generation ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
}

/// Generates up to `params.max_tokens` tokens after `prompt`, calling `on_token` as each is produced.
/// The sequence's KV blocks are freed before returning, on success or error.
pub fn generate(
    backend: &mut dyn Backend,
    alloc: &mut dyn BlockAllocator,
    seq: SeqId,
    prompt: &[u32],
    params: &GenerateParams,
    mut on_token: impl FnMut(u32),
) -> Result<Generation, GenerateError> {
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    if !(params.temperature >= 0.0 && params.temperature.is_finite()) {
        return Err(GenerateError::BadTemperature(params.temperature));
    }
    let result = run(backend, alloc, seq, prompt, params, &mut on_token);
    alloc.free(seq);
    result
}

fn run(
    backend: &mut dyn Backend,
    alloc: &mut dyn BlockAllocator,
    seq: SeqId,
    prompt: &[u32],
    params: &GenerateParams,
    on_token: &mut dyn FnMut(u32),
) -> Result<Generation, GenerateError> {
    let sampling = SamplingParams { temperature: params.temperature, seed: Some(params.seed), ..SamplingParams::default() };
    let mut sampler = Sampler::new(sampling, &StoppingParams::default(), &[], prompt, params.seed, 0);
    let mut sample = |logits: &[f32], generated: usize| {
        let (tok, _) = sampler.sample(&mut logits.to_vec(), generated);
        sampler.record(tok);
        tok
    };
    let mut tokens: Vec<u32> = Vec::new();
    let chunk = if params.prefill_chunk == 0 { prompt.len() } else { params.prefill_chunk };
    // Prefill.
    let mut done = 0;
    let mut next = None;
    while done < prompt.len() {
        let end = (done + chunk).min(prompt.len());
        let table = alloc.ensure(seq, end)?.to_vec();
        let last = end == prompt.len();
        let batch = ForwardBatch {
            seqs: vec![SeqInput {
                tokens: &prompt[done..end],
                start_pos: done,
                block_table: &table,
                logits: if last { LogitsWanted::Last } else { LogitsWanted::None },
            }],
        };
        let logits = backend.forward(&batch)?;
        if last {
            next = logits.last(0).map(|l| sample(l, 0));
        }
        done = end;
    }
    let mut pos = prompt.len();
    while let Some(tok) = next {
        if tokens.len() >= params.max_tokens {
            return Ok(Generation { tokens, finish: FinishReason::Length });
        }
        tokens.push(tok);
        on_token(tok);
        if params.stop_token_ids.contains(&tok) {
            return Ok(Generation { tokens, finish: FinishReason::Stop });
        }
        if tokens.len() >= params.max_tokens {
            return Ok(Generation { tokens, finish: FinishReason::Length });
        }
        let table = alloc.ensure(seq, pos + 1)?.to_vec();
        let batch = ForwardBatch {
            seqs: vec![SeqInput { tokens: std::slice::from_ref(&tok), start_pos: pos, block_table: &table, logits: LogitsWanted::Last }],
        };
        let logits = backend.forward(&batch)?;
        next = logits.last(0).map(|l| sample(l, tokens.len()));
        pos += 1;
    }
    Ok(Generation { tokens, finish: FinishReason::Length })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_ties_and_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, 0.1]), 1);
    }
}
