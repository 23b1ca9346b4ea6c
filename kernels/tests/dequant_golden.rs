//! `dequantize_row` against gguf-py's `gguf.quants.dequantize` (fixture made by
//! `kernels/scripts/gen_dequant_golden.py`, see there to regenerate it).
//!
//! The comparison is bitwise: gguf-py (numpy) and ggml compute every element with the same
//! sequence of f32 operations (e.g. Q4_K: `(d * sc) * q - (dmin * m)`), without FMA
//! contraction, and so does `dequantize_row`.

use ferrite_kernels::cpu::quant::{GgmlType, dequantize_row};

const FIXTURE: &str = include_str!("data/dequant_golden.txt");

fn hex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex length");
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn type_by_name(name: &str) -> GgmlType {
    (0..64).filter_map(GgmlType::from_id).find(|t| t.name() == name).unwrap_or_else(|| panic!("unknown type {name}"))
}

#[test]
fn dequantize_row_matches_gguf_py() {
    let mut seen = Vec::new();
    for line in FIXTURE.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields.len(), 4, "bad fixture line");
        let t = type_by_name(fields[0]);
        let n: usize = fields[1].parse().unwrap();
        let src = hex(fields[2]);
        let want: Vec<u32> = hex(fields[3]).chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        assert_eq!(want.len(), n);
        assert_eq!(t.bytes_for(n), Some(src.len()), "{t}");

        let mut got = vec![0.0f32; n];
        dequantize_row(t, &src, &mut got).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), *w, "{t} element {i}: got {g:e}, want {:e}", f32::from_bits(*w));
        }

        // Block by block gives the same values.
        let (bs, ts) = (t.block_size(), t.type_size());
        let mut one = vec![0.0f32; bs];
        for (b, (src, want)) in src.chunks_exact(ts).zip(want.chunks_exact(bs)).enumerate() {
            dequantize_row(t, src, &mut one).unwrap();
            let one_bits: Vec<u32> = one.iter().map(|v| v.to_bits()).collect();
            assert_eq!(one_bits, want, "{t} block {b}");
        }
        seen.push(t);
    }
    use GgmlType::*;
    for t in [F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2K, Q3K, Q4K, Q5K, Q6K] {
        assert!(seen.contains(&t), "fixture lacks {t}");
    }
}
