//! Row-wise CPU ops of the Llama forward pass. Each function reads one row (one token) and writes one row, so a
//! token's result never depends on what else is in the batch (batch invariance) and every reduction has a fixed
//! order.
//!
//! These are also the reference twins the CUDA kernels are checked against.

use super::isa::CpuIsa;
use super::quant::dot_f32;

/// RMSNorm: `out = x / sqrt(mean(x²) + eps) * weight` (Llama, computed in f32 like transformers' `LlamaRMSNorm`).
pub fn rms_norm(isa: CpuIsa, x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    debug_assert_eq!(x.len(), weight.len());
    debug_assert_eq!(x.len(), out.len());
    let ms = dot_f32(isa, x, x) / x.len() as f32;
    let scale = 1.0 / (ms + eps).sqrt();
    for ((o, &xi), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = w * (xi * scale);
    }
}

/// Which elements form a rotation pair (see `ferrite_common::config::RopeStyle`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopePairing {
    /// `(2i, 2i+1)`: GGUF's permuted Q/K rows.
    Interleaved,
    /// `(i, i + d/2)`: Hugging Face's rotate_half.
    Half,
}

/// Applies rotary position embedding in place to `x`, which holds whole heads of `head_dim` values each.
/// `inv_freq` has `head_dim / 2` entries. The angle is `pos * inv_freq[i]` in f32, like transformers.
pub fn rope(x: &mut [f32], head_dim: usize, pos: usize, inv_freq: &[f32], pairing: RopePairing) {
    debug_assert_eq!(inv_freq.len() * 2, head_dim);
    debug_assert_eq!(x.len() % head_dim, 0);
    let half = head_dim / 2;
    let cs: Vec<(f32, f32)> = inv_freq.iter().map(|&f| (pos as f32 * f).sin_cos()).map(|(s, c)| (c, s)).collect();
    for head in x.chunks_exact_mut(head_dim) {
        match pairing {
            RopePairing::Interleaved => {
                for (pair, &(c, s)) in head.chunks_exact_mut(2).zip(&cs) {
                    let (a, b) = (pair[0], pair[1]);
                    pair[0] = a * c - b * s;
                    pair[1] = a * s + b * c;
                }
            }
            RopePairing::Half => {
                let (lo, hi) = head.split_at_mut(half);
                for ((a, b), &(c, s)) in lo.iter_mut().zip(hi.iter_mut()).zip(&cs) {
                    let (x0, x1) = (*a, *b);
                    *a = x0 * c - x1 * s;
                    *b = x1 * c + x0 * s;
                }
            }
        }
    }
}

/// SwiGLU: `out[i] = silu(gate[i]) * up[i]`, with `silu(g) = g / (1 + exp(-g))`. At `avx2` and above, 8 lanes at a
/// time with a polynomial `exp` (~2 ulp; libm's `expf` on the scalar path).
pub fn silu_mul(isa: CpuIsa, gate: &[f32], up: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        // SAFETY: a `CpuIsa` at avx2 or above is only made after checking avx2 and fma on this CPU.
        unsafe { super::vmath::silu_mul(gate, up, out) };
        return;
    }
    let _ = isa;
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

/// In-place softmax with max subtraction; sums in index order.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `y += a * x`.
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// Attention of one query head over `ctx_len` cached positions, the naive way (a full-length score vector).
///
/// `key(t)` / `value(t)` return the head's K / V row at position `t` (the caller resolves paging). `scores` is
/// scratch space. Writes `softmax(q·K / sqrt(d) ) · V` into `out`. The forward pass uses the tiled
/// [`super::attention::paged_attention`]; this is its reference twin in tests.
#[allow(clippy::too_many_arguments)]
pub fn attend_one<'a>(
    isa: CpuIsa,
    q: &[f32],
    ctx_len: usize,
    scale: f32,
    key: impl Fn(usize) -> &'a [f32],
    value: impl Fn(usize) -> &'a [f32],
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    scores.clear();
    scores.extend((0..ctx_len).map(|t| dot_f32(isa, q, key(t)) * scale));
    softmax(scores);
    out.fill(0.0);
    for (t, &p) in scores.iter().enumerate() {
        axpy(p, value(t), out);
    }
}

/// Index of the largest value (lowest index on ties; NaN never wins; 0 when nothing beats -inf).
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn rand_vec(rng: &mut StdRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-2.0..2.0)).collect()
    }

    #[test]
    fn rms_norm_matches_f64_reference() {
        let mut rng = StdRng::seed_from_u64(1);
        for n in [8, 64, 576, 1000] {
            let x = rand_vec(&mut rng, n);
            let w = rand_vec(&mut rng, n);
            let mut out = vec![0.0; n];
            rms_norm(CpuIsa::host(), &x, &w, 1e-5, &mut out);
            let ms: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / n as f64;
            let s = 1.0 / (ms + 1e-5).sqrt();
            for i in 0..n {
                let want = f64::from(x[i]) * s * f64::from(w[i]);
                assert!((f64::from(out[i]) - want).abs() < 1e-5 * (1.0 + want.abs()), "{n} {i}");
            }
        }
    }

    /// The two pairings are the same rotation on permuted coordinates: HF → GGUF row permutation maps
    /// element `i*half + j` (half-rotation) to `2j + i` (interleaved).
    #[test]
    fn rope_pairings_agree_under_permutation() {
        let mut rng = StdRng::seed_from_u64(2);
        let (hd, heads) = (64, 3);
        let inv: Vec<f32> = (0..hd / 2).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / hd as f32)).collect();
        let x_half = rand_vec(&mut rng, hd * heads);
        let mut x_inter = vec![0.0; hd * heads];
        for h in 0..heads {
            for i in 0..2 {
                for j in 0..hd / 2 {
                    x_inter[h * hd + 2 * j + i] = x_half[h * hd + i * hd / 2 + j];
                }
            }
        }
        let (mut a, mut b) = (x_half.clone(), x_inter.clone());
        rope(&mut a, hd, 37, &inv, RopePairing::Half);
        rope(&mut b, hd, 37, &inv, RopePairing::Interleaved);
        for h in 0..heads {
            for i in 0..2 {
                for j in 0..hd / 2 {
                    assert_eq!(b[h * hd + 2 * j + i], a[h * hd + i * hd / 2 + j]);
                }
            }
        }
        // Position 0 is the identity; rotation preserves the norm.
        let mut c = x_half.clone();
        rope(&mut c, hd, 0, &inv, RopePairing::Half);
        assert_eq!(c, x_half);
        let n0: f32 = x_half.iter().map(|v| v * v).sum();
        let n1: f32 = a.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-3 * n0);
    }

    #[test]
    fn rope_matches_explicit_rotation() {
        let inv = [0.5f32, 0.25];
        let mut x = [1.0f32, 2.0, 3.0, 4.0];
        rope(&mut x, 4, 3, &inv, RopePairing::Interleaved);
        let (c0, s0) = ((3.0f32 * 0.5).cos(), (3.0f32 * 0.5).sin());
        let (c1, s1) = ((3.0f32 * 0.25).cos(), (3.0f32 * 0.25).sin());
        let want = [1.0 * c0 - 2.0 * s0, 1.0 * s0 + 2.0 * c0, 3.0 * c1 - 4.0 * s1, 3.0 * s1 + 4.0 * c1];
        for (a, b) in x.iter().zip(want) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn silu_softmax_attention_reference() {
        // 19 values: two SIMD vectors and a scalar tail, including gates far in both tails of the sigmoid.
        let gate: Vec<f32> =
            [0.0, 1.0, -2.0, -100.0, 100.0, 88.5, -88.5].into_iter().chain((0..12).map(|i| i as f32 * 0.7 - 4.0)).collect();
        let up: Vec<f32> = (0..gate.len()).map(|i| 0.5 + i as f32 * 0.25).collect();
        let silu = |g: f64| g / (1.0 + (-g).exp());
        for isa in CpuIsa::supported() {
            let mut out = vec![f32::NAN; gate.len()];
            silu_mul(isa, &gate, &up, &mut out);
            for ((o, &g), &u) in out.iter().zip(&gate).zip(&up) {
                let want = silu(f64::from(g)) * f64::from(u);
                assert!((f64::from(*o) - want).abs() <= 1e-6 * (1.0 + want.abs()), "{isa}: silu({g}) * {u} = {o}, want {want}");
            }
        }
        let mut rng = StdRng::seed_from_u64(3);
        let d = 16;
        let ctx = 9;
        let q = rand_vec(&mut rng, d);
        let ks: Vec<Vec<f32>> = (0..ctx).map(|_| rand_vec(&mut rng, d)).collect();
        let vs: Vec<Vec<f32>> = (0..ctx).map(|_| rand_vec(&mut rng, d)).collect();
        let mut out = vec![0.0; d];
        let mut scratch = Vec::new();
        attend_one(CpuIsa::host(), &q, ctx, 0.25, |t| &ks[t], |t| &vs[t], &mut scratch, &mut out);
        let s: Vec<f64> = ks.iter().map(|k| k.iter().zip(&q).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum::<f64>() * 0.25).collect();
        let m = s.iter().copied().fold(f64::MIN, f64::max);
        let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
        let z: f64 = e.iter().sum();
        for i in 0..d {
            let want: f64 = (0..ctx).map(|t| e[t] / z * f64::from(vs[t][i])).sum();
            assert!((f64::from(out[i]) - want).abs() < 1e-5, "{i}");
        }
    }
}
