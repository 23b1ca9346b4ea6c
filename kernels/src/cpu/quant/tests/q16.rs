//! Tests of the int16-activation products (`quantize_row_q16`, `vec_dot_q16`, `gemv_q16`, `gemm_q16`) and their
//! micro-benchmarks.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

fn quantize16(x: &[f32]) -> Vec<BlockQ16> {
    let mut q = vec![BlockQ16::default(); x.len() / QK16];
    quantize_row_q16(host(), x, &mut q);
    q
}

/// [`reference_dot`] for int16 activation blocks.
fn reference_dot16(t: GgmlType, w: &[u8], x: &[BlockQ16]) -> (f64, f64) {
    let mut wf = vec![0.0f32; x.len() * QK16];
    dequantize_row(t, w, &mut wf).unwrap();
    let (mut dot, mut norm) = (0.0f64, 0.0f64);
    for (wb, xb) in wf.chunks_exact(QK16).zip(x) {
        for (&wv, &q) in wb.iter().zip(&xb.qs) {
            let p = f64::from(wv) * f64::from(xb.d) * f64::from(q);
            dot += p;
            norm += p.abs();
        }
    }
    (dot, norm)
}

/// Exact dot product of the dequantized weights with unquantized activations, and its norm.
fn float_dot(t: GgmlType, w: &[u8], x: &[f32]) -> (f64, f64) {
    let mut wf = vec![0.0f32; x.len()];
    dequantize_row(t, w, &mut wf).unwrap();
    let mut dot = 0.0f64;
    let mut norm = 0.0f64;
    for (&a, &b) in wf.iter().zip(x) {
        dot += f64::from(a) * f64::from(b);
        norm += (f64::from(a) * f64::from(b)).abs();
    }
    (dot, norm)
}

#[test]
fn block_q16_default_is_zero() {
    let b = BlockQ16::default();
    assert_eq!((b.d, b.s, b.qs), (0.0, 0.0, [0; QK16]));
}

#[test]
fn quantize_row_q16_round_trip() {
    let mut rng = StdRng::seed_from_u64(11);
    let x = random_acts(32 * 64, &mut rng);
    let q = quantize16(&x);
    for (xb, b) in x.chunks_exact(QK16).zip(&q) {
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert_eq!(b.d, amax / 32767.0);
        let sum: i32 = b.qs.iter().map(|&v| i32::from(v)).sum();
        assert_eq!(b.s, b.d * sum as f32);
        for (&v, &qv) in xb.iter().zip(&b.qs) {
            assert!(qv != i16::MIN);
            let err = (v - b.d * f32::from(qv)).abs();
            assert!(err <= b.d * 0.5 * (1.0 + 1e-3), "x={v} q={qv} d={}", b.d);
        }
        if amax == 0.0 {
            assert_eq!(b.qs, [0; QK16]);
            assert_eq!(b.s, 0.0);
        } else {
            // The largest magnitude maps to +-32767.
            assert_eq!(b.qs.iter().map(|v| v.unsigned_abs()).max(), Some(32767));
        }
    }
}

#[test]
fn quantize_row_q16_rounds_half_away_from_zero() {
    // amax 32767 -> d = 1, id = 1: x * id == x exactly.
    let mut x = [0.0f32; 32];
    let vals = [-32767.0, 32766.5, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 0.49999997, -0.49999997, -0.0];
    x[..vals.len()].copy_from_slice(&vals);
    let q = quantize16(&x);
    assert_eq!(q[0].d, 1.0);
    assert_eq!(&q[0].qs[..vals.len()], &[-32767, 32767, 1, -1, 2, -2, 3, -3, 0, 0, 0]);
}

#[cfg(target_arch = "x86_64")]
#[test]
fn quantize_row_q16_simd_equals_scalar() {
    if !has_avx2() {
        return;
    }
    let mut rng = StdRng::seed_from_u64(12);
    let mut x = random_acts(32 * 256, &mut rng);
    // Blocks with d == 1 (amax 32767) holding every f32 within 40 ulps of k/2 for a spread of
    // k (all |k/2| <= 300, then every 97th up to 32767), i.e. the rounding ties and near-ties.
    let ks = (-600i32..=600).chain((-65534..=65534).step_by(97));
    for k in ks {
        let h = k as f32 * 0.5;
        let mut vals: Vec<f32> =
            (-40i32..=40).map(|u| f32::from_bits(h.to_bits().wrapping_add_signed(u))).filter(|v| v.abs() <= 32767.0).collect();
        vals.push(h);
        for chunk in vals.chunks(31) {
            x.push(if k % 2 == 0 { 32767.0 } else { -32767.0 });
            x.extend_from_slice(chunk);
            x.resize(x.len().next_multiple_of(QK16), 0.0);
        }
    }
    // Random scales (amax and therefore 1/d not round).
    for _ in 0..2000 {
        let scale = 10f32.powi(rng.random_range(-20..20));
        x.extend((0..QK16).map(|_| scale * rng.random_range(-1.0f32..1.0)));
    }
    let mut a = vec![BlockQ16::default(); x.len() / QK16];
    let mut b = a.clone();
    scalar::quantize_row_q16(&x, &mut a);
    // SAFETY: checked has_avx2() above.
    unsafe { avx2_q16::quantize_row_q16(&x, &mut b) };
    for (i, (a, b)) in a.iter().zip(&b).enumerate() {
        assert_eq!(a.d.to_bits(), b.d.to_bits(), "block {i}");
        assert_eq!(a.s.to_bits(), b.s.to_bits(), "block {i}");
        assert_eq!(a.qs, b.qs, "block {i}");
        assert!(!a.qs.contains(&i16::MIN), "block {i}");
    }
}

#[test]
fn vec_dot_q16_matches_reference() {
    let mut rng = StdRng::seed_from_u64(13);
    for &t in &DOT_TYPES {
        assert!(supports_q16_dot(t));
        for &n in &[32usize, 64, 96, 576, 1536] {
            for _ in 0..20 {
                let w = random_weights(t, n / QK16, &mut rng);
                let x = quantize16(&random_acts(n, &mut rng));
                let got = f64::from(vec_dot_q16(host(), t, &w, &x));
                let (want, norm) = reference_dot16(t, &w, &x);
                assert!((got - want).abs() <= 1e-6 * norm + 1e-30, "{t} n={n}: {got} vs {want} (norm {norm})");
                let sc = f64::from(scalar::vec_dot(t, &w, &x));
                assert!((sc - want).abs() <= 1e-6 * norm + 1e-30, "{t} n={n} scalar: {sc} vs {want}");
            }
        }
    }
}

#[test]
fn vec_dot_q16_extreme_quants_are_exact() {
    // Worst case for the i32 lanes / f32 conversion: |q_w| = 128 (Q8_0) or 16 (Q5_0) times
    // |q_x| = 32767 everywhere; with d_w = d_x = 1 every partial sum is an exact integer.
    for (t, q) in [(GgmlType::Q8_0, 0x80u8), (GgmlType::Q5_0, 0x00), (GgmlType::Q4_0, 0x00)] {
        let mut w = vec![q; t.type_size()];
        w[0..2].copy_from_slice(&f16::from_f32(1.0).to_bits().to_le_bytes());
        let x = [BlockQ16 { d: 1.0, s: 0.0, qs: [32767; QK16] }];
        let qw = match t {
            GgmlType::Q8_0 => -128.0,
            GgmlType::Q5_0 => -16.0,
            _ => -8.0,
        };
        let want = qw * 32767.0 * 32.0;
        assert_eq!(vec_dot_q16(host(), t, &w, &x), want, "{t}");
        assert_eq!(scalar::vec_dot(t, &w, &x), want, "{t} scalar");
        #[cfg(target_arch = "x86_64")]
        for (name, f) in q16_impls() {
            assert_eq!(f(t, &w, &x), want, "{t} {name}");
        }
    }
}

#[test]
fn vec_dot_q16_is_much_closer_to_float_than_q8() {
    let mut rng = StdRng::seed_from_u64(14);
    for &t in &DOT_TYPES {
        let (mut e8, mut e16) = (0.0f64, 0.0f64);
        for &n in &[576usize, 1536] {
            for _ in 0..50 {
                let w = random_weights(t, n / QK8, &mut rng);
                // Activations like a transformer's: mostly unit scale with a few outliers.
                let xf: Vec<f32> = (0..n)
                    .map(|i| {
                        let v = rng.random_range(-1.0f32..1.0);
                        if i % 97 == 0 { 20.0 * v } else { v }
                    })
                    .collect();
                let (want, norm) = float_dot(t, &w, &xf);
                let q8 = f64::from(vec_dot_q8(host(), t, &w, &quantize(&xf)));
                let q16 = f64::from(vec_dot_q16(host(), t, &w, &quantize16(&xf)));
                e8 += (q8 - want).abs() / norm;
                e16 += (q16 - want).abs() / norm;
            }
        }
        assert!(e16 * 20.0 <= e8, "{t}: q16 error {e16}, q8 error {e8}");
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx512_q16() -> bool {
    isa_q16(host()) == IsaQ16::Avx512
}

#[cfg(target_arch = "x86_64")]
type DotQ16 = fn(GgmlType, &[u8], &[BlockQ16]) -> f32;

/// Every int16 dot-product implementation this CPU can run, by name.
#[cfg(target_arch = "x86_64")]
fn q16_impls() -> Vec<(&'static str, DotQ16)> {
    let mut v: Vec<(&'static str, DotQ16)> = vec![("scalar", scalar::vec_dot)];
    if has_avx2() {
        // SAFETY: checked has_avx2().
        v.push(("avx2", |t, w, x| unsafe { avx2::vec_dot(t, w, x) }));
    }
    if has_avx512_q16() {
        // SAFETY: checked has_avx512_q16().
        v.push(("avx512", |t, w, x| unsafe { avx512_q16::vec_dot(t, w, x) }));
    }
    v
}

#[cfg(target_arch = "x86_64")]
#[test]
fn vec_dot_q16_simd_close_to_scalar() {
    let impls = q16_impls();
    let mut rng = StdRng::seed_from_u64(15);
    for &t in &DOT_TYPES {
        for &nb in &[1usize, 2, 3, 18, 48] {
            for _ in 0..50 {
                let w = random_weights(t, nb, &mut rng);
                let x = quantize16(&random_acts(nb * QK16, &mut rng));
                let sc = scalar::vec_dot(t, &w, &x);
                let (want, norm) = reference_dot16(t, &w, &x);
                for (name, f) in &impls {
                    let got = f(t, &w, &x);
                    assert!(f64::from((sc - got).abs()) <= 1e-6 * norm + 1e-30, "{t} nb={nb}: scalar {sc} {name} {got}");
                    assert!((f64::from(got) - want).abs() <= 1e-6 * norm + 1e-30, "{t} nb={nb}: {name} {got} vs {want}");
                }
            }
        }
    }
}

#[test]
fn gemv_q16_is_bitwise_row_by_row() {
    let mut rng = StdRng::seed_from_u64(16);
    for &t in &DOT_TYPES {
        for &n in &[32usize, 96, 576] {
            let rows = 13;
            let row_bytes = t.bytes_for(n).unwrap();
            let w = random_weights(t, rows * n / QK16, &mut rng);
            let x = quantize16(&random_acts(n, &mut rng));
            let want: Vec<f32> = w.chunks_exact(row_bytes).map(|r| vec_dot_q16(host(), t, r, &x)).collect();
            let mut out = vec![f32::NAN; rows];
            gemv_q16(host(), t, &w, row_bytes, &x, &mut out);
            assert_eq!(bits(&out), bits(&want), "{t} n={n}");
            // Any split into calls gives the same bits.
            for &(start, len) in &[(0usize, 1usize), (3, 2), (5, 7), (12, 1)] {
                let mut part = vec![f32::NAN; len];
                gemv_q16(host(), t, &w[start * row_bytes..], row_bytes, &x, &mut part);
                assert_eq!(bits(&part), bits(&want[start..start + len]), "{t} n={n} rows {start}+{len}");
            }
            // Repeated calls give the same bits.
            assert_eq!(vec_dot_q16(host(), t, &w[..row_bytes], &x).to_bits(), want[0].to_bits());
            // The AVX2 path too when dispatch picks AVX-512.
            #[cfg(target_arch = "x86_64")]
            if has_avx2() {
                // SAFETY: checked has_avx2().
                let want: Vec<f32> = w.chunks_exact(row_bytes).map(|r| unsafe { avx2::vec_dot(t, r, &x) }).collect();
                let mut out = vec![f32::NAN; rows];
                // SAFETY: checked has_avx2().
                unsafe { avx2::gemv(t, &w, row_bytes, &x, &mut out) };
                assert_eq!(bits(&out), bits(&want), "{t} n={n} avx2");
            }
        }
    }
}

/// Checks `gemm` (a `gemm_q16` implementation) against `dot` (the matching `vec_dot_q16`) bit for
/// bit, for every type, several batch sizes, row counts and row lengths; the padding between
/// output rows must stay untouched.
fn check_gemm_bitwise(
    name: &str,
    gemm: impl Fn(GgmlType, &[u8], usize, &[BlockQ16], usize, &mut [f32], usize),
    dot: impl Fn(GgmlType, &[u8], &[BlockQ16]) -> f32,
) {
    let mut rng = StdRng::seed_from_u64(17);
    for &t in &DOT_TYPES {
        for &nb in &[1usize, 2, 3, 18] {
            let row_bytes = nb * t.type_size();
            for &rows in &[1usize, 3, 16, 17] {
                let w = random_weights(t, rows * nb, &mut rng);
                for &n in &[1usize, 2, 3, 4, 5, 8, 13] {
                    let x = quantize16(&random_acts(n * nb * QK16, &mut rng));
                    let stride = rows + 3;
                    let mut out = vec![f32::NAN; (n - 1) * stride + rows];
                    gemm(t, &w, row_bytes, &x, n, &mut out, stride);
                    for (b, xb) in x.chunks_exact(nb).enumerate() {
                        for (r, wr) in w.chunks_exact(row_bytes).enumerate() {
                            let want = dot(t, wr, xb);
                            let got = out[b * stride + r];
                            assert_eq!(got.to_bits(), want.to_bits(), "{name} {t} nb={nb} rows={rows} n={n}: b={b} r={r}: {got} vs {want}");
                        }
                        if b + 1 < n {
                            let pad = &out[b * stride + rows..(b + 1) * stride];
                            assert!(pad.iter().all(|v| v.is_nan()), "{name}: padding written");
                        }
                    }
                }
            }
        }
    }
}

/// At every level this host supports (AVX-512, AVX2 with and without AVX-VNNI, scalar), the batched kernel gives
/// each (row, activation row) the bits of that level's single-row product.
#[test]
fn gemm_q16_is_bitwise_vec_dot() {
    for isa in CpuIsa::supported() {
        check_gemm_bitwise(
            isa.level().name(),
            |t, w, row_bytes, x, n, out, stride| gemm_q16(isa, t, w, row_bytes, x, n, out, stride),
            |t, w, x| vec_dot_q16(isa, t, w, x),
        );
    }
}

#[test]
fn gemm_q16_matches_gemv_q16_in_a_tile() {
    // The worker's use: a tile of rows out of a larger matrix, outputs at a column offset.
    let mut rng = StdRng::seed_from_u64(18);
    let (t, cols, rows, n) = (GgmlType::Q4_1, 576usize, 40usize, 11usize);
    let row_bytes = t.bytes_for(cols).unwrap();
    let w = random_weights(t, rows * cols / QK16, &mut rng);
    let x = quantize16(&random_acts(n * cols, &mut rng));
    let nb = cols / QK16;
    let (r0, r1, stride, off) = (7usize, 30usize, 50usize, 5usize);
    let mut out = vec![0.0f32; n * stride];
    gemm_q16(host(), t, &w[r0 * row_bytes..r1 * row_bytes], row_bytes, &x, n, &mut out[off..], stride);
    for b in 0..n {
        let mut want = vec![0.0f32; r1 - r0];
        gemv_q16(host(), t, &w[r0 * row_bytes..r1 * row_bytes], row_bytes, &x[b * nb..(b + 1) * nb], &mut want);
        assert_eq!(bits(&out[b * stride + off..][..r1 - r0]), bits(&want), "b={b}");
    }
}

#[cfg(not(debug_assertions))]
#[test]
fn gemm_q16_clamps_inconsistent_lengths_in_release() {
    let mut rng = StdRng::seed_from_u64(19);
    let t = GgmlType::Q8_0;
    let row_bytes = 2 * t.type_size();
    let w = random_weights(t, 3 * 2, &mut rng);
    let x = quantize16(&random_acts(5 * 2 * QK16, &mut rng));
    // Room for 2 full output rows of stride 4 (the third would need 4 * 2 + 3 = 11 entries).
    let mut out = vec![f32::NAN; 10];
    gemm_q16(host(), t, &w, row_bytes, &x, 5, &mut out, 4);
    for b in 0..2 {
        for r in 0..3 {
            let want = vec_dot_q16(host(), t, &w[r * row_bytes..][..row_bytes], &x[b * 2..][..2]);
            assert_eq!(out[b * 4 + r].to_bits(), want.to_bits());
        }
    }
    assert!(out[3].is_nan() && out[7].is_nan() && out[8].is_nan() && out[9].is_nan());
    // Unsupported types leave `out` untouched.
    let mut out = [7.0f32; 4];
    gemm_q16(host(), GgmlType::Q4K, &[0u8; 144], 144, &[BlockQ16::default(); 8], 1, &mut out, 4);
    assert_eq!(out, [7.0; 4]);
}

#[cfg(not(debug_assertions))]
#[test]
fn unsupported_q16_dot_types_are_inert_in_release() {
    let w = vec![0u8; 144];
    let x = vec![BlockQ16::default(); 8];
    assert!(!supports_q16_dot(GgmlType::Q4K));
    assert_eq!(vec_dot_q16(host(), GgmlType::Q4K, &w, &x), 0.0);
    let mut out = [7.0f32; 1];
    gemv_q16(host(), GgmlType::Q4K, &w, 144, &x, &mut out);
    assert_eq!(out, [7.0]);
}

/// Rough timing of the decode hot loop: `cargo test --release -p ferrite-kernels --lib --
/// --ignored --nocapture bench_`.
#[test]
#[ignore]
fn bench_vec_dot_q4_1_576() {
    use std::hint::black_box;
    let mut rng = StdRng::seed_from_u64(8);
    let n = 576usize;
    let xf = random_acts(n, &mut rng);
    let x = quantize(&xf);
    let x16 = quantize16(&xf);
    println!("isa {:?}, q16 {:?}", isa(host()), isa_q16(host()));
    #[cfg(target_arch = "x86_64")]
    let avx2_too = has_avx512_q16();
    for &t in &DOT_TYPES {
        let w = random_weights(t, n / QK8, &mut rng);
        let ns = best_ns(300_000, || {
            black_box(vec_dot_q8(host(), t, black_box(&w), black_box(&x)));
        });
        let ns16 = best_ns(300_000, || {
            black_box(vec_dot_q16(host(), t, black_box(&w), black_box(&x16)));
        });
        println!("vec_dot {t} x{n}: q8 {ns:.1} ns/row, q16 {ns16:.1} ns/row");
        #[cfg(target_arch = "x86_64")]
        if avx2_too {
            let ns = best_ns(300_000, || {
                // SAFETY: AVX-512 dispatch implies avx2, fma and f16c.
                black_box(unsafe { avx2::vec_dot(t, black_box(&w), black_box(&x16)) });
            });
            println!("  (q16 on the avx2 path: {ns:.1} ns/row)");
        }
    }
    for (t, rows) in [(GgmlType::Q4_1, 1536usize), (GgmlType::Q8_0, 4096)] {
        let row_bytes = t.bytes_for(n).unwrap();
        let w = random_weights(t, rows * n / QK8, &mut rng);
        let mut out = vec![0.0f32; rows];
        let ns = best_ns(200, || gemv_q8(host(), t, black_box(&w), row_bytes, black_box(&x), &mut out));
        let ns16 = best_ns(200, || gemv_q16(host(), t, black_box(&w), row_bytes, black_box(&x16), &mut out));
        println!("gemv {t} {rows}x{n} ({} KiB): q8 {:.1} ns/row, q16 {:.1} ns/row", w.len() / 1024, ns / rows as f64, ns16 / rows as f64);
        #[cfg(target_arch = "x86_64")]
        if avx2_too {
            let ns = best_ns(200, || {
                // SAFETY: AVX-512 dispatch implies avx2, fma and f16c.
                unsafe { avx2::gemv(t, black_box(&w), row_bytes, black_box(&x16), &mut out) }
            });
            println!("  (q16 on the avx2 path: {:.1} ns/row)", ns / rows as f64);
        }
    }
    let mut q = vec![BlockQ8::default(); n / QK8];
    let ns = best_ns(100_000, || quantize_row_q8(host(), black_box(&xf), &mut q));
    let mut q16 = vec![BlockQ16::default(); n / QK16];
    let ns16 = best_ns(100_000, || quantize_row_q16(host(), black_box(&xf), &mut q16));
    println!("quantize_row x{n}: q8 {ns:.1} ns, q16 {ns16:.1} ns");
    let b: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let ns = best_ns(300_000, || {
        black_box(dot_f32(host(), black_box(&xf), black_box(&b)));
    });
    println!("dot_f32 x{n}: {ns:.1} ns");
}

/// Batched int16 products vs the per-activation-row gemv loop, in ns per (weight row x activation
/// row): `cargo test --release -p ferrite-kernels --lib -- --ignored --nocapture bench_gemm`.
#[test]
#[ignore]
fn bench_gemm_q16_q4_1_1536x576() {
    use std::hint::black_box;
    let mut rng = StdRng::seed_from_u64(9);
    println!("isa q16 {:?}", isa_q16(host()));
    for (t, rows, cols) in
        [(GgmlType::Q4_1, 1536usize, 576usize), (GgmlType::Q4_1, 576, 1536), (GgmlType::Q8_0, 1536, 576), (GgmlType::Q4_1, 512, 4096)]
    {
        let row_bytes = t.bytes_for(cols).unwrap();
        let nb = cols / QK16;
        let w = random_weights(t, rows * nb, &mut rng);
        for &n in &[1usize, 4, 8, 32] {
            let x = quantize16(&random_acts(n * cols, &mut rng));
            let mut out = vec![0.0f32; n * rows];
            let iters = (400 / n).max(10) * 576 / cols;
            let ns_gemv = best_ns(iters, || {
                for (xb, o) in x.chunks_exact(nb).zip(out.chunks_exact_mut(rows)) {
                    gemv_q16(host(), t, black_box(&w), row_bytes, black_box(xb), o);
                }
            });
            let ns_gemm = best_ns(iters, || {
                gemm_q16(host(), t, black_box(&w), row_bytes, black_box(&x), n, &mut out, rows);
            });
            let per = (rows * n) as f64;
            print!(
                "{t} {rows}x{cols} n={n:>2}: gemv loop {:5.2} ns, gemm {:5.2} ns ({:.2}x)",
                ns_gemv / per,
                ns_gemm / per,
                ns_gemv / ns_gemm
            );
            #[cfg(target_arch = "x86_64")]
            if has_avx512_q16() {
                // SAFETY: AVX-512 dispatch implies avx2, fma and f16c.
                let ns_gemv = best_ns(iters, || unsafe {
                    for (xb, o) in x.chunks_exact(nb).zip(out.chunks_exact_mut(rows)) {
                        avx2::gemv(t, black_box(&w), row_bytes, black_box(xb), o);
                    }
                });
                // SAFETY: as above; the lengths are consistent.
                let ns_gemm = best_ns(iters, || unsafe {
                    avx2_q16::gemm(t, black_box(&w), row_bytes, black_box(&x), nb, n, &mut out, rows, false);
                });
                print!("; avx2 path: gemv loop {:5.2} ns, gemm {:5.2} ns ({:.2}x)", ns_gemv / per, ns_gemm / per, ns_gemv / ns_gemm);
                if let Ok(vnni) = CpuIsa::capped(crate::cpu::isa::IsaLevel::Avx2Vnni) {
                    let ns_vnni = best_ns(iters, || gemm_q16(vnni, t, black_box(&w), row_bytes, black_box(&x), n, &mut out, rows));
                    print!(", avx2-vnni gemm {:5.2} ns", ns_vnni / per);
                }
            }
            println!();
        }
    }
}
