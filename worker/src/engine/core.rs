//! The engine thread: the IO shell around the sans-IO [`EngineCore`] (`super::step`).
//!
//! [`Engine::spawn`] starts a thread that owns the backend and a core; [`EngineHandle`]s send it commands (a request
//! with its output channel, or an abort) over a channel. The loop only moves data: it blocks while the core is idle,
//! drains commands into the core (drawing a seed for unseeded requests, so the core stays deterministic), aborts
//! requests whose client went away (`tx.is_closed()`, TGI's disconnect check), runs [`EngineCore::step`], delivers
//! the step's outputs to the requests' channels, and publishes the core's [`super::step::CoreStats`] into the atomic
//! [`EngineStats`] (with the time of the step's end), and the step's prefix-cache index changes into the shared
//! [`KvEventLog`] (a short mutex and a `watch` bump; the `KvEvents` streams read it on their own tasks). On a fatal backend error the core has failed every request; the
//! thread publishes, sets the handle's fatal error and ends, so later submissions are rejected as shut down.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc as tmpsc, oneshot, watch};

use super::pacer::StepPacer;
use super::step::{Emitted, EngineCore};
pub use super::step::{EngineConfig, EngineError, EngineOutput, EngineRequest, FinishReason};
use crate::backend::{Backend, BackendError};
use crate::kv_events::{DEFAULT_CAPACITY, KvEventLog};

/// Live counters, read by health checks and metrics.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub running: AtomicU64,
    pub waiting: AtomicU64,
    /// Tokens waiting sequences still have to prefill.
    pub waiting_prefill_tokens: AtomicU64,
    pub kv_blocks_total: AtomicU64,
    pub kv_blocks_used: AtomicU64,
    pub kv_blocks_cached_free: AtomicU64,
    pub prefix_queries: AtomicU64,
    pub prefix_hits: AtomicU64,
    pub prefix_hit_tokens: AtomicU64,
    pub preemptions: AtomicU64,
    pub aborts: AtomicU64,
    pub steps: AtomicU64,
    pub batch_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Milliseconds since `started` at the end of the last step.
    pub last_step_end_ms: AtomicU64,
    /// Step durations by [`StepPhase`] (index `phase as usize`), bucketed by [`STEP_SECONDS_BUCKETS`].
    pub step_times: [StepTimes; 2],
    /// Time from a request's arrival at the engine to its first admission into a step, bucketed by
    /// [`QUEUE_SECONDS_BUCKETS`].
    pub queue_times: QueueTimes,
}

/// What an engine step computed: prompt tokens (possibly with decodes riding along: chunked prefill), or only
/// decode tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepPhase {
    Prefill = 0,
    Decode = 1,
}

impl StepPhase {
    pub const ALL: [StepPhase; 2] = [StepPhase::Prefill, StepPhase::Decode];

    pub fn as_str(self) -> &'static str {
        match self {
            StepPhase::Prefill => "prefill",
            StepPhase::Decode => "decode",
        }
    }
}

/// Upper bounds (seconds) of the step-time histogram buckets.
pub const STEP_SECONDS_BUCKETS: [f64; 13] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Upper bounds (seconds) of the queue-time histogram buckets.
pub const QUEUE_SECONDS_BUCKETS: [f64; 14] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// A histogram of durations in atomics (the engine thread records, a scrape reads), over `N` bucket bounds.
#[derive(Debug)]
pub struct Times<const N: usize> {
    pub bounds: &'static [f64; N],
    pub buckets: [AtomicU64; N],
    pub count: AtomicU64,
    pub sum_us: AtomicU64,
}

/// Step durations ([`STEP_SECONDS_BUCKETS`]).
pub type StepTimes = Times<{ STEP_SECONDS_BUCKETS.len() }>;
/// Queue durations ([`QUEUE_SECONDS_BUCKETS`]).
pub type QueueTimes = Times<{ QUEUE_SECONDS_BUCKETS.len() }>;

impl Default for StepTimes {
    fn default() -> Self {
        Self::new(&STEP_SECONDS_BUCKETS)
    }
}

impl Default for QueueTimes {
    fn default() -> Self {
        Self::new(&QUEUE_SECONDS_BUCKETS)
    }
}

impl<const N: usize> Times<N> {
    pub fn new(bounds: &'static [f64; N]) -> Self {
        Self { bounds, buckets: std::array::from_fn(|_| AtomicU64::new(0)), count: AtomicU64::new(0), sum_us: AtomicU64::new(0) }
    }

    pub fn record(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|&b| s <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_us.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

enum Command {
    Add(Box<EngineRequest>, tmpsc::UnboundedSender<EngineOutput>),
    Abort(String, Option<u32>, oneshot::Sender<bool>),
}

/// A cloneable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    cmd: mpsc::Sender<Command>,
    pub stats: Arc<EngineStats>,
    /// The prefix-cache index changes, numbered (the `KvEvents` stream).
    pub kv_events: Arc<KvEventLog>,
    pub(crate) started: Instant,
    /// Set once, when the engine stopped on a fatal backend error.
    fatal: watch::Receiver<Option<String>>,
}

impl EngineHandle {
    /// Submits a request; outputs arrive on the returned channel. Dropping the receiver aborts the request.
    pub fn submit(&self, req: EngineRequest) -> tmpsc::UnboundedReceiver<EngineOutput> {
        let (tx, rx) = tmpsc::unbounded_channel();
        if let Err(mpsc::SendError(Command::Add(_, tx))) = self.cmd.send(Command::Add(Box::new(req), tx)) {
            let _ = tx.send(EngineOutput::Rejected(EngineError::ShutDown));
        }
        rx
    }

    /// Aborts a request by id, or with `index` only that completion of its `n` (the router stops a choice that hit
    /// a stop string while the others go on); true if it was running or waiting.
    pub async fn abort(&self, request_id: &str, index: Option<u32>) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.cmd.send(Command::Abort(request_id.to_string(), index, tx)).is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// Resolves with the error when the engine stops on a fatal backend error (a failed device or tensor-parallel
    /// group); never resolves otherwise. The worker exits non-zero on it.
    pub async fn failed(&self) -> String {
        let mut rx = self.fatal.clone();
        let why = rx.wait_for(Option::is_some).await.ok().and_then(|why| why.clone());
        match why {
            Some(why) => why,
            // The engine ended without a fatal error (every handle dropped): nothing to report.
            None => std::future::pending().await,
        }
    }

    /// The fatal error the engine stopped on, if it did.
    pub fn fatal_error(&self) -> Option<String> {
        self.fatal.borrow().clone()
    }

    /// Milliseconds since the engine last finished a step.
    pub fn last_step_age_ms(&self) -> u64 {
        let now = self.started.elapsed().as_millis() as u64;
        now.saturating_sub(self.stats.last_step_end_ms.load(Ordering::Relaxed))
    }

    /// Whether the engine is alive, and the age of its last step in milliseconds while it has work (0 when idle).
    /// Dead: it stopped on a fatal error, or a busy engine has not finished a step in [`STUCK_STEP_MS`] (the
    /// watchdog rule of ARCHITECTURE.md: a hung device or NCCL collective). One rule for the gRPC `Health` and the
    /// HTTP liveness probe.
    pub fn liveness(&self) -> (bool, u64) {
        let busy = self.stats.running.load(Ordering::Relaxed) + self.stats.waiting.load(Ordering::Relaxed) > 0;
        let age = if busy { self.last_step_age_ms() } else { 0 };
        (self.fatal_error().is_none() && age < STUCK_STEP_MS, age)
    }
}

/// A busy engine whose last step ended longer ago than this is stuck.
pub const STUCK_STEP_MS: u64 = 30_000;

/// The engine (runs on its own thread; see [`Engine::spawn`]).
pub struct Engine {
    backend: Box<dyn Backend>,
    core: EngineCore,
    rx: mpsc::Receiver<Command>,
    /// Output channel of every request the core holds.
    txs: HashMap<Arc<str>, tmpsc::UnboundedSender<EngineOutput>>,
    /// When each request the core holds and has not admitted yet arrived.
    arrived: HashMap<Arc<str>, Instant>,
    stats: Arc<EngineStats>,
    kv_events: Arc<KvEventLog>,
    started: Instant,
    fatal: watch::Sender<Option<String>>,
    /// Sizes steps while streams decode (`EngineConfig::decode_step_target`).
    pacer: Option<StepPacer>,
}

impl Engine {
    /// Starts the engine thread over `backend`; the KV pool is sized from the backend's blocks.
    pub fn spawn(backend: Box<dyn Backend>, cfg: EngineConfig) -> std::io::Result<EngineHandle> {
        let (tx, rx) = mpsc::channel();
        let (fatal, fatal_rx) = watch::channel(None);
        let stats = Arc::new(EngineStats::default());
        let started = Instant::now();
        let thread_stats = Arc::clone(&stats);
        let kv_events = Arc::new(KvEventLog::new(DEFAULT_CAPACITY));
        let thread_kv_events = Arc::clone(&kv_events);
        // The core's block pool is single-threaded (`Rc`), so the core is built on the engine thread.
        std::thread::Builder::new().name("ferrite-engine".into()).spawn(move || {
            let pacer = cfg.decode_step_target.map(|t| StepPacer::new(t, cfg.scheduler.max_num_batched_tokens));
            let core = EngineCore::new(cfg, &backend.info());
            let engine = Engine {
                backend,
                core,
                rx,
                txs: HashMap::new(),
                arrived: HashMap::new(),
                stats: thread_stats,
                kv_events: thread_kv_events,
                started,
                fatal,
                pacer,
            };
            engine.publish();
            engine.run();
        })?;
        Ok(EngineHandle { cmd: tx, stats, kv_events, started, fatal: fatal_rx })
    }

    fn run(mut self) {
        loop {
            if self.core.is_idle() {
                match self.rx.recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(_) => return, // every handle dropped
                }
            }
            loop {
                match self.rx.try_recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) if self.core.is_idle() => return,
                    Err(TryRecvError::Disconnected) => break,
                }
            }
            self.reap_disconnected();
            // Running sequences decode one token each: a step computing more than that many included prompt tokens.
            // (The count the last publish stored: no second walk over the core's queues per step.)
            let running_before = self.stats.running.load(Ordering::Relaxed) as usize;
            let started = Instant::now();
            let out = self.core.step(&mut *self.backend);
            for id in &out.admitted {
                if let Some(t) = self.arrived.remove(id) {
                    // Queued until the step that admitted it began.
                    self.stats.queue_times.record(started.saturating_duration_since(t));
                }
            }
            if out.num_tokens > 0 {
                let elapsed = started.elapsed();
                let phase = if out.num_tokens > running_before { StepPhase::Prefill } else { StepPhase::Decode };
                self.stats.step_times[phase as usize].record(elapsed);
                if let Some(pacer) = &mut self.pacer {
                    // Running sequences compute one token each unless prefilling: the rest are prompt tokens (a lower
                    // bound: a running prefill counts once among `running_before`).
                    pacer.observe(out.num_tokens, out.num_tokens.saturating_sub(running_before), elapsed);
                    self.core.set_decode_step_tokens(pacer.tokens());
                }
            }
            // Stats and KV events first, so a client that has seen an output never reads older numbers or misses the
            // blocks its prompt stored.
            self.publish();
            self.kv_events.publish(out.kv_events);
            let ended = out.outputs.iter().any(|e| e.last);
            self.deliver(out.outputs);
            if ended {
                self.kv_events.touch();
            }
            if let Some(e) = out.fatal {
                return self.stop_fatal(&e);
            }
            if out.num_tokens == 0 {
                // Nothing could run (the core is idle after aborts, say): wait for news.
                match self.rx.recv_timeout(Duration::from_millis(5)) {
                    Ok(cmd) => self.handle(cmd),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) if self.core.is_idle() => return,
                    Err(RecvTimeoutError::Disconnected) => {}
                }
            }
        }
    }

    /// A fatal backend error (the core has failed every request, the stats show an empty engine): the handle's
    /// `failed()` resolves, and the thread ends (later submissions are rejected as shut down).
    fn stop_fatal(self, e: &BackendError) {
        tracing::error!(error = %e, "the backend failed for good; the engine stops");
        self.fatal.send_replace(Some(e.to_string()));
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Add(mut req, tx) => {
                // The core draws no randomness: an unseeded request gets its random seed here.
                req.sampling.seed = Some(req.sampling.seed.unwrap_or_else(rand::random));
                let request_id: Arc<str> = req.request_id.as_str().into();
                match self.core.add(*req) {
                    Ok(()) => {
                        self.arrived.insert(Arc::clone(&request_id), Instant::now());
                        self.txs.insert(request_id, tx);
                    }
                    Err(e) => {
                        let _ = tx.send(EngineOutput::Rejected(e));
                    }
                }
            }
            Command::Abort(id, index, reply) => {
                let found = self.core.abort(&id, index);
                self.publish();
                let outputs = self.core.take_outputs();
                self.deliver(outputs);
                let _ = reply.send(found);
            }
        }
    }

    /// Sends each output to its request's channel (a closed one is fine: the request is aborted at the next reap);
    /// a request's last output drops its channel.
    fn deliver(&mut self, outputs: Vec<Emitted>) {
        for e in outputs {
            if let Some(tx) = self.txs.get(&e.request_id) {
                let _ = tx.send(e.output);
            }
            if e.last {
                self.txs.remove(&e.request_id);
                self.arrived.remove(&e.request_id);
            }
        }
    }

    fn reap_disconnected(&mut self) {
        let gone: Vec<Arc<str>> = self.txs.iter().filter(|(_, tx)| tx.is_closed()).map(|(id, _)| Arc::clone(id)).collect();
        for id in gone {
            tracing::debug!(request_id = %id, "client went away; aborting");
            self.core.abort(&id, None);
            let outputs = self.core.take_outputs();
            self.deliver(outputs);
        }
    }

    fn publish(&self) {
        let s = &self.stats;
        let c = self.core.stats();
        s.running.store(c.running as u64, Ordering::Relaxed);
        s.waiting.store(c.waiting as u64, Ordering::Relaxed);
        s.waiting_prefill_tokens.store(c.waiting_prefill_tokens as u64, Ordering::Relaxed);
        s.kv_blocks_total.store(c.kv.total as u64, Ordering::Relaxed);
        s.kv_blocks_used.store(c.kv.in_use as u64, Ordering::Relaxed);
        s.kv_blocks_cached_free.store(c.kv.cached_free as u64, Ordering::Relaxed);
        s.prefix_queries.store(c.prefix_queries, Ordering::Relaxed);
        s.prefix_hits.store(c.prefix_hits, Ordering::Relaxed);
        s.prefix_hit_tokens.store(c.prefix_hit_tokens, Ordering::Relaxed);
        s.preemptions.store(c.preemptions, Ordering::Relaxed);
        s.aborts.store(c.aborts, Ordering::Relaxed);
        s.steps.store(c.steps, Ordering::Relaxed);
        s.batch_tokens.store(c.batch_tokens, Ordering::Relaxed);
        s.generated_tokens.store(c.generated_tokens, Ordering::Relaxed);
        s.last_step_end_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}
