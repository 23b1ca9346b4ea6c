//! Weight panels: eight rows of a GGML block matrix interleaved, so one SIMD register holds the same two elements of
//! eight rows and a block's integer products are summed down the register (one lane per row) instead of across it.
//!
//! # Layout
//! A matrix of `rows` (a multiple of [`PANEL_ROWS`]) rows of `nb` blocks becomes `rows / 8` panels of `nb` panel
//! blocks, back to back. Panel block `i` of panel `p` holds block `i` of rows `8p..8p + 8`, in
//! `8 * type_size` bytes (the size of the eight blocks it replaces):
//! a GGML block is a sequence of 2-byte units (the f16 `d`, for Q4_1 the f16 `m`, then the quant bytes in pairs), and
//! the panel block holds unit 0 of row 0, of row 1, ... of row 7, then unit 1 of the eight rows, and so on. So the
//! eight `d` come first (16 bytes), then for Q4_1 the eight `m`, then for each quant byte pair `j` (0..8 for the
//! nibble types, whose byte `2j` holds elements `2j` and `2j + 16`; 0..16 for Q8_0) the pairs of the eight rows.
//!
//! Loading 16 quant bytes and widening them to i16 gives, in lanes `2k, 2k + 1`, elements `2j, 2j + 1` of row `k`
//! (low nibbles; the high nibbles are elements `2j + 16, 2j + 17`): `vpmaddwd` with the broadcast activation pair adds
//! one product pair per row lane.
//!
//! Q5_0 and Q5_1 keep their bytes, in another order: the f16 fields, then each row's fifth bits as a u32 whose low
//! half holds the even elements' bits and whose high half the odd elements' (`spread_qh`: one shift per byte pair
//! brings a pair's bits to the bottom of its two i16 lanes), then the nibble pairs.
//!
//! Q4_K is packed as its 32-element sub-blocks: each becomes a Q4_1-like block with an f32 scale `d·sc` and an f32
//! minimum `-(dmin·m)` (both exact products), 24 bytes a row in place of 18, laid out as `Q4K_SUB_BYTES` says. Q6_K
//! becomes Q8_0-like blocks of `q - 32` with an exact f32 scale per 16-element half (40 bytes in place of 26.25;
//! `Q6K_SUB_BYTES`), each half summed and scaled apart.
//!
//! # Numerics
//! Per row and activation row, for each block `i` in order: `acc = fma(m_w, s_x, acc)` (Q4_1 and Q4_K only), then
//! `acc = fma(d_w * d_x, f32(isum_i), acc)`, where `isum_i` is the block's exact integer sum (Q6_K: the same for each
//! half in turn, with its scale). [`gemm_q16_panels`]
//! gives exactly these bits on every ISA (the scalar twin uses `f32::mul_add`), whatever the number of activation rows:
//! a batched prefill and a single decode step agree bit for bit.

use super::{BlockQ16, GgmlType, QK16, QuantError};
use crate::cpu::isa::CpuIsa;

/// Weight rows per panel.
pub const PANEL_ROWS: usize = 8;

/// True if matrices of type `t` can be packed into panels: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K and Q6_K.
pub fn supports_panels(t: GgmlType) -> bool {
    use GgmlType::*;
    matches!(t, Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q4K | Q6K)
}

/// The f16 fields of a Q5_0 (`d`) or Q5_1 (`d`, `m`) block; 0 for the other types.
fn q5_fields(t: GgmlType) -> usize {
    match t {
        GgmlType::Q5_0 => 1,
        GgmlType::Q5_1 => 2,
        _ => 0,
    }
}

/// A Q5 block's fifth bits `qh` (bit `e` for element `e`) as the panels store them: the even elements' bits in the
/// low 16 bits, the odd elements' in the high 16, so one shift brings the bits of elements `2j` and `2j + 1` to the
/// bottom of each half (the i16 lanes of those elements).
fn spread_qh(qh: u32) -> u32 {
    (0..16).fold(0, |acc, i| acc | (((qh >> (2 * i)) & 1) << i) | (((qh >> (2 * i + 1)) & 1) << (16 + i)))
}

/// The inverse of [`spread_qh`].
fn gather_qh(s: u32) -> u32 {
    (0..16).fold(0, |acc, i| acc | (((s >> i) & 1) << (2 * i)) | (((s >> (16 + i)) & 1) << (2 * i + 1)))
}

/// True if the int16 products of type `t` are fastest from panels at `cpu`: every SIMD level. The AVX2 panel kernel
/// beats the row-major AVX-512 one too (Sapphire Rapids, one thread, Q4_1 1536 x 576: 11.5 against 13.9 ns per row
/// and activation row in a batch of 32, 16.5 against 28.1 for one activation row); at `scalar` they buy nothing.
pub fn panels_preferred(cpu: CpuIsa, t: GgmlType) -> bool {
    supports_panels(t) && cpu.has_avx2()
}

/// Bytes of one panel block of type `t`: eight rows' blocks of 32 elements (for Q4_K, its 32-element sub-blocks with
/// f32 scale and minimum: 24 bytes a row).
pub fn panel_block_bytes(t: GgmlType) -> usize {
    PANEL_ROWS
        * match t {
            GgmlType::Q4K => Q4K_SUB_BYTES,
            GgmlType::Q6K => Q6K_SUB_BYTES,
            _ => t.type_size(),
        }
}

/// Bytes a row takes in panels (`cols` elements): its GGML bytes, 4/3 of them for Q4_K, 1.52 times for Q6_K.
pub fn panel_row_bytes(t: GgmlType, cols: usize) -> usize {
    cols / QK16 * panel_block_bytes(t) / PANEL_ROWS
}

/// A Q4_K sub-block in panels: f32 `d·sc`, f32 `-dmin·m`, then 16 bytes of nibbles in Q4_1's order. In a panel block
/// the eight rows' scales come first (32 bytes), then their minimums, then the quant byte pairs as for the other types.
const Q4K_SUB_BYTES: usize = 24;
/// A Q6_K block of 32 in panels: the f32 `d·sc` of each 16-element half, then the 32 quants `q - 32` as i8 (in a panel
/// block: the eight rows' first scales, their second scales, then the quant byte pairs).
const Q6K_SUB_BYTES: usize = 40;

/// Where things are in a panel block of one type (the SIMD kernels hold the same numbers as constants; a test checks
/// them against these).
#[derive(Clone, Copy, Debug)]
pub(super) struct PanelLayout {
    /// Bytes of a panel block ([`panel_block_bytes`]).
    pub(super) block_bytes: usize,
    /// Bytes of its eight rows' header fields, before the quant byte pairs.
    pub(super) header_bytes: usize,
}

/// The layout of `t`'s panel blocks.
pub(super) fn panel_layout(t: GgmlType) -> PanelLayout {
    PanelLayout { block_bytes: panel_block_bytes(t), header_bytes: PANEL_ROWS * if f32_fields(t) { 8 } else { header_bytes(t) } }
}

/// True for the panel types whose block header is two f32 fields (the K-quants' sub-blocks).
fn f32_fields(t: GgmlType) -> bool {
    matches!(t, GgmlType::Q4K | GgmlType::Q6K)
}

/// Quant bytes per row block: 16 nibble bytes or 32 Q8_0 bytes.
fn quant_bytes(t: GgmlType) -> usize {
    if t == GgmlType::Q8_0 { 32 } else { 16 }
}

/// Header bytes per row block (f16 `d`, and `m` for Q4_1).
fn header_bytes(t: GgmlType) -> usize {
    t.type_size() - quant_bytes(t)
}

/// Where bytes `2u, 2u + 1` of row `k`'s block land inside its panel block: a block is a sequence of 2-byte units (f16
/// fields, then quant byte pairs), and a panel block holds unit 0 of its eight rows, then unit 1, and so on.
fn unit_offset(k: usize, u: usize) -> usize {
    u * 2 * PANEL_ROWS + 2 * k
}

/// Packs `data` (`rows` rows of `row_bytes` bytes of type `t`) into panels.
pub fn pack_panels(t: GgmlType, data: &[u8], rows: usize, row_bytes: usize) -> Result<Vec<u8>, QuantError> {
    let ts = t.type_size();
    if !supports_panels(t) {
        return Err(QuantError::Unsupported(t));
    }
    if !rows.is_multiple_of(PANEL_ROWS) || !row_bytes.is_multiple_of(ts) || data.len() != rows * row_bytes {
        return Err(QuantError::BadLength { dtype: t, elements: rows * (row_bytes / ts) * t.block_size(), bytes: data.len() });
    }
    let cols = row_bytes / ts * t.block_size();
    let nb = cols / QK16;
    let pbb = panel_block_bytes(t);
    let mut out = vec![0u8; rows / PANEL_ROWS * nb * pbb];
    for (r, row) in data.chunks_exact(row_bytes).enumerate() {
        let (p, k) = (r / PANEL_ROWS, r % PANEL_ROWS);
        let mut place = |i: usize, blk: &[u8]| {
            let dst = &mut out[(p * nb + i) * pbb..][..pbb];
            if q5_fields(t) > 0 {
                // The f16 fields, the eight rows' fifth bits (u32 each, spread), then the nibble pairs.
                let nf = q5_fields(t);
                for u in 0..nf {
                    dst[unit_offset(k, u)..][..2].copy_from_slice(&blk[2 * u..2 * u + 2]);
                }
                let qh = u32::from_le_bytes([blk[2 * nf], blk[2 * nf + 1], blk[2 * nf + 2], blk[2 * nf + 3]]);
                dst[16 * nf + 4 * k..][..4].copy_from_slice(&spread_qh(qh).to_le_bytes());
                for (u, unit) in blk[2 * nf + 4..].chunks_exact(2).enumerate() {
                    dst[16 * nf + 32 + unit_offset(k, u)..][..2].copy_from_slice(unit);
                }
            } else if f32_fields(t) {
                // Two f32 fields of eight rows each, then the quant byte pairs.
                dst[4 * k..][..4].copy_from_slice(&blk[0..4]);
                dst[4 * PANEL_ROWS + 4 * k..][..4].copy_from_slice(&blk[4..8]);
                for (u, unit) in blk[8..].chunks_exact(2).enumerate() {
                    dst[8 * PANEL_ROWS + unit_offset(k, u)..][..2].copy_from_slice(unit);
                }
            } else {
                for (u, unit) in blk.chunks_exact(2).enumerate() {
                    dst[unit_offset(k, u)..][..2].copy_from_slice(unit);
                }
            }
        };
        for (s, blk) in row.chunks_exact(ts).enumerate() {
            if t == GgmlType::Q4K {
                for (j, sub) in super::kquants::q4_k_sub_blocks(blk).iter().enumerate() {
                    place(8 * s + j, sub);
                }
            } else if t == GgmlType::Q6K {
                for (j, sub) in super::kquants::q6_k_sub_blocks(blk).iter().enumerate() {
                    place(8 * s + j, sub);
                }
            } else {
                place(s, blk);
            }
        }
    }
    Ok(out)
}

/// Row `r` of a packed matrix (`nb` blocks of 32 per row) back in f32 (`out.len() == nb * 32`): the bits
/// [`dequantize_row`](super::dequantize_row) gives for the row's GGML bytes.
pub fn dequantize_panel_row(t: GgmlType, packed: &[u8], nb: usize, r: usize, out: &mut [f32]) {
    let pbb = panel_block_bytes(t);
    let (p, k) = (r / PANEL_ROWS, r % PANEL_ROWS);
    let f32_at = |b: &[u8], o: usize| f32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let mut blk = vec![0u8; t.type_size()];
    for (i, y) in out.chunks_exact_mut(QK16).take(nb).enumerate() {
        let src = &packed[(p * nb + i) * pbb..][..pbb];
        if t == GgmlType::Q4K {
            let (d, m) = (f32_at(src, 4 * k), f32_at(src, 4 * PANEL_ROWS + 4 * k));
            for u in 0..QK16 / 4 {
                let pair = &src[8 * PANEL_ROWS + unit_offset(k, u)..][..2];
                for (e, &byte) in pair.iter().enumerate() {
                    // `m` holds -dmin·m_j: d·q + (-x) is d·q - x, ggml's dequantization, bit for bit.
                    y[2 * u + e] = d * f32::from(byte & 0x0F) + m;
                    y[2 * u + e + QK16 / 2] = d * f32::from(byte >> 4) + m;
                }
            }
        } else if t == GgmlType::Q6K {
            let halves = [f32_at(src, 4 * k), f32_at(src, 4 * PANEL_ROWS + 4 * k)];
            for u in 0..QK16 / 2 {
                let pair = &src[8 * PANEL_ROWS + unit_offset(k, u)..][..2];
                for (e, &byte) in pair.iter().enumerate() {
                    let l = 2 * u + e;
                    y[l] = halves[l / (QK16 / 2)] * f32::from(byte as i8);
                }
            }
        } else if q5_fields(t) > 0 {
            let nf = q5_fields(t);
            for u in 0..nf {
                blk[2 * u..2 * u + 2].copy_from_slice(&src[unit_offset(k, u)..][..2]);
            }
            let s4 = &src[16 * nf + 4 * k..][..4];
            blk[2 * nf..2 * nf + 4].copy_from_slice(&gather_qh(u32::from_le_bytes([s4[0], s4[1], s4[2], s4[3]])).to_le_bytes());
            for (u, unit) in blk[2 * nf + 4..].chunks_exact_mut(2).enumerate() {
                unit.copy_from_slice(&src[16 * nf + 32 + unit_offset(k, u)..][..2]);
            }
            super::dequantize_row(t, &blk, y).expect("a whole Q5 block");
        } else {
            for (u, unit) in blk.chunks_exact_mut(2).enumerate() {
                unit.copy_from_slice(&src[unit_offset(k, u)..][..2]);
            }
            super::dequantize_row(t, &blk, y).expect("a whole block of a panel type");
        }
    }
}

/// `out[b * out_stride + r] = dot(row r, x[b])` (the numerics in the module docs) for every row `r` of the whole
/// panels in `packed` (`nb` blocks per row; `rows = 8 * packed.len() / (nb * panel_block_bytes)`) and every activation
/// row `b < n` (`x` holds `n` rows of `nb` blocks back to back).
///
/// Unsupported types, or inconsistent lengths, hit a `debug_assert!`; in release they compute only what fits (nothing
/// for an unsupported type).
#[allow(clippy::too_many_arguments)] // the BLAS-like signature of the SIMD kernels it dispatches to
pub fn gemm_q16_panels(cpu: CpuIsa, t: GgmlType, packed: &[u8], nb: usize, x: &[BlockQ16], n: usize, out: &mut [f32], out_stride: usize) {
    debug_assert!(supports_panels(t), "gemm_q16_panels: unsupported type {t}");
    let panel_bytes = nb * panel_block_bytes(t);
    if !supports_panels(t) || n == 0 || panel_bytes == 0 {
        return;
    }
    debug_assert_eq!(packed.len() % panel_bytes, 0, "gemm_q16_panels: not whole panels");
    let rows = packed.len() / panel_bytes * PANEL_ROWS;
    let n = super::batch_rows_that_fit("gemm_q16_panels", n, x.len(), nb, out.len(), rows, out_stride);
    if n == 0 || rows == 0 {
        return;
    }
    let packed = &packed[..rows / PANEL_ROWS * panel_bytes];
    let x = &x[..n * nb];
    #[cfg(target_arch = "x86_64")]
    if cpu.has_avx2() {
        // SAFETY: `has_avx2` holds only for a `CpuIsa` checked to have avx2, fma and f16c, `has_avx2_vnni` only for
        // one also checked to have avxvnni; `packed` is whole panels, `x` n rows of nb blocks and `out` holds every
        // (b, r) (all checked above).
        unsafe { super::avx2_panel::gemm(t, packed, nb, x, n, out, out_stride, cpu.has_avx2_vnni()) };
        return;
    }
    let _ = cpu;
    scalar_gemm(t, packed, nb, x, n, out, out_stride);
}

/// The scalar twin of the SIMD panel kernels: the same operations in the same order, so the same bits.
#[allow(clippy::too_many_arguments)]
pub(super) fn scalar_gemm(t: GgmlType, packed: &[u8], nb: usize, x: &[BlockQ16], n: usize, out: &mut [f32], out_stride: usize) {
    // Q4_K sub-blocks are Q4_1 blocks with f32 scales (the match below treats them as Q4_1, `_`); Q6_K blocks are
    // Q8_0 blocks with an f32 scale per half.
    let lay = panel_layout(t);
    let pbb = lay.block_bytes;
    // Header bytes per row: the Q5 types' f16 fields and fifth bits, the K-quants' two f32s, the others' f16s.
    let hdr = lay.header_bytes / PANEL_ROWS;
    let pairs = match t {
        GgmlType::Q8_0 | GgmlType::Q6K => 16,
        _ => 8,
    };
    let f16 = |b: &[u8], o: usize| half::f16::from_bits(u16::from_le_bytes([b[o], b[o + 1]])).to_f32();
    let f32_at = |b: &[u8], o: usize| f32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    // (d, m) of row k in a panel block (m = 0 for the types without a minimum).
    let scales = |blk: &[u8], k: usize| match t {
        GgmlType::Q4K | GgmlType::Q6K => (f32_at(blk, 4 * k), f32_at(blk, 4 * PANEL_ROWS + 4 * k)),
        GgmlType::Q4_1 | GgmlType::Q5_1 => (f16(blk, 2 * k), f16(blk, 2 * PANEL_ROWS + 2 * k)),
        _ => (f16(blk, 2 * k), 0.0),
    };
    for (p, panel) in packed.chunks_exact(nb * pbb).enumerate() {
        for b in 0..n {
            let xr = &x[b * nb..(b + 1) * nb];
            for k in 0..PANEL_ROWS {
                let mut acc = 0.0f32;
                for (blk, xb) in panel.chunks_exact(pbb).zip(xr) {
                    let (d, m) = scales(blk, k);
                    let q = &blk[PANEL_ROWS * hdr..];
                    let nf = q5_fields(t);
                    let qh = if nf > 0 {
                        let s4 = &blk[16 * nf + 4 * k..][..4];
                        gather_qh(u32::from_le_bytes([s4[0], s4[1], s4[2], s4[3]]))
                    } else {
                        0
                    };
                    // Element e's fifth bit as 16 (Q5 types), and the offset its type subtracts.
                    let h = |e: usize| ((qh >> e) & 1) as i32 * 16;
                    let off = match t {
                        GgmlType::Q4_0 => 8,
                        GgmlType::Q5_0 => 16,
                        _ => 0,
                    };
                    // Q6_K sums its halves apart (`isum[1]` for elements 16..32); the others use `isum[0]`.
                    let mut isum = [0i32; 2];
                    for j in 0..pairs {
                        let pair = &q[j * 2 * PANEL_ROWS + 2 * k..][..2];
                        for (e, &byte) in pair.iter().enumerate() {
                            let (lo, hi) = (2 * j + e, 2 * j + e + QK16 / 2);
                            let isum = &mut isum[if t == GgmlType::Q6K { lo / (QK16 / 2) } else { 0 }];
                            match t {
                                GgmlType::Q8_0 | GgmlType::Q6K => *isum += i32::from(byte as i8) * i32::from(xb.qs[lo]),
                                _ => {
                                    *isum += (i32::from(byte & 0x0F) + h(lo) - off) * i32::from(xb.qs[lo]);
                                    *isum += (i32::from(byte >> 4) + h(hi) - off) * i32::from(xb.qs[hi]);
                                }
                            }
                        }
                    }
                    if matches!(t, GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K) {
                        acc = m.mul_add(xb.s, acc);
                    }
                    acc = (d * xb.d).mul_add(isum[0] as f32, acc);
                    if t == GgmlType::Q6K {
                        // `m` is the second half's scale.
                        acc = (m * xb.d).mul_add(isum[1] as f32, acc);
                    }
                }
                out[b * out_stride + p * PANEL_ROWS + k] = acc;
            }
        }
    }
}
