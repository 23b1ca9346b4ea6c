//! Multi-threaded `y = x · Wᵀ` over [`Matrix`] formats.
//!
//! Work is split over weight rows (or, for a prefill's many activation rows, over activation rows), never over the
//! reduction dimension, and each activation row is quantized on its own: every output element is one dot product of
//! one weight row with one activation row, computed the same way whatever the batch size. That is what makes the
//! forward pass batch invariant.

use ferrite_kernels::cpu::isa::CpuIsa;
use ferrite_kernels::cpu::quant::{BlockQ16, PANEL_ROWS, QK16, dot_f32, gemm_q16, gemm_q16_panels, panel_row_bytes, quantize_row_q16};
use rayon::prelude::*;

use super::weights::{Linear, Matrix};

/// Weight rows per task: small enough to balance two to a few threads, large enough to amortize scheduling.
const MIN_ROWS_PER_TASK: usize = 16;
/// Weight rows per cache tile when the batch has many activation rows.
const TILE_ROWS: usize = 16;
/// From this many activation rows per thread on (a prefill), a matmul splits its work over activation rows instead
/// of weight rows.
const ACT_SPLIT_MIN_ROWS_PER_THREAD: usize = 32;

/// Activations prepared for one or more matmuls that share the same input.
pub struct Prepared<'a> {
    isa: CpuIsa,
    x: &'a [f32],
    n: usize,
    cols: usize,
    q16: Option<Vec<BlockQ16>>,
}

impl<'a> Prepared<'a> {
    /// `x` is `[n, cols]`. Quantizes each row to int16 blocks when `quantize` (in parallel over rows).
    pub fn new(isa: CpuIsa, x: &'a [f32], n: usize, cols: usize, quantize: bool) -> Self {
        debug_assert_eq!(x.len(), n * cols);
        let q16 = quantize.then(|| {
            let per_row = cols / QK16;
            let mut q = vec![BlockQ16::default(); n * per_row];
            q.par_chunks_mut(per_row).zip(x.par_chunks(cols)).for_each(|(q, x)| quantize_row_q16(isa, x, q));
            q
        });
        Self { isa, x, n, cols, q16 }
    }

    fn q16_row(&self, b: usize) -> &[BlockQ16] {
        let per_row = self.cols / QK16;
        &self.q16.as_ref().expect("prepared with quantize=true")[b * per_row..(b + 1) * per_row]
    }

    fn f32_row(&self, b: usize) -> &[f32] {
        &self.x[b * self.cols..(b + 1) * self.cols]
    }
}

/// `out[b, out_offset + r] = x_b · W_r` for every activation row `b` and weight row `r`; `out` has `out_stride`
/// columns.
pub fn matmul_into(w: &Matrix, x: &Prepared<'_>, out: &mut [f32], out_stride: usize, out_offset: usize) {
    let rows = w.rows();
    let n = x.n;
    debug_assert_eq!(w.cols(), x.cols);
    let threads = rayon::current_num_threads().max(1);
    if let Some(q) = x.q16.as_deref()
        && w.wants_int_dot()
        && n >= ACT_SPLIT_MIN_ROWS_PER_THREAD * threads
    {
        // A prefill: split over activation rows, each task writing its rows of `out` in place (no per-task buffer
        // to zero and copy back). Every task streams the whole matrix, which stays in its core's L2 for the default
        // model (and goes tile by tile for larger ones).
        debug_assert_eq!(out.len(), n * out_stride);
        let nb = x.cols / QK16;
        let chunk = n.div_ceil(threads * 2).clamp(16, 256).next_multiple_of(4);
        out.par_chunks_mut(chunk * out_stride).zip(q.par_chunks(chunk * nb)).for_each(|(o, qc)| {
            int_dot_rows(w, x.isa, qc, qc.len() / nb, 0, rows, &mut o[out_offset..], out_stride);
        });
        return;
    }
    // Whole panels per task when the matrix is packed in them (MIN_ROWS_PER_TASK is a multiple of PANEL_ROWS).
    let rows_per_task = rows.div_ceil(threads * 4).max(MIN_ROWS_PER_TASK).next_multiple_of(PANEL_ROWS);
    let tasks: Vec<(usize, Vec<f32>)> = (0..rows.div_ceil(rows_per_task))
        .into_par_iter()
        .map(|t| {
            let r0 = t * rows_per_task;
            let r1 = (r0 + rows_per_task).min(rows);
            let mut local = vec![0f32; n * (r1 - r0)];
            compute_rows(w, x, r0, r1, &mut local);
            (r0, local)
        })
        .collect();
    for (r0, local) in tasks {
        let width = local.len() / n;
        for b in 0..n {
            out[b * out_stride + out_offset + r0..][..width].copy_from_slice(&local[b * width..(b + 1) * width]);
        }
    }
}

/// `local[b, r - r0]` for weight rows `r0..r1`, tiled so a tile of weight rows stays in cache across the batch.
fn compute_rows(w: &Matrix, x: &Prepared<'_>, r0: usize, r1: usize, local: &mut [f32]) {
    let width = r1 - r0;
    if w.wants_int_dot() {
        let q = x.q16.as_deref().expect("prepared with quantize=true");
        // The activation rows back to back, as `q16_row` cuts them.
        debug_assert!((0..x.n).all(|b| std::ptr::eq(x.q16_row(b), &q[b * q.len() / x.n..(b + 1) * q.len() / x.n])));
        int_dot_rows(w, x.isa, q, x.n, r0, r1, local, width);
        return;
    }
    let cols = w.cols();
    if cols == 0 {
        local.fill(0.0);
        return;
    }
    let mut scratch = Vec::new();
    for t0 in (r0..r1).step_by(TILE_ROWS) {
        let t1 = (t0 + TILE_ROWS).min(r1);
        // The tile's rows as f32, dequantized once for all the activation rows (K-quants, ...).
        let tile: &[f32] = match w {
            Matrix::Blocks { .. } => {
                scratch.resize((t1 - t0) * cols, 0.0);
                for (i, row) in scratch.chunks_exact_mut(cols).enumerate() {
                    w.row_f32(t0 + i, row);
                }
                &scratch
            }
            Matrix::F32 { data, .. } => &data[t0 * cols..t1 * cols],
        };
        for b in 0..x.n {
            let out = &mut local[b * width + (t0 - r0)..b * width + (t1 - r0)];
            for (o, row) in out.iter_mut().zip(tile.chunks_exact(cols)) {
                *o = dot_f32(x.isa, row, x.f32_row(b));
            }
        }
    }
}

/// `out[b * out_stride + r - r0]` for the `n` int16 activation rows `q` and weight rows `r0..r1` (whole panels when
/// the matrix is packed in them) of an int-dot matrix, a tile of weight rows at a time.
///
/// `gemm_q16` unpacks each weight block once for a group of activation rows and gives exactly the bits of one
/// `gemv_q16` per activation row; `gemm_q16_panels` gives the same bits for any number of activation rows. Either
/// way the result does not depend on the batch.
#[allow(clippy::too_many_arguments)]
fn int_dot_rows(w: &Matrix, isa: CpuIsa, q: &[BlockQ16], n: usize, r0: usize, r1: usize, out: &mut [f32], out_stride: usize) {
    /// Weight bytes per kernel call: it runs each group of activation rows against every row of the tile, so the
    /// tile should stay in L2 between groups.
    const GEMM_TILE_BYTES: usize = 256 << 10;
    let Matrix::Blocks { dtype, cols, row_bytes, data, panels, .. } = w else {
        unreachable!("int-dot matrices are GGML blocks");
    };
    // Bytes per row as stored: a tile of whole panels is the byte range of its rows.
    let stored = if *panels { panel_row_bytes(*dtype, *cols) } else { *row_bytes };
    let tile_rows = (GEMM_TILE_BYTES / stored.max(1)).max(TILE_ROWS).next_multiple_of(PANEL_ROWS);
    for t0 in (r0..r1).step_by(tile_rows) {
        let t1 = (t0 + tile_rows).min(r1);
        let tile = &data[t0 * stored..t1 * stored];
        let o = &mut out[t0 - r0..];
        if *panels {
            debug_assert!(t0.is_multiple_of(PANEL_ROWS) && t1.is_multiple_of(PANEL_ROWS));
            gemm_q16_panels(isa, *dtype, tile, cols / QK16, q, n, o, out_stride);
        } else {
            gemm_q16(isa, *dtype, tile, *row_bytes, q, n, o, out_stride);
        }
    }
}

/// `[n, out_features]` output of a (possibly split) linear layer.
pub fn linear(isa: CpuIsa, l: &Linear, x: &[f32], n: usize, cols: usize, out: &mut Vec<f32>) {
    let width = l.out_features();
    out.clear();
    out.resize(n * width, 0.0);
    match l {
        Linear::Fused(m) => {
            let p = Prepared::new(isa, x, n, cols, m.wants_int_dot());
            matmul_into(m, &p, out, width, 0);
        }
        Linear::Split(parts) => {
            let p = Prepared::new(isa, x, n, cols, parts.iter().any(Matrix::wants_int_dot));
            let mut off = 0;
            for m in parts {
                matmul_into(m, &p, out, width, off);
                off += m.rows();
            }
        }
    }
}

/// `[n, rows]` output of one matrix.
pub fn matmul(isa: CpuIsa, w: &Matrix, x: &[f32], n: usize, out: &mut Vec<f32>) {
    out.clear();
    out.resize(n * w.rows(), 0.0);
    let p = Prepared::new(isa, x, n, w.cols(), w.wants_int_dot());
    matmul_into(w, &p, out, w.rows(), 0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrite_common::dtype::GgmlType;
    use ferrite_kernels::cpu::quant::dequantize_row;

    /// Random matrix of type `t` from an LCG: random quant bytes after two sane f16 header fields (Q4_1: scale
    /// 0.01..0.02 and min -0.1; Q4_K: d and dmin 0.001..0.002).
    fn random_matrix(t: GgmlType, rows: usize, cols: usize, seed: u64) -> Matrix {
        let mut s = seed;
        let mut next = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 33) as u32
        };
        let row_bytes = t.bytes_for(cols).unwrap();
        let mut data = Vec::with_capacity(rows * row_bytes);
        for _ in 0..rows * cols / t.block_size() {
            let (d, second) = match t {
                GgmlType::Q4_1 => (0.01 + (next() % 100) as f32 * 1e-4, -0.1),
                _ => (0.001 + (next() % 100) as f32 * 1e-5, 0.001 + (next() % 100) as f32 * 1e-5),
            };
            data.extend(half::f16::from_f32(d).to_le_bytes());
            data.extend(half::f16::from_f32(second).to_le_bytes());
            data.extend((4..t.type_size()).map(|_| next() as u8));
        }
        Matrix::Blocks { dtype: t, rows, cols, row_bytes, data, panels: false }
    }

    fn q4_1(rows: usize, cols: usize, seed: u64) -> Matrix {
        random_matrix(GgmlType::Q4_1, rows, cols, seed)
    }

    fn q4_k(rows: usize, cols: usize, seed: u64) -> Matrix {
        random_matrix(GgmlType::Q4K, rows, cols, seed)
    }

    /// A K-quant matrix left in its GGML blocks (no integer dot product: each tile's rows are dequantized once for all
    /// activation rows) gives exactly the bits of its dequantized f32 twin, in a batch or alone (46 rows: no panels).
    #[test]
    fn dequantized_matmul_equals_its_f32_twin() {
        let (rows, cols, n) = (46, 512, 7);
        let x: Vec<f32> = (0..n * cols).map(|i| ((i * 29 % 97) as f32 / 40.0) - 1.2).collect();
        let wf = dequant(&q4_k(rows, cols, 2));
        for isa in CpuIsa::supported() {
            let mut w = q4_k(rows, cols, 2);
            w.pack_for(isa);
            assert!(!w.wants_int_dot(), "{isa}");
            let (mut yq, mut yf) = (Vec::new(), Vec::new());
            matmul(isa, &w, &x, n, &mut yq);
            matmul(isa, &wf, &x, n, &mut yf);
            assert_eq!(yq, yf, "{isa}");
            let mut alone = Vec::new();
            matmul(isa, &w, &x[3 * cols..4 * cols], 1, &mut alone);
            assert_eq!(alone, yq[3 * rows..4 * rows], "{isa}");
        }
    }

    /// A Q4_K matrix in panels (an integer dot product over its 32-element sub-blocks) tracks its f32 twin, reads its
    /// rows back exactly, and gives a row alone the bits it gets in a batch, with either work split.
    #[test]
    fn q4_k_panels_track_f32_and_are_batch_invariant() {
        let (rows, cols) = (48, 512);
        let wf = dequant(&q4_k(rows, cols, 3));
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for isa in CpuIsa::supported() {
            let mut w = q4_k(rows, cols, 3);
            w.pack_for(isa);
            let packed = matches!(w, Matrix::Blocks { panels: true, .. });
            assert_eq!(packed, ferrite_kernels::cpu::quant::panels_preferred(isa, GgmlType::Q4K), "{isa}");
            let mut row = vec![0f32; cols];
            w.row_f32(rows - 5, &mut row);
            assert_eq!(row, wf_row(&wf, rows - 5), "{isa}: a row read back from the panels");
            for n in [5, 150] {
                let x: Vec<f32> = (0..n * cols).map(|i| ((i * 31 % 89) as f32 / 30.0) - 1.4).collect();
                let (mut yq, mut yf) = (Vec::new(), Vec::new());
                pool.install(|| matmul(isa, &w, &x, n, &mut yq));
                matmul(isa, &wf, &x, n, &mut yf);
                for (i, (q, f)) in yq.iter().zip(&yf).enumerate() {
                    assert!((q - f).abs() < 0.02 * (1.0 + f.abs()), "{isa} n {n} at {i}: {q} vs {f}");
                }
                for b in [0, n / 2, n - 1] {
                    let mut alone = Vec::new();
                    matmul(isa, &w, &x[b * cols..(b + 1) * cols], 1, &mut alone);
                    assert_eq!(alone, yq[b * rows..(b + 1) * rows], "{isa} n {n} b {b}");
                }
            }
        }
    }

    fn wf_row(m: &Matrix, r: usize) -> Vec<f32> {
        let Matrix::F32 { cols, data, .. } = m else { unreachable!() };
        data[r * cols..(r + 1) * cols].to_vec()
    }

    fn dequant(m: &Matrix) -> Matrix {
        let Matrix::Blocks { dtype, rows, cols, data, .. } = m else { unreachable!() };
        let mut out = vec![0f32; rows * cols];
        dequantize_row(*dtype, data, &mut out).unwrap();
        Matrix::F32 { rows: *rows, cols: *cols, data: out }
    }

    #[test]
    fn quantized_matmul_tracks_f32_and_is_batch_invariant() {
        // 100 rows stay row-major; 96 fill whole panels, packed at the levels that prefer them. 5 activation rows
        // split the work over weight rows, 150 (on 2 threads) over activation rows.
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for rows in [100, 96] {
            for n in [5, 150] {
                pool.install(|| tracks_f32_and_is_batch_invariant(rows, n));
            }
        }
    }

    fn tracks_f32_and_is_batch_invariant(rows: usize, n: usize) {
        let cols = 96;
        let wf = dequant(&q4_1(rows, cols, 1));
        let x: Vec<f32> = (0..n * cols).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
        for isa in CpuIsa::supported() {
            let mut w = q4_1(rows, cols, 1);
            w.pack_for(isa);
            let packed = matches!(w, Matrix::Blocks { panels: true, .. });
            assert_eq!(
                packed,
                rows.is_multiple_of(8) && ferrite_kernels::cpu::quant::panels_preferred(isa, GgmlType::Q4_1),
                "{isa} {rows}"
            );
            let mut row = vec![0f32; cols];
            w.row_f32(rows - 3, &mut row);
            assert_eq!(row, wf_row(&wf, rows - 3), "{isa}: a row read back from the panels");
            let (mut yq, mut yf) = (Vec::new(), Vec::new());
            matmul(isa, &w, &x, n, &mut yq);
            matmul(isa, &wf, &x, n, &mut yf);
            for b in 0..n {
                for r in 0..rows {
                    let (q, f) = (yq[b * rows + r], yf[b * rows + r]);
                    assert!((q - f).abs() < 0.02 * (1.0 + f.abs()), "{isa} b {b} r {r}: {q} vs {f}");
                }
                // Same row alone gives the same bits.
                let mut alone = Vec::new();
                matmul(isa, &w, &x[b * cols..(b + 1) * cols], 1, &mut alone);
                assert_eq!(alone, yq[b * rows..(b + 1) * rows], "{isa}");
            }
        }
    }
}
