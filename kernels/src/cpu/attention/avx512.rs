//! AVX-512 micro-kernels of the tiled attention (head_dim a multiple of 16). Each score is one 16-lane FMA chain
//! over the head's chunks in order, then a fixed horizontal sum, whether computed alone ([`dot`]) or four keys at a
//! time ([`dot4`]): the two give the same bits, so a row's scores do not depend on where its tile's keys end.

use core::arch::x86_64::*;

use super::{KEY_TILE, TileJob, tile_loop};

/// The tile loop with these micro-kernels inlined.
#[target_feature(enable = "avx512f,avx2,fma")]
pub(super) fn run_tiles(job: &TileJob<'_>, acc: &mut [f32]) {
    tile_loop!(job, acc)
}

/// The 16 lanes' sum (`_mm512_reduce_add_ps`: a fixed tree of halvings).
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
fn hsum(v: __m512) -> f32 {
    _mm512_reduce_add_ps(v)
}

#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
fn dot(q: &[f32], k: &[f32]) -> f32 {
    let mut a = _mm512_setzero_ps();
    for (qc, kc) in q.chunks_exact(16).zip(k.chunks_exact(16)) {
        // SAFETY: both chunks hold 16 floats.
        a = unsafe { _mm512_fmadd_ps(_mm512_loadu_ps(qc.as_ptr()), _mm512_loadu_ps(kc.as_ptr()), a) };
    }
    hsum(a)
}

#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
fn dot4(q: &[f32], k: [&[f32]; 4]) -> [f32; 4] {
    let n = q.len() / 16 * 16;
    assert!(k.iter().all(|k| k.len() >= n), "dot4: key shorter than the query");
    let mut a = [_mm512_setzero_ps(); 4];
    for c in (0..n).step_by(16) {
        // SAFETY: `c + 16 <= n`, and `q` and every key hold at least `n` floats.
        unsafe {
            let qv = _mm512_loadu_ps(q.as_ptr().add(c));
            for (a, k) in a.iter_mut().zip(&k) {
                *a = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k.as_ptr().add(c)), *a);
            }
        }
    }
    [hsum(a[0]), hsum(a[1]), hsum(a[2]), hsum(a[3])]
}

/// `acc = acc · alpha + Σ_j p_j · v_j`, one FMA per key in key order for each lane.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
fn rescale_accumulate(acc: &mut [f32], alpha: f32, p: &[f32], v: &[&[f32]]) {
    let n = acc.len() / 16 * 16;
    assert!(v.iter().all(|v| v.len() >= n), "rescale_accumulate: value row shorter than the accumulator");
    let al = _mm512_set1_ps(alpha);
    for c in (0..n).step_by(16) {
        // SAFETY: `c + 16 <= n`, and `acc` and every value row hold at least `n` floats.
        unsafe {
            let mut x = _mm512_mul_ps(_mm512_loadu_ps(acc.as_ptr().add(c)), al);
            for (&pj, vj) in p.iter().zip(v) {
                x = _mm512_fmadd_ps(_mm512_set1_ps(pj), _mm512_loadu_ps(vj.as_ptr().add(c)), x);
            }
            _mm512_storeu_ps(acc.as_mut_ptr().add(c), x);
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
fn scale_row(row: &mut [f32], s: f32) {
    row.iter_mut().for_each(|x| *x *= s);
}
