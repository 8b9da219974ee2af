//! [`ParamStore`]: the trainable tensors, each with its gradient source and Adam moments.

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use lora::fused::Held;

use super::adam::{AdamConfig, AdamOp, AdamStep};
use crate::error::{Result, TrainError};

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
}

impl GradBuffer {
    /// A buffer of `n` values.
    pub fn new(n: usize) -> Self {
        GradBuffer { inner: Mutex::new(GradData { values: vec![0.0; n], fresh: false }) }
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
    m: Vec<f32>,
    v: Vec<f32>,
}

/// Adam's state for checkpoints: step count and per-parameter moments `(name, m, v)`.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimState {
    /// Steps taken (Adam's bias-correction counter).
    pub t: usize,
    /// `(name, m, v)` for each parameter, in store order.
    pub params: Vec<(String, Vec<f32>, Vec<f32>)>,
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
    fn push(&mut self, name: &str, var: Var, grad: GradSource) -> Result<()> {
        if !var.as_tensor().is_contiguous() || var.dtype() != candle_core::DType::F32 || !var.device().is_cpu() {
            return Err(TrainError::setting("parameter", name, "the fused optimizer needs contiguous f32 tensors on the CPU"));
        }
        let n = var.elem_count();
        self.params.push(Param { name: name.to_string(), var, grad, m: vec![0.0; n], v: vec![0.0; n] });
        Ok(())
    }
    /// Adds a parameter whose gradient candle's autograd computes.
    pub fn add_autograd(&mut self, name: &str, var: Var) -> Result<()> {
        self.push(name, var, GradSource::Autograd)
    }
    /// Adds a parameter whose gradient a fused layer writes; returns the buffer to hand to that layer.
    pub fn add_buffered(&mut self, name: &str, var: Var) -> Result<Arc<GradBuffer>> {
        let buf = Arc::new(GradBuffer::new(var.elem_count()));
        self.push(name, var, GradSource::Buffer(buf.clone()))?;
        Ok(buf)
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
        OptimState { t: self.t, params: self.params.iter().map(|p| (p.name.clone(), p.m.clone(), p.v.clone())).collect() }
    }

    /// Restores a state taken by [`ParamStore::state`] on a store built for the same parameters.
    pub fn load_state(&mut self, s: &OptimState) -> Result<()> {
        if s.params.len() != self.params.len() {
            return Err(TrainError::setting("optimizer state", s.params.len(), &format!("expected {} parameters", self.params.len())));
        }
        for (p, (name, m, v)) in self.params.iter_mut().zip(&s.params) {
            if *name != p.name || m.len() != p.m.len() || v.len() != p.v.len() {
                return Err(TrainError::setting(
                    "optimizer state",
                    name,
                    &format!("does not match parameter {} ({} values)", p.name, p.m.len()),
                ));
            }
            p.m.clone_from(m);
            p.v.clone_from(v);
        }
        self.t = s.t;
        Ok(())
    }

    /// One Adam step: each parameter with a gradient this step (a fresh buffer, or an entry in `grads`)
    /// is updated in place; the others are left alone, as `candle_nn::AdamW` leaves them.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.t += 1;
        let step = AdamStep::new(&self.cfg, self.t);
        for p in &mut self.params {
            let theta = p.var.as_tensor();
            match &p.grad {
                GradSource::Buffer(buf) => {
                    let mut g = buf.lock()?;
                    if !g.fresh {
                        continue;
                    }
                    let op = AdamOp { grad: &g.values, moments: Mutex::new((&mut p.m, &mut p.v)), step };
                    theta.inplace_op1(&op)?;
                    g.fresh = false;
                }
                GradSource::Autograd => {
                    let Some(g) = grads.get(theta) else { continue };
                    let g: Tensor = g.contiguous()?;
                    let held = Held::new(&g);
                    let op = AdamOp { grad: held.slice()?, moments: Mutex::new((&mut p.m, &mut p.v)), step };
                    theta.inplace_op1(&op)?;
                }
            }
        }
        Ok(())
    }
}
