//! The portable family: a tile of up to 4 rows of x against one panel, 16 f32 lanes per row
//! (the compiler vectorizes them), multiply then add (not fused), k in order.

use std::marker::PhantomData;

use super::{Kernel, PanelElem, PANEL};

const MR: usize = 4;

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

impl<W: PanelElem> Kernel for Scalar<W> {
    type X = f32;
    type W = W;

    fn task<F: FnMut(usize, usize, &[f32])>(
        self,
        x: &[f32],
        m: usize,
        w: &[W],
        k: usize,
        mut emit: F,
    ) {
        let panel_len = PANEL * W::padded_k(k);
        for (pj, panel) in w.chunks_exact(panel_len).enumerate() {
            let mut i = 0;
            while i < m {
                let rows = MR.min(m - i);
                let mut acc = [[0f32; PANEL]; MR];
                for c in 0..k {
                    let mut wl = [0f32; PANEL];
                    for (r, v) in wl.iter_mut().enumerate() {
                        *v = panel[W::offset(r, c)].widen();
                    }
                    for (ri, a) in acc.iter_mut().enumerate().take(rows) {
                        let xv = x[(i + ri) * k + c];
                        for (a, &wv) in a.iter_mut().zip(&wl) {
                            *a += xv * wv;
                        }
                    }
                }
                for (ri, a) in acc.iter().enumerate().take(rows) {
                    emit(i + ri, pj * PANEL, a);
                }
                i += rows;
            }
        }
    }
}
