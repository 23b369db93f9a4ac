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

/// One row by the path the CPU kernels use: f32 rows (the CPU model's activations) with AVX2
/// eight lanes at a time, the rest as [`silu_mul_row`]. Every row of every batch takes the same
/// path, lane by lane, so results do not depend on the batch.
trait SiluRow: Widen + Store {
    fn silu_mul_row_fast(row: &[Self], out: &mut [Self]) {
        silu_mul_row(row, out)
    }
}

impl SiluRow for bf16 {}
impl SiluRow for f16 {}

impl SiluRow for f32 {
    fn silu_mul_row_fast(row: &[f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if crate::cpu_isa() >= crate::Isa::Avx2 {
            // SAFETY: the selected path implies AVX2 and FMA.
            unsafe { x86::silu_mul_row(row, out) };
            return;
        }
        silu_mul_row(row, out)
    }
}

fn silu_mul_rows<T: SiluRow>(x: &[T], d: usize) -> Vec<T> {
    let mut out = vec![T::from_f32(0.0); x.len() / 2];
    if out.len() <= d {
        T::silu_mul_row_fast(x, &mut out);
        return out;
    }
    out.par_chunks_mut(ROWS_PER_TASK * d)
        .zip(x.par_chunks(ROWS_PER_TASK * 2 * d))
        .for_each(|(o, x)| {
            for (o, row) in o.chunks_exact_mut(d).zip(x.chunks_exact(2 * d)) {
                T::silu_mul_row_fast(row, o);
            }
        });
    out
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// e^x for eight lanes, within ~2 ulp of `f32::exp` over the range that matters here: x is
    /// clamped to [-86.6, 88.73] (below, e^x only ever meets `1 +` in silu; above, it overflows
    /// to +inf as `exp` does), then e^x = 2^n · e^r with n = round(x / ln 2) and |r| ≤ ln 2 / 2,
    /// e^r by its Taylor series to degree 7 (truncation ~5e-9 relative), times 2^(n-1) and 2
    /// (so that n = 128 is still finite where e^x is). NaN passes through.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp8(x: __m256) -> __m256 {
        // ln 2 split so that n · LN2_HI is exact for |n| < 2^9.
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        let x = _mm256_min_ps(
            _mm256_set1_ps(88.73),
            _mm256_max_ps(_mm256_set1_ps(-86.6), x),
        );
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_set1_ps(1.0 / 5040.0);
        for c in [
            1.0 / 720.0,
            1.0 / 120.0,
            1.0 / 24.0,
            1.0 / 6.0,
            0.5,
            1.0,
            1.0,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        // 2^(n-1) from the exponent bits (-125 ≤ n ≤ 128), then the last factor of 2.
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(126),
        ));
        _mm256_mul_ps(
            _mm256_mul_ps(p, _mm256_castsi256_ps(bits)),
            _mm256_set1_ps(2.0),
        )
    }

    /// `out[i] = silu(row[i]) · row[d + i]` with d = out.len(), eight lanes at a time; a tail of
    /// under eight as the scalar row does.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn silu_mul_row(row: &[f32], out: &mut [f32]) {
        let d = out.len();
        let (gate, up) = row.split_at(d);
        let whole = d - d % 8;
        let one = _mm256_set1_ps(1.0);
        for i in (0..whole).step_by(8) {
            // SAFETY: i + 8 ≤ whole ≤ d, the length of gate, up and out.
            unsafe {
                let g = _mm256_loadu_ps(gate.as_ptr().add(i));
                let u = _mm256_loadu_ps(up.as_ptr().add(i));
                let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
                let y = _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), u);
                _mm256_storeu_ps(out.as_mut_ptr().add(i), y);
            }
        }
        for i in whole..d {
            let g = gate[i];
            out[i] = g / (1.0 + (-g).exp()) * up[i];
        }
    }

    #[cfg(test)]
    mod tests {
        /// The vector row against the scalar one, over the whole range of gates (both tails of
        /// the sigmoid, zero, NaN) and a width with a tail.
        #[test]
        fn vector_row_matches_the_scalar_row() {
            if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
                eprintln!("no AVX2/FMA: the vector silu row is not run on this CPU");
                return;
            }
            let mut gate: Vec<f32> = (-2000..2000).map(|i| i as f32 * 0.05).collect();
            gate.extend([
                -1e4, -100.0, -88.72, -88.0, -87.5, 87.5, 88.8, 100.0, 1e4, 1e-30, -0.0,
            ]);
            // 4011 gates: a tail of three
            let d = gate.len();
            let up: Vec<f32> = (0..d).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
            let row: Vec<f32> = gate.iter().chain(&up).copied().collect();
            let (mut fast, mut scalar) = (vec![0f32; d], vec![0f32; d]);
            // SAFETY: AVX2 and FMA were detected above.
            unsafe { super::silu_mul_row(&row, &mut fast) };
            super::super::silu_mul_row(&row, &mut scalar);
            for i in 0..d {
                let (a, b) = (fast[i], scalar[i]);
                let tol = 4.0 * f32::EPSILON * b.abs() + f32::MIN_POSITIVE;
                assert!((a - b).abs() <= tol, "gate {}: {a} vs {b}", gate[i]);
            }
            let mut nan = row.clone();
            nan[5] = f32::NAN;
            // SAFETY: as above.
            unsafe { super::silu_mul_row(&nan, &mut fast) };
            assert!(fast[5].is_nan());
        }
    }
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
