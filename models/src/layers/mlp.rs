//! SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`, gate and up merged into one matmul.

use crate::weights::Weights;
use candle_core::{Module, Result, Tensor};

use super::Linear;

#[derive(Debug, Clone)]
pub struct Mlp {
    gate_up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    pub fn load(vb: Weights, hidden_size: usize, intermediate_size: usize) -> Result<Self> {
        Ok(Self {
            gate_up_proj: Linear::load_merged(
                &[vb.pp("gate_proj"), vb.pp("up_proj")],
                hidden_size,
                &[intermediate_size, intermediate_size],
                false,
            )?,
            down_proj: Linear::load(&vb.pp("down_proj"), intermediate_size, hidden_size, false)?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate_up = self.gate_up_proj.forward(x)?;
        self.down_proj
            .forward(&ember_kernels::silu_and_mul(&gate_up)?)
    }
}
