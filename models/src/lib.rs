//! Ember's model layer: Qwen2/Qwen2.5, Qwen3, Qwen2-MoE and Qwen3-MoE on candle, with the KV
//! cache outside the model and a forward pass over batches of sequences at any positions.

pub mod batch;
pub mod config;
pub mod error;
pub mod gguf;
pub mod kv_cache;
pub mod layers;
pub mod loader;
pub mod qwen;
pub mod weights;

pub use batch::{Batch, LogitsRows, SeqSlice};
pub use config::{Arch, ModelConfig, MoeConfig, RopeScaling};
pub use error::{ModelError, Result};
pub use gguf::GgufFile;
pub use kv_cache::{ContiguousKvCache, KvCache, PagedKvCache};
pub use loader::{
    eos_token_ids, load_gguf_model, load_model, load_model_quantized, resolve, resolve_with,
    HubOptions, ModelFiles,
};
pub use qwen::QwenModel;
pub use weights::{MatrixRole, QuantizedMatrix, Weights};
