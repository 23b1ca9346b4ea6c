//! Dequantization of the K-quant super-blocks (256 elements), following llama.cpp's
//! `dequantize_row_q*_K` operation for operation (so the results are bit-exact with it and with
//! gguf-py).

use super::f16_at;

/// llama.cpp `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` (0..8) packed in the
/// 12 `scales` bytes of Q4_K / Q5_K.
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 { (q[j] & 63, q[j + 4] & 63) } else { ((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)) }
}

/// block_q2_K { u8 scales[16]; u8 qs[64]; f16 d; f16 dmin } (84 bytes). Sub-block i (16 values)
/// has scale `scales[i] & 15` and min `scales[i] >> 4`; value `d*sc * q - dmin*m`.
pub(crate) fn dequant_q2_k(b: &[u8], y: &mut [f32]) {
    let scales = &b[0..16];
    let qs = &b[16..80];
    let d = f16_at(b, 80);
    let dmin = f16_at(b, 82);
    let mut is = 0;
    let mut out = 0;
    for n in 0..2 {
        let q = &qs[n * 32..n * 32 + 32];
        for shift in [0u32, 2, 4, 6] {
            for half in 0..2 {
                let sc = scales[is];
                is += 1;
                let dl = d * f32::from(sc & 0x0F);
                let ml = dmin * f32::from(sc >> 4);
                for l in 0..16 {
                    let v = (q[half * 16 + l] >> shift) & 3;
                    y[out] = dl * f32::from(v) - ml;
                    out += 1;
                }
            }
        }
    }
}

/// block_q3_K { u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d } (110 bytes). 16 sub-blocks of 16
/// values with signed 6-bit scales; value `d*(sc-32) * (low2 - (hbit ? 0 : 4))`.
pub(crate) fn dequant_q3_k(b: &[u8], y: &mut [f32]) {
    let hm = &b[0..32];
    let qs = &b[32..96];
    let sc = &b[96..108];
    let d_all = f16_at(b, 108);
    // Unpack the 16 6-bit scales: low 4 bits from sc[0..8] (low nibbles first), high 2 bits
    // from sc[8..12].
    let mut scales = [0i8; 16];
    for (i, s) in scales.iter_mut().enumerate() {
        let lo = (sc[i % 8] >> (4 * (i / 8))) & 0x0F;
        let hi = (sc[8 + i % 4] >> (2 * (i / 4))) & 3;
        *s = ((lo | (hi << 4)) as i8).wrapping_sub(32);
    }
    let mut is = 0;
    let mut out = 0;
    let mut m = 1u8;
    for n in 0..2 {
        let q = &qs[n * 32..n * 32 + 32];
        for shift in [0u32, 2, 4, 6] {
            for half in 0..2 {
                let dl = d_all * f32::from(scales[is]);
                is += 1;
                for l in 0..16 {
                    let k = half * 16 + l;
                    let lo = ((q[k] >> shift) & 3) as i8;
                    let v = lo - if hm[k] & m != 0 { 0 } else { 4 };
                    y[out] = dl * f32::from(v);
                    out += 1;
                }
            }
            m = m.wrapping_shl(1);
        }
    }
}

/// block_q4_K { f16 d; f16 dmin; u8 scales[12]; u8 qs[128] } (144 bytes). 8 sub-blocks of 32
/// values; value `d*sc * q - dmin*m`.
pub(crate) fn dequant_q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for j in 0..4 {
        let q = &qs[j * 32..j * 32 + 32];
        let (sc1, m1) = scale_min_k4(2 * j, scales);
        let (sc2, m2) = scale_min_k4(2 * j + 1, scales);
        let (d1, m1) = (d * f32::from(sc1), dmin * f32::from(m1));
        let (d2, m2) = (d * f32::from(sc2), dmin * f32::from(m2));
        let y = &mut y[j * 64..j * 64 + 64];
        for l in 0..32 {
            y[l] = d1 * f32::from(q[l] & 0x0F) - m1;
            y[l + 32] = d2 * f32::from(q[l] >> 4) - m2;
        }
    }
}

/// The eight 32-element sub-blocks of a Q4_K block as Q4_1-like blocks with f32 fields (the weight panels' form):
/// f32 `d·sc_j`, f32 `-(dmin·m_j)` (both exact), then 16 bytes whose byte `t` holds element `t` (low nibble) and
/// element `t + 16` (high nibble). `d·q + (-(dmin·m))` is [`dequant_q4_k`]'s `d·q - dmin·m`, bit for bit.
pub(crate) fn q4_k_sub_blocks(b: &[u8]) -> [[u8; 24]; 8] {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    core::array::from_fn(|j| {
        let (sc, m) = scale_min_k4(j, scales);
        let q = &qs[(j / 2) * 32..(j / 2) * 32 + 32];
        let v = |l: usize| if j % 2 == 0 { q[l] & 0x0F } else { q[l] >> 4 };
        let mut out = [0u8; 24];
        out[0..4].copy_from_slice(&(d * f32::from(sc)).to_le_bytes());
        out[4..8].copy_from_slice(&(-(dmin * f32::from(m))).to_le_bytes());
        for t in 0..16 {
            out[8 + t] = v(t) | (v(t + 16) << 4);
        }
        out
    })
}

/// block_q5_K { f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128] } (176 bytes).
pub(crate) fn dequant_q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for j in 0..4 {
        let ql = &qs[j * 32..j * 32 + 32];
        let (u1, u2) = (1u8 << (2 * j), 2u8 << (2 * j));
        let (sc1, m1) = scale_min_k4(2 * j, scales);
        let (sc2, m2) = scale_min_k4(2 * j + 1, scales);
        let (d1, m1) = (d * f32::from(sc1), dmin * f32::from(m1));
        let (d2, m2) = (d * f32::from(sc2), dmin * f32::from(m2));
        let y = &mut y[j * 64..j * 64 + 64];
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[l] = d1 * f32::from((ql[l] & 0x0F) + h1) - m1;
            y[l + 32] = d2 * f32::from((ql[l] >> 4) + h2) - m2;
        }
    }
}

/// block_q6_K { u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d } (210 bytes). 16 sub-blocks of 16
/// values; value `d*sc * (q - 32)`.
pub(crate) fn dequant_q6_k(b: &[u8], y: &mut [f32]) {
    let ql_all = &b[0..128];
    let qh_all = &b[128..192];
    let sc_all = &b[192..208];
    let d = f16_at(b, 208);
    for n in 0..2 {
        let ql = &ql_all[n * 64..n * 64 + 64];
        let qh = &qh_all[n * 32..n * 32 + 32];
        let sc = &sc_all[n * 8..n * 8 + 8];
        let y = &mut y[n * 128..n * 128 + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i8 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
            let s = |k: usize| d * f32::from(sc[is + k] as i8);
            y[l] = s(0) * f32::from(q1);
            y[l + 32] = s(2) * f32::from(q2);
            y[l + 64] = s(4) * f32::from(q3);
            y[l + 96] = s(6) * f32::from(q4);
        }
    }
}

/// The eight 32-element blocks of a Q6_K block in the weight panels' form: f32 `d·sc` of the first 16 elements, f32
/// `d·sc` of the last 16 (both exact), then the 32 quants `q - 32` as i8. `d·sc · q` is [`dequant_q6_k`]'s value,
/// bit for bit.
pub(crate) fn q6_k_sub_blocks(b: &[u8]) -> [[u8; 40]; 8] {
    let d = f16_at(b, 208);
    core::array::from_fn(|jb| {
        let (n, m) = (jb / 4, jb % 4);
        let ql = &b[n * 64..n * 64 + 64];
        let qh = &b[128 + n * 32..128 + n * 32 + 32];
        let sc = &b[192 + n * 8..192 + n * 8 + 8];
        let mut out = [0u8; 40];
        for h in 0..2 {
            out[4 * h..4 * h + 4].copy_from_slice(&(d * f32::from(sc[2 * m + h] as i8)).to_le_bytes());
        }
        for l in 0..32 {
            // ggml's q1..q4: low nibbles of ql[l], ql[l + 32], then their high nibbles; bits 2m, 2m + 1 of qh[l].
            let byte = ql[l + 32 * (m % 2)];
            let low = if m < 2 { byte & 0x0F } else { byte >> 4 };
            let q = (low | (((qh[l] >> (2 * m)) & 3) << 4)) as i8 - 32;
            out[8 + l] = q as u8;
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_min_k4_matches_gguf_py_unpacking() {
        // gguf-py Q4_K.get_scale_min, written out for one byte pattern.
        let q: [u8; 12] = [0xC1, 0x82, 0x43, 0x04, 0xFF, 0x3E, 0x7D, 0xBC, 0x5A, 0xA5, 0x0F, 0xF0];
        for j in 0..8 {
            let (d, m) = (&q[0..4], &q[4..8]);
            let md = &q[8..12];
            let (sc, mn) = if j < 4 {
                (d[j] & 0x3F, m[j] & 0x3F)
            } else {
                let k = j - 4;
                ((md[k] & 0x0F) | ((d[k] >> 2) & 0x30), (md[k] >> 4) | ((m[k] >> 2) & 0x30))
            };
            assert_eq!(scale_min_k4(j, &q), (sc, mn), "sub-block {j}");
        }
    }
}
