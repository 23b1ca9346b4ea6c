//! AVX2 + FMA + F16C kernels (x86_64), in the style of llama.cpp's `ggml_vec_dot_q4_1_q8_1`.
//!
//! Every function here is `unsafe` only because it must run on a CPU with avx2, fma and f16c
//! (the callers in `quant.rs` check `is_x86_feature_detected!` first); given that, they are
//! sound for any slice lengths: they only read whole blocks that lie inside their slices.
//!
//! Quantized dot product: for each weight block the 32 products `q_w * q_x` are summed with
//! `maddubs` (u8 x i8 -> i16 pairs) and `madd` (-> 8 x i32), converted to 8 f32 lanes and
//! accumulated with one FMA by `d_w * d_x`. Two blocks per iteration go to two accumulators; the
//! `m_w * s_x` terms of Q4_1 / Q5_1 are accumulated in two more (lane 1 of an `__m128`). The
//! final reduction order is fixed, so a row always gives the same bits.
//!
//! Measured on an AMD EPYC (Zen 4) VM, 576-element rows: Q4_1 ~14 ns, Q4_0 ~16 ns, Q8_0 ~14 ns,
//! Q5_1 ~20 ns, Q5_0 ~24 ns (`bench_vec_dot_q4_1_576`). AVX-VNNI (`vpdpbusd` for
//! `maddubs` + `madd`) measured only ~5% faster there, so it is not used.

use core::arch::x86_64::*;
use core::ptr::{addr_of, read_unaligned};

use super::{BlockQ8, GgmlType, QK8};

pub(super) const Q4_0: u8 = 0;
pub(super) const Q4_1: u8 = 1;
pub(super) const Q5_0: u8 = 2;
pub(super) const Q5_1: u8 = 3;
pub(super) const Q8_0: u8 = 4;

/// A block of quantized activations that the row kernels below can multiply with weight blocks
/// ([`BlockQ8`] here, `BlockQ16` in `avx2_q16.rs`).
///
/// # Safety
/// Implementors must be `#[repr(C)]` with `d: f32` at offset 0 and `s: f32` at offset 4:
/// [`scales`] reads them through casts of the block pointer.
pub(super) unsafe trait ActBlock: Sized {
    /// The integer products of one weight block of kernel type `K` and one activation block,
    /// summed in 8 i32 lanes converted to f32; the conversion must be exact.
    ///
    /// # Safety
    /// `w` must point at `type_size(K)` readable bytes and `x` at a valid block; the CPU must
    /// support avx2, fma and f16c.
    unsafe fn block<const K: u8>(w: *const u8, x: *const Self) -> __m256;
}

/// Bytes per block of kernel type `K`.
pub(super) const fn type_size(k: u8) -> usize {
    match k {
        Q4_0 => 18,
        Q4_1 => 20,
        Q5_0 => 22,
        Q5_1 => 24,
        _ => 34,
    }
}

/// Whether kernel type `K` has a per-block minimum `m` (adds `m_w * s_x` per block).
pub(super) const fn has_min(k: u8) -> bool {
    matches!(k, Q4_1 | Q5_1)
}

/// Horizontal sum of 8 lanes: `((v0+v4)+(v2+v6)) + ((v1+v5)+(v3+v7))`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn hsum(v: __m256) -> f32 {
    let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)))
}

/// Sum of products of unsigned bytes `ax` (< 128) and signed bytes `sy` in 8 f32 lanes (lane k
/// holds bytes 4k..4k+4). Exact: the i16 pair sums cannot saturate for |ax| <= 128, |sy| <= 127.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn mul_sum_us8(ax: __m256i, sy: __m256i) -> __m256 {
    let dot = _mm256_maddubs_epi16(ax, sy);
    _mm256_cvtepi32_ps(_mm256_madd_epi16(dot, _mm256_set1_epi16(1)))
}

/// Like [`mul_sum_us8`] for two signed operands (moves the sign of `x` onto `y`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn mul_sum_i8(x: __m256i, y: __m256i) -> __m256 {
    mul_sum_us8(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
}

/// 16 bytes of packed nibbles -> 32 bytes: low nibbles (elements 0..16) then high ones.
///
/// # Safety
/// `p` must point at 16 readable bytes; the CPU must support avx2.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn nibbles(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 16 readable bytes at `p`; loadu has no alignment needs.
    let q = unsafe { _mm256_broadcastsi128_si256(_mm_loadu_si128(p.cast::<__m128i>())) };
    let both = _mm256_srlv_epi32(q, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

/// Bit `e` of `qh` -> byte `e` all ones (0xFF) or zero, for e in 0..32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn bytes_from_bits(qh: u32) -> __m256i {
    let shuf = _mm256_set_epi64x(0x0303_0303_0303_0303, 0x0202_0202_0202_0202, 0x0101_0101_0101_0101, 0);
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(qh as i32), shuf);
    let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe));
    _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
}

/// The scales of two blocks `a` and `b` (which may be the same block): lane 0 of each result is
/// `d_w * d_x`, lane 1 `m_w * s_x` for the types with a minimum.
///
/// For the symmetric types both f16 `d_w` go through one `vmovd` + `vcvtph2ps`: converting a
/// lone f16 makes LLVM load it with `vpinsrw` into a stale register (only lane 0 is demanded),
/// a false dependency on whatever that register held, often the previous FMA's accumulator.
///
/// # Safety
/// `wa` / `wb` must point at `type_size(K)` readable bytes and `xa` / `xb` at valid blocks; the
/// CPU must support avx2, fma and f16c.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn scales<const K: u8, B: ActBlock>(wa: *const u8, xa: *const B, wb: *const u8, xb: *const B) -> (__m128, __m128) {
    // SAFETY: unaligned reads of the first 2 or 4 bytes of each weight block (>= 18 bytes), and
    // an unaligned 8-byte read of `d, s` or an aligned f32 read of `d` (`ActBlock`s start with
    // `d: f32, s: f32`, so they are 4-aligned) of each activation block; all readable by the
    // caller's guarantee.
    unsafe {
        if has_min(K) {
            // [d_w, m_w] * [d_x, s_x]
            let one = |w: *const u8, x: *const B| {
                let wdm = _mm_cvtph_ps(_mm_cvtsi32_si128(read_unaligned(w.cast::<i32>())));
                let xds = _mm_castsi128_ps(_mm_loadl_epi64(x.cast::<__m128i>()));
                _mm_mul_ps(wdm, xds)
            };
            (one(wa, xa), one(wb, xb))
        } else {
            let da = u32::from(read_unaligned(wa.cast::<u16>()));
            let db = u32::from(read_unaligned(wb.cast::<u16>()));
            let wd = _mm_cvtph_ps(_mm_cvtsi32_si128((da | (db << 16)) as i32));
            let xd = _mm_unpacklo_ps(_mm_load_ss(xa.cast::<f32>()), _mm_load_ss(xb.cast::<f32>()));
            let p = _mm_mul_ps(wd, xd);
            (p, _mm_movehdup_ps(p))
        }
    }
}

// SAFETY: `BlockQ8` is `#[repr(C)]` and starts with `d: f32, s: f32`.
unsafe impl ActBlock for BlockQ8 {
    /// Lane k: elements 4k..4k+4 of the 32-byte vectors below.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block<const K: u8>(w: *const u8, x: *const BlockQ8) -> __m256 {
        // SAFETY: every read below is an unaligned read inside the `type_size(K)` bytes at `w`
        // or the BlockQ8 at `x`, which the caller guarantees are readable.
        unsafe {
            let y = _mm256_loadu_si256(addr_of!((*x).qs).cast::<__m256i>());
            match K {
                Q4_0 => {
                    // sum((q - 8) * y) = sum(q * y) - sum(8 * y), per i16 pair (|.| <= 3810 + 2032)
                    let qy = _mm256_maddubs_epi16(nibbles(w.add(2)), y);
                    let ey = _mm256_maddubs_epi16(_mm256_set1_epi8(8), y);
                    let dot = _mm256_sub_epi16(qy, ey);
                    _mm256_cvtepi32_ps(_mm256_madd_epi16(dot, _mm256_set1_epi16(1)))
                }
                Q4_1 => mul_sum_us8(nibbles(w.add(4)), y),
                Q5_0 => {
                    // q - 16 as i8: nibble | (high bit ? 0x00 : 0xF0)
                    let hi = bytes_from_bits(read_unaligned(w.add(2).cast::<u32>()));
                    let hi = _mm256_andnot_si256(hi, _mm256_set1_epi8(0xF0u8 as i8));
                    mul_sum_i8(_mm256_or_si256(nibbles(w.add(6)), hi), y)
                }
                Q5_1 => {
                    let hi = bytes_from_bits(read_unaligned(w.add(4).cast::<u32>()));
                    let hi = _mm256_and_si256(hi, _mm256_set1_epi8(0x10));
                    mul_sum_us8(_mm256_or_si256(nibbles(w.add(8)), hi), y)
                }
                _ => mul_sum_i8(_mm256_loadu_si256(w.add(2).cast::<__m256i>()), y),
            }
        }
    }
}

/// Dot product of one weight row of kernel type `K` with `x`, over the whole blocks both hold.
///
/// Blocks 2j go to `acc0`, blocks 2j+1 to `acc1` (`accm0` / `accm1` for `m_w * s_x`); the
/// result is `hsum(acc0 + acc1) + (accm0 + accm1)[1]`.
///
/// # Safety
/// The CPU must support avx2, fma and f16c.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn row<const K: u8, B: ActBlock>(w: &[u8], x: &[B]) -> f32 {
    let ts = type_size(K);
    let nb = x.len().min(w.len() / ts);
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let mut accm0 = _mm_setzero_ps();
    let mut accm1 = _mm_setzero_ps();
    let mut i = 0;
    while i + 1 < nb {
        prefetch_ahead(wp.wrapping_add(i * ts));
        // SAFETY: i + 1 < nb, so blocks i and i + 1 lie inside `w` (nb * ts <= w.len()) and `x`;
        // the CPU features are the caller's guarantee.
        let (sa, sb, pa, pb) = unsafe {
            let (wa, wb, xa, xb) = (wp.add(i * ts), wp.add((i + 1) * ts), xp.add(i), xp.add(i + 1));
            let (sa, sb) = scales::<K, B>(wa, xa, wb, xb);
            (sa, sb, B::block::<K>(wa, xa), B::block::<K>(wb, xb))
        };
        acc0 = _mm256_fmadd_ps(_mm256_broadcastss_ps(sa), pa, acc0);
        acc1 = _mm256_fmadd_ps(_mm256_broadcastss_ps(sb), pb, acc1);
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
            (scales::<K, B>(wa, xa, wa, xa).0, B::block::<K>(wa, xa))
        };
        acc0 = _mm256_fmadd_ps(_mm256_broadcastss_ps(sa), pa, acc0);
        if has_min(K) {
            accm0 = _mm_add_ps(accm0, sa);
        }
    }
    let mut sum = hsum(_mm256_add_ps(acc0, acc1));
    if has_min(K) {
        let m = _mm_add_ps(accm0, accm1);
        sum += _mm_cvtss_f32(_mm_movehdup_ps(m));
    }
    sum
}

/// How far ahead of the block being multiplied the weight-row kernels ask for the weights: a decode step streams
/// every weight once from memory, and the hardware prefetcher alone left a 2-core Xeon VM at 41 % of its bandwidth
/// (single-stream decode 89 -> 148-161 tok/s with this; 2, 3, 4 and 8 KiB measured alike).
pub(super) const PREFETCH_BYTES: usize = 4096;

/// Asks for the cache line [`PREFETCH_BYTES`] past `p` (no fault if that is past the weights: a prefetch never
/// faults, and the pointer is never read).
#[inline(always)]
pub(super) fn prefetch_ahead(p: *const u8) {
    // SAFETY: SSE is part of the x86_64 baseline; a prefetch reads nothing the program can see.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_BYTES).cast::<i8>()) };
}

/// `vec_dot_q8` / `vec_dot_q16` for the supported types; 0.0 for the others.
///
/// # Safety
/// The CPU must support avx2, fma and f16c.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn vec_dot<B: ActBlock>(t: GgmlType, w: &[u8], x: &[B]) -> f32 {
    // SAFETY: (all arms) same CPU-feature requirement as this function.
    unsafe {
        match t {
            GgmlType::Q4_0 => row::<Q4_0, B>(w, x),
            GgmlType::Q4_1 => row::<Q4_1, B>(w, x),
            GgmlType::Q5_0 => row::<Q5_0, B>(w, x),
            GgmlType::Q5_1 => row::<Q5_1, B>(w, x),
            GgmlType::Q8_0 => row::<Q8_0, B>(w, x),
            _ => 0.0,
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv_k<const K: u8, B: ActBlock>(w: &[u8], row_bytes: usize, x: &[B], out: &mut [f32]) {
    for (o, r) in out.iter_mut().zip(w.chunks_exact(row_bytes)) {
        // SAFETY: same CPU-feature requirement as this function.
        *o = unsafe { row::<K, B>(r, x) };
    }
}

/// `gemv_q8` / `gemv_q16` for the supported types (`row_bytes > 0`); leaves `out` untouched
/// for the others.
///
/// # Safety
/// The CPU must support avx2, fma and f16c.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn gemv<B: ActBlock>(t: GgmlType, w: &[u8], row_bytes: usize, x: &[B], out: &mut [f32]) {
    // SAFETY: (all arms) same CPU-feature requirement as this function.
    unsafe {
        match t {
            GgmlType::Q4_0 => gemv_k::<Q4_0, B>(w, row_bytes, x, out),
            GgmlType::Q4_1 => gemv_k::<Q4_1, B>(w, row_bytes, x, out),
            GgmlType::Q5_0 => gemv_k::<Q5_0, B>(w, row_bytes, x, out),
            GgmlType::Q5_1 => gemv_k::<Q5_1, B>(w, row_bytes, x, out),
            GgmlType::Q8_0 => gemv_k::<Q8_0, B>(w, row_bytes, x, out),
            _ => {}
        }
    }
}

/// `quantize_row_q8`, bit-identical to the scalar version.
///
/// # Safety
/// The CPU must support avx2, fma and f16c.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_row_q8(x: &[f32], out: &mut [BlockQ8]) {
    let sign = _mm256_set1_ps(-0.0);
    // The largest f32 below 0.5: trunc(v + copysign(0.49999997, v)) == round(v) (half away from
    // zero) for every f32 |v| < 2^31; it is how LLVM lowers `f32::round` on SSE4.1.
    let half = _mm256_set1_ps(0.49999997);
    for (xb, yb) in x.chunks_exact(QK8).zip(out.iter_mut()) {
        let p = xb.as_ptr();
        // SAFETY: `xb` holds 32 f32s, so the four unaligned 8-lane loads are in bounds.
        let v = unsafe { [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))] };
        // amax: max is exact, so the order does not matter.
        let m01 = _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1]));
        let m23 = _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3]));
        let m8 = _mm256_max_ps(m01, m23);
        let m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps::<1>(m8));
        let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
        let d = amax / 127.0;
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
        // Pack 32 x i32 -> 32 x i8 (values are in -127..=127) and undo the lane interleave.
        let p01 = _mm256_packs_epi32(q[0], q[1]);
        let p23 = _mm256_packs_epi32(q[2], q[3]);
        let packed = _mm256_packs_epi16(p01, p23);
        let packed = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        // SAFETY: `yb.qs` is 32 bytes; storeu has no alignment needs.
        unsafe { _mm256_storeu_si256(yb.qs.as_mut_ptr().cast::<__m256i>(), packed) };
        yb.d = d;
        yb.s = d * sum as f32;
    }
}

/// `dot_f32` with FMA: 4 x 8-lane accumulators over chunks of 32, then chunks of 8 into the
/// first one, `(acc0 + acc1) + (acc2 + acc3)`, [`hsum`], then the tail one product at a time.
///
/// # Safety
/// The CPU must support avx2, fma and f16c.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (k, acc) in acc.iter_mut().enumerate() {
            // SAFETY: i + 8k + 8 <= i + 32 <= n, in bounds of both slices.
            let (x, y) = unsafe { (_mm256_loadu_ps(pa.add(i + 8 * k)), _mm256_loadu_ps(pb.add(i + 8 * k))) };
            *acc = _mm256_fmadd_ps(x, y, *acc);
        }
        i += 32;
    }
    while i + 8 <= n {
        // SAFETY: i + 8 <= n, in bounds of both slices.
        let (x, y) = unsafe { (_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i))) };
        acc[0] = _mm256_fmadd_ps(x, y, acc[0]);
        i += 8;
    }
    let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut sum = hsum(v);
    for (x, y) in a[i..n].iter().zip(&b[i..n]) {
        sum += x * y;
    }
    sum
}
