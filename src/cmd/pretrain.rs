//! `lora pretrain`: train ExpensiveNet from scratch and save it.

use anyhow::Result;
use candle_core::Device;
use lora_train::{evaluate, train_with, Checkpoint, Checkpointing, ExpensiveNet, TrainConfig, TrainStats};
use serde_json::json;

use crate::cli::PretrainArgs;
use crate::common::{check_outputs, print_eval, save_model, write_json, Data, Out};
use crate::progress::EpochBars;
use lora_train::checkpoint;

/// Pre-trains `net` on the training set with a progress bar per epoch, continuing from `resume` and/or
/// checkpointing every `every.0` steps into `every.1`.
pub(crate) fn pretrain_with(
    net: &ExpensiveNet,
    data: &Data,
    cfg: &TrainConfig,
    resume: Option<&Checkpoint>,
    every: Option<(usize, &std::path::Path, &serde_json::Value)>,
) -> Result<TrainStats> {
    let mut bars = EpochBars::new("Training", cfg.epochs);
    let mut save = |ck: &Checkpoint| -> lora_train::Result<()> {
        let (_, dir, settings) = every.expect("only called when checkpointing");
        checkpoint::save(dir, "pretrain", net, None, settings, ck)
            .map_err(|e| lora_train::TrainError::Model { path: dir.display().to_string(), why: format!("{e:#}") })
    };
    let ck = every.map(|(n, _, _)| Checkpointing { every: n, save: &mut save });
    let stats = train_with(net, &data.train, cfg, resume, ck, |s| bars.step(s))?;
    bars.finish();
    Ok(stats)
}

pub fn run(a: PretrainArgs) -> Result<()> {
    check_outputs(&[
        ("--out", Some(&a.out), Out::File),
        ("--json", a.json.as_deref(), Out::File),
        ("--report", a.report.report.as_deref(), Out::Dir),
        ("--checkpoint-dir", a.checkpoint.checkpoint_dir.as_deref(), Out::Dir),
    ])?;
    let cfg = TrainConfig {
        epochs: a.epochs as usize,
        batch_size: a.batch_size as usize,
        lr: a.lr,
        max_steps: None,
        seed: a.seed,
        loraplus_lr_ratio: None,
    };
    cfg.validate()?;
    let data = Data::load(&a.data.data)?;
    let settings = json!({"hidden1": a.net.hidden1, "hidden2": a.net.hidden2, "epochs": a.epochs, "batch_size": a.batch_size,
        "lr": a.lr, "seed": a.seed, "train_images": data.train.len()});
    let (net, resume) = match &a.checkpoint.resume {
        Some(dir) => {
            let l = checkpoint::load(dir, "pretrain", &settings)?;
            println!("Resuming from {} at step {}", dir.display(), l.checkpoint.global_step);
            (l.net()?, Some(l.checkpoint))
        }
        None => {
            (ExpensiveNet::new(data.raw.train.pixels(), a.net.hidden1 as usize, a.net.hidden2 as usize, 10, a.seed, &Device::Cpu)?, None)
        }
    };
    let ck_dir = a.checkpoint.checkpoint_dir.clone().unwrap_or_else(|| checkpoint::default_dir(&a.out));
    let every = a.checkpoint.checkpoint_every.map(|n| (n as usize, ck_dir.as_path(), &settings));
    let stats = pretrain_with(&net, &data, &cfg, resume.as_ref(), every)?;
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
        let run = crate::report_dir::PretrainRun { args: &a, data: &data, net: &net, stats: &stats, eval: &e, summary: &summary };
        crate::report_dir::pretrain(dir, run)?;
    }
    Ok(())
}
