//! Token sampling: the one algorithm the engine's sampler runs on the host and the CUDA kernels `apply_adjustments`
//! + `sample_rows` run on the device (this is their CPU twin), in vLLM v1's order of operations:
//!
//! 1. [`apply_adjustments`]: per adjusted token, `l += bias`; repetition penalty (`l / r` when positive, `l · r`
//!    otherwise); `l -= sub` (frequency × count + presence); `l = -inf` when masked (stop/eos ids before
//!    `min_tokens`). The host merges everything for one token into one [`Adjust`].
//! 2. [`sample_row`]: temperature below [`GREEDY_BELOW`] ⇒ argmax (lowest id on ties, NaN never wins). Otherwise
//!    `s = l / T` (NaN and -inf drop out, +inf clamps to `f32::MAX`); top-k keeps exactly `k` (lowest ids win
//!    boundary ties); weights `w = exp(s - max)` (the top token's is exactly 1); top-p keeps the smallest prefix in
//!    (weight desc, id asc) order whose mass reaches `top_p · Σw`; min-p drops `w < min_p`; then the first token in
//!    ascending id order whose running mass exceeds `u · Σw` (kept) wins, `u` uniform in [0, 1).
//! 3. [`uniform`]: `u` from Philox4x32-10 keyed by the sequence's seed with its draw number as the counter, so the
//!    same seed gives the same tokens whatever the batch, preemption or backend.
//!
//! Sums are f64. The device sums in a different order, so host and device pick the same token except when `u · Σw`
//! or `top_p · Σw` falls within ~1e-12 (relative) of a boundary, and `exp` may differ by an ulp.

use std::cmp::Ordering;

use super::ops::argmax;

/// Temperatures below this are greedy (vLLM's `_SAMPLING_EPS`); it also keeps `1 / temperature` finite.
pub const GREEDY_BELOW: f32 = 1e-5;

/// The filtering parameters of one row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleParams {
    pub temperature: f32,
    /// 0 = off.
    pub top_k: u32,
    /// 1 = off.
    pub top_p: f32,
    /// 0 = off.
    pub min_p: f32,
}

impl SampleParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_BELOW
    }
}

/// Everything that changes one token's logit before sampling, applied in this order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Adjust {
    pub id: u32,
    /// Added first (logit bias).
    pub bias: f32,
    /// Whether the repetition penalty applies (the token is in the prompt or the output).
    pub repeat: bool,
    /// Subtracted next (frequency × count + presence).
    pub sub: f32,
    /// Set to -inf last (a stop or eos id before `min_tokens`).
    pub mask: bool,
}

/// Applies `adjust` (one entry per token id) to `logits`; `repetition` is the row's repetition penalty.
pub fn apply_adjustments(logits: &mut [f32], adjust: &[Adjust], repetition: f32) {
    for a in adjust {
        let Some(l) = logits.get_mut(a.id as usize) else { continue };
        let mut v = *l + a.bias;
        if a.repeat {
            v = if v > 0.0 { v / repetition } else { v * repetition };
        }
        v -= a.sub;
        if a.mask {
            v = f32::NEG_INFINITY;
        }
        *l = v;
    }
}

/// Sets to -inf every logit whose token `mask` does not allow (a grammar's mask): bit `i % 32` of word `i / 32` set
/// = token `i` allowed (llguidance's `SimpleVob` layout); ids past the mask's words are not allowed. Applied after
/// [`apply_adjustments`], before [`sample_row`]. Twin of the CUDA kernel `apply_token_masks`.
pub fn apply_mask(logits: &mut [f32], mask: &[u32]) {
    for (chunk, &word) in logits.chunks_mut(32).zip(mask) {
        for (bit, l) in chunk.iter_mut().enumerate() {
            if (word >> bit) & 1 == 0 {
                *l = f32::NEG_INFINITY;
            }
        }
    }
    for l in logits.iter_mut().skip(mask.len().saturating_mul(32)) {
        *l = f32::NEG_INFINITY;
    }
}

/// Reused buffers of [`sample_row`].
#[derive(Debug, Default)]
pub struct SampleScratch {
    cand: Vec<(f32, u32)>,
    weights: Vec<(f64, u32)>,
}

/// Descending by value, ascending id on ties.
fn desc<T: Copy + Into<f64>>(a: &(T, u32), b: &(T, u32)) -> Ordering {
    b.0.into().total_cmp(&a.0.into()).then(a.1.cmp(&b.1))
}

/// The token drawn from (already adjusted) `logits` with uniform `u` in [0, 1). See the module docs.
pub fn sample_row(logits: &[f32], p: &SampleParams, u: f64, scratch: &mut SampleScratch) -> u32 {
    if p.is_greedy() {
        return argmax(logits);
    }
    let inv_t = 1.0 / p.temperature;
    let cand = &mut scratch.cand;
    cand.clear();
    // NaN and -inf drop out here (NaN > -inf is false); overflow to +inf is clamped so differences stay finite.
    cand.extend(logits.iter().enumerate().filter_map(|(i, &l)| {
        let s = l * inv_t;
        (s > f32::NEG_INFINITY).then(|| (s.min(f32::MAX), i as u32))
    }));
    if cand.is_empty() {
        return argmax(logits); // every token is masked: nothing to draw from
    }
    let k = p.top_k as usize;
    if k > 0 && k < cand.len() {
        cand.select_nth_unstable_by(k - 1, desc);
        cand.truncate(k);
    }
    let max = cand.iter().fold(f32::MIN, |m, c| m.max(c.0));
    let weights = &mut scratch.weights;
    weights.clear();
    // The top token's weight is exactly exp(0) = 1, and top-k and top-p always keep it.
    weights.extend(cand.iter().map(|&(l, id)| (f64::from((l - max).exp()), id)));
    if p.top_p < 1.0 {
        let target = f64::from(p.top_p) * weights.iter().map(|w| w.0).sum::<f64>();
        // Once the tokens of weight ≥ τ hold the target mass, the nucleus lies among them: sort only those
        // (τ = 1e-3, 1e-6, … of the top weight; usually a few hundred tokens instead of the whole vocabulary).
        let mut tau = 1e-3;
        while tau > 0.0 {
            let mass: f64 = weights.iter().filter(|w| w.0 >= tau).map(|w| w.0).sum();
            if mass >= target {
                weights.retain(|w| w.0 >= tau);
                break;
            }
            tau = if tau > 1e-12 { tau * 1e-3 } else { 0.0 };
        }
        weights.sort_unstable_by(desc);
        let mut cum = 0.0;
        let keep = weights.iter().position(|w| {
            cum += w.0;
            cum >= target
        });
        weights.truncate(keep.map_or(usize::MAX, |i| i + 1));
    }
    if p.min_p > 0.0 {
        let floor = f64::from(p.min_p); // min_p × p_max, with p_max's weight 1
        weights.retain(|w| w.0 >= floor);
    }
    weights.sort_unstable_by_key(|w| w.1);
    let total: f64 = weights.iter().map(|w| w.0).sum();
    let mut x = u * total;
    let mut last = None;
    for &(w, id) in weights.iter() {
        if w > 0.0 {
            if x < w {
                return id;
            }
            x -= w;
            last = Some(id); // rounding can leave x ≥ the last weight: fall back to the last possible token
        }
    }
    last.unwrap_or_else(|| argmax(logits))
}

/// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3"; cuRAND's and Random123's).
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    const M0: u64 = 0xD251_1F53;
    const M1: u64 = 0xCD9E_8D57;
    const W0: u32 = 0x9E37_79B9;
    const W1: u32 = 0xBB67_AE85;
    let (mut c, mut k) = (counter, key);
    for round in 0..10 {
        if round > 0 {
            k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        }
        let p0 = M0 * u64::from(c[0]);
        let p1 = M1 * u64::from(c[2]);
        c = [(p1 >> 32) as u32 ^ c[1] ^ k[0], p1 as u32, (p0 >> 32) as u32 ^ c[3] ^ k[1], p0 as u32];
    }
    c
}

/// The uniform in [0, 1) (53 random bits) of draw number `counter` of the sequence seeded `seed`.
pub fn uniform(seed: u64, counter: u64) -> f64 {
    let x = philox4x32_10([counter as u32, (counter >> 32) as u32, 0, 0], [seed as u32, (seed >> 32) as u32]);
    let bits = ((u64::from(x[0]) << 32) | u64::from(x[1])) >> 11;
    bits as f64 * (1.0 / (1u64 << 53) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn philox_matches_the_random123_known_answers() {
        assert_eq!(philox4x32_10([0; 4], [0; 2]), [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]);
        assert_eq!(philox4x32_10([u32::MAX; 4], [u32::MAX; 2]), [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]);
        assert_eq!(
            philox4x32_10([0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344], [0xa409_3822, 0x299f_31d0]),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
    }

    #[test]
    fn uniforms_are_in_range_spread_and_keyed() {
        let us: Vec<f64> = (0..10_000).map(|i| uniform(42, i)).collect();
        assert!(us.iter().all(|u| (0.0..1.0).contains(u)));
        let mean = us.iter().sum::<f64>() / us.len() as f64;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
        assert_ne!(uniform(42, 0), uniform(43, 0));
        assert_eq!(uniform(42, 7), uniform(42, 7));
    }

    #[test]
    fn adjustments_compose_in_order() {
        let mut l = vec![2.0f32, -2.0, 1.0, 5.0];
        let adj = [
            Adjust { id: 0, bias: 1.0, repeat: true, sub: 0.5, mask: false }, // (2 + 1) / 2 - 0.5 = 1.0
            Adjust { id: 1, bias: 0.0, repeat: true, sub: 0.0, mask: false }, // -2 · 2 = -4
            Adjust { id: 3, bias: 0.0, repeat: false, sub: 0.0, mask: true }, // -inf
            Adjust { id: 99, bias: 1.0, repeat: false, sub: 0.0, mask: false }, // out of range: ignored
        ];
        apply_adjustments(&mut l, &adj, 2.0);
        assert_eq!(l, vec![1.0, -4.0, 1.0, f32::NEG_INFINITY]);
    }

    /// The mask against a per-id reference: allowed iff the id's word exists and holds its bit (LSB = lowest id).
    #[test]
    fn mask_keeps_exactly_the_allowed_ids() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for vocab in [1usize, 31, 32, 33, 64, 100, 1000] {
            for words in [0usize, vocab.div_ceil(32).saturating_sub(1), vocab.div_ceil(32), vocab.div_ceil(32) + 2] {
                let mask: Vec<u32> = (0..words).map(|_| next() as u32).collect();
                let logits: Vec<f32> = (0..vocab).map(|i| i as f32 - 7.5).collect();
                let mut got = logits.clone();
                apply_mask(&mut got, &mask);
                for (id, (&g, &l)) in got.iter().zip(&logits).enumerate() {
                    let allowed = mask.get(id / 32).is_some_and(|w| w & (1u32 << (id % 32)) != 0);
                    let want = if allowed { l } else { f32::NEG_INFINITY };
                    assert_eq!(g.to_bits(), want.to_bits(), "vocab {vocab} words {words} id {id}");
                }
            }
        }
    }
}
