//! Building blocks of the Qwen decoder, each named after its checkpoint counterpart.

pub mod attention;
pub mod embedding;
pub mod linear;
pub mod mlp;
pub mod moe;
pub mod norm;
pub mod rotary;

pub use attention::Attention;
pub use embedding::Embedding;
pub use linear::Linear;
pub use mlp::Mlp;
pub use moe::SparseMoe;
pub use norm::RmsNorm;
pub use rotary::RotaryEmbedding;
