//! RMSNorm, computed in f32 whatever the activation dtype (as transformers does).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn load(vb: &VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb
                .get(dim, "weight")?
                .to_dtype(super::activation_dtype(vb))?,
            eps,
        })
    }
}

impl RmsNorm {
    /// The residual add fused with this norm: `(x + h, norm(x + h))`.
    pub fn add_forward(&self, x: &Tensor, h: &Tensor) -> Result<(Tensor, Tensor)> {
        ember_kernels::add_rms_norm(x, h, &self.weight, self.eps)
    }
}

impl Module for RmsNorm {
    /// Normalizes over the last dimension of `x`, any leading shape.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ember_kernels::rms_norm(x, &self.weight, self.eps)
    }
}
