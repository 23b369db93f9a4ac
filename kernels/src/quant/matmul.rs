//! `y = x · Wᵀ` for quantized W, in ggml's arithmetic: each row of x is quantized once per
//! matmul (Q8_0 or Q8_K, [`super::act`]) and every output is one weight row's integer dot
//! products with it, block by block, times the blocks' scales. The 32-weight types (Q8_0,
//! Q4_0, Q5_0) are repacked at load into interleaved groups of 16 rows
//! ([`super::interleave`]); the k-quants keep GGUF's rows ([`super::dot`]). Work is split over
//! the pool by weight rows. An output depends only on its own row of x and its row of W, so
//! results are batch-invariant.

use rayon::prelude::*;

use super::act::{quantize_q8_0_with_isa, quantize_q8k_with_isa, Q8KRow, Q8_0Row};
use super::interleave::{group_portable, GroupFn, Groups, Kind, LANES};
use super::{dot, GgmlType, QuantError};
use crate::{cpu_isa, Isa, Zeroed};

/// Weight rows per parallel task (k-quants).
const ROWS_PER_TASK: usize = 16;

/// A (n × k) matrix of quantized rows.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantWeight {
    ty: GgmlType,
    n: usize,
    k: usize,
    data: Storage,
}

#[derive(Debug, Clone, PartialEq)]
enum Storage {
    /// The k-quants: rows as GGUF stores them (row r's blocks one after another).
    Rows(Vec<u8>),
    /// The 32-weight types, interleaved.
    Groups(Groups),
}

/// Activation rows quantized for a matmul ([`QuantWeight::quantize_input`]).
pub struct Activations {
    isa: Isa,
    k: usize,
    rows: ActRows,
}

enum ActRows {
    /// For the 32-weight types.
    Q8_0(Vec<Q8_0Row>),
    /// For the k-quants.
    Q8K(Vec<Q8KRow>),
}

impl Activations {
    /// Whether `w` multiplies these rows (its activation format and width).
    pub fn fits(&self, w: &QuantWeight) -> bool {
        let format = matches!(
            (&self.rows, &w.data),
            (ActRows::Q8_0(_), Storage::Groups(_)) | (ActRows::Q8K(_), Storage::Rows(_))
        );
        format && self.k == w.k
    }

    fn rows(&self) -> usize {
        match &self.rows {
            ActRows::Q8_0(r) => r.len(),
            ActRows::Q8K(r) => r.len(),
        }
    }
}

/// A dot product of `R` weight rows with one activation row.
type Rows<const R: usize> = unsafe fn(&[&[u8]; R], &Q8KRow) -> [f32; R];

/// A k-quant's dot products on a path (one row, and [`GROUP`] rows sharing each activation
/// load): only made where the CPU runs it.
#[derive(Clone, Copy)]
struct Dot(Rows<1>, Rows<GROUP>);

/// Tile shape of the k-quants (Q4_K/Q5_K/Q6_K against Q8_K rows) on the AVX-512 paths.
pub(super) const KQUANT_TILE: (usize, usize) = (2, 4);

/// A tile kernel: `W` weight rows against `X` activation rows.
type TileFn<const W: usize, const X: usize> =
    unsafe fn(&[&[u8]; W], &[&Q8KRow; X]) -> [[f32; W]; X];
type KTile = TileFn<{ KQUANT_TILE.0 }, { KQUANT_TILE.1 }>;

/// Runs `f` over every whole tile of `rows` (weight rows) × `acts` (activation rows), writing
/// each result through `write(column, activation row, value)`; returns how many activation rows
/// and weight rows the tiles covered.
fn run_tiles<const W: usize, const X: usize>(
    f: TileFn<W, X>,
    rows: &[&[u8]],
    acts: &[Q8KRow],
    write: &impl Fn(usize, usize, f32),
) -> (usize, usize) {
    let (tiled_x, tiled_w) = (acts.len() / X * X, rows.len() / W * W);
    for i0 in (0..tiled_x).step_by(X) {
        let x: [&Q8KRow; X] = std::array::from_fn(|i| &acts[i0 + i]);
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

/// Whether the 32-weight kernels use AVX-512 VNNI's `vpdpbusd`: on the AVX-512 paths of a CPU
/// that has it. The integers are the AVX2 path's, so are the results.
#[cfg(target_arch = "x86_64")]
fn vnni(isa: Isa) -> bool {
    isa >= Isa::Avx512 && isa.is_supported() && std::arch::is_x86_feature_detected!("avx512vnni")
}

/// The k-quant tile kernel on a path, where there is one.
fn tile_kernel(ty: GgmlType, isa: Isa) -> Option<KTile> {
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx512 && isa.is_supported() {
        use super::x86;
        return match ty {
            GgmlType::Q4K => Some(x86::tile_q4k),
            GgmlType::Q5K => Some(x86::tile_q5k),
            GgmlType::Q6K => Some(x86::tile_q6k),
            _ => None,
        };
    }
    let _ = (ty, isa);
    None
}

/// Widest tile of the group kernels (activation rows per call).
const MAX_TILE: usize = 8;

/// The group kernels of a 32-weight type on a path, widest first, the last of width 1.
fn group_kernels(kind: Kind, isa: Isa) -> &'static [(usize, GroupFn)] {
    #[cfg(target_arch = "x86_64")]
    {
        use super::x86::*;
        if vnni(isa) {
            return match kind.ty {
                GgmlType::Q8_0 => &[
                    (8, group_q8_0_vnni::<8> as GroupFn),
                    (4, group_q8_0_vnni::<4>),
                    (1, group_q8_0_vnni::<1>),
                ],
                GgmlType::Q4_0 => &[
                    (8, group_q4_0_vnni::<8> as GroupFn),
                    (4, group_q4_0_vnni::<4>),
                    (1, group_q4_0_vnni::<1>),
                ],
                _ => &[
                    (8, group_q5_0_vnni::<8> as GroupFn),
                    (4, group_q5_0_vnni::<4>),
                    (1, group_q5_0_vnni::<1>),
                ],
            };
        }
        if isa >= Isa::Avx2 && isa.is_supported() {
            return match kind.ty {
                GgmlType::Q8_0 => &[
                    (4, group_q8_0_avx2::<4> as GroupFn),
                    (1, group_q8_0_avx2::<1>),
                ],
                GgmlType::Q4_0 => &[
                    (4, group_q4_0_avx2::<4> as GroupFn),
                    (1, group_q4_0_avx2::<1>),
                ],
                _ => &[
                    (4, group_q5_0_avx2::<4> as GroupFn),
                    (1, group_q5_0_avx2::<1>),
                ],
            };
        }
    }
    let _ = (kind, isa);
    &[(1, group_portable as GroupFn)]
}

/// Weight rows dotted together when several activation rows reuse them (independent
/// accumulators, one activation load). A single activation row streams one weight row at a
/// time instead: four rows read side by side are four streams, which the hardware prefetcher
/// follows worse than one. A row's arithmetic is the same either way.
const GROUP: usize = 4;

/// The portable dots as `R`-row functions.
fn portable<const R: usize>(
    f: fn(&[u8], &Q8KRow) -> f32,
) -> impl Fn(&[&[u8]; R], &Q8KRow) -> [f32; R] {
    move |w, x| std::array::from_fn(|r| f(w[r], x))
}

impl Dot {
    fn new(ty: GgmlType, isa: Isa) -> Self {
        #[cfg(target_arch = "x86_64")]
        if isa >= Isa::Avx2 && isa.is_supported() {
            use super::x86;
            return match ty {
                GgmlType::Q4K => Self(x86::dot_q4k::<1>, x86::dot_q4k::<GROUP>),
                GgmlType::Q5K => Self(x86::dot_q5k::<1>, x86::dot_q5k::<GROUP>),
                _ => Self(x86::dot_q6k::<1>, x86::dot_q6k::<GROUP>),
            };
        }
        let _ = isa;
        macro_rules! both {
            ($f:path) => {
                Self(
                    |w: &[&[u8]; 1], x| portable::<1>($f)(w, x),
                    |w: &[&[u8]; GROUP], x| portable::<GROUP>($f)(w, x),
                )
            };
        }
        match ty {
            GgmlType::Q4K => both!(dot::dot_q4k),
            GgmlType::Q5K => both!(dot::dot_q5k),
            _ => both!(dot::dot_q6k),
        }
    }
}

/// The output buffer shared by the tasks; each writes only its own columns.
struct SharedOut(*mut f32);

// SAFETY: tasks write disjoint elements (distinct columns) of a buffer that outlives them.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// out[i][col] = v + bias[col].
    ///
    /// # Safety
    /// i < m and col < n of the (m × n) buffer, and no other task writes column `col`.
    #[inline(always)]
    unsafe fn write(&self, n: usize, bias: Option<&[f32]>, col: usize, i: usize, v: f32) {
        // SAFETY: per the caller.
        unsafe { *self.0.add(i * n + col) = v + bias.map_or(0.0, |b| b[col]) };
    }
}

impl QuantWeight {
    /// Bytes of a row of `k` in `ty`, which must be a type Ember multiplies by, whose blocks
    /// divide `k`.
    fn row_len(ty: GgmlType, k: usize) -> Result<usize, QuantError> {
        let runs =
            Kind::of(ty).is_some() || matches!(ty, GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K);
        if !runs {
            return Err(QuantError(format!("{ty} has no quantized matmul")));
        }
        ty.row_bytes(k).filter(|&r| r > 0).ok_or_else(|| {
            QuantError(format!(
                "rows of {k} are not whole {ty} blocks of {}",
                ty.block_len()
            ))
        })
    }

    /// Copies the rows of `parts` (each whole rows of `k` in `ty`), one after another
    /// (interleaved, for the 32-weight types).
    pub fn from_parts(ty: GgmlType, parts: &[&[u8]], k: usize) -> Result<Self, QuantError> {
        let row = Self::row_len(ty, k)?;
        if let Some(p) = parts.iter().find(|p| p.len() % row != 0) {
            return Err(QuantError(format!(
                "{} bytes are not rows of {row}",
                p.len()
            )));
        }
        let n = parts.iter().map(|p| p.len() / row).sum();
        let data = match Kind::of(ty) {
            Some(kind) => {
                let rows: Vec<&[u8]> = parts.iter().flat_map(|p| p.chunks_exact(row)).collect();
                Storage::Groups(Groups::pack(kind, k / 32, n, |i| rows[i]))
            }
            None => {
                // Huge pages where Linux grants them: decode streams every byte once per token,
                // and a 4 KB page per TLB entry is a miss every 4 KB.
                let mut data = u8::zeroed_vec(n * row);
                let mut at = 0;
                for p in parts {
                    data[at..at + p.len()].copy_from_slice(p);
                    at += p.len();
                }
                Storage::Rows(data)
            }
        };
        Ok(Self { ty, n, k, data })
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
        let data = match Kind::of(ty) {
            Some(kind) => Storage::Groups(Groups::build(kind, k / 32, n, |g, group| {
                let rows = g * LANES..n.min((g + 1) * LANES);
                let mut buf = vec![0u8; rows.len() * row];
                for (out, r) in buf.chunks_exact_mut(row).zip(rows) {
                    super::quantize::quantize_row(ty, &x[r * k..(r + 1) * k], out);
                }
                let rows: Vec<&[u8]> = buf.chunks_exact(row).collect();
                kind.pack(&rows, k / 32, group);
            })),
            None => {
                let mut data = u8::zeroed_vec(n * row);
                data.par_chunks_mut(row)
                    .zip(x.par_chunks(k))
                    .for_each(|(out, x)| super::quantize::quantize_row(ty, x, out));
                Storage::Rows(data)
            }
        };
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

    /// The rows as GGUF stores them (a copy; interleaved matrices are unpacked).
    pub fn gguf_bytes(&self) -> Vec<u8> {
        match &self.data {
            Storage::Rows(d) => d.clone(),
            Storage::Groups(g) => (0..self.n).flat_map(|r| g.gguf_row(r)).collect(),
        }
    }

    /// Bytes of the quantized rows as GGUF counts them (an interleaved matrix holds the same
    /// bytes, plus padding to whole groups of 16 rows and to 64 bytes a group).
    pub fn size_in_bytes(&self) -> usize {
        self.ty.row_bytes(self.k).unwrap_or(0) * self.n
    }

    /// Rows `ids` dequantized to f32, (ids, k) row-major: an embedding lookup.
    pub fn dequantize_rows(&self, ids: &[u32]) -> Result<Vec<f32>, QuantError> {
        let mut out = vec![0f32; ids.len() * self.k];
        for (&id, o) in ids.iter().zip(out.chunks_exact_mut(self.k)) {
            let id = id as usize;
            if id >= self.n {
                return Err(QuantError(format!("row {id} of a {}-row matrix", self.n)));
            }
            match &self.data {
                Storage::Rows(d) => {
                    let rb = d.len() / self.n;
                    super::dequantize(self.ty, &d[id * rb..(id + 1) * rb], o)?
                }
                Storage::Groups(g) => super::dequantize(self.ty, &g.gguf_row(id), o)?,
            }
        }
        Ok(out)
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
        let acts = self.quantize_input(isa, x, m);
        self.matmul_quantized(&acts, bias, out)
            .expect("activations quantized for these weights");
    }

    /// The m rows of `x` (m × k) in this matrix's activation format, on path `isa`: what
    /// [`Self::matmul_quantized`] takes. Every matrix of the same [`Activations::fits`] kind and
    /// width can reuse them (the parts of a fused q/k/v or gate/up).
    pub fn quantize_input(&self, isa: Isa, x: &[f32], m: usize) -> Activations {
        let k = self.k;
        assert!(x.len() >= m * k, "x holds m rows of k");
        let rows = x[..m * k].par_chunks(k);
        let rows = match &self.data {
            Storage::Groups(_) => ActRows::Q8_0(
                rows.map(|r| {
                    let mut q = Q8_0Row::default();
                    quantize_q8_0_with_isa(r, &mut q, isa);
                    q
                })
                .collect(),
            ),
            Storage::Rows(_) => ActRows::Q8K(
                rows.map(|r| {
                    let mut q = Q8KRow::default();
                    quantize_q8k_with_isa(r, &mut q, isa);
                    q
                })
                .collect(),
            ),
        };
        Activations { isa, k, rows }
    }

    /// `out` (m × n) = the activations · Wᵀ + bias, on the path they were quantized on; an
    /// error if they are not in this matrix's format and width.
    pub fn matmul_quantized(
        &self,
        acts: &Activations,
        bias: Option<&[f32]>,
        out: &mut [f32],
    ) -> Result<(), QuantError> {
        if !acts.fits(self) {
            return Err(QuantError(format!(
                "activations of width {} do not fit a {} matrix of width {}",
                acts.k, self.ty, self.k
            )));
        }
        let (n, m) = (self.n, acts.rows());
        assert!(out.len() >= m * n && bias.is_none_or(|b| b.len() >= n));
        if m == 0 || n == 0 {
            return Ok(());
        }
        let shared = SharedOut(out.as_mut_ptr());
        match (&self.data, &acts.rows) {
            (Storage::Groups(g), ActRows::Q8_0(a)) => {
                self.matmul_groups(g, acts.isa, a, bias, &shared)
            }
            (Storage::Rows(data), ActRows::Q8K(a)) => {
                self.matmul_rows(data, acts.isa, a, bias, &shared)
            }
            _ => unreachable!("fits() checked the format"),
        }
        Ok(())
    }

    /// The interleaved path: a task per group, its activation rows in the widest tiles the
    /// path has, then narrower ones.
    fn matmul_groups(
        &self,
        g: &Groups,
        isa: Isa,
        acts: &[Q8_0Row],
        bias: Option<&[f32]>,
        out: &SharedOut,
    ) {
        let (n, m, nb) = (self.n, acts.len(), g.nb);
        assert!(acts
            .iter()
            .all(|a| a.d.len() == nb && a.s.len() == nb && a.q.len() == 32 * nb));
        let kernels = group_kernels(g.kind, isa);
        let gb = g.kind.group_bytes(nb);
        g.bytes()
            .par_chunks(gb)
            .enumerate()
            .for_each(|(gi, group)| {
                let r0 = gi * LANES;
                let valid = LANES.min(n - r0);
                let mut tile = [[0f32; LANES]; MAX_TILE];
                let mut i = 0;
                for &(width, f) in kernels {
                    while m - i >= width {
                        // SAFETY: `group_kernels` chose kernels this CPU runs; the group is whole
                        // (gb bytes of nb blocks) and the activation rows hold nb blocks (asserted).
                        unsafe { f(g.kind, nb, group, &acts[i..i + width], &mut tile[..width]) };
                        for (t, lanes) in tile[..width].iter().enumerate() {
                            for (r, &v) in lanes[..valid].iter().enumerate() {
                                // SAFETY: row i + t < m, column r0 + r < n: this group's own.
                                unsafe { out.write(n, bias, r0 + r, i + t, v) };
                            }
                        }
                        i += width;
                    }
                }
            });
    }

    /// The k-quant path: tiles where there are several activation rows and a tile kernel; then
    /// what is left, row group by row group. The same arithmetic for every output.
    fn matmul_rows(
        &self,
        data: &[u8],
        isa: Isa,
        acts: &[Q8KRow],
        bias: Option<&[f32]>,
        out: &SharedOut,
    ) {
        let (n, m) = (self.n, acts.len());
        let rb = data.len() / n;
        let dot = Dot::new(self.ty, isa);
        let tile = tile_kernel(self.ty, isa);
        data.par_chunks(ROWS_PER_TASK * rb)
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
                // SAFETY (every write): i < m, col < n; only this task writes its columns.
                let write = |col: usize, i: usize, v: f32| unsafe { out.write(n, bias, col, i, v) };
                let tile_write = |col: usize, i: usize, v: f32| write(c0 + col, i, v);
                let (tiled_x, tiled_w) = match tile {
                    Some(f) if m > 1 => run_tiles(f, rows, acts, &tile_write),
                    _ => (0, 0),
                };
                for (i, a) in acts.iter().enumerate() {
                    // What the tiles left of this activation row.
                    let first = if i < tiled_x { tiled_w } else { 0 };
                    let rest = &rows[first..];
                    let grouped = if m > 1 { rest.len() / GROUP * GROUP } else { 0 };
                    let (groups, tail) = rest.split_at(grouped);
                    // SAFETY (every call): `Dot::new` chose a path this CPU runs; each weight
                    // row is whole, and the activation rows hold k values in Q8_K.
                    for (g, group) in groups.chunks_exact(GROUP).enumerate() {
                        let w: &[&[u8]; GROUP] = group.try_into().expect("a whole group");
                        let v = unsafe { (dot.1)(w, a) };
                        for (r, v) in v.into_iter().enumerate() {
                            write(c0 + first + g * GROUP + r, i, v);
                        }
                    }
                    for (r, w) in tail.iter().enumerate() {
                        let v = unsafe { (dot.0)(&[w], a)[0] };
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
    fn interleaved_kernels_agree_bit_for_bit_with_the_portable_one() {
        // n = 37: a padded last group; m = 13: tiles of 8, 4 and 1 on the VNNI path.
        let (n, k) = (37, 96);
        for m in [1, 13] {
            let x = activations(m, k);
            for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q5_0] {
                let w = weight(ty, n, k, 5);
                let portable = run(&w, Isa::Scalar, &x, m, None);
                for isa in crate::supported_isas() {
                    assert_eq!(run(&w, isa, &x, m, None), portable, "{ty} {isa} m {m}");
                }
            }
        }
    }

    #[test]
    fn activations_quantized_once_serve_every_matrix_of_their_format() {
        let (k, m) = (256, 3);
        let x = activations(m, k);
        let q5 = weight(GgmlType::Q5_0, 20, k, 1);
        let q8 = weight(GgmlType::Q8_0, 7, k, 2);
        let q4k = weight(GgmlType::Q4K, 9, k, 3);
        for isa in crate::supported_isas() {
            let acts = q5.quantize_input(isa, &x, m);
            for w in [&q5, &q8] {
                assert!(acts.fits(w));
                let mut shared = vec![0f32; m * w.rows()];
                w.matmul_quantized(&acts, None, &mut shared).unwrap();
                assert_eq!(shared, run(w, isa, &x, m, None), "{} {isa}", w.ty());
            }
            // Another format, or another width, is refused rather than misread.
            let mut out = vec![0f32; m * q4k.rows()];
            assert!(!acts.fits(&q4k));
            assert!(q4k.matmul_quantized(&acts, None, &mut out).is_err());
            let narrow = weight(GgmlType::Q8_0, 4, 128, 4);
            assert!(!acts.fits(&narrow));
        }
    }

    #[test]
    fn interleaving_keeps_the_rows() {
        // Rows read back (embedding lookups) as the GGUF bytes dequantize.
        for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q5_0] {
            let (n, k) = (19, 64);
            let row = ty.row_bytes(k).unwrap();
            let raw = bytes(3, n * row);
            let w = QuantWeight::from_parts(ty, &[&raw[..5 * row], &raw[5 * row..]], k).unwrap();
            let got = w.dequantize_rows(&[0, 18, 7]).unwrap();
            for (j, &r) in [0usize, 18, 7].iter().enumerate() {
                let mut want = vec![0f32; k];
                crate::dequantize(ty, &raw[r * row..(r + 1) * row], &mut want).unwrap();
                let same = want
                    .iter()
                    .zip(&got[j * k..(j + 1) * k])
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{ty} row {r}");
            }
        }
    }

    #[test]
    fn parts_must_be_whole_rows_of_whole_blocks() {
        assert!(QuantWeight::from_parts(GgmlType::Q8_0, &[&[0; 34]], 33).is_err());
        assert!(QuantWeight::from_parts(GgmlType::Q8_0, &[&[0; 35]], 32).is_err());
        assert!(QuantWeight::from_parts(GgmlType::F16, &[&[0; 64]], 32).is_err());
        // Types without a matmul are refused by name.
        let e = QuantWeight::from_parts(GgmlType::Q4_1, &[&[0; 20]], 32).unwrap_err();
        assert!(e.to_string().contains("q4_1"), "{e}");
        let w = QuantWeight::from_parts(GgmlType::Q8_0, &[&[0; 68], &[0; 34]], 32).unwrap();
        assert_eq!((w.rows(), w.cols(), w.size_in_bytes()), (3, 32, 102));
        assert!(w.dequantize_rows(&[3]).is_err());
    }
}
