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

#[test]
fn a_peft_embedding_adapter_gives_pefts_logits_and_is_written_back_under_pefts_names() {
    check("llama-embedding");
    // A fresh load (check() merged and unmerged, which rounds the base: its fingerprint would differ).
    let (mut m, _) = load_model(&fixtures().join("llama-peft-tiny/base")).unwrap();
    load_adapter(&mut m, "peft", &fixtures().join("peft-features/llama-embedding/adapter"), false).unwrap();
    let emb = m.lora().layer(lora_lm::EMBED).unwrap();
    assert!(emb.is_embedding() && emb.adapter("peft").is_ok());
    // Written back: lora_embedding_A / lora_embedding_B (PEFT's names; no copy of the table), and read
    // again to the same logits.
    let tmp = tempfile::tempdir().unwrap();
    lora_lm::hf::save_adapter(&m, "peft", tmp.path(), None, Default::default(), false).unwrap();
    let keys: Vec<String> = lora::io::TensorFile::load(&tmp.path().join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap()
        .tensors
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(keys.contains(&"base_model.model.model.embed_tokens.lora_embedding_A".to_string()), "{keys:?}");
    assert!(!keys.iter().any(|k| k.contains("base_layer")), "{keys:?}");
    let (mut back, _) = load_model(&fixtures().join("llama-peft-tiny/base")).unwrap();
    load_adapter(&mut back, "again", tmp.path(), false).unwrap();
    back.lora_mut().set_active(&["again"]).unwrap();
    let e = expected("llama-embedding");
    assert!(worst(&back, &e, "logits") < 1e-5);
}

#[test]
fn a_new_embedding_adapter_starts_as_pefts_a_zero_b_normal_and_trains() {
    let (mut model, _) = load_model(&fixtures().join("llama-peft-tiny/base")).unwrap();
    let cfg = lora::LoraConfig {
        target_modules: lora::Targets::Names(vec!["embed_tokens".into(), "q_proj".into()]),
        ..lora::LoraConfig::new(4, 8.0)
    };
    model.lora_mut().add_adapter("e", &cfg, &mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1)).unwrap();
    model.lora_mut().set_active(&["e"]).unwrap();
    model.freeze_base();
    let ad = model.lora().layer(lora_lm::EMBED).unwrap().adapter("e").unwrap();
    assert!(ad.a().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| *v == 0.0));
    assert!(ad.b().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().any(|v| *v != 0.0));
    // Every adapter tensor gets a gradient, the embedding's A included (B ≠ 0 carries it).
    let ids = Tensor::from_vec((0..24u32).map(|i| (i * 7) % 96).collect::<Vec<_>>(), (2, 12), &Device::Cpu).unwrap();
    let g = model.forward(&ids, None, true).unwrap().sqr().unwrap().sum_all().unwrap().backward().unwrap();
    for (name, v) in model.trainable_vars() {
        assert!(g.get(v.as_tensor()).is_some(), "{name}: no gradient");
    }
    // all-linear leaves the embedding out, as PEFT (it adapts nn.Linear only).
    let all = lora::LoraConfig { target_modules: lora::Targets::AllLinear, ..lora::LoraConfig::new(2, 2.0) };
    assert!(!model.lora().targeted(&all).unwrap().iter().any(|m| m == lora_lm::EMBED));
}

/// LoRA+ against PEFT's own `create_loraplus_optimizer` (torch AdamW, ratio 16, weight decay 0): three
/// steps of a mean-squared loss on the fixture MLP from PEFT's starting adapter must end at PEFT's A and B.
#[test]
fn loraplus_steps_match_pefts_create_loraplus_optimizer() {
    use lora::{LoraLinear, LoraModel};
    let dir = fixtures().join("peft-features");
    let e: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("loraplus/expected.json")).unwrap()).unwrap();
    let inputs: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("inputs.json")).unwrap()).unwrap();
    let matrix = |v: &Value| -> Tensor {
        let m: Vec<Vec<f32>> = serde_json::from_value(v.clone()).unwrap();
        let (r, c) = (m.len(), m[0].len());
        Tensor::from_vec(m.concat(), (r, c), &Device::Cpu).unwrap()
    };
    let base = lora::io::TensorFile::load(&dir.join("base.safetensors"), &Device::Cpu).unwrap();
    let mut m = LoraModel::new();
    let layers = ["linear1", "linear2", "linear3"];
    for l in layers {
        let (w, b) = (base.get(&format!("{l}.weight")).unwrap().clone(), base.get(&format!("{l}.bias")).unwrap().clone());
        m.push(l, LoraLinear::new(w, Some(b)).unwrap()).unwrap();
    }
    m.load_adapter("p", &dir.join("loraplus/initial"), &lora::LoadOptions::default()).unwrap();
    m.set_active(&["p"]).unwrap();
    m.freeze_base(lora::Bias::None);
    let (x, y) = (matrix(&inputs["x"]), matrix(&e["targets"]));
    let params: Vec<(String, candle_core::Var)> = layers
        .iter()
        .flat_map(|l| m.layer(l).unwrap().adapter_vars("p").into_iter().map(move |(w, v)| (format!("{l}.{w}"), v.clone())))
        .collect();
    let mut opt = lora_lm::optim::AdamW::new(params, 0.0).with_loraplus(e["loraplus_lr_ratio"].as_f64().unwrap());
    let lr = e["lr"].as_f64().unwrap();
    let want_losses: Vec<f64> = serde_json::from_value(e["losses"].clone()).unwrap();
    for want in want_losses {
        let h = m.layer("linear1").unwrap().forward(&x).unwrap().relu().unwrap();
        let h = m.layer("linear2").unwrap().forward(&h).unwrap().relu().unwrap();
        let out = m.layer("linear3").unwrap().forward(&h).unwrap();
        let loss = (out - &y).unwrap().sqr().unwrap().mean_all().unwrap();
        let l = loss.to_scalar::<f32>().unwrap() as f64;
        // f32 forward of a 3-layer MLP, summed in another order than PyTorch's: ~1e-7 relative.
        assert!((l - want).abs() < 1e-5 * want.abs().max(1.0), "loss {l} vs PEFT's {want}");
        opt.step(&loss.backward().unwrap(), lr, None).unwrap();
    }
    for l in layers {
        let ad = m.layer(l).unwrap().adapter("p").unwrap();
        for (var, key) in [(ad.a(), "lora_A"), (ad.b(), "lora_B")] {
            let want = matrix(&e["final"][l][key]);
            let d = (var.as_tensor() - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            // Adam's steps are ±lr-sized whatever the gradient's scale (B moves by up to 3·0.16): the
            // results agree to f32 rounding of the update arithmetic, far below 1e-5.
            assert!(d < 1e-5, "{l}.{key} after 3 LoRA+ steps differs from PEFT's by {d}");
        }
    }
}
