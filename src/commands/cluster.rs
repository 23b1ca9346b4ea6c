//! `ferrite cluster`: operator commands against a running router cluster's raft listeners.
//!
//! `remove-router --id N --via HOST:PORT[,...]` asks the routers, in turn, to take raft id N out of the group. A
//! follower's NOT_LEADER hint is followed; asked of the leader about itself, the leader hands leadership over and
//! hints at its successor. Every attempt is bounded (`--timeout`), and so is their number (`--attempts`, half a second
//! apart); a refusal (unknown id, the last voter, another cluster) is final and printed with its reason.

use std::time::Duration;

use anyhow::{Context, bail};
use ferrite_common::proto::cluster as pb;
use pb::ReplyStatus;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    command: Sub,
}

#[derive(clap::Subcommand, Debug)]
enum Sub {
    /// Remove a router from the raft group (it exits once it learns of it). Take it out of the load balancer first.
    RemoveRouter(RemoveRouter),
}

#[derive(clap::Args, Debug)]
struct RemoveRouter {
    /// Raft id of the router to remove.
    #[arg(long)]
    id: u64,
    /// Raft listener(s) of routers of the cluster, `HOST:PORT` (repeatable or comma-separated): any member will do.
    #[arg(long, env = "FERRITE_CLUSTER_VIA", value_delimiter = ',', required = true)]
    via: Vec<String>,
    /// The cluster's name (`ferrite router --cluster-id`).
    #[arg(long, env = "FERRITE_CLUSTER_ID", default_value = "ferrite")]
    cluster_id: String,
    /// Attempts at most (each a router asked once).
    #[arg(long, default_value_t = 20)]
    attempts: u32,
    /// Seconds one attempt may take.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    match a.command {
        Sub::RemoveRouter(r) => rt.block_on(remove_router(r)),
    }
}

fn uri(addr: &str) -> String {
    if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") }
}

async fn ask(addr: &str, req: pb::RemoveRouterRequest, timeout: Duration) -> anyhow::Result<pb::RemoveRouterReply> {
    let ep = tonic::transport::Endpoint::from_shared(uri(addr)).with_context(|| format!("`{addr}` is not an address"))?;
    let channel = ep.connect_timeout(Duration::from_secs(2)).timeout(timeout).connect().await?;
    Ok(pb::cluster_client::ClusterClient::new(channel).remove_router(req).await?.into_inner())
}

async fn remove_router(a: RemoveRouter) -> anyhow::Result<()> {
    if a.id == 0 {
        bail!("--id must be ≥ 1");
    }
    if a.via.iter().all(|v| v.trim().is_empty()) {
        bail!("--via needs at least one router's raft address");
    }
    let timeout = Duration::from_secs(a.timeout.clamp(1, 600));
    let mut hint: Option<String> = None;
    let mut last = String::from("no router answered");
    for turn in 0..a.attempts.max(1) {
        let addr = hint.take().unwrap_or_else(|| a.via[turn as usize % a.via.len()].trim().to_string());
        let req = pb::RemoveRouterRequest { cluster_id: a.cluster_id.clone(), raft_id: a.id };
        match ask(&addr, req, timeout).await {
            Ok(r) => match ReplyStatus::try_from(r.status) {
                Ok(ReplyStatus::Ok) => {
                    println!("router {} removed from the raft group (voters now {:?})", a.id, r.voters);
                    return Ok(());
                }
                Ok(ReplyStatus::Refused) => bail!("{addr} refused to remove router {}: {}", a.id, r.reason),
                Ok(ReplyStatus::NotLeader) => {
                    last = format!("{addr} is not the leader {}", r.reason);
                    hint = (!r.leader_hint.is_empty()).then_some(r.leader_hint);
                    tracing::info!(via = %addr, leader = ?hint, "not the leader");
                    if hint.is_some() {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue; // follow the hint
                    }
                }
                _ => {
                    last = format!("{addr}: {}", r.reason);
                    tracing::info!(via = %addr, reason = %r.reason, "not removed yet; retrying");
                }
            },
            Err(e) => {
                last = format!("{addr}: {e:#}");
                tracing::info!(via = %addr, error = %format!("{e:#}"), "attempt failed");
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bail!("router {} was not removed after {} attempts; last answer: {last}", a.id, a.attempts.max(1))
}
