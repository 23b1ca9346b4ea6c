//! The router's view of its workers: gRPC clients with in-flight counts, the routing policy ([`Routing`]: cache-aware
//! over the KV index, least-load or round-robin), readiness, and an abort-on-drop guard so a request whose client
//! went away is aborted on the worker.
//!
//! Cache-aware routing needs [`WorkerPool::start_kv_subscriptions`]: one task per worker keeps its `KvEvents`
//! stream open and feeds the [`KvIndex`] and the worker's last `LoadReport`. Until the index holds anything,
//! cache-aware routing is least-load. (Raft-managed membership replaces the static list later.)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

use ferrite_common::hash::{BlockHasher, HASH_VERSION};
use ferrite_common::proto::rejection_of;

use crate::error::RouterError;
use crate::kv_index::KvIndex;
use crate::policy::{self, Candidate, Routing};
use ferrite_common::proto::worker as pb;
use ferrite_common::proto::worker::kv_event::E;
use ferrite_common::proto::worker::worker_client::WorkerClient;
use tonic::transport::Channel;

use crate::openai::error::{ApiError, ErrorKind};

/// One worker endpoint.
#[derive(Debug)]
pub struct WorkerSlot {
    pub addr: String,
    pub client: WorkerClient<Channel>,
    inflight: AtomicUsize,
    /// The last `LoadReport` of its `KvEvents` stream (`None` while the stream is down).
    load: Mutex<Option<pb::LoadReport>>,
}

#[derive(Debug)]
struct Inner {
    workers: Vec<WorkerSlot>,
    routing: Routing,
    index: KvIndex,
    /// From the first worker's `Info`: the model fingerprint and block size the index keys are hashed with.
    hasher: OnceLock<BlockHasher>,
    next: AtomicUsize,
}

/// The workers this router sends requests to.
#[derive(Debug, Clone)]
pub struct WorkerPool {
    inner: Arc<Inner>,
}

/// Holds a worker's in-flight count up while a request runs, and aborts the request on the worker if dropped before
/// [`Lease::finish`] (client disconnect, stop string, error).
#[derive(Debug)]
pub struct Lease {
    pool: WorkerPool,
    index: usize,
    request_id: Option<String>,
}

impl Lease {
    pub fn client(&self) -> WorkerClient<Channel> {
        self.pool.inner.workers[self.index].client.clone()
    }

    /// The leased worker's address.
    pub fn addr(&self) -> &str {
        &self.pool.inner.workers[self.index].addr
    }

    pub fn set_request(&mut self, id: String) {
        self.request_id = Some(id);
    }

    /// The request ended normally on the worker: nothing to abort.
    pub fn finish(&mut self) {
        self.request_id = None;
    }

    /// Stops completion `index` of the request on the worker (it ended on a stop string; the others go on). Fire
    /// and forget: the worker answers with that completion's `Finished`.
    pub fn abort_choice(&self, index: u32) {
        let Some(id) = self.request_id.clone() else { return };
        let mut client = self.client();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = client.abort(pb::AbortRequest { request_id: id, index: Some(index) }).await;
            });
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let slot = &self.pool.inner.workers[self.index];
        slot.inflight.fetch_sub(1, Ordering::Relaxed);
        if let Some(id) = self.request_id.take() {
            let mut client = slot.client.clone();
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    let _ = client.abort(pb::AbortRequest { request_id: id, index: None }).await;
                });
            }
        }
    }
}

impl WorkerPool {
    /// Connects lazily to every address (`http://host:port`); routes cache-aware.
    pub fn new(addrs: &[String]) -> Result<Self, RouterError> {
        Self::with_routing(addrs, Routing::default())
    }

    /// Connects lazily to every address (`http://host:port`); routes with `routing`.
    pub fn with_routing(addrs: &[String], routing: Routing) -> Result<Self, RouterError> {
        let mut workers = Vec::with_capacity(addrs.len());
        for a in addrs {
            let endpoint = Channel::from_shared(a.clone())
                .map_err(|e| RouterError::BadWorkerAddress { addr: a.clone(), reason: e.to_string() })?
                .connect_timeout(Duration::from_secs(2));
            workers.push(WorkerSlot {
                addr: a.clone(),
                client: WorkerClient::new(endpoint.connect_lazy()),
                inflight: AtomicUsize::new(0),
                load: Mutex::new(None),
            });
        }
        let index = KvIndex::new(workers.len());
        Ok(Self { inner: Arc::new(Inner { workers, routing, index, hasher: OnceLock::new(), next: AtomicUsize::new(0) }) })
    }

    pub fn len(&self) -> usize {
        self.inner.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inner.workers.is_empty()
    }

    pub fn routing(&self) -> Routing {
        self.inner.routing
    }

    /// The workers' addresses, in slot order.
    pub fn addrs(&self) -> Vec<String> {
        self.inner.workers.iter().map(|w| w.addr.clone()).collect()
    }

    /// Per worker (slot order): how many block hashes the KV index holds for it.
    pub fn indexed_blocks(&self) -> Vec<usize> {
        self.inner.index.blocks_per_worker()
    }

    /// Picks a worker for a prompt (`cache_salt`: the request's prefix-cache salt) by the pool's policy and leases it.
    pub fn pick(&self, prompt: &[u32], cache_salt: &[u8]) -> Result<Lease, ApiError> {
        let inner = &self.inner;
        if inner.workers.is_empty() {
            return Err(ApiError::new(ErrorKind::Unavailable, "no workers configured"));
        }
        let index = match inner.routing {
            Routing::RoundRobin => inner.next.fetch_add(1, Ordering::Relaxed) % inner.workers.len(),
            Routing::LeastLoad => self.least_loaded(),
            Routing::CacheAware => self.cache_aware(prompt, cache_salt).unwrap_or_else(|| self.least_loaded()),
        };
        inner.workers[index].inflight.fetch_add(1, Ordering::Relaxed);
        Ok(Lease { pool: self.clone(), index, request_id: None })
    }

    /// The worker with the fewest requests in flight (ties: the first).
    fn least_loaded(&self) -> usize {
        let w = self.inner.workers.iter().enumerate().min_by_key(|(_, w)| w.inflight.load(Ordering::Relaxed));
        w.map_or(0, |(i, _)| i)
    }

    /// The lowest-cost worker, or `None` when there is nothing to go on (no hasher yet, or an empty index).
    fn cache_aware(&self, prompt: &[u32], cache_salt: &[u8]) -> Option<usize> {
        let inner = &self.inner;
        let hasher = inner.hasher.get()?;
        if inner.index.is_empty() {
            return None;
        }
        let overlap = inner.index.overlap(&hasher.prefix_hashes(cache_salt, prompt));
        let cands: Vec<Candidate> = inner
            .workers
            .iter()
            .zip(overlap)
            .map(|(w, overlap_blocks)| {
                let load = w.load.lock().unwrap_or_else(PoisonError::into_inner).unwrap_or_default();
                Candidate {
                    overlap_blocks,
                    waiting_prefill_tokens: load.waiting_prefill_tokens,
                    kv_blocks_used: u64::from(load.kv_blocks_used),
                    running: u64::from(load.running),
                    inflight: w.inflight.load(Ordering::Relaxed),
                }
            })
            .collect();
        policy::choose(&cands, prompt.len(), hasher.block_size())
    }

    /// Starts one background task per worker that keeps its `KvEvents` stream open and feeds the KV index and the
    /// worker's load (call from inside a tokio runtime; the tasks end soon after the last clone of the pool is
    /// dropped). Only cache-aware routing reads them; other policies start nothing.
    pub fn start_kv_subscriptions(&self) {
        if self.inner.routing != Routing::CacheAware {
            return;
        }
        for slot in 0..self.inner.workers.len() {
            tokio::spawn(subscribe(Arc::downgrade(&self.inner), slot));
        }
    }

    /// True when at least one worker answers `Health` as healthy within a second.
    pub async fn any_ready(&self) -> bool {
        for w in self.inner.workers.iter() {
            let mut c = w.client.clone();
            let health = tokio::time::timeout(Duration::from_secs(1), c.health(pb::HealthRequest {})).await;
            if let Ok(Ok(h)) = health
                && h.into_inner().healthy
            {
                return true;
            }
        }
        false
    }

    /// `Info` of the first worker that answers, retrying for up to `wait`.
    pub async fn info(&self, wait: Duration) -> Result<pb::WorkerInfo, RouterError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            for w in self.inner.workers.iter() {
                let mut c = w.client.clone();
                if let Ok(Ok(i)) = tokio::time::timeout(Duration::from_secs(1), c.info(pb::InfoRequest {})).await {
                    return Ok(i.into_inner());
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(RouterError::NoWorker(wait));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// One worker's `KvEvents` pump: resumes from the last applied sequence number after a broken stream; when the
/// worker cannot be reached it purges the worker from the index (and forgets its load) and retries with backoff
/// from 0 (a resync).
async fn subscribe(pool: Weak<Inner>, slot: usize) {
    let mut since = 0u64;
    let mut backoff = BACKOFF_MIN;
    loop {
        let Some(inner) = pool.upgrade() else { return };
        let mut client = inner.workers[slot].client.clone();
        let addr = inner.workers[slot].addr.clone();
        drop(inner);
        let opened = match ensure_hasher(&pool, &mut client).await {
            Ok(()) => client.kv_events(pb::KvEventsRequest { since_seq: since }).await.map_err(|s| s.to_string()),
            Err(e) => Err(e),
        };
        match opened {
            Ok(resp) => {
                backoff = BACKOFF_MIN;
                let mut stream = resp.into_inner();
                loop {
                    let msg = stream.message().await;
                    let Some(inner) = pool.upgrade() else { return };
                    match msg {
                        Ok(Some(batch)) => match apply(&inner, slot, since, &batch) {
                            Some(s) => since = s,
                            None => {
                                tracing::warn!(worker = %addr, since, first_seq = batch.first_seq, "KvEvents gap: resyncing");
                                inner.index.purge(slot);
                                since = 0;
                                break;
                            }
                        },
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(worker = %addr, error = %e, "KvEvents stream broke; resuming");
                            break;
                        }
                    }
                }
                // Resume after a short pause with `since` (a replay, or a resync the worker decides on).
            }
            Err(e) => {
                let Some(inner) = pool.upgrade() else { return };
                tracing::debug!(worker = %addr, error = %e, "KvEvents unavailable; dropping the worker's index entries");
                inner.index.purge(slot);
                *inner.workers[slot].load.lock().unwrap_or_else(PoisonError::into_inner) = None;
                since = 0;
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Sets the pool's block hasher from this worker's `Info` unless set already; refuses a worker whose hashing
/// scheme differs from ours.
async fn ensure_hasher(pool: &Weak<Inner>, client: &mut WorkerClient<Channel>) -> Result<(), String> {
    if pool.upgrade().is_some_and(|i| i.hasher.get().is_some()) {
        return Ok(());
    }
    let info = client.info(pb::InfoRequest {}).await.map_err(|s| s.to_string())?.into_inner();
    if info.hash_version != HASH_VERSION {
        return Err(format!("the worker hashes blocks with version {}, this router with {HASH_VERSION}", info.hash_version));
    }
    if let Some(inner) = pool.upgrade() {
        let _ = inner.hasher.set(BlockHasher::new(&info.model_fingerprint, info.block_size as usize));
    }
    Ok(())
}

/// Applies one batch of worker `slot`'s stream to the index and its load; returns the last applied sequence number,
/// or `None` on a gap (a non-resync batch that does not start right after `since`).
fn apply(inner: &Inner, slot: usize, since: u64, b: &pb::KvEventBatch) -> Option<u64> {
    if !b.resync && b.first_seq != since + 1 {
        return None;
    }
    if b.resync {
        inner.index.purge(slot);
    }
    let mut n = 0u64;
    for e in &b.events {
        match &e.e {
            Some(E::Stored(s)) => {
                n += s.block_hashes.len() as u64;
                inner.index.store(slot, &s.block_hashes);
            }
            Some(E::Removed(r)) => {
                n += r.block_hashes.len() as u64;
                inner.index.remove(slot, &r.block_hashes);
            }
            Some(E::Cleared(_)) => inner.index.purge(slot),
            None => {}
        }
    }
    if let Some(load) = b.load {
        *inner.workers[slot].load.lock().unwrap_or_else(PoisonError::into_inner) = Some(load);
    }
    Some(if b.resync { b.first_seq.saturating_sub(1) } else { since + n })
}

/// Maps a worker's gRPC status to the client-facing error: a refusal's kind and field come from its structured
/// [`pb::Rejection`] details, never from the message text.
pub fn status_to_api(s: &tonic::Status) -> ApiError {
    use pb::rejection::Kind;
    let rejection = rejection_of(s);
    let param = rejection.as_ref().and_then(|r| crate::validate::openai_param(&r.field)).map(str::to_string);
    match (s.code(), rejection.map(|r| r.kind())) {
        (tonic::Code::InvalidArgument, Some(Kind::ContextLength)) => {
            ApiError { param, ..ApiError::new(ErrorKind::ContextLength, s.message()) }
        }
        (tonic::Code::InvalidArgument, _) => ApiError { param, ..ApiError::new(ErrorKind::InvalidRequest, s.message()) },
        (tonic::Code::ResourceExhausted, _) => ApiError::new(ErrorKind::RateLimited, "The server is overloaded; retry later."),
        (tonic::Code::Unavailable, _) => ApiError::new(ErrorKind::Unavailable, s.message()),
        _ => ApiError::new(ErrorKind::Internal, format!("worker: {s}")),
    }
}

#[cfg(test)]
mod tests {
    use ferrite_common::proto::rejection_status;
    use pb::rejection::Kind;

    use super::*;

    #[test]
    fn a_worker_rejection_maps_to_the_openai_param_from_its_details() {
        let e = status_to_api(&rejection_status(Kind::InvalidArgument, "max_new_tokens", "`max_new_tokens` too big"));
        assert_eq!((e.kind, e.param.as_deref()), (ErrorKind::InvalidRequest, Some("max_tokens")));
        let e = status_to_api(&rejection_status(Kind::ContextLength, "prompt_ids", "too long"));
        assert_eq!((e.kind, e.param.as_deref()), (ErrorKind::ContextLength, Some("prompt")));
        assert_eq!(status_to_api(&rejection_status(Kind::Overloaded, "", "full")).kind, ErrorKind::RateLimited);
        // The message text is never parsed: backticks without details name no field.
        let e = status_to_api(&tonic::Status::invalid_argument("`top_p` must be in (0, 1]"));
        assert_eq!((e.kind, e.param), (ErrorKind::InvalidRequest, None));
    }

    #[tokio::test]
    async fn an_unreachable_worker_is_purged_from_the_index() {
        let pool = WorkerPool::new(&["http://127.0.0.1:9".into()]).unwrap();
        pool.inner.index.store(0, &[1, 2, 3]);
        *pool.inner.workers[0].load.lock().unwrap() = Some(pb::LoadReport::default());
        pool.start_kv_subscriptions();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while pool.indexed_blocks() != [0] || pool.inner.workers[0].load.lock().unwrap().is_some() {
            assert!(tokio::time::Instant::now() < deadline, "still indexed: {:?}", pool.indexed_blocks());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn batch(first_seq: u64, resync: bool, events: Vec<E>) -> pb::KvEventBatch {
        let events = events.into_iter().map(|e| pb::KvEvent { e: Some(e) }).collect();
        pb::KvEventBatch { first_seq, events, load: Some(pb::LoadReport { running: 3, ..Default::default() }), resync }
    }

    #[tokio::test]
    async fn batches_apply_in_sequence_and_a_resync_replaces_the_worker() {
        let pool = WorkerPool::new(&["http://127.0.0.1:9".into(), "http://127.0.0.1:10".into()]).unwrap();
        let inner = &pool.inner;
        let stored = |h: &[u64]| E::Stored(pb::Stored { block_hashes: h.to_vec() });
        inner.index.store(1, &[7]);
        // Resync: the state after seq 4 (Cleared + a dump), next batch at 5.
        let dump = batch(5, true, vec![E::Cleared(pb::Cleared {}), stored(&[1, 2])]);
        assert_eq!(apply(inner, 0, 0, &dump), Some(4));
        assert_eq!(inner.workers[0].load.lock().unwrap().map(|l| l.running), Some(3));
        // Seqs 5..=7: stores 3, 4 and removes 2.
        let b = batch(5, false, vec![stored(&[3, 4]), E::Removed(pb::Removed { block_hashes: vec![2] })]);
        assert_eq!(apply(inner, 0, 4, &b), Some(7));
        assert_eq!(inner.index.overlap(&[1, 3]), vec![2, 0]);
        assert_eq!(inner.index.overlap(&[1, 2]), vec![1, 0]);
        // An empty batch (a load report) keeps the sequence number; a batch that skips one is a gap.
        assert_eq!(apply(inner, 0, 7, &batch(8, false, vec![])), Some(7));
        assert_eq!(apply(inner, 0, 7, &batch(9, false, vec![stored(&[5])])), None);
        // A second resync purges what the first one left, even without its leading `Cleared`; the other worker is
        // untouched.
        assert_eq!(apply(inner, 0, 7, &batch(3, true, vec![stored(&[9])])), Some(2));
        assert_eq!(pool.indexed_blocks(), vec![1, 1]);
    }
}
