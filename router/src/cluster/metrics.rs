//! Prometheus metrics of the control plane (`ferrite_cluster_*`), in their own registry: the router appends their
//! text to `/metrics`.

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

use super::node::RaftStatus;
use super::state::{ClusterState, WorkerState};

/// Cheap to clone (the prometheus handles are shared).
#[derive(Clone)]
pub struct ClusterMetrics {
    registry: Registry,
    term: IntGauge,
    is_leader: IntGauge,
    commit: IntGauge,
    applied: IntGauge,
    workers: IntGaugeVec,
    pub lease_expirations: IntCounter,
    /// Dead workers removed by this leader once their grace ran out.
    pub workers_collected: IntCounter,
    /// Raft messages dropped on the way in (`reason`: unknown_peer, foreign_cluster, bad_message, inbox_full) or out
    /// (queue_full, no_address).
    pub dropped: IntCounterVec,
    /// From a proposal to its entry applied on the leader (committed by a quorum, fsynced).
    pub proposal_seconds: Histogram,
}

impl ClusterMetrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let term = IntGauge::new("ferrite_cluster_raft_term", "Current raft term")?;
        let is_leader = IntGauge::new("ferrite_cluster_raft_is_leader", "1 on the raft leader")?;
        let commit = IntGauge::new("ferrite_cluster_raft_commit_index", "Raft commit index")?;
        let applied = IntGauge::new("ferrite_cluster_raft_applied_index", "Raft applied index")?;
        let workers = IntGaugeVec::new(Opts::new("ferrite_cluster_workers", "Workers by state"), &["state"])?;
        let lease_expirations = IntCounter::new("ferrite_cluster_lease_expirations_total", "Worker leases expired by this leader")?;
        let workers_collected =
            IntCounter::new("ferrite_cluster_workers_collected_total", "Dead workers removed by this leader after their grace")?;
        let dropped = IntCounterVec::new(Opts::new("ferrite_cluster_raft_dropped_total", "Raft messages dropped"), &["reason"])?;
        let buckets = vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
        let proposal_seconds =
            Histogram::with_opts(HistogramOpts::new("ferrite_cluster_proposal_seconds", "Raft proposal to applied").buckets(buckets))?;
        registry.register(Box::new(proposal_seconds.clone()))?;
        registry.register(Box::new(term.clone()))?;
        registry.register(Box::new(is_leader.clone()))?;
        registry.register(Box::new(commit.clone()))?;
        registry.register(Box::new(applied.clone()))?;
        registry.register(Box::new(workers.clone()))?;
        registry.register(Box::new(lease_expirations.clone()))?;
        registry.register(Box::new(dropped.clone()))?;
        registry.register(Box::new(workers_collected.clone()))?;
        Ok(Self { registry, term, is_leader, commit, applied, workers, lease_expirations, workers_collected, dropped, proposal_seconds })
    }

    pub(crate) fn observe(&self, s: &RaftStatus) {
        self.term.set(s.term as i64);
        self.is_leader.set(i64::from(s.is_leader()));
        self.commit.set(s.commit_index as i64);
        self.applied.set(s.applied_index as i64);
    }

    pub(crate) fn observe_state(&self, s: &ClusterState) {
        for st in [WorkerState::Joining, WorkerState::Active, WorkerState::Draining, WorkerState::Dead] {
            let n = s.workers.values().filter(|w| w.state == st).count();
            self.workers.with_label_values(&[st.as_str()]).set(n as i64);
        }
    }

    pub fn drop_counted(&self, reason: &str) {
        self.dropped.with_label_values(&[reason]).inc();
    }

    /// The text exposition of these metrics.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
