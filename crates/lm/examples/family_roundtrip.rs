//! What lora-rs writes for every model family, for transformers and PEFT to load
//! (`scripts/family_roundtrip.py` runs this, then compares).
//!
//! For each family fixture in `tests/fixtures/families/` (or those named after OUT): load the base, add a
//! fresh LoRA adapter (rank 4, every projection of the family), train it 20 steps on the fixture's token rows,
//! write the model (`hf::save_model`, F32) and the adapter (`hf::save_adapter`, PEFT format) to
//! `OUT/<family>/{model,adapter}`, and the per-token losses (nats) of the fixture's rows with the adapter off
//! and on to `OUT/<family>/losses.json`.
//!
//! Usage: cargo run --release -p lora-lm --example family_roundtrip -- OUT [FAMILY ...]

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use lora_lm::hf::{load_model, save_adapter, save_model};
use lora_lm::Llama;
use rand::SeedableRng;
use serde_json::{json, Value};

fn losses(model: &Llama, rows: &[Vec<u32>]) -> Vec<Vec<f64>> {
    let t = Tensor::from_vec(rows.concat(), (rows.len(), rows[0].len()), &Device::Cpu).unwrap();
    let logits = model.forward(&t, None, false).unwrap();
    rows.iter()
        .enumerate()
        .map(|(r, row)| {
            let l = logits.get(r).unwrap().narrow(0, 0, row.len() - 1).unwrap();
            lora_lm::ops::token_nll(&l, &row[1..]).unwrap()
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(out) = args.first().map(PathBuf::from) else {
        eprintln!("usage: family_roundtrip OUT [FAMILY ...]");
        std::process::exit(2);
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/families");
    let families: Vec<String> =
        if args.len() > 1 { args[1..].to_vec() } else { lora_lm::FAMILIES.iter().map(|f| f.spec().model_type.to_string()).collect() };
    for name in families {
        let e: Value = serde_json::from_str(&std::fs::read_to_string(root.join(&name).join("expected.json")).unwrap()).unwrap();
        let rows: Vec<Vec<u32>> = e["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect())
            .collect();
        let (mut m, _) = load_model(&root.join(&name).join("base")).unwrap();
        let cfg = lora::LoraConfig {
            target_modules: lora::Targets::Names(m.config().projections().iter().map(|s| s.to_string()).collect()),
            init: lora::Init::PeftGaussian,
            ..lora::LoraConfig::new(4, 8.0)
        };
        m.lora_mut().add_adapter("trained", &cfg, &mut rand::rngs::StdRng::seed_from_u64(7)).unwrap();
        m.lora_mut().set_active(&["trained"]).unwrap();
        m.freeze_base();
        let ids = rows.concat();
        let mut opt = lora_lm::optim::AdamW::new(m.trainable_vars(), 0.0);
        for _ in 0..20 {
            let loss = lora_lm::train::batch_loss(&m, &ids, rows.len(), rows[0].len(), true).unwrap();
            let g = loss.backward().unwrap();
            opt.step(&g, 1e-2, None).unwrap();
        }
        let dir = out.join(&name);
        save_model(&m, &dir.join("model"), &Default::default()).unwrap();
        save_adapter(&m, "trained", &dir.join("adapter"), Some("model".into()), Default::default(), false).unwrap();
        let on = losses(&m, &rows);
        m.lora_mut().set_active(&[]).unwrap();
        let off = losses(&m, &rows);
        let mean = |l: &Vec<Vec<f64>>| l.iter().flatten().sum::<f64>() / l.iter().map(Vec::len).sum::<usize>() as f64;
        eprintln!("{name}: mean loss base {:.4}, trained adapter {:.4}", mean(&off), mean(&on));
        let j = json!({"ids": rows, "base": off, "adapter": on});
        std::fs::write(dir.join("losses.json"), serde_json::to_string(&j).unwrap()).unwrap();
    }
}
