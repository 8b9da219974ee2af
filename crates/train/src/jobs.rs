//! Pre-training and fine-tuning as library calls, as `lora_lm::jobs` has them for language models: a job
//! (a plain struct of settings) and one function that runs it, writes its output and returns what it made,
//! reporting each step through a callback. `lora pretrain`, `lora finetune` and `lora demo` only turn
//! flags into jobs and steps into bars.
//!
//! ```text
//! PretrainJob + Dataset            ──► pretrain() ──► (ExpensiveNet, TrainStats)   (model file written)
//! FinetuneJob + ExpensiveNet + Dataset ──► finetune() ──► Finetuned                  (PEFT adapter dir written)
//! ```
//!
//! Checkpoints follow [`Checkpointing`] (lora-rs' one checkpoint file, `lora_optim::checkpoint`); the
//! settings a resume must match are the job's own fields. Outputs are written after training, each
//! atomically, and the checkpoint is removed only once they are.
//!
//! A job's `group` makes it data-parallel (`lora_dist`): every rank runs the job on its share of each
//! batch and keeps the same weights; rank 0 alone writes checkpoints and outputs. A checkpoint holds no
//! rank count, so a run resumes on any number of ranks.

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::Device;
use lora::{LoraConfig, SaveOptions};
use lora_dist::Group;
use lora_optim::checkpoint::Checkpointing;
use rand::SeedableRng;
use serde_json::{json, Value};

use crate::checkpoint;
use crate::data::Dataset;
use crate::error::{Result, TrainError};
use crate::net::ExpensiveNet;
use crate::train::{train_with, Checkpoint, StepInfo, TrainConfig, TrainStats};

/// What a job reports: the start of its training run, then each step.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// Training starts (or resumes).
    Start {
        /// Examples in the training data.
        examples: usize,
        /// Parameters that train.
        trainable: usize,
        /// Steps the run takes in all.
        steps: usize,
        /// Passes over the data those steps make (the last may be partial).
        epochs: usize,
    },
    /// A step finished.
    Step(&'a StepInfo),
}

/// Pre-training a new network (every tensor trains).
#[derive(Debug, Clone)]
pub struct PretrainJob {
    /// Units of the two hidden layers.
    pub hidden: (usize, usize),
    /// Classes (outputs).
    pub classes: usize,
    /// Epochs, batch size, learning rate, seed.
    pub train: TrainConfig,
    /// The model file to write (safetensors, PyTorch state_dict names).
    pub out: PathBuf,
    /// Periodic checkpoints and resuming.
    pub checkpoint: Checkpointing,
    /// The ranks that train together (one process by default; rank 0 writes).
    pub group: Group,
}

impl PretrainJob {
    /// What a resumed run must match (its checkpoint records it).
    pub fn settings(&self, data: &Dataset) -> Value {
        let t = &self.train;
        json!({"hidden1": self.hidden.0, "hidden2": self.hidden.1, "epochs": t.epochs, "batch_size": t.batch_size, "lr": t.lr,
            "seed": t.seed, "train_images": data.len()})
    }
}

/// Pre-trains a network on `data` as `job` says and writes it to `job.out` (rank 0 of a group).
pub fn pretrain(data: &Dataset, job: &PretrainJob, mut progress: impl FnMut(Event<'_>)) -> Result<(ExpensiveNet, TrainStats)> {
    job.train.validate()?;
    job.checkpoint.validate()?;
    let settings = job.settings(data);
    let (net, resume) = match &job.checkpoint.resume {
        Some(p) => {
            let l = checkpoint::load(p, "pretrain", &settings)?;
            tracing::info!(step = l.checkpoint.global_step, path = %p.display(), "resuming pre-training");
            (l.net()?, Some(l.checkpoint))
        }
        None => {
            let inputs = data.inputs.dims().get(1).copied().unwrap_or(0);
            (ExpensiveNet::new(inputs, job.hidden.0, job.hidden.1, job.classes, job.train.seed, &Device::Cpu)?, None)
        }
    };
    let trainable = net.model.trainable_vars().iter().map(|v| v.elem_count()).sum();
    start(&mut progress, data, &job.train, trainable);
    let ctx = Run { ck: &job.checkpoint, phase: "pretrain", adapter: None, settings: &settings, group: &job.group };
    let stats = run(&net, data, &job.train, resume.as_ref(), ctx, |s| progress(Event::Step(s)))?;
    if !job.group.is_root() {
        return Ok((net, stats));
    }
    if job.out.exists() {
        // A base is never replaced by different weights: adapters trained on it record its fingerprint and
        // would no longer load. The same weights (a re-run with the same settings) replace it.
        let new = lora::io::fingerprint(&net.model.base_state()?).map_err(lora::LoraError::from)?;
        let old = ExpensiveNet::load(&job.out).ok().map(|n| n.model.base_state()).transpose()?;
        let old = old.map(|s| lora::io::fingerprint(&s)).transpose().map_err(lora::LoraError::from)?;
        if old.as_deref() != Some(new.as_str()) {
            return Err(TrainError::Model {
                path: job.out.display().to_string(),
                why: format!(
                    "already holds another model ({}); adapters trained on it would no longer load: choose another output or remove it",
                    old.map_or("one that does not load".to_string(), |f| format!("SHA-256 {}…", &f[..16]))
                ),
            });
        }
    }
    net.save(&job.out)?;
    job.checkpoint.remove()?;
    Ok((net, stats))
}

/// Fine-tuning a LoRA adapter on a frozen base, on one class's examples.
#[derive(Debug, Clone)]
pub struct FinetuneJob {
    /// The adapter's name inside the network (it stays loaded, active, after the run).
    pub name: String,
    /// The adapter's config.
    pub lora: LoraConfig,
    /// The class the data holds (recorded in the adapter's metadata and the checkpoint's settings).
    pub class: u8,
    /// Steps (`max_steps`), batch size, learning rate, seed, LoRA+.
    pub train: TrainConfig,
    /// The PEFT adapter directory to write.
    pub out: PathBuf,
    /// `base_model_name_or_path` written into `adapter_config.json`.
    pub base_model: Option<String>,
    /// Write a PiSSA/OLoRA adapter as the plain LoRA with the same update.
    pub convert_to_lora: bool,
    /// Periodic checkpoints and resuming.
    pub checkpoint: Checkpointing,
    /// The ranks that train together (one process by default; rank 0 writes).
    pub group: Group,
}

/// What [`finetune`] made.
#[derive(Debug, Clone)]
pub struct Finetuned {
    /// Examples trained on.
    pub examples: usize,
    /// Parameters that trained.
    pub trainable: usize,
    /// The run.
    pub stats: TrainStats,
    /// Steps per pass over the data.
    pub steps_per_epoch: usize,
    /// The SHA-256 of the base's weights (recorded in the adapter).
    pub base_sha256: String,
}

impl FinetuneJob {
    /// What a resumed run must match (its checkpoint records it).
    pub fn settings(&self, base_sha256: &str) -> Value {
        let (l, t) = (&self.lora, &self.train);
        json!({"base_sha256": base_sha256, "digit": self.class, "rank": l.r, "alpha": l.alpha, "scaling": format!("{:?}", l.scaling),
            "dropout": l.dropout, "steps": t.max_steps, "batch_size": t.batch_size, "lr": t.lr, "seed": t.seed,
            "loraplus_lr_ratio": t.loraplus_lr_ratio, "use_dora": l.use_dora, "lora_bias": l.lora_bias,
            "target_modules": format!("{:?}", l.target_modules), "bias": format!("{:?}", l.bias), "modules_to_save": l.modules_to_save,
            "init": l.init.peft_value()})
    }
}

/// Adds adapter `job.name` to every targeted layer, freezes the base, trains only the adapter on `data`
/// (one class's examples), checks the base unchanged and writes the adapter to `job.out` (rank 0 of a
/// group). A failed run leaves no adapter on the network and writes nothing.
pub fn finetune(net: &mut ExpensiveNet, data: &Dataset, job: &FinetuneJob, mut progress: impl FnMut(Event<'_>)) -> Result<Finetuned> {
    job.train.validate()?;
    job.lora.validate()?;
    job.checkpoint.validate()?;
    let base = net.model.base_state()?;
    let fp = lora::io::fingerprint(&base).map_err(lora::LoraError::from)?;
    let settings = job.settings(&fp);
    let resume = job.checkpoint.resume.as_deref().map(|p| checkpoint::load(p, "finetune", &settings)).transpose()?;
    let name = job.name.as_str();
    let mut rng = rand::rngs::StdRng::seed_from_u64(job.train.seed.wrapping_add(1));
    net.model.add_adapter(name, &job.lora, &mut rng)?;
    let trained = (|| {
        if let Some(l) = &resume {
            for (module, layer) in net.model.layers() {
                for (which, var) in layer.adapter_vars(name) {
                    let key = format!("{module}.{which}");
                    let t = l.tensor("adapter", &key).ok_or_else(|| TrainError::Model {
                        path: l.path.display().to_string(),
                        why: format!("missing tensor adapter.{key}"),
                    })?;
                    if t.dims() != var.dims() {
                        return Err(TrainError::Model {
                            path: l.path.display().to_string(),
                            why: format!("adapter.{key} has shape {:?}, expected {:?}", t.dims(), var.dims()),
                        });
                    }
                    var.set(&t)?;
                }
            }
        }
        net.model.set_active(&[name])?;
        net.model.freeze_base(lora::Bias::None); // trained biases are the adapter's own copies
        for (i, (_, l)) in net.model.layers().enumerate() {
            l.seed_dropout(job.train.seed.wrapping_add(100 + i as u64));
        }
        let trainable: usize = net.model.trainable_vars().iter().map(|v| v.elem_count()).sum();
        start(&mut progress, data, &job.train, trainable);
        let resume = resume.as_ref().map(|l| &l.checkpoint);
        let ctx = Run { ck: &job.checkpoint, phase: "finetune", adapter: Some(name), settings: &settings, group: &job.group };
        let stats = run(net, data, &job.train, resume, ctx, |s| progress(Event::Step(s)))?;
        Ok((trainable, stats))
    })();
    let (trainable, stats) = match trained {
        Ok(x) => x,
        Err(e) => {
            let _ = net.model.set_active(&[]);
            let _ = net.model.remove_adapter(name);
            return Err(e);
        }
    };
    let after = net.model.base_state()?;
    if lora::io::fingerprint(&after).map_err(lora::LoraError::from)? != fp {
        return Err(TrainError::setting(
            "base",
            "changed",
            "the base weights changed during fine-tuning (a bug: the base must stay frozen)",
        ));
    }
    let save = SaveOptions {
        base_model_name_or_path: job.base_model.clone(),
        base_fingerprint: Some(fp.clone()),
        metadata: BTreeMap::from([("lora_rs.digit".to_string(), job.class.to_string())]),
        task_type: None,
        convert_to_lora: job.convert_to_lora,
    };
    if job.group.is_root() {
        net.model.save_adapter(name, &job.out, &save)?;
        job.checkpoint.remove()?;
    }
    Ok(Finetuned { examples: data.len(), trainable, stats, steps_per_epoch: job.train.steps_per_epoch(data.len()), base_sha256: fp })
}

fn start(progress: &mut impl FnMut(Event<'_>), data: &Dataset, cfg: &TrainConfig, trainable: usize) {
    let per_epoch = cfg.steps_per_epoch(data.len()).max(1);
    let steps = cfg.max_steps.unwrap_or(usize::MAX).min(per_epoch.saturating_mul(cfg.epochs));
    progress(Event::Start { examples: data.len(), trainable, steps, epochs: steps.div_ceil(per_epoch) });
}

/// What [`run`] needs besides the data: the checkpoint policy, the phase and adapter its checkpoints are
/// of, the settings they record, and the ranks.
struct Run<'a> {
    ck: &'a Checkpointing,
    phase: &'a str,
    adapter: Option<&'a str>,
    settings: &'a Value,
    group: &'a Group,
}

/// Trains with checkpoints as `ck` says (each holds the net, the adapter's tensors and Adam's state; rank 0
/// writes them), after checking that every rank starts from the same settings, model and data, and before
/// returning that every rank ends with the same weights.
fn run(
    net: &ExpensiveNet,
    data: &Dataset,
    cfg: &TrainConfig,
    resume: Option<&Checkpoint>,
    r: Run<'_>,
    on_step: impl FnMut(&StepInfo),
) -> Result<TrainStats> {
    if r.group.is_distributed() {
        let dist = |e: lora_dist::DistError| TrainError::setting("ranks", r.group.size(), &e.to_string());
        r.group.agree("the training settings", r.settings.to_string().as_bytes()).map_err(dist)?;
        let mut state = net.model.base_state()?;
        for (module, layer) in net.model.layers() {
            for (which, var) in r.adapter.map(|a| layer.adapter_vars(a)).unwrap_or_default() {
                state.push((format!("{module}.{which}"), var.as_tensor().clone()));
            }
        }
        let step = resume.map_or(0, |c| c.global_step);
        let model = format!("step {step} | {}", lora::io::fingerprint(&state).map_err(lora::LoraError::from)?);
        r.group.agree("the model (base, adapter, step)", model.as_bytes()).map_err(dist)?;
        let labels = [("labels".to_string(), data.labels.clone())];
        let data_id = format!("{} examples | labels {}", data.len(), lora::io::fingerprint(&labels).map_err(lora::LoraError::from)?);
        r.group.agree("the training data (examples and labels)", data_id.as_bytes()).map_err(dist)?;
    }
    let mut save = |c: &Checkpoint| checkpoint::save(&r.ck.path, r.phase, net, r.adapter, r.settings, c);
    let every = r.ck.every.filter(|_| r.group.is_root()).map(|n| crate::train::SaveEvery { every: n, save: &mut save });
    let stats = train_with(net, data, cfg, resume, every, r.group, on_step)?;
    if r.group.is_distributed() {
        // Every rank must hold the same weights, bit for bit, before rank 0 writes them.
        let mut trained = Vec::new();
        for (module, layer) in net.model.layers() {
            for (i, v) in layer.trainable_vars().into_iter().enumerate() {
                trained.push((format!("{module}.{i}"), v.as_tensor().clone()));
            }
        }
        let fp = lora::io::fingerprint(&trained).map_err(lora::LoraError::from)?;
        let what = format!("the trained tensors after step {}", stats.steps);
        r.group.agree(&what, fp.as_bytes()).map_err(|e| TrainError::setting("ranks", r.group.size(), &e.to_string()))?;
    }
    Ok(stats)
}
