//! Start-up choice of the kernel behind each linear layer, per weight shape and decode row count, timed on this
//! device with the model's own weights:
//! - cuBLAS (`cublasGemmEx`, its heuristic's first algorithm): the default, and the only path for row counts that
//!   are not tuned (prefill chunks, eager steps of other sizes);
//! - one of our `gemv_bf16` instantiations, for up to `GEMV_MAX_ROWS` rows;
//! - one of the cuBLASLt heuristic's other candidates (`LT_CANDIDATES`: other tiles, split-K counts, stage counts).
//!
//! The tuned row counts are 1..=`GEMV_MAX_ROWS` and the decode graph buckets: a decode step runs exactly those.
//! A candidate is usable only if its output is within `LINEAR_AGREE` of cuBLAS's on the same random inputs and two
//! runs give the same bits (so sampling stays reproducible). The usable candidates and cuBLAS are then timed over
//! every layer's weights in turn (as a step streams them; one matrix alone could stay in L2 and time too fast), and
//! the fastest serves that shape and row count.

use cudarc::driver::DevicePtr;
use ferrite_kernels::cuda::{CudaError, GEMV_MAX_ROWS, GemvKernel, LtAlgo};

use super::CudaBackend;
use super::weights::DeviceLayer;

/// cuBLASLt candidates taken from its heuristic per (shape, row count).
const LT_CANDIDATES: usize = 8;
/// Largest relative difference from cuBLAS (all accumulate in f32; split-K and tile order differ: ~1e-6 typical).
const LINEAR_AGREE: f64 = 1e-3;

/// A kernel that computes a linear layer.
#[derive(Clone, Debug)]
pub enum LinearKernel {
    Cublas,
    Gemv(GemvKernel),
    Lt(LtAlgo),
}

/// What serves one weight shape at one row count, with its time and cuBLAS's (ms for `REPS` launches).
#[derive(Clone, Debug)]
pub struct LinearPick {
    pub rows: usize,
    pub kernel: LinearKernel,
    pub ms: f32,
    pub cublas_ms: f32,
}

/// One weight shape `(in, out)` and its picks, by row count ascending.
#[derive(Clone, Debug)]
pub struct LinearChoice {
    pub inp: usize,
    pub out: usize,
    pub picks: Vec<LinearPick>,
}

impl CudaBackend {
    /// Runs a linear layer through the kernel tuned for its shape and row count (cuBLAS when none was).
    ///
    /// # Safety
    /// As [`ferrite_kernels::cuda::Gemm::linear`].
    pub(super) unsafe fn linear(&self, x: u64, w: u64, y: u64, rows: usize, inp: usize, out: usize) -> Result<(), CudaError> {
        let pick = self
            .linear_table
            .iter()
            .find(|c| (c.inp, c.out) == (inp, out))
            .and_then(|c| c.picks.binary_search_by_key(&rows, |p| p.rows).ok().map(|i| &c.picks[i].kernel))
            // A cuBLASLt algorithm may assume aligned operands (rows further into a buffer may not be).
            .filter(|k| !matches!(k, LinearKernel::Lt(_)) || LtAlgo::accepts(x, w, y));
        // SAFETY: forwarded contract; a tuned kernel was made for exactly this shape and row count.
        unsafe { self.run_linear(pick.unwrap_or(&LinearKernel::Cublas), x, w, y, (rows, inp, out)) }
    }

    /// # Safety
    /// As [`ferrite_kernels::cuda::Gemm::linear`] for `(rows, inp, out)`; an `Lt` kernel's algorithm is for that shape.
    unsafe fn run_linear(
        &self,
        kernel: &LinearKernel,
        x: u64,
        w: u64,
        y: u64,
        (rows, inp, out): (usize, usize, usize),
    ) -> Result<(), CudaError> {
        // SAFETY: forwarded contract.
        unsafe {
            match kernel {
                LinearKernel::Cublas => self.gemm.linear(x, w, y, rows, inp, out),
                LinearKernel::Gemv(k) => self.kernels.gemv_bf16(*k, x, w, y, rows, inp, out),
                LinearKernel::Lt(algo) => self.gemm.lt_linear(algo, x, w, y),
            }
        }
    }

    /// Fills `linear_table` (see the module doc) for the decode graph buckets up to `max_batch` (at least
    /// 1..=`GEMV_MAX_ROWS`); `search`: also time cuBLASLt's candidates. Uses the step scratch buffers.
    pub(super) fn tune_linear(&mut self, max_batch: usize, search: bool) -> Result<(), CudaError> {
        let c = &self.config;
        let (h, hd, ffn) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let st = &self.stream;
        let per_layer = |f: &dyn Fn(&DeviceLayer) -> u64| self.weights.layers.iter().map(f).collect::<Vec<u64>>();
        let lm = self.weights.lm_head();
        let shapes = [
            (h, (c.num_heads + 2 * c.num_kv_heads) * hd, per_layer(&|l| l.qkv.ptr(st))),
            (c.num_heads * hd, h, per_layer(&|l| l.wo.ptr(st))),
            (h, 2 * ffn, per_layer(&|l| l.gate_up.ptr(st))),
            (ffn, h, per_layer(&|l| l.down.ptr(st))),
            (h, lm.rows, vec![lm.ptr(st)]),
        ];
        let mut row_counts: Vec<usize> = (1..=GEMV_MAX_ROWS).collect();
        row_counts.extend(self.graph_batch_sizes(max_batch).into_iter().filter(|&b| b > GEMV_MAX_ROWS));
        // Inputs in `act` (bf16); outputs in `gate_up`; cuBLAS's reference in `logits`; `part_out` for differences.
        let sc = &self.scratch;
        let x = sc.act.device_ptr(st).0;
        let (y, reference, tmp) = (sc.gate_up.device_ptr(st).0, sc.logits.device_ptr(st).0, sc.part_out.device_ptr(st).0);
        let out_cap = sc.gate_up.len().min(sc.logits.len()).min(sc.part_out.len());
        // SAFETY: act holds act.len() bf16.
        unsafe { self.kernels.fill_random_bf16(x, sc.act.len(), 5, 1.0, 0.0) }?;
        let mut table = Vec::new();
        for (inp, out, ws) in &shapes {
            let (inp, out) = (*inp, *out);
            if table.iter().any(|t: &LinearChoice| (t.inp, t.out) == (inp, out)) {
                continue;
            }
            let mut picks = Vec::new();
            for &rows in row_counts.iter().filter(|&&r| r * inp <= sc.act.len() && r * out <= out_cap) {
                let mut candidates = Vec::new();
                if rows <= GEMV_MAX_ROWS && inp % 8 == 0 {
                    candidates.extend(GemvKernel::ALL.map(LinearKernel::Gemv));
                }
                if search {
                    match self.gemm.lt_candidates(rows, inp, out, LT_CANDIDATES) {
                        Ok(algos) => candidates.extend(algos.into_iter().map(LinearKernel::Lt)),
                        Err(e) => tracing::warn!(rows, inp, out, "no cuBLASLt candidates for this shape: {e}"),
                    }
                }
                if candidates.is_empty() {
                    continue; // cuBLAS serves it anyway: nothing to time
                }
                // SAFETY: (every product below) x holds ≥ rows · inp bf16, y / reference / tmp ≥ rows · out f32
                // (checked above), each weight is a live `out × inp` matrix, and an Lt algorithm is for this shape.
                let run = |k: &LinearKernel, w: u64, to: u64| unsafe { self.run_linear(k, x, w, to, (rows, inp, out)) };
                run(&LinearKernel::Cublas, ws[0], reference)?;
                let time = |k: &LinearKernel| self.time_reps(&|i| run(k, ws[i % ws.len()], y));
                let cublas_ms = time(&LinearKernel::Cublas)?;
                let mut best = LinearPick { rows, kernel: LinearKernel::Cublas, ms: cublas_ms, cublas_ms };
                for kernel in candidates {
                    if let Err(why) = self.check_linear(&|to| run(&kernel, ws[0], to), reference, y, tmp, rows * out) {
                        tracing::warn!(?kernel, rows, inp, out, why, "linear layer kernel not used for this shape");
                        continue;
                    }
                    let ms = time(&kernel)?;
                    if ms < best.ms {
                        best = LinearPick { rows, kernel, ms, cublas_ms };
                    }
                }
                picks.push(best);
            }
            table.push(LinearChoice { inp, out, picks });
        }
        if let Some(why) = self.gemm.lt_unavailable() {
            tracing::warn!(why, "cuBLASLt unavailable: linear layers choose between cuBLAS and gemv_bf16 only");
        }
        for choice in &table {
            let picks: Vec<String> =
                choice.picks.iter().map(|p| format!("{}: {:?} {:.2}x", p.rows, p.kernel, p.cublas_ms / p.ms)).collect();
            tracing::info!(
                inp = choice.inp,
                out = choice.out,
                "decode linear layers: per row count, the kernel and its speed-up over cuBLAS: {}",
                picks.join(", ")
            );
        }
        self.linear_table = table;
        Ok(())
    }

    /// Whether `run` (writing to the buffer it is given) agrees with cuBLAS's `reference` within `LINEAR_AGREE` and
    /// gives the same bits twice; the reason when not. `y` and `tmp` hold ≥ `n` f32 and are overwritten.
    fn check_linear(&self, run: &dyn Fn(u64) -> Result<(), CudaError>, reference: u64, y: u64, tmp: u64, n: usize) -> Result<(), String> {
        let check = || -> Result<Result<(), String>, CudaError> {
            run(y)?;
            // SAFETY: y, reference and tmp each hold ≥ n f32 and do not overlap.
            let diff = unsafe { self.gemm.relative_difference(y, reference, tmp, n) }?;
            if diff.is_nan() || diff > LINEAR_AGREE {
                return Ok(Err(format!("differs from cuBLAS by {diff:.2e}")));
            }
            run(tmp)?;
            // SAFETY: as above; the difference is taken in place in tmp.
            let repeat = unsafe { self.gemm.relative_difference(tmp, y, tmp, n) }?;
            Ok(if repeat == 0.0 { Ok(()) } else { Err(format!("two runs differ by {repeat:.2e}")) })
        };
        check().unwrap_or_else(|e| Err(e.to_string()))
    }

    /// Per weight shape, the kernel serving each tuned row count.
    pub fn linear_table(&self) -> &[LinearChoice] {
        &self.linear_table
    }
}
