//! The fused path of [`LoraLinear`]: one candle custom op per layer instead of a chain of tensor ops, on the
//! kernels of `lora-kernels`.
//!
//! The forward computes, for x (n, in), W0 (out, in), bias b (out), A (r, in), B (out, r), scale s:
//!
//! ```text
//! y = act(x·W0ᵀ + b + s·(x·Aᵀ)·Bᵀ)          act ∈ {identity, ReLU}
//! ```
//!
//! with the matrix products of `lora_kernels::matmul_into`: our SIMD kernels (AVX-512, AVX2 or NEON) for the skinny
//! shapes of batch training (`sgemm`: no copy of the weight, transposed operands read through their
//! strides, sparse ReLU-masked gradients compressed to their non-zeros), else the `gemm` crate candle's
//! CPU matmul uses.
//! The outputs match [`Backend::Reference`] to f32 rounding (the sums run in another order), and they do
//! not depend on the number of threads.
//!
//! The backward computes only what the graph needs, with g = ∂L/∂y (masked by y > 0 for ReLU):
//!
//! ```text
//! dA = s·(g·B)ᵀ·x      dB = s·gᵀ·(x·Aᵀ)      dx = g·W0 + s·(g·B)·A      dW0 = gᵀ·x      db = Σ_rows g
//! ```
//!
//! A frozen W0 and bias are constants held by the op (no gradient is ever formed for them), and dx is
//! skipped when x does not depend on any variable (the first layer's input).
//!
//! Which op serves a layer is [`plan`]'s decision, from the layer's state alone; a state no op serves (several
//! active adapters, dropout while training, a LoRA bias, PiSSA/OLoRA, an adapter's copies of the layer, an
//! embedding) takes the reference path.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use std::sync::Arc;

use lora_kernels::{linear_backward, linear_forward, Activation, AdapterRef, Bf16Matrix, LinearGrads, LinearRef, MatRef, WeightRef};

use super::{Adapter, Backend, Base, LoraLinear};
use crate::bridge::{cpu_mat, cpu_slice, Held};
use crate::error::Result;

type CResult<T> = candle_core::Result<T>;

/// A kernel's result as candle's (the custom ops answer in candle's errors).
fn k<T>(r: lora_kernels::Result<T>) -> CResult<T> {
    r.map_err(candle_core::Error::wrap)
}

fn out_tensor(v: Vec<f32>, shape: (usize, usize)) -> CResult<Tensor> {
    Tensor::from_vec(v, shape, &candle_core::Device::Cpu)
}

/// The op of a layer whose base is frozen: W0 and bias are constants held by the op; the arguments are
/// x alone (no adapter, [`CustomOp1`]) or (x, A, B) ([`CustomOp3`]).
struct FrozenBaseOp {
    weight: Frozen,
    bias: Option<Tensor>,
    scale: f32,
    act: Activation,
}

/// A frozen base weight as the op reads it: an f32 tensor, or the layer's bf16 weight.
enum Frozen {
    F32(Tensor),
    Bf16(Arc<Bf16Matrix>),
}

impl Frozen {
    fn of(layer: &LoraLinear) -> Frozen {
        match &layer.weight {
            Base::F32(v) => Frozen::F32(v.as_detached_tensor()),
            Base::Bf16(m) => Frozen::Bf16(m.clone()),
        }
    }
}

impl FrozenBaseOp {
    fn run<R>(&self, a: Option<MatRef<'_>>, b: Option<MatRef<'_>>, f: impl FnOnce(&LinearRef<'_>) -> CResult<R>) -> CResult<R> {
        let held;
        let weight = match &self.weight {
            Frozen::F32(t) => {
                held = Held::new(t);
                WeightRef::F32(held.mat()?)
            }
            Frozen::Bf16(m) => WeightRef::Bf16(m),
        };
        let bias = self.bias.as_ref().map(Held::new);
        let adapter = match (a, b) {
            (Some(a), Some(b)) => Some(AdapterRef { a, b, scale: self.scale }),
            _ => None,
        };
        let p = LinearRef { weight, bias: bias.as_ref().map(|h| h.slice()).transpose()?, adapter };
        f(&p)
    }

    fn forward(&self, x: MatRef<'_>, a: Option<MatRef<'_>>, b: Option<MatRef<'_>>) -> CResult<(CpuStorage, Shape)> {
        self.run(a, b, |p| {
            let mut y = vec![0f32; x.rows() * p.weight.rows()];
            k(linear_forward(x, p, self.act, &mut y))?;
            Ok((CpuStorage::F32(y), Shape::from((x.rows(), p.weight.rows()))))
        })
    }

    /// Returns (dx, dA, dB), each only when its tensor is tracked.
    fn backward(&self, x: &Tensor, ab: Option<(&Tensor, &Tensor)>, res: &Tensor, grad: &Tensor) -> CResult<[Option<Tensor>; 3]> {
        let (hx, hy, hg) = (Held::new(x), Held::new(res), Held::new(grad));
        let (ha, hb) = match ab {
            Some((a, b)) => (Some(Held::new(a)), Some(Held::new(b))),
            None => (None, None),
        };
        let xm = hx.mat()?;
        let mats = (ha.as_ref().map(|h| h.mat()).transpose()?, hb.as_ref().map(|h| h.mat()).transpose()?);
        self.run(mats.0, mats.1, |p| {
            let (n, inp, out) = (xm.rows(), xm.cols(), p.weight.rows());
            let r = p.adapter.map_or(0, |ad| ad.a.rows());
            let want_a = ab.is_some_and(|(a, _)| a.track_op());
            let want_b = ab.is_some_and(|(_, b)| b.track_op());
            let mut dx = x.track_op().then(|| vec![0f32; n * inp]);
            let mut da = want_a.then(|| vec![0f32; r * inp]);
            let mut dlb = want_b.then(|| vec![0f32; out * r]);
            let grads = LinearGrads { dx: dx.as_deref_mut(), da: da.as_deref_mut(), dlora_b: dlb.as_deref_mut(), ..LinearGrads::default() };
            let y = if self.act == Activation::Relu { Some(hy.slice()?) } else { None };
            k(linear_backward(xm, p, self.act, y, hg.mat()?, grads))?;
            Ok([
                dx.map(|v| out_tensor(v, (n, inp))).transpose()?,
                da.map(|v| out_tensor(v, (r, inp))).transpose()?,
                dlb.map(|v| out_tensor(v, (out, r))).transpose()?,
            ])
        })
    }
}

impl CustomOp1 for FrozenBaseOp {
    fn name(&self) -> &'static str {
        "lora-fused-frozen-linear"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        self.forward(cpu_mat(s, l)?, None, None)
    }
    fn bwd(&self, x: &Tensor, res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let [dx, _, _] = self.backward(x, None, res, &grad.contiguous()?)?;
        Ok(dx)
    }
}

impl CustomOp3 for FrozenBaseOp {
    fn name(&self) -> &'static str {
        "lora-fused-linear"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        self.forward(cpu_mat(s1, l1)?, Some(cpu_mat(s2, l2)?), Some(cpu_mat(s3, l3)?))
    }
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [dx, da, db] = self.backward(x, Some((a, b)), res, &grad.contiguous()?)?;
        Ok((dx, da, db))
    }
}

/// The op of a layer whose base trains and which has no active adapter: arguments (x, W, b) or (x, W).
struct TrainableBaseOp {
    act: Activation,
}

impl TrainableBaseOp {
    fn forward(&self, x: MatRef<'_>, w: MatRef<'_>, bias: Option<&[f32]>) -> CResult<(CpuStorage, Shape)> {
        let p = LinearRef { weight: WeightRef::F32(w), bias, adapter: None };
        let mut y = vec![0f32; x.rows() * w.rows()];
        k(linear_forward(x, &p, self.act, &mut y))?;
        Ok((CpuStorage::F32(y), Shape::from((x.rows(), w.rows()))))
    }

    fn backward(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>, res: &Tensor, grad: &Tensor) -> CResult<[Option<Tensor>; 3]> {
        let (hx, hw, hy, hg) = (Held::new(x), Held::new(w), Held::new(res), Held::new(grad));
        let hb = bias.map(Held::new);
        let p = LinearRef { weight: WeightRef::F32(hw.mat()?), bias: hb.as_ref().map(|h| h.slice()).transpose()?, adapter: None };
        let xm = hx.mat()?;
        let (n, inp, out) = (xm.rows(), xm.cols(), p.weight.rows());
        let mut dx = x.track_op().then(|| vec![0f32; n * inp]);
        let mut dw = w.track_op().then(|| vec![0f32; out * inp]);
        let mut db = bias.filter(|b| b.track_op()).map(|_| vec![0f32; out]);
        let grads = LinearGrads { dx: dx.as_deref_mut(), dw: dw.as_deref_mut(), db: db.as_deref_mut(), ..LinearGrads::default() };
        let y = if self.act == Activation::Relu { Some(hy.slice()?) } else { None };
        k(linear_backward(xm, &p, self.act, y, hg.mat()?, grads))?;
        Ok([
            dx.map(|v| out_tensor(v, (n, inp))).transpose()?,
            dw.map(|v| out_tensor(v, (out, inp))).transpose()?,
            db.map(|v| Tensor::from_vec(v, out, &candle_core::Device::Cpu)).transpose()?,
        ])
    }
}

impl CustomOp2 for TrainableBaseOp {
    fn name(&self) -> &'static str {
        "lora-fused-base-linear"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        self.forward(cpu_mat(s1, l1)?, cpu_mat(s2, l2)?, None)
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, res: &Tensor, grad: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let [dx, dw, _] = self.backward(x, w, None, res, &grad.contiguous()?)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for TrainableBaseOp {
    fn name(&self) -> &'static str {
        "lora-fused-base-linear-bias"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        if l3.dims().len() != 1 {
            candle_core::bail!("fused linear: the bias must be a vector, got shape {:?}", l3.dims())
        }
        self.forward(cpu_mat(s1, l1)?, cpu_mat(s2, l2)?, Some(cpu_slice(s3, l3)?))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [dx, dw, db] = self.backward(x, w, Some(b), res, &grad.contiguous()?)?;
        Ok((dx, dw, db))
    }
}

/// The fused op that serves a layer's state, with the adapter it reads.
#[derive(Debug, Clone, Copy)]
pub(super) enum Plan<'a> {
    /// Base frozen, one DoRA adapter: `z = x·W0ᵀ + s·(x·Aᵀ)·Bᵀ` in the op, then `act(f ⊙ z + b)` in candle's
    /// graph (so the magnitude's gradient comes from candle's product rule).
    Dora(&'a Adapter),
    /// Base frozen, no adapter or one plain one: the whole layer in one op.
    Frozen(Option<&'a Adapter>),
    /// Base trains and no adapter is active: the whole layer in one op, with dW and db.
    TrainableBase,
}

/// Which fused op serves `layer` on x, or `None` (the reference path then runs). An op serves a layer whose
/// backend is [`Backend::Fused`], on a 2-D f32 CPU input, with an f32 or bf16 weight, no active adapter's copies of
/// the layer, no embedding table, at most one active unmerged adapter without dropout (while training), LoRA
/// bias or PiSSA/OLoRA starting point, and a base that is either frozen or trains with no adapter.
pub(super) fn plan<'a>(layer: &'a LoraLinear, x: &Tensor, train: bool) -> Result<Option<Plan<'a>>> {
    if layer.backend() != Backend::Fused || !x.device().is_cpu() || x.dtype() != DType::F32 || x.rank() != 2 {
        return Ok(None);
    }
    if layer.active_override().is_some() || layer.is_embedding() {
        return Ok(None);
    }
    let mut adapters = Vec::new();
    if !layer.is_disabled() {
        for name in layer.active().iter().filter(|n| !layer.merged().contains(n)) {
            adapters.push(layer.adapter(name)?);
        }
    }
    if adapters.len() > 1 || adapters.iter().any(|ad| (train && ad.dropout() > 0.0) || ad.lora_bias().is_some() || ad.initial().is_some()) {
        return Ok(None);
    }
    let (w_train, b_train) = layer.base_trainable();
    let b_train = b_train && layer.bias().is_some();
    Ok(match (w_train, b_train, adapters.first()) {
        (false, false, Some(ad)) if ad.magnitude().is_some() => Some(Plan::Dora(ad)),
        (false, false, ad) => Some(Plan::Frozen(ad.copied())),
        (true, _, None) if b_train || layer.bias().is_none() => Some(Plan::TrainableBase),
        _ => None,
    })
}

/// The fused forward of `layer` on x (n, in) when an op serves it ([`plan`]); `None` otherwise.
pub(super) fn try_forward(layer: &LoraLinear, x: &Tensor, train: bool, act: Activation) -> Result<Option<Tensor>> {
    let Some(plan) = plan(layer, x, train)? else { return Ok(None) };
    let y = match plan {
        Plan::Dora(ad) => {
            let f = ad.dora_factor(&layer.weight()?)?.ok_or_else(|| crate::LoraError::State("no magnitude".into()))?;
            let op = FrozenBaseOp { weight: Frozen::of(layer), bias: None, scale: ad.scale() as f32, act: Activation::Identity };
            let z = x.apply_op3(ad.a().as_tensor(), ad.b().as_tensor(), op)?;
            let mut y = z.broadcast_mul(&f)?;
            if let Some(b) = layer.bias() {
                y = y.broadcast_add(&b.as_detached_tensor())?;
            }
            if act == Activation::Relu {
                y.relu()?
            } else {
                y
            }
        }
        Plan::Frozen(adapter) => {
            let op = FrozenBaseOp {
                weight: Frozen::of(layer),
                bias: layer.bias().map(|b| b.as_detached_tensor()),
                scale: adapter.map_or(0.0, |ad| ad.scale() as f32),
                act,
            };
            match adapter {
                Some(ad) => x.apply_op3(ad.a().as_tensor(), ad.b().as_tensor(), op)?,
                None if x.track_op() => x.apply_op1(op)?,
                None => x.apply_op1_no_bwd(&op)?,
            }
        }
        Plan::TrainableBase => {
            let op = TrainableBaseOp { act };
            // A weight that trains is held in f32 (set_base_trainable widens a bf16 one).
            let w = layer.weight()?;
            match layer.bias() {
                Some(b) => x.apply_op3(&w, b.as_tensor(), op)?,
                None => x.apply_op2(&w, op)?,
            }
        }
    };
    Ok(Some(y))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::testing::{flat, rand_vec, reference, t2};
    use candle_core::{Device, Var};

    /// A layer (out, in) with bias and one active adapter of rank r, alpha ≠ r, and a non-zero B.
    fn layer(inp: usize, out: usize, r: usize, alpha: f64, frozen: bool, backend: Backend) -> LoraLinear {
        let mut l =
            LoraLinear::new(t2(rand_vec(out * inp, 1), (out, inp)), Some(Tensor::from_vec(rand_vec(out, 2), out, &Device::Cpu).unwrap()))
                .unwrap();
        if frozen {
            let ad = Adapter::from_tensors(
                &t2(rand_vec(r * inp, 3), (r, inp)),
                &t2(rand_vec(out * r, 4), (out, r)),
                alpha,
                alpha / r as f64,
                0.0,
            )
            .unwrap();
            l.insert_adapter("a", ad).unwrap();
            l.set_active(&["a"]).unwrap();
            l.freeze_base();
        }
        l.set_backend(backend);
        l
    }

    /// |got − want| ≤ tol·(1 + max|want|) element-wise.
    fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        let scale = 1.0 + want.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= tol * scale, "{what}[{i}]: fused {g} vs reference {w}");
        }
    }

    /// Loss Σ c ⊙ act(y)²/2 (non-linear, so every gradient is a non-trivial function of the inputs).
    fn loss(y: &Tensor, c: &Tensor) -> Tensor {
        ((y.sqr().unwrap() * c).unwrap().sum_all().unwrap() / 2.0).unwrap()
    }

    #[test]
    fn fused_forward_matches_the_reference_forward() {
        let (n, inp, out, r, alpha) = (9, 37, 23, 3, 5.0);
        let x = t2(rand_vec(n * inp, 10), (n, inp));
        for frozen in [true, false] {
            let f = layer(inp, out, r, alpha, frozen, Backend::Fused);
            let rf = layer(inp, out, r, alpha, frozen, Backend::Reference);
            assert!(plan(&f, &x, false).unwrap().is_some(), "the fused op serves the layer (frozen = {frozen})");
            // Our kernels sum x·Wᵀ in another order than candle's gemm: f32 rounding of sums of 37 terms of
            // size ≲ 1, ≈ 37·6e-8; 1e-5 of the largest value is a safe bound that any wrong term breaks.
            assert_close(&flat(&f.forward(&x).unwrap()), &flat(&rf.forward(&x).unwrap()), 1e-5, &format!("identity, frozen = {frozen}"));
            let yf = f.forward_act_t(&x, false, Activation::Relu).unwrap();
            let yr = rf.forward_act_t(&x, false, Activation::Relu).unwrap();
            assert_close(&flat(&yf), &flat(&yr), 1e-5, &format!("relu, frozen = {frozen}"));
        }
    }

    #[test]
    fn fused_lora_backward_matches_candle_autograd() {
        let (n, inp, out, r, alpha) = (7, 33, 19, 2, 3.0);
        let xv = Var::from_tensor(&t2(rand_vec(n * inp, 20), (n, inp))).unwrap(); // tracked: dx is wanted
        let c = t2(rand_vec(n * out, 21), (n, out));
        let mut results = Vec::new();
        for backend in [Backend::Fused, Backend::Reference] {
            let l = layer(inp, out, r, alpha, true, backend);
            assert_eq!(plan(&l, xv.as_tensor(), true).unwrap().is_some(), backend == Backend::Fused);
            for act in [Activation::Identity, Activation::Relu] {
                let g = loss(&l.forward_act_t(xv.as_tensor(), true, act).unwrap(), &c).backward().unwrap();
                assert!(
                    g.get(l.weight_var().unwrap().as_tensor()).is_none() && g.get(l.bias().unwrap().as_tensor()).is_none(),
                    "frozen base got a gradient"
                );
                let ad = l.adapter("a").unwrap();
                let grad = |t: &Tensor| flat(g.get(t).expect("missing gradient"));
                results.push((backend, act, grad(xv.as_tensor()), grad(ad.a().as_tensor()), grad(ad.b().as_tensor())));
            }
        }
        let (fused, reference) = results.split_at(2);
        for (f, r) in fused.iter().zip(reference) {
            // Same sums in a different order (gemm blocking, s applied before or after a sum): f32 rounding of
            // sums of ≤ 33 terms of size ≲ 10, ≈ 33·6e-8 relative; 1e-5 of the largest value is a safe bound.
            assert_close(&f.2, &r.2, 1e-5, &format!("dx {:?}", f.1));
            assert_close(&f.3, &r.3, 1e-5, &format!("dA {:?}", f.1));
            assert_close(&f.4, &r.4, 1e-5, &format!("dB {:?}", f.1));
        }
    }

    #[test]
    fn fused_dora_matches_the_reference_in_outputs_and_every_gradient() {
        let (n, inp, out, r, alpha) = (6, 29, 17, 3, 4.0);
        let xv = Var::from_tensor(&t2(rand_vec(n * inp, 30), (n, inp))).unwrap();
        let c = t2(rand_vec(n * out, 31), (n, out));
        let mut results = Vec::new();
        for backend in [Backend::Fused, Backend::Reference] {
            let mut l = layer(inp, out, r, alpha, true, backend);
            let ad = l.remove_adapter("a").unwrap().unwrap();
            // A magnitude away from the row norms, so f ≠ 1 and every term of the DoRA output counts.
            let m = Tensor::from_vec(rand_vec(out, 32).iter().map(|v| 3.0 + v).collect::<Vec<_>>(), out, &Device::Cpu).unwrap();
            let ad =
                Adapter::from_tensors(ad.a().as_tensor(), ad.b().as_tensor(), alpha, ad.scale(), 0.0).unwrap().with_magnitude(&m).unwrap();
            l.insert_adapter("a", ad).unwrap();
            l.set_active(&["a"]).unwrap();
            assert_eq!(matches!(plan(&l, xv.as_tensor(), true).unwrap(), Some(Plan::Dora(_))), backend == Backend::Fused);
            for act in [Activation::Identity, Activation::Relu] {
                let y = l.forward_act_t(xv.as_tensor(), true, act).unwrap();
                let g = loss(&y, &c).backward().unwrap();
                let ad = l.adapter("a").unwrap();
                let grad = |t: &Tensor| flat(g.get(t).expect("missing gradient"));
                let mag = grad(ad.magnitude().unwrap().as_tensor());
                results.push((act, flat(&y), grad(xv.as_tensor()), grad(ad.a().as_tensor()), grad(ad.b().as_tensor()), mag));
            }
        }
        let (fused, reference) = results.split_at(2);
        for (f, r) in fused.iter().zip(reference) {
            // As the plain LoRA test: sums of ≤ 29 terms in other orders, then one product with f.
            assert_close(&f.1, &r.1, 1e-5, &format!("y {:?}", f.0));
            assert_close(&f.2, &r.2, 1e-5, &format!("dx {:?}", f.0));
            assert_close(&f.3, &r.3, 1e-5, &format!("dA {:?}", f.0));
            assert_close(&f.4, &r.4, 1e-5, &format!("dB {:?}", f.0));
            assert_close(&f.5, &r.5, 1e-5, &format!("dm {:?}", f.0));
        }
    }

    #[test]
    fn fused_trainable_base_gradients_match_candle_autograd() {
        let (n, inp, out) = (6, 29, 17);
        let xv = Var::from_tensor(&t2(rand_vec(n * inp, 30), (n, inp))).unwrap();
        let c = t2(rand_vec(n * out, 31), (n, out));
        let mut results = Vec::new();
        for backend in [Backend::Fused, Backend::Reference] {
            let l = layer(inp, out, 1, 1.0, false, backend);
            assert_eq!(matches!(plan(&l, xv.as_tensor(), true).unwrap(), Some(Plan::TrainableBase)), backend == Backend::Fused);
            let g = loss(&l.forward_act_t(xv.as_tensor(), true, Activation::Relu).unwrap(), &c).backward().unwrap();
            let grad = |t: &Tensor| flat(g.get(t).expect("missing gradient"));
            results.push([grad(xv.as_tensor()), grad(l.weight_var().unwrap().as_tensor()), grad(l.bias().unwrap().as_tensor())]);
        }
        // As above: reordered f32 sums of ≤ 29 terms; 1e-5 relative to the largest value.
        for (i, what) in ["dx", "dW", "db"].iter().enumerate() {
            assert_close(&results[0][i], &results[1][i], 1e-5, what);
        }
    }

    #[test]
    fn the_first_layers_input_gets_no_gradient_and_a_frozen_base_none() {
        let l = layer(11, 5, 2, 4.0, true, Backend::Fused);
        let x = t2(rand_vec(3 * 11, 40), (3, 11)); // a plain tensor: nothing upstream to train
        let y = l.forward(&x).unwrap();
        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(&x).is_none());
        assert!(g.get(l.weight_var().unwrap().as_tensor()).is_none());
        assert!(g.get(l.adapter("a").unwrap().a().as_tensor()).is_some());
    }

    #[test]
    fn layers_the_fused_op_cannot_serve_fall_back_to_the_reference_path() {
        // Each state no op serves: `plan` finds none, and the output is still the layer's function, checked
        // against the f64 loops (which share no code with either path). A fused op that took such a layer
        // and dropped what it cannot compute (a second adapter, a LoRA bias, an adapter's own bias) fails
        // the comparison; one that took it and computed it all fails the `plan` check.
        let (n, inp, out, r, alpha) = (4, 8, 6, 2, 2.0);
        let s = alpha / r as f64;
        let x = rand_vec(n * inp, 52);
        let xt = t2(x.clone(), (n, inp));
        // `layer`'s values (seeds 1–4): W (out, in), b (out), A (r, in), B (out, r).
        let (w, bias, a, b) = (rand_vec(out * inp, 1), rand_vec(out, 2), rand_vec(r * inp, 3), rand_vec(out * r, 4));
        let lora = reference(&x, &w, &bias, &a, &b, s, n, inp, out, r); // x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ, f64
        let (a2, b2, extra) = (rand_vec(inp, 50), rand_vec(out, 51), rand_vec(out, 53));
        let zeros = (vec![0f32; out * inp], vec![0f32; out]);
        let second = reference(&x, &zeros.0, &zeros.1, &a2, &b2, 3.0, n, inp, out, 1); // 3·(x·A2ᵀ)·B2ᵀ
        let check = |l: &LoraLinear, want: Vec<f64>, what: &str| {
            assert!(plan(l, &xt, false).unwrap().is_none(), "{what}: a fused op took the layer");
            let got = flat(&l.forward(&xt).unwrap());
            // f32 sums of ≤ 8 terms of size ≤ 1 and products with s ≤ 3: rounding well under 1e-5, while
            // each dropped part is ≳ 0.1 somewhere (its values are of size ≈ 1).
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((*g as f64 - w).abs() < 1e-5, "{what}: y[{i}] = {g} vs {w}");
            }
        };
        // Two active adapters: the sum of both deltas.
        let mut l = layer(inp, out, r, alpha, true, Backend::Fused);
        let ad = Adapter::from_tensors(&t2(a2.clone(), (1, inp)), &t2(b2.clone(), (out, 1)), 3.0, 3.0, 0.0).unwrap();
        l.insert_adapter("b", ad).unwrap();
        assert!(plan(&l, &xt, false).unwrap().is_some(), "one plain adapter is the op's");
        l.set_active(&["a", "b"]).unwrap();
        check(&l, lora.iter().zip(&second).map(|(p, q)| p + q).collect(), "two adapters");
        // A LoRA bias: + s·b_B.
        let mut l = layer(inp, out, r, alpha, true, Backend::Fused);
        let ad = l.remove_adapter("a").unwrap().unwrap();
        let lb = Tensor::from_vec(extra.clone(), out, &Device::Cpu).unwrap();
        let ad = Adapter::from_tensors(ad.a().as_tensor(), ad.b().as_tensor(), alpha, s, 0.0).unwrap().with_lora_bias(&lb).unwrap();
        l.insert_adapter("a", ad).unwrap();
        l.set_active(&["a"]).unwrap();
        check(&l, lora.iter().enumerate().map(|(i, v)| v + s * extra[i % out] as f64).collect(), "LoRA bias");
        // The adapter's own trained bias in place of b.
        let mut l = layer(inp, out, r, alpha, true, Backend::Fused);
        l.insert_override("a", None, Some(&Tensor::from_vec(extra.clone(), out, &Device::Cpu).unwrap())).unwrap();
        check(&l, lora.iter().enumerate().map(|(i, v)| v - bias[i % out] as f64 + extra[i % out] as f64).collect(), "trained bias");
        // Dropout: no op while training (the mask is the reference path's), the op at inference.
        let mut l = layer(inp, out, r, alpha, true, Backend::Fused);
        let ad = l.remove_adapter("a").unwrap().unwrap();
        l.insert_adapter("a", Adapter::from_tensors(ad.a().as_tensor(), ad.b().as_tensor(), alpha, s, 0.5).unwrap()).unwrap();
        l.set_active(&["a"]).unwrap();
        assert!(plan(&l, &xt, true).unwrap().is_none() && plan(&l, &xt, false).unwrap().is_some(), "dropout");
    }
}
