//! The two backends of the parity tests behind one host-side interface: [`CpuOps`] (the CPU reference twins) and,
//! with the `cuda` feature, `cuda::CudaOps` (the NVRTC kernels and cuBLAS). All bf16 data crosses as raw bits.

#[cfg(feature = "cuda")]
pub mod cuda;

use ferrite_kernels::cpu::attention::{AttnShape, KvLayout, PagedKv, SeqRows, paged_attention};
use ferrite_kernels::cpu::isa::CpuIsa;
use ferrite_kernels::cpu::ops::{RopePairing, argmax, rms_norm, rope, silu_mul};
use ferrite_kernels::cpu::sample::{Adjust, SampleParams, SampleScratch, apply_adjustments, apply_mask, sample_row};
use half::bf16;
use rand::Rng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

fn to_f32(b: u16) -> f32 {
    bf16::from_bits(b).to_f32()
}

fn round(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// One row of a sampling test.
#[derive(Debug, Clone)]
pub struct SampleCase {
    pub adjust: Vec<Adjust>,
    pub repetition: f32,
    pub params: SampleParams,
    pub u: f64,
    /// A grammar mask (bit `i % 32` of word `i / 32` set = id `i` allowed), applied after the adjustments.
    pub mask: Option<Vec<u32>>,
}

/// Host-side view of every kernel.
pub trait Ops {
    fn name(&self) -> &'static str;
    fn embed_gather(&mut self, table: &[u16], tokens: &[i32], hidden: usize) -> Vec<f32>;
    /// Returns the bf16 output (as f32); updates `x` with the residual add.
    fn add_rms_norm(&mut self, x: &mut [f32], add: Option<&[f32]>, w: &[f32], rows: Option<&[i32]>, hidden: usize, eps: f32) -> Vec<f32>;
    #[allow(clippy::too_many_arguments)]
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
    );
    fn silu_mul(&mut self, gate_up: &[f32], rows: usize, ffn: usize) -> Vec<f32>;
    /// Writes the case's new K/V into its cache, then attends; `[rows, nh·hd]` (bf16 as f32).
    fn attention(&mut self, case: &AttnCase, path: AttnPath) -> Vec<f32>;
    /// Writes the case's new K/V into its cache and reads back each row's slot: `([rows, kv_width], same for V)`.
    fn kv_cache_write(&mut self, case: &AttnCase) -> (Vec<f32>, Vec<f32>);
    /// RoPE on the case's new rows (at their positions) and their K/V into the cache, fused on CUDA: returns the
    /// rotated QKV rows and each row's K and V as read back from its slot (bf16 as f32).
    fn rope_kv_write(&mut self, case: &AttnCase, inv_freq: &[f32], interleaved: bool) -> (Vec<f32>, Vec<f32>, Vec<f32>);
    /// `rows × width` floats from `src` (rows `src_stride` apart) into a buffer of `rows × dst_stride` filled with
    /// -7 first (rows `dst_stride` apart); returns that buffer.
    fn copy_2d(&mut self, src: &[f32], src_stride: usize, dst_stride: usize, rows: usize, width: usize) -> Vec<f32>;
    /// Each row's argmax and its value (-inf for a row without a non-NaN value).
    fn argmax_rows(&mut self, logits: &[f32], vocab: usize) -> (Vec<u32>, Vec<f32>);
    fn linear(&mut self, x: &[u16], w: &[u16], rows: usize, inp: usize, out: usize) -> Vec<f32>;
    /// Applies each row's adjustments, then its mask; returns the adjusted logits.
    fn adjust_rows(&mut self, logits: &[f32], vocab: usize, rows: &[SampleCase]) -> Vec<f32>;
    /// Adjusts each row and draws its token.
    fn sample_rows(&mut self, logits: &[f32], vocab: usize, rows: &[SampleCase]) -> Vec<u32>;
    /// The other implementations of `linear`, each output with its name (CUDA: every `gemv_bf16` instantiation
    /// for up to 8 rows, and every cuBLASLt algorithm its heuristic offers for the shape; the CPU has none).
    fn linear_alternatives(&mut self, _x: &[u16], _w: &[u16], _rows: usize, _inp: usize, _out: usize) -> Vec<(String, Vec<f32>)> {
        Vec::new()
    }
    /// ‖a − b‖ / ‖b‖ as the start-up tuner computes it (CUDA: on the device through cuBLAS; the CPU has only the
    /// host's).
    fn relative_difference(&mut self, a: &[f32], b: &[f32]) -> f64 {
        crate::rel_err(a, &b.iter().map(|&v| f64::from(v)).collect::<Vec<_>>())
    }
}

/// Which attention implementation to run (the CPU has one; CUDA has the paged kernels on CUDA cores and on tensor
/// cores, optionally split into partitions of `part_size` positions, and the dense cuBLAS prefill path).
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the partition size is read by the CUDA ops only
pub enum AttnPath {
    Paged(Option<usize>),
    /// The tensor-core paged kernel (sm_80 and later), optionally partitioned.
    PagedTc(Option<usize>),
    /// Each sequence's rows through the dense cuBLAS prefill path.
    Dense,
    /// Each sequence's rows through the flash-style tensor-core prefill kernel.
    DenseTc,
}

/// A paged-attention problem: sequences with cached prefixes and new rows, scattered over shuffled blocks.
pub struct AttnCase {
    pub nh: usize,
    pub nkv: usize,
    pub hd: usize,
    pub block_size: usize,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))] // read by the CUDA ops only
    pub num_blocks: usize,
    /// `[rows, (nh + 2 nkv)·hd]` f32: the new rows' Q, K, V.
    pub qkv: Vec<f32>,
    /// Per row: (sequence, position).
    pub rows: Vec<(usize, usize)>,
    pub tables: Vec<Vec<u32>>,
    /// Initial caches `[num_blocks·block_size, nkv·hd]` bf16.
    pub k_cache: Vec<u16>,
    pub v_cache: Vec<u16>,
}

impl AttnCase {
    /// `seqs[i] = (cached prefix length, new tokens)`.
    pub fn random(rng: &mut StdRng, nh: usize, nkv: usize, hd: usize, block_size: usize, seqs: &[(usize, usize)]) -> Self {
        let need: Vec<usize> = seqs.iter().map(|&(p, n)| (p + n).div_ceil(block_size)).collect();
        let num_blocks = need.iter().sum::<usize>() + 5;
        let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
        ids.shuffle(rng);
        let mut tables = Vec::new();
        let mut next = 0;
        for &k in &need {
            tables.push(ids[next..next + k].to_vec());
            next += k;
        }
        let kv_width = nkv * hd;
        let slots = num_blocks * block_size;
        let mut cache = || (0..slots * kv_width).map(|_| bf16::from_f32(rng.random_range(-1.0f32..1.0)).to_bits()).collect::<Vec<u16>>();
        let (k_cache, v_cache) = (cache(), cache());
        let rows: Vec<(usize, usize)> = seqs.iter().enumerate().flat_map(|(s, &(p, n))| (p..p + n).map(move |pos| (s, pos))).collect();
        let stride = (nh + 2 * nkv) * hd;
        let qkv = (0..rows.len() * stride).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        Self { nh, nkv, hd, block_size, num_blocks, qkv, rows, tables, k_cache, v_cache }
    }

    pub fn stride(&self) -> usize {
        (self.nh + 2 * self.nkv) * self.hd
    }

    pub fn slot(&self, seq: usize, pos: usize) -> usize {
        self.tables[seq][pos / self.block_size] as usize * self.block_size + pos % self.block_size
    }

    /// The caches (f32) after the new rows are written, bf16-rounded.
    pub fn written_caches(&self) -> (Vec<f32>, Vec<f32>) {
        let kv = self.nkv * self.hd;
        let q_width = self.nh * self.hd;
        let mut k: Vec<f32> = self.k_cache.iter().map(|&b| to_f32(b)).collect();
        let mut v: Vec<f32> = self.v_cache.iter().map(|&b| to_f32(b)).collect();
        for (r, &(s, pos)) in self.rows.iter().enumerate() {
            let row = &self.qkv[r * self.stride()..][..self.stride()];
            let slot = self.slot(s, pos);
            for i in 0..kv {
                k[slot * kv + i] = round(row[q_width + i]);
                v[slot * kv + i] = round(row[q_width + kv + i]);
            }
        }
        (k, v)
    }

    /// f64 reference output `[rows, nh·hd]`.
    pub fn reference(&self) -> Vec<f64> {
        let (kc, vc) = self.written_caches();
        let (hd, kv) = (self.hd, self.nkv * self.hd);
        let group = self.nh / self.nkv;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut out = Vec::new();
        for (r, &(s, pos)) in self.rows.iter().enumerate() {
            for head in 0..self.nh {
                let q = &self.qkv[r * self.stride() + head * hd..][..hd];
                let kvh = head / group;
                let scores: Vec<f64> = (0..=pos)
                    .map(|t| {
                        let k = &kc[self.slot(s, t) * kv + kvh * hd..][..hd];
                        q.iter().zip(k).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum::<f64>() * scale
                    })
                    .collect();
                let m = scores.iter().copied().fold(f64::MIN, f64::max);
                let e: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..hd {
                    out.push((0..=pos).map(|t| e[t] / z * f64::from(vc[self.slot(s, t) * kv + kvh * hd + d])).sum());
                }
            }
        }
        out
    }
}

/// The CPU reference twins.
pub struct CpuOps;

impl Ops for CpuOps {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn embed_gather(&mut self, table: &[u16], tokens: &[i32], hidden: usize) -> Vec<f32> {
        tokens.iter().flat_map(|&t| table[t as usize * hidden..][..hidden].iter().map(|&b| to_f32(b))).collect()
    }

    fn add_rms_norm(&mut self, x: &mut [f32], add: Option<&[f32]>, w: &[f32], rows: Option<&[i32]>, hidden: usize, eps: f32) -> Vec<f32> {
        let all: Vec<i32> = (0..(x.len() / hidden) as i32).collect();
        let rows = rows.unwrap_or(&all);
        let mut out = vec![0f32; rows.len() * hidden];
        for (o, &r) in out.chunks_exact_mut(hidden).zip(rows) {
            let xr = &mut x[r as usize * hidden..][..hidden];
            if let Some(add) = add {
                for (a, b) in xr.iter_mut().zip(&add[r as usize * hidden..]) {
                    *a += b;
                }
            }
            rms_norm(CpuIsa::host(), xr, w, eps, o);
        }
        out.iter().map(|&v| round(v)).collect()
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
        let pairing = if interleaved { RopePairing::Interleaved } else { RopePairing::Half };
        for (row, &p) in qkv.chunks_exact_mut(stride).zip(pos) {
            rope(&mut row[..(nh + nkv) * hd], hd, p as usize, inv_freq, pairing);
        }
    }

    fn silu_mul(&mut self, gate_up: &[f32], rows: usize, ffn: usize) -> Vec<f32> {
        let mut out = vec![0f32; rows * ffn];
        for (o, gu) in out.chunks_exact_mut(ffn).zip(gate_up.chunks_exact(2 * ffn)) {
            let (g, u) = gu.split_at(ffn);
            silu_mul(CpuIsa::host(), g, u, o);
        }
        out.iter().map(|&v| round(v)).collect()
    }

    /// The production CPU kernel (tiled, [`paged_attention`]) on the case's rows, grouped back into sequences.
    fn attention(&mut self, case: &AttnCase, _path: AttnPath) -> Vec<f32> {
        let (kc, vc) = case.written_caches();
        let (hd, kv) = (case.hd, case.nkv * case.hd);
        let mut seqs: Vec<SeqRows<'_>> = Vec::new();
        for (r, &(s, pos)) in case.rows.iter().enumerate() {
            match seqs.last_mut() {
                Some(last) if std::ptr::eq(last.block_table, case.tables[s].as_slice()) => last.len += 1,
                _ => seqs.push(SeqRows { block_table: &case.tables[s], start_pos: pos, first_row: r, len: 1 }),
            }
        }
        // The written cache is by token slot; the CPU kernel keeps keys transposed within each block.
        let layout = KvLayout { block_size: case.block_size, slot_stride: kv };
        let (mut kt, mut vt) = (vec![0f32; kc.len()], vec![0f32; vc.len()]);
        for (slot, (key, value)) in kc.chunks_exact(kv).zip(vc.chunks_exact(kv)).enumerate() {
            layout.store(&mut kt, &mut vt, slot, key, value);
        }
        let kvp = PagedKv { k: &kt, v: &vt, block_size: case.block_size, slot_stride: kv };
        let shape =
            AttnShape { n_heads: case.nh, n_kv_heads: case.nkv, head_dim: hd, q_stride: case.stride(), scale: 1.0 / (hd as f32).sqrt() };
        let mut out = vec![0f32; case.rows.len() * case.nh * hd];
        paged_attention(CpuIsa::host(), &kvp, &seqs, &case.qkv, &shape, &mut out);
        out.iter().map(|&v| round(v)).collect()
    }

    fn kv_cache_write(&mut self, case: &AttnCase) -> (Vec<f32>, Vec<f32>) {
        let (kc, vc) = case.written_caches();
        let kv = case.nkv * case.hd;
        let mut k = Vec::new();
        let mut v = Vec::new();
        for &(s, pos) in &case.rows {
            let slot = case.slot(s, pos);
            k.extend_from_slice(&kc[slot * kv..][..kv]);
            v.extend_from_slice(&vc[slot * kv..][..kv]);
        }
        (k, v)
    }

    fn rope_kv_write(&mut self, case: &AttnCase, inv_freq: &[f32], interleaved: bool) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut qkv = case.qkv.clone();
        let pos: Vec<i32> = case.rows.iter().map(|r| r.1 as i32).collect();
        self.rope_qk(&mut qkv, &pos, inv_freq, case.nh, case.nkv, case.hd, case.stride(), interleaved);
        let (qw, kw) = (case.nh * case.hd, case.nkv * case.hd);
        let part = |off: usize| -> Vec<f32> {
            qkv.chunks_exact(case.stride()).flat_map(|row| row[off..][..kw].iter().map(|&v| round(v))).collect()
        };
        let (k, v) = (part(qw), part(qw + kw));
        (qkv, k, v)
    }

    fn copy_2d(&mut self, src: &[f32], src_stride: usize, dst_stride: usize, rows: usize, width: usize) -> Vec<f32> {
        let mut dst = vec![-7.0f32; rows * dst_stride];
        for r in 0..rows {
            dst[r * dst_stride..][..width].copy_from_slice(&src[r * src_stride..][..width]);
        }
        dst
    }

    fn adjust_rows(&mut self, logits: &[f32], vocab: usize, rows: &[SampleCase]) -> Vec<f32> {
        let mut out = logits.to_vec();
        for (row, c) in out.chunks_exact_mut(vocab).zip(rows) {
            apply_adjustments(row, &c.adjust, c.repetition);
            if let Some(m) = &c.mask {
                apply_mask(row, m);
            }
        }
        out
    }

    fn sample_rows(&mut self, logits: &[f32], vocab: usize, rows: &[SampleCase]) -> Vec<u32> {
        let adjusted = self.adjust_rows(logits, vocab, rows);
        let mut scratch = SampleScratch::default();
        adjusted.chunks_exact(vocab).zip(rows).map(|(row, c)| sample_row(row, &c.params, c.u, &mut scratch)).collect()
    }

    fn argmax_rows(&mut self, logits: &[f32], vocab: usize) -> (Vec<u32>, Vec<f32>) {
        let max = |row: &[f32]| row.iter().filter(|v| !v.is_nan()).fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        (logits.chunks_exact(vocab).map(argmax).collect(), logits.chunks_exact(vocab).map(max).collect())
    }

    fn linear(&mut self, x: &[u16], w: &[u16], rows: usize, inp: usize, out: usize) -> Vec<f32> {
        let wf: Vec<f32> = w.iter().map(|&b| to_f32(b)).collect();
        let mut y = vec![0f32; rows * out];
        for r in 0..rows {
            let xr: Vec<f32> = x[r * inp..][..inp].iter().map(|&b| to_f32(b)).collect();
            for o in 0..out {
                y[r * out + o] = ferrite_kernels::cpu::quant::dot_f32(CpuIsa::host(), &xr, &wf[o * inp..][..inp]);
            }
        }
        y
    }
}
