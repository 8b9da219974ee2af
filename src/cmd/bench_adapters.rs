//! `lora bench-adapters`: the storage and switching costs LoRA removes, measured.
//!
//! - storage: bytes of one adapter directory vs one full checkpoint;
//! - switching: median time to change the active adapter on a loaded base (no weight copied) vs the time
//!   to load a full fine-tuned checkpoint, and to load one adapter from disk; merged switching
//!   (unmerge one, merge the next) for zero-overhead inference;
//! - compute/memory: trainable parameters and Adam state (two f32 moments per parameter), LoRA vs full.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use lora::{LoadOptions, LoraConfig, SaveOptions};
use lora_train::ExpensiveNet;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::json;

use crate::cli::BenchAdaptersArgs;
use crate::common::{check_outputs, dir_bytes, group, load_model, write_json, Out};

/// Median seconds of `n` runs of `f`.
fn median_s(n: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut t = Vec::with_capacity(n);
    for _ in 0..n {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

fn fresh_adapters(net: &mut ExpensiveNet, k: usize, rank: usize, dir: &Path) -> Result<Vec<String>> {
    let mut rng = StdRng::seed_from_u64(7);
    let mut names = Vec::new();
    for i in 0..k {
        let name = format!("task{i}");
        net.model.add_adapter(&name, &LoraConfig::new(rank, rank as f64), &mut rng)?;
        for (_, l) in net.model.layers() {
            let b = l.adapter(&name)?.b();
            b.set(&(Tensor::randn(0f32, 1.0, b.shape(), &Device::Cpu)? * 0.01)?)?;
        }
        net.model.save_adapter(&name, &dir.join(&name), &SaveOptions::default())?;
        names.push(name);
    }
    Ok(names)
}

pub fn run(a: BenchAdaptersArgs) -> Result<()> {
    check_outputs(&[("--json", a.json.as_deref(), Out::File)])?;
    // Removed when dropped, also when measuring fails.
    let tmp = tempfile::tempdir().context("creating a temporary directory")?;
    measure(&a, tmp.path())
}

fn measure(a: &BenchAdaptersArgs, tmp: &Path) -> Result<()> {
    let (k, rank, n) = (a.adapters as usize, a.rank as usize, a.repeat as usize);
    let base_path = tmp.join("base.safetensors");
    let mut net = match &a.model {
        Some(p) => load_model(p)?,
        None => ExpensiveNet::new(784, 1000, 2000, 10, 0, &Device::Cpu)?,
    };
    let base_bytes = net.save(&base_path)?;
    let names = fresh_adapters(&mut net, k, rank, tmp)?;
    let adapter_bytes = dir_bytes(&tmp.join(&names[0]))?;

    // A full fine-tuned checkpoint is a whole model file: switching tasks means loading one.
    let n_load = n.clamp(5, 30);
    let checkpoint_load_s = median_s(n_load, || load_model(&base_path).map(|_| ()))?;

    // Loading one adapter from disk onto an already loaded base.
    let mut host = load_model(&base_path)?;
    let adapter_load_s = median_s(n, || {
        host.model.load_adapter("probe", &tmp.join(&names[0]), &LoadOptions::default())?;
        host.model.remove_adapter("probe")?;
        Ok(())
    })?;

    // Many adapters on one base; switching the active one copies nothing.
    for name in &names {
        host.model.load_adapter(name, &tmp.join(name), &LoadOptions::default())?;
    }
    let mut i = 0;
    let switch_s = median_s(n, || {
        i += 1;
        host.model.set_active(&[names[i % k].as_str()])?;
        Ok(())
    })?;

    // Merged switching: unmerge the current adapter, merge the next (zero-overhead inference between).
    host.model.set_active(&[])?;
    host.model.merge(&names[0], true)?;
    let mut cur = 0;
    let merged_switch_s = median_s(n.min(50), || {
        let next = (cur + 1) % k;
        host.model.unmerge(&names[cur])?;
        host.model.merge(&names[next], true)?;
        cur = next;
        Ok(())
    })?;

    let full_params = net.model.num_base_params();
    let lora_params = net.model.num_adapter_params(&names[0]);
    // Adam keeps m and v (f32 each) per trainable parameter; gradients add one more f32 each.
    let adam = |p: usize| 2 * 4 * p;
    println!("Storage (rank {rank}):");
    println!("  full checkpoint        {:>12} bytes", group(base_bytes as usize));
    println!(
        "  adapter directory      {:>12} bytes  ({:.2}% of a checkpoint; {k} adapters: {} bytes)",
        group(adapter_bytes as usize),
        100.0 * adapter_bytes as f64 / base_bytes as f64,
        group(k * adapter_bytes as usize)
    );
    println!("Switching tasks ({k} adapters on one loaded base, medians of {n}):");
    println!("  load a full checkpoint {:>12.3} ms", checkpoint_load_s * 1e3);
    println!("  load an adapter        {:>12.3} ms", adapter_load_s * 1e3);
    println!("  switch active adapter  {:>12.3} µs", switch_s * 1e6);
    println!("  switch merged adapter  {:>12.3} ms  (unmerge + merge, no per-call LoRA cost afterwards)", merged_switch_s * 1e3);
    println!("Training (Adam):");
    println!(
        "  trainable parameters   full {:>12}   LoRA {:>8}  ({:.3}%)",
        group(full_params),
        group(lora_params),
        100.0 * lora_params as f64 / full_params as f64
    );
    println!("  optimizer state bytes  full {:>12}   LoRA {:>8}", group(adam(full_params)), group(adam(lora_params)));
    if let Some(j) = &a.json {
        write_json(
            j,
            &json!({"rank": rank, "adapters": k, "repeat": n,
                "checkpoint_bytes": base_bytes, "adapter_bytes": adapter_bytes,
                "checkpoint_load_ms": checkpoint_load_s * 1e3, "adapter_load_ms": adapter_load_s * 1e3,
                "switch_us": switch_s * 1e6, "merged_switch_ms": merged_switch_s * 1e3,
                "trainable_params_full": full_params, "trainable_params_lora": lora_params,
                "optimizer_state_bytes_full": adam(full_params), "optimizer_state_bytes_lora": adam(lora_params)}),
        )?;
    }
    Ok(())
}
