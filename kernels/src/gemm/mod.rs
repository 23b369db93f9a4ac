//! `y = x · wᵀ` on CPU: the driver that splits a product into tasks over weight rows, and one
//! micro-kernel family per instruction set ([`crate::Isa`]).
//!
//! Batch invariance: each output element is one dot product reduced over k in an order fixed by
//! the kernel family (its lane count, then a fixed horizontal tree, then the tail), never by m,
//! by the tile the element falls in or by the thread that computes it. So a row of x gets the
//! same bits alone or in any batch. Different families may differ from each other in the last
//! bits.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod scalar;

use half::{bf16, f16};
use rayon::prelude::*;

use crate::Isa;

#[cfg(target_arch = "x86_64")]
pub(crate) use avx2::{Avx2, Load8};
#[cfg(target_arch = "x86_64")]
pub(crate) use avx512::{Avx512, Avx512Bf16, Load16};
pub(crate) use scalar::Scalar;

/// Weight rows per parallel task: a task's rows stay in L2 while every row of x passes by.
const ROWS_PER_TASK: usize = 32;

/// An element type that widens to f32 exactly.
pub(crate) trait Widen: Copy + Send + Sync + 'static {
    /// Whether widening does any work (false for f32 itself).
    const WIDENS: bool = true;
    fn widen(self) -> f32;
}

impl Widen for f32 {
    const WIDENS: bool = false;
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Widen for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

impl Widen for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// An output element type: f32 results are rounded once on store.
pub(crate) trait Store: Copy + Send + Sync + 'static {
    fn from_f32(v: f32) -> Self;
}

impl Store for f32 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Store for bf16 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

impl Store for f16 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// One micro-kernel family. A value of a type implementing it is only made where the CPU
/// supports the family's instructions.
pub(crate) trait Kernel: Copy + Send + Sync {
    /// Activation element type (rows of x).
    type X: Copy + Send + Sync;
    /// Weight element type.
    type W: Copy + Send + Sync;

    /// Every dot product of the `m` rows of `x` (m × k) with the rows of `w` (cols × k),
    /// `emit(i, j, value)` once per (row of x, row of w).
    fn task<F: FnMut(usize, usize, f32)>(
        self,
        x: &[Self::X],
        m: usize,
        w: &[Self::W],
        k: usize,
        emit: F,
    );
}

/// The output buffer shared by the tasks; each task writes only its own columns.
struct SharedOut<O>(*mut O);

// SAFETY: tasks write disjoint elements (distinct columns) of a buffer that outlives them.
unsafe impl<O: Send> Sync for SharedOut<O> {}

/// `out` (m × n) = x (m × k) · wᵀ (w: n × k) + bias, computed by `kernel` on the rayon pool,
/// parallel over weight rows; results are rounded once into `O`.
pub(crate) fn gemm<K: Kernel, O: Store>(
    kernel: K,
    x: &[K::X],
    w: &[K::W],
    bias: Option<&[f32]>,
    (m, n, k): (usize, usize, usize),
    out: &mut [O],
) {
    assert!(x.len() >= m * k && w.len() >= n * k && out.len() >= m * n);
    assert!(bias.is_none_or(|b| b.len() >= n));
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = O::from_f32(bias.map_or(0.0, |b| b[j]));
            }
        }
        return;
    }
    let shared = SharedOut(out.as_mut_ptr());
    let shared = &shared;
    w[..n * k]
        .par_chunks(ROWS_PER_TASK * k)
        .enumerate()
        .for_each(|(t, chunk)| {
            let j0 = t * ROWS_PER_TASK;
            kernel.task(&x[..m * k], m, chunk, k, |i, j, v| {
                let col = j0 + j;
                let v = match bias {
                    Some(b) => v + b[col],
                    None => v,
                };
                debug_assert!(i < m && col < n);
                // SAFETY: i < m and col < n, so the element is inside `out` (checked above);
                // only the task owning weight row `col` writes column `col`.
                unsafe { *shared.0.add(i * n + col) = O::from_f32(v) };
            });
        });
}

/// What a weight type must offer every family of this architecture.
#[cfg(target_arch = "x86_64")]
pub(crate) trait WeightType: Load8 + Load16 {}
#[cfg(target_arch = "x86_64")]
impl<T: Load8 + Load16> WeightType for T {}
#[cfg(not(target_arch = "x86_64"))]
pub(crate) trait WeightType: Widen {}
#[cfg(not(target_arch = "x86_64"))]
impl<T: Widen> WeightType for T {}

/// [`gemm`] with f32 activations, by the best family `isa` allows.
pub(crate) fn gemm_f32<W: WeightType, O: Store>(
    isa: Isa,
    x: &[f32],
    w: &[W],
    bias: Option<&[f32]>,
    dims: (usize, usize, usize),
    out: &mut [O],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if isa >= Isa::Avx512 {
            if let Some(kernel) = Avx512::<W>::new() {
                return gemm(kernel, x, w, bias, dims, out);
            }
        }
        if isa >= Isa::Avx2 {
            if let Some(kernel) = Avx2::<W>::new() {
                return gemm(kernel, x, w, bias, dims, out);
            }
        }
    }
    let _ = isa;
    gemm(Scalar::<W>::new(), x, w, bias, dims, out)
}

/// [`gemm`] with bf16 activations and weights: `vdpbf16ps` where `isa` allows it, else the
/// activations are widened once and the f32 families run.
pub(crate) fn gemm_bf16<O: Store>(
    isa: Isa,
    x: &[bf16],
    w: &[bf16],
    bias: Option<&[f32]>,
    dims: (usize, usize, usize),
    out: &mut [O],
) {
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx512Bf16 {
        if let Some(kernel) = Avx512Bf16::new() {
            return gemm(kernel, x, w, bias, dims, out);
        }
    }
    let xf: Vec<f32> = x[..dims.0 * dims.2].iter().map(|v| v.widen()).collect();
    gemm_f32(isa, &xf, w, bias, dims, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The portable family against f64 dot products, and its independence from m.
    #[test]
    fn scalar_family_is_correct_and_batch_invariant() {
        let (m, n, k) = (7, 37, 45);
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 30.0)
            .collect();
        let bias: Vec<f32> = (0..n).map(|j| j as f32 / 8.0).collect();
        let mut all = vec![0f32; m * n];
        gemm(
            Scalar::<f32>::new(),
            &x,
            &w,
            Some(&bias),
            (m, n, k),
            &mut all,
        );
        for i in 0..m {
            let mut one = vec![0f32; n];
            let row = &x[i * k..(i + 1) * k];
            gemm(
                Scalar::<f32>::new(),
                row,
                &w,
                Some(&bias),
                (1, n, k),
                &mut one,
            );
            for j in 0..n {
                let exact: f64 = (0..k)
                    .map(|c| x[i * k + c] as f64 * w[j * k + c] as f64)
                    .sum::<f64>()
                    + bias[j] as f64;
                assert!((all[i * n + j] as f64 - exact).abs() < 1e-4);
                assert_eq!(one[j], all[i * n + j], "row {i} col {j}");
            }
        }
    }
}
