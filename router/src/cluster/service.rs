//! The `Cluster` gRPC service on the raft listener (Register, Heartbeat, Deregister, Join) and the leader's leases.
//!
//! Leases live only in the leader's memory (the etcd lessor pattern): `lease_id → deadline`. The lease keeper
//! ([`keep_leases`]) extends every lease of the replicated state once when this router becomes leader (so an election
//! never mass-expires workers), forgets them all when it stops being leader, and proposes `ExpireLease` for a lease past
//! its deadline. A heartbeat for a lease the leader does not hold gets `UNKNOWN_LEASE`: the worker registers again.
//!
//! Garbage collection: the same keeper times how long each worker has been dead (from when this leader first saw it
//! dead) and, past [`ClusterConfig::dead_worker_grace`](super::ClusterConfig), proposes `RemoveWorker` at the epoch it
//! died in (so a worker that registered again meanwhile is left alone). A new leader starts those clocks afresh, so
//! a dead worker leaves at most one grace after the last leader change.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ferrite_common::proto::cluster as pb;
use pb::ReplyStatus;

use super::ClusterHandle;
use super::node::ProposeError;
use super::state::{ClusterState, Command, Outcome, WorkerId, WorkerSpec, WorkerState};

/// How often workers heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// How long a lease lives without a heartbeat.
pub const LEASE_TTL: Duration = Duration::from_secs(5);
/// How long a proposal may take before the caller is told to retry.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The leader's leases.
#[derive(Default)]
pub(crate) struct Leases {
    /// The term these leases were taken over in (0: not leader).
    term: u64,
    deadlines: HashMap<u64, Instant>,
    dead: DeadClock,
}

/// When this leader first saw each dead worker (by id and the epoch it died in).
#[derive(Default)]
pub(crate) struct DeadClock {
    since: HashMap<(WorkerId, u64), Instant>,
}

impl DeadClock {
    /// Starts the clock of workers dead as of `state` and not seen dead before, forgets those no longer dead (removed
    /// or registered again), and returns the ones dead for at least `grace`: `(id, epoch)` for `RemoveWorker`.
    pub(crate) fn due(&mut self, state: &ClusterState, now: Instant, grace: Duration) -> Vec<(WorkerId, u64)> {
        let dead: std::collections::HashSet<(WorkerId, u64)> = state.dead().map(|(id, e)| (id.clone(), e)).collect();
        self.since.retain(|k, _| dead.contains(k));
        for k in dead {
            self.since.entry(k).or_insert(now);
        }
        let mut due: Vec<(WorkerId, u64)> =
            self.since.iter().filter(|(_, t)| now.saturating_duration_since(**t) >= grace).map(|(k, _)| k.clone()).collect();
        due.sort();
        due
    }
}

impl Leases {
    /// Time since the lease's last heartbeat (or since this leader took it over).
    pub(crate) fn age(&self, lease: u64) -> Option<Duration> {
        let d = self.deadlines.get(&lease)?;
        Some(LEASE_TTL.saturating_sub(d.saturating_duration_since(Instant::now())))
    }
}

/// Runs on the leader's tokio runtime for the life of the router: promotes, demotes and expires leases.
pub(crate) async fn keep_leases(h: ClusterHandle) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tick.tick().await;
        let status = h.status();
        if status.failed.is_some() {
            return;
        }
        let (expired, collect): (Vec<u64>, Vec<(WorkerId, u64)>) = {
            let state = h.state_now();
            let mut leases = h.inner.leases.lock().unwrap_or_else(|e| e.into_inner());
            if !status.is_leader() {
                // Demoted: a follower holds no leases (the next leader grants them afresh).
                *leases = Leases::default();
                continue;
            }
            let now = Instant::now();
            if leases.term != status.term {
                tracing::info!(term = status.term, leases = state.leased().count(), "leader: extending every worker lease");
                leases.term = status.term;
                leases.deadlines.clear();
                leases.dead = DeadClock::default();
            }
            // Every live lease of the state is held (a new leader's, or one a previous leader granted late).
            for w in state.leased() {
                leases.deadlines.entry(w.lease_id).or_insert(now + LEASE_TTL);
            }
            let live: std::collections::HashSet<u64> = state.leased().map(|w| w.lease_id).collect();
            leases.deadlines.retain(|l, _| live.contains(l));
            let expired = leases.deadlines.iter().filter(|(_, d)| **d <= now).map(|(l, _)| *l).collect();
            (expired, leases.dead.due(&state, now, h.inner.dead_worker_grace))
        };
        for lease_id in expired {
            match h.propose(Command::ExpireLease { lease_id }).await {
                Ok(outcome) => {
                    if matches!(outcome, Outcome::Applied { .. }) {
                        h.inner.metrics.lease_expirations.inc();
                        tracing::warn!(lease_id, "a worker's lease expired: marked dead");
                    }
                    h.inner.leases.lock().unwrap_or_else(|e| e.into_inner()).deadlines.remove(&lease_id);
                }
                Err(e) => tracing::debug!(lease_id, error = %e, "lease expiry not proposed; retrying"),
            }
        }
        for (id, epoch) in collect {
            match h.propose(Command::RemoveWorker { id: id.clone(), epoch }).await {
                Ok(Outcome::Applied { .. }) => {
                    h.inner.metrics.workers_collected.inc();
                    tracing::info!(worker = %id, epoch, "a dead worker's grace ran out: removed from the cluster");
                }
                Ok(Outcome::Stale) => {}
                Err(e) => tracing::debug!(worker = %id, error = %e, "dead worker removal not proposed; retrying"),
            }
        }
    }
}

/// The `Cluster` gRPC service.
pub(crate) struct ClusterService(pub ClusterHandle);

type Reply<T> = Result<tonic::Response<T>, tonic::Status>;

impl ClusterService {
    /// `Some((status, hint))` when this router cannot answer for the leader.
    fn redirect(&self) -> Option<(ReplyStatus, String)> {
        let s = self.0.status();
        if s.is_leader() {
            return None;
        }
        let hint = (s.leader_id != 0).then(|| self.0.inner.transport.addr_of(s.leader_id)).flatten().unwrap_or_default();
        Some((ReplyStatus::NotLeader, hint))
    }

    async fn propose(&self, cmd: Command) -> Result<Outcome, (ReplyStatus, String, String)> {
        match tokio::time::timeout(PROPOSE_TIMEOUT, self.0.propose(cmd)).await {
            Ok(Ok(o)) => Ok(o),
            Ok(Err(ProposeError::NotLeader { leader })) => {
                let hint = leader.and_then(|l| self.0.inner.transport.addr_of(l)).unwrap_or_default();
                Err((ReplyStatus::NotLeader, hint, "leadership changed".into()))
            }
            Ok(Err(e)) => Err((ReplyStatus::Unavailable, String::new(), e.to_string())),
            Err(_) => Err((ReplyStatus::Unavailable, String::new(), "the proposal did not commit in time".into())),
        }
    }
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ClusterService {
    async fn register(&self, req: tonic::Request<pb::RegisterRequest>) -> Reply<pb::RegisterReply> {
        let r = req.into_inner();
        let reply = |status: ReplyStatus, hint: String, reason: String| {
            Ok(tonic::Response::new(pb::RegisterReply { status: status as i32, leader_hint: hint, reason, ..Default::default() }))
        };
        let model = &self.0.inner.model;
        if r.model_fingerprint != model.fingerprint {
            let why = format!(
                "the worker serves `{}`, but this cluster's routers serve `{}` (the model fingerprints differ)",
                r.model_id, model.model_id
            );
            tracing::warn!(worker = %r.worker_id, "{why}");
            return reply(ReplyStatus::Refused, String::new(), why);
        }
        if r.worker_id.is_empty() || r.addr.is_empty() {
            return reply(ReplyStatus::Refused, String::new(), "worker_id and addr are required".into());
        }
        if let Some((status, hint)) = self.redirect() {
            return reply(status, hint, String::new());
        }
        let lease_id = rand::random::<u64>().max(1);
        let spec = WorkerSpec {
            id: r.worker_id.clone(),
            addr: r.addr,
            model: r.model_id,
            tp_size: r.tensor_parallel_size.max(1),
            capacity: r.capacity,
        };
        match self.propose(Command::UpsertWorker { spec, lease_id }).await {
            Ok(Outcome::Applied { epoch }) => {
                self.0.inner.leases.lock().unwrap_or_else(|e| e.into_inner()).deadlines.insert(lease_id, Instant::now() + LEASE_TTL);
                tracing::info!(worker = %r.worker_id, epoch, "worker registered");
                Ok(tonic::Response::new(pb::RegisterReply {
                    status: ReplyStatus::Ok as i32,
                    epoch,
                    lease_id,
                    ttl_ms: LEASE_TTL.as_millis() as u32,
                    heartbeat_ms: HEARTBEAT.as_millis() as u32,
                    ..Default::default()
                }))
            }
            Ok(Outcome::Stale) => reply(ReplyStatus::Unavailable, String::new(), "registration was not applied".into()),
            Err((status, hint, reason)) => reply(status, hint, reason),
        }
    }

    async fn heartbeat(&self, req: tonic::Request<pb::HeartbeatRequest>) -> Reply<pb::HeartbeatReply> {
        let lease_id = req.into_inner().lease_id;
        let reply = |status: ReplyStatus, hint: String, reason: String| {
            Ok(tonic::Response::new(pb::HeartbeatReply { status: status as i32, leader_hint: hint, reason }))
        };
        if let Some((status, hint)) = self.redirect() {
            return reply(status, hint, String::new());
        }
        let state = self.0.state_now();
        let Some(w) = state.leased().find(|w| w.lease_id == lease_id) else {
            return reply(ReplyStatus::UnknownLease, String::new(), "no live worker holds this lease: register again".into());
        };
        self.0.inner.leases.lock().unwrap_or_else(|e| e.into_inner()).deadlines.insert(lease_id, Instant::now() + LEASE_TTL);
        if w.state == WorkerState::Joining {
            // Its first heartbeat reached the leader: route to it from now on.
            let cmd = Command::SetWorkerState { id: w.id.clone(), epoch: w.epoch, state: WorkerState::Active };
            if let Err((_, _, why)) = self.propose(cmd).await {
                return reply(ReplyStatus::Unavailable, String::new(), why);
            }
        }
        reply(ReplyStatus::Ok, String::new(), String::new())
    }

    async fn deregister(&self, req: tonic::Request<pb::DeregisterRequest>) -> Reply<pb::DeregisterReply> {
        let r = req.into_inner();
        let reply = |status: ReplyStatus, hint: String, reason: String| {
            Ok(tonic::Response::new(pb::DeregisterReply { status: status as i32, leader_hint: hint, reason }))
        };
        if let Some((status, hint)) = self.redirect() {
            return reply(status, hint, String::new());
        }
        let cmd = Command::SetWorkerState { id: r.worker_id.clone(), epoch: r.epoch, state: WorkerState::Draining };
        match self.propose(cmd).await {
            Ok(Outcome::Applied { .. }) => {
                tracing::info!(worker = %r.worker_id, "worker draining");
                reply(ReplyStatus::Ok, String::new(), String::new())
            }
            Ok(Outcome::Stale) => reply(ReplyStatus::UnknownLease, String::new(), "not registered at this epoch".into()),
            Err((status, hint, reason)) => reply(status, hint, reason),
        }
    }

    async fn join(&self, req: tonic::Request<pb::JoinRequest>) -> Reply<pb::JoinReply> {
        let r = req.into_inner();
        let reply = |status: ReplyStatus, hint: String, reason: String| {
            Ok(tonic::Response::new(pb::JoinReply { status: status as i32, leader_hint: hint, reason }))
        };
        if r.cluster_id != self.0.inner.cluster_id {
            let why = format!("this is cluster `{}`, not `{}`", self.0.inner.cluster_id, r.cluster_id);
            return reply(ReplyStatus::Refused, String::new(), why);
        }
        if r.raft_id == 0 || r.addr.is_empty() {
            return reply(ReplyStatus::Refused, String::new(), "raft_id (≥ 1) and addr are required".into());
        }
        if let Some((status, hint)) = self.redirect() {
            return reply(status, hint, String::new());
        }
        match tokio::time::timeout(PROPOSE_TIMEOUT, self.0.add_router(r.raft_id, r.addr.clone())).await {
            Ok(Ok(())) => {
                tracing::info!(router = r.raft_id, addr = %r.addr, "router joined as a learner");
                reply(ReplyStatus::Ok, String::new(), String::new())
            }
            Ok(Err(e)) => reply(ReplyStatus::Unavailable, String::new(), e.to_string()),
            Err(_) => reply(ReplyStatus::Unavailable, String::new(), "the membership change did not commit in time".into()),
        }
    }

    async fn remove_router(&self, req: tonic::Request<pb::RemoveRouterRequest>) -> Reply<pb::RemoveRouterReply> {
        let r = req.into_inner();
        let reply = |status: ReplyStatus, hint: String, reason: String| {
            Ok(tonic::Response::new(pb::RemoveRouterReply { status: status as i32, leader_hint: hint, reason, voters: vec![] }))
        };
        if r.cluster_id != self.0.inner.cluster_id {
            let why = format!("this is cluster `{}`, not `{}`", self.0.inner.cluster_id, r.cluster_id);
            return reply(ReplyStatus::Refused, String::new(), why);
        }
        if r.raft_id == 0 {
            return reply(ReplyStatus::Refused, String::new(), "raft_id must be ≥ 1".into());
        }
        if let Some((status, hint)) = self.redirect() {
            return reply(status, hint, String::new());
        }
        match tokio::time::timeout(PROPOSE_TIMEOUT, self.0.remove_router(r.raft_id)).await {
            Ok(Ok(())) => {
                // The status is published right after the answer: wait (briefly) for it to show the new voters.
                let mut status = self.0.inner.status.clone();
                let _ = tokio::time::timeout(Duration::from_secs(1), status.wait_for(|s| !s.voters.contains(&r.raft_id))).await;
                let voters = self.0.status().voters;
                tracing::info!(router = r.raft_id, ?voters, "router removed from the raft group");
                Ok(tonic::Response::new(pb::RemoveRouterReply { status: ReplyStatus::Ok as i32, voters, ..Default::default() }))
            }
            Ok(Err(ProposeError::NotLeader { leader })) => {
                let hint = leader.and_then(|l| self.0.inner.transport.addr_of(l)).unwrap_or_default();
                reply(ReplyStatus::NotLeader, hint, "leadership is moving: ask the hinted router".into())
            }
            Ok(Err(ProposeError::Refused(why))) => reply(ReplyStatus::Refused, String::new(), why),
            Ok(Err(e)) => reply(ReplyStatus::Unavailable, String::new(), e.to_string()),
            Err(_) => reply(ReplyStatus::Unavailable, String::new(), "the membership change did not commit in time".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str) -> WorkerSpec {
        WorkerSpec { id: id.into(), addr: format!("http://{id}"), model: "m".into(), tp_size: 1, capacity: 8 }
    }

    #[test]
    fn dead_workers_are_due_after_the_grace_and_only_at_their_dead_epoch() {
        let grace = Duration::from_secs(600);
        let mut s = ClusterState::default();
        s.apply(&Command::UpsertWorker { spec: spec("a:1"), lease_id: 10 });
        s.apply(&Command::UpsertWorker { spec: spec("b:1"), lease_id: 20 });
        let mut clock = DeadClock::default();
        let t0 = Instant::now();
        assert!(clock.due(&s, t0, grace).is_empty(), "nobody is dead");
        let Outcome::Applied { epoch } = s.apply(&Command::ExpireLease { lease_id: 10 }) else { panic!("a live lease expires") };
        // The clock starts when the leader first sees it dead, not before.
        assert!(clock.due(&s, t0 + grace, grace).is_empty());
        assert!(clock.due(&s, t0 + grace + grace / 2, grace).is_empty());
        let due = clock.due(&s, t0 + grace * 2, grace);
        assert_eq!(due, vec![("a:1".to_string(), epoch)]);
        // The removal it leads to is epoch-fenced: it removes the dead registration, and the live worker stays.
        let mut removed = s.clone();
        assert_eq!(removed.apply(&Command::RemoveWorker { id: "a:1".into(), epoch }), Outcome::Applied { epoch });
        assert_eq!(removed.workers.keys().collect::<Vec<_>>(), vec!["b:1"]);
        // Registered again before the removal commits: the removal is stale, and the clock forgets the old death.
        s.apply(&Command::UpsertWorker { spec: spec("a:1"), lease_id: 11 });
        assert_eq!(s.apply(&Command::RemoveWorker { id: "a:1".into(), epoch }), Outcome::Stale);
        assert!(clock.due(&s, t0 + grace * 3, grace).is_empty());
        assert_eq!(s.workers.len(), 2);
    }
}
