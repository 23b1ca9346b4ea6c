//! One worker of the pool ([`WorkerSlot`]: its client, state, load view and breaker) and the [`Lease`] a request
//! holds on it.
//!
//! A lease holds an `Arc` of the slot, so a worker removed from the pool while requests run on it stays usable by
//! them. The load view is the worker's last `LoadReport` plus the router's own prediction since that report
//! (Dynamo's slot manager, design doc §6): a dispatched request adds its uncached prompt tokens (prefill) and its
//! blocks; its first token removes the prefill part; its end removes the blocks. A new report replaces the
//! prediction (it counts those requests itself), so a lease only takes back what it added since the last report.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use ferrite_common::proto::worker as pb;
use ferrite_common::proto::worker::worker_client::WorkerClient;
use tokio::task::AbortHandle;
use tonic::transport::Channel;

use super::approx::ApproxBlocks;
use super::breaker::{Breaker, BreakerConfig, BreakerState};
use crate::kv_index::WorkerId;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether a worker's `Info` matched the pool's model and hashing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Verified {
    /// Not checked yet (not routable).
    Unknown = 0,
    Ok = 1,
    /// Another model, block size or hash version (not routable; checked again later).
    Refused = 2,
}

/// The router's load prediction for a worker since its last report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Predicted {
    /// Counts the reports: a lease only takes back what it added in the same epoch.
    pub epoch: u64,
    /// Uncached prompt tokens of dispatched requests that have no first token yet.
    pub prefill_tokens: u64,
    /// KV blocks of dispatched requests that have not ended.
    pub blocks: u64,
}

/// What one lease added to its worker's prediction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Contribution {
    pub epoch: u64,
    pub prefill_tokens: u64,
    pub blocks: u64,
}

/// One worker endpoint.
#[derive(Debug)]
pub struct WorkerSlot {
    /// Stable id (the KV index key), never reused.
    pub id: WorkerId,
    pub addr: String,
    pub client: WorkerClient<Channel>,
    inflight: AtomicUsize,
    draining: AtomicBool,
    removed: AtomicBool,
    verified: AtomicU8,
    /// The last `LoadReport` of its `KvEvents` stream (`None` while the stream is down).
    load: Mutex<Option<pb::LoadReport>>,
    predicted: Mutex<Predicted>,
    breaker: Mutex<Breaker>,
    /// Its `KvEvents` pump, stopped when the worker is removed.
    pump: Mutex<Option<AbortHandle>>,
    /// When it became a member (a worker still being checked soon after is worth a short wait, not a 503).
    pub added: Instant,
    /// Its blocks in the KV index are the router's guesses ([`ApproxBlocks`]), not its events.
    approximate: AtomicBool,
    /// Guesses with their expiry: all its entries when `approximate`, else the routed prompts' blocks its events
    /// have not confirmed yet.
    approx: Mutex<ApproxBlocks>,
}

impl WorkerSlot {
    pub fn new(id: WorkerId, addr: String, client: WorkerClient<Channel>, breaker: BreakerConfig, draining: bool) -> Self {
        Self {
            id,
            addr,
            client,
            inflight: AtomicUsize::new(0),
            draining: AtomicBool::new(draining),
            removed: AtomicBool::new(false),
            verified: AtomicU8::new(Verified::Unknown as u8),
            load: Mutex::new(None),
            predicted: Mutex::new(Predicted::default()),
            breaker: Mutex::new(Breaker::new(breaker)),
            pump: Mutex::new(None),
            added: Instant::now(),
            approximate: AtomicBool::new(false),
            approx: Mutex::new(ApproxBlocks::default()),
        }
    }

    /// Whether its KV index entries are approximate (see [`ApproxBlocks`]).
    pub fn is_approximate(&self) -> bool {
        self.approximate.load(Ordering::Relaxed)
    }

    /// Switches between exact (events) and approximate tracking; returns the previous mode. The caller purges the
    /// worker's index entries when the mode changes (neither kind of entry means anything to the other).
    pub fn set_approximate(&self, on: bool) -> bool {
        let was = self.approximate.swap(on, Ordering::Relaxed);
        if was != on {
            lock(&self.approx).clear();
        }
        was
    }

    /// A prompt with these block hashes was routed here at `now` (approximate tracking).
    pub fn approx_touch(&self, hashes: &[u64], now: Instant, ttl: Duration) {
        lock(&self.approx).touch(hashes, now, ttl);
    }

    /// The guessed hashes whose time to live passed at `now` (removed from the guesses; the caller removes them from
    /// the index).
    pub fn approx_expire(&self, now: Instant) -> Vec<u64> {
        lock(&self.approx).expire(now)
    }

    /// The worker's events reported these hashes: they stop being guesses.
    pub fn approx_confirm(&self, hashes: &[u64]) {
        lock(&self.approx).confirm(hashes);
    }

    /// Forgets the guesses (with the worker's index entries, by the caller).
    pub fn approx_clear(&self) {
        lock(&self.approx).clear();
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Relaxed);
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Relaxed)
    }

    /// Marks the worker removed and stops its pump.
    pub fn mark_removed(&self) {
        self.removed.store(true, Ordering::Relaxed);
        if let Some(pump) = lock(&self.pump).take() {
            pump.abort();
        }
    }

    pub fn set_pump(&self, pump: AbortHandle) {
        if self.is_removed() {
            pump.abort();
        } else {
            *lock(&self.pump) = Some(pump);
        }
    }

    pub fn verified(&self) -> Verified {
        match self.verified.load(Ordering::Relaxed) {
            1 => Verified::Ok,
            2 => Verified::Refused,
            _ => Verified::Unknown,
        }
    }

    /// Sets the verdict; returns the previous one.
    pub fn set_verified(&self, v: Verified) -> Verified {
        match self.verified.swap(v as u8, Ordering::Relaxed) {
            1 => Verified::Ok,
            2 => Verified::Refused,
            _ => Verified::Unknown,
        }
    }

    pub fn load(&self) -> Option<pb::LoadReport> {
        *lock(&self.load)
    }

    /// A new report (or `None`: the stream is down). Either way the prediction starts again from it.
    pub fn set_load(&self, load: Option<pb::LoadReport>) {
        *lock(&self.load) = load;
        let mut p = lock(&self.predicted);
        *p = Predicted { epoch: p.epoch + 1, prefill_tokens: 0, blocks: 0 };
    }

    pub fn predicted(&self) -> Predicted {
        *lock(&self.predicted)
    }

    /// Adds a dispatched request to the prediction.
    pub fn predict_dispatch(&self, prefill_tokens: u64, blocks: u64) -> Contribution {
        let mut p = lock(&self.predicted);
        p.prefill_tokens += prefill_tokens;
        p.blocks += blocks;
        Contribution { epoch: p.epoch, prefill_tokens, blocks }
    }

    /// The request's first token: its prefill is done.
    pub fn predict_first_token(&self, c: &mut Contribution) {
        let mut p = lock(&self.predicted);
        if p.epoch == c.epoch {
            p.prefill_tokens = p.prefill_tokens.saturating_sub(c.prefill_tokens);
        }
        c.prefill_tokens = 0;
    }

    /// The request ended: its blocks (and any prefill left) are released.
    pub fn predict_end(&self, c: &Contribution) {
        let mut p = lock(&self.predicted);
        if p.epoch == c.epoch {
            p.prefill_tokens = p.prefill_tokens.saturating_sub(c.prefill_tokens);
            p.blocks = p.blocks.saturating_sub(c.blocks);
        }
    }

    /// KV blocks used (reported + predicted) over the total, when a report exists.
    pub fn kv_usage(&self) -> Option<f64> {
        let load = self.load()?;
        (load.kv_blocks_total > 0)
            .then(|| (u64::from(load.kv_blocks_used) + self.predicted().blocks) as f64 / f64::from(load.kv_blocks_total))
    }

    pub fn breaker_state(&self) -> BreakerState {
        lock(&self.breaker).state(Instant::now())
    }

    pub fn breaker_can_pass(&self) -> bool {
        lock(&self.breaker).can_pass(Instant::now())
    }

    /// See [`Breaker::admit`].
    pub fn breaker_admit(&self) -> Option<bool> {
        lock(&self.breaker).admit(Instant::now())
    }

    pub fn breaker_success(&self) {
        let mut b = lock(&self.breaker);
        let now = Instant::now();
        if b.state(now) != BreakerState::Closed {
            tracing::info!(worker = %self.addr, "circuit breaker closed: the worker answers again");
        }
        b.success(now);
    }

    /// An attempt begun at `started` failed (see [`Breaker::failure`]).
    pub fn breaker_failure(&self, hard: bool, started: Instant) {
        if lock(&self.breaker).failure(Instant::now(), hard, started) {
            tracing::warn!(worker = %self.addr, "circuit breaker open: no new requests to this worker until a probe succeeds");
        }
    }

    pub fn breaker_release_probe(&self) {
        lock(&self.breaker).release_probe();
    }
}

/// Holds a worker's in-flight count and predicted load up while a request runs, and aborts the request on the
/// worker if dropped before [`Lease::finish`] (client disconnect, stop string, error).
#[derive(Debug)]
pub struct Lease {
    slot: std::sync::Arc<WorkerSlot>,
    request_id: Option<String>,
    contribution: Contribution,
    /// This request is the breaker's half-open probe and has not reported how it went.
    probe: bool,
    /// Prompt tokens the KV index expected the worker to hold (cache-aware routing only).
    predicted_cached: Option<u32>,
}

impl Lease {
    /// Counts a request on `slot` (its breaker already admitted it; `probe` as [`Breaker::admit`] said).
    pub fn new(slot: std::sync::Arc<WorkerSlot>, prefill_tokens: u64, blocks: u64, probe: bool) -> Self {
        slot.inflight.fetch_add(1, Ordering::Relaxed);
        let contribution = slot.predict_dispatch(prefill_tokens, blocks);
        Self { slot, request_id: None, contribution, probe, predicted_cached: None }
    }

    pub fn set_predicted_cached(&mut self, tokens: u32) {
        self.predicted_cached = Some(tokens);
    }

    /// Prompt tokens the KV index expected the worker to hold (cache-aware routing only).
    pub fn predicted_cached(&self) -> Option<u32> {
        self.predicted_cached
    }

    pub fn client(&self) -> WorkerClient<Channel> {
        self.slot.client.clone()
    }

    /// The leased worker's address.
    pub fn addr(&self) -> &str {
        &self.slot.addr
    }

    pub fn worker_id(&self) -> WorkerId {
        self.slot.id
    }

    pub fn set_request(&mut self, id: String) {
        self.request_id = Some(id);
    }

    /// The request ended normally on the worker: nothing to abort.
    pub fn finish(&mut self) {
        self.request_id = None;
    }

    /// The worker answered (its first message, or a refusal that is the request's fault): its breaker closes.
    pub fn succeeded(&mut self) {
        self.probe = false;
        self.slot.breaker_success();
    }

    /// The first token arrived: the prediction moves the request from prefill to decode.
    pub fn first_token(&mut self) {
        self.slot.predict_first_token(&mut self.contribution);
    }

    /// The worker failed the request (`hard`: unreachable, so nothing is left to abort there; otherwise the drop
    /// still sends `Abort`, in case the worker goes on with a request whose stream broke).
    pub fn failed(&mut self, hard: bool) {
        self.probe = false;
        if hard {
            self.request_id = None;
        }
        // A request's failure always counts (other requests answering meanwhile do not make it stale: a worker
        // that dies under many streams must open at once).
        self.slot.breaker_failure(hard, Instant::now());
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
        let slot = &self.slot;
        slot.inflight.fetch_sub(1, Ordering::Relaxed);
        slot.predict_end(&self.contribution);
        if self.probe {
            slot.breaker_release_probe();
        }
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn slot() -> Arc<WorkerSlot> {
        let channel = Channel::from_static("http://127.0.0.1:9").connect_lazy();
        Arc::new(WorkerSlot::new(0, "http://127.0.0.1:9".into(), WorkerClient::new(channel), BreakerConfig::default(), false))
    }

    #[tokio::test]
    async fn a_lease_adds_its_blocks_moves_its_prefill_at_the_first_token_and_releases_at_the_end() {
        let s = slot();
        let mut a = Lease::new(Arc::clone(&s), 100, 7, false);
        let b = Lease::new(Arc::clone(&s), 20, 2, false);
        assert_eq!((s.predicted().prefill_tokens, s.predicted().blocks, s.inflight()), (120, 9, 2));
        a.first_token();
        assert_eq!((s.predicted().prefill_tokens, s.predicted().blocks), (20, 9));
        a.first_token(); // twice takes nothing more
        assert_eq!(s.predicted().prefill_tokens, 20);
        drop(a);
        assert_eq!((s.predicted().prefill_tokens, s.predicted().blocks, s.inflight()), (20, 2, 1));
        // b ends before its first token: both parts go.
        drop(b);
        assert_eq!((s.predicted(), s.inflight()), (Predicted { epoch: 0, prefill_tokens: 0, blocks: 0 }, 0));
    }

    #[tokio::test]
    async fn a_load_report_replaces_the_prediction_and_older_leases_take_nothing_back() {
        let s = slot();
        let old = Lease::new(Arc::clone(&s), 50, 4, false);
        let report = pb::LoadReport { kv_blocks_total: 100, kv_blocks_used: 10, ..Default::default() };
        s.set_load(Some(report));
        assert_eq!(s.predicted(), Predicted { epoch: 1, prefill_tokens: 0, blocks: 0 }, "the report counts `old` itself");
        let new = Lease::new(Arc::clone(&s), 30, 3, false);
        assert_eq!(s.kv_usage(), Some(0.13), "10 reported + 3 predicted of 100");
        drop(old);
        assert_eq!(
            (s.predicted().prefill_tokens, s.predicted().blocks),
            (30, 3),
            "`old` ended after the report: nothing of it is left to take"
        );
        drop(new);
        assert_eq!((s.predicted().prefill_tokens, s.predicted().blocks), (0, 0));
        s.set_load(None);
        assert_eq!(s.kv_usage(), None);
    }

    #[tokio::test]
    async fn a_probe_lease_dropped_without_an_outcome_lets_the_next_probe_go() {
        let s = slot();
        s.breaker_failure(true, Instant::now());
        // Wait out the default backoff in the breaker's own clock: admit only once it has passed.
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let probe = loop {
            if let Some(p) = s.breaker_admit() {
                break p;
            }
            assert!(Instant::now() < deadline, "the breaker never half-opened");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        assert!(probe);
        let lease = Lease::new(Arc::clone(&s), 0, 0, probe);
        assert!(!s.breaker_can_pass(), "the probe is out");
        drop(lease);
        assert!(s.breaker_can_pass(), "released with the lease");
    }
}
