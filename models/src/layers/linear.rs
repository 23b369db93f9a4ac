//! Linear layers. One type for every projection so that quantized weights can slot in later
//! as another variant without touching model code. On CPU the weight is packed once at load for
//! Ember's matmul ([`ember_kernels::PackedWeight`]); elsewhere it stays a candle tensor.

use std::sync::Arc;

use candle_core::{DType, Module, Result, Tensor};
use ember_kernels::{PackedWeight, QuantWeight};

use crate::weights::{MatrixRole, Weights};

#[derive(Debug, Clone)]
pub enum Linear {
    /// CPU: `y = x W^T + b` over a packed `W` (out, in), the bias kept in f32.
    Packed {
        weight: Arc<PackedWeight>,
        bias: Option<Arc<[f32]>>,
    },
    /// CPU, a quantized checkpoint: W is the rows of each part (q, k, v: each its own type),
    /// one after another.
    Quantized {
        parts: Arc<[QuantWeight]>,
        bias: Option<Arc<[f32]>>,
    },
    /// Other devices: `y = x W^T + b` with `W` of shape (out, in).
    Dense {
        weight: Tensor,
        bias: Option<Tensor>,
    },
}

impl Linear {
    /// Packs `weight` when it lives on the CPU.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        if !weight.device().is_cpu() {
            return Ok(Self::Dense { weight, bias });
        }
        Ok(Self::Packed {
            weight: Arc::new(PackedWeight::new(&weight)?),
            bias: Self::f32_bias(bias)?,
        })
    }

    /// Loads `<vb>.weight` (and `<vb>.bias` when `with_bias`).
    pub fn load(vb: &Weights, in_dim: usize, out_dim: usize, with_bias: bool) -> Result<Self> {
        Self::load_merged(std::slice::from_ref(vb), in_dim, &[out_dim], with_bias)
    }

    /// Loads the lm_head (`<vb>.weight`, no bias): in-situ quantization gives it the output
    /// matrix's type.
    pub fn load_output(vb: &Weights, in_dim: usize, out_dim: usize) -> Result<Self> {
        Self::load_as(
            std::slice::from_ref(vb),
            in_dim,
            &[out_dim],
            false,
            MatrixRole::Output,
        )
    }

    /// Loads several projections that read the same input and concatenates them along the
    /// output dimension (q/k/v, gate/up), so one matmul replaces several.
    pub fn load_merged(
        vbs: &[Weights],
        in_dim: usize,
        out_dims: &[usize],
        with_bias: bool,
    ) -> Result<Self> {
        Self::load_as(vbs, in_dim, out_dims, with_bias, MatrixRole::Projection)
    }

    fn load_as(
        vbs: &[Weights],
        in_dim: usize,
        out_dims: &[usize],
        with_bias: bool,
        role: MatrixRole,
    ) -> Result<Self> {
        let bias = if with_bias {
            let parts = vbs
                .iter()
                .zip(out_dims)
                .map(|(vb, &out)| vb.get(out, "bias"))
                .collect::<Result<Vec<_>>>()?;
            Some(Tensor::cat(&parts, 0)?)
        } else {
            None
        };
        let quantized = match Weights::quantized_from_file(vbs, out_dims, in_dim)? {
            Some(parts) => Some(parts),
            None => Weights::quantized_in_situ(vbs, out_dims, in_dim, role)?,
        };
        if let Some(parts) = quantized {
            return Ok(Self::Quantized {
                parts: parts.into(),
                bias: Self::f32_bias(bias)?,
            });
        }
        // On CPU the parts are packed one after another, straight from a mapped checkpoint
        // where there is one, else from the loaded tensors in place (no concatenated copy).
        if let Some(weight) = Weights::packed_from_file(vbs, out_dims, in_dim)? {
            return Ok(Self::Packed {
                weight: Arc::new(weight),
                bias: Self::f32_bias(bias)?,
            });
        }
        let weights = vbs
            .iter()
            .zip(out_dims)
            .map(|(vb, &out)| vb.get((out, in_dim), "weight"))
            .collect::<Result<Vec<_>>>()?;
        match weights.first() {
            Some(w) if w.device().is_cpu() => {
                let parts: Vec<&Tensor> = weights.iter().collect();
                Ok(Self::Packed {
                    weight: Arc::new(PackedWeight::concat(&parts)?),
                    bias: Self::f32_bias(bias)?,
                })
            }
            _ => Self::new(Tensor::cat(&weights, 0)?, bias),
        }
    }

    fn f32_bias(bias: Option<Tensor>) -> Result<Option<Arc<[f32]>>> {
        match bias {
            Some(b) => Ok(Some(Arc::from(b.to_dtype(DType::F32)?.to_vec1::<f32>()?))),
            None => Ok(None),
        }
    }
}

impl Module for Linear {
    /// `x`: (tokens, in) -> (tokens, out).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Packed { weight, bias } => {
                ember_kernels::linear_packed(x, weight, bias.as_deref())
            }
            Self::Quantized { parts, bias } => {
                ember_kernels::linear_quant(x, parts, bias.as_deref())
            }
            Self::Dense { weight, bias } => {
                let y = ember_kernels::linear_ref(x, weight)?;
                match bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
        }
    }
}
