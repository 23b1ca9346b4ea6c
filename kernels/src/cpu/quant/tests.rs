use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::cpu::isa::CpuIsa;

/// The ISA the dispatching functions are tested at: the host's best.
fn host() -> CpuIsa {
    CpuIsa::host()
}

const DOT_TYPES: [GgmlType; 5] = [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0];

/// Random weight blocks of type `t` (random quants, sane f16 scale/min fields).
fn random_weights(t: GgmlType, blocks: usize, rng: &mut StdRng) -> Vec<u8> {
    let ts = t.type_size();
    let mut w = vec![0u8; blocks * ts];
    rng.fill(&mut w[..]);
    for b in w.chunks_exact_mut(ts) {
        let d = rng.random_range(-0.05f32..0.05);
        b[0..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        if matches!(t, GgmlType::Q4_1 | GgmlType::Q5_1) {
            let m = rng.random_range(-0.5f32..0.5);
            b[2..4].copy_from_slice(&f16::from_f32(m).to_bits().to_le_bytes());
        }
    }
    w
}

fn random_acts(n: usize, rng: &mut StdRng) -> Vec<f32> {
    (0..n)
        .map(|i| {
            // A few blocks with tiny or zero values, most with outliers of varying size.
            let scale = match (i / QK8) % 7 {
                0 => 0.0,
                1 => 1e-30,
                2 => 100.0,
                _ => 1.0,
            };
            scale * rng.random_range(-3.0f32..3.0)
        })
        .collect()
}

fn quantize(x: &[f32]) -> Vec<BlockQ8> {
    let mut q = vec![BlockQ8::default(); x.len() / QK8];
    quantize_row_q8(host(), x, &mut q);
    q
}

/// Reference dot product in f64 from the dequantized weights and activations, and the scale the
/// error is measured against (sum of |w_i| |x_i|).
fn reference_dot(t: GgmlType, w: &[u8], x: &[BlockQ8]) -> (f64, f64) {
    let mut wf = vec![0.0f32; x.len() * QK8];
    dequantize_row(t, w, &mut wf).unwrap();
    let (mut dot, mut norm) = (0.0f64, 0.0f64);
    for (wb, xb) in wf.chunks_exact(QK8).zip(x) {
        for (&wv, &q) in wb.iter().zip(&xb.qs) {
            let xv = f64::from(xb.d) * f64::from(q);
            dot += f64::from(wv) * xv;
            norm += (f64::from(wv) * xv).abs();
        }
    }
    (dot, norm)
}

#[test]
fn quantize_row_q8_round_trip() {
    let mut rng = StdRng::seed_from_u64(1);
    let x = random_acts(32 * 64, &mut rng);
    let q = quantize(&x);
    for (xb, b) in x.chunks_exact(QK8).zip(&q) {
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert_eq!(b.d, amax / 127.0);
        let sum: i32 = b.qs.iter().map(|&v| i32::from(v)).sum();
        assert_eq!(b.s, b.d * sum as f32);
        for (&v, &qv) in xb.iter().zip(&b.qs) {
            assert!(qv != -128);
            let err = (v - b.d * f32::from(qv)).abs();
            assert!(err <= b.d * 0.5 * (1.0 + 1e-5), "x={v} q={qv} d={}", b.d);
        }
        if amax == 0.0 {
            assert_eq!(b.qs, [0; QK8]);
            assert_eq!(b.s, 0.0);
        }
    }
}

#[test]
fn quantize_row_q8_rounds_half_away_from_zero() {
    // amax 127 -> d = 1, id = 1: x * id == x exactly.
    let mut x = [0.0f32; 32];
    let vals = [127.0, -126.5, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 0.49999997, -0.49999997, -0.0];
    x[..vals.len()].copy_from_slice(&vals);
    let q = quantize(&x);
    assert_eq!(q[0].d, 1.0);
    assert_eq!(&q[0].qs[..vals.len()], &[127, -127, 1, -1, 2, -2, 3, -3, 0, 0, 0]);
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    isa(host()) == Isa::Avx2
}

#[cfg(target_arch = "x86_64")]
#[test]
fn quantize_row_q8_simd_equals_scalar() {
    if !has_avx2() {
        return;
    }
    let mut rng = StdRng::seed_from_u64(2);
    let mut x = random_acts(32 * 256, &mut rng);
    // Blocks whose values land exactly on .5 after scaling, and near it.
    for (i, v) in x[..64].iter_mut().enumerate() {
        *v = if i % 32 == 0 { 127.0 } else { (i as f32 - 40.0) * 0.5 + if i % 3 == 0 { 1e-5 } else { 0.0 } };
    }
    // Blocks with d == 1 (amax 127) holding every f32 within 40 ulps of each k/2, |k/2| <= 127.
    for k in -254i32..=254 {
        let h = k as f32 * 0.5;
        let mut vals: Vec<f32> =
            (-40i32..=40).map(|u| f32::from_bits(h.to_bits().wrapping_add_signed(u))).filter(|v| v.abs() <= 127.0).collect();
        vals.push(h);
        for chunk in vals.chunks(31) {
            x.push(127.0);
            x.extend_from_slice(chunk);
            x.resize(x.len().next_multiple_of(QK8), 0.0);
        }
    }
    let mut a = vec![BlockQ8::default(); x.len() / QK8];
    let mut b = a.clone();
    scalar::quantize_row_q8(&x, &mut a);
    // SAFETY: checked has_avx2() above.
    unsafe { avx2::quantize_row_q8(&x, &mut b) };
    for (i, (a, b)) in a.iter().zip(&b).enumerate() {
        assert_eq!(a.d.to_bits(), b.d.to_bits(), "block {i}");
        assert_eq!(a.s.to_bits(), b.s.to_bits(), "block {i}");
        assert_eq!(a.qs, b.qs, "block {i}");
    }
}

#[test]
fn vec_dot_q8_matches_reference() {
    let mut rng = StdRng::seed_from_u64(3);
    for &t in &DOT_TYPES {
        assert!(supports_q8_dot(t));
        for &n in &[32usize, 64, 96, 576, 1536] {
            for _ in 0..20 {
                let w = random_weights(t, n / QK8, &mut rng);
                let x = quantize(&random_acts(n, &mut rng));
                let got = f64::from(vec_dot_q8(host(), t, &w, &x));
                let (want, norm) = reference_dot(t, &w, &x);
                assert!((got - want).abs() <= 1e-5 * norm + 1e-30, "{t} n={n}: {got} vs {want} (norm {norm})");
                let sc = f64::from(scalar::vec_dot(t, &w, &x));
                assert!((sc - want).abs() <= 1e-5 * norm + 1e-30, "{t} n={n} scalar: {sc} vs {want}");
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn vec_dot_q8_simd_close_to_scalar() {
    if !has_avx2() {
        return;
    }
    let mut rng = StdRng::seed_from_u64(4);
    for &t in &DOT_TYPES {
        for &nb in &[1usize, 2, 3, 18, 48] {
            for _ in 0..50 {
                let w = random_weights(t, nb, &mut rng);
                let x = quantize(&random_acts(nb * QK8, &mut rng));
                let sc = scalar::vec_dot(t, &w, &x);
                // SAFETY: checked has_avx2() above.
                let simd = unsafe { avx2::vec_dot(t, &w, &x) };
                let (_, norm) = reference_dot(t, &w, &x);
                assert!(f64::from((sc - simd).abs()) <= 1e-5 * norm + 1e-30, "{t} nb={nb}: scalar {sc} simd {simd}");
            }
        }
    }
}

#[test]
fn gemv_q8_is_bitwise_row_by_row() {
    let mut rng = StdRng::seed_from_u64(5);
    for &t in &DOT_TYPES {
        for &n in &[32usize, 576] {
            let rows = 13;
            let row_bytes = t.bytes_for(n).unwrap();
            let w = random_weights(t, rows * n / QK8, &mut rng);
            let x = quantize(&random_acts(n, &mut rng));
            let want: Vec<f32> = w.chunks_exact(row_bytes).map(|r| vec_dot_q8(host(), t, r, &x)).collect();
            let mut out = vec![f32::NAN; rows];
            gemv_q8(host(), t, &w, row_bytes, &x, &mut out);
            assert_eq!(bits(&out), bits(&want), "{t} n={n}");
            // Any split into calls gives the same bits.
            for &(start, len) in &[(0usize, 1usize), (3, 2), (5, 7), (12, 1)] {
                let mut part = vec![f32::NAN; len];
                gemv_q8(host(), t, &w[start * row_bytes..], row_bytes, &x, &mut part);
                assert_eq!(bits(&part), bits(&want[start..start + len]), "{t} n={n} rows {start}+{len}");
            }
        }
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

#[test]
fn vec_dot_q8_is_deterministic() {
    let mut rng = StdRng::seed_from_u64(6);
    let w = random_weights(GgmlType::Q4_1, 18, &mut rng);
    let x = quantize(&random_acts(576, &mut rng));
    let first = vec_dot_q8(host(), GgmlType::Q4_1, &w, &x).to_bits();
    for _ in 0..100 {
        assert_eq!(vec_dot_q8(host(), GgmlType::Q4_1, &w, &x).to_bits(), first);
    }
}

#[cfg(not(debug_assertions))]
#[test]
fn unsupported_dot_types_are_inert_in_release() {
    let w = vec![0u8; 144];
    let x = vec![BlockQ8::default(); 8];
    assert!(!supports_q8_dot(GgmlType::Q4K));
    assert_eq!(vec_dot_q8(host(), GgmlType::Q4K, &w, &x), 0.0);
    let mut out = [7.0f32; 1];
    gemv_q8(host(), GgmlType::Q4K, &w, 144, &x, &mut out);
    assert_eq!(out, [7.0]);
}

#[test]
fn dot_f32_matches_f64_reference() {
    let mut rng = StdRng::seed_from_u64(7);
    for n in (0..100).chain([576, 1536, 4099]) {
        let a: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let b: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let want: f64 = a.iter().zip(&b).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum();
        let norm: f64 = a.iter().zip(&b).map(|(&x, &y)| (f64::from(x) * f64::from(y)).abs()).sum();
        let got = dot_f32(host(), &a, &b);
        assert!((f64::from(got) - want).abs() <= 1e-6 * norm + 1e-12, "n={n}: {got} vs {want}");
        let sc = scalar::dot_f32(&a, &b);
        assert!((f64::from(sc) - want).abs() <= 1e-6 * norm + 1e-12, "n={n} scalar: {sc} vs {want}");
        assert_eq!(dot_f32(host(), &a, &b).to_bits(), got.to_bits());
    }
}

#[test]
fn dequantize_row_errors_and_plain_floats() {
    let mut out = [0.0f32; 3];
    let src: Vec<u8> = [1.0f32, -2.5, 3.25].iter().flat_map(|v| v.to_le_bytes()).collect();
    dequantize_row(GgmlType::F32, &src, &mut out).unwrap();
    assert_eq!(out, [1.0, -2.5, 3.25]);
    assert_eq!(
        dequantize_row(GgmlType::F32, &src[..8], &mut out),
        Err(QuantError::BadLength { dtype: GgmlType::F32, elements: 3, bytes: 8 })
    );
    let mut out32 = [0.0f32; 33];
    assert!(matches!(dequantize_row(GgmlType::Q4_0, &[0; 18], &mut out32), Err(QuantError::BadLength { .. })));
    for t in [GgmlType::Q8_1, GgmlType::Q8K] {
        let mut out = vec![0.0f32; t.block_size()];
        let src = vec![0u8; t.type_size()];
        assert_eq!(dequantize_row(t, &src, &mut out), Err(QuantError::Unsupported(t)));
    }
    let e = QuantError::BadLength { dtype: GgmlType::Q4_1, elements: 64, bytes: 3 };
    assert_eq!(e.to_string(), "64 elements of type q4_1 do not match 3 bytes of data");
    // Empty rows are fine.
    dequantize_row(GgmlType::Q6K, &[], &mut []).unwrap();
}

#[test]
fn dequantize_q4_1_by_hand() {
    // d = 0.5, m = -1.0, qs[j] = j | (15 - j) << 4
    let mut b = Vec::new();
    b.extend_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
    b.extend_from_slice(&f16::from_f32(-1.0).to_bits().to_le_bytes());
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let mut y = [0.0f32; 32];
    dequantize_row(GgmlType::Q4_1, &b, &mut y).unwrap();
    for j in 0..16 {
        assert_eq!(y[j], 0.5 * j as f32 - 1.0);
        assert_eq!(y[j + 16], 0.5 * (15 - j) as f32 - 1.0);
    }
}

/// Best of 7 runs of `iters` calls of `f`, in ns per call (the machine may be shared).
fn best_ns(iters: usize, mut f: impl FnMut()) -> f64 {
    (0..7)
        .map(|_| {
            let start = std::time::Instant::now();
            for _ in 0..iters {
                f();
            }
            start.elapsed().as_nanos() as f64 / iters as f64
        })
        .fold(f64::INFINITY, f64::min)
}

mod panel;
mod q16;
