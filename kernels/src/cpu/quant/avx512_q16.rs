//! AVX-512BW + GFNI kernels for int16 activations ([`BlockQ16`]), x86_64: one 32 x i16
//! activation block per 512-bit register.
//!
//! Per block the weight quants are widened to 32 x i16 in one register (for the nibble types a
//! `vpshufb` of the broadcast bytes, then one `vgf2p8affineqb` that keeps the low nibble in the
//! first 16 words and the high nibble in the last 16; the Q5 high bits are added under a 32-bit
//! mask), multiplied by one `_mm512_madd_epi16` into 16 i32 lanes (2 products
//! each, exact in f32), converted and accumulated with one FMA by `d_w * d_x` into 16-lane f32
//! accumulators. Blocks 2j / 2j+1 go to `acc0` / `acc1`; the result is
//! `hsum(lo256(acc0 + acc1) + hi256(acc0 + acc1)) + (accm0 + accm1)[1]`, a fixed order, but not
//! the AVX2 path's, so the two give different (equally accurate) bits.
//!
//! Measured on an AMD EPYC (Zen 5) VM, 576-element rows, ns per row (AVX2 `avx2_q16` / this):
//! Q4_0 17.3 / 14.3, Q4_1 15.4 / 13.8, Q5_0 26.1 / 17.3, Q5_1 25.6 / 16.2, Q8_0 13.7 / 11.9;
//! with `vpsrlvw` + `vpand` instead of the affine op Q4_1 took 15.0.
//!
//! `gemm_q16` ([`gemm`]) runs up to 8 activation rows against each widened weight block: per
//! (block, activation row) one `vpmaddwd` (memory operand), one `vcvtdq2ps` and one FMA with an
//! embedded-broadcast scale, which is the floor as long as the bits must be those of [`row`]. The
//! activation rows are repacked so every 512-bit load is one aligned cache line (the 72-byte
//! `BlockQ16` makes 7 of 8 loads split, ~40% slower), the scale products of the next weight row
//! are computed alongside (their minimum-term sums are a chain of dependent adds), and the 8
//! final reductions are transposed into one. Same VM, Q4_1 1536 x 576, ns per (row x activation
//! row): gemv loop 13.7, gemm 8.0 at 4 rows, 6.2 at 8 or more (`bench_gemm_q16_q4_1_1536x576`).
//! Rows much longer than ~3000 elements no longer keep a group in L1 (4096: only 1.2x).
//!
//! Every function is `unsafe` only because it needs a CPU with avx512f, avx512bw, gfni, avx2,
//! fma and f16c, and reads only whole blocks inside its slices.

use core::arch::x86_64::*;
use core::ptr::{addr_of, read_unaligned};

use super::avx2::{Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, has_min, hsum, prefetch_ahead, scales, type_size};
use super::avx2_q16::{G, Group, Lanes};
use super::{BlockQ16, GgmlType};

/// 16 bytes of packed nibbles -> 32 x i16: the low nibbles (elements 0..16), then the high ones.
///
/// # Safety
/// `p` must point at 16 readable bytes; the CPU must support avx512f, avx512bw and gfni.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,gfni,avx2,fma,f16c")]
unsafe fn nibbles32(p: *const u8) -> __m512i {
    // SAFETY: the caller guarantees 16 readable bytes at `p`; loadu has no alignment needs.
    let q = unsafe { _mm512_broadcast_i32x4(_mm_loadu_si128(p.cast::<__m128i>())) };
    // Zero-extend bytes 0..8 into the words of 128-bit lanes 0 and 2, bytes 8..16 into 1 and 3.
    let widen = _mm512_set_epi64(
        0x800F_800E_800D_800Cu64 as i64,
        0x800B_800A_8009_8008u64 as i64,
        0x8007_8006_8005_8004u64 as i64,
        0x8003_8002_8001_8000u64 as i64,
        0x800F_800E_800D_800Cu64 as i64,
        0x800B_800A_8009_8008u64 as i64,
        0x8007_8006_8005_8004u64 as i64,
        0x8003_8002_8001_8000u64 as i64,
    );
    let q = _mm512_shuffle_epi8(q, widen);
    // GF(2) affine bit matrices, one per 64-bit lane: `b & 0x0F` for words 0..16, `b >> 4` for
    // words 16..32 (byte 7 - i of a matrix selects the input bits of output bit i).
    const LO: i64 = 0x0102_0408_0000_0000;
    const HI: i64 = 0x1020_4080_0000_0000;
    let m = _mm512_set_epi64(HI, HI, HI, HI, LO, LO, LO, LO);
    _mm512_gf2p8affine_epi64_epi8::<0>(q, m)
}

/// The integer products of one weight block of kernel type `K` and one activation block, in 16
/// f32 lanes (lane k: elements 2k, 2k+1).
///
/// # Safety
/// `w` must point at `type_size(K)` readable bytes and `x` at a valid `BlockQ16`; the CPU must
/// support avx512f, avx512bw, gfni, avx2, fma and f16c.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,gfni,avx2,fma,f16c")]
unsafe fn block<const K: u8>(w: *const u8, x: *const BlockQ16) -> __m512 {
    // SAFETY: an unaligned read of the 64-byte `qs` of the BlockQ16 at `x` and the weight block
    // at `w`, which the caller guarantees are readable.
    unsafe {
        let y = _mm512_loadu_si512(addr_of!((*x).qs).cast::<__m512i>());
        _mm512_cvtepi32_ps(_mm512_madd_epi16(quants::<K>(w), y))
    }
}

/// The 32 weight quants of one block of kernel type `K` as i16 (minus the offset 8 / 16 of
/// Q4_0 / Q5_0): the `q` that [`block`] multiplies with the activations.
///
/// # Safety
/// `w` must point at `type_size(K)` readable bytes; the CPU must support avx512f, avx512bw,
/// gfni, avx2, fma and f16c.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,gfni,avx2,fma,f16c")]
unsafe fn quants<const K: u8>(w: *const u8) -> __m512i {
    // SAFETY: every read below is an unaligned read inside the `type_size(K)` bytes at `w`,
    // which the caller guarantees are readable.
    unsafe {
        match K {
            Q4_0 => _mm512_sub_epi16(nibbles32(w.add(2)), _mm512_set1_epi16(8)),
            Q4_1 => nibbles32(w.add(4)),
            Q5_0 => {
                // q - 16 where the high bit is clear.
                let qh: __mmask32 = read_unaligned(w.add(2).cast::<u32>());
                let q = nibbles32(w.add(6));
                _mm512_mask_sub_epi16(q, !qh, q, _mm512_set1_epi16(16))
            }
            Q5_1 => {
                let qh: __mmask32 = read_unaligned(w.add(4).cast::<u32>());
                let q = nibbles32(w.add(8));
                _mm512_mask_add_epi16(q, qh, q, _mm512_set1_epi16(16))
            }
            _ => _mm512_cvtepi8_epi16(_mm256_loadu_si256(w.add(2).cast::<__m256i>())),
        }
    }
}

/// Dot product of one weight row of kernel type `K` with `x`, over the whole blocks both hold.
///
/// # Safety
/// The CPU must support avx512f, avx512bw, gfni, avx2, fma and f16c.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,gfni,avx2,fma,f16c")]
unsafe fn row<const K: u8>(w: &[u8], x: &[BlockQ16]) -> f32 {
    let ts = type_size(K);
    let nb = x.len().min(w.len() / ts);
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut acc0 = _mm512_setzero_ps();
    let mut acc1 = _mm512_setzero_ps();
    let mut accm0 = _mm_setzero_ps();
    let mut accm1 = _mm_setzero_ps();
    let mut i = 0;
    while i + 1 < nb {
        prefetch_ahead(wp.wrapping_add(i * ts));
        // SAFETY: i + 1 < nb, so blocks i and i + 1 lie inside `w` (nb * ts <= w.len()) and `x`;
        // the CPU features are the caller's guarantee.
        let (sa, sb, pa, pb) = unsafe {
            let (wa, wb, xa, xb) = (wp.add(i * ts), wp.add((i + 1) * ts), xp.add(i), xp.add(i + 1));
            let (sa, sb) = scales::<K, BlockQ16>(wa, xa, wb, xb);
            (sa, sb, block::<K>(wa, xa), block::<K>(wb, xb))
        };
        acc0 = _mm512_fmadd_ps(_mm512_broadcastss_ps(sa), pa, acc0);
        acc1 = _mm512_fmadd_ps(_mm512_broadcastss_ps(sb), pb, acc1);
        if has_min(K) {
            accm0 = _mm_add_ps(accm0, sa);
            accm1 = _mm_add_ps(accm1, sb);
        }
        i += 2;
    }
    if i < nb {
        // SAFETY: i < nb, so block i lies inside `w` and `x`.
        let (sa, pa) = unsafe {
            let (wa, xa) = (wp.add(i * ts), xp.add(i));
            (scales::<K, BlockQ16>(wa, xa, wa, xa).0, block::<K>(wa, xa))
        };
        acc0 = _mm512_fmadd_ps(_mm512_broadcastss_ps(sa), pa, acc0);
        if has_min(K) {
            accm0 = _mm_add_ps(accm0, sa);
        }
    }
    let v = _mm512_add_ps(acc0, acc1);
    let v = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))));
    let mut sum = hsum(v);
    if has_min(K) {
        let m = _mm_add_ps(accm0, accm1);
        sum += _mm_cvtss_f32(_mm_movehdup_ps(m));
    }
    sum
}

/// `vec_dot_q16` for the supported types; 0.0 for the others.
///
/// # Safety
/// The CPU must support avx512f, avx512bw, gfni, avx2, fma and f16c.
#[target_feature(enable = "avx512f,avx512bw,gfni,avx2,fma,f16c")]
pub(super) unsafe fn vec_dot(t: GgmlType, w: &[u8], x: &[BlockQ16]) -> f32 {
    // SAFETY: (all arms) same CPU-feature requirement as this function.
    unsafe {
        match t {
            GgmlType::Q4_0 => row::<Q4_0>(w, x),
            GgmlType::Q4_1 => row::<Q4_1>(w, x),
            GgmlType::Q5_0 => row::<Q5_0>(w, x),
            GgmlType::Q5_1 => row::<Q5_1>(w, x),
            GgmlType::Q8_0 => row::<Q8_0>(w, x),
            _ => 0.0,
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,gfni,avx2,fma,f16c")]
unsafe fn gemv_k<const K: u8>(w: &[u8], row_bytes: usize, x: &[BlockQ16], out: &mut [f32]) {
    for (o, r) in out.iter_mut().zip(w.chunks_exact(row_bytes)) {
        // SAFETY: same CPU-feature requirement as this function.
        *o = unsafe { row::<K>(r, x) };
    }
}

/// `gemv_q16` for the supported types (`row_bytes > 0`); leaves `out` untouched for the others.
///
/// # Safety
/// The CPU must support avx512f, avx512bw, gfni, avx2, fma and f16c.
#[target_feature(enable = "avx512f,avx512bw,gfni,avx2,fma,f16c")]
pub(super) unsafe fn gemv(t: GgmlType, w: &[u8], row_bytes: usize, x: &[BlockQ16], out: &mut [f32]) {
    // SAFETY: (all arms) same CPU-feature requirement as this function.
    unsafe {
        match t {
            GgmlType::Q4_0 => gemv_k::<Q4_0>(w, row_bytes, x, out),
            GgmlType::Q4_1 => gemv_k::<Q4_1>(w, row_bytes, x, out),
            GgmlType::Q5_0 => gemv_k::<Q5_0>(w, row_bytes, x, out),
            GgmlType::Q5_1 => gemv_k::<Q5_1>(w, row_bytes, x, out),
            GgmlType::Q8_0 => gemv_k::<Q8_0>(w, row_bytes, x, out),
            _ => {}
        }
    }
}

/// [`row`]'s reduction of `acc0 + acc1` to one f32 (without the minimum terms).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,gfni,avx2,fma,f16c")]
fn reduce(acc0: __m512, acc1: __m512) -> f32 {
    let v = _mm512_add_ps(acc0, acc1);
    let v = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))));
    hsum(v)
}

/// [`reduce`] of 8 accumulator pairs at once, with the same additions in the same order:
/// `v = acc0 + acc1`, `lo256(v) + hi256(v)`, `lo128 + hi128`, lanes `[0] + [2]` and `[1] + [3]`,
/// then `[0] + [1]`. Returns `r` with the result of pair `b` in lane `4b` for `b < 4` and
/// `4(b - 4) + 1` for `b >= 4` (see [`reduced_lane`]).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,gfni,avx2,fma,f16c")]
fn reduce8(acc0: &[__m512; 8], acc1: &[__m512; 8]) -> __m512 {
    let v: [__m512; 8] = core::array::from_fn(|b| _mm512_add_ps(acc0[b], acc1[b]));
    // h[k] = [lo256(v[2k]) + hi256(v[2k]) | lo256(v[2k + 1]) + hi256(v[2k + 1])]
    let h: [__m512; 4] = core::array::from_fn(|k| {
        let (a, b) = (v[2 * k], v[2 * k + 1]);
        let lo = _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b); // [a.0, a.1, b.0, b.1] (128-bit)
        let hi = _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b); // [a.2, a.3, b.2, b.3]
        _mm512_add_ps(lo, hi)
    });
    // q[j] = [s4 of 4j, 4j + 1, 4j + 2, 4j + 3] with s4 = lo128 + hi128 of the 256-bit sums.
    let q: [__m512; 2] = core::array::from_fn(|j| {
        let (a, b) = (h[2 * j], h[2 * j + 1]);
        let lo = _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b); // [a.0, a.2, b.0, b.2]
        let hi = _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b); // [a.1, a.3, b.1, b.3]
        _mm512_add_ps(lo, hi)
    });
    // 128-bit lane k: [s4_k[0] + s4_k[2], s4_k[1] + s4_k[3], same for k + 4].
    let c = _mm512_shuffle_ps::<0b01_00_01_00>(q[0], q[1]);
    let d = _mm512_shuffle_ps::<0b11_10_11_10>(q[0], q[1]);
    let s2 = _mm512_add_ps(c, d);
    // 128-bit lane k: [r_k, r_{k + 4}, r_k, r_{k + 4}].
    let e = _mm512_shuffle_ps::<0b10_00_10_00>(s2, s2);
    let f = _mm512_shuffle_ps::<0b11_01_11_01>(s2, s2);
    _mm512_add_ps(e, f)
}

/// The lane of [`reduce8`]'s result that holds pair `b`.
const fn reduced_lane(b: usize) -> usize {
    if b < 4 { 4 * b } else { 4 * (b - 4) + 1 }
}

/// The scale products of weight block `wb` of kernel type `K` with the group's `table` entry of
/// the same block, stored at `scale` and returned: `[d_w, m_w, d_w, m_w, ..] * table`, so lane
/// `2b` is `d_w * d_x` of activation row `b` (the lane 0 of `scales`) and lane `2b + 1` is
/// `m_w * s_x` (its lane 1) for the types with a minimum (`d_w * s_x`, unused, for the others).
///
/// # Safety
/// `wb` must point at `type_size(K)` readable bytes, `table` and `scale` at (aligned) entries;
/// the CPU must support avx512f, avx512bw, gfni, avx2, fma and f16c.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,gfni,avx2,fma,f16c")]
unsafe fn block_scales<const K: u8>(wb: *const u8, table: *const Lanes, scale: *mut Lanes) -> __m512 {
    // SAFETY: the caller's guarantees.
    unsafe {
        // [d_w, m_w] (or [d_w, d_w]) repeated: one conversion, exact.
        let dm = if has_min(K) {
            _mm512_cvtph_ps(_mm256_set1_epi32(read_unaligned(wb.cast::<i32>())))
        } else {
            _mm512_cvtph_ps(_mm256_set1_epi16(read_unaligned(wb.cast::<i16>())))
        };
        let p = _mm512_mul_ps(dm, _mm512_load_ps(table.cast::<f32>()));
        _mm512_store_ps(scale.cast::<f32>(), p);
        p
    }
}

/// The scale products of every block of one weight row (`nb` blocks at `w`) into `scale[..nb]`
/// (see [`block_scales`]); returns, for the types with a minimum, `accm0 + accm1` of [`row`] in
/// lanes `2b + 1`: the sums of the `m_w * s_x` of the even and of the odd blocks, accumulated
/// from 0 in block order, then added.
///
/// # Safety
/// `w` must point at `nb * type_size(K)` readable bytes, `table` and `scale` at `nb` entries;
/// the CPU must support avx512f, avx512bw, gfni, avx2, fma and f16c.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,gfni,avx2,fma,f16c")]
unsafe fn row_scales<const K: u8>(w: *const u8, nb: usize, table: *const Lanes, scale: *mut Lanes) -> __m512 {
    let ts = type_size(K);
    // SAFETY: block `i < nb` lies inside the caller's ranges.
    let one = |i: usize| unsafe { block_scales::<K>(w.add(i * ts), table.add(i), scale.add(i)) };
    let mut accm0 = _mm512_setzero_ps();
    let mut accm1 = _mm512_setzero_ps();
    let mut i = 0;
    while i + 1 < nb {
        let (pa, pb) = (one(i), one(i + 1));
        if has_min(K) {
            accm0 = _mm512_add_ps(accm0, pa);
            accm1 = _mm512_add_ps(accm1, pb);
        }
        i += 2;
    }
    if i < nb {
        let pa = one(i);
        if has_min(K) {
            accm0 = _mm512_add_ps(accm0, pa);
        }
    }
    _mm512_add_ps(accm0, accm1)
}

/// `out[b * out_stride + r] = row::<K>(row r of w, activation row b)` for the `NA` activation
/// rows of group `g` (`nb` blocks each) and every row of `w`, with the same operations per (row,
/// activation row) as [`row`]: each weight block is widened once and multiplied with the `NA`
/// activation blocks into `2 * NA` independent accumulators; the scale products and the minimum
/// terms of the next row ([`block_scales`], a chain of dependent adds) are computed alongside,
/// into the other half of `g.scale`; the final reductions of 8 rows are done side by side
/// ([`reduce8`]).
///
/// # Safety
/// `row_bytes >= nb * type_size(K)`, `g` filled with `NA` rows of `nb` blocks, `out` long enough
/// for every (b, r) (checked); the CPU must support avx512f, avx512bw, gfni, avx2, fma and f16c.
#[target_feature(enable = "avx512f,avx512bw,gfni,avx2,fma,f16c")]
unsafe fn gemm_group<const K: u8, const NA: usize>(
    w: &[u8],
    row_bytes: usize,
    g: &mut Group,
    nb: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let ts = type_size(K);
    let rows = w.len() / row_bytes;
    assert!(NA <= G && row_bytes >= nb * ts && g.table.len() >= nb && g.scale.len() >= 2 * nb);
    if rows == 0 {
        return;
    }
    let (yp, tp) = (g.qs.as_ptr(), g.table.as_ptr());
    // The two halves of `g.scale`: this row's scale products and the next row's.
    let (mut cur, mut next) = (g.scale.as_mut_ptr(), g.scale.as_mut_ptr().wrapping_add(nb));
    // The activation quants of block i of row b.
    // SAFETY: (callers below) i < nb and b < NA; the lines are 64-byte aligned.
    let y = |b: usize, i: usize| unsafe { _mm512_load_si512(yp.add(G * i + b).cast::<__m512i>()) };
    // The block product of widened weight quants q with block i of row b.
    let p = |q: __m512i, b: usize, i: usize| _mm512_cvtepi32_ps(_mm512_madd_epi16(q, y(b, i)));
    // SAFETY: row 0 holds nb blocks, the table and scratch nb entries (asserted above).
    let mut m = unsafe { row_scales::<K>(w.as_ptr(), nb, tp, cur) };
    for r in 0..rows {
        // SAFETY: r < rows.
        let wp = unsafe { w.as_ptr().add(r * row_bytes) };
        let has_next = r + 1 < rows;
        // Next row's scales of block i into `next`, returned; not called on the last row.
        // SAFETY: (callers below) i < nb, row r + 1 exists.
        let next_scales = |i: usize| unsafe { block_scales::<K>(wp.add(row_bytes + i * ts), tp.add(i), next.add(i)) };
        // The scale product of block i and row b (this row).
        // SAFETY: (callers below) i < nb and b < NA.
        let s = |b: usize, i: usize| unsafe { _mm512_set1_ps((*cur.add(i)).0[2 * b]) };
        let mut accm0 = _mm512_setzero_ps();
        let mut accm1 = _mm512_setzero_ps();
        let mut acc0 = [_mm512_setzero_ps(); NA];
        let mut acc1 = [_mm512_setzero_ps(); NA];
        let mut i = 0;
        while i + 1 < nb {
            prefetch_ahead(wp.wrapping_add(i * ts));
            if has_next {
                let (na, nb_) = (next_scales(i), next_scales(i + 1));
                if has_min(K) {
                    accm0 = _mm512_add_ps(accm0, na);
                    accm1 = _mm512_add_ps(accm1, nb_);
                }
            }
            // SAFETY: blocks i and i + 1 < nb of the weight row.
            let (qa, qb) = unsafe { (quants::<K>(wp.add(i * ts)), quants::<K>(wp.add((i + 1) * ts))) };
            for b in 0..NA {
                acc0[b] = _mm512_fmadd_ps(s(b, i), p(qa, b, i), acc0[b]);
                acc1[b] = _mm512_fmadd_ps(s(b, i + 1), p(qb, b, i + 1), acc1[b]);
            }
            i += 2;
        }
        if i < nb {
            if has_next {
                let na = next_scales(i);
                if has_min(K) {
                    accm0 = _mm512_add_ps(accm0, na);
                }
            }
            // SAFETY: block i < nb of the weight row.
            let qa = unsafe { quants::<K>(wp.add(i * ts)) };
            for (b, acc) in acc0.iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps(s(b, i), p(qa, b, i), *acc);
            }
        }
        let mut sums = [0.0f32; 2 * G];
        if NA == 8 {
            let a0: &[__m512; 8] = acc0[..].try_into().expect("NA == 8");
            let a1: &[__m512; 8] = acc1[..].try_into().expect("NA == 8");
            let mut v = reduce8(a0, a1);
            if has_min(K) {
                // Lane 2b + 1 of m to lane reduced_lane(b): `sum += m` as in `row`.
                let idx = _mm512_setr_epi32(1, 9, 1, 9, 3, 11, 3, 11, 5, 13, 5, 13, 7, 15, 7, 15);
                v = _mm512_add_ps(v, _mm512_permutexvar_ps(idx, m));
            }
            // SAFETY: `sums` holds 16 f32s; storeu has no alignment needs.
            unsafe { _mm512_storeu_ps(sums.as_mut_ptr(), v) };
            for b in 0..NA {
                out[b * out_stride + r] = sums[reduced_lane(b)];
            }
        } else {
            // SAFETY: `sums` holds 16 f32s; storeu has no alignment needs.
            unsafe { _mm512_storeu_ps(sums.as_mut_ptr(), m) };
            for b in 0..NA {
                let mut sum = reduce(acc0[b], acc1[b]);
                if has_min(K) {
                    sum += sums[2 * b + 1];
                }
                out[b * out_stride + r] = sum;
            }
        }
        m = _mm512_add_ps(accm0, accm1);
        core::mem::swap(&mut cur, &mut next);
    }
}

#[target_feature(enable = "avx512f,avx512bw,gfni,avx2,fma,f16c")]
unsafe fn gemm_k<const K: u8>(w: &[u8], row_bytes: usize, x: &[BlockQ16], nb: usize, n: usize, out: &mut [f32], out_stride: usize) {
    let mut b0 = 0;
    while b0 < n {
        let na = match n - b0 {
            r if r >= 8 => 8,
            r if r >= 4 => 4,
            r if r >= 2 => 2,
            _ => 1,
        };
        let xg = &x[b0 * nb..(b0 + na) * nb];
        let og = &mut out[b0 * out_stride..];
        if na == 1 {
            for (o, wr) in og.iter_mut().zip(w.chunks_exact(row_bytes)) {
                // SAFETY: same CPU-feature requirement as this function.
                *o = unsafe { row::<K>(wr, xg) };
            }
        } else {
            Group::with(|g| {
                g.fill(xg, nb, na);
                // SAFETY: same CPU-feature requirement as this function; every weight row holds
                // nb blocks and the group is filled with na rows of nb blocks.
                unsafe {
                    match na {
                        8 => gemm_group::<K, 8>(w, row_bytes, g, nb, og, out_stride),
                        4 => gemm_group::<K, 4>(w, row_bytes, g, nb, og, out_stride),
                        _ => gemm_group::<K, 2>(w, row_bytes, g, nb, og, out_stride),
                    }
                }
            });
        }
        b0 += na;
    }
}

/// `gemm_q16` for the supported types (`row_bytes >= nb * type_size`, `x.len() >= n * nb`,
/// `out` long enough for every (b, r)); leaves `out` untouched for the others. Bit-identical to
/// [`vec_dot`] per (row, activation row).
///
/// # Safety
/// The CPU must support avx512f, avx512bw, gfni, avx2, fma and f16c.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,gfni,avx2,fma,f16c")]
pub(super) unsafe fn gemm(
    t: GgmlType,
    w: &[u8],
    row_bytes: usize,
    x: &[BlockQ16],
    nb: usize,
    n: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    // SAFETY: (all arms) same CPU-feature requirement as this function.
    unsafe {
        match t {
            GgmlType::Q4_0 => gemm_k::<Q4_0>(w, row_bytes, x, nb, n, out, out_stride),
            GgmlType::Q4_1 => gemm_k::<Q4_1>(w, row_bytes, x, nb, n, out, out_stride),
            GgmlType::Q5_0 => gemm_k::<Q5_0>(w, row_bytes, x, nb, n, out, out_stride),
            GgmlType::Q5_1 => gemm_k::<Q5_1>(w, row_bytes, x, nb, n, out, out_stride),
            GgmlType::Q8_0 => gemm_k::<Q8_0>(w, row_bytes, x, nb, n, out, out_stride),
            _ => {}
        }
    }
}
