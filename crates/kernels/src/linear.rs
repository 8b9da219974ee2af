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

use crate::bf16::Bf16Matrix;
use crate::error::{bail, elems, Result};
use crate::mat::MatRef;
use crate::matmul::{matmul_bf16_into, matmul_bf16_plain_into, matmul_into};

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

/// A layer's weight W (out, in) as held: f32 (any strides), or bf16 (a frozen base: the products read
/// it with the bits of its f32 values, and it has no gradient).
#[derive(Debug, Clone, Copy)]
pub enum WeightRef<'a> {
    /// f32 values.
    F32(MatRef<'a>),
    /// bf16 values, frozen.
    Bf16(&'a Bf16Matrix),
}

impl WeightRef<'_> {
    /// Rows (outputs).
    pub fn rows(&self) -> usize {
        match self {
            WeightRef::F32(m) => m.rows,
            WeightRef::Bf16(m) => m.rows(),
        }
    }
    /// Columns (inputs).
    pub fn cols(&self) -> usize {
        match self {
            WeightRef::F32(m) => m.cols,
            WeightRef::Bf16(m) => m.cols(),
        }
    }
    /// `dst = [dst +] beta·x·Wᵀ`.
    fn times_t(&self, dst: &mut [f32], x: MatRef<'_>, beta: f32, accumulate: bool) -> Result<()> {
        match self {
            WeightRef::F32(w) => matmul_into(dst, x, w.t(), beta, accumulate),
            WeightRef::Bf16(w) => matmul_bf16_into(dst, x, w, None, beta, accumulate),
        }
    }
    /// `dst = [dst +] beta·g·W`.
    fn times(&self, dst: &mut [f32], g: MatRef<'_>, beta: f32, accumulate: bool) -> Result<()> {
        match self {
            WeightRef::F32(w) => matmul_into(dst, g, *w, beta, accumulate),
            WeightRef::Bf16(w) => matmul_bf16_plain_into(dst, g, w, beta, accumulate),
        }
    }
}

/// A linear layer's tensors as a kernel reads them.
#[derive(Debug, Clone, Copy)]
pub struct LinearRef<'a> {
    /// W, (out, in).
    pub weight: WeightRef<'a>,
    /// b, (out), contiguous.
    pub bias: Option<&'a [f32]>,
    /// The active adapter, if any.
    pub adapter: Option<AdapterRef<'a>>,
}

impl LinearRef<'_> {
    fn check(&self, x: &MatRef<'_>) -> Result<(usize, usize, usize)> {
        let (n, inp, out) = (x.rows, x.cols, self.weight.rows());
        if self.weight.cols() != inp || self.bias.is_some_and(|b| b.len() != out) {
            bail!("fused linear: input ({n}, {inp}) does not fit weight ({out}, {})", self.weight.cols())
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
    p.weight.times_t(y, x, 1.0, false)?;
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
    if dw.is_some() && matches!(p.weight, WeightRef::Bf16(_)) {
        bail!("fused linear backward: a weight held in bf16 is frozen (it has no gradient)")
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
            p.weight.times(dx, gm, 1.0, acc)?; // (n, out)·(out, in)
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
        let p = LinearRef { weight: WeightRef::F32(w), bias: None, adapter: Some(AdapterRef { a, b, scale: 1.0 }) };
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
        let p = LinearRef { weight: WeightRef::F32(MatRef::row_major(&[], 0, 3).unwrap()), bias: Some(&[]), adapter: None };
        let xm = MatRef::row_major(&x, 2, 3).unwrap();
        linear_forward(xm, &p, Activation::Relu, &mut []).unwrap();
        let (mut dx, mut db) = ([7f32; 6], [0f32; 0]);
        let grads = LinearGrads { dx: Some(&mut dx), db: Some(&mut db), ..LinearGrads::default() };
        linear_backward(xm, &p, Activation::Relu, Some(&[]), MatRef::row_major(&[], 2, 0).unwrap(), grads).unwrap();
        assert_eq!(dx, [0.0; 6], "dx = g·W with no outputs is zero");
    }

    #[test]
    fn a_frozen_bf16_weight_gives_the_bits_of_its_f32_values_forward_and_backward() {
        use rand::{Rng, SeedableRng};
        let mut g = rand::rngs::StdRng::seed_from_u64(5);
        let mut v = |n: usize, bf16: bool| -> Vec<f32> {
            (0..n)
                .map(|_| g.random::<f32>() * 2.0 - 1.0)
                .map(|x| if bf16 { f32::from_bits(x.to_bits() & 0xFFFF_0000) } else { x })
                .collect()
        };
        // A batch of tokens (the tiles, cut into blocks: out above the block width for in = 600), and a
        // decode step (the dot products).
        for (n, inp, out, r) in [(40, 600, 1800, 4), (2, 96, 80, 3)] {
            let (x, w, bias, a, b, gy) =
                (v(n * inp, false), v(out * inp, true), v(out, false), v(r * inp, false), v(out * r, false), v(n * out, false));
            let packed = crate::Bf16Matrix::pack(&w, out, inp).unwrap();
            let xm = MatRef::row_major(&x, n, inp).unwrap();
            let adapter =
                Some(AdapterRef { a: MatRef::row_major(&a, r, inp).unwrap(), b: MatRef::row_major(&b, out, r).unwrap(), scale: 0.7 });
            let run = |weight: WeightRef<'_>| {
                let p = LinearRef { weight, bias: Some(&bias), adapter };
                let mut y = vec![0f32; n * out];
                linear_forward(xm, &p, Activation::Relu, &mut y).unwrap();
                let (mut dx, mut da, mut db) = (vec![0f32; n * inp], vec![0f32; r * inp], vec![0f32; out * r]);
                let grads = LinearGrads { dx: Some(&mut dx), da: Some(&mut da), dlora_b: Some(&mut db), ..LinearGrads::default() };
                linear_backward(xm, &p, Activation::Relu, Some(&y), MatRef::row_major(&gy, n, out).unwrap(), grads).unwrap();
                [y, dx, da, db].map(|t| t.iter().map(|f| f.to_bits()).collect::<Vec<u32>>())
            };
            let f32_run = run(WeightRef::F32(MatRef::row_major(&w, out, inp).unwrap()));
            assert!(f32_run == run(WeightRef::Bf16(&packed)), "({n}, {inp}, {out}): y, dx, dA, dB must keep their bits");
            // No gradient is ever formed for a bf16 weight.
            let p = LinearRef { weight: WeightRef::Bf16(&packed), bias: None, adapter: None };
            let mut dw = vec![0f32; out * inp];
            let grads = LinearGrads { dw: Some(&mut dw), ..LinearGrads::default() };
            let e = linear_backward(xm, &p, Activation::Identity, None, MatRef::row_major(&gy, n, out).unwrap(), grads).unwrap_err();
            assert!(e.to_string().contains("bf16") && e.to_string().contains("frozen"), "{e}");
        }
    }
}
