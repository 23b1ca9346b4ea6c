//! Tiled attention against the naive twin ([`attend_one`]) on random paged caches, at every ISA this host supports:
//! ragged sequence lengths, tile and query-block boundaries, GQA groups, prefill and decode rows mixed in one call;
//! and batch invariance (a row's bits do not depend on the rows computed with it).

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::*;
use crate::cpu::ops::attend_one;

/// A random layer cache and the sequences that live in it.
struct Case {
    nh: usize,
    nkv: usize,
    hd: usize,
    block_size: usize,
    /// K in the cache's layout (transposed within each block, [`KvLayout`]).
    k: Vec<f32>,
    /// The same keys by token slot (`slot · nkv · hd + kv_head · hd + d`), for the naive twin.
    k_rows: Vec<f32>,
    v: Vec<f32>,
    /// Per sequence: its block table and its context length (positions `0..ctx` are written).
    tables: Vec<(Vec<u32>, usize)>,
}

impl Case {
    fn new(rng: &mut StdRng, nh: usize, nkv: usize, hd: usize, block_size: usize, ctx: &[usize]) -> Self {
        let blocks: usize = ctx.iter().map(|c| c.div_ceil(block_size)).sum::<usize>() + 3;
        let mut ids: Vec<u32> = (0..blocks as u32).collect();
        ids.shuffle(rng);
        let mut next = ids.into_iter();
        let tables = ctx.iter().map(|&c| ((0..c.div_ceil(block_size)).map(|_| next.next().unwrap()).collect(), c)).collect();
        let n = blocks * block_size * nkv * hd;
        let mut gen_vec = |n| (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect::<Vec<f32>>();
        let k = gen_vec(n);
        let layout = KvLayout { block_size, slot_stride: nkv * hd };
        let mut k_rows = vec![0f32; n];
        for (slot, row) in k_rows.chunks_exact_mut(nkv * hd).enumerate() {
            layout.load_key(&k, slot, row);
        }
        Case { nh, nkv, hd, block_size, k, k_rows, v: gen_vec(n), tables }
    }

    fn kv(&self) -> PagedKv<'_> {
        PagedKv { k: &self.k, v: &self.v, block_size: self.block_size, slot_stride: self.nkv * self.hd }
    }

    fn shape(&self) -> AttnShape {
        AttnShape {
            n_heads: self.nh,
            n_kv_heads: self.nkv,
            head_dim: self.hd,
            q_stride: self.nh * self.hd,
            scale: 1.0 / (self.hd as f32).sqrt(),
        }
    }

    /// Rows for `(sequence, start_pos, len)` parts, stacked in order, and random queries for them.
    fn rows(&self, rng: &mut StdRng, parts: &[(usize, usize, usize)]) -> (Vec<SeqRows<'_>>, Vec<f32>) {
        let mut first_row = 0;
        let seqs = parts
            .iter()
            .map(|&(s, start_pos, len)| {
                assert!(start_pos + len <= self.tables[s].1);
                let r = SeqRows { block_table: &self.tables[s].0, start_pos, first_row, len };
                first_row += len;
                r
            })
            .collect();
        let q = (0..first_row * self.nh * self.hd).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        (seqs, q)
    }

    fn tiled(&self, isa: CpuIsa, seqs: &[SeqRows<'_>], q: &[f32]) -> Vec<f32> {
        let rows: usize = seqs.iter().map(|s| s.len).sum();
        let mut out = vec![f32::NAN; rows * self.nh * self.hd];
        paged_attention(isa, &self.kv(), seqs, q, &self.shape(), &mut out);
        out
    }

    /// The naive twin, one (row, head) at a time.
    fn naive(&self, isa: CpuIsa, seqs: &[SeqRows<'_>], q: &[f32]) -> Vec<f32> {
        let (hd, group) = (self.hd, self.nh / self.nkv);
        let slot = |table: &[u32], t: usize| (table[t / self.block_size] as usize * self.block_size + t % self.block_size) * self.nkv * hd;
        let mut out = vec![0f32; q.len()];
        let mut scores = Vec::new();
        for seq in seqs {
            for i in 0..seq.len {
                let r = seq.first_row + i;
                for h in 0..self.nh {
                    let off = (h / group) * hd;
                    let key = |t: usize| &self.k_rows[slot(seq.block_table, t) + off..][..hd];
                    let value = |t: usize| &self.v[slot(seq.block_table, t) + off..][..hd];
                    let qh = &q[(r * self.nh + h) * hd..][..hd];
                    let o = &mut out[(r * self.nh + h) * hd..][..hd];
                    attend_one(isa, qh, seq.start_pos + i + 1, self.shape().scale, key, value, &mut scores, o);
                }
            }
        }
        out
    }
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 2e-5 * (1.0 + w.abs()), "{what}: element {i}: tiled {g} vs naive {w}");
    }
}

/// Context lengths around the key tile (32), the query block (16) and the page size, plus 1 and a long one.
const LENGTHS: [usize; 12] = [1, 2, 15, 16, 17, 31, 32, 33, 64, 65, 100, 300];

#[test]
fn tiled_matches_naive_for_ragged_prefill_and_decode_mixes() {
    let mut rng = StdRng::seed_from_u64(7);
    // (heads, KV heads, head_dim, page size): the default model's GQA (9/3, 64), MHA, a wider group, a head_dim the
    // SIMD paths do not take (scalar fallback), AVX2-only widths, odd page sizes.
    for (nh, nkv, hd, bs) in [(9, 3, 64, 16), (4, 4, 32, 16), (8, 2, 16, 5), (3, 1, 12, 7), (6, 3, 24, 16), (2, 1, 128, 32)] {
        let case = Case::new(&mut rng, nh, nkv, hd, bs, &LENGTHS);
        // Whole prompts; then for each sequence, a chunk continuing a cached prefix, or a single decode row.
        let whole: Vec<_> = LENGTHS.iter().enumerate().map(|(s, &c)| (s, 0, c)).collect();
        let mixed: Vec<_> =
            LENGTHS.iter().enumerate().map(|(s, &c)| if s % 2 == 0 { (s, c - 1, 1) } else { (s, c / 3, c - c / 3) }).collect();
        for isa in CpuIsa::supported() {
            for parts in [&whole, &mixed] {
                let (seqs, q) = case.rows(&mut rng, parts);
                let what = format!("{isa} nh {nh} nkv {nkv} hd {hd} bs {bs}");
                assert_close(&what, &case.tiled(isa, &seqs, &q), &case.naive(isa, &seqs, &q));
            }
        }
    }
}

/// A row computed inside a big prefill batch (parallel jobs, shared tiles, other sequences beside it) has exactly the
/// bits it has when computed alone as a decode row, or inside a differently chunked prefill.
#[test]
fn rows_are_batch_invariant() {
    let mut rng = StdRng::seed_from_u64(8);
    let (nh, nkv, hd) = (9, 3, 64);
    let case = Case::new(&mut rng, nh, nkv, hd, 16, &[300, 70, 5]);
    let width = nh * hd;
    for isa in CpuIsa::supported() {
        let (seqs, q) = case.rows(&mut rng, &[(0, 0, 300), (1, 0, 70), (2, 0, 5)]);
        let batched = case.tiled(isa, &seqs, &q);
        for (s, &(first, len)) in [(0usize, 300usize), (300, 70), (370, 5)].iter().enumerate() {
            // Every row alone (decode-shaped: one row, start_pos = its position).
            for i in 0..len {
                let r = first + i;
                let alone = SeqRows { block_table: &case.tables[s].0, start_pos: i, first_row: 0, len: 1 };
                let got = case.tiled(isa, &[alone], &q[r * width..(r + 1) * width]);
                assert_eq!(got, batched[r * width..(r + 1) * width], "{isa}: seq {s} row {i} alone");
            }
            // The same prompt chunked at odd places (chunked prefill), alone in its call.
            let mut at = 0;
            for chunk in [7, 33, 1, 100, usize::MAX] {
                let n = chunk.min(len - at);
                if n == 0 {
                    break;
                }
                let part = SeqRows { block_table: &case.tables[s].0, start_pos: at, first_row: 0, len: n };
                let rows = (first + at) * width..(first + at + n) * width;
                assert_eq!(case.tiled(isa, &[part], &q[rows.clone()]), batched[rows], "{isa}: seq {s} chunk at {at}");
                at += n;
            }
        }
    }
}

#[test]
fn rows_outside_every_sequence_are_untouched() {
    let mut rng = StdRng::seed_from_u64(9);
    let case = Case::new(&mut rng, 2, 1, 16, 16, &[20]);
    let (mut seqs, q) = case.rows(&mut rng, &[(0, 10, 4)]);
    seqs[0].first_row = 1; // row 0 and rows past 4 belong to nobody
    let mut q6 = vec![0f32; 6 * 32];
    q6[32..160].copy_from_slice(&q);
    let mut out = vec![-7.0f32; 6 * 32];
    paged_attention(CpuIsa::host(), &case.kv(), &seqs, &q6, &case.shape(), &mut out);
    assert!(out[..32].iter().chain(&out[160..]).all(|&v| v == -7.0));
    assert!(out[32..160].iter().all(|v| v.is_finite() && *v != -7.0));
}

/// An f16 cache gives exactly what the f32 kernel gives on the same values rounded to f16 (widening is exact and the
/// arithmetic is the same), at the default page size (f32 reads pages in place, f16 gathers) and an odd one.
#[test]
fn f16_cache_matches_f32_on_the_rounded_values() {
    use half::f16;
    let mut rng = StdRng::seed_from_u64(11);
    for (nh, nkv, hd, bs) in [(9, 3, 64, 16), (8, 2, 16, 5)] {
        let mut case = Case::new(&mut rng, nh, nkv, hd, bs, &LENGTHS);
        let k16: Vec<f16> = case.k.iter().map(|&x| f16::from_f32(x)).collect();
        let v16: Vec<f16> = case.v.iter().map(|&x| f16::from_f32(x)).collect();
        case.k = k16.iter().map(|x| x.to_f32()).collect();
        case.v = v16.iter().map(|x| x.to_f32()).collect();
        let mixed: Vec<_> =
            LENGTHS.iter().enumerate().map(|(s, &c)| if s % 2 == 0 { (s, c - 1, 1) } else { (s, c / 3, c - c / 3) }).collect();
        let (seqs, q) = case.rows(&mut rng, &mixed);
        let kv16 = PagedKv { k: &k16, v: &v16, block_size: bs, slot_stride: nkv * hd };
        for isa in CpuIsa::supported() {
            let want = case.tiled(isa, &seqs, &q);
            let mut got = vec![f32::NAN; want.len()];
            paged_attention(isa, &kv16, &seqs, &q, &case.shape(), &mut got);
            let (want, got): (Vec<u32>, Vec<u32>) = (want.iter().map(|x| x.to_bits()).collect(), got.iter().map(|x| x.to_bits()).collect());
            assert!(want == got, "{isa} bs {bs}: the f16 cache differs from f32 on the same values");
        }
    }
}

/// Keys are transposed within their block, values are not, and a stored slot reads back.
#[test]
fn kv_layout_transposes_keys_within_a_block() {
    let layout = KvLayout { block_size: 4, slot_stride: 6 };
    let (mut k, mut v) = (vec![0f32; 3 * 4 * 6], vec![0f32; 3 * 4 * 6]);
    let key: Vec<f32> = (0..6).map(|i| i as f32 + 1.0).collect();
    let value: Vec<f32> = (0..6).map(|i| -(i as f32) - 1.0).collect();
    // Slot 9 = block 2, offset 1.
    layout.store(&mut k, &mut v, 9, &key, &value);
    for i in 0..6 {
        assert_eq!(k[2 * 4 * 6 + i * 4 + 1], key[i], "element {i} of the key: row i of block 2, column 1");
    }
    assert_eq!(&v[9 * 6..10 * 6], &value[..]);
    let mut back = vec![0f32; 6];
    layout.load_key(&k, 9, &mut back);
    assert_eq!(back, key);
    assert_eq!(k.iter().filter(|&&x| x != 0.0).count(), 6, "nothing else written");
}

/// Indicative only (run alone on a quiet host): the tiled kernel against the naive per-(row, head) loop it replaced
/// (`attend_one` fanned out over rayon like the old forward pass), in the default model's attention shape (9 query
/// heads, 3 KV heads, head_dim 64), one layer, interleaved A/B/A/B: one prefill of 1k / 2k / 4k tokens, and a decode
/// step of 16 sequences at those contexts.
/// `cargo test --release -p ferrite-kernels --lib bench_tiled_vs_naive -- --ignored --nocapture`
#[test]
#[ignore = "benchmark"]
fn bench_tiled_vs_naive() {
    use std::time::Instant;
    let mut rng = StdRng::seed_from_u64(10);
    let (nh, nkv, hd) = (9, 3, 64);
    println!("threads {}", rayon::current_num_threads());
    let simd: Vec<CpuIsa> = CpuIsa::supported().into_iter().filter(|i| i.level() != crate::cpu::isa::IsaLevel::Scalar).collect();
    for (isa, len, decode) in
        simd.iter().flat_map(|&isa| [1024, 2048, 4096].into_iter().flat_map(move |len| [(isa, len, false), (isa, len, true)]))
    {
        let (ctx, parts): (Vec<usize>, Vec<(usize, usize, usize)>) =
            if decode { (vec![len; 16], (0..16).map(|s| (s, len - 1, 1)).collect()) } else { (vec![len], vec![(0, 0, len)]) };
        let case = Case::new(&mut rng, nh, nkv, hd, 16, &ctx);
        let (seqs, q) = case.rows(&mut rng, &parts);
        // (table, position) of every stacked row.
        let rows: Vec<(&[u32], usize)> = seqs.iter().flat_map(|s| (0..s.len).map(move |i| (s.block_table, s.start_pos + i))).collect();
        let naive = |out: &mut Vec<f32>| {
            out.par_chunks_mut(hd).enumerate().for_each_init(Vec::new, |scores, (i, o)| {
                let ((table, pos), h) = (rows[i / nh], i % nh);
                let slot = |t: usize| (table[t / 16] as usize * 16 + t % 16) * nkv * hd;
                let off = (h / (nh / nkv)) * hd;
                let key = |t: usize| &case.k_rows[slot(t) + off..][..hd];
                let value = |t: usize| &case.v[slot(t) + off..][..hd];
                attend_one(isa, &q[i * hd..][..hd], pos + 1, case.shape().scale, key, value, scores, o);
            });
        };
        let mut out = vec![0f32; q.len()];
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..2 {
            let t = Instant::now();
            naive(&mut out);
            a.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            paged_attention(isa, &case.kv(), &seqs, &q, &case.shape(), &mut out);
            b.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let what = if decode { "decode 16 seqs at" } else { "prefill" };
        println!(
            "{isa} {what} {len}: naive {:.2} / {:.2} ms, tiled {:.2} / {:.2} ms, naive/tiled {:.2} / {:.2}",
            a[0],
            a[1],
            b[0],
            b[1],
            a[0] / b[0],
            a[1] / b[1]
        );
    }
}
