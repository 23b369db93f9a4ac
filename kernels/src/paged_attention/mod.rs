//! Causal attention over a paged KV cache, read where it lies. Keys and values of a layer live
//! in (slots, kv_heads · head_dim) tensors; token p of a sequence is in slot
//! `table[p / block_size] · block_size + p % block_size`. Each step's queries of several
//! sequences come as one (tokens, heads, head_dim) tensor.
//!
//! One work item = one query token × one kv head: the query heads sharing that kv head are
//! computed together, so each key and value row is loaded once for the whole group. Items run
//! in parallel on the rayon pool (decode: sequences × kv heads; prefill: tokens × kv heads).
//!
//! Batch invariance: for each (query, head) the arithmetic is fixed by its position alone —
//! scores over keys 0..=p in order, an exact max, exp and sum in order, then the weighted sum of
//! values in order, in f32 — so a token gets the same bits whatever else is in the batch and
//! however its prompt was chunked. Paths ([`crate::Isa`]) differ only in the dot product's lanes.

use std::cell::RefCell;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::elem::{contiguous, Store, Widen};
use crate::KvLayout;
use crate::{cpu_isa, Isa};

/// One sequence's share of the step.
#[derive(Debug, Clone, Copy)]
pub struct PagedSeq<'a> {
    /// Tokens already in the cache before this step (the position of the first query).
    pub start_pos: usize,
    /// Queries of this sequence in this step; their keys and values are already written.
    pub num_tokens: usize,
    /// Cache blocks of the sequence, in position order.
    pub block_table: &'a [u32],
}

/// The geometry shared by every item of one call.
#[derive(Clone, Copy)]
struct Shape4 {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    scale: f32,
    /// Keys in [`KvLayout::Columns`] (values are always rows).
    key_columns: bool,
}

/// Row operations of one instruction-set path over a cache element type `T`.
trait RowOps<T> {
    /// `Σ q[i] · k[i]` over `d` elements.
    ///
    /// # Safety
    /// `q` and `k` point to `d` readable elements; the path's CPU features are enabled.
    unsafe fn dot(q: *const f32, k: *const T, d: usize) -> f32;
    /// `o[i] += p · v[i]` over `d` elements.
    ///
    /// # Safety
    /// `o` points to `d` writable, `v` to `d` readable elements; the path's features are enabled.
    unsafe fn axpy(o: *mut f32, p: f32, v: *const T, d: usize);
    /// Scores of `group` query heads (`q`: group × d) against one key row:
    /// `out[h · stride] = dot(q_h, k) · scale`.
    ///
    /// # Safety
    /// As [`RowOps::dot`], and `out` has room for (group - 1) · stride + 1 values.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn scores(
        q: *const f32,
        k: *const T,
        group: usize,
        d: usize,
        scale: f32,
        out: *mut f32,
        stride: usize,
    ) {
        for h in 0..group {
            // SAFETY: as the caller guarantees.
            unsafe { *out.add(h * stride) = Self::dot(q.add(h * d), k, d) * scale };
        }
    }
    /// `out[h · d + c] = Σ_j p[h · stride + j] · v_j[c]` for `group` heads over the value rows
    /// `row(0..ctx)`, each output accumulated over j in order (as repeated [`RowOps::axpy`]).
    ///
    /// # Safety
    /// As [`RowOps::axpy`] for every row; `p` holds group rows of `stride` ≥ ctx values, `out`
    /// group × d zeros.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn weighted_sum<F: Fn(usize) -> *const T>(
        p: *const f32,
        stride: usize,
        group: usize,
        ctx: usize,
        d: usize,
        row: F,
        out: *mut f32,
    ) {
        // SAFETY: as the caller guarantees.
        unsafe { weighted_sum_by_rows::<T, Self, F>(p, stride, group, ctx, d, row, out) }
    }
    /// Asks for the `bytes` at `p` ahead of use (cache rows are scattered over blocks, which
    /// defeats the hardware prefetcher at every block boundary). A hint only.
    #[inline(always)]
    fn prefetch(p: *const u8, bytes: usize) {
        let _ = (p, bytes);
    }
    /// `x[i] = exp(x[i] - max)` in place; returns the sum, accumulated in the path's fixed order.
    ///
    /// # Safety
    /// The path's CPU features are enabled.
    unsafe fn exp_sum(x: &mut [f32], max: f32) -> f32;
    /// Scores of `group` query heads (`q`: group × d) against `m` ≤ [`CHUNK`] consecutive keys
    /// of a [`KvLayout::Columns`] block: dimension c of key i at `kt + c · bs + i`.
    /// `out[h · stride + i] = scale · Σ_c q[h · d + c] · k_c,i`.
    ///
    /// # Safety
    /// The reads stay inside the block (i < m, c < d); `out` has room for every head; the
    /// path's features are enabled.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn chunk_scores(
        q: *const f32,
        kt: *const T,
        bs: usize,
        m: usize,
        group: usize,
        d: usize,
        scale: f32,
        out: *mut f32,
        stride: usize,
    ) where
        T: Widen,
    {
        // SAFETY: as the caller guarantees.
        unsafe { chunk_scores_scalar(q, kt, bs, m, group, d, scale, out, stride) }
    }
}

struct ScalarOps;

/// [`RowOps::weighted_sum`] value row by value row, one [`RowOps::axpy`] per head: the default,
/// and the fallback of paths whose register tiles need a head dim they do not have.
///
/// # Safety
/// As [`RowOps::weighted_sum`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn weighted_sum_by_rows<T, R: RowOps<T> + ?Sized, F: Fn(usize) -> *const T>(
    p: *const f32,
    stride: usize,
    group: usize,
    ctx: usize,
    d: usize,
    row: F,
    out: *mut f32,
) {
    for j in 0..ctx {
        let vr = row(j);
        for h in 0..group {
            // SAFETY: as the caller guarantees.
            unsafe { R::axpy(out.add(h * d), *p.add(h * stride + j), vr, d) };
        }
    }
}

impl<T: Widen> RowOps<T> for ScalarOps {
    #[inline(always)]
    unsafe fn dot(q: *const f32, k: *const T, d: usize) -> f32 {
        // SAFETY: the caller guarantees d readable elements at each pointer.
        let (q, k) = unsafe {
            (
                std::slice::from_raw_parts(q, d),
                std::slice::from_raw_parts(k, d),
            )
        };
        const LANES: usize = 16;
        let full = d / LANES * LANES;
        let mut acc = [0f32; LANES];
        for (qc, kc) in q[..full]
            .chunks_exact(LANES)
            .zip(k[..full].chunks_exact(LANES))
        {
            for l in 0..LANES {
                acc[l] += qc[l] * kc[l].widen();
            }
        }
        let mut width = LANES / 2;
        while width > 0 {
            for l in 0..width {
                acc[l] += acc[l + width];
            }
            width /= 2;
        }
        (full..d).fold(acc[0], |s, i| s + q[i] * k[i].widen())
    }

    #[inline(always)]
    unsafe fn axpy(o: *mut f32, p: f32, v: *const T, d: usize) {
        // SAFETY: the caller guarantees d elements at each pointer; `o` does not alias `v`.
        let (o, v) = unsafe {
            (
                std::slice::from_raw_parts_mut(o, d),
                std::slice::from_raw_parts(v, d),
            )
        };
        for (o, v) in o.iter_mut().zip(v) {
            *o += p * v.widen();
        }
    }

    #[inline(always)]
    unsafe fn exp_sum(x: &mut [f32], max: f32) -> f32 {
        let mut sum = 0.0;
        for v in x.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        sum
    }
}

#[cfg(target_arch = "x86_64")]
mod x86;

/// Keys per partition. A context is cut at fixed positions (0, PART, 2·PART, ...) into
/// partitions that are attended independently — in parallel when there are few queries (one
/// long decode has only `kv_heads` items otherwise) — and combined in position order. The cuts
/// depend on positions alone, so a token's arithmetic does not depend on the batch or the
/// chunking. A partition's scores (group × PART) stay in L1.
const PART: usize = 256;

/// Per-thread buffers, reused across units and calls.
#[derive(Default)]
struct Scratch {
    /// The unit's query heads in f32 (group × d).
    q: Vec<f32>,
    /// Scores, then softmax numerators, in the path's layout.
    scores: Vec<f32>,
    /// Offset of each of the partition's rows (this kv head) in the cache.
    rows: Vec<usize>,
    /// An item's partials, when one thread runs all its partitions.
    parts: Vec<f32>,
    /// Per block of the partition: its offset in the cache, first and end offset in it.
    keys: Vec<(usize, usize, usize)>,
}

/// A partition's result for each of the group's heads, laid out as one slice of
/// [`partial_len`] values: the maximum score m (group), Σ exp(score - m) (group), and the
/// unnormalized weighted sum of values (group × d).
fn partial_len(group: usize, d: usize) -> usize {
    group * (2 + d)
}

/// Attends `group` query heads (`q`: group × d, f32) over the keys and values at `rows` (one
/// partition), writing its partial result (see [`partial_len`]) to `part`. The path's
/// general form, over head-major scores.
///
/// # Safety
/// The path `R`'s CPU features are enabled; every row offset + d lies inside `k` and `v`;
/// `q` holds group × d values and `part` [`partial_len`] values.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn partition_general<T, R: RowOps<T>>(
    s: Shape4,
    q: &[f32],
    rows: &[usize],
    k: *const T,
    v: *const T,
    scores: &mut Vec<f32>,
    part: &mut [f32],
) {
    let (d, group, n) = (s.head_dim, s.heads / s.kv_heads, rows.len());
    scores.clear();
    scores.resize(group * n, 0.0);
    let row_bytes = d * std::mem::size_of::<T>();
    // SAFETY (whole body): as the caller guarantees; scores hold group × n values.
    unsafe {
        // 1. Scores, key by key; every head of the group reads the key row once loaded.
        for j in 0..n {
            if j + AHEAD < n {
                R::prefetch(
                    k.add(*rows.get_unchecked(j + AHEAD)) as *const u8,
                    row_bytes,
                );
            }
            let kr = k.add(*rows.get_unchecked(j));
            R::scores(
                q.as_ptr(),
                kr,
                group,
                d,
                s.scale,
                scores.as_mut_ptr().add(j),
                n,
            );
        }
        // 2-3. Softmax numerators and the weighted sum of values.
        softmax_values::<T, R>(s, rows, v, scores, part);
    }
}

/// Keys scored together from a [`KvLayout::Columns`] block (one AVX-512 vector).
const CHUNK: usize = 16;

/// [`RowOps::chunk_scores`] one key and head at a time: each score a sequential sum over c.
///
/// # Safety
/// As [`RowOps::chunk_scores`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn chunk_scores_scalar<T: Widen>(
    q: *const f32,
    kt: *const T,
    bs: usize,
    m: usize,
    group: usize,
    d: usize,
    scale: f32,
    out: *mut f32,
    stride: usize,
) {
    // SAFETY: as the caller guarantees.
    unsafe {
        for h in 0..group {
            for i in 0..m {
                let mut acc = 0f32;
                for c in 0..d {
                    acc += *q.add(h * d + c) * (*kt.add(c * bs + i)).widen();
                }
                *out.add(h * stride + i) = acc * scale;
            }
        }
    }
}

/// Softmax numerators of head-major scores (`scores`: group × n) and the weighted sum of the
/// value rows: writes the partial (see [`partial_len`]).
///
/// # Safety
/// As [`partition_general`].
#[inline(always)]
unsafe fn softmax_values<T, R: RowOps<T>>(
    s: Shape4,
    rows: &[usize],
    v: *const T,
    scores: &mut [f32],
    part: &mut [f32],
) {
    let (d, group, n) = (s.head_dim, s.heads / s.kv_heads, rows.len());
    let (ml, o) = part.split_at_mut(2 * group);
    o.fill(0.0);
    let row_bytes = d * std::mem::size_of::<T>();
    // SAFETY (whole body): as the caller guarantees; scores hold group × n values.
    unsafe {
        // Exact max, then exp and sum in the path's order.
        for h in 0..group {
            let sc = &mut scores[h * n..(h + 1) * n];
            let max = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            ml[h] = max;
            ml[group + h] = R::exp_sum(sc, max);
        }
        // Weighted sum of values, value by value.
        R::weighted_sum(
            scores.as_ptr(),
            n,
            group,
            n,
            d,
            |j| {
                if j + AHEAD < n {
                    R::prefetch(
                        v.add(*rows.get_unchecked(j + AHEAD)) as *const u8,
                        row_bytes,
                    );
                }
                v.add(*rows.get_unchecked(j))
            },
            o.as_mut_ptr(),
        );
    }
}

/// [`partition_general`] for keys in [`KvLayout::Columns`]: scores chunk by chunk (up to
/// [`CHUNK`] keys of one block), then as there. `kg` points at kv head g's first column
/// (`k + g · d · bs`); `keys` lists, per block the partition touches, the offset of that
/// block in the cache and the partition's first and last-plus-one offset in it.
///
/// # Safety
/// As [`partition_general`]; every block offset + width · bs lies inside `k`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn partition_columns<T: Widen, R: RowOps<T>>(
    s: Shape4,
    q: &[f32],
    keys: &[(usize, usize, usize)],
    rows: &[usize],
    kg: *const T,
    v: *const T,
    scores: &mut Vec<f32>,
    part: &mut [f32],
) {
    let (d, group, n, bs) = (s.head_dim, s.heads / s.kv_heads, rows.len(), s.block_size);
    scores.clear();
    scores.resize(group * n, 0.0);
    let block_bytes = d * bs * std::mem::size_of::<T>();
    // SAFETY (whole body): as the caller guarantees; scores hold group × n values.
    unsafe {
        let mut j = 0;
        for (b, &(base, o0, o1)) in keys.iter().enumerate() {
            if let Some(&(next, _, _)) = keys.get(b + 1) {
                R::prefetch(kg.add(next) as *const u8, block_bytes);
            }
            let mut o = o0;
            while o < o1 {
                let m = (o1 - o).min(CHUNK);
                let out = scores.as_mut_ptr().add(j);
                R::chunk_scores(
                    q.as_ptr(),
                    kg.add(base + o),
                    bs,
                    m,
                    group,
                    d,
                    s.scale,
                    out,
                    n,
                );
                o += m;
                j += m;
            }
        }
        softmax_values::<T, R>(s, rows, v, scores, part);
    }
}

/// How many keys (values) ahead of use their rows are prefetched.
const AHEAD: usize = 8;

/// One unit of work: kv heads `g0..g1` (and their query heads) of one token against the keys
/// at positions `lo..hi` (one partition of its context). A unit takes every kv head when
/// there is enough other work to share out: a core then uses every cache line of the K/V
/// rows it pulls in (with one kv head per core, each core's prefetcher fetches the whole rows
/// anyway — measured twice the memory traffic).
#[derive(Clone, Copy)]
struct Unit<'a> {
    table: &'a [u32],
    lo: usize,
    hi: usize,
    g0: usize,
    g1: usize,
}

/// Attends one unit: reads the queries of its kv heads from `w.q` (g1 - g0 groups × d),
/// writes one partial per kv head to `parts`.
///
/// # Safety
/// The path `R`'s CPU features are enabled; `u.table` covers positions below `u.hi` with
/// blocks whose slots lie inside `k` and `v`; `w.q` holds (g1 - g0) × group × d values
/// (checked by the caller) and `parts` (g1 - g0) × [`partial_len`].
#[inline(always)]
unsafe fn unit<T: Widen, R: RowOps<T>>(
    s: Shape4,
    u: Unit,
    k: &[T],
    v: &[T],
    w: &mut Scratch,
    parts: &mut [f32],
) {
    let (d, bs, group) = (s.head_dim, s.block_size, s.heads / s.kv_heads);
    let width = s.kv_heads * d;
    // Row offsets (of kv head 0) block by block, no division per key; for column keys also
    // each block's offset and the partition's offsets in it.
    w.rows.clear();
    w.keys.clear();
    let mut p = u.lo;
    while p < u.hi {
        let (b, o) = (p / bs, p % bs);
        let n = (bs - o).min(u.hi - p);
        let base = u.table[b] as usize * bs * width;
        w.rows.extend((o..o + n).map(|o| base + o * width));
        w.keys.push((base, o, o + n));
        p += n;
    }
    let len = partial_len(group, d);
    for (i, g) in (u.g0..u.g1).enumerate() {
        let q = &w.q[i * group * d..(i + 1) * group * d];
        let part = &mut parts[i * len..(i + 1) * len];
        // SAFETY: as the caller guarantees (rows and blocks from the checked table; kv head
        // g's values start g · d into each row, its key columns g · d · bs into each block).
        unsafe {
            let vg = v.as_ptr().add(g * d);
            if s.key_columns {
                let kg = k.as_ptr().add(g * d * bs);
                partition_columns::<T, R>(s, q, &w.keys, &w.rows, kg, vg, &mut w.scores, part)
            } else {
                let kg = k.as_ptr().add(g * d);
                partition_general::<T, R>(s, q, &w.rows, kg, vg, &mut w.scores, part)
            }
        }
    }
}

/// `unit` compiled for one path.
type UnitFn<T> = unsafe fn(Shape4, Unit, &[T], &[T], &mut Scratch, &mut [f32]);

fn unit_scalar<T: Widen>(s: Shape4, u: Unit, k: &[T], v: &[T], w: &mut Scratch, part: &mut [f32]) {
    // SAFETY: the scalar path needs no CPU feature; the caller checked the table.
    unsafe { unit::<T, ScalarOps>(s, u, k, v, w, part) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unit_avx2<T: crate::elem::x86::Load8>(
    s: Shape4,
    u: Unit,
    k: &[T],
    v: &[T],
    w: &mut Scratch,
    part: &mut [f32],
) {
    // SAFETY: the features are enabled here; the caller checked the table.
    unsafe { unit::<T, x86::Avx2Ops>(s, u, k, v, w, part) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn unit_avx512<T: crate::elem::x86::Load16>(
    s: Shape4,
    u: Unit,
    k: &[T],
    v: &[T],
    w: &mut Scratch,
    part: &mut [f32],
) {
    // SAFETY: the features are enabled here; the caller checked the table.
    unsafe { unit::<T, x86::Avx512Ops>(s, u, k, v, w, part) }
}

/// The unit function for `isa` (the best the CPU supports at or below it).
fn unit_fn<T: crate::elem::ElemType>(isa: Isa) -> UnitFn<T> {
    #[cfg(target_arch = "x86_64")]
    {
        if isa >= Isa::Avx512 && Isa::Avx512.is_supported() {
            return unit_avx512::<T>;
        }
        if isa >= Isa::Avx2 && Isa::Avx2.is_supported() {
            return unit_avx2::<T>;
        }
    }
    let _ = isa;
    unit_scalar::<T>
}

/// Combines a (token, kv head)'s partials, in position order, into its normalized output:
/// with M the largest partition maximum, out = Σ o_i · e^(m_i - M) / Σ l_i · e^(m_i - M).
/// Partial i is `parts[i · stride..][..partial_len]`. One partition gives o / l exactly.
fn combine<Q: Store>(
    parts: &[f32],
    stride: usize,
    group: usize,
    d: usize,
    out: &mut [Q],
    acc: &mut Vec<f32>,
) {
    let each = || parts.chunks(stride);
    acc.clear();
    acc.resize(group * d, 0.0);
    for h in 0..group {
        let max = each().map(|p| p[h]).fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        let a = &mut acc[h * d..(h + 1) * d];
        for p in each() {
            let w = (p[h] - max).exp();
            sum += p[group + h] * w;
            let o = &p[2 * group + h * d..2 * group + (h + 1) * d];
            for (a, o) in a.iter_mut().zip(o) {
                *a += o * w;
            }
        }
        for (dst, a) in out[h * d..(h + 1) * d].iter_mut().zip(a.iter()) {
            *dst = Q::from_f32(a / sum);
        }
    }
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

struct PagedAttention<'a> {
    seqs: &'a [PagedSeq<'a>],
    shape: Shape4,
    isa: Isa,
}

impl PagedAttention<'_> {
    /// Checks every table against the cache and returns, per token, (sequence, position).
    fn plan(&self, tokens: usize, slots: usize) -> Result<Vec<(usize, usize)>> {
        let mut per_token = Vec::with_capacity(tokens);
        for (i, s) in self.seqs.iter().enumerate() {
            let end = s.start_pos + s.num_tokens;
            let bs = self.shape.block_size;
            if end > s.block_table.len() * bs {
                candle_core::bail!(
                    "paged_attention: {end} positions but {} blocks of {bs}",
                    s.block_table.len()
                );
            }
            let used = end.div_ceil(bs);
            if let Some(b) = s.block_table[..used]
                .iter()
                .find(|&&b| (b as usize + 1) * bs > slots)
            {
                candle_core::bail!("paged_attention: block {b} beyond the cache's {slots} slots");
            }
            per_token.extend((s.start_pos..end).map(|p| (i, p)));
        }
        if per_token.len() != tokens {
            candle_core::bail!(
                "paged_attention: {} query tokens but the sequences hold {}",
                tokens,
                per_token.len()
            );
        }
        Ok(per_token)
    }

    fn run<T: crate::elem::ElemType, Q: Widen + Store>(
        &self,
        q: &[Q],
        k: &[T],
        v: &[T],
        plan: &[(usize, usize)],
    ) -> Vec<Q> {
        let s = self.shape;
        let (d, group, kv) = (s.head_dim, s.heads / s.kv_heads, s.kv_heads);
        let f = unit_fn::<T>(self.isa);
        let len = partial_len(group, d);
        let threads = rayon::current_num_threads();
        let partitions = |t: usize| plan[t].1 / PART + 1;
        let total: usize = (0..plan.len()).map(partitions).sum();
        // Units take every kv head unless that leaves too few to share out; then one kv head
        // each (`span` kv heads per unit). Item c = (token c / (kv / span), kv heads from
        // (c % (kv / span)) · span).
        let span = if total >= 2 * threads { kv } else { 1 };
        let per_token = kv / span;
        let items = plan.len() * per_token;
        let unit_of = |c: usize, lo: usize| {
            let (t, g0) = (c / per_token, c % per_token * span);
            let (seq, pos) = plan[t];
            let u = Unit {
                table: self.seqs[seq].block_table,
                lo,
                hi: (lo + PART).min(pos + 1),
                g0,
                g1: g0 + span,
            };
            (u, (t * s.heads + g0 * group) * d)
        };
        let attend = |u: Unit, q0: usize, w: &mut Scratch, parts: &mut [f32]| {
            w.q.clear();
            w.q.extend(q[q0..q0 + span * group * d].iter().map(|x| x.widen()));
            // SAFETY: `unit_fn` returned a function for a path this CPU supports; `plan`
            // checked that each table covers 0..=pos inside the cache; w.q holds the unit's
            // span × group × d queries and `parts` span partials.
            unsafe { f(s, u, k, v, w, parts) };
        };
        // Combines item c's partials (`parts`: partition-major, span partials each) into its
        // output (span × group × d).
        let finish = |parts: &[f32], out: &mut [Q], acc: &mut Vec<f32>| {
            for (i, out) in out.chunks_exact_mut(group * d).enumerate() {
                combine(&parts[i * len..], span * len, group, d, out, acc);
            }
        };
        let mut out = vec![Q::from_f32(0.0); plan.len() * s.heads * d];
        let chunk = span * group * d;
        if items >= 2 * threads || total == plan.len() {
            // Enough items to share out (or one partition each): each item runs its
            // partitions in turn, one pass.
            out.par_chunks_mut(chunk).enumerate().for_each(|(c, out)| {
                SCRATCH.with_borrow_mut(|w| {
                    let n = partitions(c / per_token);
                    let mut parts = std::mem::take(&mut w.parts);
                    parts.resize(n * span * len, 0.0);
                    for (i, part) in parts.chunks_exact_mut(span * len).enumerate() {
                        let (u, q0) = unit_of(c, i * PART);
                        attend(u, q0, w, part);
                    }
                    finish(&parts, out, &mut w.scores);
                    w.parts = parts;
                })
            });
            return out;
        }
        // Few items with long contexts (batch-1 decode): partitions run in parallel, then
        // each item combines its own.
        let mut first = Vec::with_capacity(items + 1);
        let mut list = Vec::with_capacity(total * per_token);
        for c in 0..items {
            first.push(list.len());
            list.extend((0..partitions(c / per_token)).map(|i| (c, i * PART)));
        }
        first.push(list.len());
        let mut parts = vec![0f32; list.len() * span * len];
        parts
            .par_chunks_mut(span * len)
            .zip(list.par_iter())
            .for_each(|(part, &(c, lo))| {
                let (u, q0) = unit_of(c, lo);
                SCRATCH.with_borrow_mut(|w| attend(u, q0, w, part));
            });
        out.par_chunks_mut(chunk).enumerate().for_each(|(c, out)| {
            let parts = &parts[first[c] * span * len..first[c + 1] * span * len];
            SCRATCH.with_borrow_mut(|w| finish(parts, out, &mut w.scores));
        });
        out
    }
}

impl CustomOp3 for PagedAttention<'_> {
    fn name(&self) -> &'static str {
        "ember-paged-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let s = self.shape;
        let (tokens, heads, d) = ql.shape().dims3()?;
        let width = s.kv_heads * d;
        let slots = kl.shape().elem_count() / width.max(1);
        if heads != s.heads
            || d != s.head_dim
            || s.kv_heads == 0
            || !heads.is_multiple_of(s.kv_heads)
            || kl.shape().elem_count() != slots * width
            || vl.shape() != kl.shape()
        {
            candle_core::bail!(
                "paged_attention: q {:?}, cache {:?} / {:?}, {} kv heads",
                ql.shape(),
                kl.shape(),
                vl.shape(),
                s.kv_heads
            );
        }
        let plan = self.plan(tokens, slots)?;
        macro_rules! with_cache {
            ($q:expr, $wrap:path) => {
                match (ks, vs) {
                    (CpuStorage::BF16(k), CpuStorage::BF16(v)) => $wrap(self.run(
                        $q,
                        contiguous(k, kl, "paged_attention")?,
                        contiguous(v, vl, "paged_attention")?,
                        &plan,
                    )),
                    (CpuStorage::F16(k), CpuStorage::F16(v)) => $wrap(self.run(
                        $q,
                        contiguous(k, kl, "paged_attention")?,
                        contiguous(v, vl, "paged_attention")?,
                        &plan,
                    )),
                    (CpuStorage::F32(k), CpuStorage::F32(v)) => $wrap(self.run(
                        $q,
                        contiguous(k, kl, "paged_attention")?,
                        contiguous(v, vl, "paged_attention")?,
                        &plan,
                    )),
                    _ => candle_core::bail!(
                        "paged_attention: unsupported cache dtypes {:?} / {:?}",
                        ks.dtype(),
                        vs.dtype()
                    ),
                }
            };
        }
        let out = match qs {
            CpuStorage::F32(q) => {
                with_cache!(contiguous(q, ql, "paged_attention")?, CpuStorage::F32)
            }
            CpuStorage::BF16(q) => {
                with_cache!(contiguous(q, ql, "paged_attention")?, CpuStorage::BF16)
            }
            CpuStorage::F16(q) => {
                with_cache!(contiguous(q, ql, "paged_attention")?, CpuStorage::F16)
            }
            other => candle_core::bail!("paged_attention: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, Shape::from((tokens, heads * d))))
    }
}

/// Causal attention of `q` (tokens, heads, head_dim) — the queries of `seqs`, in order — over
/// each sequence's keys and values in the paged caches `k_cache`, `v_cache` (slots, kv_heads ·
/// head_dim, any shape with that many elements; keys laid out as `key_layout` says, values in
/// rows). This step's keys and values must already be written. Returns (tokens, heads ·
/// head_dim) in q's dtype.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    seqs: &[PagedSeq],
    block_size: usize,
    key_layout: KvLayout,
    num_kv_heads: usize,
    scale: f32,
) -> Result<Tensor> {
    paged_attention_with_isa(
        q,
        k_cache,
        v_cache,
        seqs,
        block_size,
        key_layout,
        num_kv_heads,
        scale,
        cpu_isa(),
    )
}

/// Whether keys are in columns; an error unless the layout's blocks are the cache's.
fn key_columns(key_layout: KvLayout, block_size: usize) -> Result<bool> {
    match key_layout {
        KvLayout::Rows => Ok(false),
        KvLayout::Columns { block_size: b } if b == block_size => Ok(true),
        KvLayout::Columns { block_size: b } => {
            candle_core::bail!(
                "paged_attention: key columns of {b} slots in blocks of {block_size}"
            )
        }
    }
}

/// [`paged_attention`] on a given instruction-set path (tests compare paths).
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_with_isa(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    seqs: &[PagedSeq],
    block_size: usize,
    key_layout: KvLayout,
    num_kv_heads: usize,
    scale: f32,
    isa: Isa,
) -> Result<Tensor> {
    let _t = crate::profile::timer(crate::profile::OpClass::Attention);
    let (_, heads, head_dim) = q.dims3()?;
    if block_size == 0 {
        candle_core::bail!("paged_attention: block size 0");
    }
    let key_columns = key_columns(key_layout, block_size)?;
    if !q.device().is_cpu() {
        return paged_attention_ref(
            q,
            k_cache,
            v_cache,
            seqs,
            block_size,
            key_layout,
            num_kv_heads,
            scale,
        );
    }
    let op = PagedAttention {
        seqs,
        shape: Shape4 {
            heads,
            kv_heads: num_kv_heads,
            head_dim,
            block_size,
            scale,
            key_columns,
        },
        isa,
    };
    q.contiguous()?
        .apply_op3_no_bwd(&k_cache.contiguous()?, &v_cache.contiguous()?, &op)
}

/// Plain-candle reference of [`paged_attention`]: gathers each sequence's context (keys in
/// columns turned back into rows first) and runs [`crate::causal_attention_ref`].
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_ref(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    seqs: &[PagedSeq],
    block_size: usize,
    key_layout: KvLayout,
    num_kv_heads: usize,
    scale: f32,
) -> Result<Tensor> {
    let (_, _, d) = q.dims3()?;
    let width = num_kv_heads * d;
    let k_rows = if key_columns(key_layout, block_size)? {
        k_cache
            .reshape(((), width, block_size))?
            .transpose(1, 2)?
            .contiguous()?
    } else {
        k_cache.clone()
    };
    let k_all = k_rows.reshape(((), num_kv_heads, d))?;
    let v_all = v_cache.reshape(((), num_kv_heads, d))?;
    let mut outs = Vec::with_capacity(seqs.len());
    let mut offset = 0;
    for s in seqs {
        let end = s.start_pos + s.num_tokens;
        let slots: Vec<u32> = (0..end)
            .map(|p| s.block_table[p / block_size] * block_size as u32 + (p % block_size) as u32)
            .collect();
        let idx = Tensor::from_vec(slots, end, q.device())?;
        let k = k_all.index_select(&idx, 0)?.to_dtype(q.dtype())?;
        let v = v_all.index_select(&idx, 0)?.to_dtype(q.dtype())?;
        let qs = q.narrow(0, offset, s.num_tokens)?;
        outs.push(crate::causal_attention_ref(
            &qs,
            &k,
            &v,
            s.start_pos,
            scale,
        )?);
        offset += s.num_tokens;
    }
    Tensor::cat(&outs, 0)
}

/// Causal attention of one sequence over a contiguous context: `q` (n, heads, d) at positions
/// `start..start + n`, `k`, `v` (context, kv_heads, d). The same kernel as [`paged_attention`]
/// with the whole context as one block. Returns (n, heads · d).
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    start: usize,
    scale: f32,
) -> Result<Tensor> {
    let (n, _, _) = q.dims3()?;
    let (ctx, kv, _) = k.dims3()?;
    let table = [0u32];
    let seqs = [PagedSeq {
        start_pos: start,
        num_tokens: n,
        block_table: &table,
    }];
    paged_attention(q, k, v, &seqs, ctx.max(1), KvLayout::Rows, kv, scale)
}
