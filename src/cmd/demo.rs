//! `lora demo`: the seed tutorial end to end.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use lora::LoraConfig;
use lora_train::{evaluate, Evaluation, ExpensiveNet, TrainConfig, TrainStats};
use serde_json::{json, Value};

use crate::cli::DemoArgs;
use crate::common::{
    check_outputs, dir_bytes, fingerprint, load_model, param_counts, print_eval, print_params, print_wrong_table, worst_digit, write_json,
    Data, Out,
};
use crate::json_report::*;
use lora_optim::checkpoint::Checkpointing;
use lora_train::{FinetuneJob, PretrainJob};

/// The adapter's name (PEFT's default).
pub const ADAPTER: &str = "default";

fn bits(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().map(|x| x.to_bits()).collect())
}

fn to_eval(e: &Evaluation) -> EvalReport {
    EvalReport { accuracy: e.accuracy, wrong: e.wrong.clone() }
}

pub fn run(a: DemoArgs) -> Result<()> {
    let started = std::time::Instant::now();
    let lcfg = LoraConfig::new(a.lora.rank as usize, a.lora.alpha);
    lcfg.validate()?;
    check_outputs(&[
        ("--out", Some(&a.out), Out::Dir),
        ("--json", a.json.as_deref(), Out::File),
        ("--report", a.report.report.as_deref(), Out::Dir),
        ("--checkpoint-dir", a.checkpoint.checkpoint_dir.as_deref(), Out::Dir),
    ])?;
    // A re-run into an earlier run's folder: its files are replaced only when complete (each atomically).
    crate::outputs::claim([a.out.join("base.safetensors"), a.out.join("adapter"), a.out.join("report.json")].iter().map(|p| p.as_path()));
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;

    // 1. Data.
    let data = Data::load(&a.data.data)?;
    println!("MNIST: {} training and {} test images; mean {:.4}, std {:.4}", data.train.len(), data.test.len(), data.mean, data.std);

    // 2-3. Model and pre-training (resumable: see `pretrain_phase`).
    let pcfg = TrainConfig {
        epochs: a.epochs as usize,
        batch_size: a.pretrain_batch_size as usize,
        lr: 1e-3,
        max_steps: None,
        seed: a.seed,
        loraplus_lr_ratio: None,
    };
    let base_path = a.out.join("base.safetensors");
    let ck_root = a.checkpoint.checkpoint_dir.clone().unwrap_or_else(|| a.out.join("checkpoint"));
    let (mut net, pstats) = pretrain_phase(&a, &data, &pcfg, &base_path, &ck_root)?;
    let base_bytes = std::fs::metadata(&base_path)?.len();

    // Keep a copy of the original weights, to prove later that LoRA does not touch them.
    let original = net.model.base_state()?;

    // 4. Evaluate.
    let pre = evaluate(&net, &data.test, 1000)?;
    print_eval("\nPre-trained network:", &pre);

    // 5. Parameters.
    let params = param_counts(&net, a.lora.rank as usize)?;
    println!();
    print_params(&params);

    // 6-7. LoRA on every linear layer, base frozen; fine-tune on the worst digit.
    let digit = a.digit.unwrap_or_else(|| worst_digit(&pre));
    let fcfg = TrainConfig {
        epochs: usize::MAX,
        batch_size: a.batch_size as usize,
        lr: 1e-3,
        max_steps: Some(a.steps as usize),
        seed: a.seed,
        loraplus_lr_ratio: None,
    };
    let ft_ckpt = ck_root.join(FINETUNE_CKPT);
    let ft_resume = a.checkpoint.resume.as_ref().map(|root| root.join(FINETUNE_CKPT)).filter(|p| p.exists());
    let adapter_dir = a.out.join("adapter");
    let job = FinetuneJob {
        name: ADAPTER.into(),
        lora: lcfg.clone(),
        class: digit,
        train: fcfg.clone(),
        out: adapter_dir.clone(),
        base_model: Some(base_path.display().to_string()),
        convert_to_lora: false,
        checkpoint: Checkpointing { every: a.checkpoint.checkpoint_every.map(|n| n as usize), path: ft_ckpt, resume: ft_resume },
        group: Default::default(),
    };
    let ft = crate::cmd::finetune::run_job(&mut net, &data, &job)?;
    anyhow::ensure!(net.model.num_base_params() == params.base, "non-LoRA parameter count changed");
    let (fstats, trainable, steps_per_epoch) = (&ft.stats, ft.trainable, ft.steps_per_epoch);

    // 8. Prove the base is untouched.
    let after = net.model.base_state()?;
    let mut base_bits_equal = original.len() == after.len();
    for ((n0, t0), (n1, t1)) in original.iter().zip(&after) {
        base_bits_equal &= n0 == n1 && bits(t0)? == bits(t1)?;
    }
    let mut effective_exact = true;
    let mut max_err = Vec::new();
    for (name, layer) in net.model.layers() {
        let ad = layer.adapter(ADAPTER)?;
        let w0 = original.iter().find(|(n, _)| *n == format!("{name}.weight")).map(|(_, t)| t).context("missing weight copy")?;
        let want = (w0 + (ad.b().as_tensor().matmul(ad.a().as_tensor())? * ad.scale())?)?;
        let eff = layer.effective_weight()?;
        effective_exact &= bits(&eff)? == bits(&want)?;
        // Independent f64 check: W0 + s·Σ_k B[o,k]·A[k,i].
        let (w0v, av, bv) = (w0.to_vec2::<f32>()?, ad.a().to_vec2::<f32>()?, ad.b().to_vec2::<f32>()?);
        let ev = eff.to_vec2::<f32>()?;
        let mut m = 0f64;
        for (o, row) in ev.iter().enumerate() {
            for (i, &e) in row.iter().enumerate() {
                let ba: f64 = (0..ad.rank()).map(|k| bv[o][k] as f64 * av[k][i] as f64).sum();
                m = m.max((e as f64 - (w0v[o][i] as f64 + ad.scale() * ba)).abs());
            }
        }
        max_err.push(m);
    }
    let on = evaluate(&net, &data.test, 1000)?;
    let off = net.with_adapters_disabled(|n| evaluate(n, &data.test, 1000))??;
    let off_identical =
        bits(&Tensor::new(off.logits.as_slice(), &Device::Cpu)?)? == bits(&Tensor::new(pre.logits.as_slice(), &Device::Cpu)?)?;
    let base_unchanged = base_bits_equal && effective_exact && off_identical;
    println!("\nProof that fine-tuning left the base alone:");
    println!("  base weights and biases bit-for-bit equal to the copy taken before: {base_bits_equal}");
    println!(
        "  effective weight with LoRA on == W0 + scale·B·A exactly:            {effective_exact} (max |err| vs f64 reference: {:.2e})",
        max_err.iter().cloned().fold(0.0, f64::max)
    );
    println!("  LoRA off: all {} test logits bit-for-bit equal to the pre-trained network's: {off_identical}", off.logits.len());

    // 9. Compare.
    println!();
    print_eval("With LoRA enabled:", &on);
    println!();
    print_eval("With LoRA disabled:", &off);
    println!("\nWrong answers per digit (test set):");
    print_wrong_table(&[("pre-trained", &pre), ("LoRA on", &on), ("LoRA off", &off)]);
    println!("\nDigit {digit}: {} wrong before, {} with LoRA on.", pre.wrong[digit as usize], on.wrong[digit as usize]);

    let report = DemoReport {
        data: DataStats { train: data.train.len(), test: data.test.len(), mean: data.mean, std: data.std },
        params,
        pretrain: Pretrain {
            epochs: pcfg.epochs,
            batch_size: pcfg.batch_size,
            steps: pstats.steps,
            seconds: pstats.seconds,
            final_avg_loss: avg_last_epoch(&pstats.losses, pcfg.steps_per_epoch(data.train.len())),
            accuracy: pre.accuracy,
            wrong: pre.wrong.clone(),
        },
        finetune: Finetune {
            digit,
            digit_train_images: ft.examples,
            steps: fstats.steps,
            batch_size: fcfg.batch_size,
            rank: a.lora.rank as usize,
            alpha: a.lora.alpha,
            scale: lcfg.scale_for("linear1"),
            trainable_params: trainable,
            seconds: fstats.seconds,
            final_avg_loss: avg_last_epoch(&fstats.losses, steps_per_epoch),
        },
        base_unchanged,
        proof: Proof {
            base_bits_equal,
            effective_weight_exact: effective_exact,
            effective_weight_max_abs_err_f64: max_err,
            lora_off_logits_identical: off_identical,
        },
        lora_on: to_eval(&on),
        lora_off: to_eval(&off),
        seed: a.seed,
        files: Files {
            base: base_path.display().to_string(),
            base_bytes,
            adapter: adapter_dir.display().to_string(),
            adapter_bytes: dir_bytes(&adapter_dir)?,
        },
    };
    let json_path = a.json.clone().unwrap_or_else(|| a.out.join("report.json"));
    write_json(&json_path, &report)?;
    println!(
        "\nWrote {} ({} bytes), {}/ ({} bytes) and {}",
        base_path.display(),
        base_bytes,
        adapter_dir.display(),
        dir_bytes(&adapter_dir)?,
        json_path.display()
    );
    if let Some(dir) = &a.report.report {
        let total_seconds = started.elapsed().as_secs_f64();
        let (pretrain, finetune, json_path) = (&pstats, &fstats, json_path.as_path());
        let run = crate::report_dir::DemoRun {
            args: &a,
            data: &data,
            net: &net,
            report: &report,
            json_path,
            pretrain,
            finetune,
            pre: &pre,
            on: &on,
            off: &off,
            total_seconds,
        };
        crate::report_dir::demo(dir, run)?;
    }
    anyhow::ensure!(base_unchanged, "the base network changed during LoRA fine-tuning");
    Ok(())
}

/// Checkpoint files of the demo's two phases, inside its checkpoint folder.
const PRETRAIN_CKPT: &str = "pretrain.ckpt.safetensors";
const FINETUNE_CKPT: &str = "finetune.ckpt.safetensors";

/// Pre-training for the demo: fresh, or continued from `--resume ROOT` (ROOT/pretrain.ckpt.safetensors),
/// or skipped when ROOT/pretrain-done.json says it finished (the base is then read back from OUT). With
/// `--checkpoint-every`, checkpoints go to CK_ROOT/pretrain.ckpt.safetensors and the finished run is
/// recorded in CK_ROOT/pretrain-done.json, so a run killed during fine-tuning resumes without pre-training again.
fn pretrain_phase(a: &DemoArgs, data: &Data, cfg: &TrainConfig, base_path: &Path, ck_root: &Path) -> Result<(ExpensiveNet, TrainStats)> {
    let job = PretrainJob {
        hidden: (a.net.hidden1 as usize, a.net.hidden2 as usize),
        classes: 10,
        train: cfg.clone(),
        out: base_path.to_path_buf(),
        checkpoint: Checkpointing {
            every: a.checkpoint.checkpoint_every.map(|n| n as usize),
            path: ck_root.join(PRETRAIN_CKPT),
            resume: None,
        },
        group: Default::default(),
    };
    let settings = job.settings(&data.train);
    const DONE: &str = "pretrain-done.json";
    if let Some(root) = &a.checkpoint.resume {
        let done = root.join(DONE);
        if done.exists() {
            let v: Value = serde_json::from_slice(&std::fs::read(&done)?).with_context(|| format!("reading {}", done.display()))?;
            anyhow::ensure!(
                v["settings"] == settings,
                "{}: pre-training was run with other settings ({}); resume with the same flags",
                done.display(),
                v["settings"]
            );
            let net = load_model(base_path)?;
            anyhow::ensure!(
                v["base_sha256"] == fingerprint(&net)?.as_str(),
                "{}: does not hold the network pre-trained by this run ({})",
                base_path.display(),
                done.display()
            );
            let stats: TrainStats = TrainStats {
                steps: v["steps"].as_u64().unwrap_or(0) as usize,
                seconds: v["seconds"].as_f64().unwrap_or(0.0),
                losses: serde_json::from_value(v["losses"].clone())?,
                step_seconds: serde_json::from_value(v["step_seconds"].clone())?,
            };
            println!("Pre-training already finished ({} steps); base read back from {}", stats.steps, base_path.display());
            return Ok((net, stats));
        }
    }
    let resume = match &a.checkpoint.resume {
        Some(root) if root.join(PRETRAIN_CKPT).exists() => Some(root.join(PRETRAIN_CKPT)),
        Some(root) => anyhow::bail!("{}: nothing to resume (no {PRETRAIN_CKPT} or {FINETUNE_CKPT}, no {DONE})", root.display()),
        None => None,
    };
    let job = PretrainJob { checkpoint: Checkpointing { resume, ..job.checkpoint.clone() }, ..job };
    let (net, stats) = crate::cmd::pretrain::run_job(data, &job)?;
    if job.checkpoint.every.is_some() {
        let done = json!({"settings": settings, "base_sha256": fingerprint(&net)?, "steps": stats.steps, "seconds": stats.seconds,
            "losses": stats.losses, "step_seconds": stats.step_seconds});
        write_json(&ck_root.join(DONE), &done)?;
    }
    Ok((net, stats))
}

/// Mean loss of the last (possibly partial) epoch.
fn avg_last_epoch(losses: &[f32], per_epoch: usize) -> f32 {
    let n = losses.len() % per_epoch.max(1);
    let tail = if n == 0 { per_epoch.min(losses.len()) } else { n };
    let s = &losses[losses.len() - tail..];
    s.iter().sum::<f32>() / s.len().max(1) as f32
}
