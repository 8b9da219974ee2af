//! `lora lm demo`: the tutorial's own example on code. One small byte-level base is pre-trained mostly
//! on Python; a SQL and a JavaScript adapter are fine-tuned on it, and a chat adapter on conversations
//! (a docstring asked, the function answered, rendered with ChatML, the loss on the answers); all are scored
//! on each corpus' validation split on one loaded base, and sampled from.

use std::time::Instant;

use anyhow::{Context, Result};
use lora_lm::data::Corpus;
use lora_lm::generate::{generate, Sampling};
use lora_lm::{LlamaConfig, Tokenizer};
use serde_json::{json, Map, Value};

use lora_lm::chat::{ChatTemplate, Message, CHATML_END};
use lora_lm::instruct::{read_instructions, Encoder, Examples, LossOn, Packing};
use lora_lm::jobs::{Checkpointing, EvalData, EvalJob, FinetuneJob, PretrainJob, TrainData};

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
    let chat_path = a
        .chat_data
        .clone()
        .unwrap_or_else(|| a.data.parent().unwrap_or(std::path::Path::new(".")).join("chat").join("python-docstrings.jsonl.gz"));
    let chat_data =
        read_instructions(&chat_path).with_context(|| format!("reading the chat data {} (--chat-data)", chat_path.display()))?;
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
        let f = super::finetune::run_job(&mut model, &tok, lora_lm::jobs::TrainData::Corpus(data), &job)?;
        println!();
        tuned.push((name, f));
    }

    // 2b. A chat adapter: conversations through the byte-level model's template (lora-rs' default ChatML, its
    // markers plain text), the loss on the assistant's answers.
    let chat = ChatTemplate::chatml();
    let enc = Encoder { tokenizer: &tok, chat: &chat, loss: LossOn::Completions };
    let chat_train = Examples::build(&chat_data.path, "chat", &chat_data.train, &enc, train.seq_len as usize, Packing::Off)?;
    let chat_valid = Examples::build(&chat_data.path, "chat", &chat_data.validation, &enc, train.seq_len as usize, Packing::Off)?;
    println!(
        "Chat data {}: {} conversations to train on ({} bytes, {} of them answers), {} held out",
        chat_data.path.display(),
        chat_train.examples.len(),
        chat_train.tokens(),
        chat_train.trained_tokens(),
        chat_valid.examples.len()
    );
    let out = a.out.join("adapters").join("chat");
    let job = FinetuneJob {
        name: "chat".into(),
        lora: lora.clone(),
        settings: settings(&train, a.finetune_steps, 2e-3, 0.0),
        base_model: Some(base_dir.display().to_string()),
        convert_to_lora: false,
        checkpoint: Checkpointing::beside(&out),
        out,
        group: Default::default(),
    };
    let f = super::finetune::run_job(&mut model, &tok, TrainData::Examples(&chat_train, Packing::Off), &job)?;
    println!();
    tuned.push(("chat", f));

    // 3. One loaded base, three columns.
    println!(
        "Validation bits per byte (first {} bytes of each corpus' validation split; the chat data's held-out answers), one loaded base:",
        a.eval_tokens
    );
    let job = EvalJob {
        adapters: vec!["sql".into(), "js".into(), "chat".into()],
        context: config.max_position_embeddings,
        max_tokens: Some(a.eval_tokens as usize),
        batch: 16,
        per_token: false,
    };
    let mut data: Vec<EvalData<'_>> = cs.iter().map(EvalData::Corpus).collect();
    data.push(EvalData::Examples(&chat_valid));
    let table = lora_lm::jobs::evaluate_on(&mut model, &tok, &data, &job, &mut |_| {}).context("scoring the validation splits")?;
    print_table(&table);
    let mut eval = Map::new();
    let shorts = corpora.iter().map(|(s, _)| *s).chain(["chat"]);
    for (short, row) in shorts.zip(&table.scores) {
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
    // 5. A conversation: the same question with no adapter and the chat adapter, each reply cut at the
    // template's end marker.
    let question = chat_valid
        .examples
        .first()
        .and_then(|e| chat_data.validation.iter().find(|(l, _)| *l == e.line))
        .and_then(|(_, r)| match r {
            lora_lm::instruct::Row::Messages(m) => Some(m[0].content.clone()),
            _ => None,
        })
        .unwrap_or_else(|| "Return the sum of a and b.".to_string());
    let prompt = tok.encode(&chat.render(&[Message::new("user", question.as_str())], true)?)?;
    let greedy = Sampling::greedy();
    let mut chats = Vec::new();
    for adapter in ["base", "chat"] {
        model.lora_mut().set_active(if adapter == "base" { &[] } else { std::slice::from_ref(&adapter) })?;
        let room = config.max_position_embeddings.saturating_sub(prompt.len()).min(a.sample_tokens as usize * 2).max(1);
        let out = generate(&model, std::slice::from_ref(&prompt), room, &greedy, &[], |_, _| Ok(true))?;
        let text = tok.decode_continuation(&prompt, &out[0].tokens)?;
        let reply = text.split(CHATML_END).next().unwrap_or("").to_string();
        println!(
            "\n=== chat with {} (greedy) ===\nuser: {question}\nassistant: {reply}",
            if adapter == "base" { "no adapter".to_string() } else { "the chat adapter".to_string() }
        );
        chats.push(json!({"adapter": adapter, "user": question, "assistant": reply, "ended": text.contains(CHATML_END)}));
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
        "chat": chats,
        "seconds": (seconds * 10.0).round() / 10.0,
    });
    let json_path = a.json.clone().unwrap_or_else(|| a.out.join("report.json"));
    write_json(&json_path, &report).with_context(|| format!("writing {}", json_path.display()))?;
    println!(
        "\nWrote {}/base (model), {}/adapters/{{sql,js,chat}} (PEFT adapters) and {} ({seconds:.0} s in all).",
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
