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
