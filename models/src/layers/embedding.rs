//! Token embedding table, also the lm_head when embeddings are tied.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub struct Embedding {
    weight: Tensor,
}

impl Embedding {
    pub fn load(vb: &VarBuilder, vocab_size: usize, hidden_size: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get((vocab_size, hidden_size), "weight")?,
        })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// `ids`: (tokens,) u32 -> (tokens, hidden).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.weight.index_select(ids, 0)
    }
}
