//! `linear(x, w)` = x · wᵀ for x (m, k) and w (n, k), batch-invariant on CPU: every output
//! element is reduced over k in one fixed order (16 interleaved lanes, then a fixed tree),
//! whatever m is and whichever thread computes it, so a row's result does not depend on the
//! other rows in the batch. Weights may be f32 or bf16 (widened on the fly, halving the bytes
//! read per decode step); activations are computed in f32 and rounded once.
//!
//! On CUDA (and for f16 on CPU) this falls back to candle's matmul, which is not batch-invariant.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

const LANES: usize = 16;
/// Rows of x computed together against one weight row (the weight row is loaded once).
const ROW_BLOCK: usize = 4;
/// Weight rows per parallel task.
const COLS_PER_TASK: usize = 32;

trait Weight: Copy + Send + Sync {
    fn widen(self) -> f32;
}

impl Weight for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Weight for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

/// What the fastest kernel on this architecture needs of a weight type.
#[cfg(target_arch = "x86_64")]
use avx2::Load8 as KernelWeight;
#[cfg(not(target_arch = "x86_64"))]
use Weight as KernelWeight;

/// Sums 16 lanes in a fixed tree order.
#[inline(always)]
fn reduce(acc: &[f32; LANES]) -> f32 {
    let mut v = *acc;
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            v[l] += v[l + width];
        }
        width /= 2;
    }
    v[0]
}

/// Dot products of up to ROW_BLOCK rows of `x` with one weight row, lane l summing k ≡ l (mod 16).
#[inline(always)]
fn dots<W: Weight>(xs: &[&[f32]], w: &[W], out: &mut [f32]) {
    let k = w.len();
    let full = k / LANES * LANES;
    let mut acc = [[0f32; LANES]; ROW_BLOCK];
    let mut c = 0;
    while c < full {
        let mut wl = [0f32; LANES];
        for l in 0..LANES {
            wl[l] = w[c + l].widen();
        }
        for (r, x) in xs.iter().enumerate() {
            let xc = &x[c..c + LANES];
            for l in 0..LANES {
                acc[r][l] += xc[l] * wl[l];
            }
        }
        c += LANES;
    }
    for (r, x) in xs.iter().enumerate() {
        let mut s = reduce(&acc[r]);
        for i in full..k {
            s += x[i] * w[i].widen();
        }
        out[r] = s;
    }
}

/// One task: weight rows `wblock` against every row of `x`, into `local` (cols, m).
#[inline(always)]
fn task_body<W: Weight>(x: &[f32], wblock: &[W], m: usize, k: usize, local: &mut [f32]) {
    let mut i = 0;
    while i < m {
        let rows = ROW_BLOCK.min(m - i);
        let mut xs: [&[f32]; ROW_BLOCK] = [&[]; ROW_BLOCK];
        for (r, slot) in xs.iter_mut().enumerate().take(rows) {
            *slot = &x[(i + r) * k..(i + r + 1) * k];
        }
        let mut out = [0f32; ROW_BLOCK];
        for (j, wrow) in wblock.chunks_exact(k).enumerate() {
            dots(&xs[..rows], wrow, &mut out[..rows]);
            local[j * m + i..j * m + i + rows].copy_from_slice(&out[..rows]);
        }
        i += rows;
    }
}

/// AVX2 + FMA micro-kernels with explicit intrinsics: MR rows of x against 2 weight rows at a
/// time, 8-lane accumulators of fused multiply-adds over k in order, then a fixed lane tree and
/// the tail in order. Every output element follows the same arithmetic whatever its tile, so
/// results are independent of m (but differ in the last bits from the portable path, which is
/// only used on CPUs without AVX2/FMA).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::Weight;

    /// Loads 8 weights as f32.
    pub(super) trait Load8: Weight {
        /// # Safety
        /// `p` must point to 8 readable elements; the CPU must support AVX2.
        unsafe fn load8(p: *const Self) -> __m256;
    }

    impl Load8 for f32 {
        #[inline(always)]
        unsafe fn load8(p: *const f32) -> __m256 {
            // SAFETY: the caller guarantees 8 readable f32 and AVX2.
            unsafe { _mm256_loadu_ps(p) }
        }
    }

    impl Load8 for half::bf16 {
        #[inline(always)]
        unsafe fn load8(p: *const half::bf16) -> __m256 {
            // SAFETY: the caller guarantees 8 readable bf16 (16 bytes) and AVX2; bf16 widens to
            // f32 by shifting its bits into the high half.
            unsafe {
                let raw = _mm_loadu_si128(p as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16))
            }
        }
    }

    /// Horizontal sum in a fixed order: lanes (0..4)+(4..8), then pairs, then the last two.
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        // SAFETY: AVX2 is enabled in every caller.
        unsafe {
            let lo = _mm256_castps256_ps128(v);
            let hi = _mm256_extractf128_ps(v, 1);
            let s = _mm_add_ps(lo, hi);
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            _mm_cvtss_f32(s)
        }
    }

    /// Dot products of MR rows of x with NR weight rows.
    #[inline(always)]
    unsafe fn tile<W: Load8, const MR: usize, const NR: usize>(
        xs: [&[f32]; MR],
        ws: [&[W]; NR],
    ) -> [[f32; NR]; MR] {
        let k = ws[0].len();
        let full = k / 8 * 8;
        // SAFETY: AVX2 and FMA are enabled in every caller; every load reads 8 elements at
        // c < full <= len of each row.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); NR]; MR];
            let mut c = 0;
            while c < full {
                let mut w = [_mm256_setzero_ps(); NR];
                for n in 0..NR {
                    w[n] = W::load8(ws[n].as_ptr().add(c));
                }
                for m in 0..MR {
                    let x = _mm256_loadu_ps(xs[m].as_ptr().add(c));
                    for n in 0..NR {
                        acc[m][n] = _mm256_fmadd_ps(x, w[n], acc[m][n]);
                    }
                }
                c += 8;
            }
            let mut out = [[0f32; NR]; MR];
            for m in 0..MR {
                for n in 0..NR {
                    let mut s = hsum(acc[m][n]);
                    for i in full..k {
                        s = xs[m][i].mul_add(ws[n][i].widen(), s);
                    }
                    out[m][n] = s;
                }
            }
            out
        }
    }

    #[inline(always)]
    unsafe fn rows<W: Load8, const MR: usize>(
        x: &[f32],
        i: usize,
        wblock: &[W],
        m: usize,
        k: usize,
        local: &mut [f32],
    ) {
        let cols = wblock.len() / k;
        let xs: [&[f32]; MR] = std::array::from_fn(|r| &x[(i + r) * k..(i + r + 1) * k]);
        let mut j = 0;
        // SAFETY: AVX2 and FMA are enabled in every caller.
        unsafe {
            while j + 2 <= cols {
                let out = tile::<W, MR, 2>(
                    xs,
                    [
                        &wblock[j * k..(j + 1) * k],
                        &wblock[(j + 1) * k..(j + 2) * k],
                    ],
                );
                for (r, row) in out.iter().enumerate() {
                    local[j * m + i + r] = row[0];
                    local[(j + 1) * m + i + r] = row[1];
                }
                j += 2;
            }
            if j < cols {
                let out = tile::<W, MR, 1>(xs, [&wblock[j * k..(j + 1) * k]]);
                for (r, row) in out.iter().enumerate() {
                    local[j * m + i + r] = row[0];
                }
            }
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn task<W: Load8>(
        x: &[f32],
        wblock: &[W],
        m: usize,
        k: usize,
        local: &mut [f32],
    ) {
        let mut i = 0;
        // SAFETY: AVX2 and FMA are enabled here (the caller checked the CPU).
        unsafe {
            while i + 4 <= m {
                rows::<W, 4>(x, i, wblock, m, k, local);
                i += 4;
            }
            match m - i {
                3 => rows::<W, 3>(x, i, wblock, m, k, local),
                2 => rows::<W, 2>(x, i, wblock, m, k, local),
                1 => rows::<W, 1>(x, i, wblock, m, k, local),
                _ => {}
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn task<W: KernelWeight>(x: &[f32], wblock: &[W], m: usize, k: usize, local: &mut [f32]) {
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
        unsafe { avx2::task(x, wblock, m, k, local) };
        return;
    }
    task_body(x, wblock, m, k, local)
}

#[cfg(not(target_arch = "x86_64"))]
fn task<W: KernelWeight>(x: &[f32], wblock: &[W], m: usize, k: usize, local: &mut [f32]) {
    task_body(x, wblock, m, k, local)
}

/// The whole product; `x` is (m, k) f32, `w` is (n, k). Returns (m, n) f32.
fn matmul_bt<W: KernelWeight>(x: &[f32], w: &[W], m: usize, n: usize, k: usize) -> Vec<f32> {
    let blocks: Vec<Vec<f32>> = w
        .par_chunks(COLS_PER_TASK * k)
        .map(|wblock| {
            // (cols, m): column-major within the task.
            let mut local = vec![0f32; wblock.len() / k * m];
            task(x, wblock, m, k, &mut local);
            local
        })
        .collect();
    let mut y = vec![0f32; m * n];
    for (b, local) in blocks.iter().enumerate() {
        let cols = local.len() / m.max(1);
        for j in 0..cols {
            let col = b * COLS_PER_TASK + j;
            for i in 0..m {
                y[i * n + col] = local[j * m + i];
            }
        }
    }
    y
}

struct Linear;

fn contiguous<'a, T>(data: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("linear: operands must be contiguous"),
    }
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "ember-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = xl.shape().dims2()?;
        let (n, k2) = wl.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("linear: x is (_, {k}) but w is (_, {k2})");
        }
        let out = match (xs, ws) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => {
                CpuStorage::F32(matmul_bt(contiguous(x, xl)?, contiguous(w, wl)?, m, n, k))
            }
            (CpuStorage::BF16(x), CpuStorage::BF16(w)) => {
                let x: Vec<f32> = contiguous(x, xl)?.iter().map(|v| v.to_f32()).collect();
                let y = matmul_bt(&x, contiguous(w, wl)?, m, n, k);
                CpuStorage::BF16(y.into_iter().map(bf16::from_f32).collect())
            }
            _ => candle_core::bail!(
                "linear: unsupported dtypes {:?} x {:?}",
                xs.dtype(),
                ws.dtype()
            ),
        };
        Ok((out, Shape::from((m, n))))
    }
}

/// `x · wᵀ` for x (m, k), w (n, k) -> (m, n). Batch-invariant on CPU for f32 and bf16.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let batch_invariant = matches!(x.device(), Device::Cpu)
        && x.dtype() == w.dtype()
        && matches!(x.dtype(), DType::F32 | DType::BF16);
    if batch_invariant {
        x.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &Linear)
    } else {
        linear_ref(x, w)
    }
}

/// Plain-candle reference of [`linear`].
pub fn linear_ref(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.matmul(&w.t()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The portable path (CPUs without AVX2/FMA) against a plain f64 dot product, and its
    /// independence from m; the public tests exercise the path this CPU dispatches to.
    #[test]
    fn portable_path_is_correct_and_batch_invariant() {
        let (m, n, k) = (7, 5, 45);
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 30.0)
            .collect();
        let mut all = vec![0f32; n * m];
        task_body(&x, &w, m, k, &mut all);
        for i in 0..m {
            for j in 0..n {
                let exact: f64 = (0..k)
                    .map(|c| x[i * k + c] as f64 * w[j * k + c] as f64)
                    .sum();
                assert!((all[j * m + i] as f64 - exact).abs() < 1e-4);
                let mut one = vec![0f32; n];
                task_body(&x[i * k..(i + 1) * k], &w, 1, k, &mut one);
                assert_eq!(one[j], all[j * m + i], "row {i} col {j}");
            }
        }
    }
}
