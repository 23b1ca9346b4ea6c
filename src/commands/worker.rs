//! `ferrite worker`: serve one model over gRPC (token ids in, token ids out) for routers.

use std::net::SocketAddr;

use anyhow::Context;
use ferrite_worker::server::Worker;
use tokio::net::TcpListener;

use super::{EngineArgs, ModelArgs, resolve_model};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, env = "FERRITE_WORKER_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Address of the HTTP side port: Prometheus `/metrics` and the `/health/live`, `/health/ready` probes (off when
    /// not given).
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

/// Loads the model, then serves gRPC (and `/metrics` when asked) until Ctrl-C or until the engine fails for good (a
/// non-zero exit, so an orchestrator restarts the worker).
pub fn run(a: Args) -> anyhow::Result<()> {
    let cfg = a.engine.worker_config(resolve_model(a.model.model.clone())?, a.served_model_name, a.max_waiting, &a.model);
    cfg.validate()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let worker = tokio::task::spawn_blocking(move || Worker::load(&cfg)).await.context("loading the model")??;
        let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
        if let Some(m) = a.metrics_listen {
            let bound = crate::worker_http::spawn(&worker.engine, m, ready_rx).await?;
            tracing::info!(addr = %bound, "metrics on /metrics, probes on /health/live and /health/ready");
        }
        let listener = TcpListener::bind(a.listen).await.with_context(|| format!("binding {}", a.listen))?;
        tracing::info!(addr = %listener.local_addr()?, "worker listening");
        ready_tx.send_replace(true);
        worker
            .serve(listener, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        anyhow::Ok(())
    })
}
