//! Portable dot products of one quantized weight row with one quantized activation row. The
//! integer part of each block is exact (the same integers as ggml's); the f32 part is one
//! sequential sum over blocks, in order, so it does not depend on how many rows a matmul has.

use super::act::{Q8KRow, Q8_0Row};
use super::blocks::{
    f16_at, scale_min_k4, Q4K_BYTES, Q4_0_BYTES, Q5K_BYTES, Q5_0_BYTES, Q6K_BYTES, Q8_0_BYTES,
};

fn isum(w: impl Iterator<Item = i32>, x: &[i8]) -> i32 {
    w.zip(x).map(|(w, &x)| w * x as i32).sum()
}

/// Weight values of a Q4_0 block, in order.
fn q4_0_values(b: &[u8]) -> impl Iterator<Item = i32> + '_ {
    let qs = &b[2..18];
    qs.iter()
        .map(|&q| (q & 0x0F) as i32 - 8)
        .chain(qs.iter().map(|&q| (q >> 4) as i32 - 8))
}

fn q5_0_values(b: &[u8]) -> impl Iterator<Item = i32> + '_ {
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    (0..32).map(move |j| {
        let (nib, bit) = if j < 16 {
            (qs[j] & 0x0F, (qh >> j) & 1)
        } else {
            (qs[j - 16] >> 4, (qh >> j) & 1)
        };
        (nib as u32 | bit << 4) as i32 - 16
    })
}

pub fn dot_q8_0(w: &[u8], x: &Q8_0Row) -> f32 {
    let mut sum = 0f32;
    for ((b, &dx), xq) in w
        .chunks_exact(Q8_0_BYTES)
        .zip(&x.d)
        .zip(x.q.chunks_exact(32))
    {
        let s = isum(b[2..34].iter().map(|&q| q as i8 as i32), xq);
        sum += (f16_at(b, 0) * dx) * s as f32;
    }
    sum
}

pub fn dot_q4_0(w: &[u8], x: &Q8_0Row) -> f32 {
    let mut sum = 0f32;
    for ((b, &dx), xq) in w
        .chunks_exact(Q4_0_BYTES)
        .zip(&x.d)
        .zip(x.q.chunks_exact(32))
    {
        sum += (f16_at(b, 0) * dx) * isum(q4_0_values(b), xq) as f32;
    }
    sum
}

pub fn dot_q5_0(w: &[u8], x: &Q8_0Row) -> f32 {
    let mut sum = 0f32;
    for ((b, &dx), xq) in w
        .chunks_exact(Q5_0_BYTES)
        .zip(&x.d)
        .zip(x.q.chunks_exact(32))
    {
        sum += (f16_at(b, 0) * dx) * isum(q5_0_values(b), xq) as f32;
    }
    sum
}

/// Σ over sub-blocks of scale · (weights · x), and Σ of min · (sum of x), for a Q4_K or Q5_K
/// block whose 5- or 4-bit values `value(j, l)` (sub-block j, element l) are given.
fn k4_block(
    scales: &[u8],
    x: &[i8],
    bsums: &[i16],
    value: impl Fn(usize, usize) -> i32,
) -> (i32, i32) {
    let (mut sumi, mut summ) = (0i32, 0i32);
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, scales);
        let xs = &x[32 * j..32 * j + 32];
        let s: i32 = (0..32).map(|l| value(j, l) * xs[l] as i32).sum();
        sumi += sc as i32 * s;
        summ += m as i32 * (bsums[2 * j] as i32 + bsums[2 * j + 1] as i32);
    }
    (sumi, summ)
}

pub fn dot_q4k(w: &[u8], x: &Q8KRow) -> f32 {
    let mut sum = 0f32;
    for (i, b) in w.chunks_exact(Q4K_BYTES).enumerate() {
        let qs = &b[16..144];
        let (sumi, summ) = k4_block(&b[4..16], &x.q[256 * i..], &x.bsums[16 * i..], |j, l| {
            let byte = qs[32 * (j / 2) + l];
            (if j % 2 == 0 { byte & 0x0F } else { byte >> 4 }) as i32
        });
        let dx = x.d[i];
        sum += (f16_at(b, 0) * dx) * sumi as f32 - (f16_at(b, 2) * dx) * summ as f32;
    }
    sum
}

pub fn dot_q5k(w: &[u8], x: &Q8KRow) -> f32 {
    let mut sum = 0f32;
    for (i, b) in w.chunks_exact(Q5K_BYTES).enumerate() {
        let (qh, ql) = (&b[16..48], &b[48..176]);
        let (sumi, summ) = k4_block(&b[4..16], &x.q[256 * i..], &x.bsums[16 * i..], |j, l| {
            let byte = ql[32 * (j / 2) + l];
            let low = if j % 2 == 0 { byte & 0x0F } else { byte >> 4 };
            (low | ((qh[l] >> j) & 1) << 4) as i32
        });
        let dx = x.d[i];
        sum += (f16_at(b, 0) * dx) * sumi as f32 - (f16_at(b, 2) * dx) * summ as f32;
    }
    sum
}

pub fn dot_q6k(w: &[u8], x: &Q8KRow) -> f32 {
    let mut sum = 0f32;
    let mut values = [0i32; 256];
    for (i, b) in w.chunks_exact(Q6K_BYTES).enumerate() {
        for half in 0..2 {
            let ql = &b[64 * half..];
            let qh = &b[128 + 32 * half..];
            let v = &mut values[128 * half..];
            for l in 0..32 {
                v[l] = ((ql[l] & 0x0F) | (qh[l] & 3) << 4) as i32 - 32;
                v[l + 32] = ((ql[l + 32] & 0x0F) | ((qh[l] >> 2) & 3) << 4) as i32 - 32;
                v[l + 64] = ((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4) as i32 - 32;
                v[l + 96] = ((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4) as i32 - 32;
            }
        }
        let xq = &x.q[256 * i..256 * i + 256];
        let sumi: i32 = (0..16)
            .map(|s| {
                let sc = b[192 + s] as i8 as i32;
                sc * (16 * s..16 * s + 16)
                    .map(|e| values[e] * xq[e] as i32)
                    .sum::<i32>()
            })
            .sum();
        sum += (f16_at(b, 208) * x.d[i]) * sumi as f32;
    }
    sum
}
