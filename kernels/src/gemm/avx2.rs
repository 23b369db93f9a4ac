//! AVX2 + FMA + F16C: MR rows of x against NR weight rows per tile, one 8-lane accumulator per
//! output (FMAs over k in order), then a fixed horizontal tree and the tail in order. bf16 and
//! f16 weights are widened in registers.

use std::arch::x86_64::*;
use std::marker::PhantomData;

use half::{bf16, f16};

use super::{Kernel, Widen};
use crate::Isa;

/// Loads 8 weights as f32.
pub(crate) trait Load8: Widen {
    /// # Safety
    /// `p` must point to 8 readable elements; the CPU must support AVX2 and F16C.
    unsafe fn load8(p: *const Self) -> __m256;
}

impl Load8 for f32 {
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> __m256 {
        // SAFETY: the caller guarantees 8 readable f32 and AVX2.
        unsafe { _mm256_loadu_ps(p) }
    }
}

impl Load8 for bf16 {
    #[inline(always)]
    unsafe fn load8(p: *const bf16) -> __m256 {
        // SAFETY: the caller guarantees 8 readable bf16 (16 bytes) and AVX2; bf16 widens to f32
        // by shifting its bits into the high half.
        unsafe {
            let raw = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16))
        }
    }
}

impl Load8 for f16 {
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> __m256 {
        // SAFETY: the caller guarantees 8 readable f16 (16 bytes) and F16C.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }
}

/// The AVX2 family; only made on CPUs that support it.
#[derive(Debug)]
pub(crate) struct Avx2<W>(PhantomData<W>);

impl<W> Clone for Avx2<W> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<W> Copy for Avx2<W> {}

impl<W> Avx2<W> {
    pub(crate) fn new() -> Option<Self> {
        Isa::Avx2.is_supported().then_some(Self(PhantomData))
    }
}

/// Horizontal sum in a fixed order: lanes (0..4)+(4..8), then pairs, then the last two.
#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    // SAFETY: AVX2 is enabled in every caller.
    unsafe {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }
}

/// How far ahead (in elements) a batch-1 tile prefetches each weight row.
const PREFETCH_ELEMS: usize = 256;

/// Dot products of MR rows of x with NR weight rows, each of length k.
#[inline(always)]
unsafe fn tile<W: Load8, const MR: usize, const NR: usize>(
    xs: [*const f32; MR],
    ws: [*const W; NR],
    k: usize,
) -> [[f32; NR]; MR] {
    let full = k / 8 * 8;
    // SAFETY: AVX2, FMA and F16C are enabled in every caller; each row has k readable
    // elements and every vector load reads 8 of them at c < full <= k.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); NR]; MR];
        let mut c = 0;
        while c < full {
            if MR == 1 {
                // Batch-1 decode streams weights from memory: ask for them early.
                for row in ws {
                    let ahead = row.wrapping_add(c + PREFETCH_ELEMS);
                    _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                }
            }
            let mut w = [_mm256_setzero_ps(); NR];
            for n in 0..NR {
                w[n] = W::load8(ws[n].add(c));
            }
            for m in 0..MR {
                let x = _mm256_loadu_ps(xs[m].add(c));
                for n in 0..NR {
                    acc[m][n] = _mm256_fmadd_ps(x, w[n], acc[m][n]);
                }
            }
            c += 8;
        }
        let mut out = [[0f32; NR]; MR];
        for m in 0..MR {
            for n in 0..NR {
                let mut s = hsum(acc[m][n]);
                for i in full..k {
                    s = (*xs[m].add(i)).mul_add((*ws[n].add(i)).widen(), s);
                }
                out[m][n] = s;
            }
        }
        out
    }
}

/// Rows i..i+MR of x against every weight row of `w`, NR at a time.
#[inline(always)]
unsafe fn rows<W: Load8, F: FnMut(usize, usize, f32), const MR: usize, const NR: usize>(
    x: &[f32],
    i: usize,
    w: &[W],
    k: usize,
    emit: &mut F,
) {
    let cols = w.len() / k;
    let xs: [*const f32; MR] = std::array::from_fn(|r| x[(i + r) * k..].as_ptr());
    let mut j = 0;
    // SAFETY: AVX2, FMA and F16C are enabled in every caller; rows i..i+MR of x and rows
    // j..j+NR of w exist (each k long).
    unsafe {
        while j + NR <= cols {
            let ws: [*const W; NR] = std::array::from_fn(|n| w[(j + n) * k..].as_ptr());
            let out = tile::<W, MR, NR>(xs, ws, k);
            for (r, row) in out.iter().enumerate() {
                for (n, &v) in row.iter().enumerate() {
                    emit(i + r, j + n, v);
                }
            }
            j += NR;
        }
        while j < cols {
            let out = tile::<W, MR, 1>(xs, [w[j * k..].as_ptr()], k);
            for (r, row) in out.iter().enumerate() {
                emit(i + r, j, row[0]);
            }
            j += 1;
        }
    }
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C; `x` holds m rows and `w` whole rows of length k.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn task<W: Load8, F: FnMut(usize, usize, f32)>(
    x: &[f32],
    m: usize,
    w: &[W],
    k: usize,
    mut emit: F,
) {
    let mut i = 0;
    // SAFETY: the features are enabled here; `rows` reads rows i..i+MR < m.
    unsafe {
        while i + 4 <= m {
            rows::<W, F, 4, 2>(x, i, w, k, &mut emit);
            i += 4;
        }
        match m - i {
            3 => rows::<W, F, 3, 2>(x, i, w, k, &mut emit),
            2 => rows::<W, F, 2, 3>(x, i, w, k, &mut emit),
            1 => rows::<W, F, 1, 4>(x, i, w, k, &mut emit),
            _ => {}
        }
    }
}

impl<W: Load8> Kernel for Avx2<W> {
    type X = f32;
    type W = W;

    fn task<F: FnMut(usize, usize, f32)>(self, x: &[f32], m: usize, w: &[W], k: usize, emit: F) {
        assert!(x.len() >= m * k && w.len().is_multiple_of(k));
        // SAFETY: an `Avx2` is only made on CPUs with AVX2, FMA and F16C; shapes checked above.
        unsafe { task(x, m, w, k, emit) }
    }
}
