//! `lora merge`: fold adapters into the base weights and save the merged model.

use std::collections::HashMap;

use anyhow::{Context, Result};
use lora::io::save_safetensors;
use lora::{Combination, LoadOptions};

use crate::cli::MergeArgs;
use crate::common::{fingerprint, load_model};

pub fn run(a: MergeArgs) -> Result<()> {
    let mut net = load_model(&a.model)?;
    let before = net.model.base_state()?;
    let opts = LoadOptions { base_fingerprint: Some(fingerprint(&net)?), force: a.force };
    let mut weighted = Vec::new();
    for (i, (dir, w)) in a.adapter.iter().enumerate() {
        let name = format!("adapter{i}");
        net.model.load_adapter(&name, dir, &opts).with_context(|| format!("loading adapter {}", dir.display()))?;
        weighted.push((name, *w));
    }
    let target = if weighted.len() == 1 && weighted[0].1 == 1.0 {
        weighted[0].0.clone()
    } else {
        // Concatenated ranks: exactly the weighted sum of the adapters' updates.
        let refs: Vec<(&str, f64)> = weighted.iter().map(|(n, w)| (n.as_str(), *w)).collect();
        net.model.combine_adapters(&refs, Combination::Cat, "combined")?;
        "combined".to_string()
    };
    net.model.merge(&target, true).with_context(|| format!("merging into {}", a.model.display()))?;
    let after = net.model.base_state()?;
    let list: Vec<String> = a.adapter.iter().map(|(d, w)| format!("{}:{w}", d.display())).collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string()), ("lora_rs.merged".to_string(), list.join(","))]);
    save_safetensors(&a.out, &after, &meta)?;
    println!("Merged {} adapter(s) into {}:", a.adapter.len(), a.model.display());
    for ((n, w0), (_, w1)) in before.iter().zip(&after) {
        let d = (w1 - w0)?.abs()?.max_all()?.to_scalar::<f32>()?;
        println!("  {n:<16} max |ΔW| = {d:.3e}");
    }
    println!("Wrote {} ({} bytes)", a.out.display(), std::fs::metadata(&a.out)?.len());
    Ok(())
}
