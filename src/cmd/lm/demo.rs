//! `lora lm demo`: the tutorial's own example on code. One small byte-level base is pre-trained mostly
//! on Python; a SQL and a JavaScript adapter are fine-tuned on it; all three are scored on each corpus'
//! validation split on one loaded base, and sampled from.

use std::time::Instant;

use anyhow::{Context, Result};
use lora_lm::data::Corpus;
use lora_lm::generate::{generate, Sampling};
use lora_lm::{LlamaConfig, Tokenizer};
use serde_json::{json, Map, Value};

use lora_lm::jobs::{Checkpointing, EvalJob, FinetuneJob, PretrainJob};

use super::eval::print_table;
use super::finetune::lora_config;
use super::pretrain::{default_mix, settings};
use crate::common::{check_outputs, write_json, Out};
use crate::lm_cli::{LmDemoArgs, LmLoraArgs, LmTrainArgs};

/// Prompts sampled with each adapter and with none.
const PROMPTS: [&str; 3] = ["SELECT ", "function ", "def "];

pub fn run(a: LmDemoArgs) -> Result<()> {
    let t0 = Instant::now();
    let corpora: Vec<(&str, std::path::PathBuf)> =
        ["sql", "js", "python"].iter().map(|n| (*n, a.data.join(format!("{n}.jsonl.gz")))).collect();
    for (_, p) in &corpora {
        if !p.exists() {
            anyhow::bail!("{}: missing (--data names the directory holding sql.jsonl.gz, js.jsonl.gz and python.jsonl.gz)", p.display());
        }
    }
    check_outputs(&[
        ("--out", Some(&a.out), Out::Dir),
        ("--json", a.json.as_deref(), Out::File),
        ("--report", a.report.report.as_deref(), Out::Dir),
    ])?;
    crate::outputs::claim([a.out.join("base"), a.out.join("adapters"), a.out.join("report.json")].iter().map(|p| p.as_path()));
    // Each corpus is read once: pre-training, fine-tuning and scoring share them.
    let cs: Vec<Corpus> = corpora.iter().map(|(_, p)| super::corpus(p)).collect::<Result<_>>()?;
    let mix: Vec<(&Corpus, f64)> =
        default_mix(&a.data).into_iter().filter_map(|(p, w)| cs.iter().find(|c| c.path == p).map(|c| (c, w))).collect();
    let base_dir = a.out.join("base");
    let train = LmTrainArgs { batch_size: 16, seq_len: 256, warmup: None, clip: 1.0, seed: a.seed };

    // 1. Pre-training.
    let config = LlamaConfig::byte_default();
    let job = PretrainJob {
        config: config.clone(),
        settings: settings(&train, a.pretrain_steps, 3e-3, 0.1),
        out: base_dir.clone(),
        dtype: Default::default(),
        checkpoint: Checkpointing::beside(&base_dir),
        group: Default::default(),
    };
    let lora_lm::jobs::Pretrained { mut model, trainer: pre, summary: pre_summary } = super::pretrain::run_job(&job, &mix)?;
    println!(
        "Pre-trained: final loss {:.4} nats/byte after {} steps ({:.1} s); wrote {}\n",
        pre_summary.final_loss,
        pre.step(),
        pre.seconds(),
        base_dir.display()
    );

    // 2. Two adapters on the one loaded base.
    let lora = lora_config(&LmLoraArgs {
        rank: 8,
        alpha: 16.0,
        dropout: 0.0,
        target_modules: lora_lm::PROJECTIONS.iter().map(|s| s.to_string()).collect(),
        target_regex: None,
        exclude_modules: Vec::new(),
        layers_to_transform: Vec::new(),
        rslora: false,
        variant: crate::cli::VariantArgs {
            bias: crate::cli::BiasArg::None,
            modules_to_save: Vec::new(),
            use_dora: false,
            init: None,
            lora_bias: false,
            convert_to_lora: false,
        },
    })?;
    let tok = Tokenizer::bytes();
    let mut tuned = Vec::new();
    for (name, data) in ["sql", "js"].into_iter().zip(&cs) {
        let out = a.out.join("adapters").join(name);
        let job = FinetuneJob {
            name: name.into(),
            lora: lora.clone(),
            settings: settings(&train, a.finetune_steps, 2e-3, 0.0),
            base_model: Some(base_dir.display().to_string()),
            convert_to_lora: false,
            checkpoint: Checkpointing::beside(&out),
            out,
            group: Default::default(),
        };
        let f = super::finetune::run_job(&mut model, &tok, data, &job)?;
        println!();
        tuned.push((name, f));
    }

    // 3. One loaded base, three columns.
    println!("Validation bits per byte (first {} bytes of each corpus' validation split), one loaded base:", a.eval_tokens);
    let job = EvalJob {
        adapters: vec!["sql".into(), "js".into()],
        context: config.max_position_embeddings,
        max_tokens: Some(a.eval_tokens as usize),
        batch: 16,
        per_token: false,
    };
    let table = lora_lm::jobs::evaluate(&mut model, &tok, &cs, &job, &mut |_| {}).context("scoring the validation splits")?;
    print_table(&table);
    let mut eval = Map::new();
    for ((short, _), row) in corpora.iter().zip(&table.scores) {
        let m: Map<String, Value> = table.columns.iter().zip(row).map(|(c, s)| (c.clone(), json!(s.bits_per_byte))).collect();
        eval.insert(short.to_string(), Value::Object(m));
    }

    // 4. Samples: the same prompts and seed with no adapter, the SQL adapter and the JS adapter.
    let sampling = Sampling { temperature: 0.7, top_k: Some(40), top_p: None, seed: a.seed };
    let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|p| tok.encode(p)).collect::<lora_lm::Result<_>>()?;
    let mut samples = Vec::new();
    for adapter in ["base", "sql", "js"] {
        model.lora_mut().set_active(if adapter == "base" { &[] } else { std::slice::from_ref(&adapter) })?;
        let out = generate(&model, &prompts, a.sample_tokens as usize, &sampling, &[], |_, _| Ok(true))?;
        println!(
            "\n=== samples with {} (temperature 0.7, top-k 40) ===",
            if adapter == "base" { "no adapter".to_string() } else { format!("the {adapter} adapter") }
        );
        for ((p, ids), g) in PROMPTS.iter().zip(&prompts).zip(&out) {
            let text = format!("{p}{}", tok.decode_continuation(ids, &g.tokens)?);
            println!("--- {p:?}\n{text}");
            samples.push(json!({"adapter": adapter, "prompt": p, "text": text}));
        }
    }
    model.lora_mut().set_active(&[])?;

    let seconds = t0.elapsed().as_secs_f64();
    let report = json!({
        "params": model.num_params(),
        "pretrain": pre_summary,
        "finetune": tuned.iter().map(|(n, f)| Ok((n.to_string(), serde_json::to_value(&f.summary)?))).collect::<Result<Map<String, Value>>>()?,
        "eval": eval,
        "eval_detail": table.json(),
        "eval_tokens_per_corpus": a.eval_tokens,
        "samples": samples,
        "seconds": (seconds * 10.0).round() / 10.0,
    });
    let json_path = a.json.clone().unwrap_or_else(|| a.out.join("report.json"));
    write_json(&json_path, &report).with_context(|| format!("writing {}", json_path.display()))?;
    println!(
        "\nWrote {}/base (model), {}/adapters/{{sql,js}} (PEFT adapters) and {} ({seconds:.0} s in all).",
        a.out.display(),
        a.out.display(),
        json_path.display()
    );
    if let Some(dir) = &a.report.report {
        let runs: Vec<(&str, &lora_lm::train::Trainer)> =
            std::iter::once(("pre-training", &pre)).chain(tuned.iter().map(|(n, f)| (*n, &f.trainer))).collect();
        super::report_dir::training(dir, "lora lm demo", &runs, &[&table], &report)?;
    }
    Ok(())
}
