//! Times the parts of training steps and evaluation of the `lora lm bench` model (batch 16 × 256):
//! `profile_step MODE REPS [reference]` with MODE `full` (every tensor trains), `lora` (r 8 on the seven
//! projections, base frozen) or `eval`; `reference` selects the reference ops instead of the fused ones.
//! `PROFILE_SHAPE=small|1b`: `lora lm bench --shape small|1b`'s model (batch 4 or 1 × 256); `PROFILE_DTYPE=bf16`: the
//! frozen base rounded to bf16 and held so (`lora lm bench --dtype bf16`).
use std::time::Instant;

use candle_core::Tensor;
use lora::LoraConfig;
use lora_lm::optim::AdamW;
use lora_lm::train::batch_loss;
use lora_lm::{Llama, LlamaConfig, PROJECTIONS};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map_or("full", |s| s.as_str()).to_string();
    let reps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    let shape = std::env::var("PROFILE_SHAPE").unwrap_or_default();
    let small = shape == "small";
    let config = if shape == "1b" {
        LlamaConfig {
            hidden_size: 2048,
            intermediate_size: 8192,
            num_hidden_layers: 16,
            num_attention_heads: 32,
            num_key_value_heads: 8,
            head_dim: 64,
            tie_word_embeddings: true,
            ..LlamaConfig::byte_default()
        }
    } else if small {
        LlamaConfig {
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            head_dim: 64,
            ..LlamaConfig::byte_default()
        }
    } else {
        LlamaConfig::byte_default()
    };
    let batch = if shape == "1b" {
        1
    } else if small {
        4
    } else {
        16
    };
    let mut model = Llama::random(&config, 0)?;
    model.set_fused(args.get(3).map(|s| s.as_str()) != Some("reference"));
    if mode != "full" {
        let cfg = LoraConfig {
            target_modules: PROJECTIONS.iter().map(|s| s.to_string()).collect(),
            init: lora::Init::PeftGaussian,
            ..LoraConfig::new(8, 16.0)
        };
        model.lora_mut().add_adapter("a", &cfg, &mut StdRng::seed_from_u64(1))?;
        model.lora_mut().set_active(&["a"])?;
        model.freeze_base();
        if std::env::var("PROFILE_DTYPE").is_ok_and(|v| v == "bf16") {
            model.round_base_to_bf16()?;
        }
    }
    let mut rng = StdRng::seed_from_u64(2);
    if let Some(rows) = mode.strip_prefix("gen").and_then(|r| r.parse::<usize>().ok()) {
        // Generation as `lora lm bench` times it: 16-token prompts, 128 new tokens, greedy, KV cache.
        let mut times = Vec::new();
        for _ in 0..reps + 1 {
            let prompts: Vec<Vec<u32>> = (0..rows).map(|_| (0..16).map(|_| rng.random_range(0..256u32)).collect()).collect();
            let t0 = Instant::now();
            lora_lm::generate::generate(&model, &prompts, 128, &lora_lm::generate::Sampling::greedy(), &[], |_, _| Ok(true))?;
            times.push(t0.elapsed().as_secs_f64());
        }
        times.remove(0);
        times.sort_by(f64::total_cmp);
        println!(
            "{mode}: {:.0} tokens/s (median of {reps}, best {:.0})",
            (rows * 128) as f64 / times[times.len() / 2],
            (rows * 128) as f64 / times[0]
        );
        return Ok(());
    }
    let mut opt = AdamW::new(model.trainable_vars(), 0.0);
    let (mut fw, mut bw, mut ad) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..reps + 1 {
        let ids: Vec<u32> = (0..batch * 256).map(|_| rng.random_range(0..256u32)).collect();
        let t0 = Instant::now();
        let loss: Tensor = batch_loss(&model, &ids, batch, 256, mode != "eval")?;
        loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        if mode != "eval" {
            let grads = loss.backward()?;
            let t2 = Instant::now();
            opt.step(&grads, 1e-3, None)?;
            if i > 0 {
                bw.push((t2 - t1).as_secs_f64() * 1e3);
                ad.push(t2.elapsed().as_secs_f64() * 1e3);
            }
        }
        if i > 0 {
            fw.push((t1 - t0).as_secs_f64() * 1e3);
        }
    }
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    println!("{mode}: forward {:.1} ms, backward {:.1} ms, adam {:.1} ms (medians of {reps})", med(fw), med(bw), med(ad));
    Ok(())
}
