//! `ferrite router`: the OpenAI-compatible front end for separately running workers.
//!
//! With `--raft-id` it is also a member of the routers' raft group. A router removed from the group (`ferrite cluster
//! remove-router`) exits with status 0 once it learns of it (requests in flight on it are cut: take it out of the load
//! balancer first); its data directory is left as it was, and started again on it, it exits again.

use anyhow::Context;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ferrite_common::model::ModelFiles;
use ferrite_common::text::TextAssets;
use ferrite_router::Limits;
use ferrite_router::cluster::{self, ClusterConfig, ClusterHandle, ModelIdentity};
use ferrite_router::{AppState, ExtraMetrics, serve_http_with};
use ferrite_router::{Member, PoolConfig, WorkerPool};

use super::resolve_model;
use super::serve::{HttpArgs, RoutingArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    http: HttpArgs,
    /// Worker gRPC addresses, e.g. `http://10.0.0.5:50051` (repeatable or comma-separated).
    /// Not needed with --raft-id: workers then register with the routers' cluster (`ferrite worker --register-with`).
    #[arg(long = "worker", env = "FERRITE_WORKERS", value_delimiter = ',', required_unless_present = "raft_id")]
    workers: Vec<String>,
    #[command(flatten)]
    raft: RaftArgs,
    /// The model the workers serve (a .gguf or HF directory): the router needs its tokenizer and chat template.
    #[arg(long, env = "FERRITE_MODEL")]
    model: Option<std::path::PathBuf>,
    /// Context limit for request validation (0 = the model's); the workers may enforce a lower one.
    #[arg(long, env = "FERRITE_MAX_MODEL_LEN", default_value_t = 0)]
    max_model_len: usize,
    #[command(flatten)]
    routing: RoutingArgs,
    /// PEM CA certificate(s) that `https://` workers' certificates chain to (gRPC over TLS to workers started with
    /// `--tls-cert`).
    #[arg(long, env = "FERRITE_WORKER_CA")]
    worker_ca: Option<PathBuf>,
}

/// The raft control plane: routers replicate which workers exist (see ARCHITECTURE.md, "Control plane").
#[derive(clap::Args, Debug)]
pub struct RaftArgs {
    /// This router's raft id (≥ 1, stable across restarts: for a StatefulSet, the ordinal + 1). Turns the control
    /// plane on: the routers keep a replicated, durable worker list that workers register with.
    #[arg(long, env = "FERRITE_RAFT_ID", requires_all = ["raft_listen", "data_dir"])]
    raft_id: Option<u64>,
    /// Address of the raft and cluster gRPC services (routers and workers connect here), e.g. `0.0.0.0:7001`.
    #[arg(long, env = "FERRITE_RAFT_LISTEN", requires = "raft_id")]
    raft_listen: Option<SocketAddr>,
    /// Address other routers and workers reach this router's raft listener at (default: --raft-listen).
    #[arg(long, env = "FERRITE_RAFT_ADVERTISE", requires = "raft_id")]
    raft_advertise: Option<String>,
    /// Another router of the group, `ID=HOST:PORT` (repeatable or comma-separated).
    #[arg(long = "raft-peer", env = "FERRITE_RAFT_PEERS", value_delimiter = ',', value_parser = cluster::parse_peer, requires = "raft_id")]
    raft_peers: Vec<(u64, String)>,
    /// Where this router keeps its raft log and snapshots (created if missing; a directory of another cluster,
    /// router or format is refused).
    #[arg(long, env = "FERRITE_DATA_DIR", requires = "raft_id")]
    data_dir: Option<PathBuf>,
    /// Start a new cluster with this router as its only member, unless the data directory already holds one.
    #[arg(long, requires = "raft_id")]
    bootstrap: bool,
    /// Name of the cluster: kept in the data directory and checked on every raft message.
    #[arg(long, env = "FERRITE_CLUSTER_ID", default_value = "ferrite", requires = "raft_id")]
    cluster_id: String,
    /// Seconds a dead worker stays listed before the leader removes it from the cluster (1 s to 30 days).
    #[arg(long, env = "FERRITE_DEAD_WORKER_GRACE", default_value_t = cluster::DEFAULT_DEAD_WORKER_GRACE.as_secs(), requires = "raft_id")]
    dead_worker_grace: u64,
}

impl RaftArgs {
    fn config(&self) -> Option<ClusterConfig> {
        let (id, listen, dir) = (self.raft_id?, self.raft_listen?, self.data_dir.clone()?);
        Some(ClusterConfig {
            raft_id: id,
            listen,
            advertise: self.raft_advertise.clone().unwrap_or_else(|| listen.to_string()),
            peers: self.raft_peers.iter().filter(|&(p, _)| *p != id).cloned().collect(),
            data_dir: dir,
            bootstrap: self.bootstrap,
            cluster_id: self.cluster_id.clone(),
            dead_worker_grace: Duration::from_secs(self.dead_worker_grace),
        })
    }
}

/// The router listens at once: it takes the model id and limits from the model files it was given, answers 503 (and
/// `/v1/health/ready` 503) until a worker is reachable, and checks the first worker that answers for agreement.
pub fn run(a: Args) -> anyhow::Result<()> {
    let path = resolve_model(a.model.clone())?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let files = ModelFiles::open(&path)?;
        let text = Arc::new(TextAssets::load(&files)?);
        let (vocab, fingerprint) = (files.config.vocab_size, files.fingerprint()?);
        // Workers that serve another model than `--model` are refused (logged, kept out of routing).
        let worker_ca = match &a.worker_ca {
            Some(p) => Some(std::fs::read(p).with_context(|| format!("reading --worker-ca {}", p.display()))?),
            None => None,
        };
        let cfg = PoolConfig { model_fingerprint: Some(fingerprint.to_vec()), worker_ca, ..a.routing.pool_config() };
        let pool = WorkerPool::with_config(&a.workers, cfg)?;
        pool.start_kv_subscriptions();
        tracing::info!(routing = %a.routing.routing, kv_events = %a.routing.kv_events, migration_limit = a.routing.migration_limit, workers = pool.len(), "routing policy");
        let c = &files.config;
        let max_model_len = match a.max_model_len {
            0 => c.max_position_embeddings,
            m => m.min(c.max_position_embeddings),
        };
        let limits = Limits { max_model_len, vocab_size: c.vocab_size };
        let model_id = files.path.file_name().map_or_else(|| "model".into(), |n| n.to_string_lossy().trim_end_matches(".gguf").to_string());
        let check = pool.clone();
        tokio::spawn(async move {
            // Not fatal either way: a worker that comes up later is picked up by readiness and routing.
            match check.info(Duration::from_secs(24 * 3600)).await {
                Ok(info) if info.vocab_size as usize != vocab || info.model_fingerprint.as_slice() != fingerprint.as_slice() => {
                    tracing::error!(
                        worker_model = %info.model_id,
                        "the worker serves a different model than the router's --model (vocabulary or weights differ)"
                    )
                }
                Ok(info) if (info.max_model_len as usize) < max_model_len => tracing::warn!(
                    worker_max_model_len = info.max_model_len,
                    router_max_model_len = max_model_len,
                    "the worker's context limit is lower: longer requests get its error (pass --max-model-len to the router)"
                ),
                Ok(info) => tracing::info!(worker_model = %info.model_id, "a worker answered"),
                Err(e) => tracing::warn!("{e}"),
            }
        });
        let cluster = match a.raft.config() {
            Some(cfg) => {
                let model = ModelIdentity { model_id: model_id.clone(), fingerprint: fingerprint.to_vec() };
                Some(ClusterHandle::start(cfg, model).await?)
            }
            None => None,
        };
        if let Some(c) = &cluster {
            // Routers route from their applied copy of the membership: every change reconciles the live worker set.
            let mut rx = c.watch_state();
            let pool = pool.clone();
            tokio::spawn(async move {
                loop {
                    let members: Vec<Member> = cluster::routable_workers(&rx.borrow_and_update())
                        .into_iter()
                        .map(|(addr, draining)| Member { addr, draining })
                        .collect();
                    tracing::info!(workers = members.len(), "cluster membership applied");
                    pool.sync_members(&members);
                    if rx.changed().await.is_err() {
                        return;
                    }
                }
            });
        }
        let extra: Option<ExtraMetrics> = cluster.clone().map(|c| Arc::new(move || c.metrics_text()) as ExtraMetrics);
        let state = AppState::new(text, pool, a.http.config(&model_id)?, limits, extra)?;
        let routes = cluster.clone().map(cluster::routes).unwrap_or_default();
        let serve = serve_http_with(Arc::new(state), a.http.addr(), a.http.tls(), routes);
        match &cluster {
            Some(c) => tokio::select! {
                r = serve => r?,
                why = c.failed() => anyhow::bail!("the raft control plane stopped: {why}"),
                // Removed from the group (`ferrite cluster remove-router`): it would only serve a frozen worker list.
                () = c.removed() => tracing::warn!("this router was removed from the raft group: exiting"),
            },
            None => serve.await?,
        }
        anyhow::Ok(())
    })
}
