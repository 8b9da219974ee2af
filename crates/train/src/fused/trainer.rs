//! [`Trainer`]: one optimisation step of ExpensiveNet, on the fused path or the reference path.

use std::sync::Arc;

use candle_core::Tensor;
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use lora::{Activation, Backend};

use super::linear::BufferedLinear;
use super::loss::{cross_entropy, cross_entropy_over};
use super::store::{GradBuffer, ParamStore};
use crate::error::{Result, TrainError};
use crate::net::{ExpensiveNet, LAYERS};
use lora_dist::Group;
use lora_optim::AdamConfig;

/// Takes training steps (forward, cross-entropy, backward, Adam) on a network's trainable tensors.
/// Built for the network's current state (which tensors train, which adapters are active): build a new
/// one after changing it. The implementation follows the network's [`Backend`].
pub struct Trainer {
    kind: Kind,
    group: Group,
}

enum Kind {
    Fused(FusedTrainer),
    /// One candle AdamW per learning rate (two with LoRA+).
    Reference(Vec<AdamW>),
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
        Self::with_loraplus(net, lr, None)
    }

    /// [`Trainer::new`] with LoRA+ (`Some(ratio)`): adapters' B matrices and one-dimensional tensors learn at
    /// `ratio` times `lr`, as PEFT's `create_loraplus_optimizer` groups them.
    pub fn with_loraplus(net: &ExpensiveNet, lr: f64, loraplus_lr_ratio: Option<f64>) -> Result<Self> {
        let cfg = AdamConfig { lr, ..AdamConfig::default() };
        if net.model.trainable_vars().is_empty() {
            return Err(TrainError::setting("trainable tensors", 0, "nothing to train: every tensor is frozen"));
        }
        if let Some(r) = loraplus_lr_ratio.filter(|r| !(r.is_finite() && *r > 0.0)) {
            return Err(TrainError::setting("loraplus_lr_ratio", r, "must be a positive number"));
        }
        // LoRA+'s group B: every active adapter's B, and every trainable vector.
        let ratio = loraplus_lr_ratio.unwrap_or(1.0);
        let mut b_ids = std::collections::HashSet::new();
        for (_, l) in net.model.layers() {
            for a in l.active() {
                if let Ok(ad) = l.adapter(a) {
                    b_ids.insert(ad.b().as_tensor().id());
                }
            }
        }
        let in_b = |v: &candle_core::Var| b_ids.contains(&v.as_tensor().id()) || v.rank() == 1;
        let kind = match net.backend() {
            Backend::Reference => {
                let (b, a): (Vec<_>, Vec<_>) = net.model.trainable_vars().into_iter().partition(|v| loraplus_lr_ratio.is_some() && in_b(v));
                let mut opts = Vec::new();
                for (vars, lr) in [(a, lr), (b, lr * ratio)] {
                    if !vars.is_empty() {
                        let p = ParamsAdamW { lr, beta1: cfg.beta1, beta2: cfg.beta2, eps: cfg.eps, weight_decay: 0.0 };
                        opts.push(AdamW::new(vars, p)?); // weight_decay 0: exactly Adam
                    }
                }
                Kind::Reference(opts)
            }
            Backend::Fused => {
                let mut store = ParamStore::new(cfg);
                let mut buffers = Vec::new();
                for name in LAYERS {
                    let l = net.model.layer(name)?;
                    let adapters_on = !l.is_disabled() && l.active().iter().any(|a| !l.merged().contains(a));
                    let buffered = match (l.base_trainable(), l.weight_var(), l.bias(), adapters_on) {
                        ((true, true), Some(w), Some(b), false) => {
                            let dw = store.add_updated_in_backward(&format!("{name}.weight"), w.clone())?;
                            let db = store.add_buffered(&format!("{name}.bias"), b.clone())?;
                            store.set_lr_scale(&format!("{name}.bias"), ratio as f32)?; // a vector: LoRA+'s group B
                            Some((dw, db))
                        }
                        _ => {
                            for (i, v) in l.trainable_vars().into_iter().enumerate() {
                                let scale = if loraplus_lr_ratio.is_some() && in_b(&v) { ratio as f32 } else { 1.0 };
                                store.add_autograd(&format!("{name}.{i}"), v)?;
                                store.set_lr_scale(&format!("{name}.{i}"), scale)?;
                            }
                            None
                        }
                    };
                    buffers.push(buffered);
                }
                Kind::Fused(FusedTrainer { store, buffers })
            }
        };
        Ok(Trainer { kind, group: Group::single() })
    }

    /// Steps data-parallel over `group` ([`Trainer::step_shard`]); fused backend only.
    pub fn in_group(mut self, group: Group) -> Result<Self> {
        if group.is_distributed() && matches!(self.kind, Kind::Reference(_)) {
            return Err(TrainError::setting("backend", "reference", "data-parallel training runs on the fused backend"));
        }
        self.group = group;
        Ok(self)
    }

    /// The ranks it steps with.
    pub fn group(&self) -> &Group {
        &self.group
    }

    /// One step of a data-parallel run: `batch` is this rank's examples of a global batch of `total` (`None`
    /// when its share is empty). Its loss is divided by `total`, the gradients and losses of every rank are
    /// summed in one all-reduce, and every rank applies the same Adam step (after the backward pass, never
    /// during it: the update needs the summed gradient). Returns the global batch's mean loss; a NaN/Inf one
    /// stops with [`TrainError::Diverged`] before any update, on every rank. With one process it is
    /// [`Trainer::step`].
    pub fn step_shard(&mut self, net: &ExpensiveNet, batch: Option<(&Tensor, &Tensor)>, total: usize, global_step: usize) -> Result<f32> {
        if !self.group.is_distributed() {
            return match batch {
                Some((x, y)) if x.dim(0)? == total => self.step(net, x, y, global_step),
                _ => Err(TrainError::setting("batch", total, "one process takes the whole batch")),
            };
        }
        // Not moved onto a rayon worker as `step` is: a rank waits in the all-reduce, and a worker that waits
        // may be handed (stolen) another rank's step of the same pool (`Threads`), which would wait for it.
        let Kind::Fused(t) = &mut self.kind else {
            return Err(TrainError::setting("backend", "reference", "data-parallel training runs on the fused backend"));
        };
        let (grads, share) = match batch {
            Some((x, y)) => {
                let logits = t.forward(net, x)?;
                let loss = cross_entropy_over(&logits, y, total)?;
                let share = loss.to_scalar::<f32>()?;
                (Some(loss.backward()?), share)
            }
            None => (None, 0.0),
        };
        let summed = t.store.reduce(grads.as_ref(), share, &self.group)?;
        let l = finite(summed.scalar(0), global_step)?;
        t.store.apply(&summed)?;
        Ok(l)
    }

    /// The optimizer state, for checkpoints (fused backend only: candle's AdamW keeps its moments private).
    pub fn state(&self) -> Result<super::OptimState> {
        match &self.kind {
            Kind::Fused(t) => Ok(t.store.state()),
            Kind::Reference(_) => Err(TrainError::setting("backend", "reference", "checkpoints need the fused backend")),
        }
    }

    /// Restores an optimizer state taken by [`Trainer::state`].
    pub fn load_state(&mut self, s: &super::OptimState) -> Result<()> {
        match &mut self.kind {
            Kind::Fused(t) => t.store.load_state(s),
            Kind::Reference(_) => Err(TrainError::setting("backend", "reference", "checkpoints need the fused backend")),
        }
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
        self.step_with(net, x, y, global_step, true)
    }

    /// [`Trainer::step`]; `in_backward` lets the fused layers apply Adam to their weights during the
    /// backward pass (the fast way, and the default) instead of through gradient buffers afterwards (the
    /// same numbers: the tests hold the two to the same bits).
    fn step_with(&mut self, net: &ExpensiveNet, x: &Tensor, y: &Tensor, global_step: usize, in_backward: bool) -> Result<f32> {
        if rayon::current_thread_index().is_none() {
            // Run the step on a rayon worker: its products then split with the other worker(s) directly,
            // instead of this thread handing each one over and sleeping (measured ≈ 3% faster per step).
            return rayon::scope(|_| self.step_with(net, x, y, global_step, in_backward));
        }
        match &mut self.kind {
            Kind::Reference(opts) => {
                let logits = net.forward_t(x, true)?; // (B, classes)
                let loss = candle_nn::loss::cross_entropy(&logits, y)?;
                let l = finite(loss.to_scalar::<f32>()?, global_step)?;
                let grads = loss.backward()?;
                for opt in opts.iter_mut() {
                    opt.step(&grads)?;
                }
                Ok(l)
            }
            Kind::Fused(t) => {
                let logits = t.forward(net, x)?;
                let loss = cross_entropy(&logits, y)?;
                let l = finite(loss.to_scalar::<f32>()?, global_step)?;
                if in_backward {
                    t.store.arm()?; // one backward pass: the trained weights are updated as it reaches them
                }
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
                (Some((dw, db)), Some(b)) => h.apply_op3(&l.weight()?, b.as_tensor(), BufferedLinear::new(act, dw.clone(), db.clone()))?,
                _ => l.forward_act_t(&h, true, act)?,
            };
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;
    use lora::{Bias, LoraConfig};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// Pre-trains 30 steps, then trains a rank-2, alpha-3 adapter for 20 steps; returns every loss and the
    /// final base and adapter tensors.
    fn run(backend: Backend) -> (Vec<f32>, Vec<Vec<f32>>) {
        let dev = Device::Cpu;
        let mut g = StdRng::seed_from_u64(5);
        let (n, feat) = (64, 20);
        let x = Tensor::from_vec((0..n * feat).map(|_| g.random::<f32>() * 2.0 - 1.0).collect::<Vec<_>>(), (n, feat), &dev).unwrap();
        let y = Tensor::from_vec((0..n as u32).map(|i| i % 3).collect::<Vec<_>>(), n, &dev).unwrap();
        let mut net = ExpensiveNet::new(feat, 24, 16, 3, 11, &dev).unwrap();
        net.set_backend(backend);
        let mut losses = Vec::new();
        let mut t = Trainer::new(&net, 1e-2).unwrap();
        assert_eq!(t.backend(), backend);
        for s in 0..30 {
            let idx = Tensor::from_vec((0..16u32).map(|i| (i * 7 + s * 16) % n as u32).collect::<Vec<_>>(), 16, &dev).unwrap();
            losses.push(t.step(&net, &x.index_select(&idx, 0).unwrap(), &y.index_select(&idx, 0).unwrap(), s as usize + 1).unwrap());
        }
        net.model.add_adapter("a", &LoraConfig::new(2, 3.0), &mut StdRng::seed_from_u64(1)).unwrap();
        net.model.set_active(&["a"]).unwrap();
        net.model.freeze_base(Bias::None);
        let mut t = Trainer::new(&net, 1e-2).unwrap();
        for s in 0..20 {
            losses.push(t.step(&net, &x, &y, s + 1).unwrap());
        }
        let mut tensors: Vec<Vec<f32>> = net.model.base_state().unwrap().iter().map(|(_, t)| flat(t)).collect();
        for (_, l) in net.model.layers() {
            let ad = l.adapter("a").unwrap();
            tensors.push(flat(ad.a().as_tensor()));
            tensors.push(flat(ad.b().as_tensor()));
        }
        (losses, tensors)
    }

    /// One LoRA step from the same start on each backend, with LoRA+ ratio `ratio` (or none): how far each
    /// adapter tensor moved, in layer order (A, B, A, B, …).
    fn loraplus_moves(backend: Backend, ratio: Option<f64>) -> Vec<Vec<f32>> {
        let dev = Device::Cpu;
        let mut g = StdRng::seed_from_u64(9);
        let (n, feat) = (32, 12);
        let x = Tensor::from_vec((0..n * feat).map(|_| g.random::<f32>() * 2.0 - 1.0).collect::<Vec<_>>(), (n, feat), &dev).unwrap();
        let y = Tensor::from_vec((0..n as u32).map(|i| i % 3).collect::<Vec<_>>(), n, &dev).unwrap();
        let mut net = ExpensiveNet::new(feat, 10, 8, 3, 4, &dev).unwrap();
        net.set_backend(backend);
        net.model.add_adapter("a", &LoraConfig::new(2, 2.0), &mut StdRng::seed_from_u64(1)).unwrap();
        net.model.set_active(&["a"]).unwrap();
        net.model.freeze_base(Bias::None);
        // A non-zero B, so that A gets a gradient too.
        for (_, l) in net.model.layers() {
            let b = l.adapter("a").unwrap().b();
            let v: Vec<f32> = (0..b.elem_count()).map(|_| g.random::<f32>() - 0.5).collect();
            b.set(&Tensor::from_vec(v, b.shape(), &dev).unwrap()).unwrap();
        }
        let before: Vec<Vec<f32>> = net
            .model
            .layers()
            .flat_map(|(_, l)| [flat(l.adapter("a").unwrap().a().as_tensor()), flat(l.adapter("a").unwrap().b().as_tensor())])
            .collect();
        let mut t = Trainer::with_loraplus(&net, 1e-3, ratio).unwrap();
        t.step(&net, &x, &y, 1).unwrap();
        let after: Vec<Vec<f32>> = net
            .model
            .layers()
            .flat_map(|(_, l)| [flat(l.adapter("a").unwrap().a().as_tensor()), flat(l.adapter("a").unwrap().b().as_tensor())])
            .collect();
        before.iter().zip(&after).map(|(b, a)| b.iter().zip(a).map(|(x, y)| y - x).collect()).collect()
    }

    #[test]
    fn loraplus_moves_b_at_ratio_times_the_learning_rate_on_both_backends_and_a_as_before() {
        for backend in [Backend::Fused, Backend::Reference] {
            let plain = loraplus_moves(backend, None);
            let plus = loraplus_moves(backend, Some(16.0));
            for (k, (p, q)) in plain.iter().zip(&plus).enumerate() {
                let want = if k % 2 == 1 { 16.0 } else { 1.0 };
                for (a, b) in p.iter().zip(q) {
                    // The first Adam step moves each element by lr·g/(|g| + ε): the same g both times, so
                    // the moves differ by the learning rates' ratio exactly, up to f32 rounding of p − p₀
                    // (≈ 1e-7 on moves of 1e-3; 1e-3 relative is far below a wrong ratio).
                    if a.abs() > 1e-6 {
                        assert!((b / a - want).abs() < 1e-3 * want, "{backend:?} tensor {k}: moved {b} vs {a} without LoRA+");
                    }
                }
            }
        }
        assert!(Trainer::with_loraplus(&ExpensiveNet::new(4, 3, 3, 2, 0, &Device::Cpu).unwrap(), 1e-3, Some(-1.0))
            .unwrap_err()
            .to_string()
            .contains("loraplus_lr_ratio = -1"));
    }

    #[test]
    fn fused_and_reference_training_runs_agree_closely() {
        let (lf, tf) = run(Backend::Fused);
        let (lr, tr) = run(Backend::Reference);
        assert!(lf[29] < lf[0] && lf[49] < lf[30], "training did not reduce the loss: {lf:?}");
        // Per step the two paths differ only in f32 summation order (≈1e-7 relative); 50 Adam steps
        // amplify that (Adam divides by √v̂, so tiny gradients move as far as large ones), measured ≲1e-5.
        // 1e-4 relative to the tensor's scale is a safe bound that still catches any real difference
        // (a wrong gradient moves parameters by ≈ lr = 1e-2 per step).
        for (i, (a, b)) in lf.iter().zip(&lr).enumerate() {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "loss at step {i}: fused {a} vs reference {b}");
        }
        for (k, (a, b)) in tf.iter().zip(&tr).enumerate() {
            let scale = 1.0 + b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(worst <= 1e-4 * scale, "tensor {k}: max |fused − reference| = {worst}");
        }
    }

    #[test]
    fn adam_in_the_backward_pass_gives_the_bits_of_adam_after_it() {
        // Hidden sizes above the 48-row blocks of the in-backward update, so several blocks run per layer.
        let dev = Device::Cpu;
        let mut g = StdRng::seed_from_u64(9);
        let (n, feat) = (32, 40);
        let x = Tensor::from_vec((0..n * feat).map(|_| g.random::<f32>() * 2.0 - 1.0).collect::<Vec<_>>(), (n, feat), &dev).unwrap();
        let y = Tensor::from_vec((0..n as u32).map(|i| i % 4).collect::<Vec<_>>(), n, &dev).unwrap();
        let run = |in_backward: bool| {
            let net = ExpensiveNet::new(feat, 130, 100, 4, 3, &dev).unwrap();
            let mut t = Trainer::new(&net, 1e-2).unwrap();
            let losses: Vec<f32> = (1..=8).map(|s| t.step_with(&net, &x, &y, s, in_backward).unwrap()).collect();
            let tensors: Vec<Vec<f32>> = net.model.base_state().unwrap().iter().map(|(_, t)| flat(t)).collect();
            (losses, tensors, t.state().unwrap())
        };
        let (a, b) = (run(true), run(false));
        assert!(a.0[7] < a.0[0], "training did not reduce the loss: {:?}", a.0);
        // Each block of dW is the same kernel's sum over the batch in the same order as the whole-matrix
        // product, and Adam is the same kernel: nothing may differ, not even in the last bit.
        assert_eq!(a.0, b.0, "losses");
        assert_eq!(a.1, b.1, "weights and biases");
        assert_eq!(a.2, b.2, "Adam state");
    }

    #[test]
    fn a_non_finite_loss_stops_before_the_update() {
        let dev = Device::Cpu;
        let net = ExpensiveNet::new(4, 3, 3, 2, 0, &dev).unwrap();
        let before = flat(&net.model.layer("linear1").unwrap().weight().unwrap());
        let nan = Tensor::from_vec(vec![f32::NAN; 2], 2, &dev).unwrap();
        net.model.layer("linear3").unwrap().bias().unwrap().set(&nan).unwrap(); // NaN logits, NaN loss
        let x = Tensor::ones((2, 4), candle_core::DType::F32, &dev).unwrap();
        let y = Tensor::from_vec(vec![0u32, 1], 2, &dev).unwrap();
        let e = Trainer::new(&net, 1e-3).unwrap().step(&net, &x, &y, 7).unwrap_err().to_string();
        assert!(e.contains("step 7"), "{e}");
        assert_eq!(flat(&net.model.layer("linear1").unwrap().weight().unwrap()), before);
    }
}
