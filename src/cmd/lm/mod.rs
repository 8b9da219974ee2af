//! `lora lm …`: one module per subcommand, plus what they share (progress bars, loading with adapters).

mod bench;
mod demo;
mod eval;
mod finetune;
mod generate;
mod pretrain;
mod report_dir;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lora_lm::jobs::Event;
use lora_lm::train::StepReport;

use crate::common::{check_outputs, Out};
use crate::lm_cli::{LmArgs, LmCommand};

pub fn run(a: LmArgs) -> Result<()> {
    short_spin();
    match a.command {
        LmCommand::Demo(a) => demo::run(a),
        LmCommand::Pretrain(a) => pretrain::run(a),
        LmCommand::Finetune(a) => finetune::run(a),
        LmCommand::Eval(a) => eval::run(a),
        LmCommand::Generate(a) => generate::run(a),
        LmCommand::Bench(a) => bench::run(a),
    }
}

/// Progress of a job's training runs: a bar on a terminal; off one (a log, CI), a plain line at the first
/// step, then every [`PLAIN_EVERY`] and at the end, so a long run never looks hung.
#[derive(Default)]
pub struct Bars {
    bar: Option<StepBar>,
}

impl Bars {
    /// Drives the bar from a job's events (`Start`, `Step`, `Finish`; the others are the caller's).
    pub fn event(&mut self, e: &Event<'_>) {
        match e {
            Event::Start { label, steps, done, .. } => self.bar = Some(StepBar::new(label, *steps, *done)),
            Event::Step(r) => {
                if let Some(b) = self.bar.as_mut() {
                    b.step(r)
                }
            }
            Event::Finish { .. } => {
                if let Some(b) = self.bar.take() {
                    b.finish()
                }
            }
            _ => {}
        }
    }
}

/// How often a run off a terminal prints a progress line.
pub const PLAIN_EVERY: Duration = Duration::from_secs(10);

/// A progress bar over training steps showing loss and tokens per second.
pub struct StepBar {
    bar: ProgressBar,
    label: String,
    /// Off a terminal: when the last plain line was printed.
    last_line: Option<Instant>,
}

impl StepBar {
    pub fn new(label: &str, steps: usize, done: usize) -> Self {
        let bar = ProgressBar::with_draw_target(Some(steps as u64), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{msg} {percent:>3}%|{bar:30}| {pos}/{len} [{elapsed}<{eta}] {prefix}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(label.to_string());
        bar.set_position(done as u64);
        StepBar { bar, label: label.to_string(), last_line: None }
    }

    pub fn step(&mut self, r: &StepReport) {
        let tps = if r.seconds > 0.0 { r.tokens as f64 / r.seconds } else { 0.0 };
        self.bar.set_prefix(format!("loss={:.4} lr={:.2e} {:.0} tok/s", r.loss, r.lr, tps));
        self.bar.set_position(r.step as u64);
        if self.bar.is_hidden() && r.step < r.steps && self.last_line.is_none_or(|t| t.elapsed() >= PLAIN_EVERY) {
            eprintln!("{}: step {}/{} ({:.0} s) {}", self.label, r.step, r.steps, r.seconds, self.bar.prefix());
            self.last_line = Some(Instant::now());
        }
    }

    pub fn finish(&self) {
        self.bar.finish();
        if self.bar.is_hidden() {
            eprintln!("{}: {} steps, {}", self.label, self.bar.position(), self.bar.prefix());
        }
    }
}

/// Refuses to start when an output directory already holds files the command would overwrite, or when
/// its path is an existing file: checked before any work is done.
pub fn check_out_dir(dir: &Path, files: &[&str]) -> Result<()> {
    check_outputs(&[("--out", Some(dir), Out::Dir)])?;
    for f in files {
        let p = dir.join(f);
        if p.exists() {
            anyhow::bail!("{}: already exists; choose another --out or remove it", p.display());
        }
    }
    Ok(())
}

/// candle's own pool (its elementwise ops) spins 25,000 rounds after each op by default, competing with
/// the rayon threads of the fused kernels for the same cores; a short spin measured faster on 2 cores.
/// Set before candle's first op; an explicit `CANDLE_BARRIER_POOL_SPIN_LIMIT` wins.
fn short_spin() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "500");
    }
}

/// Reads a corpus, naming it in the error.
pub fn corpus(path: &Path) -> Result<lora_lm::data::Corpus> {
    lora_lm::data::read_corpus(path).with_context(|| format!("reading data {}", path.display()))
}
