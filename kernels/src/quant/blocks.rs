//! One block of each supported type, dequantized as ggml's reference does (`ggml-quants.c`,
//! `dequantize_row_*`): the same f32 products in the same order, no fused multiply-adds.
//!
//! Layouts (little-endian; `d`, `dmin` are f16):
//! - Q4_0 (32 weights, 18 bytes): `d`, 16 bytes of nibbles; weight j is the low nibble of
//!   byte j (j < 16) or the high nibble of byte j - 16, minus 8, times d.
//! - Q5_0 (32, 22): `d`, 32 high bits (u32), 16 bytes of low nibbles; minus 16.
//! - Q8_0 (32, 34): `d`, 32 i8.
//! - Q4_K (256, 144): `d`, `dmin`, 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32,
//!   128 bytes of nibbles: weight = d·scale·q - dmin·min.
//! - Q5_K (256, 176): as Q4_K with 32 bytes of fifth bits before the nibbles.
//! - Q6_K (256, 210): 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 i8 scales (one per
//!   16 weights), `d`: weight = d·scale·(q - 32).

use half::f16;

pub const Q4_0_BYTES: usize = 18;
pub const Q5_0_BYTES: usize = 22;
pub const Q8_0_BYTES: usize = 34;
pub const Q4K_BYTES: usize = 144;
pub const Q5K_BYTES: usize = 176;
pub const Q6K_BYTES: usize = 210;

#[inline(always)]
pub fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

pub fn dequantize_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for (j, &q) in qs.iter().enumerate() {
        y[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

pub fn dequantize_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for (j, &q) in qs.iter().enumerate() {
        let h0 = ((qh >> j) << 4) & 0x10;
        let h1 = (qh >> (j + 12)) & 0x10;
        y[j] = (((q as u32 & 0x0F) | h0) as i32 - 16) as f32 * d;
        y[j + 16] = (((q as u32 >> 4) | h1) as i32 - 16) as f32 * d;
    }
}

pub fn dequantize_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (o, &q) in y.iter_mut().zip(&b[2..34]) {
        *o = q as i8 as f32 * d;
    }
}

/// Scale and min of sub-block `j` (0..8) from the 12 packed bytes of a Q4_K/Q5_K block: six
/// bits each; sub-blocks 4..8 keep their high two bits in the top bits of bytes 0..8.
#[inline(always)]
pub fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

pub fn dequantize_q4k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (c, (q, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * c, scales);
        let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        for (l, &q) in q.iter().enumerate() {
            y[l] = d1 * (q & 0x0F) as f32 - m1;
            y[l + 32] = d2 * (q >> 4) as f32 - m2;
        }
    }
}

pub fn dequantize_q5k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qh = &b[16..48];
    let ql = &b[48..176];
    for (c, (q, y)) in ql.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * c, scales);
        let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let (u1, u2) = (1u8 << (2 * c), 2u8 << (2 * c));
        for (l, &q) in q.iter().enumerate() {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[l] = d1 * ((q & 0x0F) + h1) as f32 - m1;
            y[l + 32] = d2 * ((q >> 4) + h2) as f32 - m2;
        }
    }
}

pub fn dequantize_q6k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let sc = &b[192 + 8 * half..192 + 8 * half + 8];
        let y = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | (qh[l] & 3) << 4) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | ((qh[l] >> 2) & 3) << 4) as i32 - 32;
            let q3 = ((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4) as i32 - 32;
            let s = |i: usize| d * sc[is + i] as i8 as f32;
            y[l] = s(0) * q1 as f32;
            y[l + 32] = s(2) * q2 as f32;
            y[l + 64] = s(4) * q3 as f32;
            y[l + 96] = s(6) * q4 as f32;
        }
    }
}
