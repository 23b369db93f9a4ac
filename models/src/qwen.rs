//! The Qwen decoder: Qwen2/Qwen2.5, Qwen3, Qwen2-MoE and Qwen3-MoE share one structure and
//! differ in attention details (biases, q/k norm, head_dim) and in the feed-forward block.
//!
//! ```text
//! embed_tokens -> [ x + attn(input_layernorm(x)); x + ffn(post_attention_layernorm(x)) ] x N
//!              -> norm -> lm_head (tied to embed_tokens or not)
//! ```

use crate::weights::Weights;
use candle_core::{DType, Device, Module, Result, Tensor};
use rayon::prelude::*;

use crate::batch::{Batch, LogitsRows};
use crate::config::ModelConfig;
use crate::kv_cache::KvCache;
use crate::layers::{
    activation_dtype, Attention, Embedding, Linear, Mlp, RmsNorm, RotaryEmbedding, SparseMoe,
};

#[derive(Debug, Clone)]
enum FeedForward {
    Dense(Mlp),
    Sparse(SparseMoe),
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(mlp) => mlp.forward(x),
            Self::Sparse(moe) => moe.forward(x),
        }
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: FeedForward,
}

impl DecoderLayer {
    fn load(cfg: &ModelConfig, layer: usize, vb: Weights) -> Result<Self> {
        let mlp = match &cfg.moe {
            Some(moe) if cfg.is_sparse_layer(layer) => {
                FeedForward::Sparse(SparseMoe::load(cfg, moe, vb.pp("mlp"))?)
            }
            _ => FeedForward::Dense(Mlp::load(
                vb.pp("mlp"),
                cfg.hidden_size,
                cfg.intermediate_size,
            )?),
        };
        Ok(Self {
            input_layernorm: RmsNorm::load(
                &vb.pp("input_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            self_attn: Attention::load(cfg, vb.pp("self_attn"))?,
            post_attention_layernorm: RmsNorm::load(
                &vb.pp("post_attention_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            mlp,
        })
    }
}

#[derive(Debug, Clone)]
pub struct QwenModel {
    cfg: ModelConfig,
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `None` when tied to `embed_tokens`.
    lm_head: Option<Linear>,
    rotary: RotaryEmbedding,
    /// The weights' dtype.
    dtype: DType,
    /// The dtype activations are computed in (f32 on CPU).
    activation_dtype: DType,
    device: Device,
}

impl QwenModel {
    /// Loads from a VarBuilder rooted at the checkpoint (names as in the HF checkpoint).
    pub fn load(cfg: &ModelConfig, vb: Weights) -> Result<Self> {
        let model = vb.pp("model");
        let embed_tokens = Embedding::load(
            &model.pp("embed_tokens"),
            cfg.vocab_size,
            cfg.hidden_size,
            cfg.tie_word_embeddings,
        )?;
        // Layers load in parallel: copying and packing weights is most of the start-up time.
        let layers = (0..cfg.num_hidden_layers)
            .into_par_iter()
            .map(|i| DecoderLayer::load(cfg, i, model.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(&model.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(Linear::load_output(
                &vb.pp("lm_head"),
                cfg.hidden_size,
                cfg.vocab_size,
            )?)
        };
        Ok(Self {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            rotary: RotaryEmbedding::new(cfg, activation_dtype(&vb), vb.device())?,
            dtype: vb.dtype(),
            activation_dtype: activation_dtype(&vb),
            device: vb.device().clone(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn max_positions(&self) -> usize {
        self.rotary.max_positions()
    }

    /// Runs one batch. Returns f32 logits, (rows, vocab), for the rows `batch.logits_rows`
    /// selects, in batch order.
    ///
    /// On CPU the whole pass runs on a worker of the kernels' pool
    /// ([`ember_kernels::on_pool`]), so that no op pays for waking the pool.
    pub fn forward(&self, batch: &Batch, cache: &mut dyn KvCache) -> Result<Tensor> {
        if self.device.is_cpu() {
            ember_kernels::on_pool(|| self.forward_here(batch, cache))
        } else {
            self.forward_here(batch, cache)
        }
    }

    /// [`Self::forward`] on the calling thread.
    fn forward_here(&self, batch: &Batch, cache: &mut dyn KvCache) -> Result<Tensor> {
        // 1. Embed the new tokens and look up each one's rotary row.
        let mut x = self
            .embed_tokens
            .forward(&batch.token_ids)?
            .to_dtype(self.activation_dtype)?;
        let rope = self.rotary.rows(&batch.positions)?;
        // 2. Decoder layers, pre-norm with residuals: each residual add fused with the norm
        //    that follows it (the same values as the add, then the norm).
        let mut normed = match self.layers.first() {
            Some(first) => first.input_layernorm.forward(&x)?,
            None => x.clone(),
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer.self_attn.forward(&normed, batch, &rope, cache, i)?;
            let (sum, h) = layer.post_attention_layernorm.add_forward(&x, &h)?;
            let h = layer.mlp.forward(&h)?;
            match self.layers.get(i + 1) {
                Some(next) => (x, normed) = next.input_layernorm.add_forward(&sum, &h)?,
                None => x = (sum + h)?,
            }
        }
        // 3. Only the rows that need logits go through the final norm and lm_head.
        let x = match &batch.logits_rows {
            LogitsRows::All => x,
            rows => {
                let rows = rows.rows(batch);
                let n = rows.len();
                x.index_select(&Tensor::from_vec(rows, n, &self.device)?, 0)?
            }
        };
        let x = self.norm.forward(&x)?;
        let logits = match &self.lm_head {
            Some(head) => head.forward(&x)?,
            None => self.embed_tokens.lm_head(&x)?,
        };
        logits.to_dtype(DType::F32)
    }
}
