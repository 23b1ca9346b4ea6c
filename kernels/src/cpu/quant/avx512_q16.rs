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
//! Every function is `unsafe` only because it needs a CPU with avx512f, avx512bw, gfni, avx2,
//! fma and f16c, and reads only whole blocks inside its slices.

use core::arch::x86_64::*;
use core::ptr::{addr_of, read_unaligned};

use super::avx2::{Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, has_min, hsum, scales, type_size};
use super::avx2_q16::{G, fill_table, lanes, row_scales, scratch_len};
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
        // SAFETY: i + 1 < nb, so blocks i and i + 1 lie inside `w` (nb * ts <= w.len()) and `x`;
        // the CPU features are the caller's guarantee.
        let (sa, sb, pa, pb) = unsafe {
            let (wa, wb, xa, xb) = (
                wp.add(i * ts),
                wp.add((i + 1) * ts),
                xp.add(i),
                xp.add(i + 1),
            );
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
    let v = _mm256_add_ps(
        _mm512_castps512_ps256(v),
        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))),
    );
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
    // SAFETY (all arms): same CPU-feature requirement as this function.
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
pub(super) unsafe fn gemv(
    t: GgmlType,
    w: &[u8],
    row_bytes: usize,
    x: &[BlockQ16],
    out: &mut [f32],
) {
    // SAFETY (all arms): same CPU-feature requirement as this function.
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
    let v = _mm256_add_ps(
        _mm512_castps512_ps256(v),
        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))),
    );
    hsum(v)
}

/// `out[b * out_stride + r] = row::<K>(row r of w, activation row b)` for the `NA` activation
/// rows of `x` (`nb` blocks each) and every row of `w`, with the same operations per (row,
/// activation row) as [`row`]: each weight block is widened once and multiplied with the `NA`
/// activation blocks into `2 * NA` independent accumulators; the scale products and the minimum
/// terms come from `avx2_q16::row_scales`.
///
/// # Safety
/// `x.len() >= NA * nb`, `row_bytes >= nb * type_size(K)`, `table` filled by `fill_table` for
/// these rows, `scale.len() >= G * nb`, `out` long enough for every (b, r) (checked); the CPU
/// must support avx512f, avx512bw, gfni, avx2, fma and f16c.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,gfni,avx2,fma,f16c")]
unsafe fn gemm_group<const K: u8, const NA: usize>(
    w: &[u8],
    row_bytes: usize,
    x: &[BlockQ16],
    nb: usize,
    table: &[f32],
    scale: &mut [f32],
    out: &mut [f32],
    out_stride: usize,
) {
    let ts = type_size(K);
    debug_assert!(x.len() >= NA * nb && row_bytes >= nb * ts);
    debug_assert!(table.len() >= 2 * G * nb && scale.len() >= G * nb);
    let xp = x.as_ptr();
    // Activation block i of row b and the scale product of (block i, row b).
    // SAFETY (callers below): i < nb and b < NA.
    let y = |b: usize, i: usize| unsafe {
        _mm512_loadu_si512(addr_of!((*xp.add(b * nb + i)).qs).cast::<__m512i>())
    };
    for (r, wr) in w.chunks_exact(row_bytes).enumerate() {
        let wp = wr.as_ptr();
        // SAFETY: the row holds nb blocks, the table and scratch are long enough (see above).
        let (accm0, accm1) = unsafe { row_scales::<K>(wp, nb, table.as_ptr(), scale.as_mut_ptr()) };
        let sp = scale.as_ptr();
        let mut acc0 = [_mm512_setzero_ps(); NA];
        let mut acc1 = [_mm512_setzero_ps(); NA];
        let mut i = 0;
        while i + 1 < nb {
            // SAFETY: blocks i and i + 1 < nb of the weight row and of each activation row, and
            // scale entries below G * nb.
            unsafe {
                let qa = quants::<K>(wp.add(i * ts));
                let qb = quants::<K>(wp.add((i + 1) * ts));
                for b in 0..NA {
                    let pa = _mm512_cvtepi32_ps(_mm512_madd_epi16(qa, y(b, i)));
                    let sa = _mm512_set1_ps(*sp.add(G * i + b));
                    acc0[b] = _mm512_fmadd_ps(sa, pa, acc0[b]);
                    let pb = _mm512_cvtepi32_ps(_mm512_madd_epi16(qb, y(b, i + 1)));
                    let sb = _mm512_set1_ps(*sp.add(G * (i + 1) + b));
                    acc1[b] = _mm512_fmadd_ps(sb, pb, acc1[b]);
                }
            }
            i += 2;
        }
        if i < nb {
            // SAFETY: as above for block i < nb.
            unsafe {
                let qa = quants::<K>(wp.add(i * ts));
                for b in 0..NA {
                    let pa = _mm512_cvtepi32_ps(_mm512_madd_epi16(qa, y(b, i)));
                    let sa = _mm512_set1_ps(*sp.add(G * i + b));
                    acc0[b] = _mm512_fmadd_ps(sa, pa, acc0[b]);
                }
            }
        }
        let m = lanes(_mm256_add_ps(accm0, accm1));
        for b in 0..NA {
            let mut sum = reduce(acc0[b], acc1[b]);
            if has_min(K) {
                sum += m[b];
            }
            out[b * out_stride + r] = sum;
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,gfni,avx2,fma,f16c")]
unsafe fn gemm_k<const K: u8>(
    w: &[u8],
    row_bytes: usize,
    x: &[BlockQ16],
    nb: usize,
    n: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let mut scratch = vec![0.0f32; scratch_len(nb)];
    let (table, scale) = scratch.split_at_mut(2 * G * nb);
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
        // SAFETY (all calls): same CPU-feature requirement as this function; xg holds na rows
        // of nb blocks, every weight row nb blocks, and the table is filled for xg.
        unsafe {
            if na == 1 {
                for (o, wr) in og.iter_mut().zip(w.chunks_exact(row_bytes)) {
                    *o = row::<K>(wr, xg);
                }
            } else {
                fill_table(xg, nb, na, table);
                match na {
                    8 => gemm_group::<K, 8>(w, row_bytes, xg, nb, table, scale, og, out_stride),
                    4 => gemm_group::<K, 4>(w, row_bytes, xg, nb, table, scale, og, out_stride),
                    _ => gemm_group::<K, 2>(w, row_bytes, xg, nb, table, scale, og, out_stride),
                }
            }
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
    // SAFETY (all arms): same CPU-feature requirement as this function.
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
