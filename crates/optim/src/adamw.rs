//! [`AdamW`] over named variables whose gradients come from candle's autograd, as PyTorch's
//! `torch.optim.AdamW` with `clip_grad_norm_` steps them:
//!
//! ```text
//! c = min(1, clip / (‖g‖₂ + 1e-6))      (‖g‖ over every trainable tensor together; c = 1 without clipping)
//! θ ← [`adam_update`](crate::adam_update) with g·c; decay λ on tensors of two or more dimensions only
//! ```
//!
//! The moments live in plain vectors keyed by parameter name, so a checkpoint can save and restore them;
//! each parameter is updated in place in its own storage.
//!
//! Data-parallel, a step is [`AdamW::reduce`] (this rank's gradients and loss summed over the ranks in one
//! all-reduce: a [`Reduced`]) then [`AdamW::apply`]: the norm, the clipping and the update all read the
//! summed gradients, so every rank clips by the global norm and applies the same update. One process is
//! the same two calls over [`Group::single`], which sums nothing ([`AdamW::step`]).

use std::collections::BTreeMap;
use std::sync::Mutex;

use candle_core::backprop::GradStore;
use candle_core::Var;

use lora_dist::{Bundle, Group};

use crate::adam::{AdamConfig, AdamOp, AdamStep, Moments};
use crate::error::{OptimError, Result};

/// AdamW over named variables.
#[derive(Debug)]
pub struct AdamW {
    params: Vec<(String, Var)>,
    /// Moments by parameter name.
    pub moments: BTreeMap<String, Moments>,
    /// Steps taken (t in the bias corrections).
    pub steps: u64,
    /// β₁, β₂, ε and λ (its `lr` is unused: each step gives its own).
    pub config: AdamConfig,
    /// Each parameter's learning rate as a multiple of the step's (1 unless LoRA+ set it).
    lr_scales: Vec<f64>,
}

impl AdamW {
    /// An optimizer for `params` with PyTorch's defaults (β 0.9/0.999, ε 1e-8) and weight decay `wd`.
    pub fn new(params: Vec<(String, Var)>, weight_decay: f64) -> Self {
        let moments = params.iter().map(|(n, v)| (n.clone(), Moments::zeros(v.elem_count()))).collect();
        let lr_scales = vec![1.0; params.len()];
        AdamW { params, moments, steps: 0, config: AdamConfig { weight_decay, ..AdamConfig::default() }, lr_scales }
    }

    /// LoRA+ (Hayou et al. 2024), grouped as PEFT's `create_loraplus_optimizer` groups: a parameter whose name
    /// holds `lora_B`, or of one dimension, learns at `ratio` times the learning rate; the others at it.
    pub fn with_loraplus(mut self, ratio: f64) -> Self {
        for ((name, var), s) in self.params.iter().zip(&mut self.lr_scales) {
            *s = if name.contains("lora_B") || var.rank() == 1 { ratio } else { 1.0 };
        }
        self
    }

    /// Each parameter's learning rate as a multiple of the step's, in [`AdamW::params`] order.
    pub fn lr_scales(&self) -> &[f64] {
        &self.lr_scales
    }

    /// The parameters it updates.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// One step at learning rate `lr`, gradients clipped to global norm `clip` when given. Returns the
    /// gradient norm before clipping. A parameter without a gradient is an error naming it (it would
    /// otherwise silently never train).
    pub fn step(&mut self, grads: &GradStore, lr: f64, clip: Option<f64>) -> Result<f64> {
        let reduced = self.reduce(Some(grads), 0.0, &Group::single())?;
        self.apply(&reduced, lr, clip)
    }

    /// This rank's gradients (`None`: its share of the batch was empty) and its share of the loss, summed
    /// over `group` in one all-reduce. A parameter the backward did not reach is an error naming it.
    pub fn reduce(&self, grads: Option<&GradStore>, loss: f32, group: &Group) -> Result<Reduced> {
        let mut bundle = Bundle::new();
        for (name, var) in &self.params {
            let g = match grads {
                Some(grads) => Some(
                    grads
                        .get(var.as_tensor())
                        .ok_or_else(|| OptimError::invalid("gradient", name, "no gradient reached this trainable tensor"))?
                        .flatten_all()?
                        .to_vec1::<f32>()?,
                ),
                None => None,
            };
            bundle.push_grad(g.as_deref(), var.elem_count()).map_err(|e| OptimError::invalid("gradient", name, e.to_string()))?;
        }
        bundle.push_scalar(loss);
        bundle.all_reduce(group).map_err(|e| OptimError::invalid("all-reduce", group.size(), e.to_string()))?;
        Ok(Reduced { bundle })
    }

    /// One step at learning rate `lr` from summed gradients, clipped to global norm `clip` when given.
    /// Returns the gradient norm before clipping.
    pub fn apply(&mut self, reduced: &Reduced, lr: f64, clip: Option<f64>) -> Result<f64> {
        let b = &reduced.bundle;
        if b.grads() != self.params.len() {
            return Err(OptimError::invalid("gradients", b.grads(), format!("expected {} parameters", self.params.len())));
        }
        let mut gs = Vec::with_capacity(self.params.len());
        let mut sq = 0f64;
        for (i, (name, _)) in self.params.iter().enumerate() {
            let g = b.grad(i).ok_or_else(|| OptimError::invalid("gradient", name, "no gradient reached this trainable tensor"))?;
            sq += g.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
            gs.push(g);
        }
        let norm = sq.sqrt();
        let factor = match clip {
            Some(c) if norm > c => (c / (norm + 1e-6)) as f32,
            _ => 1.0,
        };
        self.steps += 1;
        let cfg = AdamConfig { lr, ..self.config };
        let base = AdamStep::new(&cfg, self.steps as usize).with_grad_scale(factor);
        for (((name, var), g), &scale) in self.params.iter().zip(gs).zip(&self.lr_scales) {
            let step = base.with_lr_scale(scale, &cfg);
            let step = if var.rank() >= 2 { step } else { step.without_decay() };
            let mo = self.moments.get_mut(name).ok_or_else(|| OptimError::invalid("parameter", name, "has no optimizer state"))?;
            if mo.m.len() != g.len() {
                return Err(OptimError::invalid("parameter", name, "changed size since the optimizer was made"));
            }
            let op = AdamOp { grad: g, moments: Mutex::new((&mut mo.m, &mut mo.v)), step };
            var.as_tensor().inplace_op1(&op)?;
        }
        Ok(norm)
    }
}

/// One step's gradients and loss summed over the ranks ([`AdamW::reduce`]), for [`AdamW::apply`].
#[derive(Debug, Clone)]
pub struct Reduced {
    bundle: Bundle,
}

impl Reduced {
    /// The summed loss shares: the global batch's mean loss.
    pub fn loss(&self) -> f32 {
        self.bundle.scalar(0)
    }
    /// f32 values summed across ranks (one all-reduce of this many).
    pub fn values(&self) -> usize {
        self.bundle.len()
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;

    #[test]
    fn loraplus_moves_b_and_one_dimensional_tensors_at_ratio_times_the_learning_rate() {
        let dev = Device::Cpu;
        let var = |shape: &[usize]| Var::from_tensor(&Tensor::ones(shape, DType::F32, &dev).unwrap()).unwrap();
        let (a, b, bias) = (var(&[2, 3]), var(&[3, 2]), var(&[3]));
        let params =
            vec![("m.lora_A.x".to_string(), a.clone()), ("m.lora_B.x".to_string(), b.clone()), ("m.bias".to_string(), bias.clone())];
        let mut opt = AdamW::new(params, 0.0).with_loraplus(16.0);
        assert_eq!(opt.lr_scales(), [1.0, 16.0, 16.0]);
        let loss =
            ((a.as_tensor().sum_all().unwrap() + b.as_tensor().sum_all().unwrap()).unwrap() + bias.as_tensor().sum_all().unwrap()).unwrap();
        opt.step(&loss.backward().unwrap(), 1e-3, None).unwrap();
        // First Adam step from zero moments: each element moves by lr·g/(|g| + ε·…) = lr (g = 1 here), up to
        // ε/|g| = 1e-8 relative; 1e-6 absolute on a step of 1e-3 is far tighter than a wrong ratio (16×).
        let moved = |v: &Var| 1.0 - v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] as f64;
        assert!((moved(&a) - 1e-3).abs() < 1e-6, "{}", moved(&a));
        assert!((moved(&b) - 16e-3).abs() < 1e-6, "{}", moved(&b));
        assert!((moved(&bias) - 16e-3).abs() < 1e-6, "{}", moved(&bias));
    }

    #[test]
    fn adamw_matches_a_scalar_reference_with_clipping_and_decay_on_matrices_only() {
        let w = Var::from_tensor(&Tensor::new(&[[0.5f32, -1.0], [2.0, 0.25]], &Device::Cpu).unwrap()).unwrap();
        let bias = Var::from_tensor(&Tensor::new(&[1.5f32, -0.5], &Device::Cpu).unwrap()).unwrap();
        let mut opt = AdamW::new(vec![("w".into(), w.clone()), ("b".into(), bias.clone())], 0.1);
        let mut p = [0.5f64, -1.0, 2.0, 0.25, 1.5, -0.5];
        let (mut m, mut v) = ([0f64; 6], [0f64; 6]);
        for t in 1..=3 {
            let loss = ((w.as_tensor().sqr().unwrap().sum_all().unwrap() + bias.as_tensor().sqr().unwrap().sum_all().unwrap()).unwrap()
                * 3.0)
                .unwrap(); // g = 6θ
            let norm = opt.step(&loss.backward().unwrap(), 0.01, Some(1.0)).unwrap();
            let g: Vec<f64> = p.iter().map(|x| 6.0 * x).collect();
            let n = g.iter().map(|x| x * x).sum::<f64>().sqrt();
            assert!((norm - n).abs() < 1e-4 * n);
            let f = 1.0 / (n + 1e-6);
            for i in 0..6 {
                let gi = g[i] * f;
                m[i] = 0.9 * m[i] + 0.1 * gi;
                v[i] = 0.999 * v[i] + 0.001 * gi * gi;
                let decay = if i < 4 { 1.0 - 0.01 * 0.1 } else { 1.0 }; // the vector is not decayed
                p[i] = p[i] * decay - 0.01 / (1.0 - 0.9f64.powi(t)) * m[i] / (v[i].sqrt() / (1.0 - 0.999f64.powi(t)).sqrt() + 1e-8);
            }
        }
        let got: Vec<f32> =
            [w.as_tensor().flatten_all().unwrap(), bias.as_tensor().clone()].iter().flat_map(|t| t.to_vec1::<f32>().unwrap()).collect();
        for (g, want) in got.iter().zip(p) {
            // f32 arithmetic over 3 steps of values ≤ 2: rounding ≲ 1e-6 relative.
            assert!((*g as f64 - want).abs() < 1e-5, "{g} vs {want}");
        }
    }

    #[test]
    fn two_ranks_clip_by_the_global_norm_and_step_as_one_process_on_the_summed_gradient() {
        // Rank r's loss is c_r·Σθ² (g_r = 2c_r·θ); one process's is (c_0 + c_1)·Σθ². Clipping at 1 binds for
        // the sum (‖g‖ ≈ 6.9) and would bind differently per rank, so only a reduced norm gives the same step.
        // 2c_0·θ + 2c_1·θ and 2(c_0 + c_1)·θ are each exact here (powers of two times θ), so the bits agree.
        let start = [[0.5f32, -1.0], [2.0, 0.25]];
        let run = |group: lora_dist::Group, c: f64| {
            let w = Var::from_tensor(&Tensor::new(&start, &Device::Cpu).unwrap()).unwrap();
            let mut opt = AdamW::new(vec![("w".into(), w.clone())], 0.1);
            let mut norms = Vec::new();
            for _ in 0..3 {
                let loss = (w.as_tensor().sqr().unwrap().sum_all().unwrap() * c).unwrap();
                let r = opt.reduce(Some(&loss.backward().unwrap()), loss.to_scalar::<f32>().unwrap(), &group).unwrap();
                norms.push((opt.apply(&r, 0.01, Some(1.0)).unwrap(), r.loss()));
            }
            (w.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(), norms)
        };
        let ranks = lora_dist::Threads::run(2, |g| {
            let c = [1.0, 2.0][g.rank()];
            run(g, c)
        });
        let one = run(lora_dist::Group::single(), 3.0);
        for (w, norms) in &ranks {
            assert_eq!(w.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), one.0.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
            assert_eq!(norms, &one.1);
        }
    }

    #[test]
    fn a_parameter_without_a_gradient_is_named() {
        let a = Var::from_tensor(&Tensor::ones(2, DType::F32, &Device::Cpu).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::ones(2, DType::F32, &Device::Cpu).unwrap()).unwrap();
        let mut opt = AdamW::new(vec![("a".into(), a.clone()), ("frozen.b".into(), b)], 0.0);
        let e = opt.step(&a.as_tensor().sum_all().unwrap().backward().unwrap(), 1e-3, None).unwrap_err().to_string();
        assert!(e.contains("frozen.b") && e.contains("no gradient"), "{e}");
    }
}
