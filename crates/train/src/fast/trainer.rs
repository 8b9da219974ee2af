//! [`Trainer`]: one optimisation step of ExpensiveNet, on the fused path or the reference path.

use std::sync::Arc;

use candle_core::Tensor;
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use lora::{Activation, Backend};

use super::adam::AdamConfig;
use super::linear::BufferedLinear;
use super::loss::cross_entropy;
use super::store::{GradBuffer, ParamStore};
use crate::error::{Result, TrainError};
use crate::net::{ExpensiveNet, LAYERS};

/// Takes training steps (forward, cross-entropy, backward, Adam) on a network's trainable tensors.
/// Built for the network's current state (which tensors train, which adapters are active): build a new
/// one after changing it. The implementation follows the network's [`Backend`].
pub struct Trainer {
    kind: Kind,
}

enum Kind {
    Fused(FusedTrainer),
    Reference(AdamW),
}

struct FusedTrainer {
    store: ParamStore,
    /// Per layer (in forward order): the gradient buffers of (weight, bias) when the layer runs as a
    /// [`BufferedLinear`], `None` when it runs through [`lora::LoraLinear::forward_act_t`].
    buffers: Vec<Option<(Arc<GradBuffer>, Arc<GradBuffer>)>>,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer").field("backend", &self.backend()).finish()
    }
}

impl Trainer {
    /// A trainer with Adam (β = 0.9, 0.999, ε = 1e-8, no weight decay) at learning rate `lr`.
    pub fn new(net: &ExpensiveNet, lr: f64) -> Result<Self> {
        let cfg = AdamConfig { lr, ..AdamConfig::default() };
        if net.model.trainable_vars().is_empty() {
            return Err(TrainError::setting("trainable tensors", 0, "nothing to train: every tensor is frozen"));
        }
        let kind = match net.backend() {
            Backend::Reference => {
                let p = ParamsAdamW { lr, beta1: cfg.beta1, beta2: cfg.beta2, eps: cfg.eps, weight_decay: 0.0 };
                Kind::Reference(AdamW::new(net.model.trainable_vars(), p)?) // weight_decay 0: exactly Adam
            }
            Backend::Fused => {
                let mut store = ParamStore::new(cfg);
                let mut buffers = Vec::new();
                for name in LAYERS {
                    let l = net.model.layer(name)?;
                    let adapters_on = !l.is_disabled() && l.active().iter().any(|a| !l.merged().contains(a));
                    let buffered = match (l.base_trainable(), l.bias(), adapters_on) {
                        ((true, true), Some(b), false) => {
                            let dw = store.add_buffered(&format!("{name}.weight"), l.weight().clone())?;
                            let db = store.add_buffered(&format!("{name}.bias"), b.clone())?;
                            Some((dw, db))
                        }
                        _ => {
                            for (i, v) in l.trainable_vars().into_iter().enumerate() {
                                store.add_autograd(&format!("{name}.{i}"), v)?;
                            }
                            None
                        }
                    };
                    buffers.push(buffered);
                }
                Kind::Fused(FusedTrainer { store, buffers })
            }
        };
        Ok(Trainer { kind })
    }

    /// The implementation this trainer runs.
    pub fn backend(&self) -> Backend {
        match self.kind {
            Kind::Fused(_) => Backend::Fused,
            Kind::Reference(_) => Backend::Reference,
        }
    }

    /// One step on inputs `x` (B, features) and labels `y` (B); returns the loss before the update.
    /// A NaN/Inf loss stops with [`TrainError::Diverged`] (naming `global_step`) before any update.
    pub fn step(&mut self, net: &ExpensiveNet, x: &Tensor, y: &Tensor, global_step: usize) -> Result<f32> {
        match &mut self.kind {
            Kind::Reference(opt) => {
                let logits = net.forward_t(x, true)?; // (B, classes)
                let loss = candle_nn::loss::cross_entropy(&logits, y)?;
                let l = finite(loss.to_scalar::<f32>()?, global_step)?;
                opt.backward_step(&loss)?;
                Ok(l)
            }
            Kind::Fused(t) => {
                let logits = t.forward(net, x)?;
                let loss = cross_entropy(&logits, y)?;
                let l = finite(loss.to_scalar::<f32>()?, global_step)?;
                let grads = loss.backward()?;
                t.store.step(&grads)?;
                Ok(l)
            }
        }
    }
}

fn finite(l: f32, step: usize) -> Result<f32> {
    if l.is_finite() {
        Ok(l)
    } else {
        Err(TrainError::Diverged { step, loss: l })
    }
}

impl FusedTrainer {
    fn forward(&self, net: &ExpensiveNet, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, (name, buffers)) in LAYERS.iter().zip(&self.buffers).enumerate() {
            let act = if i + 1 < LAYERS.len() { Activation::Relu } else { Activation::Identity };
            let l = net.model.layer(name)?;
            h = match (buffers, l.bias()) {
                (Some((dw, db)), Some(b)) => {
                    h.apply_op3(l.weight().as_tensor(), b.as_tensor(), BufferedLinear::new(act, dw.clone(), db.clone()))?
                }
                _ => l.forward_act_t(&h, true, act)?,
            };
        }
        Ok(h)
    }
}
