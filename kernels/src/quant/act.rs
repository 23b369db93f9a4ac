//! Activations quantized once per matmul into the format the weights' dot product takes, as
//! ggml does: Q8_0 (32 values, one scale) for q4_0/q5_0/q8_0 weights and Q8_K (256 values, one
//! f32 scale, sums of each 16) for the k-quants. The rounding is ggml's on x86 (`id = 127 /
//! amax`, round half to even; Q8_0's scale kept as f16; Q8_K's `-127 / max` of the signed
//! extreme), so the integer dot products are exactly llama.cpp's.

use half::f16;

/// One row of activations in Q8_0: per block of 32, a scale (an f16 value, widened), 32 i8
/// and their sum (what the weights' offset contributes: Σ (u - o)·x = Σ u·x - o·Σ x).
#[derive(Debug, Clone, Default)]
pub struct Q8_0Row {
    pub d: Vec<f32>,
    pub q: Vec<i8>,
    pub s: Vec<i32>,
}

/// One row of activations in Q8_K: per block of 256, a scale, 256 i8 and the 16 sums of each
/// run of 16.
#[derive(Debug, Clone, Default)]
pub struct Q8KRow {
    pub d: Vec<f32>,
    pub q: Vec<i8>,
    pub bsums: Vec<i16>,
}

/// Round half to even, as `_mm256_round_ps(_MM_ROUND_NEAREST)` and ggml's `nearest_int`.
#[inline(always)]
fn round_even(v: f32) -> i32 {
    v.round_ties_even() as i32
}

/// `x` (a multiple of 32 long) in Q8_0, on the path `isa` allows (the same values on every
/// path: the AVX2 build of the same code rounds with `vroundss` instead of a libm call).
pub fn quantize_q8_0_with_isa(x: &[f32], out: &mut Q8_0Row, isa: crate::Isa) {
    #[cfg(target_arch = "x86_64")]
    if isa >= crate::Isa::Avx2 && isa.is_supported() {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(x: &[f32], out: &mut Q8_0Row) {
            quantize_q8_0(x, out)
        }
        // SAFETY: the CPU supports AVX2 and FMA (is_supported).
        return unsafe { avx2(x, out) };
    }
    let _ = isa;
    quantize_q8_0(x, out)
}

/// `x` (a multiple of 256 long) in Q8_K, on the path `isa` allows (as
/// [`quantize_q8_0_with_isa`]).
pub fn quantize_q8k_with_isa(x: &[f32], out: &mut Q8KRow, isa: crate::Isa) {
    #[cfg(target_arch = "x86_64")]
    if isa >= crate::Isa::Avx2 && isa.is_supported() {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(x: &[f32], out: &mut Q8KRow) {
            quantize_q8k(x, out)
        }
        // SAFETY: the CPU supports AVX2 and FMA (is_supported).
        return unsafe { avx2(x, out) };
    }
    let _ = isa;
    quantize_q8k(x, out)
}

/// `x` (a multiple of 32 long) in Q8_0.
#[inline(always)]
pub fn quantize_q8_0(x: &[f32], out: &mut Q8_0Row) {
    out.d.clear();
    out.q.clear();
    out.s.clear();
    for block in x.chunks_exact(32) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        out.d.push(f16::from_f32(d).to_f32());
        let start = out.q.len();
        out.q
            .extend(block.iter().map(|&v| round_even(v * id) as i8));
        out.s
            .push(out.q[start..].iter().map(|&q| q as i32).sum::<i32>());
    }
}

/// `x` (a multiple of 256 long) in Q8_K.
#[inline(always)]
pub fn quantize_q8k(x: &[f32], out: &mut Q8KRow) {
    out.d.clear();
    out.q.clear();
    out.bsums.clear();
    for block in x.chunks_exact(256) {
        // The value of largest magnitude, sign kept (the first of equals).
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in block {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            out.d.push(0.0);
            out.q.extend(std::iter::repeat_n(0i8, 256));
            out.bsums.extend(std::iter::repeat_n(0i16, 16));
            continue;
        }
        let iscale = -127.0 / max;
        let start = out.q.len();
        out.q
            .extend(block.iter().map(|&v| round_even(iscale * v).min(127) as i8));
        for run in out.q[start..].chunks_exact(16) {
            out.bsums.push(run.iter().map(|&q| q as i16).sum());
        }
        out.d.push(1.0 / iscale);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_maps_the_extreme_to_127_and_rounds_half_to_even() {
        let mut x = vec![0f32; 32];
        x[0] = -2.54;
        x[1] = 0.01; // 0.01 · 127 / 2.54 = 0.5: ties to 0
        x[2] = 0.03; // 1.5: ties to 2
        let mut q = Q8_0Row::default();
        quantize_q8_0(&x, &mut q);
        assert_eq!(&q.q[..3], &[-127, 0, 2]);
        assert_eq!(q.d[0], f16::from_f32(2.54 / 127.0).to_f32());
        quantize_q8_0(&[0.0; 32], &mut q);
        assert_eq!((q.d[0], q.q.iter().all(|&v| v == 0)), (0.0, true));
    }

    #[test]
    fn q8k_keeps_the_sign_of_the_extreme_and_sums_runs() {
        let mut x: Vec<f32> = (0..256).map(|i| (i as f32 - 100.0) / 50.0).collect();
        x[7] = -10.0;
        let mut q = Q8KRow::default();
        quantize_q8k(&x, &mut q);
        assert_eq!(
            q.q[7], -127,
            "-127 / max maps the extreme to -127, whatever its sign"
        );
        assert!((q.d[0] - 10.0 / 127.0).abs() < 1e-7);
        for (s, run) in q.bsums.iter().zip(q.q.chunks_exact(16)) {
            assert_eq!(*s as i32, run.iter().map(|&v| v as i32).sum::<i32>());
        }
        // Each value is within half a step of x / d.
        for (v, &qi) in x.iter().zip(&q.q) {
            assert!((v / q.d[0] - qi as f32).abs() <= 0.5 + 1e-4);
        }
    }
}
