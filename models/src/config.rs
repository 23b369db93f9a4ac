//! Qwen `config.json` parsing for Qwen2/Qwen2.5, Qwen3, Qwen2-MoE and Qwen3-MoE.
//!
//! Both the Hub's layout (`rope_theta`, `rope_scaling`, `num_experts`) and the one written by
//! transformers 5 (`rope_parameters`, `num_local_experts`) are accepted. Anything Ember does not
//! implement is rejected here, at load, with a message that names it.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{ModelError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Qwen2,
    Qwen3,
    Qwen2Moe,
    Qwen3Moe,
}

impl Arch {
    fn from_model_type(model_type: &str) -> Result<Self> {
        match model_type {
            "qwen2" => Ok(Self::Qwen2),
            "qwen3" => Ok(Self::Qwen3),
            "qwen2_moe" => Ok(Self::Qwen2Moe),
            "qwen3_moe" => Ok(Self::Qwen3Moe),
            other => Err(ModelError::Unsupported(format!(
                "model_type {other:?} is not supported; Ember serves qwen2, qwen3, qwen2_moe and qwen3_moe"
            ))),
        }
    }

    /// Qwen3 normalizes each head's q and k (RMSNorm over head_dim) before RoPE.
    pub fn has_qk_norm(self) -> bool {
        matches!(self, Self::Qwen3 | Self::Qwen3Moe)
    }
}

/// How rotary frequencies are computed.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// YaRN (Peng et al., 2023) as transformers implements it.
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        beta_fast: f64,
        beta_slow: f64,
        /// Scale applied to cos/sin; derived from `factor` unless the config gives it.
        attention_factor: f64,
        truncate: bool,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    pub moe_intermediate_size: usize,
    pub norm_topk_prob: bool,
    pub decoder_sparse_step: usize,
    pub mlp_only_layers: Vec<usize>,
    /// Qwen2-MoE's always-on expert, gated by a sigmoid.
    pub shared_expert_intermediate_size: Option<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub moe: Option<MoeConfig>,
    /// `eos_token_id` from config.json (generation_config.json takes precedence, see loader).
    pub eos_token_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct RawConfig {
    model_type: String,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: Option<usize>,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    max_position_embeddings: usize,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    rms_norm_eps: f64,
    #[serde(default)]
    tie_word_embeddings: bool,
    attention_bias: Option<bool>,
    hidden_act: Option<String>,
    #[serde(default)]
    use_sliding_window: bool,
    num_experts: Option<usize>,
    num_local_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    moe_intermediate_size: Option<usize>,
    norm_topk_prob: Option<bool>,
    decoder_sparse_step: Option<usize>,
    #[serde(default)]
    mlp_only_layers: Vec<usize>,
    shared_expert_intermediate_size: Option<usize>,
    eos_token_id: Option<Value>,
}

fn bad(msg: impl Into<String>) -> ModelError {
    ModelError::Config(msg.into())
}

/// Reads `eos_token_id` as either one id or a list of ids.
pub(crate) fn parse_token_ids(value: Option<&Value>) -> Vec<u32> {
    match value {
        Some(Value::Number(n)) => n.as_u64().map(|id| vec![id as u32]).unwrap_or_default(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_u64().map(|id| id as u32))
            .collect(),
        _ => Vec::new(),
    }
}

fn get_f64(obj: &serde_json::Map<String, Value>, key: &str) -> Option<f64> {
    obj.get(key).and_then(Value::as_f64)
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text).map_err(|e| match e {
            ModelError::Json { source, .. } => ModelError::Json {
                path: path.to_path_buf(),
                source,
            },
            other => other,
        })
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|source| ModelError::Json {
            path: "config.json".into(),
            source,
        })?;
        let arch = Arch::from_model_type(&raw.model_type)?;
        if let Some(act) = raw.hidden_act.as_deref() {
            if act != "silu" {
                return Err(ModelError::Unsupported(format!(
                    "hidden_act {act:?} (only silu is implemented)"
                )));
            }
        }
        if raw.use_sliding_window {
            return Err(ModelError::Unsupported(
                "use_sliding_window=true (sliding-window attention is not implemented)".into(),
            ));
        }
        let num_attention_heads = raw.num_attention_heads;
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(num_attention_heads);
        if num_attention_heads == 0
            || num_key_value_heads == 0
            || !num_attention_heads.is_multiple_of(num_key_value_heads)
        {
            return Err(bad(format!(
                "num_attention_heads ({num_attention_heads}) must be a positive multiple of num_key_value_heads ({num_key_value_heads})"
            )));
        }
        let head_dim = match (arch, raw.head_dim) {
            (_, Some(d)) => d,
            (_, None) if raw.hidden_size.is_multiple_of(num_attention_heads) => {
                raw.hidden_size / num_attention_heads
            }
            _ => return Err(bad("hidden_size is not divisible by num_attention_heads")),
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(bad(format!(
                "head_dim must be even and positive, got {head_dim}"
            )));
        }
        let params = raw.rope_parameters.as_ref().and_then(Value::as_object);
        let rope_theta = raw
            .rope_theta
            .or_else(|| params.and_then(|p| get_f64(p, "rope_theta")))
            .unwrap_or(10000.0);
        let scaling = raw
            .rope_scaling
            .as_ref()
            .filter(|v| !v.is_null())
            .or(raw.rope_parameters.as_ref());
        let rope_scaling = parse_rope_scaling(scaling, raw.max_position_embeddings)?;

        let moe = match arch {
            Arch::Qwen2 | Arch::Qwen3 => None,
            Arch::Qwen2Moe | Arch::Qwen3Moe => {
                let num_experts = raw
                    .num_experts
                    .or(raw.num_local_experts)
                    .ok_or_else(|| bad("MoE config without num_experts"))?;
                let num_experts_per_tok = raw
                    .num_experts_per_tok
                    .ok_or_else(|| bad("MoE config without num_experts_per_tok"))?;
                if num_experts_per_tok == 0 || num_experts_per_tok > num_experts {
                    return Err(bad(format!(
                        "num_experts_per_tok ({num_experts_per_tok}) must be in 1..={num_experts}"
                    )));
                }
                let shared = match arch {
                    Arch::Qwen2Moe => {
                        Some(raw.shared_expert_intermediate_size.ok_or_else(|| {
                            bad("qwen2_moe without shared_expert_intermediate_size")
                        })?)
                    }
                    _ => None,
                };
                Some(MoeConfig {
                    num_experts,
                    num_experts_per_tok,
                    moe_intermediate_size: raw
                        .moe_intermediate_size
                        .ok_or_else(|| bad("MoE config without moe_intermediate_size"))?,
                    // transformers' defaults: Qwen3-MoE normalizes the top-k weights, Qwen2-MoE not.
                    norm_topk_prob: raw.norm_topk_prob.unwrap_or(arch == Arch::Qwen3Moe),
                    decoder_sparse_step: raw.decoder_sparse_step.unwrap_or(1).max(1),
                    mlp_only_layers: raw.mlp_only_layers,
                    shared_expert_intermediate_size: shared,
                })
            }
        };
        let intermediate_size = raw
            .intermediate_size
            .ok_or_else(|| bad("missing intermediate_size"))?;
        Ok(Self {
            arch,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: raw.max_position_embeddings,
            rope_theta,
            rope_scaling,
            rms_norm_eps: raw.rms_norm_eps,
            tie_word_embeddings: raw.tie_word_embeddings,
            // Qwen2 always has q/k/v biases; Qwen3 reads the flag (default false).
            attention_bias: match arch {
                Arch::Qwen2 | Arch::Qwen2Moe => raw.attention_bias.unwrap_or(true),
                Arch::Qwen3 | Arch::Qwen3Moe => raw.attention_bias.unwrap_or(false),
            },
            moe,
            eos_token_ids: parse_token_ids(raw.eos_token_id.as_ref()),
        })
    }

    /// Whether decoder layer `layer` uses the sparse MoE block (transformers' rule).
    pub fn is_sparse_layer(&self, layer: usize) -> bool {
        match &self.moe {
            Some(moe) => {
                !moe.mlp_only_layers.contains(&layer)
                    && moe.num_experts > 0
                    && (layer + 1).is_multiple_of(moe.decoder_sparse_step)
            }
            None => false,
        }
    }
}

fn parse_rope_scaling(
    value: Option<&Value>,
    max_position_embeddings: usize,
) -> Result<RopeScaling> {
    let Some(obj) = value.and_then(Value::as_object) else {
        return Ok(RopeScaling::None);
    };
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    match kind {
        "default" => Ok(RopeScaling::None),
        "yarn" => {
            let factor =
                get_f64(obj, "factor").ok_or_else(|| bad("yarn rope scaling without factor"))?;
            if factor < 1.0 {
                return Err(bad(format!("yarn factor must be >= 1, got {factor}")));
            }
            let original = obj
                .get("original_max_position_embeddings")
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .unwrap_or(max_position_embeddings);
            let mscale = get_f64(obj, "mscale");
            let mscale_all_dim = get_f64(obj, "mscale_all_dim");
            let yarn_mscale = |scale: f64, m: f64| {
                if scale <= 1.0 {
                    1.0
                } else {
                    0.1 * m * scale.ln() + 1.0
                }
            };
            let attention_factor = match (get_f64(obj, "attention_factor"), mscale, mscale_all_dim)
            {
                (Some(a), _, _) => a,
                (None, Some(m), Some(m_all)) if m != 0.0 && m_all != 0.0 => {
                    yarn_mscale(factor, m) / yarn_mscale(factor, m_all)
                }
                _ => yarn_mscale(factor, 1.0),
            };
            Ok(RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original,
                beta_fast: get_f64(obj, "beta_fast").unwrap_or(32.0),
                beta_slow: get_f64(obj, "beta_slow").unwrap_or(1.0),
                attention_factor,
                truncate: obj.get("truncate").and_then(Value::as_bool).unwrap_or(true),
            })
        }
        other => Err(ModelError::Unsupported(format!(
            "rope scaling type {other:?} (Ember implements default and yarn)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The shape of Qwen3-30B-A3B's config.json on the Hub.
    const QWEN3_MOE_HUB: &str = r#"{
      "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": false, "decoder_sparse_step": 1,
      "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
      "intermediate_size": 6144, "max_position_embeddings": 40960, "mlp_only_layers": [],
      "model_type": "qwen3_moe", "moe_intermediate_size": 768, "norm_topk_prob": true,
      "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
      "num_hidden_layers": 48, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
      "rope_scaling": null, "rope_theta": 1000000.0, "tie_word_embeddings": false,
      "torch_dtype": "bfloat16", "use_sliding_window": false, "vocab_size": 151936}"#;

    #[test]
    fn parses_hub_qwen3_moe() {
        let cfg = ModelConfig::from_json(QWEN3_MOE_HUB).unwrap();
        assert_eq!(cfg.arch, Arch::Qwen3Moe);
        assert_eq!(cfg.head_dim, 128);
        assert_eq!(cfg.rope_theta, 1_000_000.0);
        assert_eq!(cfg.rope_scaling, RopeScaling::None);
        let moe = cfg.moe.as_ref().unwrap();
        assert_eq!((moe.num_experts, moe.num_experts_per_tok), (128, 8));
        assert!(cfg.is_sparse_layer(0) && cfg.is_sparse_layer(47));
        assert_eq!(cfg.eos_token_ids, vec![151645]);
    }

    #[test]
    fn qwen2_defaults_to_biases_and_derived_head_dim() {
        let cfg = ModelConfig::from_json(
            r#"{"model_type":"qwen2","vocab_size":10,"hidden_size":64,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":4,"num_key_value_heads":2,
            "max_position_embeddings":32,"rms_norm_eps":1e-6,"rope_theta":1000000.0,
            "eos_token_id":[1,2]}"#,
        )
        .unwrap();
        assert!(cfg.attention_bias);
        assert_eq!(cfg.head_dim, 16);
        assert_eq!(cfg.eos_token_ids, vec![1, 2]);
    }

    #[test]
    fn sparse_layer_rule_follows_step_and_mlp_only_layers() {
        let mut cfg = ModelConfig::from_json(QWEN3_MOE_HUB).unwrap();
        let moe = cfg.moe.as_mut().unwrap();
        moe.decoder_sparse_step = 2;
        moe.mlp_only_layers = vec![3];
        assert!(!cfg.is_sparse_layer(0));
        assert!(cfg.is_sparse_layer(1));
        assert!(!cfg.is_sparse_layer(3));
        assert!(cfg.is_sparse_layer(5));
    }

    #[test]
    fn rejects_unknown_model_type_and_rope_scaling() {
        let unknown = QWEN3_MOE_HUB.replace("\"qwen3_moe\"", "\"llama\"");
        let err = ModelConfig::from_json(&unknown).unwrap_err().to_string();
        assert!(err.contains("llama"), "{err}");
        let linear = QWEN3_MOE_HUB.replace(
            "\"rope_scaling\": null",
            "\"rope_scaling\": {\"type\": \"linear\", \"factor\": 2.0}",
        );
        let err = ModelConfig::from_json(&linear).unwrap_err().to_string();
        assert!(err.contains("linear"), "{err}");
        let sliding = QWEN3_MOE_HUB.replace(
            "\"use_sliding_window\": false",
            "\"use_sliding_window\": true",
        );
        assert!(ModelConfig::from_json(&sliding).is_err());
    }

    #[test]
    fn parses_hub_yarn_scaling() {
        let yarn = QWEN3_MOE_HUB.replace(
            "\"rope_scaling\": null",
            "\"rope_scaling\": {\"rope_type\": \"yarn\", \"factor\": 4.0, \"original_max_position_embeddings\": 32768}",
        );
        let cfg = ModelConfig::from_json(&yarn).unwrap();
        match cfg.rope_scaling {
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                attention_factor,
                ..
            } => {
                assert_eq!(factor, 4.0);
                assert_eq!(original_max_position_embeddings, 32768);
                assert!((attention_factor - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-12);
            }
            other => panic!("expected yarn, got {other:?}"),
        }
    }
}
