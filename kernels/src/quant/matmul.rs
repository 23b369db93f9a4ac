//! `y = x · Wᵀ` for quantized W, in ggml's arithmetic: each row of x is quantized once per
//! matmul (Q8_0 or Q8_K, [`super::act`]), every output is one weight row's dot product with it
//! ([`super::dot`]), rows of W split over the pool. An output depends only on its own row of x
//! and its row of W, so results are batch-invariant.

use rayon::prelude::*;

use super::act::{quantize_q8_0_with_isa, quantize_q8k_with_isa, Q8KRow, Q8_0Row};
use super::{dot, GgmlType, QuantError};
use crate::{cpu_isa, Isa, Zeroed};

/// Weight rows per parallel task.
const ROWS_PER_TASK: usize = 16;

/// A (n × k) matrix of quantized rows, as GGUF stores it (row r's blocks one after another).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantWeight {
    ty: GgmlType,
    n: usize,
    k: usize,
    data: Vec<u8>,
}

/// The activation rows in the weights' dot format.
enum QuantActs {
    Q8_0(Vec<Q8_0Row>),
    Q8K(Vec<Q8KRow>),
}

/// A dot product of `R` weight rows with one activation row.
type Rows<A, const R: usize> = unsafe fn(&[&[u8]; R], &A) -> [f32; R];

/// A weight type's dot products on a path (one row, and [`GROUP`] rows sharing each
/// activation load): only made where the CPU runs it.
#[derive(Clone, Copy)]
enum Dot {
    Q8_0(Rows<Q8_0Row, 1>, Rows<Q8_0Row, GROUP>),
    Q8K(Rows<Q8KRow, 1>, Rows<Q8KRow, GROUP>),
}

/// Tile shapes (weight rows, activation rows) for the 32-weight types when several activation
/// rows read each weight block (`x86::dot_tile_32`: each block unpacked once per tile). AVX2
/// has 16 vector registers: 2 × 3 accumulators and their operands fit (4 × 4 and 2 × 4
/// spilled, measured slower); AVX-512 has 32.
pub(super) const AVX2_TILE: (usize, usize) = (2, 3);
pub(super) const VNNI_TILE: (usize, usize) = (4, 4);
/// Tile shape of the k-quants (Q4_K/Q5_K/Q6_K against Q8_K rows) on the AVX-512 paths.
pub(super) const KQUANT_TILE: (usize, usize) = (2, 4);

/// A tile kernel: `W` weight rows against `X` activation rows (of type `A`).
type TileFn<A, const W: usize, const X: usize> = unsafe fn(&[&[u8]; W], &[&A; X]) -> [[f32; W]; X];

/// The tile kernel of a path.
#[derive(Clone, Copy)]
enum Tile {
    Avx2(TileFn<Q8_0Row, { AVX2_TILE.0 }, { AVX2_TILE.1 }>),
    Vnni(TileFn<Q8_0Row, { VNNI_TILE.0 }, { VNNI_TILE.1 }>),
    KQuant(TileFn<Q8KRow, { KQUANT_TILE.0 }, { KQUANT_TILE.1 }>),
}

/// Runs `f` over every whole tile of `rows` (weight rows) × `acts` (activation rows), writing
/// each result through `write(column, activation row, value)`; returns how many activation rows
/// and weight rows the tiles covered.
fn run_tiles<A, const W: usize, const X: usize>(
    f: TileFn<A, W, X>,
    rows: &[&[u8]],
    acts: &[A],
    write: &impl Fn(usize, usize, f32),
) -> (usize, usize) {
    let (tiled_x, tiled_w) = (acts.len() / X * X, rows.len() / W * W);
    for i0 in (0..tiled_x).step_by(X) {
        let x: [&A; X] = std::array::from_fn(|i| &acts[i0 + i]);
        for r0 in (0..tiled_w).step_by(W) {
            let w: [&[u8]; W] = std::array::from_fn(|r| rows[r0 + r]);
            // SAFETY: `tile_kernel` chose a kernel this CPU runs; whole rows of the weight type,
            // activation rows of k values in its dot format.
            let v = unsafe { f(&w, &x) };
            for (i, vi) in v.iter().enumerate() {
                for (r, &vr) in vi.iter().enumerate() {
                    write(r0 + r, i0 + i, vr);
                }
            }
        }
    }
    (tiled_x, tiled_w)
}

/// Whether the dot products use AVX-512 VNNI's `vpdpbusd` (4 byte products summed into an i32
/// lane in one instruction, where AVX2 takes two): on the AVX-512 paths of a CPU that has it.
/// The integers are the AVX2 path's, so are the results.
#[cfg(target_arch = "x86_64")]
fn vnni(isa: Isa) -> bool {
    isa >= Isa::Avx512 && isa.is_supported() && std::arch::is_x86_feature_detected!("avx512vnni")
}

/// The tile kernel of a weight type on a path, where there is one.
fn tile_kernel(ty: GgmlType, isa: Isa) -> Option<Tile> {
    #[cfg(target_arch = "x86_64")]
    {
        use super::x86;
        let avx2 = isa >= Isa::Avx2 && isa.is_supported();
        let avx512 = isa >= Isa::Avx512 && isa.is_supported();
        let tile = match ty {
            GgmlType::Q4K if avx512 => Tile::KQuant(x86::tile_q4k),
            GgmlType::Q5K if avx512 => Tile::KQuant(x86::tile_q5k),
            GgmlType::Q6K if avx512 => Tile::KQuant(x86::tile_q6k),
            GgmlType::Q8_0 if vnni(isa) => Tile::Vnni(x86::tile_q8_0_vnni),
            GgmlType::Q4_0 if vnni(isa) => Tile::Vnni(x86::tile_q4_0_vnni),
            GgmlType::Q5_0 if vnni(isa) => Tile::Vnni(x86::tile_q5_0_vnni),
            GgmlType::Q8_0 if avx2 => Tile::Avx2(x86::tile_q8_0),
            GgmlType::Q4_0 if avx2 => Tile::Avx2(x86::tile_q4_0),
            GgmlType::Q5_0 if avx2 => Tile::Avx2(x86::tile_q5_0),
            _ => return None,
        };
        Some(tile)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (ty, isa);
        None
    }
}

/// Weight rows dotted together when several activation rows reuse them (independent
/// accumulators, one activation load). A single activation row streams one weight row at a
/// time instead: four rows read side by side are four streams, which the hardware prefetcher
/// follows worse than one (batch-1 decode 39 vs 29 tok/s on the 0.5B q8_0 file, AVX2). A row's
/// arithmetic is the same either way.
const GROUP: usize = 4;

/// The portable dots as `R`-row functions.
fn portable<A, const R: usize>(f: fn(&[u8], &A) -> f32) -> impl Fn(&[&[u8]; R], &A) -> [f32; R] {
    move |w, x| std::array::from_fn(|r| f(w[r], x))
}

impl Dot {
    fn new(ty: GgmlType, isa: Isa) -> Self {
        #[cfg(target_arch = "x86_64")]
        if vnni(isa) {
            use super::x86;
            match ty {
                GgmlType::Q8_0 => {
                    return Self::Q8_0(x86::dot_q8_0_vnni::<1>, x86::dot_q8_0_vnni::<GROUP>)
                }
                GgmlType::Q4_0 => {
                    return Self::Q8_0(x86::dot_q4_0_vnni::<1>, x86::dot_q4_0_vnni::<GROUP>)
                }
                GgmlType::Q5_0 => {
                    return Self::Q8_0(x86::dot_q5_0_vnni::<1>, x86::dot_q5_0_vnni::<GROUP>)
                }
                _ => {}
            }
        }
        #[cfg(target_arch = "x86_64")]
        if isa >= Isa::Avx2 && isa.is_supported() {
            use super::x86;
            return match ty {
                GgmlType::Q8_0 => Self::Q8_0(x86::dot_q8_0::<1>, x86::dot_q8_0::<GROUP>),
                GgmlType::Q4_0 => Self::Q8_0(x86::dot_q4_0::<1>, x86::dot_q4_0::<GROUP>),
                GgmlType::Q5_0 => Self::Q8_0(x86::dot_q5_0::<1>, x86::dot_q5_0::<GROUP>),
                GgmlType::Q4K => Self::Q8K(x86::dot_q4k::<1>, x86::dot_q4k::<GROUP>),
                GgmlType::Q5K => Self::Q8K(x86::dot_q5k::<1>, x86::dot_q5k::<GROUP>),
                _ => Self::Q8K(x86::dot_q6k::<1>, x86::dot_q6k::<GROUP>),
            };
        }
        let _ = isa;
        macro_rules! both {
            ($variant:ident, $f:path) => {
                Self::$variant(
                    |w: &[&[u8]; 1], x| portable::<_, 1>($f)(w, x),
                    |w: &[&[u8]; GROUP], x| portable::<_, GROUP>($f)(w, x),
                )
            };
        }
        match ty {
            GgmlType::Q8_0 => both!(Q8_0, dot::dot_q8_0),
            GgmlType::Q4_0 => both!(Q8_0, dot::dot_q4_0),
            GgmlType::Q5_0 => both!(Q8_0, dot::dot_q5_0),
            GgmlType::Q4K => both!(Q8K, dot::dot_q4k),
            GgmlType::Q5K => both!(Q8K, dot::dot_q5k),
            _ => both!(Q8K, dot::dot_q6k),
        }
    }
}

/// The output buffer shared by the tasks; each writes only its own columns.
struct SharedOut(*mut f32);

// SAFETY: tasks write disjoint elements (distinct columns) of a buffer that outlives them.
unsafe impl Sync for SharedOut {}

impl QuantWeight {
    /// Bytes of a row of `k` in `ty`, which must be a quantized type whose blocks divide `k`.
    fn row_len(ty: GgmlType, k: usize) -> Result<usize, QuantError> {
        if !ty.is_quantized() {
            return Err(QuantError(format!("{ty} is not a quantized type")));
        }
        ty.row_bytes(k).filter(|&r| r > 0).ok_or_else(|| {
            QuantError(format!(
                "rows of {k} are not whole {ty} blocks of {}",
                ty.block_len()
            ))
        })
    }

    /// Copies the rows of `parts` (each whole rows of `k` in `ty`), one after another.
    pub fn from_parts(ty: GgmlType, parts: &[&[u8]], k: usize) -> Result<Self, QuantError> {
        let row = Self::row_len(ty, k)?;
        if let Some(p) = parts.iter().find(|p| p.len() % row != 0) {
            return Err(QuantError(format!(
                "{} bytes are not rows of {row}",
                p.len()
            )));
        }
        // Huge pages where Linux grants them: decode streams every byte once per token, and a
        // 4 KB page per TLB entry is a miss every 4 KB.
        let mut data = u8::zeroed_vec(parts.iter().map(|p| p.len()).sum());
        let mut at = 0;
        for p in parts {
            data[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        Ok(Self {
            ty,
            n: data.len() / row,
            k,
            data,
        })
    }

    /// `x` (n × k, row-major) quantized to `ty` as llama.cpp's reference quantizer does
    /// ([`super::quantize`]), rows split over the pool.
    pub fn quantize(ty: GgmlType, x: &[f32], n: usize, k: usize) -> Result<Self, QuantError> {
        let row = Self::row_len(ty, k)?;
        if n.checked_mul(k) != Some(x.len()) {
            return Err(QuantError(format!(
                "{} values are not {n} rows of {k}",
                x.len()
            )));
        }
        let mut data = u8::zeroed_vec(n * row);
        data.par_chunks_mut(row)
            .zip(x.par_chunks(k))
            .for_each(|(out, x)| super::quantize::quantize_row(ty, x, out));
        Ok(Self { ty, n, k, data })
    }

    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    /// Output rows (n).
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Input width (k).
    pub fn cols(&self) -> usize {
        self.k
    }

    /// The rows as GGUF stores them.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    pub fn size_in_bytes(&self) -> usize {
        self.data.len()
    }

    fn row_bytes(&self) -> usize {
        self.data.len() / self.n.max(1)
    }

    /// Rows `ids` dequantized to f32, (ids, k) row-major: an embedding lookup.
    pub fn dequantize_rows(&self, ids: &[u32]) -> Result<Vec<f32>, QuantError> {
        let rb = self.row_bytes();
        let mut out = vec![0f32; ids.len() * self.k];
        for (&id, o) in ids.iter().zip(out.chunks_exact_mut(self.k)) {
            let id = id as usize;
            if id >= self.n {
                return Err(QuantError(format!("row {id} of a {}-row matrix", self.n)));
            }
            super::dequantize(self.ty, &self.data[id * rb..(id + 1) * rb], o)?;
        }
        Ok(out)
    }

    fn quantize_acts(&self, x: &[f32], m: usize, isa: Isa) -> QuantActs {
        let rows = x[..m * self.k].par_chunks(self.k);
        match self.ty {
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => QuantActs::Q8K(
                rows.map(|r| {
                    let mut q = Q8KRow::default();
                    quantize_q8k_with_isa(r, &mut q, isa);
                    q
                })
                .collect(),
            ),
            _ => QuantActs::Q8_0(
                rows.map(|r| {
                    let mut q = Q8_0Row::default();
                    quantize_q8_0_with_isa(r, &mut q, isa);
                    q
                })
                .collect(),
            ),
        }
    }

    /// `out` (m × n, row-major) = x (m × k, f32) · Wᵀ + bias, on this process's CPU path.
    pub fn matmul(&self, x: &[f32], m: usize, bias: Option<&[f32]>, out: &mut [f32]) {
        self.matmul_with_isa(cpu_isa(), x, m, bias, out)
    }

    /// [`Self::matmul`] on a given path (a path the CPU lacks falls back to the portable one).
    pub fn matmul_with_isa(
        &self,
        isa: Isa,
        x: &[f32],
        m: usize,
        bias: Option<&[f32]>,
        out: &mut [f32],
    ) {
        let (n, k) = (self.n, self.k);
        assert!(x.len() >= m * k && out.len() >= m * n && bias.is_none_or(|b| b.len() >= n));
        if m == 0 || n == 0 {
            return;
        }
        let acts = self.quantize_acts(x, m, isa);
        let dot = Dot::new(self.ty, isa);
        let tile = tile_kernel(self.ty, isa);
        let rb = self.row_bytes();
        let shared = SharedOut(out.as_mut_ptr());
        let shared = &shared;
        self.data
            .par_chunks(ROWS_PER_TASK * rb)
            .enumerate()
            .for_each(|(t, rows)| {
                let c0 = t * ROWS_PER_TASK;
                // The task's rows, on the stack (no allocation per task and matmul).
                let mut row_buf: [&[u8]; ROWS_PER_TASK] = [&[]; ROWS_PER_TASK];
                let mut count = 0;
                for (slot, row) in row_buf.iter_mut().zip(rows.chunks_exact(rb)) {
                    *slot = row;
                    count += 1;
                }
                let rows = &row_buf[..count];
                let write = |col: usize, i: usize, v: f32| {
                    // SAFETY: i < m, col < n: inside out (m × n); only this task writes
                    // column col.
                    unsafe { *shared.0.add(i * n + col) = v + bias.map_or(0.0, |b| b[col]) };
                };
                // Tiles where there are several activation rows and a tile kernel; then what
                // is left, row group by row group. The same arithmetic for every output.
                let tile_write = |col: usize, i: usize, v: f32| write(c0 + col, i, v);
                let (tiled_x, tiled_w) = match (tile, &acts) {
                    (Some(Tile::Avx2(f)), QuantActs::Q8_0(a)) if m > 1 => {
                        run_tiles(f, rows, a.as_slice(), &tile_write)
                    }
                    (Some(Tile::Vnni(f)), QuantActs::Q8_0(a)) if m > 1 => {
                        run_tiles(f, rows, a.as_slice(), &tile_write)
                    }
                    (Some(Tile::KQuant(f)), QuantActs::Q8K(a)) if m > 1 => {
                        run_tiles(f, rows, a.as_slice(), &tile_write)
                    }
                    _ => (0, 0),
                };
                for i in 0..m {
                    // What the tiles left of this activation row.
                    let first = if i < tiled_x { tiled_w } else { 0 };
                    let rest = &rows[first..];
                    let grouped = if m > 1 { rest.len() / GROUP * GROUP } else { 0 };
                    let (groups, tail) = rest.split_at(grouped);
                    // SAFETY (every call): `Dot::new` chose a path this CPU runs; each weight
                    // row is whole, and the activation rows hold k values in the matching
                    // format (`quantize_acts` follows the weight type, as `Dot::new` does).
                    for (g, group) in groups.chunks_exact(GROUP).enumerate() {
                        let w: &[&[u8]; GROUP] = group.try_into().expect("a whole group");
                        let v = unsafe {
                            match (dot, &acts) {
                                (Dot::Q8_0(_, f), QuantActs::Q8_0(a)) => f(w, &a[i]),
                                (Dot::Q8K(_, f), QuantActs::Q8K(a)) => f(w, &a[i]),
                                _ => unreachable!("activations follow the weight type"),
                            }
                        };
                        for (r, v) in v.into_iter().enumerate() {
                            write(c0 + first + g * GROUP + r, i, v);
                        }
                    }
                    for (r, w) in tail.iter().enumerate() {
                        let v = unsafe {
                            match (dot, &acts) {
                                (Dot::Q8_0(f, _), QuantActs::Q8_0(a)) => f(&[w], &a[i])[0],
                                (Dot::Q8K(f, _), QuantActs::Q8K(a)) => f(&[w], &a[i])[0],
                                _ => unreachable!("activations follow the weight type"),
                            }
                        };
                        write(c0 + first + grouped + r, i, v);
                    }
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    /// Deterministic pseudo-random bytes.
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

    /// `n` rows of random blocks of `ty` whose f16 scales are small finite values.
    fn weight(ty: GgmlType, n: usize, k: usize, seed: u64) -> QuantWeight {
        let row = ty.row_bytes(k).unwrap();
        let mut data = bytes(seed, n * row);
        let scale_at: &[usize] = match ty {
            GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
            GgmlType::Q6K => &[208],
            _ => &[0],
        };
        for (i, block) in data.chunks_exact_mut(ty.block_bytes()).enumerate() {
            for &at in scale_at {
                let v = f16::from_f32(((i * 7 + at) % 13) as f32 / 400.0 + 0.001);
                block[at..at + 2].copy_from_slice(&v.to_le_bytes());
            }
        }
        QuantWeight::from_parts(ty, &[&data], k).unwrap()
    }

    fn activations(m: usize, k: usize) -> Vec<f32> {
        bytes(99, m * k)
            .iter()
            .enumerate()
            .map(|(i, &b)| (b as f32 - 127.5) / 50.0 * if i % 97 == 0 { 8.0 } else { 1.0 })
            .collect()
    }

    const TYPES: [GgmlType; 6] = [
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q5_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];

    fn run(w: &QuantWeight, isa: Isa, x: &[f32], m: usize, bias: Option<&[f32]>) -> Vec<f32> {
        let mut out = vec![0f32; m * w.rows()];
        w.matmul_with_isa(isa, x, m, bias, &mut out);
        out
    }

    #[test]
    fn every_path_agrees_with_the_dequantized_product() {
        let (n, k, m) = (37, 512, 3);
        let x = activations(m, k);
        let bias: Vec<f32> = (0..n).map(|i| i as f32 / 10.0).collect();
        for ty in TYPES {
            let w = weight(ty, n, k, ty.block_bytes() as u64);
            let dense = w
                .dequantize_rows(&(0..n as u32).collect::<Vec<_>>())
                .unwrap();
            let portable = run(&w, Isa::Scalar, &x, m, Some(&bias));
            for i in 0..m {
                for r in 0..n {
                    let exact: f32 =
                        (0..k).map(|c| x[i * k + c] * dense[r * k + c]).sum::<f32>() + bias[r];
                    let scale: f32 = (0..k)
                        .map(|c| (x[i * k + c] * dense[r * k + c]).abs())
                        .sum();
                    let got = portable[i * n + r];
                    // 8-bit activations: within a few percent of the sum of |products|.
                    assert!(
                        (got - exact).abs() <= 0.02 * scale + 1e-4,
                        "{ty} ({i}, {r}): {got} vs {exact}"
                    );
                }
            }
            for isa in crate::supported_isas() {
                let out = run(&w, isa, &x, m, Some(&bias));
                for (a, b) in out.iter().zip(&portable) {
                    assert!(
                        (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                        "{ty} {isa}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_the_batch() {
        // k = 96: an odd number of 32-blocks; m = 9: tiles and the rows they leave.
        for (n, k, m) in [(39, 256, 5), (13, 96, 9)] {
            let x = activations(m, k);
            for ty in TYPES {
                if ty.row_bytes(k).is_none() {
                    continue;
                }
                let w = weight(ty, n, k, 7);
                for isa in crate::supported_isas() {
                    let all = run(&w, isa, &x, m, None);
                    for i in 0..m {
                        let one = run(&w, isa, &x[i * k..(i + 1) * k], 1, None);
                        assert_eq!(one[..], all[i * n..(i + 1) * n], "{ty} {isa} row {i}");
                    }
                }
            }
        }
    }

    #[test]
    fn x86_paths_agree_bit_for_bit() {
        let paths: Vec<Isa> = crate::supported_isas()
            .into_iter()
            .filter(|&i| i >= Isa::Avx2)
            .collect();
        let (n, k) = (21, 512);
        for m in [1, 7] {
            let x = activations(m, k);
            for ty in TYPES {
                let w = weight(ty, n, k, 11);
                let outs: Vec<Vec<f32>> = paths.iter().map(|&i| run(&w, i, &x, m, None)).collect();
                for (isa, out) in paths.iter().zip(&outs).skip(1) {
                    assert_eq!(out, &outs[0], "{ty} {isa} vs {} m {m}", paths[0]);
                }
            }
        }
    }

    #[test]
    fn parts_must_be_whole_rows_of_whole_blocks() {
        assert!(QuantWeight::from_parts(GgmlType::Q8_0, &[&[0; 34]], 33).is_err());
        assert!(QuantWeight::from_parts(GgmlType::Q8_0, &[&[0; 35]], 32).is_err());
        assert!(QuantWeight::from_parts(GgmlType::F16, &[&[0; 64]], 32).is_err());
        let w = QuantWeight::from_parts(GgmlType::Q8_0, &[&[0; 68], &[0; 34]], 32).unwrap();
        assert_eq!((w.rows(), w.cols(), w.size_in_bytes()), (3, 32, 102));
        assert!(w.dequantize_rows(&[3]).is_err());
    }
}
