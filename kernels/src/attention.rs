//! The plain-candle reference of causal attention over a contiguous context, which
//! [`crate::paged_attention`] is tested against.

use candle_core::{DType, Result, Tensor, D};

/// Plain-candle reference of [`crate::causal_attention`] (matmuls, f32 softmax): `q` (n, heads,
/// d) at positions `start..start + n` over `k`, `v` (context, kv_heads, d) -> (n, heads · d).
pub fn causal_attention_ref(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    start: usize,
    scale: f32,
) -> Result<Tensor> {
    let (n, h, d) = q.dims3()?;
    let (ctx, kv, _) = k.dims3()?;
    let group = h / kv;
    let dtype = q.dtype();
    // Query heads [g*group, (g+1)*group) share kv head g: fold them into the row dimension.
    let q = q
        .transpose(0, 1)?
        .contiguous()?
        .reshape((kv, group * n, d))?;
    let k = k.transpose(0, 1)?.contiguous()?;
    let v = v.transpose(0, 1)?.contiguous()?;
    let scores = (q.matmul(&k.t()?)? * scale as f64)?.to_dtype(DType::F32)?;
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| {
            (0..ctx).map(move |j| {
                if j > start + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    let mask = Tensor::from_vec(mask, (n, ctx), q.device())?;
    let scores = scores
        .reshape((kv, group, n, ctx))?
        .broadcast_add(&mask)?
        .reshape((kv, group * n, ctx))?;
    let max = scores.max_keepdim(D::Minus1)?;
    let e = scores.broadcast_sub(&max)?.exp()?;
    let probs = e
        .broadcast_div(&e.sum_keepdim(D::Minus1)?)?
        .to_dtype(dtype)?;
    probs
        .matmul(&v)?
        .reshape((h, n, d))?
        .transpose(0, 1)?
        .reshape((n, h * d))
}
