//! The routers' raft control plane: a replicated, durable view of the cluster's workers and routers.
//!
//! - [`storage`]: the raft log, hard state, applied state and snapshots in a data directory (redb, fsynced).
//! - [`state`]: the replicated state machine ([`ClusterState`]) and its epoch-fenced [`Command`]s.
//! - `node`: the thread that owns raft-rs's `RawNode` (ready loop, proposals matched by id, learner promotion).
//! - `transport`: raft messages between routers over tonic, bounded per-peer queues.
//! - `service`: the `Cluster` gRPC service (worker Register/Heartbeat/Deregister, router Join/RemoveRouter), the
//!   leader's leases and its garbage collection of dead workers.
//! - `view`: `GET /v1/cluster`.
//!
//! Everything is served on the router's raft listener (`--raft-listen`): routers and workers both talk to it, so the
//! OpenAI HTTP port carries no control traffic. [`ClusterHandle::start`] opens the data directory, starts the node and
//! the listener; routing reads the applied state through [`ClusterHandle::watch_state`] (a local, possibly slightly
//! stale copy: nothing on the HTTP path waits for raft), mapped to routable workers by [`routable_workers`].

pub mod metrics;
mod node;
mod service;
pub mod state;
pub mod storage;
mod transport;
mod view;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrite_common::proto::cluster as pb;
use tokio::sync::{oneshot, watch};

pub use metrics::ClusterMetrics;
pub use node::{ProposeError, RaftStatus};
pub use service::{HEARTBEAT, LEASE_TTL};
pub use state::{ClusterState, Command, Outcome, WorkerRecord, WorkerState};
pub use storage::{ClusterStorage, DataDirError};
pub use view::routes;

use node::{Input, Node};
use transport::Transport;

/// A router's control-plane settings (`ferrite router --raft-*`).
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// This router's raft id (≥ 1, stable across restarts: for a StatefulSet, the ordinal + 1).
    pub raft_id: u64,
    /// Where the raft and cluster gRPC services listen.
    pub listen: SocketAddr,
    /// The address other routers and workers reach this one at (`host:port`).
    pub advertise: String,
    /// Other routers: raft id → `host:port`.
    pub peers: BTreeMap<u64, String>,
    pub data_dir: PathBuf,
    /// Start a new single-router group if the data directory holds none.
    pub bootstrap: bool,
    /// The data directory and every raft message carry it: routers of another cluster are refused.
    pub cluster_id: String,
    /// How long a dead worker stays in the replicated state before the leader removes it (timed by the leader from
    /// when it saw the worker dead; [`DEFAULT_DEAD_WORKER_GRACE`] by default).
    pub dead_worker_grace: Duration,
}

/// `--dead-worker-grace` default: long enough to see on `/v1/cluster` what died, short enough that a churning
/// deployment does not accumulate records.
pub const DEFAULT_DEAD_WORKER_GRACE: Duration = Duration::from_secs(600);

/// The model this cluster serves: a worker with another fingerprint is refused at registration.
#[derive(Debug, Clone)]
pub struct ModelIdentity {
    pub model_id: String,
    pub fingerprint: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error("invalid cluster configuration: {0}")]
    Config(String),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("binding the raft listener {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("cluster metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("starting the raft thread: {0}")]
    Thread(std::io::Error),
}

impl ClusterConfig {
    pub fn validate(&self) -> Result<(), ClusterError> {
        let bad = |m: String| Err(ClusterError::Config(m));
        if self.raft_id == 0 {
            return bad("--raft-id must be ≥ 1 (raft reserves 0)".into());
        }
        if let Some(0) = self.peers.keys().next() {
            return bad("--raft-peer ids must be ≥ 1".into());
        }
        if self.dead_worker_grace < Duration::from_secs(1) || self.dead_worker_grace > Duration::from_secs(30 * 24 * 3600) {
            return bad(format!("--dead-worker-grace must be between 1 s and 30 days, not {:?}", self.dead_worker_grace));
        }
        if self.cluster_id.is_empty() {
            return bad("the cluster id must not be empty".into());
        }
        if !self.bootstrap && self.peers.keys().all(|&id| id == self.raft_id) {
            // Not fatal for an initialized data directory, but a new router without peers can never join.
            if !self.data_dir.join("CLUSTER").exists() {
                return bad("a new router needs --bootstrap or at least one --raft-peer to join".into());
            }
        }
        Ok(())
    }
}

/// Parses `ID=ADDR` (the `--raft-peer` form).
pub fn parse_peer(s: &str) -> Result<(u64, String), String> {
    let (id, addr) = s.split_once('=').ok_or_else(|| format!("`{s}`: expected ID=HOST:PORT"))?;
    let id: u64 = id.trim().parse().map_err(|_| format!("`{s}`: the raft id must be a positive integer"))?;
    if id == 0 || addr.trim().is_empty() {
        return Err(format!("`{s}`: expected ID=HOST:PORT with ID ≥ 1"));
    }
    Ok((id, addr.trim().to_string()))
}

/// Workers routers should send requests to, from an applied state: `(address, draining)`. Active workers route;
/// draining ones finish what they have (`draining = true`); joining and dead ones are left out.
pub fn routable_workers(state: &ClusterState) -> Vec<(String, bool)> {
    state
        .workers
        .values()
        .filter_map(|w| match w.state {
            WorkerState::Active => Some((w.addr.clone(), false)),
            WorkerState::Draining => Some((w.addr.clone(), true)),
            WorkerState::Joining | WorkerState::Dead => None,
        })
        .collect()
}

pub(crate) struct Shared {
    id: u64,
    cluster_id: String,
    advertise: String,
    inbox: SyncSender<Input>,
    state: watch::Receiver<ClusterState>,
    status: watch::Receiver<RaftStatus>,
    transport: Arc<Transport>,
    leases: Mutex<service::Leases>,
    metrics: ClusterMetrics,
    model: ModelIdentity,
    dead_worker_grace: Duration,
}

/// A running control plane (cheap to clone).
#[derive(Clone)]
pub struct ClusterHandle {
    inner: Arc<Shared>,
}

impl ClusterHandle {
    /// Opens the data directory (refusing a bad one), starts the raft thread, serves the raft and cluster services on
    /// `cfg.listen`, keeps leases while leader, and, for a new router without `--bootstrap`, asks the peers to join.
    /// Must be called inside a tokio runtime.
    pub async fn start(cfg: ClusterConfig, model: ModelIdentity) -> Result<Self, ClusterError> {
        cfg.validate()?;
        if cfg.advertise.parse::<SocketAddr>().is_ok_and(|a| a.ip().is_unspecified()) {
            tracing::warn!(advertise = %cfg.advertise, "peers and workers cannot reach an unspecified address: set --raft-advertise");
        }
        let (mut storage, fresh) = ClusterStorage::open(&cfg.data_dir, &cfg.cluster_id, cfg.raft_id)?;
        if !storage.initialized() {
            if cfg.bootstrap {
                tracing::info!(raft_id = cfg.raft_id, "bootstrapping a new cluster");
                storage.apply_snapshot(node::bootstrap_snapshot(cfg.raft_id, &cfg.advertise))?;
            } else {
                tracing::info!(raft_id = cfg.raft_id, "new router: joining through the peers");
            }
        } else if cfg.bootstrap {
            tracing::info!("the data directory already holds the cluster: --bootstrap ignored");
        }
        tracing::info!(dir = %cfg.data_dir.display(), fresh, applied = storage.applied_index(), "raft storage open");
        let listener = tokio::net::TcpListener::bind(cfg.listen).await.map_err(|source| ClusterError::Bind { addr: cfg.listen, source })?;
        let metrics = ClusterMetrics::new()?;
        let (inbox, inbox_rx) = sync_channel(4096);
        let transport = Arc::new(Transport::new(
            cfg.raft_id,
            cfg.cluster_id.clone(),
            cfg.peers.clone(),
            tokio::runtime::Handle::current(),
            inbox.clone(),
            metrics.clone(),
        ));
        let logger = slog::Logger::root(TracingDrain, slog::o!());
        let raw = raft::RawNode::new(&node::raft_config(cfg.raft_id, storage.applied_index()), storage, &logger)?;
        let (state_tx, state) = watch::channel(ClusterState::default());
        let (status_tx, status) = watch::channel(RaftStatus { id: cfg.raft_id, ..Default::default() });
        let node = Node::new(raw, inbox_rx, transport.clone(), state_tx, status_tx, metrics.clone())?;
        std::thread::Builder::new().name("ferrite-raft".into()).spawn(move || node.run()).map_err(ClusterError::Thread)?;
        let h = Self {
            inner: Arc::new(Shared {
                id: cfg.raft_id,
                cluster_id: cfg.cluster_id.clone(),
                advertise: cfg.advertise.clone(),
                inbox,
                state,
                status,
                transport: transport.clone(),
                leases: Mutex::new(service::Leases::default()),
                metrics,
                model,
                dead_worker_grace: cfg.dead_worker_grace,
            }),
        };
        let server = tonic::transport::Server::builder()
            .add_service(pb::raft_server::RaftServer::new(transport::RaftService(transport)))
            .add_service(pb::cluster_server::ClusterServer::new(service::ClusterService(h.clone())))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        tokio::spawn(async move {
            if let Err(e) = server.await {
                tracing::error!(error = %e, "the raft listener failed");
            }
        });
        tokio::spawn(service::keep_leases(h.clone()));
        tokio::spawn(join_group(h.clone()));
        tracing::info!(raft_id = cfg.raft_id, addr = %cfg.listen, "raft listening");
        Ok(h)
    }

    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// The raft status as of the node's last loop turn.
    pub fn status(&self) -> RaftStatus {
        self.inner.status.borrow().clone()
    }

    /// The applied state now.
    pub fn state_now(&self) -> ClusterState {
        self.inner.state.borrow().clone()
    }

    /// The applied state, notified on every change (for routing).
    pub fn watch_state(&self) -> watch::Receiver<ClusterState> {
        self.inner.state.clone()
    }

    /// Resolves when the raft node stopped for good (a storage failure): the router should exit.
    pub async fn failed(&self) -> String {
        let mut rx = self.inner.status.clone();
        loop {
            if let Some(why) = rx.borrow().failed.clone() {
                return why;
            }
            if rx.changed().await.is_err() {
                return "the raft node stopped".into();
            }
        }
    }

    /// Resolves when this router was removed from the raft group (it takes no further part): the router should exit.
    pub async fn removed(&self) {
        let mut rx = self.inner.status.clone();
        loop {
            if rx.borrow().removed {
                return;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// The control plane's Prometheus text.
    pub fn metrics_text(&self) -> String {
        self.inner.metrics.render()
    }

    /// Proposes a command on this router (it must be the leader); resolves when it applied.
    pub async fn propose(&self, cmd: Command) -> Result<Outcome, ProposeError> {
        let start = std::time::Instant::now();
        let (reply, rx) = oneshot::channel();
        self.inner.inbox.try_send(Input::Propose { cmd, reply }).map_err(|_| ProposeError::Dropped("the raft node is busy".into()))?;
        let result = rx.await.unwrap_or(Err(ProposeError::Stopped));
        if result.is_ok() {
            self.inner.metrics.proposal_seconds.observe(start.elapsed().as_secs_f64());
        }
        result
    }

    /// Adds a router as a learner (the leader promotes it once it caught up); resolves when the change applied.
    pub async fn add_router(&self, id: u64, addr: String) -> Result<(), ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.inner
            .inbox
            .try_send(Input::AddRouter { id, addr, reply })
            .map_err(|_| ProposeError::Dropped("the raft node is busy".into()))?;
        rx.await.unwrap_or(Err(ProposeError::Stopped))
    }

    /// Removes a router from the group (see the `node` module for what is refused); resolves when the change applied.
    pub async fn remove_router(&self, id: u64) -> Result<(), ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.inner.inbox.try_send(Input::RemoveRouter { id, reply }).map_err(|_| ProposeError::Dropped("the raft node is busy".into()))?;
        rx.await.unwrap_or(Err(ProposeError::Stopped))
    }

    /// Age of each lease the leader holds (empty on followers).
    pub(crate) fn lease_ages(&self) -> std::collections::HashMap<u64, Duration> {
        let leases = self.inner.leases.lock().unwrap_or_else(|e| e.into_inner());
        self.state_now().workers.values().filter_map(|w| Some((w.lease_id, leases.age(w.lease_id)?))).collect()
    }
}

/// A new router (no group in its data directory, no `--bootstrap`) asks its peers, in turn, to add it, until a
/// leader's snapshot has made it a member.
async fn join_group(h: ClusterHandle) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut hint: Option<String> = None;
    let mut turn = 0usize;
    loop {
        tick.tick().await;
        if h.status().initialized() {
            return;
        }
        let peers = h.inner.transport.peer_addrs();
        let Some(addr) = hint.take().or_else(|| peers.get(turn % peers.len().max(1)).cloned()) else { continue };
        turn += 1;
        let req = pb::JoinRequest { cluster_id: h.inner.cluster_id.clone(), raft_id: h.inner.id, addr: h.inner.advertise.clone() };
        let Ok(ep) = tonic::transport::Endpoint::from_shared(transport::uri(&addr)) else { continue };
        let ep = ep.connect_timeout(Duration::from_secs(1)).timeout(Duration::from_secs(6));
        let result: Result<pb::JoinReply, String> = async {
            let channel = ep.connect().await.map_err(|e| e.to_string())?;
            let r = pb::cluster_client::ClusterClient::new(channel).join(req).await.map_err(|e| e.to_string())?;
            Ok(r.into_inner())
        }
        .await;
        match result {
            Ok(r) => match pb::ReplyStatus::try_from(r.status) {
                Ok(pb::ReplyStatus::Ok) => tracing::info!(via = %addr, "join accepted; waiting for the leader's snapshot"),
                Ok(pb::ReplyStatus::NotLeader) if !r.leader_hint.is_empty() => hint = Some(r.leader_hint),
                Ok(pb::ReplyStatus::Refused) => tracing::error!(via = %addr, reason = %r.reason, "join refused"),
                _ => tracing::debug!(via = %addr, reason = %r.reason, "join not accepted yet"),
            },
            Err(e) => tracing::debug!(via = %addr, error = %e, "join attempt failed"),
        }
    }
}

/// raft-rs logs through slog: forward its records to `tracing` (target `raft`), key-values appended to the message.
struct TracingDrain;

struct KvText(String);

impl slog::Serializer for KvText {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments) -> slog::Result {
        use std::fmt::Write;
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &slog::Record, values: &slog::OwnedKVList) -> Result<(), slog::Never> {
        use slog::KV;
        let mut text = KvText(format!("{}", record.msg()));
        let _ = record.kv().serialize(record, &mut text);
        let _ = values.serialize(record, &mut text);
        let msg = text.0;
        match record.level() {
            slog::Level::Critical | slog::Level::Error => tracing::error!(target: "raft", "{msg}"),
            slog::Level::Warning => tracing::warn!(target: "raft", "{msg}"),
            slog::Level::Info => tracing::info!(target: "raft", "{msg}"),
            slog::Level::Debug => tracing::debug!(target: "raft", "{msg}"),
            slog::Level::Trace => tracing::trace!(target: "raft", "{msg}"),
        }
        Ok(())
    }
}
