//! `lora lm bench`: the workloads of scripts/pytorch_lm_workloads.py (transformers + PEFT), timed the
//! same way and printed with the same keys, so the two can run side by side and be compared key by key.
//!
//! Models (`--shape`, the peer's `--shape`): tiny = the byte-level default (vocab 256, hidden 256, MLP 768,
//! 4 layers, 8/4 heads, 3,279,104 parameters, batch 16 × 256); small = SmolLM-135M's body (hidden 576, MLP
//! 1536, 30 layers, 9/3 heads, 106,498,368 parameters with the 256-byte vocabulary, batch 4 × 256); 1b =
//! Llama-3.2-1B's body (hidden 2048, MLP 8192, 16 layers, 32/8 heads, tied, 973,670,400 parameters, batch
//! 1 × 256, no full step). full_step_ms: median step of the batch of random bytes, AdamW (lr 1e-3) over every
//! tensor; lora_step_ms: the same with LoRA r 8, alpha 16 on the seven projections, base frozen;
//! eval_tokens_per_s: forward with loss, adapter active; generate_*: greedy, 16-token prompts, exactly
//! 128 new tokens, KV cache, adapter active and unmerged. `--dtype bf16`: the frozen base (LoRA step,
//! evaluation, generation) rounded to bf16 and held so, as a bf16 checkpoint loads.
//!
//! Generation against memory bandwidth: a batch-1 decode step reads every base weight once, so
//! `generate_weight_gb_per_s` = base_weight_bytes × tokens/s; `memory_read_gb_per_s` is this machine's
//! read bandwidth measured in the same run (a sum over 1 GiB on the same threads, best of three), and
//! `generate_bandwidth_fraction` their ratio.

use std::time::Instant;

use anyhow::Result;
use lora::LoraConfig;
use lora_lm::generate::{generate, Sampling};
use lora_lm::optim::AdamW;
use lora_lm::train::batch_loss;
use lora_lm::{Llama, LlamaConfig, PROJECTIONS};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::common::{check_outputs, write_json, Out};
use crate::lm_cli::{BenchDtype, BenchShape, LmBenchArgs};

const SEQ: usize = 256;
const PROMPT: usize = 16;

/// The model, batch rows and whether a full step is timed, of a shape.
fn shape(s: BenchShape) -> (LlamaConfig, usize, bool) {
    let base = LlamaConfig::byte_default();
    match s {
        BenchShape::Tiny => (base, 16, true),
        BenchShape::Small => (
            LlamaConfig {
                hidden_size: 576,
                intermediate_size: 1536,
                num_hidden_layers: 30,
                num_attention_heads: 9,
                num_key_value_heads: 3,
                head_dim: 64,
                ..base
            },
            4,
            true,
        ),
        BenchShape::OneB => (
            LlamaConfig {
                hidden_size: 2048,
                intermediate_size: 8192,
                num_hidden_layers: 16,
                num_attention_heads: 32,
                num_key_value_heads: 8,
                head_dim: 64,
                tie_word_embeddings: true,
                ..base
            },
            1,
            false,
        ),
    }
}
const NEW_TOKENS: usize = 128;

fn random_ids(rng: &mut StdRng, n: usize) -> Vec<u32> {
    (0..n).map(|_| rng.random_range(0..256u32)).collect()
}

/// Median seconds of `reps` runs of `f` after `warmup` untimed ones; inputs drawn outside the timing.
fn time<F: FnMut(Vec<u32>) -> Result<()>>(rng: &mut StdRng, n: usize, reps: usize, warmup: usize, mut f: F) -> Result<f64> {
    let mut t = Vec::new();
    for i in 0..warmup + reps {
        let ids = random_ids(rng, n);
        let s = Instant::now();
        f(ids)?;
        if i >= warmup {
            t.push(s.elapsed().as_secs_f64());
        }
    }
    Ok(crate::cmd::median(t))
}

fn train_steps(model: &Llama, rng: &mut StdRng, batch: usize, reps: usize, warmup: usize) -> Result<f64> {
    let mut opt = AdamW::new(model.trainable_vars(), 0.0);
    time(rng, batch * SEQ, reps, warmup, |ids| {
        let loss = batch_loss(model, &ids, batch, SEQ, true)?;
        let grads = loss.backward()?;
        opt.step(&grads, 1e-3, None)?;
        Ok(())
    })
}

pub fn run(a: LmBenchArgs) -> Result<()> {
    check_outputs(&[("--json", a.json.as_deref(), Out::File)])?;
    let threads = crate::cmd::set_threads(a.threads);
    let (steps, warmup) = if a.quick { (3, 1) } else { (a.steps as usize, 3) };
    let (eval_reps, gen_reps) = if a.quick { (3, 1) } else { (10, 5) };
    let (config, batch, full_step) = shape(a.shape);
    let mut model = Llama::random(&config, a.seed)?;
    let mut rng = StdRng::seed_from_u64(a.seed);
    let params = model.num_params();
    eprintln!("params: {params}");

    let full = if full_step {
        eprintln!("full_step: {warmup} warm-up + {steps} steps of batch {batch}x{SEQ}...");
        let full = train_steps(&model, &mut rng, batch, steps, warmup)?;
        eprintln!("  full_step_ms {:.1}", full * 1e3);
        Some(full)
    } else {
        None
    };

    let lora_cfg = LoraConfig {
        target_modules: PROJECTIONS.iter().map(|s| s.to_string()).collect(),
        init: lora::Init::PeftGaussian,
        ..LoraConfig::new(8, 16.0)
    };
    model.lora_mut().add_adapter("bench", &lora_cfg, &mut StdRng::seed_from_u64(a.seed + 1))?;
    model.lora_mut().set_active(&["bench"])?;
    model.freeze_base();
    if a.dtype == BenchDtype::Bf16 {
        let held = model.round_base_to_bf16()?;
        eprintln!("base rounded to bf16: {held} matrices held in bf16");
    }
    let base_bytes = model.base_bytes();
    let lora_params: usize = model.trainable_vars().iter().map(|(_, v)| v.elem_count()).sum();
    eprintln!("lora trainable params: {lora_params}");
    let lora = train_steps(&model, &mut rng, batch, steps, warmup)?;
    eprintln!("  lora_step_ms {:.1}", lora * 1e3);

    let ev = time(&mut rng, batch * SEQ, eval_reps, 1, |ids| {
        batch_loss(&model, &ids, batch, SEQ, false)?.to_scalar::<f32>()?;
        Ok(())
    })?;
    let eval_tps = (batch * SEQ) as f64 / ev;
    eprintln!("  eval_tokens_per_s {eval_tps:.0}");

    let mut gen = |rows: usize| -> Result<f64> {
        time(&mut rng, rows * PROMPT, gen_reps, 1, |ids| {
            let prompts: Vec<Vec<u32>> = ids.chunks(PROMPT).map(<[u32]>::to_vec).collect();
            let out = generate(&model, &prompts, NEW_TOKENS, &Sampling::greedy(), &[], |_, _| Ok(true))?;
            anyhow::ensure!(out.iter().all(|g| g.tokens.len() == NEW_TOKENS), "generation stopped early");
            Ok(())
        })
    };
    let g1 = gen(1)?;
    eprintln!("  generate_tokens_per_s {:.1}", NEW_TOKENS as f64 / g1);
    let g8 = gen(8)?;
    eprintln!("  generate_batch8_tokens_per_s {:.1}", (8 * NEW_TOKENS) as f64 / g8);
    let weight_gbs = base_bytes as f64 * (NEW_TOKENS as f64 / g1) / 1e9;
    let memory_gbs = lora_kernels::read_bandwidth(1 << 30) / 1e9;
    eprintln!("  generation reads {weight_gbs:.2} GB/s of weights; memory reads {memory_gbs:.2} GB/s here");

    let out = json!({
        "impl": format!("lora-rs {}", env!("CARGO_PKG_VERSION")),
        "device": "cpu",
        "threads": threads,
        "params": params,
        "lora_params": lora_params,
        "attn": if model.is_fused() { "grouped, fused CPU kernels (flash-style)" } else { "grouped (candle ops)" },
        "shape": format!("{:?}", a.shape).to_lowercase().replace("oneb", "1b"),
        "full_step_ms": full.map(|f| crate::cmd::round3(f * 1e3)),
        "lora_step_ms": crate::cmd::round3(lora * 1e3),
        "eval_tokens_per_s": (eval_tps * 10.0).round() / 10.0,
        "generate_tokens_per_s": ((NEW_TOKENS as f64 / g1) * 100.0).round() / 100.0,
        "generate_batch8_tokens_per_s": (((8 * NEW_TOKENS) as f64 / g8) * 100.0).round() / 100.0,
        "dtype": format!("{:?}", a.dtype).to_lowercase(),
        "base_weight_bytes": base_bytes,
        "generate_weight_gb_per_s": crate::cmd::round3(weight_gbs),
        "memory_read_gb_per_s": crate::cmd::round3(memory_gbs),
        "generate_bandwidth_fraction": crate::cmd::round3(weight_gbs / memory_gbs),
        "peak_rss_mb": crate::cmd::peak_rss_mb(),
    });
    println!("{}", serde_json::to_string(&out)?);
    if let Some(p) = &a.json {
        write_json(p, &out)?;
    }
    Ok(())
}
