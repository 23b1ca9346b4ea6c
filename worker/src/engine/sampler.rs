//! Per-sequence token sampling, in vLLM v1's order of operations:
//!
//! 1. logprobs (when asked) from the **raw** logits: log-softmax before any processing (vLLM's default
//!    `logprobs_mode = raw_logprobs`), with the normalizer summed in f64;
//! 2. logit bias; repetition penalty over prompt ∪ output (positive logits divided, others multiplied); frequency
//!    (count × penalty) and presence (once) penalties over the output only; while fewer than `min_tokens` are
//!    generated, the stop ids and the model's eos ids are masked to -inf (vLLM's `MinTokensLogitsProcessor` over
//!    `all_stop_token_ids`, which holds the eos ids even with `ignore_eos`: that flag only tells the engine not to
//!    stop on eos, the sampler never reads it). [`Sampler::prepare`] turns these into one `Adjust` per token;
//! 3. temperature, top-k, top-p, min-p and the draw: `ferrite_kernels::cpu::sample` (the same algorithm the CUDA
//!    backend runs on the device, `Backend::forward_sample`), with one uniform per draw from Philox keyed by the
//!    sequence's seed and counted by its draw number.
//!
//! The seed is the request seed mixed with the completion index, so the `n` completions of a request differ, each
//! is reproducible, and the same seed gives the same tokens whatever else is in the batch, and on either backend
//! (up to the backends' logits).
//!
//! NaN logits count as -inf and +inf as `f32::MAX`; nothing here panics on any logits. Full sorts happen only for
//! top-p, and over the k survivors when top-k is set; the default sampling path (no top-k/top-p) does not sort.

use std::collections::{BTreeMap, HashMap, HashSet};

use ferrite_common::sampling::{SamplingParams, StoppingParams};
use ferrite_kernels::cpu::sample::{Adjust, SampleParams, SampleScratch, uniform};

use crate::backend::RowSampling;

/// Temperatures below this are greedy (vLLM's `_SAMPLING_EPS`); it also keeps `1 / temperature` finite.
const GREEDY_BELOW: f32 = ferrite_kernels::cpu::sample::GREEDY_BELOW;

/// Log-probability info for one sampled token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    /// The most likely tokens with their logprobs, best first (lower id first on ties).
    pub top: Vec<(u32, f32)>,
}

/// The sampling state of one sequence (one of the `n` completions of a request).
pub struct Sampler {
    params: SamplingParams,
    logprobs: bool,
    top_logprobs: usize,
    min_tokens: usize,
    /// Stop ids and eos ids, masked while fewer than `min_tokens` tokens are generated.
    stop_ids: Vec<u32>,
    /// The Philox key of this sequence, and how many uniforms it has drawn.
    seed: u64,
    draws: u64,
    /// Output token → occurrences (presence, frequency and repetition penalties).
    counts: HashMap<u32, u32>,
    /// Prompt tokens (repetition penalty); left empty when that penalty is off.
    prompt_tokens: HashSet<u32>,
    /// Scratch: sanitized raw logits for logprobs.
    raw: Vec<f32>,
    /// Scratch: (logit, id) candidates for the top logprobs.
    cand: Vec<(f32, u32)>,
    scratch: SampleScratch,
}

impl Sampler {
    /// `seed`: the request's seed (or one drawn by the engine), mixed with `index`, the completion index among `n`.
    /// `eos_ids`: the model's eos ids, masked (with the stop ids) until `stop.min_tokens` tokens are generated.
    pub fn new(params: SamplingParams, stop: &StoppingParams, eos_ids: &[u32], prompt: &[u32], seed: u64, index: u32) -> Self {
        let mut stop_ids = stop.stop_token_ids.clone();
        stop_ids.extend_from_slice(eos_ids);
        let prompt_tokens = if params.repetition_penalty != 1.0 { prompt.iter().copied().collect() } else { HashSet::new() };
        Self {
            logprobs: stop.logprobs,
            top_logprobs: stop.top_logprobs as usize,
            min_tokens: stop.min_tokens as usize,
            stop_ids,
            seed: seed ^ u64::from(index).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            draws: 0,
            counts: HashMap::new(),
            prompt_tokens,
            raw: Vec::new(),
            cand: Vec::new(),
            scratch: SampleScratch::default(),
            params,
        }
    }

    /// Whether the next token is plain argmax of the raw logits (greedy, no bias, no penalties, no logprobs, past
    /// `min_tokens`), so the backend may take it where the logits are ([`crate::backend::Backend::forward_greedy`]).
    pub(crate) fn is_plain_greedy(&self, num_generated: usize) -> bool {
        let p = &self.params;
        p.temperature < GREEDY_BELOW
            && !self.logprobs
            && p.logit_bias.is_empty()
            && p.repetition_penalty == 1.0
            && p.presence_penalty == 0.0
            && p.frequency_penalty == 0.0
            && num_generated >= self.min_tokens
    }

    /// Whether the next token needs the logits on the host (logprobs); otherwise the backend may sample it
    /// ([`crate::backend::Backend::forward_sample`]).
    pub(crate) fn needs_logits(&self) -> bool {
        self.logprobs
    }

    /// Records a generated token for the penalties. The engine calls this after the token is chosen.
    pub fn record(&mut self, token: u32) {
        *self.counts.entry(token).or_default() += 1;
    }

    /// Everything needed to draw the next token (`num_generated` tokens so far), wherever the logits are: the
    /// filters, the per-token adjustments and the next uniform (this consumes a draw).
    pub fn prepare(&mut self, num_generated: usize) -> RowSampling {
        let p = &self.params;
        let mut adj: BTreeMap<u32, Adjust> = BTreeMap::new();
        for &(id, b) in &p.logit_bias {
            adj_entry(&mut adj, id).bias += b;
        }
        if p.repetition_penalty != 1.0 {
            for &t in self.prompt_tokens.iter().chain(self.counts.keys()) {
                adj_entry(&mut adj, t).repeat = true;
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &c) in &self.counts {
                adj_entry(&mut adj, t).sub = p.frequency_penalty * c as f32 + p.presence_penalty;
            }
        }
        if num_generated < self.min_tokens {
            for &t in &self.stop_ids {
                adj_entry(&mut adj, t).mask = true;
            }
        }
        let u = uniform(self.seed, self.draws);
        self.draws += 1;
        RowSampling {
            params: SampleParams { temperature: p.temperature, top_k: p.top_k, top_p: p.top_p, min_p: p.min_p },
            repetition: p.repetition_penalty,
            adjust: adj.into_values().collect(),
            u,
            mask: None,
        }
    }

    /// Picks the next token from the raw logits of the last position (`logits` is scratch and gets modified).
    /// `num_generated` is the number of tokens this sequence has generated so far.
    pub(crate) fn sample(&mut self, logits: &mut [f32], num_generated: usize) -> (u32, Option<TokenLogprob>) {
        // Raw logprobs need the unprocessed logit of the token chosen later, so keep a copy only when asked.
        let lse = if self.logprobs {
            self.raw.clear();
            self.raw.extend(logits.iter().map(|&l| if l.is_nan() { f32::NEG_INFINITY } else { l.min(f32::MAX) }));
            Some(log_sum_exp(&self.raw))
        } else {
            None
        };
        let row = self.prepare(num_generated);
        let token = row.sample_host(logits, &mut self.scratch);
        let info = lse.map(|lse| {
            let (max, ln_z) = lse;
            let lp = |l: f32| ((f64::from(l) - max) - ln_z) as f32;
            let logprob = self.raw.get(token as usize).map_or(f32::NEG_INFINITY, |&l| lp(l));
            let top = top_n(&self.raw, self.top_logprobs, &mut self.cand).into_iter().map(|(id, l)| (id, lp(l))).collect();
            TokenLogprob { token, logprob, top }
        });
        (token, info)
    }
}

fn adj_entry(adj: &mut BTreeMap<u32, Adjust>, id: u32) -> &mut Adjust {
    adj.entry(id).or_insert(Adjust { id, bias: 0.0, repeat: false, sub: 0.0, mask: false })
}

pub use ferrite_kernels::cpu::ops::argmax;

/// `(max, ln Σ exp(v - max))` in f64 (`v` holds no NaN or +inf), so a log-softmax is `(x - max) - ln_z` without
/// losing precision to a huge `max`; `(0, 0)` when every value is -inf.
fn log_sum_exp(v: &[f32]) -> (f64, f64) {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return (0.0, 0.0);
    }
    let s: f64 = v.iter().map(|&x| f64::from((x - max).exp())).sum();
    (f64::from(max), s.ln())
}

/// The `n` largest values with their ids, best first (lower id first on ties), in one pass keeping a sorted buffer
/// of at most `n` (`v` holds no NaN; `scratch` is reused).
fn top_n(v: &[f32], n: usize, scratch: &mut Vec<(f32, u32)>) -> Vec<(u32, f32)> {
    scratch.clear();
    if n == 0 {
        return Vec::new();
    }
    for (i, &x) in v.iter().enumerate() {
        if scratch.len() == n {
            // Equal values already kept have lower ids, so only a strictly larger value gets in.
            if scratch.last().is_some_and(|l| x <= l.0) {
                continue;
            }
            scratch.pop();
        }
        let at = scratch.partition_point(|b| b.0 >= x);
        scratch.insert(at, (x, i as u32));
    }
    scratch.iter().map(|&(x, i)| (i, x)).collect()
}

#[cfg(test)]
#[path = "sampler_tests.rs"]
mod tests;

/// Edge cases beyond the main tests: ties, non-finite logits, tiny temperatures, top-k as the only filter.
#[cfg(test)]
mod edge_tests {
    use super::*;

    fn sampler(params: SamplingParams, stop: StoppingParams) -> Sampler {
        Sampler::new(params, &stop, &[], &[], 7, 0)
    }

    #[test]
    fn greedy_ties_take_the_lowest_id_and_tiny_temperature_is_greedy() {
        let l = vec![1.0, 3.0, 3.0, f32::NAN, 2.0];
        let mut s = sampler(SamplingParams { temperature: 0.0, ..Default::default() }, StoppingParams::default());
        assert_eq!(s.sample(&mut l.clone(), 0).0, 1);
        // 1 / 1e-40 would overflow to inf; below 1e-5 is greedy as in vLLM.
        let mut s = sampler(SamplingParams { temperature: 1e-40, ..Default::default() }, StoppingParams::default());
        assert_eq!(s.sample(&mut l.clone(), 0).0, 1);
    }

    #[test]
    fn top_k_keeps_exactly_k_with_lowest_ids_on_boundary_ties() {
        // Four tokens tie for the top; k = 2 keeps ids 1 and 3, and draws only those, roughly evenly.
        let l = vec![0.0, 5.0, 1.0, 5.0, 5.0, 5.0];
        let mut s = sampler(SamplingParams { top_k: 2, ..Default::default() }, StoppingParams::default());
        let mut counts = [0usize; 6];
        for _ in 0..4000 {
            counts[s.sample(&mut l.clone(), 0).0 as usize] += 1;
        }
        assert_eq!(counts[0] + counts[2] + counts[4] + counts[5], 0, "{counts:?}");
        assert!((1700..2300).contains(&counts[1]), "{counts:?}");
    }

    #[test]
    fn top_k_with_temperature_matches_the_renormalized_softmax() {
        let l = [2.0f32, 0.0, 1.0, -1.0, 1.5];
        let (t, n) = (0.7, 30_000);
        let mut s = sampler(SamplingParams { temperature: t, top_k: 3, ..Default::default() }, StoppingParams::default());
        let mut counts = [0usize; 5];
        for _ in 0..n {
            counts[s.sample(&mut l.to_vec(), 0).0 as usize] += 1;
        }
        let kept = [0usize, 2, 4];
        let z: f64 = kept.iter().map(|&i| (f64::from(l[i]) / f64::from(t)).exp()).sum();
        let chi2: f64 = kept
            .iter()
            .map(|&i| {
                let e = (f64::from(l[i]) / f64::from(t)).exp() / z * n as f64;
                (counts[i] as f64 - e).powi(2) / e
            })
            .sum();
        assert!(chi2 < 13.8, "chi² {chi2} over 2 dof (p = 0.001), counts {counts:?}");
        assert_eq!(counts[1] + counts[3], 0);
    }

    #[test]
    fn top_p_nucleus_spans_weight_thresholds_and_keeps_lowest_ids_on_ties() {
        // One dominant token and 2000 tied ones at e^-10 of its weight: the nucleus needs tied tokens below the first
        // threshold (1e-3), and takes them by ascending id.
        let mut l = vec![0.0f32; 2001];
        l[0] = 10.0;
        let w = f64::from((-10.0f32).exp());
        let k_ref = ((0.95 * (1.0 + 2000.0 * w) - 1.0) / w).ceil() as u32; // tied tokens in the nucleus
        let mut s = sampler(SamplingParams { top_p: 0.95, ..Default::default() }, StoppingParams::default());
        let drawn: Vec<u32> = (0..20_000).map(|_| s.sample(&mut l.clone(), 0).0).collect();
        let max = *drawn.iter().max().unwrap();
        assert!(max <= k_ref && max > k_ref * 9 / 10, "max drawn id {max}, nucleus 0..={k_ref}");
        let top = drawn.iter().filter(|&&t| t == 0).count() as f64 / drawn.len() as f64;
        assert!((top - 1.0 / (1.0 + f64::from(k_ref) * w)).abs() < 0.01, "top share {top}");
    }

    #[test]
    fn non_finite_logits_never_panic() {
        let stop = StoppingParams { logprobs: true, top_logprobs: 3, ..Default::default() };
        let cases: Vec<Vec<f32>> = vec![
            vec![f32::NAN, 1.0, f32::NAN],
            vec![f32::NAN; 4],
            vec![f32::NEG_INFINITY; 4],
            vec![f32::INFINITY, 1.0, f32::INFINITY],
            vec![f32::MAX, -f32::MAX, 0.0],
            vec![0.5],
        ];
        for l in cases {
            for params in [
                SamplingParams { temperature: 0.0, ..Default::default() },
                SamplingParams::default(),
                SamplingParams { temperature: 0.3, top_k: 2, top_p: 0.5, min_p: 0.2, ..Default::default() },
                SamplingParams { repetition_penalty: 1.3, presence_penalty: 1.0, logit_bias: vec![(0, 5.0)], ..Default::default() },
            ] {
                let mut s = sampler(params, stop.clone());
                s.record(0);
                let (tok, lp) = s.sample(&mut l.clone(), 1);
                assert!((tok as usize) < l.len(), "{l:?}");
                let lp = lp.unwrap();
                assert!(!lp.logprob.is_nan() && lp.top.iter().all(|t| !t.1.is_nan()), "{l:?}: {lp:?}");
            }
        }
        // A NaN token is never drawn, and +inf tokens share the mass with raw logprob ln(1/2).
        let mut s = sampler(SamplingParams::default(), stop);
        for _ in 0..100 {
            let (tok, lp) = s.sample(&mut [f32::INFINITY, f32::NAN, f32::INFINITY, 3.0], 0);
            assert!(tok == 0 || tok == 2);
            assert!((lp.unwrap().logprob - 0.5f32.ln()).abs() < 1e-6);
        }
    }
}
