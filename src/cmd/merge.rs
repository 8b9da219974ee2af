//! `lora merge`: fold adapters into the base weights and save the merged model.

use std::collections::HashMap;

use anyhow::{Context, Result};
use lora::io::save_safetensors;
use lora::{Combination, CombineOptions, LoadOptions, SaveOptions};

use crate::cli::MergeArgs;
use crate::common::{check_outputs, fingerprint, load_model, Out};

/// Loads the adapters onto one model, combined by weight when there are several; returns the name to merge.
fn combine(model: &mut lora::LoraModel, a: &MergeArgs, opts: &LoadOptions) -> Result<String> {
    let mut weighted = Vec::new();
    for (i, (dir, w)) in a.adapter.iter().enumerate() {
        let name = format!("adapter{i}");
        model.load_adapter(&name, dir, opts).with_context(|| format!("loading adapter {}", dir.display()))?;
        weighted.push((name, *w));
    }
    if weighted.len() == 1 && weighted[0].1 == 1.0 && a.adapter_out.is_none() {
        return Ok(weighted[0].0.clone());
    }
    let pruning = !matches!(a.combination, Combination::Cat | Combination::Linear | Combination::Svd);
    anyhow::ensure!(
        a.density.is_some() || !pruning || weighted.len() == 1,
        "--combination {} needs --density (the fraction of values to keep)",
        a.combination.name()
    );
    let copts = CombineOptions {
        density: a.density.unwrap_or(1.0),
        majority_sign: a.majority_sign,
        svd_rank: a.svd_rank.map(|r| r as usize),
        svd_clamp: a.svd_clamp,
        seed: a.seed,
    };
    let refs: Vec<(&str, f64)> = weighted.iter().map(|(n, w)| (n.as_str(), *w)).collect();
    model.combine_adapters_with(&refs, a.combination, &copts, "combined")?;
    if let Some(dir) = &a.adapter_out {
        let list: Vec<String> = a.adapter.iter().map(|(d, w)| format!("{}:{w}", d.display())).collect();
        let save = SaveOptions {
            metadata: [("lora_rs.combination".to_string(), format!("{} of {}", a.combination.name(), list.join(",")))].into(),
            base_fingerprint: opts.base_fingerprint.clone(),
            ..SaveOptions::default()
        };
        model.save_adapter("combined", dir, &save).with_context(|| format!("writing the combined adapter to {}", dir.display()))?;
        println!("Wrote the combined adapter ({}) to {}", a.combination.name(), dir.display());
    }
    Ok("combined".to_string())
}

fn print_deltas(before: &[(String, candle_core::Tensor)], after: &[(String, candle_core::Tensor)]) -> Result<()> {
    for ((n, w0), (_, w1)) in before.iter().zip(after) {
        let d = (w1 - w0)?.abs()?.max_all()?.to_scalar::<f32>()?;
        if d > 0.0 || before.len() <= 8 {
            println!("  {n:<16} max |ΔW| = {d:.3e}");
        }
    }
    Ok(())
}

/// A Hugging Face model directory: the merged model is written as a model directory at --out.
fn merge_lm(a: &MergeArgs) -> Result<()> {
    super::lm::check_out_dir(&a.out, &[lora_lm::hf::CONFIG_FILE, lora_lm::hf::WEIGHTS_FILE])?;
    let (mut model, _) = lora_lm::hf::load_model(&a.model)?;
    let before = model.base_state()?;
    let opts = LoadOptions { base_fingerprint: Some(model.fingerprint()?), force: a.force };
    let target = combine(model.lora_mut(), a, &opts)?;
    model.lora_mut().merge(&target, true).with_context(|| format!("merging into {}", a.model.display()))?;
    let after = model.base_state()?;
    let list: Vec<String> = a.adapter.iter().map(|(d, w)| format!("{}:{w}", d.display())).collect();
    let meta = std::collections::BTreeMap::from([("lora_rs.merged".to_string(), list.join(","))]);
    // The merged model talks as the base did: its tokenizer, chat template and end tokens go with it.
    let talk = lora_lm::hf::talk_files(&a.model)?;
    lora_lm::hf::save_model_with(&model, &a.out, &meta, lora_lm::hf::WeightDtype::F32, &talk)?;
    println!("Merged {} adapter(s) into {} (weights that changed):", a.adapter.len(), a.model.display());
    print_deltas(&before, &after)?;
    let copied: Vec<&str> = talk.iter().map(|(n, _)| *n).collect();
    if copied.is_empty() {
        println!("Wrote the model directory {}", a.out.display());
    } else {
        println!("Wrote the model directory {} (with the base's {})", a.out.display(), copied.join(", "));
    }
    Ok(())
}

pub fn run(a: MergeArgs) -> Result<()> {
    if let Some(dir) = &a.adapter_out {
        check_outputs(&[("--adapter-out", Some(dir), Out::Dir)])?;
    }
    if a.model.is_dir() {
        return merge_lm(&a);
    }
    check_outputs(&[("--out", Some(&a.out), Out::File)])?;
    let mut net = load_model(&a.model)?;
    let before = net.model.base_state()?;
    let opts = LoadOptions { base_fingerprint: Some(fingerprint(&net)?), force: a.force };
    let target = combine(&mut net.model, &a, &opts)?;
    net.model.merge(&target, true).with_context(|| format!("merging into {}", a.model.display()))?;
    let after = net.model.base_state()?;
    let list: Vec<String> = a.adapter.iter().map(|(d, w)| format!("{}:{w}", d.display())).collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string()), ("lora_rs.merged".to_string(), list.join(","))]);
    save_safetensors(&a.out, &after, &meta)?;
    println!("Merged {} adapter(s) into {}:", a.adapter.len(), a.model.display());
    print_deltas(&before, &after)?;
    println!("Wrote {} ({} bytes)", a.out.display(), std::fs::metadata(&a.out)?.len());
    Ok(())
}
