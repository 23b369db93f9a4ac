//! f32 weights to GGUF blocks, as llama.cpp's reference quantizers make them without an
//! importance matrix (`ggml-quants.c`, `quantize_row_*_ref`, which `llama-quantize` runs): the
//! same searches over scales, the same f32 operations in the same order, the same rounding
//! (`roundf` for Q8_0, truncation for Q4_0/Q5_0, ggml's `nearest_int` — round half to even
//! through the 1.5·2^23 trick — in the k-quants). Rust never fuses a multiply and an add; a C
//! build that does (`-ffp-contract`) can land on the other side of a rounding edge now and then,
//! so llama.cpp's own outputs differ between builds in the same rare places.
//!
//! Non-finite inputs give meaningless blocks, never a panic.

use half::f16;

use super::blocks::{
    scale_min_k4, Q4K_BYTES, Q4_0_BYTES, Q5K_BYTES, Q5_0_BYTES, Q6K_BYTES, Q8_0_BYTES,
};
use super::GgmlType;

/// Below this, ggml treats a group as all zeros.
const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml's `nearest_int`: adding 1.5·2^23 leaves the rounded integer in the mantissa (round half
/// to even), for |v| < 2^22; other inputs (never reached by finite weights) give some integer.
#[inline]
fn nearest_int(v: f32) -> i32 {
    let bits = (v + 12_582_912.0f32).to_bits() as i32;
    (bits & 0x007F_FFFF) - 0x0040_0000
}

fn put_f16(out: &mut [u8], at: usize, v: f32) {
    out[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

fn f16_round_trip(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// Quantizes `x` (whole blocks of `ty`) into `out` (as many blocks); `ty` one of the quantized
/// types Ember computes with.
pub(super) fn quantize_row(ty: GgmlType, x: &[f32], out: &mut [u8]) {
    let (len, bytes) = (ty.block_len(), ty.block_bytes());
    debug_assert!(x.len().is_multiple_of(len) && out.len() == x.len() / len * bytes);
    let block: fn(&[f32], &mut [u8]) = match ty {
        GgmlType::Q8_0 => q8_0,
        GgmlType::Q4_0 => q4_0,
        GgmlType::Q5_0 => q5_0,
        GgmlType::Q4K => q4k,
        GgmlType::Q5K => q5k,
        GgmlType::Q6K => q6k,
        _ => unreachable!("quantize_row is called with a quantized type"),
    };
    for (x, out) in x.chunks_exact(len).zip(out.chunks_exact_mut(bytes)) {
        block(x, out);
    }
}

fn q8_0(x: &[f32], out: &mut [u8]) {
    debug_assert_eq!(out.len(), Q8_0_BYTES);
    let amax = x.iter().fold(0f32, |a, &v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(out, 0, d);
    for (o, &v) in out[2..].iter_mut().zip(x) {
        *o = (v * id).round() as i8 as u8;
    }
}

/// The value of largest magnitude (the first of equals), as ggml's 32-blocks pick it.
fn signed_max(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

fn q4_0(x: &[f32], out: &mut [u8]) {
    debug_assert_eq!(out.len(), Q4_0_BYTES);
    let d = signed_max(x) / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(out, 0, d);
    for j in 0..16 {
        let q0 = ((x[j] * id + 8.5) as i8).min(15) as u8;
        let q1 = ((x[j + 16] * id + 8.5) as i8).min(15) as u8;
        out[2 + j] = q0 | (q1 << 4);
    }
}

fn q5_0(x: &[f32], out: &mut [u8]) {
    debug_assert_eq!(out.len(), Q5_0_BYTES);
    let d = signed_max(x) / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(out, 0, d);
    let mut qh = 0u32;
    for j in 0..16 {
        let q0 = ((x[j] * id + 16.5) as i8).min(31) as u8;
        let q1 = ((x[j + 16] * id + 16.5) as i8).min(31) as u8;
        out[6 + j] = (q0 & 0x0F) | ((q1 & 0x0F) << 4);
        qh |= ((q0 as u32 & 0x10) >> 4) << j;
        qh |= ((q1 as u32 & 0x10) >> 4) << (j + 16);
    }
    out[2..6].copy_from_slice(&qh.to_le_bytes());
}

/// ggml's `make_qkx2_quants`: levels `l` in 0..=nmax and (scale, min) minimizing the weighted
/// squared error of `scale·l - min` against `x`, searched over `nstep + 1` candidate inverse
/// scales around `nmax / (max - min)`, each refined by weighted least squares. Returns the
/// scale and the (non-negative) min; the levels are left in `l`.
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.fill(0);
        return (0.0, -min);
    }
    let nmax_f = nmax as f32;
    let mut iscale = nmax_f / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * q as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    let mut aux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax_f) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            aux[i] = q as u8;
            let (w, q) = (weights[i], q as f32);
            sum_l += w * q;
            sum_l2 += w * q * q;
            sum_xl += w * q * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * aux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&aux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Q4_K (`FIVE` false: levels 0..=15) or Q5_K (true: 0..=31): per sub-block of 32 a scale and
/// a min from [`make_qkx2_quants`] (weights `rms + |x|`), both quantized to 6 bits against the
/// block's largest, then the levels recomputed against the stored scales.
fn qk4<const FIVE: bool>(x: &[f32], out: &mut [u8]) {
    debug_assert_eq!(out.len(), if FIVE { Q5K_BYTES } else { Q4K_BYTES });
    let (nmax, rmin, nstep) = if FIVE { (31, -0.5, 15) } else { (15, -1.0, 20) };
    let mut levels = [0u8; 256];
    let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let sum_x2 = xs.iter().fold(0f32, |s, &v| s + v * v);
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights: [f32; 32] = std::array::from_fn(|l| av_x + xs[l].abs());
        let l = &mut levels[32 * j..32 * j + 32];
        (scales[j], mins[j]) = make_qkx2_quants(nmax, xs, &weights, l, rmin, 0.1, nstep);
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let packed = &mut out[4..16];
    packed.fill(0);
    for j in 0..8 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0x0F) | ((lm & 0x0F) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    put_f16(out, 0, max_scale / 63.0);
    put_f16(out, 2, max_min / 63.0);
    let d_all = f16_round_trip(max_scale / 63.0);
    let dmin_all = f16_round_trip(max_min / 63.0);
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &out[4..16]);
        let d = d_all * sc as f32;
        if d == 0.0 {
            continue;
        }
        let dm = dmin_all * m as f32;
        for i in 0..32 {
            levels[32 * j + i] = nearest_int((x[32 * j + i] + dm) / d).clamp(0, nmax) as u8;
        }
    }
    if FIVE {
        let (qh, ql) = out[16..].split_at_mut(32);
        qh.fill(0);
        for (c, ql) in ql.chunks_exact_mut(32).enumerate() {
            let (m1, m2) = (1u8 << (2 * c), 2u8 << (2 * c));
            for j in 0..32 {
                let (mut l1, mut l2) = (levels[64 * c + j], levels[64 * c + j + 32]);
                if l1 > 15 {
                    l1 -= 16;
                    qh[j] |= m1;
                }
                if l2 > 15 {
                    l2 -= 16;
                    qh[j] |= m2;
                }
                ql[j] = l1 | (l2 << 4);
            }
        }
    } else {
        for (c, q) in out[16..].chunks_exact_mut(32).enumerate() {
            for j in 0..32 {
                q[j] = levels[64 * c + j] | (levels[64 * c + j + 32] << 4);
            }
        }
    }
}

fn q4k(x: &[f32], out: &mut [u8]) {
    qk4::<false>(x, out)
}

fn q5k(x: &[f32], out: &mut [u8]) {
    qk4::<true>(x, out)
}

/// ggml's `make_qx_quants` with `rmse_type` 1 and no importance weights (Q6_K's sub-blocks):
/// signed levels in -nmax..nmax (stored + nmax in `l`) and the scale minimizing the x²-weighted
/// squared error, searched over 19 candidate inverse scales.
fn make_qx_quants(nmax: i32, x: &[f32], l: &mut [u8]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let nmax_f = nmax as f32;
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0f32, 0f32);
        for &v in x {
            let q = level(iscale, v) as f32;
            let w = v * v;
            sumlx += w * v * q;
            suml2 += w * q * q;
        }
        (sumlx, suml2)
    };
    let mut iscale = -nmax_f / max;
    for (o, &v) in l.iter_mut().zip(x) {
        *o = (level(iscale, v) + nmax) as u8;
    }
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax_f + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (o, &v) in l.iter_mut().zip(x) {
                *o = (level(iscale, v) + nmax) as u8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Q6_K: per sub-block of 16 a scale from [`make_qx_quants`], quantized to a signed byte
/// against the block's largest, then the levels (-32..=31) against the stored scales.
fn q6k(x: &[f32], out: &mut [u8]) {
    debug_assert_eq!(out.len(), Q6K_BYTES);
    let mut levels = [0u8; 256];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for ib in 0..16 {
        let s = make_qx_quants(
            32,
            &x[16 * ib..16 * ib + 16],
            &mut levels[16 * ib..16 * ib + 16],
        );
        scales[ib] = s;
        if s.abs() > max_abs_scale {
            max_abs_scale = s.abs();
            max_scale = s;
        }
    }
    out.fill(0);
    if max_abs_scale < GROUP_MAX_EPS {
        return;
    }
    let iscale = -128.0 / max_scale;
    put_f16(out, 208, 1.0 / iscale);
    let d_all = f16_round_trip(1.0 / iscale);
    for ib in 0..16 {
        let s = nearest_int(iscale * scales[ib]).min(127) as i8;
        out[192 + ib] = s as u8;
        let d = d_all * s as f32;
        if d == 0.0 {
            continue;
        }
        for i in 0..16 {
            levels[16 * ib + i] = (nearest_int(x[16 * ib + i] / d).clamp(-32, 31) + 32) as u8;
        }
    }
    let (ql, rest) = out.split_at_mut(128);
    let qh = &mut rest[..64];
    for half in 0..2 {
        let (ql, qh, l) = (
            &mut ql[64 * half..64 * half + 64],
            &mut qh[32 * half..32 * half + 32],
            &levels[128 * half..128 * half + 128],
        );
        for i in 0..32 {
            let q = [l[i], l[i + 32], l[i + 64], l[i + 96]];
            ql[i] = (q[0] & 0x0F) | ((q[2] & 0x0F) << 4);
            ql[i + 32] = (q[1] & 0x0F) | ((q[3] & 0x0F) << 4);
            qh[i] = (q[0] >> 4) | ((q[1] >> 4) << 2) | ((q[2] >> 4) << 4) | ((q[3] >> 4) << 6);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic test values: a mix of scales, signs, and exact zeros.
    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).max(1);
        (0..n)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                let u = (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
                if i % 37 == 5 {
                    0.0
                } else {
                    u * (1.0 + (i % 7) as f32)
                }
            })
            .collect()
    }

    #[test]
    fn nearest_int_rounds_half_to_even() {
        for (v, want) in [
            (0.5, 0),
            (1.5, 2),
            (2.5, 2),
            (-0.5, 0),
            (-1.5, -2),
            (3.49, 3),
        ] {
            assert_eq!(nearest_int(v), want, "{v}");
        }
    }

    /// Every type's blocks dequantize back to within about a step of the input: half a step
    /// for Q8_0 (plus the f16 scale's rounding), a whole one for Q4_0/Q5_0 (the value opposite
    /// the largest is clamped to the last level), somewhat more for the k-quants (their 6-bit
    /// sub-block scales and mins move the grid).
    #[test]
    fn blocks_dequantize_close_to_their_input() {
        for (seed, (ty, tol)) in [
            (GgmlType::Q8_0, 0.6),
            (GgmlType::Q4_0, 1.05),
            (GgmlType::Q5_0, 1.05),
            (GgmlType::Q4K, 1.6),
            (GgmlType::Q5K, 1.6),
            (GgmlType::Q6K, 1.1),
        ]
        .into_iter()
        .enumerate()
        {
            let x = values(512, seed as u32 + 1);
            let mut q = vec![0u8; ty.row_bytes(512).expect("whole blocks")];
            quantize_row(ty, &x, &mut q);
            let mut y = vec![0f32; 512];
            super::super::dequantize(ty, &q, &mut y).expect("dequantize");
            let len = ty.block_len();
            for (b, (xb, yb)) in x.chunks(len).zip(y.chunks(len)).enumerate() {
                let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
                let range =
                    xb.iter().fold(0f32, |a, v| a.max(*v)) - xb.iter().fold(0f32, |a, v| a.min(*v));
                let levels = match ty {
                    GgmlType::Q8_0 => 2.0 * amax / 254.0,
                    GgmlType::Q4_0 => amax / 8.0,
                    GgmlType::Q5_0 => amax / 16.0,
                    GgmlType::Q4K => range / 15.0,
                    GgmlType::Q5K => range / 31.0,
                    _ => amax / 32.0,
                };
                for (i, (a, b2)) in xb.iter().zip(yb).enumerate() {
                    assert!(
                        (a - b2).abs() <= tol * levels + 1e-6,
                        "{ty} block {b} element {i}: {a} -> {b2} (step {levels})"
                    );
                }
            }
        }
    }

    #[test]
    fn zeros_and_non_finite_inputs_do_not_panic() {
        for ty in [
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q5_0,
            GgmlType::Q4K,
            GgmlType::Q5K,
            GgmlType::Q6K,
        ] {
            let mut q = vec![0u8; ty.row_bytes(256).expect("whole blocks")];
            quantize_row(ty, &[0.0; 256], &mut q);
            let mut y = vec![1f32; 256];
            super::super::dequantize(ty, &q, &mut y).expect("dequantize");
            assert!(y.iter().all(|&v| v == 0.0), "{ty}: zeros stay zeros");
            let mut x = values(256, 3);
            x[7] = f32::NAN;
            x[100] = f32::INFINITY;
            x[200] = f32::NEG_INFINITY;
            quantize_row(ty, &x, &mut q);
        }
    }
}
