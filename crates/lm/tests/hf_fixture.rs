//! A tiny random `LlamaForCausalLM` and a PEFT adapter trained a few steps, both written by transformers
//! 5.24 / PEFT 0.21 (`scripts/make_llama_fixture.py`; rank 4 ≠ alpha 6, grouped KV heads, RoPE θ = 500,
//! non-zero A and B), and the logits they produce. lora-rs must reproduce them.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use lora::LoadOptions;
use lora_lm::hf::load_model;
use lora_lm::Llama;
use serde_json::Value;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama-peft-tiny")
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture().join("expected.json")).unwrap()).unwrap()
}

fn input_ids(e: &Value) -> Tensor {
    let rows: Vec<Vec<u32>> = e["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect())
        .collect();
    let (b, t) = (rows.len(), rows[0].len());
    Tensor::from_vec(rows.concat(), (b, t), &Device::Cpu).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .flat_map(|x| if let Some(a) = x.as_array() { a.iter().map(|y| y.as_f64().unwrap()).collect() } else { vec![x.as_f64().unwrap()] })
        .collect()
}

/// Logits within 1e-5 of transformers' (absolute, logits of size ≤ ~10): both compute in f32 with sums of
/// ≤ 64 terms in different orders, ≲ 1e-6 apart; a wrong convention (RoPE halves, KV grouping, scale)
/// moves them by 0.1 or more.
fn assert_logits(model: &Llama, e: &Value, key: &str) {
    let got = model.forward(&input_ids(e), None, false).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let want = floats(&e[key]);
    assert_eq!(got.len(), want.len(), "{key}: size");
    let worst = got.iter().zip(&want).map(|(g, w)| (*g as f64 - w).abs()).fold(0.0, f64::max);
    assert!(worst < 1e-5, "{key}: max |lora-rs − transformers| = {worst:e}");
}

#[test]
fn a_transformers_checkpoint_gives_transformers_logits() {
    let (model, files) = load_model(&fixture().join("base")).unwrap();
    assert_eq!(files.dtypes.get("F32"), Some(&model.base_state().unwrap().len()));
    assert_logits(&model, &expected(), "base_logits");
}

#[test]
fn a_sharded_checkpoint_loads_the_same_weights() {
    let (a, _) = load_model(&fixture().join("base")).unwrap();
    let (b, files) = load_model(&fixture().join("base-sharded")).unwrap();
    assert_eq!(files.weight_files.len(), 3);
    assert_eq!(a.fingerprint().unwrap(), b.fingerprint().unwrap());
}

#[test]
fn a_tied_checkpoint_uses_the_embedding_as_lm_head() {
    let (model, _) = load_model(&fixture().join("tied")).unwrap();
    assert!(model.config().tie_word_embeddings);
    assert!(!model.base_state().unwrap().iter().any(|(n, _)| n == "lm_head.weight"));
    assert_logits(&model, &expected(), "tied_logits");
}

#[test]
fn a_peft_adapter_gives_peft_logits_and_switching_it_off_gives_the_base_again() {
    let e = expected();
    let (mut model, _) = load_model(&fixture().join("base")).unwrap();
    let files = model.lora_mut().load_adapter("peft", &fixture().join("adapter"), &LoadOptions::default()).unwrap();
    assert_eq!(files.tensors.len(), 14, "7 projections × 2 layers");
    let l = model.lora().layer("model.layers.1.mlp.down_proj").unwrap();
    assert_eq!(l.adapter("peft").unwrap().scale(), e["lora_scale"].as_f64().unwrap());
    model.lora_mut().set_active(&["peft"]).unwrap();
    assert_logits(&model, &e, "adapter_logits");
    model.lora_mut().set_active(&[]).unwrap();
    assert_logits(&model, &e, "base_logits");
}

#[test]
fn per_token_losses_match_transformers() {
    let e = expected();
    let (model, _) = load_model(&fixture().join("base")).unwrap();
    let ids = input_ids(&e);
    let logits = model.forward(&ids, None, false).unwrap();
    let rows = e["input_ids"].as_array().unwrap();
    let want = floats(&e["base_token_losses"]);
    let mut got = Vec::new();
    for (r, row) in rows.iter().enumerate() {
        let t: Vec<u32> = row.as_array().unwrap().iter().skip(1).map(|x| x.as_u64().unwrap() as u32).collect();
        let l = logits.get(r).unwrap().narrow(0, 0, t.len()).unwrap();
        got.extend(lora_lm::ops::token_nll(&l, &t).unwrap());
    }
    for (g, w) in got.iter().zip(&want) {
        // Losses of size ~5 from the logits above: 1e-5 relative is the logits' tolerance carried over.
        assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{g} vs {w}");
    }
}

/// The fixture's base with its `tokenizer.json` beside it, as a user's checkpoint directory looks.
fn checkpoint_with_tokenizer() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture().join("base").join(f), d.path().join(f)).unwrap();
    }
    std::fs::copy(fixture().join("tokenizer/tokenizer.json"), d.path().join("tokenizer.json")).unwrap();
    d
}

#[test]
fn a_tokenizer_json_encodes_decodes_and_scores_as_transformers_does() {
    let e: Value = serde_json::from_str(&std::fs::read_to_string(fixture().join("tokenizer/expected.json")).unwrap()).unwrap();
    let d = checkpoint_with_tokenizer();
    let (mut model, _) = load_model(d.path()).unwrap();
    let tok = lora_lm::hf::load_tokenizer(d.path(), model.config()).unwrap();
    assert!(!tok.is_bytes());
    lora_lm::hf::load_adapter(&mut model, "peft", &fixture().join("adapter"), false).unwrap();
    for t in e["texts"].as_array().unwrap() {
        let text = t["text"].as_str().unwrap();
        let (ids, bytes) = tok.encode_with_bytes(text).unwrap();
        let want: Vec<u32> = t["input_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(ids, want, "{text:?}");
        // Bytes per token add up to the text's bytes (the BOS covers none).
        assert_eq!(bytes[0], 0);
        assert_eq!(bytes.iter().sum::<u32>() as usize, text.len(), "{text:?}");
        assert_eq!(tok.decode(&ids).unwrap(), t["decoded"].as_str().unwrap());
        // Continuations decode in context: a word-start "▁" after the prompt keeps its space.
        let k = ids.len() / 2;
        let joined = tok.decode(&ids[..k]).unwrap() + &tok.decode_continuation(&ids[..k], &ids[k..]).unwrap();
        assert_eq!(joined, tok.decode(&ids).unwrap());
        let x = Tensor::from_vec(ids.clone(), (1, ids.len()), &Device::Cpu).unwrap();
        for (active, key) in [(vec![], "base_token_losses"), (vec!["peft"], "adapter_token_losses")] {
            model.lora_mut().set_active(&active).unwrap();
            let logits = model.forward(&x, None, false).unwrap().get(0).unwrap().narrow(0, 0, ids.len() - 1).unwrap();
            let got = lora_lm::ops::token_nll(&logits, &ids[1..]).unwrap();
            let want = floats(&t[key]);
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                // The logits' 1e-5 tolerance carried over to losses of size ~5.
                assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{text:?} {key}: {g} vs {w}");
            }
        }
    }
}

#[test]
fn a_checkpoint_with_a_tokenizer_fine_tunes_evaluates_and_generates() {
    let d = checkpoint_with_tokenizer();
    let data = d.path().join("sql.txt");
    std::fs::write(&data, "select name from users where id = 1;\n".repeat(30)).unwrap();
    let mut model = load_model(d.path()).unwrap().0;
    let tok = lora_lm::hf::load_tokenizer(d.path(), model.config()).unwrap();
    let c = lora_lm::data::read_corpus(&data).unwrap();
    // Training streams: each document encoded with its special tokens.
    let stream = lora_lm::data::TokenStream::from_corpus(&c, &tok).unwrap();
    assert_eq!(stream.len(), tok.encode(&c.train[0]).unwrap().len());
    let windows = lora_lm::data::eval_windows(&c, &tok, 64, None).unwrap();
    let (before, _) = lora_lm::eval::score(&model, &windows, 4, false).unwrap();
    let all: u32 = windows.iter().flat_map(|w| w.bytes.iter()).sum();
    let firsts: u32 = windows.iter().map(|w| w.bytes[0]).sum();
    assert_eq!(all as usize, c.validation[0].len(), "the windows cover every byte once");
    assert_eq!(before.bytes, (all - firsts) as u64, "bits per byte divide by the bytes of the predicted tokens");
    let cfg = lora::LoraConfig {
        target_modules: lora::Targets::Names(vec!["q_proj".into(), "v_proj".into()]),
        init: lora::Init::PeftGaussian,
        ..lora::LoraConfig::new(4, 8.0)
    };
    model.lora_mut().add_adapter("sql", &cfg, &mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0)).unwrap();
    model.lora_mut().set_active(&["sql"]).unwrap();
    model.freeze_base();
    let mut mix = lora_lm::train::Mixture::new();
    mix.add("sql", stream, 1.0).unwrap();
    let s = lora_lm::train::TrainSettings {
        steps: 30,
        batch_size: 4,
        seq_len: 32,
        lr: 1e-2,
        min_lr_ratio: 0.1,
        warmup: 3,
        weight_decay: 0.0,
        clip: Some(1.0),
        seed: 0,
        loraplus_lr_ratio: None,
    };
    let mut t = lora_lm::train::Trainer::new(&model, s).unwrap();
    t.run(&model, &mix, 30, |_, _| Ok(true)).unwrap();
    let (after, _) = lora_lm::eval::score(&model, &windows, 4, false).unwrap();
    assert!(after.loss < 0.8 * before.loss, "{} → {}", before.loss, after.loss);
    let out = lora_lm::generate::generate(
        &model,
        &[tok.encode("select").unwrap()],
        8,
        &lora_lm::generate::Sampling::greedy(),
        &model.config().eos_token_ids.clone(),
        |_, _| Ok(true),
    )
    .unwrap();
    assert!(!tok.decode(&out[0].tokens).unwrap().is_empty());
}
