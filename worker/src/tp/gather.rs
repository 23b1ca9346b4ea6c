//! Host-side assembly of what vocabulary-parallel ranks gathered (shared by CPU and GPU ranks, so the GPU's
//! bookkeeping is tested here without a device): rank `k` computed columns `vocab[k]` of every logit row.

use std::ops::Range;

/// Interleaves the gathered rank parts into full rows: rank `k`'s part starts at `offsets[k]` in `all` and holds
/// its `rows` rows densely (`vocab[k].len()` wide). Writes `rows · vocab_size` values to `out`.
pub fn interleave_vocab(all: &[f32], offsets: &[usize], vocab: &[Range<usize>], rows: usize, vocab_size: usize, out: &mut [f32]) {
    for ((v, &off), r) in vocab.iter().zip(offsets).flat_map(|p| (0..rows).map(move |r| (p, r))) {
        let src = &all[off + r * v.len()..off + (r + 1) * v.len()];
        out[r * vocab_size + v.start..r * vocab_size + v.end].copy_from_slice(src);
    }
}

/// The greedy id of each of `rows` rows from the ranks' gathered `(local argmax, max)` pairs: rank `k`'s ids (as
/// i32 bits) at `all[k·stride + r]` and maxima at `all[k·stride + cap + r]`. The highest value wins, the lowest
/// global id on ties (ranks hold ascending vocabulary slices); 0 when no rank has a value above -inf.
pub fn combine_argmax(all: &[f32], stride: usize, cap: usize, vocab: &[Range<usize>], rows: usize) -> Vec<u32> {
    (0..rows)
        .map(|r| {
            let mut best = (f32::NEG_INFINITY, u32::MAX);
            for (k, v) in vocab.iter().enumerate() {
                let id = v.start as u32 + all[k * stride + r].to_bits();
                let val = all[k * stride + cap + r];
                if val > best.0 || (val == best.0 && id < best.1) {
                    best = (val, id);
                }
            }
            if best.0 == f32::NEG_INFINITY { 0 } else { best.1 }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrite_kernels::cpu::ops::argmax;

    /// Splits `logits` (`rows × n`) by `vocab` as ranks would, padded parts of `pad` columns (0 = dense).
    fn split(logits: &[f32], rows: usize, n: usize, vocab: &[Range<usize>], pad: usize) -> (Vec<f32>, Vec<usize>) {
        let (mut all, mut offsets) = (Vec::new(), Vec::new());
        for v in vocab {
            offsets.push(all.len());
            for r in 0..rows {
                all.extend_from_slice(&logits[r * n + v.start..r * n + v.end]);
            }
            if pad > 0 {
                all.resize(offsets.last().unwrap() + rows * pad, f32::NAN);
            }
        }
        (all, offsets)
    }

    #[test]
    fn interleaving_restores_rows_from_dense_and_padded_parts() {
        let (rows, n) = (3, 10);
        let logits: Vec<f32> = (0..rows * n).map(|i| i as f32).collect();
        let vocab = [0..4, 4..8, 8..10]; // uneven: the last rank holds fewer
        for pad in [0, 4] {
            let (all, offsets) = split(&logits, rows, n, &vocab, pad);
            let mut out = vec![-1.0; rows * n];
            interleave_vocab(&all, &offsets, &vocab, rows, n, &mut out);
            assert_eq!(out, logits, "pad {pad}");
        }
    }

    #[test]
    fn combined_argmax_equals_the_whole_row_argmax() {
        let (rows, n, cap) = (4, 9, 6);
        let mut logits: Vec<f32> = (0..rows * n).map(|i| ((i * 7919) % 23) as f32).collect();
        // Row 1: a tie across ranks (lowest id wins); row 2: all -inf; row 3: NaNs never win.
        logits[n + 2] = 100.0;
        logits[n + 7] = 100.0;
        logits[2 * n..3 * n].fill(f32::NEG_INFINITY);
        logits[3 * n] = f32::NAN;
        logits[3 * n + 5] = 50.0;
        let vocab = [0..3, 3..6, 6..9];
        let mut all = vec![0f32; vocab.len() * 2 * cap];
        for (k, v) in vocab.iter().enumerate() {
            for r in 0..rows {
                let slice = &logits[r * n + v.start..r * n + v.end];
                let local = argmax(slice) as usize;
                all[k * 2 * cap + r] = f32::from_bits(local as u32);
                all[k * 2 * cap + cap + r] = if slice[local] > f32::NEG_INFINITY { slice[local] } else { f32::NEG_INFINITY };
            }
        }
        let want: Vec<u32> = logits.chunks(n).map(argmax).collect();
        assert_eq!(want[1..], [2, 0, 5]);
        assert_eq!(combine_argmax(&all, 2 * cap, cap, &vocab, rows), want);
    }
}
