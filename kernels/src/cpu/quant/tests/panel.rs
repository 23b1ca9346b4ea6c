//! Tests of the weight panels (`pack_panels`, `dequantize_panel_row`, `gemm_q16_panels`) and their micro-benchmark.

use rand::SeedableRng;
use rand::rngs::StdRng;

use super::*;

const PANEL_TYPES: [GgmlType; 7] =
    [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0, GgmlType::Q4K, GgmlType::Q6K];

/// `rows` random rows of `nb` 32-element blocks of type `t` (for the K-quants a multiple of 8), with sane f16 fields.
fn panel_weights(t: GgmlType, rows: usize, nb: usize, rng: &mut StdRng) -> Vec<u8> {
    let blocks = rows * nb * QK16 / t.block_size();
    let mut w = random_weights(t, blocks, rng);
    // random_weights sets bytes 0..2 (and 2..4 for Q4_1); the K-quants' other f16 fields too, so no block holds NaN.
    for b in w.chunks_exact_mut(t.type_size()) {
        match t {
            GgmlType::Q4K => b[2..4].copy_from_slice(&f16::from_f32(0.01).to_bits().to_le_bytes()),
            GgmlType::Q6K => b[208..210].copy_from_slice(&f16::from_f32(0.002).to_bits().to_le_bytes()),
            _ => {}
        }
    }
    w
}

/// Blocks of 32 per row that `t` can have (Q4_K: whole 256-element super-blocks).
fn nb_for(t: GgmlType, nb: usize) -> usize {
    if matches!(t, GgmlType::Q4K | GgmlType::Q6K) { nb.next_multiple_of(8) } else { nb }
}

fn quantize16(x: &[f32]) -> Vec<BlockQ16> {
    let mut q = vec![BlockQ16::default(); x.len() / QK16];
    quantize_row_q16(host(), x, &mut q);
    q
}

#[test]
fn panel_rows_dequantize_to_the_ggml_rows_bit_for_bit() {
    let mut rng = StdRng::seed_from_u64(21);
    for t in PANEL_TYPES {
        let (rows, nb) = (24, nb_for(t, 3));
        let row_bytes = nb * QK16 / t.block_size() * t.type_size();
        let w = panel_weights(t, rows, nb, &mut rng);
        let packed = pack_panels(t, &w, rows, row_bytes).unwrap();
        assert_eq!(packed.len(), rows * panel_row_bytes(t, nb * QK16), "{t}");
        let (mut got, mut want) = (vec![0f32; nb * QK16], vec![0f32; nb * QK16]);
        for r in 0..rows {
            dequantize_panel_row(t, &packed, nb, r, &mut got);
            dequantize_row(t, &w[r * row_bytes..(r + 1) * row_bytes], &mut want).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{t} row {r}");
        }
    }
}

#[test]
fn pack_refuses_partial_panels_and_other_types() {
    let t = GgmlType::Q4_1;
    let w = vec![0u8; 12 * 20];
    assert!(matches!(pack_panels(t, &w, 12, 20), Err(QuantError::BadLength { .. })));
    assert!(matches!(pack_panels(t, &w[..8 * 20 - 1], 8, 20), Err(QuantError::BadLength { .. })));
    assert_eq!(pack_panels(GgmlType::Q5K, &[0u8; 8 * 176], 8, 176), Err(QuantError::Unsupported(GgmlType::Q5K)));
    assert!(!supports_panels(GgmlType::Q5K) && !supports_panels(GgmlType::Q2K) && supports_panels(GgmlType::Q5_1));
}

/// Every ISA gives the scalar twin's bits, for any number of activation rows and any output stride, and one
/// activation row alone gives the bits it gets in a batch.
#[test]
fn panel_gemm_is_bitwise_the_scalar_twin_and_batch_invariant() {
    let mut rng = StdRng::seed_from_u64(22);
    for t in PANEL_TYPES {
        for nb in [1usize, 2, 18].map(|nb| nb_for(t, nb)) {
            let rows = 16;
            let row_bytes = nb * QK16 / t.block_size() * t.type_size();
            let packed = pack_panels(t, &panel_weights(t, rows, nb, &mut rng), rows, row_bytes).unwrap();
            for n in [1usize, 2, 3, 4, 5, 7, 9] {
                let x = quantize16(&random_acts(n * nb * QK16, &mut rng));
                let stride = rows + 3;
                let mut want = vec![f32::NAN; n * stride];
                crate::cpu::quant::panel::scalar_gemm(t, &packed, nb, &x, n, &mut want, stride);
                for isa in CpuIsa::supported() {
                    let mut got = vec![f32::NAN; n * stride];
                    gemm_q16_panels(isa, t, &packed, nb, &x, n, &mut got, stride);
                    for b in 0..n {
                        let (g, w) = (&got[b * stride..][..rows], &want[b * stride..][..rows]);
                        assert_eq!(
                            g.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            w.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            "{t} nb {nb} n {n} b {b} {isa}"
                        );
                        let mut alone = vec![0.0f32; rows];
                        gemm_q16_panels(isa, t, &packed, nb, &x[b * nb..(b + 1) * nb], 1, &mut alone, rows);
                        assert_eq!(alone, g, "{t} nb {nb} n {n} b {b} {isa}: alone");
                    }
                    // The padding between output rows is never written.
                    assert!(got.chunks(stride).all(|r| r[rows..].iter().all(|v| v.is_nan())), "{t} {isa}");
                }
            }
        }
    }
}

/// The panel products agree with an f64 dot product of the dequantized weights and quantized activations.
#[test]
fn panel_gemm_tracks_the_exact_dot_product() {
    let mut rng = StdRng::seed_from_u64(23);
    for t in PANEL_TYPES {
        let (rows, nb) = (8, nb_for(t, 18));
        let row_bytes = nb * QK16 / t.block_size() * t.type_size();
        let w = panel_weights(t, rows, nb, &mut rng);
        let packed = pack_panels(t, &w, rows, row_bytes).unwrap();
        let x = quantize16(&random_acts(nb * QK16, &mut rng));
        for isa in CpuIsa::supported() {
            let mut got = vec![0.0f32; rows];
            gemm_q16_panels(isa, t, &packed, nb, &x, 1, &mut got, rows);
            for (r, &g) in got.iter().enumerate() {
                let mut wf = vec![0.0f32; nb * QK16];
                dequantize_row(t, &w[r * row_bytes..(r + 1) * row_bytes], &mut wf).unwrap();
                let (mut dot, mut norm) = (0.0f64, 0.0f64);
                for (wb, xb) in wf.chunks_exact(QK16).zip(&x) {
                    for (&wv, &q) in wb.iter().zip(&xb.qs) {
                        let p = f64::from(wv) * f64::from(xb.d) * f64::from(q);
                        dot += p;
                        norm += p.abs();
                    }
                }
                assert!((f64::from(g) - dot).abs() <= 1e-5 * norm + 1e-30, "{t} {isa} row {r}: {g} vs {dot} (norm {norm})");
            }
        }
    }
}

/// Panels against the row-major `gemm_q16` at every supported level, ns per (row x activation row):
/// `cargo test --release -p ferrite-kernels --lib bench_panels -- --ignored --nocapture`.
#[test]
#[ignore = "micro-benchmark"]
fn bench_panels() {
    use std::hint::black_box;
    let mut rng = StdRng::seed_from_u64(24);
    for (t, rows, cols) in [
        (GgmlType::Q4_1, 1536usize, 576usize),
        (GgmlType::Q4_1, 576, 1536),
        (GgmlType::Q8_0, 1536, 576),
        (GgmlType::Q4_0, 1536, 576),
        (GgmlType::Q5_0, 1536, 576),
        (GgmlType::Q5_1, 1536, 576),
        (GgmlType::Q4K, 1536, 512),
    ] {
        let row_bytes = t.bytes_for(cols).unwrap();
        let nb = cols / QK16;
        let w = panel_weights(t, rows, nb, &mut rng);
        let packed = pack_panels(t, &w, rows, row_bytes).unwrap();
        for n in [1usize, 4, 32] {
            let x = quantize16(&random_acts(n * cols, &mut rng));
            let mut out = vec![0.0f32; n * rows];
            let iters = (400 / n).max(10) * 576 / cols;
            let time = |f: &mut dyn FnMut()| best_ns(iters, f) / (rows * n) as f64;
            print!("{t} {rows}x{cols} n={n:>2}:");
            for isa in CpuIsa::supported().into_iter().filter(|i| i.has_avx2()) {
                let rm = time(&mut || gemm_q16(isa, t, black_box(&w), row_bytes, black_box(&x), n, &mut out, rows));
                let pn = time(&mut || gemm_q16_panels(isa, t, black_box(&packed), nb, black_box(&x), n, &mut out, rows));
                print!("  {isa}: rows {rm:5.2} ns, panels {pn:5.2} ns ({:.2}x)", rm / pn);
            }
            println!();
        }
    }
}
