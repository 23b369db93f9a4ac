//! `linear(x, w, b)` = x · wᵀ + b for x (m, k), w (n, k), b (n,): Ember's CPU matmul over
//! weights packed at load ([`PackedWeight`]). f32, bf16 and f16 weights; activations f32, bf16 or
//! f16, computed in f32 (bias included) and rounded once to the activations' dtype.
//! Batch-invariant on CPU for a given instruction-set path (see [`crate::packed`]).
//!
//! On CUDA this falls back to candle's matmul, which is not batch-invariant.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};

use crate::elem::{contiguous, Store};
use crate::packed::{Activations, PackedWeight};
use crate::quant::QuantWeight;
use crate::{cpu_isa, Isa};

struct LinearPacked<'a> {
    w: &'a PackedWeight,
    bias: Option<&'a [f32]>,
    isa: Isa,
}

impl LinearPacked<'_> {
    fn run<O: Store>(&self, x: Activations, m: usize) -> Vec<O> {
        let mut y = vec![O::from_f32(0.0); m * self.w.rows()];
        self.w.matmul(self.isa, x, m, self.bias, &mut y);
        y
    }
}

impl CustomOp1 for LinearPacked<'_> {
    fn name(&self) -> &'static str {
        "ember-linear"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, k) = xl.shape().dims2()?;
        let n = self.w.rows();
        if k != self.w.cols() {
            candle_core::bail!("linear: x is (_, {k}) but w is ({n}, {})", self.w.cols());
        }
        if let Some(b) = self.bias {
            if b.len() != n {
                candle_core::bail!("linear: bias has {} elements for {n} outputs", b.len());
            }
        }
        let out = match xs {
            CpuStorage::F32(x) => {
                CpuStorage::F32(self.run::<f32>(Activations::F32(contiguous(x, xl, "linear")?), m))
            }
            CpuStorage::BF16(x) => CpuStorage::BF16(
                self.run::<bf16>(Activations::Bf16(contiguous(x, xl, "linear")?), m),
            ),
            CpuStorage::F16(x) => {
                CpuStorage::F16(self.run::<f16>(Activations::F16(contiguous(x, xl, "linear")?), m))
            }
            other => candle_core::bail!("linear: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, Shape::from((m, n))))
    }
}

/// `x · wᵀ + b` for x (m, k) on CPU and packed `w` (n, k) -> (m, n) in x's dtype.
pub fn linear_packed(x: &Tensor, w: &PackedWeight, bias: Option<&[f32]>) -> Result<Tensor> {
    linear_packed_with_isa(x, w, bias, cpu_isa())
}

/// [`linear_packed`] on a given instruction-set path (tests and benchmarks compare paths; a
/// path the CPU lacks falls back to the best one below it).
pub fn linear_packed_with_isa(
    x: &Tensor,
    w: &PackedWeight,
    bias: Option<&[f32]>,
    isa: Isa,
) -> Result<Tensor> {
    let _t = crate::profile::timer(crate::profile::OpClass::Matmul);
    if !x.device().is_cpu() {
        candle_core::bail!("linear_packed: packed weights live on the CPU");
    }
    x.contiguous()?
        .apply_op1_no_bwd(&LinearPacked { w, bias, isa })
}

struct LinearQuant<'a> {
    parts: &'a [QuantWeight],
    bias: Option<&'a [f32]>,
}

impl CustomOp1 for LinearQuant<'_> {
    fn name(&self) -> &'static str {
        "ember-linear-quant"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, k) = xl.shape().dims2()?;
        let n: usize = self.parts.iter().map(QuantWeight::rows).sum();
        if let Some(p) = self.parts.iter().find(|p| p.cols() != k) {
            candle_core::bail!(
                "linear_quant: x is (_, {k}) but a part is (_, {})",
                p.cols()
            );
        }
        if self.bias.is_some_and(|b| b.len() != n) {
            candle_core::bail!("linear_quant: the bias does not have {n} elements");
        }
        let x: std::borrow::Cow<[f32]> = match xs {
            CpuStorage::F32(x) => std::borrow::Cow::Borrowed(contiguous(x, xl, "linear")?),
            CpuStorage::BF16(x) => contiguous(x, xl, "linear")?
                .iter()
                .map(|v| v.to_f32())
                .collect(),
            CpuStorage::F16(x) => contiguous(x, xl, "linear")?
                .iter()
                .map(|v| v.to_f32())
                .collect(),
            other => candle_core::bail!("linear_quant: unsupported dtype {:?}", other.dtype()),
        };
        // Each part fills its own columns of y; x is quantized once for the parts that share
        // an activation format (q/k/v, gate/up), as ggml does per matmul.
        let mut y = vec![0f32; m * n];
        let mut col = 0;
        let mut part_out = Vec::new();
        let mut acts: Option<crate::Activations> = None;
        for p in self.parts {
            let pn = p.rows();
            part_out.resize(m * pn, 0.0);
            let a = match acts.take() {
                Some(a) if a.fits(p) => a,
                _ => p.quantize_input(cpu_isa(), &x, m),
            };
            p.matmul_quantized(&a, self.bias.map(|b| &b[col..col + pn]), &mut part_out)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            acts = Some(a);
            for (dst, src) in y.chunks_exact_mut(n).zip(part_out.chunks_exact(pn)) {
                dst[col..col + pn].copy_from_slice(src);
            }
            col += pn;
        }
        let out = match xs {
            CpuStorage::BF16(_) => CpuStorage::BF16(y.iter().map(|&v| bf16::from_f32(v)).collect()),
            CpuStorage::F16(_) => CpuStorage::F16(y.iter().map(|&v| f16::from_f32(v)).collect()),
            _ => CpuStorage::F32(y),
        };
        Ok((out, Shape::from((m, n))))
    }
}

/// `x · Wᵀ + b` for x (m, k) on CPU and W the rows of `parts` (quantized, one after another)
/// -> (m, Σ n) in x's dtype.
pub fn linear_quant(x: &Tensor, parts: &[QuantWeight], bias: Option<&[f32]>) -> Result<Tensor> {
    let _t = crate::profile::timer(crate::profile::OpClass::Matmul);
    if !x.device().is_cpu() {
        candle_core::bail!("linear_quant: quantized weights live on the CPU");
    }
    x.contiguous()?
        .apply_op1_no_bwd(&LinearQuant { parts, bias })
}

/// `x · wᵀ` for x (m, k), w (n, k) -> (m, n). Packs `w` on every call: for tests and one-off
/// products; models pack once at load.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    linear_with_isa(x, w, None, cpu_isa())
}

/// [`linear`] with a bias, on a given path.
pub fn linear_with_isa(x: &Tensor, w: &Tensor, b: Option<&Tensor>, isa: Isa) -> Result<Tensor> {
    let ours = x.device().is_cpu()
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
    linear_packed_with_isa(x, &PackedWeight::new(w)?, bias.as_deref(), isa)
}

/// Plain-candle reference of [`linear`].
pub fn linear_ref(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.matmul(&w.t()?)
}
