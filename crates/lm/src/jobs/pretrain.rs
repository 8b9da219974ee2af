//! [`pretrain`]: a Llama trained from scratch (every tensor trains) on a weighted mix of corpora, written
//! as a Hugging Face model directory.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use super::{millis, train_run, Checkpointing, Event, Group, Progress};
use crate::data::{Corpus, TokenStream};
use crate::error::Result;
use crate::hf::{load_model, save_model_as, WeightDtype};
use crate::train::{Mixture, TrainSettings, Trainer};
use crate::{Llama, LlamaConfig, Tokenizer};

/// A pre-training run.
#[derive(Debug, Clone)]
pub struct PretrainJob {
    /// The model's shape.
    pub config: LlamaConfig,
    /// Steps, batch, learning rate, seed, …
    pub settings: TrainSettings,
    /// The model directory to write.
    pub out: PathBuf,
    /// The weights' dtype on disk (bf16 rounds them; the returned model is the one written).
    pub dtype: WeightDtype,
    /// Periodic checkpoints and resuming.
    pub checkpoint: Checkpointing,
    /// The ranks that train together (one process by default; rank 0 writes).
    pub group: Group,
}

/// What [`pretrain`] reports (the `--json` of `lora lm pretrain`).
#[derive(Debug, Clone, Serialize)]
pub struct PretrainSummary {
    /// Parameters of the model.
    pub params: usize,
    /// Steps trained.
    pub steps: usize,
    /// Tokens seen.
    pub tokens: usize,
    /// Seconds of training, across resumes.
    pub seconds: f64,
    /// Loss of the last step, nats per token.
    pub final_loss: f64,
    /// The settings.
    pub settings: TrainSettings,
    /// The model directory.
    pub model: String,
    /// `float32` or `bfloat16`.
    pub dtype: &'static str,
}

/// What [`pretrain`] made.
#[derive(Debug)]
pub struct Pretrained {
    /// The model as written (read back when rounded to bf16).
    pub model: Llama,
    /// The finished run: settings, loss history.
    pub trainer: Trainer,
    /// The summary.
    pub summary: PretrainSummary,
}

/// A mixture of token streams from weighted corpora, each reported as an [`Event::Source`].
pub(super) fn mixture(corpora: &[(&Corpus, f64)], tok: &Tokenizer, progress: Progress<'_>) -> Result<Mixture> {
    let mut m = Mixture::new();
    for (c, w) in corpora {
        let s = TokenStream::from_corpus(c, tok)?;
        let name = c.short_name();
        progress(Event::Source { name: &name, tokens: s.len(), weight: *w });
        m.add(&name, s, *w)?;
    }
    Ok(m)
}

/// A base is never replaced by different weights: adapters trained on it record its fingerprint and would
/// no longer load. Weights identical to those on disk (a re-run with the same settings) replace them.
fn refuse_to_orphan(model: &Llama, job: &PretrainJob) -> Result<()> {
    let weights = job.out.join(crate::hf::WEIGHTS_FILE);
    if !weights.exists() && !job.out.join(crate::hf::INDEX_FILE).exists() {
        return Ok(());
    }
    let old = load_model(&job.out).and_then(|(m, _)| m.fingerprint()).ok();
    let mut state = model.base_state()?;
    if job.dtype == WeightDtype::Bf16 {
        for (_, t) in &mut state {
            *t = t.to_dtype(candle_core::DType::BF16)?.to_dtype(candle_core::DType::F32)?;
        }
    }
    let new = lora::io::fingerprint(&state)?;
    match old {
        Some(old) if old == new => Ok(()),
        old => Err(crate::LmError::file(
            &job.out,
            format!(
                "already holds another model ({}); adapters trained on it would no longer load: choose another output folder or remove it",
                old.map_or("one that does not load".to_string(), |f| format!("SHA-256 {}…", &f[..16]))
            ),
        )),
    }
}

/// Pre-trains a byte-level model of `job.config` on `corpora` (weighted) and writes it to `job.out` (rank 0
/// of a group; the other ranks return the same model, unwritten and not rounded to bf16).
pub fn pretrain(job: &PretrainJob, corpora: &[(&Corpus, f64)], progress: Progress<'_>) -> Result<Pretrained> {
    job.config.validate()?;
    let model = Llama::random(&job.config, job.settings.seed)?;
    let data = mixture(corpora, &Tokenizer::bytes(), progress)?;
    let trainer = train_run("Pre-training", &model, &data, &job.settings, &job.checkpoint, &job.group, progress)?;
    let meta = BTreeMap::from([("lora_rs.pretrain_steps".to_string(), trainer.step().to_string())]);
    let model = if job.group.is_root() {
        refuse_to_orphan(&model, job)?;
        save_model_as(&model, &job.out, &meta, job.dtype)?;
        job.checkpoint.remove()?;
        if job.dtype == WeightDtype::F32 {
            model
        } else {
            load_model(&job.out)?.0
        }
    } else {
        model
    };
    let s = &job.settings;
    let summary = PretrainSummary {
        params: model.num_params(),
        steps: trainer.step(),
        tokens: trainer.step() * s.batch_size * s.seq_len,
        seconds: millis(trainer.seconds()),
        final_loss: trainer.losses.last().map_or(f64::NAN, |l| l.1),
        settings: s.clone(),
        model: job.out.display().to_string(),
        dtype: job.dtype.torch_name(),
    };
    Ok(Pretrained { model, trainer, summary })
}
