//! The training loop: shuffled mini-batches, cross-entropy, Adam over the model's trainable tensors.

use std::time::Instant;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::data::Dataset;
use crate::error::{Result, TrainError};
use crate::fast::Trainer;
use crate::net::ExpensiveNet;

/// Settings of one training run.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// Passes over the data (each reshuffled).
    pub epochs: usize,
    /// Examples per step.
    pub batch_size: usize,
    /// Adam learning rate.
    pub lr: f64,
    /// Stop after this many steps in total (None: run every epoch to the end).
    pub max_steps: Option<usize>,
    /// Seed of the shuffling generator.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig { epochs: 1, batch_size: 64, lr: 1e-3, max_steps: None, seed: 0 }
    }
}

impl TrainConfig {
    /// Checks ranges; the error names the setting.
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 {
            return Err(TrainError::setting("epochs", self.epochs, "must be at least 1"));
        }
        if self.batch_size == 0 {
            return Err(TrainError::setting("batch_size", self.batch_size, "must be at least 1"));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(TrainError::setting("lr", self.lr, "must be a positive number"));
        }
        if self.max_steps == Some(0) {
            return Err(TrainError::setting("steps", 0, "must be at least 1"));
        }
        Ok(())
    }

    /// Steps one epoch takes over `n` examples (the last batch may be short).
    pub fn steps_per_epoch(&self, n: usize) -> usize {
        n.div_ceil(self.batch_size)
    }
}

/// What the loop reports after each step.
#[derive(Debug, Clone, Copy)]
pub struct StepInfo {
    /// 1-based epoch.
    pub epoch: usize,
    /// 1-based step within the epoch.
    pub step: usize,
    /// Steps this epoch will run.
    pub steps_in_epoch: usize,
    /// 1-based step over the whole run.
    pub global_step: usize,
    /// This step's loss.
    pub loss: f32,
    /// Mean loss over this epoch so far (what the seed's tqdm shows).
    pub avg_loss: f32,
    /// Seconds since training started.
    pub seconds: f64,
}

/// Summary of a run.
#[derive(Debug, Clone)]
pub struct TrainStats {
    /// Steps taken.
    pub steps: usize,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Every step's loss, in order.
    pub losses: Vec<f32>,
    /// Seconds since training started at the end of each step (same length as `losses`).
    pub step_seconds: Vec<f64>,
}

/// Trains the model's trainable tensors (see [`lora::LoraModel::trainable_vars`]) on `data`.
/// `on_step` is called after every step (progress bars, logs). A NaN/Inf loss stops with
/// [`TrainError::Diverged`] before the optimizer applies that step.
pub fn train(net: &ExpensiveNet, data: &Dataset, cfg: &TrainConfig, mut on_step: impl FnMut(&StepInfo)) -> Result<TrainStats> {
    cfg.validate()?;
    if data.is_empty() {
        return Err(TrainError::setting("data", 0, "no examples to train on"));
    }
    let mut trainer = Trainer::new(net, cfg.lr)?; // Adam; fused or reference as the net's backend says
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let n = data.len();
    let mut order: Vec<u32> = (0..n as u32).collect();
    let per_epoch = cfg.steps_per_epoch(n);
    let start = Instant::now();
    let mut losses = Vec::new();
    let mut step_seconds = Vec::new();
    'outer: for epoch in 1..=cfg.epochs {
        order.shuffle(&mut rng);
        let remaining = cfg.max_steps.map_or(usize::MAX, |m| m - losses.len());
        let steps_in_epoch = per_epoch.min(remaining);
        let mut sum = 0f64;
        for (i, idx) in order.chunks(cfg.batch_size).take(steps_in_epoch).enumerate() {
            let (x, y) = data.batch(idx)?; // (B, features), (B)
            let l = trainer.step(net, &x, &y, losses.len() + 1)?;
            losses.push(l);
            let seconds = start.elapsed().as_secs_f64();
            step_seconds.push(seconds);
            sum += l as f64;
            let info = StepInfo {
                epoch,
                step: i + 1,
                steps_in_epoch,
                global_step: losses.len(),
                loss: l,
                avg_loss: (sum / (i + 1) as f64) as f32,
                seconds,
            };
            on_step(&info);
            if cfg.max_steps.is_some_and(|m| losses.len() >= m) {
                break 'outer;
            }
        }
    }
    Ok(TrainStats { steps: losses.len(), seconds: start.elapsed().as_secs_f64(), losses, step_seconds })
}
