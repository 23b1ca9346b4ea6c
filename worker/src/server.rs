//! Starting a worker: load the model, size the KV cache, start the engine thread and serve gRPC.

use std::path::PathBuf;

use ferrite_common::error::ModelError;
use ferrite_common::model::ModelFiles;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::backend::Backend;
use crate::cpu::weights::WeightPrecision;
use crate::cpu::{CpuBackend, CpuOptions};
use crate::engine::core::{Engine, EngineConfig, EngineHandle};
use crate::engine::scheduler::SchedulerConfig;
use crate::backend::DEFAULT_BLOCK_SIZE;
use crate::service::{ModelInfo, WorkerService};

/// Worker settings (validated by [`WorkerConfig::validate`]).
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub model: PathBuf,
    /// Name reported in `Info` (default: the model file or directory name).
    pub model_id: Option<String>,
    /// CPU KV cache size.
    pub kv_cache_mib: usize,
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
    pub max_waiting: usize,
    /// Caps the model's context (0 = the model's own).
    pub max_model_len: usize,
    pub threads: usize,
    pub precision: WeightPrecision,
    /// Which backend runs the model.
    pub backend: BackendKind,
    /// CUDA: device ordinal and the fraction of its memory to use (weights + activations + KV cache).
    pub cuda_device: usize,
    pub gpu_memory_utilization: f32,
    /// Tensor-parallel ranks: one thread per rank, each holding its shard (CUDA: rank `r` on device
    /// `cuda_device + r`, collectives through NCCL).
    pub tensor_parallel_size: usize,
    /// CUDA: run every step eagerly, capturing no decode CUDA graphs (vLLM's `--enforce-eager`).
    pub enforce_eager: bool,
    /// CUDA: which paged-attention kernel decode rows use.
    pub cuda_attention: CudaAttention,
    /// CUDA: launch kernels with programmatic dependent launch (sm_90 and later; ignored below).
    pub cuda_programmatic_launch: bool,
    /// CUDA: time cuBLASLt's candidate algorithms for each decode linear layer at start-up.
    pub cuda_gemm_search: bool,
    /// CUDA: directory of compiled kernel images reused across starts (None: compile at every start).
    pub kernel_cache_dir: Option<PathBuf>,
}

/// Which paged-attention kernel the CUDA backend runs for decode rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CudaAttention {
    /// Chosen per batch size by timing both at start-up (tensor cores only where they agree with CUDA cores).
    #[default]
    Auto,
    /// Always the CUDA-core kernel.
    CudaCores,
    /// Always the tensor-core kernel (sm_80 and later; CUDA cores below).
    TensorCores,
}

/// The worker's compute backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendKind {
    /// The CPU Llama.
    #[default]
    Cpu,
    /// No computation (overhead measurements only; see [`crate::instant`]).
    Instant,
    /// The CUDA Llama (needs the `cuda` feature at build time and a GPU at run time; the KV cache is sized from
    /// free device memory, not `kv_cache_mib`).
    Cuda,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("invalid worker config: {0}")]
    Config(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The engine stopped on a fatal backend error (failed device or tensor-parallel group): restart the worker.
    #[error("the engine stopped: {0}")]
    EngineFailed(String),
}

impl WorkerConfig {
    pub fn validate(&self) -> Result<(), WorkerError> {
        let err = |m: &str| Err(WorkerError::Config(m.into()));
        if self.kv_cache_mib == 0 {
            return err("--kv-cache-mib must be > 0");
        }
        if self.max_num_batched_tokens == 0 || self.max_num_seqs == 0 {
            return err("--max-num-batched-tokens and --max-num-seqs must be > 0");
        }
        if self.tensor_parallel_size == 0 {
            return err("--tensor-parallel-size must be at least 1");
        }
        if !(self.gpu_memory_utilization > 0.0 && self.gpu_memory_utilization <= 1.0) {
            return err("--gpu-memory-utilization must be in (0, 1]");
        }
        Ok(())
    }
}

/// A loaded worker, ready to serve.
pub struct Worker {
    pub service: WorkerService,
    pub engine: EngineHandle,
    pub info: ModelInfo,
}

/// Bytes of KV per block: K and V, every layer, f32 on CPU.
pub fn kv_bytes_per_block(c: &ferrite_common::config::LlamaConfig, block_size: usize) -> usize {
    2 * c.num_layers * c.num_kv_heads * c.head_dim * block_size * std::mem::size_of::<f32>()
}

impl Worker {
    /// Loads the model and starts the engine thread.
    pub fn load(cfg: &WorkerConfig) -> Result<Self, WorkerError> {
        cfg.validate()?;
        let files = crate::model::open_model(&cfg.model)?;
        let c = &files.config;
        let per_block = kv_bytes_per_block(c, DEFAULT_BLOCK_SIZE);
        let num_blocks = cfg.kv_cache_mib * (1 << 20) / per_block;
        if num_blocks < 2 {
            return Err(WorkerError::Config(format!("--kv-cache-mib {} holds no KV block ({per_block} bytes each)", cfg.kv_cache_mib)));
        }
        // Row-parallel splits fall on the weights' quantization blocks (CPU keeps them quantized; the GPU loads bf16).
        let plan = |block: usize| {
            ferrite_common::shard::ShardSpec::plan(c, cfg.tensor_parallel_size, block).map_err(|e| WorkerError::Config(e.to_string()))
        };
        let backend: Box<dyn Backend> = match cfg.backend {
            #[cfg(feature = "cuda")]
            BackendKind::Cuda => {
                let opts = crate::cuda::CudaOptions {
                    device: cfg.cuda_device,
                    gpu_memory_utilization: cfg.gpu_memory_utilization,
                    block_size: DEFAULT_BLOCK_SIZE,
                    max_kv_blocks: None,
                    max_batch_tokens: cfg.max_num_batched_tokens,
                    graph_max_batch: if cfg.enforce_eager { 0 } else { cfg.max_num_seqs },
                    programmatic_launch: cfg.cuda_programmatic_launch,
                    gemm_search: cfg.cuda_gemm_search,
                    attention: cfg.cuda_attention,
                    kernel_cache: cfg.kernel_cache_dir.clone(),
                };
                if cfg.tensor_parallel_size > 1 {
                    Box::new(crate::tp::group::TpBackend::cuda(&files, &opts, plan(1)?)?)
                } else {
                    Box::new(crate::cuda::CudaBackend::load(&files, &opts)?)
                }
            }
            #[cfg(not(feature = "cuda"))]
            BackendKind::Cuda => {
                return Err(WorkerError::Config("this binary was built without CUDA support (cargo build --features cuda)".into()));
            }
            BackendKind::Cpu => {
                let opts = CpuOptions { precision: cfg.precision, threads: cfg.threads, num_kv_blocks: num_blocks, block_size: DEFAULT_BLOCK_SIZE };
                if cfg.tensor_parallel_size > 1 {
                    Box::new(crate::tp::group::TpBackend::cpu(&files, &opts, plan(files.max_block_size())?)?)
                } else {
                    Box::new(CpuBackend::load(&files, &opts)?)
                }
            }
            BackendKind::Instant if cfg.tensor_parallel_size > 1 => {
                return Err(WorkerError::Config("the instant backend does not shard (--tensor-parallel-size 1)".into()));
            }
            BackendKind::Instant => Box::new(crate::instant::InstantBackend::new(c.clone(), num_blocks, DEFAULT_BLOCK_SIZE)),
        };
        Self::start(cfg, &files, backend)
    }

    /// Starts the engine thread over a loaded `backend` of the model in `files` (`load` does both; tests bring their
    /// own backend here).
    pub fn start(cfg: &WorkerConfig, files: &ModelFiles, backend: Box<dyn Backend>) -> Result<Self, WorkerError> {
        let c = &files.config;
        let max_model_len = match cfg.max_model_len {
            0 => c.max_position_embeddings,
            m => m.min(c.max_position_embeddings),
        };
        // The backend decides: CUDA sizes its cache from free device memory.
        let num_blocks = backend.info().num_kv_blocks;
        let fingerprint = files.fingerprint()?;
        let text = ferrite_common::text::TextAssets::load(files)?;
        let info = ModelInfo {
            model_id: cfg.model_id.clone().unwrap_or_else(|| {
                files.path.file_name().map_or_else(|| "model".into(), |n| n.to_string_lossy().trim_end_matches(".gguf").to_string())
            }),
            fingerprint,
            block_size: DEFAULT_BLOCK_SIZE as u32,
            kv_blocks_total: (num_blocks - 1) as u32,
            max_model_len: max_model_len as u32,
            vocab_size: c.vocab_size as u32,
            eos_ids: text.eos_token_ids.clone(),
            backend: backend.info().name.to_string(),
            tp: cfg.tensor_parallel_size as u32,
        };
        let engine = Engine::spawn(
            backend,
            EngineConfig {
                scheduler: SchedulerConfig {
                    max_num_batched_tokens: cfg.max_num_batched_tokens,
                    max_num_seqs: cfg.max_num_seqs,
                    max_waiting: cfg.max_waiting,
                    max_model_len,
                },
                model_fingerprint: fingerprint,
                eos_token_ids: text.eos_token_ids,
            },
        )?;
        tracing::info!(model = %info.model_id, kv_blocks = num_blocks, max_model_len, "worker ready");
        Ok(Self { service: WorkerService::new(engine.clone(), info.clone()), engine, info })
    }

    /// Serves gRPC on `listener` until `shutdown` resolves (`Ok`) or the engine stops on a fatal backend error
    /// ([`WorkerError::EngineFailed`]: the caller exits non-zero, so an orchestrator restarts the worker).
    pub async fn serve(self, listener: TcpListener, shutdown: impl std::future::Future<Output = ()>) -> Result<(), WorkerError> {
        let engine = self.engine.clone();
        let stop = async {
            tokio::select! {
                () = shutdown => {}
                why = engine.failed() => tracing::error!(error = %why, "stopping the worker"),
            }
        };
        tonic::transport::Server::builder()
            .add_service(self.service.into_server())
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop)
            .await?;
        match self.engine.fatal_error() {
            Some(why) => Err(WorkerError::EngineFailed(why)),
            None => Ok(()),
        }
    }
}
