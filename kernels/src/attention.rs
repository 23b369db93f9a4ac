//! Causal attention of one sequence's new queries over its whole context, batch-invariant on
//! CPU: each (query, head) is computed alone, in a fixed order (scores, max, exp, sum, weighted
//! sum over the context in order), so results do not depend on how many queries share the
//! call (chunked prefill, prefix-cache hits) or what else is in the batch. Computed in f32.
//!
//! On CUDA this falls back to the plain-candle reference.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, D};
use half::bf16;
use rayon::prelude::*;

const LANES: usize = 16;

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let full = a.len() / LANES * LANES;
    let mut acc = [0f32; LANES];
    let mut c = 0;
    while c < full {
        for l in 0..LANES {
            acc[l] += a[c + l] * b[c + l];
        }
        c += LANES;
    }
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            acc[l] += acc[l + width];
        }
        width /= 2;
    }
    let mut s = acc[0];
    for i in full..a.len() {
        s += a[i] * b[i];
    }
    s
}

struct CausalAttention {
    start: usize,
    scale: f32,
}

fn to_f32(s: &CpuStorage, l: &Layout) -> Result<Vec<f32>> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("attention: operands must be contiguous".into()))?;
    Ok(match s {
        CpuStorage::F32(v) => v[a..b].to_vec(),
        CpuStorage::BF16(v) => v[a..b].iter().map(|x| x.to_f32()).collect(),
        other => candle_core::bail!("attention: unsupported dtype {:?}", other.dtype()),
    })
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "ember-causal-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, h, d) = ql.shape().dims3()?;
        let (ctx, kv, d2) = kl.shape().dims3()?;
        if d != d2 || vl.shape().dims3()? != (ctx, kv, d) || h % kv != 0 || self.start + n > ctx {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?}, start {}",
                ql.shape(),
                kl.shape(),
                vl.shape(),
                self.start
            );
        }
        let (q, k, v) = (to_f32(qs, ql)?, to_f32(ks, kl)?, to_f32(vs, vl)?);
        let group = h / kv;
        let mut out = vec![0f32; n * h * d];
        out.par_chunks_mut(d).enumerate().for_each(|(row, o)| {
            let (i, head) = (row / h, row % h);
            let g = head / group;
            let qv = &q[(i * h + head) * d..(i * h + head + 1) * d];
            let visible = self.start + i + 1;
            let scores: Vec<f32> = (0..visible)
                .map(|j| dot(qv, &k[(j * kv + g) * d..(j * kv + g + 1) * d]) * self.scale)
                .collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (j, s) in scores.iter().enumerate() {
                let p = (s - max).exp();
                sum += p;
                let vj = &v[(j * kv + g) * d..(j * kv + g + 1) * d];
                for (acc, x) in o.iter_mut().zip(vj) {
                    *acc += p * x;
                }
            }
            for x in o.iter_mut() {
                *x /= sum;
            }
        });
        let storage = match qs {
            CpuStorage::BF16(_) => CpuStorage::BF16(out.into_iter().map(bf16::from_f32).collect()),
            _ => CpuStorage::F32(out),
        };
        Ok((storage, Shape::from((n, h * d))))
    }
}

/// Causal attention of queries `q` (n, heads, dim) at positions `start..start + n` over keys and
/// values `k`, `v` (context, kv_heads, dim); query head h reads kv head h / (heads / kv_heads).
/// Returns (n, heads * dim).
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    start: usize,
    scale: f32,
) -> Result<Tensor> {
    let cpu = matches!(q.device(), Device::Cpu) && matches!(q.dtype(), DType::F32 | DType::BF16);
    if cpu && k.dtype() == q.dtype() && v.dtype() == q.dtype() {
        q.contiguous()?.apply_op3_no_bwd(
            &k.contiguous()?,
            &v.contiguous()?,
            &CausalAttention { start, scale },
        )
    } else {
        causal_attention_ref(q, k, v, start, scale)
    }
}

/// Plain-candle reference of [`causal_attention`] (matmuls, f32 softmax).
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
