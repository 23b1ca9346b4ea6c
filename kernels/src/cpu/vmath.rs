//! Vector math shared by the SIMD kernels: `exp` on 8 (AVX2) and 16 (AVX-512) lanes, and the SwiGLU activation built
//! on the former.

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

/// [`exp`] on 16 lanes: `exp(x)` to ~2 ulp for x in [-87, 88] (Cephes' `expf`: `x = n·ln2 + r`, degree-6 polynomial in r, times 2ⁿ);
/// below -87 it gives ~2⁻¹²⁶ (callers zero masked lanes themselves).
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
pub(crate) fn exp512(x: __m512) -> __m512 {
    let x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0)), _mm512_set1_ps(88.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        x,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut y = _mm512_set1_ps(1.987_569_1e-4);
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
        y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(c));
    }
    let y = _mm512_add_ps(_mm512_fmadd_ps(y, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0));
    let pow2n = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127))));
    _mm512_mul_ps(y, pow2n)
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

    /// `exp` over the softmax's range (and exactly 0 at the end) through `f`, which maps a multiple of 16 inputs.
    fn check_exp(f: impl Fn(&[f32]) -> Vec<f32>) {
        let x: Vec<f32> = (0..16 * 10_000).map(|i| -87.0 + 95.0 * i as f32 / (16 * 10_000) as f32).chain([0.0; 16]).collect();
        let got = f(&x);
        for (&xi, &g) in x.iter().zip(&got) {
            let want = f64::from(xi).exp();
            assert!((f64::from(g) - want).abs() <= 3.6e-7 * want, "exp({xi}) = {g}, want {want}");
        }
        assert_eq!(got[got.len() - 1], 1.0);
    }

    /// The polynomial exp is within 3 ulp (relative 3.6e-7) of the exact value over the softmax's range, and exact at 0,
    /// on 8 and on 16 lanes.
    #[test]
    fn exp_is_accurate() {
        if CpuIsa::capped(IsaLevel::Avx2).is_ok() {
            // SAFETY: the host supports avx2 and fma (checked above); `c` and `out` hold W floats.
            check_exp(|x| x.chunks_exact(W).flat_map(|c| unsafe { lanes8(c) }).collect());
        }
        if CpuIsa::capped(IsaLevel::Avx512).is_ok() {
            // SAFETY: the host supports avx512f (checked above).
            check_exp(|x| x.chunks_exact(16).flat_map(|c| unsafe { lanes16(c) }).collect());
        }
    }

    #[target_feature(enable = "avx2,fma")]
    fn lanes8(c: &[f32]) -> [f32; W] {
        let mut out = [0f32; W];
        // SAFETY: `c` and `out` hold W floats.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), exp(_mm256_loadu_ps(c.as_ptr()))) };
        out
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    fn lanes16(c: &[f32]) -> [f32; 16] {
        let mut out = [0f32; 16];
        // SAFETY: `c` and `out` hold 16 floats.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr(), exp512(_mm512_loadu_ps(c.as_ptr()))) };
        out
    }
}
