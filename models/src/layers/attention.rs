//! Grouped-query self-attention with merged q/k/v, optional q/k biases (Qwen2) and per-head
//! q/k RMSNorm (Qwen3). Reads and writes the KV cache through [`KvCache`].

use crate::weights::Weights;
use candle_core::{Module, Result, Tensor};

use super::{rotary::RopeRows, Linear, RmsNorm};
use crate::batch::Batch;
use crate::config::ModelConfig;
use crate::kv_cache::KvCache;

#[derive(Debug, Clone)]
pub struct Attention {
    qkv_proj: Linear,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    pub fn load(cfg: &ModelConfig, vb: Weights) -> Result<Self> {
        let (h, kv, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let qkv_proj = Linear::load_merged(
            &[vb.pp("q_proj"), vb.pp("k_proj"), vb.pp("v_proj")],
            cfg.hidden_size,
            &[h * d, kv * d, kv * d],
            cfg.attention_bias,
        )?;
        let o_proj = Linear::load(&vb.pp("o_proj"), h * d, cfg.hidden_size, false)?;
        let (q_norm, k_norm) = if cfg.arch.has_qk_norm() {
            (
                Some(RmsNorm::load(&vb.pp("q_norm"), d, cfg.rms_norm_eps)?),
                Some(RmsNorm::load(&vb.pp("k_norm"), d, cfg.rms_norm_eps)?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            qkv_proj,
            o_proj,
            q_norm,
            k_norm,
            num_heads: h,
            num_kv_heads: kv,
            head_dim: d,
        })
    }

    /// `x`: (tokens, hidden) for the whole batch -> (tokens, hidden).
    pub fn forward(
        &self,
        x: &Tensor,
        batch: &Batch,
        rope: &RopeRows,
        cache: &mut dyn KvCache,
        layer: usize,
    ) -> Result<Tensor> {
        let (h, kv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let tokens = x.dim(0)?;
        // 1. Project to q, k, v in one matmul and split.
        let qkv = self.qkv_proj.forward(x)?;
        let q = qkv.narrow(1, 0, h * d)?.reshape((tokens, h, d))?;
        let k = qkv.narrow(1, h * d, kv * d)?.reshape((tokens, kv, d))?;
        let v = qkv
            .narrow(1, (h + kv) * d, kv * d)?
            .reshape((tokens, kv, d))?;
        // 2. Qwen3: RMSNorm each head of q and k.
        let q = match &self.q_norm {
            Some(n) => n.forward(&q.contiguous()?)?,
            None => q,
        };
        let k = match &self.k_norm {
            Some(n) => n.forward(&k.contiguous()?)?,
            None => k,
        };
        // 3. Rotate by each token's own position.
        let q = rope.apply(&q)?;
        let k = rope.apply(&k)?;
        let v = v.contiguous()?;
        // 4. Store k and v in the cache and attend over each sequence's whole context.
        let scale = 1.0 / (self.head_dim as f32).sqrt();
        let out = cache.attend(layer, batch, &q, &k, &v, scale)?;
        // 5. Output projection.
        self.o_proj.forward(&out)
    }
}
