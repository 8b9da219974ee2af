//! `lora pretrain`: train ExpensiveNet from scratch and save it.

use anyhow::Result;
use candle_core::Device;
use lora_train::{evaluate, train, ExpensiveNet, TrainConfig, TrainStats};
use serde_json::json;

use crate::cli::PretrainArgs;
use crate::common::{print_eval, save_model, write_json, Data};
use crate::progress::EpochBars;

/// Pre-trains `net` on the training set with a progress bar per epoch.
pub fn pretrain(net: &ExpensiveNet, data: &Data, cfg: &TrainConfig) -> Result<TrainStats> {
    let mut bars = EpochBars::new("Training", cfg.epochs);
    let stats = train(net, &data.train, cfg, |s| bars.step(s))?;
    bars.finish();
    Ok(stats)
}

pub fn run(a: PretrainArgs) -> Result<()> {
    let data = Data::load(&a.data.data)?;
    let net = ExpensiveNet::new(data.raw.train.pixels(), a.net.hidden1 as usize, a.net.hidden2 as usize, 10, a.seed, &Device::Cpu)?;
    let cfg = TrainConfig { epochs: a.epochs as usize, batch_size: a.batch_size as usize, lr: a.lr, max_steps: None, seed: a.seed };
    cfg.validate()?;
    let stats = pretrain(&net, &data, &cfg)?;
    let bytes = save_model(&net, &a.out)?;
    let e = evaluate(&net, &data.test, 1000)?;
    print_eval("Pre-trained network on the test set:", &e);
    println!("Saved {} ({bytes} bytes) after {} steps in {:.1} s", a.out.display(), stats.steps, stats.seconds);
    let summary = json!({"epochs": cfg.epochs, "steps": stats.steps, "seconds": stats.seconds,
    "accuracy": e.accuracy, "wrong": e.wrong, "model": a.out, "model_bytes": bytes});
    if let Some(j) = &a.json {
        write_json(j, &summary)?;
    }
    if let Some(dir) = &a.report.report {
        let run = crate::viz::PretrainRun { args: &a, data: &data, net: &net, stats: &stats, eval: &e, summary: &summary };
        crate::viz::pretrain(dir, run)?;
    }
    Ok(())
}
