//! Portable dot products of one k-quant weight row with one Q8_K activation row (the 32-weight
//! types: [`super::interleave`]). The integer part of each block is exact (the same integers
//! as ggml's); the f32 part is one sequential sum over blocks, in order, so it does not depend
//! on how many rows a matmul has.

use super::act::Q8KRow;
use super::blocks::{f16_at, scale_min_k4, Q4K_BYTES, Q5K_BYTES, Q6K_BYTES};

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
