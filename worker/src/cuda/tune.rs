//! Start-up choices between attention kernels, timed on this device (device events) with the model's own shapes
//! (linear layers: `tune_linear`):
//! - paged attention: the CUDA-core kernel or the tensor-core one, timed at 1..64 decode rows over 1k-position
//!   contexts. The tensor-core kernel serves steps from the smallest timed row count where it is faster at that and
//!   every larger count, and only if its output agrees with the CUDA-core kernel's on the same inputs.
//! - prefill attention: dense through cuBLAS or the flash-style tensor-core kernel, timed on a 1k-row chunk; the
//!   latter only if faster and in agreement.

use std::sync::Arc;

use cudarc::driver::DevicePtr;
use ferrite_kernels::cuda::CudaError;

use super::step::DENSE_MIN_ROWS;
use super::timing::REPS;
use super::{CudaAttention, CudaBackend};

/// Decode row counts at which the attention kernels are compared.
const ATTENTION_ROWS: &[usize] = &[1, 2, 4, 8, 16, 32, 64];
/// Context of every row when the attention kernels are compared (less if the KV cache is smaller).
const ATTENTION_CTX: usize = 1024;
/// Largest relative difference between the two attention kernels' outputs that still counts as agreeing (both
/// round to bf16; the tensor-core kernel also rounds Q and the probabilities to bf16: ~3e-3 typical).
const ATTENTION_AGREE: f64 = 2e-2;
/// New rows of the prefill chunk on which the two prefill attention paths are compared.
const PREFILL_ROWS: usize = 1024;

impl CudaBackend {
    /// Chooses the attention kernels (see the module doc; `choice` can fix them): sets `attention_tc_from` (decode)
    /// and `prefill_tc`. Runs before the decode graphs are captured; uses layer 0 of the KV cache (filled with
    /// random values, zeroed again afterwards) and the step scratch buffers.
    pub(super) fn tune_attention(&mut self, choice: CudaAttention) -> Result<(), CudaError> {
        (self.attention_tc_from, self.prefill_tc) = (usize::MAX, false);
        if !self.kernels.has_tensor_cores() {
            tracing::info!(arch = self.kernels.arch(), "attention: CUDA-core decode kernel, cuBLAS prefill (no bf16 tensor cores)");
            return Ok(());
        }
        match choice {
            CudaAttention::Auto => {}
            CudaAttention::CudaCores => {
                tracing::info!("attention: CUDA-core decode kernel, cuBLAS prefill (configured)");
                return Ok(());
            }
            CudaAttention::TensorCores => {
                tracing::info!("attention: tensor-core decode and prefill kernels (configured)");
                (self.attention_tc_from, self.prefill_tc) = (1, true);
                return Ok(());
            }
        }
        let c = &self.config;
        let qkv_width = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim;
        let layer_elems = self.num_blocks * self.block_size * c.num_kv_heads * c.head_dim;
        let st = Arc::clone(&self.stream);
        let (kc, vc) = (self.k_cache.device_ptr(&st).0, self.v_cache.device_ptr(&st).0);
        // SAFETY: layer 0 of each cache holds layer_elems bf16.
        unsafe {
            self.kernels.fill_random_bf16(kc, layer_elems, 11, 1.0, 0.0)?;
            self.kernels.fill_random_bf16(vc, layer_elems, 12, 1.0, 0.0)?;
        }
        // Queries uniform in [-6, 6): scores spread over several units, so the softmax is peaked as in real models.
        let n_q = self.scratch.rows.min(PREFILL_ROWS.max(ATTENTION_ROWS[ATTENTION_ROWS.len() - 1])) * qkv_width;
        let q_host: Vec<f32> = (0..n_q).map(|i| (i.wrapping_mul(2_654_435_761) % 12_001) as f32 / 1000.0 - 6.0).collect();
        st.memcpy_htod(&q_host, &mut self.scratch.qkv.slice_mut(..n_q))?;
        let decode = self.compare_decode_attention(kc, vc);
        let prefill = self.compare_prefill_attention(kc, vc);
        // Layer 0 of the caches back to zeros.
        st.memset_zeros(&mut self.k_cache.slice_mut(..layer_elems))?;
        st.memset_zeros(&mut self.v_cache.slice_mut(..layer_elems))?;
        st.synchronize()?;
        match decode? {
            Err((rows, diff)) => {
                tracing::warn!(
                    rows,
                    diff,
                    "paged attention: the tensor-core kernel disagrees with the CUDA-core kernel; using the CUDA-core kernel"
                );
            }
            Ok(results) => {
                let mut from = usize::MAX;
                for &(rows, core, tc) in results.iter().rev() {
                    if tc >= core {
                        break;
                    }
                    from = rows;
                }
                self.attention_tc_from = from;
                tracing::info!(
                    timings = ?results,
                    tensor_cores_from_rows = from,
                    "paged attention: (rows, CUDA-core ms, tensor-core ms) for {REPS} launches; tensor cores from this row count"
                );
            }
        }
        match prefill? {
            None => tracing::info!("prefill attention: cuBLAS (the cache holds too few blocks to compare)"),
            Some(Err((rows, diff))) => {
                tracing::warn!(rows, diff, "prefill attention: the tensor-core kernel disagrees with the cuBLAS path; using cuBLAS");
            }
            Some(Ok((rows, blas, tc))) => {
                self.prefill_tc = tc < blas;
                tracing::info!(
                    rows,
                    cublas_ms = blas,
                    tensor_core_ms = tc,
                    flash = self.prefill_tc,
                    "prefill attention for {REPS} launches"
                );
            }
        }
        Ok(())
    }

    /// Times the CUDA-core and tensor-core paged kernels at each of `ATTENTION_ROWS` decode rows (over random K/V
    /// in layer 0 and the random queries in `scratch.qkv`): `(rows, CUDA-core ms, tensor-core ms)`, or the first
    /// row count where their outputs disagree, with the difference.
    #[allow(clippy::type_complexity)]
    fn compare_decode_attention(&self, kc: u64, vc: u64) -> Result<Result<Vec<(usize, f32, f32)>, (usize, f64)>, CudaError> {
        let c = &self.config;
        let (nh, hd) = (c.num_heads, c.head_dim);
        let bs = self.block_size;
        let st = &self.stream;
        let (qkv, attn) = (self.scratch.qkv.device_ptr(st).0, self.scratch.attn.device_ptr(st).0);
        let (part_out, part_ml) = (self.scratch.part_out.device_ptr(st).0, self.scratch.part_ml.device_ptr(st).0);
        let mut results = Vec::new();
        for &rows in ATTENTION_ROWS {
            // Each row reads its own blocks (block 0 stays reserved), as the rows of a real batch do.
            let blocks = ATTENTION_CTX.div_ceil(bs).min((self.num_blocks - 1) / rows);
            if rows > self.scratch.rows || blocks == 0 {
                break;
            }
            let meta = self.decode_attention_meta(rows, (blocks * bs).min(ATTENTION_CTX))?;
            let (table_off, ctx_len, tables) = (meta.table_off, meta.ctx_len, meta.tables);
            let mut shape = meta.shape;
            let mut outputs = Vec::new();
            let mut times = Vec::new();
            for tc in [false, true] {
                shape.tensor_cores = tc;
                let run = || -> Result<(), CudaError> {
                    // SAFETY: qkv holds ≥ rows rows; every table entry names a block of the cache (1..num_blocks);
                    // attn, part_out and part_ml are the step scratch sized for these partitions (eager_parts).
                    unsafe { self.kernels.paged_attention(&shape, qkv, kc, vc, tables, table_off, ctx_len, attn, part_out, part_ml) }
                };
                times.push(self.time_reps(&|_| run())?);
                outputs.push(self.attention_output(rows * nh * hd)?);
            }
            let diff = relative_difference(outputs[1].iter().zip(&outputs[0]).map(|(&a, &b)| (bf16_value(a), bf16_value(b))));
            if diff.is_nan() || diff > ATTENTION_AGREE {
                return Ok(Err((rows, diff)));
            }
            results.push((rows, times[0], times[1]));
        }
        Ok(Ok(results))
    }

    /// Times the dense cuBLAS prefill attention and the flash-style tensor-core kernel on one chunk of up to
    /// `PREFILL_ROWS` new rows from an empty context: `(rows, cuBLAS ms, tensor-core ms)`, the difference when
    /// their outputs disagree, or None when the cache or workspace is too small to compare.
    #[allow(clippy::type_complexity)]
    fn compare_prefill_attention(&self, kc: u64, vc: u64) -> Result<Option<Result<(usize, f32, f32), (usize, f64)>>, CudaError> {
        let c = &self.config;
        let bs = self.block_size;
        let ws = &self.prefill_ws;
        let n = PREFILL_ROWS.min(self.scratch.rows).min(ws.max_rows).min(ws.max_ctx).min((self.num_blocks - 1) * bs);
        if n < DENSE_MIN_ROWS {
            return Ok(None);
        }
        let st = &self.stream;
        let (qkv, attn) = (self.scratch.qkv.device_ptr(st).0, self.scratch.attn.device_ptr(st).0);
        let table: Vec<i32> = (0..n.div_ceil(bs)).map(|b| 1 + b as i32).collect();
        let table_d = st.clone_htod(&table)?;
        let tp = table_d.device_ptr(st).0;
        let shape = self.attention_shape(n, 0, n, 1);
        let mut outputs = Vec::new();
        let mut times = Vec::new();
        for tc in [false, true] {
            let run = || -> Result<(), CudaError> {
                // SAFETY: qkv holds ≥ n rows; the table names blocks 1.. of the cache covering n positions; attn holds
                // ≥ n output rows; the workspace holds max_rows ≥ n rows and max_ctx ≥ n positions.
                unsafe {
                    if tc {
                        self.kernels.prefill_attention_tc(&shape, qkv, n, 0, kc, vc, tp, attn)
                    } else {
                        self.kernels.prefill_attention(&self.gemm, ws, &shape, qkv, n, 0, kc, vc, tp, attn)
                    }
                }
            };
            times.push(self.time_reps(&|_| run())?);
            outputs.push(self.attention_output(n * c.num_heads * c.head_dim)?);
        }
        let diff = relative_difference(outputs[1].iter().zip(&outputs[0]).map(|(&a, &b)| (bf16_value(a), bf16_value(b))));
        if diff.is_nan() || diff > ATTENTION_AGREE {
            return Ok(Some(Err((n, diff))));
        }
        Ok(Some(Ok((n, times[0], times[1]))))
    }

    /// The first `n` bf16 values of the attention output scratch, on the host.
    fn attention_output(&self, n: usize) -> Result<Vec<u16>, CudaError> {
        let mut out = vec![0u16; n];
        self.stream.memcpy_dtoh(&self.scratch.attn.slice(..n), &mut out)?;
        Ok(out)
    }

    /// Whether prefill chunks attend with the flash-style tensor-core kernel (else dense through cuBLAS), as tuned
    /// at start-up.
    pub fn prefill_on_tensor_cores(&self) -> bool {
        self.prefill_tc
    }

    /// Paged attention over at least this many rows runs on tensor cores (`None`: never), as tuned at start-up.
    pub fn attention_tc_from(&self) -> Option<usize> {
        (self.attention_tc_from != usize::MAX).then_some(self.attention_tc_from)
    }
}

/// ‖a − b‖ / ‖b‖ over `(a, b)` pairs (infinite when `a` has a non-finite value).
fn relative_difference(pairs: impl Iterator<Item = (f64, f64)>) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for (x, y) in pairs {
        if !x.is_finite() {
            return f64::INFINITY;
        }
        num += (x - y) * (x - y);
        den += y * y;
    }
    if den == 0.0 { num.sqrt() } else { (num / den).sqrt() }
}

/// A bf16 bit pattern's value.
fn bf16_value(v: u16) -> f64 {
    f64::from(f32::from_bits(u32::from(v) << 16))
}
