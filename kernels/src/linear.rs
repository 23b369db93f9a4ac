//! `linear(x, w, b)` = x · wᵀ + b for x (m, k), w (n, k), b (n,): Ember's CPU matmul. f32, bf16
//! and f16 weights with activations of the same dtype; computed in f32 (bias included) and
//! rounded once. Batch-invariant on CPU for a given instruction-set path (see [`crate::gemm`]).
//! bf16 on AVX-512 BF16 CPUs multiplies bf16 activations by bf16 weights in hardware; elsewhere
//! half-precision weights are widened in registers, so a decode step reads 2 bytes per weight.
//!
//! On CUDA this falls back to candle's matmul, which is not batch-invariant.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor};
use half::{bf16, f16};

use crate::gemm::{gemm_bf16, gemm_f32, Store, Widen};
use crate::{cpu_isa, Isa};

struct Linear {
    bias: Option<Vec<f32>>,
    isa: Isa,
}

fn contiguous<'a, T>(data: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("linear: operands must be contiguous"),
    }
}

fn widened<T: Widen>(x: &[T]) -> Vec<f32> {
    x.iter().map(|v| v.widen()).collect()
}

/// A zeroed output buffer of `len` elements.
fn output<O: Store>(len: usize) -> Vec<O> {
    vec![O::from_f32(0.0); len]
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
        if let Some(b) = &self.bias {
            if b.len() != n {
                candle_core::bail!("linear: bias has {} elements for {n} outputs", b.len());
            }
        }
        let bias = self.bias.as_deref();
        let dims = (m, n, k);
        let out = match (xs, ws) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => {
                let mut y = output::<f32>(m * n);
                gemm_f32(
                    self.isa,
                    contiguous(x, xl)?,
                    contiguous(w, wl)?,
                    bias,
                    dims,
                    &mut y,
                );
                CpuStorage::F32(y)
            }
            (CpuStorage::BF16(x), CpuStorage::BF16(w)) => {
                let mut y = output::<bf16>(m * n);
                gemm_bf16(
                    self.isa,
                    contiguous(x, xl)?,
                    contiguous(w, wl)?,
                    bias,
                    dims,
                    &mut y,
                );
                CpuStorage::BF16(y)
            }
            (CpuStorage::F16(x), CpuStorage::F16(w)) => {
                let mut y = output::<f16>(m * n);
                let xf = widened(contiguous(x, xl)?);
                gemm_f32(self.isa, &xf, contiguous(w, wl)?, bias, dims, &mut y);
                CpuStorage::F16(y)
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

/// `x · wᵀ` for x (m, k), w (n, k) -> (m, n). Batch-invariant on CPU.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    linear_bias(x, w, None)
}

/// `x · wᵀ + b` with the bias added in f32 before the one rounding.
pub fn linear_bias(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    linear_with_isa(x, w, b, cpu_isa())
}

/// [`linear_bias`] on a given instruction-set path (tests and benchmarks compare paths; a path
/// the CPU lacks falls back to the best one below it).
pub fn linear_with_isa(x: &Tensor, w: &Tensor, b: Option<&Tensor>, isa: Isa) -> Result<Tensor> {
    let _t = crate::profile::timer(crate::profile::OpClass::Matmul);
    let ours = matches!(x.device(), Device::Cpu)
        && x.dtype() == w.dtype()
        && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16);
    if !ours {
        let y = linear_ref(x, w)?;
        return match b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        };
    }
    let bias = match b {
        Some(b) => Some(b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
        None => None,
    };
    x.contiguous()?
        .apply_op2_no_bwd(&w.contiguous()?, &Linear { bias, isa })
}

/// Plain-candle reference of [`linear`].
pub fn linear_ref(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.matmul(&w.t()?)
}
