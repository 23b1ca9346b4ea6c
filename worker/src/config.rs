//! Worker settings: what the `ferrite` binary's flags become ([`WorkerConfig`], validated once), the backend choice
//! and the CUDA options every backend module reads, and the worker's start-up errors.

use std::path::PathBuf;

use ferrite_common::error::ModelError;

use crate::cpu::weights::WeightPrecision;
use crate::cpu::{CpuIsa, IsaLevel};

/// Worker settings (validated by [`WorkerConfig::validate`]).
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub model: PathBuf,
    /// Name reported in `Info` (default: the model file or directory name).
    pub model_id: Option<String>,
    /// CPU KV cache size.
    pub kv_cache_mib: usize,
    /// CPU KV cache element type (f16 holds twice the tokens in the same memory).
    pub kv_cache_dtype: crate::cpu::KvDtype,
    pub max_num_batched_tokens: usize,
    /// While streams decode, the step time to aim for (ms): a prompt is prefilled in chunks that keep steps about
    /// this long, instead of the full `max_num_batched_tokens` at once. 0: off.
    pub decode_step_target_ms: u64,
    pub max_num_seqs: usize,
    pub max_waiting: usize,
    /// Caps the model's context (0 = the model's own).
    pub max_model_len: usize,
    pub threads: usize,
    pub precision: WeightPrecision,
    /// Cap on the CPU kernels' instruction set (None: the best this CPU supports); [`Self::validate`] rejects a
    /// level the host lacks.
    pub cpu_isa: Option<IsaLevel>,
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
        self.cpu_isa()?;
        if !(self.gpu_memory_utilization > 0.0 && self.gpu_memory_utilization <= 1.0) {
            return err("--gpu-memory-utilization must be in (0, 1]");
        }
        Ok(())
    }

    /// The instruction set the CPU kernels run at: the cap if the host supports it, else an error.
    pub fn cpu_isa(&self) -> Result<CpuIsa, WorkerError> {
        CpuIsa::from_cap(self.cpu_isa).map_err(|e| WorkerError::Config(format!("FERRITE_CPU_ISA / --cpu-isa: {e}")))
    }
}
