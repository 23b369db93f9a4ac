//! Element types of the CPU kernels: widening to f32 and rounding back, and the vector loads
//! that widen 8 (AVX2) or 16 (AVX-512) of them at once.

use candle_core::{Layout, Result};
use half::{bf16, f16};

/// The part of a CPU storage a contiguous layout covers; an error naming `op` otherwise.
pub(crate) fn contiguous<'a, T>(data: &'a [T], layout: &Layout, op: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: operands must be contiguous"),
    }
}

/// An element type that widens to f32 exactly.
pub(crate) trait Widen: Copy + Send + Sync + 'static {
    fn widen(self) -> f32;
}

impl Widen for f32 {
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

/// What every path of this architecture needs of an element type.
#[cfg(target_arch = "x86_64")]
pub(crate) trait ElemType: x86::Load8 + x86::Load16 {}
#[cfg(target_arch = "x86_64")]
impl<T: x86::Load8 + x86::Load16> ElemType for T {}
#[cfg(not(target_arch = "x86_64"))]
pub(crate) trait ElemType: Widen {}
#[cfg(not(target_arch = "x86_64"))]
impl<T: Widen> ElemType for T {}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use half::{bf16, f16};

    use super::Widen;

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

    /// Loads 16 weights as f32, whole or masked (zeros where the mask is clear).
    pub(crate) trait Load16: Widen {
        /// # Safety
        /// `p` must point to 16 readable elements; the CPU must support AVX-512 F/BW/VL.
        unsafe fn load16(p: *const Self) -> __m512;
        /// # Safety
        /// The elements selected by `mask` must be readable; AVX-512 F/BW/VL.
        unsafe fn load16_masked(p: *const Self, mask: __mmask16) -> __m512;
    }

    impl Load16 for f32 {
        #[inline(always)]
        unsafe fn load16(p: *const f32) -> __m512 {
            // SAFETY: the caller guarantees 16 readable f32 and AVX-512F.
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn load16_masked(p: *const f32, mask: __mmask16) -> __m512 {
            // SAFETY: masked-off elements are not read; AVX-512F.
            unsafe { _mm512_maskz_loadu_ps(mask, p) }
        }
    }

    impl Load16 for bf16 {
        #[inline(always)]
        unsafe fn load16(p: *const bf16) -> __m512 {
            // SAFETY: 16 readable bf16 (32 bytes) and AVX-512F; bf16 widens by a 16-bit shift.
            unsafe {
                let raw = _mm256_loadu_si256(p as *const __m256i);
                _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16))
            }
        }
        #[inline(always)]
        unsafe fn load16_masked(p: *const bf16, mask: __mmask16) -> __m512 {
            // SAFETY: masked-off elements are not read; AVX-512 BW/VL for the 16-bit masked load.
            unsafe {
                let raw = _mm256_maskz_loadu_epi16(mask, p as *const i16);
                _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16))
            }
        }
    }

    impl Load16 for f16 {
        #[inline(always)]
        unsafe fn load16(p: *const f16) -> __m512 {
            // SAFETY: 16 readable f16 (32 bytes) and AVX-512F.
            unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
        }
        #[inline(always)]
        unsafe fn load16_masked(p: *const f16, mask: __mmask16) -> __m512 {
            // SAFETY: masked-off elements are not read; AVX-512 BW/VL.
            unsafe { _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p as *const i16)) }
        }
    }
}
