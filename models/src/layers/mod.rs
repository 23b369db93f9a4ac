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

use candle_core::DType;
use candle_nn::VarBuilder;

/// The dtype activations are computed in: f32 on CPU whatever the weights (half-precision
/// weights are widened inside the matmul, so bf16 and f16 only halve the bytes read, as in
/// llama.cpp), the weights' dtype elsewhere (candle's GPU kernels).
pub fn activation_dtype(vb: &VarBuilder) -> DType {
    if vb.device().is_cpu() {
        DType::F32
    } else {
        vb.dtype()
    }
}
