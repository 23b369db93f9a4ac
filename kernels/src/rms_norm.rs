//! `rms_norm(x, w, eps)`: RMSNorm over the last dimension in one pass per row, as transformers
//! computes it: in f32, `x * rsqrt(mean(x²) + eps)`, rounded to the activation dtype, then
//! multiplied by the weight in that dtype. Rows are independent (batch-invariant) and run in
//! parallel when there are many. `add_rms_norm(x, h, w, eps)` is a pre-norm decoder's residual
//! add fused with the next norm: (x + h, rms_norm(x + h)), the same values as the two ops apart.
//! On CUDA both run as kernels of `cuda/rms_norm.cu`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::elem::{contiguous, Store, Widen};

const LANES: usize = 16;
/// Rows per parallel task; a single row (decode) stays on the calling thread.
const ROWS_PER_TASK: usize = 8;

struct RmsNorm {
    eps: f32,
}

/// Sum of squares in 16 interleaved lanes, then a fixed tree, then the tail.
#[inline(always)]
fn sum_squares<T: Widen>(x: &[T]) -> f32 {
    let full = x.len() / LANES * LANES;
    let mut acc = [0f32; LANES];
    for chunk in x[..full].chunks_exact(LANES) {
        for l in 0..LANES {
            let v = chunk[l].widen();
            acc[l] += v * v;
        }
    }
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            acc[l] += acc[l + width];
        }
        width /= 2;
    }
    x[full..]
        .iter()
        .fold(acc[0], |s, v| s + v.widen() * v.widen())
}

fn norm_row<T: Widen + Store>(x: &[T], w: &[T], eps: f32, out: &mut [T]) {
    let inv = 1.0 / (sum_squares(x) / x.len() as f32 + eps).sqrt();
    for ((o, v), g) in out.iter_mut().zip(x).zip(w) {
        // Round the normalized value to the dtype first, as transformers does.
        let normed = T::from_f32(v.widen() * inv).widen();
        *o = T::from_f32(normed * g.widen());
    }
}

fn norm_rows<T: Widen + Store>(x: &[T], w: &[T], eps: f32) -> Vec<T> {
    let d = w.len();
    let mut out = vec![T::from_f32(0.0); x.len()];
    if x.len() <= d {
        norm_row(x, w, eps, &mut out);
        return out;
    }
    out.par_chunks_mut(ROWS_PER_TASK * d)
        .zip(x.par_chunks(ROWS_PER_TASK * d))
        .for_each(|(o, x)| {
            for (o, x) in o.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                norm_row(x, w, eps, o);
            }
        });
    out
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "ember-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = xl.shape().dims().last().copied().unwrap_or(0);
        if wl.shape().dims() != [d] || d == 0 {
            candle_core::bail!("rms_norm: x {:?} with weight {:?}", xl.shape(), wl.shape());
        }
        let eps = self.eps;
        let out = match (xs, ws) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => CpuStorage::F32(norm_rows::<f32>(
                contiguous(x, xl, "rms_norm")?,
                contiguous(w, wl, "rms_norm")?,
                eps,
            )),
            (CpuStorage::BF16(x), CpuStorage::BF16(w)) => CpuStorage::BF16(norm_rows::<bf16>(
                contiguous(x, xl, "rms_norm")?,
                contiguous(w, wl, "rms_norm")?,
                eps,
            )),
            (CpuStorage::F16(x), CpuStorage::F16(w)) => CpuStorage::F16(norm_rows::<f16>(
                contiguous(x, xl, "rms_norm")?,
                contiguous(w, wl, "rms_norm")?,
                eps,
            )),
            _ => candle_core::bail!(
                "rms_norm: unsupported dtypes {:?} x {:?}",
                xs.dtype(),
                ws.dtype()
            ),
        };
        Ok((out, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = xl.shape().dims().last().copied().unwrap_or(0);
        if wl.shape().dims() != [d] || d == 0 {
            candle_core::bail!("rms_norm: x {:?} with weight {:?}", xl.shape(), wl.shape());
        }
        let out = cuda::norm(xs, xl, None, ws, wl, d, self.eps)?;
        Ok((out, xl.shape().clone()))
    }
}

/// The fused residual add and norm: (x, h, w) -> [x + h; rms_norm(x + h)] stacked on a new
/// leading dimension of 2 (one buffer, split by [`add_rms_norm`]).
struct AddRmsNorm {
    eps: f32,
}

/// Rows of x + h rounded to the dtype (what candle's `x + h` computes), then those rows
/// normalized: [sums | normed], each x.len() long.
fn add_norm_rows<T: Widen + Store>(x: &[T], h: &[T], w: &[T], eps: f32) -> Vec<T> {
    let sums: Vec<T> = x
        .iter()
        .zip(h)
        .map(|(a, b)| T::from_f32(a.widen() + b.widen()))
        .collect();
    let normed = norm_rows(&sums, w, eps);
    let mut out = sums;
    out.extend_from_slice(&normed);
    out
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "ember-add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        hs: &CpuStorage,
        hl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let shape = add_norm_shape(xl, hl, wl)?;
        let eps = self.eps;
        let out = match (xs, hs, ws) {
            (CpuStorage::F32(x), CpuStorage::F32(h), CpuStorage::F32(w)) => {
                CpuStorage::F32(add_norm_rows::<f32>(
                    contiguous(x, xl, "add_rms_norm")?,
                    contiguous(h, hl, "add_rms_norm")?,
                    contiguous(w, wl, "add_rms_norm")?,
                    eps,
                ))
            }
            (CpuStorage::BF16(x), CpuStorage::BF16(h), CpuStorage::BF16(w)) => {
                CpuStorage::BF16(add_norm_rows::<bf16>(
                    contiguous(x, xl, "add_rms_norm")?,
                    contiguous(h, hl, "add_rms_norm")?,
                    contiguous(w, wl, "add_rms_norm")?,
                    eps,
                ))
            }
            (CpuStorage::F16(x), CpuStorage::F16(h), CpuStorage::F16(w)) => {
                CpuStorage::F16(add_norm_rows::<f16>(
                    contiguous(x, xl, "add_rms_norm")?,
                    contiguous(h, hl, "add_rms_norm")?,
                    contiguous(w, wl, "add_rms_norm")?,
                    eps,
                ))
            }
            _ => candle_core::bail!(
                "add_rms_norm: unsupported dtypes {:?}, {:?}, {:?}",
                xs.dtype(),
                hs.dtype(),
                ws.dtype()
            ),
        };
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        hs: &candle_core::CudaStorage,
        hl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let shape = add_norm_shape(xl, hl, wl)?;
        let d = wl.shape().dims()[0];
        let out = cuda::norm(xs, xl, Some((hs, hl)), ws, wl, d, self.eps)?;
        Ok((out, shape))
    }
}

/// (2, x's shape) for x and h of one shape whose last dimension is w's length.
fn add_norm_shape(xl: &Layout, hl: &Layout, wl: &Layout) -> Result<Shape> {
    let d = xl.shape().dims().last().copied().unwrap_or(0);
    if xl.shape() != hl.shape() || wl.shape().dims() != [d] || d == 0 {
        candle_core::bail!(
            "add_rms_norm: x {:?}, h {:?}, weight {:?}",
            xl.shape(),
            hl.shape(),
            wl.shape()
        );
    }
    let mut dims = vec![2];
    dims.extend_from_slice(xl.shape().dims());
    Ok(Shape::from(dims))
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, Layout, Result};

    fn span(l: &Layout, what: &str) -> Result<(usize, usize)> {
        l.contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg(format!("{what} needs contiguous inputs")))
    }

    /// One kernel launch: rms_norm of x's rows, or with `h` the fused add (the output then
    /// holds the sums, then the normalized rows).
    #[allow(clippy::too_many_arguments)]
    fn launch<T: DeviceRepr>(
        dev: &CudaDevice,
        name: &str,
        x: &CudaSlice<T>,
        xl: &Layout,
        h: Option<(&CudaSlice<T>, &Layout)>,
        w: &CudaSlice<T>,
        wl: &Layout,
        d: usize,
        eps: f32,
    ) -> Result<CudaSlice<T>> {
        let (x0, x1) = span(xl, name)?;
        let (w0, w1) = span(wl, name)?;
        let n = x1 - x0;
        let rows = n / d;
        let func = dev.get_or_load_custom_func(name, "ember_rms_norm", crate::ptx::RMS_NORM)?;
        let parts = if h.is_some() { 2 } else { 1 };
        // SAFETY: the kernel writes every element (sums and normalized rows) before any read.
        let out = unsafe { dev.alloc::<T>(parts * n)? };
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (d.next_multiple_of(32).clamp(32, 1024) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (d32, x) = (d as u32, x.slice(x0..x1));
        let w = w.slice(w0..w1);
        let mut b = func.builder();
        b.arg(&x);
        let h_view;
        let (sums, normed);
        match h {
            Some((h, hl)) => {
                let (h0, h1) = span(hl, name)?;
                h_view = h.slice(h0..h1);
                (sums, normed) = (out.slice(0..n), out.slice(n..2 * n));
                b.arg(&h_view);
                b.arg(&w);
                b.arg(&sums);
                b.arg(&normed);
            }
            None => {
                normed = out.slice(0..n);
                b.arg(&w);
                b.arg(&normed);
            }
        }
        b.arg(&d32);
        b.arg(&eps);
        // SAFETY: rows blocks of a power-of-32 block size read rows·d elements of x (and h)
        // and d of w, and write rows·d elements per output part, all sized above.
        unsafe { b.launch(cfg) }.w()?;
        Ok(out)
    }

    /// rms_norm (h None) or add_rms_norm (h Some) on the device.
    pub(super) fn norm(
        xs: &CudaStorage,
        xl: &Layout,
        h: Option<(&CudaStorage, &Layout)>,
        ws: &CudaStorage,
        wl: &Layout,
        d: usize,
        eps: f32,
    ) -> Result<CudaStorage> {
        let dev = xs.device.clone();
        let fused = h.is_some();
        macro_rules! run {
            ($x:ident, $variant:ident, $plain:literal, $add:literal) => {{
                let h = match h {
                    None => None,
                    Some((
                        CudaStorage {
                            slice: CudaStorageSlice::$variant(s),
                            ..
                        },
                        l,
                    )) => Some((s, l)),
                    Some(_) => candle_core::bail!("add_rms_norm: x and h differ in dtype"),
                };
                let w = match &ws.slice {
                    CudaStorageSlice::$variant(w) => w,
                    _ => candle_core::bail!("rms_norm: x and the weight differ in dtype"),
                };
                let name = if fused { $add } else { $plain };
                CudaStorageSlice::$variant(launch(&dev, name, $x, xl, h, w, wl, d, eps)?)
            }};
        }
        let slice = match &xs.slice {
            CudaStorageSlice::F32(x) => run!(x, F32, "rms_norm_f32", "add_rms_norm_f32"),
            CudaStorageSlice::BF16(x) => run!(x, BF16, "rms_norm_bf16", "add_rms_norm_bf16"),
            CudaStorageSlice::F16(x) => run!(x, F16, "rms_norm_f16", "add_rms_norm_f16"),
            _ => candle_core::bail!("rms_norm: unsupported dtype on CUDA"),
        };
        Ok(CudaStorage { slice, device: dev })
    }
}

/// Whether the fused kernels run on `x`'s device for these dtypes (CPU always; CUDA when built
/// with it).
fn fused_here(x: &Tensor, w: &Tensor) -> bool {
    let device = x.device().is_cpu() || (cfg!(feature = "cuda") && x.device().is_cuda());
    device
        && x.dtype() == w.dtype()
        && matches!(
            x.dtype(),
            candle_core::DType::F32 | candle_core::DType::BF16 | candle_core::DType::F16
        )
}

/// RMSNorm of `x` (any leading shape, last dimension d) with weight `w` (d,): one fused pass
/// on CPU and CUDA; elsewhere the reference.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let _t = crate::profile::timer(crate::profile::OpClass::Norm);
    if fused_here(x, w) {
        x.contiguous()?
            .apply_op2_no_bwd(&w.contiguous()?, &RmsNorm { eps: eps as f32 })
    } else {
        rms_norm_ref(x, w, eps)
    }
}

/// A pre-norm decoder's residual add and the next norm in one pass: returns `(x + h,
/// rms_norm(x + h, w))`, the same values as [`add_rms_norm_ref`].
pub fn add_rms_norm(x: &Tensor, h: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let _t = crate::profile::timer(crate::profile::OpClass::Norm);
    if fused_here(x, w) && h.dtype() == x.dtype() {
        let both = x.contiguous()?.apply_op3_no_bwd(
            &h.contiguous()?,
            &w.contiguous()?,
            &AddRmsNorm { eps: eps as f32 },
        )?;
        Ok((both.get(0)?, both.get(1)?))
    } else {
        add_rms_norm_ref(x, h, w, eps)
    }
}

/// Plain-candle reference of [`add_rms_norm`]: the add, then the norm.
pub fn add_rms_norm_ref(x: &Tensor, h: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let sum = (x + h)?;
    let normed = rms_norm_ref(&sum, w, eps)?;
    Ok((sum, normed))
}

/// Plain-candle reference of [`rms_norm`] (transformers' Qwen2RMSNorm).
pub fn rms_norm_ref(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(candle_core::DType::F32)?;
    let variance = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_div(&(variance + eps)?.sqrt()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(w)
}
