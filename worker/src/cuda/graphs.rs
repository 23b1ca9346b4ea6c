//! CUDA graphs for decode steps: after the KV cache is reserved, one graph per batch bucket (1–8, then steps up to
//! 256, as mistral.rs and vLLM bucket them) is captured over persistent metadata. A decode step whose sequences all
//! add one token and fit the captured context replays the smallest bucket that holds it: the host packs the padded
//! metadata (padding rows write no KV: slot −1), uploads it in one copy and launches the graph. Everything else runs
//! eagerly.
//!
//! Graphs are captured per (batch bucket, context class): a class covers contexts up to its length with a fixed
//! partition size, so the grid does not depend on the step (partitions past a row's context do no work). The size
//! is chosen so that a context in the middle of the class gives about as many blocks as the eager path's
//! partitioning would. Contexts beyond the largest class run eagerly.

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaSlice, DevicePtr};
use ferrite_kernels::cuda::CudaError;

use super::CudaBackend;
use super::step::Layout;
use crate::backend::{ForwardBatch, LogitsWanted};

/// Context classes (longest context each graph covers).
const CTX_CLASSES: &[usize] = &[2048, 8192];
/// Keys per partition, at least.
const MIN_PART: usize = 128;
const BUCKETS: &[usize] = &[1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256];

/// A captured graph. The executable graph is bound to the backend's stream and context, which every call binds to
/// the calling thread first.
struct Graph(CudaGraph);

// SAFETY: a CUDA graph exec handle is not tied to the thread that created it; cudarc binds the context before each
// launch, and the graph is only launched through `&mut CudaBackend`, so never from two threads at once.
unsafe impl Send for Graph {}

/// The captured decode graphs and their persistent metadata buffer.
pub(super) struct DecodeGraphs {
    /// (batch bucket, context class, graph), by class then bucket.
    graphs: Vec<(usize, usize, Graph)>,
    meta: CudaSlice<i32>,
    blocks_per_seq: usize,
    host: Vec<i32>,
}

impl DecodeGraphs {
    pub fn buckets(&self) -> Vec<usize> {
        let mut b: Vec<usize> = self.graphs.iter().map(|g| g.0).collect();
        b.dedup();
        b.sort_unstable();
        b.dedup();
        b
    }
}

impl CudaBackend {
    /// (partition size, partitions) for a graph of `b` rows over contexts in `(lower, class]`.
    fn graph_parts(&self, b: usize, lower: usize, class: usize) -> (usize, usize) {
        let c = &self.config;
        // Sized for a context in the middle of the class: more, smaller partitions cost more in per-block overhead
        // and in the reduce than they gain (measured: 13 partitions of 170 keys at batch 64 lost to 3 of 342).
        let want = (8 * self.num_sms).div_ceil(b * c.num_kv_heads);
        let mut size = ((lower + class) / 2 / want).max(MIN_PART);
        while b * c.num_heads * class.div_ceil(size) * c.head_dim > self.scratch.part_out.len() {
            size *= 2;
        }
        (size, class.div_ceil(size))
    }

    fn graph_layout(&self, meta: &CudaSlice<i32>, b: usize, lower: usize, class: usize) -> Layout {
        let (size, parts) = self.graph_parts(b, lower, class);
        Layout::packed(meta.device_ptr(&self.stream).0, b, b, self.attention_shape(b, b, size, parts))
    }

    /// Packs bucket `b`'s metadata for `batch` (empty: all padding) into `host`.
    fn pack_graph_meta(host: &mut Vec<i32>, batch: &ForwardBatch<'_>, b: usize, bps: usize, block_size: usize) {
        let seqs = &batch.seqs;
        host.clear();
        host.extend((0..b).map(|r| seqs.get(r).map_or(0, |s| s.tokens[0] as i32)));
        host.extend((0..b).map(|r| seqs.get(r).map_or(0, |s| s.start_pos as i32)));
        host.extend((0..b).map(|r| {
            seqs.get(r).map_or(-1, |s| (s.block_table[s.start_pos / block_size] as usize * block_size + s.start_pos % block_size) as i32)
        }));
        host.extend((0..b).map(|r| (r * bps) as i32));
        host.extend((0..b).map(|r| seqs.get(r).map_or(1, |s| s.start_pos as i32 + 1)));
        host.extend(0..b as i32);
        for r in 0..b {
            let table: &[u32] = seqs.get(r).map_or(&[], |s| &s.block_table[..(s.start_pos + 1).div_ceil(block_size)]);
            host.extend(table.iter().map(|&x| x as i32));
            host.extend(std::iter::repeat_n(0, bps - table.len()));
        }
    }

    /// The batch buckets a capture for batches up to `max_batch` makes graphs for (bounded by the activation and
    /// logits buffers).
    pub(super) fn graph_batch_sizes(&self, max_batch: usize) -> Vec<usize> {
        let cap = max_batch.min(self.scratch.rows).min(self.scratch.logit_rows());
        BUCKETS.iter().copied().filter(|&b| b <= cap).collect()
    }

    /// Captures the decode graphs for batches up to `max_batch`. On failure the backend stays eager.
    pub(super) fn capture_graphs(&mut self, max_batch: usize) -> Result<(), CudaError> {
        let c = &self.config;
        let mut classes: Vec<usize> = CTX_CLASSES.iter().map(|&k| k.min(c.max_position_embeddings)).collect();
        classes.dedup();
        let max_ctx = *classes.last().expect("classes are not empty");
        let bps = max_ctx.div_ceil(self.block_size);
        let sizes = self.graph_batch_sizes(max_batch);
        let Some(&largest) = sizes.last() else { return Ok(()) };
        let mut meta = self.stream.alloc_zeros::<i32>(6 * largest + largest * bps)?;
        let mut host = Vec::new();
        let mut graphs = Vec::new();
        let started = std::time::Instant::now();
        for (ci, &class) in classes.iter().enumerate() {
            let lower = if ci == 0 { class / 4 } else { classes[ci - 1] };
            for &b in &sizes {
                Self::pack_graph_meta(&mut host, &ForwardBatch::default(), b, bps, self.block_size);
                // Padding-only metadata, so the warm-up run below reads valid addresses.
                self.stream.memcpy_htod(&host, &mut meta.slice_mut(..host.len()))?;
                let layout = self.graph_layout(&meta, b, lower, class);
                // Warm-up outside capture (cuBLAS picks and caches its kernels here).
                self.launch(&layout)?;
                self.launch_logits(0, b, true)?;
                self.stream.synchronize()?;
                self.stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
                let enqueued = self.launch(&layout).and_then(|()| self.launch_logits(0, b, true));
                let graph = self.stream.end_capture(CUgraphInstantiate_flags(0));
                enqueued?;
                let graph = graph?.ok_or_else(|| CudaError::Unsupported(format!("empty graph for batch {b}")))?;
                graphs.push((b, class, Graph(graph)));
            }
        }
        tracing::info!(buckets = ?sizes, ctx_classes = ?classes, ms = started.elapsed().as_millis() as u64, "captured decode CUDA graphs");
        self.graphs = Some(DecodeGraphs { graphs, meta, blocks_per_seq: bps, host });
        Ok(())
    }

    /// The bucket index a decode step can replay, if any.
    pub(super) fn graph_for(&self, batch: &ForwardBatch<'_>) -> Option<usize> {
        let g = self.graphs.as_ref().filter(|_| self.use_graphs)?;
        if batch.seqs.is_empty() || !batch.seqs.iter().all(|s| s.tokens.len() == 1 && s.logits == LogitsWanted::Last) {
            return None;
        }
        let ctx = batch.seqs.iter().map(|s| s.start_pos + 1).max()?;
        g.graphs.iter().position(|&(b, class, _)| ctx <= class && b >= batch.seqs.len())
    }

    /// Replays bucket `idx` for `batch`: afterwards `scratch.logits` / `scratch.ids` hold its rows in batch order.
    pub(super) fn replay(&mut self, batch: &ForwardBatch<'_>, idx: usize) -> Result<(), CudaError> {
        let block_size = self.block_size;
        let g = self.graphs.as_mut().expect("graph_for returned a bucket");
        let b = g.graphs[idx].0;
        Self::pack_graph_meta(&mut g.host, batch, b, g.blocks_per_seq, block_size);
        let mut dst = g.meta.slice_mut(..g.host.len());
        self.stream.memcpy_htod(&g.host, &mut dst)?;
        g.graphs[idx].2.0.launch()?;
        Ok(())
    }
}
