//! AVX2 + FMA micro-kernels of the tiled attention (head_dim a multiple of 8). Every value a row gets is computed
//! lane-wise from that row's own data in a fixed order: a score is two FMA chains over the even and odd dimensions
//! (then added), the tile's exponentials use [`exp`] on all [`KEY_TILE`] lanes (masked lanes zeroed), and each output
//! lane is two FMA chains over the even and odd keys.

use core::arch::x86_64::*;

use super::{HALF_TILE, KEY_TILE, KeyTile, KvElem, PREFETCH_MAX_ROWS, ROWS_MAX, TileJob, rows_in_call, tile_loop};
use crate::cpu::vmath::exp;

/// Lanes per vector.
const W: usize = 8;
/// Vectors per key tile.
const TV: usize = KEY_TILE / W;

/// The tile loop with these micro-kernels inlined.
#[target_feature(enable = "avx2,fma")]
pub(super) fn run_tiles<T: KvElem>(job: &TileJob<'_, T>, acc: &mut [f32]) {
    tile_loop!(job, acc)
}

/// `p[r][j] = Σ_d q_r[d] · key_j[d]` for each of the `p.len()` rows of `q` (`q.len() / p.len()` floats each): per
/// row and vector of keys, two FMA chains over the even and the odd dimensions, then added. One row takes the whole
/// tile in one pass (8 chains); two or three rows take it a half at a time (8 or 12 chains), every key vector loaded
/// once per dimension for all of them.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn scores_rows(q: &[f32], keys: KeyTile<'_>, p: &mut [[f32; KEY_TILE]]) {
    let hd = q.len() / p.len().max(1);
    let need = hd.saturating_sub(1) * keys.stride + HALF_TILE;
    assert!(hd < 2 || (keys.lo.len() >= need && keys.hi.len() >= need), "scores: key tile too short");
    // SAFETY: (every arm) the tile's halves hold the rows every pass reads (asserted above); `p` has the rows.
    unsafe {
        match p.len() {
            1 => scores_pass::<1, TV>(q, hd, keys, 0, p),
            2 => {
                scores_pass::<2, HV>(q, hd, keys, 0, p);
                scores_pass::<2, HV>(q, hd, keys, HV, p);
            }
            3 => {
                scores_pass::<3, HV>(q, hd, keys, 0, p);
                scores_pass::<3, HV>(q, hd, keys, HV, p);
            }
            r => panic!("scores_rows: {r} rows (at most {ROWS_MAX})"),
        }
    }
}

/// Vectors per tile half (one page at the default block size).
const HV: usize = TV / 2;

/// [`scores_rows`] for `R` rows and the `V` key vectors from vector `v0` on.
///
/// # Safety
/// Both halves of `keys` hold `(hd - 1) · stride + HALF_TILE` floats; `q` holds `R · hd` floats, `p` `R` rows.
#[allow(clippy::needless_range_loop)] // the same indices run over parallel arrays of accumulators
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn scores_pass<const R: usize, const V: usize>(q: &[f32], hd: usize, keys: KeyTile<'_>, v0: usize, p: &mut [[f32; KEY_TILE]]) {
    let qp = q.as_ptr();
    assert!(q.len() >= R * hd && p.len() >= R && v0 + V <= TV, "scores_pass: bad rows");
    // Where vector u of the pass starts in dimension 0 of its half.
    let base: [*const f32; V] = core::array::from_fn(|u| {
        let v = v0 + u;
        let half = if v < HV { keys.lo } else { keys.hi };
        // SAFETY: `(v % HV) · W < HALF_TILE <= half.len()`.
        unsafe { half.as_ptr().add((v % HV) * W) }
    });
    let mut even = [[_mm256_setzero_ps(); V]; R];
    let mut odd = [[_mm256_setzero_ps(); V]; R];
    for d in 0..hd / 2 {
        for r in 0..R {
            // SAFETY: `r · hd + 2d + 1 < R · hd <= q.len()` (asserted above): no bounds check in the hot loop.
            let (q0, q1) = unsafe { (_mm256_broadcast_ss(&*qp.add(r * hd + 2 * d)), _mm256_broadcast_ss(&*qp.add(r * hd + 2 * d + 1))) };
            for u in 0..V {
                // SAFETY: rows 2d and 2d + 1 of the half lie inside it (this function's contract).
                unsafe {
                    let k0 = base[u].add(2 * d * keys.stride);
                    even[r][u] = _mm256_fmadd_ps(q0, _mm256_loadu_ps(k0), even[r][u]);
                    odd[r][u] = _mm256_fmadd_ps(q1, _mm256_loadu_ps(k0.add(keys.stride)), odd[r][u]);
                }
            }
        }
    }
    for r in 0..R {
        for u in 0..V {
            // SAFETY: row `r` of `p` holds KEY_TILE = TV · W floats and `v0 + u < TV`.
            unsafe { _mm256_storeu_ps(p[r].as_mut_ptr().add((v0 + u) * W), _mm256_add_ps(even[r][u], odd[r][u])) };
        }
    }
}

/// `((v0+v4)+(v2+v6)) + ((v1+v5)+(v3+v7))`.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum(v: __m256) -> f32 {
    let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)))
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn hmax(v: __m256) -> f32 {
    let s4 = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s2 = _mm_max_ps(s4, _mm_movehl_ps(s4, s4));
    _mm_cvtss_f32(_mm_max_ss(s2, _mm_movehdup_ps(s2)))
}

/// Scales the first `n` scores, returns the new running max `m` and the tile's `Σ exp(s_j - m)` (lane sums, then a
/// fixed tree), leaving `p[j] = exp(s_j - m)` for `j < n` and 0 past them.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn softmax_tile(p: &mut [f32; KEY_TILE], n: usize, scale: f32, m_old: f32) -> (f32, f32) {
    let lane = _mm256_setr_ps(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0);
    let (sc, limit) = (_mm256_set1_ps(scale), _mm256_set1_ps(n as f32));
    let mut s = [_mm256_setzero_ps(); TV];
    // All lanes live in a full tile (most of a long row's): the same bits without the masking.
    let full = n >= KEY_TILE;
    let mut live = [_mm256_castsi256_ps(_mm256_set1_epi32(-1)); TV];
    let mut mx = _mm256_set1_ps(m_old);
    for v in 0..TV {
        // SAFETY: `p` holds KEY_TILE = TV · W floats.
        let x = _mm256_mul_ps(unsafe { _mm256_loadu_ps(p.as_ptr().add(v * W)) }, sc);
        s[v] = if full {
            x
        } else {
            live[v] = _mm256_cmp_ps::<_CMP_LT_OQ>(_mm256_add_ps(lane, _mm256_set1_ps((v * W) as f32)), limit);
            _mm256_blendv_ps(_mm256_set1_ps(f32::NEG_INFINITY), x, live[v])
        };
        mx = _mm256_max_ps(mx, s[v]);
    }
    let m = hmax(mx);
    let mv = _mm256_set1_ps(m);
    let mut total = _mm256_setzero_ps();
    for v in 0..TV {
        let e = exp(_mm256_sub_ps(s[v], mv));
        let e = if full { e } else { _mm256_and_ps(e, live[v]) };
        total = _mm256_add_ps(total, e);
        // SAFETY: as above.
        unsafe { _mm256_storeu_ps(p.as_mut_ptr().add(v * W), e) };
    }
    (m, hsum(total))
}

/// `acc_r = acc_r · alpha_r + Σ_j p_r[j] · v_j` for each of the `alpha.len()` rows of `acc` (the first `v.len()`
/// keys): per row and lane, one FMA chain over the even keys (starting from `acc · alpha`) and one over the odd keys,
/// added at the end. A few vectors of the head at a time (one row: 4; two or three rows: 2; then one at a time for
/// the rest), so the chains stay in registers, each value vector is loaded once for all the rows, and the key loop
/// has no branch.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn rescale_accumulate_rows(acc: &mut [f32], alpha: &[f32], p: &[[f32; KEY_TILE]], v: &[&[f32]]) {
    let hd = acc.len() / alpha.len().max(1);
    let n = hd / W * W;
    assert!(p.len() >= alpha.len() && v.len() <= KEY_TILE, "rescale_accumulate: bad rows");
    assert!(v.iter().all(|v| v.len() >= n), "rescale_accumulate: value row too short");
    // SAFETY: (every arm) the value rows hold at least `n` floats (asserted above) and `acc` holds the rows.
    unsafe {
        match alpha.len() {
            1 => accumulate_rows::<1, 4>(acc, hd, alpha, p, v),
            2 => accumulate_rows::<2, 2>(acc, hd, alpha, p, v),
            3 => accumulate_rows::<3, 2>(acc, hd, alpha, p, v),
            r => panic!("rescale_accumulate_rows: {r} rows (at most {ROWS_MAX})"),
        }
    }
}

/// [`rescale_accumulate_rows`] for `R` rows, `G` vectors at a time.
///
/// # Safety
/// Every value row holds at least `hd / W · W` floats; `acc` holds `R · hd` floats.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn accumulate_rows<const R: usize, const G: usize>(acc: &mut [f32], hd: usize, alpha: &[f32], p: &[[f32; KEY_TILE]], v: &[&[f32]]) {
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
#[target_feature(enable = "avx2,fma")]
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
    let mut even = [[_mm256_setzero_ps(); G]; R];
    let mut odd = [[_mm256_setzero_ps(); G]; R];
    for r in 0..R {
        let al = _mm256_set1_ps(alpha[r]);
        for c in 0..G {
            // SAFETY: `r · hd + c0 + (c + 1) · W <= acc.len()` (asserted above).
            even[r][c] = _mm256_mul_ps(unsafe { _mm256_loadu_ps(acc.as_ptr().add(r * hd + c0 + c * W)) }, al);
        }
    }
    let pairs = v.len() / 2;
    for j in 0..pairs {
        let (ve, vo) = (v[2 * j].as_ptr(), v[2 * j + 1].as_ptr());
        for r in 0..R {
            let (pe, po) = (_mm256_set1_ps(p[r][2 * j]), _mm256_set1_ps(p[r][2 * j + 1]));
            for c in 0..G {
                // SAFETY: every value row holds at least `c0 + G · W` floats (this function's contract).
                unsafe {
                    even[r][c] = _mm256_fmadd_ps(pe, _mm256_loadu_ps(ve.add(c0 + c * W)), even[r][c]);
                    odd[r][c] = _mm256_fmadd_ps(po, _mm256_loadu_ps(vo.add(c0 + c * W)), odd[r][c]);
                }
            }
        }
    }
    if v.len() % 2 == 1 {
        let j = v.len() - 1;
        let ve = v[j].as_ptr();
        for r in 0..R {
            let pe = _mm256_set1_ps(p[r][j]);
            for c in 0..G {
                // SAFETY: as above.
                even[r][c] = _mm256_fmadd_ps(pe, unsafe { _mm256_loadu_ps(ve.add(c0 + c * W)) }, even[r][c]);
            }
        }
    }
    for r in 0..R {
        for c in 0..G {
            // SAFETY: as for the loads from `acc`.
            unsafe { _mm256_storeu_ps(acc.as_mut_ptr().add(r * hd + c0 + c * W), _mm256_add_ps(even[r][c], odd[r][c])) };
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn scale_row(row: &mut [f32], s: f32) {
    row.iter_mut().for_each(|x| *x *= s);
}
