//! AVX-512 families. `Avx512`: f32 activations, 16-lane FMAs, bf16/f16 weights widened in
//! registers. `Avx512Bf16`: bf16 activations and weights, `vdpbf16ps` (32 products a step,
//! exact in f32, summed in pairs into 16 lanes). Both: one accumulator per output over k in
//! order, the tail through a masked load (zeros beyond k), then `_mm512_reduce_add_ps`.

use std::arch::x86_64::*;
use std::marker::PhantomData;

use half::{bf16, f16};

use super::{Kernel, Widen};
use crate::Isa;

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

/// Sums every accumulator of a tile, 16 at a time, with one shared shuffle tree per 16: 15 adds
/// and 30 shuffles instead of 8 operations per output. Every accumulator is folded the same way
/// wherever it sits (lanes i + i+8, then + i+4, then pairs, then the last two), so an output's
/// bits do not depend on its tile or slot.
///
/// # Safety
/// AVX-512F must be enabled in the caller.
#[inline(always)]
unsafe fn reduce_tile<const MR: usize, const NR: usize>(
    acc: &[[__m512; NR]; MR],
) -> [[f32; NR]; MR] {
    let mut out = [[0f32; NR]; MR];
    let total = MR * NR;
    let mut base = 0;
    while base < total {
        // SAFETY: AVX-512F is enabled in every caller.
        let sums = unsafe {
            // The tree leaves input o in lane o when it is fed in slot (o % 4) * 4 + o / 4.
            let mut group = [_mm512_setzero_ps(); 16];
            for o in base..total.min(base + 16) {
                let local = o - base;
                group[(local % 4) * 4 + local / 4] = acc[o / NR][o % NR];
            }
            reduce16(&group)
        };
        for o in base..total.min(base + 16) {
            out[o / NR][o % NR] = sums[o - base];
        }
        base += 16;
    }
    out
}

/// Lane i of the result = the sum of the 16 lanes of input (i % 4) * 4 + i / 4.
///
/// # Safety
/// AVX-512F must be enabled in the caller.
#[inline(always)]
unsafe fn reduce16(v: &[__m512; 16]) -> [f32; 16] {
    // SAFETY: AVX-512F is enabled in every caller; the shuffles only move lanes.
    unsafe {
        // 16 vectors × 16 lanes -> 8 × (2 sources × 8 lanes): a 256-bit half plus the other.
        let mut s = [_mm512_setzero_ps(); 8];
        for (k, out) in s.iter_mut().enumerate() {
            let (a, b) = (v[2 * k], v[2 * k + 1]);
            let lo = _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b);
            let hi = _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b);
            *out = _mm512_add_ps(lo, hi);
        }
        // -> 4 × (4 sources × 4 lanes): each 128-bit quarter plus its neighbour.
        let mut t = [_mm512_setzero_ps(); 4];
        for (k, out) in t.iter_mut().enumerate() {
            let (a, b) = (s[2 * k], s[2 * k + 1]);
            let lo = _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b);
            let hi = _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b);
            *out = _mm512_add_ps(lo, hi);
        }
        // -> 2 × (8 sources × 2 lanes): lanes (0, 1) plus (2, 3) within each quarter.
        let mut u = [_mm512_setzero_ps(); 2];
        for (k, out) in u.iter_mut().enumerate() {
            let (a, b) = (_mm512_castps_pd(t[2 * k]), _mm512_castps_pd(t[2 * k + 1]));
            let lo = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
            let hi = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
            *out = _mm512_add_ps(lo, hi);
        }
        // -> 16 sums: the two remaining lanes of each source.
        let even = _mm512_shuffle_ps::<0b10_00_10_00>(u[0], u[1]);
        let odd = _mm512_shuffle_ps::<0b11_01_11_01>(u[0], u[1]);
        let mut sums = [0f32; 16];
        _mm512_storeu_ps(sums.as_mut_ptr(), _mm512_add_ps(even, odd));
        sums
    }
}

/// How far ahead (in elements) a batch-1 tile prefetches each weight row.
const PREFETCH_ELEMS: usize = 512;

/// How a family computes one tile; `X` is the activation type.
trait Tile<X, W> {
    /// # Safety
    /// Each pointer has k readable elements; the family's CPU features are enabled.
    unsafe fn tile<const MR: usize, const NR: usize>(
        xs: [*const X; MR],
        ws: [*const W; NR],
        k: usize,
    ) -> [[f32; NR]; MR];
}

struct Fma;

impl<W: Load16> Tile<f32, W> for Fma {
    #[inline(always)]
    unsafe fn tile<const MR: usize, const NR: usize>(
        xs: [*const f32; MR],
        ws: [*const W; NR],
        k: usize,
    ) -> [[f32; NR]; MR] {
        let full = k / 16 * 16;
        // SAFETY: AVX-512 F/BW/VL are enabled in every caller; full loads read c..c+16 <= k,
        // the tail load reads only the k - full elements its mask selects.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); NR]; MR];
            let mut w = [_mm512_setzero_ps(); NR];
            let mut c = 0;
            while c < full {
                if MR == 1 {
                    // Batch-1 decode streams weights from memory: ask for them early.
                    for row in ws {
                        let ahead = row.wrapping_add(c + PREFETCH_ELEMS);
                        _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                    }
                }
                for n in 0..NR {
                    w[n] = W::load16(ws[n].add(c));
                }
                for m in 0..MR {
                    let x = _mm512_loadu_ps(xs[m].add(c));
                    for n in 0..NR {
                        acc[m][n] = _mm512_fmadd_ps(x, w[n], acc[m][n]);
                    }
                }
                c += 16;
            }
            if full < k {
                let mask = ((1u32 << (k - full)) - 1) as __mmask16;
                for n in 0..NR {
                    w[n] = W::load16_masked(ws[n].add(c), mask);
                }
                for m in 0..MR {
                    let x = _mm512_maskz_loadu_ps(mask, xs[m].add(c));
                    for n in 0..NR {
                        acc[m][n] = _mm512_fmadd_ps(x, w[n], acc[m][n]);
                    }
                }
            }
            reduce_tile(&acc)
        }
    }
}

struct Dpbf16;

/// # Safety
/// 32 readable bf16 at `p`; AVX-512F.
#[inline(always)]
unsafe fn load_bh(p: *const bf16) -> __m512bh {
    // SAFETY: as the caller guarantees; __m512i and __m512bh are both 64-byte vectors, so the
    // transmute is a bit cast.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p as *const _)) }
}

/// # Safety
/// The elements `mask` selects are readable; AVX-512 BW.
#[inline(always)]
unsafe fn load_bh_masked(p: *const bf16, mask: __mmask32) -> __m512bh {
    // SAFETY: masked-off elements are not read; a bit cast between 64-byte vectors.
    unsafe {
        std::mem::transmute::<__m512i, __m512bh>(_mm512_maskz_loadu_epi16(mask, p as *const i16))
    }
}

impl Tile<bf16, bf16> for Dpbf16 {
    #[inline(always)]
    unsafe fn tile<const MR: usize, const NR: usize>(
        xs: [*const bf16; MR],
        ws: [*const bf16; NR],
        k: usize,
    ) -> [[f32; NR]; MR] {
        let full = k / 32 * 32;
        // SAFETY: AVX-512 F/BW/VL/BF16 are enabled in every caller; full loads read 32
        // elements at c + 32 <= k, the tail load only those its mask selects. __m512i and
        // __m512bh are both 64-byte vectors, so transmuting between them is a bit cast.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); NR]; MR];
            let mut w = [std::mem::transmute::<__m512i, __m512bh>(_mm512_setzero_si512()); NR];
            let mut c = 0;
            while c < full {
                if MR == 1 {
                    // Batch-1 decode streams weights from memory: ask for them early.
                    for row in ws {
                        let ahead = row.wrapping_add(c + PREFETCH_ELEMS);
                        _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                    }
                }
                for n in 0..NR {
                    w[n] = load_bh(ws[n].add(c));
                }
                for m in 0..MR {
                    let x = load_bh(xs[m].add(c));
                    for n in 0..NR {
                        acc[m][n] = _mm512_dpbf16_ps(acc[m][n], x, w[n]);
                    }
                }
                c += 32;
            }
            if full < k {
                let mask = ((1u64 << (k - full)) - 1) as __mmask32;
                for n in 0..NR {
                    w[n] = load_bh_masked(ws[n].add(c), mask);
                }
                for m in 0..MR {
                    let x = load_bh_masked(xs[m].add(c), mask);
                    for n in 0..NR {
                        acc[m][n] = _mm512_dpbf16_ps(acc[m][n], x, w[n]);
                    }
                }
            }
            reduce_tile(&acc)
        }
    }
}

/// Rows i..i+MR of x against every weight row of `w`, NR at a time (then one at a time).
#[inline(always)]
unsafe fn rows<X, W, T, F, const MR: usize, const NR: usize>(
    x: &[X],
    i: usize,
    w: &[W],
    k: usize,
    emit: &mut F,
) where
    T: Tile<X, W>,
    F: FnMut(usize, usize, f32),
{
    let cols = w.len() / k;
    let xs: [*const X; MR] = std::array::from_fn(|r| x[(i + r) * k..].as_ptr());
    let mut j = 0;
    // SAFETY: the family's features are enabled in every caller; rows i..i+MR of x and
    // j..j+NR of w exist, each k long.
    unsafe {
        while j + NR <= cols {
            let ws: [*const W; NR] = std::array::from_fn(|n| w[(j + n) * k..].as_ptr());
            let out = T::tile::<MR, NR>(xs, ws, k);
            for (r, row) in out.iter().enumerate() {
                for (n, &v) in row.iter().enumerate() {
                    emit(i + r, j + n, v);
                }
            }
            j += NR;
        }
        while j < cols {
            let out = T::tile::<MR, 1>(xs, [w[j * k..].as_ptr()], k);
            for (r, row) in out.iter().enumerate() {
                emit(i + r, j, row[0]);
            }
            j += 1;
        }
    }
}

/// All rows of x in blocks of 6 (the last block 1-5 rows) against every row of `w`.
#[inline(always)]
unsafe fn all_rows<X, W, T, F>(x: &[X], m: usize, w: &[W], k: usize, mut emit: F)
where
    T: Tile<X, W>,
    F: FnMut(usize, usize, f32),
{
    let mut i = 0;
    // SAFETY: the caller enabled the family's features; rows stay below m.
    unsafe {
        while i + 6 <= m {
            rows::<X, W, T, F, 6, 4>(x, i, w, k, &mut emit);
            i += 6;
        }
        match m - i {
            5 => rows::<X, W, T, F, 5, 4>(x, i, w, k, &mut emit),
            4 => rows::<X, W, T, F, 4, 4>(x, i, w, k, &mut emit),
            3 => rows::<X, W, T, F, 3, 4>(x, i, w, k, &mut emit),
            2 => rows::<X, W, T, F, 2, 6>(x, i, w, k, &mut emit),
            1 => rows::<X, W, T, F, 1, 8>(x, i, w, k, &mut emit),
            _ => {}
        }
    }
}

/// # Safety
/// The CPU must support AVX-512 F/BW/VL, FMA and F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn task_fma<W: Load16, F: FnMut(usize, usize, f32)>(
    x: &[f32],
    m: usize,
    w: &[W],
    k: usize,
    emit: F,
) {
    // SAFETY: the features are enabled here.
    unsafe {
        if m < PACK_MIN_ROWS || !W::WIDENS {
            return all_rows::<f32, W, Fma, F>(x, m, w, k, emit);
        }
        // Several rows of x will pass over these weights: widen them once into f32 so the
        // inner loop is loads and FMAs only. Widening is exact, so every output gets the same
        // bits as on the unpacked path.
        PACKED.with_borrow_mut(|packed| {
            packed.clear();
            packed.resize(w.len(), 0.0);
            let full = w.len() / 16 * 16;
            let mut c = 0;
            while c < full {
                _mm512_storeu_ps(packed.as_mut_ptr().add(c), W::load16(w.as_ptr().add(c)));
                c += 16;
            }
            for i in full..w.len() {
                packed[i] = w[i].widen();
            }
            all_rows::<f32, f32, Fma, F>(x, m, packed, k, emit)
        })
    }
}

/// Rows of x from which a task widens its weights once instead of in every tile.
const PACK_MIN_ROWS: usize = 4;

thread_local! {
    /// A task's weights widened to f32, reused across tasks.
    static PACKED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// # Safety
/// The CPU must support AVX-512 F/BW/VL and BF16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")]
unsafe fn task_dpbf16<F: FnMut(usize, usize, f32)>(
    x: &[bf16],
    m: usize,
    w: &[bf16],
    k: usize,
    emit: F,
) {
    // SAFETY: the features are enabled here.
    unsafe { all_rows::<bf16, bf16, Dpbf16, F>(x, m, w, k, emit) }
}

/// AVX-512 with f32 activations; only made on CPUs that support it.
#[derive(Debug)]
pub(crate) struct Avx512<W>(PhantomData<W>);

impl<W> Clone for Avx512<W> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<W> Copy for Avx512<W> {}

impl<W> Avx512<W> {
    pub(crate) fn new() -> Option<Self> {
        Isa::Avx512.is_supported().then_some(Self(PhantomData))
    }
}

impl<W: Load16> Kernel for Avx512<W> {
    type X = f32;
    type W = W;

    fn task<F: FnMut(usize, usize, f32)>(self, x: &[f32], m: usize, w: &[W], k: usize, emit: F) {
        assert!(x.len() >= m * k && w.len().is_multiple_of(k));
        // SAFETY: an `Avx512` is only made on CPUs with AVX-512 F/BW/VL (and so AVX2, FMA,
        // F16C, which `Isa::Avx512` includes); shapes checked above.
        unsafe { task_fma(x, m, w, k, emit) }
    }
}

/// AVX-512 BF16 with bf16 activations and weights; only made on CPUs that support it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx512Bf16(());

impl Avx512Bf16 {
    pub(crate) fn new() -> Option<Self> {
        Isa::Avx512Bf16.is_supported().then_some(Self(()))
    }
}

impl Kernel for Avx512Bf16 {
    type X = bf16;
    type W = bf16;

    fn task<F: FnMut(usize, usize, f32)>(
        self,
        x: &[bf16],
        m: usize,
        w: &[bf16],
        k: usize,
        emit: F,
    ) {
        assert!(x.len() >= m * k && w.len().is_multiple_of(k));
        // SAFETY: an `Avx512Bf16` is only made on CPUs with AVX-512 F/BW/VL/BF16; shapes
        // checked above.
        unsafe { task_dpbf16(x, m, w, k, emit) }
    }
}
