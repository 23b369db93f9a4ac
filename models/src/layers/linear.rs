//! Linear layers. One type for every projection so that quantized weights can slot in later
//! as another variant without touching model code.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub enum Linear {
    /// `y = x W^T + b` with `W` of shape (out, in).
    Dense {
        weight: Tensor,
        bias: Option<Tensor>,
    },
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self::Dense { weight, bias }
    }

    /// Loads `<vb>.weight` (and `<vb>.bias` when `with_bias`).
    pub fn load(vb: &VarBuilder, in_dim: usize, out_dim: usize, with_bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if with_bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self::new(weight, bias))
    }

    /// Loads several projections that read the same input and concatenates them along the
    /// output dimension (q/k/v, gate/up), so one matmul replaces several.
    pub fn load_merged(
        vbs: &[VarBuilder],
        in_dim: usize,
        out_dims: &[usize],
        with_bias: bool,
    ) -> Result<Self> {
        let parts = vbs
            .iter()
            .zip(out_dims)
            .map(|(vb, &out)| Self::load(vb, in_dim, out, with_bias))
            .collect::<Result<Vec<_>>>()?;
        let weights: Vec<&Tensor> = parts.iter().map(Linear::weight).collect();
        let weight = Tensor::cat(&weights, 0)?;
        let bias = if with_bias {
            let biases = parts
                .iter()
                .map(|p| match p {
                    Self::Dense { bias, .. } => bias.as_ref(),
                })
                .collect::<Option<Vec<&Tensor>>>();
            match biases {
                Some(b) => Some(Tensor::cat(&b, 0)?),
                None => None,
            }
        } else {
            None
        };
        Ok(Self::new(weight, bias))
    }

    pub fn weight(&self) -> &Tensor {
        match self {
            Self::Dense { weight, .. } => weight,
        }
    }
}

impl Module for Linear {
    /// `x`: (tokens, in) -> (tokens, out).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense { weight, bias } => ember_kernels::linear_bias(x, weight, bias.as_ref()),
        }
    }
}
