//! Routing policies and the pure cost function of cache-aware routing (design doc §6 "Cost function").
//!
//! `cost_w = α·max(0, prefill_w) + decode_w + β·running_w`, with `prefill_w = (waiting_prefill_tokens_w + prompt_len
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

/// Weight of the prefill term (Dynamo's `overlap_score_weight`).
pub const ALPHA: f64 = 1.0;
/// Weight of the running-request count.
pub const BETA: f64 = 0.1;
/// sgl-router's `balance_abs_threshold`.
pub const BALANCE_ABS: usize = 64;
/// sgl-router's `balance_rel_threshold`.
pub const BALANCE_REL: f64 = 1.5;

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
pub fn cost(c: &Candidate, prompt_len: usize, block_size: usize) -> f64 {
    let b = block_size.max(1) as f64;
    let prefill = (c.waiting_prefill_tokens as f64 + prompt_len as f64 - (c.overlap_blocks as f64) * b) / b;
    let decode = c.kv_blocks_used as f64 + c.inflight as f64;
    ALPHA * prefill.max(0.0) + decode + BETA * c.running as f64
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
/// flight, then the first).
pub fn choose(cands: &[Candidate], prompt_len: usize, block_size: usize) -> Option<usize> {
    if imbalanced(cands) {
        return least_loaded(cands);
    }
    cands
        .iter()
        .enumerate()
        .map(|(i, c)| (i, cost(c, prompt_len, block_size), c.inflight))
        .min_by(|a, b| a.1.total_cmp(&b.1).then(a.2.cmp(&b.2)).then(a.0.cmp(&b.0)))
        .map(|(i, _, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_worked_numbers() {
        // B = 16, a 100-token prompt. Idle worker, no overlap: 100/16 = 6.25.
        let idle = Candidate::default();
        assert_eq!(cost(&idle, 100, 16), 6.25);
        // Holding 6 leading blocks (96 tokens): (100 − 96)/16 = 0.25.
        let warm = Candidate { overlap_blocks: 6, ..idle };
        assert_eq!(cost(&warm, 100, 16), 0.25);
        // Overlap beyond the prompt never makes prefill negative: max(0, (0 + 32 − 96)/16) = 0; plus 10 used blocks,
        // 2 in flight and 0.1·5 running = 12.5.
        let busy = Candidate { overlap_blocks: 6, kv_blocks_used: 10, inflight: 2, running: 5, waiting_prefill_tokens: 0 };
        assert_eq!(cost(&busy, 32, 16), 12.5);
        // A queue of 160 prompt tokens adds 10 blocks of prefill: (160 + 100 − 96)/16 = 10.25.
        let queued = Candidate { waiting_prefill_tokens: 160, ..warm };
        assert_eq!(cost(&queued, 100, 16), 10.25);
    }

    #[test]
    fn choose_prefers_the_overlap_until_load_outweighs_it() {
        let cold = Candidate::default();
        let warm = Candidate { overlap_blocks: 6, ..cold };
        assert_eq!(choose(&[cold, warm], 100, 16), Some(1));
        // 7 used blocks on the warm worker: 0.25 + 7 = 7.25 > 6.25 ⇒ the cold one.
        assert_eq!(choose(&[cold, Candidate { kv_blocks_used: 7, ..warm }], 100, 16), Some(0));
        // Equal costs: the one with fewer in flight, then the first.
        assert_eq!(choose(&[cold, cold], 100, 16), Some(0));
        assert_eq!(choose(&[], 100, 16), None);
    }

    #[test]
    fn the_imbalance_guard_falls_back_to_least_loaded() {
        // 100 vs 30 in flight: differ by 70 > 64 and 100 > 45 ⇒ least-loaded, despite the overlap on worker 0.
        let a = Candidate { overlap_blocks: 1000, inflight: 100, ..Candidate::default() };
        let b = Candidate { inflight: 30, ..Candidate::default() };
        assert!(imbalanced(&[a, b]));
        assert_eq!(choose(&[a, b], 16_000, 16), Some(1));
        // 100 vs 70: differ by only 30 ⇒ no guard; the cost decides (a: 0 + 100 = 100, b: 1000 + 70).
        let b = Candidate { inflight: 70, ..b };
        assert!(!imbalanced(&[a, b]));
        assert_eq!(choose(&[a, b], 16_000, 16), Some(0));
        // 200 vs 135: differ by 65 > 64, but 200 ≤ 1.5·135 = 202.5 ⇒ no guard.
        assert!(!imbalanced(&[Candidate { inflight: 200, ..a }, Candidate { inflight: 135, ..b }]));
        assert!(imbalanced(&[Candidate { inflight: 200, ..a }, Candidate { inflight: 133, ..b }]));
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
