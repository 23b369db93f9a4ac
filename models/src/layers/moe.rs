//! Sparse mixture of experts (Qwen2-MoE, Qwen3-MoE): a softmax router picks the top-k experts
//! per token; Qwen2-MoE adds a shared expert scaled by a sigmoid gate.

use crate::weights::Weights;
use candle_core::{DType, Module, Result, Tensor};

use super::{Linear, Mlp};
use crate::config::{ModelConfig, MoeConfig};

#[derive(Debug, Clone)]
struct SharedExpert {
    mlp: Mlp,
    gate: Linear,
}

#[derive(Debug, Clone)]
pub struct SparseMoe {
    router: Linear,
    experts: Vec<Mlp>,
    shared: Option<SharedExpert>,
    top_k: usize,
    norm_topk_prob: bool,
}

impl SparseMoe {
    pub fn load(cfg: &ModelConfig, moe: &MoeConfig, vb: Weights) -> Result<Self> {
        let h = cfg.hidden_size;
        // The router (and the shared expert's gate) stay unquantized, as llama.cpp keeps them.
        let router = Linear::load(&vb.pp("gate").unquantized(), h, moe.num_experts, false)?;
        let experts = (0..moe.num_experts)
            .map(|e| Mlp::load(vb.pp("experts").pp(e), h, moe.moe_intermediate_size))
            .collect::<Result<Vec<_>>>()?;
        let shared = match moe.shared_expert_intermediate_size {
            Some(size) => Some(SharedExpert {
                mlp: Mlp::load(vb.pp("shared_expert"), h, size)?,
                gate: Linear::load(&vb.pp("shared_expert_gate").unquantized(), h, 1, false)?,
            }),
            None => None,
        };
        Ok(Self {
            router,
            experts,
            shared,
            top_k: moe.num_experts_per_tok,
            norm_topk_prob: moe.norm_topk_prob,
        })
    }

    /// Per expert, the tokens routed to it and their weights, from router probabilities.
    fn route(&self, probs: &[Vec<f32>]) -> Vec<(Vec<u32>, Vec<f32>)> {
        let mut per_expert = vec![(Vec::new(), Vec::new()); self.experts.len()];
        let mut order: Vec<usize> = Vec::with_capacity(self.experts.len());
        for (token, p) in probs.iter().enumerate() {
            order.clear();
            order.extend(0..p.len());
            // Highest probability first; ties go to the lower expert index.
            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
            let chosen = &order[..self.top_k];
            let sum: f32 = chosen.iter().map(|&e| p[e]).sum();
            for &e in chosen {
                let w = if self.norm_topk_prob {
                    p[e] / sum
                } else {
                    p[e]
                };
                per_expert[e].0.push(token as u32);
                per_expert[e].1.push(w);
            }
        }
        per_expert
    }
}

impl SparseMoe {
    /// CPU, f32 activations: each selected expert runs on its own tokens only (its weights are
    /// the only ones read), and its weighted rows are added into one f32 buffer in place, in
    /// expert order (so a token's sum does not depend on the batch).
    fn experts_in_place(&self, x: &Tensor, routes: Vec<(Vec<u32>, Vec<f32>)>) -> Result<Tensor> {
        let (tokens, hidden) = x.dims2()?;
        let mut acc = vec![0f32; tokens * hidden];
        for (expert, (rows, weights)) in self.experts.iter().zip(routes) {
            if rows.is_empty() {
                continue;
            }
            let n = rows.len();
            let idx = Tensor::from_slice(&rows, n, x.device())?;
            let y = expert.forward(&x.index_select(&idx, 0)?)?;
            let y = y.flatten_all()?.to_vec1::<f32>()?;
            for ((&t, &w), yr) in rows.iter().zip(&weights).zip(y.chunks_exact(hidden)) {
                let dst = &mut acc[t as usize * hidden..(t as usize + 1) * hidden];
                for (d, v) in dst.iter_mut().zip(yr) {
                    *d += v * w;
                }
            }
        }
        Tensor::from_vec(acc, (tokens, hidden), x.device())
    }
}

impl Module for SparseMoe {
    /// `x`: (tokens, hidden) -> (tokens, hidden).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let probs =
            candle_nn::ops::softmax_last_dim(&self.router.forward(x)?.to_dtype(DType::F32)?)?
                .to_vec2::<f32>()?;
        let routes = self.route(&probs);
        let mut out = if x.device().is_cpu() && dtype == DType::F32 {
            self.experts_in_place(x, routes)?
        } else {
            let mut out = x.zeros_like()?;
            for (expert, (tokens, weights)) in self.experts.iter().zip(routes) {
                if tokens.is_empty() {
                    continue;
                }
                let n = tokens.len();
                let idx = Tensor::from_vec(tokens, n, x.device())?;
                let w = Tensor::from_vec(weights, (n, 1), x.device())?.to_dtype(dtype)?;
                let y = expert
                    .forward(&x.index_select(&idx, 0)?)?
                    .broadcast_mul(&w)?;
                out = out.index_add(&idx, &y, 0)?;
            }
            out
        };
        if let Some(shared) = &self.shared {
            let gate = candle_nn::ops::sigmoid(&shared.gate.forward(x)?)?;
            out = (out + shared.mlp.forward(x)?.broadcast_mul(&gate)?)?;
        }
        Ok(out)
    }
}
