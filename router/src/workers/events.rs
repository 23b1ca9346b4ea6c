//! One task per worker (its "pump"): checks the worker's `Info` against the pool (hash version, block size, model
//! fingerprint: a worker that differs is refused, logged and checked again later), then keeps its `KvEvents` stream
//! open and feeds the KV index (cache-aware routing only) and the worker's last `LoadReport` (every policy: the
//! eligibility rule reads it).
//!
//! After a broken stream the pump checks `Info` again and resumes from the last applied sequence number; a worker
//! that cannot be reached is purged from the index (and its load forgotten), counts as a hard failure for its
//! circuit breaker, and is retried with backoff from 0 (a resync). A restarted worker process is a new instance
//! (`WorkerInfo.instance_id`): its old entries are purged and its stream starts with a resync, however quickly it came
//! back (sequence numbers of two instances are never compared).
//!
//! A worker that answers `KvEvents` with `UNIMPLEMENTED`, or every worker under `--kv-events off`, is tracked
//! approximately ([`super::approx`]): its block events are ignored (the stream, if any, still brings its load).

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use ferrite_common::hash::HASH_VERSION;
use ferrite_common::proto::worker as pb;
use ferrite_common::proto::worker::kv_event::E;

use super::slot::{Verified, WorkerSlot};
use super::{Identity, Inner, KvEventsMode};
use crate::policy::Routing;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long `Info` may take before the worker counts as unreachable (a black-holed address never answers).
const INFO_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs until the worker is removed or the pool is dropped.
pub(super) async fn pump(pool: Weak<Inner>, slot: Arc<WorkerSlot>) {
    let mut since = 0u64;
    // The worker process `since` counts in (`WorkerInfo.instance_id`; 0 before the first `Info`).
    let mut instance = 0u64;
    let mut backoff = BACKOFF_MIN;
    let mut unreachable_logged = false;
    loop {
        if slot.is_removed() {
            return;
        }
        let mut client = slot.client.clone();
        // When the attempt that may fail began (a failure older than the worker's last answer is stale).
        let mut attempt = Instant::now();
        let info = tokio::time::timeout(INFO_TIMEOUT, client.info(pb::InfoRequest {})).await;
        let Some(inner) = pool.upgrade() else { return };
        let opened = match info {
            Ok(Ok(info)) => match check(&inner, info.get_ref()) {
                Ok(()) => {
                    let id = info.get_ref().instance_id;
                    if id != instance {
                        if instance != 0 {
                            tracing::info!(worker = %slot.addr, "the worker restarted (a new instance): resyncing its KV index");
                        }
                        // The previous instance's blocks are gone with it.
                        if !slot.is_approximate() {
                            inner.index.purge(slot.id);
                            slot.approx_clear();
                        }
                        since = 0;
                        instance = id;
                    }
                    super::joined(&slot);
                    unreachable_logged = false;
                    slot.breaker_success();
                    let exact = inner.cfg.kv_events == KvEventsMode::On;
                    drop(inner);
                    attempt = Instant::now();
                    match client.kv_events(pb::KvEventsRequest { since_seq: since, instance_id: instance }).await {
                        Ok(resp) => {
                            track(&pool, &slot, !exact);
                            Ok(resp)
                        }
                        Err(s) if s.code() == tonic::Code::Unimplemented => {
                            // Another engine behind the same protocol: route on our own guesses, and look again
                            // later (the address may be taken over by a worker that has the stream).
                            track(&pool, &slot, true);
                            since = 0;
                            tokio::time::sleep(BACKOFF_MAX).await;
                            continue;
                        }
                        Err(s) => Err(s.to_string()),
                    }
                }
                Err(reason) => {
                    if slot.set_verified(Verified::Refused) != Verified::Refused {
                        tracing::warn!(worker = %slot.addr, reason, "worker refused: kept out of routing (checked again later)");
                    }
                    inner.index.purge(slot.id);
                    slot.approx_clear();
                    slot.set_load(None);
                    since = 0;
                    drop(inner);
                    tokio::time::sleep(BACKOFF_MAX).await;
                    continue;
                }
            },
            Ok(Err(s)) => Err(s.to_string()),
            Err(_) => Err(format!("no answer to Info within {INFO_TIMEOUT:?}")),
        };
        match opened {
            Ok(resp) => {
                backoff = BACKOFF_MIN;
                let mut stream = resp.into_inner();
                loop {
                    let msg = stream.message().await;
                    let Some(inner) = pool.upgrade() else { return };
                    if slot.is_removed() {
                        return;
                    }
                    match msg {
                        Ok(Some(batch)) => match apply(&inner, &slot, since, &batch) {
                            Some(s) => since = s,
                            None => {
                                tracing::warn!(worker = %slot.addr, since, first_seq = batch.first_seq, "KvEvents gap: resyncing");
                                if !slot.is_approximate() {
                                    inner.index.purge(slot.id);
                                    slot.approx_clear();
                                }
                                since = 0;
                                break;
                            }
                        },
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(worker = %slot.addr, error = %e, "KvEvents stream broke; resuming");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                let Some(inner) = pool.upgrade() else { return };
                if !unreachable_logged {
                    tracing::warn!(worker = %slot.addr, error = %e, "worker unreachable: dropping its index entries, retrying");
                    unreachable_logged = true;
                }
                // A worker never reached yet (still starting) is not routable anyway: only one that was counts.
                if slot.verified() == Verified::Ok {
                    slot.breaker_failure(true, attempt);
                }
                inner.index.purge(slot.id);
                slot.approx_clear();
                slot.set_load(None);
                since = 0;
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Switches `slot` to approximate (`true`) or exact tracking, purging its index entries when that changes.
fn track(pool: &Weak<Inner>, slot: &WorkerSlot, approximate: bool) {
    if slot.set_approximate(approximate) != approximate {
        if let Some(inner) = pool.upgrade() {
            inner.index.purge(slot.id);
        }
        if approximate {
            tracing::info!(worker = %slot.addr, "no KV events from this worker: its prefix cache is tracked approximately");
        } else {
            tracing::info!(worker = %slot.addr, "KV events from this worker: its prefix cache is tracked exactly");
        }
    }
}

/// Whether a worker's `Info` fits the pool: our hash version, the configured model (if any), and the same
/// fingerprint and block size as the first worker that fit (which sets the pool's block hasher).
pub(super) fn check(inner: &Inner, info: &pb::WorkerInfo) -> Result<(), String> {
    if info.hash_version != HASH_VERSION {
        return Err(format!("it hashes blocks with version {}, this router with {HASH_VERSION}", info.hash_version));
    }
    if let Some(fp) = &inner.cfg.model_fingerprint
        && fp.as_slice() != info.model_fingerprint.as_slice()
    {
        return Err(format!("it serves another model (`{}`: its weights differ from the router's --model)", info.model_id));
    }
    if info.block_size == 0 {
        return Err("it reports a block size of 0".into());
    }
    let id = inner.identity.get_or_init(|| Identity::from_info(info));
    if id.fingerprint != info.model_fingerprint {
        return Err(format!("it serves another model (`{}`) than the pool's first worker", info.model_id));
    }
    if id.block_size != info.block_size {
        return Err(format!("its KV block size is {}, the pool's {}", info.block_size, id.block_size));
    }
    Ok(())
}

/// Applies one batch of `slot`'s stream to the index (cache-aware routing) and its load; returns the last applied
/// sequence number, or `None` on a gap (a non-resync batch that does not start right after `since`).
pub(super) fn apply(inner: &Inner, slot: &WorkerSlot, since: u64, b: &pb::KvEventBatch) -> Option<u64> {
    if !b.resync && b.first_seq != since + 1 {
        return None;
    }
    // An approximately tracked worker's entries are the router's guesses: only its load is taken from the stream.
    let exact = !slot.is_approximate();
    let index = inner.cfg.routing == Routing::CacheAware && exact;
    if b.resync {
        inner.metrics.resync();
        if exact {
            inner.index.purge(slot.id);
            slot.approx_clear();
        }
    }
    let mut n = 0u64;
    for e in &b.events {
        match &e.e {
            Some(E::Stored(s)) => {
                n += s.block_hashes.len() as u64;
                if index {
                    inner.index.store(slot.id, &s.block_hashes);
                    slot.approx_confirm(&s.block_hashes);
                }
            }
            Some(E::Removed(r)) => {
                n += r.block_hashes.len() as u64;
                if exact {
                    inner.index.remove(slot.id, &r.block_hashes);
                    slot.approx_confirm(&r.block_hashes);
                }
            }
            Some(E::Cleared(_)) if exact => {
                inner.index.purge(slot.id);
                slot.approx_clear();
            }
            Some(E::Cleared(_)) => {}
            None => {}
        }
    }
    if let Some(load) = b.load {
        slot.set_load(Some(load));
    }
    Some(if b.resync { b.first_seq.saturating_sub(1) } else { since + n })
}
