//! AVX-512 micro-kernels of the tiled attention (head_dim a multiple of 16), the same arithmetic as `avx2.rs` in
//! 16-lane vectors. Every value a row gets is computed
//! lane-wise from that row's own data in a fixed order: a score is two FMA chains over the even and odd dimensions
//! (then added), the tile's exponentials use [`exp`] on all [`KEY_TILE`] lanes (masked lanes zeroed), and each output
//! lane is two FMA chains over the even and odd keys.

use core::arch::x86_64::*;

use super::{HALF_TILE, KEY_TILE, KeyTile, KvElem, TileJob, tile_loop};

/// Lanes per vector.
const W: usize = 16;
/// Vectors per key tile.
const TV: usize = KEY_TILE / W;

/// The tile loop with these micro-kernels inlined.
#[target_feature(enable = "avx512f,avx2,fma")]
pub(super) fn run_tiles<T: KvElem>(job: &TileJob<'_, T>, acc: &mut [f32]) {
    tile_loop!(job, acc)
}

/// `p[j] = Σ_d q[d] · key_j[d]` for the whole tile: four FMA chains per vector of keys, over the dimensions
/// `d ≡ 0, 1, 2, 3 (mod 4)`, summed as `(c0 + c1) + (c2 + c3)` (eight independent chains hide the FMA latency; AVX2
/// has enough with two per vector, as it has twice the vectors).
#[allow(clippy::needless_range_loop)] // the same index runs over parallel arrays of accumulators
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
fn scores(q: &[f32], keys: KeyTile<'_>, p: &mut [f32; KEY_TILE]) {
    const U: usize = 4;
    const HV: usize = TV / 2;
    let quads = q.len() / U;
    let need = (U * quads).saturating_sub(1) * keys.stride + HALF_TILE;
    assert!(quads == 0 || (keys.lo.len() >= need && keys.hi.len() >= need), "scores: key tile too short");
    let mut c = [[_mm512_setzero_ps(); TV]; U];
    for d in 0..quads {
        for (u, cu) in c.iter_mut().enumerate() {
            let qv = _mm512_set1_ps(q[U * d + u]);
            for (h, half) in [keys.lo, keys.hi].into_iter().enumerate() {
                // SAFETY: row U·d + u (HALF_TILE floats from `row · stride`) lies inside both halves (asserted above).
                let k = unsafe { half.as_ptr().add((U * d + u) * keys.stride) };
                for w in 0..HV {
                    // SAFETY: as above; `w · W + W <= HALF_TILE`.
                    cu[h * HV + w] = _mm512_fmadd_ps(qv, unsafe { _mm512_loadu_ps(k.add(w * W)) }, cu[h * HV + w]);
                }
            }
        }
    }
    for v in 0..TV {
        let s = _mm512_add_ps(_mm512_add_ps(c[0][v], c[1][v]), _mm512_add_ps(c[2][v], c[3][v]));
        // SAFETY: `p` holds KEY_TILE = TV · W floats.
        unsafe { _mm512_storeu_ps(p.as_mut_ptr().add(v * W), s) };
    }
}

/// `exp(x)` to ~2 ulp for x in [-87, 88] (Cephes' `expf`: `x = n·ln2 + r`, degree-6 polynomial in r, times 2ⁿ);
/// below -87 it gives ~2⁻¹²⁶ (callers zero masked lanes themselves).
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
fn exp(x: __m512) -> __m512 {
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

#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
fn hsum(v: __m512) -> f32 {
    _mm512_reduce_add_ps(v)
}

#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
fn hmax(v: __m512) -> f32 {
    _mm512_reduce_max_ps(v)
}

/// Scales the first `n` scores, returns the new running max `m` and the tile's `Σ exp(s_j - m)` (lane sums, then a
/// fixed tree), leaving `p[j] = exp(s_j - m)` for `j < n` and 0 past them.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
fn softmax_tile(p: &mut [f32; KEY_TILE], n: usize, scale: f32, m_old: f32) -> (f32, f32) {
    let sc = _mm512_set1_ps(scale);
    let mut s = [_mm512_setzero_ps(); TV];
    let mut live: [__mmask16; TV] = [0; TV];
    let mut mx = _mm512_set1_ps(m_old);
    for v in 0..TV {
        // Lanes v·W .. v·W + W hold keys; those at n and past are masked.
        let k = n.saturating_sub(v * W).min(W);
        live[v] = ((1u32 << k) - 1) as __mmask16;
        // SAFETY: `p` holds KEY_TILE = TV · W floats.
        let x = _mm512_mul_ps(unsafe { _mm512_loadu_ps(p.as_ptr().add(v * W)) }, sc);
        s[v] = _mm512_mask_blend_ps(live[v], _mm512_set1_ps(f32::NEG_INFINITY), x);
        mx = _mm512_max_ps(mx, s[v]);
    }
    let m = hmax(mx);
    let mv = _mm512_set1_ps(m);
    let mut total = _mm512_setzero_ps();
    for v in 0..TV {
        let e = _mm512_maskz_mov_ps(live[v], exp(_mm512_sub_ps(s[v], mv)));
        total = _mm512_add_ps(total, e);
        // SAFETY: as above.
        unsafe { _mm512_storeu_ps(p.as_mut_ptr().add(v * W), e) };
    }
    (m, hsum(total))
}

/// `acc = acc · alpha + Σ_j p_j · v_j`: per lane, one FMA chain over the even keys (starting from `acc · alpha`) and
/// one over the odd keys, added at the end. Four vectors of the head at a time (then one at a time for the rest), so
/// the chains stay in registers and the key loop has no branch.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
fn rescale_accumulate(acc: &mut [f32], alpha: f32, p: &[f32], v: &[&[f32]]) {
    const G: usize = 4;
    let n = acc.len() / W * W;
    assert!(p.len() <= v.len() && v[..p.len()].iter().all(|v| v.len() >= n), "rescale_accumulate: value row too short");
    let mut c0 = 0;
    while c0 + G * W <= n {
        // SAFETY: the value rows hold at least `n >= c0 + G · W` floats (asserted above).
        unsafe { accumulate_block::<G>(acc, c0, alpha, p, v) };
        c0 += G * W;
    }
    while c0 + W <= n {
        // SAFETY: as above, with `n >= c0 + W`.
        unsafe { accumulate_block::<1>(acc, c0, alpha, p, v) };
        c0 += W;
    }
}

/// [`rescale_accumulate`] for the `G` vectors of `acc` from float `c0` on.
///
/// # Safety
/// Every row of `v` that `p` weighs (the first `p.len()`) holds at least `c0 + G · W` floats.
#[allow(clippy::needless_range_loop)] // the same index runs over parallel arrays of accumulators
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn accumulate_block<const G: usize>(acc: &mut [f32], c0: usize, alpha: f32, p: &[f32], v: &[&[f32]]) {
    assert!(c0 + G * W <= acc.len(), "accumulate_block: accumulator too short");
    let al = _mm512_set1_ps(alpha);
    let mut even = [_mm512_setzero_ps(); G];
    let mut odd = [_mm512_setzero_ps(); G];
    for c in 0..G {
        // SAFETY: `c0 + (c + 1) · W <= acc.len()` (asserted above).
        even[c] = _mm512_mul_ps(unsafe { _mm512_loadu_ps(acc.as_ptr().add(c0 + c * W)) }, al);
    }
    for (pair, vals) in p.chunks_exact(2).zip(v.chunks_exact(2)) {
        let (pe, po) = (_mm512_set1_ps(pair[0]), _mm512_set1_ps(pair[1]));
        let (ve, vo) = (vals[0].as_ptr(), vals[1].as_ptr());
        for c in 0..G {
            // SAFETY: every value row holds at least `c0 + G · W` floats (this function's contract).
            unsafe {
                even[c] = _mm512_fmadd_ps(pe, _mm512_loadu_ps(ve.add(c0 + c * W)), even[c]);
                odd[c] = _mm512_fmadd_ps(po, _mm512_loadu_ps(vo.add(c0 + c * W)), odd[c]);
            }
        }
    }
    if p.len() % 2 == 1 {
        let j = p.len() - 1;
        let pe = _mm512_set1_ps(p[j]);
        let ve = v[j].as_ptr();
        for c in 0..G {
            // SAFETY: as above.
            even[c] = _mm512_fmadd_ps(pe, unsafe { _mm512_loadu_ps(ve.add(c0 + c * W)) }, even[c]);
        }
    }
    for c in 0..G {
        // SAFETY: as for the loads from `acc`.
        unsafe { _mm512_storeu_ps(acc.as_mut_ptr().add(c0 + c * W), _mm512_add_ps(even[c], odd[c])) };
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
fn scale_row(row: &mut [f32], s: f32) {
    row.iter_mut().for_each(|x| *x *= s);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::isa::{CpuIsa, IsaLevel};

    #[target_feature(enable = "avx512f,avx2,fma")]
    fn exp_lanes(x: &[f32]) -> Vec<f32> {
        x.chunks_exact(W)
            .flat_map(|c| {
                let mut out = [0f32; W];
                // SAFETY: `c` and `out` hold W floats.
                unsafe { _mm512_storeu_ps(out.as_mut_ptr(), exp(_mm512_loadu_ps(c.as_ptr()))) };
                out
            })
            .collect()
    }

    /// The polynomial exp is within 3 ulp (relative 3.6e-7) of the exact value over the softmax's range, and exact at 0.
    #[test]
    fn exp_is_accurate() {
        if CpuIsa::capped(IsaLevel::Avx512).is_err() {
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
