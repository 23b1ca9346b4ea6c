//! Starting a worker: load the model, size the KV cache, start the engine thread and serve gRPC.

use std::sync::Arc;
use std::time::Duration;

use ferrite_common::model::ModelFiles;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

/// A PEM certificate chain and private key for the worker's gRPC port.
#[derive(Clone)]
pub struct TlsIdentity {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

use crate::backend::Backend;
use crate::backend::DEFAULT_BLOCK_SIZE;
use crate::config::{BackendKind, WorkerConfig, WorkerError};
use crate::cpu::{CpuBackend, CpuOptions};
use crate::engine::constraint::GrammarCompiler;
use crate::engine::core::{Engine, EngineConfig, EngineHandle};
use crate::engine::scheduler::SchedulerConfig;
use crate::service::{ModelInfo, WorkerService};

/// A loaded worker, ready to serve.
pub struct Worker {
    pub service: WorkerService,
    pub engine: EngineHandle,
    pub info: ModelInfo,
}

/// Bytes of KV per block on the CPU: K and V, every layer, in `dtype`.
pub fn kv_bytes_per_block(c: &ferrite_common::config::LlamaConfig, block_size: usize, dtype: crate::cpu::KvDtype) -> usize {
    2 * c.num_layers * c.num_kv_heads * c.head_dim * block_size * dtype.bytes()
}

impl Worker {
    /// Loads the model and starts the engine thread.
    pub fn load(cfg: &WorkerConfig) -> Result<Self, WorkerError> {
        cfg.validate()?;
        let files = crate::model::open_model(&cfg.model)?;
        let c = &files.config;
        let per_block = kv_bytes_per_block(c, DEFAULT_BLOCK_SIZE, cfg.kv_cache_dtype);
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
                let opts = CpuOptions {
                    precision: cfg.precision,
                    threads: cfg.threads,
                    num_kv_blocks: num_blocks,
                    block_size: DEFAULT_BLOCK_SIZE,
                    isa: cfg.cpu_isa()?,
                    kv_dtype: cfg.kv_cache_dtype,
                };
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
                decode_step_target: (cfg.decode_step_target_ms > 0).then(|| Duration::from_millis(cfg.decode_step_target_ms)),
            },
        )?;
        // The token table for constrained decoding, built once per model.
        let grammar = match GrammarCompiler::new(&text.tokenizer, c.vocab_size, &info.eos_ids) {
            Ok(g) => Some(Arc::new(g)),
            Err(e) => {
                tracing::warn!(error = %e, "constrained decoding is off: requests with a grammar will be refused");
                None
            }
        };
        tracing::info!(model = %info.model_id, kv_blocks = num_blocks, max_model_len, "worker ready");
        Ok(Self { service: WorkerService::new(engine.clone(), info.clone(), grammar), engine, info })
    }

    /// Serves gRPC on `listener` until `shutdown` resolves (`Ok`) or the engine stops on a fatal backend error
    /// ([`WorkerError::EngineFailed`]: the caller exits non-zero, so an orchestrator restarts the worker).
    pub async fn serve(self, listener: TcpListener, shutdown: impl std::future::Future<Output = ()>) -> Result<(), WorkerError> {
        self.serve_tls(listener, None, shutdown).await
    }

    /// [`Worker::serve`], over TLS when `tls` (a PEM certificate chain and key) is given: routers then dial
    /// `https://` and check the certificate against their `--worker-ca`.
    pub async fn serve_tls(
        self,
        listener: TcpListener,
        tls: Option<TlsIdentity>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), WorkerError> {
        let mut builder = tonic::transport::Server::builder();
        if let Some(t) = tls {
            let identity = tonic::transport::Identity::from_pem(t.cert_pem, t.key_pem);
            builder = builder
                .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                .map_err(|e| WorkerError::Config(format!("TLS certificate/key: {e}")))?;
        }
        let engine = self.engine.clone();
        let closer = self.service.closer();
        let stop = async move {
            tokio::select! {
                () = shutdown => {}
                why = engine.failed() => tracing::error!(error = %why, "stopping the worker"),
            }
            // Subscribed routers' event streams would hold the graceful shutdown open forever.
            closer.send_replace(true);
        };
        builder.add_service(self.service.into_server()).serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop).await?;
        match self.engine.fatal_error() {
            Some(why) => Err(WorkerError::EngineFailed(why)),
            None => Ok(()),
        }
    }
}
