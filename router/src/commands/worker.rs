//! `ferrite worker`: serve one model over gRPC (token ids in, token ids out) for routers.

use std::net::SocketAddr;

use ferrite_worker::server::run as run_worker;

use super::{EngineArgs, ModelArgs, resolve_model};

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
    /// Name reported to routers (default: the model file name).
    #[arg(long, env = "FERRITE_SERVED_MODEL_NAME")]
    served_model_name: Option<String>,
    /// Sequences allowed to wait before new requests are rejected (RESOURCE_EXHAUSTED).
    #[arg(long, env = "FERRITE_MAX_WAITING", default_value_t = 256)]
    max_waiting: usize,
    #[command(flatten)]
    engine: EngineArgs,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let cfg = a.engine.worker_config(resolve_model(a.model.model.clone())?, a.served_model_name, a.max_waiting, &a.model);
    cfg.validate()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(run_worker(cfg, a.listen, a.metrics_listen))?;
    Ok(())
}
