//! The CPU backend: the Llama forward pass on GGUF-quantized (or f32) weights with paged f32 KV storage.
//!
//! Pipeline per step (all sequences' new tokens stacked into one `[T, hidden]` activation matrix):
//! embed → L × [RMSNorm → fused QKV → RoPE → write K,V at block-table slots → causal attention over the paged cache
//! → o_proj + residual → RMSNorm → fused gate/up → SiLU·up → down + residual] → final norm → lm_head for the rows
//! that want logits. Model reference: Touvron et al. 2023 (Llama); transformers `modeling_llama.py`.

mod matmul;
pub mod weights;

pub use ferrite_kernels::cpu::isa::{CpuIsa, IsaError, IsaLevel};

use std::sync::Arc;

use ferrite_common::config::{LlamaConfig, RopeStyle};
use ferrite_common::error::ModelError;
use ferrite_common::model::ModelFiles;
use ferrite_kernels::cpu::attention::{AttnShape, KvElem, KvLayout, PagedKv, SeqRows, paged_attention};
use ferrite_kernels::cpu::ops::{RopePairing, rms_norm, rope, silu_mul};
use rayon::prelude::*;

use crate::backend::{Backend, BackendError, BackendInfo, ForwardBatch, Logits, LogitsWanted, validate_batch};
use crate::tp::comm::Communicator;
use ferrite_common::shard::ShardSpec;
use weights::{LlamaWeights, WeightPrecision};

/// CPU backend options.
#[derive(Debug, Clone)]
pub struct CpuOptions {
    pub precision: WeightPrecision,
    /// Worker threads for matmuls and attention (0 = one per core).
    pub threads: usize,
    /// KV blocks to allocate.
    pub num_kv_blocks: usize,
    pub block_size: usize,
    /// The instruction set every kernel runs at (the host's best, or the `FERRITE_CPU_ISA` cap).
    pub isa: CpuIsa,
    /// The KV cache's element type.
    pub kv_dtype: KvDtype,
}

impl Default for CpuOptions {
    fn default() -> Self {
        Self {
            precision: WeightPrecision::Native,
            threads: 0,
            num_kv_blocks: 256,
            block_size: crate::backend::DEFAULT_BLOCK_SIZE,
            isa: CpuIsa::host(),
            kv_dtype: KvDtype::F32,
        }
    }
}

/// The KV cache's element type on the CPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KvDtype {
    /// Exact: what the forward pass computed.
    #[default]
    F32,
    /// Half the memory and bandwidth: keys and values rounded to f16 when stored (every sum stays f32).
    F16,
}

impl KvDtype {
    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }
}

/// K and V of every layer, in the cache's element type.
enum KvData {
    F32 { k: Vec<f32>, v: Vec<f32> },
    F16 { k: Vec<half::f16>, v: Vec<half::f16> },
}

/// Paged KV storage: per layer `num_blocks · block_size` token slots of `n_kv_heads · head_dim` elements for K and
/// for V, laid out as the attention kernel reads them ([`KvLayout`]: V by slot, K transposed within each block).
struct KvStore {
    data: KvData,
    layout: KvLayout,
    /// Elements per layer.
    layer_stride: usize,
    num_blocks: usize,
}

impl KvStore {
    fn new(c: &LlamaConfig, num_blocks: usize, block_size: usize, dtype: KvDtype) -> Self {
        let slot_stride = c.num_kv_heads * c.head_dim;
        let layer_stride = num_blocks * block_size * slot_stride;
        let total = layer_stride * c.num_layers;
        let data = match dtype {
            KvDtype::F32 => KvData::F32 { k: vec![0.0; total], v: vec![0.0; total] },
            KvDtype::F16 => KvData::F16 { k: vec![half::f16::ZERO; total], v: vec![half::f16::ZERO; total] },
        };
        Self { data, layout: KvLayout { block_size, slot_stride }, layer_stride, num_blocks }
    }
}

/// Writes the step's K and V (row `r` of `qkv`, after its `q_width` query floats, into token slot `slots[r]`) into
/// one layer's cache, then runs the layer's attention over it.
#[allow(clippy::too_many_arguments)]
fn store_and_attend<T: KvElem>(
    isa: CpuIsa,
    layout: KvLayout,
    k: &mut [T],
    v: &mut [T],
    slots: &[usize],
    q_width: usize,
    seqs: &[SeqRows<'_>],
    qkv: &[f32],
    shape: &AttnShape,
    out: &mut [f32],
) {
    let kv_width = layout.slot_stride;
    for (row, &slot) in qkv.chunks_exact(q_width + 2 * kv_width).zip(slots) {
        layout.store(k, v, slot, &row[q_width..q_width + kv_width], &row[q_width + kv_width..]);
    }
    let kv = PagedKv { k, v, block_size: layout.block_size, slot_stride: layout.slot_stride };
    paged_attention(isa, &kv, seqs, qkv, shape, out);
}

/// Scratch buffers reused across steps.
#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    h: Vec<f32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gate_up: Vec<f32>,
    act: Vec<f32>,
}

/// A tensor-parallel rank's view of its group.
struct TpRank {
    comm: Arc<dyn Communicator>,
    /// Every rank's lm_head vocabulary rows, in rank order.
    vocab: Vec<std::ops::Range<usize>>,
    /// The whole model's config (what the engine sees); `CpuBackend::config` is this rank's share.
    full: LlamaConfig,
}

/// The Llama model on CPU (the whole model, or one tensor-parallel rank's shard of it).
pub struct CpuBackend {
    /// The model as this backend computes it: with tensor parallelism, the rank's own heads and FFN rows.
    config: LlamaConfig,
    tp: Option<TpRank>,
    weights: LlamaWeights,
    inv_freq: Vec<f32>,
    pairing: RopePairing,
    kv: KvStore,
    pool: Arc<rayon::ThreadPool>,
    isa: CpuIsa,
    scratch: Scratch,
}

impl CpuBackend {
    /// Loads weights from `model` (GGUF or HF directory) and allocates the KV store.
    pub fn load(model: &ModelFiles, opts: &CpuOptions) -> Result<Self, ModelError> {
        Self::load_rank(model, opts, None)
    }

    /// Loads tensor-parallel rank `shard.rank` of `plan` (its weights only; a KV store for its KV heads only); its
    /// steps all-reduce after o_proj and down and all-gather the logits through `comm`.
    pub fn load_shard(model: &ModelFiles, opts: &CpuOptions, plan: &[ShardSpec], comm: Arc<dyn Communicator>) -> Result<Self, ModelError> {
        let shard = &plan[comm.rank()];
        let tp = TpRank { comm, vocab: plan.iter().map(|s| s.vocab.clone()).collect(), full: model.config.clone() };
        Self::load_rank(model, opts, Some((shard, tp)))
    }

    fn load_rank(model: &ModelFiles, opts: &CpuOptions, shard: Option<(&ShardSpec, TpRank)>) -> Result<Self, ModelError> {
        let (config, mut weights, tp) = match shard {
            None => (model.config.clone(), LlamaWeights::load(model, opts.precision)?, None),
            Some((s, tp)) => (s.local_config(&model.config), LlamaWeights::load_shard(model, opts.precision, Some(s))?, Some(tp)),
        };
        weights.pack_for(opts.isa);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(opts.threads)
            .thread_name(|i| format!("ferrite-cpu-{i}"))
            .build()
            .map_err(|e| ModelError::InvalidConfig { path: model.path.clone(), detail: format!("thread pool: {e}") })
            .map(Arc::new)?;
        let pairing = match config.rope_style {
            RopeStyle::Interleaved => RopePairing::Interleaved,
            RopeStyle::Half => RopePairing::Half,
        };
        tracing::info!(isa = %opts.isa, host_best = %CpuIsa::host(), threads = pool.current_num_threads(), "CPU backend: kernel instruction set");
        Ok(Self {
            isa: opts.isa,
            inv_freq: config.rope_inv_freq(),
            kv: KvStore::new(&config, opts.num_kv_blocks, opts.block_size, opts.kv_dtype),
            config,
            tp,
            weights,
            pairing,
            pool,
            scratch: Scratch::default(),
        })
    }

    /// Bytes of weights one decode step streams from memory (every matrix once; norms are negligible).
    pub fn weight_bytes(&self) -> usize {
        self.weights.matrix_bytes()
    }

    /// Sums a row-parallel layer's partial outputs over the tensor-parallel group (no-op without one).
    fn all_reduce(tp: &Option<TpRank>, buf: &mut [f32]) -> Result<(), BackendError> {
        match tp {
            Some(t) => t.comm.all_reduce_sum(buf).map_err(|e| BackendError::Collective(e.to_string())),
            None => Ok(()),
        }
    }

    fn forward_inner(&mut self, batch: &ForwardBatch<'_>) -> Result<Logits, BackendError> {
        let c = &self.config;
        let (hidden, hd) = (c.hidden_size, c.head_dim);
        let (nh, nkv) = (c.num_heads, c.num_kv_heads);
        let q_width = nh * hd;
        let kv_width = nkv * hd;
        let qkv_width = q_width + 2 * kv_width;
        let ffn = c.intermediate_size;

        // Token-level bookkeeping: (sequence, position) of each stacked row.
        let mut rows: Vec<(usize, usize)> = Vec::new();
        for (s, seq) in batch.seqs.iter().enumerate() {
            rows.extend((0..seq.tokens.len()).map(|i| (s, seq.start_pos + i)));
        }
        let t = rows.len();
        // The KV cache slot of each row (the same in every layer).
        let bs = self.kv.layout.block_size;
        let slots: Vec<usize> = rows.iter().map(|&(s, pos)| batch.seqs[s].block_table[pos / bs] as usize * bs + pos % bs).collect();
        let sc = &mut self.scratch;
        sc.x.resize(t * hidden, 0.0);
        for (row, tok) in sc.x.chunks_exact_mut(hidden).zip(batch.seqs.iter().flat_map(|s| s.tokens)) {
            self.weights.embedding.row_f32(*tok as usize, row);
        }
        sc.h.resize(t * hidden, 0.0);
        sc.attn.resize(t * q_width, 0.0);
        sc.act.resize(t * ffn, 0.0);
        let isa = self.isa;
        let shape = AttnShape { n_heads: nh, n_kv_heads: nkv, head_dim: hd, q_stride: qkv_width, scale: 1.0 / (hd as f32).sqrt() };
        let attn_seqs: Vec<SeqRows<'_>> = batch
            .seqs
            .iter()
            .scan(0, |first_row, seq| {
                let r = SeqRows { block_table: seq.block_table, start_pos: seq.start_pos, first_row: *first_row, len: seq.tokens.len() };
                *first_row += seq.tokens.len();
                Some(r)
            })
            .collect();

        for (l, lw) in self.weights.layers.iter().enumerate() {
            // Attention block.
            sc.h.par_chunks_mut(hidden).zip(sc.x.par_chunks(hidden)).for_each(|(h, x)| rms_norm(isa, x, &lw.attn_norm, c.rms_norm_eps, h));
            matmul::linear(isa, &lw.qkv, &sc.h, t, hidden, &mut sc.qkv);
            sc.qkv.par_chunks_mut(qkv_width).zip(&rows).for_each(|(row, &(_, pos))| {
                rope(&mut row[..q_width + kv_width], hd, pos, &self.inv_freq, self.pairing);
            });
            let layer = l * self.kv.layer_stride..(l + 1) * self.kv.layer_stride;
            let layout = self.kv.layout;
            // One call for either element type (`store_and_attend` is generic over it).
            macro_rules! attend {
                ($k:expr, $v:expr) => {
                    store_and_attend(
                        isa,
                        layout,
                        &mut $k[layer.clone()],
                        &mut $v[layer],
                        &slots,
                        q_width,
                        &attn_seqs,
                        &sc.qkv,
                        &shape,
                        &mut sc.attn,
                    )
                };
            }
            match &mut self.kv.data {
                KvData::F32 { k, v } => attend!(k, v),
                KvData::F16 { k, v } => attend!(k, v),
            }
            matmul::matmul(isa, &lw.wo, &sc.attn, t, &mut sc.proj);
            Self::all_reduce(&self.tp, &mut sc.proj[..t * hidden])?;
            sc.x.par_chunks_mut(hidden).zip(sc.proj.par_chunks(hidden)).for_each(|(x, p)| add_in_place(x, p));

            // MLP block.
            sc.h.par_chunks_mut(hidden).zip(sc.x.par_chunks(hidden)).for_each(|(h, x)| rms_norm(isa, x, &lw.ffn_norm, c.rms_norm_eps, h));
            matmul::linear(isa, &lw.gate_up, &sc.h, t, hidden, &mut sc.gate_up);
            sc.act.par_chunks_mut(ffn).zip(sc.gate_up.par_chunks(2 * ffn)).for_each(|(a, gu)| {
                let (g, u) = gu.split_at(ffn);
                silu_mul(isa, g, u, a);
            });
            matmul::matmul(isa, &lw.down, &sc.act, t, &mut sc.proj);
            Self::all_reduce(&self.tp, &mut sc.proj[..t * hidden])?;
            sc.x.par_chunks_mut(hidden).zip(sc.proj.par_chunks(hidden)).for_each(|(x, p)| add_in_place(x, p));
        }

        // Rows that want logits.
        let mut picked = Vec::new();
        let mut ranges = Vec::with_capacity(batch.seqs.len());
        let mut first_row = 0;
        for seq in &batch.seqs {
            let n = seq.tokens.len();
            let start = picked.len();
            match seq.logits {
                LogitsWanted::None => {}
                LogitsWanted::Last => picked.push(first_row + n - 1),
                LogitsWanted::All => picked.extend(first_row..first_row + n),
            }
            ranges.push(start..picked.len());
            first_row += n;
        }
        let mut normed = vec![0f32; picked.len() * hidden];
        for (h, &r) in normed.chunks_exact_mut(hidden).zip(&picked) {
            rms_norm(isa, &sc.x[r * hidden..(r + 1) * hidden], &self.weights.output_norm, c.rms_norm_eps, h);
        }
        let mut data = Vec::new();
        if !picked.is_empty() {
            matmul::matmul(isa, self.weights.lm_head(), &normed, picked.len(), &mut data);
        }
        if let Some(tp) = &self.tp {
            // Every rank computed its vocabulary slice of each row: gather, then interleave into full rows.
            let mut all = Vec::new();
            tp.comm.all_gather(&data, &mut all).map_err(|e| BackendError::Collective(e.to_string()))?;
            let rows = picked.len();
            let offsets: Vec<usize> = tp.vocab.iter().scan(0, |off, v| Some(std::mem::replace(off, *off + rows * v.len()))).collect();
            data = vec![0f32; rows * c.vocab_size];
            crate::tp::gather::interleave_vocab(&all, &offsets, &tp.vocab, rows, c.vocab_size, &mut data);
        }
        Ok(Logits { vocab: c.vocab_size, data, ranges })
    }
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

impl Backend for CpuBackend {
    fn config(&self) -> &LlamaConfig {
        self.tp.as_ref().map_or(&self.config, |t| &t.full)
    }

    fn info(&self) -> BackendInfo {
        BackendInfo { name: "cpu", num_kv_blocks: self.kv.num_blocks, block_size: self.kv.layout.block_size }
    }

    fn forward(&mut self, batch: &ForwardBatch<'_>) -> Result<Logits, BackendError> {
        validate_batch(batch, &self.config, self.kv.layout.block_size, self.kv.num_blocks)?;
        if batch.seqs.is_empty() {
            return Ok(Logits { vocab: self.config.vocab_size, data: Vec::new(), ranges: Vec::new() });
        }
        let pool = Arc::clone(&self.pool);
        pool.install(|| self.forward_inner(batch))
    }
}
