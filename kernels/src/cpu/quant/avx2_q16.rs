//! AVX2 + FMA + F16C kernels for int16 activations ([`BlockQ16`]), x86_64.
//!
//! The row loop, scales and final reduction are those of `avx2.rs` (its `row` is generic over
//! the activation block); only the per-block integer product differs: the weight quants are
//! widened to i16 (`vpmovzxbw` / `vpmovsxbw`) and multiplied with the 32 i16 activations by two
//! `_mm256_madd_epi16` (16 products each, adjacent pairs summed into i32), whose sums are added
//! into 8 i32 lanes. Each lane sums 4 products of `|q_w| <= 128` and `|q_x| <= 32767`, at most
//! 16_776_704 < 2^24 in magnitude, so the conversion to f32 is exact.
//!
//! The nibble types widen with an in-lane `vpshufb` of the broadcast bytes (LLVM turned the
//! `vpmovzxbw` version into narrower but more instructions: Q4_1 17.2 -> 15.3 ns per 576-element
//! row); Q5_0 / Q5_1 merge the high bits in the byte domain (as `avx2.rs` does) before widening
//! (26 instead of 28-30 ns). Where AVX-512 + GFNI is available `avx512_q16.rs` is used instead.
//!
//! Same safety contract as `avx2.rs`: every function is `unsafe` only because it needs a CPU
//! with avx2, fma and f16c, and reads only whole blocks inside its slices.

use core::arch::x86_64::*;
use core::ptr::{addr_of, read_unaligned};

use super::avx2::{ActBlock, Q4_0, Q4_1, Q5_0, Q5_1, bytes_from_bits, nibbles};
use super::{BlockQ16, QK16};

/// 16 bytes of packed nibbles -> (elements 0..16, elements 16..32) as unsigned i16.
///
/// The bytes are widened to i16 by an in-lane `vpshufb` of the 128-bit broadcast (cheaper than
/// the lane-crossing `vpmovzxbw`).
///
/// # Safety
/// `p` must point at 16 readable bytes; the CPU must support avx2.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles16(p: *const u8) -> (__m256i, __m256i) {
    // SAFETY: the caller guarantees 16 readable bytes at `p`; loadu has no alignment needs.
    let q = unsafe { _mm256_broadcastsi128_si256(_mm_loadu_si128(p.cast::<__m128i>())) };
    let widen = _mm256_setr_epi8(
        0, -1, 1, -1, 2, -1, 3, -1, 4, -1, 5, -1, 6, -1, 7, -1, //
        8, -1, 9, -1, 10, -1, 11, -1, 12, -1, 13, -1, 14, -1, 15, -1,
    );
    let q = _mm256_shuffle_epi8(q, widen);
    let lo = _mm256_and_si256(q, _mm256_set1_epi16(0x0F));
    (lo, _mm256_srli_epi16::<4>(q))
}

// SAFETY: `BlockQ16` is `#[repr(C)]` and starts with `d: f32, s: f32`.
unsafe impl ActBlock for BlockQ16 {
    /// Lane k: elements 2k, 2k+1, 2k+16, 2k+17.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block<const K: u8>(w: *const u8, x: *const BlockQ16) -> __m256 {
        // SAFETY: every read below is an unaligned read inside the `type_size(K)` bytes at `w`
        // or the BlockQ16 at `x` (`qs` is 64 bytes), which the caller guarantees are readable.
        unsafe {
            let xp = addr_of!((*x).qs).cast::<__m256i>();
            let (x0, x1) = (_mm256_loadu_si256(xp), _mm256_loadu_si256(xp.add(1)));
            let (w0, w1) = match K {
                Q4_0 => {
                    let (lo, hi) = nibbles16(w.add(2));
                    let eight = _mm256_set1_epi16(8);
                    (_mm256_sub_epi16(lo, eight), _mm256_sub_epi16(hi, eight))
                }
                Q4_1 => nibbles16(w.add(4)),
                Q5_0 => {
                    // q - 16 as i8: nibble | (high bit ? 0x00 : 0xF0), then sign-extended.
                    let hi = bytes_from_bits(read_unaligned(w.add(2).cast::<u32>()));
                    let hi = _mm256_andnot_si256(hi, _mm256_set1_epi8(0xF0u8 as i8));
                    let q = _mm256_or_si256(nibbles(w.add(6)), hi);
                    (
                        _mm256_cvtepi8_epi16(_mm256_castsi256_si128(q)),
                        _mm256_cvtepi8_epi16(_mm256_extracti128_si256::<1>(q)),
                    )
                }
                Q5_1 => {
                    let hi = bytes_from_bits(read_unaligned(w.add(4).cast::<u32>()));
                    let hi = _mm256_and_si256(hi, _mm256_set1_epi8(0x10));
                    let q = _mm256_or_si256(nibbles(w.add(8)), hi);
                    (
                        _mm256_cvtepu8_epi16(_mm256_castsi256_si128(q)),
                        _mm256_cvtepu8_epi16(_mm256_extracti128_si256::<1>(q)),
                    )
                }
                _ => (
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(w.add(2).cast::<__m128i>())),
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(w.add(18).cast::<__m128i>())),
                ),
            };
            let dot = _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));
            _mm256_cvtepi32_ps(dot)
        }
    }
}

/// `quantize_row_q16`, bit-identical to the scalar version (same algorithm as
/// `avx2::quantize_row_q8` with 32767 levels and an i32 -> i16 pack).
///
/// # Safety
/// The CPU must support avx2, fma and f16c.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_row_q16(x: &[f32], out: &mut [BlockQ16]) {
    let sign = _mm256_set1_ps(-0.0);
    // The largest f32 below 0.5: trunc(v + copysign(0.49999997, v)) == round(v) (half away from
    // zero) for every f32 |v| < 2^31, as in `avx2::quantize_row_q8`.
    let half = _mm256_set1_ps(0.49999997);
    for (xb, yb) in x.chunks_exact(QK16).zip(out.iter_mut()) {
        let p = xb.as_ptr();
        // SAFETY: `xb` holds 32 f32s, so the four unaligned 8-lane loads are in bounds.
        let v = unsafe {
            [
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            ]
        };
        // amax: max is exact, so the order does not matter.
        let m01 = _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1]));
        let m23 = _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3]));
        let m8 = _mm256_max_ps(m01, m23);
        let m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps::<1>(m8));
        let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
        let d = amax / 32767.0;
        let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
        let mut q = [_mm256_setzero_si256(); 4];
        for (q, &v) in q.iter_mut().zip(&v) {
            let v = _mm256_mul_ps(v, id);
            let bias = _mm256_or_ps(_mm256_and_ps(v, sign), half);
            *q = _mm256_cvttps_epi32(_mm256_add_ps(v, bias));
        }
        let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
        let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32::<1>(s2)));
        // Pack 32 x i32 -> 32 x i16 (values are in -32767..=32767) and undo the lane interleave:
        // packs gives [a0..4, b0..4 | a4..8, b4..8] per pair of inputs.
        let p01 = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(q[0], q[1]));
        let p23 = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(q[2], q[3]));
        let qp = yb.qs.as_mut_ptr().cast::<__m256i>();
        // SAFETY: `yb.qs` is 64 bytes; storeu has no alignment needs.
        unsafe {
            _mm256_storeu_si256(qp, p01);
            _mm256_storeu_si256(qp.add(1), p23);
        }
        yb.d = d;
        // |sum| <= 32 * 32767 < 2^24: exact in f32.
        yb.s = d * sum as f32;
    }
}
