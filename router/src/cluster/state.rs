//! The replicated state machine: which workers exist and in what state, and which routers form the group.
//!
//! Pure and deterministic: every router applies the same committed [`Command`]s in the same order and gets the same
//! [`ClusterState`]. Commands travel as JSON in `Entry.data`. Every command about a worker is fenced: `SetWorkerState`
//! and `RemoveWorker` name the epoch they were decided for, `ExpireLease` the lease (one per epoch); a stale one is a
//! no-op. `UpsertWorker` is what hands out a new epoch (the state's `version` after it).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// A worker's stable identity: the address it advertises.
pub type WorkerId = String;

/// A worker's lifecycle in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Registered; not routed to until the leader has seen its first heartbeat.
    Joining,
    /// Routed to.
    Active,
    /// Shutting down: finishes what it has, gets nothing new.
    Draining,
    /// Its lease lapsed (or it left): not routed to until it registers again.
    Dead,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Joining => "joining",
            Self::Active => "active",
            Self::Draining => "draining",
            Self::Dead => "dead",
        }
    }
}

/// One worker as the cluster knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub id: WorkerId,
    /// Its gRPC address, `http://host:port`.
    pub addr: String,
    pub model: String,
    pub tp_size: u32,
    pub capacity: u32,
    /// Bumped by every registration: commands for an older epoch are ignored.
    pub epoch: u64,
    pub lease_id: u64,
    pub state: WorkerState,
}

/// What a worker says about itself when it registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub id: WorkerId,
    pub addr: String,
    pub model: String,
    pub tp_size: u32,
    pub capacity: u32,
}

/// The replicated state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub workers: BTreeMap<WorkerId, WorkerRecord>,
    /// Raft id → raft address of every router in the group (voters and learners).
    pub routers: BTreeMap<u64, String>,
    /// Raft ids removed from the group (and not added again since): their raft messages are refused with a
    /// "removed" answer, which tells a removed router that missed its own removal to stop (as etcd does).
    #[serde(default)]
    pub removed_routers: BTreeSet<u64>,
    /// Bumped by every change; a registration's epoch is the version it made.
    pub version: u64,
}

/// A state change, proposed by the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// (Re-)register a worker: a new epoch, the given lease, state `Joining`.
    UpsertWorker {
        spec: WorkerSpec,
        lease_id: u64,
    },
    SetWorkerState {
        id: WorkerId,
        epoch: u64,
        state: WorkerState,
    },
    /// The lease lapsed: its worker (if still on that lease) becomes `Dead`.
    ExpireLease {
        lease_id: u64,
    },
    RemoveWorker {
        id: WorkerId,
        epoch: u64,
    },
}

/// What applying a command did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Applied; for `UpsertWorker`, the new epoch.
    Applied { epoch: u64 },
    /// Fenced off (stale epoch or lease, unknown worker, or a dead worker asked to change): nothing changed.
    Stale,
}

impl ClusterState {
    /// Applies one committed command.
    pub fn apply(&mut self, cmd: &Command) -> Outcome {
        match cmd {
            Command::UpsertWorker { spec, lease_id } => {
                self.version += 1;
                let rec = WorkerRecord {
                    id: spec.id.clone(),
                    addr: spec.addr.clone(),
                    model: spec.model.clone(),
                    tp_size: spec.tp_size,
                    capacity: spec.capacity,
                    epoch: self.version,
                    lease_id: *lease_id,
                    state: WorkerState::Joining,
                };
                self.workers.insert(spec.id.clone(), rec);
                Outcome::Applied { epoch: self.version }
            }
            Command::SetWorkerState { id, epoch, state } => match self.workers.get_mut(id) {
                Some(w) if w.epoch == *epoch && w.state != WorkerState::Dead && allowed(w.state, *state) => {
                    w.state = *state;
                    self.version += 1;
                    Outcome::Applied { epoch: *epoch }
                }
                _ => Outcome::Stale,
            },
            Command::ExpireLease { lease_id } => {
                match self.workers.values_mut().find(|w| w.lease_id == *lease_id && w.state != WorkerState::Dead) {
                    Some(w) => {
                        w.state = WorkerState::Dead;
                        self.version += 1;
                        Outcome::Applied { epoch: w.epoch }
                    }
                    None => Outcome::Stale,
                }
            }
            Command::RemoveWorker { id, epoch } => match self.workers.get(id) {
                Some(w) if w.epoch == *epoch => {
                    self.workers.remove(id);
                    self.version += 1;
                    Outcome::Applied { epoch: *epoch }
                }
                _ => Outcome::Stale,
            },
        }
    }

    /// A router joined (or changed its address) through a conf change.
    pub fn set_router(&mut self, id: u64, addr: String) {
        self.removed_routers.remove(&id);
        self.routers.insert(id, addr);
        self.version += 1;
    }

    /// A router left the group through a conf change.
    pub fn remove_router(&mut self, id: u64) {
        let was_member = self.routers.remove(&id).is_some();
        if self.removed_routers.insert(id) || was_member {
            self.version += 1;
        }
    }

    /// Dead workers, with the epoch they died in: what the leader's garbage collection removes after a grace period
    /// (`RemoveWorker` at that epoch, so a worker that registered again since is left alone).
    pub fn dead(&self) -> impl Iterator<Item = (&WorkerId, u64)> {
        self.workers.values().filter(|w| w.state == WorkerState::Dead).map(|w| (&w.id, w.epoch))
    }

    /// Workers that hold a live lease (everything not dead): the leases a new leader must keep.
    pub fn leased(&self) -> impl Iterator<Item = &WorkerRecord> {
        self.workers.values().filter(|w| w.state != WorkerState::Dead)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        // A plain data struct with string keys: serialization cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self, serde_json::Error> {
        if b.is_empty() { Ok(Self::default()) } else { serde_json::from_slice(b) }
    }
}

/// Transitions a command may make (a draining worker never becomes active again without registering anew).
fn allowed(from: WorkerState, to: WorkerState) -> bool {
    use WorkerState::*;
    matches!((from, to), (Joining, Active) | (Joining | Active, Draining) | (_, Dead))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str) -> WorkerSpec {
        WorkerSpec { id: id.into(), addr: format!("http://{id}"), model: "m".into(), tp_size: 1, capacity: 8 }
    }

    fn registered(s: &mut ClusterState, id: &str, lease: u64) -> u64 {
        match s.apply(&Command::UpsertWorker { spec: spec(id), lease_id: lease }) {
            Outcome::Applied { epoch } => epoch,
            Outcome::Stale => panic!("upsert is never stale"),
        }
    }

    #[test]
    fn registration_gives_a_new_epoch_each_time() {
        let mut s = ClusterState::default();
        let e1 = registered(&mut s, "a:1", 10);
        let e2 = registered(&mut s, "a:1", 11);
        assert!(e2 > e1);
        let w = &s.workers["a:1"];
        assert_eq!((w.epoch, w.lease_id, w.state), (e2, 11, WorkerState::Joining));
    }

    #[test]
    fn a_stale_epoch_is_a_no_op() {
        let mut s = ClusterState::default();
        let old = registered(&mut s, "a:1", 10);
        let new = registered(&mut s, "a:1", 11);
        let before = s.clone();
        assert_eq!(s.apply(&Command::SetWorkerState { id: "a:1".into(), epoch: old, state: WorkerState::Active }), Outcome::Stale);
        assert_eq!(s.apply(&Command::RemoveWorker { id: "a:1".into(), epoch: old }), Outcome::Stale);
        // The old epoch's lease no longer names this worker.
        assert_eq!(s.apply(&Command::ExpireLease { lease_id: 10 }), Outcome::Stale);
        assert_eq!(s, before);
        assert_eq!(
            s.apply(&Command::SetWorkerState { id: "a:1".into(), epoch: new, state: WorkerState::Active }),
            Outcome::Applied { epoch: new }
        );
        assert_eq!(s.workers["a:1"].state, WorkerState::Active);
    }

    #[test]
    fn an_expired_lease_kills_its_worker_once() {
        let mut s = ClusterState::default();
        let e = registered(&mut s, "a:1", 10);
        registered(&mut s, "b:1", 20);
        assert_eq!(s.apply(&Command::ExpireLease { lease_id: 10 }), Outcome::Applied { epoch: e });
        assert_eq!(s.workers["a:1"].state, WorkerState::Dead);
        assert_eq!(s.workers["b:1"].state, WorkerState::Joining);
        assert_eq!(s.apply(&Command::ExpireLease { lease_id: 10 }), Outcome::Stale);
        // A dead worker comes back only by registering.
        assert_eq!(s.apply(&Command::SetWorkerState { id: "a:1".into(), epoch: e, state: WorkerState::Active }), Outcome::Stale);
        assert_eq!(s.leased().map(|w| w.id.as_str()).collect::<Vec<_>>(), vec!["b:1"]);
    }

    #[test]
    fn draining_does_not_go_back_to_active() {
        let mut s = ClusterState::default();
        let e = registered(&mut s, "a:1", 10);
        let set = |state| Command::SetWorkerState { id: "a:1".into(), epoch: e, state };
        assert_eq!(s.apply(&set(WorkerState::Active)), Outcome::Applied { epoch: e });
        assert_eq!(s.apply(&set(WorkerState::Draining)), Outcome::Applied { epoch: e });
        assert_eq!(s.apply(&set(WorkerState::Active)), Outcome::Stale);
        assert_eq!(s.apply(&Command::RemoveWorker { id: "a:1".into(), epoch: e }), Outcome::Applied { epoch: e });
        assert!(s.workers.is_empty());
    }

    #[test]
    fn removed_routers_are_remembered_until_added_again() {
        let mut s = ClusterState::default();
        s.set_router(1, "a:1".into());
        s.set_router(2, "b:1".into());
        s.remove_router(2);
        assert_eq!(
            (s.routers.keys().copied().collect::<Vec<_>>(), s.removed_routers.iter().copied().collect::<Vec<_>>()),
            (vec![1], vec![2])
        );
        s.set_router(2, "b:2".into());
        assert!(s.removed_routers.is_empty() && s.routers[&2] == "b:2");
        // A state stored before `removed_routers` existed still parses.
        let old = br#"{"workers":{},"routers":{"1":"a:1"},"version":3}"#;
        assert_eq!(ClusterState::from_bytes(old).unwrap().routers.len(), 1);
    }

    #[test]
    fn state_round_trips_through_bytes() {
        let mut s = ClusterState::default();
        registered(&mut s, "a:1", 10);
        s.set_router(1, "127.0.0.1:7001".into());
        assert_eq!(ClusterState::from_bytes(&s.to_bytes()).unwrap(), s);
        assert_eq!(ClusterState::from_bytes(&[]).unwrap(), ClusterState::default());
        let cmd = Command::ExpireLease { lease_id: 3 };
        assert_eq!(serde_json::from_slice::<Command>(&serde_json::to_vec(&cmd).unwrap()).unwrap(), cmd);
    }
}
