//! `ferrite worker`: serve one model over gRPC (token ids in, token ids out) for routers.

use std::net::SocketAddr;

use std::time::Duration;

use anyhow::Context;
use ferrite_worker::registration::{Registration, RegistrationConfig};
use ferrite_worker::server::{TlsIdentity, Worker};
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
    /// Routers' raft addresses (`host:port`, repeatable or comma-separated) to register with: the worker joins the
    /// cluster, heartbeats, and deregisters on SIGTERM. Needs --advertise.
    #[arg(long = "register-with", env = "FERRITE_REGISTER_WITH", value_delimiter = ',', requires = "advertise")]
    register_with: Vec<String>,
    /// This worker's gRPC address as routers reach it, e.g. `http://10.0.0.5:50051` (also its id in the cluster).
    #[arg(long, env = "FERRITE_ADVERTISE")]
    advertise: Option<String>,
    /// Serve gRPC over TLS with this PEM certificate chain (with `--tls-key`); routers then use `https://` addresses
    /// and `--worker-ca`.
    #[arg(long, env = "FERRITE_WORKER_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The PEM private key of `--tls-cert`.
    #[arg(long, env = "FERRITE_WORKER_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
}

/// Loads the model, then serves gRPC (and `/metrics` when asked) until Ctrl-C or SIGTERM, or until the engine fails
/// for good (a non-zero exit, so an orchestrator restarts the worker). With `--register-with`, it registers with the
/// routers' cluster once serving, and on Ctrl-C/SIGTERM deregisters (no new requests), finishes what it has and exits 0.
pub fn run(a: Args) -> anyhow::Result<()> {
    let cfg = a.engine.worker_config(resolve_model(a.model.model.clone())?, a.served_model_name, a.max_waiting, &a.model);
    cfg.validate()?;
    let (routers, advertise) = (a.register_with, a.advertise);
    let capacity = cfg.max_num_seqs as u32;
    let tls = match (&a.tls_cert, &a.tls_key) {
        (Some(c), Some(k)) => Some(TlsIdentity {
            cert_pem: std::fs::read(c).with_context(|| format!("reading {}", c.display()))?,
            key_pem: std::fs::read(k).with_context(|| format!("reading {}", k.display()))?,
        }),
        _ => None,
    };
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
        let registration = match advertise {
            Some(advertise) if !routers.is_empty() => Some(Registration::spawn(RegistrationConfig {
                routers,
                advertise,
                model_id: worker.info.model_id.clone(),
                fingerprint: worker.info.fingerprint.to_vec(),
                tp_size: worker.info.tp,
                capacity,
            })?),
            _ => None,
        };
        // Ready: serving gRPC and, in a cluster, registered (not before, not while re-registering or draining).
        match &registration {
            Some(r) => {
                let mut registered = r.registered();
                tokio::spawn(async move {
                    loop {
                        ready_tx.send_replace(*registered.borrow_and_update());
                        if registered.changed().await.is_err() {
                            return;
                        }
                    }
                });
            }
            None => {
                ready_tx.send_replace(true);
            }
        }
        let refused = async {
            match &registration {
                Some(r) => Some(r.refused().await),
                None => std::future::pending().await,
            }
        };
        let mut refusal = None;
        let stop = async {
            tokio::select! {
                () = shutdown_signal() => {}
                why = refused => refusal = why,
            }
            if let Some(r) = &registration {
                // Deregister first (routers stop sending new requests), then the server drains what it has.
                r.deregister(Duration::from_secs(5)).await;
            }
        };
        worker.serve_tls(listener, tls, stop).await?;
        drop(registration);
        if let Some(why) = refusal {
            anyhow::bail!("the cluster refused this worker: {why}");
        }
        anyhow::Ok(())
    })
}

/// Ctrl-C, or SIGTERM (how Kubernetes stops a pod).
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "SIGTERM handler not installed");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down: finishing the requests in flight");
}
