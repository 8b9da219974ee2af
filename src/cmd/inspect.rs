//! `lora inspect`: what a model file or an adapter directory holds.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::Device;
use lora::adapter::{CONFIG_FILE, META_BASE_SHA256, WEIGHTS_FILE};
use lora::io::TensorFile;
use lora::read_adapter;

use crate::cli::InspectArgs;
use crate::common::group;

fn adapter_dir(p: &Path) -> Option<&Path> {
    if p.is_dir() {
        return Some(p);
    }
    let parent = p.parent()?;
    (p.file_name()? == WEIGHTS_FILE && parent.join(CONFIG_FILE).is_file()).then_some(parent)
}

/// A Hugging Face model directory (config.json + weights): architecture, tensors, size, fingerprint.
fn lm_model(dir: &Path) -> Result<()> {
    let (model, files) = lora_lm::hf::load_model(dir)?;
    let c = model.config();
    println!("Llama model directory {}", dir.display());
    println!(
        "  vocab {}, hidden {}, MLP {}, {} layers, {} heads ({} key/value heads, head_dim {}), context {}",
        c.vocab_size,
        c.hidden_size,
        c.intermediate_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.max_position_embeddings
    );
    println!(
        "  rope_theta {} ({} scaling), rms_norm_eps {:e}, tied embeddings {}, tokenizer {:?}",
        c.rope_theta,
        c.rope_scaling.name(),
        c.rms_norm_eps,
        c.tie_word_embeddings,
        c.tokenizer
    );
    println!("  family {} ({})", c.family.spec().model_type, c.family.spec().architecture);
    println!(
        "  {} parameters in {} tensors; weights {:?}, {} bytes in {} file(s)",
        group(model.num_params()),
        model.base_state()?.len(),
        files.dtypes,
        files.bytes,
        files.weight_files.len()
    );
    println!("  LoRA-able modules: {} ({} per layer and lm_head)", model.lora().layer_names().count(), c.projections().join(", "));
    println!("  base SHA-256 {}", model.fingerprint()?);
    Ok(())
}

pub fn run(a: InspectArgs) -> Result<()> {
    anyhow::ensure!(a.path.exists(), "{}: no such file or directory", a.path.display());
    if a.path.is_dir() && a.path.join(lora_lm::hf::CONFIG_FILE).is_file() {
        return lm_model(&a.path);
    }
    if let Some(dir) = adapter_dir(&a.path) {
        let f = read_adapter(dir)?;
        let c = &f.config;
        println!("PEFT LoRA adapter {}", dir.display());
        println!(
            "  r = {}, lora_alpha = {}, use_rslora = {}, lora_dropout = {}",
            c.r,
            c.alpha,
            c.scaling == lora::Scaling::RankStabilized,
            c.dropout
        );
        println!("  target_modules = {:?}", c.target_modules);
        if !c.rank_pattern.is_empty() || !c.alpha_pattern.is_empty() {
            println!("  rank_pattern = {:?}, alpha_pattern = {:?}", c.rank_pattern, c.alpha_pattern);
        }
        if let Some(b) = &f.base_model_name_or_path {
            println!("  base_model_name_or_path = {b}");
        }
        println!("  {:<12} {:>5} {:>6} {:>14} {:>14} {:>8}", "module", "rank", "scale", "lora_A", "lora_B", "params");
        for (m, (ta, tb)) in &f.tensors {
            println!(
                "  {:<12} {:>5} {:>6.3} {:>14} {:>14} {:>8}",
                m,
                ta.dims()[0],
                c.scale_for(m),
                format!("{:?}", ta.dims()),
                format!("{:?}", tb.dims()),
                ta.elem_count() + tb.elem_count()
            );
        }
        let dtypes: std::collections::BTreeSet<&str> = f.dtypes.iter().map(|(_, d)| d.as_str()).collect();
        println!("  dtype {:?}; {} trainable parameters", dtypes, group(f.num_params()));
        println!("  files: {CONFIG_FILE} {} bytes, {WEIGHTS_FILE} {} bytes", f.bytes.0, f.bytes.1);
        match f.base_fingerprint() {
            Some(fp) => println!("  trained on base with SHA-256 {fp}"),
            None => println!("  no base fingerprint ({META_BASE_SHA256}) recorded"),
        }
        for (k, v) in &f.metadata {
            if k != META_BASE_SHA256 {
                println!("  metadata {k} = {v}");
            }
        }
        return Ok(());
    }
    let f = TensorFile::load(&a.path, &Device::Cpu).with_context(|| "reading a safetensors model file".to_string())?;
    println!("safetensors file {} ({} bytes)", a.path.display(), f.bytes);
    println!("  {:<40} {:>6} {:>14} {:>10}", "tensor", "dtype", "shape", "params");
    let mut total = 0;
    for ((n, t), (_, d)) in f.tensors.iter().zip(&f.dtypes) {
        total += t.elem_count();
        println!("  {:<40} {:>6} {:>14} {:>10}", n, d, format!("{:?}", t.dims()), t.elem_count());
    }
    println!("  {} tensors, {} parameters", f.tensors.len(), group(total));
    for (k, v) in &f.metadata {
        println!("  metadata {k} = {v}");
    }
    if let Ok(net) = crate::common::load_model(&a.path) {
        println!("  an ExpensiveNet {:?}; base SHA-256 {}", net.sizes()?, crate::common::fingerprint(&net)?);
    }
    Ok(())
}
