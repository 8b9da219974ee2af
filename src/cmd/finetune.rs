//! `lora finetune`: flags → [`lora_train::FinetuneJob`] → [`lora_train::finetune`] on one digit's images;
//! the adapter is written in PEFT's format.

use anyhow::{Context, Result};
use lora::{LoraConfig, Scaling};
use lora_train::{evaluate, Event, ExpensiveNet, FinetuneJob, Finetuned, TrainConfig};
use serde_json::json;

use crate::cli::FinetuneArgs;
use crate::common::{check_input_size, check_outputs, dir_bytes, load_model, print_wrong_table, worst_digit, write_json, Data, Out};
use crate::progress::EpochBars;

/// Name of the adapter inside the model while training (PEFT's default).
const NAME: &str = "default";

/// Runs a fine-tuning job on the training images of `job.class` with a bar per epoch, after the line it
/// prints when training starts.
pub(crate) fn run_job(net: &mut ExpensiveNet, data: &Data, job: &FinetuneJob) -> Result<Finetuned> {
    let digit = data.train_digit(job.class)?;
    let root = job.group.is_root();
    if let Some(p) = job.checkpoint.resume.as_ref().filter(|_| root) {
        println!("Resuming fine-tuning from {}", p.display());
    }
    let mut bars = EpochBars::new("Training", 1);
    let (c, class) = (&job.lora, job.class);
    let done = lora_train::finetune(net, &digit, job, |e| match e {
        _ if !root => {}
        Event::Start { examples, trainable, epochs, .. } => {
            println!(
                "\nFine-tuning LoRA (rank {}, alpha {}) on digit {class}: {examples} training images, {trainable} trainable parameters",
                c.r, c.alpha
            );
            bars = EpochBars::new("Training", epochs);
        }
        Event::Step(s) => bars.step(s),
    });
    bars.finish();
    done.with_context(|| format!("fine-tuning on digit {} into {}", job.class, job.out.display()))
}

pub fn run(a: FinetuneArgs) -> Result<()> {
    let group = crate::dist::group();
    if group.is_root() {
        check_outputs(&[
            ("--out", Some(&a.out), Out::Dir),
            ("--json", a.json.as_deref(), Out::File),
            ("--report", a.report.report.as_deref(), Out::Dir),
            ("--checkpoint", a.checkpoint.checkpoint.as_deref(), Out::File),
        ])?;
    }
    let lcfg = LoraConfig {
        r: a.lora.rank as usize,
        alpha: a.lora.alpha,
        dropout: a.dropout,
        scaling: if a.rslora { Scaling::RankStabilized } else { Scaling::Standard },
        target_modules: a.target_modules.iter().map(|s| s.trim().to_string()).collect(),
        ..LoraConfig::default()
    };
    let lcfg = a.variant.apply(lcfg, lora::Init::Normal);
    lcfg.validate()?;
    let train = TrainConfig {
        epochs: usize::MAX,
        batch_size: a.batch_size as usize,
        lr: a.lr,
        max_steps: Some(a.steps as usize),
        seed: a.seed,
        loraplus_lr_ratio: a.loraplus_lr_ratio,
    };
    train.validate()?;
    let mut net = load_model(&a.model)?;
    let data = Data::load(&a.data.data)?;
    check_input_size(&net, &a.model, &data)?;
    let before = evaluate(&net, &data.test, 1000)?;
    let digit = a.digit.unwrap_or_else(|| worst_digit(&before));
    let job = FinetuneJob {
        name: NAME.into(),
        lora: lcfg,
        class: digit,
        train,
        out: a.out.clone(),
        base_model: Some(a.model.display().to_string()),
        convert_to_lora: a.variant.convert_to_lora,
        checkpoint: a.checkpoint.policy(&a.out),
        group,
    };
    let ft = run_job(&mut net, &data, &job)?;
    if !job.group.is_root() {
        return Ok(()); // rank 0 evaluates, prints and writes
    }
    let after = evaluate(&net, &data.test, 1000)?;
    println!("\nWrong answers per digit (test set):");
    print_wrong_table(&[("base", &before), ("adapter", &after)]);
    let bytes = dir_bytes(&a.out)?;
    println!(
        "\nDigit {digit}: {} wrong before, {} with the adapter. Wrote {}/ ({bytes} bytes, {} parameters) in {:.1} s of training.",
        before.wrong[digit as usize],
        after.wrong[digit as usize],
        a.out.display(),
        ft.trainable,
        ft.stats.seconds
    );
    let lcfg = &job.lora;
    let summary = json!({"model": a.model, "adapter": a.out, "adapter_bytes": bytes, "digit": digit, "steps": ft.stats.steps,
                "rank": lcfg.r, "alpha": lcfg.alpha, "use_rslora": a.rslora, "trainable_params": ft.trainable, "seconds": ft.stats.seconds,
                "before": {"accuracy": before.accuracy, "wrong": before.wrong}, "after": {"accuracy": after.accuracy, "wrong": after.wrong}});
    if let Some(j) = &a.json {
        write_json(j, &summary)?;
    }
    if let Some(dir) = &a.report.report {
        let run = crate::report_dir::FinetuneRun {
            args: &a,
            data: &data,
            net: &net,
            digit,
            stats: &ft.stats,
            before: &before,
            after: &after,
            summary: &summary,
        };
        crate::report_dir::finetune(dir, run)?;
    }
    Ok(())
}
