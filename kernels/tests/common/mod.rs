//! Helpers shared by the kernel parity tests.

use candle_core::{DType, Tensor};

/// Largest absolute value of `t`, in f32.
pub fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
        .and_then(|t| t.abs())
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.max(0))
        .and_then(|t| t.to_scalar::<f32>())
        .expect("max_abs of a tensor")
}

/// Largest absolute difference between `a` and `b`, in f32.
#[allow(dead_code)] // not every test file uses both helpers
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let diff = a
        .to_dtype(DType::F32)
        .and_then(|a| a - b.to_dtype(DType::F32)?);
    max_abs(&diff.expect("difference of two tensors"))
}
