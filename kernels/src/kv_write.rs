//! `write_kv(cache, src, slots)`: this step's keys or values, (tokens, width), written in place
//! into rows `slots[i]` of a paged cache (slots, width), converted to the cache's dtype (vLLM's
//! `reshape_and_cache`). No gathered copy of the cache is ever made.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, InplaceOp2, Layout, Result, Tensor};

use crate::elem::{Store, Widen};

struct WriteKv<'a> {
    slots: &'a [u32],
}

fn rows_into<S: Widen, D: Store>(dst: &mut [D], src: &[S], slots: &[u32], width: usize) {
    for (row, &slot) in src.chunks_exact(width).zip(slots) {
        let at = slot as usize * width;
        for (d, s) in dst[at..at + width].iter_mut().zip(row) {
            *d = D::from_f32(s.widen());
        }
    }
}

macro_rules! from_src {
    ($dst:expr, $src:expr, $sl:expr, $slots:expr, $width:expr) => {
        match $src {
            CpuStorage::F32(s) => rows_into($dst, contiguous(s, $sl)?, $slots, $width),
            CpuStorage::BF16(s) => rows_into($dst, contiguous(s, $sl)?, $slots, $width),
            CpuStorage::F16(s) => rows_into($dst, contiguous(s, $sl)?, $slots, $width),
            other => candle_core::bail!("write_kv: unsupported source dtype {:?}", other.dtype()),
        }
    };
}

fn contiguous<'a, T>(data: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("write_kv: operands must be contiguous"),
    }
}

impl InplaceOp2 for WriteKv<'_> {
    fn name(&self) -> &'static str {
        "ember-write-kv"
    }

    fn cpu_fwd(
        &self,
        cache: &mut CpuStorage,
        cl: &Layout,
        src: &CpuStorage,
        sl: &Layout,
    ) -> Result<()> {
        let (num_slots, width) = cl.shape().dims2()?;
        let (tokens, src_width) = sl.shape().dims2()?;
        if width != src_width || tokens != self.slots.len() {
            candle_core::bail!(
                "write_kv: cache {:?}, source {:?}, {} slots",
                cl.shape(),
                sl.shape(),
                self.slots.len()
            );
        }
        if let Some(s) = self.slots.iter().find(|&&s| s as usize >= num_slots) {
            candle_core::bail!("write_kv: slot {s} beyond the cache's {num_slots}");
        }
        let (start, end) = cl
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("write_kv: cache must be contiguous".into()))?;
        match cache {
            CpuStorage::F32(c) => from_src!(&mut c[start..end], src, sl, self.slots, width),
            CpuStorage::BF16(c) => from_src!(&mut c[start..end], src, sl, self.slots, width),
            CpuStorage::F16(c) => from_src!(&mut c[start..end], src, sl, self.slots, width),
            other => candle_core::bail!("write_kv: unsupported cache dtype {:?}", other.dtype()),
        }
        Ok(())
    }
}

/// Writes row i of `src` (tokens, width) into row `slots[i]` of `cache` (slots, width), in
/// place, converting to the cache's dtype.
pub fn write_kv(cache: &Tensor, src: &Tensor, slots: &[u32]) -> Result<()> {
    let _t = crate::profile::timer(crate::profile::OpClass::Attention);
    if cache.device().is_cpu() {
        return cache.inplace_op2(&src.contiguous()?, &WriteKv { slots });
    }
    let (tokens, width) = src.dims2()?;
    let index: Vec<u32> = slots
        .iter()
        .flat_map(|&s| std::iter::repeat_n(s, width))
        .collect();
    let index = Tensor::from_vec(index, (tokens, width), src.device())?;
    cache.scatter_set(&index, &src.to_dtype(cache.dtype())?, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn rows_land_in_their_slots_converted() {
        let cache = Tensor::zeros((6, 3), DType::BF16, &Device::Cpu).unwrap();
        let src = Tensor::new(&[[1f32, 2., 3.], [4., 5., 6.]], &Device::Cpu).unwrap();
        write_kv(&cache, &src, &[4, 1]).unwrap();
        let got = cache
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let zero = vec![0f32; 3];
        assert_eq!(got[4], vec![1., 2., 3.]);
        assert_eq!(got[1], vec![4., 5., 6.]);
        for r in [0, 2, 3, 5] {
            assert_eq!(got[r], zero, "row {r} untouched");
        }
        assert!(write_kv(&cache, &src, &[6, 0]).is_err());
        assert!(write_kv(&cache, &src, &[0]).is_err());
    }
}
