//! `lora lm finetune`: flags → [`lora_lm::jobs::FinetuneJob`] → [`lora_lm::jobs::finetune`], with bars.

use std::path::Path;

use anyhow::{Context, Result};
use lora::{Exclude, Init, LoraConfig, Scaling, Targets};
use lora_lm::hf::{load_chat_template, load_model, load_tokenizer};
use lora_lm::instruct::{is_instruction_file, lines_list, read_instructions, Encoder, Examples, Instructions, LossOn, Packing};
use lora_lm::jobs::{finetune_on, Event, FinetuneJob, Finetuned, TrainData};
use lora_lm::{Llama, Tokenizer};

use super::pretrain::settings;
use super::{check_out_dir, Bars};
use crate::common::{check_outputs, write_json, Out};
use crate::lm_cli::{ChatDataArgs, LmFinetuneArgs, LmLoraArgs};

/// The adapter config of the LoRA flags.
pub fn lora_config(l: &LmLoraArgs) -> Result<LoraConfig> {
    let c = LoraConfig {
        dropout: l.dropout,
        scaling: if l.rslora { Scaling::RankStabilized } else { Scaling::Standard },
        init: Init::PeftGaussian,
        target_modules: match (&l.target_regex, l.target_modules.as_slice()) {
            (Some(r), _) => Targets::Regex(r.clone()),
            (None, [one]) if one.trim().eq_ignore_ascii_case("all-linear") => Targets::AllLinear,
            (None, names) => names.iter().map(|s| s.trim().to_string()).collect(),
        },
        exclude_modules: (!l.exclude_modules.is_empty())
            .then(|| Exclude::Names(l.exclude_modules.iter().map(|s| s.trim().to_string()).collect())),
        layers_to_transform: l.layers_to_transform.clone(),
        ..LoraConfig::new(l.rank as usize, l.alpha)
    };
    let c = l.variant.apply(c, Init::PeftGaussian);
    c.validate()?;
    Ok(c)
}

/// Instruction data read and tokenised for a model: `split` rows (train or validation) through the model's chat
/// template (or `--chat-template`), with the loss where `--loss-on` says; prints what it read.
/// Which rows of instruction data become examples, and how.
pub struct Split {
    /// The validation rows (else the train rows).
    pub validation: bool,
    /// Tokens per example (or per window when packed).
    pub len: usize,
    /// Packed or one example per row.
    pub packing: Packing,
}

pub fn instruction_examples(
    model_dir: &Path,
    model: &Llama,
    tok: &Tokenizer,
    data: &Instructions,
    chat: &ChatDataArgs,
    Split { validation, len, packing }: Split,
) -> Result<Examples> {
    let template = load_chat_template(model_dir, model.config(), chat.chat_template.as_deref())?;
    let loss: LossOn = chat.loss_on.map_or(LossOn::Completions, Into::into);
    let enc = Encoder { tokenizer: tok, chat: &template, loss };
    let rows = if validation { &data.validation } else { &data.train };
    let ex = Examples::build(&data.path, &data.short_name(), rows, &enc, len, packing)?;
    println!(
        "Instruction data {} ({} rows{}): {} example{}, {} tokens, {} trained ({}), chat template {}",
        data.path.display(),
        data.format.as_str(),
        if validation { ", validation split" } else { "" },
        ex.examples.len(),
        if ex.examples.len() == 1 { "" } else { "s" },
        ex.tokens(),
        ex.trained_tokens(),
        if loss == LossOn::All { "the loss on every token" } else { "the loss on completions and assistant turns" },
        match template.origin() {
            lora_lm::chat::TemplateSource::Default => "lora-rs' default ChatML (this model has none)".to_string(),
            lora_lm::chat::TemplateSource::Given(s) => s.clone(),
        }
    );
    if !ex.skipped.is_empty() {
        println!(
            "  note: {} rows train nothing within {len} tokens and are left out (lines {})",
            ex.skipped.len(),
            lines_list(&ex.skipped)
        );
    }
    Ok(ex)
}

/// Runs a fine-tuning job with a bar and the line `lora lm finetune` prints before it.
pub fn run_job(model: &mut Llama, tok: &Tokenizer, data: TrainData<'_>, job: &FinetuneJob) -> Result<Finetuned> {
    let mut bars = Bars::default();
    let (name, c, steps) = (&job.name, &job.lora, job.settings.steps);
    let path = match data {
        TrainData::Corpus(c) => c.path.clone(),
        TrainData::Examples(e, _) => e.path.clone(),
    };
    let root = job.group.is_root();
    let done = finetune_on(model, tok, data, job, &mut |e| {
        if !root {
            return; // rank 0 prints for every rank
        }
        if let Event::Start { params, trainable, .. } = &e {
            println!(
                "Fine-tuning adapter {name:?} (rank {}, alpha {}) on {}: {trainable} trainable parameters ({:.2}% of {params}), {steps} steps",
                c.r,
                c.alpha,
                path.display(),
                100.0 * *trainable as f64 / *params as f64,
            );
        }
        bars.event(&e);
    });
    let f = done.with_context(|| format!("fine-tuning adapter {name} into {}", job.out.display()))?;
    if !root {
        return Ok(f);
    }
    println!(
        "  base weights bit-for-bit unchanged: {} (SHA-256 {} before and after)",
        f.summary.base_unchanged,
        &f.summary.base_sha256[..16]
    );
    Ok(f)
}

pub fn run(a: LmFinetuneArgs) -> Result<()> {
    let group = crate::dist::group();
    if group.is_root() {
        if a.checkpoint.resume.is_none() {
            check_out_dir(&a.out, &[lora::adapter::CONFIG_FILE, lora::adapter::WEIGHTS_FILE])?;
        }
        check_outputs(&[("--json", a.json.as_deref(), Out::File), ("--report", a.report.report.as_deref(), Out::Dir)])?;
    }
    let config = lora_config(&a.lora)?;
    let (mut model, _) = load_model(&a.model).with_context(|| format!("loading the model {}", a.model.display()))?;
    let tok = load_tokenizer(&a.model, model.config())?;
    // Fail before the work: the data must read and the targets must exist.
    let instructions = is_instruction_file(&a.data).with_context(|| format!("reading data {}", a.data.display()))?;
    if !instructions && (a.packing || a.chat.chat_template.is_some() || a.chat.loss_on.is_some()) {
        anyhow::bail!(
            "--packing, --chat-template and --loss-on apply to instruction data (JSONL rows with \"messages\", or \"prompt\" and \"completion\"); {} is a text corpus",
            a.data.display()
        );
    }
    let corpus = if instructions { None } else { Some(super::corpus(&a.data)?) };
    let packing = if a.packing { Packing::Wrapped } else { Packing::Off };
    let examples = if instructions {
        let data = read_instructions(&a.data)?;
        let split = Split { validation: false, len: a.train.seq_len as usize, packing };
        Some(instruction_examples(&a.model, &model, &tok, &data, &a.chat, split)?)
    } else {
        None
    };
    model.lora().targeted(&config).context("--target-modules / --target-regex / --exclude-modules / --layers-to-transform")?;
    let job = FinetuneJob {
        name: "adapter".into(),
        lora: config,
        settings: lora_lm::train::TrainSettings { loraplus_lr_ratio: a.loraplus_lr_ratio, ..settings(&a.train, a.steps, a.lr, 0.0) },
        out: a.out.clone(),
        base_model: Some(a.model.display().to_string()),
        convert_to_lora: a.lora.variant.convert_to_lora,
        checkpoint: a.checkpoint.policy(&a.out),
        group,
    };
    let data = match (&corpus, &examples) {
        (Some(c), _) => TrainData::Corpus(c),
        (None, Some(e)) => TrainData::Examples(e, packing),
        (None, None) => anyhow::bail!("{}: neither a text corpus nor instruction examples", a.data.display()),
    };
    let f = run_job(&mut model, &tok, data, &job)?;
    if !job.group.is_root() {
        return Ok(()); // rank 0 prints and writes
    }
    println!(
        "Final loss {:.4} after {} steps ({:.1} s); wrote {}",
        f.summary.final_loss,
        f.trainer.step(),
        f.trainer.seconds(),
        a.out.display()
    );
    let summary = serde_json::to_value(&f.summary)?;
    if let Some(p) = &a.json {
        write_json(p, &summary)?;
    }
    if let Some(dir) = &a.report.report {
        super::report_dir::training(dir, "lora lm finetune", &[("fine-tuning", &f.trainer)], &[], &summary)?;
    }
    Ok(())
}
