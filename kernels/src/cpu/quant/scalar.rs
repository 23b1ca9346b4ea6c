//! Portable scalar kernels: the fallback on CPUs without AVX2 and the reference the SIMD paths
//! are tested against.

use super::{BlockQ8, BlockQ16, GgmlType, QK8, QK16, f16_at};

/// A block of quantized activations: `x[i] ≈ d * qs[i]`, `s = d * sum(qs)`.
pub(crate) trait Act {
    type Q: Copy + Into<i32>;
    fn d(&self) -> f32;
    fn s(&self) -> f32;
    fn qs(&self) -> &[Self::Q; 32];
}

impl Act for BlockQ8 {
    type Q = i8;
    fn d(&self) -> f32 {
        self.d
    }
    fn s(&self) -> f32 {
        self.s
    }
    fn qs(&self) -> &[i8; 32] {
        &self.qs
    }
}

impl Act for BlockQ16 {
    type Q = i16;
    fn d(&self) -> f32 {
        self.d
    }
    fn s(&self) -> f32 {
        self.s
    }
    fn qs(&self) -> &[i16; 32] {
        &self.qs
    }
}

/// `quantize_row_q8_1_ref` with f32 scales. The AVX2 version gives the same bits.
pub(crate) fn quantize_row_q8(x: &[f32], out: &mut [BlockQ8]) {
    for (xb, yb) in x.chunks_exact(QK8).zip(out.iter_mut()) {
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in yb.qs.iter_mut().zip(xb) {
            // f32::round rounds half away from zero, like C's roundf.
            let r = (v * id).round() as i8;
            *q = r;
            sum += i32::from(r);
        }
        yb.d = d;
        yb.s = d * sum as f32;
    }
}

/// `quantize_row_q16`: like [`quantize_row_q8`] with `d = amax / 32767`. The AVX2 version gives
/// the same bits.
pub(crate) fn quantize_row_q16(x: &[f32], out: &mut [BlockQ16]) {
    for (xb, yb) in x.chunks_exact(QK16).zip(out.iter_mut()) {
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 32767.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in yb.qs.iter_mut().zip(xb) {
            // |v * id| <= 32767 (+ rounding), so the cast never saturates to -32768.
            let r = (v * id).round() as i16;
            *q = r;
            sum += i32::from(r);
        }
        yb.d = d;
        yb.s = d * sum as f32;
    }
}

/// The integer part of one block product for every supported weight type: returns
/// `(sum(q_w * q_x), d_w, m_w)` with `m_w = 0` for the symmetric types. Cannot overflow: at
/// most 32 products of `|q_w| <= 128` and `|q_x| <= 32768`.
#[inline(always)]
fn block_dot<B: Act>(t: GgmlType, b: &[u8], x: &B) -> (i32, f32, f32) {
    let xq = x.qs().map(Into::<i32>::into);
    match t {
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let (off, zero) = if t == GgmlType::Q4_0 { (2, 8) } else { (4, 0) };
            let qs = &b[off..off + 16];
            let mut s = 0i32;
            for j in 0..16 {
                s += (i32::from(qs[j] & 0x0F) - zero) * xq[j];
                s += (i32::from(qs[j] >> 4) - zero) * xq[j + 16];
            }
            let m = if t == GgmlType::Q4_1 { f16_at(b, 2) } else { 0.0 };
            (s, f16_at(b, 0), m)
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let (off, zero) = if t == GgmlType::Q5_0 { (2, 16) } else { (4, 0) };
            let qh = u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]]);
            let qs = &b[off + 4..off + 20];
            let mut s = 0i32;
            for j in 0..16 {
                let h0 = (((qh >> j) << 4) & 0x10) as i32;
                let h1 = ((qh >> (j + 12)) & 0x10) as i32;
                s += ((i32::from(qs[j] & 0x0F) | h0) - zero) * xq[j];
                s += ((i32::from(qs[j] >> 4) | h1) - zero) * xq[j + 16];
            }
            let m = if t == GgmlType::Q5_1 { f16_at(b, 2) } else { 0.0 };
            (s, f16_at(b, 0), m)
        }
        GgmlType::Q8_0 => {
            let s = b[2..34].iter().zip(&xq).map(|(&q, &y)| i32::from(q as i8) * y).sum();
            (s, f16_at(b, 0), 0.0)
        }
        _ => (0, 0.0, 0.0),
    }
}

/// Scalar quantized dot product: per block `(d_w*d_x) * isum + m_w*s_x`, summed in order.
/// Unsupported types give 0.0.
pub(crate) fn vec_dot<B: Act>(t: GgmlType, w: &[u8], x: &[B]) -> f32 {
    if !super::supports_q8_dot(t) {
        return 0.0;
    }
    let mut sum = 0.0f32;
    for (b, xb) in w.chunks_exact(t.type_size()).zip(x) {
        let (isum, d, m) = block_dot(t, b, xb);
        sum += (d * xb.d()) * isum as f32 + m * xb.s();
    }
    sum
}

/// Scalar `dot_f32`: same blocking as the AVX2 version (4 x 8 lanes), without FMA.
pub(crate) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [[0.0f32; 8]; 4];
    let n32 = a.len() / 32 * 32;
    for (ca, cb) in a[..n32].chunks_exact(32).zip(b[..n32].chunks_exact(32)) {
        for (k, acc) in acc.iter_mut().enumerate() {
            for l in 0..8 {
                acc[l] += ca[8 * k + l] * cb[8 * k + l];
            }
        }
    }
    let n8 = a.len() / 8 * 8;
    for (ca, cb) in a[n32..n8].chunks_exact(8).zip(b[n32..n8].chunks_exact(8)) {
        for l in 0..8 {
            acc[0][l] += ca[l] * cb[l];
        }
    }
    let mut v = [0.0f32; 8];
    for l in 0..8 {
        v[l] = (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]);
    }
    let mut sum = hsum8(v);
    for (x, y) in a[n8..].iter().zip(&b[n8..]) {
        sum += x * y;
    }
    sum
}

/// The 8-lane reduction order of the AVX2 `hsum`: halves, then pairs, then the last two.
fn hsum8(v: [f32; 8]) -> f32 {
    let s4 = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
    let s2 = [s4[0] + s4[2], s4[1] + s4[3]];
    s2[0] + s2[1]
}
