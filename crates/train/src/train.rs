//! The training loop: shuffled mini-batches, cross-entropy, Adam over the model's trainable tensors.

use std::time::Instant;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::data::Dataset;
use crate::error::{Result, TrainError};
use crate::fused::Trainer;
use crate::net::ExpensiveNet;
use lora_dist::Group;

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
    /// LoRA+: adapters' B matrices (and vectors) learn at this multiple of `lr` (`None`: off).
    pub loraplus_lr_ratio: Option<f64>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig { epochs: 1, batch_size: 64, lr: 1e-3, max_steps: None, seed: 0, loraplus_lr_ratio: None }
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
        if let Some(r) = self.loraplus_lr_ratio.filter(|r| !(r.is_finite() && *r > 0.0)) {
            return Err(TrainError::setting("loraplus_lr_ratio", r, "must be a positive number"));
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

/// Where a run stands: enough to continue it exactly (with the model's tensors, which the caller saves).
/// The shuffling generator is not stored: each epoch's order is replayed from the seed, which is cheap and
/// gives the same permutation; adapter dropout is reseeded from (seed, step) every step for the same reason.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// Steps completed.
    pub global_step: usize,
    /// Loss of every completed step.
    pub losses: Vec<f32>,
    /// Seconds since the start at each completed step.
    pub step_seconds: Vec<f64>,
    /// Adam's state.
    pub optim: crate::fused::OptimState,
}

/// Periodic saving for [`train_with`]: call `save` every `every` steps (and never on the last step, whose
/// result the caller saves anyway).
pub struct SaveEvery<'a> {
    /// Steps between checkpoints.
    pub every: usize,
    /// Persists a checkpoint (the model's tensors are read from the network by the caller).
    pub save: &'a mut dyn FnMut(&Checkpoint) -> Result<()>,
}

/// Trains the model's trainable tensors (see [`lora::LoraModel::trainable_vars`]) on `data`.
/// `on_step` is called after every step (progress bars, logs). A NaN/Inf loss stops with
/// [`TrainError::Diverged`] before the optimizer applies that step.
pub fn train(net: &ExpensiveNet, data: &Dataset, cfg: &TrainConfig, on_step: impl FnMut(&StepInfo)) -> Result<TrainStats> {
    train_with(net, data, cfg, None, None, &Group::single(), on_step)
}

/// [`train`], optionally continuing from `resume` (whose model tensors the caller has already restored)
/// and saving checkpoints. A resumed run ends with the same weights, bit for bit, as an uninterrupted one.
///
/// Data-parallel over `group`: every rank shuffles the same order and takes its examples of each batch
/// (`lora_dist::shard`; a short last batch may leave a rank none); the step divides by the batch's size
/// and sums the ranks' gradients before Adam ([`Trainer::step_shard`]). Every rank calls `on_step` and
/// `checkpoints` (give them to rank 0 only).
pub fn train_with(
    net: &ExpensiveNet,
    data: &Dataset,
    cfg: &TrainConfig,
    resume: Option<&Checkpoint>,
    mut checkpoints: Option<SaveEvery<'_>>,
    group: &Group,
    mut on_step: impl FnMut(&StepInfo),
) -> Result<TrainStats> {
    cfg.validate()?;
    if data.is_empty() {
        return Err(TrainError::setting("data", 0, "no examples to train on"));
    }
    if checkpoints.as_ref().is_some_and(|c| c.every == 0) {
        return Err(TrainError::setting("checkpoint_every", 0, "must be at least 1"));
    }
    // Adam; fused or reference as the net's backend says.
    let mut trainer = Trainer::with_loraplus(net, cfg.lr, cfg.loraplus_lr_ratio)?.in_group(group.clone())?;
    let mut losses = Vec::new();
    let mut step_seconds = Vec::new();
    if let Some(c) = resume {
        trainer.load_state(&c.optim)?;
        losses.clone_from(&c.losses);
        step_seconds.clone_from(&c.step_seconds);
    }
    let done = losses.len();
    let offset = step_seconds.last().copied().unwrap_or(0.0);
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let n = data.len();
    let mut order: Vec<u32> = (0..n as u32).collect();
    let per_epoch = cfg.steps_per_epoch(n);
    let total = cfg.max_steps.map_or(per_epoch.saturating_mul(cfg.epochs), |m| m.min(per_epoch.saturating_mul(cfg.epochs)));
    let start = Instant::now();
    'outer: for epoch in 1..=cfg.epochs {
        order.shuffle(&mut rng); // replayed for epochs already done when resuming: same permutation
        let first = (epoch - 1) * per_epoch;
        if first + per_epoch <= done {
            continue;
        }
        let steps_in_epoch = per_epoch.min(total - first);
        let skip = done.saturating_sub(first);
        let mut sum: f64 = losses[first.min(losses.len())..].iter().map(|&l| l as f64).sum();
        for (i, idx) in order.chunks(cfg.batch_size).take(steps_in_epoch).enumerate().skip(skip) {
            let global = losses.len() + 1;
            let rows = group.shard(idx.len()); // all of them with one process
            for (k, (_, l)) in net.model.layers().enumerate() {
                let seed = cfg.seed ^ (global as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (k as u64) << 56;
                l.seed_dropout_rows(seed, rows.start, idx.len());
            }
            let l = if rows.is_empty() {
                trainer.step_shard(net, None, idx.len(), global)?
            } else {
                let (x, y) = data.batch(&idx[rows])?; // (b, features), (b): this rank's examples
                trainer.step_shard(net, Some((&x, &y)), idx.len(), global)?
            };
            losses.push(l);
            let seconds = offset + start.elapsed().as_secs_f64();
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
            tracing::debug!(epoch, step = info.global_step, loss = l, seconds, "training step");
            on_step(&info);
            if losses.len() >= total {
                break 'outer;
            }
            if let Some(c) = checkpoints.as_mut() {
                if losses.len() % c.every == 0 {
                    let ck = Checkpoint {
                        global_step: losses.len(),
                        losses: losses.clone(),
                        step_seconds: step_seconds.clone(),
                        optim: trainer.state()?,
                    };
                    (c.save)(&ck)?;
                    tracing::info!(step = ck.global_step, "checkpoint saved");
                }
            }
        }
    }
    Ok(TrainStats { steps: losses.len(), seconds: offset + start.elapsed().as_secs_f64(), losses, step_seconds })
}
