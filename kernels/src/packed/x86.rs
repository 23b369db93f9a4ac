//! x86 families over packed panels. `Avx2` (8-lane FMAs, a panel as two halves) and `Avx512`
//! (16-lane FMAs, one vector per panel): f32 activations broadcast, weights widened in one
//! instruction per vector (bf16: a shift for even k, a mask for odd k; f16: F16C). `Dpbf16`:
//! bf16 activations, `vdpbf16ps` on k pairs. Tiles: up to 6 rows of x × 4 panels (AVX-512) or
//! × 1 panel (AVX2), every output a sequential sum over k.

use std::arch::x86_64::*;
use std::marker::PhantomData;

use half::{bf16, f16};

use super::{Kernel, PanelElem, PANEL};
use crate::Isa;

/// How far ahead (in elements of a panel) a single-row tile prefetches.
const PREFETCH_ELEMS: usize = 1024;

/// Loads of a panel's weights for 16 rows (AVX-512) or 8 rows (AVX2) at k = 2p and 2p + 1.
pub(crate) trait PanelLoad: PanelElem {
    /// # Safety
    /// `panel` starts a panel holding pair `p`; AVX-512 F/BW/VL are enabled.
    unsafe fn even16(panel: *const Self, p: usize) -> __m512;
    /// # Safety
    /// As [`PanelLoad::even16`], for a k pair that exists (2p + 1 < k, or padded).
    unsafe fn odd16(panel: *const Self, p: usize) -> __m512;
    /// # Safety
    /// `panel` starts a panel holding pair `p`; `half` is 0 or 1; AVX2 and F16C are enabled.
    unsafe fn even8(panel: *const Self, p: usize, half: usize) -> __m256;
    /// # Safety
    /// As [`PanelLoad::even8`], for a k pair that exists.
    unsafe fn odd8(panel: *const Self, p: usize, half: usize) -> __m256;
    /// Whether AVX2 tiles over many rows first widen a panel to f32 ([`widen_panel8`]): bf16,
    /// whose odd-k widening keeps each raw load live, so a 6-row tile runs out of registers.
    const WIDEN_FOR_ROWS: bool = false;
}

impl PanelLoad for f32 {
    #[inline(always)]
    unsafe fn even16(panel: *const f32, p: usize) -> __m512 {
        // SAFETY: row k = 2p of the panel: 16 f32.
        unsafe { _mm512_loadu_ps(panel.add(2 * p * PANEL)) }
    }
    #[inline(always)]
    unsafe fn odd16(panel: *const f32, p: usize) -> __m512 {
        // SAFETY: row k = 2p + 1 of the panel: 16 f32.
        unsafe { _mm512_loadu_ps(panel.add((2 * p + 1) * PANEL)) }
    }
    #[inline(always)]
    unsafe fn even8(panel: *const f32, p: usize, half: usize) -> __m256 {
        // SAFETY: half of row k = 2p: 8 f32.
        unsafe { _mm256_loadu_ps(panel.add(2 * p * PANEL + 8 * half)) }
    }
    #[inline(always)]
    unsafe fn odd8(panel: *const f32, p: usize, half: usize) -> __m256 {
        // SAFETY: half of row k = 2p + 1: 8 f32.
        unsafe { _mm256_loadu_ps(panel.add((2 * p + 1) * PANEL + 8 * half)) }
    }
}

impl PanelLoad for f16 {
    #[inline(always)]
    unsafe fn even16(panel: *const f16, p: usize) -> __m512 {
        // SAFETY: row k = 2p: 16 f16 (32 bytes).
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(panel.add(2 * p * PANEL) as *const _)) }
    }
    #[inline(always)]
    unsafe fn odd16(panel: *const f16, p: usize) -> __m512 {
        // SAFETY: row k = 2p + 1: 16 f16.
        unsafe {
            _mm512_cvtph_ps(_mm256_loadu_si256(
                panel.add((2 * p + 1) * PANEL) as *const _
            ))
        }
    }
    #[inline(always)]
    unsafe fn even8(panel: *const f16, p: usize, half: usize) -> __m256 {
        // SAFETY: half of row k = 2p: 8 f16 (16 bytes).
        unsafe {
            _mm256_cvtph_ps(_mm_loadu_si128(
                panel.add(2 * p * PANEL + 8 * half) as *const _
            ))
        }
    }
    #[inline(always)]
    unsafe fn odd8(panel: *const f16, p: usize, half: usize) -> __m256 {
        // SAFETY: half of row k = 2p + 1: 8 f16.
        unsafe {
            _mm256_cvtph_ps(_mm_loadu_si128(
                panel.add((2 * p + 1) * PANEL + 8 * half) as *const _
            ))
        }
    }
}

/// bf16 pairs share a 32-bit lane, the even k in the low half: `lane << 16` is the even weight
/// as f32, `lane & 0xffff0000` the odd one.
impl PanelLoad for bf16 {
    const WIDEN_FOR_ROWS: bool = true;
    #[inline(always)]
    unsafe fn even16(panel: *const bf16, p: usize) -> __m512 {
        // SAFETY: pair p: 16 lanes of two bf16 (64 bytes).
        unsafe {
            let v = _mm512_loadu_si512(panel.add(2 * p * PANEL) as *const _);
            _mm512_castsi512_ps(_mm512_slli_epi32(v, 16))
        }
    }
    #[inline(always)]
    unsafe fn odd16(panel: *const bf16, p: usize) -> __m512 {
        // SAFETY: pair p: 64 bytes.
        unsafe {
            let v = _mm512_loadu_si512(panel.add(2 * p * PANEL) as *const _);
            _mm512_castsi512_ps(_mm512_and_si512(
                v,
                _mm512_set1_epi32(0xffff_0000u32 as i32),
            ))
        }
    }
    #[inline(always)]
    unsafe fn even8(panel: *const bf16, p: usize, half: usize) -> __m256 {
        // SAFETY: half of pair p: 8 lanes of two bf16 (32 bytes).
        unsafe {
            let v = _mm256_loadu_si256(panel.add(2 * p * PANEL + 16 * half) as *const _);
            _mm256_castsi256_ps(_mm256_slli_epi32(v, 16))
        }
    }
    #[inline(always)]
    unsafe fn odd8(panel: *const bf16, p: usize, half: usize) -> __m256 {
        // SAFETY: half of pair p: 32 bytes.
        unsafe {
            let v = _mm256_loadu_si256(panel.add(2 * p * PANEL + 16 * half) as *const _);
            _mm256_castsi256_ps(_mm256_and_si256(
                v,
                _mm256_set1_epi32(0xffff_0000u32 as i32),
            ))
        }
    }
}

/// Asks for a panel's weights ahead of a single-row (decode) tile, which streams them from memory.
#[inline(always)]
unsafe fn prefetch<W>(panel: *const W, c: usize) {
    // SAFETY: a prefetch never faults; `wrapping_add` keeps the address computation defined.
    unsafe {
        _mm_prefetch::<_MM_HINT_T0>(panel.wrapping_add(c * PANEL + PREFETCH_ELEMS) as *const i8)
    }
}

// ---------------------------------------------------------------------------------------------
// AVX-512, f32 activations.

/// MR rows of x against NP panels: `acc[r][j]` holds rows 16j..16j+16 of the panels for row r.
#[inline(always)]
unsafe fn tile16<W: PanelLoad, const MR: usize, const NP: usize>(
    xs: [*const f32; MR],
    panels: [*const W; NP],
    k: usize,
) -> [[__m512; NP]; MR] {
    // SAFETY: AVX-512 F/BW/VL, FMA and F16C are enabled in every caller; each row of x has k
    // elements, each panel k (padded) steps.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); NP]; MR];
        let mut w = [_mm512_setzero_ps(); NP];
        for p in 0..k / 2 {
            let c = 2 * p;
            if MR == 1 {
                for &panel in &panels {
                    prefetch(panel, c);
                }
            }
            for j in 0..NP {
                w[j] = W::even16(panels[j], p);
            }
            for r in 0..MR {
                let xb = _mm512_set1_ps(*xs[r].add(c));
                for j in 0..NP {
                    acc[r][j] = _mm512_fmadd_ps(xb, w[j], acc[r][j]);
                }
            }
            for j in 0..NP {
                w[j] = W::odd16(panels[j], p);
            }
            for r in 0..MR {
                let xb = _mm512_set1_ps(*xs[r].add(c + 1));
                for j in 0..NP {
                    acc[r][j] = _mm512_fmadd_ps(xb, w[j], acc[r][j]);
                }
            }
        }
        if k % 2 == 1 {
            let p = k / 2;
            for j in 0..NP {
                w[j] = W::even16(panels[j], p);
            }
            for r in 0..MR {
                let xb = _mm512_set1_ps(*xs[r].add(2 * p));
                for j in 0..NP {
                    acc[r][j] = _mm512_fmadd_ps(xb, w[j], acc[r][j]);
                }
            }
        }
        acc
    }
}

/// `vdpbf16ps` tile: bf16 activations, each step one k pair.
#[inline(always)]
unsafe fn tile_dp<const MR: usize, const NP: usize>(
    xs: [*const bf16; MR],
    panels: [*const bf16; NP],
    k: usize,
) -> [[__m512; NP]; MR] {
    // SAFETY: AVX-512 F/BW/VL/BF16 are enabled in every caller; x rows have k elements (the
    // odd tail is read alone), panels k + 1 padded; __m512i and __m512bh are both 64-byte
    // vectors, so transmuting is a bit cast.
    unsafe {
        let bh = |v: __m512i| std::mem::transmute::<__m512i, __m512bh>(v);
        let mut acc = [[_mm512_setzero_ps(); NP]; MR];
        let mut w = [bh(_mm512_setzero_si512()); NP];
        let pairs = k.div_ceil(2);
        for p in 0..pairs {
            if MR == 1 {
                for &panel in &panels {
                    prefetch(panel, 2 * p);
                }
            }
            for j in 0..NP {
                w[j] = bh(_mm512_loadu_si512(panels[j].add(2 * p * PANEL) as *const _));
            }
            for r in 0..MR {
                let pair = if 2 * p + 1 < k {
                    (xs[r].add(2 * p) as *const u32).read_unaligned()
                } else {
                    (*xs[r].add(2 * p)).to_bits() as u32
                };
                let xp = bh(_mm512_set1_epi32(pair as i32));
                for j in 0..NP {
                    acc[r][j] = _mm512_dpbf16_ps(acc[r][j], xp, w[j]);
                }
            }
        }
        acc
    }
}

/// Which tile a family runs.
trait Tile16<X, W> {
    /// # Safety
    /// As [`tile16`] / [`tile_dp`].
    unsafe fn tile<const MR: usize, const NP: usize>(
        xs: [*const X; MR],
        panels: [*const W; NP],
        k: usize,
    ) -> [[__m512; NP]; MR];
}

struct Fma16;

impl<W: PanelLoad> Tile16<f32, W> for Fma16 {
    #[inline(always)]
    unsafe fn tile<const MR: usize, const NP: usize>(
        xs: [*const f32; MR],
        panels: [*const W; NP],
        k: usize,
    ) -> [[__m512; NP]; MR] {
        // SAFETY: as the caller guarantees.
        unsafe { tile16::<W, MR, NP>(xs, panels, k) }
    }
}

struct Dp16;

impl Tile16<bf16, bf16> for Dp16 {
    #[inline(always)]
    unsafe fn tile<const MR: usize, const NP: usize>(
        xs: [*const bf16; MR],
        panels: [*const bf16; NP],
        k: usize,
    ) -> [[__m512; NP]; MR] {
        // SAFETY: as the caller guarantees.
        unsafe { tile_dp::<MR, NP>(xs, panels, k) }
    }
}

/// Rows i..i+MR of x against panels pj..pj+NP, results emitted.
#[inline(always)]
unsafe fn block16<X, W, T, F, const MR: usize, const NP: usize>(
    x: &[X],
    i: usize,
    panels: [*const W; NP],
    pj: usize,
    k: usize,
    emit: &mut F,
) where
    W: PanelElem,
    T: Tile16<X, W>,
    F: FnMut(usize, usize, &[f32]),
{
    let xs: [*const X; MR] = std::array::from_fn(|r| x[(i + r) * k..].as_ptr());
    // SAFETY: the family's features are enabled in every caller; rows and panels exist.
    unsafe {
        let acc = T::tile::<MR, NP>(xs, panels, k);
        let mut lanes = [0f32; PANEL];
        for (r, row) in acc.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                _mm512_storeu_ps(lanes.as_mut_ptr(), v);
                emit(i + r, (pj + j) * PANEL, &lanes);
            }
        }
    }
}

/// Rows of x in one AVX-512 tile (6 × 4 panels: 24 accumulators, 4 weight vectors and a
/// broadcast of the 32 registers).
const MAX_TILE_ROWS: usize = 6;

/// Every row of x, 6 at a time, against NP panels starting at panel pj.
#[inline(always)]
unsafe fn rows16<X, W, T, F, const NP: usize>(
    x: &[X],
    m: usize,
    w: &[W],
    pj: usize,
    k: usize,
    emit: &mut F,
) where
    W: PanelElem,
    T: Tile16<X, W>,
    F: FnMut(usize, usize, &[f32]),
{
    let panel_len = PANEL * W::padded_k(k);
    let panels: [*const W; NP] = std::array::from_fn(|j| w[(pj + j) * panel_len..].as_ptr());
    let mut i = 0;
    // SAFETY: the family's features are enabled in every caller; rows stay below m.
    unsafe {
        while i + MAX_TILE_ROWS <= m {
            block16::<X, W, T, F, MAX_TILE_ROWS, NP>(x, i, panels, pj, k, emit);
            i += MAX_TILE_ROWS;
        }
        match m - i {
            5 => block16::<X, W, T, F, 5, NP>(x, i, panels, pj, k, emit),
            4 => block16::<X, W, T, F, 4, NP>(x, i, panels, pj, k, emit),
            3 => block16::<X, W, T, F, 3, NP>(x, i, panels, pj, k, emit),
            2 => block16::<X, W, T, F, 2, NP>(x, i, panels, pj, k, emit),
            1 => block16::<X, W, T, F, 1, NP>(x, i, panels, pj, k, emit),
            _ => {}
        }
    }
}

/// A task's panels, four at a time, then one at a time; one at a time throughout when every row
/// fits one tile (decode). Then each thread streams one panel from memory at a time: on the
/// AMD EPYC (Zen 4) of 2026-12-03, four concurrent panel streams per thread (each prefetched)
/// read bf16 weights at ~70 % of llama.cpp's rate, one stream at ~95-100 % (batch-1 decode
/// 19-21 -> 24-31 tok/s, interleaved A/B). The sums are the same either way (each output's
/// accumulator runs over k in order).
#[inline(always)]
unsafe fn task16<X, W, T, F>(x: &[X], m: usize, w: &[W], k: usize, mut emit: F)
where
    W: PanelElem,
    T: Tile16<X, W>,
    F: FnMut(usize, usize, &[f32]),
{
    let np = w.len() / (PANEL * W::padded_k(k));
    let mut pj = 0;
    // SAFETY: the family's features are enabled in every caller.
    unsafe {
        while m > MAX_TILE_ROWS && pj + 4 <= np {
            rows16::<X, W, T, F, 4>(x, m, w, pj, k, &mut emit);
            pj += 4;
        }
        while pj < np {
            rows16::<X, W, T, F, 1>(x, m, w, pj, k, &mut emit);
            pj += 1;
        }
    }
}

/// # Safety
/// The CPU must support AVX-512 F/BW/VL, FMA and F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn task_avx512<W: PanelLoad, F: FnMut(usize, usize, &[f32])>(
    x: &[f32],
    m: usize,
    w: &[W],
    k: usize,
    emit: F,
) {
    // SAFETY: the features are enabled here.
    unsafe { task16::<f32, W, Fma16, F>(x, m, w, k, emit) }
}

/// # Safety
/// The CPU must support AVX-512 F/BW/VL and BF16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")]
unsafe fn task_dpbf16<F: FnMut(usize, usize, &[f32])>(
    x: &[bf16],
    m: usize,
    w: &[bf16],
    k: usize,
    emit: F,
) {
    // SAFETY: the features are enabled here.
    unsafe { task16::<bf16, bf16, Dp16, F>(x, m, w, k, emit) }
}

// ---------------------------------------------------------------------------------------------
// AVX2, f32 activations: a panel is two 8-lane halves.

/// MR rows of x against one panel: `acc[r][h]` holds rows 8h..8h+8 of the panel for row r.
#[inline(always)]
unsafe fn tile8<W: PanelLoad, const MR: usize>(
    xs: [*const f32; MR],
    panel: *const W,
    k: usize,
) -> [[__m256; 2]; MR] {
    // SAFETY: AVX2, FMA and F16C are enabled in every caller; rows have k elements, the panel
    // k (padded) steps.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        let mut w = [_mm256_setzero_ps(); 2];
        for p in 0..k / 2 {
            let c = 2 * p;
            if MR == 1 {
                prefetch(panel, c);
            }
            for (h, wh) in w.iter_mut().enumerate() {
                *wh = W::even8(panel, p, h);
            }
            for r in 0..MR {
                let xb = _mm256_set1_ps(*xs[r].add(c));
                for h in 0..2 {
                    acc[r][h] = _mm256_fmadd_ps(xb, w[h], acc[r][h]);
                }
            }
            for (h, wh) in w.iter_mut().enumerate() {
                *wh = W::odd8(panel, p, h);
            }
            for r in 0..MR {
                let xb = _mm256_set1_ps(*xs[r].add(c + 1));
                for h in 0..2 {
                    acc[r][h] = _mm256_fmadd_ps(xb, w[h], acc[r][h]);
                }
            }
        }
        if k % 2 == 1 {
            let p = k / 2;
            for (h, wh) in w.iter_mut().enumerate() {
                *wh = W::even8(panel, p, h);
            }
            for r in 0..MR {
                let xb = _mm256_set1_ps(*xs[r].add(2 * p));
                for h in 0..2 {
                    acc[r][h] = _mm256_fmadd_ps(xb, w[h], acc[r][h]);
                }
            }
        }
        acc
    }
}

#[inline(always)]
unsafe fn block8<W: PanelLoad, F: FnMut(usize, usize, &[f32]), const MR: usize>(
    x: &[f32],
    i: usize,
    panel: *const W,
    pj: usize,
    k: usize,
    emit: &mut F,
) {
    let xs: [*const f32; MR] = std::array::from_fn(|r| x[(i + r) * k..].as_ptr());
    // SAFETY: AVX2/FMA/F16C are enabled in every caller; rows and the panel exist.
    unsafe {
        let acc = tile8::<W, MR>(xs, panel, k);
        let mut lanes = [0f32; PANEL];
        for (r, row) in acc.iter().enumerate() {
            _mm256_storeu_ps(lanes.as_mut_ptr(), row[0]);
            _mm256_storeu_ps(lanes.as_mut_ptr().add(8), row[1]);
            emit(i + r, pj * PANEL, &lanes);
        }
    }
}

/// One panel as an f32 panel (`[k][16]`): the same weights, exactly, so tiles over it compute
/// the same sums in the same order as tiles over the panel itself.
///
/// # Safety
/// AVX2/FMA/F16C are enabled; `panel` holds k (padded) steps; `out` has room for 16 · k.
#[inline(always)]
unsafe fn widen_panel8<W: PanelLoad>(panel: *const W, k: usize, out: *mut f32) {
    // SAFETY: as the caller guarantees; stores stay below 16 · k.
    unsafe {
        for p in 0..k.div_ceil(2) {
            for h in 0..2 {
                _mm256_storeu_ps(out.add(2 * p * PANEL + 8 * h), W::even8(panel, p, h));
                if 2 * p + 1 < k {
                    _mm256_storeu_ps(out.add((2 * p + 1) * PANEL + 8 * h), W::odd8(panel, p, h));
                }
            }
        }
    }
}

/// Rows of x from tiles of 6 down (or of 5 first, where `five` is set).
///
/// # Safety
/// AVX2/FMA/F16C are enabled; `panel` holds k (padded) steps of W; x holds m rows of k.
#[inline(always)]
unsafe fn rows8<W: PanelLoad, F: FnMut(usize, usize, &[f32])>(
    x: &[f32],
    m: usize,
    panel: *const W,
    pj: usize,
    k: usize,
    five: bool,
    emit: &mut F,
) {
    let mut i = 0;
    // SAFETY: as the caller guarantees; rows stay below m.
    unsafe {
        if five {
            while i + 5 <= m {
                block8::<W, F, 5>(x, i, panel, pj, k, emit);
                i += 5;
            }
        }
        while i + 6 <= m {
            block8::<W, F, 6>(x, i, panel, pj, k, emit);
            i += 6;
        }
        match m - i {
            5 => block8::<W, F, 5>(x, i, panel, pj, k, emit),
            4 => block8::<W, F, 4>(x, i, panel, pj, k, emit),
            3 => block8::<W, F, 3>(x, i, panel, pj, k, emit),
            2 => block8::<W, F, 2>(x, i, panel, pj, k, emit),
            1 => block8::<W, F, 1>(x, i, panel, pj, k, emit),
            _ => {}
        }
    }
}

/// Rows from which a bf16 panel is widened to f32 first (its cost, 1/m of the tiles' work,
/// buys 6-row tiles without a spill).
const WIDEN_MIN_ROWS: usize = 12;

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn task_avx2<W: PanelLoad, F: FnMut(usize, usize, &[f32])>(
    x: &[f32],
    m: usize,
    w: &[W],
    k: usize,
    mut emit: F,
) {
    let panel_len = PANEL * W::padded_k(k);
    let widen = W::WIDEN_FOR_ROWS && m >= WIDEN_MIN_ROWS;
    let mut wide = if widen {
        vec![0f32; PANEL * k]
    } else {
        Vec::new()
    };
    for (pj, panel) in w.chunks_exact(panel_len).enumerate() {
        // SAFETY: the features are enabled here; `wide` holds 16 · k values; rows stay below m.
        unsafe {
            if widen {
                widen_panel8(panel.as_ptr(), k, wide.as_mut_ptr());
                rows8::<f32, F>(x, m, wide.as_ptr(), pj, k, false, &mut emit);
            } else {
                // 6 rows × 2 halves = 12 accumulators, plus 2 weight vectors and a broadcast,
                // fill the 16 registers; bf16 keeps each raw load for its odd k as well, and
                // 6 rows spilled an accumulator (a store/load on its FMA chain every k step):
                // 5-row tiles for it.
                rows8::<W, F>(x, m, panel.as_ptr(), pj, k, W::PAIRED, &mut emit);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The families.

macro_rules! family {
    ($name:ident, $isa:expr) => {
        /// Only made on CPUs that support the family.
        #[derive(Debug)]
        pub(crate) struct $name<W>(PhantomData<W>);

        impl<W> Clone for $name<W> {
            fn clone(&self) -> Self {
                *self
            }
        }

        impl<W> Copy for $name<W> {}

        impl<W> $name<W> {
            pub(crate) fn new() -> Option<Self> {
                $isa.is_supported().then_some(Self(PhantomData))
            }
        }
    };
}

family!(Avx2, Isa::Avx2);
family!(Avx512, Isa::Avx512);

impl<W: PanelLoad> Kernel for Avx2<W> {
    type X = f32;
    type W = W;

    fn task<F: FnMut(usize, usize, &[f32])>(self, x: &[f32], m: usize, w: &[W], k: usize, emit: F) {
        assert!(x.len() >= m * k && w.len().is_multiple_of(PANEL * W::padded_k(k).max(1)));
        // SAFETY: an `Avx2` is only made on CPUs with AVX2, FMA and F16C; shapes checked.
        unsafe { task_avx2(x, m, w, k, emit) }
    }
}

impl<W: PanelLoad> Kernel for Avx512<W> {
    type X = f32;
    type W = W;

    fn task<F: FnMut(usize, usize, &[f32])>(self, x: &[f32], m: usize, w: &[W], k: usize, emit: F) {
        assert!(x.len() >= m * k && w.len().is_multiple_of(PANEL * W::padded_k(k).max(1)));
        // SAFETY: an `Avx512` is only made on CPUs with AVX-512 F/BW/VL (which `Isa::Avx512`
        // includes with AVX2, FMA and F16C); shapes checked.
        unsafe { task_avx512(x, m, w, k, emit) }
    }
}

/// bf16 activations and weights on `vdpbf16ps`; only made on CPUs with AVX-512 BF16.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dpbf16(());

impl Dpbf16 {
    pub(crate) fn new() -> Option<Self> {
        Isa::Avx512Bf16.is_supported().then_some(Self(()))
    }
}

impl Kernel for Dpbf16 {
    type X = bf16;
    type W = bf16;

    fn task<F: FnMut(usize, usize, &[f32])>(
        self,
        x: &[bf16],
        m: usize,
        w: &[bf16],
        k: usize,
        emit: F,
    ) {
        assert!(x.len() >= m * k && w.len().is_multiple_of(PANEL * bf16::padded_k(k).max(1)));
        // SAFETY: a `Dpbf16` is only made on CPUs with AVX-512 F/BW/VL/BF16; shapes checked.
        unsafe { task_dpbf16(x, m, w, k, emit) }
    }
}
