//! Routing policies and the pure cost function of cache-aware routing (design doc §6 "Cost function").
//!
//! `cost_w = α·max(0, prefill_w) + decode_w + β·running_w` ([`CostWeights`]; a temperature above 0 draws from a
//! softmax over the costs instead of taking the lowest), with `prefill_w = (waiting_prefill_tokens_w + prompt_len
//! − overlap_w·B) / B` and `decode_w = kv_blocks_used_w + inflight_w` (the router's own in-flight requests stand in
//! for the load a report has not shown yet). sgl-router's imbalance guard overrides it: when in-flight loads differ by
//! more than 64 and by more than 1.5×, the least-loaded worker wins.

use std::fmt;
use std::str::FromStr;

/// How the router picks a worker for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Routing {
    /// The lowest [`cost`]: prefix-cache overlap from the KV index against the workers' reported load.
    #[default]
    CacheAware,
    /// The fewest requests in flight from this router (ties: the first worker).
    LeastLoad,
    /// Each worker in turn.
    RoundRobin,
}

impl Routing {
    pub fn as_str(self) -> &'static str {
        match self {
            Routing::CacheAware => "cache-aware",
            Routing::LeastLoad => "least-load",
            Routing::RoundRobin => "round-robin",
        }
    }
}

impl fmt::Display for Routing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A routing policy name that is not one of [`Routing`]'s.
#[derive(Debug, thiserror::Error)]
#[error("unknown routing policy `{0}` (expected cache-aware, least-load or round-robin)")]
pub struct UnknownRouting(pub String);

impl FromStr for Routing {
    type Err = UnknownRouting;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cache-aware" => Ok(Routing::CacheAware),
            "least-load" => Ok(Routing::LeastLoad),
            "round-robin" => Ok(Routing::RoundRobin),
            other => Err(UnknownRouting(other.to_string())),
        }
    }
}

/// Default weight of the prefill term (Dynamo's `overlap_score_weight`, which defaults to 1). 2 here: on CPU workers,
/// where prefill dominates, α = 1 gave up a warm worker as soon as it held one more running request than a cold one
/// (`scripts/bench-routing.sh`, BENCHMARKS.md: hit rate and TTFT below round-robin's on an 8-group workload).
pub const ALPHA: f64 = 2.0;
/// Weight of the running-request count.
pub const BETA: f64 = 0.1;
/// sgl-router's `balance_abs_threshold`.
pub const BALANCE_ABS: usize = 64;
/// sgl-router's `balance_rel_threshold`.
pub const BALANCE_REL: f64 = 1.5;

/// The tunable parts of [`cost`] and [`choose`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CostWeights {
    /// α: how much a block of prefill (queued or this prompt's uncached part) weighs against a block held by
    /// running sequences. Above 1 favours cache hits over balance (prefill-bound workers: CPUs, long prompts).
    pub prefill: f64,
    /// β: weight of the worker's running-request count.
    pub running: f64,
    /// 0: the lowest cost wins. Above 0: a worker is drawn with probability ∝ exp(−normalized cost / T)
    /// (Dynamo's router temperature), which spreads near-ties instead of piling them on one worker.
    pub temperature: f64,
}

impl Default for CostWeights {
    fn default() -> Self {
        Self { prefill: ALPHA, running: BETA, temperature: 0.0 }
    }
}

/// A [`CostWeights`] value out of range.
#[derive(Debug, thiserror::Error)]
pub enum CostWeightsError {
    #[error("routing prefill weight {0} is out of range (0, 100]")]
    Prefill(f64),
    #[error("routing temperature {0} is out of range [0, 10]")]
    Temperature(f64),
}

impl CostWeights {
    pub fn validate(&self) -> Result<(), CostWeightsError> {
        if !(self.prefill > 0.0 && self.prefill <= 100.0) {
            return Err(CostWeightsError::Prefill(self.prefill));
        }
        if !(0.0..=10.0).contains(&self.temperature) {
            return Err(CostWeightsError::Temperature(self.temperature));
        }
        Ok(())
    }
}

/// What the cost function knows about one worker.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Candidate {
    /// Leading blocks of the prompt the worker holds (KV index).
    pub overlap_blocks: usize,
    /// From the worker's last `LoadReport` (zero before the first).
    pub waiting_prefill_tokens: u64,
    pub kv_blocks_used: u64,
    pub running: u64,
    /// Requests this router has in flight on the worker.
    pub inflight: usize,
}

/// The cost of sending a `prompt_len`-token prompt to `c`, with `block_size` tokens per block.
pub fn cost(c: &Candidate, prompt_len: usize, block_size: usize, w: &CostWeights) -> f64 {
    let b = block_size.max(1) as f64;
    let prefill = (c.waiting_prefill_tokens as f64 + prompt_len as f64 - (c.overlap_blocks as f64) * b) / b;
    let decode = c.kv_blocks_used as f64 + c.inflight as f64;
    w.prefill * prefill.max(0.0) + decode + w.running * c.running as f64
}

/// The index of the worker with the fewest in-flight requests (ties: the first).
pub fn least_loaded(cands: &[Candidate]) -> Option<usize> {
    cands.iter().enumerate().min_by_key(|(_, c)| c.inflight).map(|(i, _)| i)
}

/// True when in-flight loads are so uneven that cache affinity must yield (sgl-router's guard).
pub fn imbalanced(cands: &[Candidate]) -> bool {
    let (Some(max), Some(min)) = (cands.iter().map(|c| c.inflight).max(), cands.iter().map(|c| c.inflight).min()) else {
        return false;
    };
    max - min > BALANCE_ABS && max as f64 > BALANCE_REL * min as f64
}

/// The cache-aware choice: least-loaded under the imbalance guard, else the lowest [`cost`] (ties: fewer in
/// flight, then the first), or with a temperature a softmax draw over the costs, using `u` (uniform in [0, 1)).
pub fn choose(cands: &[Candidate], prompt_len: usize, block_size: usize, w: &CostWeights, u: f64) -> Option<usize> {
    if imbalanced(cands) {
        return least_loaded(cands);
    }
    let costs: Vec<f64> = cands.iter().map(|c| cost(c, prompt_len, block_size, w)).collect();
    if w.temperature > 0.0 && cands.len() > 1 {
        return Some(softmax_draw(&costs, w.temperature, u));
    }
    cands
        .iter()
        .enumerate()
        .map(|(i, c)| (i, costs[i], c.inflight))
        .min_by(|a, b| a.1.total_cmp(&b.1).then(a.2.cmp(&b.2)).then(a.0.cmp(&b.0)))
        .map(|(i, _, _)| i)
}

/// Draws an index with probability ∝ exp(−(cost − min) / (max − min) / t): costs normalized to [0, 1] so the
/// temperature means the same whatever the prompt length (Dynamo's `softmax_sample`).
fn softmax_draw(costs: &[f64], t: f64, u: f64) -> usize {
    let (min, max) = costs.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &c| (lo.min(c), hi.max(c)));
    let span = if max > min { max - min } else { 1.0 };
    let weights: Vec<f64> = costs.iter().map(|&c| (-(c - min) / span / t).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut target = u.clamp(0.0, 1.0) * total;
    for (i, w) in weights.iter().enumerate() {
        if target < *w {
            return i;
        }
        target -= w;
    }
    costs.len() - 1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// α = 1, the worked numbers' weights.
    const W: CostWeights = CostWeights { prefill: 1.0, running: BETA, temperature: 0.0 };

    #[test]
    fn cost_worked_numbers() {
        // B = 16, a 100-token prompt. Idle worker, no overlap: 100/16 = 6.25.
        let idle = Candidate::default();
        assert_eq!(cost(&idle, 100, 16, &W), 6.25);
        // Holding 6 leading blocks (96 tokens): (100 − 96)/16 = 0.25.
        let warm = Candidate { overlap_blocks: 6, ..idle };
        assert_eq!(cost(&warm, 100, 16, &W), 0.25);
        // Overlap beyond the prompt never makes prefill negative: max(0, (0 + 32 − 96)/16) = 0; plus 10 used blocks,
        // 2 in flight and 0.1·5 running = 12.5.
        let busy = Candidate { overlap_blocks: 6, kv_blocks_used: 10, inflight: 2, running: 5, waiting_prefill_tokens: 0 };
        assert_eq!(cost(&busy, 32, 16, &W), 12.5);
        // A queue of 160 prompt tokens adds 10 blocks of prefill: (160 + 100 − 96)/16 = 10.25.
        let queued = Candidate { waiting_prefill_tokens: 160, ..warm };
        assert_eq!(cost(&queued, 100, 16, &W), 10.25);
    }

    #[test]
    fn choose_prefers_the_overlap_until_load_outweighs_it() {
        let cold = Candidate::default();
        let warm = Candidate { overlap_blocks: 6, ..cold };
        assert_eq!(choose(&[cold, warm], 100, 16, &W, 0.0), Some(1));
        // 7 used blocks on the warm worker: 0.25 + 7 = 7.25 > 6.25 ⇒ the cold one.
        assert_eq!(choose(&[cold, Candidate { kv_blocks_used: 7, ..warm }], 100, 16, &W, 0.0), Some(0));
        // Equal costs: the one with fewer in flight, then the first.
        assert_eq!(choose(&[cold, cold], 100, 16, &W, 0.0), Some(0));
        assert_eq!(choose(&[], 100, 16, &W, 0.0), None);
    }

    #[test]
    fn the_imbalance_guard_falls_back_to_least_loaded() {
        // 100 vs 30 in flight: differ by 70 > 64 and 100 > 45 ⇒ least-loaded, despite the overlap on worker 0.
        let a = Candidate { overlap_blocks: 1000, inflight: 100, ..Candidate::default() };
        let b = Candidate { inflight: 30, ..Candidate::default() };
        assert!(imbalanced(&[a, b]));
        assert_eq!(choose(&[a, b], 16_000, 16, &W, 0.0), Some(1));
        // 100 vs 70: differ by only 30 ⇒ no guard; the cost decides (a: 0 + 100 = 100, b: 1000 + 70).
        let b = Candidate { inflight: 70, ..b };
        assert!(!imbalanced(&[a, b]));
        assert_eq!(choose(&[a, b], 16_000, 16, &W, 0.0), Some(0));
        // 200 vs 135: differ by 65 > 64, but 200 ≤ 1.5·135 = 202.5 ⇒ no guard.
        assert!(!imbalanced(&[Candidate { inflight: 200, ..a }, Candidate { inflight: 135, ..b }]));
        assert!(imbalanced(&[Candidate { inflight: 200, ..a }, Candidate { inflight: 133, ..b }]));
    }

    #[test]
    fn a_heavier_prefill_weight_keeps_the_warm_worker_under_more_load() {
        // Warm worker: 6 of a 100-token prompt's blocks held, but 10 blocks held by running sequences: 0.25 + 10
        // against the cold worker's 6.25 at α = 1; at α = 2 the cold prefill costs 12.5 and the warm one 10.5.
        let cold = Candidate::default();
        let warm = Candidate { overlap_blocks: 6, kv_blocks_used: 10, ..cold };
        assert_eq!(choose(&[cold, warm], 100, 16, &W, 0.0), Some(0));
        let w2 = CostWeights { prefill: 2.0, ..W };
        assert_eq!(choose(&[cold, warm], 100, 16, &w2, 0.0), Some(1));
        assert!(CostWeights { prefill: 0.0, ..W }.validate().is_err());
        assert!(CostWeights { temperature: -1.0, ..W }.validate().is_err());
        assert!(W.validate().is_ok());
    }

    #[test]
    fn a_temperature_draws_in_proportion_to_the_softmax_of_the_normalized_costs() {
        // Costs 6.25 (cold) and 0.25 (warm) normalize to 1 and 0: at T = 1 the weights are e^-1 and 1, so the warm
        // worker is drawn for u below 1/(1 + e^-1) ≈ 0.731 and the cold one above.
        let t1 = CostWeights { temperature: 1.0, ..W };
        let cands = [Candidate { overlap_blocks: 6, ..Candidate::default() }, Candidate::default()];
        let p_warm = 1.0 / (1.0 + (-1.0f64).exp());
        assert_eq!(choose(&cands, 100, 16, &t1, p_warm - 1e-9), Some(0));
        assert_eq!(choose(&cands, 100, 16, &t1, p_warm + 1e-9), Some(1));
        // Over a uniform grid the draw frequencies follow the weights; a cold T keeps almost everything on the best.
        let share = |t: f64| {
            let w = CostWeights { temperature: t, ..W };
            (0..1000).filter(|i| choose(&cands, 100, 16, &w, (*i as f64 + 0.5) / 1000.0) == Some(0)).count()
        };
        assert_eq!(share(1.0), 731);
        assert_eq!(share(0.1), 1000);
        // Equal costs: an even split.
        assert_eq!((0..1000).filter(|i| choose(&[cands[1], cands[1]], 100, 16, &t1, (*i as f64 + 0.5) / 1000.0) == Some(0)).count(), 500);
    }

    #[test]
    fn routing_names_round_trip() {
        for r in [Routing::CacheAware, Routing::LeastLoad, Routing::RoundRobin] {
            assert_eq!(r.to_string().parse::<Routing>().unwrap(), r);
        }
        assert!("random".parse::<Routing>().is_err());
        assert_eq!(Routing::default(), Routing::CacheAware);
    }
}
