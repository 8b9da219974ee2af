//! Which modules an adapter config adapts, and with which rank and alpha, exactly as real PEFT decides:
//! every case of `tests/fixtures/peft-matching/cases.json` (written by `scripts/make_peft_matching_fixture.py`
//! with PEFT 0.21.2 on a tiny transformers Llama and on ExpensiveNet's layer names).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use lora::adapter::parse_peft_config;
use lora::{LoraLinear, LoraModel};
use serde_json::{json, Value};

fn cases() -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/peft-matching/cases.json");
    let v: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    v["cases"].as_array().unwrap().clone()
}

/// A model with the case's module names, in its order (shapes do not matter for matching).
fn model(case: &Value) -> LoraModel {
    let mut m = LoraModel::new();
    for name in case["modules"].as_array().unwrap() {
        let w = Tensor::zeros((2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        m.push(name.as_str().unwrap(), LoraLinear::new(w, None).unwrap()).unwrap();
    }
    if case["model"] == "llama" {
        m.set_output_layer("lm_head").unwrap();
    }
    m
}

#[test]
fn every_matching_rule_picks_the_modules_ranks_and_alphas_peft_picks() {
    let all = cases();
    assert!(all.len() >= 17);
    for case in all {
        let name = case["name"].as_str().unwrap();
        // The config as text, as PEFT would save it (its defaults r = 8, lora_alpha = 8 where the case sets
        // none), so that pattern keys keep their order.
        let text = case["adapter_config"].as_str().unwrap();
        let got = parse_peft_config(Path::new("adapter_config.json"), text).and_then(|(c, _)| {
            let m = model(&case);
            let targeted = m.targeted(&c)?;
            Ok(targeted.into_iter().map(|t| (c.rank_for(&t), c.alpha_for(&t), t)).collect::<Vec<_>>())
        });
        match case.get("error") {
            Some(e) => {
                let ours = got.expect_err(&format!("{name}: PEFT refuses this config ({e}), lora-rs accepted it")).to_string();
                assert!(ours.contains("layers_to_transform"), "{name}: {ours}");
            }
            None => {
                let got = got.unwrap_or_else(|e| panic!("{name}: {e}"));
                let want: BTreeMap<String, (usize, f64)> = case["adapted"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), (v["r"].as_u64().unwrap() as usize, v["alpha"].as_f64().unwrap())))
                    .collect();
                let got: BTreeMap<String, (usize, f64)> = got.into_iter().map(|(r, a, t)| (t, (r, a))).collect();
                assert_eq!(got, want, "{name}");
            }
        }
    }
}

#[test]
fn a_pattern_or_target_that_is_not_a_regular_expression_is_refused_by_key() {
    for (cfg, key) in [
        (json!({"target_modules": "(unclosed"}), "target_modules"),
        (json!({"target_modules": ["q_proj"], "rank_pattern": {"q_(": 2}}), "rank_pattern.q_("),
        (json!({"target_modules": ["q_proj"], "alpha_pattern": {"[": 2}}), "alpha_pattern.["),
        (json!({"target_modules": ["q_proj"], "exclude_modules": "*bad"}), "exclude_modules"),
        (json!({"target_modules": ["q_proj"], "layers_pattern": "layers"}), "layers_pattern"),
        (json!({"target_modules": ["q_proj"], "layers_to_transform": ["x"]}), "layers_to_transform"),
    ] {
        let mut c = json!({"peft_type": "LORA", "r": 2, "lora_alpha": 2});
        for (k, v) in cfg.as_object().unwrap() {
            c[k] = v.clone();
        }
        let e = parse_peft_config(Path::new("adapter_config.json"), &c.to_string()).unwrap_err().to_string();
        assert!(e.contains(key), "{cfg}: {e}");
    }
}
