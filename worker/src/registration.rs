//! Registering with the routers' control plane (`ferrite worker --register-with`): Register, then Heartbeat every
//! second, and Deregister on shutdown.
//!
//! The client runs on its own thread with a current-thread tokio runtime, so a worker whose runtime (or CPUs) are busy
//! with inference never misses heartbeats and gets falsely expired (the failure Dynamo hit with etcd keep-alives on a
//! shared runtime). Any router answers: a follower's NOT_LEADER carries the leader's address, which is tried next. A
//! heartbeat answered UNKNOWN_LEASE (the lease expired, or the cluster lost it) makes the worker register again, with
//! a new epoch. A REFUSED registration (another model than the cluster's) is final: [`Registration::refused`] reports
//! it and the worker exits.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use ferrite_common::proto::cluster as pb;
use pb::ReplyStatus;
use pb::cluster_client::ClusterClient;
use tonic::transport::{Channel, Endpoint};

/// What the worker tells the cluster about itself.
#[derive(Debug, Clone)]
pub struct RegistrationConfig {
    /// Router raft addresses (`host:port`), tried in turn.
    pub routers: Vec<String>,
    /// The worker's gRPC address as routers reach it (`http://host:port`); also its identity in the cluster.
    pub advertise: String,
    pub model_id: String,
    pub fingerprint: Vec<u8>,
    pub tp_size: u32,
    pub capacity: u32,
}

enum Ctl {
    /// Deregister (mark draining), then tell the caller; heartbeats go on while the worker drains.
    Deregister(tokio::sync::oneshot::Sender<()>),
    Stop,
}

/// The running registration client.
pub struct Registration {
    ctl: Sender<Ctl>,
    refused: tokio::sync::watch::Receiver<Option<String>>,
    registered: tokio::sync::watch::Receiver<bool>,
    thread: Option<JoinHandle<()>>,
}

impl Registration {
    /// Starts the client thread.
    pub fn spawn(cfg: RegistrationConfig) -> std::io::Result<Self> {
        let (ctl, rx) = mpsc::channel();
        let (refused_tx, refused) = tokio::sync::watch::channel(None);
        let (registered_tx, registered) = tokio::sync::watch::channel(false);
        let thread =
            std::thread::Builder::new().name("ferrite-heartbeat".into()).spawn(
                move || match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt.block_on(Client::new(cfg, refused_tx, registered_tx).run(rx)),
                    Err(e) => tracing::error!(error = %e, "the registration runtime did not start"),
                },
            )?;
        Ok(Self { ctl, refused, registered, thread: Some(thread) })
    }

    /// True while the cluster holds this worker's registration (false before, after an unknown lease until it
    /// registers again, and once deregistered): the worker's readiness.
    pub fn registered(&self) -> tokio::sync::watch::Receiver<bool> {
        self.registered.clone()
    }

    /// Resolves with the reason when the cluster refused this worker for good.
    pub async fn refused(&self) -> String {
        let mut rx = self.refused.clone();
        loop {
            if let Some(why) = rx.borrow_and_update().clone() {
                return why;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Asks the cluster to stop routing here (draining); waits up to `wait` for the answer.
    pub async fn deregister(&self, wait: Duration) {
        let (done, rx) = tokio::sync::oneshot::channel();
        if self.ctl.send(Ctl::Deregister(done)).is_ok() {
            let _ = tokio::time::timeout(wait, rx).await;
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = self.ctl.send(Ctl::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Client {
    cfg: RegistrationConfig,
    refused: tokio::sync::watch::Sender<Option<String>>,
    registered: tokio::sync::watch::Sender<bool>,
    /// The router to call next (the leader, when known).
    target: String,
    turn: usize,
    /// `(lease_id, epoch)` while registered.
    lease: Option<(u64, u64)>,
    heartbeat: Duration,
}

fn uri(addr: &str) -> String {
    if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") }
}

impl Client {
    fn new(
        cfg: RegistrationConfig,
        refused: tokio::sync::watch::Sender<Option<String>>,
        registered: tokio::sync::watch::Sender<bool>,
    ) -> Self {
        let target = cfg.routers.first().cloned().unwrap_or_default();
        Self { cfg, refused, registered, target, turn: 0, lease: None, heartbeat: Duration::from_secs(1) }
    }

    fn next_router(&mut self) {
        self.turn += 1;
        if !self.cfg.routers.is_empty() {
            self.target = self.cfg.routers[self.turn % self.cfg.routers.len()].clone();
        }
    }

    /// Follows a leader hint, or moves on to the next router.
    fn redirect(&mut self, hint: String) {
        if hint.is_empty() { self.next_router() } else { self.target = hint }
    }

    async fn client(&self) -> Result<ClusterClient<Channel>, String> {
        let ep = Endpoint::from_shared(uri(&self.target)).map_err(|e| e.to_string())?;
        let ep = ep.connect_timeout(Duration::from_millis(500)).timeout(Duration::from_secs(6));
        Ok(ClusterClient::new(ep.connect().await.map_err(|e| e.to_string())?))
    }

    async fn run(mut self, ctl: Receiver<Ctl>) {
        let mut draining = false;
        loop {
            match ctl.recv_timeout(if self.lease.is_some() { self.heartbeat } else { Duration::from_millis(300) }) {
                Ok(Ctl::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                Ok(Ctl::Deregister(done)) => {
                    draining = true;
                    self.deregister().await;
                    let _ = done.send(());
                    continue;
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            if self.refused.borrow().is_some() {
                continue;
            }
            if self.lease.is_none() {
                if !draining {
                    self.register().await;
                }
            } else {
                self.beat().await;
            }
        }
    }

    async fn register(&mut self) {
        let req = pb::RegisterRequest {
            worker_id: self.cfg.advertise.clone(),
            addr: self.cfg.advertise.clone(),
            model_id: self.cfg.model_id.clone(),
            model_fingerprint: self.cfg.fingerprint.clone(),
            tensor_parallel_size: self.cfg.tp_size,
            capacity: self.cfg.capacity,
        };
        let r = match self.client().await {
            Ok(mut c) => c.register(req).await.map(|r| r.into_inner()).map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        match r {
            Ok(r) => match ReplyStatus::try_from(r.status) {
                Ok(ReplyStatus::Ok) => {
                    tracing::info!(router = %self.target, epoch = r.epoch, "registered with the cluster");
                    self.lease = Some((r.lease_id, r.epoch));
                    self.registered.send_replace(true);
                    self.heartbeat = Duration::from_millis(u64::from(r.heartbeat_ms.max(100)));
                    // Heartbeat at once: the leader routes to a worker from its first heartbeat on.
                    self.beat().await;
                }
                Ok(ReplyStatus::NotLeader) => self.redirect(r.leader_hint),
                Ok(ReplyStatus::Refused) => {
                    tracing::error!(reason = %r.reason, "the cluster refused this worker");
                    let _ = self.refused.send(Some(r.reason));
                }
                _ => {
                    tracing::debug!(router = %self.target, reason = %r.reason, "registration not accepted yet");
                    self.next_router();
                }
            },
            Err(e) => {
                tracing::debug!(router = %self.target, error = %e, "registration call failed");
                self.next_router();
            }
        }
    }

    async fn beat(&mut self) {
        let Some((lease_id, _)) = self.lease else { return };
        let r = match self.client().await {
            Ok(mut c) => c.heartbeat(pb::HeartbeatRequest { lease_id }).await.map(|r| r.into_inner()).map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        match r {
            Ok(r) => match ReplyStatus::try_from(r.status) {
                Ok(ReplyStatus::Ok) => {}
                Ok(ReplyStatus::NotLeader) => self.redirect(r.leader_hint),
                Ok(ReplyStatus::UnknownLease) => {
                    tracing::warn!("the cluster does not know this worker's lease: registering again");
                    self.lease = None;
                    self.registered.send_replace(false);
                }
                _ => self.next_router(),
            },
            Err(e) => {
                tracing::debug!(router = %self.target, error = %e, "heartbeat failed");
                self.next_router();
            }
        }
    }

    async fn deregister(&mut self) {
        let Some((_, epoch)) = self.lease else { return };
        for _ in 0..(2 * self.cfg.routers.len() + 2) {
            let req = pb::DeregisterRequest { worker_id: self.cfg.advertise.clone(), epoch };
            let r = match self.client().await {
                Ok(mut c) => c.deregister(req).await.map(|r| r.into_inner()).map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            match r {
                Ok(r) if r.status == ReplyStatus::Ok as i32 => {
                    self.registered.send_replace(false);
                    tracing::info!("deregistered: draining");
                    return;
                }
                Ok(r) if r.status == ReplyStatus::NotLeader as i32 => self.redirect(r.leader_hint),
                Ok(r) if r.status == ReplyStatus::UnknownLease as i32 => return,
                _ => {
                    self.next_router();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        tracing::warn!("could not deregister: the lease will lapse instead");
    }
}
