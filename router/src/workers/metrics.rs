//! The pool's Prometheus metrics (`ferrite_router_*`): routing decisions by policy and worker, retries, migrations,
//! KV index resyncs; and, set at scrape time, each worker's breaker state, the index size and the workers by state.
//! `ferrite_router_overlap_error_tokens` is how good the cache-aware guesses are: the prompt tokens the worker
//! reports cached minus the ones the KV index predicted (0: exact; negative: the index promised blocks the worker
//! no longer had). Worker labels are the members' addresses (bounded by the membership; a removed worker's series are dropped).

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

#[derive(Debug, Clone)]
pub struct PoolMetrics {
    routed: IntCounterVec,
    retries: IntCounter,
    migrations: IntCounterVec,
    resyncs: IntCounter,
    breaker: IntGaugeVec,
    index_blocks: IntGauge,
    workers: IntGaugeVec,
    overlap_error: Histogram,
}

impl PoolMetrics {
    pub fn new() -> prometheus::Result<Self> {
        Ok(Self {
            routed: IntCounterVec::new(
                Opts::new(
                    "ferrite_router_routed_total",
                    "Requests sent to a worker, by policy and worker (retries and migrations included)",
                ),
                &["policy", "worker"],
            )?,
            retries: IntCounter::new("ferrite_router_retries_total", "Requests retried on another worker before their first token")?,
            migrations: IntCounterVec::new(
                Opts::new("ferrite_router_migrations_total", "Streams whose worker failed after the first token, by outcome"),
                &["outcome"],
            )?,
            resyncs: IntCounter::new("ferrite_router_kv_index_resyncs_total", "KvEvents resync batches (full dumps) applied")?,
            breaker: IntGaugeVec::new(
                Opts::new("ferrite_router_worker_breaker_state", "Circuit breaker per worker: 0 closed, 1 half-open, 2 open"),
                &["worker"],
            )?,
            index_blocks: IntGauge::new("ferrite_router_kv_index_blocks", "Block hashes in the KV index, over all workers")?,
            workers: IntGaugeVec::new(Opts::new("ferrite_router_workers", "Pool members by state"), &["state"])?,
            overlap_error: Histogram::with_opts(
                HistogramOpts::new(
                    "ferrite_router_overlap_error_tokens",
                    "Cache-aware routing: prompt tokens the worker reported cached minus the ones the KV index predicted",
                )
                .buckets(vec![-1024.0, -256.0, -64.0, -16.0, -1.0, 0.0, 15.0, 63.0, 255.0, 1023.0]),
            )?,
        })
    }

    /// Registers every metric in `registry`.
    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.routed.clone()))?;
        registry.register(Box::new(self.retries.clone()))?;
        registry.register(Box::new(self.migrations.clone()))?;
        // Both outcomes exist from the start (at 0), so dashboards and alerts see the series before any migration.
        for outcome in ["migrated", "failed"] {
            self.migrations.with_label_values(&[outcome]);
        }
        registry.register(Box::new(self.resyncs.clone()))?;
        registry.register(Box::new(self.breaker.clone()))?;
        registry.register(Box::new(self.index_blocks.clone()))?;
        registry.register(Box::new(self.workers.clone()))?;
        registry.register(Box::new(self.overlap_error.clone()))?;
        Ok(())
    }

    pub fn routed(&self, policy: &str, worker: &str) {
        self.routed.with_label_values(&[policy, worker]).inc();
    }

    pub fn retry(&self) {
        self.retries.inc();
    }

    /// `outcome`: `migrated` or `failed` (past the limit, or nowhere to go).
    pub fn migration(&self, outcome: &str) {
        self.migrations.with_label_values(&[outcome]).inc();
    }

    /// A request's first answer: the worker reported `reported` cached prompt tokens, the index predicted `predicted`.
    pub fn overlap_error(&self, predicted: u32, reported: u32) {
        self.overlap_error.observe(f64::from(reported) - f64::from(predicted));
    }

    pub fn resync(&self) {
        self.resyncs.inc();
    }

    pub fn set_breaker(&self, worker: &str, state: i64) {
        self.breaker.with_label_values(&[worker]).set(state);
    }

    pub fn set_index_blocks(&self, n: usize) {
        self.index_blocks.set(n as i64);
    }

    pub fn set_workers(&self, state: &str, n: usize) {
        self.workers.with_label_values(&[state]).set(n as i64);
    }

    /// Drops a removed worker's series.
    pub fn forget(&self, worker: &str) {
        let _ = self.breaker.remove_label_values(&[worker]);
        for policy in ["cache-aware", "least-load", "round-robin"] {
            let _ = self.routed.remove_label_values(&[policy, worker]);
        }
    }
}
