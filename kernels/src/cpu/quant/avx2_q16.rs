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
//! `gemm_q16` ([`gemm`]) widens each weight block once for up to 8 activation rows (for 8: the
//! even blocks' accumulators, then the odd blocks', 8 ymm registers at a time), with the
//! per-(row, activation row) operations of `row`; the [`Group`] repacking and the scale tables are
//! shared with the AVX-512 version. With AVX-VNNI (`avx2-vnni`) each block product is one
//! `vpmaddwd` and one `vpdpwssd`. Measured (Zen 4, Q4_1 1536 x 576, ns per (row x activation
//! row)): 25.0 as a gemv loop, 17.9 batched by 4, 15.7 by 8, 15.0 by 8 with AVX-VNNI.
//!
//! Same safety contract as `avx2.rs`: every function is `unsafe` only because it needs a CPU
//! with avx2, fma and f16c, and reads only whole blocks inside its slices.

use core::arch::x86_64::*;
use core::ptr::{addr_of, read_unaligned};

use super::avx2::{ActBlock, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, bytes_from_bits, has_min, hsum, nibbles, prefetch_ahead, row, type_size};
use super::{BlockQ16, GgmlType, QK16};

/// 16 bytes of packed nibbles -> (elements 0..16, elements 16..32) as unsigned i16.
///
/// The bytes are widened to i16 by an in-lane `vpshufb` of the 128-bit broadcast (cheaper than
/// the lane-crossing `vpmovzxbw`).
///
/// # Safety
/// `p` must point at 16 readable bytes; the CPU must support avx2.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn nibbles16(p: *const u8) -> (__m256i, __m256i) {
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
            let (w0, w1) = quants16::<K>(w);
            dot16(w0, w1, x)
        }
    }
}

/// The integer products of the widened weight quants `(w0, w1)` of one block (see
/// [`quants16`]) with one activation block, in 8 f32 lanes (lane k: elements 2k, 2k+1, 2k+16,
/// 2k+17).
///
/// # Safety
/// `x` must point at a valid `BlockQ16`; the CPU must support avx2, fma and f16c.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot16(w0: __m256i, w1: __m256i, x: *const BlockQ16) -> __m256 {
    // SAFETY: two unaligned reads of the 64-byte `qs` of the BlockQ16 at `x`, which the caller
    // guarantees is readable.
    unsafe {
        let xp = addr_of!((*x).qs).cast::<__m256i>();
        let (x0, x1) = (_mm256_loadu_si256(xp), _mm256_loadu_si256(xp.add(1)));
        let dot = _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));
        _mm256_cvtepi32_ps(dot)
    }
}

/// The 32 weight quants of one block of kernel type `K` as i16 (minus the offset 8 / 16 of
/// Q4_0 / Q5_0): elements 0..16, then 16..32.
///
/// # Safety
/// `w` must point at `type_size(K)` readable bytes; the CPU must support avx2, fma and f16c.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quants16<const K: u8>(w: *const u8) -> (__m256i, __m256i) {
    // SAFETY: every read below is an unaligned read inside the `type_size(K)` bytes at `w`,
    // which the caller guarantees are readable.
    unsafe {
        match K {
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
                (_mm256_cvtepi8_epi16(_mm256_castsi256_si128(q)), _mm256_cvtepi8_epi16(_mm256_extracti128_si256::<1>(q)))
            }
            Q5_1 => {
                let hi = bytes_from_bits(read_unaligned(w.add(4).cast::<u32>()));
                let hi = _mm256_and_si256(hi, _mm256_set1_epi8(0x10));
                let q = _mm256_or_si256(nibbles(w.add(8)), hi);
                (_mm256_cvtepu8_epi16(_mm256_castsi256_si128(q)), _mm256_cvtepu8_epi16(_mm256_extracti128_si256::<1>(q)))
            }
            _ => (
                _mm256_cvtepi8_epi16(_mm_loadu_si128(w.add(2).cast::<__m128i>())),
                _mm256_cvtepi8_epi16(_mm_loadu_si128(w.add(18).cast::<__m128i>())),
            ),
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
        let v = unsafe { [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))] };
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

// ---------------------------------------------------------------------------------------------
// Batched products (`gemm_q16`)
// ---------------------------------------------------------------------------------------------

/// Activation rows per group of the batched kernels (the stride of [`Group`]).
pub(super) const G: usize = 8;

/// The 32 quants of one activation block on a cache line of their own: a `BlockQ16` is 72 bytes,
/// so most of its `qs` straddle two lines and every 512-bit load of them is split (measured ~40%
/// slower in the batched loop).
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
pub(super) struct Line(pub(super) [i16; QK16]);

/// 16 f32s on one cache line: for block `i` of a [`Group`], lanes `2b` and `2b + 1` belong to
/// activation row `b`.
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
pub(super) struct Lanes(pub(super) [f32; 2 * G]);

/// A group of up to `G` activation rows of `nb` blocks each, repacked for the batched kernels:
/// `qs[G * i + b]` holds the quants of block `i` of row `b` (the rows of one block are adjacent
/// lines), `table[i]` its `[d, s]` in lanes `2b, 2b + 1` (0 for `b >= na`); `scale` is the
/// scratch of the per-row scale products (see [`row_scales`]): two rows of `nb` entries.
#[derive(Default)]
pub(super) struct Group {
    pub(super) qs: Vec<Line>,
    pub(super) table: Vec<Lanes>,
    pub(super) scale: Vec<Lanes>,
}

impl Group {
    /// Repacks the `na <= G` rows of `x` (`na * nb` blocks, back to back), growing the buffers
    /// as needed.
    pub(super) fn fill(&mut self, x: &[BlockQ16], nb: usize, na: usize) {
        debug_assert!(na <= G && x.len() >= na * nb);
        if self.table.len() < nb {
            self.qs.resize(G * nb, Line::default());
            self.table.resize(nb, Lanes::default());
            self.scale.resize(2 * nb, Lanes::default());
        }
        for (i, (qi, ti)) in self.qs.chunks_exact_mut(G).zip(&mut self.table).take(nb).enumerate() {
            *ti = Lanes::default();
            for b in 0..na {
                let blk = &x[b * nb + i];
                qi[b] = Line(blk.qs);
                ti.0[2 * b] = blk.d;
                ti.0[2 * b + 1] = blk.s;
            }
        }
    }

    /// Runs `f` with this thread's group (kept between calls, so the buffers are allocated once).
    pub(super) fn with<R>(f: impl FnOnce(&mut Group) -> R) -> R {
        thread_local! {
            static GROUP: core::cell::RefCell<Group> = core::cell::RefCell::default();
        }
        GROUP.with_borrow_mut(f)
    }
}

/// First pass of the batched kernels over one weight row of kernel type `K` (`nb` blocks at `w`)
/// and the table of a [`Group`]: writes `scale[i]` = `[d_w, m_w, d_w, m_w, ..] * table[i]`, so
/// lane `2b` is `d_w * d_x` of block `i` and activation row `b` (the lane 0 of `avx2::scales`)
/// and lane `2b + 1` is `m_w * s_x` (its lane 1) for the types with a minimum (`d_w * s_x`,
/// unused, for the others). Returns, for the types with a minimum, lane `2b + 1` of `accm0 +
/// accm1` of `row`: the sums of the `m_w * s_x` of the even and of the odd blocks, accumulated
/// from 0 in block order, then added.
///
/// # Safety
/// `w` must point at `nb * type_size(K)` readable bytes, `table` and `scale` at `nb` entries;
/// the CPU must support avx2, fma and f16c.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn row_scales<const K: u8>(w: *const u8, nb: usize, table: *const Lanes, scale: *mut Lanes) -> [f32; 2 * G] {
    let ts = type_size(K);
    // One block: its products stored and returned as two halves.
    // SAFETY: block `i < nb` lies inside the caller's ranges; the entries are 64-byte aligned.
    let one = |i: usize| unsafe {
        let wb = w.add(i * ts);
        // [d_w, m_w] (or [d_w, d_w]) repeated: one conversion, exact.
        let dm = if has_min(K) {
            _mm256_cvtph_ps(_mm_set1_epi32(read_unaligned(wb.cast::<i32>())))
        } else {
            _mm256_cvtph_ps(_mm_set1_epi16(read_unaligned(wb.cast::<i16>())))
        };
        let (t, s) = (table.add(i).cast::<f32>(), scale.add(i).cast::<f32>());
        let lo = _mm256_mul_ps(dm, _mm256_load_ps(t));
        let hi = _mm256_mul_ps(dm, _mm256_load_ps(t.add(8)));
        _mm256_store_ps(s, lo);
        _mm256_store_ps(s.add(8), hi);
        (lo, hi)
    };
    let z = _mm256_setzero_ps();
    let (mut m0lo, mut m0hi, mut m1lo, mut m1hi) = (z, z, z, z);
    let mut i = 0;
    while i + 1 < nb {
        let ((alo, ahi), (blo, bhi)) = (one(i), one(i + 1));
        if has_min(K) {
            m0lo = _mm256_add_ps(m0lo, alo);
            m0hi = _mm256_add_ps(m0hi, ahi);
            m1lo = _mm256_add_ps(m1lo, blo);
            m1hi = _mm256_add_ps(m1hi, bhi);
        }
        i += 2;
    }
    if i < nb {
        let (alo, ahi) = one(i);
        if has_min(K) {
            m0lo = _mm256_add_ps(m0lo, alo);
            m0hi = _mm256_add_ps(m0hi, ahi);
        }
    }
    let mut m = [0.0f32; 2 * G];
    // SAFETY: `m` holds 16 f32s; storeu has no alignment needs.
    unsafe {
        _mm256_storeu_ps(m.as_mut_ptr(), _mm256_add_ps(m0lo, m1lo));
        _mm256_storeu_ps(m.as_mut_ptr().add(8), _mm256_add_ps(m0hi, m1hi));
    }
    m
}

/// The integer products of one weight block `(w0, w1)` with one activation block `(x0, x1)`: two `vpmaddwd` (16
/// products each, adjacent pairs summed into i32) added.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_madd(w0: __m256i, x0: __m256i, w1: __m256i, x1: __m256i) -> __m256i {
    _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1))
}

/// [`dot_madd`] with AVX-VNNI: the second `vpmaddwd` and the add fused into one `vpdpwssd` (no saturation; every sum
/// is below 2^24, so the integers, and the bits of everything after, are the same).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
fn dot_vnni(w0: __m256i, x0: __m256i, w1: __m256i, x1: __m256i) -> __m256i {
    _mm256_dpwssd_avx_epi32(_mm256_madd_epi16(w0, x0), w1, x1)
}

/// Defines a batched kernel with its target features and block product (`dot_madd` or `dot_vnni`): one body, so
/// the AVX2 and AVX-VNNI kernels cannot drift apart.
macro_rules! gemm_group_fn {
    ($name:ident, $features:literal, $dot:ident) => {
        /// `out[b * out_stride + r] = row::<K, BlockQ16>(row r of w, activation row b)` for the `NA`
        /// activation rows of group `g` (`nb` blocks each) and every row of `w`, with the same operations
        /// per (row, activation row) as `row`: each weight block is widened once and multiplied with the
        /// `NA` activation blocks into `2 * NA` independent accumulators (for 8 rows, the even blocks'
        /// 8 first, then the odd blocks').
        ///
        /// # Safety
        /// `row_bytes >= nb * type_size(K)`, `g` filled with `NA` rows of `nb` blocks, `out` long enough
        /// for every (b, r) (checked); the CPU must support avx2, fma and f16c.
        #[target_feature(enable = $features)]
        unsafe fn $name<const K: u8, const NA: usize>(
            w: &[u8],
            row_bytes: usize,
            g: &mut Group,
            nb: usize,
            out: &mut [f32],
            out_stride: usize,
        ) {
            let ts = type_size(K);
            assert!(NA <= G && row_bytes >= nb * ts && g.table.len() >= nb);
            let (yp, tp, sp) = (g.qs.as_ptr(), g.table.as_ptr(), g.scale.as_mut_ptr());
            // The activation quants of block i of row b as two i16 halves.
            // SAFETY: (callers below) i < nb and b < NA; the lines are 64-byte aligned.
            let y = |b: usize, i: usize| unsafe {
                let p = yp.add(G * i + b).cast::<__m256i>();
                (_mm256_load_si256(p), _mm256_load_si256(p.add(1)))
            };
            // The scale product of block i and row b.
            // SAFETY: (callers below) i < nb and b < NA.
            let s = |b: usize, i: usize| unsafe { _mm256_broadcast_ss(&(*sp.add(i)).0[2 * b]) };
            let dot = |(w0, w1): (__m256i, __m256i), (x0, x1): (__m256i, __m256i)| _mm256_cvtepi32_ps($dot(w0, x0, w1, x1));
            for (r, wr) in w.chunks_exact(row_bytes).enumerate() {
                let wp = wr.as_ptr();
                // SAFETY: the row holds nb blocks, the table and scratch nb entries (asserted above).
                let m = unsafe { row_scales::<K>(wp, nb, tp, sp) };
                let mut acc0 = [_mm256_setzero_ps(); NA];
                let mut acc1 = [_mm256_setzero_ps(); NA];
                if NA <= 4 {
                    // Both chains of every row in registers (4 · NA <= 16 with the weights).
                    let mut i = 0;
                    while i + 1 < nb {
                        prefetch_ahead(wp.wrapping_add(i * ts));
                        // SAFETY: blocks i and i + 1 < nb of the weight row.
                        let (qa, qb) = unsafe { (quants16::<K>(wp.add(i * ts)), quants16::<K>(wp.add((i + 1) * ts))) };
                        for (b, acc) in acc0.iter_mut().enumerate() {
                            *acc = _mm256_fmadd_ps(s(b, i), dot(qa, y(b, i)), *acc);
                        }
                        for (b, acc) in acc1.iter_mut().enumerate() {
                            *acc = _mm256_fmadd_ps(s(b, i + 1), dot(qb, y(b, i + 1)), *acc);
                        }
                        i += 2;
                    }
                    if i < nb {
                        // SAFETY: block i < nb of the weight row.
                        let qa = unsafe { quants16::<K>(wp.add(i * ts)) };
                        for (b, acc) in acc0.iter_mut().enumerate() {
                            *acc = _mm256_fmadd_ps(s(b, i), dot(qa, y(b, i)), *acc);
                        }
                    }
                } else {
                    // Eight rows: the even blocks' chains first, then the odd blocks' (8 accumulators at a time:
                    // AVX2 has 16 registers). Each chain sees the same blocks in the same order as above.
                    for (first, accs) in [(0, &mut acc0), (1, &mut acc1)] {
                        let mut a = [_mm256_setzero_ps(); NA];
                        for i in (first..nb).step_by(2) {
                            prefetch_ahead(wp.wrapping_add(i * ts));
                            // SAFETY: block i < nb of the weight row.
                            let q = unsafe { quants16::<K>(wp.add(i * ts)) };
                            for (b, acc) in a.iter_mut().enumerate() {
                                *acc = _mm256_fmadd_ps(s(b, i), dot(q, y(b, i)), *acc);
                            }
                        }
                        *accs = a;
                    }
                }
                for b in 0..NA {
                    let mut sum = hsum(_mm256_add_ps(acc0[b], acc1[b]));
                    if has_min(K) {
                        sum += m[2 * b + 1];
                    }
                    out[b * out_stride + r] = sum;
                }
            }
        }
    };
}

gemm_group_fn!(gemm_group, "avx2,fma,f16c", dot_madd);
gemm_group_fn!(gemm_group_vnni, "avx2,fma,f16c,avxvnni", dot_vnni);

/// # Safety
/// The CPU must support avx2, fma and f16c, and avxvnni if `vnni`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemm_k<const K: u8>(
    w: &[u8],
    row_bytes: usize,
    x: &[BlockQ16],
    nb: usize,
    n: usize,
    out: &mut [f32],
    out_stride: usize,
    vnni: bool,
) {
    let mut b0 = 0;
    while b0 < n {
        let na = match n - b0 {
            r if r >= G => G,
            r if r >= 4 => 4,
            r if r >= 2 => 2,
            _ => 1,
        };
        let xg = &x[b0 * nb..(b0 + na) * nb];
        let og = &mut out[b0 * out_stride..];
        if na == 1 {
            for (o, wr) in og.iter_mut().zip(w.chunks_exact(row_bytes)) {
                // SAFETY: same CPU-feature requirement as this function.
                *o = unsafe { row::<K, BlockQ16>(wr, xg) };
            }
        } else {
            Group::with(|g| {
                g.fill(xg, nb, na);
                // SAFETY: same CPU-feature requirement as this function (avxvnni checked by the
                // caller when `vnni`); every weight row holds nb blocks and the group is filled with
                // na rows of nb blocks.
                unsafe {
                    match (na, vnni) {
                        (G, false) => gemm_group::<K, G>(w, row_bytes, g, nb, og, out_stride),
                        (4, false) => gemm_group::<K, 4>(w, row_bytes, g, nb, og, out_stride),
                        (_, false) => gemm_group::<K, 2>(w, row_bytes, g, nb, og, out_stride),
                        (G, true) => gemm_group_vnni::<K, G>(w, row_bytes, g, nb, og, out_stride),
                        (4, true) => gemm_group_vnni::<K, 4>(w, row_bytes, g, nb, og, out_stride),
                        (_, true) => gemm_group_vnni::<K, 2>(w, row_bytes, g, nb, og, out_stride),
                    }
                }
            });
        }
        b0 += na;
    }
}

/// `gemm_q16` for the supported types (`row_bytes >= nb * type_size`, `x.len() >= n * nb`,
/// `out` long enough for every (b, r)); leaves `out` untouched for the others. Bit-identical to
/// [`avx2::vec_dot`](super::avx2::vec_dot) per (row, activation row), with or without `vnni`.
///
/// # Safety
/// The CPU must support avx2, fma and f16c, and avxvnni if `vnni`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn gemm(
    t: GgmlType,
    w: &[u8],
    row_bytes: usize,
    x: &[BlockQ16],
    nb: usize,
    n: usize,
    out: &mut [f32],
    out_stride: usize,
    vnni: bool,
) {
    // SAFETY: (all arms) same CPU-feature requirement as this function.
    unsafe {
        match t {
            GgmlType::Q4_0 => gemm_k::<Q4_0>(w, row_bytes, x, nb, n, out, out_stride, vnni),
            GgmlType::Q4_1 => gemm_k::<Q4_1>(w, row_bytes, x, nb, n, out, out_stride, vnni),
            GgmlType::Q5_0 => gemm_k::<Q5_0>(w, row_bytes, x, nb, n, out, out_stride, vnni),
            GgmlType::Q5_1 => gemm_k::<Q5_1>(w, row_bytes, x, nb, n, out, out_stride, vnni),
            GgmlType::Q8_0 => gemm_k::<Q8_0>(w, row_bytes, x, nb, n, out, out_stride, vnni),
            _ => {}
        }
    }
}
