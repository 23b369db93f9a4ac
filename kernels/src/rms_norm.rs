//! `rms_norm(x, w, eps)`: RMSNorm over the last dimension in one pass per row, as transformers
//! computes it: in f32, `x * rsqrt(mean(x²) + eps)`, rounded to the activation dtype, then
//! multiplied by the weight in that dtype. Rows are independent (batch-invariant) and run in
//! parallel when there are many.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, D};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::elem::{contiguous, Store, Widen};

const LANES: usize = 16;
/// Rows per parallel task; a single row (decode) stays on the calling thread.
const ROWS_PER_TASK: usize = 8;

struct RmsNorm {
    eps: f32,
}

/// Sum of squares in 16 interleaved lanes, then a fixed tree, then the tail.
#[inline(always)]
fn sum_squares<T: Widen>(x: &[T]) -> f32 {
    let full = x.len() / LANES * LANES;
    let mut acc = [0f32; LANES];
    for chunk in x[..full].chunks_exact(LANES) {
        for l in 0..LANES {
            let v = chunk[l].widen();
            acc[l] += v * v;
        }
    }
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            acc[l] += acc[l + width];
        }
        width /= 2;
    }
    x[full..]
        .iter()
        .fold(acc[0], |s, v| s + v.widen() * v.widen())
}

fn norm_row<T: Widen + Store>(x: &[T], w: &[T], eps: f32, out: &mut [T]) {
    let inv = 1.0 / (sum_squares(x) / x.len() as f32 + eps).sqrt();
    for ((o, v), g) in out.iter_mut().zip(x).zip(w) {
        // Round the normalized value to the dtype first, as transformers does.
        let normed = T::from_f32(v.widen() * inv).widen();
        *o = T::from_f32(normed * g.widen());
    }
}

fn norm_rows<T: Widen + Store>(x: &[T], w: &[T], eps: f32) -> Vec<T> {
    let d = w.len();
    let mut out = vec![T::from_f32(0.0); x.len()];
    if x.len() <= d {
        norm_row(x, w, eps, &mut out);
        return out;
    }
    out.par_chunks_mut(ROWS_PER_TASK * d)
        .zip(x.par_chunks(ROWS_PER_TASK * d))
        .for_each(|(o, x)| {
            for (o, x) in o.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                norm_row(x, w, eps, o);
            }
        });
    out
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "ember-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = xl.shape().dims().last().copied().unwrap_or(0);
        if wl.shape().dims() != [d] || d == 0 {
            candle_core::bail!("rms_norm: x {:?} with weight {:?}", xl.shape(), wl.shape());
        }
        let eps = self.eps;
        let out = match (xs, ws) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => CpuStorage::F32(norm_rows::<f32>(
                contiguous(x, xl, "rms_norm")?,
                contiguous(w, wl, "rms_norm")?,
                eps,
            )),
            (CpuStorage::BF16(x), CpuStorage::BF16(w)) => CpuStorage::BF16(norm_rows::<bf16>(
                contiguous(x, xl, "rms_norm")?,
                contiguous(w, wl, "rms_norm")?,
                eps,
            )),
            (CpuStorage::F16(x), CpuStorage::F16(w)) => CpuStorage::F16(norm_rows::<f16>(
                contiguous(x, xl, "rms_norm")?,
                contiguous(w, wl, "rms_norm")?,
                eps,
            )),
            _ => candle_core::bail!(
                "rms_norm: unsupported dtypes {:?} x {:?}",
                xs.dtype(),
                ws.dtype()
            ),
        };
        Ok((out, xl.shape().clone()))
    }
}

/// RMSNorm of `x` (any leading shape, last dimension d) with weight `w` (d,). On CPU one fused
/// pass; elsewhere the reference.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let _t = crate::profile::timer(crate::profile::OpClass::Norm);
    if x.device().is_cpu() && x.dtype() == w.dtype() {
        x.contiguous()?
            .apply_op2_no_bwd(&w.contiguous()?, &RmsNorm { eps: eps as f32 })
    } else {
        rms_norm_ref(x, w, eps)
    }
}

/// Plain-candle reference of [`rms_norm`] (transformers' Qwen2RMSNorm).
pub fn rms_norm_ref(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(candle_core::DType::F32)?;
    let variance = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_div(&(variance + eps)?.sqrt()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(w)
}
