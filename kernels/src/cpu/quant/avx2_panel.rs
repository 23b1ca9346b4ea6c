//! AVX2 (+ AVX-VNNI) kernels over weight panels (`panel.rs`): one ymm register holds two elements of eight rows, so
//! each block's products are summed in i32 lanes that each belong to one row, and the per-block scale work (convert,
//! multiply, FMA) is done once for eight rows instead of once per row.
//!
//! Per 16 quant bytes of a panel block: one `vpmovzxbw` / `vpmovsxbw` (+ mask and shift for nibbles) widens them for
//! up to [`NA_MAX`] activation rows, then one `vpmaddwd` + `vpaddd` (or one `vpdpwssd`) per activation row and
//! element pair, against the broadcast activation pair. Against the row-major kernel (`avx2_q16.rs`: two
//! `vpmaddwd`, an add, a convert and an FMA per block and row) this is two integer instructions per 32 products
//! (one with AVX-VNNI) plus a convert, a multiply and an FMA per eight rows.
//!
//! Same safety contract as `avx2.rs`: every function is `unsafe` only because it needs a CPU with avx2, fma and f16c
//! (and avxvnni for the VNNI kernel), and reads only whole panel blocks inside its slices.

use core::arch::x86_64::*;
use core::ptr::{addr_of, read_unaligned};

use super::avx2::{Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, prefetch_ahead, type_size};

/// Kernel type of Q4_K panels: Q4_1-like 32-element sub-blocks with f32 scale and minimum.
const Q4K: u8 = 5;
/// Kernel type of Q6_K panels: Q8_0-like 32-element blocks of `q - 32` with an f32 scale per half.
const Q6K: u8 = 6;
use super::avx2_q16::nibbles16;
use super::panel::PANEL_ROWS;
use super::{BlockQ16, GgmlType};

/// Activation rows per widened weight vector (registers: `NA_MAX` i32 block sums and `NA_MAX` f32 accumulators).
const NA_MAX: usize = 4;

/// (panel block bytes, header bytes) of kernel type `K`'s panels: `panel::panel_layout`'s numbers as constants, so
/// every offset in the kernels is folded (read from the layout at run time, one-row products were 20-25 % slower).
/// The test below checks that the two agree.
const fn layout(k: u8) -> (usize, usize) {
    match k {
        Q4K => (PANEL_ROWS * 24, 8 * PANEL_ROWS),
        Q6K => (PANEL_ROWS * 40, 8 * PANEL_ROWS),
        Q5_0 => (PANEL_ROWS * type_size(k), 6 * PANEL_ROWS),
        Q5_1 => (PANEL_ROWS * type_size(k), 8 * PANEL_ROWS),
        Q4_1 => (PANEL_ROWS * type_size(k), 4 * PANEL_ROWS),
        _ => (PANEL_ROWS * type_size(k), 2 * PANEL_ROWS),
    }
}

/// `acc + vpmaddwd(w, x)`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_madd(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
    _mm256_add_epi32(acc, _mm256_madd_epi16(w, x))
}

/// [`dot_madd`] as one `vpdpwssd` (no saturation: each pair sum is below 2^24, so the integers are the same).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
fn dot_vnni(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
    _mm256_dpwssd_avx_epi32(acc, w, x)
}

/// Defines a panel kernel with its target features and block product (`dot_madd` or `dot_vnni`): one body, so the
/// AVX2 and AVX-VNNI kernels cannot drift apart.
macro_rules! panel_fn {
    ($name:ident, $features:literal, $dot:ident) => {
        /// `out[b * out_stride + 8p + k]` for every panel `p` of `packed` (`nb` blocks), row `k` of it and activation
        /// row `b < NA` of `x` (`NA` rows of `nb` blocks), with the numerics of `panel.rs`.
        ///
        /// # Safety
        /// `packed` must be whole panels of `nb` blocks of kernel type `K`, `x` hold `NA * nb` blocks and `out` every
        /// (b, r); the CPU must support the target features.
        #[target_feature(enable = $features)]
        unsafe fn $name<const K: u8, const NA: usize, const C: usize>(
            packed: &[u8],
            nb: usize,
            x: &[BlockQ16],
            out: &mut [f32],
            out_stride: usize,
        ) {
            let (pbb, hdr) = layout(K);
            // Byte pairs of quants per block: one element pair (bytes) or two (nibbles) per pair.
            let pairs = if K == Q8_0 || K == Q6K { 16 } else { 8 };
            assert!(NA <= NA_MAX && x.len() >= NA * nb && nb > 0);
            let xp = x.as_ptr();
            let eight = _mm256_set1_epi16(8);
            let (sixteen, fifth, bit0) = (_mm256_set1_epi16(16), _mm256_set1_epi16(0x10), _mm256_set1_epi16(1));
            for (p, panel) in packed.chunks_exact(nb * pbb).enumerate() {
                let o = p * PANEL_ROWS;
                assert!((NA - 1) * out_stride + o + PANEL_ROWS <= out.len());
                let pp = panel.as_ptr();
                let mut acc = [_mm256_setzero_ps(); NA];
                for i in 0..nb {
                    // SAFETY: block i < nb of this panel (pbb bytes at bp) and block i of each activation row b < NA
                    // (asserted above); every load is unaligned or a broadcast of an aligned i32 pair of `qs`.
                    unsafe {
                        let bp = pp.add(i * pbb);
                        let mut l = 0;
                        while l < pbb {
                            prefetch_ahead(bp.wrapping_add(l));
                            l += 64;
                        }
                        let qp = bp.add(hdr);
                        let xq = |b: usize| addr_of!((*xp.add(b * nb + i)).qs).cast::<i16>();
                        // The pair of activation quants at element e of row b, in every i32 lane.
                        let pair = |b: usize, e: usize| _mm256_set1_epi32(read_unaligned(xq(b).add(e).cast::<i32>()));
                        // Q5: the eight rows' spread fifth bits (`panel::spread_qh`), shifted right once per byte pair,
                        // so bits 0 / 16 are that pair's bits of elements 2j / 2j + 1 and bits 8 / 24 those of
                        // 2j + 16 / 2j + 17.
                        let mut qt = if K == Q5_0 || K == Q5_1 {
                            _mm256_loadu_si256(bp.add(hdr - 32).cast::<__m256i>())
                        } else {
                            _mm256_setzero_si256()
                        };
                        // Q6_K blocks have a scale per half (16 elements): its halves are summed and scaled apart.
                        let halves = if K == Q6K { 2 } else { 1 };
                        for h in 0..halves {
                            // C independent integer chains per activation row (a `vpdpwssd` chain waits 4-5 cycles per
                            // step), summed at the end: integer sums, so the order changes nothing.
                            let mut chains = [[_mm256_setzero_si256(); NA]; C];
                            for j in h * pairs / halves..(h + 1) * pairs / halves {
                                if K == Q8_0 || K == Q6K {
                                    let w = _mm256_cvtepi8_epi16(_mm_loadu_si128(qp.add(16 * j).cast::<__m128i>()));
                                    for (b, s) in chains[j % C].iter_mut().enumerate() {
                                        *s = $dot(*s, w, pair(b, 2 * j));
                                    }
                                } else {
                                    // Widened by an in-lane `vpshufb` of the broadcast bytes: LLVM turns `vpmovzxbw`
                                    // here into two narrower ones plus more masking (5 instructions instead of 3).
                                    let (mut lo, mut hi) = nibbles16(qp.add(16 * j));
                                    if K == Q4_0 {
                                        lo = _mm256_sub_epi16(lo, eight);
                                        hi = _mm256_sub_epi16(hi, eight);
                                    }
                                    if K == Q5_0 || K == Q5_1 {
                                        // Bit 0 / 8 of each i16 lane to bit 4 (the value 16).
                                        lo = _mm256_or_si256(lo, _mm256_slli_epi16::<4>(_mm256_and_si256(qt, bit0)));
                                        hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_srli_epi16::<4>(qt), fifth));
                                        qt = _mm256_srli_epi32::<1>(qt);
                                    }
                                    if K == Q5_0 {
                                        lo = _mm256_sub_epi16(lo, sixteen);
                                        hi = _mm256_sub_epi16(hi, sixteen);
                                    }
                                    for (b, s) in chains[(2 * j) % C].iter_mut().enumerate() {
                                        *s = $dot(*s, lo, pair(b, 2 * j));
                                    }
                                    for (b, s) in chains[(2 * j + 1) % C].iter_mut().enumerate() {
                                        *s = $dot(*s, hi, pair(b, 2 * j + 16));
                                    }
                                }
                            }
                            let mut isum = chains[0];
                            for c in &chains[1..] {
                                for (s, &v) in isum.iter_mut().zip(c) {
                                    *s = _mm256_add_epi32(*s, v);
                                }
                            }
                            // The f32 fields: Q4_K [d, m], Q6_K [d of each half]; f16 [d, m] for the others.
                            let d = if K == Q4K || K == Q6K {
                                _mm256_loadu_ps(bp.add(4 * PANEL_ROWS * h).cast::<f32>())
                            } else {
                                _mm256_cvtph_ps(_mm_loadu_si128(bp.cast::<__m128i>()))
                            };
                            if K == Q4_1 || K == Q5_1 || K == Q4K {
                                let m = if K == Q4K {
                                    _mm256_loadu_ps(bp.add(4 * PANEL_ROWS).cast::<f32>())
                                } else {
                                    _mm256_cvtph_ps(_mm_loadu_si128(bp.add(2 * PANEL_ROWS).cast::<__m128i>()))
                                };
                                for (b, a) in acc.iter_mut().enumerate() {
                                    *a = _mm256_fmadd_ps(m, _mm256_set1_ps((*xp.add(b * nb + i)).s), *a);
                                }
                            }
                            for (b, a) in acc.iter_mut().enumerate() {
                                let s = _mm256_mul_ps(d, _mm256_set1_ps((*xp.add(b * nb + i)).d));
                                *a = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(isum[b]), *a);
                            }
                        }
                    }
                }
                for (b, a) in acc.iter().enumerate() {
                    // SAFETY: 8 f32s at b * out_stride + o, inside `out` (asserted above).
                    unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(b * out_stride + o), *a) };
                }
            }
        }
    };
}

panel_fn!(panels, "avx2,fma,f16c", dot_madd);
panel_fn!(panels_vnni, "avx2,fma,f16c,avxvnni", dot_vnni);

/// # Safety
/// As [`gemm`].
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemm_k<const K: u8>(packed: &[u8], nb: usize, x: &[BlockQ16], n: usize, out: &mut [f32], out_stride: usize, vnni: bool) {
    let mut b0 = 0;
    while b0 < n {
        let na = (n - b0).min(NA_MAX);
        let na = if na == 3 { 2 } else { na };
        let xg = &x[b0 * nb..(b0 + na) * nb];
        let og = &mut out[b0 * out_stride..];
        // SAFETY: same CPU-feature requirement as this function (avxvnni checked by the caller when `vnni`); the
        // group holds na rows of nb blocks and `og` every (b, r) of them.
        unsafe {
            // Chains per row: enough that the integer products are not waiting on each other, few enough that
            // the chains, accumulators and operands fit in the 16 ymm registers.
            match (na, vnni) {
                (4, false) => panels::<K, 4, 1>(packed, nb, xg, og, out_stride),
                (2, false) => panels::<K, 2, 2>(packed, nb, xg, og, out_stride),
                (_, false) => panels::<K, 1, 2>(packed, nb, xg, og, out_stride),
                (4, true) => panels_vnni::<K, 4, 1>(packed, nb, xg, og, out_stride),
                (2, true) => panels_vnni::<K, 2, 2>(packed, nb, xg, og, out_stride),
                (_, true) => panels_vnni::<K, 1, 4>(packed, nb, xg, og, out_stride),
            }
        }
        b0 += na;
    }
}

/// `gemm_q16_panels` for the panel types: `packed` whole panels of `nb` blocks, `x` `n` rows of `nb` blocks, `out`
/// holding every (b, r). Bit-identical to `panel::scalar_gemm`.
///
/// # Safety
/// The CPU must support avx2, fma and f16c, and avxvnni if `vnni`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn gemm(t: GgmlType, packed: &[u8], nb: usize, x: &[BlockQ16], n: usize, out: &mut [f32], out_stride: usize, vnni: bool) {
    // SAFETY: (all arms) same CPU-feature requirement as this function.
    unsafe {
        match t {
            GgmlType::Q4_0 => gemm_k::<Q4_0>(packed, nb, x, n, out, out_stride, vnni),
            GgmlType::Q4_1 => gemm_k::<Q4_1>(packed, nb, x, n, out, out_stride, vnni),
            GgmlType::Q5_0 => gemm_k::<Q5_0>(packed, nb, x, n, out, out_stride, vnni),
            GgmlType::Q5_1 => gemm_k::<Q5_1>(packed, nb, x, n, out, out_stride, vnni),
            GgmlType::Q8_0 => gemm_k::<Q8_0>(packed, nb, x, n, out, out_stride, vnni),
            GgmlType::Q4K => gemm_k::<Q4K>(packed, nb, x, n, out, out_stride, vnni),
            GgmlType::Q6K => gemm_k::<Q6K>(packed, nb, x, n, out, out_stride, vnni),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::panel::panel_layout;
    use super::*;

    #[test]
    fn kernel_layout_is_the_packers() {
        for (k, t) in [
            (Q4_0, GgmlType::Q4_0),
            (Q4_1, GgmlType::Q4_1),
            (Q5_0, GgmlType::Q5_0),
            (Q5_1, GgmlType::Q5_1),
            (Q8_0, GgmlType::Q8_0),
            (Q4K, GgmlType::Q4K),
            (Q6K, GgmlType::Q6K),
        ] {
            let lay = panel_layout(t);
            assert_eq!(layout(k), (lay.block_bytes, lay.header_bytes), "{t}");
        }
    }
}
