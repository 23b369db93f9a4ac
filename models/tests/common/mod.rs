//! What the GGUF suites share: the tolerances against llama.cpp's logits and the per-position
//! comparison.

use candle_core::Tensor;

/// Logits that agree up to f32 summation order.
pub const EXACT: f32 = 1e-5;
/// The largest difference at a position where one activation sat on a rounding boundary of its
/// 8-bit quantization (models/tests/gguf.rs, `quantized_ggufs_match_llama_cpp`).
pub const FLIP: f32 = 0.2;

/// The largest |ours - theirs| at each of the first `n` positions (rows).
pub fn position_diffs(ours: &Tensor, theirs: &Tensor, n: usize) -> Vec<f32> {
    (0..n)
        .map(|p| {
            (ours.get(p).unwrap() - theirs.get(p).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar()
                .unwrap()
        })
        .collect()
}
