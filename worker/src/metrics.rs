//! Prometheus metrics of a worker, rendered as Prometheus text (the `ferrite` binary serves them on `/metrics` beside
//! the gRPC port; this crate speaks no HTTP).
//!
//! Values live in the engine's atomic [`EngineStats`]; a scrape copies them into the registry, so the engine thread
//! never touches Prometheus types. The step-time and queue-time histograms are kept in atomics too ([`Times`]) and
//! handed to the registry by a small [`Collector`] at scrape time. Labels are bounded (never request ids or user text).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{Bucket, Histogram, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{Encoder, Gauge, IntCounter, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::engine::core::{EngineHandle, EngineStats, StepPhase, Times};

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
    pub const KV_USAGE: &str = "ferrite_worker_kv_usage_ratio";
    pub const STEP_SECONDS: &str = "ferrite_worker_step_seconds";
    pub const QUEUE_SECONDS: &str = "ferrite_worker_queue_seconds";
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
    kv_usage: Gauge,
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
        let kv_usage = Gauge::new(names::KV_USAGE, "Share of KV cache blocks held by running sequences (0..1)")?;
        registry.register(Box::new(kv_usage.clone()))?;
        registry.register(Box::new(StepCollector::new(Arc::clone(&engine.stats))?))?;
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
            kv_usage,
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
        self.kv_usage.set(if total > 0 { used as f64 / total as f64 } else { 0.0 });
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

/// Exposes the engine's histograms: `ferrite_worker_step_seconds{phase}` and `ferrite_worker_queue_seconds`.
struct StepCollector {
    stats: Arc<EngineStats>,
    step: Desc,
    queue: Desc,
}

impl StepCollector {
    fn new(stats: Arc<EngineStats>) -> prometheus::Result<Self> {
        let help = "Engine step duration by phase (prefill: the step computed prompt tokens; decode: only decodes)";
        let step = Desc::new(names::STEP_SECONDS.into(), help.into(), vec!["phase".into()], Default::default())?;
        let help = "Time a request waited in the worker's queue before its first step (arrival at the engine to admission)";
        let queue = Desc::new(names::QUEUE_SECONDS.into(), help.into(), vec![], Default::default())?;
        Ok(Self { stats, step, queue })
    }
}

fn histogram<const N: usize>(t: &Times<N>) -> Histogram {
    let mut h = Histogram::default();
    let mut cumulative = 0;
    let buckets = t
        .bounds
        .iter()
        .zip(&t.buckets)
        .map(|(&upper, n)| {
            cumulative += n.load(Ordering::Relaxed);
            let mut b = Bucket::default();
            b.set_upper_bound(upper);
            b.set_cumulative_count(cumulative);
            b
        })
        .collect();
    h.set_bucket(buckets);
    // Read the count after the buckets: a sample recorded in between shows in `+Inf` only, never as a missing one.
    h.set_sample_count(t.count.load(Ordering::Relaxed).max(cumulative));
    h.set_sample_sum(t.sum_us.load(Ordering::Relaxed) as f64 / 1e6);
    h
}

fn family(desc: &Desc, metrics: Vec<Metric>) -> MetricFamily {
    let mut family = MetricFamily::default();
    family.set_name(desc.fq_name.clone());
    family.set_help(desc.help.clone());
    family.set_field_type(MetricType::HISTOGRAM);
    family.set_metric(metrics);
    family
}

impl Collector for StepCollector {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.step, &self.queue]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let steps = StepPhase::ALL
            .iter()
            .map(|&phase| {
                let mut label = LabelPair::default();
                label.set_name("phase".into());
                label.set_value(phase.as_str().into());
                let mut m = Metric::default();
                m.set_label(vec![label]);
                m.set_histogram(histogram(&self.stats.step_times[phase as usize]));
                m
            })
            .collect();
        let mut queue = Metric::default();
        queue.set_histogram(histogram(&self.stats.queue_times));
        vec![family(&self.step, steps), family(&self.queue, vec![queue])]
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    use crate::engine::core::StepTimes;

    #[test]
    fn step_times_land_in_cumulative_buckets() {
        let t = StepTimes::default();
        for ms in [0.5, 3.0, 3.0, 40.0, 20_000.0] {
            t.record(Duration::from_secs_f64(ms / 1e3));
        }
        let h = histogram(&t);
        let cum: Vec<u64> = h.get_bucket().iter().map(|b| b.cumulative_count()).collect();
        // ≤1 ms: 1; ≤2.5 ms: 1; ≤5 ms: 3; ≤10, ≤25 ms: 3; ≤50 ms and up: 4; 20 s is past the last bucket (+Inf only).
        assert_eq!(cum, vec![1, 1, 3, 3, 3, 4, 4, 4, 4, 4, 4, 4, 4]);
        assert_eq!(h.get_sample_count(), 5);
        assert!((h.get_sample_sum() - 20.0465).abs() < 1e-9, "{}", h.get_sample_sum());
    }
}
