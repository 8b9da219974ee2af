//! `lora demo`: the seed tutorial end to end.

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use lora::{LoraConfig, SaveOptions};
use lora_train::{evaluate, Evaluation, ExpensiveNet, TrainConfig};

use crate::cli::DemoArgs;
use crate::cmd::pretrain::pretrain;
use crate::common::{
    dir_bytes, finetune_digit, param_counts, print_eval, print_params, print_wrong_table, save_model, worst_digit, write_json, Data,
    FinetuneJob,
};
use crate::report::*;

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
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;

    // 1. Data.
    let data = Data::load(&a.data.data)?;
    println!("MNIST: {} training and {} test images; mean {:.4}, std {:.4}", data.train.len(), data.test.len(), data.mean, data.std);

    // 2-3. Model and pre-training.
    let mut net = ExpensiveNet::new(data.raw.train.pixels(), a.net.hidden1 as usize, a.net.hidden2 as usize, 10, a.seed, &Device::Cpu)?;
    let pcfg =
        TrainConfig { epochs: a.epochs as usize, batch_size: a.pretrain_batch_size as usize, lr: 1e-3, max_steps: None, seed: a.seed };
    let pstats = pretrain(&net, &data, &pcfg)?;
    let base_path = a.out.join("base.safetensors");
    let base_bytes = save_model(&net, &base_path)?;

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
    let fcfg =
        TrainConfig { epochs: usize::MAX, batch_size: a.batch_size as usize, lr: 1e-3, max_steps: Some(a.steps as usize), seed: a.seed };
    let job = FinetuneJob { name: ADAPTER, lcfg: &lcfg, digit, train: &fcfg, seed: a.seed, resume: None, every: None };
    let ft = finetune_digit(&mut net, &data, job)?;
    anyhow::ensure!(net.model.num_base_params() == params.base, "non-LoRA parameter count changed");
    let (fstats, trainable, steps_per_epoch) = (&ft.stats, ft.trainable, ft.steps_per_epoch);
    let adapter_dir = a.out.join("adapter");
    let save = SaveOptions {
        base_model_name_or_path: Some(base_path.display().to_string()),
        base_fingerprint: Some(lora::io::fingerprint(&original)?),
        metadata: [("lora_rs.digit".to_string(), digit.to_string())].into(),
    };
    net.model.save_adapter(ADAPTER, &adapter_dir, &save)?;

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
            digit_train_images: ft.digit_images,
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
        let run = crate::viz::DemoRun {
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
        crate::viz::demo(dir, run)?;
    }
    anyhow::ensure!(base_unchanged, "the base network changed during LoRA fine-tuning");
    Ok(())
}

/// Mean loss of the last (possibly partial) epoch.
fn avg_last_epoch(losses: &[f32], per_epoch: usize) -> f32 {
    let n = losses.len() % per_epoch.max(1);
    let tail = if n == 0 { per_epoch.min(losses.len()) } else { n };
    let s = &losses[losses.len() - tail..];
    s.iter().sum::<f32>() / s.len().max(1) as f32
}
