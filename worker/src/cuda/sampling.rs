//! Sampling on the device (`Backend::forward_sample`): after the lm_head, each logit row gets its adjustments
//! (bias, penalties, min-token masks) and its draw (`apply_adjustments` + `sample_rows`, whose CPU twin is the
//! engine's host sampler), then its grammar mask when it has one (`apply_token_masks`, twin
//! `cpu::sample::apply_mask`; a free row costs one load of its slot), so only token ids cross PCIe. The per-row
//! parameters are uploaded with each chunk of logit rows into buffers reserved at start-up: a step never allocates.

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use ferrite_kernels::cuda::{CudaError, pack_adjustments, pack_sample_params};

use super::{CudaBackend, StepError};
use crate::backend::RowSampling;

/// Adjusted (row, token) entries one chunk of logit rows may carry; a step needing more samples on the host.
pub(super) const MAX_ADJUSTMENTS: usize = 1 << 20;

/// Device buffers for the sampling parameters of up to `rows` logit rows.
pub(super) struct SampleBuffers {
    rows: usize,
    params: CudaSlice<f32>,
    top_k: CudaSlice<i32>,
    u: CudaSlice<f64>,
    rep: CudaSlice<f32>,
    adj: CudaSlice<i32>,
    /// `words` u32 per masked row of a chunk (slots in row order) and, per row, its slot or -1.
    words: usize,
    masks: CudaSlice<u32>,
    mask_rows: CudaSlice<i32>,
    host_masks: Vec<u32>,
    host_mask_rows: Vec<i32>,
    host_params: Vec<f32>,
    host_top_k: Vec<i32>,
    host_u: Vec<f64>,
    host_rep: Vec<f32>,
    host_adj: Vec<i32>,
}

impl SampleBuffers {
    /// Buffers for `rows` rows of `vocab` logits (the full vocabulary under tensor parallelism).
    pub fn new(stream: &std::sync::Arc<CudaStream>, rows: usize, vocab: usize) -> Result<Self, CudaError> {
        let words = vocab.div_ceil(32);
        Ok(Self {
            rows,
            words,
            masks: stream.alloc_zeros(rows * words)?,
            mask_rows: stream.alloc_zeros(rows)?,
            host_masks: Vec::new(),
            host_mask_rows: Vec::new(),
            params: stream.alloc_zeros(4 * rows)?,
            top_k: stream.alloc_zeros(rows)?,
            u: stream.alloc_zeros(rows)?,
            rep: stream.alloc_zeros(rows)?,
            adj: stream.alloc_zeros(5 * MAX_ADJUSTMENTS)?,
            host_params: Vec::new(),
            host_top_k: Vec::new(),
            host_u: Vec::new(),
            host_rep: Vec::new(),
            host_adj: Vec::new(),
        })
    }
}

impl CudaBackend {
    /// Whether `rows` can be sampled on this device (otherwise the step samples on the host): every chunk's
    /// adjustments fit the reserved buffer. A tensor-parallel rank samples whole rows assembled from every rank's
    /// slice; all ranks draw, with the same uniforms, the same ids.
    pub(super) fn can_sample(&self, rows: &[RowSampling]) -> bool {
        rows.chunks(self.samplers.rows).all(|c| c.iter().map(|r| r.adjust.len()).sum::<usize>() <= MAX_ADJUSTMENTS)
    }

    /// Draws the tokens of the `rows.len()` whole logit rows at `logits` (rows of the full vocabulary, which it
    /// overwrites) into `scratch.ids` and returns them.
    pub(super) fn sample_device(&mut self, logits: u64, rows: &[RowSampling]) -> Result<Vec<u32>, StepError> {
        let n = rows.len();
        let vocab = self.tp.as_ref().map_or(self.config.vocab_size, |t| t.full.vocab_size);
        let b = &mut self.samplers;
        debug_assert!(n <= b.rows);
        b.host_params.clear();
        b.host_top_k.clear();
        b.host_u.clear();
        b.host_rep.clear();
        b.host_adj.clear();
        b.host_masks.clear();
        b.host_mask_rows.clear();
        for (i, r) in rows.iter().enumerate() {
            match &r.mask {
                None => b.host_mask_rows.push(-1),
                Some(m) => {
                    // Exactly `words` words: ids past a short mask are not allowed (as in the twin), extra words
                    // name no token.
                    b.host_mask_rows.push((b.host_masks.len() / b.words) as i32);
                    let have = m.len().min(b.words);
                    b.host_masks.extend_from_slice(&m[..have]);
                    b.host_masks.resize(b.host_masks.len() + b.words - have, 0);
                }
            }
            b.host_params.extend(pack_sample_params(&r.params));
            b.host_top_k.push(r.params.top_k.min(i32::MAX as u32) as i32);
            b.host_u.push(r.u);
            b.host_rep.push(r.repetition);
            pack_adjustments(&mut b.host_adj, i, &r.adjust);
        }
        let adjustments = b.host_adj.len() / 5;
        let st = &self.stream;
        st.memcpy_htod(&b.host_params, &mut b.params.slice_mut(..4 * n))?;
        st.memcpy_htod(&b.host_top_k, &mut b.top_k.slice_mut(..n))?;
        st.memcpy_htod(&b.host_u, &mut b.u.slice_mut(..n))?;
        st.memcpy_htod(&b.host_rep, &mut b.rep.slice_mut(..n))?;
        if adjustments > 0 {
            st.memcpy_htod(&b.host_adj, &mut b.adj.slice_mut(..5 * adjustments))?;
        }
        let masked = !b.host_masks.is_empty();
        if masked {
            st.memcpy_htod(&b.host_masks, &mut b.masks.slice_mut(..b.host_masks.len()))?;
            st.memcpy_htod(&b.host_mask_rows, &mut b.mask_rows.slice_mut(..n))?;
        }
        let ids = self.scratch.ids.device_ptr(st).0;
        let b = &self.samplers;
        let ptr_f = |s: &CudaSlice<f32>| s.device_ptr(st).0;
        // SAFETY: logits holds n rows of vocab f32 (the caller's contract, stride vocab); the parameter buffers hold
        // n rows (n ≤ their capacity) and `adjustments` entries with distinct (row, id), just uploaded in order on
        // this stream; the masks (when any) are n slots or -1, each naming one of the words-long masks just
        // uploaded (≤ n ≤ capacity); ids holds ≥ n i32.
        unsafe {
            self.kernels.apply_adjustments(logits, vocab, vocab, b.adj.device_ptr(st).0, adjustments, ptr_f(&b.rep))?;
            if masked {
                let (masks, mask_rows) = (b.masks.device_ptr(st).0, b.mask_rows.device_ptr(st).0);
                self.kernels.apply_token_masks(logits, vocab, vocab, masks, b.words, mask_rows, n)?;
            }
            self.kernels.sample_rows(logits, vocab, vocab, ptr_f(&b.params), b.top_k.device_ptr(st).0, b.u.device_ptr(st).0, ids, n)?;
        }
        let mut host = vec![0i32; n];
        st.memcpy_dtoh(&self.scratch.ids.slice(..n), &mut host)?;
        Ok(host.into_iter().map(|i| i as u32).collect())
    }
}
