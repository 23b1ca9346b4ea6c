//! `ferrite worker`: serve one model over gRPC (token ids in, token ids out) for routers.

use std::net::SocketAddr;

use ferrite_worker::server::{WorkerConfig, run as run_worker};

use super::{ModelArgs, resolve_model};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, env = "FERRITE_WORKER_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Address for Prometheus `/metrics` (off when not given).
    #[arg(long, env = "FERRITE_WORKER_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    model: ModelArgs,
    /// Compute backend (`instant` only measures overhead; it does not run the model).
    #[arg(long, value_enum, env = "FERRITE_BACKEND", default_value_t = super::Backend::Cpu)]
    backend: super::Backend,
    /// Name reported to routers (default: the model file name).
    #[arg(long, env = "FERRITE_SERVED_MODEL_NAME")]
    served_model_name: Option<String>,
    /// CPU KV cache size in MiB.
    #[arg(long, env = "FERRITE_KV_CACHE_MIB", default_value_t = 512)]
    kv_cache_mib: usize,
    /// Tokens computed per engine step, over all sequences (the chunked-prefill budget).
    #[arg(long, env = "FERRITE_MAX_NUM_BATCHED_TOKENS", default_value_t = 256)]
    max_num_batched_tokens: usize,
    /// Sequences running at once.
    #[arg(long, env = "FERRITE_MAX_NUM_SEQS", default_value_t = 32)]
    max_num_seqs: usize,
    /// Sequences allowed to wait before new requests are rejected (RESOURCE_EXHAUSTED).
    #[arg(long, env = "FERRITE_MAX_WAITING", default_value_t = 256)]
    max_waiting: usize,
    /// Cap on the context length (0 = the model's).
    #[arg(long, env = "FERRITE_MAX_MODEL_LEN", default_value_t = 0)]
    max_model_len: usize,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let cfg = WorkerConfig {
        model: resolve_model(a.model.model.clone())?,
        model_id: a.served_model_name,
        kv_cache_mib: a.kv_cache_mib,
        max_num_batched_tokens: a.max_num_batched_tokens,
        max_num_seqs: a.max_num_seqs,
        max_waiting: a.max_waiting,
        max_model_len: a.max_model_len,
        threads: a.model.threads,
        precision: a.model.precision.into(),
        backend: a.backend.into(),
    };
    cfg.validate()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(run_worker(cfg, a.listen, a.metrics_listen))?;
    Ok(())
}
