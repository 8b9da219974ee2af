//! Training on instruction data: the loss of a batch is the mean over the targets that count (on the fused path
//! and on the reference, against per-token losses computed independently), and a fine-tune with the loss on
//! completions learns the completions without learning the prompts, where one with the loss on everything learns
//! both.

use std::path::Path;

use lora::LoraConfig;
use lora_lm::chat::ChatTemplate;
use lora_lm::instruct::{read_instructions, Encoder, Examples, LossOn, Packing};
use lora_lm::jobs::{finetune_on, Checkpointing, FinetuneJob, TrainData};
use lora_lm::ops::token_nll;
use lora_lm::train::{batch_loss_targets, TrainSettings};
use lora_lm::{Llama, LlamaConfig, Tokenizer};

mod support;

/// The shared tiny model with larger initial weights (logits far from uniform).
fn tiny() -> LlamaConfig {
    LlamaConfig { initializer_range: 0.2, ..support::tiny() }
}

/// The mean of the per-token losses (f64, from the model's logits) at the positions whose target counts.
fn reference(model: &Llama, ids: &[u32], targets: &[u32], rows: usize, len: usize) -> f64 {
    let t = candle_core::Tensor::from_vec(ids.to_vec(), (rows, len), &candle_core::Device::Cpu).unwrap();
    let logits = model.forward(&t, None, false).unwrap().reshape((rows * len, 256)).unwrap();
    let kept: Vec<usize> = (0..targets.len()).filter(|&i| targets[i] != lora_optim::IGNORE).collect();
    let mut sum = 0.0;
    for &i in &kept {
        sum += token_nll(&logits.narrow(0, i, 1).unwrap(), &[targets[i]]).unwrap()[0];
    }
    sum / kept.len() as f64
}

#[test]
fn a_masked_batch_loss_is_the_mean_over_the_targets_that_count_on_both_paths() {
    let mut model = Llama::random(&tiny(), 3).unwrap();
    let (rows, len) = (3, 10);
    let ids: Vec<u32> = (0..rows * len).map(|i| (i * 37 % 251) as u32).collect();
    let ignore = lora_optim::IGNORE;
    // Row 0 trains its last 4 predictions, row 1 none, row 2 every other one.
    let targets: Vec<u32> = (0..rows * len)
        .map(|i| {
            let (r, p) = (i / len, i % len);
            let counts = p + 1 < len
                && match r {
                    0 => p >= len - 5,
                    1 => false,
                    _ => p % 2 == 0,
                };
            if counts {
                ids[i + 1]
            } else {
                ignore
            }
        })
        .collect();
    let want = reference(&model, &ids, &targets, rows, len);
    for fused in [true, false] {
        model.set_fused(fused);
        let got = batch_loss_targets(&model, &ids, &targets, rows, len, false).unwrap().to_scalar::<f32>().unwrap() as f64;
        // f32 logits and a f32 mean over 9 terms against an f64 sum: a few ulps of a value near ln 256 ≈ 5.5.
        assert!((got - want).abs() < 1e-5 * want, "fused {fused}: {got} vs {want}");
    }
    let e = batch_loss_targets(&model, &ids, &vec![ignore; rows * len], rows, len, false).unwrap_err().to_string();
    assert!(e.contains("ignored"), "{e}");
}

fn write(dir: &Path, name: &str, rows: usize) -> std::path::PathBuf {
    let p = dir.join(name);
    let body: String = (0..rows).map(|i| format!("{{\"prompt\": \"QQQQQQQQQQQQ{}:\", \"completion\": \" yes\"}}\n", i % 3)).collect();
    std::fs::write(&p, body).unwrap();
    p
}

/// Mean loss of `model` (its active adapters) on the positions of `examples` that `pick` selects.
fn loss_on(model: &Llama, examples: &Examples, pick: impl Fn(&[u32], usize) -> bool) -> f64 {
    let (mut sum, mut n) = (0.0, 0);
    for e in &examples.examples {
        let len = e.ids.len();
        let targets: Vec<u32> =
            (0..len).map(|i| if i + 1 < len && pick(&e.ids, i + 1) { e.ids[i + 1] } else { lora_optim::IGNORE }).collect();
        let k = targets.iter().filter(|&&t| t != lora_optim::IGNORE).count();
        sum += reference(model, &e.ids, &targets, 1, len) * k as f64;
        n += k;
    }
    sum / n as f64
}

#[test]
fn the_loss_on_completions_teaches_the_completions_and_not_the_prompts() {
    let d = tempfile::tempdir().unwrap();
    let path = write(d.path(), "qa.jsonl", 12);
    let data = read_instructions(&path).unwrap();
    let (tok, chat) = (Tokenizer::bytes(), ChatTemplate::chatml());
    let is_q = |ids: &[u32], i: usize| ids[i] == b'Q' as u32;
    let is_answer = |ids: &[u32], i: usize| i >= ids.len() - 4;
    let mut results = Vec::new();
    for loss in [LossOn::Completions, LossOn::All] {
        let mut model = Llama::random(&tiny(), 7).unwrap();
        let enc = Encoder { tokenizer: &tok, chat: &chat, loss };
        let ex = Examples::build(&data.path, "qa", &data.train, &enc, 32, Packing::Off).unwrap();
        let before = (loss_on(&model, &ex, is_q), loss_on(&model, &ex, is_answer));
        let job = FinetuneJob {
            name: "qa".into(),
            lora: LoraConfig { target_modules: lora_lm::PROJECTIONS.iter().map(|s| s.to_string()).collect(), ..LoraConfig::new(8, 16.0) },
            settings: TrainSettings {
                steps: 40,
                batch_size: 4,
                seq_len: 32,
                lr: 1e-2,
                min_lr_ratio: 0.1,
                warmup: 2,
                weight_decay: 0.0,
                clip: Some(1.0),
                seed: 1,
                loraplus_lr_ratio: None,
            },
            out: d.path().join(format!("{loss:?}")),
            base_model: None,
            convert_to_lora: false,
            checkpoint: Checkpointing::beside(&d.path().join(format!("{loss:?}"))),
            group: Default::default(),
        };
        let f = finetune_on(&mut model, &tok, TrainData::Examples(&ex, Packing::Off), &job, &mut |_| {}).unwrap();
        assert!(f.summary.base_unchanged && d.path().join(format!("{loss:?}/adapter_model.safetensors")).exists());
        model.lora_mut().set_active(&["qa"]).unwrap();
        let after = (loss_on(&model, &ex, is_q), loss_on(&model, &ex, is_answer));
        results.push((loss, before, after));
    }
    let (_, (q0, a0), (q_c, a_c)) = results[0];
    let (_, _, (q_all, a_all)) = results[1];
    // Both learn the answer (" yes<end>", 4 bytes after the colon) from a random start near ln 256 = 5.5.
    assert!(a_c < 0.5 * a0 && a_all < 0.5 * a0, "answer loss: {a0} → {a_c} (completions), {a_all} (all)");
    // Only the run that trains on everything learns the run of Q's; trained on completions, the Q's loss stays
    // where it was (their predictions never enter the loss), far above the other run's.
    // (Measured: answers 5.60 → 1.33 and 1.34; the Q's 6.49 → 7.38 on completions, → 1.59 on everything.)
    assert!(q_all < 0.5 * q0, "the Q's loss trained on everything: {q0} → {q_all}");
    assert!(q_c > q_all + 2.0 && q_c > 0.5 * q0, "the Q's loss: {q0} → {q_c} (completions) vs {q_all} (all)");
}

#[test]
fn scoring_instruction_examples_counts_their_trained_tokens_only() {
    let d = tempfile::tempdir().unwrap();
    let data = read_instructions(&write(d.path(), "qa.jsonl", 3)).unwrap();
    let (tok, chat) = (Tokenizer::bytes(), ChatTemplate::chatml());
    let enc = Encoder { tokenizer: &tok, chat: &chat, loss: LossOn::Completions };
    let ex = Examples::build(&data.path, "qa", &data.validation, &enc, 32, Packing::Off).unwrap();
    let model = Llama::random(&tiny(), 2).unwrap();
    let windows = ex.windows(&tok, 32).unwrap();
    let (s, per) = lora_lm::eval::score(&model, &windows, 2, true).unwrap();
    // " yes" after each prompt: 4 scored tokens of 1 byte each per row.
    assert_eq!((s.tokens, s.bytes), (12, 12));
    assert_eq!(per.unwrap().iter().map(Vec::len).collect::<Vec<_>>(), vec![4, 4, 4]);
    let want = loss_on(&model, &ex, |ids, i| i >= ids.len() - 4);
    assert!((s.loss - want).abs() < 1e-5 * want, "{} vs {want}", s.loss);
}
