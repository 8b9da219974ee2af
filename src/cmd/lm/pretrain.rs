//! `lora lm pretrain`: a byte-level Llama trained from scratch on a weighted mix of corpora.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use lora_lm::data::{Corpus, TokenStream};
use lora_lm::hf::{load_model, save_model_as, WeightDtype, CONFIG_FILE, WEIGHTS_FILE};
use lora_lm::train::{Mixture, TrainSettings, Trainer};
use lora_lm::{Llama, LlamaConfig, Tokenizer};
use serde_json::{json, Value};

use super::{check_out_dir, checkpoint_path, corpus, StepBar};
use crate::common::{check_outputs, write_json, Out};
use crate::lm_cli::{LmCheckpointArgs, LmPretrainArgs, LmShapeArgs, LmTrainArgs};

/// The default pre-training mix: mostly Python, a little SQL and JavaScript, so adapters have
/// something to teach.
pub fn default_mix(dir: &Path) -> Vec<(PathBuf, f64)> {
    vec![(dir.join("python.jsonl.gz"), 0.8), (dir.join("sql.jsonl.gz"), 0.1), (dir.join("js.jsonl.gz"), 0.1)]
}

/// The byte-level config of the shape flags.
pub fn shape_config(s: &LmShapeArgs) -> Result<LlamaConfig> {
    let mut c = LlamaConfig::byte_default();
    c.hidden_size = s.hidden as usize;
    c.intermediate_size = s.intermediate as usize;
    c.num_hidden_layers = s.layers as usize;
    c.num_attention_heads = s.heads as usize;
    c.num_key_value_heads = s.kv_heads as usize;
    c.max_position_embeddings = s.context as usize;
    if !c.hidden_size.is_multiple_of(c.num_attention_heads) {
        anyhow::bail!("--hidden {} is not a multiple of --heads {}", c.hidden_size, c.num_attention_heads);
    }
    c.head_dim = c.hidden_size / c.num_attention_heads;
    c.validate().context("the model shape flags")?;
    Ok(c)
}

/// Reads weighted corpus files (each once; errors name the file).
pub fn read_weighted(files: &[(PathBuf, f64)]) -> Result<Vec<(Corpus, f64)>> {
    files.iter().map(|(p, w)| Ok((corpus(p)?, *w))).collect()
}

/// A mixture of token streams from weighted corpora.
pub fn mixture(corpora: &[(&Corpus, f64)], tok: &Tokenizer) -> Result<Mixture> {
    let mut m = Mixture::new();
    for (c, w) in corpora {
        let s = TokenStream::from_corpus(c, tok)?;
        m.add(&c.short_name(), s, *w).with_context(|| format!("data {}", c.path.display()))?;
    }
    Ok(m)
}

/// Training settings from the flags.
pub fn settings(t: &LmTrainArgs, steps: u32, lr: f64, weight_decay: f64) -> TrainSettings {
    let steps = steps as usize;
    TrainSettings {
        steps,
        batch_size: t.batch_size as usize,
        seq_len: t.seq_len as usize,
        lr,
        min_lr_ratio: 0.1,
        warmup: t.warmup.map_or((steps / 10).clamp(1, 100), |w| w as usize),
        weight_decay,
        clip: Some(t.clip),
        seed: t.seed,
        loraplus_lr_ratio: None,
    }
}

/// Runs (or resumes) a training run with a progress bar and periodic checkpoints to `ckpt`.
pub fn train_with_bar(label: &str, model: &Llama, data: &Mixture, s: TrainSettings, ck: &LmCheckpointArgs, ckpt: &Path) -> Result<Trainer> {
    let mut trainer = match &ck.resume {
        Some(p) => Trainer::resume(model, s.clone(), p).with_context(|| format!("resuming from {}", p.display()))?,
        None => Trainer::new(model, s.clone())?,
    };
    let bar = StepBar::new(label, s.steps, trainer.step());
    let every = ck.checkpoint_every.map(|n| n as usize);
    trainer.run(model, data, s.steps, |t, r| {
        bar.step(r);
        if every.is_some_and(|n| r.step % n == 0 && r.step < r.steps) {
            t.save_checkpoint(ckpt)?;
        }
        Ok(true)
    })?;
    bar.finish();
    Ok(trainer)
}

/// Pre-trains a base and writes it to `out` in `dtype`; returns the model as written (read back when
/// rounded to bf16), the trainer and the JSON summary.
pub fn pretrain(
    config: &LlamaConfig,
    corpora: &[(&Corpus, f64)],
    s: TrainSettings,
    ck: &LmCheckpointArgs,
    out: &Path,
    dtype: WeightDtype,
) -> Result<(Llama, Trainer, Value)> {
    let model = Llama::random(config, s.seed)?;
    let data = mixture(corpora, &Tokenizer::bytes())?;
    for (name, tokens, w) in data.sources() {
        println!("  {name:<8} {tokens:>10} train bytes, weight {w}");
    }
    println!(
        "Pre-training a {}-parameter byte-level Llama: {} steps of {} × {} bytes",
        model.num_params(),
        s.steps,
        s.batch_size,
        s.seq_len
    );
    let ckpt = checkpoint_path(out);
    let trainer = train_with_bar("Pre-training", &model, &data, s.clone(), ck, &ckpt)?;
    let mut meta = BTreeMap::new();
    meta.insert("lora_rs.pretrain_steps".to_string(), trainer.step().to_string());
    save_model_as(&model, out, &meta, dtype).with_context(|| format!("writing the model to {}", out.display()))?;
    let model =
        if dtype == WeightDtype::F32 { model } else { load_model(out).with_context(|| format!("reading back {}", out.display()))?.0 };
    if ckpt.exists() {
        std::fs::remove_file(&ckpt).with_context(|| format!("removing the finished run's checkpoint {}", ckpt.display()))?;
    }
    let final_loss = trainer.losses.last().map_or(f64::NAN, |l| l.1);
    let summary = json!({
        "params": model.num_params(),
        "steps": trainer.step(),
        "tokens": trainer.step() * s.batch_size * s.seq_len,
        "seconds": (trainer.seconds() * 1000.0).round() / 1000.0,
        "final_loss": final_loss,
        "settings": serde_json::to_value(&s)?,
        "model": out.display().to_string(),
        "dtype": dtype.torch_name(),
    });
    Ok((model, trainer, summary))
}

pub fn run(a: LmPretrainArgs) -> Result<()> {
    if a.checkpoint.resume.is_none() {
        check_out_dir(&a.out, &[CONFIG_FILE, WEIGHTS_FILE])?;
    }
    check_outputs(&[("--json", a.json.as_deref(), Out::File), ("--report", a.report.report.as_deref(), Out::Dir)])?;
    let config = shape_config(&a.shape)?;
    let files = if a.data.is_empty() { default_mix(Path::new("data/code")) } else { a.data.clone() };
    let s = settings(&a.train, a.steps, a.lr, 0.1);
    let corpora = read_weighted(&files)?;
    let weighted: Vec<(&Corpus, f64)> = corpora.iter().map(|(c, w)| (c, *w)).collect();
    let (_, trainer, summary) = pretrain(&config, &weighted, s, &a.checkpoint, &a.out, a.dtype.into())?;
    println!(
        "Final loss {:.4} nats/byte after {} steps ({:.1} s); wrote {}",
        summary["final_loss"].as_f64().unwrap_or(f64::NAN),
        trainer.step(),
        trainer.seconds(),
        a.out.display()
    );
    if let Some(p) = &a.json {
        write_json(p, &summary)?;
    }
    if let Some(dir) = &a.report.report {
        super::report_dir::training(dir, "lora lm pretrain", &[("pre-training", &trainer)], &[], &summary)?;
    }
    Ok(())
}
