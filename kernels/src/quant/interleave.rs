//! The 32-weight types (Q8_0, Q4_0, Q5_0) repacked at load, [`LANES`] weight rows interleaved
//! per block, the layout llama.cpp's repacked GEMMs use in spirit: one 64-byte vector holds 4
//! consecutive weights of each of 16 rows, so one `vpdpbusd` against 4 activation bytes
//! broadcast to every lane adds 64 products into the 16 rows' own i32 lanes. No horizontal
//! sums, one scale conversion and one FMA per block for 16 outputs, and each unpacked weight
//! vector serves every activation row of a tile (where the row-by-row kernels unpacked a
//! block per row and spent a convert and an FMA per 32 products).
//!
//! A group (16 rows of `nb` blocks) is three regions, each 64-byte aligned in a group whose
//! size is a multiple of 64:
//! - levels: per block, the 32 weights of each row as unsigned levels `u` (weight = u - offset:
//!   Q8_0 stores w ^ 0x80, offset 128; Q4_0 the nibble, offset 8; Q5_0 the low four bits,
//!   offset 16), in quads: quad `t` (weights 4t..4t+4) is 64 bytes, byte 4r + j = row r's
//!   weight 4t + j. Q8_0 stores the 8 quads (512 bytes); Q4_0/Q5_0 pack quad t (t < 4) in the
//!   low nibbles and quad t + 4 in the high nibbles of the same 64 bytes (256 bytes).
//! - high bits (Q5_0): per block and quad a u64, bit 4r + j = the fifth bit of that weight;
//!   as an AVX-512 byte mask it adds 16 to exactly those levels.
//! - scales: per block the 16 rows' f16 scales (32 bytes).
//!
//! Every path computes each output the same way: per block the exact integer Σ u·x - o·Σx,
//! converted to f32 and added by one fused multiply-add with the scale product `d_w · d_x`,
//! blocks in order. The portable kernel here, the AVX2 and the AVX-512 VNNI kernels
//! (`super::x86`) therefore agree bit for bit, whatever the number of activation rows.

use rayon::prelude::*;

use super::act::Q8_0Row;
use super::blocks::{Q4_0_BYTES, Q5_0_BYTES, Q8_0_BYTES};
use super::GgmlType;
use crate::Zeroed;

/// Weight rows per interleaved group.
pub(super) const LANES: usize = 16;

/// A type's shape in the interleaved layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Kind {
    pub ty: GgmlType,
    /// Bytes of levels per block (all 16 rows).
    pub levels: usize,
    /// Whether the block has a region of fifth bits (64 bytes per block).
    pub high: bool,
    /// What the stored levels exceed the weights by.
    pub offset: i32,
    /// Bytes of a block as GGUF stores it (one row).
    pub gguf_bytes: usize,
}

pub(super) const Q8_0: Kind = Kind {
    ty: GgmlType::Q8_0,
    levels: 512,
    high: false,
    offset: 128,
    gguf_bytes: Q8_0_BYTES,
};
pub(super) const Q4_0: Kind = Kind {
    ty: GgmlType::Q4_0,
    levels: 256,
    high: false,
    offset: 8,
    gguf_bytes: Q4_0_BYTES,
};
pub(super) const Q5_0: Kind = Kind {
    ty: GgmlType::Q5_0,
    levels: 256,
    high: true,
    offset: 16,
    gguf_bytes: Q5_0_BYTES,
};

impl Kind {
    /// The interleaved shape of `ty`, if it has one.
    pub fn of(ty: GgmlType) -> Option<Kind> {
        match ty {
            GgmlType::Q8_0 => Some(Q8_0),
            GgmlType::Q4_0 => Some(Q4_0),
            GgmlType::Q5_0 => Some(Q5_0),
            _ => None,
        }
    }

    /// Where block `b`'s levels start in a group.
    #[inline(always)]
    pub const fn levels_at(&self, b: usize) -> usize {
        b * self.levels
    }

    /// Where block `b`'s fifth bits start in a group of `nb` blocks.
    #[inline(always)]
    pub const fn high_at(&self, nb: usize, b: usize) -> usize {
        nb * self.levels + 64 * b
    }

    /// Where block `b`'s scales start in a group of `nb` blocks.
    #[inline(always)]
    pub const fn scales_at(&self, nb: usize, b: usize) -> usize {
        nb * (self.levels + if self.high { 64 } else { 0 }) + 32 * b
    }

    /// Bytes of a group of `nb` blocks (a multiple of 64).
    pub const fn group_bytes(&self, nb: usize) -> usize {
        self.scales_at(nb, nb).next_multiple_of(64)
    }

    /// The stored level (fifth bit aside) of weight `e` (0..32) of a GGUF block.
    fn level(&self, block: &[u8], e: usize) -> u8 {
        match self.ty {
            GgmlType::Q8_0 => block[2 + e] ^ 0x80,
            GgmlType::Q4_0 => nibble(&block[2..18], e),
            _ => nibble(&block[6..22], e),
        }
    }

    /// Byte and shift of row `r`'s weight `e` of block `b` in the levels region.
    #[inline(always)]
    fn level_pos(&self, b: usize, r: usize, e: usize) -> (usize, u32) {
        let (t, j) = (e / 4, e % 4);
        if self.levels == 512 {
            (self.levels_at(b) + 64 * t + 4 * r + j, 0)
        } else {
            (
                self.levels_at(b) + 64 * (t % 4) + 4 * r + j,
                4 * (t / 4) as u32,
            )
        }
    }

    /// Byte and bit of row `r`'s fifth bit of weight `e` of block `b`.
    #[inline(always)]
    fn high_pos(&self, nb: usize, b: usize, r: usize, e: usize) -> (usize, u32) {
        let bit = 4 * r + e % 4;
        (
            self.high_at(nb, b) + 8 * (e / 4) + bit / 8,
            (bit % 8) as u32,
        )
    }

    /// Row `r`'s level (with its fifth bit) of weight `e` of block `b` in group `g`.
    #[inline(always)]
    fn stored_level(&self, g: &[u8], nb: usize, b: usize, r: usize, e: usize) -> u8 {
        let (at, shift) = self.level_pos(b, r, e);
        let mut u = if self.levels == 512 {
            g[at]
        } else {
            (g[at] >> shift) & 0x0F
        };
        if self.high {
            let (at, bit) = self.high_pos(nb, b, r, e);
            u |= ((g[at] >> bit) & 1) << 4;
        }
        u
    }

    /// Writes GGUF rows (up to 16, each `nb` whole blocks) into `group` (zeroed, group_bytes
    /// long); missing rows stay zero (scale 0: their outputs are never read).
    pub fn pack(&self, rows: &[&[u8]], nb: usize, group: &mut [u8]) {
        debug_assert!(rows.len() <= LANES && group.len() >= self.group_bytes(nb));
        for (r, row) in rows.iter().enumerate() {
            for (b, block) in row.chunks_exact(self.gguf_bytes).take(nb).enumerate() {
                let d = self.scales_at(nb, b) + 2 * r;
                group[d..d + 2].copy_from_slice(&block[..2]);
                let mut u = [0u8; 32];
                let mut fifth = 0u32;
                for (e, u) in u.iter_mut().enumerate() {
                    *u = self.level(block, e);
                }
                if self.high {
                    fifth = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
                }
                let lv = self.levels_at(b);
                for (t, quad) in u.chunks_exact(4).enumerate() {
                    let at = lv + 64 * (t % (self.levels / 64)) + 4 * r;
                    let shift = if self.levels == 512 { 0 } else { 4 * (t / 4) };
                    for (dst, &q) in group[at..at + 4].iter_mut().zip(quad) {
                        *dst |= q << shift;
                    }
                    if self.high {
                        let at = self.high_at(nb, b) + 8 * t;
                        let mut bits =
                            u64::from_le_bytes(group[at..at + 8].try_into().unwrap_or_default());
                        bits |= (((fifth >> (4 * t)) & 0xF) as u64) << (4 * r);
                        group[at..at + 8].copy_from_slice(&bits.to_le_bytes());
                    }
                }
            }
        }
    }

    /// Row `r`'s block `b` of group `g` as GGUF stores it, into `out` (gguf_bytes long).
    pub fn unpack(&self, g: &[u8], nb: usize, r: usize, b: usize, out: &mut [u8]) {
        let d = self.scales_at(nb, b) + 2 * r;
        out[..2].copy_from_slice(&g[d..d + 2]);
        out[2..self.gguf_bytes].fill(0);
        for e in 0..32 {
            let u = self.stored_level(g, nb, b, r, e);
            match self.ty {
                GgmlType::Q8_0 => out[2 + e] = u ^ 0x80,
                GgmlType::Q4_0 => out[2 + e % 16] |= (u & 0x0F) << (4 * (e / 16)),
                _ => {
                    out[6 + e % 16] |= (u & 0x0F) << (4 * (e / 16));
                    out[2 + e / 8] |= (u >> 4) << (e % 8);
                }
            }
        }
    }
}

/// The low nibble of byte e (e < 16) or the high nibble of byte e - 16.
fn nibble(qs: &[u8], e: usize) -> u8 {
    if e < 16 {
        qs[e] & 0x0F
    } else {
        qs[e - 16] >> 4
    }
}

/// Interleaved groups in a 64-byte aligned buffer (vector loads never straddle cache lines).
#[derive(Debug)]
pub(super) struct Groups {
    pub kind: Kind,
    /// Blocks per row.
    pub nb: usize,
    /// Groups (⌈n / 16⌉).
    pub count: usize,
    buf: Vec<u8>,
    at: usize,
}

impl Groups {
    /// `count` zeroed groups of `nb` blocks (on huge pages where Linux grants them: decode
    /// streams every byte once per token).
    fn zeroed(kind: Kind, nb: usize, count: usize) -> Self {
        let len = kind.group_bytes(nb) * count;
        let buf = u8::zeroed_vec(len + 63);
        let at = (64 - buf.as_ptr() as usize % 64) % 64;
        Self {
            kind,
            nb,
            count,
            buf,
            at,
        }
    }

    /// ⌈n / 16⌉ groups of `nb` blocks, group i written by `fill(i, its zeroed bytes)`, groups
    /// in parallel.
    pub fn build(kind: Kind, nb: usize, n: usize, fill: impl Fn(usize, &mut [u8]) + Sync) -> Self {
        let mut g = Self::zeroed(kind, nb, n.div_ceil(LANES));
        let gb = kind.group_bytes(nb);
        g.bytes_mut()
            .par_chunks_mut(gb)
            .enumerate()
            .for_each(|(i, group)| fill(i, group));
        g
    }

    /// GGUF rows `row(i)` (i < n, each `nb` whole blocks) packed.
    pub fn pack<'a>(
        kind: Kind,
        nb: usize,
        n: usize,
        row: impl Fn(usize) -> &'a [u8] + Sync,
    ) -> Self {
        Self::build(kind, nb, n, |i, group| {
            let rows: Vec<&[u8]> = (i * LANES..n.min((i + 1) * LANES)).map(&row).collect();
            kind.pack(&rows, nb, group)
        })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.at..self.at + self.kind.group_bytes(self.nb) * self.count]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.kind.group_bytes(self.nb) * self.count;
        &mut self.buf[self.at..self.at + len]
    }

    /// Group `i`'s bytes.
    pub fn group(&self, i: usize) -> &[u8] {
        let gb = self.kind.group_bytes(self.nb);
        &self.bytes()[i * gb..(i + 1) * gb]
    }

    /// Row `r` as GGUF stores it.
    pub fn gguf_row(&self, r: usize) -> Vec<u8> {
        let mut out = vec![0u8; self.nb * self.kind.gguf_bytes];
        let g = self.group(r / LANES);
        for (b, block) in out.chunks_exact_mut(self.kind.gguf_bytes).enumerate() {
            self.kind.unpack(g, self.nb, r % LANES, b, block);
        }
        out
    }
}

impl Clone for Groups {
    fn clone(&self) -> Self {
        let mut c = Self::zeroed(self.kind, self.nb, self.count);
        c.bytes_mut().copy_from_slice(self.bytes());
        c
    }
}

impl PartialEq for Groups {
    fn eq(&self, other: &Self) -> bool {
        (self.kind, self.nb, self.count) == (other.kind, other.nb, other.count)
            && self.bytes() == other.bytes()
    }
}

/// A kernel over one group: `x.len()` activation rows (its tile width) into `out[i][r]` (row
/// r of the group against activation row i).
pub(super) type GroupFn = unsafe fn(Kind, usize, &[u8], &[Q8_0Row], &mut [[f32; LANES]]);

/// The portable kernel: each output as the layout's contract says (see the module comment).
///
/// # Safety
/// None beyond its arguments' shapes (checked by indexing): `unsafe` only to share
/// [`GroupFn`]'s type with the SIMD kernels.
pub(super) unsafe fn group_portable(
    kind: Kind,
    nb: usize,
    g: &[u8],
    x: &[Q8_0Row],
    out: &mut [[f32; LANES]],
) {
    for (xi, o) in x.iter().zip(out.iter_mut()) {
        for (r, o) in o.iter_mut().enumerate() {
            let mut acc = 0f32;
            for b in 0..nb {
                let mut s = -kind.offset * xi.s[b];
                for e in 0..32 {
                    s += kind.stored_level(g, nb, b, r, e) as i32 * xi.q[32 * b + e] as i32;
                }
                let at = kind.scales_at(nb, b) + 2 * r;
                let dw = half::f16::from_le_bytes([g[at], g[at + 1]]).to_f32();
                acc = (dw * xi.d[b]).mul_add(s as f32, acc);
            }
            *o = acc;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(seed: u64, n: usize) -> Vec<u8> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn packing_keeps_every_row_as_gguf_stores_it() {
        for kind in [Q8_0, Q4_0, Q5_0] {
            let (n, nb) = (21, 3);
            let rb = nb * kind.gguf_bytes;
            let data = bytes(kind.gguf_bytes as u64, n * rb);
            let g = Groups::pack(kind, nb, n, |i| &data[i * rb..(i + 1) * rb]);
            assert_eq!(g.count, 2);
            assert_eq!(g.bytes().as_ptr() as usize % 64, 0);
            for r in 0..n {
                assert_eq!(
                    g.gguf_row(r),
                    data[r * rb..(r + 1) * rb],
                    "{:?} row {r}",
                    kind.ty
                );
            }
            // Padding rows are zero; clones keep the alignment and the bytes.
            assert!(g.gguf_row(n + 2)[..2] == [0, 0]);
            let c = g.clone();
            assert_eq!(c.bytes().as_ptr() as usize % 64, 0);
            assert_eq!(c, g);
        }
    }
}
