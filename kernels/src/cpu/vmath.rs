//! Vector math shared by the AVX2 kernels: `exp` on 8 lanes, and the SwiGLU activation built on it.

use core::arch::x86_64::*;

/// Lanes per vector.
const W: usize = 8;

/// `exp(x)` to ~2 ulp for x in [-87, 88] (Cephes' `expf`: `x = n·ln2 + r`, degree-6 polynomial in r, times 2ⁿ);
/// below -87 it gives ~2⁻¹²⁶ (callers zero masked lanes themselves).
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn exp(x: __m256) -> __m256 {
    let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0)), _mm256_set1_ps(88.0));
    let n =
        _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut y = _mm256_set1_ps(1.987_569_1e-4);
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
    }
    let y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0));
    let pow2n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127))));
    _mm256_mul_ps(y, pow2n)
}

/// `out[i] = silu(gate[i]) * up[i] = gate[i] / (1 + exp(-gate[i])) * up[i]` over the common length, 8 lanes at a time
/// with [`exp`] (the scalar formula with libm's `expf` for the last `len % 8`).
#[target_feature(enable = "avx2,fma")]
pub(crate) fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let n = gate.len().min(up.len()).min(out.len());
    let one = _mm256_set1_ps(1.0);
    let mut i = 0;
    while i + W <= n {
        // SAFETY: `i + W <= n`, which is within all three slices.
        unsafe {
            let g = _mm256_loadu_ps(gate.as_ptr().add(i));
            let e = exp(_mm256_sub_ps(_mm256_setzero_ps(), g));
            let s = _mm256_div_ps(g, _mm256_add_ps(one, e));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_mul_ps(s, _mm256_loadu_ps(up.as_ptr().add(i))));
        }
        i += W;
    }
    for ((o, &g), &u) in out[i..n].iter_mut().zip(&gate[i..n]).zip(&up[i..n]) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::isa::{CpuIsa, IsaLevel};

    #[target_feature(enable = "avx2,fma")]
    fn exp_lanes(x: &[f32]) -> Vec<f32> {
        x.chunks_exact(W)
            .flat_map(|c| {
                let mut out = [0f32; W];
                // SAFETY: `c` and `out` hold W floats.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr(), exp(_mm256_loadu_ps(c.as_ptr()))) };
                out
            })
            .collect()
    }

    /// The polynomial exp is within 3 ulp (relative 3.6e-7) of the exact value over the softmax's range, and exact at 0.
    #[test]
    fn exp_is_accurate() {
        if CpuIsa::capped(IsaLevel::Avx2).is_err() {
            return;
        }
        let x: Vec<f32> = (0..W * 20_000).map(|i| -87.0 + 95.0 * i as f32 / (W * 20_000) as f32).chain([0.0; W]).collect();
        // SAFETY: the host supports this module's features (checked above).
        let got = unsafe { exp_lanes(&x) };
        for (&xi, &g) in x.iter().zip(&got) {
            let want = f64::from(xi).exp();
            assert!((f64::from(g) - want).abs() <= 3.6e-7 * want, "exp({xi}) = {g}, want {want}");
        }
        assert_eq!(got[got.len() - 1], 1.0);
    }
}
