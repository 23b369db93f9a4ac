//! Rotary position embeddings (non-interleaved halves, as in transformers' `rotate_half`), with
//! optional YaRN scaling. Tables are computed once for every position and gathered per token,
//! so a batch may mix sequences at any positions.

use candle_core::{DType, Device, Result, Tensor};

use crate::config::{ModelConfig, RopeScaling};

#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    /// (max_positions, head_dim / 2), in the model dtype.
    cos: Tensor,
    sin: Tensor,
}

/// cos/sin rows for the tokens of one batch: (tokens, head_dim / 2).
#[derive(Debug, Clone)]
pub struct RopeRows {
    pub cos: Tensor,
    pub sin: Tensor,
}

/// Inverse frequencies, computed in f32 exactly as transformers does so that f32 logits match.
pub fn inv_freq(head_dim: usize, theta: f64, scaling: &RopeScaling) -> (Vec<f32>, f32) {
    let half = head_dim / 2;
    let base = theta as f32;
    let pos_freqs: Vec<f32> = (0..half)
        .map(|i| base.powf((2 * i) as f32 / head_dim as f32))
        .collect();
    match *scaling {
        RopeScaling::None => (pos_freqs.iter().map(|p| 1.0 / p).collect(), 1.0),
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            beta_fast,
            beta_slow,
            attention_factor,
            truncate,
        } => {
            let dim = head_dim as f64;
            let max_pos = original_max_position_embeddings as f64;
            // The dimension at which a frequency completes `rotations` turns over the original context.
            let correction_dim = |rotations: f64| {
                dim * (max_pos / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln())
            };
            let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
            if truncate {
                low = low.floor();
                high = high.ceil();
            }
            let low = low.max(0.0) as f32;
            let mut high = high.min(dim - 1.0) as f32;
            if low == high {
                high += 0.001; // as transformers does, to avoid a zero-width ramp
            }
            let inv: Vec<f32> = pos_freqs
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                    let extrapolation_factor = 1.0 - ramp;
                    let extrapolation = 1.0 / p;
                    let interpolation = 1.0 / (factor as f32 * p);
                    interpolation * (1.0 - extrapolation_factor)
                        + extrapolation * extrapolation_factor
                })
                .collect();
            (inv, attention_factor as f32)
        }
    }
}

impl RotaryEmbedding {
    pub fn new(cfg: &ModelConfig, dtype: DType, device: &Device) -> Result<Self> {
        let (inv, scale) = inv_freq(cfg.head_dim, cfg.rope_theta, &cfg.rope_scaling);
        let half = inv.len();
        let max_pos = cfg.max_position_embeddings;
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        for pos in 0..max_pos {
            for f in &inv {
                let angle = pos as f32 * f;
                cos.push(angle.cos() * scale);
                sin.push(angle.sin() * scale);
            }
        }
        let cos = Tensor::from_vec(cos, (max_pos, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (max_pos, half), device)?.to_dtype(dtype)?;
        Ok(Self { cos, sin })
    }

    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }

    /// Gathers the rows for `positions` (tokens,) u32.
    pub fn rows(&self, positions: &Tensor) -> Result<RopeRows> {
        Ok(RopeRows {
            cos: self.cos.index_select(positions, 0)?,
            sin: self.sin.index_select(positions, 0)?,
        })
    }
}

impl RopeRows {
    /// Rotates `x`: (tokens, heads, head_dim).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let _t = ember_kernels::profile::timer(ember_kernels::profile::OpClass::Rope);
        let x = x.contiguous()?.unsqueeze(0)?;
        candle_nn::rotary_emb::rope_thd(&x, &self.cos, &self.sin)?.squeeze(0)
    }
}
