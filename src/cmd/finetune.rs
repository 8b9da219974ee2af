//! `lora finetune`: train a LoRA adapter on one digit on top of a saved model; write it in PEFT format.

use anyhow::Result;
use lora::{LoraConfig, SaveOptions, Scaling};
use lora_train::{evaluate, TrainConfig};
use serde_json::json;

use crate::cli::FinetuneArgs;
use crate::common::{
    check_input_size, check_outputs, dir_bytes, finetune_digit, fingerprint, load_model, print_wrong_table, worst_digit, write_json, Data,
    FinetuneJob, Out,
};
use lora_train::checkpoint;

/// Name of the adapter inside the model while training (PEFT's default).
const NAME: &str = "default";

pub fn run(a: FinetuneArgs) -> Result<()> {
    check_outputs(&[
        ("--out", Some(&a.out), Out::Dir),
        ("--json", a.json.as_deref(), Out::File),
        ("--report", a.report.report.as_deref(), Out::Dir),
        ("--checkpoint-dir", a.checkpoint.checkpoint_dir.as_deref(), Out::Dir),
    ])?;
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
    let tcfg = TrainConfig {
        epochs: usize::MAX,
        batch_size: a.batch_size as usize,
        lr: a.lr,
        max_steps: Some(a.steps as usize),
        seed: a.seed,
        loraplus_lr_ratio: a.loraplus_lr_ratio,
    };
    tcfg.validate()?;
    let mut net = load_model(&a.model)?;
    let fp = fingerprint(&net)?;
    let data = Data::load(&a.data.data)?;
    check_input_size(&net, &a.model, &data)?;
    let before = evaluate(&net, &data.test, 1000)?;
    let digit = a.digit.unwrap_or_else(|| worst_digit(&before));
    let settings = json!({"base_sha256": fp, "digit": digit, "rank": lcfg.r, "alpha": lcfg.alpha, "rslora": a.rslora,
        "dropout": a.dropout, "steps": a.steps, "batch_size": a.batch_size, "lr": a.lr, "seed": a.seed,
        "loraplus_lr_ratio": a.loraplus_lr_ratio, "use_dora": lcfg.use_dora, "lora_bias": lcfg.lora_bias,
        "target_modules": a.target_modules, "bias": format!("{:?}", lcfg.bias), "modules_to_save": lcfg.modules_to_save,
        "init": lcfg.init.peft_value()});
    let resume = match &a.checkpoint.resume {
        Some(dir) => {
            let l = checkpoint::load(dir, "finetune", &settings)?;
            println!("Resuming from {} at step {}", dir.display(), l.checkpoint.global_step);
            Some(l)
        }
        None => None,
    };
    let ck_dir = a.checkpoint.checkpoint_dir.clone().unwrap_or_else(|| checkpoint::default_dir(&a.out));
    let every = a.checkpoint.checkpoint_every.map(|n| (n as usize, ck_dir.as_path(), &settings));
    let job = FinetuneJob { name: NAME, lcfg: &lcfg, digit, train: &tcfg, seed: a.seed, resume: resume.as_ref(), every };
    let ft = finetune_digit(&mut net, &data, job)?;
    let save = SaveOptions {
        base_model_name_or_path: Some(a.model.display().to_string()),
        base_fingerprint: Some(fp.clone()),
        metadata: [("lora_rs.digit".to_string(), digit.to_string())].into(),
        task_type: None,
        convert_to_lora: a.variant.convert_to_lora,
    };
    net.model.save_adapter(NAME, &a.out, &save)?;
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
