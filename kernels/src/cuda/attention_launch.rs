//! Launchers of the attention kernels (`attention.cu`): paged attention for decode and mixed rows, and the two prefill
//! paths (dense through cuBLAS, flash-style on tensor cores). Split from `mod.rs` for size; the same `CudaKernels`.

// The launchers share the parent's launch helpers, shapes and constants.
use super::*;

impl CudaKernels {
    /// Paged attention (any mix of prefill and decode rows), then the partition reduce when `num_parts > 1`.
    ///
    /// # Safety
    /// `qkv` holds `rows · row_stride` f32; `tables`/`table_off`/`ctx_len` describe, per row, a block table whose
    /// blocks cover `ctx_len[r]` positions inside the caches; `out` holds `rows · n_heads · head_dim` bf16;
    /// `part_out` / `part_ml` (when `num_parts > 1`) hold `rows · n_heads · num_parts · head_dim` and
    /// `rows · n_heads · num_parts · 2` f32.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn paged_attention(
        &self,
        s: &AttentionShape,
        qkv: u64,
        k_cache: u64,
        v_cache: u64,
        tables: u64,
        table_off: u64,
        ctx_len: u64,
        out: u64,
        part_out: u64,
        part_ml: u64,
    ) -> Result<(), CudaError> {
        if s.rows == 0 {
            return Ok(());
        }
        let group = s.n_heads / s.n_kv.max(1);
        if s.n_kv == 0
            || !s.n_heads.is_multiple_of(s.n_kv)
            || group > ATTENTION_MAX_GROUP
            || !ATTENTION_HEAD_DIMS.contains(&s.head_dim)
            || s.num_parts == 0
        {
            return Err(CudaError::Unsupported(format!(
                "attention with {} heads / {} KV heads / head_dim {} (need group ≤ {ATTENTION_MAX_GROUP}, head_dim one of {ATTENTION_HEAD_DIMS:?})",
                s.n_heads, s.n_kv, s.head_dim
            )));
        }
        let (nh, nkv, hd, rs, bs, ps, np) = (
            s.n_heads as i32,
            s.n_kv as i32,
            s.head_dim as i32,
            s.row_stride as i32,
            s.block_size as i32,
            s.part_size as i32,
            s.num_parts as i32,
        );
        if s.tensor_cores && !self.has_tensor_cores() {
            return Err(CudaError::Unsupported(format!("tensor-core attention needs sm_80 or later (device: {})", self.arch)));
        }
        let name = match (s.head_dim, group <= 4, s.tensor_cores) {
            (64, _, true) => "paged_attention_tc_hd64",
            (_, _, true) => "paged_attention_tc_hd128",
            (64, true, false) => "paged_attention_hd64_g4",
            (64, false, false) => "paged_attention_hd64_g8",
            (_, true, false) => "paged_attention_hd128_g4",
            (_, false, false) => "paged_attention_hd128_g8",
        };
        let mut b = self.launcher(name);
        b.arg(&qkv).arg(&k_cache).arg(&v_cache).arg(&tables).arg(&table_off).arg(&ctx_len).arg(&out).arg(&part_out).arg(&part_ml);
        b.arg(&nh).arg(&nkv).arg(&hd).arg(&rs).arg(&bs).arg(&s.scale).arg(&ps).arg(&np);
        // SAFETY: per this function's contract; shapes checked against the kernel's static limits above.
        unsafe { b.launch(cfg(grid(s.rows, s.n_kv, s.num_parts), ATTENTION_THREADS)) }?;
        if s.num_parts > 1 {
            let mut r = self.launcher("attention_reduce");
            r.arg(&part_out).arg(&part_ml).arg(&out).arg(&nh).arg(&hd).arg(&np);
            // SAFETY: per this function's contract.
            unsafe { r.launch(cfg(grid(s.rows, s.n_heads, 1), s.head_dim as u32)) }?;
        }
        Ok(())
    }

    /// Dense causal attention for `n` consecutive new rows of one sequence (positions `start .. start + n`) over its
    /// whole context, through cuBLAS: gather the context's K/V from the paged cache, then per query-row tile
    /// `S = Q·Kᵀ` (f32), causal softmax to bf16 `P`, `O = P·V` straight into the bf16 attention output. Prefill
    /// chunks use this (tensor cores); decode rows use [`Self::paged_attention`]. Uses `s.n_heads`, `n_kv`,
    /// `head_dim`, `row_stride`, `block_size`, `scale`.
    ///
    /// # Safety
    /// `qkv` points at the first of `n` QKV rows (f32, `s.row_stride` apart) whose K/V are already in the caches;
    /// `table` at the sequence's block table (covering `start + n` positions); `out` at the first of `n` output
    /// rows (bf16, `n_heads · head_dim` wide); `ws` belongs to this device.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn prefill_attention(
        &self,
        gemm: &Gemm,
        ws: &PrefillWorkspace,
        s: &AttentionShape,
        qkv: u64,
        n: usize,
        start: usize,
        k_cache: u64,
        v_cache: u64,
        table: u64,
        out: u64,
    ) -> Result<(), CudaError> {
        let ctx = start + n;
        if n == 0 {
            return Ok(());
        }
        if ctx > ws.max_ctx || n > ws.max_rows {
            return Err(CudaError::Unsupported(format!(
                "prefill attention over {ctx} positions / {n} rows exceeds the workspace ({} / {})",
                ws.max_ctx, ws.max_rows
            )));
        }
        let (nh, nkv, hd) = (s.n_heads, s.n_kv, s.head_dim);
        let group = nh / nkv;
        let (q_width, kv_width) = (nh * hd, nkv * hd);
        let st = &self.stream;
        let (kp, vp, qp, sp, pp) =
            (ws.k.device_ptr(st).0, ws.v.device_ptr(st).0, ws.q.device_ptr(st).0, ws.s.device_ptr(st).0, ws.p.device_ptr(st).0);
        let (bs, kw, rs, qw) = (s.block_size as i32, kv_width as i32, s.row_stride as i32, q_width as i32);
        let mut b = self.launcher("gather_kv");
        b.arg(&k_cache).arg(&v_cache).arg(&table).arg(&bs).arg(&kw).arg(&kp).arg(&vp);
        // SAFETY: per this function's contract; the workspace holds max_ctx ≥ ctx positions.
        unsafe { b.launch(cfg(grid(ctx, 1, 1), row_threads(kv_width).min(512))) }?;
        let mut b = self.launcher("q_to_bf16");
        b.arg(&qkv).arg(&rs).arg(&qw).arg(&qp);
        // SAFETY: per this function's contract; the workspace holds max_rows ≥ n rows.
        unsafe { b.launch(cfg(grid(n, 1, 1), 256)) }?;
        let score_elems = ws.s.len();
        let mut i0 = 0;
        while i0 < n {
            let nt = (score_elems / (nh * ctx)).clamp(1, n - i0);
            let ctx_t = start + i0 + nt; // the tile's last row sees keys up to here
            let tile = nt * ctx_t;
            for j in 0..group {
                let a = Operand { ptr: kp, ld: kv_width, stride: hd };
                let bq = Operand { ptr: qp + ((i0 * q_width + j * hd) * 2) as u64, ld: q_width, stride: group * hd };
                let c = Operand { ptr: sp + (j * tile * 4) as u64, ld: ctx_t, stride: group * tile };
                // SAFETY: S tile of nh·nt·ctx_t ≤ score_elems floats; K rows < ctx_t ≤ ctx; Q rows < n.
                unsafe { gemm.batched(true, false, ctx_t, nt, hd, a, bq, c, false, nkv) }?;
            }
            let (nt_i, ctx_i, start_i) = (nt as i32, ctx_t as i32, (start + i0) as i32);
            let mut b = self.launcher("causal_softmax");
            b.arg(&sp).arg(&pp).arg(&nt_i).arg(&ctx_i).arg(&start_i).arg(&s.scale);
            // SAFETY: S and P hold nh·nt·ctx_t elements.
            unsafe { b.launch(cfg(grid(nt, nh, 1), 256)) }?;
            for j in 0..group {
                let a = Operand { ptr: vp, ld: kv_width, stride: hd };
                let bp = Operand { ptr: pp + (j * tile * 2) as u64, ld: ctx_t, stride: group * tile };
                let c = Operand { ptr: out + ((i0 * q_width + j * hd) * 2) as u64, ld: q_width, stride: group * hd };
                // SAFETY: output rows i0..i0+nt < n of `out`; P and V as above.
                unsafe { gemm.batched(false, false, hd, nt, ctx_t, a, bp, c, true, nkv) }?;
            }
            i0 += nt;
        }
        Ok(())
    }

    /// Causal attention for `n` consecutive new rows of one sequence (positions `start .. start + n`, K/V already in
    /// the caches) over its paged context, on tensor cores and flash-style: the alternative to
    /// [`Self::prefill_attention`] without its score workspace, K/V gather or context limit. Uses `s.n_heads`,
    /// `n_kv`, `head_dim`, `row_stride`, `block_size`, `scale`.
    ///
    /// # Safety
    /// `qkv` points at the first of `n` QKV rows (f32, `s.row_stride` apart); `table` at the sequence's block table
    /// (covering `start + n` positions, every block inside the caches); `out` at the first of `n` output rows (bf16,
    /// `n_heads · head_dim` wide).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn prefill_attention_tc(
        &self,
        s: &AttentionShape,
        qkv: u64,
        n: usize,
        start: usize,
        k_cache: u64,
        v_cache: u64,
        table: u64,
        out: u64,
    ) -> Result<(), CudaError> {
        if n == 0 {
            return Ok(());
        }
        if !self.has_tensor_cores() {
            return Err(CudaError::Unsupported(format!("tensor-core attention needs sm_80 or later (device: {})", self.arch)));
        }
        if s.n_kv == 0 || !s.n_heads.is_multiple_of(s.n_kv) || !ATTENTION_HEAD_DIMS.contains(&s.head_dim) {
            return Err(CudaError::Unsupported(format!(
                "prefill attention with {} heads / {} KV heads / head_dim {}",
                s.n_heads, s.n_kv, s.head_dim
            )));
        }
        let name = if s.head_dim == 64 { "prefill_attention_tc_hd64" } else { "prefill_attention_tc_hd128" };
        let (n_i, start_i, bs, nh, nkv, rs) =
            (n as i32, start as i32, s.block_size as i32, s.n_heads as i32, s.n_kv as i32, s.row_stride as i32);
        let mut b = self.launcher(name);
        b.arg(&qkv).arg(&n_i).arg(&start_i).arg(&k_cache).arg(&v_cache).arg(&table).arg(&bs).arg(&out);
        b.arg(&nh).arg(&nkv).arg(&rs).arg(&s.scale);
        // SAFETY: per this function's contract; shapes checked against the kernel's limits above.
        unsafe { b.launch(cfg(grid(n.div_ceil(64), s.n_heads, 1), 128)) }?;
        Ok(())
    }
}
