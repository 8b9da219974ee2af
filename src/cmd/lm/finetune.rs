//! `lora lm finetune`: a LoRA adapter trained on one corpus over a frozen base, written as a PEFT
//! adapter directory; the base is proven bit-for-bit unchanged.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use lora::{Exclude, Init, LoraConfig, Scaling, Targets};
use lora_lm::data::Corpus;
use lora_lm::hf::{load_model, load_tokenizer, save_adapter};
use lora_lm::train::{TrainSettings, Trainer};
use lora_lm::Llama;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::{json, Value};

use super::pretrain::{mixture, settings, train_with_bar};
use super::{check_out_dir, checkpoint_path};
use crate::common::{check_outputs, write_json, Out};
use crate::lm_cli::{LmCheckpointArgs, LmFinetuneArgs, LmLoraArgs};

/// The adapter config of the LoRA flags.
pub fn lora_config(l: &LmLoraArgs) -> Result<LoraConfig> {
    let c = LoraConfig {
        dropout: l.dropout,
        scaling: if l.rslora { Scaling::RankStabilized } else { Scaling::Standard },
        init: Init::PeftGaussian,
        target_modules: match (&l.target_regex, l.target_modules.as_slice()) {
            (Some(r), _) => Targets::Regex(r.clone()),
            (None, [one]) if one.trim().eq_ignore_ascii_case("all-linear") => Targets::AllLinear,
            (None, names) => names.iter().map(|s| s.trim().to_string()).collect(),
        },
        exclude_modules: (!l.exclude_modules.is_empty())
            .then(|| Exclude::Names(l.exclude_modules.iter().map(|s| s.trim().to_string()).collect())),
        layers_to_transform: l.layers_to_transform.clone(),
        ..LoraConfig::new(l.rank as usize, l.alpha)
    };
    let c = l.variant.apply(c, Init::PeftGaussian);
    c.validate()?;
    Ok(c)
}

/// What a fine-tune did.
pub struct Finetuned {
    pub trainer: Trainer,
    pub summary: Value,
}

/// Adds adapter `name` to the (frozen) base, trains it on `data`, proves the base unchanged and writes
/// the adapter to `out`. The adapter stays loaded (inactive) on the model.
#[allow(clippy::too_many_arguments)]
pub fn finetune(
    model: &mut Llama,
    base_dir: &Path,
    name: &str,
    data: &Corpus,
    config: &LoraConfig,
    s: TrainSettings,
    ck: &LmCheckpointArgs,
    out: &Path,
    convert: bool,
) -> Result<Finetuned> {
    let before = model.base_state()?;
    model.lora_mut().add_adapter(name, config, &mut StdRng::seed_from_u64(s.seed.wrapping_add(1)))?;
    model.lora_mut().set_active(&[name])?;
    model.freeze_base();
    let tok = load_tokenizer(base_dir, model.config())?;
    let mix = mixture(&[(data, 1.0)], &tok)?;
    let trainable: usize = model.trainable_vars().iter().map(|(_, v)| v.elem_count()).sum();
    println!(
        "Fine-tuning adapter {name:?} (rank {}, alpha {}) on {}: {} trainable parameters ({:.2}% of {}), {} steps",
        config.r,
        config.alpha,
        data.path.display(),
        trainable,
        100.0 * trainable as f64 / model.num_params() as f64,
        model.num_params(),
        s.steps
    );
    let trainer = train_with_bar(&format!("Fine-tuning {name}"), model, &mix, s.clone(), ck, &checkpoint_path(out))?;
    let after = model.base_state()?;
    let mut unchanged = before.len() == after.len();
    for ((n1, a), (n2, b)) in before.iter().zip(&after) {
        unchanged &= n1 == n2 && bits(a)? == bits(b)?;
    }
    anyhow::ensure!(unchanged, "the base weights changed during fine-tuning (this is a bug: the base must stay frozen)");
    let fp_after = model.fingerprint()?;
    let meta = BTreeMap::from([
        ("lora_rs.data".to_string(), data.path.display().to_string()),
        ("lora_rs.steps".to_string(), trainer.step().to_string()),
    ]);
    save_adapter(model, name, out, Some(base_dir.display().to_string()), meta, convert)
        .with_context(|| format!("writing the adapter to {}", out.display()))?;
    let ckpt = checkpoint_path(out);
    if ckpt.exists() {
        std::fs::remove_file(&ckpt).with_context(|| format!("removing the finished run's checkpoint {}", ckpt.display()))?;
    }
    model.lora_mut().set_active(&[])?;
    println!("  base weights bit-for-bit unchanged: {unchanged} (SHA-256 {} before and after)", &fp_after[..16]);
    let summary = json!({
        "adapter": name,
        "data": data.path.display().to_string(),
        "rank": config.r,
        "alpha": config.alpha,
        "trainable_params": trainable,
        "steps": trainer.step(),
        "tokens": trainer.step() * s.batch_size * s.seq_len,
        "seconds": (trainer.seconds() * 1000.0).round() / 1000.0,
        "final_loss": trainer.losses.last().map_or(f64::NAN, |l| l.1),
        "base_unchanged": unchanged,
        "out": out.display().to_string(),
    });
    Ok(Finetuned { trainer, summary })
}

fn bits(t: &candle_core::Tensor) -> Result<Vec<u32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().map(|x| x.to_bits()).collect())
}

pub fn run(a: LmFinetuneArgs) -> Result<()> {
    if a.checkpoint.resume.is_none() {
        check_out_dir(&a.out, &[lora::adapter::CONFIG_FILE, lora::adapter::WEIGHTS_FILE])?;
    }
    check_outputs(&[("--json", a.json.as_deref(), Out::File), ("--report", a.report.report.as_deref(), Out::Dir)])?;
    let config = lora_config(&a.lora)?;
    let s = lora_lm::train::TrainSettings { loraplus_lr_ratio: a.loraplus_lr_ratio, ..settings(&a.train, a.steps, a.lr, 0.0) };
    let (mut model, _) = load_model(&a.model).with_context(|| format!("loading the model {}", a.model.display()))?;
    // Fail before the work: the data must read and the targets must exist.
    let data = super::corpus(&a.data)?;
    model.lora().targeted(&config).context("--target-modules / --target-regex / --exclude-modules / --layers-to-transform")?;
    let name = "adapter";
    let f = finetune(&mut model, &a.model, name, &data, &config, s, &a.checkpoint, &a.out, a.lora.variant.convert_to_lora)?;
    println!(
        "Final loss {:.4} after {} steps ({:.1} s); wrote {}",
        f.summary["final_loss"].as_f64().unwrap_or(f64::NAN),
        f.trainer.step(),
        f.trainer.seconds(),
        a.out.display()
    );
    if let Some(p) = &a.json {
        write_json(p, &f.summary)?;
    }
    if let Some(dir) = &a.report.report {
        super::report_dir::training(dir, "lora lm finetune", &[("fine-tuning", &f.trainer)], &[], &f.summary)?;
    }
    Ok(())
}
