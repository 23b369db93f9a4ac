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

/// The same code compiled for AVX2: wider vectors, the same per-lane arithmetic and order
/// (no FMA contraction), so results are bit-identical to the portable path.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn task_avx2<W: Weight>(x: &[f32], wblock: &[W], m: usize, k: usize, local: &mut [f32]) {
    task_body(x, wblock, m, k, local)
}

fn task<W: Weight>(x: &[f32], wblock: &[W], m: usize, k: usize, local: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked at run time).
        unsafe { task_avx2(x, wblock, m, k, local) };
        return;
    }
    task_body(x, wblock, m, k, local)
}

/// The whole product; `x` is (m, k) f32, `w` is (n, k). Returns (m, n) f32.
fn matmul_bt<W: Weight>(x: &[f32], w: &[W], m: usize, n: usize, k: usize) -> Vec<f32> {
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
