//! Llama weights on the device: matrices in bf16 (`[out, in]` row-major, Q/K/V and gate/up fused by rows), norms in
//! f32.
//!
//! Loading streams each tensor through a bounded host buffer (a few MiB of rows at a time): bf16 safetensors are
//! copied as they are, anything else (GGUF blocks, f16, f32) is dequantized to f32 and rounded to bf16 per chunk, so
//! no second full copy of the model ever exists in host memory. Progress shows as a bar on an interactive terminal,
//! else is logged every 10 %.
//!
//! A tensor-parallel rank loads only its [`ShardSpec`]: row ranges of the column-parallel matrices (Q/K/V heads,
//! gate/up rows, lm_head vocabulary), column ranges of the row-parallel ones (o_proj, down); rows are read from
//! the file one chunk at a time either way.

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use ferrite_common::config::LlamaConfig;
use ferrite_common::dtype::GgmlType;
use ferrite_common::error::ModelError;
use ferrite_common::model::{LlamaTensor, ModelFiles, WeightView};
use ferrite_common::shard::ShardSpec;
use ferrite_kernels::cpu::quant::dequantize_row;
use ferrite_kernels::cuda::{CudaError, CudaKernels};
use half::bf16;

/// Host staging chunk, in elements.
const CHUNK_ELEMS: usize = 4 << 20;

/// A device matrix `[rows, cols]` of bf16 bits.
pub struct DeviceMatrix {
    pub rows: usize,
    pub cols: usize,
    pub data: CudaSlice<u16>,
}

impl DeviceMatrix {
    pub fn ptr(&self, stream: &CudaStream) -> u64 {
        self.data.device_ptr(stream).0
    }

    pub fn bytes(&self) -> usize {
        self.rows * self.cols * 2
    }
}

/// One transformer block on the device.
pub struct DeviceLayer {
    pub attn_norm: CudaSlice<f32>,
    /// `[(n_heads + 2 n_kv) · head_dim, hidden]`.
    pub qkv: DeviceMatrix,
    pub wo: DeviceMatrix,
    pub ffn_norm: CudaSlice<f32>,
    /// `[2 · ffn, hidden]`: gate rows, then up rows.
    pub gate_up: DeviceMatrix,
    pub down: DeviceMatrix,
}

/// All weights of the model on the device.
pub struct DeviceWeights {
    pub embedding: DeviceMatrix,
    pub layers: Vec<DeviceLayer>,
    pub output_norm: CudaSlice<f32>,
    /// `None` when tied to the embedding.
    pub lm_head: Option<DeviceMatrix>,
}

impl DeviceWeights {
    pub fn lm_head(&self) -> &DeviceMatrix {
        self.lm_head.as_ref().unwrap_or(&self.embedding)
    }

    /// Bytes one decode step streams: every matrix once (the embedding only as the lm_head when tied).
    pub fn matrix_bytes(&self) -> usize {
        let layer = |l: &DeviceLayer| l.qkv.bytes() + l.wo.bytes() + l.gate_up.bytes() + l.down.bytes();
        self.layers.iter().map(layer).sum::<usize>() + self.lm_head().bytes()
    }

    /// Loads every tensor of `model` onto the device, or with `shard` only what that tensor-parallel rank holds
    /// (the lm_head is then its vocabulary rows, sliced from the embedding when tied).
    pub fn load(model: &ModelFiles, stream: &Arc<CudaStream>, shard: Option<&ShardSpec>) -> Result<Self, ModelError> {
        let c = &model.config;
        let mut loader = Loader::new(model, stream, shard);
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            layers.push(DeviceLayer {
                attn_norm: loader.vector(LlamaTensor::AttnNorm(l))?,
                qkv: loader.matrix(&[LlamaTensor::Wq(l), LlamaTensor::Wk(l), LlamaTensor::Wv(l)])?,
                wo: loader.matrix(&[LlamaTensor::Wo(l)])?,
                ffn_norm: loader.vector(LlamaTensor::FfnNorm(l))?,
                gate_up: loader.matrix(&[LlamaTensor::Gate(l), LlamaTensor::Up(l)])?,
                down: loader.matrix(&[LlamaTensor::Down(l)])?,
            });
        }
        let lm_head = match (c.tie_word_embeddings, shard) {
            (true, None) => None,
            (true, Some(_)) => Some(loader.matrix_as(LlamaTensor::TokenEmbedding, LlamaTensor::LmHead)?),
            (false, _) => Some(loader.matrix(&[LlamaTensor::LmHead])?),
        };
        let weights = Self {
            embedding: loader.matrix(&[LlamaTensor::TokenEmbedding])?,
            layers,
            output_norm: loader.vector(LlamaTensor::OutputNorm)?,
            lm_head,
        };
        loader.finish();
        Ok(weights)
    }

    /// Random weights generated on the device (benchmarks): matrices uniform in ±`scale`·√3 (std `scale`), norms
    /// near 1. Same seed, same weights. With `lm_rows` (a tensor-parallel rank's vocabulary rows) the lm_head is a
    /// separate matrix of that many rows.
    pub fn random(c: &LlamaConfig, kernels: &CudaKernels, seed: u64, lm_rows: Option<usize>) -> Result<Self, CudaError> {
        let stream = kernels.stream();
        let mut next_seed = seed;
        let mut matrix = |rows: usize, cols: usize| -> Result<DeviceMatrix, CudaError> {
            // SAFETY: the buffer is filled by the kernel below before any read.
            let data = unsafe { stream.alloc::<u16>(rows * cols) }?;
            next_seed = next_seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let ptr = data.device_ptr(stream).0;
            // SAFETY: `data` holds rows·cols bf16.
            unsafe { kernels.fill_random_bf16(ptr, rows * cols, next_seed, 0.02 * 3f32.sqrt(), 0.0) }?;
            Ok(DeviceMatrix { rows, cols, data })
        };
        let (h, hd, ffn) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let qkv_rows = (c.num_heads + 2 * c.num_kv_heads) * hd;
        let mut layers = Vec::with_capacity(c.num_layers);
        let norm = |stream: &Arc<CudaStream>| -> Result<CudaSlice<f32>, CudaError> {
            let v: Vec<f32> = (0..h).map(|i| 1.0 + 0.01 * ((i % 7) as f32 - 3.0)).collect();
            Ok(stream.clone_htod(&v)?)
        };
        for _ in 0..c.num_layers {
            layers.push(DeviceLayer {
                attn_norm: norm(stream)?,
                qkv: matrix(qkv_rows, h)?,
                wo: matrix(h, c.num_heads * hd)?,
                ffn_norm: norm(stream)?,
                gate_up: matrix(2 * ffn, h)?,
                down: matrix(h, ffn)?,
            });
        }
        let embedding = matrix(c.vocab_size, h)?;
        let lm_head = match lm_rows {
            Some(rows) => Some(matrix(rows, h)?),
            None if c.tie_word_embeddings => None,
            None => Some(matrix(c.vocab_size, h)?),
        };
        let output_norm = norm(stream)?;
        kernels.check()?;
        Ok(Self { embedding, layers, output_norm, lm_head })
    }
}

/// Streams tensors to the device with bounded host staging and progress logging.
struct Loader<'a> {
    model: &'a ModelFiles,
    stream: &'a Arc<CudaStream>,
    shard: Option<&'a ShardSpec>,
    staging: Vec<u16>,
    scratch: Vec<f32>,
    total: usize,
    done: usize,
    next_report: usize,
    started: Instant,
    /// A progress bar on an interactive terminal (a single GPU); otherwise progress is logged every 10 %.
    bar: Option<indicatif::ProgressBar>,
}

impl<'a> Loader<'a> {
    fn new(model: &'a ModelFiles, stream: &'a Arc<CudaStream>, shard: Option<&'a ShardSpec>) -> Self {
        let mut this = Self {
            model,
            stream,
            shard,
            staging: Vec::new(),
            scratch: Vec::new(),
            total: 0,
            done: 0,
            next_report: 10,
            started: Instant::now(),
            bar: None,
        };
        // Bytes read from the file: a shard reads its rows whole (column slices included), so count rows.
        this.total = LlamaTensor::all(&model.config)
            .into_iter()
            .filter_map(|t| model.weight(t).ok().map(|w| (t, w)))
            .map(|(t, w)| {
                let rows = w.shape.first().copied().unwrap_or(1).max(1);
                w.data.len() / rows * this.part(t, &w).0.len().min(rows)
            })
            .sum::<usize>();
        if let (Some(s), true, Ok(e)) = (shard, model.config.tie_word_embeddings, model.weight(LlamaTensor::TokenEmbedding)) {
            this.total += e.data.len() / e.shape[0].max(1) * s.vocab.len(); // the lm_head slice of the tied embedding
        }
        tracing::info!(path = %model.path.display(), mib = this.total >> 20, rank = shard.map(|s| s.rank), "loading weights to the GPU");
        // Tensor-parallel ranks load concurrently: their bars would overwrite each other, so they log instead.
        if shard.is_none() && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            let bar = indicatif::ProgressBar::new(this.total as u64);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "loading weights [{bar:40}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            this.bar = Some(bar);
        }
        this
    }

    /// The (rows, columns) of `role`'s full `[out, in]` matrix this rank loads (see [`ShardSpec::part`]).
    fn part(&self, role: LlamaTensor, v: &WeightView<'_>) -> (Range<usize>, Range<usize>) {
        let (rows, cols) = (v.shape[0], v.shape.get(1).copied().unwrap_or(1));
        match self.shard {
            Some(s) => s.part(role, rows, cols, self.model.config.head_dim),
            None => (0..rows, 0..cols),
        }
    }

    fn device_err(&self, e: impl std::fmt::Display) -> ModelError {
        ModelError::InvalidConfig { path: self.model.path.clone(), detail: format!("GPU upload: {e}") }
    }

    fn progress(&mut self, bytes: usize) {
        self.done += bytes;
        if let Some(bar) = &self.bar {
            bar.set_position(self.done as u64);
            return;
        }
        let pct = self.done * 100 / self.total.max(1);
        if pct >= self.next_report {
            let secs = self.started.elapsed().as_secs_f64();
            tracing::info!("loading weights: {pct:>3} % ({} MiB, {:.0} MiB/s)", self.done >> 20, (self.done >> 20) as f64 / secs.max(1e-3));
            self.next_report = pct / 10 * 10 + 10;
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        tracing::info!("weights loaded in {:.1} s", self.started.elapsed().as_secs_f64());
    }

    /// Stacks this rank's part of each of `roles` (rows of column-parallel ones, columns of row-parallel ones) into
    /// one bf16 device matrix.
    fn matrix(&mut self, roles: &[LlamaTensor]) -> Result<DeviceMatrix, ModelError> {
        let parts = roles.iter().map(|&r| Ok((self.model.weight(r)?, r))).collect::<Result<Vec<_>, ModelError>>()?;
        self.stack(parts)
    }

    /// The tensor `file` sliced as if it were `role` (the tied embedding as the lm_head).
    fn matrix_as(&mut self, file: LlamaTensor, role: LlamaTensor) -> Result<DeviceMatrix, ModelError> {
        let v = self.model.weight(file)?;
        self.stack(vec![(v, role)])
    }

    fn stack(&mut self, parts: Vec<(WeightView<'a>, LlamaTensor)>) -> Result<DeviceMatrix, ModelError> {
        let slices: Vec<_> = parts.iter().map(|(v, role)| self.part(*role, v)).collect();
        let cols = slices[0].1.len();
        let rows: usize = slices.iter().map(|s| s.0.len()).sum();
        // SAFETY: every element is written by the uploads below before the matrix is used.
        let mut data = unsafe { self.stream.alloc::<u16>(rows * cols) }.map_err(|e| self.device_err(e))?;
        let mut offset = 0;
        for ((v, _), (r, c)) in parts.iter().zip(slices) {
            self.upload(v, r.clone(), c, &mut data, offset)?;
            offset += r.len() * cols;
        }
        Ok(DeviceMatrix { rows, cols, data })
    }

    /// Uploads rows `rows` × columns `cols` of `v` to `dst` at element `offset` (dense, `cols.len()` per row).
    fn upload(
        &mut self,
        v: &WeightView<'a>,
        rows: Range<usize>,
        cols: Range<usize>,
        dst: &mut CudaSlice<u16>,
        offset: usize,
    ) -> Result<(), ModelError> {
        let path = &self.model.path;
        let full = v.shape[1];
        let row_bytes = v.dtype.bytes_for(full).ok_or_else(|| ModelError::Malformed {
            path: path.clone(),
            detail: format!("tensor `{}`: {full} columns are not whole {} blocks", v.name, v.dtype),
        })?;
        if rows.end > v.shape[0] || cols.end > full {
            return Err(ModelError::Malformed { path: path.clone(), detail: format!("tensor `{}` is smaller than its shard", v.name) });
        }
        let width = cols.len();
        let rows_per_chunk = (CHUNK_ELEMS / full).max(1);
        let mut r = rows.start;
        while r < rows.end {
            let n = rows_per_chunk.min(rows.end - r);
            let bytes = &v.data[r * row_bytes..(r + n) * row_bytes];
            self.staging.clear();
            if v.dtype == GgmlType::BF16 {
                for row in bytes.chunks_exact(row_bytes) {
                    let row = &row[cols.start * 2..cols.end * 2];
                    self.staging.extend(row.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])));
                }
            } else {
                self.scratch.resize(n * full, 0.0);
                dequantize_row(v.dtype, bytes, &mut self.scratch).map_err(|_| ModelError::dtype(path, &v.name, v.dtype))?;
                for row in self.scratch.chunks_exact(full) {
                    self.staging.extend(row[cols.clone()].iter().map(|&x| bf16::from_f32(x).to_bits()));
                }
            }
            let start = offset + (r - rows.start) * width;
            let mut view = dst.slice_mut(start..start + n * width);
            self.stream.memcpy_htod(&self.staging, &mut view).map_err(|e| self.device_err(e))?;
            // The staging buffer is reused: wait until the copy has read it.
            self.stream.synchronize().map_err(|e| self.device_err(e))?;
            self.progress(bytes.len());
            r += n;
        }
        Ok(())
    }

    fn vector(&mut self, role: LlamaTensor) -> Result<CudaSlice<f32>, ModelError> {
        let v = self.model.weight(role)?;
        let n = v.shape.iter().product::<usize>();
        let mut host = vec![0f32; n];
        dequantize_row(v.dtype, &v.data, &mut host).map_err(|_| ModelError::dtype(&self.model.path, &v.name, v.dtype))?;
        self.progress(v.data.len());
        self.stream.clone_htod(&host).map_err(|e| self.device_err(e))
    }
}
