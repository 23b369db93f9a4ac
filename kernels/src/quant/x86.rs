//! AVX2 dot products of quantized weight rows with Q8 activation rows: the same integers as the
//! portable ones ([`super::dot`]), 32 products per `vpmaddubsw` (unsigned × signed bytes into
//! i16 pairs; the 8-bit types take absolute values and move the sign to the activations, as
//! ggml does, since 255 · 127 · 2 overflows i16), widened to i32 by `vpmaddwd` (with the
//! sub-block scales for the k-quants), then per block one f32 FMA into 8 lanes. Each output's
//! lanes are summed once at the end, in a fixed order: the same result for any number of rows.

use std::arch::x86_64::*;

use super::act::{Q8KRow, Q8_0Row};
use super::blocks::{Q4K_BYTES, Q4_0_BYTES, Q5K_BYTES, Q5_0_BYTES, Q6K_BYTES, Q8_0_BYTES};

/// # Safety
/// AVX2 + FMA + F16C; `p` points at 2 readable bytes.
#[inline(always)]
unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: per the caller; an unaligned 2-byte read.
    let bits = unsafe { (p as *const u16).read_unaligned() };
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// Horizontal sum of 8 lanes, in a fixed order.
#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Σ w·x over 32 signed bytes each, as 8 i32 lanes (pairs of i16 sums, which cannot overflow
/// for |w|, |x| ≤ 127 and w ≥ -128 only where x ≤ 127).
#[inline(always)]
unsafe fn dot_i8(w: __m256i, x: __m256i) -> __m256i {
    let aw = _mm256_sign_epi8(w, w);
    let sx = _mm256_sign_epi8(x, w);
    _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), _mm256_set1_epi16(1))
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

/// # Safety
/// AVX2 + FMA + F16C; `w` whole Q8_0 blocks, `x` at least as many.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q8_0(w: &[u8], x: &Q8_0Row) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for ((b, &dx), xq) in w
        .chunks_exact(Q8_0_BYTES)
        .zip(&x.d)
        .zip(x.q.chunks_exact(32))
    {
        // SAFETY: a block is 34 bytes (2 of scale, 32 of weights); xq is 32 bytes.
        let (wv, xv, d) = unsafe {
            (
                _mm256_loadu_si256(b.as_ptr().add(2) as *const __m256i),
                _mm256_loadu_si256(xq.as_ptr() as *const __m256i),
                f16_at(b.as_ptr()),
            )
        };
        let s = _mm256_cvtepi32_ps(dot_i8(wv, xv));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), s, acc);
    }
    hsum(acc)
}

/// # Safety
/// As [`dot_q8_0`], Q4_0 blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q4_0(w: &[u8], x: &Q8_0Row) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for ((b, &dx), xq) in w
        .chunks_exact(Q4_0_BYTES)
        .zip(&x.d)
        .zip(x.q.chunks_exact(32))
    {
        // SAFETY: a block is 18 bytes (2 + 16 of nibbles); xq is 32 bytes.
        let (wv, xv, d) = unsafe {
            (
                nibbles(b.as_ptr().add(2)),
                _mm256_loadu_si256(xq.as_ptr() as *const __m256i),
                f16_at(b.as_ptr()),
            )
        };
        let wv = _mm256_sub_epi8(wv, _mm256_set1_epi8(8));
        let s = _mm256_cvtepi32_ps(dot_i8(wv, xv));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), s, acc);
    }
    hsum(acc)
}

/// # Safety
/// As [`dot_q8_0`], Q5_0 blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q5_0(w: &[u8], x: &Q8_0Row) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for ((b, &dx), xq) in w
        .chunks_exact(Q5_0_BYTES)
        .zip(&x.d)
        .zip(x.q.chunks_exact(32))
    {
        // SAFETY: a block is 22 bytes (2 + 4 of high bits + 16 of nibbles); xq is 32 bytes.
        let (low, high, xv, d) = unsafe {
            (
                nibbles(b.as_ptr().add(6)),
                bits_to_bytes(b.as_ptr().add(2)),
                _mm256_loadu_si256(xq.as_ptr() as *const __m256i),
                f16_at(b.as_ptr()),
            )
        };
        // (n | h << 4) - 16 as i8: n where the bit is set, n | 0xF0 (= n - 16) where not.
        let wv = _mm256_or_si256(
            low,
            _mm256_andnot_si256(high, _mm256_set1_epi8(0xF0u8 as i8)),
        );
        let s = _mm256_cvtepi32_ps(dot_i8(wv, xv));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), s, acc);
    }
    hsum(acc)
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

/// # Safety
/// AVX2 + FMA + F16C; `w` whole Q4_K blocks, `x` at least as many.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q4k(w: &[u8], x: &Q8KRow) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut acc_min = 0f32;
    for (i, b) in w.chunks_exact(Q4K_BYTES).enumerate() {
        let (sc, m) = scales_mins(&b[4..16]);
        let xq = &x.q[256 * i..256 * i + 256];
        let mut sumi = _mm256_setzero_si256();
        for c in 0..4 {
            // SAFETY: 32 bytes of nibbles at 16 + 32c < 144; 64 activation bytes at 64c.
            let (q, x0, x1) = unsafe {
                (
                    _mm256_loadu_si256(b.as_ptr().add(16 + 32 * c) as *const __m256i),
                    _mm256_loadu_si256(xq.as_ptr().add(64 * c) as *const __m256i),
                    _mm256_loadu_si256(xq.as_ptr().add(64 * c + 32) as *const __m256i),
                )
            };
            let lo = _mm256_and_si256(q, _mm256_set1_epi8(0x0F));
            let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), _mm256_set1_epi8(0x0F));
            let p0 = _mm256_madd_epi16(
                _mm256_maddubs_epi16(lo, x0),
                _mm256_set1_epi16(sc[2 * c] as i16),
            );
            let p1 = _mm256_madd_epi16(
                _mm256_maddubs_epi16(hi, x1),
                _mm256_set1_epi16(sc[2 * c + 1] as i16),
            );
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p0, p1));
        }
        let dx = x.d[i];
        // SAFETY: d and dmin are the block's first 4 bytes.
        let (d, dmin) = unsafe { (f16_at(b.as_ptr()), f16_at(b.as_ptr().add(2))) };
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(sumi), acc);
        acc_min += (dmin * dx) * mins_dot(&m, &x.bsums[16 * i..]) as f32;
    }
    hsum(acc) - acc_min
}

/// # Safety
/// AVX2 + FMA + F16C; `w` whole Q5_K blocks, `x` at least as many.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q5k(w: &[u8], x: &Q8KRow) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut acc_min = 0f32;
    let one = _mm256_set1_epi8(1);
    for (i, b) in w.chunks_exact(Q5K_BYTES).enumerate() {
        let (sc, m) = scales_mins(&b[4..16]);
        let xq = &x.q[256 * i..256 * i + 256];
        // SAFETY: the 32 bytes of fifth bits at 16..48.
        let hb = unsafe { _mm256_loadu_si256(b.as_ptr().add(16) as *const __m256i) };
        let mut sumi = _mm256_setzero_si256();
        for c in 0..4 {
            // SAFETY: 32 bytes of nibbles at 48 + 32c < 176; 64 activation bytes at 64c.
            let (q, x0, x1) = unsafe {
                (
                    _mm256_loadu_si256(b.as_ptr().add(48 + 32 * c) as *const __m256i),
                    _mm256_loadu_si256(xq.as_ptr().add(64 * c) as *const __m256i),
                    _mm256_loadu_si256(xq.as_ptr().add(64 * c + 32) as *const __m256i),
                )
            };
            // Bit 2c of each byte (for the low nibbles) and bit 2c + 1 (high), moved to bit 4;
            // a 16-bit shift by less than 8 keeps each byte's own bit in its bit 0.
            let shift = _mm_cvtsi32_si128(2 * c as i32);
            let shift1 = _mm_cvtsi32_si128(2 * c as i32 + 1);
            let h0 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(hb, shift), one), 4);
            let h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(hb, shift1), one), 4);
            let lo = _mm256_or_si256(_mm256_and_si256(q, _mm256_set1_epi8(0x0F)), h0);
            let hi = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(q, 4), _mm256_set1_epi8(0x0F)),
                h1,
            );
            let p0 = _mm256_madd_epi16(
                _mm256_maddubs_epi16(lo, x0),
                _mm256_set1_epi16(sc[2 * c] as i16),
            );
            let p1 = _mm256_madd_epi16(
                _mm256_maddubs_epi16(hi, x1),
                _mm256_set1_epi16(sc[2 * c + 1] as i16),
            );
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p0, p1));
        }
        let dx = x.d[i];
        // SAFETY: d and dmin are the block's first 4 bytes.
        let (d, dmin) = unsafe { (f16_at(b.as_ptr()), f16_at(b.as_ptr().add(2))) };
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(sumi), acc);
        acc_min += (dmin * dx) * mins_dot(&m, &x.bsums[16 * i..]) as f32;
    }
    hsum(acc) - acc_min
}

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

/// # Safety
/// AVX2 + FMA + F16C; `w` whole Q6_K blocks, `x` at least as many.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q6k(w: &[u8], x: &Q8KRow) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let m4 = _mm256_set1_epi8(0x0F);
    let m3 = _mm256_set1_epi8(3);
    let m32 = _mm256_set1_epi8(32);
    for (i, b) in w.chunks_exact(Q6K_BYTES).enumerate() {
        let xq = &x.q[256 * i..256 * i + 256];
        let mut sumi = _mm256_setzero_si256();
        for half in 0..2 {
            let (p, xp) = (b.as_ptr(), xq.as_ptr());
            // SAFETY: ql (128 bytes at 0), qh (64 at 128) and the activations (256) in bounds.
            let (ql0, ql1, qh, xs) = unsafe {
                let load = load256;
                let xh = xp.add(128 * half) as *const u8;
                (
                    load(p.add(64 * half)),
                    load(p.add(64 * half + 32)),
                    load(p.add(128 + 32 * half)),
                    [
                        load(xh),
                        load(xh.add(32)),
                        load(xh.add(64)),
                        load(xh.add(96)),
                    ],
                )
            };
            // Values 0..64 (the -32 comes off as 32 · Σx), groups g of 32 in element order.
            let q = [
                _mm256_or_si256(_mm256_and_si256(ql0, m4), q6_high(qh, 0, m3)),
                _mm256_or_si256(_mm256_and_si256(ql1, m4), q6_high(qh, 2, m3)),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                    q6_high(qh, 4, m3),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                    q6_high(qh, 6, m3),
                ),
            ];
            for g in 0..4 {
                let p16 = _mm256_sub_epi16(
                    _mm256_maddubs_epi16(q[g], xs[g]),
                    _mm256_maddubs_epi16(m32, xs[g]),
                );
                // Elements 0..16 of the group take one scale, 16..32 the next.
                let s0 = b[192 + 8 * half + 2 * g] as i8 as i16;
                let s1 = b[192 + 8 * half + 2 * g + 1] as i8 as i16;
                let scales = _mm256_set_m128i(_mm_set1_epi16(s1), _mm_set1_epi16(s0));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p16, scales));
            }
        }
        // SAFETY: d is the block's last 2 bytes.
        let d = unsafe { f16_at(b.as_ptr().add(208)) };
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d * x.d[i]), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum(acc)
}
