//! PEFT's LoRA variants on a transformers Llama: adapters Hugging Face PEFT 0.21.2 wrote on the tiny Llama
//! of tests/fixtures/llama-peft-tiny (tests/fixtures/peft-features/llama-*, made by
//! scripts/make_peft_feature_fixtures.py) and the logits PEFT computed with them; lora-rs must reproduce
//! them unmerged and merged.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use lora_lm::hf::{load_adapter, load_model};
use lora_lm::Llama;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn expected(case: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("peft-features").join(case).join("expected.json")).unwrap()).unwrap()
}

fn input_ids(e: &Value) -> Tensor {
    let rows: Vec<Vec<u32>> = serde_json::from_value(e["input_ids"].clone()).unwrap();
    let (b, t) = (rows.len(), rows[0].len());
    Tensor::from_vec(rows.concat(), (b, t), &Device::Cpu).unwrap()
}

/// The largest |lora-rs − PEFT| over the logits.
fn worst(model: &Llama, e: &Value, key: &str) -> f64 {
    let got = model.forward(&input_ids(e), None, false).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let want: Vec<f64> = serde_json::from_value(e[key].clone()).unwrap();
    assert_eq!(got.len(), want.len(), "{key}: size");
    got.iter().zip(&want).map(|(g, w)| (*g as f64 - w).abs()).fold(0.0, f64::max)
}

/// Loads PEFT's adapter for `case` onto the fixture's base and checks PEFT's logits unmerged and merged.
/// 1e-5 as the plain fixture (f32 sums of ≤ 64 terms in other orders; logits ≲ 10).
fn check(case: &str) -> Llama {
    let e = expected(case);
    let (mut model, _) = load_model(&fixtures().join("llama-peft-tiny/base")).unwrap();
    let before = worst(&model, &e, "logits");
    load_adapter(&mut model, "peft", &fixtures().join("peft-features").join(case).join("adapter"), false).unwrap();
    model.lora_mut().set_active(&["peft"]).unwrap();
    let d = worst(&model, &e, "logits");
    println!("{case}: max |lora-rs − PEFT| unmerged {d:e} (base alone: {before:e})");
    assert!(d < 1e-5, "{case}: unmerged logits differ from PEFT's by {d:e}");
    assert!(before > 1e-2, "{case}: the adapter changes nothing, the test would prove nothing");
    model.lora_mut().merge("peft", true).unwrap();
    let d = worst(&model, &e, "merged_logits");
    println!("{case}: max |lora-rs − PEFT| merged {d:e}");
    // Merging rounds every adapted weight once, in each program its own way: PEFT's own merged and
    // unmerged logits differ by up to 1.6e-5 in these fixtures (llama-modules-to-save), so the merged
    // comparison allows twice the unmerged bar (the 1e-5 is below PEFT's own merge noise here).
    assert!(d < 2e-5, "{case}: merged logits differ from PEFT's by {d:e}");
    model.lora_mut().unmerge("peft").unwrap();
    model
}

#[test]
fn a_peft_dora_adapter_on_a_llama_gives_pefts_logits() {
    let m = check("llama-dora");
    assert!(m.lora().layer("model.layers.0.self_attn.q_proj").unwrap().adapter("peft").unwrap().magnitude().is_some());
}

#[test]
fn a_peft_adapter_with_lm_head_in_modules_to_save_gives_pefts_logits() {
    let m = check("llama-modules-to-save");
    assert!(m.lora().layer("lm_head").unwrap().override_of("peft").is_some());
}
