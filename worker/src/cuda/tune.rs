//! Start-up choice between cuBLAS and our `gemv_bf16` kernel for decode-sized linear layers: for each weight shape
//! of the model, both are timed (device events, on the real weights) at 1..=8 rows, and the kernel is used up to the
//! largest row count where it is faster at every smaller count too. cuBLAS keeps everything else.

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::DevicePtr;
use ferrite_kernels::cuda::{CudaError, GEMV_MAX_ROWS};

use super::CudaBackend;

const REPS: usize = 20;

impl CudaBackend {
    /// Routes a linear layer to `gemv_bf16` or cuBLAS (see the module doc).
    ///
    /// # Safety
    /// As [`ferrite_kernels::cuda::Gemm::linear`].
    pub(super) unsafe fn linear(&self, x: u64, w: u64, y: u64, rows: usize, inp: usize, out: usize) -> Result<(), CudaError> {
        let gemv_up_to = self.gemv_rows.iter().find(|s| s.0 == (inp, out)).map_or(0, |s| s.1);
        // SAFETY: forwarded contract; both paths take the same operands.
        unsafe {
            if rows <= gemv_up_to {
                self.kernels.gemv_bf16(x, w, y, rows, inp, out)
            } else {
                self.gemm.linear(x, w, y, rows, inp, out)
            }
        }
    }

    /// Times both paths per weight shape and fills `gemv_rows`.
    pub(super) fn tune_gemv(&mut self) -> Result<(), CudaError> {
        let c = &self.config;
        let (h, hd, ffn) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let l0 = &self.weights.layers[0];
        let st = &self.stream;
        let shapes = [
            (h, (c.num_heads + 2 * c.num_kv_heads) * hd, l0.qkv.ptr(st)),
            (c.num_heads * hd, h, l0.wo.ptr(st)),
            (h, 2 * ffn, l0.gate_up.ptr(st)),
            (ffn, h, l0.down.ptr(st)),
            (h, self.weights.lm_head().rows, self.weights.lm_head().ptr(st)),
        ];
        let max_in = shapes.iter().map(|s| s.0).max().unwrap_or(h);
        let max_out = shapes.iter().map(|s| s.1).max().unwrap_or(h);
        // SAFETY: filled below before any read.
        let x = unsafe { st.alloc::<u16>(GEMV_MAX_ROWS * max_in) }?;
        // SAFETY: written by the products before any read.
        let y = unsafe { st.alloc::<f32>(GEMV_MAX_ROWS * max_out) }?;
        let (xp, yp) = (x.device_ptr(st).0, y.device_ptr(st).0);
        // SAFETY: x holds GEMV_MAX_ROWS · max_in bf16.
        unsafe { self.kernels.fill_random_bf16(xp, GEMV_MAX_ROWS * max_in, 5, 1.0, 0.0) }?;
        let ctx = st.context();
        let time = |f: &dyn Fn() -> Result<(), CudaError>| -> Result<f32, CudaError> {
            f()?;
            let (a, b) = (ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?, ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?);
            a.record(st)?;
            for _ in 0..REPS {
                f()?;
            }
            b.record(st)?;
            b.synchronize()?;
            Ok(a.elapsed_ms(&b)?)
        };
        let mut table = Vec::new();
        for &(inp, out, w) in &shapes {
            if table.iter().any(|t: &((usize, usize), usize)| t.0 == (inp, out)) || inp % 8 != 0 {
                continue;
            }
            let mut up_to = 0;
            for rows in 1..=GEMV_MAX_ROWS {
                // SAFETY: x and y hold GEMV_MAX_ROWS rows of the widest shape; w is a live weight of this shape.
                let ours = time(&|| unsafe { self.kernels.gemv_bf16(xp, w, yp, rows, inp, out) })?;
                // SAFETY: as above.
                let blas = time(&|| unsafe { self.gemm.linear(xp, w, yp, rows, inp, out) })?;
                if ours >= blas {
                    break;
                }
                up_to = rows;
            }
            table.push(((inp, out), up_to));
        }
        tracing::info!(table = ?table, "decode linear layers: gemv_bf16 up to these row counts ((in, out), rows), cuBLAS above");
        self.gemv_rows = table;
        Ok(())
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
        let (qkv, proj, gate_up, logits) = (sc.qkv.device_ptr(st).0, sc.proj.device_ptr(st).0, sc.gate_up.device_ptr(st).0, sc.logits.device_ptr(st).0);
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
        step()?;
        let ctx = st.context();
        let mut times = Vec::new();
        for _ in 0..5 {
            let (a, b) = (ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?, ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?);
            a.record(st)?;
            step()?;
            b.record(st)?;
            b.synchronize()?;
            times.push(f64::from(a.elapsed_ms(&b)?));
        }
        times.sort_by(f64::total_cmp);
        Ok(times[2])
    }

    /// `((in, out), rows)`: our kernel serves this shape up to `rows` rows.
    pub fn gemv_table(&self) -> &[((usize, usize), usize)] {
        &self.gemv_rows
    }
}
