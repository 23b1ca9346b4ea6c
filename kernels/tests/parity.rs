//! Kernel parity: one test body per kernel, run on the CPU twins always and on the CUDA kernels when a device exists
//! (feature `cuda`; `FERRITE_REQUIRE_CUDA=1` turns "no device" into a failure, as `scripts/gpu-check.sh` does).
//!
//! Each body draws fresh random inputs (the seed is printed), computes an f64 reference inline, and checks the
//! backend's output by relative error ‖out − ref‖ / ‖ref‖: ≤ 1e-2 where the output or operands are bf16, ≤ 1e-3 for
//! f32 outputs. NaN never passes; outputs are poisoned with NaN before each device run, so an unwritten element
//! fails. A reference never calls the code under test or the twins' helpers (`ops/`): bf16 is decoded and rounded
//! here by bit manipulation ([`bf16_bits_to_f64`], [`bf16_round_f64`]), the sampling algorithm is re-implemented
//! here from its documentation ([`adjust_reference`], [`sample_reference`]).

mod ops;

use ferrite_kernels::cpu::sample::{Adjust, SampleParams};
use half::bf16;
use ops::{AttnCase, AttnPath, CpuOps, Ops, SampleCase};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn fresh_rng(test: &str) -> StdRng {
    let seed = std::env::var("FERRITE_PARITY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1));
    eprintln!("{test}: seed {seed} (FERRITE_PARITY_SEED to replay)");
    StdRng::seed_from_u64(seed)
}

fn randv(rng: &mut StdRng, n: usize, amp: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-amp..amp)).collect()
}

fn bf16_round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
}

/// A bf16 bit pattern as f64: the top 16 bits of an f32 (independent of the `half` crate the twins use).
fn bf16_bits_to_f64(b: u16) -> f64 {
    f64::from(f32::from_bits(u32::from(b) << 16))
}

/// `x` rounded to bf16 (8 significant bits, round to nearest, ties to even), as f64; finite inputs only.
fn bf16_round_f64(x: f32) -> f64 {
    let bits = x.to_bits();
    let lower = bits & 0xffff;
    let mut upper = bits >> 16;
    if lower > 0x8000 || (lower == 0x8000 && upper & 1 == 1) {
        upper += 1;
    }
    f64::from(f32::from_bits(upper << 16))
}

/// ‖out − ref‖ / ‖ref‖, with NaN (or length mismatch) reported as infinity.
fn rel_err(out: &[f32], reference: &[f64]) -> f64 {
    if out.len() != reference.len() || out.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = out.iter().zip(reference).map(|(&o, &r)| (f64::from(o) - r).powi(2)).sum();
    let den: f64 = reference.iter().map(|r| r * r).sum();
    (num / den.max(1e-300)).sqrt()
}

fn assert_close(what: &str, backend: &str, out: &[f32], reference: &[f64], tol: f64) {
    let e = rel_err(out, reference);
    eprintln!("{backend:>5} {what}: rel err {e:.2e} (tol {tol:.0e})");
    assert!(e <= tol, "{backend} {what}: relative error {e:.3e} > {tol:.0e}");
}

fn check_embed_gather(ops: &mut dyn Ops) {
    let mut rng = fresh_rng("embed_gather");
    let (vocab, hidden) = (1000, 576);
    let table: Vec<u16> = randv(&mut rng, vocab * hidden, 1.0).iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
    let tokens: Vec<i32> = (0..37).map(|_| rng.random_range(0..vocab as i32)).collect();
    let out = ops.embed_gather(&table, &tokens, hidden);
    let mut reference = vec![0f64; tokens.len() * hidden];
    for (r, &t) in tokens.iter().enumerate() {
        for c in 0..hidden {
            reference[r * hidden + c] = bf16_bits_to_f64(table[t as usize * hidden + c]);
        }
    }
    assert_close("embed_gather", ops.name(), &out, &reference, 0.0);
}

fn check_add_rms_norm(ops: &mut dyn Ops) {
    let mut rng = fresh_rng("add_rms_norm");
    for (rows, hidden) in [(1, 576), (19, 576), (5, 4096)] {
        let x = randv(&mut rng, rows * hidden, 3.0);
        let add = randv(&mut rng, rows * hidden, 1.0);
        let w = randv(&mut rng, hidden, 2.0);
        let eps = 1e-5;
        // Every row, with the residual add.
        let mut x1 = x.clone();
        let out = ops.add_rms_norm(&mut x1, Some(&add), &w, None, hidden, eps);
        let summed: Vec<f64> = x.iter().zip(&add).map(|(&a, &b)| f64::from(a) + f64::from(b)).collect();
        let reference = rms_reference(&summed, &w, hidden, eps, None);
        assert_close(&format!("add_rms_norm {rows}x{hidden} out"), ops.name(), &out, &reference, 1e-2);
        assert_close(&format!("add_rms_norm {rows}x{hidden} residual"), ops.name(), &x1, &summed, 1e-6);
        // A gathered subset of rows, no add (the final norm).
        let picked: Vec<i32> = (0..rows as i32).filter(|r| r % 2 == 0).collect();
        let mut x2 = x.clone();
        let out = ops.add_rms_norm(&mut x2, None, &w, Some(&picked), hidden, eps);
        let plain: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        let reference = rms_reference(&plain, &w, hidden, eps, Some(&picked));
        assert_close(&format!("rms_norm gathered {}x{hidden}", picked.len()), ops.name(), &out, &reference, 1e-2);
    }
}

fn rms_reference(x: &[f64], w: &[f32], hidden: usize, eps: f32, rows: Option<&[i32]>) -> Vec<f64> {
    let all: Vec<i32> = (0..(x.len() / hidden) as i32).collect();
    let rows = rows.unwrap_or(&all);
    let mut out = Vec::new();
    for &r in rows {
        let row = &x[r as usize * hidden..][..hidden];
        let ms = row.iter().map(|v| v * v).sum::<f64>() / hidden as f64;
        let s = 1.0 / (ms + f64::from(eps)).sqrt();
        out.extend(row.iter().zip(w).map(|(&v, &wi)| v * s * f64::from(wi)));
    }
    out
}

fn check_rope(ops: &mut dyn Ops) {
    let mut rng = fresh_rng("rope_qk");
    for (nh, nkv, hd) in [(9, 3, 64), (32, 8, 128)] {
        for interleaved in [true, false] {
            let stride = (nh + 2 * nkv) * hd;
            let rows = 6;
            let qkv = randv(&mut rng, rows * stride, 2.0);
            let pos: Vec<i32> = (0..rows).map(|_| rng.random_range(0..8192)).collect();
            let inv: Vec<f32> = (0..hd / 2).map(|i| 1.0 / 500000f32.powf(2.0 * i as f32 / hd as f32)).collect();
            let mut out = qkv.clone();
            ops.rope_qk(&mut out, &pos, &inv, nh, nkv, hd, stride, interleaved);
            let reference = rope_reference(&qkv, &pos, &inv, nh + nkv, hd, stride, interleaved);
            assert_close(&format!("rope {nh}/{nkv}x{hd} interleaved={interleaved}"), ops.name(), &out, &reference, 1e-3);
        }
    }
}

/// `qkv` (f64) with RoPE applied to the first `heads` heads of each row.
fn rope_reference(qkv: &[f32], pos: &[i32], inv: &[f32], heads: usize, hd: usize, stride: usize, interleaved: bool) -> Vec<f64> {
    let mut reference: Vec<f64> = qkv.iter().map(|&v| f64::from(v)).collect();
    for (r, &p) in pos.iter().enumerate() {
        for head in 0..heads {
            let h = &mut reference[r * stride + head * hd..][..hd];
            for (i, &f) in inv.iter().enumerate() {
                let ang = f64::from(p as f32 * f);
                let (s, c) = ang.sin_cos();
                let (a, b) = if interleaved { (2 * i, 2 * i + 1) } else { (i, i + hd / 2) };
                let (x0, x1) = (h[a], h[b]);
                h[a] = x0 * c - x1 * s;
                h[b] = x1 * c + x0 * s;
            }
        }
    }
    reference
}

/// RoPE and the KV-cache write in one kernel: the same rotated rows as `rope`, and each row's slot holds bf16 of
/// its rotated K and its V.
fn check_rope_kv_write(ops: &mut dyn Ops) {
    let mut rng = fresh_rng("rope_kv_write");
    for (nh, nkv, hd) in [(9, 3, 64), (32, 8, 128)] {
        for interleaved in [true, false] {
            let case = AttnCase::random(&mut rng, nh, nkv, hd, 16, &[(700, 1), (37, 5), (0, 9)]);
            let inv: Vec<f32> = (0..hd / 2).map(|i| 1.0 / 500000f32.powf(2.0 * i as f32 / hd as f32)).collect();
            let pos: Vec<i32> = case.rows.iter().map(|r| r.1 as i32).collect();
            let (qkv, k, v) = ops.rope_kv_write(&case, &inv, interleaved);
            let stride = case.stride();
            let reference = rope_reference(&case.qkv, &pos, &inv, nh + nkv, hd, stride, interleaved);
            let what = format!("rope_kv_write {nh}/{nkv}x{hd} interleaved={interleaved}");
            assert_close(&what, ops.name(), &qkv, &reference, 1e-3);
            let (qw, kw) = (nh * hd, nkv * hd);
            let part = |off: usize| -> Vec<f64> { reference.chunks_exact(stride).flat_map(|row| row[off..][..kw].to_vec()).collect() };
            assert_close(&format!("{what} K"), ops.name(), &k, &part(qw), 4e-3);
            assert_close(&format!("{what} V"), ops.name(), &v, &part(qw + kw), 4e-3);
        }
    }
}

fn check_silu_mul(ops: &mut dyn Ops) {
    let mut rng = fresh_rng("silu_mul");
    for (rows, ffn) in [(1, 1536), (7, 14336)] {
        let gu = randv(&mut rng, rows * 2 * ffn, 6.0);
        let out = ops.silu_mul(&gu, rows, ffn);
        let mut reference = Vec::new();
        for r in 0..rows {
            for i in 0..ffn {
                let g = f64::from(gu[r * 2 * ffn + i]);
                reference.push(g / (1.0 + (-g).exp()) * f64::from(gu[r * 2 * ffn + ffn + i]));
            }
        }
        assert_close(&format!("silu_mul {rows}x{ffn}"), ops.name(), &out, &reference, 1e-2);
    }
}

fn check_attention(ops: &mut dyn Ops) {
    let mut rng = fresh_rng("paged_attention");
    // GQA groups 3 and 4 (the ≤ 4 kernels) and 8, at both head sizes.
    for (nh, nkv, hd) in [(9, 3, 64), (32, 8, 128), (16, 2, 64), (32, 4, 128)] {
        // A decode row at a long context, short prefill chunks over a cached prefix and from scratch, and a chunk
        // long enough for several warps and row blocks of the flash-style prefill kernel.
        let case = AttnCase::random(&mut rng, nh, nkv, hd, 16, &[(700, 1), (37, 5), (0, 9), (100, 150)]);
        let reference = case.reference();
        let paths = [
            AttnPath::Paged(None),
            AttnPath::Paged(Some(128)),
            AttnPath::PagedTc(None),
            AttnPath::PagedTc(Some(128)),
            AttnPath::Dense,
            AttnPath::DenseTc,
        ];
        for path in paths {
            let out = ops.attention(&case, path);
            let what = format!("attention {nh}/{nkv}x{hd} {path:?}");
            assert_close(&what, ops.name(), &out, &reference, 1e-2);
        }
        // The cache write itself: every written slot holds bf16(K), bf16(V) of its row (row r's K is its columns
        // nh·hd .. (nh + nkv)·hd, V the next nkv·hd).
        let (k, v) = ops.kv_cache_write(&case);
        let (q_width, kv_width, stride) = (nh * hd, nkv * hd, (nh + 2 * nkv) * hd);
        let mut k_ref = vec![0f64; case.rows.len() * kv_width];
        let mut v_ref = vec![0f64; case.rows.len() * kv_width];
        for r in 0..case.rows.len() {
            for i in 0..kv_width {
                k_ref[r * kv_width + i] = bf16_round_f64(case.qkv[r * stride + q_width + i]);
                v_ref[r * kv_width + i] = bf16_round_f64(case.qkv[r * stride + q_width + kv_width + i]);
            }
        }
        assert_close(&format!("kv_cache_write K {nkv}x{hd}"), ops.name(), &k, &k_ref, 0.0);
        assert_close(&format!("kv_cache_write V {nkv}x{hd}"), ops.name(), &v, &v_ref, 0.0);
    }
}

/// Strided row copies (how tensor-parallel ranks assemble whole logit rows): exact, nothing outside the rows.
fn check_copy_2d(ops: &mut dyn Ops) {
    let mut rng = fresh_rng("copy_f32_2d");
    for (rows, width, src_stride, dst_stride) in [(1, 300, 300, 1000), (5, 257, 300, 600), (3, 1000, 1000, 1000)] {
        let src = randv(&mut rng, rows * src_stride, 3.0);
        let out = ops.copy_2d(&src, src_stride, dst_stride, rows, width);
        let mut reference = vec![-7.0f64; rows * dst_stride];
        for r in 0..rows {
            for c in 0..width {
                reference[r * dst_stride + c] = f64::from(src[r * src_stride + c]);
            }
        }
        assert_close(&format!("copy_2d {rows}x{width} ({src_stride} -> {dst_stride})"), ops.name(), &out, &reference, 0.0);
    }
}

fn check_argmax(ops: &mut dyn Ops) {
    let mut rng = fresh_rng("argmax_rows");
    let vocab = 49152;
    let mut logits = randv(&mut rng, 4 * vocab, 10.0);
    // Row 1: a tie (lowest id wins); row 2: NaNs never win; row 3: all -inf gives 0.
    logits[vocab + 100] = 50.0;
    logits[vocab + 9000] = 50.0;
    logits[2 * vocab + 5] = f32::NAN;
    logits[2 * vocab + 77] = 60.0;
    for v in &mut logits[3 * vocab..] {
        *v = f32::NEG_INFINITY;
    }
    let (ids, vals) = ops.argmax_rows(&logits, vocab);
    let want: Vec<u32> = logits.chunks(vocab).map(ferrite_kernels::cpu::ops::argmax).collect();
    assert_eq!(want[1..], [100, 77, 0]);
    assert_eq!(ids, want, "{} argmax_rows", ops.name());
    // The value is the winner's logit (what tensor-parallel ranks compare), -inf for a row of -inf.
    let want_vals: Vec<f32> = want.iter().enumerate().map(|(r, &i)| logits[r * vocab + i as usize]).collect();
    assert_eq!(
        vals.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        want_vals.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        "{} argmax values",
        ops.name()
    );
}

fn check_linear(ops: &mut dyn Ops) {
    let mut rng = fresh_rng("linear");
    for (rows, inp, out) in [(1, 576, 1728), (8, 4096, 1024), (5, 1536, 576), (33, 4096, 1024), (128, 1536, 576)] {
        let x: Vec<u16> = randv(&mut rng, rows * inp, 1.0).iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
        let w: Vec<u16> = randv(&mut rng, out * inp, 0.1).iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
        let y = ops.linear(&x, &w, rows, inp, out);
        let f = |b: u16| f64::from(bf16::from_bits(b).to_f32());
        let mut reference = vec![0f64; rows * out];
        for r in 0..rows {
            for o in 0..out {
                reference[r * out + o] = (0..inp).map(|i| f(x[r * inp + i]) * f(w[o * inp + i])).sum();
            }
        }
        // bf16 operands, f32 accumulation: the error is the accumulation's, far under the bf16 bound.
        assert_close(&format!("linear {rows}x{inp}->{out}"), ops.name(), &y, &reference, 1e-3);
        for (name, alt) in ops.linear_alternatives(&x, &w, rows, inp, out) {
            assert_close(&format!("linear {rows}x{inp}->{out} through {name}"), ops.name(), &alt, &reference, 1e-3);
        }
        // The tuner's agreement measure against the host's: f32 sums of squares over ≤ 74k values.
        let perturbed: Vec<f32> = y.iter().map(|&v| v + rng.random_range(-0.01f32..0.01)).collect();
        let (measured, host) =
            (ops.relative_difference(&perturbed, &y), rel_err(&perturbed, &y.iter().map(|&v| f64::from(v)).collect::<Vec<_>>()));
        assert!((measured - host).abs() <= 1e-4 * host, "{} relative_difference {measured:.6e}, host {host:.6e}", ops.name());
    }
}

fn sample_cases(rng: &mut StdRng, rows: usize, vocab: usize) -> Vec<SampleCase> {
    (0..rows)
        .map(|r| {
            let (temperature, top_k, top_p, min_p) = match r % 8 {
                0 => (0.0, 0, 1.0, 0.0),
                1 => (1.0, 0, 1.0, 0.0),
                2 => (0.7, 1, 1.0, 0.0),
                3 => (1.0, 50, 1.0, 0.0),
                4 => (0.8, 0, 0.9, 0.0),
                5 => (1.2, 200, 0.5, 0.02),
                6 => (1.0, 0, 1.0, 0.1),
                _ => (0.5, (vocab / 2) as u32, 0.95, 0.0),
            };
            // Up to 20 distinct adjusted ids per row.
            let mut ids: Vec<u32> = (0..rng.random_range(0..20)).map(|_| rng.random_range(0..vocab as u32)).collect();
            ids.sort_unstable();
            ids.dedup();
            let adjust = ids
                .into_iter()
                .map(|id| Adjust {
                    id,
                    bias: if rng.random_bool(0.5) { rng.random_range(-5.0..5.0) } else { 0.0 },
                    repeat: rng.random_bool(0.5),
                    sub: if rng.random_bool(0.5) { rng.random_range(-1.0..2.0) } else { 0.0 },
                    mask: rng.random_bool(0.1),
                })
                .collect();
            // Every third row a grammar mask: dense random bits, a few allowed ids, or a short mask (the ids past it
            // are not allowed).
            let words = vocab.div_ceil(32);
            let mask = match r % 9 {
                2 => Some((0..words).map(|_| rng.random::<u32>()).collect()),
                5 => {
                    let mut m = vec![0u32; words];
                    for _ in 0..rng.random_range(1..6) {
                        let id = rng.random_range(0..vocab);
                        m[id / 32] |= 1 << (id % 32);
                    }
                    Some(m)
                }
                8 => Some((0..words / 2).map(|_| rng.random::<u32>() | 1).collect()),
                _ => None,
            };
            let u = rng.random::<f64>();
            SampleCase { adjust, repetition: 1.3, params: SampleParams { temperature, top_k, top_p, min_p }, u, mask }
        })
        .collect()
}

/// The adjustments of `kernels/src/cpu/sample.rs` (module doc, step 1) in f64: per adjusted id, `+ bias`, the
/// repetition penalty (`/ r` when positive, `· r` otherwise), `- sub`, `-inf` when masked; ids past the row are
/// ignored; every other logit is kept. Then the row's grammar mask (`apply_mask`): -inf wherever it disallows.
fn adjust_reference(row: &[f32], c: &SampleCase) -> Vec<f64> {
    let mut out: Vec<f64> = row.iter().map(|&l| f64::from(l)).collect();
    for a in &c.adjust {
        let i = a.id as usize;
        if i >= out.len() {
            continue;
        }
        let mut v = out[i] + f64::from(a.bias);
        if a.repeat {
            v = if v > 0.0 { v / f64::from(c.repetition) } else { v * f64::from(c.repetition) };
        }
        v -= f64::from(a.sub);
        if a.mask {
            v = f64::NEG_INFINITY;
        }
        out[i] = v;
    }
    if let Some(m) = &c.mask {
        for (i, v) in out.iter_mut().enumerate() {
            if !mask_allows(m, i) {
                *v = f64::NEG_INFINITY;
            }
        }
    }
    out
}

/// Whether grammar mask `m` allows id `i`: word `i / 32` exists and holds bit `i % 32` (least significant bit =
/// lowest id).
fn mask_allows(m: &[u32], i: usize) -> bool {
    m.get(i / 32).is_some_and(|w| w & (1u32 << (i % 32)) != 0)
}

/// The draw of `kernels/src/cpu/sample.rs` (module doc, step 2) from adjusted logits, written from the documentation
/// with full sorts instead of the implementation's selection and pre-filtering: greedy below temperature 1e-5
/// (lowest id among the maxima, NaN never wins, 0 when nothing is finite or +inf); else `s = l · (1/T)` (NaN and
/// -inf drop out, +inf clamps to f32::MAX), top-k keeps the k largest (lowest ids on ties), weights `exp(s − max)`,
/// top-p keeps the shortest (weight desc, id asc) prefix reaching `top_p · Σw`, min-p drops `w < min_p`, and the
/// first id (ascending) whose running mass exceeds `u · Σw` wins. The scaled logits and weights are f32, as the
/// algorithm defines them (computing them in f64 would move every draw within ~1e-6 of a boundary); the sums are f64.
fn sample_reference(row: &[f32], p: &SampleParams, u: f64) -> u32 {
    let greedy = |row: &[f32]| {
        let (mut best, mut best_v) = (0u32, f32::NEG_INFINITY);
        for (i, &l) in row.iter().enumerate() {
            if l > best_v {
                (best, best_v) = (i as u32, l);
            }
        }
        best
    };
    if p.temperature < 1e-5 {
        return greedy(row);
    }
    let inv_t = 1.0 / p.temperature;
    let mut cand: Vec<(f32, u32)> = Vec::new();
    for (i, &l) in row.iter().enumerate() {
        let s = l * inv_t;
        if s > f32::NEG_INFINITY {
            cand.push((s.min(f32::MAX), i as u32));
        }
    }
    if cand.is_empty() {
        return greedy(row);
    }
    cand.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    if p.top_k > 0 && (p.top_k as usize) < cand.len() {
        cand.truncate(p.top_k as usize);
    }
    let max = cand[0].0;
    // Still in (weight desc, id asc) order: exp is monotonic.
    let mut w: Vec<(f64, u32)> = cand.iter().map(|&(s, id)| (f64::from((s - max).exp()), id)).collect();
    if p.top_p < 1.0 {
        let target = f64::from(p.top_p) * w.iter().map(|x| x.0).sum::<f64>();
        let mut cum = 0.0;
        let mut keep = w.len();
        for (i, x) in w.iter().enumerate() {
            cum += x.0;
            if cum >= target {
                keep = i + 1;
                break;
            }
        }
        w.truncate(keep);
    }
    if p.min_p > 0.0 {
        w.retain(|x| x.0 >= f64::from(p.min_p));
    }
    w.sort_by_key(|x| x.1);
    let total: f64 = w.iter().map(|x| x.0).sum();
    let mut cum = 0.0;
    let mut last = None;
    for &(x, id) in &w {
        if x > 0.0 {
            cum += x;
            if u * total < cum {
                return id;
            }
            last = Some(id);
        }
    }
    last.unwrap_or_else(|| greedy(row))
}

/// Adjustments match the f64 reference (within f32 rounding of its three operations; NaN and -inf where it has
/// them; untouched logits bit for bit). Draws equal the reference's wherever the draw is not within rounding of a
/// boundary (nudging `u` or `top_p` by 1e-9 on the CPU, 1e-6 on a device, changes nothing there): sums in another
/// order and `exp` one ulp apart may flip only those. On a device, adjustments are also bitwise the CPU twin's and draws its draws. Ties at the
/// top-k boundary, NaN/-inf logits, fully masked rows, grammar masks (dense, sparse, short: `apply_token_masks`) and
/// vocabularies smaller than the block are all covered.
fn check_sample(ops: &mut dyn Ops) {
    let mut rng = fresh_rng("sample_rows");
    let twin = |l: &[f32], vocab: usize, c: &SampleCase| CpuOps.sample_rows(l, vocab, std::slice::from_ref(c))[0];
    let on_device = ops.name() != "cpu";
    // How far a draw must be from a boundary (relative) to be compared. The CPU computes the very weights the
    // reference does (same f32 products and `exp`) and differs only in the order of its f64 sums; a device's `exp`
    // may be an ulp off, which moves the running mass by up to ~1e-7 of itself.
    let nudge = if on_device { 1e-6 } else { 1e-9 };
    for vocab in [1000, 49152, 128256] {
        let rows = 24;
        let mut logits = randv(&mut rng, rows * vocab, 8.0);
        let mut cases = sample_cases(&mut rng, rows, vocab);
        // Row 1: NaN and -inf sprinkled; row 9: a four-way tie at the top, top_k 2 keeps the two lowest ids.
        for i in (0..vocab).step_by(7) {
            logits[vocab + i] = if i % 2 == 0 { f32::NAN } else { f32::NEG_INFINITY };
        }
        for &i in &[vocab / 2, 17, vocab - 1, 300] {
            logits[9 * vocab + i] = 40.0;
        }
        cases[9].params.top_k = 2;
        cases[9].adjust.clear();
        cases[9].mask = None;
        // Row 17: everything -inf (falls back to argmax: 0).
        logits[17 * vocab..18 * vocab].fill(f32::NEG_INFINITY);

        let adjusted = ops.adjust_rows(&logits, vocab, &cases);
        for (r, c) in cases.iter().enumerate() {
            let (row, out) = (&logits[r * vocab..][..vocab], &adjusted[r * vocab..][..vocab]);
            let want = adjust_reference(row, c);
            let mut touched = vec![false; vocab];
            for a in c.adjust.iter().filter(|a| (a.id as usize) < vocab) {
                touched[a.id as usize] = true;
            }
            if let Some(m) = &c.mask {
                for (i, t) in touched.iter_mut().enumerate() {
                    *t |= !mask_allows(m, i);
                }
            }
            for (i, (&o, &w)) in out.iter().zip(&want).enumerate() {
                let ok = if !touched[i] {
                    o.to_bits() == row[i].to_bits()
                } else if w.is_nan() {
                    o.is_nan()
                } else if w.is_infinite() {
                    f64::from(o) == w
                } else {
                    // Three f32 roundings of values below 20 in magnitude: a few 1e-6 at most.
                    (f64::from(o) - w).abs() <= 1e-5
                };
                assert!(
                    ok,
                    "{} vocab {vocab} row {r} id {i}: adjusted {o}, reference {w} (logit {}, {:?})",
                    ops.name(),
                    row[i],
                    c.adjust.iter().find(|a| a.id as usize == i)
                );
            }
        }
        if on_device {
            let want_adjusted = CpuOps.adjust_rows(&logits, vocab, &cases);
            // Bit-equal, except that NaN payloads may differ (the device returns its canonical NaN for NaN + x; the
            // sampler drops every NaN alike).
            let bits = |x: f32| if x.is_nan() { f32::NAN.to_bits() } else { x.to_bits() };
            let first = adjusted.iter().zip(&want_adjusted).position(|(&a, &b)| bits(a) != bits(b));
            assert!(
                first.is_none(),
                "{} apply_adjustments differs from the twin (vocab {vocab}) at {first:?}: {:?}",
                ops.name(),
                first.map(|i| (adjusted[i], want_adjusted[i], adjusted[i].to_bits(), want_adjusted[i].to_bits(), logits[i]))
            );
        }

        let got = ops.sample_rows(&logits, vocab, &cases);
        let mut edges = 0;
        for (r, c) in cases.iter().enumerate() {
            let row = &adjusted[r * vocab..][..vocab];
            let want = sample_reference(row, &c.params, c.u);
            let nudged = |u: f64, top_p: f32| sample_reference(row, &SampleParams { top_p, ..c.params }, u);
            let p = c.params.top_p;
            let stable = [nudged(c.u * (1.0 - nudge), p), nudged((c.u * (1.0 + nudge)).min(1.0 - 1e-12), p)]
                .into_iter()
                .chain(
                    (p < 1.0)
                        .then(|| [nudged(c.u, p * (1.0 - nudge as f32)), nudged(c.u, (p * (1.0 + nudge as f32)).min(1.0))])
                        .into_iter()
                        .flatten(),
                )
                .all(|t| t == want);
            if stable {
                assert_eq!(got[r], want, "{} vocab {vocab} row {r} ({:?}, u {}): the reference draws {want}", ops.name(), c.params, c.u);
                if on_device {
                    assert_eq!(got[r], twin(&logits[r * vocab..][..vocab], vocab, c), "{} vocab {vocab} row {r}: the CPU twin", ops.name());
                }
            } else {
                edges += 1;
            }
        }
        assert!([17, 300].contains(&got[9]), "{}: the top-k tie keeps the lowest ids, got {}", ops.name(), got[9]);
        assert_eq!(got[17], 0);
        eprintln!("{:>5} sample_rows vocab {vocab}: {} rows equal the reference, {edges} on a rounding boundary", ops.name(), rows - edges);
        assert!(edges <= 2, "{edges} draws on a rounding boundary (vocab {vocab})");
    }
}

/// Every check, against one backend.
fn run_all(ops: &mut dyn Ops, which: &str) {
    match which {
        "embed_gather" => check_embed_gather(ops),
        "add_rms_norm" => check_add_rms_norm(ops),
        "rope" => check_rope(ops),
        "rope_kv_write" => check_rope_kv_write(ops),
        "silu_mul" => check_silu_mul(ops),
        "attention" => check_attention(ops),
        "argmax" => check_argmax(ops),
        "copy_2d" => check_copy_2d(ops),
        "linear" => check_linear(ops),
        "sample" => check_sample(ops),
        other => unreachable!("{other}"),
    }
}

macro_rules! parity_tests {
    ($($name:ident),*) => {
        mod cpu {
            $(#[test] fn $name() { super::run_all(&mut super::ops::CpuOps, stringify!($name)); })*
        }
        #[cfg(feature = "cuda")]
        mod cuda {
            $(#[test] fn $name() {
                match super::ops::cuda::CudaOps::new() {
                    Some(mut ops) => super::run_all(&mut ops, stringify!($name)),
                    None => eprintln!("skipped: no CUDA device"),
                }
            })*
        }
    };
}

parity_tests!(embed_gather, add_rms_norm, rope, rope_kv_write, silu_mul, attention, argmax, copy_2d, linear, sample);

#[test]
fn rel_err_rejects_nan_and_accepts_exact() {
    assert_eq!(rel_err(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
    assert!(rel_err(&[f32::NAN, 2.0], &[1.0, 2.0]).is_infinite());
    assert!(rel_err(&[1.0], &[1.0, 2.0]).is_infinite());
    assert_eq!(bf16_round(&[1.0 + 1e-4]), vec![1.0]);
}
