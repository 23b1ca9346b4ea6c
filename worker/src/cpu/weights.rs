//! CPU weight storage. Matrices stay in their GGML block format when an integer dot product exists for it (Q4_0,
//! Q4_1, Q5_0, Q5_1, Q8_0: activations are quantized to int16 blocks of 32, 256× finer than llama.cpp's int8 at the
//! same speed on AVX2/AVX-512); other block formats (K-quants, ...) are dequantized one row at a time inside the dot
//! product; float formats are widened to f32 at load. After loading, the backend repacks the matrices of the panel
//! types (the legacy ones, Q4_K, Q6_K) into weight panels of 8 rows where its instruction set prefers them
//! ([`LlamaWeights::pack_for`]): the same bytes in another order, or the K-quants' blocks with f32 scales.

use ferrite_common::config::LlamaConfig;
use ferrite_common::dtype::GgmlType;
use ferrite_common::error::ModelError;
use ferrite_common::model::{LlamaTensor, ModelFiles, WeightView};
use ferrite_common::shard::ShardSpec;
use ferrite_kernels::cpu::isa::CpuIsa;
use ferrite_kernels::cpu::quant::{
    PANEL_ROWS, QK16, dequantize_panel_row, dequantize_row, pack_panels, panels_preferred, supports_q16_dot,
};
use std::ops::Range;

/// How the CPU backend keeps weights in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightPrecision {
    /// Keep GGML blocks; quantize activations to int16 blocks for the dot products (fast path).
    #[default]
    Native,
    /// Dequantize everything to f32 at load; f32 activations (the reference path).
    F32,
}

/// A `[rows, cols]` weight matrix: row-major, or (`Blocks` with `panels`) in panels of eight rows.
#[derive(Debug, Clone)]
pub enum Matrix {
    /// Raw GGML blocks; `row_bytes` bytes per row. With `panels`, `data` holds the rows packed eight at a time
    /// (`ferrite_kernels::cpu::quant::pack_panels`: the same bytes for the legacy types, 4/3 of them for Q4_K, whose
    /// sub-blocks get f32 scales; `rows` is then a multiple of 8).
    Blocks {
        dtype: GgmlType,
        rows: usize,
        cols: usize,
        row_bytes: usize,
        data: Vec<u8>,
        panels: bool,
    },
    F32 {
        rows: usize,
        cols: usize,
        data: Vec<f32>,
    },
}

impl Matrix {
    pub fn rows(&self) -> usize {
        match self {
            Matrix::Blocks { rows, .. } | Matrix::F32 { rows, .. } => *rows,
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            Matrix::Blocks { cols, .. } | Matrix::F32 { cols, .. } => *cols,
        }
    }

    /// Bytes in memory.
    pub fn bytes(&self) -> usize {
        match self {
            Matrix::Blocks { data, .. } => data.len(),
            Matrix::F32 { data, .. } => data.len() * 4,
        }
    }

    /// True when the matmul should quantize activations to int16 blocks for an integer dot product (the legacy block
    /// types, and every matrix packed in panels, Q4_K included).
    pub fn wants_int_dot(&self) -> bool {
        matches!(self, Matrix::Blocks { dtype, panels, .. } if *panels || supports_q16_dot(*dtype))
    }

    /// Row `r` as f32 (embedding lookup).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        match self {
            Matrix::Blocks { dtype, row_bytes, data, panels: false, .. } => {
                // Lengths were validated at load; a failure here is a bug.
                dequantize_row(*dtype, &data[r * row_bytes..(r + 1) * row_bytes], out).expect("row geometry validated at load");
            }
            Matrix::Blocks { dtype, cols, data, panels: true, .. } => dequantize_panel_row(*dtype, data, cols / QK16, r, out),
            Matrix::F32 { cols, data, .. } => out.copy_from_slice(&data[r * cols..(r + 1) * cols]),
        }
    }

    /// Repacks the matrix into weight panels when the int16 products of its type are faster from them at `isa`
    /// (`panels_preferred`) and its rows fill whole panels; otherwise leaves it as it is.
    pub(crate) fn pack_for(&mut self, isa: CpuIsa) {
        if let Matrix::Blocks { dtype, rows, row_bytes, data, panels, .. } = self
            && !*panels
            && panels_preferred(isa, *dtype)
            && rows.is_multiple_of(PANEL_ROWS)
            && let Ok(packed) = pack_panels(*dtype, data, *rows, *row_bytes)
        {
            *data = packed;
            *panels = true;
        }
    }

    fn load(path: &std::path::Path, w: &WeightView<'_>, precision: WeightPrecision) -> Result<Self, ModelError> {
        let (rows, cols) = match w.shape[..] {
            [r, c] => (r, c),
            [c] => (1, c),
            _ => {
                return Err(ModelError::WrongShape { path: path.into(), name: w.name.clone(), actual: w.shape.clone(), expected: vec![] });
            }
        };
        let bad = |_| ModelError::UnsupportedDtype { path: path.into(), name: w.name.clone(), dtype: w.dtype.to_string() };
        let keep_blocks = precision == WeightPrecision::Native && w.dtype.is_quantized();
        if keep_blocks {
            let row_bytes = w.dtype.bytes_for(cols).ok_or_else(|| ModelError::Malformed {
                path: path.into(),
                detail: format!("tensor `{}`: {cols} columns are not whole {} blocks", w.name, w.dtype),
            })?;
            // Check that every row can be dequantized (a type without a dequantizer fails here, at load).
            let mut probe = vec![0f32; cols];
            dequantize_row(w.dtype, &w.data[..row_bytes], &mut probe).map_err(bad)?;
            return Ok(Matrix::Blocks { dtype: w.dtype, rows, cols, row_bytes, data: w.data.to_vec(), panels: false });
        }
        let mut data = vec![0f32; rows * cols];
        dequantize_row(w.dtype, &w.data, &mut data).map_err(bad)?;
        Ok(Matrix::F32 { rows, cols, data })
    }

    /// Stacks matrices with the same column count and format row-wise (fused QKV, fused gate/up). `None` if the
    /// formats differ.
    /// Loads rows `rows` and columns `cols` of a `[rows, cols]` tensor (ranges clamped to the tensor; columns must
    /// fall on the storage type's block boundaries).
    fn load_slice(
        path: &std::path::Path,
        w: &WeightView<'_>,
        rows: Range<usize>,
        cols: Range<usize>,
        precision: WeightPrecision,
    ) -> Result<Self, ModelError> {
        let (n_rows, n_cols) = match w.shape[..] {
            [r, c] => (r, c),
            _ => return Self::load(path, w, precision),
        };
        let rows = rows.start.min(n_rows)..rows.end.min(n_rows);
        let cols = cols.start.min(n_cols)..cols.end.min(n_cols);
        if rows == (0..n_rows) && cols == (0..n_cols) {
            return Self::load(path, w, precision);
        }
        let malformed = |detail: String| ModelError::Malformed { path: path.into(), detail: format!("tensor `{}`: {detail}", w.name) };
        let row_bytes = w.dtype.bytes_for(n_cols).ok_or_else(|| malformed(format!("{n_cols} columns are not whole {} blocks", w.dtype)))?;
        let (c0, c1) = match (w.dtype.bytes_for(cols.start), w.dtype.bytes_for(cols.end)) {
            (Some(a), Some(b)) => (a, b),
            _ => return Err(malformed(format!("columns {cols:?} do not fall on {} block boundaries", w.dtype))),
        };
        let mut data = Vec::with_capacity(rows.len() * (c1 - c0));
        for r in rows.clone() {
            data.extend_from_slice(&w.data[r * row_bytes + c0..r * row_bytes + c1]);
        }
        let view = WeightView {
            name: w.name.clone(),
            dtype: w.dtype,
            shape: vec![rows.len(), cols.len()],
            data: std::borrow::Cow::Borrowed(&data),
        };
        Self::load(path, &view, precision)
    }

    fn concat_rows(parts: Vec<Matrix>) -> Result<Matrix, Vec<Matrix>> {
        let same = parts.windows(2).all(|p| match (&p[0], &p[1]) {
            (Matrix::Blocks { dtype: a, cols: ca, panels: false, .. }, Matrix::Blocks { dtype: b, cols: cb, panels: false, .. }) => {
                a == b && ca == cb
            }
            (Matrix::F32 { cols: ca, .. }, Matrix::F32 { cols: cb, .. }) => ca == cb,
            _ => false,
        });
        if !same || parts.is_empty() {
            return Err(parts);
        }
        let rows = parts.iter().map(Matrix::rows).sum();
        Ok(match &parts[0] {
            Matrix::Blocks { dtype, cols, row_bytes, .. } => Matrix::Blocks {
                dtype: *dtype,
                rows,
                cols: *cols,
                row_bytes: *row_bytes,
                data: parts.iter().flat_map(|p| if let Matrix::Blocks { data, .. } = p { data.as_slice() } else { &[] }).copied().collect(),
                panels: false,
            },
            Matrix::F32 { cols, .. } => Matrix::F32 {
                rows,
                cols: *cols,
                data: parts.iter().flat_map(|p| if let Matrix::F32 { data, .. } = p { data.as_slice() } else { &[] }).copied().collect(),
            },
        })
    }
}

/// A linear layer whose output is several matrices' outputs side by side (fused when their formats allow).
#[derive(Debug, Clone)]
pub enum Linear {
    Fused(Matrix),
    Split(Vec<Matrix>),
}

impl Linear {
    fn pack_for(&mut self, isa: CpuIsa) {
        match self {
            Linear::Fused(m) => m.pack_for(isa),
            Linear::Split(parts) => parts.iter_mut().for_each(|m| m.pack_for(isa)),
        }
    }

    fn new(parts: Vec<Matrix>) -> Self {
        match Matrix::concat_rows(parts) {
            Ok(m) => Linear::Fused(m),
            Err(parts) => Linear::Split(parts),
        }
    }

    pub fn bytes(&self) -> usize {
        match self {
            Linear::Fused(m) => m.bytes(),
            Linear::Split(p) => p.iter().map(Matrix::bytes).sum(),
        }
    }

    pub fn out_features(&self) -> usize {
        match self {
            Linear::Fused(m) => m.rows(),
            Linear::Split(p) => p.iter().map(Matrix::rows).sum(),
        }
    }
}

/// One transformer block.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    pub attn_norm: Vec<f32>,
    /// Q, K, V rows stacked: `[(n_heads + 2 n_kv) · head_dim, hidden]`.
    pub qkv: Linear,
    pub wo: Matrix,
    pub ffn_norm: Vec<f32>,
    /// Gate and up rows stacked: `[2 · ffn, hidden]`.
    pub gate_up: Linear,
    pub down: Matrix,
}

/// All weights of the model.
#[derive(Debug, Clone)]
pub struct LlamaWeights {
    pub embedding: Matrix,
    pub layers: Vec<LayerWeights>,
    pub output_norm: Vec<f32>,
    /// `None` when tied to the embedding.
    pub lm_head: Option<Matrix>,
}

impl LlamaWeights {
    pub fn load(model: &ModelFiles, precision: WeightPrecision) -> Result<Self, ModelError> {
        Self::load_shard(model, precision, None)
    }

    /// Loads only what tensor-parallel rank `shard` holds (see [`ShardSpec`]): its query/KV heads of Q/K/V and the
    /// matching input columns of o_proj, its FFN rows of gate/up and columns of down, its vocabulary rows of the
    /// lm_head (sliced from the embedding when tied); norms and the embedding whole. `None` loads everything.
    pub fn load_shard(model: &ModelFiles, precision: WeightPrecision, shard: Option<&ShardSpec>) -> Result<Self, ModelError> {
        let c: &LlamaConfig = &model.config;
        let path = model.path.as_path();
        let hd = c.head_dim;
        // `role` names the slice (the tied embedding is sliced as the lm_head), `file` the tensor read.
        let sliced = |file: LlamaTensor, role: LlamaTensor| -> Result<Matrix, ModelError> {
            let w = model.weight(file)?;
            let (rows, cols) = match (shard, &w.shape[..]) {
                (Some(s), &[r, k]) => s.part(role, r, k, hd),
                _ => (0..usize::MAX, 0..usize::MAX),
            };
            Matrix::load_slice(path, &w, rows, cols, precision)
        };
        let mat = |t: LlamaTensor| sliced(t, t);
        let whole = |t: LlamaTensor| -> Result<Matrix, ModelError> { Matrix::load(path, &model.weight(t)?, precision) };
        let vec = |t: LlamaTensor| -> Result<Vec<f32>, ModelError> {
            match Matrix::load(path, &model.weight(t)?, WeightPrecision::F32)? {
                Matrix::F32 { data, .. } => Ok(data),
                Matrix::Blocks { .. } => unreachable!("F32 precision always widens"),
            }
        };
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            layers.push(LayerWeights {
                attn_norm: vec(LlamaTensor::AttnNorm(l))?,
                qkv: Linear::new(vec![mat(LlamaTensor::Wq(l))?, mat(LlamaTensor::Wk(l))?, mat(LlamaTensor::Wv(l))?]),
                wo: mat(LlamaTensor::Wo(l))?,
                ffn_norm: vec(LlamaTensor::FfnNorm(l))?,
                gate_up: Linear::new(vec![mat(LlamaTensor::Gate(l))?, mat(LlamaTensor::Up(l))?]),
                down: mat(LlamaTensor::Down(l))?,
            });
        }
        // With a shard, the lm_head is this rank's vocabulary rows (of the embedding when tied).
        let lm_head = match (c.tie_word_embeddings, shard) {
            (true, None) => None,
            (true, Some(_)) => Some(sliced(LlamaTensor::TokenEmbedding, LlamaTensor::LmHead)?),
            (false, _) => Some(mat(LlamaTensor::LmHead)?),
        };
        Ok(Self { embedding: whole(LlamaTensor::TokenEmbedding)?, layers, output_norm: vec(LlamaTensor::OutputNorm)?, lm_head })
    }

    /// Repacks every matrix whose products are faster from weight panels at `isa` (see [`Matrix`]); the embedding
    /// too, as the tied lm_head, and its token rows are then unpacked one at a time.
    pub fn pack_for(&mut self, isa: CpuIsa) {
        for l in &mut self.layers {
            l.qkv.pack_for(isa);
            l.wo.pack_for(isa);
            l.gate_up.pack_for(isa);
            l.down.pack_for(isa);
        }
        self.embedding.pack_for(isa);
        if let Some(m) = &mut self.lm_head {
            m.pack_for(isa);
        }
    }

    /// Total bytes of all matrices as stored, counting the (tied) lm_head once more: decode reads the embedding
    /// rows of a few tokens but the whole lm_head.
    pub fn matrix_bytes(&self) -> usize {
        let layer = |l: &LayerWeights| l.qkv.bytes() + l.wo.bytes() + l.gate_up.bytes() + l.down.bytes();
        self.layers.iter().map(layer).sum::<usize>() + self.lm_head().bytes()
    }

    pub fn lm_head(&self) -> &Matrix {
        self.lm_head.as_ref().unwrap_or(&self.embedding)
    }
}
