//! The router's live set of workers and how it picks one for a request.
//!
//! The set ([`WorkerPool`]) can change while requests run: [`WorkerPool::add`], [`WorkerPool::drain`] (no new
//! requests; running ones finish), [`WorkerPool::remove`], or [`WorkerPool::sync_members`] to reconcile it to a
//! list (the static `--worker` list is one call of it; the raft control plane calls it after each applied change).
//! Members live in an `Arc<Vec<Arc<WorkerSlot>>>` snapshot swapped under a short lock, so a pick clones one `Arc`
//! and never waits on a membership change; a [`Lease`] holds its worker's `Arc`, so removing a worker never breaks
//! a request running on it.
//!
//! A worker is *eligible* when its `Info` matched the pool (`events::check`), it is not draining or removed, and its
//! circuit breaker ([`breaker`]) lets a request through (closed, or the one half-open probe). Among those, workers
//! whose KV cache is at least [`PoolConfig::busy_threshold`] full (reported + predicted) are passed over unless all
//! are (the worker's own admission control then queues or refuses with 429). No eligible worker: 503 at once.
//! Then the policy ([`Routing`]) chooses: cache-aware over the [`KvIndex`] and [`policy`]'s cost function,
//! least-load or round-robin.
//!
//! Every member has a background task ([`events`]) that checks its `Info` and keeps its `KvEvents` stream open:
//! the KV index (cache-aware routing) and the load reports come from there. [`WorkerPool::start_kv_subscriptions`]
//! starts them; members added later get theirs at once.

mod approx;
mod breaker;
mod events;
mod metrics;
mod slot;

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use ferrite_common::hash::BlockHasher;
use ferrite_common::proto::rejection_of;
use ferrite_common::proto::worker as pb;
use ferrite_common::proto::worker::worker_client::WorkerClient;
use tonic::transport::Channel;

pub use breaker::{BreakerConfig, BreakerState};
pub use slot::Lease;
use slot::{Verified, WorkerSlot};

use crate::error::RouterError;
use crate::kv_index::{KvIndex, WorkerId};
use crate::openai::error::{ApiError, ErrorKind};
use crate::policy::{self, Candidate, CostWeights, CostWeightsError, Routing};
pub use metrics::PoolMetrics;

/// One entry of the membership list given to [`WorkerPool::sync_members`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The worker's gRPC address, `http://host:port`.
    pub addr: String,
    /// No new requests; running ones finish.
    pub draining: bool,
}

/// Where cache-aware routing learns which blocks a worker holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvEventsMode {
    /// From each worker's `KvEvents` stream (exact); a worker that does not serve the stream (gRPC `UNIMPLEMENTED`,
    /// another engine behind the same protocol) is tracked approximately instead.
    #[default]
    On,
    /// Approximately for every worker: the blocks of the prompts this router sent it, for
    /// [`PoolConfig::approx_ttl`] (load reports still come from the stream). For workers whose events cannot reach
    /// the router, or to compare the two.
    Off,
}

impl KvEventsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            KvEventsMode::On => "on",
            KvEventsMode::Off => "off",
        }
    }
}

impl fmt::Display for KvEventsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `--kv-events` value other than `on` or `off`.
#[derive(Debug, thiserror::Error)]
#[error("unknown KV events mode `{0}` (expected on or off)")]
pub struct UnknownKvEventsMode(pub String);

impl FromStr for KvEventsMode {
    type Err = UnknownKvEventsMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "on" => Ok(KvEventsMode::On),
            "off" => Ok(KvEventsMode::Off),
            other => Err(UnknownKvEventsMode(other.to_string())),
        }
    }
}

/// How long after joining a worker whose first `Info` check is not done yet holds requests back from a 503.
pub const JOIN_GRACE: Duration = Duration::from_secs(3);

/// How long a routed prompt's blocks count as held by a worker with KV events before its events confirm them.
pub const PENDING_TTL: Duration = Duration::from_secs(30);

/// The largest `--migration-limit`.
pub const MAX_MIGRATION_LIMIT: u32 = 8;

/// How the pool routes and handles failures.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub routing: Routing,
    /// How many times a stream whose worker fails after its first token moves to another worker (0..=
    /// [`MAX_MIGRATION_LIMIT`]).
    pub migration_limit: u32,
    pub breaker: BreakerConfig,
    /// When set, a worker whose `Info` reports another model fingerprint is refused.
    pub model_fingerprint: Option<Vec<u8>>,
    /// KV usage (used / total) at which a worker counts as busy (design doc §6: 0.95).
    pub busy_threshold: f64,
    /// PEM certificate(s) that `https://` workers' certificates must chain to (their gRPC over TLS).
    pub worker_ca: Option<Vec<u8>>,
    /// Exact KV events or approximate tracking (cache-aware routing only).
    pub kv_events: KvEventsMode,
    /// How long approximate tracking assumes a worker keeps a routed prompt's blocks.
    pub approx_ttl: Duration,
    /// The cache-aware cost function's weights and temperature.
    pub weights: CostWeights,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            routing: Routing::default(),
            migration_limit: 1,
            breaker: BreakerConfig::default(),
            model_fingerprint: None,
            busy_threshold: 0.95,
            worker_ca: None,
            kv_events: KvEventsMode::default(),
            approx_ttl: Duration::from_secs(120),
            weights: CostWeights::default(),
        }
    }
}

/// A `PoolConfig` value out of range.
#[derive(Debug, thiserror::Error)]
pub enum PoolConfigError {
    #[error("migration limit {0} is out of range (0..={MAX_MIGRATION_LIMIT})")]
    MigrationLimit(u32),
    #[error("busy threshold {0} is out of range (0, 1]")]
    BusyThreshold(f64),
    #[error("approximate KV tracking TTL {0:?} is out of range (1 s ..= 1 h)")]
    ApproxTtl(Duration),
    #[error(transparent)]
    Weights(#[from] CostWeightsError),
}

impl PoolConfig {
    pub fn validate(&self) -> Result<(), PoolConfigError> {
        if self.migration_limit > MAX_MIGRATION_LIMIT {
            return Err(PoolConfigError::MigrationLimit(self.migration_limit));
        }
        if !(self.busy_threshold > 0.0 && self.busy_threshold <= 1.0) {
            return Err(PoolConfigError::BusyThreshold(self.busy_threshold));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&self.approx_ttl) {
            return Err(PoolConfigError::ApproxTtl(self.approx_ttl));
        }
        self.weights.validate()?;
        Ok(())
    }
}

/// What the pool's workers must agree on: set by the first worker whose `Info` fits.
#[derive(Debug)]
pub(crate) struct Identity {
    fingerprint: Vec<u8>,
    block_size: u32,
    hasher: BlockHasher,
}

impl Identity {
    fn from_info(info: &pb::WorkerInfo) -> Self {
        Self {
            fingerprint: info.model_fingerprint.clone(),
            block_size: info.block_size,
            hasher: BlockHasher::new(&info.model_fingerprint, info.block_size as usize),
        }
    }
}

type Members = Arc<Vec<Arc<WorkerSlot>>>;

#[derive(Debug)]
pub(crate) struct Inner {
    members: RwLock<Members>,
    /// Serializes membership changes (readers never take it).
    changing: Mutex<()>,
    cfg: PoolConfig,
    index: KvIndex,
    identity: OnceLock<Identity>,
    next: AtomicUsize,
    next_id: AtomicUsize,
    /// Whether pumps run (members added from now on get theirs at once).
    started: AtomicBool,
    metrics: PoolMetrics,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for s in self.members.get_mut().unwrap_or_else(PoisonError::into_inner).iter() {
            s.mark_removed();
        }
    }
}

/// The workers this router sends requests to.
#[derive(Debug, Clone)]
pub struct WorkerPool {
    inner: Arc<Inner>,
}

fn lease_unavailable() -> ApiError {
    ApiError::new(ErrorKind::Unavailable, "no worker is available")
}

impl WorkerPool {
    /// Connects lazily to every address (`http://host:port`); routes cache-aware.
    pub fn new(addrs: &[String]) -> Result<Self, RouterError> {
        Self::with_routing(addrs, Routing::default())
    }

    /// Connects lazily to every address (`http://host:port`); routes with `routing`.
    pub fn with_routing(addrs: &[String], routing: Routing) -> Result<Self, RouterError> {
        Self::with_config(addrs, PoolConfig { routing, ..PoolConfig::default() })
    }

    /// A pool of `addrs` (each checked as an address; connections are made lazily).
    pub fn with_config(addrs: &[String], cfg: PoolConfig) -> Result<Self, RouterError> {
        cfg.validate().map_err(|e| RouterError::Config(e.to_string()))?;
        for a in addrs {
            endpoint(a, cfg.worker_ca.as_deref())?;
        }
        let pool = Self {
            inner: Arc::new(Inner {
                members: RwLock::new(Arc::new(Vec::new())),
                changing: Mutex::new(()),
                cfg,
                index: KvIndex::new(),
                identity: OnceLock::new(),
                next: AtomicUsize::new(0),
                next_id: AtomicUsize::new(0),
                started: AtomicBool::new(false),
                metrics: PoolMetrics::new()?,
            }),
        };
        pool.sync_members(&addrs.iter().map(|a| Member { addr: a.clone(), draining: false }).collect::<Vec<_>>());
        Ok(pool)
    }

    fn members(&self) -> Members {
        Arc::clone(&self.inner.members.read().unwrap_or_else(PoisonError::into_inner))
    }

    pub fn len(&self) -> usize {
        self.members().len()
    }

    pub fn is_empty(&self) -> bool {
        self.members().is_empty()
    }

    pub fn routing(&self) -> Routing {
        self.inner.cfg.routing
    }

    pub fn migration_limit(&self) -> u32 {
        self.inner.cfg.migration_limit
    }

    pub fn metrics(&self) -> &PoolMetrics {
        &self.inner.metrics
    }

    /// The members' addresses, in the order they joined.
    pub fn addrs(&self) -> Vec<String> {
        self.members().iter().map(|w| w.addr.clone()).collect()
    }

    /// Per member (as [`WorkerPool::addrs`]): how many block hashes the KV index holds for it.
    pub fn indexed_blocks(&self) -> Vec<usize> {
        self.members().iter().map(|w| self.inner.index.blocks_of(w.id)).collect()
    }

    /// Adds a worker (or, if it is a member, stops draining it). Its pump starts at once if the pool's have.
    pub fn add(&self, addr: &str) -> Result<(), RouterError> {
        endpoint(addr, self.inner.cfg.worker_ca.as_deref())?;
        self.change(|members| self.upsert(members, &Member { addr: addr.to_string(), draining: false }));
        Ok(())
    }

    /// Sends no new requests to `addr`; running ones finish. False if it is not a member.
    pub fn drain(&self, addr: &str) -> bool {
        let slot = self.members().iter().find(|s| s.addr == addr).cloned();
        slot.map(|s| s.set_draining(true)).is_some()
    }

    /// Removes `addr`: no new requests, its index entries purged, its pump stopped; running requests finish on the
    /// slot their lease holds. False if it is not a member.
    pub fn remove(&self, addr: &str) -> bool {
        let mut found = false;
        self.change(|members| {
            if let Some(i) = members.iter().position(|s| s.addr == addr) {
                self.retire(&members.remove(i));
                found = true;
            }
        });
        found
    }

    /// Reconciles the set to exactly `members`: adds the new ones, sets each one's draining flag, removes the rest.
    /// An address that cannot be a URI is logged and skipped.
    pub fn sync_members(&self, members: &[Member]) {
        self.change(|current| {
            let mut wanted: Vec<&Member> = Vec::with_capacity(members.len());
            for m in members {
                if let Err(e) = endpoint(&m.addr, self.inner.cfg.worker_ca.as_deref()) {
                    tracing::warn!(error = %e, "membership: worker skipped");
                } else if !wanted.iter().any(|w| w.addr == m.addr) {
                    wanted.push(m);
                }
            }
            current.retain(|s| {
                let keep = wanted.iter().any(|m| m.addr == s.addr);
                if !keep {
                    self.retire(s);
                }
                keep
            });
            for m in wanted {
                self.upsert(current, m);
            }
        });
    }

    /// Applies `f` to a copy of the member list and publishes it.
    fn change(&self, f: impl FnOnce(&mut Vec<Arc<WorkerSlot>>)) {
        let _one_at_a_time = self.inner.changing.lock().unwrap_or_else(PoisonError::into_inner);
        let mut members: Vec<Arc<WorkerSlot>> = self.members().as_ref().clone();
        f(&mut members);
        *self.inner.members.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(members);
    }

    fn upsert(&self, members: &mut Vec<Arc<WorkerSlot>>, m: &Member) {
        if let Some(s) = members.iter().find(|s| s.addr == m.addr) {
            if s.is_draining() != m.draining {
                tracing::info!(worker = %m.addr, draining = m.draining, "membership: draining changed");
            }
            s.set_draining(m.draining);
            return;
        }
        let Ok(endpoint) = endpoint(&m.addr, self.inner.cfg.worker_ca.as_deref()) else { return };
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let slot =
            Arc::new(WorkerSlot::new(id, m.addr.clone(), WorkerClient::new(endpoint.connect_lazy()), self.inner.cfg.breaker, m.draining));
        self.inner.index.add_worker(id);
        if self.inner.started.load(Ordering::Relaxed) {
            self.spawn_pump(&slot);
        }
        tracing::info!(worker = %m.addr, draining = m.draining, "membership: worker added");
        members.push(slot);
    }

    fn retire(&self, slot: &WorkerSlot) {
        slot.mark_removed();
        self.inner.index.remove_worker(slot.id);
        self.inner.metrics.forget(&slot.addr);
        tracing::info!(worker = %slot.addr, running = slot.inflight(), "membership: worker removed");
    }

    fn spawn_pump(&self, slot: &Arc<WorkerSlot>) {
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => slot.set_pump(rt.spawn(events::pump(Arc::downgrade(&self.inner), Arc::clone(slot))).abort_handle()),
            Err(_) => tracing::error!(worker = %slot.addr, "no tokio runtime: the worker's pump did not start"),
        }
    }

    /// Starts each member's background task (its `Info` check, `KvEvents` stream and load reports; call from inside
    /// a tokio runtime); members added later get theirs at once. The tasks end when their worker is removed or the
    /// pool dropped. Only cache-aware routing fills the KV index; every policy reads the load reports.
    pub fn start_kv_subscriptions(&self) {
        if self.inner.started.swap(true, Ordering::Relaxed) {
            return;
        }
        for slot in self.members().iter() {
            self.spawn_pump(slot);
        }
    }

    fn eligible(&self, s: &WorkerSlot) -> bool {
        s.verified() == Verified::Ok && !s.is_draining() && !s.is_removed() && s.breaker_can_pass()
    }

    /// Picks a worker for a prompt (`cache_salt`: the request's prefix-cache salt) by the pool's policy among the
    /// eligible ones not in `exclude`, and leases it. No eligible worker: 503 at once.
    pub fn pick(&self, prompt: &[u32], cache_salt: &[u8], exclude: &[WorkerId]) -> Result<Lease, ApiError> {
        let members = self.members();
        let inner = &self.inner;
        let mut alive: Vec<&Arc<WorkerSlot>> = members.iter().filter(|s| !exclude.contains(&s.id) && self.eligible(s)).collect();
        let identity = inner.identity.get();
        let cache_aware = inner.cfg.routing == Routing::CacheAware;
        // Guesses whose time to live has passed leave the index first (`approx`).
        let now = Instant::now();
        if cache_aware {
            for s in members.iter() {
                let gone = s.approx_expire(now);
                if !gone.is_empty() {
                    inner.index.remove(s.id, &gone);
                }
            }
        }
        let hashes = match identity {
            Some(id) if cache_aware => id.hasher.prefix_hashes(cache_salt, prompt),
            _ => Vec::new(),
        };
        let overlap = inner.index.overlap(&hashes);
        loop {
            let not_busy: Vec<&Arc<WorkerSlot>> =
                alive.iter().copied().filter(|s| s.kv_usage().is_none_or(|u| u < inner.cfg.busy_threshold)).collect();
            let cands = if not_busy.is_empty() { &alive } else { &not_busy };
            let chosen = match inner.cfg.routing {
                _ if cands.is_empty() => return Err(lease_unavailable()),
                Routing::RoundRobin => inner.next.fetch_add(1, Ordering::Relaxed) % cands.len(),
                Routing::LeastLoad => least_loaded(cands),
                Routing::CacheAware => {
                    let block_size = identity.map_or(16, |i| i.block_size as usize);
                    let view: Vec<Candidate> = cands.iter().map(|s| candidate(s, overlap.get(&s.id).copied().unwrap_or(0))).collect();
                    policy::choose(&view, prompt.len(), block_size, &inner.cfg.weights, rand::random()).unwrap_or(0)
                }
            };
            let slot = Arc::clone(cands[chosen]);
            // Another request may have taken the half-open probe since the filter: then look again without it.
            let Some(probe) = slot.breaker_admit() else {
                alive.retain(|s| s.id != slot.id);
                continue;
            };
            let (prefill, blocks) = match identity {
                Some(id) => {
                    let b = id.block_size.max(1) as u64;
                    // The worker computes at least the prompt's last token: a hit never covers its last block.
                    let full = (prompt.len() as u64).saturating_sub(1) / b * b;
                    let cached = (overlap.get(&slot.id).copied().unwrap_or(0) as u64 * b).min(full);
                    ((prompt.len() as u64).saturating_sub(cached), (prompt.len() as u64).div_ceil(b))
                }
                None => (prompt.len() as u64, 0),
            };
            if cache_aware && !hashes.is_empty() {
                if slot.is_approximate() {
                    slot.approx_touch(&hashes, now, inner.cfg.approx_ttl);
                    inner.index.store(slot.id, &hashes);
                } else {
                    // Until its events confirm them, the blocks this prompt will store count as held (`approx`);
                    // only blocks the worker did not hold already are guesses.
                    let held = overlap.get(&slot.id).copied().unwrap_or(0);
                    let pending = inner.index.store(slot.id, &hashes[held..]);
                    slot.approx_touch(&pending, now, PENDING_TTL);
                }
            }
            inner.metrics.routed(inner.cfg.routing.as_str(), &slot.addr);
            let predicted = (prompt.len() as u64 - prefill) as u32;
            let mut lease = Lease::new(slot, prefill, blocks, probe);
            if inner.cfg.routing == Routing::CacheAware && identity.is_some() {
                lease.set_predicted_cached(predicted);
            }
            return Ok(lease);
        }
    }

    /// Whether a member not in `exclude` joined less than [`JOIN_GRACE`] ago and is still being checked (its first
    /// `Info`): a request with no eligible worker waits for it rather than failing at once.
    pub fn joining(&self, exclude: &[WorkerId]) -> bool {
        self.members().iter().any(|s| {
            !exclude.contains(&s.id)
                && s.verified() == Verified::Unknown
                && !s.is_draining()
                && !s.is_removed()
                && s.added.elapsed() < JOIN_GRACE
        })
    }

    /// Refreshes the gauges read at scrape time (breaker per worker, index size, members by state).
    pub fn update_gauges(&self) {
        let m = &self.inner.metrics;
        let (mut active, mut draining, mut refused, mut joining) = (0, 0, 0, 0);
        for s in self.members().iter() {
            let state = match s.breaker_state() {
                BreakerState::Closed => 0,
                BreakerState::HalfOpen => 1,
                BreakerState::Open => 2,
            };
            m.set_breaker(&s.addr, state);
            match (s.verified(), s.is_draining()) {
                (_, true) => draining += 1,
                (Verified::Ok, false) => active += 1,
                (Verified::Refused, false) => refused += 1,
                (Verified::Unknown, false) => joining += 1,
            }
        }
        for (state, n) in [("active", active), ("draining", draining), ("refused", refused), ("joining", joining)] {
            m.set_workers(state, n);
        }
        m.set_index_blocks(self.inner.index.total_blocks());
    }

    /// True when a request would be routed now: some member that is not draining, whose `Info` fits the pool and
    /// whose breaker lets requests through, answers `Health` as healthy within a second. A member not checked yet (or
    /// refused before) is checked here rather than after its pump's backoff.
    pub async fn any_ready(&self) -> bool {
        for w in self.members().iter().filter(|w| !w.is_draining() && !w.is_removed()) {
            let mut c = w.client.clone();
            if w.verified() != Verified::Ok {
                match tokio::time::timeout(Duration::from_secs(1), c.info(pb::InfoRequest {})).await {
                    Ok(Ok(info)) if events::check(&self.inner, info.get_ref()).is_ok() => {
                        joined(w);
                        w.breaker_success();
                    }
                    _ => continue,
                }
            }
            if !w.breaker_can_pass() {
                continue;
            }
            let health = tokio::time::timeout(Duration::from_secs(1), c.health(pb::HealthRequest {})).await;
            if let Ok(Ok(h)) = health
                && h.into_inner().healthy
            {
                // It answered: ready means requests pass now, not one half-open probe at a time.
                w.breaker_success();
                return true;
            }
        }
        false
    }

    /// `Info` of the first member whose `Info` fits the pool, retrying for up to `wait`. Every member that answers
    /// meanwhile is checked (and, if it fits, becomes routable at once).
    pub async fn info(&self, wait: Duration) -> Result<pb::WorkerInfo, RouterError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let mut found = None;
            for w in self.members().iter() {
                let mut c = w.client.clone();
                if let Ok(Ok(i)) = tokio::time::timeout(Duration::from_secs(1), c.info(pb::InfoRequest {})).await {
                    let info = i.into_inner();
                    if events::check(&self.inner, &info).is_ok() {
                        joined(w);
                        w.breaker_success();
                        found.get_or_insert(info);
                    }
                }
            }
            if let Some(info) = found {
                return Ok(info);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(RouterError::NoWorker(wait));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Marks `w` as checked (its `Info` fits the pool): routable from now on.
fn joined(w: &WorkerSlot) {
    if w.set_verified(Verified::Ok) != Verified::Ok {
        tracing::info!(worker = %w.addr, "worker joined the routing set");
    }
}

/// A gRPC endpoint for `addr`, or why it is not one. An `https://` address is dialled over TLS, trusting `ca`
/// (required: workers' certificates are usually from a private CA).
fn endpoint(addr: &str, ca: Option<&[u8]>) -> Result<tonic::transport::Endpoint, RouterError> {
    let bad = |reason: String| RouterError::BadWorkerAddress { addr: addr.into(), reason };
    let mut e = Channel::from_shared(addr.to_string()).map_err(|e| bad(e.to_string()))?;
    if e.uri().host().is_none() {
        return Err(bad("no host".into()));
    }
    if e.uri().scheme_str() == Some("https") {
        let ca = ca.ok_or_else(|| bad("an https:// worker needs --worker-ca (the CA its certificate chains to)".into()))?;
        let tls = tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(ca));
        e = e.tls_config(tls).map_err(|err| bad(format!("TLS: {err}")))?;
    }
    // Keepalive pings find a peer that vanished without closing its connections (a partition, a frozen host).
    Ok(e.connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true))
}

/// The index in `cands` of the worker with the fewest requests in flight (ties: the first).
fn least_loaded(cands: &[&Arc<WorkerSlot>]) -> usize {
    cands.iter().enumerate().min_by_key(|(_, w)| w.inflight()).map_or(0, |(i, _)| i)
}

/// What the cost function sees of `s`: its last report plus the router's prediction since.
fn candidate(s: &WorkerSlot, overlap_blocks: usize) -> Candidate {
    let load = s.load().unwrap_or_default();
    let p = s.predicted();
    Candidate {
        overlap_blocks,
        waiting_prefill_tokens: load.waiting_prefill_tokens + p.prefill_tokens,
        kv_blocks_used: u64::from(load.kv_blocks_used) + p.blocks,
        running: u64::from(load.running),
        inflight: s.inflight(),
    }
}

/// How a worker's failed call counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The request's own fault (bad field, too long): the worker is fine; never retried.
    Client,
    /// The worker is full: try another one, but the worker is not broken.
    Overloaded,
    /// The worker failed (`hard`: it could not be reached): retried elsewhere; counts for its breaker.
    Worker { hard: bool },
}

/// Classifies a worker's gRPC status.
pub fn classify(s: &tonic::Status) -> Failure {
    use tonic::Code;
    match s.code() {
        Code::Unavailable => Failure::Worker { hard: true },
        Code::ResourceExhausted => Failure::Overloaded,
        Code::Unknown | Code::Internal | Code::Cancelled | Code::Aborted | Code::DeadlineExceeded | Code::DataLoss => {
            Failure::Worker { hard: false }
        }
        _ => Failure::Client,
    }
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
mod tests;
