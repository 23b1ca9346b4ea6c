//! Prometheus metrics of a worker, rendered as Prometheus text (the `ferrite` binary serves them on `/metrics` beside
//! the gRPC port; this crate speaks no HTTP).
//!
//! Values live in the engine's atomic [`EngineStats`]; a scrape copies them into the registry, so the engine thread
//! never touches Prometheus types. Labels are bounded (never request ids or user text).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use prometheus::{Encoder, IntCounter, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::engine::core::{EngineHandle, EngineStats};

/// Metric names (one place, mirrored in the Grafana dashboard later).
pub mod names {
    pub const RUNNING: &str = "ferrite_worker_running";
    pub const WAITING: &str = "ferrite_worker_waiting";
    pub const KV_BLOCKS: &str = "ferrite_worker_kv_blocks";
    pub const PREFIX_QUERIES: &str = "ferrite_worker_prefix_cache_queries_total";
    pub const PREFIX_HITS: &str = "ferrite_worker_prefix_cache_hits_total";
    pub const PREFIX_HIT_TOKENS: &str = "ferrite_worker_prefix_hit_tokens_total";
    pub const PREEMPTIONS: &str = "ferrite_worker_preemptions_total";
    pub const ABORTS: &str = "ferrite_worker_aborts_total";
    pub const STEPS: &str = "ferrite_worker_steps_total";
    pub const GENERATED: &str = "ferrite_worker_generated_tokens_total";
    pub const BATCH_TOKENS: &str = "ferrite_worker_batch_tokens";
}

/// A counter and the engine statistic it mirrors.
type CounterSource = (IntCounter, fn(&EngineStats) -> u64);

/// The registry and its metrics.
pub struct WorkerMetrics {
    registry: Registry,
    stats: Arc<EngineStats>,
    running: IntGauge,
    waiting: IntGauge,
    kv_blocks: IntGaugeVec,
    batch_tokens: IntGauge,
    counters: Vec<CounterSource>,
    scrape: Mutex<()>,
}

impl WorkerMetrics {
    pub fn new(engine: &EngineHandle) -> prometheus::Result<Self> {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| -> prometheus::Result<IntGauge> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let kv_blocks = IntGaugeVec::new(Opts::new(names::KV_BLOCKS, "KV cache blocks by state"), &["state"])?;
        registry.register(Box::new(kv_blocks.clone()))?;
        let counters: Vec<CounterSource> = vec![
            (counter(names::PREFIX_QUERIES, "Prefix-cache block lookups")?, |s| s.prefix_queries.load(Ordering::Relaxed)),
            (counter(names::PREFIX_HITS, "Prefix-cache block hits")?, |s| s.prefix_hits.load(Ordering::Relaxed)),
            (counter(names::PREFIX_HIT_TOKENS, "Prompt tokens served from the prefix cache")?, |s| {
                s.prefix_hit_tokens.load(Ordering::Relaxed)
            }),
            (counter(names::PREEMPTIONS, "Sequences preempted (recomputed later)")?, |s| s.preemptions.load(Ordering::Relaxed)),
            (counter(names::ABORTS, "Requests aborted (Abort RPC or client gone)")?, |s| s.aborts.load(Ordering::Relaxed)),
            (counter(names::STEPS, "Engine steps run")?, |s| s.steps.load(Ordering::Relaxed)),
            (counter(names::GENERATED, "Tokens generated")?, |s| s.generated_tokens.load(Ordering::Relaxed)),
        ];
        Ok(Self {
            running: gauge(names::RUNNING, "Sequences running")?,
            waiting: gauge(names::WAITING, "Sequences waiting")?,
            batch_tokens: gauge(names::BATCH_TOKENS, "Tokens in the last engine step")?,
            kv_blocks,
            counters,
            stats: Arc::clone(&engine.stats),
            registry,
            scrape: Mutex::new(()),
        })
    }

    /// The Prometheus text exposition of the current values.
    pub fn render(&self) -> String {
        let _guard = self.scrape.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let s = &self.stats;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as i64;
        self.running.set(load(&s.running));
        self.waiting.set(load(&s.waiting));
        self.batch_tokens.set(load(&s.batch_tokens));
        let (total, used, cached) = (load(&s.kv_blocks_total), load(&s.kv_blocks_used), load(&s.kv_blocks_cached_free));
        self.kv_blocks.with_label_values(&["used"]).set(used);
        self.kv_blocks.with_label_values(&["cached_free"]).set(cached);
        self.kv_blocks.with_label_values(&["free"]).set(total - used - cached);
        for (c, read) in &self.counters {
            c.reset();
            c.inc_by(read(s));
        }
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
