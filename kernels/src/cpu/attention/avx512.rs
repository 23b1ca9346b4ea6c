//! AVX-512 micro-kernels of the tiled attention (head_dim a multiple of 16), the same arithmetic as `avx2.rs` in
//! 16-lane vectors. Every value a row gets is computed
//! lane-wise from that row's own data in a fixed order: a score is two FMA chains over the even and odd dimensions
//! (then added), the tile's exponentials use [`exp`] on all [`KEY_TILE`] lanes (masked lanes zeroed), and each output
//! lane is two FMA chains over the even and odd keys.

use core::arch::x86_64::*;

use super::{HALF_TILE, KEY_TILE, KeyTile, KvElem, PREFETCH_MAX_ROWS, ROWS_MAX, TileJob, rows_in_call, tile_loop};
use crate::cpu::vmath::exp512 as exp;

/// Lanes per vector.
const W: usize = 16;
/// Vectors per key tile.
const TV: usize = KEY_TILE / W;

/// The tile loop with these micro-kernels inlined.
#[target_feature(enable = "avx512f,avx2,fma")]
pub(super) fn run_tiles<T: KvElem>(job: &TileJob<'_, T>, acc: &mut [f32]) {
    tile_loop!(job, acc)
}

/// `p[r][j] = Σ_d q_r[d] · key_j[d]` for each of the `p.len()` rows of `q` (`q.len() / p.len()` floats each): per
/// row and vector of keys, four FMA chains over the dimensions `d ≡ 0, 1, 2, 3 (mod 4)`, summed as
/// `(c0 + c1) + (c2 + c3)` (eight independent chains per row hide the FMA latency; AVX2 has enough with two per
/// vector, as it has twice the vectors). Up to three rows at once (24 accumulators), each key vector loaded once per
/// dimension for all of them.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
fn scores_rows(q: &[f32], keys: KeyTile<'_>, p: &mut [[f32; KEY_TILE]]) {
    let hd = q.len() / p.len().max(1);
    let need = (hd / 4 * 4).saturating_sub(1) * keys.stride + HALF_TILE;
    assert!(hd < 4 || (keys.lo.len() >= need && keys.hi.len() >= need), "scores: key tile too short");
    // SAFETY: (every arm) the tile's halves hold the rows the pass reads (asserted above); `p` has the rows.
    unsafe {
        match p.len() {
            1 => scores_pass::<1>(q, hd, keys, p),
            2 => scores_pass::<2>(q, hd, keys, p),
            3 => scores_pass::<3>(q, hd, keys, p),
            r => panic!("scores_rows: {r} rows (at most {ROWS_MAX})"),
        }
    }
}

/// [`scores_rows`] for `R` rows.
///
/// # Safety
/// Both halves of `keys` hold `(hd / 4 · 4 - 1) · stride + HALF_TILE` floats; `q` holds `R · hd` floats, `p` `R`
/// rows.
#[allow(clippy::needless_range_loop)] // the same indices run over parallel arrays of accumulators
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn scores_pass<const R: usize>(q: &[f32], hd: usize, keys: KeyTile<'_>, p: &mut [[f32; KEY_TILE]]) {
    const U: usize = 4;
    const HV: usize = TV / 2;
    let qp = q.as_ptr();
    assert!(q.len() >= R * hd && p.len() >= R, "scores_pass: bad rows");
    let mut c = [[[_mm512_setzero_ps(); TV]; U]; R];
    for d in 0..hd / U {
        for u in 0..U {
            // SAFETY: row U·d + u (HALF_TILE floats from `row · stride`) lies inside both halves (this function's
            // contract).
            let (lo, hi) = unsafe { (keys.lo.as_ptr().add((U * d + u) * keys.stride), keys.hi.as_ptr().add((U * d + u) * keys.stride)) };
            for r in 0..R {
                // SAFETY: `r · hd + U·d + u < R · hd <= q.len()` (asserted above): no bounds check in the hot loop.
                let qv = _mm512_set1_ps(unsafe { *qp.add(r * hd + U * d + u) });
                for (h, k) in [lo, hi].into_iter().enumerate() {
                    for w in 0..HV {
                        // SAFETY: as above; `w · W + W <= HALF_TILE`.
                        c[r][u][h * HV + w] = _mm512_fmadd_ps(qv, unsafe { _mm512_loadu_ps(k.add(w * W)) }, c[r][u][h * HV + w]);
                    }
                }
            }
        }
    }
    for r in 0..R {
        for v in 0..TV {
            let s = _mm512_add_ps(_mm512_add_ps(c[r][0][v], c[r][1][v]), _mm512_add_ps(c[r][2][v], c[r][3][v]));
            // SAFETY: row `r` of `p` holds KEY_TILE = TV · W floats.
            unsafe { _mm512_storeu_ps(p[r].as_mut_ptr().add(v * W), s) };
        }
    }
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

/// `acc_r = acc_r · alpha_r + Σ_j p_r[j] · v_j` for each of the `alpha.len()` rows of `acc` (the first `v.len()`
/// keys): per row and lane, one FMA chain over the even keys (starting from `acc · alpha`) and one over the odd keys,
/// added at the end. Four vectors of the head at a time (then one at a time for the rest), so the chains stay in
/// registers, each value vector is loaded once for all the rows, and the key loop has no branch.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
fn rescale_accumulate_rows(acc: &mut [f32], alpha: &[f32], p: &[[f32; KEY_TILE]], v: &[&[f32]]) {
    let hd = acc.len() / alpha.len().max(1);
    let n = hd / W * W;
    assert!(p.len() >= alpha.len() && v.len() <= KEY_TILE, "rescale_accumulate: bad rows");
    assert!(v.iter().all(|v| v.len() >= n), "rescale_accumulate: value row too short");
    // SAFETY: (every arm) the value rows hold at least `n` floats (asserted above) and `acc` holds the rows.
    unsafe {
        match alpha.len() {
            1 => accumulate_rows::<1>(acc, hd, alpha, p, v),
            2 => accumulate_rows::<2>(acc, hd, alpha, p, v),
            3 => accumulate_rows::<3>(acc, hd, alpha, p, v),
            r => panic!("rescale_accumulate_rows: {r} rows (at most {ROWS_MAX})"),
        }
    }
}

/// [`rescale_accumulate_rows`] for `R` rows.
///
/// # Safety
/// Every value row holds at least `hd / W · W` floats; `acc` holds `R · hd` floats.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn accumulate_rows<const R: usize>(acc: &mut [f32], hd: usize, alpha: &[f32], p: &[[f32; KEY_TILE]], v: &[&[f32]]) {
    const G: usize = 4;
    let n = hd / W * W;
    let mut c0 = 0;
    while c0 + G * W <= n {
        // SAFETY: the value rows hold at least `n >= c0 + G · W` floats (this function's contract).
        unsafe { accumulate_block::<R, G>(acc, hd, c0, alpha, p, v) };
        c0 += G * W;
    }
    while c0 + W <= n {
        // SAFETY: as above, with `n >= c0 + W`.
        unsafe { accumulate_block::<R, 1>(acc, hd, c0, alpha, p, v) };
        c0 += W;
    }
}

/// [`rescale_accumulate_rows`] for the `G` vectors from float `c0` on of each of `R` rows.
///
/// # Safety
/// Every row of `v` holds at least `c0 + G · W` floats.
#[allow(clippy::needless_range_loop)] // the same indices run over parallel arrays of accumulators
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn accumulate_block<const R: usize, const G: usize>(
    acc: &mut [f32],
    hd: usize,
    c0: usize,
    alpha: &[f32],
    p: &[[f32; KEY_TILE]],
    v: &[&[f32]],
) {
    assert!((R - 1) * hd + c0 + G * W <= acc.len() && alpha.len() >= R && p.len() >= R, "accumulate_block: bad rows");
    assert!(v.len() <= KEY_TILE, "accumulate_block: more keys than a tile");
    let mut even = [[_mm512_setzero_ps(); G]; R];
    let mut odd = [[_mm512_setzero_ps(); G]; R];
    for r in 0..R {
        let al = _mm512_set1_ps(alpha[r]);
        for c in 0..G {
            // SAFETY: `r · hd + c0 + (c + 1) · W <= acc.len()` (asserted above).
            even[r][c] = _mm512_mul_ps(unsafe { _mm512_loadu_ps(acc.as_ptr().add(r * hd + c0 + c * W)) }, al);
        }
    }
    let pairs = v.len() / 2;
    for j in 0..pairs {
        let (ve, vo) = (v[2 * j].as_ptr(), v[2 * j + 1].as_ptr());
        for r in 0..R {
            let (pe, po) = (_mm512_set1_ps(p[r][2 * j]), _mm512_set1_ps(p[r][2 * j + 1]));
            for c in 0..G {
                // SAFETY: every value row holds at least `c0 + G · W` floats (this function's contract).
                unsafe {
                    even[r][c] = _mm512_fmadd_ps(pe, _mm512_loadu_ps(ve.add(c0 + c * W)), even[r][c]);
                    odd[r][c] = _mm512_fmadd_ps(po, _mm512_loadu_ps(vo.add(c0 + c * W)), odd[r][c]);
                }
            }
        }
    }
    if v.len() % 2 == 1 {
        let j = v.len() - 1;
        let ve = v[j].as_ptr();
        for r in 0..R {
            let pe = _mm512_set1_ps(p[r][j]);
            for c in 0..G {
                // SAFETY: as above.
                even[r][c] = _mm512_fmadd_ps(pe, unsafe { _mm512_loadu_ps(ve.add(c0 + c * W)) }, even[r][c]);
            }
        }
    }
    for r in 0..R {
        for c in 0..G {
            // SAFETY: as for the loads from `acc`.
            unsafe { _mm512_storeu_ps(acc.as_mut_ptr().add(r * hd + c0 + c * W), _mm512_add_ps(even[r][c], odd[r][c])) };
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
fn scale_row(row: &mut [f32], s: f32) {
    row.iter_mut().for_each(|x| *x *= s);
}
