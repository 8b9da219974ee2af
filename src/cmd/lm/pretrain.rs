//! `lora lm pretrain`: flags → [`lora_lm::jobs::PretrainJob`] → [`lora_lm::jobs::pretrain`], with bars.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use lora_lm::data::Corpus;
use lora_lm::hf::{CONFIG_FILE, WEIGHTS_FILE};
use lora_lm::jobs::{pretrain, Event, PretrainJob, Pretrained};
use lora_lm::train::TrainSettings;
use lora_lm::LlamaConfig;

use super::{check_out_dir, corpus, Bars};
use crate::common::{check_outputs, write_json, Out};
use crate::lm_cli::{LmPretrainArgs, LmShapeArgs, LmTrainArgs};

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

/// Runs a pre-training job with bars and the lines `lora lm pretrain` prints before it.
pub fn run_job(job: &PretrainJob, corpora: &[(&Corpus, f64)]) -> Result<Pretrained> {
    let mut bars = Bars::default();
    let s = &job.settings;
    let root = job.group.is_root();
    let done = pretrain(job, corpora, &mut |e| {
        if !root {
            return; // rank 0 prints for every rank
        }
        match &e {
            Event::Source { name, tokens, weight } => println!("  {name:<8} {tokens:>10} train bytes, weight {weight}"),
            Event::Start { params, .. } => {
                println!("Pre-training a {params}-parameter byte-level Llama: {} steps of {} × {} bytes", s.steps, s.batch_size, s.seq_len)
            }
            _ => {}
        }
        bars.event(&e);
    });
    done.with_context(|| format!("pre-training {}", job.out.display()))
}

pub fn run(a: LmPretrainArgs) -> Result<()> {
    let group = crate::dist::group();
    if group.is_root() {
        if a.checkpoint.resume.is_none() {
            check_out_dir(&a.out, &[CONFIG_FILE, WEIGHTS_FILE])?;
        }
        check_outputs(&[("--json", a.json.as_deref(), Out::File), ("--report", a.report.report.as_deref(), Out::Dir)])?;
    }
    let config = shape_config(&a.shape)?;
    let files = if a.data.is_empty() { default_mix(Path::new("data/code")) } else { a.data.clone() };
    let corpora = read_weighted(&files)?;
    let weighted: Vec<(&Corpus, f64)> = corpora.iter().map(|(c, w)| (c, *w)).collect();
    let job = PretrainJob {
        config,
        settings: settings(&a.train, a.steps, a.lr, 0.1),
        out: a.out.clone(),
        dtype: a.dtype.into(),
        checkpoint: a.checkpoint.policy(&a.out),
        group,
    };
    let p = run_job(&job, &weighted)?;
    if !job.group.is_root() {
        return Ok(()); // rank 0 prints and writes
    }
    println!(
        "Final loss {:.4} nats/byte after {} steps ({:.1} s); wrote {}",
        p.summary.final_loss,
        p.trainer.step(),
        p.trainer.seconds(),
        a.out.display()
    );
    let summary = serde_json::to_value(&p.summary)?;
    if let Some(path) = &a.json {
        write_json(path, &summary)?;
    }
    if let Some(dir) = &a.report.report {
        super::report_dir::training(dir, "lora lm pretrain", &[("pre-training", &p.trainer)], &[], &summary)?;
    }
    Ok(())
}
