//! Training loops: pre-training a base (every tensor trains) and LoRA fine-tuning (only the active
//! adapter trains), with [`AdamW`], the warm-up + cosine [`Schedule`] and gradient clipping.
//!
//! Each step draws `batch_size` windows of `seq_len` tokens, row by row: a source chosen by weight from
//! the [`Mixture`], then a random offset in it. The loss is the mean next-token cross-entropy over the
//! `batch_size·(seq_len − 1)` predictions (position i predicts token i + 1), as transformers computes
//! `model(ids, labels=ids).loss`. The draws of step t come from a generator seeded by (seed, t) alone,
//! so a run is deterministic for a seed and thread count and a resumed run needs no generator state.
//!
//! A source may also be instruction examples ([`crate::instruct::ExampleSource`]): a row is then one example (or a
//! window of them packed) whose targets outside completions are [`lora_optim::IGNORE`], and the loss is the mean
//! over the targets that count ([`batch_loss_targets`]).
//!
//! Data-parallel ([`Trainer::in_group`]), every rank draws the same global batch and takes its rows
//! (`lora_dist::shard`: consecutive blocks in rank order); its loss is its rows' kept targets' cross-entropies
//! summed and divided by the global batch's count of kept targets, so the ranks' gradients and losses add up to the
//! global batch's. They are summed in one all-reduce before the optimizer step ([`AdamW::reduce`]), which
//! clips by the global norm; every rank applies the same update. Adapter dropout draws each row's mask as
//! the one process does (the generator skips the other ranks' rows).

use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::data::TokenStream;
use crate::error::{LmError, Result};
use crate::instruct::ExampleSource;
use crate::model::Llama;
use crate::ops::cross_entropy;
use lora_dist::Group;
use lora_optim::checkpoint;
use lora_optim::{AdamW, Schedule};

/// Settings of a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSettings {
    /// Optimizer steps.
    pub steps: usize,
    /// Sequences per step.
    pub batch_size: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Learning-rate floor as a fraction of `lr`.
    pub min_lr_ratio: f64,
    /// Warm-up steps.
    pub warmup: usize,
    /// Decoupled weight decay (matrices only).
    pub weight_decay: f64,
    /// Global gradient-norm clip (`None`: no clipping).
    pub clip: Option<f64>,
    /// Seed of the data draws (and of adapter dropout).
    pub seed: u64,
    /// LoRA+: B matrices (and one-dimensional tensors) learn at this multiple of `lr` (`None`: off).
    #[serde(default)]
    pub loraplus_lr_ratio: Option<f64>,
}

impl TrainSettings {
    /// Checks every field against the model; errors name the setting and value.
    pub fn validate(&self, model: &Llama) -> Result<()> {
        if let Some(r) = self.loraplus_lr_ratio.filter(|r| !(r.is_finite() && *r > 0.0)) {
            return Err(LmError::invalid("loraplus_lr_ratio", r, "must be a positive number (PEFT suggests 2 to 16 or more)"));
        }
        if self.steps == 0 {
            return Err(LmError::invalid("steps", 0, "must be at least 1"));
        }
        if self.batch_size == 0 {
            return Err(LmError::invalid("batch_size", 0, "must be at least 1"));
        }
        let ctx = model.config().max_position_embeddings;
        if self.seq_len < 2 || self.seq_len > ctx {
            return Err(LmError::invalid("seq_len", self.seq_len, format!("must be between 2 and the model's context ({ctx})")));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(LmError::invalid("lr", self.lr, "must be a positive number"));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err(LmError::invalid("min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]"));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(LmError::invalid("weight_decay", self.weight_decay, "must be a non-negative number"));
        }
        if let Some(c) = self.clip.filter(|c| !(c.is_finite() && *c > 0.0)) {
            return Err(LmError::invalid("clip", c, "must be a positive number"));
        }
        Ok(())
    }

    fn schedule(&self) -> Schedule {
        Schedule { lr: self.lr, min_ratio: self.min_lr_ratio, warmup: self.warmup.min(self.steps), total: self.steps }
    }
}

/// Weighted token sources to draw training windows from.
#[derive(Debug, Clone, Default)]
pub struct Mixture {
    sources: Vec<(String, Source, f64)>,
}

/// What a mixture draws rows from.
#[derive(Debug, Clone)]
enum Source {
    /// Windows at random offsets; every next token is a target.
    Stream(TokenStream),
    /// Instruction examples: targets only where they train.
    Examples(ExampleSource),
}

impl Source {
    fn len(&self) -> usize {
        match self {
            Source::Stream(s) => s.len(),
            Source::Examples(e) => e.len(),
        }
    }
}

/// The token ids of a training step (rows · len) and each position's next-token target ([`lora_optim::IGNORE`]
/// where nothing is predicted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Token ids, row-major.
    pub ids: Vec<u32>,
    /// Targets, row-major.
    pub targets: Vec<u32>,
}

impl Mixture {
    /// An empty mixture.
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds a source with a positive weight.
    pub fn add(&mut self, name: &str, stream: TokenStream, weight: f64) -> Result<()> {
        if !(weight.is_finite() && weight > 0.0) {
            return Err(LmError::invalid(format!("weight of {name}"), weight, "must be a positive number"));
        }
        if stream.len() < 2 {
            return Err(LmError::invalid(format!("data {name}"), format!("{} tokens", stream.len()), "too short to train on"));
        }
        self.sources.push((name.to_string(), Source::Stream(stream), weight));
        Ok(())
    }
    /// Adds instruction examples with a positive weight.
    pub fn add_examples(&mut self, name: &str, examples: ExampleSource, weight: f64) -> Result<()> {
        if !(weight.is_finite() && weight > 0.0) {
            return Err(LmError::invalid(format!("weight of {name}"), weight, "must be a positive number"));
        }
        if examples.is_empty() {
            return Err(LmError::invalid(format!("data {name}"), "no examples", "nothing to train on"));
        }
        self.sources.push((name.to_string(), Source::Examples(examples), weight));
        Ok(())
    }
    /// (name, tokens, weight) of each source.
    pub fn sources(&self) -> impl Iterator<Item = (&str, usize, f64)> {
        self.sources.iter().map(|(n, s, w)| (n.as_str(), s.len(), *w))
    }

    /// The token ids (rows · len) of training step `step` (see [`Mixture::draw`]).
    pub fn batch(&self, seed: u64, step: usize, rows: usize, len: usize) -> Result<Vec<u32>> {
        Ok(self.draw(seed, step, rows, len)?.ids)
    }

    /// The ids and targets (rows · len) of training step `step`, drawn from (seed, step) alone: each row a source
    /// chosen by weight, then a window of a stream (rows shorter than `len`, from a tiny source, are repeated to
    /// fill; every next token is a target) or an example ([`ExampleSource::draw`]).
    pub fn draw(&self, seed: u64, step: usize, rows: usize, len: usize) -> Result<Batch> {
        if self.sources.is_empty() {
            return Err(LmError::invalid("data", "none", "no training data given"));
        }
        let mut rng = StdRng::seed_from_u64(
            seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (step as u64).wrapping_add(1).wrapping_mul(0xD1B5_4A32_D192_ED03),
        );
        let total: f64 = self.sources.iter().map(|s| s.2).sum();
        let mut out = Vec::with_capacity(rows * len);
        let mut targets = Vec::with_capacity(rows * len);
        for _ in 0..rows {
            let mut x = rng.random::<f64>() * total;
            let mut pick = &self.sources[self.sources.len() - 1].1;
            for (_, s, w) in &self.sources {
                if x < *w {
                    pick = s;
                    break;
                }
                x -= w;
            }
            match pick {
                Source::Stream(s) => {
                    let w = s.window(&mut rng, len);
                    let row = out.len();
                    out.extend(w.iter().cycle().take(len));
                    targets.extend(out[row + 1..].iter().copied().chain([lora_optim::IGNORE]));
                }
                Source::Examples(e) => e.draw(&mut rng, len, &mut out, &mut targets),
            }
        }
        Ok(Batch { ids: out, targets })
    }
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Steps done (1-based).
    pub step: usize,
    /// Of how many.
    pub steps: usize,
    /// Mean loss of the step's batch, nats per token.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens seen since the run started (this process).
    pub tokens: usize,
    /// Seconds since the run started (this process).
    pub seconds: f64,
}

/// A training run in progress: settings, optimizer state, position and the loss history.
#[derive(Debug)]
pub struct Trainer {
    settings: TrainSettings,
    opt: AdamW,
    step: usize,
    /// (step, loss, seconds) of every step done, across resumes.
    pub losses: Vec<(usize, f64, f64)>,
    seconds_before: f64,
    group: Group,
}

/// The loss of one batch of token ids (rows, len): mean cross-entropy of next-token predictions.
pub fn batch_loss(model: &Llama, ids: &[u32], rows: usize, len: usize, train: bool) -> Result<Tensor> {
    shard_loss(model, ids, rows, len, train, rows * len.saturating_sub(1))
}

/// These rows' share of the mean loss of a global batch of `total` predictions that other ranks hold the
/// rest of: their next-token cross-entropies summed and divided by `total` ([`batch_loss`] when `total`
/// is these rows' `rows·(len − 1)`).
pub fn shard_loss(model: &Llama, ids: &[u32], rows: usize, len: usize, train: bool, total: usize) -> Result<Tensor> {
    if ids.len() != rows * len || len < 2 || rows == 0 {
        return Err(LmError::invalid("batch", format!("{} ids", ids.len()), format!("expected {rows} ≥ 1 rows of {len} ≥ 2 tokens")));
    }
    // Every position predicts the next token; the last of each row predicts nothing.
    let ignore = lora_optim::IGNORE;
    let targets: Vec<u32> = ids.chunks_exact(len).flat_map(|r| r[1..].iter().copied().chain([ignore])).collect();
    shard_loss_targets(model, ids, &targets, rows, len, train, total)
}

/// The loss of one batch of token ids (rows, len) against `targets` (rows · len; position i's next token, or
/// [`lora_optim::IGNORE`]): the mean cross-entropy over the targets that count.
pub fn batch_loss_targets(model: &Llama, ids: &[u32], targets: &[u32], rows: usize, len: usize, train: bool) -> Result<Tensor> {
    let kept = targets.iter().filter(|&&t| t != lora_optim::IGNORE).count();
    if kept == 0 {
        return Err(LmError::invalid("batch", "no targets", "every target of the batch is ignored"));
    }
    shard_loss_targets(model, ids, targets, rows, len, train, kept)
}

/// These rows' share of the mean loss of a global batch with `total` kept targets that other ranks hold
/// the rest of: the cross-entropies of their kept targets summed and divided by `total`
/// ([`batch_loss_targets`] when `total` is these rows' kept count).
pub fn shard_loss_targets(
    model: &Llama,
    ids: &[u32],
    targets: &[u32],
    rows: usize,
    len: usize,
    train: bool,
    total: usize,
) -> Result<Tensor> {
    if ids.len() != rows * len || targets.len() != ids.len() || len < 2 || rows == 0 {
        return Err(LmError::invalid(
            "batch",
            format!("{} ids, {} targets", ids.len(), targets.len()),
            format!("expected {rows} ≥ 1 rows of {len} ≥ 2 tokens and a target each"),
        ));
    }
    let t = Tensor::from_vec(ids.to_vec(), (rows, len), &Device::Cpu)?;
    if model.is_fused() {
        let logits = model.logits_rows(&t, None, train)?; // (rows·len, V)
        if crate::fused::supports(&logits) {
            return Ok(lora_optim::cross_entropy_over(&logits, targets, total)?);
        }
    }
    let logits = model.forward(&t, None, train)?; // (rows, len, V)
    let v = logits.dim(2)?;
    let kept: Vec<u32> = (0..targets.len() as u32).filter(|&i| targets[i as usize] != lora_optim::IGNORE).collect();
    let n = kept.len();
    if n == 0 || total < n {
        return Err(LmError::invalid("batch", format!("{n} kept targets"), format!("a mean over {total} targets cannot hold them")));
    }
    let want: Vec<u32> = kept.iter().map(|&i| targets[i as usize]).collect();
    let pred = logits.reshape((rows * len, v))?.index_select(&Tensor::from_vec(kept, n, &Device::Cpu)?, 0)?; // (n, V)
    let mean = cross_entropy(&pred, &Tensor::from_vec(want, n, &Device::Cpu)?)?;
    Ok(if n == total { mean } else { (mean * (n as f64 / total as f64))? })
}

impl Trainer {
    /// A new run over the model's trainable tensors as they are now (freeze or add adapters first).
    pub fn new(model: &Llama, settings: TrainSettings) -> Result<Self> {
        settings.validate(model)?;
        let params = model.trainable_vars();
        if params.is_empty() {
            return Err(LmError::invalid("trainable tensors", "none", "nothing would train: add an adapter or unfreeze the base"));
        }
        let mut opt = AdamW::new(params, settings.weight_decay);
        if let Some(ratio) = settings.loraplus_lr_ratio {
            opt = opt.with_loraplus(ratio);
        }
        Ok(Trainer { opt, settings, step: 0, losses: Vec::new(), seconds_before: 0.0, group: Group::single() })
    }

    /// The run trains data-parallel over `group`: each step this rank takes its rows of the global batch
    /// and the gradients are summed over the ranks before the update (see the module docs).
    pub fn in_group(mut self, group: Group) -> Self {
        self.group = group;
        self
    }

    /// The ranks the run trains on.
    pub fn group(&self) -> &Group {
        &self.group
    }

    /// Fails on every rank, naming the ranks that differ, unless every rank of the group starts this run
    /// from the same settings, step, trainable tensors, base and data (sources, sizes, weights): otherwise
    /// their batches or weights would silently part. Nothing is sent with one process.
    pub fn check_ranks_agree(&self, model: &Llama, data: &Mixture) -> Result<()> {
        let g = &self.group;
        if !g.is_distributed() {
            return Ok(());
        }
        let settings = serde_json::to_string(&self.settings).map_err(|e| LmError::invalid("settings", "json", e.to_string()))?;
        let dist = |e: lora_dist::DistError| LmError::invalid("ranks", g.size(), e.to_string());
        g.agree("the training settings", settings.as_bytes()).map_err(dist)?;
        let trained: Vec<(String, Tensor)> = self.opt.params().iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        let model_id = format!("step {} | base {} | trained {}", self.step, model.fingerprint()?, lora::io::fingerprint(&trained)?);
        g.agree("the model (base, trained tensors, step)", model_id.as_bytes()).map_err(dist)?;
        let sources: Vec<String> = data.sources().map(|(n, t, w)| format!("{n}:{t}:{w}")).collect();
        g.agree("the training data", sources.join("|").as_bytes()).map_err(dist)?;
        Ok(())
    }

    /// Fails on every rank unless every rank of the group holds the same trained tensors, bit for bit (a
    /// SHA-256 of them): the promise of data-parallel training, checked before rank 0 writes anything.
    pub fn check_weights_agree(&self) -> Result<()> {
        let g = &self.group;
        if !g.is_distributed() {
            return Ok(());
        }
        let trained: Vec<(String, Tensor)> = self.opt.params().iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        let fp = lora::io::fingerprint(&trained)?;
        g.agree(&format!("the trained tensors after step {}", self.step), fp.as_bytes())
            .map_err(|e| LmError::invalid("ranks", g.size(), e.to_string()))
    }

    /// The settings.
    pub fn settings(&self) -> &TrainSettings {
        &self.settings
    }
    /// Steps done.
    pub fn step(&self) -> usize {
        self.step
    }
    /// Whether every step is done.
    pub fn done(&self) -> bool {
        self.step >= self.settings.steps
    }
    /// Number of trainable parameters.
    pub fn num_trainable(&self) -> usize {
        self.opt.params().iter().map(|(_, v)| v.elem_count()).sum()
    }
    /// Seconds spent training, across resumes.
    pub fn seconds(&self) -> f64 {
        self.losses.last().map_or(self.seconds_before, |l| l.2)
    }

    /// Runs steps until `until` (or the end), calling `on_step` after each; `on_step` returning false stops
    /// early (e.g. to checkpoint and exit).
    pub fn run(
        &mut self,
        model: &Llama,
        data: &Mixture,
        until: usize,
        mut on_step: impl FnMut(&Self, &StepReport) -> Result<bool>,
    ) -> Result<()> {
        let s = self.settings.clone();
        let schedule = s.schedule();
        let start = Instant::now();
        let mut tokens = 0;
        let group = self.group.clone();
        let rows = group.shard(s.batch_size);
        while self.step < until.min(s.steps) {
            let Batch { ids, targets } = data.draw(s.seed, self.step, s.batch_size, s.seq_len)?;
            for (_, layer) in model.lora().layers() {
                let seed = s.seed ^ (self.step as u64).wrapping_mul(0x2545_F491_4F6C_DD1D);
                layer.seed_dropout_rows(seed, rows.start * s.seq_len, s.batch_size * s.seq_len);
            }
            // The mean is over the kept targets of the whole global batch; this rank holds its rows' share.
            let total = targets.iter().filter(|&&t| t != lora_optim::IGNORE).count();
            if total == 0 {
                return Err(LmError::invalid("batch", format!("step {}", self.step + 1), "every target of the batch is ignored"));
            }
            // This rank's rows (all of them with one process); a rank past the rows of a small batch has none.
            let local = rows.start * s.seq_len..rows.end * s.seq_len;
            let kept = targets[local.clone()].iter().filter(|&&t| t != lora_optim::IGNORE).count();
            let (grads, share) = if rows.is_empty() || kept == 0 {
                (None, 0.0)
            } else {
                let loss = shard_loss_targets(model, &ids[local.clone()], &targets[local], rows.len(), s.seq_len, true, total)?;
                let share = loss.to_scalar::<f32>()?;
                (Some(loss.backward()?), share)
            };
            let reduced = self.opt.reduce(grads.as_ref(), share, &group)?;
            let value = reduced.loss() as f64;
            if !value.is_finite() {
                return Err(LmError::invalid(
                    "loss",
                    value,
                    format!("became non-finite at step {}: lower the learning rate", self.step + 1),
                ));
            }
            let lr = schedule.at(self.step);
            let grad_norm = self.opt.apply(&reduced, lr, s.clip)?;
            self.step += 1;
            tokens += ids.len();
            let seconds = self.seconds_before + start.elapsed().as_secs_f64();
            self.losses.push((self.step, value, seconds));
            let report = StepReport { step: self.step, steps: s.steps, loss: value, lr, grad_norm, tokens, seconds };
            tracing::debug!(step = self.step, loss = value, lr, grad_norm, seconds, "training step");
            if !on_step(self, &report)? {
                break;
            }
        }
        self.seconds_before = self.seconds();
        Ok(())
    }

    /// Writes a checkpoint (see [`lora_optim::checkpoint`]): the trainable tensors by name, the optimizer's
    /// moments, the position, the settings and the loss history, one file written atomically.
    pub fn save_checkpoint(&self, path: &Path) -> Result<()> {
        let tensors = self.opt.params().iter().map(|(name, var)| (name.clone(), var.as_tensor().clone())).collect();
        let settings = serde_json::to_value(&self.settings).map_err(|e| LmError::file(path, e.to_string()))?;
        let state = checkpoint::State {
            kind: CHECKPOINT_KIND.into(),
            step: self.step,
            adam_steps: self.opt.steps,
            losses: self.losses.iter().map(|l| l.1).collect(),
            seconds: self.losses.iter().map(|l| l.2).collect(),
            settings,
        };
        checkpoint::save(path, &checkpoint::Checkpoint { state, tensors, moments: self.opt.moments.clone() })?;
        Ok(())
    }

    /// Resumes from a checkpoint written by [`Trainer::save_checkpoint`] for the same model state (the same
    /// trainable tensors by name and shape) and the same settings; the tensors are written into the model.
    pub fn resume(model: &Llama, settings: TrainSettings, path: &Path) -> Result<Self> {
        let mut t = Trainer::new(model, settings)?;
        let want = serde_json::to_value(&t.settings).map_err(|e| LmError::file(path, e.to_string()))?;
        let ck = checkpoint::load(path, CHECKPOINT_KIND, &want)?;
        if ck.tensors.len() != t.opt.params().len() || ck.moments.len() != t.opt.params().len() {
            return Err(LmError::file(
                path,
                format!(
                    "holds {} tensors and {} moments, expected {} for this model's trainable tensors",
                    ck.tensors.len(),
                    ck.moments.len(),
                    t.opt.params().len()
                ),
            ));
        }
        // Every tensor is found and checked before any is written: a bad checkpoint leaves the model as it was.
        let mut found = Vec::with_capacity(t.opt.params().len());
        for (name, var) in t.opt.params() {
            let x = ck.tensor(name, path)?;
            let mo = ck.moments.get(name).ok_or_else(|| LmError::file(path, format!("missing tensor adam_m/{name}")))?;
            if x.dims() != var.dims() || mo.m.len() != var.elem_count() {
                return Err(LmError::file(path, format!("tensor {name}: shape {:?}, the model's is {:?}", x.dims(), var.dims())));
            }
            found.push((name.clone(), var.clone(), x.clone(), mo.clone()));
        }
        for (name, var, x, mo) in found {
            var.set(&x)?;
            t.opt.moments.insert(name, mo);
        }
        t.step = ck.state.step;
        t.opt.steps = ck.state.adam_steps;
        t.losses = ck.state.losses.iter().zip(&ck.state.seconds).enumerate().map(|(i, (&l, &s))| (i + 1, l, s)).collect();
        t.seconds_before = t.seconds();
        tracing::info!(step = t.step, path = %path.display(), "resumed from checkpoint");
        Ok(t)
    }
}

/// The run kind of a language-model checkpoint (see [`lora_optim::checkpoint::State::kind`]).
pub const CHECKPOINT_KIND: &str = "lm";
