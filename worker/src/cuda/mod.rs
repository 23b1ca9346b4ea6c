//! The CUDA backend (feature `cuda`): the same Llama forward pass as [`crate::cpu`], with bf16 weights and a bf16
//! paged KV cache on one GPU, GEMMs through cuBLAS (bf16 in, f32 accumulate and out) and our own kernels
//! (`ferrite_kernels::cuda`) for everything else.
//!
//! Per step (all sequences' new tokens stacked into rows): embed → L × [add + RMSNorm → QKV GEMM → RoPE → K/V into
//! the paged cache at each row's slot → paged attention (decode and prefill rows alike, each row attending causally
//! over its own context) → o_proj GEMM → add + RMSNorm → gate/up GEMM → SiLU·up → down GEMM] → add + final norm on
//! the rows that want logits → lm_head GEMM. The residual stream stays f32; GEMM inputs are bf16.
//!
//! Steps larger than the activation buffers are run as consecutive sub-steps of at most `max_batch_tokens` rows
//! (exactly chunked prefill: a row's K/V is in the cache before any later row reads it), so no batch can exhaust
//! device memory. The KV cache takes what `gpu_memory_utilization` leaves after weights and activations.

pub mod weights;

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
use ferrite_common::config::{LlamaConfig, RopeStyle};
use ferrite_common::error::ModelError;
use ferrite_common::model::ModelFiles;
use ferrite_kernels::cuda::{ATTENTION_MAX_GROUP, ATTENTION_MAX_HEAD_DIM, AttentionShape, CudaError, CudaKernels, Gemm};

use crate::backend::{Backend, BackendError, BackendInfo, ForwardBatch, Logits, LogitsWanted, validate_batch};
use weights::DeviceWeights;

/// CUDA backend options.
#[derive(Debug, Clone)]
pub struct CudaOptions {
    /// CUDA device ordinal.
    pub device: usize,
    /// Fraction of the device's memory this process may use in total (weights, activations, KV cache).
    pub gpu_memory_utilization: f32,
    pub block_size: usize,
    /// Upper bound on KV blocks (None: as many as fit).
    pub max_kv_blocks: Option<usize>,
    /// Rows per sub-step (sizes the activation buffers).
    pub max_batch_tokens: usize,
}

impl Default for CudaOptions {
    fn default() -> Self {
        Self { device: 0, gpu_memory_utilization: 0.9, block_size: crate::kv::DEFAULT_BLOCK_SIZE, max_kv_blocks: None, max_batch_tokens: 2048 }
    }
}

impl CudaOptions {
    pub fn validate(&self) -> Result<(), CudaError> {
        let bad = |m: String| Err(CudaError::Unsupported(m));
        if !(self.gpu_memory_utilization > 0.0 && self.gpu_memory_utilization <= 1.0) {
            return bad(format!("gpu_memory_utilization must be in (0, 1], got {}", self.gpu_memory_utilization));
        }
        if self.block_size == 0 || self.max_batch_tokens == 0 {
            return bad("block_size and max_batch_tokens must be > 0".into());
        }
        Ok(())
    }
}

/// Keys per attention partition, at least (shorter partitions cost more in the reduce than they gain).
const MIN_PART_SIZE: usize = 128;
/// Floats of attention partition workspace (64 MiB).
const PART_CAP_FLOATS: usize = 16 << 20;
/// Logit rows computed per lm_head GEMM.
const LOGIT_ROWS_CAP: usize = 256;
/// Device memory kept free beyond our buffers (cuBLAS workspaces, module, graphs).
const HEADROOM_BYTES: usize = 768 << 20;

/// Activation buffers for up to `rows` rows.
struct Scratch {
    rows: usize,
    x: CudaSlice<f32>,
    h: CudaSlice<u16>,
    qkv: CudaSlice<f32>,
    attn: CudaSlice<u16>,
    proj: CudaSlice<f32>,
    gate_up: CudaSlice<f32>,
    act: CudaSlice<u16>,
    part_out: CudaSlice<f32>,
    part_ml: CudaSlice<f32>,
    logits: CudaSlice<f32>,
    ids: CudaSlice<i32>,
}

impl Scratch {
    fn new(c: &LlamaConfig, stream: &Arc<CudaStream>, rows: usize) -> Result<Self, CudaError> {
        let qkv_width = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim;
        let q_width = c.num_heads * c.head_dim;
        let logit_rows = rows.min(LOGIT_ROWS_CAP);
        // SAFETY (all allocations): every buffer is written by a kernel or GEMM before it is read in a step.
        unsafe {
            Ok(Self {
                rows,
                x: stream.alloc(rows * c.hidden_size)?,
                h: stream.alloc(rows * c.hidden_size)?,
                qkv: stream.alloc(rows * qkv_width)?,
                attn: stream.alloc(rows * q_width)?,
                proj: stream.alloc(rows * c.hidden_size)?,
                gate_up: stream.alloc(rows * 2 * c.intermediate_size)?,
                act: stream.alloc(rows * c.intermediate_size)?,
                part_out: stream.alloc(PART_CAP_FLOATS)?,
                part_ml: stream.alloc(PART_CAP_FLOATS / c.head_dim * 2)?,
                logits: stream.alloc(logit_rows * c.vocab_size)?,
                ids: stream.alloc(logit_rows)?,
            })
        }
    }
}

/// What to do with the logit rows of a step.
enum LogitsSink<'a> {
    Host(&'a mut Vec<f32>),
    Greedy(&'a mut Vec<u32>),
}

/// The Llama model on one GPU.
pub struct CudaBackend {
    config: LlamaConfig,
    stream: Arc<CudaStream>,
    kernels: CudaKernels,
    gemm: Gemm,
    weights: DeviceWeights,
    inv_freq: CudaSlice<f32>,
    k_cache: CudaSlice<u16>,
    v_cache: CudaSlice<u16>,
    num_blocks: usize,
    block_size: usize,
    scratch: Scratch,
    meta: CudaSlice<i32>,
    meta_host: Vec<i32>,
    num_sms: usize,
    device_name: String,
}

fn model_err(model: &ModelFiles, e: CudaError) -> ModelError {
    ModelError::InvalidConfig { path: model.path.clone(), detail: format!("CUDA: {e}") }
}

impl CudaBackend {
    /// Loads `model` (GGUF or HF directory) onto the device.
    pub fn load(model: &ModelFiles, opts: &CudaOptions) -> Result<Self, ModelError> {
        let (stream, kernels) = Self::open(&model.config, opts).map_err(|e| model_err(model, e))?;
        let weights = DeviceWeights::load(model, &stream)?;
        Self::finish(model.config.clone(), stream, kernels, weights, opts).map_err(|e| model_err(model, e))
    }

    /// A model of shape `config` with random weights generated on the device (benchmarks).
    pub fn random(config: &LlamaConfig, opts: &CudaOptions, seed: u64) -> Result<Self, CudaError> {
        let (stream, kernels) = Self::open(config, opts)?;
        let weights = DeviceWeights::random(config, &kernels, seed)?;
        Self::finish(config.clone(), stream, kernels, weights, opts)
    }

    fn open(c: &LlamaConfig, opts: &CudaOptions) -> Result<(Arc<CudaStream>, CudaKernels), CudaError> {
        opts.validate()?;
        let group = c.num_heads / c.num_kv_heads.max(1);
        if c.head_dim % 32 != 0 || c.head_dim > ATTENTION_MAX_HEAD_DIM || group > ATTENTION_MAX_GROUP {
            return Err(CudaError::Unsupported(format!(
                "head_dim {} / GQA group {group}: the CUDA attention kernel needs head_dim a multiple of 32 up to \
                 {ATTENTION_MAX_HEAD_DIM} and at most {ATTENTION_MAX_GROUP} query heads per KV head",
                c.head_dim
            )));
        }
        let ctx = CudaContext::new(opts.device)?;
        // SAFETY: the backend issues all work on one stream, so cudarc's per-buffer event tracking (meant for
        // multi-stream use) is not needed; turning it off keeps launches cheap and graph-capturable.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        let kernels = CudaKernels::load(Arc::clone(&stream))?;
        Ok((stream, kernels))
    }

    fn finish(config: LlamaConfig, stream: Arc<CudaStream>, kernels: CudaKernels, weights: DeviceWeights, opts: &CudaOptions) -> Result<Self, CudaError> {
        let ctx = Arc::clone(stream.context());
        let gemm = Gemm::new(Arc::clone(&stream))?;
        let scratch = Scratch::new(&config, &stream, opts.max_batch_tokens)?;
        let inv_freq = stream.clone_htod(&config.rope_inv_freq())?;
        stream.synchronize()?;

        let (free, total) = ctx.mem_get_info()?;
        let kv_width = config.num_kv_heads * config.head_dim;
        let block_bytes = 2 * config.num_layers * opts.block_size * kv_width * 2;
        let allowed = (opts.gpu_memory_utilization as f64 * total as f64) as usize;
        let used = total - free;
        let budget = allowed.saturating_sub(used).saturating_sub(HEADROOM_BYTES).min(free.saturating_sub(HEADROOM_BYTES));
        let mut num_blocks = budget / block_bytes;
        if let Some(cap) = opts.max_kv_blocks {
            num_blocks = num_blocks.min(cap);
        }
        if num_blocks < 2 {
            return Err(CudaError::Unsupported(format!(
                "no room for the KV cache: {} MiB free of {} MiB after loading, utilization {} allows {} MiB in total",
                free >> 20,
                total >> 20,
                opts.gpu_memory_utilization,
                allowed >> 20
            )));
        }
        let slots = num_blocks * opts.block_size;
        let k_cache = stream.alloc_zeros::<u16>(config.num_layers * slots * kv_width)?;
        let v_cache = stream.alloc_zeros::<u16>(config.num_layers * slots * kv_width)?;
        let meta = stream.alloc_zeros::<i32>(4096)?;
        stream.synchronize()?;
        let num_sms = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map(|n| n.max(1) as usize)
            .unwrap_or(100);
        let device_name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        tracing::info!(
            device = %device_name,
            arch = kernels.arch(),
            weights_mib = weights.matrix_bytes() >> 20,
            kv_blocks = num_blocks,
            kv_mib = (num_blocks * block_bytes) >> 20,
            "CUDA backend ready"
        );
        Ok(Self {
            config,
            stream,
            kernels,
            gemm,
            weights,
            inv_freq,
            k_cache,
            v_cache,
            num_blocks,
            block_size: opts.block_size,
            scratch,
            meta,
            meta_host: Vec::new(),
            num_sms,
            device_name,
        })
    }

    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    /// Bytes of weights one decode step streams.
    pub fn weight_bytes(&self) -> usize {
        self.weights.matrix_bytes()
    }

    pub fn kernels(&self) -> &CudaKernels {
        &self.kernels
    }

    /// Fills the whole KV cache with random values (benchmarks: attention never runs over zeros).
    pub fn randomize_kv(&mut self, seed: u64) -> Result<(), CudaError> {
        let n = self.k_cache.len();
        let (k, v) = (self.dptr_u16(&self.k_cache), self.dptr_u16(&self.v_cache));
        // SAFETY: both caches hold n bf16.
        unsafe {
            self.kernels.fill_random_bf16(k, n, seed, 1.0, 0.0)?;
            self.kernels.fill_random_bf16(v, n, seed ^ 0x5555, 1.0, 0.0)?;
        }
        self.kernels.check()
    }

    /// Runs a step and returns the greedy token of every logit row (argmax on the device: only the ids cross PCIe).
    pub fn forward_greedy(&mut self, batch: &ForwardBatch<'_>) -> Result<Vec<u32>, BackendError> {
        validate_batch(batch, &self.config, self.block_size, self.num_blocks)?;
        let mut ids = Vec::new();
        self.run(batch, LogitsSink::Greedy(&mut ids)).map_err(device_err)?;
        Ok(ids)
    }

    fn dptr_u16(&self, s: &CudaSlice<u16>) -> u64 {
        s.device_ptr(&self.stream).0
    }

    /// The forward pass; logit rows go to `sink` in batch order.
    fn run(&mut self, batch: &ForwardBatch<'_>, mut sink: LogitsSink<'_>) -> Result<(), CudaError> {
        // Row bookkeeping for the whole step: (sequence, position, token, wants logits).
        let mut rows: Vec<(usize, usize, u32, bool)> = Vec::new();
        for (s, seq) in batch.seqs.iter().enumerate() {
            let n = seq.tokens.len();
            for (i, &tok) in seq.tokens.iter().enumerate() {
                let want = match seq.logits {
                    LogitsWanted::None => false,
                    LogitsWanted::Last => i + 1 == n,
                    LogitsWanted::All => true,
                };
                rows.push((s, seq.start_pos + i, tok, want));
            }
        }
        // Flattened block tables, shared by every sub-step.
        let mut tables: Vec<i32> = Vec::new();
        let mut table_off = Vec::with_capacity(batch.seqs.len());
        for seq in &batch.seqs {
            let need = (seq.start_pos + seq.tokens.len()).div_ceil(self.block_size);
            table_off.push(tables.len() as i32);
            tables.extend(seq.block_table[..need].iter().map(|&b| b as i32));
        }
        for chunk in rows.chunks(self.scratch.rows) {
            self.sub_step(batch, chunk, &tables, &table_off, &mut sink)?;
        }
        Ok(())
    }

    fn sub_step(
        &mut self,
        batch: &ForwardBatch<'_>,
        rows: &[(usize, usize, u32, bool)],
        tables: &[i32],
        table_off: &[i32],
        sink: &mut LogitsSink<'_>,
    ) -> Result<(), CudaError> {
        let c = &self.config;
        let n = rows.len();
        let (hidden, hd, nh, nkv, ffn) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads, c.intermediate_size);
        let (q_width, kv_width) = (nh * hd, nkv * hd);
        let qkv_width = q_width + 2 * kv_width;
        let slots_per_layer = self.num_blocks * self.block_size;

        // Metadata, packed into one upload: tokens | pos | slots | table_off | ctx_len | logit rows | tables.
        let picked: Vec<i32> = rows.iter().enumerate().filter(|(_, r)| r.3).map(|(i, _)| i as i32).collect();
        let m = &mut self.meta_host;
        m.clear();
        m.extend(rows.iter().map(|r| r.2 as i32));
        m.extend(rows.iter().map(|r| r.1 as i32));
        m.extend(rows.iter().map(|&(s, pos, _, _)| {
            let table = batch.seqs[s].block_table;
            (table[pos / self.block_size] as usize * self.block_size + pos % self.block_size) as i32
        }));
        m.extend(rows.iter().map(|r| table_off[r.0]));
        m.extend(rows.iter().map(|r| r.1 as i32 + 1));
        m.extend(&picked);
        m.extend(tables);
        if self.meta.len() < m.len() {
            self.meta = self.stream.alloc_zeros::<i32>(m.len().next_power_of_two())?;
        }
        self.stream.memcpy_htod(m.as_slice(), &mut self.meta.slice_mut(..m.len()))?;
        let meta = self.meta.device_ptr(&self.stream).0;
        let at = |k: usize| meta + (k * n * 4) as u64;
        let (tokens, pos, slots, toff, ctx_len) = (at(0), at(1), at(2), at(3), at(4));
        let picked_ptr = at(5);
        let tables_ptr = picked_ptr + (picked.len() * 4) as u64;

        // Attention partitioning: split long contexts only when rows × KV heads leave the GPU idle.
        let max_ctx = rows.iter().map(|r| r.1 + 1).max().unwrap_or(1);
        let want_blocks = 8 * self.num_sms;
        let mut num_parts = want_blocks.div_ceil(n * nkv).clamp(1, max_ctx.div_ceil(MIN_PART_SIZE).max(1));
        num_parts = num_parts.min((PART_CAP_FLOATS / (n * nh * hd)).max(1));
        let part_size = max_ctx.div_ceil(num_parts);
        let shape = AttentionShape {
            rows: n,
            n_heads: nh,
            n_kv: nkv,
            head_dim: hd,
            row_stride: qkv_width,
            block_size: self.block_size,
            scale: 1.0 / (hd as f32).sqrt(),
            part_size,
            num_parts,
        };

        let sc = &self.scratch;
        let p = |s: &CudaSlice<f32>| s.device_ptr(&self.stream).0;
        let pb = |s: &CudaSlice<u16>| s.device_ptr(&self.stream).0;
        let (x, h, qkv, attn, proj, gate_up, act) = (p(&sc.x), pb(&sc.h), p(&sc.qkv), pb(&sc.attn), p(&sc.proj), p(&sc.gate_up), pb(&sc.act));
        let (part_out, part_ml) = (p(&sc.part_out), p(&sc.part_ml));
        let inv_freq = p(&self.inv_freq);
        let (k_base, v_base) = (pb(&self.k_cache), pb(&self.v_cache));
        let interleaved = c.rope_style == RopeStyle::Interleaved;
        let k = &self.kernels;
        let g = &self.gemm;
        let w = &self.weights;

        // SAFETY (every launch below): each buffer was allocated for `scratch.rows ≥ n` rows of its width (or for the
        // whole model / cache), the metadata arrays hold n entries each (tables: every block of every sequence, all
        // validated against num_blocks by validate_batch), and all work is ordered on one stream.
        unsafe {
            k.embed_gather(pb(&w.embedding.data), tokens, x, n, hidden, c.vocab_size)?;
            for (l, lw) in w.layers.iter().enumerate() {
                let add = if l == 0 { 0 } else { proj };
                k.add_rms_norm(x, add, p(&lw.attn_norm), h, 0, n, hidden, c.rms_norm_eps)?;
                g.linear(h, lw.qkv.ptr(&self.stream), qkv, n, hidden, qkv_width)?;
                k.rope_qk(qkv, pos, inv_freq, n, nh, nkv, hd, qkv_width, interleaved)?;
                let layer_off = (l * slots_per_layer * kv_width * 2) as u64;
                let (kc, vc) = (k_base + layer_off, v_base + layer_off);
                k.kv_cache_write(qkv, kc, vc, slots, n, q_width, kv_width, qkv_width, slots_per_layer)?;
                k.paged_attention(&shape, qkv, kc, vc, tables_ptr, toff, ctx_len, attn, part_out, part_ml)?;
                g.linear(attn, lw.wo.ptr(&self.stream), proj, n, q_width, hidden)?;
                k.add_rms_norm(x, proj, p(&lw.ffn_norm), h, 0, n, hidden, c.rms_norm_eps)?;
                g.linear(h, lw.gate_up.ptr(&self.stream), gate_up, n, hidden, 2 * ffn)?;
                k.silu_mul(gate_up, act, n, ffn)?;
                g.linear(act, lw.down.ptr(&self.stream), proj, n, ffn, hidden)?;
            }
            if picked.is_empty() {
                return Ok(());
            }
            // Final residual add and norm, only for the rows that want logits (gathered densely into h).
            k.add_rms_norm(x, proj, p(&w.output_norm), h, picked_ptr, picked.len(), hidden, c.rms_norm_eps)?;
        }
        let vocab = c.vocab_size;
        let lm_head = w.lm_head().ptr(&self.stream);
        let logits = p(&sc.logits);
        let ids = sc.ids.device_ptr(&self.stream).0;
        let cap = self.scratch.logits.len() / vocab;
        let mut done = 0;
        while done < picked.len() {
            let r = cap.min(picked.len() - done);
            // SAFETY: h holds picked.len() normed rows; logits holds cap·vocab f32 and ids cap i32.
            unsafe {
                g.linear(h + (done * hidden * 2) as u64, lm_head, logits, r, hidden, vocab)?;
            }
            match sink {
                LogitsSink::Host(out) => {
                    let start = out.len();
                    out.resize(start + r * vocab, 0.0);
                    self.stream.memcpy_dtoh(&self.scratch.logits.slice(..r * vocab), &mut out[start..])?;
                }
                LogitsSink::Greedy(out) => {
                    // SAFETY: logits holds r·vocab f32, ids at least r i32.
                    unsafe { k.argmax_rows(logits, ids, r, vocab)? };
                    let mut host = vec![0i32; r];
                    self.stream.memcpy_dtoh(&self.scratch.ids.slice(..r), &mut host)?;
                    out.extend(host.iter().map(|&i| i as u32));
                }
            }
            done += r;
        }
        self.stream.synchronize()?;
        Ok(())
    }
}

fn device_err(e: CudaError) -> BackendError {
    BackendError::Device(e.to_string())
}

impl Backend for CudaBackend {
    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn info(&self) -> BackendInfo {
        BackendInfo { name: "cuda", num_kv_blocks: self.num_blocks, block_size: self.block_size }
    }

    fn forward(&mut self, batch: &ForwardBatch<'_>) -> Result<Logits, BackendError> {
        validate_batch(batch, &self.config, self.block_size, self.num_blocks)?;
        let mut data = Vec::new();
        self.run(batch, LogitsSink::Host(&mut data)).map_err(device_err)?;
        let mut ranges = Vec::with_capacity(batch.seqs.len());
        let mut start = 0;
        for seq in &batch.seqs {
            let k = match seq.logits {
                LogitsWanted::None => 0,
                LogitsWanted::Last => 1,
                LogitsWanted::All => seq.tokens.len(),
            };
            ranges.push(start..start + k);
            start += k;
        }
        Ok(Logits { vocab: self.config.vocab_size, data, ranges })
    }
}
