//! The CUDA side of the parity tests: uploads inputs, poisons outputs with NaN, launches, reads back.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DeviceRepr};
use ferrite_kernels::cuda::{
    AttentionShape, CudaKernels, GEMV_MAX_ROWS, Gemm, GemvKernel, PrefillWorkspace, pack_adjustments, pack_sample_params,
};
use half::bf16;

use super::{AttnCase, AttnPath, Ops, SampleCase};

const NAN_BF16: u16 = 0x7fc0;

pub struct CudaOps {
    stream: Arc<CudaStream>,
    kernels: CudaKernels,
    gemm: Gemm,
}

impl CudaOps {
    /// `None` when no device (or driver) is present, unless `FERRITE_REQUIRE_CUDA=1`, which makes that a failure.
    pub fn new() -> Option<Self> {
        let require = std::env::var_os("FERRITE_REQUIRE_CUDA").is_some_and(|v| v == "1");
        let ctx = match std::panic::catch_unwind(|| CudaContext::new(0)) {
            Ok(Ok(ctx)) => ctx,
            other => {
                assert!(!require, "FERRITE_REQUIRE_CUDA=1 but no CUDA device: {:?}", other.map(|r| r.err()));
                return None;
            }
        };
        let stream = ctx.new_stream().expect("stream");
        let kernels = CudaKernels::load(Arc::clone(&stream)).expect("kernels compile and load");
        let gemm = Gemm::new(Arc::clone(&stream)).expect("cuBLAS");
        Some(Self { stream, kernels, gemm })
    }

    fn up<T: DeviceRepr>(&self, v: &[T]) -> CudaSlice<T> {
        self.stream.clone_htod(v).expect("upload")
    }

    fn ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        s.device_ptr(&self.stream).0
    }

    fn down<T: DeviceRepr + Default + Clone>(&self, s: &CudaSlice<T>) -> Vec<T> {
        self.kernels.check().expect("kernels ran without a fault");
        self.stream.clone_dtoh(s).expect("download")
    }

    fn down_bf16(&self, s: &CudaSlice<u16>) -> Vec<f32> {
        self.down(s).into_iter().map(|b| bf16::from_bits(b).to_f32()).collect()
    }

    /// Applies the rows' masks to the `rows.len()` rows of `vocab` logits at `logits` with `apply_token_masks` (as
    /// the worker packs them: `ceil(vocab / 32)` words per masked row, short masks padded with zeros, slot -1 for a
    /// row without one); launches nothing when no row has a mask.
    fn masks(&self, logits: u64, vocab: usize, rows: &[SampleCase]) {
        let words = vocab.div_ceil(32);
        let (mut masks, mut slots) = (Vec::<u32>::new(), Vec::<i32>::new());
        for c in rows {
            match &c.mask {
                None => slots.push(-1),
                Some(m) => {
                    slots.push((masks.len() / words) as i32);
                    let have = m.len().min(words);
                    masks.extend_from_slice(&m[..have]);
                    masks.resize(masks.len() + words - have, 0);
                }
            }
        }
        if masks.is_empty() {
            return;
        }
        let (m, s) = (self.up(&masks), self.up(&slots));
        // SAFETY: `rows.len()` rows of `vocab` at `logits` (the caller's buffer); every slot is -1 or names one of
        // the `words`-long masks uploaded.
        unsafe { self.kernels.apply_token_masks(logits, vocab, vocab, self.ptr(&m), words, self.ptr(&s), rows.len()) }.expect("launch");
    }

    /// The rows' adjustments as the kernel's 5-word entries, their count, and the per-row repetition penalties.
    fn adjustments(&self, rows: &[SampleCase]) -> (CudaSlice<i32>, usize, CudaSlice<f32>) {
        let mut words = Vec::new();
        for (r, c) in rows.iter().enumerate() {
            pack_adjustments(&mut words, r, &c.adjust);
        }
        let n = words.len() / 5;
        words.push(0); // never an empty upload
        let rep: Vec<f32> = rows.iter().map(|c| c.repetition).collect();
        (self.up(&words), n, self.up(&rep))
    }

    fn nan_f32(&self, n: usize) -> CudaSlice<f32> {
        self.up(&vec![f32::NAN; n])
    }

    fn nan_bf16(&self, n: usize) -> CudaSlice<u16> {
        self.up(&vec![NAN_BF16; n])
    }

    /// Uploads the case and writes its K/V with `rope_kv_write`: rotated at the rows' positions with `rope`
    /// (inverse frequencies, interleaved), else at position 0 (the identity rotation). Returns the device QKV rows
    /// and caches.
    fn write_case(&self, case: &AttnCase, rope: Option<(&[f32], bool)>) -> (CudaSlice<f32>, CudaSlice<u16>, CudaSlice<u16>) {
        let qkv = self.up(&case.qkv);
        let k = self.up(&case.k_cache);
        let v = self.up(&case.v_cache);
        let slots: Vec<i32> = case.rows.iter().map(|&(s, p)| case.slot(s, p) as i32).collect();
        let ones = vec![1.0f32; case.hd / 2];
        let (inv_freq, interleaved) = rope.unwrap_or((&ones, false));
        let pos: Vec<i32> = case.rows.iter().map(|r| if rope.is_some() { r.1 as i32 } else { 0 }).collect();
        let (slots_d, pos_d, inv) = (self.up(&slots), self.up(&pos), self.up(inv_freq));
        // SAFETY: every buffer is sized from the case as the launcher's contract asks.
        unsafe {
            self.kernels
                .rope_kv_write(
                    self.ptr(&qkv),
                    self.ptr(&pos_d),
                    self.ptr(&inv),
                    self.ptr(&k),
                    self.ptr(&v),
                    self.ptr(&slots_d),
                    case.rows.len(),
                    case.nh,
                    case.nkv,
                    case.hd,
                    case.stride(),
                    interleaved,
                    case.num_blocks * case.block_size,
                )
                .expect("launch");
        }
        self.kernels.check().expect("kv write");
        (qkv, k, v)
    }

    /// Each row's K and V as read back from its slot of the device caches.
    fn slot_rows(&self, case: &AttnCase, k: &CudaSlice<u16>, v: &CudaSlice<u16>) -> (Vec<f32>, Vec<f32>) {
        let (kc, vc) = (self.down_bf16(k), self.down_bf16(v));
        let kv = case.nkv * case.hd;
        let rows = |c: &[f32]| -> Vec<f32> { case.rows.iter().flat_map(|&(s, p)| c[case.slot(s, p) * kv..][..kv].to_vec()).collect() };
        (rows(&kc), rows(&vc))
    }
}

impl Ops for CudaOps {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn embed_gather(&mut self, table: &[u16], tokens: &[i32], hidden: usize) -> Vec<f32> {
        let (t, ids, out) = (self.up(table), self.up(tokens), self.nan_f32(tokens.len() * hidden));
        // SAFETY: sizes per the launcher's contract.
        unsafe { self.kernels.embed_gather(self.ptr(&t), self.ptr(&ids), self.ptr(&out), tokens.len(), hidden, table.len() / hidden) }
            .expect("launch");
        self.down(&out)
    }

    fn add_rms_norm(&mut self, x: &mut [f32], add: Option<&[f32]>, w: &[f32], rows: Option<&[i32]>, hidden: usize, eps: f32) -> Vec<f32> {
        let xd = self.up(x);
        let addd = add.map(|a| self.up(a));
        let wd = self.up(w);
        let rowsd = rows.map(|r| self.up(r));
        let n = rows.map_or(x.len() / hidden, <[i32]>::len);
        let out = self.nan_bf16(n * hidden);
        let add_ptr = addd.as_ref().map_or(0, |a| self.ptr(a));
        let rows_ptr = rowsd.as_ref().map_or(0, |r| self.ptr(r));
        // SAFETY: sizes per the launcher's contract.
        unsafe { self.kernels.add_rms_norm(self.ptr(&xd), add_ptr, self.ptr(&wd), self.ptr(&out), rows_ptr, n, hidden, eps) }
            .expect("launch");
        x.copy_from_slice(&self.down(&xd));
        self.down_bf16(&out)
    }

    fn rope_qk(
        &mut self,
        qkv: &mut [f32],
        pos: &[i32],
        inv_freq: &[f32],
        nh: usize,
        nkv: usize,
        hd: usize,
        stride: usize,
        interleaved: bool,
    ) {
        let (q, p, f, none) = (self.up(qkv), self.up(pos), self.up(inv_freq), self.up(&vec![-1i32; pos.len()]));
        // SAFETY: sizes per the launcher's contract; every slot is -1, so the (null) caches are never written.
        unsafe {
            self.kernels.rope_kv_write(
                self.ptr(&q),
                self.ptr(&p),
                self.ptr(&f),
                0,
                0,
                self.ptr(&none),
                pos.len(),
                nh,
                nkv,
                hd,
                stride,
                interleaved,
                0,
            )
        }
        .expect("launch");
        qkv.copy_from_slice(&self.down(&q));
    }

    fn silu_mul(&mut self, gate_up: &[f32], rows: usize, ffn: usize) -> Vec<f32> {
        let (gu, out) = (self.up(gate_up), self.nan_bf16(rows * ffn));
        // SAFETY: sizes per the launcher's contract.
        unsafe { self.kernels.silu_mul(self.ptr(&gu), self.ptr(&out), rows, ffn) }.expect("launch");
        self.down_bf16(&out)
    }

    fn attention(&mut self, case: &AttnCase, path: AttnPath) -> Vec<f32> {
        let (qkv, k, v) = self.write_case(case, None);
        let mut tables = Vec::new();
        let mut offs = Vec::new();
        for t in &case.tables {
            offs.push(tables.len() as i32);
            tables.extend(t.iter().map(|&b| b as i32));
        }
        let table_off: Vec<i32> = case.rows.iter().map(|&(s, _)| offs[s]).collect();
        let ctx_len: Vec<i32> = case.rows.iter().map(|&(_, p)| p as i32 + 1).collect();
        let max_ctx = case.rows.iter().map(|&(_, p)| p + 1).max().unwrap_or(1);
        let (part_size, tensor_cores) = match path {
            AttnPath::Paged(p) => (p.unwrap_or(max_ctx), false),
            AttnPath::PagedTc(p) => (p.unwrap_or(max_ctx), true),
            AttnPath::Dense | AttnPath::DenseTc => (max_ctx, false),
        };
        let num_parts = max_ctx.div_ceil(part_size);
        let n = case.rows.len();
        let shape = AttentionShape {
            rows: n,
            n_heads: case.nh,
            n_kv: case.nkv,
            head_dim: case.hd,
            row_stride: case.stride(),
            block_size: case.block_size,
            scale: 1.0 / (case.hd as f32).sqrt(),
            part_size,
            num_parts,
            tensor_cores,
        };
        let (t, o, c) = (self.up(&tables), self.up(&table_off), self.up(&ctx_len));
        let out = self.nan_bf16(n * case.nh * case.hd);
        if let AttnPath::Dense | AttnPath::DenseTc = path {
            // Each sequence's rows through the cuBLAS prefill path; a small score budget forces several row tiles.
            let ws = PrefillWorkspace::new(&self.stream, case.nh, case.nkv * case.hd, case.hd, n, max_ctx, 6 * case.nh * max_ctx * 4)
                .expect("workspace");
            let mut r0 = 0;
            for (s, _) in case.tables.iter().enumerate() {
                let rows = case.rows.iter().filter(|r| r.0 == s).count();
                let start = case.rows[r0].1;
                let qkv_row = self.ptr(&qkv) + (r0 * case.stride() * 4) as u64;
                let table = self.ptr(&t) + (offs[s] as usize * 4) as u64;
                let out_row = self.ptr(&out) + (r0 * case.nh * case.hd * 2) as u64;
                // SAFETY: rows r0..r0+rows belong to sequence s, whose K/V were written by write_case.
                unsafe {
                    if let AttnPath::DenseTc = path {
                        self.kernels.prefill_attention_tc(&shape, qkv_row, rows, start, self.ptr(&k), self.ptr(&v), table, out_row)
                    } else {
                        self.kernels.prefill_attention(
                            &self.gemm,
                            &ws,
                            &shape,
                            qkv_row,
                            rows,
                            start,
                            self.ptr(&k),
                            self.ptr(&v),
                            table,
                            out_row,
                        )
                    }
                }
                .expect("prefill attention");
                r0 += rows;
            }
            return self.down_bf16(&out);
        }
        let part_out = self.nan_f32(n * case.nh * num_parts * case.hd);
        let part_ml = self.nan_f32(n * case.nh * num_parts * 2);
        // SAFETY: sizes per the launcher's contract; the tables cover every row's context.
        unsafe {
            self.kernels.paged_attention(
                &shape,
                self.ptr(&qkv),
                self.ptr(&k),
                self.ptr(&v),
                self.ptr(&t),
                self.ptr(&o),
                self.ptr(&c),
                self.ptr(&out),
                self.ptr(&part_out),
                self.ptr(&part_ml),
            )
        }
        .expect("launch");
        self.down_bf16(&out)
    }

    fn kv_cache_write(&mut self, case: &AttnCase) -> (Vec<f32>, Vec<f32>) {
        let (_, k, v) = self.write_case(case, None);
        self.slot_rows(case, &k, &v)
    }

    fn rope_kv_write(&mut self, case: &AttnCase, inv_freq: &[f32], interleaved: bool) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (qkv, k, v) = self.write_case(case, Some((inv_freq, interleaved)));
        let (kr, vr) = self.slot_rows(case, &k, &v);
        (self.down(&qkv), kr, vr)
    }

    fn copy_2d(&mut self, src: &[f32], src_stride: usize, dst_stride: usize, rows: usize, width: usize) -> Vec<f32> {
        let (s, d) = (self.up(src), self.up(&vec![-7.0f32; rows * dst_stride]));
        // SAFETY: src holds rows·src_stride ≥ (rows−1)·src_stride + width floats, dst rows·dst_stride.
        unsafe { self.kernels.copy_f32_2d(self.ptr(&s), src_stride, self.ptr(&d), dst_stride, rows, width) }.expect("launch");
        self.down(&d)
    }

    fn argmax_rows(&mut self, logits: &[f32], vocab: usize) -> (Vec<u32>, Vec<f32>) {
        let rows = logits.len() / vocab;
        let (l, ids, vals) = (self.up(logits), self.up(&vec![-1i32; rows]), self.nan_f32(rows));
        // SAFETY: sizes per the launcher's contract.
        unsafe { self.kernels.argmax_rows(self.ptr(&l), self.ptr(&ids), self.ptr(&vals), rows, vocab) }.expect("launch");
        (self.down(&ids).into_iter().map(|i| i as u32).collect(), self.down(&vals))
    }

    fn adjust_rows(&mut self, logits: &[f32], vocab: usize, rows: &[SampleCase]) -> Vec<f32> {
        let l = self.up(logits);
        let (adj, n, rep) = self.adjustments(rows);
        // SAFETY: sizes per the launcher's contract (ids are distinct per row).
        unsafe { self.kernels.apply_adjustments(self.ptr(&l), vocab, vocab, self.ptr(&adj), n, self.ptr(&rep)) }.expect("launch");
        self.masks(self.ptr(&l), vocab, rows);
        self.down(&l)
    }

    fn sample_rows(&mut self, logits: &[f32], vocab: usize, rows: &[SampleCase]) -> Vec<u32> {
        let l = self.up(logits);
        let (adj, n, rep) = self.adjustments(rows);
        let params: Vec<f32> = rows.iter().flat_map(|c| pack_sample_params(&c.params)).collect();
        let top_k: Vec<i32> = rows.iter().map(|c| c.params.top_k as i32).collect();
        let u: Vec<f64> = rows.iter().map(|c| c.u).collect();
        let (p, k, ud, ids) = (self.up(&params), self.up(&top_k), self.up(&u), self.up(&vec![-1i32; rows.len()]));
        // SAFETY: sizes per the launchers' contracts.
        unsafe {
            self.kernels.apply_adjustments(self.ptr(&l), vocab, vocab, self.ptr(&adj), n, self.ptr(&rep)).expect("launch");
        }
        self.masks(self.ptr(&l), vocab, rows);
        // SAFETY: sizes per the launcher's contract.
        unsafe {
            self.kernels
                .sample_rows(self.ptr(&l), vocab, vocab, self.ptr(&p), self.ptr(&k), self.ptr(&ud), self.ptr(&ids), rows.len())
                .expect("launch");
        }
        self.down(&ids).into_iter().map(|i| i as u32).collect()
    }

    fn linear_alternatives(&mut self, x: &[u16], w: &[u16], rows: usize, inp: usize, out: usize) -> Vec<(String, Vec<f32>)> {
        let (xd, wd) = (self.up(x), self.up(w));
        let mut outputs = Vec::new();
        if rows <= GEMV_MAX_ROWS {
            for kernel in GemvKernel::ALL {
                let y = self.nan_f32(rows * out);
                // SAFETY: sizes per the launcher's contract.
                unsafe { self.kernels.gemv_bf16(kernel, self.ptr(&xd), self.ptr(&wd), self.ptr(&y), rows, inp, out) }.expect("gemv");
                outputs.push((format!("{kernel:?}"), self.down(&y)));
            }
        }
        if let Some(why) = self.gemm.lt_unavailable() {
            panic!("cuBLASLt is unavailable on this GPU machine: {why}");
        }
        let algos = self.gemm.lt_candidates(rows, inp, out, 8).expect("cuBLASLt heuristic");
        assert!(!algos.is_empty(), "cuBLASLt offers no algorithm for {rows}x{inp}->{out}");
        for algo in algos {
            let y = self.nan_f32(rows * out);
            // SAFETY: sizes per the launcher's contract; the algorithm is for this shape.
            unsafe { self.gemm.lt_linear(&algo, self.ptr(&xd), self.ptr(&wd), self.ptr(&y)) }.expect("cuBLASLt matmul");
            outputs.push((format!("{algo:?}"), self.down(&y)));
        }
        outputs
    }

    fn relative_difference(&mut self, a: &[f32], b: &[f32]) -> f64 {
        let (ad, bd, tmp) = (self.up(a), self.up(b), self.nan_f32(a.len()));
        // SAFETY: all three hold a.len() f32 and are distinct buffers.
        let d = unsafe { self.gemm.relative_difference(self.ptr(&ad), self.ptr(&bd), self.ptr(&tmp), a.len()) }.expect("difference");
        // In place (tmp = a, as the tuner's repeat check does) gives the same.
        let ad2 = self.up(a);
        // SAFETY: as above, with tmp = a.
        let d2 = unsafe { self.gemm.relative_difference(self.ptr(&ad2), self.ptr(&bd), self.ptr(&ad2), a.len()) }.expect("difference");
        assert_eq!(d.to_bits(), d2.to_bits(), "in-place difference");
        d
    }

    fn linear(&mut self, x: &[u16], w: &[u16], rows: usize, inp: usize, out: usize) -> Vec<f32> {
        let (xd, wd, y) = (self.up(x), self.up(w), self.nan_f32(rows * out));
        // SAFETY: sizes per the launcher's contract.
        unsafe { self.gemm.linear(self.ptr(&xd), self.ptr(&wd), self.ptr(&y), rows, inp, out) }.expect("gemm");
        self.down(&y)
    }
}
