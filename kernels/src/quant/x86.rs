//! AVX2 dot products of quantized weight rows with Q8 activation rows: the same integers as the
//! portable ones ([`super::dot`]), 32 products per `vpmaddubsw` (unsigned × signed bytes into
//! i16 pairs; the 8-bit types take absolute values and move the sign to the activations, as
//! ggml does, since 255 · 127 · 2 overflows i16), widened to i32 by `vpmaddwd` (with the
//! sub-block scales for the k-quants), then per block one f32 FMA into 8 lanes. Each output's
//! lanes are summed once at the end, in a fixed order: the same result for any number of rows.

use std::arch::x86_64::*;

use super::act::{Q8KRow, Q8_0Row};
use super::blocks::{Q4K_BYTES, Q4_0_BYTES, Q5K_BYTES, Q5_0_BYTES, Q6K_BYTES, Q8_0_BYTES};
use super::matmul::{AVX2_TILE, KQUANT_TILE, VNNI_TILE};

/// The f16 at `p`, widened exactly: its bits moved into an f32 (sign, then exponent and
/// mantissa 13 places up) and scaled by 2^112, the difference of the exponent biases, which
/// also makes f16 subnormals exact (inf and NaN scales, meaningless in a block, come out
/// finite). Integer moves and one multiply, rather than `vcvtph2ps`, which the compiler feeds
/// from a 16-bit insert into a live register: a false dependency on an accumulator that
/// serialized the whole loop.
///
/// # Safety
/// `p` points at 2 readable bytes.
#[inline(always)]
unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: per the caller; an unaligned 2-byte read.
    let h = unsafe { (p as *const u16).read_unaligned() } as u32;
    let bits = ((h & 0x8000) << 16) | ((h & 0x7FFF) << 13);
    f32::from_bits(bits) * f32::from_bits(0x7780_0000) // 2^112
}

/// The f16 at `p` times `dx` in 8 lanes: the f16 broadcast to 8 words and widened by
/// `vcvtph2ps` (all 8 lanes used, so the compiler cannot narrow it to a 16-bit insert into a
/// live register, the false dependency `f16_at` avoids), then one vector multiply. The same
/// f32 as `f16_at(p) * dx`: the widening is exact.
///
/// # Safety
/// F16C + AVX2; `p` points at 2 readable bytes.
#[inline(always)]
unsafe fn scale_times(p: *const u8, dx: f32) -> __m256 {
    // SAFETY: per the caller; an unaligned 2-byte read.
    let h = unsafe { (p as *const u16).read_unaligned() } as i16;
    _mm256_mul_ps(_mm256_cvtph_ps(_mm_set1_epi16(h)), _mm256_set1_ps(dx))
}

/// How far ahead of the block being read decode prefetches its weights.
const PREFETCH_AHEAD: usize = 2048;

/// Horizontal sum of 8 lanes, in a fixed order.
#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Σ u·s over groups of 4 (unsigned × signed bytes) as 8 i32 lanes: with VNNI one `vpdpbusd`,
/// else `vpmaddubsw` into i16 pairs (which cannot saturate for the operands here: |s| ≤ 127,
/// u ≤ 128) and `vpmaddwd` by ones. The same integers either way.
///
/// # Safety
/// AVX2; with `VNNI`, AVX-512 VNNI and VL (the caller's target features).
#[inline(always)]
unsafe fn sum4<const VNNI: bool>(u: __m256i, s: __m256i) -> __m256i {
    if VNNI {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
    } else {
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
    }
}

/// Σ w·x over 32 signed bytes each, as 8 i32 lanes: |w| times x with w's sign (x ≥ -127, so
/// the products fit [`sum4`]'s bounds).
#[inline(always)]
unsafe fn dot_i8<const VNNI: bool>(w: __m256i, x: __m256i) -> __m256i {
    let aw = _mm256_sign_epi8(w, w);
    let sx = _mm256_sign_epi8(x, w);
    unsafe { sum4::<VNNI>(aw, sx) }
}

/// 16 bytes of nibbles -> 32 bytes: the low nibbles, then the high ones.
#[inline(always)]
unsafe fn nibbles(p: *const u8) -> __m256i {
    // SAFETY (caller): 16 readable bytes at p.
    let b = unsafe { _mm_loadu_si128(p as *const __m128i) };
    let both = _mm256_set_m128i(_mm_srli_epi16(b, 4), b);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

/// The 32 bits at p as 32 bytes: 0xFF where the bit is set.
#[inline(always)]
unsafe fn bits_to_bytes(p: *const u8) -> __m256i {
    // SAFETY (caller): 4 readable bytes at p.
    let bits = unsafe { (p as *const u32).read_unaligned() } as i32;
    // Byte j of the result looks at byte j / 8 of the word, bit j % 8.
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits),
        _mm256_set_epi64x(
            0x0303030303030303,
            0x0202020202020202,
            0x0101010101010101,
            0,
        ),
    );
    let mask = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
    _mm256_cmpeq_epi8(_mm256_and_si256(spread, mask), mask)
}

/// A 32-weight block type dotted with Q8_0 activations: its bytes, and its 32 weights as signed
/// bytes (the f16 scale is its first two bytes).
trait Block32 {
    const BYTES: usize;
    /// The types stored as unsigned levels `q` with weights `q - OFFSET` (Q4_0: 8, Q5_0: 16);
    /// 0 for Q8_0, stored signed.
    const OFFSET: i8;
    /// # Safety
    /// AVX2; `p` points at a whole block.
    unsafe fn weights(p: *const u8) -> __m256i;
    /// The unsigned levels (where `OFFSET` > 0).
    ///
    /// # Safety
    /// AVX2; `p` points at a whole block.
    unsafe fn levels(p: *const u8) -> __m256i;
    /// [`Self::levels`] with AVX-512 BW/VL instructions where they save some.
    ///
    /// # Safety
    /// AVX2 and AVX-512 BW/VL; `p` points at a whole block.
    #[inline(always)]
    unsafe fn levels_avx512(p: *const u8) -> __m256i {
        // SAFETY: per the caller.
        unsafe { Self::levels(p) }
    }
    /// [`Self::weights`] with AVX-512 BW/VL instructions where they save some.
    ///
    /// # Safety
    /// AVX2 and AVX-512 BW/VL; `p` points at a whole block.
    #[inline(always)]
    unsafe fn weights_avx512(p: *const u8) -> __m256i {
        // SAFETY: per the caller.
        unsafe { Self::weights(p) }
    }
}

struct Q8_0;
struct Q4_0;
struct Q5_0;

impl Block32 for Q8_0 {
    const BYTES: usize = Q8_0_BYTES;
    const OFFSET: i8 = 0;
    #[inline(always)]
    unsafe fn weights(p: *const u8) -> __m256i {
        // SAFETY (caller): 32 weight bytes after the 2-byte scale.
        unsafe { load256(p.add(2)) }
    }
    #[inline(always)]
    unsafe fn levels(p: *const u8) -> __m256i {
        // SAFETY (caller): as `weights` (unused: Q8_0 is signed).
        unsafe { Self::weights(p) }
    }
}

impl Block32 for Q4_0 {
    const BYTES: usize = Q4_0_BYTES;
    const OFFSET: i8 = 8;
    #[inline(always)]
    unsafe fn weights(p: *const u8) -> __m256i {
        // SAFETY (caller): a whole block.
        _mm256_sub_epi8(unsafe { Self::levels(p) }, _mm256_set1_epi8(8))
    }
    #[inline(always)]
    unsafe fn levels(p: *const u8) -> __m256i {
        // SAFETY (caller): 16 bytes of nibbles after the scale.
        unsafe { nibbles(p.add(2)) }
    }
}

impl Block32 for Q5_0 {
    const BYTES: usize = Q5_0_BYTES;
    const OFFSET: i8 = 16;
    #[inline(always)]
    unsafe fn weights(p: *const u8) -> __m256i {
        // SAFETY (caller): 4 bytes of high bits, then 16 of nibbles, after the scale.
        let (low, high) = unsafe { (nibbles(p.add(6)), bits_to_bytes(p.add(2))) };
        // (n | h << 4) - 16 as i8: n where the bit is set, n | 0xF0 (= n - 16) where not.
        _mm256_or_si256(
            low,
            _mm256_andnot_si256(high, _mm256_set1_epi8(0xF0u8 as i8)),
        )
    }
    #[inline(always)]
    unsafe fn levels(p: *const u8) -> __m256i {
        // SAFETY (caller): as `weights`.
        let (low, high) = unsafe { (nibbles(p.add(6)), bits_to_bytes(p.add(2))) };
        _mm256_or_si256(low, _mm256_and_si256(high, _mm256_set1_epi8(0x10)))
    }
    #[inline(always)]
    unsafe fn levels_avx512(p: *const u8) -> __m256i {
        // SAFETY (caller): as `weights`. The fifth bits as a byte mask: 16 added where set.
        unsafe {
            let low = nibbles(p.add(6));
            let bits = (p.add(2) as *const u32).read_unaligned();
            _mm256_mask_add_epi8(low, bits, low, _mm256_set1_epi8(16))
        }
    }
    #[inline(always)]
    unsafe fn weights_avx512(p: *const u8) -> __m256i {
        // SAFETY (caller): as `weights`. The 32 fifth bits are a byte mask as they are: -16
        // added to the nibbles whose bit is clear.
        unsafe {
            let low = nibbles(p.add(6));
            let bits = (p.add(2) as *const u32).read_unaligned();
            _mm256_mask_add_epi8(low, !bits, low, _mm256_set1_epi8(-16))
        }
    }
}

/// `R` weight rows of 32-blocks against one Q8_0 activation row: per block the activations are
/// loaded once for all rows; each row has its own accumulator, updated exactly as when alone.
///
/// # Safety
/// AVX2 + FMA + F16C; every row holds `x.d.len()` whole blocks and `x.q` as many 32s.
#[inline(always)]
unsafe fn dot_rows_32<B: Block32, const R: usize, const VNNI: bool>(
    w: &[&[u8]; R],
    x: &Q8_0Row,
) -> [f32; R] {
    let nb = x.d.len();
    debug_assert!(x.q.len() >= 32 * nb && w.iter().all(|r| r.len() >= nb * B::BYTES));
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..nb {
        // SAFETY: block b of the activations (32 bytes) and of each row, per the caller.
        unsafe {
            let xv = load256(x.q.as_ptr().add(32 * b) as *const u8);
            let dx = *x.d.get_unchecked(b);
            for r in 0..R {
                let p = w[r].as_ptr().add(b * B::BYTES);
                if R == 1 {
                    // One row streamed at a time (decode): ask for the bytes 1 KB ahead, across
                    // the end of the row into the next (a hint: never faults).
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_AHEAD) as *const i8);
                }
                // The AVX-512 (VNNI) path: fewer instructions for the same values.
                let (wv, d) = if VNNI {
                    (B::weights_avx512(p), scale_times(p, dx))
                } else {
                    (B::weights(p), _mm256_set1_ps(f16_at(p) * dx))
                };
                let s = _mm256_cvtepi32_ps(dot_i8::<VNNI>(wv, xv));
                acc[r] = _mm256_fmadd_ps(d, s, acc[r]);
            }
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = hsum(acc[r]);
    }
    out
}

/// `acc` + Σ u·s over groups of 4, as [`sum4`] computes the sums.
///
/// # Safety
/// As [`sum4`].
#[inline(always)]
unsafe fn sum4_onto<const VNNI: bool>(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
    if VNNI {
        _mm256_dpbusd_epi32(acc, u, s)
    } else {
        // SAFETY: per the caller.
        _mm256_add_epi32(acc, unsafe { sum4::<false>(u, s) })
    }
}

/// A tile: `W` weight rows against `X` activation rows, each weight block unpacked once for
/// all activation rows and each activation block loaded once for all weight rows. Q4_0/Q5_0
/// take their unsigned levels as they are and start each sum from -OFFSET·Σx (per lane, once
/// per activation block), Q8_0 moves the weights' signs onto the activations; either way each
/// i32 lane holds the same Σ w·x over the same 4 products as [`dot_rows_32`]'s, and each
/// output's accumulator takes the same FMA per block (the scale product is the same f32
/// multiply, in a vector), so a tile's results are the row path's, bit for bit.
///
/// # Safety
/// As [`dot_rows_32`], for every row of `x`.
#[inline(always)]
unsafe fn dot_tile_32<B: Block32, const W: usize, const X: usize, const VNNI: bool>(
    w: &[&[u8]; W],
    x: &[&Q8_0Row; X],
) -> [[f32; W]; X] {
    let nb = x[0].d.len();
    debug_assert!(x.iter().all(|x| x.d.len() == nb && x.q.len() >= 32 * nb));
    debug_assert!(w.iter().all(|r| r.len() >= nb * B::BYTES));
    let mut acc = [[_mm256_setzero_ps(); W]; X];
    for b in 0..nb {
        // SAFETY: block b of each weight row and of each activation row, per the caller.
        unsafe {
            // Unsigned operands (levels, or |w| for Q8_0) and Q8_0's signed weights.
            let mut wu = [_mm256_setzero_si256(); W];
            let mut ws = [_mm256_setzero_si256(); W];
            let mut dw = [_mm256_setzero_ps(); W];
            for r in 0..W {
                let p = w[r].as_ptr().add(b * B::BYTES);
                if B::OFFSET > 0 {
                    wu[r] = if VNNI {
                        B::levels_avx512(p)
                    } else {
                        B::levels(p)
                    };
                } else {
                    ws[r] = B::weights(p);
                    wu[r] = _mm256_sign_epi8(ws[r], ws[r]);
                }
                dw[r] = if VNNI {
                    // All 8 lanes from vcvtph2ps (see `scale_times`).
                    let h = (p as *const u16).read_unaligned() as i16;
                    _mm256_cvtph_ps(_mm_set1_epi16(h))
                } else {
                    _mm256_set1_ps(f16_at(p))
                };
            }
            for i in 0..X {
                let xv = load256(x[i].q.as_ptr().add(32 * b) as *const u8);
                let dx = _mm256_set1_ps(*x[i].d.get_unchecked(b));
                let start = if B::OFFSET > 0 {
                    let off = sum4::<VNNI>(_mm256_set1_epi8(B::OFFSET), xv);
                    _mm256_sub_epi32(_mm256_setzero_si256(), off)
                } else {
                    _mm256_setzero_si256()
                };
                for r in 0..W {
                    let sx = if B::OFFSET > 0 {
                        xv
                    } else {
                        _mm256_sign_epi8(xv, ws[r])
                    };
                    let s = _mm256_cvtepi32_ps(sum4_onto::<VNNI>(start, wu[r], sx));
                    acc[i][r] = _mm256_fmadd_ps(_mm256_mul_ps(dw[r], dx), s, acc[i][r]);
                }
            }
        }
    }
    let mut out = [[0f32; W]; X];
    for i in 0..X {
        for r in 0..W {
            out[i][r] = hsum(acc[i][r]);
        }
    }
    out
}

macro_rules! dot32 {
    ($name:ident, $tile:ident, $vnni:ident, $vnni_tile:ident, $block:ty) => {
        /// # Safety
        /// AVX2 + FMA + F16C; each row holds as many whole blocks as `x` has.
        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn $name<const R: usize>(w: &[&[u8]; R], x: &Q8_0Row) -> [f32; R] {
            // SAFETY: per the caller.
            unsafe { dot_rows_32::<$block, R, false>(w, x) }
        }

        /// # Safety
        /// AVX2 + FMA + F16C; each weight row holds as many whole blocks as every row of `x`.
        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn $tile(
            w: &[&[u8]; AVX2_TILE.0],
            x: &[&Q8_0Row; AVX2_TILE.1],
        ) -> [[f32; AVX2_TILE.0]; AVX2_TILE.1] {
            // SAFETY: per the caller.
            unsafe { dot_tile_32::<$block, { AVX2_TILE.0 }, { AVX2_TILE.1 }, false>(w, x) }
        }

        /// [`$name`] with `vpdpbusd`.
        ///
        /// # Safety
        /// As [`$name`], and AVX-512 F/BW/VL/VNNI.
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
        pub unsafe fn $vnni<const R: usize>(w: &[&[u8]; R], x: &Q8_0Row) -> [f32; R] {
            // SAFETY: per the caller.
            unsafe { dot_rows_32::<$block, R, true>(w, x) }
        }

        /// [`$tile`] with `vpdpbusd`.
        ///
        /// # Safety
        /// As [`$tile`], and AVX-512 F/BW/VL/VNNI.
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
        pub unsafe fn $vnni_tile(
            w: &[&[u8]; VNNI_TILE.0],
            x: &[&Q8_0Row; VNNI_TILE.1],
        ) -> [[f32; VNNI_TILE.0]; VNNI_TILE.1] {
            // SAFETY: per the caller.
            unsafe { dot_tile_32::<$block, { VNNI_TILE.0 }, { VNNI_TILE.1 }, true>(w, x) }
        }
    };
}

dot32!(dot_q8_0, tile_q8_0, dot_q8_0_vnni, tile_q8_0_vnni, Q8_0);
dot32!(dot_q4_0, tile_q4_0, dot_q4_0_vnni, tile_q4_0_vnni, Q4_0);
dot32!(dot_q5_0, tile_q5_0, dot_q5_0_vnni, tile_q5_0_vnni, Q5_0);

/// The f16 at byte `at` of `b`, widened (the scalar conversion; once per block and row).
#[inline(always)]
fn f16_le(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The 8 six-bit scales and 8 mins of a Q4_K/Q5_K block.
#[inline(always)]
fn scales_mins(q: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut m) = ([0u8; 8], [0u8; 8]);
    for j in 0..8 {
        (sc[j], m[j]) = super::blocks::scale_min_k4(j, q);
    }
    (sc, m)
}

/// Σ_j min_j · (sum of x over sub-block j), exact.
#[inline(always)]
fn mins_dot(m: &[u8; 8], bsums: &[i16]) -> i32 {
    (0..8)
        .map(|j| m[j] as i32 * (bsums[2 * j] as i32 + bsums[2 * j + 1] as i32))
        .sum()
}

/// `W` rows of Q4_K (`FIVE` false) or Q5_K (`FIVE` true) blocks against `X` Q8_K rows: per
/// 64 weights each row's two sub-blocks of nibbles (plus fifth bits) are unpacked once, then
/// dotted with every activation row, times their scales, into that output's i32 lanes; the
/// mins against the activations' run sums, exactly. Each output takes the same operations in
/// the same order whatever `W` and `X` are: the results are the single row's, bit for bit.
///
/// # Safety
/// AVX2 + FMA + F16C; every row holds `x[0].d.len()` whole blocks, each `x` row 256 values per
/// block.
#[inline(always)]
unsafe fn dot_tile_k4<const FIVE: bool, const W: usize, const X: usize>(
    w: &[&[u8]; W],
    x: &[&Q8KRow; X],
) -> [[f32; W]; X] {
    let nb = x[0].d.len();
    let bytes = if FIVE { Q5K_BYTES } else { Q4K_BYTES };
    let qs_at = if FIVE { 48 } else { 16 };
    debug_assert!(x.iter().all(|x| x.d.len() == nb && x.q.len() >= 256 * nb));
    debug_assert!(w.iter().all(|r| r.len() >= nb * bytes));
    let m4 = _mm256_set1_epi8(0x0F);
    let one = _mm256_set1_epi8(1);
    let mut acc = [[_mm256_setzero_ps(); W]; X];
    let mut acc_min = [[0f32; W]; X];
    for i in 0..nb {
        let mut sc = [[0u8; 8]; W];
        let mut sumi = [[_mm256_setzero_si256(); W]; X];
        let mut hb = [_mm256_setzero_si256(); W];
        for r in 0..W {
            let b = &w[r][i * bytes..(i + 1) * bytes];
            if W == 1 && X == 1 {
                // As in `dot_rows_32`: decode streams one row; a block is 2-3 cache lines.
                for line in (0..bytes).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(
                        b.as_ptr().wrapping_add(PREFETCH_AHEAD + line) as *const i8
                    );
                }
            }
            let m;
            (sc[r], m) = scales_mins(&b[4..16]);
            let dmin = f16_le(b, 2);
            for xi in 0..X {
                let bsums = &x[xi].bsums[16 * i..16 * i + 16];
                acc_min[xi][r] += (dmin * x[xi].d[i]) * mins_dot(&m, bsums) as f32;
            }
            if FIVE {
                // SAFETY: the 32 bytes of fifth bits at 16..48 of the block.
                hb[r] = unsafe { load256(b.as_ptr().add(16)) };
            }
        }
        for c in 0..4 {
            let mut lo = [_mm256_setzero_si256(); W];
            let mut hi = [_mm256_setzero_si256(); W];
            let mut s0 = [_mm256_setzero_si256(); W];
            let mut s1 = [_mm256_setzero_si256(); W];
            for r in 0..W {
                // SAFETY: 32 bytes of nibbles at qs_at + 32c inside block i of row r.
                let q = unsafe { load256(w[r].as_ptr().add(i * bytes + qs_at + 32 * c)) };
                lo[r] = _mm256_and_si256(q, m4);
                hi[r] = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
                if FIVE {
                    // Bit 2c of each byte (low nibbles) and 2c + 1 (high) to bit 4; a 16-bit
                    // shift by less than 8 keeps each byte's own bit in its bit 0.
                    let sh0 = _mm_cvtsi32_si128(2 * c as i32);
                    let sh1 = _mm_cvtsi32_si128(2 * c as i32 + 1);
                    let h0 = _mm256_and_si256(_mm256_srl_epi16(hb[r], sh0), one);
                    let h1 = _mm256_and_si256(_mm256_srl_epi16(hb[r], sh1), one);
                    lo[r] = _mm256_or_si256(lo[r], _mm256_slli_epi16(h0, 4));
                    hi[r] = _mm256_or_si256(hi[r], _mm256_slli_epi16(h1, 4));
                }
                s0[r] = _mm256_set1_epi16(sc[r][2 * c] as i16);
                s1[r] = _mm256_set1_epi16(sc[r][2 * c + 1] as i16);
            }
            for xi in 0..X {
                // SAFETY: 64 activation bytes at 256i + 64c, in bounds per the caller.
                let (x0, x1) = unsafe {
                    let xp = x[xi].q.as_ptr().add(256 * i + 64 * c) as *const u8;
                    (load256(xp), load256(xp.add(32)))
                };
                for r in 0..W {
                    let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo[r], x0), s0[r]);
                    let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi[r], x1), s1[r]);
                    sumi[xi][r] = _mm256_add_epi32(sumi[xi][r], _mm256_add_epi32(p0, p1));
                }
            }
        }
        for r in 0..W {
            let d = f16_le(&w[r][i * bytes..], 0);
            for xi in 0..X {
                acc[xi][r] = _mm256_fmadd_ps(
                    _mm256_set1_ps(d * x[xi].d[i]),
                    _mm256_cvtepi32_ps(sumi[xi][r]),
                    acc[xi][r],
                );
            }
        }
    }
    let mut out = [[0f32; W]; X];
    for xi in 0..X {
        for r in 0..W {
            out[xi][r] = hsum(acc[xi][r]) - acc_min[xi][r];
        }
    }
    out
}

/// `W` rows of Q6_K blocks against `X` Q8_K rows: per group of 32 weights each row's 6-bit
/// values are assembled once and dotted with every activation row (minus 32 · Σx), times the
/// 16-weight scales. As [`dot_tile_k4`]: each output's operations and their order do not
/// depend on `W` and `X`.
///
/// # Safety
/// As [`dot_tile_k4`], for Q6_K.
#[inline(always)]
unsafe fn dot_tile_q6k<const W: usize, const X: usize>(
    w: &[&[u8]; W],
    x: &[&Q8KRow; X],
) -> [[f32; W]; X] {
    let nb = x[0].d.len();
    debug_assert!(x.iter().all(|x| x.d.len() == nb && x.q.len() >= 256 * nb));
    debug_assert!(w.iter().all(|r| r.len() >= nb * Q6K_BYTES));
    let m4 = _mm256_set1_epi8(0x0F);
    let m3 = _mm256_set1_epi8(3);
    let m32 = _mm256_set1_epi8(32);
    let mut acc = [[_mm256_setzero_ps(); W]; X];
    for i in 0..nb {
        if W == 1 && X == 1 {
            // As in `dot_rows_32`: decode streams one row; a block is 4 cache lines.
            let b = w[0].as_ptr().wrapping_add(i * Q6K_BYTES + PREFETCH_AHEAD);
            for line in (0..Q6K_BYTES).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(line) as *const i8);
            }
        }
        let mut sumi = [[_mm256_setzero_si256(); W]; X];
        for half in 0..2 {
            // Per row: the low nibbles (two 32-byte halves) and the high bit pairs.
            let mut ql = [[_mm256_setzero_si256(); 2]; W];
            let mut qh = [_mm256_setzero_si256(); W];
            for r in 0..W {
                let p = w[r].as_ptr().wrapping_add(i * Q6K_BYTES);
                // SAFETY: ql (128 bytes at 0) and qh (64 at 128) of block i of row r.
                unsafe {
                    ql[r] = [load256(p.add(64 * half)), load256(p.add(64 * half + 32))];
                    qh[r] = load256(p.add(128 + 32 * half));
                }
            }
            for g in 0..4 {
                // Values 0..64 of group g (32 weights in element order) and its two scales.
                let mut q = [_mm256_setzero_si256(); W];
                let mut scales = [_mm256_setzero_si256(); W];
                for r in 0..W {
                    let low = ql[r][g % 2];
                    let low = if g < 2 {
                        _mm256_and_si256(low, m4)
                    } else {
                        _mm256_and_si256(_mm256_srli_epi16(low, 4), m4)
                    };
                    q[r] = _mm256_or_si256(low, q6_high(qh[r], 2 * g as i32, m3));
                    // Elements 0..16 of the group take one scale, 16..32 the next.
                    let b = &w[r][i * Q6K_BYTES..(i + 1) * Q6K_BYTES];
                    let s0 = b[192 + 8 * half + 2 * g] as i8 as i16;
                    let s1 = b[192 + 8 * half + 2 * g + 1] as i8 as i16;
                    scales[r] = _mm256_set_m128i(_mm_set1_epi16(s1), _mm_set1_epi16(s0));
                }
                for xi in 0..X {
                    // SAFETY: 32 activation bytes of group g, in bounds per the caller.
                    let xs = unsafe {
                        load256(x[xi].q.as_ptr().add(256 * i + 128 * half + 32 * g) as *const u8)
                    };
                    // 32 · Σx per pair, to take the -32 off the unsigned values.
                    let x32 = _mm256_maddubs_epi16(m32, xs);
                    for r in 0..W {
                        let p16 = _mm256_sub_epi16(_mm256_maddubs_epi16(q[r], xs), x32);
                        sumi[xi][r] =
                            _mm256_add_epi32(sumi[xi][r], _mm256_madd_epi16(p16, scales[r]));
                    }
                }
            }
        }
        for r in 0..W {
            let d = f16_le(&w[r][i * Q6K_BYTES..], 208);
            for xi in 0..X {
                acc[xi][r] = _mm256_fmadd_ps(
                    _mm256_set1_ps(d * x[xi].d[i]),
                    _mm256_cvtepi32_ps(sumi[xi][r]),
                    acc[xi][r],
                );
            }
        }
    }
    let mut out = [[0f32; W]; X];
    for xi in 0..X {
        for r in 0..W {
            out[xi][r] = hsum(acc[xi][r]);
        }
    }
    out
}

macro_rules! dot_k {
    ($name:ident, $tile:ident, $body:ident $(, $five:literal)?) => {
        /// # Safety
        /// AVX2 + FMA + F16C; each row holds as many whole blocks as `x` has.
        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn $name<const R: usize>(w: &[&[u8]; R], x: &Q8KRow) -> [f32; R] {
            // SAFETY: per the caller.
            unsafe { $body::<$($five,)? R, 1>(w, &[x])[0] }
        }

        /// A tile on the AVX-512 paths (32 vector registers hold its accumulators).
        ///
        /// # Safety
        /// AVX2 + FMA + F16C + AVX-512 F/VL; each weight row holds as many whole blocks as
        /// every row of `x`.
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
        pub unsafe fn $tile(
            w: &[&[u8]; KQUANT_TILE.0],
            x: &[&Q8KRow; KQUANT_TILE.1],
        ) -> [[f32; KQUANT_TILE.0]; KQUANT_TILE.1] {
            // SAFETY: per the caller.
            unsafe { $body::<$($five,)? { KQUANT_TILE.0 }, { KQUANT_TILE.1 }>(w, x) }
        }
    };
}

dot_k!(dot_q4k, tile_q4k, dot_tile_k4, false);
dot_k!(dot_q5k, tile_q5k, dot_tile_k4, true);
dot_k!(dot_q6k, tile_q6k, dot_tile_q6k);

/// # Safety
/// 32 readable bytes at `p`.
#[inline(always)]
unsafe fn load256(p: *const u8) -> __m256i {
    // SAFETY: per the caller.
    unsafe { _mm256_loadu_si256(p as *const __m256i) }
}

/// Bits `s`, `s + 1` of each byte of `qh`, moved to bits 4 and 5.
#[inline(always)]
unsafe fn q6_high(qh: __m256i, s: i32, m3: __m256i) -> __m256i {
    let sh = _mm_cvtsi32_si128(s);
    _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(qh, sh), m3), 4)
}

#[cfg(test)]
mod tests {
    #[test]
    fn f16_scales_widen_exactly() {
        for h in 0..=u16::MAX {
            let want = half::f16::from_bits(h);
            if !want.is_finite() {
                continue;
            }
            // SAFETY: two readable bytes.
            let got = unsafe { super::f16_at(h.to_le_bytes().as_ptr()) };
            assert_eq!(got.to_bits(), want.to_f32().to_bits(), "{h:#06x}");
        }
    }
}
