//! The SwiGLU gate as one elementwise op: for the gate pre-activation g and the up projection u,
//!
//! ```text
//! σ = 1/(1 + e^(−g)),  y = silu(g)·u = g·σ·u
//! dg = dy·u·σ·(1 + g·(1 − σ))        du = dy·g·σ
//! ```
//!
//! silu is computed as candle computes it, g / (1 + e^(−g)); nothing is stored for the backward.
//!
//! GeGLU ([`gated`] with [`Activation::GeluTanh`], Gemma's MLP) is the same op with GELU's tanh approximation
//! in place of silu, as PyTorch's `gelu(approximate="tanh")` computes it:
//!
//! ```text
//! t = tanh(√(2/π)·(g + 0.044715·g³)),  y = 0.5·g·(1 + t)·u
//! dg = dy·u·(0.5·(1 + t) + 0.5·g·(1 − t²)·√(2/π)·(1 + 3·0.044715·g²))     du = dy·0.5·g·(1 + t)
//! ```

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::{cpu_slice, exp, for_each, multiversion, tensor, with_values, CResult};
use crate::family::Activation;

/// Values per parallel chunk.
const CHUNK: usize = 1 << 14;

/// silu(g) ⊙ u for g and u of one shape: the op's candle entry point (differentiable in both).
pub fn swiglu(g: &Tensor, u: &Tensor) -> CResult<Tensor> {
    gated(g, u, Activation::Silu)
}

/// act(g) ⊙ u for g and u of one shape (differentiable in both).
pub fn gated(g: &Tensor, u: &Tensor, act: Activation) -> CResult<Tensor> {
    if g.dims() != u.dims() {
        candle_core::bail!("swiglu: gate {:?} and up {:?} differ in shape", g.dims(), u.dims())
    }
    let (g, u) = (g.contiguous()?, u.contiguous()?);
    let op = SwiGlu { act };
    if g.track_op() || u.track_op() {
        g.apply_op2(&u, op)
    } else {
        g.apply_op2_no_bwd(&u, &op)
    }
}

struct SwiGlu {
    act: Activation,
}

/// √(2/π), as PyTorch's `kBeta`.
const BETA: f32 = std::f32::consts::SQRT_2 * std::f32::consts::FRAC_2_SQRT_PI * 0.5;
const KAPPA: f32 = 0.044715;

multiversion! {
    fn gelu_forward_chunk(g: &[f32], u: &[f32], y: &mut [f32]) {
        for ((yv, gv), uv) in y.iter_mut().zip(g).zip(u) {
            let x = *gv;
            let t = (BETA * (x + KAPPA * x * x * x)).tanh();
            *yv = 0.5 * x * (1.0 + t) * uv;
        }
    }
}

multiversion! {
    fn gelu_backward_chunk(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
        for i in 0..g.len() {
            let (x, uv, d) = (g[i], u[i], dy[i]);
            let t = (BETA * (x + KAPPA * x * x * x)).tanh();
            let slope = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * BETA * (1.0 + 3.0 * KAPPA * x * x);
            dg[i] = d * uv * slope;
            du[i] = d * (0.5 * x * (1.0 + t));
        }
    }
}

multiversion! {
    fn forward_chunk(g: &[f32], u: &[f32], y: &mut [f32]) {
        for ((yv, gv), uv) in y.iter_mut().zip(g).zip(u) {
            *yv = *gv / (1.0 + exp(-*gv)) * uv;
        }
    }
}

multiversion! {
    fn backward_chunk(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
        for i in 0..g.len() {
            let (gv, uv, d) = (g[i], u[i], dy[i]);
            let s = 1.0 / (1.0 + exp(-gv));
            dg[i] = d * uv * s * (1.0 + gv * (1.0 - s));
            du[i] = d * (gv / (1.0 + exp(-gv)));
        }
    }
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "lm-fused-swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (g, u) = (cpu_slice(self.name(), s1, l1)?, cpu_slice(self.name(), s2, l2)?);
        if l1.dims() != l2.dims() {
            candle_core::bail!("swiglu: gate {:?} and up {:?} differ in shape", l1.dims(), l2.dims())
        }
        let mut y = vec![0f32; g.len()];
        let n = g.len();
        let act = self.act;
        for_each(y.chunks_mut(CHUNK).zip(g.chunks(CHUNK).zip(u.chunks(CHUNK))).collect(), n, |_, (yc, (gc, uc))| match act {
            Activation::Silu => forward_chunk(gc, uc, yc),
            Activation::GeluTanh => gelu_forward_chunk(gc, uc, yc),
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, g: &Tensor, u: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        with_values(self.name(), g, |gs| {
            with_values(self.name(), u, |us| {
                with_values(self.name(), grad, |ds| {
                    let mut dg = vec![0f32; gs.len()];
                    let mut du = vec![0f32; gs.len()];
                    for_each(dg.chunks_mut(CHUNK).zip(du.chunks_mut(CHUNK)).collect(), gs.len(), |i, (dgc, duc)| {
                        let r = i * CHUNK..(i * CHUNK + dgc.len());
                        match self.act {
                            Activation::Silu => backward_chunk(&gs[r.clone()], &us[r.clone()], &ds[r], dgc, duc),
                            Activation::GeluTanh => gelu_backward_chunk(&gs[r.clone()], &us[r.clone()], &ds[r], dgc, duc),
                        }
                    });
                    let dg = if g.track_op() { Some(tensor(dg, g.dims())?) } else { None };
                    let du = if u.track_op() { Some(tensor(du, u.dims())?) } else { None };
                    Ok((dg, du))
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
    fn fused_swiglu_and_its_gradients_match_the_reference() {
        // 3·7·1001 values: several parallel chunks and a ragged one; gates up to ±12 reach both tails of σ.
        let g = rand_var(&[3, 7, 1001], 7, 12.0);
        let u = rand_var(&[3, 7, 1001], 8, 2.0);
        let run = |fused: bool| {
            let y = if fused {
                swiglu(g.as_tensor(), u.as_tensor()).unwrap()
            } else {
                (g.as_tensor().silu().unwrap() * u.as_tensor()).unwrap()
            };
            let gr = (&y * weights_like(&y, 9)).unwrap().sum_all().unwrap().backward().unwrap();
            (flat(&y), flat(gr.get(g.as_tensor()).unwrap()), flat(gr.get(u.as_tensor()).unwrap()))
        };
        let (f, r) = (run(true), run(false));
        // A few f32 operations per value; our exp is within 2 ulp of the library's, so values differ by a
        // few ulp (≲ 1e-6 relative). 1e-5 of the largest value leaves room for that and nothing else.
        assert_close(&f.0, &r.0, 1e-5, "y");
        assert_close(&f.1, &r.1, 1e-5, "dg");
        assert_close(&f.2, &r.2, 1e-5, "du");
    }

    #[test]
    fn fused_geglu_and_its_gradients_match_candles_tanh_gelu() {
        let g = rand_var(&[3, 7, 1001], 17, 6.0);
        let u = rand_var(&[3, 7, 1001], 18, 2.0);
        let run = |fused: bool| {
            let y = if fused {
                gated(g.as_tensor(), u.as_tensor(), Activation::GeluTanh).unwrap()
            } else {
                (g.as_tensor().gelu().unwrap() * u.as_tensor()).unwrap()
            };
            let gr = (&y * weights_like(&y, 19)).unwrap().sum_all().unwrap().backward().unwrap();
            (flat(&y), flat(gr.get(g.as_tensor()).unwrap()), flat(gr.get(u.as_tensor()).unwrap()))
        };
        let (f, r) = (run(true), run(false));
        // The same formula up to the order of a few f32 operations: a few ulp apart.
        assert_close(&f.0, &r.0, 1e-5, "y");
        assert_close(&f.1, &r.1, 1e-5, "dg");
        assert_close(&f.2, &r.2, 1e-5, "du");
    }
}
