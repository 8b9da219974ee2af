//! A linear layer with an optional LoRA adapter, forward and backward, on [`matmul_into`]. For x (n, in),
//! W (out, in), bias b (out), A (r, in), B (out, r), scale s:
//!
//! ```text
//! y = act(x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ)          act ∈ {identity, ReLU}
//! ```
//!
//! and with g = ∂L/∂y (masked by y > 0 for ReLU), only the gradients asked for:
//!
//! ```text
//! dA = s·(g·B)ᵀ·x      dB = s·gᵀ·(x·Aᵀ)      dx = g·W + s·(g·B)·A      dW = gᵀ·x      db = Σ_rows g
//! ```

use crate::error::{bail, elems, Result};
use crate::mat::MatRef;
use crate::matmul::matmul_into;

/// The activation applied after the linear map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// y = x·Wᵀ + b + delta.
    Identity,
    /// y = max(0, x·Wᵀ + b + delta).
    Relu,
}

/// One adapter's tensors as a kernel reads them.
#[derive(Debug, Clone, Copy)]
pub struct AdapterRef<'a> {
    /// A, (r, in).
    pub a: MatRef<'a>,
    /// B, (out, r).
    pub b: MatRef<'a>,
    /// The factor s on `(x·Aᵀ)·Bᵀ`.
    pub scale: f32,
}

/// A linear layer's tensors as a kernel reads them.
#[derive(Debug, Clone, Copy)]
pub struct LinearRef<'a> {
    /// W, (out, in).
    pub weight: MatRef<'a>,
    /// b, (out), contiguous.
    pub bias: Option<&'a [f32]>,
    /// The active adapter, if any.
    pub adapter: Option<AdapterRef<'a>>,
}

impl LinearRef<'_> {
    fn check(&self, x: &MatRef<'_>) -> Result<(usize, usize, usize)> {
        let (n, inp, out) = (x.rows, x.cols, self.weight.rows);
        if self.weight.cols != inp || self.bias.is_some_and(|b| b.len() != out) {
            bail!("fused linear: input ({n}, {inp}) does not fit weight ({out}, {})", self.weight.cols)
        }
        if let Some(ad) = &self.adapter {
            if ad.a.cols != inp || ad.b.rows != out || ad.b.cols != ad.a.rows {
                bail!("fused linear: adapter A ({}, {}) / B ({}, {}) do not fit", ad.a.rows, ad.a.cols, ad.b.rows, ad.b.cols)
            }
        }
        Ok((n, inp, out))
    }
}

/// `y = act(x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ)`, y (n, out) row-major, fully overwritten.
pub fn linear_forward(x: MatRef<'_>, p: &LinearRef<'_>, act: Activation, y: &mut [f32]) -> Result<()> {
    let (n, _, out) = p.check(&x)?;
    matmul_into(y, x, p.weight.t(), 1.0, false)?;
    if let Some(b) = p.bias {
        for row in y.chunks_exact_mut(out.max(1)) {
            // (out = 0: y is empty; a chunk size of 0 would panic)
            for (v, bv) in row.iter_mut().zip(b) {
                *v += *bv;
            }
        }
    }
    if let Some(ad) = &p.adapter {
        let r = ad.a.rows;
        let mut xa = vec![0f32; elems("fused linear: x·Aᵀ", n, r)?];
        matmul_into(&mut xa, x, ad.a.t(), 1.0, false)?; // (n, r)
        let mut d = vec![0f32; y.len()];
        matmul_into(&mut d, MatRef::row_major(&xa, n, r)?, ad.b.t(), 1.0, false)?; // (n, out)
        for (v, dv) in y.iter_mut().zip(&d) {
            *v += *dv * ad.scale; // the reference's `y + (d * s)`, same rounding
        }
    }
    if act == Activation::Relu {
        for v in y.iter_mut() {
            *v = v.max(0.0);
        }
    }
    Ok(())
}

/// Where [`linear_backward`] writes; `None` skips that gradient entirely. Each buffer is overwritten,
/// or added to when `accumulate` is set.
#[derive(Debug, Default)]
pub struct LinearGrads<'a> {
    /// ∂L/∂x, (n, in).
    pub dx: Option<&'a mut [f32]>,
    /// ∂L/∂W, (out, in).
    pub dw: Option<&'a mut [f32]>,
    /// ∂L/∂b, (out).
    pub db: Option<&'a mut [f32]>,
    /// ∂L/∂A, (r, in).
    pub da: Option<&'a mut [f32]>,
    /// ∂L/∂B, (out, r).
    pub dlora_b: Option<&'a mut [f32]>,
    /// Add to the buffers instead of overwriting them.
    pub accumulate: bool,
}

/// The gradient at the pre-activation, `g' = g ⊙ [y > 0]` for ReLU (`g` itself for the identity), as one
/// contiguous (n, out) buffer: borrowed when `g` already is one and nothing is masked.
pub fn output_grad<'g>(act: Activation, y: Option<&[f32]>, g: MatRef<'g>) -> Result<std::borrow::Cow<'g, [f32]>> {
    let (n, out) = (g.rows, g.cols);
    if let (Activation::Identity, Some(s)) = (act, g.contiguous()) {
        return Ok(std::borrow::Cow::Borrowed(s));
    }
    let len = elems("fused linear backward: the output gradient", n, out)?;
    let mask = match act {
        Activation::Relu => match y {
            Some(y) if y.len() == len => Some(y),
            _ => bail!("fused linear backward: ReLU needs the forward output ({n}x{out} values)"),
        },
        Activation::Identity => None,
    };
    let mut v = vec![0f32; len];
    match (g.contiguous(), mask) {
        // The common case, as straight slices the compiler vectorises: g' = g where y > 0, else 0.
        (Some(gs), Some(m)) => {
            for ((d, &gv), &yv) in v.iter_mut().zip(gs).zip(m) {
                *d = if yv > 0.0 { gv } else { 0.0 };
            }
        }
        _ => {
            for (i, row) in v.chunks_exact_mut(out.max(1)).enumerate() {
                for (j, d) in row.iter_mut().enumerate() {
                    let keep = mask.is_none_or(|m| m[i * out + j] > 0.0);
                    *d = if keep { g.get(i, j) } else { 0.0 };
                }
            }
        }
    }
    Ok(std::borrow::Cow::Owned(v))
}

/// The gradients of [`linear_forward`] given `g = ∂L/∂y` (n, out); `y` (the forward's output) is needed
/// for the ReLU mask.
pub fn linear_backward(
    x: MatRef<'_>,
    p: &LinearRef<'_>,
    act: Activation,
    y: Option<&[f32]>,
    g: MatRef<'_>,
    grads: LinearGrads<'_>,
) -> Result<()> {
    let (n, inp, out) = p.check(&x)?;
    if g.rows != n || g.cols != out {
        bail!("fused linear backward: gradient ({}, {}), expected ({n}, {out})", g.rows, g.cols)
    }
    let gc = output_grad(act, y, g)?;
    let gc: &[f32] = &gc;
    let gm = MatRef::row_major(gc, n, out)?;
    let LinearGrads { dx, dw, db, da, dlora_b, accumulate: acc } = grads;
    if let Some(db) = &db {
        if db.len() != out {
            bail!("fused linear backward: bias gradient buffer has {} values, expected {out}", db.len())
        }
    }
    if let Some(dx) = &dx {
        if Some(dx.len()) != n.checked_mul(inp) {
            bail!("fused linear backward: input gradient buffer has {} values, expected {n}x{inp}", dx.len())
        }
    }
    // The adapter's small products first: g·B feeds both dA and dx.
    let mut gb = Vec::new();
    if let Some(ad) = &p.adapter {
        let r = ad.a.rows;
        let nr = elems("fused linear backward: g·B", n, r)?;
        if da.is_some() || dx.is_some() {
            gb = vec![0f32; nr];
            matmul_into(&mut gb, gm, ad.b, 1.0, false)?; // (n, out)·(out, r)
        }
        if let Some(da) = da {
            matmul_into(da, MatRef::row_major(&gb, n, r)?.t(), x, ad.scale, acc)?;
            // s·(r, n)·(n, in)
        }
        if let Some(dlb) = dlora_b {
            let mut xa = vec![0f32; nr];
            matmul_into(&mut xa, x, ad.a.t(), 1.0, false)?; // (n, r)
            matmul_into(dlb, gm.t(), MatRef::row_major(&xa, n, r)?, ad.scale, acc)?;
            // s·(out, n)·(n, r)
        }
    }
    let weight_grads = || -> Result<()> {
        if let Some(dw) = dw {
            matmul_into(dw, gm.t(), x, 1.0, acc)?; // (out, n)·(n, in)
        }
        if let Some(db) = db {
            if !acc {
                db.fill(0.0);
            }
            for row in gc.chunks_exact(out.max(1)) {
                for (d, v) in db.iter_mut().zip(row) {
                    *d += *v;
                }
            }
        }
        Ok(())
    };
    let input_grad = || -> Result<()> {
        if let Some(dx) = dx {
            matmul_into(dx, gm, p.weight, 1.0, acc)?; // (n, out)·(out, in)
            if let Some(ad) = &p.adapter {
                matmul_into(dx, MatRef::row_major(&gb, n, ad.a.rows)?, ad.a, ad.scale, true)?;
                // + s·(n, r)·(r, in)
            }
        }
        Ok(())
    };
    // dW and dx could run side by side, one per core, unsplit: measured no faster here than splitting
    // each across the cores in turn (the two compete for memory bandwidth), so they run in turn.
    weight_grads()?;
    input_grad()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_that_overflow_are_refused_with_an_error_not_a_wrapped_buffer() {
        // A stride-0 view repeats one row: 2⁶² rows fit in 4 values, and 2⁶² · 4 wraps to 0 in release
        // arithmetic (a panic with overflow checks), so every buffer length must be checked.
        let v = [0.5f32; 16];
        let tall = MatRef::new(&v, 1 << 62, 4, 0, 1).unwrap();
        let w = MatRef::row_major(&v, 4, 4).unwrap();
        let a = MatRef::row_major(&v[..8], 2, 4).unwrap();
        let b = MatRef::row_major(&v[..8], 4, 2).unwrap();
        let p = LinearRef { weight: w, bias: None, adapter: Some(AdapterRef { a, b, scale: 1.0 }) };
        let e = linear_forward(tall, &p, Activation::Identity, &mut []).unwrap_err();
        assert!(e.to_string().contains("matmul_into"), "{e}");
        let g = MatRef::new(&v, 1 << 62, 4, 0, 1).unwrap();
        for act in [Activation::Identity, Activation::Relu] {
            let mut dx = [0f32; 0];
            let grads = LinearGrads { dx: Some(&mut dx), ..LinearGrads::default() };
            let e = linear_backward(tall, &p, act, Some(&[]), g, grads).unwrap_err();
            assert!(e.to_string().contains("overflow") || e.to_string().contains("needs the forward output"), "{act:?}: {e}");
        }
    }

    #[test]
    fn a_layer_with_no_outputs_gives_an_empty_output_and_gradients() {
        let x = [1f32; 6];
        let p = LinearRef { weight: MatRef::row_major(&[], 0, 3).unwrap(), bias: Some(&[]), adapter: None };
        let xm = MatRef::row_major(&x, 2, 3).unwrap();
        linear_forward(xm, &p, Activation::Relu, &mut []).unwrap();
        let (mut dx, mut db) = ([7f32; 6], [0f32; 0]);
        let grads = LinearGrads { dx: Some(&mut dx), db: Some(&mut db), ..LinearGrads::default() };
        linear_backward(xm, &p, Activation::Relu, Some(&[]), MatRef::row_major(&[], 2, 0).unwrap(), grads).unwrap();
        assert_eq!(dx, [0.0; 6], "dx = g·W with no outputs is zero");
    }
}
