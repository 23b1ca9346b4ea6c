//! Raft messages between routers over tonic (`ferrite.cluster.v1.Raft/Send`), each `eraftpb.Message` carried as
//! bytes in raft's own encoding.
//!
//! Outbound: one bounded queue and one sending task per peer. The node thread only `try_send`s: a full queue (a slow
//! or dead peer) drops the message and the node calls `report_unreachable`; raft retransmits. A failed RPC reports
//! the peer unreachable too (and a snapshot as failed). Inbound: a batch from another cluster, or from a raft id that
//! is neither a configured peer nor a router of the replicated state, is dropped and counted; one from a router the
//! group removed is refused with `FAILED_PRECONDITION` (counted as `removed_peer`), which tells that router, if it
//! missed its own removal, to stop (the sending side turns the answer into [`Input::Removed`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrite_common::proto::cluster as pb;
use protobuf::Message as _;
use raft::prelude::{Message, MessageType};
use tokio::sync::mpsc;

use super::metrics::ClusterMetrics;
use super::node::Input;

/// Messages waiting for one peer before new ones are dropped.
const QUEUE: usize = 1024;
/// Messages sent in one RPC at most.
const BATCH: usize = 64;

/// `host:port` or `http://host:port` → an endpoint URI.
pub(crate) fn uri(addr: &str) -> String {
    if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") }
}

struct Peer {
    addr: String,
    tx: mpsc::Sender<Message>,
}

/// The routers' raft transport (see the module docs).
pub struct Transport {
    id: u64,
    cluster_id: String,
    static_peers: BTreeMap<u64, String>,
    /// Routers of the replicated state (they may have joined after this router started).
    routers: Mutex<BTreeMap<u64, String>>,
    /// Routers the replicated state says were removed.
    removed: Mutex<std::collections::BTreeSet<u64>>,
    peers: Mutex<HashMap<u64, Peer>>,
    runtime: tokio::runtime::Handle,
    inbox: SyncSender<Input>,
    metrics: ClusterMetrics,
}

impl Transport {
    pub(crate) fn new(
        id: u64,
        cluster_id: String,
        static_peers: BTreeMap<u64, String>,
        runtime: tokio::runtime::Handle,
        inbox: SyncSender<Input>,
        metrics: ClusterMetrics,
    ) -> Self {
        Self {
            id,
            cluster_id,
            static_peers,
            routers: Mutex::new(BTreeMap::new()),
            removed: Mutex::new(Default::default()),
            peers: Mutex::new(HashMap::new()),
            runtime,
            inbox,
            metrics,
        }
    }

    /// Where router `id` listens: the replicated state's address, else the configured one.
    pub fn addr_of(&self, id: u64) -> Option<String> {
        let routers = self.routers.lock().unwrap_or_else(|e| e.into_inner());
        routers.get(&id).or_else(|| self.static_peers.get(&id)).cloned()
    }

    /// Every router address known (configured or replicated), this one's excluded.
    pub fn peer_addrs(&self) -> Vec<String> {
        let routers = self.routers.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: BTreeMap<u64, String> = self.static_peers.clone();
        all.extend(routers.iter().map(|(k, v)| (*k, v.clone())));
        all.into_iter().filter(|(k, _)| *k != self.id).map(|(_, v)| v).collect()
    }

    /// Whether raft id `id` may send this router messages.
    pub fn is_known(&self, id: u64) -> bool {
        self.static_peers.contains_key(&id) || self.routers.lock().unwrap_or_else(|e| e.into_inner()).contains_key(&id)
    }

    /// Takes the replicated state's routers (called by the node after it applies a change).
    pub(crate) fn set_routers(&self, routers: &BTreeMap<u64, String>, removed: &std::collections::BTreeSet<u64>) {
        *self.routers.lock().unwrap_or_else(|e| e.into_inner()) = routers.clone();
        *self.removed.lock().unwrap_or_else(|e| e.into_inner()) = removed.clone();
    }

    /// Queues `m` for its peer; false when it was dropped (no address, or the queue is full).
    pub(crate) fn send(&self, m: Message) -> bool {
        let to = m.to;
        let Some(addr) = self.addr_of(to) else {
            self.metrics.drop_counted("no_address");
            return false;
        };
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let peer = match peers.get(&to) {
            Some(p) if p.addr == addr && !p.tx.is_closed() => p,
            _ => {
                let (tx, rx) = mpsc::channel(QUEUE);
                let task =
                    PeerTask { to, from: self.id, cluster_id: self.cluster_id.clone(), addr: addr.clone(), inbox: self.inbox.clone() };
                self.runtime.spawn(task.run(rx));
                peers.insert(to, Peer { addr, tx });
                &peers[&to]
            }
        };
        match peer.tx.try_send(m) {
            Ok(()) => true,
            Err(_) => {
                self.metrics.drop_counted("queue_full");
                false
            }
        }
    }

    /// Handles an inbound batch (the `Raft.Send` service).
    pub(crate) fn receive(&self, batch: pb::RaftBatch) -> Result<(), tonic::Status> {
        if batch.cluster_id != self.cluster_id {
            self.metrics.drop_counted("foreign_cluster");
            return Err(tonic::Status::permission_denied(format!(
                "this router belongs to cluster `{}`, not `{}`",
                self.cluster_id, batch.cluster_id
            )));
        }
        if self.removed.lock().unwrap_or_else(|e| e.into_inner()).contains(&batch.from) {
            self.metrics.drop_counted("removed_peer");
            return Err(tonic::Status::failed_precondition(format!("raft id {} was removed from the group", batch.from)));
        }
        if !self.is_known(batch.from) {
            self.metrics.drop_counted("unknown_peer");
            tracing::debug!(from = batch.from, "raft messages from an unknown router dropped");
            return Err(tonic::Status::permission_denied(format!("raft id {} is not a known peer", batch.from)));
        }
        for bytes in batch.messages {
            let mut m = Message::default();
            if m.merge_from_bytes(&bytes).is_err() || m.from != batch.from || m.to != self.id {
                self.metrics.drop_counted("bad_message");
                continue;
            }
            if self.inbox.try_send(Input::Raft(m)).is_err() {
                self.metrics.drop_counted("inbox_full");
            }
        }
        Ok(())
    }
}

struct PeerTask {
    to: u64,
    from: u64,
    cluster_id: String,
    addr: String,
    inbox: SyncSender<Input>,
}

impl PeerTask {
    async fn run(self, mut rx: mpsc::Receiver<Message>) {
        let endpoint = match tonic::transport::Endpoint::from_shared(uri(&self.addr)) {
            Ok(e) => e.connect_timeout(Duration::from_secs(1)).timeout(Duration::from_secs(5)),
            Err(e) => {
                tracing::error!(peer = self.to, addr = %self.addr, error = %e, "bad router address");
                return;
            }
        };
        let mut client = pb::raft_client::RaftClient::new(endpoint.connect_lazy());
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            let snapshots = batch.iter().filter(|m| m.get_msg_type() == MessageType::MsgSnapshot).count();
            let messages = batch.iter().filter_map(|m| m.write_to_bytes().ok()).collect();
            let req = pb::RaftBatch { cluster_id: self.cluster_id.clone(), from: self.from, messages };
            let ok = match client.send(req).await {
                Ok(_) => true,
                Err(e) if e.code() == tonic::Code::FailedPrecondition => {
                    let _ = self.inbox.try_send(Input::Removed { by: self.to });
                    false
                }
                Err(e) => {
                    tracing::debug!(peer = self.to, error = %e, "raft send failed");
                    let _ = self.inbox.try_send(Input::Unreachable(self.to));
                    false
                }
            };
            for _ in 0..snapshots {
                let _ = self.inbox.try_send(Input::SnapshotStatus { to: self.to, ok });
            }
        }
    }
}

/// The `Raft` gRPC service.
pub(crate) struct RaftService(pub Arc<Transport>);

#[tonic::async_trait]
impl pb::raft_server::Raft for RaftService {
    async fn send(&self, req: tonic::Request<pb::RaftBatch>) -> Result<tonic::Response<pb::SendAck>, tonic::Status> {
        self.0.receive(req.into_inner())?;
        Ok(tonic::Response::new(pb::SendAck {}))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn a_removed_routers_messages_are_refused_as_removed() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let (inbox, _rx) = std::sync::mpsc::sync_channel(8);
        let peers = BTreeMap::from([(2, "127.0.0.1:2".to_string()), (3, "127.0.0.1:3".to_string())]);
        let t = Transport::new(1, "c".into(), peers, rt.handle().clone(), inbox, ClusterMetrics::new().unwrap());
        let batch = |from| pb::RaftBatch { cluster_id: "c".into(), from, messages: vec![] };
        assert!(t.receive(batch(2)).is_ok(), "a configured peer, not removed");
        // Router 2 left the group: still a configured peer, but its messages get the answer that stops it.
        t.set_routers(&BTreeMap::from([(1, "127.0.0.1:1".into()), (3, "127.0.0.1:3".into())]), &BTreeSet::from([2]));
        let e = t.receive(batch(2)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
        assert!(t.receive(batch(3)).is_ok());
        assert_eq!(t.receive(batch(9)).unwrap_err().code(), tonic::Code::PermissionDenied);
    }
}
