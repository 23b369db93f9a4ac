//! Ember's fused kernels. Each op has a plain-candle reference (`*_ref`) that its tests compare
//! against; CPU implementations are always built, CUDA ones with feature `cuda`.

mod attention;
mod elem;
mod isa;
mod kv_write;
mod linear;
mod mem;
mod packed;
mod paged_attention;
mod pool;
pub mod profile;
mod quant;
mod rms_norm;
mod silu_and_mul;

pub use attention::causal_attention_ref;
pub use isa::{
    cpu_isa, cpu_isa_warning, detect as detect_isa, preferred as preferred_isa,
    rerun_tests_on_other_isas, supported_isas, Isa,
};
pub use kv_write::{write_kv, zeros_lazy, KvLayout};
pub use linear::{
    linear, linear_packed, linear_packed_with_isa, linear_quant, linear_ref, linear_with_isa,
};
pub use mem::Zeroed;
pub use packed::{HostRows, PackedWeight};
pub use paged_attention::{
    causal_attention, paged_attention, paged_attention_ref, paged_attention_with_isa, PagedSeq,
};
pub use pool::on_pool;
pub use quant::{dequantize, Activations, GgmlType, QuantError, QuantWeight};
pub use rms_norm::{add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref};
pub use silu_and_mul::{silu_and_mul, silu_and_mul_ref};

#[cfg(feature = "cuda")]
pub(crate) mod ptx {
    pub const SILU_AND_MUL: &str = include_str!(concat!(env!("OUT_DIR"), "/silu_and_mul.ptx"));
    pub const RMS_NORM: &str = include_str!(concat!(env!("OUT_DIR"), "/rms_norm.ptx"));
}
