//! Pre-training, fine-tuning and evaluation as library calls (`lora_lm::jobs`): what each reports, what it
//! writes, and that a job that fails leaves the model as it came and writes nothing.

use std::path::Path;

use lora::LoraConfig;
use lora_lm::data::{read_corpus, Corpus};
use lora_lm::hf::{load_adapter, load_model};
use lora_lm::jobs::{evaluate, finetune, pretrain, Checkpointing, EvalJob, Event, FinetuneJob, PretrainJob};
use lora_lm::train::TrainSettings;
use lora_lm::Tokenizer;

mod support;
use support::tiny;

fn settings(steps: usize) -> TrainSettings {
    TrainSettings {
        steps,
        batch_size: 2,
        seq_len: 16,
        lr: 3e-3,
        min_lr_ratio: 0.1,
        warmup: 1,
        weight_decay: 0.0,
        clip: Some(1.0),
        seed: 5,
        loraplus_lr_ratio: None,
    }
}

fn corpus(dir: &Path, name: &str, text: &str) -> Corpus {
    let p = dir.join(name);
    std::fs::write(&p, text.repeat(20)).unwrap();
    read_corpus(&p).unwrap()
}

/// What a job reported, as short strings: `source sql`, `start Pre-training 4/0`, `step 1`, `checkpoint 2`, `finish …`.
fn log(events: &mut Vec<String>) -> impl FnMut(Event<'_>) + '_ {
    move |e| {
        events.push(match e {
            Event::Source { name, .. } => format!("source {name}"),
            Event::Start { label, steps, done, .. } => format!("start {label} {steps}/{done}"),
            Event::Step(r) => format!("step {}", r.step),
            Event::Checkpoint { step, .. } => format!("checkpoint {step}"),
            Event::Finish { label } => format!("finish {label}"),
            Event::Scored { corpus, column, .. } => format!("scored {corpus} {column}"),
        })
    }
}

#[test]
fn a_base_pretrained_fine_tuned_and_evaluated_through_the_library_reports_each_step_and_writes_only_its_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let sql = corpus(dir.path(), "sql.txt", "SELECT name FROM users WHERE id = 1;\n");
    let py = corpus(dir.path(), "py.txt", "def f(x):\n    return x + 1\n");
    let base_dir = dir.path().join("base");
    let mut ck = Checkpointing::beside(&base_dir);
    ck.every = Some(2);
    let job = PretrainJob {
        config: tiny(),
        settings: settings(3),
        out: base_dir.clone(),
        dtype: Default::default(),
        checkpoint: ck.clone(),
        group: Default::default(),
    };
    let mut events = Vec::new();
    let p = pretrain(&job, &[(&py, 0.5), (&sql, 0.5)], &mut log(&mut events)).unwrap();
    assert_eq!(
        events,
        ["source py", "source sql", "start Pre-training 3/0", "step 1", "step 2", "checkpoint 2", "step 3", "finish Pre-training"]
    );
    assert!(base_dir.join("config.json").is_file() && base_dir.join("model.safetensors").is_file());
    assert!(!ck.path.exists(), "the finished run's checkpoint is removed");
    assert_eq!((p.summary.steps, p.summary.tokens, p.summary.params), (3, 3 * 2 * 16, tiny().num_params()));
    // The model returned is the one written.
    let (read, _) = load_model(&base_dir).unwrap();
    assert_eq!(read.fingerprint().unwrap(), p.model.fingerprint().unwrap());

    let mut model = p.model;
    let out = dir.path().join("sql-adapter");
    let ft = FinetuneJob {
        name: "sql".into(),
        lora: LoraConfig::new(2, 4.0),
        settings: settings(2),
        out: out.clone(),
        base_model: Some(base_dir.display().to_string()),
        convert_to_lora: false,
        checkpoint: Checkpointing::beside(&out),
        group: Default::default(),
    };
    let mut events = Vec::new();
    let f = finetune(&mut model, &Tokenizer::bytes(), &sql, &ft, &mut log(&mut events)).unwrap();
    assert_eq!(events, ["source sql", "start Fine-tuning sql 2/0", "step 1", "step 2", "finish Fine-tuning sql"]);
    assert!(f.summary.base_unchanged);
    assert_eq!(f.summary.base_sha256, read.fingerprint().unwrap());
    assert!(model.lora().active().is_empty(), "the adapter stays loaded but inactive");
    assert!(out.join("adapter_config.json").is_file() && out.join("adapter_model.safetensors").is_file());

    // Evaluation on the same loaded base, and on a fresh load of the written files, agree bit for bit (both
    // bases frozen: with a base that trains, an adapted projection takes the reference path, which sums in
    // another order).
    let job = EvalJob { adapters: vec!["sql".into()], context: 32, max_tokens: Some(200), batch: 4, per_token: false };
    let mut events = Vec::new();
    let t = evaluate(&mut model, &Tokenizer::bytes(), &[sql.clone(), py.clone()], &job, &mut log(&mut events)).unwrap();
    assert_eq!(events, ["scored sql.txt base", "scored sql.txt sql", "scored py.txt base", "scored py.txt sql"]);
    assert_eq!(t.columns, ["base", "sql"]);
    assert_ne!(t.scores[0][0].loss, t.scores[0][1].loss, "the trained adapter changes the loss");
    let (mut fresh, _) = load_model(&base_dir).unwrap();
    fresh.freeze_base();
    load_adapter(&mut fresh, "sql", &out, false).unwrap();
    let again = evaluate(&mut fresh, &Tokenizer::bytes(), &[sql, py], &job, &mut |_| {}).unwrap();
    assert_eq!(again.scores, t.scores);
}

#[test]
fn a_fine_tune_that_fails_leaves_the_model_as_it_came_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let sql = corpus(dir.path(), "sql.txt", "SELECT 1;\n");
    let mut model = lora_lm::Llama::random(&tiny(), 1).unwrap();
    let before = model.fingerprint().unwrap();
    let out = dir.path().join("adapter");
    let job = FinetuneJob {
        name: "sql".into(),
        lora: LoraConfig::new(2, 4.0),
        settings: TrainSettings { lr: f64::NAN, ..settings(2) },
        out: out.clone(),
        base_model: None,
        convert_to_lora: false,
        checkpoint: Checkpointing::beside(&out),
        group: Default::default(),
    };
    let e = finetune(&mut model, &Tokenizer::bytes(), &sql, &job, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("lr = NaN"), "{e}");
    assert!(model.lora().adapter_names().is_empty(), "no half-made adapter stays on the model");
    assert_eq!(model.fingerprint().unwrap(), before);
    assert!(!out.exists(), "nothing written");
    // A missing checkpoint to resume from is named.
    let job = FinetuneJob {
        settings: settings(2),
        checkpoint: Checkpointing { resume: Some(dir.path().join("nope.safetensors")), ..Checkpointing::beside(&out) },
        ..job
    };
    let e = finetune(&mut model, &Tokenizer::bytes(), &sql, &job, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("nope.safetensors") && e.contains("no such checkpoint"), "{e}");
    assert!(model.lora().adapter_names().is_empty() && !out.exists());
}

#[test]
fn evaluation_refuses_an_adapter_that_is_not_loaded_and_a_context_longer_than_the_model_s() {
    let dir = tempfile::tempdir().unwrap();
    let sql = corpus(dir.path(), "sql.txt", "SELECT 1;\n");
    let mut model = lora_lm::Llama::random(&tiny(), 1).unwrap();
    let job = EvalJob { adapters: vec!["js".into()], context: 32, max_tokens: None, batch: 4, per_token: false };
    let e = evaluate(&mut model, &Tokenizer::bytes(), std::slice::from_ref(&sql), &job, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("adapter = js") && e.contains("not loaded"), "{e}");
    let job = EvalJob { adapters: vec![], context: 33, ..job };
    let e = evaluate(&mut model, &Tokenizer::bytes(), &[sql], &job, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("context = 33") && e.contains("(32)"), "{e}");
}
