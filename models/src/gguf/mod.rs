//! GGUF checkpoints (llama.cpp's single-file format): the container ([`file`]), the model's
//! hyper-parameters and tokenizer as llama.cpp's converter writes them into the metadata, and
//! the tensors under Hugging Face names ([`tensors`]) so the model code loads them unchanged.

pub mod file;
pub mod tensors;

use serde_json::{json, Value};

pub use file::{GgufFile, MetaValue, TensorInfo, TensorView};
pub use tensors::GgufTensors;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

/// `general.architecture` values Ember runs, with the `model_type` of their config.json.
const ARCHITECTURES: [(&str, &str); 4] = [
    ("qwen2", "qwen2"),
    ("qwen3", "qwen3"),
    ("qwen2moe", "qwen2_moe"),
    ("qwen3moe", "qwen3_moe"),
];

/// Token texts llama.cpp also ends generation on when the file has them (its end-of-generation
/// list, as far as the Qwen family uses it).
const END_OF_GENERATION: [&str; 2] = ["<|im_end|>", "<|endoftext|>"];

impl GgufFile {
    fn meta_err(&self, msg: impl std::fmt::Display) -> ModelError {
        ModelError::Gguf(format!("{}: {msg}", self.path().display()))
    }

    /// The architecture (`general.architecture`), refused with its name unless Ember runs it.
    pub fn architecture(&self) -> Result<&str> {
        let arch = self
            .get("general.architecture")
            .and_then(MetaValue::as_str)
            .ok_or_else(|| self.meta_err("no general.architecture string"))?;
        if ARCHITECTURES.iter().any(|(a, _)| *a == arch) {
            Ok(arch)
        } else {
            Err(ModelError::Unsupported(format!(
                "{}: architecture {arch:?} is not supported; Ember runs qwen2, qwen3, qwen2moe \
                 and qwen3moe",
                self.path().display()
            )))
        }
    }

    fn arch_u64(&self, arch: &str, key: &str) -> Result<Option<u64>> {
        let full = format!("{arch}.{key}");
        match self.get(&full) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                self.meta_err(format!(
                    "{full} is a {}, not a non-negative integer",
                    v.type_name()
                ))
            }),
        }
    }

    fn arch_required(&self, arch: &str, key: &str) -> Result<u64> {
        self.arch_u64(arch, key)?
            .ok_or_else(|| self.meta_err(format!("no {arch}.{key}")))
    }

    fn arch_f64(&self, arch: &str, key: &str) -> Result<Option<f64>> {
        let full = format!("{arch}.{key}");
        match self.get(&full) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                self.meta_err(format!("{full} is a {}, not a number", v.type_name()))
            }),
        }
    }

    /// The model's configuration, as the config.json it was converted from would give it; the
    /// same validation then refuses what Ember does not implement.
    pub fn model_config(&self) -> Result<ModelConfig> {
        let arch = self.architecture()?;
        let model_type = ARCHITECTURES
            .iter()
            .find(|(a, _)| *a == arch)
            .map_or(arch, |(_, t)| t);
        let embed = self
            .tensors
            .get("token_embd.weight")
            .ok_or_else(|| self.meta_err("no token_embd.weight tensor"))?;
        let hidden = self.arch_required(arch, "embedding_length")?;
        let vocab = match embed.dims.as_slice() {
            [h, v] if *h as u64 == hidden => *v,
            dims => {
                return Err(self.meta_err(format!(
                    "token_embd.weight has dims {dims:?}, not [{hidden}, vocab]"
                )))
            }
        };
        let heads = self.arch_required(arch, "attention.head_count")?;
        let layers = self.arch_required(arch, "block_count")?;
        let mut cfg = json!({
            "model_type": model_type,
            "vocab_size": vocab,
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": self.arch_u64(arch, "attention.head_count_kv")?.unwrap_or(heads),
            "max_position_embeddings": self.arch_required(arch, "context_length")?,
            "rope_theta": self.arch_f64(arch, "rope.freq_base")?.unwrap_or(10000.0),
            "rms_norm_eps": self
                .arch_f64(arch, "attention.layer_norm_rms_epsilon")?
                .ok_or_else(|| self.meta_err(format!("no {arch}.attention.layer_norm_rms_epsilon")))?,
            "tie_word_embeddings": !self.tensors.contains_key("output.weight"),
            "attention_bias": self.tensors.contains_key("blk.0.attn_q.bias"),
            "eos_token_id": self.eos_token_ids(),
        });
        let obj = cfg.as_object_mut().expect("a JSON object literal");
        if let Some(d) = self.arch_u64(arch, "attention.key_length")? {
            obj.insert("head_dim".into(), d.into());
        }
        if let Some(ff) = self.arch_u64(arch, "feed_forward_length")? {
            obj.insert("intermediate_size".into(), ff.into());
        }
        if let Some(kind) = self.get(&format!("{arch}.rope.scaling.type")) {
            let kind = kind.as_str().unwrap_or_default();
            let mut scaling = json!({ "rope_type": kind, "type": kind });
            let s = scaling.as_object_mut().expect("a JSON object literal");
            if let Some(f) = self.arch_f64(arch, "rope.scaling.factor")? {
                s.insert("factor".into(), f.into());
            }
            if let Some(n) = self.arch_u64(arch, "rope.scaling.original_context_length")? {
                s.insert("original_max_position_embeddings".into(), n.into());
            }
            for (key, name) in [
                ("rope.scaling.yarn_beta_fast", "beta_fast"),
                ("rope.scaling.yarn_beta_slow", "beta_slow"),
            ] {
                if let Some(v) = self.arch_f64(arch, key)? {
                    s.insert(name.into(), v.into());
                }
            }
            // "none" is llama.cpp's default; anything else is checked as config.json's would be.
            if kind != "none" {
                obj.insert("rope_scaling".into(), scaling);
            }
        }
        if arch.ends_with("moe") {
            self.moe_config(arch, layers, obj)?;
        }
        ModelConfig::from_json(&cfg.to_string())
    }

    /// Expert counts and sizes; which layers are dense is read from the tensors (GGUF has no
    /// key for it); llama.cpp normalizes the top-k weights for qwen3moe and not for qwen2moe.
    fn moe_config(
        &self,
        arch: &str,
        layers: u64,
        obj: &mut serde_json::Map<String, Value>,
    ) -> Result<()> {
        obj.insert(
            "num_experts".into(),
            self.arch_required(arch, "expert_count")?.into(),
        );
        obj.insert(
            "num_experts_per_tok".into(),
            self.arch_required(arch, "expert_used_count")?.into(),
        );
        obj.insert(
            "moe_intermediate_size".into(),
            self.arch_required(arch, "expert_feed_forward_length")?
                .into(),
        );
        if let Some(n) = self.arch_u64(arch, "expert_shared_feed_forward_length")? {
            obj.insert("shared_expert_intermediate_size".into(), n.into());
        }
        let norm = match self.get(&format!("{arch}.expert_weights_norm")) {
            Some(v) => v.as_bool().unwrap_or(false),
            None => arch == "qwen3moe",
        };
        obj.insert("norm_topk_prob".into(), norm.into());
        obj.insert("decoder_sparse_step".into(), 1.into());
        let dense: Vec<u64> = (0..layers)
            .filter(|i| {
                !self
                    .tensors
                    .contains_key(&format!("blk.{i}.ffn_gate_inp.weight"))
            })
            .collect();
        obj.insert("mlp_only_layers".into(), dense.into());
        Ok(())
    }

    /// `tokenizer.ggml.eos_token_id` and `eot_token_id`, then every token llama.cpp also treats
    /// as an end of generation (`<|im_end|>`, `<|endoftext|>`), each once.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
            .iter()
            .filter_map(|k| self.get(k).and_then(MetaValue::as_u64))
            .filter_map(|id| u32::try_from(id).ok())
            .collect();
        if let Some(tokens) = self
            .get("tokenizer.ggml.tokens")
            .and_then(MetaValue::as_array)
        {
            for (id, t) in tokens.iter().enumerate() {
                if t.as_str().is_some_and(|t| END_OF_GENERATION.contains(&t)) {
                    ids.push(id as u32);
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        ids.retain(|id| seen.insert(*id));
        ids
    }

    /// `tokenizer.chat_template`, if the file has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.get("tokenizer.chat_template")
            .and_then(MetaValue::as_str)
    }

    /// The BPE vocabulary llama.cpp's converter stored (`tokenizer.ggml.*`), checked to be
    /// GPT-2 style with Qwen's pre-tokenizer.
    pub fn vocab(&self) -> Result<GgufVocab> {
        let model = self
            .get("tokenizer.ggml.model")
            .and_then(MetaValue::as_str)
            .ok_or_else(|| self.meta_err("no tokenizer.ggml.model"))?;
        if model != "gpt2" {
            return Err(ModelError::Unsupported(format!(
                "{}: tokenizer.ggml.model {model:?}; Ember rebuilds gpt2 (byte-level BPE) \
                 tokenizers (or give --tokenizer DIR)",
                self.path().display()
            )));
        }
        let pre = self
            .get("tokenizer.ggml.pre")
            .and_then(MetaValue::as_str)
            .unwrap_or("default");
        if pre != "qwen2" {
            return Err(ModelError::Unsupported(format!(
                "{}: tokenizer.ggml.pre {pre:?}; Ember rebuilds Qwen's (qwen2) pre-tokenizer \
                 (or give --tokenizer DIR)",
                self.path().display()
            )));
        }
        let strings = |key: &str| -> Result<Vec<String>> {
            let items = self
                .get(key)
                .and_then(MetaValue::as_array)
                .ok_or_else(|| self.meta_err(format!("no {key} array")))?;
            items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(String::from)
                        .ok_or_else(|| self.meta_err(format!("{key} holds a {}", v.type_name())))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types = match self.get("tokenizer.ggml.token_type") {
            None => vec![TokenType::Normal; tokens.len()],
            Some(v) => {
                let items = v
                    .as_array()
                    .ok_or_else(|| self.meta_err("tokenizer.ggml.token_type is not an array"))?;
                if items.len() != tokens.len() {
                    return Err(self.meta_err(format!(
                        "{} token types for {} tokens",
                        items.len(),
                        tokens.len()
                    )));
                }
                items
                    .iter()
                    .map(|t| TokenType::from_value(t.as_f64().unwrap_or(0.0) as i64))
                    .collect()
            }
        };
        Ok(GgufVocab {
            tokens,
            types,
            merges,
        })
    }
}

/// llama.cpp's token types (`llama_token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
    Undefined,
}

impl TokenType {
    fn from_value(v: i64) -> Self {
        match v {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Undefined,
        }
    }
}

/// A byte-level BPE vocabulary from GGUF metadata: tokens by id (texts in GPT-2's byte
/// alphabet), their types, and the merges in rank order (`"a b"`).
#[derive(Debug, Clone)]
pub struct GgufVocab {
    pub tokens: Vec<String>,
    pub types: Vec<TokenType>,
    pub merges: Vec<String>,
}
