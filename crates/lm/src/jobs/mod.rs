//! Pre-training, fine-tuning and evaluation as library calls: each is a job (a plain struct of settings)
//! and one function that runs it and returns what it made, reporting progress through a callback that
//! receives [`Event`]s. The `lora lm` commands, the server and a Rust user call the same functions; the
//! command line only turns flags into a job and events into bars and lines.
//!
//! ```text
//! PretrainJob + weighted corpora ──► pretrain() ──► Pretrained { model, trainer, summary }   (model dir written)
//! FinetuneJob + base + corpus    ──► finetune() ──► Finetuned { trainer, summary }           (PEFT dir written)
//!   (or instruction examples: finetune_on(TrainData::Examples), the loss on completions / assistant turns)
//! EvalJob + base + adapters      ──► evaluate() ──► EvalTable (rows: corpora, columns: base, adapters)
//! ```
//!
//! A job either writes all its files or none: outputs are written after training, each atomically, and
//! the periodic checkpoint is removed only once they are.
//!
//! A job's `group` makes it data-parallel (`lora_dist`): every rank runs the same job on its share of each
//! batch and keeps the same weights; rank 0 alone reports progress worth printing, writes checkpoints and
//! writes the outputs (the others return what they trained and write nothing). One process is the default.

mod evaluate;
mod finetune;
mod pretrain;

use std::path::Path;

use crate::eval::Score;
use crate::train::StepReport;

pub use lora_dist::Group;
pub use lora_optim::checkpoint::{default_path as default_checkpoint, Checkpointing};

pub use evaluate::{evaluate, evaluate_on, EvalData, EvalJob, EvalTable};
pub use finetune::{finetune, finetune_on, FinetuneJob, FinetuneSummary, Finetuned, TrainData};
pub use pretrain::{pretrain, PretrainJob, PretrainSummary, Pretrained};

/// What a job reports while it runs, in order: the data, the start of each training run, each step, each
/// checkpoint, the end of the run; evaluation reports each score as it is computed.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// One source of the training data: its short name, tokens in its training split, its weight.
    Source {
        /// The corpus' short name (`sql`).
        name: &'a str,
        /// Tokens it holds for training.
        tokens: usize,
        /// Its share of the draws.
        weight: f64,
    },
    /// A training run starts (or resumes after `done` steps).
    Start {
        /// What runs (`Pre-training`, `Fine-tuning sql`).
        label: &'a str,
        /// Steps of the whole run.
        steps: usize,
        /// Steps already done (a resumed run).
        done: usize,
        /// Parameters of the model.
        params: usize,
        /// Parameters that train.
        trainable: usize,
    },
    /// A step finished.
    Step(&'a StepReport),
    /// A checkpoint was written after `step` steps.
    Checkpoint {
        /// Steps it holds.
        step: usize,
        /// Where.
        path: &'a Path,
    },
    /// The training run `label` finished.
    Finish {
        /// What ran.
        label: &'a str,
    },
    /// Evaluation scored one corpus with one column (`base` or an adapter's name).
    Scored {
        /// The corpus' file name.
        corpus: &'a str,
        /// `base` or the adapter's name.
        column: &'a str,
        /// Its score.
        score: &'a Score,
    },
}

/// A progress callback: receives every [`Event`] of a job. `&mut |_| {}` ignores them.
pub type Progress<'p> = &'p mut dyn FnMut(Event<'_>);

/// Rounds seconds to milliseconds for summaries.
fn millis(s: f64) -> f64 {
    (s * 1000.0).round() / 1000.0
}

/// Runs (or resumes) a training run over the model's trainable tensors on the ranks of `group`,
/// checkpointing as `ck` says (rank 0 writes) and reporting every step.
fn train_run(
    label: &str,
    model: &crate::Llama,
    data: &crate::train::Mixture,
    settings: &crate::train::TrainSettings,
    ck: &Checkpointing,
    group: &Group,
    progress: Progress<'_>,
) -> crate::Result<crate::train::Trainer> {
    use crate::train::Trainer;
    ck.validate()?;
    let trainer = match &ck.resume {
        Some(p) => Trainer::resume(model, settings.clone(), p)?,
        None => Trainer::new(model, settings.clone())?,
    };
    let mut trainer = trainer.in_group(group.clone());
    trainer.check_ranks_agree(model, data)?;
    progress(Event::Start {
        label,
        steps: settings.steps,
        done: trainer.step(),
        params: model.num_params(),
        trainable: trainer.num_trainable(),
    });
    trainer.run(model, data, settings.steps, |t, r| {
        progress(Event::Step(r));
        if ck.due(r.step, r.steps) && group.is_root() {
            t.save_checkpoint(&ck.path)?;
            progress(Event::Checkpoint { step: r.step, path: &ck.path });
        }
        Ok(true)
    })?;
    trainer.check_weights_agree()?;
    progress(Event::Finish { label });
    Ok(trainer)
}
