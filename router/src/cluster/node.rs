//! The raft node: one std thread owns the `RawNode` and everything it touches (storage, applied state, pending
//! proposals), so there are no locks around raft.
//!
//! The thread ticks every 100 ms and drains an mpsc of [`Input`]s (messages from peers, proposals, router joins). Each
//! `Ready` is handled in raft-rs's example order (`tikv/raft-rs:examples/five_mem_node`): send `messages` → apply the
//! snapshot → apply committed entries → persist entries and hard state (fsynced) → send `persisted_messages` →
//! `advance` → the light ready's commit, messages and entries → `advance_apply`; then the applied state is stored and,
//! every [`COMPACT_EVERY`](super::storage::COMPACT_EVERY) entries, compacted.
//!
//! Proposals carry `(proposer raft id, random id)` in the entry context and are answered when that entry applies
//! (never by FIFO order); when the role or term changes every pending proposal fails with
//! [`ProposeError::NotLeader`], since its entry may never commit. The leader promotes a learner to voter once it has
//! caught up with the commit index.
//!
//! Removing a router ([`Input::RemoveRouter`]) is refused for an id outside the group and for the last voter; asked
//! of the leader about itself, the leader first transfers leadership to its most caught-up voter (raft-rs leaves a
//! leader that removed itself in an untested state) and answers `NotLeader` with that voter. A router learns it was
//! removed when it applies its own removal, or when a peer refuses its messages as a removed router's
//! ([`Input::Removed`], through the transport): its status says `removed` and the router process exits.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::prelude::{ConfChange, ConfChangeSingle, ConfChangeType, ConfChangeV2, Entry, EntryType, Message, Snapshot};
use raft::{RawNode, StateRole};
use serde::Serialize;
use tokio::sync::{oneshot, watch};

use super::metrics::ClusterMetrics;
use super::state::{ClusterState, Command, Outcome};
use super::storage::{ClusterStorage, DataDirError};
use super::transport::Transport;

const TICK: Duration = Duration::from_millis(100);

/// Why a proposal did not apply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    #[error("this router is not the raft leader (leader: {leader:?})")]
    NotLeader { leader: Option<u64> },
    #[error("the proposal was dropped: {0}")]
    Dropped(String),
    #[error("the raft node has stopped")]
    Stopped,
    /// Refused for good (the reason says why).
    #[error("{0}")]
    Refused(String),
}

/// What the node thread is asked to do.
pub(crate) enum Input {
    Raft(Message),
    Propose {
        cmd: Command,
        reply: oneshot::Sender<Result<Outcome, ProposeError>>,
    },
    /// Add a router as a learner (promoted to voter once caught up); answered when the change applies.
    AddRouter {
        id: u64,
        addr: String,
        reply: oneshot::Sender<Result<(), ProposeError>>,
    },
    RemoveRouter {
        id: u64,
        reply: oneshot::Sender<Result<(), ProposeError>>,
    },
    Unreachable(u64),
    /// A peer refused this router's messages: it was removed from the group.
    Removed {
        by: u64,
    },
    SnapshotStatus {
        to: u64,
        ok: bool,
    },
}

/// The node's raft status, published after every loop turn.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RaftStatus {
    pub id: u64,
    /// 0 while no leader is known.
    pub leader_id: u64,
    pub term: u64,
    pub role: &'static str,
    pub commit_index: u64,
    pub applied_index: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// Set when the node stopped for good (a storage write failed): the router must exit.
    pub failed: Option<String>,
    /// This router was removed from the group: it takes no further part, and the router exits.
    pub removed: bool,
}

impl RaftStatus {
    pub fn is_leader(&self) -> bool {
        self.leader_id == self.id && self.role == "leader"
    }

    /// Whether this router is in a raft group yet (bootstrapped, or joined and caught up from a snapshot).
    pub fn initialized(&self) -> bool {
        !self.voters.is_empty() || !self.learners.is_empty()
    }
}

enum Pending {
    Cmd(oneshot::Sender<Result<Outcome, ProposeError>>),
    Conf(oneshot::Sender<Result<(), ProposeError>>),
}

impl Pending {
    fn fail(self, e: ProposeError) {
        match self {
            Pending::Cmd(r) => drop(r.send(Err(e))),
            Pending::Conf(r) => drop(r.send(Err(e))),
        }
    }
}

pub(crate) struct Node {
    id: u64,
    raw: RawNode<ClusterStorage>,
    inbox: Receiver<Input>,
    transport: Arc<Transport>,
    state: ClusterState,
    pending: HashMap<u64, Pending>,
    /// Answers for proposals applied in this ready, sent once the new state is published (so a caller that reads the
    /// state right after its answer sees its own change).
    answers: Vec<(Pending, Result<Outcome, ProposeError>)>,
    state_tx: watch::Sender<ClusterState>,
    status_tx: watch::Sender<RaftStatus>,
    metrics: ClusterMetrics,
    role: (StateRole, u64),
    removed: bool,
}

/// Raft's settings for the routers (see ARCHITECTURE: 100 ms ticks, elections after 1–2 s).
pub(crate) fn raft_config(id: u64, applied: u64) -> raft::Config {
    raft::Config {
        id,
        election_tick: 10,
        heartbeat_tick: 3,
        pre_vote: true,
        check_quorum: true,
        applied,
        max_size_per_msg: 1 << 20,
        max_inflight_msgs: 256,
        ..Default::default()
    }
}

/// The single-voter snapshot `--bootstrap` starts a new group from (as raft-rs's example leader does).
pub(crate) fn bootstrap_snapshot(id: u64, addr: &str) -> Snapshot {
    let mut state = ClusterState::default();
    state.set_router(id, addr.to_string());
    let mut s = Snapshot::default();
    s.mut_metadata().index = 1;
    s.mut_metadata().term = 1;
    s.mut_metadata().mut_conf_state().voters = vec![id];
    s.set_data(state.to_bytes().into());
    s
}

fn proposal_context(proposer: u64, id: u64) -> Vec<u8> {
    let mut c = proposer.to_le_bytes().to_vec();
    c.extend_from_slice(&id.to_le_bytes());
    c
}

impl Node {
    pub(crate) fn new(
        raw: RawNode<ClusterStorage>,
        inbox: Receiver<Input>,
        transport: Arc<Transport>,
        state_tx: watch::Sender<ClusterState>,
        status_tx: watch::Sender<RaftStatus>,
        metrics: ClusterMetrics,
    ) -> Result<Self, DataDirError> {
        let state = ClusterState::from_bytes(raw.store().applied_state())
            .map_err(|e| DataDirError::Write(format!("the stored cluster state does not parse: {e}")))?;
        transport.set_routers(&state.routers, &state.removed_routers);
        metrics.observe_state(&state);
        state_tx.send_replace(state.clone());
        let role = (raw.raft.state, raw.raft.term);
        Ok(Self {
            id: raw.raft.id,
            raw,
            inbox,
            transport,
            state,
            pending: HashMap::new(),
            answers: Vec::new(),
            state_tx,
            status_tx,
            metrics,
            role,
            removed: false,
        })
    }

    /// Runs until every sender of the inbox is gone, or a storage write fails (then the status says so).
    pub(crate) fn run(mut self) {
        let mut next_tick = Instant::now() + TICK;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match self.inbox.recv_timeout(wait) {
                Ok(input) => {
                    self.handle(input);
                    while let Ok(input) = self.inbox.try_recv() {
                        self.handle(input);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if Instant::now() >= next_tick {
                self.raw.tick();
                next_tick += TICK;
                if next_tick < Instant::now() {
                    next_tick = Instant::now() + TICK;
                }
            }
            if let Err(e) = self.on_ready() {
                tracing::error!(error = %e, "raft storage failed: the raft node stops");
                for (_, p) in self.pending.drain() {
                    p.fail(ProposeError::Stopped);
                }
                self.status_tx.send_modify(|s| s.failed = Some(e.to_string()));
                return;
            }
            self.after_turn();
        }
    }

    fn not_leader(&self) -> Option<ProposeError> {
        (self.raw.raft.state != StateRole::Leader)
            .then(|| ProposeError::NotLeader { leader: (self.raw.raft.leader_id != 0).then_some(self.raw.raft.leader_id) })
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Raft(m) => {
                if let Err(e) = self.raw.step(m) {
                    tracing::debug!(error = %e, "raft message not stepped");
                }
            }
            Input::Propose { cmd, reply } => {
                if let Some(e) = self.not_leader() {
                    let _ = reply.send(Err(e));
                    return;
                }
                let id = rand::random::<u64>();
                let data = match serde_json::to_vec(&cmd) {
                    Ok(d) => d,
                    Err(e) => return drop(reply.send(Err(ProposeError::Dropped(e.to_string())))),
                };
                match self.raw.propose(proposal_context(self.id, id), data) {
                    Ok(()) => {
                        self.pending.insert(id, Pending::Cmd(reply));
                    }
                    Err(e) => drop(reply.send(Err(ProposeError::Dropped(e.to_string())))),
                }
            }
            Input::AddRouter { id, addr, reply } => {
                if let Some(e) = self.not_leader() {
                    return drop(reply.send(Err(e)));
                }
                let cs = self.raw.store().conf_state();
                if cs.voters.contains(&id) || cs.learners.contains(&id) {
                    return drop(reply.send(Ok(())));
                }
                self.propose_conf(ConfChangeType::AddLearnerNode, id, addr, Some(reply));
            }
            Input::RemoveRouter { id, reply } => {
                if let Some(e) = self.not_leader() {
                    return drop(reply.send(Err(e)));
                }
                if let Err(e) = self.check_removal(id) {
                    return drop(reply.send(Err(e)));
                }
                self.propose_conf(ConfChangeType::RemoveNode, id, String::new(), Some(reply));
            }
            Input::Removed { by } => {
                if !self.removed {
                    tracing::warn!(peer = by, "a peer says this router was removed from the raft group: it stops taking part");
                    self.removed = true;
                }
            }
            Input::Unreachable(to) => self.raw.report_unreachable(to),
            Input::SnapshotStatus { to, ok } => {
                let status = if ok { raft::SnapshotStatus::Finish } else { raft::SnapshotStatus::Failure };
                self.raw.report_snapshot(to, status);
            }
        }
    }

    /// Whether the leader may remove router `id` now: `Refused` for an unknown id or the last voter; `NotLeader` naming
    /// the voter that leadership is being handed to when `id` is this leader.
    fn check_removal(&mut self, id: u64) -> Result<(), ProposeError> {
        let cs = self.raw.store().conf_state();
        if cs.learners.contains(&id) {
            return Ok(());
        }
        if !cs.voters.contains(&id) {
            return Err(ProposeError::Refused(format!(
                "router {id} is not in the raft group (voters {:?}, learners {:?})",
                cs.voters, cs.learners
            )));
        }
        if cs.voters.len() == 1 {
            return Err(ProposeError::Refused(format!("router {id} is the group's last voter: the cluster would have no members")));
        }
        if id != self.id {
            return Ok(());
        }
        // This leader is asked to remove itself: hand leadership to the most caught-up other voter first.
        let to = cs.voters.iter().copied().filter(|v| *v != self.id).max_by_key(|v| self.raw.raft.prs().get(*v).map_or(0, |p| p.matched));
        if let Some(to) = to {
            tracing::info!(to, "asked to remove this leader: transferring leadership first");
            self.raw.transfer_leader(to);
        }
        Err(ProposeError::NotLeader { leader: to })
    }

    fn propose_conf(&mut self, kind: ConfChangeType, node: u64, addr: String, reply: Option<oneshot::Sender<Result<(), ProposeError>>>) {
        if self.raw.raft.has_pending_conf() {
            if let Some(r) = reply {
                let _ = r.send(Err(ProposeError::Dropped("another membership change is in progress".into())));
            }
            return;
        }
        let mut single = ConfChangeSingle::default();
        single.set_change_type(kind);
        single.node_id = node;
        let mut cc = ConfChangeV2::default();
        cc.set_changes(vec![single].into());
        cc.set_context(addr.into_bytes().into());
        let id = rand::random::<u64>();
        match self.raw.propose_conf_change(proposal_context(self.id, id), cc) {
            Ok(()) => {
                if let Some(r) = reply {
                    self.pending.insert(id, Pending::Conf(r));
                }
            }
            Err(e) => {
                if let Some(r) = reply {
                    let _ = r.send(Err(ProposeError::Dropped(e.to_string())));
                }
            }
        }
    }

    fn send(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            let to = m.to;
            let snapshot = m.get_msg_type() == raft::prelude::MessageType::MsgSnapshot;
            if !self.transport.send(m) {
                self.raw.report_unreachable(to);
                if snapshot {
                    self.raw.report_snapshot(to, raft::SnapshotStatus::Failure);
                }
            }
        }
    }

    fn on_ready(&mut self) -> Result<(), DataDirError> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let before = self.state.version;
        let mut ready = self.raw.ready();
        if !ready.messages().is_empty() {
            self.send(ready.take_messages());
        }
        let mut applied = None;
        if *ready.snapshot() != Snapshot::default() {
            let snap = ready.snapshot().clone();
            self.state = ClusterState::from_bytes(snap.get_data())
                .map_err(|e| DataDirError::Write(format!("a snapshot's cluster state does not parse: {e}")))?;
            self.raw.mut_store().apply_snapshot(snap)?;
        }
        self.apply(ready.take_committed_entries(), &mut applied)?;
        if !ready.entries().is_empty() || ready.hs().is_some() {
            self.raw.mut_store().persist(ready.entries(), ready.hs())?;
        }
        if !ready.persisted_messages().is_empty() {
            self.send(ready.take_persisted_messages());
        }
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit)?;
        }
        self.send(light.take_messages());
        self.apply(light.take_committed_entries(), &mut applied)?;
        self.raw.advance_apply();
        if let Some(index) = applied {
            let store = self.raw.mut_store();
            store.set_applied(index, self.state.to_bytes())?;
            if store.should_compact() {
                store.compact()?;
                tracing::debug!(index, "raft log compacted");
            }
        }
        if self.state.version != before || applied.is_some() {
            self.transport.set_routers(&self.state.routers, &self.state.removed_routers);
            self.metrics.observe_state(&self.state);
            self.state_tx.send_if_modified(|s| {
                let changed = *s != self.state;
                if changed {
                    *s = self.state.clone();
                }
                changed
            });
        }
        for (p, result) in self.answers.drain(..) {
            match p {
                Pending::Cmd(r) => drop(r.send(result)),
                Pending::Conf(r) => drop(r.send(result.map(|_| ()))),
            }
        }
        Ok(())
    }

    fn take_pending(&mut self, context: &[u8]) -> Option<Pending> {
        let proposer = u64::from_le_bytes(context.get(..8)?.try_into().ok()?);
        let id = u64::from_le_bytes(context.get(8..16)?.try_into().ok()?);
        if proposer != self.id {
            return None;
        }
        self.pending.remove(&id)
    }

    fn apply(&mut self, entries: Vec<Entry>, applied: &mut Option<u64>) -> Result<(), DataDirError> {
        for e in entries {
            *applied = Some(e.index);
            match e.get_entry_type() {
                EntryType::EntryNormal => {
                    if e.data.is_empty() {
                        continue; // a new leader's empty entry
                    }
                    let result = match serde_json::from_slice::<Command>(&e.data) {
                        Ok(cmd) => Ok(self.state.apply(&cmd)),
                        Err(err) => {
                            tracing::warn!(index = e.index, error = %err, "a committed entry is not a command this build knows; skipped");
                            Err(ProposeError::Dropped(format!("unknown command: {err}")))
                        }
                    };
                    if let Some(p) = self.take_pending(&e.context) {
                        self.answers.push((p, result));
                    }
                }
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    let cc = if e.get_entry_type() == EntryType::EntryConfChange {
                        let mut v1 = ConfChange::default();
                        v1.merge_from_bytes(&e.data).map_err(|x| DataDirError::Write(x.to_string()))?;
                        // raft-rs proposes none itself; converted by hand (raft-proto's ConfChangeI is not re-exported).
                        let mut single = ConfChangeSingle::default();
                        single.set_change_type(v1.get_change_type());
                        single.node_id = v1.node_id;
                        let mut v2 = ConfChangeV2::default();
                        v2.set_changes(vec![single].into());
                        v2.set_context(v1.take_context());
                        v2
                    } else {
                        let mut v2 = ConfChangeV2::default();
                        v2.merge_from_bytes(&e.data).map_err(|x| DataDirError::Write(x.to_string()))?;
                        v2
                    };
                    let result = match self.raw.apply_conf_change(&cc) {
                        Ok(cs) => {
                            let addr = String::from_utf8_lossy(cc.get_context()).into_owned();
                            for c in cc.get_changes() {
                                match c.get_change_type() {
                                    ConfChangeType::AddNode | ConfChangeType::AddLearnerNode if !addr.is_empty() => {
                                        self.state.set_router(c.node_id, addr.clone())
                                    }
                                    ConfChangeType::RemoveNode => {
                                        self.state.remove_router(c.node_id);
                                        if c.node_id == self.id {
                                            tracing::warn!("this router was removed from the raft group: it stops taking part");
                                            self.removed = true;
                                        }
                                    }
                                    _ => {}
                                }
                            }
                            tracing::info!(voters = ?cs.voters, learners = ?cs.learners, "raft membership changed");
                            self.raw.mut_store().set_conf_state(cs);
                            Ok(())
                        }
                        Err(err) => {
                            tracing::warn!(error = %err, "a membership change was refused");
                            Err(ProposeError::Dropped(err.to_string()))
                        }
                    };
                    if let Some(p) = self.take_pending(&e.context) {
                        self.answers.push((p, result.map(|()| Outcome::Applied { epoch: 0 })));
                    }
                }
            }
        }
        Ok(())
    }

    /// Fails pending proposals on a role or term change, promotes caught-up learners, publishes the status.
    fn after_turn(&mut self) {
        let role = (self.raw.raft.state, self.raw.raft.term);
        if role != self.role {
            self.role = role;
            let leader = (self.raw.raft.leader_id != 0).then_some(self.raw.raft.leader_id);
            for (_, p) in self.pending.drain() {
                p.fail(ProposeError::NotLeader { leader });
            }
        }
        if self.raw.raft.state == StateRole::Leader && !self.raw.raft.has_pending_conf() {
            let committed = self.raw.raft.raft_log.committed;
            let ready = self
                .raw
                .store()
                .conf_state()
                .learners
                .iter()
                .copied()
                .find(|l| self.raw.raft.prs().get(*l).is_some_and(|p| p.matched >= committed));
            if let Some(l) = ready {
                let addr = self.state.routers.get(&l).cloned().unwrap_or_default();
                tracing::info!(router = l, "promoting a caught-up learner to voter");
                self.propose_conf(ConfChangeType::AddNode, l, addr, None);
            }
        }
        let cs = self.raw.store().conf_state();
        let status = RaftStatus {
            id: self.id,
            leader_id: self.raw.raft.leader_id,
            term: self.raw.raft.term,
            role: match self.raw.raft.state {
                StateRole::Leader => "leader",
                StateRole::Follower => "follower",
                StateRole::Candidate => "candidate",
                StateRole::PreCandidate => "pre_candidate",
            },
            commit_index: self.raw.raft.raft_log.committed,
            applied_index: self.raw.raft.raft_log.applied,
            voters: cs.voters.clone(),
            learners: cs.learners.clone(),
            failed: None,
            removed: self.removed,
        };
        self.metrics.observe(&status);
        self.status_tx.send_if_modified(|s| {
            let changed = *s != status;
            if changed {
                *s = status;
            }
            changed
        });
    }
}
