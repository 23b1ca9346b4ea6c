//! One forward step on the device, in three parts shared by eager execution and CUDA-graph capture:
//! [`Layout`] (where the step's metadata lives on the device and how attention is split), [`CudaBackend::launch`]
//! (all device work up to the final norm), and [`CudaBackend::launch_logits`] (lm_head GEMM and device argmax for a
//! range of logit rows).

use cudarc::driver::{CudaSlice, DevicePtr};
use ferrite_common::config::RopeStyle;
use ferrite_kernels::cuda::{AttentionShape, CudaError};

use super::CudaBackend;
use crate::backend::{ForwardBatch, LogitsWanted};

/// A sequence with at least this many new rows in a step takes the prefill attention (flash-style on tensor cores,
/// or dense through cuBLAS; see `tune`).
pub(super) const DENSE_MIN_ROWS: usize = 16;
/// Keys per attention partition, at least (shorter partitions cost more in the reduce than they gain).
const MIN_PART_SIZE: usize = 128;

/// One row of a step: (sequence, position, token, wants logits).
pub(super) type Row = (usize, usize, u32, bool);

/// Device addresses of a step's metadata (`n` rows, `picked` logit rows) and its attention plan.
pub(super) struct Layout {
    pub n: usize,
    pub picked: usize,
    pub tokens: u64,
    pub pos: u64,
    pub slots: u64,
    pub table_off: u64,
    pub ctx_len: u64,
    pub picked_rows: u64,
    pub tables: u64,
    pub shape: AttentionShape,
    /// Rows attended by the paged kernel (the rest take the dense path).
    pub paged_rows: usize,
    /// Dense-path chunks: (first row, rows, start position, device address of the sequence's block table).
    pub dense: Vec<(usize, usize, usize, u64)>,
}

impl Layout {
    /// Addresses of the packed metadata `tokens | pos | slots | table_off | ctx_len | picked | tables` at `base`.
    pub fn packed(base: u64, n: usize, picked: usize, shape: AttentionShape) -> Self {
        let at = |k: usize| base + (k * n * 4) as u64;
        Self {
            n,
            picked,
            tokens: at(0),
            pos: at(1),
            slots: at(2),
            table_off: at(3),
            ctx_len: at(4),
            picked_rows: at(5),
            tables: at(5) + (picked * 4) as u64,
            shape,
            paged_rows: n,
            dense: Vec::new(),
        }
    }
}

/// Every row of `batch`, in batch order.
pub(super) fn batch_rows(batch: &ForwardBatch<'_>) -> Vec<Row> {
    let mut rows = Vec::new();
    for (s, seq) in batch.seqs.iter().enumerate() {
        let n = seq.tokens.len();
        for (i, &tok) in seq.tokens.iter().enumerate() {
            let want = match seq.logits {
                LogitsWanted::None => false,
                LogitsWanted::Last => i + 1 == n,
                LogitsWanted::All => true,
            };
            rows.push((s, seq.start_pos + i, tok, want));
        }
    }
    rows
}

impl CudaBackend {
    /// The attention launch of `n` rows, `paged_rows` of them on the paged kernels (the rest dense): the
    /// tensor-core kernel from the row count where start-up tuning found it faster (`tune::tune_attention`).
    pub(super) fn attention_shape(&self, n: usize, paged_rows: usize, part_size: usize, num_parts: usize) -> AttentionShape {
        let c = &self.config;
        AttentionShape {
            rows: n,
            n_heads: c.num_heads,
            n_kv: c.num_kv_heads,
            head_dim: c.head_dim,
            row_stride: (c.num_heads + 2 * c.num_kv_heads) * c.head_dim,
            block_size: self.block_size,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
            part_size,
            num_parts,
            tensor_cores: paged_rows >= self.attention_tc_from,
        }
    }

    /// (partition size, partitions) of an eager step's paged attention over `n` rows, `paged_rows` of them paged,
    /// the longest context `max_ctx`: split long contexts only when rows × KV heads leave the GPU idle.
    pub(super) fn eager_parts(&self, n: usize, paged_rows: usize, max_ctx: usize) -> (usize, usize) {
        let c = &self.config;
        let want_blocks = 8 * self.num_sms;
        let mut num_parts = want_blocks.div_ceil(paged_rows.max(1) * c.num_kv_heads).clamp(1, max_ctx.div_ceil(MIN_PART_SIZE).max(1));
        num_parts = num_parts.min((self.scratch.part_out.len() / (n * c.num_heads * c.head_dim)).max(1));
        (max_ctx.div_ceil(num_parts), num_parts)
    }

    /// Packs and uploads the metadata of an eager sub-step (`rows` of `batch`; `tables`/`table_off` cover every
    /// sequence of the batch) and plans its attention.
    pub(super) fn encode_eager(
        &mut self,
        batch: &ForwardBatch<'_>,
        rows: &[Row],
        tables: &[i32],
        table_off: &[i32],
    ) -> Result<Layout, CudaError> {
        let n = rows.len();
        // Sequences whose chunk takes the dense prefill path: (first row, rows, start position, sequence).
        let mut dense: Vec<(usize, usize, usize, usize)> = Vec::new();
        let mut r = 0;
        while r < n {
            let s = rows[r].0;
            let len = rows[r..].iter().take_while(|x| x.0 == s).count();
            if len >= DENSE_MIN_ROWS && (self.prefill_tc || rows[r].1 + len <= self.prefill_ws.max_ctx) {
                dense.push((r, len, rows[r].1, s));
            }
            r += len;
        }
        let is_dense = |i: usize| dense.iter().any(|&(r0, len, _, _)| (r0..r0 + len).contains(&i));
        let picked: Vec<i32> = rows.iter().enumerate().filter(|(_, r)| r.3).map(|(i, _)| i as i32).collect();

        let bs = self.block_size;
        let m = &mut self.meta_host;
        m.clear();
        m.extend(rows.iter().map(|r| r.2 as i32));
        m.extend(rows.iter().map(|r| r.1 as i32));
        m.extend(rows.iter().map(|&(s, pos, _, _)| {
            let table = batch.seqs[s].block_table;
            (table[pos / bs] as usize * bs + pos % bs) as i32
        }));
        m.extend(rows.iter().map(|r| table_off[r.0]));
        // ctx_len 0 marks a dense row: the paged kernel skips it.
        m.extend(rows.iter().enumerate().map(|(i, r)| if is_dense(i) { 0 } else { r.1 as i32 + 1 }));
        m.extend(&picked);
        m.extend(tables);
        if self.meta.len() < m.len() {
            self.meta = self.stream.alloc_zeros::<i32>(m.len().next_power_of_two())?;
        }
        self.stream.memcpy_htod(m.as_slice(), &mut self.meta.slice_mut(..m.len()))?;

        let paged_rows = n - dense.iter().map(|d| d.1).sum::<usize>();
        let max_ctx = rows.iter().enumerate().filter(|&(i, _)| !is_dense(i)).map(|(_, r)| r.1 + 1).max().unwrap_or(1);
        let (part_size, num_parts) = self.eager_parts(n, paged_rows, max_ctx);
        let shape = self.attention_shape(n, paged_rows, part_size, num_parts);

        let base = self.meta.device_ptr(&self.stream).0;
        let mut layout = Layout::packed(base, n, picked.len(), shape);
        layout.paged_rows = paged_rows;
        layout.dense =
            dense.into_iter().map(|(r0, len, start, s)| (r0, len, start, layout.tables + (table_off[s] as usize * 4) as u64)).collect();
        Ok(layout)
    }

    fn ptr_f32(&self, s: &CudaSlice<f32>) -> u64 {
        s.device_ptr(&self.stream).0
    }

    fn ptr_u16(&self, s: &CudaSlice<u16>) -> u64 {
        s.device_ptr(&self.stream).0
    }

    /// All device work of a step up to the final norm: afterwards `scratch.h` holds the `l.picked` normed rows.
    /// Enqueues only (no host synchronization, no allocation), so it can be captured into a CUDA graph.
    pub(super) fn launch(&self, l: &Layout) -> Result<(), CudaError> {
        let c = &self.config;
        let n = l.n;
        let (hidden, hd, nh, nkv, ffn) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads, c.intermediate_size);
        let (q_width, kv_width) = (nh * hd, nkv * hd);
        let qkv_width = q_width + 2 * kv_width;
        let slots_per_layer = self.num_blocks * self.block_size;
        let sc = &self.scratch;
        let (x, h, qkv, attn) = (self.ptr_f32(&sc.x), self.ptr_u16(&sc.h), self.ptr_f32(&sc.qkv), self.ptr_u16(&sc.attn));
        let (proj, gate_up, act) = (self.ptr_f32(&sc.proj), self.ptr_f32(&sc.gate_up), self.ptr_u16(&sc.act));
        let (part_out, part_ml) = (self.ptr_f32(&sc.part_out), self.ptr_f32(&sc.part_ml));
        let inv_freq = self.ptr_f32(&self.inv_freq);
        let (k_base, v_base) = (self.ptr_u16(&self.k_cache), self.ptr_u16(&self.v_cache));
        let interleaved = c.rope_style == RopeStyle::Interleaved;
        let (k, g, w) = (&self.kernels, &self.gemm, &self.weights);
        // SAFETY: every call below passes buffers sized for its rows (see the block's SAFETY note).
        let lin = |x, wt, y, rows, i, o| unsafe { self.linear(x, wt, y, rows, i, o) };
        let st = &self.stream;

        // SAFETY: (every launch below) each buffer was allocated for `scratch.rows ≥ n` rows of its width (or for the
        // whole model / cache); the metadata at `l` holds n entries per array and block tables validated against
        // num_blocks (validate_batch, or padding rows pointing at block 0); all work is ordered on one stream.
        unsafe {
            k.embed_gather(self.ptr_u16(&w.embedding.data), l.tokens, x, n, hidden, c.vocab_size)?;
            for (layer, lw) in w.layers.iter().enumerate() {
                let add = if layer == 0 { 0 } else { proj };
                k.add_rms_norm(x, add, self.ptr_f32(&lw.attn_norm), h, 0, n, hidden, c.rms_norm_eps)?;
                lin(h, lw.qkv.ptr(st), qkv, n, hidden, qkv_width)?;
                let layer_off = (layer * slots_per_layer * kv_width * 2) as u64;
                let (kc, vc) = (k_base + layer_off, v_base + layer_off);
                k.rope_kv_write(qkv, l.pos, inv_freq, kc, vc, l.slots, n, nh, nkv, hd, qkv_width, interleaved, slots_per_layer)?;
                if l.paged_rows > 0 {
                    k.paged_attention(&l.shape, qkv, kc, vc, l.tables, l.table_off, l.ctx_len, attn, part_out, part_ml)?;
                }
                for &(r0, len, start, table) in &l.dense {
                    let qkv_r = qkv + (r0 * qkv_width * 4) as u64;
                    let out = attn + (r0 * q_width * 2) as u64;
                    if self.prefill_tc {
                        k.prefill_attention_tc(&l.shape, qkv_r, len, start, kc, vc, table, out)?;
                    } else {
                        k.prefill_attention(g, &self.prefill_ws, &l.shape, qkv_r, len, start, kc, vc, table, out)?;
                    }
                }
                lin(attn, lw.wo.ptr(st), proj, n, q_width, hidden)?;
                if let Some(t) = &self.tp {
                    t.comm.all_reduce_sum_device(proj, n * hidden)?;
                }
                k.add_rms_norm(x, proj, self.ptr_f32(&lw.ffn_norm), h, 0, n, hidden, c.rms_norm_eps)?;
                lin(h, lw.gate_up.ptr(st), gate_up, n, hidden, 2 * ffn)?;
                k.silu_mul(gate_up, act, n, ffn)?;
                lin(act, lw.down.ptr(st), proj, n, ffn, hidden)?;
                if let Some(t) = &self.tp {
                    t.comm.all_reduce_sum_device(proj, n * hidden)?;
                }
            }
            // Final residual add and norm, only for the rows that want logits (gathered densely into h).
            k.add_rms_norm(x, proj, self.ptr_f32(&w.output_norm), h, l.picked_rows, l.picked, hidden, c.rms_norm_eps)?;
        }
        Ok(())
    }

    /// lm_head for normed rows `first .. first + rows` of `scratch.h` into `scratch.logits`, then (with `argmax`)
    /// the greedy ids into `scratch.ids`. `rows` is at most the logits buffer's row capacity. A tensor-parallel
    /// rank computes its vocabulary slice and, with `argmax`, also the maxima, and gathers every rank's (id, value)
    /// pairs (in CUDA graphs too).
    pub(super) fn launch_logits(&self, first: usize, rows: usize, argmax: bool) -> Result<(), CudaError> {
        let c = &self.config;
        let sc = &self.scratch;
        let lm = self.weights.lm_head();
        let cap = sc.logit_rows();
        debug_assert!(rows <= cap && rows * lm.rows <= sc.logits.len());
        let h = self.ptr_u16(&sc.h) + (first * c.hidden_size * 2) as u64;
        let logits = self.ptr_f32(&sc.logits);
        let ids = sc.ids.device_ptr(&self.stream).0;
        // SAFETY: h holds ≥ first + rows normed rows; logits rows·lm.rows f32; ids 2·cap i32 (ids, then values);
        // the gather buffer world·2·cap f32.
        unsafe {
            self.linear(h, lm.ptr(&self.stream), logits, rows, c.hidden_size, lm.rows)?;
            if argmax {
                let vals = if self.tp.is_some() { ids + (cap * 4) as u64 } else { 0 };
                self.kernels.argmax_rows(logits, ids, vals, rows, lm.rows)?;
                if let Some(t) = &self.tp {
                    t.comm.all_gather_device(ids, self.ptr_f32(&t.gather), 2 * cap * 4)?;
                }
            }
        }
        Ok(())
    }
}
