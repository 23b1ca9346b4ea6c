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
    // SAFETY: every read below is an unaligned read inside the `type_size(K)` bytes at `w` or
    // the BlockQ16 at `x` (`qs` is 64 bytes), which the caller guarantees are readable.
    unsafe {
        let y = _mm512_loadu_si512(addr_of!((*x).qs).cast::<__m512i>());
        let q = match K {
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
        };
        _mm512_cvtepi32_ps(_mm512_madd_epi16(q, y))
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
