//! Weights repacked at load for the CPU matmul, and `y = x · wᵀ` over them.
//!
//! Layout: the n rows of W (n × k) are cut into panels of 16 rows (n padded with zero rows).
//! A panel is stored k-major, so one vector load gives the weights of 16 outputs for one step of
//! k: f32 and f16 as `[k][16]`; bf16 as `[k / 2][16][2]`, the two weights of a k pair side by
//! side in one 32-bit lane, which is what `vdpbf16ps` multiplies and what a shift (even k) or a
//! mask (odd k) widens to f32 in one instruction. bf16 k is padded to even with zeros.
//!
//! The kernels are outer products: an accumulator vector holds 16 outputs of one row of x, and
//! each step of k broadcasts x and adds x · w to every lane. So every output is one sequential
//! sum over k in order (f32 FMAs; pairs of products on the `vdpbf16ps` path), whatever the
//! number of rows, the tile or the thread: batch-invariant by construction, and no horizontal
//! reductions. Paths may differ from each other in the last bits (the portable one does not fuse
//! the multiply-add; `vdpbf16ps` adds two products at a time).

mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::elem::{Store, Widen};
use crate::Isa;

/// Rows of W per panel (one AVX-512 vector of f32).
pub(crate) const PANEL: usize = 16;
/// Panels per parallel task.
const PANELS_PER_TASK: usize = 4;

/// A weight element type and its panel layout.
pub(crate) trait PanelElem: Widen + Store + Default + crate::mem::Zeroed {
    /// Whether k pairs share a 32-bit lane (bf16) or each k step is a row of 16 (f32, f16).
    const PAIRED: bool;

    /// Offset of (panel row `r`, column `c`) from the start of a panel.
    #[inline(always)]
    fn offset(r: usize, c: usize) -> usize {
        if Self::PAIRED {
            (c / 2) * 2 * PANEL + r * 2 + c % 2
        } else {
            c * PANEL + r
        }
    }

    /// k rounded up to the layout's step.
    fn padded_k(k: usize) -> usize {
        if Self::PAIRED {
            k + (k & 1)
        } else {
            k
        }
    }
}

impl PanelElem for f32 {
    const PAIRED: bool = false;
}

impl PanelElem for f16 {
    const PAIRED: bool = false;
}

impl PanelElem for bf16 {
    const PAIRED: bool = true;
}

/// Packed elements of one dtype.
#[derive(Debug, Clone, PartialEq)]
enum Data {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

/// Row-major weight rows of one dtype in host memory, in parts packed one after another.
#[derive(Debug, Clone, Copy)]
pub enum HostRows<'a> {
    F32(&'a [&'a [f32]]),
    Bf16(&'a [&'a [bf16]]),
    F16(&'a [&'a [f16]]),
}

/// A (n × k) weight matrix in the panel layout, ready for [`crate::linear_packed`].
#[derive(Debug, Clone, PartialEq)]
pub struct PackedWeight {
    n: usize,
    k: usize,
    data: Data,
}

/// Packs the rows of `parts` (each row-major, rows of `k`), one after another: n rows in all.
fn pack<T: PanelElem>(parts: &[&[T]], n: usize, k: usize) -> Vec<T> {
    let kp = T::padded_k(k);
    let panels = n.div_ceil(PANEL);
    let rows: Vec<&[T]> = parts.iter().flat_map(|p| p.chunks_exact(k)).collect();
    // Untouched zero pages (huge where granted), written once below: start-up time.
    let mut out = T::zeroed_vec(panels * PANEL * kp);
    out.par_chunks_mut(PANEL * kp)
        .enumerate()
        .for_each(|(p, panel)| {
            // Row by row: each row is read once in order, and the panel (16 rows, at most a few
            // hundred KB) stays in cache while its lanes fill. A lane holds one k step for 16
            // rows (f32, f16) or a k pair (bf16).
            let rows = &rows[p * PANEL..((p + 1) * PANEL).min(n)];
            for (r, row) in rows.iter().enumerate() {
                if T::PAIRED {
                    let mut lanes = panel.chunks_exact_mut(2 * PANEL);
                    let pairs = row.chunks_exact(2);
                    let odd = pairs.remainder();
                    // Pairs first: zip stops on them without taking the odd k's lane.
                    for (pair, lane) in pairs.zip(&mut lanes) {
                        lane[2 * r] = pair[0];
                        lane[2 * r + 1] = pair[1];
                    }
                    if let (Some(lane), [last]) = (lanes.next(), odd) {
                        lane[2 * r] = *last;
                    }
                } else {
                    for (lane, &x) in panel.chunks_exact_mut(PANEL).zip(row.iter()) {
                        lane[r] = x;
                    }
                }
            }
        });
    out
}

impl PackedWeight {
    /// Packs a (n, k) CPU tensor of f32, bf16 or f16.
    pub fn new(w: &Tensor) -> Result<Self> {
        Self::concat(&[w])
    }

    /// Packs the rows of several (n_i, k) tensors of one dtype, one after another, as one
    /// (Σ n_i, k) weight — merged projections (q/k/v, gate/up) without a concatenated copy.
    pub fn concat(parts: &[&Tensor]) -> Result<Self> {
        let Some(first) = parts.first() else {
            candle_core::bail!("packed weights: nothing to pack");
        };
        let (dtype, k) = (first.dtype(), first.dims2()?.1);
        let mut held = Vec::with_capacity(parts.len());
        for w in parts {
            let (_, cols) = w.dims2()?;
            if cols != k || w.dtype() != dtype {
                candle_core::bail!(
                    "packed weights: parts {:?} {:?} and {:?} {:?} differ",
                    first.shape(),
                    dtype,
                    w.shape(),
                    w.dtype()
                );
            }
            held.push(w.to_device(&Device::Cpu)?.contiguous()?);
        }
        // Read the tensors' storage in place: loading copies no weight more than it must.
        let guards: Vec<_> = held.iter().map(|w| w.storage_and_layout()).collect();
        let mut ranges = Vec::with_capacity(guards.len());
        for (_, layout) in &guards {
            let Some(range) = layout.contiguous_offsets() else {
                candle_core::bail!("packed weights: a tensor is not contiguous");
            };
            ranges.push(range);
        }
        macro_rules! slices {
            ($variant:ident) => {{
                let mut out = Vec::with_capacity(guards.len());
                for ((storage, _), &(start, end)) in guards.iter().zip(&ranges) {
                    match &**storage {
                        Storage::Cpu(CpuStorage::$variant(v)) => out.push(&v[start..end]),
                        _ => candle_core::bail!("packed weights: mixed storage"),
                    }
                }
                out
            }};
        }
        match dtype {
            DType::F32 => Self::from_host(HostRows::F32(&slices!(F32)), k),
            DType::BF16 => Self::from_host(HostRows::Bf16(&slices!(BF16)), k),
            DType::F16 => Self::from_host(HostRows::F16(&slices!(F16)), k),
            other => candle_core::bail!("packed weights: unsupported dtype {other:?}"),
        }
    }

    /// Packs row-major rows of `k` held in host memory (a memory-mapped checkpoint, say), the
    /// parts' rows one after another: the packed panels are the only memory written.
    pub fn from_host(parts: HostRows<'_>, k: usize) -> Result<Self> {
        fn rows<T>(parts: &[&[T]], k: usize) -> Result<usize> {
            if k == 0 || parts.is_empty() {
                candle_core::bail!("packed weights: nothing to pack");
            }
            let mut n = 0;
            for part in parts {
                if part.len() % k != 0 {
                    candle_core::bail!("packed weights: {} elements in rows of {k}", part.len());
                }
                n += part.len() / k;
            }
            Ok(n)
        }
        let (n, data) = match parts {
            HostRows::F32(p) => {
                let n = rows(p, k)?;
                (n, Data::F32(pack(p, n, k)))
            }
            HostRows::Bf16(p) => {
                let n = rows(p, k)?;
                (n, Data::Bf16(pack(p, n, k)))
            }
            HostRows::F16(p) => {
                let n = rows(p, k)?;
                (n, Data::F16(pack(p, n, k)))
            }
        };
        Ok(Self { n, k, data })
    }

    /// Output rows (n).
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Input width (k).
    pub fn cols(&self) -> usize {
        self.k
    }

    pub fn dtype(&self) -> DType {
        match self.data {
            Data::F32(_) => DType::F32,
            Data::Bf16(_) => DType::BF16,
            Data::F16(_) => DType::F16,
        }
    }

    /// Bytes held.
    pub fn size_in_bytes(&self) -> usize {
        match &self.data {
            Data::F32(v) => v.len() * 4,
            Data::Bf16(v) => v.len() * 2,
            Data::F16(v) => v.len() * 2,
        }
    }

    /// Rows `ids` of W, (ids, k) in W's dtype: an embedding lookup on a tied lm_head.
    pub fn gather_rows(&self, ids: &[u32]) -> Result<Tensor> {
        fn gather<T: PanelElem + candle_core::WithDType>(
            data: &[T],
            n: usize,
            k: usize,
            ids: &[u32],
        ) -> Result<Tensor> {
            let panel_len = PANEL * T::padded_k(k);
            let mut out = Vec::with_capacity(ids.len() * k);
            for &id in ids {
                let id = id as usize;
                if id >= n {
                    candle_core::bail!("row {id} of a {n}-row matrix");
                }
                let panel = &data[id / PANEL * panel_len..][..panel_len];
                out.extend((0..k).map(|c| panel[T::offset(id % PANEL, c)]));
            }
            Tensor::from_vec(out, (ids.len(), k), &Device::Cpu)
        }
        match &self.data {
            Data::F32(d) => gather(d, self.n, self.k, ids),
            Data::Bf16(d) => gather(d, self.n, self.k, ids),
            Data::F16(d) => gather(d, self.n, self.k, ids),
        }
    }

    /// `out` (m × n) = x (m × k) · Wᵀ + bias on the path `isa` allows: x widened to f32, or on
    /// the `vdpbf16ps` path (bf16 weights) rounded to bf16, for every m alike (batch
    /// invariance).
    pub(crate) fn matmul<O: Store>(
        &self,
        isa: Isa,
        x: Activations,
        m: usize,
        bias: Option<&[f32]>,
        out: &mut [O],
    ) {
        let dims = Dims {
            m,
            n: self.n,
            k: self.k,
        };
        match &self.data {
            Data::F32(w) => run_f32(isa, &x.to_f32(), w, dims, bias, out),
            Data::F16(w) => run_f32(isa, &x.to_f32(), w, dims, bias, out),
            Data::Bf16(w) => {
                #[cfg(target_arch = "x86_64")]
                if isa >= Isa::Avx512Bf16 {
                    if let Some(kernel) = x86::Dpbf16::new() {
                        return run(kernel, &x.to_bf16(), w, dims, bias, out);
                    }
                }
                run_f32(isa, &x.to_f32(), w, dims, bias, out)
            }
        }
    }
}

/// The rows of x as the caller has them.
pub(crate) enum Activations<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
}

impl Activations<'_> {
    /// The rows rounded to bf16 (nearest, ties to even) for the `vdpbf16ps` path.
    #[cfg(target_arch = "x86_64")]
    fn to_bf16(&self) -> std::borrow::Cow<'_, [bf16]> {
        match self {
            Activations::Bf16(x) => std::borrow::Cow::Borrowed(x),
            Activations::F32(x) => x.iter().map(|&v| bf16::from_f32(v)).collect(),
            Activations::F16(x) => x.iter().map(|v| bf16::from_f32(v.widen())).collect(),
        }
    }

    fn to_f32(&self) -> std::borrow::Cow<'_, [f32]> {
        match self {
            Activations::F32(x) => std::borrow::Cow::Borrowed(x),
            Activations::Bf16(x) => x.iter().map(|v| v.widen()).collect(),
            Activations::F16(x) => x.iter().map(|v| v.widen()).collect(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

/// One kernel family over panels. A value is only made where the CPU supports the family.
pub(crate) trait Kernel: Copy + Send + Sync {
    type X: Copy + Send + Sync;
    type W: PanelElem;

    /// Every row of x (m × k) against the panels in `w` (whole panels, k padded as the layout
    /// says): `emit(i, r, values)` for row i of x and rows r.. of W (counted from the first
    /// panel), a run of consecutive outputs.
    fn task<F: FnMut(usize, usize, &[f32])>(
        self,
        x: &[Self::X],
        m: usize,
        w: &[Self::W],
        k: usize,
        emit: F,
    );
}

/// The output buffer shared by the tasks; each task writes only its own columns.
struct SharedOut<O>(*mut O);

// SAFETY: tasks write disjoint elements (distinct columns) of a buffer that outlives them.
unsafe impl<O: Send> Sync for SharedOut<O> {}

/// What a weight type must offer every family of this architecture.
#[cfg(target_arch = "x86_64")]
pub(crate) trait Weight: x86::PanelLoad {}
#[cfg(target_arch = "x86_64")]
impl<T: x86::PanelLoad> Weight for T {}
#[cfg(not(target_arch = "x86_64"))]
pub(crate) trait Weight: PanelElem {}
#[cfg(not(target_arch = "x86_64"))]
impl<T: PanelElem> Weight for T {}

fn run_f32<W: Weight, O: Store>(
    isa: Isa,
    x: &[f32],
    w: &[W],
    dims: Dims,
    bias: Option<&[f32]>,
    out: &mut [O],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if isa >= Isa::Avx512 {
            if let Some(kernel) = x86::Avx512::<W>::new() {
                return run(kernel, x, w, dims, bias, out);
            }
        }
        if isa >= Isa::Avx2 {
            if let Some(kernel) = x86::Avx2::<W>::new() {
                return run(kernel, x, w, dims, bias, out);
            }
        }
    }
    let _ = isa;
    run(scalar::Scalar::<W>::new(), x, w, dims, bias, out)
}

/// Splits the product into tasks of [`PANELS_PER_TASK`] panels on the rayon pool.
fn run<K: Kernel, O: Store>(
    kernel: K,
    x: &[K::X],
    w: &[K::W],
    Dims { m, n, k }: Dims,
    bias: Option<&[f32]>,
    out: &mut [O],
) {
    let panel_len = PANEL * K::W::padded_k(k);
    assert!(x.len() >= m * k && out.len() >= m * n && w.len() >= n.div_ceil(PANEL) * panel_len);
    assert!(bias.is_none_or(|b| b.len() >= n));
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for (i, o) in out[..m * n].iter_mut().enumerate() {
            *o = O::from_f32(bias.map_or(0.0, |b| b[i % n]));
        }
        return;
    }
    let shared = SharedOut(out.as_mut_ptr());
    let shared = &shared;
    w[..n.div_ceil(PANEL) * panel_len]
        .par_chunks(PANELS_PER_TASK * panel_len)
        .enumerate()
        .for_each(|(t, panels)| {
            let r0 = t * PANELS_PER_TASK * PANEL;
            kernel.task(&x[..m * k], m, panels, k, |i, r, values| {
                let col = r0 + r;
                if col >= n || i >= m {
                    return;
                }
                let len = values.len().min(n - col);
                // SAFETY: i < m and col + len <= n, so the run is inside `out` (checked above);
                // only the task owning rows col..col+len of W writes those columns, so no two
                // live slices overlap.
                let dst = unsafe { std::slice::from_raw_parts_mut(shared.0.add(i * n + col), len) };
                match bias {
                    Some(b) => {
                        for ((d, v), b) in dst.iter_mut().zip(values).zip(&b[col..col + len]) {
                            *d = O::from_f32(v + b);
                        }
                    }
                    None => {
                        for (d, v) in dst.iter_mut().zip(values) {
                            *d = O::from_f32(*v);
                        }
                    }
                }
            });
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows `ids` gathered back from `packed`, in f32.
    fn gathered(packed: &PackedWeight, ids: &[u32]) -> Vec<Vec<f32>> {
        packed
            .gather_rows(ids)
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.to_vec2::<f32>())
            .expect("gathered rows")
    }

    /// Parts packed one after another hold every row where the concatenated tensor would
    /// (19 + 6 rows: the second part starts inside a panel).
    #[test]
    fn concatenated_parts_pack_as_one_weight() {
        let k = 7;
        let a: Vec<f32> = (0..19 * k).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..6 * k).map(|i| -(i as f32) - 1.0).collect();
        let ta = Tensor::from_vec(a.clone(), (19, k), &Device::Cpu).unwrap();
        let tb = Tensor::from_vec(b.clone(), (6, k), &Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let (ta, tb) = (ta.to_dtype(dtype).unwrap(), tb.to_dtype(dtype).unwrap());
            let packed = PackedWeight::concat(&[&ta, &tb]).unwrap();
            assert_eq!((packed.rows(), packed.cols()), (25, k));
            let ids: Vec<u32> = (0..25).collect();
            let got = gathered(&packed, &ids);
            for (r, row) in got.iter().enumerate() {
                let want = if r < 19 {
                    &a[r * k..(r + 1) * k]
                } else {
                    &b[(r - 19) * k..(r - 18) * k]
                };
                assert_eq!(row[..], want[..], "{dtype:?} row {r}");
            }
            let narrow = Tensor::zeros((2, k + 1), dtype, &Device::Cpu).unwrap();
            assert!(PackedWeight::concat(&[&ta, &narrow]).is_err());
        }
        assert!(PackedWeight::concat(&[]).is_err());
    }

    #[test]
    fn layouts_put_each_weight_once_and_gather_back() {
        let (n, k) = (19, 7);
        let w: Vec<f32> = (0..n * k).map(|i| i as f32).collect();
        let t = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let packed = PackedWeight::new(&t.to_dtype(dtype).unwrap()).unwrap();
            assert_eq!(
                (packed.rows(), packed.cols(), packed.dtype()),
                (n, k, dtype)
            );
            let ids: Vec<u32> = vec![18, 0, 5, 16];
            let got = gathered(&packed, &ids);
            for (row, &id) in got.iter().zip(&ids) {
                assert_eq!(
                    row[..],
                    w[id as usize * k..(id as usize + 1) * k],
                    "{dtype:?}"
                );
            }
            assert!(packed.gather_rows(&[19]).is_err());
        }
    }
}
