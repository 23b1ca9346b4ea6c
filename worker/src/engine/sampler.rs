//! Per-sequence token sampling, in vLLM v1's order of operations:
//!
//! 1. logprobs (when asked) from the **raw** logits (log-softmax before any processing, vLLM's default);
//! 2. logit bias; repetition penalty over prompt ∪ output (positive logits divided, negative multiplied); presence and
//!    frequency penalties over the output only; while fewer than `min_tokens` are generated, eos and stop ids masked;
//! 3. temperature 0 ⇒ argmax; otherwise logits / temperature → top-k → softmax → top-p → min-p → one uniform draw
//!    from the sequence's own RNG, walked over the kept tokens in ascending id order.
//!
//! The RNG is per sequence and seeded from the request seed and the completion index, so the same seed gives the same
//! tokens whatever else is in the batch (the logits are batch invariant too).

use std::collections::{HashMap, HashSet};

use ferrite_common::sampling::{SamplingParams, StoppingParams};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Log-probability info for one sampled token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    /// The most likely tokens with their logprobs, best first.
    pub top: Vec<(u32, f32)>,
}

/// Sampling state of one sequence.
pub struct Sampler {
    params: SamplingParams,
    logprobs: bool,
    top_logprobs: usize,
    min_tokens: usize,
    /// Masked while fewer than `min_tokens` tokens are generated.
    stop_ids: Vec<u32>,
    rng: StdRng,
    counts: HashMap<u32, u32>,
    prompt_tokens: HashSet<u32>,
    cand: Vec<(f32, u32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams, stop: &StoppingParams, eos_ids: &[u32], prompt: &[u32], seed: u64, index: u32) -> Self {
        let mut stop_ids = stop.stop_token_ids.clone();
        stop_ids.extend_from_slice(eos_ids);
        let prompt_tokens = if params.repetition_penalty != 1.0 { prompt.iter().copied().collect() } else { HashSet::new() };
        Self {
            logprobs: stop.logprobs,
            top_logprobs: stop.top_logprobs as usize,
            min_tokens: stop.min_tokens as usize,
            stop_ids,
            rng: StdRng::seed_from_u64(seed ^ u64::from(index).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            counts: HashMap::new(),
            prompt_tokens,
            cand: Vec::new(),
            params,
        }
    }

    /// Records a generated token for the penalties.
    pub fn record(&mut self, token: u32) {
        *self.counts.entry(token).or_default() += 1;
    }

    /// Picks the next token from the raw logits of the last position (`logits` is scratch and gets modified).
    pub fn sample(&mut self, logits: &mut [f32], num_generated: usize) -> (u32, Option<TokenLogprob>) {
        for l in logits.iter_mut() {
            if l.is_nan() {
                *l = f32::NEG_INFINITY;
            }
        }
        // Raw logprobs need the unprocessed logits of the token chosen later, so keep a copy only when asked.
        let raw = self.logprobs.then(|| (log_sum_exp(logits), logits.to_vec()));
        self.apply_penalties(logits, num_generated);
        let token = if self.params.temperature == 0.0 { argmax(logits) } else { self.draw(logits) };
        let info = raw.map(|(lse, raw)| TokenLogprob {
            token,
            logprob: (f64::from(raw[token as usize]) - lse) as f32,
            top: top_n(&raw, self.top_logprobs).into_iter().map(|(id, l)| (id, (f64::from(l) - lse) as f32)).collect(),
        });
        (token, info)
    }

    fn apply_penalties(&self, logits: &mut [f32], num_generated: usize) {
        let p = &self.params;
        for &(id, b) in &p.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += b;
            }
        }
        if p.repetition_penalty != 1.0 {
            let penalize = |l: &mut f32| *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
            for &t in self.prompt_tokens.iter().chain(self.counts.keys().filter(|t| !self.prompt_tokens.contains(t))) {
                if let Some(l) = logits.get_mut(t as usize) {
                    penalize(l);
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &c) in &self.counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * c as f32;
                }
            }
        }
        if num_generated < self.min_tokens {
            for &t in &self.stop_ids {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        self.cand.clear();
        self.cand.extend(logits.iter().enumerate().filter(|(_, l)| **l > f32::NEG_INFINITY).map(|(i, &l)| (l * inv_t, i as u32)));
        if self.cand.is_empty() {
            return argmax(logits);
        }
        let by_logit_desc = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        let k = p.top_k as usize;
        if k > 0 && k < self.cand.len() {
            self.cand.select_nth_unstable_by(k - 1, by_logit_desc);
            self.cand.truncate(k);
        }
        self.cand.sort_unstable_by(by_logit_desc);
        let max = self.cand[0].0;
        let mut probs: Vec<f64> = self.cand.iter().map(|&(l, _)| f64::from(l - max).exp()).collect();
        let z: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= z);
        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            for (i, q) in probs.iter().enumerate() {
                cum += q;
                if cum >= f64::from(p.top_p) {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let floor = f64::from(p.min_p) * probs[0];
            keep = keep.min(probs.iter().take_while(|&&q| q >= floor).count().max(1));
        }
        // Kept tokens in ascending id order so the draw does not depend on sort stability.
        let mut kept: Vec<(u32, f64)> = self.cand[..keep].iter().zip(&probs[..keep]).map(|(&(_, id), &q)| (id, q)).collect();
        kept.sort_unstable_by_key(|&(id, _)| id);
        let total: f64 = kept.iter().map(|&(_, q)| q).sum();
        let mut u = self.rng.random::<f64>() * total;
        for &(id, q) in &kept {
            if u < q {
                return id;
            }
            u -= q;
        }
        kept.last().map_or(0, |&(id, _)| id)
    }
}

/// Index of the largest value (lowest index on ties; NaN never wins).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &x) in v.iter().enumerate() {
        if x > best_v {
            best = i;
            best_v = x;
        }
    }
    best as u32
}

fn log_sum_exp(v: &[f32]) -> f64 {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return 0.0;
    }
    let s: f64 = v.iter().map(|&x| f64::from(x - max).exp()).sum();
    f64::from(max) + s.ln()
}

/// The `n` largest values with their ids, best first (lower id first on ties).
fn top_n(v: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut c: Vec<(f32, u32)> = v.iter().enumerate().map(|(i, &x)| (x, i as u32)).collect();
    let cmp = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    let n = n.min(c.len());
    if n < c.len() {
        c.select_nth_unstable_by(n, cmp);
        c.truncate(n);
    }
    c.sort_unstable_by(cmp);
    c.into_iter().map(|(x, i)| (i, x)).collect()
}

#[cfg(test)]
#[path = "sampler_tests.rs"]
mod tests;
