//! GGML block quantization on the CPU: dequantization of GGUF tensor data, Q8 quantization of
//! activations, and quantized dot products / matrix-vector products.
//!
//! # Formats
//! The block layouts are those of llama.cpp (`ggml-common.h`); every multi-byte field is little
//! endian and the `f16` scales are IEEE half floats. [`dequantize_row`] is bit-exact with
//! ggml's `dequantize_row_*` and gguf-py's `gguf.quants.dequantize` (both compute every element
//! with the same sequence of f32 operations; this module never fuses them into FMAs).
//!
//! # Quantized dot products
//! Activations are quantized per block of [`QK8`] values into [`BlockQ8`] (llama.cpp's
//! `block_q8_1` with f32 instead of f16 scales). [`vec_dot_q8`] and [`gemv_q8`] multiply raw
//! weight blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) with such a row: the products inside a block are
//! summed exactly in integers, then scaled and accumulated in f32.
//!
//! [`vec_dot_q16`] and [`gemv_q16`] do the same with activations quantized to int16
//! ([`BlockQ16`], `d = amax / 32767`): ~258x finer than int8 at nearly the same speed (the
//! weight quants are widened to i16 and multiplied with `vpmaddwd`, 256- or 512-bit).
//! [`gemm_q16`] multiplies a tile of weight rows with several activation rows at once, widening
//! each weight block once for up to 8 activation rows, with the same bits as [`vec_dot_q16`].
//!
//! [`gemm_q16_panels`] does the same from weight panels ([`pack_panels`]: eight rows interleaved, so a block's
//! products are summed down a register, one lane per row, and the scale work is shared by eight rows): 1.3-1.5x the
//! row-major kernels' speed at every SIMD level, with its own summation order (the same bits at every ISA, scalar
//! included). Q5_0 and Q5_1 pack with their fifth bits spread for the kernel (the same bytes); Q4_K and Q6_K pack too, as 32-element blocks with exact f32 scales (Q4_1-like with a minimum, 4/3 of
//! the bytes; Q8_0-like with a scale per half, 1.52 times), so the K-quants of a Q4_K_M file get an integer product.
//! The CPU backend packs the matrices of the supported types at load ([`panels_preferred`]).
//!
//! # Determinism
//! Every dispatching function takes the [`CpuIsa`] to use (the host's best, or a configured cap).
//! At `avx2` and above the SIMD path (AVX2 + FMA + F16C) runs; `scalar` runs portable code that
//! sums in another order (results agree to ~1e-6 relative, not bitwise). The int16 products
//! ([`vec_dot_q16`], [`gemv_q16`], [`gemm_q16`]) use AVX-512 (avx512f + avx512bw + gfni) at
//! `avx512`, again with its own summation order. For a given ISA each function is a pure
//! function of its inputs: [`gemv_q8`] gives, for each row, exactly the bits [`vec_dot_q8`]
//! gives, whatever the number of rows per call (likewise [`gemv_q16`], [`gemm_q16`] and
//! [`vec_dot_q16`]).

use half::f16;

use super::isa::CpuIsa;

pub use ferrite_common::dtype::GgmlType;
pub use panel::{
    PANEL_ROWS, dequantize_panel_row, gemm_q16_panels, pack_panels, panel_block_bytes, panel_row_bytes, panels_preferred, supports_panels,
};

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx2_panel;
#[cfg(target_arch = "x86_64")]
mod avx2_q16;
#[cfg(target_arch = "x86_64")]
mod avx512_q16;
mod kquants;
mod panel;
mod scalar;
#[cfg(test)]
mod tests;

/// Errors of [`dequantize_row`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantError {
    /// The operation is not implemented for this type (e.g. dequantizing `q8_1` / `q8_K`, which
    /// only ever hold activations).
    #[error("unsupported tensor type {0} for this operation")]
    Unsupported(GgmlType),
    /// `elements` is not a whole number of blocks, or `bytes` is not the size of that many blocks.
    #[error("{elements} elements of type {dtype} do not match {bytes} bytes of data")]
    BadLength { dtype: GgmlType, elements: usize, bytes: usize },
}

/// Number of values in one [`BlockQ8`].
pub const QK8: usize = 32;

/// One block of quantized activations: `x[i] ≈ d * qs[i]`, with `s = d * sum(qs)` (used by the
/// types with a per-block minimum, Q4_1 and Q5_1).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[repr(C)]
pub struct BlockQ8 {
    pub d: f32,
    pub s: f32,
    pub qs: [i8; QK8],
}

/// Number of values in one [`BlockQ16`].
pub const QK16: usize = 32;

/// One block of int16-quantized activations: `x[i] ≈ d * qs[i]` with `d = amax / 32767`, and
/// `s = d * sum(qs)` (used by the types with a per-block minimum, Q4_1 and Q5_1).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[repr(C)]
pub struct BlockQ16 {
    pub d: f32,
    pub s: f32,
    pub qs: [i16; QK16],
}

/// Which implementation the dispatching functions use for an ISA level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

/// The f32 / int8 kernels' implementation for `isa` (they have no AVX-512 variant).
#[inline]
fn isa(cpu: CpuIsa) -> Isa {
    #[cfg(target_arch = "x86_64")]
    if cpu.has_avx2() {
        return Isa::Avx2;
    }
    let _ = cpu;
    Isa::Scalar
}

/// Which implementation the int16-activation dot products use: [`isa`], upgraded to AVX-512 at that level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IsaQ16 {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

#[inline]
fn isa_q16(cpu: CpuIsa) -> IsaQ16 {
    match isa(cpu) {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if cpu.has_avx512() => IsaQ16::Avx512,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => IsaQ16::Avx2,
        Isa::Scalar => IsaQ16::Scalar,
    }
}

// ---------------------------------------------------------------------------------------------
// Dequantization
// ---------------------------------------------------------------------------------------------

#[inline(always)]
pub(crate) fn f16_at(b: &[u8], off: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[off], b[off + 1]])).to_f32()
}

/// Dequantize `dst.len()` elements (a multiple of the block size) of type `t` stored in `src`
/// (exactly `t.bytes_for(dst.len())` bytes) into `dst`.
///
/// Supports F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K and Q6_K,
/// bit-exact with ggml / gguf-py. Q8_1 and Q8_K give [`QuantError::Unsupported`].
pub fn dequantize_row(t: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    use GgmlType::*;
    if matches!(t, Q8_1 | Q8K) {
        return Err(QuantError::Unsupported(t));
    }
    if t.bytes_for(dst.len()) != Some(src.len()) {
        return Err(QuantError::BadLength { dtype: t, elements: dst.len(), bytes: src.len() });
    }
    let ts = t.type_size();
    let blocks = src.chunks_exact(ts).zip(dst.chunks_exact_mut(t.block_size()));
    match t {
        F32 => blocks.for_each(|(b, y)| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        F16 => blocks.for_each(|(b, y)| y[0] = f16_at(b, 0)),
        BF16 => blocks.for_each(|(b, y)| y[0] = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16)),
        Q4_0 => blocks.for_each(|(b, y)| dequant_q4_0(b, y)),
        Q4_1 => blocks.for_each(|(b, y)| dequant_q4_1(b, y)),
        Q5_0 => blocks.for_each(|(b, y)| dequant_q5_0(b, y)),
        Q5_1 => blocks.for_each(|(b, y)| dequant_q5_1(b, y)),
        Q8_0 => blocks.for_each(|(b, y)| dequant_q8_0(b, y)),
        Q2K => blocks.for_each(|(b, y)| kquants::dequant_q2_k(b, y)),
        Q3K => blocks.for_each(|(b, y)| kquants::dequant_q3_k(b, y)),
        Q4K => blocks.for_each(|(b, y)| kquants::dequant_q4_k(b, y)),
        Q5K => blocks.for_each(|(b, y)| kquants::dequant_q5_k(b, y)),
        Q6K => blocks.for_each(|(b, y)| kquants::dequant_q6_k(b, y)),
        Q8_1 | Q8K => unreachable!("rejected above"),
    }
    Ok(())
}

/// block_q4_0 { f16 d; u8 qs[16] }: element j is the low nibble of qs[j], element j+16 the high
/// one; value `d * (q - 8)`.
fn dequant_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = d * (i32::from(qs[j] & 0x0F) - 8) as f32;
        y[j + 16] = d * (i32::from(qs[j] >> 4) - 8) as f32;
    }
}

/// block_q4_1 { f16 d; f16 m; u8 qs[16] }: value `d * q + m`.
fn dequant_q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = d * f32::from(qs[j] & 0x0F) + m;
        y[j + 16] = d * f32::from(qs[j] >> 4) + m;
    }
}

/// block_q5_0 { f16 d; u8 qh[4]; u8 qs[16] }: bit j of the little-endian u32 `qh` is bit 4 of
/// element j; value `d * (q - 16)`.
fn dequant_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let h0 = ((qh >> j) << 4) & 0x10;
        let h1 = (qh >> (j + 12)) & 0x10;
        y[j] = d * ((u32::from(qs[j] & 0x0F) | h0) as i32 - 16) as f32;
        y[j + 16] = d * ((u32::from(qs[j] >> 4) | h1) as i32 - 16) as f32;
    }
}

/// block_q5_1 { f16 d; f16 m; u8 qh[4]; u8 qs[16] }: value `d * q + m`.
fn dequant_q5_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let h0 = ((qh >> j) << 4) & 0x10;
        let h1 = (qh >> (j + 12)) & 0x10;
        y[j] = d * (u32::from(qs[j] & 0x0F) | h0) as f32 + m;
        y[j + 16] = d * (u32::from(qs[j] >> 4) | h1) as f32 + m;
    }
}

/// block_q8_0 { f16 d; i8 qs[32] }: value `d * q`.
fn dequant_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (y, &q) in y.iter_mut().zip(&b[2..34]) {
        *y = d * f32::from(q as i8);
    }
}

// ---------------------------------------------------------------------------------------------
// Activation quantization
// ---------------------------------------------------------------------------------------------

/// Quantize a row of activations (`x.len() == out.len() * QK8`) into blocks with llama.cpp's
/// `quantize_row_q8_1_ref` rounding: `d = amax / 127`, `q = round(x * (1 / d))` (round half away
/// from zero), `s = d * sum(q)`; a block with `d == 0` is all zeros. Inputs must be finite.
///
/// The SIMD and scalar paths give identical blocks.
pub fn quantize_row_q8(cpu: CpuIsa, x: &[f32], out: &mut [BlockQ8]) {
    debug_assert_eq!(x.len(), out.len() * QK8, "quantize_row_q8: length mismatch");
    match isa(cpu) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa(cpu)` is Avx2 only for a `CpuIsa` checked to have avx2, fma and f16c.
        Isa::Avx2 => unsafe { avx2::quantize_row_q8(x, out) },
        Isa::Scalar => scalar::quantize_row_q8(x, out),
    }
}

/// Quantize a row of activations (`x.len() == out.len() * QK16`) into int16 blocks: `d = amax /
/// 32767`, `q = round(x * (1 / d))` (round half away from zero, never -32768), `s = d *
/// sum(q)`; a block with `d == 0` is all zeros. Inputs must be finite.
///
/// The SIMD and scalar paths give identical blocks.
pub fn quantize_row_q16(cpu: CpuIsa, x: &[f32], out: &mut [BlockQ16]) {
    debug_assert_eq!(x.len(), out.len() * QK16, "quantize_row_q16: length mismatch");
    match isa(cpu) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa(cpu)` is Avx2 only for a `CpuIsa` checked to have avx2, fma and f16c.
        Isa::Avx2 => unsafe { avx2_q16::quantize_row_q16(x, out) },
        Isa::Scalar => scalar::quantize_row_q16(x, out),
    }
}

// ---------------------------------------------------------------------------------------------
// Dot products
// ---------------------------------------------------------------------------------------------

/// True if [`vec_dot_q8`] / [`gemv_q8`] support weights of type `t`: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.
pub fn supports_q8_dot(t: GgmlType) -> bool {
    use GgmlType::*;
    matches!(t, Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0)
}

/// Dot product of one weight row (raw GGML blocks of type `t`, `w.len() == x.len() *
/// t.type_size()`) with a quantized activation row.
///
/// Per block `b`: Q4_0: `d_w*d_x*sum((q-8)*xq)`; Q4_1: `d_w*d_x*sum(q*xq) + m_w*s_x`;
/// Q5_0: `d_w*d_x*sum((q-16)*xq)`; Q5_1: like Q4_1; Q8_0: `d_w*d_x*sum(q*xq)`.
///
/// Unsupported types (see [`supports_q8_dot`]) hit a `debug_assert!` and return 0.0 in release
/// builds. Inconsistent lengths hit a `debug_assert!`; in release the common whole blocks are
/// used. `x.qs` must not hold -128 (never produced by [`quantize_row_q8`]).
pub fn vec_dot_q8(cpu: CpuIsa, t: GgmlType, w: &[u8], x: &[BlockQ8]) -> f32 {
    debug_assert!(supports_q8_dot(t), "vec_dot_q8: unsupported type {t}");
    debug_assert_eq!(w.len(), x.len() * t.type_size(), "vec_dot_q8: length mismatch");
    match isa(cpu) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa(cpu)` is Avx2 only for a `CpuIsa` checked to have avx2, fma and f16c.
        Isa::Avx2 => unsafe { avx2::vec_dot(t, w, x) },
        Isa::Scalar => scalar::vec_dot(t, w, x),
    }
}

/// True if [`vec_dot_q16`] / [`gemv_q16`] support weights of type `t`: Q4_0, Q4_1, Q5_0, Q5_1,
/// Q8_0 (the same as [`supports_q8_dot`]).
pub fn supports_q16_dot(t: GgmlType) -> bool {
    supports_q8_dot(t)
}

/// [`vec_dot_q8`] with an int16 activation row: per block `b`, Q4_0: `d_w*d_x*sum((q-8)*xq)`;
/// Q4_1: `d_w*d_x*sum(q*xq) + m_w*s_x`; Q5_0: `d_w*d_x*sum((q-16)*xq)`; Q5_1: like Q4_1;
/// Q8_0: `d_w*d_x*sum(q*xq)`. The block sums are exact (in SIMD i32 lanes that each convert
/// exactly to f32); the per-block results are accumulated in f32 (with FMA on x86_64) and
/// reduced in a fixed order.
///
/// Unsupported types (see [`supports_q16_dot`]) hit a `debug_assert!` and return 0.0 in release
/// builds. Inconsistent lengths hit a `debug_assert!`; in release the common whole blocks are
/// used.
pub fn vec_dot_q16(cpu: CpuIsa, t: GgmlType, w: &[u8], x: &[BlockQ16]) -> f32 {
    debug_assert!(supports_q16_dot(t), "vec_dot_q16: unsupported type {t}");
    debug_assert_eq!(w.len(), x.len() * t.type_size(), "vec_dot_q16: length mismatch");
    match isa_q16(cpu) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa_q16(cpu)` is Avx2 only for a `CpuIsa` checked to have avx2, fma and f16c.
        IsaQ16::Avx2 => unsafe { avx2::vec_dot(t, w, x) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa_q16(cpu)` is Avx512 only for a `CpuIsa` checked to have avx512f, avx512bw, gfni, avx2,
        // fma and f16c.
        IsaQ16::Avx512 => unsafe { avx512_q16::vec_dot(t, w, x) },
        IsaQ16::Scalar => scalar::vec_dot(t, w, x),
    }
}

/// Argument checks shared by the gemv entry points: `None` when there is nothing to compute (unsupported type, no
/// output, or zero-length rows, whose outputs are set to 0); otherwise the part of `out` that has rows in `w`.
fn gemv_rows<'o>(
    name: &str,
    supported: bool,
    t: GgmlType,
    w: &[u8],
    row_bytes: usize,
    blocks: usize,
    out: &'o mut [f32],
) -> Option<&'o mut [f32]> {
    debug_assert!(supported, "{name}: unsupported type {t}");
    debug_assert_eq!(row_bytes, blocks * t.type_size(), "{name}: row length mismatch");
    debug_assert!(w.len() >= out.len() * row_bytes, "{name}: weight matrix too short");
    if !supported || out.is_empty() {
        return None;
    }
    if row_bytes == 0 {
        out.fill(0.0);
        return None;
    }
    let rows = (w.len() / row_bytes).min(out.len());
    Some(&mut out[..rows])
}

/// `out[r] = vec_dot_q8(t, &w[r * row_bytes..][..row_bytes], x)` for each of the `out.len()`
/// consecutive rows of `w` (`row_bytes == x.len() * t.type_size()`, `w.len() >= out.len() *
/// row_bytes`). Bit-identical to calling [`vec_dot_q8`] row by row; the CPU feature dispatch is
/// done once per call.
///
/// Unsupported types hit a `debug_assert!` and leave `out` untouched in release builds.
/// Inconsistent lengths hit a `debug_assert!`; in release only the rows that fit in `w` are
/// written.
pub fn gemv_q8(cpu: CpuIsa, t: GgmlType, w: &[u8], row_bytes: usize, x: &[BlockQ8], out: &mut [f32]) {
    let Some(out) = gemv_rows("gemv_q8", supports_q8_dot(t), t, w, row_bytes, x.len(), out) else {
        return;
    };
    match isa(cpu) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa(cpu)` is Avx2 only for a `CpuIsa` checked to have avx2, fma and f16c.
        Isa::Avx2 => unsafe { avx2::gemv(t, w, row_bytes, x, out) },
        Isa::Scalar => {
            for (o, row) in out.iter_mut().zip(w.chunks_exact(row_bytes)) {
                *o = scalar::vec_dot(t, row, x);
            }
        }
    }
}

/// `out[r] = vec_dot_q16(t, &w[r * row_bytes..][..row_bytes], x)` for each of the `out.len()`
/// consecutive rows of `w` (`row_bytes == x.len() * t.type_size()`, `w.len() >= out.len() *
/// row_bytes`). Bit-identical to calling [`vec_dot_q16`] row by row; the CPU feature dispatch is
/// done once per call.
///
/// Unsupported types hit a `debug_assert!` and leave `out` untouched in release builds.
/// Inconsistent lengths hit a `debug_assert!`; in release only the rows that fit in `w` are
/// written.
pub fn gemv_q16(cpu: CpuIsa, t: GgmlType, w: &[u8], row_bytes: usize, x: &[BlockQ16], out: &mut [f32]) {
    let Some(out) = gemv_rows("gemv_q16", supports_q16_dot(t), t, w, row_bytes, x.len(), out) else {
        return;
    };
    match isa_q16(cpu) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa_q16(cpu)` is Avx2 only for a `CpuIsa` checked to have avx2, fma and f16c.
        IsaQ16::Avx2 => unsafe { avx2::gemv(t, w, row_bytes, x, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa_q16(cpu)` is Avx512 only for a `CpuIsa` checked to have avx512f, avx512bw, gfni, avx2,
        // fma and f16c.
        IsaQ16::Avx512 => unsafe { avx512_q16::gemv(t, w, row_bytes, x, out) },
        IsaQ16::Scalar => {
            for (o, row) in out.iter_mut().zip(w.chunks_exact(row_bytes)) {
                *o = scalar::vec_dot(t, row, x);
            }
        }
    }
}

/// How many of the `n >= 1` activation rows of a batched product fit both in `x` (`x_len` blocks, `nb` per row) and,
/// with their `rows` outputs each `out_stride` apart, in `out` (`out_len` floats); `debug_assert!`s that all `n` do.
fn batch_rows_that_fit(name: &str, n: usize, x_len: usize, nb: usize, out_len: usize, rows: usize, out_stride: usize) -> usize {
    debug_assert_eq!(x_len, n * nb, "{name}: activation length mismatch");
    debug_assert!(n == 1 || out_stride >= rows, "{name}: out_stride {out_stride} < rows {rows}");
    debug_assert!(out_len >= (n - 1) * out_stride + rows, "{name}: output too short");
    let fit_x = x_len.checked_div(nb).unwrap_or(n);
    let fit_out = if out_len < rows { 0 } else { (out_len - rows).checked_div(out_stride).map_or(n, |q| q + 1) };
    n.min(fit_x).min(fit_out)
}

/// `out[b * out_stride + r] = vec_dot_q16(t, row r of w, x[b])` for every weight row `r` in
/// `0..rows` (`rows = w.len() / row_bytes`) and activation row `b` in `0..n`, where `x` holds the
/// `n` activation rows of `blocks_per_row = row_bytes / t.type_size()` blocks each, contiguously.
///
/// Bit-identical to calling [`vec_dot_q16`] (or [`gemv_q16`]) per (row, activation row) on the
/// same CPU: the SIMD paths compute exactly the same block sums, scale products, FMA
/// accumulations and final reduction, only interleaved over up to 8 (AVX-512) or 4 (AVX2)
/// activation rows per unpacked weight block. Keep `w` (a tile of weight rows) and `x` small
/// enough to stay in L1 / L2: the activation rows are processed in groups, each group against
/// every row of `w`.
///
/// Unsupported types hit a `debug_assert!` and leave `out` untouched in release builds.
/// Inconsistent lengths (`x.len() != n * blocks_per_row`, `out` shorter than `(n - 1) *
/// out_stride + rows`) hit a `debug_assert!`; in release only the activation rows that fit in
/// both `x` and `out` are computed.
#[allow(clippy::too_many_arguments)] // the BLAS-like signature of the SIMD kernels it dispatches to
pub fn gemm_q16(cpu: CpuIsa, t: GgmlType, w: &[u8], row_bytes: usize, x: &[BlockQ16], n: usize, out: &mut [f32], out_stride: usize) {
    debug_assert!(supports_q16_dot(t), "gemm_q16: unsupported type {t}");
    if !supports_q16_dot(t) || n == 0 || row_bytes == 0 {
        return;
    }
    let nb = row_bytes / t.type_size();
    let rows = w.len() / row_bytes;
    debug_assert_eq!(row_bytes, nb * t.type_size(), "gemm_q16: row_bytes is not a whole number of blocks");
    let n = batch_rows_that_fit("gemm_q16", n, x.len(), nb, out.len(), rows, out_stride);
    if n == 0 || rows == 0 {
        return;
    }
    let w = &w[..rows * row_bytes];
    let x = &x[..n * nb];
    match isa_q16(cpu) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa_q16(cpu)` is Avx2 only for a `CpuIsa` checked to have avx2, fma and f16c; `has_avx2_vnni`
        // only for one also checked to have avxvnni.
        IsaQ16::Avx2 => unsafe { avx2_q16::gemm(t, w, row_bytes, x, nb, n, out, out_stride, cpu.has_avx2_vnni()) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa_q16(cpu)` is Avx512 only for a `CpuIsa` checked to have avx512f, avx512bw, gfni, avx2,
        // fma and f16c.
        IsaQ16::Avx512 => unsafe { avx512_q16::gemm(t, w, row_bytes, x, nb, n, out, out_stride) },
        IsaQ16::Scalar => {
            for b in 0..n {
                let xb = &x[b * nb..(b + 1) * nb];
                let o = &mut out[b * out_stride..][..rows];
                for (o, row) in o.iter_mut().zip(w.chunks_exact(row_bytes)) {
                    *o = scalar::vec_dot(t, row, xb);
                }
            }
        }
    }
}

/// f32 dot product of `a` and `b[..a.len()]` with a fixed reduction order: 4 accumulators of 8
/// lanes over chunks of 32, remaining chunks of 8 into the first accumulator, a fixed tree
/// reduction, then the last `len % 8` products added one by one. The AVX2 path uses FMA, the
/// scalar path separate multiply and add, so they differ in the last bits.
pub fn dot_f32(cpu: CpuIsa, a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len(), "dot_f32: length mismatch");
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    match isa(cpu) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa(cpu)` is Avx2 only for a `CpuIsa` checked to have avx2, fma and f16c.
        Isa::Avx2 => unsafe { avx2::dot_f32(a, b) },
        Isa::Scalar => scalar::dot_f32(a, b),
    }
}
