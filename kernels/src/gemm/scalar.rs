//! The portable family: 16 interleaved f32 lanes (lane l sums k ≡ l mod 16), a fixed tree over
//! the lanes, then the tail in order. Up to 4 rows of x share each weight load.

use std::marker::PhantomData;

use super::{Kernel, Widen};

const LANES: usize = 16;
const ROW_BLOCK: usize = 4;

#[derive(Debug)]
pub(crate) struct Scalar<W>(PhantomData<W>);

impl<W> Clone for Scalar<W> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<W> Copy for Scalar<W> {}

impl<W> Scalar<W> {
    pub(crate) fn new() -> Self {
        Self(PhantomData)
    }
}

/// Sums 16 lanes in a fixed tree order.
#[inline(always)]
fn reduce(acc: &[f32; LANES]) -> f32 {
    let mut v = *acc;
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            v[l] += v[l + width];
        }
        width /= 2;
    }
    v[0]
}

/// Dot products of up to ROW_BLOCK rows of `x` with one weight row.
#[inline(always)]
fn dots<W: Widen>(xs: &[&[f32]], w: &[W], out: &mut [f32]) {
    let k = w.len();
    let full = k / LANES * LANES;
    let mut acc = [[0f32; LANES]; ROW_BLOCK];
    let mut c = 0;
    while c < full {
        let mut wl = [0f32; LANES];
        for l in 0..LANES {
            wl[l] = w[c + l].widen();
        }
        for (r, x) in xs.iter().enumerate() {
            let xc = &x[c..c + LANES];
            for l in 0..LANES {
                acc[r][l] += xc[l] * wl[l];
            }
        }
        c += LANES;
    }
    for (r, x) in xs.iter().enumerate() {
        let mut s = reduce(&acc[r]);
        for i in full..k {
            s += x[i] * w[i].widen();
        }
        out[r] = s;
    }
}

impl<W: Widen> Kernel for Scalar<W> {
    type X = f32;
    type W = W;

    fn task<F: FnMut(usize, usize, f32)>(
        self,
        x: &[f32],
        m: usize,
        w: &[W],
        k: usize,
        mut emit: F,
    ) {
        let mut i = 0;
        while i < m {
            let rows = ROW_BLOCK.min(m - i);
            let mut xs: [&[f32]; ROW_BLOCK] = [&[]; ROW_BLOCK];
            for (r, slot) in xs.iter_mut().enumerate().take(rows) {
                *slot = &x[(i + r) * k..(i + r + 1) * k];
            }
            let mut out = [0f32; ROW_BLOCK];
            for (j, wrow) in w.chunks_exact(k).enumerate() {
                dots(&xs[..rows], wrow, &mut out[..rows]);
                for (r, &v) in out[..rows].iter().enumerate() {
                    emit(i + r, j, v);
                }
            }
            i += rows;
        }
    }
}
