//! [`ParamStore`]: the trainable tensors, each with its gradient source and Adam moments.

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use lora::Held;

use crate::error::{Result, TrainError};
use lora_dist::{Bundle, Group};
use lora_optim::{AdamConfig, AdamOp, AdamStep, Moments};

/// A persistent gradient buffer that a fused layer's backward writes into and the optimizer reads.
#[derive(Debug)]
pub struct GradBuffer {
    inner: Mutex<GradData>,
}

#[derive(Debug)]
struct GradData {
    values: Vec<f32>,
    /// Written since the last optimizer step (a second write in the same step adds).
    fresh: bool,
    /// For a weight whose layer may update it during the backward pass: its Adam moments (shared with the
    /// store), and, while a step is under way, that step's constants.
    in_backward: Option<InBackward>,
}

#[derive(Debug)]
struct InBackward {
    moments: Arc<Mutex<Moments>>,
    /// Set by [`ParamStore::arm`] before the backward pass, taken by the layer that applies it.
    armed: Option<AdamStep>,
    /// The layer applied this step's update (the store's step then leaves the parameter alone).
    applied: bool,
}

/// What a layer gets from [`GradBuffer::take_update`]: this step's constants and the moments to update.
pub struct UpdateInBackward {
    /// Adam's constants for the step under way.
    pub step: AdamStep,
    /// The parameter's moments (locked by the layer while it updates).
    pub moments: Arc<Mutex<Moments>>,
}

impl GradBuffer {
    /// A buffer of `n` values.
    pub fn new(n: usize) -> Self {
        GradBuffer { inner: Mutex::new(GradData { values: vec![0.0; n], fresh: false, in_backward: None }) }
    }
    /// When the store armed this buffer for the step under way and nothing was written to it yet, hands
    /// the update to the caller (which must then apply Adam to the parameter itself) and records that it
    /// did; otherwise `None`, and the caller writes the gradient as usual.
    pub fn take_update(&self) -> candle_core::Result<Option<UpdateInBackward>> {
        let mut g = self.lock()?;
        if g.fresh {
            return Ok(None);
        }
        let Some(ib) = g.in_backward.as_mut() else { return Ok(None) };
        if ib.applied {
            // The weight already moved this step: a second backward would read the new weight and leave its
            // gradient to be added into the next step's. One backward per armed step is the contract.
            candle_core::bail!(
                "a second backward pass in one step: the weight was already updated during the first (call \
                 ParamStore::arm and run exactly one backward per step)"
            )
        }
        let Some(step) = ib.armed.take() else { return Ok(None) };
        ib.applied = true;
        Ok(Some(UpdateInBackward { step, moments: ib.moments.clone() }))
    }
    fn lock(&self) -> candle_core::Result<MutexGuard<'_, GradData>> {
        self.inner.lock().map_err(|_| candle_core::Error::Msg("gradient buffer lock poisoned".into()))
    }
    /// Runs `f(values, accumulate)`: `accumulate` is false for the first write after an optimizer step
    /// (overwrite) and true after that (add). Marks the buffer fresh.
    pub fn write<R>(&self, f: impl FnOnce(&mut [f32], bool) -> candle_core::Result<R>) -> candle_core::Result<R> {
        let mut g = self.lock()?;
        let acc = g.fresh;
        let r = f(&mut g.values, acc)?;
        g.fresh = true;
        Ok(r)
    }
    /// A copy of the values if written since the last step.
    pub fn values(&self) -> Option<Vec<f32>> {
        let g = self.lock().ok()?;
        g.fresh.then(|| g.values.clone())
    }
}

#[derive(Debug)]
enum GradSource {
    /// The gradient comes from candle's autograd (`loss.backward()`).
    Autograd,
    /// A fused layer writes the gradient here.
    Buffer(Arc<GradBuffer>),
}

#[derive(Debug)]
struct Param {
    name: String,
    var: Var,
    grad: GradSource,
    moments: Arc<Mutex<Moments>>,
    lr_scale: f32,
}

impl Param {
    fn moments(&self) -> Result<MutexGuard<'_, Moments>> {
        self.moments.lock().map_err(|_| TrainError::setting("parameter", &self.name, "Adam moments lock poisoned"))
    }
}

/// Adam's state for checkpoints: step count and each parameter's moments by name.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimState {
    /// Steps taken (Adam's bias-correction counter).
    pub t: usize,
    /// Each parameter's moments, by the store's name for it.
    pub moments: std::collections::BTreeMap<String, Moments>,
}

/// The trainable tensors of a model with their gradient sources and Adam state; [`ParamStore::step`]
/// applies one fused in-place Adam step to all of them. The `Var`s share storage with the model's
/// tensors, so the model sees every update.
#[derive(Debug)]
pub struct ParamStore {
    params: Vec<Param>,
    cfg: AdamConfig,
    t: usize,
}

impl ParamStore {
    /// An empty store.
    pub fn new(cfg: AdamConfig) -> Self {
        ParamStore { params: Vec::new(), cfg, t: 0 }
    }
    fn push(&mut self, name: &str, var: Var, grad: GradSource, moments: Arc<Mutex<Moments>>) -> Result<()> {
        if !var.as_tensor().is_contiguous() || var.dtype() != candle_core::DType::F32 || !var.device().is_cpu() {
            return Err(TrainError::setting("parameter", name, "the fused optimizer needs contiguous f32 tensors on the CPU"));
        }
        self.params.push(Param { name: name.to_string(), var, grad, moments, lr_scale: 1.0 });
        Ok(())
    }
    /// Sets the learning rate of parameter `name` to `scale` times the store's (LoRA+).
    pub fn set_lr_scale(&mut self, name: &str, scale: f32) -> Result<()> {
        let p =
            self.params.iter_mut().find(|p| p.name == name).ok_or_else(|| TrainError::setting("parameter", name, "not in the store"))?;
        p.lr_scale = scale;
        Ok(())
    }
    /// Adds a parameter whose gradient candle's autograd computes.
    pub fn add_autograd(&mut self, name: &str, var: Var) -> Result<()> {
        let moments = Arc::new(Mutex::new(Moments::zeros(var.elem_count())));
        self.push(name, var, GradSource::Autograd, moments)
    }
    /// Adds a parameter whose gradient a fused layer writes; returns the buffer to hand to that layer.
    pub fn add_buffered(&mut self, name: &str, var: Var) -> Result<Arc<GradBuffer>> {
        let (buf, moments) = (Arc::new(GradBuffer::new(var.elem_count())), Arc::new(Mutex::new(Moments::zeros(var.elem_count()))));
        self.push(name, var, GradSource::Buffer(buf.clone()), moments)?;
        Ok(buf)
    }
    /// Adds a weight whose fused layer may apply Adam to it during the backward pass, block by block as it
    /// computes the gradient (which then never leaves the cache), when the store is [armed](Self::arm)
    /// for the step; otherwise the layer writes the returned buffer as for [`ParamStore::add_buffered`].
    pub fn add_updated_in_backward(&mut self, name: &str, var: Var) -> Result<Arc<GradBuffer>> {
        let (buf, moments) = (Arc::new(GradBuffer::new(var.elem_count())), Arc::new(Mutex::new(Moments::zeros(var.elem_count()))));
        buf.lock()?.in_backward = Some(InBackward { moments: moments.clone(), armed: None, applied: false });
        self.push(name, var, GradSource::Buffer(buf.clone()), moments)?;
        Ok(buf)
    }

    /// Prepares the next step: each parameter added with [`ParamStore::add_updated_in_backward`] may be
    /// updated by its layer during the coming backward pass, with the constants of step `t + 1`. Call it
    /// right before the single backward pass of a step, then [`ParamStore::step`].
    pub fn arm(&mut self) -> Result<()> {
        let step = AdamStep::new(&self.cfg, self.t + 1);
        for p in &self.params {
            if let GradSource::Buffer(buf) = &p.grad {
                if let Some(ib) = buf.lock()?.in_backward.as_mut() {
                    ib.armed = Some(step.with_lr_scale(p.lr_scale as f64, &self.cfg));
                }
            }
        }
        Ok(())
    }

    /// Number of parameters.
    pub fn len(&self) -> usize {
        self.params.len()
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }
    /// Parameter names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.params.iter().map(|p| p.name.as_str())
    }
    /// Steps taken.
    pub fn steps(&self) -> usize {
        self.t
    }

    /// The optimizer's state: the step count and each parameter's Adam moments (m, v), by name.
    pub fn state(&self) -> OptimState {
        let moments = self.params.iter().map(|p| (p.name.clone(), p.moments.lock().unwrap_or_else(|e| e.into_inner()).clone())).collect();
        OptimState { t: self.t, moments }
    }

    /// Restores a state taken by [`ParamStore::state`] on a store built for the same parameters.
    pub fn load_state(&mut self, s: &OptimState) -> Result<()> {
        if s.moments.len() != self.params.len() {
            return Err(TrainError::setting("optimizer state", s.moments.len(), &format!("expected {} parameters", self.params.len())));
        }
        // Every parameter is checked before any is written: a bad state leaves the store as it was.
        for p in &self.params {
            let n = p.moments()?.m.len();
            match s.moments.get(&p.name) {
                Some(mo) if mo.m.len() == n && mo.v.len() == n => {}
                Some(mo) => {
                    return Err(TrainError::setting("optimizer state", &p.name, &format!("holds {} values, the parameter {n}", mo.m.len())))
                }
                None => return Err(TrainError::setting("optimizer state", &p.name, "has no moments for this parameter")),
            }
        }
        for p in &self.params {
            p.moments()?.clone_from(&s.moments[&p.name]);
        }
        self.t = s.t;
        Ok(())
    }

    /// One Adam step: each parameter with a gradient this step (a fresh buffer, or an entry in `grads`)
    /// is updated in place; the others are left alone, as `candle_nn::AdamW` leaves them. Parameters
    /// their layer already updated during the backward pass (see [`ParamStore::arm`]) are not touched
    /// again.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.t += 1;
        let base = AdamStep::new(&self.cfg, self.t);
        for p in &self.params {
            let step = base.with_lr_scale(p.lr_scale as f64, &self.cfg);
            let theta = p.var.as_tensor();
            match &p.grad {
                GradSource::Buffer(buf) => {
                    let mut g = buf.lock()?;
                    if let Some(ib) = g.in_backward.as_mut() {
                        ib.armed = None;
                        if std::mem::take(&mut ib.applied) {
                            continue;
                        }
                    }
                    if !g.fresh {
                        continue;
                    }
                    let mut mv = p.moments()?;
                    let Moments { m, v } = &mut *mv;
                    let op = AdamOp { grad: &g.values, moments: Mutex::new((m, v)), step };
                    theta.inplace_op1(&op)?;
                    g.fresh = false;
                }
                GradSource::Autograd => {
                    let Some(g) = grads.get(theta) else { continue };
                    let g: Tensor = g.contiguous()?;
                    let held = Held::new(&g);
                    let mut mv = p.moments()?;
                    let Moments { m, v } = &mut *mv;
                    let op = AdamOp { grad: held.slice()?, moments: Mutex::new((m, v)), step };
                    theta.inplace_op1(&op)?;
                }
            }
        }
        Ok(())
    }
}

impl ParamStore {
    /// This rank's gradients (each fresh buffer, each parameter in `grads`; `None` for a rank whose share
    /// of the batch was empty) and its share of the loss, summed over `group` in one all-reduce, in the
    /// store's order (scalar 0 of the bundle is the loss). Not for armed steps: an update applied during the
    /// backward pass would read a gradient not yet summed.
    pub fn reduce(&self, grads: Option<&GradStore>, loss: f32, group: &Group) -> Result<Bundle> {
        let dist = |e: lora_dist::DistError| TrainError::setting("ranks", group.size(), &e.to_string());
        let mut bundle = Bundle::new();
        for p in &self.params {
            let n = p.var.elem_count();
            match &p.grad {
                GradSource::Buffer(buf) => {
                    let g = buf.lock()?;
                    if g.in_backward.as_ref().is_some_and(|ib| ib.armed.is_some() || ib.applied) {
                        return Err(TrainError::setting(
                            "parameter",
                            &p.name,
                            "armed: a data-parallel step must not update during the backward",
                        ));
                    }
                    bundle.push_grad(g.fresh.then_some(&g.values[..]), n).map_err(dist)?;
                }
                GradSource::Autograd => match grads.and_then(|gs| gs.get(p.var.as_tensor())) {
                    Some(g) => {
                        let g: Tensor = g.contiguous()?;
                        let held = Held::new(&g);
                        bundle.push_grad(Some(held.slice()?), n).map_err(dist)?;
                    }
                    None => {
                        bundle.push_grad(None, n).map_err(dist)?;
                    }
                },
            }
        }
        bundle.push_scalar(loss);
        bundle.all_reduce(group).map_err(dist)?;
        Ok(bundle)
    }

    /// One Adam step from gradients summed by [`ParamStore::reduce`]: each parameter some rank had a
    /// gradient for is updated in place, the others are left alone (as [`ParamStore::step`] leaves them).
    pub fn apply(&mut self, summed: &Bundle) -> Result<()> {
        if summed.grads() != self.params.len() {
            return Err(TrainError::setting("gradients", summed.grads(), &format!("expected {} parameters", self.params.len())));
        }
        self.t += 1;
        let base = AdamStep::new(&self.cfg, self.t);
        for (i, p) in self.params.iter().enumerate() {
            if let GradSource::Buffer(buf) = &p.grad {
                buf.lock()?.fresh = false;
            }
            let Some(g) = summed.grad(i) else { continue };
            let step = base.with_lr_scale(p.lr_scale as f64, &self.cfg);
            let mut mv = p.moments()?;
            let Moments { m, v } = &mut *mv;
            let op = AdamOp { grad: g, moments: Mutex::new((m, v)), step };
            p.var.as_tensor().inplace_op1(&op)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn a_second_backward_in_an_armed_step_is_an_error_not_a_stale_gradient() {
        let mut store = ParamStore::new(AdamConfig::default());
        let w = Var::from_tensor(&Tensor::ones((2, 2), candle_core::DType::F32, &Device::Cpu).unwrap()).unwrap();
        let buf = store.add_updated_in_backward("w", w).unwrap();
        store.arm().unwrap();
        assert!(buf.take_update().unwrap().is_some(), "the first backward applies the update");
        let e = buf.take_update().err().expect("a second backward in the same step must fail").to_string();
        assert!(e.contains("second backward"), "{e}");
        // After the step, the next armed step works again.
        store.step(&GradStore::default()).unwrap();
        store.arm().unwrap();
        assert!(buf.take_update().unwrap().is_some());
    }
}
