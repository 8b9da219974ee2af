//! Helpers shared by the commands: data loading, model files, tables, JSON output.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::Device;
use lora::io::{save_safetensors, write_atomic};
use lora_train::{Dataset, Evaluation, ExpensiveNet};
use mnist::Mnist;

use crate::json_report::{LayerParams, Params};

/// MNIST loaded, its statistics, and both splits normalised into tensors.
pub struct Data {
    pub raw: Mnist,
    pub mean: f64,
    pub std: f64,
    pub train: Dataset,
    pub test: Dataset,
}

impl Data {
    pub fn load(dir: &Path) -> Result<Data> {
        let raw = Mnist::load(dir).with_context(|| format!("loading MNIST from {}", dir.display()))?;
        let (mean, std) = mnist::mean_std(&raw.train.images);
        let px = raw.train.pixels();
        let train = Dataset::new(mnist::normalize(&raw.train.images, mean, std), &raw.train.labels, px, &Device::Cpu)?;
        let test = Dataset::new(mnist::normalize(&raw.test.images, mean, std), &raw.test.labels, px, &Device::Cpu)?;
        Ok(Data { raw, mean, std, train, test })
    }

    /// The training images of one digit, normalised with the training set's statistics.
    pub fn train_digit(&self, digit: u8) -> Result<Dataset> {
        let s = self.raw.train.only_digit(digit);
        Ok(Dataset::new(mnist::normalize(&s.images, self.mean, self.std), &s.labels, s.pixels(), &Device::Cpu)?)
    }
}

/// Saves the network's base tensors (PyTorch state_dict names) atomically.
pub fn save_model(net: &ExpensiveNet, path: &Path) -> Result<u64> {
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let state = net.model.base_state()?;
    save_safetensors(path, &state, &meta)?;
    Ok(std::fs::metadata(path)?.len())
}

/// Loads a network saved by [`save_model`] (or by PyTorch with the same names).
pub fn load_model(path: &Path) -> Result<ExpensiveNet> {
    Ok(ExpensiveNet::load(path)?)
}

/// Writes `value` as pretty JSON, atomically.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut s = serde_json::to_string_pretty(value)?;
    s.push('\n');
    write_atomic(path, s.as_bytes())?;
    Ok(())
}

/// Per-layer shapes and totals for the network with an adapter of rank `r` on every layer.
pub fn param_counts(net: &ExpensiveNet, r: usize) -> Result<Params> {
    let mut layers = Vec::new();
    let mut lora = 0;
    for (name, l) in net.model.layers() {
        let (o, i) = (l.out_features(), l.in_features());
        lora += r * (i + o);
        layers.push(LayerParams { name: name.to_string(), weight: vec![o, i], bias: vec![o], lora_a: vec![r, i], lora_b: vec![o, r] });
    }
    let base = net.model.num_base_params();
    Ok(Params { base, lora, percent: 100.0 * lora as f64 / base as f64, layers })
}

pub fn print_params(p: &Params) {
    println!("{:<8} {:>14} {:>8} {:>10} {:>10}", "layer", "weight", "bias", "lora_A", "lora_B");
    for l in &p.layers {
        let s = |v: &[usize]| format!("{v:?}");
        println!("{:<8} {:>14} {:>8} {:>10} {:>10}", l.name, s(&l.weight), s(&l.bias), s(&l.lora_a), s(&l.lora_b));
    }
    println!("Total parameters (original): {}", group(p.base));
    println!("Parameters added by LoRA:    {}  (+{:.3}%)", group(p.lora), p.percent);
}

/// 2807010 → "2,807,010" (one implementation, shared with the report pages).
pub use lora_viz::group;

/// The seed's test printout: accuracy to 3 places, then the wrong count per digit.
pub fn print_eval(title: &str, e: &Evaluation) {
    println!("{title}");
    println!("Accuracy: {:.3}", e.accuracy);
    for (d, w) in e.wrong.iter().enumerate() {
        println!("  Number {d} wrong count: {w}");
    }
}

/// Wrong counts per digit, one column per model.
pub fn print_wrong_table(columns: &[(&str, &Evaluation)]) {
    print!("{:<6}", "digit");
    for (n, _) in columns {
        print!(" {n:>12}");
    }
    println!();
    let classes = columns.first().map_or(0, |(_, e)| e.wrong.len());
    for d in 0..classes {
        print!("{d:<6}");
        for (_, e) in columns {
            print!(" {:>12}", e.wrong[d]);
        }
        println!();
    }
    print!("{:<6}", "acc");
    for (_, e) in columns {
        print!(" {:>12.4}", e.accuracy);
    }
    println!();
}

/// SHA-256 fingerprint of a network's base tensors (what adapters record as `lora_rs.base_sha256`).
pub fn fingerprint(net: &ExpensiveNet) -> Result<String> {
    Ok(lora::io::fingerprint(&net.model.base_state()?)?)
}

/// The digit with the most wrong answers (the lowest such digit on ties).
pub fn worst_digit(e: &Evaluation) -> u8 {
    e.wrong.iter().enumerate().max_by_key(|(d, w)| (**w, std::cmp::Reverse(*d))).map_or(0, |(d, _)| d as u8)
}

/// Checks the model's input size against the data's image size.
pub fn check_input_size(net: &ExpensiveNet, model: &Path, data: &Data) -> Result<()> {
    let inputs = net.sizes()?[0];
    anyhow::ensure!(
        inputs == data.raw.test.pixels(),
        "{}: model takes {inputs} inputs but the images have {} pixels",
        model.display(),
        data.raw.test.pixels()
    );
    Ok(())
}

/// What [`finetune_digit`] trained.
pub struct Finetuned {
    pub digit_images: usize,
    pub trainable: usize,
    pub stats: lora_train::TrainStats,
    pub steps_per_epoch: usize,
}

/// What [`finetune_digit`] trains: adapter `name` with config `lcfg` on the training images of `digit`.
pub struct FinetuneJob<'a> {
    pub name: &'a str,
    pub lcfg: &'a lora::LoraConfig,
    pub digit: u8,
    pub train: &'a lora_train::TrainConfig,
    pub seed: u64,
    /// Continue from this checkpoint.
    pub resume: Option<&'a lora_train::checkpoint::Loaded>,
    /// Checkpoint every N steps into a directory, recording these settings.
    pub every: Option<(usize, &'a Path, &'a serde_json::Value)>,
}

/// Adds the job's adapter to every layer, freezes the base, and trains only A and B on the training
/// images of the job's digit with a progress bar.
pub fn finetune_digit(net: &mut ExpensiveNet, data: &Data, job: FinetuneJob) -> Result<Finetuned> {
    let FinetuneJob { name, lcfg, digit, train: train_cfg, seed, resume, every } = job;
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(1));
    net.model.add_adapter(name, lcfg, &mut rng)?;
    if let Some(l) = resume {
        for (module, layer) in net.model.layers() {
            for (which, var) in layer.adapter_vars(name) {
                let t = l
                    .tensor("adapter", &format!("{module}.{which}"))
                    .with_context(|| format!("{}: missing tensor adapter.{module}.{which}", l.file.path.display()))?;
                anyhow::ensure!(
                    t.dims() == var.dims(),
                    "{}: adapter.{module}.{which} has shape {:?}, expected {:?}",
                    l.file.path.display(),
                    t.dims(),
                    var.dims()
                );
                var.set(&t)?;
            }
        }
    }
    net.model.set_active(&[name])?;
    net.model.freeze_base(lora::Bias::None); // trained biases are the adapter's own copies
    for (i, (_, l)) in net.model.layers().enumerate() {
        l.seed_dropout(seed.wrapping_add(100 + i as u64));
    }
    let trainable: usize = net.model.trainable_vars().iter().map(|v| v.elem_count()).sum();
    let digit_data = data.train_digit(digit)?;
    println!(
        "\nFine-tuning LoRA (rank {}, alpha {}) on digit {digit}: {} training images, {} trainable parameters",
        lcfg.r,
        lcfg.alpha,
        digit_data.len(),
        trainable
    );
    let steps_per_epoch = train_cfg.steps_per_epoch(digit_data.len());
    let total = train_cfg.max_steps.unwrap_or(steps_per_epoch * train_cfg.epochs);
    let mut bars = crate::progress::EpochBars::new("Training", total.div_ceil(steps_per_epoch));
    let net_ref: &ExpensiveNet = net;
    let mut save = |ck: &lora_train::Checkpoint| -> lora_train::Result<()> {
        let (_, dir, settings) = every.expect("only called when checkpointing");
        lora_train::checkpoint::save(dir, "finetune", net_ref, Some(name), settings, ck)
            .map_err(|e| lora_train::TrainError::Model { path: dir.display().to_string(), why: format!("{e:#}") })
    };
    let ck = every.map(|(n, _, _)| lora_train::Checkpointing { every: n, save: &mut save });
    let stats = lora_train::train_with(net_ref, &digit_data, train_cfg, resume.map(|l| &l.checkpoint), ck, |s| bars.step(s))?;
    bars.finish();
    Ok(Finetuned { digit_images: digit_data.len(), trainable, stats, steps_per_epoch })
}

/// Total bytes of the regular files directly inside `dir`.
pub fn dir_bytes(dir: &Path) -> Result<u64> {
    let mut n = 0;
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let m = e?.metadata()?;
        if m.is_file() {
            n += m.len();
        }
    }
    Ok(n)
}

/// What an output path must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Out {
    /// A file (created or replaced).
    File,
    /// A directory (created if missing).
    Dir,
}

/// Checks output paths before any work starts, so a long run never ends in "File exists": each path
/// must be creatable as its kind (no existing path of the other kind, no file where a parent directory
/// must go). `outs` holds (flag, path, kind); `None` paths are skipped.
pub fn check_outputs(outs: &[(&str, Option<&Path>, Out)]) -> Result<()> {
    for (flag, path, kind) in outs {
        let Some(p) = path else { continue };
        match kind {
            Out::File if p.is_dir() => anyhow::bail!("{flag} {}: is a directory; give a file path", p.display()),
            Out::Dir if p.exists() && !p.is_dir() => anyhow::bail!("{flag} {}: exists and is not a directory", p.display()),
            _ => {}
        }
        for anc in p.ancestors().skip(1) {
            if anc.as_os_str().is_empty() {
                break;
            }
            if anc.exists() {
                if !anc.is_dir() {
                    anyhow::bail!("{flag} {}: {} is a file, not a directory", p.display(), anc.display());
                }
                break;
            }
        }
    }
    Ok(())
}
