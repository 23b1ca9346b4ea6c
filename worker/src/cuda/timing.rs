//! Device-event timing: the start-up tuner's measurements, and the per-part decode timings `ferrite gpu-bench`
//! reports next to whole steps (linear layers alone, attention alone).

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaSlice, DevicePtr};
use ferrite_kernels::cuda::{AttentionShape, CudaError};

use super::CudaBackend;

/// Runs `f` this many times per measurement.
pub(super) const REPS: usize = 20;

/// Decode attention metadata on the device: `rows` rows at `ctx` positions each, every row on its own blocks
/// (1, 2, ... in order; block 0 stays reserved), and the eager step's partitioning.
pub(super) struct DecodeAttentionMeta {
    _buffer: CudaSlice<i32>,
    pub table_off: u64,
    pub ctx_len: u64,
    pub tables: u64,
    pub shape: AttentionShape,
}

impl CudaBackend {
    /// Milliseconds for `REPS` runs of `f` (device events, after one warm-up run). Run `i` calls `f(i)`, so a
    /// caller can rotate through operands (the linear-layer tuner streams a different layer's weights each run,
    /// as a step does, instead of timing one matrix that stays in L2).
    pub(super) fn time_reps(&self, f: &dyn Fn(usize) -> Result<(), CudaError>) -> Result<f32, CudaError> {
        let st = &self.stream;
        let ctx = st.context();
        f(REPS)?;
        let (a, b) = (ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?, ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?);
        a.record(st)?;
        for i in 0..REPS {
            f(i)?;
        }
        b.record(st)?;
        b.synchronize()?;
        Ok(a.elapsed_ms(&b)?)
    }

    /// [`DecodeAttentionMeta`] for `rows` rows at `ctx` positions (the caller keeps `rows · ⌈ctx / block⌉ + 1` within
    /// the cache).
    pub(super) fn decode_attention_meta(&self, rows: usize, ctx: usize) -> Result<DecodeAttentionMeta, CudaError> {
        let blocks = ctx.div_ceil(self.block_size);
        let mut meta: Vec<i32> = Vec::new();
        meta.extend((0..rows).map(|r| (r * blocks) as i32)); // table offsets
        meta.extend((0..rows).map(|_| ctx as i32)); // context lengths
        meta.extend((0..rows * blocks).map(|b| 1 + b as i32)); // block tables
        let buffer = self.stream.clone_htod(&meta)?;
        let base = buffer.device_ptr(&self.stream).0;
        let (part_size, num_parts) = self.eager_parts(rows, rows, ctx);
        Ok(DecodeAttentionMeta {
            table_off: base,
            ctx_len: base + (rows * 4) as u64,
            tables: base + (2 * rows * 4) as u64,
            shape: self.attention_shape(rows, rows, part_size, num_parts),
            _buffer: buffer,
        })
    }

    /// Milliseconds (device events, median of 5) for just the linear layers of one decode step of `rows` rows:
    /// every layer's QKV, o_proj, gate/up and down, then the lm_head, through the same routing as a step.
    pub fn time_decode_linears(&self, rows: usize) -> Result<f64, CudaError> {
        let c = &self.config;
        let st = &self.stream;
        let sc = &self.scratch;
        let lm_rows = self.weights.lm_head().rows;
        let rows = rows.min(sc.rows).min(sc.logit_rows());
        let (h, act) = (sc.h.device_ptr(st).0, sc.act.device_ptr(st).0);
        // SAFETY: h and act hold scratch.rows rows of their widths.
        unsafe {
            self.kernels.fill_random_bf16(h, sc.h.len(), 3, 1.0, 0.0)?;
            self.kernels.fill_random_bf16(act, sc.act.len(), 4, 1.0, 0.0)?;
        }
        let (qkv, proj, gate_up, logits) =
            (sc.qkv.device_ptr(st).0, sc.proj.device_ptr(st).0, sc.gate_up.device_ptr(st).0, sc.logits.device_ptr(st).0);
        let (hd, hidden, ffn) = (c.head_dim, c.hidden_size, c.intermediate_size);
        let qkv_width = (c.num_heads + 2 * c.num_kv_heads) * hd;
        let step = || -> Result<(), CudaError> {
            // SAFETY: every operand is a scratch buffer sized for ≥ rows rows of its width, or a weight.
            unsafe {
                for lw in &self.weights.layers {
                    self.linear(h, lw.qkv.ptr(st), qkv, rows, hidden, qkv_width)?;
                    self.linear(act, lw.wo.ptr(st), proj, rows, c.num_heads * hd, hidden)?;
                    self.linear(h, lw.gate_up.ptr(st), gate_up, rows, hidden, 2 * ffn)?;
                    self.linear(act, lw.down.ptr(st), proj, rows, ffn, hidden)?;
                }
                self.linear(h, self.weights.lm_head().ptr(st), logits, rows, hidden, lm_rows)
            }
        };
        self.median_of_5(&step)
    }

    /// Milliseconds (device events, median of 5) for the rest of one decode step's kernels, everything but the
    /// linear layers and attention: the embedding gather, every layer's two add + RMSNorm, RoPE + K/V write and
    /// SiLU·up, the final norm and the greedy argmax, launched back to back as in a step. A step minus its linear
    /// layers, attention and this is mostly what the boundaries between them cost (what programmatic launch and
    /// fusion can win), plus the host's share of the step. For benchmarks: it writes K/V rows into the cache.
    pub fn time_decode_other_kernels(&self, rows: usize) -> Result<f64, CudaError> {
        let c = &self.config;
        let st = &self.stream;
        let sc = &self.scratch;
        let rows = rows.min(sc.rows).min(sc.logit_rows());
        let (hd, nh, nkv, hidden, ffn) = (c.head_dim, c.num_heads, c.num_kv_heads, c.hidden_size, c.intermediate_size);
        let qkv_width = (nh + 2 * nkv) * hd;
        let slots_per_layer = self.num_blocks * self.block_size;
        // tokens | positions | slots | final-norm row ids: every row at position 1023 of its own slot.
        let mut meta: Vec<i32> = (0..rows).map(|r| (r % c.vocab_size) as i32).collect();
        meta.extend((0..rows).map(|_| 1023));
        meta.extend((0..rows).map(|r| (self.block_size + r % (slots_per_layer - self.block_size)) as i32));
        meta.extend((0..rows).map(|r| r as i32));
        let buffer = st.clone_htod(&meta)?;
        let base = buffer.device_ptr(st).0;
        let at = |k: usize| base + (k * rows * 4) as u64;
        let (x, h, qkv, proj) = (sc.x.device_ptr(st).0, sc.h.device_ptr(st).0, sc.qkv.device_ptr(st).0, sc.proj.device_ptr(st).0);
        let (gate_up, act, logits, ids) =
            (sc.gate_up.device_ptr(st).0, sc.act.device_ptr(st).0, sc.logits.device_ptr(st).0, sc.ids.device_ptr(st).0);
        let (k_base, v_base, inv_freq) = (self.k_cache.device_ptr(st).0, self.v_cache.device_ptr(st).0, self.inv_freq.device_ptr(st).0);
        let w = &self.weights;
        let k = &self.kernels;
        let interleaved = c.rope_style == ferrite_common::config::RopeStyle::Interleaved;
        let layer_bytes = (slots_per_layer * nkv * hd * 2) as u64;
        let lm_rows = w.lm_head().rows;
        let step = || -> Result<(), CudaError> {
            // SAFETY: every scratch buffer holds ≥ rows rows of its width; the metadata holds rows entries per array
            // with tokens < vocab, slots inside each layer's cache and row ids < rows; weights are live.
            unsafe {
                k.embed_gather(w.embedding.ptr(st), at(0), x, rows, hidden, c.vocab_size)?;
                for (layer, lw) in w.layers.iter().enumerate() {
                    let add = if layer == 0 { 0 } else { proj };
                    k.add_rms_norm(x, add, lw.attn_norm.device_ptr(st).0, h, 0, rows, hidden, c.rms_norm_eps)?;
                    let off = layer as u64 * layer_bytes;
                    k.rope_kv_write(
                        qkv,
                        at(1),
                        inv_freq,
                        k_base + off,
                        v_base + off,
                        at(2),
                        rows,
                        nh,
                        nkv,
                        hd,
                        qkv_width,
                        interleaved,
                        slots_per_layer,
                    )?;
                    k.add_rms_norm(x, proj, lw.ffn_norm.device_ptr(st).0, h, 0, rows, hidden, c.rms_norm_eps)?;
                    k.silu_mul(gate_up, act, rows, ffn)?;
                }
                k.add_rms_norm(x, proj, w.output_norm.device_ptr(st).0, h, at(3), rows, hidden, c.rms_norm_eps)?;
                k.argmax_rows(logits, ids, 0, rows, lm_rows)
            }
        };
        self.median_of_5(&step)
    }

    /// Milliseconds (device events, median of 5) for just the attention of one decode step: every layer's paged
    /// attention (and partition reduce) for `rows` rows at `ctx` positions, each row on its own blocks, through the
    /// kernel a step of `rows` rows uses. None when the cache holds too few blocks.
    pub fn time_decode_attention(&self, rows: usize, ctx: usize) -> Result<Option<f64>, CudaError> {
        let c = &self.config;
        if rows == 0 || rows > self.scratch.rows || rows * ctx.div_ceil(self.block_size) + 1 > self.num_blocks {
            return Ok(None);
        }
        let meta = self.decode_attention_meta(rows, ctx)?;
        let st = &self.stream;
        let sc = &self.scratch;
        let (qkv, attn) = (sc.qkv.device_ptr(st).0, sc.attn.device_ptr(st).0);
        let (part_out, part_ml) = (sc.part_out.device_ptr(st).0, sc.part_ml.device_ptr(st).0);
        let layer_bytes = (self.num_blocks * self.block_size * c.num_kv_heads * c.head_dim * 2) as u64;
        let (k_base, v_base) = (self.k_cache.device_ptr(st).0, self.v_cache.device_ptr(st).0);
        let step = || -> Result<(), CudaError> {
            for layer in 0..c.num_layers as u64 {
                let (kc, vc) = (k_base + layer * layer_bytes, v_base + layer * layer_bytes);
                // SAFETY: qkv holds ≥ rows rows; every table entry names a block inside each layer's cache; attn,
                // part_out and part_ml are the step scratch sized for these partitions (eager_parts).
                unsafe {
                    self.kernels.paged_attention(
                        &meta.shape,
                        qkv,
                        kc,
                        vc,
                        meta.tables,
                        meta.table_off,
                        meta.ctx_len,
                        attn,
                        part_out,
                        part_ml,
                    )
                }?;
            }
            Ok(())
        };
        self.median_of_5(&step).map(Some)
    }

    /// Milliseconds of one run of `f` (device events): the median of 5, after one warm-up run.
    fn median_of_5(&self, f: &dyn Fn() -> Result<(), CudaError>) -> Result<f64, CudaError> {
        let st = &self.stream;
        let ctx = st.context();
        f()?;
        let mut times = Vec::new();
        for _ in 0..5 {
            let (a, b) = (ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?, ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?);
            a.record(st)?;
            f()?;
            b.record(st)?;
            b.synchronize()?;
            times.push(f64::from(a.elapsed_ms(&b)?));
        }
        times.sort_by(f64::total_cmp);
        Ok(times[2])
    }
}
