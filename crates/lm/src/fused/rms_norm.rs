//! RMSNorm over the last dimension as one op: for each row x (H) and the weight w (H),
//!
//! ```text
//! r = 1/√(mean(x²) + ε),  x̂ = x·r,  y = w ⊙ x̂
//! dw = Σ_rows dy ⊙ x̂
//! dx = r·(dy ⊙ w − x̂·mean(dy ⊙ w ⊙ x̂))
//! ```
//!
//! Nothing is stored for the backward: r is recomputed from x (one pass over the row). Rows are split
//! across the rayon threads in blocks; dw sums each block's partial sums in block order, so results do
//! not depend on the thread count.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::{cpu_slice, dot, for_each, multiversion, tensor, with_values, CResult};

/// Rows per parallel block.
const BLOCK: usize = 64;

/// RMSNorm of x (…, H) with weight w (H): the op's candle entry point (differentiable in x and w).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> CResult<Tensor> {
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    let op = RmsNorm { eps: eps as f32 };
    if x.track_op() || w.track_op() {
        x.apply_op2(&w, op)
    } else {
        x.apply_op2_no_bwd(&w, &op)
    }
}

struct RmsNorm {
    eps: f32,
}

multiversion! {
    /// y = w ⊙ x·r for each row of `x` (rows of `h` values).
    fn forward_rows(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
        let h = w.len();
        for (xr, yr) in x.chunks_exact(h).zip(y.chunks_exact_mut(h)) {
            let r = 1.0 / (dot(xr, xr) / h as f32 + eps).sqrt();
            for ((yv, xv), wv) in yr.iter_mut().zip(xr).zip(w) {
                *yv = xv * r * wv;
            }
        }
    }
}

multiversion! {
    /// dx for each row (written when `dx` is non-empty) and dw added into `dw` (when non-empty).
    fn backward_rows(x: &[f32], w: &[f32], dy: &[f32], eps: f32, dx: &mut [f32], dw: &mut [f32]) {
        let h = w.len();
        for (i, (xr, gr)) in x.chunks_exact(h).zip(dy.chunks_exact(h)).enumerate() {
            let r = 1.0 / (dot(xr, xr) / h as f32 + eps).sqrt();
            if !dw.is_empty() {
                for ((d, xv), gv) in dw.iter_mut().zip(xr).zip(gr) {
                    *d += gv * xv * r;
                }
            }
            if !dx.is_empty() {
                let c = dot3(gr, w, xr) * r * r / h as f32; // mean(dy ⊙ w ⊙ x̂), over r once more for x̂ = x·r
                for (((d, xv), gv), wv) in dx[i * h..(i + 1) * h].iter_mut().zip(xr).zip(gr).zip(w) {
                    *d = r * (gv * wv - xv * c);
                }
            }
        }
    }
}

/// Σ a_i·b_i·c_i, in lanes as [`super::dot`].
#[inline(always)]
fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    const L: usize = 16;
    let n = a.len().min(b.len()).min(c.len());
    let mut acc = [0f32; L];
    let full = n / L * L;
    for i in (0..full).step_by(L) {
        let (x, y, z) = (&a[i..i + L], &b[i..i + L], &c[i..i + L]);
        for l in 0..L {
            acc[l] += x[l] * y[l] * z[l];
        }
    }
    for i in full..n {
        acc[i - full] += a[i] * b[i] * c[i];
    }
    acc.iter().sum()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "lm-fused-rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (x, w) = (cpu_slice(self.name(), s1, l1)?, cpu_slice(self.name(), s2, l2)?);
        let h = w.len();
        if l2.dims().len() != 1 || l1.dims().last() != Some(&h) {
            candle_core::bail!("rms_norm: input {:?} does not end in the weight's size {h}", l1.dims())
        }
        let mut y = vec![0f32; x.len()];
        if h > 0 {
            let n = x.len();
            for_each(y.chunks_mut(BLOCK * h).zip(x.chunks(BLOCK * h)).collect(), n, |_, (yb, xb)| forward_rows(xb, w, self.eps, yb));
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let (want_x, want_w) = (x.track_op(), w.track_op());
        let h = w.elem_count();
        if h == 0 {
            return Ok((None, None));
        }
        with_values(self.name(), x, |xs| {
            with_values(self.name(), w, |ws| {
                with_values(self.name(), grad, |gs| {
                    let mut dx = if want_x { vec![0f32; xs.len()] } else { Vec::new() };
                    let blocks = xs.len().div_ceil(BLOCK * h);
                    let mut dw_parts = if want_w { vec![0f32; blocks * h] } else { Vec::new() };
                    let dx_chunks: Vec<&mut [f32]> =
                        if want_x { dx.chunks_mut(BLOCK * h).collect() } else { (0..blocks).map(|_| &mut [][..]).collect() };
                    let dw_chunks: Vec<&mut [f32]> =
                        if want_w { dw_parts.chunks_mut(h).collect() } else { (0..blocks).map(|_| &mut [][..]).collect() };
                    for_each(dx_chunks.into_iter().zip(dw_chunks).collect(), 2 * xs.len(), |bi, (dxb, dwb)| {
                        let r = bi * BLOCK * h..((bi + 1) * BLOCK * h).min(xs.len());
                        backward_rows(&xs[r.clone()], ws, &gs[r], self.eps, dxb, dwb);
                    });
                    let dw = if want_w {
                        let mut dw = vec![0f32; h];
                        for part in dw_parts.chunks_exact(h) {
                            for (d, p) in dw.iter_mut().zip(part) {
                                *d += p;
                            }
                        }
                        Some(tensor(dw, w.dims())?)
                    } else {
                        None
                    };
                    let dx = if want_x { Some(tensor(dx, x.dims())?) } else { None };
                    Ok((dx, dw))
                })
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::testing::*;

    #[test]
    fn fused_rms_norm_and_its_gradients_match_the_reference() {
        // 131 rows (two parallel blocks and a ragged one) of an odd width 37.
        let (n, h, eps) = (131, 37, 1e-5);
        let x = rand_var(&[n, h], 1, 2.0);
        let w = rand_var(&[h], 2, 1.5);
        let run = |fused: bool| {
            let y = if fused {
                rms_norm(x.as_tensor(), w.as_tensor(), eps).unwrap()
            } else {
                crate::ops::rms_norm(x.as_tensor(), w.as_tensor(), eps).unwrap()
            };
            let g = (&y * weights_like(&y, 3)).unwrap().sum_all().unwrap().backward().unwrap();
            (flat(&y), flat(g.get(x.as_tensor()).unwrap()), flat(g.get(w.as_tensor()).unwrap()))
        };
        let (f, r) = (run(true), run(false));
        // Each value is a short f32 computation (a sum of 37 squares, a sqrt, a product): rounding in another
        // order is ≲ 37·6e-8 relative. dw sums 131 rows: ≲ 131·6e-8 ≈ 1e-5 of its largest value. A wrong
        // term (a missing r, the mean over the wrong axis) moves values by far more.
        assert_close(&f.0, &r.0, 1e-5, "y");
        assert_close(&f.1, &r.1, 1e-5, "dx");
        assert_close(&f.2, &r.2, 2e-5, "dw");
    }

    #[test]
    fn a_constant_weight_gets_no_gradient_and_the_input_still_does() {
        let x = rand_var(&[3, 8], 4, 1.0);
        let w = Tensor::ones(8, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        let g = rms_norm(x.as_tensor(), &w, 1e-6).unwrap().sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(&w).is_none());
        assert!(g.get(x.as_tensor()).is_some());
    }
}
