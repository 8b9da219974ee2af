//! AdamW with a warm-up + cosine learning-rate schedule and global gradient-norm clipping, as PyTorch's
//! `torch.optim.AdamW` and `clip_grad_norm_` compute them:
//!
//! ```text
//! g ← g · min(1, c / (‖g‖₂ + 1e-6))            (‖g‖ over every trainable tensor together)
//! p ← p − lr·λ·p                                (decoupled weight decay, matrices only)
//! m ← β₁m + (1−β₁)g,  v ← β₂v + (1−β₂)g²
//! p ← p − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)
//! lr(t) = lr_max·(t+1)/W for t < W, then lr_min + ½(lr_max − lr_min)(1 + cos(π·(t−W)/(N−W)))
//! ```
//!
//! The moments live in plain vectors keyed by parameter name, so a checkpoint can save and restore them.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::error::{LmError, Result};

/// The learning-rate schedule: linear warm-up, then cosine decay to a floor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Peak learning rate.
    pub lr: f64,
    /// Floor reached at the last step, as a fraction of `lr`.
    pub min_ratio: f64,
    /// Warm-up steps.
    pub warmup: usize,
    /// Total steps.
    pub total: usize,
}

impl Schedule {
    /// The learning rate at step `t` (0-based).
    pub fn at(&self, t: usize) -> f64 {
        if t < self.warmup {
            return self.lr * (t + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((t - self.warmup) as f64 / span).min(1.0);
        let min = self.lr * self.min_ratio;
        min + 0.5 * (self.lr - min) * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// Moments of one parameter.
#[derive(Debug, Clone)]
pub struct Moments {
    /// First moment m.
    pub m: Vec<f32>,
    /// Second moment v.
    pub v: Vec<f32>,
}

/// AdamW over named variables.
#[derive(Debug)]
pub struct AdamW {
    params: Vec<(String, Var)>,
    /// Moments by parameter name.
    pub moments: BTreeMap<String, Moments>,
    /// Steps taken (t in the bias corrections).
    pub steps: u64,
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay λ, applied to tensors of two or more dimensions.
    pub weight_decay: f64,
    /// Each parameter's learning rate as a multiple of the step's (1 unless LoRA+ set it).
    lr_scales: Vec<f64>,
}

impl AdamW {
    /// An optimizer for `params` with PyTorch's defaults (β 0.9/0.999, ε 1e-8) and weight decay `wd`.
    pub fn new(params: Vec<(String, Var)>, weight_decay: f64) -> Self {
        let moments =
            params.iter().map(|(n, v)| (n.clone(), Moments { m: vec![0.0; v.elem_count()], v: vec![0.0; v.elem_count()] })).collect();
        let lr_scales = vec![1.0; params.len()];
        AdamW { params, moments, steps: 0, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay, lr_scales }
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
        let mut gs = Vec::with_capacity(self.params.len());
        let mut sq = 0f64;
        for (name, var) in &self.params {
            let g = grads
                .get(var.as_tensor())
                .ok_or_else(|| LmError::invalid("gradient", name, "no gradient reached this trainable tensor"))?;
            let g = g.flatten_all()?.to_vec1::<f32>()?;
            sq += g.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
            gs.push(g);
        }
        let norm = sq.sqrt();
        let factor = match clip {
            Some(c) if norm > c => (c / (norm + 1e-6)) as f32,
            _ => 1.0,
        };
        self.steps += 1;
        let t = self.steps as i32;
        let (b1, b2) = (self.beta1 as f32, self.beta2 as f32);
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2_sqrt = (1.0 - self.beta2.powi(t)).sqrt() as f32;
        let eps = self.eps as f32;
        for (((name, var), g), &scale) in self.params.iter().zip(gs).zip(&self.lr_scales) {
            let lr = lr * scale;
            let step_size = (lr / bc1) as f32;
            let mo = self.moments.get_mut(name).ok_or_else(|| LmError::invalid("parameter", name, "has no optimizer state"))?;
            let mut p = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            if p.len() != mo.m.len() || g.len() != p.len() {
                return Err(LmError::invalid("parameter", name, "changed size since the optimizer was made"));
            }
            let decay = if var.rank() >= 2 { (1.0 - lr * self.weight_decay) as f32 } else { 1.0 };
            for i in 0..p.len() {
                let gi = g[i] * factor;
                mo.m[i] = b1 * mo.m[i] + (1.0 - b1) * gi;
                mo.v[i] = b2 * mo.v[i] + (1.0 - b2) * gi * gi;
                let denom = mo.v[i].sqrt() / bc2_sqrt + eps;
                p[i] = p[i] * decay - step_size * mo.m[i] / denom;
            }
            var.set(&Tensor::from_vec(p, var.shape(), var.device())?)?;
        }
        Ok(norm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loraplus_moves_b_and_one_dimensional_tensors_at_ratio_times_the_learning_rate() {
        let dev = candle_core::Device::Cpu;
        let var = |shape: &[usize]| Var::from_tensor(&Tensor::ones(shape, candle_core::DType::F32, &dev).unwrap()).unwrap();
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
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_linearly_then_decays_to_the_floor() {
        let s = Schedule { lr: 1e-3, min_ratio: 0.1, warmup: 10, total: 110 };
        assert!((s.at(0) - 1e-4).abs() < 1e-12);
        assert!((s.at(9) - 1e-3).abs() < 1e-12);
        assert!((s.at(10) - 1e-3).abs() < 1e-12);
        assert!((s.at(60) - 5.5e-4).abs() < 1e-12);
        assert!((s.at(110) - 1e-4).abs() < 1e-12);
    }

    #[test]
    fn adamw_matches_a_scalar_reference_with_clipping_and_decay() {
        let w = Var::from_tensor(&Tensor::new(&[[0.5f32, -1.0], [2.0, 0.25]], &Device::Cpu).unwrap()).unwrap();
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], 0.1);
        let (mut p, mut m, mut v) = ([0.5f64, -1.0, 2.0, 0.25], [0f64; 4], [0f64; 4]);
        for t in 1..=3 {
            let loss = (w.as_tensor().sqr().unwrap().sum_all().unwrap() * 3.0).unwrap(); // g = 6w
            let grads = loss.backward().unwrap();
            let norm = opt.step(&grads, 0.01, Some(1.0)).unwrap();
            let g: Vec<f64> = p.iter().map(|x| 6.0 * x).collect();
            let n = g.iter().map(|x| x * x).sum::<f64>().sqrt();
            assert!((norm - n).abs() < 1e-4 * n);
            let f = 1.0 / (n + 1e-6);
            for i in 0..4 {
                let gi = g[i] * f;
                m[i] = 0.9 * m[i] + 0.1 * gi;
                v[i] = 0.999 * v[i] + 0.001 * gi * gi;
                p[i] = p[i] * (1.0 - 0.01 * 0.1)
                    - 0.01 / (1.0 - 0.9f64.powi(t)) * m[i] / (v[i].sqrt() / (1.0 - 0.999f64.powi(t)).sqrt() + 1e-8);
            }
        }
        let got = w.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (g, want) in got.iter().zip(p) {
            // f32 arithmetic over 3 steps of values ≤ 2: rounding ≲ 1e-6 relative.
            assert!((*g as f64 - want).abs() < 1e-5, "{g} vs {want}");
        }
    }
}
