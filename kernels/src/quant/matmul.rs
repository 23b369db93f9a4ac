//! `y = x · Wᵀ` for quantized W, in ggml's arithmetic: each row of x is quantized once per
//! matmul (Q8_0 or Q8_K, [`super::act`]), every output is one weight row's dot product with it
//! ([`super::dot`]), rows of W split over the pool. An output depends only on its own row of x
//! and its row of W, so results are batch-invariant.

use rayon::prelude::*;

use super::act::{quantize_q8_0, quantize_q8k, Q8KRow, Q8_0Row};
use super::{dot, GgmlType, QuantError};

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

impl QuantWeight {
    /// Copies the rows of `parts` (each whole rows of `k` in `ty`), one after another.
    pub fn from_parts(ty: GgmlType, parts: &[&[u8]], k: usize) -> Result<Self, QuantError> {
        if !ty.is_quantized() {
            return Err(QuantError(format!("{ty} is not a quantized type")));
        }
        let row = ty.row_bytes(k).filter(|&r| r > 0).ok_or_else(|| {
            QuantError(format!(
                "rows of {k} are not whole {ty} blocks of {}",
                ty.block_len()
            ))
        })?;
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
        for p in parts {
            if p.len() % row != 0 {
                return Err(QuantError(format!(
                    "{} bytes are not rows of {row}",
                    p.len()
                )));
            }
            data.extend_from_slice(p);
        }
        Ok(Self {
            ty,
            n: data.len() / row,
            k,
            data,
        })
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

    fn quantize_acts(&self, x: &[f32], m: usize) -> QuantActs {
        let rows = x[..m * self.k].par_chunks(self.k);
        match self.ty {
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => QuantActs::Q8K(
                rows.map(|r| {
                    let mut q = Q8KRow::default();
                    quantize_q8k(r, &mut q);
                    q
                })
                .collect(),
            ),
            _ => QuantActs::Q8_0(
                rows.map(|r| {
                    let mut q = Q8_0Row::default();
                    quantize_q8_0(r, &mut q);
                    q
                })
                .collect(),
            ),
        }
    }

    /// `out` (m × n, row-major) = x (m × k, f32) · Wᵀ + bias.
    pub fn matmul(&self, x: &[f32], m: usize, bias: Option<&[f32]>, out: &mut [f32]) {
        let (n, k) = (self.n, self.k);
        assert!(x.len() >= m * k && out.len() >= m * n && bias.is_none_or(|b| b.len() >= n));
        if m == 0 || n == 0 {
            return;
        }
        let acts = self.quantize_acts(x, m);
        let rb = self.row_bytes();
        let ty = self.ty;
        // Tasks own a run of output columns; each writes its columns of every row of out.
        let columns: Vec<(usize, Vec<f32>)> = self
            .data
            .par_chunks(ROWS_PER_TASK * rb)
            .enumerate()
            .map(|(t, rows)| {
                let c0 = t * ROWS_PER_TASK;
                let cols = rows.len() / rb;
                let mut vals = vec![0f32; m * cols];
                for (c, w) in rows.chunks_exact(rb).enumerate() {
                    for i in 0..m {
                        let v = match (&acts, ty) {
                            (QuantActs::Q8_0(a), GgmlType::Q8_0) => dot::dot_q8_0(w, &a[i]),
                            (QuantActs::Q8_0(a), GgmlType::Q4_0) => dot::dot_q4_0(w, &a[i]),
                            (QuantActs::Q8_0(a), _) => dot::dot_q5_0(w, &a[i]),
                            (QuantActs::Q8K(a), GgmlType::Q4K) => dot::dot_q4k(w, &a[i]),
                            (QuantActs::Q8K(a), GgmlType::Q5K) => dot::dot_q5k(w, &a[i]),
                            (QuantActs::Q8K(a), _) => dot::dot_q6k(w, &a[i]),
                        };
                        vals[i * cols + c] = v + bias.map_or(0.0, |b| b[c0 + c]);
                    }
                }
                (c0, vals)
            })
            .collect();
        for (c0, vals) in columns {
            let cols = vals.len() / m;
            for (i, row) in vals.chunks_exact(cols).enumerate() {
                out[i * n + c0..i * n + c0 + cols].copy_from_slice(row);
            }
        }
    }
}
