//! `GET /v1/cluster`: this router's view of the control plane (readable on every router; followers answer from their
//! applied copy, so it may trail the leader's by a heartbeat).

use axum::Json;
use axum::extract::State;
use axum::routing::get;
use serde_json::{Value, json};

use super::ClusterHandle;

/// The control plane's HTTP routes, to merge into the router's app.
pub fn routes(h: ClusterHandle) -> axum::Router {
    axum::Router::new().route("/v1/cluster", get(cluster)).with_state(h)
}

async fn cluster(State(h): State<ClusterHandle>) -> Json<Value> {
    let status = h.status();
    let state = h.state_now();
    // Lease ages are known on the leader only (leases live in its memory): null elsewhere.
    let ages = h.lease_ages();
    let routers: Vec<Value> = state
        .routers
        .iter()
        .map(|(id, addr)| {
            let role = if status.voters.contains(id) {
                "voter"
            } else if status.learners.contains(id) {
                "learner"
            } else {
                "none"
            };
            json!({"id": id, "addr": addr, "membership": role, "leader": *id == status.leader_id})
        })
        .collect();
    let workers: Vec<Value> = state
        .workers
        .values()
        .map(|w| {
            json!({
                "id": w.id,
                "addr": w.addr,
                "model": w.model,
                "state": w.state.as_str(),
                "epoch": w.epoch,
                "tensor_parallel_size": w.tp_size,
                "capacity": w.capacity,
                "lease_age_ms": ages.get(&w.lease_id).map(|d| d.as_millis() as u64),
            })
        })
        .collect();
    Json(json!({
        "object": "cluster",
        "router_id": status.id,
        "leader_id": (status.leader_id != 0).then_some(status.leader_id),
        "role": status.role,
        "term": status.term,
        "commit_index": status.commit_index,
        "applied_index": status.applied_index,
        "version": state.version,
        "routers": routers,
        "workers": workers,
    }))
}
