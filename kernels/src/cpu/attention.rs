//! Causal attention over the paged KV cache on the CPU, tiled in the style of flash attention (Dao et al. 2022):
//! the query rows of one GQA group (every query head that shares a KV head) for a block of [`QUERY_BLOCK`] positions
//! stream the sequence's keys and values once, [`KEY_TILE`] keys at a time, and keep an online softmax (running max
//! and sum) per row instead of a full-length score vector. Each K/V tile is read from memory once and reused from L1
//! by every row of the job. Jobs — (sequence, KV head, query block) — run in parallel on the caller's rayon pool, so
//! a long prefill and a batch of decode rows both use every core.
//!
//! # Batch invariance
//! A row's result depends only on its query, its position and the cache: key tiles are aligned to absolute key
//! positions (`0, KEY_TILE, 2·KEY_TILE, …`), a row visits exactly the keys `0..=pos` in that order, and every
//! reduction (each score's dot product, the running sum, each output lane's accumulation) has a fixed order within
//! its row. Which other rows share the job (decode alone, or inside a prefill block) never changes the bits. The
//! result does depend on the [`CpuIsa`] (the SIMD paths use FMA and lane-wise partial sums), as every CPU kernel's.
//!
//! The naive one-row-at-a-time twin, [`super::ops::attend_one`], is what the tests check this against.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(test)]
mod tests;

use rayon::prelude::*;

use super::isa::CpuIsa;

/// Query positions per job (times the GQA group's heads = query rows sharing each K/V tile).
pub const QUERY_BLOCK: usize = 16;
/// Keys per tile: the unit of the online softmax's rescaling (8 KiB of K and of V at head_dim 64).
pub const KEY_TILE: usize = 32;
/// Below this many (row, head, key) products a step runs on the calling thread: fanning out small decode steps costs
/// more than it saves. Above it even one decode row's KV heads run in parallel: a decode step's attention streams the
/// sequence's whole cache (46 KB a token for the default model), and one core alone does not reach the memory
/// bandwidth. The result is identical either way.
const PARALLEL_MIN_WORK: usize = 2 * 1024;

/// An element type of the KV cache: `f32`, or `f16` (half the memory and the bandwidth; keys and values are rounded
/// to f16 when stored and widened exactly when read, so every sum is still f32).
pub trait KvElem: Copy + Default + Send + Sync + 'static {
    fn from_f32(x: f32) -> Self;
    /// `out[i] = src[i]` as f32 (exact).
    fn widen(src: &[Self], out: &mut [f32]);
    /// The elements themselves when they are f32 (read in place, nothing widened).
    fn as_f32(src: &[Self]) -> Option<&[f32]>;
}

impl KvElem for f32 {
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn widen(src: &[Self], out: &mut [f32]) {
        copy_run(out, src);
    }
    #[inline(always)]
    fn as_f32(src: &[Self]) -> Option<&[f32]> {
        Some(src)
    }
}

impl KvElem for half::f16 {
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
    #[inline(always)]
    fn widen(src: &[Self], out: &mut [f32]) {
        // F16C where the CPU has it (detected at run time), else bit arithmetic: both exact, so the ISA cap does not
        // change a result.
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, out);
    }
    #[inline(always)]
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
}

/// One layer's paged K and V storage, laid out as [`KvLayout`] says: V by token slot, K transposed within each block.
#[derive(Clone, Copy, Debug)]
pub struct PagedKv<'a, T = f32> {
    pub k: &'a [T],
    pub v: &'a [T],
    pub block_size: usize,
    /// Floats per token slot (`n_kv_heads · head_dim`).
    pub slot_stride: usize,
}

/// Where a token slot's key and value live in a layer's paged storage. Token slot `s` is offset `o` of block `b`
/// (`s = b · block_size + o`); element `i = kv_head · head_dim + d` of its
/// - **value** is at `s · slot_stride + i` (a slot's value rows are contiguous: the softmax-weighted sum reads them);
/// - **key** is at `b · block_size · slot_stride + i · block_size + o`: each block stores its keys transposed, so
///   dimension `d` of one head's keys is `block_size` contiguous floats. The score micro-kernels work on a transposed
///   key tile ([`KeyTile`]); in this layout a tile is whole page rows (read in place at the default block size,
///   copied otherwise), not a scatter of every element (which cost as much as the scores themselves for a decode
///   step's few query rows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    pub block_size: usize,
    /// Floats per token slot (`n_kv_heads · head_dim`).
    pub slot_stride: usize,
}

impl KvLayout {
    /// Index of element `i` of token slot `slot`'s key.
    #[inline]
    pub fn key_index(&self, slot: usize, i: usize) -> usize {
        let (b, o) = (slot / self.block_size, slot % self.block_size);
        b * self.block_size * self.slot_stride + i * self.block_size + o
    }

    /// Writes token slot `slot`'s key (`slot_stride` floats: every KV head) and value, rounded to the cache's type.
    pub fn store<T: KvElem>(&self, k: &mut [T], v: &mut [T], slot: usize, key: &[f32], value: &[f32]) {
        assert!(key.len() == self.slot_stride && value.len() == self.slot_stride, "KvLayout::store: rows of {} floats", self.slot_stride);
        for (i, &x) in key.iter().enumerate() {
            k[self.key_index(slot, i)] = T::from_f32(x);
        }
        for (o, &x) in v[slot * self.slot_stride..(slot + 1) * self.slot_stride].iter_mut().zip(value) {
            *o = T::from_f32(x);
        }
    }

    /// Token slot `slot`'s key, every KV head (`slot_stride` floats), widened to f32.
    pub fn load_key<T: KvElem>(&self, k: &[T], slot: usize, out: &mut [f32]) {
        for (i, o) in out[..self.slot_stride].iter_mut().enumerate() {
            T::widen(std::slice::from_ref(&k[self.key_index(slot, i)]), std::slice::from_mut(o));
        }
    }
}

/// One sequence's query rows in a step: rows `first_row..first_row + len` of `q` / `out`, at positions
/// `start_pos..start_pos + len`; its cache already holds K and V for positions `0..start_pos + len`.
#[derive(Clone, Copy, Debug)]
pub struct SeqRows<'a> {
    pub block_table: &'a [u32],
    pub start_pos: usize,
    pub first_row: usize,
    pub len: usize,
}

/// Head geometry and scaling.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Floats between consecutive rows of `q` (query head `h` of row `r` is at `r · q_stride + h · head_dim`).
    pub q_stride: usize,
    /// Score scale, usually `1 / sqrt(head_dim)`.
    pub scale: f32,
}

/// `out[r, h] = softmax(q[r, h] · K[0..=pos_r]ᵀ · scale) · V[0..=pos_r]` for every row `r` of every sequence and
/// every query head `h`, reading K and V of head `h / (n_heads / n_kv_heads)` through the block tables. `out` is
/// `[rows, n_heads · head_dim]`. Rows of `out` that no sequence covers are left as they are.
///
/// Panics if a block table, `q` or `out` is too short for the rows and positions it is given (the caller validates
/// the batch first).
pub fn paged_attention<T: KvElem>(isa: CpuIsa, kv: &PagedKv<'_, T>, seqs: &[SeqRows<'_>], q: &[f32], shape: &AttnShape, out: &mut [f32]) {
    let group = shape.n_heads / shape.n_kv_heads.max(1);
    assert!(group * shape.n_kv_heads == shape.n_heads && shape.head_dim > 0, "paged_attention: bad head geometry {shape:?}");
    let jobs: Vec<Job> = seqs
        .iter()
        .enumerate()
        .flat_map(|(s, seq)| {
            (0..shape.n_kv_heads).flat_map(move |kvh| {
                (0..seq.len).step_by(QUERY_BLOCK).map(move |i0| Job { seq: s, kv_head: kvh, i0, i1: (i0 + QUERY_BLOCK).min(seq.len) })
            })
        })
        .collect();
    let run = |job: &Job| run_job(isa, kv, &seqs[job.seq], job, q, shape, group);
    let work: usize = seqs.iter().map(|s| s.len * (s.start_pos + s.len)).sum::<usize>() * shape.n_heads;
    let results: Vec<Vec<f32>> =
        if work >= PARALLEL_MIN_WORK && jobs.len() > 1 { jobs.par_iter().map(run).collect() } else { jobs.iter().map(run).collect() };
    // Scatter each job's [positions × group heads] rows into `out`.
    let (hd, width) = (shape.head_dim, shape.n_heads * shape.head_dim);
    for (job, res) in jobs.iter().zip(&results) {
        let seq = &seqs[job.seq];
        for (i, rows) in (job.i0..job.i1).zip(res.chunks_exact(group * hd)) {
            let dst = (seq.first_row + i) * width + job.kv_head * group * hd;
            out[dst..dst + group * hd].copy_from_slice(rows);
        }
    }
}

/// One unit of parallel work: rows `i0..i1` of a sequence, for the query heads of one KV head.
#[derive(Clone, Copy, Debug)]
struct Job {
    seq: usize,
    kv_head: usize,
    i0: usize,
    i1: usize,
}

/// The job's output, `[(i1 - i0) · group, head_dim]`, positions outer and the group's heads inner.
fn run_job<T: KvElem>(
    isa: CpuIsa,
    kv: &PagedKv<'_, T>,
    seq: &SeqRows<'_>,
    job: &Job,
    q: &[f32],
    shape: &AttnShape,
    group: usize,
) -> Vec<f32> {
    let hd = shape.head_dim;
    let rows = (job.i1 - job.i0) * group;
    // Each row's query, gathered so the micro-kernels read contiguous memory.
    let mut qs = Vec::with_capacity(rows * hd);
    let mut pos = Vec::with_capacity(rows);
    for i in job.i0..job.i1 {
        let base = (seq.first_row + i) * shape.q_stride + job.kv_head * group * hd;
        qs.extend_from_slice(&q[base..base + group * hd]);
        pos.extend(std::iter::repeat_n(seq.start_pos + i, group));
    }
    let mut acc = vec![0f32; rows * hd];
    let job_kv = JobKv { kv, table: seq.block_table, head_offset: job.kv_head * hd, hd };
    let tile = TileJob { kv: &job_kv, qs: &qs, pos: &pos, group, scale: shape.scale };
    let _ = isa;
    match () {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a `CpuIsa` at avx512 is only made after checking avx512f, avx2 and fma on this CPU.
        () if isa.has_avx512() && hd.is_multiple_of(16) => unsafe { avx512::run_tiles(&tile, &mut acc) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a `CpuIsa` at avx2 or above is only made after checking avx2 and fma on this CPU.
        () if isa.has_avx2() && hd.is_multiple_of(8) => unsafe { avx2::run_tiles(&tile, &mut acc) },
        () => scalar::run_tiles(&tile, &mut acc),
    }
    acc
}

/// A job's view of the cache: one KV head of one sequence.
struct JobKv<'a, T> {
    kv: &'a PagedKv<'a, T>,
    table: &'a [u32],
    head_offset: usize,
    hd: usize,
}

/// A tile's keys, transposed: dimension `d` of key `j` is `lo[d · stride + j]` for `j < HALF_TILE` and
/// `hi[d · stride + j - HALF_TILE]` past it. Either two pages of the cache read in place (`stride` = the block size)
/// or the gathered `kt` buffer (`stride` = [`KEY_TILE`]). Lanes past the tile's last key hold whatever is there (the
/// softmax masks them); both slices hold at least `(head_dim - 1) · stride + HALF_TILE` floats.
#[derive(Clone, Copy)]
struct KeyTile<'a> {
    lo: &'a [f32],
    hi: &'a [f32],
    stride: usize,
}

/// Keys in each half of a tile: one page at the default block size.
const HALF_TILE: usize = KEY_TILE / 2;

impl<'a, T: KvElem> JobKv<'a, T> {
    /// The keys of positions `k0..k0 + kn` (`k0` a multiple of [`KEY_TILE`]) and their value rows. When the cache is
    /// f32 and a page holds exactly half a tile (the default block size), the tile is the pages themselves and nothing
    /// is copied (a decode step's few query rows paid as much for the copy as for the scores); otherwise keys are
    /// gathered (widened) into `kt`, and f16 values widened into `vt` (`[KEY_TILE, head_dim]`).
    #[inline(always)]
    fn key_tile<'t>(
        &self,
        k0: usize,
        kn: usize,
        kt: &'t mut Vec<f32>,
        vt: &'t mut Vec<f32>,
        values: &mut [&'t [f32]; KEY_TILE],
    ) -> KeyTile<'t>
    where
        'a: 't,
    {
        let (bs, hd, stride) = (self.kv.block_size, self.hd, self.kv.slot_stride);
        let (Some(k), Some(v), true) = (T::as_f32(self.kv.k), T::as_f32(self.kv.v), bs == HALF_TILE) else {
            // The buffers are sized on first use: the in-place path (the default) never allocates them.
            kt.resize(hd * KEY_TILE, 0.0);
            if T::as_f32(self.kv.v).is_none() {
                vt.resize(hd * KEY_TILE, 0.0);
            }
            self.gather_tile(k0, kn, kt, vt, values);
            return KeyTile { lo: &kt[..], hi: &kt[HALF_TILE..], stride: KEY_TILE };
        };
        let page_keys = |page: usize| {
            let base = page * bs * stride + self.head_offset * bs;
            &k[base..base + hd * bs]
        };
        let first = self.table[k0 / bs] as usize;
        // The second page exists only when the tile has keys past the first half; otherwise read the first again.
        let second = if kn > HALF_TILE { self.table[k0 / bs + 1] as usize } else { first };
        for (j, value) in values[..kn].iter_mut().enumerate() {
            let page = if j < HALF_TILE { first } else { second };
            let off = (page * bs + j % HALF_TILE) * stride + self.head_offset;
            *value = &v[off..off + hd];
        }
        KeyTile { lo: page_keys(first), hi: page_keys(second), stride: bs }
    }

    /// Asks for the keys and values of the tile from key `k0` on (if the sequence has one there) to be brought into
    /// the cache while the current tile is computed: a decode job's few rows stream the whole context once, and a
    /// 2-core VM's hardware prefetcher did not keep ahead of the page-sized runs (see `quant`'s `prefetch_ahead`).
    #[inline(always)]
    fn prefetch_tile(&self, k0: usize, last: usize) {
        let (bs, hd, stride) = (self.kv.block_size, self.hd, self.kv.slot_stride);
        if k0 > last {
            return;
        }
        let kn = KEY_TILE.min(last + 1 - k0);
        let mut j = 0;
        while j < kn {
            let pos = k0 + j;
            let (page, o) = (self.table[pos / bs] as usize, pos % bs);
            let run = (bs - o).min(kn - j);
            // This head's keys of the run: `hd` rows of `bs` elements in one contiguous span.
            let keys = page * bs * stride + self.head_offset * bs;
            prefetch_span(self.kv.k, keys, hd * bs);
            for t in 0..run {
                prefetch_span(self.kv.v, (page * bs + o + t) * stride + self.head_offset, hd);
            }
            j += run;
        }
    }

    /// Fills the transposed key tile `kt` (`kt[d · KEY_TILE + j]`, zero past key `kn`) and the value rows of keys
    /// `k0..k0 + kn`, a page run at a time: each of the run's dimensions is one contiguous copy (widened to f32).
    #[inline(always)]
    fn gather_tile<'t>(&self, k0: usize, kn: usize, kt: &mut [f32], vt: &'t mut [f32], values: &mut [&'t [f32]; KEY_TILE])
    where
        'a: 't,
    {
        let (bs, hd, stride) = (self.kv.block_size, self.hd, self.kv.slot_stride);
        let (k, v): (&'a [T], &'a [T]) = (self.kv.k, self.kv.v);
        let mut j = 0;
        while j < kn {
            let pos = k0 + j;
            let (page, o) = (self.table[pos / bs] as usize, pos % bs);
            let run = (bs - o).min(kn - j);
            let keys = page * bs * stride + self.head_offset * bs + o;
            for (d, row) in kt.chunks_exact_mut(KEY_TILE).enumerate().take(hd) {
                T::widen(&k[keys + d * bs..keys + d * bs + run], &mut row[j..j + run]);
            }
            if T::as_f32(v).is_none() {
                for (t, dst) in vt[j * hd..(j + run) * hd].chunks_exact_mut(hd).enumerate() {
                    let off = (page * bs + o + t) * stride + self.head_offset;
                    T::widen(&v[off..off + hd], dst);
                }
            }
            j += run;
        }
        if kn < KEY_TILE {
            kt.chunks_exact_mut(KEY_TILE).for_each(|row| row[kn..].fill(0.0));
        }
        match T::as_f32(v) {
            Some(v) => {
                for (j, value) in values[..kn].iter_mut().enumerate() {
                    let pos = k0 + j;
                    let off = (self.table[pos / bs] as usize * bs + pos % bs) * stride + self.head_offset;
                    *value = &v[off..off + hd];
                }
            }
            None => {
                let vt: &'t [f32] = vt;
                for (value, row) in values[..kn].iter_mut().zip(vt.chunks_exact(hd)) {
                    *value = row;
                }
            }
        }
    }
}

/// Asks for the cache lines of `data[start..start + len]` (clamped to `data`); reads nothing.
#[inline(always)]
fn prefetch_span<T>(data: &[T], start: usize, len: usize) {
    let end = (start + len).min(data.len());
    if start >= end {
        return;
    }
    let (first, bytes) = (data[start..end].as_ptr().cast::<u8>(), size_of_val(&data[start..end]));
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (first, bytes);
    #[cfg(target_arch = "x86_64")]
    for off in (0..bytes).step_by(64) {
        // SAFETY: SSE is part of the x86_64 baseline; a prefetch reads nothing the program can see, and the address
        // is inside `data`.
        unsafe { core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(first.add(off).cast::<i8>()) };
    }
}

/// `dst = src` for a page run: a whole page of the default block size is a fixed-size copy (a few vector moves),
/// not a call to `memcpy` (which cost as much as the transposition it replaced, at 64 calls per page).
#[inline(always)]
fn copy_run(dst: &mut [f32], src: &[f32]) {
    const PAGE: usize = 16;
    match (<&mut [f32; PAGE]>::try_from(&mut *dst), <&[f32; PAGE]>::try_from(src)) {
        (Ok(d), Ok(s)) => *d = *s,
        _ => dst.copy_from_slice(src),
    }
}

/// What the tile loop of a job reads: its rows' queries (`[rows, hd]`) and positions (ascending), `group` rows (the
/// query heads of one KV head) per position.
struct TileJob<'a, T> {
    kv: &'a JobKv<'a, T>,
    qs: &'a [f32],
    pos: &'a [usize],
    group: usize,
    scale: f32,
}

/// Jobs with at most this many rows (decode: one position's GQA group) prefetch the next tile while computing this
/// one; a prefill block's 16 positions reuse each tile long enough for the hardware prefetcher.
const PREFETCH_MAX_ROWS: usize = 8;

/// The most query rows one micro-kernel call takes: rows of one position (they share the causal mask) that read
/// each key and value vector once between them, and hold `ROWS_MAX` times the accumulators.
const ROWS_MAX: usize = 3;

/// How many of the `left` remaining rows of a position the next micro-kernel call takes: at most [`ROWS_MAX`], and
/// 4 as 2 + 2 rather than 3 + 1.
#[inline(always)]
fn rows_in_call(left: usize) -> usize {
    if left == 4 { 2 } else { left.min(ROWS_MAX) }
}

/// The tile loop, the same for every ISA; expanded in each ISA's module so the micro-kernels it calls
/// (`scores_rows`, `softmax_tile`, `rescale_accumulate_rows`, `scale_row`, defined there with that module's target
/// features) inline into it. Each key tile is read transposed ([`KeyTile`]: the cache's pages in place, see
/// [`KvLayout`], or a gathered copy for other block sizes) so a row's scores are plain vertical FMAs, shared by all
/// of the job's rows. The rows of one position (its GQA group's heads, which share the causal mask) go through the
/// micro-kernels up to [`ROWS_MAX`] at a time, so each key and value vector loaded serves several rows and the
/// independent FMA chains of those rows hide each other's latency. A row's arithmetic is the same whichever rows
/// share the call: every lane of every row keeps its own chains, in the same order.
macro_rules! tile_loop {
    ($job:expr, $acc:expr) => {{
        let job: &TileJob<'_, _> = $job;
        let acc: &mut [f32] = $acc;
        let (hd, group) = (job.kv.hd, job.group.max(1));
        let rows = job.pos.len();
        let last = job.pos.last().copied().unwrap_or(0);
        let mut max = vec![f32::NEG_INFINITY; rows];
        let mut sum = vec![0f32; rows];
        let (mut kt, mut vt) = (Vec::new(), Vec::new());
        let mut p = [[0f32; KEY_TILE]; ROWS_MAX];
        let mut alpha = [0f32; ROWS_MAX];
        for k0 in (0..=last).step_by(KEY_TILE) {
            let kn = KEY_TILE.min(last + 1 - k0);
            let mut values: [&[f32]; KEY_TILE] = [&[]; KEY_TILE];
            let keys = job.kv.key_tile(k0, kn, &mut kt, &mut vt, &mut values);
            if rows <= PREFETCH_MAX_ROWS {
                job.kv.prefetch_tile(k0 + KEY_TILE, last);
            }
            for r0 in (0..rows).step_by(group) {
                let pos = job.pos[r0];
                if pos < k0 {
                    continue;
                }
                // Keys these rows may see in the tile (causal mask).
                let n = kn.min(pos + 1 - k0);
                let end = (r0 + group).min(rows);
                let mut r = r0;
                while r < end {
                    let take = rows_in_call(end - r);
                    let p = &mut p[..take];
                    scores_rows(&job.qs[r * hd..(r + take) * hd], keys, p);
                    for (i, pi) in p.iter_mut().enumerate() {
                        // `pi` becomes exp(score - m) for the first `n` keys and 0 past them.
                        let (m, tile_sum) = softmax_tile(pi, n, job.scale, max[r + i]);
                        // exp(-inf) = 0 on the first tile: the empty accumulator stays 0. An unchanged max (most
                        // tiles of a long row) skips the call: exp(0) is exactly 1.
                        alpha[i] = if m == max[r + i] { 1.0 } else { (max[r + i] - m).exp() };
                        max[r + i] = m;
                        sum[r + i] = sum[r + i] * alpha[i] + tile_sum;
                    }
                    rescale_accumulate_rows(&mut acc[r * hd..(r + take) * hd], &alpha[..take], p, &values[..n]);
                    r += take;
                }
            }
        }
        for (r, row) in acc.chunks_exact_mut(hd).enumerate() {
            scale_row(row, 1.0 / sum[r]);
        }
    }};
}
use tile_loop;

/// Portable micro-kernels: every sum in index order, separate multiply and add, libm's `exp`.
mod scalar {
    use super::{HALF_TILE, KEY_TILE, KeyTile, KvElem, PREFETCH_MAX_ROWS, ROWS_MAX, TileJob, rows_in_call};

    pub(super) fn run_tiles<T: KvElem>(job: &TileJob<'_, T>, acc: &mut [f32]) {
        tile_loop!(job, acc)
    }

    /// [`scores`] for each of the rows of `q` (`p.len()` rows of `q.len() / p.len()` floats).
    #[inline(always)]
    fn scores_rows(q: &[f32], keys: KeyTile<'_>, p: &mut [[f32; KEY_TILE]]) {
        let hd = q.len() / p.len();
        for (qr, pr) in q.chunks_exact(hd).zip(p) {
            scores(qr, keys, pr);
        }
    }

    /// [`rescale_accumulate`] for each row of `acc`, weighted by its row of `p` (the first `v.len()` keys).
    #[inline(always)]
    fn rescale_accumulate_rows(acc: &mut [f32], alpha: &[f32], p: &[[f32; KEY_TILE]], v: &[&[f32]]) {
        let hd = acc.len() / p.len();
        for ((row, &a), pr) in acc.chunks_exact_mut(hd).zip(alpha).zip(p) {
            rescale_accumulate(row, a, &pr[..v.len()], v);
        }
    }

    /// `p[j] = Σ_d q[d] · key_j[d]`, `d` in order.
    #[inline(always)]
    fn scores(q: &[f32], keys: KeyTile<'_>, p: &mut [f32; KEY_TILE]) {
        p.fill(0.0);
        let (lo, hi) = p.split_at_mut(HALF_TILE);
        for (d, &qd) in q.iter().enumerate() {
            let row = d * keys.stride;
            for (pj, &kj) in lo.iter_mut().zip(&keys.lo[row..row + HALF_TILE]) {
                *pj += qd * kj;
            }
            for (pj, &kj) in hi.iter_mut().zip(&keys.hi[row..row + HALF_TILE]) {
                *pj += qd * kj;
            }
        }
    }

    /// Scales the first `n` scores, returns the new running max `m` and `Σ exp(s_j - m)` (in key order), leaving
    /// `p[j] = exp(s_j - m)` for `j < n` and 0 past them.
    #[inline(always)]
    fn softmax_tile(p: &mut [f32; KEY_TILE], n: usize, scale: f32, m_old: f32) -> (f32, f32) {
        let mut m = m_old;
        for s in &mut p[..n] {
            *s *= scale;
            m = m.max(*s);
        }
        let mut sum = 0f32;
        for s in &mut p[..n] {
            *s = (*s - m).exp();
            sum += *s;
        }
        p[n..].fill(0.0);
        (m, sum)
    }

    /// `acc = acc · alpha + Σ_j p_j · v_j`, keys in order for each lane.
    #[inline(always)]
    fn rescale_accumulate(acc: &mut [f32], alpha: f32, p: &[f32], v: &[&[f32]]) {
        for (i, a) in acc.iter_mut().enumerate() {
            let mut x = *a * alpha;
            for (&pj, vj) in p.iter().zip(v) {
                x += pj * vj[i];
            }
            *a = x;
        }
    }

    #[inline(always)]
    fn scale_row(row: &mut [f32], s: f32) {
        row.iter_mut().for_each(|x| *x *= s);
    }
}
