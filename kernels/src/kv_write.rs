//! `write_kv(cache, src, slots)`: this step's keys or values, (tokens, width), written in place
//! into rows `slots[i]` of a paged cache (slots, width), converted to the cache's dtype (vLLM's
//! `reshape_and_cache`). No gathered copy of the cache is ever made.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Device, InplaceOp2, Layout, Result, Tensor};
use half::{bf16, f16};

use crate::elem::{contiguous, Store, Widen};

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
            CpuStorage::F32(s) => rows_into($dst, contiguous(s, $sl, "write_kv")?, $slots, $width),
            CpuStorage::BF16(s) => rows_into($dst, contiguous(s, $sl, "write_kv")?, $slots, $width),
            CpuStorage::F16(s) => rows_into($dst, contiguous(s, $sl, "write_kv")?, $slots, $width),
            other => candle_core::bail!("write_kv: unsupported source dtype {:?}", other.dtype()),
        }
    };
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

/// A zero-filled CPU tensor whose pages the OS maps only when first written (the allocation
/// asks for zeroed memory instead of writing zeros), so a large KV cache costs no start-up time
/// and only the memory its sequences use. Other devices: `Tensor::zeros`.
pub fn zeros_lazy(shape: (usize, usize), dtype: DType, device: &Device) -> Result<Tensor> {
    let n = shape.0 * shape.1;
    if !device.is_cpu() {
        return Tensor::zeros(shape, dtype, device);
    }
    match dtype {
        DType::F32 => Tensor::from_vec(vec![0f32; n], shape, device),
        DType::BF16 => Tensor::from_vec(halves_zeroed::<bf16>(n), shape, device),
        DType::F16 => Tensor::from_vec(halves_zeroed::<f16>(n), shape, device),
        other => Tensor::zeros(shape, other, device),
    }
}

/// `n` zeros of a 16-bit float type from a zeroed allocation of u16 (which the allocator can
/// hand out as untouched pages).
fn halves_zeroed<T: HalfBits>(n: usize) -> Vec<T> {
    let raw = std::mem::ManuallyDrop::new(vec![0u16; n]);
    let (ptr, len, cap) = (raw.as_ptr() as *mut u16, raw.len(), raw.capacity());
    // SAFETY: T is a #[repr(transparent)] wrapper of u16 (same size and alignment, every bit
    // pattern valid, all-zero bits = +0.0); the allocation is handed over whole, with its length
    // and capacity, from a Vec<u16> that will not free it (ManuallyDrop).
    unsafe { Vec::from_raw_parts(ptr as *mut T, len, cap) }
}

/// 16-bit floats that are `#[repr(transparent)]` over u16.
trait HalfBits {}
impl HalfBits for bf16 {}
impl HalfBits for f16 {}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn lazy_zeros_are_zeros() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let t = zeros_lazy((5, 7), dtype, &Device::Cpu).unwrap();
            assert_eq!((t.dims2().unwrap(), t.dtype()), ((5, 7), dtype));
            let v = t.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
            assert!(v
                .iter()
                .flatten()
                .all(|&x| x == 0.0 && x.is_sign_positive()));
        }
    }
}
