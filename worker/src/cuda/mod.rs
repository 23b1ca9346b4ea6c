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

mod graphs;
mod step;
mod tune;
pub mod weights;

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
use ferrite_common::config::LlamaConfig;
use ferrite_common::error::ModelError;
use ferrite_common::model::ModelFiles;
use ferrite_kernels::cuda::nccl::NcclComm;
use ferrite_kernels::cuda::{ATTENTION_HEAD_DIMS, ATTENTION_MAX_GROUP, CudaError, CudaKernels, Gemm, PrefillWorkspace};

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
    /// Capture decode CUDA graphs for batches up to this many sequences (0: always eager).
    pub graph_max_batch: usize,
    /// Run the row-parallel all-reduces (after o_proj and down) through NCCL at world size 1: the tensor-parallel
    /// code path, exercised on one GPU (NCCL cannot put two ranks on one device).
    pub nccl_world1: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        Self { device: 0, gpu_memory_utilization: 0.9, block_size: crate::kv::DEFAULT_BLOCK_SIZE, max_kv_blocks: None, max_batch_tokens: 2048, graph_max_batch: 256, nccl_world1: false }
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

/// Floats of attention partition workspace (128 MiB; enough for decode graphs of 256 rows over 4k contexts).
const PART_CAP_FLOATS: usize = 32 << 20;
/// Logit rows computed per lm_head GEMM.
const LOGIT_ROWS_CAP: usize = 256;
/// Longest context the dense prefill path gathers (longer prompts use the paged kernel).
const DENSE_MAX_CTX: usize = 16384;
/// Score + probability tiles of the dense prefill path.
const DENSE_SCORE_BYTES: usize = 256 << 20;
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
    prefill_ws: PrefillWorkspace,
    nccl: Option<NcclComm>,
    meta: CudaSlice<i32>,
    meta_host: Vec<i32>,
    graphs: Option<graphs::DecodeGraphs>,
    use_graphs: bool,
    /// `((in, out), rows)`: decode linear layers of this shape up to `rows` rows run `gemv_bf16` (see `tune`).
    gemv_rows: Vec<((usize, usize), usize)>,
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
        if !ATTENTION_HEAD_DIMS.contains(&c.head_dim) || group > ATTENTION_MAX_GROUP {
            return Err(CudaError::Unsupported(format!(
                "head_dim {} / GQA group {group}: the CUDA attention kernel is built for head_dim {ATTENTION_HEAD_DIMS:?} \
                 and at most {ATTENTION_MAX_GROUP} query heads per KV head",
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
        let kv_width = config.num_kv_heads * config.head_dim;
        let dense_ctx = config.max_position_embeddings.min(DENSE_MAX_CTX);
        let prefill_ws = PrefillWorkspace::new(&stream, config.num_heads, kv_width, config.head_dim, opts.max_batch_tokens, dense_ctx, DENSE_SCORE_BYTES)?;
        let inv_freq = stream.clone_htod(&config.rope_inv_freq())?;
        stream.synchronize()?;

        let (free, total) = ctx.mem_get_info()?;
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
        let mut backend = Self {
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
            prefill_ws,
            nccl: if opts.nccl_world1 { Some(NcclComm::init(0, 1, ferrite_kernels::cuda::nccl::unique_id()?)?) } else { None },
            meta,
            meta_host: Vec::new(),
            graphs: None,
            use_graphs: true,
            gemv_rows: Vec::new(),
            num_sms,
            device_name,
        };
        backend.tune_gemv()?;
        // After the KV cache is reserved, so graph memory never competes with it.
        if opts.graph_max_batch > 0
            && let Err(e) = backend.capture_graphs(opts.graph_max_batch)
        {
            tracing::warn!("CUDA graph capture failed, running decode eagerly: {e}");
            backend.graphs = None;
        }
        Ok(backend)
    }

    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    /// Bytes of weights one decode step streams.
    pub fn weight_bytes(&self) -> usize {
        self.weights.matrix_bytes()
    }

    /// Whether decode steps replay captured CUDA graphs (when any were captured); off runs everything eagerly.
    pub fn set_graphs_enabled(&mut self, on: bool) {
        self.use_graphs = on;
    }

    /// Batch sizes with a captured decode graph.
    pub fn graph_buckets(&self) -> Vec<usize> {
        self.graphs.as_ref().map(graphs::DecodeGraphs::buckets).unwrap_or_default()
    }

    /// The NCCL communicator, when the backend runs its all-reduces through one.
    pub fn nccl(&self) -> Option<&NcclComm> {
        self.nccl.as_ref()
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

    fn dptr_u16(&self, s: &CudaSlice<u16>) -> u64 {
        s.device_ptr(&self.stream).0
    }

    /// The forward pass; logit rows go to `sink` in batch order.
    fn run(&mut self, batch: &ForwardBatch<'_>, mut sink: LogitsSink<'_>) -> Result<(), CudaError> {
        if let Some(idx) = self.graph_for(batch) {
            self.replay(batch, idx)?;
            return self.collect(0, batch.seqs.len(), &mut sink);
        }
        let rows = step::batch_rows(batch);
        // Flattened block tables, shared by every sub-step.
        let mut tables: Vec<i32> = Vec::new();
        let mut table_off = Vec::with_capacity(batch.seqs.len());
        for seq in &batch.seqs {
            let need = (seq.start_pos + seq.tokens.len()).div_ceil(self.block_size);
            table_off.push(tables.len() as i32);
            tables.extend(seq.block_table[..need].iter().map(|&b| b as i32));
        }
        let cap = self.scratch.logits.len() / self.config.vocab_size;
        for chunk in rows.chunks(self.scratch.rows) {
            let layout = self.encode_eager(batch, chunk, &tables, &table_off)?;
            self.launch(&layout)?;
            let mut done = 0;
            while done < layout.picked {
                let r = cap.min(layout.picked - done);
                self.launch_logits(done, r, matches!(sink, LogitsSink::Greedy(_)))?;
                self.collect(0, r, &mut sink)?;
                done += r;
            }
        }
        self.stream.synchronize()?;
        Ok(())
    }

    /// Copies logit rows `first .. first + rows` of the device buffers to `sink` (ids only, for greedy).
    fn collect(&mut self, first: usize, rows: usize, sink: &mut LogitsSink<'_>) -> Result<(), CudaError> {
        let vocab = self.config.vocab_size;
        match sink {
            LogitsSink::Host(out) => {
                let start = out.len();
                out.resize(start + rows * vocab, 0.0);
                self.stream.memcpy_dtoh(&self.scratch.logits.slice(first * vocab..(first + rows) * vocab), &mut out[start..])?;
            }
            LogitsSink::Greedy(out) => {
                let mut host = vec![0i32; rows];
                self.stream.memcpy_dtoh(&self.scratch.ids.slice(first..first + rows), &mut host)?;
                out.extend(host.iter().map(|&i| i as u32));
            }
        }
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

    /// Argmax on the device: only the ids cross PCIe.
    fn forward_greedy(&mut self, batch: &ForwardBatch<'_>) -> Result<Vec<u32>, BackendError> {
        validate_batch(batch, &self.config, self.block_size, self.num_blocks)?;
        let mut ids = Vec::new();
        self.run(batch, LogitsSink::Greedy(&mut ids)).map_err(device_err)?;
        Ok(ids)
    }
}
