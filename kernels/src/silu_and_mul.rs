//! `silu_and_mul(x)`: for `x` = [gate | up] of shape (rows, 2d), returns silu(gate) * up of
//! shape (rows, d) in one pass, computing in f32 and rounding once (vLLM's `silu_and_mul`).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::elem::{Store, Widen};

struct SiluAndMul;

/// Rows per parallel task; a single row (decode) stays on the calling thread.
const ROWS_PER_TASK: usize = 4;

fn silu_mul_row<T: Widen + Store>(row: &[T], out: &mut [T]) {
    let (gate, up) = row.split_at(out.len());
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        let (g, u) = (g.widen(), u.widen());
        *o = T::from_f32(g / (1.0 + (-g).exp()) * u);
    }
}

fn silu_mul_rows<T: Widen + Store>(x: &[T], d: usize) -> Vec<T> {
    let mut out = vec![T::from_f32(0.0); x.len() / 2];
    if out.len() <= d {
        silu_mul_row(x, &mut out);
        return out;
    }
    out.par_chunks_mut(ROWS_PER_TASK * d)
        .zip(x.par_chunks(ROWS_PER_TASK * 2 * d))
        .for_each(|(o, x)| {
            for (o, row) in o.chunks_exact_mut(d).zip(x.chunks_exact(2 * d)) {
                silu_mul_row(row, o);
            }
        });
    out
}

impl CustomOp1 for SiluAndMul {
    fn name(&self) -> &'static str {
        "silu-and-mul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, two_d) = layout.shape().dims2()?;
        let d = two_d / 2;
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("silu_and_mul needs a contiguous input".into())
        })?;
        let out = match storage {
            CpuStorage::F32(x) => CpuStorage::F32(silu_mul_rows(&x[start..end], d)),
            CpuStorage::BF16(x) => CpuStorage::BF16(silu_mul_rows::<bf16>(&x[start..end], d)),
            CpuStorage::F16(x) => CpuStorage::F16(silu_mul_rows::<f16>(&x[start..end], d)),
            other => candle_core::bail!("silu_and_mul: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, Shape::from((rows, d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{
            CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
        };
        use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};

        let (rows, two_d) = layout.shape().dims2()?;
        let d = two_d / 2;
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("silu_and_mul needs a contiguous input".into())
        })?;
        let dev = storage.device().clone();
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (d.clamp(32, 1024) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        fn launch<T: DeviceRepr>(
            dev: &candle_core::CudaDevice,
            name: &str,
            x: &CudaSlice<T>,
            start: usize,
            end: usize,
            rows: usize,
            d: usize,
            cfg: LaunchConfig,
        ) -> Result<CudaSlice<T>> {
            let func =
                dev.get_or_load_custom_func(name, "ember_silu_and_mul", crate::ptx::SILU_AND_MUL)?;
            // SAFETY: every element is written by the kernel before it is read.
            let out = unsafe { dev.alloc::<T>(rows * d)? };
            let x = x.slice(start..end);
            let d32 = d as u32;
            let mut builder = func.builder();
            builder.arg(&x);
            builder.arg(&out);
            builder.arg(&d32);
            // SAFETY: the kernel reads rows * 2d elements of `x` and writes rows * d of `out`,
            // both sized above; the grid has one block per row.
            unsafe { builder.launch(cfg) }.w()?;
            Ok(out)
        }
        let slice = match &storage.slice {
            CudaStorageSlice::F32(x) => CudaStorageSlice::F32(launch(
                &dev,
                "silu_and_mul_f32",
                x,
                start,
                end,
                rows,
                d,
                cfg,
            )?),
            CudaStorageSlice::BF16(x) => CudaStorageSlice::BF16(launch(
                &dev,
                "silu_and_mul_bf16",
                x,
                start,
                end,
                rows,
                d,
                cfg,
            )?),
            CudaStorageSlice::F16(x) => CudaStorageSlice::F16(launch(
                &dev,
                "silu_and_mul_f16",
                x,
                start,
                end,
                rows,
                d,
                cfg,
            )?),
            _ => candle_core::bail!("silu_and_mul: unsupported dtype {:?}", storage.dtype()),
        };
        Ok((
            candle_core::CudaStorage { slice, device: dev },
            Shape::from((rows, d)),
        ))
    }
}

fn check(x: &Tensor) -> Result<()> {
    let (_, two_d) = x.dims2()?;
    if two_d % 2 != 0 {
        candle_core::bail!("silu_and_mul: last dimension {two_d} is odd");
    }
    if !matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        candle_core::bail!("silu_and_mul: unsupported dtype {:?}", x.dtype());
    }
    Ok(())
}

/// Fused `silu(x[:, :d]) * x[:, d:]` for `x` of shape (rows, 2d).
pub fn silu_and_mul(x: &Tensor) -> Result<Tensor> {
    let _t = crate::profile::timer(crate::profile::OpClass::Activation);
    check(x)?;
    x.contiguous()?.apply_op1_no_bwd(&SiluAndMul)
}

/// Plain-candle reference of [`silu_and_mul`] (computed in f32, rounded once).
pub fn silu_and_mul_ref(x: &Tensor) -> Result<Tensor> {
    check(x)?;
    let d = x.dim(1)? / 2;
    let xf = x.to_dtype(DType::F32)?;
    let gate = xf.narrow(1, 0, d)?;
    let up = xf.narrow(1, d, d)?;
    (candle_core::Tensor::silu(&gate)? * up)?.to_dtype(x.dtype())
}
