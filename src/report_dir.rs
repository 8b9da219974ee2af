//! `--report DIR`: turns a command's results into `lora_viz` data and writes the pictures and report.html.
//! The helpers here (`loss`, `counts`, `matrix`, `net_graph`, …) are what a new command needs to add a
//! report in a few lines; `demo`, `pretrain` and `eval` below are the three users so far.

use std::path::Path;

use anyhow::{Context, Result};
use lora_train::{Evaluation, ExpensiveNet, TrainStats};
use lora_viz::{Check, Counts, FileInfo, GraphLayer, GraphLora, LayerCount, LossSeries, Matrix, NetGraph, RunReport, Table, Timing};
use serde_json::Value;

use crate::common::{group, Data};
use crate::json_report::{DemoReport, Params};

/// The command line as typed (program name shortened to `lora`).
pub fn command_line() -> String {
    let mut args: Vec<String> = std::env::args().collect();
    if let Some(first) = args.first_mut() {
        *first = "lora".into();
    }
    args.join(" ")
}

/// A training run's losses and per-step times.
pub fn loss(name: &str, stats: &TrainStats) -> Result<LossSeries> {
    Ok(LossSeries::new(name, &stats.losses, &stats.step_seconds)?)
}

/// Wrong answers per digit of one model, with its accuracy.
pub fn counts(name: &str, e: &Evaluation) -> Counts {
    Counts::new(name, e.wrong.clone(), Some(e.accuracy))
}

/// The confusion matrix of one model.
pub fn matrix(name: &str, e: &Evaluation) -> Matrix {
    Matrix { name: name.to_string(), cells: e.confusion.clone() }
}

/// Base and LoRA parameters per layer from the parameter table.
pub fn layer_counts(p: &Params) -> Vec<LayerCount> {
    let prod = |v: &[usize]| v.iter().product::<usize>();
    p.layers
        .iter()
        .map(|l| LayerCount { name: l.name.clone(), base: prod(&l.weight) + prod(&l.bias), lora: prod(&l.lora_a) + prod(&l.lora_b) })
        .collect()
}

/// The network as a graph; `lora` = (rank, alpha, scale) draws an adapter on every layer.
pub fn net_graph(net: &ExpensiveNet, lora: Option<(usize, f64, f64)>) -> NetGraph {
    let layers: Vec<(&str, &lora::LoraLinear)> = net.model.layers().collect();
    let last = layers.len().saturating_sub(1);
    NetGraph {
        title: "ExpensiveNet".into(),
        input: "image x (flattened)".into(),
        output: "logits".into(),
        layers: layers
            .iter()
            .enumerate()
            .map(|(i, (name, l))| GraphLayer {
                name: name.to_string(),
                in_features: l.in_features(),
                out_features: l.out_features(),
                bias: l.bias().is_some(),
                activation: (i < last).then(|| "ReLU".to_string()),
            })
            .collect(),
        lora: lora.map(|(rank, alpha, scale)| GraphLora { rank, alpha, scale }),
    }
}

/// A file the run wrote, with its size.
pub fn file_info(path: &Path) -> Result<FileInfo> {
    let bytes = std::fs::metadata(path).with_context(|| format!("reading the size of {}", path.display()))?.len();
    Ok(FileInfo { path: path.display().to_string(), bytes })
}

/// Data set statistics and images per digit.
pub fn add_data(r: &mut RunReport, dir: &Path, data: &Data) {
    r.data_stat("directory", dir.display());
    r.data_stat("training images", group(data.train.len()));
    r.data_stat("test images", group(data.test.len()));
    r.data_stat("image size", format!("{} × {} = {} pixels", data.raw.train.rows, data.raw.train.cols, data.raw.train.pixels()));
    r.data_stat("pixel mean / std (training set, used to normalise)", format!("{:.4} / {:.4}", data.mean, data.std));
    let mut t = Table::new("Images per digit", &["digit", "training", "test"]);
    for d in 0..10u8 {
        let n = |labels: &[u8]| labels.iter().filter(|&&l| l == d).count();
        t.row(vec![d.to_string(), group(n(&data.raw.train.labels)), group(n(&data.raw.test.labels))]);
    }
    r.data_tables.push(t);
}

/// A key/value table of an object's scalar fields (and short number arrays), written as in the JSON.
pub fn json_table(title: &str, v: &Value) -> Table {
    let mut t = Table::new(title, &["field", "value"]);
    if let Value::Object(m) = v {
        for (k, v) in m {
            match v {
                Value::Object(_) => {}
                Value::String(s) => {
                    t.row(vec![k.clone(), s.clone()]);
                }
                other => {
                    t.row(vec![k.clone(), other.to_string()]);
                }
            }
        }
    }
    t
}

/// Writes the report and prints where it went.
pub fn write(dir: &Path, r: &RunReport) -> Result<()> {
    let files = r.write(dir).with_context(|| format!("writing the report into {}", dir.display()))?;
    let html = files.last().map_or_else(|| dir.join("report.html").display().to_string(), |f| f.path.clone());
    println!("Wrote the report: {html} (and {} more files in {})", files.len().saturating_sub(1), dir.display());
    Ok(())
}

/// Everything `lora demo` has to show.
pub struct DemoRun<'a> {
    pub args: &'a crate::cli::DemoArgs,
    pub data: &'a Data,
    pub net: &'a ExpensiveNet,
    pub report: &'a DemoReport,
    pub json_path: &'a Path,
    pub pretrain: &'a TrainStats,
    pub finetune: &'a TrainStats,
    pub pre: &'a Evaluation,
    pub on: &'a Evaluation,
    pub off: &'a Evaluation,
    pub total_seconds: f64,
}

pub fn demo(dir: &Path, d: DemoRun) -> Result<()> {
    let (a, rep) = (d.args, d.report);
    let ft = &rep.finetune;
    let mut r = RunReport::new("lora demo: LoRA fine-tuning on MNIST");
    r.command = command_line();
    r.setting("network", network(d.net)?)
        .setting("pre-training epochs", a.epochs)
        .setting("pre-training batch size", a.pretrain_batch_size)
        .setting("fine-tuned digit", if a.digit.is_some() { ft.digit.to_string() } else { format!("{} (most wrong answers)", ft.digit) })
        .setting("fine-tuning steps", a.steps)
        .setting("fine-tuning batch size", a.batch_size)
        .setting("LoRA rank r", ft.rank)
        .setting("LoRA alpha", ft.alpha)
        .setting("LoRA scale s = alpha / r", ft.scale)
        .setting("seed", a.seed)
        .setting("output directory", a.out.display());
    add_data(&mut r, &a.data.data, d.data);
    r.data_stat(&format!("training images of digit {}", ft.digit), group(ft.digit_train_images));
    r.losses.push(loss("pre-training", d.pretrain)?);
    r.losses.push(loss("fine-tuning", d.finetune)?);
    r.wrong = vec![counts("pre-trained", d.pre), counts("LoRA on", d.on), counts("LoRA off", d.off)];
    r.confusion = vec![matrix("pre-trained", d.pre), matrix("LoRA on", d.on)];
    r.params = layer_counts(&rep.params);
    r.params_lora_name = format!("LoRA (rank {})", ft.rank);
    let p = &rep.proof;
    let errs: Vec<String> = p.effective_weight_max_abs_err_f64.iter().map(|e| format!("{e:.2e}")).collect();
    r.checks = vec![
        Check::new(
            "Base weights and biases bit-for-bit equal to the copy taken before fine-tuning",
            p.base_bits_equal,
            format!("{} tensors compared bit by bit", d.net.model.base_state()?.len()),
        ),
        Check::new(
            "Effective weight with LoRA on == W0 + s·B·A exactly",
            p.effective_weight_exact,
            format!("max |error| per layer against an f64 reference: {}", errs.join(", ")),
        ),
        Check::new(
            "LoRA off: every test logit bit-for-bit equal to the pre-trained network's",
            p.lora_off_logits_identical,
            format!("{} logits compared", group(d.off.logits.len())),
        ),
    ];
    let json = serde_json::to_value(rep)?;
    r.tables.push(json_table("Pre-training (report.json)", &json["pretrain"]));
    r.tables.push(json_table("Fine-tuning (report.json)", &json["finetune"]));
    let mut shapes = Table::new("Layer shapes (report.json)", &["layer", "weight", "bias", "lora_A", "lora_B"]);
    for l in &rep.params.layers {
        let s = |v: &[usize]| format!("{v:?}");
        shapes.row(vec![l.name.clone(), s(&l.weight), s(&l.bias), s(&l.lora_a), s(&l.lora_b)]);
    }
    r.tables.push(shapes);
    r.graph = Some(net_graph(d.net, Some((ft.rank, ft.alpha, ft.scale))));
    r.files = vec![file_info(Path::new(&rep.files.base))?, file_info(d.json_path)?];
    r.timings = vec![
        Timing { name: "pre-training".into(), seconds: rep.pretrain.seconds },
        Timing { name: "fine-tuning".into(), seconds: ft.seconds },
        Timing { name: "whole run before the report".into(), seconds: d.total_seconds },
    ];
    r.json = Some(json);
    write(dir, &r)
}

/// The layer sizes as "784 → 1000 → 2000 → 10", read from the network itself.
fn network(net: &ExpensiveNet) -> Result<String> {
    let n = net.sizes()?;
    Ok(format!("{} → {} → {} → {}", n[0], n[1], n[2], n[3]))
}

/// The part every command's report ends with: the files written (plus the JSON summary when one was asked
/// for), one timing, the summary itself; then writes the report into `dir`.
fn finish(dir: &Path, mut r: RunReport, mut files: Vec<FileInfo>, json: Option<&Path>, timing: (&str, f64), summary: &Value) -> Result<()> {
    if let Some(j) = json {
        files.push(file_info(j)?);
    }
    r.files = files;
    r.timings = vec![Timing { name: timing.0.into(), seconds: timing.1 }];
    r.json = Some(summary.clone());
    write(dir, &r)
}

/// Everything `lora pretrain` has to show.
pub struct PretrainRun<'a> {
    pub args: &'a crate::cli::PretrainArgs,
    pub data: &'a Data,
    pub net: &'a ExpensiveNet,
    pub stats: &'a TrainStats,
    pub eval: &'a Evaluation,
    pub summary: &'a Value,
}

pub fn pretrain(dir: &Path, d: PretrainRun) -> Result<()> {
    let a = d.args;
    let mut r = RunReport::new("lora pretrain: ExpensiveNet on MNIST");
    r.command = command_line();
    r.setting("network", network(d.net)?)
        .setting("epochs", a.epochs)
        .setting("batch size", a.batch_size)
        .setting("learning rate (Adam)", a.lr)
        .setting("seed", a.seed)
        .setting("model file", a.out.display());
    add_data(&mut r, &a.data.data, d.data);
    r.losses.push(loss("pre-training", d.stats)?);
    r.wrong = vec![counts("pre-trained", d.eval)];
    r.confusion = vec![matrix("pre-trained", d.eval)];
    r.params = layer_counts(&crate::common::param_counts(d.net, 1)?);
    r.params_lora_name = "LoRA (rank 1, if added)".into();
    r.tables.push(json_table("Summary (JSON)", d.summary));
    r.graph = Some(net_graph(d.net, None));
    finish(dir, r, vec![file_info(&a.out)?], a.json.as_deref(), ("pre-training", d.stats.seconds), d.summary)
}

/// Everything `lora eval` has to show. `models` are the evaluated variants (the model, later each adapter).
pub struct EvalRun<'a> {
    pub args: &'a crate::cli::EvalArgs,
    pub net: &'a ExpensiveNet,
    pub models: Vec<(String, &'a Evaluation)>,
    pub summary: &'a Value,
    pub seconds: f64,
}

pub fn eval(dir: &Path, d: EvalRun) -> Result<()> {
    let a = d.args;
    let mut r = RunReport::new("lora eval: accuracy on the MNIST test set");
    r.command = command_line();
    r.setting("model", a.model.display()).setting("data", a.data.data.display());
    r.setting("network", network(d.net)?);
    r.wrong = d.models.iter().map(|(n, e)| counts(n, e)).collect();
    r.confusion = d.models.iter().map(|(n, e)| matrix(n, e)).collect();
    r.params = layer_counts(&crate::common::param_counts(d.net, 1)?);
    r.params_lora_name = "LoRA (rank 1, if added)".into();
    r.graph = Some(net_graph(d.net, None));
    finish(dir, r, vec![file_info(&a.model)?], a.json.as_deref(), ("evaluation", d.seconds), d.summary)
}

/// Everything `lora finetune` has to show.
pub struct FinetuneRun<'a> {
    pub args: &'a crate::cli::FinetuneArgs,
    pub data: &'a Data,
    pub net: &'a ExpensiveNet,
    pub digit: u8,
    pub stats: &'a TrainStats,
    pub before: &'a Evaluation,
    pub after: &'a Evaluation,
    pub summary: &'a Value,
}

pub fn finetune(dir: &Path, d: FinetuneRun) -> Result<()> {
    let a = d.args;
    let mut r = RunReport::new("lora finetune: a LoRA adapter on one digit");
    r.command = command_line();
    r.setting("base model", a.model.display())
        .setting("network", network(d.net)?)
        .setting("digit", d.digit)
        .setting("rank", a.lora.rank)
        .setting("alpha", a.lora.alpha)
        .setting("rsLoRA", a.rslora)
        .setting("steps", a.steps)
        .setting("batch size", a.batch_size)
        .setting("learning rate (Adam)", a.lr)
        .setting("seed", a.seed)
        .setting("adapter directory", a.out.display());
    add_data(&mut r, &a.data.data, d.data);
    r.losses.push(loss("fine-tuning", d.stats)?);
    r.wrong = vec![counts("base", d.before), counts("adapter", d.after)];
    r.confusion = vec![matrix("base", d.before), matrix("adapter", d.after)];
    r.params = layer_counts(&crate::common::param_counts(d.net, a.lora.rank as usize)?);
    r.params_lora_name = format!("LoRA (rank {})", a.lora.rank);
    r.tables.push(json_table("Summary (JSON)", d.summary));
    r.graph = Some(net_graph(
        d.net,
        Some((
            a.lora.rank as usize,
            a.lora.alpha,
            if a.rslora { lora::Scaling::RankStabilized } else { lora::Scaling::Standard }.scale(a.lora.alpha, a.lora.rank as usize),
        )),
    ));
    let files = vec![file_info(&a.out.join(lora::adapter::CONFIG_FILE))?, file_info(&a.out.join(lora::adapter::WEIGHTS_FILE))?];
    finish(dir, r, files, a.json.as_deref(), ("fine-tuning", d.stats.seconds), d.summary)
}
