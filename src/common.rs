//! Helpers shared by the commands: data loading, model files, tables, JSON output.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::Device;
use lora::io::write_atomic;
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

/// Loads a network saved by [`ExpensiveNet::save`] (or by PyTorch with the same names).
/// A directory is never an MNIST model: the error says what it is and which command takes it.
pub fn load_model(path: &Path) -> Result<ExpensiveNet> {
    if path.is_dir() {
        if path.join(lora_lm::hf::CONFIG_FILE).is_file() {
            anyhow::bail!(
                "{}: is a language-model directory (it holds config.json), not an MNIST model file; the `lora lm` commands \
                 take it (lora lm eval --model {0} --data FILE, lora lm finetune, lora lm generate)",
                path.display()
            );
        }
        if path.join(lora::adapter::CONFIG_FILE).is_file() {
            anyhow::bail!(
                "{}: is an adapter directory (it holds adapter_config.json), not a model; give the base model file as --model \
                 and this folder as --adapter NAME={0}",
                path.display()
            );
        }
        anyhow::bail!("{}: is a directory; an MNIST model is a .safetensors file (lora pretrain --out FILE writes one)", path.display());
    }
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

/// Checks the model's input size against the data's image size, and its outputs against the classes.
pub fn check_input_size(net: &ExpensiveNet, model: &Path, data: &Data) -> Result<()> {
    let [inputs, .., outputs] = net.sizes()?;
    let classes = data.raw.train.labels.iter().chain(&data.raw.test.labels).max().map_or(0, |&l| l as usize + 1);
    anyhow::ensure!(
        outputs >= classes,
        "{}: the model has {outputs} outputs but the data's labels go up to {} ({classes} classes)",
        model.display(),
        classes.saturating_sub(1)
    );
    anyhow::ensure!(
        inputs == data.raw.test.pixels(),
        "{}: model takes {inputs} inputs but the images have {} pixels",
        model.display(),
        data.raw.test.pixels()
    );
    Ok(())
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
/// must go). `outs` holds (flag, path, kind); `None` paths are skipped. The paths are then claimed for the
/// run ([`crate::outputs::claim`]): those that do not exist yet are removed if the run does not finish
/// (checkpoints excepted: they exist to outlive an unfinished run).
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
    crate::outputs::claim(outs.iter().filter(|(flag, _, _)| !flag.starts_with("--checkpoint")).filter_map(|(_, p, _)| *p));
    Ok(())
}
