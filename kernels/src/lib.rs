//! Ember's fused kernels. Each op has a plain-candle reference (`*_ref`) that its tests compare
//! against; CPU implementations are always built, CUDA ones with feature `cuda`.

mod attention;
mod linear;
mod silu_and_mul;

pub use attention::{causal_attention, causal_attention_ref};
pub use linear::{linear, linear_ref};
pub use silu_and_mul::{silu_and_mul, silu_and_mul_ref};

#[cfg(feature = "cuda")]
pub(crate) mod ptx {
    pub const SILU_AND_MUL: &str = include_str!(concat!(env!("OUT_DIR"), "/silu_and_mul.ptx"));
}
