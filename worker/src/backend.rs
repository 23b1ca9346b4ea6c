//! The narrow seam between the model runner and the hardware: [`Backend::forward`] runs one batched step of the
//! Llama model over paged KV storage. The CPU backend ([`crate::cpu::CpuBackend`]) and the CUDA backend
//! (`crate::cuda::CudaBackend`, feature `cuda`) implement it.

use std::ops::Range;

use ferrite_common::config::LlamaConfig;
pub use ferrite_kernels::cpu::sample::{Adjust, SampleParams, uniform as sample_uniform};

/// Default tokens per KV block (vLLM's default; the router's prefix hashes use the same size).
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// Which logits a sequence wants back from a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsWanted {
    /// None (a prefill chunk that does not end the prompt).
    None,
    /// The last position only (decode, or the last prefill chunk).
    Last,
    /// Every position of the step (tests, prompt logprobs).
    All,
}

/// One sequence's part of a step.
#[derive(Debug, Clone)]
pub struct SeqInput<'a> {
    /// New tokens to run through the model.
    pub tokens: &'a [u32],
    /// How many tokens of this sequence are already in the KV cache; `tokens[i]` has position `start_pos + i`.
    pub start_pos: usize,
    /// Physical KV block ids covering positions `0 .. start_pos + tokens.len()`.
    pub block_table: &'a [u32],
    pub logits: LogitsWanted,
}

/// A batched step: any number of sequences, each with any number of new tokens.
#[derive(Debug, Clone, Default)]
pub struct ForwardBatch<'a> {
    pub seqs: Vec<SeqInput<'a>>,
}

/// Logits of a step, row-major `[rows, vocab]`; `ranges[i]` are the rows of sequence `i`.
#[derive(Debug, Clone, Default)]
pub struct Logits {
    pub vocab: usize,
    pub data: Vec<f32>,
    pub ranges: Vec<Range<usize>>,
}

impl Logits {
    /// The logit rows of sequence `i` (empty when it asked for none).
    pub fn seq(&self, i: usize) -> &[f32] {
        let r = &self.ranges[i];
        &self.data[r.start * self.vocab..r.end * self.vocab]
    }

    /// The last logit row of sequence `i`, if it asked for any.
    pub fn last(&self, i: usize) -> Option<&[f32]> {
        let r = &self.ranges[i];
        (r.end > r.start).then(|| &self.data[(r.end - 1) * self.vocab..r.end * self.vocab])
    }
}

/// How to draw one sequence's next token where its logits are (`ferrite_kernels::cpu::sample` is the algorithm;
/// the engine's sampler prepares it, consuming one draw).
#[derive(Debug, Clone, PartialEq)]
pub struct RowSampling {
    pub params: ferrite_kernels::cpu::sample::SampleParams,
    /// The repetition penalty of the `repeat` adjustments.
    pub repetition: f32,
    /// One entry per adjusted token id (bias, penalties, min-token masks).
    pub adjust: Vec<ferrite_kernels::cpu::sample::Adjust>,
    /// The uniform of this draw.
    pub u: f64,
    /// A grammar's token mask (`ferrite_kernels::cpu::sample::apply_mask`: bit `i % 32` of word `i / 32` set = id
    /// `i` allowed), applied after the adjustments; `None` for a free row.
    pub mask: Option<Vec<u32>>,
}

impl RowSampling {
    /// Draws this row's token from `logits` on the host (modifies them): the twin of the device sampler.
    pub fn sample_host(&self, logits: &mut [f32], scratch: &mut ferrite_kernels::cpu::sample::SampleScratch) -> u32 {
        ferrite_kernels::cpu::sample::apply_adjustments(logits, &self.adjust, self.repetition);
        if let Some(mask) = &self.mask {
            ferrite_kernels::cpu::sample::apply_mask(logits, mask);
        }
        ferrite_kernels::cpu::sample::sample_row(logits, &self.params, self.u, scratch)
    }
}

/// Why a step could not run. Nothing is written to the KV cache when a step is rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackendError {
    #[error("sequence {seq}: token id {id} is out of range (vocab size {vocab})")]
    InvalidToken { seq: usize, id: u32, vocab: usize },
    #[error("sequence {seq}: position {pos} exceeds the model's maximum context {max}")]
    ContextOverflow { seq: usize, pos: usize, max: usize },
    #[error("sequence {seq}: block table has {have} blocks, {need} needed for {tokens} tokens")]
    BlockTableTooShort { seq: usize, have: usize, need: usize, tokens: usize },
    #[error("sequence {seq}: block id {block} is out of range ({num_blocks} blocks)")]
    InvalidBlock { seq: usize, block: u32, num_blocks: usize },
    #[error("sequence {seq} has no tokens")]
    EmptySequence { seq: usize },
    /// A tensor-parallel collective failed (a rank timed out or the group was aborted): the step is lost on every rank.
    #[error("tensor-parallel collective failed: {0}")]
    Collective(String),
    /// The device failed (a CUDA error): the step's output is lost and its KV writes are unspecified.
    #[error("device error: {0}")]
    Device(String),
}

impl BackendError {
    /// Whether the backend is unusable after this error (a failed device or tensor-parallel group): the engine stops
    /// and the worker exits non-zero so it is restarted. Validation errors only fail their step.
    pub fn is_fatal(&self) -> bool {
        matches!(self, Self::Collective(_) | Self::Device(_))
    }
}

/// Facts about a backend the engine needs once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendInfo {
    pub name: &'static str,
    pub num_kv_blocks: usize,
    pub block_size: usize,
}

/// Runs the model. Implementations must be batch invariant: a sequence's logits are bitwise identical whatever else
/// is in the batch.
pub trait Backend: Send {
    fn config(&self) -> &LlamaConfig;
    fn info(&self) -> BackendInfo;
    /// Runs one step: writes the new tokens' K/V into the cache at their block-table slots, returns the logits asked
    /// for.
    fn forward(&mut self, batch: &ForwardBatch<'_>) -> Result<Logits, BackendError>;

    /// Whether `forward_sample` draws where the logits are (a GPU), so only ids cross to the host. Then a step with
    /// constrained rows sends their grammar masks with the rows (`RowSampling::mask`); otherwise the engine takes
    /// `forward` and computes the masks on a helper thread while it runs (the host draws anyway).
    fn draws_on_device(&self) -> bool {
        false
    }

    /// Runs a step and returns the greedy token (argmax, lowest id on ties, NaN never wins) of each sequence that
    /// asked for logits, in batch order. Equal to `forward` + argmax; backends that can take the argmax where the
    /// logits are (the GPU) override it so only token ids come back.
    fn forward_greedy(&mut self, batch: &ForwardBatch<'_>) -> Result<Vec<u32>, BackendError> {
        let l = self.forward(batch)?;
        Ok((0..batch.seqs.len()).filter_map(|i| l.last(i).map(ferrite_kernels::cpu::ops::argmax)).collect())
    }

    /// Runs a step and draws the next token of each sequence that asked for logits, in batch order, with `rows[j]`
    /// for the `j`-th of them. Equal to `forward` + [`RowSampling::sample_host`]; the GPU overrides it to sample on
    /// the device so only token ids come back.
    fn forward_sample(&mut self, batch: &ForwardBatch<'_>, rows: &[RowSampling]) -> Result<Vec<u32>, BackendError> {
        forward_then_sample(self, batch, rows)
    }
}

/// `Backend::forward_sample` on the host: `forward`, then [`RowSampling::sample_host`] on each last logit row.
pub fn forward_then_sample<B: Backend + ?Sized>(
    b: &mut B,
    batch: &ForwardBatch<'_>,
    rows: &[RowSampling],
) -> Result<Vec<u32>, BackendError> {
    let l = b.forward(batch)?;
    let mut scratch = ferrite_kernels::cpu::sample::SampleScratch::default();
    let mut row = Vec::new();
    let mut out = Vec::with_capacity(rows.len());
    for (logits, r) in (0..batch.seqs.len()).filter_map(|i| l.last(i)).zip(rows) {
        row.clear();
        row.extend_from_slice(logits);
        out.push(r.sample_host(&mut row, &mut scratch));
    }
    Ok(out)
}

/// Validates a batch against the model and KV geometry (shared by backends, so errors are identical).
pub fn validate_batch(batch: &ForwardBatch<'_>, config: &LlamaConfig, block_size: usize, num_blocks: usize) -> Result<(), BackendError> {
    for (seq, s) in batch.seqs.iter().enumerate() {
        if s.tokens.is_empty() {
            return Err(BackendError::EmptySequence { seq });
        }
        if let Some(&id) = s.tokens.iter().find(|&&t| t as usize >= config.vocab_size) {
            return Err(BackendError::InvalidToken { seq, id, vocab: config.vocab_size });
        }
        let end = s.start_pos + s.tokens.len();
        if end > config.max_position_embeddings {
            return Err(BackendError::ContextOverflow { seq, pos: end - 1, max: config.max_position_embeddings });
        }
        let need = end.div_ceil(block_size);
        if s.block_table.len() < need {
            return Err(BackendError::BlockTableTooShort { seq, have: s.block_table.len(), need, tokens: end });
        }
        if let Some(&block) = s.block_table[..need].iter().find(|&&b| b as usize >= num_blocks) {
            return Err(BackendError::InvalidBlock { seq, block, num_blocks });
        }
    }
    Ok(())
}
