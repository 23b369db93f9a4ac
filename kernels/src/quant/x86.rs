//! x86 kernels of the quantized matmul. The 32-weight types run on interleaved groups of 16
//! rows ([`super::interleave`]): AVX2 and AVX-512 VNNI kernels computing exactly the portable
//! kernel's integers and FMAs. The k-quants: AVX2 dot products of weight rows with Q8_K
//! activation rows, the same integers as the portable ones ([`super::dot`]), 32 products per
//! `vpmaddubsw` (unsigned × signed bytes into i16 pairs), widened to i32 by `vpmaddwd` with the
//! sub-block scales, then per block one f32 FMA into 8 lanes. Each output's lanes are summed
//! once at the end, in a fixed order: the same result for any number of rows.

use std::arch::x86_64::*;

use super::act::{Q8KRow, Q8_0Row};
use super::blocks::{Q4K_BYTES, Q5K_BYTES, Q6K_BYTES};
use super::interleave::{Kind, LANES};
use super::matmul::KQUANT_TILE;

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

/// The 8 quads of block `b`'s levels in group `g` for lanes (rows) `8h..8h + 8` (AVX2: half
/// a 64-byte quad per register): unsigned levels, or for Q8_0 (`Q8`) the signed weights
/// (`vpmaddubsw` saturates on 255 · 127 · 2).
///
/// # Safety
/// AVX2; `g` is a whole group of `nb` blocks of `kind`, b < nb, h < 2.
#[inline(always)]
unsafe fn quads_256<const Q8: bool, const HIGH: bool>(
    kind: Kind,
    nb: usize,
    g: *const u8,
    b: usize,
    h: usize,
) -> [__m256i; 8] {
    let mut w = [_mm256_setzero_si256(); 8];
    // SAFETY: the quads, fifth bits and their halves lie inside the group, per the caller.
    unsafe {
        let lv = g.add(kind.levels_at(b) + 32 * h);
        if Q8 {
            for (t, w) in w.iter_mut().enumerate() {
                *w = _mm256_xor_si256(load256(lv.add(64 * t)), _mm256_set1_epi8(0x80u8 as i8));
            }
        } else {
            let m4 = _mm256_set1_epi8(0x0F);
            for j in 0..4 {
                let p = load256(lv.add(64 * j));
                w[j] = _mm256_and_si256(p, m4);
                w[j + 4] = _mm256_and_si256(_mm256_srli_epi16(p, 4), m4);
            }
            if HIGH {
                // Lanes 8h..8h + 8 of quad t are bits 32h..32h + 32 of its u64.
                let hi = g.add(kind.high_at(nb, b) + 4 * h);
                for (t, w) in w.iter_mut().enumerate() {
                    let fifth =
                        _mm256_and_si256(bits_to_bytes(hi.add(8 * t)), _mm256_set1_epi8(16));
                    *w = _mm256_or_si256(*w, fifth);
                }
            }
        }
    }
    w
}

/// An interleaved group against `X` activation rows, AVX2: each half of the group's 16 rows
/// (8 i32 lanes) in turn, Σ u·x by `vpmaddubsw` + `vpmaddwd` from -offset·Σx (Q8_0: |w| times
/// x with w's sign, from 0: the same integer).
///
/// # Safety
/// AVX2 + FMA + F16C; `g` a whole group of `nb` blocks of `kind`; `x` X rows of `nb` blocks;
/// `out` at least X long.
#[inline(always)]
unsafe fn group_avx2<const Q8: bool, const HIGH: bool, const X: usize>(
    kind: Kind,
    nb: usize,
    g: &[u8],
    x: &[Q8_0Row],
    out: &mut [[f32; LANES]],
) {
    debug_assert!(g.len() >= kind.group_bytes(nb) && x.len() == X && out.len() >= X);
    debug_assert!(x
        .iter()
        .all(|x| x.d.len() >= nb && x.s.len() >= nb && x.q.len() >= 32 * nb));
    let g = g.as_ptr();
    let ones = _mm256_set1_epi16(1);
    for h in 0..2 {
        let mut acc = [_mm256_setzero_ps(); X];
        for b in 0..nb {
            // SAFETY: block b of the group and of each activation row, per the caller.
            unsafe {
                if X == 1 && h == 0 {
                    prefetch_block(kind, nb, g, b);
                }
                let w = quads_256::<Q8, HIGH>(kind, nb, g, b, h);
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(
                    g.add(kind.scales_at(nb, b) + 16 * h) as *const __m128i
                ));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let xi = x.get_unchecked(i);
                    let xq = xi.q.as_ptr().add(32 * b) as *const i32;
                    let mut s = if Q8 {
                        _mm256_setzero_si256()
                    } else {
                        _mm256_set1_epi32(-kind.offset * *xi.s.get_unchecked(b))
                    };
                    for (t, &w) in w.iter().enumerate() {
                        let a = _mm256_set1_epi32(xq.add(t).read_unaligned());
                        let p = if Q8 {
                            _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w))
                        } else {
                            _mm256_maddubs_epi16(w, a)
                        };
                        s = _mm256_add_epi32(s, _mm256_madd_epi16(p, ones));
                    }
                    let d = _mm256_mul_ps(dw, _mm256_set1_ps(*xi.d.get_unchecked(b)));
                    *acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s), *acc);
                }
            }
        }
        for (o, acc) in out.iter_mut().zip(acc) {
            // SAFETY: lanes 8h..8h + 8 of a 16-lane row.
            unsafe { _mm256_storeu_ps(o.as_mut_ptr().add(8 * h), acc) };
        }
    }
}

/// Decode streams one group at a time, three regions side by side: ask for the levels,
/// fifth bits and scales of the block PREFETCH_AHEAD bytes of levels ahead of block b (hints:
/// they never fault, even past the group).
///
/// # Safety
/// SSE (any x86-64).
#[inline(always)]
unsafe fn prefetch_block(kind: Kind, nb: usize, g: *const u8, b: usize) {
    let ahead = b + PREFETCH_AHEAD / kind.levels;
    let lv = g.wrapping_add(kind.levels_at(ahead));
    for line in (0..kind.levels).step_by(64) {
        _mm_prefetch::<_MM_HINT_T0>(lv.wrapping_add(line) as *const i8);
    }
    if kind.high {
        _mm_prefetch::<_MM_HINT_T0>(g.wrapping_add(kind.high_at(nb, ahead)) as *const i8);
    }
    if ahead.is_multiple_of(2) {
        _mm_prefetch::<_MM_HINT_T0>(g.wrapping_add(kind.scales_at(nb, ahead)) as *const i8);
    }
}

/// An interleaved group against `X` activation rows, AVX-512 VNNI: per block the 8 quads
/// unpacked once into 64-byte levels (Q5_0's fifth bits a byte mask under `vpaddb`), then per
/// activation row 8 `vpdpbusd` (4 activation bytes broadcast to the 16 lanes) from
/// -offset·Σx, one convert, one FMA.
///
/// # Safety
/// AVX-512 F/BW/VNNI; as [`group_avx2`] otherwise.
#[inline(always)]
unsafe fn group_vnni<const Q8: bool, const HIGH: bool, const X: usize>(
    kind: Kind,
    nb: usize,
    g: &[u8],
    x: &[Q8_0Row],
    out: &mut [[f32; LANES]],
) {
    debug_assert!(g.len() >= kind.group_bytes(nb) && x.len() == X && out.len() >= X);
    debug_assert!(x
        .iter()
        .all(|x| x.d.len() >= nb && x.s.len() >= nb && x.q.len() >= 32 * nb));
    let g = g.as_ptr();
    let m4 = _mm512_set1_epi8(0x0F);
    let sixteen = _mm512_set1_epi8(16);
    let mut acc = [_mm512_setzero_ps(); X];
    for b in 0..nb {
        // SAFETY: block b of the group and of each activation row, per the caller.
        unsafe {
            let lv = g.add(kind.levels_at(b));
            if X == 1 {
                prefetch_block(kind, nb, g, b);
            }
            let mut w = [_mm512_setzero_si512(); 8];
            if Q8 {
                for (t, w) in w.iter_mut().enumerate() {
                    *w = _mm512_loadu_si512(lv.add(64 * t) as *const _);
                }
            } else {
                for j in 0..4 {
                    let p = _mm512_loadu_si512(lv.add(64 * j) as *const _);
                    w[j] = _mm512_and_si512(p, m4);
                    w[j + 4] = _mm512_and_si512(_mm512_srli_epi16(p, 4), m4);
                }
                if HIGH {
                    let hi = g.add(kind.high_at(nb, b));
                    for (t, w) in w.iter_mut().enumerate() {
                        let bits = (hi.add(8 * t) as *const u64).read_unaligned();
                        *w = _mm512_mask_add_epi8(*w, bits, *w, sixteen);
                    }
                }
            }
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(
                g.add(kind.scales_at(nb, b)) as *const __m256i
            ));
            for (i, acc) in acc.iter_mut().enumerate() {
                let xi = x.get_unchecked(i);
                let xq = xi.q.as_ptr().add(32 * b) as *const i32;
                let mut s = _mm512_set1_epi32(-kind.offset * *xi.s.get_unchecked(b));
                for (t, &w) in w.iter().enumerate() {
                    s = _mm512_dpbusd_epi32(s, w, _mm512_set1_epi32(xq.add(t).read_unaligned()));
                }
                let d = _mm512_mul_ps(dw, _mm512_set1_ps(*xi.d.get_unchecked(b)));
                *acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(s), *acc);
            }
        }
    }
    for (o, acc) in out.iter_mut().zip(acc) {
        // SAFETY: 16 lanes into a 16-lane row.
        unsafe { _mm512_storeu_ps(o.as_mut_ptr(), acc) };
    }
}

macro_rules! group_kernels {
    ($avx2:ident, $vnni:ident, $q8:literal, $high:literal) => {
        /// # Safety
        /// AVX2 + FMA + F16C; `g` a whole group of `nb` blocks of this type, `x` X activation
        /// rows of `nb` blocks, `out` at least X long.
        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn $avx2<const X: usize>(
            kind: Kind,
            nb: usize,
            g: &[u8],
            x: &[Q8_0Row],
            out: &mut [[f32; LANES]],
        ) {
            // SAFETY: per the caller.
            unsafe { group_avx2::<$q8, $high, X>(kind, nb, g, x, out) }
        }

        /// # Safety
        /// As the AVX2 kernel, and AVX-512 F/BW/VL/VNNI.
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
        pub unsafe fn $vnni<const X: usize>(
            kind: Kind,
            nb: usize,
            g: &[u8],
            x: &[Q8_0Row],
            out: &mut [[f32; LANES]],
        ) {
            // SAFETY: per the caller.
            unsafe { group_vnni::<$q8, $high, X>(kind, nb, g, x, out) }
        }
    };
}

group_kernels!(group_q8_0_avx2, group_q8_0_vnni, true, false);
group_kernels!(group_q4_0_avx2, group_q4_0_vnni, false, false);
group_kernels!(group_q5_0_avx2, group_q5_0_vnni, false, true);

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
