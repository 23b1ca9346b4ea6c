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
//!
//! A tensor-parallel rank ([`CudaBackend::load_rank`], driven by `crate::tp::group::TpBackend`) holds its shard
//! only (`ShardSpec`: its heads, FFN rows and lm_head vocabulary rows), all-reduces after o_proj and down through
//! NCCL on its stream, and gathers the step's output over the group: for greedy steps each rank's (max, argmax)
//! per row, for logits steps its vocabulary slice of every row.
//!
//! ## Kernels and start-up choices
//! Decode rows use a paged-attention kernel (split into partitions when rows × KV heads would leave the GPU idle): on
//! CUDA cores (lane per key) or on tensor cores (`mma.sync` m16n8k16 with the GQA group's query heads as the M rows,
//! so K and V are read once per group). A sequence's prefill chunk of ≥ 16 rows uses a flash-style tensor-core kernel
//! (16 query rows per warp, keys straight from the paged cache, scores never leave registers) or dense attention
//! through cuBLAS. `graphs`: decode CUDA graphs per (batch bucket, context class), captured after the KV cache is
//! reserved, replayed with one metadata upload. `tune_linear` and `tune` choose by timing on the device at start-up:
//! per weight shape and decode row count, cuBLAS, a `gemv_bf16` instantiation or a cuBLASLt candidate (timed over
//! every layer's weights in turn, so nothing is timed from L2); per decode row count, CUDA-core or tensor-core
//! attention; for prefill, cuBLAS or the flash kernel. A candidate serves only if it agrees with the default path on
//! the same inputs (linear layers: within 1e-3 of cuBLAS and the same bits on two runs), so a faulty kernel or
//! misused descriptor costs speed, never answers. `timing`/`ceilings`: the device-event measurements behind the tuner
//! and `ferrite gpu-bench`. `sampling`: tokens drawn on the device with the host sampler's algorithm.
//!
//! ## Invariants
//! - The KV cache is sized last, from what `gpu_memory_utilization` leaves after weights, activations (sized for
//!   `max_batch_tokens`) and a fixed headroom; no step allocates device memory.
//! - Programmatic dependent launch (sm_90+): every kernel calls `pdl_wait()` before it reads anything earlier work
//!   wrote or writes anything earlier work reads (the only earlier reads are `gemv_bf16`'s first weight loads).
//!   `cuda_programmatic_launch_changes_no_bit` (GPU) checks logits are bit-identical with PDL on and off.
//! - Not batch invariant, unlike the CPU: cuBLAS and the tuner pick kernels by batch size, so a sequence's logits
//!   move by float reassociation with the batch (tests compare within tolerance).

mod ceilings;
mod graphs;
pub mod nccl;
mod sampling;
mod step;
mod timing;
mod tune;
mod tune_linear;
pub use tune_linear::{LinearChoice, LinearKernel, LinearPick};
pub mod weights;

use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DriverError};
use ferrite_common::config::LlamaConfig;
use ferrite_common::error::ModelError;
use ferrite_common::model::ModelFiles;
use ferrite_common::shard::ShardSpec;
use ferrite_kernels::cuda::{ATTENTION_HEAD_DIMS, ATTENTION_MAX_GROUP, CudaError, CudaKernels, Gemm, KernelCache, PrefillWorkspace};

use crate::backend::{Backend, BackendError, BackendInfo, ForwardBatch, Logits, LogitsWanted, RowSampling, validate_batch};
pub use crate::config::CudaAttention;
use crate::tp::comm::CommError;
use nccl::{NcclGroup, NcclRank};
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
    /// Launch our kernels with programmatic dependent launch (sm_90 and later; ignored below): each may start
    /// while the previous kernel finishes (see `ferrite_kernels::cuda` `launch.rs`).
    pub programmatic_launch: bool,
    /// Time cuBLASLt's candidate algorithms for each decode linear layer at start-up (else cuBLAS's default
    /// choice and our `gemv_bf16` are the only options).
    pub gemm_search: bool,
    /// Which paged-attention kernel decode rows use (default: timed at start-up).
    pub attention: CudaAttention,
    /// Directory of compiled kernel images reused across starts (None: compile every time).
    pub kernel_cache: Option<std::path::PathBuf>,
}

impl Default for CudaOptions {
    fn default() -> Self {
        Self {
            device: 0,
            gpu_memory_utilization: 0.9,
            block_size: crate::backend::DEFAULT_BLOCK_SIZE,
            max_kv_blocks: None,
            max_batch_tokens: 2048,
            graph_max_batch: 256,
            programmatic_launch: true,
            gemm_search: true,
            attention: CudaAttention::Auto,
            kernel_cache: None,
        }
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
    /// `[logit rows, logits_width]` (a rank's vocabulary slice, padded to the widest rank's).
    logits: CudaSlice<f32>,
    /// Greedy ids of the logit rows, then (tensor parallel) their values as f32 bits: `[2, logit rows]`.
    ids: CudaSlice<i32>,
}

impl Scratch {
    /// Logit rows one lm_head launch can produce (the capacity of `logits` and `ids`).
    fn logit_rows(&self) -> usize {
        self.ids.len() / 2
    }

    fn new(c: &LlamaConfig, stream: &Arc<CudaStream>, rows: usize, logits_width: usize) -> Result<Self, CudaError> {
        let qkv_width = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim;
        let q_width = c.num_heads * c.head_dim;
        let logit_rows = rows.min(LOGIT_ROWS_CAP);
        // SAFETY: (all allocations) every buffer is written by a kernel or GEMM before it is read in a step.
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
                logits: stream.alloc(logit_rows * logits_width)?,
                ids: stream.alloc(2 * logit_rows)?,
            })
        }
    }
}

/// What to do with the logit rows of a step.
enum LogitsSink<'a> {
    Host(&'a mut Vec<f32>),
    Greedy(&'a mut Vec<u32>),
    /// Sampled on the device with `rows[next..]`, in order.
    Sample {
        rows: &'a [RowSampling],
        next: usize,
        out: &'a mut Vec<u32>,
    },
}

/// Why a step failed on the device: a CUDA error, or (tensor parallel) the group.
#[derive(Debug)]
enum StepError {
    Cuda(CudaError),
    Comm(CommError),
}

impl From<CudaError> for StepError {
    fn from(e: CudaError) -> Self {
        Self::Cuda(e)
    }
}

impl From<DriverError> for StepError {
    fn from(e: DriverError) -> Self {
        Self::Cuda(e.into())
    }
}

impl From<StepError> for BackendError {
    fn from(e: StepError) -> Self {
        match e {
            StepError::Cuda(e) => BackendError::Device(e.to_string()),
            StepError::Comm(e) => BackendError::Collective(e.to_string()),
        }
    }
}

/// A rank that joined its group: its communicator, the whole model's config and every rank's vocabulary rows.
struct Joined {
    comm: Arc<NcclRank>,
    full: LlamaConfig,
    vocab: Vec<Range<usize>>,
}

/// A tensor-parallel rank's view of its group.
struct RankTp {
    comm: Arc<NcclRank>,
    /// The whole model's config (what the engine sees); `CudaBackend::config` is this rank's share.
    full: LlamaConfig,
    /// Every rank's lm_head vocabulary rows, in rank order.
    vocab: Vec<Range<usize>>,
    /// The widest rank's vocabulary rows (the logits buffer's row stride on every rank, so gathers are equal-sized).
    per_vocab: usize,
    /// Receives the gathered (id, value) pairs or logits of every rank.
    gather: CudaSlice<f32>,
    /// Whole logit rows assembled from `gather` on the device, for sampling there: `[logit rows, full vocab]`.
    full_logits: CudaSlice<f32>,
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
    samplers: sampling::SampleBuffers,
    tp: Option<RankTp>,
    meta: CudaSlice<i32>,
    meta_host: Vec<i32>,
    graphs: Option<graphs::DecodeGraphs>,
    use_graphs: bool,
    /// Decode linear layers by weight shape and row count: cuBLAS, a `gemv_bf16` instantiation or a cuBLASLt
    /// algorithm (see `tune_linear`).
    linear_table: Vec<LinearChoice>,
    /// Paged attention over at least this many rows runs the tensor-core kernel (`usize::MAX`: never; see `tune`).
    attention_tc_from: usize,
    /// Prefill chunks attend with the flash-style tensor-core kernel instead of dense cuBLAS (see `tune`).
    prefill_tc: bool,
    num_sms: usize,
    device_name: String,
}

fn model_err(model: &ModelFiles, e: CudaError) -> ModelError {
    ModelError::InvalidConfig { path: model.path.clone(), detail: format!("CUDA: {e}") }
}

/// What a tensor-parallel rank is given: the group's plan, the group, and its rank.
pub struct RankSpec<'a> {
    pub plan: &'a [ShardSpec],
    pub group: Arc<NcclGroup>,
    pub rank: usize,
}

impl CudaBackend {
    /// Loads `model` (GGUF or HF directory) onto the device.
    pub fn load(model: &ModelFiles, opts: &CudaOptions) -> Result<Self, ModelError> {
        let (stream, kernels) = Self::open(&model.config, opts).map_err(|e| model_err(model, e))?;
        let weights = DeviceWeights::load(model, &stream, None)?;
        Self::finish(model.config.clone(), stream, kernels, weights, opts, None).map_err(|e| model_err(model, e))
    }

    /// Loads tensor-parallel rank `r.rank` of `model` on device `opts.device`: joins the NCCL group (blocks until
    /// every rank has), then uploads this rank's shard only.
    pub fn load_rank(model: &ModelFiles, opts: &CudaOptions, r: RankSpec<'_>) -> Result<Self, ModelError> {
        let (local, stream, kernels, joined) = Self::open_rank(&model.config, opts, &r).map_err(|e| model_err(model, e))?;
        let weights = DeviceWeights::load(model, &stream, Some(&r.plan[r.rank]))?;
        Self::finish(local, stream, kernels, weights, opts, Some(joined)).map_err(|e| model_err(model, e))
    }

    /// A model of shape `config` with random weights generated on the device (benchmarks); with `rank`, that
    /// rank's shard of it, its collectives through the group.
    pub fn random(config: &LlamaConfig, opts: &CudaOptions, seed: u64, rank: Option<RankSpec<'_>>) -> Result<Self, CudaError> {
        let Some(r) = rank else {
            let (stream, kernels) = Self::open(config, opts)?;
            let weights = DeviceWeights::random(config, &kernels, seed, None)?;
            return Self::finish(config.clone(), stream, kernels, weights, opts, None);
        };
        let (local, stream, kernels, joined) = Self::open_rank(config, opts, &r)?;
        let lm_rows = r.plan[r.rank].vocab.len();
        let weights = DeviceWeights::random(&local, &kernels, seed.wrapping_add(r.rank as u64), Some(lm_rows))?;
        Self::finish(local, stream, kernels, weights, opts, Some(joined))
    }

    /// Opens rank `r.rank`'s device for its share of `config` (returned) and joins the NCCL group.
    fn open_rank(
        config: &LlamaConfig,
        opts: &CudaOptions,
        r: &RankSpec<'_>,
    ) -> Result<(LlamaConfig, Arc<CudaStream>, CudaKernels, Joined), CudaError> {
        let local = r.plan[r.rank].local_config(config);
        let (stream, kernels) = Self::open(&local, opts)?;
        let comm = Arc::new(NcclRank::init(Arc::clone(&r.group), r.rank, Arc::clone(&stream))?);
        Ok((local, stream, kernels, Joined { comm, full: config.clone(), vocab: r.plan.iter().map(|s| s.vocab.clone()).collect() }))
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
        let devices = ferrite_kernels::cuda::device_count()?;
        if opts.device >= devices {
            return Err(CudaError::Unsupported(format!("CUDA device {} does not exist ({devices} visible)", opts.device)));
        }
        let ctx = CudaContext::new(opts.device)?;
        // SAFETY: the backend issues all work on one stream, so cudarc's per-buffer event tracking (meant for
        // multi-stream use) is not needed; turning it off keeps launches cheap and graph-capturable.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        let cache = opts.kernel_cache.as_ref().map(KernelCache::new);
        let started = std::time::Instant::now();
        let (mut kernels, cached) = CudaKernels::load_cached(Arc::clone(&stream), cache.as_ref())?;
        tracing::info!(arch = kernels.arch(), ms = started.elapsed().as_millis() as u64, cache = ?cached, "CUDA kernels loaded");
        kernels.set_programmatic_launch(opts.programmatic_launch);
        Ok((stream, kernels))
    }

    fn finish(
        config: LlamaConfig,
        stream: Arc<CudaStream>,
        kernels: CudaKernels,
        weights: DeviceWeights,
        opts: &CudaOptions,
        tp: Option<Joined>,
    ) -> Result<Self, CudaError> {
        let ctx = Arc::clone(stream.context());
        let gemm = Gemm::new(Arc::clone(&stream))?;
        let logits_width = tp.as_ref().map_or(config.vocab_size, |t| t.vocab.iter().map(|v| v.len()).max().unwrap_or(0));
        let scratch = Scratch::new(&config, &stream, opts.max_batch_tokens, logits_width)?;
        let full_vocab = tp.as_ref().map_or(config.vocab_size, |t| t.full.vocab_size);
        let samplers = sampling::SampleBuffers::new(&stream, scratch.logit_rows(), full_vocab)?;
        let tp = match tp {
            None => None,
            Some(Joined { comm, full, vocab }) => {
                let world = vocab.len();
                let logit_rows = scratch.logit_rows();
                let gather = stream.alloc_zeros::<f32>(world * (logit_rows * logits_width).max(2 * logit_rows))?;
                let full_logits = stream.alloc_zeros::<f32>(logit_rows * full.vocab_size)?;
                Some(RankTp { comm, full, vocab, per_vocab: logits_width, gather, full_logits })
            }
        };
        let kv_width = config.num_kv_heads * config.head_dim;
        let dense_ctx = config.max_position_embeddings.min(DENSE_MAX_CTX);
        let prefill_ws = PrefillWorkspace::new(
            &stream,
            config.num_heads,
            kv_width,
            config.head_dim,
            opts.max_batch_tokens,
            dense_ctx,
            DENSE_SCORE_BYTES,
        )?;
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
            programmatic_launch = kernels.programmatic_launch(),
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
            samplers,
            tp,
            meta,
            meta_host: Vec::new(),
            graphs: None,
            use_graphs: true,
            linear_table: Vec::new(),
            attention_tc_from: usize::MAX,
            prefill_tc: false,
            num_sms,
            device_name,
        };
        let started = std::time::Instant::now();
        backend.tune_linear(opts.graph_max_batch, opts.gemm_search)?;
        let linear_ms = started.elapsed().as_millis() as u64;
        backend.tune_attention(opts.attention)?;
        tracing::info!(linear_ms, attention_ms = started.elapsed().as_millis() as u64 - linear_ms, "start-up kernel tuning done");
        // After the KV cache is reserved, so graph memory never competes with it.
        if opts.graph_max_batch > 0
            && let Err(e) = backend.capture_graphs(opts.graph_max_batch)
        {
            // A tensor-parallel rank that stopped half-way through the capture's collectives would leave the other
            // ranks waiting in them: it fails (and the group with it) instead of going on eagerly.
            if backend.tp.is_some() {
                return Err(e);
            }
            backend.graphs = None;
            if backend.kernels.programmatic_launch() {
                tracing::warn!("CUDA graph capture with programmatic dependent launch failed, capturing without it: {e}");
                backend.kernels.set_programmatic_launch(false);
                if let Err(e) = backend.capture_graphs(opts.graph_max_batch) {
                    tracing::warn!("CUDA graph capture failed, running decode eagerly: {e}");
                    backend.graphs = None;
                }
            } else {
                tracing::warn!("CUDA graph capture failed, running decode eagerly: {e}");
            }
        }
        Ok(backend)
    }

    /// Turns programmatic dependent launch on or off (benchmarks compare both) and captures the decode graphs
    /// again with the new setting. Returns whether it is on (never below sm_90).
    pub fn set_programmatic_launch(&mut self, on: bool) -> Result<bool, CudaError> {
        self.kernels.set_programmatic_launch(on);
        if let Some(&largest) = self.graph_buckets().last() {
            self.graphs = None;
            self.capture_graphs(largest)?;
        }
        Ok(self.kernels.programmatic_launch())
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

    /// The NCCL rank, when this backend is a tensor-parallel rank.
    pub fn nccl(&self) -> Option<&Arc<NcclRank>> {
        self.tp.as_ref().map(|t| &t.comm)
    }

    pub fn kernels(&self) -> &CudaKernels {
        &self.kernels
    }

    /// Whether kernels launch with programmatic dependent launch (sm_90 and later, when not turned off).
    pub fn programmatic_launch(&self) -> bool {
        self.kernels.programmatic_launch()
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
    fn run(&mut self, batch: &ForwardBatch<'_>, mut sink: LogitsSink<'_>) -> Result<(), StepError> {
        if let Some(idx) = self.graph_for(batch) {
            self.replay(batch, idx)?;
            return self.collect(batch.seqs.len(), &mut sink);
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
        let cap = self.scratch.logit_rows();
        for chunk in rows.chunks(self.scratch.rows) {
            let layout = self.encode_eager(batch, chunk, &tables, &table_off)?;
            self.launch(&layout)?;
            let mut done = 0;
            while done < layout.picked {
                let r = cap.min(layout.picked - done);
                self.launch_logits(done, r, matches!(sink, LogitsSink::Greedy(_)))?;
                self.collect(r, &mut sink)?;
                done += r;
            }
            // Before the next sub-step's metadata upload, and at the end.
            self.wait()?;
        }
        Ok(())
    }

    /// Waits for the stream; a tensor-parallel rank polls, so a collective whose peers are gone becomes an error.
    fn wait(&self) -> Result<(), StepError> {
        match &self.tp {
            Some(t) => t.comm.wait().map_err(StepError::Comm),
            None => Ok(self.stream.synchronize()?),
        }
    }

    /// Copies logit rows `0 .. rows` of the device buffers to `sink` (ids only, for greedy). A tensor-parallel rank
    /// first gathers every rank's part: the greedy (id, value) pairs are already gathered by `launch_logits`; logits
    /// are gathered here.
    fn collect(&mut self, rows: usize, sink: &mut LogitsSink<'_>) -> Result<(), StepError> {
        let vocab = self.config.vocab_size;
        if let LogitsSink::Sample { rows: all, next, out } = sink {
            let logits = match &self.tp {
                None => self.scratch.logits.device_ptr(&self.stream).0,
                Some(tp) => {
                    let full = self.gather_full_logits(tp, rows)?;
                    // The collective is done (polled, so a gone peer is an error) before the sampler's blocking copy.
                    self.wait()?;
                    full
                }
            };
            let ids = self.sample_device(logits, &all[*next..*next + rows])?;
            *next += rows;
            out.extend(ids);
            return Ok(());
        }
        let Some(tp) = &self.tp else {
            match sink {
                LogitsSink::Host(out) => {
                    let start = out.len();
                    out.resize(start + rows * vocab, 0.0);
                    self.stream.memcpy_dtoh(&self.scratch.logits.slice(..rows * vocab), &mut out[start..])?;
                }
                LogitsSink::Greedy(out) => {
                    let mut host = vec![0i32; rows];
                    self.stream.memcpy_dtoh(&self.scratch.ids.slice(..rows), &mut host)?;
                    out.extend(host.iter().map(|&i| i as u32));
                }
                LogitsSink::Sample { .. } => unreachable!("handled above"),
            }
            return Ok(());
        };
        let world = tp.vocab.len();
        match sink {
            LogitsSink::Host(out) => {
                let part = self.gather_logits(tp, rows)?;
                self.wait()?;
                let mut all = vec![0f32; world * part];
                self.stream.memcpy_dtoh(&tp.gather.slice(..world * part), &mut all)?;
                // Rank k's rows are dense with its own width, its part padded to `part`.
                let start = out.len();
                out.resize(start + rows * vocab, 0.0);
                let offsets: Vec<usize> = (0..world).map(|k| k * part).collect();
                crate::tp::gather::interleave_vocab(&all, &offsets, &tp.vocab, rows, vocab, &mut out[start..]);
            }
            LogitsSink::Greedy(out) => {
                let cap = self.scratch.logit_rows();
                self.wait()?;
                let mut all = vec![0f32; world * 2 * cap];
                self.stream.memcpy_dtoh(&tp.gather.slice(..world * 2 * cap), &mut all)?;
                out.extend(crate::tp::gather::combine_argmax(&all, 2 * cap, cap, &tp.vocab, rows));
            }
            LogitsSink::Sample { .. } => unreachable!("handled above"),
        }
        Ok(())
    }

    /// A tensor-parallel rank's collective: every rank's logit rows `0 .. rows` (its vocabulary slice) into
    /// `gather`, rank k's at `k · part`. Returns `part` (floats per rank).
    fn gather_logits(&self, tp: &RankTp, rows: usize) -> Result<usize, StepError> {
        let part = rows * tp.per_vocab;
        let (send, recv) = (self.scratch.logits.device_ptr(&self.stream).0, tp.gather.device_ptr(&self.stream).0);
        // SAFETY: logits holds ≥ rows·per_vocab f32 on every rank; gather holds world·that.
        unsafe { tp.comm.all_gather_device(send, recv, part * 4) }?;
        Ok(part)
    }

    /// Gathers logit rows `0 .. rows` of every rank and assembles whole rows (the full vocabulary, in order) in
    /// `full_logits` on the device; returns its address. Every rank does this (and then samples the same rows with
    /// the same uniforms, so all draw the same ids).
    fn gather_full_logits(&self, tp: &RankTp, rows: usize) -> Result<u64, StepError> {
        let part = self.gather_logits(tp, rows)?;
        let st = &self.stream;
        let (gather, full) = (tp.gather.device_ptr(st).0, tp.full_logits.device_ptr(st).0);
        let vocab = tp.full.vocab_size;
        for (k, range) in tp.vocab.iter().enumerate() {
            // SAFETY: rank k's rows are dense with its own width at k·part in `gather` (rows·width ≤ part floats);
            // `full_logits` holds logit_rows ≥ rows rows of the full vocabulary, and range lies within it.
            unsafe {
                self.kernels.copy_f32_2d(
                    gather + (k * part * 4) as u64,
                    range.len(),
                    full + (range.start * 4) as u64,
                    vocab,
                    rows,
                    range.len(),
                )
            }?;
        }
        Ok(full)
    }

    /// Runs a step; on failure a tensor-parallel rank fails its group at once (the others stop waiting for it).
    fn run_step(&mut self, batch: &ForwardBatch<'_>, sink: LogitsSink<'_>) -> Result<(), BackendError> {
        let out = self.run(batch, sink);
        if let (Err(e), Some(tp)) = (&out, &self.tp) {
            tp.comm.fail(&format!("{e:?}"));
        }
        Ok(out?)
    }
}

impl Backend for CudaBackend {
    fn config(&self) -> &LlamaConfig {
        self.tp.as_ref().map_or(&self.config, |t| &t.full)
    }

    fn info(&self) -> BackendInfo {
        BackendInfo { name: "cuda", num_kv_blocks: self.num_blocks, block_size: self.block_size }
    }

    fn draws_on_device(&self) -> bool {
        true
    }

    fn forward(&mut self, batch: &ForwardBatch<'_>) -> Result<Logits, BackendError> {
        validate_batch(batch, &self.config, self.block_size, self.num_blocks)?;
        let mut data = Vec::new();
        self.run_step(batch, LogitsSink::Host(&mut data))?;
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
        self.run_step(batch, LogitsSink::Greedy(&mut ids))?;
        Ok(ids)
    }

    /// Adjustments and the draw on the device: only the ids cross PCIe.
    fn forward_sample(&mut self, batch: &ForwardBatch<'_>, rows: &[RowSampling]) -> Result<Vec<u32>, BackendError> {
        if !self.can_sample(rows) {
            return crate::backend::forward_then_sample(self, batch, rows);
        }
        validate_batch(batch, &self.config, self.block_size, self.num_blocks)?;
        let wanted = batch.seqs.iter().filter(|s| s.logits != LogitsWanted::None).count();
        if wanted != rows.len() || batch.seqs.iter().any(|s| s.logits == LogitsWanted::All) {
            return crate::backend::forward_then_sample(self, batch, rows);
        }
        let mut ids = Vec::with_capacity(rows.len());
        self.run_step(batch, LogitsSink::Sample { rows, next: 0, out: &mut ids })?;
        Ok(ids)
    }
}
