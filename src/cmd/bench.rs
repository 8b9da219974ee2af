//! `lora bench`: the workloads of the PyTorch peer script (scripts/pytorch_workloads.py), timed the same
//! way, so the two can run back to back on one machine and be compared key by key.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;
use lora::{Backend, Bias, LoraConfig};
use lora_train::{evaluate, train, ExpensiveNet, TrainConfig, Trainer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::cli::BenchArgs;
use crate::common::{check_outputs, write_json, Data, Out};

/// Median of `steps` training steps after `warmup` untimed ones, batch `bs`, random examples.
fn median_step_ms(net: &ExpensiveNet, data: &Data, lr: f64, bs: usize, steps: usize, warmup: usize, rng: &mut StdRng) -> Result<f64> {
    let mut trainer = Trainer::new(net, lr)?;
    let n = data.train.len() as u32;
    let mut times = Vec::with_capacity(steps);
    for k in 0..steps + warmup {
        let idx: Vec<u32> = (0..bs).map(|_| rng.random_range(0..n)).collect();
        let t = Instant::now();
        let (x, y) = data.train.batch(&idx)?;
        trainer.step(net, &x, &y, k + 1)?;
        if k >= warmup {
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(super::median(times))
}

pub fn run(a: BenchArgs) -> Result<()> {
    check_outputs(&[("--json", a.json.as_deref(), Out::File)])?;
    // candle, gemm and rayon all read RAYON_NUM_THREADS before their first parallel call.
    let threads = super::set_threads(a.threads);
    let backend = if a.reference { Backend::Reference } else { Backend::Fused };
    let (bs, lr) = (64usize, 1e-3);

    let data = Data::load(&a.data.data)?;
    let mut net = ExpensiveNet::new(data.raw.train.pixels(), 1000, 2000, 10, a.seed, &Device::Cpu)?;
    net.set_backend(backend);

    // 1. One pre-training epoch: 938 shuffled steps of 64, Adam, all parameters.
    let cfg = TrainConfig { epochs: 1, batch_size: bs, lr, max_steps: None, seed: a.seed, loraplus_lr_ratio: None };
    let t = Instant::now();
    let stats = train(&net, &data.train, &cfg, |_| {})?;
    let pretrain_epoch_s = t.elapsed().as_secs_f64();
    let pretrain_accuracy = evaluate(&net, &data.test, 1000)?.accuracy;

    // 2. Full fine-tuning steps (every base tensor trainable).
    let mut rng = StdRng::seed_from_u64(a.seed.wrapping_add(7));
    let full_step_ms = median_step_ms(&net, &data, lr, bs, a.steps as usize, a.warmup as usize, &mut rng)?;

    // 3. LoRA steps: rank 1, alpha 1 on all three layers, base frozen.
    net.model.add_adapter("bench", &LoraConfig::new(1, 1.0), &mut StdRng::seed_from_u64(a.seed.wrapping_add(1)))?;
    net.model.set_active(&["bench"])?;
    net.model.freeze_base(Bias::None);
    let lora_step_ms = median_step_ms(&net, &data, lr, bs, a.steps as usize, a.warmup as usize, &mut rng)?;

    // 4. Evaluation of the 10,000 test images in batches of 64 (LoRA on, as in the peer script).
    let t = Instant::now();
    let e = evaluate(&net, &data.test, bs)?;
    let eval_s = t.elapsed().as_secs_f64();

    let out = json!({
        "impl": format!("lora-rs {} ({})", env!("CARGO_PKG_VERSION"), match backend { Backend::Fused => "fused", Backend::Reference => "reference candle" }),
        "device": "cpu",
        "threads": threads,
        "pretrain_epoch_s": super::round3(pretrain_epoch_s),
        "full_step_ms": super::round3(full_step_ms),
        "lora_step_ms": super::round3(lora_step_ms),
        "eval_s": super::round3(eval_s),
        "peak_rss_mb": super::peak_rss_mb(),
        "pretrain_accuracy": pretrain_accuracy,
        "pretrain_steps": stats.steps,
        "eval_accuracy_lora_on": e.accuracy,
    });
    println!("{}", serde_json::to_string(&out)?);
    if let Some(p) = &a.json {
        write_json(p, &out).with_context(|| format!("writing {}", Path::new(p).display()))?;
    }
    Ok(())
}
