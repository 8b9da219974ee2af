//! [`finetune`]: a LoRA adapter trained on one corpus over a frozen base, written as a PEFT adapter
//! directory; the base is checked bit for bit unchanged before anything is written. [`finetune_on`] trains on
//! instruction examples too ([`TrainData`]: the loss on their completions and assistant turns).

use std::collections::BTreeMap;
use std::path::PathBuf;

use lora::LoraConfig;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;

use super::pretrain::mixture;
use super::{millis, train_run, Checkpointing, Event, Group, Progress};
use crate::data::Corpus;
use crate::error::{LmError, Result};
use crate::hf::save_adapter;
use crate::instruct::{ExampleSource, Examples, Packing};
use crate::train::{Mixture, TrainSettings, Trainer};
use crate::{Llama, Tokenizer};

/// A fine-tuning run.
#[derive(Debug, Clone)]
pub struct FinetuneJob {
    /// The adapter's name inside the model while it trains (and after: it stays loaded, inactive).
    pub name: String,
    /// The adapter's config (rank, alpha, targets, variants).
    pub lora: LoraConfig,
    /// Steps, batch, learning rate, seed, LoRA+, …
    pub settings: TrainSettings,
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

/// What [`finetune`] reports (the `--json` of `lora lm finetune`).
#[derive(Debug, Clone, Serialize)]
pub struct FinetuneSummary {
    /// The adapter's name.
    pub adapter: String,
    /// The training data.
    pub data: String,
    /// LoRA rank.
    pub rank: usize,
    /// LoRA alpha.
    pub alpha: f64,
    /// Parameters that trained.
    pub trainable_params: usize,
    /// Steps trained.
    pub steps: usize,
    /// Tokens seen.
    pub tokens: usize,
    /// Seconds of training, across resumes.
    pub seconds: f64,
    /// Loss of the last step, nats per token.
    pub final_loss: f64,
    /// The base's weights are bit for bit those before training (always true: otherwise an error).
    pub base_unchanged: bool,
    /// The SHA-256 of the base's weights.
    pub base_sha256: String,
    /// The adapter directory.
    pub out: String,
}

/// What [`finetune`] made.
#[derive(Debug)]
pub struct Finetuned {
    /// The finished run: settings, loss history.
    pub trainer: Trainer,
    /// The summary.
    pub summary: FinetuneSummary,
}

/// What a fine-tune trains on.
#[derive(Debug, Clone, Copy)]
pub enum TrainData<'a> {
    /// Windows of a corpus' train split; every token is a target.
    Corpus(&'a Corpus),
    /// Instruction examples ([`crate::instruct`]), one per row or packed; targets only where they train.
    Examples(&'a Examples, Packing),
}

impl TrainData<'_> {
    fn path(&self) -> &std::path::Path {
        match self {
            TrainData::Corpus(c) => &c.path,
            TrainData::Examples(e, _) => &e.path,
        }
    }

    fn mixture(&self, tokenizer: &Tokenizer, progress: Progress<'_>) -> Result<Mixture> {
        match self {
            TrainData::Corpus(c) => mixture(&[(c, 1.0)], tokenizer, progress),
            TrainData::Examples(e, packing) => {
                let source = ExampleSource::new(e, *packing);
                progress(Event::Source { name: &e.name, tokens: source.len(), weight: 1.0 });
                let mut m = Mixture::new();
                m.add_examples(&e.name, source, 1.0)?;
                Ok(m)
            }
        }
    }
}

/// Adds adapter `job.name` to the (frozen) base, trains it on `data`, checks the base unchanged and writes
/// the adapter to `job.out` (rank 0 of a group). The adapter stays loaded (inactive) on the model.
pub fn finetune(model: &mut Llama, tokenizer: &Tokenizer, data: &Corpus, job: &FinetuneJob, progress: Progress<'_>) -> Result<Finetuned> {
    finetune_on(model, tokenizer, TrainData::Corpus(data), job, progress)
}

/// [`finetune`] on a corpus or on instruction examples.
pub fn finetune_on(
    model: &mut Llama,
    tokenizer: &Tokenizer,
    data: TrainData<'_>,
    job: &FinetuneJob,
    progress: Progress<'_>,
) -> Result<Finetuned> {
    let s = &job.settings;
    job.lora.validate()?;
    model.lora().targeted(&job.lora)?;
    // The base's fingerprint before and after (one tensor at a time: no copy of the base is held).
    let before = model.fingerprint()?;
    let name = job.name.as_str();
    model.lora_mut().add_adapter(name, &job.lora, &mut StdRng::seed_from_u64(s.seed.wrapping_add(1)))?;
    let trained = (|| {
        model.lora_mut().set_active(&[name])?;
        model.freeze_base();
        let mix = data.mixture(tokenizer, progress)?;
        train_run(&format!("Fine-tuning {name}"), model, &mix, s, &job.checkpoint, &job.group, progress)
    })();
    let trainer = match trained {
        Ok(t) => t,
        Err(e) => {
            // Leave the model as it came: no half-trained adapter stays loaded.
            let _ = model.lora_mut().set_active(&[]);
            let _ = model.lora_mut().remove_adapter(name);
            return Err(e);
        }
    };
    let after = model.fingerprint()?;
    let unchanged = before == after;
    if !unchanged {
        return Err(LmError::invalid("base", "changed", "the base weights changed during fine-tuning (a bug: the base must stay frozen)"));
    }
    let meta = BTreeMap::from([
        ("lora_rs.data".to_string(), data.path().display().to_string()),
        ("lora_rs.steps".to_string(), trainer.step().to_string()),
    ]);
    if job.group.is_root() {
        save_adapter(model, name, &job.out, job.base_model.clone(), meta, job.convert_to_lora)?;
        job.checkpoint.remove()?;
    }
    model.lora_mut().set_active(&[])?;
    let summary = FinetuneSummary {
        adapter: name.to_string(),
        data: data.path().display().to_string(),
        rank: job.lora.r,
        alpha: job.lora.alpha,
        trainable_params: trainer.num_trainable(),
        steps: trainer.step(),
        tokens: trainer.step() * s.batch_size * s.seq_len,
        seconds: millis(trainer.seconds()),
        final_loss: trainer.losses.last().map_or(f64::NAN, |l| l.1),
        base_unchanged: unchanged,
        base_sha256: after,
        out: job.out.display().to_string(),
    };
    Ok(Finetuned { trainer, summary })
}
