//! `lora pretrain`: flags → [`lora_train::PretrainJob`] → [`lora_train::pretrain`], with a bar per epoch.

use anyhow::{Context, Result};
use lora_train::{evaluate, Event, ExpensiveNet, PretrainJob, TrainConfig, TrainStats};
use serde_json::json;

use crate::cli::PretrainArgs;
use crate::common::{check_outputs, print_eval, write_json, Data, Out};
use crate::progress::EpochBars;

/// Runs a pre-training job with a progress bar per epoch (rank 0's; the other ranks of a data-parallel
/// run print nothing).
pub(crate) fn run_job(data: &Data, job: &PretrainJob) -> Result<(ExpensiveNet, TrainStats)> {
    let root = job.group.is_root();
    if let Some(p) = job.checkpoint.resume.as_ref().filter(|_| root) {
        println!("Resuming pre-training from {}", p.display());
    }
    let mut bars = EpochBars::new("Training", job.train.epochs);
    let done = lora_train::pretrain(&data.train, job, |e| {
        if let Event::Step(s) = e {
            if root {
                bars.step(s)
            }
        }
    });
    bars.finish();
    done.with_context(|| format!("pre-training {}", job.out.display()))
}

pub fn run(a: PretrainArgs) -> Result<()> {
    let group = crate::dist::group();
    if group.is_root() {
        check_outputs(&[
            ("--out", Some(&a.out), Out::File),
            ("--json", a.json.as_deref(), Out::File),
            ("--report", a.report.report.as_deref(), Out::Dir),
            ("--checkpoint", a.checkpoint.checkpoint.as_deref(), Out::File),
        ])?;
    }
    let train = TrainConfig {
        epochs: a.epochs as usize,
        batch_size: a.batch_size as usize,
        lr: a.lr,
        max_steps: None,
        seed: a.seed,
        loraplus_lr_ratio: None,
    };
    train.validate()?;
    let data = Data::load(&a.data.data)?;
    let job = PretrainJob {
        hidden: (a.net.hidden1 as usize, a.net.hidden2 as usize),
        classes: 10,
        train,
        out: a.out.clone(),
        checkpoint: a.checkpoint.policy(&a.out),
        group,
    };
    let (net, stats) = run_job(&data, &job)?;
    if !job.group.is_root() {
        return Ok(()); // rank 0 evaluates, prints and writes
    }
    let bytes = std::fs::metadata(&a.out).with_context(|| format!("reading back {}", a.out.display()))?.len();
    let e = evaluate(&net, &data.test, 1000)?;
    print_eval("Pre-trained network on the test set:", &e);
    println!("Saved {} ({bytes} bytes) after {} steps in {:.1} s", a.out.display(), stats.steps, stats.seconds);
    let summary = json!({"epochs": job.train.epochs, "steps": stats.steps, "seconds": stats.seconds,
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
